//! The engine: the one place where publishing, subscribing and fan-out
//! happen, whatever the transport.
//!
//! Edges (gRPC, WebSocket, SSE, REST) call [`Engine::publish`] and
//! [`Engine::connect`]; a [`Connection`] holds one client's subscriptions and
//! its bounded delivery queue. The engine knows nothing of HTTP, gRPC, JSON
//! framing or NATS: the bus moves events between nodes, the edges translate.

mod mailbox;
pub mod presence;
pub mod router;

use crate::auth::{Auth, AuthError, Principal};
use crate::bus::presence_sync::PresenceState;
use crate::bus::{Bus, BusError, BusState, History, Inbox, Interest, Receipt};
use crate::event::{
    Event, EventError, MAX_RECORD_ID, Position, SharedEvent, SharedRun, View, WILDCARD,
    validate_collection,
};
use crate::filter::Filter;
use crate::metrics::{DeliveryTally, METRICS};
use mailbox::{Queued, Run};
use presence::{PRESENCE_COLLECTION, Presence, PresenceUser};
use router::{ConnShared, Gate, Membership, Router, SubEntry};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use thiserror::Error;
use tokio::sync::mpsc;

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Deliveries a connection may have queued before it is cut off.
    pub queue_capacity: usize,
    /// Subscriptions one connection may hold.
    pub max_subscriptions: usize,
    /// Filter conditions one connection's subscriptions may hold together:
    /// a budget for the memory a client's filters take on the server.
    pub max_filter_conditions: usize,
    /// Messages per second a client connection may publish (burst: as
    /// many at once).
    pub client_publish_rate: u32,
    /// Largest `data` a client connection may publish, in bytes of JSON.
    pub client_message_bytes: usize,
    /// Largest event a client or service may publish on any path: bytes of
    /// JSON of its `data` and `old_data` (captured rows are not capped).
    pub max_event_bytes: usize,
    /// Events per second one user (token `sub`) may publish over all its
    /// connections and transports together (burst: as many at once);
    /// anonymous publishers share one budget when authentication is
    /// enforced. An API key has its policy's `publish_rate`, if any;
    /// change capture is not limited.
    pub user_publish_rate: u32,
    /// Connections one user (token `sub`) may hold open at once on this
    /// node, over every transport; anonymous clients and API keys are
    /// bounded by the per-address cap instead.
    pub max_connections_per_user: usize,
    /// Dispatcher tasks fanning out collections' events (one per core).
    pub dispatch_shards: usize,
    /// The longest a dispatcher waits after a round for the edges to take
    /// it, before the next round takes all that arrived meanwhile: under
    /// load, several events share one write per connection.
    pub dispatch_window: std::time::Duration,
    /// The runtime that fans events out and runs WebSocket sessions (`None`:
    /// the one the engine starts on). `strom serve` gives it threads of its
    /// own, so requests (a publish above all) never queue behind the
    /// writes of the fan-out they cause.
    pub delivery: Option<tokio::runtime::Handle>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            queue_capacity: 4096,
            max_subscriptions: 256,
            max_filter_conditions: 4096,
            client_publish_rate: 20,
            client_message_bytes: 16 * 1024,
            max_event_bytes: 64 * 1024,
            user_publish_rate: 50,
            max_connections_per_user: 100,
            dispatch_shards: std::thread::available_parallelism().map_or(1, |n| n.get()),
            dispatch_window: std::time::Duration::from_millis(3),
            delivery: None,
        }
    }
}

/// Why a connection's deliveries ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndReason {
    /// The connection's queue was full: it reads slower than events arrive.
    Overflow { capacity: usize },
    /// The server is shutting down.
    Shutdown,
    /// The history a resuming subscription needed could not be read.
    History(String),
    /// The connection's token expired and was not refreshed.
    TokenExpired,
}

impl std::fmt::Display for EndReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EndReason::Overflow { capacity } => write!(
                f,
                "subscriber too slow: its queue of {capacity} events overflowed; reconnect and resume from the last seq received"
            ),
            EndReason::Shutdown => f.write_str(
                "server is shutting down; reconnect (another node will answer) and resume from the last seq received",
            ),
            EndReason::History(e) => write!(f, "{e}; resume again from the last seq received"),
            EndReason::TokenExpired => f.write_str(
                "the token has expired; reconnect with a fresh token (refresh it with `auth` before it expires to stay connected)",
            ),
        }
    }
}

#[derive(Debug, Error)]
pub enum EngineError {
    #[error("{0}")]
    InvalidEvent(#[from] EventError),
    #[error("nothing to publish: the request holds no event")]
    NoEvents,
    #[error("too many subscriptions on this connection (at most {0})")]
    TooManySubscriptions(usize),
    #[error("too many connections of this user (at most {0}); close one first")]
    TooManyConnections(usize),
    #[error(
        "this connection's filters would hold {0} conditions, more than its budget of {1}; unsubscribe or simplify filters first"
    )]
    FilterBudget(usize, usize),
    #[error("no subscription {0} on this connection")]
    UnknownSubscription(u64),
    #[error("rate limit: at most {0} messages per second from one connection")]
    RateLimited(u32),
    #[error("message of {0} bytes is larger than the limit of {1} bytes")]
    MessageTooLarge(usize, usize),
    #[error(
        "publish rate limit: {0} events at once, more than the {1} per second this publisher may send; retry later"
    )]
    PublisherRateLimited(usize, u32),
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("{0}")]
    Ended(EndReason),
}

/// The transports, for stats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    Grpc,
    WebSocket,
    Sse,
    /// WebSocket in Fluxbase's dialect.
    Fluxbase,
    /// WebSocket in better-query's dialect.
    BetterQuery,
}

impl Transport {
    pub const ALL: [Transport; 5] = [
        Transport::Grpc,
        Transport::WebSocket,
        Transport::Sse,
        Transport::Fluxbase,
        Transport::BetterQuery,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Grpc => "grpc",
            Transport::WebSocket => "websocket",
            Transport::Sse => "sse",
            Transport::Fluxbase => "fluxbase",
            Transport::BetterQuery => "better_query",
        }
    }
}

/// What to subscribe to.
#[derive(Debug, Clone)]
pub struct SubscriptionSpec {
    /// A collection name, or `*` for all.
    pub collection: String,
    pub record_id: Option<String>,
    pub filter: Option<Filter>,
    /// Resume: replay the retained events after this position first (a
    /// seq, or for `*` over several NATS streams one per stream).
    pub since: Option<Position>,
    /// Also deliver what this same connection publishes.
    pub echo: bool,
}

impl SubscriptionSpec {
    pub fn validate(&self) -> Result<(), EngineError> {
        if self.collection != WILDCARD {
            validate_collection(&self.collection)?;
        }
        if self
            .record_id
            .as_ref()
            .is_some_and(|r| r.len() > MAX_RECORD_ID)
        {
            return Err(EventError::RecordIdTooLong.into());
        }
        Ok(())
    }
}

/// One event for a connection: one delivery however many of its
/// subscriptions it matches (all in the same [`View`]).
#[derive(Debug, Clone)]
pub struct Delivery {
    pub subscription: u64,
    /// The other matching subscriptions of the connection, if any.
    pub more: Option<Box<[u64]>>,
    pub event: Arc<SharedEvent>,
    /// How it shows the row: whether it left the filter, and whether an
    /// image the row rule rejects is withheld.
    pub view: View,
}

impl Delivery {
    pub fn new(subscription: u64, event: Arc<SharedEvent>, view: View) -> Self {
        Delivery {
            subscription,
            more: None,
            event,
            view,
        }
    }

    /// Takes `id` out; whether the delivery is still for some subscription.
    fn forget_subscription(&mut self, id: u64) -> bool {
        if self.more.is_none() {
            return self.subscription != id;
        }
        let mut ids: Vec<u64> = self.subscriptions().filter(|s| *s != id).collect();
        self.subscription = ids.remove(0);
        self.more = (!ids.is_empty()).then(|| ids.into());
        true
    }

    /// Every subscription this delivery is for, ascending when several.
    pub fn subscriptions(&self) -> impl Iterator<Item = u64> + '_ {
        std::iter::once(self.subscription).chain(self.more.iter().flatten().copied())
    }
}

#[derive(Clone)]
pub struct Engine {
    router: Arc<Router>,
    bus: Arc<Bus>,
    config: EngineConfig,
    auth: Arc<Auth>,
    presence: Arc<Presence>,
    published: Arc<AtomicU64>,
    /// Publish budgets of users and rate-limited API keys (see
    /// `spend_budget`).
    budgets: Arc<Mutex<HashMap<String, RateLimiter>>>,
    /// Open connections of users, by user id (see
    /// `max_connections_per_user`).
    user_connections: Arc<Mutex<HashMap<String, usize>>>,
    /// Connections evicted by the dispatcher, for the reaper to retire.
    evictions: mpsc::UnboundedSender<u64>,
    /// See [`EngineConfig::delivery`].
    delivery: tokio::runtime::Handle,
}

/// Counts for `/api/v1/stats`.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub total_connections: usize,
    pub authenticated_connections: usize,
    pub unique_users: usize,
    pub per_transport: HashMap<&'static str, usize>,
    /// Connection name → the collections it subscribes to.
    pub subscriptions: HashMap<String, Vec<String>>,
    pub head_seq: u64,
    /// Deliveries queued for connections and not yet taken by their edges.
    pub queued: usize,
}

impl Engine {
    /// Builds an engine on a bus; `open_bus` receives the inbox the bus
    /// delivers events into and the presence state it shares.
    pub async fn start<F, Fut>(
        config: EngineConfig,
        auth: Auth,
        open_bus: F,
    ) -> Result<Engine, BusError>
    where
        F: FnOnce(Arc<dyn Inbox>, Arc<dyn PresenceState>) -> Fut,
        Fut: Future<Output = Result<Bus, BusError>>,
    {
        let delivery = config
            .delivery
            .clone()
            .unwrap_or_else(tokio::runtime::Handle::current);
        let router = {
            // The dispatchers are spawned on the delivery runtime.
            let _delivery = delivery.enter();
            Arc::new(Router::new(config.dispatch_shards, config.dispatch_window))
        };
        let presence = Arc::new(Presence::new(router.node().to_owned(), Arc::clone(&router)));
        let bus = Arc::new(open_bus(router.clone(), presence.clone()).await?);
        let evictions = spawn_reaper(Arc::downgrade(&router), Arc::downgrade(&presence));
        Ok(Engine {
            router,
            bus,
            config,
            auth: Arc::new(auth),
            presence,
            published: Arc::default(),
            budgets: Arc::default(),
            user_connections: Arc::default(),
            evictions,
            delivery,
        })
    }

    /// The runtime of fan-out and WebSocket sessions (see
    /// [`EngineConfig::delivery`]).
    pub fn delivery(&self) -> &tokio::runtime::Handle {
        &self.delivery
    }

    pub fn backend(&self) -> &'static str {
        self.bus.backend()
    }

    /// The bus's connection and history, for `/metrics`.
    pub async fn bus_state(&self) -> BusState {
        self.bus.state().await
    }

    /// Whether the bus can serve subscriptions and replays now (see
    /// [`Bus::readiness`]).
    pub async fn bus_readiness(&self) -> Result<(), String> {
        self.bus.readiness().await
    }

    /// Who is online, on `channel` or at all, over the whole cluster. A
    /// channel's presence takes the right to subscribe to it; who is
    /// connected at all, the policy's `presence` setting.
    pub fn presence(
        &self,
        principal: &Principal,
        channel: Option<&str>,
    ) -> Result<Vec<PresenceUser>, EngineError> {
        self.check_presence(principal, channel)?;
        Ok(self.presence.snapshot(channel))
    }

    /// May `principal` see presence on `channel` (`None`: connected at all)?
    pub fn check_presence(
        &self,
        principal: &Principal,
        channel: Option<&str>,
    ) -> Result<(), EngineError> {
        Ok(self.auth.policy.check_presence(principal, channel)?)
    }

    /// Authentication and the policy, for edges to identify clients.
    pub fn auth(&self) -> &Auth {
        &self.auth
    }

    /// Publishes events in order; returns their sequence numbers once the
    /// bus has accepted them (with JetStream: stored them). All or nothing:
    /// one invalid or forbidden event refuses the batch.
    pub async fn publish(
        &self,
        principal: &Principal,
        events: Vec<Event>,
    ) -> Result<Receipt, EngineError> {
        self.publish_from(principal, None, events).await
    }

    /// [`Engine::publish`] on behalf of connection `origin` (for echo
    /// control). The server sets each event's `sender` from `principal`.
    async fn publish_from(
        &self,
        principal: &Principal,
        origin: Option<String>,
        mut events: Vec<Event>,
    ) -> Result<Receipt, EngineError> {
        if events.is_empty() {
            return Err(EngineError::NoEvents);
        }
        for event in &mut events {
            event.validate()?;
            // Captured rows are the database's, delivered whole.
            let capped = !matches!(principal, Principal::System(_));
            let size = event.payload_bytes();
            if capped && size > self.config.max_event_bytes {
                return Err(EngineError::MessageTooLarge(
                    size,
                    self.config.max_event_bytes,
                ));
            }
            self.auth
                .policy
                .check_publish(principal, &event.collection)?;
            event.seq = 0;
            event.sender = principal.user_id();
            event.origin = origin.clone();
        }
        self.spend_budget(principal, events.len())?;
        self.router.admit().await;
        let idle = self.router.is_idle();
        let started = std::time::Instant::now();
        let receipt = self.bus.publish(events).await?;
        if idle {
            self.router.hand_over();
        }
        METRICS.publish_duration.observe(started.elapsed());
        let fresh = receipt.seqs.len() - receipt.duplicates.len();
        self.published.fetch_add(fresh as u64, Ordering::Relaxed);
        Ok(receipt)
    }

    /// Takes `count` events from the publisher's budget, if it has one.
    /// Users share `user_publish_rate` each (anonymous publishers one, once
    /// authentication is enforced); an API key has its policy's
    /// `publish_rate`, if any.
    fn spend_budget(&self, principal: &Principal, count: usize) -> Result<(), EngineError> {
        let rate = self.config.user_publish_rate;
        let (publisher, rate) = match principal {
            Principal::User(claims) => (format!("user:{}", claims.subject), rate),
            Principal::Anonymous if !self.auth.is_open() => ("anonymous".to_owned(), rate),
            Principal::Service(key) => match key.publish_rate {
                Some(rate) => (format!("key:{}", key.name), rate),
                None => return Ok(()),
            },
            _ => return Ok(()),
        };
        let mut budgets = self.budgets.lock().expect("budgets lock");
        if budgets.len() >= MAX_BUDGETS {
            // Users idle long enough to be back at a full budget need none.
            budgets.retain(|_, budget| !budget.is_full());
        }
        let budget = budgets
            .entry(publisher)
            .or_insert_with(|| RateLimiter::new(rate));
        if budget.take_many(count) {
            Ok(())
        } else {
            Err(EngineError::PublisherRateLimited(count, rate))
        }
    }

    /// Events published through this node since it started.
    pub fn published_total(&self) -> u64 {
        self.published.load(Ordering::Relaxed)
    }

    /// Opens a connection for `principal`: a delivery queue that
    /// subscriptions feed. Refused when the user holds
    /// `max_connections_per_user` already.
    pub fn connect(
        &self,
        transport: Transport,
        principal: Principal,
    ) -> Result<Connection, EngineError> {
        let slot = match &principal {
            Principal::User(claims) => Some(self.take_user_slot(&claims.subject)?),
            _ => None,
        };
        let id = self.router.next_id();
        let name = self.router.connection_name(id);
        let shared = Arc::new(ConnShared::new(
            id,
            name,
            transport,
            self.config.queue_capacity,
            self.router.backlog(),
            self.evictions.clone(),
        ));
        *shared.user_id.lock().expect("user lock") = principal.user_id();
        self.router.register(Arc::clone(&shared));
        METRICS.connections_opened.add(transport as usize, 1);
        tracing::debug!(
            connection = &*shared.name,
            transport = transport.as_str(),
            user = principal.user_id().as_deref(),
            "connection opened"
        );
        let mut connection = Connection {
            engine: self.clone(),
            shared,
            expires: deadline(&principal),
            sent: RateLimiter::new(self.config.client_publish_rate),
            principal,
            incoming: VecDeque::new(),
            subscriptions: IdMap::default(),
            catch_ups: VecDeque::new(),
            ready: VecDeque::new(),
            last_seq: 0,
            wildcard_position: None,
            tally: DeliveryTally::default(),
            _slot: slot,
        };
        connection.join_presence(None);
        Ok(connection)
    }

    /// Counts one more connection of `user`, if it may open one.
    fn take_user_slot(&self, user: &str) -> Result<UserSlot, EngineError> {
        let max = self.config.max_connections_per_user;
        let mut open = self.user_connections.lock().expect("user connections lock");
        let count = open.entry(user.to_owned()).or_default();
        if *count >= max {
            return Err(EngineError::TooManyConnections(max));
        }
        *count += 1;
        Ok(UserSlot {
            user: user.to_owned(),
            open: Arc::clone(&self.user_connections),
        })
    }

    pub fn stats(&self) -> Stats {
        let connections = self.router.connections.lock().expect("connections lock");
        let mut stats = Stats {
            total_connections: connections.len(),
            head_seq: self.router.head_seq(),
            ..Stats::default()
        };
        let mut users = std::collections::HashSet::new();
        for conn in connections.values() {
            stats.queued += conn.mailbox.len();
            *stats
                .per_transport
                .entry(conn.transport.as_str())
                .or_default() += 1;
            if let Some(user) = conn.user_id.lock().expect("user lock").clone() {
                stats.authenticated_connections += 1;
                users.insert(user);
            }
            let mut collections: Vec<String> = conn
                .membership
                .lock()
                .expect("membership lock")
                .subscriptions
                .values()
                .map(|(collection, _)| collection.clone())
                .collect();
            collections.sort();
            stats
                .subscriptions
                .insert(self.router.connection_name(conn.id), collections);
        }
        stats.unique_users = users.len();
        stats
    }

    /// Ends every connection's stream; edges then close them cleanly.
    pub fn shutdown(&self) {
        self.router.end_all(EndReason::Shutdown);
    }
}

struct OpenSubscription {
    spec: SubscriptionSpec,
    entry: Arc<SubEntry>,
    /// A resumed subscription's history ends here: a live delivery of a
    /// seq up to this one (still being dispatched when the subscription
    /// began) came through the replay already. `None` without a replay
    /// (most subscriptions), which spares every delivery a look at it.
    replayed_through: Option<Position>,
    /// Where the subscription went live (see [`Bus::position`]).
    position: Position,
    /// Keeps the bus delivering this collection to the node.
    interest: Interest,
}

/// A resuming subscription's catch-up: retained events up to the
/// subscription's `replayed_through` come from `history`; live deliveries
/// for it wait in `held` meanwhile, and follow the history. Nothing is
/// missed (the live subscription existed before that head was read) and
/// nothing is repeated.
///
/// On a busy collection more may arrive live than `held` can take (the
/// queue capacity). Then the held ones are dropped, and so is every live
/// delivery until the history is done (`overflowed`); the history is then
/// read on from `replayed_through` to the new head, and the switch is
/// tried again. A
/// resuming client thus catches up at the pace it reads, rather than being
/// cut off while it replays.
struct CatchUp {
    subscription: u64,
    history: History,
    held: VecDeque<Delivery>,
    overflowed: bool,
}

/// Events of a run for one subscription, in order, each to go to the
/// client as [`Delivery::new`]`(subscription, event, View::default())`
/// would (see [`Connection::try_recv_run`]).
pub struct RunSlice {
    pub subscription: u64,
    pub run: Arc<SharedRun>,
    pub range: std::ops::Range<usize>,
}

/// What a connection receives.
#[derive(Debug, Clone)]
pub enum Received {
    Event(Delivery),
    /// The resume position is older than the retained history: the events
    /// between `since` and `first_available` are gone, so the client should
    /// reload its state. The replay goes on from `first_available`.
    /// Boxed: rare, and larger than a delivery, which every event moves.
    Reset(Box<ResetNotice>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResetNotice {
    pub subscription: u64,
    pub since: Position,
    pub first_available: Position,
}

/// What is sorted and waits to be handed out, in order.
enum Ready {
    One(Received),
    /// A run for a subscription that is not catching up, handed out an
    /// event at a time.
    Run(ReadyRun),
}

struct ReadyRun {
    run: Run,
    /// The next event to look at.
    next: usize,
    /// The subscription's `echo`.
    echo: bool,
    /// The subscription's `replayed_through`.
    replayed_through: Option<Position>,
}

impl ReadyRun {
    /// Whether what is left of the run all goes to the client as it is:
    /// none of it is an echo it does not want or came through its replay.
    fn goes_whole(&self) -> bool {
        self.replayed_through.is_none() && (self.echo || !self.run.shared.from_connections)
    }

    /// The run's next event for its subscription (of a connection named
    /// `connection`), if any is left.
    fn next_event(&mut self, connection: &str) -> Option<Arc<SharedEvent>> {
        while let Some(event) = self.run.shared.events.get(self.next) {
            self.next += 1;
            let wanted = self.echo || !event.is_from(connection);
            if wanted && !replayed(self.replayed_through.as_ref(), event) {
                return Some(Arc::clone(event));
            }
        }
        None
    }
}

/// Whether a live `event` reached a subscription through its replay
/// already (it was being dispatched as the subscription began).
fn replayed(replayed_through: Option<&Position>, event: &SharedEvent) -> bool {
    let seq = event.event.seq;
    seq != 0 && replayed_through.is_some_and(|r| seq <= r.of(event.partition))
}

enum Step {
    Live,
    History(Option<Result<Arc<SharedEvent>, BusError>>),
    Ended,
}

/// One client's subscriptions and delivery queue. Dropping it removes them.
pub struct Connection {
    engine: Engine,
    shared: Arc<ConnShared>,
    principal: Principal,
    /// When the principal's token expires.
    expires: Option<tokio::time::Instant>,
    /// Paces what this client publishes.
    sent: RateLimiter,
    /// What was just taken from the mailbox, being sorted.
    incoming: VecDeque<Queued>,
    subscriptions: IdMap<OpenSubscription>,
    catch_ups: VecDeque<CatchUp>,
    ready: VecDeque<Ready>,
    /// The seq of the newest event handed out (0: none yet).
    last_seq: u64,
    /// A `*` subscription over several NATS streams, and its position
    /// token after the newest event handed out (see `resume_position`).
    wildcard_position: Option<(u64, Position)>,
    /// Deliveries not yet in the process's counter.
    tally: DeliveryTally,
    /// The user's count of open connections, given back on drop.
    _slot: Option<UserSlot>,
}

/// One open connection of a user: counted while it lives.
struct UserSlot {
    user: String,
    open: Arc<Mutex<HashMap<String, usize>>>,
}

impl Drop for UserSlot {
    fn drop(&mut self) {
        let mut open = self.open.lock().expect("user connections lock");
        if let Some(count) = open.get_mut(&self.user) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.user);
            }
        }
    }
}

impl Connection {
    /// Who the connection acts for.
    pub fn principal(&self) -> &Principal {
        &self.principal
    }

    /// The connection's name, unique in the cluster: `<node>-<number>`.
    pub fn name(&self) -> String {
        self.shared.name.to_string()
    }

    /// Publishes as this client (e.g. the WebSocket `publish` action), within
    /// the per-connection rate and size limits; subscriptions of this
    /// connection without `echo` do not receive it back.
    pub async fn publish(&mut self, event: Event) -> Result<u64, EngineError> {
        let limit = self.engine.config.client_message_bytes;
        let size = serde_json::to_vec(&event.data).map_or(0, |b| b.len());
        if size > limit {
            return Err(EngineError::MessageTooLarge(size, limit));
        }
        if !self.sent.take() {
            return Err(EngineError::RateLimited(
                self.engine.config.client_publish_rate,
            ));
        }
        let receipt = self
            .engine
            .publish_from(&self.principal, Some(self.name()), vec![event])
            .await?;
        Ok(receipt.seqs[0])
    }

    /// Starts a subscription; events published after this returns reach it.
    /// With `since`, the retained events after that seq come first.
    pub async fn subscribe(&mut self, spec: SubscriptionSpec) -> Result<u64, EngineError> {
        self.replace(&[], spec).await
    }

    /// Starts a subscription that takes the place of the subscriptions
    /// `old`: every event reaches either those or the new one, never both.
    pub async fn replace(
        &mut self,
        old: &[u64],
        spec: SubscriptionSpec,
    ) -> Result<u64, EngineError> {
        spec.validate()?;
        let old: Vec<u64> = old
            .iter()
            .copied()
            .filter(|id| self.subscriptions.contains_key(id))
            .collect();
        if self.subscriptions.len() - old.len() >= self.engine.config.max_subscriptions {
            return Err(EngineError::TooManySubscriptions(
                self.engine.config.max_subscriptions,
            ));
        }
        let conditions =
            |spec: &SubscriptionSpec| spec.filter.as_ref().map_or(0, Filter::condition_count);
        let held: usize = self
            .subscriptions
            .iter()
            .filter(|(id, _)| !old.contains(id))
            .map(|(_, open)| conditions(&open.spec))
            .sum();
        let budget = self.engine.config.max_filter_conditions;
        if held + conditions(&spec) > budget {
            return Err(EngineError::FilterBudget(held + conditions(&spec), budget));
        }
        let auth = &self.engine.auth;
        let gated = spec.collection == WILDCARD || spec.collection == PRESENCE_COLLECTION;
        let (filter, row, gate) = if gated && !auth.is_open() {
            // Decided per collection (and, for presence, per channel) as
            // events come (see `Gate`): a presence subscription sees the
            // channels its principal may read.
            let gate = Gate::new(Arc::clone(auth), self.principal.clone());
            (spec.filter.clone(), None, Some(gate))
        } else {
            let row = auth
                .policy
                .check_subscribe(&self.principal, &spec.collection)?;
            let filter = match (row.clone(), spec.filter.clone()) {
                (Some(row), Some(own)) => Some(Filter::All(vec![row, own])),
                (row, own) => row.or(own),
            };
            (filter, row, None)
        };
        let interest = self.engine.bus.interest(&spec.collection).await?;
        let id = self.engine.router.next_id();
        let entry = Arc::new(SubEntry {
            id,
            conn: Arc::clone(&self.shared),
            filter,
            row,
            gate,
            echo: spec.echo,
        });
        {
            let mut membership = self.shared.membership.lock().expect("membership lock");
            if membership.retired {
                let reason = self.shared.end_reason().cloned();
                return Err(EngineError::Ended(reason.unwrap_or(EndReason::Shutdown)));
            }
            let removed: Vec<(&str, Option<&str>, u64)> = old
                .iter()
                .map(|id| {
                    let spec = &self.subscriptions[id].spec;
                    (spec.collection.as_str(), spec.record_id.as_deref(), *id)
                })
                .collect();
            // Counted before it is in the router: a dispatcher that sees it
            // must also see that the connection's matches are to be grouped.
            (self.shared).set_subscription_count(membership.subscriptions.len() + 1);
            self.engine.router.add_replacing(
                &spec.collection,
                spec.record_id.as_deref(),
                Arc::clone(&entry),
                &removed,
            );
            let presence = &self.engine.presence;
            for id in &old {
                if let Some((collection, _)) = membership.subscriptions.remove(id) {
                    count_in_channel(presence, &membership, &collection, -1);
                }
            }
            let key = (spec.collection.clone(), spec.record_id.clone());
            membership.subscriptions.insert(id, key);
            count_in_channel(presence, &membership, &spec.collection, 1);
            self.shared
                .set_subscription_count(membership.subscriptions.len());
        }
        for id in &old {
            self.forget(*id);
        }
        let since = spec.since.clone();
        let collection = spec.collection.clone();
        let position = self.engine.bus.position(&interest);
        if position.streams() > 1 && self.wildcard_position.is_none() {
            let from = since.clone().unwrap_or_else(|| position.clone());
            self.wildcard_position = Some((id, from));
        }
        tracing::debug!(
            connection = &*self.shared.name,
            subscription = id,
            %collection,
            since = since.as_ref().map(tracing::field::display),
            "subscribed"
        );
        self.subscriptions.insert(
            id,
            OpenSubscription {
                spec,
                entry,
                replayed_through: None,
                position,
                interest,
            },
        );
        if let Some(since) = since {
            // Read after the subscription is live: see `CatchUp`.
            let interest = &self.subscriptions[&id].interest;
            let replay = match self.engine.bus.replay(&collection, &since, interest).await {
                Ok(replay) => replay,
                Err(e) => {
                    let _ = self.unsubscribe(id);
                    return Err(e.into());
                }
            };
            if let Some(open) = self.subscriptions.get_mut(&id) {
                open.replayed_through = Some(replay.head);
            }
            if since.misses(&replay.first_available, false) {
                self.ready_reset(id, since, replay.first_available);
            }
            self.catch_ups.push_back(CatchUp {
                subscription: id,
                history: replay.history,
                held: VecDeque::new(),
                overflowed: false,
            });
        }
        Ok(id)
    }

    pub fn unsubscribe(&mut self, id: u64) -> Result<SubscriptionSpec, EngineError> {
        let spec = self
            .subscriptions
            .get(&id)
            .map(|open| open.spec.clone())
            .ok_or(EngineError::UnknownSubscription(id))?;
        {
            let mut membership = self.shared.membership.lock().expect("membership lock");
            if membership.subscriptions.remove(&id).is_some() {
                self.engine
                    .router
                    .remove(&spec.collection, spec.record_id.as_deref(), id);
                count_in_channel(&self.engine.presence, &membership, &spec.collection, -1);
                self.shared
                    .set_subscription_count(membership.subscriptions.len());
            }
        }
        self.forget(id);
        tracing::debug!(
            connection = &*self.shared.name,
            subscription = id,
            "unsubscribed"
        );
        Ok(spec)
    }

    /// Drops what the connection itself holds of subscription `id`.
    fn forget(&mut self, id: u64) {
        self.subscriptions.remove(&id);
        if self
            .wildcard_position
            .as_ref()
            .is_some_and(|(w, _)| *w == id)
        {
            self.wildcard_position = None;
        }
        self.catch_ups.retain(|c| c.subscription != id);
        self.ready.retain_mut(|r| match r {
            Ready::One(Received::Event(d)) => d.forget_subscription(id),
            Ready::One(Received::Reset(n)) => n.subscription != id,
            Ready::Run(ready) => ready.run.subscription != id,
        });
    }

    /// Where subscription `id` went live: resuming from it later misses
    /// nothing.
    pub fn head(&self, id: u64) -> Option<&Position> {
        self.subscriptions.get(&id).map(|open| &open.position)
    }

    /// The subscriptions of this connection, by id.
    pub fn subscriptions(&self) -> impl Iterator<Item = (u64, &SubscriptionSpec)> {
        self.subscriptions
            .iter()
            .map(|(id, open)| (*id, &open.spec))
    }

    /// Replaces the connection's credentials (the WebSocket `auth` action),
    /// e.g. a refreshed token before the old one expires. A connection that
    /// is someone (a user, an API key, or in open mode a claimed
    /// `user_id`) stays that one: a credential of anyone else is refused,
    /// since presence and everything already granted belong to the first.
    /// An anonymous connection may authenticate once, before it subscribes.
    pub fn authenticate(&mut self, principal: Principal) -> Result<(), EngineError> {
        let current = self.principal.user_id().or_else(|| {
            let membership = self.shared.membership.lock().expect("membership lock");
            membership.present_as.as_ref().map(|(id, _)| id.clone())
        });
        let next = principal.user_id();
        if let Some(current) = current
            && next.as_deref() != Some(current.as_str())
        {
            return Err(AuthError::Forbidden(format!(
                "this connection is {current:?} and cannot change user to {}: refresh it with a token for {current:?}, or open a new connection",
                next.map_or_else(|| "an anonymous client".to_owned(), |n| format!("{n:?}"))
            ))
            .into());
        }
        if !self.subscriptions.is_empty() && next != self.principal.user_id() {
            return Err(AuthError::Forbidden(
                "a connection with subscriptions cannot change user; unsubscribe first".into(),
            )
            .into());
        }
        *self.shared.user_id.lock().expect("user lock") = principal.user_id();
        self.expires = deadline(&principal);
        self.principal = principal;
        self.join_presence(None);
        Ok(())
    }

    /// Counts this connection as online: as its principal's user, or, for
    /// an anonymous connection on an open server, as `claimed` (the SSE and
    /// WebSocket `user_id=` parameter). `user_name` is shown in snapshots.
    pub fn join_presence(&mut self, claimed: Option<(String, Option<String>)>) {
        let identity = match (self.principal.user_id(), claimed) {
            (Some(user_id), claimed) => {
                let name = match &self.principal {
                    Principal::User(claims) => claims
                        .claims
                        .get("name")
                        .and_then(|n| n.as_str())
                        .map(str::to_owned),
                    _ => None,
                };
                (user_id, name.or(claimed.and_then(|(_, name)| name)))
            }
            (None, Some(claimed)) if self.engine.auth.is_open() => claimed,
            (None, _) => return,
        };
        let mut membership = self.shared.membership.lock().expect("membership lock");
        if membership.retired || membership.present_as.is_some() {
            return;
        }
        let presence = &self.engine.presence;
        presence.change_local(&identity.0, None, identity.1.as_deref(), 1);
        membership.present_as = Some(identity);
        let channels: Vec<String> = membership
            .subscriptions
            .values()
            .map(|(collection, _)| collection.clone())
            .collect();
        for channel in channels {
            count_in_channel(presence, &membership, &channel, 1);
        }
    }

    /// Sorts a live delivery for several subscriptions: each is sorted on
    /// its own, and those ready go out together again.
    fn take_live_for_many(&mut self, delivery: Delivery) {
        let before = self.ready.len();
        for id in delivery.subscriptions() {
            self.take_live(Delivery::new(
                id,
                Arc::clone(&delivery.event),
                delivery.view,
            ));
        }
        let ready: Vec<u64> = self
            .ready
            .drain(before..)
            .filter_map(|r| match r {
                Ready::One(Received::Event(d)) => Some(d.subscription),
                _ => None,
            })
            .collect();
        if let Some((first, rest)) = ready.split_first() {
            self.ready.push_back(Ready::One(Received::Event(Delivery {
                more: (!rest.is_empty()).then(|| rest.into()),
                ..Delivery::new(*first, delivery.event, delivery.view)
            })));
        }
    }

    /// Sorts a live delivery: dropped if its subscription is gone or the
    /// replay had it, held if the subscription is catching up, else ready.
    fn take_live(&mut self, delivery: Delivery) {
        if delivery.more.is_some() {
            return self.take_live_for_many(delivery);
        }
        let Some(open) = self.subscriptions.get(&delivery.subscription) else {
            return;
        };
        if replayed(open.replayed_through.as_ref(), &delivery.event) {
            return;
        }
        let capacity = self.engine.config.queue_capacity;
        match self
            .catch_ups
            .iter_mut()
            .find(|c| c.subscription == delivery.subscription)
        {
            Some(catch_up) if catch_up.overflowed => {}
            Some(catch_up) if catch_up.held.len() >= capacity => {
                catch_up.held.clear();
                catch_up.overflowed = true;
            }
            Some(catch_up) => catch_up.held.push_back(delivery),
            None => self.ready.push_back(Ready::One(Received::Event(delivery))),
        }
    }

    /// Sorts a run: ready as it is, unless its subscription is gone or
    /// catching up (then each event is sorted on its own).
    fn take_run(&mut self, run: Run) {
        let Some(open) = self.subscriptions.get(&run.subscription) else {
            return;
        };
        // A run that begins past the replay's end (of one stream) has
        // nothing in it that the replay had.
        let first = run.shared.events[0].event.seq;
        let replayed_through = (open.replayed_through.as_ref())
            .filter(|through| through.as_seq().is_none_or(|seq| first <= seq))
            .cloned();
        let mut ready = ReadyRun {
            run,
            next: 0,
            echo: open.spec.echo,
            replayed_through,
        };
        let subscription = ready.run.subscription;
        if !(self.catch_ups.iter()).any(|c| c.subscription == subscription) {
            self.ready.push_back(Ready::Run(ready));
            return;
        }
        let name = Arc::clone(&self.shared.name);
        while let Some(event) = ready.next_event(&name) {
            self.take_live(Delivery::new(subscription, event, View::default()));
        }
    }

    /// Queues a reset for `subscription`: the events after `since` and
    /// before `first_available` are gone.
    fn ready_reset(&mut self, subscription: u64, since: Position, first_available: Position) {
        let notice = ResetNotice {
            subscription,
            since,
            first_available,
        };
        self.ready
            .push_back(Ready::One(Received::Reset(Box::new(notice))));
    }

    /// Sorts what a catch-up's history produced.
    fn take_history(&mut self, item: Option<Result<Arc<SharedEvent>, BusError>>) {
        match item {
            Some(Ok(event)) => {
                let catch_up = &self.catch_ups[0];
                let open = &self.subscriptions[&catch_up.subscription];
                let wanted = open
                    .spec
                    .record_id
                    .as_ref()
                    .is_none_or(|r| *r == event.event.record_id);
                let through = open.replayed_through.as_ref();
                if through.is_some_and(|r| event.event.seq <= r.of(event.partition))
                    && wanted
                    && let Some(view) = open.entry.classify(&event)
                {
                    self.ready
                        .push_back(Ready::One(Received::Event(Delivery::new(
                            catch_up.subscription,
                            event,
                            view,
                        ))));
                }
            }
            Some(Err(e)) => {
                self.shared.end(EndReason::History(e.to_string()));
            }
            None => {
                let done = self.catch_ups.pop_front().expect("a catch-up");
                let held = done.held.into_iter();
                self.ready
                    .extend(held.map(|d| Ready::One(Received::Event(d))));
            }
        }
    }

    /// Reads the history on from where an overflowed catch-up's history
    /// ended, up to the bus's new head.
    async fn extend_catch_up(&mut self) {
        let id = self.catch_ups[0].subscription;
        let open = &self.subscriptions[&id];
        let since = (open.replayed_through.clone()).unwrap_or_else(|| Position::seq(0));
        let replay = match (self.engine.bus)
            .replay(&open.spec.collection, &since, &open.interest)
            .await
        {
            Ok(replay) => replay,
            Err(e) => {
                self.shared.end(EndReason::History(e.to_string()));
                return;
            }
        };
        if since.misses(&replay.first_available, true) {
            self.ready_reset(id, since, replay.first_available);
        }
        if let Some(open) = self.subscriptions.get_mut(&id) {
            open.replayed_through = Some(replay.head);
        }
        let catch_up = &mut self.catch_ups[0];
        catch_up.history = replay.history;
        catch_up.overflowed = false;
    }

    /// The next thing to hand to the client. After the connection has ended
    /// (overflow, shutdown) what was queued before the end comes first, then
    /// the reason.
    pub async fn recv(&mut self) -> Result<Received, EndReason> {
        loop {
            if let Some(item) = self.pop_ready() {
                return Ok(item);
            }
            if self.take_incoming() {
                continue;
            }
            if let Some(reason) = self.shared.end_reason().cloned() {
                return Err(reason);
            }
            let incoming = &mut self.incoming;
            let ended = &self.shared.end_signal;
            let shared = &self.shared;
            let expiry = async {
                match self.expires {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
                shared.end(EndReason::TokenExpired);
                Step::Ended
            };
            let live = async {
                std::future::poll_fn(|cx| shared.mailbox.poll_take_all(cx, incoming)).await;
                Step::Live
            };
            let step = match self.catch_ups.front_mut() {
                Some(catch_up) => tokio::select! {
                    step = live => step,
                    item = catch_up.history.next() => Step::History(item),
                    _ = ended.notified() => Step::Ended,
                    step = expiry => step,
                },
                None => tokio::select! {
                    step = live => step,
                    _ = ended.notified() => Step::Ended,
                    step = expiry => step,
                },
            };
            match step {
                Step::Live => self.sort_incoming(),
                Step::History(None) if self.catch_ups[0].overflowed => {
                    // Boxed: a bus replay's future is large and rare, and
                    // inline it would size every connection's task.
                    Box::pin(self.extend_catch_up()).await;
                }
                Step::History(item) => self.take_history(item),
                Step::Ended => {}
            }
        }
    }

    /// Resolves once the connection has been evicted (it read too slowly):
    /// an edge blocked writing to it can give up, since what it is writing
    /// will be resumed anyway.
    pub fn evicted(&self) -> impl Future<Output = ()> + Send + 'static {
        let shared = Arc::clone(&self.shared);
        async move {
            while !shared.is_evicted() {
                shared.end_signal.notified().await;
            }
        }
    }

    /// Something already at hand, without waiting; for batching writes.
    /// It reads on in a catch-up's history as far as that is at hand (the
    /// end of a catch-up is left to [`Connection::recv`]).
    pub fn try_recv(&mut self) -> Option<Received> {
        use futures_util::FutureExt;
        loop {
            if let Some(item) = self.pop_ready() {
                return Some(item);
            }
            if let Some(catch_up) = self.catch_ups.front_mut()
                && let Some(Some(item)) = catch_up.history.next().now_or_never()
            {
                self.take_history(Some(item));
                continue;
            }
            if !self.take_incoming() {
                return None;
            }
        }
    }

    /// The rest of a run at the head of what is ready, when it can go out
    /// whole: for edges that write a run's encodings at once
    /// ([`SharedRun::encoded`]) instead of one event at a time. `None`
    /// when something else comes first; [`Connection::try_recv`] has it.
    pub fn try_recv_run(&mut self) -> Option<RunSlice> {
        let Some(Ready::Run(ready)) = self.ready.front() else {
            return None;
        };
        // A `*` position token moves by each event's own stream.
        if !ready.goes_whole() || self.wildcard_position.is_some() {
            return None;
        }
        let Some(Ready::Run(ready)) = self.ready.pop_front() else {
            unreachable!("just seen");
        };
        let events = &ready.run.shared.events;
        let range = ready.next..events.len();
        if let Some(last) = events[range.clone()].last() {
            self.last_seq = self.last_seq.max(last.event.seq);
        }
        self.tally.handed(range.len());
        Some(RunSlice {
            subscription: ready.run.subscription,
            run: ready.run.shared,
            range,
        })
    }

    fn pop_ready(&mut self) -> Option<Received> {
        let item = loop {
            if let Ready::Run(ready) = self.ready.front_mut()? {
                match ready.next_event(&self.shared.name) {
                    Some(event) => {
                        let subscription = ready.run.subscription;
                        break Received::Event(Delivery::new(subscription, event, View::default()));
                    }
                    None => self.ready.pop_front(),
                };
            } else if let Some(Ready::One(item)) = self.ready.pop_front() {
                break item;
            }
        };
        if let Received::Event(delivery) = &item {
            self.tally.handed(1);
            let seq = delivery.event.event.seq;
            self.last_seq = self.last_seq.max(seq);
            if let Some((id, position)) = &mut self.wildcard_position
                && seq > 0
                && delivery.subscriptions().any(|s| s == *id)
            {
                position.set(delivery.event.partition, seq);
            }
        }
        Some(item)
    }

    /// Where a client that reconnects elsewhere resumes: the seq of the
    /// newest event handed out on this connection (`None`: none was). Exact
    /// for subscriptions to one collection (or `*`), whose events arrive in
    /// seq order; with several, each subscription's own last seq is. For
    /// `*` over several NATS streams: its position token.
    pub fn resume_position(&self) -> Option<Position> {
        if let Some((_, position)) = &self.wildcard_position {
            return Some(position.clone());
        }
        (self.last_seq > 0).then(|| Position::seq(self.last_seq))
    }

    /// Takes what the mailbox holds and sorts it; `false` if it was empty.
    fn take_incoming(&mut self) -> bool {
        let taken = self.shared.mailbox.take_all(&mut self.incoming);
        self.sort_incoming();
        taken
    }

    fn sort_incoming(&mut self) {
        if let Some(oldest) = self.incoming.front() {
            let transport = self.shared.transport as usize;
            self.tally.batch(transport, oldest.first_event().arrived);
        }
        while let Some(queued) = self.incoming.pop_front() {
            match queued {
                Queued::One(delivery) => self.take_live(delivery),
                Queued::Run(run) => self.take_run(run),
            }
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.tally.flush(self.shared.transport as usize);
        retire(&self.engine.router, &self.engine.presence, &self.shared);
    }
}

/// Gives back everything `conn` holds: its subscriptions leave the router,
/// its user leaves presence, and stats forget it. Runs once, when the
/// connection closes or, earlier, when it is evicted.
fn retire(router: &Router, presence: &Presence, conn: &ConnShared) {
    {
        let mut membership = conn.membership.lock().expect("membership lock");
        if membership.retired {
            return;
        }
        membership.retired = true;
        METRICS.connections_closed.add(conn.transport as usize, 1);
        tracing::debug!(connection = &*conn.name, "connection closed");
        for (id, (collection, record_id)) in std::mem::take(&mut membership.subscriptions) {
            router.remove(&collection, record_id.as_deref(), id);
            count_in_channel(presence, &membership, &collection, -1);
        }
        if let Some((user_id, user_name)) = membership.present_as.take() {
            presence.change_local(&user_id, None, user_name.as_deref(), -1);
        }
    }
    router.unregister(conn.id);
}

/// Counts a connection's user (if it has one) in or out of a channel.
fn count_in_channel(presence: &Presence, membership: &Membership, channel: &str, delta: i32) {
    if channel == WILDCARD || channel == PRESENCE_COLLECTION {
        return;
    }
    if let Some((user_id, user_name)) = &membership.present_as {
        presence.change_local(user_id, Some(channel), user_name.as_deref(), delta);
    }
}

/// Starts the task that retires evicted connections: a dispatcher that
/// finds a queue full cannot take router locks itself, so it hands the
/// connection's id here. The task ends with the engine.
fn spawn_reaper(
    router: std::sync::Weak<Router>,
    presence: std::sync::Weak<Presence>,
) -> mpsc::UnboundedSender<u64> {
    let (evictions, mut evicted) = mpsc::unbounded_channel::<u64>();
    tokio::spawn(async move {
        while let Some(id) = evicted.recv().await {
            let (Some(router), Some(presence)) = (router.upgrade(), presence.upgrade()) else {
                break;
            };
            if let Some(conn) = router.connection(id) {
                retire(&router, &presence, &conn);
            }
        }
    });
    evictions
}

/// A map keyed by subscription id. Every delivery looks its subscription up,
/// and ids are counters that no client chooses, so a multiplicative hash is
/// enough (SipHash's resistance to chosen keys would cost for nothing).
type IdMap<V> = HashMap<u64, V, std::hash::BuildHasherDefault<IdHasher>>;

#[derive(Default)]
struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.write_u64(u64::from(*byte));
        }
    }

    fn write_u64(&mut self, id: u64) {
        self.0 = (self.0 ^ id).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// The moment `principal`'s token expires, on the tokio clock.
fn deadline(principal: &Principal) -> Option<tokio::time::Instant> {
    let left = principal
        .expires_at()?
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    Some(tokio::time::Instant::now() + left)
}

/// Publish budgets kept before idle ones are dropped.
const MAX_BUDGETS: usize = 10_000;

/// A token bucket: `rate` tokens a second, holding at most `rate`.
struct RateLimiter {
    rate: f64,
    tokens: f64,
    last: std::time::Instant,
}

impl RateLimiter {
    fn new(rate: u32) -> Self {
        RateLimiter {
            rate: f64::from(rate),
            tokens: f64::from(rate),
            last: std::time::Instant::now(),
        }
    }

    fn take(&mut self) -> bool {
        self.take_many(1)
    }

    /// Takes `count` tokens at once, or none.
    fn take_many(&mut self, count: usize) -> bool {
        self.refill();
        let count = count as f64;
        if self.tokens >= count {
            self.tokens -= count;
            true
        } else {
            false
        }
    }

    fn is_full(&mut self) -> bool {
        self.refill();
        self.tokens >= self.rate
    }

    fn refill(&mut self) {
        let now = std::time::Instant::now();
        let earned = now.duration_since(self.last).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + earned).min(self.rate);
        self.last = now;
    }
}

#[cfg(test)]
mod tests;
