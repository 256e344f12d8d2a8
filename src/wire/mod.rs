//! The wire format, defined once: the handshake hello, the frame, and the frame header.
//!
//! `PROTOCOL.md` at the repository root is the normative description; this module is its code.
//! A frame is a 4-byte big-endian body length followed by the body; the body is a CBOR sequence
//! of two items: a header array `[kind, id, parent, target, method]` encoded here by hand, and
//! one payload item encoded by [`codec`]. Reading frames from a transport (the length checked
//! against the limit before any memory is reserved for the body) is
//! [`crate::transport::reader`]'s.
//!
//! A large frame (at least [`DETACH_MIN`] bytes) whose payload is a single byte string, or a
//! one-element array holding one, with the string's data running to the end of the frame, is
//! read in two parts: the body keeps everything before the string's head and ends in a
//! placeholder empty byte string, and the head and data go into a [`Detached`] of the frame,
//! the data straight into a buffer of its own. Decoding then moves that buffer into the
//! received `Bytes` instead of copying it out of the body; see [`codec`] (module docs)
//! for how decoding stays exactly what the bytes as sent would give.

pub(crate) mod codec;

use crate::base::buffers;
use crate::base::limits::Charge;
use crate::error::{Error, HandshakeError, HandshakeErrorKind};
use codec::{Detached, Splice};
use std::io::IoSlice;
use std::ops::Range;

/// First four bytes each side sends.
pub(crate) const MAGIC: [u8; 4] = *b"RPYC";
/// The protocol version this crate speaks.
pub(crate) const VERSION: u16 = 1;
/// Size of the hello message.
pub(crate) const HELLO_LEN: usize = 16;
/// Hello flag: the server refuses this connection (its connection limit is reached).
pub(crate) const FLAG_REFUSED: u16 = 1;
/// Hello flag, with `FLAG_REFUSED`: the server only speaks TLS (a plain client reached a TLS
/// port).
pub(crate) const FLAG_TLS_REQUIRED: u16 = 2;
/// Longest method name accepted in a header.
const MAX_METHOD_LEN: usize = 1024;

/// Message kinds (the first header field).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A request that expects a reply.
    Call = 0,
    /// A request that expects no reply.
    Oneway = 1,
    /// A successful reply; the payload is the result.
    Reply = 2,
    /// A failed reply; the payload is `[code, service, method, message]`.
    Error = 3,
    /// Releases remote object references; the payload is `[[id, count], ...]`.
    Release = 4,
    /// Liveness check, answered by a `Reply` with a null payload.
    Ping = 5,
}

impl Kind {
    fn from_u64(v: u64) -> Option<Kind> {
        Some(match v {
            0 => Kind::Call,
            1 => Kind::Oneway,
            2 => Kind::Reply,
            3 => Kind::Error,
            4 => Kind::Release,
            5 => Kind::Ping,
            _ => return None,
        })
    }
}

/// The handshake message: magic, version, flags and the sender's receive limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Hello {
    pub version: u16,
    pub flags: u16,
    /// Largest frame body the sender accepts.
    pub max_frame: u32,
    /// Most requests the sender queues while all its workers are busy.
    pub max_queued: u32,
}

impl Hello {
    pub(crate) fn encode(&self) -> [u8; HELLO_LEN] {
        let mut b = [0u8; HELLO_LEN];
        b[0..4].copy_from_slice(&MAGIC);
        b[4..6].copy_from_slice(&self.version.to_be_bytes());
        b[6..8].copy_from_slice(&self.flags.to_be_bytes());
        b[8..12].copy_from_slice(&self.max_frame.to_be_bytes());
        b[12..16].copy_from_slice(&self.max_queued.to_be_bytes());
        b
    }

    /// Parses a peer's hello, naming what the peer seems to be when it is not rpyc.
    pub(crate) fn decode(b: &[u8; HELLO_LEN]) -> Result<Hello, Error> {
        if let Some(e) = python_rpyc(b) {
            return Err(e);
        }
        if b[0..4] != MAGIC {
            return Err(Error::Handshake(HandshakeError::new(
                HandshakeErrorKind::NotRpyc,
                format!(
                    "the peer is not an rpyc peer ({}); first bytes: {:02x?}",
                    guess_protocol(b),
                    &b[..8]
                ),
            )));
        }
        let hello = Hello {
            version: u16::from_be_bytes([b[4], b[5]]),
            flags: u16::from_be_bytes([b[6], b[7]]),
            max_frame: u32::from_be_bytes([b[8], b[9], b[10], b[11]]),
            max_queued: u32::from_be_bytes([b[12], b[13], b[14], b[15]]),
        };
        if hello.version != VERSION {
            return Err(Error::Handshake(HandshakeError::new(
                HandshakeErrorKind::VersionMismatch,
                format!(
                "the peer speaks rpyc protocol version {}, this side speaks version {VERSION}; \
                 upgrade the older side",
                hello.version
            ),
            )));
        }
        if hello.max_frame < 64 {
            return Err(Error::Handshake(HandshakeError::new(
                HandshakeErrorKind::BadHello,
                format!(
                    "the peer announced an unusable frame limit of {} bytes",
                    hello.max_frame
                ),
            )));
        }
        Ok(hello)
    }
}

/// The error for a peer whose first bytes (at least 6 of them) are a Python RPyC 6 frame
/// rather than a hello: a length under 1 MiB, a compressed flag of 0 then a message type
/// 1..=3, or a flag of 1 then a zlib header. A Python client's first frame (a `GETROOT`) has
/// only 14 bytes, less than a hello: the handshake checks the bytes as they come.
pub(crate) fn python_rpyc(b: &[u8]) -> Option<Error> {
    if b.len() < 6 || b[0..4] == MAGIC {
        return None;
    }
    let len = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    let frame = match b[4] {
        0 => (1..=3).contains(&b[5]),
        1 => b[5] == 0x78,
        _ => false,
    };
    (len > 0 && len < 1 << 20 && frame).then(|| {
        Error::Handshake(HandshakeError::new(
            HandshakeErrorKind::VersionMismatch,
            format!(
                "the peer speaks Python RPyC 6, not rpyc's protocol (its first bytes are an RPyC \
                 frame: {:02x?}): this looks like a Python RPyC client: serve it with \
                 rpyc::python::serve (and call Python RPyC servers with rpyc::python::connect)",
                &b[..b.len().min(8)]
            ),
        ))
    })
}

fn guess_protocol(b: &[u8]) -> &'static str {
    if b.starts_with(b"SSH-") {
        "it is an SSH server"
    } else if b[0] == 0x16 && b[1] == 0x03 {
        "it speaks TLS: connect with TLS, or to the plain port"
    } else if b.starts_with(b"HTTP") || b.starts_with(b"GET ") || b.starts_with(b"POST") {
        "it speaks HTTP"
    } else {
        "unknown protocol"
    }
}

/// A decoded frame header; `method` is a range into the frame's bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Header {
    pub kind: Kind,
    pub id: u64,
    pub parent: u64,
    pub target: u64,
    pub method: Range<usize>,
}

/// One received frame: its body bytes, the parsed header, and where the payload starts.
pub(crate) struct Frame {
    pub body: Vec<u8>,
    pub header: Header,
    pub payload_at: usize,
    /// The payload's byte string, when it was read apart from the body (see the module docs);
    /// the payload then ends in a placeholder. Hand it to [`crate::wire::codec::offer`] to decode.
    pub detached: Option<Detached>,
    /// What holding this frame costs its connection's memory budget, returned when it drops.
    pub charge: Option<Charge>,
    /// More of the peer's bytes were already read when this frame was handed out: the peer
    /// sends a pipeline, so the reply to this request may wait for those of the next ones.
    pub more: bool,
}

impl Frame {
    /// Parses the header of a frame body.
    pub(crate) fn parse(body: Vec<u8>) -> Result<Frame, Error> {
        let (header, payload_at) = parse_header(&body)?;
        if payload_at >= body.len() {
            return Err(Error::Protocol("frame has a header but no payload".into()));
        }
        Ok(Frame {
            body,
            header,
            payload_at,
            detached: None,
            charge: None,
            more: false,
        })
    }

    pub(crate) fn method(&self) -> &str {
        // Checked to be UTF-8 by parse_header.
        std::str::from_utf8(&self.body[self.header.method.clone()]).unwrap_or("")
    }

    pub(crate) fn payload(&self) -> &[u8] {
        &self.body[self.payload_at..]
    }
}

impl Drop for Frame {
    fn drop(&mut self) {
        buffers::give(std::mem::take(&mut self.body));
    }
}

fn head(b: &[u8], pos: &mut usize) -> Result<(u8, u64), Error> {
    codec::walk::head(b, pos).ok_or_else(|| match b.get(*pos) {
        Some(&ib) if ib & 0x1f > 27 => Error::Protocol(format!(
            "frame header uses an unsupported CBOR encoding (initial byte {ib:#04x})"
        )),
        _ => Error::Protocol("truncated or malformed frame header".into()),
    })
}

fn uint(b: &[u8], pos: &mut usize, field: &str) -> Result<u64, Error> {
    match head(b, pos)? {
        (0, v) => Ok(v),
        (m, _) => Err(Error::Protocol(format!(
            "frame header field `{field}` must be an unsigned integer, got CBOR major type {m}"
        ))),
    }
}

/// Parses `[kind, id, parent, target, method]` and returns the header and the payload offset.
fn parse_header(b: &[u8]) -> Result<(Header, usize), Error> {
    let mut pos = 0;
    match head(b, &mut pos)? {
        (4, 5) => {}
        (m, n) => {
            return Err(Error::Protocol(format!(
                "frame header must be a CBOR array of 5 items, got major type {m} with {n}"
            )))
        }
    }
    let kind_raw = uint(b, &mut pos, "kind")?;
    let kind = Kind::from_u64(kind_raw)
        .ok_or_else(|| Error::Protocol(format!("unknown message kind {kind_raw}")))?;
    let id = uint(b, &mut pos, "id")?;
    let parent = uint(b, &mut pos, "parent")?;
    let target = uint(b, &mut pos, "target")?;
    let len = match head(b, &mut pos)? {
        (3, n) if n as usize <= MAX_METHOD_LEN => n as usize,
        (3, n) => {
            return Err(Error::Protocol(format!(
                "method name of {n} bytes exceeds the limit of {MAX_METHOD_LEN}"
            )))
        }
        (m, _) => {
            return Err(Error::Protocol(format!(
                "frame header field `method` must be a text string, got CBOR major type {m}"
            )))
        }
    };
    let method = pos..pos + len;
    let text = b
        .get(method.clone())
        .ok_or_else(|| Error::Protocol("truncated method name in frame header".into()))?;
    std::str::from_utf8(text)
        .map_err(|_| Error::Protocol("method name in frame header is not UTF-8".into()))?;
    Ok((
        Header {
            kind,
            id,
            parent,
            target,
            method: method.clone(),
        },
        method.end,
    ))
}

fn put_head(out: &mut Vec<u8>, major: u8, v: u64) {
    let m = major << 5;
    if v < 24 {
        out.push(m | v as u8);
    } else if v <= u8::MAX as u64 {
        out.extend_from_slice(&[m | 24, v as u8]);
    } else if v <= u16::MAX as u64 {
        out.push(m | 25);
        out.extend_from_slice(&(v as u16).to_be_bytes());
    } else if v <= u32::MAX as u64 {
        out.push(m | 26);
        out.extend_from_slice(&(v as u32).to_be_bytes());
    } else {
        out.push(m | 27);
        out.extend_from_slice(&v.to_be_bytes());
    }
}

/// Smallest frame whose payload byte string is read apart from the body.
pub(crate) const DETACH_MIN: usize = 256 * 1024;
/// How much of a large frame is read first to decide whether to detach its byte string: more
/// than the longest header, and a multiple of the reader's chunk.
pub(crate) const PEEK: usize = 4096;

/// Where a payload's byte string starts (its head) and where its data starts, if the payload at
/// `payload_at` has a layout to detach (see the module docs) within `pre`, the first bytes of a
/// body of `len` bytes. Only requests and replies qualify.
pub(crate) fn detachable(pre: &[u8], len: usize) -> Option<(usize, usize)> {
    let (header, payload_at) = parse_header(pre).ok()?;
    if !matches!(header.kind, Kind::Call | Kind::Oneway | Kind::Reply) {
        return None;
    }
    let at = match *pre.get(payload_at)? {
        0x81 => payload_at + 1, // a one-element array
        _ => payload_at,
    };
    let mut data_at = at;
    let (major, n) = match pre.get(at)? {
        // Definite lengths only (head() refuses indefinite ones).
        b if b >> 5 == 2 => head(pre, &mut data_at).ok()?,
        _ => return None,
    };
    (major == 2 && (data_at as u64).checked_add(n)? == len as u64).then_some((at, data_at))
}

/// Room left in front of the payload for the length prefix and a header without method name:
/// 4 (length) + 1 (array) + 1 (kind) + 3 * 9 (ids) + 9 (text head).
const GAP: usize = 4 + 1 + 1 + 27 + 9;

/// An outgoing frame, built payload first: the payload is encoded into the buffer after a gap,
/// then the header and length are written into the gap, so a large payload is never copied.
/// Large [`Bytes`](codec::Bytes) in the payload are not even copied into the buffer: the frame
/// keeps their memory as [`Splice`]s and the transport writes buffer and splices in order with
/// vectored writes.
///
/// Sealing is where everything the receiver would call a protocol violation is refused
/// locally, before a byte is written: a method name over [`MAX_METHOD_LEN`] bytes, an empty
/// payload, a body whose length does not fit the 4-byte length field. (The peer's own frame
/// limit is checked by the connection, which knows it.)
pub(crate) struct OutFrame {
    buf: Vec<u8>,
    start: usize,
    /// Memory sent between bytes of `buf`, in order of position.
    splices: Vec<Splice>,
    sealed: bool,
    /// The kind and id it was sealed with.
    kind: Option<Kind>,
    id: u64,
}

impl OutFrame {
    /// A frame for a header whose method name has `method_len` bytes.
    pub(crate) fn new(method_len: usize) -> OutFrame {
        let gap = GAP + method_len.min(MAX_METHOD_LEN + 1);
        let mut buf = Vec::with_capacity(gap + 64);
        buf.resize(gap, 0);
        OutFrame {
            buf,
            start: gap,
            splices: Vec::new(),
            sealed: false,
            kind: None,
            id: 0,
        }
    }

    /// The buffer to append the payload to (every byte copied into it).
    pub(crate) fn payload(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }

    /// Runs `f`, which appends the payload to the buffer it is given, with large
    /// [`Bytes`](codec::Bytes) kept as splices instead of copied (see [`codec::splicing_into`]).
    pub(crate) fn encode<R>(&mut self, f: impl FnOnce(&mut Vec<u8>) -> R) -> R {
        codec::splicing_into(&mut self.buf, &mut self.splices, f)
    }

    /// Writes header and length in front of the payload; returns the body's length (the frame's
    /// without its 4-byte length).
    pub(crate) fn seal(
        &mut self,
        kind: Kind,
        id: u64,
        parent: u64,
        target: u64,
        method: &str,
    ) -> Result<usize, Error> {
        if method.len() > MAX_METHOD_LEN {
            return Err(Error::Encode(format!(
                "the method name `{}…` has {} bytes, over the protocol's limit of \
                 {MAX_METHOD_LEN}; nothing was sent",
                &method[..crate::base::floor_char_boundary(method, 40)],
                method.len()
            )));
        }
        debug_assert!(!self.sealed, "a frame is sealed once");
        let mut h = Vec::with_capacity(GAP + method.len());
        put_head(&mut h, 4, 5);
        put_head(&mut h, 0, kind as u64);
        put_head(&mut h, 0, id);
        put_head(&mut h, 0, parent);
        put_head(&mut h, 0, target);
        put_head(&mut h, 3, method.len() as u64);
        h.extend_from_slice(method.as_bytes());
        let gap = self.start.min(self.buf.len());
        if gap == self.buf.len() && self.splices.is_empty() {
            return Err(Error::Encode(
                "a frame needs a payload (at least one CBOR item); nothing was sent".into(),
            ));
        }
        let first = gap - h.len() - 4;
        let spliced: usize = self.splices.iter().map(|s| s.data.as_slice().len()).sum();
        let body = self.buf.len() - first - 4 + spliced;
        let body_len = frame_length(body)?;
        self.buf[first..first + 4].copy_from_slice(&body_len.to_be_bytes());
        self.buf[first + 4..gap].copy_from_slice(&h);
        self.start = first;
        self.sealed = true;
        self.kind = Some(kind);
        self.id = id;
        Ok(body)
    }

    /// Whether it is this side's request `id` (a call: a reply carries the peer's id, from
    /// another numbering).
    pub(crate) fn is_call(&self, id: u64) -> bool {
        self.kind == Some(Kind::Call) && self.id == id
    }

    /// The sealed frame's length, length prefix included.
    pub(crate) fn len(&self) -> usize {
        let spliced: usize = self.splices.iter().map(|s| s.data.as_slice().len()).sum();
        self.buf.len() - self.start + spliced
    }

    /// The sealed frame's bytes, length prefix included, if they are all in one piece (no
    /// splices).
    pub(crate) fn contiguous(&self) -> Option<&[u8]> {
        debug_assert!(self.sealed, "only a sealed frame is sent");
        self.splices.is_empty().then(|| &self.buf[self.start..])
    }

    /// The sealed frame from byte `at` on, as at most `max` pieces in order (fewer if the frame
    /// has fewer), none empty.
    #[cfg(test)]
    pub(crate) fn pieces_from(&self, at: usize, max: usize) -> Vec<IoSlice<'_>> {
        let mut out = Vec::new();
        self.pieces_into(at, &mut out, max);
        out
    }

    /// Appends the sealed frame from byte `at` on to `out` as pieces in order, none empty,
    /// until `out` holds `max`.
    pub(crate) fn pieces_into<'a>(&'a self, at: usize, out: &mut Vec<IoSlice<'a>>, max: usize) {
        debug_assert!(self.sealed, "only a sealed frame is sent");
        let mut skip = at;
        let mut from = self.start;
        let mut offer = |piece: &'a [u8], out: &mut Vec<IoSlice<'a>>| {
            if out.len() >= max {
                return;
            }
            if skip >= piece.len() {
                skip -= piece.len();
                return;
            }
            out.push(IoSlice::new(&piece[skip..]));
            skip = 0;
        };
        for s in &self.splices {
            offer(&self.buf[from..s.at], out);
            offer(s.data.as_slice(), out);
            from = s.at;
        }
        offer(&self.buf[from..], out);
    }

    /// The sealed frame's bytes, length prefix included (a frame without splices).
    #[cfg(test)]
    pub(crate) fn bytes(&self) -> &[u8] {
        self.contiguous().expect("a frame without splices")
    }

    /// Drops the first `n` payload bytes (before sealing), without moving the rest.
    pub(crate) fn skip_payload_prefix(&mut self, n: usize) {
        debug_assert!(self.splices.iter().all(|s| s.at >= self.start + n));
        self.start += n;
    }
}

/// The length field for a body of `len` bytes; a body that does not fit in 32 bits is refused
/// (the field would wrap and the peer would read garbage).
pub(crate) fn frame_length(len: usize) -> Result<u32, Error> {
    u32::try_from(len).map_err(|_| Error::TooLarge {
        size: len,
        limit: u32::MAX as usize,
    })
}

impl Drop for OutFrame {
    fn drop(&mut self) {
        buffers::give(std::mem::take(&mut self.buf));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealed(kind: Kind, id: u64, parent: u64, target: u64, method: &str) -> Vec<u8> {
        let mut f = OutFrame::new(method.len());
        f.payload().push(0xf6); // CBOR null
        f.seal(kind, id, parent, target, method).unwrap();
        f.bytes().to_vec()
    }

    #[test]
    fn header_round_trips_for_all_integer_widths() {
        for &v in &[
            0u64,
            23,
            24,
            255,
            256,
            65535,
            65536,
            u32::MAX as u64,
            u64::MAX,
        ] {
            let bytes = sealed(Kind::Call, v, v, v, "add");
            let len = u32::from_be_bytes(bytes[0..4].try_into().unwrap()) as usize;
            assert_eq!(len, bytes.len() - 4);
            let frame = Frame::parse(bytes[4..].to_vec()).unwrap();
            assert_eq!(frame.header.id, v);
            assert_eq!(frame.header.parent, v);
            assert_eq!(frame.header.target, v);
            assert_eq!(frame.method(), "add");
            assert_eq!(frame.payload(), &[0xf6]);
        }
    }

    #[test]
    fn header_heads_cut_short_or_not_definite_are_named() {
        let message = |b: &[u8]| match parse_header(b) {
            Err(Error::Protocol(m)) => m,
            other => panic!("{b:02x?}: expected a protocol violation, got {other:?}"),
        };
        // A 5-array, then a kind announced as a 2-byte integer with one byte.
        assert_eq!(
            message(&[0x85, 0x19, 0x01]),
            "truncated or malformed frame header"
        );
        assert_eq!(message(&[]), "truncated or malformed frame header");
        // An indefinite-length array, and a reserved additional information value.
        for ib in [0x9f, 0x9c] {
            assert_eq!(
                message(&[ib]),
                format!("frame header uses an unsupported CBOR encoding (initial byte {ib:#04x})")
            );
        }
    }

    #[test]
    fn protocol_document_example_is_exact() {
        let mut call = OutFrame::new(3);
        call.payload().extend_from_slice(&[0x82, 0x01, 0x02]);
        assert_eq!(call.seal(Kind::Call, 1, 0, 0, "add").unwrap(), 12);
        assert_eq!(
            call.bytes(),
            &[0, 0, 0, 0x0c, 0x85, 0, 1, 0, 0, 0x63, b'a', b'd', b'd', 0x82, 1, 2]
        );
        let mut reply = OutFrame::new(0);
        reply.payload().push(0x03);
        assert_eq!(reply.seal(Kind::Reply, 1, 0, 0, "").unwrap(), 7);
        assert_eq!(reply.bytes(), &[0, 0, 0, 7, 0x85, 2, 1, 0, 0, 0x60, 3]);
    }

    #[test]
    fn hello_rejects_other_protocols_by_name() {
        let mut b = [0u8; HELLO_LEN];
        b[..8].copy_from_slice(b"SSH-2.0-");
        let err = Hello::decode(&b).unwrap_err().to_string();
        assert!(err.contains("SSH server"), "{err}");
        b[..3].copy_from_slice(&[0x16, 0x03, 0x01]);
        let err = Hello::decode(&b).unwrap_err().to_string();
        assert!(err.contains("TLS"), "{err}");
        let mut ok = Hello {
            version: VERSION,
            flags: 0,
            max_frame: 1 << 20,
            max_queued: 10,
        }
        .encode();
        assert!(Hello::decode(&ok).is_ok());
        ok[5] = 9;
        let err = Hello::decode(&ok).unwrap_err().to_string();
        assert!(err.contains("version 9"), "{err}");
    }

    #[test]
    fn a_python_rpyc_frame_is_named_from_its_first_six_bytes() {
        // A Python client's first frame: GETROOT, 14 bytes.
        let getroot = [
            0, 0, 0, 8, 0, 1, 0x11, 0x50, 0x11, 0x53, 0x11, 0x51, 0x02, 0x0a,
        ];
        let e = python_rpyc(&getroot[..6]).expect("recognized");
        assert!(
            matches!(&e, Error::Handshake(h) if h.kind() == HandshakeErrorKind::VersionMismatch)
        );
        assert!(e.to_string().contains("rpyc::python::serve"), "{e}");
        let mut b = [0u8; HELLO_LEN];
        b[..14].copy_from_slice(&getroot);
        assert!(Hello::decode(&b)
            .unwrap_err()
            .to_string()
            .contains("Python RPyC client"));
        // A compressed first frame; not a frame: another flag, a type beyond 3, a large length.
        assert!(python_rpyc(&[0, 0, 0x0b, 0xb8, 1, 0x78]).is_some());
        assert!(python_rpyc(&[0, 0, 0, 8, 2, 1]).is_none());
        assert!(python_rpyc(&[0, 0, 0, 8, 0, 4]).is_none());
        assert!(python_rpyc(&[0, 0x10, 0, 0, 0, 1]).is_none());
        assert!(python_rpyc(&getroot[..5]).is_none());
        let hello = Hello {
            version: VERSION,
            flags: 0,
            max_frame: 1 << 20,
            max_queued: 10,
        }
        .encode();
        assert!(python_rpyc(&hello).is_none());
    }

    use crate::base::test_rng::XorShift;

    #[test]
    fn header_parser_never_panics_on_random_or_mutated_input() {
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        let valid = sealed(Kind::Call, 1234, 7, 99, "some_method");
        let mut parsed = 0;
        for i in 0..200_000 {
            let input: Vec<u8> = if i % 2 == 0 {
                let n = (rng.next() % 64) as usize;
                (0..n).map(|_| rng.next() as u8).collect()
            } else {
                let mut m = valid[4..].to_vec();
                for _ in 0..1 + rng.next() % 4 {
                    let at = (rng.next() as usize) % m.len();
                    m[at] = rng.next() as u8;
                }
                m.truncate((rng.next() as usize) % (m.len() + 1));
                m
            };
            if let Ok(f) = Frame::parse(input.clone()) {
                parsed += 1;
                // Whatever parsed must describe bytes inside the input.
                assert!(f.header.method.end <= input.len());
                assert!(f.payload_at < input.len());
            }
        }
        assert!(
            parsed > 0,
            "mutations of a valid frame should sometimes still parse"
        );
    }

    #[test]
    fn sealing_refuses_what_the_peer_would_call_a_violation() {
        let long = "m".repeat(MAX_METHOD_LEN + 1);
        let mut f = OutFrame::new(long.len());
        f.payload().push(0xf6);
        let err = f.seal(Kind::Call, 1, 0, 0, &long).unwrap_err().to_string();
        assert!(err.contains("1025 bytes") && err.contains("1024"), "{err}");
        let ok = "m".repeat(MAX_METHOD_LEN);
        let mut f = OutFrame::new(ok.len());
        f.payload().push(0xf6);
        f.seal(Kind::Call, 1, 0, 0, &ok).unwrap();
        let bytes = f.bytes().to_vec();
        assert_eq!(Frame::parse(bytes[4..].to_vec()).unwrap().method(), ok);
        let mut empty = OutFrame::new(0);
        assert!(empty.seal(Kind::Reply, 1, 0, 0, "").is_err());
    }

    /// The frame of a call whose payload is `value`, encoded with splices, and the same frame
    /// encoded by copying everything.
    fn spliced_and_copied<T: serde::Serialize>(value: &T) -> (OutFrame, Vec<u8>) {
        let mut spliced = OutFrame::new(4);
        spliced
            .encode(|buf| codec::encode_into(buf, value))
            .unwrap();
        spliced.seal(Kind::Call, 9, 0, 0, "echo").unwrap();
        let mut copied = OutFrame::new(4);
        codec::encode_into(copied.payload(), value).unwrap();
        copied.seal(Kind::Call, 9, 0, 0, "echo").unwrap();
        (spliced, copied.bytes().to_vec())
    }

    fn joined(pieces: &[IoSlice<'_>]) -> Vec<u8> {
        pieces.iter().flat_map(|p| p.iter().copied()).collect()
    }

    #[test]
    fn a_large_bytes_is_sent_from_its_own_memory_not_copied_into_the_frame() {
        let big = codec::Bytes::from(vec![7u8; 1 << 20]);
        let medium = codec::Bytes::from(vec![8u8; codec::SPLICE_MIN]);
        let small = codec::Bytes::from(vec![9u8; codec::SPLICE_MIN - 1]);
        let value = (&big, "between", vec![&medium, &small], 5u8);
        let (frame, copied) = spliced_and_copied(&value);
        // The two large ones are pieces of their own, in their own memory; the small one and
        // everything else were copied into the frame's buffer.
        let pieces = frame.pieces_from(0, 64);
        let own: Vec<*const u8> = pieces.iter().map(|p| p.as_ptr()).collect();
        assert!(own.contains(&big.as_ptr()) && own.contains(&medium.as_ptr()));
        assert!(!own.contains(&small.as_ptr()));
        assert!(
            frame.buf.len() < codec::SPLICE_MIN + 256,
            "{}",
            frame.buf.len()
        );
        assert!(frame.contiguous().is_none());
        // On the wire it is exactly the copying encoding.
        assert_eq!(frame.len(), copied.len());
        assert!(joined(&pieces) == copied, "the spliced frame differs");
    }

    #[test]
    fn a_spliced_frame_resumes_at_any_byte_and_in_pieces_of_any_count() {
        let a = codec::Bytes::from((0..40_000u32).map(|i| i as u8).collect::<Vec<u8>>());
        let b = codec::Bytes::from(vec![1u8; 20_000]);
        // Two splices next to each other, one at the very end of the payload.
        let (frame, copied) = spliced_and_copied(&(&a, &b));
        let len = copied.len();
        let edges = [
            0,
            1,
            3,
            4,
            20,
            len / 2,
            40_010,
            len - 20_001,
            len - 20_000,
            len - 1,
        ];
        for at in edges.into_iter().chain((0..len).step_by(997)) {
            let all = frame.pieces_from(at, 64);
            assert!(joined(&all) == copied[at..], "from byte {at}");
            assert!(
                all.iter().all(|p| !p.is_empty()),
                "an empty piece from byte {at}"
            );
            let one = frame.pieces_from(at, 1);
            assert_eq!(one.len(), 1);
            assert!(
                copied[at..].starts_with(&one[0]),
                "first piece from byte {at}"
            );
        }
        assert!(frame.pieces_from(len, 64).is_empty());
    }

    #[test]
    fn only_the_frame_being_encoded_takes_a_bytes_memory() {
        let big = codec::Bytes::from(vec![5u8; 100_000]);
        let mut outer = OutFrame::new(0);
        let mut elsewhere = Vec::new();
        let mut inner = OutFrame::new(0);
        outer
            .encode(|buf| {
                // Another buffer encoded meanwhile copies ...
                codec::encode_into(&mut elsewhere, &big).unwrap();
                // ... and a frame encoded inside (a call a handler makes) takes its own.
                inner.encode(|b| codec::encode_into(b, &big)).unwrap();
                codec::encode_into(buf, &("outer", &big))
            })
            .unwrap();
        assert_eq!(elsewhere.len(), 100_000 + 5);
        assert_eq!((outer.splices.len(), inner.splices.len()), (1, 1));
        assert!(inner.buf.len() < 100, "{}", inner.buf.len());
        // Outside any frame's encoding, a `Bytes` is copied.
        let mut plain = Vec::new();
        codec::encode_into(&mut plain, &big).unwrap();
        assert_eq!(plain.len(), 100_005);
    }

    #[test]
    fn a_frame_keeps_a_bytes_memory_alive_and_unchanged_after_the_bytes_is_gone() {
        let mut big = codec::Bytes::from(vec![4u8; 1 << 16]);
        let (frame, copied) = spliced_and_copied(&big);
        // Writing through the `Bytes` makes it a copy of its own: the frame still sends what
        // was encoded.
        big[0] = 0;
        drop(big);
        assert!(joined(&frame.pieces_from(0, 64)) == copied);
    }
}
