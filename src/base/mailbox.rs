//! A one-reader mailbox: how a reply (or a request nested in a call) reaches the thread that
//! waits for it.
//!
//! Unlike a general channel, a waiting reader does not spin before it sleeps: it parks at once
//! and the sender unparks it (no system call when it is not parked yet). On two cores, callers
//! spinning for replies took CPU from the threads that produce them. At most one thread waits
//! at a time (callers hold their call's lock while waiting); another thread that waits anyway
//! is only woken by its own deadline.

use crate::base::lock;
use crate::base::spin::Slots;
pub(crate) use crossbeam_channel::{RecvTimeoutError, TryRecvError};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::thread::{self, Thread};
use std::time::Instant;

struct State<T> {
    items: VecDeque<T>,
    /// The sender is gone: once `items` is empty, nothing more will come.
    closed: bool,
    /// The thread parked waiting, if any.
    waiter: Option<Thread>,
}

type Shared<T> = Arc<Mutex<State<T>>>;

/// The sending half; dropping it tells the receiver nothing more will come.
pub(crate) struct Sender<T>(Shared<T>);

/// The receiving half.
pub(crate) struct Receiver<T>(Shared<T>);

/// A new mailbox.
pub(crate) fn mailbox<T>() -> (Sender<T>, Receiver<T>) {
    let s = Arc::new(Mutex::new(State {
        items: VecDeque::new(),
        closed: false,
        waiter: None,
    }));
    (Sender(s.clone()), Receiver(s))
}

impl<T> Sender<T> {
    /// Delivers `item`; never waits (beyond the mailbox's own short lock).
    pub(crate) fn send(&self, item: T) {
        let waiter = {
            let mut st = lock(&self.0);
            st.items.push_back(item);
            st.waiter.take()
        };
        if let Some(t) = waiter {
            t.unpark();
        }
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        let waiter = {
            let mut st = lock(&self.0);
            st.closed = true;
            st.waiter.take()
        };
        if let Some(t) = waiter {
            t.unpark();
        }
    }
}

impl<T> Receiver<T> {
    /// The next item, if one is there.
    pub(crate) fn try_recv(&self) -> Result<T, TryRecvError> {
        let mut st = lock(&self.0);
        match st.items.pop_front() {
            Some(item) => Ok(item),
            None if st.closed => Err(TryRecvError::Disconnected),
            None => Err(TryRecvError::Empty),
        }
    }

    /// Whether no item waits.
    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        lock(&self.0).items.is_empty()
    }

    /// The next item, waiting for it until `deadline` (`None`: without a bound).
    fn wait(&self, deadline: Option<Instant>) -> Result<T, RecvTimeoutError> {
        loop {
            {
                let mut st = lock(&self.0);
                if let Some(item) = st.items.pop_front() {
                    st.waiter = None;
                    return Ok(item);
                }
                if st.closed {
                    return Err(RecvTimeoutError::Disconnected);
                }
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    st.waiter = None;
                    return Err(RecvTimeoutError::Timeout);
                }
                st.waiter = Some(thread::current());
            }
            // An unpark between the unlock and here is kept: the park returns at once.
            match deadline {
                Some(d) => thread::park_timeout(d.saturating_duration_since(Instant::now())),
                None => thread::park(),
            }
        }
    }

    /// The next item, waiting until `deadline`.
    pub(crate) fn recv_deadline(&self, deadline: Instant) -> Result<T, RecvTimeoutError> {
        self.wait(Some(deadline))
    }

    /// Like [`recv_deadline`](Self::recv_deadline), but looks for an item for a while first
    /// (with a place from `slots`: [`crate::base::spin`]) before it parks.
    pub(crate) fn recv_deadline_spinning(
        &self,
        deadline: Instant,
        slots: &Slots,
    ) -> Result<T, RecvTimeoutError> {
        // A look never waits for the lock: the sender holds it only to push.
        slots.spin(Some(deadline), || {
            self.0
                .try_lock()
                .is_ok_and(|st| !st.items.is_empty() || st.closed)
        });
        self.wait(Some(deadline))
    }

    /// The next item, waiting as long as it takes; `None` once the sender is gone and nothing
    /// is left.
    pub(crate) fn recv(&self) -> Option<T> {
        self.wait(None).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn items_arrive_in_order_then_the_end_once_the_sender_is_gone() {
        let (tx, rx) = mailbox();
        tx.send(1);
        tx.send(2);
        assert_eq!(rx.try_recv(), Ok(1));
        drop(tx);
        assert_eq!(rx.recv(), Some(2));
        assert_eq!(rx.recv(), None);
        assert_eq!(rx.try_recv(), Err(TryRecvError::Disconnected));
    }

    #[test]
    fn a_parked_receiver_wakes_for_an_item_and_for_the_senders_end() {
        let (tx, rx) = mailbox::<u32>();
        let t = thread::spawn(move || {
            thread::sleep(Duration::from_millis(20));
            tx.send(7);
            thread::sleep(Duration::from_millis(20));
            drop(tx);
        });
        let far = Instant::now() + Duration::from_secs(30);
        assert_eq!(rx.recv_deadline(far), Ok(7));
        assert_eq!(rx.recv_deadline(far), Err(RecvTimeoutError::Disconnected));
        t.join().unwrap();
    }

    #[test]
    fn a_receiver_that_looks_before_it_parks_gets_its_item_or_the_senders_end_or_its_deadline() {
        let slots = Slots::new(1);
        let (tx, rx) = mailbox::<u32>();
        let far = Instant::now() + Duration::from_secs(30);
        // Sent while it looks, or after it parked: either way it arrives.
        let t = thread::spawn(move || {
            tx.send(7);
            thread::sleep(Duration::from_millis(20));
            tx.send(8);
            thread::sleep(Duration::from_millis(20));
            drop(tx);
        });
        assert_eq!(rx.recv_deadline_spinning(far, &slots), Ok(7));
        assert_eq!(rx.recv_deadline_spinning(far, &slots), Ok(8));
        assert_eq!(
            rx.recv_deadline_spinning(far, &slots),
            Err(RecvTimeoutError::Disconnected)
        );
        t.join().unwrap();
        let (_tx, rx) = mailbox::<u32>();
        let soon = Instant::now() + Duration::from_millis(5);
        assert_eq!(
            rx.recv_deadline_spinning(soon, &slots),
            Err(RecvTimeoutError::Timeout)
        );
        assert!(Instant::now() >= soon);
    }

    #[test]
    fn a_receiver_gives_up_at_its_deadline() {
        let (_tx, rx) = mailbox::<u32>();
        let wait = Duration::from_millis(50);
        let start = Instant::now();
        assert_eq!(
            rx.recv_deadline(start + wait),
            Err(RecvTimeoutError::Timeout)
        );
        assert!(start.elapsed() >= wait);
    }
}
