//! SSE read over raw HTTP connections, and the REST endpoints.

mod common;

use common::*;
use serde_json::{Value, json};
use std::time::Duration;
use strom::server::ServerConfig;

#[tokio::test]
async fn sse_stream_of_a_collection_with_a_query() {
    let server = TestServer::memory().await;
    let mut sse = SseReader::open(
        server.addr,
        "/api/v1/realtime/products?query=price%3E100",
        "",
    )
    .await;
    assert_eq!(sse.status, 200);
    assert!(
        sse.head
            .to_ascii_lowercase()
            .contains("content-type: text/event-stream")
    );
    let connected = sse.next().await.unwrap();
    assert_eq!(connected.event, "connected");
    let data: Value = serde_json::from_str(&connected.data).unwrap();
    assert!(data["connection_id"].is_string());

    server
        .publish_json(created_json("products", "cheap", json!({"price": 5})))
        .await;
    server
        .publish_json(created_json("posts", "other", json!({"price": 500})))
        .await;
    let seq = server
        .publish_json(created_json("products", "dear", json!({"price": 500})))
        .await;
    let got = sse.next().await.unwrap();
    assert_eq!(got.event, "record.created");
    assert_eq!(got.id.as_deref(), Some(seq.to_string().as_str()));
    let data: Value = serde_json::from_str(&got.data).unwrap();
    assert_eq!(data["record_id"], "dear");
    assert_eq!(data["seq"], seq);
    assert_eq!(data["collection"], "products");
}

#[tokio::test]
async fn sse_all_collections_with_seed_style_query_and_event_types() {
    let server = TestServer::memory().await;
    let mut sse = SseReader::open(server.addr, "/api/v1/realtime?query=status=published", "").await;
    assert_eq!(sse.next().await.unwrap().event, "connected");
    server
        .publish_json(created_json("posts", "draft", json!({"status": "draft"})))
        .await;
    server
        .publish_json(
            json!({"type": "record.deleted", "collection": "pages", "record_id": "p",
            "data": {"status": "published"}}),
        )
        .await;
    let got = sse.next().await.unwrap();
    assert_eq!(got.event, "record.deleted");
    assert!(got.data.contains(r#""collection":"pages""#));
}

#[tokio::test]
async fn sse_bad_query_is_a_json_400_before_any_stream() {
    let server = TestServer::memory().await;
    let (status, body) = server
        .get("/api/v1/realtime/posts?query=price%3E%3E1")
        .await;
    assert_eq!(status, 400);
    let error: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(error["error"]["code"], "invalid_argument");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("column 7"),
        "{body}"
    );
    let (status, _) = server.get("/api/v1/realtime/bad%20name").await;
    assert_eq!(status, 400);
    for (path, headers) in [
        ("/api/v1/realtime/posts?since=-1", ""),
        ("/api/v1/realtime/posts", "Last-Event-ID: soon\r\n"),
    ] {
        let (status, _, body) = http_with(server.addr, "GET", path, headers, "")
            .await
            .unwrap();
        assert_eq!(status, 400, "{path}");
        let error: Value = serde_json::from_str(&body).expect("a JSON error");
        let message = error["error"]["message"].as_str().unwrap();
        assert!(message.contains("must be an event's seq"), "{message}");
    }
}

#[tokio::test]
async fn sse_keepalive_comments_flow_while_idle() {
    let server = TestServer::start(ServerConfig {
        sse_keepalive: Duration::from_millis(20),
        ..ServerConfig::default()
    })
    .await;
    // Comments are invisible to an SSE parser: read the body as it comes.
    let (status, _, mut body) = sse_body(server.addr, "/api/v1/realtime/posts", "").await;
    assert_eq!(status, 200);
    let mut text = String::new();
    while text.matches("\n: keep-alive\n\n").count() < 2 {
        let chunk = within("a chunk", futures_util::StreamExt::next(&mut body))
            .await
            .expect("the stream goes on")
            .unwrap();
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    assert!(text.starts_with("event: connected\n"), "{text}");
}

#[tokio::test]
async fn rest_publish_validates_and_returns_seqs() {
    let server = TestServer::memory().await;
    let first = server
        .publish_json(created_json("posts", "a", json!({})))
        .await;
    let (status, body) = server
        .post(
            "/api/v1/publish",
            &json!([
                created_json("posts", "b", json!({})),
                created_json("posts", "c", json!({}))
            ])
            .to_string(),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let reply: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(reply["seqs"], json!([first + 1, first + 2]));

    for (body, reason) in [
        ("{", "invalid JSON"),
        (r#"{"collection":"posts"}"#, "missing field `type`"),
        (r#"{"type":"record.created"}"#, "missing field `collection`"),
        (
            r#"{"type":"record.exploded","collection":"posts"}"#,
            "unknown event type",
        ),
        (
            r#"{"type":"record.created","collection":"posts","data":7}"#,
            "data must be a JSON object",
        ),
        (
            r#"{"type":"record.created","collection":"posts","timestamp":"noon"}"#,
            "invalid timestamp",
        ),
        (
            r#"[{"type":"record.created","collection":"posts"},{"type":"x"}]"#,
            "[1]",
        ),
    ] {
        let (status, reply) = server.post("/api/v1/publish", body).await;
        assert_eq!(status, 400, "{body}");
        let reply: Value = serde_json::from_str(&reply).unwrap();
        let message = reply["error"]["message"].as_str().unwrap();
        assert!(message.contains(reason), "{body}: {message}");
    }
    // Nothing bad was published: the next seq follows the good ones.
    assert_eq!(
        server
            .publish_json(created_json("posts", "d", json!({})))
            .await,
        first + 3
    );
}

#[tokio::test]
async fn health_metrics_and_unknown_paths() {
    let server = TestServer::memory().await;
    let (status, body) = server.get("/healthz").await;
    assert_eq!((status, body.as_str()), (200, r#"{"status":"ok"}"#));
    server
        .publish_json(created_json("posts", "a", json!({})))
        .await;
    let (status, body) = server.get("/metrics").await;
    assert_eq!(status, 200);
    assert!(body.contains("strom_events_published_total 1"), "{body}");
    assert!(
        body.contains("strom_connections{transport=\"websocket\"} 0"),
        "{body}"
    );
    let (status, body) = server.get("/no/such/path").await;
    assert_eq!(status, 404, "{body}");
}
