//! The WebSocket protocol of seed 000 over real sockets: every action,
//! every error, heartbeats, idle timeout and the frame size limit.

mod common;

use common::*;
use serde_json::{Value, json};
use std::time::Duration;
use strom::edge::ws::WsConfig;
use strom::server::ServerConfig;

#[tokio::test]
async fn connected_greeting_and_stats() {
    let server = TestServer::memory().await;
    let mut client = WsClient::connect(server.addr, "").await.unwrap();
    let connected = json!({"data": client.greeting.clone()});
    let id = connected["data"]["connection_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        connected["data"]["server_time"]
            .as_str()
            .unwrap()
            .ends_with('Z')
    );
    client
        .subscribe_with(json!({"action": "subscribe", "collection": "posts"}))
        .await;
    let (_, body) = server.get("/api/v1/stats").await;
    let stats: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(stats["total_connections"], 1);
    assert_eq!(stats["pubsub_backend"], "memory");
    assert_eq!(stats["subscriptions"][&id], json!(["posts"]));
    assert_eq!(stats["connections_by_transport"]["websocket"], 1);
    assert_eq!(stats["authenticated_connections"], 0);
    assert_eq!(stats["unique_users"], 0);
}

#[tokio::test]
async fn subscribe_with_every_filter_spelling_and_unsubscribe() {
    let server = TestServer::memory().await;
    let mut client = WsClient::connect(server.addr, "").await.unwrap();
    let reply = client
        .subscribe_with(
            json!({"action": "subscribe", "collection": "posts", "filter": {"published": true}}),
        )
        .await;
    assert_eq!(reply["data"]["collection"], "posts");
    assert_eq!(reply["data"]["filter"], json!({"published": true}));
    client
        .subscribe_with(
            json!({"action": "subscribe", "collection": "products", "filter": "price > 100"}),
        )
        .await;
    client
        .subscribe_with(json!({"action": "subscribe", "collection": "comments", "record_id": "c1"}))
        .await;

    server
        .publish_json(created_json("posts", "p1", json!({"published": false})))
        .await;
    server
        .publish_json(created_json("products", "x1", json!({"price": 5})))
        .await;
    server
        .publish_json(created_json("comments", "c2", json!({})))
        .await;
    let seq = server
        .publish_json(created_json("posts", "p2", json!({"published": true})))
        .await;
    let got = client.reply().await;
    assert_eq!(got["type"], "event");
    assert_eq!(got["data"]["record_id"], "p2");
    assert_eq!(got["data"]["seq"], seq);
    assert_eq!(got["data"]["collection"], "posts");
    assert_eq!(got["data"]["type"], "record.created");
    server
        .publish_json(created_json("products", "x2", json!({"price": 500})))
        .await;
    assert_eq!(client.reply().await["data"]["record_id"], "x2");
    server
        .publish_json(created_json("comments", "c1", json!({})))
        .await;
    assert_eq!(client.reply().await["data"]["record_id"], "c1");

    client
        .send(json!({"action": "unsubscribe", "collection": "posts"}))
        .await;
    let reply = client.reply().await;
    assert_eq!(
        reply,
        json!({"type": "unsubscribed", "data": {"collection": "posts"}})
    );
    server
        .publish_json(created_json("posts", "p3", json!({"published": true})))
        .await;
    server
        .publish_json(created_json("products", "x3", json!({"price": 500})))
        .await;
    assert_eq!(
        client.reply().await["data"]["record_id"],
        "x3",
        "p3 never came"
    );
}

#[tokio::test]
async fn every_error_is_reported_and_the_connection_goes_on() {
    let server = TestServer::memory().await;
    let mut client = WsClient::connect(server.addr, "").await.unwrap();
    client.send_text("{not json").await;
    client.expect_error("malformed JSON").await;
    client.send_text("[1, 2]").await;
    client.expect_error("JSON object").await;
    client.send(json!({"collection": "posts"})).await;
    client.expect_error("missing field `action`").await;
    client.send(json!({"action": "dance"})).await;
    let error = client.expect_error("unknown action \"dance\"").await;
    assert_eq!(error["data"]["code"], "invalid_argument");
    client.send(json!({"action": "subscribe"})).await;
    client.expect_error("needs a `collection`").await;
    client
        .send(json!({"action": "subscribe", "collection": "posts", "filter": "price >"}))
        .await;
    client.expect_error("column 8").await;
    client
        .send(json!({"action": "subscribe", "collection": "posts", "filter": 5}))
        .await;
    client.expect_error("`filter` must be").await;
    client
        .send(json!({"action": "subscribe", "collection": "no spaces"}))
        .await;
    client.expect_error("invalid collection name").await;
    client
        .send(json!({"action": "unsubscribe", "collection": "never"}))
        .await;
    client.expect_error("not subscribed").await;
    client.send_binary(vec![1, 2, 3]).await;
    client.expect_error("binary frames").await;
    // Still usable.
    client
        .subscribe_with(json!({"action": "subscribe", "collection": "posts"}))
        .await;
    server
        .publish_json(created_json("posts", "ok", json!({})))
        .await;
    assert_eq!(client.reply().await["data"]["record_id"], "ok");
}

/// Overlapping subscriptions on one socket get one frame per event, which
/// names the subscriptions it matched; with a single subscription the
/// frame is the plain seed one.
#[tokio::test]
async fn overlapping_subscriptions_share_one_frame_that_names_them() {
    let server = TestServer::memory().await;
    let mut client = WsClient::connect(server.addr, "").await.unwrap();
    let id_of = |reply: Value| reply["data"]["subscription_id"].as_u64().unwrap();
    let pricey = id_of(
        client
            .subscribe_with(
                json!({"action": "subscribe", "collection": "posts", "filter": "price > 10"}),
            )
            .await,
    );
    let pinned = id_of(
        client
            .subscribe_with(
                json!({"action": "subscribe", "collection": "posts", "record_id": "p1"}),
            )
            .await,
    );
    server
        .publish_json(created_json("posts", "p1", json!({"price": 50})))
        .await;
    server
        .publish_json(created_json("posts", "p2", json!({"price": 20})))
        .await;
    let both = client.reply().await;
    assert_eq!(both["data"]["record_id"], "p1", "one frame for p1: {both}");
    assert_eq!(both["subscription_ids"], json!([pricey, pinned]));
    let one = client.reply().await;
    assert_eq!(one["data"]["record_id"], "p2", "{one}");
    assert_eq!(one["subscription_ids"], json!([pricey]));

    let reply = client
        .request(json!({"action": "unsubscribe", "collection": "posts", "record_id": "p1"}))
        .await;
    assert_eq!(reply["type"], "unsubscribed");
    server
        .publish_json(created_json("posts", "p1", json!({"price": 60})))
        .await;
    let plain = client.reply().await;
    assert_eq!(plain["data"]["record_id"], "p1");
    assert!(plain.get("subscription_ids").is_none(), "{plain}");
}

#[tokio::test]
async fn resubscribing_replaces_the_subscription() {
    let server = TestServer::memory().await;
    let mut client = WsClient::connect(server.addr, "").await.unwrap();
    client
        .subscribe_with(json!({"action": "subscribe", "collection": "posts"}))
        .await;
    client
        .subscribe_with(json!({"action": "subscribe", "collection": "posts", "filter": {"n": 2}}))
        .await;
    server
        .publish_json(created_json("posts", "1", json!({"n": 1})))
        .await;
    server
        .publish_json(created_json("posts", "2", json!({"n": 2})))
        .await;
    server
        .publish_json(created_json("posts", "3", json!({"n": 2})))
        .await;
    assert_eq!(client.reply().await["data"]["record_id"], "2");
    assert_eq!(client.reply().await["data"]["record_id"], "3");
}

fn heartbeat_config(ping: u64, idle: u64) -> ServerConfig {
    ServerConfig {
        ws: WsConfig {
            ping_interval: Duration::from_millis(ping),
            idle_timeout: Duration::from_millis(idle),
            ..WsConfig::default()
        },
        ..ServerConfig::default()
    }
}

#[tokio::test]
async fn answered_pings_keep_the_connection_open() {
    let server = TestServer::start(heartbeat_config(25, 500)).await;
    let mut client = WsClient::connect(server.addr, "").await.unwrap();
    // Thirty pings span longer than the idle timeout; answering each keeps
    // the connection open.
    for _ in 0..30 {
        let ping = client.next_message().await.unwrap();
        assert_eq!(ping["type"], "ping");
        assert!(ping["data"]["timestamp"].is_string());
        client.send(json!({"action": "pong"})).await;
    }
    client
        .subscribe_with(json!({"action": "subscribe", "collection": "alive"}))
        .await;
}

#[tokio::test]
async fn a_silent_connection_is_closed_after_the_idle_timeout() {
    let server = TestServer::start(heartbeat_config(20, 100)).await;
    let mut client = WsClient::connect(server.addr, "").await.unwrap();
    let mut pings = 0;
    let error = loop {
        let message = client.next_message().await.unwrap();
        match message["type"].as_str() {
            Some("ping") => pings += 1,
            _ => break message,
        }
    };
    assert_eq!(error["type"], "error");
    assert!(error["data"]["message"].as_str().unwrap().contains("pong"));
    assert!(pings >= 1, "pings came before the close");
    assert_eq!(client.expect_close().await, 4000);
}

#[tokio::test]
async fn an_oversized_frame_is_refused_with_an_error_and_a_close() {
    let server = TestServer::start(ServerConfig {
        ws: WsConfig {
            max_frame_bytes: 1000,
            ..WsConfig::default()
        },
        ..ServerConfig::default()
    })
    .await;
    let mut client = WsClient::connect(server.addr, "").await.unwrap();
    let big = json!({"action": "subscribe", "collection": "x".repeat(1200)}).to_string();
    client.send_text(&big).await;
    client
        .expect_error("larger than the limit of 1000 bytes")
        .await;
    assert_eq!(client.expect_close().await, 1009);
    // The server is fine.
    let mut other = WsClient::connect(server.addr, "").await.unwrap();
    other
        .subscribe_with(json!({"action": "subscribe", "collection": "posts"}))
        .await;
}

#[tokio::test]
async fn auth_without_configuration_is_an_error() {
    let server = TestServer::memory().await;
    let mut client = WsClient::connect(server.addr, "").await.unwrap();
    client.send(json!({"action": "auth", "token": "abc"})).await;
    client.expect_error("not configured to verify tokens").await;
}

#[tokio::test]
async fn shutdown_asks_clients_to_reconnect_and_closes_with_service_restart() {
    let mut server = TestServer::memory().await;
    let mut client = WsClient::connect(server.addr, "").await.unwrap();
    client
        .subscribe_with(json!({"action": "subscribe", "collection": "posts"}))
        .await;
    server.begin_stop();
    let hint = client.reply().await;
    assert_eq!(hint["type"], "reconnect", "{hint}");
    assert_eq!(hint["data"]["since"], Value::Null, "nothing was received");
    assert_eq!(client.expect_close().await, 1012);
}
