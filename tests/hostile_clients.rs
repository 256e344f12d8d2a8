//! A server under attack: whatever a client sends, or stops sending, costs the server a bounded
//! time and no busy CPU, is logged, and never stops it serving other clients.

mod common;

use common::procfs::tasks;
use common::tls::{
    capture_logs, pki, serve_tls, server_options, still_serves, wait_logged, whoami, Pki,
};
use common::{handshake_kind, TestServer};
use rpyc::HandshakeErrorKind;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

// ---- TLS ----

/// `openssl s_client`, connected to a port of 127.0.0.1 with alice's certificate and the test
/// CA. What the test writes to it goes to the server; a line `R` makes it ask for a
/// renegotiation (TLS 1.2). Killed when dropped, also when a test fails.
struct SClient {
    child: Child,
    stdin: ChildStdin,
    /// Everything it printed (its diagnostics and the data it received), stdout and stderr.
    out: Arc<Mutex<Vec<u8>>>,
}

impl SClient {
    fn start(p: &Pki, port: u16, version: &str) -> SClient {
        let mut child = Command::new("openssl")
            .args(["s_client", version, "-servername", "localhost"])
            .arg("-connect")
            .arg(format!("127.0.0.1:{port}"))
            .arg("-CAfile")
            .arg(p.ca.ca_cert())
            .arg("-cert")
            .arg(&p.alice.cert)
            .arg("-key")
            .arg(&p.alice.key)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the openssl command line is installed (apt-get install openssl)");
        let stdin = child.stdin.take().unwrap();
        let out = Arc::new(Mutex::new(Vec::new()));
        for mut pipe in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let sink = out.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = pipe.read(&mut buf) {
                    sink.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            });
        }
        SClient { child, stdin, out }
    }

    /// Whether it printed (or received) `needle`.
    fn printed(&self, needle: &[u8]) -> bool {
        let out = self.out.lock().unwrap();
        out.windows(needle.len()).any(|w| w == needle)
    }

    fn output(&self) -> String {
        String::from_utf8_lossy(&self.out.lock().unwrap()).into_owned()
    }

    fn send(&mut self, bytes: &[u8]) {
        self.stdin.write_all(bytes).unwrap();
        self.stdin.flush().unwrap();
    }

    /// Whether it exited by itself within `limit`.
    fn exits_within(&mut self, limit: Duration) -> bool {
        common::wait_until(limit, || matches!(self.child.try_wait(), Ok(Some(_))))
    }
}

impl Drop for SClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn tls_client_asking_for_a_renegotiation_is_refused_and_the_next_client_is_served() {
    capture_logs();
    let p = pki();
    let server = serve_tls(whoami(), p.authenticator(), server_options);
    let mut client = SClient::start(&p, server.port, "-tls1_2");
    // The TLS handshake is done once the server's rpyc hello arrives. (The client's hello
    // cannot go through s_client: its commands are letters at the start of what it reads, and
    // the hello starts with `R`, the renegotiation command.)
    assert!(
        common::wait_until(Duration::from_secs(10), || client.printed(b"RPYC")),
        "no hello from the server: {}",
        client.output()
    );
    client.send(b"R\n");
    // OpenSSL refuses it with a "no renegotiation" alert, after which s_client gives up.
    assert!(
        client.exits_within(Duration::from_secs(5)),
        "s_client still connected: {}",
        client.output()
    );
    assert!(
        common::wait_until(Duration::from_secs(5), || client
            .printed(b"no renegotiation")),
        "s_client said: {}",
        client.output()
    );
    assert!(
        wait_logged(&[
            "127.0.0.1:",
            "connection failed",
            "the client wanted to renegotiate the TLS 1.2 session, which this server refuses"
        ]),
        "not logged"
    );
    assert!(common::wait_until(Duration::from_secs(5), || server
        .handle
        .connections()
        == 0));
    still_serves(&server, &p);
}

/// CPU time used by this process's threads named `name` while it watches: a sampler reads
/// their utime + stime from /proc/self/task/*/stat every few milliseconds, so threads that
/// start and end meanwhile count too (up to the last sample before they end).
struct CpuWatch {
    stop: Arc<std::sync::atomic::AtomicBool>,
    sampler: Option<std::thread::JoinHandle<Duration>>,
}

impl CpuWatch {
    fn start(name: &'static str) -> CpuWatch {
        let named = move || tasks().into_iter().filter(move |t| t.name == name);
        // Per thread: its CPU time now (none for threads that start later), and when last seen.
        let mut seen: HashMap<u64, (Duration, Duration)> =
            named().map(|t| (t.tid, (t.cpu, t.cpu))).collect();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let sampler = std::thread::spawn(move || {
            loop {
                let done = flag.load(Ordering::SeqCst);
                for t in named() {
                    seen.entry(t.tid).or_insert((Duration::ZERO, t.cpu)).1 = t.cpu;
                }
                if done {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            seen.values()
                .map(|(first, last)| last.saturating_sub(*first))
                .sum()
        });
        CpuWatch {
            stop,
            sampler: Some(sampler),
        }
    }

    /// The CPU time those threads used since `start`.
    fn stop(mut self) -> Duration {
        self.stop.store(true, Ordering::SeqCst);
        self.sampler.take().unwrap().join().unwrap()
    }
}

impl Drop for CpuWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Tests that measure the CPU time of the server's handshake threads run one at a time, so one
/// test's threads do not count in another's measure.
static CPU_MEASURE: Mutex<()> = Mutex::new(());

fn measuring_cpu() -> std::sync::MutexGuard<'static, ()> {
    CPU_MEASURE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Connects a good TLS client, makes a call, and checks it took less than `limit`.
fn served_within(server: &TestServer, p: &Pki, limit: Duration) {
    let t = Instant::now();
    still_serves(server, p);
    assert!(
        t.elapsed() < limit,
        "a good client waited {:?} to be served",
        t.elapsed()
    );
}

fn tls_server_timing_out_after(p: &Pki, handshake_timeout: Duration) -> TestServer {
    serve_tls(whoami(), p.authenticator(), |b| {
        server_options(b).handshake_timeout(handshake_timeout)
    })
}

#[test]
fn hit_and_run_plain_hellos_on_a_tls_port_cost_no_cpu_and_end_at_once() {
    let _one_at_a_time = measuring_cpu();
    capture_logs();
    let p = pki();
    let handshake_timeout = Duration::from_secs(3);
    let server = tls_server_timing_out_after(&p, handshake_timeout);
    let cpu = CpuWatch::start("rpyc-handshake");
    let started = Instant::now();
    for _ in 0..20 {
        let mut s = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
        s.write_all(b"RPYC").unwrap();
    }
    served_within(&server, &p, handshake_timeout / 3);
    let gone = common::wait_until(handshake_timeout / 3, || server.handle.connections() == 0);
    let left = server.handle.connections();
    let waited = started.elapsed();
    let used = cpu.stop();
    eprintln!("20 hit-and-run clients: {left} left after {waited:?}, {used:?} of CPU");
    assert!(
        gone,
        "{left} connections still open {waited:?} after 20 clients sent RPYC and left \
         (handshake timeout {handshake_timeout:?}); the handshake threads used {used:?} of CPU"
    );
    assert!(
        used < waited / 10,
        "the handshake threads used {used:?} of CPU in {waited:?}"
    );
    assert!(
        wait_logged(&["127.0.0.1:", "closed the connection", "plain rpyc hello"]),
        "not logged"
    );
    served_within(&server, &p, handshake_timeout / 3);
}

#[test]
fn silent_clients_that_sent_part_of_a_plain_hello_are_dropped_at_the_handshake_timeout_without_burning_cpu(
) {
    let _one_at_a_time = measuring_cpu();
    capture_logs();
    let p = pki();
    let handshake_timeout = Duration::from_secs(2);
    let server = tls_server_timing_out_after(&p, handshake_timeout);
    let cpu = CpuWatch::start("rpyc-handshake");
    let started = Instant::now();
    let hello = b"RPYC\x00\x01\x00\x00\x00\x10\x00\x00\x00\x00\x00\x10";
    let mut silent: Vec<TcpStream> = [1, 4, 15]
        .iter()
        .map(|&n| {
            let mut s = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
            s.write_all(&hello[..n]).unwrap();
            s
        })
        .collect();
    served_within(&server, &p, handshake_timeout / 3);
    for s in &mut silent {
        common::wait_for_hang_up(s);
    }
    let waited = started.elapsed();
    let used = cpu.stop();
    eprintln!("3 silent clients: dropped after {waited:?}, {used:?} of CPU");
    assert!(
        waited >= handshake_timeout.mul_f64(0.9) && waited < handshake_timeout * 3 / 2,
        "dropped after {waited:?}, the handshake timeout is {handshake_timeout:?}"
    );
    assert!(
        used < waited / 10,
        "the handshake threads used {used:?} of CPU in {waited:?}"
    );
    // Each was logged, under its own address (other tests time out handshakes too).
    for s in &silent {
        let parts = [
            &format!("{}: ", s.local_addr().unwrap()),
            "handshake timed out after 2s",
        ];
        assert!(wait_logged(&parts), "not logged: {parts:?}");
    }
    served_within(&server, &p, handshake_timeout / 3);
}

#[test]
fn a_client_whose_first_bytes_only_look_like_a_plain_hello_is_dropped_at_once() {
    capture_logs();
    let p = pki();
    let handshake_timeout = Duration::from_secs(3);
    let server = serve_tls(whoami(), p.authenticator(), |b| {
        server_options(b).handshake_timeout(handshake_timeout)
    });
    let started = Instant::now();
    let mut s = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    s.write_all(b"RPYX").unwrap();
    common::wait_for_hang_up(&mut s);
    assert!(
        started.elapsed() < handshake_timeout / 3,
        "dropped after {:?}",
        started.elapsed()
    );
    let parts = [
        &format!("{}: ", s.local_addr().unwrap()),
        "does not speak TLS",
    ];
    assert!(wait_logged(&parts), "not logged: {parts:?}");
    still_serves(&server, &p);
}

// ---- Memory, queues and threads (measured on a server in a child process) ----

use common::child::{self, Child as ChildProcess};
use common::raw;
use rpyc::{Bytes, Error, Service, ThreadedServer};

/// The server the memory tests attack, in a child process: `role` is `server` followed by
/// settings (`max_workers=1 max_buffered=64 total=32 max_queued=100 max_threads=8`, sizes in
/// MiB). Methods: `nothing()`, `block()` (sleeps until the process ends), `sleep_ms(n)`,
/// `echo(Bytes)`, `call_back(cb)`.
#[test]
#[ignore = "the child process of the tests in this file; they start it themselves"]
fn child_server() {
    let role = child::role().expect("run only as a child process by the tests of this file");
    let setting = |name: &str| -> Option<usize> {
        role.split_whitespace()
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
    };
    let service = Service::new("target")
        .method("nothing", || ())
        .method("block", || std::thread::sleep(Duration::from_secs(3600)))
        .method("sleep_ms", |ms: u64| {
            std::thread::sleep(Duration::from_millis(ms))
        })
        .method("echo", |b: Bytes| b)
        .method("call_back", |cb: rpyc::RemoteObject| cb.invoke::<(), _>(()));
    let mut builder = ThreadedServer::new(service);
    if let Some(n) = setting("max_workers") {
        builder = builder.max_workers(n);
    }
    if let Some(n) = setting("max_queued") {
        builder = builder.max_queued(n);
    }
    if let Some(mib) = setting("max_buffered") {
        builder = builder.max_frame_size(mib << 19).max_buffered(mib << 20);
    }
    if let Some(mib) = setting("total") {
        builder = builder.max_buffered_total(mib << 20);
    }
    if let Some(n) = setting("max_threads") {
        builder = builder.max_threads(n);
    }
    let server = builder.build().unwrap();
    child::say(format!("port {}", server.port()));
    let _handle = server.spawn().unwrap();
    child::serve_until_parent_leaves();
}

fn child_server_with(settings: &str) -> (ChildProcess, u16) {
    let c = ChildProcess::start("child_server", &format!("server {settings}"));
    let port = c.port();
    // Warm up: the first connection's threads and buffers are not the attack's cost.
    let conn = rpyc::connect("127.0.0.1", port).unwrap();
    conn.root().call::<(), _>("nothing", ()).unwrap();
    conn.close();
    (c, port)
}

/// The server's error reply to the call with id `id`, read from `s` (skipping releases).
fn error_reply(s: &mut TcpStream, id: u64) -> raw::Frame {
    loop {
        let f = raw::read_frame(s).unwrap().expect("a reply, not the end");
        if f.kind == raw::RELEASE {
            continue;
        }
        assert_eq!((f.kind, f.id), (raw::ERROR, id), "{f:?}");
        return f;
    }
}

#[test]
fn megabytes_of_tiny_arguments_cost_the_server_a_small_multiple_of_them() {
    let (c, port) = child_server_with("");
    let mut s = raw::client(port);
    const N: usize = 8 << 20;
    // A zero-argument method called with millions of arguments, and an unknown method whose
    // arguments hold object references: neither is decoded into anything, but both used to be
    // parsed whole into a tree (~270 bytes per byte sent).
    let mut refs = Vec::with_capacity(N + 16);
    raw::cbor_head(&mut refs, 4, (N / 14) as u64);
    for i in 0..(N / 14) as u64 {
        refs.extend_from_slice(&raw::object_ref(1 + i % 1000));
    }
    let attacks = [
        ("nothing", raw::array_of_zeros(N)),
        ("no_such_method", refs),
    ];
    for (i, (method, payload)) in attacks.iter().enumerate() {
        let id = i as u64 + 1;
        let before = c.rss();
        c.reset_peak();
        s.write_all(&raw::frame(raw::CALL, id, 0, 0, method, payload))
            .unwrap();
        let reply = error_reply(&mut s, id);
        c.assert_peak_grew_at_most(before, payload.len() as u64, 3.0, method);
        assert!(
            reply.len < 2048,
            "the error reply quotes the arguments unbounded: {} bytes",
            reply.len
        );
    }
    // The connection is still served.
    s.write_all(&raw::frame(raw::CALL, 9, 0, 0, "nothing", &[0x80]))
        .unwrap();
    let f = raw::read_frame(&mut s).unwrap().unwrap();
    assert_eq!((f.kind, f.id), (raw::REPLY, 9));
}

/// Floods `s` with `count` calls of `nothing` carrying `size` bytes each, until the server
/// hangs up; returns how many bytes went out. A server that closed the connection but still
/// holds its socket (a handler of it is running) leaves its receive window full, so a watcher
/// stops the flood as soon as the server's end of the stream arrives, instead of the write
/// waiting out its timeout.
fn flood(s: &mut TcpStream, count: usize, size: usize) -> u64 {
    let mut payload = Vec::new();
    raw::cbor_head(&mut payload, 4, 1);
    raw::cbor_head(&mut payload, 2, size as u64);
    payload.resize(payload.len() + size, 0xab);
    let frame = raw::frame(raw::CALL, 1_000, 0, 0, "nothing", &payload);
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut watched = s.try_clone().unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let flooding = done.clone();
    let watcher = std::thread::spawn(move || {
        // The server sends nothing before it hangs up (the blocked call never returns). Our
        // writing side is shut only once the server's end arrived, never before: the caller
        // then sees that end again and knows it came from the server.
        watched
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        while !flooding.load(Ordering::SeqCst) {
            match watched.read(&mut [0u8; 1024]) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                Ok(n) if n > 0 => {}
                _ => {
                    let _ = watched.shutdown(std::net::Shutdown::Write);
                    return;
                }
            }
        }
    });
    let mut sent = 0;
    for _ in 0..count {
        if s.write_all(&frame).is_err() {
            break;
        }
        sent += frame.len() as u64;
    }
    done.store(true, Ordering::SeqCst);
    watcher.join().unwrap();
    sent
}

#[test]
fn requests_queued_behind_a_busy_worker_are_bounded_in_bytes_per_connection() {
    // One worker, blocked; everything else the client sends waits in the queue, which used to
    // be bounded only by count (65,536 frames of up to 256 MiB).
    let (c, port) = child_server_with("max_workers=1 max_buffered=64");
    let before = c.rss();
    c.reset_peak();
    let mut s = raw::client(port);
    s.write_all(&raw::frame(raw::CALL, 1, 0, 0, "block", &[0x80]))
        .unwrap();
    let sent = flood(&mut s, 300, 1 << 20);
    assert!(
        raw::hangs_up_within(&mut s, Duration::from_secs(10)),
        "the server kept a client that queued {sent} bytes"
    );
    // At most its 64 MiB were held, of the up to 300 MiB sent.
    c.assert_peak_grew_at_most(before, 64 << 20, 1.5, "queued behind a blocked worker");
    // Others are still served.
    let conn = rpyc::connect("127.0.0.1", port).unwrap();
    conn.root().call::<(), _>("nothing", ()).unwrap();
}

#[test]
fn connections_together_cannot_hold_more_than_the_server_total() {
    const MIB: u64 = 1 << 20;
    let (c, port) = child_server_with("max_workers=1 max_buffered=64 total=32");
    let before = c.rss();
    c.reset_peak();
    // Three clients each try to queue up to 100 MiB behind a blocked worker: 64 MiB each
    // would be allowed per connection, 192 MiB together, but the server holds at most 32 MiB
    // beyond 1 MiB per connection.
    let floods: Vec<_> = (0..3)
        .map(|_| {
            std::thread::spawn(move || {
                let mut s = raw::client(port);
                s.write_all(&raw::frame(raw::CALL, 1, 0, 0, "block", &[0x80]))
                    .unwrap();
                let sent = flood(&mut s, 100, MIB as usize);
                (sent, raw::hangs_up_within(&mut s, Duration::from_secs(10)))
            })
        })
        .collect();
    let results: Vec<(u64, bool)> = floods.into_iter().map(|t| t.join().unwrap()).collect();
    eprintln!("(bytes sent, hung up on): {results:?}");
    // The total, not the per-connection limit, cut a client off: the server closed it before
    // it had sent its 64 MiB (the sockets hold a few MiB on the way, far fewer than the 32 MiB
    // between the two limits).
    assert!(
        results
            .iter()
            .any(|&(sent, closed)| closed && sent < 64 * MIB),
        "no client was closed before its per-connection limit of 64 MiB: {results:?}"
    );
    c.assert_peak_grew_at_most(before, (32 + 3) * MIB, 1.5, "three clients queueing");
    // A client making small calls still gets in: its first MiB is its own.
    let conn = rpyc::connect("127.0.0.1", port).unwrap();
    assert_eq!(
        conn.root()
            .call::<Bytes, _>("echo", (Bytes::from(vec![1u8; 1000]),))
            .unwrap()
            .len(),
        1000
    );
}

#[test]
fn a_server_runs_a_bounded_number_of_threads_however_busy_its_clients_keep_it() {
    // 4 clients with 16 slow calls each: up to 64 handlers per connection would be allowed,
    // but the server's threads beyond two per connection come from a budget of 8.
    let (c, port) = child_server_with("max_threads=8");
    let idle = c.status("Threads");
    let conns: Vec<_> = (0..4)
        .map(|_| rpyc::connect("127.0.0.1", port).unwrap())
        .collect();
    let pending: Vec<_> = conns
        .iter()
        .flat_map(|conn| {
            (0..16).map(move |_| {
                conn.root()
                    .call_async::<(), _>("sleep_ms", (300u64,))
                    .unwrap()
            })
        })
        .collect();
    // Sampled until every call has returned: the ones beyond the budget wait their turn.
    let mut most = 0;
    let until = Instant::now() + Duration::from_secs(30);
    while pending.iter().any(|p| !p.is_ready()) && Instant::now() < until {
        most = most.max(c.status("Threads"));
        std::thread::sleep(Duration::from_millis(10));
    }
    // Every call still completes.
    for p in pending {
        p.value_timeout(Duration::from_secs(1)).unwrap();
    }
    let bound = idle + 2 * 4 + 8;
    eprintln!("server threads: {idle} idle, at most {most} under load (bound {bound})");
    assert!(
        most <= bound,
        "the server ran {most} threads ({idle} before the clients came)"
    );
}

#[test]
fn requests_read_by_a_handler_waiting_on_a_callback_are_held_to_the_queue_limit() {
    // The handler calls the client back and waits: its thread reads the connection meanwhile.
    // Requests it reads go to the queue under the same limit as those the pool reads.
    let (_c, port) = child_server_with("max_workers=1 max_queued=100");
    let mut s = raw::client(port);
    s.write_all(&raw::frame(raw::CALL, 1, 0, 0, "call_back", &{
        let mut p = vec![0x81];
        p.extend_from_slice(&raw::object_ref(1));
        p
    }))
    .unwrap();
    let cb = raw::read_frame(&mut s).unwrap().unwrap();
    assert_eq!((cb.kind, cb.target), (raw::CALL, 1), "the callback");
    // The callback is never answered; 1,000 requests follow.
    let sent = flood(&mut s, 1000, 16);
    assert!(
        raw::hangs_up_within(&mut s, Duration::from_secs(10)),
        "the server queued {sent} bytes of requests beyond its limit of 100"
    );
}

// ---- Handshakes, slots and refusals ----

fn quick_server(builder: impl FnOnce(rpyc::ServerBuilder) -> rpyc::ServerBuilder) -> TestServer {
    let service = Service::new("s")
        .method("nothing", || ())
        .method("make", |n: usize| Bytes::from(vec![7u8; n]))
        .method("wait_ms", |ms: u64| {
            std::thread::sleep(Duration::from_millis(ms))
        });
    let handle = builder(ThreadedServer::new(service))
        .build()
        .unwrap()
        .spawn()
        .unwrap();
    let port = handle.port();
    TestServer { handle, port }
}

#[test]
fn a_hello_dribbled_a_byte_at_a_time_is_dropped_at_the_handshake_deadline() {
    let t = Duration::from_secs(1);
    let server = quick_server(|b| b.handshake_timeout(t));
    let mut s = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    let start = Instant::now();
    // One byte every quarter of the timeout: each read alone is in time, the hello is not.
    let hello = raw::hello();
    let mut closed_at = None;
    for b in hello {
        if s.write_all(&[b]).is_err() {
            closed_at = Some(start.elapsed());
            break;
        }
        std::thread::sleep(t / 4);
        if server.handle.connections() == 0 {
            closed_at = Some(start.elapsed());
            break;
        }
    }
    let closed_at = closed_at.expect("the server accepted a hello that took 4 handshake timeouts");
    assert!(
        closed_at >= t.mul_f64(0.9) && closed_at <= t.mul_f64(1.6),
        "dropped after {closed_at:?}, the handshake timeout being {t:?}"
    );
}

#[test]
fn silent_connections_give_their_slots_to_new_clients_once_idle_long_enough() {
    let idle = Duration::from_millis(800);
    let server = quick_server(|b| b.max_connections(4).evict_idle_after(idle));
    // Four clients take every slot and say nothing after their hello.
    let mut silent: Vec<TcpStream> = (0..4).map(|_| raw::client(server.port)).collect();
    let started = Instant::now();
    assert!(common::wait_until(Duration::from_secs(5), || server
        .handle
        .connections()
        == 4));
    // Before they have been idle that long, a newcomer is refused, clearly.
    let err = rpyc::connect("127.0.0.1", server.port).unwrap_err();
    assert_eq!(handshake_kind(&err), HandshakeErrorKind::Refused, "{err}");
    // Afterwards, it gets the slot of the one idle longest, which is told why.
    std::thread::sleep(idle.saturating_sub(started.elapsed()) + idle / 4);
    let conn = rpyc::connect("127.0.0.1", server.port).expect("a slot was freed");
    conn.root().call::<(), _>("nothing", ()).unwrap();
    let hung_up = silent
        .iter_mut()
        .map(|s| raw::hangs_up_within(s, idle / 2))
        .filter(|&h| h)
        .count();
    assert_eq!(hung_up, 1, "exactly one idle connection makes room");
}

#[test]
fn clients_stuck_in_their_handshake_cannot_take_every_slot() {
    let t = Duration::from_millis(1500);
    let server = quick_server(|b| b.max_connections(64).max_handshakes(4).handshake_timeout(t));
    // Four sockets that never send their hello hold every handshake slot...
    let _stuck: Vec<TcpStream> = (0..4)
        .map(|_| TcpStream::connect(("127.0.0.1", server.port)).unwrap())
        .collect();
    assert!(common::wait_until(Duration::from_secs(5), || server
        .handle
        .connections()
        == 4));
    // ... so a fifth is refused at once, saying why, rather than left waiting ...
    let start = Instant::now();
    let err = rpyc::connect("127.0.0.1", server.port).unwrap_err();
    assert_eq!(handshake_kind(&err), HandshakeErrorKind::Refused, "{err}");
    assert!(
        start.elapsed() < t / 2,
        "the refusal took {:?}",
        start.elapsed()
    );
    // ... and gets in once their handshake timeout has dropped them.
    std::thread::sleep(t);
    assert!(common::wait_until(t, || server.handle.connections() == 0));
    let conn = rpyc::connect("127.0.0.1", server.port).unwrap();
    conn.root().call::<(), _>("nothing", ()).unwrap();
}

#[test]
fn refusing_silent_clients_does_not_hold_up_the_accept_loop() {
    let server = quick_server(|b| b.max_connections(1).evict_idle_after(Duration::MAX));
    let holder = rpyc::connect("127.0.0.1", server.port).unwrap();
    // Twenty clients over the limit that never send their hello: each refusal lingers up to
    // 200 ms for the client to read it, which used to happen on the accept thread, one after
    // the other.
    const N: u32 = 20;
    let _silent: Vec<TcpStream> = (0..N)
        .map(|_| TcpStream::connect(("127.0.0.1", server.port)).unwrap())
        .collect();
    // A client behind them is answered at once, with a refusal that says why.
    let start = Instant::now();
    let err = rpyc::connect("127.0.0.1", server.port).unwrap_err();
    let took = start.elapsed();
    assert_eq!(handshake_kind(&err), HandshakeErrorKind::Refused, "{err}");
    assert!(
        took < Duration::from_millis(200) * N / 4,
        "the refusal took {took:?} behind {N} silent clients"
    );
    holder.root().call::<(), _>("nothing", ()).unwrap();
}

// ---- What the server sends a hostile client ----

#[test]
fn error_and_release_frames_respect_the_client_s_frame_limit() {
    let server = quick_server(|b| b);
    // The smallest frame limit a peer may announce.
    let mut s = raw::client_with(server.port, raw::hello_with(64, 16));
    // Bad arguments quoted in an error message: a 10 KiB string to a method taking none.
    let mut arg = Vec::new();
    raw::cbor_head(&mut arg, 4, 1);
    raw::cbor_head(&mut arg, 3, 10_000);
    arg.resize(arg.len() + 10_000, b'x');
    s.write_all(&raw::frame(raw::CALL, 1, 0, 0, "nothing", &arg))
        .unwrap();
    let e = error_reply(&mut s, 1);
    assert!(e.len <= 64, "an error frame of {} bytes", e.len);
    // 100 object references sent to a method that does not exist: all released, in frames
    // within the limit.
    let mut refs = Vec::new();
    raw::cbor_head(&mut refs, 4, 100);
    for id in 1..=100 {
        refs.extend_from_slice(&raw::object_ref(id * 1000));
    }
    s.write_all(&raw::frame(raw::CALL, 2, 0, 0, "no_such_method", &refs))
        .unwrap();
    let mut released = std::collections::BTreeSet::new();
    let mut errors = 0;
    while released.len() < 100 || errors == 0 {
        let f = raw::read_frame(&mut s).unwrap().expect("more frames");
        assert!(f.len <= 64, "a frame of {} bytes: {f:?}", f.len);
        match f.kind {
            raw::RELEASE => {
                let list: Vec<(u64, u64)> = serde_cbor::from_slice(&f.payload).unwrap();
                released.extend(list.into_iter().map(|(id, n)| {
                    assert_eq!(n, 1);
                    id
                }));
            }
            raw::ERROR => errors += 1,
            other => panic!("unexpected frame kind {other}"),
        }
    }
    assert_eq!(released.len(), 100);
    assert!(released.iter().all(|id| id % 1000 == 0));
}

/// Asks `server` for 32 MiB over `s` (after the handshake) and never reads it: the server's
/// write fills the socket and stalls; checks the server drops the client at the stall timeout.
fn assert_dropped_for_not_reading(server: &TestServer, mut s: impl Write, stall: Duration) {
    let make_32_mib = [0x81, 0x1a, 0x02, 0, 0, 0];
    s.write_all(&raw::frame(raw::CALL, 1, 0, 0, "make", &make_32_mib))
        .unwrap();
    let start = Instant::now();
    assert!(common::wait_until(stall * 5, || server
        .handle
        .connections()
        == 0));
    let took = start.elapsed();
    assert!(
        took >= stall.mul_f64(0.9) && took <= stall.mul_f64(1.6),
        "noticed after {took:?}, the stall timeout being {stall:?}"
    );
}

#[test]
fn a_client_that_stops_reading_is_dropped_at_the_stall_timeout_with_a_warning() {
    capture_logs();
    let stall = Duration::from_secs(1);
    let server = quick_server(|b| b.call_timeout(stall));
    let s = raw::client(server.port);
    let parts = [
        &format!("{}: ", s.local_addr().unwrap()),
        "read nothing for 1s",
    ];
    assert_dropped_for_not_reading(&server, s, stall);
    assert!(wait_logged(&parts), "not logged: {parts:?}");
}

#[cfg(unix)]
#[test]
fn a_unix_socket_client_that_stops_reading_is_dropped_at_the_stall_timeout() {
    let stall = Duration::from_secs(1);
    let dir = std::env::temp_dir().join(format!("rpyc-stall-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("s.sock");
    let server = quick_server(|b| b.unix_path(&path).call_timeout(stall));
    let mut s = std::os::unix::net::UnixStream::connect(&path).unwrap();
    s.write_all(&raw::hello()).unwrap();
    let mut theirs = [0u8; 16];
    s.read_exact(&mut theirs).unwrap();
    assert_dropped_for_not_reading(&server, s, stall);
    drop(server);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn closing_with_a_short_grace_does_not_wait_for_stuck_handlers() {
    let server = quick_server(|b| b);
    let conn = rpyc::connect("127.0.0.1", server.port).unwrap();
    let _stuck = conn
        .root()
        .call_async::<(), _>("wait_ms", (5_000u64,))
        .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let grace = Duration::from_millis(300);
    let start = Instant::now();
    assert!(
        !server.handle.close_timeout(grace),
        "a handler was still running"
    );
    let took = start.elapsed();
    assert!(
        took >= grace && took < grace * 3,
        "close_timeout({grace:?}) took {took:?}"
    );
}

#[test]
fn a_call_to_a_method_taking_no_arguments_with_some_names_what_was_sent_briefly() {
    let server = quick_server(|b| b);
    let conn = rpyc::connect("127.0.0.1", server.port).unwrap();
    let big: Vec<u32> = (0..100_000).collect();
    match conn.root().call::<(), _>("nothing", (big,)) {
        Err(Error::Remote(e)) => {
            assert!(e.message().len() < 1024, "{} bytes", e.message().len());
            assert!(e.message().contains("no arguments"), "{}", e.message());
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_refused_client_that_keeps_sending_cannot_hold_refusals_up() {
    /// How long the refused client keeps sending, at most.
    const FLOOD: Duration = Duration::from_secs(10);
    let server = quick_server(|b| b.max_connections(1).evict_idle_after(Duration::MAX));
    let _holder = rpyc::connect("127.0.0.1", server.port).unwrap();
    // Refused, and then it sends and sends instead of reading the refusal.
    let mut flood = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    flood
        .set_write_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let flooding = std::thread::spawn(move || {
        let chunk = vec![0u8; 1 << 16];
        let start = Instant::now();
        while start.elapsed() < FLOOD {
            if flood.write_all(&chunk).is_err() {
                return Some(start.elapsed());
            }
        }
        None
    });
    std::thread::sleep(Duration::from_millis(100));
    // The next refused client still gets its answer at once...
    let start = Instant::now();
    let err = rpyc::connect("127.0.0.1", server.port).unwrap_err();
    assert_eq!(handshake_kind(&err), HandshakeErrorKind::Refused, "{err}");
    // (a refuser held by the flood would answer only after it, 10 s)
    assert!(start.elapsed() < FLOOD / 5, "{:?}", start.elapsed());
    // ... and the flooding one is hung up on after the refusal's linger (200 ms), not kept.
    let cut = flooding.join().unwrap();
    assert!(
        cut.is_some_and(|t| t < FLOOD / 5),
        "the refused client could keep sending for {cut:?}"
    );
}

#[test]
fn a_client_uploading_slowly_is_not_idle_and_keeps_its_slot() {
    let idle = Duration::from_millis(500);
    let server = quick_server(|b| b.max_connections(1).evict_idle_after(idle));
    let mut s = raw::client(server.port);
    // A 1 KiB call sent a few bytes every tenth of the idle limit, for three idle limits.
    let call = raw::frame(raw::CALL, 1, 0, 0, "nothing", &{
        let mut p = vec![0x81];
        raw::cbor_head(&mut p, 2, 1000);
        p.resize(p.len() + 1000, 0);
        p
    });
    let start = Instant::now();
    let mut sent = 0;
    while start.elapsed() < idle * 3 {
        s.write_all(&call[sent..sent + 4]).unwrap();
        sent += 4;
        std::thread::sleep(idle / 10);
    }
    // A newcomer cannot take the slot of a connection that is moving bytes.
    let err = rpyc::connect("127.0.0.1", server.port).unwrap_err();
    assert_eq!(handshake_kind(&err), HandshakeErrorKind::Refused, "{err}");
    s.write_all(&call[sent..]).unwrap();
    let reply = raw::read_frame(&mut s).unwrap().unwrap();
    assert_eq!(reply.kind, raw::ERROR, "too many arguments for `nothing`");
}

#[test]
fn a_closed_connection_keeps_its_slot_until_its_handlers_return() {
    let server = quick_server(|b| b.max_connections(1).evict_idle_after(Duration::MAX));
    let t = Duration::from_millis(800);
    let conn = rpyc::connect("127.0.0.1", server.port).unwrap();
    let _running = conn
        .root()
        .call_async::<(), _>("wait_ms", (t.as_millis() as u64,))
        .unwrap();
    std::thread::sleep(t / 8);
    let closed = Instant::now();
    conn.close();
    // Its handler still runs on the server: the slot is still taken...
    std::thread::sleep(t / 8);
    let err = rpyc::connect("127.0.0.1", server.port).unwrap_err();
    assert_eq!(handshake_kind(&err), HandshakeErrorKind::Refused, "{err}");
    // ... and free once the handler has returned.
    std::thread::sleep(t.saturating_sub(closed.elapsed()) + t / 4);
    let conn = rpyc::connect("127.0.0.1", server.port).expect("the slot was given back");
    conn.root().call::<(), _>("nothing", ()).unwrap();
}

/// Admits every client after `delay` (a slow authentication).
struct SlowAuth(Duration);

impl rpyc::auth::Authenticator for SlowAuth {
    fn authenticate(
        &self,
        socket: TcpStream,
        _timeout: Duration,
    ) -> Result<rpyc::auth::Authenticated, Error> {
        std::thread::sleep(self.0);
        Ok(rpyc::auth::Authenticated::new(socket))
    }
}

#[test]
fn the_handshake_timeout_counts_from_the_accept_authentication_included() {
    let t = Duration::from_secs(1);
    let server = quick_server(|b| {
        b.authenticator(SlowAuth(t.mul_f64(0.6)))
            .handshake_timeout(t)
    });
    // Authenticated after 0.6 of the timeout, then silent: dropped at the timeout, not 0.6
    // later.
    let mut s = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    let start = Instant::now();
    assert!(raw::hangs_up_within(&mut s, t * 3));
    let took = start.elapsed();
    assert!(
        took >= t.mul_f64(0.9) && took <= t.mul_f64(1.3),
        "dropped after {took:?}, the handshake timeout being {t:?}"
    );
}
