//! better-query's realtime protocol (seed 004) at
//! `GET /better-query/realtime[?token=]`, and its REST endpoints under the
//! same prefix: `stats`, `channel/users` and `broadcast`.
//!
//! Fluxbase's SDK owns `/realtime` and cannot change it, while
//! better-query's client connects to whatever `wsUrl` it is given; so this
//! dialect lives under its own prefix.
//!
//! Channel `resource:{name}` is collection `{name}`, `{name}:{id}` is record
//! `{id}` of it, and anything else is a strom channel. Every server frame
//! carries `timestamp` (epoch ms). Presence updates always name their
//! channel (the original omitted it, and its own client dropped them), and
//! `onlineUsers` is who is on the channel after the change.

use super::Checked;
use super::dialect::{
    self, Action, Dialect, PresenceFrame, Target, presence_user, required_string, typed_frame,
};
use super::errors::ApiError;
use super::{AppState, principal};
use crate::auth::Principal;
use crate::engine::Transport;
use crate::engine::presence::{PresenceUser, now_millis};
use crate::event::{Event, EventType, View};
use axum::Json;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use std::time::Duration;

pub(super) struct BetterQuery;

const RESOURCE_PREFIX: &str = "resource:";

impl Dialect for BetterQuery {
    const TRANSPORT: Transport = Transport::BetterQuery;
    const SENDS_HEARTBEATS: bool = false;
    const ANSWERS_HEARTBEATS: bool = true;
    const PRESENCE: Option<PresenceFrame> = Some(presence_update);

    fn parse(text: &str) -> Result<Action, String> {
        let (kind, mut frame) = typed_frame(text)?;
        match kind.as_str() {
            "subscribe" => Ok(Action::Subscribe(required_string(&frame, "channel")?)),
            "unsubscribe" => Ok(Action::Unsubscribe(required_string(&frame, "channel")?)),
            "broadcast" => Ok(Action::Broadcast {
                channel: required_string(&frame, "channel")?,
                payload: frame.remove("payload").unwrap_or_else(Event::empty_data),
            }),
            "heartbeat" => Ok(Action::Heartbeat),
            other => Err(format!(
                "unknown message type {other:?}: expected subscribe, unsubscribe, broadcast or heartbeat"
            )),
        }
    }

    fn target(channel: &str) -> Target {
        if let Some(resource) = channel.strip_prefix(RESOURCE_PREFIX) {
            return Target {
                collection: resource.to_owned(),
                record_id: None,
            };
        }
        match channel.split_once(':') {
            Some((resource, id)) if !resource.is_empty() && !id.is_empty() => Target {
                collection: resource.to_owned(),
                record_id: Some(id.to_owned()),
            },
            _ => Target {
                collection: channel.to_owned(),
                record_id: None,
            },
        }
    }

    fn subscribed(channel: &str) -> Value {
        json!({"type": "subscribed", "channel": channel})
    }

    fn unsubscribed(channel: &str) -> Value {
        json!({"type": "unsubscribed", "channel": channel})
    }

    /// A row change is `data_change`; anything else (a channel message) a
    /// `broadcast` of its data.
    fn event(channel: &str, event: &Event, view: View) -> Value {
        let Some(operation) = operation(event.event_type) else {
            return json!({"type": "broadcast", "channel": channel, "payload": event.data});
        };
        let (data, _) = view.images(event);
        let data = if operation == "delete" { None } else { data };
        let mut payload = json!({
            "resource": event.collection,
            "operation": operation,
            "data": data,
        });
        if !event.record_id.is_empty() {
            payload["id"] = Value::String(event.record_id.clone());
        }
        json!({"type": "data_change", "channel": channel, "payload": payload})
    }

    fn heartbeat() -> Value {
        json!({"type": "heartbeat"})
    }

    fn error(message: &str) -> Value {
        json!({"type": "error", "payload": {"message": message}})
    }

    fn stamp(mut frame: Value) -> Value {
        frame["timestamp"] = json!(now_millis());
        frame
    }

    /// Twice the heartbeat interval: the client sends one every interval.
    fn idle_timeout(app: &AppState) -> Duration {
        app.ws.ping_interval.saturating_mul(2)
    }
}

fn operation(event_type: EventType) -> Option<&'static str> {
    match event_type {
        EventType::RecordCreated => Some("create"),
        EventType::RecordUpdated => Some("update"),
        EventType::RecordDeleted => Some("delete"),
        _ => None,
    }
}

/// `{"userId", "metadata"}`: metadata is what the token's claims say of the
/// user (its `name`).
fn user(user_id: &str, name: Option<&str>) -> Value {
    let metadata = match name {
        Some(name) => json!({ "name": name }),
        None => json!({}),
    };
    json!({"userId": user_id, "metadata": metadata})
}

fn users(online: &[PresenceUser]) -> Vec<Value> {
    online
        .iter()
        .map(|u| user(&u.user_id, u.user_name.as_deref()))
        .collect()
}

fn presence_update(channel: &str, change: &Event, online: &[PresenceUser]) -> Value {
    let (user_id, name) = presence_user(change);
    let mut payload = user(user_id, name);
    payload["action"] = json!(match change.event_type {
        EventType::UserLeft => "leave",
        _ => "join",
    });
    payload["onlineUsers"] = Value::Array(users(online));
    json!({"type": "presence_update", "channel": channel, "payload": payload})
}

/// `GET /better-query/realtime/stats`: this node's better-query connections
/// and channels, with who is online on each; the same access as
/// `/api/v1/stats`.
pub async fn stats(State(app): State<AppState>, headers: HeaderMap) -> Response {
    if let Err(refused) = super::rest::check_ops_access(&app, &headers) {
        return dialect::http_error(&refused);
    }
    let connected = app
        .engine
        .stats()
        .per_transport
        .get(Transport::BetterQuery.as_str())
        .copied()
        .unwrap_or(0);
    let ops = Principal::System("ops");
    let channels: Vec<Value> = app
        .census
        .channels(Transport::BetterQuery)
        .into_iter()
        .map(|(name, clients)| {
            let collection = BetterQuery::target(&name).collection;
            let online = app
                .engine
                .presence(&ops, Some(&collection))
                .unwrap_or_default();
            json!({"name": name, "clients": clients, "onlineUsers": users(&online)})
        })
        .collect();
    Json(json!({"connected": connected, "channels": channels})).into_response()
}

#[derive(Deserialize)]
pub struct ChannelParams {
    channel: Option<String>,
    token: Option<String>,
}

/// `GET /better-query/realtime/channel/users?channel=C`: who is online on
/// the channel, cluster-wide, for a caller that may subscribe to it.
pub async fn channel_users(
    State(app): State<AppState>,
    Checked(Query(params)): Checked<Query<ChannelParams>>,
    headers: HeaderMap,
) -> Response {
    let listed = || -> Result<Value, ApiError> {
        let channel = params
            .channel
            .clone()
            .filter(|c| !c.is_empty())
            .ok_or_else(|| ApiError::invalid("missing query parameter `channel`"))?;
        let caller = super::presence_reader(&app, &headers, params.token.as_deref())?;
        let collection = BetterQuery::target(&channel).collection;
        let online = users(&app.engine.presence(&caller, Some(&collection))?);
        Ok(json!({"channel": channel, "count": online.len(), "users": online}))
    };
    match listed() {
        Ok(body) => Json(body).into_response(),
        Err(error) => dialect::http_error(&error),
    }
}

/// `POST /better-query/realtime/broadcast` with `{"channel", "payload"}`:
/// publishes a message on the channel as the caller (bearer token or API
/// key), answering `{"success": true, "channel": C}`.
pub async fn broadcast(
    State(app): State<AppState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let published = async {
        let request: Value = serde_json::from_slice(&body)
            .map_err(|e| ApiError::invalid(format!("malformed JSON: {e}")))?;
        let Value::Object(mut request) = request else {
            return Err(ApiError::invalid("the body must be a JSON object"));
        };
        let channel = required_string(&request, "channel").map_err(ApiError::invalid)?;
        let payload = request.remove("payload").unwrap_or_else(Event::empty_data);
        if !payload.is_object() {
            return Err(ApiError::invalid("`payload` must be a JSON object"));
        }
        let caller = principal(&app.engine, &headers, None)?;
        let Target {
            collection,
            record_id,
        } = BetterQuery::target(&channel);
        let event = Event::new(
            EventType::Broadcast,
            collection,
            record_id.unwrap_or_default(),
            payload,
        );
        app.engine.publish(&caller, vec![event]).await?;
        Ok(json!({"success": true, "channel": channel}))
    };
    match published.await {
        Ok(body) => Json(body).into_response(),
        Err(error) => dialect::http_error(&error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channels_name_resources_records_or_strom_channels() {
        let target = |collection: &str, record: Option<&str>| Target {
            collection: collection.to_owned(),
            record_id: record.map(str::to_owned),
        };
        assert_eq!(BetterQuery::target("resource:post"), target("post", None));
        assert_eq!(BetterQuery::target("post:p1"), target("post", Some("p1")));
        assert_eq!(
            BetterQuery::target("notifications"),
            target("notifications", None)
        );
        assert_eq!(BetterQuery::target("post:"), target("post:", None));
    }

    #[test]
    fn a_delete_carries_no_data_and_an_unknown_id_is_left_out() {
        let mut event = Event::new(EventType::RecordDeleted, "post", "p1", json!({"id": "p1"}));
        let frame = BetterQuery::event("resource:post", &event, View::default());
        assert_eq!(
            frame["payload"],
            json!({"resource": "post", "operation": "delete", "data": null, "id": "p1"})
        );
        event.event_type = EventType::RecordCreated;
        event.record_id.clear();
        let frame = BetterQuery::event("resource:post", &event, View::default());
        assert_eq!(
            frame["payload"],
            json!({"resource": "post", "operation": "create", "data": {"id": "p1"}})
        );
    }

    #[test]
    fn bad_frames_are_named() {
        assert!(
            BetterQuery::parse("{")
                .unwrap_err()
                .contains("malformed JSON")
        );
        assert!(
            BetterQuery::parse(r#"{"type":"jump"}"#)
                .unwrap_err()
                .contains("unknown")
        );
        assert_eq!(
            BetterQuery::parse(r#"{"type":"subscribe"}"#).unwrap_err(),
            "missing field `channel`"
        );
        assert_eq!(
            BetterQuery::parse(r#"{"type":"heartbeat","timestamp":1}"#),
            Ok(Action::Heartbeat)
        );
    }
}
