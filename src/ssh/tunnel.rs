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
//! # A forwarded connection's states
//!
//! An accepted local socket waits in a queue, neither read nor polled, until its channel is
//! open; only then does it become a `Forward`. Its progress is then three small enums, gathered
//! in `State`, and each step of the loop is a rule over them:
//!
//! - each direction (`Flow`): `Open` (its source is read) -> `Draining` (the source ended: the
//!   buffered bytes go out, then the end of stream) -> `Closed`;
//! - the channel (`ChannelState`): `Open` -> `Closing` (close sent, waiting for the server's
//!   close) -> `Closed`, or `Open` -> `Broken` -> `Closing` when something failed (nothing more
//!   is read from either side, no end of stream goes to the channel);
//! - the last channel write (`ChannelWrite`): `Clear`, or `Pending` after libssh2 answered
//!   EAGAIN (the bytes it was offered stay at the front of the upward buffer, to be offered
//!   again).
//!
//! Close is sent when both directions are `Closed`, or the channel is `Broken`, and no write is
//! pending.
//!
//! # libssh2 rules
//!
//! Each was found by a failure; the steps below say which they honour.
//!
//! 1. After EAGAIN, a channel write is retried with the same bytes before anything else; until
//!    that packet is out, every other write on the session answers EAGAIN too.
//! 2. One `direct-tcpip` channel is opened at a time per session (concurrent opens mix
//!    channels up).
//! 3. After any progress, every channel is read until EAGAIN: libssh2 buffers data for all
//!    channels whenever it reads, so the SSH socket may not look readable.
//! 4. A local socket is not polled before its channel is open (a busy loop otherwise).
//! 5. A transport error, or a hang-up of the SSH socket, means the session is dead: everything
//!    is torn down (otherwise the loop spins).
//! 6. A channel is closed, then its close awaited (`close`, `wait_close`), before it is dropped.
//! 7. Keepalives are sent from the loop: libssh2 has no timer of its own.
//!
//! # When the session dies
//!
//! If sshd goes away (the SSH socket hangs up or libssh2 reports a transport error) the thread
//! records why, drops every local socket (each local client sees the end of its stream at
//! once, so an rpyc connection fails its waiting calls with [`Error::Closed`]), frees every
//! channel and the session, and ends. [`SshTunnel::close`] wakes the thread, which closes the
//! channels politely (bounded to half a second), disconnects the session and ends; `close`
//! joins it, so after it returns no thread, socket or channel of the tunnel is left.

use super::{code, open_session, session_dead, Link, SshContext, EAGAIN};
use crate::base::lock;
use crate::base::sys::{self, PollFd, POLLHUP_OR_ERR, POLLIN, POLLOUT, POLLRDHUP};
use crate::error::{Error, SshError, SshErrorKind};
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
    /// Why the tunnel ended, if not closed by its owner.
    failed: Option<SshError>,
    /// Why the last channel could not be opened.
    open_error: Option<SshError>,
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
            ssh_fd: sock.fd(),
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

    /// Why the tunnel failed, if it did: the SSH session died
    /// ([`SshErrorKind::SessionLost`]), the tunnel's own wait for its sockets failed
    /// ([`SshErrorKind::Other`]), or the server refused to open the last forwarded connection
    /// (nothing listening there: [`SshErrorKind::TargetUnreachable`]; forwarding prohibited:
    /// [`SshErrorKind::ForwardingRefused`]).
    pub fn failure(&self) -> Option<SshError> {
        let s = lock(&self.status);
        s.failed.clone().or_else(|| s.open_error.clone())
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

/// How far one direction of a forwarded connection has got: local socket -> channel
/// ("upward") or channel -> local socket ("downward").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flow {
    /// The source is read and its bytes are passed on.
    Open,
    /// The source ended: the bytes buffered from it are passed on, then its end of stream.
    Draining,
    /// Over: the end of stream was passed on, or the local socket is gone.
    Closed,
}

/// Where a forwarded connection's channel stands. (Before it is open, the connection is only
/// a local socket waiting in [`Loop::waiting`].)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ChannelState {
    /// Bytes move as the two directions allow.
    Open,
    /// Something failed (the local socket, a channel read or write) or the tunnel is closing:
    /// nothing more is read from either side and no end of stream goes to the channel. Bytes
    /// already buffered for the local socket are still delivered (with its end of stream, if
    /// the channel sent one) until the channel is closed.
    Broken,
    /// `close()` went out: waiting for the server's close (`wait_close()`).
    Closing,
    /// The server's close arrived: the connection is dropped at the end of the turn.
    Closed,
}

/// Whether libssh2 may hold a packet made of this connection's bytes that it could not send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ChannelWrite {
    /// No write is half done.
    Clear,
    /// The last write answered EAGAIN (or no write has taken bytes since): libssh2 may have
    /// built a packet from the bytes it was offered. Those bytes are still at the front of the
    /// upward buffer, which only a successful write consumes, and they are offered again before
    /// anything else happens on this channel (rule 1).
    Pending,
}

/// Where a forwarded connection stands. Plain values, so the rules are tested without sockets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct State {
    channel: ChannelState,
    /// Local socket -> channel.
    upward: Flow,
    /// Channel -> local socket.
    downward: Flow,
    /// The last write to the channel.
    write: ChannelWrite,
}

impl State {
    /// A connection whose channel has just opened.
    const OPENED: State = State {
        channel: ChannelState::Open,
        upward: Flow::Open,
        downward: Flow::Open,
        write: ChannelWrite::Clear,
    };

    /// The local socket is read while the upward direction is open and nothing failed.
    fn reads_local(self) -> bool {
        self.channel == ChannelState::Open && self.upward == Flow::Open
    }

    /// The upward buffer is offered to the channel while nothing failed; after a failure, only
    /// to finish the write libssh2 answered EAGAIN to (rule 1).
    fn writes_channel(self) -> bool {
        self.channel == ChannelState::Open || self.write == ChannelWrite::Pending
    }

    /// The channel's EOF goes out once the local socket ended and all its bytes are in the
    /// channel (`up_empty`), unless something failed.
    fn sends_eof(self, up_empty: bool) -> bool {
        self.channel == ChannelState::Open && self.upward == Flow::Draining && up_empty
    }

    /// The channel is read while the downward direction is open and nothing failed.
    fn reads_channel(self) -> bool {
        self.channel == ChannelState::Open && self.downward == Flow::Open
    }

    /// The local socket's writing side is shut down once the channel's EOF arrived and all the
    /// bytes before it are delivered (`down_empty`), failure or not.
    fn shuts_local(self, down_empty: bool) -> bool {
        self.downward == Flow::Draining && down_empty
    }

    /// `close()` goes out once the connection is over (both directions closed, or broken) and
    /// no write is half done: libssh2 must send that packet first (rule 1).
    fn close_due(self) -> bool {
        self.write == ChannelWrite::Clear
            && match self.channel {
                ChannelState::Open => self.upward == Flow::Closed && self.downward == Flow::Closed,
                ChannelState::Broken => true,
                ChannelState::Closing | ChannelState::Closed => false,
            }
    }

    /// Something failed: an open channel is closed as soon as no write is half done. A channel
    /// whose close is under way or done stays so.
    fn fail(&mut self) {
        if self.channel == ChannelState::Open {
            self.channel = ChannelState::Broken;
        }
    }

    /// The local socket is gone: both directions are over, and so is the connection.
    fn local_dropped(&mut self) {
        self.upward = Flow::Closed;
        self.downward = Flow::Closed;
        self.fail();
    }
}

/// One forwarded connection whose channel is open: a local socket and its channel.
struct Forward {
    id: u64,
    /// `None` once dropped: it failed, the tunnel is closing, or the channel has closed.
    local: Option<TcpStream>,
    channel: Channel,
    /// Local -> channel.
    up: Buf,
    /// Channel -> local.
    down: Buf,
    state: State,
    /// A hint, not progress: the local socket may have bytes (poll said so, or no read has said
    /// otherwise yet).
    local_readable: bool,
    /// A hint, not progress: the last write that settled took nothing, the server's window for
    /// this channel is full. Its adjustment arrives on the SSH socket (and may already have been
    /// read by libssh2 for another channel's sake).
    window_full: bool,
}

impl Forward {
    fn new(id: u64, local: TcpStream, channel: Channel) -> Forward {
        Forward {
            id,
            local: Some(local),
            channel,
            up: Buf::default(),
            down: Buf::default(),
            state: State::OPENED,
            local_readable: true,
            window_full: false,
        }
    }

    /// Whether the next turn will call into libssh2 in a way that reads the SSH socket.
    fn reads_ssh(&self) -> bool {
        (self.state.reads_channel() && self.down.len() < BUF_CAP)
            || self.state.write == ChannelWrite::Pending
            || self.window_full
            || self.state.close_due()
            || self.state.channel == ChannelState::Closing
    }

    /// Drops the local socket (it failed, or the tunnel is closing or dead), and with it the
    /// connection: nothing more moves either way. The upward bytes stay, in case a write of
    /// them is pending (rule 1); the channel is closed once none is.
    fn drop_local(&mut self) {
        self.local = None;
        self.state.local_dropped();
        self.down.clear();
    }

    /// The local socket failed: drop it; the channel is closed once pending bytes are out.
    fn local_failed(&mut self, e: &io::Error) {
        log::debug!("ssh tunnel: local connection #{}: {e}", self.id);
        self.drop_local();
    }

    /// Step 1, local socket -> upward buffer: reads until EAGAIN or the buffer is full, while
    /// the upward direction is open, nothing failed and the socket may have bytes. Its end of
    /// stream starts draining the upward direction. (Rule 4 holds by construction: a
    /// connection is a `Forward` only once its channel is open.)
    fn read_local(&mut self, scratch: &mut [u8]) -> bool {
        let mut progress = false;
        if self.state.reads_local() && self.local_readable {
            while self.up.len() < BUF_CAP {
                let Some(local) = &self.local else {
                    break;
                };
                let n = CHUNK.min(BUF_CAP - self.up.len());
                match sys::recv_nowait(local.as_raw_fd(), &mut scratch[..n]) {
                    Ok(0) => {
                        self.state.upward = Flow::Draining;
                        progress = true;
                        break;
                    }
                    Ok(n) => {
                        self.up.extend(&scratch[..n]);
                        progress = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.local_readable = false;
                        break;
                    }
                    Err(e) => {
                        self.local_failed(&e);
                        progress = true;
                        break;
                    }
                }
            }
        }
        progress
    }

    /// Step 5, downward buffer -> local socket: writes until the buffer is empty or the socket
    /// would block. Runs in every state, so bytes that arrived before a failure still reach
    /// the local socket while the channel closes.
    fn write_local(&mut self) -> bool {
        let mut progress = false;
        while !self.down.is_empty() {
            let Some(local) = &self.local else {
                break;
            };
            match sys::send_nowait(local.as_raw_fd(), self.down.bytes()) {
                Ok(n) => {
                    self.down.consume(n);
                    progress = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    self.local_failed(&e);
                    progress = true;
                    break;
                }
            }
        }
        progress
    }

    /// Step 6, channel end of stream -> local socket: once the channel's EOF arrived and the
    /// bytes before it are delivered, shuts down the socket's writing side (its client sees
    /// the end of the stream and may still send).
    fn shut_local(&mut self) -> bool {
        if !self.state.shuts_local(self.down.is_empty()) {
            return false;
        }
        if let Some(local) = &self.local {
            let _ = local.shutdown(Shutdown::Write);
        }
        self.state.downward = Flow::Closed;
        true
    }
}

/// Why the loop stopped.
enum Stop {
    /// Closed by the owner.
    Closed,
    /// The session died, or the loop cannot go on; why.
    Failed(SshError),
}

impl Stop {
    /// The session died; why.
    fn lost(why: String) -> Stop {
        Stop::Failed(SshError::new(SshErrorKind::SessionLost, why))
    }
}

struct Loop {
    sess: Session,
    ssh_fd: RawFd,
    /// The session's socket (a second handle, kept so the fd stays valid as long as we poll
    /// it) and what it needs alive (a jump host's tunnel, a proxy command).
    _sock: Link,
    listener: TcpListener,
    wake: UnixStream,
    sshd: String,
    host: String,
    port: u16,
    /// Accepted local connections waiting for their channel, oldest first: the front one's is
    /// opened (one at a time, rule 2); none is read or polled before (rule 4).
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
            Stop::Failed(ref why) => {
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
        if let Stop::Failed(why) = stop {
            s.failed = Some(why);
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
                    Err(why) => return Stop::lost(why),
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
                f.window_full && !f.up.is_empty() && f.channel.write_window().remaining > 0
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
            // Only connections with an open channel are polled (rule 4).
            let mut polled = Vec::new();
            for (i, f) in self.forwards.iter().enumerate() {
                let Some(local) = &f.local else {
                    continue;
                };
                let mut ev = 0;
                if f.state.reads_local() && f.up.len() < BUF_CAP {
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
                // A local failure (no memory, too many descriptors), not the session's.
                return Stop::Failed(SshError::new(
                    SshErrorKind::Other,
                    format!("the tunnel's poll(2) failed: {e}"),
                ));
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
                return Stop::lost(format!(
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
            .try_fold(false, |p, f| Ok::<_, String>(self.pump(f)? | p));
        forwards.retain(|f| f.state.channel != ChannelState::Closed);
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
    /// (one open at a time: rule 2).
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
                let (kind, hint) = if msg.contains("connect failed") {
                    (
                        SshErrorKind::TargetUnreachable,
                        format!(
                            "is anything listening on {}:{} as seen from {}?",
                            self.host, self.port, self.sshd
                        ),
                    )
                } else if msg.contains("prohibited") {
                    (
                        SshErrorKind::ForwardingRefused,
                        "the server refuses TCP forwarding (AllowTcpForwarding or PermitOpen in \
                         its sshd_config, or a restriction on the key)"
                            .to_string(),
                    )
                } else {
                    (SshErrorKind::Other, "see the server's log".to_string())
                };
                let why = format!(
                    "{} could not open a forward to {}:{}: {msg}; {hint}",
                    self.sshd, self.host, self.port
                );
                log::warn!("ssh tunnel: {why}");
                lock(&self.status).open_error = Some(SshError::new(kind, why));
                // Dropping the local socket tells its client at once.
                self.waiting.pop_front();
                Ok(true)
            }
        }
    }

    /// The outcome of one non-blocking step that ends a channel or its upward direction (EOF,
    /// close, wait for the close): `Ok(true)` when it is done (or failed in a way that leaves
    /// nothing to wait for), `Ok(false)` to retry later, an error when the whole session is dead.
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

    /// Moves what can move for one connection, one step after the other; returns whether
    /// anything moved. The steps on the channel are here, those on the local socket alone on
    /// `Forward`.
    fn pump(&mut self, f: &mut Forward) -> Result<bool, String> {
        let mut progress = f.read_local(&mut self.scratch);
        progress |= self.write_channel(f)?;
        progress |= self.send_eof(f)?;
        progress |= self.read_channel(f)?;
        progress |= f.write_local();
        progress |= f.shut_local();
        progress |= self.close_channel(f)?;
        Ok(progress)
    }

    /// Step 2, upward buffer -> channel, while the state allows it. EAGAIN leaves the write
    /// pending: the same bytes, still at the front of the buffer, are offered again before
    /// anything else happens on the channel, even after a failure, since libssh2 accepts no
    /// other write on the session until that packet is out (rule 1). A write that takes
    /// nothing started no packet: the server's window is full.
    fn write_channel(&mut self, f: &mut Forward) -> Result<bool, String> {
        let mut progress = false;
        let ch = &mut f.channel;
        while !f.up.is_empty() && f.state.writes_channel() {
            match ch.write(f.up.bytes()) {
                Ok(0) => {
                    // No packet was started, so nothing must be retried with these bytes.
                    f.window_full = true;
                    break;
                }
                Ok(n) => {
                    f.up.consume(n);
                    f.state.write = ChannelWrite::Clear;
                    f.window_full = false;
                    progress = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    f.state.write = ChannelWrite::Pending;
                    self.eagain();
                    break;
                }
                Err(e) => {
                    let why = self.channel_error(&e)?;
                    log::debug!("ssh tunnel: channel #{}: write failed: {why}", f.id);
                    f.state.write = ChannelWrite::Clear;
                    f.state.fail();
                    f.up.clear();
                    progress = true;
                    break;
                }
            }
        }
        Ok(progress)
    }

    /// Step 3, local end of stream -> channel EOF, once all the upward bytes are in the
    /// channel. A failure other than the session's death counts as sent: the channel is
    /// closed next anyway.
    fn send_eof(&mut self, f: &mut Forward) -> Result<bool, String> {
        if f.state.sends_eof(f.up.is_empty())
            && self.channel_step(f.channel.send_eof(), "send_eof", f.id)?
        {
            f.state.upward = Flow::Closed;
            return Ok(true);
        }
        Ok(false)
    }

    /// Step 4, channel -> downward buffer, while the state allows it: reads until EAGAIN (or
    /// the buffer is full), since libssh2 may hold bytes for this channel that it read while
    /// serving another (rule 3; the loop repeats turns while anything moves). The channel's
    /// EOF starts draining the downward direction. (The state allows it only while the local
    /// socket is there: dropping it closes both directions.)
    fn read_channel(&mut self, f: &mut Forward) -> Result<bool, String> {
        let mut progress = false;
        let ch = &mut f.channel;
        if f.state.reads_channel() {
            while f.down.len() < BUF_CAP {
                let n = CHUNK.min(BUF_CAP - f.down.len());
                match ch.read(&mut self.scratch[..n]) {
                    Ok(0) => {
                        if ch.eof() {
                            f.state.downward = Flow::Draining;
                            progress = true;
                        }
                        break;
                    }
                    Ok(n) => {
                        f.down.extend(&self.scratch[..n]);
                        progress = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        let why = self.channel_error(&e)?;
                        log::debug!("ssh tunnel: channel #{}: read failed: {why}", f.id);
                        f.state.fail();
                        progress = true;
                        break;
                    }
                }
            }
        }
        Ok(progress)
    }

    /// Step 7, both directions over (or broken) and no write pending: `close()`, then
    /// `wait_close()` for the server's close, each retried after EAGAIN, and only then drops
    /// the local socket; the channel is freed with the connection at the end of the turn
    /// (rule 6: a channel dropped before it is closed can leak).
    fn close_channel(&mut self, f: &mut Forward) -> Result<bool, String> {
        let mut progress = false;
        let ch = &mut f.channel;
        if f.state.close_due() && self.channel_step(ch.close(), "close", f.id)? {
            f.state.channel = ChannelState::Closing;
            progress = true;
        }
        if f.state.channel == ChannelState::Closing
            && self.channel_step(ch.wait_close(), "wait_close", f.id)?
        {
            f.state.channel = ChannelState::Closed;
            progress = true;
            log::trace!("ssh tunnel: local connection #{} closed", f.id);
            f.local = None;
        }
        Ok(progress)
    }

    /// On close by the owner: drop the local sockets, close every channel and the session,
    /// within [`CLOSE_GRACE`].
    fn close_politely(&mut self) {
        let deadline = Instant::now() + CLOSE_GRACE;
        self.closing = true;
        for f in &mut self.forwards {
            f.drop_local();
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A state with every field given.
    fn state(channel: ChannelState, upward: Flow, downward: Flow, write: ChannelWrite) -> State {
        State {
            channel,
            upward,
            downward,
            write,
        }
    }

    #[test]
    fn a_new_connection_reads_both_sides_and_closes_nothing() {
        let s = State::OPENED;
        assert!(s.reads_local() && s.reads_channel() && s.writes_channel());
        assert!(!s.sends_eof(true) && !s.shuts_local(true) && !s.close_due());
    }

    #[test]
    fn the_channel_eof_goes_out_only_after_the_bytes_before_it() {
        let mut s = State::OPENED;
        s.upward = Flow::Draining; // the local socket ended
        assert!(!s.reads_local());
        assert!(s.writes_channel());
        assert!(!s.sends_eof(false));
        assert!(s.sends_eof(true));
    }

    #[test]
    fn the_local_socket_is_shut_only_after_the_bytes_before_the_channel_eof() {
        let mut s = State::OPENED;
        s.downward = Flow::Draining; // the channel's EOF arrived
        assert!(!s.reads_channel());
        assert!(!s.shuts_local(false));
        assert!(s.shuts_local(true));
    }

    #[test]
    fn the_channel_closes_only_once_both_directions_are_closed() {
        for upward_first in [true, false] {
            let mut s = State::OPENED;
            let mut steps = [
                |s: &mut State| s.upward = Flow::Draining,
                |s: &mut State| s.upward = Flow::Closed,
                |s: &mut State| s.downward = Flow::Draining,
                |s: &mut State| s.downward = Flow::Closed,
            ];
            if !upward_first {
                steps.rotate_left(2);
            }
            for step in steps {
                assert!(!s.close_due(), "{s:?}");
                step(&mut s);
            }
            assert!(s.close_due());
        }
    }

    #[test]
    fn close_waits_for_a_pending_write() {
        let over = state(
            ChannelState::Open,
            Flow::Closed,
            Flow::Closed,
            ChannelWrite::Pending,
        );
        assert!(!over.close_due());
        let broken = state(
            ChannelState::Broken,
            Flow::Open,
            Flow::Open,
            ChannelWrite::Pending,
        );
        assert!(!broken.close_due());
        assert!(State {
            write: ChannelWrite::Clear,
            ..broken
        }
        .close_due());
    }

    #[test]
    fn after_a_failure_only_a_pending_write_goes_to_the_channel() {
        let mut s = state(
            ChannelState::Open,
            Flow::Draining,
            Flow::Open,
            ChannelWrite::Pending,
        );
        s.fail();
        assert_eq!(s.channel, ChannelState::Broken);
        assert!(s.writes_channel());
        assert!(!s.reads_local() && !s.reads_channel() && !s.sends_eof(true));
        s.write = ChannelWrite::Clear; // the pending packet went out
        assert!(!s.writes_channel());
        assert!(s.close_due());
    }

    #[test]
    fn a_failure_closes_the_channel_without_waiting_for_either_direction() {
        let mut s = State::OPENED;
        s.fail();
        assert!(s.close_due());
    }

    #[test]
    fn a_channel_eof_received_before_a_failure_still_reaches_the_local_socket() {
        let mut s = State::OPENED;
        s.downward = Flow::Draining;
        s.fail();
        assert!(s.shuts_local(true));
    }

    #[test]
    fn a_failure_after_close_went_out_changes_nothing() {
        for channel in [ChannelState::Closing, ChannelState::Closed] {
            let mut s = state(channel, Flow::Closed, Flow::Closed, ChannelWrite::Clear);
            s.fail();
            s.local_dropped();
            assert_eq!(s.channel, channel);
            assert!(!s.close_due(), "close is sent once");
        }
    }

    #[test]
    fn a_dropped_local_socket_stops_both_directions_but_a_pending_write() {
        let mut s = state(
            ChannelState::Open,
            Flow::Open,
            Flow::Draining,
            ChannelWrite::Pending,
        );
        s.local_dropped();
        assert!(!s.reads_local() && !s.reads_channel() && !s.shuts_local(true));
        assert!(s.writes_channel() && !s.close_due());
        s.write = ChannelWrite::Clear;
        assert!(s.close_due());
    }

    #[test]
    fn bytes_added_behind_a_pending_write_leave_its_bytes_unchanged() {
        let mut up = Buf::default();
        up.extend(&(0..100).collect::<Vec<u8>>());
        up.consume(60); // a write took 60 bytes
        let offered = up.bytes().to_vec(); // the next write answers EAGAIN
        up.extend(&[200; 10]); // the local socket gives more: the buffer compacts
        assert_eq!(up.start, 0, "this test must cover compaction");
        assert_eq!(&up.bytes()[..offered.len()], &offered[..]);
        up.extend(&[201; 10]); // no compaction this time
        assert_eq!(&up.bytes()[..offered.len()], &offered[..]);
        assert_eq!(up.len(), 60);
    }
}
