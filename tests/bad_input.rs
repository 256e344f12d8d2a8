//! Hostile and broken peers: handshakes with non-rpyc peers and other protocol versions, raw
//! clients sending malformed frames to a real server, and a deterministic fuzz run. The server
//! must never panic and must keep serving well-behaved clients.

mod common;

use common::raw::{self, cbor_head, frame, CALL, ERROR, ONEWAY, PING, RELEASE, REPLY};
use rpyc::{Error, HandshakeError, HandshakeErrorKind, ServerHandle, Service, ThreadedServer};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Once;
use std::thread;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// Detecting panics on the crate's threads (handler panics would be caught and reported, but the
// services here never panic, so any panic on an `rpyc-*` thread is a bug).

static RPYC_PANICS: AtomicUsize = AtomicUsize::new(0);

fn watch_for_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if thread::current()
                .name()
                .is_some_and(|n| n.starts_with("rpyc"))
            {
                RPYC_PANICS.fetch_add(1, Ordering::SeqCst);
            }
            previous(info);
        }));
    });
}

fn assert_no_panics() {
    assert_eq!(
        RPYC_PANICS.load(Ordering::SeqCst),
        0,
        "a thread of the crate panicked (see stderr)"
    );
}

// ---------------------------------------------------------------------------------------------
// The wire format, by hand (common/raw.rs; see src/wire/mod.rs and PROTOCOL.md).

/// A body `[kind, id, parent, target, method]` followed by `payload` (one CBOR item), without
/// its length.
fn body(kind: u64, id: u64, parent: u64, target: u64, method: &str, payload: &[u8]) -> Vec<u8> {
    frame(kind, id, parent, target, method, payload).split_off(4)
}

fn framed(body: &[u8]) -> Vec<u8> {
    let mut f = (body.len() as u32).to_be_bytes().to_vec();
    f.extend_from_slice(body);
    f
}

/// `add(1, 2)` on the root service.
fn add_call(id: u64) -> Vec<u8> {
    frame(CALL, id, 0, 0, "add", &[0x82, 0x01, 0x02])
}

/// Reads one frame the server sent: (kind, id, payload).
fn read_frame(s: &mut TcpStream) -> (u64, u64, Vec<u8>) {
    let f = raw::read_frame(s)
        .expect("a frame from the server")
        .expect("a frame, not the end of the stream");
    (f.kind, f.id, f.payload)
}

/// Reads until the server hangs up; fails if it keeps the connection open for 5 s.
fn expect_hangup(s: &mut TcpStream, what: &str) {
    assert!(
        raw::hangs_up_within(s, Duration::from_secs(5)),
        "the server did not hang up after {what}"
    );
}

// ---------------------------------------------------------------------------------------------
// Servers and clients.

fn server() -> (ServerHandle, u16) {
    watch_for_panics();
    let service = Service::new("target")
        .method("add", |a: i64, b: i64| a + b)
        .method("echo", |s: String| s)
        .method("nothing", || ());
    let server = ThreadedServer::new(service).build().unwrap();
    let port = server.port();
    (server.spawn().unwrap(), port)
}

/// The server still serves a well-behaved client, and nothing panicked.
fn still_serves(port: u16) {
    let conn = rpyc::connect("127.0.0.1", port).expect("a good client can still connect");
    assert_eq!(conn.root().call::<i64, _>("add", (40, 2)).unwrap(), 42);
    conn.close();
    assert_no_panics();
}

fn wait_for_no_connections(handle: &ServerHandle) {
    common::expect_within(
        "the server held no connection",
        Duration::from_secs(5),
        || handle.connections() == 0,
    );
}

/// Sends `bytes` after a valid handshake and checks that the server hangs up and still serves
/// others.
fn hostile(port: u16, what: &str, bytes: &[u8]) {
    let mut s = raw::client(port);
    let _ = s.write_all(bytes);
    expect_hangup(&mut s, what);
    still_serves(port);
}

// ---------------------------------------------------------------------------------------------
// Handshake with peers that are not rpyc, or not this version.

/// A fake server that sends `banner` as soon as a client connects, then reads until the client
/// leaves, or (`hang_up`) reads the client's hello and hangs up.
fn fake_server(banner: &'static [u8], hang_up: bool) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let _ = s.write_all(banner);
        if hang_up {
            let mut theirs = [0u8; 16];
            let _ = s.read_exact(&mut theirs);
        } else {
            let mut sink = Vec::new();
            let _ = s.read_to_end(&mut sink);
        }
    });
    port
}

fn handshake_error(port: u16) -> HandshakeError {
    let start = Instant::now();
    let r = rpyc::Options::new()
        .handshake_timeout(Duration::from_secs(5))
        .connect("127.0.0.1", port);
    assert!(start.elapsed() < Duration::from_secs(3));
    match r {
        Err(Error::Handshake(e)) => e,
        other => panic!("expected a handshake error, got {other:?}"),
    }
}

#[test]
fn http_server_is_named_in_the_handshake_error() {
    let port = fake_server(
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        false,
    );
    let e = handshake_error(port);
    assert_eq!(e.kind(), HandshakeErrorKind::NotRpyc, "{e}");
    assert!(e.message().contains("it speaks HTTP"), "{e}");
}

#[test]
fn ssh_server_is_named_in_the_handshake_error() {
    let port = fake_server(b"SSH-2.0-OpenSSH_9.2\r\n", false);
    let e = handshake_error(port);
    assert_eq!(e.kind(), HandshakeErrorKind::NotRpyc, "{e}");
    assert!(e.message().contains("it is an SSH server"), "{e}");
}

#[test]
fn peer_speaking_another_protocol_version_is_refused_by_version() {
    let banner: &'static [u8] = Box::leak(Box::new(raw::hello_version(99)));
    let port = fake_server(banner, false);
    let e = handshake_error(port);
    assert_eq!(e.kind(), HandshakeErrorKind::VersionMismatch, "{e}");
    let why = e.message();
    assert!(why.contains("version 99"), "{why}");
    assert!(why.contains("version 1"), "{why}");
    assert!(why.contains("upgrade the older side"), "{why}");
}

#[test]
fn peer_announcing_an_unusable_frame_limit_is_refused() {
    let banner: &'static [u8] = Box::leak(Box::new(raw::hello_with(10, 1024)));
    let e = handshake_error(fake_server(banner, false));
    assert_eq!(e.kind(), HandshakeErrorKind::BadHello, "{e}");
    assert!(
        e.message().contains("unusable frame limit of 10 bytes"),
        "{e}"
    );
}

#[test]
fn peer_that_hangs_up_during_the_handshake_is_a_handshake_error() {
    let port = fake_server(b"RPYC", true);
    let e = handshake_error(port);
    assert_eq!(e.kind(), HandshakeErrorKind::Closed, "{e}");
    // What a person reads lists the likely reasons.
    assert!(
        e.message().contains("closed the connection")
            && e.message().contains("is it an rpyc peer?"),
        "{e}"
    );
}

#[test]
fn server_hangs_up_on_clients_with_a_bad_hello() {
    let (handle, port) = server();
    let cases: [(&str, Vec<u8>); 4] = [
        (
            "an HTTP request",
            b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n".to_vec(),
        ),
        ("an SSH banner", b"SSH-2.0-OpenSSH_9.2\r\n".to_vec()),
        ("a hello of version 99", raw::hello_version(99).to_vec()),
        (
            "a hello announcing a 0-byte frame limit",
            raw::hello_with(0, 1024).to_vec(),
        ),
    ];
    for (what, bytes) in cases {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.write_all(&bytes).unwrap();
        expect_hangup(&mut s, what);
        still_serves(port);
    }
    wait_for_no_connections(&handle);
    handle.close();
}

// ---------------------------------------------------------------------------------------------
// Malformed traffic after a valid handshake.

#[test]
fn garbage_after_the_handshake_closes_only_that_connection() {
    let (handle, port) = server();
    // Another client, connected throughout, is not disturbed.
    let bystander = rpyc::connect("127.0.0.1", port).unwrap();
    hostile(
        port,
        "garbage",
        b"this is not a frame at all, just some garbage bytes\r\n",
    );
    hostile(
        port,
        "zero bytes of length then junk",
        &[0, 0, 0, 0, 0xff, 0xff],
    );
    assert_eq!(bystander.root().call::<i64, _>("add", (1, 2)).unwrap(), 3);
    bystander.close();
    wait_for_no_connections(&handle);
    handle.close();
}

#[test]
fn truncated_frame_then_close_is_survived() {
    let (handle, port) = server();
    let mut s = raw::client(port);
    let f = add_call(1);
    s.write_all(&f[..f.len() - 3]).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    expect_hangup(&mut s, "a truncated frame");
    // Cut inside the length prefix too.
    let mut s = raw::client(port);
    s.write_all(&[0, 0]).unwrap();
    drop(s);
    still_serves(port);
    wait_for_no_connections(&handle);
    handle.close();
}

#[test]
fn oversized_frame_length_is_refused_at_once() {
    let (handle, port) = server();
    let start = Instant::now();
    // Nothing follows the length: the server must not wait for 4 GiB, nor reserve it.
    hostile(port, "a 4 GiB length", &0xFFFF_FFFFu32.to_be_bytes());
    assert!(start.elapsed() < Duration::from_secs(3));
    // Just over the server's default 256 MiB limit.
    hostile(
        port,
        "a 256 MiB + 1 length",
        &((256u32 << 20) + 1).to_be_bytes(),
    );
    wait_for_no_connections(&handle);
    handle.close();
}

#[test]
fn malformed_headers_are_protocol_violations() {
    let (handle, port) = server();
    let mut long_name = body(CALL, 1, 0, 0, "", &[0x80]);
    long_name.truncate(5);
    cbor_head(&mut long_name, 3, 5000);
    long_name.extend(std::iter::repeat(b'a').take(5000));
    long_name.push(0x80);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("a 3-array header", framed(&[0x83, 0x00, 0x01, 0x00, 0x80])),
        ("a map header", framed(&[0xa1, 0x00, 0x00, 0x80])),
        ("a text header", framed(&[0x63, b'a', b'b', b'c', 0x80])),
        ("an empty body", framed(&[])),
        (
            "a header without payload",
            framed(&body(CALL, 1, 0, 0, "add", &[])),
        ),
        (
            "a negative id",
            framed(&[0x85, 0x00, 0x20, 0x00, 0x00, 0x63, b'a', b'd', b'd', 0x80]),
        ),
        (
            "a method name that is a number",
            framed(&[0x85, 0x00, 0x01, 0x00, 0x00, 0x07, 0x80]),
        ),
        (
            "a method name that is not UTF-8",
            framed(&[0x85, 0x00, 0x01, 0x00, 0x00, 0x62, 0xff, 0xfe, 0x80]),
        ),
        (
            "an indefinite-length header",
            framed(&[0x9f, 0x00, 0x01, 0x00, 0x00, 0x60, 0xff, 0x80]),
        ),
        (
            "a method name running past the body",
            framed(&[0x85, 0x00, 0x01, 0x00, 0x00, 0x78, 0xff, b'a']),
        ),
        ("a method name over the limit", framed(&long_name)),
        (
            "a 128-bit-ish id",
            framed(&[0x85, 0x00, 0x1c, 0x00, 0x00, 0x60, 0x80]),
        ),
    ];
    for (what, bytes) in cases {
        hostile(port, what, &bytes);
    }
    wait_for_no_connections(&handle);
    handle.close();
}

#[test]
fn unknown_message_kind_is_a_protocol_violation() {
    let (handle, port) = server();
    hostile(
        port,
        "kind 9",
        &frame(9, 1, 0, 0, "add", &[0x82, 0x01, 0x02]),
    );
    hostile(port, "kind 200", &frame(200, 1, 0, 0, "add", &[0x80]));
    wait_for_no_connections(&handle);
    handle.close();
}

#[test]
fn call_to_an_unknown_object_gets_an_error_reply_and_the_connection_stays_open() {
    let (handle, port) = server();
    let mut s = raw::client(port);
    s.write_all(&frame(CALL, 7, 0, 999, "add", &[0x82, 0x01, 0x02]))
        .unwrap();
    let (kind, id, payload) = read_frame(&mut s);
    assert_eq!((kind, id), (ERROR, 7));
    // [code 5 = no such object, service, method, message]
    assert_eq!(&payload[..2], &[0x84, 0x05], "{payload:02x?}");
    assert!(String::from_utf8_lossy(&payload).contains("999"));

    // Unknown methods, wrong arguments: error replies too.
    s.write_all(&frame(CALL, 8, 0, 0, "no_such_method", &[0x80]))
        .unwrap();
    let (kind, id, payload) = read_frame(&mut s);
    assert_eq!((kind, id, &payload[..2]), (ERROR, 8, &[0x84u8, 0x03][..]));
    s.write_all(&frame(CALL, 9, 0, 0, "add", &[0x81, 0x61, b'x']))
        .unwrap();
    let (kind, id, payload) = read_frame(&mut s);
    assert_eq!((kind, id, &payload[..2]), (ERROR, 9, &[0x84u8, 0x04][..]));

    // The same connection still serves a good call, and pings.
    s.write_all(&add_call(10)).unwrap();
    assert_eq!(read_frame(&mut s), (REPLY, 10, vec![0x03]));
    s.write_all(&frame(PING, 11, 0, 0, "", &[0xf6])).unwrap();
    assert_eq!(read_frame(&mut s), (REPLY, 11, vec![0xf6]));
    // Releasing objects that never existed is ignored.
    s.write_all(&frame(
        RELEASE,
        0,
        0,
        0,
        "",
        &[0x81, 0x82, 0x18, 0x63, 0x01],
    ))
    .unwrap();
    s.write_all(&add_call(12)).unwrap();
    assert_eq!(read_frame(&mut s), (REPLY, 12, vec![0x03]));
    drop(s);
    still_serves(port);
    wait_for_no_connections(&handle);
    handle.close();
}

#[test]
fn deeply_nested_arguments_get_an_error_reply_without_overflowing_the_stack() {
    let (handle, port) = server();
    let mut s = raw::client(port);
    let nests: [(&str, Vec<u8>); 5] = [
        ("arrays", [vec![0x81; 10_000], vec![0x00]].concat()),
        (
            "indefinite arrays",
            [vec![0x9f; 10_000], vec![0xff; 10_000]].concat(),
        ),
        ("maps", [[0xa1, 0x00].repeat(10_000), vec![0x00]].concat()),
        ("tags", [[0xd8, 0x2a].repeat(10_000), vec![0x00]].concat()),
        (
            "arrays in an argument",
            [vec![0x82, 0x01], vec![0x81; 10_000], vec![0x00]].concat(),
        ),
    ];
    let mut id = 100;
    for (what, payload) in &nests {
        for method in ["add", "echo", "nothing"] {
            id += 1;
            s.write_all(&frame(CALL, id, 0, 0, method, payload))
                .unwrap();
            let (kind, got_id, reply) = read_frame(&mut s);
            assert_eq!(
                (kind, got_id),
                (ERROR, id),
                "nested {what} to {method}: {:?}",
                String::from_utf8_lossy(&reply)
            );
            assert_no_panics();
        }
        // Where no reply is expected: a oneway call and a release.
        s.write_all(&frame(ONEWAY, 0, 0, 0, "add", payload))
            .unwrap();
        s.write_all(&frame(RELEASE, 0, 0, 0, "", payload)).unwrap();
        id += 1;
        s.write_all(&add_call(id)).unwrap();
        assert_eq!(
            read_frame(&mut s),
            (REPLY, id, vec![0x03]),
            "after nested {what}"
        );
    }
    drop(s);
    still_serves(port);
    wait_for_no_connections(&handle);
    handle.close();
}

#[test]
fn large_bad_arguments_get_error_replies_that_quote_only_a_prefix() {
    let (handle, port) = server();
    let mut s = raw::client(port);
    // Many tiny items for a method without parameters.
    let mut zeros = Vec::new();
    cbor_head(&mut zeros, 4, 500_000);
    zeros.resize(zeros.len() + 500_000, 0x00);
    // Long strings where integers are expected.
    let mut strings = vec![0x82];
    for _ in 0..2 {
        cbor_head(&mut strings, 3, 300_000);
        strings.resize(strings.len() + 300_000, b'x');
    }
    for (id, method, payload, says) in [
        (1, "nothing", &zeros, "expected no arguments, got [0, 0, 0"),
        (2, "add", &strings, "expected i64"),
    ] {
        s.write_all(&frame(CALL, id, 0, 0, method, payload))
            .unwrap();
        let (kind, got_id, reply) = read_frame(&mut s);
        assert_eq!((kind, got_id), (ERROR, id));
        let text = String::from_utf8_lossy(&reply);
        assert!(
            reply.len() < 1024,
            "{method}: {} bytes: {text}",
            reply.len()
        );
        assert!(text.contains(says), "{method}: {text}");
    }
    s.write_all(&add_call(3)).unwrap();
    assert_eq!(read_frame(&mut s), (REPLY, 3, vec![0x03]));
    drop(s);
    still_serves(port);
    wait_for_no_connections(&handle);
    handle.close();
}

#[test]
fn reply_to_a_request_never_sent_is_a_protocol_violation() {
    let (handle, port) = server();
    hostile(
        port,
        "a reply to request 77",
        &frame(REPLY, 77, 0, 0, "", &[0x03]),
    );
    hostile(
        port,
        "a reply to request 0",
        &frame(REPLY, 0, 0, 0, "", &[0x03]),
    );
    hostile(
        port,
        "an error reply to request 5",
        &frame(ERROR, 5, 0, 0, "", &[0x84, 0x01, 0x60, 0x60, 0x60]),
    );
    wait_for_no_connections(&handle);
    handle.close();
}

#[test]
fn nested_request_naming_a_parent_that_does_not_exist_is_served_normally() {
    let (handle, port) = server();
    let mut s = raw::client(port);
    s.write_all(&frame(CALL, 3, 12345, 0, "add", &[0x82, 0x01, 0x02]))
        .unwrap();
    assert_eq!(read_frame(&mut s), (REPLY, 3, vec![0x03]));
    drop(s);
    still_serves(port);
    wait_for_no_connections(&handle);
    handle.close();
}

// ---------------------------------------------------------------------------------------------
// Fuzzing through the public surface: random and mutated traffic from raw clients.

/// A small deterministic generator (xorshift64), so failures reproduce.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn valid_frames(rng: &mut XorShift) -> Vec<u8> {
    let templates: [fn(u64) -> Vec<u8>; 8] = [
        add_call,
        |id| frame(CALL, id, 0, 0, "echo", &[0x81, 0x62, b'h', b'i']),
        |id| frame(CALL, id, 0, 0, "nothing", &[0x80]),
        |id| frame(CALL, id, 0, 999, "add", &[0x82, 0x01, 0x02]),
        |id| frame(CALL, id, 0, 0, "missing", &[0x80]),
        |_| frame(ONEWAY, 0, 0, 0, "add", &[0x82, 0x01, 0x02]),
        |id| frame(PING, id, 0, 0, "", &[0xf6]),
        |_| frame(RELEASE, 0, 0, 0, "", &[0x81, 0x82, 0x01, 0x01]),
    ];
    let mut out = Vec::new();
    for i in 0..1 + rng.below(4) {
        let t = templates[rng.below(templates.len() as u64) as usize];
        out.extend(t(i + 1));
    }
    out
}

fn fuzz_input(rng: &mut XorShift) -> (Vec<u8>, bool) {
    // (bytes, whether to send a valid hello first)
    match rng.below(6) {
        0 => {
            let n = rng.below(256) as usize;
            (rng.bytes(n), true)
        }
        1 | 2 => {
            let mut f = valid_frames(rng);
            for _ in 0..1 + rng.below(4) {
                let at = rng.below(f.len() as u64) as usize;
                f[at] = rng.next() as u8;
            }
            if rng.below(3) == 0 {
                let keep = rng.below(f.len() as u64 + 1) as usize;
                f.truncate(keep);
            }
            (f, true)
        }
        3 => {
            // A valid header with a random payload.
            let n = 1 + rng.below(64) as usize;
            let payload = rng.bytes(n);
            let kind = rng.below(7);
            let id = rng.next() >> rng.below(64);
            (frame(kind, id, 0, rng.below(3), "add", &payload), true)
        }
        4 => (valid_frames(rng), true),
        _ => {
            // A damaged hello, then anything.
            let mut h = raw::hello().to_vec();
            let at = rng.below(16) as usize;
            h[at] = rng.next() as u8;
            let n = rng.below(64) as usize;
            h.extend(rng.bytes(n));
            (h, false)
        }
    }
}

#[test]
fn random_and_mutated_traffic_never_breaks_the_server() {
    let (handle, port) = server();
    // Longer runs: RPYC_FUZZ_ITERATIONS=100000 RPYC_FUZZ_SEED=12345 cargo test --test bad_input
    let env = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
    let iterations = env("RPYC_FUZZ_ITERATIONS").unwrap_or(300);
    let seed = env("RPYC_FUZZ_SEED")
        .unwrap_or(0x2545_f491_4f6c_dd1d)
        .max(1);
    let mut rng = XorShift(seed);
    for i in 0..iterations {
        let (bytes, with_hello) = fuzz_input(&mut rng);
        let mut s = if with_hello {
            raw::client(port)
        } else {
            let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
            s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
            s
        };
        let _ = s.write_all(&bytes);
        let _ = s.shutdown(Shutdown::Write);
        // Whatever it made of the input, the server must end the connection once ours ended.
        expect_hangup(
            &mut s,
            &format!("fuzz case {i} (seed {seed:#x}): {bytes:02x?}"),
        );
        if i % 25 == 0 {
            still_serves(port);
        }
    }
    still_serves(port);
    wait_for_no_connections(&handle);
    handle.close();
}

#[test]
fn request_flood_beyond_the_queue_limit_closes_that_connection() {
    watch_for_panics();
    let gate = common::Gate::default();
    let g = gate.clone();
    let service = Service::new("target")
        .method("add", |a: i64, b: i64| a + b)
        .method("blocked", move || g.wait());
    let server = ThreadedServer::new(service)
        .max_workers(1)
        .max_queued(4)
        .build()
        .unwrap();
    let port = server.port();
    let handle = server.spawn().unwrap();

    // The one worker is busy; four requests may wait; the fifth is one too many.
    let mut s = raw::client(port);
    s.write_all(&frame(CALL, 1, 0, 0, "blocked", &[0x80]))
        .unwrap();
    for id in 2..=6 {
        s.write_all(&add_call(id)).unwrap();
    }
    expect_hangup(&mut s, "overflowing the request queue");

    // Within the limits, queued requests are served once the worker is free.
    let mut s = raw::client(port);
    s.write_all(&frame(CALL, 1, 0, 0, "blocked", &[0x80]))
        .unwrap();
    for id in 2..=5 {
        s.write_all(&add_call(id)).unwrap();
    }
    thread::sleep(Duration::from_millis(100));
    gate.open();
    let mut ids: Vec<u64> = (0..5)
        .map(|_| {
            let (kind, id, _) = read_frame(&mut s);
            assert_eq!(kind, REPLY);
            id
        })
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, vec![1, 2, 3, 4, 5]);
    drop(s);
    still_serves(port);
    wait_for_no_connections(&handle);
    handle.close();
}
