//! The one place this crate calls the operating system directly: `poll(2)`, which the
//! transports and the SSH tunnel need to wait for a socket without holding a lock, reads and
//! writes that never wait whatever the socket's mode, non-blocking pipes, and handing a freed
//! buffer's pages back to the kernel (std has no safe equivalents).

#![allow(unsafe_code)]

use std::io;
use std::os::unix::io::RawFd;
use std::time::Duration;

/// Ready for reading (or end of stream).
pub(crate) const POLLIN: i16 = libc::POLLIN;
/// Ready for writing.
pub(crate) const POLLOUT: i16 = libc::POLLOUT;
/// The peer shut down its sending side (Linux; elsewhere only POLLHUP tells).
#[cfg(any(target_os = "linux", target_os = "android"))]
pub(crate) const POLLRDHUP: i16 = libc::POLLRDHUP;
/// The peer shut down its sending side (Linux; elsewhere only POLLHUP tells).
#[cfg(not(any(target_os = "linux", target_os = "android")))]
pub(crate) const POLLRDHUP: i16 = 0;
/// Hung up or failed: reported whether asked for or not.
pub(crate) const POLLHUP_OR_ERR: i16 = libc::POLLHUP | libc::POLLERR | libc::POLLNVAL;

/// One descriptor to wait for: what to wait for (`events`) and, after [`poll`], what happened
/// (`revents`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct PollFd {
    pub fd: RawFd,
    pub events: i16,
    pub revents: i16,
}

impl PollFd {
    pub(crate) fn new(fd: RawFd, events: i16) -> PollFd {
        PollFd {
            fd,
            events,
            revents: 0,
        }
    }
}

/// Waits until one of `fds` is ready or `timeout` passes (`None`: no limit); returns how many
/// are ready (0 on timeout). An interrupted wait returns 0, so callers re-check their state.
pub(crate) fn poll(fds: &mut [PollFd], timeout: Option<Duration>) -> io::Result<usize> {
    let ms: libc::c_int = match timeout {
        None => -1,
        // Round up, so a short timeout never becomes a busy loop of zero-length polls.
        Some(d) => d
            .as_nanos()
            .div_ceil(1_000_000)
            .min(libc::c_int::MAX as u128) as libc::c_int,
    };
    let mut raw: Vec<libc::pollfd> = fds
        .iter()
        .map(|p| libc::pollfd {
            fd: p.fd,
            events: p.events,
            revents: 0,
        })
        .collect();
    // SAFETY: `raw` is a valid, exclusively borrowed array of `raw.len()` pollfd structs for
    // the duration of the call; poll only writes their `revents` fields.
    let n = unsafe { libc::poll(raw.as_mut_ptr(), raw.len() as libc::nfds_t, ms) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(0);
        }
        return Err(e);
    }
    for (p, r) in fds.iter_mut().zip(&raw) {
        p.revents = r.revents;
    }
    Ok(n as usize)
}

/// Sends any delayed ACK on TCP socket `fd` now (`TCP_QUICKACK`; Linux only, elsewhere a no-op).
///
/// A peer with Nagle's algorithm on (sshd, for tunnels) holds back its next small packet until
/// the previous one is acknowledged; a delayed ACK then costs it up to 40 ms.
pub(crate) fn tcp_quickack(fd: RawFd) -> io::Result<()> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        let one: libc::c_int = 1;
        // SAFETY: `one` is a valid c_int for the duration of the call and its size is passed;
        // setsockopt only reads it. An invalid fd is reported as an error, not UB.
        let r = unsafe {
            libc::setsockopt(
                fd,
                libc::IPPROTO_TCP,
                libc::TCP_QUICKACK,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let _ = fd;
    Ok(())
}

/// Waits for one descriptor; returns its `revents` (0 on timeout).
pub(crate) fn wait_fd(fd: RawFd, events: i16, timeout: Option<Duration>) -> io::Result<i16> {
    let mut p = [PollFd::new(fd, events)];
    poll(&mut p, timeout)?;
    Ok(p[0].revents)
}

/// Whether `fd` has input to read (or its end, or an error, to report) right now, without
/// waiting; an error counts as input (a read will report it).
pub(crate) fn readable_now(fd: RawFd) -> bool {
    wait_fd(fd, libc::POLLIN, Some(Duration::ZERO)).map_or(true, |r| r != 0)
}

/// Reads what a socket has without waiting, whatever its blocking mode: `WouldBlock` when it
/// has nothing.
pub(crate) fn recv_nowait(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the duration of the call.
        let n = unsafe {
            libc::recv(
                fd,
                buf.as_mut_ptr().cast::<libc::c_void>(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Sends what the socket takes without waiting, whatever its blocking mode (and without
/// SIGPIPE): `WouldBlock` when its buffer is full.
pub(crate) fn send_nowait(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `buf` is valid for reads of `buf.len()` bytes for the duration of the call.
        let n = unsafe {
            libc::send(
                fd,
                buf.as_ptr().cast::<libc::c_void>(),
                buf.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// [`send_nowait`] for pieces written in order, in one `sendmsg(2)` (at most `IOV_MAX`
/// pieces are offered; the rest wait for the next call).
pub(crate) fn send_vectored_nowait(
    fd: RawFd,
    pieces: &[std::io::IoSlice<'_>],
) -> io::Result<usize> {
    const IOV_MAX: usize = 1024;
    let n = pieces.len().min(IOV_MAX);
    loop {
        // SAFETY: a zeroed msghdr is valid (no name, no control data); `IoSlice` has the
        // layout of `iovec` on unix (std guarantees it), and the `n` pieces stay borrowed,
        // valid for reads, for the duration of the call.
        let sent = unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = pieces.as_ptr() as *mut libc::iovec;
            msg.msg_iovlen = n as _;
            libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
        };
        if sent >= 0 {
            return Ok(sent as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Shuts down the sending side of socket `fd` (the peer reads the end of our data).
pub(crate) fn shutdown_write(fd: RawFd) -> io::Result<()> {
    // SAFETY: shutdown takes plain integers; an invalid `fd` is reported as an error.
    if unsafe { libc::shutdown(fd, libc::SHUT_WR) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Puts a descriptor in non-blocking mode (for the write end of a pipe only this crate uses:
/// the mode belongs to the open file, which every handle on it shares).
pub(crate) fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl with F_GETFL/F_SETFL takes and returns plain integers; an invalid `fd` is
    // reported as an error, not undefined behaviour.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Kills (SIGKILL) every process of the process group `pgid` (a child started with
/// `process_group(0)` leads a group of that id).
pub(crate) fn kill_group(pgid: u32) -> io::Result<()> {
    let pgid = libc::pid_t::try_from(pgid)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "not a process id"))?;
    if pgid <= 1 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a process group",
        ));
    }
    // SAFETY: kill(2) with a negative pid signals that group; no memory is involved.
    if unsafe { libc::kill(-pgid, libc::SIGKILL) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Renames the calling thread as the system shows it (`/proc/self/task/*/comm`, `top -H`,
/// debuggers), cut to the 15 bytes Linux keeps; elsewhere it does nothing.
pub(crate) fn set_thread_name(name: &str) {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        let mut buf = [0u8; 16];
        let n = name.len().min(15);
        buf[..n].copy_from_slice(&name.as_bytes()[..n]);
        // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes; `buf` is one.
        unsafe {
            libc::prctl(libc::PR_SET_NAME, buf.as_ptr() as libc::c_ulong, 0, 0, 0);
        }
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let _ = name;
}

/// Raises this process's soft limit on open file descriptors to its hard limit, as Go's
/// runtime does: the common soft default (1,024) is far below what a server of many
/// connections needs, and the hard limit is the administrator's actual bound. Returns the soft
/// limit before and after.
#[allow(clippy::unnecessary_cast)] // rlim_t is u64 on Linux, not everywhere
pub(crate) fn raise_nofile_limit() -> io::Result<(u64, u64)> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `r` is a valid rlimit for getrlimit to fill.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let before = r.rlim_cur as u64;
    // An unlimited hard limit cannot be a soft one (the kernel caps descriptors at nr_open).
    let target = if r.rlim_max == libc::RLIM_INFINITY {
        1 << 20
    } else {
        r.rlim_max
    };
    if r.rlim_cur >= target {
        return Ok((before, before));
    }
    let raised = libc::rlimit {
        rlim_cur: target,
        rlim_max: r.rlim_max,
    };
    // SAFETY: `raised` is a valid rlimit; setrlimit only reads it.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((before, target as u64))
}

/// Gives the whole pages of `buf`, a buffer about to be freed, back to the kernel
/// (`madvise(MADV_DONTNEED)`; its bytes read as zeros afterwards). The allocator keeps freed
/// memory resident for reuse, so without this a receive buffer dropped when its connection goes
/// quiet would go on costing its pages. Best effort: an error leaves the pages as they were.
pub(crate) fn release_pages(buf: &mut [u8]) {
    // SAFETY: sysconf has no preconditions.
    let page = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        p if p > 0 => p as usize,
        _ => return,
    };
    let start = buf.as_mut_ptr() as usize;
    let first = start.next_multiple_of(page);
    let end = (start + buf.len()) / page * page;
    if end > first {
        // SAFETY: [first, end) lies within `buf`, which the caller lends us exclusively; on
        // private anonymous memory (the heap) MADV_DONTNEED only makes those pages read as
        // zeros from now on.
        unsafe {
            libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_DONTNEED);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::io::AsRawFd;

    #[test]
    fn readable_now_tells_input_and_the_end_of_the_stream_without_waiting() {
        let (mut a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(!readable_now(b.as_raw_fd()), "nothing sent yet");
        a.write_all(b"x").unwrap();
        assert!(readable_now(b.as_raw_fd()), "a byte waits");
        let mut one = [0u8; 1];
        assert_eq!(recv_nowait(b.as_raw_fd(), &mut one).unwrap(), 1);
        assert!(!readable_now(b.as_raw_fd()), "the byte was taken");
        drop(a);
        assert!(
            readable_now(b.as_raw_fd()),
            "the end of the stream is input"
        );
    }

    #[test]
    fn poll_reports_readable_and_times_out() {
        let (mut a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let t = std::time::Instant::now();
        assert_eq!(
            wait_fd(b.as_raw_fd(), POLLIN, Some(Duration::from_millis(30))).unwrap(),
            0
        );
        assert!(t.elapsed() >= Duration::from_millis(25));
        a.write_all(b"x").unwrap();
        let r = wait_fd(b.as_raw_fd(), POLLIN, Some(Duration::from_secs(5))).unwrap();
        assert_ne!(r & POLLIN, 0);
        assert_ne!(
            wait_fd(a.as_raw_fd(), POLLOUT, Some(Duration::from_secs(5))).unwrap() & POLLOUT,
            0
        );
    }
}
