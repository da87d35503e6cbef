//! The bus: how events travel from publishers to the engines of every node.
//!
//! Two adapters behind one small interface. [`memory`] is the default: one
//! node, nothing to install, sequence numbers from a counter. [`nats`] puts
//! every event on a JetStream stream (`strom.events.<collection>`), which
//! assigns the sequence numbers and keeps history; each node reads only the
//! collections its local subscribers need.
//!
//! Adapters move events and bytes; they know nothing of subscribers beyond
//! handing each event to an [`Inbox`], which the engine implements.

pub mod memory;
pub mod nats;
pub mod presence_sync;

use crate::event::{Event, Position, SharedEvent};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;

/// Which of a node's subscriptions one delivery is for. The memory bus
/// serves both at once; the NATS bus reads collections and `*` through
/// separate consumers, each delivering its own part, so no event arrives
/// twice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Audience {
    Everyone,
    CollectionOnly,
    WildcardOnly,
}

/// Where the bus delivers the events it carries: the node's engine. The
/// bus defines it, so the bus never names the engine.
pub trait Inbox: Send + Sync + 'static {
    /// Takes one event; called in seq order per collection (per `*`).
    fn deliver(&self, event: Arc<SharedEvent>, audience: Audience);
}

#[derive(Debug, Error)]
pub enum BusError {
    #[error("cannot connect to NATS at {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error(
        "NATS JetStream did not answer: {0}. Is nats-server running with JetStream (-js), and does its cluster have a leader?"
    )]
    JetStream(String),
    #[error("the JetStream {0}")]
    StreamSettings(String),
    #[error("{0}")]
    ServerVersion(String),
    #[error("publishing to NATS failed: {0}")]
    Publish(String),
    #[error("subscribing on NATS failed: {0}")]
    Subscribe(String),
    #[error("reading history from NATS failed: {0}")]
    History(String),
    #[error("presence over NATS failed to start: {0}")]
    Presence(String),
    #[error(
        "a resume position of {given} seq(s) for a subscription whose events come from {streams} NATS stream(s): `*` over several streams (--nats-partitions) resumes from a position token of one seq per stream (`12,0,40`, kept from the events' `partition` and `seq`), anything else from one seq"
    )]
    PositionMismatch { given: usize, streams: usize },
}

/// How much history the bus keeps for resuming subscribers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub max_age: Duration,
    pub max_events: usize,
    /// Bytes of events' `data` and `old_data` (JetStream: of its messages).
    pub max_bytes: u64,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            max_age: Duration::from_secs(24 * 3600),
            max_events: 100_000,
            max_bytes: 256 * 1024 * 1024,
        }
    }
}

/// What a publish did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Receipt {
    /// One seq per event, in order.
    pub seqs: Vec<u64>,
    /// The indexes of events the bus already had, by the same publisher's
    /// `id` (NATS: within the stream's duplicate window): they were not
    /// published again, and their seq is the original's.
    pub duplicates: Vec<usize>,
}

/// How the bus is, for `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BusState {
    /// Whether the node is connected to the bus (always, in memory).
    pub connected: bool,
    /// JetStream consumers on the stream, cluster-wide (`None`: in memory,
    /// or JetStream did not answer).
    pub consumers: Option<usize>,
    /// Events retained for resuming subscribers (`None`: unknown now).
    pub history_events: Option<u64>,
}

/// The retained events a resuming subscription missed.
pub struct Replay {
    /// Events after the resume position, in seq order per stream, up to
    /// `head`.
    pub history: History,
    /// Where the history ends: later events arrive live.
    pub head: Position,
    /// The oldest seq still retained (per stream); a resume position before
    /// it (minus one) has lost events.
    pub first_available: Position,
}

/// A source of retained events, read one at a time so a long replay is
/// paced by its reader.
pub enum History {
    Memory(std::vec::IntoIter<Arc<SharedEvent>>),
    /// One reader per stream, read one after the other.
    Nats(VecDeque<nats::HistoryReader>),
}

impl History {
    pub async fn next(&mut self) -> Option<Result<Arc<SharedEvent>, BusError>> {
        match self {
            History::Memory(events) => events.next().map(Ok),
            History::Nats(readers) => loop {
                // Boxed: a NATS read's future is large, and inline it would
                // size every connection's task (`Connection::recv` awaits
                // this), though only a resuming subscription reads history.
                match Box::pin(readers.front_mut()?.next()).await {
                    Some(item) => return Some(item),
                    None => drop(readers.pop_front()),
                }
            },
        }
    }
}

pub enum Bus {
    Memory(memory::MemoryBus),
    Nats(nats::NatsBus),
}

/// Keeps the bus delivering a collection (or `*`) to this node while held.
pub enum Interest {
    /// The memory bus delivers everything; nothing to hold.
    Always,
    Nats(nats::Watch),
}

impl Bus {
    /// The backend's name, as reported by `/api/v1/stats`.
    pub fn backend(&self) -> &'static str {
        match self {
            Bus::Memory(_) => "memory",
            Bus::Nats(_) => "nats",
        }
    }

    /// Publishes events in order and returns their sequence numbers.
    pub async fn publish(&self, events: Vec<Event>) -> Result<Receipt, BusError> {
        match self {
            Bus::Memory(bus) => Ok(Receipt {
                seqs: bus.publish(events),
                duplicates: Vec::new(),
            }),
            Bus::Nats(bus) => bus.publish(events).await,
        }
    }

    pub async fn state(&self) -> BusState {
        match self {
            Bus::Memory(bus) => BusState {
                connected: true,
                consumers: None,
                history_events: Some(bus.retained() as u64),
            },
            Bus::Nats(bus) => bus.state().await,
        }
    }

    /// Whether the bus can serve subscriptions and replays now; else why
    /// not. The memory bus always can.
    pub async fn readiness(&self) -> Result<(), String> {
        match self {
            Bus::Memory(_) => Ok(()),
            Bus::Nats(bus) => bus.readiness().await,
        }
    }

    /// Where a subscription to what `interest` holds, in the router before
    /// this call, switches from history to live: every later event reaches
    /// it live, so resuming from here misses nothing. For `*` over several
    /// NATS streams, one seq per stream.
    pub fn position(&self, interest: &Interest) -> Position {
        match (self, interest) {
            (Bus::Memory(bus), _) => Position::seq(bus.head()),
            (Bus::Nats(_), Interest::Nats(watch)) => watch.position(),
            (Bus::Nats(_), Interest::Always) => unreachable!("the NATS bus hands out watches"),
        }
    }

    /// The retained events of `collection` (`*`: all) after `since`, up to
    /// at least [`Bus::position`] (read now) of the subscription holding
    /// `interest`, which is in the router already.
    pub async fn replay(
        &self,
        collection: &str,
        since: &Position,
        interest: &Interest,
    ) -> Result<Replay, BusError> {
        let until = self.position(interest);
        if since.streams() != until.streams() {
            return Err(BusError::PositionMismatch {
                given: since.streams(),
                streams: until.streams(),
            });
        }
        match self {
            Bus::Memory(bus) => Ok(bus.replay(collection, since.of(None))),
            Bus::Nats(bus) => bus.replay(collection, since, &until).await,
        }
    }

    /// Makes sure events of `collection` (`*`: all) reach this node from
    /// the moment this returns until the returned [`Interest`] is dropped.
    pub async fn interest(&self, collection: &str) -> Result<Interest, BusError> {
        match self {
            Bus::Memory(_) => Ok(Interest::Always),
            Bus::Nats(bus) => Ok(Interest::Nats(bus.watch(collection).await?)),
        }
    }
}
