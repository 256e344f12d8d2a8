//! TLS on OpenSSL: [`SslAuthenticator`] for servers, [`SslClient`] and [`ssl_connect`](crate::ssl_connect) for
//! clients, and the transport that lets many threads share one TLS session.
//!
//! # Secure by default
//!
//! A client verifies the server's certificate chain and its hostname, against the system's
//! trust store or, once [`SslClient::ca_certs`] is given, against that CA alone. TLS 1.2 is the
//! minimum. The only way to skip verification is the visibly named
//! [`SslClient::dangerous_accept_any_server_certificate`]. A server given a CA with
//! [`SslAuthenticator::ca_certs`] requires client certificates signed by it; the verified
//! certificate ([`PeerCertificate`]) is available to handlers through
//! [`Context::peer_certificate`](crate::Context::peer_certificate).
//!
//! # How threads share one SSL object
//!
//! OpenSSL forbids two threads inside one SSL object, and a `SslStream` cannot be split into
//! halves. A lock held across a blocking `SSL_read` would stall every writer for as long as the
//! peer is silent, and a lock held across a blocking `SSL_write` on a full socket deadlocks
//! when both peers send large messages at once. So:
//!
//! * The SSL object sits behind one mutex, which is held only for a single `SSL_read` or
//!   `SSL_write` call, and such a call never waits for the network: the SSL object's socket
//!   layer reads and writes with `MSG_DONTWAIT`, so it moves what is already there and returns.
//! * A writer whose bytes the socket cannot take yet **releases the mutex** and waits for the
//!   socket with `poll(2)`, then retries with the same bytes, as OpenSSL requires. In between,
//!   the reading thread takes the mutex and drains incoming records, so two peers sending
//!   64 MiB to each other both make progress.
//! * The reader waits for input outside the mutex: when neither OpenSSL nor the socket layer's
//!   buffer holds unread bytes, it does a blocking read of the socket into that buffer (one
//!   system call per batch of records, where OpenSSL alone makes two per record) while holding
//!   only the buffer, which no other thread needs meanwhile; then it takes the mutex and
//!   decrypts. A round trip costs each side one read and one write, as over plain TCP.
//! * The reading side is owned by one thread at a time (the connection's reader token), the
//!   writing side by the connection's writer lock; the SSL mutex only orders their single calls.
//! * Read timeouts (a calling thread reads its own reply in slices) are the socket's read
//!   timeout; closing shuts the socket down from any thread, which ends every wait at once.
//!
//! Handshakes run on the same non-waiting socket layer, with `poll(2)` against a deadline (the
//! handshake timeout), so a client that connects and sends nothing, or stops half way, is
//! dropped in time; on a server the handshake runs on the connection's own thread, never on
//! the accept loop.

mod cert;
mod client;
mod config;
mod handshake;
mod server;
mod session;

pub use cert::PeerCertificate;
pub use client::SslClient;
pub use config::{ClientCert, TlsVersion};
pub use server::SslAuthenticator;
