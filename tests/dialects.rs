//! The seed dialects over real sockets, with exactly the frames their
//! clients send: Fluxbase (seed 002) at `/realtime` and better-query
//! (seed 004) at `/better-query/realtime`, their REST endpoints, bad input
//! and authentication. (Fluxbase with Postgres capture: tests/postgres.rs.)

mod common;

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::time::Duration;
use strom::edge::ws::WsConfig;
use strom::server::ServerConfig;
use tokio_tungstenite::tungstenite::Message;

/// A dialect client: JSON text frames on a raw WebSocket.
struct Client {
    socket: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
}

impl Client {
    /// Connects to `path` (query included); an HTTP refusal is its status
    /// and body.
    async fn connect(addr: SocketAddr, path: &str) -> Result<Client, (u16, String)> {
        match tokio_tungstenite::connect_async(format!("ws://{addr}{path}")).await {
            Ok((socket, _)) => Ok(Client { socket }),
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                let body = response
                    .body()
                    .as_ref()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default();
                Err((response.status().as_u16(), body))
            }
            Err(other) => panic!("{other}"),
        }
    }

    async fn send(&mut self, frame: Value) {
        self.send_text(&frame.to_string()).await;
    }

    async fn send_text(&mut self, text: &str) {
        self.socket.send(Message::text(text)).await.unwrap();
    }

    /// The next JSON frame; a close frame reads as `{"type": "close",
    /// "code": N}`.
    async fn next(&mut self) -> Value {
        loop {
            let message = within("a frame", self.socket.next())
                .await
                .expect("the socket is open")
                .expect("a frame");
            match message {
                Message::Text(text) => return serde_json::from_str(&text).unwrap(),
                Message::Close(frame) => {
                    return json!({"type": "close", "code": frame.map(|f| u16::from(f.code))});
                }
                _ => continue,
            }
        }
    }

    /// The next frame, without its `timestamp` (checked to be epoch ms).
    async fn next_stamped(&mut self) -> Value {
        let mut frame = self.next().await;
        let stamp = frame
            .as_object_mut()
            .unwrap()
            .remove("timestamp")
            .unwrap_or_else(|| panic!("no timestamp in {frame}"));
        assert!(stamp.as_u64().unwrap() > 1_600_000_000_000, "{stamp}");
        frame
    }
}

/// The next frame that is not a presence update (joins of the test's
/// users come and go beside what a test looks at).
async fn next_change(client: &mut Client) -> Value {
    loop {
        let frame = client.next_stamped().await;
        if frame["type"] != "presence_update" {
            return frame;
        }
    }
}

fn config_with_ping(ping: Duration) -> ServerConfig {
    ServerConfig {
        ws: WsConfig {
            ping_interval: ping,
            ..WsConfig::default()
        },
        ..ServerConfig::default()
    }
}

// ---------------------------------------------------------------- Fluxbase

/// The seed's sequence: subscribe to a table, receive INSERT, UPDATE and
/// DELETE as it shows them, unsubscribe.
#[tokio::test]
async fn fluxbase_table_changes_arrive_as_the_seed_shows() {
    let server = TestServer::memory().await;
    let mut client = Client::connect(server.addr, "/realtime").await.unwrap();
    client
        .send(json!({"type": "subscribe", "channel": "table:public.products"}))
        .await;
    assert_eq!(
        client.next().await,
        json!({"type": "ack", "channel": "table:public.products", "payload": {"subscribed": true}})
    );

    let new = json!({"id": 123, "name": "New Product", "price": 99.99});
    let updated = json!({"id": 123, "name": "Updated Product", "price": 149.99});
    for event in [
        json!({"type": "record.created", "collection": "public.products", "record_id": "123", "data": new}),
        json!({"type": "record.updated", "collection": "public.products", "record_id": "123", "data": updated, "old_data": new}),
        json!({"type": "record.deleted", "collection": "public.products", "record_id": "123", "data": updated}),
    ] {
        server.publish_json(event).await;
    }
    let change = |payload: Value| json!({"type": "broadcast", "channel": "table:public.products", "payload": payload});
    assert_eq!(
        client.next().await,
        change(json!({"type": "INSERT", "table": "products", "schema": "public", "record": new}))
    );
    assert_eq!(
        client.next().await,
        change(
            json!({"type": "UPDATE", "table": "products", "schema": "public", "record": updated, "old_record": new})
        )
    );
    assert_eq!(
        client.next().await,
        change(
            json!({"type": "DELETE", "table": "products", "schema": "public", "record": null, "old_record": updated})
        )
    );

    client
        .send(json!({"type": "unsubscribe", "channel": "table:public.products"}))
        .await;
    assert_eq!(
        client.next().await,
        json!({"type": "ack", "channel": "table:public.products", "payload": {"subscribed": false}})
    );
    // Answered the same when the channel was not subscribed.
    client
        .send(json!({"type": "unsubscribe", "channel": "table:public.orders"}))
        .await;
    assert_eq!(client.next().await["payload"], json!({"subscribed": false}));
}

/// A channel without `table:` is a strom channel: its messages arrive as
/// `broadcast` with their data as the payload. Stats count the dialect.
#[tokio::test]
async fn fluxbase_strom_channels_and_stats() {
    let server = TestServer::memory().await;
    let mut client = Client::connect(server.addr, "/realtime").await.unwrap();
    for channel in ["chat", "table:public.products"] {
        client
            .send(json!({"type": "subscribe", "channel": channel}))
            .await;
        assert_eq!(client.next().await["payload"]["subscribed"], true);
    }
    server
        .publish_json(json!({"type": "broadcast", "collection": "chat", "data": {"text": "hi"}}))
        .await;
    assert_eq!(
        client.next().await,
        json!({"type": "broadcast", "channel": "chat", "payload": {"text": "hi"}})
    );

    let (status, body) = server.get("/api/realtime/stats").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!({"connections": 1, "channels": 2})
    );
    let (_, body) = server.get("/api/v1/stats").await;
    let stats: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(stats["connections_by_transport"]["fluxbase"], 1, "{stats}");
    let (_, metrics) = server.get("/metrics").await;
    assert!(
        metrics.contains("strom_connections{transport=\"fluxbase\"} 1"),
        "{metrics}"
    );
}

/// Bad frames get an `error` frame and the socket stays open; a client
/// heartbeat is never answered (the SDK would echo it forever).
#[tokio::test]
async fn fluxbase_bad_frames_get_an_error_and_heartbeats_no_echo() {
    let server = TestServer::memory().await;
    let mut client = Client::connect(server.addr, "/realtime").await.unwrap();
    for (frame, error) in [
        ("{not json", "malformed JSON"),
        (r#"{"type":"dance"}"#, "unknown message type \"dance\""),
        (r#"{"type":"subscribe"}"#, "missing field `channel`"),
        (r#"["subscribe"]"#, "a message must be a JSON object"),
        (
            r#"{"type":"subscribe","channel":"table:public.bad name"}"#,
            "only letters, digits",
        ),
    ] {
        client.send_text(frame).await;
        let reply = client.next().await;
        assert_eq!(reply["type"], "error", "{reply}");
        let message = reply["error"].as_str().unwrap();
        assert!(message.contains(error), "{message:?} lacks {error:?}");
    }
    client.send(json!({"type": "heartbeat"})).await;
    client
        .send(json!({"type": "subscribe", "channel": "table:public.products"}))
        .await;
    // The ack comes next: the heartbeat got no reply.
    assert_eq!(client.next().await["type"], "ack");
}

/// The server sends its own heartbeat on a timer.
#[tokio::test]
async fn fluxbase_server_sends_heartbeats() {
    let server = TestServer::start(config_with_ping(Duration::from_millis(100))).await;
    let mut client = Client::connect(server.addr, "/realtime").await.unwrap();
    assert_eq!(client.next().await, json!({"type": "heartbeat"}));
    client.send(json!({"type": "heartbeat"})).await;
    assert_eq!(client.next().await, json!({"type": "heartbeat"}));
}

const POLICY: &str = r#"
[[api_keys]]
name = "backend"
key = "backend-key-0123456789"
publish = ["*"]
subscribe = ["*"]

[[collections]]
match = "public.products"
subscribe = "anyone"

[[collections]]
match = "post"
subscribe = "authenticated"
publish = "authenticated"

[[collections]]
match = "notifications"
subscribe = "authenticated"
publish = "authenticated"

[[collections]]
match = "admin"
subscribe = "claim:role=admin"
"#;

/// A bad token is refused before the upgrade with 401 and `{"error"}`; a
/// plain GET gets 426; a channel the policy denies gets an error frame.
#[tokio::test]
async fn fluxbase_auth_and_policy() {
    let secured = Secured::start(POLICY, ServerConfig::default()).await;
    let addr = secured.server.addr;
    let (status, body) = Client::connect(addr, "/realtime?token=not.a.jwt")
        .await
        .err()
        .expect("refused");
    assert_eq!(status, 401);
    let body: Value = serde_json::from_str(&body).unwrap();
    assert!(body["error"].is_string(), "{body}");
    let (status, body) = secured.server.get("/realtime").await;
    assert_eq!(status, 426, "{body}");
    assert!(serde_json::from_str::<Value>(&body).unwrap()["error"].is_string());

    // Anonymous: the policy lets anyone read products, nobody else read posts.
    let mut anonymous = Client::connect(addr, "/realtime").await.unwrap();
    anonymous
        .send(json!({"type": "subscribe", "channel": "table:public.products"}))
        .await;
    assert_eq!(anonymous.next().await["payload"]["subscribed"], true);
    anonymous
        .send(json!({"type": "subscribe", "channel": "post"}))
        .await;
    let reply = anonymous.next().await;
    assert_eq!(reply["type"], "error", "{reply}");

    let token = token("alice", json!({}));
    let mut alice = Client::connect(addr, &format!("/realtime?token={token}"))
        .await
        .unwrap();
    alice
        .send(json!({"type": "subscribe", "channel": "post"}))
        .await;
    assert_eq!(alice.next().await["payload"]["subscribed"], true);
    alice
        .send(json!({"type": "subscribe", "channel": "admin"}))
        .await;
    assert_eq!(alice.next().await["type"], "error");
}

// ------------------------------------------------------------ better-query

fn bq_path(token: &str) -> String {
    format!("/better-query/realtime?token={token}")
}

async fn bq_subscribe(client: &mut Client, channel: &str) {
    client
        .send(json!({"type": "subscribe", "channel": channel}))
        .await;
    assert_eq!(
        client.next_stamped().await,
        json!({"type": "subscribed", "channel": channel})
    );
}

/// Resource and record channels: `data_change` frames as the seed shows,
/// each stamped; a delete carries no data.
#[tokio::test]
async fn better_query_resource_and_record_changes() {
    let secured = Secured::start(POLICY, ServerConfig::default()).await;
    let server = &secured.server;
    let mut client = Client::connect(server.addr, &bq_path(&token("alice", json!({}))))
        .await
        .unwrap();
    bq_subscribe(&mut client, "resource:post").await;
    let mut record = Client::connect(server.addr, &bq_path(&token("bob", json!({}))))
        .await
        .unwrap();
    bq_subscribe(&mut record, "post:p2").await;

    let backend = "X-Api-Key: backend-key-0123456789\r\n";
    for event in [
        json!({"type": "record.created", "collection": "post", "record_id": "p1", "data": {"title": "one"}}),
        json!({"type": "record.updated", "collection": "post", "record_id": "p2", "data": {"title": "two"}}),
        json!({"type": "record.deleted", "collection": "post", "record_id": "p2", "data": {"title": "two"}}),
    ] {
        let (status, _, body) = http_with(
            server.addr,
            "POST",
            "/api/v1/publish",
            backend,
            &event.to_string(),
        )
        .await
        .unwrap();
        assert_eq!(status, 200, "{body}");
    }
    let change = |channel: &str, payload: Value| json!({"type": "data_change", "channel": channel, "payload": payload});
    assert_eq!(
        next_change(&mut client).await,
        change(
            "resource:post",
            json!({"resource": "post", "operation": "create", "data": {"title": "one"}, "id": "p1"})
        )
    );
    assert_eq!(
        next_change(&mut client).await["payload"]["operation"],
        "update"
    );
    assert_eq!(
        next_change(&mut client).await["payload"],
        json!({"resource": "post", "operation": "delete", "data": null, "id": "p2"})
    );
    // The record channel sees p2 only.
    assert_eq!(
        next_change(&mut record).await,
        change(
            "post:p2",
            json!({"resource": "post", "operation": "update", "data": {"title": "two"}, "id": "p2"})
        )
    );
    assert_eq!(
        next_change(&mut record).await["payload"]["operation"],
        "delete"
    );
}

/// Two users on one channel: each sees joins and leaves with the channel
/// named, metadata from the token, and `onlineUsers` after the change.
#[tokio::test]
async fn better_query_presence_with_two_users() {
    let secured = Secured::start(POLICY, ServerConfig::default()).await;
    let addr = secured.server.addr;
    let alice_token = token("alice", json!({"name": "Alice"}));
    let mut alice = Client::connect(addr, &bq_path(&alice_token)).await.unwrap();
    bq_subscribe(&mut alice, "resource:post").await;
    let alice_user = json!({"userId": "alice", "metadata": {"name": "Alice"}});
    let bob_user = json!({"userId": "bob", "metadata": {"name": "Bob"}});
    let update = |action: &str, user: &Value, online: Value| {
        let mut payload = user.clone();
        payload["action"] = json!(action);
        payload["onlineUsers"] = online;
        json!({"type": "presence_update", "channel": "resource:post", "payload": payload})
    };
    assert_eq!(
        alice.next_stamped().await,
        update("join", &alice_user, json!([alice_user]))
    );

    let mut bob = Client::connect(addr, &bq_path(&token("bob", json!({"name": "Bob"}))))
        .await
        .unwrap();
    bq_subscribe(&mut bob, "resource:post").await;
    let both = json!([alice_user, bob_user]);
    assert_eq!(
        alice.next_stamped().await,
        update("join", &bob_user, both.clone())
    );
    assert_eq!(bob.next_stamped().await, update("join", &bob_user, both));

    let (status, body) = http(
        addr,
        "GET",
        &format!("/better-query/realtime/channel/users?channel=resource:post&token={alice_token}"),
        "",
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!({"channel": "resource:post", "users": [alice_user, bob_user], "count": 2})
    );

    drop(bob);
    assert_eq!(
        alice.next_stamped().await,
        update("leave", &bob_user, json!([alice_user]))
    );
}

/// A client broadcast reaches every other subscriber of the channel, not
/// the sender; heartbeats are answered; REST broadcast and stats work.
#[tokio::test]
async fn better_query_broadcast_heartbeat_and_rest() {
    let secured = Secured::start(POLICY, ServerConfig::default()).await;
    let addr = secured.server.addr;
    let alice_token = token("alice", json!({}));
    let mut alice = Client::connect(addr, &bq_path(&alice_token)).await.unwrap();
    let mut bob = Client::connect(addr, &bq_path(&token("bob", json!({}))))
        .await
        .unwrap();
    for client in [&mut alice, &mut bob] {
        bq_subscribe(client, "notifications").await;
    }
    // Skip the presence frames: alice sees two joins, bob one.
    for _ in 0..2 {
        assert_eq!(alice.next_stamped().await["type"], "presence_update");
    }
    assert_eq!(bob.next_stamped().await["type"], "presence_update");

    alice
        .send(json!({"type": "broadcast", "channel": "notifications", "payload": {"type": "alert", "message": "New feature available!"}, "timestamp": 1}))
        .await;
    assert_eq!(
        bob.next_stamped().await,
        json!({"type": "broadcast", "channel": "notifications", "payload": {"type": "alert", "message": "New feature available!"}})
    );
    // Alice's next frame answers her heartbeat: her broadcast did not echo.
    alice
        .send(json!({"type": "heartbeat", "timestamp": 2}))
        .await;
    assert_eq!(alice.next_stamped().await, json!({"type": "heartbeat"}));

    let (status, _, body) = http_with(
        addr,
        "POST",
        "/better-query/realtime/broadcast",
        &format!("Authorization: Bearer {alice_token}\r\n"),
        &json!({"channel": "notifications", "payload": {"message": "Hello!"}}).to_string(),
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!({"success": true, "channel": "notifications"})
    );
    for client in [&mut alice, &mut bob] {
        assert_eq!(
            client.next_stamped().await,
            json!({"type": "broadcast", "channel": "notifications", "payload": {"message": "Hello!"}})
        );
    }

    let (status, _, body) = http_with(
        addr,
        "GET",
        "/better-query/realtime/stats",
        "X-Api-Key: backend-key-0123456789\r\n",
        "",
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");
    let stats: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(stats["connected"], 2, "{stats}");
    assert_eq!(stats["channels"][0]["name"], "notifications");
    assert_eq!(stats["channels"][0]["clients"], 2);
    assert_eq!(
        stats["channels"][0]["onlineUsers"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    // Without an ops credential, stats are refused.
    let (status, body) = http(addr, "GET", "/better-query/realtime/stats", "")
        .await
        .unwrap();
    assert_eq!(status, 401, "{body}");
}

/// Bad frames, denied channels and a bad token, each with the dialect's
/// error; the connection survives bad frames.
#[tokio::test]
async fn better_query_bad_input_and_auth() {
    let secured = Secured::start(POLICY, ServerConfig::default()).await;
    let addr = secured.server.addr;
    let (status, _) = Client::connect(addr, &bq_path("bad.token.here"))
        .await
        .err()
        .expect("refused");
    assert_eq!(status, 401);

    let mut client = Client::connect(addr, &bq_path(&token("carol", json!({}))))
        .await
        .unwrap();
    for (frame, error) in [
        ("nope", "malformed JSON"),
        (r#"{"type":"join"}"#, "unknown message type \"join\""),
        (r#"{"type":"unsubscribe"}"#, "missing field `channel`"),
        (
            r#"{"type":"broadcast","channel":"notifications","payload":"hi"}"#,
            "`payload` must be a JSON object",
        ),
        (r#"{"type":"subscribe","channel":"admin"}"#, "admin"),
        (
            r#"{"type":"broadcast","channel":"admin","payload":{}}"#,
            "admin",
        ),
    ] {
        client.send_text(frame).await;
        let reply = client.next_stamped().await;
        assert_eq!(reply["type"], "error", "{frame}: {reply}");
        let message = reply["payload"]["message"].as_str().unwrap();
        assert!(message.contains(error), "{message:?} lacks {error:?}");
    }
    bq_subscribe(&mut client, "post:p1").await;

    // Anonymous REST broadcast on an authenticated channel is refused.
    let (status, body) = http(
        addr,
        "POST",
        "/better-query/realtime/broadcast",
        &json!({"channel": "notifications", "payload": {}}).to_string(),
    )
    .await
    .unwrap();
    assert_eq!(status, 401, "{body}");
    assert!(serde_json::from_str::<Value>(&body).unwrap()["error"].is_string());
}

/// A client that sends no heartbeat for twice the interval is closed.
#[tokio::test]
async fn better_query_ends_a_silent_client() {
    let server = TestServer::start(config_with_ping(Duration::from_millis(100))).await;
    let mut client = Client::connect(server.addr, "/better-query/realtime")
        .await
        .unwrap();
    let error = client.next_stamped().await;
    assert_eq!(error["type"], "error", "{error}");
    assert_eq!(client.next().await, json!({"type": "close", "code": 4000}));
}
