//! The tunnel thread: one thread, one SSH session, any number of forwarded connections.
//!
//! # Who owns what
//!
//! [`SshTunnel::open`] authenticates an SSH session on the calling thread (blocking, bounded by
//! the connect timeout), binds a listener on `127.0.0.1:0` (the kernel picks a free port, so
//! there is no race for it, unlike RPyC #135) and hands both to one thread, which from then on
//! owns the session (in non-blocking mode), the listener, every accepted local socket and every
//! `direct-tcpip` channel. No lock is shared with it: libssh2 sessions are not safe to use from
//! two threads, and a blocking read would hold the session's lock against every writer.
//!
//! # The poll loop
//!
//! Each turn, the thread makes all the progress it can without waiting: it accepts waiting
//! local connections; opens the channel of the oldest one that has none (one open at a time:
//! concurrent opens mix channels up); moves bytes local socket -> channel and channel -> local
//! socket through two bounded buffers per connection; and repeats while anything moved, because
//! libssh2 reads packets for every channel whenever it reads one, so data can wait in its
//! buffers while the socket looks idle. Then it `poll(2)`s: the wake-up socket of
//! [`SshTunnel::close`], the listener, the SSH socket (readable when some channel can take
//! data; writable only after libssh2 reported it is blocked sending), and each local socket
//! (readable when its channel is open and its buffer has room; writable when bytes wait for
//! it). The timeout is long while nothing is pending (idle tunnels use no CPU) and short while
//! a libssh2 operation waits to be retried, since libssh2 cannot always say what it waits for.
//! A channel write that libssh2 could not finish is retried with the same bytes before
//! anything else happens on that channel: until that packet is out, libssh2 refuses all
//! other writes. Keepalives, when configured, are sent from the loop.
//!
//! # End of stream and close
//!
//! A local socket's end of stream is forwarded as the channel's EOF once its buffered bytes are
//! sent; the channel's EOF shuts down the local socket's writing side once its bytes are
//! delivered. When both directions have ended (or either side failed) the channel is closed
//! (close, then wait for the server's close) and the local socket dropped.
//!
//! # When the session dies
//!
//! If sshd goes away (the SSH socket hangs up or libssh2 reports a transport error) the thread
//! records why, drops every local socket (each local client sees the end of its stream at
//! once, so an rpyc connection fails its waiting calls with [`Error::Closed`]), frees every
//! channel and the session, and ends. [`SshTunnel::close`] wakes the thread, which closes the
//! channels politely (bounded to half a second), disconnects the session and ends; `close`
//! joins it, so after it returns no thread, socket or channel of the tunnel is left.

use super::{code, open_session, SshContext, EAGAIN};
use crate::base::lock;
use crate::base::sys::{self, PollFd, POLLHUP_OR_ERR, POLLIN, POLLOUT, POLLRDHUP};
use crate::error::Error;
use ssh2::{BlockDirections, Channel, Session};
use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Most bytes read at once from a socket or a channel.
const CHUNK: usize = 64 << 10;
/// Most bytes buffered per direction per connection; past it, that side is not read.
const BUF_CAP: usize = 1 << 20;
/// Poll timeout while a libssh2 operation waits to be retried.
const RETRY_POLL: Duration = Duration::from_millis(50);
/// Poll timeout while nothing is pending (only a safety net: nothing needs it).
const IDLE_POLL: Duration = Duration::from_secs(5);
/// How long a polite close of the channels and the session may take.
const CLOSE_GRACE: Duration = Duration::from_millis(500);

/// libssh2 errors after which the session is unusable (transport, protocol, crypto).
fn session_dead(code: i32) -> bool {
    matches!(
        code,
        -1 | -2 | -3 | -4 | -5 | -7 | -8 | -9 | -12 | -13 | -14 | -30 | -43 | -44 | -45 | -52
    )
}

/// A local TCP port forwarded through an SSH session to a host and port reachable from the SSH
/// server (like `ssh -L`).
///
/// The local end listens on `127.0.0.1`, on a port the system picks ([`SshTunnel::local_port`]).
/// Every connection made to it is forwarded through its own channel; any number may be open at
/// once. [`ssh_connect`](crate::ssh_connect) uses one to reach an rpyc server; use it on its own
/// for anything else that speaks TCP. Dropping the tunnel closes it.
///
/// ```no_run
/// use std::io::{Read, Write};
/// let ctx = rpyc::SshContext::new("myserver");
/// let tunnel = rpyc::ssh::SshTunnel::open(&ctx, "127.0.0.1", 5432)?;
/// let mut s = std::net::TcpStream::connect(("127.0.0.1", tunnel.local_port()))?;
/// s.write_all(b"hello")?;
/// tunnel.close();
/// # Ok::<(), rpyc::Error>(())
/// ```
///
/// # How it works
///
/// One thread per tunnel owns the SSH session (libssh2, non-blocking), the listener, every
/// local socket and every channel, and waits in one `poll(2)` for all of them; no lock is
/// shared with it. Channels are opened one at a time, as connections arrive. Each direction of
/// each connection has a bounded buffer, so a slow reader slows its own writer only (through
/// SSH flow control), not the other connections. End of stream travels both ways (a local
/// half-close becomes the channel's EOF, the channel's EOF a local half-close). An idle tunnel
/// sleeps in `poll` and uses no CPU. If sshd goes away, every local socket is closed at once,
/// so whatever reads them sees the end of the stream, and [`SshTunnel::failure`] says why.
/// [`SshTunnel::close`] (or dropping the tunnel) closes the channels and the session and joins
/// the thread. The design notes at the top of `src/ssh/tunnel.rs` give the details.
pub struct SshTunnel {
    local_port: u16,
    target: String,
    status: Arc<Mutex<Status>>,
    /// Dropping the sending half wakes the thread to stop.
    wake: Mutex<Option<UnixStream>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// What the thread reports to its owner.
#[derive(Default)]
struct Status {
    /// Why the session ended, if it died.
    dead: Option<String>,
    /// Why the last channel could not be opened.
    open_error: Option<String>,
    /// The thread has ended.
    ended: bool,
}

impl std::fmt::Debug for SshTunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshTunnel")
            .field("local_port", &self.local_port)
            .field("target", &self.target)
            .field("closed", &self.is_closed())
            .finish()
    }
}

impl SshTunnel {
    /// Opens an SSH session as `ctx` says and forwards a new local port to
    /// `remote_host:remote_port`, as seen from the SSH server (`127.0.0.1` is the server's own
    /// loopback).
    ///
    /// Fails if sshd cannot be reached, the host key is not trusted, or authentication is
    /// refused. Whether the remote port accepts connections is only known when one is made:
    /// a refused channel closes that local connection, and [`SshTunnel::failure`] says why.
    pub fn open(ctx: &SshContext, remote_host: &str, remote_port: u16) -> Result<SshTunnel, Error> {
        let (sess, sock, resolved) = open_session(ctx)?;
        let listener = TcpListener::bind(("127.0.0.1", 0)).map_err(|e| Error::Connect {
            addr: "127.0.0.1:0 (SSH tunnel's local end)".into(),
            source: Arc::new(e),
        })?;
        let local_port = listener.local_addr()?.port();
        listener.set_nonblocking(true)?;
        let (wake_tx, wake_rx) = UnixStream::pair()?;
        wake_rx.set_nonblocking(true)?;
        sess.set_blocking(false);
        let keepalive = resolved.keepalive.map(|d| (d.as_secs().max(2)) as u32);
        if let Some(secs) = keepalive {
            sess.set_keepalive(true, secs);
        }
        let target = format!("{remote_host}:{remote_port}");
        let status = Arc::new(Mutex::new(Status::default()));
        let mut tunnel_loop = Loop {
            sess,
            ssh_fd: sock.as_raw_fd(),
            _sock: sock,
            listener,
            wake: wake_rx,
            sshd: resolved.addr(),
            host: remote_host.to_string(),
            port: remote_port,
            waiting: VecDeque::new(),
            forwards: Vec::new(),
            next_id: 0,
            keepalive: keepalive.is_some(),
            next_keepalive: Instant::now(),
            status: status.clone(),
            scratch: vec![0; CHUNK],
            want_ssh_out: false,
            retrying: false,
            closing: false,
            listener_ready: true,
        };
        log::debug!(
            "ssh tunnel: 127.0.0.1:{local_port} -> {} -> {target}",
            resolved.addr()
        );
        let thread = std::thread::Builder::new()
            .name("rpyc-ssh-tunnel".into())
            .spawn(move || tunnel_loop.run())?;
        Ok(SshTunnel {
            local_port,
            target,
            status,
            wake: Mutex::new(Some(wake_tx)),
            thread: Mutex::new(Some(thread)),
        })
    }

    /// The local port (on `127.0.0.1`) that is forwarded.
    pub fn local_port(&self) -> u16 {
        self.local_port
    }

    /// Whether the tunnel has stopped: closed, or its SSH session died.
    pub fn is_closed(&self) -> bool {
        lock(&self.status).ended
    }

    /// Why the tunnel failed, if it did: the SSH session died, or the server refused to open
    /// the last forwarded connection (nothing listening there, forwarding prohibited).
    pub fn failure(&self) -> Option<String> {
        let s = lock(&self.status);
        s.dead.clone().or_else(|| s.open_error.clone())
    }

    /// Stops forwarding: closes every forwarded connection, the listener and the SSH session,
    /// and waits for the tunnel's thread to end (at most about half a second on a live session).
    /// Calling it again does nothing.
    pub fn close(&self) {
        drop(lock(&self.wake).take());
        let thread = lock(&self.thread).take();
        if let Some(t) = thread {
            if t.join().is_err() {
                log::error!("ssh tunnel to {}: the tunnel thread panicked", self.target);
            }
        }
    }
}

impl Drop for SshTunnel {
    fn drop(&mut self) {
        self.close();
    }
}

/// Bytes waiting to be written, consumed from the front.
#[derive(Default)]
struct Buf {
    data: Vec<u8>,
    start: usize,
}

impl Buf {
    fn len(&self) -> usize {
        self.data.len() - self.start
    }
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn bytes(&self) -> &[u8] {
        &self.data[self.start..]
    }
    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.data.len() {
            self.data.clear();
            self.start = 0;
        }
    }
    fn extend(&mut self, bytes: &[u8]) {
        if self.start > 0 && self.start >= self.data.len() / 2 {
            self.data.drain(..self.start);
            self.start = 0;
        }
        self.data.extend_from_slice(bytes);
    }
    fn clear(&mut self) {
        self.data = Vec::new();
        self.start = 0;
    }
}

/// One forwarded connection whose channel is open: a local socket and its channel.
struct Forward {
    id: u64,
    local: Option<TcpStream>,
    channel: Option<Channel>,
    /// Local -> channel.
    up: Buf,
    /// Channel -> local.
    down: Buf,
    /// The local side sent its end of stream (or failed).
    local_eof: bool,
    /// The local socket may have bytes: poll said so, or no read has said otherwise yet.
    local_readable: bool,
    eof_sent: bool,
    /// The channel sent its end of stream.
    remote_eof: bool,
    local_shut: bool,
    /// The last channel write could not finish: retry it with the same bytes first.
    write_blocked: bool,
    /// The server's window for this channel is full: its adjustment arrives on the SSH socket
    /// (and may already have been read by libssh2 for another channel's sake).
    window_full: bool,
    /// Something failed: close the channel as soon as no write is half done.
    broken: bool,
    close_sent: bool,
    closed: bool,
}

impl Forward {
    fn new(id: u64, local: TcpStream, channel: Channel) -> Forward {
        Forward {
            id,
            local: Some(local),
            channel: Some(channel),
            up: Buf::default(),
            down: Buf::default(),
            local_eof: false,
            local_readable: true,
            eof_sent: false,
            remote_eof: false,
            local_shut: false,
            write_blocked: false,
            window_full: false,
            broken: false,
            close_sent: false,
            closed: false,
        }
    }

    /// Both directions are over (or something failed) and no write is half done.
    fn finished(&self) -> bool {
        !self.write_blocked
            && (self.broken
                || (self.eof_sent && self.remote_eof && self.down.is_empty() && self.local_shut))
    }

    /// Whether the next turn will call into libssh2 in a way that reads the SSH socket.
    fn reads_ssh(&self) -> bool {
        self.channel.is_some()
            && ((!self.remote_eof && !self.broken && self.down.len() < BUF_CAP)
                || self.write_blocked
                || self.window_full
                || (self.finished() && !self.closed))
    }

    fn drop_local(&mut self) {
        self.local = None;
        self.local_eof = true;
        self.local_shut = true;
        self.down.clear();
    }

    /// The local socket failed: drop it; the channel is closed once pending bytes are out.
    fn local_failed(&mut self, e: &io::Error) {
        log::debug!("ssh tunnel: local connection #{}: {e}", self.id);
        self.drop_local();
        self.broken = true;
    }
}

/// Why the loop stopped.
enum Stop {
    /// Closed by the owner.
    Closed,
    /// The session died; why.
    Dead(String),
}

struct Loop {
    sess: Session,
    ssh_fd: RawFd,
    /// A second handle of the session's socket, kept so the fd stays valid as long as we poll it.
    _sock: TcpStream,
    listener: TcpListener,
    wake: UnixStream,
    sshd: String,
    host: String,
    port: u16,
    /// Accepted local connections waiting for their channel, oldest first: the front one's is
    /// opened (one at a time); none is read or polled before.
    waiting: VecDeque<(u64, TcpStream)>,
    /// Connections whose channel is open, in the order they were accepted.
    forwards: Vec<Forward>,
    next_id: u64,
    keepalive: bool,
    next_keepalive: Instant,
    status: Arc<Mutex<Status>>,
    scratch: Vec<u8>,
    /// libssh2 is blocked sending: poll the SSH socket for writability.
    want_ssh_out: bool,
    /// Some libssh2 operation returned EAGAIN and must be retried: poll with a short timeout.
    retrying: bool,
    /// Closing: accept and open nothing new.
    closing: bool,
    /// The listener was reported readable (saves an `accept` per turn).
    listener_ready: bool,
}

impl Loop {
    fn run(&mut self) {
        let stop = self.serve();
        match stop {
            Stop::Closed => self.close_politely(),
            Stop::Dead(ref why) => {
                log::warn!("ssh tunnel via {}: {why}", self.sshd);
                for f in &mut self.forwards {
                    f.drop_local();
                }
                self.waiting.clear();
            }
        }
        // Free the channels, then the session (with a short blocking timeout: a dead socket
        // fails at once, a live one has already been closed politely).
        self.sess.set_timeout(200);
        self.sess.set_blocking(true);
        self.forwards.clear();
        let mut s = lock(&self.status);
        if let Stop::Dead(why) = stop {
            s.dead = Some(why);
        }
        s.ended = true;
    }

    fn serve(&mut self) -> Stop {
        loop {
            // Make all the progress possible without waiting.
            let mut turns = 0;
            loop {
                self.want_ssh_out = false;
                self.retrying = false;
                match self.turn() {
                    Err(why) => return Stop::Dead(why),
                    Ok(false) => break,
                    Ok(true) => {}
                }
                turns += 1;
                if turns >= 64 {
                    break; // let poll see the wake-up socket now and then
                }
            }
            // A window adjustment libssh2 read while serving another channel wakes nothing.
            let window_opened = self.forwards.iter().any(|f| {
                f.window_full
                    && !f.up.is_empty()
                    && f.channel
                        .as_ref()
                        .is_some_and(|c| c.write_window().remaining > 0)
            });
            let busy = turns >= 64 || window_opened;
            let reads_ssh = self.forwards.iter().any(|f| f.reads_ssh()) || !self.waiting.is_empty();
            let mut fds = vec![
                PollFd::new(self.wake.as_raw_fd(), POLLIN),
                PollFd::new(self.listener.as_raw_fd(), POLLIN),
                PollFd::new(
                    self.ssh_fd,
                    (if reads_ssh { POLLIN } else { POLLRDHUP })
                        | if self.want_ssh_out { POLLOUT } else { 0 },
                ),
            ];
            let mut polled = Vec::new();
            for (i, f) in self.forwards.iter().enumerate() {
                let (Some(local), Some(_)) = (&f.local, &f.channel) else {
                    continue;
                };
                let mut ev = 0;
                if !f.local_eof && !f.broken && f.up.len() < BUF_CAP {
                    ev |= POLLIN;
                }
                if !f.down.is_empty() {
                    ev |= POLLOUT;
                }
                if ev != 0 {
                    fds.push(PollFd::new(local.as_raw_fd(), ev));
                    polled.push(i);
                }
            }
            let timeout = if busy {
                Duration::ZERO
            } else if self.retrying {
                RETRY_POLL
            } else if self.keepalive {
                self.next_keepalive
                    .saturating_duration_since(Instant::now())
                    .min(IDLE_POLL)
            } else {
                IDLE_POLL
            };
            // sshd runs with Nagle's algorithm on: if what libssh2 just read goes unacknowledged
            // (a message that needs no answer, such as its host keys after login), sshd's next
            // packet waits for our delayed ACK, up to 40 ms. Acknowledge before sleeping.
            let _ = sys::tcp_quickack(self.ssh_fd);
            if let Err(e) = sys::poll(&mut fds, Some(timeout)) {
                return Stop::Dead(format!("poll failed: {e}"));
            }
            if fds[0].revents != 0 {
                return Stop::Closed;
            }
            self.listener_ready |= fds[1].revents != 0;
            for (p, &i) in fds[3..].iter().zip(&polled) {
                if p.revents & !POLLOUT != 0 {
                    self.forwards[i].local_readable = true;
                }
            }
            let ssh = fds[2].revents;
            if ssh & (POLLHUP_OR_ERR | POLLRDHUP) != 0 {
                // sshd has finished sending: deliver what already arrived, then give up.
                for _ in 0..64 {
                    match self.turn() {
                        Ok(true) => {}
                        _ => break,
                    }
                }
                return Stop::Dead(format!(
                    "the SSH connection to {} was closed by the other side",
                    self.sshd
                ));
            }
        }
    }

    /// One pass over everything; returns whether anything moved, or why the session died.
    fn turn(&mut self) -> Result<bool, String> {
        let mut progress = false;
        // New local connections.
        while !self.closing && self.listener_ready {
            match self.listener.accept() {
                Ok((s, _)) => {
                    if s.set_nonblocking(true).is_ok() {
                        let _ = s.set_nodelay(true);
                        self.next_id += 1;
                        log::trace!("ssh tunnel: local connection #{} accepted", self.next_id);
                        self.waiting.push_back((self.next_id, s));
                        progress = true;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.listener_ready = false;
                    break;
                }
                Err(e) => {
                    log::warn!("ssh tunnel: accept failed: {e}");
                    break;
                }
            }
        }
        progress |= self.open_one()?;
        let mut forwards = std::mem::take(&mut self.forwards);
        let result = forwards
            .iter_mut()
            .filter(|f| f.channel.is_some())
            .try_fold(false, |p, f| Ok::<_, String>(self.pump(f)? | p));
        forwards.retain(|f| !f.closed);
        self.forwards = forwards;
        progress |= result?;
        if self.keepalive && Instant::now() >= self.next_keepalive {
            match self.sess.keepalive_send() {
                Ok(secs) => {
                    self.next_keepalive = Instant::now() + Duration::from_secs(secs.max(1) as u64)
                }
                Err(e) if code(&e) == EAGAIN => self.eagain(),
                Err(e) => return Err(format!("keepalive failed: {e}")),
            }
        }
        Ok(progress)
    }

    /// Notes that a libssh2 operation must be retried, and on which event.
    fn eagain(&mut self) {
        self.retrying = true;
        if matches!(
            self.sess.block_directions(),
            BlockDirections::Outbound | BlockDirections::Both
        ) {
            self.want_ssh_out = true;
        }
    }

    /// The error of the last channel operation: session-fatal (`Err`) or not (`Ok(msg)`).
    fn channel_error(&self, e: &io::Error) -> Result<String, String> {
        match ssh2::Error::last_session_error(&self.sess) {
            Some(le) if session_dead(code(&le)) => Err(format!("SSH session failed: {le}")),
            _ => Ok(e.to_string()),
        }
    }

    /// Opens the channel of the oldest waiting connection, which then becomes a `Forward`
    /// (one open at a time).
    fn open_one(&mut self) -> Result<bool, String> {
        if self.closing || self.waiting.is_empty() {
            return Ok(false);
        }
        match self.sess.channel_direct_tcpip(&self.host, self.port, None) {
            Ok(ch) => {
                let (id, local) = self.waiting.pop_front().expect("a connection is waiting");
                self.forwards.push(Forward::new(id, local, ch));
                Ok(true)
            }
            Err(e) if code(&e) == EAGAIN => {
                self.eagain();
                Ok(false)
            }
            Err(e) if session_dead(code(&e)) => Err(format!("SSH session failed: {e}")),
            Err(e) => {
                let msg = e.message();
                let hint = if msg.contains("connect failed") {
                    format!(
                        "is anything listening on {}:{} as seen from {}?",
                        self.host, self.port, self.sshd
                    )
                } else if msg.contains("prohibited") {
                    "the server refuses TCP forwarding (AllowTcpForwarding or PermitOpen in its \
                     sshd_config, or a restriction on the key)"
                        .to_string()
                } else {
                    "see the server's log".to_string()
                };
                let why = format!(
                    "{} could not open a forward to {}:{}: {msg}; {hint}",
                    self.sshd, self.host, self.port
                );
                log::warn!("ssh tunnel: {why}");
                lock(&self.status).open_error = Some(why);
                // Dropping the local socket tells its client at once.
                self.waiting.pop_front();
                Ok(true)
            }
        }
    }

    /// The outcome of one non-blocking step of closing a channel: `Ok(true)` when it is done
    /// (or failed in a way that leaves nothing to wait for), `Ok(false)` to retry later, an
    /// error when the whole session is dead.
    fn channel_step(
        &mut self,
        r: Result<(), ssh2::Error>,
        what: &str,
        id: u64,
    ) -> Result<bool, String> {
        match r {
            Ok(()) => Ok(true),
            Err(e) if code(&e) == EAGAIN => {
                self.eagain();
                Ok(false)
            }
            Err(e) if session_dead(code(&e)) => Err(format!("SSH session failed: {e}")),
            Err(e) => {
                log::debug!("ssh tunnel: channel #{id}: {what}: {e}");
                Ok(true)
            }
        }
    }

    /// Moves what can move for one connection with an open channel (nothing without one).
    fn pump(&mut self, f: &mut Forward) -> Result<bool, String> {
        let mut progress = false;
        let Some(mut ch) = f.channel.take() else {
            return Ok(false);
        };
        let result = self.pump_channel(f, &mut ch, &mut progress);
        f.channel = Some(ch);
        result.map(|()| progress)
    }

    fn pump_channel(
        &mut self,
        f: &mut Forward,
        ch: &mut Channel,
        progress: &mut bool,
    ) -> Result<(), String> {
        // Local -> buffer.
        if !f.local_eof && !f.broken && f.local_readable {
            while f.up.len() < BUF_CAP {
                let Some(local) = f.local.as_mut() else { break };
                let n = CHUNK.min(BUF_CAP - f.up.len());
                match local.read(&mut self.scratch[..n]) {
                    Ok(0) => {
                        f.local_eof = true;
                        *progress = true;
                        break;
                    }
                    Ok(n) => {
                        f.up.extend(&self.scratch[..n]);
                        *progress = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        f.local_readable = false;
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        f.local_failed(&e);
                        *progress = true;
                        break;
                    }
                }
            }
        }
        // Buffer -> channel. A half-done write is retried even when the connection is broken:
        // libssh2 accepts no other write on the session until it is out.
        while !f.up.is_empty() && (!f.broken || f.write_blocked) {
            match ch.write(f.up.bytes()) {
                Ok(0) => {
                    // No packet was started, so nothing must be retried with these bytes.
                    f.window_full = true;
                    break;
                }
                Ok(n) => {
                    f.up.consume(n);
                    f.write_blocked = false;
                    f.window_full = false;
                    *progress = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    f.write_blocked = true;
                    self.eagain();
                    break;
                }
                Err(e) => {
                    let why = self.channel_error(&e)?;
                    log::debug!("ssh tunnel: channel #{}: write failed: {why}", f.id);
                    f.write_blocked = false;
                    f.broken = true;
                    f.up.clear();
                    *progress = true;
                    break;
                }
            }
        }
        // Local end of stream -> channel EOF.
        if f.local_eof && f.up.is_empty() && !f.eof_sent && !f.broken {
            match ch.send_eof() {
                Ok(()) => {
                    f.eof_sent = true;
                    *progress = true;
                }
                Err(e) if code(&e) == EAGAIN => self.eagain(),
                Err(e) if session_dead(code(&e)) => return Err(format!("SSH session failed: {e}")),
                Err(e) => {
                    log::debug!("ssh tunnel: channel #{}: send_eof: {e}", f.id);
                    f.eof_sent = true;
                    *progress = true;
                }
            }
        }
        // Channel -> buffer.
        if !f.remote_eof && !f.broken {
            while f.down.len() < BUF_CAP {
                let n = CHUNK.min(BUF_CAP - f.down.len());
                match ch.read(&mut self.scratch[..n]) {
                    Ok(0) => {
                        if ch.eof() {
                            f.remote_eof = true;
                            *progress = true;
                        }
                        break;
                    }
                    Ok(n) => {
                        if f.local.is_some() {
                            f.down.extend(&self.scratch[..n]);
                        }
                        *progress = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        let why = self.channel_error(&e)?;
                        log::debug!("ssh tunnel: channel #{}: read failed: {why}", f.id);
                        f.broken = true;
                        *progress = true;
                        break;
                    }
                }
            }
        }
        // Buffer -> local.
        while !f.down.is_empty() {
            let Some(local) = f.local.as_mut() else { break };
            match local.write(f.down.bytes()) {
                Ok(n) => {
                    f.down.consume(n);
                    *progress = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    f.local_failed(&e);
                    *progress = true;
                    break;
                }
            }
        }
        // Channel end of stream -> local.
        if f.remote_eof && f.down.is_empty() && !f.local_shut {
            if let Some(local) = &f.local {
                let _ = local.shutdown(Shutdown::Write);
            }
            f.local_shut = true;
            *progress = true;
        }
        // Both over: close the channel, then wait for the server's close.
        if f.finished() && !f.closed {
            if !f.close_sent && self.channel_step(ch.close(), "close", f.id)? {
                f.close_sent = true;
                *progress = true;
            }
            if f.close_sent {
                if self.channel_step(ch.wait_close(), "wait_close", f.id)? {
                    f.closed = true;
                    *progress = true;
                }
                if f.closed {
                    log::trace!("ssh tunnel: local connection #{} closed", f.id);
                    f.local = None;
                }
            }
        }
        Ok(())
    }

    /// On close by the owner: drop the local sockets, close every channel and the session,
    /// within [`CLOSE_GRACE`].
    fn close_politely(&mut self) {
        let deadline = Instant::now() + CLOSE_GRACE;
        self.closing = true;
        for f in &mut self.forwards {
            f.drop_local();
            f.broken = true;
        }
        self.waiting.clear();
        while !self.forwards.is_empty() && Instant::now() < deadline {
            self.want_ssh_out = false;
            self.retrying = false;
            match self.turn() {
                Err(_) => return,
                Ok(true) => continue,
                Ok(false) => {}
            }
            let ev = POLLIN | if self.want_ssh_out { POLLOUT } else { 0 };
            let left = deadline.saturating_duration_since(Instant::now());
            match sys::wait_fd(self.ssh_fd, ev, Some(left.min(RETRY_POLL))) {
                Ok(r) if r & POLLHUP_OR_ERR != 0 => return,
                Ok(_) => {}
                Err(_) => return,
            }
        }
        if Instant::now() < deadline {
            loop {
                match self
                    .sess
                    .disconnect(None, "closed by rpyc", None)
                    .map_err(|e| code(&e))
                {
                    Err(EAGAIN) if Instant::now() < deadline => {
                        let _ = sys::wait_fd(self.ssh_fd, POLLOUT, Some(RETRY_POLL));
                    }
                    _ => break,
                }
            }
        }
    }
}
