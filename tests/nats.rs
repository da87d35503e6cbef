//! Several strom nodes on one real nats-server (JetStream): events cross
//! nodes, and a raw NATS publish reaches subscribers like a Publish call.

mod common;

use common::*;
use serde_json::json;
use std::net::SocketAddr;
use std::time::Duration;
use strom::bus::nats::NatsConfig;
use strom::edge::grpc::json_from_struct;
use strom::proto;
use strom::server::{Server, ServerConfig};

async fn node(nats: &NatsServer) -> TestServer {
    TestServer::start(ServerConfig {
        nats: Some(NatsConfig::new(nats.url.clone())),
        ..ServerConfig::default()
    })
    .await
}

#[tokio::test]
async fn an_event_published_on_one_node_reaches_a_subscriber_of_another() {
    let nats = NatsServer::start();
    let a = node(&nats).await;
    let b = node(&nats).await;
    let mut on_b = b.grpc().await;
    let mut filtered = grpc_subscribe(&mut on_b, text_subscription("posts", Some("n >= 2"))).await;
    let mut everything = grpc_subscribe(&mut on_b, text_subscription("*", None)).await;

    let mut on_a = a.grpc().await;
    let seqs = on_a
        .publish(proto::PublishRequest {
            events: vec![
                created("posts", "1", json!({"n": 1})),
                created("posts", "2", json!({"n": 2})),
                created("comments", "3", json!({"n": 3})),
            ],
        })
        .await
        .unwrap()
        .into_inner()
        .seqs;
    assert_eq!(seqs.len(), 3);
    let got = next_event(&mut filtered).await;
    assert_eq!((got.record_id.as_str(), got.seq), ("2", seqs[1]));
    for expected in ["1", "2", "3"] {
        assert_eq!(next_event(&mut everything).await.record_id, expected);
    }
    // REST on B reaches a WebSocket-less SSE reader on A.
    let mut sse = SseReader::open(a.addr, "/api/v1/realtime/orders", "").await;
    assert_eq!(sse.next().await.unwrap().event, "connected");
    let seq = b
        .publish_json(
            json!({"type": "record.updated", "collection": "orders", "record_id": "o",
            "data": {"status": "paid"}}),
        )
        .await;
    let event = sse.next_of("record.updated").await;
    assert_eq!(event.id, Some(seq.to_string()));
    let (_, stats) = a.get("/api/v1/stats").await;
    assert!(stats.contains(r#""pubsub_backend":"nats""#), "{stats}");
}

#[tokio::test]
async fn a_raw_nats_publish_reaches_grpc_subscribers() {
    let nats = NatsServer::start();
    let server = node(&nats).await;
    let mut client = server.grpc().await;
    let mut stream = grpc_subscribe(
        &mut client,
        text_subscription("products", Some("price > 100")),
    )
    .await;

    let raw = async_nats::connect(&nats.url).await.unwrap();
    let js = async_nats::jetstream::new(raw.clone());
    // Garbage on the subject is skipped, not fatal.
    js.publish("strom.events.products", "not json".into())
        .await
        .unwrap()
        .await
        .unwrap();
    js.publish(
        "strom.events.products",
        r#"{"type":"record.created","record_id":"cheap","data":{"price":5}}"#.into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    // A plain core-NATS publish (what `nats pub` does) is captured too.
    raw.publish(
        "strom.events.products",
        r#"{"type":"record.created","record_id":"dear","data":{"price":500}}"#.into(),
    )
    .await
    .unwrap();
    raw.flush().await.unwrap();
    let event = next_event(&mut stream).await;
    assert_eq!(event.record_id, "dear");
    assert_eq!(event.collection, "products");
    assert_eq!(event.seq, 3, "the stream's sequence number");
    assert_eq!(
        json_from_struct(event.data.as_ref().unwrap()),
        json!({"price": 500})
    );
    assert!(event.timestamp.is_some(), "the stream's timestamp fills in");
}

/// `presence` is reserved on NATS too: a message on its subject is
/// skipped, live and in replays, so no fake join reaches anyone.
#[tokio::test]
async fn a_raw_nats_publish_on_presence_is_skipped() {
    let nats = NatsServer::start();
    let server = node(&nats).await;
    let mut client = server.grpc().await;
    let mut everything = grpc_subscribe(&mut client, text_subscription("*", None)).await;

    let raw = async_nats::connect(&nats.url).await.unwrap();
    let js = async_nats::jetstream::new(raw);
    for (subject, body) in [
        (
            "strom.events.presence",
            r#"{"type":"user.joined","record_id":"mallory","data":{"user_id":"mallory","channel":null}}"#,
        ),
        (
            "strom.events.posts",
            r#"{"type":"record.created","record_id":"after","data":{}}"#,
        ),
    ] {
        js.publish(subject, body.into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    // The `*` consumer reads the stream in order: the fake came first.
    let event = next_event(&mut everything).await;
    assert_eq!(
        (event.collection.as_str(), event.record_id.as_str()),
        ("posts", "after")
    );
    let mut replay = grpc_subscribe(
        &mut client,
        proto::SubscribeRequest {
            since_seq: Some(0),
            ..text_subscription("*", None)
        },
    )
    .await;
    let event = next_event(&mut replay).await;
    assert_eq!(
        (event.collection.as_str(), event.record_id.as_str()),
        ("posts", "after")
    );
}

#[tokio::test]
async fn a_node_reads_only_the_collections_its_subscribers_need() {
    let monitor = free_port();
    let nats = NatsServer::start_with(&["-js", "-m", &monitor.to_string()]);
    let server = node(&nats).await;
    let raw = async_nats::connect(&nats.url).await.unwrap();
    let js = async_nats::jetstream::new(raw);
    let mut stream = js.get_stream("STROM_EVENTS").await.unwrap();
    // The subscriptions nats-server holds on the live subject of `posts`.
    let monitor: SocketAddr = ([127, 0, 0, 1], monitor).into();
    let on_posts = || async move {
        let (status, body) = http(monitor, "GET", "/subsz?subs=1", "").await.unwrap();
        assert_eq!(status, 200, "{body}");
        body.matches("\"strom.events_live.posts\"").count()
    };
    assert_eq!(on_posts().await, 0);
    let mut client = server.grpc().await;
    let sub = grpc_subscribe(&mut client, text_subscription("posts", None)).await;
    let second = grpc_subscribe(&mut client, text_subscription("posts", None)).await;
    assert_eq!(
        on_posts().await,
        1,
        "one subscription per collection and node"
    );
    let info = stream.info().await.unwrap();
    assert_eq!(
        info.state.consumer_count, 0,
        "watches and replays need no consumer"
    );
    drop(sub);
    drop(second);
    // The subscription goes once the last subscriber has; wait for that.
    within("the subscription to end", async {
        while on_posts().await != 0 {
            tokio::task::yield_now().await;
        }
    })
    .await;
}

/// Turns the stream's republishing of stored events off or on, as
/// strom's watches see it: off, a stored event does not arrive live.
async fn set_republish(js: &async_nats::jetstream::Context, on: bool) {
    let mut stream = js.get_stream("STROM_EVENTS").await.unwrap();
    let mut config = stream.info().await.unwrap().config.clone();
    config.republish = on.then(|| async_nats::jetstream::stream::Republish {
        source: "strom.events.>".into(),
        destination: "strom.events_live.>".into(),
        headers_only: false,
    });
    js.update_stream(config).await.unwrap();
}

#[tokio::test]
async fn a_live_event_that_never_arrived_is_read_from_the_stream_before_the_next() {
    let nats = NatsServer::start();
    let server = node(&nats).await;
    let raw = async_nats::connect(&nats.url).await.unwrap();
    let js = async_nats::jetstream::new(raw);
    let mut client = server.grpc().await;
    let mut posts = grpc_subscribe(&mut client, text_subscription("posts", None)).await;
    let mut everything = grpc_subscribe(&mut client, text_subscription("*", None)).await;
    let first = server
        .publish_json(created_json("posts", "first", json!({})))
        .await;
    assert_eq!(next_event(&mut posts).await.seq, first);
    assert_eq!(next_event(&mut everything).await.seq, first);

    // Stored but never republished: what a watch misses when core NATS
    // drops a message (a reconnection, a lost server).
    set_republish(&js, false).await;
    let missed = server
        .publish_json(created_json("posts", "missed", json!({})))
        .await;
    set_republish(&js, true).await;
    let next = server
        .publish_json(created_json("posts", "next", json!({})))
        .await;
    for stream in [&mut posts, &mut everything] {
        let (a, b) = (next_event(stream).await, next_event(stream).await);
        assert_eq!(
            (a.seq, a.record_id.as_str()),
            (missed, "missed"),
            "the gap first"
        );
        assert_eq!((b.seq, b.record_id.as_str()), (next, "next"));
    }
}

#[tokio::test]
async fn subscribed_reports_the_cluster_head_so_resuming_from_it_misses_nothing() {
    let nats = NatsServer::start();
    let a = node(&nats).await;
    let b = node(&nats).await;
    let seq = a
        .publish_json(json!({"type": "record.created", "collection": "elsewhere", "data": {}}))
        .await;
    let mut client = b.grpc().await;
    let mut stream = client
        .subscribe(text_subscription("quiet", None))
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    let Some(proto::subscribe_response::Kind::Subscribed(subscribed)) = first.kind else {
        panic!("subscribed first, got {first:?}");
    };
    assert_eq!(
        subscribed.head_seq, seq,
        "B reports the stream's head, not what it dispatched"
    );
    drop(stream);
    let missed = a
        .publish_json(json!({"type": "record.created", "collection": "quiet", "data": {}}))
        .await;
    let request = proto::SubscribeRequest {
        since_seq: Some(subscribed.head_seq),
        ..text_subscription("quiet", None)
    };
    let mut resumed = grpc_subscribe(&mut client, request).await;
    assert_eq!(next_event(&mut resumed).await.seq, missed);
}

/// Dedup ids belong to their publisher: Mallory publishing first with an id
/// cannot make JetStream drop Alice's event with the same id, and a real
/// duplicate is reported as one, with the original's seq.
#[tokio::test]
async fn a_publishers_dedup_id_cannot_suppress_another_publishers_event() {
    use strom::auth::AuthSettings;
    let nats = NatsServer::start();
    let server = TestServer::start(ServerConfig {
        nats: Some(NatsConfig::new(nats.url.clone())),
        auth: AuthSettings {
            jwt_secret: Some(SECRET.into()),
            ..AuthSettings::default()
        },
        ..ServerConfig::default()
    })
    .await;
    let publisher = |sub: &str| token(sub, json!({"strom": {"publish": ["orders"]}}));
    let (mallory, alice) = (publisher("mallory"), publisher("alice"));
    let mut client = server.grpc().await;
    let mut request = tonic::Request::new(text_subscription("orders", None));
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {alice}").parse().unwrap());
    let mut orders = client.subscribe(request).await.unwrap().into_inner();
    let subscribed = orders.message().await.unwrap().expect("subscribed");
    assert!(matches!(
        subscribed.kind,
        Some(proto::subscribe_response::Kind::Subscribed(_))
    ));
    let publish = |who: &str, record: &str| {
        let body = json!({"type": "record.created", "collection": "orders",
            "record_id": record, "id": "pg:0/16B3748", "data": {}})
        .to_string();
        let path = format!("/api/v1/publish?token={who}");
        let server = &server;
        async move {
            let (status, body) = server.post(&path, &body).await;
            assert_eq!(status, 200, "{body}");
            serde_json::from_str::<serde_json::Value>(&body).unwrap()
        }
    };
    let first = publish(&mallory, "fake").await;
    assert_eq!(first.get("duplicate"), None);
    let real = publish(&alice, "real").await;
    assert_eq!(real.get("duplicate"), None, "{real}");
    assert!(real["seq"].as_u64() > first["seq"].as_u64(), "{real}");
    let again = publish(&alice, "real-again").await;
    assert_eq!(again["duplicate"], true, "{again}");
    assert_eq!(again["seq"], real["seq"], "the original's seq");

    assert_eq!(next_event(&mut orders).await.record_id, "fake");
    assert_eq!(next_event(&mut orders).await.record_id, "real");
    let marker = server
        .post(
            &format!("/api/v1/publish?token={alice}"),
            &json!({"type": "record.created", "collection": "orders",
                "record_id": "marker", "data": {}})
            .to_string(),
        )
        .await;
    assert_eq!(marker.0, 200);
    assert_eq!(
        next_event(&mut orders).await.record_id,
        "marker",
        "the duplicate was not delivered"
    );
}

/// A strom node whose NATS requests and replay reads give up after `timeout`.
fn impatient(nats: &NatsServer, timeout: Duration) -> ServerConfig {
    ServerConfig {
        nats: Some(NatsConfig {
            timeout,
            startup_timeout: timeout,
            ..NatsConfig::new(nats.url.clone())
        }),
        ..ServerConfig::default()
    }
}

#[tokio::test]
async fn a_replay_that_nats_stops_serving_ends_with_unavailable() {
    let nats = NatsServer::start();
    let node = TestServer::start(impatient(&nats, Duration::from_secs(1))).await;
    let mut client = node.grpc().await;
    // More history than one direct-get batch holds.
    for batch in 0..10 {
        let events = (0..500)
            .map(|i| created("log", &format!("{batch}-{i}"), json!({})))
            .collect();
        client
            .publish(proto::PublishRequest { events })
            .await
            .unwrap();
    }
    let request = proto::SubscribeRequest {
        since_seq: Some(0),
        ..text_subscription("log", None)
    };
    let mut stream = grpc_subscribe(&mut client, request).await;
    assert_eq!(next_event(&mut stream).await.seq, 1);
    nats.signal("STOP");
    let ended = within("the replay to end", async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("the stream ended without a reason"),
                Err(status) => return status,
            }
        }
    })
    .await;
    nats.signal("CONT");
    assert_eq!(ended.code(), tonic::Code::Unavailable, "{ended:?}");
    assert!(ended.message().contains("NATS"), "{}", ended.message());
}

#[tokio::test]
async fn a_subscription_nats_cannot_serve_ends_on_every_transport_and_readiness_says_so() {
    let nats = NatsServer::start();
    let node = TestServer::start(impatient(&nats, Duration::from_secs(1))).await;
    let (status, ready) = node.get("/readyz").await;
    assert_eq!(status, 200, "{ready}");
    nats.signal("STOP");
    let mut ws = WsClient::connect(node.addr, "").await.unwrap();

    // WebSocket: the error, then close 1001 (the seed client reconnects
    // only on a close).
    ws.send(json!({"action": "subscribe", "collection": "posts", "since": 0}))
        .await;
    let error = ws.reply().await;
    assert_eq!(error["type"], "error", "{error}");
    assert_eq!(error["data"]["code"], "unavailable", "{error}");
    assert_eq!(ws.expect_close().await, 1001);

    // SSE: the stream opens (an EventSource gives up on an HTTP error),
    // says why, and ends.
    let (status, _, body) = sse_body(node.addr, "/api/v1/realtime/posts?since=0", "").await;
    assert_eq!(status, 200);
    use futures_util::StreamExt;
    let chunks: Vec<_> = within("the SSE stream to end", body.collect()).await;
    let text: String = chunks
        .into_iter()
        .map(|chunk| String::from_utf8(chunk.unwrap().to_vec()).unwrap())
        .collect();
    assert!(text.starts_with("event: stream_error\n"), "{text}");
    assert!(text.contains("\"code\":\"unavailable\""), "{text}");

    // gRPC: the call ends UNAVAILABLE.
    let mut client = node.grpc().await;
    let status = within(
        "the subscribe to fail",
        client.subscribe(text_subscription("posts", None)),
    )
    .await
    .expect_err("a subscription NATS cannot serve");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");

    // Readiness says what is wrong; health stays up; the failures count.
    let (status, ready) = node.get("/readyz").await;
    assert_eq!(status, 503, "{ready}");
    assert!(ready.contains("unavailable"), "{ready}");
    assert_eq!(node.get("/healthz").await.0, 200);
    let (_, metrics) = node.get("/metrics").await;
    let series = metric_series(&metrics);
    let failures: f64 = ["watch", "history", "stream_info"]
        .map(|op| series[&format!("strom_nats_request_failures_total{{op=\"{op}\"}}")])
        .iter()
        .sum();
    assert!(failures >= 3.0, "{metrics}");

    nats.signal("CONT");
    within("readiness to come back", async {
        while node.get("/readyz").await.0 != 200 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    let mut stream = grpc_subscribe(&mut client, text_subscription("posts", None)).await;
    node.publish_json(json!({"type": "record.created", "collection": "posts", "data": {}}))
        .await;
    assert_eq!(next_event(&mut stream).await.collection, "posts");
}

#[tokio::test]
async fn a_stream_with_another_replica_count_is_reported_not_reused() {
    let nats = NatsServer::start();
    let _first = node(&nats).await;
    let config = ServerConfig {
        nats: Some(NatsConfig {
            replicas: 3,
            ..NatsConfig::new(nats.url.clone())
        }),
        ..ServerConfig::default()
    };
    let Err(error) = Server::start(config).await else {
        panic!("a stream with 1 replica was reused for --nats-replicas 3");
    };
    let message = error.to_string();
    assert!(
        message.contains("1 replica(s)") && message.contains("--nats-replicas"),
        "{message}"
    );
}

#[tokio::test]
async fn startup_without_jetstream_says_what_it_waited_for() {
    let nats = NatsServer::start_with(&[]);
    let config = impatient(&nats, Duration::from_secs(1));
    let Err(error) = within("startup to give up", Server::start(config)).await else {
        panic!("started without JetStream");
    };
    let message = error.to_string();
    assert!(
        message.contains("STROM_EVENTS") && message.contains("-js"),
        "{message}"
    );
}

/// Collections spread over three streams: each collection's events are
/// numbered by its own stream and resume exactly; `*` hears every stream
/// live, each event naming its stream, and resumes exactly from a position
/// token of one seq per stream (over gRPC, WebSocket and SSE, whose event
/// ids are the token, and in a drain's hint) but not from one seq; a raw
/// NATS publish on the partition's subject is captured.
#[tokio::test]
async fn partitions_spread_collections_over_streams_and_resume_exactly() {
    use strom::bus::nats::partition_of;
    let nats = NatsServer::start();
    let mut node = TestServer::start(ServerConfig {
        nats: Some(NatsConfig {
            partitions: 3,
            ..NatsConfig::new(nats.url.clone())
        }),
        ..ServerConfig::default()
    })
    .await;
    // Collections on different partitions.
    let collections: Vec<String> = (0..)
        .map(|i| format!("c{i}"))
        .scan(Vec::new(), |seen: &mut Vec<usize>, name| {
            let partition = partition_of(&name, 3);
            let new = !seen.contains(&partition);
            seen.push(partition);
            Some(new.then_some(name))
        })
        .flatten()
        .take(3)
        .collect();
    let mut client = node.grpc().await;
    let mut everything = client
        .subscribe(text_subscription("*", None))
        .await
        .unwrap()
        .into_inner();
    let Some(proto::subscribe_response::Kind::Subscribed(subscribed)) =
        everything.message().await.unwrap().unwrap().kind
    else {
        panic!("subscribed first");
    };
    assert_eq!(
        (subscribed.head_seq, subscribed.head_position.as_str()),
        (0, "0,0,0")
    );
    let mut published = Vec::new();
    for round in 0..2 {
        for collection in &collections {
            let body = json!({"type": "record.created", "collection": collection,
                "record_id": format!("r{round}"), "data": {}});
            published.push((collection.clone(), node.publish_json(body).await));
        }
    }
    // Each stream numbers its own events: 1, 2 in every partition.
    let mut seqs: Vec<u64> = published.iter().map(|(_, seq)| *seq).collect();
    seqs.sort();
    assert_eq!(seqs, [1, 1, 1, 2, 2, 2]);
    // Each names its stream; the token after round 0 is one seq per stream.
    let mut after_round_0 = [0; 3];
    for i in 0..published.len() {
        let event = next_event(&mut everything).await;
        let partition = partition_of(&event.collection, 3);
        assert_eq!(event.partition, Some(partition as u32));
        if i < collections.len() {
            after_round_0[partition] = event.seq;
        }
    }
    let token = after_round_0.map(|seq| seq.to_string()).join(",");
    assert_eq!(token, "1,1,1");
    let round_1: std::collections::BTreeSet<String> = collections.iter().cloned().collect();

    // A collection resumes exactly from its own seq.
    for collection in &collections {
        let request = proto::SubscribeRequest {
            since_seq: Some(1),
            ..text_subscription(collection, None)
        };
        let mut resumed = grpc_subscribe(&mut client, request).await;
        let event = next_event(&mut resumed).await;
        assert_eq!(
            (
                event.collection.as_str(),
                event.record_id.as_str(),
                event.seq
            ),
            (collection.as_str(), "r1", 2)
        );
    }

    // `*` resumes from the token: exactly round 1, one stream after another.
    let request = proto::SubscribeRequest {
        since_position: token.clone(),
        ..text_subscription("*", None)
    };
    let mut resumed = grpc_subscribe(&mut client, request).await;
    let mut heard = std::collections::BTreeSet::new();
    for _ in 0..collections.len() {
        let event = next_event(&mut resumed).await;
        assert_eq!((event.record_id.as_str(), event.seq), ("r1", 2));
        heard.insert(event.collection);
    }
    assert_eq!(heard, round_1);
    // The same over WebSocket, with the token as `since`.
    let mut ws = WsClient::connect(node.addr, "").await.unwrap();
    ws.send(json!({"action": "subscribe", "collection": "*", "since": token}))
        .await;
    let subscribed = ws.next().await.unwrap();
    assert_eq!(subscribed["type"], "subscribed", "{subscribed}");
    assert_eq!(subscribed["data"]["head_position"], "2,2,2");
    let mut heard = std::collections::BTreeSet::new();
    for _ in 0..collections.len() {
        let event = ws.next().await.unwrap();
        let data = &event["data"];
        assert_eq!(
            (&data["record_id"], &data["seq"]),
            (&json!("r1"), &json!(2))
        );
        let collection = data["collection"].as_str().unwrap().to_owned();
        assert_eq!(data["partition"], partition_of(&collection, 3));
        heard.insert(collection);
    }
    assert_eq!(heard, round_1);
    // And over SSE, where each event's id is the token after it.
    let mut sse = SseReader::open(
        node.addr,
        "/api/v1/realtime",
        &format!("Last-Event-ID: {token}\r\n"),
    )
    .await;
    assert_eq!(sse.status, 200, "{}", sse.head);
    assert_eq!(sse.next().await.unwrap().event, "connected");
    let mut position = after_round_0;
    for _ in 0..collections.len() {
        let event = sse.next().await.unwrap();
        let data: serde_json::Value = serde_json::from_str(&event.data).unwrap();
        position[partition_of(data["collection"].as_str().unwrap(), 3)] = 2;
        let expected = position.map(|seq| seq.to_string()).join(",");
        assert_eq!(event.id.as_deref(), Some(expected.as_str()));
    }

    // One seq is no position in three streams; a token of two neither.
    for (since_seq, since_position) in [(Some(1), ""), (None, "1,1")] {
        let request = proto::SubscribeRequest {
            since_seq,
            since_position: since_position.into(),
            ..text_subscription("*", None)
        };
        let status = match client.subscribe(request).await {
            Err(status) => status,
            Ok(response) => response.into_inner().message().await.unwrap_err(),
        };
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains("--nats-partitions"), "{status:?}");
    }
    // A token that is not one gets a clear error too.
    ws.send(json!({"action": "subscribe", "collection": "*", "since": "1,x"}))
        .await;
    let error = ws.next().await.unwrap();
    assert_eq!(error["data"]["code"], "invalid_argument", "{error}");
    assert!(
        error["data"]["message"]
            .as_str()
            .unwrap()
            .contains("position token"),
        "{error}"
    );

    // The streams exist under their names; a raw publish on a partition's
    // subject reaches subscribers.
    let raw = async_nats::connect(&nats.url).await.unwrap();
    let js = async_nats::jetstream::new(raw.clone());
    let target = &collections[0];
    let partition = partition_of(target, 3);
    let mut stream = js
        .get_stream(format!("STROM_EVENTS_{partition}"))
        .await
        .unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, 2);
    js.publish(
        format!("strom.events.{partition}.{target}"),
        r#"{"type":"record.created","record_id":"raw","data":{}}"#.into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let event = next_event(&mut everything).await;
    assert_eq!(
        (
            event.collection.as_str(),
            event.record_id.as_str(),
            event.seq
        ),
        (target.as_str(), "raw", 3)
    );

    // A drain names the WebSocket `*` client's token, the raw event in.
    let raw_on_ws = ws.next().await.unwrap();
    assert_eq!(raw_on_ws["data"]["record_id"], "raw", "{raw_on_ws}");
    let mut after_raw = [2; 3];
    after_raw[partition] = 3;
    node.begin_stop();
    let hint = ws.next().await.unwrap();
    assert_eq!(hint["type"], "reconnect", "{hint}");
    assert_eq!(
        hint["data"]["since"],
        after_raw.map(|seq| seq.to_string()).join(",")
    );
}

/// `/metrics` reports the NATS side: the connection, the stream's
/// consumers (a subscriber's live consumer) and its retained events.
#[tokio::test]
async fn metrics_report_the_nats_connection_consumers_and_history() {
    let nats = NatsServer::start();
    let server = node(&nats).await;
    let mut client = server.grpc().await;
    let mut stream = grpc_subscribe(&mut client, text_subscription("posts", None)).await;
    server
        .publish_json(
            json!({"type": "record.created", "collection": "posts", "record_id": "a", "data": {}}),
        )
        .await;
    next_event(&mut stream).await;
    let (status, metrics) = server.get("/metrics").await;
    assert_eq!(status, 200);
    let series = metric_series(&metrics);
    let value = |name: &str| series[name];
    assert_eq!(value("strom_nats_connected"), 1.0);
    // strom reads the stream without consumers; others' are counted.
    assert_eq!(value("strom_jetstream_consumers"), 0.0, "{metrics}");
    assert!(series.contains_key("strom_nats_request_failures_total{op=\"history\"}"));
    assert_eq!(value("strom_history_events"), 1.0);

    // The Grafana dashboard asks only for series this serves.
    let dashboard = include_str!("../deploy/grafana-dashboard.json");
    let mut asked: Vec<&str> = dashboard
        .match_indices("strom_")
        .map(|(at, _)| {
            let name = &dashboard[at..];
            let end = name
                .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
                .unwrap_or(name.len());
            &name[..end]
        })
        .collect();
    asked.sort_unstable();
    asked.dedup();
    assert!(asked.len() > 10, "{asked:?}");
    for name in asked {
        // A histogram's own name stands for its `_bucket` series.
        let served = metrics.lines().any(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with([' ', '{']) || rest.starts_with("_bucket{"))
        });
        assert!(
            served,
            "the dashboard asks for {name}, which /metrics lacks"
        );
    }
}
