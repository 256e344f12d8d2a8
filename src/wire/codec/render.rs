//! Renders a CBOR item for an error message, in a compact form of RFC 8949's diagnostic
//! notation, walking only as far as the text it is allowed to produce.

use super::walk::{Item, Walker, MAX_DEPTH};
use std::fmt::{self, Write};

/// Byte strings up to this length are shown whole; longer ones by their first bytes and length.
const BYTES_SHOWN: usize = 16;
/// How many bytes of a longer byte string are shown.
const BYTES_HEAD: usize = 8;
/// Marks where the rendering was cut.
const CUT: &str = "…";

/// What an open item needs between and after its items.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Open {
    Array,
    Map,
    Tag,
    /// The chunks of a nested indefinite-length string: `(_ "a", "b")`.
    Chunks,
    /// The chunks of a top-level indefinite-length text, shown as is like any top-level text.
    TopText,
}

/// The rendered text, refusing to grow past its limit.
struct Out {
    s: String,
    limit: usize,
    cut: bool,
}

impl Out {
    fn room(&self) -> usize {
        self.limit - self.s.len()
    }
}

impl Write for Out {
    /// Appends what fits; stops formatting (an error) once the limit is reached.
    fn write_str(&mut self, t: &str) -> fmt::Result {
        if self.cut {
            return Err(fmt::Error);
        }
        if t.len() <= self.room() {
            self.s.push_str(t);
            return Ok(());
        }
        let n = crate::base::floor_char_boundary(t, self.room());
        self.s.push_str(&t[..n]);
        self.cut = true;
        Err(fmt::Error)
    }
}

/// See [`crate::wire::codec::describe`]; `detached` is the data the payload's final placeholder
/// stands for, if it was offered with one.
pub(super) fn describe(bytes: &[u8], detached: Option<&[u8]>, limit: usize) -> String {
    // Room for the whole rendering at once: no item renders to more than 12 bytes per input
    // byte, plus the cut mark and the note after it.
    let capacity = limit.min(bytes.len().saturating_mul(12)).saturating_add(64);
    let mut out = Out {
        s: String::with_capacity(capacity),
        limit,
        cut: false,
    };
    let mut open = [Open::Array; MAX_DEPTH + 1];
    let mut counts = [0u64; MAX_DEPTH + 1];
    let mut depth = 0;
    let mut first = None;
    let mut w = Walker::new(bytes);
    while !out.cut {
        let item = match w.next() {
            Ok(Some(item)) => item,
            Ok(None) => break,
            Err(e) => return format!("(undecodable: {e})"),
        };
        let item = match (item, detached) {
            (Item::Bytes(b), Some(d)) if b.is_empty() && w.offset() == bytes.len() => {
                Item::Bytes(d)
            }
            _ => item,
        };
        first.get_or_insert(item);
        if item == Item::End {
            depth -= 1;
            let _ = out.write_str(match open[depth] {
                Open::Array => "]",
                Open::Map => "}",
                Open::Tag | Open::Chunks => ")",
                Open::TopText => "",
            });
            continue;
        }
        if let Some(i) = depth.checked_sub(1) {
            let sep = match (open[i], counts[i]) {
                (Open::Map, n) if n % 2 == 1 => ": ",
                (Open::Array | Open::Map | Open::Chunks, n) if n > 0 => ", ",
                _ => "",
            };
            counts[i] += 1;
            if out.write_str(sep).is_err() {
                break;
            }
        }
        let raw_text = depth == 0 || open[depth - 1] == Open::TopText;
        let opens = match item {
            Item::Array(_) => Some(Open::Array),
            Item::Map(_) => Some(Open::Map),
            Item::Tag(_) => Some(Open::Tag),
            Item::BytesChunks => Some(Open::Chunks),
            Item::TextChunks if depth == 0 => Some(Open::TopText),
            Item::TextChunks => Some(Open::Chunks),
            _ => None,
        };
        let _ = render(&mut out, item, raw_text);
        if let Some(o) = opens {
            // The walker refuses deeper nesting, so this stays within bounds.
            open[depth] = o;
            counts[depth] = 0;
            depth += 1;
        }
    }
    if out.cut {
        out.s.push_str(CUT);
        if let Some(item) = first {
            let _ = note(&mut out.s, item);
        }
    }
    out.s
}

/// Renders one item, or the start of one.
fn render(out: &mut Out, item: Item<'_>, raw_text: bool) -> fmt::Result {
    match item {
        Item::Uint(v) => write!(out, "{v}"),
        Item::Neg(v) => write!(out, "-{}", v as u128 + 1),
        Item::Bytes(b) if b.len() <= BYTES_SHOWN => {
            out.write_str("h'")?;
            hex(out, b)?;
            out.write_str("'")
        }
        Item::Bytes(b) => {
            out.write_str("h'")?;
            hex(out, &b[..BYTES_HEAD])?;
            write!(out, "{CUT}' ({} bytes)", b.len())
        }
        Item::Text(t) => text(out, t, !raw_text),
        Item::BytesChunks => out.write_str("(_ "),
        Item::TextChunks if raw_text => Ok(()),
        Item::TextChunks => out.write_str("(_ "),
        Item::Array(None) => out.write_str("[_ "),
        Item::Array(Some(_)) => out.write_str("["),
        Item::Map(None) => out.write_str("{_ "),
        Item::Map(Some(_)) => out.write_str("{"),
        Item::Tag(t) => write!(out, "{t}("),
        Item::Bool(b) => write!(out, "{b}"),
        Item::Null => out.write_str("null"),
        Item::Undefined => out.write_str("undefined"),
        Item::Simple(v) => write!(out, "simple({v})"),
        Item::Float(f) if f.is_nan() => out.write_str("NaN"),
        Item::Float(f) if f.is_infinite() && f > 0.0 => out.write_str("Infinity"),
        Item::Float(f) if f.is_infinite() => out.write_str("-Infinity"),
        Item::Float(f) => write!(out, "{f:?}"),
        Item::End => Ok(()),
    }
}

fn hex(out: &mut Out, b: &[u8]) -> fmt::Result {
    b.iter().try_for_each(|x| write!(out, "{x:02x}"))
}

/// Text as is (`quoted` false) or quoted with escapes; bytes that are not UTF-8 show as U+FFFD.
fn text(out: &mut Out, t: &[u8], quoted: bool) -> fmt::Result {
    // Each input byte renders to at least one output byte, so no more than this can show (the
    // few extra bytes finish a character cut by the limit).
    let t = &t[..t.len().min(out.room().saturating_add(4))];
    if quoted {
        out.write_str("\"")?;
    }
    for chunk in t.utf8_chunks() {
        if quoted {
            for c in chunk.valid().chars() {
                write!(out, "{}", c.escape_debug())?;
            }
        } else {
            out.write_str(chunk.valid())?;
        }
        if !chunk.invalid().is_empty() {
            out.write_str("\u{fffd}")?;
        }
    }
    if quoted {
        out.write_str("\"")?;
    }
    Ok(())
}

/// After a cut: the size of the whole item, which the rendering no longer shows.
fn note(s: &mut String, item: Item<'_>) -> fmt::Result {
    match item {
        Item::Array(Some(n)) => write!(s, " (a {n}-item array)"),
        Item::Array(None) => s.write_str(" (an indefinite-length array)"),
        Item::Map(Some(n)) => write!(s, " (a {n}-pair map)"),
        Item::Map(None) => s.write_str(" (an indefinite-length map)"),
        Item::Text(t) => write!(s, " ({} bytes of text)", t.len()),
        Item::Bytes(b) => write!(s, " ({} bytes)", b.len()),
        _ => Ok(()),
    }
}
