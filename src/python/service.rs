//! Rust objects that Python reaches by reference: a [`Service`] (named methods and plain
//! attributes) and [`callback`]s, what Python may do with them, and the [`Call`] a handler gets.
//!
//! What Python may reach follows RPyC's default policy for a service: the methods and
//! attributes the service declares, under their own names or with the `exposed_` prefix; `__doc__`;
//! nothing else. Nothing on this side evaluates code or reflects over Rust values.

use crate::error::PythonError;
use crate::python::connection::{Connection, Shared};
use crate::python::value::{FromValue, IntoValue, Value};
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

/// A handler as the connection calls it.
type Method = dyn Fn(&Call) -> Result<Value, PythonError> + Send + Sync;

/// Named methods and attributes that Python RPyC clients reach by reference: as a server's
/// root (`conn.root.add(1, 2)` or `conn.root.exposed_add(1, 2)`), or returned from a method or
/// passed as an argument (Python gets a proxy whose methods run here).
///
/// ```
/// use rpyc::python::{Service, Value};
/// let demo = Service::new("Demo")
///     .method("add", |a: i64, b: i64| a + b)
///     .method_with_params("greet", &["name", "punctuation"], |name: String, p: Option<String>| {
///         format!("hello {name}{}", p.unwrap_or_default())
///     })
///     .method_with_call("echo", |call| Ok(Value::Tuple(call.args().to_vec())))
///     .attribute("version", "1.0");
/// assert_eq!(demo.name_pack(), "rust.Demo");
/// assert_eq!(demo.attribute_names(), ["add", "echo", "greet", "version"]);
/// ```
#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
    /// Set on a bound method: `obj.name` as Python got it, to be called next.
    bound: Option<Arc<str>>,
}

#[derive(Clone)]
struct Inner {
    module: String,
    class: String,
    methods: BTreeMap<String, Arc<Method>>,
    attrs: BTreeMap<String, Value>,
}

impl fmt::Debug for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.bound {
            Some(m) => write!(f, "<bound method {}.{m}>", self.inner.class),
            None => write!(f, "<{} object>", self.name_pack()),
        }
    }
}

impl Service {
    /// An empty service of class `class` (Python sees the class as `rust.<class>`).
    pub fn new(class: &str) -> Service {
        Service {
            inner: Arc::new(Inner {
                module: "rust".into(),
                class: class.into(),
                methods: BTreeMap::new(),
                attrs: BTreeMap::new(),
            }),
            bound: None,
        }
    }

    fn inner_mut(&mut self) -> &mut Inner {
        Arc::make_mut(&mut self.inner)
    }

    /// Adds a method whose parameters and result convert from and to Python values
    /// ([`FromValue`], [`crate::python::IntoValue`]); it may return `Result<T, PythonError>`
    /// to raise an exception in the caller. Missing trailing arguments arrive as `None` (so an
    /// `Option` parameter is optional); keyword arguments need
    /// [`method_with_params`](Self::method_with_params).
    ///
    /// ```
    /// use rpyc::{python::Service, PythonError};
    /// let s = Service::new("Calc").method("div", |a: f64, b: f64| {
    ///     if b == 0.0 { Err(PythonError::new("ZeroDivisionError", ("division by zero",))) } else { Ok(a / b) }
    /// });
    /// assert_eq!(s.attribute_names(), ["div"]);
    /// ```
    pub fn method<Args, F: Handler<Args>>(self, name: &str, f: F) -> Service {
        self.method_with_params(name, &[], f)
    }

    /// Like [`method`](Self::method), naming the parameters so that Python may pass them by
    /// keyword (`counter.incr(by=2)`).
    ///
    /// ```
    /// let s = rpyc::python::Service::new("Counter")
    ///     .method_with_params("incr", &["by"], |by: Option<i64>| by.unwrap_or(1));
    /// # let _ = s;
    /// ```
    pub fn method_with_params<Args, F: Handler<Args>>(
        mut self,
        name: &str,
        params: &[&str],
        f: F,
    ) -> Service {
        let params: Vec<String> = params.iter().map(|p| p.to_string()).collect();
        let method: Arc<Method> = Arc::new(move |call: &Call| f.invoke(call, &params));
        self.inner_mut().methods.insert(name.into(), method);
        self
    }

    /// Adds a method that reads its arguments itself from the [`Call`] (any number, by
    /// position or keyword, as [`Value`]s), and may call the peer back through it.
    ///
    /// ```
    /// use rpyc::python::{Service, Value};
    /// let s = Service::new("Echo").method_with_call("echo", |call| Ok(Value::Tuple(call.args().to_vec())));
    /// # let _ = s;
    /// ```
    pub fn method_with_call(
        mut self,
        name: &str,
        f: impl Fn(&Call) -> Result<Value, PythonError> + Send + Sync + 'static,
    ) -> Service {
        self.inner_mut().methods.insert(name.into(), Arc::new(f));
        self
    }

    /// Adds a plain attribute, sent by value each time Python reads it (`conn.root.version`).
    ///
    /// ```
    /// let s = rpyc::python::Service::new("S").attribute("version", "1.0");
    /// # let _ = s;
    /// ```
    pub fn attribute(mut self, name: &str, value: impl IntoValue) -> Service {
        let v = value
            .into_value()
            .unwrap_or_else(|e| Value::Str(format!("<{e}>")));
        self.inner_mut().attrs.insert(name.into(), v);
        self
    }

    /// The class name Python sees: `rust.<class>` (`builtins.function` for a callback).
    pub fn name_pack(&self) -> String {
        if self.bound.is_some() {
            return "builtins.method".into();
        }
        format!("{}.{}", self.inner.module, self.inner.class)
    }

    /// The names Python's `dir()` lists: methods and attributes, sorted.
    pub fn attribute_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .inner
            .methods
            .keys()
            .chain(self.inner.attrs.keys())
            .cloned()
            .collect();
        names.sort();
        names
    }

    pub(crate) fn is_bound(&self) -> bool {
        self.bound.is_some()
    }

    /// Identity of the object (shared by its bound methods).
    pub(crate) fn identity(&self) -> usize {
        Arc::as_ptr(&self.inner) as *const u8 as usize
    }

    pub(crate) fn same(&self, other: &Service) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner) && self.bound == other.bound
    }

    fn bind(&self, name: &str) -> Service {
        Service {
            inner: self.inner.clone(),
            bound: Some(name.into()),
        }
    }

    /// The declared name Python's `name` refers to: itself, or without the `exposed_` prefix.
    fn resolve<'a>(&self, name: &'a str) -> &'a str {
        let plain = name.strip_prefix("exposed_").unwrap_or(name);
        if self.inner.methods.contains_key(name) || self.inner.attrs.contains_key(name) {
            name
        } else {
            plain
        }
    }

    fn no_attribute(&self, name: &str) -> PythonError {
        PythonError::new(
            "AttributeError",
            (format!(
                "'{}' object has no attribute '{name}'",
                self.name_pack()
            ),),
        )
    }

    pub(crate) fn getattr(&self, name: &str) -> Result<Value, PythonError> {
        if let Some(m) = &self.bound {
            return match name {
                "__name__" => Ok(Value::Str(m.to_string())),
                "__doc__" => Ok(Value::None),
                _ => Err(self.no_attribute(name)),
            };
        }
        let n = self.resolve(name);
        if self.inner.methods.contains_key(n) {
            return Ok(Value::Local(self.bind(n)));
        }
        if let Some(v) = self.inner.attrs.get(n) {
            return Ok(v.clone());
        }
        match name {
            "__doc__" => Ok(Value::None),
            _ => Err(self.no_attribute(name)),
        }
    }

    fn invoke(&self, name: &str, call: &Call) -> Result<Value, PythonError> {
        match self.inner.methods.get(name) {
            Some(m) => {
                let m = m.clone();
                match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| m(call))) {
                    // Python shows the traceback under "Remote Traceback": say where it came from.
                    Ok(Err(e)) if e.traceback().is_empty() => {
                        let tb = format!(
                            "raised by the Rust handler {}.{name} (rpyc for Rust)\n{e}",
                            self.inner.class
                        );
                        Err(e.with_traceback(tb))
                    }
                    Ok(outcome) => outcome,
                    Err(p) => {
                        let what = p
                            .downcast_ref::<&str>()
                            .map(|s| s.to_string())
                            .or_else(|| p.downcast_ref::<String>().cloned())
                            .unwrap_or_else(|| "a panic".into());
                        log::error!("Rust handler {}.{name} panicked: {what}", self.inner.class);
                        Err(PythonError::new(
                            "RuntimeError",
                            (format!(
                                "the Rust handler {}.{name} panicked: {what}",
                                self.inner.class
                            ),),
                        ))
                    }
                }
            }
            None => Err(self.no_attribute(name)),
        }
    }

    pub(crate) fn call(&self, call: Call) -> Result<Value, PythonError> {
        match &self.bound {
            Some(m) => self.invoke(m, &call),
            None if self.inner.methods.contains_key("__call__") => self.invoke("__call__", &call),
            None => Err(PythonError::new(
                "TypeError",
                (format!("'{}' object is not callable", self.name_pack()),),
            )),
        }
    }

    pub(crate) fn call_attr(&self, name: &str, call: Call) -> Result<Value, PythonError> {
        if self.bound.is_some() {
            return Err(self.no_attribute(name));
        }
        self.invoke(self.resolve(name), &call)
    }

    pub(crate) fn repr(&self, call: Call) -> Result<Value, PythonError> {
        if self.bound.is_none() && self.inner.methods.contains_key("__repr__") {
            return self.invoke("__repr__", &call);
        }
        Ok(Value::Str(format!("{self:?}")))
    }

    pub(crate) fn str(&self, call: Call) -> Result<Value, PythonError> {
        if self.bound.is_none() && self.inner.methods.contains_key("__str__") {
            return self.invoke("__str__", &call);
        }
        self.repr(call)
    }

    /// What RPyC's INSPECT answers: `(name, doc)` for each method Python may call on a proxy.
    pub(crate) fn inspect(&self) -> Value {
        let entry = |n: &str| Value::Tuple(vec![Value::Str(n.into()), Value::None]);
        if self.bound.is_some() {
            return Value::Tuple(vec![entry("__call__")]);
        }
        Value::Tuple(self.inner.methods.keys().map(|n| entry(n)).collect())
    }
}

/// A Rust closure as a Python callable (`builtins.function` to Python: callable without more
/// round trips). Pass it as an argument; Python calls it back on this connection.
///
/// ```
/// let double = rpyc::python::callback(|x: f64| x * 2.0);
/// assert_eq!(double.name_pack(), "builtins.function");
/// ```
pub fn callback<Args, F: Handler<Args>>(f: F) -> Service {
    let mut s = Service::new("function").method("__call__", f);
    s.inner_mut().module = "builtins".into();
    s
}

/// A call from Python as a handler sees it: the arguments, and the connection it came on.
pub struct Call {
    shared: Arc<Shared>,
    args: Vec<Value>,
    kwargs: Vec<(String, Value)>,
}

impl Call {
    pub(crate) fn new(shared: Arc<Shared>, args: Vec<Value>, kwargs: Vec<Value>) -> Call {
        let kwargs = kwargs
            .into_iter()
            .filter_map(|kv| match kv {
                Value::Tuple(mut p) if p.len() == 2 => {
                    let v = p.pop().expect("2 items");
                    match p.pop() {
                        Some(Value::Str(k)) => Some((k, v)),
                        _ => None,
                    }
                }
                _ => None,
            })
            .collect();
        Call {
            shared,
            args,
            kwargs,
        }
    }

    /// The positional arguments.
    pub fn args(&self) -> &[Value] {
        &self.args
    }

    /// The keyword arguments, in the order Python sent them.
    pub fn kwargs(&self) -> &[(String, Value)] {
        &self.kwargs
    }

    /// The keyword argument `name`, if given.
    pub fn kwarg(&self, name: &str) -> Option<&Value> {
        self.kwargs.iter().find(|(k, _)| k == name).map(|(_, v)| v)
    }

    /// The connection the call came on: to call the peer back (its root, or objects it
    /// passed). It does not keep the connection open.
    pub fn connection(&self) -> Connection {
        Connection::borrowed(self.shared.clone())
    }

    /// Who is calling: the peer's address.
    pub fn peer(&self) -> &str {
        &self.shared.peer
    }

    /// The client certificate the peer presented over TLS, if any.
    pub fn peer_certificate(&self) -> Option<&crate::tls::PeerCertificate> {
        self.shared
            .credentials
            .as_ref()?
            .downcast_ref::<crate::tls::PeerCertificate>()
    }
}

/// A Rust closure usable as a method: `Fn(A, B, ...) -> R` for up to 6 parameters that are
/// each [`FromValue`], with `R` a [`Reply`].
pub trait Handler<Args>: Send + Sync + 'static {
    /// Runs the closure on a call's arguments; `params` names them for keyword arguments.
    fn invoke(&self, call: &Call, params: &[String]) -> Result<Value, PythonError>;
}

/// What a method returns: `Result<T, PythonError>` for any [`IntoValue`] `T` (`Err` raises
/// the exception in the caller; a `String` or [`crate::Error`] error works too), or, for
/// methods that cannot fail, a plain number, `bool`,
/// string, `()`, [`Value`], [`Service`], [`PyObject`](crate::python::PyObject), `Vec`,
/// `Option` or tuple of up to four serde values (other types: wrap them in `Ok`).
pub trait Reply {
    /// The value to send, or the exception to raise.
    fn into_reply(self) -> Result<Value, PythonError>;
}

fn plain(v: impl IntoValue) -> Result<Value, PythonError> {
    v.into_value()
        .map_err(|e| PythonError::new("TypeError", (e.to_string(),)))
}

impl<T: IntoValue> Reply for Result<T, PythonError> {
    fn into_reply(self) -> Result<Value, PythonError> {
        self.and_then(plain)
    }
}

/// A `String` error raises a `RuntimeError` with that message.
impl<T: IntoValue> Reply for Result<T, String> {
    fn into_reply(self) -> Result<Value, PythonError> {
        self.map_err(|e| PythonError::new("RuntimeError", (e,)))
            .and_then(plain)
    }
}

/// An error of this crate's own calls (a call back into Python that failed) raises the Python
/// exception itself, or a `RuntimeError` saying what failed.
impl<T: IntoValue> Reply for Result<T, crate::error::Error> {
    fn into_reply(self) -> Result<Value, PythonError> {
        self.map_err(PythonError::from).and_then(plain)
    }
}

macro_rules! plain_reply {
    ($($t:ty),*) => {$(
        impl Reply for $t {
            fn into_reply(self) -> Result<Value, PythonError> {
                plain(self)
            }
        }
    )*};
}
plain_reply!(
    (),
    bool,
    i8,
    i16,
    i32,
    i64,
    u8,
    u16,
    u32,
    u64,
    f32,
    f64,
    String,
    &'static str,
    Value,
    Service,
    crate::python::PyObject
);

impl<T: serde::Serialize> Reply for Vec<T> {
    fn into_reply(self) -> Result<Value, PythonError> {
        plain(self)
    }
}
impl<T: serde::Serialize> Reply for Option<T> {
    fn into_reply(self) -> Result<Value, PythonError> {
        plain(self)
    }
}
macro_rules! tuple_reply {
    ($($a:ident),*) => {
        impl<$($a: serde::Serialize,)*> Reply for ($($a,)*) {
            fn into_reply(self) -> Result<Value, PythonError> {
                plain(self)
            }
        }
    };
}
tuple_reply!(A, B);
tuple_reply!(A, B, C);
tuple_reply!(A, B, C, D);

/// Argument `i` of a call: by position, else by keyword `params[i]`, else `None`.
fn argument<T: FromValue>(call: &Call, params: &[String], i: usize) -> Result<T, PythonError> {
    let v = call
        .args
        .get(i)
        .cloned()
        .or_else(|| params.get(i).and_then(|p| call.kwarg(p).cloned()))
        .unwrap_or(Value::None);
    T::from_value(v).map_err(|e| {
        let name = params
            .get(i)
            .cloned()
            .unwrap_or_else(|| format!("#{}", i + 1));
        PythonError::new("TypeError", (format!("argument {name}: {e}"),))
    })
}

fn check_arity(call: &Call, params: &[String], n: usize) -> Result<(), PythonError> {
    if call.args.len() > n {
        return Err(PythonError::new(
            "TypeError",
            (format!(
                "takes {n} positional arguments but {} were given",
                call.args.len()
            ),),
        ));
    }
    if let Some((k, _)) = call
        .kwargs
        .iter()
        .find(|(k, _)| !params.iter().any(|p| p == k))
    {
        return Err(PythonError::new(
            "TypeError",
            (format!("got an unexpected keyword argument '{k}'"),),
        ));
    }
    Ok(())
}

macro_rules! handler {
    ($n:expr; $($a:ident $i:tt),*) => {
        impl<F, R, $($a,)*> Handler<($($a,)*)> for F
        where
            F: Fn($($a),*) -> R + Send + Sync + 'static,
            R: Reply,
            $($a: FromValue,)*
        {
            #[allow(unused_variables)]
            fn invoke(&self, call: &Call, params: &[String]) -> Result<Value, PythonError> {
                check_arity(call, params, $n)?;
                (self)($(argument::<$a>(call, params, $i)?),*).into_reply()
            }
        }
    };
}
handler!(0;);
handler!(1; A 0);
handler!(2; A 0, B 1);
handler!(3; A 0, B 1, C 2);
handler!(4; A 0, B 1, C 2, D 3);
handler!(5; A 0, B 1, C 2, D 3, E 4);
handler!(6; A 0, B 1, C 2, D 3, E 4, G 5);
