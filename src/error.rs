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
    /// Could not reach the peer, or a server could not listen: resolving, connecting or
    /// binding an address failed (for binding, `addr` ends in `(bind)`).
    Connect {
        /// What we tried to reach, e.g. `127.0.0.1:18861` or a socket path.
        addr: String,
        /// The operating system's error.
        source: Arc<io::Error>,
    },
    /// The rpyc handshake failed: the peer is not an rpyc peer, speaks another protocol
    /// version, or refused us; [`HandshakeError::kind`] says which.
    Handshake(HandshakeError),
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
    /// Says which check failed on which side, and what to do about it; [`TlsError::kind`] says
    /// it to a program.
    Tls(TlsError),
    /// An SSH failure: the session, authentication, the host key, or a forwarded channel;
    /// [`SshError::kind`] says which.
    Ssh(SshError),
    /// A local I/O failure outside a connection: spawning a process or a thread, writing a file,
    /// ... (a server that cannot bind its address fails with [`Error::Connect`]).
    Io(Arc<io::Error>),
    /// The API was used in a way that cannot work (settings that do not go together, such as
    /// TLS for a Unix socket); the message says what to change. Nothing was sent.
    Misuse(String),
    /// A Python RPyC peer raised an exception (see [`crate::python`]); the connection stays
    /// usable.
    Python(PythonError),
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
            Error::Handshake(e) => write!(f, "handshake failed: {e}"),
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
            Error::Tls(e) => write!(f, "TLS: {e}"),
            Error::Ssh(e) => write!(f, "SSH: {e}"),
            Error::Io(e) => write!(f, "I/O error: {e}"),
            Error::Misuse(why) => write!(f, "misuse of rpyc: {why}"),
            Error::Python(e) => write!(f, "Python raised {e}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Connect { source, .. } => Some(&**source),
            Error::Io(e) => Some(&**e),
            Error::Remote(e) => Some(e),
            Error::Python(e) => Some(e),
            _ => None,
        }
    }
}

impl std::error::Error for RemoteError {}

/// An exception a Python RPyC peer raised ([`Error::Python`]), or one a Rust handler raises
/// for a Python caller: its class (`builtins.ValueError`, `__main__.DemoError`), its arguments,
/// its public attributes and the traceback text of where it was raised. The arguments and
/// attributes are [`python::Value`](crate::python::Value)s, read with `args()` and `attrs()`.
///
/// ```
/// let e = rpyc::PythonError::new("ValueError", ("bad value: 42",));
/// assert_eq!(e.qualified_name(), "builtins.ValueError");
/// assert_eq!(e.message(), "bad value: 42");
/// assert_eq!(e.to_string(), "builtins.ValueError: bad value: 42");
/// ```
#[derive(Clone)]
pub struct PythonError {
    pub(crate) module: String,
    pub(crate) class: String,
    pub(crate) message: String,
    pub(crate) traceback: String,
    /// The arguments and attributes, as the python layer's values (kept opaque here so this
    /// module stays at the bottom of the crate).
    pub(crate) data: Arc<dyn std::any::Any + Send + Sync>,
}

impl PythonError {
    /// The module of the exception's class: `builtins` for Python's own exceptions.
    pub fn module(&self) -> &str {
        &self.module
    }
    /// The class name: `ValueError`, `KeyError`, ...
    pub fn class(&self) -> &str {
        &self.class
    }
    /// `module.Class`, as Python names it in a traceback.
    pub fn qualified_name(&self) -> String {
        format!("{}.{}", self.module, self.class)
    }
    /// What Python's `str()` of the exception gives: its one argument, or the tuple of them.
    pub fn message(&self) -> &str {
        &self.message
    }
    /// The traceback text of where the exception was raised (Python's "Remote Traceback"), or
    /// `<traceback denied>` if the peer hides it.
    pub fn traceback(&self) -> &str {
        &self.traceback
    }
    /// Whether this is `builtins.<class>` (Python's own exception of that name).
    pub fn is(&self, class: &str) -> bool {
        self.module == "builtins" && self.class == class
    }
}

impl fmt::Debug for PythonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PythonError")
            .field("class", &self.qualified_name())
            .field("message", &self.message)
            .field("traceback", &self.traceback)
            .finish()
    }
}

impl fmt::Display for PythonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.module, self.class)?;
        if !self.message.is_empty() {
            write!(f, ": {}", self.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for PythonError {}

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

// The kinds of TLS, SSH and handshake failures: a program matches on `kind()`, a person reads
// the message (which says what to do about it).

/// The shared part of [`TlsError`], [`SshError`] and [`HandshakeError`]: built from a kind and
/// a message, read back with `kind()` and `message()`, shown as the message, and carried by
/// the [`Error`] variant of the same name.
macro_rules! kinded_error {
    ($error:ident, $kind:ident, $variant:ident) => {
        impl $error {
            pub(crate) fn new(kind: $kind, message: impl Into<String>) -> $error {
                $error {
                    kind,
                    message: message.into(),
                }
            }
            /// What kind of failure this is.
            pub fn kind(&self) -> $kind {
                self.kind
            }
            /// What failed, and what to do about it (the text of `Display`).
            pub fn message(&self) -> &str {
                &self.message
            }
        }

        impl fmt::Display for $error {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.message)
            }
        }

        impl std::error::Error for $error {}

        impl From<$error> for Error {
            fn from(e: $error) -> Error {
                Error::$variant(e)
            }
        }
    };
}

/// What kind of failure a [`TlsError`] reports.
///
/// ```
/// assert_eq!(
///     rpyc::TlsErrorKind::CertificateRejected.to_string(),
///     "the peer's certificate was rejected"
/// );
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TlsErrorKind {
    /// A key, certificate or CA file is missing, unreadable, not PEM, encrypted without its
    /// passphrase or with another, or does not match; or a version or cipher setting is unusable.
    Config,
    /// This side rejected the peer's certificate: untrusted issuer, expired, not yet valid, or
    /// not issued for the name or address connected to.
    CertificateRejected,
    /// The peer refused our handshake or our certificate, with a TLS alert.
    RejectedByPeer,
    /// The server requires a client certificate and the client sent none (reported on both
    /// sides).
    CertificateRequired,
    /// The peer does not speak TLS: a plain rpyc peer, or another protocol.
    NotTls,
    /// The two sides have no TLS version, cipher or signature algorithm in common.
    NoCommonParameters,
    /// The peer asked to renegotiate a TLS 1.2 session, which both sides refuse.
    Renegotiation,
    /// The peer closed the connection during the TLS handshake.
    Closed,
    /// Any other TLS failure (the message says what OpenSSL reported).
    Other,
}

impl fmt::Display for TlsErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TlsErrorKind::Config => "bad TLS key, certificate or setting",
            TlsErrorKind::CertificateRejected => "the peer's certificate was rejected",
            TlsErrorKind::RejectedByPeer => "the peer refused the handshake",
            TlsErrorKind::CertificateRequired => "a client certificate is required",
            TlsErrorKind::NotTls => "the peer does not speak TLS",
            TlsErrorKind::NoCommonParameters => "no TLS version or cipher in common",
            TlsErrorKind::Renegotiation => "renegotiation refused",
            TlsErrorKind::Closed => "the peer closed during the TLS handshake",
            TlsErrorKind::Other => "TLS failure",
        })
    }
}

/// A TLS failure ([`Error::Tls`]): what kind, for a program, and a message that says which
/// check failed on which side and what to do about it, for a person.
///
/// ```
/// use rpyc::{Error, TlsErrorKind};
/// # let (server, port) = rpyc::testing::example_server()?;
/// // The server on `port` speaks plain rpyc, not TLS.
/// match rpyc::ssl_connect("127.0.0.1", port, None, None) {
///     Err(Error::Tls(e)) => match e.kind() {
///         TlsErrorKind::NotTls => assert!(e.message().contains("rpyc::connect")),
///         TlsErrorKind::CertificateRejected => panic!("check the CA or the name: {e}"),
///         other => panic!("{other}: {e}"),
///     },
///     other => panic!("expected a TLS error, got {other:?}"),
/// }
/// # server.close();
/// # Ok::<(), rpyc::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsError {
    kind: TlsErrorKind,
    message: String,
}

kinded_error!(TlsError, TlsErrorKind, Tls);

/// What kind of failure an [`SshError`] reports.
///
/// ```
/// assert_eq!(
///     rpyc::SshErrorKind::HostKeyChanged.to_string(),
///     "the host key differs from known_hosts"
/// );
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SshErrorKind {
    /// A setting does not work: the key file given cannot be read (missing, unsupported,
    /// wrong or missing passphrase), or the known_hosts file cannot be written.
    Config,
    /// The SSH handshake with the server failed (not an SSH server, no algorithm or host key
    /// type in common, the connection dropped). An unreachable server is [`Error::Connect`].
    Handshake,
    /// The server's host key is not in known_hosts, and the policy does not accept new keys.
    HostKeyUnknown,
    /// The server's host key differs from the one known_hosts lists for it.
    HostKeyChanged,
    /// The server's host key is marked `@revoked` in known_hosts.
    HostKeyRevoked,
    /// The server refused every credential tried (agent keys, key files, password), or ended
    /// the login otherwise (e.g. the password has expired).
    AuthenticationFailed,
    /// The server refuses to forward TCP connections (administratively prohibited).
    ForwardingRefused,
    /// The server could not connect to the forwarded host and port (nothing listening there).
    TargetUnreachable,
    /// The SSH session died (sshd went away, the connection broke) after it was set up.
    SessionLost,
    /// Any other SSH failure (the message says what libssh2 reported).
    Other,
}

impl fmt::Display for SshErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SshErrorKind::Config => "bad SSH setting",
            SshErrorKind::Handshake => "SSH handshake failed",
            SshErrorKind::HostKeyUnknown => "unknown host key",
            SshErrorKind::HostKeyChanged => "the host key differs from known_hosts",
            SshErrorKind::HostKeyRevoked => "the host key is revoked",
            SshErrorKind::AuthenticationFailed => "authentication refused",
            SshErrorKind::ForwardingRefused => "forwarding refused",
            SshErrorKind::TargetUnreachable => "the forwarded port is unreachable",
            SshErrorKind::SessionLost => "the SSH session was lost",
            SshErrorKind::Other => "SSH failure",
        })
    }
}

/// An SSH failure ([`Error::Ssh`]): what kind, for a program, and a message that names the
/// host, file or credential involved and what to do about it, for a person.
///
/// ```no_run
/// use rpyc::{Error, SshErrorKind};
/// let ctx = rpyc::SshContext::new("myserver");
/// match rpyc::ssh_connect(&ctx, 18861) {
///     Ok(conn) => println!("{}", conn.root().call::<i64, _>("add", (1, 2))?),
///     Err(Error::Ssh(e)) if e.kind() == SshErrorKind::HostKeyUnknown => {
///         eprintln!("verify the server's key and add it to known_hosts: {}", e.message())
///     }
///     Err(Error::Ssh(e)) if e.kind() == SshErrorKind::AuthenticationFailed => {
///         eprintln!("check the user and keys: {e}")
///     }
///     Err(e) => return Err(e),
/// }
/// # Ok::<(), rpyc::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshError {
    kind: SshErrorKind,
    message: String,
}

kinded_error!(SshError, SshErrorKind, Ssh);

/// What kind of failure a [`HandshakeError`] reports.
///
/// ```
/// assert_eq!(
///     rpyc::HandshakeErrorKind::VersionMismatch.to_string(),
///     "another rpyc protocol version"
/// );
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum HandshakeErrorKind {
    /// The peer speaks another protocol (SSH, TLS, HTTP, or one not recognized).
    NotRpyc,
    /// The peer speaks another version of the rpyc protocol.
    VersionMismatch,
    /// The server refused the connection: it is at its limit of connections or handshakes.
    Refused,
    /// The server only accepts TLS and this client connected without it.
    TlsRequired,
    /// The peer hung up before its hello arrived (a server that rejected us closes this way).
    Closed,
    /// The peer's hello announced an unusable frame limit.
    BadHello,
    /// The transport failed during the hello.
    Io,
    /// An authenticator refused the peer (see [`HandshakeError::rejected`]).
    Rejected,
}

impl fmt::Display for HandshakeErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HandshakeErrorKind::NotRpyc => "not an rpyc peer",
            HandshakeErrorKind::VersionMismatch => "another rpyc protocol version",
            HandshakeErrorKind::Refused => "refused by the server",
            HandshakeErrorKind::TlsRequired => "the server requires TLS",
            HandshakeErrorKind::Closed => "the peer closed during the handshake",
            HandshakeErrorKind::BadHello => "unusable hello",
            HandshakeErrorKind::Io => "I/O error during the handshake",
            HandshakeErrorKind::Rejected => "rejected by an authenticator",
        })
    }
}

/// An rpyc handshake failure ([`Error::Handshake`]): what kind, for a program, and a message
/// that says what the peer seems to be or why it refused, for a person.
///
/// ```
/// use rpyc::{Error, HandshakeErrorKind};
/// # let pki = rpyc::testing::TestPki::temp()?;
/// # let files = pki.issue("localhost", &["localhost"])?;
/// # let auth = rpyc::SslAuthenticator::new(&files.key, &files.cert);
/// # let server = rpyc::ThreadedServer::new(rpyc::Service::new("s")).authenticator(auth).build()?.spawn()?;
/// # let port = server.port();
/// // The server on `port` only accepts TLS.
/// match rpyc::connect("127.0.0.1", port) {
///     Err(Error::Handshake(e)) => match e.kind() {
///         HandshakeErrorKind::TlsRequired => assert!(e.message().contains("ssl_connect")),
///         HandshakeErrorKind::Refused => panic!("the server is full; retry later: {e}"),
///         other => panic!("{other}: {e}"),
///     },
///     other => panic!("expected a handshake error, got {other:?}"),
/// }
/// # server.close();
/// # Ok::<(), rpyc::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandshakeError {
    kind: HandshakeErrorKind,
    message: String,
}

kinded_error!(HandshakeError, HandshakeErrorKind, Handshake);

impl HandshakeError {
    /// The error an [`Authenticator`](crate::auth::Authenticator) or
    /// [`ClientAuthenticator`](crate::auth::ClientAuthenticator) returns to refuse its peer
    /// ([`HandshakeErrorKind::Rejected`]); `message` says why.
    ///
    /// ```
    /// let e = rpyc::Error::from(rpyc::HandshakeError::rejected("wrong token"));
    /// assert_eq!(e.to_string(), "handshake failed: wrong token");
    /// ```
    pub fn rejected(message: impl Into<String>) -> HandshakeError {
        HandshakeError::new(HandshakeErrorKind::Rejected, message)
    }
}
