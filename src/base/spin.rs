//! Looking for input a little before sleeping for it.
//!
//! A thread that blocks on a socket and is woken a few microseconds later pays for two context
//! switches and, on a CPU left idle meanwhile, for waking that CPU: on the 2-CPU virtual
//! machines this crate is measured on, about 20 µs per wait, more than the rest of a call
//! costs. So a thread about to wait for a peer's next frame first looks for input for up to
//! [`SPIN_FOR`] (50 µs), giving its CPU to any other runnable thread between looks, and blocks
//! only if none came ([`FrameReader`](crate::transport::reader::FrameReader) decides when;
//! only where a reply or request is likely soon: the previous wait on that connection was
//! that short). A calling thread waiting for a reply that another thread of the connection
//! reads looks at its own mailbox the same way, while its connection's last such wait took at
//! most [`SHORT_REPLY_WAIT`] (200 µs): the reader then hands the reply over without waking
//! anybody.
//!
//! Bounds: a spin lasts at most [`SPIN_FOR`]; at most as many threads as the process may run at
//! once ([`std::thread::available_parallelism`]) spin before reading a connection
//! ([`SLOTS`]), and at most four times as many calling threads spin on their mailbox
//! ([`WAITER_SLOTS`]); others block at once. Each look is a system call (`poll` with a zero
//! timeout) or a lock attempt, and each turn gives the CPU away (`sched_yield`), so a spinning
//! thread only takes CPU time no other runnable thread wanted.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How long a thread looks for input before it blocks.
pub(crate) const SPIN_FOR: Duration = Duration::from_micros(50);

/// A calling thread waiting for a reply that another thread reads looks for it first (for up to
/// [`SPIN_FOR`]) while the last such wait on its connection took at most this long. Such a wait
/// includes the turns of the other threads sharing the connection, so it is longer than a
/// reader's; a spin that ends in a sleep costs at most a quarter of such a wait.
pub(crate) const SHORT_REPLY_WAIT: Duration = Duration::from_micros(200);

/// Places for threads spinning at once.
pub(crate) struct Slots {
    taken: AtomicUsize,
    /// How many; 0 until first needed, then `per_cpu` times
    /// [`std::thread::available_parallelism`].
    limit: AtomicUsize,
    per_cpu: usize,
}

/// The process's places for threads about to read a connection: as many as it may run threads
/// at once.
pub(crate) static SLOTS: Slots = Slots::per_cpu(1);

/// The process's places for calling threads waiting for a reply that another thread reads:
/// four per CPU the process may use.
pub(crate) static WAITER_SLOTS: Slots = Slots::per_cpu(4);

impl Slots {
    /// `limit` places.
    #[cfg(test)]
    pub(crate) const fn new(limit: usize) -> Slots {
        Slots {
            taken: AtomicUsize::new(0),
            limit: AtomicUsize::new(limit),
            per_cpu: 1,
        }
    }

    /// `n` places for every CPU the process may use.
    pub(crate) const fn per_cpu(n: usize) -> Slots {
        Slots {
            taken: AtomicUsize::new(0),
            limit: AtomicUsize::new(0),
            per_cpu: n,
        }
    }

    fn limit(&self) -> usize {
        match self.limit.load(Ordering::Relaxed) {
            0 => {
                let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
                let n = cpus * self.per_cpu;
                self.limit.store(n, Ordering::Relaxed);
                n
            }
            n => n,
        }
    }

    /// Looks for input (`ready`) until it comes, `until` passes or [`SPIN_FOR`] has gone by,
    /// yielding the CPU between looks; returns whether it came. Looks not at all (returns
    /// false) if every place is taken.
    pub(crate) fn spin(&self, until: Option<Instant>, ready: impl FnMut() -> bool) -> bool {
        self.spin_for(SPIN_FOR, until, ready)
    }

    /// As [`spin`](Self::spin), for at most `most` rather than [`SPIN_FOR`].
    fn spin_for(
        &self,
        most: Duration,
        until: Option<Instant>,
        mut ready: impl FnMut() -> bool,
    ) -> bool {
        if self.taken.fetch_add(1, Ordering::AcqRel) >= self.limit() {
            self.taken.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        let start = Instant::now();
        let end = until.map_or(start + most, |u| u.min(start + most));
        let came = loop {
            if ready() {
                break true;
            }
            if Instant::now() >= end {
                break false;
            }
            std::thread::yield_now();
        };
        self.taken.fetch_sub(1, Ordering::AcqRel);
        came
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[test]
    fn a_spin_looks_until_input_comes() {
        let slots = Slots::new(1);
        let looks = Cell::new(0);
        // Longer than SPIN_FOR: on a busy machine, each yield may give the CPU away for longer
        // than that.
        let came = slots.spin_for(Duration::from_secs(10), None, || {
            looks.set(looks.get() + 1);
            looks.get() == 3
        });
        assert!(came);
        assert_eq!(looks.get(), 3);
    }

    #[test]
    fn a_spin_without_input_ends_after_spin_for_or_at_its_deadline() {
        let slots = Slots::new(1);
        let t = Instant::now();
        assert!(!slots.spin(None, || false));
        assert!(t.elapsed() >= SPIN_FOR);
        // A deadline already passed: one look, then it gives up.
        let looks = Cell::new(0);
        let past = Instant::now() - Duration::from_millis(1);
        assert!(!slots.spin(Some(past), || {
            looks.set(looks.get() + 1);
            false
        }));
        assert_eq!(looks.get(), 1);
        // Every place is free again.
        assert_eq!(slots.taken.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn with_every_place_taken_a_thread_does_not_spin() {
        let slots = Slots::new(1);
        let inner_looks = Cell::new(0);
        // The one place is taken by the outer spin while its look runs the inner one.
        let outer = slots.spin(None, || {
            let inner = slots.spin(None, || {
                inner_looks.set(inner_looks.get() + 1);
                true
            });
            assert!(!inner, "a second thread spun beyond the limit");
            true
        });
        assert!(outer);
        assert_eq!(inner_looks.get(), 0);
        assert_eq!(slots.taken.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn the_process_has_places_per_cpu_it_may_use() {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(Slots::per_cpu(1).limit(), n);
        assert_eq!(Slots::per_cpu(4).limit(), 4 * n);
    }
}
