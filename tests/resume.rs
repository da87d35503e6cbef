//! Delivery guarantees: resuming after a disconnect, a slow-consumer kick or
//! a node restart delivers every retained event exactly once, in order, on
//! every transport; a position beyond retention gets the reset signal.

mod common;

use common::*;
use serde_json::{Value, json};
use strom::bus::Retention;
use strom::bus::nats::NatsConfig;
use strom::engine::EngineConfig;
use strom::proto;
use strom::server::ServerConfig;

fn event(collection: &str, n: u64) -> Value {
    json!({"type": "record.created", "collection": collection, "record_id": n.to_string(),
        "data": {"n": n, "even": n.is_multiple_of(2)}})
}

async fn publish_n(server: &TestServer, collection: &str, range: std::ops::Range<u64>) -> Vec<u64> {
    let mut seqs = Vec::new();
    for n in range {
        seqs.push(server.publish_json(event(collection, n)).await);
    }
    seqs
}

fn resume_from(collection: &str, since: u64) -> proto::SubscribeRequest {
    proto::SubscribeRequest {
        since_seq: Some(since),
        ..text_subscription(collection, None)
    }
}

#[tokio::test]
async fn grpc_resume_delivers_exactly_the_missed_events_then_live() {
    let server = TestServer::memory().await;
    let mut client = server.grpc().await;
    let mut stream = grpc_subscribe(&mut client, text_subscription("posts", None)).await;
    let first = publish_n(&server, "posts", 0..2).await;
    assert_eq!(next_event(&mut stream).await.seq, first[0]);
    assert_eq!(next_event(&mut stream).await.seq, first[1]);
    drop(stream);
    // Published while disconnected, with other collections in between.
    let mut missed = Vec::new();
    for n in 2..7 {
        missed.push(server.publish_json(event("posts", n)).await);
        server.publish_json(event("other", n)).await;
    }
    let mut stream = grpc_subscribe(&mut client, resume_from("posts", first[1])).await;
    for seq in &missed {
        assert_eq!(next_event(&mut stream).await.seq, *seq);
    }
    let live = server.publish_json(event("posts", 7)).await;
    assert_eq!(
        next_event(&mut stream).await.seq,
        live,
        "then live, nothing repeated"
    );
}

#[tokio::test]
async fn websocket_resume_with_since() {
    let server = TestServer::memory().await;
    let seqs = publish_n(&server, "notes", 0..6).await;
    let mut client = WsClient::connect(server.addr, "").await.unwrap();
    client
        .subscribe_with(json!({"action": "subscribe", "collection": "notes", "since": seqs[1]}))
        .await;
    let mut received = Vec::new();
    while received.len() < 4 {
        let message = client.reply().await;
        assert_eq!(message["type"], "event", "{message}");
        received.push(message["data"]["seq"].as_u64().unwrap());
    }
    assert_eq!(received, seqs[2..]);
}

#[tokio::test]
async fn sse_resume_with_last_event_id() {
    let server = TestServer::memory().await;
    let seqs = publish_n(&server, "feed", 0..5).await;
    let header = format!("Last-Event-ID: {}\r\n", seqs[2]);
    let mut sse = SseReader::open(server.addr, "/api/v1/realtime/feed", &header).await;
    assert_eq!(sse.next().await.unwrap().event, "connected");
    for seq in &seqs[3..] {
        assert_eq!(sse.next().await.unwrap().id, Some(seq.to_string()));
    }
    let live = server.publish_json(event("feed", 9)).await;
    assert_eq!(sse.next().await.unwrap().id, Some(live.to_string()));
    let (status, _) = server.get("/api/v1/realtime/feed?since=banana").await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn a_position_beyond_retention_gets_the_reset_signal() {
    let server = TestServer::start(ServerConfig {
        retention: Retention {
            max_events: 5,
            ..Retention::default()
        },
        ..ServerConfig::default()
    })
    .await;
    let seqs = publish_n(&server, "logs", 0..20).await;
    let mut client = server.grpc().await;
    let mut stream = grpc_subscribe(&mut client, resume_from("logs", seqs[1])).await;
    let message = within("reset", stream.message()).await.unwrap().unwrap();
    let Some(proto::subscribe_response::Kind::Reset(reset)) = message.kind else {
        panic!("expected a reset, got {message:?}");
    };
    assert_eq!(reset.since_seq, seqs[1]);
    assert_eq!(reset.first_available_seq, seqs[15]);
    for seq in &seqs[15..] {
        assert_eq!(next_event(&mut stream).await.seq, *seq);
    }
    // Within retention: no reset.
    let mut stream = grpc_subscribe(&mut client, resume_from("logs", seqs[16])).await;
    assert_eq!(next_event(&mut stream).await.seq, seqs[17]);
    // SSE says it too.
    let header = format!("Last-Event-ID: {}\r\n", seqs[0]);
    let mut sse = SseReader::open(server.addr, "/api/v1/realtime/logs", &header).await;
    let reset = sse.next_of("reset").await;
    let data: Value = serde_json::from_str(&reset.data).unwrap();
    assert_eq!(data["first_available_seq"], seqs[15]);
}

#[tokio::test]
async fn a_kicked_slow_consumer_recovers_everything_by_resuming() {
    let server = TestServer::start(ServerConfig {
        engine: EngineConfig {
            queue_capacity: 32,
            ..EngineConfig::default()
        },
        ..ServerConfig::default()
    })
    .await;
    let mut client = server.grpc().await;
    let mut slow = grpc_subscribe(&mut server.grpc().await, text_subscription("bulk", None)).await;
    let padding = "x".repeat(4096);
    let mut published = Vec::new();
    for batch in 0..100 {
        let events = (0..20)
            .map(|i| created("bulk", &format!("{batch}-{i}"), json!({"pad": padding})))
            .collect();
        let reply = client
            .publish(proto::PublishRequest { events })
            .await
            .unwrap();
        published.extend(reply.into_inner().seqs);
    }
    let mut received = Vec::new();
    let status = loop {
        match within("the slow stream", slow.message()).await {
            Ok(Some(message)) => {
                if let Some(proto::subscribe_response::Kind::Event(e)) = message.kind {
                    received.push(e.seq);
                }
            }
            Ok(None) => panic!("ended without a status"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    assert!(received.len() < published.len(), "it was cut off");
    let last = *received.last().unwrap();
    let mut resumed = grpc_subscribe(&mut client, resume_from("bulk", last)).await;
    while received.len() < published.len() {
        received.push(next_event(&mut resumed).await.seq);
    }
    assert_eq!(received, published, "every event exactly once, in order");
}

/// A tiny deterministic generator, so a failure can be replayed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Concurrent publishers; a filtered subscriber that disconnects at random
/// points and resumes from the last seq it saw. It must see exactly the
/// matching events, in order.
async fn randomized_resume(server: &TestServer, seed: u64) {
    const PUBLISHERS: u64 = 3;
    const EACH: u64 = 150;
    let collection = format!("random{seed}");
    let mut publishers = Vec::new();
    for p in 0..PUBLISHERS {
        let addr = server.url();
        let collection = collection.clone();
        publishers.push(tokio::spawn(async move {
            let mut client = strom::proto::realtime_client::RealtimeClient::connect(addr)
                .await
                .unwrap();
            let mut rng = Rng(seed * 31 + p + 1);
            let mut published = Vec::new();
            let mut n = 0;
            while n < EACH {
                let size = (1 + rng.below(5)).min(EACH - n);
                let events = (n..n + size)
                    .map(|i| {
                        let id = p * EACH + i;
                        created(
                            &collection,
                            &id.to_string(),
                            json!({"even": id.is_multiple_of(2)}),
                        )
                    })
                    .collect();
                let seqs = client
                    .publish(proto::PublishRequest { events })
                    .await
                    .unwrap()
                    .into_inner()
                    .seqs;
                published.extend((n..n + size).map(|i| p * EACH + i).zip(seqs));
                n += size;
                tokio::task::yield_now().await;
            }
            published
        }));
    }
    let subscriber = {
        let addr = server.url();
        let collection = collection.clone();
        tokio::spawn(async move {
            let mut client = strom::proto::realtime_client::RealtimeClient::connect(addr)
                .await
                .unwrap();
            let mut rng = Rng(seed);
            let mut received: Vec<(u64, u64)> = Vec::new();
            let mut since = 0;
            let mut sessions = 0;
            // Stops once it has seen the last matching event of every publisher.
            let done = |received: &Vec<(u64, u64)>| {
                (0..PUBLISHERS).all(|p| {
                    let last_even = p * EACH + EACH - 1 - ((p * EACH + EACH - 1) % 2);
                    received.iter().any(|(id, _)| *id == last_even)
                })
            };
            while !done(&received) {
                sessions += 1;
                let request = proto::SubscribeRequest {
                    since_seq: Some(since),
                    ..text_subscription(&collection, Some("even = true"))
                };
                let mut stream = grpc_subscribe(&mut client, request).await;
                let quota = 1 + rng.below(25);
                for _ in 0..quota {
                    let event = next_event(&mut stream).await;
                    since = event.seq;
                    received.push((event.record_id.parse().unwrap(), event.seq));
                    if done(&received) {
                        break;
                    }
                }
            }
            (received, sessions)
        })
    };
    let mut expected = Vec::new();
    for publisher in publishers {
        expected.extend(within("a publisher", publisher).await.unwrap());
    }
    expected.retain(|(id, _)| id.is_multiple_of(2));
    expected.sort_by_key(|(_, seq)| *seq);
    let (received, sessions) = within("the subscriber", subscriber).await.unwrap();
    assert!(sessions > 3, "it reconnected several times ({sessions})");
    assert_eq!(
        received, expected,
        "seed {seed}: no gap, no duplicate, in order"
    );
}

#[tokio::test]
async fn randomized_disconnects_lose_and_repeat_nothing_in_memory() {
    let server = TestServer::memory().await;
    for seed in [1, 7, 42] {
        randomized_resume(&server, seed).await;
    }
}

#[tokio::test]
async fn randomized_disconnects_lose_and_repeat_nothing_over_nats() {
    let nats = NatsServer::start();
    let server = TestServer::start(ServerConfig {
        nats: Some(NatsConfig::new(nats.url.clone())),
        ..ServerConfig::default()
    })
    .await;
    for seed in [3, 11] {
        randomized_resume(&server, seed).await;
    }
}

#[tokio::test]
async fn clients_resume_across_a_node_restart_and_on_another_node() {
    let nats = NatsServer::start();
    let config = || ServerConfig {
        nats: Some(NatsConfig::new(nats.url.clone())),
        ..ServerConfig::default()
    };
    let a = TestServer::start(config()).await;
    let b = TestServer::start(config()).await;
    let mut on_a = a.grpc().await;
    let mut stream = grpc_subscribe(&mut on_a, text_subscription("orders", None)).await;
    let first = b.publish_json(event("orders", 0)).await;
    assert_eq!(next_event(&mut stream).await.seq, first);
    a.stop().await;
    assert!(
        stream.message().await.is_err(),
        "the stream ended with the node"
    );
    let missed = publish_n(&b, "orders", 1..6).await;
    // A restarts; the client comes back to it.
    let a = TestServer::start(config()).await;
    let mut on_a = a.grpc().await;
    let mut resumed = grpc_subscribe(&mut on_a, resume_from("orders", first)).await;
    for seq in &missed {
        assert_eq!(next_event(&mut resumed).await.seq, *seq);
    }
    // The same position means the same thing on B.
    let mut on_b = b.grpc().await;
    let mut elsewhere = grpc_subscribe(&mut on_b, resume_from("orders", first)).await;
    for seq in &missed {
        assert_eq!(next_event(&mut elsewhere).await.seq, *seq);
    }
    let live = a.publish_json(event("orders", 6)).await;
    assert_eq!(next_event(&mut resumed).await.seq, live);
    assert_eq!(next_event(&mut elsewhere).await.seq, live);
}
