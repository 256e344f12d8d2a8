//! The pool: requests start in arrival order, at most `max_workers` handlers run at once,
//! the rest wait in a queue of at most `max_queued`, whoever reads them.

use super::peer::{connect, finish, frame_bytes, Peer, LONG};
use super::pipe::Timeouts;
use super::{service, Event};
use crate::base::lock;
use crate::core::config::Config;
use crate::core::connection::Connection;
use crate::core::dispatch::{self, HELD_POLL, HELD_POLL_MAX};
use crate::core::service::Service;
use crate::error::Error;
use crate::wire::Kind;
use std::thread::{self, ThreadId};
use std::time::Duration;

fn one_worker(max_queued: usize) -> Config {
    let mut c = Config::default();
    c.set_max_workers(1);
    c.set_max_queued(max_queued);
    c
}

/// Starts an async call of ours and has the peer take its request; returns the call and the
/// request's id. Its reply, sent after other frames, proves that the connection routed them.
fn probe(conn: &Connection, peer: &Peer) -> (crate::core::object::AsyncResult<()>, u64) {
    let call = conn.root().call_async::<(), _>("probe", ()).unwrap();
    let id = peer.recv_call("probe").header.id;
    (call, id)
}

fn started(e: Event) -> (u32, ThreadId) {
    match e {
        Event::Started(n, t) => (n, t),
        other => panic!("expected a start, got {other:?}"),
    }
}

#[test]
fn with_one_worker_requests_run_one_at_a_time_in_arrival_order() {
    let (svc, probe_events) = service();
    let (conn, peer) = connect(&one_worker(100), svc, Timeouts::No);
    for n in 0..6 {
        peer.call(10 + n as u64, 0, "block", &(n,));
    }
    for n in 0..6 {
        assert_eq!(started(probe_events.next()).0, n, "out of order");
        probe_events.gate.send(()).unwrap();
        assert_eq!(probe_events.next(), Event::Returning(n));
    }
    for n in 0..6u32 {
        assert_eq!(peer.recv_reply::<u32>(10 + n as u64), n);
    }
    drop(probe_events);
    finish(conn);
}

#[test]
fn with_max_workers_1_a_second_request_waits_in_the_queue_until_the_first_returns() {
    let (svc, events) = service();
    let (conn, peer) = connect(&one_worker(100), svc, Timeouts::No);
    let (call, probe_id) = probe(&conn, &peer);
    peer.call(1, 0, "block", &(1,));
    peer.call(2, 0, "block", &(2,));
    peer.reply(probe_id, &());
    call.value_timeout(LONG).unwrap();
    // Both requests were routed: the first runs, the second waits in the queue.
    assert_eq!(started(events.next()).0, 1);
    assert!(
        dispatch::has_queued(&conn.shared),
        "the second request is not queued"
    );
    assert!(
        events.events.is_empty(),
        "the second request started: {:?}",
        events.events.try_recv()
    );
    events.gate.send(()).unwrap();
    assert_eq!(events.next(), Event::Returning(1));
    assert_eq!(started(events.next()).0, 2);
    events.gate.send(()).unwrap();
    assert_eq!(events.next(), Event::Returning(2));
    assert_eq!(peer.recv_reply::<u32>(1), 1);
    assert_eq!(peer.recv_reply::<u32>(2), 2);
    drop(events);
    finish(conn);
}

#[test]
fn more_than_max_queued_requests_read_by_the_pool_close_the_connection_naming_the_limit() {
    let (svc, events) = service();
    let (conn, peer) = connect(&one_worker(2), svc, Timeouts::No);
    let (call, probe_id) = probe(&conn, &peer);
    // One runs, two wait: at the limit, still open.
    for n in 1..=3 {
        peer.call(n, 0, "block", &(n as u32,));
    }
    peer.reply(probe_id, &());
    call.value_timeout(LONG).unwrap();
    assert!(!conn.is_closed());
    assert_eq!(started(events.next()).0, 1);
    // One more is over it.
    peer.call(4, 0, "block", &(4,));
    assert!(conn.wait_closed_timeout(LONG));
    let reason = conn.close_reason().unwrap();
    assert!(
        reason.contains("more than 2 requests waiting for a worker (all 1 busy)"),
        "{reason}"
    );
    drop(events);
    finish(conn);
}

/// Has the connection make a synchronous call from a thread of its own, and makes that thread
/// hold the reader while it waits; returns the thread's id, the call's id, and where its
/// result arrives.
fn caller_reading(
    conn: &Connection,
    peer: &Peer,
    timeout: Duration,
) -> (
    ThreadId,
    u64,
    crossbeam_channel::Receiver<Result<(), Error>>,
) {
    let (tx, rx) = crossbeam_channel::bounded(1);
    let root = conn.root();
    let handle = thread::spawn(move || {
        let _ = tx.send(root.call_timeout::<(), _>("outer", (), timeout));
    });
    let caller = handle.thread().id();
    let call_id = peer.recv_call("outer").header.id;
    peer.hand_reader_to(caller, call_id);
    (caller, call_id, rx)
}

#[test]
fn more_than_max_queued_requests_read_by_a_calling_thread_close_the_connection_naming_the_limit() {
    let (svc, events) = service();
    let (conn, peer) = connect(&one_worker(2), svc, Timeouts::Yes);
    let (caller, _, result) = caller_reading(&conn, &peer, LONG);
    assert_eq!(peer.reading_thread(), caller);
    // One running and two waiting is the limit. Five overflow it whatever the timing, and the
    // caller reads them all: it holds the reader until its own reply comes.
    let burst: Vec<u8> = (1..=5)
        .flat_map(|n| frame_bytes(Kind::Call, n, 0, "block", &(n as u32,)))
        .collect();
    peer.to_conn.write_all(&burst).unwrap();
    match result.recv_timeout(LONG).unwrap() {
        Err(Error::Closed { reason }) => assert!(
            reason.contains("more than 2 requests waiting for a worker (all 1 busy)"),
            "{reason}"
        ),
        other => panic!("the call should fail with the close: {other:?}"),
    }
    assert!(conn.is_closed());
    drop(events);
    finish(conn);
}

#[test]
fn a_burst_that_free_workers_take_does_not_overflow_the_queue_when_a_calling_thread_reads_it() {
    let mut config = Config::default();
    config.set_max_queued(1);
    let (svc, events) = service();
    let (conn, peer) = connect(&config, svc, Timeouts::Yes);
    let (caller, call_id, result) = caller_reading(&conn, &peer, LONG);
    let (call, probe_id) = probe(&conn, &peer);
    assert_eq!(peer.reading_thread(), caller);
    // 64 workers are free: three requests need no queue at all. One write, so that the caller
    // reads them in one go.
    let mut burst: Vec<u8> = (1..=3)
        .flat_map(|n| frame_bytes(Kind::Call, n, 0, "record", &(n as u32,)))
        .collect();
    burst.extend(frame_bytes(Kind::Reply, probe_id, 0, "", &()));
    peer.to_conn.write_all(&burst).unwrap();
    let probed = call.value_timeout(LONG);
    assert!(
        probed.is_ok(),
        "closed: {:?}",
        conn.close_reason().unwrap_or_default()
    );
    for _ in 1..=3 {
        started(events.next());
    }
    peer.reply(call_id, &());
    result.recv_timeout(LONG).unwrap().unwrap();
    finish(conn);
}

#[test]
fn while_a_calling_thread_reads_at_most_max_workers_handlers_run() {
    let (svc, events) = service();
    let (conn, peer) = connect(&one_worker(100), svc, Timeouts::Yes);
    let (caller, call_id, result) = caller_reading(&conn, &peer, LONG);
    let (call, probe_id) = probe(&conn, &peer);
    assert_eq!(peer.reading_thread(), caller);
    peer.call(1, 0, "block", &(1,));
    peer.call(2, 0, "block", &(2,));
    peer.reply(probe_id, &());
    call.value_timeout(LONG).unwrap();
    let (first, _) = started(events.next());
    // Both were routed; the other must wait for the first to return (waiting for an event that
    // must not come is the only way to see it).
    let second = events.events.recv_timeout(Duration::from_millis(300));
    assert!(
        second.is_err(),
        "two handlers run with max_workers(1): {second:?}"
    );
    assert!(
        dispatch::has_queued(&conn.shared),
        "handler {first} runs, the other is not queued"
    );
    drop(events);
    peer.reply(call_id, &());
    result.recv_timeout(LONG).unwrap().unwrap();
    finish(conn);
}

#[test]
fn a_calling_thread_reading_another_s_large_frame_still_returns_at_its_deadline() {
    // The peer sends a 3 MiB request steadily, a little every few milliseconds, so the
    // caller's reads never time out; its deadline must still end its call on time, with the
    // rest of the frame left to the pool.
    let (svc, events) = service();
    let (conn, peer) = connect(&Config::default(), svc, Timeouts::Yes);
    let timeout = Duration::from_secs(1);
    let start = std::time::Instant::now();
    let (caller, _, result) = caller_reading(&conn, &peer, timeout);
    assert!(
        start.elapsed() < timeout / 2,
        "handing the reader to the caller took {:?}: the call would time out before the \
         frame starts, proving nothing",
        start.elapsed()
    );
    let big = frame_bytes(Kind::Call, 99, 0, "noop", &vec![0u8; 3 << 20]);
    let mut outcome = None;
    for chunk in big.chunks(2048) {
        peer.to_conn.write_all(chunk).unwrap();
        if let Ok(r) = result.try_recv() {
            outcome = Some((r, start.elapsed()));
            break;
        }
        thread::sleep(Duration::from_millis(2));
    }
    let (r, took) = match outcome {
        Some(o) => o,
        None => (result.recv_timeout(LONG).unwrap(), start.elapsed()),
    };
    assert!(
        matches!(r, Err(Error::Timeout(crate::error::Timeout::Call { .. }))),
        "{r:?}"
    );
    assert!(
        took < timeout.mul_f64(1.5),
        "a call with a timeout of {timeout:?} returned after {took:?}, while another \
         thread's frame was arriving"
    );
    assert_ne!(
        peer.reading_thread(),
        caller,
        "the pool did not take the reader"
    );
    drop(events);
    finish(conn);
}

#[test]
fn a_panic_in_the_drop_of_an_object_the_peer_releases_costs_the_connection_no_worker() {
    // With one worker, a pool thread that died in user Drop code without counting its request
    // done would leave every later request waiting for a worker forever.
    struct Boom;
    impl Drop for Boom {
        fn drop(&mut self) {
            panic!("a user Drop that panics (expected by this test)");
        }
    }
    let svc = Service::new("s").method("noop", || {}).method("make", || {
        let boom = Boom;
        Service::new("obj").method("touch", move || {
            let _ = &boom;
        })
    });
    let (conn, peer) = connect(&one_worker(10), svc, Timeouts::No);
    peer.call(1, 0, "make", &());
    let reply: std::collections::BTreeMap<String, u64> = peer.recv_reply(1);
    let id = *reply.values().next().expect("an object reference");
    peer.send(Kind::Release, 2, 0, "", &vec![(id, 1u64)])
        .unwrap();
    for n in 3..6 {
        peer.call(n, 0, "noop", &());
        peer.recv_reply::<()>(n);
    }
    assert!(!conn.is_closed());
    finish(conn);
}

#[test]
fn a_reader_left_free_during_a_long_write_waits_for_its_writer_until_input_comes() {
    let (svc, probe) = service();
    let (conn, peer) = connect(&Config::default(), svc, Timeouts::Yes);
    // 64 KiB of room towards the peer, which reads nothing for now: a 512 KiB call waits for
    // room, holding the writer.
    peer.from_conn.set_capacity(64 << 10);
    let big = crate::wire::codec::Bytes::from(vec![7u8; 512 << 10]);
    let c = conn.clone();
    let writing = thread::spawn(move || c.root().call::<usize, _>("sink", (big,)));
    assert!(
        peer.from_conn.wait_until(LONG, |st| st.blocked_writers > 0),
        "the call never waited for room"
    );
    // The pool thread reading takes the request and runs it, putting the reader back lazily;
    // the handler blocks, so that thread does not come back for it.
    peer.call(10, 0, "block", &(1u32,));
    assert_eq!(started(probe.next()).0, 1);
    // A watcher would take a reader unused for GRACE (0.5 ms), but a frame is being written
    // and nothing waits to be read: the reader stays free, for the writer to come back to.
    // Forty grace periods: enough for a broken rule to show, whatever the scheduling.
    thread::sleep(Duration::from_millis(20));
    assert!(
        dispatch::reader_is_free(&conn.shared),
        "a watcher took the reader"
    );
    assert!(lock(&peer.to_conn.state).blocked_reader.is_none());
    // Input arrives: it is read and run although the writer is still stuck.
    peer.call(11, 0, "record", &(2u32,));
    assert_eq!(started(probe.next()).0, 2);
    // The peer reads the call and answers it; the blocked handler is let go.
    peer.from_conn.set_capacity(4 << 20);
    let call = peer.recv_call("sink");
    peer.reply(call.header.id, &(512usize << 10));
    assert_eq!(writing.join().unwrap().unwrap(), 512 << 10);
    drop(probe);
    finish(conn);
}

/// Has the peer make requests one at a time until the watcher waits [`HELD_POLL_MAX`]
/// between its looks: the pool thread reading puts the reader back lazily to run each request
/// and takes it again at once, so the watcher's looks find it held and nothing to do. Returns
/// the next free request id.
pub(super) fn back_off_watcher(conn: &Connection, peer: &Peer, mut id: u64) -> u64 {
    let until = std::time::Instant::now() + LONG;
    loop {
        let (wait, _) = dispatch::held_poll(&conn.shared);
        if wait >= HELD_POLL_MAX {
            return id;
        }
        assert!(
            std::time::Instant::now() < until,
            "the watcher still looks every {wait:?}"
        );
        peer.call(id, 0, "noop", &());
        peer.recv_reply::<()>(id);
        id += 1;
        thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn a_watcher_that_keeps_finding_the_reader_held_looks_half_as_often_each_time_down_to_a_floor() {
    let (svc, _probe) = service();
    let (conn, peer) = connect(&Config::default(), svc, Timeouts::Yes);
    assert_eq!(dispatch::held_poll(&conn.shared).0, HELD_POLL);
    let mut id = back_off_watcher(&conn, &peer, 1);
    // More of the same, for several of its looks: the wait grows no further.
    let until = std::time::Instant::now() + 4 * HELD_POLL_MAX;
    while std::time::Instant::now() < until {
        peer.call(id, 0, "noop", &());
        peer.recv_reply::<()>(id);
        id += 1;
        let (wait, _) = dispatch::held_poll(&conn.shared);
        assert!(
            wait <= HELD_POLL_MAX,
            "the watcher waits {wait:?} between looks"
        );
        thread::sleep(Duration::from_millis(1));
    }
    finish(conn);
}

#[test]
fn a_caller_looks_for_its_reply_before_it_parks_only_while_replies_come_within_a_short_wait() {
    use crate::base::spin::SHORT_REPLY_WAIT;
    let (svc, _probe) = service();
    // Pipes cannot time out a read: callers never read, they wait for the pool's thread.
    let (conn, peer) = connect(&Config::default(), svc, Timeouts::No);
    let call = |conn: &Connection| {
        let c = conn.clone();
        thread::spawn(move || c.root().call::<(), _>("noop", ()))
    };
    let answer = |delay: Duration| {
        let t = call(&conn);
        let id = peer.recv_call("noop").header.id;
        thread::sleep(delay);
        peer.reply(id, &());
        t.join().unwrap().unwrap();
    };
    // A reply that takes long: the next caller parks at once.
    answer(10 * SHORT_REPLY_WAIT);
    assert!(
        !conn.shared.callers_spin(),
        "callers still look after a long wait"
    );
    // Replies that come at once: callers look again (some reply is quick, however slow the
    // machine).
    let until = std::time::Instant::now() + LONG;
    while !conn.shared.callers_spin() {
        assert!(
            std::time::Instant::now() < until,
            "callers never looked again"
        );
        answer(Duration::ZERO);
    }
    // And a long one turns it off again.
    answer(10 * SHORT_REPLY_WAIT);
    assert!(!conn.shared.callers_spin());
    finish(conn);
}
