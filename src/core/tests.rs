//! Unit tests of the connection core ([`crate::core::connection`], [`crate::core::dispatch`])
//! over an in-memory transport: no sockets and no sleeps. Where a thread must be involved,
//! tests wait on conditions (a channel, the pipe's state) under a bound that only a broken
//! connection reaches ([`peer::LONG`]).
//!
//! Most tests play the peer themselves with raw frames ([`peer`]), which fixes what arrives in
//! which order and shows every byte the connection sends; some call `route`, `wait` and
//! `abandon` directly.

mod batching;
mod closing;
mod nesting;
mod peer;
mod pipe;
mod pool;
mod routing;
mod writer;

use crate::core::service::Service;
use crossbeam_channel::{Receiver, Sender};
use std::thread::{self, ThreadId};

/// What the handlers of [`service`] tell the test.
#[derive(Debug, PartialEq, Eq)]
enum Event {
    /// Handler `n` started, on this thread.
    Started(u32, ThreadId),
    /// Handler `n` is about to return.
    Returning(u32),
}

/// The test's side of [`service`]: the handlers' events, and the gate `block` waits for.
struct Probe {
    events: Receiver<Event>,
    /// Each `()` sent lets one waiting `block` through; dropping it lets all through.
    gate: Sender<()>,
}

impl Probe {
    /// The next event (within [`peer::LONG`]).
    fn next(&self) -> Event {
        self.events
            .recv_timeout(peer::LONG)
            .expect("a handler event")
    }
}

/// The service of the connection under test:
///
/// * `noop()`;
/// * `whoami()`: the id of the thread running it, as text;
/// * `record(n)`: reports that it started, returns `n`;
/// * `block(n)`: reports that it started, waits for the probe's gate, reports that it returns,
///   returns `n`.
fn service() -> (Service, Probe) {
    let (events, events_rx) = crossbeam_channel::unbounded();
    let (gate, gate_rx) = crossbeam_channel::unbounded::<()>();
    let started = events.clone();
    let svc = Service::new("core-test")
        .method("noop", || {})
        .method("whoami", || format!("{:?}", thread::current().id()))
        .method("record", move |n: u32| {
            let _ = started.send(Event::Started(n, thread::current().id()));
            n
        })
        .method("block", move |n: u32| {
            let _ = events.send(Event::Started(n, thread::current().id()));
            let _ = gate_rx.recv_timeout(peer::LONG);
            let _ = events.send(Event::Returning(n));
            n
        });
    (
        svc,
        Probe {
            events: events_rx,
            gate,
        },
    )
}
