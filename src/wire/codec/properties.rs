//! Property tests of decoding hostile payloads: whatever a peer sends, no decoding function
//! panics, and none allocates more than twice the payload plus a small constant.

use super::{decode, decode_releases, describe, encode_into, object_refs, Bytes, QUOTE_MAX};
use crate::base::test_alloc::peak_during;
use crate::base::test_rng::XorShift;
use serde::Serialize;
use std::time::Instant;

const KEY: &str = "$rpyc-obj";
/// What any call may allocate beyond twice its input.
const SLACK: usize = 64 * 1024;
/// What serde itself preallocates for a sequence from its declared length
/// (`serde::de::size_hint::cautious`), once per sequence being decoded: typed decoding may
/// allocate that much more, whatever the input.
const SERDE_PREALLOC: usize = 1 << 20;

/// Serializes as a reference to object `id` does on the wire.
#[derive(Serialize)]
struct Ref {
    #[serde(rename = "$rpyc-obj")]
    id: u64,
}

/// A CBOR head, at the shortest width or, sometimes, a longer one.
fn head(rng: &mut XorShift, out: &mut Vec<u8>, major: u8, v: u64) {
    let m = major << 5;
    let min = match v {
        0..=23 => 0,
        24..=0xff => 1,
        0x100..=0xffff => 2,
        0x1_0000..=0xffff_ffff => 3,
        _ => 4,
    };
    let width = if rng.one_in(8) {
        min.max(rng.below(5) as u8)
    } else {
        min
    };
    match width {
        0 => out.push(m | v as u8),
        w => {
            let n = 1usize << (w - 1);
            out.push(m | (23 + w));
            out.extend_from_slice(&v.to_be_bytes()[8 - n..]);
        }
    }
}

/// A random integer with every width equally likely.
fn any_int(rng: &mut XorShift) -> u64 {
    match rng.below(5) {
        0 => rng.below(24),
        1 => rng.below(256),
        2 => rng.below(65536),
        3 => rng.below(1 << 32),
        _ => rng.next(),
    }
}

/// A random well-formed (usually) CBOR item of random shape.
fn item(rng: &mut XorShift, out: &mut Vec<u8>, depth: usize) {
    let choices = if depth > 5 { 8 } else { 17 };
    match rng.below(choices) {
        0 => {
            let (major, v) = (rng.below(2) as u8, any_int(rng));
            head(rng, out, major, v)
        }
        1 | 2 => {
            let n = if rng.one_in(16) {
                rng.below(600)
            } else {
                rng.below(12)
            };
            let major = 2 + rng.below(2) as u8;
            head(rng, out, major, n);
            for _ in 0..n {
                let b = match major {
                    3 if !rng.one_in(50) => b"$rpyc-obj az\t\"\\\x01"[rng.below(16) as usize],
                    _ => rng.next() as u8,
                };
                out.push(b);
            }
        }
        3 => {
            let b: &[u8] = match rng.below(10) {
                0 => &[0xf4],
                1 => &[0xf5],
                2 => &[0xf6],
                3 => &[0xf7],
                4 => &[0xf9, 0x7e, 0x00],
                5 => &[0xf9, 0x3c, 0x01],
                6 => &[0xfa, 0x47, 0xc3, 0x50, 0x00],
                7 => &[0xfb, 0x3f, 0xb9, 0x99, 0x99, 0x99, 0x99, 0x99, 0x9a],
                8 => &[0xf8, 0x64],
                _ => &[0xf0],
            };
            out.extend_from_slice(b);
        }
        4 | 5 => object_ref(rng, out),
        6 => {
            let t = any_int(rng);
            head(rng, out, 6, t);
            item(rng, out, depth + 1);
        }
        7 => {
            // A huge declared length with little or nothing behind it.
            let major = 2 + rng.below(4) as u8;
            let n = u64::MAX - rng.below(1 << 40);
            head(rng, out, major, n);
            for _ in 0..rng.below(4) {
                item(rng, out, depth + 1);
            }
        }
        8 | 9 => {
            let n = rng.below(7);
            head(rng, out, 4, n);
            (0..n).for_each(|_| item(rng, out, depth + 1));
        }
        10 => {
            out.push(0x9f);
            (0..rng.below(6)).for_each(|_| item(rng, out, depth + 1));
            out.push(0xff);
        }
        11 => {
            let n = rng.below(5);
            head(rng, out, 5, n);
            (0..2 * n).for_each(|_| item(rng, out, depth + 1));
        }
        12 => {
            out.push(0xbf);
            (0..2 * rng.below(4)).for_each(|_| item(rng, out, depth + 1));
            out.push(0xff);
        }
        13 => release_list(rng, out),
        14 => {
            // Deep nesting, up to past the limit.
            let n = 100 + rng.below(60) as usize;
            let kinds: Vec<u64> = (0..n).map(|_| rng.below(5)).collect();
            for &k in &kinds {
                match k {
                    0 => out.push(0x81),
                    1 => out.push(0x9f),
                    2 => out.extend_from_slice(&[0xa1, 0x00]),
                    3 => out.extend_from_slice(&[0xd8, 0x2a]),
                    _ => out.push(0xbf),
                }
                if k == 4 {
                    object_ref(rng, out);
                }
            }
            item(rng, out, 100);
            for &k in kinds.iter().rev() {
                if k == 1 || k == 4 {
                    out.push(0xff);
                }
            }
        }
        15 => {
            let major = 2 + rng.below(2) as u8;
            out.push(major << 5 | 31);
            for _ in 0..rng.below(5) {
                let n = rng.below(6);
                head(rng, out, major, n);
                (0..n).for_each(|_| out.push(b'a' + rng.below(26) as u8));
            }
            out.push(0xff);
        }
        _ => {
            // Tiny items in bulk.
            let n = if rng.one_in(8) { 3000 } else { 40 };
            let n = rng.below(n);
            head(rng, out, 4, n);
            out.extend(std::iter::repeat_n(0u8, n as usize));
        }
    }
}

/// `{"$rpyc-obj": id}` in one of its encodings (and sometimes a near miss).
fn object_ref(rng: &mut XorShift, out: &mut Vec<u8>) {
    let indefinite = rng.one_in(6);
    out.push(if indefinite { 0xbf } else { 0xa1 });
    head(rng, out, 3, KEY.len() as u64);
    out.extend_from_slice(KEY.as_bytes());
    let id = match rng.below(10) {
        0 => 0,
        1..=5 => 1 + rng.below(8),
        _ => any_int(rng),
    };
    head(rng, out, 0, id);
    if indefinite {
        out.push(0xff);
    }
}

/// `[[id, count], ...]`, mostly as serde_cbor writes it.
fn release_list(rng: &mut XorShift, out: &mut Vec<u8>) {
    let n = if rng.one_in(32) { 3000 } else { 6 };
    let n = rng.below(n);
    let indefinite = rng.one_in(4);
    if indefinite {
        out.push(0x9f);
    } else {
        head(rng, out, 4, n);
    }
    for _ in 0..n {
        if rng.one_in(20) {
            head(rng, out, 6, 1);
        }
        let indefinite_pair = rng.one_in(10);
        out.push(if indefinite_pair { 0x9f } else { 0x82 });
        let (id, count) = (any_int(rng), 1 + rng.below(3));
        head(rng, out, 0, id);
        head(rng, out, 0, count);
        if indefinite_pair {
            out.push(0xff);
        }
    }
    if indefinite {
        out.push(0xff);
    }
}

/// A payload as this crate sends it, with object references in arguments and results.
fn real_payload(rng: &mut XorShift) -> Vec<u8> {
    let mut out = Vec::new();
    let r = |rng: &mut XorShift| Ref {
        id: 1 + rng.below(20),
    };
    let v = (
        r(rng),
        vec![Some(r(rng)), None, Some(r(rng))],
        "text",
        [("k", r(rng))]
            .into_iter()
            .collect::<std::collections::BTreeMap<_, _>>(),
        Bytes::from(vec![1u8; rng.below(40) as usize]),
        (rng.next(), -1.5f64),
    );
    encode_into(&mut out, &v).unwrap();
    out
}

/// Damages a payload in a few random ways.
fn mutate(rng: &mut XorShift, b: &mut Vec<u8>) {
    for _ in 0..1 + rng.below(4) {
        if b.is_empty() {
            b.push(rng.next() as u8);
        }
        let at = rng.below(b.len() as u64) as usize;
        match rng.below(7) {
            0 => b[at] = rng.next() as u8,
            1 => b[at] ^= 1 << rng.below(8),
            2 => b.truncate(at),
            3 => b.insert(at, rng.next() as u8),
            4 => {
                b.remove(at);
            }
            5 => {
                const MAGIC: [u8; 8] = [0xff, 0x9f, 0xbf, 0x1b, 0x5b, 0xa1, 0x69, 0x7f];
                b[at] = MAGIC[rng.below(8) as usize];
            }
            _ => {
                let end = (at + 1 + rng.below(16) as usize).min(b.len());
                let copy = b[at..end].to_vec();
                let to = rng.below(b.len() as u64 + 1) as usize;
                b.splice(to..to, copy);
            }
        }
    }
}

/// The object references serde_cbor's decoding sees in a payload (a reference being what a
/// `RemoteObject` decodes from), or `None` if it cannot decode the payload: the reference for
/// [`object_refs`], on small payloads only.
fn object_refs_by_serde(payload: &[u8]) -> Option<Vec<(u64, u64)>> {
    use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
    /// One decoded item, reduced to what matters here.
    enum Seen {
        Text(String),
        Uint(u64),
        /// Anything else, with the references inside it.
        Refs(Vec<u64>),
    }
    impl Seen {
        fn refs(self) -> Vec<u64> {
            match self {
                Seen::Refs(r) => r,
                _ => Vec::new(),
            }
        }
    }
    impl<'de> Deserialize<'de> for Seen {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Seen, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Seen;
                fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    f.write_str("anything")
                }
                fn visit_u64<E>(self, v: u64) -> Result<Seen, E> {
                    Ok(Seen::Uint(v))
                }
                fn visit_i64<E>(self, _: i64) -> Result<Seen, E> {
                    Ok(Seen::Refs(Vec::new()))
                }
                fn visit_i128<E>(self, _: i128) -> Result<Seen, E> {
                    Ok(Seen::Refs(Vec::new()))
                }
                fn visit_f64<E>(self, _: f64) -> Result<Seen, E> {
                    Ok(Seen::Refs(Vec::new()))
                }
                fn visit_bool<E>(self, _: bool) -> Result<Seen, E> {
                    Ok(Seen::Refs(Vec::new()))
                }
                fn visit_unit<E>(self) -> Result<Seen, E> {
                    Ok(Seen::Refs(Vec::new()))
                }
                fn visit_none<E>(self) -> Result<Seen, E> {
                    Ok(Seen::Refs(Vec::new()))
                }
                fn visit_bytes<E>(self, _: &[u8]) -> Result<Seen, E> {
                    Ok(Seen::Refs(Vec::new()))
                }
                fn visit_str<E>(self, v: &str) -> Result<Seen, E> {
                    Ok(Seen::Text(v.to_string()))
                }
                fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Seen, A::Error> {
                    let mut refs = Vec::new();
                    while let Some(x) = a.next_element::<Seen>()? {
                        refs.extend(x.refs());
                    }
                    Ok(Seen::Refs(refs))
                }
                fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Seen, A::Error> {
                    let mut pairs = Vec::new();
                    while let Some(pair) = a.next_entry::<Seen, Seen>()? {
                        pairs.push(pair);
                    }
                    if let [(Seen::Text(k), Seen::Uint(id))] = &pairs[..] {
                        if k == KEY && *id > 0 {
                            return Ok(Seen::Refs(vec![*id]));
                        }
                    }
                    let refs = pairs.into_iter().flat_map(|(k, v)| [k.refs(), v.refs()]);
                    Ok(Seen::Refs(refs.flatten().collect()))
                }
            }
            d.deserialize_any(V)
        }
    }
    let mut ids = serde_cbor::from_slice::<Seen>(payload).ok()?.refs();
    ids.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for id in ids {
        match out.last_mut() {
            Some((last, n)) if *last == id => *n += 1,
            _ => out.push((id, 1)),
        }
    }
    Some(out)
}

/// Runs `f`, asserting that it allocates at most twice `input` plus `slack` at its peak.
fn bounded<T>(what: &str, input: &[u8], slack: usize, f: impl FnOnce() -> T) -> T {
    let (r, peak) = peak_during(f);
    assert!(
        peak <= 2 * input.len() + slack,
        "{what} of {} bytes allocated {peak} bytes: {:02x?}",
        input.len(),
        &input[..input.len().min(64)]
    );
    r
}

/// What [`check`] saw of one payload.
#[derive(Default)]
struct Seen {
    /// serde_cbor decoded it, and found the same object references (possibly none).
    refs_compared: bool,
    /// It held object references.
    refs: bool,
    /// It was a valid release message.
    releases: bool,
}

/// Feeds one payload to every function that reads a peer's payloads, checking their results
/// against serde_cbor's decoding when it is small.
fn check(b: &[u8], long_describe: bool) -> Seen {
    let mut seen = Seen::default();
    let compare = b.len() <= 4096;
    let refs = bounded("object_refs", b, SLACK, || object_refs(b, KEY));
    assert!(refs.windows(2).all(|w| w[0].0 < w[1].0), "sorted, distinct");
    assert!(refs.iter().all(|&(id, n)| id > 0 && n > 0));
    seen.refs = !refs.is_empty();
    if compare {
        if let Some(want) = object_refs_by_serde(b) {
            assert_eq!(refs, want, "{b:02x?}");
            seen.refs_compared = true;
        }
    }
    let s = bounded("describe", b, SLACK, || describe(b, QUOTE_MAX));
    assert!(s.len() <= QUOTE_MAX + 64, "{s}");
    if long_describe {
        bounded("describe", b, SLACK, || describe(b, SLACK));
    }
    let _ = bounded("decode_releases", b, SLACK, || {
        decode_releases(b, |c| {
            assert!(!c.is_empty() && c.len() <= super::RELEASE_CHUNK);
        })
    });
    if compare {
        let mut got = Vec::new();
        let r = decode_releases(b, |c| got.extend_from_slice(c));
        match decode::<Vec<(u64, u64)>>(b) {
            Ok(want) => {
                assert!(r.is_ok() && got == want, "{b:02x?}: {r:?}");
                seen.releases = true;
            }
            Err(_) => assert!(r.is_err() && got.is_empty(), "{b:02x?}"),
        }
    }
    bounded("decode", b, SLACK, || decode::<(String, u64)>(b).is_ok());
    let slack = SLACK + SERDE_PREALLOC;
    bounded("decode", b, slack, || decode::<Vec<Option<f64>>>(b).is_ok());
    bounded("decode", b, slack, || decode::<Vec<Bytes>>(b).is_ok());
    seen
}

#[test]
fn decoding_hostile_payloads_never_panics_and_allocates_at_most_twice_the_payload() {
    let started = Instant::now();
    let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
    let (mut refs, mut refs_compared, mut releases) = (0, 0, 0);
    for i in 0..100_000 {
        let mut b = Vec::new();
        match i % 4 {
            0 => item(&mut rng, &mut b, 0),
            1 => {
                item(&mut rng, &mut b, 0);
                mutate(&mut rng, &mut b);
            }
            2 => {
                b = real_payload(&mut rng);
                mutate(&mut rng, &mut b);
            }
            _ => b = (0..rng.below(40)).map(|_| rng.next() as u8).collect(),
        }
        let seen = check(&b, i % 3 == 0);
        refs += seen.refs as usize;
        refs_compared += (seen.refs && seen.refs_compared) as usize;
        releases += seen.releases as usize;
    }
    eprintln!(
        "100000 payloads in {:?}: {refs} with object references ({refs_compared} of them \
         compared with serde_cbor's), {releases} valid release messages",
        started.elapsed()
    );
    // The generator reaches what it is meant to.
    assert!(refs > 20_000 && refs_compared > 5_000 && releases > 1_000);
}

/// A 1 MiB payload of tiny items: the case that made the value-tree decoding allocate hundreds
/// of megabytes.
#[test]
fn megabytes_of_tiny_items_cost_at_most_twice_their_size() {
    let mib = 1 << 20;
    let with_ref = |mut b: Vec<u8>| {
        // One more item, an object reference, so object_refs has something to find.
        let n = u32::from_be_bytes(b[1..5].try_into().unwrap()) + 1;
        b[1..5].copy_from_slice(&n.to_be_bytes());
        encode_into(&mut b, &Ref { id: 7 }).unwrap();
        b
    };
    let mut zeros = vec![0x9a];
    zeros.extend_from_slice(&(mib as u32).to_be_bytes());
    zeros.resize(5 + mib, 0x00);
    let mut nested = vec![0x9a, 0, 0, 0, 0];
    let mut n = 0u32;
    while nested.len() < mib {
        // Alternating one-element arrays and one-pair maps, 60 deep, then a 0.
        for _ in 0..30 {
            nested.extend_from_slice(&[0x81, 0xa1, 0x00]);
        }
        nested.push(0x00);
        n += 1;
    }
    nested[1..5].copy_from_slice(&n.to_be_bytes());
    let mut refs = Vec::new();
    let all_refs: Vec<Ref> = (1..=mib as u64 / 16).map(|id| Ref { id }).collect();
    encode_into(&mut refs, &all_refs).unwrap();
    let mut releases = Vec::new();
    let pairs: Vec<(u64, u64)> = (0..mib as u64 / 3).map(|i| (i % 20, 1)).collect();
    encode_into(&mut releases, &pairs).unwrap();
    let zeros = with_ref(zeros);
    let nested = with_ref(nested);
    for (what, b) in [
        ("zeros", &zeros),
        ("nested", &nested),
        ("references", &refs),
        ("releases", &releases),
    ] {
        let started = Instant::now();
        let (found, refs_peak) = peak_during(|| object_refs(b, KEY));
        let (_, quote_peak) = peak_during(|| describe(b, QUOTE_MAX));
        let (_, long_peak) = peak_during(|| describe(b, SLACK));
        let (r, releases_peak) = peak_during(|| decode_releases(b, |_| {}));
        eprintln!(
            "{what}: {} bytes; peak allocation: object_refs {refs_peak} ({} found), \
             describe {quote_peak} / {long_peak}, decode_releases {releases_peak} ({}) in {:?}",
            b.len(),
            found.len(),
            if r.is_ok() { "ok" } else { "refused" },
            started.elapsed(),
        );
        for peak in [refs_peak, quote_peak, long_peak, releases_peak] {
            assert!(peak <= 2 * b.len() + SLACK, "{what}: {peak}");
        }
    }
    assert_eq!(object_refs(&zeros, KEY), vec![(7, 1)]);
    assert_eq!(object_refs(&nested, KEY), vec![(7, 1)]);
    assert_eq!(object_refs(&refs, KEY).len(), mib / 16);
}
