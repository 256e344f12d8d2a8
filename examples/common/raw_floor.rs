//! The raw floor of the benchmarks: a blocking TCP echo server and clients with
//! length-prefixed frames, the same code for `examples/bench.rs` and `benches/peers` (each
//! includes this file with `#[path]`), so both measure against the same floor; and the rpyc
//! echo server and call both measure.

use std::io::{self, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc;
use std::thread;

const HOST: &str = "127.0.0.1";

/// Starts a raw echo server: one thread per connection, whole frame in, whole frame out.
pub fn raw_server() -> io::Result<u16> {
    let listener = TcpListener::bind((HOST, 0))?;
    let port = listener.local_addr()?.port();
    thread::Builder::new()
        .name("raw-accept".into())
        .spawn(move || {
            for s in listener.incoming().flatten() {
                let _ = thread::Builder::new()
                    .name("raw-conn".into())
                    .spawn(move || raw_serve(s));
            }
        })?;
    Ok(port)
}

fn raw_serve(s: TcpStream) -> io::Result<()> {
    s.set_nodelay(true)?;
    let mut r = BufReader::with_capacity(64 << 10, s.try_clone()?);
    let mut w = s;
    // [length | payload], reused: the reply is written with a single write_all.
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let mut len = [0u8; 4];
        match r.read_exact(&mut len) {
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            other => other?,
        }
        let n = u32::from_be_bytes(len) as usize;
        buf.resize(4 + n, 0);
        buf[..4].copy_from_slice(&len);
        read_chunked(&mut r, &mut buf[4..])?;
        w.write_all(&buf)?;
    }
}

/// Fills `buf` with reads of at most 64 KiB. On Linux loopback this is up to 3x faster for
/// a 1 MiB message than one `read_exact` of the whole buffer (measured while writing this
/// bench), so the floor uses it.
fn read_chunked(r: &mut impl Read, buf: &mut [u8]) -> io::Result<()> {
    for chunk in buf.chunks_mut(64 << 10) {
        r.read_exact(chunk)?;
    }
    Ok(())
}

/// A length-prefixed frame holding `payload`.
pub fn frame(payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(4 + payload.len());
    f.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    f.extend_from_slice(payload);
    f
}

struct RawReader {
    r: BufReader<TcpStream>,
    buf: Vec<u8>,
}

impl RawReader {
    /// Reads one frame into the reused buffer; returns its payload length.
    fn recv(&mut self) -> io::Result<usize> {
        let mut len = [0u8; 4];
        self.r.read_exact(&mut len)?;
        let n = u32::from_be_bytes(len) as usize;
        self.buf.resize(n, 0);
        read_chunked(&mut self.r, &mut self.buf)?;
        Ok(n)
    }
}

/// A raw client connection.
pub struct RawConn {
    w: TcpStream,
    rd: RawReader,
}

impl RawConn {
    /// The payload of the last reply.
    pub fn reply(&self) -> &[u8] {
        &self.rd.buf
    }

    pub fn connect(port: u16) -> io::Result<RawConn> {
        let s = TcpStream::connect((HOST, port))?;
        s.set_nodelay(true)?;
        let r = BufReader::with_capacity(64 << 10, s.try_clone()?);
        Ok(RawConn {
            w: s,
            rd: RawReader { r, buf: Vec::new() },
        })
    }

    /// Writes a whole prebuilt frame, then reads the whole reply.
    pub fn call(&mut self, frame: &[u8]) -> io::Result<usize> {
        self.w.write_all(frame)?;
        self.rd.recv()
    }
}

/// A raw client that pipelines: the caller writes frames, a reader thread reads replies and
/// reports each full window (the shape of rpyc's client: callers write, one thread reads).
pub struct RawPipe {
    w: TcpStream,
    windows: mpsc::Receiver<io::Result<()>>,
}

impl RawPipe {
    pub fn connect(port: u16, window: usize) -> io::Result<RawPipe> {
        let c = RawConn::connect(port)?;
        let mut rd = c.rd;
        let (tx, rx) = mpsc::channel();
        thread::Builder::new()
            .name("raw-pipe-reader".into())
            .spawn(move || loop {
                let mut result = Ok(());
                for _ in 0..window {
                    if let Err(e) = rd.recv() {
                        result = Err(e);
                        break;
                    }
                }
                let failed = result.is_err();
                if tx.send(result).is_err() || failed {
                    return;
                }
            })?;
        Ok(RawPipe {
            w: c.w,
            windows: rx,
        })
    }

    /// Sends one window of frames (one write each, like one rpyc call each), waits for replies.
    pub fn window(&mut self, frame: &[u8], n: usize) -> io::Result<()> {
        for _ in 0..n {
            self.w.write_all(frame)?;
        }
        self.windows
            .recv()
            .map_err(|_| io::Error::other("reader thread ended"))?
    }
}

impl Drop for RawPipe {
    fn drop(&mut self) {
        // Ends the reader thread and the server's thread for this connection.
        let _ = self.w.shutdown(std::net::Shutdown::Both);
    }
}

// ---------------------------------------------------------------------------------------------
// rpyc: the side measured against the floor, the same in both benchmarks.

/// Starts an rpyc `ThreadedServer` serving `echo(Bytes) -> Bytes` with frames of up to
/// `max_frame` bytes; its port and handle.
pub fn rpyc_server(max_frame: usize) -> Result<(u16, rpyc::ServerHandle), rpyc::Error> {
    let service = rpyc::Service::new("bench").method("echo", |b: rpyc::Bytes| b);
    let server = rpyc::ThreadedServer::new(service)
        .hostname(HOST)
        .port(0)
        .max_frame_size(max_frame)
        .build()?;
    let port = server.port();
    Ok((port, server.spawn()?))
}

/// Calls `echo(payload)`; the length of what came back.
pub fn rpyc_echo(conn: &rpyc::Connection, payload: &rpyc::Bytes) -> Result<usize, rpyc::Error> {
    let r: rpyc::Bytes = conn.root().call("echo", (payload,))?;
    Ok(std::hint::black_box(r).len())
}
