//! Shared test harness: real strom servers on free ports, a real
//! nats-server process, and clients: hyper for HTTP, `eventsource-stream`
//! for SSE, tungstenite for WebSocket, tonic for gRPC.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use strom::proto;
use strom::proto::realtime_client::RealtimeClient;
use strom::server::{ServerConfig, run};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tonic::transport::Channel;

/// The HS256 secret the secured test servers verify tokens with.
pub const SECRET: &str = "test-secret-that-is-long-enough-0123456789";

/// A token for `sub`, signed with [`SECRET`], valid for an hour; `claims`
/// (an object) adds claims or overrides `exp`.
pub fn token(sub: &str, claims: serde_json::Value) -> String {
    let claims = claims.as_object().expect("claims are an object").clone();
    strom::auth::token::mint(
        jsonwebtoken::Algorithm::HS256,
        SECRET.as_bytes(),
        sub,
        claims,
        Duration::from_secs(3600),
    )
    .unwrap()
}

/// A server verifying [`SECRET`] tokens under the policy file `policy`,
/// with `config` for the rest; the file lives as long as the server.
pub struct Secured {
    pub server: TestServer,
    _policy: TempDir,
}

impl Secured {
    pub async fn start(policy: &str, config: ServerConfig) -> Secured {
        let dir = TempDir::new("policy");
        let path = dir.0.join("strom.toml");
        std::fs::write(&path, policy).unwrap();
        let server = TestServer::start(ServerConfig {
            auth: strom::auth::AuthSettings {
                config_file: Some(path),
                jwt_secret: Some(SECRET.into()),
                ..Default::default()
            },
            ..config
        })
        .await;
        Secured {
            server,
            _policy: dir,
        }
    }
}

/// How long a test waits for something that should happen at once.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// Awaits `future`, failing the test with `what` if it takes longer than
/// [`PATIENCE`] (a bound against hangs, not a timing assertion).
pub async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, future)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// A strom server running inside the test process.
pub struct TestServer {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl TestServer {
    pub async fn start(config: ServerConfig) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let (ready_tx, ready_rx) = oneshot::channel();
        let task = tokio::spawn(async move {
            let shutdown = async move {
                let _ = stopped.await;
            };
            let _ = ready_tx.send(());
            run(listener, config, shutdown).await.expect("server runs");
        });
        ready_rx.await.unwrap();
        let server = TestServer {
            addr,
            stop: Some(stop),
            task,
        };
        // The bus connects inside `run`; the server answers once it is up.
        within("the server to answer", async {
            loop {
                if let Ok((200, _)) = server.try_get("/healthz").await {
                    break;
                }
                tokio::task::yield_now().await;
            }
        })
        .await;
        server
    }

    pub async fn memory() -> TestServer {
        TestServer::start(ServerConfig::default()).await
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn grpc(&self) -> RealtimeClient<Channel> {
        RealtimeClient::connect(self.url()).await.unwrap()
    }

    /// Stops the server gracefully and waits until it has.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        within("the server to stop", &mut self.task).await.unwrap();
    }

    pub fn begin_stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Waits until a stop begun with [`TestServer::begin_stop`] is done.
    pub async fn wait_stopped(&mut self) {
        within("the server to stop", &mut self.task).await.unwrap();
    }

    async fn try_get(&self, path: &str) -> std::io::Result<(u16, String)> {
        http(self.addr, "GET", path, "").await
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        http(self.addr, "GET", path, "").await.unwrap()
    }

    pub async fn post(&self, path: &str, body: &str) -> (u16, String) {
        http(self.addr, "POST", path, body).await.unwrap()
    }

    /// Publishes one event over REST and returns its seq.
    pub async fn publish_json(&self, event: serde_json::Value) -> u64 {
        let (status, body) = self.post("/api/v1/publish", &event.to_string()).await;
        assert_eq!(status, 200, "publish failed: {body}");
        let reply: serde_json::Value = serde_json::from_str(&body).unwrap();
        reply["seq"].as_u64().expect("a seq")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A `record.created` event as a REST publisher sends it.
pub fn created_json(
    collection: &str,
    record_id: &str,
    data: serde_json::Value,
) -> serde_json::Value {
    serde_json::json!({"type": "record.created", "collection": collection,
        "record_id": record_id, "data": data})
}

/// The series of a `/metrics` answer: `name{labels}` → value.
pub fn metric_series(body: &str) -> std::collections::HashMap<String, f64> {
    body.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').expect("a series and its value");
            (series.to_owned(), value.parse().expect("a number"))
        })
        .collect()
}

/// One HTTP/1.1 request on a fresh connection (hyper's client); returns
/// status and body.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> std::io::Result<(u16, String)> {
    let (status, _, body) = http_with(addr, method, path, "", body).await?;
    Ok((status, body))
}

/// Sends `request` on a fresh connection to `addr` and returns the
/// response, its body not yet read.
async fn send(
    addr: SocketAddr,
    request: hyper::Request<http_body_util::Full<bytes::Bytes>>,
) -> std::io::Result<hyper::Response<hyper::body::Incoming>> {
    let stream = TcpStream::connect(addr).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(std::io::Error::other)?;
    tokio::spawn(connection);
    sender
        .send_request(request)
        .await
        .map_err(std::io::Error::other)
}

/// A request for `path` with extra header lines (`Name: value\r\n` each).
fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &str,
) -> hyper::http::request::Builder {
    let mut request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string())
        // One request per connection, closed by the server once answered,
        // so the next test step never races this connection's end.
        .header("connection", "close");
    for line in headers.split("\r\n").filter(|l| !l.is_empty()) {
        let (name, value) = line.split_once(':').expect("a header line");
        request = request.header(name.trim(), value.trim());
    }
    request
}

/// The status line and headers of `response`, lower case, a line each.
fn head_of<B>(response: &hyper::Response<B>) -> String {
    let mut head = format!("http/1.1 {}\r\n", response.status());
    for (name, value) in response.headers() {
        head.push_str(&format!("{name}: {}\r\n", value.to_str().unwrap_or("")));
    }
    head.to_ascii_lowercase()
}

/// Like [`http`], with extra header lines (each ending in `\r\n`);
/// returns status, the response head (lowercase) and body.
pub async fn http_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &str,
    body: &str,
) -> std::io::Result<(u16, String, String)> {
    use http_body_util::BodyExt;
    let request = request(addr, method, path, headers)
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(
            body.to_owned(),
        )))
        .map_err(std::io::Error::other)?;
    let response = send(addr, request).await?;
    let (status, head) = (response.status().as_u16(), head_of(&response));
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(std::io::Error::other)?
        .to_bytes();
    Ok((status, head, String::from_utf8_lossy(&body).into_owned()))
}

/// A server-sent event as the client library parsed it.
#[derive(Debug, Default, Clone)]
pub struct SseEvent {
    pub event: String,
    pub id: Option<String>,
    pub data: String,
}

/// A response body as it arrives, chunk by chunk.
pub type RawBody =
    std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<bytes::Bytes, hyper::Error>> + Send>>;

/// Opens an SSE stream: its status, head (lowercase) and raw body.
pub async fn sse_body(addr: SocketAddr, path: &str, headers: &str) -> (u16, String, RawBody) {
    use http_body_util::BodyExt;
    let request = request(addr, "GET", path, headers)
        .header("accept", "text/event-stream")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let response = within("SSE response headers", send(addr, request))
        .await
        .unwrap();
    let (status, head) = (response.status().as_u16(), head_of(&response));
    (
        status,
        head,
        Box::pin(response.into_body().into_data_stream()),
    )
}

/// An SSE stream read with hyper's client and the `eventsource-stream`
/// parser.
pub struct SseReader {
    events: eventsource_stream::EventStream<RawBody>,
    pub status: u16,
    pub head: String,
}

impl SseReader {
    pub async fn open(addr: SocketAddr, path: &str, headers: &str) -> SseReader {
        use eventsource_stream::Eventsource;
        let (status, head, body) = sse_body(addr, path, headers).await;
        SseReader {
            events: body.eventsource(),
            status,
            head,
        }
    }

    /// The next event; `None` at the end of the stream.
    pub async fn next(&mut self) -> Option<SseEvent> {
        use futures_util::StreamExt;
        let event = within("an SSE event", self.events.next()).await?.ok()?;
        Some(SseEvent {
            event: event.event,
            id: Some(event.id).filter(|id| !id.is_empty()),
            data: event.data,
        })
    }

    /// The next event of type `kind`, skipping others.
    pub async fn next_of(&mut self, kind: &str) -> SseEvent {
        loop {
            let event = self.next().await.expect("the stream goes on");
            if event.event == kind {
                return event;
            }
        }
    }
}

/// Opens a gRPC subscription and waits for its `subscribed` confirmation, so
/// events published afterwards are guaranteed to reach it.
pub async fn grpc_subscribe(
    client: &mut RealtimeClient<Channel>,
    request: proto::SubscribeRequest,
) -> tonic::Streaming<proto::SubscribeResponse> {
    let mut stream = client.subscribe(request).await.unwrap().into_inner();
    let first = within("subscribed", stream.message())
        .await
        .unwrap()
        .expect("a first message");
    assert!(
        matches!(
            first.kind,
            Some(proto::subscribe_response::Kind::Subscribed(_))
        ),
        "first message is `subscribed`, got {first:?}"
    );
    stream
}

/// A gRPC request carrying `credential` (a token or API key) as a bearer
/// credential, or none.
pub fn authorized<T>(message: T, credential: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(credential) = credential {
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {credential}").parse().unwrap(),
        );
    }
    request
}

/// The next event of a gRPC subscription.
pub async fn next_event(stream: &mut tonic::Streaming<proto::SubscribeResponse>) -> proto::Event {
    let message = within("an event", stream.message())
        .await
        .unwrap()
        .expect("the stream goes on");
    match message.kind {
        Some(proto::subscribe_response::Kind::Event(event)) => event,
        other => panic!("expected an event, got {other:?}"),
    }
}

pub fn text_subscription(collection: &str, filter: Option<&str>) -> proto::SubscribeRequest {
    proto::SubscribeRequest {
        collection: collection.into(),
        filter: filter.map(|f| proto::subscribe_request::Filter::Text(f.into())),
        ..Default::default()
    }
}

/// A record.created event for gRPC Publish.
pub fn created(collection: &str, record_id: &str, data: serde_json::Value) -> proto::Event {
    proto::Event {
        r#type: proto::EventType::RecordCreated as i32,
        collection: collection.into(),
        record_id: record_id.into(),
        data: Some(strom::edge::grpc::struct_from_json(&data)),
        ..Default::default()
    }
}

/// A real nats-server with JetStream, on a free port, stopped on drop.
pub struct NatsServer {
    child: Child,
    pub url: String,
    _store: TempDir,
}

impl NatsServer {
    /// The binary: `$STROM_NATS_SERVER`, else the one `scripts/test`
    /// installs under `.tools/`, else `nats-server` on the PATH.
    fn binary() -> PathBuf {
        if let Ok(path) = std::env::var("STROM_NATS_SERVER") {
            return path.into();
        }
        let local = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".tools/nats/bin/nats-server");
        if local.exists() {
            return local;
        }
        "nats-server".into()
    }

    pub fn start() -> NatsServer {
        Self::start_with(&["-js"])
    }

    /// A nats-server with `flags` (`-js` for JetStream) besides its address
    /// and store.
    pub fn start_with(flags: &[&str]) -> NatsServer {
        let store = TempDir::new("nats");
        let mut args: Vec<String> = flags.iter().map(|f| f.to_string()).collect();
        args.extend(["-a", "127.0.0.1", "-p", "-1", "-sd"].map(String::from));
        args.push(store.0.display().to_string());
        let (child, url) = spawn_nats(&args);
        NatsServer {
            child,
            url,
            _store: store,
        }
    }
}

/// Starts nats-server with `args` and waits until it is ready; returns the
/// process and its client URL.
fn spawn_nats(args: &[String]) -> (Child, String) {
    let mut child = Command::new(NatsServer::binary())
        .args(args)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot start nats-server ({e}); run scripts/test, which installs it, or set STROM_NATS_SERVER"
            )
        });
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let mut url = None;
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some((_, rest)) = line.split_once("Listening for client connections on ") {
            url = Some(format!("nats://{}", rest.trim()));
        }
        if line.contains("Server is ready") {
            break;
        }
    }
    // Keep draining the log so the server never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (child, url.expect("nats-server printed its client address"))
}

/// A free TCP port on 127.0.0.1 (free when asked; nothing holds it).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A cluster of nats-servers with JetStream on loopback, whose members can
/// be killed (SIGKILL) and restarted with their store.
pub struct NatsCluster {
    members: Vec<(Vec<String>, Option<Child>)>,
    /// Every member's client URL, comma-separated.
    pub urls: String,
    _stores: Vec<TempDir>,
}

impl NatsCluster {
    pub fn start(size: usize) -> NatsCluster {
        let ports: Vec<(u16, u16)> = (0..size).map(|_| (free_port(), free_port())).collect();
        let routes = ports
            .iter()
            .map(|(_, cluster)| format!("nats://127.0.0.1:{cluster}"))
            .collect::<Vec<_>>()
            .join(",");
        let stores: Vec<TempDir> = (0..size).map(|_| TempDir::new("nats-cluster")).collect();
        let members = ports
            .iter()
            .zip(&stores)
            .enumerate()
            .map(|(i, ((client, cluster), store))| {
                let args = [
                    "-js",
                    "-a",
                    "127.0.0.1",
                    "-p",
                    &client.to_string(),
                    "-sd",
                    &store.0.display().to_string(),
                    "--name",
                    &format!("n{i}"),
                    "--cluster_name",
                    "strom",
                    "--cluster",
                    &format!("nats://127.0.0.1:{cluster}"),
                    "--routes",
                    &routes,
                ]
                .map(String::from)
                .to_vec();
                (args, None)
            })
            .collect();
        let urls = ports
            .iter()
            .map(|(client, _)| format!("nats://127.0.0.1:{client}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = NatsCluster {
            members,
            urls,
            _stores: stores,
        };
        for i in 0..size {
            cluster.restart(i);
        }
        cluster
    }

    /// SIGKILL for member `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].1.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts member `i` again (it must not be running), with its store.
    pub fn restart(&mut self, i: usize) {
        assert!(self.members[i].1.is_none(), "n{i} is running");
        let (child, _) = spawn_nats(&self.members[i].0);
        self.members[i].1 = Some(child);
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}

impl NatsServer {
    /// Stops (`STOP`) or continues (`CONT`) the server's process: stopped,
    /// it keeps its connections open and answers nothing.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{signal}");
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> TempDir {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "strom-{prefix}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A `strom serve` process, for tests that kill a node outright.
pub struct StromProcess {
    child: Child,
    pub addr: SocketAddr,
}

impl StromProcess {
    pub fn start(args: &[&str]) -> StromProcess {
        let mut child = Command::new(env!("CARGO_BIN_EXE_strom"))
            .arg("serve")
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            // STROM_TEST_LOG (e.g. "warn,strom::bus::nats=debug") shows
            // more of what a failing multi-node test's servers did.
            .env(
                "STROM_LOG",
                std::env::var("STROM_TEST_LOG").unwrap_or("warn".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start strom");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let line = lines.next().expect("strom printed its address").unwrap();
        let addr = line
            .strip_prefix("listening on http://")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .parse()
            .unwrap();
        std::thread::spawn(move || for _ in lines {});
        StromProcess { child, addr }
    }

    /// SIGTERM: the node drains (see `docs/protocol.md`).
    pub fn terminate(&self) {
        // SAFETY: signals our own child, which has not been reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
    }

    /// Waits for the process to exit, and says whether it exited cleanly.
    pub fn wait(&mut self) -> bool {
        self.child.wait().is_ok_and(|status| status.success())
    }

    /// SIGKILL: no goodbye to anyone.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        http(self.addr, "GET", path, "").await.unwrap()
    }
}

impl Drop for StromProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A WebSocket client of the realtime endpoint that speaks JSON.
pub struct WsClient {
    socket: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    /// The `data` of the `connected` greeting.
    pub greeting: serde_json::Value,
}

impl WsClient {
    /// Connects with `query` (e.g. `?token=...`); an HTTP refusal is its
    /// status code.
    pub async fn connect(addr: SocketAddr, query: &str) -> Result<WsClient, u16> {
        use futures_util::StreamExt;
        let url = format!("ws://{addr}/api/v1/ws/realtime{query}");
        match tokio_tungstenite::connect_async(url).await {
            Ok((mut socket, _)) => {
                let greeting = within("the greeting", socket.next())
                    .await
                    .unwrap()
                    .unwrap();
                let greeting: serde_json::Value =
                    serde_json::from_str(greeting.to_text().unwrap()).unwrap();
                assert_eq!(greeting["type"], "connected");
                Ok(WsClient {
                    socket,
                    greeting: greeting["data"].clone(),
                })
            }
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                Err(response.status().as_u16())
            }
            Err(other) => panic!("{other}"),
        }
    }

    pub async fn send(&mut self, value: serde_json::Value) {
        use futures_util::SinkExt;
        self.socket
            .send(tokio_tungstenite::tungstenite::Message::text(
                value.to_string(),
            ))
            .await
            .unwrap();
    }

    pub async fn send_text(&mut self, text: &str) {
        use futures_util::SinkExt;
        self.socket
            .send(tokio_tungstenite::tungstenite::Message::text(text))
            .await
            .unwrap();
    }

    pub async fn send_binary(&mut self, bytes: Vec<u8>) {
        use futures_util::SinkExt;
        self.socket
            .send(tokio_tungstenite::tungstenite::Message::binary(bytes))
            .await
            .unwrap();
    }

    /// The next JSON message, heartbeat `ping`s included; a close frame
    /// reads as `{"type": "close", "code": N}`; `None` once the socket is
    /// gone.
    pub async fn next_message(&mut self) -> Option<serde_json::Value> {
        use futures_util::StreamExt;
        use tokio_tungstenite::tungstenite::Message;
        loop {
            match within("a WebSocket message", self.socket.next()).await? {
                Ok(Message::Text(text)) => return Some(serde_json::from_str(&text).unwrap()),
                Ok(Message::Close(frame)) => {
                    let code = frame.map(|f| u16::from(f.code));
                    return Some(serde_json::json!({"type": "close", "code": code}));
                }
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
    }

    /// The next JSON message that is not a heartbeat `ping`.
    pub async fn next(&mut self) -> Option<serde_json::Value> {
        loop {
            let message = self.next_message().await?;
            if message["type"] != "ping" {
                return Some(message);
            }
        }
    }

    /// Like [`WsClient::next`], for a connection that must still be open.
    pub async fn reply(&mut self) -> serde_json::Value {
        self.next().await.expect("the connection is open")
    }

    /// The next message must be an `error` whose message contains `containing`.
    pub async fn expect_error(&mut self, containing: &str) -> serde_json::Value {
        let reply = self.reply().await;
        assert_eq!(reply["type"], "error", "{reply}");
        let message = reply["data"]["message"].as_str().unwrap();
        assert!(
            message.contains(containing),
            "{message:?} lacks {containing:?}"
        );
        reply
    }

    /// Waits for the server's close frame and returns its code.
    pub async fn expect_close(&mut self) -> u16 {
        loop {
            let message = self.next_message().await.expect("a close frame");
            if message["type"] == "close" {
                return message["code"].as_u64().expect("a close code") as u16;
            }
        }
    }

    /// Sends an action and returns the next message.
    pub async fn request(&mut self, value: serde_json::Value) -> serde_json::Value {
        self.send(value).await;
        self.next().await.expect("a reply")
    }

    /// Subscribes to `collection` and checks the `subscribed` reply.
    pub async fn subscribe(&mut self, collection: &str) {
        self.subscribe_with(serde_json::json!({"action": "subscribe", "collection": collection}))
            .await;
    }

    /// Sends a `subscribe` action and checks the `subscribed` reply.
    pub async fn subscribe_with(&mut self, action: serde_json::Value) -> serde_json::Value {
        let reply = self.request(action).await;
        assert_eq!(reply["type"], "subscribed", "{reply}");
        reply
    }

    pub async fn close(mut self) {
        let _ = self.socket.close(None).await;
    }
}

/// A throwaway PostgreSQL server (Debian's binaries) with `wal_level =
/// logical`, on a free port, stopped and removed on drop.
pub struct PostgresServer {
    child: Child,
    pub url: String,
    pub port: u16,
    _data: TempDir,
}

impl PostgresServer {
    /// `$STROM_PG_BIN`, else the newest `/usr/lib/postgresql/*/bin`.
    fn bin_dir() -> PathBuf {
        if let Ok(dir) = std::env::var("STROM_PG_BIN") {
            return dir.into();
        }
        let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL is not installed: run scripts/test, which installs it")
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|p| p.join("postgres").exists())
            .collect();
        versions.sort();
        versions.pop().expect("a PostgreSQL server binary")
    }

    /// Runs as the `postgres` user when we are root (PostgreSQL refuses root).
    fn command(program: PathBuf) -> Command {
        use std::os::unix::process::CommandExt;
        let mut command = Command::new(program);
        if running_as_root() {
            let (uid, gid) = postgres_user();
            command.uid(uid).gid(gid);
        }
        command
    }

    pub fn start() -> PostgresServer {
        PostgresServer::start_with(&[])
    }

    /// With more `-c name=value` settings, which win over the defaults.
    pub fn start_with(settings: &[&str]) -> PostgresServer {
        let data = TempDir::new("pg");
        if running_as_root() {
            let (uid, gid) = postgres_user();
            std::os::unix::fs::chown(&data.0, Some(uid), Some(gid)).unwrap();
        }
        let bin = Self::bin_dir();
        let init = Self::command(bin.join("initdb"))
            .args(["-D"])
            .arg(data.0.join("db"))
            .args(["-U", "strom", "--auth=trust", "-E", "UTF8", "--no-sync"])
            .output()
            .expect("initdb runs");
        assert!(
            init.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&init.stderr)
        );
        let port = free_port();
        let child = Self::command(bin.join("postgres"))
            .arg("-D")
            .arg(data.0.join("db"))
            .args(["-p", &port.to_string(), "-k"])
            .arg(&data.0)
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "wal_level=logical",
            ])
            .args(["-c", "fsync=off", "-c", "max_slot_wal_keep_size=1GB"])
            .args(settings.iter().flat_map(|s| ["-c", s]))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("postgres starts");
        let url = format!("host=127.0.0.1 port={port} user=strom dbname=postgres");
        let server = PostgresServer {
            child,
            url,
            port,
            _data: data,
        };
        // Accepting TCP is not enough: until recovery ends, connections are
        // refused with "the database system is starting up".
        let deadline = std::time::Instant::now() + PATIENCE;
        loop {
            let ready = Command::new(bin.join("pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-p", &port.to_string()])
                .status()
                .is_ok_and(|status| status.success());
            if ready {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "postgres did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        let deadline = std::time::Instant::now() + PATIENCE;
        loop {
            match tokio_postgres::connect(&self.url, tokio_postgres::NoTls).await {
                Ok((client, connection)) => {
                    tokio::spawn(connection);
                    return client;
                }
                Err(e) if std::time::Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("cannot connect to postgres: {e}"),
            }
        }
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether this process runs as root (effective uid 0).
fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// The uid and gid of the `postgres` user the Debian package creates.
fn postgres_user() -> (u32, u32) {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
    let line = passwd
        .lines()
        .find(|l| l.starts_with("postgres:"))
        .expect("a postgres user (the Debian postgresql package creates it)");
    let fields: Vec<&str> = line.split(':').collect();
    (fields[2].parse().unwrap(), fields[3].parse().unwrap())
}
