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
//! - `compare`: the same fan-out against strom and against nats-server's
//!   WebSocket gateway from one generator, alternating runs; reports both
//!   and the ratio (`scripts/bench-compare` starts both servers).
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
    /// The fan-out against strom and against nats-server (WebSocket), side by side.
    Compare(CompareArgs),
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
    /// Also subscribe each connection to a collection (SSE connections
    /// always are: an SSE stream is one subscription).
    #[arg(long)]
    subscribe: bool,
    /// How the connections connect: `websocket` or `sse`.
    #[arg(long, default_value = "websocket")]
    transport: String,
}

pub async fn run(bench: Bench) -> Result<()> {
    match bench {
        Bench::Fanout(args) => fanout(args).await,
        Bench::Idle(args) => idle(args).await,
        Bench::Compare(args) => compare(args).await,
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
/// Opens an SSE stream of `collection` on `addr` and waits for its
/// `connected` event.
async fn open_sse(addr: &str, collection: &str) -> Result<tokio::net::TcpStream> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let request = format!(
        "GET /api/v1/realtime/{collection} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut seen = Vec::new();
    let mut chunk = [0u8; 1024];
    let connected = b"event: connected";
    while !seen.windows(connected.len()).any(|w| w == connected) {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            bail!(
                "the server closed the SSE stream: {}",
                String::from_utf8_lossy(&seen)
            );
        }
        seen.extend_from_slice(&chunk[..n]);
    }
    Ok(stream)
}

/// Opens `count` connections, subscribed to `collection` if given.
async fn open_many(url: &str, count: usize, collection: Option<&str>) -> Result<Vec<Socket>> {
    let mut sockets = Vec::with_capacity(count);
    let mut pending = futures_util::stream::iter(0..count)
        .map(|_| open(url, collection))
        .buffered(100);
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
        "grpc" => open_grpc(&args.server, args.subscribers, args.sampled, &collection).await?,
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
    // Readers wait on their socket and on this, not on a timer each: ten
    // thousand timers would make the generator the bottleneck.
    let (stop, done) = tokio::sync::watch::channel(false);
    let mut readers = Vec::new();
    for (i, mut feed) in feeds.into_iter().enumerate() {
        let (delivered, cut_off, latencies, mut done) = (
            Arc::clone(&delivered),
            Arc::clone(&cut_off),
            Arc::clone(&latencies),
            done.clone(),
        );
        let sampled = i < args.sampled;
        readers.push(tokio::spawn(async move {
            let mut local = Vec::new();
            let mut count = 0u64;
            loop {
                let next = tokio::select! {
                    next = feed.next(sampled) => next,
                    _ = done.wait_for(|done| *done) => break,
                };
                match next {
                    Next::Event(sent) => {
                        count += 1;
                        if count.is_multiple_of(256) {
                            delivered.fetch_add(256, Ordering::Relaxed);
                        }
                        if let Some(sent) = sent {
                            local.push(now_micros().saturating_sub(sent));
                        }
                    }
                    Next::Other => continue,
                    Next::Closed => {
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
    stop.send_replace(true);
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
    Grpc(tonic::Streaming<Counted>),
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
                Ok(Some(Counted::Event(event))) => {
                    let sent = event
                        .as_ref()
                        .filter(|_| parse)
                        .and_then(|event| event.data.as_ref())
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

/// Opens `count` Subscribe streams, 100 per HTTP/2 connection; the first
/// `sampled` decode their events, the others only count them.
async fn open_grpc(
    server: &str,
    count: usize,
    sampled: usize,
    collection: &str,
) -> Result<Vec<Feed>> {
    let mut feeds = Vec::with_capacity(count);
    let mut channel = None;
    for i in 0..count {
        if i % 100 == 0 {
            let endpoint = tonic::transport::Endpoint::from_shared(server.to_owned())?;
            channel = Some(endpoint.connect().await?);
        }
        let mut client = tonic::client::Grpc::new(channel.clone().expect("a channel"));
        client.ready().await?;
        let request = proto::SubscribeRequest {
            collection: collection.to_owned(),
            ..Default::default()
        };
        let path =
            tonic::codegen::http::uri::PathAndQuery::from_static("/strom.v1.Realtime/Subscribe");
        let codec = CountingCodec {
            decode: i < sampled,
        };
        let mut stream = client
            .server_streaming(tonic::Request::new(request), path, codec)
            .await?
            .into_inner();
        stream.message().await?.context("no subscribed message")?;
        feeds.push(Feed::Grpc(stream));
    }
    Ok(feeds)
}

/// A Subscribe message as the bench reads it.
enum Counted {
    /// An event; decoded when the stream is sampled.
    Event(Option<Box<proto::Event>>),
    Other,
}

/// The client side of Subscribe for many streams: a sampled stream decodes
/// its messages, the others only look at which kind each is (its first
/// byte, the protobuf tag of `SubscribeResponse.kind`), so decoding does not
/// make the generator the bottleneck.
#[derive(Clone, Copy)]
struct CountingCodec {
    decode: bool,
}

/// The tag of `SubscribeResponse.event` (field 2, length-delimited).
const EVENT_TAG: u8 = (2 << 3) | 2;

impl tonic::codec::Codec for CountingCodec {
    type Encode = proto::SubscribeRequest;
    type Decode = Counted;
    type Encoder = tonic_prost::ProstEncoder<proto::SubscribeRequest>;
    type Decoder = CountingCodec;

    fn encoder(&mut self) -> Self::Encoder {
        tonic::codec::Codec::encoder(&mut tonic_prost::ProstCodec::<
            proto::SubscribeRequest,
            proto::SubscribeResponse,
        >::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        *self
    }
}

impl tonic::codec::Decoder for CountingCodec {
    type Item = Counted;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        buf: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Counted>, tonic::Status> {
        use bytes::Buf;
        use prost::Message as _;
        if self.decode {
            let response = proto::SubscribeResponse::decode(buf)
                .map_err(|e| tonic::Status::internal(e.to_string()))?;
            return Ok(Some(match response.kind {
                Some(proto::subscribe_response::Kind::Event(event)) => {
                    Counted::Event(Some(Box::new(event)))
                }
                _ => Counted::Other,
            }));
        }
        let is_event = buf.chunk().first() == Some(&EVENT_TAG);
        buf.advance(buf.remaining());
        Ok(Some(if is_event {
            Counted::Event(None)
        } else {
            Counted::Other
        }))
    }
}

async fn idle(args: IdleArgs) -> Result<()> {
    let before = rss_kib(args.server_pid)?;
    let collection = format!("idle_{}", now_micros());
    let sockets: Vec<Box<dyn Send>> = match args.transport.as_str() {
        "websocket" => {
            let subscribed = args.subscribe.then_some(collection.as_str());
            let sockets = open_many(&ws_url(&args.server), args.connections, subscribed).await?;
            sockets
                .into_iter()
                .map(|s| Box::new(s) as Box<dyn Send>)
                .collect()
        }
        "sse" => {
            let addr = args
                .server
                .trim_start_matches("http://")
                .trim_end_matches('/')
                .to_owned();
            let mut pending = futures_util::stream::iter(0..args.connections)
                .map(|_| open_sse(&addr, &collection))
                .buffer_unordered(100);
            let mut sockets: Vec<Box<dyn Send>> = Vec::with_capacity(args.connections);
            while let Some(socket) = pending.next().await {
                sockets.push(Box::new(socket?));
            }
            sockets
        }
        other => bail!("unknown transport {other:?}: use websocket or sse"),
    };
    // Give the server a moment to settle its allocations.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss_kib(args.server_pid)?;
    println!(
        "{} idle {} connections{}: server RSS {before} KiB → {after} KiB, {:.2} KiB per connection",
        sockets.len(),
        args.transport,
        if args.subscribe || args.transport == "sse" {
            " (subscribed)"
        } else {
            ""
        },
        after.saturating_sub(before) as f64 / sockets.len() as f64
    );
    drop(sockets);
    Ok(())
}

// ---------------------------------------------------------------------------
// `bench compare`: strom against nats-server's WebSocket gateway.
//
// Subscribers are raw WebSocket clients over plain TCP: the frame headers are
// decoded and, on all but the `--sampled` connections, only counted (strom:
// the 15-byte prefix `{"type":"event"` of a text frame; nats: `MSG` control
// lines, whose payload is skipped by its announced size), so the generator's
// cost per delivery stays small next to the servers'.

#[derive(Args)]
pub struct CompareArgs {
    /// The strom server (HTTP and gRPC on one port).
    #[arg(long, default_value = "http://127.0.0.1:18000")]
    strom: String,
    /// nats-server's client port: the publisher connects here.
    #[arg(long, default_value = "127.0.0.1:14222")]
    nats: String,
    /// nats-server's WebSocket port: the subscribers connect here.
    #[arg(long, default_value = "127.0.0.1:18080")]
    nats_ws: String,
    /// The NATS subject.
    #[arg(long, default_value = "bench")]
    subject: String,
    #[arg(long, default_value_t = 1000)]
    subscribers: usize,
    /// Events offered per second.
    #[arg(long, default_value_t = 4000)]
    rate: u64,
    /// How long to publish.
    #[arg(long, default_value = "10s", value_parser = crate::parse_duration)]
    duration: Duration,
    /// Bytes of each event's payload (strom: the `data` object's JSON; nats:
    /// the message body); each carries the publish time in ns.
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// Connections whose every message is parsed for latency.
    #[arg(long, default_value_t = 10)]
    sampled: usize,
    /// How events reach strom: `rest` (one POST /api/v1/publish per event)
    /// or `grpc` (batched Publish calls).
    #[arg(long, default_value = "rest")]
    publish: String,
    /// Events per gRPC Publish call (`--publish grpc`).
    #[arg(long, default_value_t = 50)]
    batch: usize,
    /// Keep-alive HTTP/1.1 connections (`--publish rest`).
    #[arg(long, default_value_t = 8)]
    http_connections: usize,
    /// Runs per target, alternating strom and nats.
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// Longest wait for deliveries once publishing has stopped.
    #[arg(long, default_value = "10s", value_parser = crate::parse_duration)]
    drain_timeout: Duration,
    /// strom's process id, to report its CPU share.
    #[arg(long)]
    strom_pid: Option<u32>,
    /// nats-server's process id, to report its CPU share.
    #[arg(long)]
    nats_pid: Option<u32>,
    /// Targets to run, comma-separated: strom, nats.
    #[arg(long, value_delimiter = ',', default_value = "strom,nats")]
    targets: Vec<String>,
    /// Pins subscriber i to one record (strom: record id `r<i>`; nats:
    /// subject `<subject>.r<i>`); events go to the records in turn, so each
    /// reaches one subscriber, and every subscriber is sampled.
    #[arg(long)]
    pinned: bool,
}

/// Which record each event goes to under `--pinned` (a copy for each
/// publisher task).
#[derive(Clone, Copy)]
struct Pinning {
    pinned: bool,
    subscribers: u64,
}

impl Pinning {
    /// The record event `n` goes to when subscribers are pinned.
    fn record_of(self, n: u64) -> Option<String> {
        self.pinned.then(|| format!("r{}", n % self.subscribers))
    }
}

impl CompareArgs {
    fn pinning(&self) -> Pinning {
        Pinning {
            pinned: self.pinned,
            subscribers: self.subscribers.max(1) as u64,
        }
    }

    fn record_of(&self, n: u64) -> Option<String> {
        self.pinning().record_of(n)
    }

    /// The NATS subject event `n` is published on.
    fn subject_of(&self, n: u64) -> String {
        match self.record_of(n) {
            Some(record) => format!("{}.{record}", self.subject),
            None => self.subject.clone(),
        }
    }
}

/// The publish time in ns since the Unix epoch.
fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64
}

/// Resolves `authority` (host:port) and insists on a loopback address.
async fn loopback(authority: &str) -> Result<std::net::SocketAddr> {
    let addr = tokio::net::lookup_host(authority)
        .await
        .with_context(|| format!("cannot resolve {authority}"))?
        .next()
        .with_context(|| format!("no address for {authority}"))?;
    if !addr.ip().is_loopback() {
        bail!("{authority} is not a loopback address: bench compare only loads this machine");
    }
    Ok(addr)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// CPU time (user + system) of a process, in seconds.
fn cpu_seconds(pid: &str, tick: f64) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name: state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / tick)
}

fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// Per core from /proc/stat: (all ticks, busy ticks, softirq ticks).
/// Per core: ticks in all, busy, softirq and stolen (the hypervisor ran
/// something else while this machine wanted the core).
fn core_ticks() -> Vec<(u64, u64, u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    stat.lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .map(|l| {
            // user nice system idle iowait irq softirq steal …
            let v: Vec<u64> = l
                .split_whitespace()
                .skip(1)
                .take(8)
                .filter_map(|f| f.parse().ok())
                .collect();
            let total: u64 = v.iter().sum();
            let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
            let field = |i: usize| v.get(i).copied().unwrap_or(0);
            (total, total - idle, field(6), field(7))
        })
        .collect()
}

/// A client frame (masked, as RFC 6455 requires of clients).
fn ws_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = (now_nanos() as u32).to_be_bytes();
    let mut frame = Vec::with_capacity(payload.len() + 14);
    frame.push(0x80 | opcode);
    match payload.len() {
        n if n < 126 => frame.push(0x80 | n as u8),
        n if n <= 0xffff => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// Opens a WebSocket over plain TCP; returns the stream and any bytes read
/// past the handshake response.
async fn ws_connect(
    addr: std::net::SocketAddr,
    path: &str,
) -> Result<(tokio::net::TcpStream, Vec<u8>)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    while response.len() < 16384 {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            bail!("connection closed during the WebSocket handshake");
        }
        response.extend_from_slice(&chunk[..n]);
        if let Some(end) = find(&response, b"\r\n\r\n") {
            if !response.starts_with(b"HTTP/1.1 101") {
                let head = String::from_utf8_lossy(&response[..end]);
                bail!("WebSocket upgrade refused: {head}");
            }
            return Ok((stream, response.split_off(end + 4)));
        }
    }
    bail!("WebSocket handshake response too long")
}

/// Pieces of server frames (unmasked), as they arrive.
enum Part<'a> {
    Start(u8),
    Data(&'a [u8]),
    End,
}

/// Incremental decoder of server frame headers; payload passes through.
#[derive(Default)]
struct Frames {
    header: [u8; 10],
    have: usize,
    remaining: u64,
    in_payload: bool,
}

impl Frames {
    fn feed(&mut self, mut input: &[u8], on: &mut impl FnMut(Part<'_>)) -> Result<()> {
        while !input.is_empty() {
            if self.in_payload {
                let take = (self.remaining as usize).min(input.len());
                on(Part::Data(&input[..take]));
                input = &input[take..];
                self.remaining -= take as u64;
                if self.remaining == 0 {
                    on(Part::End);
                    self.in_payload = false;
                }
                continue;
            }
            let need = if self.have < 2 {
                2
            } else {
                match self.header[1] & 0x7f {
                    126 => 4,
                    127 => 10,
                    _ => 2,
                }
            };
            let take = (need - self.have).min(input.len());
            self.header[self.have..self.have + take].copy_from_slice(&input[..take]);
            self.have += take;
            input = &input[take..];
            if self.have < need {
                continue;
            }
            if self.header[1] & 0x80 != 0 {
                bail!("masked frame from the server");
            }
            let len = match self.header[1] & 0x7f {
                126 if need == 2 => continue, // extended length still to come
                127 if need == 2 => continue,
                126 => u16::from_be_bytes([self.header[2], self.header[3]]) as u64,
                127 => {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(&self.header[2..10]);
                    u64::from_be_bytes(b)
                }
                n => n as u64,
            };
            self.have = 0;
            on(Part::Start(self.header[0] & 0x0f));
            if len == 0 {
                on(Part::End);
            } else {
                self.remaining = len;
                self.in_payload = true;
            }
        }
        Ok(())
    }
}

/// What a subscriber has seen so far.
#[derive(Default)]
struct Seen {
    events: u64,
    latencies_ns: Vec<u64>,
    /// Frames to send back (pongs).
    replies: Vec<u8>,
    /// Why the server ended the subscription, if it did.
    cut: Option<String>,
    /// strom: subscribed; nats: PONG to the setup PING.
    ready: bool,
    /// nats: the INFO line arrived.
    info: bool,
}

/// The publish time at the start of `text` (ASCII digits) → latency in ns.
fn latency_from(digits: &[u8]) -> Option<u64> {
    let end = digits
        .iter()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(digits.len());
    let sent: u64 = std::str::from_utf8(&digits[..end]).ok()?.parse().ok()?;
    Some(now_nanos().saturating_sub(sent))
}

const EVENT_PREFIX: &[u8] = br#"{"type":"event""#;

/// A strom WebSocket subscriber: counts `{"type":"event"` text frames.
struct StromProto {
    sampled: bool,
    opcode: u8,
    collect: bool,
    prefix: Vec<u8>,
    body: Vec<u8>,
    seen: Seen,
}

impl StromProto {
    fn new(sampled: bool) -> Self {
        StromProto {
            sampled,
            opcode: 0,
            collect: false,
            prefix: Vec::with_capacity(EVENT_PREFIX.len()),
            body: Vec::new(),
            seen: Seen::default(),
        }
    }

    fn on(&mut self, part: Part<'_>) {
        match part {
            Part::Start(opcode) => {
                if opcode != 0 {
                    self.opcode = opcode;
                    self.prefix.clear();
                    self.body.clear();
                    self.collect = self.sampled || opcode != 1;
                }
            }
            Part::Data(data) => {
                if self.collect {
                    self.body.extend_from_slice(data);
                } else if self.prefix.len() < EVENT_PREFIX.len() {
                    let take = (EVENT_PREFIX.len() - self.prefix.len()).min(data.len());
                    self.prefix.extend_from_slice(&data[..take]);
                    if self.prefix.len() == EVENT_PREFIX.len() && self.prefix != EVENT_PREFIX {
                        // Not an event: keep the whole message to read it.
                        self.collect = true;
                        self.body.extend_from_slice(&self.prefix);
                        self.body.extend_from_slice(&data[take..]);
                    }
                }
            }
            Part::End => self.end(),
        }
    }

    fn end(&mut self) {
        match self.opcode {
            1 if !self.collect && self.prefix == EVENT_PREFIX => self.seen.events += 1,
            1 if !self.collect => {} // a short text frame: not an event
            1 if self.body.starts_with(EVENT_PREFIX) => {
                self.seen.events += 1;
                if let Some(at) = find(&self.body, br#""t":""#)
                    && let Some(latency) = latency_from(&self.body[at + 5..])
                {
                    self.seen.latencies_ns.push(latency);
                }
            }
            1 => {
                let text = &self.body;
                if find(text, br#""type":"ping""#).is_some() {
                    self.seen
                        .replies
                        .extend(ws_frame(1, br#"{"action":"pong"}"#));
                } else if find(text, br#""type":"subscribed""#).is_some() {
                    self.seen.ready = true;
                } else if find(text, br#""type":"error""#).is_some() {
                    let text = String::from_utf8_lossy(text);
                    self.seen.cut = Some(format!("error frame {text:.120}"));
                }
            }
            8 => {
                let code = match self.body.as_slice() {
                    [a, b, ..] => u16::from_be_bytes([*a, *b]),
                    _ => 1005,
                };
                // An error frame (the reason) comes first: keep the code anyway.
                self.seen.cut = Some(format!("close {code}"));
            }
            9 => self.seen.replies.extend(ws_frame(10, &self.body)),
            _ => {}
        }
    }
}

/// A NATS subscriber over WebSocket: the NATS text protocol, which may be
/// split across frames anywhere, read as one byte stream.
struct NatsProto {
    sampled: bool,
    opcode: u8,
    control: Vec<u8>,
    line: Vec<u8>,
    /// Payload bytes (plus CRLF) of the current MSG still to skip.
    skip: u64,
    head: Vec<u8>,
    seen: Seen,
}

impl NatsProto {
    fn new(sampled: bool) -> Self {
        NatsProto {
            sampled,
            opcode: 0,
            control: Vec::new(),
            line: Vec::with_capacity(128),
            skip: 0,
            head: Vec::with_capacity(24),
            seen: Seen::default(),
        }
    }

    fn on(&mut self, part: Part<'_>) {
        match part {
            Part::Start(opcode) => {
                if opcode != 0 {
                    self.opcode = opcode;
                }
                self.control.clear();
            }
            Part::Data(data) => match self.opcode {
                1 | 2 => self.stream(data),
                _ => self.control.extend_from_slice(data),
            },
            Part::End => match self.opcode {
                8 => {
                    let code = match self.control.as_slice() {
                        [a, b, ..] => u16::from_be_bytes([*a, *b]),
                        _ => 1005,
                    };
                    if self.seen.cut.is_none() {
                        self.seen.cut = Some(format!("close {code}"));
                    }
                }
                9 => self.seen.replies.extend(ws_frame(10, &self.control)),
                _ => {}
            },
        }
    }

    fn stream(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.skip > 0 {
                let take = (self.skip as usize).min(data.len());
                if self.sampled && self.head.len() < 24 {
                    let keep = (24 - self.head.len()).min(take);
                    self.head.extend_from_slice(&data[..keep]);
                }
                self.skip -= take as u64;
                data = &data[take..];
                if self.skip == 0 {
                    self.seen.events += 1;
                    if self.sampled {
                        if let Some(latency) = latency_from(&self.head) {
                            self.seen.latencies_ns.push(latency);
                        }
                        self.head.clear();
                    }
                }
                continue;
            }
            match data.iter().position(|&b| b == b'\n') {
                Some(at) => {
                    if self.line.is_empty() {
                        self.control_line(&data[..at]);
                    } else {
                        let mut line = std::mem::take(&mut self.line);
                        line.extend_from_slice(&data[..at]);
                        self.control_line(&line);
                        line.clear();
                        self.line = line;
                    }
                    data = &data[at + 1..];
                }
                None => {
                    if self.line.len() + data.len() > 4096 {
                        self.seen.cut = Some("protocol line over 4 KiB".into());
                        return;
                    }
                    self.line.extend_from_slice(data);
                    return;
                }
            }
        }
    }

    fn control_line(&mut self, line: &[u8]) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.starts_with(b"MSG ") {
            let size = line
                .rsplit(|&b| b == b' ')
                .next()
                .and_then(|s| std::str::from_utf8(s).ok()?.parse::<u64>().ok());
            match size {
                Some(size) => self.skip = size + 2,
                None => self.seen.cut = Some("unreadable MSG line".into()),
            }
        } else if line.starts_with(b"PING") {
            self.seen.replies.extend(ws_frame(2, b"PONG\r\n"));
        } else if line.starts_with(b"PONG") {
            self.seen.ready = true;
        } else if line.starts_with(b"INFO") {
            self.seen.info = true;
        } else if line.starts_with(b"-ERR") {
            let text = String::from_utf8_lossy(line);
            self.seen.cut = Some(text.into_owned());
        }
    }
}

enum Proto {
    Strom(StromProto),
    Nats(NatsProto),
}

impl Proto {
    fn seen(&mut self) -> &mut Seen {
        match self {
            Proto::Strom(p) => &mut p.seen,
            Proto::Nats(p) => &mut p.seen,
        }
    }

    fn feed(&mut self, frames: &mut Frames, input: &[u8]) -> Result<()> {
        match self {
            Proto::Strom(p) => frames.feed(input, &mut |part| p.on(part)),
            Proto::Nats(p) => frames.feed(input, &mut |part| p.on(part)),
        }
    }
}

/// One subscriber connection: its socket, decoder state and protocol.
struct Sub {
    stream: tokio::net::TcpStream,
    frames: Frames,
    proto: Proto,
}

impl Sub {
    /// Reads until `until` holds (bounded by `limit`), answering pings.
    async fn pump(&mut self, until: fn(&Seen) -> bool, limit: Duration) -> Result<()> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let deadline = Instant::now() + limit;
        let mut buf = [0u8; 4096];
        while !until(self.proto.seen()) {
            if let Some(cut) = &self.proto.seen().cut {
                bail!("during setup: {cut}");
            }
            let n = tokio::time::timeout_at(deadline.into(), self.stream.read(&mut buf))
                .await
                .context("setup timed out")??;
            if n == 0 {
                bail!("closed during setup");
            }
            self.proto.feed(&mut self.frames, &buf[..n])?;
            let replies = std::mem::take(&mut self.proto.seen().replies);
            self.stream.write_all(&replies).await?;
        }
        Ok(())
    }
}

async fn open_strom_sub(
    addr: std::net::SocketAddr,
    collection: &str,
    record_id: Option<String>,
    sampled: bool,
) -> Result<Sub> {
    use tokio::io::AsyncWriteExt;
    let (mut stream, rest) = ws_connect(addr, "/api/v1/ws/realtime").await?;
    let mut subscribe = json!({"action": "subscribe", "collection": collection});
    if let Some(record_id) = record_id {
        subscribe["record_id"] = json!(record_id);
    }
    let subscribe = subscribe.to_string();
    stream.write_all(&ws_frame(1, subscribe.as_bytes())).await?;
    let mut sub = Sub {
        stream,
        frames: Frames::default(),
        proto: Proto::Strom(StromProto::new(sampled)),
    };
    sub.proto.feed(&mut sub.frames, &rest)?;
    sub.pump(|seen| seen.ready, Duration::from_secs(10)).await?;
    Ok(sub)
}

async fn open_nats_sub(addr: std::net::SocketAddr, subject: &str, sampled: bool) -> Result<Sub> {
    use tokio::io::AsyncWriteExt;
    let (stream, rest) = ws_connect(addr, "/").await?;
    let mut sub = Sub {
        stream,
        frames: Frames::default(),
        proto: Proto::Nats(NatsProto::new(sampled)),
    };
    sub.proto.feed(&mut sub.frames, &rest)?;
    sub.pump(|seen| seen.info, Duration::from_secs(10)).await?;
    let hello = format!(
        "CONNECT {{\"verbose\":false,\"pedantic\":false,\"headers\":false}}\r\nSUB {subject} 1\r\nPING\r\n"
    );
    sub.stream.write_all(&ws_frame(2, hello.as_bytes())).await?;
    sub.pump(|seen| seen.ready, Duration::from_secs(10)).await?;
    Ok(sub)
}

/// Counters the subscriber tasks share with the run.
struct Tally {
    epoch: Instant,
    delivered: AtomicU64,
    /// ns after `epoch` of the latest delivery.
    last_delivery: AtomicU64,
    per_sub: Vec<AtomicU64>,
    cut: Vec<AtomicBool>,
    reasons: std::sync::Mutex<Vec<String>>,
    latencies_ns: std::sync::Mutex<Vec<u64>>,
}

async fn read_sub(mut sub: Sub, index: usize, tally: Arc<Tally>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16384];
    let mut counted = sub.proto.seen().events;
    let reason = loop {
        let n = match sub.stream.read(&mut buf).await {
            Ok(0) => break "connection closed".to_owned(),
            Ok(n) => n,
            Err(e) => break format!("read error: {e}"),
        };
        if let Err(e) = sub.proto.feed(&mut sub.frames, &buf[..n]) {
            break format!("bad frame: {e}");
        }
        let seen = sub.proto.seen();
        if seen.events > counted {
            tally
                .delivered
                .fetch_add(seen.events - counted, Ordering::Relaxed);
            tally.per_sub[index].store(seen.events, Ordering::Relaxed);
            tally
                .last_delivery
                .fetch_max(tally.epoch.elapsed().as_nanos() as u64, Ordering::Relaxed);
            counted = seen.events;
        }
        if !seen.latencies_ns.is_empty() {
            let mut all = tally.latencies_ns.lock().expect("latencies");
            all.append(&mut seen.latencies_ns);
        }
        if let Some(cut) = seen.cut.take() {
            break cut;
        }
        if !seen.replies.is_empty() {
            let replies = std::mem::take(&mut seen.replies);
            if let Err(e) = sub.stream.write_all(&replies).await {
                break format!("write error: {e}");
            }
        }
    };
    tally.cut[index].store(true, Ordering::Relaxed);
    tally.reasons.lock().expect("reasons").push(reason);
}

/// Opens `count` subscribers, 100 at a time; `open` gets each one's index
/// and whether it parses every message (the first `sampled` do).
async fn open_subs(
    count: usize,
    sampled: usize,
    open: impl Fn(u64, bool) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Sub>> + Send>>,
) -> Result<Vec<Sub>> {
    let mut subs = Vec::with_capacity(count);
    let mut pending = futures_util::stream::iter(0..count)
        .map(|i| open(i as u64, i < sampled))
        .buffered(100);
    while let Some(sub) = pending.next().await {
        subs.push(sub?);
    }
    Ok(subs)
}

/// The body of one event: `{"t":"<ns>","pad":"xx…"}` (strom) or `<ns>xx…`
/// (nats), `size` bytes where the time fits.
fn strom_data(size: usize) -> serde_json::Value {
    let t = format!("{:019}", now_nanos());
    let pad = size.saturating_sub(r#"{"t":"","pad":""}"#.len() + t.len());
    json!({"t": t, "pad": "x".repeat(pad)})
}

fn nats_payload(size: usize) -> bytes::Bytes {
    let mut body = format!("{:019}", now_nanos()).into_bytes();
    body.resize(size.max(body.len()), b'x');
    body.into()
}

struct Published {
    events: u64,
    elapsed: Duration,
    errors: u64,
    /// Round trip of each publish call (REST request, gRPC call), in ns.
    calls_ns: Vec<u64>,
}

/// Sleeps until event number `next` is due at `rate` per second.
async fn pace(start: Instant, next: u64, rate: f64) {
    let due = start + Duration::from_secs_f64(next as f64 / rate);
    tokio::time::sleep_until(due.into()).await;
}

/// One POST /api/v1/publish per event over `connections` keep-alive
/// HTTP/1.1 connections, each carrying rate/connections.
async fn publish_rest(
    args: &CompareArgs,
    addr: std::net::SocketAddr,
    collection: &str,
) -> Result<Published> {
    let start = Instant::now();
    let connections = args.http_connections.max(1) as u64;
    let total = args.rate * args.duration.as_secs();
    let mut tasks = Vec::new();
    for first in 0..connections {
        let (collection, duration, payload, rate) = (
            collection.to_owned(),
            args.duration,
            args.payload,
            args.rate as f64,
        );
        let pinning = args.pinning();
        tasks.push(tokio::spawn(async move {
            let mut conn = Http::connect(addr).await?;
            let (mut sent, mut errors) = (0u64, 0u64);
            let mut calls = Vec::new();
            // This connection carries events first, first + connections, …
            let mut next = first;
            while next < total && start.elapsed() < duration {
                pace(start, next, rate).await;
                let mut body = json!({
                    "type": "record.created",
                    "collection": collection,
                    "data": strom_data(payload),
                });
                if let Some(record) = pinning.record_of(next) {
                    body["record_id"] = json!(record);
                }
                let body = body.to_string();
                let call = Instant::now();
                let status = tokio::time::timeout(Duration::from_secs(10), conn.post(&body))
                    .await
                    .context("publish timed out")??;
                calls.push(call.elapsed().as_nanos() as u64);
                sent += 1;
                next += connections;
                if status != 200 {
                    errors += 1;
                    if errors > 100 {
                        bail!("more than 100 failed publishes (HTTP {status})");
                    }
                }
            }
            Ok::<_, anyhow::Error>((sent, errors, calls))
        }));
    }
    let (mut events, mut errors, mut calls_ns) = (0, 0, Vec::new());
    for task in tasks {
        let (sent, failed, calls) = task.await??;
        events += sent;
        errors += failed;
        calls_ns.extend(calls);
    }
    Ok(Published {
        events: events - errors,
        elapsed: start.elapsed(),
        errors,
        calls_ns,
    })
}

/// A keep-alive HTTP/1.1 client connection, one request at a time.
struct Http {
    stream: tokio::net::TcpStream,
    addr: std::net::SocketAddr,
    buf: Vec<u8>,
}

impl Http {
    async fn connect(addr: std::net::SocketAddr) -> Result<Http> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Http {
            stream,
            addr,
            buf: Vec::with_capacity(4096),
        })
    }

    /// POSTs a JSON body to /api/v1/publish; returns the status code.
    async fn post(&mut self, body: &str) -> Result<u16> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let request = format!(
            "POST /api/v1/publish HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            self.addr,
            body.len()
        );
        self.stream.write_all(request.as_bytes()).await?;
        self.buf.clear();
        let mut chunk = [0u8; 2048];
        loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                let head = std::str::from_utf8(&self.buf[..end]).context("response head")?;
                let status: u16 = head
                    .split(' ')
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .context("no status")?;
                let length: usize = head
                    .lines()
                    .find_map(|l| {
                        let (name, value) = l.split_once(':')?;
                        name.eq_ignore_ascii_case("content-length")
                            .then(|| value.trim().parse().ok())?
                    })
                    .context("response without Content-Length")?;
                if self.buf.len() >= end + 4 + length {
                    return Ok(status);
                }
            }
            if self.buf.len() > 65536 {
                bail!("response too long");
            }
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                bail!("server closed the HTTP connection");
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// Batched gRPC Publish: a call each time `batch` events are due.
async fn publish_grpc(args: &CompareArgs, collection: &str) -> Result<Published> {
    let mut client = RealtimeClient::connect(args.strom.clone())
        .await
        .context("gRPC connect")?;
    let batch = args.batch.max(1) as u64;
    let limit = args.rate * args.duration.as_secs();
    let start = Instant::now();
    let mut published = 0u64;
    let mut calls_ns = Vec::new();
    while published < limit && start.elapsed() < args.duration {
        let size = batch.min(limit - published);
        pace(start, published + size, args.rate as f64).await;
        let data = struct_from_json(&strom_data(args.payload));
        let call = Instant::now();
        let events = (published..published + size)
            .map(|n| proto::Event {
                r#type: proto::EventType::RecordCreated as i32,
                collection: collection.to_owned(),
                record_id: args.record_of(n).unwrap_or_default(),
                data: Some(data.clone()),
                ..Default::default()
            })
            .collect();
        tokio::time::timeout(
            Duration::from_secs(10),
            client.publish(proto::PublishRequest { events }),
        )
        .await
        .context("publish timed out")?
        .context("publish")?;
        calls_ns.push(call.elapsed().as_nanos() as u64);
        published += size;
    }
    Ok(Published {
        events: published,
        elapsed: start.elapsed(),
        errors: 0,
        calls_ns,
    })
}

/// Core NATS PUB at the offered rate (1 ms ticks).
async fn publish_nats(args: &CompareArgs) -> Result<Published> {
    let client = async_nats::connect(args.nats.as_str())
        .await
        .context("NATS connect")?;
    let limit = args.rate * args.duration.as_secs();
    let start = Instant::now();
    let mut published = 0u64;
    // Ends by `duration` (plus a 1 s grace when publish calls block).
    while start.elapsed() < args.duration + Duration::from_secs(1) {
        let elapsed = start.elapsed();
        let due = if elapsed >= args.duration {
            limit
        } else {
            ((elapsed.as_secs_f64() * args.rate as f64) as u64).min(limit)
        };
        for n in published..due {
            client
                .publish(args.subject_of(n), nats_payload(args.payload))
                .await
                .context("NATS publish")?;
        }
        published = published.max(due);
        if published >= limit {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    tokio::time::timeout(Duration::from_secs(10), client.flush())
        .await
        .context("NATS flush timed out")?
        .context("NATS flush")?;
    Ok(Published {
        events: published,
        elapsed: start.elapsed(),
        errors: 0,
        calls_ns: Vec::new(),
    })
}

struct RunResult {
    target: String,
    subscribers: u64,
    offered: u64,
    published: u64,
    /// Publish call round trip p50/p99 (ms), when calls are answered.
    calls_ms: Option<(f64, f64)>,
    /// Busy share of each core over the run, and its softirq and steal
    /// parts.
    cores: Vec<(f64, f64, f64)>,
    publish_secs: f64,
    publish_errors: u64,
    delivered: u64,
    expected: u64,
    window_secs: f64,
    cut_off: u64,
    reasons: Vec<(String, usize)>,
    latencies_ms: [f64; 4],
    samples: usize,
    generator_cpu: f64,
    server_cpu: Option<f64>,
}

impl RunResult {
    fn rate(&self) -> f64 {
        self.delivered as f64 / self.window_secs
    }

    fn complete(&self) -> bool {
        self.delivered == self.expected && self.cut_off == 0 && self.publish_errors == 0
    }

    /// The publisher got at least 95 % of the offered events out.
    fn offered_reached(&self) -> bool {
        self.published * 100 >= self.offered * 95
    }

    /// CPU used on this machine by other processes, in cores: busy time
    /// of all cores (steal included) less softirq, the generator and the
    /// server.
    fn other_load(&self) -> Option<f64> {
        let busy: f64 = self.cores.iter().map(|(b, s, _)| b - s).sum();
        Some(busy - self.generator_cpu - self.server_cpu?)
    }

    /// Other processes took more than a fifth of a core.
    fn disturbed(&self) -> bool {
        self.other_load().is_some_and(|load| load > 0.2)
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Target {
    Strom,
    Nats,
}

async fn compare_run(
    args: &CompareArgs,
    target: Target,
    addrs: (std::net::SocketAddr, std::net::SocketAddr),
    tick: f64,
) -> Result<RunResult> {
    let (strom_addr, nats_ws_addr) = addrs;
    let collection = format!("bench_{}", now_micros());
    let sampled = if args.pinned {
        args.subscribers
    } else {
        args.sampled
    };
    let subs = match target {
        Target::Strom => {
            let collection = collection.clone();
            let pinned = args.pinned;
            open_subs(args.subscribers, sampled, move |i, sampled| {
                let collection = collection.clone();
                let record_id = pinned.then(|| format!("r{i}"));
                Box::pin(async move {
                    open_strom_sub(strom_addr, &collection, record_id, sampled).await
                })
            })
            .await?
        }
        Target::Nats => {
            let (subject, pinned) = (args.subject.clone(), args.pinned);
            open_subs(args.subscribers, sampled, move |i, sampled| {
                let subject = match pinned {
                    true => format!("{subject}.r{i}"),
                    false => subject.clone(),
                };
                Box::pin(async move { open_nats_sub(nats_ws_addr, &subject, sampled).await })
            })
            .await?
        }
    };
    let count = subs.len();
    let tally = Arc::new(Tally {
        epoch: Instant::now(),
        delivered: AtomicU64::new(0),
        last_delivery: AtomicU64::new(0),
        per_sub: (0..count).map(|_| AtomicU64::new(0)).collect(),
        cut: (0..count).map(|_| AtomicBool::new(false)).collect(),
        reasons: std::sync::Mutex::new(Vec::new()),
        latencies_ns: std::sync::Mutex::new(Vec::new()),
    });
    let readers: Vec<_> = subs
        .into_iter()
        .enumerate()
        .map(|(i, sub)| tokio::spawn(read_sub(sub, i, Arc::clone(&tally))))
        .collect();
    let server_pid = match target {
        Target::Strom => args.strom_pid,
        Target::Nats => args.nats_pid,
    }
    .map(|pid| pid.to_string());
    // Settle after the connection burst.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let cpu_before = (
        cpu_seconds("self", tick),
        server_pid.as_deref().and_then(|p| cpu_seconds(p, tick)),
    );
    let cores_before = core_ticks();
    let start = tally.epoch.elapsed();
    let published = match (target, args.publish.as_str()) {
        (Target::Strom, "rest") => publish_rest(args, strom_addr, &collection).await?,
        (Target::Strom, _) => publish_grpc(args, &collection).await?,
        (Target::Nats, _) => publish_nats(args).await?,
    };
    let publish_end = tally.epoch.elapsed();
    // What subscriber i is to receive: every event, or (pinned) every
    // `count`th one.
    let events = published.events;
    let due = |i: usize| match args.pinned {
        true => events / count as u64 + u64::from((i as u64) < events % count as u64),
        false => events,
    };

    // Drain: until every live subscriber has everything, nothing moved for
    // 2 s, or the drain timeout.
    let drain_start = Instant::now();
    let (mut last, mut moved) = (u64::MAX, Instant::now());
    while drain_start.elapsed() < args.drain_timeout {
        let done = (0..count).all(|i| {
            tally.cut[i].load(Ordering::Relaxed)
                || tally.per_sub[i].load(Ordering::Relaxed) >= due(i)
        });
        if done {
            break;
        }
        let now = tally.delivered.load(Ordering::Relaxed);
        if now != last {
            (last, moved) = (now, Instant::now());
        } else if moved.elapsed() > Duration::from_secs(2) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cpu_after = (
        cpu_seconds("self", tick),
        server_pid.as_deref().and_then(|p| cpu_seconds(p, tick)),
    );
    let cores_after = core_ticks();
    for reader in &readers {
        reader.abort();
    }
    for reader in readers {
        let _ = reader.await;
    }

    let last_delivery = Duration::from_nanos(tally.last_delivery.load(Ordering::Relaxed));
    let window = last_delivery.max(publish_end).saturating_sub(start);
    let share =
        |before: Option<f64>, after: Option<f64>| Some((after? - before?) / window.as_secs_f64());
    let cut_off = tally
        .cut
        .iter()
        .filter(|c| c.load(Ordering::Relaxed))
        .count() as u64;
    let mut reasons: Vec<(String, usize)> = Vec::new();
    for reason in tally.reasons.lock().expect("reasons").iter() {
        match reasons.iter_mut().find(|(r, _)| r == reason) {
            Some((_, n)) => *n += 1,
            None => reasons.push((reason.clone(), 1)),
        }
    }
    let cores = cores_before
        .iter()
        .zip(&cores_after)
        .map(|(before, after)| {
            let total = (after.0 - before.0).max(1) as f64;
            let share = |before: u64, after: u64| (after - before) as f64 / total;
            (
                share(before.1, after.1),
                share(before.2, after.2),
                share(before.3, after.3),
            )
        })
        .collect();
    let mut calls = published.calls_ns.clone();
    calls.sort_unstable();
    let calls_ms = (!calls.is_empty()).then(|| {
        (
            percentile(&calls, 0.5) / 1000.0,
            percentile(&calls, 0.99) / 1000.0,
        )
    });
    let mut samples = std::mem::take(&mut *tally.latencies_ns.lock().expect("latencies"));
    samples.sort_unstable();
    let ms = |p| percentile(&samples, p) / 1000.0;
    Ok(RunResult {
        target: match target {
            Target::Strom => format!("strom/{}", args.publish),
            Target::Nats => "nats".to_owned(),
        },
        subscribers: count as u64,
        offered: args.rate * args.duration.as_secs(),
        published: published.events,
        calls_ms,
        cores,
        publish_secs: published.elapsed.as_secs_f64(),
        publish_errors: published.errors,
        delivered: tally.delivered.load(Ordering::Relaxed),
        expected: (0..count).map(due).sum(),
        window_secs: window.as_secs_f64(),
        cut_off,
        reasons,
        latencies_ms: [ms(0.50), ms(0.90), ms(0.99), ms(1.0)],
        samples: samples.len(),
        generator_cpu: share(cpu_before.0, cpu_after.0).unwrap_or(f64::NAN),
        server_cpu: share(cpu_before.1, cpu_after.1),
    })
}

fn print_run(run: usize, result: &RunResult) {
    let [p50, p90, p99, max] = result.latencies_ms;
    println!(
        "run {run} {}: {} subscribers; published {} events in {:.2}s ({:.0}/s{})",
        result.target,
        result.subscribers,
        result.published,
        result.publish_secs,
        result.published as f64 / result.publish_secs,
        if result.publish_errors > 0 {
            format!(", {} failed", result.publish_errors)
        } else {
            String::new()
        }
    );
    println!(
        "  delivered {} of {} expected ({:.2}%) in {:.2}s: {:.0} deliveries/s; cut off {}",
        result.delivered,
        result.expected,
        100.0 * result.delivered as f64 / result.expected.max(1) as f64,
        result.window_secs,
        result.rate(),
        result.cut_off
    );
    for (reason, n) in &result.reasons {
        println!("    {n} × {reason}");
    }
    if let Some((p50, p99)) = result.calls_ms {
        println!("  publish call round trip (ms): p50 {p50:.2}  p99 {p99:.2}");
    }
    if !result.offered_reached() {
        println!(
            "  offered rate not reached: {} of {} events published (publish back-pressure)",
            result.published, result.offered
        );
    }
    println!(
        "  latency (ms, {} samples): p50 {p50:.2}  p90 {p90:.2}  p99 {p99:.2}  max {max:.2}",
        result.samples
    );
    let server = result
        .server_cpu
        .map(|s| format!("{:.0}%", s * 100.0))
        .unwrap_or_else(|| "n/a".into());
    let cores: Vec<String> = result
        .cores
        .iter()
        .enumerate()
        .map(|(i, (busy, softirq, steal))| {
            format!(
                "cpu{i} {:.0}% (softirq {:.0}%, stolen by the host {:.0}%)",
                busy * 100.0,
                softirq * 100.0,
                steal * 100.0
            )
        })
        .collect();
    println!("  cores busy: {}", cores.join(", "));
    if let Some(load) = result.other_load() {
        println!(
            "  other processes: ~{:.0}% of a core{}",
            load * 100.0,
            if result.disturbed() {
                " — disturbed: other load on the cores"
            } else {
                ""
            }
        );
    }
    println!(
        "  CPU share of one core (process time, softirq not included): generator {:.0}%, server {server}{}",
        result.generator_cpu * 100.0,
        if result.complete() {
            ""
        } else {
            "  — incomplete: not a fair comparison"
        }
    );
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

async fn compare(args: CompareArgs) -> Result<()> {
    if args.rate == 0 || args.subscribers == 0 || args.runs == 0 {
        bail!("--rate, --subscribers and --runs must be positive");
    }
    if !matches!(args.publish.as_str(), "rest" | "grpc") {
        bail!("unknown --publish {:?}: use rest or grpc", args.publish);
    }
    let mut targets = Vec::new();
    for name in &args.targets {
        targets.push(match name.as_str() {
            "strom" => Target::Strom,
            "nats" => Target::Nats,
            other => bail!("unknown target {other:?}: use strom, nats"),
        });
    }
    let strom_authority = args
        .strom
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    let strom_addr = loopback(&strom_authority).await?;
    let nats_ws_addr = loopback(&args.nats_ws).await?;
    loopback(&args.nats).await?;
    let tick = clock_ticks();
    println!(
        "bench compare: {} subscribers{}, {} events/s offered for {:.0?}, {}-byte payload, \
         strom publish {}{}; {} run(s) per target",
        args.subscribers,
        if args.pinned {
            " (each pinned to a record)"
        } else {
            ""
        },
        args.rate,
        args.duration,
        args.payload,
        args.publish,
        match args.publish.as_str() {
            "grpc" => format!(" ({} per call)", args.batch),
            _ => format!(" ({} keep-alive connections)", args.http_connections),
        },
        args.runs
    );

    let mut results: Vec<RunResult> = Vec::new();
    for run in 1..=args.runs {
        for &target in &targets {
            let result = compare_run(&args, target, (strom_addr, nats_ws_addr), tick).await?;
            print_run(run, &result);
            results.push(result);
            // Let the server close the old connections before the next run.
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }

    println!();
    println!(
        "| target | run | published / offered | deliveries/s | delivered / expected | cut off | p50 ms | p90 ms | p99 ms | generator CPU | server CPU | cores busy | complete |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for (i, r) in results.iter().enumerate() {
        let [p50, p90, p99, _] = r.latencies_ms;
        println!(
            "| {} | {} | {} / {} | {:.0} | {} / {} | {} | {p50:.2} | {p90:.2} | {p99:.2} | {:.0}% | {} | {} | {} |",
            r.target,
            i / targets.len() + 1,
            r.published,
            r.offered,
            r.rate(),
            r.delivered,
            r.expected,
            r.cut_off,
            r.generator_cpu * 100.0,
            r.server_cpu
                .map(|s| format!("{:.0}%", s * 100.0))
                .unwrap_or_else(|| "n/a".into()),
            r.cores
                .iter()
                .map(|(busy, _, _)| format!("{:.0}%", busy * 100.0))
                .collect::<Vec<_>>()
                .join(" / "),
            match (r.complete(), r.disturbed()) {
                (true, false) => "yes",
                (true, true) => "yes (disturbed)",
                (false, false) => "NO",
                (false, true) => "NO (disturbed)",
            }
        );
    }
    let summary = |name: &str| {
        let runs: Vec<&RunResult> = results.iter().filter(|r| r.target == name).collect();
        (
            median(runs.iter().map(|r| r.rate()).collect()),
            median(runs.iter().map(|r| r.latencies_ms[0]).collect()),
            median(runs.iter().map(|r| r.latencies_ms[2]).collect()),
            runs.iter().all(|r| r.complete()),
            runs.iter().all(|r| r.offered_reached()),
        )
    };
    println!();
    let strom_name = format!("strom/{}", args.publish);
    for name in [strom_name.as_str(), "nats"] {
        if results.iter().any(|r| r.target == name) {
            let (rate, p50, p99, complete, offered) = summary(name);
            println!(
                "median {name}: {rate:.0} deliveries/s, p50 {p50:.2} ms, p99 {p99:.2} ms{}{}",
                if complete {
                    ""
                } else {
                    " (incomplete: not a fair comparison)"
                },
                if offered {
                    ""
                } else {
                    " (offered rate not reached)"
                }
            );
        }
    }
    if targets.len() == 2 {
        let (strom, s50, s99, strom_ok, strom_offered) = summary(&strom_name);
        let (nats, n50, n99, nats_ok, nats_offered) = summary("nats");
        println!(
            "ratio strom/nats: deliveries/s {:.2}, p50 {:.2}, p99 {:.2}{}{}",
            strom / nats,
            s50 / n50,
            s99 / n99,
            if strom_ok && nats_ok {
                ""
            } else {
                " — incomplete: not a fair comparison"
            },
            if strom_offered && nats_offered {
                ""
            } else {
                " — offered rate not reached by both: the loads differ"
            }
        );
    }
    Ok(())
}
