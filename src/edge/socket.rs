//! A client's WebSocket: the handshake (HTTP/1.1 `Upgrade`, and HTTP/2
//! extended `CONNECT`) and the socket the sessions of `ws.rs` and
//! `dialect.rs` talk through.
//!
//! Why not axum's `WebSocket`: fan-out writes the same event frame to
//! thousands of sockets, and through a `Message` each write costs a buffer
//! clone, a UTF-8 check of the frame and a copy by tungstenite's framing.
//! [`ClientSocket`] also takes whole frames encoded once per event
//! ([`put_frame_header`]) and writes them to the connection directly, next
//! to tungstenite, which still reads, answers pings and writes everything
//! else.

use super::errors::{ApiError, ErrorKind, close_code};
use crate::engine::{Connection, EndReason, Received};
use crate::event::Position;
use crate::metrics::{Eviction, METRICS};
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Version, header};
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message};

/// How long closing may wait for the socket. A client that stopped reading
/// would hold it until the write deadline; its connection has already left
/// the engine, so the goodbye is best effort.
pub const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Per-connection read buffer. Clients send small actions, so a small buffer
/// keeps idle connections cheap (tungstenite's default is 128 KiB).
const READ_BUFFER: usize = 1024;

/// A request to open a WebSocket, checked; [`Upgrade::accept`] answers it.
pub struct Upgrade {
    /// `Sec-WebSocket-Key` (HTTP/1.1); HTTP/2 has none.
    key: Option<HeaderValue>,
    on_upgrade: OnUpgrade,
}

/// Why a request is not a WebSocket handshake strom accepts.
#[derive(Debug)]
pub enum NotAnUpgrade {
    /// Not a WebSocket handshake at all, or another version of the
    /// protocol: 426 with `Sec-WebSocket-Version: 13` (RFC 6455 §4.4).
    Required(&'static str),
    /// A WebSocket handshake that is malformed: 400 (RFC 6455 §4.2.1).
    Malformed(&'static str),
}

impl NotAnUpgrade {
    /// The answer, with `body`: 426 or 400, and the version strom speaks.
    pub fn respond(&self, body: serde_json::Value) -> Response {
        let status = match self {
            NotAnUpgrade::Required(_) => StatusCode::UPGRADE_REQUIRED,
            NotAnUpgrade::Malformed(_) => StatusCode::BAD_REQUEST,
        };
        let version = [(header::SEC_WEBSOCKET_VERSION, "13")];
        (status, version, axum::Json(body)).into_response()
    }

    /// What is wrong, for the client.
    pub fn message(&self) -> String {
        let (NotAnUpgrade::Required(why) | NotAnUpgrade::Malformed(why)) = self;
        format!("this endpoint speaks WebSocket only: {why}")
    }
}

/// 426 with `{"error": {"code": "upgrade_required", "message"}}`, or 400
/// with `invalid_argument`.
impl axum::response::IntoResponse for NotAnUpgrade {
    fn into_response(self) -> Response {
        let code = match self {
            NotAnUpgrade::Required(_) => "upgrade_required",
            NotAnUpgrade::Malformed(_) => "invalid_argument",
        };
        self.respond(serde_json::json!({"error": {"code": code, "message": self.message()}}))
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Upgrade {
    type Rejection = NotAnUpgrade;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, NotAnUpgrade> {
        let headers = &parts.headers;
        let key = if parts.version <= Version::HTTP_11 {
            if parts.method != Method::GET {
                return Err(NotAnUpgrade::Required("a WebSocket handshake is a GET"));
            }
            if !has_token(headers, header::CONNECTION, "upgrade")
                || !has_token(headers, header::UPGRADE, "websocket")
            {
                return Err(NotAnUpgrade::Required(
                    "expected `Connection: upgrade` and `Upgrade: websocket`",
                ));
            }
            let mut keys = headers.get_all(header::SEC_WEBSOCKET_KEY).iter();
            let key = match (keys.next(), keys.next()) {
                (Some(key), None) if is_websocket_key(key.as_bytes()) => key,
                (None, _) => return Err(NotAnUpgrade::Malformed("missing Sec-WebSocket-Key")),
                (Some(_), Some(_)) => {
                    return Err(NotAnUpgrade::Malformed("more than one Sec-WebSocket-Key"));
                }
                (Some(_), None) => {
                    return Err(NotAnUpgrade::Malformed(
                        "Sec-WebSocket-Key must be 16 bytes in base64",
                    ));
                }
            };
            Some(key.clone())
        } else {
            let websocket = parts
                .extensions
                .get::<hyper::ext::Protocol>()
                .is_some_and(|p| p.as_str() == "websocket");
            if parts.method != Method::CONNECT || !websocket {
                return Err(NotAnUpgrade::Required(
                    "over HTTP/2 a WebSocket is a CONNECT with :protocol websocket",
                ));
            }
            None
        };
        let mut versions = headers.get_all(header::SEC_WEBSOCKET_VERSION).iter();
        match (
            versions.next().map(|v| v.as_bytes().trim_ascii()),
            versions.next(),
        ) {
            (Some(b"13"), None) => {}
            (Some(version), None) if !version.contains(&b',') => {
                return Err(NotAnUpgrade::Required(
                    "only WebSocket version 13 is supported",
                ));
            }
            (None, _) => return Err(NotAnUpgrade::Required("missing Sec-WebSocket-Version: 13")),
            _ => {
                return Err(NotAnUpgrade::Malformed(
                    "Sec-WebSocket-Version must be one version, 13",
                ));
            }
        }
        let on_upgrade = parts
            .extensions
            .remove::<OnUpgrade>()
            .ok_or(NotAnUpgrade::Required("this connection cannot be upgraded"))?;
        Ok(Upgrade { key, on_upgrade })
    }
}

/// Whether `key` is a `Sec-WebSocket-Key`: 16 bytes in base64, so 22
/// base64 digits and `==` (RFC 6455 §4.1).
fn is_websocket_key(key: &[u8]) -> bool {
    let digit = |b: &u8| b.is_ascii_alphanumeric() || *b == b'+' || *b == b'/';
    key.len() == 24 && key[..22].iter().all(digit) && &key[22..] == b"=="
}

impl Upgrade {
    /// Answers the handshake and runs `session` on `runtime` with the
    /// socket once the client has it. Frames above `max_frame_bytes` are
    /// refused by the session with a clear error; above twice that,
    /// tungstenite drops them unread.
    pub fn accept<F, Fut>(
        self,
        max_frame_bytes: usize,
        runtime: &tokio::runtime::Handle,
        session: F,
    ) -> Response
    where
        F: FnOnce(ClientSocket) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let on_upgrade = self.on_upgrade;
        let hard_limit = max_frame_bytes.saturating_mul(2).max(1024);
        let config = WebSocketConfig::default()
            .read_buffer_size(READ_BUFFER)
            .max_message_size(Some(hard_limit))
            .max_frame_size(Some(hard_limit));
        runtime.spawn(async move {
            // A client gone before the upgrade completed: nothing to serve.
            if let Ok(upgraded) = on_upgrade.await {
                let io = TokioIo::new(upgraded);
                let ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
                // A task of its own: this one's state (the handshake, what
                // `session` captured) is freed instead of living as long.
                tokio::spawn(session(ClientSocket {
                    ws,
                    encoded: Vec::new(),
                    written: 0,
                    max_frame_bytes,
                }));
            }
        });
        let mut response = Response::new(axum::body::Body::empty());
        if let Some(key) = self.key {
            *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            let headers = response.headers_mut();
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            let accept = derive_accept_key(key.as_bytes());
            headers.insert(
                header::SEC_WEBSOCKET_ACCEPT,
                HeaderValue::from_str(&accept).expect("base64 is a header value"),
            );
        }
        response
    }
}

/// A client's WebSocket, for tungstenite messages and for frames encoded
/// beforehand.
pub struct ClientSocket {
    ws: WebSocketStream<TokioIo<Upgraded>>,
    /// Whole frames encoded beforehand, of which `written` bytes are out.
    encoded: Vec<u8>,
    written: usize,
    /// The largest text frame a client may send.
    max_frame_bytes: usize,
}

impl ClientSocket {
    /// The next message from the client; `None` once it is gone.
    pub async fn next(&mut self) -> Option<Result<Message, tungstenite::Error>> {
        self.ws.next().await
    }

    /// Where to put whole frames (see [`put_frame_header`]) for
    /// [`ClientSocket::write_encoded`] to write.
    pub fn encoded(&mut self) -> &mut Vec<u8> {
        &mut self.encoded
    }

    /// Writes what [`ClientSocket::encoded`] holds. Cancel-safe: a write
    /// cut short goes on where it stopped at the next write or send, so
    /// frames are never cut in two.
    pub async fn write_encoded(&mut self) -> std::io::Result<()> {
        if self.encoded.is_empty() {
            return Ok(());
        }
        // Whatever tungstenite holds (a pong, say) goes first, whole.
        self.ws.flush().await.map_err(std::io::Error::other)?;
        let io = self.ws.get_mut();
        while self.written < self.encoded.len() {
            match io.write(&self.encoded[self.written..]).await? {
                0 => return Err(std::io::ErrorKind::WriteZero.into()),
                n => self.written += n,
            }
        }
        io.flush().await?;
        self.encoded.clear();
        self.written = 0;
        // A big batch leaves a big buffer: give it back.
        if self.encoded.capacity() > 64 * 1024 {
            self.encoded = Vec::new();
        }
        Ok(())
    }

    /// Queues a message without flushing (after any encoded frames).
    pub async fn feed(&mut self, message: Message) -> Result<(), tungstenite::Error> {
        self.write_encoded().await?;
        self.ws.feed(message).await
    }

    /// Writes out everything queued.
    pub async fn flush(&mut self) -> Result<(), tungstenite::Error> {
        self.write_encoded().await?;
        self.ws.flush().await
    }

    /// Sends a message (after any encoded frames).
    pub async fn send(&mut self, message: Message) -> Result<(), tungstenite::Error> {
        self.write_encoded().await?;
        self.ws.send(message).await
    }

    /// Sends `last` (an error message) and a close frame with `code` and
    /// `reason`, within [`CLOSE_GRACE`].
    pub async fn close_with(&mut self, last: Message, code: u16, reason: &str) {
        let close = close_frame(code, reason);
        let goodbye = async {
            let _ = self.feed(last).await;
            let _ = self.send(close).await;
        };
        let _ = tokio::time::timeout(CLOSE_GRACE, goodbye).await;
    }

    /// Fails the connection (RFC 6455 §7.1.7): a close frame with `code`
    /// (1002 for a protocol error, 1007 for text that is not UTF-8) and
    /// `reason`, within [`CLOSE_GRACE`].
    pub async fn fail(&mut self, code: u16, reason: &str) {
        let close = close_frame(code, reason);
        let _ = tokio::time::timeout(CLOSE_GRACE, self.send(close)).await;
    }

    /// Reads and drops what the client still sends, until it closes or
    /// [`CLOSE_GRACE`] ends: closing a socket with unread bytes resets it,
    /// and the client may then never see the close frame just sent (after
    /// a frame too large to read, its payload is still on the way).
    pub async fn discard_input(&mut self) {
        use tokio::io::AsyncReadExt;
        let io = self.ws.get_mut();
        let mut sink = vec![0; 16 * 1024];
        let drain = async { while matches!(io.read(&mut sink).await, Ok(n) if n > 0) {} };
        let _ = tokio::time::timeout(CLOSE_GRACE, drain).await;
    }

    /// Ends the WebSocket within [`CLOSE_GRACE`]: sends a close frame, or
    /// the answer to the client's (the sink's `close`; the stream's own
    /// `close` refuses to write once the client has closed).
    pub async fn close(&mut self) {
        let _ = tokio::time::timeout(CLOSE_GRACE, SinkExt::close(&mut self.ws)).await;
    }
}

/// A close frame with `code` and `reason`, cut at a character boundary to
/// fit a control frame's 125 bytes with the code (RFC 6455 §5.5).
fn close_frame(code: u16, reason: &str) -> Message {
    let fits = reason
        .char_indices()
        .map(|(at, c)| at + c.len_utf8())
        .take_while(|&end| end <= 123)
        .last()
        .unwrap_or(0);
    Message::Close(Some(CloseFrame {
        code: code.into(),
        reason: reason[..fits].to_owned().into(),
    }))
}

/// Whether a session goes on after handling something.
pub enum Step {
    Continue,
    Close,
}

/// A WebSocket session of one protocol: what it says, and how it answers
/// the client. [`run`] is the loop every session shares, and does the rest
/// (non-text frames, sizes, idle clients, closing).
pub trait Session: Send {
    /// Added to the error that closes an idle client.
    const IDLE_HINT: &'static str = "";
    /// The socket and the engine connection, to wait on both at once.
    fn parts(&mut self) -> (&mut ClientSocket, &mut Connection);
    /// The protocol's error message for `error`.
    fn error_message(&self, error: &ApiError) -> Message;
    /// What the client gets first, if anything.
    fn greet(&mut self) -> impl Future<Output = Step> + Send {
        async { Step::Continue }
    }
    /// A text message from the client, within the size limit.
    fn on_text(&mut self, text: &str) -> impl Future<Output = Step> + Send;
    /// Deliveries to write: `first`, and what else is at hand.
    fn write_received(&mut self, first: Received) -> impl Future<Output = Step> + Send;
    /// The heartbeat timer fired and the client is not idle.
    fn heartbeat(&mut self) -> impl Future<Output = Step> + Send;
    /// What tells the client, when the server drains, to reconnect and
    /// resume after `since`; protocols without such a message send their
    /// error, and the close code says the rest.
    fn reconnect_message(&self, _since: Option<Position>) -> Option<Message> {
        None
    }
}

/// When a session beats, and when it gives up on a silent client.
pub struct Liveness {
    pub heartbeat_every: Duration,
    pub idle_after: Duration,
}

/// Awaits `write` unless the connection is `evicted` meanwhile
/// (`Connection::evicted`): a client that blocks the write is then let go.
/// What it had queued goes with it, and `recv` ends with the reason.
pub async fn unless_evicted<E>(
    write: impl Future<Output = Result<(), E>>,
    evicted: impl Future<Output = ()>,
) -> Step {
    tokio::select! {
        written = write => match written {
            Ok(()) => Step::Continue,
            Err(_) => Step::Close,
        },
        () = evicted => Step::Continue,
    }
}

/// Sends `message` and says whether the session goes on.
async fn send<S: Session>(session: &mut S, message: Message) -> Step {
    match session.parts().0.send(message).await {
        Ok(()) => Step::Continue,
        Err(_) => Step::Close,
    }
}

/// Sends the protocol's error for `error`, then a close frame with `code`.
pub async fn close_with<S: Session>(session: &mut S, error: ApiError, code: u16) -> Step {
    let last = session.error_message(&error);
    session
        .parts()
        .0
        .close_with(last, code, &error.message)
        .await;
    Step::Close
}

/// Says goodbye to a client of a draining server: reconnect (elsewhere) and
/// resume after the last event received here, then close 1012.
async fn drain<S: Session>(session: &mut S) -> Step {
    let since = session.parts().1.resume_position();
    let error = ApiError::from(EndReason::Shutdown);
    let last = session
        .reconnect_message(since)
        .unwrap_or_else(|| session.error_message(&error));
    session
        .parts()
        .0
        .close_with(last, close_code::SERVICE_RESTART, &error.message)
        .await;
    Step::Close
}

/// Handles a message from the client: text within the size limit goes to
/// the session; binary gets an error; oversized text closes.
async fn on_frame<S: Session>(session: &mut S, frame: Message) -> Step {
    let text = match frame {
        Message::Text(text) => text,
        Message::Binary(_) => {
            let error = ApiError::invalid("binary frames are not supported: send JSON text");
            let message = session.error_message(&error);
            return send(session, message).await;
        }
        Message::Close(_) => return Step::Close,
        Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => return Step::Continue,
    };
    let limit = session.parts().0.max_frame_bytes;
    if text.len() > limit {
        let error = ApiError::invalid(format!(
            "frame of {} bytes is larger than the limit of {limit} bytes",
            text.len()
        ));
        return close_with(session, error, close_code::TOO_BIG).await;
    }
    session.on_text(&text).await
}

/// What happened on a session's connection.
enum Happening {
    Frame(Message),
    ReadError(tungstenite::Error),
    Gone,
    Delivery(Received),
    Ended(EndReason),
    Tick,
}

/// Serves `session` until either side ends it: messages from the client,
/// deliveries and the end of deliveries (overflow, shutdown, an expired
/// token) from the engine, and a heartbeat, or the end of a client silent
/// for too long. Each is handled in a boxed future: they are rare next to
/// waiting, and their state would otherwise make every idle connection's
/// task large.
pub async fn run<S: Session>(mut session: S, liveness: Liveness) {
    if let Step::Close = Box::pin(session.greet()).await {
        return;
    }
    let mut heartbeat = tokio::time::interval(liveness.heartbeat_every);
    heartbeat.tick().await;
    let mut last_heard = tokio::time::Instant::now();
    loop {
        let happened = {
            let (socket, connection) = session.parts();
            tokio::select! {
                incoming = socket.next() => match incoming {
                    Some(Ok(frame)) => Happening::Frame(frame),
                    Some(Err(error)) => Happening::ReadError(error),
                    None => Happening::Gone,
                },
                delivery = connection.recv() => match delivery {
                    Ok(received) => Happening::Delivery(received),
                    Err(reason) => Happening::Ended(reason),
                },
                _ = heartbeat.tick() => Happening::Tick,
            }
        };
        let step = match happened {
            Happening::Frame(frame) => {
                last_heard = tokio::time::Instant::now();
                Box::pin(on_frame(&mut session, frame)).await
            }
            Happening::ReadError(tungstenite::Error::Capacity(_)) => {
                let limit = session.parts().0.max_frame_bytes;
                let error = ApiError::invalid(format!("frame larger than {limit} bytes"));
                let step = Box::pin(close_with(&mut session, error, close_code::TOO_BIG)).await;
                Box::pin(session.parts().0.discard_input()).await;
                step
            }
            Happening::ReadError(error) => {
                if let Some((code, reason)) = failure(&error) {
                    Box::pin(session.parts().0.fail(code, &reason)).await;
                }
                Step::Close
            }
            Happening::Gone => Step::Close,
            Happening::Delivery(received) => Box::pin(session.write_received(received)).await,
            Happening::Ended(EndReason::Shutdown) => Box::pin(drain(&mut session)).await,
            Happening::Ended(reason) => {
                let error = ApiError::from(reason);
                let code = error.close_code();
                Box::pin(close_with(&mut session, error, code)).await
            }
            Happening::Tick if last_heard.elapsed() >= liveness.idle_after => {
                METRICS.evicted(Eviction::Idle);
                let connection = session.parts().1.name();
                tracing::info!(connection, "connection ended by the server: idle");
                let error = ApiError::new(
                    ErrorKind::Unavailable,
                    format!(
                        "no message from the client for {} s{}",
                        last_heard.elapsed().as_secs(),
                        S::IDLE_HINT
                    ),
                );
                Box::pin(close_with(&mut session, error, close_code::IDLE)).await
            }
            Happening::Tick => Box::pin(session.heartbeat()).await,
        };
        if let Step::Close = step {
            break;
        }
    }
    session.parts().0.close().await;
}

/// The close code and reason for a client that broke the protocol (RFC
/// 6455 §7.4.1), or `None` where the connection itself failed.
fn failure(error: &tungstenite::Error) -> Option<(u16, String)> {
    match error {
        tungstenite::Error::Protocol(violation) => {
            Some((close_code::PROTOCOL_ERROR, violation.to_string()))
        }
        tungstenite::Error::Utf8(_) => Some((
            close_code::INVALID_DATA,
            "a text frame that is not UTF-8".into(),
        )),
        _ => None,
    }
}

/// Whether header `name` lists `token` (comma-separated, any case).
fn has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|value| {
        value
            .as_bytes()
            .split(|b| *b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
    })
}

/// The header of an unmasked, final server frame of `opcode` carrying
/// `len` bytes (RFC 6455 §5.2), appended to `out`.
pub fn put_frame_header(out: &mut Vec<u8>, opcode: u8, len: usize) {
    out.push(0x80 | opcode);
    match len {
        0..=125 => out.push(len as u8),
        126..=0xffff => {
            out.push(126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            out.push(127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
}

/// The length of the header of `frame`, a frame [`put_frame_header`] began.
pub fn frame_header_len(frame: &[u8]) -> usize {
    match frame[1] & 0x7f {
        126 => 4,
        127 => 10,
        _ => 2,
    }
}

/// The opcode of a text frame.
pub const TEXT: u8 = 0x1;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_reasons_are_cut_to_fit_a_control_frame_at_a_character() {
        let reason = |message: Message| match message {
            Message::Close(Some(frame)) => frame.reason.to_string(),
            other => panic!("{other:?}"),
        };
        assert_eq!(reason(close_frame(1002, "short")), "short");
        let long = "é".repeat(100);
        let cut = reason(close_frame(1002, &long));
        assert!(cut.len() <= 123 && cut.len() >= 122, "{}", cut.len());
        assert!(long.starts_with(&cut));
    }

    #[test]
    fn websocket_keys_are_16_bytes_in_base64() {
        assert!(is_websocket_key(b"dGhlIHNhbXBsZSBub25jZQ=="));
        for key in [
            &b""[..],
            b"dGhlIHNhbXBsZSBub25jZQ",
            b"dGhlIHNhbXBsZSBub25jZQ=x",
            b"dGhlIHNhbXBsZSBub25j*Q==",
        ] {
            assert!(!is_websocket_key(key), "{}", String::from_utf8_lossy(key));
        }
    }

    #[test]
    fn frame_headers_use_the_shortest_length_form() {
        let header = |len| {
            let mut out = Vec::new();
            put_frame_header(&mut out, TEXT, len);
            out
        };
        assert_eq!(header(5), [0x81, 5]);
        assert_eq!(header(125), [0x81, 125]);
        assert_eq!(header(126), [0x81, 126, 0, 126]);
        assert_eq!(header(65_535), [0x81, 126, 0xff, 0xff]);
        assert_eq!(header(65_536), [0x81, 127, 0, 0, 0, 0, 0, 1, 0, 0]);
        for len in [5, 126, 65_536] {
            assert_eq!(frame_header_len(&header(len)), header(len).len());
        }
    }

    #[test]
    fn header_tokens_are_listed_in_any_case() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        assert!(has_token(&headers, header::CONNECTION, "upgrade"));
        assert!(!has_token(&headers, header::UPGRADE, "websocket"));
    }
}
