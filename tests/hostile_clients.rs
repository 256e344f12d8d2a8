//! A server under attack: whatever a client sends, or stops sending, costs the server a bounded
//! time and no busy CPU, is logged, and never stops it serving other clients.

mod common;

use common::tls::{
    capture_logs, logged, pki, serve_tls, server_options, still_serves, whoami, Pki,
};
use common::TestServer;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::Ordering;
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
    let server = serve_tls(whoami(), p.authenticator(), server_options());
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
        common::wait_until(Duration::from_secs(5), || logged(&[
            "127.0.0.1:",
            "connection failed",
            "the client wanted to renegotiate the TLS 1.2 session, which this server refuses"
        ])),
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
        // Per thread: its CPU ticks now (0 for threads that start later), and when last seen.
        let mut seen: HashMap<u64, (u64, u64)> = threads_cpu_ticks(name)
            .into_iter()
            .map(|(tid, ticks)| (tid, (ticks, ticks)))
            .collect();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let sampler = std::thread::spawn(move || {
            loop {
                let done = flag.load(Ordering::SeqCst);
                for (tid, ticks) in threads_cpu_ticks(name) {
                    seen.entry(tid).or_insert((0, ticks)).1 = ticks;
                }
                if done {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            let ticks: u64 = seen.values().map(|(first, last)| last - first).sum();
            Duration::from_secs_f64(ticks as f64 / clock_ticks_per_second())
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

/// utime + stime, in clock ticks, of each live thread of this process named `name`.
fn threads_cpu_ticks(name: &str) -> Vec<(u64, u64)> {
    let mut found = Vec::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return found;
    };
    for task in tasks.flatten() {
        let Ok(tid) = task.file_name().to_string_lossy().parse::<u64>() else {
            continue;
        };
        // A thread that ended since the listing has no stat any more.
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        if &stat[open + 1..close] != name {
            continue;
        }
        // After the name: state is field 3 of the full line, utime and stime fields 14 and 15.
        let fields: Vec<&str> = stat[close + 2..].split_whitespace().collect();
        let ticks = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        found.push((tid, ticks));
    }
    found
}

/// The kernel's USER_HZ (what /proc counts CPU time in).
fn clock_ticks_per_second() -> f64 {
    let out = Command::new("getconf").arg("CLK_TCK").output();
    out.ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
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

#[test]
fn hit_and_run_plain_hellos_on_a_tls_port_cost_no_cpu_and_end_at_once() {
    let _one_at_a_time = measuring_cpu();
    capture_logs();
    let p = pki();
    let handshake_timeout = Duration::from_secs(3);
    let server = serve_tls(
        whoami(),
        p.authenticator(),
        server_options().handshake_timeout(handshake_timeout),
    );
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
        common::wait_until(Duration::from_secs(5), || logged(&[
            "127.0.0.1:",
            "closed the connection",
            "plain rpyc hello"
        ])),
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
    let server = serve_tls(
        whoami(),
        p.authenticator(),
        server_options().handshake_timeout(handshake_timeout),
    );
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
        waited >= handshake_timeout - Duration::from_millis(50)
            && waited < handshake_timeout * 3 / 2,
        "dropped after {waited:?}, the handshake timeout is {handshake_timeout:?}"
    );
    assert!(
        used < waited / 10,
        "the handshake threads used {used:?} of CPU in {waited:?}"
    );
    assert!(common::wait_until(Duration::from_secs(5), || logged(&[
        "127.0.0.1:",
        "handshake timed out"
    ])));
    served_within(&server, &p, handshake_timeout / 3);
}

#[test]
fn a_client_whose_first_bytes_only_look_like_a_plain_hello_is_dropped_at_once() {
    capture_logs();
    let p = pki();
    let handshake_timeout = Duration::from_secs(3);
    let server = serve_tls(
        whoami(),
        p.authenticator(),
        server_options().handshake_timeout(handshake_timeout),
    );
    let started = Instant::now();
    let mut s = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    s.write_all(b"RPYX").unwrap();
    common::wait_for_hang_up(&mut s);
    assert!(
        started.elapsed() < handshake_timeout / 3,
        "dropped after {:?}",
        started.elapsed()
    );
    assert!(common::wait_until(Duration::from_secs(5), || logged(&[
        "127.0.0.1:",
        "does not speak TLS"
    ])));
    still_serves(&server, &p);
}
