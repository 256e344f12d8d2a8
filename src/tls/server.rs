//! The server side: [`SslAuthenticator`], and the answer to a plain rpyc client that reached a
//! TLS port.

use super::cert::PeerCertificate;
use super::config::{
    ca_store, common_settings, reasons, tls_error, ClientCert, Identity, TlsVersion,
};
use super::handshake::{handshake, peer_of, Side};
use super::session::TlsConn;
use crate::auth::{Authenticated, Authenticator};
use crate::base::sys::{self, POLLIN};
use crate::error::{Error, Timeout, TlsErrorKind};
use openssl::ssl::{Ssl, SslAcceptor, SslMethod, SslVerifyMode};
use std::fmt;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// TLS for a server: its key and certificate and, with [`ca_certs`](Self::ca_certs), the CA
/// that client certificates must be signed by. Give it to
/// [`ServerBuilder::authenticator`](crate::ServerBuilder::authenticator).
///
/// Files are PEM, as the `openssl` command line writes them: RSA, EC and Ed25519 keys in
/// PKCS#1, SEC1 or PKCS#8 form (encrypted ones with [`key_passphrase`](Self::key_passphrase));
/// the certificate file may carry the chain (leaf first, then intermediate CAs). Every file is
/// read and checked when the server is built ([`ServerBuilder::build`](crate::ServerBuilder::build)),
/// which fails with a message naming the file.
///
/// ```
/// use rpyc::{Service, SslAuthenticator, ThreadedServer};
/// # let pki = rpyc::testing::TestPki::temp()?;
/// # let files = pki.issue("localhost", &["localhost"])?;
/// # let (key, cert, ca) = (files.key, files.cert, pki.ca_cert());
/// let auth = SslAuthenticator::new(&key, &cert).ca_certs(&ca);
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
    keyfile: PathBuf,
    certfile: PathBuf,
    passphrase: Option<String>,
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
            .field("keyfile", &self.keyfile)
            .field("certfile", &self.certfile)
            .field("ca", &self.ca)
            .field("client_cert", &self.client_cert_mode())
            .field("min_version", &self.min)
            .finish()
    }
}

impl SslAuthenticator {
    /// TLS with the server's key and certificate (chain), PEM files, as RPyC's
    /// `SSLAuthenticator(keyfile, certfile)`. The files are read when the server is built.
    ///
    /// ```
    /// let auth = rpyc::SslAuthenticator::new("myserver.key", "myserver.cert");
    /// # let _ = auth;
    /// ```
    pub fn new(keyfile: impl AsRef<Path>, certfile: impl AsRef<Path>) -> SslAuthenticator {
        SslAuthenticator {
            keyfile: keyfile.as_ref().into(),
            certfile: certfile.as_ref().into(),
            passphrase: None,
            ca: None,
            client_cert: None,
            min: TlsVersion::Tls12,
            ciphers: None,
            suites: None,
            acceptor: Default::default(),
        }
    }

    /// The passphrase of an encrypted key file.
    ///
    /// ```
    /// let auth = rpyc::SslAuthenticator::new("myserver.key", "myserver.cert")
    ///     .key_passphrase("secret");
    /// # let _ = auth;
    /// ```
    pub fn key_passphrase(mut self, passphrase: &str) -> SslAuthenticator {
        self.passphrase = Some(passphrase.into());
        self.changed()
    }

    fn changed(mut self) -> SslAuthenticator {
        self.acceptor = Default::default();
        self
    }

    /// Clients must present a certificate signed by a CA in `cafile` (PEM, one or more CA
    /// certificates); see [`client_cert`](Self::client_cert) to make it optional.
    ///
    /// ```
    /// let auth = rpyc::SslAuthenticator::new("myserver.key", "myserver.cert").ca_certs("ca.cert");
    /// # let _ = auth;
    /// ```
    pub fn ca_certs(mut self, cafile: impl AsRef<Path>) -> SslAuthenticator {
        self.ca = Some(cafile.as_ref().into());
        self.changed()
    }

    /// Whether clients are asked for a certificate: [`ClientCert::Required`] by default once a
    /// CA is given, [`ClientCert::None`] without one. Asking needs a CA.
    ///
    /// ```
    /// use rpyc::tls::ClientCert;
    /// let auth = rpyc::SslAuthenticator::new("myserver.key", "myserver.cert")
    ///     .ca_certs("ca.cert")
    ///     .client_cert(ClientCert::Optional);
    /// # let _ = auth;
    /// ```
    pub fn client_cert(mut self, mode: ClientCert) -> SslAuthenticator {
        self.client_cert = Some(mode);
        self.changed()
    }

    /// The lowest TLS version accepted: [`TlsVersion::Tls12`] by default.
    ///
    /// ```
    /// let auth = rpyc::SslAuthenticator::new("myserver.key", "myserver.cert")
    ///     .min_version(rpyc::tls::TlsVersion::Tls13);
    /// # let _ = auth;
    /// ```
    pub fn min_version(mut self, v: TlsVersion) -> SslAuthenticator {
        self.min = v;
        self.changed()
    }

    /// The TLS 1.2 cipher list, in OpenSSL's syntax (e.g. `ECDHE+AESGCM`); the default is
    /// Mozilla's "intermediate" list.
    ///
    /// ```
    /// let auth = rpyc::SslAuthenticator::new("k.pem", "c.pem").ciphers("ECDHE+AESGCM");
    /// # let _ = auth;
    /// ```
    pub fn ciphers(mut self, list: &str) -> SslAuthenticator {
        self.ciphers = Some(list.into());
        self.changed()
    }

    /// The TLS 1.3 cipher suites, in OpenSSL's syntax (e.g. `TLS_AES_256_GCM_SHA384`).
    ///
    /// ```
    /// let auth = rpyc::SslAuthenticator::new("k.pem", "c.pem").ciphersuites("TLS_AES_256_GCM_SHA384");
    /// # let _ = auth;
    /// ```
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
        let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server()).map_err(|e| {
            tls_error(
                TlsErrorKind::Other,
                format!("cannot set up TLS: {}", reasons(&e)),
            )
        })?;
        common_settings(&mut b, self.min, &self.ciphers, &self.suites)?;
        Identity::load(&self.keyfile, &self.certfile, self.passphrase.as_deref())?
            .install(&mut b)?;
        let mode = self.client_cert_mode();
        match (&self.ca, mode) {
            (None, ClientCert::None) => b.set_verify(SslVerifyMode::NONE),
            (None, _) => {
                return Err(Error::Misuse(
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
            .map_err(|e| tls_error(TlsErrorKind::Other, reasons(&e)))?;
        // Clients of this crate never resume sessions, so TLS 1.3 session tickets would be
        // made and sent for nothing on every connection.
        b.set_num_tickets(0)
            .map_err(|e| tls_error(TlsErrorKind::Other, reasons(&e)))?;
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
            return Err(tls_error(
                TlsErrorKind::NotTls,
                format!(
                    "{peer} sent a plain rpyc hello to this TLS server; it was told to use \
                     rpyc::ssl_connect"
                ),
            ));
        }
        let ssl = Ssl::new(acceptor.context())
            .map_err(|e| tls_error(TlsErrorKind::Other, reasons(&e)))?;
        let s = handshake(ssl, socket, Side::Server, deadline, timeout, &peer, None)?;
        let cert = s.ssl().peer_certificate().map(PeerCertificate::new);
        Ok(TlsConn::new(s, Side::Server)?.authenticated(cert))
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
    // A reset is the peer going away, as during the handshake.
    let failed = |e: io::Error| match e.kind() {
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => tls_error(
            TlsErrorKind::Closed,
            format!("{peer} closed the connection before the TLS handshake ({e})"),
        ),
        _ => tls_error(TlsErrorKind::Other, format!("{peer}: {e}")),
    };
    let mut first = [0u8; 1];
    loop {
        match s.peek(&mut first) {
            Ok(0) => {
                return Err(tls_error(
                    TlsErrorKind::Closed,
                    format!("{peer} closed the connection before the TLS handshake"),
                ))
            }
            Ok(_) if first[0] != MAGIC[0] => return Ok(false),
            Ok(_) => break,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => wait()?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(failed(e)),
        }
    }
    let mut head = [0u8; HELLO_LEN];
    let mut got = 0;
    while got < HELLO_LEN {
        match (&*s).read(&mut head[got..]) {
            Ok(0) => {
                return Err(tls_error(
                    TlsErrorKind::NotTls,
                    format!(
                        "{peer} closed the connection after {got} bytes of a plain rpyc hello; \
                         this server only accepts TLS"
                    ),
                ))
            }
            Ok(n) => {
                got += n;
                let magic = got.min(MAGIC.len());
                if head[..magic] != MAGIC[..magic] {
                    return Err(tls_error(
                        TlsErrorKind::NotTls,
                        format!(
                            "{peer} does not speak TLS: it sent {:?}, neither a TLS ClientHello \
                             nor an rpyc hello",
                            String::from_utf8_lossy(&head[..magic])
                        ),
                    ));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => wait()?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(failed(e)),
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
