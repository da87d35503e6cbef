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
//! a snapshot, which replaces what it knew. One request per peer is
//! outstanding at a time (asked again after a heartbeat interval without an
//! answer); counts arriving meanwhile are held and applied after the
//! snapshot, so one lost message costs one snapshot. A node not heard from
//! within the timeout (killed, partitioned) is forgotten: its users leave.
//!
//! Core NATS delivers at most once and a slow link may fall behind, so what
//! waits to go out is bounded: the [`Outbox`] keeps only the latest count
//! per user and channel (counts are absolute, so nothing is lost).

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
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
    fn share_with(&self, outbox: Arc<Outbox>);
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

/// This node's count changes on their way to the other nodes: the latest
/// count per (user, channel), so it never holds more than one count per
/// key the node has, however far sending falls behind.
#[derive(Default)]
pub struct Outbox {
    pending: Mutex<HashMap<(String, Option<String>), Count>>,
    ready: Notify,
}

impl Outbox {
    /// Queues `count`, replacing an unsent one of the same key.
    pub fn push(&self, count: Count) {
        let key = (count.user_id.clone(), count.channel.clone());
        self.pending.lock().expect("outbox lock").insert(key, count);
        self.ready.notify_one();
    }

    /// Takes every count waiting to go out.
    pub fn take(&self) -> Vec<Count> {
        let mut pending = self.pending.lock().expect("outbox lock");
        pending.drain().map(|(_, count)| count).collect()
    }
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

/// Counts held per peer while its snapshot is awaited.
const MAX_HELD: usize = 10_000;

/// What this node knows of each peer's numbering: decides, for every
/// message, what to apply and when to ask for a snapshot.
#[derive(Default)]
struct Peers(HashMap<String, Peer>);

#[derive(Default)]
struct Peer {
    /// The last seq applied, in order or by a snapshot.
    seq: u64,
    heard: Option<Instant>,
    /// When a snapshot was asked for and has not come yet.
    asked: Option<Instant>,
    /// Counts past `seq` that came while the snapshot was awaited.
    held: Vec<(u64, Count)>,
}

/// What to do after a snapshot: replace the node's counts, apply the held
/// ones that follow it, and ask again if a gap remains.
#[derive(Debug, PartialEq)]
struct AfterSnapshot {
    replace: Vec<Count>,
    then: Vec<Count>,
    ask: bool,
}

impl Peers {
    fn heard(&mut self, node: &str, now: Instant) -> &mut Peer {
        let peer = self.0.entry(node.to_owned()).or_default();
        peer.heard = Some(now);
        peer
    }

    /// Asks for `peer`'s snapshot unless a request is outstanding.
    fn ask(peer: &mut Peer, now: Instant) -> bool {
        let ask = peer.asked.is_none();
        if ask {
            peer.asked = Some(now);
        }
        ask
    }

    /// Count `seq` from `node`: `Ok(count)` to apply it now, `Err(true)` to
    /// ask the node for a snapshot (a gap), `Err(false)` for nothing to do.
    fn count(&mut self, node: &str, seq: u64, count: Count, now: Instant) -> Result<Count, bool> {
        let peer = self.heard(node, now);
        if seq <= peer.seq {
            return Err(false);
        }
        if peer.asked.is_none() && seq == peer.seq + 1 {
            peer.seq = seq;
            return Ok(count);
        }
        if peer.held.len() < MAX_HELD {
            peer.held.push((seq, count));
        }
        Err(Self::ask(peer, now))
    }

    /// A heartbeat at `seq` from `node`: whether to ask for its snapshot
    /// (a node not known yet, or one ahead of what was applied).
    fn heartbeat(&mut self, node: &str, seq: u64, now: Instant) -> bool {
        let known = self.0.contains_key(node);
        let peer = self.heard(node, now);
        (!known || seq > peer.seq) && Self::ask(peer, now)
    }

    /// `node`'s snapshot at `seq`; `None` when it is older than what was
    /// applied.
    fn snapshot(
        &mut self,
        node: &str,
        seq: u64,
        counts: Vec<Count>,
        now: Instant,
    ) -> Option<AfterSnapshot> {
        let peer = self.heard(node, now);
        if seq < peer.seq {
            return None;
        }
        peer.seq = seq;
        peer.asked = None;
        let mut held = std::mem::take(&mut peer.held);
        held.sort_by_key(|(seq, _)| *seq);
        let mut then = Vec::new();
        let mut ask = false;
        for (seq, count) in held {
            if seq == peer.seq + 1 {
                peer.seq = seq;
                then.push(count);
            } else if seq > peer.seq {
                ask = true;
                peer.held.push((seq, count));
            }
        }
        if ask {
            Self::ask(peer, now);
        }
        Some(AfterSnapshot {
            replace: counts,
            then,
            ask,
        })
    }

    /// Peers asked longer than `patience` ago without an answer (a lost
    /// request or snapshot): asked again from `now`.
    fn ask_again(&mut self, now: Instant, patience: Duration) -> Vec<String> {
        let mut again = Vec::new();
        for (node, peer) in &mut self.0 {
            if peer
                .asked
                .is_some_and(|at| now.duration_since(at) >= patience)
            {
                peer.asked = Some(now);
                again.push(node.clone());
            }
        }
        again
    }

    /// Forgets the peers not heard from within `timeout`; returns them.
    fn expire(&mut self, now: Instant, timeout: Duration) -> Vec<String> {
        let mut gone = Vec::new();
        self.0.retain(|node, peer| {
            let alive = peer
                .heard
                .is_some_and(|at| now.duration_since(at) < timeout);
            if !alive {
                gone.push(node.clone());
            }
            alive
        });
        gone
    }

    fn contains(&self, node: &str) -> bool {
        self.0.contains_key(node)
    }
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
    let outbox = Arc::new(Outbox::default());
    presence.share_with(Arc::clone(&outbox));
    // Learn what the others know before anything else happens.
    client
        .publish_with_reply(format!("{PREFIX}.sync"), inbox.clone(), "".into())
        .await?;
    tokio::spawn(async move {
        let mut seq = 0u64;
        let mut peers = Peers::default();
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
                _ = outbox.ready.notified() => {
                    for count in outbox.take() {
                        seq += 1;
                        let message = CountMessage { node: node.clone(), seq, count };
                        let body = serde_json::to_vec(&message).expect("JSON of a count");
                        let _ = client.publish(format!("{PREFIX}.count"), body.into()).await;
                    }
                }
                Some(message) = counts.next() => {
                    let Some(m): Option<CountMessage> = decode(&message.payload) else { continue };
                    if m.node == node { continue }
                    match peers.count(&m.node, m.seq, m.count, Instant::now()) {
                        Ok(count) => presence.apply(&m.node, count),
                        Err(true) => ask(&m.node).await,
                        Err(false) => {}
                    }
                }
                Some(message) = heartbeats.next() => {
                    let Some(h): Option<Heartbeat> = decode(&message.payload) else { continue };
                    if h.node != node && peers.heartbeat(&h.node, h.seq, Instant::now()) {
                        ask(&h.node).await;
                    }
                }
                Some(request) = requests.next() => answer(&client, &*presence, &node, seq, request).await,
                Some(request) = direct.next() => answer(&client, &*presence, &node, seq, request).await,
                Some(message) = snapshots.next() => {
                    let Some(s): Option<Snapshot> = decode(&message.payload) else { continue };
                    if s.node == node { continue }
                    let Some(after) = peers.snapshot(&s.node, s.seq, s.counts, Instant::now()) else { continue };
                    presence.replace_node(&s.node, after.replace);
                    for count in after.then {
                        presence.apply(&s.node, count);
                    }
                    if after.ask {
                        ask(&s.node).await;
                    }
                }
                _ = ticker.tick() => {
                    let beat = serde_json::to_vec(&Heartbeat { node: node.clone(), seq }).expect("JSON");
                    let _ = client.publish(format!("{PREFIX}.heartbeat"), beat.into()).await;
                    let now = Instant::now();
                    for peer in peers.expire(now, timing.timeout) {
                        tracing::warn!(node = %peer, "no presence heartbeat within {:?}; its users leave", timing.timeout);
                        presence.forget_node(&peer);
                    }
                    for peer in peers.ask_again(now, timing.heartbeat) {
                        ask(&peer).await;
                    }
                    // A node known only from a snapshot and never heard again.
                    for known in presence.known_nodes() {
                        if !peers.contains(&known) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn count(user: &str, n: u32) -> Count {
        Count {
            user_id: user.into(),
            channel: None,
            count: n,
            user_name: None,
            at: 1,
        }
    }

    #[test]
    fn counts_in_order_apply_and_a_gap_asks_once() {
        let mut peers = Peers::default();
        let now = Instant::now();
        assert_eq!(peers.count("b", 1, count("u", 1), now), Ok(count("u", 1)));
        assert_eq!(
            peers.count("b", 1, count("u", 1), now),
            Err(false),
            "a repeat"
        );
        // Count 2 is lost: 3 asks for a snapshot, later ones wait for it.
        assert_eq!(peers.count("b", 3, count("u", 3), now), Err(true));
        assert_eq!(peers.count("b", 4, count("u", 4), now), Err(false));
        assert!(!peers.heartbeat("b", 4, now), "already asked");
        // The snapshot was taken at 3; the held 4 follows it.
        let after = peers.snapshot("b", 3, vec![count("u", 3)], now).unwrap();
        assert_eq!(
            after,
            AfterSnapshot {
                replace: vec![count("u", 3)],
                then: vec![count("u", 4)],
                ask: false,
            }
        );
        assert_eq!(peers.count("b", 5, count("u", 5), now), Ok(count("u", 5)));
    }

    #[test]
    fn a_gap_left_after_the_snapshot_asks_again() {
        let mut peers = Peers::default();
        let now = Instant::now();
        assert_eq!(peers.count("b", 2, count("u", 2), now), Err(true));
        assert_eq!(peers.count("b", 5, count("u", 5), now), Err(false));
        let after = peers.snapshot("b", 3, vec![], now).unwrap();
        assert!(after.then.is_empty() && after.ask, "4 is missing");
        assert_eq!(
            peers.snapshot("b", 2, vec![], now),
            None,
            "older than applied"
        );
        let after = peers.snapshot("b", 5, vec![count("u", 5)], now).unwrap();
        assert!(after.then.is_empty() && !after.ask);
        assert_eq!(peers.count("b", 6, count("u", 6), now), Ok(count("u", 6)));
    }

    #[test]
    fn an_unanswered_request_is_repeated_and_a_silent_peer_expires() {
        let mut peers = Peers::default();
        let start = Instant::now();
        assert!(peers.heartbeat("b", 7, start), "a new peer is asked");
        assert!(peers.ask_again(start, Duration::from_secs(2)).is_empty());
        let later = start + Duration::from_secs(2);
        assert_eq!(peers.ask_again(later, Duration::from_secs(2)), ["b"]);
        assert_eq!(
            peers.expire(later, Duration::from_secs(10)),
            Vec::<String>::new()
        );
        let gone = start + Duration::from_secs(10);
        assert_eq!(peers.expire(gone, Duration::from_secs(10)), ["b"]);
        assert!(!peers.contains("b"));
    }

    #[test]
    fn the_outbox_keeps_the_latest_count_per_key() {
        let outbox = Outbox::default();
        for n in [1, 2, 1, 0] {
            outbox.push(count("alice", n));
        }
        outbox.push(Count {
            channel: Some("room".into()),
            ..count("alice", 1)
        });
        let mut taken: Vec<_> = outbox
            .take()
            .into_iter()
            .map(|c| (c.channel, c.count))
            .collect();
        taken.sort();
        assert_eq!(taken, [(None, 0), (Some("room".into()), 1)]);
        assert!(outbox.take().is_empty());
    }
}
