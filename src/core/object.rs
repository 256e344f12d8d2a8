//! Remote objects (RPyC's netrefs): handles to objects that live on the peer, the table of
//! objects this side exported, and their reference counting.
//!
//! A [`Service`] that is serialized into a call or a result is *exported*: it goes into the
//! connection's object table under an id, and the wire carries `{"$rpyc-obj": id}`. The
//! receiver turns that into a [`RemoteObject`]. Each time the same object is sent, its count in
//! the table goes up; each handle on the receiving side counts how many times its id arrived,
//! and when its last clone is dropped it sends that count back in a release message. The owner
//! subtracts it and drops the object at zero. Counting arrivals (not handles) makes a release
//! that crosses a new send of the same object harmless. Tables are per connection: an id means
//! nothing on another connection, and closing a connection drops everything it exported.

use crate::base::lock;
use crate::core::connection::{self, Connection, Pending, Shared};
use crate::core::context;
use crate::core::service::{Args, Service};
use crate::error::{Error, Timeout};
use crate::wire::{Frame, Kind};
use serde::de::{DeserializeOwned, Error as _};
use serde::ser::{Error as _, SerializeMap};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The method a [`crate::callback`] answers to.
pub(crate) const CALL_METHOD: &str = "__call__";
/// The key of an object reference on the wire.
const OBJ_KEY: &str = "$rpyc-obj";
/// Most objects one connection may have exported at once (a peer that never releases must not
/// grow the table without bound).
const MAX_EXPORTED: usize = 1 << 20;

/// Releases the object references in a payload that will never be decoded (a call to an
/// unknown method or object, a late or abandoned reply), so their owner can drop them.
pub(crate) fn release_unread(shared: &Arc<Shared>, payload: &[u8]) {
    shared.queue_releases(crate::wire::codec::object_refs(payload, OBJ_KEY));
}

/// Releases the object references in a payload whose decode failed, except those the decode
/// turned into handles (`imported`): those handles were dropped and released themselves.
pub(crate) fn release_unread_except(shared: &Arc<Shared>, payload: &[u8], mut imported: Vec<u64>) {
    imported.sort_unstable();
    let unread = crate::wire::codec::object_refs(payload, OBJ_KEY)
        .into_iter()
        .filter_map(|(id, count)| {
            let from = imported.partition_point(|&i| i < id);
            let handled = imported[from..].iter().take_while(|&&i| i == id).count() as u64;
            (count > handled).then(|| (id, count - handled))
        });
    shared.queue_releases(unread);
}

/// Objects this side exported on one connection, with the number of references sent.
#[derive(Default)]
pub(crate) struct ObjectTable {
    by_id: HashMap<u64, (Service, u64)>,
    by_ptr: HashMap<usize, u64>,
    next: u64,
}

impl ObjectTable {
    fn export(&mut self, s: &Service) -> Result<u64, String> {
        let ptr = Arc::as_ptr(&s.inner) as usize;
        if let Some(&id) = self.by_ptr.get(&ptr) {
            if let Some(entry) = self.by_id.get_mut(&id) {
                entry.1 += 1;
                return Ok(id);
            }
        }
        if self.by_id.len() >= MAX_EXPORTED {
            return Err(format!(
                "this connection already exports {MAX_EXPORTED} objects the peer never released"
            ));
        }
        self.next += 1;
        let id = self.next;
        self.by_id.insert(id, (s.clone(), 1));
        self.by_ptr.insert(ptr, id);
        Ok(id)
    }

    pub(crate) fn get(&self, id: u64) -> Option<Service> {
        self.by_id.get(&id).map(|(s, _)| s.clone())
    }

    /// Applies releases; returns the objects that reached zero, for the caller to drop
    /// outside the lock.
    pub(crate) fn release(&mut self, list: &[(u64, u64)]) -> Vec<Service> {
        let mut dropped = Vec::new();
        for &(id, count) in list {
            let Some(entry) = self.by_id.get_mut(&id) else {
                log::debug!("release of unknown object {id} ignored");
                continue;
            };
            entry.1 = entry.1.saturating_sub(count);
            if entry.1 == 0 {
                let (s, _) = self.by_id.remove(&id).expect("entry exists");
                self.by_ptr.remove(&(Arc::as_ptr(&s.inner) as usize));
                dropped.push(s);
            }
        }
        dropped
    }
}

/// Sent inside a call or a result, a `Service` is exported by reference; see the module docs.
impl Serialize for Service {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let shared = context::connection().ok_or_else(|| {
            S::Error::custom("a Service can only be serialized into an rpyc call or result")
        })?;
        if shared.is_closed() {
            return Err(S::Error::custom("the connection is closed"));
        }
        let id = lock(&shared.objects)
            .export(self)
            .map_err(S::Error::custom)?;
        let mut m = s.serialize_map(Some(1))?;
        m.serialize_entry(OBJ_KEY, &id)?;
        m.end()
    }
}

/// A handle to an object that lives on the peer: its root service
/// ([`Connection::root`]), an object a handler returned, or a callback the peer passed.
///
/// Calls run on the peer, on that object. Clones share one reference; when the last clone is
/// dropped the peer is told, and drops the object once no other handle refers to it. A handle
/// keeps its connection open. Receive one as an argument or result type like any other serde
/// type.
///
/// ```
/// # let (server, port) = rpyc::testing::example_server()?;
/// # let conn = rpyc::connect("127.0.0.1", port)?;
/// let counter: rpyc::RemoteObject = conn.root().call("new_counter", ())?;
/// let n: i64 = counter.call("incr", (5,))?;
/// drop(counter); // the server's counter object is dropped now
/// # Ok::<(), rpyc::Error>(())
/// ```
#[derive(Clone)]
pub struct RemoteObject {
    inner: Arc<RemoteInner>,
}

pub(crate) struct RemoteInner {
    conn: Connection,
    id: u64,
    received: AtomicU64,
}

impl Drop for RemoteInner {
    fn drop(&mut self) {
        if self.id == 0 {
            return;
        }
        let shared = &self.conn.shared;
        {
            let mut remotes = lock(&shared.remotes);
            if remotes
                .get(&self.id)
                .is_some_and(|w| std::ptr::eq(w.as_ptr(), self as *const RemoteInner))
            {
                remotes.remove(&self.id);
            }
        }
        shared.queue_release(self.id, self.received.load(Ordering::Acquire));
    }
}

impl std::fmt::Debug for RemoteObject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteObject")
            .field("id", &self.inner.id)
            .field("peer", &self.inner.conn.peer())
            .finish()
    }
}

impl<'de> Deserialize<'de> for RemoteObject {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<RemoteObject, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Ref {
            #[serde(rename = "$rpyc-obj")]
            id: u64,
        }
        let r = Ref::deserialize(d)?;
        let shared = context::connection().ok_or_else(|| {
            D::Error::custom("a RemoteObject can only be received in an rpyc call or result")
        })?;
        if r.id == 0 {
            return Err(D::Error::custom(
                "object id 0 is reserved for the root service",
            ));
        }
        Ok(RemoteObject::import(&shared, r.id))
    }
}

impl RemoteObject {
    pub(crate) fn root(conn: Connection) -> RemoteObject {
        RemoteObject {
            inner: Arc::new(RemoteInner {
                conn,
                id: 0,
                received: AtomicU64::new(0),
            }),
        }
    }

    fn import(shared: &Arc<Shared>, id: u64) -> RemoteObject {
        context::note_import(id);
        let mut remotes = lock(&shared.remotes);
        if let Some(inner) = remotes.get(&id).and_then(|w| w.upgrade()) {
            inner.received.fetch_add(1, Ordering::AcqRel);
            drop(remotes);
            return RemoteObject { inner };
        }
        let inner = Arc::new(RemoteInner {
            conn: Connection::from_shared(shared.clone()),
            id,
            received: AtomicU64::new(1),
        });
        remotes.insert(id, Arc::downgrade(&inner));
        RemoteObject { inner }
    }

    fn shared(&self) -> &Arc<Shared> {
        &self.inner.conn.shared
    }

    /// The object's id on its connection (0 for the peer's root service).
    pub fn id(&self) -> u64 {
        self.inner.id
    }

    /// The connection this object lives on.
    pub fn connection(&self) -> &Connection {
        &self.inner.conn
    }

    /// Calls `method` with `args` (a tuple) and waits for the result, up to the connection's
    /// call timeout. Requests the peer makes on behalf of this call (callbacks) run on this
    /// thread while it waits.
    ///
    /// ```
    /// # let (server, port) = rpyc::testing::example_server()?;
    /// # let conn = rpyc::connect("127.0.0.1", port)?;
    /// let sum: i64 = conn.root().call("add", (1, 2))?;
    /// # Ok::<(), rpyc::Error>(())
    /// ```
    pub fn call<R: DeserializeOwned, A: Args>(&self, method: &str, args: A) -> Result<R, Error> {
        let shared = self.shared();
        connection::call(shared, self.inner.id, method, &args, shared.call_timeout)
    }

    /// Like [`call`](RemoteObject::call) with its own timeout. A timed-out call returns
    /// [`Error::Timeout`]; the connection stays usable and the late reply is dropped.
    ///
    /// ```
    /// # let (server, port) = rpyc::testing::example_server()?;
    /// # let conn = rpyc::connect("127.0.0.1", port)?;
    /// use std::time::Duration;
    /// let r: Result<(), _> = conn.root().call_timeout("sleep", (1.0,), Duration::from_millis(50));
    /// assert!(matches!(r, Err(rpyc::Error::Timeout(_))));
    /// # Ok::<(), rpyc::Error>(())
    /// ```
    pub fn call_timeout<R: DeserializeOwned, A: Args>(
        &self,
        method: &str,
        args: A,
        timeout: Duration,
    ) -> Result<R, Error> {
        connection::call(self.shared(), self.inner.id, method, &args, timeout)
    }

    /// Like [`call`](RemoteObject::call), giving up at `deadline` (for several calls that share
    /// one time budget). A call past its deadline returns [`Error::Timeout`], as for
    /// [`call_timeout`](RemoteObject::call_timeout).
    ///
    /// ```
    /// # let (server, port) = rpyc::testing::example_server()?;
    /// # let conn = rpyc::connect("127.0.0.1", port)?;
    /// use std::time::{Duration, Instant};
    /// let budget = Instant::now() + Duration::from_secs(2);
    /// let a: i64 = conn.root().call_deadline("add", (1, 2), budget)?;
    /// let b: i64 = conn.root().call_deadline("add", (a, 3), budget)?;
    /// assert_eq!(b, 6);
    /// # Ok::<(), rpyc::Error>(())
    /// ```
    pub fn call_deadline<R: DeserializeOwned, A: Args>(
        &self,
        method: &str,
        args: A,
        deadline: Instant,
    ) -> Result<R, Error> {
        let timeout = deadline.saturating_duration_since(Instant::now());
        connection::call_until(
            self.shared(),
            self.inner.id,
            method,
            &args,
            deadline,
            timeout,
        )
    }

    /// Sends the call and returns at once; the result is collected later from the
    /// [`AsyncResult`]. Many async calls may be in flight on one connection.
    ///
    /// ```
    /// # let (server, port) = rpyc::testing::example_server()?;
    /// # let conn = rpyc::connect("127.0.0.1", port)?;
    /// let pending = conn.root().call_async::<i64, _>("add", (1, 2))?;
    /// // ... other work ...
    /// assert_eq!(pending.value()?, 3);
    /// # Ok::<(), rpyc::Error>(())
    /// ```
    pub fn call_async<R: DeserializeOwned, A: Args>(
        &self,
        method: &str,
        args: A,
    ) -> Result<AsyncResult<R>, Error> {
        let p = self
            .send_unwaited(method, &args, Kind::Call)?
            .expect("a call expects a reply");
        Ok(AsyncResult {
            conn: self.inner.conn.clone(),
            pending: p,
            target: self.inner.id,
            method: method.to_string(),
            reply: Mutex::new(None),
            done: false,
            _result: PhantomData,
        })
    }

    /// Sends the call and expects no reply: returns once it is written. Failures on the peer
    /// are only logged there.
    ///
    /// ```
    /// # let (server, port) = rpyc::testing::example_server()?;
    /// # let conn = rpyc::connect("127.0.0.1", port)?;
    /// conn.root().call_oneway("log", ("hello",))?;
    /// # Ok::<(), rpyc::Error>(())
    /// ```
    pub fn call_oneway<A: Args>(&self, method: &str, args: A) -> Result<(), Error> {
        self.send_unwaited(method, &args, Kind::Oneway).map(|_| ())
    }

    /// Sends a call nobody waits for now (async or oneway), within the connection's call
    /// timeout; its pending entry, for a call.
    fn send_unwaited<A: Args>(
        &self,
        method: &str,
        args: &A,
        kind: Kind,
    ) -> Result<Option<Pending>, Error> {
        let shared = self.shared();
        let timeout = shared.call_timeout;
        let deadline = crate::base::deadline(timeout);
        shared.send_request(self.inner.id, method, args, kind, false, deadline, timeout)
    }

    /// Calls a callback object (one made with [`crate::callback`]).
    ///
    /// ```
    /// let svc = rpyc::Service::new("events").method("subscribe", |cb: rpyc::RemoteObject| {
    ///     cb.invoke::<(), _>(("subscribed",))
    /// });
    /// # drop(svc);
    /// ```
    pub fn invoke<R: DeserializeOwned, A: Args>(&self, args: A) -> Result<R, Error> {
        self.call(CALL_METHOD, args)
    }
}

/// The future result of [`RemoteObject::call_async`].
///
/// Dropping it without taking the value abandons the call: its reply is dropped on arrival.
///
/// ```
/// # let (server, port) = rpyc::testing::example_server()?;
/// # let conn = rpyc::connect("127.0.0.1", port)?;
/// let calls: Vec<_> = (0..10)
///     .map(|i| conn.root().call_async::<i64, _>("add", (i, i)))
///     .collect::<Result<_, _>>()?;
/// for (i, c) in calls.into_iter().enumerate() {
///     assert_eq!(c.value()?, 2 * i as i64);
/// }
/// # Ok::<(), rpyc::Error>(())
/// ```
pub struct AsyncResult<R> {
    conn: Connection,
    pending: Pending,
    target: u64,
    method: String,
    reply: Mutex<Option<Frame>>,
    done: bool,
    _result: PhantomData<fn() -> R>,
}

impl<R: DeserializeOwned> AsyncResult<R> {
    /// Whether the reply has arrived (never blocks).
    pub fn is_ready(&self) -> bool {
        self.poll(None).is_ok()
    }

    /// Blocks until the reply arrives, up to the connection's call timeout.
    pub fn wait(&self) -> Result<(), Error> {
        self.wait_timeout(self.conn.shared.call_timeout)
    }

    /// Blocks until the reply arrives, up to `timeout`. On timeout the call is still pending:
    /// wait again, or drop the `AsyncResult` to abandon it.
    pub fn wait_timeout(&self, timeout: Duration) -> Result<(), Error> {
        self.wait_until(crate::base::deadline(timeout), timeout)
    }

    /// Blocks until the reply arrives, up to `deadline`; as [`wait_timeout`](Self::wait_timeout).
    ///
    /// ```
    /// # let (server, port) = rpyc::testing::example_server()?;
    /// # let conn = rpyc::connect("127.0.0.1", port)?;
    /// use std::time::{Duration, Instant};
    /// let pending = conn.root().call_async::<i64, _>("add", (1, 2))?;
    /// pending.wait_deadline(Instant::now() + Duration::from_secs(5))?;
    /// assert!(pending.is_ready());
    /// # Ok::<(), rpyc::Error>(())
    /// ```
    pub fn wait_deadline(&self, deadline: Instant) -> Result<(), Error> {
        self.wait_until(deadline, deadline.saturating_duration_since(Instant::now()))
    }

    fn wait_until(&self, deadline: Instant, timeout: Duration) -> Result<(), Error> {
        self.poll(Some(deadline)).map_err(|e| match e {
            Some(e) => e,
            None => Error::Timeout(Timeout::Call {
                method: connection::call_name(self.target, &self.method),
                after: timeout,
            }),
        })
    }

    /// Waits (up to the connection's call timeout) and returns the result.
    pub fn value(self) -> Result<R, Error> {
        let timeout = self.conn.shared.call_timeout;
        self.value_timeout(timeout)
    }

    /// Waits up to `timeout` and returns the result; on timeout the call is abandoned.
    pub fn value_timeout(self, timeout: Duration) -> Result<R, Error> {
        self.value_deadline(crate::base::deadline(timeout))
    }

    /// Waits until `deadline` and returns the result; past it the call is abandoned.
    ///
    /// ```
    /// # let (server, port) = rpyc::testing::example_server()?;
    /// # let conn = rpyc::connect("127.0.0.1", port)?;
    /// use std::time::{Duration, Instant};
    /// let pending = conn.root().call_async::<i64, _>("add", (20, 22))?;
    /// assert_eq!(pending.value_deadline(Instant::now() + Duration::from_secs(5))?, 42);
    /// # Ok::<(), rpyc::Error>(())
    /// ```
    pub fn value_deadline(mut self, deadline: Instant) -> Result<R, Error> {
        self.wait_deadline(deadline)?;
        let frame = lock(&self.reply).take().expect("wait succeeded");
        self.done = true;
        self.conn.shared.decode_reply(frame, &self.method)
    }

    /// `Ok` once the reply is stashed; `Err(None)` if not yet (by the deadline), `Err(Some)` if
    /// it never will.
    fn poll(&self, deadline: Option<Instant>) -> Result<(), Option<Error>> {
        // Async calls waiting to go out together go now: someone waits for a reply.
        self.conn
            .shared
            .write_handed(Some(deadline.unwrap_or_else(Instant::now)));
        let mut reply = match deadline {
            Some(_) => lock(&self.reply),
            // `ready` never blocks: while another thread waits in `wait` it holds the lock,
            // and the reply is not stashed yet.
            None => match self.reply.try_lock() {
                Ok(guard) => guard,
                Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => return Err(None),
            },
        };
        if reply.is_some() {
            return Ok(());
        }
        let got = match deadline {
            None => self.pending.rx.try_recv().map_err(|e| e.is_disconnected()),
            Some(d) => self
                .pending
                .rx
                .recv_deadline(d)
                .map_err(|e| e.is_disconnected()),
        };
        match got {
            Ok(crate::core::connection::Delivery::Reply(f)) => {
                *reply = Some(f);
                Ok(())
            }
            Ok(crate::core::connection::Delivery::Nested(f)) => {
                // Not routed to async calls; if it ever is, serve it elsewhere.
                crate::core::dispatch::submit(&self.conn.shared, f);
                Err(None)
            }
            Err(true) => Err(Some(self.conn.shared.closed_error())),
            Err(false) => Err(None),
        }
    }
}

impl<R> Drop for AsyncResult<R> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let shared = &self.conn.shared;
        let unread = lock(&self.reply)
            .take()
            .or_else(|| shared.abandon(&self.pending));
        if let Some(frame) = unread {
            release_unread(shared, frame.payload());
        }
    }
}

impl<R> std::fmt::Debug for AsyncResult<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncResult")
            .field("method", &self.method)
            .field("id", &self.pending.id)
            .finish()
    }
}
