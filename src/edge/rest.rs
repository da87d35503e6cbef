//! The REST edge: publish over HTTP, stats, health and metrics.

use super::AppState;
use super::errors::{ApiError, ErrorKind};
use crate::auth::Principal;
use crate::codec::{decode_event, event_from_value};
use crate::engine::Transport;
use crate::event::{Event, EventType, format_timestamp};
use axum::Json;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use std::fmt::Write;
use std::time::SystemTime;

#[derive(Deserialize)]
pub struct TokenParam {
    token: Option<String>,
}

/// `POST /api/v1/publish`: one event object → `{"seq": N}`; an array of
/// events → `{"seqs": [...]}`, published in order. An event the bus already
/// had (same publisher, same `id`) is not published again: `"duplicate":
/// true` (arrays: `"duplicates": [index, ...]`) with the original's seq.
pub async fn publish(
    State(app): State<AppState>,
    Query(params): Query<TokenParam>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let principal = super::principal(&app.engine, &headers, params.token.as_deref())?;
    let now = SystemTime::now();
    let trimmed = body.trim_ascii_start();
    if trimmed.starts_with(b"[") {
        let items: Vec<Value> = serde_json::from_slice(trimmed)
            .map_err(|e| ApiError::invalid(format!("invalid JSON: {e}")))?;
        let events = items
            .into_iter()
            .enumerate()
            .map(|(i, item)| {
                event_from_value(item, now).map_err(|e| ApiError::invalid(format!("[{i}]: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let receipt = app.engine.publish(&principal, events).await?;
        let mut reply = json!({ "seqs": receipt.seqs });
        if !receipt.duplicates.is_empty() {
            reply["duplicates"] = json!(receipt.duplicates);
        }
        return Ok(Json(reply));
    }
    let event = decode_event(&body, None, now)?;
    let receipt = app.engine.publish(&principal, vec![event]).await?;
    let mut reply = json!({ "seq": receipt.seqs[0] });
    if !receipt.duplicates.is_empty() {
        reply["duplicate"] = json!(true);
    }
    Ok(Json(reply))
}

#[derive(Deserialize)]
pub struct BroadcastBody {
    channel: String,
    #[serde(alias = "payload")]
    data: Option<Value>,
}

/// `POST /api/v1/broadcast` `{"channel": "...", "data": {...}}` (or
/// `payload`, as better-query names it) → `{"seq": N}`: a message on a
/// channel, from a service.
pub async fn broadcast(
    State(app): State<AppState>,
    Query(params): Query<TokenParam>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let principal = super::principal(&app.engine, &headers, params.token.as_deref())?;
    let body: BroadcastBody = serde_json::from_slice(&body)
        .map_err(|e| ApiError::invalid(format!("invalid broadcast body: {e}")))?;
    let data = body.data.unwrap_or_else(Event::empty_data);
    let event = Event::new(EventType::Broadcast, body.channel, "", data);
    let receipt = app.engine.publish(&principal, vec![event]).await?;
    Ok(Json(json!({ "seq": receipt.seqs[0] })))
}

/// Stats and metrics name every connection and the collections it reads,
/// so they need `--ops-token` as the bearer credential when it is set;
/// without it they are open in open mode and need an API key otherwise.
pub(super) fn check_ops_access(app: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let refused = |kind, message: &str| Err(ApiError::new(kind, message));
    match &app.ops_token {
        Some(token) => match super::bearer(headers) {
            Some(given) if same_secret(given, token) => Ok(()),
            _ => refused(
                ErrorKind::Unauthenticated,
                "stats and metrics need the ops token (--ops-token) as the bearer credential",
            ),
        },
        None if app.engine.auth().is_open() => Ok(()),
        None => match super::principal(&app.engine, headers, None)? {
            Principal::Service(_) => Ok(()),
            Principal::Anonymous => refused(
                ErrorKind::Unauthenticated,
                "stats and metrics need an API key (or set --ops-token)",
            ),
            _ => refused(
                ErrorKind::PermissionDenied,
                "stats and metrics need an API key (or set --ops-token)",
            ),
        },
    }
}

/// Compares secrets in time independent of where they differ.
fn same_secret(given: &str, expected: &str) -> bool {
    given.len() == expected.len()
        && given
            .bytes()
            .zip(expected.bytes())
            .fold(0, |diff, (a, b)| diff | (a ^ b))
            == 0
}

/// `GET /api/v1/stats`: seed 000's fields plus counts per transport.
pub async fn stats(
    State(app): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    check_ops_access(&app, &headers)?;
    let stats = app.engine.stats();
    Ok(Json(json!({
        "total_connections": stats.total_connections,
        "authenticated_connections": stats.authenticated_connections,
        "unique_users": stats.unique_users,
        "pubsub_backend": app.engine.backend(),
        "auth": if app.engine.auth().is_open() { "open" } else { "enforced" },
        "subscriptions": stats.subscriptions,
        "connections_by_transport": stats.per_transport,
        "head_seq": stats.head_seq,
    })))
}

#[derive(Deserialize)]
pub struct PresenceParams {
    channel: Option<String>,
    token: Option<String>,
}

/// `GET /api/v1/presence[?channel=]`: `{"users": [...], "count": N}` as in
/// seed 001, for the whole cluster.
pub async fn presence(
    State(app): State<AppState>,
    Query(params): Query<PresenceParams>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let principal = super::principal(&app.engine, &headers, params.token.as_deref())?;
    let channel = params.channel.filter(|c| !c.is_empty());
    let users = app.engine.presence(&principal, channel.as_deref())?;
    let users: Vec<Value> = users
        .iter()
        .map(|u| {
            json!({
                "user_id": u.user_id,
                "user_name": u.user_name,
                "connections": u.connections,
                "last_seen": format_timestamp(u.last_seen),
            })
        })
        .collect();
    Ok(Json(
        json!({"users": users, "count": users.len(), "channel": channel}),
    ))
}

pub async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// `GET /metrics` in the Prometheus text format.
pub async fn metrics(State(app): State<AppState>, headers: HeaderMap) -> Response {
    if let Err(refused) = check_ops_access(&app, &headers) {
        return refused.into_response();
    }
    let stats = app.engine.stats();
    let mut out = String::new();
    let _ = writeln!(out, "# TYPE strom_connections gauge");
    for transport in Transport::ALL.map(Transport::as_str) {
        let count = stats.per_transport.get(transport).copied().unwrap_or(0);
        let _ = writeln!(
            out,
            "strom_connections{{transport=\"{transport}\"}} {count}"
        );
    }
    let subscriptions: usize = stats.subscriptions.values().map(Vec::len).sum();
    let _ = writeln!(out, "# TYPE strom_subscriptions gauge");
    let _ = writeln!(out, "strom_subscriptions {subscriptions}");
    let _ = writeln!(out, "# TYPE strom_head_seq gauge");
    let _ = writeln!(out, "strom_head_seq {}", stats.head_seq);
    let _ = writeln!(out, "# TYPE strom_events_published_total counter");
    let _ = writeln!(
        out,
        "strom_events_published_total {}",
        app.engine.published_total()
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}
