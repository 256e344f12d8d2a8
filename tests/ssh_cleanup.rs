//! Closing a tunneled connection stops the tunnel: its thread ends, and every socket it held
//! (listener, SSH session, local ends, and through the closed channels the server's accepted
//! sockets) is closed. (Its own test binary with one test, so no other test's threads or
//! sockets count.)

mod common;
#[path = "common/sshd.rs"]
mod sshd;

use common::procfs::thread_names;
use rpyc::Service;
use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

fn open_fds() -> Vec<String> {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .map(|e| {
            std::fs::read_link(e.path())
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        })
        .collect()
}

#[test]
fn closing_the_connection_stops_the_tunnel_and_frees_its_threads_and_sockets() {
    let d = sshd::shared();
    let server = common::serve(
        Service::new("svc")
            .method("add", |a: i64, b: i64| a + b)
            .method("echo", |b: rpyc::Bytes| b),
    );
    // Warm up whatever the process keeps open once (e.g. libssh2/OpenSSL state).
    rpyc::ssh_connect(&d.context(), server.port)
        .unwrap()
        .close();
    std::thread::sleep(Duration::from_millis(200));
    let threads_before = thread_names();
    let fds_before = open_fds();

    let conn = common::options()
        .ssh(d.context().clone())
        .connect("127.0.0.1", server.port)
        .unwrap();
    assert_eq!(conn.root().call::<i64, _>("add", (1, 2)).unwrap(), 3);
    let big = rpyc::Bytes::from(vec![1u8; 4 << 20]);
    assert_eq!(
        conn.root()
            .call::<rpyc::Bytes, _>("echo", (&big,))
            .unwrap()
            .len(),
        4 << 20
    );
    // A standalone tunnel with several connections open, one of them mid-stream.
    let tunnel = rpyc::ssh::SshTunnel::open(&d.context(), "127.0.0.1", server.port).unwrap();
    let mut raw: Vec<TcpStream> = (0..4)
        .map(|_| TcpStream::connect(("127.0.0.1", tunnel.local_port())).unwrap())
        .collect();
    raw[0].write_all(&[0u8; 1000]).unwrap();
    // (A new thread names itself once it runs, so wait for the name.)
    assert!(
        common::wait_until(Duration::from_secs(5), || {
            thread_names()
                .iter()
                .filter(|n| *n == "rpyc-ssh-tunnel")
                .count()
                == 2
        }),
        "{:?}",
        thread_names()
    );

    conn.close();
    drop(conn); // the connection's own socket is freed with its last handle
    tunnel.close();
    assert!(tunnel.is_closed());
    // The tunnel's local ends are closed: our raw sockets see the end of their streams.
    // (The server may have sent its handshake first; a socket closed with unread input is
    // reset rather than ended.)
    for s in &mut raw {
        common::wait_for_hang_up(s);
    }
    drop(raw);
    drop(tunnel);

    let ok = common::wait_until(Duration::from_secs(5), || {
        thread_names().len() <= threads_before.len() && open_fds().len() <= fds_before.len()
    });
    assert!(
        ok,
        "left behind:\nthreads {:?}\n  (before {:?})\nfds {:?}\n  (before {:?})",
        thread_names(),
        threads_before,
        open_fds(),
        fds_before
    );
    assert!(!thread_names().iter().any(|n| n == "rpyc-ssh-tunnel"));

    // Dropping the last handle, without close(), stops the tunnel too.
    let conn = common::options()
        .ssh(d.context().clone())
        .connect("127.0.0.1", server.port)
        .unwrap();
    assert_eq!(conn.root().call::<i64, _>("add", (1, 2)).unwrap(), 3);
    drop(conn);
    assert!(
        common::wait_until(Duration::from_secs(5), || {
            thread_names().len() <= threads_before.len() && open_fds().len() <= fds_before.len()
        }),
        "left behind after drop: {:?} {:?}",
        thread_names(),
        open_fds()
    );
}
