//! The threading promises of `rpyc::python` connections, checked between a Rust RPyC 6 client
//! and a Rust RPyC 6 server (both speak Python RPyC's protocol; the tests against the real
//! Python package are in `python_client.rs` and `python_server.rs`): shared connections,
//! nested callbacks, deadlines, a dying peer, and the worker limit.

mod common;

use common::CALL_TIMEOUT;
use rpyc::python::{self, Call, Client, PyObject, Service, Value};
use rpyc::{Error, Options, PythonError, ServerBuilder, ServerHandle};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

fn service() -> Service {
    Service::new("Pair")
        .method("add", |a: i64, b: i64| a + b)
        .method("sleep", |secs: f64| {
            thread::sleep(Duration::from_secs_f64(secs));
            secs
        })
        // Calls `cb(n - 1)`; the callback calls `bounce` again, and so on down to 0.
        .method_with_call("bounce", |call: &Call| -> Result<Value, PythonError> {
            let cb: PyObject = call.args()[0].clone().get()?;
            let n: i64 = call.args()[1].clone().get()?;
            if n == 0 {
                return Ok(Value::Int(0));
            }
            let depth: i64 = cb.call((n - 1,))?;
            Ok(Value::Int(depth + 1))
        })
}

fn serve(setup: impl FnOnce(ServerBuilder) -> ServerBuilder) -> ServerHandle {
    setup(
        python::serve(service())
            .hostname("127.0.0.1")
            .port(0)
            .call_timeout(CALL_TIMEOUT),
    )
    .build()
    .expect("bind")
    .spawn()
    .expect("spawn")
}

fn client(call_timeout: Duration) -> Client {
    Client::new(Options::new().call_timeout(call_timeout))
}

#[test]
fn threads_sharing_a_connection_each_get_their_own_reply() {
    let server = serve(|b| b);
    let py = client(CALL_TIMEOUT)
        .connect("127.0.0.1", server.port())
        .unwrap();
    let root = py.root().unwrap();
    let threads: Vec<_> = (0..8i64)
        .map(|t| {
            let root = root.clone();
            thread::spawn(move || {
                for i in 0..200i64 {
                    let sum: i64 = root.call_method("add", (t * 1000, i)).unwrap();
                    assert_eq!(sum, t * 1000 + i);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    server.close();
}

#[test]
fn callbacks_nest_twenty_deep_without_deadlock() {
    let server = serve(|b| b);
    let py = client(CALL_TIMEOUT)
        .connect("127.0.0.1", server.port())
        .unwrap();
    let root = py.root().unwrap();
    // The client's callback calls the server's `bounce` again: each level is a request nested
    // in a waiting call, on both sides.
    // A callback that recurses through the server needs itself as an argument: pass the
    // callback object along.
    let holder: Arc<std::sync::OnceLock<Service>> = Arc::new(std::sync::OnceLock::new());
    let inner = holder.clone();
    let r2 = root.clone();
    let recurse = python::callback(move |n: i64| -> Result<i64, PythonError> {
        let me = inner.get().expect("set").clone();
        Ok(r2.call_method("bounce", (me, n))?)
    });
    holder.set(recurse.clone()).ok();
    let depth: i64 = root.call_method("bounce", (recurse, 20)).unwrap();
    assert_eq!(depth, 20);
    server.close();
}

#[test]
fn a_timed_out_call_leaves_the_connection_usable() {
    let server = serve(|b| b);
    let timeout = Duration::from_millis(300);
    let py = client(timeout).connect("127.0.0.1", server.port()).unwrap();
    let root = py.root().unwrap();
    let started = Instant::now();
    let err = root
        .call_method::<f64, _>("sleep", (timeout.as_secs_f64() * 4.0,))
        .unwrap_err();
    let took = started.elapsed();
    assert!(
        matches!(err, Error::Timeout(rpyc::Timeout::Call { .. })),
        "{err}"
    );
    assert!(took >= timeout && took < timeout * 3, "{took:?}");
    assert!(err.to_string().contains("sleep"), "{err}");
    let sum: i64 = root.call_method("add", (20, 22)).unwrap();
    assert_eq!(sum, 42);
    server.close();
}

#[test]
fn the_peer_closing_fails_every_waiting_call_at_once() {
    let server = serve(|b| b);
    let py = client(CALL_TIMEOUT)
        .connect("127.0.0.1", server.port())
        .unwrap();
    let root = py.root().unwrap();
    let ready = Arc::new(Barrier::new(5));
    let waiting: Vec<_> = (0..4)
        .map(|_| {
            let root = root.clone();
            let ready = ready.clone();
            thread::spawn(move || {
                ready.wait();
                let started = Instant::now();
                let r = root.call_method::<f64, _>("sleep", (CALL_TIMEOUT.as_secs_f64(),));
                (r, started.elapsed())
            })
        })
        .collect();
    ready.wait();
    thread::sleep(Duration::from_millis(200));
    server.close_timeout(Duration::ZERO);
    for w in waiting {
        let (r, took) = w.join().unwrap();
        let err = r.unwrap_err();
        assert!(matches!(err, Error::Closed { .. }), "{err}");
        assert!(took < CALL_TIMEOUT / 2, "failed only after {took:?}");
    }
    // Later calls fail fast with the same reason.
    let started = Instant::now();
    assert!(matches!(
        root.call_method::<i64, _>("add", (1, 2)),
        Err(Error::Closed { .. })
    ));
    assert!(started.elapsed() < CALL_TIMEOUT / 10);
    assert!(py.is_closed());
}

#[test]
fn requests_beyond_max_workers_are_refused_with_a_python_error_not_queued() {
    let server = serve(|b| b.max_workers(2));
    let py = client(CALL_TIMEOUT)
        .connect("127.0.0.1", server.port())
        .unwrap();
    let root = py.root().unwrap();
    let ready = Arc::new(Barrier::new(4));
    let calls: Vec<_> = (0..4)
        .map(|_| {
            let root = root.clone();
            let ready = ready.clone();
            thread::spawn(move || {
                ready.wait();
                root.call_method::<f64, _>("sleep", (1.0,))
            })
        })
        .collect();
    let results: Vec<_> = calls.into_iter().map(|c| c.join().unwrap()).collect();
    let refused: Vec<_> = results
        .iter()
        .filter_map(|r| match r {
            Err(Error::Python(e)) => Some(e),
            _ => None,
        })
        .collect();
    assert_eq!(
        results.iter().filter(|r| r.is_ok()).count(),
        2,
        "{results:?}"
    );
    assert_eq!(refused.len(), 2, "{results:?}");
    for e in refused {
        assert!(e.is("RuntimeError"), "{e}");
        assert!(e.message().contains("max_workers"), "{e}");
    }
    // The connection carries on.
    let sum: i64 = root.call_method("add", (1, 2)).unwrap();
    assert_eq!(sum, 3);
    server.close();
}

#[test]
fn objects_sent_to_the_peer_are_released_when_it_drops_them() {
    let server = serve(|b| b);
    let py = client(CALL_TIMEOUT)
        .connect("127.0.0.1", server.port())
        .unwrap();
    let root = py.root().unwrap();
    let cb = python::callback(|n: i64| n);
    for _ in 0..50 {
        let depth: i64 = root.call_method("bounce", (cb.clone(), 0)).unwrap();
        assert_eq!(depth, 0);
    }
    // The server dropped each proxy of the callback after its call: our table empties.
    common::expect_within("the server released our callback", common::SETTLE, || {
        py.exported_count() == 0
    });
    server.close();
}
