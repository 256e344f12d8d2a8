//! A CBOR walker (RFC 8949) for payloads that must be looked at without being decoded: it
//! reports the items of one data item in order, checking that they are well formed, and
//! allocates nothing.
//!
//! What it promises, whatever the input: it never panics and never reads out of bounds; its
//! memory is the [`Walker`] itself (a fixed stack of [`MAX_DEPTH`] levels), never anything in
//! proportion to a declared length; each item it reports consumes at least one input byte, so
//! walking takes time linear in the input. Like serde_cbor, it refuses arrays, maps and tags
//! nested [`MAX_DEPTH`] deep. It checks well-formedness only: text strings are not checked to
//! be UTF-8 (their readers decide), and map keys may repeat.

use std::fmt;

/// Nesting of arrays, maps and tags at which the walk fails, as serde_cbor's decoding does.
pub(crate) const MAX_DEPTH: usize = 128;

/// One step of a walk.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Item<'a> {
    /// An unsigned integer.
    Uint(u64),
    /// A negative integer: -1 - n.
    Neg(u64),
    /// A byte string, or one chunk of an indefinite-length one.
    Bytes(&'a [u8]),
    /// A text string, or one chunk of an indefinite-length one (UTF-8 not checked).
    Text(&'a [u8]),
    /// The start of an indefinite-length byte string: its chunks follow, then [`Item::End`].
    BytesChunks,
    /// The start of an indefinite-length text string: its chunks follow, then [`Item::End`].
    TextChunks,
    /// The start of an array of `n` items (`None`: indefinite length): they follow, then
    /// [`Item::End`].
    Array(Option<u64>),
    /// The start of a map of `n` pairs (`None`: indefinite length): keys and values follow in
    /// turn, then [`Item::End`].
    Map(Option<u64>),
    /// A tag: the one item it tags follows, then [`Item::End`].
    Tag(u64),
    /// `false` or `true`.
    Bool(bool),
    /// `null`.
    Null,
    /// `undefined`.
    Undefined,
    /// Any other simple value.
    Simple(u8),
    /// A half, single or double precision float.
    Float(f64),
    /// The end of the innermost array, map, tag or indefinite-length string.
    End,
}

/// Why a walk stopped early: what was wrong, and at which byte offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Malformed {
    pub at: usize,
    pub what: &'static str,
}

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at byte {}", self.what, self.at)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Array,
    Map,
    Tag,
    /// The chunks of an indefinite-length string of this major type (2 or 3).
    Chunks(u8),
}

/// An open array, map, tag or indefinite-length string.
#[derive(Debug, Clone, Copy)]
struct Level {
    kind: Kind,
    /// Items (arrays, tags) or pairs (maps) still to come; unused when indefinite.
    left: u64,
    indefinite: bool,
    /// In a map: the key of a pair was read, its value has not been.
    in_pair: bool,
}

impl Level {
    /// Whether the level has had all its items (a definite length reached).
    fn complete(&self) -> bool {
        !self.indefinite && self.left == 0 && !self.in_pair
    }

    /// Counts one item read in this level.
    fn count(&mut self) {
        match self.kind {
            Kind::Map if !self.in_pair => self.in_pair = true,
            Kind::Map => {
                self.in_pair = false;
                if !self.indefinite {
                    self.left -= 1;
                }
            }
            Kind::Array | Kind::Tag if !self.indefinite => self.left -= 1,
            _ => {}
        }
    }
}

const EMPTY: Level = Level {
    kind: Kind::Array,
    left: 0,
    indefinite: false,
    in_pair: false,
};

/// Walks one CBOR data item filling a byte slice; see the module docs.
pub(crate) struct Walker<'a> {
    b: &'a [u8],
    pos: usize,
    /// Open levels; one more than [`MAX_DEPTH`] for an indefinite-length string's chunks,
    /// which serde_cbor does not count as nesting.
    stack: [Level; MAX_DEPTH + 1],
    len: usize,
    /// Arrays, maps and tags among the open levels.
    depth: usize,
    /// The top-level item has been read whole.
    done: bool,
    /// Why the walk stopped, once it did.
    failed: Option<Malformed>,
}

impl<'a> Walker<'a> {
    pub(crate) fn new(b: &'a [u8]) -> Walker<'a> {
        Walker {
            b,
            pos: 0,
            stack: [EMPTY; MAX_DEPTH + 1],
            len: 0,
            depth: 0,
            done: false,
            failed: None,
        }
    }

    /// The offset of the next byte to read.
    pub(crate) fn offset(&self) -> usize {
        self.pos
    }

    /// The next item; `Ok(None)` once the top-level item has been read whole and nothing
    /// follows it. After an error, the walk is over: calling again gives an error again.
    pub(crate) fn next(&mut self) -> Result<Option<Item<'a>>, Malformed> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        let b = self.b;
        if let Some(top) = self.top() {
            if top.complete() {
                self.pop();
                return Ok(Some(Item::End));
            }
        } else if self.done {
            return match self.pos == b.len() {
                true => Ok(None),
                false => Err(self.fail(self.pos, "bytes after the item")),
            };
        }
        let at = self.pos;
        let Some(&ib) = b.get(at) else {
            return Err(self.fail(at, "unexpected end"));
        };
        if ib == 0xff {
            return match self.top() {
                Some(l) if l.indefinite && !l.in_pair => {
                    self.pos += 1;
                    self.pop();
                    Ok(Some(Item::End))
                }
                _ => Err(self.fail(at, "unexpected break")),
            };
        }
        let (major, ai) = (ib >> 5, ib & 0x1f);
        if let Some(Level {
            kind: Kind::Chunks(m),
            ..
        }) = self.top()
        {
            if major != m || ai == 31 {
                return Err(self.fail(at, "a chunk of another kind in an indefinite string"));
            }
        }
        let value = if ai == 31 && matches!(major, 2..=5) {
            self.pos = at + 1;
            None
        } else {
            let mut p = at;
            let Some((_, v)) = head(b, &mut p) else {
                return Err(self.fail(
                    at,
                    match ai {
                        28.. => "a reserved additional information value",
                        _ => "unexpected end",
                    },
                ));
            };
            self.pos = p;
            Some(v)
        };
        let item = match (major, value) {
            (0, Some(v)) => Item::Uint(v),
            (1, Some(v)) => Item::Neg(v),
            (2 | 3, Some(n)) => {
                let rest = (b.len() - self.pos) as u64;
                if n > rest {
                    return Err(self.fail(at, "a string longer than the rest of the input"));
                }
                let s = &b[self.pos..self.pos + n as usize];
                self.pos += n as usize;
                match major {
                    2 => Item::Bytes(s),
                    _ => Item::Text(s),
                }
            }
            (2 | 3, None) => {
                self.push(Kind::Chunks(major), 0, true, at)?;
                return Ok(Some(match major {
                    2 => Item::BytesChunks,
                    _ => Item::TextChunks,
                }));
            }
            (4, n) => {
                self.push(Kind::Array, n.unwrap_or(0), n.is_none(), at)?;
                return Ok(Some(Item::Array(n)));
            }
            (5, n) => {
                self.push(Kind::Map, n.unwrap_or(0), n.is_none(), at)?;
                return Ok(Some(Item::Map(n)));
            }
            (6, Some(t)) => {
                self.push(Kind::Tag, 1, false, at)?;
                return Ok(Some(Item::Tag(t)));
            }
            (7, Some(v)) => match ai {
                20 => Item::Bool(false),
                21 => Item::Bool(true),
                22 => Item::Null,
                23 => Item::Undefined,
                24 if v < 32 => return Err(self.fail(at, "a two-byte simple value below 32")),
                0..=24 => Item::Simple(v as u8),
                25 => Item::Float(f16_to_f64(v as u16)),
                26 => Item::Float(f32::from_bits(v as u32) as f64),
                _ => Item::Float(f64::from_bits(v)),
            },
            // Indefinite lengths of other majors were refused above.
            _ => return Err(self.fail(at, "a malformed head")),
        };
        self.counted();
        Ok(Some(item))
    }

    /// If the next item is a map of exactly one pair whose key is the text `key` and whose
    /// value is an unsigned integer above 0, consumes that map whole and returns the integer.
    /// Tags around the key or the value, and a key in chunks, are read through, as serde_cbor
    /// reads them. Otherwise leaves the walk as it was (the map, if any, is then walked item
    /// by item).
    pub(crate) fn object_ref(&mut self, key: &[u8]) -> Option<u64> {
        match self.top() {
            _ if self.failed.is_some() => return None,
            None if self.done => return None,
            Some(l) if l.complete() || matches!(l.kind, Kind::Chunks(_)) => return None,
            _ => {}
        }
        let b = &self.b[self.pos..];
        let indefinite = match b.first()? {
            0xa1 => false,
            0xbf => true,
            _ => return None,
        };
        let mut p = 1;
        // Levels the map and the tags inside it open, which must stay below the limit.
        let room = MAX_DEPTH - 1 - self.depth;
        if room == 0 || tags(b, &mut p) >= room || !text_is(b, &mut p, key) {
            return None;
        }
        if tags(b, &mut p) >= room {
            return None;
        }
        let id = match head(b, &mut p)? {
            (0, id) if id > 0 => id,
            _ => return None,
        };
        if indefinite {
            if b.get(p) != Some(&0xff) {
                return None;
            }
            p += 1;
        }
        self.pos += p;
        self.counted();
        Some(id)
    }

    fn top(&self) -> Option<Level> {
        self.len.checked_sub(1).map(|i| self.stack[i])
    }

    fn push(
        &mut self,
        kind: Kind,
        left: u64,
        indefinite: bool,
        at: usize,
    ) -> Result<(), Malformed> {
        if !matches!(kind, Kind::Chunks(_)) {
            if self.depth + 1 >= MAX_DEPTH {
                return Err(self.fail(at, "nesting deeper than 128 levels"));
            }
            self.depth += 1;
        }
        // Chunks never contain levels, so at most one sits above MAX_DEPTH - 1 others.
        self.stack[self.len] = Level {
            kind,
            left,
            indefinite,
            in_pair: false,
        };
        self.len += 1;
        Ok(())
    }

    /// Closes the innermost level: it counts as one item of its parent.
    fn pop(&mut self) {
        self.len -= 1;
        if !matches!(self.stack[self.len].kind, Kind::Chunks(_)) {
            self.depth -= 1;
        }
        self.counted();
    }

    /// Counts one whole item read in the innermost level.
    fn counted(&mut self) {
        match self.len.checked_sub(1) {
            Some(i) => self.stack[i].count(),
            None => self.done = true,
        }
    }

    /// Ends the walk with an error; later calls report it again.
    fn fail(&mut self, at: usize, what: &'static str) -> Malformed {
        let e = Malformed { at, what };
        self.failed = Some(e);
        e
    }
}

/// Skips the tag heads at `*p`; returns how many.
fn tags(b: &[u8], p: &mut usize) -> usize {
    let mut n = 0;
    let mut q = *p;
    while let Some((6, _)) = head(b, &mut q) {
        *p = q;
        n += 1;
    }
    n
}

/// Whether the text string at `*p` (definite, or in definite chunks) is `want`; moves past it.
fn text_is(b: &[u8], p: &mut usize, want: &[u8]) -> bool {
    let piece = |p: &mut usize, want: &mut &[u8]| match head(b, p) {
        Some((3, n)) if n <= want.len() as u64 => {
            let n = n as usize;
            let ok = b.get(*p..*p + n) == Some(&want[..n]);
            *p += n;
            *want = &want[n..];
            ok
        }
        _ => false,
    };
    let mut want = want;
    if b.get(*p) != Some(&0x7f) {
        return piece(p, &mut want) && want.is_empty();
    }
    *p += 1;
    loop {
        if b.get(*p) == Some(&0xff) {
            *p += 1;
            return want.is_empty();
        }
        if !piece(p, &mut want) {
            return false;
        }
    }
}

/// Reads a definite head at `*p`: its major type and value, `*p` moved past it; `None` (and
/// `*p` unmoved) if it is cut short or not definite.
pub(crate) fn head(b: &[u8], p: &mut usize) -> Option<(u8, u64)> {
    let ib = *b.get(*p)?;
    let (major, ai) = (ib >> 5, ib & 0x1f);
    let v = match ai {
        0..=23 => {
            *p += 1;
            return Some((major, ai as u64));
        }
        24..=27 => {
            let n = 1usize << (ai - 24);
            let bytes = b.get(*p + 1..*p + 1 + n)?;
            *p += 1 + n;
            bytes.iter().fold(0u64, |v, &x| (v << 8) | x as u64)
        }
        _ => return None,
    };
    Some((major, v))
}

/// An IEEE 754 half-precision float, widened.
fn f16_to_f64(h: u16) -> f64 {
    let sign = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
    let exp = ((h >> 10) & 0x1f) as i32;
    let mant = (h & 0x3ff) as f64;
    sign * match exp {
        0 => mant * 2f64.powi(-24),
        31 if mant == 0.0 => f64::INFINITY,
        31 => f64::NAN,
        e => (1.0 + mant / 1024.0) * 2f64.powi(e - 15),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every item of `b`, or the error that stopped the walk.
    fn items(b: &[u8]) -> Result<Vec<Item<'_>>, Malformed> {
        let mut w = Walker::new(b);
        let mut v = Vec::new();
        while let Some(item) = w.next()? {
            v.push(item);
        }
        Ok(v)
    }

    #[test]
    fn walks_every_major_type_and_length_form() {
        use Item::*;
        #[rustfmt::skip]
        let b = [
            0x9f, // [_
            0x00, 0x18, 0x18, 0x19, 0x01, 0x00, 0x1a, 0, 1, 0, 0, 0x1b, 0xff, 0xff, 0xff, 0xff,
            0xff, 0xff, 0xff, 0xff,
            0x20, 0x3b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0x42, 1, 2, 0x5f, 0x41, 3, 0x40, 0xff,
            0x61, b'a', 0x7f, 0x61, b'b', 0xff,
            0x82, 0x80, 0xa0,
            0xbf, 0x01, 0x02, 0xff,
            0xa1, 0x63, b'k', b'e', b'y', 0xc1, 0x1a, 0x51, 0x4b, 0x67, 0xb0,
            0xf4, 0xf5, 0xf6, 0xf7, 0xf0, 0xf8, 0x20,
            0xf9, 0x3e, 0x00, 0xfa, 0x7f, 0x80, 0, 0, 0xfb, 0x3f, 0xf8, 0, 0, 0, 0, 0, 0,
            0xff,
        ];
        assert_eq!(
            items(&b).unwrap(),
            vec![
                Array(None),
                Uint(0),
                Uint(24),
                Uint(256),
                Uint(65536),
                Uint(u64::MAX),
                Neg(0),
                Neg(u64::MAX),
                Bytes(&[1, 2]),
                BytesChunks,
                Bytes(&[3]),
                Bytes(&[]),
                End,
                Text(b"a"),
                TextChunks,
                Text(b"b"),
                End,
                Array(Some(2)),
                Array(Some(0)),
                End,
                Map(Some(0)),
                End,
                End,
                Map(None),
                Uint(1),
                Uint(2),
                End,
                Map(Some(1)),
                Text(b"key"),
                Tag(1),
                Uint(1363896240),
                End,
                End,
                Bool(false),
                Bool(true),
                Null,
                Undefined,
                Simple(16),
                Simple(32),
                Float(1.5),
                Float(f64::INFINITY),
                Float(1.5),
                End,
            ]
        );
    }

    #[test]
    fn malformed_input_is_refused_with_its_offset() {
        for (b, at, what) in [
            (&[][..], 0, "unexpected end"),
            (&[0x82, 0x01], 2, "unexpected end"),
            (&[0x19, 0x01], 0, "unexpected end"),
            (
                &[0x5b, 0, 0, 0, 1, 0, 0, 0, 0, 1],
                0,
                "longer than the rest",
            ),
            (&[0x01, 0x02], 1, "bytes after the item"),
            (&[0xff], 0, "unexpected break"),
            (&[0x81, 0xff], 1, "unexpected break"),
            (&[0xbf, 0x01, 0xff], 2, "unexpected break"),
            (&[0xc1, 0xff], 1, "unexpected break"),
            (&[0x1c], 0, "reserved"),
            (&[0x1f], 0, "reserved"),
            (&[0xdf], 0, "reserved"),
            (&[0xfc], 0, "reserved"),
            (&[0xf8, 0x1f], 0, "simple value below 32"),
            (&[0x5f, 0x61, b'a', 0xff], 1, "another kind"),
            (&[0x7f, 0x7f, 0xff, 0xff], 1, "another kind"),
            (&[0x5f, 0x00, 0xff], 1, "another kind"),
        ] {
            let e = items(b).unwrap_err();
            assert_eq!(e.at, at, "{b:02x?}: {e}");
            assert!(e.what.contains(what), "{b:02x?}: {e}");
        }
    }

    #[test]
    fn an_error_ends_the_walk() {
        let b = [0x82, 0x5b, 0, 0, 0, 0, 0, 0, 0, 9, 0x01, 0x02];
        let mut w = Walker::new(&b);
        assert_eq!(w.next(), Ok(Some(Item::Array(Some(2)))));
        let e = w.next().unwrap_err();
        assert_eq!(w.next(), Err(e));
        assert_eq!(w.object_ref(b"k"), None);
    }

    #[test]
    fn nesting_is_refused_where_serde_cbor_refuses_it() {
        let leaf = [0x00];
        for (open, close) in [
            (&[0x81][..], &[][..]),
            (&[0x9f], &[0xff]),
            (&[0xa1, 0x00], &[]),
            (&[0xc6], &[]),
        ] {
            for depth in [126, 127, 128, 129] {
                let b = [open.repeat(depth), leaf.to_vec(), close.repeat(depth)].concat();
                let serde_ok = serde_cbor::from_slice::<serde_cbor::Value>(&b).is_ok();
                let ours = items(&b);
                assert_eq!(ours.is_ok(), serde_ok, "{open:02x?} x {depth}: {ours:?}");
                assert_eq!(ours.is_ok(), depth < MAX_DEPTH, "{open:02x?} x {depth}");
            }
        }
    }

    #[test]
    fn object_references_are_recognised_in_every_encoding_and_only_whole() {
        let key = b"k";
        for (b, want) in [
            (&[0xa1, 0x61, b'k', 0x05][..], Some(5)),
            (&[0xbf, 0x61, b'k', 0x1a, 0, 1, 0, 0, 0xff], Some(65536)),
            (&[0xa1, 0x78, 0x01, b'k', 0x18, 0x05], Some(5)),
            (&[0xa1, 0x61, b'k', 0x00], None),
            (&[0xa1, 0x61, b'k', 0x20], None),
            (&[0xa1, 0x61, b'x', 0x05], None),
            (&[0xa1, 0x41, b'k', 0x05], None),
            (&[0xa2, 0x61, b'k', 0x05, 0x00, 0x00], None),
            (&[0xbf, 0x61, b'k', 0x05, 0x00, 0x00, 0xff], None),
            (&[0xa1, 0x61, b'k', 0xc1, 0x05], Some(5)),
            (&[0xa1, 0xc1, 0xd8, 0x20, 0x61, b'k', 0x05], Some(5)),
            (&[0xa1, 0x7f, 0x60, 0x61, b'k', 0xff, 0x05], Some(5)),
            (&[0xa1, 0x7f, 0x61, b'k', 0x61, b'k', 0xff, 0x05], None),
            (&[0xa1, 0x7f, 0x61, b'k', 0x05], None),
            (&[0xa1, 0x61, b'k', 0xc1], None),
            (&[0xa1, 0x61, b'k'], None),
        ] {
            let mut w = Walker::new(b);
            assert_eq!(w.object_ref(key), want, "{b:02x?}");
            if want.is_some() {
                assert_eq!(w.next(), Ok(None), "{b:02x?}: consumed whole");
            }
        }
        // Not where an item cannot start: after the last item of an array, or in a string.
        let b = [0x81, 0x00, 0xa1, 0x61, b'k', 0x05];
        let mut w = Walker::new(&b);
        w.next().unwrap();
        w.next().unwrap();
        assert_eq!(w.object_ref(key), None);
    }
}
