//! The in-memory bus: one node, events dispatched as they are published.
//!
//! A mutex makes "assign the next sequence number, remember it in the
//! history, dispatch" one step, so subscribers see events in sequence order
//! and a resume position taken under the same lock splits history and live
//! delivery exactly. Dispatch never waits on a subscriber (queues are
//! bounded and non-blocking), so the lock is short. The history keeps the
//! same retention as the JetStream stream would: by count, by bytes (of
//! events' `data` and `old_data`) and by age.

use super::{Audience, Inbox};
use super::{History, Replay, Retention};
use crate::event::{Event, Position, SharedEvent, WILDCARD};
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
    /// The payload bytes of `history`.
    bytes: u64,
}

impl MemoryBus {
    pub fn new(inbox: Arc<dyn Inbox>, retention: Retention) -> Self {
        MemoryBus {
            inbox,
            retention,
            log: Mutex::new(Log {
                last_seq: 0,
                history: VecDeque::new(),
                bytes: 0,
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
                log.bytes += event.event.payload_bytes() as u64;
                log.history.push_back((now, Arc::clone(&event)));
                self.inbox.deliver(event, Audience::Everyone);
                log.last_seq
            })
            .collect();
        self.trim(&mut log, now);
        seqs
    }

    /// Applies the retention: by count, by bytes, and by age as of `now`.
    fn trim(&self, log: &mut Log, now: Instant) {
        let max_events = self.retention.max_events.max(1);
        while log.history.len() > max_events
            || (log.bytes > self.retention.max_bytes && log.history.len() > 1)
            || log
                .history
                .front()
                .is_some_and(|(at, _)| now.duration_since(*at) > self.retention.max_age)
        {
            if let Some((_, event)) = log.history.pop_front() {
                log.bytes -= event.event.payload_bytes() as u64;
            }
        }
    }

    /// Events retained for resuming subscribers.
    pub fn retained(&self) -> usize {
        self.log.lock().expect("log lock").history.len()
    }

    pub fn head(&self) -> u64 {
        self.log.lock().expect("log lock").last_seq
    }

    /// The retained events of `key` after `since`, up to the current head.
    pub fn replay(&self, key: &str, since: u64) -> Replay {
        let mut log = self.log.lock().expect("log lock");
        self.trim(&mut log, Instant::now());
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
            head: Position::seq(log.last_seq),
            first_available: Position::seq(first_available),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventType;
    use serde_json::json;
    use std::time::Duration;

    /// Records what the bus delivers: (seq, collection, audience).
    #[derive(Default)]
    struct Recorder(Mutex<Vec<(u64, String, Audience)>>);

    impl Inbox for Recorder {
        fn deliver(&self, event: Arc<SharedEvent>, audience: Audience) {
            self.0.lock().expect("recorder lock").push((
                event.event.seq,
                event.event.collection.clone(),
                audience,
            ));
        }
    }

    impl Recorder {
        fn seen(&self) -> Vec<(u64, String, Audience)> {
            self.0.lock().expect("recorder lock").clone()
        }
    }

    fn bus(retention: Retention) -> (MemoryBus, Arc<Recorder>) {
        let recorder = Arc::new(Recorder::default());
        let inbox: Arc<dyn Inbox> = Arc::clone(&recorder) as Arc<dyn Inbox>;
        (MemoryBus::new(inbox, retention), recorder)
    }

    fn by_count(max_events: usize) -> Retention {
        Retention {
            max_events,
            ..Retention::default()
        }
    }

    fn event(collection: &str, record_id: &str) -> Event {
        Event::new(
            EventType::RecordCreated,
            collection,
            record_id,
            json!({ "id": record_id }),
        )
    }

    /// (seq, collection, record id) of every event a replay holds, and its
    /// head and first available seq.
    type Replayed = (Vec<(u64, String, String)>, u64, u64);

    fn replayed(bus: &MemoryBus, key: &str, since: u64) -> Replayed {
        let replay = bus.replay(key, since);
        let History::Memory(events) = replay.history else {
            panic!("the memory bus replays from memory");
        };
        let events = events
            .map(|e| {
                (
                    e.event.seq,
                    e.event.collection.clone(),
                    e.event.record_id.clone(),
                )
            })
            .collect();
        (
            events,
            replay.head.of(None),
            replay.first_available.of(None),
        )
    }

    fn seqs(bus: &MemoryBus, key: &str, since: u64) -> Vec<u64> {
        replayed(bus, key, since)
            .0
            .into_iter()
            .map(|(seq, _, _)| seq)
            .collect()
    }

    /// Publishes one event per collection named, one publish call each.
    fn publish_each(bus: &MemoryBus, collections: &[&str]) {
        for (i, collection) in collections.iter().enumerate() {
            bus.publish(vec![event(collection, &format!("r{i}"))]);
        }
    }

    /// Waits until `Instant::now()` has moved past every instant taken so
    /// far, so the next publish is strictly later than the last one. This
    /// spins on the clock, which advances on its own; it waits for nothing
    /// else.
    fn let_the_clock_tick() {
        let start = Instant::now();
        while Instant::now() <= start {
            std::hint::spin_loop();
        }
    }

    #[test]
    fn an_empty_bus_has_head_zero_and_nothing_to_replay() {
        let (bus, inbox) = bus(Retention::default());
        assert_eq!(bus.head(), 0);
        assert_eq!(replayed(&bus, "*", 0), (vec![], 0, 1));
        assert_eq!(replayed(&bus, "posts", 0), (vec![], 0, 1));
        assert_eq!(bus.publish(Vec::new()), Vec::<u64>::new());
        assert_eq!(bus.head(), 0);
        assert!(inbox.seen().is_empty());
    }

    #[test]
    fn seqs_count_from_one_across_collections_and_reach_the_inbox_in_order() {
        let (bus, inbox) = bus(Retention::default());
        assert_eq!(
            bus.publish(vec![event("posts", "p1"), event("users", "u1")]),
            vec![1, 2]
        );
        assert_eq!(bus.publish(vec![event("posts", "p2")]), vec![3]);
        assert_eq!(
            bus.publish(vec![event("comments", "c1"), event("posts", "p3")]),
            vec![4, 5]
        );
        assert_eq!(bus.head(), 5);
        let expected: Vec<(u64, String, Audience)> = [
            (1, "posts"),
            (2, "users"),
            (3, "posts"),
            (4, "comments"),
            (5, "posts"),
        ]
        .into_iter()
        .map(|(seq, c)| (seq, c.to_owned(), Audience::Everyone))
        .collect();
        assert_eq!(inbox.seen(), expected);
    }

    #[test]
    fn a_publish_ignores_seqs_set_by_the_publisher() {
        let (bus, inbox) = bus(Retention::default());
        let mut claimed = event("posts", "p1");
        claimed.seq = 42;
        assert_eq!(bus.publish(vec![claimed]), vec![1]);
        assert_eq!(inbox.seen()[0].0, 1);
        assert_eq!(seqs(&bus, "*", 0), vec![1]);
    }

    #[test]
    fn replay_of_a_collection_returns_only_its_events_after_since() {
        let (bus, _inbox) = bus(Retention::default());
        publish_each(&bus, &["posts", "users", "posts", "users", "posts"]);

        let (events, head, first) = replayed(&bus, "posts", 0);
        assert_eq!((head, first), (5, 1));
        assert_eq!(
            events,
            vec![
                (1, "posts".to_owned(), "r0".to_owned()),
                (3, "posts".to_owned(), "r2".to_owned()),
                (5, "posts".to_owned(), "r4".to_owned()),
            ]
        );
        assert_eq!(seqs(&bus, "posts", 1), vec![3, 5]);
        assert_eq!(seqs(&bus, "posts", 3), vec![5]);
        assert_eq!(seqs(&bus, "posts", 5), Vec::<u64>::new());
        assert_eq!(seqs(&bus, "posts", 99), Vec::<u64>::new());
        assert_eq!(seqs(&bus, "users", 0), vec![2, 4]);
        assert_eq!(seqs(&bus, "nothing", 0), Vec::<u64>::new());
        // A collection named like a prefix of another is not that other.
        assert_eq!(seqs(&bus, "post", 0), Vec::<u64>::new());
    }

    #[test]
    fn replay_of_the_wildcard_returns_every_collection() {
        let (bus, _inbox) = bus(Retention::default());
        publish_each(&bus, &["posts", "users", "posts", "comments"]);
        assert_eq!(seqs(&bus, "*", 0), vec![1, 2, 3, 4]);
        assert_eq!(seqs(&bus, "*", 2), vec![3, 4]);
        assert_eq!(seqs(&bus, "*", 4), Vec::<u64>::new());
        assert_eq!(replayed(&bus, "*", 0).1, 4);
    }

    #[test]
    fn a_replay_holds_what_was_there_when_it_was_asked_for() {
        let (bus, _inbox) = bus(Retention::default());
        publish_each(&bus, &["posts", "posts"]);
        let replay = bus.replay("posts", 0);
        bus.publish(vec![event("posts", "later")]);
        assert_eq!(replay.head, Position::seq(2));
        let History::Memory(events) = replay.history else {
            panic!("the memory bus replays from memory");
        };
        let seqs: Vec<u64> = events.map(|e| e.event.seq).collect();
        assert_eq!(seqs, vec![1, 2]);
        assert_eq!(bus.head(), 3);
    }

    #[test]
    fn retention_by_count_drops_the_oldest_events() {
        let (bus, inbox) = bus(by_count(3));
        publish_each(&bus, &["posts", "users", "posts", "users", "posts"]);
        assert_eq!(bus.head(), 5);
        assert_eq!(inbox.seen().len(), 5, "everything is delivered live");

        let (events, head, first) = replayed(&bus, "*", 0);
        assert_eq!((head, first), (5, 3));
        let seqs_all: Vec<u64> = events.iter().map(|e| e.0).collect();
        assert_eq!(seqs_all, vec![3, 4, 5]);
        // From before the first retained event: starts at it.
        assert_eq!(seqs(&bus, "posts", 0), vec![3, 5]);
        assert_eq!(seqs(&bus, "users", 1), vec![4]);
        assert_eq!(seqs(&bus, "posts", 3), vec![5]);

        bus.publish(vec![event("users", "u9")]);
        assert_eq!(replayed(&bus, "*", 0).2, 4);
        assert_eq!(seqs(&bus, "*", 0), vec![4, 5, 6]);
    }

    #[test]
    fn retention_by_bytes_drops_the_oldest_events_but_keeps_the_newest() {
        // `{"id":"pN"}` is 11 bytes: room for three.
        let (bus, _inbox) = bus(Retention {
            max_bytes: 33,
            ..Retention::default()
        });
        publish_each(&bus, &["posts", "posts", "posts", "posts", "posts"]);
        let (events, head, first) = replayed(&bus, "posts", 0);
        assert_eq!((events.len(), head, first), (3, 5, 3));
        let big = Event::new(
            EventType::RecordCreated,
            "posts",
            "big",
            json!({ "text": "x".repeat(100) }),
        );
        bus.publish(vec![big]);
        let (events, head, first) = replayed(&bus, "posts", 0);
        assert_eq!(
            (events.len(), head, first),
            (1, 6, 6),
            "an event over the limit alone is still retained"
        );
    }

    #[test]
    fn retention_by_count_applies_to_a_batch_larger_than_the_limit() {
        let (bus, inbox) = bus(by_count(2));
        let batch = (0..5).map(|i| event("posts", &format!("p{i}"))).collect();
        assert_eq!(bus.publish(batch), vec![1, 2, 3, 4, 5]);
        let delivered: Vec<u64> = inbox.seen().into_iter().map(|(seq, _, _)| seq).collect();
        assert_eq!(delivered, vec![1, 2, 3, 4, 5]);
        let (events, head, first) = replayed(&bus, "posts", 0);
        assert_eq!((events.len(), head, first), (2, 5, 4));
    }

    #[test]
    fn retention_of_zero_events_still_keeps_the_newest() {
        let (bus, _inbox) = bus(by_count(0));
        publish_each(&bus, &["posts", "posts", "posts"]);
        let newest = (3, "posts".to_owned(), "r2".to_owned());
        assert_eq!(replayed(&bus, "posts", 0), (vec![newest], 3, 3));
    }

    #[test]
    fn retention_by_age_keeps_what_is_younger_than_max_age() {
        let (bus, _inbox) = bus(Retention {
            max_age: Duration::from_secs(3600),
            max_events: 100,
            ..Retention::default()
        });
        publish_each(&bus, &["posts", "users", "posts"]);
        let_the_clock_tick();
        publish_each(&bus, &["posts"]);
        assert_eq!(seqs(&bus, "*", 0), vec![1, 2, 3, 4]);
        assert_eq!(replayed(&bus, "*", 0).2, 1);
    }

    /// Like JetStream, a bus that has gone quiet still expires events by
    /// age: a replay never returns (nor counts in `first_available`)
    /// events older than `max_age`.
    #[test]
    fn an_idle_bus_does_not_replay_events_older_than_max_age() {
        let (bus, _inbox) = bus(Retention {
            max_age: Duration::ZERO,
            max_events: 100,
            ..Retention::default()
        });
        bus.publish(vec![event("posts", "p1")]);
        let_the_clock_tick();
        assert_eq!(replayed(&bus, "*", 0), (vec![], 1, 2));
    }
}
