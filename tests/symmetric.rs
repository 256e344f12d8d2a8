//! Symmetric connections: a client exposes its own service and passes closures as callbacks;
//! the server calls them during a call and after it returned, from handlers and other threads.

mod common;

use common::{connect, connect_with, remote, serve, SETTLE};
use rpyc::{Connection, Context, Error, RemoteErrorKind, RemoteObject, Service};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

/// The client side's service: who it is, and arithmetic that proves arguments arrive.
fn client_service(name: &str) -> Service {
    let name = name.to_string();
    Service::new("client")
        .method("name", move || name.clone())
        .method("mul", |a: i64, b: i64| a * b)
        .method("fail", || -> Result<(), String> {
            Err("client says no".into())
        })
}

#[test]
fn server_handler_calls_the_client_service_during_a_call() {
    let svc = Service::new("server")
        .method_with_context("ask_name", |cx: &Context| -> Result<String, Error> {
            cx.peer_root().call("name", ())
        })
        .method_with_context(
            "square_on_client",
            |cx: &Context, x: i64| -> Result<i64, Error> {
                // Through the connection handle too, not just peer_root.
                cx.connection().root().call("mul", (x, x))
            },
        )
        .method_with_context("relay_failure", |cx: &Context| -> Result<String, String> {
            match cx.peer_root().call::<(), _>("fail", ()) {
                Err(Error::Remote(e)) => {
                    Ok(format!("{:?} {} {}", e.kind(), e.method(), e.message()))
                }
                other => Err(format!("unexpected {other:?}")),
            }
        });
    let server = serve(svc);
    let conn = connect_with(&server, client_service("alice"));
    let root = conn.root();

    assert_eq!(root.call::<String, _>("ask_name", ()).unwrap(), "alice");
    assert_eq!(root.call::<i64, _>("square_on_client", (12,)).unwrap(), 144);
    assert_eq!(
        root.call::<String, _>("relay_failure", ()).unwrap(),
        "Handler fail client says no"
    );

    // Each client is reached through its own connection.
    let other = connect_with(&server, client_service("bob"));
    assert_eq!(
        other.root().call::<String, _>("ask_name", ()).unwrap(),
        "bob"
    );
    assert_eq!(root.call::<String, _>("ask_name", ()).unwrap(), "alice");
}

#[test]
fn client_without_a_service_answers_no_such_method() {
    let svc = Service::new("server")
        .method_with_context("ask_name", |cx: &Context| -> Result<String, Error> {
            cx.peer_root().call("name", ())
        });
    let server = serve(svc);
    let conn = connect(&server);
    let e = remote(conn.root().call::<String, _>("ask_name", ()).unwrap_err());
    // The server's handler returned the client's NoSuchMethod as its own error.
    assert_eq!(e.kind(), RemoteErrorKind::Handler);
    assert_eq!(e.method(), "ask_name");
    assert!(e.message().contains("name"), "{e}");
    assert!(!conn.is_closed());
}

#[test]
fn server_keeps_the_connection_and_calls_the_client_later() {
    let stored: Arc<Mutex<Option<Connection>>> = Arc::default();
    let keep = stored.clone();
    let stored_for_oneway = stored.clone();
    let svc = Service::new("server")
        .method_with_context("remember_me", move |cx: &Context| {
            *keep.lock().unwrap() = Some(cx.connection());
        })
        // A oneway that makes the server call the client back from a thread of its own,
        // after the oneway itself has finished.
        .method("tick_later", move |n: i64| {
            let conn = stored_for_oneway
                .lock()
                .unwrap()
                .clone()
                .expect("remembered");
            std::thread::spawn(move || {
                for i in 0..n {
                    conn.root()
                        .call::<(), _>("tick", (i,))
                        .expect("the client answers");
                }
            });
        });
    let server = serve(svc);

    let (tx, rx) = mpsc::channel::<i64>();
    let tx = Mutex::new(tx);
    let client = client_service("carol").method("tick", move |i: i64| {
        tx.lock().unwrap().send(i).unwrap();
    });
    let conn = connect_with(&server, client);
    conn.root().call::<(), _>("remember_me", ()).unwrap();

    // The original call has returned. A server-side thread that is not a handler calls the
    // client through the stored connection.
    let server_side = stored.lock().unwrap().clone().expect("remembered");
    let from_thread = std::thread::spawn(move || {
        let name: String = server_side.root().call("name", ()).unwrap();
        let product: i64 = server_side.root().call("mul", (6, 7)).unwrap();
        (name, product)
    });
    assert_eq!(from_thread.join().unwrap(), ("carol".to_string(), 42));

    // A oneway triggers calls back into the client while its own thread only waits.
    conn.root().call_oneway("tick_later", (5,)).unwrap();
    let got: Vec<i64> = (0..5)
        .map(|_| rx.recv_timeout(SETTLE).expect("tick from the server"))
        .collect();
    assert_eq!(got, vec![0, 1, 2, 3, 4]);

    stored.lock().unwrap().take();
    conn.close();
}

#[test]
fn callback_is_invoked_many_times_during_the_call() {
    let svc = Service::new("server").method("map", |items: Vec<i64>, f: RemoteObject| {
        items
            .into_iter()
            .map(|x| f.invoke::<i64, _>((x,)))
            .collect::<Result<Vec<i64>, Error>>()
    });
    let server = serve(svc);
    let conn = connect(&server);

    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let cb = rpyc::callback(move |x: i64| {
        log.lock().unwrap().push(x);
        x * 10
    });
    let items: Vec<i64> = (1..=50).collect();
    let out: Vec<i64> = conn.root().call("map", (items.clone(), cb)).unwrap();
    assert_eq!(out, items.iter().map(|x| x * 10).collect::<Vec<_>>());
    assert_eq!(*seen.lock().unwrap(), items);

    // A second callback in a second call is a different object.
    let cb = rpyc::callback(|x: i64| -x);
    let out: Vec<i64> = conn.root().call("map", (vec![1, 2], cb)).unwrap();
    assert_eq!(out, vec![-1, -2]);
}

#[test]
fn stored_callback_is_invoked_after_the_call_returned() {
    let subscribers: Arc<Mutex<Vec<RemoteObject>>> = Arc::default();
    let subs = subscribers.clone();
    let subs_publish = subscribers.clone();
    let svc = Service::new("server")
        .method("subscribe", move |cb: RemoteObject| {
            subs.lock().unwrap().push(cb);
        })
        // Invokes every stored callback from inside another call.
        .method(
            "publish",
            move |event: String| -> Result<Vec<usize>, Error> {
                let subs: Vec<RemoteObject> = subs_publish.lock().unwrap().clone();
                subs.iter().map(|cb| cb.invoke((event.clone(),))).collect()
            },
        );
    let server = serve(svc);
    let conn = connect(&server);

    let (tx, rx) = mpsc::channel::<String>();
    let tx = Mutex::new(tx);
    let cb = rpyc::callback(move |event: String| {
        let len = event.len();
        tx.lock().unwrap().send(event).unwrap();
        len
    });
    conn.root().call::<(), _>("subscribe", (cb,)).unwrap();
    assert!(rx.try_recv().is_err(), "not called yet");

    for event in ["one", "three", "eleven"] {
        let lens: Vec<usize> = conn.root().call("publish", (event,)).unwrap();
        assert_eq!(lens, vec![event.len()]);
        assert_eq!(rx.recv_timeout(SETTLE).unwrap(), event);
    }

    // From a server-side thread that serves no call at all, while the client thread waits.
    let stored = subscribers.lock().unwrap()[0].clone();
    let invoker = std::thread::spawn(move || {
        (0..20)
            .map(|i| stored.invoke::<usize, _>((format!("late {i}"),)).unwrap())
            .sum::<usize>()
    });
    for i in 0..20 {
        assert_eq!(rx.recv_timeout(SETTLE).unwrap(), format!("late {i}"));
    }
    let total = invoker.join().unwrap();
    assert_eq!(
        total,
        (0..20).map(|i| format!("late {i}").len()).sum::<usize>()
    );

    subscribers.lock().unwrap().clear();
    conn.close();
}

#[test]
fn a_call_from_one_client_invokes_another_clients_callback() {
    let subscribers: Arc<Mutex<Vec<RemoteObject>>> = Arc::default();
    let subs = subscribers.clone();
    let svc = Service::new("chat")
        .method("join", move |cb: RemoteObject| {
            subs.lock().unwrap().push(cb)
        })
        .method("say", move |line: String| -> Result<usize, Error> {
            let subs: Vec<RemoteObject> = subscribers.lock().unwrap().clone();
            for cb in &subs {
                cb.invoke::<(), _>((line.clone(),))?;
            }
            Ok(subs.len())
        });
    let server = serve(svc);

    // Two listeners, each idle on its own connection, and a speaker on a third.
    let (tx, rx) = mpsc::channel::<(&'static str, String)>();
    let mut listeners = Vec::new();
    for who in ["ann", "ben"] {
        let conn = connect(&server);
        let tx = Mutex::new(tx.clone());
        let cb = rpyc::callback(move |line: String| tx.lock().unwrap().send((who, line)).unwrap());
        conn.root().call::<(), _>("join", (cb,)).unwrap();
        listeners.push(conn);
    }
    let speaker = connect(&server);
    let speaker_root = speaker.root();
    for i in 0..10 {
        let line = format!("line {i}");
        assert_eq!(
            speaker_root
                .call::<usize, _>("say", (line.clone(),))
                .unwrap(),
            2
        );
        let mut got = [
            rx.recv_timeout(SETTLE).unwrap(),
            rx.recv_timeout(SETTLE).unwrap(),
        ];
        got.sort();
        assert_eq!(got, [("ann", line.clone()), ("ben", line)]);
    }
    // A listener speaking invokes its own callback too, while its thread waits for `say`.
    assert_eq!(
        listeners[0]
            .root()
            .call::<usize, _>("say", ("me",))
            .unwrap(),
        2
    );
    let mut got = [
        rx.recv_timeout(SETTLE).unwrap(),
        rx.recv_timeout(SETTLE).unwrap(),
    ];
    got.sort();
    assert_eq!(got, [("ann", "me".to_string()), ("ben", "me".to_string())]);
}

#[test]
fn callback_failures_reach_the_server_handler_as_remote_errors() {
    let svc = Service::new("server").method("try_it", |f: RemoteObject| -> String {
        match f.invoke::<i64, _>((0,)) {
            Err(Error::Remote(e)) => format!(
                "{:?}|{}|{}|{}",
                e.kind(),
                e.service(),
                e.method(),
                e.message()
            ),
            other => format!("unexpected {other:?}"),
        }
    });
    let server = serve(svc);
    let conn = connect(&server);

    let failing = rpyc::callback(|x: i64| -> Result<i64, String> { Err(format!("bad {x}")) });
    let s: String = conn.root().call("try_it", (failing,)).unwrap();
    assert_eq!(s, "Handler|callback|__call__|bad 0");

    let panicking = rpyc::callback(|x: i64| -> i64 { panic!("callback panicked with {x}") });
    let s: String = conn.root().call("try_it", (panicking,)).unwrap();
    assert_eq!(s, "Panic|callback|__call__|callback panicked with 0");

    let wrong_args = rpyc::callback(|a: String, b: String| a + &b);
    let s: String = conn.root().call("try_it", (wrong_args,)).unwrap();
    assert!(s.starts_with("BadArguments|callback|__call__|"), "{s}");

    // Everything still works both ways.
    let ok = rpyc::callback(|x: i64| x + 1);
    let s: String = conn.root().call("try_it", (ok,)).unwrap();
    assert_eq!(s, "unexpected Ok(1)");
}
