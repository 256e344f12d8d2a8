//! TLS on OpenSSL: [`SslAuthenticator`] for servers, [`SslClient`] and [`ssl_connect`] for
//! clients, and the transport that lets many threads share one TLS session.
//!
//! # Secure by default
//!
//! A client verifies the server's certificate chain and its hostname, against the system's
//! trust store or, once [`SslClient::ca_certs`] is given, against that CA alone. TLS 1.2 is the
//! minimum. The only way to skip verification is the visibly named
//! [`SslClient::dangerous_accept_any_server_certificate`]. A server given a CA with
//! [`SslAuthenticator::ca_certs`] requires client certificates signed by it; the verified
//! certificate ([`PeerCertificate`]) is available to handlers through
//! [`Context::peer_certificate`](crate::Context::peer_certificate).
//!
//! # How threads share one SSL object
//!
//! OpenSSL forbids two threads inside one SSL object, and a `SslStream` cannot be split into
//! halves. A lock held across a blocking `SSL_read` would stall every writer for as long as the
//! peer is silent, and a lock held across a blocking `SSL_write` on a full socket deadlocks
//! when both peers send large messages at once. So:
//!
//! * The SSL object sits behind one mutex, which is held only for a single `SSL_read` or
//!   `SSL_write` call, and such a call never waits for the network: the SSL object's socket
//!   layer reads and writes with `MSG_DONTWAIT`, so it moves what is already there and returns.
//! * A writer whose bytes the socket cannot take yet **releases the mutex** and waits for the
//!   socket with `poll(2)`, then retries with the same bytes, as OpenSSL requires. In between,
//!   the reading thread takes the mutex and drains incoming records, so two peers sending
//!   64 MiB to each other both make progress.
//! * The reader waits for input outside the mutex: when neither OpenSSL nor the socket layer's
//!   buffer holds unread bytes, it does a blocking read of the socket into that buffer (one
//!   system call per batch of records, where OpenSSL alone makes two per record) while holding
//!   only the buffer, which no other thread needs meanwhile; then it takes the mutex and
//!   decrypts. A round trip costs each side one read and one write, as over plain TCP.
//! * The reading side is owned by one thread at a time (the connection's reader token), the
//!   writing side by the connection's writer lock; the SSL mutex only orders their single calls.
//! * Read timeouts (a calling thread reads its own reply in slices) are the socket's read
//!   timeout; closing shuts the socket down from any thread, which ends every wait at once.
//!
//! Handshakes run on the same non-waiting socket layer, with `poll(2)` against a deadline (the
//! handshake timeout), so a client that connects and sends nothing, or stops half way, is
//! dropped in time; on a server the handshake runs on the connection's own thread, never on
//! the accept loop.

use crate::auth::{Authenticated, Authenticator, ClientAuthenticator};
use crate::base::lock;
use crate::base::sys::{self, POLLIN, POLLOUT};
use crate::core::connection::Connection;
use crate::error::{Error, Timeout};
use crate::client::Options;
use crate::transport::{Control, Sink, Stall, Transport};
use openssl::error::ErrorStack;
use openssl::pkey::{PKey, Private};
use openssl::ssl::{
    self, ErrorCode, Ssl, SslAcceptor, SslConnector, SslContextBuilder, SslMethod, SslOptions,
    SslRef, SslStream, SslVerifyMode, SslVersion,
};
use openssl::x509::store::X509StoreBuilder;
use openssl::x509::{X509Ref, X509VerifyResult, X509};
use std::fmt;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The lowest TLS version a side accepts (TLS 1.2 unless raised).
///
/// ```
/// let client = rpyc::SslClient::new().min_version(rpyc::TlsVersion::Tls13);
/// # let _ = client;
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum TlsVersion {
    /// TLS 1.2 and 1.3 (the default).
    #[default]
    Tls12,
    /// TLS 1.3 only.
    Tls13,
}

impl TlsVersion {
    fn ssl(self) -> SslVersion {
        match self {
            TlsVersion::Tls12 => SslVersion::TLS1_2,
            TlsVersion::Tls13 => SslVersion::TLS1_3,
        }
    }
}

/// Whether a server asks clients for a certificate (see [`SslAuthenticator::client_cert`]).
///
/// ```
/// # let pki = rpyc::TestPki::temp()?;
/// # let server = pki.issue("localhost", &["localhost"])?;
/// let auth = rpyc::SslAuthenticator::new(&server.key, &server.cert)?
///     .ca_certs(pki.ca_cert())
///     .client_cert(rpyc::ClientCert::Optional);
/// # let _ = auth;
/// # Ok::<(), rpyc::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClientCert {
    /// Clients are not asked for a certificate (the default without a CA).
    None,
    /// Clients may present one; if they do, it must verify against the CA.
    Optional,
    /// Clients must present a certificate that verifies against the CA (the default once a CA
    /// is given).
    Required,
}

/// The certificate a peer presented and this side verified: who the peer is. Handlers get the
/// client's through [`Context::peer_certificate`](crate::Context::peer_certificate); a client
/// gets the server's through [`Connection::peer_certificate`](crate::Connection::peer_certificate).
///
/// ```
/// # let pki = rpyc::TestPki::temp()?;
/// # let files = pki.issue("localhost", &["localhost", "127.0.0.1"])?;
/// # let auth = rpyc::SslAuthenticator::new(&files.key, &files.cert)?;
/// # let server = rpyc::ThreadedServer::new(rpyc::Service::new("s")).authenticator(auth).build()?.spawn()?;
/// let conn = rpyc::SslClient::new().ca_certs(pki.ca_cert()).connect("127.0.0.1", server.port())?;
/// let cert = conn.peer_certificate().expect("a TLS connection");
/// assert_eq!(cert.common_name(), Some("localhost"));
/// assert!(cert.subject_alt_names().iter().any(|n| n == "DNS:localhost"));
/// # server.close();
/// # Ok::<(), rpyc::Error>(())
/// ```
#[derive(Clone)]
pub struct PeerCertificate {
    common_name: Option<String>,
    subject: String,
    issuer: String,
    sans: Vec<String>,
    x509: X509,
}

impl PeerCertificate {
    fn new(x509: X509) -> PeerCertificate {
        let common_name = x509
            .subject_name()
            .entries_by_nid(openssl::nid::Nid::COMMONNAME)
            .next()
            .and_then(|e| e.data().to_string().ok());
        let sans = x509
            .subject_alt_names()
            .map(|names| {
                names
                    .iter()
                    .filter_map(|n| {
                        if let Some(d) = n.dnsname() {
                            Some(format!("DNS:{d}"))
                        } else if let Some(ip) = n.ipaddress() {
                            ip_string(ip).map(|ip| format!("IP:{ip}"))
                        } else if let Some(e) = n.email() {
                            Some(format!("email:{e}"))
                        } else {
                            n.uri().map(|u| format!("URI:{u}"))
                        }
                    })
                    .collect()
            })
            .unwrap_or_default();
        PeerCertificate {
            common_name,
            subject: name_string(x509.subject_name()),
            issuer: name_string(x509.issuer_name()),
            sans,
            x509,
        }
    }

    /// The subject's common name (CN), if it has one.
    pub fn common_name(&self) -> Option<&str> {
        self.common_name.as_deref()
    }

    /// The subject, e.g. `CN=alice, O=lab`.
    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// The issuer (the CA that signed it), e.g. `CN=rpyc test root CA`.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// The subject alternative names, written as OpenSSL prints them: `DNS:host`,
    /// `IP:127.0.0.1`, `email:a@b`, `URI:...`.
    pub fn subject_alt_names(&self) -> &[String] {
        &self.sans
    }

    /// The certificate itself, for any other check.
    pub fn certificate(&self) -> &X509 {
        &self.x509
    }
}

impl fmt::Debug for PeerCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerCertificate")
            .field("subject", &self.subject)
            .field("issuer", &self.issuer)
            .field("subject_alt_names", &self.sans)
            .finish()
    }
}

fn ip_string(b: &[u8]) -> Option<String> {
    match b.len() {
        4 => Some(std::net::Ipv4Addr::from(<[u8; 4]>::try_from(b).ok()?).to_string()),
        16 => Some(std::net::Ipv6Addr::from(<[u8; 16]>::try_from(b).ok()?).to_string()),
        _ => None,
    }
}

fn name_string(name: &openssl::x509::X509NameRef) -> String {
    name.entries()
        .map(|e| {
            let key = e.object().nid().short_name().unwrap_or("?");
            let value = e.data().to_string().unwrap_or_else(|_| "?".into());
            format!("{key}={value}")
        })
        .collect::<Vec<_>>()
        .join(", ")
}

// ---------------------------------------------------------------------------------------------
// Loading keys and certificates

fn read_file(path: &Path, what: &str) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|e| {
        Error::Tls(format!(
            "cannot read the {what} file {}: {e}; check the path and its permissions",
            path.display()
        ))
    })
}

fn reasons(e: &ErrorStack) -> String {
    let r: Vec<&str> = e.errors().iter().filter_map(|x| x.reason()).collect();
    if r.is_empty() {
        e.to_string()
    } else {
        r.join(", ")
    }
}

/// Loads a PEM private key: PKCS#1, SEC1, PKCS#8, or encrypted PKCS#8 / legacy PEM with
/// `passphrase`. Never prompts on a terminal.
fn load_key(path: &Path, passphrase: Option<&str>) -> Result<PKey<Private>, Error> {
    let pem = read_file(path, "key")?;
    let has = |needle: &[u8]| pem.windows(needle.len()).any(|w| w == needle);
    // PKCS#8 encrypted, or a legacy PEM header `Proc-Type: 4,ENCRYPTED`.
    let encrypted = has(b"-----BEGIN ENCRYPTED PRIVATE KEY-----") || has(b"4,ENCRYPTED");
    let key = match passphrase {
        Some(p) => PKey::private_key_from_pem_passphrase(&pem, p.as_bytes()),
        // An empty callback answer makes an encrypted key fail instead of prompting.
        None => PKey::private_key_from_pem_callback(&pem, |_| Ok(0)),
    };
    key.map_err(|e| {
        Error::Tls(match (encrypted, passphrase) {
            (true, None) => format!(
                "the key file {} is encrypted; give its passphrase \
                 (SslAuthenticator::with_key_passphrase or SslClient::key_passphrase)",
                path.display()
            ),
            (true, Some(_)) => format!(
                "cannot decrypt the key file {}: wrong passphrase? ({})",
                path.display(),
                reasons(&e)
            ),
            _ => format!(
                "the key file {} holds no PEM private key this build can read (PKCS#1, SEC1 \
                 and PKCS#8 PEM are supported): {}",
                path.display(),
                reasons(&e)
            ),
        })
    })
}

/// Loads every certificate of a PEM file (a leaf and its chain, or a CA bundle).
fn load_certs(path: &Path, what: &str) -> Result<Vec<X509>, Error> {
    let pem = read_file(path, what)?;
    let certs = X509::stack_from_pem(&pem).map_err(|e| {
        Error::Tls(format!(
            "the {what} file {} is not a PEM certificate file: {}",
            path.display(),
            reasons(&e)
        ))
    })?;
    if certs.is_empty() {
        return Err(Error::Tls(format!(
            "the {what} file {} holds no certificate (expected -----BEGIN CERTIFICATE-----)",
            path.display()
        )));
    }
    Ok(certs)
}

/// Warns about a certificate this side presents that is outside its validity period (the peer
/// will refuse it; the tests use such certificates on purpose, so it is not refused here).
fn warn_validity(cert: &X509Ref, path: &Path) {
    let Ok(now) = openssl::asn1::Asn1Time::days_from_now(0) else {
        return;
    };
    if cert.not_after() < now {
        log::warn!(
            "the certificate in {} expired on {}; peers will refuse it",
            path.display(),
            cert.not_after()
        );
    } else if cert.not_before() > now {
        log::warn!(
            "the certificate in {} is not valid before {}; peers will refuse it",
            path.display(),
            cert.not_before()
        );
    }
}

/// A key and its certificate chain, as one side presents them.
#[derive(Clone)]
struct Identity {
    key: PKey<Private>,
    chain: Vec<X509>,
    keyfile: PathBuf,
    certfile: PathBuf,
}

impl Identity {
    fn load(keyfile: &Path, certfile: &Path, passphrase: Option<&str>) -> Result<Identity, Error> {
        let key = load_key(keyfile, passphrase)?;
        let chain = load_certs(certfile, "certificate")?;
        warn_validity(&chain[0], certfile);
        let matches = chain[0]
            .public_key()
            .map(|p| p.public_eq(&key))
            .unwrap_or(false);
        if !matches {
            return Err(Error::Tls(format!(
                "the key in {} does not belong to the certificate in {} (the first certificate \
                 of the file must be the one issued for this key)",
                keyfile.display(),
                certfile.display()
            )));
        }
        Ok(Identity {
            key,
            chain,
            keyfile: keyfile.into(),
            certfile: certfile.into(),
        })
    }

    fn install(&self, b: &mut SslContextBuilder) -> Result<(), Error> {
        let fail = |e: ErrorStack| {
            Error::Tls(format!(
                "cannot use the key {} with the certificate {}: {}",
                self.keyfile.display(),
                self.certfile.display(),
                reasons(&e)
            ))
        };
        b.set_private_key(&self.key).map_err(fail)?;
        b.set_certificate(&self.chain[0]).map_err(fail)?;
        for c in &self.chain[1..] {
            b.add_extra_chain_cert(c.clone()).map_err(fail)?;
        }
        b.check_private_key().map_err(fail)
    }
}

/// A trust store holding exactly the certificates of `path` (nothing from the system).
fn ca_store(path: &Path) -> Result<(openssl::x509::store::X509Store, Vec<X509>), Error> {
    let certs = load_certs(path, "CA certificate")?;
    let mut store = X509StoreBuilder::new().map_err(|e| Error::Tls(reasons(&e)))?;
    for c in &certs {
        store.add_cert(c.clone()).map_err(|e| {
            Error::Tls(format!(
                "cannot add the CA certificate from {}: {}",
                path.display(),
                reasons(&e)
            ))
        })?;
    }
    Ok((store.build(), certs))
}

fn common_settings(
    b: &mut SslContextBuilder,
    min: TlsVersion,
    ciphers: &Option<String>,
    suites: &Option<String>,
) -> Result<(), Error> {
    b.set_min_proto_version(Some(min.ssl())).map_err(|e| {
        Error::Tls(format!(
            "cannot set the minimum TLS version: {}",
            reasons(&e)
        ))
    })?;
    // No TLS 1.2 renegotiation, asked for by either peer: OpenSSL answers a HelloRequest or a
    // renegotiating ClientHello with a "no renegotiation" alert and goes on. A peer that started
    // one and never finished it would leave our writes waiting for its handshake. (TLS 1.3 has
    // no renegotiation; its KeyUpdate is not affected.)
    b.set_options(SslOptions::NO_RENEGOTIATION);
    if let Some(c) = ciphers {
        b.set_cipher_list(c).map_err(|e| {
            Error::Tls(format!(
                "the TLS 1.2 cipher list {c:?} selects no usable cipher: {}",
                reasons(&e)
            ))
        })?;
    }
    if let Some(s) = suites {
        b.set_ciphersuites(s).map_err(|e| {
            Error::Tls(format!(
                "the TLS 1.3 cipher suites {s:?} select no usable suite: {}",
                reasons(&e)
            ))
        })?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Server side

/// TLS for a server: its key and certificate and, with [`ca_certs`](Self::ca_certs), the CA
/// that client certificates must be signed by. Give it to
/// [`ServerBuilder::authenticator`](crate::ServerBuilder::authenticator).
///
/// Files are PEM, as the `openssl` command line writes them: RSA, EC and Ed25519 keys in
/// PKCS#1, SEC1 or PKCS#8 form (encrypted ones through
/// [`with_key_passphrase`](Self::with_key_passphrase)); the certificate file may carry the chain
/// (leaf first, then intermediate CAs).
///
/// ```
/// use rpyc::{Service, SslAuthenticator, ThreadedServer};
/// # let pki = rpyc::TestPki::temp()?;
/// # let files = pki.issue("localhost", &["localhost"])?;
/// # let (key, cert, ca) = (files.key, files.cert, pki.ca_cert());
/// let auth = SslAuthenticator::new(&key, &cert)?.ca_certs(&ca);
/// let server = ThreadedServer::new(Service::new("s").method("ping", || "pong"))
///     .port(0)
///     .authenticator(auth)
///     .build()?;
/// let handle = server.spawn()?;
/// # handle.close();
/// # Ok::<(), rpyc::Error>(())
/// ```
#[derive(Clone)]
pub struct SslAuthenticator {
    identity: Identity,
    ca: Option<PathBuf>,
    client_cert: Option<ClientCert>,
    min: TlsVersion,
    ciphers: Option<String>,
    suites: Option<String>,
    acceptor: Arc<OnceLock<Result<SslAcceptor, Error>>>,
}

impl fmt::Debug for SslAuthenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SslAuthenticator")
            .field("keyfile", &self.identity.keyfile)
            .field("certfile", &self.identity.certfile)
            .field("ca", &self.ca)
            .field("client_cert", &self.client_cert_mode())
            .field("min_version", &self.min)
            .finish()
    }
}

impl SslAuthenticator {
    /// Loads the server's key and certificate (chain) from PEM files. Fails with a message
    /// naming the file when one is missing, unreadable, encrypted, or the key does not belong
    /// to the certificate.
    pub fn new(
        keyfile: impl AsRef<Path>,
        certfile: impl AsRef<Path>,
    ) -> Result<SslAuthenticator, Error> {
        Self::load(keyfile.as_ref(), certfile.as_ref(), None)
    }

    /// Like [`new`](Self::new), for a key file encrypted with `passphrase`.
    pub fn with_key_passphrase(
        keyfile: impl AsRef<Path>,
        certfile: impl AsRef<Path>,
        passphrase: &str,
    ) -> Result<SslAuthenticator, Error> {
        Self::load(keyfile.as_ref(), certfile.as_ref(), Some(passphrase))
    }

    fn load(key: &Path, cert: &Path, pass: Option<&str>) -> Result<SslAuthenticator, Error> {
        Ok(SslAuthenticator {
            identity: Identity::load(key, cert, pass)?,
            ca: None,
            client_cert: None,
            min: TlsVersion::Tls12,
            ciphers: None,
            suites: None,
            acceptor: Default::default(),
        })
    }

    fn changed(mut self) -> SslAuthenticator {
        self.acceptor = Default::default();
        self
    }

    /// Clients must present a certificate signed by a CA in `cafile` (PEM, one or more CA
    /// certificates); see [`client_cert`](Self::client_cert) to make it optional. A file that
    /// does not load is reported when the server is built.
    pub fn ca_certs(mut self, cafile: impl AsRef<Path>) -> SslAuthenticator {
        self.ca = Some(cafile.as_ref().into());
        self.changed()
    }

    /// Whether clients are asked for a certificate: [`ClientCert::Required`] by default once a
    /// CA is given, [`ClientCert::None`] without one. Asking needs a CA.
    pub fn client_cert(mut self, mode: ClientCert) -> SslAuthenticator {
        self.client_cert = Some(mode);
        self.changed()
    }

    /// The lowest TLS version accepted: [`TlsVersion::Tls12`] by default.
    pub fn min_version(mut self, v: TlsVersion) -> SslAuthenticator {
        self.min = v;
        self.changed()
    }

    /// The TLS 1.2 cipher list, in OpenSSL's syntax (e.g. `ECDHE+AESGCM`); the default is
    /// Mozilla's "intermediate" list.
    pub fn ciphers(mut self, list: &str) -> SslAuthenticator {
        self.ciphers = Some(list.into());
        self.changed()
    }

    /// The TLS 1.3 cipher suites, in OpenSSL's syntax (e.g. `TLS_AES_256_GCM_SHA384`).
    pub fn ciphersuites(mut self, list: &str) -> SslAuthenticator {
        self.suites = Some(list.into());
        self.changed()
    }

    fn client_cert_mode(&self) -> ClientCert {
        self.client_cert.unwrap_or(if self.ca.is_some() {
            ClientCert::Required
        } else {
            ClientCert::None
        })
    }

    fn acceptor(&self) -> Result<&SslAcceptor, Error> {
        self.acceptor
            .get_or_init(|| self.build())
            .as_ref()
            .map_err(Clone::clone)
    }

    fn build(&self) -> Result<SslAcceptor, Error> {
        let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server())
            .map_err(|e| Error::Tls(format!("cannot set up TLS: {}", reasons(&e))))?;
        common_settings(&mut b, self.min, &self.ciphers, &self.suites)?;
        self.identity.install(&mut b)?;
        let mode = self.client_cert_mode();
        match (&self.ca, mode) {
            (None, ClientCert::None) => b.set_verify(SslVerifyMode::NONE),
            (None, _) => {
                return Err(Error::Tls(
                    "client certificates need a CA to verify them: call ca_certs(...) on the \
                     SslAuthenticator"
                        .into(),
                ))
            }
            (Some(ca), mode) => {
                let (store, certs) = ca_store(ca)?;
                b.set_cert_store(store);
                for c in &certs {
                    // Tells clients which CA's certificate to send.
                    let _ = b.add_client_ca(c);
                }
                b.set_verify(match mode {
                    ClientCert::Required => {
                        SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT
                    }
                    ClientCert::Optional => SslVerifyMode::PEER,
                    ClientCert::None => SslVerifyMode::NONE,
                });
            }
        }
        b.set_session_id_context(b"rpyc")
            .map_err(|e| Error::Tls(reasons(&e)))?;
        // Clients of this crate never resume sessions, so TLS 1.3 session tickets would be
        // made and sent for nothing on every connection.
        b.set_num_tickets(0).map_err(|e| Error::Tls(reasons(&e)))?;
        Ok(b.build())
    }
}

impl Authenticator for SslAuthenticator {
    fn authenticate(&self, socket: TcpStream, timeout: Duration) -> Result<Authenticated, Error> {
        let acceptor = self.acceptor()?;
        let deadline = crate::base::deadline(timeout);
        let peer = peer_of(&socket);
        socket.set_nodelay(true)?;
        socket.set_nonblocking(true)?;
        if plain_rpyc_client(&socket, deadline, timeout, &peer)? {
            return Err(Error::Tls(format!(
                "{peer} sent a plain rpyc hello to this TLS server; it was told to use \
                 rpyc::ssl_connect"
            )));
        }
        let ssl = Ssl::new(acceptor.context()).map_err(|e| Error::Tls(reasons(&e)))?;
        let s = handshake(ssl, socket, Side::Server, deadline, timeout, &peer, None)?;
        let cert = s.ssl().peer_certificate().map(PeerCertificate::new);
        Ok(Authenticated::tls(TlsConn::new(s, Side::Server)?, cert))
    }

    fn check(&self) -> Result<(), Error> {
        self.acceptor().map(|_| ())
    }
}

/// A plain rpyc client on a TLS port sends the hello's magic first; answer it with a refusal
/// that says TLS is required, so the client's error is clear. Returns whether that happened.
///
/// The first byte decides: a TLS ClientHello starts with 0x16, rpyc's hello with `R`. Anything
/// else is left unread for OpenSSL. What starts like the hello is *read* (never only peeked at,
/// which would make every wait for more bytes return at once: a busy loop for the whole
/// handshake timeout), until the 16 bytes are in, the bytes stop matching the magic, or the
/// peer closes.
fn plain_rpyc_client(
    s: &TcpStream,
    deadline: Instant,
    timeout: Duration,
    peer: &str,
) -> Result<bool, Error> {
    use crate::wire::{HELLO_LEN, MAGIC};
    let wait = || {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Error::Timeout(Timeout::Handshake(timeout)));
        }
        sys::wait_fd(s.as_raw_fd(), POLLIN, Some(left))?;
        Ok(())
    };
    let mut first = [0u8; 1];
    loop {
        match s.peek(&mut first) {
            Ok(0) => {
                return Err(Error::Tls(format!(
                    "{peer} closed the connection before the TLS handshake"
                )))
            }
            Ok(_) if first[0] != MAGIC[0] => return Ok(false),
            Ok(_) => break,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => wait()?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::Tls(format!("{peer}: {e}"))),
        }
    }
    let mut head = [0u8; HELLO_LEN];
    let mut got = 0;
    while got < HELLO_LEN {
        match (&*s).read(&mut head[got..]) {
            Ok(0) => {
                return Err(Error::Tls(format!(
                    "{peer} closed the connection after {got} bytes of a plain rpyc hello; this \
                     server only accepts TLS"
                )))
            }
            Ok(n) => {
                got += n;
                let magic = got.min(MAGIC.len());
                if head[..magic] != MAGIC[..magic] {
                    return Err(Error::Tls(format!(
                        "{peer} does not speak TLS: it sent {:?}, neither a TLS ClientHello \
                         nor an rpyc hello",
                        String::from_utf8_lossy(&head[..magic])
                    )));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => wait()?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::Tls(format!("{peer}: {e}"))),
        }
    }
    // The whole hello is read (closing with unread data would reset the connection before the
    // client reads the refusal): answer, and hang up.
    let refusal = crate::wire::Hello {
        version: crate::wire::VERSION,
        flags: crate::wire::FLAG_REFUSED | crate::wire::FLAG_TLS_REQUIRED,
        max_frame: 1024,
        max_queued: 1,
    };
    let _ = s.set_nonblocking(false);
    let _ = s.set_write_timeout(Some(Duration::from_millis(200)));
    let _ = (&*s).write_all(&refusal.encode());
    let _ = s.shutdown(std::net::Shutdown::Both);
    Ok(true)
}

// ---------------------------------------------------------------------------------------------
// Client side

/// TLS for a client: what to present and what to trust. Secure by default: the server's chain
/// is verified against the system's trust store (or only [`ca_certs`](Self::ca_certs) when
/// given) and its certificate must be for the host name connected to (or
/// [`server_hostname`](Self::server_hostname)).
///
/// ```
/// use rpyc::SslClient;
/// # let pki = rpyc::TestPki::temp()?;
/// # let files = pki.issue("localhost", &["localhost"])?;
/// # pki.issue("alice", &[])?;
/// # let auth = rpyc::SslAuthenticator::new(&files.key, &files.cert)?.ca_certs(pki.ca_cert());
/// # let service = rpyc::Service::new("s").method_with_context("whoami", |cx: &rpyc::Context| {
/// #     cx.peer_certificate().and_then(|c| c.common_name()).unwrap_or("").to_string()
/// # });
/// # let server = rpyc::ThreadedServer::new(service).authenticator(auth).build()?.spawn()?;
/// # let (port, dir) = (server.port(), pki.dir());
/// let conn = SslClient::new()
///     .cert_key(dir.join("alice.pem"), dir.join("alice.key"))
///     .ca_certs(dir.join("ca.pem"))
///     .server_hostname("localhost") // the name in its certificate; we dial an IP address
///     .connect("127.0.0.1", port)?;
/// assert_eq!(conn.root().call::<String, _>("whoami", ())?, "alice");
/// # server.close();
/// # Ok::<(), rpyc::Error>(())
/// ```
#[derive(Clone, Default)]
pub struct SslClient {
    cert_key: Option<(PathBuf, PathBuf)>,
    passphrase: Option<String>,
    ca: Option<PathBuf>,
    server_hostname: Option<String>,
    min: TlsVersion,
    ciphers: Option<String>,
    suites: Option<String>,
    dangerous: bool,
    options: Option<Options>,
    /// Built on first use and shared by clones; every setter starts a new one.
    connector: Arc<OnceLock<Result<SslConnector, Error>>>,
}

impl fmt::Debug for SslClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SslClient")
            .field("cert_key", &self.cert_key)
            .field("ca", &self.ca)
            .field("server_hostname", &self.server_hostname)
            .field("min_version", &self.min)
            .field("dangerous_accept_any_server_certificate", &self.dangerous)
            .finish()
    }
}

impl SslClient {
    /// A client that presents no certificate and trusts the system's CAs.
    pub fn new() -> SslClient {
        SslClient::default()
    }

    /// Presents this certificate (chain) and key, for servers that require client
    /// certificates.
    pub fn cert_key(mut self, certfile: impl AsRef<Path>, keyfile: impl AsRef<Path>) -> SslClient {
        self.cert_key = Some((certfile.as_ref().into(), keyfile.as_ref().into()));
        self.connector = Default::default();
        self
    }

    /// The passphrase of an encrypted key file.
    pub fn key_passphrase(mut self, passphrase: &str) -> SslClient {
        self.passphrase = Some(passphrase.into());
        self.connector = Default::default();
        self
    }

    /// Trusts only the CA certificates in `cafile` (PEM) for the server's chain, instead of the
    /// system's trust store.
    pub fn ca_certs(mut self, cafile: impl AsRef<Path>) -> SslClient {
        self.ca = Some(cafile.as_ref().into());
        self.connector = Default::default();
        self
    }

    /// The name the server's certificate must carry (and the SNI sent), when it differs from
    /// the host connected to: an IP address, a tunnel's local end, an alias.
    pub fn server_hostname(mut self, name: &str) -> SslClient {
        self.server_hostname = Some(name.into());
        self.connector = Default::default();
        self
    }

    /// The lowest TLS version accepted: [`TlsVersion::Tls12`] by default.
    pub fn min_version(mut self, v: TlsVersion) -> SslClient {
        self.min = v;
        self.connector = Default::default();
        self
    }

    /// The TLS 1.2 cipher list, in OpenSSL's syntax.
    pub fn ciphers(mut self, list: &str) -> SslClient {
        self.ciphers = Some(list.into());
        self.connector = Default::default();
        self
    }

    /// The TLS 1.3 cipher suites, in OpenSSL's syntax.
    pub fn ciphersuites(mut self, list: &str) -> SslClient {
        self.suites = Some(list.into());
        self.connector = Default::default();
        self
    }

    /// **Dangerous**: accepts any server certificate, from anyone, for any name. The
    /// connection is encrypted but not authenticated, so anyone on the path can read and
    /// change it. For throwaway tests only.
    pub fn dangerous_accept_any_server_certificate(mut self) -> SslClient {
        self.dangerous = true;
        self.connector = Default::default();
        self
    }

    /// Connection options (timeouts, a service to expose, limits) for [`connect`](Self::connect).
    pub fn options(mut self, options: Options) -> SslClient {
        self.options = Some(options);
        self
    }

    /// Connects to `host:port` over TLS and returns a ready connection. Key, certificate and
    /// CA files are read at the first connect of this `SslClient` (and its clones), then reused.
    pub fn connect(&self, host: &str, port: u16) -> Result<Connection, Error> {
        let mut client = self.clone();
        let options = client.options.take().unwrap_or_default();
        options.authenticator(client).connect(host, port)
    }

    fn connector(&self) -> Result<&SslConnector, Error> {
        self.connector
            .get_or_init(|| self.build_connector())
            .as_ref()
            .map_err(Clone::clone)
    }

    fn build_connector(&self) -> Result<SslConnector, Error> {
        let mut b = SslConnector::builder(SslMethod::tls_client())
            .map_err(|e| Error::Tls(format!("cannot set up TLS: {}", reasons(&e))))?;
        common_settings(&mut b, self.min, &self.ciphers, &self.suites)?;
        if let Some(ca) = &self.ca {
            // Replaces the system store: only this CA is trusted.
            b.set_cert_store(ca_store(ca)?.0);
        }
        if let Some((cert, key)) = &self.cert_key {
            Identity::load(key, cert, self.passphrase.as_deref())?.install(&mut b)?;
        }
        if self.dangerous {
            b.set_verify(SslVerifyMode::NONE);
        }
        Ok(b.build())
    }
}

impl ClientAuthenticator for SslClient {
    fn authenticate(
        &self,
        socket: TcpStream,
        host: &str,
        timeout: Duration,
    ) -> Result<Authenticated, Error> {
        let deadline = crate::base::deadline(timeout);
        let connector = self.connector()?;
        let name = self.server_hostname.as_deref().unwrap_or(host);
        let ssl = connector
            .configure()
            .and_then(|c| {
                c.verify_hostname(!self.dangerous)
                    .use_server_name_indication(true)
                    .into_ssl(name)
            })
            .map_err(|e| Error::Tls(format!("cannot set up TLS for {name:?}: {}", reasons(&e))))?;
        let peer = format!(
            "{host}:{}",
            socket.peer_addr().map(|a| a.port()).unwrap_or(0)
        );
        socket.set_nodelay(true)?;
        socket.set_nonblocking(true)?;
        let s = handshake(
            ssl,
            socket,
            Side::Client,
            deadline,
            timeout,
            &peer,
            Some(name),
        )?;
        let cert = s.ssl().peer_certificate().map(PeerCertificate::new);
        Ok(Authenticated::tls(TlsConn::new(s, Side::Client)?, cert))
    }
}

/// Connects to an rpyc server over TLS, verifying the server against the system's trust store
/// and its certificate against `host`; presents `certfile`/`keyfile` when given (servers that
/// require client certificates). For a private CA, another name, or other settings, use
/// [`SslClient`]; to connect often, keep one `SslClient` and call its
/// [`connect`](SslClient::connect): it reads the files and the system's trust store (tens of
/// milliseconds) once, where `ssl_connect` reads them on every call.
///
/// ```no_run
/// let conn = rpyc::ssl_connect("myserver.example", 18821, Some("client.key"), Some("client.pem"))?;
/// let answer: i64 = conn.root().call("add", (1, 2))?;
/// # Ok::<(), rpyc::Error>(())
/// ```
pub fn ssl_connect(
    host: &str,
    port: u16,
    keyfile: Option<&str>,
    certfile: Option<&str>,
) -> Result<Connection, Error> {
    let client = match (keyfile, certfile) {
        (Some(k), Some(c)) => SslClient::new().cert_key(c, k),
        (None, None) => SslClient::new(),
        _ => {
            return Err(Error::Tls(
                "give both keyfile and certfile, or neither".into(),
            ))
        }
    };
    client.connect(host, port)
}

// ---------------------------------------------------------------------------------------------
// The handshake and its failures

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    Client,
    Server,
}

fn peer_of(s: &TcpStream) -> String {
    s.peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "tls peer".into())
}

/// The socket under an SSL object. Its reads and writes never wait (OpenSSL is only ever
/// called with the SSL lock held, which must not be held while waiting); reads come from a
/// buffer filled by one system call per batch of records (OpenSSL alone reads each record's
/// header and body separately), which the connection's reader also fills by waiting on the
/// socket *outside* the SSL lock (see [`TlsConn::fill`]). It also remembers the first bytes
/// read, so a failed handshake can tell a plain rpyc server from a broken TLS one.
pub(crate) struct Sock {
    tcp: TcpStream,
    rbuf: Arc<Mutex<RecvBuf>>,
}

/// Bytes read from the socket and not yet taken by OpenSSL.
pub(crate) struct RecvBuf {
    buf: Box<[u8]>,
    pos: usize,
    end: usize,
    /// The socket reported its end.
    eof: bool,
    first: [u8; 4],
    seen: usize,
}

/// How much one read from the socket may take: four full TLS records.
const SOCK_BUF: usize = 64 * 1024;

impl RecvBuf {
    /// Whether OpenSSL has something to take: bytes, or the end of the stream.
    fn ready(&self) -> bool {
        self.pos < self.end || self.eof
    }

    /// Records what a read of the socket into `buf` returned.
    fn filled(&mut self, n: usize) {
        if self.seen < 4 {
            let k = n.min(4 - self.seen);
            self.first[self.seen..self.seen + k].copy_from_slice(&self.buf[..k]);
            self.seen += k;
        }
        self.pos = 0;
        self.end = n;
        self.eof = n == 0;
    }
}

impl Sock {
    fn new(tcp: TcpStream) -> Sock {
        Sock {
            tcp,
            rbuf: Arc::new(Mutex::new(RecvBuf {
                buf: vec![0; SOCK_BUF].into_boxed_slice(),
                pos: 0,
                end: 0,
                eof: false,
                first: [0; 4],
                seen: 0,
            })),
        }
    }

    /// Whether OpenSSL can make progress reading without the socket.
    fn ready(&self) -> bool {
        lock(&self.rbuf).ready()
    }

    /// Whether the first bytes the peer sent are rpyc's plain hello.
    fn saw_plain_rpyc(&self) -> bool {
        let rb = lock(&self.rbuf);
        rb.seen == 4 && rb.first == crate::wire::MAGIC
    }
}

impl Read for Sock {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        // The reader may hold the buffer while it waits for the socket (without the SSL lock);
        // whoever calls OpenSSL meanwhile must not wait for it.
        let mut rb = match self.rbuf.try_lock() {
            Ok(rb) => rb,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => {
                return Err(io::ErrorKind::WouldBlock.into())
            }
        };
        if rb.pos == rb.end {
            if rb.eof {
                return Ok(0);
            }
            let n = sys::recv_nowait(self.tcp.as_raw_fd(), &mut rb.buf)?;
            rb.filled(n);
        }
        let k = out.len().min(rb.end - rb.pos);
        out[..k].copy_from_slice(&rb.buf[rb.pos..rb.pos + k]);
        rb.pos += k;
        Ok(k)
    }
}

impl Write for Sock {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        sys::send_nowait(self.tcp.as_raw_fd(), buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn handshake(
    ssl: Ssl,
    tcp: TcpStream,
    side: Side,
    deadline: Instant,
    timeout: Duration,
    peer: &str,
    name: Option<&str>,
) -> Result<SslStream<Sock>, Error> {
    let fd = tcp.as_raw_fd();
    let sock = Sock::new(tcp);
    let mut s = SslStream::new(ssl, sock).map_err(|e| Error::Tls(reasons(&e)))?;
    loop {
        let r = match side {
            Side::Server => s.accept(),
            Side::Client => s.connect(),
        };
        let e = match r {
            Ok(()) => return Ok(s),
            Err(e) => e,
        };
        let events = match e.code() {
            ErrorCode::WANT_READ => POLLIN,
            ErrorCode::WANT_WRITE => POLLOUT,
            _ => {
                let why = describe(&e, s.ssl(), s.get_ref(), side, peer, name);
                if side == Side::Server {
                    // Let the client read our alert: closing with its data unread would reset
                    // the connection and the alert could be lost.
                    linger_close(&s.get_ref().tcp);
                }
                return Err(Error::Tls(why));
            }
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Error::Timeout(Timeout::Handshake(timeout)));
        }
        sys::wait_fd(fd, events, Some(left))?;
    }
}

/// Ends our side of a failed connection politely: signals the end of our data, then reads and
/// discards what the peer still sends, for at most a quarter of a second, so the peer reads
/// everything we sent (a TLS alert) instead of a reset.
fn linger_close(tcp: &TcpStream) {
    let _ = tcp.shutdown(std::net::Shutdown::Write);
    let deadline = Instant::now() + Duration::from_millis(250);
    let mut buf = [0u8; 4096];
    // At most 256 KiB: a peer that keeps sending cannot hold this thread past the deadline.
    for _ in 0..64 {
        if Instant::now() >= deadline {
            return;
        }
        match sys::recv_nowait(tcp.as_raw_fd(), &mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() || sys::wait_fd(tcp.as_raw_fd(), POLLIN, Some(left)).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// What check failed on which side, in words a user can act on.
fn describe(
    e: &ssl::Error,
    ssl: &SslRef,
    sock: &Sock,
    side: Side,
    peer: &str,
    name: Option<&str>,
) -> String {
    let reasons: Vec<&str> = e
        .ssl_error()
        .map(|s| s.errors().iter().filter_map(|x| x.reason()).collect())
        .unwrap_or_default();
    let has = |s: &str| reasons.iter().any(|r| r.contains(s));
    let verify = ssl.verify_result();
    if side == Side::Client && sock.saw_plain_rpyc() {
        return format!(
            "{peer} speaks plain rpyc, not TLS: connect with rpyc::connect, or give the server \
             an SslAuthenticator"
        );
    }
    if verify != X509VerifyResult::OK {
        return match side {
            Side::Client => format!(
                "this client rejected the server's certificate: {}{}",
                verify.error_string(),
                server_cert_hint(verify, name)
            ),
            Side::Server => format!(
                "this server rejected the client's certificate: {}{}",
                verify.error_string(),
                client_cert_hint(verify)
            ),
        };
    }
    if let Some(alert) = reasons.iter().find(|r| r.contains("alert")) {
        return match side {
            Side::Client => format!(
                "the server refused the handshake ({alert}){}",
                alert_hint_client(alert)
            ),
            Side::Server => format!("the client refused the handshake ({alert}): it does not accept this server's certificate or settings"),
        };
    }
    if has("peer did not return a certificate") || has("no certificate returned") {
        return "the client sent no certificate, and this server requires one signed by its CA"
            .into();
    }
    if has("unsupported protocol") || has("no protocols available") {
        return format!(
            "no TLS version in common with {peer}: this {} accepts TLS 1.2 or later",
            side_name(side)
        );
    }
    if has("wrong version number") || has("packet length too long") || has("http request") {
        return format!(
            "{peer} does not speak TLS ({}): is it a plain rpyc {}?",
            reasons.join(", "),
            match side {
                Side::Client => "server (use rpyc::connect)",
                Side::Server => "client (use rpyc::ssl_connect)",
            }
        );
    }
    if has("no shared cipher") || has("no suitable signature algorithm") {
        return format!(
            "no cipher or signature algorithm in common with {peer} ({}): check the ciphers \
             settings of both sides",
            reasons.join(", ")
        );
    }
    if reasons.is_empty() || has("unexpected eof") {
        let io = e.io_error().map(|i| format!(" ({i})")).unwrap_or_default();
        return format!(
            "{peer} closed the connection during the TLS handshake{io}: is it a TLS {}, and does \
             it accept us?",
            match side {
                Side::Client => "server",
                Side::Server => "client",
            }
        );
    }
    format!(
        "the TLS handshake with {peer} failed on the {} side: {}",
        side_name(side),
        reasons.join(", ")
    )
}

/// OpenSSL's X509_V_ERR_* codes this module explains (stable across OpenSSL versions).
mod verify_code {
    pub const UNABLE_TO_GET_ISSUER_CERT: i32 = 2;
    pub const CERT_NOT_YET_VALID: i32 = 9;
    pub const CERT_HAS_EXPIRED: i32 = 10;
    pub const DEPTH_ZERO_SELF_SIGNED_CERT: i32 = 18;
    pub const SELF_SIGNED_CERT_IN_CHAIN: i32 = 19;
    pub const UNABLE_TO_GET_ISSUER_CERT_LOCALLY: i32 = 20;
    pub const UNABLE_TO_VERIFY_LEAF_SIGNATURE: i32 = 21;
    pub const HOSTNAME_MISMATCH: i32 = 62;
    pub const IP_ADDRESS_MISMATCH: i32 = 64;
}

fn side_name(side: Side) -> &'static str {
    match side {
        Side::Client => "client",
        Side::Server => "server",
    }
}

fn server_cert_hint(v: X509VerifyResult, name: Option<&str>) -> String {
    match v.as_raw() {
        verify_code::HOSTNAME_MISMATCH | verify_code::IP_ADDRESS_MISMATCH => format!(
            " (it is not issued for {:?}; connect with a name it carries, or set \
             server_hostname(...) to one)",
            name.unwrap_or("")
        ),
        verify_code::CERT_HAS_EXPIRED => {
            " (the server's certificate has expired: renew it, or check this machine's clock)"
                .into()
        }
        verify_code::CERT_NOT_YET_VALID => {
            " (the server's certificate is not valid yet: check both machines' clocks)".into()
        }
        verify_code::UNABLE_TO_GET_ISSUER_CERT_LOCALLY
        | verify_code::UNABLE_TO_GET_ISSUER_CERT
        | verify_code::SELF_SIGNED_CERT_IN_CHAIN
        | verify_code::DEPTH_ZERO_SELF_SIGNED_CERT
        | verify_code::UNABLE_TO_VERIFY_LEAF_SIGNATURE => {
            " (it is not signed by a CA this client trusts: pass the CA that signed it with \
             ca_certs(...), or give the server its full chain)"
                .into()
        }
        _ => String::new(),
    }
}

fn client_cert_hint(v: X509VerifyResult) -> String {
    match v.as_raw() {
        verify_code::CERT_HAS_EXPIRED => " (the client's certificate has expired)".into(),
        verify_code::CERT_NOT_YET_VALID => " (the client's certificate is not valid yet)".into(),
        verify_code::UNABLE_TO_GET_ISSUER_CERT_LOCALLY
        | verify_code::UNABLE_TO_GET_ISSUER_CERT
        | verify_code::SELF_SIGNED_CERT_IN_CHAIN
        | verify_code::DEPTH_ZERO_SELF_SIGNED_CERT
        | verify_code::UNABLE_TO_VERIFY_LEAF_SIGNATURE => {
            " (it is not signed by this server's CA)".into()
        }
        _ => String::new(),
    }
}

fn alert_hint_client(alert: &str) -> &'static str {
    if alert.contains("certificate required") {
        ": it requires a client certificate; pass keyfile and certfile to ssl_connect, or \
         SslClient::cert_key"
    } else if alert.contains("unknown ca") {
        ": it does not trust the CA that signed our client certificate"
    } else if alert.contains("certificate expired") {
        ": our client certificate has expired"
    } else if alert.contains("bad certificate") || alert.contains("certificate unknown") {
        ": it rejected our client certificate (expired, not yet valid, or from another CA)"
    } else if alert.contains("protocol version") {
        ": no TLS version in common; the server needs a newer TLS version"
    } else if alert.contains("handshake failure") {
        ": no cipher or signature algorithm in common"
    } else {
        ""
    }
}

// ---------------------------------------------------------------------------------------------
// The transport: one SSL object shared by a reading and a writing thread

/// A TLS session shared by the connection's read half, write half and control (see the
/// module docs for the locking rules).
pub(crate) struct TlsConn {
    ssl: Mutex<SslStream<Sock>>,
    /// The SSL object's receive buffer, which the reader fills without the SSL lock.
    rbuf: Arc<Mutex<RecvBuf>>,
    fd: RawFd,
    /// Another handle on the socket: shuts it down without taking the SSL lock.
    sock: TcpStream,
    peer: String,
    read_timeout: Mutex<Option<Duration>>,
    closing: AtomicBool,
    /// The first TLS-level failure after the handshake, described (e.g. TLS 1.3's late
    /// "certificate required" alert), for the connection's error message.
    failure: Mutex<Option<String>>,
    side: Side,
}

impl TlsConn {
    fn new(s: SslStream<Sock>, side: Side) -> io::Result<Arc<TlsConn>> {
        let sock = s.get_ref().tcp.try_clone()?;
        // From now on only the reader's wait blocks (outside the SSL lock); everything done
        // with the SSL lock held goes through `Sock`, which never waits.
        sock.set_nonblocking(false)?;
        let fd = s.get_ref().tcp.as_raw_fd();
        let peer = peer_of(&s.get_ref().tcp);
        Ok(Arc::new(TlsConn {
            rbuf: s.get_ref().rbuf.clone(),
            fd,
            sock,
            ssl: Mutex::new(s),
            peer,
            read_timeout: Mutex::new(None),
            closing: AtomicBool::new(false),
            failure: Mutex::new(None),
            side,
        }))
    }

    pub(crate) fn transport(conn: Arc<TlsConn>, write_timeout: Duration) -> Transport {
        Transport {
            reader: Box::new(TlsReader(conn.clone())),
            writer: Box::new(TlsWriter {
                conn: conn.clone(),
                stall: Stall::new(write_timeout),
                committed: false,
            }),
            peer: conn.peer.clone(),
            control: conn,
            credentials: None,
            started: Instant::now(),
        }
    }

    fn failed(&self, e: ssl::Error, doing: &str) -> io::Error {
        if let Some(io) = e.io_error() {
            let io = io::Error::new(io.kind(), io.to_string());
            if doing == "writing" && self.side == Side::Client {
                // A server that refused us may have reset the connection after its alert:
                // the alert may still be readable and says why.
                let mut byte = [0u8; 1];
                let r = lock(&self.ssl).ssl_read(&mut byte);
                if let Err(e) = r {
                    if e.io_error().is_none() && e.code() != ErrorCode::WANT_READ {
                        return self.failed(e, "reading");
                    }
                }
            }
            return io;
        }
        let reasons: Vec<&str> = e
            .ssl_error()
            .map(|s| s.errors().iter().filter_map(|x| x.reason()).collect())
            .unwrap_or_default();
        // In an established TLS 1.2 session, a handshake can only be a renegotiation, which
        // both sides refuse (see `common_settings`): a peer that insists ends with this alert.
        // Say so, rather than blame the ciphers the session was set up with.
        let renegotiation = reasons
            .iter()
            .any(|r| r.contains("alert handshake failure"))
            && lock(&self.ssl).ssl().version2() == Some(SslVersion::TLS1_2);
        let refused_renegotiation = |peer: &str| {
            format!(
                ": the {peer} wanted to renegotiate the TLS 1.2 session, which this {} refuses",
                side_name(self.side)
            )
        };
        let msg = match reasons.iter().find(|r| r.contains("alert")) {
            Some(alert) if self.side == Side::Client => format!(
                "the server refused the connection after the handshake ({alert}){}",
                if renegotiation {
                    refused_renegotiation("server")
                } else {
                    alert_hint_client(alert).to_string()
                }
            ),
            _ => format!(
                "TLS error while {doing} ({} side): {}{}",
                side_name(self.side),
                if reasons.is_empty() {
                    e.to_string()
                } else {
                    reasons.join(", ")
                },
                if renegotiation {
                    refused_renegotiation("client")
                } else {
                    String::new()
                }
            ),
        };
        log::debug!("{}: {msg}", self.peer);
        lock(&self.failure).get_or_insert_with(|| msg.clone());
        io::Error::other(msg)
    }

    /// Waits, without the SSL lock, until the socket is ready for `events` or `timeout`
    /// passes (then `TimedOut`).
    fn wait(&self, events: i16, timeout: Option<Duration>) -> io::Result<()> {
        if self.closing.load(Ordering::Acquire) {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "connection closed",
            ));
        }
        let r = sys::wait_fd(self.fd, events, timeout)?;
        if r == 0 && timeout.is_some() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "TLS wait timed out",
            ));
        }
        Ok(())
    }

    fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        // With nothing decrypted or buffered, wait for the socket first, outside the SSL lock.
        let mut filled = false;
        loop {
            let r = {
                let mut s = lock(&self.ssl);
                if filled || s.ssl().pending() > 0 || s.get_ref().ready() {
                    Some(s.ssl_read(buf))
                } else {
                    None
                }
            };
            let Some(r) = r else {
                self.fill()?;
                filled = true;
                continue;
            };
            let e = match r {
                Ok(n) => return Ok(n),
                Err(e) => e,
            };
            match e.code() {
                ErrorCode::WANT_READ => {
                    self.fill()?;
                    filled = true;
                }
                ErrorCode::WANT_WRITE => self.wait(POLLOUT, *lock(&self.read_timeout))?,
                // A close_notify, or the socket's end without one: the frame layer tells a
                // clean end between frames from a truncated frame.
                ErrorCode::ZERO_RETURN => return Ok(0),
                ErrorCode::SYSCALL if e.io_error().is_none() => return Ok(0),
                _ if self.closing.load(Ordering::Acquire) => return Ok(0),
                _ if is_unexpected_eof(&e) => return Ok(0),
                _ => return Err(self.failed(e, "reading")),
            }
        }
    }

    /// Waits for the socket and reads what it has into the SSL object's buffer, holding only
    /// the buffer (which no other thread needs meanwhile), never the SSL lock: the one place a
    /// TLS connection blocks on input. The socket's read timeout bounds the wait (then
    /// `WouldBlock`); a shutdown from any thread ends it.
    fn fill(&self) -> io::Result<()> {
        if self.closing.load(Ordering::Acquire) {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "connection closed",
            ));
        }
        let mut rb = lock(&self.rbuf);
        if rb.ready() {
            return Ok(());
        }
        let n = loop {
            match (&self.sock).read(&mut rb.buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                r => break r?,
            }
        };
        rb.filled(n);
        Ok(())
    }

    /// Writes a prefix of `buf`; see [`TlsWriter`]'s [`Sink`] implementation.
    fn write(
        &self,
        buf: &[u8],
        until: Option<Instant>,
        stall: &mut Stall,
        committed: &mut bool,
    ) -> io::Result<usize> {
        loop {
            if self.closing.load(Ordering::Acquire) {
                return Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "connection closed",
                ));
            }
            // After WANT_WRITE the same bytes are offered again, as OpenSSL requires.
            let r = lock(&self.ssl).ssl_write(buf);
            let e = match r {
                Ok(n) => {
                    *committed = false;
                    stall.progress();
                    return Ok(n);
                }
                Err(e) => e,
            };
            match e.code() {
                ErrorCode::WANT_WRITE => {
                    // Part of a record may already be out: these bytes must follow.
                    *committed = true;
                    if !stall.wait(self.fd, POLLOUT, until)? {
                        return Ok(0);
                    }
                }
                // Only a handshake message wants input before our data can go (renegotiation
                // is refused on both sides, so this is not expected): the reading thread takes
                // that input, so look again soon, under the same deadlines as for room.
                ErrorCode::WANT_READ => {
                    *committed = true;
                    let slice = Some(Duration::from_millis(5));
                    if !stall.wait_at_most(self.fd, POLLIN, until, slice)? {
                        return Ok(0);
                    }
                }
                ErrorCode::ZERO_RETURN => {
                    return Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "the peer closed the TLS session",
                    ))
                }
                _ => return Err(self.failed(e, "writing")),
            }
        }
    }
}

fn is_unexpected_eof(e: &ssl::Error) -> bool {
    e.ssl_error().is_some_and(|s| {
        s.errors()
            .iter()
            .any(|x| x.reason().is_some_and(|r| r.contains("unexpected eof")))
    })
}

impl Control for TlsConn {
    fn shutdown(&self) {
        if self.closing.swap(true, Ordering::AcqRel) {
            let _ = self.sock.shutdown(std::net::Shutdown::Both);
            return;
        }
        // A polite close_notify if the SSL object is free right now (it is only ever held for
        // one non-blocking call); never wait for it.
        if let Ok(mut s) = self.ssl.try_lock() {
            let _ = s.shutdown();
        }
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
    }

    fn set_read_timeout(&self, d: Option<Duration>) -> io::Result<()> {
        let d = d.filter(|d| !d.is_zero());
        self.sock.set_read_timeout(d)?;
        *lock(&self.read_timeout) = d;
        Ok(())
    }

    fn failure(&self) -> Option<String> {
        lock(&self.failure).clone()
    }
}

struct TlsReader(Arc<TlsConn>);

impl Read for TlsReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

/// The write half: one frame at a time, from the connection's writer.
struct TlsWriter {
    conn: Arc<TlsConn>,
    stall: Stall,
    committed: bool,
}

impl Sink for TlsWriter {
    fn send(&mut self, buf: &[u8], until: Option<Instant>) -> io::Result<usize> {
        self.conn
            .write(buf, until, &mut self.stall, &mut self.committed)
    }

    fn committed(&self) -> bool {
        self.committed
    }
}
