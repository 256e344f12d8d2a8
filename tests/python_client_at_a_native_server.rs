//! A Python RPyC 6 client that reaches a native rpyc server (plain or TLS) is told at once, not
//! at a timeout: the server recognizes the client's first frame, closes the connection, and
//! logs that this looks like a Python RPyC client to serve with `rpyc::python::serve`.

mod common;

use common::pyservice::InlineScript;
use common::tls::{capture_logs, pki, serve_tls, wait_logged};
use rpyc::{Service, SslAuthenticator};
use std::time::Duration;

/// `conn.root.add(1, 2)` from a Python client; prints the exception it got and how long after
/// the call it came (`ERROR <class> <seconds>`), or `OK`.
const CLIENT: &str = r#"
import sys, time
import rpyc

port, tls = int(sys.argv[1]), sys.argv[2] == "tls"
config = {"sync_request_timeout": 30}
if tls:
    conn = rpyc.ssl_connect("127.0.0.1", port, config=config)
else:
    conn = rpyc.connect("127.0.0.1", port, config=config)
started = time.monotonic()
try:
    conn.root.add(1, 2)
except Exception as e:
    print("ERROR", type(e).__name__, round(time.monotonic() - started, 2), e)
else:
    print("OK")
"#;

fn service() -> Service {
    Service::new("svc").method("add", |a: i64, b: i64| a + b)
}

/// The error line the client printed, and how long its call took to fail.
fn refused(port: u16, mode: &str) -> (String, f64) {
    let script = InlineScript::new("python_at_native", CLIENT);
    let out = script.run(&[&port.to_string(), mode], Duration::from_secs(60));
    out.assert_success();
    let line = out
        .lines()
        .into_iter()
        .find(|l| l.starts_with("ERROR "))
        .unwrap_or_else(|| panic!("the Python client was not refused: {out}"))
        .to_string();
    let took = line
        .split_whitespace()
        .nth(2)
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("no time in {line:?}"));
    (line, took)
}

const HANDSHAKE: Duration = Duration::from_secs(6);

fn assert_told_at_once(line: &str, took: f64) {
    // Not a TimeoutError after the handshake timeout (or Python's 30 s): the hang-up at once.
    assert!(!line.contains("TimeoutError"), "{line}");
    assert!(
        took < HANDSHAKE.as_secs_f64() / 3.0,
        "the Python client waited {took} s (handshake timeout {HANDSHAKE:?}): {line}"
    );
    assert!(
        wait_logged(&[
            "connection failed",
            "looks like a Python RPyC client",
            "rpyc::python::serve"
        ]),
        "the server did not say why: {:?}",
        common::tls::LOGS.lock().unwrap()
    );
}

#[test]
fn a_python_client_at_a_native_server_is_refused_at_once_with_the_reason_logged() {
    capture_logs();
    let server = common::serve_with(service(), |b| b.handshake_timeout(HANDSHAKE));
    let (line, took) = refused(server.port, "tcp");
    assert_told_at_once(&line, took);
    common::expect_within("no connection left", common::SETTLE, || {
        server.handle.connections() == 0
    });
    common::works(&common::connect(&server));
}

#[test]
fn a_python_ssl_client_at_a_native_tls_server_is_refused_at_once_with_the_reason_logged() {
    capture_logs();
    let p = pki();
    let server = serve_tls(
        service(),
        SslAuthenticator::new(&p.server.key, &p.server.cert),
        |b| b.handshake_timeout(HANDSHAKE),
    );
    let (line, took) = refused(server.port, "tls");
    assert_told_at_once(&line, took);
}
