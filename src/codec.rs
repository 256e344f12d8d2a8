//! Payload encoding: the one place that knows payloads are CBOR (serde_cbor).
//!
//! Swapping the codec means changing this file and `PROTOCOL.md`, nothing else.

use crate::buffers;
use crate::error::Error;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// Appends the CBOR encoding of `value` to `buf`. A large encoding grows `buf` through
/// [`crate::buffers`], into memory that is already mapped, rather than through fresh
/// allocations.
pub(crate) fn encode_into<T: Serialize + ?Sized>(
    buf: &mut Vec<u8>,
    value: &T,
) -> Result<(), Error> {
    let writer = serde_cbor::ser::IoWrite::new(buffers::PooledWriter(buf));
    let mut ser = serde_cbor::Serializer::new(writer);
    value
        .serialize(&mut ser)
        .map_err(|e| Error::Encode(e.to_string()))
}

/// Decodes exactly one CBOR item filling `bytes`.
pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    serde_cbor::from_slice(bytes).map_err(|e| e.to_string())
}

/// Renders any CBOR item for an error message: text as is, anything else in debug form.
pub(crate) fn describe(bytes: &[u8]) -> String {
    match serde_cbor::from_slice::<serde_cbor::Value>(bytes) {
        Ok(serde_cbor::Value::Text(s)) => s,
        Ok(v) => format!("{v:?}"),
        Err(e) => format!("(undecodable error value: {e})"),
    }
}

/// Finds the ids of every object reference (`{key: id}`) in a payload nobody will decode.
pub(crate) fn object_refs(payload: &[u8], key: &str) -> Vec<u64> {
    use serde_cbor::Value;
    fn walk(v: &Value, key: &str, out: &mut Vec<u64>) {
        match v {
            Value::Map(m) => {
                if m.len() == 1 {
                    if let Some((Value::Text(k), Value::Integer(id))) = m.iter().next() {
                        if k == key && *id > 0 {
                            out.push(*id as u64);
                            return;
                        }
                    }
                }
                for (k, v) in m {
                    walk(k, key, out);
                    walk(v, key, out);
                }
            }
            Value::Array(a) => a.iter().for_each(|v| walk(v, key, out)),
            Value::Tag(_, v) => walk(v, key, out),
            _ => {}
        }
    }
    let mut out = Vec::new();
    if payload.windows(key.len()).any(|w| w == key.as_bytes()) {
        if let Ok(v) = serde_cbor::from_slice::<Value>(payload) {
            walk(&v, key, &mut out);
        }
    }
    out
}

/// A byte buffer sent as one CBOR byte string: use it for binary payloads.
///
/// A plain `Vec<u8>` goes through serde as a sequence of numbers, which is several times larger
/// and slower; `Bytes` is copied as one block. It derefs to `Vec<u8>`, so it reads and grows
/// like one.
///
/// Large `Bytes` (1 MiB and up) received from the peer are built in reused memory, and a
/// dropped `Bytes` hands its memory back for reuse: the allocator would otherwise give every
/// large buffer back to the kernel and fault all its pages in again for the next one.
///
/// ```
/// let mut b = rpyc::Bytes::from(vec![1u8, 2, 3]);
/// b.push(4);
/// assert_eq!(&b[..], &[1, 2, 3, 4]);
/// assert_eq!(b.len(), 4);
/// assert_eq!(b.into_vec(), vec![1, 2, 3, 4]);
/// ```
#[derive(Default, PartialEq, Eq, Hash)]
pub struct Bytes(Vec<u8>);

impl Bytes {
    /// Takes the inner vector out (its memory is then yours, not reused by rpyc).
    ///
    /// ```
    /// let b = rpyc::Bytes::from(&b"abc"[..]);
    /// let v: Vec<u8> = b.into_vec();
    /// assert_eq!(v, b"abc");
    /// ```
    pub fn into_vec(mut self) -> Vec<u8> {
        std::mem::take(&mut self.0)
    }

    /// The bytes, as a slice.
    ///
    /// ```
    /// let b = rpyc::Bytes::from(vec![9u8; 3]);
    /// assert_eq!(b.as_slice(), &[9, 9, 9]);
    /// ```
    pub fn as_slice(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Bytes {
    fn drop(&mut self) {
        buffers::give(std::mem::take(&mut self.0));
    }
}

impl Clone for Bytes {
    /// A copy, in reused memory when it is large.
    fn clone(&self) -> Bytes {
        Bytes(buffers::copy_of(&self.0))
    }
}

impl fmt::Debug for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Bytes({} bytes)", self.0.len())
    }
}

/// Wraps a vector without copying it.
///
/// ```
/// let b = rpyc::Bytes::from(vec![1u8, 2]);
/// assert_eq!(b.as_slice(), &[1, 2]);
/// ```
impl From<Vec<u8>> for Bytes {
    fn from(v: Vec<u8>) -> Bytes {
        Bytes(v)
    }
}

/// Copies a slice.
///
/// ```
/// let b = rpyc::Bytes::from(&[1u8, 2][..]);
/// assert_eq!(b.as_slice(), &[1, 2]);
/// ```
impl From<&[u8]> for Bytes {
    fn from(v: &[u8]) -> Bytes {
        Bytes(buffers::copy_of(v))
    }
}

/// Reads as the inner `Vec<u8>`.
///
/// ```
/// let b = rpyc::Bytes::from(vec![1u8, 2, 3]);
/// assert_eq!(b.len(), 3);
/// assert_eq!(b.first(), Some(&1));
/// ```
impl std::ops::Deref for Bytes {
    type Target = Vec<u8>;
    fn deref(&self) -> &Vec<u8> {
        &self.0
    }
}

/// Writes as the inner `Vec<u8>`.
///
/// ```
/// let mut b = rpyc::Bytes::default();
/// b.extend_from_slice(b"hi");
/// b[0] = b'H';
/// assert_eq!(b.as_slice(), b"Hi");
/// ```
impl std::ops::DerefMut for Bytes {
    fn deref_mut(&mut self) -> &mut Vec<u8> {
        &mut self.0
    }
}

impl Serialize for Bytes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Bytes, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Bytes;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a byte string")
            }
            fn visit_bytes<E>(self, v: &[u8]) -> Result<Bytes, E> {
                Ok(Bytes(buffers::copy_of(v)))
            }
            fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Bytes, E> {
                Ok(Bytes(v))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<Bytes, A::Error> {
                let mut v = Vec::with_capacity(a.size_hint().unwrap_or(0).min(1 << 16));
                while let Some(b) = a.next_element::<u8>()? {
                    v.push(b);
                }
                Ok(Bytes(v))
            }
        }
        d.deserialize_byte_buf(V)
    }
}
