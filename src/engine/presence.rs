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
use crate::bus::presence_sync::{Count, PresenceState};
use crate::bus::{Audience, Inbox};
use crate::event::{Event, EventType, SharedEvent, format_timestamp};
use serde_json::json;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;

/// The collection presence events are published on.
pub const PRESENCE_COLLECTION: &str = "presence";

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
    outbox: Mutex<Option<mpsc::UnboundedSender<Count>>>,
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
        let count = {
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
            count
        };
        if let Some(outbox) = &*self.outbox.lock().expect("outbox lock") {
            let _ = outbox.send(count);
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
    fn share_with(&self, outbox: mpsc::UnboundedSender<Count>) {
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
