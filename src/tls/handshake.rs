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
pub(super) enum Side {
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
fn linger_close(tcp: &TcpStream) {
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
            Err(_) => return,
        }
    }
}

/// What check failed on which side: its kind, and words a user can act on.
fn describe(
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
            Side::Client => {
                let wanted = sock.certificate_requested() && ssl.certificate().is_none();
                let (kind, hint) = server_alert(alert, wanted);
                TlsError::new(
                    kind,
                    format!("the server refused the handshake ({alert}){hint}"),
                )
            }
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
mod verify_code {
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

fn server_cert_hint(v: X509VerifyResult, name: Option<&str>) -> String {
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

fn client_cert_hint(v: X509VerifyResult) -> String {
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

/// What a TLS alert from the server means for this client: its kind, and a hint for the
/// message. `certificate_wanted`: the server asked for a client certificate and this client has
/// none. A TLS 1.2 server that requires one answers its absence with "handshake failure" (the
/// "certificate required" alert is TLS 1.3's), the alert it also sends when no cipher is in
/// common.
pub(super) fn server_alert(alert: &str, certificate_wanted: bool) -> (TlsErrorKind, &'static str) {
    use TlsErrorKind::*;
    let handshake_failure = alert.contains("handshake failure");
    if alert.contains("certificate required") || (handshake_failure && certificate_wanted) {
        (
            CertificateRequired,
            ": it requires a client certificate; pass keyfile and certfile to ssl_connect, or \
             to SslClient::keyfile and SslClient::certfile",
        )
    } else if alert.contains("unknown ca") {
        (
            RejectedByPeer,
            ": it does not trust the CA that signed our client certificate",
        )
    } else if alert.contains("certificate expired") {
        (RejectedByPeer, ": our client certificate has expired")
    } else if alert.contains("bad certificate") || alert.contains("certificate unknown") {
        (
            RejectedByPeer,
            ": it rejected our client certificate (expired, not yet valid, or from another CA)",
        )
    } else if alert.contains("protocol version") {
        (
            NoCommonParameters,
            ": no TLS version in common; the server needs a newer TLS version",
        )
    } else if handshake_failure {
        (
            NoCommonParameters,
            ": no cipher or signature algorithm in common",
        )
    } else {
        (RejectedByPeer, "")
    }
}

/// Follows the handshake messages a peer sends in the clear (all of TLS 1.2's before its
/// ChangeCipherSpec; TLS 1.3 encrypts all but the ServerHello), to learn whether a server asked
/// for a client certificate (see [`server_alert`]). Stops at the first record that is not a
/// handshake record, or at the end of the server's first flight.
#[derive(Default)]
pub(super) struct ClearHandshake {
    record_head: [u8; 5],
    record_got: usize,
    /// What is left of the current record's body.
    record_left: usize,
    message_head: [u8; 4],
    message_got: usize,
    /// What is left of the current message's body.
    message_left: usize,
    done: bool,
    certificate_requested: bool,
}

impl ClearHandshake {
    const HANDSHAKE_RECORD: u8 = 22;
    const CERTIFICATE_REQUEST: u8 = 13;
    const SERVER_HELLO_DONE: u8 = 14;

    /// Whether the peer sent a CertificateRequest.
    pub(super) fn certificate_requested(&self) -> bool {
        self.certificate_requested
    }

    /// Takes the next bytes the peer sent.
    pub(super) fn feed(&mut self, mut bytes: &[u8]) {
        while !self.done && !bytes.is_empty() {
            if self.record_left == 0 {
                if fill(&mut self.record_head, &mut self.record_got, &mut bytes) {
                    let h = self.record_head;
                    self.record_got = 0;
                    self.record_left = usize::from(u16::from_be_bytes([h[3], h[4]]));
                    self.done = h[0] != Self::HANDSHAKE_RECORD;
                }
            } else {
                let (body, rest) = bytes.split_at(self.record_left.min(bytes.len()));
                self.record_left -= body.len();
                bytes = rest;
                self.messages(body);
            }
        }
    }

    /// Follows the handshake messages in (part of) a record's body.
    fn messages(&mut self, mut body: &[u8]) {
        while !self.done && !body.is_empty() {
            if self.message_left == 0 {
                if fill(&mut self.message_head, &mut self.message_got, &mut body) {
                    let h = self.message_head;
                    self.message_got = 0;
                    self.message_left = u32::from_be_bytes([0, h[1], h[2], h[3]]) as usize;
                    self.certificate_requested |= h[0] == Self::CERTIFICATE_REQUEST;
                    self.done = self.certificate_requested || h[0] == Self::SERVER_HELLO_DONE;
                }
            } else {
                let n = self.message_left.min(body.len());
                self.message_left -= n;
                body = &body[n..];
            }
        }
    }
}

/// Moves bytes from the front of `src` into `head` (of which `got` are in); returns whether it
/// is full.
fn fill<const N: usize>(head: &mut [u8; N], got: &mut usize, src: &mut &[u8]) -> bool {
    let k = (N - *got).min(src.len());
    head[*got..*got + k].copy_from_slice(&src[..k]);
    *got += k;
    *src = &src[k..];
    *got == N
}

#[cfg(test)]
mod tests {
    use super::ClearHandshake;

    fn record(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut r = vec![kind, 3, 3];
        r.extend_from_slice(&(body.len() as u16).to_be_bytes());
        r.extend_from_slice(body);
        r
    }

    fn message(kind: u8, len: usize) -> Vec<u8> {
        let mut m = vec![kind];
        m.extend_from_slice(&(len as u32).to_be_bytes()[1..]);
        m.extend(std::iter::repeat(0xee).take(len));
        m
    }

    /// A TLS 1.2 server's first flight, with or without a CertificateRequest, its messages
    /// split across records (one starts in a record and ends in the next).
    fn flight(request: bool) -> Vec<u8> {
        let mut msgs = [message(2, 70), message(11, 900), message(12, 300)].concat();
        if request {
            msgs.extend(message(13, 40));
        }
        msgs.extend(message(14, 0));
        let mut bytes = record(22, &msgs[..500]);
        bytes.extend(record(22, &msgs[500..]));
        bytes
    }

    fn scan(bytes: &[u8], chunk: usize) -> bool {
        let mut c = ClearHandshake::default();
        for part in bytes.chunks(chunk) {
            c.feed(part);
        }
        c.certificate_requested()
    }

    #[test]
    fn sees_a_certificate_request_however_the_bytes_arrive() {
        for chunk in [1, 3, 4, 5, 7, 500, 4096] {
            assert!(scan(&flight(true), chunk), "chunk {chunk}");
            assert!(!scan(&flight(false), chunk), "chunk {chunk}");
        }
    }

    #[test]
    fn stops_at_the_first_record_that_is_not_a_handshake() {
        // A CertificateRequest after the ChangeCipherSpec would be encrypted: never read.
        let mut bytes = record(22, &message(2, 70));
        bytes.extend(record(20, &[1]));
        bytes.extend(record(22, &message(13, 40)));
        assert!(!scan(&bytes, 4096));
        // A plain rpyc hello is no TLS at all.
        assert!(!scan(b"RPYC\0\x01\0\0\0\x10\0\0\0\0\x10\0", 4096));
    }
}
