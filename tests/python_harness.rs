//! The Python side of the interoperability tests checks out, without any Rust RPyC code: the
//! pinned environment is there, the scripts of testdata/python run, and the helpers of
//! tests/common/python.rs start, watch, time out and kill Python processes as they promise.
//! (Python checked against Python: client_checks.py passes against reference_server.py.)

mod common;

use common::python::{run_python, PyProcess};
use std::net::TcpStream;
use std::time::Duration;

const LINE: Duration = Duration::from_secs(10);

#[test]
fn the_environment_has_rpyc_6_0_2() {
    let out = run_python("golden_brine.py", &["--decode", "0801"], LINE);
    out.assert_success();
    assert_eq!(out.stdout.trim(), "''", "{out}");
    // The check python() makes; here so that a wrong environment fails this test by name.
    let mut cmd = std::process::Command::new(common::python::python());
    let version = cmd
        .args([
            "-c",
            "import rpyc, plumbum; print(rpyc.__version__, plumbum.__version__)",
        ])
        .output()
        .expect("run python");
    assert_eq!(
        String::from_utf8_lossy(&version.stdout).trim(),
        "6.0.2 2.0.2"
    );
}

#[test]
fn golden_brine_prints_every_value_once() {
    let out = run_python("golden_brine.py", &[], LINE);
    out.assert_success();
    let lines = out.lines();
    assert_eq!(lines.len(), 45, "{out}");
    let mut names = std::collections::HashSet::new();
    for line in &lines {
        let (name, hex) = line
            .split_once('\t')
            .unwrap_or_else(|| panic!("no tab in {line:?}"));
        assert!(names.insert(name), "duplicate name {name}");
        assert!(
            !hex.is_empty() && hex.len() % 2 == 0 && hex.bytes().all(|b| b.is_ascii_hexdigit()),
            "{name}: not hex: {hex}"
        );
    }
    assert!(lines.contains(&"int_1000\t160431303030"), "{out}");
    assert!(lines.contains(&"str_e_acute\t080bc3a9"), "{out}");
    assert!(lines.contains(&"slice_none_5_none\t1912005500"), "{out}");
}

#[test]
fn golden_brine_decodes_and_refuses() {
    let out = run_python(
        "golden_brine.py",
        &["--decode", "1351080a780a791118400400000000000000"],
        LINE,
    );
    out.assert_success();
    assert_eq!(out.stdout.trim(), "(1, 'x', b'y', (2.5, None))");
    let bad = run_python("golden_brine.py", &["--decode", "ff"], LINE);
    assert!(!bad.success(), "an unknown tag decoded: {bad}");
    let extra = run_python("golden_brine.py", &["--decode", "5051"], LINE);
    assert!(!extra.success(), "trailing bytes went unnoticed: {extra}");
    assert!(extra.stderr.contains("undecoded"), "{extra}");
}

#[test]
fn a_server_says_its_port_and_its_connections() {
    let server = PyProcess::server("demo_server.py", &[]);
    assert_ne!(server.port, 0);
    let stream = TcpStream::connect(("127.0.0.1", server.port)).expect("connect");
    server.wait_line("CONNECTED", LINE);
    drop(stream);
    server.wait_line("DISCONNECTED", LINE);
    assert_eq!(server.lines(), ["CONNECTED", "DISCONNECTED"]);
    let again = TcpStream::connect(("127.0.0.1", server.port)).expect("connect again");
    // wait_line goes on after the last line it returned.
    server.wait_line("CONNECTED", LINE);
    drop(again);
    server.wait_line("DISCONNECTED", LINE);
}

#[test]
fn a_python_server_dies_with_its_handle() {
    let server = PyProcess::server("demo_server.py", &["--classic"]);
    let pid = server.pid();
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    drop(server);
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "pid {pid} still exists after drop"
    );
}

#[test]
fn a_python_server_exits_when_its_stdin_closes() {
    // What happens when the test process dies: the pipe to the server's stdin closes.
    let mut server = PyProcess::server("demo_server.py", &[]);
    server.close_stdin();
    assert!(
        common::wait_until(LINE, || server.exited()),
        "the server is still running with its stdin closed"
    );
}

#[test]
fn a_server_that_fails_to_start_fails_the_test_with_its_stderr() {
    let panic = std::panic::catch_unwind(|| {
        PyProcess::server("demo_server.py", &["--tls-key", "/nonexistent"]);
    })
    .expect_err("a server with bad arguments started");
    let msg = panic.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(msg.contains("ended before saying `PORT <n>`"), "{msg}");
    assert!(
        msg.contains("--tls-key and --tls-cert go together"),
        "{msg}"
    );
}

#[test]
fn a_script_that_hangs_is_killed_and_fails_the_test() {
    // demo_server.py outside PyProcess does not watch its stdin: it serves until killed.
    let panic = std::panic::catch_unwind(|| {
        run_python("demo_server.py", &[], Duration::from_secs(2));
    })
    .expect_err("a server ran to completion");
    let msg = panic.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(msg.contains("Python hung: killed after 2s"), "{msg}");
    assert!(msg.contains("PORT "), "the output so far is shown: {msg}");
}

#[test]
fn client_checks_pass_against_the_python_reference_server() {
    let server = PyProcess::server("reference_server.py", &[]);
    let port = server.port.to_string();
    let out = run_python(
        "client_checks.py",
        &["--port", &port, "tls_cn", "None", "many", "50", "all"],
        Duration::from_secs(60),
    );
    out.assert_success();
    let oks: Vec<&str> = out
        .lines()
        .into_iter()
        .filter(|l| l.starts_with("OK "))
        .collect();
    assert_eq!(
        oks,
        [
            "OK tls_cn",
            "OK many",
            "OK echo",
            "OK exposed_prefix",
            "OK attribute",
            "OK exception",
            "OK callback",
            "OK objects",
            "OK collections",
            "OK ping",
            "OK refcounts",
            "OK close",
        ],
        "{out}"
    );
}

#[test]
fn client_checks_report_the_first_failure() {
    // demo_server.py has no make_counter(...).value() method (value is a property there).
    let server = PyProcess::server("demo_server.py", &[]);
    let port = server.port.to_string();
    let out = run_python(
        "client_checks.py",
        &["--port", &port, "echo", "objects", "ping"],
        Duration::from_secs(60),
    );
    assert!(!out.success(), "{out}");
    assert_eq!(out.lines(), ["OK echo", "FAIL objects"], "{out}");
    assert!(out.stderr.contains("Traceback"), "{out}");
}
