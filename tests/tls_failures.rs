//! TLS failures: each gives the client an error of the right kind (and one per kind is checked
//! for the hint a person reads), is logged by the server with the client's address, and
//! leaves the server serving the next client.
//! Also the server's handshake timeout against silent and half-finished clients.

mod common;

use common::tls::{
    capture_logs, pki, serve_tls, server_options, still_serves, wait_logged, whoami, Pki,
};
use common::TestServer;
use rpyc::testing::TestPki;
use rpyc::tls::SslClient;
use rpyc::{Error, HandshakeErrorKind, SslAuthenticator, TlsError, TlsErrorKind};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

fn server(p: &Pki) -> TestServer {
    capture_logs();
    serve_tls(whoami(), p.authenticator(), server_options)
}

/// The client's error, which must be a TLS error.
fn tls_error(r: Result<rpyc::Connection, Error>) -> TlsError {
    match r {
        Err(Error::Tls(e)) => {
            eprintln!("client error: {e}");
            e
        }
        Err(other) => panic!("expected Error::Tls, got {other:?}"),
        Ok(_) => panic!("expected the connection to fail"),
    }
}

#[test]
fn no_client_certificate_when_one_is_required_says_to_pass_one() {
    let p = pki();
    let s = server(&p);
    let e = tls_error(
        rpyc::Options::new()
            .tls(SslClient::new().ca_certs(p.ca.ca_cert()))
            .connect("localhost", s.port),
    );
    assert_eq!(e.kind(), TlsErrorKind::CertificateRequired, "{e}");
    assert!(
        e.message().contains("requires a client certificate")
            && e.message().contains("pass keyfile and certfile"),
        "{e}"
    );
    assert!(wait_logged(&[
        "127.0.0.1:",
        "authentication failed",
        "certificate"
    ]));
    still_serves(&s, &p);
}

/// A client trusting the CA and presenting `cert` to a server requiring client certificates:
/// checks the server logged `logged` (after the client's address) and still serves a good
/// client; returns the client's error.
fn client_presenting(p: &Pki, cert: &rpyc::testing::Issued, logged: &[&str]) -> TlsError {
    let s = server(p);
    let e = tls_error(
        rpyc::Options::new()
            .tls(
                SslClient::new()
                    .ca_certs(p.ca.ca_cert())
                    .keyfile(&cert.key)
                    .certfile(&cert.cert),
            )
            .connect("localhost", s.port),
    );
    let mut parts = vec!["127.0.0.1:"];
    parts.extend_from_slice(logged);
    assert!(wait_logged(&parts), "not logged: {parts:?}");
    still_serves(&s, p);
    e
}

#[test]
fn client_certificate_from_another_ca_is_refused_by_the_server_which_says_why() {
    let p = pki();
    let other = TestPki::temp().unwrap();
    let mallory = other.issue("mallory", &[]).unwrap();
    let e = client_presenting(
        &p,
        &mallory,
        &[
            "rejected the client's certificate",
            "not signed by this server's CA",
        ],
    );
    assert_eq!(e.kind(), TlsErrorKind::RejectedByPeer, "{e}");
    assert!(e.message().contains("does not trust the CA"), "{e}");
}

#[test]
fn expired_client_certificate_is_refused_by_the_server() {
    let p = pki();
    let old = p.ca.issue_valid("old-client", &[], -30, -1).unwrap();
    let e = client_presenting(&p, &old, &["client's certificate has expired"]);
    assert_eq!(e.kind(), TlsErrorKind::RejectedByPeer, "{e}");
}

#[test]
fn not_yet_valid_client_certificate_is_refused_by_the_server() {
    let p = pki();
    let early = p.ca.issue_valid("early-client", &[], 2, 30).unwrap();
    let e = client_presenting(&p, &early, &["client's certificate is not valid yet"]);
    assert_eq!(e.kind(), TlsErrorKind::RejectedByPeer, "{e}");
}

/// A server presenting `cert`, and the error a client trusting the CA gets from it.
fn server_presenting(p: &Pki, cert: &rpyc::testing::Issued) -> TlsError {
    capture_logs();
    let auth = SslAuthenticator::new(&cert.key, &cert.cert);
    let s = serve_tls(whoami(), auth, server_options);
    let e = tls_error(
        rpyc::Options::new()
            .tls(SslClient::new().ca_certs(p.ca.ca_cert()))
            .connect("localhost", s.port),
    );
    // The server logs that the client refused it, and still serves a client that accepts it.
    assert!(wait_logged(&[
        "127.0.0.1:",
        "the client refused the handshake"
    ]));
    let ok = rpyc::Options::new()
        .tls(SslClient::new().dangerous_accept_any_server_certificate())
        .connect("localhost", s.port)
        .expect("the server still serves");
    assert!(ok.ping().is_ok());
    e
}

#[test]
fn expired_server_certificate_is_rejected_by_the_client() {
    let p = pki();
    let old =
        p.ca.issue_valid("localhost", &["localhost"], -30, -1)
            .unwrap();
    let e = server_presenting(&p, &old);
    assert_eq!(e.kind(), TlsErrorKind::CertificateRejected, "{e}");
}

#[test]
fn not_yet_valid_server_certificate_is_rejected_by_the_client() {
    let p = pki();
    let early =
        p.ca.issue_valid("localhost", &["localhost"], 2, 30)
            .unwrap();
    let e = server_presenting(&p, &early);
    assert_eq!(e.kind(), TlsErrorKind::CertificateRejected, "{e}");
}

#[test]
fn server_certificate_for_another_name_is_rejected_by_the_client() {
    let p = pki();
    let elsewhere = p.ca.issue("elsewhere", &["elsewhere.example"]).unwrap();
    let e = server_presenting(&p, &elsewhere);
    assert_eq!(e.kind(), TlsErrorKind::CertificateRejected, "{e}");
}

#[test]
fn server_certificate_from_an_untrusted_ca_is_rejected_by_the_client() {
    let p = pki();
    let other = TestPki::temp().unwrap();
    let theirs = other.issue("localhost", &["localhost"]).unwrap();
    let e = server_presenting(&p, &theirs);
    assert_eq!(e.kind(), TlsErrorKind::CertificateRejected, "{e}");
}

#[test]
fn no_cipher_in_common_says_to_check_the_cipher_settings() {
    let p = pki();
    capture_logs();
    let auth = p
        .authenticator()
        .min_version(rpyc::tls::TlsVersion::Tls13)
        .ciphersuites("TLS_CHACHA20_POLY1305_SHA256");
    let s = serve_tls(whoami(), auth, server_options);
    let e = tls_error(
        rpyc::Options::new()
            .tls(p.tls().ciphersuites("TLS_AES_256_GCM_SHA384"))
            .connect("localhost", s.port),
    );
    assert_eq!(e.kind(), TlsErrorKind::NoCommonParameters, "{e}");
    assert!(
        e.message()
            .contains("no cipher or signature algorithm in common"),
        "{e}"
    );
    assert!(wait_logged(&["127.0.0.1:", "check the ciphers settings"]));
    still_serves(&s, &p);
}

#[test]
fn client_limited_to_tls_1_1() {
    let p = pki();
    let s = server(&p);
    let mut b = openssl::ssl::SslConnector::builder(openssl::ssl::SslMethod::tls()).unwrap();
    // OpenSSL 3 refuses TLS 1.1 at its default security level; lower it so the old
    // protocol is really offered to the server.
    b.set_security_level(0);
    b.set_cipher_list("DEFAULT:@SECLEVEL=0").unwrap();
    b.set_min_proto_version(Some(openssl::ssl::SslVersion::TLS1))
        .unwrap();
    b.set_max_proto_version(Some(openssl::ssl::SslVersion::TLS1_1))
        .unwrap();
    b.set_verify(openssl::ssl::SslVerifyMode::NONE);
    let tcp = TcpStream::connect(("127.0.0.1", s.port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let err = b
        .build()
        .configure()
        .unwrap()
        .verify_hostname(false)
        .connect("localhost", tcp)
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(err.contains("protocol version"), "{err}");
    assert!(wait_logged(&[
        "127.0.0.1:",
        "no TLS version in common",
        "TLS 1.2 or later"
    ]));
    still_serves(&s, &p);
}

#[test]
fn plain_rpyc_client_against_a_tls_port_is_told_to_use_tls() {
    let p = pki();
    let s = server(&p);
    let err = rpyc::connect("127.0.0.1", s.port).unwrap_err();
    assert_eq!(
        common::handshake_kind(&err),
        HandshakeErrorKind::TlsRequired,
        "{err}"
    );
    assert!(
        err.to_string().contains("only accepts TLS") && err.to_string().contains("ssl_connect"),
        "{err}"
    );
    assert!(wait_logged(&["127.0.0.1:", "plain rpyc hello"]));
    still_serves(&s, &p);
}

#[test]
fn tls_client_against_a_plain_port_is_told_to_connect_without_tls() {
    let p = pki();
    let plain = common::serve(whoami());
    let e = tls_error(p.client().connect("localhost", plain.port));
    assert_eq!(e.kind(), TlsErrorKind::NotTls, "{e}");
    assert!(
        e.message().contains("speaks plain rpyc, not TLS") && e.message().contains("rpyc::connect"),
        "{e}"
    );
    // The plain server still serves plain clients.
    let conn = common::connect(&plain);
    assert_eq!(conn.root().call::<i64, _>("add", (1, 2)).unwrap(), 3);
}

#[test]
fn a_client_that_resets_before_sending_anything_is_reported_as_closed() {
    // A reset while the server looks for a plain rpyc hello is the same as during the
    // handshake: the client went away.
    use rpyc::auth::Authenticator;
    let p = pki();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (mut s, _) = l.accept().unwrap();
    // Bytes the client never reads make its close a reset.
    s.write_all(b"x").unwrap();
    client.peek(&mut [0u8; 1]).unwrap();
    drop(client);
    let e = match p.authenticator().authenticate(s, Duration::from_secs(5)) {
        Err(Error::Tls(e)) => e,
        Err(other) => panic!("expected Error::Tls, got {other:?}"),
        Ok(_) => panic!("expected the handshake to fail"),
    };
    assert_eq!(e.kind(), TlsErrorKind::Closed, "{e}");
    assert!(e.message().contains("closed the connection"), "{e}");
}

#[test]
fn a_server_that_hangs_up_half_way_through_the_handshake_is_reported_as_closed() {
    // A "server" that reads the client's hello and hangs up.
    let p = pki();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let t = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut buf = [0u8; 64];
        let _ = s.read(&mut buf);
    });
    let e = tls_error(p.client().connect("localhost", port));
    t.join().unwrap();
    assert_eq!(e.kind(), TlsErrorKind::Closed, "{e}");
    assert!(
        e.message()
            .contains("closed the connection during the TLS handshake"),
        "{e}"
    );
}

/// The first bytes of a real ClientHello, to stop sending half way.
fn client_hello_prefix() -> Vec<u8> {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let t = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = vec![0u8; 4096];
        let n = s.read(&mut buf).unwrap();
        buf.truncate(n);
        buf
    });
    let c = rpyc::Options::new()
        .tls(SslClient::new())
        .connect("localhost", port);
    let hello = t.join().unwrap();
    assert!(c.is_err());
    assert_eq!(hello[0], 0x16, "a TLS handshake record");
    hello[..hello.len() / 2].to_vec()
}

#[test]
fn silent_and_half_finished_clients_are_dropped_after_the_handshake_timeout_without_delaying_others(
) {
    let p = pki();
    capture_logs();
    let timeout = Duration::from_secs(2);
    let s = serve_tls(whoami(), p.authenticator(), |b| {
        server_options(b).handshake_timeout(timeout)
    });
    let half = client_hello_prefix();
    let mut silent = TcpStream::connect(("127.0.0.1", s.port)).unwrap();
    let mut stalled = TcpStream::connect(("127.0.0.1", s.port)).unwrap();
    stalled.write_all(&half).unwrap();
    let started = Instant::now();
    // A good client is served at once while the two others hold their handshakes open.
    still_serves(&s, &p);
    assert!(
        started.elapsed() < timeout / 2,
        "a good client waited {:?} (the handshake timeout is {timeout:?})",
        started.elapsed()
    );
    for sock in [&mut silent, &mut stalled] {
        common::wait_for_hang_up(sock);
    }
    let waited = started.elapsed();
    assert!(
        waited >= timeout.mul_f64(0.9) && waited < timeout * 3 / 2,
        "dropped after {waited:?}, the handshake timeout being {timeout:?}"
    );
    // Each was logged, under its own address (other tests time out handshakes too).
    for sock in [&silent, &stalled] {
        let parts = [
            &format!("{}: ", sock.local_addr().unwrap()),
            "handshake timed out after 2s",
        ];
        assert!(wait_logged(&parts), "not logged: {parts:?}");
    }
    still_serves(&s, &p);
}

#[test]
fn a_server_that_resets_right_after_its_alert_is_still_explained() {
    // A raw OpenSSL server that requires a client certificate and, unlike ours, closes at once
    // when the handshake fails: whatever the client sent after its handshake is unread, so the
    // kernel resets the connection. The client must still say why it was refused.
    let p = pki();
    let mut b =
        openssl::ssl::SslAcceptor::mozilla_intermediate_v5(openssl::ssl::SslMethod::tls_server())
            .unwrap();
    b.set_private_key_file(&p.server.key, openssl::ssl::SslFiletype::PEM)
        .unwrap();
    b.set_certificate_chain_file(&p.server.cert).unwrap();
    b.set_ca_file(p.ca.ca_cert()).unwrap();
    b.set_verify(
        openssl::ssl::SslVerifyMode::PEER | openssl::ssl::SslVerifyMode::FAIL_IF_NO_PEER_CERT,
    );
    let acceptor = b.build();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let t = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        // Give the client time to send its hello after the handshake, then fail and close.
        std::thread::sleep(Duration::from_millis(100));
        assert!(acceptor.accept(s).is_err());
    });
    let e = tls_error(
        rpyc::Options::new()
            .tls(SslClient::new().ca_certs(p.ca.ca_cert()))
            .connect("localhost", port),
    );
    t.join().unwrap();
    assert_eq!(e.kind(), TlsErrorKind::CertificateRequired, "{e}");
}

/// A raw OpenSSL server limited to TLS 1.2 (with `ciphers`, when given) that requires a client
/// certificate, for one client; returns its port and what its handshake failure said.
fn tls_1_2_server_requiring_certificates(
    p: &Pki,
    ciphers: Option<&str>,
) -> (u16, std::thread::JoinHandle<String>) {
    let mut b =
        openssl::ssl::SslAcceptor::mozilla_intermediate_v5(openssl::ssl::SslMethod::tls_server())
            .unwrap();
    b.set_max_proto_version(Some(openssl::ssl::SslVersion::TLS1_2))
        .unwrap();
    if let Some(c) = ciphers {
        b.set_cipher_list(c).unwrap();
    }
    b.set_private_key_file(&p.server.key, openssl::ssl::SslFiletype::PEM)
        .unwrap();
    b.set_certificate_chain_file(&p.server.cert).unwrap();
    b.set_ca_file(p.ca.ca_cert()).unwrap();
    b.set_verify(
        openssl::ssl::SslVerifyMode::PEER | openssl::ssl::SslVerifyMode::FAIL_IF_NO_PEER_CERT,
    );
    let acceptor = b.build();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let t = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let e = acceptor.accept(s).map(|_| ()).unwrap_err();
        let why = format!("{e:?}");
        // Read until the client hangs up, so it reads the alert rather than a reset.
        if let openssl::ssl::HandshakeError::Failure(mid) = e {
            let _ = std::io::copy(&mut mid.get_ref(), &mut std::io::sink());
        }
        why
    });
    (port, t)
}

#[test]
fn no_client_certificate_under_tls_1_2_says_to_pass_one() {
    // Under TLS 1.2 there is no "certificate required" alert: an OpenSSL server requiring a
    // client certificate answers its absence with "handshake failure", the alert it also sends
    // when no cipher is in common. The client saw the server ask for a certificate, so it must
    // say so rather than blame the ciphers.
    let p = pki();
    let (port, t) = tls_1_2_server_requiring_certificates(&p, None);
    let e = tls_error(
        rpyc::Options::new()
            .tls(SslClient::new().ca_certs(p.ca.ca_cert()))
            .connect("localhost", port),
    );
    let server_saw = t.join().unwrap();
    assert!(
        server_saw.contains("peer did not return a certificate"),
        "{server_saw}"
    );
    assert!(e.message().contains("handshake failure"), "{e}");
    assert_eq!(e.kind(), TlsErrorKind::CertificateRequired, "{e}");
    assert!(
        e.message().contains("requires a client certificate")
            && e.message().contains("pass keyfile and certfile"),
        "{e}"
    );
}

#[test]
fn no_cipher_in_common_under_tls_1_2_is_still_blamed_on_the_ciphers() {
    // The same alert before the server asked for a certificate: the ciphers are to blame.
    let p = pki();
    let (port, t) = tls_1_2_server_requiring_certificates(&p, Some("ECDHE+AESGCM"));
    let e = tls_error(
        rpyc::Options::new()
            .tls(
                SslClient::new()
                    .ca_certs(p.ca.ca_cert())
                    .ciphers("ECDHE+CHACHA20"),
            )
            .connect("localhost", port),
    );
    let server_saw = t.join().unwrap();
    assert!(server_saw.contains("no shared cipher"), "{server_saw}");
    assert_eq!(e.kind(), TlsErrorKind::NoCommonParameters, "{e}");
    assert!(
        e.message()
            .contains("no cipher or signature algorithm in common"),
        "{e}"
    );
}

#[test]
fn closing_the_server_ends_tls_handshakes_in_progress_at_once() {
    let p = pki();
    let s = serve_tls(whoami(), p.authenticator(), |b| {
        server_options(b).handshake_timeout(Duration::from_secs(10))
    });
    let half = client_hello_prefix();
    let silent = TcpStream::connect(("127.0.0.1", s.port)).unwrap();
    let mut stalled = TcpStream::connect(("127.0.0.1", s.port)).unwrap();
    stalled.write_all(&half).unwrap();
    assert!(common::wait_until(Duration::from_secs(5), || s
        .handle
        .connections()
        == 2));
    let t = Instant::now();
    s.handle.close();
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "close took {:?}",
        t.elapsed()
    );
    drop((silent, stalled));
}

#[test]
fn garbage_inside_an_established_tls_session_closes_only_that_connection() {
    let p = pki();
    let s = server(&p);
    // A raw OpenSSL client with alice's certificate completes the handshake, then writes
    // bytes that are not a TLS record straight onto the socket.
    let mut b = openssl::ssl::SslConnector::builder(openssl::ssl::SslMethod::tls()).unwrap();
    b.set_ca_file(p.ca.ca_cert()).unwrap();
    b.set_certificate_chain_file(&p.alice.cert).unwrap();
    b.set_private_key_file(&p.alice.key, openssl::ssl::SslFiletype::PEM)
        .unwrap();
    let tcp = TcpStream::connect(("127.0.0.1", s.port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut tls = b.build().connect("localhost", tcp).unwrap();
    let mut hello = [0u8; 16];
    tls.read_exact(&mut hello).unwrap();
    assert_eq!(&hello[..4], b"RPYC");
    tls.get_mut()
        .write_all(&[0x17, 0x03, 0x03, 0x00, 0x20])
        .unwrap();
    tls.get_mut().write_all(&[0xAB; 32]).unwrap();
    // The server hangs up on this connection...
    common::wait_for_hang_up(tls.get_mut());
    // ...says why in its log, and keeps serving everyone else.
    assert!(wait_logged(&["127.0.0.1:", "bad record mac"]));
    still_serves(&s, &p);
}
