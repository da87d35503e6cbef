//! Edges: the transports. Each translates its wire format to engine calls
//! and back; none holds delivery logic of its own. All share one port and
//! one error map ([`errors`]).

pub mod errors;
pub mod grpc;
pub mod rest;
pub mod sse;
pub mod ws;

use crate::auth::Principal;
use crate::codec::encode_event;
use crate::engine::{Connection, Delivery, Engine};
use crate::event::format_timestamp;
use axum::Router;
use axum::http::header::AUTHORIZATION;
use axum::http::{HeaderMap, HeaderValue};
use axum::routing::{get, post};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio_util::task::TaskTracker;

/// What every HTTP handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub engine: Engine,
    pub ws: ws::WsConfig,
    pub sse_keepalive: Duration,
    /// WebSocket sessions, so shutdown can wait for their goodbyes.
    pub tasks: TaskTracker,
    /// `--cors-origin`: the origins a browser may connect from; empty
    /// means any.
    pub origins: Arc<[HeaderValue]>,
    /// `--ops-token`: the credential of stats and metrics.
    pub ops_token: Option<Arc<str>>,
}

/// The HTTP routes of the bridge (WebSocket, SSE, REST).
pub fn http_routes(state: AppState) -> Router {
    Router::new()
        .route("/api/v1/ws/realtime", get(ws::upgrade))
        .route("/api/v1/realtime", get(sse::stream_all))
        .route("/api/v1/realtime/{collection}", get(sse::stream_collection))
        .route(
            "/api/v1/realtime/channel/{channel}",
            get(sse::stream_collection),
        )
        .route("/api/v1/publish", post(rest::publish))
        .route("/api/v1/broadcast", post(rest::broadcast))
        .route("/api/v1/stats", get(rest::stats))
        .route("/api/v1/presence", get(rest::presence))
        .route("/healthz", get(rest::healthz))
        .route("/metrics", get(rest::metrics))
        .with_state(state)
}

/// Who an HTTP request (REST, SSE, the WebSocket upgrade) comes from: the
/// credential of `Authorization: Bearer`, else `X-Api-Key`, else `?token=`.
fn principal(
    engine: &Engine,
    headers: &HeaderMap,
    token_param: Option<&str>,
) -> Result<Principal, errors::ApiError> {
    let api_key = headers.get(API_KEY).and_then(|v| v.to_str().ok());
    let credential = bearer(headers).or(api_key).or(token_param);
    Ok(engine.auth().authenticate(credential)?)
}

/// The credential of an `Authorization: Bearer` header.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
}

/// The header services may put an API key in.
const API_KEY: &str = "x-api-key";

/// The event JSON of one delivery (see [`crate::codec`]).
fn event_json(delivery: &Delivery) -> Vec<u8> {
    encode_event(&delivery.event.event, delivery.view)
}

/// The `data` of the `connected` greeting.
fn connected_data(connection: &Connection) -> Value {
    json!({
        "connection_id": connection.name(),
        "server_time": format_timestamp(SystemTime::now()),
    })
}
