//! A client that stops reading is evicted: it leaves the router, presence
//! and stats, while a healthy subscriber on the same server receives every
//! event. Two ways in: its queue overflows (small `--queue-capacity`), or a
//! write to its socket misses the write deadline (huge queue).

mod common;

use common::{TestServer, WsClient, metric_series, within};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::time::Duration;
use strom::engine::EngineConfig;
use strom::server::ServerConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

const EVENTS: u64 = 400;
const BATCH: u64 = 10;
/// Large events fill socket buffers after a few hundred.
const PADDING: usize = 32 * 1024;

enum Stall {
    /// The queue overflows long before any write deadline.
    Overflow,
    /// The queue never fills; the blocked write times out.
    WriteDeadline,
}

async fn server(stall: Stall) -> TestServer {
    let (queue_capacity, write_timeout) = match stall {
        Stall::Overflow => (16, Duration::from_secs(600)),
        Stall::WriteDeadline => (100_000, Duration::from_millis(500)),
    };
    TestServer::start(ServerConfig {
        engine: EngineConfig {
            queue_capacity,
            ..EngineConfig::default()
        },
        write_timeout,
        ..ServerConfig::default()
    })
    .await
}

/// A socket with a tiny receive buffer, so the server's writes block soon
/// after the client stops reading.
async fn small_socket(addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(addr).await.unwrap()
}

/// Subscribes over WebSocket as user `stalled`, then never reads again.
async fn stalled_websocket(addr: SocketAddr) -> WebSocketStream<TcpStream> {
    let url = format!("ws://{addr}/api/v1/ws/realtime?user_id=stalled");
    let (mut ws, _) = tokio_tungstenite::client_async(url, small_socket(addr).await)
        .await
        .unwrap();
    let action = json!({"action": "subscribe", "collection": "posts"});
    ws.send(Message::text(action.to_string())).await.unwrap();
    within("the subscribed reply", async {
        while let Some(Ok(message)) = ws.next().await {
            if message.to_text().unwrap_or("").contains("\"subscribed\"") {
                return;
            }
        }
        panic!("the socket closed before `subscribed`");
    })
    .await;
    ws
}

/// Opens an SSE stream as user `stalled`, then never reads again.
async fn stalled_sse(addr: SocketAddr) -> TcpStream {
    let mut stream = small_socket(addr).await;
    let request =
        format!("GET /api/v1/realtime/posts?user_id=stalled HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut seen = Vec::new();
    within("the connected event", async {
        let mut buf = [0; 1024];
        while !String::from_utf8_lossy(&seen).contains("event: connected") {
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "the stream closed before `connected`");
            seen.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    stream
}

async fn stats(server: &TestServer) -> Value {
    let (status, body) = server.get("/api/v1/stats").await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// Publishes `EVENTS` large events in batches, each batch only once the
/// healthy client has received the one before, so only the stalled client
/// can fall behind; returns the seqs the healthy client received.
async fn publish_past(server: &TestServer, healthy: &mut WsClient) -> Vec<u64> {
    let padding = "x".repeat(PADDING);
    let mut received = Vec::new();
    for batch in 0..EVENTS / BATCH {
        let events: Vec<Value> = (0..BATCH)
            .map(|i| {
                json!({"type": "record.created", "collection": "posts",
                       "record_id": format!("p{}", batch * BATCH + i), "data": {"pad": padding}})
            })
            .collect();
        let (status, body) = server
            .post("/api/v1/publish", &Value::from(events).to_string())
            .await;
        assert_eq!(status, 200, "{body}");
        while (received.len() as u64) < (batch + 1) * BATCH {
            let message = healthy.reply().await;
            assert_eq!(message["type"], "event", "{message}");
            received.push(message["data"]["seq"].as_u64().unwrap());
        }
    }
    received
}

/// Waits until stats and presence no longer show the stalled client.
async fn wait_until_evicted(server: &TestServer) {
    let gone = async {
        loop {
            let stats = stats(server).await;
            let (_, presence) = server.get("/api/v1/presence").await;
            if stats["total_connections"] == 1 && !presence.contains("stalled") {
                return stats;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let stats = tokio::time::timeout(Duration::from_secs(30), gone)
        .await
        .expect("the stalled client is evicted");
    assert_eq!(stats["subscriptions"].as_object().unwrap().len(), 1);
}

async fn stalled_reader_is_evicted<F, Fut, H>(stall: Stall, open_stalled: F)
where
    F: FnOnce(SocketAddr) -> Fut,
    Fut: Future<Output = H>,
{
    let reason = match stall {
        Stall::Overflow => "overflow",
        Stall::WriteDeadline => "write_timeout",
    };
    let server = server(stall).await;
    let mut healthy = WsClient::connect(server.addr, "").await.unwrap();
    healthy.subscribe("posts").await;
    let stalled = open_stalled(server.addr).await;
    assert_eq!(stats(&server).await["total_connections"], 2);
    let (_, presence) = server.get("/api/v1/presence").await;
    assert!(presence.contains("stalled"), "{presence}");

    let received = publish_past(&server, &mut healthy).await;

    assert_eq!(received, (1..=EVENTS).collect::<Vec<_>>());
    wait_until_evicted(&server).await;
    let (_, metrics) = server.get("/metrics").await;
    let series = format!("strom_evictions_total{{reason=\"{reason}\"}}");
    let evicted = metric_series(&metrics)[&series];
    assert!(evicted >= 1.0, "{metrics}");
    drop(stalled);
}

#[tokio::test]
async fn websocket_that_overflows_its_queue_is_evicted() {
    stalled_reader_is_evicted(Stall::Overflow, stalled_websocket).await;
}

#[tokio::test]
async fn websocket_that_misses_the_write_deadline_is_evicted() {
    stalled_reader_is_evicted(Stall::WriteDeadline, stalled_websocket).await;
}

#[tokio::test]
async fn sse_stream_that_overflows_its_queue_is_evicted() {
    stalled_reader_is_evicted(Stall::Overflow, stalled_sse).await;
}

#[tokio::test]
async fn sse_stream_that_misses_the_write_deadline_is_evicted() {
    stalled_reader_is_evicted(Stall::WriteDeadline, stalled_sse).await;
}
