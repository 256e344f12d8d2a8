//! Writing together: async calls made in a burst, and replies to pipelined requests, go out in
//! few writes, and never later than the flush window, whoever waits or not.

use super::peer::{connect, decode, finish, frame_bytes, Peer, LONG};
use super::pipe::Timeouts;
use super::service;
use crate::base::lock;
use crate::core::config::Config;
use crate::core::connection::Connection;
use crate::core::flush::Windows;
use crate::wire::Kind;
use std::time::{Duration, Instant};

/// A configuration whose batching windows are `burst` and `flush_after`.
fn batching(burst: Duration, flush_after: Duration) -> Config {
    Config {
        batching: Windows { burst, flush_after },
        ..Config::default()
    }
}

#[test]
fn async_calls_in_a_burst_go_out_together_in_order() {
    // Every call counts as part of the burst, and the timer never fires first: the batch is
    // written when 64 frames wait, or when a result is waited for.
    let config = batching(LONG, LONG);
    let (svc, _probe) = service();
    let (conn, peer) = connect(&config, svc, Timeouts::Yes);
    let root = conn.root();
    let writes_before = lock(&peer.from_conn.state).writes;
    let n = 10u32;
    let pending: Vec<_> = (0..n)
        .map(|i| root.call_async::<u32, _>("record", (i,)).unwrap())
        .collect();
    // Waiting for a result sends what waits; the peer sees every call, in order.
    assert!(!pending[0].is_ready());
    let mut ids = Vec::new();
    for i in 0..n {
        let f = peer.recv_call("record");
        assert_eq!(decode::<(u32,)>(&f).0, i, "calls out of order");
        ids.push(f.header.id);
    }
    let writes = lock(&peer.from_conn.state).writes - writes_before;
    // The first call of the burst goes at once, the other nine together.
    assert_eq!(writes, 2, "{n} async calls took {writes} writes");
    for (id, i) in ids.iter().zip(0..n) {
        peer.reply(*id, &i);
    }
    for (p, i) in pending.into_iter().zip(0..n) {
        assert_eq!(p.value().unwrap(), i);
    }
    drop(root);
    finish(conn);
}

#[test]
fn a_deferred_async_call_goes_out_without_anyone_waiting_for_it() {
    // Every call counts as part of the burst; the flush window is the real one.
    let config = batching(LONG, crate::core::flush::FLUSH_AFTER);
    let (svc, _probe) = service();
    let (conn, peer) = connect(&config, svc, Timeouts::Yes);
    let root = conn.root();
    let start = Instant::now();
    let first = root.call_async::<u32, _>("record", (1u32,)).unwrap();
    let second = root.call_async::<u32, _>("record", (2u32,)).unwrap();
    // Nobody polls `second`: the connection's flusher sends it.
    assert_eq!(decode::<(u32,)>(&peer.recv_call("record")).0, 1);
    let f = peer.recv_call("record");
    assert_eq!(decode::<(u32,)>(&f).0, 2);
    let took = start.elapsed();
    assert!(
        took < conn.shared.call_timeout / 10,
        "the deferred call went out after {took:?}"
    );
    drop((first, second));
    // A oneway call after deferred ones follows them.
    let _third = root.call_async::<u32, _>("record", (3u32,)).unwrap();
    let _fourth = root.call_async::<u32, _>("record", (4u32,)).unwrap();
    root.call_oneway("record", (5u32,)).unwrap();
    for want in [3u32, 4, 5] {
        let f = peer.recv();
        assert_eq!(decode::<(u32,)>(&f).0, want, "frames out of order");
    }
    drop(root);
    finish(conn);
}

/// Sends `n` calls of `record` (ids 100, 101, ...) in one write, as a pipelining peer does.
fn pipelined(peer: &super::peer::Peer, methods: &[(&str, u32)]) {
    let mut all = Vec::new();
    for (i, (method, arg)) in methods.iter().enumerate() {
        all.extend(frame_bytes(Kind::Call, 100 + i as u64, 0, method, &(*arg,)));
    }
    peer.to_conn.write_all(&all).unwrap();
}

#[test]
fn replies_to_pipelined_requests_go_out_together() {
    // The replies wait for the last request's, or (those of requests that finish after it,
    // on other threads) for a timer of a second.
    let config = batching(Duration::ZERO, Duration::from_secs(1));
    let (svc, _probe) = service();
    let (conn, peer) = connect(&config, svc, Timeouts::Yes);
    let n = 10u32;
    let writes_before = lock(&peer.from_conn.state).writes;
    let calls: Vec<(&str, u32)> = (0..n).map(|i| ("record", i)).collect();
    pipelined(&peer, &calls);
    let mut got = Vec::new();
    for _ in 0..n {
        let f = peer.recv();
        assert_eq!(f.header.kind, Kind::Reply);
        assert_eq!(
            decode::<u32>(&f) as u64 + 100,
            f.header.id,
            "a reply mixed up"
        );
        got.push(f.header.id);
    }
    got.sort_unstable();
    assert_eq!(got, (100..100 + n as u64).collect::<Vec<_>>());
    let writes = lock(&peer.from_conn.state).writes - writes_before;
    assert!(
        writes <= 3,
        "{n} replies to a pipeline took {writes} writes"
    );
    finish(conn);
}

/// Pipelines a fast `record` and a `block`: the reply to `record` must go out while `block`
/// still runs (waiting for the test), then `block`'s once the test lets it return.
fn reply_not_held_up_by_a_slow_handler(conn: Connection, peer: &Peer, probe: &super::Probe) {
    pipelined(peer, &[("record", 7), ("block", 8)]);
    let f = peer.recv();
    assert_eq!((f.header.kind, f.header.id), (Kind::Reply, 100));
    assert_eq!(decode::<u32>(&f), 7);
    let started = std::iter::from_fn(|| probe.events.recv_timeout(LONG).ok())
        .any(|e| matches!(e, super::Event::Started(8, _)));
    assert!(started, "`block` never started");
    probe.gate.send(()).unwrap();
    let f = peer.recv();
    assert_eq!((f.header.id, decode::<u32>(&f)), (101, 8));
    finish(conn);
}

#[test]
fn a_reply_waiting_for_the_next_ones_is_not_held_up_by_a_slow_handler() {
    // The real flush window: the reply to `record` goes out while `block` still runs.
    let (svc, probe) = service();
    let (conn, peer) = connect(&Config::default(), svc, Timeouts::Yes);
    reply_not_held_up_by_a_slow_handler(conn, &peer, &probe);
}

#[test]
fn with_a_thread_watching_a_reply_waiting_for_the_next_ones_is_not_held_up_by_a_slow_handler() {
    // A reply deferred while a pool thread watches arms no timer: the watcher has it written
    // when it next looks, or whoever reads next writes it before waiting for input.
    let (svc, probe) = service();
    let (conn, peer) = connect(&Config::default(), svc, Timeouts::Yes);
    peer.call(1, 0, "record", &(1u32,));
    assert_eq!(peer.recv_reply::<u32>(1), 1);
    let until = Instant::now() + LONG;
    while !crate::core::dispatch::watched(&conn.shared) {
        assert!(Instant::now() < until, "no pool thread watches");
        std::thread::yield_now();
    }
    reply_not_held_up_by_a_slow_handler(conn, &peer, &probe);
}

#[test]
fn a_reply_left_to_a_watcher_that_looks_seldom_makes_it_look_often_again() {
    // A watcher looking every HELD_POLL_MAX has such a reply written by the flusher; its next
    // look goes back to every HELD_POLL, for the replies that may follow.
    let (svc, _probe) = service();
    let (conn, peer) = connect(&Config::default(), svc, Timeouts::Yes);
    let mut id = super::pool::back_off_watcher(&conn, &peer, 1);
    let (_, resets) = crate::core::dispatch::held_poll(&conn.shared);
    let until = Instant::now() + LONG;
    // Tried again if the watcher happened to be between two looks when the reply was left.
    while crate::core::dispatch::held_poll(&conn.shared).1 == resets {
        assert!(
            Instant::now() < until,
            "the watcher never looked often again"
        );
        let mut all = Vec::new();
        for i in 0..2 {
            all.extend(frame_bytes(Kind::Call, id + i, 0, "record", &(i as u32,)));
        }
        peer.to_conn.write_all(&all).unwrap();
        // The two may run on two threads: their replies in either order.
        let mut got: Vec<(u64, u32)> = (0..2)
            .map(|_| {
                let f = peer.recv();
                assert_eq!(f.header.kind, Kind::Reply);
                (f.header.id, decode(&f))
            })
            .collect();
        got.sort();
        assert_eq!(got, [(id, 0), (id + 1, 1)]);
        id += 2;
        std::thread::sleep(2 * crate::core::dispatch::HELD_POLL_MAX);
    }
    finish(conn);
}
