//! Brine, RPyC's serializer for plain values: one tag byte, then a tag-specific body, numbers
//! big-endian. The encoder picks the shortest form, as RPyC's own does, so its output is
//! byte-identical to `rpyc.core.brine.dump` (the golden tests compare them); the decoder
//! accepts any form and refuses truncation, unknown tags, nesting deeper than [`MAX_DEPTH`],
//! integers longer than Python accepts, and lengths the input cannot hold.
//!
//! Decoding never allocates more than a small multiple of its input: a declared length is
//! trusted only as far as the bytes left can back it (each element takes at least one byte).

use crate::python::value::Value;

const NONE: u8 = 0x00;
const EMPTY_BYTES: u8 = 0x01;
const EMPTY_TUPLE: u8 = 0x02;
const TRUE: u8 = 0x03;
const FALSE: u8 = 0x04;
const NOT_IMPLEMENTED: u8 = 0x05;
const ELLIPSIS: u8 = 0x06;
const STR: u8 = 0x08;
const LONG: u8 = 0x09;
const BYTES1: u8 = 0x0a; // ..= 0x0d for 1..=4 bytes
const BYTES_L1: u8 = 0x0e;
const BYTES_L4: u8 = 0x0f;
const TUP1: u8 = 0x10; // ..= 0x13 for 1..=4 items
const TUP_L1: u8 = 0x14;
const TUP_L4: u8 = 0x15;
const INT_L1: u8 = 0x16;
const INT_L4: u8 = 0x17;
const FLOAT: u8 = 0x18;
const SLICE: u8 = 0x19;
const FSET: u8 = 0x1a;
const COMPLEX: u8 = 0x1b;
const IMM_MIN: i64 = -0x30;
const IMM_MAX: i64 = 0x9f;
const IMM_BASE: i64 = 0x50;

/// How deeply values may nest (tuples in tuples). Python's own limit is its recursion limit
/// (about 1,000); requests RPyC builds never exceed a handful of levels.
pub const MAX_DEPTH: usize = 64;

/// The longest integer accepted, in decimal digits: CPython's own default
/// (`sys.get_int_max_str_digits()`), so nothing Python can send is refused.
pub const MAX_INT_DIGITS: usize = 4300;

/// Encodes `v` after `out`. Fails, naming the value, if it holds something brine cannot carry
/// (an object reference: those are boxed by the protocol layer instead).
pub fn dump(v: &Value, out: &mut Vec<u8>) -> Result<(), String> {
    match v {
        Value::None => out.push(NONE),
        Value::Bool(true) => out.push(TRUE),
        Value::Bool(false) => out.push(FALSE),
        Value::NotImplemented => out.push(NOT_IMPLEMENTED),
        Value::Ellipsis => out.push(ELLIPSIS),
        Value::Int(i) => dump_int(*i, out),
        Value::BigInt(digits) => dump_digits(digits.as_bytes(), out),
        Value::Float(f) => {
            out.push(FLOAT);
            out.extend_from_slice(&f.to_be_bytes());
        }
        Value::Complex(re, im) => {
            out.push(COMPLEX);
            out.extend_from_slice(&re.to_be_bytes());
            out.extend_from_slice(&im.to_be_bytes());
        }
        Value::Bytes(b) => dump_bytes(b, out),
        Value::Str(s) => {
            out.push(STR);
            dump_bytes(s.as_bytes(), out);
        }
        Value::Tuple(items) => dump_tuple(items, out)?,
        Value::FrozenSet(items) => {
            out.push(FSET);
            dump_tuple(items, out)?;
        }
        Value::Slice(parts) => {
            out.push(SLICE);
            dump_tuple(&parts[..], out)?;
        }
        Value::Remote(_) | Value::Local(_) => {
            return Err(format!("{v:?} is an object reference, not a brine value"))
        }
    }
    Ok(())
}

/// Whether `v` is made of brine values only (RPyC's `brine.dumpable`).
pub fn dumpable(v: &Value) -> bool {
    match v {
        Value::Tuple(items) | Value::FrozenSet(items) => items.iter().all(dumpable),
        Value::Slice(parts) => parts.iter().all(dumpable),
        Value::Remote(_) | Value::Local(_) => false,
        _ => true,
    }
}

fn dump_int(i: i64, out: &mut Vec<u8>) {
    if (IMM_MIN..=IMM_MAX).contains(&i) {
        out.push((i + IMM_BASE) as u8);
    } else {
        dump_digits(i.to_string().as_bytes(), out);
    }
}

fn dump_digits(digits: &[u8], out: &mut Vec<u8>) {
    if digits.len() < 256 {
        out.push(INT_L1);
        out.push(digits.len() as u8);
    } else {
        out.push(INT_L4);
        out.extend_from_slice(&(digits.len() as u32).to_be_bytes());
    }
    out.extend_from_slice(digits);
}

fn dump_bytes(b: &[u8], out: &mut Vec<u8>) {
    match b.len() {
        0 => out.push(EMPTY_BYTES),
        n @ 1..=4 => out.push(BYTES1 + n as u8 - 1),
        n @ 5..=255 => {
            out.push(BYTES_L1);
            out.push(n as u8);
        }
        n => {
            out.push(BYTES_L4);
            out.extend_from_slice(&(n as u32).to_be_bytes());
        }
    }
    out.extend_from_slice(b);
}

/// Writes the head of a tuple of `n` items (the items follow, each dumped in turn).
pub fn tuple_head(n: usize, out: &mut Vec<u8>) {
    match n {
        0 => out.push(EMPTY_TUPLE),
        1..=4 => out.push(TUP1 + n as u8 - 1),
        5..=255 => {
            out.push(TUP_L1);
            out.push(n as u8);
        }
        _ => {
            out.push(TUP_L4);
            out.extend_from_slice(&(n as u32).to_be_bytes());
        }
    }
}

/// Writes an `int`.
pub fn int(i: i64, out: &mut Vec<u8>) {
    dump_int(i, out)
}

fn dump_tuple(items: &[Value], out: &mut Vec<u8>) -> Result<(), String> {
    tuple_head(items.len(), out);
    for item in items {
        dump(item, out)?;
    }
    Ok(())
}

/// Decodes one value that must fill `data` exactly.
pub fn load(data: &[u8]) -> Result<Value, String> {
    let mut r = Reader { data, at: 0 };
    let v = r.value(0)?;
    if r.at != data.len() {
        return Err(format!(
            "{} bytes left over after a complete brine value",
            data.len() - r.at
        ));
    }
    Ok(v)
}

/// What decoding `data` (one value) will allocate, in bytes, computed without allocating:
/// every value's own size, and the heap it points to (a tuple's items, a string's bytes). The
/// connection charges it to its memory budget before decoding. Fails as [`load`] would.
pub fn cost(data: &[u8]) -> Result<usize, String> {
    let mut r = Reader { data, at: 0 };
    let c = r.measure(0)?;
    Ok(c + std::mem::size_of::<Value>())
}

struct Reader<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.data.len() - self.at < n {
            return Err(format!(
                "truncated brine value: {n} bytes needed at offset {}, {} left",
                self.at,
                self.data.len() - self.at
            ));
        }
        let s = &self.data[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }

    fn byte(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<usize, String> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
    }

    fn f64(&mut self) -> Result<f64, String> {
        let b = self.take(8)?;
        Ok(f64::from_be_bytes(b.try_into().expect("8 bytes")))
    }

    fn value(&mut self, depth: usize) -> Result<Value, String> {
        if depth > MAX_DEPTH {
            return Err(format!("brine value nested deeper than {MAX_DEPTH} levels"));
        }
        let at = self.at;
        let tag = self.byte()?;
        Ok(match tag {
            NONE => Value::None,
            EMPTY_BYTES => Value::Bytes(Vec::new()),
            EMPTY_TUPLE => Value::Tuple(Vec::new()),
            TRUE => Value::Bool(true),
            FALSE => Value::Bool(false),
            NOT_IMPLEMENTED => Value::NotImplemented,
            ELLIPSIS => Value::Ellipsis,
            STR => {
                let Value::Bytes(b) = self.value(depth + 1)? else {
                    return Err(format!("brine str at offset {at} does not hold bytes"));
                };
                Value::Str(
                    String::from_utf8(b)
                        .map_err(|_| format!("brine str at offset {at} is not UTF-8"))?,
                )
            }
            BYTES1..=0x0d => Value::Bytes(self.take((tag - BYTES1 + 1) as usize)?.to_vec()),
            BYTES_L1 => {
                let n = self.byte()? as usize;
                Value::Bytes(self.take(n)?.to_vec())
            }
            BYTES_L4 => {
                let n = self.u32()?;
                Value::Bytes(self.take(n)?.to_vec())
            }
            TUP1..=0x13 => Value::Tuple(self.items((tag - TUP1 + 1) as usize, depth)?),
            TUP_L1 => {
                let n = self.byte()? as usize;
                Value::Tuple(self.items(n, depth)?)
            }
            TUP_L4 => {
                let n = self.u32()?;
                Value::Tuple(self.items(n, depth)?)
            }
            INT_L1 => {
                let n = self.byte()? as usize;
                self.int(n)?
            }
            INT_L4 => {
                let n = self.u32()?;
                self.int(n)?
            }
            FLOAT => Value::Float(self.f64()?),
            COMPLEX => Value::Complex(self.f64()?, self.f64()?),
            SLICE => match self.value(depth + 1)? {
                Value::Tuple(parts) if parts.len() == 3 => {
                    let [a, b, c]: [Value; 3] = parts.try_into().expect("3 parts");
                    Value::Slice(Box::new([a, b, c]))
                }
                _ => return Err(format!("brine slice at offset {at} is not a 3-tuple")),
            },
            FSET => match self.value(depth + 1)? {
                Value::Tuple(items) => Value::FrozenSet(items),
                _ => return Err(format!("brine frozenset at offset {at} is not a tuple")),
            },
            0x20..=0xef => Value::Int(tag as i64 - IMM_BASE),
            LONG => {
                return Err(format!(
                    "brine tag 0x09 (Python 2 long) at offset {at}: the peer runs RPyC < 5.0"
                ))
            }
            other => return Err(format!("unknown brine tag 0x{other:02x} at offset {at}")),
        })
    }

    /// The heap bytes the value at the cursor will own (its own size is its parent's), and
    /// skips it.
    fn measure(&mut self, depth: usize) -> Result<usize, String> {
        const VALUE: usize = std::mem::size_of::<Value>();
        if depth > MAX_DEPTH {
            return Err(format!("brine value nested deeper than {MAX_DEPTH} levels"));
        }
        let tag = self.byte()?;
        let counted = |n: usize, r: &mut Self| -> Result<usize, String> {
            if n > r.data.len() - r.at {
                return Err(format!(
                    "brine tuple of {n} items at offset {} but only {} bytes left",
                    r.at,
                    r.data.len() - r.at
                ));
            }
            let mut total = n * VALUE;
            for _ in 0..n {
                total += r.measure(depth + 1)?;
            }
            Ok(total)
        };
        Ok(match tag {
            BYTES1..=0x0d => self.take((tag - BYTES1 + 1) as usize)?.len(),
            BYTES_L1 => {
                let n = self.byte()? as usize;
                self.take(n)?.len()
            }
            BYTES_L4 => {
                let n = self.u32()?;
                self.take(n)?.len()
            }
            STR | SLICE | FSET => self.measure(depth + 1)? + 3 * VALUE,
            TUP1..=0x13 => counted((tag - TUP1 + 1) as usize, self)?,
            TUP_L1 => {
                let n = self.byte()? as usize;
                counted(n, self)?
            }
            TUP_L4 => {
                let n = self.u32()?;
                counted(n, self)?
            }
            INT_L1 => {
                let n = self.byte()? as usize;
                self.take(n)?.len()
            }
            INT_L4 => {
                let n = self.u32()?;
                if n > MAX_INT_DIGITS + 1 {
                    return Err(format!(
                        "brine int of {n} digits: more than Python's {MAX_INT_DIGITS}"
                    ));
                }
                self.take(n)?.len()
            }
            FLOAT => self.take(8)?.len() - 8,
            COMPLEX => self.take(16)?.len() - 16,
            _ => 0,
        })
    }

    fn items(&mut self, n: usize, depth: usize) -> Result<Vec<Value>, String> {
        // Each item takes at least one byte: a length the input cannot back is refused
        // before anything is allocated for it.
        if n > self.data.len() - self.at {
            return Err(format!(
                "brine tuple of {n} items at offset {} but only {} bytes left",
                self.at,
                self.data.len() - self.at
            ));
        }
        let mut items = Vec::with_capacity(n);
        for _ in 0..n {
            items.push(self.value(depth + 1)?);
        }
        Ok(items)
    }

    fn int(&mut self, n: usize) -> Result<Value, String> {
        if n > MAX_INT_DIGITS + 1 {
            return Err(format!(
                "brine int of {n} digits: more than Python's {MAX_INT_DIGITS}"
            ));
        }
        let at = self.at;
        let text = self.take(n)?;
        let digits = text.strip_prefix(b"-").unwrap_or(text);
        if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
            return Err(format!("brine int at offset {at} is not a decimal number"));
        }
        let text = std::str::from_utf8(text).expect("ASCII digits");
        Ok(match text.parse::<i64>() {
            Ok(i) => Value::Int(i),
            Err(_) => Value::BigInt(normalize(text)),
        })
    }
}

/// Python accepts leading zeros in what it loads (`int("007")`); keep one spelling per number.
fn normalize(text: &str) -> String {
    let (sign, digits) = match text.strip_prefix('-') {
        Some(d) => ("-", d),
        None => ("", text),
    };
    let digits = digits.trim_start_matches('0');
    if digits.is_empty() {
        "0".into()
    } else {
        format!("{sign}{digits}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(v: &Value) -> String {
        let mut out = Vec::new();
        dump(v, &mut out).unwrap();
        out.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn shortest_forms_match_the_vectors_recorded_from_rpyc() {
        assert_eq!(hex(&Value::None), "00");
        assert_eq!(hex(&Value::Int(-48)), "20");
        assert_eq!(hex(&Value::Int(159)), "ef");
        assert_eq!(hex(&Value::Int(-49)), "16032d3439");
        assert_eq!(hex(&Value::Int(1000)), "160431303030");
        assert_eq!(hex(&Value::Float(1.5)), "183ff8000000000000");
        assert_eq!(
            hex(&Value::Complex(1.0, -2.0)),
            "1b3ff0000000000000c000000000000000"
        );
        assert_eq!(hex(&Value::Bytes(b"abcd".to_vec())), "0d61626364");
        assert_eq!(hex(&Value::Bytes(b"abcde".to_vec())), "0e056162636465");
        assert_eq!(hex(&Value::Str("é".into())), "080bc3a9");
        assert_eq!(hex(&Value::Str(String::new())), "0801");
    }

    #[test]
    fn every_form_decodes_back() {
        let values = vec![
            Value::None,
            Value::Bool(true),
            Value::Ellipsis,
            Value::NotImplemented,
            Value::Int(i64::MIN),
            Value::BigInt("-1267650600228229401496703205376".into()),
            Value::Float(f64::INFINITY),
            Value::Str("x".repeat(300)),
            Value::Bytes(vec![0; 300]),
            Value::Tuple((0..300).map(Value::Int).collect()),
            Value::FrozenSet(vec![Value::Int(1)]),
            Value::Slice(Box::new([Value::None, Value::Int(5), Value::None])),
        ];
        for v in values {
            let mut out = Vec::new();
            dump(&v, &mut out).unwrap();
            assert_eq!(load(&out).unwrap(), v);
        }
    }

    #[test]
    fn cost_covers_what_decoding_allocates() {
        const VALUE: usize = std::mem::size_of::<Value>();
        let mut out = Vec::new();
        // 1,000 one-byte ints: 32 times their wire size once decoded.
        dump(
            &Value::Tuple((0..1000).map(|_| Value::Int(1)).collect()),
            &mut out,
        )
        .unwrap();
        assert!(cost(&out).unwrap() >= 1000 * VALUE);
        out.clear();
        dump(&Value::Bytes(vec![0; 1 << 20]), &mut out).unwrap();
        let c = cost(&out).unwrap();
        assert!((1 << 20..(1 << 20) + 4 * VALUE).contains(&c), "{c}");
        assert!(cost(&[TUP_L4, 0xff, 0xff, 0xff, 0xff]).is_err());
    }

    #[test]
    fn hostile_input_is_refused_without_allocating_for_it() {
        // A tuple that claims 4 billion items in 5 bytes.
        assert!(load(&[TUP_L4, 0xff, 0xff, 0xff, 0xff])
            .unwrap_err()
            .contains("only 0 bytes"));
        // Bytes that claim more than is there.
        assert!(load(&[BYTES_L4, 0, 0, 1, 0, 1])
            .unwrap_err()
            .contains("truncated"));
        // Deep nesting.
        let deep = vec![TUP1; MAX_DEPTH + 2];
        assert!(load(&deep).unwrap_err().contains("nested deeper"));
        // Unknown tags, a py2 long, a non-decimal int, a str that is not UTF-8.
        assert!(load(&[0xf0])
            .unwrap_err()
            .contains("unknown brine tag 0xf0"));
        assert!(load(&[LONG]).unwrap_err().contains("RPyC < 5.0"));
        assert!(load(&[INT_L1, 2, b'1', b'x'])
            .unwrap_err()
            .contains("decimal"));
        assert!(load(&[STR, BYTES1, 0xff]).unwrap_err().contains("UTF-8"));
        assert!(load(&[NONE, NONE]).unwrap_err().contains("left over"));
    }
}
