//! The NATS bus: JetStream carries events between nodes and keeps history.
//!
//! Layout: every event is a message on `<prefix>.<collection>` (default
//! prefix `strom.events`) whose body is the event JSON of [`crate::codec`].
//! One stream (default `STROM_EVENTS`) captures `<prefix>.>`; its sequence
//! number is the event's `seq`, the same on every node. So `nats pub
//! strom.events.posts '{"type":"record.created","data":{...}}'` reaches
//! subscribers exactly like a Publish call.
//!
//! strom creates no JetStream consumers. JetStream places a new consumer on
//! a random server of the stream's group and goes on choosing a server that
//! was killed (not shut down) for as long as it stays down, where the
//! consumer is never created and its request never answers; a replicated
//! consumer whose preferred leader is that server takes seconds to elect
//! another. Instead:
//!
//! - **Live**: the stream republishes what it stores on
//!   `<prefix>_live.<collection>`, with its seq and the seq of the
//!   subject's previous event in headers. A node subscribes to the
//!   collections its local subscribers need (and to `<prefix>_live.>` while
//!   anyone subscribes to `*`) when the first local subscriber arrives, and
//!   drops the subscription when the last leaves. A watch resolves only once
//!   its subscription is in place and its position read behind it, so an
//!   event published after a subscribe returned is never missed. Core NATS
//!   may drop a message (a reconnection, a lost server): the next event
//!   shows the gap, which is read from the stream first; a tail check finds
//!   one with nothing after it.
//! - **History**: batches of direct gets (`$JS.API.DIRECT.GET`, nats-server
//!   2.11 or later, the stream with `allow_direct`), answered by any live
//!   replica, so a replay costs the cluster no meta-group proposal and
//!   never waits on a lost server.
//!
//! A resuming subscription switches from history to live at the watch's
//! *position*: the stream sequence up to which the node's watch has
//! handed every event on (stored before each event is handed on, and read
//! after the subscription is in the router). Everything after it arrives
//! live, and the replay reads exactly up to it. Nothing here trusts a
//! replica's view of the stream's end: after a server is lost, stream info
//! and a replica's answers can lag behind what other servers have already
//! delivered. A direct-get batch that ends short of the position is
//! checked with the stream leader, and a leader's end short of a resuming
//! client's position with what the node has seen stored (a leader elected
//! a moment ago can report less than the stream holds).
//!
//! One stream is the ceiling of a cluster's publish rate. With
//! `--nats-partitions N` (N > 1) collections are spread over N streams,
//! `<stream>_0` … `<stream>_<N-1>`: a collection's events go to partition
//! `fnv1a32(collection) % N`, on `<prefix>.<partition>.<collection>`. A
//! collection lives in one stream, so its events' `seq` (that stream's
//! sequence) is still one number that orders them and resumes exactly. `*`
//! reads every stream live, and resumes from a position of one seq per
//! stream.
//!
//! Every NATS request that fails or times out is counted
//! (`strom_nats_request_failures_total{op}`) and logged at WARN, at most
//! once per operation every [`FAILURE_LOG_EVERY`], so an outage cannot
//! flood the log.

use super::presence_sync::{self, PresenceState, PresenceTiming};
use super::{Audience, BusError, BusState, History, Inbox, Receipt, Replay, Retention};
use crate::codec::{decode_event, encode_bus_body};
use crate::event::{Event, Position, SharedEvent, WILDCARD};
use crate::metrics::{METRICS, NatsOp};
use async_nats::jetstream::{self, stream};
use async_nats::{HeaderMap, StatusCode};
use futures_util::StreamExt;
use serde_json::json;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::OnceCell;
use tokio::task::AbortHandle;

#[derive(Debug, Clone)]
pub struct NatsConfig {
    pub url: String,
    /// JetStream stream name.
    pub stream: String,
    /// Subject prefix; events go to `<prefix>.<collection>`.
    pub subject_prefix: String,
    /// Presence heartbeats between nodes.
    pub presence: PresenceTiming,
    /// Copies of the stream JetStream keeps: 1 on a single server, 3 in a
    /// cluster, so that losing a server loses neither history nor
    /// publishing.
    pub replicas: usize,
    /// How long a NATS request (stream info, a direct get) or the next
    /// event of a replay may take before strom gives up with `unavailable`.
    pub timeout: Duration,
    /// How long startup waits for JetStream to answer: a cluster still
    /// electing its leader does not, for a while.
    pub startup_timeout: Duration,
    /// Streams the collections are spread over (see the module docs).
    pub partitions: usize,
}

/// Where a collection's events live: its stream, its subject.
#[derive(Debug, Clone)]
struct Layout {
    stream: String,
    prefix: String,
    partitions: usize,
}

impl Layout {
    fn stream_name(&self, partition: usize) -> String {
        match self.partitions {
            1 => self.stream.clone(),
            _ => format!("{}_{partition}", self.stream),
        }
    }

    /// The subjects stream `partition` captures.
    fn stream_subjects(&self, partition: usize) -> String {
        self.filter(partition, WILDCARD)
    }

    /// The subjects of `key` (a collection, or `*`) in stream `partition`.
    fn filter(&self, partition: usize, key: &str) -> String {
        Self::subjects(&self.prefix, self.partitions, partition, key)
    }

    /// Where stream `partition` republishes what it stores of `key`: the
    /// same subject under `<prefix>_live`.
    fn live(&self, partition: usize, key: &str) -> String {
        let live = format!("{}_live", self.prefix);
        Self::subjects(&live, self.partitions, partition, key)
    }

    fn subjects(prefix: &str, partitions: usize, partition: usize, key: &str) -> String {
        let tail = if key == WILDCARD { ">" } else { key };
        match partitions {
            1 => format!("{prefix}.{tail}"),
            _ => format!("{prefix}.{partition}.{tail}"),
        }
    }

    /// Stream `partition`'s republishing of every event it stores, with
    /// its seq and the seq of the subject's previous event in headers.
    fn republish(&self, partition: usize) -> stream::Republish {
        stream::Republish {
            source: self.stream_subjects(partition),
            destination: self.live(partition, WILDCARD),
            headers_only: false,
        }
    }

    /// The subject an event of `collection` is published on.
    fn subject(&self, collection: &str) -> String {
        self.filter(partition_of(collection, self.partitions), collection)
    }

    /// The partition (`None` with one stream) and collection a stream
    /// message's subject names.
    fn locate<'s>(&self, subject: &'s str) -> (Option<u32>, &'s str) {
        let rest = subject
            .strip_prefix(self.prefix.as_str())
            .and_then(|rest| rest.strip_prefix('.'))
            .unwrap_or_default();
        match self.partitions {
            1 => (None, rest),
            _ => rest
                .split_once('.')
                .map_or((None, ""), |(k, collection)| (k.parse().ok(), collection)),
        }
    }

    /// The streams that carry `key`'s events.
    fn partitions_of(&self, key: &str) -> Vec<usize> {
        match key {
            WILDCARD => (0..self.partitions).collect(),
            collection => vec![partition_of(collection, self.partitions)],
        }
    }
}

/// The partition of `collection` among `partitions` streams: FNV-1a (32
/// bits) of its name, modulo the count. Publishers that write to NATS
/// directly compute the same to pick the subject.
pub fn partition_of(collection: &str, partitions: usize) -> usize {
    if partitions <= 1 {
        return 0;
    }
    let hash = collection.bytes().fold(0x811c_9dc5_u32, |hash, byte| {
        (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193)
    });
    (hash % partitions as u32) as usize
}

impl NatsConfig {
    pub fn new(url: impl Into<String>) -> Self {
        NatsConfig {
            url: url.into(),
            stream: "STROM_EVENTS".into(),
            subject_prefix: "strom.events".into(),
            presence: PresenceTiming::default(),
            replicas: 1,
            timeout: Duration::from_secs(10),
            startup_timeout: Duration::from_secs(60),
            partitions: 1,
        }
    }
}

/// How long `/metrics` and `/readyz` wait for the stream's state.
const STATE_TIMEOUT: Duration = Duration::from_secs(2);

/// Events one direct-get request asks for, and their bytes at most.
const HISTORY_BATCH: usize = 256;
const HISTORY_BATCH_BYTES: usize = 1 << 20;

/// How often a stream's end that lies before a resume position is asked
/// again (see `Inner::confirmed_end`).
const END_RECHECK: Duration = Duration::from_millis(100);

/// The status of a direct get's end of batch ("204 EOB").
const END_OF_BATCH: u16 = 204;

/// How often a watch asks the stream for its key's newest event, besides
/// after every reconnection and leader change: an event republished while
/// nobody listened shows no gap until the next one.
const TAIL_CHECK_EVERY: Duration = Duration::from_secs(30);

/// The oldest nats-server that answers direct gets in batches.
const MIN_SERVER_VERSION: (u64, u64) = (2, 11);

/// At most one WARN line per operation this often, however many requests
/// fail (the counter counts them all).
pub const FAILURE_LOG_EVERY: Duration = Duration::from_secs(10);

pub struct NatsBus {
    inner: Arc<Inner>,
}

struct Inner {
    client: async_nats::Client,
    js: jetstream::Context,
    /// See [`NatsConfig::timeout`].
    timeout: Duration,
    /// When a republished event may last have been missed, and a stream's
    /// reported end may lag: the client reconnected or dropped messages,
    /// or a stream elected a leader (`None`: not since the first connect).
    doubts: tokio::sync::watch::Sender<Option<tokio::time::Instant>>,
    /// One per partition.
    streams: Vec<stream::Stream>,
    /// Per partition: the highest seq this node has seen stored (acked to
    /// its publishes, handed on by its watches), to tell a stream leader's
    /// stale report of its end from a stream made anew.
    seen: Vec<AtomicU64>,
    /// Per partition: when the stream was created (Unix nanoseconds); a
    /// change means it was made anew, and `seen` starts over.
    created: Vec<std::sync::atomic::AtomicI64>,
    layout: Layout,
    inbox: Arc<dyn Inbox>,
    /// Per partition and collection (or `*`): how many local subscriptions
    /// want it, and its watch.
    watches: Mutex<HashMap<WatchKey, (usize, Arc<WatchState>)>>,
    failures: FailureLog,
}

/// A watch's stream (partition) and what it reads (a collection or `*`).
type WatchKey = (usize, String);

#[derive(Default)]
struct WatchState {
    started: OnceCell<Result<AbortHandle, String>>,
    /// Every event of the key up to this stream sequence has been handed
    /// to the inbox, or came before the watch began (see the module docs).
    position: AtomicU64,
}

/// When each operation's failure was last logged, and how many went
/// unlogged since.
struct FailureLog {
    start: Instant,
    /// Milliseconds since `start` of the last line per [`NatsOp`] (0: none).
    logged_at: [AtomicU64; NatsOp::ALL.len()],
    unlogged: [AtomicU64; NatsOp::ALL.len()],
}

impl FailureLog {
    fn new() -> Self {
        FailureLog {
            start: Instant::now(),
            logged_at: [const { AtomicU64::new(0) }; NatsOp::ALL.len()],
            unlogged: [const { AtomicU64::new(0) }; NatsOp::ALL.len()],
        }
    }

    /// Counts a failed request and says whether to log it now, with how
    /// many failures of `op` went unlogged before it.
    fn note(&self, op: NatsOp) -> Option<u64> {
        METRICS.nats_request_failures.add(op as usize, 1);
        self.due(op, self.start.elapsed())
    }

    /// Whether a failure of `op` at `now` (since `start`) is logged.
    fn due(&self, op: NatsOp, now: Duration) -> Option<u64> {
        let now = (now.as_millis() as u64).max(1);
        let last = &self.logged_at[op as usize];
        let previous = last.load(Ordering::Relaxed);
        let due = previous == 0 || now - previous.min(now) >= FAILURE_LOG_EVERY.as_millis() as u64;
        let claimed = due
            && last
                .compare_exchange(previous, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok();
        if claimed {
            Some(self.unlogged[op as usize].swap(0, Ordering::Relaxed))
        } else {
            self.unlogged[op as usize].fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// Reads the retained events of one collection (or `*`) in one stream
/// after a sequence number up to another, in batches of direct gets.
pub struct HistoryReader {
    inner: Arc<Inner>,
    partition: usize,
    key: String,
    /// The next sequence to ask for; past `until` once done.
    next: u64,
    until: u64,
    /// Read and not yet handed out.
    batch: VecDeque<Arc<SharedEvent>>,
}

impl HistoryReader {
    pub async fn next(&mut self) -> Option<Result<Arc<SharedEvent>, BusError>> {
        loop {
            if let Some(event) = self.batch.pop_front() {
                return Some(Ok(event));
            }
            if self.next > self.until {
                return None;
            }
            if let Err(e) = self.fill().await {
                self.next = u64::MAX;
                let error = self.inner.failed(NatsOp::History, &self.key, e);
                return Some(Err(BusError::History(error)));
            }
        }
    }

    /// Reads the next batch from whichever replica answers, and where it
    /// ends short of `until` with nothing more pending there (that replica
    /// may lag behind the node's watch), the next event from the stream
    /// leader.
    async fn fill(&mut self) -> Result<(), String> {
        let inner = Arc::clone(&self.inner);
        let (messages, pending) = inner
            .direct_batch(self.partition, &self.key, self.next)
            .await?;
        let fetched = messages.len();
        for message in messages {
            self.take(&message);
        }
        if (pending == 0 || fetched == 0) && self.next <= self.until {
            match inner
                .next_from_leader(self.partition, &self.key, self.next)
                .await?
            {
                Some(message) => self.take(&message),
                None => self.next = self.until + 1,
            }
        }
        Ok(())
    }

    /// Keeps `message` if it is the next one wanted, and moves on past it.
    fn take(&mut self, message: &jetstream::message::StreamMessage) {
        let seq = message.sequence;
        if seq < self.next || self.next > self.until {
            return;
        }
        if seq > self.until {
            self.next = self.until + 1;
            return;
        }
        self.next = seq + 1;
        if let Some(event) = self.inner.decode(message) {
            self.batch.push_back(event);
        }
    }
}

/// Holds a collection's watch open (`*`: one per partition); the last
/// one dropped stops it.
pub struct Watch {
    inner: Arc<Inner>,
    keys: Vec<WatchKey>,
    states: Vec<Arc<WatchState>>,
}

impl Watch {
    /// Where a subscription that was in the router before this call
    /// switches from history to live (see the module docs): one seq per
    /// stream the watch reads.
    pub fn position(&self) -> Position {
        let seqs = self.states.iter();
        Position::per_stream(seqs.map(|s| s.position.load(Ordering::SeqCst)).collect())
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        for key in &self.keys {
            self.inner.release(key);
        }
    }
}

/// Refuses a nats-server older than [`MIN_SERVER_VERSION`], whose direct
/// gets cannot read history in batches.
fn check_server_version(url: &str, version: &str) -> Result<(), BusError> {
    let mut parts = version
        .split(['.', '-'])
        .map(|part| part.parse::<u64>().unwrap_or(0));
    let found = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if version.is_empty() || found >= MIN_SERVER_VERSION {
        return Ok(());
    }
    let (major, minor) = MIN_SERVER_VERSION;
    Err(BusError::ServerVersion(format!(
        "nats-server at {url} is version {version}; strom reads history with batched direct gets, which need {major}.{minor} or later"
    )))
}

/// Opens the event stream, creating it if needed, and waits up to the
/// startup timeout for JetStream to answer, saying what it waits for. A
/// stream that exists with other replicas or subjects is an error: reusing
/// it silently would leave history where the settings say it is not.
async fn open_stream(
    js: &jetstream::Context,
    config: &NatsConfig,
    layout: &Layout,
    partition: usize,
    retention: Retention,
) -> Result<stream::Stream, BusError> {
    let name = layout.stream_name(partition);
    let subjects = layout.stream_subjects(partition);
    let wanted = stream::Config {
        name: name.clone(),
        subjects: vec![subjects.clone()],
        max_age: retention.max_age,
        max_messages: retention.max_events as i64,
        max_bytes: i64::try_from(retention.max_bytes).unwrap_or(i64::MAX),
        storage: stream::StorageType::File,
        num_replicas: config.replicas,
        allow_direct: true,
        republish: Some(layout.republish(partition)),
        ..Default::default()
    };
    let deadline = tokio::time::Instant::now() + config.startup_timeout;
    let stream = loop {
        let error =
            match tokio::time::timeout(config.timeout, js.get_or_create_stream(wanted.clone()))
                .await
            {
                Ok(Ok(stream)) => break stream,
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no answer within {:?}", config.timeout),
            };
        if tokio::time::Instant::now() >= deadline {
            return Err(BusError::JetStream(format!(
                "stream {name} at {}, waited {:?}; last error: {error}",
                config.url, config.startup_timeout
            )));
        }
        tracing::info!(stream = %name, url = %config.url, "waiting for JetStream: {error}");
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let actual = &stream.cached_info().config;
    if actual.num_replicas.max(1) != config.replicas.max(1) || !actual.subjects.contains(&subjects)
    {
        return Err(BusError::StreamSettings(format!(
            "stream {name} exists with {} replica(s) on subjects {:?}; strom wants {} replica(s) on {subjects:?}. \
             Change the stream (nats stream edit) or start strom with matching --nats-replicas / --nats-subject-prefix / --nats-partitions",
            actual.num_replicas, actual.subjects, config.replicas
        )));
    }
    let stream = if actual.allow_direct && actual.republish == wanted.republish {
        stream
    } else {
        // A stream made by an older strom: live events come republished,
        // and replays are direct gets.
        tracing::info!(stream = %name, "republishing events and allowing direct gets on the stream");
        let allowed = stream::Config {
            allow_direct: true,
            republish: wanted.republish.clone(),
            ..actual.clone()
        };
        let update = async {
            js.update_stream(allowed).await.map_err(|e| e.to_string())?;
            js.get_stream(&name).await.map_err(|e| e.to_string())
        };
        match tokio::time::timeout(config.timeout, update).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => return Err(BusError::JetStream(format!("updating stream {name}: {e}"))),
            Err(_) => {
                let waited = config.timeout;
                return Err(BusError::JetStream(format!(
                    "updating stream {name}: no answer within {waited:?}"
                )));
            }
        }
    };
    let actual = &stream.cached_info().config;
    if (actual.max_age, actual.max_messages, actual.max_bytes)
        != (wanted.max_age, wanted.max_messages, wanted.max_bytes)
    {
        tracing::warn!(
            stream = %name,
            "the stream keeps its own retention (max_age {:?}, max_msgs {}, max_bytes {}), not this node's --history-* flags",
            actual.max_age,
            actual.max_messages,
            actual.max_bytes
        );
    }
    Ok(stream)
}

impl NatsBus {
    pub async fn connect(
        config: NatsConfig,
        retention: Retention,
        inbox: Arc<dyn Inbox>,
        presence: Arc<dyn PresenceState>,
    ) -> Result<NatsBus, BusError> {
        let (doubts, _) = tokio::sync::watch::channel(None);
        let doubt = doubts.clone();
        let connected_once = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let client = async_nats::ConnectOptions::new()
            .name("strom")
            .retry_on_initial_connect()
            .event_callback(move |event| {
                let (doubt, connected_once) = (doubt.clone(), Arc::clone(&connected_once));
                async move {
                    let doubtful = match event {
                        async_nats::Event::Connected => connected_once.swap(true, Ordering::SeqCst),
                        async_nats::Event::SlowConsumer(_) => true,
                        _ => false,
                    };
                    if doubtful {
                        doubt.send_replace(Some(tokio::time::Instant::now()));
                    }
                }
            })
            // Several servers of one cluster: `nats://a:4222,nats://b:4222`.
            .connect(config.url.split(',').map(str::trim).collect::<Vec<_>>())
            .await
            .map_err(|e| BusError::Connect {
                url: config.url.clone(),
                reason: e.to_string(),
            })?;
        presence_sync::start(client.clone(), presence, config.presence)
            .await
            .map_err(|e| BusError::Presence(e.to_string()))?;
        let js = jetstream::new(client.clone());
        let layout = Layout {
            stream: config.stream.clone(),
            prefix: config.subject_prefix.clone(),
            partitions: config.partitions.max(1),
        };
        let mut streams = Vec::with_capacity(layout.partitions);
        for partition in 0..layout.partitions {
            streams.push(open_stream(&js, &config, &layout, partition, retention).await?);
        }
        // Known once JetStream answered: the client connects in the background.
        check_server_version(&config.url, &client.server_info().version)?;
        for partition in 0..layout.partitions {
            let name = layout.stream_name(partition);
            let elected = format!("$JS.EVENT.ADVISORY.STREAM.LEADER_ELECTED.{name}");
            let mut advisories = (client.subscribe(elected).await)
                .map_err(|e| BusError::Subscribe(e.to_string()))?;
            let doubt = doubts.clone();
            tokio::spawn(async move {
                while advisories.next().await.is_some() {
                    doubt.send_replace(Some(tokio::time::Instant::now()));
                }
            });
        }
        Ok(NatsBus {
            inner: Arc::new(Inner {
                client,
                js,
                timeout: config.timeout,
                doubts,
                seen: streams.iter().map(|_| AtomicU64::new(0)).collect(),
                created: (streams.iter())
                    .map(|stream| created_nanos(&stream.cached_info().created).into())
                    .collect(),
                streams,
                layout,
                inbox,
                watches: Mutex::new(HashMap::new()),
                failures: FailureLog::new(),
            }),
        })
    }

    pub async fn publish(&self, events: Vec<Event>) -> Result<Receipt, BusError> {
        let collection = events.first().map_or("", |event| event.collection.as_str());
        let publish_error = |e: &dyn std::fmt::Display| {
            BusError::Publish(
                self.inner
                    .failed(NatsOp::Publish, collection, e.to_string()),
            )
        };
        let mut acks = Vec::with_capacity(events.len());
        for event in &events {
            let subject = self.inner.layout.subject(&event.collection);
            let body = encode_bus_body(event).into();
            // A source id makes JetStream drop a second copy (within the
            // stream's duplicate window). Ids are the publisher's own: one
            // publisher's id cannot suppress another's event.
            let ack = match &event.id {
                Some(id) => {
                    let sender = event.sender.as_deref().unwrap_or("anonymous");
                    let mut headers = async_nats::HeaderMap::new();
                    headers.insert("Nats-Msg-Id", format!("{sender}/{id}").as_str());
                    self.inner
                        .js
                        .publish_with_headers(subject, headers, body)
                        .await
                }
                None => self.inner.js.publish(subject, body).await,
            }
            .map_err(|e| publish_error(&e))?;
            acks.push(ack);
        }
        let mut receipt = Receipt::default();
        for (i, ack) in acks.into_iter().enumerate() {
            let ack = ack.await.map_err(|e| publish_error(&e))?;
            receipt.seqs.push(ack.sequence);
            let partition = partition_of(&events[i].collection, self.inner.layout.partitions);
            self.inner.seen[partition].fetch_max(ack.sequence, Ordering::SeqCst);
            if ack.duplicate {
                receipt.duplicates.push(i);
            }
        }
        Ok(receipt)
    }

    /// Whether the client is connected, and what the stream holds (unknown
    /// while JetStream does not answer).
    pub async fn state(&self) -> BusState {
        let connected =
            self.inner.client.connection_state() == async_nats::connection::State::Connected;
        // Short of the NATS timeout: a scrape should not outwait Prometheus.
        let mut stream = Some((0, 0));
        for partition in &self.inner.streams {
            let info = tokio::time::timeout(STATE_TIMEOUT, partition.get_info()).await;
            stream = match (stream, info) {
                (Some((consumers, messages)), Ok(Ok(info))) => Some((
                    consumers + info.state.consumer_count,
                    messages + info.state.messages,
                )),
                _ => None,
            };
        }
        BusState {
            connected,
            consumers: stream.map(|(consumers, _)| consumers),
            history_events: stream.map(|(_, messages)| messages),
        }
    }

    /// Whether this node can serve replays now: connected, every stream has
    /// a leader that answers, and some replica answers direct gets; else
    /// what is wrong.
    pub async fn readiness(&self) -> Result<(), String> {
        if self.inner.client.connection_state() != async_nats::connection::State::Connected {
            return Err("not connected to NATS".into());
        }
        for (partition, stream) in self.inner.streams.iter().enumerate() {
            let name = self.inner.layout.stream_name(partition);
            let info = tokio::time::timeout(STATE_TIMEOUT, stream.get_info()).await;
            let first = match info {
                Ok(Ok(info)) => info.state.first_sequence,
                Ok(Err(e)) => return Err(format!("stream {name}: {e}")),
                Err(_) => {
                    return Err(format!(
                        "stream {name}: no leader answered within {STATE_TIMEOUT:?}"
                    ));
                }
            };
            let probe =
                (self.inner).direct_get(partition, json!({"seq": first.max(1), "batch": 1}));
            match tokio::time::timeout(STATE_TIMEOUT, probe).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(format!("stream {name}: direct get: {e}")),
                Err(_) => {
                    return Err(format!(
                        "stream {name}: no replica answered a direct get within {STATE_TIMEOUT:?}"
                    ));
                }
            }
        }
        Ok(())
    }

    /// The retained events of `key` after `since` up to `until` (the
    /// position of the caller's watch; both one seq per stream of `key`),
    /// read in direct-get batches, one stream after another. The replay's
    /// head is `until`, or `since` where the client is ahead of this node
    /// (its watch lags behind the node the client came from) but not past
    /// the stream's end: what the client has must not come again live,
    /// while a position past the end (a stream made anew) still gets every
    /// new event. A stream leader elected a moment ago can report an end
    /// short of what it stored, so then an end before `since` is asked
    /// again (see [`Inner::confirmed_end`]).
    pub async fn replay(
        &self,
        key: &str,
        since: &Position,
        until: &Position,
    ) -> Result<Replay, BusError> {
        let mut readers = VecDeque::new();
        let (mut head, mut first_available) = (Vec::new(), Vec::new());
        for partition in self.inner.layout.partitions_of(key) {
            let k = Some(partition as u32);
            let (since, until) = (since.of(k), until.of(k));
            let (first, mut last) = self.inner.stream_bounds(partition, key).await?;
            if since > last {
                last = self
                    .inner
                    .confirmed_end(partition, key, since, last)
                    .await?;
            }
            let next = since.saturating_add(1).max(first);
            if next <= until {
                readers.push_back(HistoryReader {
                    inner: Arc::clone(&self.inner),
                    partition,
                    key: key.to_owned(),
                    next,
                    until,
                    batch: VecDeque::new(),
                });
            }
            head.push(until.max(since.min(last)));
            first_available.push(first);
        }
        Ok(Replay {
            history: History::Nats(readers),
            head: Position::per_stream(head),
            first_available: Position::per_stream(first_available),
        })
    }

    /// Makes events of `key` (a collection or `*`) flow to this node.
    pub async fn watch(&self, key: &str) -> Result<Watch, BusError> {
        let keys: Vec<WatchKey> = (self.inner.layout.partitions_of(key).into_iter())
            .map(|partition| (partition, key.to_owned()))
            .collect();
        let states: Vec<Arc<WatchState>> = {
            let mut watches = self.inner.watches.lock().expect("watches lock");
            (keys.iter())
                .map(|key| {
                    let entry = watches.entry(key.clone()).or_default();
                    entry.0 += 1;
                    Arc::clone(&entry.1)
                })
                .collect()
        };
        // Dropped on an error below, giving every key back.
        let watch = Watch {
            inner: Arc::clone(&self.inner),
            keys,
            states,
        };
        for (key, state) in watch.keys.iter().zip(&watch.states) {
            let inner = Arc::clone(&self.inner);
            let started = state
                .started
                .get_or_init(|| inner.start_watch(key.clone(), Arc::clone(state)))
                .await;
            if let Err(e) = started {
                return Err(BusError::Subscribe(e.clone()));
            }
        }
        Ok(watch)
    }
}

impl Inner {
    /// `request`, or an error naming `what` when NATS has not answered
    /// within the timeout.
    async fn bounded<T>(&self, what: &str, request: impl Future<Output = T>) -> Result<T, String> {
        tokio::time::timeout(self.timeout, request)
            .await
            .map_err(|_| format!("NATS did not answer for {what} within {:?}", self.timeout))
    }

    /// Counts a failed request of `op` for `collection` and logs it
    /// (rate-limited, see [`FAILURE_LOG_EVERY`]); the error, to pass on.
    fn failed(&self, op: NatsOp, collection: &str, error: String) -> String {
        if let Some(unlogged) = self.failures.note(op) {
            let op = op.as_str();
            tracing::warn!(op, %collection, unlogged, "NATS request failed: {error}");
        }
        error
    }

    /// [`Inner::failed`], as the error of a replay.
    fn history_failed(&self, op: NatsOp, key: &str, error: String) -> BusError {
        BusError::History(self.failed(op, key, error))
    }

    fn release(&self, key: &WatchKey) {
        let mut watches = self.watches.lock().expect("watches lock");
        let Some(entry) = watches.get_mut(key) else {
            return;
        };
        entry.0 -= 1;
        if entry.0 == 0 {
            if let Some(Ok(task)) = entry.1.started.get() {
                task.abort();
            }
            watches.remove(key);
        }
    }

    /// Stream `partition`'s oldest retained seq (one past the newest when
    /// it is empty) and newest seq, from its leader.
    async fn stream_bounds(&self, partition: usize, key: &str) -> Result<(u64, u64), BusError> {
        let info = self.streams[partition].get_info();
        let info = match self.bounded("stream info", info).await {
            Ok(Ok(info)) => info,
            Ok(Err(e)) => return Err(self.history_failed(NatsOp::StreamInfo, key, e.to_string())),
            Err(e) => return Err(self.history_failed(NatsOp::StreamInfo, key, e)),
        };
        let created = created_nanos(&info.created);
        if self.created[partition].swap(created, Ordering::SeqCst) != created {
            tracing::warn!(stream = %self.layout.stream_name(partition), "the stream was made anew");
            self.seen[partition].store(0, Ordering::SeqCst);
        }
        let state = info.state;
        let first = if state.messages == 0 {
            state.last_sequence + 1
        } else {
            state.first_sequence
        };
        Ok((first, state.last_sequence))
    }

    /// The end of stream `partition` for a client resuming from `since`
    /// past `last`, the end its leader first reported. Right after a leader
    /// change the new leader's report can lag behind what the stream stored
    /// by many events (seen in the chaos test: a whole outage's worth), and
    /// taken as the end it would hand the client again, live, what it
    /// already has. So:
    /// - an end before what this node has seen stored is stale for sure: it
    ///   is asked again until it catches up, and if it does not within the
    ///   timeout the resume fails with `unavailable` (the client retries);
    /// - otherwise, within the timeout after a doubt (a leader elected, a
    ///   reconnection), it is asked again until it reaches `since`;
    /// - an end still before `since` is believed: the stream was made anew,
    ///   and everything in it is new to the client.
    async fn confirmed_end(
        &self,
        partition: usize,
        key: &str,
        since: u64,
        mut last: u64,
    ) -> Result<u64, BusError> {
        let seen = self.seen[partition].load(Ordering::SeqCst);
        let doubted = *self.doubts.borrow();
        let now = tokio::time::Instant::now();
        let asked_until = if last < seen {
            now + self.timeout
        } else {
            doubted.map_or(now, |doubted| doubted + self.timeout)
        };
        while last < since && tokio::time::Instant::now() < asked_until {
            tokio::time::sleep(END_RECHECK).await;
            last = self.stream_bounds(partition, key).await?.1;
        }
        if last < seen.min(since) {
            let error = format!(
                "the stream's leader reports its end at seq {last}, behind seq {seen} stored before; it is catching up"
            );
            return Err(self.history_failed(NatsOp::StreamInfo, key, error));
        }
        Ok(last)
    }

    /// Up to [`HISTORY_BATCH`] messages of `key` in stream `partition` from
    /// seq `from` on, from any replica, and how many more that replica has.
    async fn direct_batch(
        &self,
        partition: usize,
        key: &str,
        from: u64,
    ) -> Result<(Vec<jetstream::message::StreamMessage>, u64), String> {
        let request = json!({
            "seq": from,
            "next_by_subj": self.layout.filter(partition, key),
            "batch": HISTORY_BATCH,
            "max_bytes": HISTORY_BATCH_BYTES,
        });
        self.direct_get(partition, request).await
    }

    /// Sends a batched direct get to stream `partition` and collects the
    /// answer: its messages, and how many more match (0 when none did).
    async fn direct_get(
        &self,
        partition: usize,
        request: serde_json::Value,
    ) -> Result<(Vec<jetstream::message::StreamMessage>, u64), String> {
        let subject = format!("$JS.API.DIRECT.GET.{}", self.layout.stream_name(partition));
        let inbox = self.client.new_inbox();
        let mut replies =
            (self.client.subscribe(inbox.clone()).await).map_err(|e| e.to_string())?;
        (self
            .client
            .publish_with_reply(subject, inbox, request.to_string().into())
            .await)
            .map_err(|e| e.to_string())?;
        let mut messages = Vec::new();
        loop {
            let reply = match self.bounded("a direct get", replies.next()).await? {
                Some(reply) => reply,
                None => return Err("the direct get's subscription ended".into()),
            };
            match reply.status {
                None | Some(StatusCode::OK) => {
                    let message = jetstream::message::StreamMessage::try_from(reply);
                    messages.push(message.map_err(|e| format!("a direct get's answer: {e}"))?);
                }
                // The end of the batch says how many more match.
                Some(status) if status.as_u16() == END_OF_BATCH => {
                    let pending = num_pending(reply.headers.as_ref());
                    return Ok((messages, pending));
                }
                Some(StatusCode::NOT_FOUND) => return Ok((messages, 0)),
                Some(status) => {
                    let description = reply.description.unwrap_or_default();
                    return Err(format!("direct get answered {status} {description}"));
                }
            }
        }
    }

    /// The first message of `key` in stream `partition` at or after `from`,
    /// asked of the stream leader (`None`: there is none).
    async fn next_from_leader(
        &self,
        partition: usize,
        key: &str,
        from: u64,
    ) -> Result<Option<jetstream::message::StreamMessage>, String> {
        let request = self.streams[partition]
            .raw_message_builder()
            .sequence(from)
            .next_by_subject(self.layout.filter(partition, key))
            .send();
        match self.bounded("the next message", request).await? {
            Ok(message) => Ok(Some(message)),
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Subscribes to `key`'s republished events in stream `partition`,
    /// then leaves a task handing them on. The position starts at the
    /// stream's newest seq, asked after subscribing: the request travels
    /// behind the subscription on the same connection and routes, so every
    /// event the leader stores after answering reaches it.
    async fn start_watch(
        self: Arc<Self>,
        (partition, key): WatchKey,
        state: Arc<WatchState>,
    ) -> Result<AbortHandle, String> {
        let subscribed = self.client.subscribe(self.layout.live(partition, &key));
        let live = match self.bounded("a subscription", subscribed).await {
            Ok(Ok(live)) => live,
            Ok(Err(e)) => return Err(self.failed(NatsOp::Watch, &key, e.to_string())),
            Err(e) => return Err(self.failed(NatsOp::Watch, &key, e)),
        };
        let (_, newest) = self
            .stream_bounds(partition, &key)
            .await
            .map_err(|e| e.to_string())?;
        state.position.store(newest, Ordering::SeqCst);
        let task = tokio::spawn(async move { self.run_watch(partition, key, live, state).await });
        Ok(task.abort_handle())
    }

    /// Hands `key`'s republished events to the router in seq order, none
    /// twice and none left out. Core NATS drops messages across a
    /// reconnection, a slow reader or a lost server; each event names the
    /// seq of its subject's previous one, so a gap shows at the next event,
    /// and is read from the stream before it (`*`: stream seqs follow one
    /// another). A missed event with none after it shows in the tail
    /// check, after every doubt and every [`TAIL_CHECK_EVERY`].
    async fn run_watch(
        self: &Arc<Self>,
        partition: usize,
        key: String,
        mut live: async_nats::Subscriber,
        state: Arc<WatchState>,
    ) {
        let audience = if key == WILDCARD {
            Audience::WildcardOnly
        } else {
            Audience::CollectionOnly
        };
        let mut doubts = self.doubts.subscribe();
        let mut tail_check = tokio::time::interval(TAIL_CHECK_EVERY);
        tail_check.tick().await;
        loop {
            let (message, previous) = tokio::select! {
                message = live.next() => {
                    let Some(message) = message else { return };
                    let previous = last_sequence(message.headers.as_ref());
                    match jetstream::message::StreamMessage::try_from(message) {
                        Ok(message) => (Some(message), previous),
                        Err(e) => {
                            tracing::warn!(collection = %key, "a republished event without its headers: {e}");
                            continue;
                        }
                    }
                }
                changed = doubts.changed() => {
                    if changed.is_err() { return }
                    (None, None)
                }
                _ = tail_check.tick() => (None, None),
            };
            let position = state.position.load(Ordering::SeqCst);
            // What must be read from the stream first: up to the event's
            // predecessor, or (a doubt) up to the stream's newest.
            let missing = match &message {
                Some(message) if message.sequence <= position => continue,
                Some(message) if key == WILDCARD => message.sequence - 1,
                Some(_) => previous.unwrap_or(0),
                None => self.newest_of(partition, &key).await,
            };
            if missing > position {
                self.catch_up(partition, &key, missing, audience, &state)
                    .await;
            }
            if let Some(message) = message {
                let event = self.decode(&message);
                self.hand_on(partition, message.sequence, event, audience, &state);
            }
        }
    }

    /// The seq of `key`'s newest event in stream `partition`, or 0 when
    /// the stream does not say (which is counted and logged, and leaves the
    /// next check to find it).
    async fn newest_of(&self, partition: usize, key: &str) -> u64 {
        if key == WILDCARD {
            return self
                .stream_bounds(partition, key)
                .await
                .map_or(0, |(_, last)| last);
        }
        let request = self.streams[partition]
            .raw_message_builder()
            .last_by_subject(self.layout.filter(partition, key))
            .send();
        let error = match self.bounded("the newest event", request).await {
            Ok(Ok(message)) => return message.sequence,
            Ok(Err(e)) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => return 0,
            Ok(Err(e)) => e.to_string(),
            Err(e) => e,
        };
        self.failed(NatsOp::History, key, error);
        0
    }

    /// Reads `key`'s events after the watch's position up to `until` from
    /// the stream (as a replay does) and hands them on, retrying from where
    /// it stopped until it has them all: the live events behind them wait,
    /// so none overtakes one it missed.
    async fn catch_up(
        self: &Arc<Self>,
        partition: usize,
        key: &str,
        until: u64,
        audience: Audience,
        state: &WatchState,
    ) {
        loop {
            let position = state.position.load(Ordering::SeqCst);
            if position >= until {
                return;
            }
            tracing::debug!(collection = %key, position, until, "reading events the watch missed");
            let mut missed = HistoryReader {
                inner: Arc::clone(self),
                partition,
                key: key.to_owned(),
                next: position + 1,
                until,
                batch: VecDeque::new(),
            };
            loop {
                match missed.next().await {
                    Some(Ok(event)) => {
                        let seq = event.event.seq;
                        self.hand_on(partition, seq, Some(event), audience, state);
                    }
                    // Read up to `until`: what was not there (deleted, past
                    // retention, a body that does not decode) is passed.
                    None => {
                        state.position.fetch_max(until, Ordering::SeqCst);
                        return;
                    }
                    // Counted and logged by the reader.
                    Some(Err(_)) => {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        break;
                    }
                }
            }
        }
    }

    /// Hands the event of stream `partition` at `seq` (`None`: a body that
    /// does not decode) to the router, once, and moves the watch's position
    /// to it.
    fn hand_on(
        &self,
        partition: usize,
        seq: u64,
        event: Option<Arc<SharedEvent>>,
        audience: Audience,
        state: &WatchState,
    ) {
        if seq <= state.position.load(Ordering::SeqCst) {
            return;
        }
        // Before the router sees it: a subscription that reads the position
        // after joining the router gets every later event live.
        state.position.store(seq, Ordering::SeqCst);
        self.seen[partition].fetch_max(seq, Ordering::SeqCst);
        if let Some(event) = event {
            self.inbox.deliver(event, audience);
        }
    }

    /// The event a stream message carries, with the stream's sequence number
    /// (and time, when the body has none); `None` for a body that does not
    /// decode, which is logged and skipped.
    fn decode(&self, message: &jetstream::message::StreamMessage) -> Option<Arc<SharedEvent>> {
        let (subject, seq) = (message.subject.as_str(), message.sequence);
        let published: SystemTime = message.time.into();
        let (partition, collection) = self.layout.locate(subject);
        match decode_event(&message.payload, Some(collection), published) {
            Ok(mut event) => {
                event.seq = seq;
                let mut shared = SharedEvent::new(event);
                shared.partition = partition;
                Some(Arc::new(shared))
            }
            Err(e) => {
                tracing::warn!(seq, %subject, "skipping NATS message: {e}");
                None
            }
        }
    }
}

/// A stream's creation time in Unix nanoseconds (for telling a stream made
/// anew).
fn created_nanos(created: &time::OffsetDateTime) -> i64 {
    i64::try_from(created.unix_timestamp_nanos()).unwrap_or(i64::MAX)
}

/// `Nats-Num-Pending` of a direct get's end of batch (0 when missing).
fn num_pending(headers: Option<&HeaderMap>) -> u64 {
    header_number(headers, "Nats-Num-Pending").unwrap_or(0)
}

/// `Nats-Last-Sequence` of a republished event: the seq of the previous
/// event on its subject (0: none).
fn last_sequence(headers: Option<&HeaderMap>) -> Option<u64> {
    header_number(headers, "Nats-Last-Sequence")
}

fn header_number(headers: Option<&HeaderMap>, name: &str) -> Option<u64> {
    let value = headers.and_then(|headers| headers.get(name))?;
    value.as_str().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_fnv1a_of_the_collection_name() {
        // FNV-1a 32: "a" → 0xe40c292c, "foobar" → 0xbf9cf968.
        assert_eq!(partition_of("a", 1000), 0xe40c_292c % 1000);
        assert_eq!(partition_of("foobar", 1000), 0xbf9c_f968 % 1000);
        assert_eq!(partition_of("foobar", 1), 0);
    }

    /// The default names over `partitions` streams.
    fn layout(partitions: usize) -> Layout {
        Layout {
            stream: "STROM_EVENTS".into(),
            prefix: "strom.events".into(),
            partitions,
        }
    }

    #[test]
    fn one_partition_keeps_the_single_stream_layout() {
        let single = layout(1);
        assert_eq!(single.stream_name(0), "STROM_EVENTS");
        assert_eq!(single.stream_subjects(0), "strom.events.>");
        assert_eq!(single.subject("a.b"), "strom.events.a.b");
        assert_eq!(single.locate("strom.events.a.b"), (None, "a.b"));
        assert_eq!(single.partitions_of(WILDCARD), [0]);

        let spread = layout(4);
        let k = partition_of("a.b", 4);
        assert_eq!(spread.stream_name(k), format!("STROM_EVENTS_{k}"));
        assert_eq!(spread.stream_subjects(k), format!("strom.events.{k}.>"));
        assert_eq!(spread.subject("a.b"), format!("strom.events.{k}.a.b"));
        let place = (Some(k as u32), "a.b");
        assert_eq!(spread.locate(&spread.subject("a.b")), place);
        assert_eq!(spread.partitions_of("a.b"), [k]);
        assert_eq!(spread.partitions_of(WILDCARD), [0, 1, 2, 3]);
    }

    #[test]
    fn streams_republish_every_event_under_the_live_prefix() {
        let single = layout(1);
        assert_eq!(single.live(0, "posts"), "strom.events_live.posts");
        assert_eq!(single.live(0, WILDCARD), "strom.events_live.>");
        let republish = single.republish(0);
        assert_eq!(
            (republish.source.as_str(), republish.destination.as_str()),
            ("strom.events.>", "strom.events_live.>")
        );
        assert!(
            !republish.headers_only,
            "watches hand on the republished bodies"
        );
        let spread = layout(4);
        assert_eq!(spread.live(2, "posts"), "strom.events_live.2.posts");
        assert_eq!(spread.republish(2).source, "strom.events.2.>");
        assert_eq!(spread.republish(2).destination, "strom.events_live.2.>");
    }

    #[test]
    fn servers_older_than_batched_direct_gets_are_refused_by_name() {
        for version in ["2.11.0", "2.14.6", "3.0.0-beta", ""] {
            assert!(
                check_server_version("nats://x", version).is_ok(),
                "{version}"
            );
        }
        let refused = check_server_version("nats://x:4222", "2.9.10").unwrap_err();
        let message = refused.to_string();
        assert!(
            message.contains("2.9.10") && message.contains("2.11 or later"),
            "{message}"
        );
        assert!(check_server_version("nats://x", "2.10.22").is_err());
    }

    #[test]
    fn direct_get_and_republish_headers_are_read_as_numbers() {
        let mut headers = HeaderMap::new();
        assert_eq!(
            (num_pending(Some(&headers)), last_sequence(Some(&headers))),
            (0, None)
        );
        headers.insert("Nats-Num-Pending", "13");
        headers.insert("Nats-Last-Sequence", "7");
        assert_eq!(num_pending(Some(&headers)), 13);
        assert_eq!(last_sequence(Some(&headers)), Some(7));
        assert_eq!(num_pending(None), 0);
    }

    #[test]
    fn failures_are_logged_once_per_interval_saying_how_many_were_not() {
        let log = FailureLog::new();
        let at = Duration::from_millis;
        assert_eq!(
            log.due(NatsOp::Watch, at(5)),
            Some(0),
            "the first is logged"
        );
        assert_eq!(log.due(NatsOp::Watch, at(6)), None);
        assert_eq!(log.due(NatsOp::Watch, at(7)), None);
        assert_eq!(
            log.due(NatsOp::History, at(8)),
            Some(0),
            "each operation has its own interval"
        );
        let next = at(5) + FAILURE_LOG_EVERY;
        assert_eq!(log.due(NatsOp::Watch, next - at(1)), None);
        assert_eq!(log.due(NatsOp::Watch, next), Some(3), "three went unlogged");
        assert_eq!(log.due(NatsOp::Watch, next + at(1)), None);
    }

    #[test]
    fn every_failure_counts_logged_or_not() {
        let log = FailureLog::new();
        let before = METRICS.nats_request_failures.get(NatsOp::Publish as usize);
        for _ in 0..3 {
            log.note(NatsOp::Publish);
        }
        let counted = METRICS.nats_request_failures.get(NatsOp::Publish as usize) - before;
        assert!(counted >= 3, "{counted}");
    }
}
