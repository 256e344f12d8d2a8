//! The client side: [`SslClient`], what a client presents and trusts.

use super::cert::PeerCertificate;
use super::config::{ca_store, common_settings, reasons, Identity, TlsVersion};
use super::handshake::{handshake, Side};
use super::session::TlsConn;
use crate::auth::{Authenticated, ClientAuthenticator};
use crate::client::Options;
use crate::core::connection::Connection;
use crate::error::Error;
use openssl::ssl::{SslConnector, SslMethod, SslVerifyMode};
use std::fmt;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

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
