//! `terminate`: every waiting caller fails at once with `Error::Closed`, `on_disconnect` runs
//! once, whoever ends the connection and however often.

use super::peer::{connect, finish, Peer, LONG};
use super::pipe::Timeouts;
use super::service;
use crate::core::config::Config;
use crate::core::connection::Connection;
use crate::error::Error;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

/// A way to end the connection: its name, what it does, and the reason callers get.
type Ending = (&'static str, fn(&Connection, &Peer), &'static str);

#[test]
fn terminate_fails_every_waiting_caller_at_once_and_runs_on_disconnect_once() {
    let ends: [Ending; 2] = [
        ("close", |c, _| c.close(), "closed by this side"),
        (
            "peer hangs up",
            |_, p| p.to_conn.close(),
            "the peer closed the connection",
        ),
    ];
    for (how, end, why) in ends {
        let disconnects = Arc::new(AtomicUsize::new(0));
        let counted = disconnects.clone();
        let (svc, _probe) = service();
        let svc = svc.on_disconnect(move |_| {
            counted.fetch_add(1, Ordering::SeqCst);
        });
        let (conn, peer) = connect(&Config::default(), svc, Timeouts::Yes);
        let (tx, rx) = crossbeam_channel::unbounded();
        let mut threads = Vec::new();
        for _ in 0..3 {
            let (root, tx) = (conn.root(), tx.clone());
            threads.push(thread::spawn(move || {
                let _ = tx.send(root.call::<(), _>("wait", ()));
            }));
        }
        let pending = conn.root().call_async::<(), _>("wait", ()).unwrap();
        let (root, tx2) = (conn.root(), tx.clone());
        threads.push(thread::spawn(move || {
            let _ = tx2.send(pending.value());
            drop(root);
        }));
        // All four requests went out: their callers are registered and waiting.
        for _ in 0..4 {
            peer.recv_call("wait");
        }
        let t0 = Instant::now();
        end(&conn, &peer);
        for _ in 0..4 {
            match rx.recv_timeout(LONG).unwrap() {
                Err(Error::Closed { reason }) => assert_eq!(reason, why, "{how}"),
                other => panic!("{how}: expected Error::Closed, got {other:?}"),
            }
        }
        // At once: far from the 30 s call timeout.
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "{how}: took {:?}",
            t0.elapsed()
        );
        for t in threads {
            t.join().unwrap();
        }
        assert!(conn.wait_closed_timeout(LONG));
        // Later calls fail fast with the same reason; ending again changes nothing.
        match conn.root().call::<(), _>("wait", ()) {
            Err(Error::Closed { reason }) => assert_eq!(reason, why),
            other => panic!("{how}: {other:?}"),
        }
        conn.close();
        peer.to_conn.close();
        conn.shared.terminate("again".into());
        assert_eq!(conn.close_reason().as_deref(), Some(why));
        finish(conn);
        assert_eq!(disconnects.load(Ordering::SeqCst), 1, "{how}");
    }
}

#[test]
fn a_peer_that_makes_us_release_its_objects_and_reads_nothing_is_closed_within_the_memory_bound() {
    // Oneways to a method that does not exist, each carrying a thousand object references:
    // every reference must be released, and releases wait for a peer that reads nothing. The
    // queue of releases is bounded by the connection's memory bound (16 bytes each).
    let mut config = Config::default();
    config.set_max_frame(64 << 10);
    config.max_buffered = Some(64 << 10);
    let (svc, _probe) = service();
    let (conn, peer) = connect(&config, svc, Timeouts::Yes);
    peer.from_conn.set_capacity(0);
    let limit = config.buffered_limit() / 16;
    let mut sent = 0u64;
    for frame in 0..20u64 {
        let refs: Vec<_> = (0..1000)
            .map(|i| super::peer::object_ref(frame * 1000 + i + 1))
            .collect();
        if peer
            .send(crate::wire::Kind::Oneway, 0, 0, "no_such_method", &refs)
            .is_err()
        {
            break;
        }
        sent += 1000;
        // One frame at a time, so that the frames read ahead stay within the memory bound
        // and it is the queue of releases that grows.
        let deadline = Instant::now() + LONG;
        while conn.shared.queued_releases() < sent as usize
            && !conn.is_closed()
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    assert!(
        conn.wait_closed_timeout(LONG),
        "still open after making us queue {sent} releases (at most {limit} may wait)"
    );
    let reason = conn.close_reason().unwrap();
    assert!(
        reason.contains("object releases waited to be sent"),
        "{reason}"
    );
    assert!(reason.contains(&format!("at most {limit}")), "{reason}");
    finish(conn);
}
