//! Presence: joins and leaves on one node and across a cluster of strom
//! processes on a real nats-server, including a node killed with SIGKILL.

mod common;

use common::*;
use serde_json::{Value, json};
use strom::proto;

/// Waits for the next presence event and returns (type, user, channel).
async fn presence_event(watcher: &mut WsClient) -> (String, String, Value) {
    loop {
        let message = watcher.next().await.expect("the watcher stays connected");
        if message["type"] == "event" && message["data"]["collection"] == "presence" {
            let data = &message["data"];
            assert_eq!(data["seq"], 0, "presence events are not in the log");
            return (
                data["type"].as_str().unwrap().to_owned(),
                data["data"]["user_id"].as_str().unwrap().to_owned(),
                data["data"]["channel"].clone(),
            );
        }
    }
}

fn joined(user: &str, channel: Value) -> (String, String, Value) {
    ("user.joined".into(), user.into(), channel)
}

fn left(user: &str, channel: Value) -> (String, String, Value) {
    ("user.left".into(), user.into(), channel)
}

async fn presence_json(addr: std::net::SocketAddr, query: &str) -> Value {
    let (status, body) = http(addr, "GET", &format!("/api/v1/presence{query}"), "")
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

#[tokio::test]
async fn one_node_joins_and_leaves_once_per_user_on_every_surface() {
    let server = TestServer::memory().await;
    let mut watcher = WsClient::connect(server.addr, "").await.unwrap();
    watcher.subscribe("presence").await;

    let mut tab1 = WsClient::connect(server.addr, "?user_id=bob&user_name=Bob")
        .await
        .unwrap();
    assert_eq!(
        presence_event(&mut watcher).await,
        joined("bob", Value::Null)
    );
    tab1.subscribe("posts").await;
    assert_eq!(
        presence_event(&mut watcher).await,
        joined("bob", json!("posts"))
    );
    let mut tab2 = WsClient::connect(server.addr, "?user_id=bob")
        .await
        .unwrap();
    tab2.subscribe("posts").await;

    let snapshot = presence_json(server.addr, "").await;
    assert_eq!(snapshot["count"], 1);
    assert_eq!(snapshot["users"][0]["user_id"], "bob");
    assert_eq!(snapshot["users"][0]["user_name"], "Bob");
    assert_eq!(snapshot["users"][0]["connections"], 2);
    assert!(snapshot["users"][0]["last_seen"].is_string());
    let posts = presence_json(server.addr, "?channel=posts").await;
    assert_eq!(posts["count"], 1);
    assert_eq!(posts["channel"], "posts");
    assert_eq!(
        presence_json(server.addr, "?channel=other").await["count"],
        0
    );

    let mut client = server.grpc().await;
    let snapshot = client
        .get_presence(proto::GetPresenceRequest {
            channel: "posts".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(snapshot.count, 1);
    assert_eq!(snapshot.users[0].user_id, "bob");
    assert_eq!(snapshot.users[0].connections, 2);
    let mut watch = client
        .watch_presence(proto::WatchPresenceRequest::default())
        .await
        .unwrap()
        .into_inner();
    let first = within("the snapshot", watch.message())
        .await
        .unwrap()
        .unwrap();
    let Some(proto::presence_update::Kind::Snapshot(s)) = first.kind else {
        panic!("snapshot first, got {first:?}");
    };
    assert_eq!(s.count, 1);

    // One tab closing is not leaving.
    tab1.close().await;
    // SSE presence (seed 001): `user_id=` on the stream of all collections.
    let mut sse = SseReader::open(server.addr, "/api/v1/realtime?user_id=carol", "").await;
    assert_eq!(sse.next().await.unwrap().event, "connected");
    assert_eq!(
        presence_event(&mut watcher).await,
        joined("carol", Value::Null)
    );
    let update = within("a change", watch.message()).await.unwrap().unwrap();
    let Some(proto::presence_update::Kind::Joined(user)) = update.kind else {
        panic!("carol joined, got {update:?}");
    };
    assert_eq!(user.user_id, "carol");
    // The SSE stream itself gets presence events, without an `id:`.
    let mut other = SseReader::open(server.addr, "/api/v1/realtime?user_id=dan", "").await;
    assert_eq!(other.next().await.unwrap().event, "connected");
    // Carol's own join may reach her stream too: it was still being
    // dispatched when the stream subscribed.
    let seen = loop {
        let seen = sse.next_of("user.joined").await;
        if !seen.data.contains(r#""user_id":"carol""#) {
            break seen;
        }
    };
    assert!(seen.data.contains(r#""user_id":"dan""#), "{}", seen.data);
    assert_eq!(seen.id, None);
    assert_eq!(
        presence_event(&mut watcher).await,
        joined("dan", Value::Null)
    );

    tab2.close().await;
    assert_eq!(
        presence_event(&mut watcher).await,
        left("bob", json!("posts"))
    );
    assert_eq!(presence_event(&mut watcher).await, left("bob", Value::Null));
    let update = within("a change", watch.message()).await.unwrap().unwrap();
    let Some(proto::presence_update::Kind::Joined(user)) = update.kind else {
        panic!("dan joined, got {update:?}");
    };
    assert_eq!(user.user_id, "dan");
    let update = within("a change", watch.message()).await.unwrap().unwrap();
    let Some(proto::presence_update::Kind::Left(user)) = update.kind else {
        panic!("bob left, got {update:?}");
    };
    assert_eq!(user.user_id, "bob");
}

fn node_args(nats: &NatsServer) -> Vec<String> {
    vec![
        "--nats-url".into(),
        nats.url.clone(),
        "--presence-heartbeat".into(),
        "200ms".into(),
        "--presence-timeout".into(),
        "1s".into(),
    ]
}

fn start_node(nats: &NatsServer) -> StromProcess {
    let args = node_args(nats);
    StromProcess::start(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

#[tokio::test]
async fn a_cluster_agrees_on_presence_and_forgets_a_killed_node() {
    let nats = NatsServer::start();
    let a = start_node(&nats);
    let mut b = start_node(&nats);
    let mut on_a = WsClient::connect(a.addr, "").await.unwrap();
    on_a.subscribe("presence").await;
    let mut on_b = WsClient::connect(b.addr, "").await.unwrap();
    on_b.subscribe("presence").await;

    // Alice on B is seen from A and from B.
    let alice_b = WsClient::connect(b.addr, "?user_id=alice").await.unwrap();
    assert_eq!(
        presence_event(&mut on_a).await,
        joined("alice", Value::Null)
    );
    assert_eq!(
        presence_event(&mut on_b).await,
        joined("alice", Value::Null)
    );
    // A second connection on A is not a second join; closing the one on B
    // is not a leave, since she is still on A.
    let alice_a = WsClient::connect(a.addr, "?user_id=alice").await.unwrap();
    // Once both nodes count both connections...
    for node in [a.addr, b.addr] {
        within("both nodes to count two connections", async {
            while presence_json(node, "").await["users"][0]["connections"] != 2 {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        })
        .await;
    }
    alice_b.close().await;
    let _dave = WsClient::connect(b.addr, "?user_id=dave&user_name=Dave")
        .await
        .unwrap();
    assert_eq!(
        presence_event(&mut on_a).await,
        joined("dave", Value::Null),
        "no leave for alice came before dave's join"
    );
    assert_eq!(presence_event(&mut on_b).await, joined("dave", Value::Null));
    alice_a.close().await;
    assert_eq!(presence_event(&mut on_a).await, left("alice", Value::Null));
    assert_eq!(presence_event(&mut on_b).await, left("alice", Value::Null));

    // A node started late learns the state.
    let c = start_node(&nats);
    within("the late node to learn of dave", async {
        loop {
            let snapshot = presence_json(c.addr, "").await;
            if snapshot["count"] == 1 && snapshot["users"][0]["user_id"] == "dave" {
                assert_eq!(snapshot["users"][0]["user_name"], "Dave");
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await;

    // B dies without a goodbye: its users leave everywhere else.
    b.kill();
    assert_eq!(presence_event(&mut on_a).await, left("dave", Value::Null));
    within("the late node to forget dave", async {
        loop {
            if presence_json(c.addr, "").await["count"] == 0 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await;
}

/// `presence` is reserved, open mode included: every publish path refuses
/// it (400 / INVALID_ARGUMENT), so WatchPresence reports only real joins.
#[tokio::test]
async fn nobody_can_publish_fake_presence_events() {
    let server = TestServer::memory().await;
    let mut client = server.grpc().await;
    let mut watch = client
        .watch_presence(proto::WatchPresenceRequest::default())
        .await
        .unwrap()
        .into_inner();
    let first = within("the snapshot", watch.message())
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(
        first.kind,
        Some(proto::presence_update::Kind::Snapshot(_))
    ));

    let fake = json!({"type": "user.joined", "collection": "presence", "record_id": "mallory",
        "data": {"user_id": "mallory", "connections": 1, "channel": null}});
    // Every path's answer first, then one comparison.
    let mut answers = Vec::new();
    for (path, body) in [
        ("/api/v1/publish", fake.to_string()),
        ("/api/v1/publish", json!([fake]).to_string()),
        (
            "/api/v1/broadcast",
            json!({"channel": "presence", "data": {"user_id": "mallory"}}).to_string(),
        ),
    ] {
        let (status, reply) = server.post(path, &body).await;
        answers.push(format!("REST {path} {status}: {reply}"));
    }
    let published = client
        .publish(proto::PublishRequest {
            events: vec![proto::Event {
                r#type: proto::EventType::UserJoined as i32,
                collection: "presence".into(),
                record_id: "mallory".into(),
                data: Some(strom::edge::grpc::struct_from_json(
                    &json!({"user_id": "mallory", "channel": null}),
                )),
                ..Default::default()
            }],
        })
        .await;
    answers.push(match published {
        Ok(reply) => format!("gRPC published {:?}", reply.into_inner().seqs),
        Err(status) => format!("gRPC {:?}: {}", status.code(), status.message()),
    });
    let mut ws = WsClient::connect(server.addr, "").await.unwrap();
    let reply = ws
        .request(
            json!({"action": "publish", "channel": "presence", "ack": true,
            "data": {"user_id": "mallory", "channel": null}}),
        )
        .await;
    answers.push(format!("WebSocket {}: {}", reply["type"], reply["data"]));
    let refused: Vec<bool> = answers
        .iter()
        .map(|a| {
            (a.contains(" 400: ")
                || a.contains("InvalidArgument")
                || a.contains("invalid_argument"))
                && a.contains("reserved")
        })
        .collect();
    assert_eq!(refused, [true; 5], "{answers:#?}");

    // The next change the watcher sees is a real one: had a fake been
    // published, it would have been dispatched before this join.
    let _erin = WsClient::connect(server.addr, "?user_id=erin")
        .await
        .unwrap();
    let update = within("a change", watch.message()).await.unwrap().unwrap();
    let Some(proto::presence_update::Kind::Joined(user)) = update.kind else {
        panic!("erin joined, got {update:?}");
    };
    assert_eq!(user.user_id, "erin");
}
