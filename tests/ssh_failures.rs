//! SSH failures reach the caller promptly as errors of the right kind, with hints: sshd
//! unreachable, silent or not sshd at all, authentication refused, nothing listening on the
//! remote port, forwarding refused, the session lost.

mod common;
#[path = "common/sshd.rs"]
mod sshd;

use common::ssh_error;
use rpyc::{Error, SshContext, SshErrorKind, Timeout};
use std::io::Write;
use std::net::TcpListener;
use std::time::{Duration, Instant};

#[test]
fn unreachable_sshd_fails_at_once_with_a_connect_error() {
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let ctx = sshd::shared().context().port(port);
    let t = Instant::now();
    let err = rpyc::ssh_connect(&ctx, 1).unwrap_err();
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "took {:?}",
        t.elapsed()
    );
    match &err {
        Error::Connect { addr, .. } => assert!(addr.contains(&port.to_string()), "{addr}"),
        other => panic!("expected Error::Connect, got {other:?}"),
    }
    assert!(err.to_string().contains("sshd"), "{err}");
}

#[test]
fn silent_sshd_fails_with_a_connect_timeout() {
    // Accepts the TCP connection but never says a word.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let ctx = sshd::shared()
        .context()
        .port(port)
        .connect_timeout(Duration::from_millis(500));
    let t = Instant::now();
    let err = rpyc::ssh_connect(&ctx, 1).unwrap_err();
    let took = t.elapsed();
    assert!(
        matches!(err, Error::Timeout(Timeout::Connect(d)) if d == Duration::from_millis(500)),
        "{err:?}"
    );
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(3),
        "took {took:?}"
    );
    drop(l);
}

#[test]
fn a_port_that_is_not_sshd_fails_the_ssh_handshake() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let fake = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
    });
    let ctx = SshContext::new("127.0.0.1")
        .port(port)
        .config_file("/dev/null")
        .agent(false)
        .connect_timeout(Duration::from_secs(5));
    let t = Instant::now();
    let err = rpyc::ssh_connect(&ctx, 1).unwrap_err();
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "took {:?}",
        t.elapsed()
    );
    fake.join().unwrap();
    let e = ssh_error(&err);
    assert_eq!(e.kind(), SshErrorKind::Handshake, "{e}");
    assert!(
        e.message()
            .contains(&format!("handshake with 127.0.0.1:{port} failed")),
        "{e}"
    );
}

#[test]
fn refused_key_is_reported_with_user_host_and_what_was_tried() {
    let d = sshd::shared();
    let ctx = d.context().keyfile(&d.stranger_key);
    let t = Instant::now();
    let err = rpyc::ssh_connect(&ctx, 1).unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(5));
    let e = ssh_error(&err);
    assert_eq!(e.kind(), SshErrorKind::AuthenticationFailed, "{e}");
    let m = e.message();
    assert!(m.contains(&format!("authentication as {}", d.user)), "{m}");
    assert!(m.contains(&format!("127.0.0.1:{}", d.port)), "{m}");
    assert!(m.contains("id_stranger (refused)"), "{m}");
    assert!(m.contains("publickey"), "{m}");
}

#[test]
fn nothing_listening_on_the_remote_port_is_reported_as_such() {
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let t = Instant::now();
    let err = common::options()
        .ssh(sshd::shared().context().clone())
        .connect("127.0.0.1", port)
        .unwrap_err();
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
    let e = ssh_error(&err);
    assert_eq!(e.kind(), SshErrorKind::TargetUnreachable, "{e}");
    assert!(
        e.message()
            .contains(&format!("is anything listening on 127.0.0.1:{port}")),
        "{e}"
    );
}

#[test]
fn forwarding_refused_by_the_server_is_reported_as_such() {
    let d = sshd::Sshd::start(sshd::SshdConfig {
        allow_tcp_forwarding: false,
        ..Default::default()
    });
    let server = common::serve(rpyc::Service::new("svc").method("add", |a: i64, b: i64| a + b));
    let t = Instant::now();
    let err = common::options()
        .ssh(d.context().clone())
        .connect("127.0.0.1", server.port)
        .unwrap_err();
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
    let e = ssh_error(&err);
    assert_eq!(e.kind(), SshErrorKind::ForwardingRefused, "{e}");
    assert!(e.message().contains("AllowTcpForwarding"), "{e}");
    // The tunnel on its own: the local connection is closed, the failure says why, and the
    // session stays usable for the next try.
    let tunnel = rpyc::ssh::SshTunnel::open(&d.context(), "127.0.0.1", server.port).unwrap();
    for _ in 0..2 {
        let mut c = std::net::TcpStream::connect(("127.0.0.1", tunnel.local_port())).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 16];
        use std::io::Read;
        assert_eq!(
            c.read(&mut buf).unwrap_or(0),
            0,
            "expected the end of the stream"
        );
    }
    assert_eq!(
        tunnel.failure().map(|e| e.kind()),
        Some(SshErrorKind::ForwardingRefused)
    );
    assert!(!tunnel.is_closed());
}

#[test]
fn a_tunnel_whose_sshd_dies_reports_the_session_lost() {
    let d = sshd::Sshd::start(sshd::SshdConfig::default());
    let tunnel = rpyc::ssh::SshTunnel::open(&d.context(), "127.0.0.1", 1).unwrap();
    assert!(tunnel.failure().is_none());
    d.kill();
    assert!(
        common::wait_until(Duration::from_secs(5), || tunnel.is_closed()),
        "the tunnel did not notice"
    );
    let e = tunnel.failure().expect("the tunnel says why it ended");
    assert_eq!(e.kind(), SshErrorKind::SessionLost, "{e}");
    assert!(e.message().contains("closed by the other side"), "{e}");
}
