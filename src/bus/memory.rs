//! The in-memory bus: one node, events dispatched as they are published.
//!
//! A mutex makes "assign the next sequence number, remember it in the
//! history, dispatch" one step, so subscribers see events in sequence order
//! and a resume position taken under the same lock splits history and live
//! delivery exactly. Dispatch never waits on a subscriber (queues are
//! bounded and non-blocking), so the lock is short. The history keeps the
//! same retention as the JetStream stream would: by count and by age.

use super::{Audience, Inbox};
use super::{History, Replay, Retention};
use crate::event::{Event, SharedEvent, WILDCARD};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Instant;

pub struct MemoryBus {
    inbox: Arc<dyn Inbox>,
    retention: Retention,
    log: Mutex<Log>,
}

struct Log {
    last_seq: u64,
    /// Retained events, oldest first, with the time they were published.
    history: VecDeque<(Instant, Arc<SharedEvent>)>,
}

impl MemoryBus {
    pub fn new(inbox: Arc<dyn Inbox>, retention: Retention) -> Self {
        MemoryBus {
            inbox,
            retention,
            log: Mutex::new(Log {
                last_seq: 0,
                history: VecDeque::new(),
            }),
        }
    }

    pub fn publish(&self, events: Vec<Event>) -> Vec<u64> {
        let mut log = self.log.lock().expect("log lock");
        let now = Instant::now();
        let seqs = events
            .into_iter()
            .map(|mut event| {
                log.last_seq += 1;
                event.seq = log.last_seq;
                let event = Arc::new(SharedEvent::new(event));
                log.history.push_back((now, Arc::clone(&event)));
                self.inbox.deliver(event, Audience::Everyone);
                log.last_seq
            })
            .collect();
        let max_events = self.retention.max_events.max(1);
        while log.history.len() > max_events
            || log
                .history
                .front()
                .is_some_and(|(at, _)| now.duration_since(*at) > self.retention.max_age)
        {
            log.history.pop_front();
        }
        seqs
    }

    pub fn head(&self) -> u64 {
        self.log.lock().expect("log lock").last_seq
    }

    /// The retained events of `key` after `since`, up to the current head.
    pub fn replay(&self, key: &str, since: u64) -> Replay {
        let log = self.log.lock().expect("log lock");
        let first_available = log
            .history
            .front()
            .map_or(log.last_seq + 1, |(_, e)| e.event.seq);
        let events: Vec<Arc<SharedEvent>> = log
            .history
            .iter()
            .map(|(_, event)| event)
            .filter(|e| e.event.seq > since && (key == WILDCARD || e.event.collection == key))
            .cloned()
            .collect();
        Replay {
            history: History::Memory(events.into_iter()),
            head: log.last_seq,
            first_available,
        }
    }
}
