//! The bottom layer: what every other layer uses and that uses nothing of theirs. Locks that
//! survive a panic elsewhere, deadlines that cannot overflow, the one wrapper around the
//! operating system (`sys`), the threads the crate starts, the cache of large buffers, the
//! receive buffers that grow with traffic, the short spin before a wait for input, and the bounds a peer's data is held to.

pub(crate) mod buffers;
pub(crate) mod limits;
pub(crate) mod mailbox;
pub(crate) mod recv_buf;
pub(crate) mod spin;
#[cfg(unix)]
pub(crate) mod sys;
#[cfg(test)]
pub(crate) mod test_alloc;
#[cfg(test)]
pub(crate) mod test_rng;
pub(crate) mod threads;

use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Locks a mutex, ignoring poisoning: no code of ours panics while holding these locks, and a
/// user panic is caught before it could cross one.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The largest char boundary of `s` at or before byte `i` (`str::floor_char_boundary`, which
/// is not stable yet).
pub(crate) fn floor_char_boundary(s: &str, i: usize) -> usize {
    let mut i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// The instant `timeout` from now. A timeout too large to add to the clock (`Duration::MAX`,
/// the usual way to say "no limit") waits about a century instead of panicking.
pub(crate) fn deadline(timeout: Duration) -> Instant {
    deadline_from(Instant::now(), timeout)
}

/// The instant `timeout` after `start`, with the same rule as [`deadline`].
pub(crate) fn deadline_from(start: Instant, timeout: Duration) -> Instant {
    start
        .checked_add(timeout)
        .unwrap_or_else(|| start + Duration::from_secs(100 * 365 * 24 * 3600))
}
