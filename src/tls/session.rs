//! One TLS session shared by the connection's reading thread, its writer and whoever shuts it
//! down, without two threads ever inside the SSL object and without a lock held while waiting
//! for the network (see the module docs of [`crate::tls`]).

use super::cert::PeerCertificate;
use super::handshake::{peer_of, server_alert, side_name, ClearHandshake, Side};
use crate::auth::Authenticated;
use crate::base::lock;
use crate::base::recv_buf::RecvBuf;
use crate::base::sys::{self, POLLIN, POLLOUT};
use crate::error::{Error, TlsError, TlsErrorKind};
use crate::transport::Credentials;
use crate::transport::{Control, Sink, Stall, Transport};
use openssl::ssl::{self, ErrorCode, SslStream, SslVersion};
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The socket under an SSL object. Its reads and writes never wait (OpenSSL is only ever
/// called with the SSL lock held, which must not be held while waiting); reads come from a
/// buffer filled by one system call per batch of records (OpenSSL alone reads each record's
/// header and body separately), which the connection's reader also fills by waiting on the
/// socket *outside* the SSL lock (see [`TlsConn::fill`]). It also remembers the first bytes
/// read, so a failed handshake can tell a plain rpyc server from a broken TLS one.
pub(super) struct Sock {
    pub(super) tcp: TcpStream,
    rbuf: Arc<Mutex<SockBuf>>,
}

/// Bytes read from the socket and not yet taken by OpenSSL, in a buffer that grows with
/// traffic and is given back while the connection is quiet ([`RecvBuf`], as the frame
/// reader's): dropped when a wait for input times out with nothing buffered, after which the
/// reader waits for input before taking one again.
#[derive(Default)]
struct SockBuf {
    bytes: RecvBuf,
    /// The socket reported its end.
    eof: bool,
    first: [u8; 4],
    seen: usize,
    /// The handshake messages the peer sent in the clear.
    clear: ClearHandshake,
}

impl SockBuf {
    /// Whether OpenSSL has something to take: bytes, or the end of the stream.
    fn ready(&self) -> bool {
        self.bytes.has_bytes() || self.eof
    }

    /// Records what a read of the socket into the buffer's room returned.
    fn filled(&mut self, n: usize) {
        let got = self.bytes.filled(n);
        if self.seen < 4 {
            let k = n.min(4 - self.seen);
            self.first[self.seen..self.seen + k].copy_from_slice(&got[..k]);
            self.seen += k;
        }
        self.clear.feed(got);
        self.eof = n == 0;
    }
}

impl Sock {
    pub(super) fn new(tcp: TcpStream) -> Sock {
        Sock {
            tcp,
            rbuf: Arc::new(Mutex::new(SockBuf::default())),
        }
    }

    /// Whether OpenSSL can make progress reading without the socket.
    fn ready(&self) -> bool {
        lock(&self.rbuf).ready()
    }

    /// Whether the first bytes the peer sent are rpyc's plain hello.
    pub(super) fn saw_plain_rpyc(&self) -> bool {
        let rb = lock(&self.rbuf);
        rb.seen == 4 && rb.first == crate::wire::MAGIC
    }

    /// Whether the peer (a server) asked for a client certificate, in the clear (TLS 1.2).
    pub(super) fn certificate_requested(&self) -> bool {
        lock(&self.rbuf).clear.certificate_requested()
    }
}

impl Read for Sock {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        // The reader may hold the buffer while it waits for the socket (without the SSL lock);
        // whoever calls OpenSSL meanwhile must not wait for it.
        let mut rb = match self.rbuf.try_lock() {
            Ok(rb) => rb,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => {
                return Err(io::ErrorKind::WouldBlock.into())
            }
        };
        if !rb.bytes.has_bytes() {
            if rb.eof {
                return Ok(0);
            }
            let n = sys::recv_nowait(self.tcp.as_raw_fd(), rb.bytes.room(0))?;
            rb.filled(n);
        }
        Ok(rb.bytes.take(out))
    }
}

impl Write for Sock {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        sys::send_nowait(self.tcp.as_raw_fd(), buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

// The transport: one SSL object shared by a reading and a writing thread

/// A TLS session shared by the connection's read half, write half and control (see the
/// module docs for the locking rules).
pub(super) struct TlsConn {
    ssl: Mutex<SslStream<Sock>>,
    /// The SSL object's receive buffer, which the reader fills without the SSL lock.
    rbuf: Arc<Mutex<SockBuf>>,
    fd: RawFd,
    /// Another handle on the socket: shuts it down without taking the SSL lock.
    sock: TcpStream,
    peer: String,
    read_timeout: Mutex<Option<Duration>>,
    /// OpenSSL kept decrypted bytes after the last read (they are the next read's).
    read_pending: AtomicBool,
    closing: AtomicBool,
    /// The first TLS-level failure after the handshake, described (e.g. TLS 1.3's late
    /// "certificate required" alert), for the connection's error message.
    failure: Mutex<Option<TlsError>>,
    side: Side,
    /// A client without a certificate, asked for one by the server (see [`server_alert`]).
    certificate_wanted: bool,
}

impl TlsConn {
    pub(super) fn new(s: SslStream<Sock>, side: Side) -> io::Result<Arc<TlsConn>> {
        let sock = s.get_ref().tcp.try_clone()?;
        // From now on only the reader's wait blocks (outside the SSL lock); everything done
        // with the SSL lock held goes through `Sock`, which never waits.
        sock.set_nonblocking(false)?;
        let fd = s.get_ref().tcp.as_raw_fd();
        let peer = peer_of(&s.get_ref().tcp);
        let certificate_wanted = side == Side::Client
            && s.get_ref().certificate_requested()
            && s.ssl().certificate().is_none();
        Ok(Arc::new(TlsConn {
            rbuf: s.get_ref().rbuf.clone(),
            fd,
            sock,
            ssl: Mutex::new(s),
            peer,
            read_timeout: Mutex::new(None),
            read_pending: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            failure: Mutex::new(None),
            side,
            certificate_wanted,
        }))
    }

    /// What an authenticator returns: this session, and the peer's certificate if it sent one.
    pub(super) fn authenticated(self: Arc<Self>, cert: Option<PeerCertificate>) -> Authenticated {
        let credentials = cert.map(|c| Arc::new(c) as Credentials);
        Authenticated::made(move |stall| TlsConn::transport(self, stall), credentials)
    }

    fn transport(conn: Arc<TlsConn>, write_timeout: Duration) -> Transport {
        Transport {
            reader: Box::new(TlsReader(conn.clone())),
            writer: Box::new(TlsWriter {
                conn: conn.clone(),
                stall: Stall::new(write_timeout),
                committed: false,
            }),
            peer: conn.peer.clone(),
            control: conn,
            credentials: None,
            started: Instant::now(),
            hello_sent: 0,
        }
    }

    fn failed(&self, e: ssl::Error, doing: &str) -> io::Error {
        if let Some(io) = e.io_error() {
            let io = io::Error::new(io.kind(), io.to_string());
            if doing == "writing" && self.side == Side::Client {
                // A server that refused us may have reset the connection after its alert:
                // the alert may still be readable and says why.
                let mut byte = [0u8; 1];
                let r = lock(&self.ssl).ssl_read(&mut byte);
                if let Err(e) = r {
                    if e.io_error().is_none() && e.code() != ErrorCode::WANT_READ {
                        return self.failed(e, "reading");
                    }
                }
            }
            return io;
        }
        let reasons: Vec<&str> = e
            .ssl_error()
            .map(|s| s.errors().iter().filter_map(|x| x.reason()).collect())
            .unwrap_or_default();
        // In an established TLS 1.2 session, a handshake can only be a renegotiation, which
        // both sides refuse (see `common_settings`): a peer that insists ends with this alert.
        // Say so, rather than blame the ciphers the session was set up with.
        let renegotiation = reasons
            .iter()
            .any(|r| r.contains("alert handshake failure"))
            && lock(&self.ssl).ssl().version2() == Some(SslVersion::TLS1_2);
        let refused_renegotiation = |peer: &str| {
            format!(
                ": the {peer} wanted to renegotiate the TLS 1.2 session, which this {} refuses",
                side_name(self.side)
            )
        };
        let (kind, msg) = match reasons.iter().find(|r| r.contains("alert")) {
            Some(alert) if self.side == Side::Client => {
                let (kind, hint) = if renegotiation {
                    (TlsErrorKind::Renegotiation, refused_renegotiation("server"))
                } else {
                    let (kind, hint) = server_alert(alert, self.certificate_wanted);
                    (kind, hint.to_string())
                };
                (
                    kind,
                    format!(
                        "the server refused the connection after the handshake ({alert}){hint}"
                    ),
                )
            }
            _ => (
                if renegotiation {
                    TlsErrorKind::Renegotiation
                } else {
                    TlsErrorKind::Other
                },
                format!(
                    "TLS error while {doing} ({} side): {}{}",
                    side_name(self.side),
                    if reasons.is_empty() {
                        e.to_string()
                    } else {
                        reasons.join(", ")
                    },
                    if renegotiation {
                        refused_renegotiation("client")
                    } else {
                        String::new()
                    }
                ),
            ),
        };
        log::debug!("{}: {msg}", self.peer);
        lock(&self.failure).get_or_insert_with(|| TlsError::new(kind, msg.clone()));
        io::Error::other(msg)
    }

    /// Waits, without the SSL lock, until the socket is ready for `events` or `timeout`
    /// passes (then `TimedOut`).
    fn wait(&self, events: i16, timeout: Option<Duration>) -> io::Result<()> {
        if self.closing.load(Ordering::Acquire) {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "connection closed",
            ));
        }
        let r = sys::wait_fd(self.fd, events, timeout)?;
        if r == 0 && timeout.is_some() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "TLS wait timed out",
            ));
        }
        Ok(())
    }

    fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        // With nothing decrypted or buffered, wait for the socket first, outside the SSL lock.
        let mut filled = false;
        loop {
            let r = {
                let mut s = lock(&self.ssl);
                if filled || s.ssl().pending() > 0 || s.get_ref().ready() {
                    let r = s.ssl_read(buf);
                    self.read_pending
                        .store(s.ssl().pending() > 0, Ordering::Relaxed);
                    Some(r)
                } else {
                    None
                }
            };
            let Some(r) = r else {
                self.fill()?;
                filled = true;
                continue;
            };
            let e = match r {
                Ok(n) => return Ok(n),
                Err(e) => e,
            };
            match e.code() {
                ErrorCode::WANT_READ => {
                    self.fill()?;
                    filled = true;
                }
                ErrorCode::WANT_WRITE => self.wait(POLLOUT, *lock(&self.read_timeout))?,
                // A close_notify, or the socket's end without one: the frame layer tells a
                // clean end between frames from a truncated frame.
                ErrorCode::ZERO_RETURN => return Ok(0),
                ErrorCode::SYSCALL if e.io_error().is_none() => return Ok(0),
                _ if self.closing.load(Ordering::Acquire) => return Ok(0),
                _ if is_unexpected_eof(&e) => return Ok(0),
                _ => return Err(self.failed(e, "reading")),
            }
        }
    }

    /// Waits for the socket and reads what it has into the SSL object's buffer, holding only
    /// the buffer (which no other thread needs meanwhile), never the SSL lock: the one place a
    /// TLS connection blocks on input. The socket's read timeout bounds the wait (then
    /// `WouldBlock` or `TimedOut`, and the empty buffer is given back); a shutdown from any
    /// thread ends it.
    fn fill(&self) -> io::Result<()> {
        if self.closing.load(Ordering::Acquire) {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "connection closed",
            ));
        }
        let timeout = *lock(&self.read_timeout);
        let mut rb = lock(&self.rbuf);
        if rb.ready() {
            return Ok(());
        }
        if rb.bytes.is_released() {
            // Given back while quiet: wait for input before taking a buffer again.
            self.wait(POLLIN, timeout)?;
        }
        let n = loop {
            match (&self.sock).read(rb.bytes.room(0)) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    rb.bytes.release();
                    return Err(e);
                }
                r => break r?,
            }
        };
        rb.filled(n);
        Ok(())
    }

    /// Writes a prefix of `buf`; see [`TlsWriter`]'s [`Sink`] implementation.
    fn write(
        &self,
        buf: &[u8],
        until: Option<Instant>,
        stall: &mut Stall,
        committed: &mut bool,
    ) -> io::Result<usize> {
        loop {
            if self.closing.load(Ordering::Acquire) {
                return Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "connection closed",
                ));
            }
            // After WANT_WRITE the same bytes are offered again, as OpenSSL requires.
            let r = lock(&self.ssl).ssl_write(buf);
            let e = match r {
                Ok(n) => {
                    *committed = false;
                    stall.progress();
                    return Ok(n);
                }
                Err(e) => e,
            };
            match e.code() {
                ErrorCode::WANT_WRITE => {
                    // Part of a record may already be out: these bytes must follow.
                    *committed = true;
                    if !stall.wait(self.fd, POLLOUT, until)? {
                        return Ok(0);
                    }
                }
                // Only a handshake message wants input before our data can go (renegotiation
                // is refused on both sides, so this is not expected): the reading thread takes
                // that input, so look again soon, under the same deadlines as for room.
                ErrorCode::WANT_READ => {
                    *committed = true;
                    let slice = Some(Duration::from_millis(5));
                    if !stall.wait_at_most(self.fd, POLLIN, until, slice)? {
                        return Ok(0);
                    }
                }
                ErrorCode::ZERO_RETURN => {
                    return Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "the peer closed the TLS session",
                    ))
                }
                _ => return Err(self.failed(e, "writing")),
            }
        }
    }
}

fn is_unexpected_eof(e: &ssl::Error) -> bool {
    e.ssl_error().is_some_and(|s| {
        s.errors()
            .iter()
            .any(|x| x.reason().is_some_and(|r| r.contains("unexpected eof")))
    })
}

impl Control for TlsConn {
    fn shutdown(&self) {
        if self.closing.swap(true, Ordering::AcqRel) {
            let _ = self.sock.shutdown(std::net::Shutdown::Both);
            return;
        }
        // A polite close_notify if the SSL object is free right now (it is only ever held for
        // one non-blocking call); never wait for it.
        if let Ok(mut s) = self.ssl.try_lock() {
            let _ = s.shutdown();
        }
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
    }

    fn set_read_timeout(&self, d: Option<Duration>) -> io::Result<()> {
        let d = d.filter(|d| !d.is_zero());
        self.sock.set_read_timeout(d)?;
        *lock(&self.read_timeout) = d;
        Ok(())
    }

    fn failure(&self) -> Option<Error> {
        lock(&self.failure).clone().map(Error::Tls)
    }

    /// Decrypted bytes OpenSSL kept, bytes read from the socket and not yet taken by OpenSSL,
    /// or input in the socket.
    fn input_waiting(&self) -> bool {
        self.read_pending.load(Ordering::Relaxed)
            || self.rbuf.try_lock().map_or(true, |rb| rb.ready())
            || sys::readable_now(self.fd)
    }
}

struct TlsReader(Arc<TlsConn>);

impl Read for TlsReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

/// The write half: one frame at a time, from the connection's writer.
struct TlsWriter {
    conn: Arc<TlsConn>,
    stall: Stall,
    committed: bool,
}

impl Sink for TlsWriter {
    fn send(&mut self, buf: &[u8], until: Option<Instant>) -> io::Result<usize> {
        self.conn
            .write(buf, until, &mut self.stall, &mut self.committed)
    }

    fn committed(&self) -> bool {
        self.committed
    }
}
