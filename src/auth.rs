//! Authenticators: what a server does with an accepted TCP socket, and a client with a
//! connected one, before the rpyc handshake. [`SslAuthenticator`](crate::SslAuthenticator) and
//! [`SslClient`](crate::tls::SslClient) are the TLS ones; users add their own (a pre-shared token,
//! an IP allow-list) by implementing [`Authenticator`] or [`ClientAuthenticator`].
//!
//! An authenticator runs on the accepted connection's own thread (never on the accept loop),
//! so a slow or silent client delays nobody else. What it returns, [`Authenticated`], is the
//! stream the connection runs over (the same socket, or a TLS session on it) and the peer's
//! credentials, which handlers read with [`Context::credentials`](crate::Context::credentials).

use crate::error::Error;
use crate::transport::{self, Credentials, Transport};
use std::any::Any;
use std::fmt;
use std::io;
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

/// Server-side authentication of each accepted TCP connection, before the rpyc handshake.
///
/// Return [`Authenticated::new`] with the socket (possibly carrying credentials) to accept the
/// client, or an error to refuse it (for a refusal of your own,
/// [`HandshakeError::rejected`](crate::HandshakeError::rejected)): the error is logged with the client's address and the
/// socket is closed; the server goes on serving others. `timeout` is the server's handshake
/// timeout: an authenticator that reads from the client must not wait longer.
///
/// ```
/// use rpyc::{Error, HandshakeError, Service, ThreadedServer};
/// use rpyc::auth::{Authenticated, Authenticator};
/// use std::io::{Read, Write};
/// use std::net::TcpStream;
/// use std::time::Duration;
///
/// /// Admits clients that first send the right 8-byte token; handlers see who they are.
/// struct Token(&'static [u8; 8]);
///
/// impl Authenticator for Token {
///     fn authenticate(&self, mut s: TcpStream, timeout: Duration) -> Result<Authenticated, Error> {
///         s.set_read_timeout(Some(timeout))?;
///         let mut got = [0u8; 8];
///         s.read_exact(&mut got)?;
///         if &got != self.0 {
///             return Err(HandshakeError::rejected("wrong token").into());
///         }
///         Ok(Authenticated::new(s).credentials("token holder".to_string()))
///     }
/// }
///
/// let service = Service::new("s").method_with_context("whoami", |cx: &rpyc::Context| {
///     cx.credentials::<String>().cloned().unwrap_or_default()
/// });
/// let server = ThreadedServer::new(service).authenticator(Token(b"s3cr3t!!")).build()?;
/// let port = server.port();
/// let handle = server.spawn()?;
///
/// // The client side sends the token (see `ClientAuthenticator`).
/// struct SendToken(&'static [u8; 8]);
/// impl rpyc::auth::ClientAuthenticator for SendToken {
///     fn authenticate(&self, mut s: TcpStream, _host: &str, _t: Duration) -> Result<Authenticated, Error> {
///         s.write_all(self.0)?;
///         Ok(Authenticated::new(s))
///     }
/// }
/// let conn = rpyc::Options::new().authenticator(SendToken(b"s3cr3t!!")).connect("127.0.0.1", port)?;
/// assert_eq!(conn.root().call::<String, _>("whoami", ())?, "token holder");
/// handle.close();
/// # Ok::<(), rpyc::Error>(())
/// ```
pub trait Authenticator: Send + Sync + 'static {
    /// Authenticates the client on `socket` within `timeout`.
    fn authenticate(&self, socket: TcpStream, timeout: Duration) -> Result<Authenticated, Error>;

    /// Reports a configuration error once, when the server is built (for instance a CA file
    /// that does not load), instead of refusing every client later. The default accepts.
    fn check(&self) -> Result<(), Error> {
        Ok(())
    }
}

/// Client-side counterpart of [`Authenticator`]: runs on a freshly connected TCP socket before
/// the rpyc handshake (see [`Options::authenticator`](crate::Options::authenticator)). `host`
/// is the name the client connected to, for checks such as TLS hostname verification.
///
/// ```
/// use rpyc::Error;
/// use rpyc::auth::{Authenticated, ClientAuthenticator};
/// use std::io::Write;
/// use std::net::TcpStream;
/// use std::time::Duration;
///
/// /// Sends a token first (the server side is the example of `Authenticator`).
/// struct SendToken(&'static [u8]);
///
/// impl ClientAuthenticator for SendToken {
///     fn authenticate(&self, mut s: TcpStream, _host: &str, _t: Duration) -> Result<Authenticated, Error> {
///         s.write_all(self.0)?;
///         Ok(Authenticated::new(s))
///     }
/// }
/// let options = rpyc::Options::new().authenticator(SendToken(b"s3cr3t!!"));
/// # let _ = options;
/// ```
pub trait ClientAuthenticator: Send + Sync + 'static {
    /// Authenticates this side to the server at `host` on `socket`, within `timeout`.
    fn authenticate(
        &self,
        socket: TcpStream,
        host: &str,
        timeout: Duration,
    ) -> Result<Authenticated, Error>;
}

/// An authenticated stream, ready for the rpyc handshake: returned by authenticators.
///
/// ```
/// # fn f(socket: std::net::TcpStream) -> rpyc::auth::Authenticated {
/// rpyc::auth::Authenticated::new(socket).credentials(42u32)
/// # }
/// ```
pub struct Authenticated {
    stream: Stream,
    pub(crate) credentials: Option<Credentials>,
}

enum Stream {
    Tcp(TcpStream),
    /// A stream of a layer above (TLS), which makes its transport once the connection's
    /// stall timeout is known.
    Made(Box<dyn FnOnce(Duration) -> Transport + Send>),
}

impl Authenticated {
    /// The connection continues on `socket` as it is (plain TCP).
    pub fn new(socket: TcpStream) -> Authenticated {
        Authenticated {
            stream: Stream::Tcp(socket),
            credentials: None,
        }
    }

    /// Attaches what the peer proved (a user name, a role, ...), for handlers to read with
    /// [`Context::credentials`](crate::Context::credentials) and the client with
    /// [`Connection::credentials`](crate::Connection::credentials).
    pub fn credentials<T: Any + Send + Sync>(mut self, credentials: T) -> Authenticated {
        self.credentials = Some(Arc::new(credentials));
        self
    }

    /// A connection that continues on a stream made by `transport` (given the stall timeout),
    /// with `credentials` (for TLS, the peer's verified certificate).
    pub(crate) fn made(
        transport: impl FnOnce(Duration) -> Transport + Send + 'static,
        credentials: Option<Credentials>,
    ) -> Authenticated {
        Authenticated {
            stream: Stream::Made(Box::new(transport)),
            credentials,
        }
    }

    pub(crate) fn into_transport(self, write_timeout: Duration) -> io::Result<Transport> {
        let mut t = match self.stream {
            Stream::Tcp(s) => {
                // An authenticator may have left the socket non-blocking; the connection
                // needs it blocking.
                s.set_nonblocking(false)?;
                transport::tcp(s, write_timeout)?
            }
            Stream::Made(make) => make(write_timeout),
        };
        t.credentials = self.credentials;
        Ok(t)
    }
}

impl fmt::Debug for Authenticated {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authenticated")
            .field(
                "stream",
                &match self.stream {
                    Stream::Tcp(_) => "tcp",
                    Stream::Made(_) => "tls",
                },
            )
            .field("credentials", &self.credentials.is_some())
            .finish()
    }
}
