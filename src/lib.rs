//! Symmetric remote calls for Rust programs that use threads, after Python's
//! [RPyC](https://rpyc.readthedocs.io).
//!
//! One process exposes a [`Service`] (named methods); another connects and calls them. The
//! connection is symmetric: the client can expose a service too, pass closures as callbacks,
//! and either side can hand the other a [`RemoteObject`] whose calls run where the object
//! lives. It is for test rigs, daemons and tools that are written with threads rather than an
//! async runtime: everything blocks, any number of threads may share one [`Connection`], and
//! nothing needs a background thread started by hand.
//!
//! ```
//! use rpyc::{Service, ThreadedServer};
//!
//! // server
//! let service = Service::new("calculator")
//!     .method("add", |a: i64, b: i64| a + b)
//!     .method("div", |a: f64, b: f64| -> Result<f64, String> {
//!         if b == 0.0 { Err("division by zero".into()) } else { Ok(a / b) }
//!     });
//! let server = ThreadedServer::new(service).hostname("127.0.0.1").port(0).build()?;
//! let port = server.port();
//! let handle = server.spawn()?;
//!
//! // client
//! let conn = rpyc::connect("127.0.0.1", port)?;
//! let sum: i64 = conn.root().call("add", (1, 2))?;
//! assert_eq!(sum, 3);
//! let err = conn.root().call::<f64, _>("div", (1.0, 0.0)).unwrap_err();
//! assert!(err.to_string().contains("division by zero"));
//! let pending = conn.root().call_async::<i64, _>("add", (20, 22))?;
//! assert_eq!(pending.value()?, 42);
//! conn.close();
//! handle.close();
//! # Ok::<(), rpyc::Error>(())
//! ```
//!
//! # Secure connections
//!
//! [`SslAuthenticator`] gives a server TLS on OpenSSL, with client certificates required and
//! verified once a CA is given; [`ssl_connect`] and [`tls::SslClient`] (with [`Options::tls`]) connect to it, verifying the
//! server's chain and host name by default. Handlers see who is calling through
//! [`Context::peer_certificate`]. Other schemes plug in through [`auth::Authenticator`] and
//! [`auth::ClientAuthenticator`]. How one TLS session is shared by many threads without two of them
//! ever inside OpenSSL at once, and without a lock held while waiting for the network, is
//! described in the docs of [`tls`].
//!
//! # Design
//!
//! The wire protocol is specified in `PROTOCOL.md`. What threads sharing a connection may rely
//! on (each call gets its own reply, callbacks need no background thread and cannot deadlock,
//! a timed-out call leaves the connection usable, a closed connection fails every waiting call
//! at once) is listed in [`Connection`]'s docs; how it is done is written in the module docs
//! of `src/core/connection.rs` and `src/core/dispatch.rs`. Every resource a peer can make this
//! side spend is bounded and every wait has a deadline: see the README's "Limits and hostile
//! peers".
//!
//! A server bound to localhost only is reached through SSH with [`ssh_connect`] and an
//! [`SshContext`] (see [`ssh::SshTunnel`] for how the tunnel works).
//!
//! # Python RPyC
//!
//! The native protocol above is this crate's own. To call Python RPyC 6 services, or to serve
//! Python RPyC clients, use [`python`]: the same transports, TLS, SSH, limits and threading
//! promises, speaking RPyC 6's wire protocol.

// Unsafe code is denied everywhere but `sys`, the one thin wrapper around poll(2).
#![deny(unsafe_code)]
#![deny(missing_docs)]

pub mod auth;
mod base;
mod client;
mod core;
mod error;
pub mod python;
mod server;
#[cfg(unix)]
pub mod ssh;
pub mod testing;
pub mod tls;
mod transport;
mod wire;

pub use crate::core::connection::Connection;
pub use crate::core::object::{AsyncResult, RemoteObject};
pub use crate::core::service::{callback, Args, Context, ContextHandler, Handler, Service};
pub use client::{connect, connect_stream, connect_subprocess, ssl_connect, Options};
#[cfg(unix)]
pub use client::{ssh_connect, unix_connect};
pub use error::{
    Error, HandshakeError, HandshakeErrorKind, PythonError, RemoteError, RemoteErrorKind, SshError,
    SshErrorKind, Timeout, TlsError, TlsErrorKind,
};
pub use server::{OneShotServer, Server, ServerBuilder, ServerHandle, ThreadedServer};
#[cfg(unix)]
pub use ssh::SshContext;
pub use tls::SslAuthenticator;
pub use wire::codec::Bytes;
