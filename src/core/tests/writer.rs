//! The writer gate: one frame at a time, whole, and a writer that cannot take the gate by its
//! deadline fails with nothing sent.

use super::peer::{connect, decode, finish, Peer, LONG};
use super::pipe::Timeouts;
use super::service;
use crate::base::lock;
use crate::core::config::Config;
use crate::error::{Error, Timeout};
use crate::wire::Kind;
use std::thread;
use std::time::{Duration, Instant};

/// The next frame, which must be a oneway call of `log`; returns its text.
fn logged(peer: &Peer) -> String {
    let f = peer.recv();
    assert_eq!((f.header.kind, f.method()), (Kind::Oneway, "log"));
    decode::<(String,)>(&f).0
}

/// Makes a oneway call of `log` with an 8 KiB text of `fill` that the peer does not take (its
/// pipe holds 1 KiB): the calling thread holds the gate, blocked, until the peer reads. Returns
/// that thread and the text.
fn hold_the_gate(
    conn: &crate::core::connection::Connection,
    peer: &Peer,
    fill: &str,
) -> (thread::JoinHandle<Result<(), Error>>, String) {
    peer.from_conn.set_capacity(1024);
    let big = fill.repeat(8 * 1024);
    let (sent, first) = (big.clone(), conn.root());
    let stuck = thread::spawn(move || first.call_oneway("log", (sent,)));
    assert!(peer
        .from_conn
        .wait_until(LONG, |st| st.is_full() && st.blocked_writers == 1));
    (stuck, big)
}

/// Waits until `n` frames wait with the gate's holder.
fn until_handed_over(conn: &crate::core::connection::Connection, n: usize) {
    let deadline = Instant::now() + LONG;
    while conn.shared.handed_over() < n {
        assert!(Instant::now() < deadline, "frames were not handed over");
        thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn a_writer_that_cannot_take_the_gate_by_its_deadline_gets_a_send_timeout_with_nothing_sent() {
    let (svc, _probe) = service();
    let (conn, peer) = connect(&Config::default(), svc, Timeouts::Yes);
    // The peer stops reading: the pipe fills with the first frame, whose writer waits for room
    // while it holds the gate.
    let (stuck, big) = hold_the_gate(&conn, &peer, "b");
    let root = conn.root();

    let timeout = Duration::from_millis(200);
    let t0 = Instant::now();
    let r = root.call_timeout::<(), _>("second", (), timeout);
    let took = t0.elapsed();
    match r {
        Err(Error::Timeout(Timeout::Send {
            method,
            after,
            partly,
        })) => {
            assert_eq!(
                (method.as_str(), after, partly),
                ("root.second", timeout, false)
            )
        }
        other => panic!("expected a send timeout, got {other:?}"),
    }
    assert!(took >= timeout, "gave up early: {took:?}");
    assert!(
        took < timeout + Duration::from_secs(2),
        "gave up late: {took:?}"
    );

    // The stuck frame goes out whole once the peer reads; nothing of the second call follows
    // it: the next frame is the next call.
    assert_eq!(logged(&peer), big);
    stuck.join().unwrap().unwrap();
    root.call_oneway("log", ("next",)).unwrap();
    assert_eq!(logged(&peer), "next");
    assert!(!conn.is_closed());
    drop(root);
    finish(conn);
}

#[test]
fn frames_of_concurrent_writers_never_interleave() {
    let (svc, _probe) = service();
    let (conn, peer) = connect(&Config::default(), svc, Timeouts::Yes);
    // Each frame goes out in many pieces, so writers overlap if the gate lets them.
    peer.from_conn.set_capacity(256);
    let (writers, frames) = (4, 10);
    let threads: Vec<_> = (0..writers)
        .map(|w| {
            let root = conn.root();
            thread::spawn(move || {
                for i in 0..frames {
                    let text = format!(
                        "{w}:{i}:{}",
                        char::from(b'a' + w as u8).to_string().repeat(3000)
                    );
                    root.call_oneway("log", (text,)).unwrap();
                }
            })
        })
        .collect();
    let mut next = vec![0; writers];
    for _ in 0..writers * frames {
        let text = logged(&peer);
        let mut parts = text.splitn(3, ':');
        let w: usize = parts.next().unwrap().parse().unwrap();
        let i: usize = parts.next().unwrap().parse().unwrap();
        let fill = char::from(b'a' + w as u8).to_string().repeat(3000);
        assert_eq!(
            parts.next().unwrap(),
            fill,
            "frame {i} of writer {w} is mixed"
        );
        // And each thread's frames go out in the order it sent them.
        assert_eq!(i, next[w], "writer {w}'s frames out of order");
        next[w] += 1;
    }
    for t in threads {
        t.join().unwrap();
    }
    finish(conn);
}

#[test]
fn a_frame_cut_short_by_its_deadline_is_finished_whole_before_any_other() {
    let (svc, _probe) = service();
    let (conn, peer) = connect(&Config::default(), svc, Timeouts::Yes);
    peer.from_conn.set_capacity(1024);
    let big = "c".repeat(8 * 1024);
    let root = conn.root();
    let timeout = Duration::from_millis(100);
    match root.call_timeout::<(), _>("log", (big.clone(),), timeout) {
        Err(Error::Timeout(Timeout::Send { partly: true, .. })) => {}
        other => panic!("expected a send timeout in the middle of the frame, got {other:?}"),
    }
    // Another writer waits for the gate, which the connection holds until the rest is sent.
    let (ready, is_ready) = crossbeam_channel::bounded(1);
    let next = root.clone();
    let after = thread::spawn(move || {
        ready.send(()).unwrap();
        next.call_oneway("log", ("after",))
    });
    is_ready.recv_timeout(LONG).unwrap();
    let f = peer.recv();
    assert_eq!((f.header.kind, f.method()), (Kind::Call, "log"));
    assert_eq!(decode::<(String,)>(&f).0, big);
    assert_eq!(logged(&peer), "after");
    after.join().unwrap().unwrap();
    assert!(!conn.is_closed());
    drop(root);
    finish(conn);
}

#[test]
fn replies_finding_the_gate_taken_are_handed_over_and_go_out_whole_in_one_write() {
    let (svc, _probe) = service();
    let (conn, peer) = connect(&Config::default(), svc, Timeouts::Yes);
    // A frame that cannot go out holds the gate.
    let (stuck, big) = hold_the_gate(&conn, &peer, "h");
    let root = conn.root();
    // Requests of the peer are served meanwhile: their replies are handed to the holder, and
    // no worker waits for the gate (the only blocked writer is the holder).
    let n = 10;
    for id in 0..n {
        peer.call(100 + id, 0, "record", &(id as u32,));
    }
    until_handed_over(&conn, n as usize);
    assert_eq!(lock(&peer.from_conn.state).blocked_writers, 1);
    // Once the peer reads, the holder's frame goes out whole (the rest of it in one write),
    // then every reply, whole, all in one more write.
    let writes_before = lock(&peer.from_conn.state).writes;
    peer.from_conn.set_capacity(1 << 20);
    assert_eq!(logged(&peer), big);
    let mut ids = Vec::new();
    for _ in 0..n {
        let f = peer.recv();
        assert_eq!(f.header.kind, Kind::Reply);
        assert_eq!(decode::<u32>(&f) as u64, f.header.id - 100);
        ids.push(f.header.id);
    }
    let mut sorted = ids.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(
        sorted.len(),
        n as usize,
        "a reply is missing or doubled: {ids:?}"
    );
    let writes = lock(&peer.from_conn.state).writes - writes_before;
    assert!(
        writes <= 2,
        "the rest of a frame and {n} handed-over replies took {writes} writes"
    );
    stuck.join().unwrap().unwrap();
    assert_eq!(conn.shared.handed_over(), 0);
    root.call_oneway("log", ("next",)).unwrap();
    assert_eq!(logged(&peer), "next");
    drop(root);
    finish(conn);
}

#[test]
fn replies_handed_over_are_bounded_and_the_rest_wait_for_the_gate() {
    let (svc, _probe) = service();
    let (conn, peer) = connect(&Config::default(), svc, Timeouts::Yes);
    let (stuck, big) = hold_the_gate(&conn, &peer, "w");
    let root = conn.root();
    // More replies than may be handed over: the others' threads wait for the gate, as a
    // peer that never reads must not make this side hold its replies without bound.
    let n: u64 = 100;
    for id in 0..n {
        peer.call(100 + id, 0, "record", &(id as u32,));
    }
    until_handed_over(&conn, super::super::connection::HAND_OVER_FRAMES);
    thread::sleep(Duration::from_millis(50));
    assert_eq!(
        conn.shared.handed_over(),
        super::super::connection::HAND_OVER_FRAMES
    );
    // Everything still goes out, each reply once and whole.
    peer.from_conn.set_capacity(1 << 20);
    assert_eq!(logged(&peer), big);
    let mut ids: Vec<u64> = (0..n)
        .map(|_| {
            let f = peer.recv();
            assert_eq!(decode::<u32>(&f) as u64, f.header.id - 100);
            f.header.id
        })
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, (100..100 + n).collect::<Vec<_>>());
    stuck.join().unwrap().unwrap();
    drop(root);
    finish(conn);
}

#[test]
fn a_call_finding_the_writer_busy_is_handed_over_and_answered() {
    let (svc, _probe) = service();
    let (conn, peer) = connect(&Config::default(), svc, Timeouts::Yes);
    let (stuck, big) = hold_the_gate(&conn, &peer, "s");
    let root = conn.root();
    // The call does not wait for the writer: its frame waits with the holder, and the
    // caller waits for its reply.
    let caller = root.clone();
    let call = thread::spawn(move || caller.call::<u32, _>("echo_u32", (5u32,)));
    until_handed_over(&conn, 1);
    assert_eq!(lock(&peer.from_conn.state).blocked_writers, 1);
    peer.from_conn.set_capacity(1 << 20);
    assert_eq!(logged(&peer), big);
    let f = peer.recv();
    assert_eq!((f.header.kind, f.method()), (Kind::Call, "echo_u32"));
    assert_eq!(decode::<(u32,)>(&f).0, 5);
    peer.reply(f.header.id, &6u32);
    assert_eq!(call.join().unwrap().unwrap(), 6);
    stuck.join().unwrap().unwrap();
    drop(root);
    finish(conn);
}

#[test]
fn a_call_that_times_out_unsent_takes_back_its_own_frame_never_a_reply_with_the_same_id() {
    let (svc, _probe) = service();
    let (conn, peer) = connect(&Config::default(), svc, Timeouts::Yes);
    // The oneway holding the gate is this side's request 1; the call below will be request 2.
    let (stuck, big) = hold_the_gate(&conn, &peer, "i");
    let root = conn.root();
    // The peer's own request 2 (ids are numbered by each side on its own): its reply, with id
    // 2, is handed over first.
    peer.call(2, 0, "record", &(7u32,));
    until_handed_over(&conn, 1);
    let timeout = Duration::from_millis(200);
    match root.call_timeout::<u32, _>("echo_u32", (5u32,), timeout) {
        Err(Error::Timeout(Timeout::Send { partly: false, .. })) => {}
        other => panic!("expected a send timeout with nothing sent, got {other:?}"),
    }
    // The reply stayed; the call was taken back, so the peer gets the reply and then the next
    // frame, not the call.
    assert_eq!(conn.shared.handed_over(), 1);
    peer.from_conn.set_capacity(1 << 20);
    assert_eq!(logged(&peer), big);
    let f = peer.recv();
    assert_eq!((f.header.kind, f.header.id), (Kind::Reply, 2));
    assert_eq!(decode::<u32>(&f), 7);
    stuck.join().unwrap().unwrap();
    root.call_oneway("log", ("next",)).unwrap();
    assert_eq!(logged(&peer), "next");
    drop(root);
    finish(conn);
}

/// A sealed reply frame with `value`.
fn reply_frame(id: u64, value: u32) -> crate::wire::OutFrame {
    let mut out = crate::wire::OutFrame::new(0);
    crate::wire::codec::encode_into(out.payload(), &value).unwrap();
    out.seal(Kind::Reply, id, 0, 0, "").unwrap();
    out
}

#[test]
fn only_a_reply_left_to_the_watcher_and_nobody_writing_counts_as_left_unwritten_and_once() {
    let (svc, _probe) = service();
    // Pipes cannot time out a read: the pool's reading thread waits without ticks, so no other
    // thread asks meanwhile.
    let (conn, peer) = connect(&Config::default(), svc, Timeouts::No);
    let shared = &conn.shared;
    // A reply on its way to a free writer (its thread writes it right after handing it over):
    // nobody is to be asked to write it.
    shared.hand_over_in_transit(reply_frame(1, 1));
    assert!(
        !shared.left_unwritten(),
        "a reply in transit counted as left"
    );
    // A reply left to the watcher: counted, once.
    assert!(shared.leave_to_watcher(reply_frame(2, 2)).is_ok());
    assert!(shared.left_unwritten());
    assert!(!shared.left_unwritten(), "counted twice");
    shared.write_handed(None);
    assert_eq!(peer.recv_reply::<u32>(1), 1);
    assert_eq!(peer.recv_reply::<u32>(2), 2);
    // While a thread holds the gate, it writes what waits before letting the next writer in:
    // not counted either, and it does go out.
    let (stuck, big) = hold_the_gate(&conn, &peer, "c");
    assert!(shared.leave_to_watcher(reply_frame(3, 3)).is_ok());
    assert!(
        !shared.left_unwritten(),
        "counted while the gate's holder will write it"
    );
    peer.from_conn.set_capacity(1 << 20);
    assert_eq!(logged(&peer), big);
    stuck.join().unwrap().unwrap();
    assert_eq!(peer.recv_reply::<u32>(3), 3);
    finish(conn);
}
