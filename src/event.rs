//! Events: what publishers send and subscribers receive.
//!
//! An [`Event`] is transport-neutral: the edges convert it to and from JSON
//! and protobuf. Once published it travels as a [`SharedEvent`], which carries
//! a small cache so each wire encoding is computed once per event and its
//! bytes shared by every subscriber of that wire format.

use bytes::Bytes;
use serde_json::{Map, Value};
use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::{Instant, SystemTime};
use thiserror::Error;

/// The eight event types of the systems strom replaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventType {
    RecordCreated,
    RecordUpdated,
    RecordDeleted,
    CollectionCreated,
    CollectionUpdated,
    CollectionDeleted,
    UserJoined,
    UserLeft,
    /// A message on a channel (a collection that carries messages rather
    /// than record changes): chat, typing indicators, cursors.
    Broadcast,
}

impl EventType {
    pub const ALL: [EventType; 9] = [
        EventType::RecordCreated,
        EventType::RecordUpdated,
        EventType::RecordDeleted,
        EventType::CollectionCreated,
        EventType::CollectionUpdated,
        EventType::CollectionDeleted,
        EventType::UserJoined,
        EventType::UserLeft,
        EventType::Broadcast,
    ];

    /// The dotted name used in JSON, SSE `event:` lines and NATS bodies.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::RecordCreated => "record.created",
            EventType::RecordUpdated => "record.updated",
            EventType::RecordDeleted => "record.deleted",
            EventType::CollectionCreated => "collection.created",
            EventType::CollectionUpdated => "collection.updated",
            EventType::CollectionDeleted => "collection.deleted",
            EventType::UserJoined => "user.joined",
            EventType::UserLeft => "user.left",
            EventType::Broadcast => "broadcast",
        }
    }

    pub fn parse(name: &str) -> Result<EventType, EventError> {
        EventType::ALL
            .into_iter()
            .find(|t| t.as_str() == name)
            .ok_or_else(|| EventError::UnknownType(name.to_owned()))
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why an event (or a collection name) was refused.
#[derive(Debug, Error, PartialEq)]
pub enum EventError {
    #[error(
        "unknown event type {0:?}: expected one of record.created, record.updated, record.deleted, collection.created, collection.updated, collection.deleted, user.joined, user.left, broadcast"
    )]
    UnknownType(String),
    #[error("invalid collection name {0:?}: {1}")]
    InvalidCollection(String, &'static str),
    #[error("record_id is longer than {MAX_RECORD_ID} bytes")]
    RecordIdTooLong,
    #[error("{0} must be a JSON object")]
    NotAnObject(&'static str),
    #[error("invalid timestamp {0:?}: expected RFC 3339, e.g. 2025-01-15T10:30:00Z")]
    InvalidTimestamp(String),
    #[error(
        "the collection {0:?} is reserved: only strom publishes on it (subscribe to it to see who is online)"
    )]
    Reserved(String),
    #[error(
        "invalid resume position {0:?}: expected an event's seq, or for `*` over several NATS streams a position token of one seq per stream (`12,0,40`)"
    )]
    InvalidPosition(String),
}

pub const MAX_COLLECTION: usize = 128;

/// The collection strom announces presence on (`user.joined`,
/// `user.left`). It is reserved: no publisher may write to it.
pub const PRESENCE_COLLECTION: &str = "presence";

/// Refuses the collections only strom itself may publish on.
pub fn check_not_reserved(name: &str) -> Result<(), EventError> {
    if name == PRESENCE_COLLECTION {
        return Err(EventError::Reserved(name.to_owned()));
    }
    Ok(())
}
pub const MAX_RECORD_ID: usize = 256;

/// Checks a collection name: 1 to 128 bytes of letters, digits, `_`, `-` and
/// `.`, not starting or ending with `.` nor containing `..`. The rules keep
/// every name a valid suffix of a NATS subject.
pub fn validate_collection(name: &str) -> Result<(), EventError> {
    let invalid = |why| Err(EventError::InvalidCollection(name.to_owned(), why));
    if name.is_empty() {
        return invalid("it is empty");
    }
    if name.len() > MAX_COLLECTION {
        return invalid("it is longer than 128 bytes");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
    {
        return invalid("only letters, digits, '_', '-' and '.' are allowed");
    }
    if name.starts_with('.') || name.ends_with('.') || name.contains("..") {
        return invalid("'.' separates non-empty parts");
    }
    Ok(())
}

/// One change, as published and as delivered.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub event_type: EventType,
    pub collection: String,
    /// Empty when the event is not about one record.
    pub record_id: String,
    /// The record after the change; always a JSON object.
    pub data: Value,
    /// The record before the change, when known; a JSON object.
    pub old_data: Option<Value>,
    pub timestamp: SystemTime,
    /// Position in the event log; 0 until the bus assigns it.
    pub seq: u64,
    /// Who published it: the user id of the publisher's credentials, set
    /// by the server (publishers cannot choose it).
    pub sender: Option<String>,
    /// The connection that published it, for echo control; not shown to
    /// subscribers.
    pub origin: Option<String>,
    /// A stable id from the event's source (e.g. `pg:0/16B3748` for a
    /// Postgres change), so a source that may deliver twice is published
    /// at most once.
    pub id: Option<String>,
}

impl Event {
    /// A new event, stamped now, not yet published.
    pub fn new(
        event_type: EventType,
        collection: impl Into<String>,
        record_id: impl Into<String>,
        data: Value,
    ) -> Event {
        Event {
            event_type,
            collection: collection.into(),
            record_id: record_id.into(),
            data,
            old_data: None,
            timestamp: SystemTime::now(),
            seq: 0,
            sender: None,
            origin: None,
            id: None,
        }
    }

    /// Checks what a publisher controls: collection name (not a reserved
    /// one), record id, and that data and old_data are objects.
    pub fn validate(&self) -> Result<(), EventError> {
        validate_collection(&self.collection)?;
        check_not_reserved(&self.collection)?;
        if self.record_id.len() > MAX_RECORD_ID {
            return Err(EventError::RecordIdTooLong);
        }
        if !self.data.is_object() {
            return Err(EventError::NotAnObject("data"));
        }
        if self.old_data.as_ref().is_some_and(|v| !v.is_object()) {
            return Err(EventError::NotAnObject("old_data"));
        }
        Ok(())
    }

    /// The bytes of JSON of `data` and `old_data`: what limits and history
    /// retention count.
    pub fn payload_bytes(&self) -> usize {
        json_len(&self.data) + self.old_data.as_ref().map_or(0, json_len)
    }

    pub fn empty_data() -> Value {
        Value::Object(Map::new())
    }
}

/// The length of `value` as compact JSON, without building the text.
fn json_len(value: &Value) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0 += bytes.len();
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    serde_json::to_writer(&mut count, value).expect("a JSON value serializes");
    count.0
}

/// Formats a time as RFC 3339 in UTC with microseconds.
pub fn format_timestamp(at: SystemTime) -> String {
    let at = time::OffsetDateTime::from(at);
    let format = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z"
    );
    at.format(&format).unwrap_or_default()
}

/// Parses an RFC 3339 time. A time without an offset (as in the seeds'
/// examples, `2025-01-15T10:30:00`) is taken as UTC.
pub fn parse_timestamp(text: &str) -> Result<SystemTime, EventError> {
    use time::format_description::well_known::Rfc3339;
    let invalid = || EventError::InvalidTimestamp(text.to_owned());
    if let Ok(at) = time::OffsetDateTime::parse(text, &Rfc3339) {
        return Ok(at.into());
    }
    let format = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second][optional [.[subsecond]]]"
    );
    time::PrimitiveDateTime::parse(text, &format)
        .map(|at| at.assume_utc().into())
        .map_err(|_| invalid())
}

/// The collection name that subscribes to every collection.
pub const WILDCARD: &str = "*";

/// The wire formats whose encodings a [`SharedEvent`] caches. The engine does
/// not know how each is encoded; it only keeps the bytes an edge produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    WebSocket,
    Sse,
    Grpc,
}

const WIRE_SLOTS: usize = 3;

/// How one delivery shows a row change to its subscriber. A subscriber
/// never receives a row image that its row filter (the policy's
/// `row_filter`) rejects.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct View {
    /// The row matched the subscriber's filter before the change and no
    /// longer does.
    pub left_filter: bool,
    /// The image the subscriber's row filter rejects is withheld:
    /// `old_data` when the row came into its rows, `data` (sent as `{}`)
    /// when it left them.
    pub withheld: bool,
}

impl View {
    const SLOTS: usize = 4;

    fn slot(self) -> usize {
        usize::from(self.left_filter) + 2 * usize::from(self.withheld)
    }

    /// The row's images as this view shows them: `(data, old_data)`.
    pub fn images(self, event: &Event) -> (Option<&Value>, Option<&Value>) {
        match (self.left_filter, self.withheld) {
            (_, false) => (Some(&event.data), event.old_data.as_ref()),
            (false, true) => (Some(&event.data), None),
            (true, true) => (None, event.old_data.as_ref()),
        }
    }
}

/// A place in the event log to resume after. The log of one stream has one
/// seq; `*` over N NATS streams (`--nats-partitions`) has one seq per
/// stream, written as the token `s0,s1,…`. Every event of such a
/// deployment names its `partition`, so a client keeps the token by
/// setting that stream's seq to each event's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position(Vec<u64>);

impl Position {
    pub fn seq(seq: u64) -> Self {
        Position(vec![seq])
    }

    /// One seq per stream (at least one).
    pub fn per_stream(seqs: Vec<u64>) -> Self {
        assert!(!seqs.is_empty(), "a position has a seq");
        Position(seqs)
    }

    /// How many streams it names (1: one seq, good for any stream).
    pub fn streams(&self) -> usize {
        self.0.len()
    }

    /// The one seq, when it is not a per-stream token.
    pub fn as_seq(&self) -> Option<u64> {
        match self.0.as_slice() {
            [seq] => Some(*seq),
            _ => None,
        }
    }

    /// The seq in stream `partition` (an event's; `None` outside
    /// partitions).
    pub fn of(&self, partition: Option<u32>) -> u64 {
        match self.0.as_slice() {
            [seq] => *seq,
            seqs => seqs[partition.unwrap_or(0) as usize],
        }
    }

    /// Sets the seq of stream `partition` (the one seq, if it is one).
    pub fn set(&mut self, partition: Option<u32>, seq: u64) {
        match self.0.as_mut_slice() {
            [only] => *only = seq,
            seqs => seqs[partition.unwrap_or(0) as usize] = seq,
        }
    }

    /// Whether events after `self` are gone, `first_available` being the
    /// oldest retained one per stream. A seq of 0 there asks for whatever
    /// is retained, and so misses nothing, unless `strict`.
    pub fn misses(&self, first_available: &Position, strict: bool) -> bool {
        (0..first_available.streams() as u32).any(|k| {
            let since = self.of(Some(k));
            (strict || since > 0) && since.saturating_add(1) < first_available.of(Some(k))
        })
    }

    /// In JSON: the seq as a number, a per-stream token as a string.
    pub fn to_json(&self) -> Value {
        match self.as_seq() {
            Some(seq) => seq.into(),
            None => self.to_string().into(),
        }
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, seq) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{seq}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for Position {
    type Err = EventError;

    fn from_str(text: &str) -> Result<Self, EventError> {
        let seqs: Result<Vec<u64>, _> = text.trim().split(',').map(|s| s.trim().parse()).collect();
        seqs.map(Position)
            .map_err(|_| EventError::InvalidPosition(text.to_owned()))
    }
}

/// A published event on its way to subscribers, shared by all of them.
#[derive(Debug)]
pub struct SharedEvent {
    pub event: Event,
    /// When the bus handed it to this node (for the fan-out latency).
    pub arrived: Instant,
    /// Encodings per wire format and [`View`].
    encodings: [OnceLock<Bytes>; WIRE_SLOTS * View::SLOTS],
    /// The NATS stream it is in when collections are spread over several
    /// (`--nats-partitions`): with its seq, its place in the log.
    pub partition: Option<u32>,
}

impl SharedEvent {
    pub fn new(event: Event) -> Self {
        SharedEvent {
            event,
            arrived: Instant::now(),
            encodings: Default::default(),
            partition: None,
        }
    }

    /// Whether client connection `connection` published it (its `origin`).
    pub fn is_from(&self, connection: &str) -> bool {
        self.event.origin.as_deref() == Some(connection)
    }

    /// The bytes of this event in `wire`, encoded by `encode` the first time
    /// any subscriber asks and shared afterwards.
    pub fn encoded(&self, wire: Wire, view: View, encode: impl FnOnce() -> Bytes) -> &Bytes {
        let slot = wire as usize + WIRE_SLOTS * view.slot();
        self.encodings[slot].get_or_init(encode)
    }
}

/// The events of one collection (or of `*`) that a dispatch round hands,
/// in order, to each subscriber taking every one of them: shared by those
/// subscribers, with the events' encodings for a wire laid end to end
/// once, so a subscriber's edge can write the whole run with one copy.
#[derive(Debug)]
pub struct SharedRun {
    pub events: Box<[Arc<SharedEvent>]>,
    /// Whether any came from a client connection (`origin`), whose own
    /// subscriptions may not want it back.
    pub from_connections: bool,
    encodings: [OnceLock<RunEncoding>; WIRE_SLOTS],
}

/// The encodings of a run's events end to end, and where each ends.
#[derive(Debug)]
struct RunEncoding {
    bytes: Box<[u8]>,
    ends: Box<[usize]>,
}

impl SharedRun {
    pub fn new(events: Box<[Arc<SharedEvent>]>) -> Self {
        SharedRun {
            from_connections: events.iter().any(|e| e.event.origin.is_some()),
            events,
            encodings: Default::default(),
        }
    }

    /// The encodings in `wire` of `events[range]`, end to end; `encode`
    /// gives one event's (the same bytes for every subscriber), and is
    /// asked once per event the first time any subscriber asks.
    pub fn encoded(
        &self,
        wire: Wire,
        range: std::ops::Range<usize>,
        encode: impl Fn(&SharedEvent) -> &Bytes,
    ) -> &[u8] {
        let encoding = self.encodings[wire as usize].get_or_init(|| {
            let (mut bytes, mut ends) = (Vec::new(), Vec::with_capacity(self.events.len()));
            for event in &self.events {
                bytes.extend_from_slice(encode(event));
                ends.push(bytes.len());
            }
            RunEncoding {
                bytes: bytes.into(),
                ends: ends.into(),
            }
        });
        let offset = |i: usize| i.checked_sub(1).map_or(0, |i| encoding.ends[i]);
        &encoding.bytes[offset(range.start)..offset(range.end)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_encodes_its_events_end_to_end_once() {
        let events: Vec<_> = (1..=3)
            .map(|seq| {
                let mut event = Event::new(EventType::RecordCreated, "c", "r", Value::Null);
                event.seq = seq;
                Arc::new(SharedEvent::new(event))
            })
            .collect();
        let run = SharedRun::new(events.into());
        assert!(!run.from_connections);
        static ASKED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        fn encode(event: &SharedEvent) -> &Bytes {
            ASKED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            event.encoded(Wire::Sse, View::default(), || {
                format!("<{}>", event.event.seq).into_bytes().into()
            })
        }
        assert_eq!(run.encoded(Wire::Sse, 0..3, encode), b"<1><2><3>");
        assert_eq!(run.encoded(Wire::Sse, 1..3, encode), b"<2><3>");
        assert_eq!(run.encoded(Wire::Sse, 2..2, encode), b"");
        let asked = ASKED.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(asked, 3, "each event encoded once");
    }

    #[test]
    fn a_position_is_one_seq_or_one_per_stream() {
        let seq: Position = "41".parse().unwrap();
        assert_eq!(
            (seq.as_seq(), seq.streams(), seq.to_json()),
            (Some(41), 1, 41.into())
        );
        // One seq stands for whichever stream a collection is in.
        assert_eq!(seq.of(Some(2)), 41);
        let mut moved = seq.clone();
        moved.set(Some(2), 45);
        assert_eq!(moved, Position::seq(45));

        let token: Position = "12, 0,40".parse().unwrap();
        assert_eq!((token.as_seq(), token.streams()), (None, 3));
        assert_eq!((token.of(Some(0)), token.of(Some(2))), (12, 40));
        let mut next = token.clone();
        next.set(Some(1), 7);
        assert_eq!(
            (next.to_string(), next.to_json()),
            ("12,7,40".into(), "12,7,40".into())
        );

        for bad in ["", "x", "1,,2", "-1", "1;2"] {
            assert!(
                matches!(bad.parse::<Position>(), Err(EventError::InvalidPosition(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_position_misses_events_only_before_the_retained_ones() {
        let first = Position::per_stream(vec![1, 10, 5]);
        assert!(!Position::per_stream(vec![0, 9, 4]).misses(&first, false));
        assert!(Position::per_stream(vec![0, 8, 4]).misses(&first, false));
        // 0 asks for whatever is retained, unless strict.
        assert!(!Position::per_stream(vec![0, 0, 0]).misses(&first, false));
        assert!(Position::per_stream(vec![0, 0, 9]).misses(&first, true));
        assert!(!Position::seq(0).misses(&Position::seq(30), false));
        assert!(Position::seq(1).misses(&Position::seq(30), false));
    }

    #[test]
    fn event_type_names_round_trip() {
        for t in EventType::ALL {
            assert_eq!(EventType::parse(t.as_str()), Ok(t));
        }
        assert!(matches!(
            EventType::parse("record.moved"),
            Err(EventError::UnknownType(_))
        ));
    }

    #[test]
    fn collection_names() {
        for ok in ["posts", "public.products", "a-b_c9"] {
            assert_eq!(validate_collection(ok), Ok(()), "{ok}");
        }
        for bad in ["", ".a", "a.", "a..b", "a b", "a*", "a>", &"x".repeat(129)] {
            assert!(validate_collection(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn presence_may_be_subscribed_to_but_not_published_on() {
        assert_eq!(validate_collection(PRESENCE_COLLECTION), Ok(()));
        let fake = Event::new(
            EventType::UserJoined,
            PRESENCE_COLLECTION,
            "mallory",
            Event::empty_data(),
        );
        assert_eq!(
            fake.validate(),
            Err(EventError::Reserved(PRESENCE_COLLECTION.into()))
        );
        let near = Event::new(EventType::Broadcast, "presence.x", "", Event::empty_data());
        assert_eq!(near.validate(), Ok(()));
    }

    #[test]
    fn timestamps() {
        let t = parse_timestamp("2025-01-15T10:30:00Z").unwrap();
        assert_eq!(format_timestamp(t), "2025-01-15T10:30:00.000000Z");
        assert_eq!(parse_timestamp("2025-01-15T10:30:00").unwrap(), t);
        assert_eq!(
            parse_timestamp("2025-01-15T12:30:00.5+02:00").unwrap(),
            t + std::time::Duration::from_millis(500)
        );
        assert!(parse_timestamp("yesterday").is_err());
    }
}
