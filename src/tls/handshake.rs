//! The TLS handshake under a deadline, on a socket that never blocks, and its failures
//! described in words a user can act on.

use super::config::{reasons, tls_error};
use super::session::Sock;
use crate::base::sys::{self, POLLIN, POLLOUT};
use crate::error::{Error, Timeout, TlsError, TlsErrorKind};
use openssl::ssl::{self, ErrorCode, Ssl, SslRef, SslStream};
use openssl::x509::X509VerifyResult;
use std::io;
use std::net::TcpStream;
use std::os::unix::io::AsRawFd;
use std::time::{Duration, Instant};

// The handshake and its failures

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    Client,
    Server,
}

pub(super) fn peer_of(s: &TcpStream) -> String {
    s.peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "tls peer".into())
}

pub(super) fn handshake(
    ssl: Ssl,
    tcp: TcpStream,
    side: Side,
    deadline: Instant,
    timeout: Duration,
    peer: &str,
    name: Option<&str>,
) -> Result<SslStream<Sock>, Error> {
    let fd = tcp.as_raw_fd();
    let sock = Sock::new(tcp);
    let mut s =
        SslStream::new(ssl, sock).map_err(|e| tls_error(TlsErrorKind::Other, reasons(&e)))?;
    loop {
        let r = match side {
            Side::Server => s.accept(),
            Side::Client => s.connect(),
        };
        let e = match r {
            Ok(()) => return Ok(s),
            Err(e) => e,
        };
        let events = match e.code() {
            ErrorCode::WANT_READ => POLLIN,
            ErrorCode::WANT_WRITE => POLLOUT,
            _ => {
                let why = describe(&e, s.ssl(), s.get_ref(), side, peer, name);
                if side == Side::Server {
                    // Let the client read our alert: closing with its data unread would reset
                    // the connection and the alert could be lost.
                    linger_close(&s.get_ref().tcp);
                }
                return Err(Error::Tls(why));
            }
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Error::Timeout(Timeout::Handshake(timeout)));
        }
        sys::wait_fd(fd, events, Some(left))?;
    }
}

/// Ends our side of a failed connection politely: signals the end of our data, then reads and
/// discards what the peer still sends, for at most a quarter of a second, so the peer reads
/// everything we sent (a TLS alert) instead of a reset.
pub(super) fn linger_close(tcp: &TcpStream) {
    let _ = tcp.shutdown(std::net::Shutdown::Write);
    let deadline = Instant::now() + Duration::from_millis(250);
    let mut buf = [0u8; 4096];
    // At most 256 KiB: a peer that keeps sending cannot hold this thread past the deadline.
    for _ in 0..64 {
        if Instant::now() >= deadline {
            return;
        }
        match sys::recv_nowait(tcp.as_raw_fd(), &mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() || sys::wait_fd(tcp.as_raw_fd(), POLLIN, Some(left)).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// What check failed on which side: its kind, and words a user can act on.
pub(super) fn describe(
    e: &ssl::Error,
    ssl: &SslRef,
    sock: &Sock,
    side: Side,
    peer: &str,
    name: Option<&str>,
) -> TlsError {
    use TlsErrorKind::*;
    let reasons: Vec<&str> = e
        .ssl_error()
        .map(|s| s.errors().iter().filter_map(|x| x.reason()).collect())
        .unwrap_or_default();
    let has = |s: &str| reasons.iter().any(|r| r.contains(s));
    let verify = ssl.verify_result();
    if side == Side::Client && sock.saw_plain_rpyc() {
        return TlsError::new(
            NotTls,
            format!(
                "{peer} speaks plain rpyc, not TLS: connect with rpyc::connect, or give the \
                 server an SslAuthenticator"
            ),
        );
    }
    if verify != X509VerifyResult::OK {
        let why = match side {
            Side::Client => format!(
                "this client rejected the server's certificate: {}{}",
                verify.error_string(),
                server_cert_hint(verify, name)
            ),
            Side::Server => format!(
                "this server rejected the client's certificate: {}{}",
                verify.error_string(),
                client_cert_hint(verify)
            ),
        };
        return TlsError::new(CertificateRejected, why);
    }
    if let Some(alert) = reasons.iter().find(|r| r.contains("alert")) {
        return match side {
            Side::Client => TlsError::new(
                alert_kind(alert),
                format!(
                    "the server refused the handshake ({alert}){}",
                    alert_hint_client(alert)
                ),
            ),
            Side::Server => TlsError::new(
                RejectedByPeer,
                format!("the client refused the handshake ({alert}): it does not accept this server's certificate or settings"),
            ),
        };
    }
    if has("peer did not return a certificate") || has("no certificate returned") {
        return TlsError::new(
            CertificateRequired,
            "the client sent no certificate, and this server requires one signed by its CA",
        );
    }
    if has("unsupported protocol") || has("no protocols available") {
        return TlsError::new(
            NoCommonParameters,
            format!(
                "no TLS version in common with {peer}: this {} accepts TLS 1.2 or later",
                side_name(side)
            ),
        );
    }
    if has("wrong version number") || has("packet length too long") || has("http request") {
        return TlsError::new(
            NotTls,
            format!(
                "{peer} does not speak TLS ({}): is it a plain rpyc {}?",
                reasons.join(", "),
                match side {
                    Side::Client => "server (use rpyc::connect)",
                    Side::Server => "client (use rpyc::ssl_connect)",
                }
            ),
        );
    }
    if has("no shared cipher") || has("no suitable signature algorithm") {
        return TlsError::new(
            NoCommonParameters,
            format!(
                "no cipher or signature algorithm in common with {peer} ({}): check the ciphers \
                 settings of both sides",
                reasons.join(", ")
            ),
        );
    }
    if reasons.is_empty() || has("unexpected eof") {
        let io = e.io_error().map(|i| format!(" ({i})")).unwrap_or_default();
        return TlsError::new(
            Closed,
            format!(
                "{peer} closed the connection during the TLS handshake{io}: is it a TLS {}, and \
                 does it accept us?",
                match side {
                    Side::Client => "server",
                    Side::Server => "client",
                }
            ),
        );
    }
    TlsError::new(
        Other,
        format!(
            "the TLS handshake with {peer} failed on the {} side: {}",
            side_name(side),
            reasons.join(", ")
        ),
    )
}

/// OpenSSL's X509_V_ERR_* codes this module explains (stable across OpenSSL versions).
pub(super) mod verify_code {
    pub const UNABLE_TO_GET_ISSUER_CERT: i32 = 2;
    pub const CERT_NOT_YET_VALID: i32 = 9;
    pub const CERT_HAS_EXPIRED: i32 = 10;
    pub const DEPTH_ZERO_SELF_SIGNED_CERT: i32 = 18;
    pub const SELF_SIGNED_CERT_IN_CHAIN: i32 = 19;
    pub const UNABLE_TO_GET_ISSUER_CERT_LOCALLY: i32 = 20;
    pub const UNABLE_TO_VERIFY_LEAF_SIGNATURE: i32 = 21;
    pub const HOSTNAME_MISMATCH: i32 = 62;
    pub const IP_ADDRESS_MISMATCH: i32 = 64;
}

pub(super) fn side_name(side: Side) -> &'static str {
    match side {
        Side::Client => "client",
        Side::Server => "server",
    }
}

pub(super) fn server_cert_hint(v: X509VerifyResult, name: Option<&str>) -> String {
    match v.as_raw() {
        verify_code::HOSTNAME_MISMATCH | verify_code::IP_ADDRESS_MISMATCH => format!(
            " (it is not issued for {:?}; connect with a name it carries, or set \
             server_hostname(...) to one)",
            name.unwrap_or("")
        ),
        verify_code::CERT_HAS_EXPIRED => {
            " (the server's certificate has expired: renew it, or check this machine's clock)"
                .into()
        }
        verify_code::CERT_NOT_YET_VALID => {
            " (the server's certificate is not valid yet: check both machines' clocks)".into()
        }
        verify_code::UNABLE_TO_GET_ISSUER_CERT_LOCALLY
        | verify_code::UNABLE_TO_GET_ISSUER_CERT
        | verify_code::SELF_SIGNED_CERT_IN_CHAIN
        | verify_code::DEPTH_ZERO_SELF_SIGNED_CERT
        | verify_code::UNABLE_TO_VERIFY_LEAF_SIGNATURE => {
            " (it is not signed by a CA this client trusts: to trust the CA that signed it, \
             connect with rpyc::Options::new().tls(rpyc::tls::SslClient::new().ca_certs(\"ca.pem\")\
             .keyfile(..).certfile(..)).connect(host, port), as RPyC's ca_certs; or give the \
             server its full chain)"
                .into()
        }
        _ => String::new(),
    }
}

pub(super) fn client_cert_hint(v: X509VerifyResult) -> String {
    match v.as_raw() {
        verify_code::CERT_HAS_EXPIRED => " (the client's certificate has expired)".into(),
        verify_code::CERT_NOT_YET_VALID => " (the client's certificate is not valid yet)".into(),
        verify_code::UNABLE_TO_GET_ISSUER_CERT_LOCALLY
        | verify_code::UNABLE_TO_GET_ISSUER_CERT
        | verify_code::SELF_SIGNED_CERT_IN_CHAIN
        | verify_code::DEPTH_ZERO_SELF_SIGNED_CERT
        | verify_code::UNABLE_TO_VERIFY_LEAF_SIGNATURE => {
            " (it is not signed by this server's CA)".into()
        }
        _ => String::new(),
    }
}

/// What a TLS alert from the server says, as a kind (the same cases as [`alert_hint_client`]).
pub(super) fn alert_kind(alert: &str) -> TlsErrorKind {
    if alert.contains("certificate required") {
        TlsErrorKind::CertificateRequired
    } else if alert.contains("protocol version") || alert.contains("handshake failure") {
        TlsErrorKind::NoCommonParameters
    } else {
        TlsErrorKind::RejectedByPeer
    }
}

pub(super) fn alert_hint_client(alert: &str) -> &'static str {
    if alert.contains("certificate required") {
        ": it requires a client certificate; pass keyfile and certfile to ssl_connect, or to \
         SslClient::keyfile and SslClient::certfile"
    } else if alert.contains("unknown ca") {
        ": it does not trust the CA that signed our client certificate"
    } else if alert.contains("certificate expired") {
        ": our client certificate has expired"
    } else if alert.contains("bad certificate") || alert.contains("certificate unknown") {
        ": it rejected our client certificate (expired, not yet valid, or from another CA)"
    } else if alert.contains("protocol version") {
        ": no TLS version in common; the server needs a newer TLS version"
    } else if alert.contains("handshake failure") {
        ": no cipher or signature algorithm in common"
    } else {
        ""
    }
}
