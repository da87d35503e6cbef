//! The NATS bus: JetStream carries events between nodes and keeps history.
//!
//! Layout: every event is a message on `<prefix>.<collection>` (default
//! prefix `strom.events`) whose body is the event JSON of [`crate::codec`].
//! One stream (default `STROM_EVENTS`) captures `<prefix>.>`; its sequence
//! number is the event's `seq`, the same on every node. So `nats pub
//! strom.events.posts '{"type":"record.created","data":{...}}'` reaches
//! subscribers exactly like a Publish call.
//!
//! A node reads only what its local subscribers need: one ordered consumer
//! per collection with local subscribers (and one on `<prefix>.>` while
//! anyone subscribes to `*`), created when the first local subscriber
//! arrives, deleted when the last leaves. A watch resolves only once its
//! consumer exists on the server, so an event published after a subscribe
//! returned is never missed.
//!
//! A resuming subscription switches from history to live at the watch's
//! *position*: the stream sequence up to which the node's consumer has
//! handed every event on (stored before each event is handed on, and read
//! after the subscription is in the router). Everything after it arrives
//! live, and the replay reads exactly up to it. Nothing here trusts a
//! replica's view of the stream's end: after a server is lost, stream info
//! and a consumer's pending count can lag behind what other servers have
//! already delivered, and a split taken from them loses the difference.
//!
//! One stream is the ceiling of a cluster's publish rate. With
//! `--nats-partitions N` (N > 1) collections are spread over N streams,
//! `<stream>_0` … `<stream>_<N-1>`: a collection's events go to partition
//! `fnv1a32(collection) % N`, on `<prefix>.<partition>.<collection>`. A
//! collection lives in one stream, so its events' `seq` (that stream's
//! sequence) is still one number that orders them and resumes exactly. `*`
//! reads every stream live; its events come from several sequences, so no
//! one number is a position in all of them, and a `*` subscription cannot
//! resume (a clear error says so).

use super::presence_sync::{self, PresenceState, PresenceTiming};
use super::{Audience, BusError, BusState, History, Inbox, Receipt, Replay, Retention};
use crate::codec::{decode_event, encode_bus_body};
use crate::event::{Event, Position, SharedEvent, WILDCARD};
use async_nats::jetstream::{self, consumer, stream};
use futures_util::StreamExt;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
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
    /// How long a NATS request (stream info, a new consumer) or the next
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

    /// What a consumer of `key` (a collection, or `*`) on stream
    /// `partition` reads.
    fn filter(&self, partition: usize, key: &str) -> String {
        let tail = if key == WILDCARD { ">" } else { key };
        match self.partitions {
            1 => format!("{}.{tail}", self.prefix),
            _ => format!("{}.{partition}.{tail}", self.prefix),
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

/// How long `/metrics` waits for the stream's state.
const STATE_TIMEOUT: Duration = Duration::from_secs(2);

pub struct NatsBus {
    inner: Arc<Inner>,
}

struct Inner {
    client: async_nats::Client,
    js: jetstream::Context,
    /// See [`NatsConfig::timeout`].
    timeout: Duration,
    /// One per partition.
    streams: Vec<stream::Stream>,
    layout: Layout,
    inbox: Arc<dyn Inbox>,
    /// Per partition and collection (or `*`): how many local subscriptions
    /// want it, and its consumer.
    watches: Mutex<HashMap<WatchKey, (usize, Arc<WatchState>)>>,
}

/// A consumer's stream (partition) and what it reads (a collection or `*`).
type WatchKey = (usize, String);

#[derive(Default)]
struct WatchState {
    started: OnceCell<Result<AbortHandle, String>>,
    /// The consumer's current name (it changes when the client recreates
    /// it), so the last release can delete it rather than leave it to expire.
    consumer: Mutex<String>,
    /// Every event of the key up to this stream sequence has been handed
    /// to the inbox, or came before the consumer began (see the module
    /// docs).
    position: AtomicU64,
}

/// A consumer ready to read: its messages, name, the stream sequence it
/// starts after, and how many messages it had pending when created.
struct Reader {
    messages: jetstream::consumer::pull::Ordered,
    partition: usize,
    name: String,
    after_seq: u64,
    pending: u64,
}

/// Reads retained events of one collection up to a sequence number, then
/// deletes its consumer.
pub struct HistoryReader {
    inner: Arc<Inner>,
    key: String,
    reader: Option<Reader>,
    /// Reads the events after `since` up to `until`.
    since: u64,
    until: u64,
}

impl HistoryReader {
    pub async fn next(&mut self) -> Option<Result<Arc<SharedEvent>, BusError>> {
        loop {
            let reader = self.reader.as_mut()?;
            let next = tokio::time::timeout(self.inner.timeout, reader.messages.next());
            let message = match next.await {
                Ok(Some(Ok(message))) => message,
                Ok(Some(Err(e))) => return Some(Err(BusError::History(e.to_string()))),
                Ok(None) => {
                    self.finish();
                    return Some(Err(BusError::History("the history consumer ended".into())));
                }
                Err(_) => {
                    self.finish();
                    let waited = self.inner.timeout;
                    return Some(Err(BusError::History(format!(
                        "NATS sent no history for {waited:?}"
                    ))));
                }
            };
            let Ok(info) = message.info() else { continue };
            let (seq, pending) = (info.stream_sequence, info.pending);
            // The client recreates a consumer that lost its server before
            // its first message from the stream's beginning.
            if seq <= self.since {
                continue;
            }
            if seq > self.until {
                self.finish();
                return None;
            }
            let last = seq == self.until
                || pending == 0 && {
                    let partition = reader.partition;
                    // Boxed: a NATS request's future is large and rare.
                    let next_seq = self.inner.next_seq(partition, &self.key, seq + 1);
                    match Box::pin(next_seq).await {
                        Ok(next) => next.is_none_or(|next| next > self.until),
                        Err(e) => {
                            self.finish();
                            return Some(Err(e));
                        }
                    }
                };
            if last {
                self.finish();
            }
            if let Some(event) = self.inner.decode(&message) {
                return Some(Ok(event));
            }
        }
    }

    fn finish(&mut self) {
        if let Some(reader) = self.reader.take() {
            self.inner.delete_consumer(reader.partition, reader.name);
        }
    }
}

impl Drop for HistoryReader {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Holds a collection's consumer open (`*`: one per partition); the last
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
        let client = async_nats::ConnectOptions::new()
            .name("strom")
            .retry_on_initial_connect()
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
        Ok(NatsBus {
            inner: Arc::new(Inner {
                client,
                js,
                timeout: config.timeout,
                streams,
                layout,
                inbox,
                watches: Mutex::new(HashMap::new()),
            }),
        })
    }

    pub async fn publish(&self, events: Vec<Event>) -> Result<Receipt, BusError> {
        let publish_error = |e: &dyn std::fmt::Display| BusError::Publish(e.to_string());
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

    /// The retained events of `key` after `since` up to `until` (the
    /// position of the caller's watch; both one seq per stream of `key`),
    /// read through temporary ordered consumers, one stream after another.
    /// The replay's head is `until`, or `since` where the client is ahead
    /// of this node (its consumer lags behind the node the client came
    /// from) but not past the stream's end: what the client has must not
    /// come again live, while a position past the end (a stream made anew)
    /// still gets every new event.
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
            let stream = self.inner.replay_stream(partition, key, since, until);
            let (reader, first, last) = stream.await?;
            readers.extend(reader);
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
                .get_or_init(|| inner.start_consumer(key.clone(), Arc::clone(state)))
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

    fn release(&self, key: &WatchKey) {
        let mut watches = self.watches.lock().expect("watches lock");
        let Some(entry) = watches.get_mut(key) else {
            return;
        };
        entry.0 -= 1;
        if entry.0 == 0 {
            if let Some(Ok(task)) = entry.1.started.get() {
                task.abort();
                let name = entry.1.consumer.lock().expect("consumer lock").clone();
                self.delete_consumer(key.0, name);
            }
            watches.remove(key);
        }
    }

    /// A reader of `key`'s events in stream `partition` after `since` up to
    /// `until` (`None`: there are none), and the stream's oldest and newest
    /// seqs.
    async fn replay_stream(
        self: &Arc<Self>,
        partition: usize,
        key: &str,
        since: u64,
        until: u64,
    ) -> Result<(Option<HistoryReader>, u64, u64), BusError> {
        let info = self
            .bounded("stream info", self.streams[partition].get_info())
            .await
            .map_err(BusError::History)?
            .map_err(|e| BusError::History(e.to_string()))?;
        let first_available = if info.state.messages == 0 {
            info.state.last_sequence + 1
        } else {
            info.state.first_sequence
        };
        let last = info.state.last_sequence;
        let start = since.saturating_add(1).max(first_available);
        if start > until {
            return Ok((None, first_available, last));
        }
        let policy = consumer::DeliverPolicy::ByStartSequence {
            start_sequence: start,
        };
        let opened = self
            .bounded("a history consumer", self.consumer(partition, key, policy))
            .await
            .and_then(|opened| opened)
            .map_err(BusError::History)?;
        tracing::debug!(
            stream = %self.layout.stream_name(partition), %key, since, until,
            pending = opened.pending, "replaying history"
        );
        // The consumer's server may lag; the stream leader knows.
        let empty = opened.pending == 0
            && (self.next_seq(partition, key, start).await?).is_none_or(|next| next > until);
        if empty {
            self.delete_consumer(partition, opened.name);
            return Ok((None, first_available, last));
        }
        let reader = HistoryReader {
            inner: Arc::clone(self),
            key: key.to_owned(),
            reader: Some(opened),
            since,
            until,
        };
        Ok((Some(reader), first_available, last))
    }

    /// The sequence of the first message of `key` (a collection, or `*`)
    /// at or after `from`, asked of the stream leader (`None`: there is
    /// none).
    async fn next_seq(
        &self,
        partition: usize,
        key: &str,
        from: u64,
    ) -> Result<Option<u64>, BusError> {
        let request = self.streams[partition]
            .raw_message_builder()
            .sequence(from)
            .next_by_subject(self.layout.filter(partition, key))
            .send();
        match self.bounded("the next message", request).await {
            Ok(Ok(message)) => Ok(Some(message.sequence)),
            Ok(Err(e)) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Ok(Err(e)) => Err(BusError::History(e.to_string())),
            Err(e) => Err(BusError::History(e)),
        }
    }

    /// Deletes a consumer in the background, rather than leaving it to
    /// expire after its inactivity threshold.
    fn delete_consumer(&self, partition: usize, name: String) {
        let stream = self.streams[partition].clone();
        tokio::spawn(async move {
            if let Err(e) = stream.delete_consumer(&name).await {
                tracing::debug!(consumer = %name, "deleting NATS consumer: {e}");
            }
        });
    }

    async fn consumer(
        &self,
        partition: usize,
        key: &str,
        deliver_policy: consumer::DeliverPolicy,
    ) -> Result<Reader, String> {
        let mut consumer = self.streams[partition]
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: self.layout.filter(partition, key),
                deliver_policy,
                // Caps each pull's expiry, and so the idle heartbeat at
                // half of it: a consumer lost with its server is noticed
                // (two missed heartbeats) and recreated within about the
                // timeout, rather than the client's default 30 s.
                max_expires: self.timeout,
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string())?;
        let info = consumer.info().await.map_err(|e| e.to_string())?;
        let (name, after_seq, pending) = (
            info.name.clone(),
            info.delivered.stream_sequence,
            info.num_pending,
        );
        let messages = consumer.messages().await.map_err(|e| e.to_string())?;
        Ok(Reader {
            messages,
            partition,
            name,
            after_seq,
            pending,
        })
    }

    /// Creates the consumer, then leaves a task dispatching its messages.
    async fn start_consumer(
        self: Arc<Self>,
        (partition, key): WatchKey,
        state: Arc<WatchState>,
    ) -> Result<AbortHandle, String> {
        let reader = self
            .bounded(
                "a consumer",
                self.consumer(partition, &key, consumer::DeliverPolicy::New),
            )
            .await??;
        *state.consumer.lock().expect("consumer lock") = reader.name.clone();
        state.position.store(reader.after_seq, Ordering::SeqCst);
        let task = tokio::spawn(async move { self.run_consumer(key, reader, state).await });
        Ok(task.abort_handle())
    }

    async fn run_consumer(&self, key: String, mut reader: Reader, state: Arc<WatchState>) {
        let audience = if key == WILDCARD {
            Audience::WildcardOnly
        } else {
            Audience::CollectionOnly
        };
        loop {
            while let Some(message) = reader.messages.next().await {
                match message {
                    Ok(message) => self.dispatch(&message, audience, &state),
                    Err(e) => tracing::warn!(collection = %key, "NATS consumer: {e}"),
                }
            }
            // The ordered consumer gave up; start over after the last event seen.
            let position = state.position.load(Ordering::SeqCst);
            tracing::warn!(collection = %key, position, "NATS consumer ended; recreating");
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let policy = consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: position + 1,
                };
                match self.consumer(reader.partition, &key, policy).await {
                    Ok(next) => {
                        *state.consumer.lock().expect("consumer lock") = next.name.clone();
                        reader = next;
                        break;
                    }
                    Err(e) => tracing::warn!(collection = %key, "NATS consumer: {e}"),
                }
            }
        }
    }

    /// Decodes one message and hands it to the router, once: a consumer
    /// the client recreated before its first message starts over from the
    /// stream's beginning, and what the watch already passed is skipped.
    fn dispatch(&self, message: &jetstream::Message, audience: Audience, state: &WatchState) {
        let info = match message.info() {
            Ok(info) => info,
            Err(e) => {
                tracing::warn!("NATS message without JetStream info: {e}");
                return;
            }
        };
        let mut consumer = state.consumer.lock().expect("consumer lock");
        if *consumer != info.consumer {
            *consumer = info.consumer.to_owned();
        }
        drop(consumer);
        let seq = info.stream_sequence;
        if seq <= state.position.load(Ordering::SeqCst) {
            return;
        }
        // Before the router sees it: a subscription that reads the position
        // after joining the router gets every later event live.
        state.position.store(seq, Ordering::SeqCst);
        if let Some(event) = self.decode(message) {
            self.inbox.deliver(event, audience);
        }
    }

    /// The event a stream message carries, with the stream's sequence number
    /// (and time, when the body has none); `None` for a body that does not
    /// decode, which is logged and skipped.
    fn decode(&self, message: &jetstream::Message) -> Option<Arc<SharedEvent>> {
        let info = message.info().ok()?;
        let (partition, collection) = self.layout.locate(message.subject.as_str());
        let published: SystemTime = info.published.into();
        match decode_event(&message.payload, Some(collection), published) {
            Ok(mut event) => {
                event.seq = info.stream_sequence;
                let mut shared = SharedEvent::new(event);
                shared.partition = partition;
                Some(Arc::new(shared))
            }
            Err(e) => {
                tracing::warn!(seq = info.stream_sequence, subject = %message.subject, "skipping NATS message: {e}");
                None
            }
        }
    }
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

    #[test]
    fn one_partition_keeps_the_single_stream_layout() {
        let layout = |partitions| Layout {
            stream: "STROM_EVENTS".into(),
            prefix: "strom.events".into(),
            partitions,
        };
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
}
