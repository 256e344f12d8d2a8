//! The wire format, defined once: the handshake hello, the frame, and the frame header.
//!
//! `PROTOCOL.md` at the repository root is the normative description; this module is its code.
//! A frame is a 4-byte big-endian body length followed by the body; the body is a CBOR sequence
//! of two items: a header array `[kind, id, parent, target, method]` encoded here by hand, and
//! one payload item encoded by [`crate::codec`]. The length is checked against the limit before
//! any memory is reserved for the body.
//!
//! A large frame (at least [`DETACH_MIN`] bytes) whose payload is a single byte string, or a
//! one-element array holding one, with the string's data running to the end of the frame, is
//! read in two parts: the body keeps everything before the string's head and ends in a
//! placeholder empty byte string, and the head and data go into a [`Detached`] of the frame,
//! the data straight into a buffer of its own. Decoding then moves that buffer into the
//! received `Bytes` instead of copying it out of the body; see [`crate::codec`] (module docs)
//! for how decoding stays exactly what the bytes as sent would give.

use crate::buffers;
use crate::codec::{Detached, PLACEHOLDER};
use crate::error::Error;
use crate::limits::{Activity, Budget, Charge, FRAME_OVERHEAD};
use crate::transport::{Control, Sink};
use std::io::{self, Read};
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

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
pub(crate) const MAX_METHOD_LEN: usize = 1024;

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
        if b[0..4] != MAGIC {
            return Err(Error::Handshake(format!(
                "the peer is not an rpyc peer ({}); first bytes: {:02x?}",
                guess_protocol(b),
                &b[..8]
            )));
        }
        let hello = Hello {
            version: u16::from_be_bytes([b[4], b[5]]),
            flags: u16::from_be_bytes([b[6], b[7]]),
            max_frame: u32::from_be_bytes([b[8], b[9], b[10], b[11]]),
            max_queued: u32::from_be_bytes([b[12], b[13], b[14], b[15]]),
        };
        if hello.version != VERSION {
            return Err(Error::Handshake(format!(
                "the peer speaks rpyc protocol version {}, this side speaks version {VERSION}; \
                 upgrade the older side",
                hello.version
            )));
        }
        if hello.max_frame < 64 {
            return Err(Error::Handshake(format!(
                "the peer announced an unusable frame limit of {} bytes",
                hello.max_frame
            )));
        }
        Ok(hello)
    }
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

/// Sends our hello and reads the peer's, both before `deadline`. Both sides send first, so
/// neither waits on the other. `set_read_timeout` bounds each read by the time left (an error
/// from it means the transport cannot time out a read: then whoever called this bounds the
/// whole exchange some other way, e.g. by shutting the transport down), so a peer that
/// dribbles its hello a byte at a time is dropped at the deadline like a silent one.
pub(crate) fn exchange_hello(
    r: &mut dyn Read,
    w: &mut dyn Sink,
    ours: Hello,
    deadline: Instant,
    set_read_timeout: &dyn Fn(Option<Duration>) -> io::Result<()>,
) -> Result<Hello, Error> {
    // Mapped to a handshake timeout by the caller, which knows the duration.
    let timed_out = || Error::Timeout(crate::error::Timeout::Handshake(Default::default()));
    let io_err = |e: io::Error, when: &str| -> Error {
        if matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ) {
            timed_out()
        } else if e.kind() == io::ErrorKind::UnexpectedEof {
            Error::Handshake(format!(
                "the peer closed the connection {when} (is it an rpyc peer? a server at its \
                 connection limit or one that rejected us closes this way)"
            ))
        } else {
            Error::Handshake(format!("I/O error {when}: {e}"))
        }
    };
    let hello = ours.encode();
    let mut sent = 0;
    while sent < HELLO_LEN {
        match w.send(&hello[sent..], Some(deadline)) {
            Ok(0) => return Err(timed_out()),
            Ok(n) => sent += n,
            Err(e) => return Err(io_err(e, "while we sent our hello")),
        }
    }
    let mut b = [0u8; HELLO_LEN];
    let mut got = 0;
    while got < HELLO_LEN {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(timed_out());
        }
        let _ = set_read_timeout(Some(left));
        match r.read(&mut b[got..]) {
            Ok(0) => {
                return Err(io_err(
                    io::ErrorKind::UnexpectedEof.into(),
                    "before sending its hello",
                ))
            }
            Ok(n) => got += n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(io_err(e, "before sending its hello")),
        }
    }
    Hello::decode(&b)
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
    /// the payload then ends in a placeholder. Hand it to [`crate::codec::offer`] to decode.
    pub detached: Option<Detached>,
    /// What holding this frame costs its connection's memory budget, returned when it drops.
    pub charge: Option<Charge>,
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
    let bad = || Error::Protocol("truncated or malformed frame header".into());
    let ib = *b.get(*pos).ok_or_else(bad)?;
    *pos += 1;
    let (major, ai) = (ib >> 5, ib & 0x1f);
    let n = match ai {
        0..=23 => return Ok((major, ai as u64)),
        24 => 1,
        25 => 2,
        26 => 4,
        27 => 8,
        _ => {
            return Err(Error::Protocol(format!(
                "frame header uses an unsupported CBOR encoding (initial byte {ib:#04x})"
            )))
        }
    };
    let bytes = b.get(*pos..*pos + n).ok_or_else(bad)?;
    *pos += n;
    Ok((major, bytes.iter().fold(0u64, |v, &x| (v << 8) | x as u64)))
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
pub(crate) fn parse_header(b: &[u8]) -> Result<(Header, usize), Error> {
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
const PEEK: usize = 4096;

/// Where a payload's byte string starts (its head) and where its data starts, if the payload at
/// `payload_at` has a layout to detach (see the module docs) within `pre`, the first bytes of a
/// body of `len` bytes. Only requests and replies qualify.
fn detachable(pre: &[u8], len: usize) -> Option<(usize, usize)> {
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
///
/// Sealing is where everything the receiver would call a protocol violation is refused
/// locally, before a byte is written: a method name over [`MAX_METHOD_LEN`] bytes, an empty
/// payload, a body whose length does not fit the 4-byte length field. (The peer's own frame
/// limit is checked by the connection, which knows it.)
pub(crate) struct OutFrame {
    buf: Vec<u8>,
    start: usize,
    sealed: bool,
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
            sealed: false,
        }
    }

    /// The buffer to append the payload to.
    pub(crate) fn payload(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }

    /// Writes header and length in front of the payload; returns the frame's bytes.
    pub(crate) fn seal(
        &mut self,
        kind: Kind,
        id: u64,
        parent: u64,
        target: u64,
        method: &str,
    ) -> Result<&[u8], Error> {
        if method.len() > MAX_METHOD_LEN {
            return Err(Error::Encode(format!(
                "the method name `{}…` has {} bytes, over the protocol's limit of \
                 {MAX_METHOD_LEN}; nothing was sent",
                &method[..method.floor_char_boundary_compat(40)],
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
        if gap == self.buf.len() {
            return Err(Error::Encode(
                "a frame needs a payload (at least one CBOR item); nothing was sent".into(),
            ));
        }
        let first = gap - h.len() - 4;
        let body_len = frame_length(self.buf.len() - first - 4)?;
        self.buf[first..first + 4].copy_from_slice(&body_len.to_be_bytes());
        self.buf[first + 4..gap].copy_from_slice(&h);
        self.start = first;
        self.sealed = true;
        Ok(&self.buf[first..])
    }

    /// The sealed frame's bytes, length prefix included.
    pub(crate) fn bytes(&self) -> &[u8] {
        debug_assert!(self.sealed, "only a sealed frame is sent");
        &self.buf[self.start..]
    }

    /// Drops the first `n` payload bytes (before sealing), without moving the rest.
    pub(crate) fn skip_payload_prefix(&mut self, n: usize) {
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

/// `str::floor_char_boundary` for the stable toolchain: the largest char boundary `<= i`.
trait FloorCharBoundary {
    fn floor_char_boundary_compat(&self, i: usize) -> usize;
}

impl FloorCharBoundary for str {
    fn floor_char_boundary_compat(&self, i: usize) -> usize {
        let mut i = i.min(self.len());
        while !self.is_char_boundary(i) {
            i -= 1;
        }
        i
    }
}

impl Drop for OutFrame {
    fn drop(&mut self) {
        buffers::give(std::mem::take(&mut self.buf));
    }
}

/// What [`FrameReader::read_frame`] got.
pub(crate) enum Got {
    /// A whole frame.
    Frame(Frame),
    /// The peer ended the stream cleanly, between frames.
    End,
    /// Nothing whole yet: the caller's deadline passed, or (for a reader without a deadline) the
    /// connection has been quiet for one tick. A frame read in part is kept, and the next call
    /// (by any thread) goes on with it.
    NotYet,
}

/// How far the frame being read has got. Kept in the reader between calls, so a thread whose
/// deadline passes in the middle of a frame can hand the reader on without losing a byte.
enum Partial {
    /// Between frames.
    Idle,
    /// Reading the 4-byte length.
    Len { buf: [u8; 4], got: usize },
    /// Reading the first [`PEEK`] bytes of a large body, to decide whether to detach its byte
    /// string.
    Peek {
        len: usize,
        charge: Option<Charge>,
        pre: Vec<u8>,
        got: usize,
    },
    /// Reading a body.
    Body {
        len: usize,
        charge: Option<Charge>,
        body: Vec<u8>,
        got: usize,
    },
    /// Reading the data of a detached byte string, which starts at `data_at` of the body; `body`
    /// holds the body up to the string's head and a placeholder, `head` the string's head.
    Tail {
        len: usize,
        charge: Option<Charge>,
        body: Vec<u8>,
        head: Vec<u8>,
        data_at: usize,
        tail: Vec<u8>,
        got: usize,
    },
}

/// Reads frames from the read half of a transport. Owned by exactly one thread at a time.
///
/// Every wait is bounded where the transport allows it (sockets; not pipes or streams): a caller
/// passes its deadline, and the pool's leader, which has none, wakes every tick to check the
/// connection's idle limit. A peer that sends part of a frame and then nothing for the stall
/// timeout is dropped.
pub(crate) struct FrameReader {
    inner: io::BufReader<Box<dyn Read + Send>>,
    max_frame: usize,
    control: Arc<dyn Control>,
    /// Whether the transport supports read timeouts (sockets do, pipes do not).
    can_slice: bool,
    /// The read timeout now set: [`READ_SLICE`] for a caller, `tick` for the leader.
    sliced: Option<bool>,
    tick: Duration,
    stall: Duration,
    budget: Option<Arc<Budget>>,
    activity: Option<Arc<Activity>>,
    partial: Partial,
    /// When the frame being read last made progress.
    progress_at: Instant,
}

/// How long one read by a calling thread may block before it checks its deadline.
pub(crate) const READ_SLICE: Duration = Duration::from_millis(20);

/// Settings of a [`FrameReader`].
pub(crate) struct ReadLimits {
    /// Largest frame body accepted.
    pub max_frame: usize,
    /// A peer that sends part of a frame and then nothing for this long is dropped.
    pub stall: Duration,
    /// How often a reader without a deadline wakes while the connection is quiet.
    pub tick: Duration,
    /// Where frames are charged (none in unit tests).
    pub budget: Option<Arc<Budget>>,
    /// Told whenever bytes arrive (none in unit tests).
    pub activity: Option<Arc<Activity>>,
}

impl FrameReader {
    /// Wraps the read half; `control` sets its timeouts. The transport must be in blocking mode.
    pub(crate) fn new(
        inner: Box<dyn Read + Send>,
        limits: ReadLimits,
        control: Arc<dyn Control>,
    ) -> Self {
        let can_slice = control.set_read_timeout(None).is_ok();
        let mut r = FrameReader {
            inner: io::BufReader::with_capacity(64 * 1024, inner),
            max_frame: limits.max_frame,
            control,
            can_slice,
            sliced: None,
            tick: limits.tick,
            stall: limits.stall,
            budget: limits.budget,
            activity: limits.activity,
            partial: Partial::Idle,
            progress_at: Instant::now(),
        };
        r.set_sliced(false);
        r
    }

    /// Whether a thread with a deadline may hold this reader (its reads can time out).
    pub(crate) fn can_slice(&self) -> bool {
        self.can_slice
    }

    /// Sets the socket's read timeout to [`READ_SLICE`] (for a calling thread, which has a
    /// deadline) or the tick (for the pool's leader). A system call only when the mode changes.
    pub(crate) fn set_sliced(&mut self, on: bool) {
        if self.can_slice && self.sliced != Some(on) {
            let d = if on { READ_SLICE } else { self.tick };
            if self.control.set_read_timeout(Some(d)).is_ok() {
                self.sliced = Some(on);
            }
        }
    }

    /// Reads the next frame, or goes on with the one read in part, until it is whole, the
    /// stream ends, or `deadline` passes (`None`: until the connection has been quiet for a
    /// tick; see [`Got::NotYet`]).
    pub(crate) fn read_frame(&mut self, deadline: Option<Instant>) -> Result<Got, Error> {
        loop {
            match std::mem::replace(&mut self.partial, Partial::Idle) {
                Partial::Idle => {
                    self.partial = Partial::Len {
                        buf: [0; 4],
                        got: 0,
                    }
                }
                Partial::Len { mut buf, mut got } => {
                    match self.fill_len(&mut buf, &mut got, deadline) {
                        Ok(true) => {}
                        Ok(false) => {
                            self.partial = Partial::Len { buf, got };
                            return Ok(Got::NotYet);
                        }
                        Err(None) => return Ok(Got::End),
                        Err(Some(e)) => return Err(e),
                    }
                    self.partial = self.start_body(u32::from_be_bytes(buf) as usize)?;
                }
                Partial::Peek {
                    len,
                    charge,
                    mut pre,
                    mut got,
                } => {
                    if !self.fill(&mut pre, &mut got, PEEK, 0, len, deadline)? {
                        self.partial = Partial::Peek {
                            len,
                            charge,
                            pre,
                            got,
                        };
                        return Ok(Got::NotYet);
                    }
                    self.partial = after_peek(len, charge, pre);
                }
                Partial::Body {
                    len,
                    charge,
                    mut body,
                    mut got,
                } => {
                    if !self.fill(&mut body, &mut got, len, 0, len, deadline)? {
                        self.partial = Partial::Body {
                            len,
                            charge,
                            body,
                            got,
                        };
                        return Ok(Got::NotYet);
                    }
                    let mut frame = Frame::parse(body)?;
                    frame.charge = charge;
                    return Ok(Got::Frame(frame));
                }
                Partial::Tail {
                    len,
                    charge,
                    body,
                    head,
                    data_at,
                    mut tail,
                    mut got,
                } => {
                    let n = len - data_at;
                    if !self.fill(&mut tail, &mut got, n, data_at, len, deadline)? {
                        self.partial = Partial::Tail {
                            len,
                            charge,
                            body,
                            head,
                            data_at,
                            tail,
                            got,
                        };
                        return Ok(Got::NotYet);
                    }
                    let mut frame = Frame::parse(body)?;
                    frame.detached = Some(Detached { head, tail });
                    frame.charge = charge;
                    return Ok(Got::Frame(frame));
                }
            }
        }
    }

    /// Checks a frame's length against the limit and the budget, then allocates what reading
    /// its body needs first.
    fn start_body(&mut self, len: usize) -> Result<Partial, Error> {
        if len > self.max_frame {
            return Err(Error::Protocol(format!(
                "the peer sent a frame of {len} bytes, over this side's limit of {} bytes",
                self.max_frame
            )));
        }
        let charge = match &self.budget {
            Some(b) => Some(
                b.charge(len.saturating_add(FRAME_OVERHEAD))
                    .map_err(|over| Error::Closed {
                        reason: over.to_string(),
                    })?,
            ),
            None => None,
        };
        if len >= DETACH_MIN {
            return Ok(Partial::Peek {
                len,
                charge,
                pre: vec![0; PEEK],
                got: 0,
            });
        }
        // A large body goes into a cached buffer when there is one. Otherwise reserve at most
        // 1 MiB up front: a peer that announces a large frame and sends nothing must not make
        // us allocate it. Larger bodies grow as their bytes arrive.
        Ok(Partial::Body {
            len,
            charge,
            body: buffers::take_sized(len).unwrap_or_else(|| vec![0; len.min(1 << 20)]),
            got: 0,
        })
    }

    /// Reads the length prefix. `Ok(true)`: complete; `Ok(false)`: not yet (see
    /// [`Got::NotYet`]); `Err(None)`: a clean end between frames.
    fn fill_len(
        &mut self,
        buf: &mut [u8; 4],
        got: &mut usize,
        deadline: Option<Instant>,
    ) -> Result<bool, Option<Error>> {
        while *got < 4 {
            match self.inner.read(&mut buf[*got..]) {
                Ok(0) if *got == 0 => return Err(None),
                Ok(0) => {
                    return Err(Some(Error::Protocol(
                        "the peer closed the connection in the middle of a frame length".into(),
                    )))
                }
                Ok(n) => {
                    if *got == 0 {
                        self.progress_at = Instant::now();
                    }
                    *got += n;
                    self.moved();
                }
                Err(e) => {
                    if !self.waited(e, *got > 0, *got, 4, deadline).map_err(Some)? {
                        return Ok(false);
                    }
                }
            }
        }
        Ok(true)
    }

    /// Reads bytes `got..len` of a frame body (or of a detached string) into `body`, which
    /// holds at least `got` bytes and grows (doubling, up to `len`) as they arrive. `body`
    /// starts at byte `at` of a frame body of `frame_len` bytes (for the error message).
    /// `Ok(false)`: the deadline passed first.
    fn fill(
        &mut self,
        body: &mut Vec<u8>,
        got: &mut usize,
        len: usize,
        at: usize,
        frame_len: usize,
        deadline: Option<Instant>,
    ) -> Result<bool, Error> {
        // Reads smaller than the reader's buffer go through it: the kernel copies into that
        // small, cache-hot buffer and we copy on. Reading straight into a large buffer was up to
        // 2.5 times slower on loopback, depending on the buffer's offset in its page.
        let chunk = self.inner.capacity() / 2;
        while *got < len {
            if *got == body.len() {
                let to = *got + (*got).min(len - *got);
                body.reserve_exact(to - body.len());
                body.resize(to, 0);
            }
            let end = body.len().min(*got + chunk);
            match self.inner.read(&mut body[*got..end]) {
                Ok(0) => {
                    return Err(Error::Protocol(format!(
                        "truncated frame: the peer closed the connection after {} of \
                         {frame_len} bytes",
                        at + *got
                    )))
                }
                Ok(n) => {
                    *got += n;
                    self.progress_at = Instant::now();
                    self.moved();
                }
                Err(e) => {
                    if !self.waited(e, true, at + *got, frame_len, deadline)? {
                        return Ok(false);
                    }
                }
            }
        }
        Ok(true)
    }

    fn moved(&self) {
        if let Some(a) = &self.activity {
            a.touch();
        }
    }

    /// Decides what a failed read means: `Ok(true)` retry, `Ok(false)` give the thread back
    /// (its deadline passed, or the connection is quiet between frames), or the error that ends
    /// the connection (including a peer that stopped in the middle of a frame).
    fn waited(
        &mut self,
        e: io::Error,
        in_frame: bool,
        got: usize,
        of: usize,
        deadline: Option<Instant>,
    ) -> Result<bool, Error> {
        match e.kind() {
            io::ErrorKind::Interrupted => Ok(true),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                let now = Instant::now();
                if in_frame && now.duration_since(self.progress_at) >= self.stall {
                    return Err(Error::Closed {
                        reason: format!(
                            "the peer sent {got} of {of} bytes of a frame, then nothing for {:?}",
                            self.stall
                        ),
                    });
                }
                match deadline {
                    Some(d) => Ok(now < d),
                    None => Ok(in_frame),
                }
            }
            _ => Err(closed_by_io(e)),
        }
    }
}

/// Decides, from the first [`PEEK`] bytes of a large body, how to read the rest.
fn after_peek(len: usize, charge: Option<Charge>, pre: Vec<u8>) -> Partial {
    if let Some((at, data_at)) = detachable(&pre, len) {
        let n = len - data_at;
        // As for a body: a cached buffer, or at most 1 MiB up front, grown as bytes come.
        let mut tail = buffers::take_sized(n).unwrap_or_else(|| vec![0; n.min(1 << 20)]);
        let early = PEEK - data_at;
        tail[..early].copy_from_slice(&pre[data_at..]);
        let mut body = Vec::with_capacity(at + 1);
        body.extend_from_slice(&pre[..at]);
        body.push(PLACEHOLDER);
        return Partial::Tail {
            len,
            charge,
            body,
            head: pre[at..data_at].to_vec(),
            data_at,
            tail,
            got: early,
        };
    }
    let mut body = buffers::take_sized(len).unwrap_or_else(|| vec![0; len.min(1 << 20)]);
    body[..PEEK].copy_from_slice(&pre);
    Partial::Body {
        len,
        charge,
        body,
        got: PEEK,
    }
}

/// A read error means the transport is gone: the connection closes with this reason.
pub(crate) fn closed_by_io(e: io::Error) -> Error {
    Error::Closed {
        reason: format!("I/O error: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealed(kind: Kind, id: u64, parent: u64, target: u64, method: &str) -> Vec<u8> {
        let mut f = OutFrame::new(method.len());
        f.payload().push(0xf6); // CBOR null
        f.seal(kind, id, parent, target, method).unwrap().to_vec()
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
    fn protocol_document_example_is_exact() {
        let mut call = OutFrame::new(3);
        call.payload().extend_from_slice(&[0x82, 0x01, 0x02]);
        assert_eq!(
            call.seal(Kind::Call, 1, 0, 0, "add").unwrap(),
            &[0, 0, 0, 0x0c, 0x85, 0, 1, 0, 0, 0x63, b'a', b'd', b'd', 0x82, 1, 2]
        );
        let mut reply = OutFrame::new(0);
        reply.payload().push(0x03);
        assert_eq!(
            reply.seal(Kind::Reply, 1, 0, 0, "").unwrap(),
            &[0, 0, 0, 7, 0x85, 2, 1, 0, 0, 0x60, 3]
        );
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

    use crate::test_rng::XorShift;

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
    fn oversized_length_is_refused_before_reading_the_body() {
        let mut bytes = (u32::MAX).to_be_bytes().to_vec();
        bytes.extend_from_slice(&[0; 16]);
        let reader: Box<dyn Read + Send> = Box::new(io::Cursor::new(bytes));
        struct NoControl;
        impl Control for NoControl {
            fn shutdown(&self) {}
        }
        let mut fr = FrameReader::new(reader, limits(1 << 20), Arc::new(NoControl));
        let err = fr.read_frame(None).err().unwrap().to_string();
        assert!(err.contains("over this side's limit"), "{err}");
    }

    struct NoCtl;
    impl Control for NoCtl {
        fn shutdown(&self) {}
    }

    /// A sealed frame (length included) with `payload` as its payload bytes.
    fn frame_bytes(kind: Kind, payload: &[u8]) -> Vec<u8> {
        let mut f = OutFrame::new(4);
        f.payload().extend_from_slice(payload);
        f.seal(kind, 7, 0, 0, "echo").unwrap().to_vec()
    }

    fn limits(max_frame: usize) -> ReadLimits {
        ReadLimits {
            max_frame,
            stall: Duration::from_secs(30),
            tick: Duration::from_secs(1),
            budget: None,
            activity: None,
        }
    }

    fn read_one(bytes: Vec<u8>) -> Result<Option<Frame>, Error> {
        let reader: Box<dyn Read + Send> = Box::new(io::Cursor::new(bytes));
        match FrameReader::new(reader, limits(64 << 20), Arc::new(NoCtl)).read_frame(None)? {
            Got::Frame(f) => Ok(Some(f)),
            Got::End => Ok(None),
            Got::NotYet => panic!("a cursor never times out"),
        }
    }

    fn cbor<T: serde::Serialize>(v: &T) -> Vec<u8> {
        let mut out = Vec::new();
        crate::codec::encode_into(&mut out, v).unwrap();
        out
    }

    fn data(n: usize, seed: u8) -> crate::Bytes {
        crate::Bytes::from(
            (0..n)
                .map(|i| (i as u8).wrapping_mul(31) ^ seed)
                .collect::<Vec<_>>(),
        )
    }

    /// A byte buffer that copies in `visit_bytes`, as `serde_bytes`-style types do.
    #[derive(Debug, PartialEq)]
    struct Copied(Vec<u8>);
    impl<'de> serde::Deserialize<'de> for Copied {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Copied, D::Error> {
            struct V;
            impl serde::de::Visitor<'_> for V {
                type Value = Copied;
                fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    f.write_str("bytes")
                }
                fn visit_bytes<E>(self, v: &[u8]) -> Result<Copied, E> {
                    Ok(Copied(v.to_vec()))
                }
            }
            d.deserialize_bytes(V)
        }
    }

    /// Decodes `frame`'s payload as `T` with its detached part offered, as the connection does.
    fn decode_offered<T: serde::de::DeserializeOwned>(frame: &mut Frame) -> Result<T, String> {
        let d = frame.detached.take();
        let _offered = crate::codec::offer(frame.payload(), d);
        crate::codec::decode(frame.payload())
    }

    #[test]
    fn large_byte_string_payloads_are_detached_and_decode_into_bytes_without_a_copy() {
        for (kind, size) in [(Kind::Reply, 1 << 20), (Kind::Call, 300 * 1024)] {
            let sent = data(size, 1);
            let payload = if kind == Kind::Reply {
                cbor(&sent)
            } else {
                cbor(&(&sent,))
            };
            let bytes = frame_bytes(kind, &payload);
            let mut frame = read_one(bytes).unwrap().unwrap();
            let d = frame.detached.as_ref().expect("detached");
            assert_eq!(d.tail.len(), size);
            assert_eq!(
                &d.head[..],
                &payload[payload.len() - size - d.head.len()..][..d.head.len()]
            );
            assert_eq!(*frame.payload().last().unwrap(), PLACEHOLDER);
            assert!(
                frame.body.len() < 64,
                "the body holds only header and placeholder"
            );
            let tail_at = d.tail.as_ptr();
            let got = if kind == Kind::Reply {
                decode_offered::<crate::Bytes>(&mut frame).unwrap()
            } else {
                decode_offered::<(crate::Bytes,)>(&mut frame).unwrap().0
            };
            assert!(got == sent, "content differs");
            assert_eq!(got.as_ptr(), tail_at, "the data was moved, not copied");
        }
    }

    #[test]
    fn detached_payloads_decode_into_other_types_exactly_as_contiguous_ones() {
        let sent = data(1 << 20, 2);
        for kind in [Kind::Reply, Kind::Call] {
            let payload = if kind == Kind::Reply {
                cbor(&sent)
            } else {
                cbor(&(&sent,))
            };
            let read = || read_one(frame_bytes(kind, &payload)).unwrap().unwrap();
            fn same<T: serde::de::DeserializeOwned + PartialEq + std::fmt::Debug>(
                mut frame: Frame,
                payload: &[u8],
            ) {
                assert!(frame.detached.is_some());
                let want = crate::codec::decode::<T>(payload);
                let got = decode_offered::<T>(&mut frame);
                // Not assert_eq!: a failure would print megabytes.
                assert!(got == want, "{} differs", std::any::type_name::<T>());
            }
            same::<Copied>(read(), &payload);
            same::<(Copied,)>(read(), &payload);
            same::<serde_cbor::Value>(read(), &payload);
            same::<String>(read(), &payload);
            same::<u64>(read(), &payload);
            same::<(crate::Bytes, u8)>(read(), &payload);
            same::<(u8, crate::Bytes)>(read(), &payload);
            same::<Vec<crate::Bytes>>(read(), &payload);
            same::<Option<crate::Bytes>>(read(), &payload);
            same::<(crate::Bytes,)>(read(), &payload);
            same::<crate::Bytes>(read(), &payload);
            // Described (for error messages) as the bytes sent.
            let mut frame = read();
            let d = frame.detached.take();
            let _offered = crate::codec::offer(frame.payload(), d);
            for limit in [8, crate::codec::QUOTE_MAX, 1 << 20] {
                let (detached, peak) = crate::test_alloc::peak_during(|| {
                    crate::codec::describe(frame.payload(), limit)
                });
                assert_eq!(detached, crate::codec::describe(&payload, limit));
                assert!(
                    peak < 1024,
                    "the payload was rebuilt to describe it: {peak} bytes"
                );
            }
        }
    }

    #[test]
    fn a_panicking_deserialize_leaves_no_detached_data_behind() {
        struct Boom;
        impl<'de> serde::Deserialize<'de> for Boom {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Boom, D::Error> {
                let _b = crate::Bytes::deserialize(d)?;
                panic!("boom");
            }
        }
        let payload = cbor(&data(1 << 20, 3));
        let mut frame = read_one(frame_bytes(Kind::Reply, &payload))
            .unwrap()
            .unwrap();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            decode_offered::<Boom>(&mut frame)
        }));
        assert!(r.is_err());
        // An empty byte string decoded afterwards on this thread is empty.
        let empty: crate::Bytes = crate::codec::decode(&[0x40]).unwrap();
        assert!(empty.is_empty());
    }

    #[test]
    fn frames_of_other_layouts_are_read_whole_as_before() {
        let big = data(1 << 20, 4);
        let cases: Vec<(Kind, Vec<u8>)> = vec![
            // Small frames.
            (Kind::Reply, cbor(&data(1000, 5))),
            (Kind::Reply, cbor(&data(DETACH_MIN - 100, 5))),
            // Two byte strings.
            (Kind::Call, cbor(&(&big, &big))),
            (Kind::Call, cbor(&(data(10, 6), &big))),
            // Trailing items after the byte string.
            (Kind::Call, cbor(&(&big, 5u8))),
            // Not a byte string, or not alone in its array.
            (Kind::Reply, cbor(&(big.len(), "x".repeat(1 << 19)))),
            (Kind::Reply, cbor(&vec![(&big,)])),
            // Other kinds.
            (Kind::Error, cbor(&big)),
            (Kind::Release, cbor(&big)),
        ];
        for (i, (kind, payload)) in cases.into_iter().enumerate() {
            let bytes = frame_bytes(kind, &payload);
            let frame = read_one(bytes.clone()).unwrap().unwrap();
            assert!(frame.detached.is_none(), "case {i} was detached");
            assert!(frame.body == bytes[4..], "case {i} read differently");
        }
        // A trailing byte after a byte string that would otherwise qualify.
        let mut payload = cbor(&big);
        payload.push(0);
        let bytes = frame_bytes(Kind::Reply, &payload);
        let frame = read_one(bytes.clone()).unwrap().unwrap();
        assert!(frame.detached.is_none());
        assert!(frame.body == bytes[4..]);
    }

    #[test]
    fn truncated_large_frames_report_frame_offsets_as_before() {
        let payload = cbor(&data(1 << 20, 7));
        let bytes = frame_bytes(Kind::Reply, &payload);
        let len = bytes.len() - 4;
        for cut in [100, 5000, 600_000] {
            let err = read_one(bytes[..4 + cut].to_vec())
                .err()
                .unwrap()
                .to_string();
            assert!(
                err.contains(&format!("after {cut} of {len} bytes")),
                "{err}"
            );
        }
    }

    /// A read half that hands out scripted pieces: `None` is a read that times out.
    struct Script(std::collections::VecDeque<Option<Vec<u8>>>);

    impl Read for Script {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            match self.0.pop_front() {
                None => Ok(0),
                Some(None) => Err(io::ErrorKind::WouldBlock.into()),
                Some(Some(mut piece)) => {
                    let n = piece.len().min(buf.len());
                    buf[..n].copy_from_slice(&piece[..n]);
                    if n < piece.len() {
                        self.0.push_front(Some(piece.split_off(n)));
                    }
                    Ok(n)
                }
            }
        }
    }

    /// A reader over `pieces` (with `None` a read that times out).
    fn scripted(pieces: Vec<Option<Vec<u8>>>, limits: ReadLimits) -> FrameReader {
        FrameReader::new(Box::new(Script(pieces.into())), limits, Arc::new(NoCtl))
    }

    fn past() -> Option<Instant> {
        Some(Instant::now() - Duration::from_millis(1))
    }

    #[test]
    fn a_frame_cut_short_by_a_deadline_is_finished_by_the_next_read_without_losing_a_byte() {
        let big = data(1 << 20, 9);
        let cases = [
            frame_bytes(Kind::Reply, &cbor(&big)),         // detached
            frame_bytes(Kind::Error, &cbor(&big)),         // one body
            frame_bytes(Kind::Reply, &cbor(&"small one")), // small
        ];
        for whole in cases {
            // Cut at every stage: in the length, in the peek, in the body or tail.
            for cut in [2, 100, 5000, whole.len() - 1] {
                let cut = cut.min(whole.len() - 1);
                let pieces = vec![
                    Some(whole[..cut].to_vec()),
                    None,
                    Some(whole[cut..].to_vec()),
                ];
                let mut r = scripted(pieces, limits(64 << 20));
                assert!(matches!(r.read_frame(past()), Ok(Got::NotYet)), "cut {cut}");
                let mut frame = match r.read_frame(None) {
                    Ok(Got::Frame(f)) => f,
                    _ => panic!("cut {cut}: the rest did not complete the frame"),
                };
                // The body as sent: a detached body ends in a placeholder for head and data.
                let rebuilt = match frame.detached.take() {
                    Some(d) => {
                        let mut v = frame.body[..frame.body.len() - 1].to_vec();
                        v.extend_from_slice(&d.head);
                        v.extend_from_slice(&d.tail);
                        v
                    }
                    None => frame.body.clone(),
                };
                assert!(rebuilt == whole[4..], "cut {cut}: the frame differs");
                assert!(matches!(r.read_frame(None), Ok(Got::End)));
            }
        }
    }

    #[test]
    fn a_quiet_reader_without_deadline_returns_between_frames_only() {
        let whole = frame_bytes(Kind::Reply, &cbor(&"x"));
        // Between frames: each timeout gives the thread back.
        let mut r = scripted(vec![None, Some(whole.clone())], limits(1 << 20));
        assert!(matches!(r.read_frame(None), Ok(Got::NotYet)));
        assert!(matches!(r.read_frame(None), Ok(Got::Frame(_))));
        // Inside a frame: a timeout is waited out (the stall limit is far).
        let pieces = vec![
            Some(whole[..6].to_vec()),
            None,
            None,
            Some(whole[6..].to_vec()),
        ];
        let mut r = scripted(pieces, limits(1 << 20));
        assert!(matches!(r.read_frame(None), Ok(Got::Frame(_))));
    }

    #[test]
    fn a_peer_that_stops_in_the_middle_of_a_frame_is_dropped_after_the_stall_timeout() {
        let whole = frame_bytes(Kind::Reply, &cbor(&"abc"));
        let mut l = limits(1 << 20);
        l.stall = Duration::ZERO;
        let mut r = scripted(vec![Some(whole[..7].to_vec()), None], l);
        let err = r.read_frame(None).err().expect("stalled").to_string();
        assert!(err.contains("then nothing for"), "{err}");
    }

    #[test]
    fn frames_are_charged_to_the_budget_until_dropped_and_a_frame_over_it_is_refused() {
        let budget = crate::limits::Budget::new(10_000, None);
        let small = frame_bytes(Kind::Reply, &cbor(&"x".repeat(3000)));
        let mut l = limits(1 << 20);
        l.budget = Some(budget.clone());
        let pieces = vec![
            Some(small.clone()),
            Some(small.clone()),
            Some(small.clone()),
        ];
        let mut r = scripted(pieces, l);
        let a = match r.read_frame(None) {
            Ok(Got::Frame(f)) => f,
            _ => panic!("first frame"),
        };
        let one = small.len() - 4 + FRAME_OVERHEAD;
        assert_eq!(budget.held(), one);
        let b = match r.read_frame(None) {
            Ok(Got::Frame(f)) => f,
            _ => panic!("second frame"),
        };
        assert_eq!(budget.held(), 2 * one);
        // A third would exceed 10,000 bytes: refused before its body is read.
        let err = r
            .read_frame(None)
            .err()
            .expect("over the budget")
            .to_string();
        assert!(err.contains("Options::max_buffered"), "{err}");
        drop((a, b));
        assert_eq!(budget.held(), 0);
    }

    #[test]
    fn frame_lengths_near_and_over_four_gib_are_checked() {
        assert_eq!(frame_length(0).unwrap(), 0);
        assert_eq!(frame_length(u32::MAX as usize).unwrap(), u32::MAX);
        for len in [u32::MAX as usize + 1, u32::MAX as usize + 64, usize::MAX] {
            match frame_length(len) {
                Err(Error::TooLarge { size, limit }) => {
                    assert_eq!((size, limit), (len, u32::MAX as usize))
                }
                other => panic!("{len}: {other:?}"),
            }
        }
        // A frame announced at the largest length is refused by its length alone.
        let mut bytes = u32::MAX.to_be_bytes().to_vec();
        bytes.push(0);
        let mut r = scripted(vec![Some(bytes)], limits(u32::MAX as usize - 1));
        assert!(r.read_frame(None).is_err());
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
        let bytes = f.seal(Kind::Call, 1, 0, 0, &ok).unwrap().to_vec();
        assert_eq!(Frame::parse(bytes[4..].to_vec()).unwrap().method(), ok);
        let mut empty = OutFrame::new(0);
        assert!(empty.seal(Kind::Reply, 1, 0, 0, "").is_err());
    }
}
