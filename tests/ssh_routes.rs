//! SSH as users configure it, against real OpenSSH sshd processes on loopback: jump hosts
//! (`ProxyJump`, one and two hops), `ProxyCommand`, the OpenSSH transport
//! (`SshContext::use_openssh`), host certificates, and what happens when a hop dies.

mod common;
#[path = "common/sshd.rs"]
mod sshd;

use common::{expect_within, options, serve, CALL_TIMEOUT};
use rpyc::ssh::HostKeyPolicy;
use rpyc::{Error, Service, SshContext, SshErrorKind};
use sshd::{Sshd, SshdConfig};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

fn adder() -> Service {
    Service::new("svc")
        .method("add", |a: i64, b: i64| a + b)
        .method("sleep", |ms: u64| {
            std::thread::sleep(Duration::from_millis(ms))
        })
}

/// A known_hosts file trusting every one of `hosts`.
fn known_hosts_for(dir: &Sshd, hosts: &[&Sshd]) -> PathBuf {
    let path = dir.path(&format!("known_hosts_{}", hosts.len()));
    let text: String = hosts
        .iter()
        .map(|h| format!("[127.0.0.1]:{} {}\n", h.port, h.host_key_ed25519))
        .collect();
    std::fs::write(&path, text).unwrap();
    path
}

/// Lets `key` (another sshd's client key) log in to `host` too, as one user's key would be
/// authorized on every machine of a lab.
fn authorize(host: &Sshd, key: &std::path::Path) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(host.path("authorized_keys"))
        .unwrap();
    writeln!(f, "{}", sshd::read_pub(key)).unwrap();
}

fn jump_spec(jump: &Sshd) -> String {
    format!("{}@127.0.0.1:{}", jump.user, jump.port)
}

/// The ssh_error inside `e`, or a panic naming what came instead.
fn ssh_err(e: Error) -> rpyc::SshError {
    match e {
        Error::Ssh(e) => e,
        other => panic!("expected an SSH error, got {other:?}"),
    }
}

/// Whether a live process of ours (a descendant of this test process) has `marker` in its
/// command line.
fn child_running(marker: &str) -> bool {
    let me = std::process::id().to_string();
    std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
        let p = e.path();
        let Ok(cmdline) = std::fs::read(p.join("cmdline")) else {
            return false;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        let Ok(stat) = std::fs::read_to_string(p.join("stat")) else {
            return false;
        };
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        let mut f = after.split_whitespace();
        let state = f.next().unwrap_or("");
        let ppid = f.next().unwrap_or("");
        cmdline.contains(marker) && state != "Z" && (ppid == me || descends_from(ppid, &me))
    })
}

fn descends_from(pid: &str, ancestor: &str) -> bool {
    let mut pid = pid.to_string();
    for _ in 0..16 {
        if pid == ancestor {
            return true;
        }
        if pid == "0" || pid == "1" || pid.is_empty() {
            return false;
        }
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            return false;
        };
        pid = stat[stat.rfind(')').unwrap() + 2..]
            .split_whitespace()
            .nth(1)
            .unwrap_or("")
            .to_string();
    }
    false
}

/// A call waiting on `conn` when `kill` ends part of its route fails within half the call
/// timeout.
fn a_waiting_call_fails_promptly(conn: &rpyc::Connection, death: &str, kill: impl FnOnce()) {
    let waiting = {
        let conn = conn.clone();
        std::thread::spawn(move || {
            let started = Instant::now();
            let r = conn
                .root()
                .call::<(), _>("sleep", (CALL_TIMEOUT.as_millis() as u64,));
            (r, started.elapsed())
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    kill();
    let (r, took) = waiting.join().unwrap();
    assert!(r.is_err(), "the call survived {death}");
    assert!(took < CALL_TIMEOUT / 2, "failed only after {took:?}");
}

/// A jump host whose sshd logs the channels it opens (see [`hop_was_used`]), and a target that
/// takes the jump host's key.
fn logging_jump_and_target() -> (Sshd, Sshd) {
    let jump = Sshd::start(SshdConfig {
        log_level: "DEBUG1",
        ..Default::default()
    });
    let target = Sshd::start(SshdConfig::default());
    authorize(&jump, &target.client_key);
    (jump, target)
}

/// The jump host opened a channel to the target's sshd: the route went through it.
fn hop_was_used(jump: &Sshd, target: &Sshd) {
    let opened = format!("target 127.0.0.1 port {}", target.port);
    expect_within("the jump sshd logs the hop", Duration::from_secs(5), || {
        jump.log()
            .lines()
            .any(|l| l.contains("server_request_direct_tcpip") && l.contains(&opened))
    });
}

#[test]
fn a_jump_host_carries_the_connection_and_its_death_fails_waiting_calls() {
    let (jump, target) = logging_jump_and_target();
    let server = serve(adder());
    let ctx = target
        .context()
        .known_hosts(known_hosts_for(&jump, &[&jump, &target]))
        .proxy_jump(jump_spec(&jump));
    let conn = options()
        .ssh(ctx)
        .connect("127.0.0.1", server.port)
        .unwrap();
    assert_eq!(conn.root().call::<i64, _>("add", (2, 3)).unwrap(), 5);
    hop_was_used(&jump, &target);
    // The jump host dies mid-call: the waiting call fails promptly.
    a_waiting_call_fails_promptly(&conn, "the jump host's death", || jump.kill());
}

#[test]
fn two_jump_hosts_in_a_chain() {
    let first = Sshd::start(SshdConfig::default());
    let second = Sshd::start(SshdConfig::default());
    let target = Sshd::start(SshdConfig::default());
    authorize(&first, &target.client_key);
    authorize(&second, &target.client_key);
    let server = serve(adder());
    let ctx = target
        .context()
        .known_hosts(known_hosts_for(&first, &[&first, &second, &target]))
        .proxy_jump(format!("{},{}", jump_spec(&first), jump_spec(&second)));
    let conn = options()
        .ssh(ctx)
        .connect("127.0.0.1", server.port)
        .unwrap();
    assert_eq!(conn.root().call::<i64, _>("add", (20, 22)).unwrap(), 42);
}

#[test]
fn a_wrong_host_key_on_the_jump_host_or_the_target_is_refused_naming_which() {
    let jump = Sshd::start(SshdConfig::default());
    let target = Sshd::start(SshdConfig::default());
    authorize(&jump, &target.client_key);
    let server = serve(adder());
    // A known_hosts where `jump_key` stands for the jump host and `target_key` for the target.
    let refused = |name: &str, jump_key: &str, target_key: &str| {
        let file = jump.path(name);
        std::fs::write(
            &file,
            format!(
                "[127.0.0.1]:{} {jump_key}\n[127.0.0.1]:{} {target_key}\n",
                jump.port, target.port
            ),
        )
        .unwrap();
        let ctx = target
            .context()
            .known_hosts(&file)
            .proxy_jump(jump_spec(&jump));
        let e = ssh_err(
            options()
                .ssh(ctx)
                .connect("127.0.0.1", server.port)
                .unwrap_err(),
        );
        assert_eq!(e.kind(), SshErrorKind::HostKeyChanged, "{e}");
        e
    };
    // The jump host's line holds the target's key.
    let e = refused(
        "known_hosts_wrong_jump",
        &target.host_key_ed25519,
        &target.host_key_ed25519,
    );
    assert!(e.message().starts_with("jump host"), "{e}");
    assert!(
        e.message().contains(&format!("127.0.0.1]:{}", jump.port)),
        "{e}"
    );
    // The target's line holds the jump host's key.
    let e = refused(
        "known_hosts_wrong_target",
        &jump.host_key_ed25519,
        &jump.host_key_ed25519,
    );
    assert!(!e.message().starts_with("jump host"), "{e}");
    assert!(
        e.message().contains(&format!("127.0.0.1]:{}", target.port)),
        "{e}"
    );
}

/// A ProxyCommand that reaches `%h:%p` through `jump` with OpenSSH's `ssh -W`, tagged with
/// `marker` so the test can find the process.
fn proxy_command(jump: &Sshd, known_hosts: &std::path::Path, marker: &str) -> String {
    format!(
        "ssh -F /dev/null -o BatchMode=yes -o IdentityAgent=none -o UserKnownHostsFile={} \
         -o SetEnv=RPYC_MARK={marker} -i {} -p {} -W %h:%p -l %r 127.0.0.1",
        known_hosts.display(),
        jump.client_key.display(),
        jump.port
    )
}

/// A target sshd behind a jump sshd, an rpyc server, and a known_hosts file for both.
struct Behind {
    jump: Sshd,
    target: Sshd,
    server: common::TestServer,
    known: PathBuf,
}

impl Behind {
    fn new() -> Behind {
        let jump = Sshd::start(SshdConfig::default());
        let target = Sshd::start(SshdConfig::default());
        let known = known_hosts_for(&jump, &[&jump, &target]);
        Behind {
            jump,
            target,
            server: serve(adder()),
            known,
        }
    }

    /// A context reaching the target through `command`.
    fn through(&self, command: String) -> SshContext {
        self.target
            .context()
            .known_hosts(&self.known)
            .proxy_command(command)
    }

    /// `proxy_command` through this jump host.
    fn ssh_w(&self, marker: &str) -> String {
        proxy_command(&self.jump, &self.known, marker)
    }

    fn connect(&self, ctx: &SshContext) -> rpyc::Connection {
        options()
            .ssh(ctx.clone())
            .connect("127.0.0.1", self.server.port)
            .unwrap()
    }
}

#[test]
fn a_proxy_command_carries_the_session_and_is_gone_after_close_and_drop() {
    let b = Behind::new();
    let marker = "rpyc-proxy-close";
    let ctx = b.through(b.ssh_w(marker));
    let conn = b.connect(&ctx);
    assert_eq!(conn.root().call::<i64, _>("add", (1, 2)).unwrap(), 3);
    assert!(child_running(marker), "the proxy command should be running");
    conn.close();
    expect_within(
        "the proxy command has ended",
        Duration::from_secs(5),
        || !child_running(marker),
    );
    // Dropping the connection ends it too.
    let conn = b.connect(&ctx);
    assert_eq!(conn.root().call::<i64, _>("add", (2, 2)).unwrap(), 4);
    assert!(child_running(marker), "the proxy command should be running");
    drop(conn);
    expect_within(
        "the proxy command has ended after drop",
        Duration::from_secs(5),
        || !child_running(marker),
    );
}

#[test]
fn a_proxy_command_is_ended_with_every_process_it_started() {
    let b = Behind::new();
    // A helper process the command leaves behind, holding the command's stdout: unless the
    // whole process group is ended, the pipe never closes.
    let unique = format!("3000.{}", std::process::id());
    let ctx = b.through(format!(
        "sleep {unique} 2>/dev/null & {}",
        b.ssh_w("rpyc-proxy-group")
    ));
    let conn = b.connect(&ctx);
    assert_eq!(conn.root().call::<i64, _>("add", (3, 4)).unwrap(), 7);
    let sleeping = || {
        let out = Command::new("pgrep")
            .args(["-f", &format!("sleep {unique}")])
            .output()
            .unwrap();
        !out.stdout.is_empty()
    };
    assert!(sleeping(), "the helper process should be running");
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        conn.close();
        let _ = done_tx.send(());
    });
    assert!(
        done_rx.recv_timeout(Duration::from_secs(5)).is_ok(),
        "close did not return"
    );
    expect_within(
        "the helper process has ended",
        Duration::from_secs(5),
        || !sleeping(),
    );
}

#[test]
fn a_dead_proxy_command_fails_waiting_calls_promptly() {
    let b = Behind::new();
    let marker = "rpyc-proxy-dies";
    let conn = b.connect(&b.through(b.ssh_w(marker)));
    a_waiting_call_fails_promptly(&conn, "the proxy command's death", || {
        let _ = Command::new("pkill").args(["-KILL", "-f", marker]).status();
    });
}

#[test]
fn the_openssh_transport_connects_with_a_key_and_leaves_no_ssh_after_close_drop_or_panic() {
    let d = sshd::shared();
    let server = serve(adder());
    let ctx = d.context().use_openssh(true);
    let conn = options()
        .ssh(ctx.clone())
        .connect("127.0.0.1", server.port)
        .unwrap();
    assert_eq!(conn.root().call::<i64, _>("add", (2, 2)).unwrap(), 4);
    let marker = format!("127.0.0.1:{}", server.port);
    assert!(child_running(&marker), "ssh -W should be running");
    conn.close();
    expect_within("ssh has ended after close", Duration::from_secs(5), || {
        !child_running(&marker)
    });
    // Dropping the last handle ends it too.
    let conn = options()
        .ssh(ctx.clone())
        .connect("127.0.0.1", server.port)
        .unwrap();
    assert_eq!(conn.root().call::<i64, _>("add", (3, 3)).unwrap(), 6);
    drop(conn);
    expect_within("ssh has ended after drop", Duration::from_secs(5), || {
        !child_running(&marker)
    });
    // So does a thread that panics while it holds the connection.
    let opts = options().ssh(ctx);
    let port = server.port;
    let t = std::thread::spawn(move || {
        let conn = opts.connect("127.0.0.1", port).unwrap();
        assert_eq!(conn.root().call::<i64, _>("add", (4, 4)).unwrap(), 8);
        panic!("the thread holding the connection dies");
    });
    assert!(t.join().is_err());
    expect_within(
        "ssh has ended after its thread panicked",
        Duration::from_secs(5),
        || !child_running(&marker),
    );
}

#[test]
fn the_openssh_transport_uses_an_agent() {
    let d = sshd::shared();
    let server = serve(adder());
    let sock = d.path(&format!("agent-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&sock);
    let out = Command::new("ssh-agent")
        .arg("-a")
        .arg(&sock)
        .output()
        .expect("ssh-agent");
    assert!(out.status.success());
    let pid: u32 = String::from_utf8_lossy(&out.stdout)
        .split("SSH_AGENT_PID=")
        .nth(1)
        .and_then(|s| s.split(';').next())
        .and_then(|s| s.parse().ok())
        .expect("agent pid");
    struct Agent(u32);
    impl Drop for Agent {
        fn drop(&mut self) {
            let _ = Command::new("kill").arg(self.0.to_string()).status();
        }
    }
    let _agent = Agent(pid);
    let added = Command::new("ssh-add")
        .arg(&d.client_key)
        .env("SSH_AUTH_SOCK", &sock)
        .output()
        .unwrap();
    assert!(
        added.status.success(),
        "{}",
        String::from_utf8_lossy(&added.stderr)
    );
    // No key file: only the agent can authenticate.
    let ctx = SshContext::new("127.0.0.1")
        .port(d.port)
        .user(&d.user)
        .known_hosts(&d.known_hosts)
        .config_file("/dev/null")
        .identity_agent(&sock)
        .use_openssh(true);
    let conn = options()
        .ssh(ctx)
        .connect("127.0.0.1", server.port)
        .unwrap();
    assert_eq!(conn.root().call::<i64, _>("add", (5, 5)).unwrap(), 10);
}

#[test]
fn openssh_errors_reach_the_caller() {
    let d = sshd::shared();
    let server = serve(adder());
    let ctx = d.context().keyfile(&d.stranger_key).use_openssh(true);
    let started = Instant::now();
    let e = ssh_err(
        options()
            .ssh(ctx)
            .connect("127.0.0.1", server.port)
            .unwrap_err(),
    );
    assert_eq!(e.kind(), SshErrorKind::AuthenticationFailed, "{e}");
    assert!(e.message().contains("Permission denied"), "{e}");
    assert!(started.elapsed() < CALL_TIMEOUT);
    // An unknown host under the strict policy.
    let empty = d.path("known_hosts_empty_openssh");
    std::fs::write(&empty, "").unwrap();
    let ctx = d
        .context()
        .known_hosts(&empty)
        .host_key_policy(HostKeyPolicy::Strict)
        .use_openssh(true);
    let e = ssh_err(
        options()
            .ssh(ctx)
            .connect("127.0.0.1", server.port)
            .unwrap_err(),
    );
    assert_eq!(e.kind(), SshErrorKind::HostKeyUnknown, "{e}");
}

#[test]
fn host_certificates_are_refused_by_libssh2_naming_the_line_and_verified_by_openssh() {
    let d = Sshd::start(SshdConfig {
        host_certificate: true,
        ..Default::default()
    });
    let server = serve(adder());
    let ca_only = d.path("known_hosts_ca");
    std::fs::write(
        &ca_only,
        format!(
            "# the lab's host CA\n@cert-authority [127.0.0.1]:{} {}\n",
            d.port,
            d.host_ca.as_ref().unwrap()
        ),
    )
    .unwrap();
    let e = ssh_err(
        options()
            .ssh(d.context().known_hosts(&ca_only))
            .connect("127.0.0.1", server.port)
            .unwrap_err(),
    );
    assert_eq!(e.kind(), SshErrorKind::HostKeyUnknown, "{e}");
    assert!(
        e.message().contains(&format!("{}:2", ca_only.display())),
        "{e}"
    );
    assert!(e.message().contains("use_openssh"), "{e}");
    // OpenSSH verifies the certificate against the same line.
    let conn = options()
        .ssh(d.context().known_hosts(&ca_only).use_openssh(true))
        .connect("127.0.0.1", server.port)
        .unwrap();
    assert_eq!(conn.root().call::<i64, _>("add", (4, 5)).unwrap(), 9);
    conn.close();
    // A CA that is not this host's: OpenSSH refuses.
    let other_ca = d.path("other_ca");
    sshd::keygen(&other_ca, "ed25519", "");
    let wrong = d.path("known_hosts_wrong_ca");
    std::fs::write(
        &wrong,
        format!(
            "@cert-authority [127.0.0.1]:{} {}\n",
            d.port,
            sshd::read_pub(&other_ca)
        ),
    )
    .unwrap();
    let e = ssh_err(
        options()
            .ssh(
                d.context()
                    .known_hosts(&wrong)
                    .host_key_policy(HostKeyPolicy::Strict)
                    .use_openssh(true),
            )
            .connect("127.0.0.1", server.port)
            .unwrap_err(),
    );
    assert!(
        matches!(
            e.kind(),
            SshErrorKind::HostKeyUnknown | SshErrorKind::HostKeyChanged
        ),
        "{e}"
    );
}

#[test]
fn a_revoked_host_key_is_refused_by_both_transports() {
    let d = sshd::shared();
    let server = serve(adder());
    let revoked = d.path("known_hosts_revoked_routes");
    std::fs::write(
        &revoked,
        format!(
            "[127.0.0.1]:{} {}\n@revoked * {}\n",
            d.port, d.host_key_ed25519, d.host_key_ed25519
        ),
    )
    .unwrap();
    for openssh in [false, true] {
        let e = ssh_err(
            options()
                .ssh(d.context().known_hosts(&revoked).use_openssh(openssh))
                .connect("127.0.0.1", server.port)
                .unwrap_err(),
        );
        assert!(
            matches!(
                e.kind(),
                SshErrorKind::HostKeyRevoked | SshErrorKind::HostKeyUnknown
            ),
            "openssh={openssh}: {e}"
        );
        if !openssh {
            assert_eq!(e.kind(), SshErrorKind::HostKeyRevoked, "{e}");
        }
    }
}

#[test]
fn proxy_jump_comes_from_the_ssh_config_as_users_write_it() {
    let (jump, target) = logging_jump_and_target();
    let server = serve(adder());
    let config = jump.path("ssh_config");
    std::fs::write(
        &config,
        format!(
            "Host lab-target\n  HostName 127.0.0.1\n  Port {}\n  User {}\n  ProxyJump {}\n",
            target.port,
            target.user,
            jump_spec(&jump)
        ),
    )
    .unwrap();
    // Only the alias, the key and the known hosts: the route comes from the file.
    let ctx = SshContext::new("lab-target")
        .config_file(&config)
        .keyfile(&target.client_key)
        .known_hosts(known_hosts_for(&jump, &[&jump, &target]))
        .agent(false);
    let conn = options()
        .ssh(ctx)
        .connect("127.0.0.1", server.port)
        .unwrap();
    assert_eq!(conn.root().call::<i64, _>("add", (6, 7)).unwrap(), 13);
    hop_was_used(&jump, &target);
}
