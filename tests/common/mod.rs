//! Helpers shared by the integration tests: a server on 127.0.0.1 that closes when dropped,
//! clients whose calls time out instead of hanging, and bounded waiting.
#![allow(dead_code)] // each test file uses a different subset

pub mod child;
pub mod procfs;
pub mod pyservice;
pub mod python;
pub mod raw;
pub mod tls;

use rpyc::{Connection, Options, ServerBuilder, ServerHandle, Service, ThreadedServer};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Every call in the tests gives up after this long, so a deadlock fails instead of hanging.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// How long tests wait for something that happens in the background (a release, a oneway).
pub const SETTLE: Duration = Duration::from_secs(5);

/// A running server; closed when dropped, also when a test fails.
pub struct TestServer {
    pub handle: ServerHandle,
    pub port: u16,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.handle.close();
    }
}

/// Serves `service` on a free port of 127.0.0.1.
pub fn serve(service: Service) -> TestServer {
    serve_with(service, |b| b)
}

/// Serves `service`, with `setup` adding settings to the builder (calls already time out
/// after [`CALL_TIMEOUT`]).
pub fn serve_with(
    service: Service,
    setup: impl FnOnce(ServerBuilder) -> ServerBuilder,
) -> TestServer {
    serve_builder(ThreadedServer::new(service), setup)
}

/// Runs the server `builder` makes (a native or a `rpyc::python` one) on a free port of
/// 127.0.0.1, calls timing out after [`CALL_TIMEOUT`], with `setup` adding settings.
pub fn serve_builder(
    builder: ServerBuilder,
    setup: impl FnOnce(ServerBuilder) -> ServerBuilder,
) -> TestServer {
    let builder = builder
        .hostname("127.0.0.1")
        .port(0)
        .call_timeout(CALL_TIMEOUT);
    let handle = setup(builder)
        .build()
        .expect("bind")
        .spawn()
        .expect("spawn the server");
    let port = handle.port();
    TestServer { handle, port }
}

/// Client options: the call timeout above, no service.
pub fn options() -> Options {
    Options::new().call_timeout(CALL_TIMEOUT)
}

/// Connects a client exposing no service.
pub fn connect(server: &TestServer) -> Connection {
    options()
        .connect("127.0.0.1", server.port)
        .expect("connect")
}

/// Connects a client exposing `service` to the server.
pub fn connect_with(server: &TestServer, service: Service) -> Connection {
    options()
        .service(service)
        .connect("127.0.0.1", server.port)
        .expect("connect")
}

/// Polls `cond` until it holds or `timeout` passes; returns whether it held.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits until `cond` holds, failing the test (naming `what`) if it does not within `timeout`.
pub fn expect_within(what: &str, timeout: Duration, cond: impl FnMut() -> bool) {
    assert!(
        wait_until(timeout, cond),
        "timed out after {timeout:?} waiting until {what}"
    );
}

/// Checks that a connection through SSH as `ctx` says carries a call to a fresh server.
pub fn works_through(ctx: &rpyc::SshContext) -> Result<(), rpyc::Error> {
    let server = serve(Service::new("svc").method("add", |a: i64, b: i64| a + b));
    let conn = options()
        .ssh(ctx.clone())
        .connect("127.0.0.1", server.port)?;
    assert_eq!(conn.root().call::<i64, _>("add", (2, 3))?, 5);
    conn.close();
    Ok(())
}

/// Checks that `conn` still carries a call (`add(20, 22)` on a service that has it).
pub fn works(conn: &Connection) {
    assert_eq!(conn.root().call::<i64, _>("add", (20, 22)).unwrap(), 42);
}

/// Sets its flag when dropped: capture one in a closure to observe when the closure is dropped.
pub struct DropGuard(pub Arc<AtomicBool>);

impl DropGuard {
    /// A guard and the flag it sets.
    pub fn new() -> (DropGuard, Arc<AtomicBool>) {
        let flag = Arc::new(AtomicBool::new(false));
        (DropGuard(flag.clone()), flag)
    }
}

impl Drop for DropGuard {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Whether a guard's flag is set.
pub fn dropped(flag: &AtomicBool) -> bool {
    flag.load(Ordering::SeqCst)
}

/// The remote error inside `e`, or a panic naming what came instead.
pub fn remote(e: rpyc::Error) -> rpyc::RemoteError {
    match e {
        rpyc::Error::Remote(r) => r,
        other => panic!("expected Error::Remote, got {other:?}"),
    }
}

/// The TLS error inside `e`, or a panic naming what came instead.
pub fn tls_error(e: &rpyc::Error) -> &rpyc::TlsError {
    match e {
        rpyc::Error::Tls(t) => t,
        other => panic!("expected Error::Tls, got {other:?}"),
    }
}

/// The kind of the TLS error `e` (a panic if it is another error).
pub fn tls_kind(e: &rpyc::Error) -> rpyc::TlsErrorKind {
    tls_error(e).kind()
}

/// The SSH error inside `e`, or a panic naming what came instead.
pub fn ssh_error(e: &rpyc::Error) -> &rpyc::SshError {
    match e {
        rpyc::Error::Ssh(s) => s,
        other => panic!("expected Error::Ssh, got {other:?}"),
    }
}

/// The kind of the SSH error `e` (a panic if it is another error).
pub fn ssh_kind(e: &rpyc::Error) -> rpyc::SshErrorKind {
    ssh_error(e).kind()
}

/// The handshake error inside `e`, or a panic naming what came instead.
pub fn handshake_error(e: &rpyc::Error) -> &rpyc::HandshakeError {
    match e {
        rpyc::Error::Handshake(h) => h,
        other => panic!("expected Error::Handshake, got {other:?}"),
    }
}

/// The kind of the handshake error `e` (a panic if it is another error).
pub fn handshake_kind(e: &rpyc::Error) -> rpyc::HandshakeErrorKind {
    handshake_error(e).kind()
}

/// Holds handlers back until the test opens it (at most 10 s), so closing a server never waits
/// long for a handler a test left waiting.
#[derive(Clone, Default)]
pub struct Gate(Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>);

impl Gate {
    /// Blocks until [`Gate::open`] (or 10 s).
    pub fn wait(&self) {
        let (open, cv) = &*self.0;
        let g = open.lock().unwrap();
        let _ = cv
            .wait_timeout_while(g, Duration::from_secs(10), |open| !*open)
            .unwrap();
    }

    /// Lets every waiter through.
    pub fn open(&self) {
        *self.0 .0.lock().unwrap() = true;
        self.0 .1.notify_all();
    }
}

/// Reads and discards what `s` receives until the peer hangs up (end of stream or a reset,
/// as [`raw::hangs_up_within`] counts them); fails if the peer keeps it open for 5 s.
pub fn wait_for_hang_up(s: &mut std::net::TcpStream) {
    assert!(
        raw::hangs_up_within(s, Duration::from_secs(5)),
        "the peer kept the connection open for 5 s"
    );
}
