//! A real, independent TLS peer: the `openssl s_client` command drives the server, showing that
//! it speaks standard TLS (the rpyc bytes of PROTOCOL.md's example go through it unchanged) and
//! that it enforces client certificates.

mod common;

use common::tls::{capture_logs, pki, serve_tls, server_options, wait_logged, whoami};
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Our hello (version 1, no flags, generous limits) and PROTOCOL.md's `add(1, 2)` call.
const HELLO_AND_CALL: &[u8] = &[
    b'R', b'P', b'Y', b'C', 0, 1, 0, 0, 0, 0x10, 0, 0, 0, 0, 0x10, 0, //
    0, 0, 0, 12, 0x85, 0x00, 0x01, 0x00, 0x00, 0x63, b'a', b'd', b'd', 0x82, 0x01, 0x02,
];

/// PROTOCOL.md's reply to that call: `3`.
const REPLY: &[u8] = &[0, 0, 0, 7, 0x85, 0x02, 0x01, 0x00, 0x00, 0x60, 0x03];

/// Runs `openssl s_client` against `port` with `extra` arguments, sends `input`, and returns
/// up to `want` bytes of its output (waiting at most 10 s) and its stderr.
fn s_client(port: u16, extra: &[&std::ffi::OsStr], input: &[u8], want: usize) -> (Vec<u8>, String) {
    let mut cmd = Command::new("openssl");
    cmd.args([
        "s_client",
        "-quiet",
        "-verify_return_error",
        "-servername",
        "localhost",
    ])
    .arg("-connect")
    .arg(format!("127.0.0.1:{port}"))
    .args(extra)
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .expect("the openssl command line is installed (apt-get install openssl)");
    child.stdin.as_mut().unwrap().write_all(input).unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        while got.len() < want {
            match stdout.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        let _ = tx.send(got);
    });
    let got = rx.recv_timeout(Duration::from_secs(10)).unwrap_or_default();
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    (got, String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn openssl_s_client_with_a_client_certificate_gets_rpyc_replies() {
    let p = pki();
    let server = serve_tls(whoami(), p.authenticator(), server_options);
    let (out, err) = s_client(
        server.port,
        &[
            "-CAfile".as_ref(),
            p.ca.ca_cert().as_os_str(),
            "-cert".as_ref(),
            p.alice.cert.as_os_str(),
            "-key".as_ref(),
            p.alice.key.as_os_str(),
        ],
        HELLO_AND_CALL,
        16 + REPLY.len(),
    );
    assert_eq!(out.len(), 16 + REPLY.len(), "s_client said: {err}");
    assert_eq!(&out[..4], b"RPYC", "the server's hello");
    assert_eq!(&out[16..], REPLY, "the reply to add(1, 2)");
}

#[test]
fn openssl_s_client_without_a_client_certificate_is_refused() {
    capture_logs();
    let p = pki();
    let server = serve_tls(whoami(), p.authenticator(), server_options);
    let (out, err) = s_client(
        server.port,
        &["-CAfile".as_ref(), p.ca.ca_cert().as_os_str()],
        HELLO_AND_CALL,
        16 + REPLY.len(),
    );
    assert!(
        !out.windows(4).any(|w| w == b"RPYC"),
        "no rpyc byte may reach an unauthenticated client: {out:?}"
    );
    assert!(err.contains("certificate required"), "s_client said: {err}");
    assert!(wait_logged(&["127.0.0.1:", "sent no certificate"]));
}

#[test]
fn openssl_s_client_verifies_the_server_chain() {
    // The server's certificate verifies with the standard tool against our CA, and fails
    // without it: what we send is an ordinary X.509 chain.
    let p = pki();
    let server = serve_tls(whoami(), p.authenticator(), server_options);
    let (_, err) = s_client(
        server.port,
        &[
            "-CAfile".as_ref(),
            common::tls::testdata("other-ca.pem").as_os_str(),
            "-cert".as_ref(),
            p.alice.cert.as_os_str(),
            "-key".as_ref(),
            p.alice.key.as_os_str(),
        ],
        HELLO_AND_CALL,
        16,
    );
    assert!(
        err.contains("unable to get local issuer certificate")
            || err.contains("certificate verify failed"),
        "s_client said: {err}"
    );
}
