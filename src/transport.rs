//! Transports: the byte streams a connection runs over (TCP, Unix sockets, any Read + Write
//! pair, a child process's stdin/stdout). Each gives the connection a read half, a write half,
//! and a way to shut both down from any thread.

use crate::error::{Error, Timeout};
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, TryLockError};
use std::time::{Duration, Instant};

/// Shuts a transport down and adjusts its timeouts, from any thread.
pub(crate) trait Control: Send + Sync {
    /// Makes blocked reads and writes return, and the peer see the end of the stream.
    fn shutdown(&self);
    /// A read timeout for the handshake; `None` removes it. An error means reads cannot time
    /// out (then the handshake is timed by shutting the transport down).
    fn set_read_timeout(&self, _d: Option<Duration>) -> io::Result<()> {
        Err(io::ErrorKind::Unsupported.into())
    }
    /// A description of a failure below the rpyc protocol (TLS), if one happened: it explains
    /// a handshake that failed better than the I/O error does.
    fn failure(&self) -> Option<String> {
        None
    }
}

/// A fresh byte stream, before the handshake.
pub(crate) struct Transport {
    pub reader: Box<dyn Read + Send>,
    pub writer: Box<dyn Write + Send>,
    pub peer: String,
    pub control: Arc<dyn Control>,
    /// What an authenticator learned about the peer (e.g. its TLS certificate).
    pub credentials: Option<crate::auth::Credentials>,
}

impl Control for TcpStream {
    fn shutdown(&self) {
        let _ = TcpStream::shutdown(self, std::net::Shutdown::Both);
    }
    fn set_read_timeout(&self, d: Option<Duration>) -> io::Result<()> {
        TcpStream::set_read_timeout(self, d)
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
}

/// Connects over TCP, trying each address `host` resolves to.
pub(crate) fn tcp_connect(host: &str, port: u16, timeout: Duration) -> Result<TcpStream, Error> {
    let addr = format!("{host}:{port}");
    let fail = |e: io::Error| Error::Connect {
        addr: addr.clone(),
        source: Arc::new(e),
    };
    let addrs: Vec<_> = (host, port).to_socket_addrs().map_err(fail)?.collect();
    let deadline = crate::options::deadline(timeout);
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
    // A peer that stops reading must not block a writer forever: a send that makes no
    // progress for this long fails and closes the connection.
    s.set_write_timeout(Some(write_timeout))?;
    let peer = s
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "tcp peer".into());
    Ok(Transport {
        reader: Box::new(s.try_clone()?),
        control: Arc::new(s.try_clone()?),
        writer: Box::new(s),
        peer,
        credentials: None,
    })
}

/// Wraps a connected Unix socket.
#[cfg(unix)]
pub(crate) fn unix(
    s: std::os::unix::net::UnixStream,
    peer: String,
    write_timeout: Duration,
) -> io::Result<Transport> {
    s.set_write_timeout(Some(write_timeout))?;
    Ok(Transport {
        reader: Box::new(s.try_clone()?),
        control: Arc::new(s.try_clone()?),
        writer: Box::new(s),
        peer,
        credentials: None,
    })
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
        let mut w = crate::connection::lock(&self.0.writer);
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
}

impl<W: Send> Control for StreamControl<W> {
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
            let mut child = crate::connection::lock(child);
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

/// Wraps any Read + Write pair.
pub(crate) fn stream<R, W>(reader: R, writer: W, peer: String, child: Option<Child>) -> Transport
where
    R: Read + Send + 'static,
    W: Write + Send + 'static,
{
    let w = Arc::new(WriteHalf {
        writer: Mutex::new(Some(writer)),
        closing: AtomicBool::new(false),
    });
    Transport {
        reader: Box::new(reader),
        writer: Box::new(ClosableWriter(w.clone())),
        peer,
        control: Arc::new(StreamControl {
            writer: w,
            child: child.map(Mutex::new),
        }),
        credentials: None,
    }
}

/// Starts `cmd` with piped stdin and stdout and wraps them.
pub(crate) fn subprocess(mut cmd: Command) -> Result<Transport, Error> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| Error::Connect {
            addr: format!("subprocess {program}"),
            source: Arc::new(e),
        })?;
    let stdin = child.stdin.take().expect("stdin is piped");
    let stdout = child.stdout.take().expect("stdout is piped");
    let peer = format!("subprocess {program} (pid {})", child.id());
    Ok(stream(stdout, stdin, peer, Some(child)))
}
