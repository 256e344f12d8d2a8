//! The crate's one error type.

use std::fmt;
use std::io;
use std::sync::Arc;
use std::time::Duration;

/// Everything that can go wrong in this crate.
///
/// Errors that come from the peer's handler ([`Error::Remote`]) leave the connection usable; so do
/// [`Error::Timeout`] for a call, [`Error::Encode`], [`Error::Decode`] and [`Error::TooLarge`].
/// [`Error::Closed`] means the connection is gone and every later call fails fast with it.
///
/// ```
/// let err = rpyc::Error::Closed { reason: "closed by peer".into() };
/// assert!(err.to_string().contains("closed by peer"));
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Error {
    /// Could not reach the peer: resolving, connecting or binding failed.
    Connect {
        /// What we tried to reach, e.g. `127.0.0.1:18861` or a socket path.
        addr: String,
        /// The operating system's error.
        source: Arc<io::Error>,
    },
    /// The peer is not an rpyc peer, speaks another protocol version, or refused us during the
    /// handshake.
    Handshake(String),
    /// An operation did not finish in time; says which one.
    Timeout(Timeout),
    /// The connection is closed; `reason` says who closed it and why.
    Closed {
        /// Who closed the connection and why.
        reason: String,
    },
    /// The peer's handler failed, panicked, or did not exist; the connection stays usable.
    Remote(RemoteError),
    /// A value could not be encoded for sending (a local error: nothing was sent).
    Encode(String),
    /// A received value did not decode into the type the caller asked for.
    Decode(String),
    /// A message is larger than the receiving side accepts (nothing was sent).
    TooLarge {
        /// Size of the encoded message in bytes.
        size: usize,
        /// The limit the receiver announced in the handshake.
        limit: usize,
    },
    /// The peer broke the wire protocol (garbage, an unknown message type, ...); the connection
    /// is closed.
    Protocol(String),
    /// A TLS failure: a key or certificate that does not load, or a handshake one side refused.
    /// Says which check failed on which side, and what to do about it.
    Tls(String),
    /// An SSH failure: the session, authentication, the host key, or a forwarded channel.
    Ssh(String),
    /// A local I/O failure outside a connection (spawning a process, binding a server, ...).
    Io(Arc<io::Error>),
    /// The API was used in a way that cannot work (settings that do not go together, such as
    /// TLS for a Unix socket); the message says what to change. Nothing was sent.
    Misuse(String),
}

/// Which operation timed out (see [`Error::Timeout`]).
///
/// ```
/// let t = rpyc::Timeout::Connect(std::time::Duration::from_secs(3));
/// assert_eq!(t.to_string(), "connect timed out after 3s");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Timeout {
    /// Establishing the transport (TCP connect) took too long.
    Connect(Duration),
    /// The peer did not complete the rpyc handshake in time.
    Handshake(Duration),
    /// A call got no reply in time; names the method.
    Call {
        /// The call: `root.method` for a method of the peer's root service, `object#ID.method`
        /// for one of another remote object (the caller only knows the object by its id).
        method: String,
        /// The timeout that expired.
        after: Duration,
    },
    /// A call could not be sent in time: the peer is not reading what this side sends (or
    /// another thread's frame to it has been stuck that long). Only this call failed; if
    /// `partly`, the rest of its frame is still sent in the background (and its reply, if it
    /// comes, is dropped), otherwise nothing of it was sent.
    Send {
        /// The call, named as in [`Timeout::Call`].
        method: String,
        /// The timeout that expired.
        after: Duration,
        /// Whether part of the call had been sent.
        partly: bool,
    },
}

/// What kind of failure a [`RemoteError`] reports.
///
/// ```
/// assert_eq!(rpyc::RemoteErrorKind::Panic.to_string(), "handler panicked");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RemoteErrorKind {
    /// The handler returned `Err`.
    Handler,
    /// The handler panicked; the panic was caught on the peer.
    Panic,
    /// The service or object has no method of that name.
    NoSuchMethod,
    /// The arguments did not match the method's parameters (count or types).
    BadArguments,
    /// The object id is unknown on that connection (released, forged, or another connection's).
    NoSuchObject,
    /// The peer could not encode the handler's result.
    BadResult,
    /// The peer is closing and did not run the call.
    Closing,
}

impl RemoteErrorKind {
    pub(crate) fn code(self) -> u8 {
        match self {
            RemoteErrorKind::Handler => 1,
            RemoteErrorKind::Panic => 2,
            RemoteErrorKind::NoSuchMethod => 3,
            RemoteErrorKind::BadArguments => 4,
            RemoteErrorKind::NoSuchObject => 5,
            RemoteErrorKind::BadResult => 6,
            RemoteErrorKind::Closing => 7,
        }
    }

    pub(crate) fn from_code(code: u8) -> RemoteErrorKind {
        match code {
            2 => RemoteErrorKind::Panic,
            3 => RemoteErrorKind::NoSuchMethod,
            4 => RemoteErrorKind::BadArguments,
            5 => RemoteErrorKind::NoSuchObject,
            6 => RemoteErrorKind::BadResult,
            7 => RemoteErrorKind::Closing,
            _ => RemoteErrorKind::Handler,
        }
    }
}

impl fmt::Display for RemoteErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RemoteErrorKind::Handler => "handler returned an error",
            RemoteErrorKind::Panic => "handler panicked",
            RemoteErrorKind::NoSuchMethod => "no such method",
            RemoteErrorKind::BadArguments => "bad arguments",
            RemoteErrorKind::NoSuchObject => "no such object",
            RemoteErrorKind::BadResult => "result could not be encoded",
            RemoteErrorKind::Closing => "peer is closing",
        })
    }
}

/// A failure reported by the peer for one call: which service and method, what kind, and the
/// message. The connection stays usable.
///
/// ```
/// # let (server, port) = rpyc::testing::example_server()?;
/// # let conn = rpyc::connect("127.0.0.1", port)?;
/// match conn.root().call::<f64, _>("div", (1.0, 0.0)) {
///     Err(rpyc::Error::Remote(e)) => println!("{} failed: {}", e.method(), e.message()),
///     other => println!("{other:?}"),
/// }
/// # Ok::<(), rpyc::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteError {
    pub(crate) kind: RemoteErrorKind,
    pub(crate) service: String,
    pub(crate) method: String,
    pub(crate) message: String,
}

impl RemoteError {
    /// What kind of failure this is.
    pub fn kind(&self) -> RemoteErrorKind {
        self.kind
    }
    /// Name of the service or object type the method belongs to.
    pub fn service(&self) -> &str {
        &self.service
    }
    /// Name of the method that was called.
    pub fn method(&self) -> &str {
        &self.method
    }
    /// The handler's error message, the panic message, or a description of the mismatch.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for RemoteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "remote {}.{}: {}: {}",
            self.service, self.method, self.kind, self.message
        )
    }
}

impl fmt::Display for Timeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Timeout::Connect(d) => write!(f, "connect timed out after {d:?}"),
            Timeout::Handshake(d) => write!(f, "handshake timed out after {d:?}"),
            Timeout::Call { method, after } => {
                write!(f, "call to {method} got no reply within {after:?}")
            }
            Timeout::Send {
                method,
                after,
                partly: false,
            } => write!(
                f,
                "call to {method} could not be sent within {after:?}: the peer is not reading \
                 what this side sends (nothing of the call was sent)"
            ),
            Timeout::Send {
                method,
                after,
                partly: true,
            } => write!(
                f,
                "call to {method} could not be sent within {after:?}: the peer is not reading \
                 what this side sends (the rest of the call is still being sent; its reply \
                 will be dropped)"
            ),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Connect { addr, source } => write!(f, "cannot connect to {addr}: {source}"),
            Error::Handshake(why) => write!(f, "handshake failed: {why}"),
            Error::Timeout(t) => t.fmt(f),
            Error::Closed { reason } => write!(f, "connection closed: {reason}"),
            Error::Remote(e) => e.fmt(f),
            Error::Encode(why) => write!(f, "cannot encode value: {why}"),
            Error::Decode(why) => write!(f, "cannot decode value: {why}"),
            Error::TooLarge { size, limit } => write!(
                f,
                "message of {size} bytes exceeds the peer's limit of {limit} bytes; \
                 raise Options::max_frame_size on the receiving side or send less"
            ),
            Error::Protocol(why) => write!(f, "protocol violation: {why}"),
            Error::Tls(why) => write!(f, "TLS: {why}"),
            Error::Ssh(why) => write!(f, "SSH: {why}"),
            Error::Io(e) => write!(f, "I/O error: {e}"),
            Error::Misuse(why) => write!(f, "misuse of rpyc: {why}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Connect { source, .. } => Some(&**source),
            Error::Io(e) => Some(&**e),
            Error::Remote(e) => Some(e),
            _ => None,
        }
    }
}

impl std::error::Error for RemoteError {}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Error {
        Error::Io(Arc::new(e))
    }
}

/// Lets handlers use `?` on calls they make themselves: the error travels to their caller as a
/// message.
impl serde::Serialize for Error {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}
