//! The context a thread carries while it works for a connection, which serde's callbacks
//! (`Serialize` of a [`Service`](crate::Service), `Deserialize` of a
//! [`RemoteObject`](crate::RemoteObject)) cannot be handed as an argument: which connection
//! objects are exported to or imported from, which of the peer's requests the thread is
//! serving (so that calls it makes name it as their parent), and, while a decode runs, which
//! object ids it imported.
//!
//! It is this layer's one thread-local, and it changes only through a [`Scope`], a guard that
//! undoes its change when dropped, also when user code panics, so that context can never leak
//! from one call into another. Scopes nest: a handler serving a request may call the peer,
//! whose callback runs on the same thread in a scope of its own. (The codec keeps two
//! thread-locals of its own, private to it, to hand a detached byte string to the decode of
//! its frame; see [`crate::wire::codec`].)

use crate::core::connection::Shared;
use std::cell::RefCell;
use std::sync::Arc;

#[derive(Default)]
struct ThreadContext {
    /// The connection whose values this thread is encoding or decoding.
    connection: Option<Arc<Shared>>,
    /// The requests this thread is serving, as (connection id, request id), innermost last.
    serving: Vec<(u64, u64)>,
    /// Object ids imported by the decode running on this thread, while one is recorded.
    imported: Option<Vec<u64>>,
}

thread_local! {
    static CONTEXT: RefCell<ThreadContext> = RefCell::new(ThreadContext::default());
}

fn with<T>(f: impl FnOnce(&mut ThreadContext) -> T) -> T {
    CONTEXT.with(|c| f(&mut c.borrow_mut()))
}

/// A change to this thread's context, undone when dropped.
#[must_use = "the change is undone when the scope is dropped"]
pub(crate) struct Scope {
    undo: Undo,
}

enum Undo {
    Connection(Option<Arc<Shared>>),
    Serving,
    Imported(Option<Vec<u64>>),
    /// Already undone (by [`Scope::finish_imports`]).
    Nothing,
}

impl Scope {
    /// Values encoded or decoded meanwhile belong to `shared`.
    pub(crate) fn connection(shared: &Arc<Shared>) -> Scope {
        let outer = with(|c| c.connection.replace(shared.clone()));
        Scope {
            undo: Undo::Connection(outer),
        }
    }

    /// The thread serves request `id` of `shared` meanwhile: calls it makes on that connection
    /// name `id` as their parent, so the peer runs them on the thread waiting for `id`.
    pub(crate) fn serving(shared: &Arc<Shared>, id: u64) -> Scope {
        with(|c| c.serving.push((shared.id, id)));
        Scope {
            undo: Undo::Serving,
        }
    }

    /// Records the object ids imported meanwhile (see [`finish_imports`](Self::finish_imports)).
    pub(crate) fn recording_imports() -> Scope {
        let outer = with(|c| c.imported.replace(Vec::new()));
        Scope {
            undo: Undo::Imported(outer),
        }
    }

    /// Ends a [`recording_imports`](Self::recording_imports) scope; returns the ids imported
    /// meanwhile, once per receipt.
    pub(crate) fn finish_imports(mut self) -> Vec<u64> {
        match std::mem::replace(&mut self.undo, Undo::Nothing) {
            Undo::Imported(outer) => {
                with(|c| std::mem::replace(&mut c.imported, outer)).unwrap_or_default()
            }
            other => {
                self.undo = other;
                debug_assert!(false, "finish_imports on a scope that does not record them");
                Vec::new()
            }
        }
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        match std::mem::replace(&mut self.undo, Undo::Nothing) {
            Undo::Connection(outer) => with(|c| c.connection = outer),
            Undo::Serving => {
                let popped = with(|c| c.serving.pop());
                debug_assert!(popped.is_some(), "scopes are undone in reverse order");
            }
            Undo::Imported(outer) => with(|c| c.imported = outer),
            Undo::Nothing => {}
        }
    }
}

/// The connection this thread encodes or decodes for, if any.
pub(crate) fn connection() -> Option<Arc<Shared>> {
    with(|c| c.connection.clone())
}

/// The request of connection `conn` this thread is serving, innermost, or 0.
pub(crate) fn serving_parent(conn: u64) -> u64 {
    with(|c| {
        c.serving
            .iter()
            .rev()
            .find(|(cid, _)| *cid == conn)
            .map_or(0, |(_, id)| *id)
    })
}

/// Notes that the decode running on this thread imported object `id` (if it is recorded).
pub(crate) fn note_import(id: u64) {
    with(|c| {
        if let Some(log) = c.imported.as_mut() {
            log.push(id);
        }
    })
}
