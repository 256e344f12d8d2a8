//! Payload encoding: the one place that knows payloads are CBOR (serde_cbor).
//!
//! Swapping the codec means changing this file and `PROTOCOL.md`, nothing else.
//!
//! # Detached byte strings
//!
//! A large payload that is one byte string (a `Bytes` result), or a one-element array holding
//! one (a call with one `Bytes` argument), whose data runs to the end of its frame, is received
//! in two parts ([`crate::wire::FrameReader::read_frame`]): the frame body ends in a placeholder
//! empty byte string (`0x40`), and the string's original head and data are kept aside in a
//! [`Detached`]. The wire format is unchanged; only the receiving side's buffers differ.
//!
//! Before decoding such a payload, its receiver [`offer`]s the detached part for exactly that
//! payload (matched by address and length) on its thread. [`decode`] of that payload then puts
//! the data in a thread-local slot, and [`Bytes`]'s visitor, on seeing an empty byte string
//! while the slot is full, takes the data vector as its content: no copy. As the matched layouts
//! hold exactly one byte string, the placeholder is unambiguous. If the data was not taken (the
//! target was not `Bytes`, or decoding failed; a `Bytes` dropped during decoding gives it back),
//! the contiguous payload is rebuilt and decoded again, so the outcome, errors included, is
//! always what decoding the bytes as sent gives.

use crate::buffers;
use crate::error::Error;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::cell::RefCell;
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

/// Decodes exactly one CBOR item filling `bytes`. A payload [`offer`]ed with a detached byte
/// string decodes as the contiguous payload would (see the module docs).
pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    match take_offered(bytes) {
        None => decode_plain(bytes),
        Some(d) => decode_detached(bytes, d),
    }
}

fn decode_plain<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    serde_cbor::from_slice(bytes).map_err(|e| e.to_string())
}

/// The head and data of a byte string kept outside its frame body, which ends in a placeholder
/// empty byte string instead. Its drop hands the data buffer back to [`crate::buffers`].
pub(crate) struct Detached {
    /// The byte string's original CBOR head (1 to 9 bytes).
    pub head: Vec<u8>,
    /// The byte string's data.
    pub tail: Vec<u8>,
}

impl Drop for Detached {
    fn drop(&mut self) {
        buffers::give(std::mem::take(&mut self.tail));
    }
}

/// The CBOR placeholder that stands for a detached byte string: an empty byte string.
pub(crate) const PLACEHOLDER: u8 = 0x40;

/// A detached part offered for the decoding of one payload on this thread.
struct Offered {
    ptr: usize,
    len: usize,
    /// `None` while a decode holds it, or after a decode kept its data.
    detached: Option<Detached>,
}

/// While [`decode_detached`] runs: the data for the placeholder, and what became of it.
struct Slot {
    /// The data, until a `Bytes` takes it.
    tail: Option<Vec<u8>>,
    /// Address of the data once taken, so a `Bytes` dropped during decoding can give it back.
    taken: Option<usize>,
    /// A second empty byte string wanted the data after it was taken.
    conflict: bool,
}

thread_local! {
    static OFFERS: RefCell<Vec<Offered>> = const { RefCell::new(Vec::new()) };
    static SLOT: RefCell<Option<Slot>> = const { RefCell::new(None) };
}

/// Makes `detached` available to the decoding of exactly `payload` on this thread until the
/// returned guard drops; then whatever was not taken goes back to the buffer pool. `None` costs
/// nothing.
pub(crate) fn offer(payload: &[u8], detached: Option<Detached>) -> OfferGuard {
    let key = detached.map(|d| {
        let key = (payload.as_ptr() as usize, payload.len());
        OFFERS.with(|o| {
            o.borrow_mut().push(Offered {
                ptr: key.0,
                len: key.1,
                detached: Some(d),
            })
        });
        key
    });
    OfferGuard { key }
}

/// Withdraws an [`offer`] when dropped.
pub(crate) struct OfferGuard {
    key: Option<(usize, usize)>,
}

impl Drop for OfferGuard {
    fn drop(&mut self) {
        if let Some((ptr, len)) = self.key {
            let gone = OFFERS.with(|o| {
                let mut o = o.borrow_mut();
                let at = o.iter().rposition(|x| x.ptr == ptr && x.len == len)?;
                Some(o.remove(at))
            });
            drop(gone); // outside the borrow: returns the data to the pool
        }
    }
}

fn take_offered(bytes: &[u8]) -> Option<Detached> {
    if bytes.last() != Some(&PLACEHOLDER) {
        return None;
    }
    let (ptr, len) = (bytes.as_ptr() as usize, bytes.len());
    OFFERS
        .try_with(|o| {
            let mut o = o.borrow_mut();
            let x = o.iter_mut().rev().find(|x| x.ptr == ptr && x.len == len)?;
            x.detached.take()
        })
        .ok()
        .flatten()
}

fn put_back(bytes: &[u8], d: Detached) {
    let (ptr, len) = (bytes.as_ptr() as usize, bytes.len());
    let d = OFFERS.with(|o| {
        let mut o = o.borrow_mut();
        match o.iter_mut().rev().find(|x| x.ptr == ptr && x.len == len) {
            Some(x) if x.detached.is_none() => {
                x.detached = Some(d);
                None
            }
            _ => Some(d),
        }
    });
    drop(d);
}

/// The payload as sent: `bytes` without its placeholder, then the original head and data.
fn contiguous(bytes: &[u8], d: &Detached) -> Vec<u8> {
    let prefix = &bytes[..bytes.len() - 1];
    let n = prefix.len() + d.head.len() + d.tail.len();
    let mut v = buffers::take_empty(n).unwrap_or_else(|| Vec::with_capacity(n));
    v.extend_from_slice(prefix);
    v.extend_from_slice(&d.head);
    v.extend_from_slice(&d.tail);
    v
}

/// Arms the slot for one decode, and puts back what was there before when dropped, also when a
/// `Deserialize` panics: a stale slot must never hand data to an unrelated decode.
struct Armed {
    outer: Option<Option<Slot>>,
}

impl Armed {
    fn new(slot: Slot) -> Armed {
        Armed {
            outer: Some(SLOT.with(|s| s.replace(Some(slot)))),
        }
    }

    /// Disarms the slot; returns what became of it.
    fn finish(mut self) -> Slot {
        let outer = self.outer.take().expect("finished once");
        SLOT.with(|s| s.replace(outer))
            .expect("the slot is armed during decoding")
    }

    fn conflict(&self) -> bool {
        SLOT.with(|s| s.borrow().as_ref().is_some_and(|s| s.conflict))
    }
}

impl Drop for Armed {
    fn drop(&mut self) {
        if let Some(outer) = self.outer.take() {
            let stale = SLOT.with(|s| s.replace(outer));
            drop(stale);
        }
    }
}

fn decode_detached<T: DeserializeOwned>(bytes: &[u8], mut d: Detached) -> Result<T, String> {
    let armed = Armed::new(Slot {
        tail: Some(std::mem::take(&mut d.tail)),
        taken: None,
        conflict: false,
    });
    let mut r = serde_cbor::from_slice::<T>(bytes).map_err(|e| e.to_string());
    if armed.conflict() {
        // Two values wanted the one byte string: drop them (giving the data back), start over.
        r = Err(String::new());
    }
    match armed.finish().tail {
        // Taken by a `Bytes` that is part of the result.
        None if r.is_ok() => r,
        // Kept by something that outlived decoding without being part of a result (a
        // `Deserialize` that leaks its values); nothing else can be done.
        None => r.map_err(|e| {
            if e.is_empty() {
                "a detached byte string was taken twice".into()
            } else {
                e
            }
        }),
        Some(tail) => {
            d.tail = tail;
            drop(r);
            let whole = contiguous(bytes, &d);
            let r = {
                // No slot while decoding the contiguous payload.
                let _plain = Armed {
                    outer: Some(SLOT.with(|s| s.take())),
                };
                decode_plain(&whole)
            };
            buffers::give(whole);
            put_back(bytes, d);
            r
        }
    }
}

/// For [`Bytes`]'s visitor: the detached data, if a decode is running with it untaken.
fn claim_tail() -> Option<Vec<u8>> {
    SLOT.with(|s| {
        let mut s = s.borrow_mut();
        let s = s.as_mut()?;
        match s.tail.take() {
            Some(t) => {
                s.taken = Some(t.as_ptr() as usize);
                Some(t)
            }
            None => {
                s.conflict |= s.taken.is_some();
                None
            }
        }
    })
}

/// For [`Bytes`]'s drop: gives the detached data back to a running decode it came from.
fn reclaim_tail(v: &mut Vec<u8>) -> bool {
    SLOT.try_with(|s| {
        let mut s = s.borrow_mut();
        match s.as_mut() {
            Some(s) if s.tail.is_none() && s.taken == Some(v.as_ptr() as usize) => {
                s.taken = None;
                s.tail = Some(std::mem::take(v));
                true
            }
            _ => false,
        }
    })
    .unwrap_or(false)
}

/// Renders any CBOR item for an error message: text as is, anything else in debug form.
pub(crate) fn describe(bytes: &[u8]) -> String {
    if let Some(d) = take_offered(bytes) {
        let whole = contiguous(bytes, &d);
        put_back(bytes, d);
        let s = describe(&whole);
        buffers::give(whole);
        return s;
    }
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
        // Only a detached byte string's data (large: see `wire`) can go back to a decode.
        if self.0.capacity() >= 1 << 16 && reclaim_tail(&mut self.0) {
            return;
        }
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
                if v.is_empty() {
                    if let Some(tail) = claim_tail() {
                        return Ok(Bytes(tail));
                    }
                }
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
