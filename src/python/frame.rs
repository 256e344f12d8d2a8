//! RPyC 6's framing: `length: u32 BE | compressed: u8 | data[length] | b'\n'`, where a payload
//! over 3,000 bytes is sent as a zlib stream (level 1, as RPyC does) and the flag says so.
//! The trailing newline is not counted in `length` and is not checked on receipt (RPyC does
//! not check it either).
//!
//! Reading is bounded twice: a frame longer than the limit is refused from its header, before
//! anything is allocated for it, and a compressed one is inflated only up to the same limit
//! (a zlib bomb stops there).

use crate::base::limits::{Budget, Charge, FRAME_OVERHEAD};
use flate2::{write::ZlibEncoder, Compression, Decompress, FlushDecompress, Status};
use std::io::{self, Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Header bytes before the data.
pub const HEADER: usize = 5;
/// Payloads longer than this are compressed (RPyC's `COMPRESSION_THRESHOLD`).
pub const COMPRESSION_THRESHOLD: usize = 3000;

/// A buffer to write a payload into: the frame's header goes in front, once [`seal`]ed.
pub fn open() -> Vec<u8> {
    let mut buf = Vec::with_capacity(128);
    buf.resize(HEADER, 0);
    buf
}

/// Turns a buffer from [`open`], with a payload written after its header space, into a whole
/// frame: the header filled in and the terminator added, in place; a payload over the
/// threshold is compressed into a new buffer.
pub fn seal(mut buf: Vec<u8>) -> Vec<u8> {
    let payload_len = buf.len() - HEADER;
    let compressed = payload_len > COMPRESSION_THRESHOLD;
    if compressed {
        let mut z = ZlibEncoder::new(vec![0; HEADER], Compression::new(1));
        z.write_all(&buf[HEADER..]).expect("writing to a Vec");
        buf = z.finish().expect("writing to a Vec");
    }
    let len = (buf.len() - HEADER) as u32;
    buf[0..4].copy_from_slice(&len.to_be_bytes());
    buf[4] = compressed as u8;
    buf.push(b'\n');
    buf
}

/// The frame for `payload`.
pub fn encode(payload: &[u8]) -> Vec<u8> {
    let mut buf = open();
    buf.extend_from_slice(payload);
    seal(buf)
}

/// Why reading a frame failed.
#[derive(Debug)]
pub enum ReadError {
    /// The stream ended between frames.
    End,
    /// The transport failed, or the stream ended inside a frame.
    Io(io::Error),
    /// The peer sent something that is not an RPyC 6 frame, or one over the limit; says what.
    Bad(String),
    /// The peer stopped in the middle of a frame for the stall timeout.
    Stalled(Duration),
    /// The frame would take this side over its memory budget; says which.
    Over(String),
}

/// Reads frames from a blocking reader whose reads may time out (a tick), so the reading
/// thread can give up on a peer that stalls inside a frame and notice a closed connection.
pub struct FrameReader<R> {
    r: R,
    max: usize,
    stall: Duration,
    budget: Arc<Budget>,
    /// Bytes read past the frame being filled (so a small frame costs one read, not two):
    /// `ahead[at..]` is unread.
    ahead: Vec<u8>,
    at: usize,
}

/// Size of the read-ahead buffer: small frames are read through it; larger reads go straight
/// into the frame.
const AHEAD: usize = 16 << 10;

impl<R: Read> FrameReader<R> {
    /// A reader refusing frames (compressed or not) over `max` bytes, dropping a peer that
    /// sends nothing for `stall` in the middle of one, and charging each frame to `budget`
    /// before allocating it.
    pub fn new(r: R, max: usize, stall: Duration, budget: Arc<Budget>) -> Self {
        FrameReader {
            r,
            max,
            stall,
            budget,
            ahead: Vec::new(),
            at: 0,
        }
    }

    /// The next frame's payload (inflated), with its charge to the budget. `quiet` is called
    /// each time a read times out between frames; it returns false to stop reading (the
    /// connection was closed).
    pub fn read(
        &mut self,
        quiet: &mut dyn FnMut() -> bool,
    ) -> Result<(Vec<u8>, Charge), ReadError> {
        let mut head = [0u8; HEADER];
        if !self.fill(&mut head, true, quiet)? {
            return Err(ReadError::End);
        }
        let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
        if &head[0..4] == b"RPYC" {
            return Err(ReadError::Bad(
                "the peer speaks rpyc's native protocol, not Python RPyC's: connect with \
                 rpyc::connect (or serve with ThreadedServer) instead of rpyc::python"
                    .into(),
            ));
        }
        if len > self.max {
            return Err(ReadError::Bad(format!(
                "a frame of {len} bytes is over this side's limit of {} (Options::max_frame_size); \
                 is the peer an RPyC 6 peer?",
                self.max
            )));
        }
        let charge = self.charge(len)?;
        // Length plus the trailing newline.
        let mut data = vec![0u8; len + 1];
        self.fill(&mut data, false, quiet)?;
        data.pop();
        if head[4] == 0 {
            return Ok((data, charge));
        }
        // Inflated into at most `max` bytes, each step of growth charged before it is
        // allocated; then the charges are merged into one for the payload's length.
        let mut steps = Vec::new();
        let budget = &self.budget;
        let payload = inflate(&data, self.max, &mut |bytes| {
            steps.push(
                budget
                    .charge(bytes)
                    .map_err(|over| ReadError::Over(over.to_string()))?,
            );
            Ok(())
        })?;
        drop(data);
        drop(charge);
        let inflated = self.charge(payload.len())?;
        drop(steps);
        Ok((payload, inflated))
    }

    fn charge(&self, len: usize) -> Result<Charge, ReadError> {
        self.budget
            .charge(len + FRAME_OVERHEAD)
            .map_err(|over| ReadError::Over(over.to_string()))
    }

    /// Fills `buf`; returns false if the stream ended before its first byte and `may_end`.
    fn fill(
        &mut self,
        buf: &mut [u8],
        may_end: bool,
        quiet: &mut dyn FnMut() -> bool,
    ) -> Result<bool, ReadError> {
        let mut got = 0;
        let mut last = Instant::now();
        while got < buf.len() {
            if self.at < self.ahead.len() {
                let n = (self.ahead.len() - self.at).min(buf.len() - got);
                buf[got..got + n].copy_from_slice(&self.ahead[self.at..self.at + n]);
                self.at += n;
                got += n;
                continue;
            }
            let want = buf.len() - got;
            let read = if want >= AHEAD {
                self.r.read(&mut buf[got..])
            } else {
                self.ahead.resize(AHEAD, 0);
                self.at = 0;
                let r = self.r.read(&mut self.ahead);
                let n = *r.as_ref().unwrap_or(&0);
                self.ahead.truncate(n);
                r.map(|_| 0)
            };
            match read {
                // Read ahead: copied from the buffer on the next turn.
                Ok(0) if self.at < self.ahead.len() => {
                    last = Instant::now();
                }
                Ok(0) if got == 0 && may_end => return Ok(false),
                Ok(0) => {
                    return Err(ReadError::Io(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the peer closed the connection in the middle of a frame",
                    )))
                }
                Ok(n) => {
                    got += n;
                    last = Instant::now();
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    if !quiet() {
                        return Err(ReadError::End);
                    }
                    let inside = got > 0 || !may_end;
                    if inside && last.elapsed() >= self.stall {
                        return Err(ReadError::Stalled(self.stall));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ReadError::Io(e)),
            }
        }
        Ok(true)
    }
}

/// Inflates a zlib stream, refusing to produce more than `max` bytes; `grow` is told (and may
/// refuse) each growth of the output before it is allocated.
pub fn inflate(
    data: &[u8],
    max: usize,
    grow: &mut dyn FnMut(usize) -> Result<(), ReadError>,
) -> Result<Vec<u8>, ReadError> {
    let bomb = || {
        ReadError::Bad(format!(
            "a compressed frame inflates to more than this side's limit of {max} bytes \
             (Options::max_frame_size)"
        ))
    };
    let mut z = Decompress::new(true);
    // Grow as the output does, never past `max + 1`: a small frame never reserves `max`.
    let first = (data.len() * 4).min(max) + 1;
    grow(first)?;
    let mut out: Vec<u8> = Vec::with_capacity(first);
    loop {
        if out.len() == out.capacity() {
            let room = (max + 1).saturating_sub(out.len());
            if room == 0 {
                return Err(bomb());
            }
            let more = out.capacity().max(4096).min(room);
            grow(more)?;
            out.reserve_exact(more);
        }
        let (in_before, out_before) = (z.total_in() as usize, out.len());
        let status = z
            .decompress_vec(&data[in_before..], &mut out, FlushDecompress::Finish)
            .map_err(|e| ReadError::Bad(format!("a compressed frame does not inflate: {e}")))?;
        if out.len() > max {
            return Err(bomb());
        }
        if status == Status::StreamEnd {
            if z.total_in() as usize != data.len() {
                return Err(ReadError::Bad(
                    "bytes after the end of a compressed frame's zlib stream".into(),
                ));
            }
            return Ok(out);
        }
        let stuck = z.total_in() as usize == in_before && out.len() == out_before;
        if stuck && out.len() < out.capacity() {
            return Err(ReadError::Bad(
                "a compressed frame's zlib stream is truncated".into(),
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(payload: &[u8]) -> Vec<u8> {
        encode(payload)
    }

    fn read_one(bytes: &[u8], max: usize) -> Result<Vec<u8>, ReadError> {
        let budget = Budget::new(4 * max + 4 * FRAME_OVERHEAD, None);
        FrameReader::new(bytes, max, Duration::from_secs(1), budget)
            .read(&mut || true)
            .map(|(payload, _charge)| payload)
    }

    #[test]
    fn the_getroot_frame_is_byte_identical_to_rpyc() {
        let payload = [0x01, 0x11, 0x50, 0x11, 0x53, 0x11, 0x51, 0x02];
        let hex: String = frames(&payload)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(hex, "000000080001115011531151020a");
    }

    #[test]
    fn payloads_over_3000_bytes_are_compressed_and_come_back() {
        let at = vec![7u8; COMPRESSION_THRESHOLD];
        let over = vec![7u8; COMPRESSION_THRESHOLD + 1];
        assert_eq!(frames(&at)[4], 0);
        let f = frames(&over);
        assert_eq!(f[4], 1);
        assert!(f.len() < 100);
        assert_eq!(read_one(&f, 1 << 20).unwrap(), over);
    }

    #[test]
    fn a_zlib_bomb_stops_at_the_limit() {
        let big = vec![0u8; 50 << 20];
        let f = frames(&big);
        // Level 1, as RPyC: ~230 KiB with zlib 1.2.13. Under the 1 MiB limit, so that the
        // inflation (not the header check) is what refuses it.
        assert!(f.len() < 1 << 20, "{} bytes", f.len());
        match read_one(&f, 1 << 20) {
            Err(ReadError::Bad(m)) => assert!(m.contains("more than"), "{m}"),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn oversized_and_native_headers_are_refused_before_allocating() {
        match read_one(&[0xff, 0xff, 0xff, 0xff, 0], 1 << 20) {
            Err(ReadError::Bad(m)) => assert!(m.contains("over this side's limit"), "{m}"),
            other => panic!("{other:?}"),
        }
        match read_one(b"RPYC\x00\x01", 1 << 20) {
            Err(ReadError::Bad(m)) => assert!(m.contains("native protocol"), "{m}"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            read_one(&[0, 0, 0, 9, 0, 1], 100),
            Err(ReadError::Io(_))
        ));
        assert!(matches!(read_one(&[], 100), Err(ReadError::End)));
        let mut bad = frames(&[1u8; 4000]);
        bad[8] ^= 0xff;
        assert!(matches!(read_one(&bad, 1 << 20), Err(ReadError::Bad(_))));
    }
}
