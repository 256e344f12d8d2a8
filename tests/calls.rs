//! Calls and their values: any serde type in and out, and every kind of failed call (unknown
//! method, bad arguments, undecodable result, handler error, handler panic) reported clearly
//! while the connection and the server keep working.

mod common;

use common::{connect, remote, serve};
use rpyc::{Bytes, Error, RemoteErrorKind, Service};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
struct Point {
    x: i64,
    y: i64,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
enum Shape {
    Dot,
    Circle { center: Point, radius: f64 },
    Polygon(Vec<Point>),
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
struct Drawing {
    name: String,
    shapes: Vec<Shape>,
    tags: HashMap<String, Vec<u32>>,
    layers: BTreeMap<u8, Option<String>>,
    origin: Option<Point>,
    thumbnail: Bytes,
}

fn sample_drawing() -> Drawing {
    let mut tags = HashMap::new();
    tags.insert("primes".to_string(), vec![2, 3, 5, 7]);
    tags.insert("empty".to_string(), vec![]);
    let mut layers = BTreeMap::new();
    layers.insert(0, Some("background".to_string()));
    layers.insert(1, None);
    Drawing {
        name: "täst ✓".into(),
        shapes: vec![
            Shape::Dot,
            Shape::Circle {
                center: Point { x: -1, y: i64::MAX },
                radius: 2.5,
            },
            Shape::Polygon(vec![Point { x: 0, y: 0 }, Point { x: 3, y: 4 }]),
        ],
        tags,
        layers,
        origin: None,
        thumbnail: Bytes::from((0..=255u8).collect::<Vec<u8>>()),
    }
}

/// A service whose methods exercise types, arities and failures.
fn service() -> Service {
    Service::new("shapes")
        .method("ping", || "pong")
        .method("nothing", || ())
        .method("add", |a: i64, b: i64| a + b)
        .method("mid", |a: Point, b: Point| Point {
            x: (a.x + b.x) / 2,
            y: (a.y + b.y) / 2,
        })
        .method("echo_drawing", |d: Drawing| d)
        .method("rename", |mut d: Drawing, name: String| {
            d.name = name;
            d.origin = Some(Point { x: 1, y: 1 });
            d
        })
        .method("first_even", |v: Vec<i64>| {
            v.into_iter().find(|n| n % 2 == 0)
        })
        .method("count_words", |text: String| {
            let mut m: HashMap<String, u32> = HashMap::new();
            for w in text.split_whitespace() {
                *m.entry(w.to_string()).or_default() += 1;
            }
            m
        })
        .method("reverse_bytes", |b: Bytes| {
            let mut v = b.into_vec();
            v.reverse();
            Bytes::from(v)
        })
        .method(
            "eight",
            |a: u8, b: i16, c: u32, d: i64, e: f32, f: f64, g: bool, h: char| {
                format!("{a} {b} {c} {d} {e} {f:e} {g} {h}")
            },
        )
        .method("sqrt", |x: f64| -> Result<f64, String> {
            if x < 0.0 {
                Err(format!("cannot take the square root of {x}"))
            } else {
                Ok(x.sqrt())
            }
        })
        .method("check", |ok: bool| -> Result<(), String> {
            if ok {
                Ok(())
            } else {
                Err("check failed".into())
            }
        })
        .method("explode", |what: String| -> i64 {
            panic!("exploded on {what}")
        })
}

#[test]
fn user_structs_enums_maps_options_and_bytes_round_trip() {
    let server = serve(service());
    let conn = connect(&server);
    let root = conn.root();

    let d = sample_drawing();
    let back: Drawing = root.call("echo_drawing", (d.clone(),)).unwrap();
    assert_eq!(back, d);

    let renamed: Drawing = root.call("rename", (d.clone(), "renamed")).unwrap();
    assert_eq!(renamed.name, "renamed");
    assert_eq!(renamed.origin, Some(Point { x: 1, y: 1 }));
    assert_eq!(renamed.shapes, d.shapes);

    let m: Point = root
        .call("mid", (Point { x: 0, y: 10 }, Point { x: 4, y: 20 }))
        .unwrap();
    assert_eq!(m, Point { x: 2, y: 15 });

    let some: Option<i64> = root.call("first_even", (vec![1, 3, 8, 10],)).unwrap();
    assert_eq!(some, Some(8));
    let none: Option<i64> = root.call("first_even", (vec![1, 3, 5],)).unwrap();
    assert_eq!(none, None);

    let counts: HashMap<String, u32> = root.call("count_words", ("a b a c a b",)).unwrap();
    let expected: HashMap<String, u32> = [("a", 3), ("b", 2), ("c", 1)]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    assert_eq!(counts, expected);

    let big = Bytes::from(
        (0..100_000u32)
            .map(|i| (i % 251) as u8)
            .collect::<Vec<u8>>(),
    );
    let reversed: Bytes = root.call("reverse_bytes", (big.clone(),)).unwrap();
    let mut want = big.into_vec();
    want.reverse();
    assert_eq!(reversed.into_vec(), want);
    let empty: Bytes = root.call("reverse_bytes", (Bytes::default(),)).unwrap();
    assert!(empty.is_empty());
}

#[test]
fn zero_argument_methods_unit_results_and_eight_arguments_work() {
    let server = serve(service());
    let conn = connect(&server);
    let root = conn.root();

    let pong: String = root.call("ping", ()).unwrap();
    assert_eq!(pong, "pong");
    let unit: () = root.call("nothing", ()).unwrap();
    assert_eq!(unit, ());
    // `Ok(())` of a Result-returning handler is a unit result too.
    let checked: () = root.call("check", (true,)).unwrap();
    assert_eq!(checked, ());

    let s: String = root
        .call(
            "eight",
            (
                7u8,
                -3i16,
                40_000u32,
                -5_000_000_000i64,
                0.5f32,
                1e300f64,
                true,
                'é',
            ),
        )
        .unwrap();
    assert_eq!(s, "7 -3 40000 -5000000000 0.5 1e300 true é");

    let sum: i64 = root.call("add", (i64::MAX - 1, 1)).unwrap();
    assert_eq!(sum, i64::MAX);
}

#[test]
fn unknown_method_is_no_such_method_naming_service_and_method() {
    let server = serve(service());
    let conn = connect(&server);
    let e = remote(conn.root().call::<i64, _>("substract", (1, 2)).unwrap_err());
    assert_eq!(e.kind(), RemoteErrorKind::NoSuchMethod);
    assert_eq!(e.service(), "shapes");
    assert_eq!(e.method(), "substract");
    assert!(e.message().contains("substract"), "{e}");
    // The message helps: it lists what exists.
    assert!(e.message().contains("add"), "{e}");
    let shown = e.to_string();
    assert!(
        shown.contains("shapes") && shown.contains("substract"),
        "{shown}"
    );

    assert_eq!(conn.root().call::<i64, _>("add", (1, 2)).unwrap(), 3);
}

#[test]
fn wrong_argument_count_is_bad_arguments_and_connection_keeps_working() {
    let server = serve(service());
    let conn = connect(&server);
    let root = conn.root();

    let too_few = remote(root.call::<i64, _>("add", (1,)).unwrap_err());
    let too_many = remote(root.call::<i64, _>("add", (1, 2, 3)).unwrap_err());
    let none = remote(root.call::<i64, _>("add", ()).unwrap_err());
    let to_zero_arg = remote(root.call::<String, _>("ping", (1,)).unwrap_err());
    let to_one_arg = remote(
        root.call::<Option<i64>, _>("first_even", (vec![2], vec![4]))
            .unwrap_err(),
    );
    for (e, method) in [
        (&too_few, "add"),
        (&too_many, "add"),
        (&none, "add"),
        (&to_zero_arg, "ping"),
        (&to_one_arg, "first_even"),
    ] {
        assert_eq!(e.kind(), RemoteErrorKind::BadArguments, "{e}");
        assert_eq!(e.service(), "shapes");
        assert_eq!(e.method(), method);
        assert!(!e.message().is_empty());
        assert!(e.to_string().contains(&format!("shapes.{method}")), "{e}");
    }
    assert!(too_few.message().contains('2'), "says how many: {too_few}");

    assert_eq!(root.call::<i64, _>("add", (2, 3)).unwrap(), 5);
    assert_eq!(root.call::<String, _>("ping", ()).unwrap(), "pong");
}

#[test]
fn wrong_argument_type_is_bad_arguments_and_connection_keeps_working() {
    let server = serve(service());
    let conn = connect(&server);
    let root = conn.root();

    let cases = [
        remote(root.call::<i64, _>("add", ("one", "two")).unwrap_err()),
        remote(root.call::<i64, _>("add", (1.5, 2)).unwrap_err()),
        remote(root.call::<Point, _>("mid", (1, 2)).unwrap_err()),
        remote(
            root.call::<Drawing, _>("echo_drawing", (Point { x: 1, y: 2 },))
                .unwrap_err(),
        ),
        remote(
            root.call::<Bytes, _>("reverse_bytes", ("text",))
                .unwrap_err(),
        ),
    ];
    for e in &cases {
        assert_eq!(e.kind(), RemoteErrorKind::BadArguments, "{e}");
        assert_eq!(e.service(), "shapes");
    }
    assert_eq!(cases[0].method(), "add");
    assert_eq!(cases[2].method(), "mid");

    assert_eq!(root.call::<i64, _>("add", (2, 3)).unwrap(), 5);
}

#[test]
fn result_of_the_wrong_type_is_a_decode_error_and_connection_keeps_working() {
    let server = serve(service());
    let conn = connect(&server);
    let root = conn.root();

    match root.call::<String, _>("add", (1, 2)) {
        Err(Error::Decode(m)) => assert!(m.contains("add"), "names the method: {m}"),
        other => panic!("expected Error::Decode, got {other:?}"),
    }
    match root.call::<Point, _>("ping", ()) {
        Err(Error::Decode(_)) => {}
        other => panic!("expected Error::Decode, got {other:?}"),
    }
    // A unit result is not an i64.
    assert!(matches!(
        root.call::<i64, _>("nothing", ()),
        Err(Error::Decode(_))
    ));

    assert_eq!(root.call::<i64, _>("add", (1, 2)).unwrap(), 3);
}

#[test]
fn handler_error_reaches_the_caller_with_service_method_and_message() {
    let server = serve(service());
    let conn = connect(&server);
    let root = conn.root();

    let e = remote(root.call::<f64, _>("sqrt", (-4.0,)).unwrap_err());
    assert_eq!(e.kind(), RemoteErrorKind::Handler);
    assert_eq!(e.service(), "shapes");
    assert_eq!(e.method(), "sqrt");
    assert_eq!(e.message(), "cannot take the square root of -4");

    let e = remote(root.call::<(), _>("check", (false,)).unwrap_err());
    assert_eq!(e.kind(), RemoteErrorKind::Handler);
    assert_eq!(e.method(), "check");
    assert_eq!(e.message(), "check failed");

    assert_eq!(root.call::<f64, _>("sqrt", (9.0,)).unwrap(), 3.0);
}

#[test]
fn handler_panic_reaches_the_caller_and_the_server_keeps_serving() {
    let server = serve(service());
    let conn = connect(&server);
    let root = conn.root();

    let e = remote(root.call::<i64, _>("explode", ("purpose",)).unwrap_err());
    assert_eq!(e.kind(), RemoteErrorKind::Panic);
    assert_eq!(e.service(), "shapes");
    assert_eq!(e.method(), "explode");
    assert_eq!(e.message(), "exploded on purpose");

    // The same connection still works, repeatedly, and so does a panic again.
    assert_eq!(root.call::<i64, _>("add", (1, 2)).unwrap(), 3);
    let again = remote(root.call::<i64, _>("explode", ("again",)).unwrap_err());
    assert_eq!(again.kind(), RemoteErrorKind::Panic);
    assert!(!conn.is_closed());

    // Another client, connected after the panics, is served.
    let other = connect(&server);
    assert_eq!(other.root().call::<i64, _>("add", (20, 22)).unwrap(), 42);
    assert_eq!(root.call::<String, _>("ping", ()).unwrap(), "pong");
}

#[test]
fn failures_on_one_client_do_not_disturb_another() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let svc = service().method("count", move || counted.fetch_add(1, Ordering::SeqCst) + 1);
    let server = serve(svc);
    let bad = connect(&server);
    let good = connect(&server);

    let hammer = std::thread::spawn(move || {
        for i in 0..200 {
            let r = match i % 4 {
                0 => bad.root().call::<i64, _>("explode", ("x",)),
                1 => bad.root().call::<i64, _>("nope", ()),
                2 => bad.root().call::<i64, _>("add", ("x",)),
                _ => bad.root().call::<i64, _>("sqrt", (-1.0,)),
            };
            assert!(matches!(r, Err(Error::Remote(_))), "{r:?}");
        }
        bad.root().call::<i64, _>("add", (1, 1)).unwrap()
    });
    for i in 0..200 {
        assert_eq!(good.root().call::<i64, _>("add", (i, 1)).unwrap(), i + 1);
    }
    assert_eq!(hammer.join().unwrap(), 2);
    assert_eq!(good.root().call::<usize, _>("count", ()).unwrap(), 1);
}

/// 8 MiB that differ with `seed` and along the buffer (no short repeating pattern).
fn large_payload(seed: u64) -> Bytes {
    let mut v = Vec::with_capacity(8 << 20);
    for i in 0..(8u64 << 20) / 8 {
        let w = (i ^ seed << 40).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        v.extend_from_slice(&w.to_le_bytes());
    }
    Bytes::from(v)
}

/// The payload with every 8-byte word's bits inverted: what the `flip` methods return.
fn flipped(b: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(b.len());
    for w in b.chunks_exact(8) {
        v.extend_from_slice(&(!u64::from_le_bytes(w.try_into().unwrap())).to_le_bytes());
    }
    v
}

#[test]
fn large_bytes_round_trip_intact_many_times_in_both_directions() {
    // Large frames and Bytes reuse buffers: every call must get exactly its own bytes, never
    // a previous call's, whichever side sends them.
    let client_side = Service::new("client").method("flip", |b: Bytes| Bytes::from(flipped(&b)));
    let svc = service()
        .method("flip", |b: Bytes| Bytes::from(flipped(&b)))
        .method_with_context("flip_at_peer", |cx: &rpyc::Context, seed: u64| {
            let back: Bytes = cx
                .peer_root()
                .call("flip", (large_payload(seed),))
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(back)
        });
    let server = serve(svc);
    let conn = common::connect_with(&server, client_side);
    let root = conn.root();
    // `assert!` rather than `assert_eq!`: a failure would print megabytes.
    for seed in 0..4 {
        let sent = large_payload(seed);
        let want = flipped(&sent);
        let back: Bytes = root.call("flip", (&sent,)).unwrap();
        assert!(
            back.as_slice() == want,
            "round trip {seed} came back altered"
        );
        drop(back);
        // The server sends the payload to this side and returns what came back.
        let nested: Bytes = root.call("flip_at_peer", (seed,)).unwrap();
        assert!(
            nested.as_slice() == want,
            "nested round trip {seed} came back altered"
        );
    }
}

/// A byte buffer that is not `Bytes`: it copies in `visit_bytes`, as `serde_bytes` does.
#[derive(Debug, PartialEq)]
struct Copied(Vec<u8>);

impl Serialize for Copied {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Copied {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Copied, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Copied;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a byte string")
            }
            fn visit_bytes<E>(self, v: &[u8]) -> Result<Copied, E> {
                Ok(Copied(v.to_vec()))
            }
        }
        d.deserialize_bytes(V)
    }
}

#[test]
fn large_byte_strings_arrive_intact_as_types_other_than_bytes() {
    // Large byte strings are received apart from their frame (for `Bytes`, without a copy);
    // any other type must still get exactly the bytes sent, as argument and as result.
    let svc = service()
        .method("flip", |b: Bytes| Bytes::from(flipped(&b)))
        .method("flip_copied", |c: Copied| Copied(flipped(&c.0)))
        .method("flip_to_copied", |b: Bytes| Copied(flipped(&b)))
        .method("flip_pair", |b: (Bytes, Copied)| {
            (Bytes::from(flipped(&b.0)), Copied(flipped(&b.1 .0)))
        });
    let server = serve(svc);
    let conn = connect(&server);
    let root = conn.root();
    for size in [1usize << 20, 8 << 20] {
        let sent = large_payload(size as u64);
        let sent = &sent[..size];
        let want = flipped(sent);
        // `assert!` rather than `assert_eq!`: a failure would print megabytes.
        let back: Copied = root.call("flip_copied", (Copied(sent.to_vec()),)).unwrap();
        assert!(back.0 == want, "{size}: Copied argument and result altered");
        let back: Copied = root.call("flip_to_copied", (Bytes::from(sent),)).unwrap();
        assert!(back.0 == want, "{size}: Copied result altered");
        let back: Bytes = root.call("flip", (Copied(sent.to_vec()),)).unwrap();
        assert!(back.as_slice() == want, "{size}: Bytes result altered");
        // Two byte strings: read whole, as before.
        let (a, b): (Bytes, Copied) = root
            .call("flip_pair", ((Bytes::from(sent), Copied(sent.to_vec())),))
            .unwrap();
        assert!(a.as_slice() == want && b.0 == want, "{size}: pair altered");
        // The wrong type for a large byte string is still the same clear error.
        let err = root
            .call::<u64, _>("flip", (Bytes::from(sent),))
            .unwrap_err();
        assert!(matches!(err, Error::Decode(_)), "{err}");
        let err = root.call::<Bytes, _>("flip", (7u64,)).unwrap_err();
        assert!(err.to_string().contains("argument"), "{err}");
    }
}
