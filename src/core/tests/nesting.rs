//! Requests nested in a waiting synchronous call run on the calling thread, in arrival order;
//! so chains of callbacks between two connections need no thread beyond the two callers.

use super::peer::{connect, finish, LONG};
use super::pipe::{self, Pipe, Timeouts};
use super::{service, Event};
use crate::base::threads::ThreadSet;
use crate::core::config::Config;
use crate::core::connection::Connection;
use crate::core::service::{Context, Service};
use crate::error::Error;
use std::sync::{Arc, Mutex};
use std::thread::{self, ThreadId};

#[test]
fn requests_nested_in_a_waiting_call_run_on_the_calling_thread_in_arrival_order() {
    for timeouts in [Timeouts::Yes, Timeouts::No] {
        let (svc, events) = service();
        let (conn, peer) = connect(&Config::default(), svc, timeouts);
        let (tx, rx) = crossbeam_channel::bounded(1);
        let root = conn.root();
        let handle = thread::spawn(move || {
            let _ = tx.send(root.call_timeout::<u32, _>("outer", (), LONG));
        });
        let caller = handle.thread().id();
        let outer = peer.recv_call("outer").header.id;
        for n in 1..=5u32 {
            peer.call(100 + n as u64, outer, "record", &(n,));
        }
        for n in 1..=5u32 {
            assert_eq!(events.next(), Event::Started(n, caller), "{timeouts:?}");
            assert_eq!(peer.recv_reply::<u32>(100 + n as u64), n);
        }
        // Not nested: a pool thread runs it.
        peer.call(200, 0, "record", &(9,));
        match events.next() {
            Event::Started(9, t) => assert_ne!(t, caller, "{timeouts:?}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(peer.recv_reply::<u32>(200), 9);
        peer.reply(outer, &42u32);
        assert_eq!(rx.recv_timeout(LONG).unwrap().unwrap(), 42);
        handle.join().unwrap();
        finish(conn);
    }
}

/// A service that calls back into its peer's `down(n - 1)` until `n` is 0, recording which
/// thread ran each level.
fn downward(seen: Arc<Mutex<Vec<(u32, ThreadId)>>>) -> Service {
    Service::new("down").method_with_context("down", move |cx: &Context, n: u32| {
        seen.lock().unwrap().push((n, thread::current().id()));
        if n == 0 {
            return Ok::<u32, Error>(0);
        }
        cx.peer_root()
            .call::<u32, _>("down", (n - 1,))
            .map(|v| v + 1)
    })
}

#[test]
fn callbacks_ten_deep_between_two_connections_run_on_the_two_calling_threads_only() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (a_to_b, b_to_a) = (Pipe::new(1 << 20), Pipe::new(1 << 20));
    let b_side = pipe::transport(a_to_b.clone(), b_to_a.clone(), Timeouts::Yes);
    let b_service = downward(seen.clone());
    // Both handshakes wait for the other's hello: establish B on a thread of its own.
    let b = thread::spawn(move || {
        Connection::establish(b_side, &Config::default(), b_service, ThreadSet::new())
    });
    let a_side = pipe::transport(b_to_a, a_to_b, Timeouts::Yes);
    let a = Connection::establish(
        a_side,
        &Config::default(),
        downward(seen.clone()),
        ThreadSet::new(),
    )
    .unwrap();
    let b = b.join().unwrap().unwrap();

    assert_eq!(a.root().call::<u32, _>("down", (10,)).unwrap(), 10);
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 11);
    let me = thread::current().id();
    let b_thread = seen[0].1;
    assert_ne!(b_thread, me);
    for (i, &(n, t)) in seen.iter().enumerate() {
        assert_eq!(n, 10 - i as u32);
        // Even levels ran on B (its first handler's thread), odd ones on A's calling thread.
        assert_eq!(t, if n % 2 == 0 { b_thread } else { me }, "level {n}");
    }
    finish(a);
    assert!(b.wait_closed_timeout(LONG), "B did not see A leave");
    finish(b);
}
