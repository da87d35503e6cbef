//! The Server-Sent Events edge: `GET /api/v1/realtime[/{collection}]`.
//!
//! `query=` takes the text filter form; a filter that does not parse answers
//! 400 with a JSON error before any stream starts. The stream opens with a
//! `connected` event; each event has `event:` = its type, `id:` = its seq and
//! `data:` = the event JSON; comment lines keep idle proxies from closing it.
//! When the server ends the stream (overflow, an expired token) it sends a
//! `stream_error` event saying why, then the same as `error` (deprecated:
//! it collides with `EventSource`'s own `error` event), then closes. A
//! draining server sends `reconnect` with the position to resume after.

use super::Checked;
use super::errors::{ApiError, ErrorKind};
use super::{AppState, connected_data, event_json};
use crate::engine::{Connection, Delivery, EndReason, Received, SubscriptionSpec, Transport};
use crate::event::{Position, WILDCARD, Wire};
use crate::filter::Filter;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, header};
use axum::response::Response;
use bytes::{BufMut, Bytes, BytesMut};
use serde::Deserialize;
use serde_json::json;
use std::convert::Infallible;
use tokio::time::Interval;

#[derive(Debug, Deserialize)]
pub struct SseParams {
    query: Option<String>,
    /// Resume after this seq, like a `Last-Event-ID` header (which wins);
    /// parsed here, so a bad one gets the JSON error.
    since: Option<String>,
    token: Option<String>,
    /// Presence of an anonymous client on an open server.
    user_id: Option<String>,
    user_name: Option<String>,
}

pub async fn stream_all(
    State(app): State<AppState>,
    Checked(Query(params)): Checked<Query<SseParams>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    open(app, WILDCARD.to_owned(), params, &headers).await
}

pub async fn stream_collection(
    State(app): State<AppState>,
    Checked(Path(collection)): Checked<Path<String>>,
    Checked(Query(params)): Checked<Query<SseParams>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    open(app, collection, params, &headers).await
}

/// The resume position: `Last-Event-ID` (sent by browsers when they
/// reconnect), else `?since=`.
fn resume_position(params: &SseParams, headers: &HeaderMap) -> Result<Option<Position>, ApiError> {
    let (given, what) = match headers.get("last-event-id") {
        Some(value) => (Some(value.to_str().unwrap_or("")), "Last-Event-ID"),
        None => (params.since.as_deref(), "since"),
    };
    given.map(str::parse).transpose().map_err(|_| {
        ApiError::invalid(format!(
            "{what} must be an event's seq (a non-negative integer), or for `*` over several NATS streams a position token like 12,0,40"
        ))
    })
}

fn frame(event: &str, id: Option<u64>, data: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(data.len() + event.len() + 40);
    if let Some(id) = id {
        out.put_slice(format!("id: {id}\n").as_bytes());
    }
    out.put_slice(b"event: ");
    out.put_slice(event.as_bytes());
    out.put_slice(b"\ndata: ");
    out.put_slice(data);
    out.put_slice(b"\n\n");
    out.freeze()
}

fn event_frame(delivery: &Delivery) -> Bytes {
    delivery
        .event
        .encoded(Wire::Sse, delivery.view, || {
            let event = &delivery.event.event;
            // Presence events (seq 0) are not in the log: no `id:`, so they do
            // not move the browser's resume position.
            let id = Some(event.seq).filter(|seq| *seq > 0);
            frame(event.event_type.as_str(), id, &event_json(delivery))
        })
        .clone()
}

/// An event's shared frame with `id:` set to `position` instead.
fn with_id(frame: &Bytes, position: &Position) -> Bytes {
    let rest = frame.strip_prefix(b"id: ").map_or(&frame[..], |line| {
        let end = line.iter().position(|&b| b == b'\n').map_or(0, |i| i + 1);
        &line[end..]
    });
    let mut out = BytesMut::with_capacity(rest.len() + 40);
    out.put_slice(format!("id: {position}\n").as_bytes());
    out.put_slice(rest);
    out.freeze()
}

async fn open(
    app: AppState,
    collection: String,
    params: SseParams,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let since = resume_position(&params, headers)?;
    let resumed_from = since.clone();
    let filter = match params.query.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(text) => Some(Filter::parse(text)?),
    };
    let spec = SubscriptionSpec {
        collection,
        record_id: None,
        filter,
        since,
        echo: false,
    };
    spec.validate()?;
    let principal = super::principal(&app.engine, headers, params.token.as_deref())?;
    let mut connection = app.engine.connect(Transport::Sse, principal)?;
    connection.join_presence(params.user_id.map(|id| (id, params.user_name)));
    let id = match connection.subscribe(spec).await {
        Ok(id) => id,
        // A subscription the bus cannot serve now: an EventSource gives up
        // on an HTTP error, but reconnects (with `Last-Event-ID`) after a
        // stream that ends, so the stream opens to say why and ends.
        Err(error) => {
            let error = ApiError::from(error);
            if error.kind == ErrorKind::Unavailable {
                return Ok(event_stream(Body::from(ending(&error))));
            }
            return Err(error);
        }
    };
    // `*` over several NATS streams: each event's `id:` is the position
    // token, which this stream keeps (see `Position`).
    let position = (connection.head(id).cloned())
        .filter(|head| head.streams() > 1)
        .map(|head| resumed_from.unwrap_or(head));
    let greeting = frame(
        "connected",
        None,
        connected_data(&connection).to_string().as_bytes(),
    );
    let mut keepalive = tokio::time::interval(app.sse_keepalive);
    keepalive.tick().await;
    let state = Stream {
        connection: Some(connection),
        keepalive,
        position,
    };
    let events = futures_util::stream::unfold(state, Stream::next);
    let body = futures_util::StreamExt::chain(
        futures_util::stream::once(async { Ok::<_, Infallible>(greeting) }),
        events,
    );
    Ok(event_stream(Body::from_stream(body)))
}

/// A `text/event-stream` response of `body`.
fn event_stream(body: Body) -> Response {
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .header("x-accel-buffering", "no")
        .body(body)
        .expect("a valid response")
}

/// The last frames of a stream the server ends: `stream_error`, and for
/// older clients `error` (which collides with EventSource's own error
/// event, so `onerror` never sees its data): deprecated.
fn ending(error: &ApiError) -> Bytes {
    let body = error.body().to_string();
    let ending = ["stream_error", "error"].map(|name| frame(name, None, body.as_bytes()));
    Bytes::from(ending.concat())
}

struct Stream {
    connection: Option<Connection>,
    keepalive: Interval,
    /// The position token of a `*` stream over several NATS streams.
    position: Option<Position>,
}

impl Stream {
    async fn next(mut self) -> Option<(Result<Bytes, Infallible>, Stream)> {
        let connection = self.connection.as_mut()?;
        let chunk = tokio::select! {
            received = connection.recv() => match received {
                Ok(Received::Event(delivery)) => match (&mut self.position, delivery.event.partition) {
                    (Some(position), Some(partition)) if delivery.event.event.seq > 0 => {
                        position.set(Some(partition), delivery.event.event.seq);
                        with_id(&event_frame(&delivery), position)
                    }
                    _ => event_frame(&delivery),
                },
                Ok(Received::Reset(notice)) => frame(
                    "reset",
                    None,
                    json!({
                        "since": notice.since.to_json(),
                        "first_available_seq": notice.first_available.to_json(),
                    })
                    .to_string()
                    .as_bytes(),
                ),
                Err(EndReason::Shutdown) => {
                    let since = connection.resume_position().as_ref().map(Position::to_json);
                    self.connection = None;
                    let reason = EndReason::Shutdown.to_string();
                    let hint = json!({"reason": reason, "since": since}).to_string();
                    frame("reconnect", None, hint.as_bytes())
                }
                Err(reason) => {
                    self.connection = None;
                    ending(&ApiError::from(reason))
                }
            },
            _ = self.keepalive.tick() => Bytes::from_static(b": keep-alive\n\n"),
        };
        Some((Ok(chunk), self))
    }
}
