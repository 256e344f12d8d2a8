//! Transports: the byte streams a connection runs over (TCP, Unix sockets, any Read + Write
//! pair, a child process's stdin/stdout). Each gives the connection a read half, a write half,
//! and a way to shut both down from any thread.

use crate::error::{Error, Timeout};
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
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
}

/// A fresh byte stream, before the handshake.
pub(crate) struct Transport {
    pub reader: Box<dyn Read + Send>,
    pub writer: Box<dyn Write + Send>,
    pub peer: String,
    pub control: Arc<dyn Control>,
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
pub(crate) fn tcp_connect(
    host: &str,
    port: u16,
    timeout: Duration,
    write_timeout: Duration,
) -> Result<Transport, Error> {
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
            Ok(s) => return tcp(s, write_timeout).map_err(fail),
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
    })
}

/// A writer that `shutdown` can close (dropping it signals end of stream to the peer).
struct ClosableWriter<W>(Arc<Mutex<Option<W>>>);

impl<W: Write> Write for ClosableWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match crate::connection::lock(&self.0).as_mut() {
            Some(w) => w.write(buf),
            None => Err(io::Error::new(io::ErrorKind::BrokenPipe, "stream closed")),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match crate::connection::lock(&self.0).as_mut() {
            Some(w) => w.flush(),
            None => Ok(()),
        }
    }
}

/// Closes the write half when it is not in use; a write blocked on a full pipe keeps it.
struct StreamControl<W> {
    writer: Arc<Mutex<Option<W>>>,
    child: Option<Mutex<Child>>,
}

impl<W: Send> Control for StreamControl<W> {
    fn shutdown(&self) {
        if let Ok(mut w) = self.writer.try_lock() {
            w.take();
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
    let w = Arc::new(Mutex::new(Some(writer)));
    Transport {
        reader: Box::new(reader),
        writer: Box::new(ClosableWriter(w.clone())),
        peer,
        control: Arc::new(StreamControl {
            writer: w,
            child: child.map(Mutex::new),
        }),
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
