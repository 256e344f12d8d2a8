//! Transports: the byte streams a connection runs over (TCP, Unix sockets, any Read + Write
//! pair, a child process's stdin/stdout). Each gives the connection a read half, a write half
//! (a [`Sink`]), and a way to shut both down from any thread.
//!
//! # Writes under deadlines
//!
//! A [`Sink`] never blocks without a bound: it waits for the transport with `poll(2)` until the
//! caller's deadline (a call's timeout) and until the *stall timeout* (no byte taken by the
//! peer for that long, counted from the last progress, however the waiting was split between
//! calls), whichever comes first. Sockets are written with `MSG_DONTWAIT` whatever their mode
//! (their read half stays blocking); a child process's stdin is made non-blocking. Only a
//! stream handed in by the user ([`crate::Options::connect_stream`]) is written with plain
//! blocking writes: it is bounded by whatever timeouts the user gave it.

pub(crate) mod hello;
pub(crate) mod reader;

use crate::base::lock;
#[cfg(unix)]
use crate::base::sys::{self, POLLOUT};
use crate::error::{Error, Timeout};
use std::io::{self, IoSlice, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
#[cfg(unix)]
use std::os::unix::io::{AsRawFd, RawFd};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, TryLockError};
use std::time::{Duration, Instant};

/// The write half of a transport.
pub(crate) trait Sink: Send {
    /// Writes a prefix of `buf` (which is not empty) and returns its length, waiting for the
    /// transport at most until `until` (then `Ok(0)`). Fails with `TimedOut` once the peer has
    /// taken nothing for the stall timeout, or with the transport's error.
    fn send(&mut self, buf: &[u8], until: Option<Instant>) -> io::Result<usize>;

    /// [`send`](Self::send) for pieces to be written in order (none empty): writes a prefix of
    /// their concatenation and returns its length. Sockets write several pieces in one system
    /// call; other transports write from the first.
    fn send_vectored(
        &mut self,
        pieces: &[IoSlice<'_>],
        until: Option<Instant>,
    ) -> io::Result<usize> {
        match pieces.first() {
            Some(p) => self.send(p, until),
            None => Ok(0),
        }
    }

    /// Whether the transport has taken part of the bytes last offered although `send` reported
    /// none (TLS: a record built and partly sent). Then the same bytes must be offered again
    /// until they are all written: the frame cannot be given up.
    fn committed(&self) -> bool {
        false
    }
}

/// Tracks how long the peer has taken nothing, across `send` calls.
#[derive(Debug)]
pub(crate) struct Stall {
    limit: Duration,
    since: Option<Instant>,
}

impl Stall {
    pub(crate) fn new(limit: Duration) -> Stall {
        Stall { limit, since: None }
    }

    /// The peer took bytes.
    pub(crate) fn progress(&mut self) {
        self.since = None;
    }

    /// Waits until `fd` is ready for `events` (or hung up), but at most until `until` and until
    /// the peer has taken nothing for the limit. `Ok(true)`: try again; `Ok(false)`: `until`
    /// passed first.
    #[cfg(unix)]
    pub(crate) fn wait(
        &mut self,
        fd: RawFd,
        events: i16,
        until: Option<Instant>,
    ) -> io::Result<bool> {
        self.wait_at_most(fd, events, until, None)
    }

    /// [`wait`](Self::wait), also returning after `slice` (to look at a closing flag).
    #[cfg(unix)]
    pub(crate) fn wait_at_most(
        &mut self,
        fd: RawFd,
        events: i16,
        until: Option<Instant>,
        slice: Option<Duration>,
    ) -> io::Result<bool> {
        let now = Instant::now();
        let since = *self.since.get_or_insert(now);
        let stalled_at = crate::base::deadline_from(since, self.limit);
        if now >= stalled_at {
            return Err(self.stalled());
        }
        if until.is_some_and(|u| now >= u) {
            return Ok(false);
        }
        let end = until.map_or(stalled_at, |u| u.min(stalled_at));
        let mut wait = end - now;
        if let Some(s) = slice {
            wait = wait.min(s);
        }
        if sys::wait_fd(fd, events, Some(wait))? == 0 {
            let now = Instant::now();
            if until.is_some_and(|u| now >= u) {
                return Ok(false);
            }
            if now >= stalled_at {
                return Err(self.stalled());
            }
        }
        Ok(true)
    }

    /// The error of a peer that stopped reading.
    pub(crate) fn stalled(&self) -> io::Error {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("the peer read nothing for {:?}", self.limit),
        )
    }
}

/// Writes a socket without waiting in the kernel (its read half stays blocking), waiting for
/// room with `poll(2)` under the caller's deadline and the stall timeout.
#[cfg(unix)]
struct SocketSink<S> {
    socket: S,
    stall: Stall,
}

#[cfg(unix)]
impl<S: AsRawFd> SocketSink<S> {
    /// Runs `send` (a non-blocking send on the socket) until it takes bytes, waiting for room
    /// between tries: `Ok(0)` once `until` passes.
    fn sending(
        &mut self,
        until: Option<Instant>,
        mut send: impl FnMut(RawFd) -> io::Result<usize>,
    ) -> io::Result<usize> {
        let fd = self.socket.as_raw_fd();
        loop {
            match send(fd) {
                Ok(n) => {
                    self.stall.progress();
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if !self.stall.wait(fd, POLLOUT, until)? {
                        return Ok(0);
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(unix)]
impl<S: AsRawFd + Send> Sink for SocketSink<S> {
    fn send(&mut self, buf: &[u8], until: Option<Instant>) -> io::Result<usize> {
        self.sending(until, |fd| sys::send_nowait(fd, buf))
    }

    fn send_vectored(
        &mut self,
        pieces: &[IoSlice<'_>],
        until: Option<Instant>,
    ) -> io::Result<usize> {
        self.sending(until, |fd| sys::send_vectored_nowait(fd, pieces))
    }
}

/// A plain blocking writer (a stream the user handed in): `until` cannot be honoured.
struct BlockingSink<W>(W);

impl<W: Write + Send> Sink for BlockingSink<W> {
    fn send(&mut self, buf: &[u8], _until: Option<Instant>) -> io::Result<usize> {
        loop {
            match self.0.write(buf) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                other => {
                    let _ = self.0.flush();
                    return other;
                }
            }
        }
    }
}

/// Shuts a transport down and adjusts its timeouts, from any thread.
pub(crate) trait Control: Send + Sync {
    /// Makes blocked reads and writes return, and the peer see the end of the stream.
    fn shutdown(&self);
    /// A read timeout for the handshake; `None` removes it. An error means reads cannot time
    /// out (then the handshake is timed by shutting the transport down).
    fn set_read_timeout(&self, _d: Option<Duration>) -> io::Result<()> {
        Err(io::ErrorKind::Unsupported.into())
    }
    /// A failure below the rpyc protocol (TLS), if one happened: it explains a handshake that
    /// failed better than the I/O error does.
    fn failure(&self) -> Option<Error> {
        None
    }
    /// Whether input (or the end of it) waits below the frame reader right now, without
    /// waiting; `true` when the transport cannot tell, so callers treat it as input.
    fn input_waiting(&self) -> bool {
        true
    }
}

/// What the peer proved about itself: any value an authenticator chose to keep (for TLS, a
/// [`PeerCertificate`](crate::tls::PeerCertificate)).
pub(crate) type Credentials = Arc<dyn std::any::Any + Send + Sync>;

/// A fresh byte stream, before the handshake.
pub(crate) struct Transport {
    pub reader: Box<dyn Read + Send>,
    pub writer: Box<dyn Sink>,
    pub peer: String,
    pub control: Arc<dyn Control>,
    /// What an authenticator learned about the peer (e.g. its TLS certificate).
    pub credentials: Option<Credentials>,
    /// When the peer was reached (accepted or connected): the handshake timeout, authentication
    /// included, counts from here.
    pub started: Instant,
    /// How many bytes of our hello are already written: a server's accepting thread greets a
    /// plain client at once ([`crate::server`]), the handshake writes the rest.
    pub hello_sent: usize,
}

impl Control for TcpStream {
    fn shutdown(&self) {
        let _ = TcpStream::shutdown(self, std::net::Shutdown::Both);
    }
    fn set_read_timeout(&self, d: Option<Duration>) -> io::Result<()> {
        TcpStream::set_read_timeout(self, d)
    }
    #[cfg(unix)]
    fn input_waiting(&self) -> bool {
        sys::readable_now(self.as_raw_fd())
    }
}

#[cfg(unix)]
impl Control for std::os::unix::net::UnixStream {
    fn shutdown(&self) {
        let _ = std::os::unix::net::UnixStream::shutdown(self, std::net::Shutdown::Both);
    }
    fn set_read_timeout(&self, d: Option<Duration>) -> io::Result<()> {
        std::os::unix::net::UnixStream::set_read_timeout(self, d)
    }
    fn input_waiting(&self) -> bool {
        sys::readable_now(self.as_raw_fd())
    }
}

/// Connects over TCP, trying each address `host` resolves to.
pub(crate) fn tcp_connect(host: &str, port: u16, timeout: Duration) -> Result<TcpStream, Error> {
    tcp_connect_until(host, port, crate::base::deadline(timeout), timeout)
}

/// [`tcp_connect`] giving up at `deadline` (`timeout` is what a time-out error reports).
pub(crate) fn tcp_connect_until(
    host: &str,
    port: u16,
    deadline: Instant,
    timeout: Duration,
) -> Result<TcpStream, Error> {
    let addr = format!("{host}:{port}");
    let fail = |e: io::Error| Error::Connect {
        addr: addr.clone(),
        source: Arc::new(e),
    };
    let addrs: Vec<_> = (host, port).to_socket_addrs().map_err(fail)?.collect();
    let mut last = io::Error::new(
        io::ErrorKind::NotFound,
        "the host name resolved to no address",
    );
    for a in addrs {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Error::Timeout(Timeout::Connect(timeout)));
        }
        match TcpStream::connect_timeout(&a, left) {
            Ok(s) => return Ok(s),
            Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                return Err(Error::Timeout(Timeout::Connect(timeout)))
            }
            Err(e) => last = e,
        }
    }
    Err(fail(last))
}

/// Wraps a connected TCP socket.
pub(crate) fn tcp(s: TcpStream, write_timeout: Duration) -> io::Result<Transport> {
    s.set_nodelay(true)?;
    let peer = s
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "tcp peer".into());
    Ok(socket(s, peer, write_timeout))
}

/// Wraps a connected Unix socket.
#[cfg(unix)]
pub(crate) fn unix(
    s: std::os::unix::net::UnixStream,
    peer: String,
    write_timeout: Duration,
) -> io::Result<Transport> {
    Ok(socket(s, peer, write_timeout))
}

/// Reads a socket shared with the other halves of its transport.
struct SharedReader<S>(Arc<S>);

impl<S> Read for SharedReader<S>
where
    for<'a> &'a S: Read,
{
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self.0).read(buf)
    }
}

/// A connected socket as a transport: the reader, the writer and the control share the one
/// socket (one file descriptor per connection).
fn socket<S>(s: S, peer: String, write_timeout: Duration) -> Transport
where
    S: Control + AsRawFd + Send + Sync + 'static,
    for<'a> &'a S: Read,
{
    let s = Arc::new(s);
    Transport {
        reader: Box::new(SharedReader(s.clone())),
        control: s.clone(),
        // A peer that stops reading must not block a writer forever: a frame that makes no
        // progress for this long fails and closes the connection.
        writer: Box::new(SocketSink {
            socket: s,
            stall: Stall::new(write_timeout),
        }),
        peer,
        credentials: None,
        started: Instant::now(),
        hello_sent: 0,
    }
}

/// The write half of a stream, which `shutdown` can close from another thread (dropping it
/// signals the end of the stream to the peer).
struct WriteHalf<W> {
    writer: Mutex<Option<W>>,
    closing: AtomicBool,
}

struct ClosableWriter<W>(Arc<WriteHalf<W>>);

impl<W: Write> ClosableWriter<W> {
    /// Runs `op` on the writer (`None` once it is closed). A writer whose stream is closing is
    /// dropped before the lock is released, so a `shutdown` that found the lock taken still
    /// closes it.
    fn with<T>(&mut self, op: impl FnOnce(&mut W) -> io::Result<T>) -> Option<io::Result<T>> {
        let mut w = lock(&self.0.writer);
        let r = op(w.as_mut()?);
        if self.0.closing.load(Ordering::Acquire) {
            w.take();
        }
        Some(r)
    }
}

impl<W: Write> Write for ClosableWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.with(|w| w.write(buf))
            .unwrap_or_else(|| Err(io::Error::new(io::ErrorKind::BrokenPipe, "stream closed")))
    }
    fn flush(&mut self) -> io::Result<()> {
        self.with(|w| w.flush()).unwrap_or(Ok(()))
    }
}

/// Closes the write half (at once, or as soon as a write in progress returns) and, for a child
/// process, makes sure it ends.
struct StreamControl<W> {
    writer: Arc<WriteHalf<W>>,
    child: Option<Mutex<Child>>,
    /// What the child wrote to its stderr, when it is captured (see [`Stderr`]).
    stderr: Option<Stderr>,
}

/// A child's stderr, kept (its last 8 KiB) to explain why the child failed.
#[derive(Clone)]
pub(crate) struct Stderr {
    text: Arc<Mutex<String>>,
    /// Set once the child closed its stderr (everything it wrote is in `text`).
    done: Arc<AtomicBool>,
    /// Turns the child's exit status and what it wrote into the error to report.
    explain: Explain,
}

impl Stderr {
    /// Keeps what `pipe` carries (on a thread of its own, until the child closes it).
    fn collect(pipe: std::process::ChildStderr, explain: Explain) -> Stderr {
        const KEEP: usize = 8 << 10;
        let text = Arc::new(Mutex::new(String::new()));
        let done = Arc::new(AtomicBool::new(false));
        let (sink, finished) = (text.clone(), done.clone());
        let _ = std::thread::Builder::new()
            .name("rpyc-stderr".into())
            .spawn(move || {
                let mut pipe = pipe;
                let mut buf = [0u8; 4096];
                while let Ok(n) = pipe.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    let mut t = lock(&sink);
                    t.push_str(&String::from_utf8_lossy(&buf[..n]));
                    if t.len() > KEEP {
                        let cut = crate::base::floor_char_boundary(&t, t.len() - KEEP);
                        t.drain(..cut);
                    }
                }
                finished.store(true, Ordering::Release);
            });
        Stderr {
            text,
            done,
            explain,
        }
    }
}

impl<W: Send> Control for StreamControl<W> {
    fn failure(&self) -> Option<Error> {
        let stderr = self.stderr.as_ref()?;
        let status = self.child.as_ref().and_then(|c| {
            let mut c = lock(c);
            // Give a failing child a moment to exit and say why.
            for _ in 0..50 {
                if let Ok(Some(s)) = c.try_wait() {
                    return Some(s);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            None
        });
        // Everything it wrote, once the pipe is closed (a moment after the child exits).
        for _ in 0..50 {
            if stderr.done.load(Ordering::Acquire) {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let text = lock(&stderr.text).clone();
        (stderr.explain)(text.trim(), status)
    }

    fn shutdown(&self) {
        self.writer.closing.store(true, Ordering::Release);
        // A short write or flush may hold the lock right now; a write blocked on a full pipe
        // holds it until the peer reads, and then drops the writer itself (see `with`).
        for _ in 0..100 {
            match self.writer.writer.try_lock() {
                Ok(mut w) => {
                    w.take();
                    break;
                }
                Err(TryLockError::Poisoned(p)) => {
                    p.into_inner().take();
                    break;
                }
                Err(TryLockError::WouldBlock) => std::thread::sleep(Duration::from_millis(1)),
            }
        }
        if let Some(child) = &self.child {
            let mut child = lock(child);
            // The child normally exits when its stdin closes; give it a moment, then kill it.
            let deadline = Instant::now() + Duration::from_millis(500);
            loop {
                match child.try_wait() {
                    Ok(Some(_)) => return,
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(5))
                    }
                    _ => break,
                }
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Writes a child process's stdin, made non-blocking, waiting for room with `poll(2)` under
/// the caller's deadline and the stall timeout. Waits are cut into slices so that a `shutdown`
/// (which closes the pipe) is seen promptly.
#[cfg(unix)]
struct PipeSink<W> {
    writer: ClosableWriter<W>,
    fd: RawFd,
    stall: Stall,
}

#[cfg(unix)]
impl<W: Write + Send> Sink for PipeSink<W> {
    fn send(&mut self, buf: &[u8], until: Option<Instant>) -> io::Result<usize> {
        loop {
            match self.writer.write(buf) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.stall.progress();
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if self.writer.0.closing.load(Ordering::Acquire) {
                        return Err(io::Error::new(io::ErrorKind::BrokenPipe, "stream closed"));
                    }
                    let slice = Some(Duration::from_millis(100));
                    if !self.stall.wait_at_most(self.fd, POLLOUT, until, slice)? {
                        return Ok(0);
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }
}

fn write_half<W>(writer: W) -> Arc<WriteHalf<W>> {
    Arc::new(WriteHalf {
        writer: Mutex::new(Some(writer)),
        closing: AtomicBool::new(false),
    })
}

/// Wraps any Read + Write pair (the writer is written with blocking writes).
pub(crate) fn stream<R, W>(reader: R, writer: W, peer: String) -> Transport
where
    R: Read + Send + 'static,
    W: Write + Send + 'static,
{
    let w = write_half(writer);
    Transport {
        reader: Box::new(reader),
        writer: Box::new(BlockingSink(ClosableWriter(w.clone()))),
        peer,
        control: Arc::new(StreamControl {
            writer: w,
            child: None,
            stderr: None,
        }),
        credentials: None,
        started: Instant::now(),
        hello_sent: 0,
    }
}

/// Starts `cmd` with piped stdin and stdout and wraps them; a child that stops reading its
/// stdin for `write_timeout` ends the connection.
pub(crate) fn subprocess(cmd: Command, write_timeout: Duration) -> Result<Transport, Error> {
    spawn_child(cmd, write_timeout, None)
}

/// The explanation of a failed child, from what it wrote to stderr and its exit status.
pub(crate) type Explain =
    Arc<dyn Fn(&str, Option<std::process::ExitStatus>) -> Option<Error> + Send + Sync>;

/// [`subprocess`], keeping what the child writes to stderr: when the connection fails,
/// `explain` turns it (and the exit status) into the error reported instead of the I/O one.
pub(crate) fn subprocess_explained(
    cmd: Command,
    write_timeout: Duration,
    explain: Explain,
) -> Result<Transport, Error> {
    spawn_child(cmd, write_timeout, Some(explain))
}

fn spawn_child(
    mut cmd: Command,
    write_timeout: Duration,
    explain: Option<Explain>,
) -> Result<Transport, Error> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    if explain.is_some() {
        cmd.stderr(Stdio::piped());
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| Error::Connect {
            addr: format!("subprocess {program}"),
            source: Arc::new(e),
        })?;
    let stderr = match (explain, child.stderr.take()) {
        (Some(explain), Some(pipe)) => Some(Stderr::collect(pipe, explain)),
        _ => None,
    };
    let stdin = child.stdin.take().expect("stdin is piped");
    let stdout = child.stdout.take().expect("stdout is piped");
    let peer = format!("subprocess {program} (pid {})", child.id());
    let w = write_half(stdin);
    #[cfg(unix)]
    let writer: Box<dyn Sink> = {
        let fd = lock(&w.writer)
            .as_ref()
            .expect("not closed yet")
            .as_raw_fd();
        if let Err(e) = sys::set_nonblocking(fd) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(Error::Io(Arc::new(e)));
        }
        Box::new(PipeSink {
            writer: ClosableWriter(w.clone()),
            fd,
            stall: Stall::new(write_timeout),
        })
    };
    #[cfg(not(unix))]
    let writer: Box<dyn Sink> = {
        let _ = write_timeout;
        Box::new(BlockingSink(ClosableWriter(w.clone())))
    };
    Ok(Transport {
        reader: Box::new(stdout),
        writer,
        peer,
        control: Arc::new(StreamControl {
            writer: w,
            child: Some(Mutex::new(child)),
            stderr,
        }),
        credentials: None,
        started: Instant::now(),
        hello_sent: 0,
    })
}
