//! Child processes for tests that measure what a hostile peer costs (memory, threads) on a
//! process of its own: the test binary runs itself again, running only an ignored test that
//! plays the role asked for in an environment variable. The parent reads the child's
//! `/proc/PID/status` and hears what it says on its stdout; the child exits when the parent
//! closes its stdin.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const ROLE: &str = "RPYC_TEST_CHILD";

/// What a growth of resident memory may add to the bytes a test sent, whatever it sent: thread
/// stacks touched, allocator arenas, the test harness. Generous, so that the ratio checks are
/// about proportions, not noise.
pub const SLACK: u64 = 24 << 20;
const SAID: &str = "child says: ";

/// A running child process; killed when dropped.
pub struct Child {
    proc: std::process::Child,
    lines: mpsc::Receiver<String>,
    pub pid: u32,
}

impl Child {
    /// Runs this test binary again as a child that runs only the ignored test `entry`, which
    /// plays `role` (see [`role`]).
    pub fn start(entry: &str, role: &str) -> Child {
        let exe = std::env::current_exe().expect("the test binary");
        Child::spawn(Command::new(exe), entry, role)
    }

    /// As [`start`](Self::start), with at most `nofile` open files (the soft and the hard
    /// limit, as `ulimit -n` sets them), so the child cannot raise its own.
    pub fn start_with_nofile(entry: &str, role: &str, nofile: u64) -> Child {
        let exe = std::env::current_exe().expect("the test binary");
        let mut sh = Command::new("sh");
        sh.arg("-c")
            .arg(format!("ulimit -n {nofile} && exec \"$0\" \"$@\""))
            .arg(exe);
        Child::spawn(sh, entry, role)
    }

    /// Starts `cmd` (which runs this test binary) with the arguments that run only `entry`.
    fn spawn(mut cmd: Command, entry: &str, role: &str) -> Child {
        let mut proc = cmd
            .args([
                entry,
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(ROLE, role)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the child");
        let pid = proc.id();
        let out = proc.stdout.take().expect("piped");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                // The test harness may have started the line ("test child ... ").
                if let Some(at) = line.find(SAID) {
                    if tx.send(line[at + SAID.len()..].to_string()).is_err() {
                        return;
                    }
                }
            }
        });
        Child { proc, lines, pid }
    }

    /// The next line the child said with [`say`], waiting at most `timeout`.
    pub fn heard(&self, timeout: Duration) -> String {
        self.lines
            .recv_timeout(timeout)
            .unwrap_or_else(|e| panic!("the child said nothing within {timeout:?}: {e}"))
    }

    /// The next line the child says within `timeout`, if any.
    pub fn heard_within(&self, timeout: Duration) -> Option<String> {
        self.lines.recv_timeout(timeout).ok()
    }

    /// Sends the child `line` on its stdin (which [`serve_until_parent_leaves`] reads and
    /// ignores; a child may answer with [`say`]).
    pub fn tell(&mut self, line: &str) {
        let stdin = self
            .proc
            .stdin
            .as_mut()
            .expect("the child's stdin is piped");
        writeln!(stdin, "{line}")
            .and_then(|_| stdin.flush())
            .expect("the child reads its stdin");
    }

    /// The port the child said it listens on (`port N`).
    pub fn port(&self) -> u16 {
        let line = self.heard(Duration::from_secs(30));
        line.strip_prefix("port ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("expected `port N` from the child, got {line:?}"))
    }

    /// A field of `/proc/PID/status` (`VmHWM`, `VmRSS`: KiB; `Threads`: a count).
    pub fn status(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid))
            .expect("/proc/PID/status is readable");
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("no {field} in /proc/{}/status", self.pid))
    }

    /// Resident memory now, in bytes.
    pub fn rss(&self) -> u64 {
        self.status("VmRSS") * 1024
    }

    /// The peak of resident memory since the last [`reset_peak`](Self::reset_peak), in bytes.
    pub fn peak(&self) -> u64 {
        self.status("VmHWM") * 1024
    }

    /// Starts measuring the peak afresh (Linux: `5` written to `/proc/PID/clear_refs`).
    pub fn reset_peak(&self) {
        std::fs::write(format!("/proc/{}/clear_refs", self.pid), "5")
            .expect("/proc/PID/clear_refs is writable by the parent");
    }

    /// Checks that the peak of resident memory since [`reset_peak`](Self::reset_peak) grew by
    /// at most `ratio` times `basis` bytes (plus [`SLACK`]) over `before`, the resident memory
    /// then; prints the proportion either way.
    pub fn assert_peak_grew_at_most(&self, before: u64, basis: u64, ratio: f64, what: &str) {
        let grew = self.peak().saturating_sub(before);
        let bound = (basis as f64 * ratio) as u64 + SLACK;
        let times = grew as f64 / basis as f64;
        eprintln!(
            "{what}: the child's peak grew by {} KiB, {times:.2}x {} KiB (bound {ratio}x + {} KiB)",
            grew >> 10,
            basis >> 10,
            SLACK >> 10
        );
        assert!(
            grew <= bound,
            "{what}: the child grew by {grew} bytes, {times:.1}x {basis} (over {ratio}x)"
        );
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.proc.kill();
        let _ = self.proc.wait();
    }
}

/// In a child: the role it plays; `None` when the test binary runs normally.
pub fn role() -> Option<String> {
    std::env::var(ROLE).ok()
}

/// In a child: tells the parent `line` (read with [`Child::heard`]).
pub fn say(line: impl std::fmt::Display) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{SAID}{line}").unwrap();
    out.flush().unwrap();
}

/// In a child process: says each log record at `level` or above whose target starts with
/// `target` (`log ...`), for the parent to check.
#[allow(dead_code)]
pub fn say_logs(level: log::Level, target: &'static str) {
    struct SayLogs(log::Level, &'static str);
    impl log::Log for SayLogs {
        fn enabled(&self, m: &log::Metadata) -> bool {
            m.level() <= self.0 && m.target().starts_with(self.1)
        }
        fn log(&self, r: &log::Record) {
            if self.enabled(r.metadata()) {
                say(format!("log {}", r.args()));
            }
        }
        fn flush(&self) {}
    }
    log::set_boxed_logger(Box::new(SayLogs(level, target))).unwrap();
    log::set_max_level(level.to_level_filter());
}

/// In a child: serves until the parent closes its stdin (or kills it), then exits.
pub fn serve_until_parent_leaves() -> ! {
    let mut line = String::new();
    while std::io::stdin().read_line(&mut line).unwrap_or(0) > 0 {
        line.clear();
    }
    std::process::exit(0);
}
