//! Servers: [`ThreadedServer`] serves any number of connections, each on its own threads;
//! [`OneShotServer`] serves one connection and stops.
//!
//! The accept loop only accepts: each connection's handshake runs on the connection's own
//! thread, so a slow or silent client never delays another. Every thread a server starts
//! belongs to its thread set, and [`ServerHandle::close`] stops accepting, closes every live
//! connection and joins those threads.

use crate::auth::Authenticator;
use crate::connection::{lock, Connection};
use crate::error::Error;
use crate::options::Options;
use crate::service::Service;
use crate::threads::ThreadSet;
use crate::transport::{self, Transport};
use crate::wire::{self, Hello};
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// How long `close` waits for handlers still running user code before leaving them detached.
const CLOSE_GRACE: Duration = Duration::from_secs(10);

/// A server with a thread per connection (and more per connection while its handlers run
/// concurrently). Start one with [`ThreadedServer::new`].
///
/// ```
/// use rpyc::{Service, ThreadedServer};
/// let service = Service::new("calculator").method("add", |a: i64, b: i64| a + b);
/// let server = ThreadedServer::new(service).hostname("127.0.0.1").port(0).build()?;
/// let port = server.port();
/// let handle = server.spawn()?;
/// let conn = rpyc::connect("127.0.0.1", port)?;
/// assert_eq!(conn.root().call::<i64, _>("add", (1, 2))?, 3);
/// handle.close();
/// # Ok::<(), rpyc::Error>(())
/// ```
#[derive(Debug)]
pub struct ThreadedServer;

impl ThreadedServer {
    /// A builder for a server exposing `service` to every client.
    #[allow(clippy::new_ret_no_self)]
    pub fn new(service: Service) -> ServerBuilder {
        ServerBuilder::new(service, false)
    }
}

/// A server that serves exactly one connection, then stops (e.g. for a parent process that
/// starts one worker). [`Server::start`] returns when that connection ends.
///
/// ```
/// use rpyc::{OneShotServer, Service};
/// let server = OneShotServer::new(Service::new("worker").method("ping", || "pong")).build()?;
/// let port = server.port();
/// let t = std::thread::spawn(move || server.start());
/// let conn = rpyc::connect("127.0.0.1", port)?;
/// assert_eq!(conn.root().call::<String, _>("ping", ())?, "pong");
/// conn.close();
/// t.join().unwrap()?;
/// # Ok::<(), rpyc::Error>(())
/// ```
#[derive(Debug)]
pub struct OneShotServer;

impl OneShotServer {
    /// A builder for a one-connection server exposing `service`.
    #[allow(clippy::new_ret_no_self)]
    pub fn new(service: Service) -> ServerBuilder {
        ServerBuilder::new(service, true)
    }
}

/// Configures a server before it binds; made by [`ThreadedServer::new`] or
/// [`OneShotServer::new`].
///
/// Defaults: host `127.0.0.1` (reachable from this machine only; pass `0.0.0.0` or `::` to
/// listen on all interfaces), port 0 (the system picks a free one; [`Server::port`] tells),
/// at most 256 connections at once, default [`Options`].
///
/// ```
/// let server = rpyc::ThreadedServer::new(rpyc::Service::new("s"))
///     .hostname("::1")
///     .max_connections(8)
///     .build()?;
/// assert_ne!(server.port(), 0);
/// # Ok::<(), rpyc::Error>(())
/// ```
#[derive(Clone)]
pub struct ServerBuilder {
    options: Options,
    authenticator: Option<Arc<dyn Authenticator>>,
    host: String,
    port: u16,
    unix: Option<PathBuf>,
    max_connections: usize,
    one_shot: bool,
}

impl std::fmt::Debug for ServerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerBuilder")
            .field("options", &self.options)
            .field("authenticator", &self.authenticator.is_some())
            .field("host", &self.host)
            .field("port", &self.port)
            .field("unix", &self.unix)
            .field("max_connections", &self.max_connections)
            .field("one_shot", &self.one_shot)
            .finish()
    }
}

impl ServerBuilder {
    fn new(service: Service, one_shot: bool) -> ServerBuilder {
        ServerBuilder {
            options: Options::new().service(service),
            authenticator: None,
            host: "127.0.0.1".into(),
            port: 0,
            unix: None,
            max_connections: 256,
            one_shot,
        }
    }

    /// The address to listen on (a name, an IPv4 or an IPv6 address).
    pub fn hostname(mut self, host: &str) -> ServerBuilder {
        self.host = host.into();
        self
    }

    /// The TCP port; 0 lets the system pick one.
    pub fn port(mut self, port: u16) -> ServerBuilder {
        self.port = port;
        self
    }

    /// Listens on a Unix socket at `path` instead of TCP; the file is removed on close. A stale
    /// socket file (no server answering) is replaced.
    #[cfg(unix)]
    pub fn unix_path(mut self, path: impl Into<PathBuf>) -> ServerBuilder {
        self.unix = Some(path.into());
        self
    }

    /// Most connections served at once; a client over the limit gets a clear refusal.
    pub fn max_connections(mut self, n: usize) -> ServerBuilder {
        self.max_connections = n.max(1);
        self
    }

    /// Settings for every connection (timeouts, limits). The service stays the one given to
    /// `new`.
    pub fn options(mut self, options: Options) -> ServerBuilder {
        let service = self.options.service.clone();
        self.options = options.service(service);
        self
    }

    /// Authenticates every accepted TCP connection before the rpyc handshake: an
    /// [`SslAuthenticator`](crate::SslAuthenticator) for TLS, or your own [`Authenticator`].
    /// It runs on the connection's own thread, bounded by the handshake timeout; a client it
    /// refuses is logged with its address and the reason, and the server goes on serving.
    ///
    /// ```
    /// # let pki = rpyc::TestPki::temp()?;
    /// # let files = pki.issue("localhost", &["localhost"])?;
    /// # let (key, cert, ca) = (files.key, files.cert, pki.ca_cert());
    /// let auth = rpyc::SslAuthenticator::new(&key, &cert)?.ca_certs(&ca);
    /// let server = rpyc::ThreadedServer::new(rpyc::Service::new("s")).authenticator(auth).build()?;
    /// # Ok::<(), rpyc::Error>(())
    /// ```
    pub fn authenticator(mut self, a: impl Authenticator) -> ServerBuilder {
        self.authenticator = Some(Arc::new(a));
        self
    }

    /// Binds the listening socket. Fails if the authenticator's configuration is wrong (e.g.
    /// a CA file that does not load).
    pub fn build(self) -> Result<Server, Error> {
        if let Some(a) = &self.authenticator {
            if self.unix.is_some() {
                return Err(Error::Tls(
                    "authenticators work on TCP servers; remove unix_path or the authenticator"
                        .into(),
                ));
            }
            a.check()?;
        }
        let listener = match &self.unix {
            #[cfg(unix)]
            Some(path) => Listener::Unix(bind_unix(path)?, path.clone()),
            #[cfg(not(unix))]
            Some(_) => unreachable!("unix_path exists only on unix"),
            None => {
                let l = TcpListener::bind((self.host.as_str(), self.port)).map_err(|e| {
                    Error::Connect {
                        addr: format!("{}:{} (bind)", self.host, self.port),
                        source: Arc::new(e),
                    }
                })?;
                Listener::Tcp(l)
            }
        };
        let local = listener.local_addr();
        Ok(Server {
            listener,
            inner: Arc::new(ServerInner {
                options: self.options,
                authenticator: self.authenticator,
                max_connections: self.max_connections,
                one_shot: self.one_shot,
                local,
                closed: AtomicBool::new(false),
                conns: Mutex::new(HashMap::new()),
                next_conn: AtomicU64::new(0),
                active: AtomicUsize::new(0),
                threads: ThreadSet::new(),
                accepting: Mutex::new(false),
                cv: Condvar::new(),
                accept_thread: Mutex::new(None),
                cleaned: Mutex::new(false),
                handshaking: Mutex::new(HashMap::new()),
            }),
        })
    }
}

#[cfg(unix)]
fn bind_unix(path: &std::path::Path) -> Result<std::os::unix::net::UnixListener, Error> {
    use std::os::unix::net::{UnixListener, UnixStream};
    let fail = |e: io::Error| Error::Connect {
        addr: format!("{} (bind)", path.display()),
        source: Arc::new(e),
    };
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(fail(io::Error::new(
                io::ErrorKind::AddrInUse,
                "another server is listening on this socket",
            )));
        }
        std::fs::remove_file(path).map_err(fail)?;
    }
    UnixListener::bind(path).map_err(fail)
}

/// An accepted client: a TCP socket still to be authenticated, or a ready transport.
enum Accepted {
    Tcp(TcpStream, String),
    #[cfg_attr(not(unix), allow(dead_code))]
    Ready(Transport),
}

impl Accepted {
    /// Ends the connection from another thread, during its handshake.
    fn stopper(&self) -> Option<Box<dyn FnOnce() + Send>> {
        match self {
            Accepted::Tcp(s, _) => {
                let s = s.try_clone().ok()?;
                Some(Box::new(move || {
                    let _ = s.shutdown(std::net::Shutdown::Both);
                }))
            }
            Accepted::Ready(t) => {
                let control = t.control.clone();
                Some(Box::new(move || control.shutdown()))
            }
        }
    }

    fn peer(&self) -> &str {
        match self {
            Accepted::Tcp(_, peer) => peer,
            Accepted::Ready(t) => &t.peer,
        }
    }
}

enum Listener {
    Tcp(TcpListener),
    #[cfg(unix)]
    Unix(std::os::unix::net::UnixListener, PathBuf),
}

#[derive(Debug, Clone)]
enum Local {
    Tcp(SocketAddr),
    #[cfg(unix)]
    Unix(PathBuf),
}

impl Listener {
    fn local_addr(&self) -> Local {
        match self {
            Listener::Tcp(l) => Local::Tcp(
                l.local_addr()
                    .unwrap_or_else(|_| SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 0)),
            ),
            #[cfg(unix)]
            Listener::Unix(_, p) => Local::Unix(p.clone()),
        }
    }

    fn accept(&self, write_timeout: Duration) -> io::Result<Accepted> {
        match self {
            Listener::Tcp(l) => {
                let (s, addr) = l.accept()?;
                Ok(Accepted::Tcp(s, addr.to_string()))
            }
            #[cfg(unix)]
            Listener::Unix(l, p) => Ok(Accepted::Ready(transport::unix(
                l.accept()?.0,
                format!("{} (client)", p.display()),
                write_timeout,
            )?)),
        }
    }
}

struct ServerInner {
    options: Options,
    authenticator: Option<Arc<dyn Authenticator>>,
    max_connections: usize,
    one_shot: bool,
    local: Local,
    closed: AtomicBool,
    conns: Mutex<HashMap<u64, Connection>>,
    next_conn: AtomicU64,
    /// Connections accepted and not yet ended, handshakes included.
    active: AtomicUsize,
    threads: Arc<ThreadSet>,
    /// True while the accept loop runs; with `cv`, also signals connection ends.
    accepting: Mutex<bool>,
    cv: Condvar,
    accept_thread: Mutex<Option<JoinHandle<()>>>,
    cleaned: Mutex<bool>,
    /// How to end each connection still in its handshake (authentication included), so that
    /// `close` does not wait out their handshake timeouts.
    handshaking: Mutex<HashMap<u64, Box<dyn FnOnce() + Send>>>,
}

/// A bound server, not yet accepting. Run it with [`start`](Server::start) (blocking) or
/// [`spawn`](Server::spawn) (in the background).
///
/// ```
/// let server = rpyc::ThreadedServer::new(rpyc::Service::new("s")).build()?;
/// let handle = server.handle();
/// let t = std::thread::spawn(move || server.start());
/// handle.close(); // start() returns
/// t.join().unwrap()?;
/// # Ok::<(), rpyc::Error>(())
/// ```
pub struct Server {
    listener: Listener,
    inner: Arc<ServerInner>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("local", &self.inner.local)
            .finish()
    }
}

impl Server {
    /// The TCP port it listens on (0 for a Unix socket).
    pub fn port(&self) -> u16 {
        self.handle().port()
    }

    /// A handle that closes the server from another thread.
    pub fn handle(&self) -> ServerHandle {
        ServerHandle {
            inner: self.inner.clone(),
        }
    }

    /// Accepts and serves connections on this thread until the server is closed (or, for a
    /// [`OneShotServer`], until its connection ends).
    pub fn start(self) -> Result<(), Error> {
        let inner = self.inner.clone();
        // Only a running accept loop makes close() wait for it: a server that is never started
        // (or dropped) must not make close() wait forever.
        *lock(&inner.accepting) = true;
        accept_loop(self.listener, &inner);
        if inner.one_shot {
            // Serve the one connection to its end, unless closed meanwhile.
            let mut accepting = lock(&inner.accepting);
            while !inner.closed.load(Ordering::Acquire) && inner.active.load(Ordering::Acquire) > 0
            {
                accepting = inner.cv.wait(accepting).unwrap_or_else(|e| e.into_inner());
            }
        }
        inner.cleanup();
        Ok(())
    }

    /// Runs [`start`](Server::start) on a background thread; the handle closes it.
    pub fn spawn(self) -> Result<ServerHandle, Error> {
        let handle = self.handle();
        let t = std::thread::Builder::new()
            .name("rpyc-accept".into())
            .spawn(move || {
                let _ = self.start();
            })?;
        *lock(&handle.inner.accept_thread) = Some(t);
        Ok(handle)
    }
}

/// Controls a running server from any thread; cheap to clone.
#[derive(Clone)]
pub struct ServerHandle {
    inner: Arc<ServerInner>,
}

impl std::fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerHandle")
            .field("local", &self.inner.local)
            .finish()
    }
}

impl ServerHandle {
    /// The TCP port the server listens on (0 for a Unix socket).
    pub fn port(&self) -> u16 {
        match &self.inner.local {
            Local::Tcp(a) => a.port(),
            #[cfg(unix)]
            Local::Unix(_) => 0,
        }
    }

    /// Number of connections being served now.
    pub fn connections(&self) -> usize {
        self.inner.active.load(Ordering::Acquire)
    }

    /// Stops accepting, closes every live connection, waits for the server's threads to end
    /// (handlers still running get 10 s), and removes a Unix socket file. Idempotent.
    ///
    /// ```
    /// let handle = rpyc::ThreadedServer::new(rpyc::Service::new("s")).build()?.spawn()?;
    /// handle.close();
    /// assert!(handle.is_closed());
    /// # Ok::<(), rpyc::Error>(())
    /// ```
    pub fn close(&self) {
        let inner = &self.inner;
        if !inner.closed.swap(true, Ordering::AcqRel) {
            inner.wake_acceptor();
        }
        {
            let mut accepting = lock(&inner.accepting);
            while *accepting {
                accepting = inner.cv.wait(accepting).unwrap_or_else(|e| e.into_inner());
            }
        }
        let t = lock(&inner.accept_thread).take();
        if let Some(t) = t {
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
        inner.cleanup();
    }

    /// Whether [`close`](ServerHandle::close) was called.
    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::Acquire)
    }
}

impl ServerInner {
    /// Unblocks the accept call by connecting to ourselves.
    fn wake_acceptor(&self) {
        match &self.local {
            Local::Tcp(a) => {
                let ip = match a.ip() {
                    IpAddr::V4(ip) if ip.is_unspecified() => Ipv4Addr::LOCALHOST.into(),
                    IpAddr::V6(ip) if ip.is_unspecified() => Ipv6Addr::LOCALHOST.into(),
                    ip => ip,
                };
                let _ = TcpStream::connect_timeout(
                    &SocketAddr::new(ip, a.port()),
                    Duration::from_secs(1),
                );
            }
            #[cfg(unix)]
            Local::Unix(p) => {
                let _ = std::os::unix::net::UnixStream::connect(p);
            }
        }
    }

    fn cleanup(&self) {
        let mut cleaned = lock(&self.cleaned);
        if *cleaned {
            return;
        }
        self.closed.store(true, Ordering::Release);
        let handshaking: Vec<_> = lock(&self.handshaking).drain().collect();
        for (_, stop) in handshaking {
            stop();
        }
        let conns: Vec<Connection> = lock(&self.conns).drain().map(|(_, c)| c).collect();
        for c in &conns {
            c.close();
        }
        drop(conns);
        self.threads.join(CLOSE_GRACE);
        #[cfg(unix)]
        if let Local::Unix(p) = &self.local {
            let _ = std::fs::remove_file(p);
        }
        *cleaned = true;
    }
}

fn accept_loop(listener: Listener, inner: &Arc<ServerInner>) {
    let write_timeout = inner.options.call_timeout.max(Duration::from_secs(1));
    while !inner.closed.load(Ordering::Acquire) {
        let a = match listener.accept(write_timeout) {
            Ok(a) => a,
            Err(e) => {
                if inner.closed.load(Ordering::Acquire) {
                    break;
                }
                log::warn!("accept failed: {e}");
                // Out of file descriptors and the like: do not spin.
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if inner.closed.load(Ordering::Acquire) {
            break;
        }
        if inner.active.load(Ordering::Acquire) >= inner.max_connections {
            log::warn!(
                "{}: refused: the server is at its limit of {} connections",
                a.peer(),
                inner.max_connections
            );
            match a {
                // An authenticating client cannot read a plain refusal: just hang up.
                Accepted::Tcp(s, _) if inner.authenticator.is_some() => drop(s),
                Accepted::Tcp(s, _) => {
                    if let Ok(t) = transport::tcp(s, write_timeout) {
                        refuse(t)
                    }
                }
                Accepted::Ready(t) => refuse(t),
            }
            continue;
        }
        inner.active.fetch_add(1, Ordering::AcqRel);
        let me = inner.clone();
        let peer = a.peer().to_string();
        let id = inner.next_conn.fetch_add(1, Ordering::Relaxed);
        if let Some(stop) = a.stopper() {
            lock(&inner.handshaking).insert(id, stop);
        }
        let started = inner.threads.spawn("rpyc-handshake", move || {
            serve_connection(&me, a, write_timeout);
            lock(&me.handshaking).remove(&id);
        });
        if let Err(e) = started {
            log::error!("{peer}: cannot start a thread for the connection: {e}");
            lock(&inner.handshaking).remove(&id);
            inner.connection_ended();
        }
        if inner.one_shot {
            break;
        }
    }
    drop(listener);
    *lock(&inner.accepting) = false;
    inner.cv.notify_all();
}

/// Authenticates the client (if the server has an authenticator), then does the handshake.
fn open_transport(
    inner: &ServerInner,
    a: Accepted,
    write_timeout: Duration,
) -> Result<Transport, Error> {
    match (a, &inner.authenticator) {
        (Accepted::Ready(t), _) => Ok(t),
        (Accepted::Tcp(s, _), None) => Ok(transport::tcp(s, write_timeout)?),
        (Accepted::Tcp(s, peer), Some(auth)) => {
            let timeout = inner.options.handshake_timeout;
            let authed = auth.authenticate(s, timeout).map_err(|e| {
                log::warn!("{peer}: authentication failed: {e}");
                e
            })?;
            Ok(authed.into_transport(write_timeout)?)
        }
    }
}

fn serve_connection(inner: &Arc<ServerInner>, a: Accepted, write_timeout: Duration) {
    let peer = a.peer().to_string();
    let t = match open_transport(inner, a, write_timeout) {
        Ok(t) => t,
        Err(e) => {
            log::debug!("{peer}: connection failed: {e}");
            inner.connection_ended();
            return;
        }
    };
    match Connection::establish(t, &inner.options, inner.threads.clone()) {
        Ok(conn) => {
            let id = inner.next_conn.fetch_add(1, Ordering::Relaxed);
            lock(&inner.conns).insert(id, conn.clone());
            let me = inner.clone();
            conn.on_close(move || {
                let c = lock(&me.conns).remove(&id);
                me.connection_ended();
                drop(c);
            });
            if inner.closed.load(Ordering::Acquire) {
                conn.close();
            }
            log::debug!("{peer}: connected");
        }
        Err(e) => {
            log::warn!("{peer}: connection failed: {e}");
            inner.connection_ended();
        }
    }
}

impl ServerInner {
    fn connection_ended(&self) {
        self.active.fetch_sub(1, Ordering::AcqRel);
        let _guard = lock(&self.accepting);
        self.cv.notify_all();
    }
}

/// Tells a client over the connection limit so in the handshake, then hangs up.
fn refuse(mut t: Transport) {
    let hello = Hello {
        version: wire::VERSION,
        flags: wire::FLAG_REFUSED,
        max_frame: 1024,
        max_queued: 1,
    };
    let _ = t.control.set_read_timeout(Some(Duration::from_millis(200)));
    let _ = t.writer.write_all(&hello.encode());
    let mut theirs = [0u8; wire::HELLO_LEN];
    let _ = t.reader.read_exact(&mut theirs);
    t.control.shutdown();
}
