//! A client under a malicious server: whatever the server does or stops doing, the client's
//! calls end by their timeout, and nothing the server sends makes the client hang or spin.

mod common;

use common::tls::{pki, Pki};
use rpyc::tls::SslClient;
use rpyc::{Error, Options, Timeout};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

// ---- TLS ----

/// A TLS record type: alerts.
const ALERT: u8 = 0x15;
/// A TLS record type: handshake messages.
const HANDSHAKE: u8 = 0x16;
/// A TLS record type: application data.
const APPLICATION_DATA: u8 = 0x17;

/// An rpyc hello as a server sends it (PROTOCOL.md §2): version 1, no flags, 1 MiB frames,
/// 16 queued requests.
const SERVER_HELLO: [u8; 16] = [
    b'R', b'P', b'Y', b'C', 0, 1, 0, 0, 0, 0x10, 0, 0, 0, 0, 0, 16,
];

/// `openssl s_server` on a free port of 127.0.0.1, presenting the test PKI's server
/// certificate. What the test writes to it goes to the client as application data; a line
/// `r` makes it start a renegotiation (TLS 1.2), `K` a key update that asks the client to
/// update too (TLS 1.3). Killed when dropped (continued first if stopped), also when a test
/// fails.
struct SServer {
    child: Child,
    stdin: ChildStdin,
    /// Everything it printed: its diagnostics and the application data it received.
    out: Arc<Mutex<Vec<u8>>>,
    port: u16,
}

impl SServer {
    fn start(p: &Pki, args: &[&str]) -> SServer {
        let mut child = Command::new("openssl")
            .args(["s_server", "-accept", "127.0.0.1:0", "-naccept", "1"])
            .args(args)
            .arg("-cert")
            .arg(&p.server.cert)
            .arg("-key")
            .arg(&p.server.key)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("the openssl command line is installed (apt-get install openssl)");
        let stdin = child.stdin.take().unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let out = Arc::new(Mutex::new(Vec::new()));
        let sink = out.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = stdout.read(&mut buf) {
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        let mut server = SServer {
            child,
            stdin,
            out,
            port: 0,
        };
        let mut port = None;
        assert!(
            common::wait_until(Duration::from_secs(10), || {
                port = server.printed_port();
                port.is_some()
            }),
            "s_server did not start listening"
        );
        server.port = port.unwrap();
        server
    }

    /// The port of its "ACCEPT 127.0.0.1:PORT" line.
    fn printed_port(&self) -> Option<u16> {
        let out = self.out.lock().unwrap();
        let text = String::from_utf8_lossy(&out);
        let line = text.lines().find(|l| l.starts_with("ACCEPT "))?;
        line.rsplit(':').next()?.trim().parse().ok()
    }

    /// Whether it printed (or received) `needle`.
    fn printed(&self, needle: &[u8]) -> bool {
        let out = self.out.lock().unwrap();
        out.windows(needle.len()).any(|w| w == needle)
    }

    /// Sends `bytes` to its client, or gives it a command line.
    fn send(&mut self, bytes: &[u8]) {
        self.stdin.write_all(bytes).unwrap();
        self.stdin.flush().unwrap();
    }

    fn signal(pid: u32, signal: &str) {
        let _ = Command::new("kill")
            .args([signal, &pid.to_string()])
            .stderr(Stdio::null())
            .status();
    }
}

impl Drop for SServer {
    fn drop(&mut self) {
        SServer::signal(self.child.id(), "-CONT");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Stops process `pid` (SIGSTOP) and waits until it is really stopped.
fn freeze(pid: u32) {
    SServer::signal(pid, "-STOP");
    let stopped = || {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s[s.rfind(')').unwrap() + 2..].starts_with('T'))
            .unwrap_or(false)
    };
    assert!(
        common::wait_until(Duration::from_secs(5), stopped),
        "s_server did not stop"
    );
}

/// A TCP relay in front of a TLS server that reads record headers as they pass: the test
/// learns when the client has sent application data, and the relay runs `on_renegotiation`
/// (which freezes the server) *before* passing on the first handshake record the server sends
/// after application data: a HelloRequest. Without it, the server could see the client's
/// answer before being frozen.
struct Relay {
    port: u16,
    /// Application data records the client sent.
    client_data: Arc<AtomicUsize>,
    /// The server's HelloRequest went to the client.
    renegotiating: Arc<AtomicBool>,
    /// Record types the client sent after the HelloRequest.
    client_after: Arc<Mutex<Vec<u8>>>,
    sockets: Arc<Mutex<Vec<TcpStream>>>,
}

impl Relay {
    fn start(upstream: u16, on_renegotiation: impl FnOnce() + Send + 'static) -> Relay {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let relay = Relay {
            port: l.local_addr().unwrap().port(),
            client_data: Default::default(),
            renegotiating: Default::default(),
            client_after: Default::default(),
            sockets: Default::default(),
        };
        let (client_data, renegotiating, client_after, sockets) = (
            relay.client_data.clone(),
            relay.renegotiating.clone(),
            relay.client_after.clone(),
            relay.sockets.clone(),
        );
        std::thread::spawn(move || {
            let Ok((client, _)) = l.accept() else { return };
            let server = TcpStream::connect(("127.0.0.1", upstream)).unwrap();
            sockets
                .lock()
                .unwrap()
                .extend([client.try_clone().unwrap(), server.try_clone().unwrap()]);
            let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            let reneg = renegotiating.clone();
            std::thread::spawn(move || {
                pump(c2, s2, |kind| {
                    if kind == APPLICATION_DATA {
                        client_data.fetch_add(1, Ordering::SeqCst);
                    }
                    if reneg.load(Ordering::SeqCst) {
                        client_after.lock().unwrap().push(kind);
                    }
                })
            });
            let mut seen_data = false;
            let mut on_renegotiation = Some(on_renegotiation);
            pump(server, client, |kind| {
                seen_data |= kind == APPLICATION_DATA;
                if kind == HANDSHAKE && seen_data {
                    if let Some(f) = on_renegotiation.take() {
                        f();
                        renegotiating.store(true, Ordering::SeqCst);
                    }
                }
            });
        });
        relay
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        for s in self.sockets.lock().unwrap().iter() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

/// Copies TLS records from `from` to `to`, calling `before` with each record's type before
/// passing it on; at the end of either side, ends both.
fn pump(mut from: TcpStream, mut to: TcpStream, mut before: impl FnMut(u8)) {
    let mut header = [0u8; 5];
    let mut body = vec![0u8; 1 << 15];
    while from.read_exact(&mut header).is_ok() {
        let len = u16::from_be_bytes([header[3], header[4]]) as usize;
        if from.read_exact(&mut body[..len]).is_err() {
            break;
        }
        before(header[0]);
        if to.write_all(&header).is_err() || to.write_all(&body[..len]).is_err() {
            break;
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

/// Runs `f` on a thread, so that a test can stop waiting for it: its result and how long it
/// took arrive on the channel.
fn timed<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> mpsc::Receiver<(T, Duration)> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let t = Instant::now();
        let r = f();
        let _ = tx.send((r, t.elapsed()));
    });
    rx
}

#[test]
fn tls_server_that_never_finishes_a_renegotiation_cannot_hang_calls_past_their_timeout() {
    let p = pki();
    let call_timeout = Duration::from_secs(2);
    let mut server = SServer::start(&p, &["-tls1_2"]);
    let pid = server.child.id();
    let relay = Relay::start(server.port, move || freeze(pid));
    let client = Options::new()
        .call_timeout(call_timeout)
        .tls(SslClient::new().ca_certs(p.ca.ca_cert()));
    let port = relay.port;
    let connecting = std::thread::spawn(move || client.connect("localhost", port));
    // The client's hello went through: answer with the server's.
    assert!(
        common::wait_until(Duration::from_secs(10), || relay
            .client_data
            .load(Ordering::SeqCst)
            > 0),
        "the client sent no hello"
    );
    server.send(&SERVER_HELLO);
    let conn = connecting.join().unwrap().expect("the rpyc handshake");
    server.send(b"r\n");
    assert!(
        common::wait_until(Duration::from_secs(10), || relay
            .renegotiating
            .load(Ordering::SeqCst)),
        "s_server sent no HelloRequest"
    );
    let calls: Vec<_> = (0..2)
        .map(|_| {
            let conn = conn.clone();
            timed(move || conn.root().call::<i64, _>("add", (1, 2)))
        })
        .collect();
    for (i, rx) in calls.into_iter().enumerate() {
        let (r, took) = rx
            .recv_timeout(3 * call_timeout)
            .unwrap_or_else(|_| panic!("call {i} still hangs after 3 times its timeout"));
        assert!(
            matches!(r, Err(Error::Timeout(Timeout::Call { .. }))),
            "call {i}: {r:?}"
        );
        assert!(
            took < call_timeout * 3 / 2,
            "call {i} took {took:?}, its timeout is {call_timeout:?}"
        );
    }
    // The client refused the renegotiation with an alert, and never started one.
    let after = relay.client_after.lock().unwrap().clone();
    assert!(
        after.contains(&ALERT) && !after.contains(&HANDSHAKE),
        "record types the client sent after the HelloRequest: {after:x?}"
    );
    conn.close();
}

/// A client of `server` (trusting the test CA), once `server` has sent the rpyc hello.
fn connect_through_s_server(p: &Pki, server: &mut SServer) -> rpyc::Connection {
    let client = Options::new()
        .call_timeout(Duration::from_secs(10))
        .tls(SslClient::new().ca_certs(p.ca.ca_cert()));
    let port = server.port;
    let connecting = std::thread::spawn(move || client.connect("localhost", port));
    assert!(
        common::wait_until(Duration::from_secs(10), || server.printed(b"RPYC")),
        "the client sent no hello"
    );
    server.send(&SERVER_HELLO);
    connecting.join().unwrap().expect("the rpyc handshake")
}

#[test]
fn tls_server_that_insists_on_renegotiating_ends_the_connection_with_an_error_saying_so() {
    // OpenSSL's own s_server answers the client's refusal with a fatal handshake_failure
    // alert and hangs up: the client's error must name the renegotiation, not the ciphers.
    let p = pki();
    let mut server = SServer::start(&p, &["-tls1_2"]);
    let conn = connect_through_s_server(&p, &mut server);
    server.send(b"r\n");
    assert!(
        conn.wait_closed_timeout(Duration::from_secs(10)),
        "the connection is still open"
    );
    let reason = conn.close_reason().unwrap_or_default();
    assert!(
        reason.contains("the server wanted to renegotiate the TLS 1.2 session"),
        "{reason}"
    );
}

#[test]
fn tls13_key_updates_from_the_server_still_work() {
    // Renegotiation is refused, but TLS 1.3's KeyUpdate is not a renegotiation: a server that
    // updates its keys and asks the client to update its own keeps a working connection.
    let p = pki();
    let mut server = SServer::start(&p, &["-tls1_3", "-msg"]);
    let conn = connect_through_s_server(&p, &mut server);
    server.send(b"K\n");
    assert!(
        common::wait_until(Duration::from_secs(10), || server
            .printed(b">>> TLS 1.3, Handshake [length 0005], KeyUpdate")),
        "s_server sent no KeyUpdate"
    );
    let calling = {
        let conn = conn.clone();
        timed(move || conn.root().call::<i64, _>("add", (1, 2)))
    };
    // PROTOCOL.md's example: the call add(1, 2) with request id 1, and its reply, 3.
    let call = [
        0, 0, 0, 12, 0x85, 0x00, 0x01, 0x00, 0x00, 0x63, b'a', b'd', b'd', 0x82, 0x01, 0x02,
    ];
    assert!(
        common::wait_until(Duration::from_secs(10), || server.printed(&call)),
        "the call did not reach the server"
    );
    server.send(&[0, 0, 0, 7, 0x85, 0x02, 0x01, 0x00, 0x00, 0x60, 0x03]);
    let (r, _) = calling
        .recv_timeout(Duration::from_secs(15))
        .expect("the call returns");
    assert_eq!(r.unwrap(), 3);
    // The client updates its keys too, as asked: OpenSSL sends its KeyUpdate with the first
    // write after it read the server's, which is the call, or (if the call went out before
    // the reading thread got to the server's KeyUpdate, as happens under load) the next frame.
    conn.root().call_oneway("log", ("after",)).unwrap();
    assert!(
        common::wait_until(Duration::from_secs(10), || server
            .printed(b"<<< TLS 1.3, Handshake [length 0005], KeyUpdate")),
        "the client did not update its keys"
    );
    conn.close();
}

// ---- Memory (measured on a client in a child process) ----

use common::child::{self, Child as ChildProcess};
use common::raw;
use rpyc::{Bytes, Service};

/// The client the memory tests attack, in a child process: `role` is `client PORT SCENARIO`.
/// `late_reply`: one call that times out (says `timed out`), then it stays connected.
/// `nested`: exposes `slow(Bytes)` (20 ms each) and makes one call; says how it ended.
#[test]
#[ignore = "the child process of the tests in this file; they start it themselves"]
fn child_client() {
    let role = child::role().expect("run only as a child process by the tests of this file");
    let words: Vec<&str> = role.split_whitespace().collect();
    let port: u16 = words[1].parse().unwrap();
    match words[2] {
        "late_reply" => {
            let conn = rpyc::connect("127.0.0.1", port).unwrap();
            let r = conn
                .root()
                .call_timeout::<(), _>("x", (), Duration::from_millis(300));
            assert!(matches!(r, Err(Error::Timeout(_))), "{r:?}");
            child::say("timed out");
            child::serve_until_parent_leaves();
        }
        "nested" => {
            let service = Service::new("client").method("slow", |_b: Bytes| {
                std::thread::sleep(Duration::from_millis(20))
            });
            let conn = Options::new()
                .service(service)
                .max_frame_size(32 << 20)
                .max_buffered(64 << 20)
                .connect("127.0.0.1", port)
                .unwrap();
            let r = conn
                .root()
                .call_timeout::<(), _>("x", (), Duration::from_secs(60));
            // The socket closes with the last handle: the attacker's writes then fail.
            drop(conn);
            child::say(format!("ended: {r:?}"));
            child::serve_until_parent_leaves();
        }
        other => panic!("no scenario {other}"),
    }
}

#[test]
fn a_late_reply_full_of_tiny_items_costs_the_client_a_small_multiple_of_it() {
    let (l, port) = raw::listener();
    let c = ChildProcess::start("child_client", &format!("client {port} late_reply"));
    let mut s = raw::accept(&l);
    let call = raw::read_frame(&mut s).unwrap().unwrap();
    assert_eq!(c.heard(Duration::from_secs(30)), "timed out");
    // The reply comes late: nobody decodes it, but the object references in it are released,
    // which used to parse it whole into a tree.
    const REFS: u64 = 600_000;
    let mut payload = Vec::new();
    raw::cbor_head(&mut payload, 4, REFS);
    for i in 0..REFS {
        payload.extend_from_slice(&raw::object_ref(1 + i % 1000));
    }
    let before = c.rss();
    c.reset_peak();
    s.write_all(&raw::frame(raw::REPLY, call.id, 0, 0, "", &payload))
        .unwrap();
    // Done once every reference came back released.
    let mut released = 0;
    while released < REFS {
        let f = raw::read_frame(&mut s).unwrap().expect("releases");
        assert_eq!(f.kind, raw::RELEASE, "{f:?}");
        let list: Vec<(u64, u64)> = serde_cbor::from_slice(&f.payload).unwrap();
        released += list.iter().map(|(_, n)| n).sum::<u64>();
    }
    assert_eq!(released, REFS);
    c.assert_peak_grew_at_most(before, payload.len() as u64, 3.0, "late reply");
}

#[test]
fn requests_nested_in_a_pending_call_are_bounded_in_bytes() {
    let (l, port) = raw::listener();
    let c = ChildProcess::start("child_client", &format!("client {port} nested"));
    let mut s = raw::accept(&l);
    let call = raw::read_frame(&mut s).unwrap().unwrap();
    // The client's replies to what follows are read (and dropped) on the side.
    let mut replies = s.try_clone().unwrap();
    std::thread::spawn(move || while let Ok(Some(_)) = raw::read_frame(&mut replies) {});
    let before = c.rss();
    c.reset_peak();
    // 400 requests of 1 MiB, each naming the pending call as parent: the client serves them
    // one at a time (20 ms each) on the calling thread, and used to keep the rest in an
    // unbounded channel.
    let mut arg = vec![0x81];
    raw::cbor_head(&mut arg, 2, 1 << 20);
    arg.resize(arg.len() + (1 << 20), 0x5a);
    let mut sent = 0u64;
    for i in 0..400 {
        let f = raw::frame(raw::CALL, 1000 + i, call.id, 0, "slow", &arg);
        if s.write_all(&f).is_err() {
            break;
        }
        sent += f.len() as u64;
    }
    let ended = c.heard(Duration::from_secs(60));
    eprintln!("sent {} MiB; the client: {ended}", sent >> 20);
    assert!(
        ended.contains("Closed") && ended.contains("max_buffered"),
        "the client should have closed the connection over its limit: {ended}"
    );
    c.assert_peak_grew_at_most(before, 64 << 20, 1.5, "nested requests");
}

// ---- Deadlines ----

#[test]
fn a_hello_dribbled_by_a_server_times_out_at_the_handshake_deadline() {
    let (l, port) = raw::listener();
    let t = Duration::from_secs(1);
    std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        for b in raw::hello() {
            if s.write_all(&[b]).is_err() {
                return;
            }
            std::thread::sleep(t / 4);
        }
        std::thread::sleep(t * 4);
    });
    let start = Instant::now();
    let r = Options::new()
        .handshake_timeout(t)
        .connect("127.0.0.1", port);
    let took = start.elapsed();
    assert!(
        matches!(r, Err(Error::Timeout(Timeout::Handshake(d))) if d == t),
        "{r:?}"
    );
    assert!(
        took >= t.mul_f64(0.9) && took <= t.mul_f64(1.6),
        "gave up after {took:?}, the handshake timeout being {t:?}"
    );
}

/// A server that completes the handshake, then reads nothing until `go` fires; then it reads
/// and forwards every frame (whole, or the test fails) to the returned channel.
fn server_that_stops_reading() -> (u16, mpsc::Sender<()>, mpsc::Receiver<raw::Frame>) {
    let (l, port) = raw::listener();
    let (go_tx, go) = mpsc::channel();
    let (frames_tx, frames) = mpsc::channel();
    std::thread::spawn(move || {
        let mut s = raw::accept(&l);
        let _ = go.recv_timeout(Duration::from_secs(60));
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        while let Ok(Some(f)) = raw::read_frame(&mut s) {
            if frames_tx.send(f).is_err() {
                return;
            }
        }
    });
    (port, go_tx, frames)
}

#[test]
fn a_server_that_stops_reading_cannot_hold_a_call_past_its_timeout() {
    let (port, go, frames) = server_that_stops_reading();
    // A long connection-wide timeout (the stall timeout is the same), and short per-call ones.
    let conn = Options::new()
        .call_timeout(Duration::from_secs(30))
        .connect("127.0.0.1", port)
        .unwrap();
    let t = Duration::from_secs(1);
    let big = Bytes::from(vec![3u8; 32 << 20]);
    let root = conn.root();
    let first = timed(move || root.call_timeout::<(), _>("store", (big,), t));
    // A second thread's call waits for the writer the first one holds.
    std::thread::sleep(t / 5);
    let root = conn.root();
    let second = timed(move || root.call_timeout::<(), _>("small", (), t / 2));
    for (rx, limit, partly) in [(first, t, true), (second, t / 2, false)] {
        let (r, took) = rx
            .recv_timeout(t * 3)
            .expect("a call was held past its timeout by a stuck writer");
        match r {
            Err(Error::Timeout(Timeout::Send {
                partly: p, after, ..
            })) => {
                assert_eq!((p, after), (partly, limit));
            }
            other => panic!("expected a send timeout, got {other:?}"),
        }
        assert!(
            took >= limit.mul_f64(0.9) && took <= limit.mul_f64(1.5),
            "a call with a timeout of {limit:?} returned after {took:?}"
        );
    }
    assert!(!conn.is_closed(), "only the calls fail, not the connection");
    // Once the server reads again, it gets the first call whole, then the next one: the
    // frame that was cut short was finished in the background.
    go.send(()).unwrap();
    conn.root().call_oneway("after", ()).unwrap();
    let f = frames.recv_timeout(Duration::from_secs(30)).unwrap();
    assert_eq!(f.method, "store");
    // The caller's `Bytes` was dropped when its call returned; the frame kept its memory.
    assert!(f.payload.len() > 32 << 20);
    let data = &f.payload[f.payload.len() - (32 << 20)..];
    assert!(
        data.iter().all(|&b| b == 3),
        "the finished frame's data changed"
    );
    let f = frames.recv_timeout(Duration::from_secs(30)).unwrap();
    assert_eq!(f.method, "after");
}

fn assert_closed_for_stalling(r: Result<(), Error>, took: Duration, stall: Duration) {
    match r {
        Err(Error::Closed { reason }) => {
            assert!(reason.contains("read nothing for 1s"), "{reason}")
        }
        other => panic!("expected the connection to close, got {other:?}"),
    }
    assert!(
        took >= stall.mul_f64(0.9) && took <= stall.mul_f64(1.6),
        "noticed after {took:?}, the stall timeout being {stall:?}"
    );
}

#[test]
fn a_server_that_stops_reading_is_noticed_at_the_stall_timeout() {
    let (port, _go, _frames) = server_that_stops_reading();
    let stall = Duration::from_secs(1);
    let conn = Options::new()
        .call_timeout(stall)
        .connect("127.0.0.1", port)
        .unwrap();
    let start = Instant::now();
    let r =
        conn.root()
            .call_timeout::<(), _>("store", (Bytes::from(vec![1u8; 32 << 20]),), stall * 10);
    assert_closed_for_stalling(r, start.elapsed(), stall);
}

#[cfg(unix)]
#[test]
fn a_unix_socket_server_that_stops_reading_is_noticed_at_the_stall_timeout() {
    use std::os::unix::net::UnixListener;
    let dir = std::env::temp_dir().join(format!("rpyc-stall-c-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("s.sock");
    let l = UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.write_all(&raw::hello()).unwrap();
        std::thread::sleep(Duration::from_secs(10));
    });
    let stall = Duration::from_secs(1);
    let conn = Options::new()
        .call_timeout(stall)
        .unix_connect(&path)
        .unwrap();
    let start = Instant::now();
    let r =
        conn.root()
            .call_timeout::<(), _>("store", (Bytes::from(vec![1u8; 32 << 20]),), stall * 10);
    assert_closed_for_stalling(r, start.elapsed(), stall);
    let _ = std::fs::remove_dir_all(dir);
}

// ---- Calls that the server would refuse, and a busy connection ----

fn real_server() -> common::TestServer {
    common::serve(
        Service::new("s")
            .method("nothing", || ())
            .method("sleep_ms", |ms: u64| {
                std::thread::sleep(Duration::from_millis(ms))
            })
            .method("answer", || 42)
            .method("long_error", || -> Result<(), String> {
                Err("x".repeat(100_000))
            }),
    )
}

#[test]
fn a_method_name_over_the_protocol_limit_fails_only_that_call() {
    let server = real_server();
    let conn = common::connect(&server);
    let long = "m".repeat(1025);
    match conn.root().call::<(), _>(&long, ()) {
        Err(Error::Encode(why)) => assert!(why.contains("1024"), "{why}"),
        other => panic!("expected a local error, got {other:?}"),
    }
    // Nothing was sent: the connection is fine.
    conn.root().call::<(), _>("nothing", ()).unwrap();
}

#[test]
fn a_call_times_out_at_its_deadline_while_other_threads_keep_the_connection_busy() {
    let server = real_server();
    let conn = common::connect(&server);
    let stop = Arc::new(AtomicBool::new(false));
    let busy: Vec<_> = (0..4)
        .map(|_| {
            let (conn, stop) = (conn.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    conn.root().call::<(), _>("nothing", ()).unwrap();
                }
            })
        })
        .collect();
    let t = Duration::from_millis(400);
    let late = Arc::new(AtomicUsize::new(0));
    let callers: Vec<_> = (0..4)
        .map(|_| {
            let (conn, late) = (conn.clone(), late.clone());
            std::thread::spawn(move || {
                for _ in 0..10 {
                    let start = Instant::now();
                    let r = conn.root().call_timeout::<(), _>(
                        "sleep_ms",
                        (4 * t.as_millis() as u64,),
                        t,
                    );
                    let took = start.elapsed();
                    assert!(
                        matches!(r, Err(Error::Timeout(Timeout::Call { .. }))),
                        "{r:?}"
                    );
                    if took > t.mul_f64(1.5) {
                        eprintln!("a call with a timeout of {t:?} returned after {took:?}");
                        late.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for c in callers {
        c.join().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    for b in busy {
        b.join().unwrap();
    }
    assert_eq!(
        late.load(Ordering::Relaxed),
        0,
        "calls returned past 1.5x their timeout"
    );
}

#[test]
fn an_error_reply_is_cut_to_the_client_s_frame_limit() {
    let server = real_server();
    let conn = common::options()
        .max_frame_size(1024)
        .connect("127.0.0.1", server.port)
        .unwrap();
    match conn.root().call::<(), _>("long_error", ()) {
        Err(Error::Remote(e)) => {
            assert!(e.message().starts_with("xxxx"), "{}", e.message());
            assert!(e.message().len() < 1024, "{} bytes", e.message().len());
        }
        other => panic!("expected the handler's error, cut short; got {other:?}"),
    }
    conn.root().call::<(), _>("nothing", ()).unwrap();
}

#[test]
fn a_reply_of_the_wrong_type_names_the_type_as_the_caller_wrote_it() {
    let server = real_server();
    let conn = common::connect(&server);
    match conn.root().call::<Vec<String>, _>("answer", ()) {
        Err(Error::Decode(why)) => {
            assert!(why.contains("Vec<String>"), "{why}");
            assert!(!why.contains("alloc::"), "{why}");
        }
        other => panic!("{other:?}"),
    }
}
