//! TLS test helpers: a fresh CA per test (made at run time, so nothing can expire), TLS servers
//! that close when dropped, the committed `testdata/tls` set, and a logger that lets tests
//! check what the server logged.

use super::{TestServer, CALL_TIMEOUT};
use rpyc::testing::TestPki;
use rpyc::tls::SslClient;
use rpyc::{Options, ServerBuilder, Service, SslAuthenticator, ThreadedServer};
use std::path::PathBuf;
use std::sync::{Mutex, Once};
use std::time::Duration;

/// The committed key and certificate set (see testdata/tls/README.md).
pub fn testdata(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("testdata/tls")
        .join(name)
}

/// A CA with a server certificate for `localhost` and 127.0.0.1 and a client certificate
/// for "alice".
pub struct Pki {
    pub ca: TestPki,
    pub server: rpyc::testing::Issued,
    pub alice: rpyc::testing::Issued,
}

pub fn pki() -> Pki {
    let ca = TestPki::temp().expect("test CA");
    let server = ca
        .issue("localhost", &["localhost", "127.0.0.1", "::1"])
        .expect("server certificate");
    let alice = ca.issue("alice", &["alice.example"]).expect("client cert");
    Pki { ca, server, alice }
}

impl Pki {
    /// The server side: its certificate, clients verified against the CA.
    pub fn authenticator(&self) -> SslAuthenticator {
        SslAuthenticator::new(&self.server.key, &self.server.cert).ca_certs(self.ca.ca_cert())
    }

    /// TLS trusting the CA and presenting alice's certificate.
    pub fn tls(&self) -> SslClient {
        SslClient::new()
            .ca_certs(self.ca.ca_cert())
            .keyfile(&self.alice.key)
            .certfile(&self.alice.cert)
    }

    /// A client with [`tls`](Self::tls) whose calls time out after [`CALL_TIMEOUT`].
    pub fn client(&self) -> Options {
        Options::new().call_timeout(CALL_TIMEOUT).tls(self.tls())
    }
}

/// Serves `service` over TLS with `auth` on 127.0.0.1; `setup` adds settings to the builder.
pub fn serve_tls(
    service: Service,
    auth: SslAuthenticator,
    setup: impl FnOnce(ServerBuilder) -> ServerBuilder,
) -> TestServer {
    serve_auth(service, auth, setup)
}

/// Serves `service` on 127.0.0.1 behind any authenticator.
pub fn serve_auth(
    service: Service,
    auth: impl rpyc::auth::Authenticator,
    setup: impl FnOnce(ServerBuilder) -> ServerBuilder,
) -> TestServer {
    let builder = ThreadedServer::new(service)
        .hostname("127.0.0.1")
        .port(0)
        .authenticator(auth);
    let handle = setup(builder)
        .build()
        .expect("build the TLS server")
        .spawn()
        .expect("spawn the server");
    let port = handle.port();
    TestServer { handle, port }
}

/// A service that tells the caller who it is (the verified certificate's CN, or "anonymous").
pub fn whoami() -> Service {
    Service::new("ident")
        .method_with_context("whoami", |cx: &rpyc::Context| {
            cx.peer_certificate()
                .and_then(|c| c.common_name().map(String::from))
                .unwrap_or_else(|| "anonymous".into())
        })
        .method("echo", |b: rpyc::Bytes| b)
        .method("add", |a: i64, b: i64| a + b)
}

/// Server settings for TLS tests: calls and handshakes that cannot hang a test.
pub fn server_options(b: ServerBuilder) -> ServerBuilder {
    b.call_timeout(CALL_TIMEOUT)
        .handshake_timeout(Duration::from_secs(5))
}

/// Checks that the server still serves a good client after whatever the test did.
pub fn still_serves(server: &TestServer, pki: &Pki) {
    let conn = pki
        .client()
        .connect("localhost", server.port)
        .expect("a good client connects after the failure");
    assert_eq!(
        conn.root().call::<String, _>("whoami", ()).unwrap(),
        "alice"
    );
    conn.close();
}

/// Every log record of this process, for tests that check what was logged.
pub static LOGS: Mutex<Vec<(log::Level, String)>> = Mutex::new(Vec::new());

struct Capture;

impl log::Log for Capture {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::Level::Info
    }
    fn log(&self, r: &log::Record) {
        if self.enabled(r.metadata()) {
            let line = format!("{}", r.args());
            if std::env::var_os("RPYC_TEST_LOG").is_some() {
                eprintln!("[{}] {line}", r.level());
            }
            LOGS.lock().unwrap().push((r.level(), line));
        }
    }
    fn flush(&self) {}
}

/// Installs the capturing logger (once per test binary).
pub fn capture_logs() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        log::set_boxed_logger(Box::new(Capture)).expect("no other logger");
        log::set_max_level(log::LevelFilter::Info);
    });
}

/// Whether a warning containing every one of `parts` was logged.
///
/// The log is shared by every test of the binary: to check what one connection caused, include
/// its address as the server names it (`format!("{}: ", socket.local_addr()?)`).
pub fn logged(parts: &[&str]) -> bool {
    LOGS.lock()
        .unwrap()
        .iter()
        .any(|(level, line)| *level <= log::Level::Warn && parts.iter().all(|p| line.contains(p)))
}

/// Whether a warning containing every one of `parts` is logged within 5 s.
pub fn wait_logged(parts: &[&str]) -> bool {
    super::wait_until(Duration::from_secs(5), || logged(parts))
}
