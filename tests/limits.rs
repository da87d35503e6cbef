//! Publishing limits on every path: the size of an event and a user's
//! publish rate, shared by REST, gRPC and WebSocket.

mod common;

use common::*;
use serde_json::json;
use strom::engine::EngineConfig;
use strom::proto;
use strom::server::ServerConfig;
use tonic::Code;

const API_KEY: &str = "backend-key-0123456789";
const POLICY: &str = r#"
[[api_keys]]
name = "backend"
key = "backend-key-0123456789"
publish = ["*"]
subscribe = ["*"]

[[api_keys]]
name = "importer"
key = "importer-key-0123456789"
publish = ["*"]
publish_rate = 1

[[collections]]
match = "public"
subscribe = "anyone"
publish = "authenticated"
"#;

fn events(n: usize) -> String {
    let events: Vec<_> = (0..n)
        .map(|i| {
            json!({"type": "record.created", "collection": "public",
            "record_id": i.to_string(), "data": {}})
        })
        .collect();
    serde_json::Value::Array(events).to_string()
}

/// A server under [`POLICY`] with `engine`'s limits.
async fn secured(engine: EngineConfig) -> Secured {
    let config = ServerConfig {
        engine,
        ..ServerConfig::default()
    };
    Secured::start(POLICY, config).await
}

async fn publish(server: &TestServer, header: &str, body: &str) -> (u16, String) {
    let (status, _, body) = http_with(server.addr, "POST", "/api/v1/publish", header, body)
        .await
        .unwrap();
    (status, body)
}

#[tokio::test]
async fn an_event_larger_than_the_cap_is_refused_on_every_path() {
    let server = TestServer::start(ServerConfig {
        engine: EngineConfig {
            max_event_bytes: 1024,
            ..EngineConfig::default()
        },
        ..ServerConfig::default()
    })
    .await;
    let big = json!({"text": "x".repeat(2000)});
    let (status, body) = publish(
        &server,
        "",
        &json!({"type": "record.created", "collection": "posts", "data": big}).to_string(),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("larger than the limit of 1024 bytes"),
        "{body}"
    );
    let (status, body) = http_with(
        server.addr,
        "POST",
        "/api/v1/broadcast",
        "",
        &json!({"channel": "room", "data": big}).to_string(),
    )
    .await
    .map(|(status, _, body)| (status, body))
    .unwrap();
    assert_eq!(status, 400, "{body}");

    let mut client = server.grpc().await;
    let refused = client
        .publish(proto::PublishRequest {
            events: vec![created("posts", "1", big.clone())],
        })
        .await
        .expect_err("refused");
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused}");

    let mut ws = WsClient::connect(server.addr, "").await.unwrap();
    ws.send(json!({"action": "publish", "channel": "room", "data": big}))
        .await;
    ws.expect_error("larger than the limit").await;
    // Under the cap, all is well.
    server
        .publish_json(json!({"type": "record.created", "collection": "posts", "data": {"ok": 1}}))
        .await;
}

#[tokio::test]
async fn a_user_publish_budget_spans_transports_and_api_keys_without_a_rate_have_none() {
    let s = secured(EngineConfig {
        user_publish_rate: 1,
        ..EngineConfig::default()
    })
    .await;
    let server = &s.server;
    let alice = token("alice", json!({}));
    let as_alice = format!("Authorization: Bearer {alice}\r\n");
    let (status, body) = publish(server, &as_alice, &events(2)).await;
    assert_eq!(status, 429, "more at once than a second's budget: {body}");
    assert!(body.contains("publish rate limit"), "{body}");
    let (status, body) = publish(server, &as_alice, &events(1)).await;
    assert_eq!(status, 200, "{body}");
    // The budget is spent; the same user over gRPC is refused too (it
    // refills one event a second).
    let mut client = server.grpc().await;
    let request = proto::PublishRequest {
        events: vec![created("public", "g", json!({}))],
    };
    let refused = client
        .publish(authorized(request, Some(&alice)))
        .await
        .expect_err("refused");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused}");

    let (status, body) = publish(server, &format!("X-Api-Key: {API_KEY}\r\n"), &events(20)).await;
    assert_eq!(status, 200, "API keys are not limited: {body}");
}

#[tokio::test]
async fn a_connections_filters_share_one_budget_of_conditions() {
    let server = TestServer::start(ServerConfig {
        engine: EngineConfig {
            max_filter_conditions: 10,
            ..EngineConfig::default()
        },
        ..ServerConfig::default()
    })
    .await;
    let six = (0..6)
        .map(|i| format!("f{i} = {i}"))
        .collect::<Vec<_>>()
        .join(" && ");
    let mut ws = WsClient::connect(server.addr, "").await.unwrap();
    ws.subscribe_with(json!({"action": "subscribe", "collection": "posts", "filter": six}))
        .await;
    ws.send(json!({"action": "subscribe", "collection": "news", "filter": six}))
        .await;
    let refused = ws.expect_error("more than its budget of 10").await;
    assert_eq!(refused["data"]["code"], "resource_exhausted", "{refused}");
    // Giving some back makes room.
    let reply = ws
        .request(json!({"action": "unsubscribe", "collection": "posts"}))
        .await;
    assert_eq!(reply["type"], "unsubscribed", "{reply}");
    ws.subscribe_with(json!({"action": "subscribe", "collection": "news", "filter": six}))
        .await;
}

#[tokio::test]
async fn a_user_holds_a_bounded_number_of_connections_over_every_transport() {
    let s = secured(EngineConfig {
        max_connections_per_user: 2,
        ..EngineConfig::default()
    })
    .await;
    let server = &s.server;
    let alice = token("alice", json!({}));
    let as_alice = format!("?token={alice}");
    let first = WsClient::connect(server.addr, &as_alice)
        .await
        .expect("first");
    let path = format!("/api/v1/realtime/public{as_alice}");
    let mut second = SseReader::open(server.addr, &path, "").await;
    assert_eq!(second.next().await.unwrap().event, "connected");

    // A third is refused, before the WebSocket upgrade and over gRPC.
    assert_eq!(
        WsClient::connect(server.addr, &as_alice).await.err(),
        Some(429)
    );
    let mut client = server.grpc().await;
    let request = authorized(text_subscription("public", None), Some(&alice));
    let refused = client.subscribe(request).await.expect_err("refused");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused}");
    assert!(
        refused.message().contains("too many connections"),
        "{refused}"
    );

    // Another user is not affected, and a closed connection gives its place
    // back.
    let bob = format!("?token={}", token("bob", json!({})));
    WsClient::connect(server.addr, &bob).await.expect("bob");
    drop(first);
    within("alice's place to come back", async {
        while WsClient::connect(server.addr, &as_alice).await.is_err() {}
    })
    .await;
}

#[tokio::test]
async fn an_api_key_with_a_publish_rate_is_held_to_it() {
    let s = secured(EngineConfig::default()).await;
    let server = &s.server;
    let importer = "X-Api-Key: importer-key-0123456789\r\n";
    let (status, body) = publish(server, importer, &events(2)).await;
    assert_eq!(status, 429, "more at once than its second's budget: {body}");
    let (status, body) = publish(server, importer, &events(1)).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = publish(server, importer, &events(1)).await;
    assert_eq!(status, 429, "the budget is spent: {body}");
    // Another key without a rate is not held to the importer's.
    let (status, body) = publish(server, &format!("X-Api-Key: {API_KEY}\r\n"), &events(20)).await;
    assert_eq!(status, 200, "{body}");
}
