//! The gRPC edge: `strom.v1.Realtime` over HTTP/2 (and gRPC-Web, through
//! the layer the server adds), translating protobuf to engine calls.

use super::errors::ApiError;
use crate::auth::Principal;
use crate::engine::presence::{PRESENCE_COLLECTION, PresenceUser};
use crate::engine::{Connection, EndReason, Engine, Received, SubscriptionSpec, Transport};
use crate::event::{Event, EventType, Position, Wire};
use crate::filter::{Condition, Filter, Op, Operand, Scalar};
use crate::proto;
use bytes::Bytes;
use futures_util::Stream;
use prost::Message;
use prost_types::value::Kind;
use serde_json::{Map, Number, Value};
use std::pin::Pin;
use std::time::SystemTime;
use tonic::{Request, Response, Status};

/// The generated server, whose Subscribe streams [`EncodedResponse`]s.
pub mod generated {
    #![allow(clippy::all, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/server/strom.v1.rs"));
}

pub struct RealtimeService {
    engine: Engine,
}

impl RealtimeService {
    pub fn new(engine: Engine) -> Self {
        RealtimeService { engine }
    }

    /// Who the call comes from: metadata `authorization: Bearer <token or
    /// API key>`, else `x-api-key`.
    fn principal(&self, metadata: &tonic::metadata::MetadataMap) -> Result<Principal, Status> {
        let value = |name| metadata.get(name).and_then(|v| v.to_str().ok());
        let credential = value("authorization")
            .and_then(super::bearer_credential)
            .or_else(|| value("x-api-key"));
        self.engine
            .auth()
            .authenticate(credential)
            .map_err(|e| ApiError::from(e).grpc_status())
    }
}

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl generated::realtime_server::Realtime for RealtimeService {
    async fn publish(
        &self,
        request: Request<proto::PublishRequest>,
    ) -> Result<Response<proto::PublishResponse>, Status> {
        let principal = self.principal(request.metadata())?;
        let now = SystemTime::now();
        let events = request
            .into_inner()
            .events
            .into_iter()
            .enumerate()
            .map(|(i, e)| {
                event_from_proto(e, now)
                    .map_err(|e| ApiError::invalid(format!("events[{i}]: {}", e.message)))
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.grpc_status())?;
        let receipt = self
            .engine
            .publish(&principal, events)
            .await
            .map_err(|e| ApiError::from(e).grpc_status())?;
        Ok(Response::new(proto::PublishResponse {
            seqs: receipt.seqs,
            duplicates: receipt.duplicates.into_iter().map(|i| i as u32).collect(),
        }))
    }

    type SubscribeStream = ResponseStream<EncodedResponse>;

    async fn subscribe(
        &self,
        request: Request<proto::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let principal = self.principal(request.metadata())?;
        let spec = spec_from_proto(request.into_inner()).map_err(|e| e.grpc_status())?;
        let mut connection = self
            .engine
            .connect(Transport::Grpc, principal)
            .map_err(|e| ApiError::from(e).grpc_status())?;
        let subscription_id = connection
            .subscribe(spec)
            .await
            .map_err(|e| ApiError::from(e).grpc_status())?;
        let head = connection.head(subscription_id).cloned();
        let head_position = head.as_ref().filter(|head| head.streams() > 1);
        let first = EncodedResponse::of(&proto::SubscribeResponse {
            kind: Some(proto::subscribe_response::Kind::Subscribed(
                proto::Subscribed {
                    subscription_id,
                    head_seq: head.as_ref().and_then(Position::as_seq).unwrap_or(0),
                    head_position: head_position.map(Position::to_string).unwrap_or_default(),
                },
            )),
        });
        let events = futures_util::stream::unfold(Some(connection), |connection| async move {
            let mut connection = connection?;
            match connection.recv().await {
                Ok(received) => Some((Ok(response(received)), Some(connection))),
                Err(reason) => Some((Err(ending_status(&connection, reason)), None)),
            }
        });
        let stream = futures_util::stream::once(async { Ok(first) });
        Ok(Response::new(Box::pin(futures_util::StreamExt::chain(
            stream, events,
        ))))
    }

    async fn get_presence(
        &self,
        request: Request<proto::GetPresenceRequest>,
    ) -> Result<Response<proto::PresenceSnapshot>, Status> {
        let principal = self.principal(request.metadata())?;
        let channel = request.into_inner().channel;
        let users = self
            .engine
            .presence(&principal, Some(channel.as_str()).filter(|c| !c.is_empty()))
            .map_err(|e| ApiError::from(e).grpc_status())?;
        Ok(Response::new(snapshot_to_proto(channel, &users)))
    }

    type WatchPresenceStream = ResponseStream<proto::PresenceUpdate>;

    /// The snapshot, then joins and leaves as they happen. Changes right
    /// after the snapshot may repeat what it already shows.
    async fn watch_presence(
        &self,
        request: Request<proto::WatchPresenceRequest>,
    ) -> Result<Response<Self::WatchPresenceStream>, Status> {
        use proto::presence_update::Kind;
        let principal = self.principal(request.metadata())?;
        let channel = request.into_inner().channel;
        let wanted = match channel.as_str() {
            "" => Scalar::Null,
            name => Scalar::String(name.into()),
        };
        let filter = Condition::new("channel", Op::Eq, Operand::Scalar(wanted))
            .map_err(|e| ApiError::from(e).grpc_status())?;
        let channel_name = Some(channel.as_str()).filter(|c| !c.is_empty());
        // Refused before anything starts, like subscribing to the channel.
        self.engine
            .check_presence(&principal, channel_name)
            .map_err(|e| ApiError::from(e).grpc_status())?;
        let mut connection = self
            .engine
            .connect(Transport::Grpc, principal.clone())
            .map_err(|e| ApiError::from(e).grpc_status())?;
        connection
            .subscribe(SubscriptionSpec {
                collection: PRESENCE_COLLECTION.into(),
                record_id: None,
                filter: Some(Filter::Condition(filter)),
                since: None,
                echo: false,
            })
            .await
            .map_err(|e| ApiError::from(e).grpc_status())?;
        let users = self
            .engine
            .presence(&principal, channel_name)
            .map_err(|e| ApiError::from(e).grpc_status())?;
        let first = proto::PresenceUpdate {
            kind: Some(Kind::Snapshot(snapshot_to_proto(channel, &users))),
        };
        let changes = futures_util::stream::unfold(Some(connection), |connection| async move {
            let mut connection = connection?;
            loop {
                return match connection.recv().await {
                    Ok(Received::Event(delivery)) => {
                        let event = &delivery.event.event;
                        let user = presence_user_from_event(&event.data);
                        let kind = match event.event_type {
                            EventType::UserJoined => Kind::Joined(user),
                            _ => Kind::Left(user),
                        };
                        let update = proto::PresenceUpdate { kind: Some(kind) };
                        Some((Ok(update), Some(connection)))
                    }
                    Ok(Received::Reset(_)) => continue,
                    Err(reason) => Some((Err(ApiError::from(reason).grpc_status()), None)),
                };
            }
        });
        let stream = futures_util::stream::once(async { Ok(first) });
        Ok(Response::new(Box::pin(futures_util::StreamExt::chain(
            stream, changes,
        ))))
    }
}

fn presence_user_to_proto(user: &PresenceUser) -> proto::PresenceUser {
    proto::PresenceUser {
        user_id: user.user_id.clone(),
        user_name: user.user_name.clone().unwrap_or_default(),
        connections: user.connections,
        last_seen: Some(user.last_seen.into()),
    }
}

fn snapshot_to_proto(channel: String, users: &[PresenceUser]) -> proto::PresenceSnapshot {
    proto::PresenceSnapshot {
        channel,
        count: users.len() as u32,
        users: users.iter().map(presence_user_to_proto).collect(),
    }
}

/// The user of a `user.joined` / `user.left` event's data.
fn presence_user_from_event(data: &Value) -> proto::PresenceUser {
    let last_seen = data["last_seen"]
        .as_str()
        .and_then(|t| crate::event::parse_timestamp(t).ok());
    proto::PresenceUser {
        user_id: data["user_id"].as_str().unwrap_or_default().into(),
        user_name: data["user_name"].as_str().unwrap_or_default().into(),
        connections: data["connections"].as_u64().unwrap_or_default() as u32,
        last_seen: last_seen.map(Into::into),
    }
}

/// A `SubscribeResponse` already encoded. The generated server streams
/// these (build.rs maps the message to this type), so an event is encoded
/// once (`Wire::Grpc`) and its bytes shared by every gRPC subscriber.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct EncodedResponse(Bytes);

impl EncodedResponse {
    fn of(response: &proto::SubscribeResponse) -> Self {
        EncodedResponse(response.encode_to_vec().into())
    }
}

impl Message for EncodedResponse {
    fn encode_raw(&self, buf: &mut impl bytes::BufMut) {
        buf.put_slice(&self.0);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: prost::encoding::WireType,
        buf: &mut impl bytes::Buf,
        ctx: prost::encoding::DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        // The server only sends these.
        prost::encoding::skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        self.0.len()
    }

    fn clear(&mut self) {
        self.0.clear();
    }
}

/// The server's codec: prost's, except that a request that is not valid
/// protobuf is the caller's mistake, `INVALID_ARGUMENT`, where prost
/// answers `INTERNAL` (build.rs sets it as the generated server's codec).
#[derive(Debug, Clone, Default)]
pub struct Codec<T, U>(tonic_prost::ProstCodec<T, U>);

impl<T, U> tonic::codec::Codec for Codec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = tonic_prost::ProstEncoder<T>;
    type Decoder = RequestDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.0.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        RequestDecoder(self.0.decoder())
    }
}

/// Decodes requests for [`Codec`].
pub struct RequestDecoder<U>(tonic_prost::ProstDecoder<U>);

impl<U: Message + Default> tonic::codec::Decoder for RequestDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0.decode(buf).map_err(|status| {
            Status::invalid_argument(format!("malformed request: {}", status.message()))
        })
    }

    fn buffer_settings(&self) -> tonic::codec::BufferSettings {
        self.0.buffer_settings()
    }
}

fn response(received: Received) -> EncodedResponse {
    use proto::subscribe_response::Kind;
    match received {
        Received::Event(delivery) => {
            let bytes = delivery.event.encoded(Wire::Grpc, delivery.view, || {
                let mut event = event_to_proto(&delivery.event.event);
                let (data, old_data) = delivery.view.images(&delivery.event.event);
                event.data = Some(data.map(struct_from_json).unwrap_or_default());
                event.old_data = old_data.map(struct_from_json);
                event.left_filter = delivery.view.left_filter;
                event.partition = delivery.event.partition;
                let response = proto::SubscribeResponse {
                    kind: Some(Kind::Event(event)),
                };
                response.encode_to_vec().into()
            });
            EncodedResponse(bytes.clone())
        }
        Received::Reset(notice) => EncodedResponse::of(&proto::SubscribeResponse {
            kind: Some(Kind::Reset(
                match (notice.since.as_seq(), notice.first_available.as_seq()) {
                    (Some(since_seq), Some(first_available_seq)) => proto::Reset {
                        since_seq,
                        first_available_seq,
                        ..Default::default()
                    },
                    _ => proto::Reset {
                        since_position: notice.since.to_string(),
                        first_available_position: notice.first_available.to_string(),
                        ..Default::default()
                    },
                },
            )),
        }),
    }
}

pub fn spec_from_proto(request: proto::SubscribeRequest) -> Result<SubscriptionSpec, ApiError> {
    if request.collection.is_empty() {
        return Err(ApiError::invalid(
            "collection is required (a name, or \"*\" for all)",
        ));
    }
    let filter = match request.filter {
        None => None,
        Some(proto::subscribe_request::Filter::Tree(tree)) => Some(filter_from_proto(tree)?),
        Some(proto::subscribe_request::Filter::Text(text)) => Some(Filter::parse(&text)?),
    };
    let spec = SubscriptionSpec {
        collection: request.collection,
        record_id: Some(request.record_id).filter(|r| !r.is_empty()),
        filter,
        since: match request.since_position.as_str() {
            "" => request.since_seq.map(Position::seq),
            token => Some(token.parse()?),
        },
        echo: request.echo,
    };
    spec.validate()?;
    Ok(spec)
}

// --- conversions -----------------------------------------------------------

pub fn event_type_to_proto(t: EventType) -> proto::EventType {
    match t {
        EventType::RecordCreated => proto::EventType::RecordCreated,
        EventType::RecordUpdated => proto::EventType::RecordUpdated,
        EventType::RecordDeleted => proto::EventType::RecordDeleted,
        EventType::CollectionCreated => proto::EventType::CollectionCreated,
        EventType::CollectionUpdated => proto::EventType::CollectionUpdated,
        EventType::CollectionDeleted => proto::EventType::CollectionDeleted,
        EventType::UserJoined => proto::EventType::UserJoined,
        EventType::UserLeft => proto::EventType::UserLeft,
        EventType::Broadcast => proto::EventType::Broadcast,
    }
}

pub fn event_type_from_proto(t: i32) -> Result<EventType, ApiError> {
    let t = proto::EventType::try_from(t).unwrap_or(proto::EventType::Unspecified);
    EventType::ALL
        .into_iter()
        .find(|e| event_type_to_proto(*e) == t)
        .ok_or_else(|| ApiError::invalid("type is required: one of the EVENT_TYPE_* values"))
}

pub fn event_to_proto(event: &Event) -> proto::Event {
    proto::Event {
        r#type: event_type_to_proto(event.event_type) as i32,
        collection: event.collection.clone(),
        record_id: event.record_id.clone(),
        data: Some(struct_from_json(&event.data)),
        old_data: event.old_data.as_ref().map(struct_from_json),
        timestamp: Some(event.timestamp.into()),
        seq: event.seq,
        left_filter: false,
        sender: event.sender.clone().unwrap_or_default(),
        partition: None,
    }
}

pub fn event_from_proto(event: proto::Event, now: SystemTime) -> Result<Event, ApiError> {
    let timestamp = match event.timestamp {
        Some(t) => {
            SystemTime::try_from(t).map_err(|e| ApiError::invalid(format!("timestamp: {e}")))?
        }
        None => now,
    };
    let event = Event {
        event_type: event_type_from_proto(event.r#type)?,
        collection: event.collection,
        record_id: event.record_id,
        data: event
            .data
            .map_or_else(Event::empty_data, |s| json_from_struct(&s)),
        old_data: event.old_data.map(|s| json_from_struct(&s)),
        timestamp,
        seq: 0,
        sender: None,
        origin: None,
        id: None,
    };
    event
        .validate()
        .map_err(|e| ApiError::invalid(e.to_string()))?;
    Ok(event)
}

pub fn struct_from_json(value: &Value) -> prost_types::Struct {
    let fields = match value {
        Value::Object(map) => map
            .iter()
            .map(|(k, v)| (k.clone(), value_from_json(v)))
            .collect(),
        _ => Default::default(),
    };
    prost_types::Struct { fields }
}

pub fn value_from_json(value: &Value) -> prost_types::Value {
    let kind = match value {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(*b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        Value::String(s) => Kind::StringValue(s.clone()),
        Value::Array(items) => Kind::ListValue(prost_types::ListValue {
            values: items.iter().map(value_from_json).collect(),
        }),
        Value::Object(_) => Kind::StructValue(struct_from_json(value)),
    };
    prost_types::Value { kind: Some(kind) }
}

pub fn json_from_struct(s: &prost_types::Struct) -> Value {
    Value::Object(
        s.fields
            .iter()
            .map(|(k, v)| (k.clone(), json_from_value(v)))
            .collect::<Map<_, _>>(),
    )
}

/// Protobuf numbers are doubles; whole numbers come back as JSON integers.
pub fn json_from_value(value: &prost_types::Value) -> Value {
    match &value.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::BoolValue(b)) => Value::Bool(*b),
        Some(Kind::NumberValue(n)) => {
            if n.fract() == 0.0 && n.abs() < 9.007_199_254_740_992e15 {
                Value::Number((*n as i64).into())
            } else {
                Number::from_f64(*n).map_or(Value::Null, Value::Number)
            }
        }
        Some(Kind::StringValue(s)) => Value::String(s.clone()),
        Some(Kind::ListValue(list)) => {
            Value::Array(list.values.iter().map(json_from_value).collect())
        }
        Some(Kind::StructValue(s)) => json_from_struct(s),
    }
}

pub fn filter_from_proto(filter: proto::Filter) -> Result<Filter, ApiError> {
    fn convert(filter: proto::Filter, depth: usize) -> Result<Filter, ApiError> {
        use proto::filter::Node;
        if depth > crate::filter::MAX_DEPTH {
            return Err(ApiError::invalid(format!(
                "invalid filter: nests deeper than {} levels",
                crate::filter::MAX_DEPTH
            )));
        }
        let children = |list: proto::FilterList| {
            list.filters
                .into_iter()
                .map(|f| convert(f, depth + 1))
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(match filter.node {
            None => return Err(ApiError::invalid("invalid filter: a filter node is empty")),
            Some(Node::All(list)) => Filter::All(children(list)?),
            Some(Node::Any(list)) => Filter::Any(children(list)?),
            Some(Node::Negate(inner)) => Filter::Not(Box::new(convert(*inner, depth + 1)?)),
            Some(Node::Condition(c)) => Filter::Condition(condition_from_proto(c)?),
        })
    }
    let filter = convert(filter, 0)?;
    filter.check_limits()?;
    Ok(filter)
}

fn condition_from_proto(c: proto::Condition) -> Result<Condition, ApiError> {
    use proto::Operator as P;
    let op = match P::try_from(c.op).unwrap_or(P::Unspecified) {
        P::Unspecified => {
            return Err(ApiError::invalid(format!(
                "invalid filter: condition on {:?} has no operator",
                c.field
            )));
        }
        P::Eq => Op::Eq,
        P::Ne => Op::Ne,
        P::Gt => Op::Gt,
        P::Gte => Op::Gte,
        P::Lt => Op::Lt,
        P::Lte => Op::Lte,
        P::In => Op::In,
        P::NotIn => Op::NotIn,
        P::Contains => Op::Contains,
        P::StartsWith => Op::StartsWith,
        P::Exists => Op::Exists,
    };
    let scalar = |v: &prost_types::Value| {
        Scalar::from_json(&json_from_value(v)).ok_or_else(|| {
            ApiError::invalid(format!(
                "invalid filter: the value for {:?} must be a string, number, boolean or null",
                c.field
            ))
        })
    };
    let operand = match (op, &c.value) {
        (Op::Exists, _) | (_, None) => Operand::None,
        (
            Op::In | Op::NotIn,
            Some(prost_types::Value {
                kind: Some(Kind::ListValue(list)),
            }),
        ) => Operand::List(list.values.iter().map(scalar).collect::<Result<_, _>>()?),
        (_, Some(v)) => Operand::Scalar(scalar(v)?),
    };
    Ok(Condition::new(&c.field, op, operand)?)
}

/// The status a subscription ends with: a draining server's `UNAVAILABLE`
/// carries the position to resume after in `strom-resume-since`.
fn ending_status(connection: &Connection, reason: EndReason) -> Status {
    let drained = reason == EndReason::Shutdown;
    let mut status = ApiError::from(reason).grpc_status();
    let since = connection.resume_position().filter(|_| drained);
    if let Some(Ok(value)) = since.map(|since| since.to_string().parse()) {
        status.metadata_mut().insert(RESUME_SINCE, value);
    }
    status
}

/// The trailer naming where a drained subscription resumes.
pub const RESUME_SINCE: &str = "strom-resume-since";

impl From<ApiError> for Status {
    fn from(error: ApiError) -> Self {
        error.grpc_status()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Delivery;
    use crate::event::{SharedEvent, View};
    use std::sync::Arc;

    #[test]
    fn an_event_is_encoded_once_for_every_grpc_subscriber() {
        let event = Event::new(
            EventType::RecordCreated,
            "posts",
            "p1",
            serde_json::json!({"title": "hi"}),
        );
        let shared = Arc::new(SharedEvent::new(event));
        let deliver = |subscription| {
            response(Received::Event(Delivery::new(
                subscription,
                Arc::clone(&shared),
                View::default(),
            )))
        };
        let (first, second) = (deliver(1), deliver(2));
        assert_eq!(
            first.0.as_ptr(),
            second.0.as_ptr(),
            "the same bytes, shared"
        );
        let decoded = proto::SubscribeResponse::decode(first.0.clone()).unwrap();
        let Some(proto::subscribe_response::Kind::Event(event)) = decoded.kind else {
            panic!("an event");
        };
        assert_eq!(
            (event.collection.as_str(), event.record_id.as_str()),
            ("posts", "p1")
        );
        assert_eq!(first.encoded_len(), first.0.len());
    }
}
