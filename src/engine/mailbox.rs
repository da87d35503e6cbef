//! A connection's bounded delivery queue, built for fan-out.
//!
//! The dispatcher pushes one delivery per matching connection and event;
//! the connection's edge task takes them. A general-purpose channel pays
//! for features this does not need (many receivers' bookkeeping, a
//! semaphore per send, a lock-free block list) on every delivery, which is
//! what strom does most. Here a push is a short uncontended lock and a
//! `VecDeque` push, and a wake only when the taker is waiting; the taker
//! takes everything queued at once by swapping buffers, so a busy
//! connection pays one lock per batch, not per delivery.
//!
//! An empty mailbox holds no allocation, which keeps idle connections small.

use super::Delivery;
use std::collections::VecDeque;
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};

pub(crate) struct Mailbox {
    capacity: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    queued: VecDeque<Delivery>,
    /// The taker, while it waits for a delivery.
    waiting: Option<Waker>,
}

/// The mailbox already holds `capacity` deliveries.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Full;

impl Mailbox {
    pub fn new(capacity: usize) -> Self {
        Mailbox {
            capacity: capacity.max(1),
            inner: Mutex::default(),
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Queues `delivery`, or refuses it when the mailbox is full.
    pub fn push(&self, delivery: Delivery) -> Result<(), Full> {
        let waiting = {
            let mut inner = self.inner.lock().expect("mailbox lock");
            if inner.queued.len() >= self.capacity {
                return Err(Full);
            }
            inner.queued.push_back(delivery);
            inner.waiting.take()
        };
        if let Some(waker) = waiting {
            waker.wake();
        }
        Ok(())
    }

    /// Moves everything queued to the end of `out` (one lock, and no copy
    /// when `out` is empty); `false` if nothing was queued.
    pub fn take_all(&self, out: &mut VecDeque<Delivery>) -> bool {
        let mut inner = self.inner.lock().expect("mailbox lock");
        inner.move_into(out)
    }

    /// Like [`Mailbox::take_all`], or, when nothing is queued, wakes the
    /// task of `cx` at the next push.
    pub fn poll_take_all(&self, cx: &mut Context<'_>, out: &mut VecDeque<Delivery>) -> Poll<()> {
        let mut inner = self.inner.lock().expect("mailbox lock");
        if inner.move_into(out) {
            return Poll::Ready(());
        }
        match &mut inner.waiting {
            Some(waker) => waker.clone_from(cx.waker()),
            none => *none = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

impl Inner {
    /// Moves everything queued to the end of `out`; `false` if nothing was.
    fn move_into(&mut self, out: &mut VecDeque<Delivery>) -> bool {
        if self.queued.is_empty() {
            return false;
        }
        if out.is_empty() {
            std::mem::swap(&mut self.queued, out);
        } else {
            out.append(&mut self.queued);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Event, EventType, SharedEvent, View};
    use std::sync::Arc;

    fn delivery(subscription: u64) -> Delivery {
        let event = Event::new(EventType::RecordCreated, "c", "r", serde_json::json!({}));
        Delivery::new(
            subscription,
            Arc::new(SharedEvent::new(event)),
            View::default(),
        )
    }

    fn ids(deliveries: &VecDeque<Delivery>) -> Vec<u64> {
        deliveries.iter().map(|d| d.subscription).collect()
    }

    #[test]
    fn takes_everything_in_order_and_refuses_past_capacity() {
        let mailbox = Mailbox::new(3);
        for id in 1..=3 {
            mailbox.push(delivery(id)).unwrap();
        }
        assert_eq!(mailbox.push(delivery(4)), Err(Full));
        let mut out = VecDeque::new();
        assert!(mailbox.take_all(&mut out));
        assert_eq!(ids(&out), [1, 2, 3]);
        assert!(!mailbox.take_all(&mut out));
        mailbox.push(delivery(5)).unwrap();
        assert!(mailbox.take_all(&mut out));
        assert_eq!(ids(&out), [1, 2, 3, 5], "appended after what `out` held");
    }

    #[tokio::test]
    async fn a_waiting_taker_wakes_on_a_push_from_another_task() {
        let mailbox = Arc::new(Mailbox::new(8));
        let pusher = Arc::clone(&mailbox);
        let mut out = VecDeque::new();
        let taken = tokio::spawn(async move {
            std::future::poll_fn(|cx| mailbox.poll_take_all(cx, &mut out)).await;
            ids(&out)
        });
        tokio::task::yield_now().await;
        pusher.push(delivery(7)).unwrap();
        assert_eq!(taken.await.unwrap(), [7]);
    }
}
