//! A Rust `python::serve` server against clients that break RPyC 6 on purpose, frames made by
//! hand on a raw socket: a malformed frame closes that connection only, with the reason
//! logged; a bad request inside a good frame gets an exception reply; a zlib bomb or an
//! oversized length header costs a bounded amount of memory; a client that does not read is
//! dropped at the stall timeout; peers of another RPyC (4.1-5.x, `RPYC_BIND_THREADS`) are told
//! apart in the log. No thread of the server panics.

mod common;

use common::child::{self, Child};
use common::pyservice::{self, InlineScript, PyServer};
use common::python::run_python_env;
use common::tls::{capture_logs, logged, wait_logged};
use rpyc::python::{self, wire, Value};
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

// ---- RPyC 6 by hand ----

const MSG_REQUEST: u8 = 1;
const MSG_REPLY: u8 = 2;
const MSG_EXCEPTION: u8 = 3;
const HANDLE_GETROOT: i64 = 3;
const HANDLE_GETATTR: i64 = 4;
const HANDLE_CALLATTR: i64 = 8;

/// A frame around `data`: length, the compressed flag, the data, the newline.
fn frame_of(data: &[u8], compressed: bool) -> Vec<u8> {
    let mut f = Vec::with_capacity(data.len() + 6);
    f.extend_from_slice(&(data.len() as u32).to_be_bytes());
    f.push(compressed as u8);
    f.extend_from_slice(data);
    f.push(b'\n');
    f
}

fn brine(v: &Value) -> Vec<u8> {
    wire::brine_dump(v).expect("a brinable value")
}

fn int(i: i64) -> Value {
    Value::Int(i)
}

fn tuple(items: Vec<Value>) -> Value {
    Value::Tuple(items)
}

/// A request frame: `msg | brine((seq, (handler, boxed args)))`.
fn request(seq: i64, handler: i64, boxed: Value) -> Vec<u8> {
    let mut p = vec![MSG_REQUEST];
    p.extend(brine(&tuple(vec![
        int(seq),
        tuple(vec![int(handler), boxed]),
    ])));
    frame_of(&p, false)
}

/// `GETROOT` with sequence number `seq`.
fn getroot(seq: i64) -> Vec<u8> {
    request(seq, HANDLE_GETROOT, tuple(vec![int(1), tuple(vec![])]))
}

/// A reply or exception read from the server: message type, sequence number, body.
fn read_message(s: &mut impl Read) -> io::Result<(u8, i64, Value)> {
    let mut head = [0u8; 5];
    s.read_exact(&mut head)?;
    let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
    assert_eq!(head[4], 0, "a small reply comes uncompressed");
    let mut data = vec![0u8; len + 1];
    s.read_exact(&mut data)?;
    data.pop();
    let v = wire::brine_load(&data[1..]).expect("the server's brine decodes");
    match v {
        Value::Tuple(mut t) if t.len() == 2 => {
            let body = t.pop().unwrap();
            let Value::Int(seq) = t[0] else {
                panic!("no seq in {t:?}")
            };
            Ok((data[0], seq, body))
        }
        other => panic!("not (seq, body): {other:?}"),
    }
}

/// A raw client of `port`; reads time out after 10 s.
fn raw_client(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// The root's id pack, from a `GETROOT` on `s`.
fn root_of(s: &mut TcpStream) -> Value {
    s.write_all(&getroot(0)).unwrap();
    let (kind, seq, body) = read_message(s).unwrap();
    assert_eq!((kind, seq), (MSG_REPLY, 0), "{body:?}");
    match body {
        // (LABEL_REMOTE_REF, id pack): the server's object.
        Value::Tuple(b) if b.len() == 2 && b[0] == int(4) => b[1].clone(),
        other => panic!("GETROOT gave {other:?}"),
    }
}

/// `CALLATTR(root, name, args)`: `root` boxed as our reference to the server's object.
fn callattr(seq: i64, root: &Value, name: &str, args: Vec<Value>) -> Vec<u8> {
    let boxed = tuple(vec![
        int(2),
        tuple(vec![
            tuple(vec![int(3), root.clone()]),
            tuple(vec![int(1), Value::Str(name.into())]),
            tuple(vec![int(1), tuple(args)]),
            tuple(vec![int(1), tuple(vec![])]),
        ]),
    ]);
    request(seq, HANDLE_CALLATTR, boxed)
}

/// The class name `(module, class)` and args of an exception body.
fn exception_of(body: &Value) -> (String, String, Vec<Value>) {
    let Value::Tuple(parts) = body else {
        panic!("not an exception body: {body:?}")
    };
    let (Value::Tuple(name), Value::Tuple(args)) = (&parts[0], &parts[1]) else {
        panic!("not an exception body: {body:?}")
    };
    let (Value::Str(m), Value::Str(c)) = (&name[0], &name[1]) else {
        panic!("not an exception name: {name:?}")
    };
    (m.clone(), c.clone(), args.clone())
}

/// Checks that the server still answers a fresh client (a `GETROOT`, then `add(2, 3)`).
fn still_serves(port: u16) {
    let mut s = raw_client(port);
    let root = root_of(&mut s);
    s.write_all(&callattr(1, &root, "add", vec![int(2), int(3)]))
        .unwrap();
    let (kind, seq, body) = read_message(&mut s).unwrap();
    assert_eq!((kind, seq), (MSG_REPLY, 1), "{body:?}");
    assert_eq!(body, tuple(vec![int(1), int(5)]));
}

// ---- No panics ----

/// Panics seen on the library's threads (named `rpyc-...`).
static PANICS: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn watch_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let name = std::thread::current().name().unwrap_or("").to_string();
            if name.starts_with("rpyc") {
                PANICS.lock().unwrap().push(format!("{name}: {info}"));
            }
            default(info);
        }));
    });
}

fn no_panics() {
    let panics = PANICS.lock().unwrap();
    assert!(panics.is_empty(), "server threads panicked: {panics:?}");
}

/// A server for the attacks: calls (and so stalls) time out after `CALL`, the Python
/// client's checks service.
const CALL: Duration = Duration::from_secs(1);

fn server() -> PyServer {
    watch_panics();
    capture_logs();
    pyservice::serve_with(pyservice::service(), |b| b.call_timeout(CALL))
}

/// Sends `bytes`, then expects the server to hang up within `within` and to log a warning
/// with `parts` under our address. Returns how long the hang-up took.
fn hung_up_on(server: &PyServer, bytes: &[u8], within: Duration, parts: &[&str]) -> Duration {
    let mut s = raw_client(server.port);
    let me = format!("{}: ", s.local_addr().unwrap());
    let started = Instant::now();
    s.write_all(bytes).unwrap();
    assert!(
        common::raw::hangs_up_within(&mut s, within),
        "the server kept a connection that sent {:02x?}",
        &bytes[..bytes.len().min(32)]
    );
    let took = started.elapsed();
    let mut all = vec![me.as_str()];
    all.extend(parts);
    assert!(
        wait_logged(&all),
        "not logged: {all:?}; the log: {:?}",
        common::tls::LOGS.lock().unwrap()
    );
    took
}

// ---- Malformed frames ----

#[test]
fn garbage_brine_closes_that_connection_logs_why_and_the_server_serves_others() {
    let server = server();
    // Tag 0xff is no brine type.
    let f = frame_of(&[MSG_REQUEST, 0x11, 0x50, 0xff], false);
    hung_up_on(
        &server,
        &f,
        CALL,
        &["Python RPyC connection closed", "brine"],
    );
    // A tuple claiming more items than there are bytes.
    let f = frame_of(&[MSG_REQUEST, 0x15, 0xff, 0xff, 0xff, 0xff, 0x50], false);
    hung_up_on(&server, &f, CALL, &["Python RPyC connection closed"]);
    // Not (seq, body).
    let f = frame_of(&[MSG_REQUEST, 0x50], false);
    hung_up_on(&server, &f, CALL, &["not (seq, body)"]);
    // A "compressed" frame that is no zlib stream.
    let f = frame_of(b"certainly not zlib", true);
    hung_up_on(&server, &f, CALL, &["does not inflate"]);
    still_serves(server.port);
    no_panics();
}

#[test]
fn an_unknown_message_type_closes_the_connection_and_is_logged() {
    let server = server();
    let mut p = vec![7u8];
    p.extend(brine(&tuple(vec![
        int(0),
        tuple(vec![int(3), tuple(vec![int(1), tuple(vec![])])]),
    ])));
    hung_up_on(
        &server,
        &frame_of(&p, false),
        CALL,
        &["unknown RPyC message type 7"],
    );
    // An empty payload too.
    hung_up_on(&server, &frame_of(&[], false), CALL, &["empty RPyC frame"]);
    still_serves(server.port);
    no_panics();
}

#[test]
fn a_frame_cut_short_ends_the_connection_at_once_on_close_and_at_the_stall_timeout_if_silent() {
    let server = server();
    let whole = getroot(0);
    // Cut, then the client closes its side: the server sees the end mid-frame.
    let mut s = raw_client(server.port);
    s.write_all(&whole[..whole.len() - 4]).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let started = Instant::now();
    assert!(common::raw::hangs_up_within(&mut s, CALL));
    assert!(started.elapsed() < CALL / 2, "took {:?}", started.elapsed());
    // Cut, then silence: dropped once it has stalled for the stall timeout (the call
    // timeout, at least 1 s), not before and not much later.
    let mut s = raw_client(server.port);
    s.write_all(&whole[..3]).unwrap();
    let started = Instant::now();
    assert!(common::raw::hangs_up_within(&mut s, CALL * 4));
    let took = started.elapsed();
    assert!(
        took >= CALL.mul_f64(0.9) && took <= CALL * 2,
        "a stalled frame dropped after {took:?}, the stall timeout being {CALL:?}"
    );
    common::expect_within("no connection left", common::SETTLE, || {
        server.handle.connections() == 0
    });
    still_serves(server.port);
    no_panics();
}

// ---- Bad requests in good frames: an exception reply, the connection goes on ----

#[test]
fn an_unknown_handler_gets_a_key_error_reply_and_the_connection_goes_on() {
    let server = server();
    let mut s = raw_client(server.port);
    let root = root_of(&mut s);
    s.write_all(&request(5, 99, tuple(vec![int(1), tuple(vec![])])))
        .unwrap();
    let (kind, seq, body) = read_message(&mut s).unwrap();
    assert_eq!((kind, seq), (MSG_EXCEPTION, 5), "{body:?}");
    let (module, class, args) = exception_of(&body);
    assert_eq!((module.as_str(), class.as_str()), ("builtins", "KeyError"));
    assert_eq!(args, vec![int(99)]);
    // Handlers the server does not implement (INSTANCECHECK) get an exception too.
    s.write_all(&request(6, 20, tuple(vec![int(1), tuple(vec![])])))
        .unwrap();
    let (kind, seq, _) = read_message(&mut s).unwrap();
    assert_eq!((kind, seq), (MSG_EXCEPTION, 6));
    s.write_all(&callattr(7, &root, "add", vec![int(20), int(22)]))
        .unwrap();
    let (kind, seq, body) = read_message(&mut s).unwrap();
    assert_eq!(
        (kind, seq, body),
        (MSG_REPLY, 7, tuple(vec![int(1), int(42)]))
    );
    no_panics();
}

#[test]
fn a_reference_to_an_object_the_server_never_sent_gets_a_key_error_reply() {
    let server = server();
    let mut s = raw_client(server.port);
    let root = root_of(&mut s);
    // GETATTR on an id pack the server never gave out (and another with the root's class).
    for (seq, pack) in [
        (
            1,
            tuple(vec![Value::Str("rust.Nothing".into()), int(1), int(999)]),
        ),
        (
            2,
            tuple(vec![
                Value::Str("rust.ChecksService".into()),
                int(1),
                int(12345),
            ]),
        ),
    ] {
        let boxed = tuple(vec![
            int(2),
            tuple(vec![
                tuple(vec![int(3), pack]),
                tuple(vec![int(1), Value::Str("add".into())]),
            ]),
        ]);
        s.write_all(&request(seq, HANDLE_GETATTR, boxed)).unwrap();
        let (kind, got, body) = read_message(&mut s).unwrap();
        assert_eq!((kind, got), (MSG_EXCEPTION, seq), "{body:?}");
        let (_, class, _) = exception_of(&body);
        assert_eq!(class, "KeyError", "{body:?}");
    }
    // The connection goes on.
    s.write_all(&callattr(3, &root, "add", vec![int(1), int(1)]))
        .unwrap();
    let (kind, seq, body) = read_message(&mut s).unwrap();
    assert_eq!(
        (kind, seq, body),
        (MSG_REPLY, 3, tuple(vec![int(1), int(2)]))
    );
    no_panics();
}

// ---- Sizes ----

#[test]
fn an_oversized_length_header_is_refused_from_the_header_alone() {
    let server = server();
    // 4 GiB announced, nothing sent after the header: a server that waited for the data (or
    // allocated for it) would keep the connection until the stall timeout.
    let took = hung_up_on(
        &server,
        &[0xff, 0xff, 0xff, 0xf0, 0],
        CALL,
        &["over this side's limit"],
    );
    assert!(took < CALL / 2, "refused after {took:?}");
    // Just over the configured limit is refused too.
    let limit = 1 << 20;
    let small = pyservice::serve_with(pyservice::service(), |b| {
        b.call_timeout(CALL).max_frame_size(limit)
    });
    let mut head = ((limit + 1) as u32).to_be_bytes().to_vec();
    head.push(0);
    hung_up_on(&small, &head, CALL, &["over this side's limit of 1048576"]);
    still_serves(small.port);
    no_panics();
}

#[test]
fn a_client_that_never_reads_its_replies_is_dropped_at_the_stall_timeout() {
    let server = server();
    let mut s = raw_client(server.port);
    let me = format!("{}: ", s.local_addr().unwrap());
    let root = root_of(&mut s);
    // Replies of 1 MiB each that do not compress, never read: 64 MiB, more than the socket
    // buffers hold, so the server's writes stall.
    let blob = noise(1 << 20);
    let call = callattr(1, &root, "echo", vec![Value::Bytes(blob)]);
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut sent = 0;
    let mut last = Instant::now();
    for _ in 0..64 {
        if s.write_all(&call).is_err() {
            break;
        }
        sent += 1;
        last = Instant::now();
    }
    assert!(
        common::wait_until(CALL * 5, || server.handle.connections() == 0),
        "a client that read none of {sent} replies still connected {:?} later",
        last.elapsed()
    );
    let took = last.elapsed();
    eprintln!("{sent} requests of 1 MiB unread: dropped {took:?} after the last");
    assert!(
        took <= CALL * 3,
        "dropped {took:?} after the last request, the stall timeout being {CALL:?}"
    );
    // Warned of, as native servers do.
    let parts = [me.as_str(), "the peer read nothing for 1s"];
    assert!(wait_logged(&parts), "not logged: {parts:?}");
    still_serves(server.port);
    no_panics();
}

#[test]
fn a_client_that_pings_and_never_reads_is_dropped_once_the_answers_exceed_the_buffer_bound() {
    watch_panics();
    capture_logs();
    // Frames of 1 MiB: the connection buffers 2 MiB of replies (and urgent answers twice
    // that); the stall timeout (the call timeout) is far off.
    let stall = Duration::from_secs(60);
    let server = pyservice::serve_with(pyservice::service(), |b| {
        b.max_frame_size(1 << 20).call_timeout(stall)
    });
    let mut s = raw_client(server.port);
    let me = format!("{}: ", s.local_addr().unwrap());
    // PINGs of 512 KiB that do not compress: the server answers each with its data, at
    // once, from its reading thread.
    let ping = request(
        1,
        1,
        tuple(vec![int(1), tuple(vec![Value::Bytes(noise(512 << 10))])]),
    );
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    let started = Instant::now();
    let mut sent = 0;
    for _ in 0..400 {
        if s.write_all(&ping).is_err() {
            break;
        }
        sent += 1;
    }
    assert!(
        common::wait_until(stall / 4, || server.handle.connections() == 0),
        "a client that read none of {sent} PING answers is still connected"
    );
    let took = started.elapsed();
    eprintln!("{sent} PINGs of 512 KiB unread: dropped after {took:?}");
    assert!(
        took < stall / 4,
        "dropped after {took:?}, the stall timeout being {stall:?}"
    );
    let parts = [me.as_str(), "does not read our replies"];
    assert!(wait_logged(&parts), "not logged: {parts:?}");
    still_serves(server.port);
    no_panics();
}

/// `n` bytes that do not compress.
fn noise(n: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 32) as u8
        })
        .collect()
}

// ---- Other RPyC versions ----

#[test]
fn an_rpyc_5_client_is_closed_and_the_log_names_rpyc_4_1_to_5() {
    let server = server();
    // RPyC 5.3.1's GETROOT: brine (REQUEST, seq 0, (GETROOT, (1, ()))).
    hung_up_on(
        &server,
        &[
            0, 0, 0, 8, 0, 0x12, 0x51, 0x50, 0x11, 0x53, 0x11, 0x51, 0x02, 0x0a,
        ],
        CALL,
        &["RPyC 4.1-5.x", "pip install 'rpyc>=6,<7'"],
    );
    still_serves(server.port);
    no_panics();
}

#[test]
fn a_bind_threads_client_is_closed_and_the_log_names_rpyc_bind_threads() {
    let server = server();
    // By hand: 16 bytes of thread ids, then RPyC 6's GETROOT.
    let mut p = vec![
        0, 0, 0x7f, 0x38, 0x87, 0xe3, 0xbb, 0x80, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    p.extend_from_slice(&[0x01, 0x11, 0x50, 0x11, 0x53, 0x11, 0x51, 0x02]);
    hung_up_on(&server, &frame_of(&p, false), CALL, &["RPYC_BIND_THREADS"]);
    // And the real thing: rpyc 6.0.2 with RPYC_BIND_THREADS=true.
    let out = run_python_env(
        "client_checks.py",
        &["--port", &server.port.to_string(), "ping"],
        &[("RPYC_BIND_THREADS", "true")],
        Duration::from_secs(60),
    );
    assert!(!out.success(), "a bind_threads client was served: {out}");
    assert!(logged(&["RPYC_BIND_THREADS", "start the peer without it"]));
    still_serves(server.port);
    no_panics();
}

// ---- Memory (a server in a child process) ----

/// The server the memory tests attack, in a child process: the checks service, frames limited
/// to the `max_frame=N` of its role; it says `port N`, then each warning it logs.
#[test]
#[ignore = "the child process of the tests in this file; they start it themselves"]
fn child_server() {
    let role = child::role().expect("run only as a child process by the tests of this file");
    child::say_logs(log::Level::Warn, "");
    watch_panics();
    let max_frame: usize = role
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("max_frame=")?.parse().ok())
        .expect("max_frame=N");
    let server = python::serve(pyservice::service())
        .hostname("127.0.0.1")
        .port(0)
        .call_timeout(CALL)
        .max_frame_size(max_frame)
        .build()
        .unwrap();
    child::say(format!("port {}", server.port()));
    let _handle = server.spawn().unwrap();
    child::serve_until_parent_leaves();
}

/// Writes zlib (level 9) of an RPyC request whose argument is `inflated` bytes, to `path`.
const BOMB: &str = r#"
import sys, zlib
path, inflated = sys.argv[1], int(sys.argv[2])
z = zlib.compressobj(9)
# REQUEST, (seq 0, (CALL, (1, b'<inflated - 13 zero bytes>'))): a well-formed start.
head = bytes([1, 0x11, 0x50, 0x11, 0x57, 0x11, 0x51, 0x0f]) + (inflated - 13).to_bytes(4, "big")
out = [z.compress(head)]
chunk = bytes(1 << 20)
left = inflated - len(head)
while left > 0:
    n = min(left, len(chunk))
    out.append(z.compress(chunk[:n]))
    left -= n
out.append(z.flush())
with open(path, "wb") as f:
    f.write(b"".join(out))
"#;

/// Waits (at most 10 s) until the child says a line containing every one of `parts`.
fn child_logged(c: &Child, parts: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut heard = Vec::new();
    while Instant::now() < deadline {
        let line = c.heard(deadline.saturating_duration_since(Instant::now()));
        if parts.iter().all(|p| line.contains(p)) {
            return line;
        }
        heard.push(line);
    }
    panic!("the child did not log {parts:?}; it said {heard:?}");
}

#[test]
fn a_zlib_bomb_is_inflated_only_to_the_frame_limit_and_closes_that_connection() {
    const MIB: u64 = 1 << 20;
    let max_frame = MIB;
    let inflated = 512 * MIB;
    let c = Child::start("child_server", &format!("server max_frame={max_frame}"));
    let port = c.port();
    // Warm up: the first connection's threads and buffers are not the bomb's cost.
    still_serves(port);
    let script = InlineScript::new("bomb", BOMB);
    let path = std::env::temp_dir().join(format!("rpyc-bomb-{}.zlib", std::process::id()));
    script
        .run(
            &[path.to_str().unwrap(), &inflated.to_string()],
            Duration::from_secs(120),
        )
        .assert_success();
    let bomb = std::fs::read(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    assert!(
        (bomb.len() as u64) < max_frame,
        "the bomb ({} bytes) must pass the frame header check",
        bomb.len()
    );
    eprintln!(
        "bomb: {} KiB inflating to {} MiB, frame limit {} MiB",
        bomb.len() >> 10,
        inflated / MIB,
        max_frame / MIB
    );
    let before = c.rss();
    c.reset_peak();
    let mut s = raw_client(port);
    let me = format!("{}: ", s.local_addr().unwrap());
    s.write_all(&frame_of(&bomb, true)).unwrap();
    assert!(
        common::raw::hangs_up_within(&mut s, CALL * 5),
        "the server kept the connection that sent a zlib bomb"
    );
    child_logged(&c, &[&me, "inflates to more than", "max_frame_size"]);
    // Bounded by the frame limit, not the bomb: at most a few frame limits of growth, a
    // tiny fraction of what it inflates to.
    c.assert_peak_grew_at_most(before, inflated, 0.02, "a zlib bomb");
    still_serves(port);
}
