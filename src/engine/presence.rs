//! Presence: who is online, globally and per channel, across the cluster.
//!
//! Each node counts its own connections per user, and per (user, channel)
//! the subscriptions on that channel (a channel is a collection name). It
//! shares them as absolute counts: a [`Count`] says "on node N, user U has
//! K connections (or K subscriptions on channel C)". Counts are idempotent,
//! so applying one twice or after a snapshot is harmless. Every node keeps
//! the counts of every node; a user is online while any node counts them.
//! When that changes, the node dispatches a `user.joined` / `user.left`
//! event to its local subscribers of the `presence` collection.
//!
//! How counts travel between nodes, how a late node learns them and how a
//! dead node is forgotten is the bus's business (`bus::presence_sync`, which
//! also owns the wire format [`Count`]); this module implements the bus's
//! [`PresenceState`] and only applies what it is given: one count, a node's
//! snapshot, or a node that went silent.

use super::router::Router;
use crate::bus::presence_sync::{Count, Outbox, PresenceState};
use crate::bus::{Audience, Inbox};
use crate::event::{Event, EventType, SharedEvent, format_timestamp};
use serde_json::json;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The collection presence events are dispatched on (reserved: see
/// [`crate::event::check_not_reserved`]).
pub use crate::event::PRESENCE_COLLECTION;

/// One user as a snapshot shows them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceUser {
    pub user_id: String,
    pub user_name: Option<String>,
    /// Open connections (global) or subscriptions (on a channel), summed
    /// over all nodes.
    pub connections: u32,
    pub last_seen: SystemTime,
}

type Key = (String, Option<String>);

#[derive(Debug, Clone)]
struct Entry {
    count: u32,
    user_name: Option<String>,
    at: u64,
}

/// Across nodes: how many nodes count the key, and their counts summed.
#[derive(Default)]
struct Total {
    nodes: u32,
    count: u32,
    user_name: Option<String>,
    at: u64,
}

#[derive(Default)]
struct State {
    /// node → key → entry.
    nodes: HashMap<String, HashMap<Key, Entry>>,
    totals: HashMap<Key, Total>,
}

pub struct Presence {
    node: String,
    router: Arc<Router>,
    state: Mutex<State>,
    /// Local counts for the bus to share with other nodes.
    outbox: Mutex<Option<Arc<Outbox>>>,
}

pub fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

fn time_of(millis: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(millis)
}

impl Presence {
    pub fn new(node: String, router: Arc<Router>) -> Self {
        Presence {
            node,
            router,
            state: Mutex::new(State::default()),
            outbox: Mutex::new(None),
        }
    }

    /// Adds `delta` to this node's count of `user_id` (on `channel`).
    pub(crate) fn change_local(
        &self,
        user_id: &str,
        channel: Option<&str>,
        user_name: Option<&str>,
        delta: i32,
    ) {
        // Shared under the state lock, so concurrent changes of one key reach
        // the other nodes in the order they were applied here.
        let mut state = self.state.lock().expect("presence lock");
        let key = (user_id.to_owned(), channel.map(str::to_owned));
        let current = state
            .nodes
            .get(&self.node)
            .and_then(|entries| entries.get(&key))
            .map_or(0, |e| e.count);
        let count = Count {
            user_id: user_id.to_owned(),
            channel: channel.map(str::to_owned),
            count: current.saturating_add_signed(delta),
            user_name: user_name.map(str::to_owned),
            at: now_millis(),
        };
        self.apply_locked(&mut state, &self.node, count.clone());
        if let Some(outbox) = &*self.outbox.lock().expect("outbox lock") {
            outbox.push(count);
        }
    }

    fn apply_locked(&self, state: &mut State, node: &str, count: Count) {
        let key = (count.user_id.clone(), count.channel.clone());
        let entries = state.nodes.entry(node.to_owned()).or_default();
        let before = entries.get(&key).map_or(0, |e| e.count);
        if count.count == 0 {
            entries.remove(&key);
        } else {
            entries.insert(
                key.clone(),
                Entry {
                    count: count.count,
                    user_name: count.user_name.clone(),
                    at: count.at,
                },
            );
        }
        let total = state.totals.entry(key.clone()).or_default();
        total.count = total.count.saturating_sub(before) + count.count;
        total.at = total.at.max(count.at);
        if count.user_name.is_some() {
            total.user_name = count.user_name.clone();
        }
        let event = match (before > 0, count.count > 0) {
            (false, true) => {
                total.nodes += 1;
                (total.nodes == 1).then_some(EventType::UserJoined)
            }
            (true, false) => {
                total.nodes = total.nodes.saturating_sub(1);
                (total.nodes == 0).then_some(EventType::UserLeft)
            }
            _ => None,
        };
        let user = PresenceUser {
            user_id: key.0.clone(),
            user_name: total.user_name.clone(),
            connections: total.count,
            last_seen: time_of(total.at),
        };
        if total.nodes == 0 {
            state.totals.remove(&key);
        }
        if let Some(event_type) = event {
            self.announce(event_type, &user, key.1.as_deref());
        }
    }

    /// Dispatches a `user.joined` / `user.left` to local subscribers of the
    /// `presence` collection. Presence events are not part of the event log:
    /// their `seq` is 0 and they are not replayed.
    fn announce(&self, event_type: EventType, user: &PresenceUser, channel: Option<&str>) {
        let data = json!({
            "user_id": user.user_id,
            "user_name": user.user_name,
            "connections": user.connections,
            "last_seen": format_timestamp(user.last_seen),
            "channel": channel,
        });
        let event = Event::new(event_type, PRESENCE_COLLECTION, user.user_id.clone(), data);
        self.router
            .deliver(Arc::new(SharedEvent::new(event)), Audience::Everyone);
    }

    /// Who is online, on `channel` or (`None`) at all, sorted by user id.
    pub fn snapshot(&self, channel: Option<&str>) -> Vec<PresenceUser> {
        let state = self.state.lock().expect("presence lock");
        let mut users: Vec<PresenceUser> = state
            .totals
            .iter()
            .filter(|((_, c), total)| c.as_deref() == channel && total.nodes > 0)
            .map(|((user_id, _), total)| PresenceUser {
                user_id: user_id.clone(),
                user_name: total.user_name.clone(),
                connections: total.count,
                last_seen: time_of(total.at),
            })
            .collect();
        users.sort_by(|a, b| a.user_id.cmp(&b.user_id));
        users
    }
}

impl PresenceState for Presence {
    fn node(&self) -> &str {
        &self.node
    }

    /// Hands local counts to the bus from now on.
    fn share_with(&self, outbox: Arc<Outbox>) {
        *self.outbox.lock().expect("outbox lock") = Some(outbox);
    }

    /// This node's counts, for a peer that asks for a snapshot.
    fn local_counts(&self) -> Vec<Count> {
        let state = self.state.lock().expect("presence lock");
        state
            .nodes
            .get(&self.node)
            .map(|entries| {
                entries
                    .iter()
                    .map(|((user_id, channel), e)| Count {
                        user_id: user_id.clone(),
                        channel: channel.clone(),
                        count: e.count,
                        user_name: e.user_name.clone(),
                        at: e.at,
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Applies one count from `node`.
    fn apply(&self, node: &str, count: Count) {
        let mut state = self.state.lock().expect("presence lock");
        self.apply_locked(&mut state, node, count);
    }

    /// Replaces everything known of `node` by its snapshot.
    fn replace_node(&self, node: &str, counts: Vec<Count>) {
        let mut state = self.state.lock().expect("presence lock");
        let mut gone: HashMap<Key, Entry> = state.nodes.get(node).cloned().unwrap_or_default();
        for count in counts {
            gone.remove(&(count.user_id.clone(), count.channel.clone()));
            self.apply_locked(&mut state, node, count);
        }
        let at = now_millis();
        for ((user_id, channel), entry) in gone {
            let count = Count {
                user_id,
                channel,
                count: 0,
                user_name: entry.user_name,
                at,
            };
            self.apply_locked(&mut state, node, count);
        }
    }

    /// Forgets a node that stopped answering: its users leave.
    fn forget_node(&self, node: &str) {
        self.replace_node(node, Vec::new());
        self.state.lock().expect("presence lock").nodes.remove(node);
    }

    /// Nodes other than this one that have told us something.
    fn known_nodes(&self) -> Vec<String> {
        let state = self.state.lock().expect("presence lock");
        state
            .nodes
            .keys()
            .filter(|n| **n != self.node)
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::router::test_support::Subscriber;
    use std::time::Duration;

    const NODE: &str = "local";
    /// Marks the end of what a test expects on the `presence` collection.
    const BARRIER: &str = "__barrier__";

    fn presence() -> (Presence, Arc<Router>) {
        let router = Arc::new(Router::new(2, Duration::ZERO));
        (Presence::new(NODE.to_owned(), Arc::clone(&router)), router)
    }

    fn count(user: &str, channel: Option<&str>, count: u32) -> Count {
        Count {
            user_id: user.to_owned(),
            channel: channel.map(str::to_owned),
            count,
            user_name: None,
            at: now_millis(),
        }
    }

    /// (user id, connections) of a snapshot, for short assertions.
    fn users(presence: &Presence, channel: Option<&str>) -> Vec<(String, u32)> {
        presence
            .snapshot(channel)
            .into_iter()
            .map(|u| (u.user_id, u.connections))
            .collect()
    }

    fn pairs(list: &[(&str, u32)]) -> Vec<(String, u32)> {
        list.iter().map(|(u, c)| ((*u).to_owned(), *c)).collect()
    }

    /// One presence event as a test sees it.
    #[derive(Debug, PartialEq, Eq)]
    struct Seen {
        kind: &'static str,
        user: String,
        channel: Option<String>,
        connections: u64,
    }

    fn seen(kind: &'static str, user: &str, channel: Option<&str>, connections: u64) -> Seen {
        Seen {
            kind,
            user: user.to_owned(),
            channel: channel.map(str::to_owned),
            connections,
        }
    }

    /// A subscriber of the `presence` collection, wired into the router
    /// the way `Connection::subscribe` does it.
    struct Watcher {
        router: Arc<Router>,
        subscriber: Subscriber,
    }

    impl Watcher {
        fn new(router: &Arc<Router>) -> Watcher {
            let subscriber = Subscriber::connect(router, 1024);
            subscriber.subscribe_with(router, PRESENCE_COLLECTION, None, "", true);
            Watcher {
                router: Arc::clone(router),
                subscriber,
            }
        }

        /// Every presence event dispatched so far, in order. A marker event
        /// goes through the same shard queue after them, so once it
        /// arrives nothing earlier is still on its way.
        async fn drain(&mut self) -> Vec<Seen> {
            let marker = Event::new(
                EventType::Broadcast,
                PRESENCE_COLLECTION,
                BARRIER,
                json!({}),
            );
            self.router
                .deliver(Arc::new(SharedEvent::new(marker)), Audience::Everyone);
            let mut seen = Vec::new();
            loop {
                let delivery = self.subscriber.next().await;
                let event = &delivery.event.event;
                if event.record_id == BARRIER {
                    return seen;
                }
                assert_eq!(event.collection, PRESENCE_COLLECTION);
                assert_eq!(event.seq, 0, "presence events are not part of the log");
                let data = &event.data;
                assert_eq!(data["user_id"], event.record_id.as_str());
                assert!(data["last_seen"].is_string(), "last_seen in {data}");
                seen.push(Seen {
                    kind: event.event_type.as_str(),
                    user: event.record_id.clone(),
                    channel: data["channel"].as_str().map(str::to_owned),
                    connections: data["connections"].as_u64().expect("connections"),
                });
            }
        }
    }

    #[tokio::test]
    async fn two_connections_of_one_user_are_one_user_until_both_close() {
        let (presence, _router) = presence();
        presence.change_local("alice", None, Some("Alice"), 1);
        presence.change_local("alice", None, Some("Alice"), 1);
        let snapshot = presence.snapshot(None);
        assert_eq!(snapshot.len(), 1);
        assert_eq!(snapshot[0].user_id, "alice");
        assert_eq!(snapshot[0].user_name.as_deref(), Some("Alice"));
        assert_eq!(snapshot[0].connections, 2);

        presence.change_local("alice", None, Some("Alice"), -1);
        assert_eq!(users(&presence, None), pairs(&[("alice", 1)]));
        presence.change_local("alice", None, Some("Alice"), -1);
        assert_eq!(users(&presence, None), pairs(&[]));
    }

    #[tokio::test]
    async fn snapshot_is_sorted_by_user_id() {
        let (presence, _router) = presence();
        for user in ["carol", "alice", "bob"] {
            presence.change_local(user, None, None, 1);
        }
        assert_eq!(
            users(&presence, None),
            pairs(&[("alice", 1), ("bob", 1), ("carol", 1)])
        );
    }

    #[tokio::test]
    async fn a_decrement_below_zero_stays_at_zero() {
        let (presence, _router) = presence();
        presence.change_local("alice", None, None, -1);
        assert_eq!(users(&presence, None), pairs(&[]));
        assert!(presence.local_counts().is_empty());
        // And it does not bank a negative count against the next join.
        presence.change_local("alice", None, None, 1);
        assert_eq!(users(&presence, None), pairs(&[("alice", 1)]));
    }

    #[tokio::test]
    async fn channel_counts_are_separate_from_the_global_count() {
        let (presence, _router) = presence();
        presence.change_local("alice", None, None, 1);
        presence.change_local("alice", Some("room"), None, 1);
        presence.change_local("alice", Some("room"), None, 1);
        presence.change_local("bob", Some("lobby"), None, 1);

        assert_eq!(users(&presence, None), pairs(&[("alice", 1)]));
        assert_eq!(users(&presence, Some("room")), pairs(&[("alice", 2)]));
        assert_eq!(users(&presence, Some("lobby")), pairs(&[("bob", 1)]));
        assert_eq!(users(&presence, Some("nowhere")), pairs(&[]));

        // Leaving the channel leaves the global count alone, and back.
        presence.change_local("alice", Some("room"), None, -2);
        assert_eq!(users(&presence, Some("room")), pairs(&[]));
        assert_eq!(users(&presence, None), pairs(&[("alice", 1)]));
        presence.change_local("alice", Some("room"), None, 1);
        presence.change_local("alice", None, None, -1);
        assert_eq!(users(&presence, None), pairs(&[]));
        assert_eq!(users(&presence, Some("room")), pairs(&[("alice", 1)]));
    }

    #[tokio::test]
    async fn remote_counts_sum_with_local_ones_and_the_user_stays_while_any_node_counts() {
        let (presence, _router) = presence();
        presence.change_local("alice", None, None, 1);
        presence.apply("n2", count("alice", None, 3));
        presence.apply("n3", count("alice", None, 2));
        assert_eq!(users(&presence, None), pairs(&[("alice", 6)]));

        presence.change_local("alice", None, None, -1);
        assert_eq!(users(&presence, None), pairs(&[("alice", 5)]));
        presence.apply("n2", count("alice", None, 0));
        assert_eq!(users(&presence, None), pairs(&[("alice", 2)]));
        presence.apply("n3", count("alice", None, 1));
        assert_eq!(users(&presence, None), pairs(&[("alice", 1)]));
        presence.apply("n3", count("alice", None, 0));
        assert_eq!(users(&presence, None), pairs(&[]));

        // Remote channel counts are kept per channel too.
        presence.apply("n2", count("bob", Some("room"), 4));
        assert_eq!(users(&presence, Some("room")), pairs(&[("bob", 4)]));
        assert_eq!(users(&presence, None), pairs(&[]));
    }

    #[tokio::test]
    async fn remote_counts_are_not_local_counts() {
        let (presence, _router) = presence();
        presence.change_local("alice", None, Some("Alice"), 1);
        presence.change_local("alice", Some("room"), Some("Alice"), 2);
        presence.apply("n2", count("bob", None, 1));
        presence.apply("n2", count("alice", None, 5));

        let mut local: Vec<(String, Option<String>, u32, Option<String>)> = presence
            .local_counts()
            .into_iter()
            .map(|c| (c.user_id, c.channel, c.count, c.user_name))
            .collect();
        local.sort();
        let alice = Some("Alice".to_owned());
        assert_eq!(
            local,
            vec![
                ("alice".to_owned(), None, 1, alice.clone()),
                ("alice".to_owned(), Some("room".to_owned()), 2, alice),
            ]
        );
        assert_eq!(presence.known_nodes(), vec!["n2".to_owned()]);
        assert_eq!(presence.node(), NODE);
    }

    #[tokio::test]
    async fn applying_the_same_absolute_count_twice_is_idempotent() {
        let (presence, _router) = presence();
        presence.change_local("alice", None, None, 1);
        let remote = count("alice", None, 3);
        presence.apply("n2", remote.clone());
        presence.apply("n2", remote.clone());
        assert_eq!(users(&presence, None), pairs(&[("alice", 4)]));

        // A zero applied twice does not take anything from other nodes.
        presence.apply("n2", count("alice", None, 0));
        presence.apply("n2", count("alice", None, 0));
        assert_eq!(users(&presence, None), pairs(&[("alice", 1)]));

        // And a snapshot repeating a count already applied changes nothing.
        presence.apply("n2", remote.clone());
        presence.replace_node("n2", vec![remote]);
        assert_eq!(users(&presence, None), pairs(&[("alice", 4)]));
    }

    #[tokio::test]
    async fn replace_node_replaces_everything_known_of_that_node() {
        let (presence, _router) = presence();
        presence.change_local("carol", None, None, 1);
        presence.apply("n2", count("alice", None, 2));
        presence.apply("n2", count("bob", None, 1));
        presence.apply("n2", count("bob", Some("room"), 1));
        presence.apply("n3", count("bob", None, 1));

        presence.replace_node(
            "n2",
            vec![count("alice", None, 1), count("dave", Some("room"), 3)],
        );
        // alice: now 1; bob: n2's count gone, n3's remains; the key missing
        // from the snapshot (bob in room) is 0; dave is new; carol is
        // local and untouched.
        assert_eq!(
            users(&presence, None),
            pairs(&[("alice", 1), ("bob", 1), ("carol", 1)])
        );
        assert_eq!(users(&presence, Some("room")), pairs(&[("dave", 3)]));

        presence.replace_node("n2", Vec::new());
        assert_eq!(users(&presence, None), pairs(&[("bob", 1), ("carol", 1)]));
        assert_eq!(users(&presence, Some("room")), pairs(&[]));
    }

    #[tokio::test]
    async fn forget_node_makes_its_users_leave() {
        let (presence, _router) = presence();
        presence.change_local("alice", None, None, 1);
        presence.apply("n2", count("alice", None, 1));
        presence.apply("n2", count("bob", None, 2));
        presence.apply("n2", count("bob", Some("room"), 1));
        presence.apply("n3", count("carol", None, 1));
        let mut known = presence.known_nodes();
        known.sort();
        assert_eq!(known, vec!["n2".to_owned(), "n3".to_owned()]);

        presence.forget_node("n2");
        assert_eq!(users(&presence, None), pairs(&[("alice", 1), ("carol", 1)]));
        assert_eq!(users(&presence, Some("room")), pairs(&[]));
        assert_eq!(presence.known_nodes(), vec!["n3".to_owned()]);

        // A forgotten node that speaks again is counted from scratch.
        presence.apply("n2", count("bob", None, 1));
        assert_eq!(
            users(&presence, None),
            pairs(&[("alice", 1), ("bob", 1), ("carol", 1)])
        );
    }

    #[tokio::test]
    async fn share_with_receives_the_latest_local_count_per_key() {
        let (presence, _router) = presence();
        // Changes before anyone listens are not queued anywhere.
        presence.change_local("zoe", None, None, 1);
        let outbox = Arc::new(Outbox::default());
        presence.share_with(Arc::clone(&outbox));

        presence.change_local("alice", None, Some("Alice"), 1);
        presence.change_local("alice", None, Some("Alice"), 1);
        presence.change_local("alice", Some("room"), Some("Alice"), 1);
        presence.change_local("alice", None, Some("Alice"), -1);
        // Counts from other nodes are not ours to share.
        presence.apply("n2", count("bob", None, 1));

        let mut got = Vec::new();
        for count in outbox.take() {
            assert_eq!(count.user_id, "alice");
            assert_eq!(count.user_name.as_deref(), Some("Alice"));
            assert!(count.at > 0);
            got.push((count.channel, count.count));
        }
        got.sort();
        assert_eq!(got, vec![(None, 1), (Some("room".to_owned()), 1)]);
    }

    #[tokio::test]
    async fn joined_once_per_user_and_left_when_the_last_connection_closes() {
        let (presence, router) = presence();
        let mut watcher = Watcher::new(&router);

        presence.change_local("alice", None, Some("Alice"), 1);
        presence.change_local("alice", None, Some("Alice"), 1);
        presence.change_local("bob", None, None, 1);
        assert_eq!(
            watcher.drain().await,
            vec![
                seen("user.joined", "alice", None, 1),
                seen("user.joined", "bob", None, 1),
            ]
        );

        presence.change_local("alice", None, Some("Alice"), -1);
        assert_eq!(watcher.drain().await, vec![], "one tab of two closed");
        presence.change_local("alice", None, Some("Alice"), -1);
        assert_eq!(
            watcher.drain().await,
            vec![seen("user.left", "alice", None, 0)]
        );

        // Back again: joined again.
        presence.change_local("alice", None, Some("Alice"), 1);
        assert_eq!(
            watcher.drain().await,
            vec![seen("user.joined", "alice", None, 1)]
        );
    }

    #[tokio::test]
    async fn presence_events_carry_the_user_name() {
        let (presence, router) = presence();
        let mut watcher = Watcher::new(&router);
        presence.change_local("alice", None, Some("Alice"), 1);
        presence.change_local("bob", None, None, 1);
        presence.change_local("alice", None, Some("Alice"), -1);
        let mut names = Vec::new();
        let marker = Event::new(
            EventType::Broadcast,
            PRESENCE_COLLECTION,
            BARRIER,
            json!({}),
        );
        router.deliver(Arc::new(SharedEvent::new(marker)), Audience::Everyone);
        loop {
            let delivery = watcher.subscriber.next().await;
            if delivery.event.event.record_id == BARRIER {
                break;
            }
            names.push(delivery.event.event.data["user_name"].clone());
        }
        assert_eq!(names, vec![json!("Alice"), json!(null), json!("Alice")]);
    }

    #[tokio::test]
    async fn channel_joins_and_leaves_carry_the_channel() {
        let (presence, router) = presence();
        let mut watcher = Watcher::new(&router);

        presence.change_local("alice", None, None, 1);
        presence.change_local("alice", Some("room"), None, 1);
        presence.change_local("alice", Some("room"), None, 1);
        presence.change_local("alice", Some("lobby"), None, 1);
        presence.change_local("alice", Some("room"), None, -1);
        presence.change_local("alice", Some("room"), None, -1);
        presence.change_local("alice", None, None, -1);
        assert_eq!(
            watcher.drain().await,
            vec![
                seen("user.joined", "alice", None, 1),
                seen("user.joined", "alice", Some("room"), 1),
                seen("user.joined", "alice", Some("lobby"), 1),
                seen("user.left", "alice", Some("room"), 0),
                seen("user.left", "alice", None, 0),
            ]
        );
    }

    #[tokio::test]
    async fn remote_nodes_join_and_leave_users_once_cluster_wide() {
        let (presence, router) = presence();
        let mut watcher = Watcher::new(&router);

        presence.apply("n2", count("alice", None, 2));
        presence.change_local("alice", None, None, 1);
        presence.apply("n3", count("alice", None, 1));
        presence.apply("n3", count("alice", None, 1));
        assert_eq!(
            watcher.drain().await,
            vec![seen("user.joined", "alice", None, 2)],
            "joined once, when the first node counted alice"
        );

        presence.apply("n2", count("alice", None, 0));
        presence.change_local("alice", None, None, -1);
        assert_eq!(watcher.drain().await, vec![], "n3 still counts alice");
        presence.apply("n3", count("alice", None, 0));
        assert_eq!(
            watcher.drain().await,
            vec![seen("user.left", "alice", None, 0)]
        );
        presence.apply("n3", count("alice", None, 0));
        assert_eq!(watcher.drain().await, vec![], "a repeated zero");
    }

    #[tokio::test]
    async fn replace_and_forget_node_announce_who_left() {
        let (presence, router) = presence();
        presence.apply("n2", count("alice", None, 1));
        presence.apply("n2", count("bob", None, 1));
        presence.apply("n2", count("bob", Some("room"), 1));
        presence.apply("n3", count("carol", None, 1));
        // Dispatch is asynchronous: events queued before the watcher
        // registered may still reach it, so it drains them first.
        let mut watcher = Watcher::new(&router);
        assert_eq!(watcher.drain().await.len(), 4, "the four joins so far");

        presence.replace_node("n2", vec![count("alice", None, 4), count("dave", None, 1)]);
        let mut events = watcher.drain().await;
        events.sort_by(|a, b| (a.kind, &a.user, &a.channel).cmp(&(b.kind, &b.user, &b.channel)));
        assert_eq!(
            events,
            vec![
                seen("user.joined", "dave", None, 1),
                seen("user.left", "bob", None, 0),
                seen("user.left", "bob", Some("room"), 0),
            ]
        );

        presence.change_local("dave", None, None, 1);
        presence.forget_node("n2");
        let mut events = watcher.drain().await;
        events.sort_by(|a, b| a.user.cmp(&b.user));
        assert_eq!(events, vec![seen("user.left", "alice", None, 0)]);
        assert_eq!(users(&presence, None), pairs(&[("carol", 1), ("dave", 1)]));
    }

    /// A regression test: `change_local` once sent the new absolute count
    /// to the outbox after releasing the state lock, so two connections of
    /// one user changing at the same time could leave a stale count as the
    /// last one shared (state 1 → 2 → 1, outbox gets 1, then 2): peers kept
    /// it, and a user who closed every tab stayed online elsewhere. Here a
    /// sender takes from the outbox while four threads change one key; the
    /// last count shared must be the local count, 0.
    #[test]
    fn the_last_shared_count_is_the_local_count_under_concurrent_changes() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let _guard = runtime.enter();
        let router = Arc::new(Router::new(1, Duration::ZERO));
        let presence = Arc::new(Presence::new(NODE.to_owned(), router));
        let outbox = Arc::new(Outbox::default());
        presence.share_with(Arc::clone(&outbox));

        const THREADS: usize = 4;
        const ROUNDS: usize = 20_000;
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sender = {
            let (outbox, done) = (Arc::clone(&outbox), Arc::clone(&done));
            std::thread::spawn(move || {
                let mut last = None;
                loop {
                    let finished = done.load(std::sync::atomic::Ordering::SeqCst);
                    for count in outbox.take() {
                        last = Some(count.count);
                    }
                    if finished {
                        return last;
                    }
                }
            })
        };
        let threads: Vec<_> = (0..THREADS)
            .map(|_| {
                let presence = Arc::clone(&presence);
                std::thread::spawn(move || {
                    for _ in 0..ROUNDS {
                        presence.change_local("alice", None, None, 1);
                        presence.change_local("alice", None, None, -1);
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().expect("thread");
        }
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(sender.join().expect("sender"), Some(0));
    }
}
