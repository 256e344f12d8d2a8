//! Many idle connections on one server: what they cost it in memory, before and after traffic,
//! and what a server out of file descriptors says and does. The server runs in a child process
//! (see `common::child`), so that its resident memory, CPU time and descriptors are its own.

mod common;

use common::child::{self, Child};
use common::procfs;
use rpyc::{Bytes, Connection, Service, ThreadedServer};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// Connections per measurement.
const N: usize = 100;
/// What one busy connection's receive buffer takes (64 KiB, `transport::reader`): every
/// connection held one from its first frame on before buffers grew with traffic.
const BUSY_BUFFER: u64 = 64 << 10;
/// The server's call timeout: its quiet readers wake every quarter of it (and give their
/// receive buffers back then).
const CALL: Duration = Duration::from_secs(1);
/// How long the process-wide cache keeps unused large buffers (`base::buffers`).
const BUFFER_CACHE_KEEP: Duration = Duration::from_secs(2);
const ENTRY: &str = "child_server";

fn service() -> Service {
    Service::new("idle").method("echo", |b: Bytes| b)
}

/// The server of these tests, in a child process: `echo`, room for many connections, never
/// evicting idle ones, saying `port N` and then each of its accept loop's log records.
#[test]
#[ignore = "the child process of the tests in this file; they start it themselves"]
fn child_server() {
    if child::role().is_none() {
        return;
    }
    child::say_logs(log::Level::Info, "rpyc::server");
    let server = ThreadedServer::new(service())
        .hostname("127.0.0.1")
        .port(0)
        .call_timeout(CALL)
        .max_connections(4 * N)
        .max_handshakes(4 * N)
        .evict_idle_after(Duration::MAX)
        .build()
        .unwrap();
    child::say(format!("port {}", server.port()));
    let _handle = server.spawn().unwrap();
    child::serve_until_parent_leaves();
}

fn connect(port: u16) -> Connection {
    common::options().connect("127.0.0.1", port).unwrap()
}

fn echoes(conn: &Connection) {
    let sent = Bytes::from(b"ping".to_vec());
    let back: Bytes = conn.root().call("echo", (&sent,)).unwrap();
    assert_eq!(back, sent);
}

/// The child's resident memory once it has stopped changing: sampled every tick of its quiet
/// readers until a second of samples agree within 64 KiB (at most 20 call timeouts).
fn settled_rss(c: &Child) -> u64 {
    let give_up = Instant::now() + 20 * CALL;
    let mut seen: Vec<u64> = Vec::new();
    loop {
        seen.push(c.rss());
        if let Some(last) = seen.windows(5).last() {
            let (lo, hi) = (last.iter().min().unwrap(), last.iter().max().unwrap());
            if hi - lo <= 64 << 10 || Instant::now() > give_up {
                return last[4];
            }
        }
        std::thread::sleep(CALL / 4);
    }
}

/// Opens `n` connections to the child and waits until each has its reading thread there.
fn open_idle(c: &Child, port: u16, n: usize) -> Vec<Connection> {
    let threads = c.status("Threads");
    let conns: Vec<_> = (0..n).map(|_| connect(port)).collect();
    common::expect_within("a reading thread per connection", 10 * CALL, || {
        c.status("Threads") >= threads + n as u64
    });
    conns
}

/// A child server that served one call, at rest.
fn started_server() -> (Child, u16, Connection) {
    let c = Child::start(ENTRY, "server");
    let port = c.port();
    let warm = connect(port);
    echoes(&warm);
    (c, port, warm)
}

#[test]
fn an_idle_connection_costs_the_server_less_than_a_busy_receive_buffer() {
    let (c, port, _warm) = started_server();
    let before = settled_rss(&c);
    let idle = open_idle(&c, port, N);
    let grew = settled_rss(&c).saturating_sub(before);
    let per = grew / N as u64;
    eprintln!(
        "{N} idle connections: +{} KiB, {} KiB each ({:.2} of a busy receive buffer)",
        grew >> 10,
        per >> 10,
        per as f64 / BUSY_BUFFER as f64
    );
    // A thread (its stack's touched pages) and the connection's tables, no buffer: about a
    // quarter of one in a release build, under half in a debug build.
    assert!(
        per * 4 < BUSY_BUFFER * 3,
        "an idle connection costs the server {per} bytes"
    );
    drop(idle);
}

#[test]
fn connections_that_carried_a_large_payload_shrink_back_to_what_small_calls_leave() {
    let (c, port, _warm) = started_server();
    let echo_each = |conns: &[Connection], size: usize| {
        let payload = Bytes::from(vec![7u8; size]);
        for conn in conns {
            let back: Bytes = conn.root().call("echo", (&payload,)).unwrap();
            assert_eq!(back.len(), size);
        }
    };
    // The same threads on both sides of the comparison (a connection that ran a request keeps
    // a spare one): only the payloads' sizes differ.
    let before = settled_rss(&c);
    let small = open_idle(&c, port, N);
    echo_each(&small, 16);
    std::thread::sleep(BUFFER_CACHE_KEEP + CALL);
    let at_small = settled_rss(&c);
    let small_cost = at_small.saturating_sub(before);

    let large = open_idle(&c, port, N);
    echo_each(&large, 1 << 20);
    let busy = c.rss().saturating_sub(at_small);
    // Quiet now: each reader gives its buffer back at its next tick, the buffer cache its
    // large buffers after BUFFER_CACHE_KEEP.
    std::thread::sleep(BUFFER_CACHE_KEEP + CALL);
    let large_cost = settled_rss(&c).saturating_sub(at_small);
    eprintln!(
        "{N} connections: one 16-byte echo each +{} KiB once quiet; one 1 MiB echo each +{} KiB \
         while busy, +{} KiB once quiet ({:.2}x)",
        small_cost >> 10,
        busy >> 10,
        large_cost >> 10,
        large_cost as f64 / small_cost as f64
    );
    // Kept 64 KiB receive buffers would make it about three times as much.
    assert!(
        large_cost * 2 <= small_cost * 3,
        "{N} connections that carried 1 MiB each cost {large_cost} bytes once quiet, \
         {N} that carried 16 bytes {small_cost}"
    );
    drop((small, large));
}

/// Opens a socket to `port` and sends the native hello; the server answers once it accepts it.
fn hello_sent(port: u16) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(&common::raw::hello()).unwrap();
    s
}

/// Whether the server's hello arrives on `s` within `within`.
fn answered_within(mut s: &TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut theirs = [0u8; 16];
    s.read_exact(&mut theirs).is_ok() && theirs[..4] == *b"RPYC"
}

#[test]
fn a_server_out_of_descriptors_says_so_once_waits_without_spinning_and_serves_again() {
    // A limit the server cannot raise: a few dozen descriptors.
    let c = Child::start_with_nofile(ENTRY, "server", 32);
    let port = c.port();
    // More clients than descriptors: the first are served, the rest wait in the backlog.
    let mut socks: Vec<TcpStream> = (0..48).map(|_| hello_sent(port)).collect();
    let warning = c.heard(10 * CALL);
    assert!(
        warning.contains("out of file descriptors") && warning.contains("ulimit -n"),
        "{warning}"
    );
    let served = socks
        .iter()
        .take_while(|s| answered_within(s, CALL / 4))
        .count();
    assert!(
        (10..48).contains(&served),
        "{served} of 48 clients were served"
    );

    // Starved: the accept loop waits between attempts, and does not say it again and again.
    let (cpu, at) = (procfs::child_cpu(c.pid), Instant::now());
    let said = c.heard_within(2 * CALL);
    let (cpu, wall) = (procfs::child_cpu(c.pid) - cpu, at.elapsed());
    eprintln!("starved for {wall:?}: the server used {cpu:?} of CPU; said {said:?}");
    assert!(said.is_none(), "said again: {said:?}");
    assert!(
        cpu.as_secs_f64() < 0.2 * wall.as_secs_f64(),
        "the server used {cpu:?} of CPU in {wall:?} while out of descriptors"
    );

    // Descriptors free up: the waiting clients are served, and new ones too.
    socks.drain(..served);
    let again = c.heard(10 * CALL);
    assert!(again.contains("accepting connections again"), "{again}");
    assert!(
        answered_within(socks.last().unwrap(), 10 * CALL),
        "a client that waited was not served"
    );
    drop(socks);
    let conn = connect(port);
    echoes(&conn);
}
