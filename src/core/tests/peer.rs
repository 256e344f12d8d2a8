//! The test playing the peer: it speaks raw frames to one [`Connection`] over the in-memory
//! pipe, so it decides exactly what arrives and when, and sees every byte the connection sends.

use super::pipe::{self, Pipe, Timeouts};
use crate::base::threads::ThreadSet;
use crate::core::config::Config;
use crate::core::connection::{Connection, Pending, Shared};
use crate::core::service::Service;
use crate::wire::{self, codec, Frame, Hello, Kind, OutFrame, HELLO_LEN};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::sync::Arc;
use std::thread::ThreadId;
use std::time::{Duration, Instant};

/// A bound on waits that only a broken connection reaches: a failing test fails instead of
/// hanging. Passing tests never wait this long.
pub(crate) const LONG: Duration = Duration::from_secs(10);

pub(crate) struct Peer {
    /// What the connection sends.
    pub(crate) from_conn: Arc<Pipe>,
    /// What this peer sends to the connection.
    pub(crate) to_conn: Arc<Pipe>,
}

/// Establishes a connection serving `service` with the test as its peer (both pipes hold
/// 1 MiB, so nobody waits for room unless a test shrinks them).
pub(crate) fn connect(config: &Config, service: Service, timeouts: Timeouts) -> (Connection, Peer) {
    let peer = Peer {
        from_conn: Pipe::new(1 << 20),
        to_conn: Pipe::new(1 << 20),
    };
    // Both sides send their hello first; ours waits in the pipe.
    let ours = Hello {
        version: wire::VERSION,
        flags: 0,
        max_frame: 1 << 20,
        max_queued: 1024,
    };
    peer.to_conn.write_all(&ours.encode()).unwrap();
    let t = pipe::transport(peer.to_conn.clone(), peer.from_conn.clone(), timeouts);
    let conn = Connection::establish(t, config, service, ThreadSet::new()).expect("handshake");
    let mut theirs = [0; HELLO_LEN];
    peer.from_conn
        .read_exact_until(&mut theirs, Instant::now() + LONG)
        .unwrap();
    Hello::decode(&theirs).expect("the connection's hello");
    (conn, peer)
}

/// The bytes of a frame, as a peer sends it.
pub(crate) fn frame_bytes<T: Serialize + ?Sized>(
    kind: Kind,
    id: u64,
    parent: u64,
    method: &str,
    payload: &T,
) -> Vec<u8> {
    let mut out = OutFrame::new(method.len());
    codec::encode_into(out.payload(), payload).unwrap();
    out.seal(kind, id, parent, 0, method).unwrap();
    out.bytes().to_vec()
}

/// A frame as the connection's reader hands it to `route`.
pub(crate) fn frame<T: Serialize + ?Sized>(
    kind: Kind,
    id: u64,
    parent: u64,
    method: &str,
    payload: &T,
) -> Frame {
    Frame::parse(frame_bytes(kind, id, parent, method, payload)[4..].to_vec()).unwrap()
}

/// A payload carrying a reference to object `id` of the receiver's peer, as the wire spells it.
pub(crate) fn object_ref(id: u64) -> std::collections::BTreeMap<&'static str, u64> {
    [("$rpyc-obj", id)].into()
}

pub(crate) fn decode<T: DeserializeOwned>(f: &Frame) -> T {
    codec::decode(f.payload()).expect("payload of the expected type")
}

impl Peer {
    /// Sends one frame; fails once the connection has shut the pipe down.
    pub(crate) fn send<T: Serialize + ?Sized>(
        &self,
        kind: Kind,
        id: u64,
        parent: u64,
        method: &str,
        payload: &T,
    ) -> std::io::Result<()> {
        self.to_conn
            .write_all(&frame_bytes(kind, id, parent, method, payload))
    }

    /// Calls `method` of the connection's root service as request `id`, nested in the
    /// connection's request `parent` (0: none).
    pub(crate) fn call<A: Serialize>(&self, id: u64, parent: u64, method: &str, args: &A) {
        self.send(Kind::Call, id, parent, method, args).unwrap();
    }

    /// Replies to the connection's request `id`.
    pub(crate) fn reply<T: Serialize + ?Sized>(&self, id: u64, value: &T) {
        self.send(Kind::Reply, id, 0, "", value).unwrap();
    }

    /// The next frame the connection sends (within [`LONG`]).
    pub(crate) fn recv(&self) -> Frame {
        let deadline = Instant::now() + LONG;
        let mut len = [0; 4];
        self.from_conn.read_exact_until(&mut len, deadline).unwrap();
        let mut body = vec![0; u32::from_be_bytes(len) as usize];
        self.from_conn
            .read_exact_until(&mut body, deadline)
            .unwrap();
        Frame::parse(body).unwrap()
    }

    /// The next frame, which must be a request for `method`.
    pub(crate) fn recv_call(&self, method: &str) -> Frame {
        let f = self.recv();
        assert_eq!(
            (f.header.kind, f.method()),
            (Kind::Call, method),
            "expected a call to {method}"
        );
        f
    }

    /// The next frame, which must be the reply to our request `id`; returns its value.
    pub(crate) fn recv_reply<T: DeserializeOwned>(&self, id: u64) -> T {
        let f = self.recv();
        assert_eq!((f.header.kind, f.header.id), (Kind::Reply, id));
        decode(&f)
    }

    /// Waits until a thread is blocked reading the connection's side of the pipe (it is then
    /// the holder of the connection's reader token) and returns it.
    pub(crate) fn reading_thread(&self) -> ThreadId {
        let mut who = None;
        let found = self.to_conn.wait_until(LONG, |st| {
            who = st.blocked_reader;
            who.is_some()
        });
        assert!(found, "nobody reads the connection");
        who.unwrap()
    }

    /// Makes `caller`, a thread waiting in the synchronous call `call_id`, hold the
    /// connection's reader. A pool thread that routes a request nested in that call puts the
    /// reader back lazily for the caller, which takes it if it comes back from serving the
    /// request before a watching pool thread does; so nudge until the caller wins. The
    /// nudges are calls of `noop` (no arguments).
    pub(crate) fn hand_reader_to(&self, caller: ThreadId, call_id: u64) {
        for nudge in 0..200 {
            if self.reading_thread() == caller {
                return;
            }
            let id = 1_000_000 + nudge;
            self.call(id, call_id, "noop", &());
            self.recv_reply::<()>(id);
        }
        panic!("the caller never took the reader");
    }
}

/// Registers a call of ours in the pending table as `send_request` does for a real one (the
/// request itself goes to the peer's pipe): `sync` callers run nested requests.
pub(crate) fn register(shared: &Arc<Shared>, method: &str, sync: bool) -> Pending {
    let deadline = Instant::now() + LONG;
    shared
        .send_request(0, method, &(), Kind::Call, sync, deadline, LONG)
        .unwrap()
        .expect("a call expects a reply")
}

/// Closes the connection and checks that every thread it started ends.
pub(crate) fn finish(conn: Connection) {
    conn.close();
    let threads = conn.shared.threads.clone();
    drop(conn);
    assert!(threads.join(LONG), "a thread of the connection did not end");
}
