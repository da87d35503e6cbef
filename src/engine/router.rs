//! The subscription registry and fan-out of one node.
//!
//! Subscriptions live in a [`MatchIndex`] per collection (plus one for `*`
//! and one per pinned record id), and collections are spread over shards,
//! each with its own lock and dispatcher task. The bus hands events to the
//! router through [`Inbox`], which only queues them; the shard's dispatcher
//! asks the index for candidates, evaluates their filters, and pushes a
//! [`Delivery`] (an `Arc` of the shared event, no copy) into each matching
//! connection's bounded queue. Subscriptions without a filter take every
//! event of their collection: they are kept apart from the index and get
//! each dispatch round's events as one shared [`Run`], so a round costs the
//! dispatcher one push per such subscriber, however many events it
//! carries. A full queue evicts that connection with
//! [`EndReason::Overflow`]; the dispatcher never blocks on a subscriber
//! (it waits for the edges to take a round, for `--dispatch-window` at
//! most).

use super::mailbox::{Backlog, Mailbox, Queued, Run};
use super::presence::PRESENCE_COLLECTION;
use super::{Delivery, EndReason, Transport};
use crate::auth::{Auth, Principal};
use crate::bus::{Audience, Inbox};
use crate::event::{SharedEvent, SharedRun, View, WILDCARD};
use crate::filter::Filter;
use crate::filter::index::{MatchIndex, SubSet};
use crate::metrics::{Eviction, METRICS};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;
use tokio::sync::{Notify, mpsc};

/// What the registry knows of one open connection.
pub(crate) struct ConnShared {
    pub id: u64,
    /// Unique in the cluster; what `Event::origin` holds.
    pub name: Arc<str>,
    pub transport: Transport,
    pub user_id: Mutex<Option<String>>,
    pub mailbox: Mailbox,
    ended: OnceLock<EndReason>,
    pub end_signal: Notify,
    /// What the connection holds in the router and in presence.
    pub membership: Mutex<Membership>,
    /// How many subscriptions `membership` holds, read by dispatch.
    subscription_count: AtomicUsize,
    /// Where an evicted connection's id goes, for the engine to retire it.
    evictions: mpsc::UnboundedSender<u64>,
}

/// A connection's place in the router and in presence. Retiring it (once,
/// whoever comes first: the connection closing or an eviction) gives all of
/// it back; a retired connection can take nothing new.
#[derive(Default)]
pub(crate) struct Membership {
    /// Open subscriptions: id → (collection, record id).
    pub subscriptions: HashMap<u64, (String, Option<String>)>,
    /// The user this connection counts as online, and their display name.
    pub present_as: Option<(String, Option<String>)>,
    pub retired: bool,
}

impl ConnShared {
    pub fn new(
        id: u64,
        name: String,
        transport: Transport,
        queue_capacity: usize,
        backlog: Arc<Backlog>,
        evictions: mpsc::UnboundedSender<u64>,
    ) -> Self {
        ConnShared {
            id,
            name: name.into(),
            transport,
            user_id: Mutex::new(None),
            mailbox: Mailbox::new(queue_capacity, backlog),
            ended: OnceLock::new(),
            end_signal: Notify::new(),
            membership: Mutex::default(),
            subscription_count: AtomicUsize::new(0),
            evictions,
        }
    }

    /// Ends the connection's delivery; the first reason wins.
    pub fn end(&self, reason: EndReason) -> bool {
        let eviction = match &reason {
            EndReason::Overflow { .. } => Some(Eviction::Overflow),
            EndReason::TokenExpired => Some(Eviction::TokenExpired),
            EndReason::History(_) => Some(Eviction::History),
            EndReason::Shutdown => None,
        };
        let first = self.ended.set(reason).is_ok();
        if first {
            if let Some(eviction) = eviction {
                METRICS.evicted(eviction);
                let reason = self.ended.get().expect("just set");
                tracing::info!(connection = &*self.name, %reason, "connection ended by the server");
            }
            self.end_signal.notify_one();
        }
        first
    }

    /// Ends the connection and has the engine take it out of the router,
    /// presence and stats at once, whether or not its edge is still
    /// reading (a stalled socket may hold the edge for a while).
    pub fn evict(&self, reason: EndReason) {
        if self.end(reason) {
            let _ = self.evictions.send(self.id);
        }
    }

    /// Whether the connection was evicted: only a full queue evicts.
    pub fn is_evicted(&self) -> bool {
        matches!(self.ended.get(), Some(EndReason::Overflow { .. }))
    }

    pub fn end_reason(&self) -> Option<&EndReason> {
        self.ended.get()
    }

    /// Whether matches must be grouped into one delivery per event.
    fn has_several_subscriptions(&self) -> bool {
        self.subscription_count.load(Ordering::Relaxed) > 1
    }

    /// Records how many subscriptions the connection holds.
    pub fn set_subscription_count(&self, count: usize) {
        self.subscription_count.store(count, Ordering::Relaxed);
    }

    /// Whether deliveries have ended; its subscriptions are skipped.
    fn is_closed(&self) -> bool {
        self.ended.get().is_some()
    }

    fn deliver(
        &self,
        subscription: u64,
        more: Option<Box<[u64]>>,
        event: &Arc<SharedEvent>,
        view: View,
    ) {
        self.queue(Queued::One(Delivery {
            subscription,
            more,
            event: Arc::clone(event),
            view,
        }));
    }

    /// Queues `item`, or evicts the connection when its queue is full.
    fn queue(&self, item: Queued) {
        if self.mailbox.push(item).is_err() {
            self.evict(EndReason::Overflow {
                capacity: self.mailbox.capacity(),
            });
        }
    }
}

pub(crate) struct SubEntry {
    pub id: u64,
    pub conn: Arc<ConnShared>,
    /// The subscriber's filter, already combined with its row rule.
    pub filter: Option<Filter>,
    /// The row rule alone (for a collection subscription under a policy),
    /// to withhold the images it rejects.
    pub row: Option<Filter>,
    /// For `*` subscriptions under a policy: what each collection allows.
    pub gate: Option<Gate>,
    /// Also deliver what its own connection publishes.
    pub echo: bool,
}

impl SubEntry {
    /// Whether `event` came from this subscription's own connection, which
    /// does not want it back.
    fn is_own_echo(&self, event: &SharedEvent) -> bool {
        !self.echo && event.is_from(&self.conn.name)
    }

    fn matches(&self, collection: &str, record: &serde_json::Value) -> bool {
        if let Some(gate) = &self.gate {
            match gate.decision(collection, record) {
                None => return false,
                Some(Some(row)) if !row.matches(record) => return false,
                Some(_) => {}
            }
        }
        self.filter.as_ref().is_none_or(|f| f.matches(record))
    }

    /// Whether the subscriber's row rule lets it see `image`, a row of
    /// `collection`.
    fn may_see(&self, collection: &str, image: &serde_json::Value) -> bool {
        match &self.gate {
            Some(gate) => {
                !matches!(gate.decision(collection, image), Some(Some(row)) if !row.matches(image))
            }
            None => self.row.as_ref().is_none_or(|row| row.matches(image)),
        }
    }

    /// How a delivery of `event` shows the row, once the subscription
    /// matched it (`left_filter`: by its `old_data` only).
    fn view(&self, event: &SharedEvent, left_filter: bool) -> View {
        let (collection, data) = (&event.event.collection, &event.event.data);
        let withheld = if left_filter {
            !self.may_see(collection, data)
        } else {
            event
                .event
                .old_data
                .as_ref()
                .is_some_and(|old| !self.may_see(collection, old))
        };
        View {
            left_filter,
            withheld,
        }
    }

    /// Whether this subscription wants `event`, by the live-query rule of
    /// [`deliver_from`], and how it shows the row. For replays, where no
    /// index narrows the candidates.
    pub(crate) fn classify(&self, event: &SharedEvent) -> Option<View> {
        let collection = &event.event.collection;
        if self.is_own_echo(event) {
            None
        } else if self.matches(collection, &event.event.data) {
            Some(self.view(event, false))
        } else if event
            .event
            .old_data
            .as_ref()
            .is_some_and(|old| self.matches(collection, old))
        {
            Some(self.view(event, true))
        } else {
            None
        }
    }
}

/// The policy decisions of a `*` or `presence` subscription, asked once
/// and remembered: per collection, `None` denied, `Some(row filter)`
/// allowed; for presence events, per channel (`None`: connected at all),
/// whether the principal may see it ([`crate::auth::Policy::check_presence`]).
pub(crate) struct Gate {
    pub auth: Arc<Auth>,
    pub principal: Principal,
    decisions: Mutex<HashMap<String, Option<Option<Filter>>>>,
    channels: Mutex<HashMap<Option<String>, bool>>,
}

impl Gate {
    pub fn new(auth: Arc<Auth>, principal: Principal) -> Self {
        Gate {
            auth,
            principal,
            decisions: Mutex::new(HashMap::new()),
            channels: Mutex::new(HashMap::new()),
        }
    }

    /// Whether `record` of `collection` may pass, and through which row
    /// filter.
    fn decision(&self, collection: &str, record: &serde_json::Value) -> Option<Option<Filter>> {
        if collection == PRESENCE_COLLECTION {
            return self.presence(record).then_some(None);
        }
        let mut decisions = self.decisions.lock().expect("gate lock");
        if let Some(known) = decisions.get(collection) {
            return known.clone();
        }
        let decision = self
            .auth
            .policy
            .check_subscribe(&self.principal, collection)
            .ok();
        decisions.insert(collection.to_owned(), decision.clone());
        decision
    }

    /// Whether the presence event `data` (whose `channel` is a collection,
    /// or null for connected at all) may be seen.
    fn presence(&self, data: &serde_json::Value) -> bool {
        let channel = match data.get("channel") {
            Some(serde_json::Value::String(channel)) => Some(channel.as_str()),
            Some(serde_json::Value::Null) => None,
            _ => return false,
        };
        let mut channels = self.channels.lock().expect("gate lock");
        if let Some(known) = channels.get(&channel.map(str::to_owned)) {
            return *known;
        }
        let allowed = self
            .auth
            .policy
            .check_presence(&self.principal, channel)
            .is_ok();
        channels.insert(channel.map(str::to_owned), allowed);
        allowed
    }
}

/// The subscriptions of one collection (or of `*`).
#[derive(Default)]
struct Scope {
    /// Those without a filter (or gate): every event matches them.
    unfiltered: SubSet<Arc<SubEntry>>,
    index: MatchIndex<Arc<SubEntry>>,
    by_record: HashMap<String, MatchIndex<Arc<SubEntry>>>,
}

impl Scope {
    fn is_empty(&self) -> bool {
        self.unfiltered.is_empty() && self.index.is_empty() && self.by_record.is_empty()
    }

    /// Delivers `event` to its subscribers, or, for those that get the
    /// round's events as a run, adds it to `round`. A connection with
    /// several matching subscriptions gets one delivery naming them all.
    fn dispatch<'a>(&'a self, event: &Arc<SharedEvent>, round: &mut Round<'a>) {
        let mut overlapping = Vec::new();
        if !self.unfiltered.is_empty() {
            let part = round.part(self);
            if !part.runs.is_empty() {
                part.events.push(Arc::clone(event));
            }
            for sub in &part.grouped {
                if !sub.conn.is_closed() && !sub.is_own_echo(event) {
                    overlapping.push((Arc::clone(sub), View::default()));
                }
            }
        }
        deliver_from(&self.index, event, &mut overlapping);
        if !event.event.record_id.is_empty()
            && let Some(index) = self.by_record.get(&event.event.record_id)
        {
            deliver_from(index, event, &mut overlapping);
        }
        deliver_grouped(overlapping, event);
    }
}

/// Live-query semantics: a subscription gets the event when its filter
/// matches `data`; when it matches only `old_data`, it gets the event marked
/// `left_filter`. The two passes cannot deliver twice: the second delivers
/// only where the first did not match. Matches of connections holding more
/// than one subscription go to `overlapping`, to be grouped.
fn deliver_from(
    index: &MatchIndex<Arc<SubEntry>>,
    event: &Arc<SharedEvent>,
    overlapping: &mut Vec<(Arc<SubEntry>, View)>,
) {
    let (collection, data) = (&event.event.collection, &event.event.data);
    let mut deliver = |sub: &Arc<SubEntry>, left_filter: bool| {
        let view = sub.view(event, left_filter);
        if sub.conn.has_several_subscriptions() {
            overlapping.push((Arc::clone(sub), view));
        } else {
            sub.conn.deliver(sub.id, None, event, view);
        }
    };
    index.candidates(data, |_, sub| {
        if !sub.conn.is_closed() && sub.matches(collection, data) && !sub.is_own_echo(event) {
            deliver(sub, false);
        }
    });
    if let Some(old) = &event.event.old_data {
        index.candidates(old, |_, sub| {
            if !sub.conn.is_closed()
                && !sub.matches(collection, data)
                && sub.matches(collection, old)
                && !sub.is_own_echo(event)
            {
                deliver(sub, true);
            }
        });
    }
}

/// What a dispatch round gathers for the runs of its scopes' unfiltered
/// subscriptions, which it hands out at its end.
#[derive(Default)]
struct Round<'a> {
    parts: Vec<RoundPart<'a>>,
}

/// A round's share of one scope with unfiltered subscriptions.
struct RoundPart<'a> {
    scope: &'a Scope,
    /// The round's events of the scope, in order.
    events: Vec<Arc<SharedEvent>>,
    /// Unfiltered subscriptions of connections holding only them: they get
    /// `events` as one run.
    runs: Vec<&'a Arc<SubEntry>>,
    /// Unfiltered subscriptions of connections holding several: matched
    /// per event, for their matches to be grouped with the others.
    grouped: Vec<&'a Arc<SubEntry>>,
}

impl<'a> Round<'a> {
    /// `scope`'s part, sorting its unfiltered subscriptions the first time.
    /// A connection's subscription count cannot change for subscriptions of
    /// this shard while the round holds its lock, so the sort holds for
    /// the round. Rounds touch few scopes, hence the linear search.
    fn part(&mut self, scope: &'a Scope) -> &mut RoundPart<'a> {
        let at = match self.parts.iter().position(|p| std::ptr::eq(p.scope, scope)) {
            Some(at) => at,
            None => {
                let (grouped, runs) = (scope.unfiltered.iter())
                    .map(|(_, sub)| sub)
                    .filter(|sub| !sub.conn.is_closed())
                    .partition(|sub| sub.conn.has_several_subscriptions());
                self.parts.push(RoundPart {
                    scope,
                    events: Vec::new(),
                    runs,
                    grouped,
                });
                self.parts.len() - 1
            }
        };
        &mut self.parts[at]
    }

    /// Hands each part's events to its subscribers as one shared run.
    fn deliver_runs(self) {
        for part in self.parts {
            if part.runs.is_empty() {
                continue;
            }
            let shared = Arc::new(SharedRun::new(part.events.into()));
            for sub in part.runs {
                if !sub.conn.is_closed() {
                    sub.conn.queue(Queued::Run(Run {
                        subscription: sub.id,
                        shared: Arc::clone(&shared),
                    }));
                }
            }
        }
    }
}

/// One delivery per connection (and [`View`]) for the matches of
/// connections with several subscriptions, naming them in id order.
fn deliver_grouped(mut matches: Vec<(Arc<SubEntry>, View)>, event: &Arc<SharedEvent>) {
    matches.sort_unstable_by_key(|(sub, view)| (sub.conn.id, *view, sub.id));
    for group in matches.chunk_by(|a, b| a.0.conn.id == b.0.conn.id && a.1 == b.1) {
        let (first, view) = &group[0];
        let more: Option<Box<[u64]>> =
            (group.len() > 1).then(|| group[1..].iter().map(|(sub, _)| sub.id).collect());
        first.conn.deliver(first.id, more, event, *view);
    }
}

/// The subscriptions of a shard's collections, by name (the wildcard
/// shard keeps `*` subscriptions under `*`).
#[derive(Default)]
struct Scopes(HashMap<String, Scope>);

impl Scopes {
    fn insert(&mut self, collection: &str, record_id: Option<&str>, sub: Arc<SubEntry>) {
        let scope = self.0.entry(collection.to_owned()).or_default();
        let index = match record_id {
            Some(record) => scope.by_record.entry(record.to_owned()).or_default(),
            None if sub.filter.is_none() && sub.gate.is_none() => {
                return scope.unfiltered.insert(sub.id, sub);
            }
            None => &mut scope.index,
        };
        index.insert(sub.id, sub.filter.as_ref(), Arc::clone(&sub));
    }

    fn remove(&mut self, collection: &str, record_id: Option<&str>, id: u64) {
        let Some(scope) = self.0.get_mut(collection) else {
            return;
        };
        match record_id {
            Some(record) => {
                if let Some(index) = scope.by_record.get_mut(record) {
                    index.remove(id);
                    if index.is_empty() {
                        scope.by_record.remove(record);
                    }
                }
            }
            None => {
                if !scope.unfiltered.remove(id) {
                    scope.index.remove(id);
                }
            }
        }
        if scope.is_empty() {
            self.0.remove(collection);
        }
    }
}

/// Events a dispatcher fans out under one lock acquisition before it lets
/// subscribe and unsubscribe in.
const DISPATCH_BATCH: usize = 1024;

/// Events the node's dispatchers may have queued before a publisher waits
/// (see [`Router::admit`]).
const MAX_QUEUED_EVENTS: usize = 256;

/// Events queued on the dispatchers and not yet fanned out, node-wide.
#[derive(Default)]
struct Admission {
    queued: AtomicUsize,
    room: Notify,
}

/// A part of the router with its own lock and its own dispatcher task,
/// which fans out the events of its collections in the order it gets them.
/// Publishers only push onto its queue; they wait only while the
/// dispatchers are full ([`Router::admit`]).
///
/// The dispatcher paces itself by the edges: after a round it waits until
/// the connections it handed deliveries to have taken nearly all of them
/// (the node's [`Backlog`]), at most `window`, and the next round takes
/// everything that arrived meanwhile at once. An event after a quiet spell
/// goes out at once; under load each connection gets several events per
/// wake-up and writes them with one system call, which is what a delivery
/// costs most. A few slow connections do not hold it up: it waits for
/// fifteen sixteenths of the round, and for `window` at most.
struct Shard {
    scopes: Arc<RwLock<Scopes>>,
    queue: mpsc::UnboundedSender<Arc<SharedEvent>>,
}

impl Shard {
    /// Starts the shard's dispatcher; it ends when the shard is dropped.
    /// `fixed_key` is the scope every event goes to (`*` for the wildcard
    /// shard); otherwise an event goes to its collection's scope.
    fn start(
        fixed_key: Option<&'static str>,
        window: Duration,
        backlog: Arc<Backlog>,
        admission: Arc<Admission>,
    ) -> Shard {
        let scopes: Arc<RwLock<Scopes>> = Arc::default();
        let (queue, mut events) = mpsc::unbounded_channel::<Arc<SharedEvent>>();
        let dispatching = Arc::clone(&scopes);
        tokio::spawn(async move {
            while let Some(first) = events.recv().await {
                let before = backlog.filled();
                let mut dispatched = 0;
                {
                    let scopes = dispatching.read().expect("shard lock");
                    let mut round = Round::default();
                    let mut next = Some(first);
                    while let Some(event) = next {
                        let key = fixed_key.unwrap_or(&event.event.collection);
                        if let Some(scope) = scopes.0.get(key) {
                            scope.dispatch(&event, &mut round);
                        }
                        dispatched += 1;
                        next = (dispatched < DISPATCH_BATCH)
                            .then(|| events.try_recv().ok())
                            .flatten();
                    }
                    round.deliver_runs();
                }
                admission.queued.fetch_sub(dispatched, Ordering::AcqRel);
                admission.room.notify_waiters();
                let filled = backlog.filled().saturating_sub(before);
                if filled > 0 && !window.is_zero() {
                    let target = before + filled / 16;
                    let _ = tokio::time::timeout(window, backlog.drained_to(target)).await;
                }
            }
        });
        Shard { scopes, queue }
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Scopes> {
        self.scopes.write().expect("shard lock")
    }
}

/// The subscription registry of one node: collections spread over shards
/// by name, `*` subscriptions in a shard of their own that sees every
/// event, so each subscription gets its events in seq order.
pub struct Router {
    /// A random name for this node, part of every connection name.
    node: String,
    shards: Box<[Shard]>,
    wildcard: Shard,
    pub(crate) connections: Mutex<HashMap<u64, Arc<ConnShared>>>,
    head_seq: AtomicU64,
    next_id: AtomicU64,
    backlog: Arc<Backlog>,
    admission: Arc<Admission>,
}

impl Router {
    /// A router with `shards` collection shards (at least one), each with
    /// its dispatcher task on the current tokio runtime, waiting at most
    /// `window` for the edges after a round (see [`Shard`]).
    pub fn new(shards: usize, window: Duration) -> Router {
        use std::hash::{BuildHasher, RandomState};
        let random = RandomState::new().hash_one(std::process::id());
        let backlog = Arc::new(Backlog::new());
        let admission = Arc::new(Admission::default());
        let shard = |key| Shard::start(key, window, Arc::clone(&backlog), Arc::clone(&admission));
        Router {
            node: format!("{:08x}", random as u32),
            shards: (0..shards.max(1)).map(|_| shard(None)).collect(),
            wildcard: shard(Some(WILDCARD)),
            connections: Mutex::default(),
            head_seq: AtomicU64::default(),
            next_id: AtomicU64::default(),
            backlog,
            admission,
        }
    }

    /// The node's count of mailboxes holding untaken deliveries, which
    /// every connection's mailbox shares.
    pub(crate) fn backlog(&self) -> Arc<Backlog> {
        Arc::clone(&self.backlog)
    }

    /// Waits while the dispatchers hold [`MAX_QUEUED_EVENTS`] events not
    /// yet fanned out. Publishers call it before publishing: when the edges
    /// cannot write as fast as events come in, publishing slows down,
    /// instead of queues growing until subscribers are cut off.
    pub async fn admit(&self) {
        loop {
            let room = self.admission.room.notified();
            if self.admission.queued.load(Ordering::Acquire) < MAX_QUEUED_EVENTS {
                return;
            }
            room.await;
        }
    }

    /// Whether nothing waits for dispatch and every connection has taken
    /// what it was handed: the delivery threads have nothing to do.
    pub(crate) fn is_idle(&self) -> bool {
        self.admission.queued.load(Ordering::Acquire) == 0 && self.backlog.filled() == 0
    }

    /// Lets the delivery threads run now, if events wait for dispatch. A
    /// publisher calls it after a publish that found the node idle: where
    /// its thread and a delivery thread share a core (a server on one
    /// core), the event would otherwise wait for the rest of the
    /// publisher's time slice, most of a quiet node's delivery latency. On
    /// a busy node rounds batch events anyway, and a yield would only
    /// cost; with a core to spare it returns at once.
    pub(crate) fn hand_over(&self) {
        if self.admission.queued.load(Ordering::Acquire) > 0 {
            std::thread::yield_now();
        }
    }

    /// This node's random name.
    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn connection_name(&self, id: u64) -> String {
        format!("{}-{id}", self.node)
    }

    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// The newest sequence number handed to this node for dispatch.
    pub fn head_seq(&self) -> u64 {
        self.head_seq.load(Ordering::Acquire)
    }

    fn shard(&self, collection: &str) -> &Shard {
        use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
        if collection == WILDCARD {
            return &self.wildcard;
        }
        let hash = BuildHasherDefault::<DefaultHasher>::default().hash_one(collection);
        &self.shards[hash as usize % self.shards.len()]
    }

    /// Adds `sub` and removes the subscriptions `removed` (collection,
    /// record id, id). Those in the same shard as `sub` (a subscription
    /// replacing one on the same collection) go in the same step, so no
    /// event sees neither or both.
    pub(crate) fn add_replacing(
        &self,
        collection: &str,
        record_id: Option<&str>,
        sub: Arc<SubEntry>,
        removed: &[(&str, Option<&str>, u64)],
    ) {
        let shard = self.shard(collection);
        let mut elsewhere = Vec::new();
        {
            let mut scopes = shard.write();
            scopes.insert(collection, record_id, sub);
            for removal @ (collection, record_id, id) in removed {
                if std::ptr::eq(self.shard(collection), shard) {
                    scopes.remove(collection, *record_id, *id);
                } else {
                    elsewhere.push(removal);
                }
            }
        }
        for (collection, record_id, id) in elsewhere {
            self.remove(collection, *record_id, *id);
        }
    }

    pub(crate) fn remove(&self, collection: &str, record_id: Option<&str>, id: u64) {
        self.shard(collection)
            .write()
            .remove(collection, record_id, id);
    }

    pub(crate) fn register(&self, conn: Arc<ConnShared>) {
        self.connections
            .lock()
            .expect("connections lock")
            .insert(conn.id, conn);
    }

    pub(crate) fn unregister(&self, id: u64) {
        self.connections
            .lock()
            .expect("connections lock")
            .remove(&id);
    }

    pub(crate) fn connection(&self, id: u64) -> Option<Arc<ConnShared>> {
        let connections = self.connections.lock().expect("connections lock");
        connections.get(&id).cloned()
    }

    /// Ends every connection, e.g. at shutdown.
    pub(crate) fn end_all(&self, reason: EndReason) {
        for conn in self.connections.lock().expect("connections lock").values() {
            conn.end(reason.clone());
        }
    }
}

impl Inbox for Router {
    /// Queues `event` on its collection's shard and, for `*` subscribers,
    /// on the wildcard shard; the dispatchers fan it out.
    fn deliver(&self, event: Arc<SharedEvent>, audience: Audience) {
        self.head_seq.fetch_max(event.event.seq, Ordering::AcqRel);
        let queue = |shard: &Shard, event| {
            if shard.queue.send(event).is_ok() {
                self.admission.queued.fetch_add(1, Ordering::AcqRel);
            }
        };
        if audience != Audience::CollectionOnly {
            queue(&self.wildcard, Arc::clone(&event));
        }
        if audience != Audience::WildcardOnly {
            queue(self.shard(&event.event.collection), event);
        }
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    use super::*;
    use std::time::Duration;

    /// A connection with a mailbox, registered the way `Engine::connect`
    /// does it, for driving the router in-process.
    pub(crate) struct Subscriber {
        pub conn: Arc<ConnShared>,
        pub taken: std::collections::VecDeque<Delivery>,
        pub evictions: mpsc::UnboundedReceiver<u64>,
    }

    impl Subscriber {
        pub(crate) fn connect(router: &Router, capacity: usize) -> Subscriber {
            let (evicted, evictions) = mpsc::unbounded_channel();
            let id = router.next_id();
            let name = router.connection_name(id);
            let conn = Arc::new(ConnShared::new(
                id,
                name,
                Transport::WebSocket,
                capacity,
                router.backlog(),
                evicted,
            ));
            router.register(Arc::clone(&conn));
            Subscriber {
                conn,
                taken: Default::default(),
                evictions,
            }
        }

        pub(crate) fn subscribe(
            &self,
            router: &Router,
            collection: &str,
            record: Option<&str>,
            filter: &str,
        ) -> u64 {
            self.subscribe_with(router, collection, record, filter, false)
        }

        pub(crate) fn subscribe_with(
            &self,
            router: &Router,
            collection: &str,
            record: Option<&str>,
            filter: &str,
            echo: bool,
        ) -> u64 {
            let id = router.next_id();
            let entry = Arc::new(SubEntry {
                id,
                conn: Arc::clone(&self.conn),
                filter: (!filter.is_empty()).then(|| Filter::parse(filter).unwrap()),
                row: None,
                gate: None,
                echo,
            });
            // Counted first, as `Connection::replace` does.
            self.conn.subscription_count.fetch_add(1, Ordering::Relaxed);
            router.add_replacing(collection, record, entry, &[]);
            id
        }

        pub(crate) async fn next(&mut self) -> Delivery {
            while self.taken.is_empty() {
                let mut queued = Default::default();
                let mailbox = &self.conn.mailbox;
                let take = std::future::poll_fn(|cx| mailbox.poll_take_all(cx, &mut queued));
                tokio::time::timeout(Duration::from_secs(10), take)
                    .await
                    .expect("a delivery");
                self.unpack(queued);
            }
            self.taken.pop_front().expect("taken")
        }

        /// Whether the mailbox held anything; what it held goes to `taken`.
        pub(crate) fn take_all(&mut self) -> bool {
            let mut queued = Default::default();
            let took = self.conn.mailbox.take_all(&mut queued);
            self.unpack(queued);
            took
        }

        /// Spreads runs out into deliveries, as a connection takes them (its
        /// subscriptions in a run take no echoes).
        fn unpack(&mut self, queued: std::collections::VecDeque<Queued>) {
            for item in queued {
                match item {
                    Queued::One(delivery) => self.taken.push_back(delivery),
                    Queued::Run(run) => {
                        for event in run.shared.events.iter() {
                            if !event.is_from(&self.conn.name) {
                                let delivery = Delivery::new(
                                    run.subscription,
                                    Arc::clone(event),
                                    View::default(),
                                );
                                self.taken.push_back(delivery);
                            }
                        }
                    }
                }
            }
        }

        /// The next delivery's (subscription, seq, left_filter).
        pub(crate) async fn next_seen(&mut self) -> (u64, u64, bool) {
            let d = self.next().await;
            (d.subscription, d.event.event.seq, d.view.left_filter)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::Subscriber;
    use super::*;
    use crate::event::{Event, EventType};
    use serde_json::{Value, json};

    fn event(
        collection: &str,
        record: &str,
        seq: u64,
        data: Value,
        old: Option<Value>,
    ) -> Arc<SharedEvent> {
        let mut event = Event::new(EventType::RecordUpdated, collection, record, data);
        event.old_data = old;
        event.seq = seq;
        Arc::new(SharedEvent::new(event))
    }

    fn publish(router: &Router, event: Arc<SharedEvent>) {
        router.deliver(event, Audience::Everyone);
    }

    #[tokio::test]
    async fn filters_decide_and_a_later_match_proves_an_earlier_miss() {
        let router = Router::new(2, Duration::ZERO);
        let mut s = Subscriber::connect(&router, 16);
        let cheap = s.subscribe(&router, "products", None, "price < 10");
        publish(
            &router,
            event("products", "p1", 1, json!({"price": 50}), None),
        );
        publish(&router, event("orders", "o1", 2, json!({"price": 5}), None));
        publish(
            &router,
            event("products", "p2", 3, json!({"price": 5}), None),
        );
        assert_eq!(s.next_seen().await, (cheap, 3, false));
    }

    #[tokio::test]
    async fn overlapping_subscriptions_of_a_connection_share_one_delivery() {
        let router = Router::new(1, Duration::ZERO);
        let mut s = Subscriber::connect(&router, 16);
        let all = s.subscribe(&router, "posts", None, "");
        let pricey = s.subscribe(&router, "posts", None, "price > 10");
        let pinned = s.subscribe(&router, "posts", Some("p1"), "");
        s.conn.set_subscription_count(3);
        publish(&router, event("posts", "p1", 1, json!({"price": 50}), None));
        publish(&router, event("posts", "p2", 2, json!({"price": 5}), None));
        let first = s.next().await;
        assert_eq!(first.event.event.seq, 1);
        assert_eq!(
            first.subscriptions().collect::<Vec<_>>(),
            [all, pricey, pinned]
        );
        let second = s.next().await;
        assert_eq!(second.event.event.seq, 2);
        assert_eq!(second.subscriptions().collect::<Vec<_>>(), [all]);
    }

    #[tokio::test]
    async fn a_record_subscription_sees_only_its_record() {
        let router = Router::new(2, Duration::ZERO);
        let mut s = Subscriber::connect(&router, 16);
        let pinned = s.subscribe(&router, "posts", Some("p2"), "");
        publish(&router, event("posts", "p1", 1, json!({}), None));
        publish(&router, event("posts", "p2", 2, json!({}), None));
        assert_eq!(s.next_seen().await, (pinned, 2, false));
    }

    #[tokio::test]
    async fn an_update_leaving_the_filter_is_marked() {
        let router = Router::new(1, Duration::ZERO);
        let mut s = Subscriber::connect(&router, 16);
        let live = s.subscribe(&router, "orders", None, "status = open");
        let open = json!({"status": "open"});
        let closed = json!({"status": "closed"});
        publish(
            &router,
            event("orders", "o1", 1, closed.clone(), Some(open.clone())),
        );
        publish(
            &router,
            event("orders", "o1", 2, open.clone(), Some(closed.clone())),
        );
        publish(
            &router,
            event("orders", "o2", 3, closed.clone(), Some(closed)),
        );
        publish(&router, event("orders", "o2", 4, open.clone(), Some(open)));
        assert_eq!(s.next_seen().await, (live, 1, true));
        assert_eq!(s.next_seen().await, (live, 2, false));
        // seq 3 matched neither image: nothing.
        assert_eq!(s.next_seen().await, (live, 4, false));
    }

    #[tokio::test]
    async fn a_wildcard_subscription_sees_every_collection_in_seq_order() {
        let router = Router::new(4, Duration::ZERO);
        let mut s = Subscriber::connect(&router, 256);
        let all = s.subscribe(&router, WILDCARD, None, "");
        for seq in 1..=100 {
            let collection = format!("c{}", seq % 7);
            publish(&router, event(&collection, "r", seq, json!({}), None));
        }
        for seq in 1..=100 {
            assert_eq!(s.next_seen().await, (all, seq, false));
        }
    }

    #[tokio::test]
    async fn replacing_swaps_subscriptions_in_one_step() {
        let router = Router::new(2, Duration::ZERO);
        let mut s = Subscriber::connect(&router, 16);
        let old = s.subscribe(&router, "posts", None, "");
        let new_id = router.next_id();
        let entry = Arc::new(SubEntry {
            id: new_id,
            conn: Arc::clone(&s.conn),
            filter: None,
            row: None,
            gate: None,
            echo: false,
        });
        router.add_replacing("posts", None, entry, &[("posts", None, old)]);
        publish(&router, event("posts", "p1", 1, json!({}), None));
        publish(&router, event("posts", "p1", 2, json!({}), None));
        assert_eq!(s.next_seen().await, (new_id, 1, false));
        assert_eq!(s.next_seen().await, (new_id, 2, false));
    }

    #[tokio::test]
    async fn a_row_rule_withholds_the_image_it_rejects() {
        let router = Router::new(2, Duration::ZERO);
        let subscribe = |owner: &str| {
            let s = Subscriber::connect(&router, 16);
            let row = Filter::parse(&format!("owner = \"{owner}\"")).unwrap();
            let entry = Arc::new(SubEntry {
                id: router.next_id(),
                conn: Arc::clone(&s.conn),
                filter: Some(row.clone()),
                row: Some(row),
                gate: None,
                echo: false,
            });
            router.add_replacing("orders", None, entry, &[]);
            s
        };
        let (mut a, mut b) = (subscribe("a"), subscribe("b"));
        let moved = event(
            "orders",
            "o1",
            1,
            json!({"owner": "b"}),
            Some(json!({"owner": "a"})),
        );
        publish(&router, moved);
        let view = |left_filter, withheld| View {
            left_filter,
            withheld,
        };
        assert_eq!(
            a.next().await.view,
            view(true, true),
            "left, new image withheld"
        );
        assert_eq!(
            b.next().await.view,
            view(false, true),
            "entered, old image withheld"
        );
        let stays = event(
            "orders",
            "o1",
            2,
            json!({"owner": "b", "n": 2}),
            Some(json!({"owner": "b"})),
        );
        publish(&router, stays);
        assert_eq!(
            b.next().await.view,
            view(false, false),
            "both images are Bob's"
        );
    }

    #[tokio::test]
    async fn removed_subscriptions_get_nothing() {
        let router = Router::new(2, Duration::ZERO);
        let mut s = Subscriber::connect(&router, 16);
        let gone = s.subscribe(&router, "posts", None, "");
        let kept = s.subscribe(&router, "posts", None, "n = 2");
        router.remove("posts", None, gone);
        publish(&router, event("posts", "p", 1, json!({"n": 1}), None));
        publish(&router, event("posts", "p", 2, json!({"n": 2}), None));
        assert_eq!(s.next_seen().await, (kept, 2, false));
    }

    #[tokio::test]
    async fn own_messages_come_back_only_with_echo() {
        let router = Router::new(1, Duration::ZERO);
        let mut s = Subscriber::connect(&router, 16);
        let quiet = s.subscribe(&router, "chat", None, "");
        let echoing = s.subscribe_with(&router, "chat", None, "", true);
        let mut own = Event::new(EventType::Broadcast, "chat", "", json!({}));
        own.origin = Some(s.conn.name.to_string());
        own.seq = 1;
        publish(&router, Arc::new(SharedEvent::new(own)));
        publish(&router, event("chat", "", 2, json!({}), None));
        let mut seen = Vec::new();
        for _ in 0..2 {
            let delivery = s.next().await;
            let seq = delivery.event.event.seq;
            seen.push((seq, delivery.subscriptions().collect::<Vec<_>>()));
        }
        let mut both = vec![quiet, echoing];
        both.sort();
        assert_eq!(seen, [(1, vec![echoing]), (2, both)]);
    }

    #[tokio::test]
    async fn a_round_reaches_unfiltered_subscribers_as_one_shared_run() {
        let router = Router::new(1, Duration::ZERO);
        let single = Subscriber::connect(&router, 64);
        let mut several = Subscriber::connect(&router, 64);
        single.subscribe(&router, "posts", None, "");
        let all = several.subscribe(&router, "posts", None, "");
        let even = several.subscribe(&router, "posts", None, "even = true");
        // Published before the dispatcher runs: one round.
        for n in 1..=4 {
            let data = json!({ "even": n % 2 == 0 });
            publish(&router, event("posts", "p", n, data, None));
        }
        let mut runs = std::collections::VecDeque::new();
        let mailbox = &single.conn.mailbox;
        std::future::poll_fn(|cx| mailbox.poll_take_all(cx, &mut runs)).await;
        let [Queued::Run(run)] = runs.make_contiguous() else {
            panic!("one run, not {runs:?}");
        };
        let seqs: Vec<u64> = run.shared.events.iter().map(|e| e.event.seq).collect();
        assert_eq!(seqs, [1, 2, 3, 4]);
        // A connection holding another subscription too gets one delivery
        // per event, naming every subscription it matches.
        for n in 1..=4 {
            let delivery = several.next().await;
            assert_eq!(delivery.event.event.seq, n);
            let expected = if n % 2 == 0 {
                vec![all, even]
            } else {
                vec![all]
            };
            assert_eq!(delivery.subscriptions().collect::<Vec<_>>(), expected);
        }
    }

    #[tokio::test]
    async fn the_node_is_idle_once_dispatched_and_taken() {
        let router = Router::new(1, Duration::ZERO);
        let mut edge = Subscriber::connect(&router, 16);
        let sub = edge.subscribe(&router, "posts", None, "");
        assert!(router.is_idle());
        publish(&router, event("posts", "p", 1, json!({}), None));
        assert!(!router.is_idle(), "queued for dispatch");
        until_filled(&router, 1).await;
        assert!(!router.is_idle(), "dispatched, not yet taken");
        assert_eq!(edge.next_seen().await, (sub, 1, false));
        assert!(router.is_idle());
    }

    #[tokio::test]
    async fn a_full_queue_evicts_the_connection_and_spares_the_others() {
        let router = Router::new(1, Duration::ZERO);
        let mut slow = Subscriber::connect(&router, 2);
        let mut fast = Subscriber::connect(&router, 64);
        slow.subscribe(&router, "posts", None, "");
        let sub = fast.subscribe(&router, "posts", None, "");
        for seq in 1..=10 {
            publish(&router, event("posts", "p", seq, json!({}), None));
        }
        for seq in 1..=10 {
            assert_eq!(fast.next_seen().await, (sub, seq, false));
        }
        let evicted = tokio::time::timeout(Duration::from_secs(10), slow.evictions.recv()).await;
        assert_eq!(evicted.unwrap(), Some(slow.conn.id));
        assert_eq!(
            slow.conn.end_reason(),
            Some(&EndReason::Overflow { capacity: 2 })
        );
        // What was queued before the overflow is still there; nothing after.
        assert_eq!(slow.next().await.event.event.seq, 1);
        assert_eq!(slow.next().await.event.event.seq, 2);
        assert!(slow.taken.is_empty() && !slow.take_all());
    }

    /// A window long enough that only the edges end a dispatcher's wait.
    const HOUR: Duration = Duration::from_secs(3600);

    /// Waits until the node's backlog holds `filled` mailboxes.
    async fn until_filled(router: &Router, filled: usize) {
        while router.backlog().filled() != filled {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_next_round_waits_until_the_edges_took_the_last_one() {
        let router = Router::new(1, HOUR);
        let mut edge = Subscriber::connect(&router, 64);
        let sub = edge.subscribe(&router, "posts", None, "");
        publish(&router, event("posts", "p", 1, json!({}), None));
        until_filled(&router, 1).await;
        publish(&router, event("posts", "p", 2, json!({}), None));
        // Time moves on by itself while every task waits (paused clock):
        // the dispatcher is still waiting for this edge.
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(router.admission.queued.load(Ordering::SeqCst), 1);
        let start = tokio::time::Instant::now();
        assert_eq!(edge.next_seen().await, (sub, 1, false));
        assert_eq!(edge.next_seen().await, (sub, 2, false));
        assert!(start.elapsed() < HOUR, "the take ended the wait");
    }

    #[tokio::test(start_paused = true)]
    async fn an_edge_that_stops_taking_holds_up_one_round_for_the_window_at_most() {
        let window = Duration::from_millis(50);
        let router = Router::new(1, window);
        let stalled = Subscriber::connect(&router, 64);
        let mut healthy = Subscriber::connect(&router, 64);
        stalled.subscribe(&router, "posts", None, "");
        let sub = healthy.subscribe(&router, "posts", None, "");
        let start = tokio::time::Instant::now();
        for seq in 1..=3 {
            publish(&router, event("posts", "p", seq, json!({}), None));
            assert_eq!(healthy.next_seen().await, (sub, seq, false));
        }
        // Only the round after it stopped waited for it: from then on it
        // is not among the mailboxes a round fills.
        let waited = start.elapsed();
        assert!(waited >= window && waited < 2 * window, "waited {waited:?}");
    }

    #[tokio::test]
    async fn publishers_wait_while_the_dispatchers_are_full() {
        use futures_util::FutureExt;
        let router = Router::new(1, Duration::ZERO);
        let mut edge = Subscriber::connect(&router, 2 * MAX_QUEUED_EVENTS);
        let sub = edge.subscribe(&router, "posts", None, "");
        for seq in 1..=MAX_QUEUED_EVENTS as u64 {
            publish(&router, event("posts", "p", seq, json!({}), None));
        }
        assert!(router.admit().now_or_never().is_none(), "no room");
        router.admit().await;
        for seq in 1..=MAX_QUEUED_EVENTS as u64 {
            assert_eq!(edge.next_seen().await, (sub, seq, false));
        }
    }
}
