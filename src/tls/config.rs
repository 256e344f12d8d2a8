//! What both sides configure: the TLS versions and client-certificate modes, keys and
//! certificates loaded from PEM files (with errors that name the file), trust stores, and the
//! settings common to both sides' OpenSSL contexts.

use crate::error::{Error, TlsError, TlsErrorKind};
use openssl::error::ErrorStack;
use openssl::pkey::{PKey, Private};
use openssl::ssl::{SslContextBuilder, SslOptions, SslVersion};
use openssl::x509::store::X509StoreBuilder;
use openssl::x509::{X509Ref, X509};
use std::path::{Path, PathBuf};

/// The lowest TLS version a side accepts (TLS 1.2 unless raised).
///
/// ```
/// let client = rpyc::tls::SslClient::new().min_version(rpyc::tls::TlsVersion::Tls13);
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
    pub(super) fn ssl(self) -> SslVersion {
        match self {
            TlsVersion::Tls12 => SslVersion::TLS1_2,
            TlsVersion::Tls13 => SslVersion::TLS1_3,
        }
    }
}

/// Whether a server asks clients for a certificate (see [`SslAuthenticator::client_cert`](crate::SslAuthenticator::client_cert)).
///
/// ```
/// # let pki = rpyc::testing::TestPki::temp()?;
/// # let server = pki.issue("localhost", &["localhost"])?;
/// let auth = rpyc::SslAuthenticator::new(&server.key, &server.cert)
///     .ca_certs(pki.ca_cert())
///     .client_cert(rpyc::tls::ClientCert::Optional);
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

// Loading keys and certificates

fn read_file(path: &Path, what: &str) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|e| {
        config_error(format!(
            "cannot read the {what} file {}: {e}; check the path and its permissions",
            path.display()
        ))
    })
}

pub(super) fn tls_error(kind: TlsErrorKind, message: impl Into<String>) -> Error {
    Error::Tls(TlsError::new(kind, message))
}

/// A key, certificate or setting that does not work ([`TlsErrorKind::Config`]).
fn config_error(message: impl Into<String>) -> Error {
    tls_error(TlsErrorKind::Config, message)
}

pub(super) fn reasons(e: &ErrorStack) -> String {
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
        config_error(match (encrypted, passphrase) {
            (true, None) => format!(
                "the key file {} is encrypted; give its passphrase \
                 (key_passphrase on the SslAuthenticator or the SslClient)",
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
        config_error(format!(
            "the {what} file {} is not a PEM certificate file: {}",
            path.display(),
            reasons(&e)
        ))
    })?;
    if certs.is_empty() {
        return Err(config_error(format!(
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
pub(super) struct Identity {
    key: PKey<Private>,
    chain: Vec<X509>,
    keyfile: PathBuf,
    certfile: PathBuf,
}

impl Identity {
    pub(super) fn load(
        keyfile: &Path,
        certfile: &Path,
        passphrase: Option<&str>,
    ) -> Result<Identity, Error> {
        let key = load_key(keyfile, passphrase)?;
        let chain = load_certs(certfile, "certificate")?;
        warn_validity(&chain[0], certfile);
        let matches = chain[0]
            .public_key()
            .map(|p| p.public_eq(&key))
            .unwrap_or(false);
        if !matches {
            return Err(config_error(format!(
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

    pub(super) fn install(&self, b: &mut SslContextBuilder) -> Result<(), Error> {
        let fail = |e: ErrorStack| {
            config_error(format!(
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
pub(super) fn ca_store(path: &Path) -> Result<(openssl::x509::store::X509Store, Vec<X509>), Error> {
    let certs = load_certs(path, "CA certificate")?;
    let mut store =
        X509StoreBuilder::new().map_err(|e| tls_error(TlsErrorKind::Other, reasons(&e)))?;
    for c in &certs {
        store.add_cert(c.clone()).map_err(|e| {
            config_error(format!(
                "cannot add the CA certificate from {}: {}",
                path.display(),
                reasons(&e)
            ))
        })?;
    }
    Ok((store.build(), certs))
}

pub(super) fn common_settings(
    b: &mut SslContextBuilder,
    min: TlsVersion,
    ciphers: &Option<String>,
    suites: &Option<String>,
) -> Result<(), Error> {
    b.set_min_proto_version(Some(min.ssl())).map_err(|e| {
        config_error(format!(
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
            config_error(format!(
                "the TLS 1.2 cipher list {c:?} selects no usable cipher: {}",
                reasons(&e)
            ))
        })?;
    }
    if let Some(s) = suites {
        b.set_ciphersuites(s).map_err(|e| {
            config_error(format!(
                "the TLS 1.3 cipher suites {s:?} select no usable suite: {}",
                reasons(&e)
            ))
        })?;
    }
    Ok(())
}
