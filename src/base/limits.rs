//! Bounds on what a peer can make this side spend: bytes of its data held in memory, and
//! threads.
//!
//! # Memory: one rule for every path
//!
//! Every frame read from a peer is *charged* to its connection's [`Budget`] when its length
//! prefix arrives, before a byte of its body is allocated, and the charge is returned when the
//! frame is dropped: after its handler ran, after its reply was decoded, after it was found to
//! be a late reply. So a frame being read, a request queued for a worker, a request nested in a
//! waiting call, a request running in a handler and a reply not yet taken by its caller all
//! count, whichever thread read them. A frame costs its length plus [`FRAME_OVERHEAD`] (what
//! holding it costs beyond its bytes), so a flood of tiny frames is bounded too.
//!
//! A connection may hold at most its own limit ([`Options::max_buffered`]). Connections of one
//! server also share a [`ServerBudget`]: each may always hold [`FREE_SHARE`], and what any of
//! them holds beyond that comes out of the server's total
//! ([`ServerBuilder::max_buffered_total`]). A frame that would exceed either bound closes its
//! connection, with a warning naming the limit; the other connections carry on. So a server
//! never holds more than `max_buffered_total + max_connections × FREE_SHARE` bytes of its
//! clients' data, nor more than `max_buffered` for one client, and a client that makes small
//! calls is never refused because others hold large ones.
//!
//! [`Options::max_buffered`]: crate::Options::max_buffered
//! [`ServerBuilder::max_buffered_total`]: crate::ServerBuilder::max_buffered_total
//!
//! # Threads
//!
//! A connection always has two threads of its own: one reads it, one runs a request (a quiet
//! pool keeps both). Every further thread of a server's connection pools comes out of the
//! server's [`ThreadBudget`]; when it is used up, requests wait in their connection's queue for
//! a thread of that connection to finish, and a connection never waits for another's. Clients
//! have no shared thread budget (their threads are bounded per connection by `max_workers`).

use crate::base::lock;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What holding one frame costs beyond its bytes (the frame's bookkeeping, its queue slot, the
/// allocator's overhead), charged with every frame.
pub(crate) const FRAME_OVERHEAD: usize = 512;

/// Bytes each connection of a server may hold without drawing on the server's shared total.
pub(crate) const FREE_SHARE: usize = 1 << 20;

/// The shared part of a server's memory bound (see the module docs).
#[derive(Debug)]
pub(crate) struct ServerBudget {
    limit: usize,
    held: AtomicUsize,
}

impl ServerBudget {
    pub(crate) fn new(limit: usize) -> Arc<ServerBudget> {
        Arc::new(ServerBudget {
            limit,
            held: AtomicUsize::new(0),
        })
    }

    /// Bytes held beyond the connections' free shares.
    #[cfg(test)]
    pub(crate) fn held(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }
}

/// One connection's memory bound (see the module docs).
#[derive(Debug)]
pub(crate) struct Budget {
    limit: usize,
    held: Mutex<usize>,
    server: Option<Arc<ServerBudget>>,
}

/// Why a frame was refused.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Over {
    /// The connection's own limit.
    Connection { held: usize, limit: usize },
    /// The server's shared total.
    Server { held: usize, limit: usize },
}

impl std::fmt::Display for Over {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Over::Connection { held, limit } => write!(
                f,
                "the peer sent more data than this side holds for one connection: {held} bytes \
                 not yet consumed, over the limit of {limit} (Options::max_buffered)"
            ),
            Over::Server { held, limit } => write!(
                f,
                "the server holds {held} bytes of its clients' data beyond their free shares, \
                 its limit (ServerBuilder::max_buffered_total) of {limit}; this connection \
                 asked for more"
            ),
        }
    }
}

impl Budget {
    pub(crate) fn new(limit: usize, server: Option<Arc<ServerBudget>>) -> Arc<Budget> {
        Arc::new(Budget {
            limit,
            held: Mutex::new(0),
            server,
        })
    }

    /// Charges `bytes` (a frame's length plus [`FRAME_OVERHEAD`]); the charge is returned when
    /// the result is dropped.
    pub(crate) fn charge(self: &Arc<Self>, bytes: usize) -> Result<Charge, Over> {
        let mut held = lock(&self.held);
        let after = held.saturating_add(bytes);
        if after > self.limit {
            return Err(Over::Connection {
                held: after,
                limit: self.limit,
            });
        }
        if let Some(server) = &self.server {
            let extra = beyond_share(after) - beyond_share(*held);
            if extra > 0 {
                // Added only if it fits, so no other connection ever sees a total that was
                // refused.
                server
                    .held
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |total| {
                        total.checked_add(extra).filter(|&t| t <= server.limit)
                    })
                    .map_err(|total| Over::Server {
                        held: total.saturating_add(extra),
                        limit: server.limit,
                    })?;
            }
        }
        *held = after;
        Ok(Charge {
            budget: self.clone(),
            bytes,
        })
    }

    fn give_back(&self, bytes: usize) {
        let mut held = lock(&self.held);
        debug_assert!(*held >= bytes, "a charge is returned once");
        let after = held.saturating_sub(bytes);
        if let Some(server) = &self.server {
            let freed = beyond_share(*held) - beyond_share(after);
            if freed > 0 {
                server.held.fetch_sub(freed, Ordering::AcqRel);
            }
        }
        *held = after;
    }

    /// Bytes this connection holds now.
    #[cfg(test)]
    pub(crate) fn held(&self) -> usize {
        *lock(&self.held)
    }
}

fn beyond_share(held: usize) -> usize {
    held.saturating_sub(FREE_SHARE)
}

/// Bytes charged to a [`Budget`], returned on drop.
#[derive(Debug)]
pub(crate) struct Charge {
    budget: Arc<Budget>,
    bytes: usize,
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.budget.give_back(self.bytes);
    }
}

/// When a connection last moved bytes either way (a frame read or written in part counts),
/// for its idle limit and a server's slot policy.
#[derive(Debug)]
pub(crate) struct Activity {
    born: Instant,
    /// Milliseconds after `born`.
    last: AtomicU64,
}

impl Activity {
    pub(crate) fn new() -> Arc<Activity> {
        Arc::new(Activity {
            born: Instant::now(),
            last: AtomicU64::new(0),
        })
    }

    /// Bytes moved now.
    pub(crate) fn touch(&self) {
        let ms = self.born.elapsed().as_millis() as u64;
        self.last.store(ms, Ordering::Relaxed);
    }

    /// How long since bytes last moved.
    pub(crate) fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last.load(Ordering::Relaxed));
        self.born.elapsed().saturating_sub(last)
    }
}

/// A server's budget of pool threads beyond each connection's first two (see the module docs).
#[derive(Debug)]
pub(crate) struct ThreadBudget {
    limit: usize,
    used: AtomicUsize,
}

impl ThreadBudget {
    pub(crate) fn new(limit: usize) -> Arc<ThreadBudget> {
        Arc::new(ThreadBudget {
            limit,
            used: AtomicUsize::new(0),
        })
    }

    /// Takes one thread from the budget, if any is left.
    pub(crate) fn try_take(&self) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                (u < self.limit).then_some(u + 1)
            })
            .is_ok()
    }

    /// Returns a thread taken with [`try_take`](Self::try_take).
    pub(crate) fn give(&self) {
        let before = self.used.fetch_sub(1, Ordering::AcqRel);
        debug_assert!(before > 0, "a thread is returned once");
    }

    /// Threads taken now.
    #[cfg(test)]
    pub(crate) fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_cannot_hold_more_than_its_limit() {
        let b = Budget::new(1000, None);
        let a = b.charge(600).unwrap();
        assert_eq!(
            b.charge(500).unwrap_err(),
            Over::Connection {
                held: 1100,
                limit: 1000
            }
        );
        let c = b.charge(400).unwrap();
        assert_eq!(b.held(), 1000);
        drop(a);
        assert_eq!(b.held(), 400);
        drop(c);
        assert_eq!(b.held(), 0);
    }

    #[test]
    fn connections_share_the_server_total_beyond_their_free_share() {
        let server = ServerBudget::new(3 * FREE_SHARE);
        let big = Budget::new(usize::MAX, Some(server.clone()));
        let other = Budget::new(usize::MAX, Some(server.clone()));
        // Within the free share: the server total is untouched.
        let small = other.charge(FREE_SHARE).unwrap();
        assert_eq!(server.held(), 0);
        // Beyond it: drawn from the total, until that is used up.
        let a = big.charge(FREE_SHARE + 3 * FREE_SHARE).unwrap();
        assert_eq!(server.held(), 3 * FREE_SHARE);
        assert!(matches!(big.charge(1), Err(Over::Server { .. })));
        assert!(matches!(other.charge(1), Err(Over::Server { .. })));
        // A refused charge leaves nothing behind.
        assert_eq!(server.held(), 3 * FREE_SHARE);
        assert_eq!(other.held(), FREE_SHARE);
        drop(small);
        // A connection under its free share is never refused for the total.
        let fresh = Budget::new(usize::MAX, Some(server.clone()));
        let f = fresh.charge(FREE_SHARE).unwrap();
        drop(a);
        assert_eq!(server.held(), 0);
        drop(f);
        assert_eq!(big.held() + other.held() + fresh.held(), 0);
    }

    #[test]
    fn thread_budget_hands_out_at_most_its_limit() {
        let t = ThreadBudget::new(2);
        assert!(t.try_take());
        assert!(t.try_take());
        assert!(!t.try_take());
        t.give();
        assert!(t.try_take());
        assert_eq!(t.used(), 2);
    }
}
