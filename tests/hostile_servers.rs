//! A client under a malicious server: whatever the server does or stops doing, the client's
//! calls end by their timeout, and nothing the server sends makes the client hang or spin.

mod common;

use common::tls::{pki, Pki};
use rpyc::{Error, Options, SslClient, Timeout};
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
    let client = SslClient::new()
        .ca_certs(p.ca.ca_cert())
        .options(Options::new().call_timeout(call_timeout));
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

#[test]
fn tls_server_that_insists_on_renegotiating_ends_the_connection_with_an_error_saying_so() {
    // OpenSSL's own s_server answers the client's refusal with a fatal handshake_failure
    // alert and hangs up: the client's error must name the renegotiation, not the ciphers.
    let p = pki();
    let mut server = SServer::start(&p, &["-tls1_2"]);
    let client = SslClient::new()
        .ca_certs(p.ca.ca_cert())
        .options(Options::new().call_timeout(Duration::from_secs(10)));
    let port = server.port;
    let connecting = std::thread::spawn(move || client.connect("localhost", port));
    assert!(
        common::wait_until(Duration::from_secs(10), || server.printed(b"RPYC")),
        "the client sent no hello"
    );
    server.send(&SERVER_HELLO);
    let conn = connecting.join().unwrap().expect("the rpyc handshake");
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
    let client = SslClient::new()
        .ca_certs(p.ca.ca_cert())
        .options(Options::new().call_timeout(Duration::from_secs(10)));
    let port = server.port;
    let connecting = std::thread::spawn(move || client.connect("localhost", port));
    assert!(
        common::wait_until(Duration::from_secs(10), || server.printed(b"RPYC")),
        "the client sent no hello"
    );
    server.send(&SERVER_HELLO);
    let conn = connecting.join().unwrap().expect("the rpyc handshake");
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
    // The client updated its keys too, as asked, before sending the call.
    assert!(server.printed(b"<<< TLS 1.3, Handshake [length 0005], KeyUpdate"));
    conn.close();
}
