//! Talking to Python RPyC 6: Rust calls Python RPyC services, and Python RPyC clients call
//! Rust services, over TCP, TLS, SSH, Unix sockets and a child process's stdin/stdout.
//!
//! This is RPyC 6's own protocol (`pip install 'rpyc>=6,<7'`), not this crate's native one:
//! a [`Connection`] from here talks to Python's `ThreadedServer`, `rpyc_classic` or
//! `rpyc.connect`, and only to them.
//!
//! ```no_run
//! use rpyc::python::{self, PyObject};
//!
//! // A Python service over TLS (as RPyC's ssl_connect), and classic mode.
//! let py = python::ssl_connect("labhost", 12345, Some("client.key"), Some("client.cert"))?;
//! let v: i64 = py.root()?.call_method("add", (1, 2))?;              // conn.root.add(1, 2)
//! let temps: PyObject = py.root()?.call_method("readings", ())?;     // a list, by reference
//! let temps: Vec<f64> = temps.to_vec()?;                             // read in batches
//! let classic = python::connect("labhost", 18812)?;
//! let pid: i64 = classic.modules("os")?.call_method("getpid", ())?;
//! let six: i64 = classic.eval("6 * 7")?;
//!
//! // A Rust closure Python calls back.
//! py.root()?.call_method::<(), _>("subscribe", (python::callback(|x: f64| println!("{x}")),))?;
//!
//! // Serving Python clients: rpyc.connect("host", 18861).root.add(1, 2)
//! let service = python::Service::new("Calc").method("add", |a: i64, b: i64| a + b);
//! let server = python::serve(service).port(18861).build()?.spawn()?;
//! # Ok::<(), rpyc::Error>(())
//! ```
//!
//! # Values and objects
//!
//! What RPyC sends by value ([`Value`]: `None`, `bool`, `int` of any size, `float`, `complex`,
//! `str`, `bytes`, `tuple`, `frozenset`, `slice`, `...`) converts to and from Rust types through
//! serde ([`Value::get`], [`IntoValue`]). Everything else stays where it lives: a Python
//! `list`, `dict` or object arrives as a [`PyObject`] (call it, read attributes, or copy it
//! with [`PyObject::to_vec`] and [`PyObject::to_map`]); a Rust [`Service`] or [`callback`]
//! arrives in Python as a proxy whose methods run here. Rust sequences go to Python as tuples,
//! maps as tuples of pairs. Both sides count references as RPyC does: an object is freed on
//! its owner's side when the other side has dropped every reference it got.
//!
//! Python exceptions arrive as [`Error::Python`](crate::Error::Python) with their class,
//! arguments and traceback text; a Rust handler raises one by returning a
//! [`PythonError`](crate::PythonError).
//!
//! # Threads
//!
//! The promises of native connections hold: many threads share one connection and each gets
//! its own reply, callbacks in both directions need no background thread and nest without
//! deadlock, every call has a deadline, and when the peer dies every waiting call fails at
//! once. How: see the module docs of `src/python/connection.rs`. A Python `ThreadedServer` runs
//! the requests of one connection one at a time, so parallel calls need several connections.
//!
//! # Limits
//!
//! Frames (compressed or not) are refused over [`Options::max_frame_size`](crate::Options),
//! and a compressed one is inflated only up to it (a zlib bomb stops there); brine values may
//! nest 64 deep and integers have at most 4,300 digits (CPython's own limit); a peer may hold
//! at most 100,000 of our objects; at most [`Options::max_workers`](crate::Options) requests
//! of one connection run at once. A malformed frame closes that connection only, with the
//! reason logged. Peers speaking RPyC 4.1-5.x or started with `RPYC_BIND_THREADS=true`, and
//! native rpyc peers, are recognized from their first frame and refused with a
//! [`HandshakeErrorKind::VersionMismatch`](crate::HandshakeErrorKind) that says so.

mod brine;
mod connect;
mod connection;
mod exception;
mod frame;
mod object;
mod protocol;
mod serve;
mod service;
mod value;

#[cfg(unix)]
pub use connect::ssh_connect;
pub use connect::{connect, ssl_connect, unix_connect, Client};
pub use connection::Connection;
pub use object::{PyIter, PyObject};
pub use serve::serve;
pub use service::{callback, Call, Handler, Reply, Service};
pub use value::{FromValue, IntoValue, PyArgs, Value};

/// A value's text cut for an error message.
pub(crate) fn short(s: &str) -> String {
    const MAX: usize = 200;
    if s.len() <= MAX {
        return s.to_string();
    }
    let cut = crate::base::floor_char_boundary(s, MAX);
    format!("{}…({} bytes)", &s[..cut], s.len())
}

#[doc(hidden)]
/// Brine and frame codecs, for the golden tests against the real `rpyc` package.
pub mod wire {
    use super::Value;

    /// Python's `rpyc.core.brine.dump(value)`.
    pub fn brine_dump(v: &Value) -> Result<Vec<u8>, String> {
        let mut out = Vec::new();
        super::brine::dump(v, &mut out)?;
        Ok(out)
    }

    /// Python's `rpyc.core.brine.load(data)`, strict.
    pub fn brine_load(data: &[u8]) -> Result<Value, String> {
        super::brine::load(data)
    }

    /// One frame carrying `payload`.
    pub fn frame(payload: &[u8]) -> Vec<u8> {
        super::frame::encode(payload)
    }
}
