//! An in-memory transport: two byte pipes (a `Mutex` + `Condvar` queue each way), so that a
//! connection runs over real reads and writes without a socket, and a test can see who waits
//! where (the thread blocked reading, the writers waiting for room).

use crate::base::lock;
use crate::transport::{Control, Sink, Transport};
use std::collections::VecDeque;
use std::io::{self, Read};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, ThreadId};
use std::time::{Duration, Instant};

/// One direction: bytes written at one end and read at the other.
pub(crate) struct Pipe {
    pub(crate) state: Mutex<State>,
    /// Signalled on every change of `state`; waiters look again.
    cv: Condvar,
}

pub(crate) struct State {
    buf: VecDeque<u8>,
    /// Most bytes the pipe holds: a writer waits for room beyond that (a full socket buffer).
    cap: usize,
    /// Shut down: reads return what is left, then the end of the stream; writes fail.
    closed: bool,
    /// Reads of the [`Read`] end fail with `WouldBlock` after this long (`SO_RCVTIMEO`).
    read_timeout: Option<Duration>,
    /// The thread blocked in a read right now, waiting for bytes.
    pub(crate) blocked_reader: Option<ThreadId>,
    /// Writers waiting for room.
    pub(crate) blocked_writers: usize,
    /// Writes that took bytes (a vectored write counts once, like `sendmsg`).
    pub(crate) writes: usize,
}

impl State {
    pub(crate) fn is_full(&self) -> bool {
        self.buf.len() >= self.cap
    }
}

impl Pipe {
    pub(crate) fn new(cap: usize) -> Arc<Pipe> {
        Arc::new(Pipe {
            state: Mutex::new(State {
                buf: VecDeque::new(),
                cap,
                closed: false,
                read_timeout: None,
                blocked_reader: None,
                blocked_writers: 0,
                writes: 0,
            }),
            cv: Condvar::new(),
        })
    }

    fn changed(&self) {
        self.cv.notify_all();
    }

    /// Waits on the condition variable until `deadline` (`None`: without a bound).
    fn wait<'a>(
        &self,
        st: MutexGuard<'a, State>,
        deadline: Option<Instant>,
    ) -> MutexGuard<'a, State> {
        match deadline {
            None => self.cv.wait(st).unwrap_or_else(|e| e.into_inner()),
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                self.cv
                    .wait_timeout(st, left)
                    .unwrap_or_else(|e| e.into_inner())
                    .0
            }
        }
    }

    /// Reads what is there (at most `out.len()` bytes), waiting for bytes until `deadline`
    /// (then `WouldBlock`). `Ok(0)`: the pipe was shut down and is empty.
    pub(crate) fn read_until(
        &self,
        out: &mut [u8],
        deadline: Option<Instant>,
    ) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        let mut st = lock(&self.state);
        loop {
            if !st.buf.is_empty() {
                let n = out.len().min(st.buf.len());
                for (o, b) in out.iter_mut().zip(st.buf.drain(..n)) {
                    *o = b;
                }
                self.changed();
                return Ok(n);
            }
            if st.closed {
                return Ok(0);
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            st.blocked_reader = Some(thread::current().id());
            self.changed();
            st = self.wait(st, deadline);
            st.blocked_reader = None;
            self.changed();
        }
    }

    /// Writes a prefix of `data` (not empty), waiting for room until `until` (then `Ok(0)`),
    /// as a [`Sink`] does.
    pub(crate) fn write_until(&self, data: &[u8], until: Option<Instant>) -> io::Result<usize> {
        let mut st = lock(&self.state);
        loop {
            if st.closed {
                return Err(io::Error::new(io::ErrorKind::BrokenPipe, "pipe shut down"));
            }
            let room = st.cap.saturating_sub(st.buf.len());
            if room > 0 {
                let n = room.min(data.len());
                st.buf.extend(&data[..n]);
                st.writes += 1;
                self.changed();
                return Ok(n);
            }
            if until.is_some_and(|u| Instant::now() >= u) {
                return Ok(0);
            }
            st.blocked_writers += 1;
            self.changed();
            st = self.wait(st, until);
            st.blocked_writers -= 1;
            self.changed();
        }
    }

    /// Writes all of `data`, waiting for room as long as it takes.
    pub(crate) fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let n = self.write_until(data, None)?;
            data = &data[n..];
        }
        Ok(())
    }

    /// Fills `out` completely before `deadline`; fails with `TimedOut` after it, or with
    /// `UnexpectedEof` if the pipe was shut down first.
    pub(crate) fn read_exact_until(&self, out: &mut [u8], deadline: Instant) -> io::Result<()> {
        let mut got = 0;
        while got < out.len() {
            match self.read_until(&mut out[got..], Some(deadline)) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("read {got} of {} bytes, then nothing", out.len()),
                    ))
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Shuts the pipe down: blocked readers and writers return.
    pub(crate) fn close(&self) {
        lock(&self.state).closed = true;
        self.changed();
    }

    /// Sets how many bytes the pipe holds before writers wait.
    pub(crate) fn set_capacity(&self, cap: usize) {
        lock(&self.state).cap = cap;
        self.changed();
    }

    /// Waits until `ready` holds for the pipe's state, at most `timeout`; whether it did.
    pub(crate) fn wait_until(
        &self,
        timeout: Duration,
        mut ready: impl FnMut(&State) -> bool,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = lock(&self.state);
        loop {
            if ready(&st) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            st = self.wait(st, Some(deadline));
        }
    }
}

/// The read half of a transport: reads honour the timeout its [`PipeControl`] set.
struct PipeReader(Arc<Pipe>);

impl Read for PipeReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let timeout = lock(&self.0.state).read_timeout;
        let deadline = timeout.map(|t| Instant::now() + t);
        self.0.read_until(out, deadline)
    }
}

/// The write half of a transport. It has no stall timeout: the tests that block a writer end
/// the wait themselves (by reading, or by shutting the pipe down).
struct PipeSink(Arc<Pipe>);

impl Sink for PipeSink {
    fn send(&mut self, buf: &[u8], until: Option<Instant>) -> io::Result<usize> {
        self.0.write_until(buf, until)
    }

    /// One write of the pieces joined, as `sendmsg` makes one of them.
    fn send_vectored(
        &mut self,
        pieces: &[std::io::IoSlice<'_>],
        until: Option<Instant>,
    ) -> io::Result<usize> {
        let joined: Vec<u8> = pieces.iter().flat_map(|p| p.iter().copied()).collect();
        self.0.write_until(&joined, until)
    }
}

/// Shuts both directions down, and sets the read timeout when the transport has them.
struct PipeControl {
    inbound: Arc<Pipe>,
    outbound: Arc<Pipe>,
    timeouts: bool,
}

impl Control for PipeControl {
    fn shutdown(&self) {
        self.inbound.close();
        self.outbound.close();
    }

    fn set_read_timeout(&self, d: Option<Duration>) -> io::Result<()> {
        if !self.timeouts {
            return Err(io::ErrorKind::Unsupported.into());
        }
        if d == Some(Duration::ZERO) {
            // As sockets: a zero timeout is refused.
            return Err(io::ErrorKind::InvalidInput.into());
        }
        lock(&self.inbound.state).read_timeout = d;
        Ok(())
    }

    fn input_waiting(&self) -> bool {
        let st = lock(&self.inbound.state);
        !st.buf.is_empty() || st.closed
    }
}

/// Whether reads of a transport can time out: with them a calling thread may read its own
/// reply (as over a socket); without them only the pool reads (as over a pipe or stream).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Timeouts {
    Yes,
    No,
}

/// A transport that reads `inbound` and writes `outbound`.
pub(crate) fn transport(inbound: Arc<Pipe>, outbound: Arc<Pipe>, timeouts: Timeouts) -> Transport {
    Transport {
        reader: Box::new(PipeReader(inbound.clone())),
        writer: Box::new(PipeSink(outbound.clone())),
        peer: "in-memory pipe".into(),
        control: Arc::new(PipeControl {
            inbound,
            outbound,
            timeouts: timeouts == Timeouts::Yes,
        }),
        credentials: None,
        started: Instant::now(),
        hello_sent: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pipe_honours_read_timeouts_capacity_and_shutdown() {
        let p = Pipe::new(4);
        let mut r = PipeReader(p.clone());
        let ctl = PipeControl {
            inbound: p.clone(),
            outbound: Pipe::new(1),
            timeouts: true,
        };
        ctl.set_read_timeout(Some(Duration::from_millis(1)))
            .unwrap();
        let mut buf = [0; 8];
        assert_eq!(
            r.read(&mut buf).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        // Full at 4 bytes: a writer with a deadline gets nothing in.
        assert_eq!(p.write_until(b"abcdef", None).unwrap(), 4);
        assert_eq!(p.write_until(b"ef", Some(Instant::now())).unwrap(), 0);
        assert_eq!(r.read(&mut buf).unwrap(), 4);
        assert_eq!(&buf[..4], b"abcd");
        p.write_all(b"xy").unwrap();
        ctl.shutdown();
        // What was written before the shutdown is read, then the end.
        assert_eq!(r.read(&mut buf).unwrap(), 2);
        assert_eq!(r.read(&mut buf).unwrap(), 0);
        assert!(p.write_until(b"z", None).is_err());
    }
}
