//! Fluxbase's realtime protocol (seed 002) at `GET /realtime[?token=]`,
//! and its stats at `GET /api/realtime/stats`.
//!
//! Channel `table:{schema}.{table}` is collection `{schema}.{table}`, the
//! name Postgres capture gives a table's changes, so Fluxbase's SDK plus
//! `SELECT enable_realtime('public','products')` works end to end. Any
//! other channel is a strom channel whose messages arrive as `broadcast`
//! with their data as `payload`.
//!
//! Heartbeats: the server sends its own every `--ws-ping-interval` and
//! never answers the client's (Fluxbase's SDK echoes every server
//! heartbeat, so answering would echo forever); a client heartbeat only
//! shows the client is alive.

use super::AppState;
use super::dialect::{self, Action, Dialect, Target, required_string, typed_frame};
use crate::capture::postgres::split_table;
use crate::engine::Transport;
use crate::event::{Event, EventType, View};
use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use std::time::Duration;

pub(super) struct Fluxbase;

const TABLE_PREFIX: &str = "table:";

impl Dialect for Fluxbase {
    const TRANSPORT: Transport = Transport::Fluxbase;
    const SENDS_HEARTBEATS: bool = true;
    const ANSWERS_HEARTBEATS: bool = false;

    fn parse(text: &str) -> Result<Action, String> {
        let (kind, frame) = typed_frame(text)?;
        match kind.as_str() {
            "subscribe" => Ok(Action::Subscribe(required_string(&frame, "channel")?)),
            "unsubscribe" => Ok(Action::Unsubscribe(required_string(&frame, "channel")?)),
            "heartbeat" => Ok(Action::Heartbeat),
            other => Err(format!(
                "unknown message type {other:?}: expected subscribe, unsubscribe or heartbeat"
            )),
        }
    }

    /// `table:public.products` → `public.products` (no schema: `public`).
    fn target(channel: &str) -> Target {
        let collection = match channel.strip_prefix(TABLE_PREFIX) {
            Some(table) => {
                let (schema, table) = split_table(table);
                format!("{schema}.{table}")
            }
            None => channel.to_owned(),
        };
        Target {
            collection,
            record_id: None,
        }
    }

    fn subscribed(channel: &str) -> Value {
        json!({"type": "ack", "channel": channel, "payload": {"subscribed": true}})
    }

    fn unsubscribed(channel: &str) -> Value {
        json!({"type": "ack", "channel": channel, "payload": {"subscribed": false}})
    }

    fn event(channel: &str, event: &Event, view: View) -> Value {
        let payload = match (
            channel.starts_with(TABLE_PREFIX),
            row_change(event.event_type),
        ) {
            (true, Some(change)) => table_change(change, event, view),
            _ => event.data.clone(),
        };
        json!({"type": "broadcast", "channel": channel, "payload": payload})
    }

    fn heartbeat() -> Value {
        json!({"type": "heartbeat"})
    }

    fn error(message: &str) -> Value {
        json!({"type": "error", "error": message})
    }

    fn idle_timeout(app: &AppState) -> Duration {
        app.ws.idle_timeout
    }
}

/// Fluxbase's name of a row change.
fn row_change(event_type: EventType) -> Option<&'static str> {
    match event_type {
        EventType::RecordCreated => Some("INSERT"),
        EventType::RecordUpdated => Some("UPDATE"),
        EventType::RecordDeleted => Some("DELETE"),
        _ => None,
    }
}

/// `{"type","table","schema","record","old_record"}`: a DELETE has `record`
/// null, and `old_record` is left out when there is none. A row image the
/// subscriber's row rule withholds is absent.
fn table_change(change: &str, event: &Event, view: View) -> Value {
    let (schema, table) = split_table(&event.collection);
    let (data, old) = view.images(event);
    let (record, old_record) = if change == "DELETE" {
        // A delete published without `old_data` carries the row in `data`.
        (None, old.or(data))
    } else {
        (data, old)
    };
    let mut payload = json!({
        "type": change,
        "table": table,
        "schema": schema,
        "record": record,
    });
    if let Some(old_record) = old_record {
        payload["old_record"] = old_record.clone();
    }
    payload
}

/// `GET /api/realtime/stats`: `{"connections": N, "channels": M}` for this
/// node's Fluxbase connections; the same access as `/api/v1/stats`.
pub async fn stats(State(app): State<AppState>, headers: HeaderMap) -> Response {
    if let Err(refused) = super::rest::check_ops_access(&app, &headers) {
        return dialect::http_error(&refused);
    }
    Json(counts(&app)).into_response()
}

fn counts(app: &AppState) -> Value {
    let stats = app.engine.stats();
    json!({
        "connections": stats.per_transport.get(Transport::Fluxbase.as_str()).copied().unwrap_or(0),
        "channels": app.census.channels(Transport::Fluxbase).len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_channels_name_schema_qualified_collections() {
        let collection = |channel: &str| Fluxbase::target(channel).collection;
        assert_eq!(collection("table:public.products"), "public.products");
        assert_eq!(collection("table:products"), "public.products");
        assert_eq!(collection("table:inventory.items"), "inventory.items");
        assert_eq!(collection("chat"), "chat");
    }

    #[test]
    fn a_row_the_subscriber_may_not_see_is_not_shown() {
        let mut event = Event::new(
            EventType::RecordUpdated,
            "public.products",
            "1",
            json!({"id": 1, "owner": "bob"}),
        );
        event.old_data = Some(json!({"id": 1, "owner": "alice"}));
        // The row came into the subscriber's rows: its old image is withheld.
        let came_in = View {
            left_filter: false,
            withheld: true,
        };
        let frame = Fluxbase::event("table:public.products", &event, came_in);
        assert_eq!(frame["payload"]["record"]["owner"], "bob");
        assert!(frame["payload"].get("old_record").is_none(), "{frame}");
        // It left them: the new image is withheld.
        let left = View {
            left_filter: true,
            withheld: true,
        };
        let frame = Fluxbase::event("table:public.products", &event, left);
        assert_eq!(frame["payload"]["record"], Value::Null);
        assert_eq!(frame["payload"]["old_record"]["owner"], "alice");
    }

    #[test]
    fn other_events_on_a_table_channel_carry_their_data() {
        let event = Event::new(EventType::Broadcast, "public.products", "", json!({"a": 1}));
        let frame = Fluxbase::event("table:public.products", &event, View::default());
        assert_eq!(frame["payload"], json!({"a": 1}));
    }
}
