//! [`PyObject`]: a handle to an object that lives in the Python peer.

use crate::base::deadline;
use crate::error::Error;
use crate::python::connection::{Connection, Shared};
use crate::python::protocol::{Handler, IdPack};
use crate::python::value::{FromValue, PyArgs, Value};
use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How many items one `BUFFITER` round trip asks for when reading a remote collection.
const BATCH: i64 = 1000;

/// An object of the Python peer, by reference: a Python `list`, `dict`, module, function,
/// class instance, or a service's root. Its methods are calls to the peer, each with the
/// connection's call timeout.
///
/// Cheap to clone; all clones are one handle. When the last one drops, the peer is told
/// (RPyC's `DEL`, with the number of times it sent the object), so the Python side frees it.
///
/// ```no_run
/// let py = rpyc::python::connect("labhost", 18861)?;
/// let temps = py.root()?.call_method::<rpyc::python::PyObject, _>("readings", ())?;
/// let temps: Vec<f64> = temps.to_vec()?;
/// # Ok::<(), rpyc::Error>(())
/// ```
#[derive(Clone)]
pub struct PyObject {
    inner: Arc<ProxyInner>,
}

pub(crate) struct ProxyInner {
    shared: Arc<Shared>,
    pack: IdPack,
    /// How many times the peer sent this object while we held it.
    count: AtomicU64,
}

impl ProxyInner {
    pub(crate) fn new(shared: Arc<Shared>, pack: IdPack) -> Arc<ProxyInner> {
        Arc::new(ProxyInner {
            shared,
            pack,
            count: AtomicU64::new(1),
        })
    }

    pub(crate) fn received(&self) {
        self.count.fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for ProxyInner {
    fn drop(&mut self) {
        self.shared
            .forget_proxy(&self.pack, self as *const ProxyInner);
        self.shared
            .release(&self.pack, self.count.load(Ordering::Relaxed));
    }
}

impl fmt::Debug for PyObject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "<remote {} #{}>",
            self.inner.pack.name, self.inner.pack.instance
        )
    }
}

impl PyObject {
    pub(crate) fn from_inner(inner: Arc<ProxyInner>) -> PyObject {
        PyObject { inner }
    }

    pub(crate) fn id_pack(&self) -> &IdPack {
        &self.inner.pack
    }

    pub(crate) fn belongs_to(&self, shared: &Shared) -> bool {
        std::ptr::eq(Arc::as_ptr(&self.inner.shared), shared)
    }

    /// Whether both handles are the same remote object.
    ///
    /// ```no_run
    /// # let py = rpyc::python::connect("127.0.0.1", 18861)?;
    /// assert!(py.root()?.same(&py.root()?));
    /// # Ok::<(), rpyc::Error>(())
    /// ```
    pub fn same(&self, other: &PyObject) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// The object's class as the peer names it: `builtins.list`, `__main__.Counter`, or a
    /// module's name.
    ///
    /// ```no_run
    /// # let py = rpyc::python::connect("127.0.0.1", 18861)?;
    /// println!("{}", py.root()?.class_name()); // e.g. __main__.DemoService
    /// # Ok::<(), rpyc::Error>(())
    /// ```
    pub fn class_name(&self) -> &str {
        &self.inner.pack.name
    }

    /// The connection the object lives on.
    pub fn connection(&self) -> Connection {
        Connection::borrowed(self.inner.shared.clone())
    }

    fn request(
        &self,
        h: Handler,
        mut args: Vec<Value>,
        until: Instant,
        what: &str,
    ) -> Result<Value, Error> {
        args.insert(0, Value::Remote(self.clone()));
        let name = || format!("{}.{what}", self.inner.pack.name);
        self.inner.shared.request(h, args, until, &name)
    }

    fn until(&self) -> Instant {
        deadline(self.inner.shared.settings.call_timeout)
    }

    /// Python's `obj.name` (subject to the peer's attribute policy: with RPyC's defaults,
    /// `exposed_` names and a few safe dunders only).
    ///
    /// ```no_run
    /// # let py = rpyc::python::connect("127.0.0.1", 18861)?;
    /// let version: String = py.root()?.getattr("version")?;
    /// # Ok::<(), rpyc::Error>(())
    /// ```
    pub fn getattr<R: FromValue>(&self, name: &str) -> Result<R, Error> {
        let v = self.request(Handler::GetAttr, vec![name.into()], self.until(), name)?;
        R::from_value(v)
    }

    /// Python's `obj.name = value` (refused by RPyC's default policy; classic servers allow
    /// it).
    ///
    /// ```no_run
    /// # let py = rpyc::python::connect("127.0.0.1", 18861)?;
    /// py.builtins()?.setattr("answer", 42)?;
    /// # Ok::<(), rpyc::Error>(())
    /// ```
    pub fn setattr(&self, name: &str, value: impl crate::python::IntoValue) -> Result<(), Error> {
        let v = value.into_value()?;
        self.request(Handler::SetAttr, vec![name.into(), v], self.until(), name)?;
        Ok(())
    }

    /// Calls the object itself: Python's `obj(*args)`.
    ///
    /// ```no_run
    /// # let py = rpyc::python::connect("127.0.0.1", 18812)?;
    /// let pid: i64 = py.modules("os")?.getattr::<rpyc::python::PyObject>("getpid")?.call(())?;
    /// # Ok::<(), rpyc::Error>(())
    /// ```
    pub fn call<R: FromValue, A: PyArgs>(&self, args: A) -> Result<R, Error> {
        self.call_kw(args, Vec::new())
    }

    /// Calls the object with keyword arguments: Python's `obj(*args, **kwargs)`.
    ///
    /// ```no_run
    /// # let py = rpyc::python::connect("127.0.0.1", 18861)?;
    /// # let f: rpyc::python::PyObject = py.root()?.getattr("kwargs")?;
    /// let t: (i64, i64, i64) = f.call_kw((1,), vec![("c", 9.into())])?;
    /// # Ok::<(), rpyc::Error>(())
    /// ```
    pub fn call_kw<R: FromValue, A: PyArgs>(
        &self,
        args: A,
        kwargs: Vec<(&str, Value)>,
    ) -> Result<R, Error> {
        let args = vec![Value::Tuple(args.into_args()?), kwargs_value(kwargs)];
        R::from_value(self.request(Handler::Call, args, self.until(), "__call__")?)
    }

    /// Calls method `name` in one round trip: Python's `obj.name(*args)`, with the peer's
    /// attribute policy applied to `name`.
    ///
    /// ```no_run
    /// # let py = rpyc::python::connect("127.0.0.1", 18861)?;
    /// let sum: i64 = py.root()?.call_method("add", (1, 2))?;
    /// # Ok::<(), rpyc::Error>(())
    /// ```
    pub fn call_method<R: FromValue, A: PyArgs>(&self, name: &str, args: A) -> Result<R, Error> {
        self.call_method_deadline(name, args, Vec::new(), self.until())
    }

    /// [`call_method`](Self::call_method) with keyword arguments.
    ///
    /// ```no_run
    /// # let py = rpyc::python::connect("127.0.0.1", 18861)?;
    /// # let counter: rpyc::python::PyObject = py.root()?.call_method("make_counter", (10,))?;
    /// let n: i64 = counter.call_method_kw("incr", (), vec![("by", 2.into())])?;
    /// # Ok::<(), rpyc::Error>(())
    /// ```
    pub fn call_method_kw<R: FromValue, A: PyArgs>(
        &self,
        name: &str,
        args: A,
        kwargs: Vec<(&str, Value)>,
    ) -> Result<R, Error> {
        self.call_method_deadline(name, args, kwargs, self.until())
    }

    /// [`call_method`](Self::call_method) with its own timeout instead of the connection's.
    ///
    /// ```no_run
    /// # let py = rpyc::python::connect("127.0.0.1", 18861)?;
    /// let slept: f64 = py.root()?.call_method_timeout("sleep", (0.1,), std::time::Duration::from_secs(5))?;
    /// # Ok::<(), rpyc::Error>(())
    /// ```
    pub fn call_method_timeout<R: FromValue, A: PyArgs>(
        &self,
        name: &str,
        args: A,
        timeout: Duration,
    ) -> Result<R, Error> {
        self.call_method_deadline(name, args, Vec::new(), deadline(timeout))
    }

    /// [`call_method_kw`](Self::call_method_kw), giving up at `deadline`.
    ///
    /// ```no_run
    /// # let py = rpyc::python::connect("127.0.0.1", 18861)?;
    /// let until = std::time::Instant::now() + std::time::Duration::from_secs(5);
    /// let sum: i64 = py.root()?.call_method_deadline("add", (1, 2), vec![], until)?;
    /// # Ok::<(), rpyc::Error>(())
    /// ```
    pub fn call_method_deadline<R: FromValue, A: PyArgs>(
        &self,
        name: &str,
        args: A,
        kwargs: Vec<(&str, Value)>,
        deadline: Instant,
    ) -> Result<R, Error> {
        let args = vec![
            name.into(),
            Value::Tuple(args.into_args()?),
            kwargs_value(kwargs),
        ];
        R::from_value(self.request(Handler::CallAttr, args, deadline, name)?)
    }

    /// Python's `repr(obj)`.
    ///
    /// ```no_run
    /// # let py = rpyc::python::connect("127.0.0.1", 18861)?;
    /// println!("{}", py.root()?.repr()?);
    /// # Ok::<(), rpyc::Error>(())
    /// ```
    pub fn repr(&self) -> Result<String, Error> {
        String::from_value(self.request(Handler::Repr, vec![], self.until(), "__repr__")?)
    }

    /// Python's `str(obj)`.
    ///
    /// ```no_run
    /// # let py = rpyc::python::connect("127.0.0.1", 18861)?;
    /// println!("{}", py.root()?.str()?);
    /// # Ok::<(), rpyc::Error>(())
    /// ```
    pub fn str(&self) -> Result<String, Error> {
        String::from_value(self.request(Handler::Str, vec![], self.until(), "__str__")?)
    }

    /// Python's `len(obj)`.
    ///
    /// ```no_run
    /// # let py = rpyc::python::connect("127.0.0.1", 18861)?;
    /// # let list: rpyc::python::PyObject = py.root()?.call_method("as_list", (1, 2))?;
    /// assert_eq!(list.len()?, 2);
    /// # Ok::<(), rpyc::Error>(())
    /// ```
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> Result<usize, Error> {
        self.call_method("__len__", ())
    }

    /// Python's `obj[key]`.
    ///
    /// ```no_run
    /// # let py = rpyc::python::connect("127.0.0.1", 18861)?;
    /// # let list: rpyc::python::PyObject = py.root()?.call_method("as_list", (1, 2))?;
    /// let second: i64 = list.getitem(1)?;
    /// # Ok::<(), rpyc::Error>(())
    /// ```
    pub fn getitem<R: FromValue>(&self, key: impl crate::python::IntoValue) -> Result<R, Error> {
        self.call_method("__getitem__", (key.into_value()?,))
    }

    /// Python's `key in obj`.
    ///
    /// ```no_run
    /// # let py = rpyc::python::connect("127.0.0.1", 18861)?;
    /// # let list: rpyc::python::PyObject = py.root()?.call_method("as_list", (1, 2))?;
    /// assert!(list.contains(2)?);
    /// # Ok::<(), rpyc::Error>(())
    /// ```
    pub fn contains(&self, key: impl crate::python::IntoValue) -> Result<bool, Error> {
        self.call_method("__contains__", (key.into_value()?,))
    }

    /// Python's `obj == other` (compared by the peer).
    ///
    /// ```no_run
    /// # let py = rpyc::python::connect("127.0.0.1", 18861)?;
    /// let root = py.root()?;
    /// assert!(root.equals(&root)?);
    /// # Ok::<(), rpyc::Error>(())
    /// ```
    pub fn equals(&self, other: impl crate::python::IntoValue) -> Result<bool, Error> {
        let v = self.request(
            Handler::Cmp,
            vec![other.into_value()?, "__eq__".into()],
            self.until(),
            "__eq__",
        )?;
        match v {
            Value::Bool(b) => Ok(b),
            Value::NotImplemented => Ok(false),
            other => bool::from_value(other),
        }
    }

    /// Python's `hash(obj)`.
    ///
    /// ```no_run
    /// # let py = rpyc::python::connect("127.0.0.1", 18861)?;
    /// let h = py.root()?.hash()?;
    /// # Ok::<(), rpyc::Error>(())
    /// ```
    pub fn hash(&self) -> Result<i64, Error> {
        i64::from_value(self.request(Handler::Hash, vec![], self.until(), "__hash__")?)
    }

    /// Python's `dir(obj)`.
    ///
    /// ```no_run
    /// # let py = rpyc::python::connect("127.0.0.1", 18861)?;
    /// assert!(py.root()?.dir()?.iter().any(|n| n == "exposed_add"));
    /// # Ok::<(), rpyc::Error>(())
    /// ```
    pub fn dir(&self) -> Result<Vec<String>, Error> {
        Vec::from_value(self.request(Handler::Dir, vec![], self.until(), "__dir__")?)
    }

    /// Up to `n` more items of a Python iterator (RPyC's `BUFFITER`); empty at its end.
    fn next_batch(&self, n: i64) -> Result<Vec<Value>, Error> {
        match self.request(Handler::BuffIter, vec![n.into()], self.until(), "__next__")? {
            Value::Tuple(items) => Ok(items),
            other => Err(Error::Protocol(format!(
                "BUFFITER answered {} instead of a tuple",
                crate::python::short(&format!("{other:?}"))
            ))),
        }
    }

    /// Iterates a remote iterable lazily: Python's `iter(obj)`, fetching 1,000 items per
    /// round trip (RPyC's `BUFFITER`) as they are consumed.
    ///
    /// ```no_run
    /// # let py = rpyc::python::connect("127.0.0.1", 18861)?;
    /// # let list: rpyc::python::PyObject = py.root()?.call_method("range_list", (10_000,))?;
    /// for item in list.iter()? {
    ///     let n: i64 = item?.get()?;
    ///     if n > 10 { break; }
    /// }
    /// # Ok::<(), rpyc::Error>(())
    /// ```
    pub fn iter(&self) -> Result<PyIter, Error> {
        Ok(PyIter {
            it: self.call_method("__iter__", ())?,
            batch: Vec::new().into_iter(),
            done: false,
        })
    }

    /// Every item of a remote iterable (a `list`, `tuple`, `set`, generator; a `dict` gives
    /// its keys), converted to `T`, in batches of 1,000 per round trip.
    ///
    /// ```no_run
    /// # let py = rpyc::python::connect("127.0.0.1", 18861)?;
    /// # let list: rpyc::python::PyObject = py.root()?.call_method("as_list", (1, 2))?;
    /// let items: Vec<i64> = list.to_vec()?;
    /// # Ok::<(), rpyc::Error>(())
    /// ```
    pub fn to_vec<T: FromValue>(&self) -> Result<Vec<T>, Error> {
        self.iter()?
            .map(|item| item.and_then(T::from_value))
            .collect()
    }

    /// A remote mapping (a `dict`) as a `HashMap`: its keys in batches, then one round trip
    /// per value (RPyC's default policy allows `__getitem__`, not `items()`).
    ///
    /// ```no_run
    /// # let py = rpyc::python::connect("127.0.0.1", 18861)?;
    /// # let d: rpyc::python::PyObject = py.root()?.call_method_kw("as_dict", (), vec![("a", 1.into())])?;
    /// let m: std::collections::HashMap<String, i64> = d.to_map()?;
    /// # Ok::<(), rpyc::Error>(())
    /// ```
    pub fn to_map<K, V>(&self) -> Result<HashMap<K, V>, Error>
    where
        K: FromValue + Eq + Hash,
        V: FromValue,
    {
        let keys: Vec<Value> = self.to_vec()?;
        let mut out = HashMap::with_capacity(keys.len());
        for k in keys {
            let v: V = self.getitem(&k)?;
            out.insert(K::from_value(k)?, v);
        }
        Ok(out)
    }
}

/// A remote iterator ([`PyObject::iter`]): items in batches, each an `Err` if fetching it
/// failed (then the iteration ends).
pub struct PyIter {
    it: PyObject,
    batch: std::vec::IntoIter<Value>,
    done: bool,
}

impl Iterator for PyIter {
    type Item = Result<Value, Error>;

    fn next(&mut self) -> Option<Result<Value, Error>> {
        if let Some(v) = self.batch.next() {
            return Some(Ok(v));
        }
        if self.done {
            return None;
        }
        match self.it.next_batch(BATCH) {
            Ok(items) if items.is_empty() => {
                self.done = true;
                None
            }
            Ok(items) => {
                self.batch = items.into_iter();
                self.batch.next().map(Ok)
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

/// RPyC's kwargs: a tuple of `(name, value)` pairs.
fn kwargs_value(kwargs: Vec<(&str, Value)>) -> Value {
    Value::Tuple(
        kwargs
            .into_iter()
            .map(|(k, v)| Value::Tuple(vec![k.into(), v]))
            .collect(),
    )
}
