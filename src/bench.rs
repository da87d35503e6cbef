//! `strom bench`: a load generator against a running strom, for the
//! figures in the README. Run the server and the generator on different
//! cores (`taskset -c 0 strom serve`, `taskset -c 1 strom bench ...`).
//!
//! - `fanout`: N WebSocket subscribers on one collection, events published
//!   over gRPC at a fixed rate (or as fast as Publish answers); reports
//!   deliveries/s, publish-to-receive latency percentiles (sampled on a few
//!   connections) and subscribers cut off as too slow.
//! - `idle`: N WebSocket connections doing nothing; reports server memory
//!   per connection (needs `--server-pid`).
//!
//! Every loop is bounded in count and time; only the given server is loaded.

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use strom::edge::grpc::struct_from_json;
use strom::proto;
use strom::proto::realtime_client::RealtimeClient;
use tokio::sync::Mutex;
use tokio_tungstenite::tungstenite::Message;

#[derive(Subcommand)]
pub enum Bench {
    /// WebSocket fan-out: deliveries/s and latency.
    Fanout(FanoutArgs),
    /// Idle WebSocket connections: server memory per connection.
    Idle(IdleArgs),
}

#[derive(Args)]
pub struct FanoutArgs {
    /// The strom server (HTTP and gRPC on one port).
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    server: String,
    #[arg(long, default_value_t = 1000)]
    subscribers: usize,
    /// Events per second; 0 publishes as fast as the server accepts.
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// How long to publish.
    #[arg(long, default_value = "10s", value_parser = crate::parse_duration)]
    duration: Duration,
    /// Bytes of padding in each event's data.
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// Connections whose every event is parsed for latency.
    #[arg(long, default_value_t = 10)]
    sampled: usize,
    /// The server's process id, to report its memory.
    #[arg(long)]
    server_pid: Option<u32>,
    /// How subscribers connect: `websocket` or `grpc`.
    #[arg(long, default_value = "websocket")]
    transport: String,
}

#[derive(Args)]
pub struct IdleArgs {
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    server: String,
    #[arg(long, default_value_t = 10_000)]
    connections: usize,
    /// The server's process id (required: memory is read from /proc).
    #[arg(long)]
    server_pid: u32,
    /// Also subscribe each connection to a collection.
    #[arg(long)]
    subscribe: bool,
}

pub async fn run(bench: Bench) -> Result<()> {
    match bench {
        Bench::Fanout(args) => fanout(args).await,
        Bench::Idle(args) => idle(args).await,
    }
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("cannot read /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS")
}

fn ws_url(server: &str) -> String {
    format!("{}/api/v1/ws/realtime", server.replacen("http", "ws", 1))
}

/// Opens a connection, optionally subscribed, and waits for the replies.
async fn open(url: &str, collection: Option<&str>) -> Result<Socket> {
    let (mut socket, _) = tokio_tungstenite::connect_async(url).await?;
    socket.next().await.context("no greeting")??;
    if let Some(collection) = collection {
        let subscribe = json!({"action": "subscribe", "collection": collection});
        socket.send(Message::text(subscribe.to_string())).await?;
        loop {
            let Message::Text(text) = socket.next().await.context("closed")?? else {
                continue;
            };
            if text.contains(r#""type":"subscribed""#) {
                break;
            }
            if text.contains(r#""type":"error""#) {
                bail!("subscribe failed: {text}");
            }
        }
    }
    Ok(socket)
}

/// Opens `count` connections, 100 at a time.
async fn open_many(url: &str, count: usize, collection: Option<&str>) -> Result<Vec<Socket>> {
    let mut sockets = Vec::with_capacity(count);
    let mut pending = futures_util::stream::iter(0..count)
        .map(|_| open(url, collection))
        .buffer_unordered(100);
    while let Some(socket) = pending.next().await {
        sockets.push(socket?);
    }
    Ok(sockets)
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros() as u64
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let at = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[at] as f64 / 1000.0
}

async fn fanout(args: FanoutArgs) -> Result<()> {
    let url = ws_url(&args.server);
    let collection = format!("bench_{}", now_micros());
    let before = args.server_pid.map(rss_kib).transpose()?;
    let feeds: Vec<Feed> = match args.transport.as_str() {
        "websocket" => open_many(&url, args.subscribers, Some(&collection))
            .await?
            .into_iter()
            .map(Feed::WebSocket)
            .collect(),
        "grpc" => open_grpc(&args.server, args.subscribers, &collection).await?,
        other => bail!("unknown transport {other:?}: use websocket or grpc"),
    };
    let after = args.server_pid.map(rss_kib).transpose()?;
    println!(
        "{} {} subscribers connected to {}",
        feeds.len(),
        args.transport,
        args.server
    );
    if let (Some(before), Some(after)) = (before, after) {
        println!(
            "server memory: {:.1} KiB per subscribed connection ({} KiB → {} KiB)",
            (after.saturating_sub(before)) as f64 / args.subscribers as f64,
            before,
            after
        );
    }

    let delivered = Arc::new(AtomicU64::new(0));
    let cut_off = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(Mutex::new(Vec::<u64>::new()));
    let done = Arc::new(AtomicBool::new(false));
    let mut readers = Vec::new();
    for (i, mut feed) in feeds.into_iter().enumerate() {
        let (delivered, cut_off, latencies, done) = (
            Arc::clone(&delivered),
            Arc::clone(&cut_off),
            Arc::clone(&latencies),
            Arc::clone(&done),
        );
        let sampled = i < args.sampled;
        readers.push(tokio::spawn(async move {
            let mut local = Vec::new();
            let mut count = 0u64;
            while !done.load(Ordering::Relaxed) {
                let next = tokio::time::timeout(Duration::from_millis(200), feed.next(sampled));
                match next.await {
                    Ok(Next::Event(sent)) => {
                        count += 1;
                        if count.is_multiple_of(256) {
                            delivered.fetch_add(256, Ordering::Relaxed);
                        }
                        if let Some(sent) = sent {
                            local.push(now_micros().saturating_sub(sent));
                        }
                    }
                    Ok(Next::Other) | Err(_) => continue,
                    Ok(Next::Closed) => {
                        cut_off.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                }
            }
            delivered.fetch_add(count % 256, Ordering::Relaxed);
            latencies.lock().await.extend(local);
        }));
    }

    let mut client = RealtimeClient::connect(args.server.clone())
        .await
        .context("gRPC connect")?;
    let padding = "x".repeat(args.payload);
    let start = Instant::now();
    let mut published = 0u64;
    while start.elapsed() < args.duration {
        let due = if args.rate == 0 {
            published + 100
        } else {
            (start.elapsed().as_secs_f64() * args.rate as f64) as u64
        };
        let batch = due.saturating_sub(published).min(1000);
        if batch == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        }
        let t = now_micros();
        let events = (0..batch)
            .map(|_| proto::Event {
                r#type: proto::EventType::RecordCreated as i32,
                collection: collection.clone(),
                data: Some(struct_from_json(&json!({"t": t, "pad": padding}))),
                ..Default::default()
            })
            .collect();
        client
            .publish(proto::PublishRequest { events })
            .await
            .context("publish")?;
        published += batch;
    }
    let publish_time = start.elapsed();
    // Let the deliveries in flight arrive: wait until the count stops moving.
    let mut last = u64::MAX;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = delivered.load(Ordering::Relaxed);
        if now == last {
            break;
        }
        last = now;
    }
    let elapsed = start.elapsed().saturating_sub(Duration::from_millis(100));
    done.store(true, Ordering::Relaxed);
    for reader in readers {
        let _ = reader.await;
    }
    let total = delivered.load(Ordering::Relaxed);
    let mut samples = std::mem::take(&mut *latencies.lock().await);
    samples.sort_unstable();
    println!(
        "published {published} events in {:.2?} ({:.0}/s); expected deliveries {}",
        publish_time,
        published as f64 / publish_time.as_secs_f64(),
        published * args.subscribers as u64
    );
    println!(
        "delivered {total} in {elapsed:.2?}: {:.0} deliveries/s; {} subscribers cut off as too slow",
        total as f64 / elapsed.as_secs_f64(),
        cut_off.load(Ordering::Relaxed)
    );
    println!(
        "latency publish→receive (ms, {} samples): p50 {:.2}  p90 {:.2}  p99 {:.2}  max {:.2}",
        samples.len(),
        percentile(&samples, 0.50),
        percentile(&samples, 0.90),
        percentile(&samples, 0.99),
        percentile(&samples, 1.0)
    );
    Ok(())
}

/// A subscriber's stream, whatever the transport.
enum Feed {
    WebSocket(Socket),
    Grpc(tonic::Streaming<proto::SubscribeResponse>),
}

enum Next {
    /// An event; with its publish time when asked to parse it.
    Event(Option<u64>),
    Other,
    Closed,
}

impl Feed {
    async fn next(&mut self, parse: bool) -> Next {
        match self {
            Feed::WebSocket(socket) => match socket.next().await {
                Some(Ok(Message::Text(text))) => {
                    if text.starts_with(r#"{"type":"event""#) {
                        let sent = parse
                            .then(|| serde_json::from_str::<serde_json::Value>(&text).ok())
                            .flatten()
                            .and_then(|v| v["data"]["data"]["t"].as_u64());
                        Next::Event(sent)
                    } else {
                        if text.starts_with(r#"{"type":"ping""#) {
                            let _ = socket.send(Message::text(r#"{"action":"pong"}"#)).await;
                        }
                        Next::Other
                    }
                }
                Some(Ok(_)) => Next::Other,
                _ => Next::Closed,
            },
            Feed::Grpc(stream) => match stream.message().await {
                Ok(Some(proto::SubscribeResponse {
                    kind: Some(proto::subscribe_response::Kind::Event(event)),
                })) => {
                    let sent = parse
                        .then_some(event.data.as_ref())
                        .flatten()
                        .and_then(|data| data.fields.get("t"))
                        .and_then(|t| match t.kind {
                            Some(prost_types::value::Kind::NumberValue(n)) => Some(n as u64),
                            _ => None,
                        });
                    Next::Event(sent)
                }
                Ok(Some(_)) => Next::Other,
                _ => Next::Closed,
            },
        }
    }
}

/// Opens `count` Subscribe streams, 100 per HTTP/2 connection.
async fn open_grpc(server: &str, count: usize, collection: &str) -> Result<Vec<Feed>> {
    let mut feeds = Vec::with_capacity(count);
    let mut client = None;
    for i in 0..count {
        if i % 100 == 0 {
            client = Some(RealtimeClient::connect(server.to_owned()).await?);
        }
        let client = client.as_mut().expect("a client");
        let request = proto::SubscribeRequest {
            collection: collection.to_owned(),
            ..Default::default()
        };
        let mut stream = client.subscribe(request).await?.into_inner();
        stream.message().await?.context("no subscribed message")?;
        feeds.push(Feed::Grpc(stream));
    }
    Ok(feeds)
}

async fn idle(args: IdleArgs) -> Result<()> {
    let url = ws_url(&args.server);
    let before = rss_kib(args.server_pid)?;
    let collection = args.subscribe.then(|| format!("idle_{}", now_micros()));
    let sockets = open_many(&url, args.connections, collection.as_deref()).await?;
    // Give the server a moment to settle its allocations.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss_kib(args.server_pid)?;
    println!(
        "{} idle connections{}: server RSS {before} KiB → {after} KiB, {:.2} KiB per connection",
        sockets.len(),
        if args.subscribe { " (subscribed)" } else { "" },
        after.saturating_sub(before) as f64 / sockets.len() as f64
    );
    drop(sockets);
    Ok(())
}
