//! The REST edge: publish over HTTP, stats, health and metrics.

use super::AppState;
use super::Checked;
use super::errors::{ApiError, ErrorKind};
use crate::auth::Principal;
use crate::codec::{decode_event, event_from_value};
use crate::engine::Transport;
use crate::event::{Event, EventType, format_timestamp};
use crate::metrics::{self, AuthFailure, Eviction, METRICS, NatsOp, render_family, render_one};
use axum::Json;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
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
    Checked(Query(params)): Checked<Query<TokenParam>>,
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
    Checked(Query(params)): Checked<Query<TokenParam>>,
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
        "events_published_total": app.engine.published_total(),
        "deliveries_total": Transport::ALL.iter().map(|&t| METRICS.deliveries.get(t as usize)).sum::<u64>(),
    })))
}

#[derive(Deserialize)]
pub struct PresenceParams {
    channel: Option<String>,
    token: Option<String>,
}

/// `GET /api/v1/presence[?channel=]`: `{"users": [...], "count": N}` as in
/// seed 001, for the whole cluster. The ops token (`--ops-token`) may read
/// it too, as an operator's view beside stats (the dashboard's).
pub async fn presence(
    State(app): State<AppState>,
    Checked(Query(params)): Checked<Query<PresenceParams>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let principal = super::presence_reader(&app, &headers, params.token.as_deref())?;
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

/// `GET /`: the live dashboard, one static page. It holds no data: what it
/// shows comes from stats, presence and an SSE stream, each checking the
/// credential the page sends.
pub async fn dashboard() -> Html<&'static str> {
    Html(include_str!("dashboard.html"))
}

/// `GET /api/v1/openapi.json`: the REST API in OpenAPI 3.1.
pub async fn openapi() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        include_str!("openapi.json"),
    )
}

/// `GET /healthz`: the process is up. It stays up while NATS is not:
/// restarting the node would not bring the bus back.
pub async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// `GET /readyz`: whether the node can serve subscriptions and replays
/// now (200), or 503 saying why not (NATS unreachable, a stream without a
/// leader, no replica answering history reads). For load balancers and
/// readiness probes; it reveals nothing beyond the bus's health.
pub async fn readyz(State(app): State<AppState>) -> Response {
    match app.engine.bus_readiness().await {
        Ok(()) => Json(json!({"status": "ready"})).into_response(),
        Err(reason) => {
            let body = json!({"status": "unavailable", "reason": reason});
            (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
        }
    }
}

/// `GET /metrics` in the Prometheus text format: the process's counters
/// and histograms (see [`crate::metrics`]) and this server's state.
pub async fn metrics(State(app): State<AppState>, headers: HeaderMap) -> Response {
    if let Err(refused) = check_ops_access(&app, &headers) {
        return refused.into_response();
    }
    let stats = app.engine.stats();
    let bus = app.engine.bus_state().await;
    let m = &METRICS;
    let mut out = String::new();
    let by_transport = |family: &metrics::PerTransport| {
        Transport::ALL.map(|t| (t.as_str(), family.get(t as usize)))
    };
    let open = Transport::ALL.map(|t| {
        let count = stats.per_transport.get(t.as_str()).copied().unwrap_or(0);
        (t.as_str(), count as u64)
    });
    render_family(
        &mut out,
        "strom_connections",
        "gauge",
        "Open connections.",
        "transport",
        open,
    );
    let subscriptions: usize = stats.subscriptions.values().map(Vec::len).sum();
    render_one(
        &mut out,
        "strom_subscriptions",
        "gauge",
        "Open subscriptions.",
        subscriptions as u64,
    );
    render_one(
        &mut out,
        "strom_queue_depth",
        "gauge",
        "Deliveries queued for connections, not yet taken by their writers.",
        stats.queued as u64,
    );
    render_one(
        &mut out,
        "strom_head_seq",
        "gauge",
        "The newest event's seq.",
        stats.head_seq,
    );
    render_one(
        &mut out,
        "strom_nats_connected",
        "gauge",
        "1 while connected to the bus (always 1 on the in-memory bus).",
        u64::from(bus.connected),
    );
    if let Some(consumers) = bus.consumers {
        render_one(
            &mut out,
            "strom_jetstream_consumers",
            "gauge",
            "JetStream consumers on the event stream, cluster-wide.",
            consumers as u64,
        );
    }
    if let Some(events) = bus.history_events {
        render_one(
            &mut out,
            "strom_history_events",
            "gauge",
            "Events retained for resuming subscribers.",
            events,
        );
    }
    render_one(
        &mut out,
        "strom_events_published_total",
        "counter",
        "Events published through this node.",
        app.engine.published_total(),
    );
    render_family(
        &mut out,
        "strom_deliveries_total",
        "counter",
        "Events handed to clients.",
        "transport",
        by_transport(&m.deliveries),
    );
    render_family(
        &mut out,
        "strom_connections_opened_total",
        "counter",
        "Connections opened.",
        "transport",
        by_transport(&m.connections_opened),
    );
    render_family(
        &mut out,
        "strom_connections_closed_total",
        "counter",
        "Connections closed.",
        "transport",
        by_transport(&m.connections_closed),
    );
    let evictions = Eviction::ALL.map(|e| (e.as_str(), m.evictions.get(e as usize)));
    render_family(
        &mut out,
        "strom_evictions_total",
        "counter",
        "Connections the server ended, by reason.",
        "reason",
        evictions,
    );
    let failures = AuthFailure::ALL.map(|f| (f.as_str(), m.auth_failures.get(f as usize)));
    render_family(
        &mut out,
        "strom_auth_failures_total",
        "counter",
        "Refused credentials and requests, by reason.",
        "reason",
        failures,
    );
    let nats_failures =
        NatsOp::ALL.map(|op| (op.as_str(), m.nats_request_failures.get(op as usize)));
    render_family(
        &mut out,
        "strom_nats_request_failures_total",
        "counter",
        "NATS requests that failed or timed out, by operation.",
        "op",
        nats_failures,
    );
    m.publish_duration.render(
        &mut out,
        "strom_publish_duration_seconds",
        "From a publish request to the bus's acknowledgement.",
    );
    m.fanout_latency.render(
        &mut out,
        "strom_fanout_latency_seconds",
        "From the bus to a connection's writer, per batch taken (its oldest event).",
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}
