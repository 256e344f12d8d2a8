//! Threads: once its clients have closed and the server is closed, nothing the crate started
//! is left running, over plain TCP and over TLS. (Its own test binary with one test, so no
//! other test's threads count.)

mod common;

use common::procfs::thread_names;
use rpyc::{Options, RemoteObject, Service, ThreadedServer};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

#[test]
fn closing_clients_and_server_leaves_no_threads_behind() {
    exercise_then_close(None);
    let pki = common::tls::pki();
    exercise_then_close(Some(&pki));
}

/// Runs a server and four clients through every kind of call (over TLS with `tls`), closes
/// them in every way, and checks that the thread count is back to where it started.
fn exercise_then_close(tls: Option<&common::tls::Pki>) {
    let baseline = thread_names();

    let service = Service::new("svc")
        .method("add", |a: i64, b: i64| a + b)
        .method("sleep_ms", |ms: u64| {
            thread::sleep(Duration::from_millis(ms))
        })
        .method(
            "countdown",
            |n: u32, tick: RemoteObject| -> Result<u32, rpyc::Error> {
                for i in (1..=n).rev() {
                    tick.invoke::<(), _>((i,))?;
                }
                Ok(n)
            },
        )
        .method("new_counter", || {
            let n = Arc::new(AtomicI64::new(0));
            Service::new("counter").method("incr", move |by: i64| {
                n.fetch_add(by, Ordering::SeqCst) + by
            })
        })
        .method_with_context(
            "ask_client",
            |cx: &rpyc::Context| -> Result<String, rpyc::Error> { cx.peer_root().call("name", ()) },
        );
    let mut server = ThreadedServer::new(service);
    if let Some(p) = tls {
        server = server.authenticator(p.authenticator());
    }
    let server = server.build().unwrap();
    let port = server.port();
    let handle = server.spawn().unwrap();

    let tls_client = tls.map(|p| p.tls());
    let clients: Vec<_> = (0..4)
        .map(|i| {
            let tls_client = tls_client.clone();
            thread::spawn(move || {
                let me = Service::new("client").method("name", move || format!("client {i}"));
                let options = Options::new().service(me);
                let conn = match tls_client {
                    Some(c) => options.tls(c).connect("localhost", port).unwrap(),
                    None => options.connect("127.0.0.1", port).unwrap(),
                };
                let root = conn.root();
                // Concurrent calls on one connection make each side's pool grow.
                let pending: Vec<_> = (0..8)
                    .map(|_| root.call_async::<(), _>("sleep_ms", (50u64,)).unwrap())
                    .collect();
                for p in pending {
                    p.value().unwrap();
                }
                for j in 0..10 {
                    assert_eq!(root.call::<i64, _>("add", (i, j)).unwrap(), i + j);
                }
                let ticks = Arc::new(AtomicI64::new(0));
                let t = ticks.clone();
                let cb = rpyc::callback(move |_: u32| {
                    t.fetch_add(1, Ordering::SeqCst);
                });
                assert_eq!(root.call::<u32, _>("countdown", (5u32, cb)).unwrap(), 5);
                assert_eq!(ticks.load(Ordering::SeqCst), 5);
                let counter: RemoteObject = root.call("new_counter", ()).unwrap();
                assert_eq!(counter.call::<i64, _>("incr", (3,)).unwrap(), 3);
                assert_eq!(
                    root.call::<String, _>("ask_client", ()).unwrap(),
                    format!("client {i}")
                );
                root.call_oneway("add", (1, 1)).unwrap();
                conn.ping().unwrap();
                // One closes, one drops every handle, two stay open until the server closes.
                match i {
                    0 => conn.close(),
                    1 => drop(conn),
                    _ => return Some(conn),
                }
                None
            })
        })
        .collect();
    let open: Vec<_> = clients
        .into_iter()
        .filter_map(|c| c.join().unwrap())
        .collect();
    assert_eq!(open.len(), 2);
    let during = thread_names();
    assert!(
        during.len() > baseline.len() + 2,
        "the server and its open connections should be running threads: {during:?}"
    );
    handle.close();
    for conn in &open {
        assert!(conn.wait_closed_timeout(Duration::from_secs(5)));
    }

    // The server's threads are joined by close; the clients' end on their own just after.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = thread_names();
        if now.len() <= baseline.len() {
            assert_eq!(now.len(), baseline.len(), "{now:?} vs {baseline:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "threads left running: {:?} (before: {:?})",
            now,
            baseline
        );
        thread::sleep(Duration::from_millis(20));
    }
    drop(open);
}
