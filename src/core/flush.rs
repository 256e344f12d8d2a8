//! Async calls made in a burst go out together.
//!
//! A thread that makes async calls one after another (a pipeline) would pay one system call,
//! and the peer one wake-up, per call. So an async call made within [`BURST`] of the
//! connection's previous one is not written at once: its sealed frame is handed over
//! (`Writer::handed` in [`crate::core::connection`]) and goes out with the others in one
//! vectored write, at the latest [`FLUSH_AFTER`] after the first of them, and earlier when:
//!
//! * 64 frames (or 1 MiB) are waiting: the call that finds so many writes them all;
//! * any frame is written on the connection (it writes the waiting ones first, so every
//!   thread's frames keep their order);
//! * the caller, or anyone, waits for or polls an [`AsyncResult`](crate::AsyncResult) of the
//!   connection.
//!
//! The first async call of a burst is written at once, so a lone async call costs nothing more.
//! The timer is a thread of the connection (`rpyc-flusher`), started at the first deferral and
//! ended with the connection, or after 10 s without deferrals.
//!
//! Replies to requests the peer pipelined are deferred the same way. While a pool thread
//! watches the connection ([`crate::core::dispatch`]) and looks again within 2 ms, they set no
//! timer: waking the flusher for each batch cost more CPU than the writes it saved. The
//! watcher looks anyway and arms the timer if replies still wait then (and looks every 2 ms
//! from then on, as long as replies are left to it), and a pool thread about to wait for input
//! writes them first; usually the reply to the batch's last request has written them all long
//! before.

use crate::base::lock;
use crate::core::connection::Shared;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// An async call this soon after the previous one is part of a burst.
const BURST: Duration = Duration::from_micros(100);
/// The longest a deferred frame waits for others.
pub(crate) const FLUSH_AFTER: Duration = Duration::from_micros(100);

/// The two windows of batching: [`BURST`] and [`FLUSH_AFTER`] (tests widen them to make
/// batching certain).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Windows {
    pub(crate) burst: Duration,
    pub(crate) flush_after: Duration,
}

impl Default for Windows {
    fn default() -> Windows {
        Windows {
            burst: BURST,
            flush_after: FLUSH_AFTER,
        }
    }
}
/// How long the flusher thread waits for a deferral before it ends.
const IDLE: Duration = Duration::from_secs(10);

pub(crate) struct Deferral {
    windows: Windows,
    /// Nanoseconds after `born` of the connection's last async call (0: none yet).
    last_async: AtomicU64,
    born: Instant,
    state: Mutex<State>,
    cv: Condvar,
}

#[derive(Default)]
struct State {
    /// When the frames waiting now must be written.
    due: Option<Instant>,
    /// The flusher thread runs.
    running: bool,
    /// The flusher waits without a due time (it needs a wake-up for a new one).
    sleeping: bool,
    stopping: bool,
}

/// What [`Deferral::arm`] asks of the caller.
pub(crate) enum Armed {
    /// The timer runs: the frame may wait.
    Yes,
    /// Start the flusher thread (then the frame may wait).
    StartThread,
    /// The connection is closing: write the frame now.
    No,
}

impl Deferral {
    pub(crate) fn new(windows: Windows) -> Deferral {
        Deferral {
            windows,
            last_async: AtomicU64::new(0),
            born: Instant::now(),
            state: Mutex::new(State::default()),
            cv: Condvar::new(),
        }
    }

    /// Records an async call; whether it comes within [`BURST`] of the previous one.
    pub(crate) fn in_burst(&self) -> bool {
        let now = (self.born.elapsed().as_nanos() as u64).max(1);
        let last = self.last_async.swap(now, Ordering::Relaxed);
        last != 0 && now.saturating_sub(last) <= self.windows.burst.as_nanos() as u64
    }

    /// Makes sure waiting frames are written by [`FLUSH_AFTER`] from now at the latest.
    pub(crate) fn arm(&self) -> Armed {
        let mut st = lock(&self.state);
        if st.stopping {
            return Armed::No;
        }
        if st.due.is_none() {
            st.due = Some(Instant::now() + self.windows.flush_after);
            if st.sleeping {
                self.cv.notify_one();
            }
        }
        if st.running {
            Armed::Yes
        } else {
            st.running = true;
            Armed::StartThread
        }
    }

    /// The flusher thread could not start.
    pub(crate) fn not_started(&self) {
        let mut st = lock(&self.state);
        st.running = false;
        st.due = None;
    }

    /// Ends the flusher (the connection closed).
    pub(crate) fn stop(&self) {
        lock(&self.state).stopping = true;
        self.cv.notify_all();
    }

    /// The flusher thread: writes the waiting frames when they are due.
    pub(crate) fn run(shared: &Arc<Shared>) {
        let me = &shared.deferral;
        let mut st = lock(&me.state);
        loop {
            if st.stopping {
                st.running = false;
                return;
            }
            let now = Instant::now();
            match st.due {
                None => {
                    st.sleeping = true;
                    let (g, t) = me
                        .cv
                        .wait_timeout(st, IDLE)
                        .unwrap_or_else(|e| e.into_inner());
                    st = g;
                    st.sleeping = false;
                    if t.timed_out() && st.due.is_none() {
                        st.running = false;
                        return;
                    }
                }
                Some(due) if now < due => {
                    st = me
                        .cv
                        .wait_timeout(st, due - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
                Some(_) => {
                    st.due = None;
                    drop(st);
                    shared.write_handed(None);
                    st = lock(&me.state);
                }
            }
        }
    }
}
