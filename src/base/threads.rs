//! Every thread this crate starts belongs to a [`ThreadSet`], so whoever started it can wait for
//! it to end: a client connection's set is its own, a server's connections share the server's.

use crate::base::{deadline, lock};
use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle, ThreadId};
use std::time::{Duration, Instant};

#[derive(Default)]
pub(crate) struct ThreadSet {
    state: Mutex<HashMap<ThreadId, Option<JoinHandle<()>>>>,
    finished: Mutex<Vec<JoinHandle<()>>>,
    cv: Condvar,
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
    pub(crate) fn new() -> Arc<ThreadSet> {
        Arc::new(ThreadSet::default())
    }

    /// Starts a named thread in this set.
    pub(crate) fn spawn(
        self: &Arc<Self>,
        name: &str,
        f: impl FnOnce() + Send + 'static,
    ) -> io::Result<()> {
        let set = self.clone();
        // Hold the lock across spawn so the thread cannot finish before its handle is recorded.
        let mut live = lock(&self.state);
        let handle = thread::Builder::new().name(name.into()).spawn(move || {
            let _member = Member(set);
            f()
        })?;
        live.insert(handle.thread().id(), Some(handle));
        drop(live);
        self.reap();
        Ok(())
    }

    /// Joins threads that have already ended, so handles do not pile up on long connections.
    fn reap(&self) {
        let done = std::mem::take(&mut *lock(&self.finished));
        for h in done {
            let _ = h.join();
        }
    }

    /// Waits until every thread of the set except the calling one has ended, then joins them.
    /// Returns false if some were still running after `grace`.
    pub(crate) fn join(&self, grace: Duration) -> bool {
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
