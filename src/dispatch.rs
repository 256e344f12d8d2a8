//! The worker pool of one connection, in the leader/followers pattern.
//!
//! The read half of the transport is a token held by one thread at a time, the leader. The
//! leader reads a frame and routes it ([`Shared::route`]): replies and nested requests go to the
//! threads waiting for them, and the leader reads on. When a frame is a request for the pool,
//! the leader passes the read half to an idle follower (or starts one, up to `max_workers`) and
//! runs the request itself, so serving a request never waits for a thread hand-off. When every
//! worker is busy, the leader queues the request (at most `max_queued`) and keeps reading, so
//! replies still reach the callers that busy workers are waiting for.
//!
//! Until the service's `on_connect` has run, requests are queued, not run.

use crate::connection::{lock, Shared};
use crate::error::Error;
use crate::wire::{Frame, FrameReader};
use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// How long a spare worker waits for work before it ends (two are always kept).
const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) struct Pool {
    state: Mutex<State>,
    cv: Condvar,
    max_workers: usize,
    /// Threads of the pool at most: `max_workers` running handlers plus the leader, which only
    /// reads. (Bounding threads by `max_workers` alone left one handler fewer, and none at all
    /// with `max_workers(1)`.)
    max_threads: usize,
    max_queued: usize,
}

struct State {
    /// The read half, when no thread is leading.
    reader: Option<FrameReader>,
    jobs: VecDeque<Frame>,
    idle: usize,
    threads: usize,
    ready: bool,
    stopping: bool,
}

enum Task {
    Lead(FrameReader),
    Job(Frame),
}

impl Pool {
    pub(crate) fn new(max_workers: usize, max_queued: usize) -> Pool {
        Pool {
            state: Mutex::new(State {
                reader: None,
                jobs: VecDeque::new(),
                idle: 0,
                threads: 0,
                ready: false,
                stopping: false,
            }),
            cv: Condvar::new(),
            max_workers: max_workers.max(1),
            max_threads: max_workers.max(1) + 1,
            max_queued,
        }
    }
}

/// Starts the connection's first worker, as leader.
pub(crate) fn start(shared: &Arc<Shared>, reader: FrameReader) -> io::Result<()> {
    {
        let mut st = lock(&shared.pool.state);
        st.reader = Some(reader);
        st.threads += 1;
    }
    spawn_worker(shared).inspect_err(|_| {
        lock(&shared.pool.state).threads -= 1;
    })
}

fn spawn_worker(shared: &Arc<Shared>) -> io::Result<()> {
    let s = shared.clone();
    shared.threads.spawn("rpyc-worker", move || worker(s))
}

/// Lets queued requests run (after `on_connect`).
pub(crate) fn set_ready(shared: &Arc<Shared>) {
    let pool = &shared.pool;
    let mut st = lock(&pool.state);
    st.ready = true;
    let wanted = st
        .jobs
        .len()
        .saturating_sub(st.idle)
        .min(pool.max_threads.saturating_sub(st.threads));
    st.threads += wanted;
    drop(st);
    pool.cv.notify_all();
    for _ in 0..wanted {
        if let Err(e) = spawn_worker(shared) {
            log::error!("{}: cannot start a worker thread: {e}", shared.peer);
            lock(&pool.state).threads -= 1;
        }
    }
}

/// Hands a request to the pool from outside the leader (a caller that gave up on the call the
/// request was nested in).
pub(crate) fn submit(shared: &Arc<Shared>, job: Frame) {
    let pool = &shared.pool;
    let mut st = lock(&pool.state);
    if st.stopping {
        return;
    }
    st.jobs.push_back(job);
    let spawn = st.ready && st.idle == 0 && st.threads < pool.max_threads;
    if spawn {
        st.threads += 1;
    }
    drop(st);
    pool.cv.notify_one();
    if spawn && spawn_worker(shared).is_err() {
        lock(&pool.state).threads -= 1;
    }
}

/// Stops the pool: idle workers end, queued requests are dropped.
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

fn worker(shared: Arc<Shared>) {
    while let Some(task) = next_task(&shared) {
        match task {
            Task::Lead(reader) => {
                if let Some(job) = lead(&shared, reader) {
                    shared.serve(job);
                }
            }
            Task::Job(job) => shared.serve(job),
        }
    }
}

fn next_task(shared: &Shared) -> Option<Task> {
    let pool = &shared.pool;
    let mut st = lock(&pool.state);
    loop {
        if st.stopping {
            st.threads -= 1;
            return None;
        }
        if let Some(r) = st.reader.take() {
            return Some(Task::Lead(r));
        }
        if st.ready {
            if let Some(job) = st.jobs.pop_front() {
                return Some(Task::Job(job));
            }
        }
        st.idle += 1;
        let (guard, timeout) = pool
            .cv
            .wait_timeout(st, IDLE_TIMEOUT)
            .unwrap_or_else(|e| e.into_inner());
        st = guard;
        st.idle -= 1;
        if timeout.timed_out()
            && !st.stopping
            && st.reader.is_none()
            && st.jobs.is_empty()
            && st.threads > 2
        {
            st.threads -= 1;
            return None;
        }
    }
}

/// Reads and routes frames until one must be served by this thread (returned, after the read
/// half was passed on) or the connection ends (`None`).
fn lead(shared: &Arc<Shared>, reader: FrameReader) -> Option<Frame> {
    let pool = &shared.pool;
    let mut reader = reader;
    loop {
        let frame = match reader.read_frame() {
            Ok(Some(f)) => f,
            Ok(None) => {
                shared.terminate("the peer closed the connection".into());
                return None;
            }
            Err(e) => {
                if !shared.is_closed() {
                    log::warn!("{}: closing the connection: {e}", shared.peer);
                }
                shared.terminate(reason(&e));
                return None;
            }
        };
        let job = match shared.route(frame) {
            Ok(None) => continue,
            Ok(Some(job)) => job,
            Err(e) => {
                log::warn!("{}: closing the connection: {e}", shared.peer);
                shared.terminate(e.to_string());
                return None;
            }
        };
        let mut st = lock(&pool.state);
        if st.stopping {
            return None;
        }
        if !st.ready || (st.idle == 0 && st.threads >= pool.max_threads) {
            if st.jobs.len() >= pool.max_queued {
                drop(st);
                let e = Error::Protocol(format!(
                    "the peer has more than {} requests waiting for a worker (all {} busy)",
                    pool.max_queued, pool.max_workers
                ));
                log::warn!("{}: closing the connection: {e}", shared.peer);
                shared.terminate(e.to_string());
                return None;
            }
            st.jobs.push_back(job);
            continue;
        }
        st.reader = Some(reader);
        if st.idle > 0 {
            drop(st);
            pool.cv.notify_one();
            return Some(job);
        }
        st.threads += 1;
        drop(st);
        match spawn_worker(shared) {
            Ok(()) => return Some(job),
            Err(e) => {
                log::error!("{}: cannot start a worker thread: {e}", shared.peer);
                let mut st = lock(&pool.state);
                st.threads -= 1;
                match st.reader.take() {
                    Some(r) => {
                        // Nobody took the read half: keep leading, queue the request.
                        st.jobs.push_back(job);
                        reader = r;
                    }
                    None => return Some(job),
                }
            }
        }
    }
}

fn reason(e: &Error) -> String {
    match e {
        Error::Closed { reason } => reason.clone(),
        other => other.to_string(),
    }
}
