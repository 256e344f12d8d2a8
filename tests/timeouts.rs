//! Timeouts: the per-connection call timeout, per-call overrides, what a timed-out call leaves
//! behind (a usable connection whose next call gets its own answer), and the connect and
//! handshake timeouts.

mod common;

use common::Gate;
use rpyc::{Error, Options, ServerHandle, Service, ThreadedServer, Timeout};
use std::io::Read;
use std::net::TcpListener;

use std::thread;
use std::time::{Duration, Instant};

/// A server whose `echo_after` answers `s` after `ms` milliseconds and whose `blocked` answers
/// once the gate opens.
fn slow_server() -> (ServerHandle, u16, Gate) {
    let gate = Gate::default();
    let g = gate.clone();
    let service = Service::new("slow")
        .method("echo_after", |ms: u64, s: String| {
            thread::sleep(Duration::from_millis(ms));
            s
        })
        .method("blocked", move || {
            g.wait();
            "late".to_string()
        })
        .method("add", |a: i64, b: i64| a + b);
    let server = ThreadedServer::new(service).build().expect("bind");
    let port = server.port();
    (server.spawn().expect("spawn"), port, gate)
}

fn expect_call_timeout(r: Result<String, Error>, method: &str, after: Duration) {
    match r {
        Err(Error::Timeout(Timeout::Call {
            method: m,
            after: a,
        })) => {
            assert_eq!(m, format!("root.{method}"));
            assert_eq!(a, after);
        }
        other => panic!("expected a call timeout, got {other:?}"),
    }
}

#[test]
fn default_call_timeout_is_thirty_seconds() {
    // Waiting 30 s is not an option; the documented default is visible in the builder's Debug.
    let shown = format!("{:?}", Options::new());
    assert!(shown.contains("call_timeout: 30s"), "{shown}");
}

#[test]
fn connection_call_timeout_applies_to_every_call() {
    let (handle, port, gate) = slow_server();
    let conn = Options::new()
        .call_timeout(Duration::from_millis(300))
        .connect("127.0.0.1", port)
        .unwrap();
    let start = Instant::now();
    let r = conn.root().call("blocked", ());
    let took = start.elapsed();
    expect_call_timeout(r, "blocked", Duration::from_millis(300));
    assert!(
        took >= Duration::from_millis(300),
        "gave up early: {took:?}"
    );
    assert!(took < Duration::from_secs(2), "gave up late: {took:?}");
    // Quick calls are unaffected.
    assert_eq!(conn.root().call::<i64, _>("add", (2, 3)).unwrap(), 5);
    conn.close();
    gate.open();
    handle.close();
}

#[test]
fn per_call_timeout_overrides_the_connection_default() {
    let (handle, port, gate) = slow_server();

    // Shorter than the (30 s) default.
    let conn = rpyc::connect("127.0.0.1", port).unwrap();
    let start = Instant::now();
    let r = conn
        .root()
        .call_timeout("blocked", (), Duration::from_millis(200));
    expect_call_timeout(r, "blocked", Duration::from_millis(200));
    assert!(start.elapsed() < Duration::from_secs(2));
    conn.close();

    // Longer than a short default.
    let conn = Options::new()
        .call_timeout(Duration::from_millis(100))
        .connect("127.0.0.1", port)
        .unwrap();
    let r: String = conn
        .root()
        .call_timeout("echo_after", (400u64, "patient"), Duration::from_secs(10))
        .unwrap();
    assert_eq!(r, "patient");
    conn.close();
    gate.open();
    handle.close();
}

#[test]
fn timed_out_call_leaves_connection_usable() {
    let (handle, port, gate) = slow_server();
    let conn = rpyc::connect("127.0.0.1", port).unwrap();
    let root = conn.root();

    let r = root.call_timeout("echo_after", (500u64, "late"), Duration::from_millis(100));
    expect_call_timeout(r, "echo_after", Duration::from_millis(100));
    assert!(!conn.is_closed());

    // This call is waiting when the late reply arrives (about 400 ms from now): it must get
    // its own answer, not "late".
    let r: String = root
        .call_timeout("echo_after", (1000u64, "fresh"), Duration::from_secs(10))
        .unwrap();
    assert_eq!(r, "fresh");

    // And after the late reply has surely come and gone, calls still get their own answers.
    let r: String = root.call("echo_after", (0u64, "fresher")).unwrap();
    assert_eq!(r, "fresher");
    conn.ping().unwrap();
    conn.close();
    gate.open();
    handle.close();
}

#[test]
fn many_timed_out_calls_never_leak_late_replies_into_later_calls() {
    let (handle, port, gate) = slow_server();
    let conn = rpyc::connect("127.0.0.1", port).unwrap();
    let root = conn.root();
    for i in 0..10u64 {
        // Each late reply lands while the following quick calls are in flight.
        let r = root.call_timeout(
            "echo_after",
            (60u64, format!("late {i}")),
            Duration::from_millis(20),
        );
        expect_call_timeout(r, "echo_after", Duration::from_millis(20));
        for j in 0..5u64 {
            let want = format!("fresh {i}.{j}");
            let got: String = root.call("echo_after", (15u64, want.clone())).unwrap();
            assert_eq!(got, want);
        }
    }
    conn.close();
    gate.open();
    handle.close();
}

#[test]
fn timed_out_async_wait_keeps_the_call_pending() {
    let (handle, port, gate) = slow_server();
    let conn = rpyc::connect("127.0.0.1", port).unwrap();
    let pending = conn
        .root()
        .call_async::<String, _>("echo_after", (400u64, "eventually"))
        .unwrap();
    match pending.wait_timeout(Duration::from_millis(50)) {
        Err(Error::Timeout(Timeout::Call { method, .. })) => assert_eq!(method, "root.echo_after"),
        other => panic!("expected a call timeout, got {other:?}"),
    }
    assert_eq!(
        pending.value_timeout(Duration::from_secs(10)).unwrap(),
        "eventually"
    );
    conn.close();
    gate.open();
    handle.close();
}

#[test]
fn silent_peer_makes_connect_fail_with_a_handshake_timeout() {
    // Accepts TCP connections and never says a word.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let holder = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink); // until the client gives up and hangs up
    });
    let start = Instant::now();
    let r = Options::new()
        .handshake_timeout(Duration::from_millis(300))
        .connect("127.0.0.1", port);
    let took = start.elapsed();
    match r {
        Err(Error::Timeout(Timeout::Handshake(d))) => assert_eq!(d, Duration::from_millis(300)),
        other => panic!("expected a handshake timeout, got {other:?}"),
    }
    assert!(
        took >= Duration::from_millis(250),
        "gave up early: {took:?}"
    );
    assert!(took < Duration::from_secs(3), "gave up late: {took:?}");
    // The client hung up: the silent peer sees the end of the stream.
    holder.join().unwrap();
}

#[test]
fn server_drops_a_client_that_never_completes_the_handshake() {
    let server = ThreadedServer::new(Service::new("s").method("add", |a: i64, b: i64| a + b))
        .handshake_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let port = server.port();
    let handle = server.spawn().unwrap();

    let mut silent = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let start = Instant::now();
    let mut got = Vec::new();
    // The server's hello, then the end of the stream once it gives up on us.
    silent
        .read_to_end(&mut got)
        .expect("the server should hang up, not leave us waiting");
    assert!(got.starts_with(b"RPYC"), "{got:02x?}");
    assert!(start.elapsed() < Duration::from_secs(3));

    let deadline = Instant::now() + Duration::from_secs(5);
    while handle.connections() != 0 {
        assert!(
            Instant::now() < deadline,
            "the silent client still holds a slot"
        );
        thread::sleep(Duration::from_millis(10));
    }
    let conn = rpyc::connect("127.0.0.1", port).unwrap();
    assert_eq!(conn.root().call::<i64, _>("add", (1, 1)).unwrap(), 2);
    conn.close();
    handle.close();
}

#[test]
fn connect_to_a_closed_port_fails_fast_with_a_connect_error() {
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    }; // closed again: nothing listens there now
    let start = Instant::now();
    match Options::new()
        .connect_timeout(Duration::from_secs(10))
        .connect("127.0.0.1", port)
    {
        Err(Error::Connect { addr, .. }) => assert!(addr.contains(&port.to_string()), "{addr}"),
        other => panic!("expected a connect error, got {other:?}"),
    }
    assert!(start.elapsed() < Duration::from_secs(2));
}

#[test]
fn connect_that_cannot_finish_in_time_is_a_connect_timeout() {
    // A zero budget is spent before the first attempt; a blackholed address cannot be made
    // reliably on loopback, so this is the deterministic way to reach the same outcome.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    match Options::new()
        .connect_timeout(Duration::ZERO)
        .connect("127.0.0.1", port)
    {
        Err(Error::Timeout(Timeout::Connect(d))) => assert_eq!(d, Duration::ZERO),
        other => panic!("expected a connect timeout, got {other:?}"),
    }
}

#[test]
fn timeout_too_large_to_represent_means_no_limit() {
    // `Duration::MAX` is the usual way to say "wait as long as it takes"; it must not panic
    // computing a deadline.
    let (handle, port, gate) = slow_server();
    let conn = Options::new()
        .connect_timeout(Duration::MAX)
        .handshake_timeout(Duration::MAX)
        .call_timeout(Duration::MAX)
        .connect("127.0.0.1", port)
        .unwrap();
    let root = conn.root();
    assert_eq!(root.call::<i64, _>("add", (1, 2)).unwrap(), 3);
    let r: String = root
        .call_timeout("echo_after", (50u64, "slow"), Duration::MAX)
        .unwrap();
    assert_eq!(r, "slow");
    conn.ping().unwrap();
    conn.ping_timeout(Duration::MAX).unwrap();
    let pending = root.call_async::<i64, _>("add", (2, 2)).unwrap();
    pending.wait_timeout(Duration::MAX).unwrap();
    assert_eq!(pending.value_timeout(Duration::MAX).unwrap(), 4);
    assert_eq!(
        root.call_async::<i64, _>("add", (3, 3))
            .unwrap()
            .value()
            .unwrap(),
        6
    );
    conn.close();
    assert!(conn.wait_closed_timeout(Duration::MAX));
    gate.open();
    handle.close();
}

/// Runs `f` on a thread and waits at most `limit` for its result, so a hang is a failure.
fn bounded<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| panic!("did not finish within {limit:?}"))
}

fn expect_handshake_timeout(r: Result<rpyc::Connection, Error>, after: Duration) {
    match r {
        Err(Error::Timeout(Timeout::Handshake(d))) => assert_eq!(d, after),
        other => panic!("expected a handshake timeout, got {other:?}"),
    }
}

#[test]
fn zero_handshake_timeout_expires_at_once() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let r = bounded(Duration::from_secs(5), move || {
        Options::new()
            .handshake_timeout(Duration::ZERO)
            .connect("127.0.0.1", port)
    });
    expect_handshake_timeout(r, Duration::ZERO);
    drop(listener);
}

#[test]
fn handshake_timeout_applies_to_a_silent_subprocess() {
    // A child that neither speaks nor exits: only the timeout can end the handshake.
    let start = Instant::now();
    let r = bounded(Duration::from_secs(10), || {
        let mut cmd = std::process::Command::new("sleep");
        cmd.arg("30");
        Options::new()
            .handshake_timeout(Duration::from_millis(300))
            .connect_subprocess(cmd)
    });
    expect_handshake_timeout(r, Duration::from_millis(300));
    assert!(start.elapsed() < Duration::from_secs(3));
}

#[test]
fn handshake_timeout_hangs_up_on_a_silent_stream_peer() {
    use std::os::unix::net::UnixStream;
    // The peer reads until we hang up, then hangs up too, never having said a word.
    let (ours_w, theirs_r) = UnixStream::pair().unwrap();
    let (theirs_w, ours_r) = UnixStream::pair().unwrap();
    let peer = thread::spawn(move || {
        let mut theirs_r = theirs_r;
        let mut sink = Vec::new();
        let _ = theirs_r.read_to_end(&mut sink);
        drop(theirs_w);
        sink.len()
    });
    let start = Instant::now();
    let r = bounded(Duration::from_secs(10), move || {
        Options::new()
            .handshake_timeout(Duration::from_millis(300))
            .connect_stream(ours_r, ours_w)
    });
    expect_handshake_timeout(r, Duration::from_millis(300));
    assert!(start.elapsed() < Duration::from_secs(3));
    assert_eq!(
        peer.join().unwrap(),
        16,
        "the peer got our hello, then the end"
    );
}

#[test]
fn idle_connection_is_closed_after_its_idle_timeout_but_not_while_a_call_is_in_flight() {
    let (handle, port, gate) = slow_server();
    let idle = Duration::from_millis(600);
    let conn = rpyc::Options::new()
        .idle_timeout(idle)
        .connect("127.0.0.1", port)
        .unwrap();
    // A call that takes three times the idle limit: in flight, the connection is not idle.
    let root = conn.root();
    let call = std::thread::spawn(move || root.call::<String, _>("blocked", ()));
    std::thread::sleep(idle * 3);
    assert!(!conn.is_closed(), "closed while a call was in flight");
    gate.open();
    call.join().unwrap().unwrap();
    // Then, quiet: closed after the limit (checked every quarter of it), saying why.
    let quiet = Instant::now();
    assert!(conn.wait_closed_timeout(idle * 3));
    let took = quiet.elapsed();
    assert!(
        took >= idle.mul_f64(0.9) && took <= idle.mul_f64(1.6),
        "closed after {took:?} of quiet, the idle limit being {idle:?}"
    );
    let reason = conn.close_reason().unwrap();
    assert!(reason.contains("idle"), "{reason}");
    handle.close();
}

#[test]
fn calls_sharing_one_deadline_end_at_it() {
    let (handle, port, gate) = slow_server();
    let conn = rpyc::connect("127.0.0.1", port).unwrap();
    let budget = Duration::from_millis(500);
    let deadline = Instant::now() + budget;
    // The first call uses part of the budget; the second, blocked, gets only the rest.
    let s: String = conn
        .root()
        .call_deadline("echo_after", (200u64, "a"), deadline)
        .unwrap();
    assert_eq!(s, "a");
    let r = conn
        .root()
        .call_deadline::<String, _>("blocked", (), deadline);
    let over = Instant::now().saturating_duration_since(deadline);
    match r {
        Err(Error::Timeout(Timeout::Call { after, .. })) => assert!(after < budget, "{after:?}"),
        other => panic!("expected a call timeout, got {other:?}"),
    }
    assert!(over < budget / 2, "returned {over:?} after the deadline");
    // An async result waits until a deadline too: then it is a call timeout, the call still
    // pending.
    let pending = conn.root().call_async::<String, _>("blocked", ()).unwrap();
    let wait = Duration::from_millis(50);
    let deadline = Instant::now() + wait;
    match pending.wait_deadline(deadline) {
        Err(Error::Timeout(Timeout::Call { method, after })) => {
            assert_eq!(method, "root.blocked");
            assert!(after <= wait, "{after:?}");
        }
        other => panic!("expected a call timeout, got {other:?}"),
    }
    assert!(Instant::now() >= deadline, "gave up before the deadline");
    gate.open();
    assert_eq!(
        pending
            .value_deadline(Instant::now() + Duration::from_secs(5))
            .unwrap(),
        "late"
    );
    handle.close();
}

// ---- The other `_deadline` forms ----

/// A peer that completes the handshake and then reads whatever comes, answering nothing, until
/// the client hangs up (at most 10 s).
fn peer_that_never_answers() -> (u16, thread::JoinHandle<()>) {
    let (l, port) = common::raw::listener();
    let peer = thread::spawn(move || {
        let mut s = common::raw::accept(&l);
        common::raw::hangs_up_within(&mut s, Duration::from_secs(10));
    });
    (port, peer)
}

#[test]
fn ping_deadline_gives_up_at_the_deadline_on_a_peer_that_never_answers() {
    let (port, peer) = peer_that_never_answers();
    let conn = rpyc::connect("127.0.0.1", port).unwrap();
    let budget = Duration::from_millis(500);
    let start = Instant::now();
    let r = conn.ping_deadline(start + budget);
    let took = start.elapsed();
    match r {
        Err(Error::Timeout(Timeout::Call { method, after })) => {
            assert_eq!(method, "ping");
            assert!(after <= budget, "{after:?}");
        }
        other => panic!("expected a ping timeout, got {other:?}"),
    }
    assert!(
        took >= budget.mul_f64(0.9) && took < budget * 3 / 2,
        "gave up after {took:?}, the deadline being {budget:?} away"
    );
    conn.close();
    peer.join().unwrap();
}

#[test]
fn wait_closed_deadline_is_false_at_the_deadline_while_open_and_true_once_closed() {
    let (handle, port, _gate) = slow_server();
    let conn = rpyc::connect("127.0.0.1", port).unwrap();
    let budget = Duration::from_millis(300);
    // Open: false, at the deadline.
    let start = Instant::now();
    assert!(!conn.wait_closed_deadline(start + budget));
    let took = start.elapsed();
    assert!(
        took >= budget.mul_f64(0.9) && took < budget * 3 / 2,
        "returned after {took:?}, the deadline being {budget:?} away"
    );
    // Closed meanwhile (by another thread): true, as soon as it closes.
    let closer = conn.clone();
    let start = Instant::now();
    let closing = thread::spawn(move || {
        thread::sleep(budget);
        closer.close();
    });
    assert!(conn.wait_closed_deadline(start + budget * 10));
    let took = start.elapsed();
    assert!(
        took >= budget.mul_f64(0.9) && took < budget * 3,
        "returned after {took:?}, closed after {budget:?}, the deadline {:?} away",
        budget * 10
    );
    closing.join().unwrap();
    // Closed already: true, even for a deadline already past.
    assert!(conn.wait_closed_deadline(Instant::now()));
    handle.close();
}

#[test]
fn close_deadline_waits_for_running_handlers_until_the_deadline_only() {
    let (handle, port, gate) = slow_server();
    let conn = rpyc::connect("127.0.0.1", port).unwrap();
    let _stuck = conn.root().call_async::<String, _>("blocked", ()).unwrap();
    thread::sleep(Duration::from_millis(100));
    // A handler still runs at the deadline: false, at the deadline.
    let grace = Duration::from_millis(300);
    let start = Instant::now();
    assert!(
        !handle.close_deadline(start + grace),
        "a handler was still running"
    );
    let took = start.elapsed();
    assert!(
        took >= grace.mul_f64(0.9) && took < grace * 3,
        "close_deadline returned after {took:?}, the deadline being {grace:?} away"
    );
    assert!(handle.is_closed());
    gate.open();
    // Nothing running: true, at once, however far the deadline.
    let (handle, _port, _gate) = slow_server();
    let far = Duration::from_secs(10);
    let start = Instant::now();
    assert!(handle.close_deadline(start + far));
    assert!(
        start.elapsed() < far / 10,
        "an idle server took {:?} to close",
        start.elapsed()
    );
}
