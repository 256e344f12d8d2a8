//! A receive buffer that grows with traffic and is given back while the connection is quiet:
//! the frame reader's ([`crate::transport::reader`]) and the TLS session's socket buffer
//! ([`crate::tls`]), so that 10,000 idle connections cost no buffer while a busy one reads up
//! to 64 KiB per system call.

use std::io::{self, Read};

/// A buffer's size when bytes start arriving.
pub(crate) const MIN: usize = 4 * 1024;
/// Its largest size: what one read takes at most (four full TLS records).
pub(crate) const MAX: usize = 64 * 1024;

/// Bytes read and not yet taken. Empty (no allocation) until bytes arrive and after
/// [`release`](RecvBuf::release); allocated at [`MIN`] bytes for a read, it doubles after a
/// read that filled it (a run of messages), up to [`MAX`], or grows at once to what the reader
/// says it will need. It changes size only while it holds no bytes.
#[derive(Default)]
pub(crate) struct RecvBuf {
    buf: Vec<u8>,
    pos: usize,
    end: usize,
    /// The last read filled the buffer: the next one gets twice the room.
    was_full: bool,
}

impl RecvBuf {
    /// Whether it holds bytes not yet taken.
    pub(crate) fn has_bytes(&self) -> bool {
        self.pos < self.end
    }

    /// Whether it was given back (or never needed): it holds no allocation.
    pub(crate) fn is_released(&self) -> bool {
        self.buf.is_empty()
    }

    /// The room for the next read, which must find it without bytes: at least `want` bytes,
    /// within [`MAX`].
    pub(crate) fn room(&mut self, want: usize) -> &mut [u8] {
        debug_assert!(!self.has_bytes(), "a buffer refilled before it was drained");
        let mut size = self.buf.len().max(MIN);
        if self.was_full {
            size *= 2;
        }
        size = size.max(want.min(MAX).next_power_of_two()).min(MAX);
        if size > self.buf.len() {
            self.buf = vec![0; size];
        }
        &mut self.buf
    }

    /// Records that a read into [`room`](RecvBuf::room) took `n` bytes, and returns them.
    pub(crate) fn filled(&mut self, n: usize) -> &[u8] {
        self.pos = 0;
        self.end = n;
        self.was_full = n == self.buf.len();
        &self.buf[..n]
    }

    /// Copies bytes not yet taken into `out`; returns how many.
    pub(crate) fn take(&mut self, out: &mut [u8]) -> usize {
        let k = out.len().min(self.end - self.pos);
        out[..k].copy_from_slice(&self.buf[self.pos..self.pos + k]);
        self.pos += k;
        k
    }

    /// Copies buffered bytes into `out`, first refilling the buffer with one read from `inner`
    /// if it holds none (room for at least `want` bytes).
    pub(crate) fn read(
        &mut self,
        inner: &mut dyn Read,
        out: &mut [u8],
        want: usize,
    ) -> io::Result<usize> {
        if !self.has_bytes() {
            let n = inner.read(self.room(want))?;
            self.filled(n);
        }
        Ok(self.take(out))
    }

    /// Gives the buffer back if it holds no bytes (the connection is quiet), its pages to the
    /// kernel (the allocator would keep them resident).
    pub(crate) fn release(&mut self) {
        if !self.has_bytes() && !self.buf.is_empty() {
            #[cfg(unix)]
            crate::base::sys::release_pages(&mut self.buf);
            *self = RecvBuf::default();
        }
    }

    /// Bytes allocated for the buffer.
    #[cfg(test)]
    pub(crate) fn capacity(&self) -> usize {
        self.buf.capacity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_grows_when_reads_fill_it_and_is_given_back_when_quiet() {
        let mut rb = RecvBuf::default();
        // Each read that fills the buffer doubles the next one's room, up to MAX.
        let mut sizes = Vec::new();
        for _ in 0..6 {
            let n = rb.room(0).len();
            sizes.push(n);
            rb.filled(n);
            rb.take(&mut vec![0; n]);
        }
        assert_eq!(
            sizes,
            [4, 8, 16, 32, 64, 64].map(|k| k * 1024),
            "room for successive full reads"
        );
        // A read that does not fill it keeps its size; bytes not yet taken keep it.
        rb.filled(100);
        rb.release();
        assert_eq!(rb.capacity(), MAX, "kept while it holds bytes");
        rb.take(&mut [0; 100]);
        assert_eq!(rb.room(0).len(), MAX);
        rb.release();
        assert!(rb.is_released() && rb.capacity() == 0, "given back");
        assert_eq!(rb.room(0).len(), MIN, "small again");
        // A reader that needs more gets it at once, rounded up to a power of two, within MAX.
        assert_eq!(rb.room(9 * 1024).len(), 16 * 1024);
        assert_eq!(rb.room(1 << 20).len(), MAX);
    }

    #[test]
    fn bytes_are_taken_in_order_across_reads() {
        let mut rb = RecvBuf::default();
        let mut src: &[u8] = &[1, 2, 3, 4, 5];
        let mut out = [0u8; 2];
        assert_eq!(rb.read(&mut src, &mut out, 0).unwrap(), 2);
        assert_eq!(out, [1, 2]);
        assert!(rb.has_bytes());
        let mut rest = [0u8; 8];
        assert_eq!(rb.read(&mut src, &mut rest, 0).unwrap(), 3);
        assert_eq!(&rest[..3], &[3, 4, 5]);
        assert!(!rb.has_bytes());
    }
}
