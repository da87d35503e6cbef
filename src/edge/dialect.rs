//! WebSocket dialects: the protocols of other realtime systems (Fluxbase,
//! better-query), spoken so that their own clients work against strom
//! unmodified.
//!
//! A dialect is only a translation. Its channels name strom collections (or
//! one record of one), its `subscribe` is an engine subscription, its
//! `broadcast` an engine publish, and its presence strom's presence. So the
//! policy, row filters, limits and slow-consumer eviction hold exactly as on
//! the native endpoint. This module is the session every dialect shares:
//! upgrade, authentication, the read/write loop, heartbeats, idle and
//! eviction handling, and the census of channels the dialects' stats
//! report. Each dialect ([`super::fluxbase`], [`super::better_query`]) says
//! how its frames read and look.

use super::Checked;
use super::errors::{ApiError, ErrorKind};
use super::socket::{self, ClientSocket, Liveness, NotAnUpgrade, Step, Upgrade};
use super::ws::MAX_BATCH;
use super::{AppState, check_origin};
use crate::engine::presence::PRESENCE_COLLECTION;
use crate::engine::presence::PresenceUser;
use crate::engine::{Connection, Received, SubscriptionSpec, Transport};
use crate::event::{Event, EventType, View};
use crate::filter::Filter;
use axum::Json;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::Mutex;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

/// What a client asks, in any dialect.
#[derive(Debug, PartialEq)]
pub(super) enum Action {
    Subscribe(String),
    Unsubscribe(String),
    /// A message for every other subscriber of the channel.
    Broadcast {
        channel: String,
        payload: Value,
    },
    Heartbeat,
}

/// Where a dialect's channel leads: a collection, or one record of it.
#[derive(Debug, PartialEq)]
pub(super) struct Target {
    pub collection: String,
    pub record_id: Option<String>,
}

/// A presence frame: `(channel, the change, who is on the channel now)`.
pub(super) type PresenceFrame = fn(&str, &Event, &[PresenceUser]) -> Value;

/// How one dialect reads and writes frames. Every function is pure: the
/// session does the engine calls.
pub(super) trait Dialect: Send + Sync + 'static {
    /// Counted under this in stats and metrics.
    const TRANSPORT: Transport;
    /// Sends `heartbeat()` on a timer (every `--ws-ping-interval`).
    const SENDS_HEARTBEATS: bool;
    /// Answers each client heartbeat with `heartbeat()`.
    const ANSWERS_HEARTBEATS: bool;
    /// Shows who joins and leaves each subscribed channel, in this frame.
    const PRESENCE: Option<PresenceFrame> = None;

    /// Reads one client frame.
    fn parse(text: &str) -> Result<Action, String>;
    /// The strom collection (and record) a channel names.
    fn target(channel: &str) -> Target;
    fn subscribed(channel: &str) -> Value;
    fn unsubscribed(channel: &str) -> Value;
    /// An event on `channel`, as `view` shows it.
    fn event(channel: &str, event: &Event, view: View) -> Value;
    fn heartbeat() -> Value;
    fn error(message: &str) -> Value;
    /// Adds what every server frame carries.
    fn stamp(frame: Value) -> Value {
        frame
    }
    /// How long a client that sends nothing is kept.
    fn idle_timeout(app: &AppState) -> Duration;
}

/// Per node: how many connections of each dialect hold each channel, for
/// the dialects' stats endpoints.
#[derive(Default)]
pub struct ChannelCensus {
    held: Mutex<HashMap<(Transport, String), usize>>,
}

impl ChannelCensus {
    fn join(&self, transport: Transport, channel: &str) {
        let mut held = self.held.lock().expect("census lock");
        *held.entry((transport, channel.to_owned())).or_default() += 1;
    }

    fn leave(&self, transport: Transport, channel: &str) {
        let mut held = self.held.lock().expect("census lock");
        let key = (transport, channel.to_owned());
        if let Some(count) = held.get_mut(&key) {
            *count -= 1;
            if *count == 0 {
                held.remove(&key);
            }
        }
    }

    /// The channels connections of `transport` hold, with how many hold
    /// each, sorted by name.
    pub(super) fn channels(&self, transport: Transport) -> Vec<(String, usize)> {
        let held = self.held.lock().expect("census lock");
        let mut channels: Vec<(String, usize)> = held
            .iter()
            .filter(|((t, _), _)| *t == transport)
            .map(|((_, channel), count)| (channel.clone(), *count))
            .collect();
        channels.sort();
        channels
    }
}

#[derive(Debug, Deserialize)]
pub(super) struct TokenParam {
    token: Option<String>,
}

/// An HTTP error as the dialects' servers answered: `{"error": "..."}`.
pub(super) fn http_error(error: &ApiError) -> Response {
    (error.http_status(), Json(json!({"error": error.message}))).into_response()
}

/// The WebSocket endpoint of dialect `D`. A request that is not an upgrade
/// gets 426; a bad token 401 before the upgrade, both with `{"error"}`.
pub(super) async fn upgrade<D: Dialect>(
    State(app): State<AppState>,
    Checked(Query(params)): Checked<Query<TokenParam>>,
    headers: HeaderMap,
    upgrade: Result<Upgrade, NotAnUpgrade>,
) -> Response {
    let upgrade = match upgrade {
        Ok(upgrade) => upgrade,
        Err(refused) => return refused.respond(json!({"error": refused.message()})),
    };
    let connection = check_origin(&app, &headers)
        .and_then(|()| super::principal(&app.engine, &headers, params.token.as_deref()))
        .and_then(|principal| Ok(app.engine.connect(D::TRANSPORT, principal)?));
    let connection = match connection {
        Ok(connection) => connection,
        Err(error) => return http_error(&error),
    };
    let tracker = app.tasks.clone();
    let delivery = app.engine.delivery().clone();
    let max_frame_bytes = app.ws.max_frame_bytes;
    upgrade.accept(max_frame_bytes, &delivery, move |socket| {
        tracker.track_future(Session::<D>::start(app, socket, connection))
    })
}

/// A channel a session holds: its subscription, and the one that shows its
/// presence.
struct Held {
    data: u64,
    presence: Option<u64>,
}

/// What a subscription id stands for in a session.
struct Owner {
    channel: String,
    presence: bool,
}

struct Session<D: Dialect> {
    app: AppState,
    connection: Connection,
    socket: ClientSocket,
    channels: HashMap<String, Held>,
    owners: HashMap<u64, Owner>,
    dialect: PhantomData<D>,
}

impl<D: Dialect> Drop for Session<D> {
    fn drop(&mut self) {
        for channel in self.channels.keys() {
            self.app.census.leave(D::TRANSPORT, channel);
        }
    }
}

fn text(frame: Value) -> Message {
    Message::text(frame.to_string())
}

impl<D: Dialect> Session<D> {
    /// The session's whole life, as one future (see `ws::Session::start`).
    fn start(
        app: AppState,
        socket: ClientSocket,
        connection: Connection,
    ) -> impl Future<Output = ()> + Send + 'static {
        let liveness = Liveness {
            heartbeat_every: app.ws.ping_interval,
            idle_after: D::idle_timeout(&app),
        };
        let session = Session::<D> {
            app,
            connection,
            socket,
            channels: HashMap::new(),
            owners: HashMap::new(),
            dialect: PhantomData,
        };
        socket::run(session, liveness)
    }

    async fn send(&mut self, frame: Value) -> Step {
        match self.socket.send(text(D::stamp(frame))).await {
            Ok(()) => Step::Continue,
            Err(_) => Step::Close,
        }
    }

    async fn on_action(&mut self, action: Action) -> Result<Option<Value>, ApiError> {
        match action {
            Action::Subscribe(channel) => self.subscribe(&channel).await.map(Some),
            Action::Unsubscribe(channel) => Ok(Some(self.unsubscribe(&channel))),
            Action::Broadcast { channel, payload } => {
                self.broadcast(&channel, payload).await.map(|()| None)
            }
            Action::Heartbeat => Ok(D::ANSWERS_HEARTBEATS.then(D::heartbeat)),
        }
    }

    /// Subscribes to `channel` (again: replacing the earlier subscription),
    /// and to its presence where the dialect shows it and the policy lets
    /// the client see it. Presence first, so the client sees its own join.
    async fn subscribe(&mut self, channel: &str) -> Result<Value, ApiError> {
        let Target {
            collection,
            record_id,
        } = D::target(channel);
        let spec = SubscriptionSpec {
            collection: collection.clone(),
            record_id,
            filter: None,
            since: None,
            echo: false,
        };
        spec.validate()?;
        let held = self.channels.get(channel);
        let mut presence = held.and_then(|h| h.presence);
        let earlier: Vec<u64> = held.map(|h| h.data).into_iter().collect();
        let sees_presence = D::PRESENCE.is_some()
            && self
                .app
                .engine
                .check_presence(self.connection.principal(), Some(&collection))
                .is_ok();
        if presence.is_none() && sees_presence {
            let mut on_channel = serde_json::Map::new();
            on_channel.insert("channel".to_owned(), Value::String(collection.clone()));
            let spec = SubscriptionSpec {
                collection: PRESENCE_COLLECTION.to_owned(),
                record_id: None,
                filter: Some(Filter::from_shorthand(&on_channel)?),
                since: None,
                echo: true,
            };
            presence = Some(self.connection.subscribe(spec).await?);
        }
        let data = match self.connection.replace(&earlier, spec).await {
            Ok(id) => id,
            Err(error) => {
                if held.is_none()
                    && let Some(id) = presence
                {
                    let _ = self.connection.unsubscribe(id);
                }
                return Err(error.into());
            }
        };
        for id in earlier {
            self.owners.remove(&id);
        }
        let owner = |presence| Owner {
            channel: channel.to_owned(),
            presence,
        };
        self.owners.insert(data, owner(false));
        if let Some(id) = presence {
            self.owners.insert(id, owner(true));
        }
        if self
            .channels
            .insert(channel.to_owned(), Held { data, presence })
            .is_none()
        {
            self.app.census.join(D::TRANSPORT, channel);
        }
        Ok(D::subscribed(channel))
    }

    /// Leaves `channel`; answered the same whether or not it was held.
    fn unsubscribe(&mut self, channel: &str) -> Value {
        if let Some(held) = self.channels.remove(channel) {
            for id in std::iter::once(held.data).chain(held.presence) {
                self.owners.remove(&id);
                let _ = self.connection.unsubscribe(id);
            }
            self.app.census.leave(D::TRANSPORT, channel);
        }
        D::unsubscribed(channel)
    }

    /// Publishes `payload` on `channel` as this client; the client's own
    /// subscriptions do not receive it back.
    async fn broadcast(&mut self, channel: &str, payload: Value) -> Result<(), ApiError> {
        if !payload.is_object() {
            return Err(ApiError::invalid("`payload` must be a JSON object"));
        }
        let Target {
            collection,
            record_id,
        } = D::target(channel);
        let event = Event::new(
            EventType::Broadcast,
            collection,
            record_id.unwrap_or_default(),
            payload,
        );
        self.connection.publish(event).await?;
        Ok(())
    }

    /// The frames of one delivery: one per channel it reached.
    fn frames(&self, received: Received) -> Vec<Message> {
        let Received::Event(delivery) = received else {
            // Dialect subscriptions never resume, so never reset.
            return Vec::new();
        };
        let event = &delivery.event.event;
        let mut online = None;
        delivery
            .subscriptions()
            .filter_map(|id| self.owners.get(&id))
            .map(|owner| {
                let frame = match D::PRESENCE {
                    Some(presence) if owner.presence => {
                        let channel = event.data["channel"].as_str();
                        let users = online.get_or_insert_with(|| {
                            self.app
                                .engine
                                .presence(self.connection.principal(), channel)
                                .unwrap_or_default()
                        });
                        presence(&owner.channel, event, users)
                    }
                    _ => D::event(&owner.channel, event, delivery.view),
                };
                text(D::stamp(frame))
            })
            .collect()
    }
}

impl<D: Dialect> socket::Session for Session<D> {
    fn parts(&mut self) -> (&mut ClientSocket, &mut Connection) {
        (&mut self.socket, &mut self.connection)
    }

    fn error_message(&self, error: &ApiError) -> Message {
        text(D::stamp(D::error(&error.message)))
    }

    /// A bad frame gets the dialect's error and the connection goes on.
    async fn on_text(&mut self, text: &str) -> Step {
        let reply = match D::parse(text) {
            Ok(action) => match self.on_action(action).await {
                Ok(reply) => reply,
                // What the bus cannot serve now ends the connection: the
                // client reconnects and subscribes again.
                Err(error) if error.kind == ErrorKind::Unavailable => {
                    let code = error.close_code();
                    return socket::close_with(self, error, code).await;
                }
                Err(error) => Some(D::error(&error.message)),
            },
            Err(message) => Some(D::error(&message)),
        };
        match reply {
            Some(frame) => self.send(frame).await,
            None => Step::Continue,
        }
    }

    /// Writes `first` and whatever else is at hand, then flushes once; an
    /// eviction while the socket is blocked abandons the batch.
    async fn write_received(&mut self, first: Received) -> Step {
        let mut frames = self.frames(first);
        let mut taken = 1;
        while taken < MAX_BATCH
            && let Some(next) = self.connection.try_recv()
        {
            frames.extend(self.frames(next));
            taken += 1;
        }
        let socket = &mut self.socket;
        let write = async move {
            for frame in frames {
                socket.feed(frame).await?;
            }
            socket.flush().await
        };
        socket::unless_evicted(write, self.connection.evicted()).await
    }

    /// Sends the dialect's heartbeat, if it sends its own.
    async fn heartbeat(&mut self) -> Step {
        if D::SENDS_HEARTBEATS {
            return self.send(D::heartbeat()).await;
        }
        Step::Continue
    }
}

/// A string field of a client frame, required and not empty.
pub(super) fn required_string(
    frame: &serde_json::Map<String, Value>,
    field: &str,
) -> Result<String, String> {
    match frame.get(field) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        Some(Value::String(_)) | None => Err(format!("missing field `{field}`")),
        Some(_) => Err(format!("`{field}` must be a string")),
    }
}

/// A client frame: a JSON object with a string `type`.
pub(super) fn typed_frame(text: &str) -> Result<(String, serde_json::Map<String, Value>), String> {
    let value: Value = serde_json::from_str(text).map_err(|e| format!("malformed JSON: {e}"))?;
    let Value::Object(frame) = value else {
        return Err("a message must be a JSON object with a `type`".to_owned());
    };
    let kind = required_string(&frame, "type")?;
    Ok((kind, frame))
}

/// Who a presence change is about and their name, from its event.
pub(super) fn presence_user(change: &Event) -> (&str, Option<&str>) {
    (
        change.data["user_id"].as_str().unwrap_or_default(),
        change.data["user_name"].as_str(),
    )
}
