//! The Rust client against a real Python RPyC 6.0.2 `ThreadedServer(DemoService)`
//! (testdata/python/demo_server.py): values of every brine type round-trip, names, attributes
//! and the server's policy behave as for a Python client, exceptions keep their class,
//! arguments and traceback, Python calls Rust callbacks and services back, objects returned by
//! reference work and are released exactly, many threads share one connection, calls time out,
//! a dying server fails waiting calls at once, and reference counts balance on both sides.

mod common;

use common::python::{same_value, PyProcess};
use common::{expect_within, CALL_TIMEOUT, SETTLE};
use rpyc::python::{self, IntoValue, PyObject, Service, Value};
use rpyc::{Error, Options, PythonError, Timeout};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

/// How long the server may take to print a line about a connection.
const LINE: Duration = Duration::from_secs(10);

fn server() -> PyProcess {
    PyProcess::server("demo_server.py", &[])
}

fn client() -> python::Client {
    python::Client::new(Options::new().call_timeout(CALL_TIMEOUT))
}

fn connect(server: &PyProcess) -> python::Connection {
    client()
        .connect("127.0.0.1", server.port)
        .expect("connect to demo_server.py")
}

/// The Python exception inside `e`, or a panic naming what came instead.
fn python_error(e: Error) -> PythonError {
    match e {
        Error::Python(p) => p,
        other => panic!("expected Error::Python, got {other:?}"),
    }
}

/// `echo(v)`: what came back, unwrapped from the 1-tuple.
fn echo(root: &PyObject, v: &Value) -> Value {
    match root.call_method::<Value, _>("echo", (v,)) {
        Ok(Value::Tuple(mut t)) if t.len() == 1 => t.pop().unwrap(),
        other => panic!("echo({v:?}) gave {other:?}"),
    }
}

/// The server's count of objects it holds for this connection (1: the root only), asked with
/// CALLATTR so that no bound method is counted.
fn local_count(root: &PyObject) -> i64 {
    root.call_method("local_count", ()).expect("local_count()")
}

/// Waits until the server holds only its root for us and we export nothing to it.
fn expect_balanced(conn: &python::Connection, root: &PyObject) {
    let balanced = common::wait_until(SETTLE, || {
        local_count(root) == 1 && conn.exported_count() == 0
    });
    assert!(
        balanced,
        "after {SETTLE:?} the server holds {} objects for us (want 1: the root) and we \
         export {} to it (want 0)",
        local_count(root),
        conn.exported_count()
    );
}

/// Bytes that do not compress (a linear congruential sequence).
fn noise(n: usize) -> Vec<u8> {
    let mut x: u32 = 0x1234_5678;
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (x >> 24) as u8
        })
        .collect()
}

fn values() -> Vec<Value> {
    let t = Value::Tuple;
    vec![
        Value::None,
        Value::Bool(true),
        Value::Bool(false),
        Value::Ellipsis,
        Value::NotImplemented,
        Value::Int(0),
        Value::Int(-48),
        Value::Int(159),
        Value::Int(-49),
        Value::Int(160),
        Value::Int(i64::MAX),
        Value::Int(i64::MIN),
        Value::BigInt("9223372036854775808".into()),
        Value::BigInt("1000000000000000000000000000000".into()),
        Value::BigInt("-1000000000000000000000000000000".into()),
        Value::BigInt(format!("1{}", "0".repeat(1000))),
        Value::BigInt(format!("-{}", "7".repeat(4300))),
        Value::Float(1.5),
        Value::Float(-0.0),
        Value::Float(f64::INFINITY),
        Value::Float(f64::NEG_INFINITY),
        Value::Float(f64::NAN),
        Value::Float(5e-324),
        Value::Float(1e308),
        Value::Complex(1.5, -2.5),
        Value::Complex(0.0, f64::INFINITY),
        Value::Str(String::new()),
        Value::Str("x".into()),
        Value::Str("h\u{e9}llo w\u{f6}rld \u{1f980} \u{65e5}\u{672c}\u{8a9e}".into()),
        Value::Str("\u{e9}\u{65e5}".repeat(2000)),
        Value::Bytes(Vec::new()),
        Value::Bytes(vec![0, 255, 10, 13]),
        Value::Bytes(vec![0; 300]),
        Value::Bytes(b"rpyc".repeat(50_000)),
        Value::Bytes(noise(200_000)),
        t(vec![]),
        t(vec![Value::Int(1)]),
        t(vec![
            t(vec![Value::Int(1), "a".into()]),
            t(vec![Value::Bytes(b"b".to_vec()), Value::None]),
            t(vec![t(vec![]), t(vec![t(vec![Value::Float(2.5)])])]),
        ]),
        t((0..300).map(Value::Int).collect()),
        Value::FrozenSet(vec![]),
        Value::FrozenSet(vec![
            Value::Int(1),
            "a".into(),
            Value::Bytes(b"b".to_vec()),
            t(vec![Value::Int(2), Value::Int(3)]),
        ]),
        Value::Slice(Box::new([Value::Int(1), Value::Int(2), Value::Int(3)])),
        Value::Slice(Box::new([Value::None, Value::Int(5), Value::None])),
        Value::Slice(Box::new([
            "a".into(),
            Value::Bytes(b"b".to_vec()),
            t(vec![Value::Int(1)]),
        ])),
    ]
}

#[test]
fn every_brine_type_round_trips_through_echo() {
    let server = server();
    let py = connect(&server);
    let root = py.root().unwrap();
    for v in values() {
        let back = echo(&root, &v);
        assert!(same_value(&back, &v), "echo({v:?}) gave {back:?}");
    }
    // All at once, as one call's arguments (one compressed frame each way).
    let all = values();
    let back: Value = root.call_method("echo", all.clone()).unwrap();
    assert!(same_value(&back, &Value::Tuple(all)), "echo(*values)");
    // Bytes made by Python (compressed on its side) and measured there.
    let blob: Value = root.call_method("blob", (200_000,)).unwrap();
    assert_eq!(blob, Value::Bytes(vec![b'x'; 200_000]));
    let n: usize = root
        .call_method("length", (Value::Bytes(noise(200_000)),))
        .unwrap();
    assert_eq!(n, 200_000);
}

#[test]
fn rust_types_convert_on_the_way_out_and_back() {
    let server = server();
    let py = connect(&server);
    let root = py.root().unwrap();
    let back: ((i64, String, f64, bool, Option<i64>),) = root
        .call_method("echo", ((7, "sept", 0.5, true, None::<i64>),))
        .unwrap();
    assert_eq!(back.0, (7, "sept".into(), 0.5, true, None));
    // rpyc::Bytes is a bytes object; a Vec<i64> a tuple.
    let (b, v): (rpyc::Bytes, Vec<i64>) = root
        .call_method("echo", (rpyc::Bytes::from(&b"raw"[..]), vec![1i64, 2, 3]))
        .unwrap();
    assert_eq!(b.into_vec(), b"raw");
    let b = echo(&root, &rpyc::Bytes::from(&b"raw"[..]).into_value().unwrap());
    assert_eq!(b, Value::Bytes(b"raw".to_vec()));
    assert_eq!(v, [1, 2, 3]);
    let sum: i64 = root.call_method("add", (u32::MAX, 1u8)).unwrap();
    assert_eq!(sum, 1 << 32);
    let big: i128 = root.call_method("add", (i64::MAX, i64::MAX)).unwrap();
    assert_eq!(big, 2 * i64::MAX as i128);
    let s: String = root.call_method("add", ("py", "thon")).unwrap();
    assert_eq!(s, "python");
}

#[test]
fn exposed_and_plain_names_reach_the_same_method() {
    let server = server();
    let py = connect(&server);
    let root = py.root().unwrap();
    assert_eq!(root.class_name(), "__main__.DemoService");
    assert_eq!(root.call_method::<i64, _>("add", (2, 3)).unwrap(), 5);
    assert_eq!(
        root.call_method::<i64, _>("exposed_add", (2, 3)).unwrap(),
        5
    );
    // GETATTR gives a bound method by reference, which CALL calls.
    for name in ["add", "exposed_add"] {
        let add: PyObject = root.getattr(name).unwrap();
        assert_eq!(add.call::<i64, _>((40, 2)).unwrap(), 42, "{name}");
    }
    assert!(root.dir().unwrap().iter().any(|n| n == "exposed_add"));
}

#[test]
fn a_plain_attribute_arrives_by_value() {
    let server = server();
    let py = connect(&server);
    let root = py.root().unwrap();
    assert_eq!(root.getattr::<String>("version").unwrap(), "1.0");
    assert_eq!(root.getattr::<String>("exposed_version").unwrap(), "1.0");
    assert_eq!(
        root.getattr::<Value>("version").unwrap(),
        Value::Str("1.0".into())
    );
}

#[test]
fn the_server_policy_refuses_private_and_unexposed_attributes() {
    let server = server();
    let py = connect(&server);
    let root = py.root().unwrap();
    for name in ["_conn", "_same", "__dict__", "on_connect"] {
        let e = python_error(root.getattr::<Value>(name).unwrap_err());
        assert!(e.is("AttributeError"), "getattr {name}: {e:?}");
        let e = python_error(root.call_method::<Value, _>(name, ()).unwrap_err());
        assert!(e.is("AttributeError"), "call {name}: {e:?}");
    }
    // A dict's methods are not exposed under the default policy; its dunders are.
    let d: PyObject = root
        .call_method_kw("as_dict", (), vec![("a", 1.into())])
        .unwrap();
    let e = python_error(d.call_method::<Value, _>("items", ()).unwrap_err());
    assert!(e.is("AttributeError"), "{e:?}");
    assert_eq!(d.getitem::<i64>("a").unwrap(), 1);
    // The connection is fine after refusals.
    assert_eq!(root.call_method::<i64, _>("add", (1, 1)).unwrap(), 2);
}

#[test]
fn a_builtin_exception_arrives_with_its_class_args_and_traceback() {
    let server = server();
    let py = connect(&server);
    let root = py.root().unwrap();
    let e = python_error(root.call_method::<Value, _>("fail", (42,)).unwrap_err());
    assert!(e.is("ValueError"), "{e:?}");
    assert_eq!(e.module(), "builtins");
    assert_eq!(e.class(), "ValueError");
    assert_eq!(e.qualified_name(), "builtins.ValueError");
    assert_eq!(e.message(), "bad value: 42");
    assert_eq!(e.args(), &[Value::Str("bad value: 42".into())]);
    assert!(
        e.traceback().contains("demo_server.py"),
        "{}",
        e.traceback()
    );
    assert!(e.traceback().contains("exposed_fail"), "{}", e.traceback());
    assert_eq!(e.remote_version(), Some("6.0.2"));
    // A failing call leaves the connection usable.
    assert_eq!(root.call_method::<i64, _>("add", (1, 2)).unwrap(), 3);
}

#[test]
fn a_custom_exception_keeps_its_module_and_args() {
    let server = server();
    let py = connect(&server);
    let root = py.root().unwrap();
    let e = python_error(root.call_method::<Value, _>("fail_custom", ()).unwrap_err());
    assert_eq!(e.module(), "__main__");
    assert_eq!(e.class(), "DemoError");
    assert_eq!(e.qualified_name(), "__main__.DemoError");
    assert_eq!(e.message(), "(\"custom\", 7)");
    // is() names builtin classes only.
    assert!(!e.is("DemoError"));
    assert!(!e.is("ValueError"));
    assert_eq!(e.remote_version(), Some("6.0.2"));
    assert_eq!(e.args(), &[Value::Str("custom".into()), Value::Int(7)]);
    assert!(e.traceback().contains("fail_custom"), "{}", e.traceback());
}

#[test]
fn python_calls_rust_callbacks_back() {
    let server = server();
    let py = connect(&server);
    let root = py.root().unwrap();
    let double = python::callback(|x: i64| x * 2);
    assert_eq!(
        root.call_method::<i64, _>("apply", (double.clone(), 20))
            .unwrap(),
        41
    );
    // One callback called 100 times by one call.
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let square = python::callback(move |i: i64| {
        c.fetch_add(1, Ordering::SeqCst);
        i * i
    });
    let sum: i64 = root.call_method("apply_many", (square, 100)).unwrap();
    assert_eq!(sum, (0..100).map(|i| i * i).sum::<i64>());
    assert_eq!(calls.load(Ordering::SeqCst), 100);
    // 100 distinct callbacks, one call each.
    for k in 0..100i64 {
        let add_k = python::callback(move |x: i64| x + k);
        assert_eq!(
            root.call_method::<i64, _>("apply", (add_k, 1)).unwrap(),
            k + 2
        );
    }
    // A callback raising a Python exception: the server's call fails with it.
    let refuse = python::callback(|_x: i64| -> Result<i64, PythonError> {
        Err(PythonError::new("KeyError", ("no such key",)))
    });
    let e = python_error(
        root.call_method::<i64, _>("apply", (refuse, 1))
            .unwrap_err(),
    );
    assert!(e.is("KeyError"), "{e:?}");
    // rpyc keeps the last traceback it sent (Connection._last_traceback), whose frames hold
    // the proxy of `refuse`: another exception replaces it, and the proxy goes.
    let _ = root.call_method::<Value, _>("fail", (0,)).unwrap_err();
    expect_balanced(&py, &root);
}

#[test]
fn a_callback_may_call_the_server_again() {
    let server = server();
    let py = connect(&server);
    let root = py.root().unwrap();
    // apply(outer, 3): Python calls outer(3), which calls apply(inner, 3) on the server, which
    // calls inner(3) here: three levels of calls waiting on one connection.
    let conn = root.connection();
    let inner_calls = Arc::new(AtomicUsize::new(0));
    let ic = inner_calls.clone();
    let outer = python::callback(move |x: i64| -> Result<i64, PythonError> {
        let ic = ic.clone();
        let inner = python::callback(move |y: i64| {
            ic.fetch_add(1, Ordering::SeqCst);
            y * 10
        });
        let r: i64 = conn.root()?.call_method("apply", (inner, x))?;
        Ok(r)
    });
    // apply(outer, 3) = outer(3) + 1 = (inner(3) + 1) + 1.
    assert_eq!(root.call_method::<i64, _>("apply", (outer, 3)).unwrap(), 32);
    assert_eq!(inner_calls.load(Ordering::SeqCst), 1);
    expect_balanced(&py, &root);
}

#[test]
fn python_inspects_and_calls_a_rust_service_passed_as_an_argument() {
    let server = server();
    let py = connect(&server);
    let root = py.root().unwrap();
    let probe = Service::new("Probe")
        .method("__repr__", || "<the Rust probe>")
        .method("__str__", || "probe, as str");
    assert_eq!(
        root.call_method::<String, _>("call_repr", (probe.clone(),))
            .unwrap(),
        "<the Rust probe>"
    );
    assert_eq!(
        root.call_method::<String, _>("call_str", (probe,)).unwrap(),
        "probe, as str"
    );
    // Without a __repr__ of its own, Python sees the class name.
    let plain = Service::new("Plain").method("noop", || ());
    let r: String = root.call_method("call_repr", (plain,)).unwrap();
    assert!(r.contains("rust.Plain"), "{r}");
    // A proxy of a class Python does not know is callable only if INSPECT lists __call__.
    let adder = Service::new("Adder").method("__call__", |x: i64| x + 100);
    assert_eq!(
        root.call_method::<i64, _>("apply", (adder, 5)).unwrap(),
        106
    );
    expect_balanced(&py, &root);
}

#[test]
fn returned_objects_are_proxies_with_methods_kwargs_and_repr() {
    let server = server();
    let py = connect(&server);
    let root = py.root().unwrap();
    let counter: PyObject = root.call_method("make_counter", (10,)).unwrap();
    assert_eq!(counter.class_name(), "__main__.Counter");
    assert_eq!(counter.call_method::<i64, _>("incr", ()).unwrap(), 11);
    assert_eq!(
        counter
            .call_method_kw::<i64, _>("incr", (), vec![("by", 5.into())])
            .unwrap(),
        16
    );
    // GETATTR then CALL with keyword arguments, as Python's counter.incr(by=2).
    let incr: PyObject = counter.getattr("incr").unwrap();
    assert_eq!(
        incr.call_kw::<i64, _>((), vec![("by", 2.into())]).unwrap(),
        18
    );
    drop(incr);
    // A property (exposed_value), read by value.
    assert_eq!(counter.getattr::<i64>("value").unwrap(), 18);
    assert_eq!(counter.repr().unwrap(), "Counter(18)");
    assert_eq!(counter.str().unwrap(), "Counter(18)");
    assert_eq!(counter.hash().unwrap(), 18);
    let twin: PyObject = root
        .call_method_kw("make_counter", (), vec![("start", 18.into())])
        .unwrap();
    assert!(!twin.same(&counter));
    assert!(counter.equals(&twin).unwrap());
    assert!(!counter.equals(7).unwrap());
    drop((counter, twin));
    expect_balanced(&py, &root);
}

#[test]
fn an_object_sent_twice_is_released_with_its_count() {
    let server = server();
    let py = connect(&server);
    let root = py.root().unwrap();
    assert_eq!(local_count(&root), 1);
    let a: PyObject = root.call_method("same", ()).unwrap();
    let b: PyObject = root.call_method("same", ()).unwrap();
    assert!(a.same(&b), "one handle for one remote object");
    assert_eq!(local_count(&root), 2);
    drop(a);
    // One handle left: nothing released yet.
    thread::sleep(Duration::from_millis(100));
    assert_eq!(local_count(&root), 2);
    assert_eq!(b.repr().unwrap(), "Counter(100)");
    // The last handle goes: one DEL with count 2 (with count 1, rpyc would keep the object).
    drop(b);
    expect_within("the server freed the object", SETTLE, || {
        local_count(&root) == 1
    });
    // The object itself lives on in the service: sent again, it works again.
    let c: PyObject = root.call_method("same", ()).unwrap();
    assert_eq!(c.call_method::<i64, _>("incr", ()).unwrap(), 101);
    drop(c);
    expect_balanced(&py, &root);
}

#[test]
fn lists_dicts_and_sets_are_read_by_reference() {
    let server = server();
    let py = connect(&server);
    let root = py.root().unwrap();
    let list: PyObject = root.call_method("as_list", (1, "two", 3.0)).unwrap();
    assert_eq!(list.class_name(), "builtins.list");
    assert_eq!(list.len().unwrap(), 3);
    assert_eq!(list.getitem::<String>(1).unwrap(), "two");
    assert!(list.contains(1).unwrap());
    assert!(!list.contains(4).unwrap());
    assert_eq!(
        list.to_vec::<Value>().unwrap(),
        vec![Value::Int(1), "two".into(), Value::Float(3.0)]
    );
    let dict: PyObject = root
        .call_method_kw(
            "as_dict",
            (),
            vec![("a", 1.into()), ("b", 2.into()), ("c", 3.into())],
        )
        .unwrap();
    let map: HashMap<String, i64> = dict.to_map().unwrap();
    assert_eq!(
        map,
        HashMap::from([("a".into(), 1), ("b".into(), 2), ("c".into(), 3)])
    );
    let set: PyObject = root.call_method("as_set", (3, 1, 2, 1)).unwrap();
    let mut items: Vec<i64> = set.to_vec().unwrap();
    items.sort();
    assert_eq!(items, [1, 2, 3]);
    // 5,000 items: several BUFFITER batches.
    let big: PyObject = root.call_method("range_list", (5000,)).unwrap();
    assert_eq!(big.len().unwrap(), 5000);
    assert_eq!(big.to_vec::<i64>().unwrap(), (0..5000).collect::<Vec<_>>());
    let floats: PyObject = root.call_method("floats", (4,)).unwrap();
    assert_eq!(floats.to_vec::<f64>().unwrap(), [0.0, 0.5, 1.0, 1.5]);
    // A Rust sequence arrives in Python as a tuple it can iterate.
    let total: i64 = root
        .call_method("remote_total", (vec![1, 2, 3, 4],))
        .unwrap();
    assert_eq!(total, 10);
    // The list passed back to its owner is its own object again.
    let n: usize = root.call_method("length", (&list,)).unwrap();
    assert_eq!(n, 3);
    drop((list, dict, set, big, floats));
    expect_balanced(&py, &root);
}

#[test]
fn keyword_arguments_reach_python() {
    let server = server();
    let py = connect(&server);
    let root = py.root().unwrap();
    let call = |args: Vec<Value>, kwargs: Vec<(&str, Value)>| -> (i64, i64, i64) {
        root.call_method_kw("kwargs", args, kwargs).unwrap()
    };
    assert_eq!(call(vec![1.into()], vec![]), (1, 2, 3));
    assert_eq!(call(vec![1.into()], vec![("c", 9.into())]), (1, 2, 9));
    assert_eq!(
        call(vec![], vec![("a", 1.into()), ("b", 5.into())]),
        (1, 5, 3)
    );
    assert_eq!(
        call(vec![1.into(), 2.into()], vec![("c", 0.into())]),
        (1, 2, 0)
    );
    // Python's own checks: c is keyword-only, d does not exist.
    let e = python_error(
        root.call_method::<Value, _>("kwargs", (1, 2, 3))
            .unwrap_err(),
    );
    assert!(e.is("TypeError"), "{e:?}");
    let e = python_error(
        root.call_method_kw::<Value, _>("kwargs", (1,), vec![("d", 4.into())])
            .unwrap_err(),
    );
    assert!(e.is("TypeError"), "{e:?}");
    // Through GETATTR + CALL too.
    let f: PyObject = root.getattr("kwargs").unwrap();
    let t: (i64, i64, i64) = f.call_kw((7,), vec![("c", 8.into())]).unwrap();
    assert_eq!(t, (7, 2, 8));
}

#[test]
fn eight_threads_share_one_connection_and_each_gets_its_own_results() {
    let server = server();
    let py = connect(&server);
    let root = py.root().unwrap();
    let threads: Vec<_> = (0..8i64)
        .map(|t| {
            let root = root.clone();
            thread::spawn(move || {
                for i in 0..50i64 {
                    let tag = format!("thread {t} call {i}");
                    let (who, n, text): (i64, i64, String) =
                        root.call_method("echo", (t, i, &tag)).unwrap();
                    assert_eq!((who, n, text.as_str()), (t, i, tag.as_str()));
                    let sum: i64 = root.call_method("add", (t * 1000, i)).unwrap();
                    assert_eq!(sum, t * 1000 + i);
                }
                // Objects of the server, and callbacks, from many threads at once.
                let c: PyObject = root.call_method("make_counter", (t,)).unwrap();
                assert_eq!(c.call_method::<i64, _>("incr", ()).unwrap(), t + 1);
                let cb = python::callback(move |x: i64| x * t);
                assert_eq!(
                    root.call_method::<i64, _>("apply", (cb, 3)).unwrap(),
                    3 * t + 1
                );
            })
        })
        .collect();
    for t in threads {
        t.join().expect("a thread failed");
    }
    expect_balanced(&py, &root);
}

#[test]
fn a_call_past_its_timeout_fails_and_the_connection_survives() {
    let server = server();
    let py = connect(&server);
    let root = py.root().unwrap();
    let timeout = Duration::from_secs(1);
    let started = Instant::now();
    let e = root
        .call_method_timeout::<f64, _>("sleep", (3.0 * timeout.as_secs_f64(),), timeout)
        .unwrap_err();
    let took = started.elapsed();
    assert!(
        matches!(e, Error::Timeout(Timeout::Call { .. })),
        "expected a call timeout, got {e:?}"
    );
    assert!(
        took >= timeout,
        "gave up after {took:?}, before {timeout:?}"
    );
    assert!(
        took < timeout * 2,
        "gave up after {took:?}, long past {timeout:?}"
    );
    // The server runs one request of a connection at a time: the next call waits for the
    // sleep to end, then gets its own answer (the sleep's late reply is dropped).
    assert!(!py.is_closed());
    let (x,): (String,) = root.call_method("echo", ("after",)).unwrap();
    assert_eq!(x, "after");
    assert_eq!(root.call_method::<i64, _>("add", (1, 2)).unwrap(), 3);
    // The connection's own call timeout applies the same way.
    let quick = python::Client::new(Options::new().call_timeout(timeout))
        .connect("127.0.0.1", server.port)
        .unwrap();
    let qroot = quick.root().unwrap();
    let started = Instant::now();
    let e = qroot
        .call_method::<f64, _>("sleep", (3.0 * timeout.as_secs_f64(),))
        .unwrap_err();
    let took = started.elapsed();
    assert!(matches!(e, Error::Timeout(Timeout::Call { .. })), "{e:?}");
    assert!(took >= timeout && took < timeout * 2, "took {took:?}");
    assert_eq!(
        qroot
            .call_method_timeout::<i64, _>("add", (2, 2), CALL_TIMEOUT)
            .unwrap(),
        4
    );
}

#[test]
fn a_server_killed_mid_call_fails_the_waiting_call_at_once() {
    let mut server = server();
    let py = connect(&server);
    let root = py.root().unwrap();
    assert_eq!(root.call_method::<i64, _>("add", (1, 2)).unwrap(), 3);
    let waiting = {
        let root = root.clone();
        thread::spawn(move || {
            let r = root.call_method::<f64, _>("sleep", (60.0,));
            (r, Instant::now())
        })
    };
    // Let the call reach the server, then SIGKILL it.
    thread::sleep(Duration::from_millis(300));
    let killed = Instant::now();
    server.kill();
    let (r, failed) = waiting.join().unwrap();
    let after = failed.saturating_duration_since(killed);
    match r {
        Err(Error::Closed { .. }) => {}
        other => panic!("expected Error::Closed, got {other:?}"),
    }
    assert!(
        after < CALL_TIMEOUT / 4,
        "the waiting call failed {after:?} after the kill (call timeout {CALL_TIMEOUT:?})"
    );
    assert!(py.is_closed());
    assert!(matches!(py.close_reason(), Some(Error::Closed { .. })));
    // Later calls fail at once, with the same reason.
    let started = Instant::now();
    let e = root.call_method::<i64, _>("add", (1, 2)).unwrap_err();
    assert!(matches!(e, Error::Closed { .. }), "{e:?}");
    assert!(matches!(py.ping().unwrap_err(), Error::Closed { .. }));
    assert!(matches!(py.root().unwrap_err(), Error::Closed { .. }));
    assert!(started.elapsed() < CALL_TIMEOUT / 10);
}

#[test]
fn references_balance_once_everything_is_dropped() {
    let server = server();
    let py = connect(&server);
    let root = py.root().unwrap();
    assert_eq!(py.remote_count(), 1, "the root");
    {
        let counter: PyObject = root.call_method("make_counter", (1,)).unwrap();
        let same1: PyObject = root.call_method("same", ()).unwrap();
        let same2: PyObject = root.call_method("same", ()).unwrap();
        let list: PyObject = root.call_method("range_list", (2500,)).unwrap();
        let items: Vec<i64> = list.to_vec().unwrap();
        assert_eq!(items.len(), 2500);
        let add: PyObject = root.getattr("add").unwrap();
        assert_eq!(add.call::<i64, _>((1, 1)).unwrap(), 2);
        let cb = python::callback(|x: i64| x);
        assert_eq!(
            root.call_method::<i64, _>("apply", (cb.clone(), 1))
                .unwrap(),
            2
        );
        let svc = Service::new("Probe").method("__repr__", || "p");
        assert_eq!(
            root.call_method::<String, _>("call_repr", (svc,)).unwrap(),
            "p"
        );
        assert!(py.remote_count() >= 5);
        assert!(local_count(&root) >= 5);
        drop((counter, same1, same2, list, add, cb));
    }
    expect_balanced(&py, &root);
    assert_eq!(local_count(&root), 1);
    assert_eq!(py.exported_count(), 0);
    assert_eq!(py.remote_count(), 1, "only the root is held");
}

#[test]
fn ping_then_close_and_the_server_sees_the_client_go() {
    let server = server();
    let py = connect(&server);
    server.wait_line("CONNECTED", LINE);
    py.ping().unwrap();
    py.ping().unwrap();
    let root = py.root().unwrap();
    py.close();
    assert!(py.is_closed());
    server.wait_line("DISCONNECTED", LINE);
    let started = Instant::now();
    assert!(matches!(
        root.call_method::<i64, _>("add", (1, 2)).unwrap_err(),
        Error::Closed { .. }
    ));
    assert!(matches!(py.ping().unwrap_err(), Error::Closed { .. }));
    assert!(started.elapsed() < CALL_TIMEOUT / 10);
    py.close(); // idempotent
                // Dropping the last handle closes a connection too.
    let second = connect(&server);
    server.wait_line("CONNECTED", LINE);
    second.ping().unwrap();
    drop(second);
    server.wait_line("DISCONNECTED", LINE);
}

#[test]
fn a_unix_socket_server_answers() {
    let dir = std::env::temp_dir().join(format!("rpyc-pyclient-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("demo.sock");
    let _ = std::fs::remove_file(&path);
    let server = PyProcess::server("demo_server.py", &["--unix", path.to_str().unwrap()]);
    assert_eq!(server.port, 0);
    let py = client().unix_connect(&path).expect("unix_connect");
    let root = py.root().unwrap();
    assert_eq!(root.call_method::<i64, _>("add", (20, 22)).unwrap(), 42);
    let pid: u32 = root.call_method("pid", ()).unwrap();
    assert_eq!(pid, server.pid());
    py.close();
    server.wait_line("DISCONNECTED", LINE);
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}
