//! A small Rust client for strom's gRPC API: connect, publish, subscribe
//! with a text filter (resuming from a seq), and presence. It wraps the
//! generated tonic client ([`crate::proto::realtime_client`]), which stays
//! available for everything else.
//!
//! ```no_run
//! # async fn demo() -> Result<(), strom::client::ClientError> {
//! use strom::client::{Client, Update};
//! let mut client = Client::connect("http://127.0.0.1:8000").await?;
//! let mut products = client.subscribe("products", Some("price > 100"), None).await?;
//! client.publish(strom::client::record("products", "p1", serde_json::json!({"price": 150}))).await?;
//! while let Some(Update::Event(event)) = products.next().await? {
//!     println!("{} {} seq {}", event.event_type, event.record_id, event.seq);
//! }
//! # Ok(()) }
//! ```

use crate::edge::grpc::{event_from_proto, event_to_proto};
use crate::event::{Event, EventType};
use crate::proto;
use crate::proto::realtime_client::RealtimeClient;
use std::time::SystemTime;
use thiserror::Error;
use tonic::transport::Channel;

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("cannot reach strom at {url}: {source}")]
    Connect {
        url: String,
        source: tonic::transport::Error,
    },
    #[error("{}: {}", .0.code(), .0.message())]
    Status(#[from] tonic::Status),
    #[error("{0}")]
    Invalid(String),
}

/// A connection to one strom node.
#[derive(Clone)]
pub struct Client {
    grpc: RealtimeClient<Channel>,
    credential: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
}

/// What a subscription yields.
#[derive(Debug, Clone, PartialEq)]
pub enum Update {
    /// An event, with `left_filter` when the record left the filter.
    Event(Event),
    LeftFilter(Event),
    /// The resume position was older than the retained history; the
    /// replay goes on from `first_available`.
    Reset {
        since: u64,
        first_available: u64,
    },
}

/// A live subscription; resume it elsewhere from [`Subscription::last_seq`].
pub struct Subscription {
    stream: tonic::Streaming<proto::SubscribeResponse>,
    last_seq: Option<u64>,
}

impl Client {
    pub async fn connect(url: &str) -> Result<Client, ClientError> {
        let grpc = RealtimeClient::connect(url.to_owned())
            .await
            .map_err(|source| ClientError::Connect {
                url: url.to_owned(),
                source,
            })?;
        Ok(Client {
            grpc,
            credential: None,
        })
    }

    /// Sends `token` (a JWT or an API key) with every call.
    pub fn with_token(mut self, token: &str) -> Result<Client, ClientError> {
        let value = format!("Bearer {token}")
            .parse()
            .map_err(|_| ClientError::Invalid("the token is not a valid header value".into()))?;
        self.credential = Some(value);
        Ok(self)
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Some(credential) = &self.credential {
            request
                .metadata_mut()
                .insert("authorization", credential.clone());
        }
        request
    }

    /// Publishes one event; returns its seq.
    pub async fn publish(&mut self, event: Event) -> Result<u64, ClientError> {
        Ok(self.publish_all(vec![event]).await?[0])
    }

    /// Publishes events in order; returns their seqs.
    pub async fn publish_all(&mut self, events: Vec<Event>) -> Result<Vec<u64>, ClientError> {
        let request = self.request(proto::PublishRequest {
            events: events.iter().map(event_to_proto).collect(),
        });
        Ok(self.grpc.publish(request).await?.into_inner().seqs)
    }

    /// Subscribes to `collection` (`*` for all) with an optional text filter;
    /// with `since`, the retained events after it come first. Returns once
    /// the subscription is live.
    pub async fn subscribe(
        &mut self,
        collection: &str,
        filter: Option<&str>,
        since: Option<u64>,
    ) -> Result<Subscription, ClientError> {
        let request = self.request(proto::SubscribeRequest {
            collection: collection.to_owned(),
            filter: filter.map(|f| proto::subscribe_request::Filter::Text(f.to_owned())),
            since_seq: since,
            ..Default::default()
        });
        let mut stream = self.grpc.subscribe(request).await?.into_inner();
        match stream.message().await?.and_then(|m| m.kind) {
            Some(proto::subscribe_response::Kind::Subscribed(_)) => Ok(Subscription {
                stream,
                last_seq: since,
            }),
            other => Err(ClientError::Invalid(format!(
                "expected `subscribed` first, got {other:?}"
            ))),
        }
    }

    /// Who is online (on `channel`, or at all), across the cluster.
    pub async fn presence(
        &mut self,
        channel: Option<&str>,
    ) -> Result<Vec<proto::PresenceUser>, ClientError> {
        let request = self.request(proto::GetPresenceRequest {
            channel: channel.unwrap_or_default().to_owned(),
        });
        Ok(self.grpc.get_presence(request).await?.into_inner().users)
    }
}

impl Subscription {
    /// The next update; `None` when the server ended the stream cleanly.
    pub async fn next(&mut self) -> Result<Option<Update>, ClientError> {
        loop {
            let Some(message) = self.stream.message().await? else {
                return Ok(None);
            };
            return Ok(Some(match message.kind {
                Some(proto::subscribe_response::Kind::Event(event)) => {
                    let (seq, left, sender) = (event.seq, event.left_filter, event.sender.clone());
                    let mut event = event_from_proto(event, SystemTime::now())
                        .map_err(|e| ClientError::Invalid(e.message))?;
                    event.seq = seq;
                    event.sender = Some(sender).filter(|s| !s.is_empty());
                    if seq > 0 {
                        self.last_seq = Some(seq);
                    }
                    if left {
                        Update::LeftFilter(event)
                    } else {
                        Update::Event(event)
                    }
                }
                Some(proto::subscribe_response::Kind::Reset(reset)) => Update::Reset {
                    since: reset.since_seq,
                    first_available: reset.first_available_seq,
                },
                _ => continue,
            }));
        }
    }

    /// The seq of the last event received: resume from it after a
    /// disconnect, on any node.
    pub fn last_seq(&self) -> Option<u64> {
        self.last_seq
    }
}

/// A `record.created` event, for quick publishing.
pub fn record(collection: &str, record_id: &str, data: serde_json::Value) -> Event {
    Event::new(EventType::RecordCreated, collection, record_id, data)
}
