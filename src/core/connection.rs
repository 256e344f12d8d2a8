//! The connection: one symmetric channel between two peers, and the rules that keep many threads
//! on it from deadlocking or mixing up replies.
//!
//! # Who owns what
//!
//! * **The read half** is a token held by at most one thread at a time ([`crate::core::dispatch`]
//!   says who and when): a pool thread (the *leader*), or a calling thread reading its own
//!   reply. The holder only reads frames and routes them; it never runs user code while holding
//!   it, never writes, and never waits for anything but the socket (a holder about to wait for
//!   the next frame looks for it for up to 50 µs first, while the peer answers that fast:
//!   [`crate::base::spin`]). A token put back is taken
//!   by a watching pool thread within 8 ms, so something always reads the
//!   connection while it is open, whatever user threads do, and callbacks are served without a
//!   background thread started by hand.
//! * **The write half** sits behind a gate (a flag, waited for on a condition variable, so that
//!   a thread can wait for it under a deadline). A thread encodes and seals its
//!   whole frame first, then takes the gate, writes the frame, and opens the gate: frames never
//!   interleave, and nothing is held while encoding or while waiting for a reply. The leader
//!   never takes the gate.
//! * **Replies and calls do not wait for the gate.** A thread whose reply, or synchronous
//!   call, (at most 16 KiB) finds the gate taken hands the sealed frame to the holder and goes
//!   back to work, or to waiting for its reply (a caller whose deadline passes while its frame
//!   still waits takes it back: [`Timeout::Send`] with nothing sent); the holder writes
//!   every frame handed to it, together (one vectored write for many), before it opens the
//!   gate, and looks once more after opening it, so none is left behind. At most 64 replies
//!   wait so (1 MiB); beyond that a replying thread waits for the gate like any writer, so a
//!   peer that reads nothing cannot make this side hold its replies without bound. A holder
//!   whose deadline passes before it has written what was handed to it leaves the rest to a
//!   thread of the connection, as for a frame cut short.
//! * **Pipelines are written together** ([`crate::core::flush`]): an async call made within
//!   100 µs of the previous one, and the reply to a request read while more of the peer's bytes
//!   were already buffered, are handed over like replies that find the gate taken, and a
//!   connection thread (`rpyc-flusher`, counted as one of the pool's) writes them 100 µs after
//!   the first at the latest; any frame written, and any wait for an async result, writes them
//!   first. So a thread's frames keep their order, and a slow handler holds nobody's reply back
//!   for more than that. A reply deferred while a pool thread watches the connection and
//!   looks again within [`HELD_POLL`](crate::core::dispatch::HELD_POLL) sets no timer (waking
//!   the flusher for every batch cost more than the writes it saved): the watcher, which looks
//!   then anyway, arms it if the reply still waits, and the next pool thread to wait for input
//!   writes it first; such a reply is at most about 2 ms late behind a slow handler.
//! * **Large byte strings are not copied into frames.** A [`Bytes`](crate::Bytes) of 16 KiB
//!   or more is kept by the frame as a shared reference to its memory and written with the
//!   rest of the frame by one vectored write ([`crate::wire::OutFrame`]).
//! * **Every write has a deadline.** A call's deadline covers waiting for the gate and writing:
//!   a call that could not start writing in time fails with [`Timeout::Send`] and nothing was
//!   sent; one whose deadline passes in the middle of its frame also returns on time, and a
//!   thread of the connection finishes that frame (the peer must never see half a frame followed
//!   by another) while holding the gate. Whoever writes, a peer that takes nothing for the stall
//!   timeout (the call timeout, at least 1 s) ends the connection, with a warning.
//! * **Every read has a deadline** where the transport can time out a read (sockets): a caller
//!   reading for itself stops at its deadline, even in the middle of a frame, and hands the
//!   reader (with the frame read so far) to the pool; a peer that stops in the middle of a frame
//!   for the stall timeout is dropped. Every frame read is charged to the connection's memory
//!   budget until it is dropped ([`crate::base::limits`]).
//! * **Replies find their caller by id.** A caller registers its id in the pending table
//!   *before* writing the request; the reading thread removes the entry when the reply arrives
//!   and hands the frame to that caller's own channel. A timed-out caller removes its entry, so
//!   a late reply finds no one and is dropped (and logged); it can never be taken for another
//!   call's.
//! * **Nested calls run on the waiting thread.** A request carries the id of the request its
//!   sender is serving (`parent`). If that id belongs to a synchronous call of ours that is
//!   waiting, the reading thread hands the request to that waiting thread, which runs it and
//!   goes back to waiting. So client -> server -> client -> ... chains use no extra threads and cannot
//!   starve the pool, at any depth.
//! * **Other requests go to the pool.** The leader that read one runs it itself, and another
//!   pool thread takes over reading (up to `max_workers` handlers at once), so a request costs
//!   no thread hand-off on its critical path. A slow handler occupies only its own thread.
//!
//! # When the connection ends
//!
//! Whoever notices first (a read or write error, end of stream, a protocol violation, or
//! [`Connection::close`]) calls `terminate`, once: it records the reason, shuts the transport
//! down (which wakes the reading thread), drops every waiting caller's channel so each fails at once
//! with [`Error::Closed`], stops the pool, and drops the exported objects. Every later call
//! fails fast with the same reason.
//!
//! # Locks
//!
//! Every lock of a connection, what it guards, and what may be held with it. The rule that
//! makes the list short: no code holds a lock while it waits for the network or for another
//! thread, and nothing runs user code under a lock.
//!
//! | lock | guards | may be held with it |
//! |---|---|---|
//! | `Shared::pending` | the table of callers waiting for replies (`None` once closed) | nothing; a delivery to a waiter's channel is sent under it only for nested requests (an unbounded channel, which never waits) |
//! | `Shared::reason` (with `closed_cv`) | why the connection closed, once it has | nothing |
//! | `Shared::objects` | the objects this side exported (dropped ones are dropped after it is released) | nothing |
//! | `Shared::remotes` | the handles to the peer's objects, by id | nothing |
//! | `Shared::releases` | releases waiting to be sent | nothing |
//! | `Shared::on_close` | hooks to run once closed (run after it is released) | nothing |
//! | `Writer::busy` | the gate: one frame written at a time (a flag, not a lock: its holder writes without waiting for anyone but the transport, under its deadline) | the flag is held across the write; `Writer::sink` under it |
//! | `Writer::waiting` (with `cv`) | threads waiting for the gate | `reason` (a waiter reads why the connection closed) |
//! | `Writer::sink` | the transport's write half | taken only by the gate's holder, so never contended |
//! | `Writer::handed` | frames handed to the gate's holder (replies, calls, deferred async calls) | nothing |
//! | `Deferral::state` ([`crate::core::flush`]) | when handed frames are due, the flusher thread's state | nothing |
//! | `Pool::state` (with `cv`; [`crate::core::dispatch`]) | the reader token, the request queue, the pool's thread counts | nothing but the server's thread budget, which is atomics, and a look at the transport's input that never waits (TLS's receive buffer by `try_lock`) |
//! | `Budget::held` ([`crate::base::limits`]) | bytes of the peer's data held | nothing |
//!
//! The transports add their own: TLS's SSL-object lock, held for one non-blocking OpenSSL call
//! at a time, and its receive buffer, which the reader holds while it blocks on the socket but
//! which nobody else ever waits for (they `try_lock` it); see [`crate::tls`].
//!
//! # Guarantees
//!
//! What users may rely on (ordering, replies, nested calls, timeouts, closing) is written once,
//! in the public docs of [`Connection`]; this module's docs say how it is done.

use crate::base::limits::{Activity, Budget};
use crate::base::lock;
use crate::base::mailbox::{self, Receiver, RecvTimeoutError, Sender};
use crate::base::spin::{SHORT_REPLY_WAIT, WAITER_SLOTS};
use crate::base::threads::ThreadSet;
use crate::core::config::Config;
use crate::core::context::{self, Scope};
use crate::core::dispatch::{FirstWorker, Pool};
use crate::core::flush::{Armed, Deferral};
use crate::core::object::{self, ObjectTable, RemoteInner, RemoteObject};
use crate::core::service::{Args, Context, Failure, Hook, Invoke, Service};
use crate::error::{
    Error, HandshakeError, HandshakeErrorKind, RemoteError, RemoteErrorKind, Timeout,
};
use crate::transport::reader::{FrameReader, ReadLimits};
use crate::transport::{Control, Sink, Transport};
use crate::wire::codec;
use crate::wire::{self, Frame, Hello, Kind, OutFrame};
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

/// Most pieces of a frame offered to one vectored write.
const PIECES: usize = 64;

/// What the leader hands to a waiting caller.
pub(crate) enum Delivery {
    /// The reply (or error reply) to the caller's request.
    Reply(Frame),
    /// A request the peer made on behalf of the caller's request: run it while waiting.
    Nested(Frame),
}

struct Waiter {
    tx: Sender<Delivery>,
    /// Only a thread blocked in a synchronous call runs nested requests.
    serves_nested: bool,
}

/// Where [`Shared::route`] sent a frame.
pub(crate) enum Routed {
    /// Delivered (or dropped); nothing more to do.
    Done,
    /// Delivered to a thread blocked in a synchronous call.
    ToCaller,
    /// A request (or a frame needing work) for the pool.
    Job(Frame),
}

/// A request that was sent and whose reply has not been taken yet.
pub(crate) struct Pending {
    pub(crate) id: u64,
    pub(crate) rx: Receiver<Delivery>,
}

static NEXT_CONNECTION: AtomicU64 = AtomicU64::new(1);

/// Everything one connection's threads share.
pub(crate) struct Shared {
    /// Distinguishes connections in the thread-local record of requests being served.
    pub(crate) id: u64,
    pub(crate) peer: String,
    /// What the transport's authenticator learned about the peer.
    pub(crate) credentials: Option<crate::transport::Credentials>,
    pub(crate) service: Service,
    pub(crate) call_timeout: Duration,
    /// Close the connection after this long without traffic or work in flight.
    pub(crate) idle_timeout: Duration,
    /// The peer's limits, from its hello.
    peer_hello: Hello,
    writer: Writer,
    control: Arc<dyn Control>,
    next_id: AtomicU64,
    /// `None` once closed, so no caller can register after the waiters were failed.
    pending: Mutex<Option<HashMap<u64, Waiter>>>,
    closed: AtomicBool,
    reason: Mutex<Option<String>>,
    closed_cv: Condvar,
    pub(crate) objects: Mutex<ObjectTable>,
    pub(crate) remotes: Mutex<HashMap<u64, Weak<RemoteInner>>>,
    releases: Mutex<Vec<(u64, u64)>>,
    /// Most releases that may wait to be sent (16 bytes each, within the connection's
    /// memory bound): more means the peer reads nothing of what it makes us release.
    max_releases: usize,
    pub(crate) pool: Pool,
    /// Where the connection's threads come from: its server's set, or the one all client
    /// connections share; start them with [`Shared::spawn`].
    pub(crate) threads: Arc<ThreadSet>,
    /// Threads started (or taken from those parked) for this connection so far.
    threads_spawned: AtomicUsize,
    user_handles: AtomicUsize,
    on_close: Mutex<Vec<Box<dyn FnOnce() + Send>>>,
    established: AtomicBool,
    /// When bytes last moved either way.
    activity: Arc<Activity>,
    /// Requests of the peer being served right now (by the pool or by waiting callers).
    serving: AtomicUsize,
    /// Async calls made in a burst, written together ([`crate::core::flush`]).
    pub(crate) deferral: Deferral,
    /// A calling thread that waits for a reply another thread reads looks for it a while
    /// before it parks ([`Receiver::recv_deadline_spinning`]): the last such wait was short.
    callers_spin: AtomicBool,
}

/// The write half of a connection: one frame at a time, through a gate that a thread can wait
/// for under its own deadline (a mutex cannot be waited for with a timeout).
///
/// The gate is a flag taken with a compare-and-swap: a free gate costs no lock. A thread that
/// finds it taken spins briefly (frames are usually written in microseconds), then counts
/// itself in `waiters` under `waiting` and sleeps on `cv`. The holder opens the gate by clearing
/// the flag and, if it sees waiters, wakes one under `waiting`: a waiter tries the flag again
/// after counting itself and before sleeping, with the lock held, so no wake-up is lost.
struct Writer {
    busy: AtomicBool,
    waiters: AtomicUsize,
    waiting: Mutex<()>,
    cv: Condvar,
    /// Only taken by the thread that holds the gate, so never waited for.
    sink: Mutex<Box<dyn Sink>>,
    /// Small replies of threads that found the gate taken: its holder writes them, in order
    /// and together (one vectored write for many), before it opens the gate; the threads go
    /// back to work at once instead of waiting for the gate.
    handed: Mutex<Vec<OutFrame>>,
    /// A pipelined reply was handed over with no timer armed, for a watcher or the next pool
    /// thread to wait for input to have written ([`Shared::left_unwritten`]).
    unarmed: AtomicBool,
}

/// Largest reply handed to the gate's holder rather than waited for (see `Writer::handed`).
const HAND_OVER_MAX: usize = 16 * 1024;
/// Most replies handed over at once: with [`HAND_OVER_MAX`], at most 1 MiB per connection.
pub(crate) const HAND_OVER_FRAMES: usize = 64;

impl Writer {
    fn try_take(&self) -> bool {
        self.busy
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::Relaxed)
            .is_ok()
    }
}

/// Why a frame was not sent, or not wholly.
pub(crate) enum SendFail {
    /// The deadline passed before a byte of the frame went out: nothing was sent.
    NotSent,
    /// The deadline passed in the middle of the frame: the rest goes out in the background,
    /// and the connection stays usable if the peer reads it.
    Partly,
    /// The connection is closed, or closed now because the write failed.
    Closed(Error),
}

/// Where writing frames stopped.
enum Stopped {
    /// The deadline passed after `at` bytes of frame `frame` (its index among those being
    /// written); `committed`: the transport holds part of the bytes after that (see
    /// [`Sink::committed`]).
    Deadline {
        frame: usize,
        at: usize,
        committed: bool,
    },
    Failed(std::io::Error),
}

/// One end of an rpyc connection. `Send + Sync` and cheap to clone: share it between threads.
///
/// The connection closes when [`close`](Connection::close) is called, when the peer goes away,
/// or when the last `Connection` and [`RemoteObject`] handle of it is dropped.
///
/// # Concurrency and ordering
///
/// * Any number of threads may call through one connection at once; each call gets exactly its
///   own reply (replies are matched by request id, never by order).
/// * One internal thread always reads the connection, so the peer's callbacks are served even
///   while every thread of yours is busy elsewhere or idle.
/// * A callback the peer makes while serving your synchronous call runs on your calling thread
///   (it is blocked anyway), so nested call chains of any depth need no extra threads.
/// * Frames sent by one thread are sent in the order that thread sent them.
/// * Pipelines cost few writes: async calls made in a burst (each within 100 µs of the last),
///   and replies to requests the peer pipelined, go out together, at most 100 µs after the
///   first of them (at once if anyone waits for a result; a reply behind a slow handler at
///   most about 2 ms late). A lone async call, a synchronous call and a reply to a lone
///   request are written at once.
/// * A thread waiting for the next frame (your calling thread reading its reply, or the
///   connection's reading thread) looks for it for up to 50 µs before it sleeps, yielding its
///   CPU between looks, while the peer has been answering that fast: no sleep and wake-up per
///   call. At most as many threads as the process may run at once do so at a time. A calling
///   thread whose reply another thread reads looks for it the same way while such replies have
///   been coming within 200 µs (at most four such threads per CPU at a time).
/// * Requests from the peer are handed to threads in arrival order and run concurrently, on
///   up to [`Options::max_workers`](crate::Options::max_workers) threads (so a later handler may
///   begin a moment before an earlier one): a slow handler delays no other call. Calls from different threads, async calls and oneway calls may therefore
///   complete in any order; calls made one after another by one thread, each waiting for its
///   reply, run in that order. A synchronous call's nested requests run one at a time, in
///   arrival order.
/// * Beyond `max_workers` busy handlers, requests wait in a queue of at most
///   [`max_queued`](crate::Options::max_queued); a peer that overflows it, or the memory
///   bound ([`max_buffered`](crate::Options::max_buffered)), is closed as misbehaving.
/// * A timed-out call leaves the connection usable; its late reply is dropped.
/// * When the connection ends, every waiting call fails at once with [`Error::Closed`], and so
///   does every later call.
///
/// ```
/// # let (server, port) = rpyc::testing::example_server()?;
/// let conn = rpyc::connect("127.0.0.1", port)?;
/// let sum: i64 = conn.root().call("add", (1, 2))?;
/// assert_eq!(sum, 3);
/// conn.close();
/// # Ok::<(), rpyc::Error>(())
/// ```
pub struct Connection {
    pub(crate) shared: Arc<Shared>,
}

impl Clone for Connection {
    fn clone(&self) -> Connection {
        Connection::from_shared(self.shared.clone())
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        if self.shared.user_handles.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.shared
                .terminate("every handle to the connection was dropped".into());
        }
    }
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("peer", &self.shared.peer)
            .field("closed", &self.is_closed())
            .finish()
    }
}

impl Connection {
    pub(crate) fn from_shared(shared: Arc<Shared>) -> Connection {
        shared.user_handles.fetch_add(1, Ordering::AcqRel);
        Connection { shared }
    }

    /// Does the handshake on a fresh transport, starts the connection's reader, runs the
    /// service's `on_connect`, and opens the connection for requests.
    pub(crate) fn establish(
        t: Transport,
        opts: &Config,
        service: Service,
        threads: Arc<ThreadSet>,
    ) -> Result<Connection, Error> {
        let (conn, first) = Connection::establish_keeping(t, opts, service, threads, false)?;
        debug_assert!(first.is_none());
        Ok(conn)
    }

    /// [`establish`](Connection::establish), but with `keep_first`, the connection's first
    /// pool thread is not started: it is returned for the calling thread to become, once it
    /// is done with the connection's setup (a server's handshake thread: one thread fewer
    /// started per connection). Only if the service has no `on_connect` hook: user code may
    /// run long, and something must read the connection meanwhile (the peer may leave, or
    /// answer the hook's calls, which callers can read for themselves only where reads time
    /// out). Otherwise the thread is started as usual and `None` returned.
    pub(crate) fn establish_keeping(
        t: Transport,
        opts: &Config,
        service: Service,
        threads: Arc<ThreadSet>,
        keep_first: bool,
    ) -> Result<(Connection, Option<FirstWorker>), Error> {
        let Transport {
            mut reader,
            mut writer,
            peer,
            control,
            credentials,
            started,
            hello_sent,
        } = t;
        // One deadline for the whole handshake, authentication (TLS) included.
        let deadline = crate::base::deadline_from(started, opts.handshake_timeout);
        let shake = Shake {
            control: &*control,
            peer: &peer,
            opts,
            hello_sent,
            deadline,
        };
        let theirs = match handshake(&mut reader, &mut *writer, shake) {
            Ok(h) => h,
            Err(e) => {
                control.shutdown();
                return Err(e);
            }
        };
        let _ = control.set_read_timeout(None);
        let budget = Budget::new(opts.buffered_limit(), opts.server_budget.clone());
        let activity = Activity::new();
        let shared = Arc::new(Shared {
            id: NEXT_CONNECTION.fetch_add(1, Ordering::Relaxed),
            peer,
            credentials,
            service,
            call_timeout: opts.call_timeout,
            idle_timeout: opts.idle_timeout,
            peer_hello: theirs,
            writer: Writer {
                busy: AtomicBool::new(false),
                waiters: AtomicUsize::new(0),
                waiting: Mutex::new(()),
                cv: Condvar::new(),
                handed: Mutex::new(Vec::new()),
                unarmed: AtomicBool::new(false),
                sink: Mutex::new(writer),
            },
            control,
            next_id: AtomicU64::new(1),
            pending: Mutex::new(Some(HashMap::new())),
            closed: AtomicBool::new(false),
            reason: Mutex::new(None),
            closed_cv: Condvar::new(),
            objects: Mutex::new(ObjectTable::default()),
            remotes: Mutex::new(HashMap::new()),
            releases: Mutex::new(Vec::new()),
            max_releases: (opts.buffered_limit() / 16).max(1024),
            pool: Pool::new(
                opts.max_workers,
                opts.max_queued,
                opts.thread_budget.clone(),
            ),
            threads,
            threads_spawned: AtomicUsize::new(0),
            user_handles: AtomicUsize::new(0),
            on_close: Mutex::new(Vec::new()),
            established: AtomicBool::new(false),
            activity: activity.clone(),
            serving: AtomicUsize::new(0),
            deferral: Deferral::new(opts.batching),
            callers_spin: AtomicBool::new(true),
        });
        let limits = ReadLimits {
            max_frame: opts.max_frame,
            stall: opts.write_timeout(),
            tick: opts.reader_tick(),
            budget: Some(budget),
            activity: Some(activity),
        };
        let conn = Connection::from_shared(shared.clone());
        let reader = FrameReader::new(reader, limits, shared.control.clone());
        let keep_first = keep_first && shared.service.inner.on_connect.is_none();
        let first = crate::core::dispatch::install(&shared, reader, !keep_first);
        let first = if keep_first {
            Some(first)
        } else {
            first.spawn().map_err(|e| {
                shared.terminate(format!("cannot start the connection's thread: {e}"));
                Error::Io(Arc::new(e))
            })?;
            None
        };
        shared.run_hook(shared.service.inner.on_connect.clone(), "on_connect");
        // The reason lock orders this against `terminate`: if the peer left while on_connect
        // ran, terminate skipped on_disconnect and it runs here, so it runs exactly once.
        let closed_meanwhile = {
            let r = lock(&shared.reason);
            shared.established.store(true, Ordering::Release);
            r.is_some()
        };
        if closed_meanwhile {
            shared.run_on_disconnect();
        }
        crate::core::dispatch::set_ready(&shared);
        Ok((conn, first))
    }

    /// The peer's root service: call its methods through this handle.
    ///
    /// ```
    /// # let (server, port) = rpyc::testing::example_server()?;
    /// let conn = rpyc::connect("127.0.0.1", port)?;
    /// let n: usize = conn.root().call("len", ("hello",))?;
    /// # Ok::<(), rpyc::Error>(())
    /// ```
    pub fn root(&self) -> RemoteObject {
        RemoteObject::root(self.clone())
    }

    /// Checks that the peer answers, within the connection's call timeout.
    ///
    /// ```
    /// # let (server, port) = rpyc::testing::example_server()?;
    /// let conn = rpyc::connect("127.0.0.1", port)?;
    /// conn.ping()?;
    /// # Ok::<(), rpyc::Error>(())
    /// ```
    pub fn ping(&self) -> Result<(), Error> {
        self.ping_timeout(self.shared.call_timeout)
    }

    /// Checks that the peer answers within `timeout`.
    ///
    /// ```
    /// # let (server, port) = rpyc::testing::example_server()?;
    /// let conn = rpyc::connect("127.0.0.1", port)?;
    /// conn.ping_timeout(std::time::Duration::from_secs(1))?;
    /// # Ok::<(), rpyc::Error>(())
    /// ```
    pub fn ping_timeout(&self, timeout: Duration) -> Result<(), Error> {
        self.ping_until(crate::base::deadline(timeout), timeout)
    }

    /// Checks that the peer answers before `deadline`.
    ///
    /// ```
    /// # let (server, port) = rpyc::testing::example_server()?;
    /// use std::time::{Duration, Instant};
    /// let conn = rpyc::connect("127.0.0.1", port)?;
    /// conn.ping_deadline(Instant::now() + Duration::from_secs(1))?;
    /// # Ok::<(), rpyc::Error>(())
    /// ```
    pub fn ping_deadline(&self, deadline: Instant) -> Result<(), Error> {
        self.ping_until(deadline, deadline.saturating_duration_since(Instant::now()))
    }

    fn ping_until(&self, deadline: Instant, timeout: Duration) -> Result<(), Error> {
        let p = self
            .shared
            .send_request(0, "", &(), Kind::Ping, true, deadline, timeout)?;
        let p = p.expect("a ping expects a reply");
        let frame = self.shared.wait(&p, deadline, &|| "ping".into(), timeout)?;
        self.shared.decode_reply::<()>(frame, "ping")
    }

    /// Closes the connection now: waiting calls fail with [`Error::Closed`], the transport is
    /// shut down, objects exported to the peer are dropped. Returns without waiting for the
    /// peer. Calling it again does nothing.
    ///
    /// ```
    /// # let (server, port) = rpyc::testing::example_server()?;
    /// let conn = rpyc::connect("127.0.0.1", port)?;
    /// conn.close();
    /// assert!(conn.is_closed());
    /// # Ok::<(), rpyc::Error>(())
    /// ```
    pub fn close(&self) {
        self.shared.terminate("closed by this side".into());
    }

    /// Whether the connection is closed.
    pub fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::Acquire)
    }

    /// Why the connection closed, once it has.
    pub fn close_reason(&self) -> Option<String> {
        lock(&self.shared.reason).clone()
    }

    /// Blocks until the connection closes (e.g. a process that only serves its peer).
    ///
    /// ```no_run
    /// let conn = rpyc::connect("localhost", 18861)?;
    /// conn.wait_closed();
    /// # Ok::<(), rpyc::Error>(())
    /// ```
    pub fn wait_closed(&self) {
        let mut r = lock(&self.shared.reason);
        while r.is_none() {
            r = self
                .shared
                .closed_cv
                .wait(r)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Like [`wait_closed`](Connection::wait_closed), for at most `timeout` (`Duration::MAX`:
    /// no limit); returns whether the connection is closed.
    ///
    /// ```
    /// # let (server, port) = rpyc::testing::example_server()?;
    /// let conn = rpyc::connect("127.0.0.1", port)?;
    /// assert!(!conn.wait_closed_timeout(std::time::Duration::from_millis(10)));
    /// conn.close();
    /// assert!(conn.wait_closed_timeout(std::time::Duration::from_millis(10)));
    /// # Ok::<(), rpyc::Error>(())
    /// ```
    pub fn wait_closed_timeout(&self, timeout: Duration) -> bool {
        self.wait_closed_deadline(crate::base::deadline(timeout))
    }

    /// Like [`wait_closed`](Connection::wait_closed), until `deadline`; returns whether the
    /// connection is closed.
    ///
    /// ```
    /// # let (server, port) = rpyc::testing::example_server()?;
    /// use std::time::{Duration, Instant};
    /// let conn = rpyc::connect("127.0.0.1", port)?;
    /// assert!(!conn.wait_closed_deadline(Instant::now() + Duration::from_millis(10)));
    /// # Ok::<(), rpyc::Error>(())
    /// ```
    pub fn wait_closed_deadline(&self, deadline: Instant) -> bool {
        let mut r = lock(&self.shared.reason);
        while r.is_none() {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            r = self
                .shared
                .closed_cv
                .wait_timeout(r, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    /// The peer's address (see [`Context::peer`]).
    pub fn peer(&self) -> &str {
        &self.shared.peer
    }

    /// The certificate the peer presented and this side verified, on a TLS connection (for a
    /// client: the server's). See [`Context::peer_certificate`].
    pub fn peer_certificate(&self) -> Option<&crate::tls::PeerCertificate> {
        self.credentials()
    }

    /// What the authenticator learned about the peer, if it is a `T` (see
    /// [`Context::credentials`]).
    pub fn credentials<T: std::any::Any>(&self) -> Option<&T> {
        self.shared.credentials.as_deref()?.downcast_ref()
    }

    /// Runs `f` when the connection closes (right away if it already has). For servers.
    pub(crate) fn on_close(&self, f: impl FnOnce() + Send + 'static) {
        let mut hooks = lock(&self.shared.on_close);
        if self.is_closed() {
            drop(hooks);
            f();
        } else {
            hooks.push(Box::new(f));
        }
    }
}

impl Shared {
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    pub(crate) fn closed_error(&self) -> Error {
        Error::Closed {
            reason: lock(&self.reason)
                .clone()
                .unwrap_or_else(|| "closed".into()),
        }
    }

    /// Encodes and sends a request; registers the caller first unless it is oneway. Waiting
    /// for the writer and writing are bounded by `deadline` (the call's, which `timeout` set):
    /// a call that cannot be sent in time fails with [`Timeout::Send`] and only that call
    /// fails.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn send_request(
        self: &Arc<Self>,
        target: u64,
        method: &str,
        args: &dyn Args,
        kind: Kind,
        serves_nested: bool,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<Option<Pending>, Error> {
        if self.is_closed() {
            return Err(self.closed_error());
        }
        let mut frame = OutFrame::new(method.len());
        let scope = Scope::connection(self);
        frame.encode(|buf| args.encode_args(buf))?;
        drop(scope);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let parent = context::serving_parent(self.id);
        // Everything the peer would call a protocol violation fails here, before a byte is
        // written, and fails only this call.
        let size = frame.seal(kind, id, parent, target, method)?;
        self.check_size(size)?;
        let pending = if kind == Kind::Oneway {
            None
        } else {
            let (tx, rx) = mailbox::mailbox();
            match lock(&self.pending).as_mut() {
                Some(map) => map.insert(id, Waiter { tx, serves_nested }),
                None => return Err(self.closed_error()),
            };
            Some(Pending { id, rx })
        };
        // An async call in a burst of them goes out with the others; a synchronous call that
        // finds the writer busy is handed to its holder.
        let frame = match (kind, serves_nested) {
            (Kind::Call, false) => match self.defer(frame, deadline) {
                Ok(()) => return Ok(pending),
                Err(frame) => frame,
            },
            (Kind::Call, true) => match self.hand_over_if_busy(frame, deadline) {
                Ok(()) => return Ok(pending),
                Err(frame) => frame,
            },
            _ => frame,
        };
        if let Err(fail) = self.write_frame(frame, Some(deadline)) {
            if pending.is_some() {
                self.forget(id);
            }
            return Err(match fail {
                SendFail::Closed(e) => e,
                SendFail::NotSent | SendFail::Partly => Error::Timeout(Timeout::Send {
                    method: call_name(target, method),
                    after: timeout,
                    partly: matches!(fail, SendFail::Partly),
                }),
            });
        }
        Ok(pending)
    }

    /// The peer's frame limit, for a body of `body` bytes.
    fn check_size(&self, body: usize) -> Result<(), Error> {
        let limit = self.peer_hello.max_frame as usize;
        if body > limit {
            return Err(Error::TooLarge { size: body, limit });
        }
        Ok(())
    }

    /// Writes one whole sealed frame, then what others handed over and any queued releases.
    /// Waiting for the writer and for the transport ends at `deadline` (none: only the stall
    /// timeout bounds the write).
    fn write_frame(
        self: &Arc<Self>,
        frame: OutFrame,
        deadline: Option<Instant>,
    ) -> Result<(), SendFail> {
        self.take_gate(deadline)?;
        // Frames handed over earlier go first: a thread's deferred async calls stay ahead of
        // its later frames.
        let mut frames = std::mem::take(&mut *lock(&self.writer.handed));
        let own = frames.len();
        frames.push(frame);
        match self.write_frames(&frames, 0, deadline) {
            Ok(()) => {
                self.open_gate(deadline);
                self.flush_releases(deadline);
                Ok(())
            }
            Err(Stopped::Deadline {
                frame,
                at,
                committed,
            }) if frame < own || (frame == own && at == 0 && !committed) => {
                // Not a byte of this frame went out; those handed over before it must still
                // go, whole.
                frames.truncate(own);
                if frame < own {
                    self.finish_in_background(frames, frame, at);
                } else {
                    self.open_gate(deadline);
                    self.flush_releases(deadline);
                }
                Err(SendFail::NotSent)
            }
            Err(Stopped::Deadline { frame, at, .. }) => {
                self.finish_in_background(frames, frame, at);
                Err(SendFail::Partly)
            }
            Err(Stopped::Failed(e)) => {
                // Closed before the gate opens: nobody may write after half a frame.
                self.write_failed(e);
                self.release_gate();
                Err(SendFail::Closed(self.closed_error()))
            }
        }
    }

    /// Hands the frame of a synchronous call to the writer's holder if the writer is busy
    /// (its caller waits for the reply anyway, and takes it back if its deadline passes before
    /// anyone wrote it: see [`withdraw`](Self::withdraw)); gives it back to be written as usual
    /// otherwise.
    fn hand_over_if_busy(
        self: &Arc<Self>,
        frame: OutFrame,
        deadline: Instant,
    ) -> Result<(), OutFrame> {
        if !self.writer.busy.load(Ordering::Acquire) {
            return Err(frame);
        }
        self.hand_over(frame)?;
        // The holder may have opened the gate before it could see the frame.
        self.write_handed_if_free(Some(deadline));
        Ok(())
    }

    /// Queues a frame for the gate's next holder if it is small and fewer than
    /// [`HAND_OVER_FRAMES`] wait; gives it back otherwise. The caller makes sure a holder comes
    /// (the one there is, [`write_handed`](Self::write_handed), or the flusher).
    fn hand_over(&self, frame: OutFrame) -> Result<(), OutFrame> {
        if frame.len() > HAND_OVER_MAX {
            return Err(frame);
        }
        let mut handed = lock(&self.writer.handed);
        if handed.len() >= HAND_OVER_FRAMES {
            return Err(frame);
        }
        handed.push(frame);
        Ok(())
    }

    /// Takes back request `id`'s frame if it still waits to be written (handed over): true
    /// if it was there, so not a byte of it was sent.
    pub(crate) fn withdraw(&self, id: u64) -> bool {
        let mut handed = lock(&self.writer.handed);
        match handed.iter().position(|f| f.is_call(id)) {
            Some(i) => {
                handed.remove(i);
                true
            }
            None => false,
        }
    }

    /// Hands the frame of an async call over to be written with others, if it comes in a
    /// burst of them ([`crate::core::flush`]); gives it back to be written now otherwise.
    fn defer(self: &Arc<Self>, frame: OutFrame, deadline: Instant) -> Result<(), OutFrame> {
        if !self.deferral.in_burst() {
            return Err(frame);
        }
        self.defer_frame(frame, Some(deadline))
    }

    /// Hands a frame over to be written with others, by [`FLUSH_AFTER`](crate::core::flush::FLUSH_AFTER) at the latest
    /// ([`crate::core::flush`]); gives it back to be written now if it is large or enough
    /// frames wait already. If no thread may be started to write it in time, it is written now,
    /// waiting for the transport until `deadline`.
    fn defer_frame(
        self: &Arc<Self>,
        frame: OutFrame,
        deadline: Option<Instant>,
    ) -> Result<(), OutFrame> {
        // When enough wait for one write, this frame is written now, with them all.
        self.hand_over(frame)?;
        self.flush_soon(deadline);
        Ok(())
    }

    /// Makes sure the frames handed over are written by [`FLUSH_AFTER`](crate::core::flush::FLUSH_AFTER)
    /// from now at the latest: by the flusher thread, or now if it cannot run (then waiting
    /// for the transport until `deadline`).
    pub(crate) fn flush_soon(self: &Arc<Self>, deadline: Option<Instant>) {
        match self.deferral.arm() {
            Armed::Yes => {}
            Armed::StartThread => {
                // The flusher counts as a thread of the pool, within its limits.
                let started = crate::core::dispatch::reserve_helper(self) && {
                    let me = self.clone();
                    let spawned = self.spawn("rpyc-flusher", move || {
                        Deferral::run(&me);
                        crate::core::dispatch::helper_ended(&me);
                    });
                    if let Err(e) = &spawned {
                        log::warn!("{}: cannot start a thread: {e}", self.peer);
                        crate::core::dispatch::helper_ended(self);
                    }
                    spawned.is_ok()
                };
                if !started {
                    self.deferral.not_started();
                    self.write_handed(deadline);
                }
            }
            Armed::No => self.write_handed(deadline),
        }
    }

    /// Whether a calling thread waiting for a reply would look for it before it parks, for
    /// tests.
    #[cfg(test)]
    pub(crate) fn callers_spin(&self) -> bool {
        self.callers_spin.load(Ordering::Relaxed)
    }

    /// Whether frames handed over wait to be written.
    pub(crate) fn has_handed(&self) -> bool {
        !lock(&self.writer.handed).is_empty()
    }

    /// Hands a pipelined reply over with no timer armed, for a watcher or the next pool thread
    /// to wait for input to have written ([`left_unwritten`](Self::left_unwritten)); gives it
    /// back if it cannot wait so.
    pub(crate) fn leave_to_watcher(&self, frame: OutFrame) -> Result<(), OutFrame> {
        self.hand_over(frame)?;
        self.writer.unarmed.store(true, Ordering::Release);
        Ok(())
    }

    /// Hands a frame over as [`write_reply`](Self::write_reply) does before it writes it, for
    /// tests.
    #[cfg(test)]
    pub(crate) fn hand_over_in_transit(&self, frame: OutFrame) {
        assert!(self.hand_over(frame).is_ok(), "the frame was not taken");
    }

    /// Whether a pipelined reply handed over without a timer ([`dispatch::watched`]) may still
    /// wait with nobody to write it: frames are handed over and nobody holds the gate (its
    /// holder writes them before it lets the next writer in). Other frames handed over are on
    /// their way: their thread writes them if the gate is free. Each such reply is answered
    /// once: the next call says no until another is handed over.
    ///
    /// [`dispatch::watched`]: crate::core::dispatch::watched
    pub(crate) fn left_unwritten(&self) -> bool {
        self.writer.unarmed.swap(false, Ordering::AcqRel) && self.has_handed() && !self.writing()
    }

    /// Writes the frames handed over (deferred async calls, replies, calls) now, waiting for
    /// the transport at most until `deadline`, unless the gate is taken: then its holder
    /// writes them before it opens it.
    pub(crate) fn write_handed(self: &Arc<Self>, deadline: Option<Instant>) {
        if !lock(&self.writer.handed).is_empty() {
            self.write_handed_if_free(deadline);
        }
    }

    /// [`write_handed`](Self::write_handed), for a caller that just handed a frame over.
    fn write_handed_if_free(self: &Arc<Self>, deadline: Option<Instant>) {
        if !self.is_closed() && self.writer.try_take() {
            self.open_gate(deadline);
            self.flush_releases(deadline);
        }
    }

    /// Sends a reply (or error reply) of ours, which nobody waits for: a small one is handed
    /// to the gate's holder if the gate is taken; otherwise it is written like a call's frame,
    /// without a deadline. A failure ends the connection.
    fn write_reply(self: &Arc<Self>, frame: OutFrame) {
        match self.hand_over(frame) {
            // Written here if the gate is free (or its holder opened it before it could see
            // the reply).
            Ok(()) => self.write_handed_if_free(None),
            Err(frame) => {
                let _ = self.write_frame(frame, None);
            }
        }
    }

    /// Waits for the writer until `deadline` (none: until it is free or the connection
    /// closes).
    fn take_gate(&self, deadline: Option<Instant>) -> Result<(), SendFail> {
        let w = &self.writer;
        for _ in 0..64 {
            if self.is_closed() {
                return Err(SendFail::Closed(self.closed_error()));
            }
            if w.try_take() {
                return Ok(());
            }
            std::hint::spin_loop();
        }
        let mut g = lock(&w.waiting);
        w.waiters.fetch_add(1, Ordering::SeqCst);
        let r = loop {
            if self.is_closed() {
                break Err(SendFail::Closed(self.closed_error()));
            }
            // Before looking at the deadline: a thread woken to take the gate takes it.
            if w.try_take() {
                break Ok(());
            }
            g = match deadline {
                None => w.cv.wait(g).unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        break Err(SendFail::NotSent);
                    }
                    w.cv.wait_timeout(g, d - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
        };
        w.waiters.fetch_sub(1, Ordering::SeqCst);
        r
    }

    fn release_gate(&self) {
        let w = &self.writer;
        let was = w.busy.swap(false, Ordering::SeqCst);
        debug_assert!(was, "only the holder releases the gate");
        if w.waiters.load(Ordering::SeqCst) > 0 {
            // One is enough: whoever wakes (even one whose deadline just passed) takes the gate
            // if it is free, before looking at its deadline.
            let _g = lock(&w.waiting);
            w.cv.notify_one();
        }
    }

    /// Opens the gate its caller holds, after writing every frame handed over to it, with
    /// `deadline` for the writing (a frame it cuts short, and those after it, are finished in
    /// the background). Frames handed over after it looked for the last time are written here
    /// too if the gate is still free then, so none is left behind.
    fn open_gate(self: &Arc<Self>, deadline: Option<Instant>) {
        loop {
            let frames = std::mem::take(&mut *lock(&self.writer.handed));
            if frames.is_empty() {
                self.release_gate();
                if lock(&self.writer.handed).is_empty() || !self.writer.try_take() {
                    return;
                }
                continue;
            }
            if self.is_closed() {
                self.release_gate();
                return;
            }
            match self.write_frames(&frames, 0, deadline) {
                Ok(()) => {}
                Err(Stopped::Deadline { frame, at, .. }) => {
                    // These were handed over by threads that have moved on: they must go out
                    // whole, so nothing is given up here.
                    self.finish_in_background(frames, frame, at);
                    return;
                }
                Err(Stopped::Failed(e)) => {
                    self.write_failed(e);
                    self.release_gate();
                    return;
                }
            }
        }
    }

    /// Writes `frames` in order, from byte `at` of the first one on; the caller holds the gate.
    /// Several frames, and the pieces of frames with splices, go out in vectored writes.
    fn write_frames(
        &self,
        frames: &[OutFrame],
        mut at: usize,
        deadline: Option<Instant>,
    ) -> Result<(), Stopped> {
        let mut sink = lock(&self.writer.sink);
        let mut first = 0;
        let mut pieces = Vec::new();
        while first < frames.len() {
            let whole = match &frames[first..] {
                [only] => only.contiguous(),
                _ => None,
            };
            let sent = match whole {
                Some(bytes) => sink.send(&bytes[at..], deadline),
                None => {
                    pieces.clear();
                    frames[first].pieces_into(at, &mut pieces, PIECES);
                    for f in &frames[first + 1..] {
                        if pieces.len() >= PIECES {
                            break;
                        }
                        f.pieces_into(0, &mut pieces, PIECES);
                    }
                    sink.send_vectored(&pieces, deadline)
                }
            };
            match sent {
                Ok(0) => {
                    return Err(Stopped::Deadline {
                        frame: first,
                        at,
                        committed: sink.committed(),
                    })
                }
                Ok(mut n) => {
                    self.activity.touch();
                    while n > 0 {
                        let left = frames[first].len() - at;
                        if n < left {
                            at += n;
                            break;
                        }
                        n -= left;
                        first += 1;
                        at = 0;
                    }
                }
                Err(e) => return Err(Stopped::Failed(e)),
            }
        }
        Ok(())
    }

    /// A deadline passed in the middle of `frames[first]` (after `at` bytes), or before frames
    /// handed over by others: a thread of the connection sends the rest (the peer must never
    /// see half a frame followed by another), holding the gate until it is done or the stall
    /// timeout ends the connection.
    fn finish_in_background(self: &Arc<Self>, mut frames: Vec<OutFrame>, first: usize, at: usize) {
        frames.drain(..first);
        let me = self.clone();
        let started = self.spawn("rpyc-flush", move || {
            match me.write_frames(&frames, at, None) {
                Ok(()) => {
                    drop(frames);
                    me.open_gate(None);
                    me.flush_releases(None);
                }
                Err(Stopped::Failed(e)) => {
                    me.write_failed(e);
                    me.release_gate();
                }
                Err(Stopped::Deadline { .. }) => unreachable!("no deadline"),
            }
        });
        if let Err(e) = started {
            self.terminate(format!(
                "a frame was cut short and no thread could be started to finish it: {e}"
            ));
            self.release_gate();
        }
    }

    /// Ends the connection after a failed write; a peer that stopped reading is worth a warning.
    fn write_failed(self: &Arc<Self>, e: std::io::Error) {
        if e.kind() == std::io::ErrorKind::TimedOut && !self.is_closed() {
            log::warn!(
                "{}: closing the connection: {e} (the stall timeout is the call timeout, at \
                 least 1 s)",
                self.peer
            );
        }
        self.terminate(format!("write failed: {e}"));
    }

    /// How long the connection has moved no byte either way, or `None` while work is in flight
    /// (a call of ours waiting for its reply, a request of the peer being served or queued, a
    /// frame being written).
    pub(crate) fn idle_for(&self) -> Option<Duration> {
        let calls_waiting = lock(&self.pending).as_ref().is_some_and(|m| !m.is_empty());
        // Each lock on its own: none is held while the next is taken.
        let handed = self.has_handed();
        if calls_waiting
            || handed
            || self.serving.load(Ordering::Acquire) > 0
            || self.writer.busy.load(Ordering::Acquire)
            || crate::core::dispatch::has_queued(self)
        {
            return None;
        }
        Some(self.activity.idle_for())
    }

    /// Releases waiting to be sent.
    #[cfg(test)]
    pub(crate) fn queued_releases(&self) -> usize {
        lock(&self.releases).len()
    }

    /// Replies handed over to the gate's holder and not written yet.
    #[cfg(test)]
    pub(crate) fn handed_over(&self) -> usize {
        lock(&self.writer.handed).len()
    }

    /// Removes a caller from the pending table; returns its entry if it was still there.
    fn forget(&self, id: u64) -> bool {
        lock(&self.pending)
            .as_mut()
            .and_then(|m| m.remove(&id))
            .is_some()
    }

    /// Waits for the reply to `p` until `deadline`, running nested requests meanwhile. `name`
    /// names the call in a timeout (built only then: the call path formats nothing).
    pub(crate) fn wait(
        self: &Arc<Self>,
        p: &Pending,
        deadline: Instant,
        name: &dyn Fn() -> String,
        timeout: Duration,
    ) -> Result<Frame, Error> {
        use crate::core::dispatch::{self, CallerRead};
        let timed_out = |this: &Arc<Self>| {
            // A request still waiting to be written was never sent.
            let unsent = this.withdraw(p.id);
            match this.abandon(p) {
                Some(f) => Ok(f),
                None if unsent => Err(Error::Timeout(Timeout::Send {
                    method: name(),
                    after: timeout,
                    partly: false,
                })),
                None => Err(Error::Timeout(Timeout::Call {
                    method: name(),
                    after: timeout,
                })),
            }
        };
        loop {
            // Checked first on every round: a caller gets its timeout at its deadline, however
            // busy the connection is.
            if Instant::now() >= deadline {
                return timed_out(self);
            }
            // Read our reply ourselves if nobody is reading: no thread hand-off.
            if let Some(reader) = dispatch::take_for_caller(self) {
                match dispatch::read_for_caller(self, reader, p, deadline) {
                    CallerRead::Got(Delivery::Reply(f)) => return Ok(f),
                    CallerRead::Got(Delivery::Nested(f)) => {
                        self.serve(f);
                        continue;
                    }
                    CallerRead::TimedOut => return timed_out(self),
                    CallerRead::Ended => {}
                }
            }
            let now = Instant::now();
            let until = (now + dispatch::CALLER_POLL).min(deadline);
            dispatch::caller_blocked(self, true);
            let got = if self.callers_spin.load(Ordering::Relaxed) {
                p.rx.recv_deadline_spinning(until, &WAITER_SLOTS)
            } else {
                p.rx.recv_deadline(until)
            };
            let short = got.is_ok() && now.elapsed() <= SHORT_REPLY_WAIT;
            // Written only when it changes: every thread sharing the connection reads it, and a
            // store per call would move its cache line between their CPUs.
            if self.callers_spin.load(Ordering::Relaxed) != short {
                self.callers_spin.store(short, Ordering::Relaxed);
            }
            dispatch::caller_blocked(self, false);
            match got {
                Ok(Delivery::Reply(f)) => return Ok(f),
                Ok(Delivery::Nested(f)) => self.serve(f),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Err(self.closed_error()),
            }
        }
    }

    /// Gives up on a call: its late reply will be dropped. Nested requests that were already
    /// handed to it go to the pool; a reply that slipped in is returned.
    pub(crate) fn abandon(self: &Arc<Self>, p: &Pending) -> Option<Frame> {
        let mut reply = None;
        // If the reading thread took our entry (or the connection closed), the reply is in our
        // channel or about to be (it is sent right after the entry is removed, with nothing in
        // between that can wait): wait for it rather than lose it. Nested requests before it
        // go to the pool, never dropped.
        let mut expecting = !self.forget(p.id);
        loop {
            let d = if expecting {
                p.rx.recv()
            } else {
                p.rx.try_recv().ok()
            };
            match d {
                Some(Delivery::Reply(f)) => {
                    reply = Some(f);
                    expecting = false;
                }
                Some(Delivery::Nested(f)) => crate::core::dispatch::submit(self, f),
                None => break,
            }
        }
        reply
    }

    /// Turns a reply frame into the caller's result.
    pub(crate) fn decode_reply<R: serde::de::DeserializeOwned>(
        self: &Arc<Self>,
        mut frame: Frame,
        method: &str,
    ) -> Result<R, Error> {
        let detached = frame.detached.take();
        let _offered = codec::offer(frame.payload(), detached);
        match frame.header.kind {
            Kind::Reply => {
                let log = Scope::recording_imports();
                let scope = Scope::connection(self);
                let r = codec::decode(frame.payload());
                drop(scope);
                let imported = log.finish_imports();
                r.map_err(|e| {
                    object::release_unread_except(self, frame.payload(), imported);
                    Error::Decode(format!(
                        "the result of `{method}` is not a {}: {e}",
                        codec::type_name::<R>()
                    ))
                })
            }
            _ => {
                let (code, service, method, message): (u8, String, String, String) =
                    codec::decode(frame.payload()).map_err(|e| {
                        Error::Protocol(format!("malformed error reply to `{method}`: {e}"))
                    })?;
                Err(Error::Remote(RemoteError {
                    kind: RemoteErrorKind::from_code(code),
                    service,
                    method,
                    message,
                }))
            }
        }
    }

    /// Decides where an incoming frame goes. Replies and nested requests are delivered here;
    /// anything else is returned for a worker. An error means the peer broke the protocol.
    pub(crate) fn route(&self, frame: Frame) -> Result<Routed, Error> {
        let h = &frame.header;
        match h.kind {
            Kind::Reply | Kind::Error => {
                let mut pending = lock(&self.pending);
                let waiter = pending.as_mut().and_then(|m| m.remove(&h.id));
                match waiter {
                    Some(w) => {
                        drop(pending);
                        // Sent at once after the removal: a caller that gives up meanwhile
                        // finds its entry gone and waits for this (see `abandon`).
                        w.tx.send(Delivery::Reply(frame));
                        if w.serves_nested {
                            return Ok(Routed::ToCaller);
                        }
                    }
                    None if h.id == 0 || h.id >= self.next_id.load(Ordering::Relaxed) => {
                        drop(pending);
                        return Err(Error::Protocol(format!(
                            "the peer replied to request {} which this side never sent",
                            h.id
                        )));
                    }
                    None => {
                        drop(pending);
                        log::debug!(
                            "{}: dropping the late reply to request {} (its caller gave up)",
                            self.peer,
                            h.id
                        );
                        // A worker releases the objects it may carry (this thread never writes).
                        return Ok(Routed::Job(frame));
                    }
                }
                Ok(Routed::Done)
            }
            Kind::Call | Kind::Oneway if h.parent != 0 => {
                let pending = lock(&self.pending);
                let waiter = pending
                    .as_ref()
                    .and_then(|m| m.get(&h.parent))
                    .filter(|w| w.serves_nested);
                match waiter {
                    Some(w) => {
                        // The waiter is blocked in recv; if it just gave up, `abandon` drains
                        // its channel and resubmits this request to the pool.
                        w.tx.send(Delivery::Nested(frame));
                        Ok(Routed::ToCaller)
                    }
                    None => Ok(Routed::Job(frame)),
                }
            }
            _ => Ok(Routed::Job(frame)),
        }
    }

    /// Runs one incoming request (or ping or release) and sends its reply.
    ///
    /// Handlers' panics are caught where they run and become error replies; user code can still
    /// panic in a `Drop` here (an object the peer released, the last handle of a service). That
    /// is caught too, so the thread and the counts of the pool and of the server stay true.
    pub(crate) fn serve(self: &Arc<Self>, frame: Frame) {
        self.serving.fetch_add(1, Ordering::AcqRel);
        if catch_unwind(AssertUnwindSafe(|| self.serve_frame(frame))).is_err() {
            log::error!(
                "{}: user code panicked while a request was served (in a Drop?); the \
                 connection carries on",
                self.peer
            );
        }
        self.serving.fetch_sub(1, Ordering::AcqRel);
    }

    fn serve_frame(self: &Arc<Self>, mut frame: Frame) {
        let h = &frame.header;
        match h.kind {
            Kind::Ping => {
                let mut out = OutFrame::new(0);
                out.payload().push(0xf6);
                self.send_reply(out, Kind::Reply, h.id);
            }
            Kind::Release => {
                let applied = codec::decode_releases(frame.payload(), |chunk| {
                    let dropped = lock(&self.objects).release(chunk);
                    drop(dropped); // user Drop code runs here, outside the lock
                });
                if let Err(e) = applied {
                    log::warn!("{}: ignoring a malformed release message: {e}", self.peer);
                }
            }
            Kind::Call | Kind::Oneway => self.serve_call(&mut frame),
            Kind::Reply | Kind::Error => object::release_unread(self, frame.payload()),
        }
    }

    /// Serves a call or oneway: finds its object and method, runs the handler, answers.
    fn serve_call(self: &Arc<Self>, frame: &mut Frame) {
        let detached = frame.detached.take();
        let frame = &*frame;
        let h = &frame.header;
        let method = frame.method();
        let service = if h.target == 0 {
            Some(self.service.clone())
        } else {
            lock(&self.objects).get(h.target)
        };
        let mut out = OutFrame::new(0);
        let outcome = match &service {
            None => Err((
                RemoteErrorKind::NoSuchObject,
                format!(
                    "object {} does not exist on this connection (released, never exported, \
                     or another connection's)",
                    h.target
                ),
            )),
            Some(svc) => match svc.inner.methods.get(method) {
                None => Err((
                    RemoteErrorKind::NoSuchMethod,
                    format!(
                        "`{}` has no method `{method}`; it has: {}",
                        svc.name(),
                        svc.method_names().join(", ")
                    ),
                )),
                Some(invoke) => self.run_handler(&**invoke, frame, detached, &mut out),
            },
        };
        if let Err((RemoteErrorKind::NoSuchObject | RemoteErrorKind::NoSuchMethod, _)) = outcome {
            object::release_unread(self, frame.payload());
        }
        let service_name = service.as_ref().map_or("?", |s| s.name());
        if h.kind == Kind::Oneway {
            if let Err((kind, message)) = outcome {
                log::warn!(
                    "{}: oneway call {service_name}.{method} failed: {kind}: {message}",
                    self.peer
                );
            }
            return;
        }
        let outcome = outcome.and_then(|skip| {
            out.skip_payload_prefix(skip);
            out.seal(Kind::Reply, h.id, 0, 0, "")
                .and_then(|body| self.check_size(body))
                .map_err(|e| (RemoteErrorKind::BadResult, e.to_string()))
        });
        match outcome {
            // The peer pipelines: this reply may wait (briefly) for those of the next requests.
            // A pool thread watching the connection looks at it every few hundred microseconds
            // anyway, and has the flusher write it if it still waits then: no timer to arm.
            Ok(()) if frame.more && crate::core::dispatch::watched(self) => {
                if let Err(out) = self.leave_to_watcher(out) {
                    self.write_reply(out);
                }
            }
            Ok(()) if frame.more => {
                if let Err(out) = self.defer_frame(out, None) {
                    self.write_reply(out);
                }
            }
            Ok(()) => self.write_reply(out),
            Err((kind, message)) => self.send_error(h.id, kind, service_name, method, &message),
        }
    }

    /// Runs a handler on this thread, as the server of request `frame` (calls it makes to the
    /// peer name it as their parent), with its panics caught; its result is encoded into
    /// `out` (the number of bytes to skip at its start is returned). A detached byte string
    /// is offered to the argument decoding; object references the arguments carried are
    /// released if their decoding failed.
    fn run_handler(
        self: &Arc<Self>,
        invoke: &Invoke,
        frame: &Frame,
        detached: Option<codec::Detached>,
        out: &mut OutFrame,
    ) -> Result<usize, (RemoteErrorKind, String)> {
        let cx = Context {
            shared: self.clone(),
        };
        let offered = codec::offer(frame.payload(), detached);
        let log = Scope::recording_imports();
        let serving = Scope::serving(self, frame.header.id);
        let connection = Scope::connection(self);
        let result = catch_unwind(AssertUnwindSafe(|| {
            out.encode(|buf| invoke(&cx, frame.payload(), buf))
        }));
        drop((connection, serving));
        let imported = log.finish_imports();
        if let Ok(Err(Failure::BadArguments(_))) = &result {
            object::release_unread_except(self, frame.payload(), imported);
        }
        drop(offered);
        match result {
            Ok(Ok(skip)) => Ok(skip),
            Ok(Err(Failure::Handler(m))) => Err((RemoteErrorKind::Handler, m)),
            Ok(Err(Failure::BadArguments(m))) => Err((RemoteErrorKind::BadArguments, m)),
            Ok(Err(Failure::BadResult(m))) => Err((RemoteErrorKind::BadResult, m)),
            Err(panic) => {
                let m = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "(non-text panic payload)".into());
                Err((RemoteErrorKind::Panic, m))
            }
        }
    }

    /// Answers request `id` with an ERROR, its message cut to fit the peer's frame limit.
    fn send_error(
        self: &Arc<Self>,
        id: u64,
        kind: RemoteErrorKind,
        service: &str,
        method: &str,
        message: &str,
    ) {
        log::debug!("{}: {service}.{method}: {kind}: {message}", self.peer);
        let mut out = OutFrame::new(0);
        // The header of a reply takes at most 14 bytes: a 5-array, kind, a 9-byte id, 0, 0, "".
        let max_len = (self.peer_hello.max_frame as usize).saturating_sub(14);
        codec::encode_error(
            out.payload(),
            kind.code(),
            service,
            method,
            message,
            max_len,
        );
        self.send_reply(out, Kind::Error, id);
    }

    /// Queues the release of a remote object reference; sent without blocking the caller
    /// (it may be a `Drop` running in the middle of anything).
    pub(crate) fn queue_release(self: &Arc<Self>, id: u64, count: u64) {
        self.queue_releases([(id, count)]);
    }

    /// Queues releases of the peer's objects and sends what the transport takes now (a `Drop`
    /// must not wait); the rest goes out with the next frame anyone writes. A queue over
    /// `max_releases` ends the connection: the peer makes us release objects and reads nothing.
    pub(crate) fn queue_releases(self: &Arc<Self>, releases: impl IntoIterator<Item = (u64, u64)>) {
        if self.is_closed() {
            return;
        }
        let waiting = {
            let mut queued = lock(&self.releases);
            queued.extend(releases);
            queued.len()
        };
        if waiting > self.max_releases {
            log::warn!(
                "{}: closing the connection: {waiting} object releases wait to be sent and the \
                 peer reads nothing",
                self.peer
            );
            self.terminate(format!(
                "the peer read nothing while {waiting} object releases waited to be sent (at \
                 most {} may wait)",
                self.max_releases
            ));
            return;
        }
        self.flush_releases(Some(Instant::now()));
    }

    /// Seals and sends a reply or error frame (small, built by this side); a failure to send
    /// ends the connection, which `write_frame` already arranged.
    fn send_reply(self: &Arc<Self>, mut out: OutFrame, kind: Kind, id: u64) {
        match out.seal(kind, id, 0, 0, "") {
            Ok(_) => self.write_reply(out),
            Err(e) => log::error!("{}: cannot send a reply to request {id}: {e}", self.peer),
        }
    }

    /// Sends queued releases if the writer is free, waiting for the transport at most until
    /// `deadline`; otherwise the writer's holder sends them when it is done (every writer calls
    /// this after opening the gate). Each release frame stays within the peer's frame limit.
    fn flush_releases(self: &Arc<Self>, deadline: Option<Instant>) {
        loop {
            if lock(&self.releases).is_empty() {
                return;
            }
            if self.is_closed() || !self.writer.try_take() {
                return;
            }
            let batch = {
                let mut queued = lock(&self.releases);
                let n = queued
                    .len()
                    .min(releases_per_frame(self.peer_hello.max_frame));
                queued.drain(..n).collect::<Vec<_>>()
            };
            if batch.is_empty() {
                self.open_gate(deadline);
                return;
            }
            let mut out = OutFrame::new(0);
            codec::encode_into(out.payload(), &batch).expect("integers encode");
            if let Err(e) = out.seal(Kind::Release, 0, 0, 0, "") {
                self.open_gate(deadline);
                log::error!("{}: cannot send releases: {e}", self.peer);
                return;
            }
            let frames = vec![out];
            match self.write_frames(&frames, 0, deadline) {
                Ok(()) => self.open_gate(deadline),
                Err(Stopped::Deadline {
                    at: 0,
                    committed: false,
                    ..
                }) => {
                    // Nothing went out: they wait for the next writer.
                    lock(&self.releases).splice(0..0, batch);
                    self.open_gate(deadline);
                    return;
                }
                Err(Stopped::Deadline { at, .. }) => {
                    self.finish_in_background(frames, 0, at);
                    return;
                }
                Err(Stopped::Failed(e)) => {
                    self.write_failed(e);
                    self.release_gate();
                    return;
                }
            }
        }
    }

    /// Ends the connection (once; later calls do nothing). See the module docs.
    pub(crate) fn terminate(self: &Arc<Self>, reason: String) {
        let established = {
            let mut r = lock(&self.reason);
            if r.is_some() {
                return;
            }
            *r = Some(reason.clone());
            self.closed.store(true, Ordering::Release);
            // Read under the lock: see the end of `Connection::establish`.
            self.established.load(Ordering::Acquire)
        };
        log::debug!("{}: connection closed: {reason}", self.peer);
        self.control.shutdown();
        {
            // Threads waiting for the writer look at `closed` again.
            let _g = lock(&self.writer.waiting);
            self.writer.cv.notify_all();
        }
        let waiters = lock(&self.pending).take();
        drop(waiters); // every waiting caller wakes up with Disconnected -> Error::Closed
        let handed = std::mem::take(&mut *lock(&self.writer.handed));
        drop(handed);
        self.deferral.stop();
        crate::core::dispatch::stop(self);
        let objects = std::mem::take(&mut *lock(&self.objects));
        drop(objects);
        lock(&self.remotes).clear();
        lock(&self.releases).clear();
        self.closed_cv.notify_all();
        let hooks = std::mem::take(&mut *lock(&self.on_close));
        for hook in hooks {
            hook();
        }
        if established {
            self.run_on_disconnect();
        }
    }

    /// Runs the service's on_disconnect hook; called once, by `terminate` or `establish`.
    fn run_on_disconnect(self: &Arc<Self>) {
        self.run_hook(self.service.inner.on_disconnect.clone(), "on_disconnect");
    }

    /// Runs `f` on a thread of the connection's set (see [`ThreadSet::spawn`]).
    pub(crate) fn spawn(
        &self,
        name: &str,
        f: impl FnOnce() + Send + 'static,
    ) -> std::io::Result<()> {
        self.threads.spawn(name, f)?;
        self.threads_spawned.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Whether a frame is being written right now (someone holds the write gate).
    pub(crate) fn writing(&self) -> bool {
        self.writer.busy.load(Ordering::Relaxed)
    }

    /// How many threads were started, or taken from those parked, for this connection.
    #[cfg(test)]
    pub(crate) fn threads_spawned(&self) -> usize {
        self.threads_spawned.load(Ordering::Relaxed)
    }

    /// Runs one of the service's hooks with this connection's context, its panic caught and
    /// logged.
    fn run_hook(self: &Arc<Self>, hook: Option<Arc<Hook>>, name: &str) {
        if let Some(hook) = hook {
            let cx = Context {
                shared: self.clone(),
            };
            if catch_unwind(AssertUnwindSafe(|| hook(&cx))).is_err() {
                log::error!(
                    "{}: {name} of service {} panicked",
                    self.peer,
                    self.service.name()
                );
            }
        }
    }
}

/// What the handshake works with, beside the transport's two halves.
struct Shake<'a> {
    control: &'a dyn Control,
    peer: &'a str,
    opts: &'a Config,
    /// Bytes of our hello already written (see [`Transport::hello_sent`]).
    hello_sent: usize,
    deadline: Instant,
}

/// Our hello, for connections with these settings.
pub(crate) fn our_hello(opts: &Config) -> Hello {
    Hello {
        version: wire::VERSION,
        flags: 0,
        max_frame: opts.max_frame as u32,
        max_queued: opts.max_queued as u32,
    }
}

/// Exchanges hellos before the deadline and checks the peer's: the rpyc handshake. A transport
/// that cannot time out a read (a stream, or a zero timeout) gets a watchdog thread that shuts
/// it down when the time is up: a child process is killed, a stream peer sees the end of our
/// side. The hello is read unbuffered, so nothing after it is taken from the stream.
fn handshake(
    reader: &mut Box<dyn std::io::Read + Send>,
    writer: &mut dyn Sink,
    shake: Shake<'_>,
) -> Result<Hello, Error> {
    let Shake {
        control,
        peer,
        opts,
        hello_sent,
        deadline,
    } = shake;
    let timed_out = || Error::Timeout(Timeout::Handshake(opts.handshake_timeout));
    let left = deadline.saturating_duration_since(Instant::now());
    let timed_read = !left.is_zero() && control.set_read_timeout(Some(left)).is_ok();
    let expired = AtomicBool::new(false);
    let ours = our_hello(opts);
    let theirs = std::thread::scope(|s| {
        let (done, finished) = crossbeam_channel::bounded::<()>(0);
        if !timed_read {
            let expired = &expired;
            let watchdog = move || {
                if finished.recv_deadline(deadline) == Err(RecvTimeoutError::Timeout) {
                    expired.store(true, Ordering::Release);
                    control.shutdown();
                }
            };
            if let Err(e) = std::thread::Builder::new()
                .name("rpyc-handshake-timer".into())
                .spawn_scoped(s, watchdog)
            {
                log::warn!("{peer}: no handshake timeout: cannot start its thread: {e}");
            }
        }
        let set_timeout = |d: Option<Duration>| {
            if timed_read {
                control.set_read_timeout(d)
            } else {
                Err(std::io::ErrorKind::Unsupported.into())
            }
        };
        let r = crate::transport::hello::exchange_hello(
            reader,
            writer,
            ours,
            hello_sent,
            deadline,
            &set_timeout,
        );
        drop(done);
        r
    });
    let theirs = match theirs {
        _ if expired.load(Ordering::Acquire) => return Err(timed_out()),
        Err(Error::Timeout(Timeout::Handshake(_))) => return Err(timed_out()),
        // TLS 1.3 reports a rejected client certificate on the first read, which is the hello:
        // the TLS layer's description says what really happened.
        Err(e) => return Err(control.failure().unwrap_or(e)),
        Ok(h) => h,
    };
    if theirs.flags & wire::FLAG_TLS_REQUIRED != 0 {
        return Err(Error::Handshake(HandshakeError::new(
            HandshakeErrorKind::TlsRequired,
            format!(
                "{peer} only accepts TLS connections: connect with rpyc::ssl_connect or an \
                 SslClient"
            ),
        )));
    }
    if theirs.flags & wire::FLAG_REFUSED != 0 {
        return Err(Error::Handshake(HandshakeError::new(
            HandshakeErrorKind::Refused,
            format!(
                "{peer} refused the connection: the server is at its limit of connections \
                 (or of handshakes in progress); retry later, or raise its max_connections"
            ),
        )));
    }
    Ok(theirs)
}

/// A synchronous call on `target`: send, wait (running nested requests), decode.
pub(crate) fn call<R: serde::de::DeserializeOwned>(
    shared: &Arc<Shared>,
    target: u64,
    method: &str,
    args: &dyn Args,
    timeout: Duration,
) -> Result<R, Error> {
    call_until(
        shared,
        target,
        method,
        args,
        crate::base::deadline(timeout),
        timeout,
    )
}

/// [`call`] until `deadline` (which `timeout`, named in errors, set).
pub(crate) fn call_until<R: serde::de::DeserializeOwned>(
    shared: &Arc<Shared>,
    target: u64,
    method: &str,
    args: &dyn Args,
    deadline: Instant,
    timeout: Duration,
) -> Result<R, Error> {
    let p = shared
        .send_request(target, method, args, Kind::Call, true, deadline, timeout)?
        .expect("a call expects a reply");
    let frame = shared.wait(&p, deadline, &|| call_name(target, method), timeout)?;
    shared.decode_reply(frame, method)
}

/// How timeouts name a call: `root.method` on the peer's root service, `object#ID.method` on
/// another of its objects (the client does not know the service's own name).
pub(crate) fn call_name(target: u64, method: &str) -> String {
    match target {
        0 => format!("root.{method}"),
        id => format!("object#{id}.{method}"),
    }
}

/// How many `[id, count]` pairs fit in one release frame under the peer's frame limit: each
/// pair takes at most 19 bytes (an array head and two 9-byte integers), the header and the
/// list's own head at most 20.
fn releases_per_frame(peer_max_frame: u32) -> usize {
    ((peer_max_frame as usize).saturating_sub(20) / 19).max(1)
}
