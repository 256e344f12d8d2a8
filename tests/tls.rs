//! TLS connections: mutual authentication, who the peer is, secure client defaults, custom
//! authenticators, and everything the core does, over one TLS session shared by many threads.

mod common;

use common::tls::{pki, serve_auth, serve_tls, server_options, still_serves, whoami};
use common::{handshake_kind, tls_error, tls_kind};
use common::{wait_until, CALL_TIMEOUT};
use rpyc::auth::{Authenticated, Authenticator, ClientAuthenticator};
use rpyc::testing::TestPki;
use rpyc::tls::{ClientCert, SslClient, TlsVersion};
use rpyc::{
    Bytes, Error, HandshakeError, HandshakeErrorKind, Options, Service, SslAuthenticator,
    TlsErrorKind,
};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[test]
fn mutual_tls_call_reaches_the_service() {
    let p = pki();
    let server = serve_tls(whoami(), p.authenticator(), server_options);
    let conn = p.client().connect("localhost", server.port).unwrap();
    assert_eq!(conn.root().call::<i64, _>("add", (40, 2)).unwrap(), 42);
}

#[test]
fn handlers_see_the_verified_client_identity() {
    let p = pki();
    let service = Service::new("ident").method_with_context("who", |cx: &rpyc::Context| {
        let c = cx
            .peer_certificate()
            .expect("a verified client certificate");
        let der = c.certificate().to_der().unwrap();
        (
            c.common_name().map(String::from),
            c.subject_alt_names().to_vec(),
            c.issuer().to_string(),
            der.len(),
        )
    });
    let server = serve_tls(service, p.authenticator(), server_options);
    let conn = p.client().connect("localhost", server.port).unwrap();
    let (cn, sans, issuer, der_len): (Option<String>, Vec<String>, String, usize) =
        conn.root().call("who", ()).unwrap();
    assert_eq!(cn.as_deref(), Some("alice"));
    assert_eq!(sans, vec!["DNS:alice.example".to_string()]);
    assert!(issuer.starts_with("CN=rpyc test CA"), "{issuer}");
    let ours = openssl::x509::X509::from_pem(&std::fs::read(&p.alice.cert).unwrap()).unwrap();
    assert_eq!(der_len, ours.to_der().unwrap().len());
    // And the client sees the server's certificate.
    let server_cert = conn.peer_certificate().expect("server certificate");
    assert_eq!(server_cert.common_name(), Some("localhost"));
    assert!(server_cert
        .subject_alt_names()
        .contains(&"IP:127.0.0.1".to_string()));
}

#[test]
fn a_service_decides_per_client_what_it_allows() {
    let p = pki();
    let bob = p.ca.issue("bob", &[]).unwrap();
    let service = Service::new("lab").method_with_context("reboot", |cx: &rpyc::Context| match cx
        .peer_certificate()
        .and_then(|c| c.common_name())
    {
        Some("alice") => Ok("rebooting".to_string()),
        other => Err(format!("{other:?} may not reboot")),
    });
    let server = serve_tls(service, p.authenticator(), server_options);
    let alice = p.client().connect("localhost", server.port).unwrap();
    assert_eq!(
        alice.root().call::<String, _>("reboot", ()).unwrap(),
        "rebooting"
    );
    let bob = rpyc::Options::new()
        .tls(
            SslClient::new()
                .ca_certs(p.ca.ca_cert())
                .keyfile(&bob.key)
                .certfile(&bob.cert),
        )
        .connect("localhost", server.port)
        .unwrap();
    let err = bob.root().call::<String, _>("reboot", ()).unwrap_err();
    assert!(err.to_string().contains("\"bob\") may not reboot"), "{err}");
}

#[test]
fn client_certificates_are_required_by_default_once_a_ca_is_given() {
    let p = pki();
    let server = serve_tls(whoami(), p.authenticator(), server_options);
    let err = rpyc::Options::new()
        .tls(SslClient::new().ca_certs(p.ca.ca_cert()))
        .connect("localhost", server.port)
        .unwrap_err();
    assert_eq!(tls_kind(&err), TlsErrorKind::CertificateRequired, "{err}");
    still_serves(&server, &p);
}

#[test]
fn optional_client_certificates_admit_anonymous_clients_and_verify_presented_ones() {
    let p = pki();
    let auth = p.authenticator().client_cert(ClientCert::Optional);
    let server = serve_tls(whoami(), auth, server_options);
    let anonymous = rpyc::Options::new()
        .tls(SslClient::new().ca_certs(p.ca.ca_cert()))
        .connect("localhost", server.port)
        .unwrap();
    assert_eq!(
        anonymous.root().call::<String, _>("whoami", ()).unwrap(),
        "anonymous"
    );
    let alice = p.client().connect("localhost", server.port).unwrap();
    assert_eq!(
        alice.root().call::<String, _>("whoami", ()).unwrap(),
        "alice"
    );
    // A presented certificate must still verify.
    let other = TestPki::temp().unwrap();
    let mallory = other.issue("mallory", &[]).unwrap();
    let err = rpyc::Options::new()
        .tls(
            SslClient::new()
                .ca_certs(p.ca.ca_cert())
                .keyfile(&mallory.key)
                .certfile(&mallory.cert),
        )
        .connect("localhost", server.port)
        .unwrap_err();
    assert_eq!(tls_kind(&err), TlsErrorKind::RejectedByPeer, "{err}");
}

#[test]
fn server_without_ca_asks_for_no_client_certificate() {
    let p = pki();
    let auth = SslAuthenticator::new(&p.server.key, &p.server.cert);
    let server = serve_tls(whoami(), auth, server_options);
    // Even a client presenting one is not asked for it.
    let conn = p.client().connect("localhost", server.port).unwrap();
    assert_eq!(
        conn.root().call::<String, _>("whoami", ()).unwrap(),
        "anonymous"
    );
}

#[test]
fn requiring_client_certificates_without_a_ca_is_misuse_reported_at_build() {
    let p = pki();
    let auth =
        SslAuthenticator::new(&p.server.key, &p.server.cert).client_cert(ClientCert::Required);
    let err = rpyc::ThreadedServer::new(whoami())
        .authenticator(auth)
        .build()
        .unwrap_err();
    assert!(
        matches!(&err, Error::Misuse(why) if why.contains("ca_certs")),
        "{err:?}"
    );
}

#[test]
fn a_ca_file_that_does_not_load_is_a_build_error_naming_it() {
    let p = pki();
    let auth = p.authenticator().ca_certs("/nonexistent/ca.pem");
    let err = rpyc::ThreadedServer::new(whoami())
        .authenticator(auth)
        .build()
        .unwrap_err();
    assert_eq!(tls_kind(&err), TlsErrorKind::Config, "{err}");
    assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
}

#[test]
fn ssl_connect_verifies_against_the_system_store_by_default() {
    // A private CA is not in the system store: the default client must refuse the server.
    let p = pki();
    let auth = SslAuthenticator::new(&p.server.key, &p.server.cert);
    let server = serve_tls(whoami(), auth, server_options);
    let err = rpyc::ssl_connect("localhost", server.port, None, None).unwrap_err();
    assert_eq!(tls_kind(&err), TlsErrorKind::CertificateRejected, "{err}");
    // The hint shows the one line that trusts a private CA.
    assert!(
        err.to_string()
            .contains("rpyc::Options::new().tls(rpyc::tls::SslClient::new().ca_certs("),
        "{err}"
    );
    // ... and that line works.
    let conn = rpyc::Options::new()
        .tls(rpyc::tls::SslClient::new().ca_certs(p.ca.ca_cert()))
        .connect("localhost", server.port)
        .unwrap();
    assert!(conn.ping().is_ok());
    // With the key and certificate too, still refused: presenting is not trusting.
    let key = p.alice.key.to_str().unwrap();
    let cert = p.alice.cert.to_str().unwrap();
    assert!(rpyc::ssl_connect("localhost", server.port, Some(key), Some(cert)).is_err());
}

#[test]
fn ca_certs_trusts_that_ca_alone() {
    // A server whose certificate a *different* CA signed is refused even though the client
    // was given a CA: the client's trust is replaced, not extended.
    let p = pki();
    let other = TestPki::temp().unwrap();
    let theirs = other.issue("localhost", &["localhost"]).unwrap();
    let auth = SslAuthenticator::new(&theirs.key, &theirs.cert);
    let server = serve_tls(whoami(), auth, server_options);
    let err = rpyc::Options::new()
        .tls(SslClient::new().ca_certs(p.ca.ca_cert()))
        .connect("localhost", server.port)
        .unwrap_err();
    assert_eq!(tls_kind(&err), TlsErrorKind::CertificateRejected, "{err}");
    let ok = rpyc::Options::new()
        .tls(SslClient::new().ca_certs(other.ca_cert()))
        .connect("localhost", server.port)
        .unwrap();
    assert!(ok.ping().is_ok());
}

#[test]
fn server_hostname_names_the_certificate_when_dialling_an_address() {
    let p = pki();
    let dns_only = p.ca.issue("dns-only", &["rpyc.test"]).unwrap();
    let auth = SslAuthenticator::new(&dns_only.key, &dns_only.cert);
    let server = serve_tls(whoami(), auth, server_options);
    let client = SslClient::new().ca_certs(p.ca.ca_cert());
    let err = rpyc::Options::new()
        .tls(client.clone())
        .connect("127.0.0.1", server.port)
        .unwrap_err();
    assert_eq!(tls_kind(&err), TlsErrorKind::CertificateRejected, "{err}");
    // The hint says what to do.
    let msg = tls_error(&err).message();
    assert!(
        msg.contains("rejected the server's certificate")
            && msg.contains("not issued for \"127.0.0.1\"")
            && msg.contains("set server_hostname(...)"),
        "{msg}"
    );
    let conn = rpyc::Options::new()
        .tls(client.server_hostname("rpyc.test"))
        .connect("127.0.0.1", server.port)
        .unwrap();
    assert!(conn.ping().is_ok());
}

#[test]
fn an_ip_address_in_the_certificate_verifies_without_a_hostname() {
    let p = pki();
    let server = serve_tls(whoami(), p.authenticator(), server_options);
    let conn = p.client().connect("127.0.0.1", server.port).unwrap();
    assert!(conn.ping().is_ok());
}

#[test]
fn turning_verification_off_takes_the_dangerous_option() {
    let p = pki();
    let auth = SslAuthenticator::new(&p.server.key, &p.server.cert);
    let server = serve_tls(whoami(), auth, server_options);
    // Untrusted CA and a wrong name: only the visibly dangerous option connects.
    assert!(rpyc::Options::new()
        .tls(SslClient::new().server_hostname("wrong.example"))
        .connect("127.0.0.1", server.port)
        .is_err());
    let conn = rpyc::Options::new()
        .tls(
            SslClient::new()
                .server_hostname("wrong.example")
                .dangerous_accept_any_server_certificate(),
        )
        .connect("127.0.0.1", server.port)
        .unwrap();
    assert!(conn.ping().is_ok());
}

/// The negotiated protocol version, seen from a raw OpenSSL client.
fn negotiated(port: u16, max: Option<openssl::ssl::SslVersion>) -> Result<String, String> {
    let mut b = openssl::ssl::SslConnector::builder(openssl::ssl::SslMethod::tls()).unwrap();
    b.set_verify(openssl::ssl::SslVerifyMode::NONE);
    b.set_max_proto_version(max).unwrap();
    let tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.set_read_timeout(Some(CALL_TIMEOUT)).unwrap();
    let c = b.build();
    let mut s = c
        .configure()
        .unwrap()
        .verify_hostname(false)
        .connect("localhost", tcp)
        .map_err(|e| e.to_string())?;
    // TLS 1.3 reports a refusal after the handshake: read the server's hello to be sure.
    let mut hello = [0u8; 16];
    s.read_exact(&mut hello).map_err(|e| e.to_string())?;
    Ok(s.ssl().version_str().to_string())
}

#[test]
fn tls_1_2_is_the_minimum_and_1_3_only_is_available() {
    let p = pki();
    let auth = SslAuthenticator::new(&p.server.key, &p.server.cert);
    let server = serve_tls(whoami(), auth.clone(), server_options);
    assert_eq!(
        negotiated(server.port, Some(openssl::ssl::SslVersion::TLS1_2)).unwrap(),
        "TLSv1.2"
    );
    assert_eq!(negotiated(server.port, None).unwrap(), "TLSv1.3");
    let strict = serve_tls(
        whoami(),
        auth.min_version(TlsVersion::Tls13),
        server_options,
    );
    assert!(negotiated(strict.port, Some(openssl::ssl::SslVersion::TLS1_2)).is_err());
    assert_eq!(negotiated(strict.port, None).unwrap(), "TLSv1.3");
    // A client that insists on 1.3 against the default server.
    let conn = rpyc::Options::new()
        .tls(
            SslClient::new()
                .ca_certs(p.ca.ca_cert())
                .min_version(TlsVersion::Tls13),
        )
        .connect("localhost", server.port)
        .unwrap();
    assert!(conn.ping().is_ok());
}

#[test]
fn cipher_settings_apply_and_bad_ones_are_reported() {
    let p = pki();
    let auth = SslAuthenticator::new(&p.server.key, &p.server.cert)
        .ciphersuites("TLS_CHACHA20_POLY1305_SHA256");
    let server = serve_tls(whoami(), auth, server_options);
    let conn = rpyc::Options::new()
        .tls(
            SslClient::new()
                .ca_certs(p.ca.ca_cert())
                .ciphersuites("TLS_CHACHA20_POLY1305_SHA256"),
        )
        .connect("localhost", server.port)
        .unwrap();
    assert!(conn.ping().is_ok());
    let err = rpyc::Options::new()
        .tls(
            SslClient::new()
                .ca_certs(p.ca.ca_cert())
                .ciphers("NO-SUCH-CIPHER")
                .min_version(TlsVersion::Tls12),
        )
        .connect("localhost", server.port)
        .unwrap_err();
    assert_eq!(tls_kind(&err), TlsErrorKind::Config, "{err}");
    assert!(err.to_string().contains("NO-SUCH-CIPHER"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Custom authenticators

struct Token(&'static [u8; 8]);

impl Authenticator for Token {
    fn authenticate(&self, mut s: TcpStream, timeout: Duration) -> Result<Authenticated, Error> {
        s.set_read_timeout(Some(timeout))?;
        let mut got = [0u8; 8];
        s.read_exact(&mut got)?;
        if &got != self.0 {
            return Err(HandshakeError::rejected("wrong token").into());
        }
        Ok(Authenticated::new(s).credentials(String::from("token holder")))
    }
}

struct SendToken(&'static [u8; 8]);

impl ClientAuthenticator for SendToken {
    fn authenticate(&self, mut s: TcpStream, _: &str, _: Duration) -> Result<Authenticated, Error> {
        s.write_all(self.0)?;
        Ok(Authenticated::new(s).credentials(7u32))
    }
}

#[test]
fn custom_authenticators_work_on_both_sides_and_pass_credentials() {
    let service = Service::new("s").method_with_context("who", |cx: &rpyc::Context| {
        cx.credentials::<String>().cloned()
    });
    let server = serve_auth(service, Token(b"s3cr3t!!"), server_options);
    let conn = Options::new()
        .authenticator(SendToken(b"s3cr3t!!"))
        .connect("127.0.0.1", server.port)
        .unwrap();
    assert_eq!(
        conn.root().call::<Option<String>, _>("who", ()).unwrap(),
        Some("token holder".into())
    );
    assert_eq!(conn.credentials::<u32>(), Some(&7));
    assert!(conn.peer_certificate().is_none());
    // A wrong token is refused, and the server goes on serving.
    let err = Options::new()
        .authenticator(SendToken(b"wrong!!!"))
        .connect("127.0.0.1", server.port)
        .unwrap_err();
    // The server closes on it: the client sees the end of the stream, or a reset.
    assert!(
        matches!(
            handshake_kind(&err),
            HandshakeErrorKind::Closed | HandshakeErrorKind::Io
        ),
        "{err}"
    );
    let again = Options::new()
        .authenticator(SendToken(b"s3cr3t!!"))
        .connect("127.0.0.1", server.port)
        .unwrap();
    assert!(again.ping().is_ok());
}

/// A client authenticator that refuses every server.
struct DistrustServer;

impl ClientAuthenticator for DistrustServer {
    fn authenticate(&self, _: TcpStream, host: &str, _: Duration) -> Result<Authenticated, Error> {
        Err(HandshakeError::rejected(format!("{host} is not on our list")).into())
    }
}

#[test]
fn an_authenticator_s_refusal_reaches_the_program_as_rejected_with_its_reason() {
    let server = serve_auth(whoami(), Token(b"s3cr3t!!"), server_options);
    let err = Options::new()
        .authenticator(DistrustServer)
        .connect("127.0.0.1", server.port)
        .unwrap_err();
    assert_eq!(handshake_kind(&err), HandshakeErrorKind::Rejected, "{err}");
    assert_eq!(
        err.to_string(),
        "handshake failed: 127.0.0.1 is not on our list"
    );
}

/// Admits clients from listed addresses only, then hands over to TLS.
struct AllowList(Vec<std::net::IpAddr>, SslAuthenticator);

impl Authenticator for AllowList {
    fn authenticate(&self, s: TcpStream, timeout: Duration) -> Result<Authenticated, Error> {
        let ip = s.peer_addr()?.ip();
        if !self.0.contains(&ip) {
            return Err(HandshakeError::rejected(format!("{ip} is not allowed")).into());
        }
        self.1.authenticate(s, timeout)
    }
}

#[test]
fn an_allow_list_authenticator_can_wrap_tls() {
    let p = pki();
    let v4: std::net::IpAddr = "127.0.0.1".parse().unwrap();
    let allowed = serve_auth(
        whoami(),
        AllowList(vec![v4], p.authenticator()),
        server_options,
    );
    let conn = p.client().connect("localhost", allowed.port).unwrap();
    assert_eq!(
        conn.root().call::<String, _>("whoami", ()).unwrap(),
        "alice"
    );
    let denied = serve_auth(
        whoami(),
        AllowList(vec!["10.9.8.7".parse().unwrap()], p.authenticator()),
        server_options,
    );
    assert!(p.client().connect("localhost", denied.port).is_err());
}

// ---------------------------------------------------------------------------------------------
// One TLS session carries everything the core does

#[test]
fn many_threads_share_one_tls_connection_and_each_gets_its_own_reply() {
    let p = pki();
    let server = serve_tls(whoami(), p.authenticator(), server_options);
    let conn = p.client().connect("localhost", server.port).unwrap();
    std::thread::scope(|s| {
        for t in 0..16i64 {
            let conn = &conn;
            s.spawn(move || {
                for i in 0..300i64 {
                    let r: i64 = conn.root().call("add", (t * 1_000_000, i)).unwrap();
                    assert_eq!(r, t * 1_000_000 + i);
                }
            });
        }
    });
}

#[test]
fn a_callback_passed_over_tls_is_invoked_by_the_server() {
    let p = pki();
    let service = Service::new("s").method("map", |f: rpyc::RemoteObject, n: u32| {
        (0..n)
            .map(|i| f.invoke::<u32, _>((i,)))
            .collect::<Result<Vec<u32>, Error>>()
    });
    let server = serve_tls(service, p.authenticator(), server_options);
    let conn = p.client().connect("localhost", server.port).unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let cb = rpyc::callback(move |i: u32| {
        counter.fetch_add(1, Ordering::SeqCst);
        i * 10
    });
    let r: Vec<u32> = conn.root().call("map", (cb, 5u32)).unwrap();
    assert_eq!(r, vec![0, 10, 20, 30, 40]);
    assert_eq!(calls.load(Ordering::SeqCst), 5);
}

#[test]
fn nested_calls_through_both_services_ten_deep_over_tls() {
    // Small pools on both sides: nested requests must run on the waiting threads.
    let p = pki();
    let server_svc = Service::new("server").method_with_context(
        "down",
        |cx: &rpyc::Context, n: u32| -> Result<u32, Error> {
            if n == 0 {
                return Ok(0);
            }
            Ok(cx.peer_root().call::<u32, _>("up", (n - 1,))? + 1)
        },
    );
    let server = serve_tls(server_svc, p.authenticator(), |b| {
        server_options(b).max_workers(2)
    });
    let client_svc = Service::new("client").method_with_context(
        "up",
        |cx: &rpyc::Context, n: u32| -> Result<u32, Error> {
            Ok(cx.peer_root().call::<u32, _>("down", (n,))? + 1)
        },
    );
    let conn = p
        .client()
        .call_timeout(CALL_TIMEOUT)
        .max_workers(2)
        .service(client_svc)
        .connect("localhost", server.port)
        .unwrap();
    // down(10) -> up(9) -> down(9) -> ... -> down(0): 10 server and 10 client frames.
    assert_eq!(conn.root().call::<u32, _>("down", (10u32,)).unwrap(), 20);
}

#[test]
fn large_payloads_cross_in_both_directions_at_once_over_tls() {
    let p = pki();
    let server = serve_tls(whoami(), p.authenticator(), server_options);
    let conn = Arc::new(p.client().connect("localhost", server.port).unwrap());
    // The server echoes 16 MiB to each of two threads while both send 16 MiB: both peers'
    // writers and readers are busy at the same time on one SSL object each.
    std::thread::scope(|s| {
        for seed in 0..2u8 {
            let conn = conn.clone();
            s.spawn(move || {
                let data: Vec<u8> = (0..16 << 20).map(|i| (i as u8) ^ seed).collect();
                let back: Bytes = conn
                    .root()
                    .call_timeout(
                        "echo",
                        (Bytes::from(data.clone()),),
                        Duration::from_secs(60),
                    )
                    .unwrap();
                assert!(back[..] == data[..], "echo differs");
            });
        }
    });
}

#[test]
fn a_timed_out_call_leaves_the_tls_connection_usable() {
    let p = pki();
    let service = whoami().method("sleep", |ms: u64| {
        std::thread::sleep(Duration::from_millis(ms))
    });
    let server = serve_tls(service, p.authenticator(), server_options);
    let conn = p.client().connect("localhost", server.port).unwrap();
    let err = conn
        .root()
        .call_timeout::<(), _>("sleep", (500u64,), Duration::from_millis(50))
        .unwrap_err();
    assert!(matches!(err, Error::Timeout(_)), "{err}");
    assert_eq!(conn.root().call::<i64, _>("add", (1, 2)).unwrap(), 3);
}

#[test]
fn a_tls_connection_that_went_quiet_carries_small_and_large_calls_again() {
    // Readers on both sides wake every quarter of the call timeout while quiet, and give their
    // receive buffers back then; the next bytes find none and wait for the socket first.
    let call = Duration::from_secs(1);
    let p = pki();
    let server = serve_tls(whoami(), p.authenticator(), |b| {
        server_options(b).call_timeout(call)
    });
    let conn = p
        .client()
        .call_timeout(call)
        .connect("localhost", server.port)
        .unwrap();
    let large = Bytes::from((0..1 << 20).map(|i| i as u8).collect::<Vec<u8>>());
    for _ in 0..3 {
        assert_eq!(conn.root().call::<i64, _>("add", (40, 2)).unwrap(), 42);
        let back: Bytes = conn
            .root()
            .call_timeout("echo", (&large,), CALL_TIMEOUT)
            .unwrap();
        assert!(back == large, "echo differs");
        std::thread::sleep(call);
    }
}

/// A TLS server whose `block` method waits for the gate, a client, and a thread of the client
/// waiting in `block`.
struct BlockedCall {
    gate: common::Gate,
    server: common::TestServer,
    conn: rpyc::Connection,
    waiter: std::thread::JoinHandle<Result<(), Error>>,
}

fn blocked_call() -> BlockedCall {
    let p = pki();
    let gate = common::Gate::default();
    let g = gate.clone();
    let service = whoami().method("block", move || g.wait());
    let server = serve_tls(service, p.authenticator(), server_options);
    let conn = p.client().connect("localhost", server.port).unwrap();
    let c2 = conn.clone();
    let waiter = std::thread::spawn(move || c2.root().call::<(), _>("block", ()));
    std::thread::sleep(Duration::from_millis(100));
    BlockedCall {
        gate,
        server,
        conn,
        waiter,
    }
}

#[test]
fn closing_a_tls_connection_fails_waiting_calls_at_once() {
    let b = blocked_call();
    let t = Instant::now();
    b.conn.close();
    let r = b.waiter.join().unwrap();
    assert!(matches!(r, Err(Error::Closed { .. })), "{r:?}");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    b.gate.open();
}

#[test]
fn the_server_sees_a_tls_client_close() {
    let p = pki();
    let server = serve_tls(whoami(), p.authenticator(), server_options);
    let conn = p.client().connect("localhost", server.port).unwrap();
    assert!(conn.ping().is_ok());
    assert_eq!(server.handle.connections(), 1);
    conn.close();
    assert!(wait_until(Duration::from_secs(5), || server
        .handle
        .connections()
        == 0));
}

#[test]
fn a_dead_tls_server_fails_the_waiting_call_and_later_calls_fast() {
    let b = blocked_call();
    // The server's close waits for its running handler: let the handler go a moment later.
    let gate = b.gate.clone();
    let opener = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        gate.open();
    });
    b.server.handle.close();
    opener.join().unwrap();
    let r = b.waiter.join().unwrap();
    assert!(r.is_err());
    let t = Instant::now();
    assert!(matches!(
        b.conn.root().call::<i64, _>("add", (1, 2)),
        Err(Error::Closed { .. })
    ));
    assert!(t.elapsed() < Duration::from_secs(1));
}
