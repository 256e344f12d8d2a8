//! The Rust client over TLS against a real Python RPyC 6.0.2 server (demo_server.py with an
//! `SSLAuthenticator`, keys made at test time): served with and without client certificates,
//! refused (never left hanging) without the certificate the server requires, and refusing a
//! server its CA did not sign.

mod common;

use common::python::PyProcess;
use common::tls::{pki, Pki};
use common::CALL_TIMEOUT;
use rpyc::python::{self, Value};
use rpyc::tls::SslClient;
use rpyc::{Error, Options, TlsErrorKind};
use std::time::{Duration, Instant};

const LINE: Duration = Duration::from_secs(10);

fn tls_server(p: &Pki, require_client_cert: bool) -> PyProcess {
    let key = p.server.key.to_str().unwrap().to_string();
    let cert = p.server.cert.to_str().unwrap().to_string();
    let ca = p.ca.ca_cert().to_str().unwrap().to_string();
    let mut args = vec!["--tls-key", &key, "--tls-cert", &cert];
    if require_client_cert {
        args.extend(["--tls-ca", &ca]);
    }
    PyProcess::server("demo_server.py", &args)
}

fn tls_client(tls: SslClient) -> python::Client {
    python::Client::new(Options::new().call_timeout(CALL_TIMEOUT).tls(tls))
}

#[test]
fn a_server_requiring_client_certificates_serves_a_client_with_one() {
    let p = pki();
    let server = tls_server(&p, true);
    let py = tls_client(p.tls())
        .connect("127.0.0.1", server.port)
        .expect("TLS with alice's certificate");
    server.wait_line("CONNECTED", LINE);
    let root = py.root().unwrap();
    assert_eq!(root.call_method::<i64, _>("add", (20, 22)).unwrap(), 42);
    // Compressed frames inside TLS, both ways.
    let blob: Value = root.call_method("blob", (200_000,)).unwrap();
    assert_eq!(blob, Value::Bytes(vec![b'x'; 200_000]));
    let cb = python::callback(|x: i64| x * 3);
    assert_eq!(root.call_method::<i64, _>("apply", (cb, 5)).unwrap(), 16);
    py.close();
    server.wait_line("DISCONNECTED", LINE);
}

#[test]
fn a_server_without_client_verification_serves_a_client_trusting_its_ca() {
    let p = pki();
    let server = tls_server(&p, false);
    let py = tls_client(SslClient::new().ca_certs(p.ca.ca_cert()))
        .connect("localhost", server.port)
        .expect("TLS to localhost");
    assert_eq!(
        py.root()
            .unwrap()
            .call_method::<String, _>("add", ("a", "b"))
            .unwrap(),
        "ab"
    );
    py.ping().unwrap();
}

/// Connects without a client certificate and asks for the root: the error, and how long it
/// took to come.
fn refused_without_certificate(p: &Pki, port: u16) -> (Error, Duration) {
    let started = Instant::now();
    // With TLS 1.3 the handshake completes on the client's side and the server's refusal (an
    // alert) arrives after it: connecting or the first call may fail, but one must, quickly.
    let outcome = tls_client(SslClient::new().ca_certs(p.ca.ca_cert()))
        .connect("127.0.0.1", port)
        .and_then(|py| py.root().map(|_| ()));
    let e = outcome.expect_err("served without a client certificate");
    (e, started.elapsed())
}

#[test]
fn a_client_without_the_required_certificate_is_refused_not_left_hanging() {
    let p = pki();
    let server = tls_server(&p, true);
    let mut told = 0;
    for _ in 0..3 {
        let (e, took) = refused_without_certificate(&p, server.port);
        assert!(
            took < CALL_TIMEOUT / 2,
            "the refusal took {took:?} (call timeout {CALL_TIMEOUT:?})"
        );
        match &e {
            Error::Tls(t) => {
                assert_eq!(t.kind(), TlsErrorKind::CertificateRequired, "{e}");
                assert!(e.to_string().contains("client certificate"), "{e}");
                told += 1;
            }
            // The reading and the writing thread both meet the refusal; the TLS layer records
            // the alert a moment after the thread that met it sees it, so now and then the other
            // thread ends the connection first, seeing only the end of the stream.
            Error::Closed { .. } => {}
            other => panic!("expected a TLS error or a closed connection, got {other:?}"),
        }
    }
    assert!(
        told > 0,
        "no refusal said that a client certificate is required"
    );
    // The server goes on serving clients that have one.
    let py = tls_client(p.tls())
        .connect("127.0.0.1", server.port)
        .unwrap();
    assert_eq!(
        py.root()
            .unwrap()
            .call_method::<i64, _>("add", (1, 2))
            .unwrap(),
        3
    );
}

#[test]
fn a_server_signed_by_another_ca_is_refused_by_the_client() {
    let p = pki();
    let other = pki();
    let server = tls_server(&p, false);
    let e = tls_client(SslClient::new().ca_certs(other.ca.ca_cert()))
        .connect("127.0.0.1", server.port)
        .expect_err("a server our CA did not sign");
    assert_eq!(
        common::tls_kind(&e),
        TlsErrorKind::CertificateRejected,
        "{e}"
    );
}
