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

use super::presence_sync::{self, PresenceState, PresenceTiming};
use super::{Audience, BusError, BusState, History, Inbox, Receipt, Replay, Retention};
use crate::codec::{decode_event, encode_bus_body};
use crate::event::{Event, SharedEvent, WILDCARD};
use async_nats::jetstream::{self, consumer, stream};
use futures_util::StreamExt;
use std::collections::HashMap;
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
    stream: stream::Stream,
    prefix: String,
    inbox: Arc<dyn Inbox>,
    /// Per collection (or `*`): how many local subscriptions want it, and
    /// its consumer.
    watches: Mutex<HashMap<String, (usize, Arc<WatchState>)>>,
}

#[derive(Default)]
struct WatchState {
    started: OnceCell<Result<AbortHandle, String>>,
    /// The consumer's current name (it changes when the client recreates
    /// it), so the last release can delete it rather than leave it to expire.
    consumer: Mutex<String>,
}

/// A consumer ready to read: its messages, name, the stream sequence it
/// starts after, and how many messages it had pending when created.
struct Reader {
    messages: jetstream::consumer::pull::Ordered,
    name: String,
    after_seq: u64,
    pending: u64,
}

/// Reads retained events of one collection up to a sequence number, then
/// deletes its consumer.
pub struct HistoryReader {
    inner: Arc<Inner>,
    reader: Option<Reader>,
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
            if seq > self.until {
                self.finish();
                return None;
            }
            if seq == self.until || pending == 0 {
                self.finish();
            }
            if let Some(event) = self.inner.decode(&message) {
                return Some(Ok(event));
            }
        }
    }

    fn finish(&mut self) {
        if let Some(reader) = self.reader.take() {
            self.inner.delete_consumer(reader.name);
        }
    }
}

impl Drop for HistoryReader {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Holds a collection's consumer open; the last one dropped stops it.
pub struct Watch {
    inner: Arc<Inner>,
    key: String,
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.inner.release(&self.key);
    }
}

/// Opens the event stream, creating it if needed, and waits up to the
/// startup timeout for JetStream to answer, saying what it waits for. A
/// stream that exists with other replicas or subjects is an error: reusing
/// it silently would leave history where the settings say it is not.
async fn open_stream(
    js: &jetstream::Context,
    config: &NatsConfig,
    retention: Retention,
) -> Result<stream::Stream, BusError> {
    let subjects = format!("{}.>", config.subject_prefix);
    let wanted = stream::Config {
        name: config.stream.clone(),
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
                "stream {} at {}, waited {:?}; last error: {error}",
                config.stream, config.url, config.startup_timeout
            )));
        }
        tracing::info!(stream = %config.stream, url = %config.url, "waiting for JetStream: {error}");
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let actual = &stream.cached_info().config;
    if actual.num_replicas.max(1) != config.replicas.max(1) || !actual.subjects.contains(&subjects)
    {
        return Err(BusError::StreamSettings(format!(
            "stream {} exists with {} replica(s) on subjects {:?}; strom wants {} replica(s) on {subjects:?}. \
             Change the stream (nats stream edit) or start strom with matching --nats-replicas / --nats-subject-prefix",
            config.stream, actual.num_replicas, actual.subjects, config.replicas
        )));
    }
    if (actual.max_age, actual.max_messages, actual.max_bytes)
        != (wanted.max_age, wanted.max_messages, wanted.max_bytes)
    {
        tracing::warn!(
            stream = %config.stream,
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
        let stream = open_stream(&js, &config, retention).await?;
        Ok(NatsBus {
            inner: Arc::new(Inner {
                client,
                js,
                timeout: config.timeout,
                stream,
                prefix: config.subject_prefix,
                inbox,
                watches: Mutex::new(HashMap::new()),
            }),
        })
    }

    pub async fn publish(&self, events: Vec<Event>) -> Result<Receipt, BusError> {
        let publish_error = |e: &dyn std::fmt::Display| BusError::Publish(e.to_string());
        let mut acks = Vec::with_capacity(events.len());
        for event in &events {
            let subject = format!("{}.{}", self.inner.prefix, event.collection);
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
        let info = tokio::time::timeout(STATE_TIMEOUT, self.inner.stream.get_info()).await;
        let stream = match info {
            Ok(Ok(info)) => Some((info.state.consumer_count, info.state.messages)),
            _ => None,
        };
        BusState {
            connected,
            consumers: stream.map(|(consumers, _)| consumers),
            history_events: stream.map(|(_, messages)| messages),
        }
    }

    /// The stream's last sequence number.
    pub async fn head(&self) -> Result<u64, BusError> {
        let info = self
            .inner
            .bounded("stream info", self.inner.stream.get_info())
            .await
            .map_err(BusError::History)?;
        let info = info.map_err(|e| BusError::History(e.to_string()))?;
        Ok(info.state.last_sequence)
    }

    /// The retained events of `key` after `since`, up to the stream's
    /// current last sequence, read through a temporary ordered consumer.
    pub async fn replay(&self, key: &str, since: u64) -> Result<Replay, BusError> {
        let history_error = |e: &dyn std::fmt::Display| BusError::History(e.to_string());
        let info = self
            .inner
            .bounded("stream info", self.inner.stream.get_info())
            .await
            .map_err(BusError::History)?
            .map_err(|e| history_error(&e))?;
        let head = info.state.last_sequence;
        let first_available = if info.state.messages == 0 {
            head + 1
        } else {
            info.state.first_sequence
        };
        let start = since.saturating_add(1).max(first_available);
        let mut reader = HistoryReader {
            inner: Arc::clone(&self.inner),
            reader: None,
            until: head,
        };
        if start <= head {
            let policy = consumer::DeliverPolicy::ByStartSequence {
                start_sequence: start,
            };
            let opened = self
                .inner
                .bounded("a history consumer", self.inner.consumer(key, policy))
                .await
                .and_then(|opened| opened)
                .map_err(BusError::History)?;
            if opened.pending > 0 {
                reader.reader = Some(opened);
            } else {
                self.inner.delete_consumer(opened.name);
            }
        }
        Ok(Replay {
            history: History::Nats(Box::new(reader)),
            head,
            first_available,
        })
    }

    /// Makes events of `key` (a collection or `*`) flow to this node.
    pub async fn watch(&self, key: &str) -> Result<Watch, BusError> {
        let state = {
            let mut watches = self.inner.watches.lock().expect("watches lock");
            let entry = watches.entry(key.to_owned()).or_default();
            entry.0 += 1;
            Arc::clone(&entry.1)
        };
        let watch = Watch {
            inner: Arc::clone(&self.inner),
            key: key.to_owned(),
        };
        let inner = Arc::clone(&self.inner);
        let started = state
            .started
            .get_or_init(|| inner.start_consumer(key.to_owned(), Arc::clone(&state)))
            .await;
        match started {
            Ok(_) => Ok(watch),
            Err(e) => Err(BusError::Subscribe(e.clone())),
        }
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

    fn release(&self, key: &str) {
        let mut watches = self.watches.lock().expect("watches lock");
        let Some(entry) = watches.get_mut(key) else {
            return;
        };
        entry.0 -= 1;
        if entry.0 == 0 {
            if let Some(Ok(task)) = entry.1.started.get() {
                task.abort();
                let name = entry.1.consumer.lock().expect("consumer lock").clone();
                self.delete_consumer(name);
            }
            watches.remove(key);
        }
    }

    /// Deletes a consumer in the background, rather than leaving it to
    /// expire after its inactivity threshold.
    fn delete_consumer(&self, name: String) {
        let stream = self.stream.clone();
        tokio::spawn(async move {
            if let Err(e) = stream.delete_consumer(&name).await {
                tracing::debug!(consumer = %name, "deleting NATS consumer: {e}");
            }
        });
    }

    fn filter_subject(&self, key: &str) -> String {
        if key == WILDCARD {
            format!("{}.>", self.prefix)
        } else {
            format!("{}.{key}", self.prefix)
        }
    }

    async fn consumer(
        &self,
        key: &str,
        deliver_policy: consumer::DeliverPolicy,
    ) -> Result<Reader, String> {
        let mut consumer = self
            .stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: self.filter_subject(key),
                deliver_policy,
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
            name,
            after_seq,
            pending,
        })
    }

    /// Creates the consumer, then leaves a task dispatching its messages.
    async fn start_consumer(
        self: Arc<Self>,
        key: String,
        state: Arc<WatchState>,
    ) -> Result<AbortHandle, String> {
        let reader = self
            .bounded(
                "a consumer",
                self.consumer(&key, consumer::DeliverPolicy::New),
            )
            .await??;
        *state.consumer.lock().expect("consumer lock") = reader.name.clone();
        let task = tokio::spawn(async move { self.run_consumer(key, reader, state).await });
        Ok(task.abort_handle())
    }

    async fn run_consumer(&self, key: String, mut reader: Reader, state: Arc<WatchState>) {
        let audience = if key == WILDCARD {
            Audience::WildcardOnly
        } else {
            Audience::CollectionOnly
        };
        let mut last_seq = reader.after_seq;
        loop {
            while let Some(message) = reader.messages.next().await {
                match message {
                    Ok(message) => {
                        if let Some(seq) = self.dispatch(&message, audience, &state) {
                            last_seq = seq;
                        }
                    }
                    Err(e) => tracing::warn!(collection = %key, "NATS consumer: {e}"),
                }
            }
            // The ordered consumer gave up; start over after the last event seen.
            tracing::warn!(collection = %key, last_seq, "NATS consumer ended; recreating");
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let policy = consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: last_seq + 1,
                };
                match self.consumer(&key, policy).await {
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

    /// Decodes one message and hands it to the router; returns its seq.
    fn dispatch(
        &self,
        message: &jetstream::Message,
        audience: Audience,
        state: &WatchState,
    ) -> Option<u64> {
        let info = match message.info() {
            Ok(info) => info,
            Err(e) => {
                tracing::warn!("NATS message without JetStream info: {e}");
                return None;
            }
        };
        let mut consumer = state.consumer.lock().expect("consumer lock");
        if *consumer != info.consumer {
            *consumer = info.consumer.to_owned();
        }
        drop(consumer);
        if let Some(event) = self.decode(message) {
            self.inbox.deliver(event, audience);
        }
        Some(info.stream_sequence)
    }

    /// The event a stream message carries, with the stream's sequence number
    /// (and time, when the body has none); `None` for a body that does not
    /// decode, which is logged and skipped.
    fn decode(&self, message: &jetstream::Message) -> Option<Arc<SharedEvent>> {
        let info = message.info().ok()?;
        let collection = message
            .subject
            .as_str()
            .strip_prefix(self.prefix.as_str())
            .and_then(|rest| rest.strip_prefix('.'))
            .unwrap_or_default();
        let published: SystemTime = info.published.into();
        match decode_event(&message.payload, Some(collection), published) {
            Ok(mut event) => {
                event.seq = info.stream_sequence;
                Some(Arc::new(SharedEvent::new(event)))
            }
            Err(e) => {
                tracing::warn!(seq = info.stream_sequence, subject = %message.subject, "skipping NATS message: {e}");
                None
            }
        }
    }
}
