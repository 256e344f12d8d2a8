//! The wire format by hand (PROTOCOL.md), for tests that play a hostile or broken peer on a raw
//! socket: hellos, frames, CBOR heads, and reading what the other side sends.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

pub const CALL: u64 = 0;
pub const ONEWAY: u64 = 1;
pub const REPLY: u64 = 2;
pub const ERROR: u64 = 3;
pub const RELEASE: u64 = 4;
pub const PING: u64 = 5;

/// A hello of protocol `version` announcing `max_frame` and `max_queued`.
fn hello_of(version: u16, max_frame: u32, max_queued: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..4].copy_from_slice(b"RPYC");
    b[4..6].copy_from_slice(&version.to_be_bytes());
    b[8..12].copy_from_slice(&max_frame.to_be_bytes());
    b[12..16].copy_from_slice(&max_queued.to_be_bytes());
    b
}

/// A version-1 hello announcing `max_frame` and `max_queued`.
pub fn hello_with(max_frame: u32, max_queued: u32) -> [u8; 16] {
    hello_of(1, max_frame, max_queued)
}

/// The default [`hello`] with another protocol version number.
pub fn hello_version(version: u16) -> [u8; 16] {
    hello_of(version, 64 << 20, 65_536)
}

/// A hello announcing 64 MiB frames and 65,536 queued requests.
pub fn hello() -> [u8; 16] {
    hello_version(1)
}

/// Appends a CBOR head (`major` type, argument `v`).
pub fn cbor_head(out: &mut Vec<u8>, major: u8, v: u64) {
    let m = major << 5;
    if v < 24 {
        out.push(m | v as u8);
    } else if v <= 0xff {
        out.extend_from_slice(&[m | 24, v as u8]);
    } else if v <= 0xffff {
        out.push(m | 25);
        out.extend_from_slice(&(v as u16).to_be_bytes());
    } else if v <= 0xffff_ffff {
        out.push(m | 26);
        out.extend_from_slice(&(v as u32).to_be_bytes());
    } else {
        out.push(m | 27);
        out.extend_from_slice(&v.to_be_bytes());
    }
}

/// A whole frame: length, header `[kind, id, parent, target, method]`, then `payload`.
pub fn frame(
    kind: u64,
    id: u64,
    parent: u64,
    target: u64,
    method: &str,
    payload: &[u8],
) -> Vec<u8> {
    let mut b = Vec::with_capacity(payload.len() + 32);
    b.extend_from_slice(&[0; 4]);
    cbor_head(&mut b, 4, 5);
    for v in [kind, id, parent, target] {
        cbor_head(&mut b, 0, v);
    }
    cbor_head(&mut b, 3, method.len() as u64);
    b.extend_from_slice(method.as_bytes());
    b.extend_from_slice(payload);
    let len = (b.len() - 4) as u32;
    b[..4].copy_from_slice(&len.to_be_bytes());
    b
}

/// A CBOR array of `n` zero bytes (`[0, 0, ...]`): the cheapest items to send, the costliest
/// to hold as a tree.
pub fn array_of_zeros(n: usize) -> Vec<u8> {
    let mut p = Vec::with_capacity(n + 9);
    cbor_head(&mut p, 4, n as u64);
    p.resize(p.len() + n, 0);
    p
}

/// An object reference `{"$rpyc-obj": id}`.
pub fn object_ref(id: u64) -> Vec<u8> {
    let mut p = vec![0xa1, 0x69];
    p.extend_from_slice(b"$rpyc-obj");
    cbor_head(&mut p, 0, id);
    p
}

/// A frame read from the other side.
#[derive(Debug)]
pub struct Frame {
    pub kind: u64,
    pub id: u64,
    pub parent: u64,
    pub target: u64,
    pub method: String,
    pub payload: Vec<u8>,
    /// The body's length (the frame's length field).
    pub len: usize,
}

/// Reads an unsigned CBOR integer at `pos` of `b`, moving `pos` past it.
pub fn uint(b: &[u8], pos: &mut usize) -> u64 {
    let ib = b[*pos];
    *pos += 1;
    assert_eq!(
        ib >> 5,
        0,
        "expected an unsigned integer in {:02x?}",
        &b[..b.len().min(64)]
    );
    let n = match ib & 0x1f {
        v @ 0..=23 => return v as u64,
        24 => 1,
        25 => 2,
        26 => 4,
        27 => 8,
        _ => panic!("bad integer head"),
    };
    let v = b[*pos..*pos + n]
        .iter()
        .fold(0u64, |v, &x| (v << 8) | x as u64);
    *pos += n;
    v
}

/// Reads one frame; `None` at a clean end of stream.
pub fn read_frame(s: &mut impl Read) -> io::Result<Option<Frame>> {
    let mut len = [0u8; 4];
    match s.read_exact(&mut len) {
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        other => other?,
    }
    let len = u32::from_be_bytes(len) as usize;
    let mut b = vec![0u8; len];
    s.read_exact(&mut b)?;
    assert_eq!(b[0], 0x85, "header is a 5-array");
    let mut pos = 1;
    let kind = uint(&b, &mut pos);
    let id = uint(&b, &mut pos);
    let parent = uint(&b, &mut pos);
    let target = uint(&b, &mut pos);
    let head = b[pos];
    assert_eq!(head >> 5, 3, "method is a text string");
    let mlen = match head & 0x1f {
        n @ 0..=23 => {
            pos += 1;
            n as usize
        }
        24 => {
            pos += 2;
            b[pos - 1] as usize
        }
        25 => {
            pos += 3;
            u16::from_be_bytes([b[pos - 2], b[pos - 1]]) as usize
        }
        _ => panic!("method name too long for a test"),
    };
    let method = String::from_utf8(b[pos..pos + mlen].to_vec()).expect("UTF-8 method");
    pos += mlen;
    Ok(Some(Frame {
        kind,
        id,
        parent,
        target,
        method,
        payload: b[pos..].to_vec(),
        len,
    }))
}

/// Connects to `port` and completes the handshake with `hello`; reads time out after 10 s.
pub fn client_with(port: u16, hello: [u8; 16]) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&hello).unwrap();
    let mut theirs = [0u8; 16];
    s.read_exact(&mut theirs).expect("the server's hello");
    assert_eq!(&theirs[..4], b"RPYC");
    s
}

/// [`client_with`] the default [`hello`].
pub fn client(port: u16) -> TcpStream {
    client_with(port, hello())
}

/// A listener on a free loopback port.
pub fn listener() -> (TcpListener, u16) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    (l, port)
}

/// Accepts one client and completes the handshake with it (our hello first).
pub fn accept(l: &TcpListener) -> TcpStream {
    let (mut s, _) = l.accept().unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&hello()).unwrap();
    let mut theirs = [0u8; 16];
    s.read_exact(&mut theirs).expect("the client's hello");
    s
}

/// Reads and discards what the peer sends until it hangs up; `true` if it did within `within`
/// (in all, however much it sent meanwhile).
///
/// A hang-up is the end of the stream, or a reset (a peer that closes with input of ours
/// unread resets the connection instead of ending it). A read that times out is no hang-up;
/// any other error fails the test.
pub fn hangs_up_within(s: &mut TcpStream, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) => match e.kind() {
                io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted => return true,
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => return false,
                _ => panic!("reading until the peer hangs up: {e}"),
            },
        }
    }
}
