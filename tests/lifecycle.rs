//! Connection lifecycle: close is prompt and local, a dead peer fails every waiting and later
//! call, ping, the services' on_connect / on_disconnect hooks, and the closed-state queries.

mod common;

use common::expect_within;

use common::Gate;
use rpyc::{Error, Options, ServerHandle, Service, ThreadedServer};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// A server with `add`, and `blocked`, which signals `entered` and waits for the gate.
struct Busy {
    handle: ServerHandle,
    port: u16,
    gate: Gate,
    entered: Arc<AtomicUsize>,
}

fn busy_server() -> Busy {
    let gate = Gate::default();
    let entered = Arc::new(AtomicUsize::new(0));
    let (g, e) = (gate.clone(), entered.clone());
    let service = Service::new("busy")
        .method("add", |a: i64, b: i64| a + b)
        .method("blocked", move || {
            e.fetch_add(1, Ordering::SeqCst);
            g.wait();
            "done".to_string()
        });
    let server = ThreadedServer::new(service).build().unwrap();
    let port = server.port();
    Busy {
        handle: server.spawn().unwrap(),
        port,
        gate,
        entered,
    }
}

/// The call timeout of a connection made with default settings.
const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(30);

fn assert_closed<T: std::fmt::Debug>(r: Result<T, Error>) -> String {
    match r {
        Err(Error::Closed { reason }) => reason,
        other => panic!("expected Error::Closed, got {other:?}"),
    }
}

/// Starts `n` threads each making a `blocked` call; returns when all are inside the handler.
fn blocked_callers(
    conn: &rpyc::Connection,
    entered: &AtomicUsize,
    n: usize,
) -> mpsc::Receiver<(Result<String, Error>, Instant)> {
    let before = entered.load(Ordering::SeqCst);
    let (tx, rx) = mpsc::channel();
    for _ in 0..n {
        let root = conn.root();
        let tx = tx.clone();
        thread::spawn(move || {
            let r = root.call::<String, _>("blocked", ());
            let _ = tx.send((r, Instant::now()));
        });
    }
    expect_within(
        "every call reached the server",
        Duration::from_secs(5),
        || entered.load(Ordering::SeqCst) >= before + n,
    );
    rx
}

#[test]
fn close_returns_promptly_while_the_peer_is_busy() {
    let busy = busy_server();
    let conn = rpyc::connect("127.0.0.1", busy.port).unwrap();
    let results = blocked_callers(&conn, &busy.entered, 1);

    let closer = conn.clone();
    let start = Instant::now();
    let t = thread::spawn(move || closer.close());
    t.join().unwrap();
    let took = start.elapsed();
    assert!(took < Duration::from_secs(1), "close took {took:?}");

    let (r, at) = results.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_closed(r);
    assert!(at.duration_since(start) < Duration::from_secs(1));
    assert!(conn.is_closed());
    busy.gate.open();
    busy.handle.close();
}

#[test]
fn waiting_calls_fail_promptly_when_the_server_closes() {
    let busy = busy_server();
    let conn = rpyc::connect("127.0.0.1", busy.port).unwrap();
    let results = blocked_callers(&conn, &busy.entered, 4);
    let before = busy.entered.load(Ordering::SeqCst);
    let pending = conn.root().call_async::<String, _>("blocked", ()).unwrap();
    expect_within(
        "the async call reached the server",
        Duration::from_secs(5),
        || busy.entered.load(Ordering::SeqCst) > before,
    );

    // The server's close waits for its busy handlers; the client must not.
    let start = Instant::now();
    let handle = busy.handle.clone();
    let closing = thread::spawn(move || handle.close());
    for _ in 0..4 {
        let (r, at) = results.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_closed(r);
        assert!(at.duration_since(start) < Duration::from_secs(2));
    }
    assert_closed(pending.value_timeout(Duration::from_secs(5)));
    assert!(start.elapsed() < Duration::from_secs(2));
    assert!(conn.wait_closed_timeout(Duration::from_secs(5)));

    // Later calls fail fast with the same error.
    let start = Instant::now();
    assert_closed(conn.root().call::<i64, _>("add", (1, 2)));
    assert_closed(conn.root().call_async::<i64, _>("add", (1, 2)).map(|_| ()));
    assert_closed(conn.root().call_oneway("add", (1, 2)));
    assert_closed(conn.ping());
    // Well before the 30 s call timeout they would otherwise wait out.
    assert!(start.elapsed() < DEFAULT_CALL_TIMEOUT / 20);

    busy.gate.open();
    closing.join().unwrap();
}

/// A fake rpyc peer: completes the handshake, reads one frame, then behaves as `then` says.
fn fake_peer(then: impl FnOnce(TcpStream) + Send + 'static) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut hello = [0u8; 16];
        s.read_exact(&mut hello).unwrap();
        assert_eq!(&hello[..4], b"RPYC");
        // Echoing the client's hello is a valid hello from us.
        s.write_all(&hello).unwrap();
        let mut len = [0u8; 4];
        s.read_exact(&mut len).unwrap();
        let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
        s.read_exact(&mut body).unwrap();
        then(s);
    });
    port
}

#[test]
fn waiting_call_fails_promptly_when_the_peer_socket_drops() {
    let (dropped_tx, dropped_rx) = mpsc::channel();
    let port = fake_peer(move |s| {
        thread::sleep(Duration::from_millis(200));
        drop(s);
        dropped_tx.send(Instant::now()).unwrap();
    });
    let conn = rpyc::connect("127.0.0.1", port).unwrap();
    // Default timeout: 30 s. The call must end when the socket does, not then.
    let reason = assert_closed(conn.root().call::<i64, _>("add", (1, 2)));
    let dropped_at = dropped_rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert!(dropped_at.elapsed() < Duration::from_secs(2));
    assert!(!reason.is_empty());

    assert!(conn.is_closed());
    assert_eq!(conn.close_reason().as_deref(), Some(reason.as_str()));
    let start = Instant::now();
    assert_eq!(
        assert_closed(conn.root().call::<i64, _>("add", (1, 2))),
        reason
    );
    assert!(start.elapsed() < DEFAULT_CALL_TIMEOUT / 20);
}

#[test]
fn ping_answers_while_the_connection_is_open() {
    let busy = busy_server();
    let conn = rpyc::connect("127.0.0.1", busy.port).unwrap();
    conn.ping().unwrap();
    conn.ping_timeout(Duration::from_secs(5)).unwrap();
    // Also while another call of ours is busy on the server.
    let results = blocked_callers(&conn, &busy.entered, 1);
    conn.ping_timeout(Duration::from_secs(5)).unwrap();
    busy.gate.open();
    assert_eq!(
        results
            .recv_timeout(Duration::from_secs(5))
            .unwrap()
            .0
            .unwrap(),
        "done"
    );
    conn.close();
    assert_closed(conn.ping());
    busy.handle.close();
}

#[test]
fn ping_timeout_reports_a_peer_that_does_not_answer() {
    // This peer reads our ping and never replies.
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let port = fake_peer(move |s| {
        let _ = release_rx.recv_timeout(Duration::from_secs(10));
        drop(s);
    });
    let conn = rpyc::connect("127.0.0.1", port).unwrap();
    let start = Instant::now();
    match conn.ping_timeout(Duration::from_millis(200)) {
        Err(Error::Timeout(rpyc::Timeout::Call { method, after })) => {
            assert_eq!(method, "ping");
            assert_eq!(after, Duration::from_millis(200));
        }
        other => panic!("expected a ping timeout, got {other:?}"),
    }
    assert!(start.elapsed() < Duration::from_secs(2));
    assert!(!conn.is_closed());
    release_tx.send(()).unwrap();
    assert!(conn.wait_closed_timeout(Duration::from_secs(5)));
}

#[test]
fn on_connect_runs_before_any_request_is_served() {
    let ready = Arc::new(AtomicBool::new(false));
    let client_name = Arc::new(Mutex::new(String::new()));
    let (r1, r2, n1, n2) = (
        ready.clone(),
        ready.clone(),
        client_name.clone(),
        client_name,
    );
    let service = Service::new("hooked")
        .on_connect(move |cx| {
            // Calls to the peer work from the hook.
            let name: String = cx.peer_root().call("name", ()).unwrap_or_default();
            *n1.lock().unwrap() = name;
            thread::sleep(Duration::from_millis(200));
            r1.store(true, Ordering::SeqCst);
        })
        .method("ready", move || r2.load(Ordering::SeqCst))
        .method("client_name", move || n2.lock().unwrap().clone());
    let handle = ThreadedServer::new(service).build().unwrap();
    let port = handle.port();
    let handle = handle.spawn().unwrap();

    let me = Service::new("client").method("name", || "lifecycle test".to_string());
    let conn = Options::new()
        .service(me)
        .connect("127.0.0.1", port)
        .unwrap();
    // Sent at once; the server must hold it until on_connect is done.
    assert!(conn.root().call::<bool, _>("ready", ()).unwrap());
    assert_eq!(
        conn.root().call::<String, _>("client_name", ()).unwrap(),
        "lifecycle test"
    );
    conn.close();
    handle.close();
}

/// A server counting its on_disconnect calls; also records whether the connection was already
/// closed when the hook ran.
fn counting_server() -> (ServerHandle, u16, Arc<AtomicUsize>, Arc<AtomicBool>) {
    let count = Arc::new(AtomicUsize::new(0));
    let saw_open = Arc::new(AtomicBool::new(false));
    let (c, o) = (count.clone(), saw_open.clone());
    let service = Service::new("counted")
        .on_disconnect(move |cx| {
            if !cx.connection().is_closed() {
                o.store(true, Ordering::SeqCst);
            }
            c.fetch_add(1, Ordering::SeqCst);
        })
        .method("add", |a: i64, b: i64| a + b);
    let server = ThreadedServer::new(service).build().unwrap();
    let port = server.port();
    (server.spawn().unwrap(), port, count, saw_open)
}

fn assert_stays(count: &AtomicUsize, n: usize) {
    thread::sleep(Duration::from_millis(200));
    assert_eq!(count.load(Ordering::SeqCst), n);
}

#[test]
fn on_disconnect_runs_once_when_the_client_closes() {
    let (handle, port, count, saw_open) = counting_server();
    let conn = rpyc::connect("127.0.0.1", port).unwrap();
    assert_eq!(conn.root().call::<i64, _>("add", (1, 2)).unwrap(), 3);
    assert_eq!(count.load(Ordering::SeqCst), 0);
    conn.close();
    conn.close();
    expect_within("on_disconnect ran", Duration::from_secs(5), || {
        count.load(Ordering::SeqCst) >= 1
    });
    assert_stays(&count, 1);
    handle.close();
    assert_eq!(count.load(Ordering::SeqCst), 1);
    assert!(
        !saw_open.load(Ordering::SeqCst),
        "the hook saw an open connection"
    );
}

#[test]
fn on_disconnect_runs_once_when_the_client_drops_the_connection() {
    let (handle, port, count, _) = counting_server();
    let conn = rpyc::connect("127.0.0.1", port).unwrap();
    let root = conn.root();
    drop(conn);
    // A remote object keeps its connection open.
    assert_eq!(root.call::<i64, _>("add", (2, 2)).unwrap(), 4);
    assert_stays(&count, 0);
    drop(root);
    expect_within("on_disconnect ran", Duration::from_secs(5), || {
        count.load(Ordering::SeqCst) >= 1
    });
    assert_stays(&count, 1);

    // A raw TCP client that vanishes after the handshake counts too.
    let mut raw = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut hello = [0u8; 16];
    raw.read_exact(&mut hello).unwrap();
    raw.write_all(&hello).unwrap();
    expect_within(
        "the server counted the raw client",
        Duration::from_secs(5),
        || handle.connections() == 1,
    );
    drop(raw);
    expect_within("on_disconnect ran again", Duration::from_secs(5), || {
        count.load(Ordering::SeqCst) >= 2
    });
    assert_stays(&count, 2);
    handle.close();
    assert_eq!(count.load(Ordering::SeqCst), 2);
}

#[test]
fn on_disconnect_runs_on_the_client_when_the_server_closes() {
    let (handle, port, _, _) = counting_server();
    let count = Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    let me = Service::new("client").on_disconnect(move |_| {
        c.fetch_add(1, Ordering::SeqCst);
    });
    let conn = Options::new()
        .service(me)
        .connect("127.0.0.1", port)
        .unwrap();
    conn.ping().unwrap();
    handle.close();
    assert!(conn.wait_closed_timeout(Duration::from_secs(5)));
    expect_within(
        "the client's on_disconnect ran",
        Duration::from_secs(5),
        || count.load(Ordering::SeqCst) >= 1,
    );
    conn.close();
    assert_stays(&count, 1);
}

#[test]
fn closed_state_is_reported_by_is_closed_close_reason_and_wait_closed() {
    let busy = busy_server();
    let conn = rpyc::connect("127.0.0.1", busy.port).unwrap();
    assert!(!conn.is_closed());
    assert_eq!(conn.close_reason(), None);
    let start = Instant::now();
    assert!(!conn.wait_closed_timeout(Duration::from_millis(100)));
    assert!(start.elapsed() >= Duration::from_millis(100));

    // wait_closed and wait_closed_timeout wake up when another thread closes.
    let (tx, rx) = mpsc::channel();
    let waiter = conn.clone();
    thread::spawn(move || {
        waiter.wait_closed();
        tx.send(Instant::now()).unwrap();
    });
    let other = conn.clone();
    let timed = thread::spawn(move || other.wait_closed_timeout(Duration::from_secs(10)));
    thread::sleep(Duration::from_millis(100));
    let closed_at = Instant::now();
    conn.close();
    let woke = rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert!(woke.duration_since(closed_at) < Duration::from_secs(1));
    assert!(timed.join().unwrap());

    assert!(conn.is_closed());
    let reason = conn
        .close_reason()
        .expect("a closed connection has a reason");
    assert!(reason.contains("this side"), "{reason}");
    assert!(conn.wait_closed_timeout(Duration::ZERO));

    // The server's side of it learns that the peer closed.
    let (tx, rx) = mpsc::channel();
    let service =
        Service::new("watcher").method_with_context("watch", move |cx: &rpyc::Context| {
            let c = cx.connection();
            let tx = tx.clone();
            thread::spawn(move || {
                c.wait_closed();
                let _ = tx.send(c.close_reason());
            });
        });
    let server = ThreadedServer::new(service).build().unwrap();
    let port = server.port();
    let handle = server.spawn().unwrap();
    let conn = rpyc::connect("127.0.0.1", port).unwrap();
    conn.root().call::<(), _>("watch", ()).unwrap();
    conn.close();
    let reason = rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert!(reason.is_some_and(|r| r.contains("peer")));
    handle.close();
    busy.handle.close();
}

#[test]
fn close_interrupts_a_call_blocked_writing_to_a_peer_that_does_not_read() {
    // This peer reads our first frame (a ping) and then nothing: a large call fills the
    // socket buffers and its write blocks.
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let port = fake_peer(move |s| {
        let _ = release_rx.recv_timeout(Duration::from_secs(10));
        drop(s);
    });
    let conn = rpyc::connect("127.0.0.1", port).unwrap();
    let _ = conn.ping_timeout(Duration::from_millis(1));
    let root = conn.root();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let big = rpyc::Bytes::from(vec![7u8; 32 << 20]);
        let r = root.call::<(), _>("store", (big,));
        let _ = tx.send(r);
    });
    // Give the writer time to fill the buffers and block (it cannot finish either way).
    assert!(rx.recv_timeout(Duration::from_millis(500)).is_err());
    let start = Instant::now();
    conn.close();
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "close waited for the writer"
    );
    let r = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("the blocked writer was not released by close");
    assert_closed(r);
    release_tx.send(()).unwrap();
}

#[test]
fn on_disconnect_runs_even_when_the_peer_leaves_during_on_connect() {
    let connects = Arc::new(AtomicUsize::new(0));
    let disconnects = Arc::new(AtomicUsize::new(0));
    let (c, d) = (connects.clone(), disconnects.clone());
    let service = Service::new("slow_hello")
        .on_connect(move |_| {
            c.fetch_add(1, Ordering::SeqCst);
            // The peer is gone before this returns.
            thread::sleep(Duration::from_millis(100));
        })
        .on_disconnect(move |_| {
            d.fetch_add(1, Ordering::SeqCst);
        });
    let server = ThreadedServer::new(service).build().unwrap();
    let port = server.port();
    let handle = server.spawn().unwrap();
    for n in 1..=3 {
        let mut raw = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let mut hello = [0u8; 16];
        raw.read_exact(&mut hello).unwrap();
        raw.write_all(&hello).unwrap();
        expect_within("on_connect ran", Duration::from_secs(5), || {
            connects.load(Ordering::SeqCst) == n
        });
        drop(raw);
        expect_within("on_disconnect ran", Duration::from_secs(5), || {
            disconnects.load(Ordering::SeqCst) == n
        });
    }
    handle.close();
    assert_eq!(connects.load(Ordering::SeqCst), 3);
    assert_eq!(disconnects.load(Ordering::SeqCst), 3);
}

#[test]
fn the_server_reads_the_connection_while_on_connect_runs_and_sees_a_client_leave() {
    // The hook waits for the connection to close: only a thread reading it meanwhile can
    // notice that the client left.
    let bound = Duration::from_secs(10);
    let (tx, rx) = mpsc::channel();
    let service = Service::new("waits_for_close").on_connect(move |cx| {
        let _ = tx.send(cx.connection().wait_closed_timeout(bound));
    });
    let server = ThreadedServer::new(service).build().unwrap();
    let port = server.port();
    let handle = server.spawn().unwrap();
    let conn = rpyc::connect("127.0.0.1", port).unwrap();
    conn.close();
    let seen = rx.recv_timeout(bound * 2).expect("on_connect returned");
    assert!(
        seen,
        "on_connect did not see the client leave within {bound:?}"
    );
    handle.close();
}

#[test]
fn close_timeout_of_duration_max_means_no_limit() {
    // `Duration::MAX` is "no limit" wherever a timeout is taken: it must wait, not overflow
    // the clock. With no handler running there is nothing to wait for.
    let server = common::serve(Service::new("s").method("nothing", || ()));
    let conn = common::connect(&server);
    conn.root().call::<(), _>("nothing", ()).unwrap();
    conn.close();
    assert!(server.handle.close_timeout(Duration::MAX));
}
