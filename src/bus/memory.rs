//! The in-memory bus: one node, events dispatched as they are published.
//!
//! A mutex makes "assign the next sequence number, then dispatch" one step,
//! so subscribers see events in sequence order. Dispatch never waits on a
//! subscriber (queues are bounded and non-blocking), so the lock is short.

use crate::engine::router::{Audience, Router};
use crate::event::{Event, SharedEvent};
use std::sync::{Arc, Mutex};

pub struct MemoryBus {
    router: Arc<Router>,
    last_seq: Mutex<u64>,
}

impl MemoryBus {
    pub fn new(router: Arc<Router>) -> Self {
        MemoryBus {
            router,
            last_seq: Mutex::new(0),
        }
    }

    pub fn publish(&self, events: Vec<Event>) -> Vec<u64> {
        let mut last_seq = self.last_seq.lock().expect("sequence lock");
        events
            .into_iter()
            .map(|mut event| {
                *last_seq += 1;
                event.seq = *last_seq;
                self.router
                    .dispatch(SharedEvent::new(event), Audience::Everyone);
                *last_seq
            })
            .collect()
    }
}
