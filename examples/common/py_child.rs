//! Python RPyC processes for the benchmarks (`examples/bench.rs` and `benches/peers` include
//! this file with `#[path]`): a server script, or `testdata/python/bench_client.py` making
//! batches of calls, each killed with its process group when dropped, every wait bounded.

use std::hint::black_box;
use std::io::{self, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// How long a Python process may take to say it is ready (its port, `READY`), or to answer.
pub const PY_WAIT: Duration = Duration::from_secs(20);

/// A Python process with piped stdin and stdout, killed (its whole process group) when
/// dropped. Its stdout is read line by line on a thread of its own, so every wait is bounded.
pub struct PyChild {
    child: std::process::Child,
    stdin: Option<std::process::ChildStdin>,
    lines: mpsc::Receiver<String>,
    what: String,
}

impl PyChild {
    /// Runs `python -u ARGS` in the repository `repo` (where `testdata/python` is).
    pub fn spawn(python: &Path, repo: &Path, args: &[&str]) -> Res<PyChild> {
        use std::os::unix::process::CommandExt;
        let what = format!("python {}", args.join(" "));
        let mut child = Command::new(python)
            .arg("-u")
            .args(args)
            .current_dir(repo)
            .env("PYTHONDONTWRITEBYTECODE", "1")
            // demo_server.py exits when its stdin closes: it never outlives the bench.
            .env("RPYC_TEST_WATCH_STDIN", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .process_group(0)
            .spawn()
            .map_err(|e| format!("cannot start {what}: {e}"))?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let (tx, lines) = mpsc::channel();
        thread::Builder::new()
            .name("py-stdout".into())
            .spawn(move || {
                for line in io::BufRead::lines(BufReader::new(stdout)) {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            })?;
        Ok(PyChild {
            child,
            stdin,
            lines,
            what,
        })
    }

    /// The next line it prints, within [`PY_WAIT`].
    pub fn line(&self) -> Res<String> {
        self.lines.recv_timeout(PY_WAIT).map_err(|e| {
            let why = match e {
                mpsc::RecvTimeoutError::Timeout => format!("said nothing for {PY_WAIT:?}"),
                mpsc::RecvTimeoutError::Disconnected => "ended".to_string(),
            };
            format!("{} {why}", self.what).into()
        })
    }

    /// Skips lines until one starts with `prefix`; returns the rest of it.
    pub fn wait_for(&self, prefix: &str) -> Res<String> {
        loop {
            if let Some(rest) = self.line()?.strip_prefix(prefix) {
                return Ok(rest.trim().to_string());
            }
        }
    }

    /// A Python RPyC server script that prints `PORT <n>`: the process and the port.
    pub fn server(python: &Path, repo: &Path, args: &[&str]) -> Res<(PyChild, u16)> {
        let p = PyChild::spawn(python, repo, args)?;
        let port = p.wait_for("PORT ")?.parse()?;
        Ok((p, port))
    }

    /// bench_client.py in batch mode with `size`-byte payloads, connected to `port`, warmed
    /// up: each call is one CALLATTR `echo(payload)` request, the very request
    /// `PyObject::call_method("echo", ..)` sends.
    pub fn client(python: &Path, repo: &Path, port: u16, size: usize) -> Res<PyChild> {
        let (port, size) = (port.to_string(), size.to_string());
        let p = PyChild::spawn(
            python,
            repo,
            &[
                "testdata/python/bench_client.py",
                "--port",
                &port,
                "--size",
                &size,
                "--batches",
            ],
        )?;
        p.wait_for("READY")?;
        Ok(p)
    }

    /// Has bench_client.py make `n` calls; returns when they are done.
    pub fn calls(&mut self, n: u64) -> Res<()> {
        let stdin = self.stdin.as_mut().ok_or("stdin closed")?;
        writeln!(stdin, "{n}")?;
        stdin.flush()?;
        let secs: f64 = self.line()?.trim().parse()?;
        black_box(secs);
        Ok(())
    }
}

impl Drop for PyChild {
    fn drop(&mut self) {
        self.stdin = None;
        // SAFETY: plain syscall; the group is our own unreaped child's, so its id is not reused.
        unsafe {
            libc::kill(-(self.child.id() as libc::pid_t), libc::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

/// The Python interpreter with rpyc 6 and its rpyc version: `RPYC_TEST_PYTHON`, else
/// `target/pyenv/bin/python` of the repository `repo`.
pub fn find_python(repo: &Path) -> Result<(PathBuf, String), String> {
    let (path, from) = match std::env::var_os("RPYC_TEST_PYTHON") {
        Some(p) => (PathBuf::from(p), "RPYC_TEST_PYTHON"),
        None => (repo.join("target/pyenv/bin/python"), "the default"),
    };
    if !path.exists() {
        return Err(format!("{} ({from}) does not exist", path.display()));
    }
    let check = "import rpyc; print('RPYC', rpyc.__version__)";
    let version = PyChild::spawn(&path, repo, &["-c", check])
        .and_then(|p| p.wait_for("RPYC "))
        .map_err(|e| format!("{} cannot import rpyc: {e}", path.display()))?;
    if !version.starts_with("6.") {
        return Err(format!("{} has rpyc {version}, not 6.x", path.display()));
    }
    Ok((path, version))
}
