//! Servers: [`ThreadedServer`] serves any number of connections, each on its own threads;
//! [`OneShotServer`] serves one connection and stops.
//!
//! The accept loop only accepts: each connection's handshake runs on the connection's own
//! thread, so a slow or silent client never delays another, and that thread then becomes the
//! connection's first worker (unless the service has an `on_connect` hook, which runs there). Every thread a server starts belongs to its thread set, which
//! reuses threads that finished their work for the next connections, and
//! [`ServerHandle::close`] stops accepting, closes every live connection and joins those
//! threads.

use crate::auth::Authenticator;
use crate::base::limits::{ServerBudget, ThreadBudget};
use crate::base::lock;
use crate::base::threads::{ThreadSet, PARKED_THREADS, PARK_FOR};
use crate::core::config::Config;
use crate::core::connection::Connection;
use crate::core::service::Service;
use crate::error::Error;
use crate::transport::{self, Transport};
use crate::wire::{self, Hello};
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long `close` waits for handlers still running user code before leaving them detached.
const CLOSE_GRACE: Duration = Duration::from_secs(10);

/// Raises the process's soft descriptor limit to its hard one, once (see
/// `sys::raise_nofile_limit`): each connection holds a descriptor, and the soft default of
/// 1,024 would stop a server near a thousand clients.
fn raise_descriptor_limit() {
    #[cfg(unix)]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| match crate::base::sys::raise_nofile_limit() {
            Ok((before, after)) if after > before => {
                log::debug!("raised the soft limit on open files from {before} to {after}")
            }
            Ok(_) => {}
            Err(e) => log::warn!("cannot raise the soft limit on open files: {e}"),
        });
    }
}

/// What a server runs on each accepted transport: this crate's native protocol with a
/// [`Service`], or another (Python RPyC's, from the `python` layer above).
pub(crate) trait Protocol: Send + Sync {
    /// Starts a connection on a fresh (authenticated) transport.
    fn establish(
        &self,
        t: Transport,
        config: &Config,
        threads: Arc<ThreadSet>,
    ) -> Result<Started, Error>;
    /// Whether a client of this protocol reads a native hello first, so that the accepting
    /// thread can greet it with ours at once, or tell it that it is refused (a client of
    /// another protocol could not read one: a refused one is just hung up on).
    fn reads_native_hello(&self) -> bool;
    /// What is served, for `Debug`.
    fn describe(&self) -> String;
}

/// A connection just established by a [`Protocol`].
pub(crate) struct Started {
    pub(crate) conn: Arc<dyn Served>,
    /// What the handshake thread becomes once the server has taken the connection in: the
    /// connection's first worker, so that no thread is started for it (`None`: the protocol
    /// started the connection's threads itself).
    pub(crate) then: Option<Box<dyn FnOnce() + Send>>,
}

/// A live connection as its server manages it.
pub(crate) trait Served: Send + Sync {
    fn peer(&self) -> String;
    fn is_closed(&self) -> bool;
    fn close(&self);
    /// Closes it, telling waiting calls `reason`.
    fn terminate(&self, reason: String);
    /// How long it has been idle, if the protocol tracks it.
    fn idle_for(&self) -> Option<Duration>;
    /// Runs `closed` once the connection has closed, then `stopped` once its handlers have
    /// all returned.
    fn on_ended(&self, closed: Box<dyn FnOnce() + Send>, stopped: Box<dyn FnOnce() + Send>);
}

/// The native protocol, serving a [`Service`].
struct Native(Service);

impl Protocol for Native {
    fn establish(
        &self,
        t: Transport,
        config: &Config,
        threads: Arc<ThreadSet>,
    ) -> Result<Started, Error> {
        let (conn, first) =
            Connection::establish_keeping(t, config, self.0.clone(), threads, true)?;
        Ok(Started {
            conn: Arc::new(conn),
            then: first.map(|w| Box::new(move || w.run()) as Box<dyn FnOnce() + Send>),
        })
    }
    fn reads_native_hello(&self) -> bool {
        true
    }
    fn describe(&self) -> String {
        format!("{:?}", self.0)
    }
}

impl Served for Connection {
    fn peer(&self) -> String {
        Connection::peer(self).to_string()
    }
    fn is_closed(&self) -> bool {
        Connection::is_closed(self)
    }
    fn close(&self) {
        Connection::close(self)
    }
    fn terminate(&self, reason: String) {
        self.shared.terminate(reason)
    }
    fn idle_for(&self) -> Option<Duration> {
        self.shared.idle_for()
    }
    fn on_ended(&self, closed: Box<dyn FnOnce() + Send>, stopped: Box<dyn FnOnce() + Send>) {
        let shared = self.shared.clone();
        self.on_close(move || {
            closed();
            crate::core::dispatch::when_stopped(&shared, stopped);
        });
    }
}

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
/// at most 256 connections at once; each connection's timeouts and limits default as for a
/// client ([`Options`](crate::Options)) and are set here.
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
    config: Config,
    protocol: Arc<dyn Protocol>,
    authenticator: Option<Arc<dyn Authenticator>>,
    host: String,
    port: u16,
    unix: Option<PathBuf>,
    max_connections: usize,
    max_handshakes: usize,
    max_threads: usize,
    max_buffered_total: Option<usize>,
    evict_idle_after: Duration,
    one_shot: bool,
}

impl std::fmt::Debug for ServerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerBuilder")
            .field("serves", &self.protocol.describe())
            .field("config", &self.config)
            .field("authenticator", &self.authenticator.is_some())
            .field("host", &self.host)
            .field("port", &self.port)
            .field("unix", &self.unix)
            .field("max_connections", &self.max_connections)
            .field("max_handshakes", &self.max_handshakes)
            .field("max_threads", &self.max_threads)
            .field("max_buffered_total", &self.buffered_total())
            .field("evict_idle_after", &self.evict_idle_after)
            .field("one_shot", &self.one_shot)
            .finish()
    }
}

impl ServerBuilder {
    fn new(service: Service, one_shot: bool) -> ServerBuilder {
        ServerBuilder::serving(Arc::new(Native(service)), one_shot)
    }

    /// A builder for a server running `protocol` on each connection.
    pub(crate) fn serving(protocol: Arc<dyn Protocol>, one_shot: bool) -> ServerBuilder {
        ServerBuilder {
            config: Config::default(),
            protocol,
            authenticator: None,
            host: "127.0.0.1".into(),
            port: 0,
            unix: None,
            max_connections: 256,
            max_handshakes: 64,
            max_threads: 256,
            max_buffered_total: None,
            evict_idle_after: Duration::from_secs(30),
            one_shot,
        }
    }

    fn buffered_total(&self) -> usize {
        let one_frame = self.config.max_frame + crate::base::limits::FRAME_OVERHEAD;
        self.max_buffered_total
            .unwrap_or_else(|| (256 << 20).max(self.config.max_frame.saturating_mul(2)))
            .max(one_frame)
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

    /// Most connections served at once, handshakes in progress included (256 by default).
    /// When all are taken, a new client gets the slot of the connection that has been idle
    /// longest, if one has been idle for [`evict_idle_after`](Self::evict_idle_after);
    /// otherwise it gets a clear refusal.
    pub fn max_connections(mut self, n: usize) -> ServerBuilder {
        self.max_connections = n.max(1);
        self
    }

    /// Most clients in their handshake (authentication included) at once, 64 by default: a
    /// client beyond it is refused. Each handshake ends at the handshake timeout at the latest,
    /// so clients that connect and stay silent (or dribble their hello) can hold these slots
    /// only that long, and never all of `max_connections`.
    ///
    /// ```
    /// let server = rpyc::ThreadedServer::new(rpyc::Service::new("s")).max_handshakes(16).build()?;
    /// # Ok::<(), rpyc::Error>(())
    /// ```
    pub fn max_handshakes(mut self, n: usize) -> ServerBuilder {
        self.max_handshakes = n.max(1);
        self
    }

    /// The slot policy when all connections are taken: a new client takes the slot of the
    /// connection idle longest (no frame either way, nothing in flight), if it has been idle
    /// this long (30 s by default); that connection is closed, with a message saying why.
    /// `Duration::MAX` never closes one: new clients are refused instead.
    ///
    /// ```
    /// use std::time::Duration;
    /// let server = rpyc::ThreadedServer::new(rpyc::Service::new("s"))
    ///     .evict_idle_after(Duration::from_secs(300))
    ///     .build()?;
    /// # Ok::<(), rpyc::Error>(())
    /// ```
    pub fn evict_idle_after(mut self, d: Duration) -> ServerBuilder {
        self.evict_idle_after = d;
        self
    }

    /// Most threads running handlers across all connections, beyond two per connection (one
    /// to read, one to run a request; 256 by default). When they are all busy, requests wait
    /// in their connection's queue ([`max_queued`](Self::max_queued)) for a thread of their own
    /// connection. With the other limits, a server runs at most
    /// `2 x max_connections + max_threads + max_handshakes + 2` threads (and, rarely, one more
    /// per connection finishing a frame whose caller timed out), plus at most 8 that finished
    /// their work and wait up to 2 s to be reused for the next connection's; see the README.
    ///
    /// ```
    /// let server = rpyc::ThreadedServer::new(rpyc::Service::new("s")).max_threads(64).build()?;
    /// # Ok::<(), rpyc::Error>(())
    /// ```
    pub fn max_threads(mut self, n: usize) -> ServerBuilder {
        self.max_threads = n;
        self
    }

    /// Most bytes of client data all connections together hold beyond 1 MiB each (256 MiB or
    /// twice [`max_frame_size`](Self::max_frame_size), whichever is larger, by default; never less than one
    /// largest frame). A connection whose next frame would exceed it is closed with a warning;
    /// each connection may always hold 1 MiB without drawing on it. So the server holds at most
    /// this plus 1 MiB per connection of its clients' data; see [`max_buffered`](Self::max_buffered)
    /// for one connection.
    ///
    /// ```
    /// let server = rpyc::ThreadedServer::new(rpyc::Service::new("s"))
    ///     .max_buffered_total(1 << 30)
    ///     .build()?;
    /// # Ok::<(), rpyc::Error>(())
    /// ```
    pub fn max_buffered_total(mut self, bytes: usize) -> ServerBuilder {
        self.max_buffered_total = Some(bytes);
        self
    }

    /// Default timeout of calls the server's handlers make to their clients (callbacks), and
    /// the stall timeout of every connection; see
    /// [`Options::call_timeout`](crate::Options::call_timeout). 30 s.
    ///
    /// ```
    /// use std::time::Duration;
    /// let server = rpyc::ThreadedServer::new(rpyc::Service::new("s"))
    ///     .call_timeout(Duration::from_secs(5))
    ///     .build()?;
    /// # Ok::<(), rpyc::Error>(())
    /// ```
    pub fn call_timeout(mut self, d: Duration) -> ServerBuilder {
        self.config.call_timeout = d;
        self
    }

    /// How long a client may take, from its connection to the end of the handshake
    /// (authentication included), 10 s; see
    /// [`Options::handshake_timeout`](crate::Options::handshake_timeout).
    ///
    /// ```
    /// let server = rpyc::ThreadedServer::new(rpyc::Service::new("s"))
    ///     .handshake_timeout(std::time::Duration::from_secs(2))
    ///     .build()?;
    /// # Ok::<(), rpyc::Error>(())
    /// ```
    pub fn handshake_timeout(mut self, d: Duration) -> ServerBuilder {
        self.config.handshake_timeout = d;
        self
    }

    /// Largest frame accepted from a client (64 MiB); see
    /// [`Options::max_frame_size`](crate::Options::max_frame_size).
    ///
    /// ```
    /// let server = rpyc::ThreadedServer::new(rpyc::Service::new("s"))
    ///     .max_frame_size(256 << 20)
    ///     .build()?;
    /// # Ok::<(), rpyc::Error>(())
    /// ```
    pub fn max_frame_size(mut self, bytes: usize) -> ServerBuilder {
        self.config.set_max_frame(bytes);
        self
    }

    /// Most bytes of one client's data held at once (twice the largest frame); see
    /// [`Options::max_buffered`](crate::Options::max_buffered) and, for all clients together,
    /// [`max_buffered_total`](Self::max_buffered_total).
    ///
    /// ```
    /// let server = rpyc::ThreadedServer::new(rpyc::Service::new("s"))
    ///     .max_buffered(64 << 20)
    ///     .build()?;
    /// # Ok::<(), rpyc::Error>(())
    /// ```
    pub fn max_buffered(mut self, bytes: usize) -> ServerBuilder {
        self.config.max_buffered = Some(bytes);
        self
    }

    /// Most handlers of one client's requests running at once (64); see
    /// [`Options::max_workers`](crate::Options::max_workers) and, for the whole server,
    /// [`max_threads`](Self::max_threads).
    ///
    /// ```
    /// let server = rpyc::ThreadedServer::new(rpyc::Service::new("s")).max_workers(8).build()?;
    /// # Ok::<(), rpyc::Error>(())
    /// ```
    pub fn max_workers(mut self, n: usize) -> ServerBuilder {
        self.config.set_max_workers(n);
        self
    }

    /// Most requests of one client waiting for a worker (65,536); see
    /// [`Options::max_queued`](crate::Options::max_queued).
    ///
    /// ```
    /// let server = rpyc::ThreadedServer::new(rpyc::Service::new("s")).max_queued(1000).build()?;
    /// # Ok::<(), rpyc::Error>(())
    /// ```
    pub fn max_queued(mut self, n: usize) -> ServerBuilder {
        self.config.set_max_queued(n);
        self
    }

    /// Closes a client's connection after this long without traffic or work in flight (no
    /// limit by default; see [`Options::idle_timeout`](crate::Options::idle_timeout) and the
    /// slot policy, [`evict_idle_after`](Self::evict_idle_after)).
    ///
    /// ```
    /// let server = rpyc::ThreadedServer::new(rpyc::Service::new("s"))
    ///     .idle_timeout(std::time::Duration::from_secs(3600))
    ///     .build()?;
    /// # Ok::<(), rpyc::Error>(())
    /// ```
    pub fn idle_timeout(mut self, d: Duration) -> ServerBuilder {
        self.config.idle_timeout = d;
        self
    }

    /// Authenticates every accepted TCP connection before the rpyc handshake: an
    /// [`SslAuthenticator`](crate::SslAuthenticator) for TLS, or your own [`Authenticator`].
    /// It runs on the connection's own thread, bounded by the handshake timeout; a client it
    /// refuses is logged with its address and the reason, and the server goes on serving.
    ///
    /// ```
    /// # let pki = rpyc::testing::TestPki::temp()?;
    /// # let files = pki.issue("localhost", &["localhost"])?;
    /// # let (key, cert, ca) = (files.key, files.cert, pki.ca_cert());
    /// let auth = rpyc::SslAuthenticator::new(&key, &cert).ca_certs(&ca);
    /// let server = rpyc::ThreadedServer::new(rpyc::Service::new("s")).authenticator(auth).build()?;
    /// # Ok::<(), rpyc::Error>(())
    /// ```
    pub fn authenticator(mut self, a: impl Authenticator) -> ServerBuilder {
        self.authenticator = Some(Arc::new(a));
        self
    }

    /// Binds the listening socket. Fails if the authenticator's configuration is wrong (e.g.
    /// a CA file that does not load). The first server a process builds raises the process's
    /// soft limit on open files to its hard limit (as Go's runtime does): each connection
    /// holds one descriptor (two while its handshake runs, so that closing the server can end
    /// it from another thread).
    pub fn build(self) -> Result<Server, Error> {
        raise_descriptor_limit();
        if let Some(a) = &self.authenticator {
            if self.unix.is_some() {
                return Err(Error::Misuse(
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
        let mut config = self.config.clone();
        config.server_budget = Some(ServerBudget::new(self.buffered_total()));
        config.thread_budget = Some(ThreadBudget::new(self.max_threads));
        Ok(Server {
            listener,
            inner: Arc::new(ServerInner {
                config,
                protocol: self.protocol,
                authenticator: self.authenticator,
                max_connections: self.max_connections,
                max_handshakes: self.max_handshakes,
                evict_idle_after: self.evict_idle_after,
                in_handshake: AtomicUsize::new(0),
                one_shot: self.one_shot,
                local,
                closed: AtomicBool::new(false),
                conns: Mutex::new(HashMap::new()),
                next_conn: AtomicU64::new(0),
                active: AtomicUsize::new(0),
                threads: ThreadSet::reusing(PARKED_THREADS, PARK_FOR),
                accepting: Mutex::new(false),
                cv: Condvar::new(),
                accept_thread: Mutex::new(None),
                cleaned: Mutex::new(false),
                close_grace: Mutex::new(CLOSE_GRACE),
                evicting: Mutex::new(Default::default()),
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

/// An accepted client, before authentication and handshake (both run on its own thread).
enum Accepted {
    Tcp(TcpStream, String),
    #[cfg(unix)]
    Unix(std::os::unix::net::UnixStream, String),
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
            #[cfg(unix)]
            Accepted::Unix(s, _) => {
                let s = s.try_clone().ok()?;
                Some(Box::new(move || {
                    let _ = s.shutdown(std::net::Shutdown::Both);
                }))
            }
        }
    }

    fn peer(&self) -> &str {
        match self {
            Accepted::Tcp(_, peer) => peer,
            #[cfg(unix)]
            Accepted::Unix(_, peer) => peer,
        }
    }

    /// Writes what the socket takes of `hello` without waiting (all of it, on a fresh socket),
    /// and returns how much that was; the handshake writes the rest, and reports any error.
    fn greet(&self, hello: &[u8]) -> usize {
        #[cfg(unix)]
        {
            use std::os::fd::AsRawFd;
            let fd = match self {
                Accepted::Tcp(s, _) => s.as_raw_fd(),
                Accepted::Unix(s, _) => s.as_raw_fd(),
            };
            crate::base::sys::send_nowait(fd, hello).unwrap_or(0)
        }
        #[cfg(not(unix))]
        {
            let _ = hello;
            0
        }
    }

    /// The socket alone, for a refusal.
    #[cfg(unix)]
    fn into_fd(self) -> std::os::fd::OwnedFd {
        match self {
            Accepted::Tcp(s, _) => s.into(),
            Accepted::Unix(s, _) => s.into(),
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

    fn accept(&self) -> io::Result<Accepted> {
        match self {
            Listener::Tcp(l) => {
                let (s, addr) = l.accept()?;
                Ok(Accepted::Tcp(s, addr.to_string()))
            }
            #[cfg(unix)]
            Listener::Unix(l, p) => Ok(Accepted::Unix(
                l.accept()?.0,
                format!("{} (client)", p.display()),
            )),
        }
    }
}

struct ServerInner {
    config: Config,
    protocol: Arc<dyn Protocol>,
    authenticator: Option<Arc<dyn Authenticator>>,
    max_connections: usize,
    max_handshakes: usize,
    evict_idle_after: Duration,
    /// Connections in their handshake (authentication included).
    in_handshake: AtomicUsize,
    one_shot: bool,
    local: Local,
    closed: AtomicBool,
    conns: Mutex<HashMap<u64, Arc<dyn Served>>>,
    next_conn: AtomicU64,
    /// Connections accepted and not yet ended, handshakes included.
    active: AtomicUsize,
    threads: Arc<ThreadSet>,
    /// True while the accept loop runs; with `cv`, also signals connection ends.
    accepting: Mutex<bool>,
    cv: Condvar,
    accept_thread: Mutex<Option<JoinHandle<()>>>,
    cleaned: Mutex<bool>,
    /// Connections being closed to make room (see `evict_idlest`), until they are gone.
    evicting: Mutex<std::collections::HashSet<u64>>,
    /// How long closing waits for handlers (see `ServerHandle::close_timeout`).
    close_grace: Mutex<Duration>,
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
        let grace = *lock(&inner.close_grace);
        inner.cleanup(grace);
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
        self.close_timeout(CLOSE_GRACE);
    }

    /// Like [`close`](ServerHandle::close), waiting at most `grace` for handlers still running
    /// user code (they are left detached after it); returns whether every thread of the
    /// server ended in time. The connections are closed at once either way.
    ///
    /// ```
    /// use std::time::Duration;
    /// let handle = rpyc::ThreadedServer::new(rpyc::Service::new("s")).build()?.spawn()?;
    /// assert!(handle.close_timeout(Duration::from_secs(1)));
    /// # Ok::<(), rpyc::Error>(())
    /// ```
    pub fn close_timeout(&self, grace: Duration) -> bool {
        let inner = &self.inner;
        // The accept thread cleans up when its loop ends: with this grace.
        *lock(&inner.close_grace) = grace;
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
        inner.cleanup(grace)
    }

    /// Like [`close_timeout`](ServerHandle::close_timeout), waiting for handlers still running
    /// until `deadline` (a deadline already past closes without waiting for them); returns
    /// whether every thread of the server ended in time.
    ///
    /// ```
    /// use std::time::{Duration, Instant};
    /// let handle = rpyc::ThreadedServer::new(rpyc::Service::new("s")).build()?.spawn()?;
    /// assert!(handle.close_deadline(Instant::now() + Duration::from_secs(1)));
    /// # Ok::<(), rpyc::Error>(())
    /// ```
    pub fn close_deadline(&self, deadline: Instant) -> bool {
        self.close_timeout(deadline.saturating_duration_since(Instant::now()))
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

    /// Closes everything; returns whether every thread ended within `grace`.
    fn cleanup(&self, grace: Duration) -> bool {
        let mut cleaned = lock(&self.cleaned);
        if *cleaned {
            return self.threads.join(Duration::ZERO);
        }
        self.closed.store(true, Ordering::Release);
        let handshaking: Vec<_> = lock(&self.handshaking).drain().collect();
        for (_, stop) in handshaking {
            stop();
        }
        let conns: Vec<Arc<dyn Served>> = lock(&self.conns).drain().map(|(_, c)| c).collect();
        for c in &conns {
            c.close();
        }
        drop(conns);
        let joined = self.threads.join(grace);
        #[cfg(unix)]
        if let Local::Unix(p) = &self.local {
            let _ = std::fs::remove_file(p);
        }
        *cleaned = true;
        joined
    }
}

/// While a server is out of file descriptors, how often it says so again.
const STARVED_WARNING_EVERY: Duration = Duration::from_secs(10);
/// A shortage of descriptors that lasted this long is reported over when it is (shorter ones,
/// e.g. a server at its limit flapping as descriptors come and go, only at debug level).
const STARVED_REPORTED_AFTER: Duration = Duration::from_secs(1);

fn accept_loop(listener: Listener, inner: &Arc<ServerInner>) {
    let refusals = Refusals::default();
    // Since when accepting has failed for want of descriptors; when that was last said.
    let mut starved: Option<Instant> = None;
    let mut warned: Option<Instant> = None;
    while !inner.closed.load(Ordering::Acquire) {
        let a = match listener.accept() {
            Ok(a) => a,
            Err(e) => {
                if inner.closed.load(Ordering::Acquire) {
                    break;
                }
                if e.raw_os_error() == Some(libc::EMFILE) || e.raw_os_error() == Some(libc::ENFILE)
                {
                    let now = Instant::now();
                    let since = *starved.get_or_insert(now);
                    if warned.map_or(true, |w| now.duration_since(w) >= STARVED_WARNING_EVERY) {
                        warned = Some(now);
                        log::warn!(
                            "accept failed: {e}: this process is out of file descriptors (for \
                             {:.1?}); new clients wait unanswered until connections close; raise \
                             its limit (ulimit -n) or lower max_connections",
                            now.duration_since(since)
                        );
                    }
                } else {
                    log::warn!("accept failed: {e}");
                }
                // Out of file descriptors and the like: do not spin.
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if let Some(since) = starved.take() {
            let (lasted, what) = (
                since.elapsed(),
                "accepting connections again after being out of file descriptors for",
            );
            if lasted >= STARVED_REPORTED_AFTER {
                log::info!("{what} {lasted:.1?}");
            } else {
                log::debug!("{what} {lasted:.1?}");
            }
        }
        if inner.closed.load(Ordering::Acquire) {
            break;
        }
        if let Err(why) = inner.admit() {
            log::warn!("{}: refused: {why}", a.peer());
            // An authenticating client cannot read a plain refusal: just hang up.
            let tell = inner.authenticator.is_none() && inner.protocol.reads_native_hello();
            refusals.refuse(inner, a, tell);
            continue;
        }
        // Our hello goes out now rather than from the handshake thread, once it runs: the
        // client, which waits for it, is one thread hand-off sooner connected. Not through an
        // authenticator, whose own handshake comes first.
        let hello_sent = if inner.authenticator.is_none() && inner.protocol.reads_native_hello() {
            a.greet(&crate::core::connection::our_hello(&inner.config).encode())
        } else {
            0
        };
        let me = inner.clone();
        let peer = a.peer().to_string();
        let id = inner.next_conn.fetch_add(1, Ordering::Relaxed);
        if let Some(stop) = a.stopper() {
            lock(&inner.handshaking).insert(id, stop);
        }
        let at = Instant::now();
        let started = inner.threads.spawn("rpyc-handshake", move || {
            let then = serve_connection(&me, a, at, hello_sent);
            lock(&me.handshaking).remove(&id);
            drop(me);
            if let Some(serve) = then {
                crate::base::threads::rename_current("rpyc-worker");
                serve();
            }
        });
        if let Err(e) = started {
            log::error!("{peer}: cannot start a thread for the connection: {e}");
            lock(&inner.handshaking).remove(&id);
            inner.in_handshake.fetch_sub(1, Ordering::AcqRel);
            inner.connection_ended();
        }
        if inner.one_shot {
            break;
        }
    }
    drop(listener);
    refusals.stop();
    *lock(&inner.accepting) = false;
    inner.cv.notify_all();
}

/// Authenticates the client (if the server has an authenticator), then does the handshake;
/// `hello_sent` bytes of our hello were already written.
fn open_transport(
    inner: &ServerInner,
    a: Accepted,
    at: Instant,
    hello_sent: usize,
) -> Result<Transport, Error> {
    let write_timeout = inner.config.write_timeout();
    let mut t = match (a, &inner.authenticator) {
        #[cfg(unix)]
        (Accepted::Unix(s, peer), _) => transport::unix(s, peer, write_timeout)?,
        (Accepted::Tcp(s, _), None) => transport::tcp(s, write_timeout)?,
        (Accepted::Tcp(s, peer), Some(auth)) => {
            let timeout = inner.config.handshake_timeout;
            let authed = auth.authenticate(s, timeout).map_err(|e| {
                log::warn!("{peer}: authentication failed: {e}");
                e
            })?;
            authed.into_transport(write_timeout)?
        }
    };
    // The handshake timeout counts from the accept, authentication included.
    t.started = at;
    t.hello_sent = hello_sent;
    Ok(t)
}

/// Returns what the calling (handshake) thread does next for the connection, if anything.
fn serve_connection(
    inner: &Arc<ServerInner>,
    a: Accepted,
    at: Instant,
    hello_sent: usize,
) -> Option<Box<dyn FnOnce() + Send>> {
    let peer = a.peer().to_string();
    let established = open_transport(inner, a, at, hello_sent).and_then(|t| {
        inner
            .protocol
            .establish(t, &inner.config, inner.threads.clone())
    });
    inner.in_handshake.fetch_sub(1, Ordering::AcqRel);
    match established {
        Ok(Started { conn, then }) => {
            let id = inner.next_conn.fetch_add(1, Ordering::Relaxed);
            lock(&inner.conns).insert(id, conn.clone());
            let me = inner.clone();
            let slot = inner.clone();
            conn.on_ended(
                Box::new(move || {
                    let c = lock(&me.conns).remove(&id);
                    lock(&me.evicting).remove(&id);
                    drop(c);
                }),
                // The slot is free once the connection's handlers have all returned.
                Box::new(move || slot.connection_ended()),
            );
            if inner.closed.load(Ordering::Acquire) {
                conn.close();
            }
            log::debug!("{peer}: connected");
            then
        }
        Err(e) => {
            log::warn!("{peer}: connection failed: {e}");
            inner.connection_ended();
            None
        }
    }
}

impl ServerInner {
    /// Takes a slot for a new client (see `max_connections` and `max_handshakes`), or says why
    /// not.
    fn admit(&self) -> Result<(), String> {
        if self.in_handshake.load(Ordering::Acquire) >= self.max_handshakes {
            return Err(format!(
                "{} clients are in their handshake already (ServerBuilder::max_handshakes)",
                self.max_handshakes
            ));
        }
        if self.active.load(Ordering::Acquire) >= self.max_connections && !self.evict_idlest() {
            return Err(format!(
                "the server is at its limit of {} connections and none has been idle for {:?} \
                 (ServerBuilder::max_connections, evict_idle_after)",
                self.max_connections, self.evict_idle_after
            ));
        }
        self.active.fetch_add(1, Ordering::AcqRel);
        self.in_handshake.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// Closes the connection idle longest, if it has been idle long enough; returns whether
    /// one was. The connection is closed on a thread of its own (its service's `on_disconnect`
    /// and the drops of its objects are user code, which must not hold up accepting).
    fn evict_idlest(&self) -> bool {
        let conns: Vec<(u64, Arc<dyn Served>)> = lock(&self.conns)
            .iter()
            .map(|(id, c)| (*id, c.clone()))
            .collect();
        let evicting = lock(&self.evicting).clone();
        let victim = conns
            .into_iter()
            .filter(|(id, c)| !evicting.contains(id) && !c.is_closed())
            .filter_map(|(id, c)| Some((c.idle_for()?, id, c)))
            .filter(|(idle, _, _)| *idle >= self.evict_idle_after)
            .max_by_key(|(idle, _, _)| *idle);
        let Some((idle, id, conn)) = victim else {
            return false;
        };
        log::info!(
            "{}: closing the connection to make room for a new client: idle for {idle:?} \
             (max_connections {})",
            conn.peer(),
            self.max_connections
        );
        let reason = format!(
            "the server needed this connection's slot for a new client: it had been idle for \
             {idle:?} (the server's max_connections is {})",
            self.max_connections
        );
        lock(&self.evicting).insert(id);
        let closing = conn.clone();
        if self
            .threads
            .spawn("rpyc-evict", move || closing.terminate(reason.clone()))
            .is_err()
        {
            conn.close();
        }
        true
    }

    fn connection_ended(&self) {
        self.active.fetch_sub(1, Ordering::AcqRel);
        let _guard = lock(&self.accepting);
        self.cv.notify_all();
    }
}

/// How long a refused client is given to read the refusal before its socket is closed.
const REFUSAL_LINGER: Duration = Duration::from_millis(200);
/// Most refused clients waiting for their socket to be closed; beyond it they are dropped at
/// once.
const MAX_REFUSALS: usize = 64;

/// Refusals, off the accept thread: one thread (started on the first refusal) answers each
/// refused client with a hello that says so, then keeps its socket for at most
/// [`REFUSAL_LINGER`] to read the client's own hello (closing with unread data would reset the
/// connection before the client reads why), many clients at once.
#[derive(Default)]
struct Refusals {
    tx: Mutex<Option<crossbeam_channel::Sender<std::os::fd::OwnedFd>>>,
}

impl Refusals {
    fn refuse(&self, inner: &ServerInner, a: Accepted, tell: bool) {
        if !tell {
            return; // dropped: closed at once
        }
        let mut tx = lock(&self.tx);
        if tx.is_none() {
            let (t, rx) = crossbeam_channel::bounded(MAX_REFUSALS);
            if let Err(e) = inner.threads.spawn("rpyc-refuser", move || refuser(rx)) {
                log::error!("cannot start the thread that answers refused clients: {e}");
                return;
            }
            *tx = Some(t);
        }
        if let Some(tx) = tx.as_ref() {
            // Full: too many refusals at once; this one is closed without an answer.
            let _ = tx.try_send(a.into_fd());
        }
    }

    fn stop(&self) {
        lock(&self.tx).take();
    }
}

fn refuser(rx: crossbeam_channel::Receiver<std::os::fd::OwnedFd>) {
    use crate::base::sys::{self, PollFd, POLLIN};
    use std::os::fd::AsRawFd;
    let refusal = Hello {
        version: wire::VERSION,
        flags: wire::FLAG_REFUSED,
        max_frame: 1024,
        max_queued: 1,
    }
    .encode();
    let mut open: Vec<(std::os::fd::OwnedFd, std::time::Instant)> = Vec::new();
    let mut scratch = [0u8; 4096];
    loop {
        // At most MAX_REFUSALS sockets at once: beyond, the channel fills and the accept loop
        // closes new refusals at once.
        let next = if open.len() >= MAX_REFUSALS {
            Err(crossbeam_channel::RecvTimeoutError::Timeout)
        } else if open.is_empty() {
            rx.recv()
                .map_err(|_| crossbeam_channel::RecvTimeoutError::Disconnected)
        } else {
            rx.try_recv().map_err(|e| match e {
                crossbeam_channel::TryRecvError::Empty => {
                    crossbeam_channel::RecvTimeoutError::Timeout
                }
                crossbeam_channel::TryRecvError::Disconnected => {
                    crossbeam_channel::RecvTimeoutError::Disconnected
                }
            })
        };
        match next {
            Ok(fd) => {
                // 16 bytes always fit in a fresh socket's buffer.
                let _ = sys::send_nowait(fd.as_raw_fd(), &refusal);
                let _ = sys::shutdown_write(fd.as_raw_fd());
                open.push((fd, std::time::Instant::now() + REFUSAL_LINGER));
                continue;
            }
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) if open.is_empty() => return,
            Err(_) => {}
        }
        let now = std::time::Instant::now();
        open.retain(|(_, until)| *until > now);
        if open.is_empty() {
            continue;
        }
        let wait = open
            .iter()
            .map(|(_, until)| until.saturating_duration_since(now))
            .min()
            .unwrap_or_default()
            .min(Duration::from_millis(10));
        let mut fds: Vec<PollFd> = open
            .iter()
            .map(|(fd, _)| PollFd::new(fd.as_raw_fd(), POLLIN))
            .collect();
        if sys::poll(&mut fds, Some(wait)).is_err() {
            continue;
        }
        let mut done = vec![false; open.len()];
        for (i, p) in fds.iter().enumerate() {
            if p.revents == 0 {
                continue;
            }
            // Read what the client sent (at most 64 KiB a round: a client that keeps sending
            // cannot hold this thread); its end (or an error) means it has our answer.
            for _ in 0..16 {
                match sys::recv_nowait(p.fd, &mut scratch) {
                    Ok(0) => {
                        done[i] = true;
                        break;
                    }
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => {
                        done[i] = true;
                        break;
                    }
                }
            }
        }
        let mut i = 0;
        open.retain(|_| {
            i += 1;
            !done[i - 1]
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connect_call_and_close_costs_the_server_at_most_two_threads_and_the_client_one() {
        let service = Service::new("s").method("add", |a: i64, b: i64| a + b);
        let server = ThreadedServer::new(service).build().unwrap();
        let port = server.port();
        let handle = server.spawn().unwrap();
        const CONNECTS: usize = 10;
        for i in 0..CONNECTS as i64 {
            let conn = crate::connect("127.0.0.1", port).unwrap();
            assert_eq!(conn.root().call::<i64, _>("add", (i, 1)).unwrap(), i + 1);
            // The client's reader; the call read its own reply.
            assert_eq!(conn.shared.threads_spawned(), 1);
            // Taken from the threads all client connections share, where it parks for the
            // next connection when this one closes.
            assert!(Arc::ptr_eq(&conn.shared.threads, &ThreadSet::clients()));
            conn.close();
        }
        // Per connection: the handshake thread, which then reads as the first worker, and a
        // second worker that takes over reading while the first runs the call.
        let spawned = handle.inner.threads.spawned();
        assert!(
            spawned <= 2 * CONNECTS,
            "{spawned} threads for {CONNECTS} connections"
        );
        handle.close();
    }
}
