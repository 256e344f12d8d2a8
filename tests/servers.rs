//! Servers: the connection limit of `ThreadedServer`, `OneShotServer`, closing a server with
//! its handle, and listening on IPv4 and IPv6 loopback.

mod common;

use common::{expect_within, works};

use rpyc::{Error, HandshakeErrorKind, OneShotServer, Service, ThreadedServer};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

fn service() -> Service {
    Service::new("calc")
        .method("add", |a: i64, b: i64| a + b)
        .method_with_context("peer", |cx: &rpyc::Context| cx.peer().to_string())
}

#[test]
fn client_over_the_connection_limit_gets_a_clear_refusal() {
    let server = ThreadedServer::new(service())
        .max_connections(2)
        .build()
        .unwrap();
    let port = server.port();
    let handle = server.spawn().unwrap();

    let first = rpyc::connect("127.0.0.1", port).unwrap();
    let second = rpyc::connect("127.0.0.1", port).unwrap();
    works(&first);
    works(&second);
    assert_eq!(handle.connections(), 2);

    for _ in 0..3 {
        match rpyc::connect("127.0.0.1", port) {
            Err(Error::Handshake(e)) => {
                assert_eq!(e.kind(), HandshakeErrorKind::Refused, "{e}");
                // What a person reads says why, and what to do.
                assert!(e.message().contains("limit"), "{e}");
                assert!(e.message().contains("retry later"), "{e}");
                assert!(e.message().contains("max_connections"), "{e}");
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
    // The refused clients did not disturb the admitted ones.
    works(&first);
    works(&second);

    // Once one leaves, a new client gets in (the server notices the close asynchronously).
    first.close();
    let deadline = Instant::now() + Duration::from_secs(5);
    let third = loop {
        match rpyc::connect("127.0.0.1", port) {
            Ok(c) => break c,
            Err(Error::Handshake(e)) if e.kind() == HandshakeErrorKind::Refused => {
                assert!(
                    Instant::now() < deadline,
                    "still refused after a client left"
                );
                thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("unexpected error: {e:?}"),
        }
    };
    works(&third);
    works(&second);
    assert!(matches!(
        rpyc::connect("127.0.0.1", port),
        Err(Error::Handshake(e)) if e.kind() == HandshakeErrorKind::Refused
    ));
    third.close();
    second.close();
    expect_within("the server saw both leave", Duration::from_secs(5), || {
        handle.connections() == 0
    });
    handle.close();
}

#[test]
fn one_shot_server_serves_one_connection_then_returns() {
    let server = OneShotServer::new(service()).build().unwrap();
    let port = server.port();
    let (done_tx, done_rx) = mpsc::channel();
    thread::spawn(move || {
        let r = server.start();
        let _ = done_tx.send(r);
    });

    let conn = rpyc::connect("127.0.0.1", port).unwrap();
    works(&conn);

    // The server no longer accepts: a second client cannot get a connection.
    match rpyc::connect("127.0.0.1", port) {
        Err(Error::Connect { .. }) | Err(Error::Handshake(_)) => {}
        Ok(c) => panic!(
            "a second client got in: {:?}",
            c.root().call::<i64, _>("add", (1, 1))
        ),
        Err(e) => panic!("unexpected error: {e:?}"),
    }
    // start() keeps serving the first one.
    assert!(done_rx.recv_timeout(Duration::from_millis(200)).is_err());
    works(&conn);

    conn.close();
    done_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("start() should return once its connection ends")
        .unwrap();
    assert!(matches!(
        rpyc::connect("127.0.0.1", port),
        Err(Error::Connect { .. })
    ));
}

#[test]
fn one_shot_server_handle_close_ends_start() {
    let server = OneShotServer::new(service()).build().unwrap();
    let port = server.port();
    let handle = server.handle();
    let (done_tx, done_rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = done_tx.send(server.start());
    });
    let conn = rpyc::connect("127.0.0.1", port).unwrap();
    works(&conn);
    handle.close();
    done_rx
        .recv_timeout(Duration::from_secs(5))
        .unwrap()
        .unwrap();
    assert!(conn.wait_closed_timeout(Duration::from_secs(5)));
}

#[test]
fn closing_the_server_stops_accepting_and_closes_live_connections() {
    let gate = common::Gate::default();
    let entered = Arc::new(AtomicUsize::new(0));
    let (g, e) = (gate.clone(), entered.clone());
    let svc = service().method("blocked", move || {
        e.fetch_add(1, Ordering::SeqCst);
        g.wait();
    });
    let server = ThreadedServer::new(svc).build().unwrap();
    let port = server.port();
    let handle = server.spawn().unwrap();

    let idle = rpyc::connect("127.0.0.1", port).unwrap();
    let busy = rpyc::connect("127.0.0.1", port).unwrap();
    works(&idle);
    let root = busy.root();
    let caller = thread::spawn(move || root.call::<(), _>("blocked", ()));
    expect_within(
        "the call reached the server",
        Duration::from_secs(5),
        || entered.load(Ordering::SeqCst) == 1,
    );

    let h = handle.clone();
    let closing = thread::spawn(move || h.close());
    // Both connections close at once, busy handler or not.
    assert!(idle.wait_closed_timeout(Duration::from_secs(2)));
    assert!(busy.wait_closed_timeout(Duration::from_secs(2)));
    match caller.join().unwrap() {
        Err(Error::Closed { .. }) => {}
        other => panic!("expected Error::Closed, got {other:?}"),
    }
    assert!(matches!(
        idle.root().call::<i64, _>("add", (1, 2)),
        Err(Error::Closed { .. })
    ));
    assert!(handle.is_closed());

    gate.open();
    closing.join().unwrap();
    assert_eq!(handle.connections(), 0);
    match rpyc::connect("127.0.0.1", port) {
        Err(Error::Connect { .. }) => {}
        other => panic!("a closed server accepted a client: {other:?}"),
    }
    handle.close(); // idempotent
}

#[test]
fn blocking_start_returns_when_the_handle_closes() {
    let server = ThreadedServer::new(service()).build().unwrap();
    let port = server.port();
    let handle = server.handle();
    let (done_tx, done_rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = done_tx.send(server.start());
    });
    let conn = rpyc::connect("127.0.0.1", port).unwrap();
    works(&conn);
    assert!(done_rx.recv_timeout(Duration::from_millis(100)).is_err());
    handle.close();
    done_rx
        .recv_timeout(Duration::from_secs(5))
        .unwrap()
        .unwrap();
    assert!(conn.wait_closed_timeout(Duration::from_secs(5)));
}

/// Serves on `host`, calls through it, checks the peer address the server sees starts with
/// `seen_prefix`, then closes promptly and stops answering.
fn serves_on(host: &str, seen_prefix: &str) {
    let server = ThreadedServer::new(service())
        .hostname(host)
        .build()
        .unwrap();
    let port = server.port();
    assert_ne!(port, 0);
    let handle = server.spawn().unwrap();
    let conn = rpyc::connect(host, port).unwrap();
    works(&conn);
    let seen: String = conn.root().call("peer", ()).unwrap();
    assert!(seen.starts_with(seen_prefix), "{seen}");
    conn.close();
    // Closing wakes the accept loop over either address family.
    let start = Instant::now();
    handle.close();
    assert!(start.elapsed() < Duration::from_secs(5));
    assert!(rpyc::connect(host, port).is_err());
}

#[test]
fn server_listens_on_ipv4_loopback() {
    serves_on("127.0.0.1", "127.0.0.1:");
}

#[test]
fn server_listens_on_ipv6_loopback() {
    serves_on("::1", "[::1]:");
}

#[test]
fn server_on_an_unspecified_address_closes_cleanly() {
    // Listening on all interfaces (checked through loopback only): close must still be able
    // to wake its own accept loop.
    let server = ThreadedServer::new(service())
        .hostname("0.0.0.0")
        .build()
        .unwrap();
    let port = server.port();
    let handle = server.spawn().unwrap();
    let conn = rpyc::connect("127.0.0.1", port).unwrap();
    works(&conn);
    let (tx, rx) = mpsc::channel();
    let h = handle.clone();
    thread::spawn(move || {
        h.close();
        let _ = tx.send(());
    });
    rx.recv_timeout(Duration::from_secs(5))
        .expect("close of a 0.0.0.0 server hung");
    assert!(conn.wait_closed_timeout(Duration::from_secs(5)));
}

#[test]
fn closing_a_server_that_never_started_returns() {
    // Dropped without start(): nothing will ever run its accept loop.
    let server = ThreadedServer::new(service()).build().unwrap();
    let port = server.port();
    let handle = server.handle();
    drop(server);
    let (tx, rx) = mpsc::channel();
    let h = handle.clone();
    thread::spawn(move || {
        h.close();
        let _ = tx.send(());
    });
    rx.recv_timeout(Duration::from_secs(5))
        .expect("close of a server that never started hung");
    assert!(handle.is_closed());
    assert!(rpyc::connect("127.0.0.1", port).is_err());

    // Closed before start(): start() returns at once without serving anyone.
    let server = ThreadedServer::new(service()).build().unwrap();
    let port = server.port();
    let handle = server.handle();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        handle.close();
        let _ = tx.send(server.start());
    });
    rx.recv_timeout(Duration::from_secs(5))
        .expect("start() of a closed server kept running")
        .unwrap();
    assert!(rpyc::connect("127.0.0.1", port).is_err());
}

#[test]
fn max_workers_bounds_the_handlers_running_at_once_exactly() {
    for n in 1..=3usize {
        let running = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let (r, p) = (running.clone(), peak.clone());
        let svc = service().method("work", move || {
            let now = r.fetch_add(1, Ordering::SeqCst) + 1;
            p.fetch_max(now, Ordering::SeqCst);
            thread::sleep(Duration::from_millis(200));
            r.fetch_sub(1, Ordering::SeqCst);
        });
        let server = ThreadedServer::new(svc).max_workers(n).build().unwrap();
        let port = server.port();
        let handle = server.spawn().unwrap();
        let conn = rpyc::connect("127.0.0.1", port).unwrap();
        let root = conn.root();
        let pending: Vec<_> = (0..n + 2)
            .map(|_| root.call_async::<(), _>("work", ()).unwrap())
            .collect();
        for p in pending {
            p.value_timeout(Duration::from_secs(10))
                .unwrap_or_else(|e| panic!("max_workers({n}): {e}"));
        }
        // The limit is reached (the calls overlap) and never passed.
        assert_eq!(peak.load(Ordering::SeqCst), n, "max_workers({n})");
        conn.close();
        handle.close();
    }
}

#[test]
fn handler_can_close_its_own_server() {
    let slot: Arc<Mutex<Option<rpyc::ServerHandle>>> = Arc::default();
    let s = slot.clone();
    let svc = service().method("shutdown", move || {
        let handle = s.lock().unwrap().clone().expect("handle stored");
        handle.close();
    });
    let server = ThreadedServer::new(svc).build().unwrap();
    let port = server.port();
    let handle = server.spawn().unwrap();
    *slot.lock().unwrap() = Some(handle.clone());

    let bystander = rpyc::connect("127.0.0.1", port).unwrap();
    let conn = rpyc::connect("127.0.0.1", port).unwrap();
    let (tx, rx) = mpsc::channel();
    let root = conn.root();
    thread::spawn(move || {
        let _ = tx.send(root.call::<(), _>("shutdown", ()));
    });
    // The call cannot be answered: its own connection was closed under it.
    match rx
        .recv_timeout(Duration::from_secs(5))
        .expect("shutdown call hung")
    {
        Err(Error::Closed { .. }) => {}
        other => panic!("expected Error::Closed, got {other:?}"),
    }
    assert!(handle.is_closed());
    assert!(bystander.wait_closed_timeout(Duration::from_secs(5)));
    assert!(rpyc::connect("127.0.0.1", port).is_err());
    slot.lock().unwrap().take();
}

#[test]
fn close_ends_handshakes_in_progress_at_once() {
    // Clients that connected and said nothing are in their handshake (10 s timeout by
    // default); closing the server ends them instead of waiting that long.
    let handle = ThreadedServer::new(service())
        .build()
        .unwrap()
        .spawn()
        .unwrap();
    let silent: Vec<_> = (0..3)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", handle.port())).unwrap())
        .collect();
    expect_within("the handshakes started", Duration::from_secs(5), || {
        handle.connections() == 3
    });
    let t = Instant::now();
    handle.close();
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "close took {:?}",
        t.elapsed()
    );
    for mut s in silent {
        // The server's hello may come first, then the end of the stream.
        common::wait_for_hang_up(&mut s);
    }
}

/// Open file descriptors of this process.
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Open file descriptors of this process once the server's handshakes are over: while one
/// runs, the server holds a second descriptor of its socket, to end it from another thread
/// (`Accepted::stopper`), and the client may be connected before that thread lets it go. The
/// count that five samples 20 ms apart agree on, within 5 s.
fn settled_fds() -> usize {
    let give_up = Instant::now() + Duration::from_secs(5);
    let mut seen = vec![open_fds()];
    while seen.len() < 5
        || seen
            .iter()
            .rev()
            .take(5)
            .any(|&n| n != seen[seen.len() - 1])
    {
        if Instant::now() > give_up {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
        seen.push(open_fds());
    }
    seen[seen.len() - 1]
}

#[test]
fn a_plain_connection_costs_one_descriptor_on_each_side() {
    // Counted in a child process that runs nothing else: in this one, the other tests open
    // and close descriptors of their own while we count.
    let c = common::child::Child::start("child_counts_descriptors", "count");
    let said = c.heard(Duration::from_secs(60));
    let added: usize = said
        .strip_prefix("added ")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("expected `added N` from the child, got {said:?}"));
    // 50 connections, each a socket in the client and one in the server (both in the
    // child): 100 descriptors once their handshakes are over, and nothing else per connection.
    assert!(
        (100..=104).contains(&added),
        "50 connections added {added} descriptors"
    );
}

#[test]
#[ignore = "the child process of a_plain_connection_costs_one_descriptor_on_each_side"]
fn child_counts_descriptors() {
    if common::child::role().is_none() {
        return;
    }
    let server = common::serve(service());
    let conns: Vec<_> = (0..10).map(|_| common::connect(&server)).collect();
    works(&conns[0]);
    let before = settled_fds();
    let more: Vec<_> = (0..50).map(|_| common::connect(&server)).collect();
    for c in &more {
        works(c);
    }
    common::child::say(format!("added {}", settled_fds() - before));
    drop(more);
    drop(conns);
}

/// The soft and hard limits on open files of this process, from /proc.
fn nofile_limits() -> (u64, u64) {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let n: Vec<u64> = line
        .split_whitespace()
        .skip(3)
        .take(2)
        .map(|x| x.parse().unwrap())
        .collect();
    (n[0], n[1])
}

#[test]
fn building_a_server_raises_the_soft_descriptor_limit_to_the_hard_one() {
    // A child process started with a soft limit of 256, as under a stingy `ulimit -Sn`.
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg("ulimit -Sn 256 && exec \"$0\" \"$@\"")
        .arg(exe)
        .args([
            "child_reports_its_descriptor_limits",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("RPYC_TEST_FD_CHILD", "1")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let report = text
        .lines()
        .find_map(|l| l.split("limits: ").nth(1))
        .unwrap_or_else(|| panic!("no report in {text}"));
    let n: Vec<u64> = report
        .split_whitespace()
        .map(|x| x.parse().unwrap())
        .collect();
    let (before, after, hard) = (n[0], n[1], n[2]);
    assert_eq!(before, 256);
    assert_eq!(after, hard.min(1 << 20), "{report}");
}

#[test]
#[ignore = "the child process of building_a_server_raises_the_soft_descriptor_limit_to_the_hard_one"]
fn child_reports_its_descriptor_limits() {
    if std::env::var_os("RPYC_TEST_FD_CHILD").is_none() {
        return;
    }
    let (before, _) = nofile_limits();
    let server = ThreadedServer::new(service()).port(0).build().unwrap();
    let (after, hard) = nofile_limits();
    println!("limits: {before} {after} {hard}");
    drop(server);
}
