//! Where `Shared::route` sends each frame, and how a caller that gives up (`wait`, `abandon`)
//! keeps its late reply away from every other call.

use super::peer::{connect, decode, finish, frame, object_ref, register, LONG};
use super::pipe::Timeouts;
use super::service;
use crate::core::config::Config;
use crate::core::connection::{Delivery, Routed};
use crate::error::{Error, Timeout};
use crate::wire::{Frame, Kind};
use std::time::{Duration, Instant};

fn reply_to(id: u64, value: &str) -> Frame {
    frame(Kind::Reply, id, 0, "", value)
}

fn delivered_reply(d: Result<Delivery, crossbeam_channel::TryRecvError>) -> Frame {
    match d {
        Ok(Delivery::Reply(f)) => f,
        Ok(Delivery::Nested(_)) => panic!("a nested request, not a reply"),
        Err(e) => panic!("nothing delivered: {e}"),
    }
}

#[test]
fn a_reply_goes_to_exactly_the_waiter_of_its_id() {
    let (svc, _probe) = service();
    let (conn, _peer) = connect(&Config::default(), svc, Timeouts::Yes);
    let s = &conn.shared;
    let sync: Vec<_> = (0..3).map(|_| register(s, "m", true)).collect();
    let async_call = register(s, "m", false);

    // A thread blocked in a synchronous call is told so (it will likely read next).
    let routed = s.route(reply_to(sync[1].id, "one")).unwrap();
    assert!(matches!(routed, Routed::ToCaller));
    let got = delivered_reply(sync[1].rx.try_recv());
    assert_eq!(got.header.id, sync[1].id);
    assert_eq!(decode::<String>(&got), "one");
    assert!(sync[0].rx.is_empty() && sync[2].rx.is_empty() && async_call.rx.is_empty());

    // An error reply goes the same way; an async caller's reply is delivered too.
    let error = frame(Kind::Error, sync[0].id, 0, "", &(1, "svc", "m", "failed"));
    assert!(matches!(s.route(error).unwrap(), Routed::ToCaller));
    assert_eq!(
        delivered_reply(sync[0].rx.try_recv()).header.kind,
        Kind::Error
    );
    assert!(matches!(
        s.route(reply_to(async_call.id, "two")).unwrap(),
        Routed::Done
    ));
    assert_eq!(
        decode::<String>(&delivered_reply(async_call.rx.try_recv())),
        "two"
    );
    assert!(sync[2].rx.is_empty(), "another call's reply leaked");
    finish(conn);
}

#[test]
fn a_late_reply_goes_to_a_worker_for_its_object_references_never_to_another_caller() {
    let (svc, _probe) = service();
    let (conn, peer) = connect(&Config::default(), svc, Timeouts::Yes);
    let s = &conn.shared;
    let gone = register(s, "gone", true);
    assert!(s.abandon(&gone).is_none(), "no reply had come");
    let next = register(s, "next", true);

    let late = frame(Kind::Reply, gone.id, 0, "", &object_ref(7));
    let job = match s.route(late).unwrap() {
        Routed::Job(f) => f,
        _ => panic!("a late reply must go to a worker"),
    };
    assert_eq!(job.header.id, gone.id);
    assert!(next.rx.is_empty(), "the late reply reached another caller");

    // The worker releases the reference the reply carried: the peer may drop object 7.
    s.serve(job);
    peer.recv_call("gone");
    peer.recv_call("next");
    let release = peer.recv();
    assert_eq!(release.header.kind, Kind::Release);
    assert_eq!(decode::<Vec<(u64, u64)>>(&release), vec![(7, 1)]);
    finish(conn);
}

#[test]
fn a_reply_to_an_id_never_sent_is_a_protocol_violation() {
    let (svc, _probe) = service();
    let (conn, peer) = connect(&Config::default(), svc, Timeouts::Yes);
    let s = &conn.shared;
    let sent = register(s, "m", true);
    for never in [0, sent.id + 1, 1 << 40] {
        match s.route(reply_to(never, "x")) {
            Err(Error::Protocol(m)) => assert!(
                m.contains(&format!("request {never} which this side never sent")),
                "{m}"
            ),
            _ => panic!("a reply to {never} was accepted"),
        }
    }
    assert!(sent.rx.is_empty());
    // Read from the wire, it ends the connection, naming the violation.
    peer.reply(1 << 40, "x");
    assert!(conn.wait_closed_timeout(LONG));
    let reason = conn.close_reason().unwrap();
    assert!(
        reason.contains("protocol violation") && reason.contains("never sent"),
        "{reason}"
    );
    finish(conn);
}

#[test]
fn a_request_nested_in_a_waiting_sync_call_goes_to_that_caller_others_to_the_pool() {
    let (svc, _probe) = service();
    let (conn, _peer) = connect(&Config::default(), svc, Timeouts::Yes);
    let s = &conn.shared;
    let sync = register(s, "m", true);
    let async_call = register(s, "m", false);
    let finished = register(s, "m", true);
    assert!(matches!(
        s.route(reply_to(finished.id, "done")).unwrap(),
        Routed::ToCaller
    ));

    for kind in [Kind::Call, Kind::Oneway] {
        let nested = frame(kind, 100, sync.id, "noop", &());
        assert!(matches!(s.route(nested).unwrap(), Routed::ToCaller));
        match sync.rx.try_recv() {
            Ok(Delivery::Nested(f)) => assert_eq!((f.header.kind, f.header.id), (kind, 100)),
            _ => panic!("the nested {kind:?} did not reach its caller"),
        }
    }
    // Parent unknown, finished, an async call (nobody blocked to run it), or none: the pool.
    let unknown = sync.id + 1000;
    for parent in [unknown, finished.id, async_call.id, 0] {
        match s
            .route(frame(Kind::Call, 101, parent, "noop", &()))
            .unwrap()
        {
            Routed::Job(f) => assert_eq!(f.header.parent, parent),
            _ => panic!("a request with parent {parent} did not go to the pool"),
        }
    }
    assert!(sync.rx.is_empty() && async_call.rx.is_empty());
    finish(conn);
}

#[test]
fn a_timed_out_call_abandons_its_id_and_its_late_reply_never_reaches_the_next_call() {
    let (svc, _probe) = service();
    let (conn, peer) = connect(&Config::default(), svc, Timeouts::Yes);
    let root = conn.root();
    let timeout = Duration::from_millis(50);
    match root.call_timeout::<String, _>("slow", (), timeout) {
        Err(Error::Timeout(Timeout::Call { method, after })) => {
            assert_eq!((method.as_str(), after), ("root.slow", timeout))
        }
        other => panic!("expected a call timeout, got {other:?}"),
    }
    let slow = peer.recv_call("slow");

    // The next call waits; the late reply (of another type, carrying an object reference)
    // arrives first, then its own.
    let (tx, rx) = crossbeam_channel::bounded(1);
    let r = root.clone();
    let caller = std::thread::spawn(move || {
        let _ = tx.send(r.call_timeout::<String, _>("fast", (), LONG));
    });
    let fast = peer.recv_call("fast");
    peer.reply(slow.header.id, &object_ref(7));
    peer.reply(fast.header.id, "fresh");
    assert_eq!(rx.recv_timeout(LONG).unwrap().unwrap(), "fresh");
    caller.join().unwrap();

    // The late reply was dropped by a worker, which released what it carried.
    let release = peer.recv();
    assert_eq!(release.header.kind, Kind::Release);
    assert_eq!(decode::<Vec<(u64, u64)>>(&release), vec![(7, 1)]);
    assert!(!conn.is_closed());
    drop(root);
    finish(conn);
}

#[test]
fn a_reply_routed_before_the_caller_gives_up_is_returned_not_lost() {
    let (svc, _probe) = service();
    let (conn, _peer) = connect(&Config::default(), svc, Timeouts::Yes);
    let s = &conn.shared;

    // `wait` past its deadline: the reply routed just before is still the caller's.
    let p = register(s, "m", true);
    assert!(matches!(
        s.route(reply_to(p.id, "mine")).unwrap(),
        Routed::ToCaller
    ));
    let f = s
        .wait(&p, Instant::now(), &|| "root.m".into(), Duration::ZERO)
        .expect("the reply that was already routed");
    assert_eq!(decode::<String>(&f), "mine");

    // `abandon` itself returns it.
    let p = register(s, "m", false);
    assert!(matches!(
        s.route(reply_to(p.id, "also")).unwrap(),
        Routed::Done
    ));
    let f = s.abandon(&p).expect("the reply that was already routed");
    assert_eq!(decode::<String>(&f), "also");
    finish(conn);
}

#[test]
fn requests_nested_in_a_call_that_gives_up_are_served_by_the_pool() {
    let (svc, _probe) = service();
    let (conn, peer) = connect(&Config::default(), svc, Timeouts::Yes);
    let s = &conn.shared;
    let p = register(s, "m", true);
    let nested = frame(Kind::Call, 500, p.id, "whoami", &());
    assert!(matches!(s.route(nested).unwrap(), Routed::ToCaller));
    assert!(s.abandon(&p).is_none());
    // A pool thread runs it and replies.
    peer.recv_call("m");
    let me = format!("{:?}", std::thread::current().id());
    assert_ne!(peer.recv_reply::<String>(500), me);
    finish(conn);
}

#[test]
fn a_nested_request_routed_before_the_reply_of_a_call_that_gives_up_is_served_not_dropped() {
    // The caller's deadline passed while a nested request and then the reply were routed to
    // it: `abandon` returns the reply and the pool serves the request.
    let (svc, _probe) = service();
    let (conn, peer) = connect(&Config::default(), svc, Timeouts::Yes);
    let s = &conn.shared;
    let p = register(s, "m", true);
    let nested = frame(Kind::Call, 500, p.id, "whoami", &());
    assert!(matches!(s.route(nested).unwrap(), Routed::ToCaller));
    assert!(matches!(
        s.route(reply_to(p.id, "mine")).unwrap(),
        Routed::ToCaller
    ));
    let f = s.abandon(&p).expect("the reply that was already routed");
    assert_eq!(decode::<String>(&f), "mine");
    peer.recv_call("m");
    let me = format!("{:?}", std::thread::current().id());
    assert_ne!(peer.recv_reply::<String>(500), me);
    finish(conn);
}
