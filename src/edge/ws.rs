//! The WebSocket edge: `GET /api/v1/ws/realtime`, the FastCMS protocol.
//!
//! Client actions: `subscribe`, `unsubscribe`, `auth`, `pong`. Server
//! messages: `connected`, `subscribed`, `unsubscribed`, `authenticated`,
//! `event`, `ping`, `error`, each `{"type": ..., "data": {...}}`. One task
//! per connection reads actions, writes deliveries in batches (all that is
//! queued, then one flush), sends heartbeats and closes idle connections.
//! A bad action gets an `error` message and the connection goes on; only an
//! oversized frame, an idle client, an overflow or shutdown close it.

use super::Checked;
use super::errors::{ApiError, ErrorKind};
use super::socket::{
    self, ClientSocket, Liveness, NotAnUpgrade, Step, TEXT, Upgrade, frame_header_len,
    put_frame_header,
};
use super::{AppState, check_origin, connected_data};
use crate::auth::Principal;
use crate::codec::encode_delivered;
use crate::engine::{
    Connection, Delivery, EndReason, Received, ResetNotice, RunSlice, SubscriptionSpec, Transport,
};
use crate::event::{Event, EventType, Position, SharedEvent, View, Wire, format_timestamp};
use crate::filter::Filter;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Value, json};
use std::time::{Duration, SystemTime};
use tokio_tungstenite::tungstenite::{self, Message};

#[derive(Debug, Clone)]
pub struct WsConfig {
    /// How often the server sends `ping`.
    pub ping_interval: Duration,
    /// A connection silent this long is closed.
    pub idle_timeout: Duration,
    /// Largest text frame accepted from a client, in bytes.
    pub max_frame_bytes: usize,
}

impl Default for WsConfig {
    fn default() -> Self {
        WsConfig {
            ping_interval: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(90),
            max_frame_bytes: 64 * 1024,
        }
    }
}

/// Deliveries written before one flush; bounds the latency of a batch.
pub(super) const MAX_BATCH: usize = 512;

#[derive(Debug, Deserialize)]
pub struct WsParams {
    token: Option<String>,
    /// Presence of an anonymous client on an open server; `user_name` is
    /// shown in presence snapshots.
    user_id: Option<String>,
    user_name: Option<String>,
}

/// A bad `?token=` is refused before the upgrade, with a JSON error (401).
pub async fn upgrade(
    State(app): State<AppState>,
    Checked(Query(params)): Checked<Query<WsParams>>,
    headers: HeaderMap,
    upgrade: Result<Upgrade, NotAnUpgrade>,
) -> Result<Response, Response> {
    let upgrade = upgrade.map_err(IntoResponse::into_response)?;
    let connect = || {
        check_origin(&app, &headers)?;
        let principal = super::principal(&app.engine, &headers, params.token.as_deref())?;
        // Refused before the upgrade too, when the user holds too many.
        Ok::<_, ApiError>(app.engine.connect(Transport::WebSocket, principal)?)
    };
    let connection = connect().map_err(IntoResponse::into_response)?;
    let presence = params.user_id.map(|id| (id, params.user_name));
    let tracker = app.tasks.clone();
    // A session mostly writes deliveries: it runs beside the fan-out.
    let delivery = app.engine.delivery().clone();
    let max_frame_bytes = app.ws.max_frame_bytes;
    Ok(upgrade.accept(max_frame_bytes, &delivery, move |socket| {
        tracker.track_future(Session::start(app, socket, connection, presence))
    }))
}

fn message(kind: &str, data: Value) -> Message {
    Message::text(json!({"type": kind, "data": data}).to_string())
}

fn error_message(error: &ApiError) -> Message {
    message("error", error.body())
}

/// Appends the frame of `{"type":"event","data":<event JSON>}`: encoded
/// once per event, header included, and shared by every connection; on a
/// connection holding several subscriptions, followed by
/// `"subscription_ids":[...]`, the ones the event matched.
fn put_event_frame(out: &mut Vec<u8>, delivery: &Delivery, name_subscriptions: bool) {
    let frame = event_frame(&delivery.event, delivery.view);
    if !name_subscriptions {
        out.extend_from_slice(frame);
        return;
    }
    let body = &frame[frame_header_len(frame)..];
    let ids: Vec<u64> = delivery.subscriptions().collect();
    let ids = serde_json::to_string(&ids).expect("JSON of ids");
    let suffix = br#","subscription_ids":"#;
    put_frame_header(out, TEXT, body.len() + suffix.len() + ids.len());
    out.extend_from_slice(&body[..body.len() - 1]);
    out.extend_from_slice(suffix);
    out.extend_from_slice(ids.as_bytes());
    out.push(b'}');
}

/// The frame of `{"type":"event","data":<event JSON>}` showing `event` as
/// `view` does, header included.
fn event_frame(event: &SharedEvent, view: View) -> &Bytes {
    event.encoded(Wire::WebSocket, view, || {
        let json = encode_delivered(&event.event, event.partition, view);
        let body = [br#"{"type":"event","data":"#.as_slice(), &json, b"}"].concat();
        let mut frame = Vec::with_capacity(body.len() + 10);
        put_frame_header(&mut frame, TEXT, body.len());
        frame.extend_from_slice(&body);
        frame.into()
    })
}

/// Appends the frames of a run's events (one subscription, so no
/// `subscription_ids`): laid end to end once per run, and copied at once.
fn put_run_frames(out: &mut Vec<u8>, slice: &RunSlice) {
    let frames = (slice.run).encoded(Wire::WebSocket, slice.range.clone(), |event| {
        event_frame(event, View::default())
    });
    out.extend_from_slice(frames);
}

/// Appends the frame of a text message.
fn put_text_frame(out: &mut Vec<u8>, text: &str) {
    put_frame_header(out, TEXT, text.len());
    out.extend_from_slice(text.as_bytes());
}

struct Session {
    app: AppState,
    connection: Connection,
    socket: ClientSocket,
}

impl Session {
    /// The session's whole life, as one future (no wrapper around it: a
    /// wrapper's state would add to every connection's task).
    fn start(
        app: AppState,
        socket: ClientSocket,
        mut connection: Connection,
        presence: Option<(String, Option<String>)>,
    ) -> impl Future<Output = ()> + Send + 'static {
        connection.join_presence(presence);
        let liveness = Liveness {
            heartbeat_every: app.ws.ping_interval,
            idle_after: app.ws.idle_timeout,
        };
        let session = Session {
            connection,
            socket,
            app,
        };
        socket::run(session, liveness)
    }

    async fn send(&mut self, message: Message) -> Result<(), tungstenite::Error> {
        self.socket.send(message).await
    }

    /// Sends and reports whether the connection can go on.
    async fn reply(&mut self, message: Message) -> Step {
        match self.send(message).await {
            Ok(()) => Step::Continue,
            Err(_) => Step::Close,
        }
    }

    /// `{"type":"reset","data":{...}}`: the resume position was older than
    /// the retained history.
    fn reset_message(&self, notice: &ResetNotice) -> String {
        let collection = self
            .connection
            .subscriptions()
            .find(|(id, _)| *id == notice.subscription)
            .map(|(_, spec)| spec.collection.clone());
        let data = json!({
            "collection": collection,
            "subscription_id": notice.subscription,
            "since": notice.since.to_json(),
            "first_available_seq": notice.first_available.to_json(),
        });
        json!({"type": "reset", "data": data}).to_string()
    }

    async fn on_action(&mut self, text: &str) -> Result<Option<Message>, ApiError> {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| ApiError::invalid(format!("malformed JSON: {e}")))?;
        let Value::Object(mut action) = value else {
            return Err(ApiError::invalid(
                "a message must be a JSON object with an `action`",
            ));
        };
        let name = match action.remove("action") {
            Some(Value::String(name)) => name,
            Some(_) => return Err(ApiError::invalid("`action` must be a string")),
            None => return Err(ApiError::invalid("missing field `action`")),
        };
        match name.as_str() {
            "subscribe" => self.subscribe(action).await.map(Some),
            "unsubscribe" => self.unsubscribe(action).map(Some),
            "publish" => self.publish(action).await,
            "auth" => self.auth(action).map(Some),
            "pong" => Ok(None),
            other => Err(ApiError::invalid(format!(
                "unknown action {other:?}: expected subscribe, unsubscribe, publish, auth or pong"
            ))),
        }
    }

    async fn subscribe(
        &mut self,
        mut action: serde_json::Map<String, Value>,
    ) -> Result<Message, ApiError> {
        let collection = target(&mut action, "subscribe")?;
        let record_id = optional_string(&mut action, "record_id")?;
        let echo = match action.remove("echo") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(echo)) => echo,
            Some(_) => return Err(ApiError::invalid("`echo` must be true or false")),
        };
        let since = match action.remove("since") {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) if n.as_u64().is_some() => n.as_u64().map(Position::seq),
            Some(Value::String(token)) => Some(token.parse()?),
            Some(_) => {
                return Err(ApiError::invalid(
                    "`since` must be a sequence number (a non-negative integer), or a position token like \"12,0,40\"",
                ));
            }
        };
        let filter_json = action.remove("filter").unwrap_or(Value::Null);
        let filter = match &filter_json {
            Value::Null => None,
            Value::Object(shorthand) => Some(Filter::from_shorthand(shorthand)?),
            Value::String(text) if text.trim().is_empty() => None,
            Value::String(text) => Some(Filter::parse(text)?),
            _ => {
                return Err(ApiError::invalid(
                    "`filter` must be an object like {\"published\": true} or a text filter like \"price > 100\"",
                ));
            }
        };
        let spec = SubscriptionSpec {
            collection: collection.clone(),
            record_id: record_id.clone(),
            filter,
            since,
            echo,
        };
        spec.validate()?;
        // Subscribing again to the same collection (and record) replaces
        // the earlier subscription, so events never arrive twice.
        let earlier: Vec<u64> = self
            .connection
            .subscriptions()
            .filter(|(_, s)| s.collection == collection && s.record_id == record_id)
            .map(|(id, _)| id)
            .collect();
        let id = self.connection.replace(&earlier, spec).await?;
        let head = self.connection.head(id).cloned();
        let mut data = json!({
            "collection": collection,
            "filter": filter_json,
            "subscription_id": id,
            "head_seq": head.as_ref().and_then(Position::as_seq).unwrap_or(0),
        });
        if let Some(head) = head.filter(|head| head.streams() > 1) {
            data["head_position"] = head.to_string().into();
        }
        if let Some(record_id) = record_id {
            data["record_id"] = Value::String(record_id);
        }
        Ok(message("subscribed", data))
    }

    /// `{"action":"publish","channel":"chat.room1","data":{...},"ack":true}`:
    /// a message on a channel, within the connection's rate and size limits.
    /// With `ack`, the reply `{"type":"ack","data":{"channel","seq"}}`.
    async fn publish(
        &mut self,
        mut action: serde_json::Map<String, Value>,
    ) -> Result<Option<Message>, ApiError> {
        let channel = target(&mut action, "publish")?;
        let data = match action.remove("data").or_else(|| action.remove("payload")) {
            Some(data @ Value::Object(_)) => data,
            None => Event::empty_data(),
            Some(_) => return Err(ApiError::invalid("`data` must be a JSON object")),
        };
        let ack = matches!(action.remove("ack"), Some(Value::Bool(true)));
        let event = Event::new(EventType::Broadcast, channel.clone(), "", data);
        let seq = self.connection.publish(event).await?;
        Ok(ack.then(|| message("ack", json!({"channel": channel, "seq": seq}))))
    }

    /// `{"action":"auth","token":...}`: authenticates, or refreshes the
    /// token before it expires.
    fn auth(&mut self, mut action: serde_json::Map<String, Value>) -> Result<Message, ApiError> {
        let token = match action.remove("token") {
            Some(Value::String(token)) if !token.is_empty() => token,
            _ => return Err(ApiError::invalid("auth needs a `token`")),
        };
        let principal = self.app.engine.auth().authenticate_token(&token)?;
        let mut data = json!({ "user_id": principal.user_id() });
        if let Principal::User(claims) = &principal {
            if let Some(email) = claims.claims.get("email") {
                data["email"] = email.clone();
            }
            data["expires_at"] = Value::String(format_timestamp(claims.expires_at));
        }
        self.connection.authenticate(principal)?;
        Ok(message("authenticated", data))
    }

    fn unsubscribe(
        &mut self,
        mut action: serde_json::Map<String, Value>,
    ) -> Result<Message, ApiError> {
        let collection = target(&mut action, "unsubscribe")?;
        let record_id = optional_string(&mut action, "record_id")?;
        let matching: Vec<u64> = self
            .connection
            .subscriptions()
            .filter(|(_, s)| {
                s.collection == collection && (record_id.is_none() || s.record_id == record_id)
            })
            .map(|(id, _)| id)
            .collect();
        if matching.is_empty() {
            return Err(ApiError::new(
                ErrorKind::NotFound,
                format!("not subscribed to {collection:?}"),
            ));
        }
        for id in matching {
            let _ = self.connection.unsubscribe(id);
        }
        Ok(message("unsubscribed", json!({ "collection": collection })))
    }
}

impl socket::Session for Session {
    const IDLE_HINT: &'static str = "; answer ping with pong";

    fn parts(&mut self) -> (&mut ClientSocket, &mut Connection) {
        (&mut self.socket, &mut self.connection)
    }

    fn error_message(&self, error: &ApiError) -> Message {
        error_message(error)
    }

    /// `{"type":"connected","data":{"connection_id","server_time"}}`.
    async fn greet(&mut self) -> Step {
        let greeting = connected_data(&self.connection);
        self.reply(message("connected", greeting)).await
    }

    async fn on_text(&mut self, text: &str) -> Step {
        match self.on_action(text).await {
            Ok(Some(reply)) => self.reply(reply).await,
            Ok(None) => Step::Continue,
            // A subscription the bus cannot serve now: the client
            // reconnects and resumes (the seed client does only on close).
            Err(error) if error.kind == ErrorKind::Unavailable => {
                let code = error.close_code();
                socket::close_with(self, error, code).await
            }
            Err(error) => self.reply(error_message(&error)).await,
        }
    }

    /// Writes `first` and whatever else is at hand, then flushes once. An
    /// eviction while the socket is blocked abandons the batch: the client
    /// resumes from what it did receive.
    async fn write_received(&mut self, first: Received) -> Step {
        let name_subscriptions = self.connection.subscriptions().nth(1).is_some();
        let mut taken = 0;
        let mut next = Some(first);
        while let Some(received) = next {
            match received {
                Received::Event(delivery) => {
                    put_event_frame(self.socket.encoded(), &delivery, name_subscriptions);
                }
                Received::Reset(notice) => {
                    let reset = self.reset_message(&notice);
                    put_text_frame(self.socket.encoded(), &reset);
                }
            }
            taken += 1;
            while !name_subscriptions
                && taken < MAX_BATCH
                && let Some(slice) = self.connection.try_recv_run()
            {
                put_run_frames(self.socket.encoded(), &slice);
                taken += slice.range.len();
            }
            next = if taken < MAX_BATCH {
                self.connection.try_recv()
            } else {
                None
            };
        }
        socket::unless_evicted(self.socket.write_encoded(), self.connection.evicted()).await
    }

    async fn heartbeat(&mut self) -> Step {
        let now = format_timestamp(SystemTime::now());
        self.reply(message("ping", json!({ "timestamp": now })))
            .await
    }

    /// `{"type":"reconnect","data":{"reason","since"}}`.
    fn reconnect_message(&self, since: Option<Position>) -> Option<Message> {
        let reason = EndReason::Shutdown.to_string();
        let since = since.as_ref().map(Position::to_json);
        Some(message(
            "reconnect",
            json!({ "reason": reason, "since": since }),
        ))
    }
}

/// The `collection` (or, the same thing, `channel`) an action names.
fn target(action: &mut serde_json::Map<String, Value>, name: &str) -> Result<String, ApiError> {
    let field = if action.contains_key("channel") {
        "channel"
    } else {
        "collection"
    };
    match action.remove(field) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s),
        Some(Value::String(_)) | None => Err(ApiError::invalid(format!(
            "{name} needs a `collection` or `channel` (a name, or \"*\" for all)"
        ))),
        Some(_) => Err(ApiError::invalid(format!("`{field}` must be a string"))),
    }
}

fn optional_string(
    action: &mut serde_json::Map<String, Value>,
    field: &str,
) -> Result<Option<String>, ApiError> {
    match action.remove(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(Value::Number(n)) => Ok(Some(n.to_string())),
        Some(_) => Err(ApiError::invalid(format!("`{field}` must be a string"))),
    }
}
