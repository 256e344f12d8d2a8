//! TLS inside an SSH tunnel: mutual TLS end to end between client and server, carried by the
//! tunnel to a real sshd; the server's certificate is checked against the name given with
//! `server_hostname`, not the tunnel's local address.

mod common;
#[path = "common/sshd.rs"]
mod sshd;

use common::tls::{pki, serve_tls, server_options, whoami};
use rpyc::ssh::SshTunnel;
use rpyc::Bytes;

#[test]
fn mutual_tls_runs_inside_the_tunnel() {
    let p = pki();
    let server = serve_tls(whoami(), p.authenticator(), server_options);
    let ctx = sshd::shared().context();
    let tunnel = SshTunnel::open(&ctx, "127.0.0.1", server.port).expect("open the tunnel");
    // We dial the tunnel's local end; the certificate is for "localhost".
    let conn = p
        .client()
        .tls(p.tls().server_hostname("localhost"))
        .connect("127.0.0.1", tunnel.local_port())
        .expect("TLS through the tunnel");
    assert_eq!(
        conn.root().call::<String, _>("whoami", ()).unwrap(),
        "alice"
    );
    let big = Bytes::from((0..4 << 20).map(|i| i as u8).collect::<Vec<u8>>());
    let back: Bytes = conn.root().call("echo", (&big,)).unwrap();
    assert!(back == big);
    // The client verified the server itself, end to end, not the tunnel.
    assert_eq!(
        conn.peer_certificate().unwrap().common_name(),
        Some("localhost")
    );
    conn.close();
    tunnel.close();
}

#[test]
fn the_tunnel_does_not_weaken_tls_verification() {
    let p = pki();
    let server = serve_tls(whoami(), p.authenticator(), server_options);
    let ctx = sshd::shared().context();
    let tunnel = SshTunnel::open(&ctx, "127.0.0.1", server.port).expect("open the tunnel");
    // A client expecting another name refuses the server even though the tunnel is trusted.
    let err = p
        .client()
        .tls(p.tls().server_hostname("elsewhere.example"))
        .connect("127.0.0.1", tunnel.local_port())
        .unwrap_err();
    assert_eq!(
        common::tls_kind(&err),
        rpyc::TlsErrorKind::CertificateRejected,
        "{err}"
    );
    tunnel.close();
}

#[test]
fn one_builder_routes_tls_through_ssh() {
    let p = pki();
    let server = serve_tls(whoami(), p.authenticator(), server_options);
    // The tunnel goes to localhost as the SSH server sees it; TLS is verified against that
    // name, end to end.
    let conn = p
        .client()
        .ssh(sshd::shared().context())
        .connect("localhost", server.port)
        .expect("TLS through SSH");
    assert_eq!(
        conn.root().call::<String, _>("whoami", ()).unwrap(),
        "alice"
    );
    conn.close();
}
