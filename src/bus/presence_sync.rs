//! Presence across nodes over core NATS (no JetStream: presence is state,
//! not history).
//!
//! Subjects, under `strom.presence`:
//! - `.count`: every local change, as an absolute count (`{node, seq,
//!   count}`), so a change costs one small message whatever the size of the
//!   channel;
//! - `.heartbeat`: `{node, seq}` every heartbeat interval;
//! - `.sync` and `.sync.<node>`: a request (with a reply subject) for the
//!   snapshot of every node, or of one; the answer is `{node, seq, counts}`.
//!
//! A starting node asks everyone for a snapshot, so it knows the state
//! within one round trip. Each node numbers what it sends; a peer that sees
//! a gap (a count or heartbeat ahead of what it applied) asks that node for
//! a snapshot, which replaces what it knew. A node not heard from within the
//! timeout (killed, partitioned) is forgotten: its users leave.

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

#[derive(Debug, Clone, Copy)]
pub struct PresenceTiming {
    /// How often a node says it is alive.
    pub heartbeat: Duration,
    /// A node silent this long is taken as gone.
    pub timeout: Duration,
}

impl Default for PresenceTiming {
    fn default() -> Self {
        PresenceTiming {
            heartbeat: Duration::from_secs(2),
            timeout: Duration::from_secs(10),
        }
    }
}

const PREFIX: &str = "strom.presence";

/// One user's count on one node: connections when `channel` is `None`,
/// subscriptions on `channel` otherwise. Zero means gone. Absolute, so
/// applying one twice, or after a snapshot, is harmless.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Count {
    pub user_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    pub count: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_name: Option<String>,
    /// Milliseconds since the Unix epoch of the change.
    pub at: u64,
}

/// The presence state this module keeps in step across nodes: the engine's
/// tracker. Defined here, so the bus never names the engine.
pub trait PresenceState: Send + Sync + 'static {
    /// This node's name.
    fn node(&self) -> &str;
    /// Hands this node's count changes to `outbox` from now on.
    fn share_with(&self, outbox: mpsc::UnboundedSender<Count>);
    /// This node's counts, for a peer that asks for a snapshot.
    fn local_counts(&self) -> Vec<Count>;
    /// Applies one count from `node`.
    fn apply(&self, node: &str, count: Count);
    /// Replaces everything known of `node` by its snapshot.
    fn replace_node(&self, node: &str, counts: Vec<Count>);
    /// Forgets a node that stopped answering: its users leave.
    fn forget_node(&self, node: &str);
    /// Nodes other than this one that have told us something.
    fn known_nodes(&self) -> Vec<String>;
}

#[derive(Serialize, Deserialize)]
struct CountMessage {
    node: String,
    seq: u64,
    count: Count,
}

#[derive(Serialize, Deserialize)]
struct Heartbeat {
    node: String,
    seq: u64,
}

#[derive(Serialize, Deserialize)]
struct Snapshot {
    node: String,
    seq: u64,
    counts: Vec<Count>,
}

struct Peer {
    seq: u64,
    heard: Instant,
}

/// Starts sharing `presence` with the other nodes on `client`.
pub async fn start(
    client: async_nats::Client,
    presence: Arc<dyn PresenceState>,
    timing: PresenceTiming,
) -> Result<(), async_nats::Error> {
    let node = presence.node().to_owned();
    let mut counts = client.subscribe(format!("{PREFIX}.count")).await?;
    let mut heartbeats = client.subscribe(format!("{PREFIX}.heartbeat")).await?;
    let mut requests = client.subscribe(format!("{PREFIX}.sync")).await?;
    let mut direct = client.subscribe(format!("{PREFIX}.sync.{node}")).await?;
    let inbox = client.new_inbox();
    let mut snapshots = client.subscribe(inbox.clone()).await?;
    let (outbox, mut local) = mpsc::unbounded_channel();
    presence.share_with(outbox);
    // Learn what the others know before anything else happens.
    client
        .publish_with_reply(format!("{PREFIX}.sync"), inbox.clone(), "".into())
        .await?;
    tokio::spawn(async move {
        let mut seq = 0u64;
        let mut peers: HashMap<String, Peer> = HashMap::new();
        let mut ticker = tokio::time::interval(timing.heartbeat);
        let ask = |from: &str| {
            let (client, inbox, subject) = (
                client.clone(),
                inbox.clone(),
                format!("{PREFIX}.sync.{from}"),
            );
            async move {
                let _ = client.publish_with_reply(subject, inbox, "".into()).await;
            }
        };
        loop {
            tokio::select! {
                Some(count) = local.recv() => {
                    seq += 1;
                    let message = CountMessage { node: node.clone(), seq, count };
                    let body = serde_json::to_vec(&message).expect("JSON of a count");
                    let _ = client.publish(format!("{PREFIX}.count"), body.into()).await;
                }
                Some(message) = counts.next() => {
                    let Some(m): Option<CountMessage> = decode(&message.payload) else { continue };
                    if m.node == node { continue }
                    let peer = peers.entry(m.node.clone()).or_insert(Peer { seq: 0, heard: Instant::now() });
                    peer.heard = Instant::now();
                    if m.seq == peer.seq + 1 {
                        peer.seq = m.seq;
                        presence.apply(&m.node, m.count);
                    } else if m.seq > peer.seq {
                        ask(&m.node).await;
                    }
                }
                Some(message) = heartbeats.next() => {
                    let Some(h): Option<Heartbeat> = decode(&message.payload) else { continue };
                    if h.node == node { continue }
                    let known = peers.contains_key(&h.node);
                    let peer = peers.entry(h.node.clone()).or_insert(Peer { seq: 0, heard: Instant::now() });
                    peer.heard = Instant::now();
                    if !known || h.seq > peer.seq {
                        ask(&h.node).await;
                    }
                }
                Some(request) = requests.next() => answer(&client, &*presence, &node, seq, request).await,
                Some(request) = direct.next() => answer(&client, &*presence, &node, seq, request).await,
                Some(message) = snapshots.next() => {
                    let Some(s): Option<Snapshot> = decode(&message.payload) else { continue };
                    if s.node == node { continue }
                    let peer = peers.entry(s.node.clone()).or_insert(Peer { seq: 0, heard: Instant::now() });
                    peer.heard = Instant::now();
                    if s.seq >= peer.seq {
                        peer.seq = s.seq;
                        presence.replace_node(&s.node, s.counts);
                    }
                }
                _ = ticker.tick() => {
                    let beat = serde_json::to_vec(&Heartbeat { node: node.clone(), seq }).expect("JSON");
                    let _ = client.publish(format!("{PREFIX}.heartbeat"), beat.into()).await;
                    let now = Instant::now();
                    peers.retain(|peer, state| {
                        let alive = now.duration_since(state.heard) < timing.timeout;
                        if !alive {
                            tracing::warn!(node = %peer, "no presence heartbeat within {:?}; its users leave", timing.timeout);
                            presence.forget_node(peer);
                        }
                        alive
                    });
                    // A node known only from a snapshot and never heard again.
                    for known in presence.known_nodes() {
                        if !peers.contains_key(&known) {
                            presence.forget_node(&known);
                        }
                    }
                }
            }
        }
    });
    Ok(())
}

fn decode<T: serde::de::DeserializeOwned>(payload: &[u8]) -> Option<T> {
    serde_json::from_slice(payload).ok()
}

async fn answer(
    client: &async_nats::Client,
    presence: &dyn PresenceState,
    node: &str,
    seq: u64,
    request: async_nats::Message,
) {
    let Some(reply) = request.reply else { return };
    let snapshot = Snapshot {
        node: node.to_owned(),
        seq,
        counts: presence.local_counts(),
    };
    let body = serde_json::to_vec(&snapshot).expect("JSON of a snapshot");
    let _ = client.publish(reply, body.into()).await;
}
