//! Reading frames from a transport: the one place that waits for a peer's bytes, under the
//! caller's deadline and the stall timeout, charging each frame to the connection's memory
//! budget before its body is allocated. See [`FrameReader`].
//!
//! The receive buffer grows with traffic and is given back when the connection goes quiet (see
//! [`RecvBuf`]): an idle connection holds none, so a server can hold many idle connections.

use crate::base::buffers;
use crate::base::limits::{Activity, Budget, Charge, FRAME_OVERHEAD};
use crate::base::recv_buf::RecvBuf;
use crate::base::spin::{Slots, SLOTS, SPIN_FOR};
use crate::error::Error;
use crate::transport::Control;
use crate::wire::codec::{Detached, PLACEHOLDER};
use crate::wire::{detachable, Frame, DETACH_MIN, PEEK};
use std::io::{self, Read};
use std::sync::Arc;
use std::time::{Duration, Instant};

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
    inner: Box<dyn Read + Send>,
    buf: RecvBuf,
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
    /// Look for input a while before blocking for the next frame ([`FrameReader::next_frame`]):
    /// the last wait for a frame was short.
    spin: bool,
    /// Where spinning threads take their place.
    slots: &'static Slots,
}

/// How long one read by a calling thread may block before it checks its deadline.
pub(crate) const READ_SLICE: Duration = Duration::from_millis(20);

/// Reads a frame's length (or part of it) into `out`: straight from `inner` while the buffer
/// is given back, so a quiet connection's reader waits without one. Reads of a frame's body go
/// through the buffer (with room for what the frame still needs): the kernel copies into a
/// small, cache-hot buffer and we copy on, where reading straight into a large body was up to
/// 2.5 times slower on loopback, depending on the body's offset in its page.
fn read_len(buf: &mut RecvBuf, inner: &mut dyn Read, out: &mut [u8]) -> io::Result<usize> {
    if buf.is_released() {
        return inner.read(out);
    }
    buf.read(inner, out, out.len())
}

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
            inner,
            buf: RecvBuf::default(),
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
            spin: true,
            slots: &SLOTS,
        };
        r.set_sliced(false);
        r
    }

    /// Reads the next frame as [`read_frame`](Self::read_frame) does; but if nothing of it is
    /// here yet and the last wait for a frame took at most [`SPIN_FOR`], first looks for input
    /// for up to that long (and until `deadline`) before blocking ([`crate::base::spin`]): the
    /// peer answers that fast, and sleeping would cost more than the wait. A wait that took
    /// longer (the peer is slow, or the connection quiet) turns the looking off until a wait is
    /// short again.
    pub(crate) fn next_frame(&mut self, deadline: Option<Instant>) -> Result<Got, Error> {
        if self.has_buffered() || !matches!(self.partial, Partial::Idle) {
            return self.read_frame(deadline);
        }
        let start = Instant::now();
        if self.spin {
            let control = &self.control;
            self.slots.spin(deadline, || control.input_waiting());
        }
        let got = self.read_frame(deadline);
        // A tick or a deadline that passed first was a long wait too.
        self.spin = matches!(got, Ok(Got::Frame(_))) && start.elapsed() <= SPIN_FOR;
        got
    }

    /// Whether bytes the peer sent are read but not yet taken (the start of a next frame).
    pub(crate) fn has_buffered(&self) -> bool {
        self.buf.has_bytes()
    }

    /// Whether input waits to be read, here or below (`true` if the transport cannot tell).
    pub(crate) fn input_waiting(&self) -> bool {
        self.has_buffered() || self.control.input_waiting()
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
        // A peer that announces a large frame and sends nothing must not make us allocate it.
        Ok(Partial::Body {
            len,
            charge,
            body: buffers::for_reading(len),
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
            match read_len(&mut self.buf, &mut self.inner, &mut buf[*got..]) {
                Ok(0) if *got == 0 => return Err(None),
                Ok(0) => {
                    return Err(Some(Error::Protocol(
                        "the peer closed the connection in the middle of a frame length".into(),
                    )))
                }
                Ok(n) => {
                    *got += n;
                    if !self.arrived(*got < 4, deadline) {
                        return Ok(false);
                    }
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
        while *got < len {
            if *got == body.len() {
                let to = *got + (*got).min(len - *got);
                body.reserve_exact(to - body.len());
                body.resize(to, 0);
            }
            let more = frame_len - (at + *got);
            match self.buf.read(&mut self.inner, &mut body[*got..], more) {
                Ok(0) => {
                    return Err(Error::Protocol(format!(
                        "truncated frame: the peer closed the connection after {} of \
                         {frame_len} bytes",
                        at + *got
                    )))
                }
                Ok(n) => {
                    *got += n;
                    if !self.arrived(*got < len, deadline) {
                        return Ok(false);
                    }
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

    /// Bytes arrived: the frame made progress. Returns false when more of it is due but the
    /// caller's deadline has passed, so a caller whose reads never time out (a peer sending
    /// another thread's large frame steadily) still gets its timeout on time.
    fn arrived(&mut self, more: bool, deadline: Option<Instant>) -> bool {
        let now = Instant::now();
        self.progress_at = now;
        if let Some(a) = &self.activity {
            a.touch();
        }
        !(more && deadline.is_some_and(|d| now >= d))
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
                if !in_frame {
                    // Quiet between frames: the buffer is not needed while waiting.
                    self.buf.release();
                }
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
        let mut tail = buffers::for_reading(n);
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
    let mut body = buffers::for_reading(len);
    body[..PEEK].copy_from_slice(&pre);
    Partial::Body {
        len,
        charge,
        body,
        got: PEEK,
    }
}

/// A read error means the transport is gone: the connection closes with this reason.
fn closed_by_io(e: io::Error) -> Error {
    Error::Closed {
        reason: format!("I/O error: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::base::recv_buf;
    use crate::wire::{frame_length, Kind, OutFrame};

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
        f.seal(kind, 7, 0, 0, "echo").unwrap();
        f.bytes().to_vec()
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
        crate::wire::codec::encode_into(&mut out, v).unwrap();
        out
    }

    fn data(n: usize, seed: u8) -> crate::wire::codec::Bytes {
        crate::wire::codec::Bytes::from(
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
        let _offered = crate::wire::codec::offer(frame.payload(), d);
        crate::wire::codec::decode(frame.payload())
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
                decode_offered::<crate::wire::codec::Bytes>(&mut frame).unwrap()
            } else {
                decode_offered::<(crate::wire::codec::Bytes,)>(&mut frame)
                    .unwrap()
                    .0
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
                let want = crate::wire::codec::decode::<T>(payload);
                let got = decode_offered::<T>(&mut frame);
                // Not assert_eq!: a failure would print megabytes.
                assert!(got == want, "{} differs", std::any::type_name::<T>());
            }
            same::<Copied>(read(), &payload);
            same::<(Copied,)>(read(), &payload);
            same::<serde_cbor::Value>(read(), &payload);
            same::<String>(read(), &payload);
            same::<u64>(read(), &payload);
            same::<(crate::wire::codec::Bytes, u8)>(read(), &payload);
            same::<(u8, crate::wire::codec::Bytes)>(read(), &payload);
            same::<Vec<crate::wire::codec::Bytes>>(read(), &payload);
            same::<Option<crate::wire::codec::Bytes>>(read(), &payload);
            same::<(crate::wire::codec::Bytes,)>(read(), &payload);
            same::<crate::wire::codec::Bytes>(read(), &payload);
            // Described (for error messages) as the bytes sent.
            let mut frame = read();
            let d = frame.detached.take();
            let _offered = crate::wire::codec::offer(frame.payload(), d);
            for limit in [8, crate::wire::codec::QUOTE_MAX, 1 << 20] {
                let (detached, peak) = crate::base::test_alloc::peak_during(|| {
                    crate::wire::codec::describe(frame.payload(), limit)
                });
                assert_eq!(detached, crate::wire::codec::describe(&payload, limit));
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
                let _b = crate::wire::codec::Bytes::deserialize(d)?;
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
        let empty: crate::wire::codec::Bytes = crate::wire::codec::decode(&[0x40]).unwrap();
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

    /// A control that counts how often it is asked whether input waits, and always says no.
    #[derive(Default)]
    struct Looks(std::sync::atomic::AtomicUsize);

    impl Control for Looks {
        fn shutdown(&self) {}
        fn input_waiting(&self) -> bool {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            false
        }
    }

    #[test]
    fn a_reader_looks_for_input_before_waiting_for_a_frame_only_while_its_waits_are_short() {
        let n = 40;
        let pieces = (0..n)
            .map(|_| Some(frame_bytes(Kind::Reply, &cbor(&"x"))))
            .collect::<Vec<_>>();
        let looks = Arc::new(Looks::default());
        let mut r = FrameReader::new(
            Box::new(Script(pieces.into())),
            limits(1 << 20),
            looks.clone(),
        );
        r.slots = Box::leak(Box::new(Slots::new(1)));
        let count = || looks.0.load(std::sync::atomic::Ordering::SeqCst);
        let next = |r: &mut FrameReader| assert!(matches!(r.next_frame(None), Ok(Got::Frame(_))));
        // The first wait: it looks (here for all of SPIN_FOR, as no input ever shows: several
        // times, or once on a machine so busy that one yield outlasts SPIN_FOR), and that wait
        // was long.
        next(&mut r);
        let first = count();
        assert!(first >= 1, "it did not look before the first frame");
        // So the next one does not look; the frame is there at once, a short wait.
        next(&mut r);
        assert_eq!(count(), first, "it looked after a long wait");
        // A short wait turns looking on again (some wait is short, however slow the machine).
        let mut looked_again = false;
        for _ in 2..n {
            let before = count();
            next(&mut r);
            if count() > before {
                looked_again = true;
                break;
            }
        }
        assert!(looked_again, "it never looked again after short waits");
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
    fn the_receive_buffer_grows_with_traffic_and_is_given_back_when_the_connection_goes_quiet() {
        let small = frame_bytes(Kind::Reply, &cbor(&"x"));
        let large = frame_bytes(Kind::Error, &cbor(&data(1 << 20, 8)));
        // Many small frames in one arrival: each read that fills the buffer doubles it.
        let burst: Vec<u8> = (0..(recv_buf::MAX / small.len() + 1) * 4)
            .flat_map(|_| small.clone())
            .collect();
        let frames_in_burst = burst.len() / small.len();
        let pieces = vec![
            Some(small.clone()),
            None,
            Some(large),
            None,
            Some(burst),
            None,
            Some(small),
        ];
        let mut r = scripted(pieces, limits(64 << 20));
        assert_eq!(r.buf.capacity(), 0, "a new connection holds no buffer");
        assert!(matches!(r.read_frame(None), Ok(Got::Frame(_))));
        assert_eq!(
            r.buf.capacity(),
            recv_buf::MIN,
            "small frames take a small buffer"
        );
        assert!(matches!(r.read_frame(None), Ok(Got::NotYet)));
        assert_eq!(r.buf.capacity(), 0, "given back when quiet");
        assert!(matches!(r.read_frame(None), Ok(Got::Frame(_))));
        assert_eq!(
            r.buf.capacity(),
            recv_buf::MAX,
            "a large frame is read 64 KiB at a time"
        );
        assert!(matches!(r.read_frame(None), Ok(Got::NotYet)));
        assert_eq!(r.buf.capacity(), 0, "given back after a large frame");
        for _ in 0..frames_in_burst {
            assert!(matches!(r.read_frame(None), Ok(Got::Frame(_))));
        }
        assert_eq!(
            r.buf.capacity(),
            recv_buf::MAX,
            "a stream of small frames grows it"
        );
        assert!(matches!(r.read_frame(None), Ok(Got::NotYet)));
        assert_eq!(r.buf.capacity(), 0);
        assert!(matches!(r.read_frame(None), Ok(Got::Frame(_))));
        assert!(matches!(r.read_frame(None), Ok(Got::End)));
    }

    #[test]
    fn a_frame_read_in_part_keeps_the_buffer_through_a_timeout() {
        let whole = frame_bytes(Kind::Reply, &cbor(&data(5000, 9)));
        let pieces = vec![
            Some(whole[..100].to_vec()),
            None,
            Some(whole[100..].to_vec()),
        ];
        let mut r = scripted(pieces, limits(1 << 20));
        assert!(matches!(r.read_frame(past()), Ok(Got::NotYet)));
        assert!(r.buf.capacity() > 0, "kept while a frame is in progress");
        assert!(matches!(r.read_frame(None), Ok(Got::Frame(_))));
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
        let budget = crate::base::limits::Budget::new(10_000, None);
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
}
