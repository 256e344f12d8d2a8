//! A real OpenSSH sshd for the SSH tests: generated host and client keys, authorized_keys and
//! known_hosts, listening on a free port of 127.0.0.1.
//!
//! sshd runs under a small supervising shell whose stdin is a pipe held by the test process:
//! when the test binary exits, however it exits, the pipe closes and the shell kills sshd and
//! removes the directory. Nothing is left behind.
#![allow(dead_code)] // each test file uses a different subset

use rpyc::SshContext;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

pub const SSHD: &str = "/usr/sbin/sshd";

/// Fails loudly (never skips) when sshd is missing.
pub fn require_sshd() {
    assert!(
        Path::new(SSHD).exists(),
        "\n\n=== {SSHD} is missing: the SSH tests need a real OpenSSH server.\n\
         === Install it with `apt-get install -y openssh-server` (scripts/test.sh does this when \
         run as root).\n\n"
    );
}

/// What to change from the default sshd configuration.
#[derive(Clone)]
pub struct SshdConfig {
    pub allow_tcp_forwarding: bool,
    pub password_authentication: bool,
    /// Also serve a host certificate for the ed25519 key, signed by a CA made for this sshd
    /// (see [`Sshd::host_ca`]), for principals `127.0.0.1` and `localhost`.
    pub host_certificate: bool,
    /// sshd's `LogLevel` (default `VERBOSE`).
    pub log_level: &'static str,
}

impl Default for SshdConfig {
    fn default() -> Self {
        SshdConfig {
            allow_tcp_forwarding: true,
            password_authentication: true,
            host_certificate: false,
            log_level: "VERBOSE",
        }
    }
}

/// A running sshd and the files made for it.
pub struct Sshd {
    pub port: u16,
    pub dir: PathBuf,
    /// The user the tests log in as (the current user).
    pub user: String,
    /// An authorized ed25519 key without passphrase.
    pub client_key: PathBuf,
    /// An authorized ed25519 key with passphrase [`PASSPHRASE`].
    pub client_key_pass: PathBuf,
    /// A key that is not authorized.
    pub stranger_key: PathBuf,
    /// A known_hosts file with the server's ed25519 key.
    pub known_hosts: PathBuf,
    /// The server's ed25519 public key line (`ssh-ed25519 AAAA...`).
    pub host_key_ed25519: String,
    /// The server's RSA public key line.
    pub host_key_rsa: String,
    /// With [`SshdConfig::host_certificate`]: the public key line of the CA that signed the
    /// host certificate.
    pub host_ca: Option<String>,
    pid: u32,
    control: Mutex<Option<ChildStdin>>,
    shell: Mutex<Child>,
}

pub const PASSPHRASE: &str = "correct horse battery staple";

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// The sshd shared by the tests of one test binary (started on first use).
pub fn shared() -> &'static Sshd {
    static SHARED: OnceLock<Sshd> = OnceLock::new();
    SHARED.get_or_init(|| Sshd::start(SshdConfig::default()))
}

/// Runs a command, panicking with its output if it fails.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Generates a key pair at `path` (and `path.pub`).
pub fn keygen(path: &Path, kind: &str, passphrase: &str) {
    let _ = std::fs::remove_file(path);
    let mut cmd = Command::new("ssh-keygen");
    cmd.args(["-q", "-t", kind, "-N", passphrase, "-C", "rpyc-test", "-f"])
        .arg(path);
    if kind == "rsa" {
        cmd.args(["-b", "2048"]);
    }
    run(&mut cmd);
}

pub fn read_pub(path: &Path) -> String {
    let text = std::fs::read_to_string(path.with_extension("pub")).expect("read public key");
    let mut f = text.split_whitespace();
    format!("{} {}", f.next().unwrap(), f.next().unwrap())
}

/// The current user's name.
pub fn current_user() -> String {
    run(Command::new("id").arg("-un")).trim().to_string()
}

pub fn is_root() -> bool {
    run(Command::new("id").arg("-u")).trim() == "0"
}

impl Sshd {
    /// Starts an sshd with `config` on a free port (retrying on a port clash).
    pub fn start(config: SshdConfig) -> Sshd {
        require_sshd();
        if is_root() {
            // A root sshd refuses to start without its privilege separation directory.
            let _ = std::fs::create_dir_all("/run/sshd");
        }
        let dir = std::env::temp_dir().join(format!(
            "rpyc-sshd-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let host_ed = dir.join("host_ed25519");
        let host_rsa = dir.join("host_rsa");
        keygen(&host_ed, "ed25519", "");
        keygen(&host_rsa, "rsa", "");
        let client_key = dir.join("id_ed25519");
        let client_key_pass = dir.join("id_ed25519_pass");
        let stranger_key = dir.join("id_stranger");
        keygen(&client_key, "ed25519", "");
        keygen(&client_key_pass, "ed25519", PASSPHRASE);
        keygen(&stranger_key, "ed25519", "");
        let authorized = dir.join("authorized_keys");
        std::fs::write(
            &authorized,
            format!(
                "{}\n{}\n",
                read_pub(&client_key),
                read_pub(&client_key_pass)
            ),
        )
        .unwrap();
        let host_key_ed25519 = read_pub(&host_ed);
        let host_key_rsa = read_pub(&host_rsa);
        let mut cert_line = String::new();
        let host_ca = config.host_certificate.then(|| {
            let ca = dir.join("host_ca");
            keygen(&ca, "ed25519", "");
            run(Command::new("ssh-keygen")
                .args(["-q", "-s"])
                .arg(&ca)
                .args(["-I", "rpyc-test-host", "-h", "-n", "127.0.0.1,localhost"])
                .arg(host_ed.with_extension("pub")));
            cert_line = format!(
                "HostCertificate {}\n",
                dir.join("host_ed25519-cert.pub").display()
            );
            read_pub(&ca)
        });
        let yes_no = |b: bool| if b { "yes" } else { "no" };
        for attempt in 0..20 {
            let port = {
                let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                l.local_addr().unwrap().port()
            };
            let cfg = dir.join("sshd_config");
            std::fs::write(
                &cfg,
                format!(
                    "{cert_line}ListenAddress 127.0.0.1:{port}\nHostKey {}\nHostKey {}\nPidFile {}\n\
                     AuthorizedKeysFile {}\nStrictModes no\nUsePAM no\nPubkeyAuthentication yes\n\
                     PasswordAuthentication {}\nKbdInteractiveAuthentication no\n\
                     PermitRootLogin yes\nAllowTcpForwarding {}\nUseDNS no\nMaxStartups 100\n\
                     MaxSessions 100\nLogLevel {}\n",
                    host_ed.display(),
                    host_rsa.display(),
                    dir.join("sshd.pid").display(),
                    authorized.display(),
                    yes_no(config.password_authentication),
                    yes_no(config.allow_tcp_forwarding),
                    config.log_level,
                ),
            )
            .unwrap();
            let log = dir.join(format!("sshd-{attempt}.log"));
            let (shell, pid) = supervise(
                &format!("{SSHD} -D -E \"$1\" -f \"$2\""),
                &[log.as_os_str(), cfg.as_os_str(), dir.as_os_str()],
            );
            let mut shell = shell;
            let control = shell.stdin.take();
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                if text.contains("Server listening on") {
                    let known_hosts = dir.join("known_hosts");
                    std::fs::write(
                        &known_hosts,
                        format!("[127.0.0.1]:{port} {host_key_ed25519}\n"),
                    )
                    .unwrap();
                    return Sshd {
                        port,
                        user: current_user(),
                        client_key,
                        client_key_pass,
                        stranger_key,
                        known_hosts,
                        host_key_ed25519,
                        host_key_rsa,
                        host_ca,
                        pid,
                        control: Mutex::new(control),
                        shell: Mutex::new(shell),
                        dir,
                    };
                }
                if !alive(pid) {
                    drop(control);
                    let _ = shell.wait();
                    if text.contains("Address already in use") {
                        break; // another port
                    }
                    panic!("sshd exited at start; its log:\n{text}");
                }
                assert!(
                    Instant::now() < deadline,
                    "sshd did not start listening in 10 s; its log:\n{text}"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        panic!("could not find a free port for sshd in 20 tries");
    }

    /// A context for this sshd: its port, the current user, the authorized key, its
    /// known_hosts, no ssh config file and no agent, a 10 s connect timeout.
    pub fn context(&self) -> SshContext {
        SshContext::new("127.0.0.1")
            .port(self.port)
            .user(&self.user)
            .keyfile(&self.client_key)
            .known_hosts(&self.known_hosts)
            .config_file("/dev/null")
            .agent(false)
            .connect_timeout(Duration::from_secs(10))
    }

    /// A path in this sshd's directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Kills sshd and every process it started (the per-connection children too): as if the
    /// machine's sshd crashed.
    pub fn kill(&self) {
        let mut pids = descendants(self.pid);
        pids.push(self.pid);
        let mut cmd = Command::new("kill");
        cmd.arg("-KILL");
        for p in &pids {
            cmd.arg(p.to_string());
        }
        let _ = cmd.stderr(Stdio::null()).status();
    }

    /// sshd's log so far.
    pub fn log(&self) -> String {
        let mut all = String::new();
        for e in std::fs::read_dir(&self.dir).unwrap().flatten() {
            if e.file_name().to_string_lossy().ends_with(".log") {
                all += &std::fs::read_to_string(e.path()).unwrap_or_default();
            }
        }
        all
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        // Closing the control pipe makes the shell kill sshd and remove the directory.
        drop(self.control.lock().unwrap().take());
        let _ = self.shell.lock().unwrap().wait();
    }
}

/// Starts `command` (a shell fragment using "$1", "$2"...) in the background under a shell that
/// kills it and removes the directory given as the last argument when its stdin closes.
/// Returns the shell and the command's pid.
pub fn supervise(command: &str, args: &[&std::ffi::OsStr]) -> (Child, u32) {
    let dir_arg = args.len();
    let script = format!(
        "{command} & pid=$!; echo $pid; read x; kill $pid 2>/dev/null; wait $pid; \
         rm -rf \"${dir_arg}\""
    );
    let mut shell = Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg("sh")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start sh");
    let mut line = String::new();
    BufReader::new(shell.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let pid = line
        .trim()
        .parse()
        .expect("the supervising shell prints a pid");
    (shell, pid)
}

/// Whether process `pid` is running (not exited, not a zombie).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat[stat.rfind(')').unwrap() + 2..].chars().next();
            state != Some('Z') && state != Some('X')
        }
        Err(_) => false,
    }
}

/// Every process whose chain of parents leads to `pid`.
fn descendants(pid: u32) -> Vec<u32> {
    let mut parent_of: Vec<(u32, u32)> = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) {
            let rest = &stat[stat.rfind(')').unwrap() + 2..];
            if let Some(pp) = rest.split_whitespace().nth(1).and_then(|s| s.parse().ok()) {
                parent_of.push((p, pp));
            }
        }
    }
    let mut found = vec![pid];
    let mut i = 0;
    while i < found.len() {
        let cur = found[i];
        for &(p, pp) in &parent_of {
            if pp == cur && !found.contains(&p) {
                found.push(p);
            }
        }
        i += 1;
    }
    found.remove(0);
    found
}
