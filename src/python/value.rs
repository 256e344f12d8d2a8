//! [`Value`]: what travels between Rust and Python, and its conversions to and from Rust types.

use crate::error::Error;
use crate::python::object::PyObject;
use crate::python::service::Service;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_cbor::Value as Cbor;
use std::fmt;

/// A Python value: everything RPyC sends by value (its "brine" types), or a reference to an
/// object that stays where it lives.
///
/// Python's `list`, `dict`, `set` and every other object travel by reference: they arrive as
/// [`Value::Remote`] (a [`PyObject`]; read one with [`PyObject::to_vec`] or
/// [`PyObject::to_map`]). Rust sends sequences as tuples and maps as tuples of pairs.
///
/// ```
/// use rpyc::python::Value;
/// assert_eq!(Value::from(42), Value::Int(42));
/// assert_eq!(Value::from("x"), Value::Str("x".into()));
/// let pair: (i64, String) = Value::Tuple(vec![1.into(), "a".into()]).get()?;
/// assert_eq!(pair, (1, "a".to_string()));
/// # Ok::<(), rpyc::Error>(())
/// ```
#[derive(Clone)]
#[non_exhaustive]
pub enum Value {
    /// `None`.
    None,
    /// `True` or `False`.
    Bool(bool),
    /// An `int` that fits in 64 bits.
    Int(i64),
    /// A larger `int`, in decimal (`-?[0-9]+`, no leading zeros).
    BigInt(String),
    /// A `float`.
    Float(f64),
    /// A `complex`: real and imaginary parts.
    Complex(f64, f64),
    /// A `str`.
    Str(String),
    /// A `bytes`.
    Bytes(Vec<u8>),
    /// A `tuple`.
    Tuple(Vec<Value>),
    /// A `frozenset`, in the sender's iteration order.
    FrozenSet(Vec<Value>),
    /// A `slice(start, stop, step)`.
    Slice(Box<[Value; 3]>),
    /// `...`
    Ellipsis,
    /// `NotImplemented`.
    NotImplemented,
    /// An object of the peer's, by reference.
    Remote(PyObject),
    /// An object of ours (a [`callback`](crate::python::callback) or a
    /// [`Service`](crate::python::Service)), sent by reference.
    Local(Service),
}

impl fmt::Debug for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::None => f.write_str("None"),
            Value::Bool(b) => f.write_str(if *b { "True" } else { "False" }),
            Value::Int(i) => write!(f, "{i}"),
            Value::BigInt(s) => f.write_str(s),
            Value::Float(x) => write!(f, "{x:?}"),
            Value::Complex(re, im) => write!(f, "({re:?}{im:+?}j)"),
            Value::Str(s) => write!(f, "{s:?}"),
            Value::Bytes(b) => {
                let shown = &b[..b.len().min(64)];
                write!(f, "b{:?}", String::from_utf8_lossy(shown))?;
                if b.len() > 64 {
                    write!(f, "…({} bytes)", b.len())?;
                }
                Ok(())
            }
            Value::Tuple(items) => {
                let mut t = f.debug_tuple("");
                for i in items {
                    t.field(i);
                }
                t.finish()
            }
            Value::FrozenSet(items) => f.debug_set().entries(items).finish(),
            Value::Slice(p) => write!(f, "slice({:?}, {:?}, {:?})", p[0], p[1], p[2]),
            Value::Ellipsis => f.write_str("Ellipsis"),
            Value::NotImplemented => f.write_str("NotImplemented"),
            Value::Remote(o) => write!(f, "{o:?}"),
            Value::Local(o) => write!(f, "{o:?}"),
        }
    }
}

impl PartialEq for Value {
    /// Plain values compare by value (a frozenset as a set); references by identity.
    fn eq(&self, other: &Value) -> bool {
        use Value::*;
        match (self, other) {
            (None, None) | (Ellipsis, Ellipsis) | (NotImplemented, NotImplemented) => true,
            (Bool(a), Bool(b)) => a == b,
            (Int(a), Int(b)) => a == b,
            (BigInt(a), BigInt(b)) => a == b,
            (Float(a), Float(b)) => a == b || (a.is_nan() && b.is_nan()),
            (Complex(a, b), Complex(c, d)) => a == c && b == d,
            (Str(a), Str(b)) => a == b,
            (Bytes(a), Bytes(b)) => a == b,
            (Tuple(a), Tuple(b)) => a == b,
            (FrozenSet(a), FrozenSet(b)) => a.len() == b.len() && a.iter().all(|x| b.contains(x)),
            (Slice(a), Slice(b)) => a == b,
            (Remote(a), Remote(b)) => a.same(b),
            (Local(a), Local(b)) => a.same(b),
            _ => false,
        }
    }
}

impl Value {
    /// Converts to a Rust type: numbers, strings, `bool`, `Option`, tuples, `Vec` (from a
    /// tuple or frozenset), any `Deserialize` type, [`Value`] itself or a [`PyObject`].
    ///
    /// ```
    /// use rpyc::python::Value;
    /// let v = Value::Tuple(vec![Value::Float(0.5), Value::Float(1.5)]);
    /// assert_eq!(v.get::<Vec<f64>>()?, vec![0.5, 1.5]);
    /// assert!(Value::Str("x".into()).get::<i64>().is_err());
    /// # Ok::<(), rpyc::Error>(())
    /// ```
    pub fn get<T: FromValue>(self) -> Result<T, Error> {
        T::from_value(self)
    }

    /// The Python type name of this value (`"int"`, `"tuple"`, or the class of a remote
    /// object), for messages.
    ///
    /// ```
    /// assert_eq!(rpyc::python::Value::from(b"x".to_vec()).type_name(), "bytes");
    /// ```
    pub fn type_name(&self) -> String {
        match self {
            Value::None => "NoneType".into(),
            Value::Bool(_) => "bool".into(),
            Value::Int(_) | Value::BigInt(_) => "int".into(),
            Value::Float(_) => "float".into(),
            Value::Complex(..) => "complex".into(),
            Value::Str(_) => "str".into(),
            Value::Bytes(_) => "bytes".into(),
            Value::Tuple(_) => "tuple".into(),
            Value::FrozenSet(_) => "frozenset".into(),
            Value::Slice(_) => "slice".into(),
            Value::Ellipsis => "ellipsis".into(),
            Value::NotImplemented => "NotImplementedType".into(),
            Value::Remote(o) => o.class_name().to_string(),
            Value::Local(o) => o.name_pack(),
        }
    }
}

macro_rules! from_int {
    ($($t:ty),*) => {$(
        impl From<$t> for Value {
            fn from(i: $t) -> Value {
                Value::Int(i as i64)
            }
        }
    )*};
}
from_int!(i8, i16, i32, i64, u8, u16, u32);

impl From<u64> for Value {
    fn from(i: u64) -> Value {
        match i64::try_from(i) {
            Ok(i) => Value::Int(i),
            Err(_) => Value::BigInt(i.to_string()),
        }
    }
}
impl From<bool> for Value {
    fn from(b: bool) -> Value {
        Value::Bool(b)
    }
}
impl From<f64> for Value {
    fn from(x: f64) -> Value {
        Value::Float(x)
    }
}
impl From<&str> for Value {
    fn from(s: &str) -> Value {
        Value::Str(s.into())
    }
}
impl From<String> for Value {
    fn from(s: String) -> Value {
        Value::Str(s)
    }
}
impl From<Vec<u8>> for Value {
    fn from(b: Vec<u8>) -> Value {
        Value::Bytes(b)
    }
}
impl From<PyObject> for Value {
    fn from(o: PyObject) -> Value {
        Value::Remote(o)
    }
}
impl From<Service> for Value {
    fn from(o: Service) -> Value {
        Value::Local(o)
    }
}
impl From<()> for Value {
    fn from(_: ()) -> Value {
        Value::None
    }
}

/// A Rust value that can be sent to Python: any `Serialize` type (sequences become tuples,
/// maps tuples of `(key, value)` pairs, `rpyc::Bytes` becomes `bytes`), a [`Value`], a
/// [`PyObject`] or an object of ours ([`Service`]).
pub trait IntoValue {
    /// The value to send, or why it cannot be sent.
    fn into_value(self) -> Result<Value, Error>;
}

impl<T: Serialize> IntoValue for T {
    fn into_value(self) -> Result<Value, Error> {
        let cbor = serde_cbor::value::to_value(&self)
            .map_err(|e| Error::Encode(format!("cannot send this value to Python: {e}")))?;
        Ok(from_cbor(cbor))
    }
}
impl IntoValue for Value {
    fn into_value(self) -> Result<Value, Error> {
        Ok(self)
    }
}
impl IntoValue for &Value {
    fn into_value(self) -> Result<Value, Error> {
        Ok(self.clone())
    }
}
impl IntoValue for PyObject {
    fn into_value(self) -> Result<Value, Error> {
        Ok(Value::Remote(self))
    }
}
impl IntoValue for &PyObject {
    fn into_value(self) -> Result<Value, Error> {
        Ok(Value::Remote(self.clone()))
    }
}
impl IntoValue for Service {
    fn into_value(self) -> Result<Value, Error> {
        Ok(Value::Local(self))
    }
}

/// A Rust type a Python value converts to (see [`Value::get`]).
pub trait FromValue: Sized {
    /// Converts, or says why the value does not fit.
    fn from_value(v: Value) -> Result<Self, Error>;
}

impl<T: DeserializeOwned> FromValue for T {
    fn from_value(v: Value) -> Result<T, Error> {
        let shown = format!("{v:?}");
        let cbor = to_cbor(v)?;
        serde_cbor::value::from_value(cbor).map_err(|e| {
            Error::Decode(format!(
                "the Python value {} does not convert to {}: {e}",
                crate::python::short(&shown),
                std::any::type_name::<T>()
            ))
        })
    }
}
impl FromValue for Value {
    fn from_value(v: Value) -> Result<Value, Error> {
        Ok(v)
    }
}
impl FromValue for PyObject {
    fn from_value(v: Value) -> Result<PyObject, Error> {
        match v {
            Value::Remote(o) => Ok(o),
            other => Err(Error::Decode(format!(
                "expected a Python object by reference, got the {} value {}",
                other.type_name(),
                crate::python::short(&format!("{other:?}"))
            ))),
        }
    }
}

/// Arguments of a call: a tuple of up to 8 values that are each [`IntoValue`], `()` for none,
/// or a `Vec<Value>`.
pub trait PyArgs {
    /// The positional arguments.
    fn into_args(self) -> Result<Vec<Value>, Error>;
}
impl PyArgs for Vec<Value> {
    fn into_args(self) -> Result<Vec<Value>, Error> {
        Ok(self)
    }
}
impl PyArgs for () {
    fn into_args(self) -> Result<Vec<Value>, Error> {
        Ok(Vec::new())
    }
}
macro_rules! args_tuple {
    ($($a:ident),*) => {
        impl<$($a: IntoValue,)*> PyArgs for ($($a,)*) {
            #[allow(non_snake_case)]
            fn into_args(self) -> Result<Vec<Value>, Error> {
                let ($($a,)*) = self;
                Ok(vec![$($a.into_value()?,)*])
            }
        }
    };
}
args_tuple!(A);
args_tuple!(A, B);
args_tuple!(A, B, C);
args_tuple!(A, B, C, D);
args_tuple!(A, B, C, D, E);
args_tuple!(A, B, C, D, E, F);
args_tuple!(A, B, C, D, E, F, G);
args_tuple!(A, B, C, D, E, F, G, H);

/// A serde value as a Python one.
fn from_cbor(c: Cbor) -> Value {
    match c {
        Cbor::Null => Value::None,
        Cbor::Bool(b) => Value::Bool(b),
        Cbor::Integer(i) => match i64::try_from(i) {
            Ok(i) => Value::Int(i),
            Err(_) => Value::BigInt(i.to_string()),
        },
        Cbor::Float(x) => Value::Float(x),
        Cbor::Text(s) => Value::Str(s),
        Cbor::Bytes(b) => Value::Bytes(b),
        Cbor::Array(items) => Value::Tuple(items.into_iter().map(from_cbor).collect()),
        Cbor::Map(m) => Value::Tuple(
            m.into_iter()
                .map(|(k, v)| Value::Tuple(vec![from_cbor(k), from_cbor(v)]))
                .collect(),
        ),
        Cbor::Tag(_, inner) => from_cbor(*inner),
        // serde_cbor's Value has a hidden variant; nothing serializes to it.
        _ => Value::None,
    }
}

/// A Python value as a serde one, for `Deserialize` types.
fn to_cbor(v: Value) -> Result<Cbor, Error> {
    Ok(match v {
        Value::None => Cbor::Null,
        Value::Bool(b) => Cbor::Bool(b),
        Value::Int(i) => Cbor::Integer(i as i128),
        Value::BigInt(s) => Cbor::Integer(s.parse::<i128>().map_err(|_| {
            Error::Decode(format!(
                "the Python int {} does not fit in 128 bits: take it as a Value",
                crate::python::short(&s)
            ))
        })?),
        Value::Float(x) => Cbor::Float(x),
        Value::Complex(re, im) => Cbor::Array(vec![Cbor::Float(re), Cbor::Float(im)]),
        Value::Str(s) => Cbor::Text(s),
        Value::Bytes(b) => Cbor::Bytes(b),
        Value::Tuple(items) | Value::FrozenSet(items) => {
            Cbor::Array(items.into_iter().map(to_cbor).collect::<Result<_, _>>()?)
        }
        Value::Slice(p) => {
            let [a, b, c] = *p;
            Cbor::Array(vec![to_cbor(a)?, to_cbor(b)?, to_cbor(c)?])
        }
        other @ (Value::Ellipsis | Value::NotImplemented | Value::Local(_)) => {
            return Err(Error::Decode(format!(
                "the Python value {other:?} has no Rust equivalent: take it as a Value"
            )))
        }
        Value::Remote(o) => {
            return Err(Error::Decode(format!(
                "a Python {} arrived by reference, not by value: take it as a PyObject and \
                 read it with to_vec(), to_map() or call_method()",
                o.class_name()
            )))
        }
    })
}
