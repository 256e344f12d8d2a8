//! A throwaway certificate authority for tests and demos ([`TestPki`]), made with OpenSSL at
//! run time, so nothing committed can expire under the tests.

use crate::core::service::Service;
use crate::error::{Error, TlsError, TlsErrorKind};
use crate::server::{ServerHandle, ThreadedServer};
use openssl::asn1::{Asn1Integer, Asn1Time};
use openssl::bn::BigNum;
use openssl::ec::{EcGroup, EcKey};
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use openssl::x509::extension::{
    BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectAlternativeName,
};
use openssl::x509::{X509NameBuilder, X509};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// A throwaway certificate authority that writes PEM keys and certificates into a directory:
/// for tests, demos and first steps, **never for production** (its keys sit unencrypted on
/// disk). Certificates are EC P-256, valid from yesterday for ten years unless asked otherwise,
/// and usable by servers and clients alike.
///
/// ```
/// use rpyc::{Service, SslAuthenticator, ThreadedServer};
/// use rpyc::testing::TestPki;
/// use rpyc::tls::SslClient;
///
/// let pki = TestPki::temp()?; // removed when `pki` is dropped
/// let server = pki.issue("localhost", &["localhost", "127.0.0.1"])?;
/// let alice = pki.issue("alice", &[])?;
///
/// let auth = SslAuthenticator::new(&server.key, &server.cert).ca_certs(pki.ca_cert());
/// let service = Service::new("s").method_with_context("whoami", |cx: &rpyc::Context| {
///     cx.peer_certificate().and_then(|c| c.common_name().map(String::from))
/// });
/// let handle = ThreadedServer::new(service).authenticator(auth).build()?.spawn()?;
///
/// let tls = SslClient::new()
///     .ca_certs(pki.ca_cert())
///     .keyfile(&alice.key)
///     .certfile(&alice.cert);
/// let conn = rpyc::Options::new().tls(tls).connect("localhost", handle.port())?;
/// assert_eq!(conn.root().call::<Option<String>, _>("whoami", ())?.as_deref(), Some("alice"));
/// handle.close();
/// # Ok::<(), rpyc::Error>(())
/// ```
pub struct TestPki {
    dir: PathBuf,
    remove_on_drop: bool,
    key: PKey<Private>,
    cert: X509,
    serial: AtomicU32,
}

/// The files of one certificate issued by a [`TestPki`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issued {
    /// The certificate (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM, PKCS#8, unencrypted).
    pub key: PathBuf,
}

impl std::fmt::Debug for TestPki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestPki").field("dir", &self.dir).finish()
    }
}

/// The test CA could not be made ([`TlsErrorKind::Other`]: a failure of OpenSSL or of the
/// file system, not a setting).
fn test_pki_error(message: String) -> Error {
    Error::Tls(TlsError::new(TlsErrorKind::Other, message))
}

fn fail(what: &str) -> impl Fn(openssl::error::ErrorStack) -> Error + '_ {
    move |e| test_pki_error(format!("cannot make the test {what}: {e}"))
}

fn new_key() -> Result<PKey<Private>, Error> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).map_err(fail("key"))?;
    let ec = EcKey::generate(&group).map_err(fail("key"))?;
    PKey::from_ec_key(ec).map_err(fail("key"))
}

fn days_from_now(days: i64) -> Result<Asn1Time, Error> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    Asn1Time::from_unix(now + days * 86_400).map_err(fail("validity"))
}

impl TestPki {
    /// A new CA whose files go into `dir` (created if missing): `ca.pem` and `ca.key`, then
    /// one `NAME.pem` / `NAME.key` pair per [`issue`](Self::issue). The files stay.
    pub fn new(dir: impl AsRef<Path>) -> Result<TestPki, Error> {
        Self::create(dir.as_ref().to_path_buf(), false)
    }

    /// A new CA in a fresh temporary directory, removed with its files when the `TestPki` is
    /// dropped.
    pub fn temp() -> Result<TestPki, Error> {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "rpyc-pki-{}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed),
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0)
        ));
        Self::create(dir, true)
    }

    fn create(dir: PathBuf, remove_on_drop: bool) -> Result<TestPki, Error> {
        std::fs::create_dir_all(&dir).map_err(|e| {
            test_pki_error(format!(
                "cannot create the directory {} for test certificates: {e}",
                dir.display()
            ))
        })?;
        let key = new_key()?;
        let f = fail("CA");
        let mut name = X509NameBuilder::new().map_err(&f)?;
        // A name of its own, so two test CAs are never mistaken for each other.
        let mut tag = [0u8; 4];
        openssl::rand::rand_bytes(&mut tag).map_err(&f)?;
        let cn = format!("rpyc test CA {:08x}", u32::from_be_bytes(tag));
        name.append_entry_by_nid(Nid::COMMONNAME, &cn).map_err(&f)?;
        let name = name.build();
        let mut b = X509::builder().map_err(&f)?;
        b.set_version(2).map_err(&f)?;
        b.set_serial_number(&*serial(1)?).map_err(&f)?;
        b.set_subject_name(&name).map_err(&f)?;
        b.set_issuer_name(&name).map_err(&f)?;
        b.set_pubkey(&key).map_err(&f)?;
        b.set_not_before(&*days_from_now(-1)?).map_err(&f)?;
        b.set_not_after(&*days_from_now(3650)?).map_err(&f)?;
        b.append_extension(
            BasicConstraints::new()
                .critical()
                .ca()
                .build()
                .map_err(&f)?,
        )
        .map_err(&f)?;
        b.append_extension(
            KeyUsage::new()
                .critical()
                .key_cert_sign()
                .crl_sign()
                .build()
                .map_err(&f)?,
        )
        .map_err(&f)?;
        b.sign(&key, MessageDigest::sha256()).map_err(&f)?;
        let cert = b.build();
        let pki = TestPki {
            dir,
            remove_on_drop,
            key,
            cert,
            serial: AtomicU32::new(2),
        };
        pki.write("ca", &pki.key, &pki.cert)?;
        Ok(pki)
    }

    /// The directory the files are in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The CA's certificate file (`ca.pem`): what both sides pass to `ca_certs`.
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// Issues a certificate with common name `name` and the subject alternative names `sans`
    /// (IP addresses become IP entries, anything else a DNS name); writes `name.pem` and
    /// `name.key`. Valid from yesterday for ten years.
    pub fn issue(&self, name: &str, sans: &[&str]) -> Result<Issued, Error> {
        self.issue_valid(name, sans, -1, 3650)
    }

    /// Like [`issue`](Self::issue), valid from `from_days` to `to_days` days from now (negative
    /// for the past): `issue_valid("old", &[], -30, -1)` is expired, `(1, 30)` not yet valid.
    pub fn issue_valid(
        &self,
        name: &str,
        sans: &[&str],
        from_days: i64,
        to_days: i64,
    ) -> Result<Issued, Error> {
        let key = new_key()?;
        let f = fail("certificate");
        let mut subject = X509NameBuilder::new().map_err(&f)?;
        subject
            .append_entry_by_nid(Nid::COMMONNAME, name)
            .map_err(&f)?;
        let subject = subject.build();
        let mut b = X509::builder().map_err(&f)?;
        b.set_version(2).map_err(&f)?;
        b.set_serial_number(&*serial(self.serial.fetch_add(1, Ordering::Relaxed))?)
            .map_err(&f)?;
        b.set_subject_name(&subject).map_err(&f)?;
        b.set_issuer_name(self.cert.subject_name()).map_err(&f)?;
        b.set_pubkey(&key).map_err(&f)?;
        b.set_not_before(&*days_from_now(from_days)?).map_err(&f)?;
        b.set_not_after(&*days_from_now(to_days)?).map_err(&f)?;
        b.append_extension(BasicConstraints::new().build().map_err(&f)?)
            .map_err(&f)?;
        b.append_extension(
            KeyUsage::new()
                .critical()
                .digital_signature()
                .key_agreement()
                .build()
                .map_err(&f)?,
        )
        .map_err(&f)?;
        b.append_extension(
            ExtendedKeyUsage::new()
                .server_auth()
                .client_auth()
                .build()
                .map_err(&f)?,
        )
        .map_err(&f)?;
        if !sans.is_empty() {
            let mut san = SubjectAlternativeName::new();
            for s in sans {
                if s.parse::<std::net::IpAddr>().is_ok() {
                    san.ip(s);
                } else {
                    san.dns(s);
                }
            }
            let ext = san
                .build(&b.x509v3_context(Some(&self.cert), None))
                .map_err(&f)?;
            b.append_extension(ext).map_err(&f)?;
        }
        b.sign(&self.key, MessageDigest::sha256()).map_err(&f)?;
        self.write(name, &key, &b.build())
    }

    fn write(&self, name: &str, key: &PKey<Private>, cert: &X509) -> Result<Issued, Error> {
        let issued = Issued {
            cert: self.dir.join(format!("{name}.pem")),
            key: self.dir.join(format!("{name}.key")),
        };
        let pem = |r: Result<Vec<u8>, openssl::error::ErrorStack>| r.map_err(fail("PEM file"));
        let io = |e: std::io::Error| {
            test_pki_error(format!(
                "cannot write test certificates into {}: {e}",
                self.dir.display()
            ))
        };
        std::fs::write(&issued.key, pem(key.private_key_to_pem_pkcs8())?).map_err(io)?;
        std::fs::write(&issued.cert, pem(cert.to_pem())?).map_err(io)?;
        Ok(issued)
    }
}

fn serial(n: u32) -> Result<Asn1Integer, Error> {
    BigNum::from_u32(n)
        .and_then(|b| b.to_asn1_integer())
        .map_err(fail("serial number"))
}

impl Drop for TestPki {
    fn drop(&mut self) {
        if self.remove_on_drop {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The server the documentation's examples call, on a free port of 127.0.0.1: a service with
/// `add(i64, i64)`, `div(f64, f64)` (an error for a zero divisor), `len(String)`,
/// `sleep(f64)` (seconds), `log(String)` and `new_counter()` (a remote object with
/// `incr(i64)`). For examples and tests only.
///
/// ```
/// let (server, port) = rpyc::testing::example_server()?;
/// let conn = rpyc::connect("127.0.0.1", port)?;
/// assert_eq!(conn.root().call::<i64, _>("add", (1, 2))?, 3);
/// server.close();
/// # Ok::<(), rpyc::Error>(())
/// ```
#[doc(hidden)]
pub fn example_server() -> Result<(ServerHandle, u16), Error> {
    use std::sync::atomic::{AtomicI64, Ordering};
    let service = Service::new("calculator")
        .method("add", |a: i64, b: i64| a + b)
        .method("div", |a: f64, b: f64| -> Result<f64, String> {
            if b == 0.0 {
                Err("division by zero".into())
            } else {
                Ok(a / b)
            }
        })
        .method("len", |s: String| s.len())
        .method("sleep", |s: f64| {
            std::thread::sleep(std::time::Duration::from_secs_f64(s))
        })
        .method("log", |m: String| eprintln!("{m}"))
        .method("new_counter", || {
            let n = std::sync::Arc::new(AtomicI64::new(0));
            Service::new("counter").method("incr", move |by: i64| {
                n.fetch_add(by, Ordering::SeqCst) + by
            })
        });
    let server = ThreadedServer::new(service).build()?.spawn()?;
    let port = server.port();
    Ok((server, port))
}
