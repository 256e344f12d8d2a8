//! One connection to a Python RPyC 6 peer: who owns what, which thread does what, and how a
//! reply finds its caller.
//!
//! # Threads and ownership
//!
//! * **The reader role** is the transport's read half (a `FrameReader`): exactly one thread
//!   of the connection's pool (`rpyc-py-worker`) holds it at a time and reads, and the role
//!   moves between them by value (leader/follower), never through a shared slot. The thread
//!   holding it never writes to the transport, and never runs user code while it holds it,
//!   so nothing the peer or a handler does can stop the connection from reading. For each
//!   frame it:
//!   - a **reply or exception**: unboxes it and puts it in the slot of the caller waiting on
//!     that sequence number (a `ReplySlot` in `pending`: a mutex and a condvar); a reply
//!     nobody waits for any more (its caller timed out) is dropped, which releases the objects
//!     it referred to;
//!   - a **request**: `DEL` and `PING` are answered at once (table bookkeeping only), `CLOSE`
//!     ends the connection; anything else it runs itself, after **passing the role on**
//!     (`Shared::lead`): to an idle thread of the pool (through the pool's channel), or to a
//!     new thread if none is idle. So the request is not handed across threads on its way to
//!     its handler, and its reply is written by the thread that ran it; the next reader wakes
//!     while the request runs, off the critical path of a peer that waits for the reply before
//!     sending again.
//! * **The pool**: threads that run requests and wait, idle, for the reader role. A request
//!   counts as running from the moment its reader passes the role on until its reply is
//!   queued, then its thread counts as idle again (before the reply is written, so the peer's
//!   next request finds it free) and waits for the role; a thread idle for 2 s ends. At most
//!   `max_workers` requests run at once: a request beyond that, or one for which no thread
//!   can take the role (a server's shared thread budget is spent: a connection's first two
//!   threads are its own, further ones come out of the budget), is answered at once with a
//!   Python `RuntimeError` saying so by the reader, which keeps the role and goes on reading
//!   (never queued without bound).
//!   A handler may call the peer back: its call waits for its own reply like any other, while
//!   the thread that took the role goes on reading (and, for a callback request, passes the
//!   role on again), so callbacks nest to any depth the worker limit allows and cannot
//!   deadlock.
//! * **Writing**: every frame goes into the outbox, and one thread at a time (the one that
//!   sets `Outbox::writing`) takes the write half and sends the queued frames whole, in order,
//!   one write per frame. A caller, or a pool thread replying to the request it ran, writes
//!   the frame it queues itself when nobody else is writing (no hand-off to another thread),
//!   until its own deadline: the rest of a frame cut there goes back to the front of the
//!   queue, so frames stay whole and in order. The thread holding the reader role (for its
//!   answers to `DEL` and `PING`, and its refusals) and `Drop`s never write: they queue, and
//!   **the writer thread** (`rpyc-py-writer`) sends what they queue, and what a caller left
//!   unfinished, whenever no one else is writing. The outbox holds at most `max_buffered`
//!   bytes (at least one frame): a caller waits for room until its deadline; the reader's own
//!   answers never wait, and if the peer sends requests but does not read their answers until
//!   they exceed twice that bound, the connection is closed. A write that makes no progress
//!   for the stall timeout also closes it.
//!
//! # Calls
//!
//! A call takes the next sequence number, registers a `ReplySlot` under it in `pending`,
//! queues its frame (writing it itself, see above), and sleeps on the slot's condvar until the
//! reader puts its outcome there or its deadline passes; the caller never reads the transport
//! itself. On timeout it removes its entry (a late reply is then dropped). When the connection
//! ends, for whatever reason (the reader sees the peer hang up or fail, a write fails, a close),
//! `terminate` puts the same error in every slot of `pending` at once, waking every waiting
//! call, and later calls fail fast with it.
//!
//! # Objects
//!
//! * `locals`: our objects the peer holds (services, callbacks, bound methods minted for a
//!   `GETATTR`), with RPyC's count of how many times each was sent; the peer's `DEL(obj, n)`
//!   takes `n` off, and the entry goes at zero. At most `max_objects` entries: beyond, sending
//!   another object fails (the peer gets an exception saying so).
//! * `proxies`: the peer's objects we hold, one [`PyObject`](crate::python::PyObject) per id
//!   pack (weakly held here), counting how many times the peer sent it. When the last handle
//!   drops, one `DEL(obj, count)` is queued (fire and forget: its reply is ignored).
//! * When the connection ends both tables are emptied, which also breaks reference cycles
//!   between our objects and the connection.

use crate::base::limits::{Budget, Charge, ThreadBudget};
use crate::base::lock;
use crate::base::threads::ThreadSet;
use crate::error::{Error, HandshakeError, HandshakeErrorKind, PythonError, Timeout};
use crate::python::brine;
use crate::python::frame::{self, FrameReader, ReadError};
use crate::python::object::{ProxyInner, PyObject};
use crate::python::protocol::{self as proto, Handler, IdPack};
use crate::python::service::{Call, Service};
use crate::python::value::Value;
use crate::transport::{Control, Credentials, Sink, Transport};
use crossbeam_channel::{Receiver, Sender};
use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

/// How long an idle worker waits for another request before it ends.
const WORKER_IDLE: Duration = Duration::from_secs(2);
/// How often the reader wakes while the peer is quiet (to notice a close, and stalls).
const READ_TICK: Duration = Duration::from_millis(500);

/// The settings of one connection.
#[derive(Clone, Debug)]
pub(crate) struct Settings {
    pub call_timeout: Duration,
    pub max_frame: usize,
    pub max_buffered: usize,
    pub max_workers: usize,
    pub max_objects: usize,
    pub stall: Duration,
    /// What the peer's frames and the values decoded from them may hold in memory.
    pub budget: Arc<Budget>,
    /// A server's shared budget of worker threads beyond each connection's first.
    pub threads: Option<Arc<ThreadBudget>>,
}

/// A request's outcome as its caller receives it.
type Outcome = Result<Value, Error>;

/// Our object the peer holds, and how many times we sent it.
struct LocalEntry {
    obj: Service,
    count: u64,
    pack: IdPack,
}

#[derive(Default)]
struct Locals {
    entries: HashMap<i128, LocalEntry>,
    /// Handle of each exported object (by identity), so it keeps one id pack.
    by_object: HashMap<usize, i128>,
    next: i128,
}

/// Frames waiting to be written, and whether a thread is writing.
#[derive(Default)]
struct Outbox {
    frames: VecDeque<Vec<u8>>,
    bytes: usize,
    done: bool,
    /// A thread holds the write half and writes the queue's frames in order: others only queue.
    writing: bool,
}

pub(crate) struct Shared {
    pub(crate) peer: String,
    pub(crate) credentials: Option<Credentials>,
    pub(crate) settings: Settings,
    control: Arc<dyn Control>,
    seq: AtomicU64,
    pending: Mutex<HashMap<u64, Arc<ReplySlot>>>,
    /// Why the connection ended, once it has.
    ended: Mutex<Option<Error>>,
    is_closed: AtomicBool,
    ended_cv: Condvar,
    outbox: Mutex<Outbox>,
    /// Callers waiting for room in the outbox.
    room_cv: Condvar,
    /// The writer thread waiting for frames nobody else writes.
    writer_cv: Condvar,
    /// The write half; only the thread that set `Outbox::writing` touches it.
    sink: Mutex<Box<dyn Sink>>,
    locals: Mutex<Locals>,
    proxies: Mutex<HashMap<IdPack, Weak<ProxyInner>>>,
    /// What `GETROOT` gives the peer.
    root: Service,
    /// The peer's root, once asked for.
    peer_root: Mutex<Option<PyObject>>,
    workers: Workers,
    threads: Arc<ThreadSet>,
    on_close: Mutex<Vec<Box<dyn FnOnce() + Send>>>,
    /// When the last frame arrived or left (for a server's idle eviction).
    last_activity: Mutex<Instant>,
}

/// Requests waiting for a worker, and the workers' count.
struct Workers {
    tx: Sender<Task>,
    rx: Receiver<Task>,
    state: Mutex<WorkerCount>,
}

#[derive(Default)]
struct WorkerCount {
    /// Requests running or handed to a worker.
    running: usize,
    /// Workers waiting for a request.
    idle: usize,
    /// Worker threads alive.
    threads: usize,
    /// Run when the connection has ended and no request runs any more.
    stopped: Vec<Job>,
}

type Job = Box<dyn FnOnce() + Send>;

/// A request for a worker: runs the handler and returns what sends its reply, which the worker
/// runs only once it counts as free again (see [`Shared::work`]).
type Request = Box<dyn FnOnce() -> Job + Send>;

/// The read half, framed: whoever holds it is the connection's reader.
type Frames = FrameReader<Box<dyn io::Read + Send>>;

/// What an idle worker receives.
enum Task {
    /// The reader role (the read half, and whether no frame has been read yet).
    Read(Frames, bool),
    /// The connection ended.
    End,
}

impl Shared {
    /// Starts the reader and writer threads on a fresh transport.
    pub(crate) fn start(
        t: Transport,
        settings: Settings,
        root: Service,
        threads: Arc<ThreadSet>,
    ) -> Result<Arc<Shared>, Error> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let shared = Arc::new(Shared {
            peer: t.peer.clone(),
            credentials: t.credentials.clone(),
            settings: settings.clone(),
            control: t.control.clone(),
            seq: AtomicU64::new(0),
            pending: Mutex::new(HashMap::new()),
            ended: Mutex::new(None),
            is_closed: AtomicBool::new(false),
            ended_cv: Condvar::new(),
            outbox: Mutex::new(Outbox::default()),
            room_cv: Condvar::new(),
            writer_cv: Condvar::new(),
            sink: Mutex::new(t.writer),
            locals: Mutex::new(Locals {
                next: 1,
                ..Default::default()
            }),
            proxies: Mutex::new(HashMap::new()),
            root,
            peer_root: Mutex::new(None),
            workers: Workers {
                tx,
                rx,
                state: Mutex::new(WorkerCount::default()),
            },
            threads: threads.clone(),
            on_close: Mutex::new(Vec::new()),
            last_activity: Mutex::new(Instant::now()),
        });
        // Reads time out every tick where the transport allows it (TCP, Unix sockets, TLS), so
        // the reader notices a stall inside a frame; a pipe's reads end when it closes.
        let _ = t.control.set_read_timeout(Some(READ_TICK));
        let me = shared.clone();
        threads.spawn("rpyc-py-writer", move || me.write_loop())?;
        let frames = FrameReader::new(
            t.reader,
            settings.max_frame,
            settings.stall,
            settings.budget.clone(),
        );
        lock(&shared.workers.state).threads = 1;
        let me = shared.clone();
        if let Err(e) = threads.spawn("rpyc-py-worker", move || {
            me.thread_main(Task::Read(frames, true))
        }) {
            shared.terminate(Error::Io(Arc::new(e)));
            return Err(Error::Closed {
                reason: "cannot start the reading thread".into(),
            });
        }
        Ok(shared)
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.is_closed.load(Ordering::Acquire)
    }

    /// The error every call gets once the connection has ended.
    pub(crate) fn ended_error(&self) -> Error {
        lock(&self.ended).clone().unwrap_or_else(|| Error::Closed {
            reason: "closed".into(),
        })
    }

    /// Ends the connection: every waiting call fails with `why`, the transport is shut down,
    /// both object tables are emptied, the close hooks run. Only the first call does anything.
    pub(crate) fn terminate(&self, why: Error) {
        {
            let mut ended = lock(&self.ended);
            if ended.is_some() {
                return;
            }
            *ended = Some(why.clone());
            self.is_closed.store(true, Ordering::Release);
        }
        match &why {
            Error::Closed { reason } => {
                log::debug!("{}: Python RPyC connection closed: {reason}", self.peer)
            }
            other => log::warn!("{}: Python RPyC connection closed: {other}", self.peer),
        }
        let pending: Vec<_> = lock(&self.pending).drain().collect();
        for (_, slot) in pending {
            slot.put(Err(why.clone()));
        }
        {
            let mut out = lock(&self.outbox);
            out.done = true;
            self.room_cv.notify_all();
            self.writer_cv.notify_all();
        }
        {
            // Idle workers end now rather than after their idle time.
            let mut st = lock(&self.workers.state);
            for _ in 0..st.idle {
                let _ = self.workers.tx.send(Task::End);
            }
            st.idle = 0;
        }
        self.control.shutdown();
        // Drop user objects outside the locks (their drops may be user code).
        let locals = std::mem::take(&mut *lock(&self.locals));
        drop(locals);
        lock(&self.proxies).clear();
        let root = lock(&self.peer_root).take();
        drop(root);
        self.ended_cv.notify_all();
        let hooks = std::mem::take(&mut *lock(&self.on_close));
        for hook in hooks {
            hook();
        }
    }

    /// Runs `f` once the connection has ended (at once if it has).
    pub(crate) fn on_close(&self, f: Box<dyn FnOnce() + Send>) {
        let mut hooks = lock(&self.on_close);
        if self.is_closed() && lock(&self.ended).is_some() {
            drop(hooks);
            f();
        } else {
            hooks.push(f);
        }
    }

    pub(crate) fn wait_closed(&self, deadline: Option<Instant>) -> bool {
        let mut ended = lock(&self.ended);
        while ended.is_none() {
            match deadline {
                None => ended = self.ended_cv.wait(ended).unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return false;
                    }
                    ended = self
                        .ended_cv
                        .wait_timeout(ended, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            }
        }
        true
    }

    pub(crate) fn idle_for(&self) -> Duration {
        lock(&self.last_activity).elapsed()
    }

    /// Runs `f` once no request runs any more (call it once the connection has ended).
    pub(crate) fn when_stopped(&self, f: Job) {
        let mut st = lock(&self.workers.state);
        if st.running == 0 {
            drop(st);
            f();
        } else {
            st.stopped.push(f);
        }
    }

    /// How many of our objects the peer holds (the root included once it asked for it).
    pub(crate) fn local_count(&self) -> usize {
        lock(&self.locals).entries.len()
    }

    /// How many of the peer's objects we hold handles to.
    pub(crate) fn proxy_count(&self) -> usize {
        lock(&self.proxies)
            .values()
            .filter(|w| w.strong_count() > 0)
            .count()
    }

    // ---- calls ----

    /// Sends request `h` with `args` and waits for its outcome until `deadline`. `what` names
    /// the call in a timeout error.
    pub(crate) fn request(
        self: &Arc<Self>,
        h: Handler,
        args: Vec<Value>,
        deadline: Instant,
        what: &dyn Fn() -> String,
    ) -> Result<Value, Error> {
        if self.is_closed() {
            return Err(self.ended_error());
        }
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let mut sent = Vec::new();
        // Held until the request is queued: dropping the last handle of a peer's object among
        // the arguments queues its DEL, which must not reach the peer before the request.
        let args = Value::Tuple(args);
        let payload = match self.request_payload(seq, h, &args, &mut sent) {
            Ok(p) => p,
            Err(why) => {
                // Objects boxed before the failure were counted as sent: take that back.
                self.unsend(sent);
                return Err(Error::Encode(why));
            }
        };
        let slot = Arc::new(ReplySlot::default());
        lock(&self.pending).insert(seq, slot.clone());
        if self.is_closed() {
            lock(&self.pending).remove(&seq);
            self.unsend(sent);
            return Err(self.ended_error());
        }
        let timeout = self.settings.call_timeout;
        let queued = self.queue(payload, Some(deadline), false);
        drop(args);
        if let Err(e) = queued {
            lock(&self.pending).remove(&seq);
            self.unsend(sent);
            return Err(match e {
                Queue::Timeout => Error::Timeout(Timeout::Send {
                    method: what(),
                    after: timeout,
                    partly: false,
                }),
                Queue::Closed => self.ended_error(),
                Queue::TooLarge(size) => Error::TooLarge {
                    size,
                    limit: self.settings.max_frame,
                },
            });
        }
        if let Some(outcome) = slot.wait(deadline) {
            return outcome;
        }
        lock(&self.pending).remove(&seq);
        // The reply may have slipped in meanwhile.
        if let Some(outcome) = lock(&slot.value).take() {
            return outcome;
        }
        Err(Error::Timeout(Timeout::Call {
            method: what(),
            after: timeout,
        }))
    }

    /// Sends `DEL(obj, count)` without waiting (from a `Drop`).
    pub(crate) fn release(self: &Arc<Self>, pack: &IdPack, count: u64) {
        if self.is_closed() {
            return;
        }
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let body = Value::Tuple(vec![
            Value::Int(Handler::Del as i64),
            Value::Tuple(vec![
                Value::Int(proto::LABEL_TUPLE),
                Value::Tuple(vec![
                    Value::Tuple(vec![Value::Int(proto::LABEL_LOCAL_REF), pack.to_value()]),
                    Value::Tuple(vec![Value::Int(proto::LABEL_VALUE), Value::from(count)]),
                ]),
            ]),
        ]);
        if let Ok(f) = proto::message(proto::MSG_REQUEST, seq, &body) {
            let _ = self.queue(f, None, true);
        }
    }

    fn request_payload(
        &self,
        seq: u64,
        h: Handler,
        args: &Value,
        sent: &mut Vec<i128>,
    ) -> Result<Vec<u8>, String> {
        let mut out = proto::start(proto::MSG_REQUEST, seq);
        brine::tuple_head(2, &mut out);
        brine::int(h as i64, &mut out);
        self.box_into(args, &mut out, sent)?;
        Ok(frame::seal(out))
    }

    /// Takes back the counts of objects boxed for a message that was never sent.
    fn unsend(&self, sent: Vec<i128>) {
        let mut dropped = Vec::new();
        {
            let mut locals = lock(&self.locals);
            for h in sent {
                if let Some(e) = locals.entries.get_mut(&h) {
                    e.count -= 1;
                    if e.count == 0 {
                        dropped.push(Self::forget(&mut locals, h));
                    }
                }
            }
        }
        drop(dropped);
    }

    // ---- boxing ----

    /// Writes RPyC's box of `v` after `out`, straight from `v` (no copy of its values):
    /// `(1, value)` for plain values, `(2, boxes)` for a tuple holding references, `(3, id
    /// pack)` for an object of the peer's, `(4, id pack)` for one of ours (recorded in
    /// `locals`; its handle is pushed on `sent`).
    pub(crate) fn box_into(
        &self,
        v: &Value,
        out: &mut Vec<u8>,
        sent: &mut Vec<i128>,
    ) -> Result<(), String> {
        brine::tuple_head(2, out);
        match v {
            v if brine::dumpable(v) => {
                brine::int(proto::LABEL_VALUE, out);
                brine::dump(v, out)
            }
            Value::Tuple(items) => {
                brine::int(proto::LABEL_TUPLE, out);
                brine::tuple_head(items.len(), out);
                items.iter().try_for_each(|i| self.box_into(i, out, sent))
            }
            Value::Remote(o) => {
                if !o.belongs_to(self) {
                    return Err(format!(
                        "{o:?} belongs to another connection: an object can only be sent back \
                         to the peer it came from"
                    ));
                }
                brine::int(proto::LABEL_LOCAL_REF, out);
                brine::dump(&o.id_pack().to_value(), out)
            }
            Value::Local(obj) => {
                let pack = self.export(obj.clone())?;
                sent.push(pack.instance);
                brine::int(proto::LABEL_REMOTE_REF, out);
                brine::dump(&pack.to_value(), out)
            }
            Value::FrozenSet(_) | Value::Slice(_) => Err(format!(
                "{v:?}: a frozenset or slice can only hold plain values, not object references"
            )),
            _ => unreachable!("every other value is dumpable"),
        }
    }

    /// Records one more sending of `obj` and returns its id pack.
    pub(crate) fn export(&self, obj: Service) -> Result<IdPack, String> {
        let mut locals = lock(&self.locals);
        // A service keeps one id pack; each bound method handed out is an object of its own.
        let key = (!obj.is_bound()).then(|| obj.identity());
        if let Some(h) = key.and_then(|k| locals.by_object.get(&k).copied()) {
            let e = locals.entries.get_mut(&h).expect("indexed entry");
            e.count += 1;
            return Ok(e.pack.clone());
        }
        if locals.entries.len() >= self.settings.max_objects {
            return Err(format!(
                "the peer holds {} of our objects already (the limit; it must release some)",
                self.settings.max_objects
            ));
        }
        let handle = locals.next;
        locals.next += 1;
        let name = obj.name_pack();
        let pack = IdPack {
            name,
            type_id: 1,
            instance: handle,
        };
        if let Some(k) = key {
            locals.by_object.insert(k, handle);
        }
        locals.entries.insert(
            handle,
            LocalEntry {
                obj,
                count: 1,
                pack: pack.clone(),
            },
        );
        Ok(pack)
    }

    fn forget(locals: &mut Locals, handle: i128) -> Option<Service> {
        let e = locals.entries.remove(&handle)?;
        if !e.obj.is_bound() {
            locals.by_object.remove(&e.obj.identity());
        }
        Some(e.obj)
    }

    /// The object of ours with this handle.
    fn local(&self, pack: &IdPack) -> Result<Service, PythonError> {
        lock(&self.locals)
            .entries
            .get(&pack.instance)
            .map(|e| e.obj.clone())
            .ok_or_else(|| {
                PythonError::new(
                    "KeyError",
                    (Value::Tuple(vec![
                        pack.name.clone().into(),
                        Value::from(pack.type_id as i64),
                        Value::from(pack.instance as i64),
                    ]),),
                )
            })
    }

    /// Turns a box the peer sent into a value.
    pub(crate) fn unbox(self: &Arc<Self>, b: Value) -> Result<Value, String> {
        let Value::Tuple(mut parts) = b else {
            return Err(format!(
                "not an RPyC box: {}",
                crate::python::short(&format!("{b:?}"))
            ));
        };
        if parts.len() != 2 {
            return Err("an RPyC box that is not (label, payload)".into());
        }
        let payload = parts.pop().expect("2 parts");
        match parts[0] {
            Value::Int(proto::LABEL_VALUE) => Ok(payload),
            Value::Int(proto::LABEL_TUPLE) => match payload {
                Value::Tuple(items) => Ok(Value::Tuple(
                    items
                        .into_iter()
                        .map(|i| self.unbox(i))
                        .collect::<Result<_, _>>()?,
                )),
                _ => Err("an RPyC tuple box without a tuple".into()),
            },
            Value::Int(proto::LABEL_LOCAL_REF) => {
                let pack = IdPack::from_value(&payload)?;
                match self.local(&pack) {
                    Ok(o) => Ok(Value::Local(o)),
                    Err(_) => Err(format!(
                        "the peer referred to an object of ours it does not hold: {}",
                        pack.name
                    )),
                }
            }
            Value::Int(proto::LABEL_REMOTE_REF) => {
                let pack = IdPack::from_value(&payload)?;
                Ok(Value::Remote(self.proxy(pack)))
            }
            _ => Err("an RPyC box with an unknown label".into()),
        }
    }

    /// The handle for the peer's object `pack`, counting one more sending of it.
    fn proxy(self: &Arc<Self>, pack: IdPack) -> PyObject {
        let mut proxies = lock(&self.proxies);
        if let Some(p) = proxies.get(&pack).and_then(Weak::upgrade) {
            p.received();
            return PyObject::from_inner(p);
        }
        let p = ProxyInner::new(self.clone(), pack.clone());
        proxies.insert(pack, Arc::downgrade(&p));
        PyObject::from_inner(p)
    }

    /// Called by the last handle's drop: forgets the entry if it is still this one.
    pub(crate) fn forget_proxy(&self, pack: &IdPack, dying: *const ProxyInner) {
        let mut proxies = lock(&self.proxies);
        if proxies.get(pack).is_some_and(|w| w.as_ptr() == dying) {
            proxies.remove(pack);
        }
    }

    pub(crate) fn peer_root(self: &Arc<Self>, deadline: Instant) -> Result<PyObject, Error> {
        // `terminate` fails the waiting calls before it drops the cached root: without this
        // check, a thread woken by that failure could still get the cached root for a moment.
        if self.is_closed() {
            return Err(self.ended_error());
        }
        if let Some(r) = lock(&self.peer_root).as_ref() {
            return Ok(r.clone());
        }
        let v = self.request(Handler::GetRoot, Vec::new(), deadline, &|| "GETROOT".into())?;
        let root = match v {
            Value::Remote(o) => o,
            other => {
                return Err(Error::Protocol(format!(
                    "the peer's root is not an object but {}",
                    crate::python::short(&format!("{other:?}"))
                )))
            }
        };
        let mut cached = lock(&self.peer_root);
        Ok(cached.get_or_insert(root).clone())
    }

    // ---- the outbox and the writer ----

    /// Queues a whole frame ([`frame::seal`]).
    fn queue(&self, f: Vec<u8>, deadline: Option<Instant>, urgent: bool) -> Result<(), Queue> {
        if f.len() - frame::HEADER - 1 > self.settings.max_frame {
            return Err(Queue::TooLarge(f.len()));
        }
        let limit = self.settings.max_buffered;
        let mut out = lock(&self.outbox);
        loop {
            if out.done {
                return Err(Queue::Closed);
            }
            let fits = out.bytes == 0 || out.bytes + f.len() <= limit;
            if fits {
                break;
            }
            if urgent {
                if out.bytes + f.len() > 2 * limit {
                    drop(out);
                    let reason = format!(
                        "the peer sends requests but does not read our replies ({} bytes \
                         waiting)",
                        2 * limit
                    );
                    // A hostile or stuck peer: worth a warning, unlike an ordinary close.
                    log::warn!("{}: closing the connection: {reason}", self.peer);
                    self.terminate(Error::Closed { reason });
                    return Err(Queue::Closed);
                }
                break;
            }
            let Some(d) = deadline else {
                out = self.room_cv.wait(out).unwrap_or_else(|e| e.into_inner());
                continue;
            };
            let left = d.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Queue::Timeout);
            }
            out = self
                .room_cv
                .wait_timeout(out, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        out.bytes += f.len();
        out.frames.push_back(f);
        if urgent && !out.writing {
            self.writer_cv.notify_one();
        }
        drop(out);
        // The calling thread writes itself when nobody else is (no hand-off to the writer
        // thread), until its deadline; the thread holding the reader role and drops never
        // write (`urgent`).
        if !urgent {
            self.flush(deadline);
        }
        Ok(())
    }

    /// Writes the queued frames, in order, if no other thread is writing. Stops at `until`:
    /// the rest of a frame cut there goes back to the front of the queue, whole-frame order
    /// kept, for the writer thread to finish.
    fn flush(&self, until: Option<Instant>) {
        let mut out = lock(&self.outbox);
        if out.writing || out.frames.is_empty() || out.done {
            return;
        }
        out.writing = true;
        let mut sink = lock(&self.sink);
        let mut failed = None;
        while let Some(f) = out.frames.pop_front() {
            out.bytes -= f.len();
            self.room_cv.notify_all();
            drop(out);
            // One write per frame, never several frames in one write: over TLS each write
            // becomes records of its own, and a Python peer waits for its next frame with
            // poll() on the raw socket (rpyc's SocketStream.poll), which does not see a frame
            // already decrypted into its SSL buffer along with the previous one.
            let sent = send_until(&mut **sink, &f, until);
            out = lock(&self.outbox);
            match sent {
                Ok(n) if n == f.len() => {}
                Ok(n) => {
                    let rest = f[n..].to_vec();
                    out.bytes += rest.len();
                    out.frames.push_front(rest);
                    break;
                }
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        out.writing = false;
        // Frames queued meanwhile by threads that do not write (or the rest of one cut at our
        // deadline): the writer thread sends them.
        if !out.frames.is_empty() {
            self.writer_cv.notify_one();
        }
        drop(out);
        drop(sink);
        *lock(&self.last_activity) = Instant::now();
        if let Some(e) = failed {
            self.write_failed(e);
        }
    }

    fn write_failed(&self, e: io::Error) {
        let reason = if e.kind() == io::ErrorKind::TimedOut {
            let reason = format!("the peer read nothing for {:?}", self.settings.stall);
            // A peer that stopped reading: worth a warning, unlike an ordinary close.
            log::warn!("{}: closing the connection: {reason}", self.peer);
            reason
        } else {
            format!("writing to the peer failed: {e}")
        };
        self.terminate(self.transport_failure(Error::Closed { reason }));
    }

    /// The error that ends the connection: what the transport recorded below RPyC (a TLS
    /// alert, what an `ssh` process said), else `fallback`.
    fn transport_failure(&self, fallback: Error) -> Error {
        self.control.failure().unwrap_or(fallback)
    }

    /// The writer thread: writes what the reader and drops queue, and what a caller left
    /// unfinished at its deadline, whenever no other thread is writing.
    fn write_loop(self: Arc<Self>) {
        loop {
            {
                let mut out = lock(&self.outbox);
                while (out.frames.is_empty() || out.writing) && !out.done {
                    out = self.writer_cv.wait(out).unwrap_or_else(|e| e.into_inner());
                }
                if out.done {
                    return;
                }
            }
            self.flush(None);
        }
    }

    // ---- the reader ----

    /// Reads frames while this thread holds the reader role. Returns a request to run once it
    /// has passed the role on to another thread (see [`Shared::lead`]); `None` once the
    /// connection has ended.
    fn read_role(self: &Arc<Self>, mut frames: Frames, mut first: bool) -> Option<Request> {
        let why = loop {
            let me = &self;
            let got = frames.read(&mut || !me.is_closed());
            let (payload, charge) = match got {
                Ok(p) => p,
                Err(ReadError::End) if self.is_closed() => {
                    break Error::Closed {
                        reason: "closed".into(),
                    }
                }
                Err(ReadError::End) => {
                    break self.transport_failure(Error::Closed {
                        reason: "the peer closed the connection".into(),
                    })
                }
                Err(ReadError::Io(e)) => {
                    break self.transport_failure(Error::Closed {
                        reason: format!("reading from the peer failed: {e}"),
                    })
                }
                Err(ReadError::Stalled(d)) => {
                    let reason = format!("the peer stopped for {d:?} in the middle of a frame");
                    log::warn!("{}: closing the connection: {reason}", self.peer);
                    break Error::Closed { reason };
                }
                Err(ReadError::Bad(why)) => break self.protocol_error(why, first),
                Err(ReadError::Over(why)) => {
                    log::warn!("{}: closing the connection: {why}", self.peer);
                    break Error::Closed { reason: why };
                }
            };
            *lock(&self.last_activity) = Instant::now();
            let job = match self.dispatch(payload, charge, first) {
                Ok(job) => job,
                Err(why) => break why,
            };
            first = false;
            let Some((seq, job)) = job else { continue };
            // Leader/follower: the role goes to another thread and this one runs the request
            // (and writes its reply) itself, so the peer's request is not handed across threads
            // on its way; the next reader wakes while it runs.
            match self.lead(frames) {
                Ok(()) => return Some(job),
                Err(back) => {
                    frames = back;
                    self.refuse(seq);
                }
            }
        };
        self.terminate(why);
        None
    }

    fn protocol_error(&self, why: String, first: bool) -> Error {
        if first
            && (why.contains("RPyC 4.1-5.x")
                || why.contains("RPYC_BIND_THREADS")
                || why.contains("native protocol"))
        {
            Error::Handshake(HandshakeError::new(
                HandshakeErrorKind::VersionMismatch,
                why,
            ))
        } else {
            Error::Protocol(why)
        }
    }

    /// Handles one payload; an error ends the connection. What decoding it allocates is
    /// charged to the budget first, and the charge goes with the message until it is handled.
    fn dispatch(
        self: &Arc<Self>,
        payload: Vec<u8>,
        charge: Charge,
        first: bool,
    ) -> Result<Option<(u64, Request)>, Error> {
        if let Some(why) = proto::foreign_envelope(&payload) {
            return Err(self.protocol_error(why, first));
        }
        let cost = brine::cost(&payload[1..]).map_err(|why| self.protocol_error(why, first))?;
        let charge = (
            charge,
            self.settings
                .budget
                .charge(cost)
                .map_err(|over| Error::Closed {
                    reason: over.to_string(),
                })?,
        );
        let (kind, seq, body) =
            proto::parse(&payload).map_err(|why| self.protocol_error(why, first))?;
        drop(payload);
        drop(charge.0);
        let charge = charge.1;
        match kind {
            proto::MSG_REPLY => {
                let v = self.unbox(body).map_err(Error::Protocol)?;
                if let Some(slot) = lock(&self.pending).remove(&seq) {
                    slot.put(Ok(v));
                }
                Ok(None)
            }
            proto::MSG_EXCEPTION => {
                let e = proto::exception_from(body).map_err(Error::Protocol)?;
                if let Some(slot) = lock(&self.pending).remove(&seq) {
                    slot.put(Err(Error::Python(e)));
                }
                Ok(None)
            }
            _ => self.request_arrived(seq, body, charge),
        }
    }

    /// A request: answered here if it is bookkeeping, else returned, to run on a thread of
    /// its own.
    fn request_arrived(
        self: &Arc<Self>,
        seq: u64,
        body: Value,
        charge: Charge,
    ) -> Result<Option<(u64, Request)>, Error> {
        let bad = || Error::Protocol("an RPyC request that is not (handler, args)".into());
        let Value::Tuple(mut parts) = body else {
            return Err(bad());
        };
        if parts.len() != 2 {
            return Err(bad());
        }
        let args = parts.pop().expect("2 parts");
        let Value::Int(id) = parts[0] else {
            return Err(bad());
        };
        let Some(h) = Handler::from_id(id) else {
            self.reply(seq, Err(PythonError::new("KeyError", (id,))), true);
            return Ok(None);
        };
        if h == Handler::Del {
            self.peer_released(&args);
            self.reply(seq, Ok(Value::None), true);
            return Ok(None);
        }
        let args = match self.unbox(args) {
            // RPyC accepts an attribute name as bytes too (decoded as UTF-8).
            Ok(Value::Tuple(mut a)) => {
                if let [_, name @ Value::Bytes(_), ..] = &mut a[..] {
                    if let Value::Bytes(b) = std::mem::replace(name, Value::None) {
                        *name = Value::Str(String::from_utf8_lossy(&b).into_owned());
                    }
                }
                a
            }
            Ok(_) => return Err(bad()),
            Err(why) => {
                self.reply(seq, Err(PythonError::new("KeyError", (why,))), true);
                return Ok(None);
            }
        };
        match h {
            Handler::Close => {
                return Err(Error::Closed {
                    reason: "closed by the peer".into(),
                })
            }
            Handler::Ping => {
                let data = args.into_iter().next().unwrap_or(Value::None);
                self.reply(seq, Ok(data), true);
            }
            _ => {
                let me = self.clone();
                let job: Request = Box::new(move || {
                    let outcome = me.serve(h, args);
                    drop(charge);
                    Box::new(move || me.reply(seq, outcome, false))
                });
                return Ok(Some((seq, job)));
            }
        }
        Ok(None)
    }

    /// Answers request `seq` at once with a Python `RuntimeError`: no thread is free for it.
    fn refuse(&self, seq: u64) {
        let max = self.settings.max_workers;
        self.reply(
            seq,
            Err(PythonError::new(
                "RuntimeError",
                (format!(
                    "rpyc (Rust): {max} requests of this connection are running \
                     already (the max_workers limit); retry later"
                ),),
            )),
            true,
        );
    }

    /// `DEL(obj, count)`: the peer dropped `count` sendings of one of our objects. Read from
    /// the box itself (`(2, ((3, id pack), (1, count)))`): the id pack says which sending of
    /// a bound method it was. A malformed or unknown one is ignored, as RPyC does.
    fn peer_released(&self, args: &Value) {
        let Some((pack, n)) = del_args(args) else {
            log::debug!("{}: ignoring a malformed DEL", self.peer);
            return;
        };
        let mut locals = lock(&self.locals);
        let dropped = match locals.entries.get_mut(&pack.instance) {
            Some(e) if e.count <= n => Self::forget(&mut locals, pack.instance),
            Some(e) => {
                e.count -= n;
                None
            }
            None => None,
        };
        drop(locals);
        drop(dropped);
    }

    /// Sends a reply or an exception for request `seq`.
    fn reply(&self, seq: u64, outcome: Result<Value, PythonError>, urgent: bool) {
        let mut sent = Vec::new();
        // `outcome` lives until the reply is queued: dropping the last handle of a peer's
        // object in it queues its DEL, which must not reach the peer before the reply.
        let exception =
            |e: &PythonError| proto::message(proto::MSG_EXCEPTION, seq, &proto::exception_body(e));
        let frame = match &outcome {
            Ok(v) => {
                let mut out = proto::start(proto::MSG_REPLY, seq);
                match self.box_into(v, &mut out, &mut sent) {
                    Ok(()) => Ok(frame::seal(out)),
                    Err(why) => {
                        self.unsend(std::mem::take(&mut sent));
                        exception(&PythonError::new("TypeError", (why,)))
                    }
                }
            }
            Err(e) => exception(e),
        };
        let frame = match frame {
            Ok(f) => f,
            Err(why) => {
                log::warn!("{}: cannot encode a reply: {why}", self.peer);
                return;
            }
        };
        let deadline = Instant::now() + self.settings.call_timeout;
        match self.queue(frame, Some(deadline), urgent) {
            Ok(()) => {}
            Err(Queue::TooLarge(size)) => {
                self.unsend(sent);
                let e = PythonError::new(
                    "MemoryError",
                    (format!(
                        "the reply is {size} bytes, over the limit of {} (max_frame_size)",
                        self.settings.max_frame
                    ),),
                );
                if let Ok(f) = exception(&e) {
                    let _ = self.queue(f, Some(deadline), urgent);
                }
            }
            Err(_) => self.unsend(sent),
        }
    }

    /// Passes the reader role on to an idle worker or a new thread, counting one more request
    /// running (the one the calling thread is about to run). Gives the role back if
    /// `max_workers` does not allow another request to run, or no thread can be had (the
    /// connection's first two threads are its own; further ones come out of a server's shared
    /// thread budget).
    fn lead(self: &Arc<Self>, frames: Frames) -> Result<(), Frames> {
        let mut st = lock(&self.workers.state);
        if st.running >= self.settings.max_workers || self.is_closed() {
            return Err(frames);
        }
        if st.idle > 0 {
            st.idle -= 1;
            st.running += 1;
            let _ = self.workers.tx.send(Task::Read(frames, false));
            return Ok(());
        }
        let budgeted = st.threads >= 2 && self.settings.threads.is_some();
        if budgeted && !self.settings.threads.as_ref().is_some_and(|b| b.try_take()) {
            return Err(frames);
        }
        st.threads += 1;
        st.running += 1;
        // Kept here too, to be given back if the thread cannot start.
        let slot = Arc::new(Mutex::new(Some(frames)));
        let theirs = slot.clone();
        let me = self.clone();
        let started = self.threads.spawn("rpyc-py-worker", move || {
            // Bound before the call: the guard must not live while the thread runs.
            let frames = lock(&theirs).take();
            if let Some(frames) = frames {
                me.thread_main(Task::Read(frames, false));
            }
        });
        if started.is_err() {
            st.running -= 1;
            st.threads -= 1;
            if budgeted {
                if let Some(b) = &self.settings.threads {
                    b.give();
                }
            }
            let frames = lock(&slot).take().expect("the thread did not start");
            return Err(frames);
        }
        Ok(())
    }

    /// A pool thread's life: reads while it holds the reader role, runs requests, and waits
    /// for either when idle, until it has been idle for [`WORKER_IDLE`] or the connection
    /// ends.
    fn thread_main(self: Arc<Self>, task: Task) {
        let mut task = Some(task);
        loop {
            let job = match task.take() {
                Some(Task::Read(frames, first)) => self.read_role(frames, first),
                Some(Task::End) => None,
                None => match self.workers.rx.recv_timeout(WORKER_IDLE) {
                    Ok(t) => {
                        task = Some(t);
                        continue;
                    }
                    Err(_) => {
                        let mut st = lock(&self.workers.state);
                        // A task may have been handed to us just now.
                        match self.workers.rx.try_recv() {
                            Ok(t) => {
                                task = Some(t);
                                continue;
                            }
                            Err(_) => {
                                st.idle -= 1;
                                None
                            }
                        }
                    }
                },
            };
            let Some(job) = job else { break };
            let send_reply = job();
            // Counted free before the reply goes out: the peer may send its next request as
            // soon as it reads the reply, and that request must find this thread free, not
            // start another one (or, at max_workers, be refused: a strictly sequential client
            // was, with max_workers 1).
            let mut st = lock(&self.workers.state);
            st.running -= 1;
            let closed = self.is_closed();
            let hooks = if closed && st.running == 0 {
                std::mem::take(&mut st.stopped)
            } else {
                Vec::new()
            };
            if !closed {
                st.idle += 1;
            }
            drop(st);
            send_reply();
            for hook in hooks {
                hook();
            }
            if closed {
                break;
            }
        }
        let mut st = lock(&self.workers.state);
        st.threads -= 1;
        // The first two threads are the connection's own, the others the budget's.
        if st.threads >= 2 {
            if let Some(b) = &self.settings.threads {
                b.give();
            }
        }
    }

    /// What a request from the peer gets.
    fn serve(self: &Arc<Self>, h: Handler, args: Vec<Value>) -> Result<Value, PythonError> {
        let call = |args: Vec<Value>, kwargs: Vec<Value>| Call::new(self.clone(), args, kwargs);
        match (h, &args[..]) {
            (Handler::GetRoot, _) => Ok(Value::Local(self.root.clone())),
            (Handler::GetAttr, [Value::Local(obj), Value::Str(name)]) => obj.getattr(name),
            (Handler::Call, [Value::Local(obj), Value::Tuple(a), Value::Tuple(kw)]) => {
                obj.call(call(a.clone(), kw.clone()))
            }
            (
                Handler::CallAttr,
                [Value::Local(obj), Value::Str(name), Value::Tuple(a), Value::Tuple(kw)],
            ) => obj.call_attr(name, call(a.clone(), kw.clone())),
            (Handler::Repr, [Value::Local(obj)]) => obj.repr(call(vec![], vec![])),
            (Handler::Str, [Value::Local(obj)]) => obj.str(call(vec![], vec![])),
            (Handler::Hash, [Value::Local(obj)]) => Ok(Value::from(obj.identity() as u64 >> 3)),
            (Handler::Dir, [Value::Local(obj)]) => Ok(Value::Tuple(
                obj.attribute_names().into_iter().map(Value::Str).collect(),
            )),
            (Handler::Cmp, [Value::Local(obj), other, Value::Str(op)]) => {
                let same = matches!(other, Value::Local(o) if o.same(obj));
                match op.as_str() {
                    "__eq__" => Ok(Value::Bool(same)),
                    "__ne__" => Ok(Value::Bool(!same)),
                    _ => Ok(Value::NotImplemented),
                }
            }
            (Handler::Inspect, [pack]) => {
                let pack =
                    IdPack::from_value(pack).map_err(|e| PythonError::new("TypeError", (e,)))?;
                Ok(self.local(&pack)?.inspect())
            }
            (Handler::SetAttr | Handler::DelAttr, [Value::Local(obj), Value::Str(name), ..]) => {
                Err(PythonError::new(
                    "AttributeError",
                    (format!(
                        "cannot set or delete '{name}' of {}: Rust objects are read-only",
                        obj.name_pack()
                    ),),
                ))
            }
            (Handler::Pickle, _) => Err(PythonError::new("ValueError", ("pickling is disabled",))),
            _ => Err(PythonError::new(
                "TypeError",
                (format!(
                    "rpyc (Rust) does not serve {} with these arguments",
                    h.name()
                ),),
            )),
        }
    }
}

/// Where a call's outcome is put for the caller waiting on it: a mutex and a condvar, so the
/// caller sleeps at once rather than spinning first.
#[derive(Default)]
struct ReplySlot {
    value: Mutex<Option<Outcome>>,
    cv: Condvar,
}

impl ReplySlot {
    fn put(&self, outcome: Outcome) {
        *lock(&self.value) = Some(outcome);
        self.cv.notify_one();
    }

    /// The outcome, once put, or `None` at `deadline`.
    fn wait(&self, deadline: Instant) -> Option<Outcome> {
        let mut v = lock(&self.value);
        loop {
            if let Some(o) = v.take() {
                return Some(o);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            v = self
                .cv
                .wait_timeout(v, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

enum Queue {
    Timeout,
    Closed,
    TooLarge(usize),
}

/// The id pack and count of a `DEL` request's boxed arguments.
fn del_args(args: &Value) -> Option<(IdPack, u64)> {
    let Value::Tuple(b) = args else { return None };
    let [Value::Int(proto::LABEL_TUPLE), Value::Tuple(items)] = &b[..] else {
        return None;
    };
    let [Value::Tuple(obj), Value::Tuple(count)] = &items[..] else {
        return None;
    };
    let [Value::Int(proto::LABEL_LOCAL_REF), pack] = &obj[..] else {
        return None;
    };
    let [Value::Int(proto::LABEL_VALUE), Value::Int(n)] = &count[..] else {
        return None;
    };
    Some((IdPack::from_value(pack).ok()?, (*n).max(1) as u64))
}

/// Writes `buf` until done, `until` passes (then returns how much was written), or the sink
/// fails (its stall timeout included).
fn send_until(sink: &mut dyn Sink, buf: &[u8], mut until: Option<Instant>) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match sink.send(&buf[done..], until)? {
            // `until` passed, but the transport must be offered these bytes again (a TLS
            // record partly sent): finish them, bounded by the stall timeout alone.
            0 if sink.committed() => until = None,
            // `until` passed: the rest is left to the writer thread.
            0 => return Ok(done),
            n => done += n,
        }
    }
    Ok(done)
}

/// A connection to a Python RPyC 6 peer (see [`crate::python`]).
///
/// Any number of threads may share it (clones are the same connection): each call waits for
/// its own reply, with its own deadline. The connection closes with [`close`](Self::close), when
/// the peer goes away (every waiting call then fails at once with the reason), or when the
/// last handle the connecting code got is dropped. Handles given to handlers
/// ([`Call::connection`](crate::python::Call::connection)) and [`PyObject`]s do not keep it open.
///
/// ```no_run
/// let py = rpyc::python::connect("127.0.0.1", 18861)?;
/// let sum: i64 = py.root()?.call_method("add", (1, 2))?;
/// py.close();
/// # Ok::<(), rpyc::Error>(())
/// ```
#[derive(Clone)]
pub struct Connection {
    shared: Arc<Shared>,
    _owner: Option<Arc<Owner>>,
}

/// Closes the connection when the last owning handle drops.
struct Owner(Arc<Shared>);

impl Drop for Owner {
    fn drop(&mut self) {
        close(&self.0);
    }
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("python::Connection")
            .field("peer", &self.shared.peer)
            .field("closed", &self.shared.is_closed())
            .finish()
    }
}

/// Tells the peer (RPyC's `CLOSE`) and waits a moment for it to hang up, then ends the
/// connection.
fn close(shared: &Arc<Shared>) {
    if shared.is_closed() {
        return;
    }
    let seq = shared.seq.fetch_add(1, Ordering::Relaxed);
    let body = Value::Tuple(vec![
        Value::Int(Handler::Close as i64),
        Value::Tuple(vec![Value::Int(proto::LABEL_VALUE), Value::Tuple(vec![])]),
    ]);
    if let Ok(f) = proto::message(proto::MSG_REQUEST, seq, &body) {
        if shared.queue(f, None, true).is_ok() {
            let grace = shared.settings.call_timeout.min(Duration::from_secs(1));
            shared.wait_closed(Some(Instant::now() + grace));
        }
    }
    shared.terminate(Error::Closed {
        reason: "closed by this side".into(),
    });
}

impl Connection {
    pub(crate) fn owned(shared: Arc<Shared>) -> Connection {
        Connection {
            _owner: Some(Arc::new(Owner(shared.clone()))),
            shared,
        }
    }

    pub(crate) fn borrowed(shared: Arc<Shared>) -> Connection {
        Connection {
            shared,
            _owner: None,
        }
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// The peer's root object: its service (`conn.root` in Python). Asked for once, then
    /// cached.
    ///
    /// ```no_run
    /// # let py = rpyc::python::connect("127.0.0.1", 18861)?;
    /// let v: i64 = py.root()?.call_method("add", (1, 2))?;
    /// # Ok::<(), rpyc::Error>(())
    /// ```
    pub fn root(&self) -> Result<PyObject, Error> {
        self.shared
            .peer_root(crate::base::deadline(self.shared.settings.call_timeout))
    }

    /// Classic mode (a `rpyc_classic` or `SlaveService` server): the module `name`, imported
    /// on the peer (`conn.modules.os` in Python).
    ///
    /// ```no_run
    /// let py = rpyc::python::connect("127.0.0.1", 18812)?;
    /// let pid: i64 = py.modules("os")?.call_method("getpid", ())?;
    /// # Ok::<(), rpyc::Error>(())
    /// ```
    pub fn modules(&self, name: &str) -> Result<PyObject, Error> {
        self.root()?.call_method("getmodule", (name,))
    }

    /// Classic mode: Python's `builtins` module of the peer.
    ///
    /// ```no_run
    /// # let py = rpyc::python::connect("127.0.0.1", 18812)?;
    /// let n: i64 = py.builtins()?.call_method("len", ((1, 2, 3),))?;
    /// # Ok::<(), rpyc::Error>(())
    /// ```
    pub fn builtins(&self) -> Result<PyObject, Error> {
        self.modules("builtins")
    }

    /// Classic mode: evaluates a Python expression on the peer (`conn.eval`).
    ///
    /// ```no_run
    /// # let py = rpyc::python::connect("127.0.0.1", 18812)?;
    /// let six: i64 = py.eval("6 * 7")?;
    /// # Ok::<(), rpyc::Error>(())
    /// ```
    pub fn eval<R: crate::python::FromValue>(&self, expression: &str) -> Result<R, Error> {
        self.root()?.call_method("eval", (expression,))
    }

    /// Classic mode: runs Python statements on the peer (`conn.execute`).
    ///
    /// ```no_run
    /// # let py = rpyc::python::connect("127.0.0.1", 18812)?;
    /// py.execute("import math\nx = math.pi")?;
    /// # Ok::<(), rpyc::Error>(())
    /// ```
    pub fn execute(&self, code: &str) -> Result<(), Error> {
        let _: Value = self.root()?.call_method("execute", (code,))?;
        Ok(())
    }

    /// Sends data to the peer and checks that it comes back (`conn.ping()`).
    ///
    /// ```no_run
    /// # let py = rpyc::python::connect("127.0.0.1", 18861)?;
    /// py.ping()?;
    /// # Ok::<(), rpyc::Error>(())
    /// ```
    pub fn ping(&self) -> Result<(), Error> {
        let data: String = "abcdefghijklmnopqrstuvwxyz".repeat(20);
        let until = crate::base::deadline(self.shared.settings.call_timeout);
        let v = self
            .shared
            .request(Handler::Ping, vec![data.clone().into()], until, &|| {
                "PING".into()
            })?;
        if v != Value::Str(data) {
            return Err(Error::Protocol(
                "the peer answered a PING with other data".into(),
            ));
        }
        Ok(())
    }

    /// Closes the connection: tells the peer, waits up to a second (at most the call timeout)
    /// for it to hang up, then fails every waiting call. Idempotent.
    ///
    /// ```no_run
    /// # let py = rpyc::python::connect("127.0.0.1", 18861)?;
    /// py.close();
    /// assert!(py.is_closed());
    /// # Ok::<(), rpyc::Error>(())
    /// ```
    pub fn close(&self) {
        close(&self.shared);
    }

    /// Whether the connection has ended.
    pub fn is_closed(&self) -> bool {
        self.shared.is_closed()
    }

    /// Waits until the connection ends (the peer hangs up, or another thread closes it).
    ///
    /// ```no_run
    /// # let py = rpyc::python::connect("127.0.0.1", 18861)?;
    /// py.wait_closed_timeout(std::time::Duration::from_millis(10));
    /// # Ok::<(), rpyc::Error>(())
    /// ```
    pub fn wait_closed_timeout(&self, timeout: Duration) -> bool {
        self.shared
            .wait_closed(Some(crate::base::deadline(timeout)))
    }

    /// Why the connection ended (the error waiting calls got), once it has.
    pub fn close_reason(&self) -> Option<Error> {
        lock(&self.shared.ended).clone()
    }

    /// The peer's address.
    pub fn peer(&self) -> &str {
        &self.shared.peer
    }

    /// How many objects of this side the peer holds references to (the root, callbacks,
    /// returned objects, bound methods not yet released): back to what it was once the peer
    /// has released everything.
    pub fn exported_count(&self) -> usize {
        self.shared.local_count()
    }

    /// How many of the peer's objects this side holds handles to.
    pub fn remote_count(&self) -> usize {
        self.shared.proxy_count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::python::Service;

    fn settings(max_objects: usize) -> Settings {
        Settings {
            call_timeout: Duration::from_secs(5),
            max_frame: 1 << 20,
            max_buffered: 2 << 20,
            max_workers: 4,
            max_objects,
            stall: Duration::from_secs(5),
            budget: Budget::new(8 << 20, None),
            threads: None,
        }
    }

    #[test]
    fn the_peer_may_hold_at_most_max_objects_of_ours() {
        let (ours, _theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let t = crate::transport::unix(ours, "test".into(), Duration::from_secs(5)).unwrap();
        let shared = Shared::start(t, settings(3), Service::new("Root"), ThreadSet::new()).unwrap();
        let objects: Vec<Service> = (0..4).map(|i| Service::new(&format!("O{i}"))).collect();
        for o in &objects[..3] {
            shared.export(o.clone()).unwrap();
        }
        // Sending one of them again takes no new entry; a fourth object is refused.
        shared.export(objects[0].clone()).unwrap();
        let refused = shared.export(objects[3].clone()).unwrap_err();
        assert!(refused.contains("holds 3 of our objects"), "{refused}");
        assert_eq!(shared.local_count(), 3);
        // Boxing a value that holds it fails the same way.
        let mut sent = Vec::new();
        let mut out = Vec::new();
        assert!(shared
            .box_into(
                &Value::Tuple(vec![Value::Local(objects[3].clone())]),
                &mut out,
                &mut sent
            )
            .is_err());
        assert!(sent.is_empty());
        shared.terminate(Error::Closed {
            reason: "test over".into(),
        });
    }

    #[test]
    fn a_request_that_cannot_be_boxed_takes_back_what_it_exported() {
        let (ours, _theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let t = crate::transport::unix(ours, "test".into(), Duration::from_secs(5)).unwrap();
        let shared = Shared::start(t, settings(3), Service::new("Root"), ThreadSet::new()).unwrap();
        shared.export(Service::new("A")).unwrap();
        shared.export(Service::new("B")).unwrap();
        // Room for one more: the first argument is exported, the second is refused.
        let args = vec![
            Value::Local(Service::new("C")),
            Value::Local(Service::new("D")),
        ];
        let until = Instant::now() + Duration::from_secs(1);
        let e = shared
            .request(Handler::Call, args, until, &|| "test".into())
            .unwrap_err();
        assert!(matches!(e, Error::Encode(_)), "{e:?}");
        assert_eq!(shared.local_count(), 2);
        shared.terminate(Error::Closed {
            reason: "test over".into(),
        });
    }
}
