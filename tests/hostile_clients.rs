//! A server under attack: whatever a client sends, or stops sending, costs the server a bounded
//! time and no busy CPU, is logged, and never stops it serving other clients.

mod common;

use common::tls::{
    capture_logs, logged, pki, serve_tls, server_options, still_serves, whoami, Pki,
};
use std::io::{Read, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

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
            "handshake failure"
        ])),
        "not logged"
    );
    assert!(common::wait_until(Duration::from_secs(5), || server
        .handle
        .connections()
        == 0));
    still_serves(&server, &p);
}
