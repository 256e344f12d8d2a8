//! The Rust client of `rpyc::python` under a hostile "Python" server (a raw TCP listener of the
//! test, speaking RPyC 6 frames by hand): a zlib bomb, garbage brine, an absurd length header
//! or requests for things that do not exist end the connection with an error that says what
//! (or get an exception back), promptly, without a panic, and without the client's memory
//! following what the peer claims.

mod common;

use common::child::{self, Child as ChildProcess};
use common::tls::{capture_logs, wait_logged};
use common::CALL_TIMEOUT;
use flate2::write::ZlibEncoder;
use flate2::Compression;
use rpyc::python::wire::{brine_dump, brine_load, frame};
use rpyc::python::{self, Value};
use rpyc::{Error, Options};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

const REQUEST: u8 = 1;
const REPLY: u8 = 2;
const EXCEPTION: u8 = 3;

/// A client limit small enough to bomb cheaply.
const MAX_FRAME: usize = 1 << 20;

fn client() -> python::Client {
    python::Client::new(
        Options::new()
            .call_timeout(CALL_TIMEOUT)
            .max_frame_size(MAX_FRAME),
    )
}

/// A message the client sent: type, sequence number, body.
#[derive(Debug)]
struct Msg {
    kind: u8,
    seq: i64,
    body: Value,
}

/// Reads one frame of the client's and decodes its message.
fn read_msg(s: &mut TcpStream) -> Msg {
    let mut head = [0u8; 5];
    s.read_exact(&mut head).expect("a frame from the client");
    let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
    let mut data = vec![0u8; len + 1];
    s.read_exact(&mut data).expect("the frame's data");
    assert_eq!(data.pop(), Some(b'\n'));
    let payload = if head[4] == 0 {
        data
    } else {
        let mut out = Vec::new();
        flate2::read::ZlibDecoder::new(&data[..])
            .read_to_end(&mut out)
            .expect("zlib");
        out
    };
    match brine_load(&payload[1..]).expect("the client's brine") {
        Value::Tuple(mut t) if t.len() == 2 => {
            let body = t.pop().unwrap();
            let Value::Int(seq) = t[0] else {
                panic!("seq {t:?}")
            };
            Msg {
                kind: payload[0],
                seq,
                body,
            }
        }
        other => panic!("not (seq, body): {other:?}"),
    }
}

/// The handler number of a request.
fn handler(m: &Msg) -> i64 {
    match &m.body {
        Value::Tuple(t) => match t.first() {
            Some(Value::Int(h)) => *h,
            _ => panic!("{m:?}"),
        },
        _ => panic!("{m:?}"),
    }
}

/// A payload: message type, then brine `(seq, body)`.
fn payload(kind: u8, seq: i64, body: Value) -> Vec<u8> {
    let mut p = vec![kind];
    p.extend(brine_dump(&Value::Tuple(vec![Value::Int(seq), body])).unwrap());
    p
}

/// A reply with a plain value.
fn reply_value(seq: i64, v: Value) -> Vec<u8> {
    payload(REPLY, seq, Value::Tuple(vec![Value::Int(1), v]))
}

/// A reply with an object of the (hostile) server's, as GETROOT's answer.
fn reply_object(seq: i64, class: &str, id: i64) -> Vec<u8> {
    let pack = Value::Tuple(vec![class.into(), Value::Int(1), Value::Int(id)]);
    payload(REPLY, seq, Value::Tuple(vec![Value::Int(4), pack]))
}

/// A zlib stream of `n` zero bytes, made a MiB at a time.
fn zeros_compressed(n: usize) -> Vec<u8> {
    let mut z = ZlibEncoder::new(Vec::new(), Compression::best());
    let chunk = vec![0u8; 1 << 20];
    let mut left = n;
    while left > 0 {
        let k = left.min(chunk.len());
        z.write_all(&chunk[..k]).unwrap();
        left -= k;
    }
    z.finish().unwrap()
}

/// A frame whose data is `data`, flagged compressed.
fn compressed_frame(data: &[u8]) -> Vec<u8> {
    let mut f = (data.len() as u32).to_be_bytes().to_vec();
    f.push(1);
    f.extend_from_slice(data);
    f.push(b'\n');
    f
}

/// A hostile server for one client: `play` gets the socket once the client's first frame (its
/// GETROOT) has been read, with that message. The socket stays open until the test ends (or
/// 30 s), so what the client does is caused by what `play` sent, not by a hang-up.
struct Hostile {
    port: u16,
    _done: mpsc::Sender<()>,
}

fn hostile(play: impl FnOnce(&mut TcpStream, Msg) + Send + 'static) -> Hostile {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let (done, wait) = mpsc::channel::<()>();
    thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let first = read_msg(&mut s);
        assert_eq!((first.kind, handler(&first)), (REQUEST, 3), "GETROOT first");
        play(&mut s, first);
        let _ = wait.recv_timeout(Duration::from_secs(30));
    });
    Hostile { port, _done: done }
}

/// What `root()` gets from a server that answers GETROOT with `frame_bytes`, and how long it
/// took; the connection must be closed afterwards, later calls failing at once.
fn root_after(frame_bytes: Vec<u8>) -> (Error, Duration) {
    let server = hostile(move |s, _| s.write_all(&frame_bytes).unwrap());
    let py = client().connect("127.0.0.1", server.port).unwrap();
    let started = Instant::now();
    let e = py.root().expect_err("root() of a hostile server");
    let took = started.elapsed();
    assert!(py.is_closed(), "still open after {e:?}");
    let started = Instant::now();
    assert!(py.ping().is_err());
    assert!(started.elapsed() < CALL_TIMEOUT / 10);
    (e, took)
}

fn protocol_message(e: &Error) -> &str {
    match e {
        Error::Protocol(m) => m,
        other => panic!("expected Error::Protocol, got {other:?}"),
    }
}

#[test]
fn a_zlib_bomb_in_a_reply_closes_the_connection_naming_the_limit() {
    capture_logs();
    // 64 MiB of zeros: about 64 KiB compressed, well under the frame limit of 1 MiB.
    let bomb = zeros_compressed(64 << 20);
    assert!(bomb.len() < MAX_FRAME / 8);
    let (e, took) = root_after(compressed_frame(&bomb));
    let m = protocol_message(&e);
    assert!(
        m.contains("max_frame_size") && m.contains(&MAX_FRAME.to_string()),
        "{m}"
    );
    assert!(took < CALL_TIMEOUT / 4, "took {took:?}");
    assert!(
        wait_logged(&["Python RPyC connection closed", "inflates to more than"]),
        "the reason was not logged"
    );
}

#[test]
fn garbage_in_a_reply_is_a_protocol_error_and_closes_the_connection() {
    let seq = 0;
    let mut deep = vec![REPLY, 0x11, 0x50];
    deep.extend(std::iter::repeat(0x10).take(200));
    deep.push(0x00);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("an empty payload", vec![]),
        ("an unknown message type", vec![7, 0x11, 0x50, 0x00]),
        ("a truncated tuple", vec![REPLY, 0x11, 0x50]),
        (
            "truncated bytes",
            vec![REPLY, 0x11, 0x50, 0x0f, 0, 0, 1, 0, b'x'],
        ),
        ("an unknown tag", vec![REPLY, 0x11, 0x50, 0xf0]),
        (
            "a tuple claiming 4 billion items",
            vec![REPLY, 0x11, 0x50, 0x15, 0xff, 0xff, 0xff, 0xff],
        ),
        ("nesting 200 deep", deep),
        (
            "a str that is not UTF-8",
            vec![REPLY, 0x11, 0x50, 0x08, 0x0a, 0xff],
        ),
        ("bytes left over", vec![REPLY, 0x11, 0x50, 0x00, 0x00]),
        ("not (seq, body)", vec![REPLY, 0x50]),
        ("a negative seq", vec![REPLY, 0x11, 0x4f, 0x00]),
        (
            "a box with an unknown label",
            payload(REPLY, seq, Value::Tuple(vec![Value::Int(9), Value::None])),
        ),
        (
            "a box that is not a pair",
            payload(REPLY, seq, Value::Int(5)),
        ),
        (
            "a reference that is not an id pack",
            payload(REPLY, seq, Value::Tuple(vec![Value::Int(4), "x".into()])),
        ),
        (
            "an exception that is not one",
            payload(EXCEPTION, seq, Value::Str("boom".into())),
        ),
    ];
    for (what, p) in cases {
        let (e, took) = root_after(frame(&p));
        assert!(
            matches!(e, Error::Protocol(_)),
            "{what}: expected Error::Protocol, got {e:?}"
        );
        assert!(took < CALL_TIMEOUT / 4, "{what}: took {took:?}");
    }
    // A compressed frame whose data is not a zlib stream, and one cut short.
    let (e, _) = root_after(compressed_frame(b"this is not zlib data"));
    assert!(protocol_message(&e).contains("inflate"), "{e:?}");
    let mut cut = zeros_compressed(100_000);
    cut.truncate(cut.len() / 2);
    let (e, _) = root_after(compressed_frame(&cut));
    assert!(matches!(e, Error::Protocol(_)), "{e:?}");
}

#[test]
fn garbage_after_a_good_start_fails_every_waiting_call() {
    let (got_calls, calls) = mpsc::channel();
    let server = hostile(move |s, getroot| {
        s.write_all(&frame(&reply_object(getroot.seq, "hostile.Root", 77)))
            .unwrap();
        // Two calls arrive (from two threads); the answer to the first is garbage.
        let a = read_msg(s);
        let b = read_msg(s);
        got_calls.send((handler(&a), handler(&b))).unwrap();
        s.write_all(&frame(&[REPLY, 0x11, 0x50 + a.seq as u8, 0xf0]))
            .unwrap();
    });
    let py = client().connect("127.0.0.1", server.port).unwrap();
    let root = py.root().unwrap();
    assert_eq!(root.class_name(), "hostile.Root");
    let waiting: Vec<_> = (0..2)
        .map(|i| {
            let root = root.clone();
            thread::spawn(move || {
                let r = root.call_method::<Value, _>("anything", (i,));
                (r, Instant::now())
            })
        })
        .collect();
    let (h1, h2) = calls
        .recv_timeout(CALL_TIMEOUT)
        .expect("both calls reached the server");
    assert_eq!((h1, h2), (8, 8), "CALLATTR twice");
    let sent = Instant::now();
    for w in waiting {
        let (r, at) = w.join().unwrap();
        let e = r.expect_err("a call answered with garbage");
        assert!(protocol_message(&e).contains("unknown brine tag"), "{e:?}");
        assert!(at.saturating_duration_since(sent) < CALL_TIMEOUT / 4);
    }
    assert!(py.is_closed());
}

#[test]
fn an_oversized_length_header_is_refused_at_once() {
    // The header claims 4 GiB (then MAX_FRAME + 1) and nothing follows: the client refuses
    // from the header alone, without waiting for the data.
    for len in [0xffff_fff0u32, MAX_FRAME as u32 + 1] {
        let mut head = len.to_be_bytes().to_vec();
        head.push(0);
        let (e, took) = root_after(head);
        let m = protocol_message(&e);
        assert!(
            m.contains(&len.to_string()) && m.contains("over this side's limit"),
            "{m}"
        );
        assert!(took < CALL_TIMEOUT / 4, "took {took:?}");
    }
}

#[test]
fn stray_replies_are_ignored() {
    let server = hostile(move |s, getroot| {
        // Replies and exceptions for requests never sent, then the real answer.
        s.write_all(&frame(&reply_value(getroot.seq + 100, Value::Int(1))))
            .unwrap();
        s.write_all(&frame(&payload(
            EXCEPTION,
            getroot.seq + 101,
            Value::Int(1),
        )))
        .unwrap();
        s.write_all(&frame(&reply_object(getroot.seq, "hostile.Root", 5)))
            .unwrap();
        let call = read_msg(s);
        s.write_all(&frame(&reply_value(call.seq, Value::Int(42))))
            .unwrap();
    });
    let py = client().connect("127.0.0.1", server.port).unwrap();
    let root = py.root().unwrap();
    assert_eq!(root.call_method::<i64, _>("answer", ()).unwrap(), 42);
    assert!(!py.is_closed());
}

#[test]
fn requests_for_unknown_handlers_or_objects_get_exceptions_and_the_connection_lives() {
    let (answers_tx, answers) = mpsc::channel();
    let server = hostile(move |s, getroot| {
        let args = |items: Vec<Value>| Value::Tuple(vec![Value::Int(1), Value::Tuple(items)]);
        // Handler 99 does not exist; GETATTR of an object we never sent; INSPECT of one; a
        // DEL of one (ignored: no answer expected beyond a plain reply).
        let unknown = ("nobody.Thing".into(), 1i64, 123_456i64);
        let pack = Value::Tuple(vec![
            unknown.0,
            Value::Int(unknown.1),
            Value::Int(unknown.2),
        ]);
        let getattr = Value::Tuple(vec![
            Value::Int(2),
            Value::Tuple(vec![
                Value::Tuple(vec![Value::Int(3), pack.clone()]),
                Value::Tuple(vec![Value::Int(1), "x".into()]),
            ]),
        ]);
        let requests = vec![
            (1000, Value::Tuple(vec![Value::Int(99), args(vec![])])),
            (1001, Value::Tuple(vec![Value::Int(4), getattr])),
            (
                1002,
                Value::Tuple(vec![Value::Int(16), args(vec![pack.clone()])]),
            ),
        ];
        for (seq, body) in requests {
            s.write_all(&frame(&payload(REQUEST, seq, body))).unwrap();
            let m = read_msg(s);
            answers_tx.send((seq, m.kind, m.seq)).unwrap();
        }
        // Then GETROOT's answer, and an answer to the call that follows.
        s.write_all(&frame(&reply_object(getroot.seq, "hostile.Root", 5)))
            .unwrap();
        let call = read_msg(s);
        s.write_all(&frame(&reply_value(call.seq, "still here".into())))
            .unwrap();
    });
    let py = client().connect("127.0.0.1", server.port).unwrap();
    let root = py.root().unwrap();
    for _ in 0..3 {
        let (sent, kind, seq) = answers
            .recv_timeout(CALL_TIMEOUT)
            .expect("an answer to each request");
        assert_eq!(
            (kind, seq),
            (EXCEPTION, sent),
            "request {sent}: an exception"
        );
    }
    assert_eq!(
        root.call_method::<String, _>("hello", ()).unwrap(),
        "still here"
    );
    assert_eq!(py.exported_count(), 0);
}

// ---- Memory, measured on a client in a child process ----

/// The client the memory tests attack: `role` is `client PORT`; it asks for the root (of a
/// frame limit of 1 MiB) and says how that ended.
#[test]
#[ignore = "the child process of the tests in this file; they start it themselves"]
fn child_client() {
    let role = child::role().expect("run only as a child process by the tests of this file");
    let words: Vec<&str> = role.split_whitespace().collect();
    let port: u16 = words[1].parse().unwrap();
    let py = client().connect("127.0.0.1", port).unwrap();
    child::say("connected");
    let r = py.root();
    child::say(format!("ended: {r:?}"));
    child::serve_until_parent_leaves();
}

/// A listener, and a child client connected to it, with the client's GETROOT read.
fn attacked_child() -> (ChildProcess, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let c = ChildProcess::start("child_client", &format!("client {port}"));
    let (mut s, _) = l.accept().unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    assert_eq!(c.heard(Duration::from_secs(30)), "connected");
    let first = read_msg(&mut s);
    assert_eq!(handler(&first), 3);
    (c, s)
}

#[test]
fn a_zlib_bomb_costs_the_client_no_more_than_its_frame_limit() {
    // 256 MiB of zeros, about 250 KiB compressed: inflated whole, the client would grow by
    // 256 MiB; it must stop at its limit of 1 MiB.
    const INFLATED: usize = 256 << 20;
    let bomb = compressed_frame(&zeros_compressed(INFLATED));
    assert!(bomb.len() < MAX_FRAME);
    let (c, mut s) = attacked_child();
    let before = c.rss();
    c.reset_peak();
    s.write_all(&bomb).unwrap();
    let ended = c.heard(Duration::from_secs(30));
    assert!(
        ended.contains("Protocol") && ended.contains("max_frame_size"),
        "{ended}"
    );
    c.assert_peak_grew_at_most(before, INFLATED as u64, 0.05, "zlib bomb");
}

#[test]
fn a_4_gib_length_header_allocates_nothing() {
    // Untouched memory is not resident, so the check is on the address space (VmPeak, which
    // never goes down): a buffer for the claimed 4 GiB would add 4 GiB to it.
    const CLAIMED: u64 = 0xffff_fff0;
    let (c, mut s) = attacked_child();
    let before = c.status("VmPeak") * 1024;
    let mut head = (CLAIMED as u32).to_be_bytes().to_vec();
    head.push(0);
    s.write_all(&head).unwrap();
    let ended = c.heard(Duration::from_secs(30));
    assert!(
        ended.contains("Protocol") && ended.contains("over this side's limit"),
        "{ended}"
    );
    let grew = (c.status("VmPeak") * 1024).saturating_sub(before);
    eprintln!(
        "4 GiB header: the child's address space peak grew by {} MiB",
        grew >> 20
    );
    assert!(
        grew < CLAIMED / 4,
        "the child's address space grew by {grew} bytes after a header claiming {CLAIMED}"
    );
}
