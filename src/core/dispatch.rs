//! Who reads the connection, and who runs the peer's requests.
//!
//! # The reader token
//!
//! The read half of the transport is a token ([`FrameReader`]) held by at most one thread at a
//! time. Whoever holds it reads frames and routes them ([`Shared::route`]): replies and nested
//! requests go to the threads waiting for them, other requests to the worker pool. A holder
//! never runs user code: it puts the token back first.
//!
//! Three kinds of thread hold it:
//!
//! * **A pool thread (the leader)**, blocked in a plain read while the connection is quiet.
//! * **A calling thread** waiting for its own reply, if the token is free when it starts
//!   waiting. It reads its reply itself, without a thread hand-off; its reads time out every
//!   [`READ_SLICE`](crate::transport::reader::READ_SLICE), and it looks at its deadline after every frame it
//!   routes, so it gets its timeout on time however much of other threads' traffic it routes.
//!   At its deadline it hands the token to the pool at once, even in the middle of a frame (the
//!   reader keeps what it read of it). Transports that cannot time out a read, such as pipes,
//!   are only read by the pool.
//! * **Nobody, briefly.** A holder that is about to run a request, or a caller that got its
//!   reply, puts the token back *lazily*, without waking anyone, expecting to take it again
//!   soon (the next request of a sequential client, the end of a short handler). A pool thread
//!   *watches* (one thread, looking every [`HELD_POLL`] while someone holds the token) and takes
//!   the token once it has lain unused for [`GRACE`], so the connection is never left unread for
//!   more than [`HELD_POLL_MAX`] (8 ms): a slow handler delays other requests by at most that,
//!   and callbacks reach an idle client just as fast. Each look that finds the token held and
//!   nothing to do doubles the wait before the next, up to [`HELD_POLL_MAX`]: a look is a
//!   wake-up, and one in the middle of a large transfer stalls it (about five context switches
//!   each, in a 1 MiB echo); a look that finds work, or a reply left to the watcher, brings it
//!   back to [`HELD_POLL`]. Watchers poll only while the connection is
//!   active (or a caller holds the token), and sleep after [`LINGER`] of quiet. While a frame is
//!   being written, no caller is blocked and no input waits (in the reader's buffer, in TLS's,
//!   or in the socket), the watcher leaves the token for another grace period: its holder is
//!   most likely the thread writing a large call or reply, which comes back to read next, and
//!   taking the token would only cost a thread hand-off (over TLS, also a fight with the
//!   writer for the SSL object). It looks again every [`HELD_POLL`], so input that arrives
//!   meanwhile waits at most that, and two peers writing large frames to each other both go
//!   on reading.
//!
//! When other callers are blocked waiting, the token is never left lying: it goes to a pool
//! thread at once, which routes their replies.
//!
//! A holder about to wait for the next frame (the leader, or a caller) first looks for input
//! for up to 50 µs if the previous wait on the connection was that short
//! ([`FrameReader::next_frame`], [`crate::base::spin`]): a peer that answers that fast is
//! then read without a sleep and a wake-up, which on a virtual machine cost more than the
//! wait. The leader writes the replies handed over to it before it starts looking. A caller
//! blocked on its channel looks at it the same way first, while such waits on the connection
//! have been short ([`crate::base::spin::SHORT_REPLY_WAIT`]), so the thread routing its reply
//! need not wake it.
//!
//! # The pool
//!
//! The pool's first thread is started when the connection is established, or, on a server
//! whose service has no `on_connect` hook, is the thread that did the handshake
//! ([`FirstWorker`]), so that a connection starts no thread before it needs a second. A
//! started first thread finds the reader released lazily, as a caller leaves it: a client's
//! first call, usually right behind `connect`, reads its own reply. A thread that is starting
//! counts as one that will look for work (a free reader, a queued request): nobody else is
//! woken or started for what it will find. A client's threads come from a set that all client
//! connections of the process share ([`ThreadSet::clients`](crate::base::threads::ThreadSet::clients)):
//! a thread that ends parks a while, for the next connection to take.
//!
//! Requests that are not nested in a waiting call run on the pool: the leader that read one
//! runs it itself (so serving it costs no hand-off), and another thread takes over reading. The
//! pool grows on demand to `max_workers` threads running handlers plus one reading (every
//! thread beyond the first two taken from the server's thread budget, if any, so that a
//! connection always has one thread to read and one to run a request); beyond that,
//! requests queue (at most `max_queued`, whether the leader or a calling thread read them; a
//! peer that exceeds it is closed) and the leader keeps reading, so replies still reach the
//! callers that busy workers wait for. While the connection is quiet the leader wakes every
//! tick to apply the idle limit. Spare threads
//! end after [`IDLE_TIMEOUT`] (two are kept). Until the service's `on_connect` has run,
//! requests are queued, not run.

use crate::base::limits::ThreadBudget;
use crate::base::lock;
use crate::core::connection::{Delivery, Pending, Routed, Shared};
use crate::error::Error;
use crate::transport::reader::{FrameReader, Got};
use crate::wire::Frame;
use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How long a spare worker waits for work before it ends (the [`FREE_THREADS`] are kept).
const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a lazily released reader may lie unused before a watching pool thread takes it.
const GRACE: Duration = Duration::from_micros(500);
/// How long pool threads keep watching after the last lazy release.
const LINGER: Duration = Duration::from_millis(50);
/// How often the watcher looks at a reader that someone holds, at first.
pub(crate) const HELD_POLL: Duration = Duration::from_millis(2);
/// How seldom the watcher looks at a held reader at most: each look that finds nothing to do
/// doubles the wait from [`HELD_POLL`] up to this.
pub(crate) const HELD_POLL_MAX: Duration = Duration::from_millis(8);
/// How often a caller blocked on its channel checks whether it should read itself.
pub(crate) const CALLER_POLL: Duration = Duration::from_millis(10);

pub(crate) struct Pool {
    state: Mutex<State>,
    cv: Condvar,
    max_workers: usize,
    /// Threads of the pool at most: `max_workers` running handlers plus the one reading.
    max_threads: usize,
    max_queued: usize,
    /// A server's shared budget: every thread of the pool beyond its first takes one from it.
    budget: Option<Arc<ThreadBudget>>,
}

struct State {
    /// The read half, when no thread holds it.
    reader: Option<FrameReader>,
    /// When `reader` was put back; a watcher takes it after `GRACE`.
    released_at: Instant,
    /// Counts lazy releases, so watchers can tell the connection is active.
    releases: u64,
    /// A pool thread holds the reader (so nobody needs to watch).
    pool_leads: bool,
    /// Pool threads waiting with a short timeout, ready to take the reader.
    watchers: usize,
    /// How long the watcher waits before it looks at a held reader again: [`HELD_POLL`],
    /// doubled after each look that found nothing to do, up to [`HELD_POLL_MAX`].
    held_poll: Duration,
    /// When the watcher looks next (while `watchers > 0`).
    next_look: Instant,
    /// A reply was left for the watcher to flush since it last looked ([`watched`]).
    left_to_watcher: bool,
    /// Looks that went back to [`HELD_POLL`] because a reply had been left to the watcher.
    #[cfg(test)]
    left_resets: u64,
    /// Pool threads waiting for work without a timeout.
    idle: usize,
    /// Pool threads started (or about to be) that have not yet looked for work: each will
    /// take a free reader or a queued request as soon as it does, so nobody else needs to be
    /// woken or started for those.
    starting: usize,
    /// Calling threads blocked on their reply channel (not holding the reader).
    callers_waiting: usize,
    /// Requests read and not yet run (at most `max_queued` when they were queued; requests
    /// handed back by a caller that gave up may add to it).
    jobs: VecDeque<Frame>,
    /// Threads of the pool: running a request, reading, watching or idle (reserved ones
    /// included, counted before they start).
    threads: usize,
    /// Pool threads running a request now: at most `max_workers`, whoever reads.
    running: usize,
    /// `on_connect` has run: queued requests may start.
    ready: bool,
    /// The connection ended: threads leave, nothing is queued or read any more.
    stopping: bool,
    /// Run once the pool is stopped and its last thread has ended.
    on_stopped: Vec<Box<dyn FnOnce() + Send>>,
}

impl State {
    /// The invariants of the counters, checked in debug builds after every change that could
    /// break them.
    fn check(&self, pool: &Pool) {
        debug_assert!(
            self.idle + self.watchers + self.starting <= self.threads,
            "{} idle, {} watching and {} starting threads, of {}",
            self.idle,
            self.watchers,
            self.starting,
            self.threads
        );
        debug_assert!(
            self.threads <= pool.max_threads,
            "{} threads, over the pool's {}",
            self.threads,
            pool.max_threads
        );
        debug_assert!(
            self.running <= pool.max_workers && self.running <= self.threads,
            "{} requests running, {} workers allowed, {} threads",
            self.running,
            pool.max_workers,
            self.threads
        );
        debug_assert!(
            !(self.pool_leads && self.reader.is_some()),
            "a pool thread leads, but the reader lies free"
        );
        debug_assert!(
            !self.stopping || (self.reader.is_none() && self.jobs.is_empty()),
            "a stopped pool keeps a reader or requests"
        );
    }
}

enum Task {
    Lead(FrameReader),
    Job(Frame),
}

impl Pool {
    pub(crate) fn new(
        max_workers: usize,
        max_queued: usize,
        budget: Option<Arc<ThreadBudget>>,
    ) -> Pool {
        Pool {
            state: Mutex::new(State {
                reader: None,
                released_at: Instant::now(),
                releases: 0,
                pool_leads: false,
                watchers: 0,
                held_poll: HELD_POLL,
                next_look: Instant::now(),
                left_to_watcher: false,
                #[cfg(test)]
                left_resets: 0,
                idle: 0,
                starting: 0,
                callers_waiting: 0,
                jobs: VecDeque::new(),
                threads: 0,
                running: 0,
                ready: false,
                stopping: false,
                on_stopped: Vec::new(),
            }),
            cv: Condvar::new(),
            max_workers: max_workers.max(1),
            max_threads: max_workers.max(1) + 1,
            max_queued,
            budget,
        }
    }
}

/// Threads each pool has without drawing on a server's budget: one to read, one to run a
/// request (the two a quiet pool keeps), so a connection always makes progress however busy the
/// others keep the server.
const FREE_THREADS: usize = 2;

/// Counts a new thread of the pool, taking it from the server's budget beyond the pool's
/// [`FREE_THREADS`]; false if neither the pool's nor the server's limit allows it.
fn reserve_thread(pool: &Pool, st: &mut State) -> bool {
    if st.threads >= pool.max_threads {
        return false;
    }
    if st.threads >= FREE_THREADS {
        if let Some(b) = &pool.budget {
            if !b.try_take() {
                return false;
            }
        }
    }
    st.threads += 1;
    st.starting += 1;
    true
}

/// Counts a thread of the pool that ended (or never started), returning its share of the
/// server's budget (the pool's free threads had none), and unlocks the pool's state. The last
/// thread of a stopped pool runs what waited for that ([`when_stopped`]).
fn thread_ended(pool: &Pool, mut st: MutexGuard<'_, State>) {
    debug_assert!(st.threads > 0, "more threads ended than started");
    st.threads -= 1;
    st.check(pool);
    if st.threads >= FREE_THREADS {
        if let Some(b) = &pool.budget {
            b.give();
        }
    }
    let hooks = if st.stopping && st.threads == 0 {
        std::mem::take(&mut st.on_stopped)
    } else {
        Vec::new()
    };
    drop(st);
    for hook in hooks {
        hook();
    }
}

/// Runs `f` once the connection's pool has stopped and every thread of it has ended (at once if
/// that is already so): a server gives a connection's slot back only then, so a closed
/// connection's handlers still running count against its limits.
pub(crate) fn when_stopped(shared: &Shared, f: Box<dyn FnOnce() + Send>) {
    let mut st = lock(&shared.pool.state);
    if st.stopping && st.threads == 0 {
        drop(st);
        f();
    } else {
        st.on_stopped.push(f);
    }
}

/// Counts a thread of the connection that is not a worker (the flusher of
/// [`crate::core::flush`]) as one of the pool's, within the pool's and the server's limits;
/// false if they allow no more. Its end is told with [`helper_ended`].
pub(crate) fn reserve_helper(shared: &Shared) -> bool {
    let pool = &shared.pool;
    let mut st = lock(&pool.state);
    if st.stopping {
        return false;
    }
    let ok = reserve_thread(pool, &mut st);
    if ok {
        // It counts among the pool's threads, but never looks for work.
        st.starting -= 1;
    }
    st.check(pool);
    ok
}

/// A thread counted by [`reserve_helper`] ended (or never started).
pub(crate) fn helper_ended(shared: &Shared) {
    thread_ended(&shared.pool, lock(&shared.pool.state));
}

/// Gives the pool the connection's reader, and counts its first thread, which is not started
/// yet: see [`FirstWorker`]. `lazy`: the reader is left as if a caller had just put it back, so
/// that a first call made right away (a client's, or an `on_connect` hook's) reads its reply
/// itself, without a thread hand-off; the first thread takes it after [`GRACE`] otherwise.
pub(crate) fn install(shared: &Arc<Shared>, reader: FrameReader, lazy: bool) -> FirstWorker {
    let mut st = lock(&shared.pool.state);
    st.reader = Some(reader);
    st.released_at = if lazy { Instant::now() } else { long_ago() };
    st.threads += 1;
    FirstWorker(Some(shared.clone()))
}

/// The connection's first pool thread, counted but not running yet: it is started as a new
/// thread ([`spawn`](FirstWorker::spawn)), or a thread that has nothing else to do becomes it
/// ([`run`](FirstWorker::run)), as a server's handshake thread does, which saves starting a
/// thread per connection. Until then the reader lies free, so whoever holds it must run no
/// user code meanwhile. Dropped unused, it counts as ended.
pub(crate) struct FirstWorker(Option<Arc<Shared>>);

impl FirstWorker {
    /// Starts the first worker on a thread of its own.
    pub(crate) fn spawn(mut self) -> io::Result<()> {
        let Some(shared) = self.0.take() else {
            return Ok(());
        };
        lock(&shared.pool.state).starting += 1;
        spawn_worker(&shared).inspect_err(|_| spawn_failed(&shared))
    }

    /// Makes the calling thread the first worker, until the pool lets it go (the connection
    /// ended, or the thread was spare for [`IDLE_TIMEOUT`]).
    pub(crate) fn run(mut self) {
        if let Some(shared) = self.0.take() {
            lock(&shared.pool.state).starting += 1;
            worker(shared);
        }
    }
}

impl Drop for FirstWorker {
    fn drop(&mut self) {
        if let Some(shared) = self.0.take() {
            thread_ended(&shared.pool, lock(&shared.pool.state));
        }
    }
}

fn spawn_worker(shared: &Arc<Shared>) -> io::Result<()> {
    let s = shared.clone();
    shared.spawn("rpyc-worker", move || worker(s))
}

/// Wakes a waiting pool thread, or reserves a new one (the caller spawns it after unlocking
/// when this returns true), unless a thread is starting: it looks for work on its own.
fn wake_or_reserve(pool: &Pool, st: &mut State) -> bool {
    if st.idle + st.watchers > 0 {
        pool.cv.notify_one();
        false
    } else if st.starting > 0 {
        false
    } else {
        reserve_thread(pool, st)
    }
}

fn spawn_reserved(shared: &Arc<Shared>) {
    if let Err(e) = spawn_worker(shared) {
        log::error!("{}: cannot start a worker thread: {e}", shared.peer);
        spawn_failed(shared);
    }
}

/// Uncounts a thread that was reserved but could not be started.
fn spawn_failed(shared: &Shared) {
    let mut st = lock(&shared.pool.state);
    st.starting -= 1;
    thread_ended(&shared.pool, st);
}

/// Lets queued requests run (after `on_connect`).
pub(crate) fn set_ready(shared: &Arc<Shared>) {
    let pool = &shared.pool;
    let mut st = lock(&pool.state);
    st.ready = true;
    let mut wanted = 0;
    while wanted
        < st.jobs
            .len()
            .saturating_sub(st.idle + st.watchers + st.starting)
        && reserve_thread(pool, &mut st)
    {
        wanted += 1;
    }
    drop(st);
    pool.cv.notify_all();
    for _ in 0..wanted {
        spawn_reserved(shared);
    }
}

/// Queues a request that a calling thread read (the leader queues its own in [`lead`]): the
/// same limit as for the leader, `max_queued`, applies; a peer over it is closed.
fn enqueue(shared: &Arc<Shared>, job: Frame) -> Result<(), Error> {
    queue(shared, job, true)
}

/// Hands a request that was already accepted to the pool from a thread that is not the pool's
/// leader (a caller that gave up on the call the request was nested in): not counted against
/// `max_queued` again.
pub(crate) fn submit(shared: &Arc<Shared>, job: Frame) {
    // Never over the limit: the check is skipped.
    let _ = queue(shared, job, false);
}

/// Queues `job` (checking the queue's limit if `counted`) and wakes or starts a thread for it
/// if a worker is free.
fn queue(shared: &Arc<Shared>, job: Frame, counted: bool) -> Result<(), Error> {
    let pool = &shared.pool;
    let mut st = lock(&pool.state);
    if st.stopping {
        return Ok(());
    }
    if counted && !st.queue_has_room(pool) {
        return Err(over_queue(pool));
    }
    st.jobs.push_back(job);
    let spawn = st.ready && st.running < pool.max_workers && wake_or_reserve(pool, &mut st);
    st.check(pool);
    drop(st);
    if spawn {
        spawn_reserved(shared);
    }
    Ok(())
}

impl State {
    /// Whether one more request can wait in the queue: at most `max_queued` may wait while all
    /// workers are busy (requests that a free worker is about to start do not count).
    fn queue_has_room(&self, pool: &Pool) -> bool {
        let free = pool.max_workers.saturating_sub(self.running);
        self.jobs.len() < pool.max_queued.saturating_add(free)
    }
}

fn over_queue(pool: &Pool) -> Error {
    Error::Protocol(format!(
        "the peer has more than {} requests waiting for a worker (all {} busy)",
        pool.max_queued, pool.max_workers
    ))
}

/// Whether requests wait in the queue.
pub(crate) fn has_queued(shared: &Shared) -> bool {
    !lock(&shared.pool.state).jobs.is_empty()
}

/// Stops the pool: waiting workers end, queued requests are dropped.
pub(crate) fn stop(shared: &Shared) {
    let pool = &shared.pool;
    let (reader, jobs) = {
        let mut st = lock(&pool.state);
        st.stopping = true;
        (st.reader.take(), std::mem::take(&mut st.jobs))
    };
    drop(reader);
    drop(jobs);
    pool.cv.notify_all();
}

/// How a holder puts the reader back.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Release {
    /// Lazily, expecting to take it again soon; a watcher takes it after `GRACE`.
    Lazy,
    /// Lazily, by a pool thread that is about to watch for it itself.
    LazySelfWatched,
    /// For a pool thread to take at once.
    Now,
    /// For a thread the releaser reserved and starts right after: it takes it at once, nobody
    /// else is woken.
    ToNewThread,
}

/// An instant far enough back that a free reader is taken at once.
fn long_ago() -> Instant {
    let now = Instant::now();
    now.checked_sub(GRACE).unwrap_or(now)
}

/// Puts the reader back, waking a pool thread only when needed (see the module docs).
fn release(shared: &Arc<Shared>, reader: FrameReader, how: Release) {
    let pool = &shared.pool;
    let mut st = lock(&pool.state);
    if st.stopping {
        return;
    }
    st.reader = Some(reader);
    st.pool_leads = false;
    st.releases += 1;
    st.released_at = Instant::now();
    // A pool leader that just delivered a reply leaves the reader to that caller, which is
    // still counted as blocked until it wakes.
    let others_blocked = match how {
        Release::LazySelfWatched => st.callers_waiting.saturating_sub(1),
        _ => st.callers_waiting,
    };
    st.check(pool);
    let spawn = if how == Release::ToNewThread {
        st.released_at = long_ago();
        false
    } else if how == Release::Now || others_blocked > 0 {
        // Blocked callers need someone reading now.
        st.released_at = long_ago();
        wake_or_reserve(pool, &mut st)
    } else if st.watchers == 0 && how == Release::Lazy {
        wake_or_reserve(pool, &mut st)
    } else {
        false
    };
    drop(st);
    if spawn {
        spawn_reserved(shared);
    }
}

fn worker(shared: Arc<Shared>) {
    lock(&shared.pool.state).starting -= 1;
    // After running a request, a thread takes a free reader at once (it usually put it back
    // itself to run that request).
    let mut fresh = false;
    while let Some(task) = next_task(&shared, fresh) {
        let job = match task {
            Task::Lead(reader) => lead(&shared, reader),
            Task::Job(job) => Some(job),
        };
        fresh = match job {
            // Counted as running when it was handed to this thread; `next_task` counts it
            // done.
            Some(job) => {
                shared.serve(job);
                true
            }
            None => false,
        };
    }
}

/// The next thing for a pool thread to do. `fresh`: the thread has just run a request, which
/// stops counting as running here (under the same lock as the next choice).
fn next_task(shared: &Arc<Shared>, fresh: bool) -> Option<Task> {
    let pool = &shared.pool;
    let mut st = lock(&pool.state);
    if fresh {
        st.running -= 1;
        st.check(pool);
    }
    let mut fresh = fresh;
    let mut seen = st.releases;
    let mut active_until = Instant::now() + LINGER;
    let mut flushed = false;
    loop {
        if st.stopping {
            thread_ended(pool, st);
            return None;
        }
        let now = Instant::now();
        if st.ready && st.running < pool.max_workers {
            if let Some(job) = st.jobs.pop_front() {
                // Queued work first; make sure someone else reads or takes the rest.
                let more = st.reader.is_some() || !st.jobs.is_empty();
                let mut spawn = false;
                if more && st.idle + st.watchers + st.starting == 0 {
                    if wake_or_reserve(pool, &mut st) {
                        spawn = true;
                    } else if st.reader.is_some() {
                        // Nobody else can read (the thread budget is used up): reading comes
                        // first, so replies keep reaching callers; the job waits its turn.
                        st.jobs.push_front(job);
                        st.pool_leads = true;
                        return st.reader.take().map(Task::Lead);
                    }
                }
                st.running += 1;
                drop(st);
                if spawn {
                    spawn_reserved(shared);
                }
                return Some(Task::Job(job));
            }
        }
        if st.reader.is_some() && (fresh || now >= st.released_at + GRACE) {
            if fresh || st.callers_waiting > 0 || !holder_returns(shared, &st) {
                if !fresh {
                    // A watcher's look found work: look often again.
                    st.held_poll = HELD_POLL;
                }
                st.pool_leads = true;
                return st.reader.take().map(Task::Lead);
            }
            // Looked at again as a held reader is, after `HELD_POLL`.
            st.released_at = now + (HELD_POLL - GRACE);
        }
        fresh = false;
        if st.releases != seen {
            seen = st.releases;
            active_until = now + LINGER;
        }
        // One thread watches while the reader is free or held by a caller (both release
        // lazily), and for a while after activity; the others sleep until woken.
        let watch =
            st.watchers == 0 && (st.reader.is_some() || !st.pool_leads || now < active_until);
        if watch {
            let held = st.reader.is_none();
            let wait = match st.reader {
                Some(_) => (st.released_at + GRACE).saturating_duration_since(now),
                // Held by a caller, or by a pool leader shortly after activity: it will be put
                // back lazily, so look again soon (but not as often as for a free reader, and
                // less often while looks find nothing to do).
                None => st.held_poll,
            }
            .max(Duration::from_micros(50));
            st.watchers += 1;
            st.next_look = now + wait;
            st = pool
                .cv
                .wait_timeout(st, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
            st.watchers -= 1;
            // Never under the pool's lock: the handed frames' lock is taken before it elsewhere.
            drop(st);
            let found = flush_waiting(shared);
            st = lock(&pool.state);
            let left = std::mem::take(&mut st.left_to_watcher);
            #[cfg(test)]
            if left {
                st.left_resets += 1;
            }
            if found || left {
                st.held_poll = HELD_POLL;
            } else if held && st.reader.is_none() {
                // Held before and after, nothing handed over: its holders keep coming back in
                // time, and each look costs a wake-up that can stall a busy transfer.
                st.held_poll = (st.held_poll * 2).min(HELD_POLL_MAX);
            }
        } else {
            if !flushed {
                // What was handed over goes out before this thread stops watching; then the
                // state, unlocked meanwhile, is looked at again.
                flushed = true;
                drop(st);
                flush_waiting(shared);
                st = lock(&pool.state);
                continue;
            }
            st.idle += 1;
            if st.watchers == 0 {
                // Nobody watches now: the next watcher starts looking often.
                st.held_poll = HELD_POLL;
            }
            let (guard, timeout) = pool
                .cv
                .wait_timeout(st, IDLE_TIMEOUT)
                .unwrap_or_else(|e| e.into_inner());
            st = guard;
            st.idle -= 1;
            if timeout.timed_out()
                && !st.stopping
                && st.pool_leads
                && st.jobs.is_empty()
                && st.threads > FREE_THREADS
            {
                thread_ended(pool, st);
                return None;
            }
        }
    }
}

/// Whether a pool thread watches the connection and looks within [`HELD_POLL`]: it then has
/// the flusher write what was handed over and still waits ([`flush_waiting`]). If it watches,
/// it looks every [`HELD_POLL`] from its next look on, for the replies that may follow.
pub(crate) fn watched(shared: &Shared) -> bool {
    let mut st = lock(&shared.pool.state);
    if st.watchers == 0 {
        return false;
    }
    st.left_to_watcher = true;
    st.next_look <= Instant::now() + HELD_POLL
}

/// Has the flusher write a pipelined reply left to the watcher, if it still waits with nobody
/// to write it ([`Shared::left_unwritten`]); returns whether it did. Not with the pool's lock
/// held (starting the flusher takes it).
fn flush_waiting(shared: &Arc<Shared>) -> bool {
    let waiting = shared.left_unwritten();
    if waiting {
        shared.flush_soon(None);
    }
    waiting
}

/// The watcher's wait between looks at a held reader, and how many of its looks went back to
/// [`HELD_POLL`] because a reply had been left to it, for tests.
#[cfg(test)]
pub(crate) fn held_poll(shared: &Shared) -> (Duration, u64) {
    let st = lock(&shared.pool.state);
    (st.held_poll, st.left_resets)
}

/// Whether the reader lies free (nobody holds it), for tests.
#[cfg(test)]
pub(crate) fn reader_is_free(shared: &Shared) -> bool {
    lock(&shared.pool.state).reader.is_some()
}

/// Whether a watcher may leave a reader that lay unused for [`GRACE`] to the thread that put
/// it back: that thread is likely writing a long frame (a large call, whose reply it will read
/// itself, or the reply of a request it ran, after which it reads again), nothing waits to be
/// read, and no caller is blocked. Taking the reader then would only hand the next frame to
/// another thread (a wake-up, and over TLS a fight for the SSL object with the writer). Input
/// arriving is read within [`HELD_POLL`], so two peers writing large frames to each other both
/// end up reading.
fn holder_returns(shared: &Shared, st: &State) -> bool {
    shared.writing() && st.reader.as_ref().is_some_and(|r| !r.input_waiting())
}

/// Reads and routes frames until this thread must run a request (returned, after the reader
/// was put back), hands the reader on, or the connection ends (both `None`). While the
/// connection is quiet it wakes every tick to apply the idle limit.
fn lead(shared: &Arc<Shared>, mut reader: FrameReader) -> Option<Frame> {
    let pool = &shared.pool;
    reader.set_sliced(false);
    loop {
        if !reader.has_buffered() {
            // About to wait for input: replies handed over meanwhile must not wait for it.
            let _ = flush_waiting(shared);
        }
        let frame = match reader.next_frame(None) {
            Ok(Got::Frame(f)) => f,
            Ok(Got::NotYet) => {
                if let Some(idle) = shared.idle_for() {
                    if idle >= shared.idle_timeout {
                        log::info!(
                            "{}: closing the connection: idle for {idle:?} (Options::idle_timeout)",
                            shared.peer
                        );
                        shared.terminate(format!(
                            "idle for {:?}, this side's idle limit (Options::idle_timeout)",
                            shared.idle_timeout
                        ));
                        return None;
                    }
                }
                continue;
            }
            Ok(Got::End) => {
                shared.terminate("the peer closed the connection".into());
                return None;
            }
            Err(e) => {
                ended_by(shared, &e);
                return None;
            }
        };
        let job = match shared.route(frame) {
            Ok(Routed::Done) => continue,
            Ok(Routed::ToCaller) => {
                // A calling thread got its reply and will likely call again: leave it the
                // reader, unless other callers wait for theirs.
                let leave = reader.can_slice() && lock(&pool.state).callers_waiting <= 1;
                if leave {
                    release(shared, reader, Release::LazySelfWatched);
                    return None;
                }
                continue;
            }
            Ok(Routed::Job(mut job)) => {
                job.more = reader.has_buffered();
                job
            }
            Err(e) => {
                ended_by(shared, &e);
                return None;
            }
        };
        let mut st = lock(&pool.state);
        if st.stopping {
            return None;
        }
        // Run it here only if another thread takes over reading: a waiting one, or a new one
        // reserved now (so it cannot be refused by the thread budget afterwards). Otherwise
        // queue it and keep reading, so replies still reach the callers that busy workers wait
        // for.
        let may_run = st.ready && st.running < pool.max_workers;
        if may_run && st.idle + st.watchers > 0 {
            st.running += 1;
            drop(st);
            release(shared, reader, Release::Lazy);
            return Some(job);
        }
        if may_run && reserve_thread(pool, &mut st) {
            st.running += 1;
            drop(st);
            release(shared, reader, Release::ToNewThread);
            spawn_reserved(shared);
            return Some(job);
        }
        if !st.queue_has_room(pool) {
            drop(st);
            ended_by(shared, &over_queue(pool));
            return None;
        }
        st.jobs.push_back(job);
    }
}

/// Ends the connection after a read error or a violation, with a warning unless it was
/// already closing.
fn ended_by(shared: &Arc<Shared>, e: &Error) {
    if !shared.is_closed() {
        log::warn!("{}: closing the connection: {e}", shared.peer);
    }
    shared.terminate(reason(e));
}

/// What a calling thread's own reading produced.
pub(crate) enum CallerRead {
    /// Something for this caller (its reply, or a request nested in its call); the reader was
    /// put back.
    Got(Delivery),
    /// The deadline passed; the reader went to the pool.
    TimedOut,
    /// The connection ended.
    Ended,
}

/// Takes the reader for a calling thread, if it is free and can time out.
pub(crate) fn take_for_caller(shared: &Shared) -> Option<FrameReader> {
    let mut st = lock(&shared.pool.state);
    if !st.reader.as_ref()?.can_slice() {
        return None;
    }
    st.pool_leads = false;
    let mut reader = st.reader.take()?;
    drop(st);
    reader.set_sliced(true);
    Some(reader)
}

/// Reads on behalf of a caller until something for `p` arrives or `deadline` passes (then the
/// reader goes to the pool at once, with a frame read in part kept in it). The deadline is
/// looked at after every frame, so a caller that routes other threads' traffic still gets its
/// timeout on time.
pub(crate) fn read_for_caller(
    shared: &Arc<Shared>,
    mut reader: FrameReader,
    p: &Pending,
    deadline: Instant,
) -> CallerRead {
    loop {
        if let Ok(d) = p.rx.try_recv() {
            release(shared, reader, Release::Lazy);
            return CallerRead::Got(d);
        }
        if Instant::now() >= deadline {
            release(shared, reader, Release::Now);
            return CallerRead::TimedOut;
        }
        let frame = match reader.next_frame(Some(deadline)) {
            Ok(Got::Frame(f)) => f,
            Ok(Got::NotYet) => {
                release(shared, reader, Release::Now);
                return CallerRead::TimedOut;
            }
            Ok(Got::End) => {
                shared.terminate("the peer closed the connection".into());
                return CallerRead::Ended;
            }
            Err(e) => {
                ended_by(shared, &e);
                return CallerRead::Ended;
            }
        };
        let routed = match shared.route(frame) {
            Ok(Routed::Done | Routed::ToCaller) => Ok(()),
            Ok(Routed::Job(job)) => enqueue(shared, job),
            Err(e) => Err(e),
        };
        if let Err(e) = routed {
            ended_by(shared, &e);
            return CallerRead::Ended;
        }
    }
}

/// Marks a caller as blocked on its channel (or no longer), so a released reader goes to the
/// pool at once instead of waiting for its holder to come back.
pub(crate) fn caller_blocked(shared: &Shared, blocked: bool) {
    let mut st = lock(&shared.pool.state);
    if blocked {
        st.callers_waiting += 1;
        // A reader lying free would otherwise wait out its grace period.
        if st.reader.is_some() && !st.stopping {
            st.released_at = long_ago();
            shared.pool.cv.notify_one();
        }
    } else {
        st.callers_waiting -= 1;
    }
}

fn reason(e: &Error) -> String {
    match e {
        Error::Closed { reason } => reason.clone(),
        other => other.to_string(),
    }
}
