//! Rolling deploys: a node sent SIGTERM tells its clients where to resume,
//! and a client that follows the hint to another node loses nothing.
//! Also the hint on SSE and gRPC, on an in-process server.

mod common;

use common::*;
use serde_json::{Value, json};
use strom::edge::grpc::RESUME_SINCE;
use tonic::Code;

const EVENTS: u64 = 300;

/// Publishes events 1..=EVENTS on `collection` through `node`, one request
/// each, and returns their seqs in order.
async fn publish_all(node: std::net::SocketAddr) -> Vec<u64> {
    let mut seqs = Vec::new();
    for i in 1..=EVENTS {
        let body = json!({"type": "record.created", "collection": "drain",
            "record_id": i.to_string(), "data": {"i": i}});
        let (status, reply) = http(node, "POST", "/api/v1/publish", &body.to_string())
            .await
            .unwrap();
        assert_eq!(status, 200, "{reply}");
        let reply: Value = serde_json::from_str(&reply).unwrap();
        seqs.push(reply["seq"].as_u64().unwrap());
    }
    seqs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_client_follows_the_drain_hint_to_another_node_and_loses_nothing() {
    let nats = NatsServer::start();
    let args = ["--nats-url", &nats.url];
    let mut draining = StromProcess::start(&args);
    let staying = StromProcess::start(&args);

    let mut client = WsClient::connect(draining.addr, "").await.unwrap();
    client.subscribe("drain").await;
    let publisher = tokio::spawn(publish_all(staying.addr));

    let mut received = Vec::new();
    let hint = loop {
        let message = client.next().await.expect("the socket stays open");
        match message["type"].as_str() {
            Some("event") => {
                received.push(message["data"]["seq"].as_u64().unwrap());
                if received.len() == 50 {
                    draining.terminate();
                }
            }
            Some("reconnect") => break message["data"].clone(),
            _ => panic!("unexpected {message}"),
        }
    };
    assert_eq!(client.expect_close().await, 1012);
    let since = hint["since"].as_u64().expect("a resume position");
    assert_eq!(Some(&since), received.last(), "{hint}");
    assert!(hint["reason"].as_str().unwrap().contains("shutting down"));
    assert!(draining.wait(), "the drained node exits cleanly");

    let mut client = WsClient::connect(staying.addr, "").await.unwrap();
    client
        .subscribe_with(json!({"action": "subscribe", "collection": "drain", "since": since}))
        .await;
    let published = within("the publisher", publisher).await.unwrap();
    let last = *published.last().unwrap();
    while received.last() != Some(&last) {
        let message = client.next().await.expect("the socket stays open");
        if message["type"] == "event" {
            received.push(message["data"]["seq"].as_u64().unwrap());
        }
    }
    assert_eq!(received, published, "every event once, in order");
}

#[tokio::test]
async fn sse_streams_end_with_a_reconnect_event_naming_the_position() {
    let mut server = TestServer::memory().await;
    let mut sse = SseReader::open(server.addr, "/api/v1/realtime/posts", "").await;
    sse.next_of("connected").await;
    let body =
        json!({"type": "record.created", "collection": "posts", "record_id": "a", "data": {}});
    let seq = server.publish_json(body).await;
    sse.next_of("record.created").await;
    server.begin_stop();
    let hint = sse.next_of("reconnect").await;
    let hint: Value = serde_json::from_str(&hint.data).unwrap();
    assert_eq!(hint["since"], seq, "{hint}");
    assert!(
        within("the stream to end", sse.next()).await.is_none(),
        "the stream ends after the hint"
    );
}

#[tokio::test]
async fn grpc_streams_end_unavailable_with_the_resume_position() {
    let mut server = TestServer::memory().await;
    let mut client = server.grpc().await;
    let mut stream = grpc_subscribe(&mut client, text_subscription("posts", None)).await;
    let body =
        json!({"type": "record.created", "collection": "posts", "record_id": "a", "data": {}});
    let seq = server.publish_json(body).await;
    assert_eq!(next_event(&mut stream).await.seq, seq);
    server.begin_stop();
    let status = within("the stream to end", stream.message())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    let since = status
        .metadata()
        .get(RESUME_SINCE)
        .expect("the resume position");
    assert_eq!(since.to_str().unwrap(), seq.to_string());
}

/// A request that never finishes (its body never arrives) holds the drain
/// only until `drain_timeout`; then the server stops anyway.
#[tokio::test]
async fn a_request_that_never_finishes_holds_the_drain_only_until_its_timeout() {
    use strom::server::ServerConfig;
    use tokio::io::AsyncWriteExt;
    let mut server = TestServer::start(ServerConfig {
        drain_timeout: std::time::Duration::from_millis(300),
        ..ServerConfig::default()
    })
    .await;
    let mut stuck = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    stuck
        .write_all(b"POST /api/v1/publish HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        .await
        .unwrap();
    // The request is in: the server answers other clients meanwhile.
    assert_eq!(server.get("/healthz").await.0, 200);
    server.begin_stop();
    server.wait_stopped().await;
    drop(stuck);
}
