//! Real Python RPyC 6 clients calling a Rust `python::serve` server: client_checks.py passes
//! over TCP, a Unix socket, TLS (Python's defaults, a verified chain and host name, client
//! certificates) and SSH (plumbum's `ssh -L`, which it leaves no process of behind); callbacks
//! nest both ways from several Python threads on one connection; a call slower than Python's
//! timeout fails there and the connection goes on; the server's object table returns to the
//! root alone.

mod common;
#[path = "common/sshd.rs"]
mod sshd;

use common::pyservice::{self, InlineScript};
use common::python::{run_python, PyOutput, PyProcess};
use common::tls::{capture_logs, pki, wait_logged};
use rpyc::SslAuthenticator;
use std::time::{Duration, Instant};

/// How long a run of client_checks.py may take (Python's start included); its calls time out
/// after 10 s.
const RUN: Duration = Duration::from_secs(60);

/// Runs client_checks.py with `args` and checks it passed, printing `OK <check>` for each of
/// `checks` (and no FAIL).
fn checks_pass(args: &[&str], checks: &[&str]) -> PyOutput {
    let out = run_python("client_checks.py", args, RUN);
    out.assert_success();
    let lines = out.lines();
    for check in checks {
        assert!(
            lines.contains(&format!("OK {check}").as_str()),
            "no `OK {check}`: {out}"
        );
    }
    out
}

/// Every check of `all`, in the order client_checks.py runs them.
const ALL: [&str; 10] = [
    "echo",
    "exposed_prefix",
    "attribute",
    "exception",
    "callback",
    "objects",
    "collections",
    "ping",
    "refcounts",
    "close",
];

// ---- Transports ----

#[test]
fn python_client_checks_pass_over_tcp() {
    let server = pyservice::serve();
    let port = server.port.to_string();
    checks_pass(&["--port", &port, "tls_cn", "None", "all"], &ALL);
    // The client hung up: the server forgets the connection.
    common::expect_within("the server has no connection left", common::SETTLE, || {
        server.handle.connections() == 0
    });
}

#[test]
fn python_client_checks_pass_over_a_unix_socket() {
    let dir = std::env::temp_dir().join(format!("rpyc-py-unix-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("s.sock");
    let server = pyservice::serve_with(pyservice::service(), |b| b.unix_path(&path));
    checks_pass(
        &["--port", "0", "--unix", path.to_str().unwrap(), "all"],
        &ALL,
    );
    drop(server);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn python_ssl_connect_with_its_defaults_reaches_a_server_without_a_ca() {
    let p = pki();
    let server = pyservice::serve_with(pyservice::service(), |b| {
        b.authenticator(SslAuthenticator::new(&p.server.key, &p.server.cert))
    });
    let port = server.port.to_string();
    // rpyc.ssl_connect without ca_certs verifies nothing; the server asks for no certificate.
    checks_pass(&["--port", &port, "--tls", "tls_cn", "None", "all"], &ALL);
}

#[test]
fn python_ssl_connect_verifying_the_chain_and_the_host_name_accepts_the_server() {
    let p = pki();
    let server = pyservice::serve_with(pyservice::service(), |b| {
        b.authenticator(SslAuthenticator::new(&p.server.key, &p.server.cert))
    });
    let port = server.port.to_string();
    let ca = p.ca.ca_cert().to_str().unwrap().to_string();
    for host in ["127.0.0.1", "localhost"] {
        checks_pass(
            &[
                "--host",
                host,
                "--port",
                &port,
                "--tls-ca",
                &ca,
                "--tls-verify-hostname",
                "all",
            ],
            &ALL,
        );
    }
    // The same client refuses a server whose certificate names another host.
    let other =
        p.ca.issue("elsewhere", &["elsewhere.example"])
            .expect("a certificate for another host");
    let wrong = pyservice::serve_with(pyservice::service(), |b| {
        b.authenticator(SslAuthenticator::new(&other.key, &other.cert))
    });
    let out = run_python(
        "client_checks.py",
        &[
            "--port",
            &wrong.port.to_string(),
            "--tls-ca",
            &ca,
            "--tls-verify-hostname",
            "ping",
        ],
        RUN,
    );
    assert!(
        !out.success(),
        "a certificate for another host passed: {out}"
    );
    assert!(out.stdout.contains("FAIL connect"), "{out}");
    assert!(
        out.stderr.contains("CERTIFICATE_VERIFY_FAILED") || out.stderr.contains("mismatch"),
        "{out}"
    );
}

#[test]
fn a_server_requiring_client_certificates_sees_alice_and_tells_the_service() {
    let p = pki();
    let server =
        pyservice::serve_with(pyservice::service(), |b| b.authenticator(p.authenticator()));
    let port = server.port.to_string();
    let ca = p.ca.ca_cert().to_str().unwrap().to_string();
    let (key, cert) = (
        p.alice.key.to_str().unwrap().to_string(),
        p.alice.cert.to_str().unwrap().to_string(),
    );
    let mut checks = vec!["tls_cn"];
    checks.extend(ALL);
    checks_pass(
        &[
            "--port",
            &port,
            "--tls-ca",
            &ca,
            "--tls-key",
            &key,
            "--tls-cert",
            &cert,
            "tls_cn",
            "alice",
            "all",
        ],
        &checks,
    );
}

#[test]
fn a_client_without_a_certificate_is_refused_promptly_and_the_server_says_why() {
    capture_logs();
    let p = pki();
    let handshake = Duration::from_secs(5);
    let server = pyservice::serve_with(pyservice::service(), |b| {
        b.authenticator(p.authenticator())
            .handshake_timeout(handshake)
    });
    let port = server.port.to_string();
    let ca = p.ca.ca_cert().to_str().unwrap().to_string();
    let started = Instant::now();
    let out = run_python(
        "client_checks.py",
        &["--port", &port, "--tls-ca", &ca, "tls_cn", "None"],
        RUN,
    );
    let took = started.elapsed();
    assert!(
        !out.success(),
        "a client without a certificate got in: {out}"
    );
    // With TLS 1.3 the client's handshake seems to succeed; the refusal comes at its first
    // read: either way it fails at connect or at its first call.
    assert!(
        out.stdout.contains("FAIL connect") || out.stdout.contains("FAIL tls_cn"),
        "{out}"
    );
    assert!(
        out.stderr.contains("SSL") || out.stderr.contains("EOF") || out.stderr.contains("reset"),
        "the client's error does not say TLS refused it: {out}"
    );
    // Refused at once, not at the handshake timeout nor at Python's call timeout (10 s):
    // Python starts in well under the handshake timeout.
    assert!(took < handshake, "refused after {took:?}: {out}");
    assert!(
        wait_logged(&["authentication failed", "certificate"]),
        "the server did not log why: {:?}",
        common::tls::LOGS.lock().unwrap()
    );
    assert_eq!(server.handle.connections(), 0);
}

/// The `ssh` processes running with `-p <port>` on their command line (plumbum's tunnels to
/// the test sshd on `port`).
fn ssh_clients_of(port: u16) -> Vec<(u32, String)> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim() != "ssh" || !sshd::alive(pid) {
            continue;
        }
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let args: Vec<String> = cmdline
            .split(|&b| b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args
            .windows(2)
            .any(|w| w[0] == "-p" && w[1] == port.to_string())
        {
            found.push((pid, args.join(" ")));
        }
    }
    found
}

/// client_checks.py's arguments to reach the server on `port` through `d` with plumbum's
/// `SshMachine`, then run `checks`.
fn through_sshd(d: &sshd::Sshd, port: u16, checks: &[&str]) -> Vec<String> {
    let mut args = vec![
        "--port".to_string(),
        port.to_string(),
        "--ssh-port".into(),
        d.port.to_string(),
        "--ssh-user".into(),
        d.user.clone(),
        "--ssh-key".into(),
        d.client_key.display().to_string(),
        "--ssh-known-hosts".into(),
        d.known_hosts.display().to_string(),
    ];
    args.extend(checks.iter().map(|c| c.to_string()));
    args
}

#[test]
fn python_ssh_connect_through_sshd_passes_the_checks_and_leaves_no_ssh_process() {
    let d = sshd::shared();
    let server = pyservice::serve();
    let args = through_sshd(d, server.port, &["all"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    // Started apart so that the check below sees what plumbum left running once Python exited,
    // before the process group is killed.
    let mut py = PyProcess::start("client_checks.py", &args);
    assert!(
        common::wait_until(RUN, || py.exited()),
        "client_checks.py through ssh still running after {RUN:?}: {:?}\n{}",
        py.lines(),
        py.stderr()
    );
    let lines = py.lines();
    let left = ssh_clients_of(d.port);
    let status = py.kill();
    assert!(
        status.success(),
        "client_checks.py through ssh failed ({status}): {lines:?}\n{}\n--- sshd log ---\n{}",
        py.stderr(),
        d.log()
    );
    for check in ALL {
        assert!(lines.contains(&format!("OK {check}")), "{lines:?}");
    }
    assert!(left.is_empty(), "ssh processes left behind: {left:?}");
    // Whatever the group held is gone too (the kill above), and nothing escaped it.
    assert!(
        common::wait_until(common::SETTLE, || ssh_clients_of(d.port).is_empty()),
        "ssh processes outlived the Python process group: {:?}",
        ssh_clients_of(d.port)
    );
    common::expect_within("the server has no connection left", common::SETTLE, || {
        server.handle.connections() == 0
    });
}

#[test]
fn a_python_client_killed_mid_tunnel_leaves_no_ssh_process_and_no_server_connection() {
    let d = sshd::shared();
    let server = pyservice::serve();
    let args = through_sshd(d, server.port, &["ping", "timeout"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut py = PyProcess::start("client_checks.py", &args);
    // Killed while the server sleeps in its call (`timeout` calls sleep(2.0) right after
    // `ping`, and waits for it 1 s).
    py.wait_line("OK ping", RUN);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(server.handle.connections(), 1);
    py.kill();
    assert!(
        common::wait_until(common::SETTLE, || ssh_clients_of(d.port).is_empty()),
        "ssh processes left behind: {:?}",
        ssh_clients_of(d.port)
    );
    common::expect_within(
        "the server dropped the tunnelled connections",
        common::SETTLE,
        || server.handle.connections() == 0,
    );
}

// ---- Behaviour ----

/// Python threads sharing one connection, each calling Rust, which calls Python back, which
/// calls Rust again (two and three levels deep); then the server's table is back to the root.
const NESTED: &str = r#"
import gc, sys, threading, time
import rpyc
from rpyc.core import consts, netref

port, nthreads, rounds = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
conn = rpyc.connect("127.0.0.1", port, config={"sync_request_timeout": 10})
root = conn.root
errors = []

def worker(k):
    try:
        for i in range(rounds):
            # Python -> Rust apply -> Python lambda -> Rust add
            got = root.apply(lambda v: root.add(v, k), i)
            assert got == i + k + 1, ("add", k, i, got)
            # Python -> Rust apply -> Python -> Rust apply -> Python
            got = root.apply(lambda v: root.apply(lambda w: w * 2 + k, v), i)
            assert got == i * 2 + k + 2, ("apply", k, i, got)
            # a Rust object made inside a callback, used by the caller
            c = root.apply(lambda v: root.make_counter(v).incr(k), i)
            assert c == i + k + 1, ("counter", k, i, c)
    except BaseException as e:
        errors.append(f"thread {k}: {e!r}")

threads = [threading.Thread(target=worker, args=(k,)) for k in range(nthreads)]
for t in threads:
    t.start()
for t in threads:
    t.join(60)
assert not any(t.is_alive() for t in threads), "a thread hung"
assert not errors, errors
conn._last_traceback = None
gc.collect()
deadline = time.monotonic() + 5
while True:
    count = netref.syncreq(root, consts.HANDLE_CALLATTR, "object_count", (), ())
    if count == 1 or time.monotonic() > deadline:
        break
    time.sleep(0.05)
print("COUNT", count)
conn.close()
print("DONE", nthreads * rounds)
"#;

#[test]
fn callbacks_nest_both_ways_from_several_python_threads_on_one_connection() {
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let server = pyservice::serve_with(pyservice::service_counting(calls.clone()), |b| b);
    let script = InlineScript::new("nested", NESTED);
    let started = Instant::now();
    let out = script.run(&[&server.port.to_string(), "4", "25"], RUN);
    out.assert_success();
    eprintln!("nested callbacks: {:?}", started.elapsed());
    assert!(out.lines().contains(&"COUNT 1"), "{out}");
    assert!(out.lines().contains(&"DONE 100"), "{out}");
    // Every round: add, apply twice (outer and inner), apply once more.
    assert_eq!(
        calls.load(std::sync::atomic::Ordering::Relaxed),
        100 * 5,
        "{out}"
    );
}

#[test]
fn a_call_slower_than_python_s_timeout_raises_timeout_error_and_the_connection_goes_on() {
    let server = pyservice::serve();
    let port = server.port.to_string();
    // `timeout`: sleep(2.0) with a 1 s sync_request_timeout, then add(1, 2) on the same
    // connection after the late reply arrived; `slow`: a second connection is served while
    // the first waits in sleep(1.0).
    checks_pass(
        &[
            "--port",
            &port,
            "timeout",
            "slow",
            "ping",
            "refcounts",
            "close",
        ],
        &["timeout", "slow", "ping", "refcounts", "close"],
    );
}

/// A Rust method three times slower than the client's timeout, on a connection several
/// threads use: the waiting thread gets TimeoutError, the others' calls go on meanwhile, and
/// the connection still works after the late reply.
const SLOW: &str = r#"
import sys, threading, time
import rpyc

port, timeout = int(sys.argv[1]), float(sys.argv[2])
conn = rpyc.connect("127.0.0.1", port, config={"sync_request_timeout": timeout})
root = conn.root
started = time.monotonic()
try:
    root.sleep(3 * timeout)
except TimeoutError:
    print("TIMEOUT", round(time.monotonic() - started, 2))
else:
    raise AssertionError("no TimeoutError")
# The late reply arrives meanwhile; the connection is fine.
time.sleep(2.5 * timeout)
assert root.add(1, 2) == 3
assert root.apply(lambda v: v * 3, 3) == 10
conn.ping()
conn.close()
print("DONE")
"#;

#[test]
fn a_rust_method_three_times_slower_than_the_client_timeout_raises_there_and_the_next_call_works() {
    let server = pyservice::serve();
    let timeout = Duration::from_secs(1);
    let script = InlineScript::new("slow", SLOW);
    let out = script.run(
        &[&server.port.to_string(), &timeout.as_secs_f64().to_string()],
        RUN,
    );
    out.assert_success();
    let waited: f64 = out
        .lines()
        .iter()
        .find_map(|l| l.strip_prefix("TIMEOUT ")?.parse().ok())
        .unwrap_or_else(|| panic!("no TIMEOUT line: {out}"));
    assert!(
        waited >= timeout.as_secs_f64() * 0.9 && waited < timeout.as_secs_f64() * 2.0,
        "TimeoutError after {waited} s, the timeout being {timeout:?}"
    );
    assert!(out.lines().contains(&"DONE"), "{out}");
}
