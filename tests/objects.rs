//! Remote objects: services returned by handlers and callbacks passed as arguments live where
//! they were made, keep their state, are dropped by their owner when the last remote handle
//! goes or the connection closes, and cannot be reached through forged or foreign ids.

mod common;

use common::{connect, dropped, remote, serve, wait_until, DropGuard, SETTLE};
use rpyc::{Error, RemoteErrorKind, RemoteObject, Service};
use serde::de::IgnoredAny;
use serde::Serialize;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

/// Serializes exactly as a reference to object `id` does on the wire.
#[derive(Serialize)]
struct Forged {
    #[serde(rename = "$rpyc-obj")]
    id: u64,
}

/// A counter object; `guard` is dropped when the object is.
fn counter(start: i64, guard: DropGuard) -> Service {
    let n = Arc::new(AtomicI64::new(start));
    let m = n.clone();
    Service::new("counter")
        .method("incr", move |by: i64| {
            n.fetch_add(by, Ordering::SeqCst) + by
        })
        .method("get", move || {
            let _alive = &guard;
            m.load(Ordering::SeqCst)
        })
}

/// The server: makes counters and records each one's drop flag in `flags`, in creation order.
fn factory(flags: Arc<Mutex<Vec<Arc<AtomicBool>>>>) -> Service {
    let slot: Arc<Mutex<Option<Service>>> = Arc::default();
    let slot2 = slot.clone();
    let flags2 = flags.clone();
    let held: Arc<Mutex<Vec<RemoteObject>>> = Arc::default();
    let held2 = held.clone();
    let held3 = held.clone();
    Service::new("factory")
        .method("new_counter", {
            let flags = flags.clone();
            move |start: i64| {
                let (guard, flag) = DropGuard::new();
                flags.lock().unwrap().push(flag);
                counter(start, guard)
            }
        })
        // Like new_counter, after sleeping `ms` milliseconds.
        .method("new_counter_after", move |ms: u64| {
            std::thread::sleep(std::time::Duration::from_millis(ms));
            let (guard, flag) = DropGuard::new();
            flags.lock().unwrap().push(flag);
            counter(0, guard)
        })
        // Returns a counter and keeps it in a slot, for `again` to return once more.
        .method("new_kept", move || {
            let (guard, flag) = DropGuard::new();
            flags2.lock().unwrap().push(flag);
            let c = counter(0, guard);
            *slot.lock().unwrap() = Some(c.clone());
            c
        })
        .method("again", move || slot2.lock().unwrap().take())
        .method("forge", |id: u64| Forged { id })
        .method(
            "sum_of",
            |a: RemoteObject, b: RemoteObject| -> Result<i64, Error> {
                Ok(a.call::<i64, _>("get", ())? + b.call::<i64, _>("get", ())?)
            },
        )
        .method("hold", move |cb: RemoteObject| {
            held.lock().unwrap().push(cb)
        })
        .method("let_go_one", move || drop(held2.lock().unwrap().pop()))
        .method("let_go", move || held3.lock().unwrap().clear())
}

fn flag(flags: &Mutex<Vec<Arc<AtomicBool>>>, i: usize) -> Arc<AtomicBool> {
    flags.lock().unwrap()[i].clone()
}

#[test]
fn returned_object_keeps_its_state_and_objects_are_independent() {
    let flags = Arc::default();
    let server = serve(factory(flags));
    let conn = connect(&server);

    let a: RemoteObject = conn.root().call("new_counter", (100,)).unwrap();
    let b: RemoteObject = conn.root().call("new_counter", (0,)).unwrap();
    assert_ne!(a.id(), b.id());
    assert_ne!(a.id(), 0);

    assert_eq!(a.call::<i64, _>("incr", (5,)).unwrap(), 105);
    assert_eq!(a.call::<i64, _>("incr", (5,)).unwrap(), 110);
    assert_eq!(b.call::<i64, _>("incr", (1,)).unwrap(), 1);
    assert_eq!(a.call::<i64, _>("get", ()).unwrap(), 110);
    assert_eq!(b.call::<i64, _>("get", ()).unwrap(), 1);

    // Errors name the object's service, not the root's.
    let e = remote(a.call::<i64, _>("decr", (1,)).unwrap_err());
    assert_eq!(e.kind(), RemoteErrorKind::NoSuchMethod);
    assert_eq!(e.service(), "counter");
    // The root has no `incr`: calls go to the object they are made on.
    let e = remote(conn.root().call::<i64, _>("incr", (1,)).unwrap_err());
    assert_eq!(e.kind(), RemoteErrorKind::NoSuchMethod);
    assert_eq!(e.service(), "factory");

    // A clone used from another thread reaches the same object.
    let a2 = a.clone();
    let total = std::thread::spawn(move || a2.call::<i64, _>("incr", (1,)).unwrap())
        .join()
        .unwrap();
    assert_eq!(total, 111);
    assert_eq!(b.call::<i64, _>("get", ()).unwrap(), 1);
}

#[derive(Serialize)]
struct Exported {
    label: String,
    counter: Service,
    more: Vec<Service>,
}

#[derive(serde::Deserialize)]
struct Imported {
    label: String,
    counter: RemoteObject,
    more: Vec<RemoteObject>,
}

#[test]
fn objects_travel_inside_structs_and_collections() {
    let (guards, flags): (Vec<DropGuard>, Vec<Arc<AtomicBool>>) =
        (0..4).map(|_| DropGuard::new()).unzip();
    let guards = Mutex::new(Some(guards));
    let svc = Service::new("nest").method("bundle", move || {
        let mut g = guards.lock().unwrap().take().expect("called once");
        Exported {
            label: "bundle".into(),
            counter: counter(100, g.pop().unwrap()),
            more: g
                .into_iter()
                .enumerate()
                .map(|(i, g)| counter(i as i64, g))
                .collect(),
        }
    });
    let server = serve(svc);
    let conn = connect(&server);

    let b: Imported = conn.root().call("bundle", ()).unwrap();
    assert_eq!(b.label, "bundle");
    assert_eq!(b.counter.call::<i64, _>("incr", (1,)).unwrap(), 101);
    let values: Vec<i64> = b.more.iter().map(|c| c.call("get", ()).unwrap()).collect();
    assert_eq!(values, vec![0, 1, 2]);
    let mut ids: Vec<u64> = b.more.iter().map(|c| c.id()).collect();
    ids.push(b.counter.id());
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 4, "four distinct objects");

    assert!(flags.iter().all(|f| !dropped(f)));
    drop(b);
    assert!(
        wait_until(SETTLE, || flags.iter().all(|f| dropped(f))),
        "not all dropped"
    );
}

#[test]
fn dropping_the_last_handle_drops_the_object_on_the_owner() {
    let flags = Arc::default();
    let server = serve(factory(Arc::clone(&flags)));
    let conn = connect(&server);

    let a: RemoteObject = conn.root().call("new_counter", (0,)).unwrap();
    let b: RemoteObject = conn.root().call("new_counter", (0,)).unwrap();
    let (fa, fb) = (flag(&flags, 0), flag(&flags, 1));
    a.call::<i64, _>("incr", (1,)).unwrap();
    assert!(!dropped(&fa) && !dropped(&fb));

    let a_id = a.id();
    drop(a);
    assert!(
        wait_until(SETTLE, || dropped(&fa)),
        "object a was never dropped"
    );
    assert!(!dropped(&fb), "dropping a's handle dropped b");
    assert_eq!(b.call::<i64, _>("incr", (2,)).unwrap(), 2);

    // Its id now means nothing on this connection.
    let stale: RemoteObject = conn.root().call("forge", (a_id,)).unwrap();
    let e = remote(stale.call::<i64, _>("get", ()).unwrap_err());
    assert_eq!(e.kind(), RemoteErrorKind::NoSuchObject);

    drop(b);
    assert!(
        wait_until(SETTLE, || dropped(&fb)),
        "object b was never dropped"
    );
}

#[test]
fn clones_keep_the_object_alive_until_the_last_is_dropped() {
    let flags = Arc::default();
    let server = serve(factory(Arc::clone(&flags)));
    let conn = connect(&server);

    let a: RemoteObject = conn.root().call("new_counter", (0,)).unwrap();
    let fa = flag(&flags, 0);
    let clones: Vec<RemoteObject> = (0..8).map(|_| a.clone()).collect();
    drop(a);
    let threads: Vec<_> = clones
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            std::thread::spawn(move || {
                c.call::<i64, _>("incr", (1,)).unwrap();
                if i == 7 {
                    Some(c) // the last survivor
                } else {
                    None
                }
            })
        })
        .collect();
    let survivor = threads
        .into_iter()
        .filter_map(|t| t.join().unwrap())
        .next()
        .unwrap();
    // Seven clones and the original are gone; a full round trip later the object is still
    // there with all eight increments.
    assert_eq!(survivor.call::<i64, _>("get", ()).unwrap(), 8);
    conn.ping().unwrap();
    assert!(!dropped(&fa), "dropped while a clone was alive");
    assert_eq!(survivor.call::<i64, _>("incr", (1,)).unwrap(), 9);

    drop(survivor);
    assert!(
        wait_until(SETTLE, || dropped(&fa)),
        "never dropped after the last clone"
    );
}

#[test]
fn object_received_twice_lives_until_every_handle_is_dropped() {
    let flags = Arc::default();
    let server = serve(factory(Arc::clone(&flags)));
    let conn = connect(&server);

    let first: RemoteObject = conn.root().call("new_kept", ()).unwrap();
    let second: Option<RemoteObject> = conn.root().call("again", ()).unwrap();
    let second = second.expect("the kept counter");
    assert_eq!(first.id(), second.id(), "the same object has one id");
    let f = flag(&flags, 0);

    // The server no longer holds the counter itself: only the two references keep it.
    drop(first);
    conn.ping().unwrap();
    assert_eq!(second.call::<i64, _>("incr", (3,)).unwrap(), 3);
    assert!(!dropped(&f));

    drop(second);
    assert!(wait_until(SETTLE, || dropped(&f)), "never dropped");
}

#[test]
fn forged_object_id_is_no_such_object() {
    let flags = Arc::default();
    let server = serve(factory(flags));
    let conn = connect(&server);

    let forged: RemoteObject = conn.root().call("forge", (999u64,)).unwrap();
    assert_eq!(forged.id(), 999);
    let e = remote(forged.call::<i64, _>("incr", (1,)).unwrap_err());
    assert_eq!(e.kind(), RemoteErrorKind::NoSuchObject);
    assert_eq!(e.method(), "incr");
    assert!(e.message().contains("999"), "{e}");
    let e = remote(
        forged
            .call_async::<i64, _>("get", ())
            .unwrap()
            .value()
            .unwrap_err(),
    );
    assert_eq!(e.kind(), RemoteErrorKind::NoSuchObject);
    drop(forged); // its release names an unknown id: ignored

    // Id 0 is the root and cannot be forged into an object handle.
    match conn.root().call::<RemoteObject, _>("forge", (0u64,)) {
        Err(Error::Decode(_)) => {}
        other => panic!("expected Error::Decode, got {other:?}"),
    }

    // The connection is fine.
    let c: RemoteObject = conn.root().call("new_counter", (1,)).unwrap();
    assert_eq!(c.call::<i64, _>("incr", (1,)).unwrap(), 2);
}

#[test]
fn another_connection_cannot_reach_an_object_by_forging_its_id() {
    let flags = Arc::default();
    let server = serve(factory(Arc::clone(&flags)));
    let conn_a = connect(&server);
    let conn_b = connect(&server);

    let a: RemoteObject = conn_a.root().call("new_counter", (0,)).unwrap();
    a.call::<i64, _>("incr", (7,)).unwrap();
    let fa = flag(&flags, 0);

    let stolen: RemoteObject = conn_b.root().call("forge", (a.id(),)).unwrap();
    assert_eq!(stolen.id(), a.id());
    let e = remote(stolen.call::<i64, _>("incr", (1000,)).unwrap_err());
    assert_eq!(e.kind(), RemoteErrorKind::NoSuchObject);
    let e = remote(stolen.call::<i64, _>("get", ()).unwrap_err());
    assert_eq!(e.kind(), RemoteErrorKind::NoSuchObject);

    // B releasing its forged handle does not release A's object either.
    drop(stolen);
    conn_b.ping().unwrap();
    conn_b.ping().unwrap();
    assert!(!dropped(&fa));
    assert_eq!(
        a.call::<i64, _>("incr", (1,)).unwrap(),
        8,
        "A's object untouched"
    );

    // B's own objects get ids of their own table, and A cannot reach them either.
    let b_obj: RemoteObject = conn_b.root().call("new_counter", (500,)).unwrap();
    let via_a: RemoteObject = conn_a.root().call("forge", (b_obj.id(),)).unwrap();
    match via_a.call::<i64, _>("get", ()) {
        // The same number may name A's own counter on A's connection, never B's.
        Ok(v) => assert_eq!(v, 8),
        Err(e) => assert_eq!(remote(e).kind(), RemoteErrorKind::NoSuchObject),
    }
    assert_eq!(b_obj.call::<i64, _>("get", ()).unwrap(), 500);
}

#[test]
fn callback_is_dropped_when_the_peer_drops_its_handle() {
    let server = serve(factory(Arc::default()));
    let conn = connect(&server);

    let (guard, first) = DropGuard::new();
    let cb = rpyc::callback(move || {
        let _alive = &guard;
        1i64
    });
    let (guard, kept) = DropGuard::new();
    let cb_kept = rpyc::callback(move || {
        let _alive = &guard;
        2i64
    });
    conn.root().call::<(), _>("hold", (cb,)).unwrap();
    conn.root()
        .call::<(), _>("hold", (cb_kept.clone(),))
        .unwrap();
    // Sent twice, held twice: one release is not enough.
    conn.root().call::<(), _>("hold", (cb_kept,)).unwrap();
    conn.ping().unwrap();
    assert!(!dropped(&first) && !dropped(&kept), "held by the server");
    conn.root().call::<(), _>("let_go_one", ()).unwrap();
    conn.ping().unwrap();
    assert!(
        !dropped(&kept),
        "dropped while the server still held a reference"
    );

    conn.root().call::<(), _>("let_go", ()).unwrap();
    assert!(
        wait_until(SETTLE, || dropped(&first) && dropped(&kept)),
        "never dropped"
    );
}

#[test]
fn objects_passed_as_arguments_are_dropped_after_the_call() {
    let server = serve(factory(Arc::default()));
    let conn = connect(&server);

    let (ga, fa) = DropGuard::new();
    let (gb, fb) = DropGuard::new();
    let sum: i64 = conn
        .root()
        .call("sum_of", (counter(3, ga), counter(4, gb)))
        .unwrap();
    assert_eq!(sum, 7);
    assert!(
        wait_until(SETTLE, || dropped(&fa) && dropped(&fb)),
        "never dropped"
    );
}

#[test]
fn closing_the_connection_drops_the_objects_it_exported() {
    let flags = Arc::default();
    let server = serve(factory(Arc::clone(&flags)));
    let conn = connect(&server);

    // Server-owned: one held by a client handle, one whose reference the client discarded
    // without importing (so no release will ever come for it).
    let held: RemoteObject = conn.root().call("new_counter", (0,)).unwrap();
    let _: IgnoredAny = conn.root().call("new_counter", (0,)).unwrap();
    let (f_held, f_ignored) = (flag(&flags, 0), flag(&flags, 1));
    // Client-owned: a callback the server keeps.
    let (guard, f_callback) = DropGuard::new();
    let cb = rpyc::callback(move || {
        let _alive = &guard;
    });
    conn.root().call::<(), _>("hold", (cb,)).unwrap();
    conn.ping().unwrap();
    assert!(!dropped(&f_held) && !dropped(&f_ignored) && !dropped(&f_callback));

    conn.close();
    // The client's own export goes when it closes.
    assert!(
        dropped(&f_callback),
        "close() kept the client's exported callback"
    );
    // The server notices the disconnect and drops everything it exported to this client,
    // even though the client still holds a handle.
    assert!(
        wait_until(SETTLE, || dropped(&f_held) && dropped(&f_ignored)),
        "the server kept objects of a closed connection"
    );
    assert!(matches!(
        held.call::<i64, _>("get", ()),
        Err(Error::Closed { .. })
    ));
}

#[test]
fn dropping_every_handle_closes_the_connection_and_frees_its_objects() {
    let flags = Arc::default();
    let server = serve(factory(Arc::clone(&flags)));
    let conn = connect(&server);
    let _: IgnoredAny = conn.root().call("new_counter", (0,)).unwrap();
    let f = flag(&flags, 0);
    conn.ping().unwrap();
    assert!(!dropped(&f));
    drop(conn);
    assert!(
        wait_until(SETTLE, || dropped(&f)),
        "object outlived its connection"
    );
    assert!(wait_until(SETTLE, || server.handle.connections() == 0));
}

#[test]
fn closing_the_server_drops_the_objects_it_exported() {
    let flags = Arc::default();
    let server = serve(factory(Arc::clone(&flags)));
    let conn = connect(&server);
    let held: RemoteObject = conn.root().call("new_counter", (0,)).unwrap();
    let f = flag(&flags, 0);
    server.handle.close();
    assert!(dropped(&f), "close returned with the object still alive");
    assert!(conn.wait_closed_timeout(SETTLE));
    assert!(matches!(
        held.call::<i64, _>("get", ()),
        Err(Error::Closed { .. })
    ));
}

#[test]
fn objects_sent_to_an_unknown_method_or_object_are_released() {
    let server = serve(factory(Arc::default()));
    let conn = connect(&server);

    let (g, f) = DropGuard::new();
    let err = conn
        .root()
        .call::<(), _>("no_such_method", (counter(1, g),))
        .unwrap_err();
    assert_eq!(remote(err).kind(), RemoteErrorKind::NoSuchMethod);
    assert!(
        wait_until(SETTLE, || dropped(&f)),
        "an object sent to a method that does not exist was never released"
    );

    let ghost: RemoteObject = conn.root().call("forge", (4242u64,)).unwrap();
    let (g, f) = DropGuard::new();
    let err = ghost.call::<(), _>("get", (counter(1, g),)).unwrap_err();
    assert_eq!(remote(err).kind(), RemoteErrorKind::NoSuchObject);
    assert!(
        wait_until(SETTLE, || dropped(&f)),
        "an object sent to an object that does not exist was never released"
    );
}

#[test]
fn objects_in_a_reply_nobody_reads_are_released() {
    let flags: Arc<Mutex<Vec<Arc<AtomicBool>>>> = Arc::default();
    let server = serve(factory(flags.clone()));
    let conn = connect(&server);

    // An async call whose result is dropped unread.
    let pending = conn
        .root()
        .call_async::<RemoteObject, _>("new_counter", (0i64,))
        .unwrap();
    pending.wait().unwrap();
    drop(pending);
    assert!(
        wait_until(SETTLE, || flags.lock().unwrap().len() == 1
            && dropped(&flag(&flags, 0))),
        "the object in an unread async reply was never released"
    );

    // A reply that arrives after its caller timed out.
    let err = conn
        .root()
        .call_timeout::<RemoteObject, _>(
            "new_counter_after",
            (150u64,),
            std::time::Duration::from_millis(20),
        )
        .unwrap_err();
    assert!(matches!(err, Error::Timeout(_)), "{err}");
    assert!(
        wait_until(SETTLE, || flags.lock().unwrap().len() == 2
            && dropped(&flag(&flags, 1))),
        "the object in a late reply was never released"
    );
    // The connection still works.
    let live: RemoteObject = conn.root().call("new_counter", (5i64,)).unwrap();
    assert_eq!(live.call::<i64, _>("get", ()).unwrap(), 5);
}

#[test]
fn objects_in_arguments_that_fail_to_decode_are_released() {
    let server = serve(
        Service::new("typed")
            .method("obj_then_int", |_o: RemoteObject, n: i64| n)
            .method("int_then_obj", |n: i64, _o: RemoteObject| n),
    );
    let conn = connect(&server);

    // The object decodes, the next argument does not.
    let (g, f) = DropGuard::new();
    let err = conn
        .root()
        .call::<i64, _>("obj_then_int", (counter(1, g), "not a number"))
        .unwrap_err();
    assert_eq!(remote(err).kind(), RemoteErrorKind::BadArguments);
    assert!(
        wait_until(SETTLE, || dropped(&f)),
        "object before the bad argument kept"
    );

    // The decode fails before it reaches the object.
    let (g, f) = DropGuard::new();
    let err = conn
        .root()
        .call::<i64, _>("int_then_obj", ("not a number", counter(1, g)))
        .unwrap_err();
    assert_eq!(remote(err).kind(), RemoteErrorKind::BadArguments);
    assert!(
        wait_until(SETTLE, || dropped(&f)),
        "object after the bad argument kept"
    );
    assert_eq!(
        conn.root()
            .call::<i64, _>("obj_then_int", (counter(1, DropGuard::new().0), 5))
            .unwrap(),
        5
    );
}

#[test]
fn objects_in_a_result_that_fails_to_decode_are_released() {
    let flags: Arc<Mutex<Vec<Arc<AtomicBool>>>> = Arc::default();
    let server = serve(factory(flags.clone()));
    let conn = connect(&server);
    let err = conn
        .root()
        .call::<i64, _>("new_counter", (3i64,))
        .unwrap_err();
    assert!(matches!(err, Error::Decode(_)), "{err}");
    assert!(
        wait_until(SETTLE, || flags.lock().unwrap().len() == 1
            && dropped(&flag(&flags, 0))),
        "the object in a result of the wrong type was never released"
    );
}
