//! The settings of one connection, whichever side opened it: timeouts and limits. A client's
//! builder ([`crate::Options`]) and a server's ([`crate::ServerBuilder`]) each hold one, beside
//! the settings only they have; neither can be handed to the other.

use crate::base::limits::{ServerBudget, ThreadBudget, FRAME_OVERHEAD};
use std::sync::Arc;
use std::time::Duration;

/// Largest frame accepted by default.
pub(crate) const DEFAULT_MAX_FRAME: usize = 64 << 20;

/// Timeouts and limits of a connection (the defaults are those of [`crate::Options`]).
#[derive(Clone, Debug)]
pub(crate) struct Config {
    pub(crate) call_timeout: Duration,
    pub(crate) handshake_timeout: Duration,
    pub(crate) max_frame: usize,
    pub(crate) max_workers: usize,
    pub(crate) max_queued: usize,
    /// `None`: twice `max_frame`.
    pub(crate) max_buffered: Option<usize>,
    pub(crate) idle_timeout: Duration,
    /// Set by a server for its connections: the shared part of its memory bound.
    pub(crate) server_budget: Option<Arc<ServerBudget>>,
    /// How async calls and replies to pipelined requests are written together
    /// ([`crate::core::flush`]); changed only by tests.
    pub(crate) batching: crate::core::flush::Windows,
    /// Set by a server for its connections: its budget of pool threads.
    pub(crate) thread_budget: Option<Arc<ThreadBudget>>,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            call_timeout: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(10),
            max_frame: DEFAULT_MAX_FRAME,
            max_workers: 64,
            max_queued: 65_536,
            max_buffered: None,
            idle_timeout: Duration::MAX,
            server_budget: None,
            thread_budget: None,
            batching: crate::core::flush::Windows::default(),
        }
    }
}

impl Config {
    pub(crate) fn set_max_frame(&mut self, bytes: usize) {
        self.max_frame = bytes.clamp(1024, u32::MAX as usize);
    }

    pub(crate) fn set_max_workers(&mut self, n: usize) {
        self.max_workers = n.max(1);
    }

    pub(crate) fn set_max_queued(&mut self, n: usize) {
        self.max_queued = n.clamp(1, u32::MAX as usize);
    }

    /// The stall timeout: a peer that takes none of what we write, or sends part of a frame
    /// and then nothing, for this long is dropped.
    pub(crate) fn write_timeout(&self) -> Duration {
        self.call_timeout.max(Duration::from_secs(1))
    }

    /// The connection's memory bound (see [`crate::Options::max_buffered`]).
    pub(crate) fn buffered_limit(&self) -> usize {
        let one_frame = self.max_frame + FRAME_OVERHEAD;
        self.max_buffered
            .unwrap_or(self.max_frame.saturating_mul(2))
            .max(one_frame)
    }

    /// How often a quiet connection's reader wakes, to apply the stall and idle limits.
    pub(crate) fn reader_tick(&self) -> Duration {
        (self.write_timeout().min(self.idle_timeout) / 4)
            .clamp(Duration::from_millis(50), Duration::from_secs(5))
    }
}
