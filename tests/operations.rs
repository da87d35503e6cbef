//! What an operator relies on: the Prometheus metrics, the REST API's
//! OpenAPI document and the dashboard page.

mod common;

use common::*;
use serde_json::{Value, json};
use std::collections::HashMap;
use strom::server::ServerConfig;

async fn scrape(server: &TestServer) -> HashMap<String, f64> {
    let (status, body) = server.get("/metrics").await;
    assert_eq!(status, 200, "{body}");
    metric_series(&body)
}

/// How much `series` grew between two scrapes (counters are per process,
/// so tests running beside this one may add to them too).
fn grew(before: &HashMap<String, f64>, after: &HashMap<String, f64>, series: &str) -> f64 {
    let value = |m: &HashMap<String, f64>| m.get(series).copied().unwrap_or(0.0);
    assert!(after.contains_key(series), "no series {series}");
    value(after) - value(before)
}

#[tokio::test]
async fn metrics_count_deliveries_connections_latencies_and_state() {
    let server = TestServer::memory().await;
    let before = scrape(&server).await;
    let mut client = WsClient::connect(server.addr, "").await.unwrap();
    client.subscribe("posts").await;
    for id in ["a", "b", "c"] {
        server
            .publish_json(created_json("posts", id, json!({})))
            .await;
    }
    for _ in 0..3 {
        let message = client.next().await.expect("an event");
        assert_eq!(message["type"], "event", "{message}");
    }
    client.close().await;
    let after = within("the connection to close", async {
        loop {
            let after = scrape(&server).await;
            if after["strom_connections{transport=\"websocket\"}"] == 0.0 {
                break after;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;

    let delivered = "strom_deliveries_total{transport=\"websocket\"}";
    assert!(grew(&before, &after, delivered) >= 3.0, "{delivered}");
    for series in [
        "strom_connections_opened_total{transport=\"websocket\"}",
        "strom_connections_closed_total{transport=\"websocket\"}",
        "strom_fanout_latency_seconds_count",
    ] {
        assert!(grew(&before, &after, series) >= 1.0, "{series}");
    }
    assert!(grew(&before, &after, "strom_publish_duration_seconds_count") >= 3.0);
    assert!(
        after["strom_publish_duration_seconds_bucket{le=\"+Inf\"}"]
            >= after["strom_publish_duration_seconds_bucket{le=\"0.00025\"}"]
    );
    // State is this server's own, so exact.
    assert_eq!(after["strom_events_published_total"], 3.0);
    assert_eq!(after["strom_history_events"], 3.0);
    assert_eq!(after["strom_head_seq"], 3.0);
    assert_eq!(after["strom_queue_depth"], 0.0);
    assert_eq!(after["strom_nats_connected"], 1.0);
    assert_eq!(after["strom_subscriptions"], 0.0);

    let (_, stats) = server.get("/api/v1/stats").await;
    let stats: Value = serde_json::from_str(&stats).unwrap();
    assert_eq!(stats["events_published_total"], 3, "{stats}");
    assert!(stats["deliveries_total"].as_u64().unwrap() >= 3, "{stats}");
}

#[tokio::test]
async fn metrics_count_refused_credentials_by_reason() {
    let s = Secured::start(
        r#"
[[api_keys]]
name = "ops"
key = "ops-key-0123456789"
publish = []
subscribe = []
"#,
        ServerConfig::default(),
    )
    .await;
    let ops = "X-Api-Key: ops-key-0123456789\r\n";
    let scrape = || async {
        let (status, _, body) = http_with(s.server.addr, "GET", "/metrics", ops, "")
            .await
            .unwrap();
        assert_eq!(status, 200, "{body}");
        metric_series(&body)
    };
    let count = |series: &HashMap<String, f64>, reason: &str| -> f64 {
        series[&format!("strom_auth_failures_total{{reason=\"{reason}\"}}")]
    };
    let before = scrape().await;
    let publish = |headers: String| {
        let addr = s.server.addr;
        async move {
            let body = created_json("posts", "a", json!({})).to_string();
            http_with(addr, "POST", "/api/v1/publish", &headers, &body)
                .await
                .unwrap()
                .0
        }
    };
    assert_eq!(publish("Authorization: Bearer a.b.c\r\n".into()).await, 401);
    assert_eq!(publish("X-Api-Key: no-such-key\r\n".into()).await, 401);
    assert_eq!(publish(String::new()).await, 401);
    assert_eq!(publish(ops.into()).await, 403);
    let after = scrape().await;
    for reason in [
        "invalid_token",
        "unknown_api_key",
        "unauthenticated",
        "forbidden",
    ] {
        assert!(
            count(&after, reason) > count(&before, reason),
            "{reason}: {after:?}"
        );
    }
}

#[tokio::test]
async fn the_openapi_document_matches_the_routes() {
    let server = TestServer::memory().await;
    let (status, body) = server.get("/api/v1/openapi.json").await;
    assert_eq!(status, 200);
    let document: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(document["openapi"], "3.1.0");
    let paths = document["paths"].as_object().expect("paths");

    // Every route the router declares is documented...
    let router = include_str!("../src/edge/mod.rs");
    let routes: Vec<&str> = router
        .split(".route(")
        .skip(1)
        .map(|rest| rest.trim_start().split('"').nth(1).expect("a quoted path"))
        .collect();
    assert!(routes.len() > 10, "{routes:?}");
    for route in &routes {
        assert!(paths.contains_key(*route), "{route} is not documented");
    }
    // ...and every documented operation is served: the router neither
    // misses the path nor refuses the method.
    for (path, operations) in paths {
        assert!(routes.contains(&path.as_str()), "{path} is not routed");
        let concrete = path
            .replace("{collection}", "posts")
            .replace("{channel}", "room");
        for method in operations.as_object().unwrap().keys() {
            let method = method.to_uppercase();
            if path.starts_with("/api/v1/realtime") {
                continue; // SSE streams have tests of their own
            }
            let (status, _, body) = http_with(server.addr, &method, &concrete, "", "{}")
                .await
                .unwrap();
            assert!(
                status != 405 && !body.contains("no route for"),
                "{method} {path}: {status} {body}"
            );
        }
    }
}

#[tokio::test]
async fn the_dashboard_is_served_at_the_root() {
    let server = TestServer::memory().await;
    let (status, head, body) = http_with(server.addr, "GET", "/", "", "").await.unwrap();
    assert_eq!(status, 200);
    assert!(head.contains("content-type: text/html"), "{head}");
    for id in ["connections", "rates", "online", "filter", "tail"] {
        assert!(body.contains(&format!("id=\"{id}\"")), "#{id} is missing");
    }
}
