//! The client side: [`SslClient`], what a client presents and trusts.

use super::cert::PeerCertificate;
use super::config::{ca_store, common_settings, reasons, tls_error, Identity, TlsVersion};
use super::handshake::{handshake, Side};
use super::session::TlsConn;
use crate::auth::{Authenticated, ClientAuthenticator};
use crate::error::{Error, TlsErrorKind};
use openssl::ssl::{SslConnector, SslMethod, SslVerifyMode};
use std::fmt;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// TLS for a client: what to present and what to trust. Secure by default: the server's chain
/// is verified against the system's trust store (or only [`ca_certs`](Self::ca_certs) when
/// given) and its certificate must be for the host name connected to (or
/// [`server_hostname`](Self::server_hostname)).
///
/// Give it to [`Options::tls`](crate::Options::tls). Key, certificate and CA files are read
/// and checked at the first connect (errors name the file), then reused by every connect of
/// the same `Options`.
///
/// ```
/// use rpyc::tls::SslClient;
/// # let pki = rpyc::testing::TestPki::temp()?;
/// # let files = pki.issue("localhost", &["localhost"])?;
/// # pki.issue("alice", &[])?;
/// # let auth = rpyc::SslAuthenticator::new(&files.key, &files.cert).ca_certs(pki.ca_cert());
/// # let service = rpyc::Service::new("s").method_with_context("whoami", |cx: &rpyc::Context| {
/// #     cx.peer_certificate().and_then(|c| c.common_name()).unwrap_or("").to_string()
/// # });
/// # let server = rpyc::ThreadedServer::new(service).authenticator(auth).build()?.spawn()?;
/// # let (port, dir) = (server.port(), pki.dir());
/// let tls = SslClient::new()
///     .keyfile(dir.join("alice.key"))
///     .certfile(dir.join("alice.pem"))
///     .ca_certs(dir.join("ca.pem"))
///     .server_hostname("localhost"); // the name in its certificate; we dial an IP address
/// let conn = rpyc::Options::new().tls(tls).connect("127.0.0.1", port)?;
/// assert_eq!(conn.root().call::<String, _>("whoami", ())?, "alice");
/// # server.close();
/// # Ok::<(), rpyc::Error>(())
/// ```
#[derive(Clone, Default)]
pub struct SslClient {
    keyfile: Option<PathBuf>,
    certfile: Option<PathBuf>,
    passphrase: Option<String>,
    ca: Option<PathBuf>,
    server_hostname: Option<String>,
    min: TlsVersion,
    ciphers: Option<String>,
    suites: Option<String>,
    dangerous: bool,
    /// Built on first use and shared by clones; every setter starts a new one.
    connector: Arc<OnceLock<Result<SslConnector, Error>>>,
}

impl fmt::Debug for SslClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SslClient")
            .field("keyfile", &self.keyfile)
            .field("certfile", &self.certfile)
            .field("ca", &self.ca)
            .field("server_hostname", &self.server_hostname)
            .field("min_version", &self.min)
            .field("dangerous_accept_any_server_certificate", &self.dangerous)
            .finish()
    }
}

impl SslClient {
    /// A client that presents no certificate and trusts the system's CAs.
    ///
    /// ```
    /// let tls = rpyc::tls::SslClient::new();
    /// # let _ = tls;
    /// ```
    pub fn new() -> SslClient {
        SslClient::default()
    }

    /// The private key to present (PEM: RSA, EC or Ed25519; PKCS#1, SEC1 or PKCS#8), with
    /// [`certfile`](Self::certfile), for servers that require client certificates.
    ///
    /// ```
    /// let tls = rpyc::tls::SslClient::new().keyfile("client.key").certfile("client.pem");
    /// # let _ = tls;
    /// ```
    pub fn keyfile(mut self, keyfile: impl AsRef<Path>) -> SslClient {
        self.keyfile = Some(keyfile.as_ref().into());
        self.connector = Default::default();
        self
    }

    /// The certificate (chain: leaf first) that goes with [`keyfile`](Self::keyfile).
    ///
    /// ```
    /// let tls = rpyc::tls::SslClient::new().keyfile("client.key").certfile("client.pem");
    /// # let _ = tls;
    /// ```
    pub fn certfile(mut self, certfile: impl AsRef<Path>) -> SslClient {
        self.certfile = Some(certfile.as_ref().into());
        self.connector = Default::default();
        self
    }

    /// The passphrase of an encrypted key file.
    ///
    /// ```
    /// let tls = rpyc::tls::SslClient::new()
    ///     .keyfile("client.key")
    ///     .key_passphrase("secret")
    ///     .certfile("client.pem");
    /// # let _ = tls;
    /// ```
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
    ///
    /// ```
    /// let tls = rpyc::tls::SslClient::new().ciphers("ECDHE+AESGCM");
    /// # let _ = tls;
    /// ```
    pub fn ciphers(mut self, list: &str) -> SslClient {
        self.ciphers = Some(list.into());
        self.connector = Default::default();
        self
    }

    /// The TLS 1.3 cipher suites, in OpenSSL's syntax.
    ///
    /// ```
    /// let tls = rpyc::tls::SslClient::new().ciphersuites("TLS_AES_256_GCM_SHA384");
    /// # let _ = tls;
    /// ```
    pub fn ciphersuites(mut self, list: &str) -> SslClient {
        self.suites = Some(list.into());
        self.connector = Default::default();
        self
    }

    /// **Dangerous**: accepts any server certificate, from anyone, for any name. The
    /// connection is encrypted but not authenticated, so anyone on the path can read and
    /// change it. For throwaway tests only.
    ///
    /// ```
    /// let tls = rpyc::tls::SslClient::new().dangerous_accept_any_server_certificate();
    /// # let _ = tls;
    /// ```
    pub fn dangerous_accept_any_server_certificate(mut self) -> SslClient {
        self.dangerous = true;
        self.connector = Default::default();
        self
    }

    fn connector(&self) -> Result<&SslConnector, Error> {
        self.connector
            .get_or_init(|| self.build_connector())
            .as_ref()
            .map_err(Clone::clone)
    }

    fn build_connector(&self) -> Result<SslConnector, Error> {
        let mut b = SslConnector::builder(SslMethod::tls_client()).map_err(|e| {
            tls_error(
                TlsErrorKind::Other,
                format!("cannot set up TLS: {}", reasons(&e)),
            )
        })?;
        common_settings(&mut b, self.min, &self.ciphers, &self.suites)?;
        if let Some(ca) = &self.ca {
            // Replaces the system store: only this CA is trusted.
            b.set_cert_store(ca_store(ca)?.0);
        }
        match (&self.keyfile, &self.certfile) {
            (Some(key), Some(cert)) => {
                Identity::load(key, cert, self.passphrase.as_deref())?.install(&mut b)?
            }
            (None, None) => {}
            (key, _) => {
                return Err(Error::Misuse(format!(
                    "SslClient has a {} but no {}: give both keyfile and certfile, or neither",
                    if key.is_some() { "keyfile" } else { "certfile" },
                    if key.is_some() { "certfile" } else { "keyfile" },
                )))
            }
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
            .map_err(|e| {
                tls_error(
                    TlsErrorKind::Other,
                    format!("cannot set up TLS for {name:?}: {}", reasons(&e)),
                )
            })?;
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
        Ok(TlsConn::new(s, Side::Client)?.authenticated(cert))
    }
}
