//! A small process-wide cache of large byte buffers, so large payloads reuse memory.
//!
//! A large payload passes through several buffers on each side (the outgoing frame, the
//! received frame body, the decoded [`crate::Bytes`]). The allocator serves large blocks
//! (glibc: 32 MiB and up) straight from the kernel and returns them on free, so every
//! fresh buffer has all its pages faulted in again: copying 64 MiB into a fresh buffer costs
//! four to five times as much as copying it into one that was used before. Buffers of at least
//! [`MIN_POOLED`] bytes capacity are therefore put back here when dropped and taken from here
//! when a large buffer is needed.
//!
//! Bounds: at most [`MAX_BUFFERS`] (8) buffers holding at most [`MAX_BYTES`] (256 MiB) of
//! capacity in all are kept while unused, enough for every buffer of a 64 MiB call on both
//! sides of one process; a single buffer larger than that is freed. When a returned buffer would
//! exceed a bound, the smallest cached buffers are freed first (large buffers are the costly
//! ones to fault in again). A buffer unused for [`KEEP`] is freed by a janitor thread
//! (`rpyc-buffers`) that runs only while the cache holds something, so a burst of large frames
//! costs memory for a few seconds, not for the life of the process. Buffers below
//! [`MIN_POOLED`] never come here, so small messages take no lock and allocate as before.

use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Smallest capacity worth caching; smaller buffers are allocated and freed as usual.
const MIN_POOLED: usize = 1 << 20;
/// Most buffers kept while unused.
const MAX_BUFFERS: usize = 8;
/// Most capacity, in bytes, kept in unused buffers.
const MAX_BYTES: usize = 256 << 20;
/// How long an unused buffer is kept.
const KEEP: Duration = Duration::from_secs(2);

/// The process-wide pool.
static POOL: Pool = Pool::new();

/// Unused buffers, each with when it was given back. Each keeps the length its last user left:
/// a taker that overwrites the bytes anyway ([`take_sized`]) then need not zero them first.
struct Pool {
    free: Mutex<Free>,
}

struct Free {
    buffers: Vec<(Vec<u8>, Instant)>,
    /// A janitor thread runs (see the module docs).
    janitor: bool,
}

impl Pool {
    const fn new() -> Pool {
        Pool {
            free: Mutex::new(Free {
                buffers: Vec::new(),
                janitor: false,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Free> {
        crate::base::lock(&self.free)
    }

    /// The smallest cached buffer with a capacity of at least `capacity`, if any.
    fn take(&self, capacity: usize) -> Option<Vec<u8>> {
        let mut free = self.lock();
        let best = free
            .buffers
            .iter()
            .enumerate()
            .filter(|(_, (b, _))| b.capacity() >= capacity)
            .min_by_key(|(_, (b, _))| b.capacity())
            .map(|(i, _)| i)?;
        Some(free.buffers.swap_remove(best).0)
    }

    /// Keeps `buf` for reuse if it is large enough and fits the bounds (see the module docs).
    /// Returns whether a janitor must be started (the caller starts it, for the process pool).
    fn give(&self, buf: Vec<u8>) -> bool {
        if buf.capacity() < MIN_POOLED || buf.capacity() > MAX_BYTES {
            return false;
        }
        let mut evicted = Vec::new();
        let start_janitor;
        {
            let mut free = self.lock();
            free.buffers.push((buf, Instant::now()));
            let mut total: usize = free.buffers.iter().map(|(b, _)| b.capacity()).sum();
            while free.buffers.len() > MAX_BUFFERS || total > MAX_BYTES {
                let smallest = (0..free.buffers.len())
                    .min_by_key(|&i| free.buffers[i].0.capacity())
                    .expect("the list is not empty");
                let (b, _) = free.buffers.swap_remove(smallest);
                total -= b.capacity();
                evicted.push(b);
            }
            start_janitor = !free.janitor;
            free.janitor = true;
        }
        // Freed outside the lock: returning a large block to the kernel takes a while.
        drop(evicted);
        start_janitor
    }

    /// Frees the buffers unused for `keep` or longer; returns false (and marks the janitor
    /// gone) once nothing is left to watch.
    fn trim(&self, keep: Duration) -> bool {
        let mut old = Vec::new();
        let more = {
            let mut free = self.lock();
            let now = Instant::now();
            let mut i = 0;
            while i < free.buffers.len() {
                if now.duration_since(free.buffers[i].1) >= keep {
                    old.push(free.buffers.swap_remove(i).0);
                } else {
                    i += 1;
                }
            }
            free.janitor = !free.buffers.is_empty();
            free.janitor
        };
        drop(old);
        more
    }

    #[cfg(test)]
    fn capacities(&self) -> Vec<usize> {
        let mut c: Vec<usize> = self
            .lock()
            .buffers
            .iter()
            .map(|(b, _)| b.capacity())
            .collect();
        c.sort_unstable();
        c
    }
}

/// Frees the process pool's unused buffers as they age, until it is empty.
fn janitor() {
    loop {
        std::thread::sleep(KEEP / 2);
        if !POOL.trim(KEEP) {
            return;
        }
    }
}

/// An empty buffer with a capacity of at least `capacity`, from the pool if it has one.
/// `None` if `capacity` is below [`MIN_POOLED`] or no cached buffer is large enough.
pub(crate) fn take_empty(capacity: usize) -> Option<Vec<u8>> {
    if capacity < MIN_POOLED {
        return None;
    }
    let mut b = POOL.take(capacity)?;
    b.clear();
    Some(b)
}

/// A cached buffer of exactly `len` bytes whose contents are unspecified (whatever its last
/// user left, or zeros): for a caller that overwrites all of them. `None` as for
/// [`take_empty`].
pub(crate) fn take_sized(len: usize) -> Option<Vec<u8>> {
    if len < MIN_POOLED {
        return None;
    }
    let mut b = POOL.take(len)?;
    // Only the part the last user never initialized is zeroed.
    b.resize(len, 0);
    Some(b)
}

/// A buffer to read `len` bytes into: a cached one of exactly `len` bytes, or else a new one of
/// at most 1 MiB, for the reader to grow as bytes come (a peer's announced length never buys
/// more memory than it sends).
pub(crate) fn for_reading(len: usize) -> Vec<u8> {
    take_sized(len).unwrap_or_else(|| vec![0; len.min(1 << 20)])
}

/// Returns a buffer to the pool if it is worth keeping; otherwise frees it. No lock is taken
/// for a buffer below [`MIN_POOLED`].
pub(crate) fn give(buf: Vec<u8>) {
    if buf.capacity() >= MIN_POOLED && POOL.give(buf) {
        let started = std::thread::Builder::new()
            .name("rpyc-buffers".into())
            .spawn(janitor);
        if started.is_err() {
            // Nothing is trimmed until the next buffer comes back and tries again.
            POOL.lock().janitor = false;
        }
    }
}

/// A copy of `data`, in a cached buffer when it is large and one is available.
pub(crate) fn copy_of(data: &[u8]) -> Vec<u8> {
    match take_empty(data.len()) {
        Some(mut b) => {
            b.extend_from_slice(data);
            b
        }
        None => data.to_vec(),
    }
}

/// Makes room in `v` for `needed` bytes in all, moving its contents into a cached buffer when
/// one is large enough (the old buffer goes to the pool). Without one, `v` is left alone and
/// grows as a `Vec` does.
fn reserve(v: &mut Vec<u8>, needed: usize) {
    if needed <= v.capacity() {
        return;
    }
    if let Some(mut bigger) = take_empty(needed) {
        bigger.extend_from_slice(v);
        give(std::mem::replace(v, bigger));
    }
}

/// Appends `data` to `buf`, growing it through the pool (see [`reserve`]) once it is large.
#[inline]
pub(crate) fn append(buf: &mut Vec<u8>, data: &[u8]) {
    let needed = buf.len() + data.len();
    if needed > buf.capacity() && needed >= MIN_POOLED {
        reserve(buf, needed);
    }
    buf.extend_from_slice(data);
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    #[test]
    fn pool_keeps_at_most_max_buffers_and_max_bytes() {
        let pool = Pool::new();
        // Too small to keep.
        pool.give(Vec::with_capacity(MIN_POOLED - 1));
        assert!(pool.capacities().is_empty());
        // Too large to keep even alone (capacity only: these pages are never touched).
        pool.give(Vec::with_capacity(MAX_BYTES + 1));
        assert!(pool.capacities().is_empty());

        // The buffer count is bounded; the smallest buffers go first.
        for i in 0..MAX_BUFFERS + 4 {
            pool.give(Vec::with_capacity((i + 1) * MIB));
        }
        let kept = pool.capacities();
        assert_eq!(kept.len(), MAX_BUFFERS);
        assert!(kept[0] >= 5 * MIB, "{kept:?}");

        // The byte total is bounded.
        for _ in 0..MAX_BUFFERS {
            pool.give(Vec::with_capacity(100 * MIB));
        }
        let kept = pool.capacities();
        assert!(kept.len() <= MAX_BUFFERS);
        assert!(kept.iter().sum::<usize>() <= MAX_BYTES, "{kept:?}");
        assert!(kept.iter().all(|&c| c >= 100 * MIB), "{kept:?}");
    }

    #[test]
    fn unused_buffers_are_freed_after_a_while() {
        let pool = Pool::new();
        assert!(
            pool.give(Vec::with_capacity(2 * MIB)),
            "a janitor is wanted"
        );
        assert!(
            !pool.give(Vec::with_capacity(3 * MIB)),
            "one janitor at a time"
        );
        assert!(pool.trim(Duration::from_secs(3600)), "young buffers stay");
        assert_eq!(pool.capacities().len(), 2);
        assert!(!pool.trim(Duration::ZERO), "nothing left to watch");
        assert!(pool.capacities().is_empty());
        assert!(pool.give(Vec::with_capacity(2 * MIB)), "a new janitor");
    }

    #[test]
    fn pool_hands_out_the_smallest_buffer_that_fits() {
        let pool = Pool::new();
        assert!(pool.take(MIB).is_none());
        pool.give(Vec::with_capacity(8 * MIB));
        pool.give(Vec::with_capacity(2 * MIB));
        pool.give(Vec::with_capacity(4 * MIB));
        assert!(pool.take(9 * MIB).is_none());
        let b = pool.take(3 * MIB).unwrap();
        assert!(b.capacity() >= 3 * MIB && b.capacity() < 8 * MIB);
        assert_eq!(pool.capacities().len(), 2);
    }

    #[test]
    fn appending_keeps_the_prefix_when_it_moves_to_a_larger_buffer() {
        let mut v = b"head".to_vec();
        let big: Vec<u8> = (0..3 * MIB).map(|i| (i % 251) as u8).collect();
        // Make sure some cached buffer is large enough, whatever other tests took.
        give(Vec::with_capacity(4 * MIB));
        append(&mut v, &big);
        assert_eq!(&v[..4], b"head");
        assert_eq!(&v[4..], &big[..]);
    }
}
