//! The certificate a peer presented and this side verified, in the terms a handler decides
//! with (common name, subject, issuer, subject alternative names).

use openssl::x509::X509;
use std::fmt;

/// The certificate a peer presented and this side verified: who the peer is. Handlers get the
/// client's through [`Context::peer_certificate`](crate::Context::peer_certificate); a client
/// gets the server's through [`Connection::peer_certificate`](crate::Connection::peer_certificate).
///
/// ```
/// # let pki = rpyc::testing::TestPki::temp()?;
/// # let files = pki.issue("localhost", &["localhost", "127.0.0.1"])?;
/// # let auth = rpyc::SslAuthenticator::new(&files.key, &files.cert);
/// # let server = rpyc::ThreadedServer::new(rpyc::Service::new("s")).authenticator(auth).build()?.spawn()?;
/// let tls = rpyc::tls::SslClient::new().ca_certs(pki.ca_cert());
/// let conn = rpyc::Options::new().tls(tls).connect("127.0.0.1", server.port())?;
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
    pub(super) fn new(x509: X509) -> PeerCertificate {
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

/// The TLS side of an authenticated stream.
impl crate::auth::Authenticated {
    /// The peer's verified certificate, when this is a TLS connection and the peer sent one.
    ///
    /// ```
    /// # fn f(a: &rpyc::auth::Authenticated) {
    /// if let Some(cert) = a.peer_certificate() {
    ///     println!("{:?}", cert.common_name());
    /// }
    /// # }
    /// ```
    pub fn peer_certificate(&self) -> Option<&PeerCertificate> {
        self.credentials.as_deref()?.downcast_ref()
    }
}
