//! Calls through an SSH tunnel to a real sshd: plain calls, many threads, 64 MiB both ways,
//! callbacks, and the tunnel on its own forwarding concurrent raw connections.

mod common;
#[path = "common/sshd.rs"]
mod sshd;

use common::{serve, CALL_TIMEOUT};
use rpyc::{Bytes, RemoteObject, Service};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::thread;
use std::time::Duration;

fn service() -> Service {
    Service::new("svc")
        .method("add", |a: i64, b: i64| a + b)
        .method("echo", |b: Bytes| b)
        .method("len", |b: Bytes| b.len())
        .method("make", |n: usize| Bytes::from(vec![7u8; n]))
        .method(
            "countdown",
            |n: u32, tick: RemoteObject| -> Result<u32, rpyc::Error> {
                let mut sum = 0;
                for i in (1..=n).rev() {
                    sum += tick.invoke::<u32, _>((i,))?;
                }
                Ok(sum)
            },
        )
        .method_with_context(
            "ask_client",
            |cx: &rpyc::Context| -> Result<String, rpyc::Error> { cx.peer_root().call("name", ()) },
        )
}

#[test]
fn calls_go_through_the_tunnel() {
    let server = serve(service());
    let ctx = sshd::shared().context();
    let conn = common::options()
        .ssh(ctx.clone())
        .connect("127.0.0.1", server.port)
        .unwrap();
    assert_eq!(conn.root().call::<i64, _>("add", (1, 2)).unwrap(), 3);
    // The client's peer is the tunnel's local end, not the server.
    assert!(conn.peer().starts_with("127.0.0.1:"));
    assert_ne!(conn.peer(), format!("127.0.0.1:{}", server.port));
    let pending = conn.root().call_async::<i64, _>("add", (20, 22)).unwrap();
    assert_eq!(pending.value().unwrap(), 42);
    conn.close();
}

#[test]
fn many_threads_share_one_tunneled_connection() {
    let server = serve(service());
    let conn = common::options()
        .ssh(sshd::shared().context().clone())
        .connect("127.0.0.1", server.port)
        .unwrap();
    thread::scope(|s| {
        for t in 0..8i64 {
            let conn = &conn;
            s.spawn(move || {
                for i in 0..100i64 {
                    let r: i64 = conn.root().call("add", (t * 1000, i)).unwrap();
                    assert_eq!(r, t * 1000 + i, "thread {t} got another thread's reply");
                }
            });
        }
    });
    conn.close();
}

#[test]
fn payloads_of_64_mib_go_both_ways_at_once() {
    // 64 MiB of payload is just over the default frame limit: both sides raise it.
    let server = common::serve_with(service(), |b| b.max_frame_size(80 << 20));
    let conn = common::options()
        .max_frame_size(80 << 20)
        .call_timeout(Duration::from_secs(60))
        .ssh(sshd::shared().context())
        .connect("127.0.0.1", server.port)
        .unwrap();
    let payload = Bytes::from(
        (0..64usize << 20)
            .map(|i| (i * 31 + 7) as u8)
            .collect::<Vec<u8>>(),
    );
    // Two echoes in flight at once: 128 MiB up and 128 MiB down interleaved in the tunnel.
    let a = conn
        .root()
        .call_async::<Bytes, _>("echo", (&payload,))
        .unwrap();
    let b = conn
        .root()
        .call_async::<Bytes, _>("echo", (&payload,))
        .unwrap();
    assert!(a.value().unwrap() == payload, "first echo differs");
    assert!(b.value().unwrap() == payload, "second echo differs");
    let made: Bytes = conn.root().call("make", (64usize << 20,)).unwrap();
    assert_eq!(made.len(), 64 << 20);
    assert_eq!(
        conn.root().call::<usize, _>("len", (&payload,)).unwrap(),
        64 << 20
    );
    conn.close();
}

#[test]
fn callbacks_reach_the_client_through_the_tunnel() {
    let server = serve(service());
    let me = Service::new("client").method("name", || "tunneled client".to_string());
    let conn = common::options()
        .service(me)
        .clone()
        .ssh(sshd::shared().context().clone())
        .connect("127.0.0.1", server.port)
        .unwrap();
    let cb = rpyc::callback(|i: u32| i * 10);
    assert_eq!(
        conn.root().call::<u32, _>("countdown", (5u32, cb)).unwrap(),
        150
    );
    assert_eq!(
        conn.root().call::<String, _>("ask_client", ()).unwrap(),
        "tunneled client"
    );
    conn.close();
}

/// A raw TCP server that reads until EOF, then replies with what it read, reversed, and closes.
fn reverse_server() -> (u16, thread::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let h = thread::spawn(move || {
        let mut workers = Vec::new();
        for s in l.incoming().take(20) {
            let mut s = s.unwrap();
            workers.push(thread::spawn(move || {
                s.set_read_timeout(Some(CALL_TIMEOUT)).unwrap();
                let mut all = Vec::new();
                s.read_to_end(&mut all).unwrap();
                all.reverse();
                s.write_all(&all).unwrap();
            }));
        }
        for w in workers {
            w.join().unwrap();
        }
    });
    (port, h)
}

#[test]
fn tunnel_alone_forwards_concurrent_connections_and_eof_both_ways() {
    let (port, server) = reverse_server();
    let tunnel = rpyc::ssh::SshTunnel::open(&sshd::shared().context(), "127.0.0.1", port).unwrap();
    let local = tunnel.local_port();
    assert_ne!(local, 0);
    thread::scope(|s| {
        for i in 0..20usize {
            s.spawn(move || {
                let mut c = TcpStream::connect(("127.0.0.1", local)).unwrap();
                c.set_read_timeout(Some(CALL_TIMEOUT)).unwrap();
                let msg: Vec<u8> = (0..1000 + i * 5000).map(|j| (j % 251) as u8).collect();
                c.write_all(&msg).unwrap();
                // Our EOF must reach the server (it replies only then)...
                c.shutdown(Shutdown::Write).unwrap();
                let mut back = Vec::new();
                // ...and the server's close must reach us as EOF.
                c.read_to_end(&mut back).unwrap();
                let mut expected = msg;
                expected.reverse();
                assert!(back == expected, "connection {i} got other bytes");
            });
        }
    });
    server.join().unwrap();
    assert!(tunnel.failure().is_none(), "{:?}", tunnel.failure());
    assert!(!tunnel.is_closed());
    tunnel.close();
    assert!(tunnel.is_closed());
    // The local port is no longer served.
    assert!(TcpStream::connect(("127.0.0.1", local)).is_err());
}

#[test]
fn concurrent_bulk_transfers_share_one_session() {
    let server = serve(service());
    let tunnel =
        rpyc::ssh::SshTunnel::open(&sshd::shared().context(), "127.0.0.1", server.port).unwrap();
    let payload = Bytes::from(
        (0..16usize << 20)
            .map(|i| (i * 13 + 5) as u8)
            .collect::<Vec<u8>>(),
    );
    thread::scope(|s| {
        for i in 0..4 {
            let (payload, port) = (&payload, tunnel.local_port());
            s.spawn(move || {
                let conn = common::options()
                    .call_timeout(Duration::from_secs(60))
                    .connect("127.0.0.1", port)
                    .unwrap();
                for _ in 0..2 {
                    let back: Bytes = conn.root().call("echo", (payload,)).unwrap();
                    assert!(back == *payload, "connection {i} got other bytes back");
                }
                conn.close();
            });
        }
    });
    assert!(tunnel.failure().is_none(), "{:?}", tunnel.failure());
}
