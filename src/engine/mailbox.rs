//! A connection's bounded delivery queue, built for fan-out.
//!
//! The dispatcher pushes one delivery per matching connection and event
//! ([`Queued::One`]), or, for a subscription that takes every event of its
//! collection, one [`Run`] per dispatch round: the round's events of that
//! collection, shared by all such subscribers, so what the dispatcher does
//! for them is paid per round rather than per event. The connection's edge
//! task takes them. A general-purpose channel pays
//! for features this does not need (many receivers' bookkeeping, a
//! semaphore per send, a lock-free block list) on every delivery, which is
//! what strom does most. Here a push is a short uncontended lock and a
//! `VecDeque` push, and a wake only when the taker is waiting; the taker
//! takes everything queued at once by swapping buffers, so a busy
//! connection pays one lock per batch, not per delivery.
//!
//! An empty mailbox holds no allocation, which keeps idle connections small.
//!
//! All mailboxes of a node share a [`Backlog`]: how many of them hold
//! deliveries their takers have not taken yet. The dispatchers pace their
//! rounds by it (see the router's `Shard`).

use super::Delivery;
use crate::event::{SharedEvent, SharedRun};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use tokio::sync::Notify;

pub(crate) struct Mailbox {
    capacity: usize,
    inner: Mutex<Inner>,
    backlog: Arc<Backlog>,
}

/// How many mailboxes hold untaken deliveries. A mailbox counts from the
/// push that makes it non-empty to the take that empties it (or its drop),
/// so the count costs one atomic operation per mailbox and round, not one
/// per delivery.
#[derive(Default)]
pub(crate) struct Backlog {
    filled: AtomicUsize,
    /// The count at which to notify `drained` (`usize::MAX`: nobody waits).
    wake_at: AtomicUsize,
    drained: Notify,
}

impl Backlog {
    pub fn new() -> Self {
        Backlog {
            wake_at: AtomicUsize::new(usize::MAX),
            ..Backlog::default()
        }
    }

    /// Mailboxes holding untaken deliveries.
    pub fn filled(&self) -> usize {
        self.filled.load(Ordering::SeqCst)
    }

    fn fill(&self) {
        self.filled.fetch_add(1, Ordering::SeqCst);
    }

    fn empty(&self) {
        let left = self.filled.fetch_sub(1, Ordering::SeqCst) - 1;
        if left == self.wake_at.load(Ordering::SeqCst) {
            self.drained.notify_one();
        }
    }

    /// Waits until at most `target` mailboxes hold untaken deliveries. One
    /// waiter at a time (the dispatcher of a node with one shard); with
    /// several, a waiter may miss its wake-up and needs a timeout.
    pub async fn drained_to(&self, target: usize) {
        loop {
            let drained = self.drained.notified();
            self.wake_at.store(target, Ordering::SeqCst);
            if self.filled() <= target {
                break;
            }
            drained.await;
        }
        self.wake_at.store(usize::MAX, Ordering::SeqCst);
    }
}

/// What a mailbox holds.
#[derive(Debug)]
pub(crate) enum Queued {
    One(Delivery),
    Run(Run),
}

/// A dispatch round's events of one collection (or of `*`), in seq order,
/// for a subscription without a filter: it takes each of them, except its
/// own connection's echoes, which the taker skips.
#[derive(Debug)]
pub(crate) struct Run {
    pub subscription: u64,
    pub shared: Arc<SharedRun>,
}

impl Queued {
    /// Events it carries: what counts against a mailbox's capacity.
    pub fn events(&self) -> usize {
        match self {
            Queued::One(_) => 1,
            Queued::Run(run) => run.shared.events.len(),
        }
    }

    /// Its oldest event.
    pub fn first_event(&self) -> &Arc<SharedEvent> {
        match self {
            Queued::One(delivery) => &delivery.event,
            Queued::Run(run) => &run.shared.events[0],
        }
    }
}

#[derive(Default)]
struct Inner {
    queued: VecDeque<Queued>,
    /// Events in `queued`.
    events: usize,
    /// The taker, while it waits for a delivery.
    waiting: Option<Waker>,
}

/// The mailbox already holds `capacity` events, or would with this push.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Full;

impl Mailbox {
    pub fn new(capacity: usize, backlog: Arc<Backlog>) -> Self {
        Mailbox {
            capacity: capacity.max(1),
            inner: Mutex::default(),
            backlog,
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Queues `item`. When the mailbox would then hold more than `capacity`
    /// events it refuses it, after queuing as much of a run as fits: what
    /// a taker gets is the same whether events came one by one or in a run.
    pub fn push(&self, mut item: Queued) -> Result<(), Full> {
        let (waiting, full) = {
            let mut inner = self.inner.lock().expect("mailbox lock");
            let room = self.capacity - inner.events;
            let full = item.events() > room;
            if full {
                match &mut item {
                    Queued::Run(run) if room > 0 => {
                        let fits = run.shared.events[..room].into();
                        run.shared = Arc::new(SharedRun::new(fits));
                    }
                    _ => return Err(Full),
                }
            }
            if inner.queued.is_empty() {
                self.backlog.fill();
            }
            inner.events += item.events();
            inner.queued.push_back(item);
            (inner.waiting.take(), full)
        };
        if let Some(waker) = waiting {
            waker.wake();
        }
        if full { Err(Full) } else { Ok(()) }
    }

    /// Events queued and not yet taken.
    pub fn len(&self) -> usize {
        self.inner.lock().expect("mailbox lock").events
    }

    /// Moves everything queued to the end of `out` (one lock, and no copy
    /// when `out` is empty); `false` if nothing was queued.
    pub fn take_all(&self, out: &mut VecDeque<Queued>) -> bool {
        let mut inner = self.inner.lock().expect("mailbox lock");
        self.moved(inner.move_into(out))
    }

    /// Counts a take that emptied the mailbox out of the backlog.
    fn moved(&self, moved: bool) -> bool {
        if moved {
            self.backlog.empty();
        }
        moved
    }

    /// Like [`Mailbox::take_all`], or, when nothing is queued, wakes the
    /// task of `cx` at the next push.
    pub fn poll_take_all(&self, cx: &mut Context<'_>, out: &mut VecDeque<Queued>) -> Poll<()> {
        let mut inner = self.inner.lock().expect("mailbox lock");
        if self.moved(inner.move_into(out)) {
            return Poll::Ready(());
        }
        match &mut inner.waiting {
            Some(waker) => waker.clone_from(cx.waker()),
            none => *none = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

impl Drop for Mailbox {
    fn drop(&mut self) {
        let inner = self.inner.get_mut().unwrap_or_else(|e| e.into_inner());
        if !inner.queued.is_empty() {
            self.backlog.empty();
        }
    }
}

impl Inner {
    /// Moves everything queued to the end of `out`; `false` if nothing was.
    fn move_into(&mut self, out: &mut VecDeque<Queued>) -> bool {
        if self.queued.is_empty() {
            return false;
        }
        self.events = 0;
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
    use crate::event::{Event, EventType, View};

    fn event(seq: u64) -> Arc<SharedEvent> {
        let mut event = Event::new(EventType::RecordCreated, "c", "r", serde_json::json!({}));
        event.seq = seq;
        Arc::new(SharedEvent::new(event))
    }

    fn delivery(subscription: u64) -> Queued {
        Queued::One(Delivery::new(subscription, event(0), View::default()))
    }

    fn run(subscription: u64, seqs: std::ops::RangeInclusive<u64>) -> Queued {
        let events: Vec<_> = seqs.map(event).collect();
        Queued::Run(Run {
            subscription,
            shared: Arc::new(SharedRun::new(events.into())),
        })
    }

    /// (subscription, seq) of each event taken.
    fn taken(out: &VecDeque<Queued>) -> Vec<(u64, u64)> {
        out.iter()
            .flat_map(|queued| match queued {
                Queued::One(d) => vec![(d.subscription, d.event.event.seq)],
                Queued::Run(r) => (r.shared.events.iter())
                    .map(|e| (r.subscription, e.event.seq))
                    .collect(),
            })
            .collect()
    }

    #[test]
    fn takes_everything_in_order_and_refuses_past_capacity() {
        let mailbox = Mailbox::new(3, Arc::new(Backlog::new()));
        for id in 1..=3 {
            mailbox.push(delivery(id)).unwrap();
        }
        assert_eq!(mailbox.push(delivery(4)), Err(Full));
        let mut out = VecDeque::new();
        assert!(mailbox.take_all(&mut out));
        assert_eq!(taken(&out), [(1, 0), (2, 0), (3, 0)]);
        assert!(!mailbox.take_all(&mut out));
        mailbox.push(delivery(5)).unwrap();
        assert!(mailbox.take_all(&mut out));
        assert_eq!(taken(&out).len(), 4, "appended after what `out` held");
        assert_eq!(taken(&out)[3], (5, 0));
    }

    #[test]
    fn a_run_counts_its_events_and_fills_what_room_is_left() {
        let mailbox = Mailbox::new(5, Arc::new(Backlog::new()));
        mailbox.push(run(1, 1..=3)).unwrap();
        mailbox.push(delivery(2)).unwrap();
        assert_eq!(mailbox.len(), 4);
        assert_eq!(mailbox.push(run(1, 4..=6)), Err(Full), "7 events > 5");
        assert_eq!(mailbox.push(run(1, 7..=7)), Err(Full), "no room left");
        let mut out = VecDeque::new();
        assert!(mailbox.take_all(&mut out));
        assert_eq!(
            taken(&out),
            [(1, 1), (1, 2), (1, 3), (2, 0), (1, 4)],
            "as one by one: queued up to the capacity"
        );
        assert_eq!(mailbox.len(), 0, "a take gives the room back");
        mailbox.push(run(1, 8..=12)).unwrap();
    }

    #[test]
    fn the_backlog_counts_mailboxes_holding_deliveries_not_deliveries() {
        let backlog = Arc::new(Backlog::new());
        let busy = Mailbox::new(8, Arc::clone(&backlog));
        let other = Mailbox::new(8, Arc::clone(&backlog));
        for id in 1..=3 {
            busy.push(delivery(id)).unwrap();
        }
        other.push(run(4, 1..=2)).unwrap();
        assert_eq!(backlog.filled(), 2);
        let mut out = VecDeque::new();
        assert!(busy.take_all(&mut out));
        assert_eq!(backlog.filled(), 1);
        assert!(!busy.take_all(&mut out), "an empty take changes nothing");
        assert_eq!(backlog.filled(), 1);
        drop(other);
        assert_eq!(backlog.filled(), 0, "a dropped mailbox leaves the backlog");
    }

    #[tokio::test]
    async fn waiting_for_the_backlog_ends_when_takers_have_taken() {
        let backlog = Arc::new(Backlog::new());
        let mailbox = Mailbox::new(8, Arc::clone(&backlog));
        mailbox.push(delivery(1)).unwrap();
        let waiter = Arc::clone(&backlog);
        let drained = tokio::spawn(async move { waiter.drained_to(0).await });
        tokio::task::yield_now().await;
        assert!(!drained.is_finished(), "one mailbox still holds a delivery");
        assert!(mailbox.take_all(&mut VecDeque::new()));
        drained.await.unwrap();
        assert_eq!(backlog.filled(), 0);
    }

    #[tokio::test]
    async fn a_waiting_taker_wakes_on_a_push_from_another_task() {
        let mailbox = Arc::new(Mailbox::new(8, Arc::new(Backlog::new())));
        let pusher = Arc::clone(&mailbox);
        let mut out = VecDeque::new();
        let taken = tokio::spawn(async move {
            std::future::poll_fn(|cx| mailbox.poll_take_all(cx, &mut out)).await;
            taken(&out)
        });
        tokio::task::yield_now().await;
        pusher.push(delivery(7)).unwrap();
        assert_eq!(taken.await.unwrap(), [(7, 0)]);
    }
}
