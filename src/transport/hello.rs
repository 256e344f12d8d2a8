//! The rpyc handshake on a fresh transport: both hellos exchanged under one deadline.

use crate::error::{Error, HandshakeError, HandshakeErrorKind};
use crate::transport::Sink;
use crate::wire::{Hello, HELLO_LEN};
use std::io::{self, Read};
use std::time::{Duration, Instant};

/// Sends our hello (but its first `sent` bytes, already written) and reads the peer's, both
/// before `deadline`. Both sides send first, so neither waits on the other. `set_read_timeout` bounds each read by the time left (an error
/// from it means the transport cannot time out a read: then whoever called this bounds the
/// whole exchange some other way, e.g. by shutting the transport down), so a peer that
/// dribbles its hello a byte at a time is dropped at the deadline like a silent one.
pub(crate) fn exchange_hello(
    r: &mut dyn Read,
    w: &mut dyn Sink,
    ours: Hello,
    sent: usize,
    deadline: Instant,
    set_read_timeout: &dyn Fn(Option<Duration>) -> io::Result<()>,
) -> Result<Hello, Error> {
    // Mapped to a handshake timeout by the caller, which knows the duration.
    let timed_out = || Error::Timeout(crate::error::Timeout::Handshake(Default::default()));
    let io_err = |e: io::Error, when: &str| -> Error {
        if matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ) {
            timed_out()
        } else if e.kind() == io::ErrorKind::UnexpectedEof {
            Error::Handshake(HandshakeError::new(
                HandshakeErrorKind::Closed,
                format!(
                    "the peer closed the connection {when} (is it an rpyc peer? a server at its \
                     connection limit or one that rejected us closes this way)"
                ),
            ))
        } else {
            Error::Handshake(HandshakeError::new(
                HandshakeErrorKind::Io,
                format!("I/O error {when}: {e}"),
            ))
        }
    };
    let hello = ours.encode();
    let mut sent = sent.min(HELLO_LEN);
    while sent < HELLO_LEN {
        match w.send(&hello[sent..], Some(deadline)) {
            Ok(0) => return Err(timed_out()),
            Ok(n) => sent += n,
            Err(e) => return Err(io_err(e, "while we sent our hello")),
        }
    }
    let mut b = [0u8; HELLO_LEN];
    let mut got = 0;
    while got < HELLO_LEN {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(timed_out());
        }
        let _ = set_read_timeout(Some(left));
        match r.read(&mut b[got..]) {
            Ok(0) => {
                return Err(io_err(
                    io::ErrorKind::UnexpectedEof.into(),
                    "before sending its hello",
                ))
            }
            Ok(n) => {
                got += n;
                // A Python RPyC client sends a 14-byte frame and waits: tell it at once.
                if let Some(e) = crate::wire::python_rpyc(&b[..got]) {
                    return Err(e);
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(io_err(e, "before sending its hello")),
        }
    }
    Hello::decode(&b)
}
