//! Many threads on one connection: every reply reaches its own caller, nested callbacks do
//! not deadlock, callbacks are served while the client is idle, a slow handler does not hold
//! up other calls, and async and oneway calls behave as documented.

mod common;

use common::{connect, connect_with, options, serve, serve_with, wait_until, CALL_TIMEOUT, SETTLE};
use rpyc::{Connection, Context, Error, RemoteObject, Service, Timeout};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::thread::{self, ThreadId};
use std::time::Duration;

#[test]
fn connection_and_remote_objects_are_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Connection>();
    send_sync::<RemoteObject>();
    send_sync::<rpyc::AsyncResult<i64>>();
}

#[test]
fn each_thread_gets_its_own_reply() {
    const THREADS: u64 = 32;
    const CALLS: u64 = 2_000;
    let svc = Service::new("echo").method("echo", |t: u64, i: u64, pad: String| {
        // Vary handler time so replies come back out of order.
        if (t + i) % 97 == 0 {
            thread::sleep(Duration::from_millis(1));
        } else if (t + i) % 5 == 0 {
            thread::yield_now();
        }
        (t, i, t * 1_000_000 + i, pad)
    });
    let server = serve(svc);
    let conn = connect(&server);

    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let conn = conn.clone();
            thread::spawn(move || {
                let root = conn.root();
                for i in 0..CALLS {
                    // Different sizes, so frames of different lengths interleave.
                    let pad = "x".repeat(((t * 31 + i) % 200) as usize);
                    let r: (u64, u64, u64, String) =
                        root.call("echo", (t, i, pad.clone())).unwrap();
                    assert_eq!(
                        r,
                        (t, i, t * 1_000_000 + i, pad),
                        "thread {t} got another reply"
                    );
                }
                CALLS
            })
        })
        .collect();
    let total: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(total, THREADS * CALLS);
    assert!(!conn.is_closed());
}

/// Depth of the nested chains below: client -> server -> client -> ... this many times each way.
const DEPTH: u32 = 12;

#[test]
fn nested_calls_through_both_services_do_not_deadlock() {
    // Small pools: if nested requests needed pool workers instead of running on the threads
    // waiting for them, these chains would starve and time out.
    let server_svc = Service::new("server").method_with_context(
        "down",
        |cx: &Context, n: u32| -> Result<Vec<String>, Error> {
            let mut path = vec![format!("server {n}")];
            if n > 0 {
                path.extend(cx.peer_root().call::<Vec<String>, _>("up", (n - 1,))?);
            }
            Ok(path)
        },
    );
    let server = serve_with(server_svc, |b| b.max_workers(2));

    let client_threads: Arc<Mutex<Vec<ThreadId>>> = Arc::default();
    let seen = client_threads.clone();
    let client_svc = Service::new("client").method_with_context(
        "up",
        move |cx: &Context, n: u32| -> Result<Vec<String>, Error> {
            seen.lock().unwrap().push(thread::current().id());
            let mut path = vec![format!("client {n}")];
            path.extend(cx.peer_root().call::<Vec<String>, _>("down", (n,))?);
            Ok(path)
        },
    );
    let conn = options()
        .max_workers(2)
        .service(client_svc)
        .connect("127.0.0.1", server.port)
        .unwrap();

    let path: Vec<String> = conn.root().call("down", (DEPTH,)).unwrap();
    let mut want = vec![format!("server {DEPTH}")];
    for n in (0..DEPTH).rev() {
        want.push(format!("client {n}"));
        want.push(format!("server {n}"));
    }
    assert_eq!(path, want);
    // Documented: the peer's nested requests run on the thread that waits for the call.
    let ran_on = client_threads.lock().unwrap().clone();
    assert_eq!(ran_on.len(), DEPTH as usize);
    assert!(
        ran_on.iter().all(|id| *id == thread::current().id()),
        "{ran_on:?}"
    );
}

/// A callback that calls the server's `down` again with a new callback like itself.
fn bouncer(conn: Arc<OnceLock<Connection>>) -> Service {
    rpyc::callback(move |n: u32| -> Result<u32, Error> {
        let c = conn.get().expect("connected");
        let below: u32 = c.root().call("down", (n - 1, bouncer(conn.clone())))?;
        Ok(below + 1)
    })
}

#[test]
fn nested_callbacks_twelve_deep_from_many_threads_do_not_deadlock() {
    let server_svc = Service::new("server").method("down", |n: u32, cb: RemoteObject| {
        if n == 0 {
            Ok(0)
        } else {
            cb.invoke::<u32, _>((n,)).map(|below| below + 1)
        }
    });
    let server = serve_with(server_svc, |b| b.max_workers(4));
    let conn = options()
        .max_workers(2)
        .connect("127.0.0.1", server.port)
        .unwrap();
    let cell = Arc::new(OnceLock::new());
    cell.set(conn.clone()).unwrap();

    let threads: Vec<_> = (0..6)
        .map(|_| {
            let conn = conn.clone();
            let cell = cell.clone();
            thread::spawn(move || {
                (0..5)
                    .map(|_| {
                        conn.root()
                            .call::<u32, _>("down", (DEPTH, bouncer(cell.clone())))
                    })
                    .collect::<Result<Vec<u32>, Error>>()
            })
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap().unwrap(), vec![2 * DEPTH; 5]);
    }
    conn.close(); // the cell's handle would keep the connection open
}

#[test]
fn callbacks_are_served_while_the_client_is_idle() {
    let svc = Service::new("server").method("start_ticking", |n: u32, cb: RemoteObject| {
        // Calls the client back from a thread of the server's, after this call returned.
        thread::spawn(move || {
            for i in 0..n {
                let echoed: u32 = cb.invoke((i,)).expect("the idle client answers");
                assert_eq!(echoed, i);
            }
        });
    });
    let server = serve(svc);
    let conn = connect(&server);

    let (tx, rx) = mpsc::channel::<(u32, ThreadId)>();
    let tx = Mutex::new(tx);
    let cb = rpyc::callback(move |i: u32| {
        tx.lock()
            .unwrap()
            .send((i, thread::current().id()))
            .unwrap();
        i
    });
    conn.root()
        .call::<(), _>("start_ticking", (100u32, cb))
        .unwrap();
    // This thread does nothing with the connection now: it only waits on the channel.
    for want in 0..100 {
        let (i, on) = rx
            .recv_timeout(SETTLE)
            .expect("a callback while the client idles");
        assert_eq!(i, want);
        assert_ne!(on, thread::current().id());
    }
}

#[test]
fn slow_handler_does_not_hold_up_other_calls_on_the_same_connection() {
    // `slow` stays busy until the test has finished its other calls (at most 20 s), so the
    // outcome depends on ordering alone, not on how fast this machine is.
    let (started_tx, started_rx) = mpsc::channel::<()>();
    let started_tx = Mutex::new(started_tx);
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let release_rx = Mutex::new(release_rx);
    let svc = Service::new("server")
        .method("slow", move || {
            started_tx.lock().unwrap().send(()).unwrap();
            let _ = release_rx
                .lock()
                .unwrap()
                .recv_timeout(Duration::from_secs(20));
            "slow"
        })
        .method("fast", |i: u32| i);
    let server = serve(svc);
    let conn = connect(&server);
    // Blocked behind `slow`, a fast call would fail with a timeout long before `slow` ends.
    let fast_limit = Duration::from_secs(5);

    let (done_tx, done_rx) = mpsc::channel::<&'static str>();
    let slow = {
        let conn = conn.clone();
        let done = done_tx.clone();
        thread::spawn(move || {
            let r: Result<String, Error> =
                conn.root()
                    .call_timeout("slow", (), Duration::from_secs(30));
            done.send("slow").unwrap();
            r
        })
    };
    started_rx.recv_timeout(SETTLE).expect("slow started");

    // While `slow` runs: sync calls from this thread and another, and async calls.
    let other = {
        let conn = conn.clone();
        thread::spawn(move || {
            (0..50).all(|i| {
                conn.root()
                    .call_timeout::<u32, _>("fast", (i,), fast_limit)
                    .unwrap()
                    == i
            })
        })
    };
    for i in 0..50u32 {
        let r: u32 = conn.root().call_timeout("fast", (i,), fast_limit).unwrap();
        assert_eq!(r, i);
    }
    let pending: Vec<_> = (0..50u32)
        .map(|i| conn.root().call_async::<u32, _>("fast", (i,)).unwrap())
        .collect();
    for (i, p) in pending.into_iter().enumerate() {
        assert_eq!(p.value_timeout(fast_limit).unwrap(), i as u32);
    }
    assert!(other.join().unwrap());
    done_tx.send("fast").unwrap();
    release_tx.send(()).unwrap();

    assert_eq!(
        done_rx.recv_timeout(SETTLE).unwrap(),
        "fast",
        "fast calls waited for slow"
    );
    assert_eq!(done_rx.recv_timeout(SETTLE).unwrap(), "slow");
    assert_eq!(slow.join().unwrap().unwrap(), "slow");
}

/// The test's ends of a server whose `gated(tag)` calls return only when the test opens the
/// gate: `started` receives each call's tag when it starts, `gate` lets one call return
/// `(its tag, the value sent)`.
struct Gate {
    server: common::TestServer,
    started: mpsc::Receiver<u32>,
    gate: mpsc::Sender<u32>,
}

fn gated_server() -> Gate {
    gated_server_with(64)
}

/// [`gated_server`] running at most `workers` handlers per connection.
fn gated_server_with(workers: usize) -> Gate {
    let (gate_tx, gate_rx) = mpsc::channel::<u32>();
    let gate_rx = Mutex::new(gate_rx);
    let (started_tx, started_rx) = mpsc::channel::<u32>();
    let started_tx = Mutex::new(started_tx);
    let svc = Service::new("server")
        .method("gated", move |tag: u32| -> Result<(u32, u32), String> {
            started_tx.lock().unwrap().send(tag).unwrap();
            let value = gate_rx
                .lock()
                .unwrap()
                .recv_timeout(CALL_TIMEOUT)
                .map_err(|e| format!("the gate never opened: {e}"))?;
            Ok((tag, value))
        })
        .method("echo", |i: u64| {
            if i % 13 == 0 {
                thread::sleep(Duration::from_millis(1));
            }
            i
        })
        .method("fail", |why: String| -> Result<(), String> { Err(why) });
    Gate {
        server: serve_with(svc, |b| b.max_workers(workers)),
        started: started_rx,
        gate: gate_tx,
    }
}

#[test]
fn async_call_ready_wait_timeout_wait_and_value() {
    let g = gated_server();
    let conn = connect(&g.server);

    let p = conn
        .root()
        .call_async::<(u32, u32), _>("gated", (1,))
        .unwrap();
    assert_eq!(g.started.recv_timeout(SETTLE).unwrap(), 1);
    assert!(!p.is_ready(), "ready before the handler returned");
    match p.wait_timeout(Duration::from_millis(50)) {
        Err(Error::Timeout(Timeout::Call { method, .. })) => assert_eq!(method, "root.gated"),
        other => panic!("expected a call timeout, got {other:?}"),
    }
    // A timed-out wait leaves the call pending; other calls go on meanwhile.
    assert!(!p.is_ready());
    assert_eq!(conn.root().call::<u64, _>("echo", (7,)).unwrap(), 7);

    g.gate.send(42).unwrap();
    p.wait().unwrap();
    assert!(p.is_ready());
    p.wait_timeout(Duration::ZERO).unwrap(); // the reply is kept: waiting again is instant
    assert!(p.is_ready());
    assert_eq!(p.value().unwrap(), (1, 42));

    // ready() turns true by itself, without waiting.
    let q = conn
        .root()
        .call_async::<(u32, u32), _>("gated", (2,))
        .unwrap();
    g.gate.send(7).unwrap();
    assert!(wait_until(SETTLE, || q.is_ready()));
    assert_eq!(q.value().unwrap(), (2, 7));

    // Failures come out of value().
    let f = conn.root().call_async::<(), _>("fail", ("nope",)).unwrap();
    f.wait().unwrap();
    match f.value() {
        Err(Error::Remote(e)) => assert_eq!((e.method(), e.message()), ("fail", "nope")),
        other => panic!("expected Error::Remote, got {other:?}"),
    }
    let d = conn.root().call_async::<String, _>("echo", (1,)).unwrap();
    assert!(matches!(d.value(), Err(Error::Decode(_))));
}

#[test]
fn ready_does_not_block_while_another_thread_waits() {
    let g = gated_server();
    let conn = connect(&g.server);
    let p = conn
        .root()
        .call_async::<(u32, u32), _>("gated", (1,))
        .unwrap();
    assert_eq!(g.started.recv_timeout(SETTLE).unwrap(), 1);
    let (tx, rx) = mpsc::channel::<bool>();
    let p_ref = &p;
    thread::scope(|s| {
        let waiter = s.spawn(move || p_ref.wait());
        // Give the waiter time to block in wait(); ready() must answer regardless.
        thread::sleep(Duration::from_millis(100));
        s.spawn(move || tx.send(p_ref.is_ready()).unwrap());
        let answered = rx.recv_timeout(SETTLE);
        g.gate.send(5).unwrap();
        assert_eq!(answered, Ok(false), "ready() blocked behind wait()");
        waiter.join().unwrap().unwrap();
    });
    assert!(p.is_ready());
    assert_eq!(p.value().unwrap(), (1, 5));
}

#[test]
fn abandoned_async_call_does_not_disturb_later_calls() {
    let g = gated_server();
    let conn = connect(&g.server);

    let p = conn
        .root()
        .call_async::<(u32, u32), _>("gated", (1,))
        .unwrap();
    assert_eq!(g.started.recv_timeout(SETTLE).unwrap(), 1);
    drop(p); // abandoned: its reply must be dropped, not handed to anyone else
    let q = conn
        .root()
        .call_async::<(u32, u32), _>("gated", (2,))
        .unwrap();
    assert_eq!(g.started.recv_timeout(SETTLE).unwrap(), 2);
    // Both handlers wait at the gate; either may return first.
    g.gate.send(10).unwrap();
    g.gate.send(20).unwrap();
    let (tag, value) = q.value().unwrap();
    assert_eq!(tag, 2, "got the abandoned call's reply");
    assert!(value == 10 || value == 20, "{value}");
    for i in 0..100 {
        assert_eq!(conn.root().call::<u64, _>("echo", (i,)).unwrap(), i);
    }
    assert!(!conn.is_closed());
}

#[test]
fn at_most_max_workers_handlers_run_at_once_and_one_is_enough() {
    for workers in [1u32, 3] {
        let g = gated_server_with(workers as usize);
        let conn = connect(&g.server);
        let calls: Vec<_> = (0..=workers)
            .map(|tag| {
                conn.root()
                    .call_async::<(u32, u32), _>("gated", (tag,))
                    .unwrap()
            })
            .collect();
        let mut started: Vec<u32> = (0..workers)
            .map(|_| {
                g.started
                    .recv_timeout(SETTLE)
                    .unwrap_or_else(|_| panic!("max_workers({workers}): a handler never started"))
            })
            .collect();
        assert!(
            g.started.recv_timeout(Duration::from_millis(200)).is_err(),
            "max_workers({workers}): more handlers ran at once"
        );
        // One handler returns: the queued request gets its worker.
        g.gate.send(0).unwrap();
        started.push(
            g.started
                .recv_timeout(SETTLE)
                .expect("the queued request never started"),
        );
        for _ in 0..workers {
            g.gate.send(0).unwrap();
        }
        let mut tags: Vec<u32> = calls.into_iter().map(|c| c.value().unwrap().0).collect();
        tags.sort_unstable();
        started.sort_unstable();
        assert_eq!(tags, (0..=workers).collect::<Vec<_>>());
        assert_eq!(started, tags);
    }
}

#[test]
fn pipelined_async_calls_each_get_their_own_result() {
    let g = gated_server();
    let conn = connect(&g.server);

    let pending: Vec<_> = (0..2_000u64)
        .map(|i| conn.root().call_async::<u64, _>("echo", (i,)).unwrap())
        .collect();
    // Another thread makes synchronous calls meanwhile.
    let sync = {
        let conn = conn.clone();
        thread::spawn(move || {
            (10_000..10_200u64).all(|i| conn.root().call::<u64, _>("echo", (i,)).unwrap() == i)
        })
    };
    // Collected in reverse order of sending.
    for (i, p) in pending.into_iter().enumerate().rev() {
        assert_eq!(p.value().unwrap(), i as u64);
    }
    assert!(sync.join().unwrap());
}

#[test]
fn async_results_can_be_collected_on_other_threads() {
    let g = gated_server();
    let conn = connect(&g.server);
    let pending: Vec<_> = (0..200u64)
        .map(|i| (i, conn.root().call_async::<u64, _>("echo", (i,)).unwrap()))
        .collect();
    let collectors: Vec<_> = pending
        .into_iter()
        .map(|(i, p)| thread::spawn(move || p.value().unwrap() == i))
        .collect();
    assert!(collectors.into_iter().all(|t| t.join().unwrap()));
}

#[test]
fn oneway_calls_run_on_the_server() {
    let seen: Arc<Mutex<Vec<u32>>> = Arc::default();
    let record = seen.clone();
    let failures = Arc::new(AtomicUsize::new(0));
    let failed = failures.clone();
    let svc = Service::new("server")
        .method("record", move |i: u32| record.lock().unwrap().push(i))
        .method("fail", move || -> Result<(), String> {
            failed.fetch_add(1, Ordering::SeqCst);
            Err("oneway failure".into())
        })
        .method("count", {
            let seen = seen.clone();
            move || seen.lock().unwrap().len()
        });
    let server = serve(svc);
    let conn = connect(&server);

    for i in 0..100u32 {
        conn.root().call_oneway("record", (i,)).unwrap();
    }
    // Failing and unknown oneways are only logged on the server; the sender sees nothing.
    conn.root().call_oneway("fail", ()).unwrap();
    conn.root().call_oneway("no_such_method", (1, 2)).unwrap();
    conn.root()
        .call_oneway("record", ("not a number",))
        .unwrap();

    assert!(
        wait_until(SETTLE, || seen.lock().unwrap().len() == 100),
        "oneways did not all run"
    );
    let mut got = seen.lock().unwrap().clone();
    got.sort_unstable(); // oneways start in order but may finish in any order
    assert_eq!(got, (0..100).collect::<Vec<_>>());
    assert!(wait_until(SETTLE, || failures.load(Ordering::SeqCst) == 1));

    assert_eq!(conn.root().call::<usize, _>("count", ()).unwrap(), 100);
    assert!(!conn.is_closed());
}

#[test]
fn oneway_from_a_client_service_makes_the_server_call_back() {
    let svc = Service::new("server").method_with_context("please_call", |cx: &Context, n: u32| {
        for i in 0..n {
            cx.peer_root()
                .call::<(), _>("note", (i,))
                .expect("client answers");
        }
    });
    let server = serve(svc);
    let (tx, rx) = mpsc::channel::<u32>();
    let tx = Mutex::new(tx);
    let client =
        Service::new("client").method("note", move |i: u32| tx.lock().unwrap().send(i).unwrap());
    let conn = connect_with(&server, client);
    conn.root().call_oneway("please_call", (10u32,)).unwrap();
    let got: Vec<u32> = (0..10).map(|_| rx.recv_timeout(SETTLE).unwrap()).collect();
    assert_eq!(got, (0..10).collect::<Vec<_>>());
}

/// `n` bytes that depend on `seed`, so a mixed-up payload is caught.
fn pattern(n: usize, seed: u8) -> rpyc::Bytes {
    rpyc::Bytes::from(
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect::<Vec<u8>>(),
    )
}

/// Checks a payload made by `pattern`; returns its length.
fn checked(b: &rpyc::Bytes, seed: u8) -> Result<usize, String> {
    if *b == pattern(b.len(), seed) {
        Ok(b.len())
    } else {
        Err(format!("payload with seed {seed} arrived corrupted"))
    }
}

#[test]
fn large_payloads_both_ways_at_once_do_not_deadlock() {
    // Far more than both sockets buffer, so each side must read while it writes.
    const SIZE: usize = 16 << 20;
    let server = serve(
        Service::new("bulk")
            .method("sink", |b: rpyc::Bytes| checked(&b, 1))
            // Sends SIZE bytes to the client while the client is sending to us.
            .method_with_context("push", |cx: &Context| -> Result<usize, Error> {
                cx.peer_root().call("sink", (pattern(SIZE, 2),))
            }),
    );
    let client = Service::new("client").method("sink", |b: rpyc::Bytes| checked(&b, 2));
    let conn = Arc::new(connect_with(&server, client));
    let (c1, c2) = (conn.clone(), conn.clone());
    let up = thread::spawn(move || -> Result<(), Error> {
        for _ in 0..2 {
            assert_eq!(
                c1.root().call::<usize, _>("sink", (pattern(SIZE, 1),))?,
                SIZE
            );
        }
        Ok(())
    });
    let down = thread::spawn(move || -> Result<(), Error> {
        for _ in 0..2 {
            assert_eq!(c2.root().call::<usize, _>("push", ())?, SIZE);
        }
        Ok(())
    });
    up.join()
        .unwrap()
        .expect("upload failed (a deadlock times out)");
    down.join()
        .unwrap()
        .expect("download failed (a deadlock times out)");
}
