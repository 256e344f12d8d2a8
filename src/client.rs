//! Connection options: one builder for every way of connecting, also used by servers for the
//! connections they accept.

use crate::auth::ClientAuthenticator;
use crate::base::limits::{ServerBudget, ThreadBudget};
use crate::base::threads::ThreadSet;
use crate::core::connection::Connection;
use crate::core::service::Service;
use crate::error::Error;
use crate::transport;
use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Largest frame accepted by default.
pub(crate) const DEFAULT_MAX_FRAME: usize = 64 << 20;

/// Settings for a connection, with the entry points that open one.
///
/// Defaults: no service exposed, 30 s call timeout (like RPyC's `sync_request_timeout`), 10 s
/// connect and handshake timeouts, 64 MiB largest frame, at most twice that held from the peer
/// at once, 64 workers, 65,536 queued requests, no idle limit. The README's "Limits and
/// hostile peers" gives the arithmetic.
///
/// ```
/// # let svc = rpyc::Service::new("calculator")
/// #     .method("add", |a: i64, b: i64| a + b)
/// #     .method("div", |a: f64, b: f64| -> Result<f64, String> {
/// #         if b == 0.0 { Err("division by zero".into()) } else { Ok(a / b) }
/// #     })
/// #     .method("len", |s: String| s.len())
/// #     .method("sleep", |s: f64| std::thread::sleep(std::time::Duration::from_secs_f64(s)))
/// #     .method("log", |m: String| eprintln!("{m}"))
/// #     .method("new_counter", || {
/// #         let n = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(0));
/// #         rpyc::Service::new("counter")
/// #             .method("incr", move |by: i64| n.fetch_add(by, std::sync::atomic::Ordering::SeqCst) + by)
/// #     });
/// # let server = rpyc::ThreadedServer::new(svc).build()?.spawn()?;
/// # let port = server.port();
/// use std::time::Duration;
/// let callbacks = rpyc::Service::new("client").method("notify", |msg: String| println!("{msg}"));
/// let conn = rpyc::Options::new()
///     .service(callbacks)
///     .call_timeout(Duration::from_secs(5))
///     .connect("127.0.0.1", port)?;
/// # Ok::<(), rpyc::Error>(())
/// ```
#[derive(Clone)]
pub struct Options {
    pub(crate) service: Service,
    pub(crate) call_timeout: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) handshake_timeout: Duration,
    pub(crate) max_frame: usize,
    pub(crate) max_workers: usize,
    pub(crate) max_queued: usize,
    /// `None`: twice `max_frame`.
    pub(crate) max_buffered: Option<usize>,
    pub(crate) idle_timeout: Duration,
    pub(crate) authenticator: Option<Arc<dyn ClientAuthenticator>>,
    /// Set by a server for its connections: the shared part of its memory bound.
    pub(crate) server_budget: Option<Arc<ServerBudget>>,
    /// Set by a server for its connections: its budget of pool threads.
    pub(crate) thread_budget: Option<Arc<ThreadBudget>>,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            service: Service::new("void"),
            call_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            max_frame: DEFAULT_MAX_FRAME,
            max_workers: 64,
            max_queued: 65_536,
            max_buffered: None,
            idle_timeout: Duration::MAX,
            authenticator: None,
            server_budget: None,
            thread_budget: None,
        }
    }
}

impl std::fmt::Debug for Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Options")
            .field("service", &self.service)
            .field("call_timeout", &self.call_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("handshake_timeout", &self.handshake_timeout)
            .field("max_frame", &self.max_frame)
            .field("max_workers", &self.max_workers)
            .field("max_queued", &self.max_queued)
            .field("max_buffered", &self.buffered_limit())
            .field("idle_timeout", &self.idle_timeout)
            .field("authenticator", &self.authenticator.is_some())
            .finish()
    }
}

impl Options {
    /// The defaults.
    pub fn new() -> Options {
        Options::default()
    }

    /// The service this side exposes to the peer (its callbacks, for a client).
    pub fn service(mut self, service: Service) -> Options {
        self.service = service;
        self
    }

    /// Default timeout of calls on this connection (30 s); each call can override it with
    /// [`RemoteObject::call_timeout`](crate::RemoteObject::call_timeout). It covers the whole
    /// call: waiting for the connection's writer (another thread may be sending), sending, and
    /// waiting for the reply. It is also the *stall timeout* (at least 1 s): a peer that takes
    /// none of what this side writes, or sends part of a frame and then nothing, for that long
    /// is dropped, with a warning in the log.
    pub fn call_timeout(mut self, d: Duration) -> Options {
        self.call_timeout = d;
        self
    }

    /// How long establishing a TCP connection may take.
    pub fn connect_timeout(mut self, d: Duration) -> Options {
        self.connect_timeout = d;
        self
    }

    /// How long the peer may take to complete the rpyc handshake. Over a stream or to a child
    /// process, which cannot time out a read, our end is shut down when the time is up (the
    /// child is killed; a stream peer sees the end of our stream).
    pub fn handshake_timeout(mut self, d: Duration) -> Options {
        self.handshake_timeout = d;
        self
    }

    /// Largest frame (one call or reply, encoded) this side accepts; announced to the peer,
    /// which refuses to send more (its call fails with [`Error::TooLarge`], nothing is sent).
    /// 64 MiB by default; at least 1 KiB, at most 4 GiB - 1.
    ///
    /// ```
    /// // Calls carrying up to about 1 GiB.
    /// let options = rpyc::Options::new().max_frame_size(1 << 30);
    /// # let _ = options;
    /// ```
    pub fn max_frame_size(mut self, bytes: usize) -> Options {
        self.max_frame = bytes.clamp(1024, u32::MAX as usize);
        self
    }

    /// Most bytes of the peer's data this side holds for the connection at once: frames being
    /// read, requests queued or running, requests nested in a waiting call, replies not yet
    /// taken by their caller (each frame counted with a small overhead, see the README). A peer
    /// that sends more is closed, with a warning; other connections carry on. Defaults to twice
    /// [`max_frame_size`](Self::max_frame_size); never less than one largest frame.
    ///
    /// ```
    /// let options = rpyc::Options::new().max_frame_size(16 << 20).max_buffered(64 << 20);
    /// # let _ = options;
    /// ```
    pub fn max_buffered(mut self, bytes: usize) -> Options {
        self.max_buffered = Some(bytes);
        self
    }

    /// Closes the connection once it has gone this long with no frame either way and nothing
    /// in flight (no call of ours waiting for a reply, no request of the peer running or
    /// queued). No limit by default (`Duration::MAX`). Checked every quarter of the limit (at
    /// least every 50 ms, at most every 5 s); not over streams and pipes, which cannot time out
    /// a read.
    ///
    /// ```
    /// use std::time::Duration;
    /// let options = rpyc::Options::new().idle_timeout(Duration::from_secs(600));
    /// # let _ = options;
    /// ```
    pub fn idle_timeout(mut self, d: Duration) -> Options {
        self.idle_timeout = d;
        self
    }

    /// Most handlers of one connection running at once (nested callbacks do not count: they
    /// run on the thread that waits for them).
    pub fn max_workers(mut self, n: usize) -> Options {
        self.max_workers = n.max(1);
        self
    }

    /// Most requests waiting for a worker; a peer that sends more is closed as misbehaving.
    pub fn max_queued(mut self, n: usize) -> Options {
        self.max_queued = n.clamp(1, u32::MAX as usize);
        self
    }

    /// Authenticates outgoing TCP connections ([`connect`](Self::connect)) with `a` before the
    /// rpyc handshake, e.g. an [`SslClient`](crate::SslClient) (TLS) or your own
    /// [`ClientAuthenticator`]. Not used for Unix sockets, streams or servers.
    ///
    /// ```
    /// let options = rpyc::Options::new().authenticator(rpyc::SslClient::new().ca_certs("ca.pem"));
    /// # let _ = options;
    /// ```
    pub fn authenticator(mut self, a: impl ClientAuthenticator) -> Options {
        self.authenticator = Some(Arc::new(a));
        self
    }

    /// The stall timeout: a peer that takes none of what we write, or sends part of a frame
    /// and then nothing, for this long is dropped.
    pub(crate) fn write_timeout(&self) -> Duration {
        self.call_timeout.max(Duration::from_secs(1))
    }

    /// The connection's memory bound (see [`max_buffered`](Self::max_buffered)).
    pub(crate) fn buffered_limit(&self) -> usize {
        let one_frame = self.max_frame + crate::base::limits::FRAME_OVERHEAD;
        self.max_buffered
            .unwrap_or(self.max_frame.saturating_mul(2))
            .max(one_frame)
    }

    /// How often a quiet connection's reader wakes, to apply the stall and idle limits.
    pub(crate) fn reader_tick(&self) -> Duration {
        (self.write_timeout().min(self.idle_timeout) / 4)
            .clamp(Duration::from_millis(50), Duration::from_secs(5))
    }

    /// Connects over TCP to `host:port`.
    ///
    /// ```no_run
    /// let conn = rpyc::Options::new().connect("::1", 18861)?;
    /// # Ok::<(), rpyc::Error>(())
    /// ```
    pub fn connect(&self, host: &str, port: u16) -> Result<Connection, Error> {
        let s = transport::tcp_connect(host, port, self.connect_timeout)?;
        let started = Instant::now();
        let mut t = match &self.authenticator {
            None => transport::tcp(s, self.write_timeout())?,
            Some(a) => a
                .authenticate(s, host, self.handshake_timeout)?
                .into_transport(self.write_timeout())?,
        };
        t.started = started;
        Connection::establish(t, self, ThreadSet::new())
    }

    /// Connects to a server listening on the Unix socket at `path`.
    ///
    /// ```no_run
    /// let conn = rpyc::Options::new().unix_connect("/tmp/rpyc.sock")?;
    /// # Ok::<(), rpyc::Error>(())
    /// ```
    #[cfg(unix)]
    pub fn unix_connect(&self, path: impl AsRef<Path>) -> Result<Connection, Error> {
        let path = path.as_ref();
        let s = std::os::unix::net::UnixStream::connect(path).map_err(|e| Error::Connect {
            addr: path.display().to_string(),
            source: e.into(),
        })?;
        let t = transport::unix(s, path.display().to_string(), self.write_timeout())?;
        Connection::establish(t, self, ThreadSet::new())
    }

    /// Runs the protocol over any byte stream: `reader` carries the peer's bytes to us,
    /// `writer` ours to it. Both ends are symmetric, so this also *serves* a stream (see the
    /// `stdio_server` example). Both must be blocking. Closing drops `writer`; the reading
    /// thread ends when `reader` reports the end of the stream (so pass the two directions of
    /// a pipe pair, not two handles of one socket: use [`Options::connect`] or
    /// [`Options::unix_connect`] for sockets).
    ///
    /// ```no_run
    /// // Serve the service on this process's stdin/stdout until the parent goes away.
    /// let svc = rpyc::Service::new("child").method("pid", || std::process::id());
    /// let conn = rpyc::Options::new().service(svc).connect_stream(std::io::stdin(), std::io::stdout())?;
    /// conn.wait_closed();
    /// # Ok::<(), rpyc::Error>(())
    /// ```
    pub fn connect_stream<R, W>(&self, reader: R, writer: W) -> Result<Connection, Error>
    where
        R: Read + Send + 'static,
        W: Write + Send + 'static,
    {
        let t = transport::stream(reader, writer, "stream".into());
        Connection::establish(t, self, ThreadSet::new())
    }

    /// Starts `cmd` with its stdin and stdout piped and connects to the rpyc peer it runs
    /// there. Closing the connection closes the child's stdin, and kills the child if it has
    /// not exited half a second later.
    ///
    /// ```no_run
    /// let conn = rpyc::Options::new().connect_subprocess(std::process::Command::new("./my-worker"))?;
    /// let pid: u32 = conn.root().call("pid", ())?;
    /// # Ok::<(), rpyc::Error>(())
    /// ```
    pub fn connect_subprocess(&self, cmd: Command) -> Result<Connection, Error> {
        let t = transport::subprocess(cmd, self.write_timeout())?;
        Connection::establish(t, self, ThreadSet::new())
    }
}

/// Connects over TCP with default [`Options`].
///
/// ```
/// # let svc = rpyc::Service::new("calculator")
/// #     .method("add", |a: i64, b: i64| a + b)
/// #     .method("div", |a: f64, b: f64| -> Result<f64, String> {
/// #         if b == 0.0 { Err("division by zero".into()) } else { Ok(a / b) }
/// #     })
/// #     .method("len", |s: String| s.len())
/// #     .method("sleep", |s: f64| std::thread::sleep(std::time::Duration::from_secs_f64(s)))
/// #     .method("log", |m: String| eprintln!("{m}"))
/// #     .method("new_counter", || {
/// #         let n = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(0));
/// #         rpyc::Service::new("counter")
/// #             .method("incr", move |by: i64| n.fetch_add(by, std::sync::atomic::Ordering::SeqCst) + by)
/// #     });
/// # let server = rpyc::ThreadedServer::new(svc).build()?.spawn()?;
/// # let port = server.port();
/// let conn = rpyc::connect("127.0.0.1", port)?;
/// let sum: i64 = conn.root().call("add", (1, 2))?;
/// # Ok::<(), rpyc::Error>(())
/// ```
pub fn connect(host: &str, port: u16) -> Result<Connection, Error> {
    Options::new().connect(host, port)
}

/// Connects to a Unix socket with default [`Options`].
///
/// ```no_run
/// let conn = rpyc::unix_connect("/tmp/rpyc.sock")?;
/// # Ok::<(), rpyc::Error>(())
/// ```
#[cfg(unix)]
pub fn unix_connect(path: impl AsRef<Path>) -> Result<Connection, Error> {
    Options::new().unix_connect(path)
}

/// Runs the protocol over a byte stream with default [`Options`]; see
/// [`Options::connect_stream`].
///
/// ```no_run
/// let conn = rpyc::connect_stream(std::io::stdin(), std::io::stdout())?;
/// # Ok::<(), rpyc::Error>(())
/// ```
pub fn connect_stream<R, W>(reader: R, writer: W) -> Result<Connection, Error>
where
    R: Read + Send + 'static,
    W: Write + Send + 'static,
{
    Options::new().connect_stream(reader, writer)
}

/// Starts a child process and connects to it with default [`Options`]; see
/// [`Options::connect_subprocess`].
///
/// ```no_run
/// let conn = rpyc::connect_subprocess(std::process::Command::new("./my-worker"))?;
/// # Ok::<(), rpyc::Error>(())
/// ```
pub fn connect_subprocess(cmd: Command) -> Result<Connection, Error> {
    Options::new().connect_subprocess(cmd)
}
