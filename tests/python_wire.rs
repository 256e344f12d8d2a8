//! The brine codec and the framing agree byte for byte with the real Python RPyC 6.0.2: rpyc's
//! own `brine.dump` output (golden_brine.py) is what the Rust encoder writes and decodes back,
//! what the Rust encoder writes rpyc decodes to the same value, and frames on either side of
//! the 3,000-byte compression threshold pass between the two in both directions.

mod common;

use common::python::{run_python, same_value, PyProcess};
use rpyc::python::wire::{brine_dump, brine_load, frame};
use rpyc::python::Value;
use std::collections::{BTreeMap, HashSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// How long one golden_brine.py run may take.
const SCRIPT: Duration = Duration::from_secs(30);

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    assert!(s.len() % 2 == 0, "odd hex {s}");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap_or_else(|_| panic!("bad hex {s}")))
        .collect()
}

fn int(i: i64) -> Value {
    Value::Int(i)
}

fn big(s: &str) -> Value {
    Value::BigInt(s.into())
}

fn tuple(items: Vec<Value>) -> Value {
    Value::Tuple(items)
}

fn s(x: &str) -> Value {
    Value::Str(x.into())
}

fn bytes(b: &[u8]) -> Value {
    Value::Bytes(b.to_vec())
}

/// Python's repr of a str made of printable characters without quotes or backslashes.
fn str_repr(x: &str) -> String {
    format!("'{x}'")
}

/// Every value golden_brine.py prints, by its name there, with Python's `repr()` of it.
fn golden_values() -> BTreeMap<&'static str, (Value, String)> {
    let ten_pow_300 = format!("1{}", "0".repeat(300));
    let a300 = "a".repeat(300);
    let zeros300 = format!("b'{}'", "\\x00".repeat(300));
    let range = |n: i64| (0..n).map(int).collect::<Vec<_>>();
    let range_repr = |n: i64| (0..n).map(|i| i.to_string()).collect::<Vec<_>>().join(", ");
    let v: Vec<(&'static str, Value, String)> = vec![
        ("none", Value::None, "None".into()),
        ("true", Value::Bool(true), "True".into()),
        ("false", Value::Bool(false), "False".into()),
        (
            "not_implemented",
            Value::NotImplemented,
            "NotImplemented".into(),
        ),
        ("ellipsis", Value::Ellipsis, "Ellipsis".into()),
        ("int_0", int(0), "0".into()),
        ("int_1", int(1), "1".into()),
        ("int_minus_1", int(-1), "-1".into()),
        ("int_minus_48", int(-48), "-48".into()),
        ("int_159", int(159), "159".into()),
        ("int_minus_49", int(-49), "-49".into()),
        ("int_160", int(160), "160".into()),
        ("int_1000", int(1000), "1000".into()),
        ("int_2_pow_62", int(1 << 62), (1i64 << 62).to_string()),
        (
            "int_2_pow_63",
            big("9223372036854775808"),
            "9223372036854775808".into(),
        ),
        (
            "int_2_pow_64",
            big("18446744073709551616"),
            "18446744073709551616".into(),
        ),
        ("int_minus_2_pow_63", int(i64::MIN), i64::MIN.to_string()),
        (
            "int_minus_2_pow_100",
            big("-1267650600228229401496703205376"),
            "-1267650600228229401496703205376".into(),
        ),
        ("int_10_pow_300", big(&ten_pow_300), ten_pow_300.clone()),
        ("float_1_5", Value::Float(1.5), "1.5".into()),
        ("float_minus_0", Value::Float(-0.0), "-0.0".into()),
        ("float_inf", Value::Float(f64::INFINITY), "inf".into()),
        (
            "complex_1_minus_2",
            Value::Complex(1.0, -2.0),
            "(1-2j)".into(),
        ),
        ("bytes_empty", bytes(b""), "b''".into()),
        ("bytes_1", bytes(b"y"), "b'y'".into()),
        ("bytes_4", bytes(b"abcd"), "b'abcd'".into()),
        ("bytes_5", bytes(b"abcde"), "b'abcde'".into()),
        ("bytes_300_zero", bytes(&[0; 300]), zeros300),
        ("str_empty", s(""), "''".into()),
        ("str_x", s("x"), "'x'".into()),
        ("str_e_acute", s("\u{e9}"), "'\u{e9}'".into()),
        ("str_hello", s("hello"), "'hello'".into()),
        ("str_300", s(&a300), str_repr(&a300)),
        ("tuple_empty", tuple(vec![]), "()".into()),
        ("tuple_1", tuple(vec![int(1)]), "(1,)".into()),
        ("tuple_2", tuple(vec![int(1), int(2)]), "(1, 2)".into()),
        (
            "tuple_3",
            tuple(vec![int(1), int(2), int(3)]),
            "(1, 2, 3)".into(),
        ),
        (
            "tuple_4",
            tuple(vec![int(1), int(2), int(3), int(4)]),
            "(1, 2, 3, 4)".into(),
        ),
        ("tuple_5", tuple(range(5)), format!("({})", range_repr(5))),
        (
            "tuple_300",
            tuple(range(300)),
            format!("({})", range_repr(300)),
        ),
        (
            "tuple_nested",
            tuple(vec![
                tuple(vec![int(1), s("a")]),
                tuple(vec![bytes(b"b"), Value::None]),
            ]),
            "((1, 'a'), (b'b', None))".into(),
        ),
        (
            "frozenset_empty",
            Value::FrozenSet(vec![]),
            "frozenset()".into(),
        ),
        (
            "frozenset_1",
            Value::FrozenSet(vec![int(1)]),
            "frozenset({1})".into(),
        ),
        (
            "slice_1_2_3",
            Value::Slice(Box::new([int(1), int(2), int(3)])),
            "slice(1, 2, 3)".into(),
        ),
        (
            "slice_none_5_none",
            Value::Slice(Box::new([Value::None, int(5), Value::None])),
            "slice(None, 5, None)".into(),
        ),
    ];
    let mut table = BTreeMap::new();
    for (name, value, repr) in v {
        assert!(
            table.insert(name, (value, repr)).is_none(),
            "{name} twice in the table"
        );
    }
    table
}

/// What golden_brine.py prints: name -> rpyc's bytes.
fn rpyc_vectors() -> Vec<(String, Vec<u8>)> {
    let out = run_python("golden_brine.py", &[], SCRIPT);
    out.assert_success();
    out.lines()
        .iter()
        .map(|line| {
            let (name, h) = line
                .split_once('\t')
                .unwrap_or_else(|| panic!("no tab in {line:?}"));
            (name.to_string(), unhex(h))
        })
        .collect()
}

#[test]
fn the_rust_encoder_writes_exactly_what_rpyc_brine_dump_writes() {
    let table = golden_values();
    let vectors = rpyc_vectors();
    let printed: HashSet<&str> = vectors.iter().map(|(n, _)| n.as_str()).collect();
    for name in table.keys() {
        assert!(
            printed.contains(name),
            "golden_brine.py no longer prints {name}"
        );
    }
    for (name, want) in &vectors {
        let (value, _) = table
            .get(name.as_str())
            .unwrap_or_else(|| panic!("golden_brine.py prints {name}, which this test lacks"));
        let got = brine_dump(value).unwrap_or_else(|e| panic!("{name}: cannot encode: {e}"));
        assert_eq!(
            hex(&got),
            hex(want),
            "{name}: Rust's encoding differs from rpyc's"
        );
    }
}

#[test]
fn the_rust_decoder_reads_back_what_rpyc_brine_dump_writes() {
    let table = golden_values();
    for (name, data) in rpyc_vectors() {
        let (want, _) = &table[name.as_str()];
        let got = brine_load(&data)
            .unwrap_or_else(|e| panic!("{name}: Rust cannot decode rpyc's {}: {e}", hex(&data)));
        assert!(
            same_value(&got, want),
            "{name}: decoded {got:?}, want {want:?}"
        );
    }
}

/// Values rpyc's vectors do not cover, with Python's repr of them.
fn more_values() -> Vec<(Value, String)> {
    let digits_4300 = "9".repeat(4300);
    vec![
        (Value::Float(f64::NAN), "nan".into()),
        (Value::Float(f64::NEG_INFINITY), "-inf".into()),
        (Value::Float(5e-324), "5e-324".into()),
        (Value::Complex(0.0, 1e300), "1e+300j".into()),
        (int(i64::MAX), i64::MAX.to_string()),
        (big("-9223372036854775809"), "-9223372036854775809".into()),
        (big(&digits_4300), digits_4300.clone()),
        (
            s("h\u{e9}llo \u{65e5}\u{672c} \u{1f980}"),
            "'h\u{e9}llo \u{65e5}\u{672c} \u{1f980}'".into(),
        ),
        (s(&"\u{e9}".repeat(200)), str_repr(&"\u{e9}".repeat(200))),
        (bytes(&[0xff, 0x00, 0x7f]), "b'\\xff\\x00\\x7f'".into()),
        (
            tuple((0..256).map(int).collect()),
            format!(
                "({})",
                (0..256)
                    .map(|i| i.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ),
        (
            Value::Slice(Box::new([s("a"), bytes(b"b"), tuple(vec![int(1)])])),
            "slice('a', b'b', (1,))".into(),
        ),
        (
            Value::FrozenSet(vec![tuple(vec![int(2), int(3)])]),
            "frozenset({(2, 3)})".into(),
        ),
        (
            tuple(vec![tuple(vec![tuple(vec![tuple(vec![tuple(vec![])])])])]),
            "(((((),),),),)".into(),
        ),
    ]
}

#[test]
fn rpyc_decodes_what_the_rust_encoder_writes() {
    let mut values: Vec<(Value, String)> = golden_values().into_values().collect();
    values.extend(more_values());
    // One Python run for all: a tuple of every value, whose repr is the reprs joined.
    let all = Value::Tuple(values.iter().map(|(v, _)| v.clone()).collect());
    let want = format!(
        "({})",
        values
            .iter()
            .map(|(_, r)| r.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let data = brine_dump(&all).expect("encode");
    let out = run_python("golden_brine.py", &["--decode", &hex(&data)], SCRIPT);
    out.assert_success();
    if out.stdout.trim_end() == want {
        return;
    }
    // Find the culprit: one value at a time.
    for (v, repr) in &values {
        let data = brine_dump(v).expect("encode");
        let one = run_python("golden_brine.py", &["--decode", &hex(&data)], SCRIPT);
        assert!(
            one.success() && one.stdout.trim_end() == repr,
            "rpyc decodes Rust's {v:?} ({}) differently: want {repr}\n{one}",
            hex(&data)
        );
    }
    panic!(
        "rpyc decodes the tuple of all values differently:\n want {want:.500}\n got  {:.500}",
        out.stdout
    );
}

#[test]
fn rpyc_refuses_what_the_rust_decoder_refuses_too() {
    // Trailing bytes, an unknown tag, a py2 long: neither side takes them.
    for bad in ["5051", "f0", "09"] {
        assert!(
            brine_load(&unhex(bad)).is_err(),
            "Rust decoded {bad} without complaint"
        );
        let out = run_python("golden_brine.py", &["--decode", bad], SCRIPT);
        assert!(!out.success(), "rpyc decoded {bad}: {out}");
    }
}

// ---- frames, against the real server ----

/// A `PING` request with `data` as its payload, and the reply payload rpyc answers it with
/// (the data back): `u8 msg | brine((seq, body))`.
fn ping(seq: i64, data: &str) -> (Vec<u8>, Vec<u8>) {
    let request = tuple(vec![
        int(seq),
        tuple(vec![int(1), tuple(vec![int(1), tuple(vec![s(data)])])]),
    ]);
    let reply = tuple(vec![int(seq), tuple(vec![int(1), s(data)])]);
    let mut req = vec![1u8];
    req.extend(brine_dump(&request).unwrap());
    let mut rep = vec![2u8];
    rep.extend(brine_dump(&reply).unwrap());
    (req, rep)
}

/// The `data` length whose PING request (`request` true) or reply payload is exactly `size`
/// bytes.
fn ping_data_len(size: usize, request: bool) -> usize {
    (size - 100..size)
        .find(|&n| {
            let (q, r) = ping(0, &"p".repeat(n));
            (if request { q } else { r }).len() == size
        })
        .unwrap_or_else(|| panic!("no PING of exactly {size} bytes"))
}

/// One frame read from rpyc: (compressed flag, data as sent).
fn read_frame(s: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut head = [0u8; 5];
    s.read_exact(&mut head).expect("a frame header from rpyc");
    let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
    let mut data = vec![0u8; len + 1];
    s.read_exact(&mut data).expect("the frame's data");
    assert_eq!(
        data.pop(),
        Some(b'\n'),
        "rpyc ends each frame with a newline"
    );
    (head[4], data)
}

fn inflate(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::ZlibDecoder::new(data)
        .read_to_end(&mut out)
        .expect("rpyc's compressed frame is a zlib stream");
    out
}

#[test]
fn frames_at_the_compression_threshold_pass_both_ways() {
    let server = PyProcess::server("demo_server.py", &[]);
    let mut sock = TcpStream::connect(("127.0.0.1", server.port)).expect("connect");
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // Our requests of 3,000 bytes (sent plain) and 3,001 (sent compressed): rpyc reads both.
    // Its replies of 3,000 and 3,001 bytes: plain, then compressed, byte for byte what the
    // Rust encoder makes of the same reply.
    let sizes = [(3000, true), (3001, true), (3000, false), (3001, false)];
    for (seq, (size, request)) in sizes.into_iter().enumerate() {
        let data = "p".repeat(ping_data_len(size, request));
        let (req, rep) = ping(seq as i64, &data);
        let f = frame(&req);
        assert_eq!(
            f[4],
            (req.len() > 3000) as u8,
            "the Rust frame's flag for a {}-byte payload",
            req.len()
        );
        sock.write_all(&f).unwrap();
        let (flag, got) = read_frame(&mut sock);
        assert_eq!(
            flag,
            (rep.len() > 3000) as u8,
            "rpyc's flag for a {}-byte reply",
            rep.len()
        );
        let payload = if flag == 1 { inflate(&got) } else { got };
        assert_eq!(
            hex(&payload),
            hex(&rep),
            "rpyc's reply to a {}-byte PING request",
            req.len()
        );
    }
    drop(sock);
    server.wait_line("DISCONNECTED", Duration::from_secs(10));
}
