//! Payload encoding: the one place that knows payloads are CBOR (serde_cbor).
//!
//! Swapping the codec means changing this module (this file and `codec/`) and `PROTOCOL.md`,
//! nothing else.
//!
//! # Payloads that are only looked at
//!
//! Some payloads are never decoded into a type: a payload nobody will decode still has its
//! object references released ([`object_refs`]), a release list is applied as it is read
//! ([`decode_releases`]), and an error message quotes what a peer sent ([`describe`]). These
//! go through a walker (`codec/walk.rs`) that checks the CBOR and allocates nothing, rather than
//! through a `serde_cbor::Value` tree, which costs hundreds of times the size of a payload of
//! tiny items. Each costs at most twice the payload (see each function), and an error text
//! quotes at most [`QUOTE_MAX`] bytes of a peer's data.
//!
//! # Detached byte strings
//!
//! A large payload that is one byte string (a `Bytes` result), or a one-element array holding
//! one (a call with one `Bytes` argument), whose data runs to the end of its frame, is received
//! in two parts ([`crate::transport::reader::FrameReader::read_frame`]): the frame body ends in a placeholder
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
//! always what decoding the bytes as sent gives. [`describe`] shows the placeholder as the
//! detached string itself, without rebuilding anything.

use crate::base::buffers;
use crate::error::Error;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::cell::RefCell;
use std::fmt;
use std::sync::Arc;

#[cfg(test)]
mod properties;
mod render;
pub(crate) mod walk;

/// Appends the CBOR encoding of `value` to `buf`. A large encoding grows `buf` through
/// [`crate::base::buffers`], into memory that is already mapped, rather than through fresh
/// allocations.
///
/// Inside [`splicing_into`] for `buf`, a large [`Bytes`] is not copied: its head is written
/// and its memory recorded as a [`Splice`] at that point of `buf`.
pub(crate) fn encode_into<T: Serialize + ?Sized>(
    buf: &mut Vec<u8>,
    value: &T,
) -> Result<(), Error> {
    let writer = serde_cbor::ser::IoWrite::new(SpliceWriter(buf));
    let mut ser = serde_cbor::Serializer::new(writer);
    value
        .serialize(&mut ser)
        .map_err(|e| Error::Encode(e.to_string()))
}

/// Byte strings of at least this many bytes are sent from their own memory (a [`Splice`])
/// rather than copied into their frame: below it, a copy costs less than one more piece for
/// the vectored write.
pub(crate) const SPLICE_MIN: usize = 16 * 1024;

/// A [`Bytes`]'s memory, to be sent at byte `at` of a frame's buffer.
pub(crate) struct Splice {
    pub(crate) at: usize,
    pub(crate) data: Arc<Store>,
}

/// How a [`Bytes`] being serialized meets the writer of the frame it goes into, on one thread.
///
/// `Bytes::serialize` offers its memory (an `Arc`, so the frame keeps it alive however long
/// it takes to send, even after the `Bytes` is gone); the CBOR serializer then writes its head
/// and hands its data to [`SpliceWriter`], which takes the offer instead of copying only if
/// the data is the offered memory itself and it writes the buffer [`splicing_into`] named.
/// Anything else (another serializer, another buffer) copies as usual.
#[derive(Default)]
struct Splicing {
    /// Address of the buffer being encoded with splices, or 0.
    target: usize,
    offer: Option<Arc<Store>>,
    taken: Vec<Splice>,
}

thread_local! {
    static SPLICING: RefCell<Splicing> = RefCell::new(Splicing::default());
}

/// Runs `f`, which encodes into `buf`, so that large [`Bytes`] become `splices` instead of
/// being copied into `buf`. Nests: a frame encoded inside `f` (a call made by a handler) has
/// its own.
pub(crate) fn splicing_into<R>(
    buf: &mut Vec<u8>,
    splices: &mut Vec<Splice>,
    f: impl FnOnce(&mut Vec<u8>) -> R,
) -> R {
    /// Puts the outer state back, even if `f` panics.
    struct Restore(Option<Splicing>);
    impl Drop for Restore {
        fn drop(&mut self) {
            if let Some(outer) = self.0.take() {
                let _ = SPLICING.try_with(|s| *s.borrow_mut() = outer);
            }
        }
    }
    let mine = Splicing {
        target: buf as *const Vec<u8> as usize,
        offer: None,
        taken: std::mem::take(splices),
    };
    let restore = Restore(Some(SPLICING.with(|s| s.replace(mine))));
    let r = f(buf);
    *splices = SPLICING.with(|s| std::mem::take(&mut s.borrow_mut().taken));
    drop(restore);
    r
}

/// A [`Bytes`]'s memory offered to the frame being encoded, while it serializes.
struct Offer(bool);

impl Offer {
    fn new(store: &Arc<Store>) -> Offer {
        let made = SPLICING
            .try_with(|s| {
                let mut s = s.borrow_mut();
                if s.target == 0 {
                    return false;
                }
                s.offer = Some(store.clone());
                true
            })
            .unwrap_or(false);
        Offer(made)
    }
}

impl Drop for Offer {
    fn drop(&mut self) {
        if self.0 {
            let _ = SPLICING.try_with(|s| s.borrow_mut().offer = None);
        }
    }
}

/// Appends to a buffer through [`buffers::append`], except the data of an offered
/// [`Bytes`] (see [`Splicing`]).
struct SpliceWriter<'a>(&'a mut Vec<u8>);

impl SpliceWriter<'_> {
    fn spliced(&mut self, data: &[u8]) -> bool {
        let at = self.0.len();
        let buf = &*self.0 as *const Vec<u8> as usize;
        SPLICING
            .try_with(|s| {
                let mut s = s.borrow_mut();
                let offered = s.offer.as_ref().is_some_and(|o| {
                    let o = o.as_slice();
                    o.as_ptr() == data.as_ptr() && o.len() == data.len()
                });
                if !offered || s.target != buf {
                    return false;
                }
                let data = s.offer.take().expect("offered");
                s.taken.push(Splice { at, data });
                true
            })
            .unwrap_or(false)
    }
}

impl std::io::Write for SpliceWriter<'_> {
    #[inline]
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.write_all(data)?;
        Ok(data.len())
    }

    #[inline]
    fn write_all(&mut self, data: &[u8]) -> std::io::Result<()> {
        if data.len() >= SPLICE_MIN && self.spliced(data) {
            return Ok(());
        }
        buffers::append(self.0, data);
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Decodes exactly one CBOR item filling `bytes`. A payload [`offer`]ed with a detached byte
/// string decodes as the contiguous payload would (see the module docs).
///
/// An error's text is at most about [`QUOTE_MAX`] bytes, whatever it quotes.
pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    match take_offered(bytes) {
        None => decode_plain(bytes),
        Some(d) => decode_detached(bytes, d),
    }
    .map_err(bounded)
}

fn decode_plain<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    serde_cbor::from_slice(bytes).map_err(|e| e.to_string())
}

/// The head and data of a byte string kept outside its frame body, which ends in a placeholder
/// empty byte string instead. Its drop hands the data buffer back to [`crate::base::buffers`].
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

/// Longest quote of a peer's data in an error message, in bytes, before the cut mark `…` and a
/// short note of the quoted item's size.
pub(crate) const QUOTE_MAX: usize = 256;

/// Renders one CBOR item for an error message in at most `limit` bytes of text, then the cut
/// mark `…` and a note of the whole item's size if it did not fit: a text string as is, anything
/// else in a compact diagnostic notation (`[1, "a", h'0102', {"k": 2.5}, null]`, long byte
/// strings by their first bytes and length). A malformed item gives a short
/// `(undecodable: …)` note instead.
///
/// Memory is the text it returns (at most `limit` plus about 64 bytes) and a fixed walker; the
/// walk stops where the limit is reached. A payload [`offer`]ed with a detached byte string is
/// described as the contiguous payload would be, without rebuilding it.
pub(crate) fn describe(bytes: &[u8], limit: usize) -> String {
    match take_offered(bytes) {
        None => render::describe(bytes, None, limit),
        Some(d) => {
            let s = render::describe(bytes, Some(&d.tail), limit);
            put_back(bytes, d);
            s
        }
    }
}

/// Every object reference in a payload nobody will decode: each map of exactly one pair whose
/// key is the text `key` and whose value is an unsigned integer above 0, found anywhere (in
/// arrays, map keys and values, tags), as `(id, occurrences)` sorted by id. A malformed
/// payload gives the references found before the malformed part.
///
/// Memory is the result only: 16 bytes per occurrence while counting (each takes at least 12
/// payload bytes), trimmed to 16 bytes per distinct id when that halves it; no value tree.
/// A payload that does not contain the bytes of `key` costs one scan.
pub(crate) fn object_refs(payload: &[u8], key: &str) -> Vec<(u64, u64)> {
    let key = key.as_bytes();
    if key.is_empty() || !payload.windows(key.len()).any(|w| w == key) {
        return Vec::new();
    }
    // Count first, so the vector is allocated once, at its final size.
    let mut out = Vec::with_capacity(scan_refs(payload, key, |_| {}));
    scan_refs(payload, key, |id| out.push((id, 1)));
    out.sort_unstable_by_key(|&(id, _)| id);
    out.dedup_by(|later, kept| {
        let same = later.0 == kept.0;
        if same {
            kept.1 += later.1;
        }
        same
    });
    if out.len() < out.capacity() / 2 {
        out.shrink_to_fit();
    }
    out
}

/// Walks `payload`, calling `found` with each object reference's id; returns how many.
fn scan_refs(payload: &[u8], key: &[u8], mut found: impl FnMut(u64)) -> usize {
    let mut w = walk::Walker::new(payload);
    let mut n = 0;
    loop {
        if let Some(id) = w.object_ref(key) {
            found(id);
            n += 1;
        } else if !matches!(w.next(), Ok(Some(_))) {
            return n;
        }
    }
}

/// Most `[id, count]` pairs [`decode_releases`] hands over at once.
pub(crate) const RELEASE_CHUNK: usize = 1024;

/// Reads a RELEASE payload, `[[id, count], ...]` (definite or indefinite arrays, accepted
/// exactly when decoding it as a `Vec<(u64, u64)>` would succeed), and calls `apply` with its
/// pairs in order, in chunks of at most [`RELEASE_CHUNK`]. A malformed payload applies nothing
/// and gives the reason.
///
/// Memory is one chunk (16 KiB at most, less for a short payload), whatever the payload's
/// length: it is walked twice, once to check it and once to apply it.
pub(crate) fn decode_releases(
    payload: &[u8],
    mut apply: impl FnMut(&[(u64, u64)]),
) -> Result<(), String> {
    walk_releases(payload, |_| {})?;
    // A pair takes at least 3 bytes.
    let mut chunk = Vec::with_capacity(RELEASE_CHUNK.min(payload.len() / 3 + 1));
    walk_releases(payload, |pair| {
        chunk.push(pair);
        if chunk.len() == RELEASE_CHUNK {
            apply(&chunk);
            chunk.clear();
        }
    })?;
    if !chunk.is_empty() {
        apply(&chunk);
    }
    Ok(())
}

/// Walks a RELEASE payload, calling `pair` with each pair; see [`decode_releases`].
fn walk_releases(payload: &[u8], mut pair: impl FnMut((u64, u64))) -> Result<(), String> {
    use walk::Item;
    let mut w = walk::Walker::new(payload);
    // The next item that is not a tag (serde_cbor reads through tags), and how many tags it
    // is inside.
    fn untagged<'a>(w: &mut walk::Walker<'a>) -> Result<(Item<'a>, usize), String> {
        let mut tags = 0;
        loop {
            match w.next() {
                Ok(Some(Item::Tag(_))) => tags += 1,
                Ok(Some(item)) => return Ok((item, tags)),
                Ok(None) => return Err("unexpected end".into()),
                Err(e) => return Err(e.to_string()),
            }
        }
    }
    fn close(w: &mut walk::Walker<'_>, n: usize, what: &str) -> Result<(), String> {
        for _ in 0..n {
            match w.next() {
                Ok(Some(Item::End)) => {}
                Ok(_) => return Err(format!("{what} has more items than expected")),
                Err(e) => return Err(e.to_string()),
            }
        }
        Ok(())
    }
    fn uint(w: &mut walk::Walker<'_>) -> Result<u64, String> {
        match untagged(w)? {
            (Item::Uint(v), tags) => close(w, tags, "a tag").map(|()| v),
            _ => Err("an object id or count is not an unsigned integer".into()),
        }
    }
    let (outer_tags, what) = match untagged(&mut w)? {
        (Item::Array(_), tags) => (tags, "the release list"),
        _ => return Err("a release message is not an array of [id, count] pairs".into()),
    };
    loop {
        let tags = match untagged(&mut w)? {
            (Item::End, _) => break,
            (Item::Array(Some(2) | None), tags) => tags,
            _ => return Err("a release entry is not an [id, count] pair".into()),
        };
        let p = (uint(&mut w)?, uint(&mut w)?);
        close(&mut w, 1 + tags, "a release entry")?;
        pair(p);
    }
    close(&mut w, outer_tags, what)?;
    match w.next() {
        Ok(None) => Ok(()),
        Ok(Some(_)) => Err("unexpected items after the release list".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// [`std::any::type_name`] without module paths, as a user would write the type:
/// `Vec<String>`, `Option<(i64, String)>`, `HashMap<u32, f64>`, `Bytes`.
pub(crate) fn type_name<T: ?Sized>() -> String {
    let full = std::any::type_name::<T>();
    let mut out = String::with_capacity(full.len());
    // Where the identifier being copied starts in `out`: a `::` after it drops it.
    let mut ident_at = 0;
    let mut rest = full;
    while let Some(c) = rest.chars().next() {
        if rest.starts_with("::") && out.len() > ident_at {
            out.truncate(ident_at);
            rest = &rest[2..];
            continue;
        }
        out.push(c);
        if !(c.is_alphanumeric() || c == '_') {
            ident_at = out.len();
        }
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// Appends the ERROR payload `[code, service, method, message]` (`PROTOCOL.md` 3.2) to `out`,
/// in at most `max_len` bytes: the message is cut first, then the method, then the service,
/// each at a character boundary and marked with `…`. Any `max_len` of 5 or more gives a valid
/// payload (the smallest frame limit a peer may announce, 64, leaves 40 after the header).
///
/// Memory: what it appends, and a copy of the cut strings.
pub(crate) fn encode_error(
    out: &mut Vec<u8>,
    code: u8,
    service: &str,
    method: &str,
    message: &str,
    max_len: usize,
) {
    let room = max_len.saturating_sub(1 + cbor_uint_size(code as u64));
    let (s, m) = (cbor_text_size(service.len()), cbor_text_size(method.len()));
    let (service, method, message) = if s + m < room {
        (service.into(), method.into(), fit(message, room - s - m))
    } else if s + 1 < room {
        (service.into(), fit(method, room - s - 1), "".into())
    } else {
        (fit(service, room.saturating_sub(2)), "".into(), "".into())
    };
    let body: (u8, &str, &str, &str) = (code, &service, &method, &message);
    encode_into(out, &body).expect("integers and strings encode");
}

/// Size of an unsigned integer's CBOR encoding (also of a length's head).
fn cbor_uint_size(v: u64) -> usize {
    match v {
        0..=23 => 1,
        24..=0xff => 2,
        0x100..=0xffff => 3,
        0x1_0000..=0xffff_ffff => 5,
        _ => 9,
    }
}

/// Size of a text string's CBOR encoding.
fn cbor_text_size(len: usize) -> usize {
    cbor_uint_size(len as u64) + len
}

/// `s`, or its longest prefix that, marked with `…`, encodes as a CBOR text string in `budget`
/// bytes (`""` if not even the mark fits).
fn fit(s: &str, budget: usize) -> std::borrow::Cow<'_, str> {
    const MARK: &str = "…";
    if cbor_text_size(s.len()) <= budget {
        return s.into();
    }
    let mut n = budget.saturating_sub(1 + MARK.len());
    while n > 0 && cbor_text_size(n + MARK.len()) > budget {
        n -= 1;
    }
    if cbor_text_size(n + MARK.len()) > budget {
        return "".into();
    }
    let n = crate::base::floor_char_boundary(s, n);
    format!("{}{MARK}", &s[..n]).into()
}

/// A decoder's message, cut to [`QUOTE_MAX`] around its middle: serde's messages quote a
/// peer's whole string (`invalid type: string "…", expected u64`), and end in what was wanted.
fn bounded(e: String) -> String {
    if e.len() <= QUOTE_MAX {
        return e;
    }
    let head = crate::base::floor_char_boundary(&e, QUOTE_MAX * 3 / 4);
    let mut tail = e.len() - QUOTE_MAX / 4;
    while !e.is_char_boundary(tail) {
        tail += 1;
    }
    format!("{}…{}", &e[..head], &e[tail..])
}

/// A byte buffer sent as one CBOR byte string: use it for binary payloads.
///
/// A plain `Vec<u8>` goes through serde as a sequence of numbers, which is several times larger
/// and slower; `Bytes` is one block. It derefs to `Vec<u8>`, so it reads and grows like one.
///
/// A large `Bytes` (16 KiB and up) is sent from its own memory: the frame refers to it and the
/// transport writes it with the rest of the frame in one vectored write, without copying it.
/// For that the memory is shared: cloning a `Bytes` is cheap, and the first write through a
/// shared one (a clone, or one a frame being sent still refers to) makes it a copy of its own.
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
/// let c = b.clone();
/// b[0] = 9; // `c` keeps its own bytes
/// assert_eq!(c.into_vec(), vec![1, 2, 3, 4]);
/// ```
#[derive(Default, PartialEq, Eq, Hash)]
pub struct Bytes(Arc<Store>);

/// The memory of one or more [`Bytes`] (and of frames sending them): handed back to
/// [`crate::base::buffers`] when the last one lets go.
#[derive(Default, PartialEq, Eq, Hash)]
pub(crate) struct Store(Vec<u8>);

impl Store {
    pub(crate) fn as_slice(&self) -> &[u8] {
        &self.0
    }
}

impl Clone for Store {
    /// A copy, in reused memory when it is large.
    fn clone(&self) -> Store {
        Store(buffers::copy_of(&self.0))
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        buffers::give(std::mem::take(&mut self.0));
    }
}

impl Bytes {
    /// Takes the inner vector out (its memory is then yours, not reused by rpyc); a copy if the
    /// memory is shared.
    ///
    /// ```
    /// let b = rpyc::Bytes::from(&b"abc"[..]);
    /// let v: Vec<u8> = b.into_vec();
    /// assert_eq!(v, b"abc");
    /// ```
    pub fn into_vec(mut self) -> Vec<u8> {
        match Arc::get_mut(&mut self.0) {
            Some(store) => std::mem::take(&mut store.0),
            None => self.0 .0.clone(),
        }
    }

    /// The bytes, as a slice.
    ///
    /// ```
    /// let b = rpyc::Bytes::from(vec![9u8; 3]);
    /// assert_eq!(b.as_slice(), &[9, 9, 9]);
    /// ```
    pub fn as_slice(&self) -> &[u8] {
        &self.0 .0
    }
}

impl Drop for Bytes {
    fn drop(&mut self) {
        // Only a detached byte string's data (large: see `wire`) can go back to a decode, and
        // only while nothing else shares it.
        if let Some(store) = Arc::get_mut(&mut self.0) {
            if store.0.capacity() >= 1 << 16 {
                reclaim_tail(&mut store.0);
            }
        }
    }
}

impl Clone for Bytes {
    /// Shares the memory; the first write through either makes its own copy.
    fn clone(&self) -> Bytes {
        Bytes(self.0.clone())
    }
}

impl fmt::Debug for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Bytes({} bytes)", self.0 .0.len())
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
        Bytes(Arc::new(Store(v)))
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
        Bytes::from(buffers::copy_of(v))
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
        &self.0 .0
    }
}

/// Writes as the inner `Vec<u8>` (a copy of its own first, if the memory is shared).
///
/// ```
/// let mut b = rpyc::Bytes::default();
/// b.extend_from_slice(b"hi");
/// b[0] = b'H';
/// assert_eq!(b.as_slice(), b"Hi");
/// ```
impl std::ops::DerefMut for Bytes {
    fn deref_mut(&mut self) -> &mut Vec<u8> {
        &mut Arc::make_mut(&mut self.0).0
    }
}

impl Serialize for Bytes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let data = &self.0 .0;
        if data.len() < SPLICE_MIN {
            return s.serialize_bytes(data);
        }
        let offered = Offer::new(&self.0);
        let r = s.serialize_bytes(data);
        drop(offered);
        r
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
                        return Ok(Bytes::from(tail));
                    }
                }
                Ok(Bytes::from(buffers::copy_of(v)))
            }
            fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Bytes, E> {
                Ok(Bytes::from(v))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<Bytes, A::Error> {
                // The declared length is only the peer's claim: reserve a little, grow as the
                // elements arrive.
                let mut v = Vec::with_capacity(a.size_hint().unwrap_or(0).min(4096));
                while let Some(b) = a.next_element::<u8>()? {
                    v.push(b);
                }
                Ok(Bytes::from(v))
            }
        }
        d.deserialize_byte_buf(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::base::test_alloc::peak_during;

    #[test]
    fn a_cloned_bytes_shares_its_memory_until_one_of_them_is_written() {
        let a = Bytes::from(vec![1u8; 1000]);
        let mut b = a.clone();
        assert_eq!(a.as_ptr(), b.as_ptr(), "a clone shares the memory");
        b.push(2);
        assert_ne!(a.as_ptr(), b.as_ptr(), "a write made a copy");
        assert_eq!((a.len(), b.len()), (1000, 1001));
        assert!(a.iter().all(|&x| x == 1));
        let c = a.clone();
        assert_eq!(
            c.into_vec(),
            vec![1u8; 1000],
            "into_vec of a shared one copies"
        );
        assert_eq!(a.into_vec(), vec![1u8; 1000]);
    }

    #[test]
    fn a_handler_error_holding_large_bytes_is_described_whole() {
        // `Err(Bytes)` of a handler: the description reads the whole encoding, which splicing
        // would have left without the data.
        let mut frame = crate::wire::OutFrame::new(0);
        let r: Result<u8, Bytes> = Err(Bytes::from(vec![b'x'; 40_000]));
        let outcome = frame.encode(|buf| crate::core::service::encode_result(&r, buf));
        match outcome {
            Err(crate::core::service::Failure::Handler(m)) => {
                assert!(
                    m.starts_with("h'7878") && m.contains("(40000 bytes)"),
                    "{m}"
                )
            }
            _ => panic!("expected a handler failure"),
        }
    }

    const KEY: &str = "$rpyc-obj";

    /// Serializes as a reference to object `id` does on the wire.
    #[derive(Serialize)]
    struct Ref {
        #[serde(rename = "$rpyc-obj")]
        id: u64,
    }

    fn cbor<T: Serialize + ?Sized>(v: &T) -> Vec<u8> {
        let mut out = Vec::new();
        encode_into(&mut out, v).unwrap();
        out
    }

    #[test]
    fn object_refs_finds_references_in_nested_maps_arrays_and_tags() {
        let mut keyed = std::collections::BTreeMap::new();
        keyed.insert("a", vec![Ref { id: 7 }, Ref { id: 3 }]);
        let payload = cbor(&(
            Ref { id: 3 },
            vec![Some(Ref { id: 7 }), None],
            keyed,
            "text",
        ));
        assert_eq!(object_refs(&payload, KEY), vec![(3, 2), (7, 2)]);

        // As a map key, inside a tag, in an indefinite map, and a reference inside a map that
        // is not one.
        let mut b = vec![0x84, 0xa1];
        b.extend_from_slice(&cbor(&Ref { id: 9 }));
        b.push(0x00);
        b.push(0xd8);
        b.push(0x2a);
        b.extend_from_slice(&cbor(&Ref { id: 9 }));
        b.extend_from_slice(&[0xbf, 0x69]);
        b.extend_from_slice(KEY.as_bytes());
        b.extend_from_slice(&[0x1b, 0, 0, 0, 1, 0, 0, 0, 0, 0xff]);
        b.extend_from_slice(&[0xa1, 0x69]);
        b.extend_from_slice(KEY.as_bytes());
        b.extend_from_slice(&cbor(&Ref { id: 5 }));
        assert_eq!(
            object_refs(&b, KEY),
            vec![(5, 1), (9, 2), (1 << 32, 1)],
            "{b:02x?}"
        );
    }

    #[test]
    fn object_refs_ignores_maps_that_only_look_like_references() {
        let near_misses = [
            cbor(&(KEY, 5u64)),
            cbor(
                &[(KEY, 0u64)]
                    .into_iter()
                    .collect::<std::collections::HashMap<_, _>>(),
            ),
            cbor(
                &[(KEY, -1i64)]
                    .into_iter()
                    .collect::<std::collections::HashMap<_, _>>(),
            ),
            cbor(
                &[(KEY, "5")]
                    .into_iter()
                    .collect::<std::collections::HashMap<_, _>>(),
            ),
            cbor(
                &[(KEY, 5u64), ("b", 1)]
                    .into_iter()
                    .collect::<std::collections::BTreeMap<_, _>>(),
            ),
            cbor(
                &[("$rpyc-obX", 5u64)]
                    .into_iter()
                    .collect::<std::collections::HashMap<_, _>>(),
            ),
        ];
        for b in &near_misses {
            assert_eq!(object_refs(b, KEY), vec![], "{b:02x?}");
        }
    }

    #[test]
    fn object_refs_of_a_malformed_payload_are_those_before_the_malformed_part() {
        let mut b = cbor(&(Ref { id: 1 }, Ref { id: 2 }, Ref { id: 3 }));
        b[0] = 0x84; // a fourth item that is missing
        assert_eq!(object_refs(&b, KEY), vec![(1, 1), (2, 1), (3, 1)]);
        let cut = b.len() - 3;
        assert_eq!(object_refs(&b[..cut], KEY), vec![(1, 1), (2, 1)]);
    }

    #[test]
    fn object_refs_of_a_payload_without_the_key_allocates_nothing() {
        let b = cbor(&vec![0u8; 1 << 20]);
        let (refs, peak) = peak_during(|| object_refs(&b, KEY));
        assert!(refs.is_empty());
        assert_eq!(peak, 0);
    }

    #[test]
    fn describe_renders_text_as_is_and_other_items_in_diagnostic_notation() {
        let k: std::collections::BTreeMap<_, _> = [("k", 2.5)].into_iter().collect();
        let v = (1, "a", Bytes::from(vec![1u8, 2]), k, None::<u8>);
        assert_eq!(
            describe(&cbor(&v), 100),
            r#"[1, "a", h'0102', {"k": 2.5}, null]"#
        );
        assert_eq!(describe(&cbor("division by zero"), 100), "division by zero");
        assert_eq!(describe(&cbor("tab\there"), 100), "tab\there");
        assert_eq!(describe(&cbor(&["tab\t\"q\""]), 100), r#"["tab\t\"q\""]"#);
        assert_eq!(
            describe(&cbor(&(-1, i64::MIN, u64::MAX, true, ())), 100),
            "[-1, -9223372036854775808, 18446744073709551615, true, null]"
        );
        assert_eq!(
            describe(&cbor(&Bytes::from(vec![7u8; 1 << 20])), 100),
            "h'0707070707070707…' (1048576 bytes)"
        );
        #[rustfmt::skip]
        let b = [
            0x88, 0xc1, 0x1a, 0x51, 0x4b, 0x67, 0xb0, 0x9f, 0x01, 0xff, 0xbf, 0x01, 0x02, 0xff,
            0x5f, 0x41, 0x01, 0x40, 0xff, 0xf9, 0x7e, 0x00, 0xf9, 0xfc, 0x00, 0xf7, 0xf8, 0x63,
        ];
        assert_eq!(
            describe(&b, 200),
            "[1(1363896240), [_ 1], {_ 1: 2}, (_ h'01', h''), NaN, -Infinity, undefined, \
             simple(99)]"
        );
        // A top-level indefinite-length text is shown as is too; bytes that are not UTF-8 as
        // U+FFFD.
        assert_eq!(
            describe(&[0x7f, 0x62, b'a', b'b', 0x61, b'c', 0xff], 10),
            "abc"
        );
        assert_eq!(
            describe(&[0x82, 0x61, 0xff, 0x61, b'x'], 20),
            "[\"\u{fffd}\", \"x\"]"
        );
    }

    #[test]
    fn describe_stops_at_its_limit() {
        let zeros = cbor(&vec![0u8; 1 << 20]);
        let (s, peak) = peak_during(|| describe(&zeros, 20));
        assert_eq!(s, "[0, 0, 0, 0, 0, 0, 0… (a 1048576-item array)");
        assert!(peak < 200, "{peak}");
        let text = cbor(&"é".repeat(1 << 20));
        let (s, peak) = peak_during(|| describe(&text, 5));
        assert_eq!(s, "éé… (2097152 bytes of text)");
        assert!(peak < 200, "{peak}");
        // Within the limit, nothing is cut.
        assert_eq!(describe(&cbor(&[1, 2, 3]), 9), "[1, 2, 3]");
        assert_eq!(describe(&cbor(&[1, 2, 3]), 8), "[1, 2, 3… (a 3-item array)");
        assert_eq!(describe(&cbor(&[1, 2, 3]), 0), "… (a 3-item array)");
    }

    #[test]
    fn describe_notes_undecodable_items_briefly() {
        assert_eq!(
            describe(&[0x82, 0x01], 100),
            "(undecodable: unexpected end at byte 2)"
        );
        assert_eq!(
            describe(&[0x01, 0x02], 100),
            "(undecodable: bytes after the item at byte 1)"
        );
        let deep = [vec![0x81; 10_000], vec![0x00]].concat();
        assert_eq!(
            describe(&deep, 1000),
            "(undecodable: nesting deeper than 128 levels at byte 127)"
        );
        // Unless the limit is reached first: the walk stops there.
        assert_eq!(describe(&deep, 3), "[[[… (a 1-item array)");
    }

    #[test]
    fn decode_errors_quote_a_bounded_prefix() {
        let long = "x".repeat(1 << 20);
        let e = decode::<u64>(&cbor(&long)).unwrap_err();
        assert!(e.len() <= QUOTE_MAX + "…".len(), "{}", e.len());
        assert!(e.starts_with("invalid type: string \"xxx"), "{e}");
        assert!(e.contains('…') && e.contains("expected u64"), "{e}");
        // Short messages are untouched.
        assert_eq!(
            decode::<u64>(&cbor("x")).unwrap_err(),
            "invalid type: string \"x\", expected u64"
        );
    }

    #[test]
    fn releases_are_applied_in_bounded_chunks() {
        let pairs: Vec<(u64, u64)> = (1..=5000).map(|i| (i, i % 7 + 1)).collect();
        let mut chunks = Vec::new();
        let mut got = Vec::new();
        let payload = cbor(&pairs);
        let (r, peak) = peak_during(|| {
            decode_releases(&payload, |c| {
                chunks.push(c.len());
                got.extend_from_slice(c);
            })
        });
        r.unwrap();
        assert_eq!(chunks, vec![1024, 1024, 1024, 1024, 904]);
        assert!(got == pairs);
        // The chunk, and what the test itself collected.
        let collected = chunks.capacity() * 8 + got.capacity() * 16 * 2;
        assert!(peak <= RELEASE_CHUNK * 16 + collected, "{peak}");

        // Indefinite lengths and tags are read as serde_cbor reads them; anything else applies
        // nothing.
        #[rustfmt::skip]
        let cases: [&[u8]; 12] = [
            &[0x80],
            &[0x9f, 0x82, 0x01, 0x02, 0x9f, 0x03, 0x04, 0xff, 0xff],
            &[0xc1, 0x81, 0xc2, 0x82, 0xc3, 0x01, 0x1a, 0, 1, 0, 0],
            &[0x81, 0x82, 0x01, 0x20],
            &[0x81, 0x83, 0x01, 0x02, 0x03],
            &[0x81, 0x9f, 0x01, 0x02, 0x03, 0xff],
            &[0x81, 0x81, 0x01],
            &[0x82, 0x82, 0x01, 0x02],
            &[0x81, 0x82, 0x01, 0x02, 0x00],
            &[0xa1, 0x01, 0x02],
            &[0xf6],
            &[0x81, 0xa1, 0x01, 0x02],
        ];
        for b in cases {
            let mut got = Vec::new();
            let r = decode_releases(b, |c| got.extend_from_slice(c));
            match decode::<Vec<(u64, u64)>>(b) {
                Ok(want) => assert_eq!((r, got), (Ok(()), want), "{b:02x?}"),
                Err(e) => {
                    assert!(r.is_err(), "{b:02x?} was accepted; serde_cbor says {e}");
                    assert!(got.is_empty(), "{b:02x?}: applied {got:?}");
                }
            }
        }
    }

    #[test]
    fn type_names_read_as_written() {
        assert_eq!(type_name::<String>(), "String");
        assert_eq!(type_name::<Vec<String>>(), "Vec<String>");
        assert_eq!(
            type_name::<Option<(i64, String)>>(),
            "Option<(i64, String)>"
        );
        assert_eq!(type_name::<Bytes>(), "Bytes");
        assert_eq!(type_name::<&str>(), "&str");
        assert_eq!(type_name::<[u8; 4]>(), "[u8; 4]");
        assert_eq!(
            type_name::<std::collections::HashMap<u32, f64>>(),
            "HashMap<u32, f64>"
        );
        assert_eq!(type_name::<crate::RemoteObject>(), "RemoteObject");
        assert_eq!(type_name::<dyn Fn(u8) -> String>(), "dyn Fn(u8) -> String");
    }

    /// Decodes an ERROR payload, checking it is exactly one item.
    fn error_parts(b: &[u8]) -> (u8, String, String, String) {
        decode(b).unwrap_or_else(|e| panic!("{e}: {b:02x?}"))
    }

    #[test]
    fn encode_error_without_a_limit_is_the_plain_encoding() {
        let mut out = Vec::new();
        encode_error(&mut out, 3, "svc", "m", "no such method", usize::MAX);
        assert_eq!(out, cbor(&(3u8, "svc", "m", "no such method")));
    }

    #[test]
    fn encode_error_fits_the_smallest_frame_limit() {
        let service = "calculator_ünïcode_service";
        let method = "a_rather_long_method_name_é";
        let message = "ß".repeat(300);
        for max_len in 5..400 {
            let mut out = vec![0xaa]; // appended to what is there
            encode_error(&mut out, 4, service, method, &message, max_len);
            assert!(
                out.len() - 1 <= max_len,
                "{max_len}: {} bytes",
                out.len() - 1
            );
            let (code, s, m, msg) = error_parts(&out[1..]);
            assert_eq!(code, 4);
            let kept = |got: &str, full: &str| {
                let p = got.strip_suffix('…').unwrap_or(got);
                assert!(
                    full.starts_with(p),
                    "{max_len}: {got:?} is not a prefix of {full:?}"
                );
                got == full
            };
            let (s_whole, m_whole, msg_whole) =
                (kept(&s, service), kept(&m, method), kept(&msg, &message));
            // The message is cut first, then the method, then the service.
            assert!(!m_whole || s_whole, "{max_len}: method kept, service cut");
            assert!(!msg_whole || m_whole, "{max_len}: message kept, method cut");
            if max_len >= 40 + 64 {
                assert!(s_whole && m_whole, "{max_len}: {s:?} {m:?}");
            }
            if max_len == 40 {
                assert!(
                    !s.is_empty(),
                    "the service is named even in the smallest frame"
                );
            }
        }
    }
}
