//! Every thread this crate starts belongs to a [`ThreadSet`], so whoever started it can wait for
//! it to end: a client connection's set is its own, a server's connections share the server's.
//!
//! A server's set keeps a few threads that finished their work *parked* for a while, and hands
//! them the next work instead of starting a thread: a server whose clients connect and leave
//! all the time would otherwise start and end two threads per connection. Parked threads are
//! still members of the set: [`ThreadSet::join`] ends them too. Client connections share one
//! such set ([`ThreadSet::clients`]), for a program that connects again and again.

use crate::base::{deadline, lock};
use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle, ThreadId};
use std::time::{Duration, Instant};

type Job = Box<dyn FnOnce() + Send>;

/// Most threads a reusing set keeps parked at once.
pub(crate) const PARKED_THREADS: usize = 8;
/// How long a thread stays parked, waiting for work, before it ends.
pub(crate) const PARK_FOR: Duration = Duration::from_secs(2);

#[derive(Default)]
pub(crate) struct ThreadSet {
    state: Mutex<HashMap<ThreadId, Option<JoinHandle<()>>>>,
    finished: Mutex<Vec<JoinHandle<()>>>,
    cv: Condvar,
    /// Threads started so far, for tests of how many an operation costs.
    started: AtomicUsize,
    /// Work handed to the set so far (on new or parked threads).
    spawned: AtomicUsize,
    /// Where threads wait for more work, if this set reuses them.
    parking: Option<Parking>,
}

/// Threads of a set waiting for their next work: at most `max`, each for at most `wait`.
struct Parking {
    max: usize,
    wait: Duration,
    state: Mutex<Parked>,
    cv: Condvar,
}

#[derive(Default)]
struct Parked {
    /// Threads parked now.
    idle: usize,
    /// Work handed to parked threads and not taken yet: never more than `idle`, so each has
    /// a thread that takes it.
    handed: VecDeque<(String, Job)>,
    /// The set is being joined: nothing parks any more.
    closing: bool,
}

/// Gives the calling thread, which now does something else than it was started for, a name
/// that says so (as the system shows it; `std::thread::current().name()` keeps the first).
pub(crate) fn rename_current(name: &str) {
    #[cfg(unix)]
    crate::base::sys::set_thread_name(name);
    #[cfg(not(unix))]
    let _ = name;
}

/// Removes the thread from its set when it ends, panicking or not.
struct Member(Arc<ThreadSet>);

impl Drop for Member {
    fn drop(&mut self) {
        let me = thread::current().id();
        let mut live = lock(&self.0.state);
        if let Some(Some(h)) = live.remove(&me) {
            lock(&self.0.finished).push(h);
        }
        self.0.cv.notify_all();
    }
}

impl ThreadSet {
    #[cfg(test)]
    pub(crate) fn new() -> Arc<ThreadSet> {
        Arc::new(ThreadSet::default())
    }

    /// A set whose threads, once their work is done, wait up to `wait` for more (at most `max`
    /// of them at once) before they end.
    pub(crate) fn reusing(max: usize, wait: Duration) -> Arc<ThreadSet> {
        Arc::new(ThreadSet {
            parking: Some(Parking {
                max,
                wait,
                state: Mutex::new(Parked::default()),
                cv: Condvar::new(),
            }),
            ..ThreadSet::default()
        })
    }

    /// The set of every client connection's threads in this process: a connection's threads
    /// that end park for [`PARK_FOR`] (at most [`PARKED_THREADS`] at once), for the next
    /// connection to take instead of starting one. Nobody joins it: a client connection's
    /// threads end on their own once it closes, and parked ones when their time is up.
    pub(crate) fn clients() -> Arc<ThreadSet> {
        static CLIENTS: std::sync::OnceLock<Arc<ThreadSet>> = std::sync::OnceLock::new();
        CLIENTS
            .get_or_init(|| ThreadSet::reusing(PARKED_THREADS, PARK_FOR))
            .clone()
    }

    /// Runs `f` on a thread of this set named `name`: a parked one if there is one, else a new
    /// one.
    pub(crate) fn spawn(
        self: &Arc<Self>,
        name: &str,
        f: impl FnOnce() + Send + 'static,
    ) -> io::Result<()> {
        if let Some(p) = &self.parking {
            let mut st = lock(&p.state);
            if !st.closing && st.idle > st.handed.len() {
                st.handed.push_back((name.into(), Box::new(f)));
                drop(st);
                p.cv.notify_one();
                self.spawned.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
        }
        let set = self.clone();
        // Hold the lock across spawn so the thread cannot finish before its handle is recorded.
        let mut live = lock(&self.state);
        let handle = thread::Builder::new().name(name.into()).spawn(move || {
            let _member = Member(set.clone());
            f();
            while let Some((name, job)) = set.park() {
                rename_current(&name);
                job();
            }
        })?;
        live.insert(handle.thread().id(), Some(handle));
        drop(live);
        self.started.fetch_add(1, Ordering::Relaxed);
        self.spawned.fetch_add(1, Ordering::Relaxed);
        self.reap();
        Ok(())
    }

    /// Waits, as a thread whose work is done, for more; `None`: the thread ends.
    fn park(&self) -> Option<(String, Job)> {
        let p = self.parking.as_ref()?;
        let mut st = lock(&p.state);
        if st.closing || st.idle >= p.max {
            return None;
        }
        rename_current("rpyc-parked");
        st.idle += 1;
        let until = deadline(p.wait);
        let next = loop {
            // Work handed over first: a thread counted idle when it was handed takes it.
            if let Some(job) = st.handed.pop_front() {
                break Some(job);
            }
            let now = Instant::now();
            if st.closing || now >= until {
                break None;
            }
            st =
                p.cv.wait_timeout(st, until - now)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
        };
        st.idle -= 1;
        next
    }

    /// How many threads this set has started.
    #[cfg(test)]
    pub(crate) fn started(&self) -> usize {
        self.started.load(Ordering::Relaxed)
    }

    /// How many times work was handed to this set (each ran on a new or a parked thread).
    #[cfg(test)]
    pub(crate) fn spawned(&self) -> usize {
        self.spawned.load(Ordering::Relaxed)
    }

    /// Joins threads that have already ended, so handles do not pile up on long connections.
    fn reap(&self) {
        let done = std::mem::take(&mut *lock(&self.finished));
        for h in done {
            let _ = h.join();
        }
    }

    /// Waits until every thread of the set except the calling one has ended (parked ones end
    /// at once, and no thread parks any more), then joins them. Returns false if some were
    /// still running after `grace`.
    pub(crate) fn join(&self, grace: Duration) -> bool {
        if let Some(p) = &self.parking {
            lock(&p.state).closing = true;
            p.cv.notify_all();
        }
        let me = thread::current().id();
        let deadline = deadline(grace);
        let mut live = lock(&self.state);
        loop {
            let others = live.keys().filter(|id| **id != me).count();
            if others == 0 {
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                log::warn!("{others} rpyc thread(s) still running user code after {grace:?}; leaving them detached");
                drop(live);
                self.reap();
                return false;
            }
            live = self
                .cv
                .wait_timeout(live, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        drop(live);
        self.reap();
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crossbeam_channel::bounded;

    /// A bound only a broken set reaches.
    const LONG: Duration = Duration::from_secs(10);

    impl ThreadSet {
        fn parked(&self) -> usize {
            self.parking.as_ref().map_or(0, |p| lock(&p.state).idle)
        }
    }

    fn wait_for(what: &str, f: impl Fn() -> bool) {
        let until = deadline(LONG);
        while !f() {
            assert!(Instant::now() < until, "{what}: not within {LONG:?}");
            thread::yield_now();
        }
    }

    #[test]
    fn a_reusing_set_runs_the_next_work_on_a_parked_thread_instead_of_starting_one() {
        let set = ThreadSet::reusing(2, LONG);
        let (tx, rx) = bounded(2);
        let t = tx.clone();
        set.spawn("first", move || t.send(thread::current().id()).unwrap())
            .unwrap();
        let first = rx.recv_timeout(LONG).unwrap();
        wait_for("the thread parks", || set.parked() == 1);
        set.spawn("second", move || tx.send(thread::current().id()).unwrap())
            .unwrap();
        assert_eq!(rx.recv_timeout(LONG).unwrap(), first);
        assert_eq!((set.started(), set.spawned()), (1, 2));
        assert!(set.join(LONG), "the parked thread did not end");
        assert!(lock(&set.state).is_empty());
    }

    /// Spawns three works that run at once (so each gets a thread of its own) and end.
    fn spawn_three_at_once(set: &Arc<ThreadSet>) {
        let gate = Arc::new(Mutex::new(()));
        let held = lock(&gate);
        for _ in 0..3 {
            let g = gate.clone();
            set.spawn("work", move || drop(lock(&g))).unwrap();
        }
        drop(held);
    }

    #[test]
    fn joining_a_reusing_set_ends_its_parked_threads_at_once_and_nothing_parks_after() {
        let set = ThreadSet::reusing(4, LONG);
        spawn_three_at_once(&set);
        wait_for("the threads park", || set.parked() == 3);
        let started = Instant::now();
        assert!(set.join(LONG));
        // Not by waiting out their parking time.
        assert!(started.elapsed() < LONG / 2);
        set.spawn("late", || {}).unwrap();
        assert!(set.join(LONG));
        assert_eq!((set.started(), set.parked()), (4, 0));
    }

    #[test]
    fn a_set_parks_at_most_its_maximum_and_a_plain_set_never_parks() {
        let set = ThreadSet::reusing(1, LONG);
        spawn_three_at_once(&set);
        wait_for("two threads end, one parks", || {
            lock(&set.state).len() == 1 && set.parked() == 1
        });
        assert!(set.join(LONG));

        let plain = ThreadSet::new();
        plain.spawn("work", || {}).unwrap();
        assert!(plain.join(LONG));
        assert_eq!(plain.parked(), 0);
    }
}
