//! Keys and certificates made by the `openssl` command line (testdata/tls, see its gen.sh) load
//! as they are: RSA 2048/4096, EC P-256/P-384 and Ed25519 keys in PKCS#1, SEC1 and PKCS#8 form,
//! a chain with an intermediate CA, an encrypted key; and files that cannot load are
//! configuration errors that name the file.

mod common;

use common::tls::{serve_tls, server_options, testdata, whoami};
use common::{tls_error, tls_kind};
use rpyc::tls::SslClient;
use rpyc::{Error, Options, Service, SslAuthenticator, ThreadedServer, TlsErrorKind};

/// A client trusting the committed root CA, presenting `client` (a testdata name) if given.
fn client(cert: Option<&str>) -> Options {
    let c = SslClient::new().ca_certs(testdata("ca.pem"));
    Options::new().tls(match cert {
        Some(name) => c
            .keyfile(testdata(&format!("{name}.key")))
            .certfile(testdata(&format!("{name}.pem"))),
        None => c,
    })
}

/// Why a server with `auth` cannot be built (every file is read and checked then).
fn build_error(auth: SslAuthenticator) -> Error {
    ThreadedServer::new(Service::new("s"))
        .authenticator(auth)
        .build()
        .expect_err("the server should not build")
}

/// Serves with the committed server key `name`, requires client certificates from the root CA,
/// and checks a client authenticated as `client_name` gets a call through with its CN seen.
fn serves_with(auth: SslAuthenticator, client_file: &str, cn: &str) {
    let server = serve_tls(whoami(), auth.ca_certs(testdata("ca.pem")), server_options);
    for host in ["localhost", "127.0.0.1"] {
        let conn = client(Some(client_file))
            .connect(host, server.port)
            .unwrap_or_else(|e| panic!("{client_file} to {host}: {e}"));
        assert_eq!(conn.root().call::<String, _>("whoami", ()).unwrap(), cn);
        assert_eq!(
            conn.peer_certificate().unwrap().common_name(),
            Some("localhost")
        );
    }
}

fn server_key(name: &str) -> SslAuthenticator {
    SslAuthenticator::new(
        testdata(&format!("{name}.key")),
        testdata(&format!("{name}.pem")),
    )
}

#[test]
fn rsa_2048_pkcs1_server_key_loads() {
    let pem = std::fs::read_to_string(testdata("server-rsa2048.key")).unwrap();
    assert!(pem.starts_with("-----BEGIN RSA PRIVATE KEY-----"));
    serves_with(server_key("server-rsa2048"), "client-rsa", "alice");
}

#[test]
fn rsa_4096_pkcs8_server_key_loads() {
    serves_with(server_key("server-rsa4096"), "client-rsa", "alice");
}

#[test]
fn ec_p256_sec1_server_key_and_client_key_load() {
    let pem = std::fs::read_to_string(testdata("server-p256.key")).unwrap();
    assert!(pem.starts_with("-----BEGIN EC PRIVATE KEY-----"));
    serves_with(server_key("server-p256"), "client-p256", "bob");
}

#[test]
fn ec_p384_pkcs8_server_key_loads() {
    serves_with(server_key("server-p384"), "client-p256", "bob");
}

#[test]
fn ed25519_server_and_client_keys_load() {
    serves_with(server_key("server-ed25519"), "client-ed25519", "carol");
}

#[test]
fn a_certificate_file_with_an_intermediate_ca_sends_the_chain() {
    // The client trusts only the root; it can verify the server only if the server sends the
    // intermediate from its certificate file.
    serves_with(server_key("server-chain"), "client-rsa", "alice");
}

#[test]
fn an_encrypted_key_loads_with_its_passphrase() {
    let pass = std::fs::read_to_string(testdata("server-encrypted.passphrase")).unwrap();
    let auth = SslAuthenticator::new(
        testdata("server-encrypted.key"),
        testdata("server-encrypted.pem"),
    )
    .key_passphrase(&pass);
    serves_with(auth, "client-rsa", "alice");
}

#[test]
fn an_encrypted_key_without_or_with_a_wrong_passphrase_says_so() {
    let err = build_error(SslAuthenticator::new(
        testdata("server-encrypted.key"),
        testdata("server-encrypted.pem"),
    ));
    assert_eq!(tls_kind(&err), TlsErrorKind::Config, "{err}");
    let msg = tls_error(&err).message();
    assert!(
        msg.contains("is encrypted; give its passphrase") && msg.contains("key_passphrase"),
        "{msg}"
    );
    let err = build_error(
        SslAuthenticator::new(
            testdata("server-encrypted.key"),
            testdata("server-encrypted.pem"),
        )
        .key_passphrase("wrong"),
    );
    assert_eq!(tls_kind(&err), TlsErrorKind::Config, "{err}");
    assert!(err.to_string().contains("wrong passphrase"), "{err}");
}

#[test]
fn a_client_key_passphrase_works_too() {
    let pass = std::fs::read_to_string(testdata("server-encrypted.passphrase")).unwrap();
    // The client loads its key when it connects; the server does not ask for a certificate
    // (this one is for servers), so what is under test is loading the encrypted key.
    let server = serve_tls(whoami(), server_key("server-p256"), server_options);
    let c = SslClient::new()
        .ca_certs(testdata("ca.pem"))
        .keyfile(testdata("server-encrypted.key"))
        .certfile(testdata("server-encrypted.pem"))
        .key_passphrase(&pass);
    let conn = Options::new()
        .tls(c)
        .connect("localhost", server.port)
        .unwrap();
    assert!(conn.ping().is_ok());
    let err = rpyc::Options::new()
        .tls(
            SslClient::new()
                .ca_certs(testdata("ca.pem"))
                .keyfile(testdata("server-encrypted.key"))
                .certfile(testdata("server-encrypted.pem")),
        )
        .connect("localhost", server.port)
        .unwrap_err();
    assert_eq!(tls_kind(&err), TlsErrorKind::Config, "{err}");
}

#[test]
fn missing_files_are_named_in_the_error() {
    let err = build_error(SslAuthenticator::new(
        "/nonexistent/server.key",
        testdata("server-p256.pem"),
    ));
    assert_eq!(tls_kind(&err), TlsErrorKind::Config, "{err}");
    assert!(
        err.to_string().contains("/nonexistent/server.key") && err.to_string().contains("key"),
        "{err}"
    );
    let err = build_error(SslAuthenticator::new(
        testdata("server-p256.key"),
        "/nonexistent/server.pem",
    ));
    assert_eq!(tls_kind(&err), TlsErrorKind::Config, "{err}");
    assert!(err.to_string().contains("/nonexistent/server.pem"), "{err}");
}

/// Checks that `err` is a configuration error whose message holds each of `parts` (file paths
/// among them).
fn config_error_saying(err: &Error, parts: &[&str]) {
    assert_eq!(tls_kind(err), TlsErrorKind::Config, "{err}");
    let msg = tls_error(err).message();
    for part in parts {
        assert!(msg.contains(part), "{part:?} is not in: {msg}");
    }
}

/// The full path of the testdata file `name`, as an error message names it.
fn path_of(name: &str) -> String {
    testdata(name).display().to_string()
}

#[test]
fn a_key_that_does_not_match_the_certificate_is_refused() {
    let err = build_error(SslAuthenticator::new(
        testdata("server-p384.key"),
        testdata("server-p256.pem"),
    ));
    config_error_saying(
        &err,
        &[
            &path_of("server-p384.key"),
            &path_of("server-p256.pem"),
            "does not belong to the certificate",
        ],
    );
}

#[test]
fn files_that_are_not_pem_are_configuration_errors() {
    let err = build_error(SslAuthenticator::new(
        testdata("README.md"),
        testdata("server-p256.pem"),
    ));
    config_error_saying(&err, &[&format!("key file {}", path_of("README.md"))]);
    let err = build_error(SslAuthenticator::new(
        testdata("server-p256.key"),
        testdata("README.md"),
    ));
    config_error_saying(
        &err,
        &[&format!("certificate file {}", path_of("README.md"))],
    );
    // A certificate given as a key and a key as a certificate: the key file is read first.
    let err = build_error(SslAuthenticator::new(
        testdata("server-p256.pem"),
        testdata("server-p256.key"),
    ));
    config_error_saying(&err, &[&format!("key file {}", path_of("server-p256.pem"))]);
}

#[test]
fn a_missing_client_key_or_certificate_file_is_named_at_the_first_connect() {
    // A server that would accept the client: only the client's own files can fail.
    let server = serve_tls(whoami(), server_key("server-p256"), server_options);
    let (key, cert) = (testdata("client-p256.key"), testdata("client-p256.pem"));
    let (no_key, no_cert) = (
        "/nonexistent/client.key".into(),
        "/nonexistent/client.pem".into(),
    );
    for (key, cert, named) in [
        (&no_key, &cert, "key file /nonexistent/client.key"),
        (&key, &no_cert, "certificate file /nonexistent/client.pem"),
    ] {
        let err = Options::new()
            .tls(
                SslClient::new()
                    .ca_certs(testdata("ca.pem"))
                    .keyfile(key)
                    .certfile(cert),
            )
            .connect("localhost", server.port)
            .unwrap_err();
        config_error_saying(&err, &[named]);
    }
}

#[test]
fn committed_certificates_stay_valid_for_decades() {
    // Guards the promise of gen.sh: if someone regenerates with a short validity, this fails.
    let in_fifty_years = openssl::asn1::Asn1Time::days_from_now(50 * 365).unwrap();
    let now = openssl::asn1::Asn1Time::days_from_now(0).unwrap();
    for entry in std::fs::read_dir(testdata("")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "pem") {
            let pem = std::fs::read(&path).unwrap();
            for cert in openssl::x509::X509::stack_from_pem(&pem).unwrap() {
                assert!(cert.not_before() <= now, "{} not valid yet", path.display());
                assert!(
                    cert.not_after() >= in_fifty_years,
                    "{} expires on {}: regenerate with testdata/tls/gen.sh",
                    path.display(),
                    cert.not_after()
                );
            }
        }
    }
}
