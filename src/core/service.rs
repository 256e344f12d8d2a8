//! Services: named methods a side exposes, the closures behind them, and the call context.
//!
//! A [`Service`] is also what a handler returns to hand the caller a *remote object*: any
//! `Service` inside a result or an argument is sent by reference (see [`crate::RemoteObject`]),
//! and [`callback`] makes one from a closure.

use crate::core::connection::{Connection, Shared};
use crate::core::object::RemoteObject;
use crate::error::Error;
use crate::wire::codec;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

/// How a handler failed, before the service and method names are added (unnameable outside
/// the crate: the module is private).
#[doc(hidden)]
pub enum Failure {
    Handler(String),
    BadArguments(String),
    BadResult(String),
}

/// What a handler left in the payload buffer: the encoding of its result, possibly behind a
/// prefix to skip (the CBOR map head of `Result::Ok`).
#[doc(hidden)]
pub type Outcome = Result<usize, Failure>;

/// A method as the connection calls it: the call's context, the encoded arguments, and the
/// buffer its encoded result goes to.
pub(crate) type Invoke = dyn Fn(&Context, &[u8], &mut Vec<u8>) -> Outcome + Send + Sync;
/// A service's `on_connect` or `on_disconnect`.
pub(crate) type Hook = dyn Fn(&Context) + Send + Sync;

/// A set of named methods that one side of a connection exposes to the other.
///
/// Build it once with [`Service::new`] and [`Service::method`]; it is cheap to clone and shared by
/// every connection it serves. Returned from a handler (or passed as an argument), a `Service`
/// travels *by reference*: the peer gets a [`RemoteObject`] whose calls run here.
///
/// ```
/// use rpyc::Service;
/// let calc = Service::new("calculator")
///     .method("add", |a: i64, b: i64| a + b)
///     .method("div", |a: f64, b: f64| -> Result<f64, String> {
///         if b == 0.0 { Err("division by zero".into()) } else { Ok(a / b) }
///     })
///     .method_with_context("whoami", |cx: &rpyc::Context| cx.peer().to_string());
/// assert_eq!(calc.name(), "calculator");
/// assert_eq!(calc.method_names(), vec!["add", "div", "whoami"]);
/// ```
#[derive(Clone)]
pub struct Service {
    pub(crate) inner: Arc<ServiceInner>,
}

#[derive(Clone)]
pub(crate) struct ServiceInner {
    pub(crate) name: String,
    pub(crate) methods: HashMap<String, Arc<Invoke>>,
    pub(crate) on_connect: Option<Arc<Hook>>,
    pub(crate) on_disconnect: Option<Arc<Hook>>,
}

impl fmt::Debug for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Service")
            .field("name", &self.inner.name)
            .field("methods", &self.method_names())
            .finish()
    }
}

impl Service {
    /// An empty service called `name` (the name appears in errors the peer sees).
    pub fn new(name: impl Into<String>) -> Service {
        Service {
            inner: Arc::new(ServiceInner {
                name: name.into(),
                methods: HashMap::new(),
                on_connect: None,
                on_disconnect: None,
            }),
        }
    }

    /// The service's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The names of its methods, sorted.
    pub fn method_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.inner.methods.keys().map(|s| s.as_str()).collect();
        names.sort_unstable();
        names
    }

    fn edit(mut self, f: impl FnOnce(&mut ServiceInner)) -> Service {
        f(Arc::make_mut(&mut self.inner));
        self
    }

    /// Adds a method. `f` takes up to eight arguments, each any serde type, and returns any
    /// serde type; returning `Result<T, E>` makes `Err` reach the caller as
    /// [`Error::Remote`] with `E` as the message (`E` must be
    /// `Serialize`: `String`, `&str` and [`Error`] are). A panic in `f` is caught and reported
    /// the same way.
    ///
    /// ```
    /// let s = rpyc::Service::new("strings").method("upper", |s: String| s.to_uppercase());
    /// assert_eq!(s.method_names(), vec!["upper"]);
    /// ```
    pub fn method<Args, F: Handler<Args>>(self, name: &str, f: F) -> Service {
        let f = Arc::new(f);
        let call: Arc<Invoke> = Arc::new(move |_cx, args, out| f.invoke(args, out));
        self.edit(|s| {
            s.methods.insert(name.to_string(), call);
        })
    }

    /// Adds a method whose closure also receives the call's [`Context`] first: who the peer is,
    /// and the connection, to call the peer's own service or keep it for later.
    ///
    /// ```
    /// let s = rpyc::Service::new("greeter")
    ///     .method_with_context("hello", |cx: &rpyc::Context, name: String| {
    ///         format!("hello {name}, you are {}", cx.peer())
    ///     });
    /// assert_eq!(s.method_names(), vec!["hello"]);
    /// ```
    pub fn method_with_context<Args, F: ContextHandler<Args>>(self, name: &str, f: F) -> Service {
        let f = Arc::new(f);
        let call: Arc<Invoke> = Arc::new(move |cx, args, out| f.invoke(cx, args, out));
        self.edit(|s| {
            s.methods.insert(name.to_string(), call);
        })
    }

    /// Runs `f` when a connection serving this service is established, before any request
    /// from the peer is served (calls `f` makes to the peer work).
    ///
    /// ```
    /// let s = rpyc::Service::new("svc").on_connect(|cx| log::info!("{} connected", cx.peer()));
    /// # drop(s);
    /// ```
    pub fn on_connect(self, f: impl Fn(&Context) + Send + Sync + 'static) -> Service {
        self.edit(|s| s.on_connect = Some(Arc::new(f)))
    }

    /// Runs `f` once when such a connection closes, for whatever reason. The connection is
    /// already closed: calls to the peer fail.
    ///
    /// ```
    /// let s = rpyc::Service::new("svc").on_disconnect(|cx| log::info!("{} left", cx.peer()));
    /// # drop(s);
    /// ```
    pub fn on_disconnect(self, f: impl Fn(&Context) + Send + Sync + 'static) -> Service {
        self.edit(|s| s.on_disconnect = Some(Arc::new(f)))
    }
}

/// Makes a callable object from a closure, to pass to the peer as an argument (a callback).
/// The peer calls it with [`RemoteObject::invoke`], as often as it likes, during or after the
/// call that carried it; it runs here. It lives until the peer drops its last handle to it.
///
/// ```
/// let cb = rpyc::callback(|line: String| println!("progress: {line}"));
/// assert_eq!(cb.method_names(), vec!["__call__"]);
/// ```
pub fn callback<Args, F: Handler<Args>>(f: F) -> Service {
    Service::new("callback").method(crate::core::object::CALL_METHOD, f)
}

/// What a handler gets to know about the call it serves.
///
/// ```
/// let svc = rpyc::Service::new("s").method_with_context("peer", |cx: &rpyc::Context| {
///     cx.peer().to_string()
/// });
/// # drop(svc);
/// ```
pub struct Context {
    pub(crate) shared: Arc<Shared>,
}

impl Context {
    /// The peer's address: `ip:port` for TCP, the socket path for Unix sockets, a description
    /// for other streams.
    pub fn peer(&self) -> &str {
        &self.shared.peer
    }

    /// The certificate the client presented and the server verified against its CA, on a TLS
    /// connection whose server asks for one: who is calling. A service decides per client what
    /// it allows with it.
    ///
    /// ```
    /// let svc = rpyc::Service::new("s").method_with_context("reboot", |cx: &rpyc::Context| {
    ///     match cx.peer_certificate().and_then(|c| c.common_name()) {
    ///         Some("admin") => Ok("rebooting"),
    ///         other => Err(format!("{other:?} may not reboot")),
    ///     }
    /// });
    /// # drop(svc);
    /// ```
    pub fn peer_certificate(&self) -> Option<&crate::tls::PeerCertificate> {
        self.credentials()
    }

    /// What the connection's [`Authenticator`](crate::auth::Authenticator) learned about the peer,
    /// if it is a `T` (an [`SslAuthenticator`](crate::SslAuthenticator) keeps a
    /// [`PeerCertificate`](crate::tls::PeerCertificate); your own keeps what it chose).
    pub fn credentials<T: std::any::Any>(&self) -> Option<&T> {
        self.shared.credentials.as_deref()?.downcast_ref()
    }

    /// The connection this call came in on; keep it to call the peer later.
    pub fn connection(&self) -> Connection {
        Connection::from_shared(self.shared.clone())
    }

    /// The peer's own service (the one it passed when connecting).
    pub fn peer_root(&self) -> RemoteObject {
        self.connection().root()
    }
}

/// A closure usable as a method: `Fn(A1, ..., An) -> R` for up to eight arguments, each
/// `DeserializeOwned`, with `R: Serialize`. Implemented for you; see [`Service::method`].
pub trait Handler<Args>: Send + Sync + 'static {
    #[doc(hidden)]
    fn invoke(&self, args: &[u8], out: &mut Vec<u8>) -> Outcome;
}

/// Like [`Handler`], with the call's [`Context`] as first parameter: `Fn(&Context, A1, ...)`.
pub trait ContextHandler<Args>: Send + Sync + 'static {
    #[doc(hidden)]
    fn invoke(&self, cx: &Context, args: &[u8], out: &mut Vec<u8>) -> Outcome;
}

/// The argument tuple of a call: `()`, `(a,)`, `(a, b)`, ... up to eight values.
///
/// ```
/// fn takes<A: rpyc::Args>(_: A) {}
/// takes(());
/// takes(("one",));
/// takes((1, 2.5, "three"));
/// ```
pub trait Args {
    #[doc(hidden)]
    fn encode_args(&self, out: &mut Vec<u8>) -> Result<(), Error>;
}

impl Args for () {
    fn encode_args(&self, out: &mut Vec<u8>) -> Result<(), Error> {
        out.push(0x80); // an empty CBOR array
        Ok(())
    }
}

/// Decodes a call's arguments; `types` name the parameters' types, only when they are wrong.
fn decode_args<T: DeserializeOwned>(
    args: &[u8],
    arity: usize,
    types: &[fn() -> String],
) -> Result<T, Failure> {
    codec::decode(args).map_err(|e| {
        let types: Vec<String> = types.iter().map(|name| name()).collect();
        Failure::BadArguments(format!(
            "expected {arity} argument(s) ({}): {e}",
            types.join(", ")
        ))
    })
}

fn no_args(args: &[u8]) -> Result<(), Failure> {
    match args {
        [0x80] | [0xf6] => Ok(()),
        _ => Err(Failure::BadArguments(format!(
            "expected no arguments, got {}",
            codec::describe(args, codec::QUOTE_MAX)
        ))),
    }
}

/// Longest text sent for a handler's `Err(e)`: generous, as `e` is the service's own text, but
/// finite, as `e` may quote anything.
const HANDLER_ERROR_MAX: usize = 64 * 1024;

/// The CBOR heads serde_cbor writes for `Result::Ok(_)` and `Result::Err(_)`: a one-entry map
/// keyed by the variant name.
const OK_HEAD: &[u8] = &[0xa1, 0x62, b'O', b'k'];
const ERR_HEAD: &[u8] = &[0xa1, 0x63, b'E', b'r', b'r'];

/// Encodes a handler's return value. A `Result` is unwrapped: `Ok(v)` sends `v`, `Err(e)`
/// becomes a handler failure carrying `e`. Returns how many bytes of prefix to skip.
pub(crate) fn encode_result<R: Serialize>(r: &R, out: &mut Vec<u8>) -> Outcome {
    let start = out.len();
    codec::encode_into(out, r).map_err(|e| Failure::BadResult(e.to_string()))?;
    if std::any::type_name::<R>().starts_with("core::result::Result<") {
        let encoded = &out[start..];
        if encoded.starts_with(OK_HEAD) {
            return Ok(OK_HEAD.len());
        }
        if encoded.starts_with(ERR_HEAD) {
            // Encoded again, into a buffer of its own, so whole: large byte strings in `out`
            // were spliced, not copied.
            let mut whole = Vec::new();
            codec::encode_into(&mut whole, r).map_err(|e| Failure::BadResult(e.to_string()))?;
            return Err(Failure::Handler(codec::describe(
                &whole[ERR_HEAD.len()..],
                HANDLER_ERROR_MAX,
            )));
        }
    }
    Ok(0)
}

macro_rules! handlers {
    ($($n:literal => ($($a:ident),*);)*) => {$(
        impl<F, R, $($a,)*> Handler<($($a,)*)> for F
        where
            F: Fn($($a),*) -> R + Send + Sync + 'static,
            R: Serialize,
            $($a: DeserializeOwned,)*
        {
            #[allow(non_snake_case)]
            fn invoke(&self, args: &[u8], out: &mut Vec<u8>) -> Outcome {
                handlers!(@decode args, $n, ($($a),*));
                encode_result(&self($($a),*), out)
            }
        }

        impl<F, R, $($a,)*> ContextHandler<($($a,)*)> for F
        where
            F: Fn(&Context, $($a),*) -> R + Send + Sync + 'static,
            R: Serialize,
            $($a: DeserializeOwned,)*
        {
            #[allow(non_snake_case)]
            fn invoke(&self, cx: &Context, args: &[u8], out: &mut Vec<u8>) -> Outcome {
                handlers!(@decode args, $n, ($($a),*));
                encode_result(&self(cx, $($a),*), out)
            }
        }

        handlers!(@args ($($a),*));
    )*};
    (@decode $args:ident, $n:literal, ()) => { no_args($args)?; };
    (@decode $args:ident, $n:literal, ($($a:ident),*)) => {
        let ($($a,)*): ($($a,)*) =
            decode_args($args, $n, &[$(codec::type_name::<$a> as fn() -> String),*])?;
    };
    (@args ()) => {};
    (@args ($($a:ident),*)) => {
        impl<$($a: Serialize,)*> Args for ($($a,)*) {
            fn encode_args(&self, out: &mut Vec<u8>) -> Result<(), Error> {
                codec::encode_into(out, self)
            }
        }
    };
}

handlers! {
    0 => ();
    1 => (A1);
    2 => (A1, A2);
    3 => (A1, A2, A3);
    4 => (A1, A2, A3, A4);
    5 => (A1, A2, A3, A4, A5);
    6 => (A1, A2, A3, A4, A5, A6);
    7 => (A1, A2, A3, A4, A5, A6, A7);
    8 => (A1, A2, A3, A4, A5, A6, A7, A8);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_are_recognised_by_type_name_and_encoding() {
        // Guards the two facts encode_result relies on: if rustc or serde_cbor change either,
        // this fails instead of handlers silently sending `{"Ok": v}`.
        let mut out = Vec::new();
        let ok: Result<i32, String> = Ok(7);
        let skip = encode_result(&ok, &mut out).ok().unwrap();
        assert_eq!(codec::decode::<i32>(&out[skip..]).unwrap(), 7);
        let mut out = Vec::new();
        let err: Result<i32, String> = Err("boom".into());
        match encode_result(&err, &mut out) {
            Err(Failure::Handler(m)) => assert_eq!(m, "boom"),
            _ => panic!("Err was not recognised"),
        }
        let mut out = Vec::new();
        assert_eq!(encode_result(&"plain", &mut out).ok(), Some(0));
    }
}
