//! Broadcast channels: a chat between WebSocket clients on two nodes of a
//! real nats-server, with authorization, limits and echo control; the same
//! channel read over SSE and gRPC.

mod common;

use common::*;
use jsonwebtoken::Algorithm;
use serde_json::{Map, Value, json};
use std::time::Duration;
use strom::auth::AuthSettings;
use strom::auth::token::mint;
use strom::bus::nats::NatsConfig;
use strom::engine::EngineConfig;
use strom::proto;
use strom::server::ServerConfig;

const SECRET: &str = "channel-test-secret-0123456789-abcdef";
const API_KEY: &str = "chat-bot-key-0123456789";
const POLICY: &str = r#"
[[api_keys]]
name = "bot"
key = "chat-bot-key-0123456789"
publish = ["chat.*"]

[[collections]]
match = "chat.*"
subscribe = "authenticated"
publish = "authenticated"

[[collections]]
match = "admin.*"
subscribe = "claim:role=admin"
publish = "claim:role=admin"
"#;

fn token(sub: &str) -> String {
    mint(
        Algorithm::HS256,
        SECRET.as_bytes(),
        sub,
        Map::new(),
        Duration::from_secs(600),
    )
    .unwrap()
}

fn config(policy: &TempDir, nats: Option<&NatsServer>, engine: EngineConfig) -> ServerConfig {
    let path = policy.0.join("policy.toml");
    std::fs::write(&path, POLICY).unwrap();
    ServerConfig {
        nats: nats.map(|n| NatsConfig::new(n.url.clone())),
        engine,
        auth: AuthSettings {
            config_file: Some(path),
            jwt_secret: Some(SECRET.into()),
            ..AuthSettings::default()
        },
        ..ServerConfig::default()
    }
}

async fn join(server: &TestServer, user: &str, channel: &str) -> WsClient {
    let mut client = WsClient::connect(server.addr, &format!("?token={}", token(user)))
        .await
        .unwrap();
    let reply = client
        .request(json!({"action": "subscribe", "channel": channel}))
        .await;
    assert_eq!(reply["type"], "subscribed", "{reply}");
    client
}

/// The next broadcast message: (sender, text).
async fn message(client: &mut WsClient) -> (String, String) {
    let m = client.next().await.expect("connected");
    assert_eq!(m["type"], "event", "{m}");
    assert_eq!(m["data"]["type"], "broadcast", "{m}");
    (
        m["data"]["sender"].as_str().unwrap().to_owned(),
        m["data"]["data"]["text"].as_str().unwrap().to_owned(),
    )
}

fn say(channel: &str, text: &str) -> Value {
    json!({"action": "publish", "channel": channel, "data": {"text": text}})
}

#[tokio::test]
async fn a_chat_across_two_nodes_with_echo_control_sse_and_grpc() {
    let nats = NatsServer::start();
    let policy = TempDir::new("chat");
    let a = TestServer::start(config(&policy, Some(&nats), EngineConfig::default())).await;
    let b = TestServer::start(config(&policy, Some(&nats), EngineConfig::default())).await;
    let mut alice = join(&a, "alice", "chat.room1").await;
    let mut bob = join(&b, "bob", "chat.room1").await;
    let mut sse = SseReader::open(
        a.addr,
        &format!(
            "/api/v1/realtime/channel/chat.room1?token={}",
            token("carol")
        ),
        "",
    )
    .await;
    assert_eq!(sse.next().await.unwrap().event, "connected");
    let mut grpc = a.grpc().await;
    let mut request = tonic::Request::new(text_subscription("chat.room1", None));
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", token("dave")).parse().unwrap(),
    );
    let mut stream = grpc.subscribe(request).await.unwrap().into_inner();
    stream.message().await.unwrap().unwrap(); // subscribed

    let ack = alice
        .request(json!({"action": "publish", "channel": "chat.room1", "data": {"text": "hi bob"}, "ack": true}))
        .await;
    assert_eq!(ack["type"], "ack");
    assert_eq!(ack["data"]["channel"], "chat.room1");
    let seq = ack["data"]["seq"].as_u64().unwrap();
    assert_eq!(message(&mut bob).await, ("alice".into(), "hi bob".into()));
    bob.send(say("chat.room1", "hi alice")).await;
    assert_eq!(
        message(&mut alice).await,
        ("bob".into(), "hi alice".into()),
        "alice's own message did not come back to her"
    );
    let event = sse.next_of("broadcast").await;
    assert_eq!(event.id, Some(seq.to_string()));
    let data: Value = serde_json::from_str(&event.data).unwrap();
    assert_eq!(data["channel"], "chat.room1");
    assert_eq!(data["sender"], "alice");
    let first = next_event(&mut stream).await;
    assert_eq!((first.sender.as_str(), first.seq), ("alice", seq));
    assert_eq!(first.r#type, proto::EventType::Broadcast as i32);

    // With echo on, a sender hears itself.
    alice
        .request(json!({"action": "subscribe", "channel": "chat.room1", "echo": true}))
        .await;
    alice.send(say("chat.room1", "echo?")).await;
    assert_eq!(message(&mut alice).await, ("alice".into(), "echo?".into()));

    // A service posts through REST.
    let (status, body) = http(
        a.addr,
        "POST",
        &format!("/api/v1/broadcast?token={API_KEY}"),
        &json!({"channel": "chat.room1", "payload": {"text": "beep"}}).to_string(),
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        message(&mut bob).await,
        ("alice".into(), "echo?".into()),
        "bob's own \"hi alice\" never came back to him"
    );
    assert_eq!(
        message(&mut bob).await,
        ("apikey:bot".into(), "beep".into())
    );

    // Presence per channel, seen from the other node.
    within("bob to see alice in the room", async {
        loop {
            let (_, body) = http(
                b.addr,
                "GET",
                &format!("/api/v1/presence?channel=chat.room1&token={}", token("bob")),
                "",
            )
            .await
            .unwrap();
            if body.contains(r#""user_id":"alice""#) && body.contains(r#""user_id":"bob""#) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;

    // History: a late reader catches up on the channel.
    let mut request = tonic::Request::new(proto::SubscribeRequest {
        since_seq: Some(0),
        ..text_subscription("chat.room1", None)
    });
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", token("erin")).parse().unwrap(),
    );
    let mut late = b
        .grpc()
        .await
        .subscribe(request)
        .await
        .unwrap()
        .into_inner();
    late.message().await.unwrap().unwrap();
    assert_eq!(next_event(&mut late).await.seq, seq);
}

#[tokio::test]
async fn denied_sends_and_receives_and_limits_keep_the_connection() {
    let policy = TempDir::new("limits");
    let server = TestServer::start(config(
        &policy,
        None,
        EngineConfig {
            client_publish_rate: 2,
            client_message_bytes: 200,
            ..EngineConfig::default()
        },
    ))
    .await;
    let mut alice = join(&server, "alice", "chat.room1").await;
    let denied = alice.request(say("admin.ops", "let me in")).await;
    assert_eq!(denied["type"], "error");
    assert_eq!(denied["data"]["code"], "permission_denied");
    let denied = alice
        .request(json!({"action": "subscribe", "channel": "admin.ops"}))
        .await;
    assert_eq!(denied["data"]["code"], "permission_denied");
    let mut anonymous = WsClient::connect(server.addr, "").await.unwrap();
    let denied = anonymous.request(say("chat.room1", "anyone?")).await;
    assert_eq!(denied["data"]["code"], "unauthenticated");

    let big =
        json!({"action": "publish", "channel": "chat.room1", "data": {"text": "x".repeat(300)}});
    let too_big = alice.request(big).await;
    assert_eq!(too_big["data"]["code"], "invalid_argument");
    assert!(
        too_big["data"]["message"]
            .as_str()
            .unwrap()
            .contains("limit of 200 bytes")
    );

    // The bucket holds two; the third in a burst is refused. (Attempts
    // count, refused or not, so a fresh connection.)
    let mut alice = join(&server, "alice", "chat.room1").await;
    let mut errors = Vec::new();
    for i in 0..3 {
        let reply = alice
            .request(json!({"action": "publish", "channel": "chat.room1", "data": {"text": i.to_string()}, "ack": true}))
            .await;
        if reply["type"] == "error" {
            errors.push(reply);
        }
    }
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0]["data"]["code"], "resource_exhausted");
    assert!(
        errors[0]["data"]["message"]
            .as_str()
            .unwrap()
            .contains("at most 2 messages per second")
    );
    // Still connected and usable.
    let reply = alice
        .request(json!({"action": "subscribe", "channel": "chat.room2"}))
        .await;
    assert_eq!(reply["type"], "subscribed");
}
