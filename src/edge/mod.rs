//! Edges: the transports. Each translates its wire format to engine calls
//! and back; none holds delivery logic of its own. All share one port and
//! one error map ([`errors`]).

pub mod better_query;
pub mod dialect;
pub mod errors;
pub mod fluxbase;
pub mod grpc;
pub mod rest;
pub mod socket;
pub mod sse;
pub mod ws;

use crate::auth::Principal;
use crate::codec::encode_delivered;
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
    /// The channels of dialect connections, for the dialects' stats.
    pub census: Arc<dialect::ChannelCensus>,
}

/// The HTTP routes of the bridge (WebSocket, SSE, REST).
pub fn http_routes(state: AppState) -> Router {
    Router::new()
        // HTTP/1.1 upgrades are GETs; HTTP/2 opens a WebSocket with an
        // extended CONNECT (RFC 8441).
        .route("/api/v1/ws/realtime", get(ws::upgrade).connect(ws::upgrade))
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
        .route("/", get(rest::dashboard))
        .route("/api/v1/openapi.json", get(rest::openapi))
        .route("/healthz", get(rest::healthz))
        .route("/readyz", get(rest::readyz))
        .route("/metrics", get(rest::metrics))
        .route(
            "/realtime",
            get(dialect::upgrade::<fluxbase::Fluxbase>)
                .connect(dialect::upgrade::<fluxbase::Fluxbase>),
        )
        .route("/api/realtime/stats", get(fluxbase::stats))
        .route(
            "/better-query/realtime",
            get(dialect::upgrade::<better_query::BetterQuery>)
                .connect(dialect::upgrade::<better_query::BetterQuery>),
        )
        .route("/better-query/realtime/stats", get(better_query::stats))
        .route(
            "/better-query/realtime/channel/users",
            get(better_query::channel_users),
        )
        .route(
            "/better-query/realtime/broadcast",
            post(better_query::broadcast),
        )
        .with_state(state)
}

/// Refuses a browser page whose origin `--cors-origin` does not list (a
/// browser always sends its page's origin; other clients need not).
fn check_origin(app: &AppState, headers: &HeaderMap) -> Result<(), errors::ApiError> {
    match headers.get(axum::http::header::ORIGIN) {
        Some(origin) if !app.origins.is_empty() && !app.origins.contains(origin) => {
            Err(errors::ApiError::new(
                errors::ErrorKind::PermissionDenied,
                format!(
                    "origin {:?} is not allowed (see --cors-origin)",
                    String::from_utf8_lossy(origin.as_bytes())
                ),
            ))
        }
        _ => Ok(()),
    }
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
    bearer_credential(headers.get(AUTHORIZATION)?.to_str().ok()?)
}

/// The credential of an `Authorization` value of the Bearer scheme, whose
/// name is case-insensitive (RFC 9110 §11.1).
fn bearer_credential(authorization: &str) -> Option<&str> {
    let (scheme, credential) = authorization.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| credential.trim_start())
}

/// Who may read presence: the ops credential where `--ops-token` is set
/// and sent, else the request's own credential.
fn presence_reader(
    app: &AppState,
    headers: &HeaderMap,
    token_param: Option<&str>,
) -> Result<Principal, errors::ApiError> {
    match &app.ops_token {
        Some(_) if rest::check_ops_access(app, headers).is_ok() => Ok(Principal::System("ops")),
        _ => principal(&app.engine, headers, token_param),
    }
}

/// An extractor whose refusal is strom's JSON error (400,
/// `invalid_argument`), not axum's plain text: `Checked<Query<T>>`,
/// `Checked<Path<T>>`.
pub struct Checked<E>(pub E);

impl<S, E> axum::extract::FromRequestParts<S> for Checked<E>
where
    S: Send + Sync,
    E: axum::extract::FromRequestParts<S>,
    E::Rejection: std::fmt::Display,
{
    type Rejection = errors::ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        match E::from_request_parts(parts, state).await {
            Ok(extracted) => Ok(Checked(extracted)),
            Err(refused) => Err(errors::ApiError::invalid(refused.to_string())),
        }
    }
}

/// The header services may put an API key in.
const API_KEY: &str = "x-api-key";

/// The event JSON of one delivery (see [`crate::codec`]).
fn event_json(delivery: &Delivery) -> Vec<u8> {
    encode_delivered(
        &delivery.event.event,
        delivery.event.partition,
        delivery.view,
    )
}

/// The `data` of the `connected` greeting.
fn connected_data(connection: &Connection) -> Value {
    json!({
        "connection_id": connection.name(),
        "server_time": format_timestamp(SystemTime::now()),
    })
}
