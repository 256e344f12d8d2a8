//! Peers that do not speak RPyC 6 are told apart from broken ones, quickly and clearly: the
//! Rust client meeting a Python server started with RPYC_BIND_THREADS=true, a real RPyC 5.3.1
//! server, or a native rpyc server gets a VersionMismatch that says which, within the call
//! timeout; and a real Python RPyC client meeting a native rpyc server fails instead of
//! hanging.

mod common;

use common::python::{python5, run_python, run_python_with, PyProcess};
use common::tls::{capture_logs, wait_logged};
use common::{handshake_error, CALL_TIMEOUT};
use rpyc::python;
use rpyc::{Error, HandshakeErrorKind, Options, Service, ThreadedServer};
use std::time::{Duration, Instant};

fn client() -> python::Client {
    python::Client::new(Options::new().call_timeout(CALL_TIMEOUT))
}

/// Connects to `port`, asks for the root and expects a VersionMismatch whose message contains
/// every one of `says`, well within the call timeout; the connection is closed after it.
fn expect_mismatch(port: u16, says: &[&str]) {
    let started = Instant::now();
    let py = client().connect("127.0.0.1", port).expect("connect");
    let e = py
        .root()
        .expect_err("the root of a peer of another protocol");
    let took = started.elapsed();
    let h = handshake_error(&e);
    assert_eq!(h.kind(), HandshakeErrorKind::VersionMismatch, "{e}");
    let text = e.to_string();
    for part in says {
        assert!(text.contains(part), "{text:?} does not mention {part:?}");
    }
    assert!(
        took < CALL_TIMEOUT / 2,
        "the mismatch took {took:?} to show (call timeout {CALL_TIMEOUT:?})"
    );
    assert!(py.is_closed());
    assert!(
        matches!(py.close_reason(), Some(Error::Handshake(_))),
        "{:?}",
        py.close_reason()
    );
    // Later calls fail at once with the same reason.
    let e = py.ping().unwrap_err();
    assert!(matches!(e, Error::Handshake(_)), "{e:?}");
}

#[test]
fn a_python_server_with_bind_threads_is_a_version_mismatch() {
    let server = PyProcess::server_env("demo_server.py", &[], &[("RPYC_BIND_THREADS", "true")]);
    expect_mismatch(server.port, &["RPYC_BIND_THREADS"]);
}

#[test]
fn an_rpyc_5_3_1_server_is_a_version_mismatch() {
    let py5 = python5();
    let server = PyProcess::server_with(&py5, "demo_server.py", &[], &[]);
    expect_mismatch(server.port, &["4.1-5.x", "rpyc>=6"]);
}

#[test]
fn demo_server_runs_on_rpyc_5_3_1() {
    // What the test above relies on: the same script serves under 5.3.1 (a real 5.3.1 client
    // is served), so the mismatch is the protocol's, not a broken server's.
    let py5 = python5();
    let server = PyProcess::server_with(&py5, "demo_server.py", &[], &[]);
    let port = server.port.to_string();
    let out = run_python_with(
        &py5,
        "client_checks.py",
        &["--port", &port, "exposed_prefix", "attribute", "close"],
        CALL_TIMEOUT * 2,
    );
    out.assert_success();
    assert_eq!(
        out.lines(),
        ["OK exposed_prefix", "OK attribute", "OK close"],
        "{out}"
    );
}

#[test]
fn a_native_rpyc_server_is_a_version_mismatch() {
    let server = common::serve(Service::new("native").method("add", |a: i64, b: i64| a + b));
    expect_mismatch(server.port, &["native protocol", "rpyc::connect"]);
    // python::connect (default options) says the same.
    let py = python::connect("127.0.0.1", server.port).unwrap();
    let e = py.root().unwrap_err();
    assert_eq!(
        handshake_error(&e).kind(),
        HandshakeErrorKind::VersionMismatch
    );
    // The native server is unharmed.
    common::works(&common::connect(&server));
}

#[test]
fn a_python_client_meeting_a_native_server_fails_instead_of_hanging() {
    capture_logs();
    let handshake = Duration::from_secs(2);
    let server = ThreadedServer::new(Service::new("native").method("add", |a: i64, b: i64| a + b))
        .hostname("127.0.0.1")
        .port(0)
        .handshake_timeout(handshake)
        .call_timeout(CALL_TIMEOUT)
        .build()
        .expect("bind")
        .spawn()
        .expect("spawn");
    let port = server.port().to_string();
    // client_checks.py waits 10 s for any reply (its sync_request_timeout): it must fail
    // well before that, because the native server drops it.
    let started = Instant::now();
    let out = run_python(
        "client_checks.py",
        &["--port", &port, "echo"],
        CALL_TIMEOUT * 2,
    );
    let took = started.elapsed();
    assert!(
        !out.success(),
        "client_checks.py passed against a native server: {out}"
    );
    assert!(out.stdout.contains("FAIL echo"), "{out}");
    assert!(
        !out.stderr.contains("TimeoutError") && !out.stderr.contains("result expired"),
        "the Python client waited for its own timeout: {out}"
    );
    assert!(
        took < handshake + Duration::from_secs(5),
        "the Python client failed only after {took:?} (native handshake timeout {handshake:?})"
    );
    // The native server recognizes a Python RPyC frame in place of its hello, drops the client
    // at once (whose read then ends: EOFError) and says why.
    assert!(out.stderr.contains("EOFError"), "{out}");
    assert!(
        wait_logged(&["connection failed", "Python RPyC client"]),
        "the native server did not log that a Python client came"
    );
    // And it still serves its own clients.
    let conn = Options::new()
        .call_timeout(CALL_TIMEOUT)
        .connect("127.0.0.1", server.port())
        .unwrap();
    assert_eq!(conn.root().call::<i64, _>("add", (1, 2)).unwrap(), 3);
    server.close();
}
