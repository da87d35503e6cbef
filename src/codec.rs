//! The JSON spelling of events.
//!
//! One shape is shared by every JSON surface: the body of `POST
//! /api/v1/publish`, the body of a NATS message on `strom.events.<collection>`
//! (so `nats pub` reaches subscribers exactly like a Publish call), and the
//! `data` of WebSocket `event` messages and SSE events:
//!
//! ```json
//! {"type":"record.created","collection":"posts","record_id":"abc",
//!  "data":{...},"old_data":{...}|null,"timestamp":"RFC 3339","seq":7}
//! ```
//!
//! On input `seq` is ignored, `timestamp` is optional and `record_id` may be
//! a string or a number. On output `sender` (the publisher's user id) appears
//! when known, and a `broadcast` carries `channel` (its collection) too.
//! The NATS body also carries `sender` and `origin` (the publishing
//! connection, for echo control); over HTTP the server sets both itself.

use crate::event::{Event, EventError, EventType, View, format_timestamp, parse_timestamp};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::sync::LazyLock;
use std::time::SystemTime;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum CodecError {
    #[error("invalid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("{0}")]
    Event(#[from] EventError),
    #[error("missing field `{0}`")]
    Missing(&'static str),
    #[error("record_id must be a string or a number")]
    RecordId,
}

#[derive(Deserialize)]
struct EventIn {
    #[serde(rename = "type")]
    event_type: Option<String>,
    collection: Option<String>,
    #[serde(default)]
    record_id: Value,
    data: Option<Value>,
    old_data: Option<Value>,
    timestamp: Option<String>,
    sender: Option<String>,
    origin: Option<String>,
    id: Option<String>,
}

/// Reads one event. `collection` (from a NATS subject) wins over the body's.
/// `now` fills in a missing timestamp.
pub fn decode_event(
    body: &[u8],
    collection: Option<&str>,
    now: SystemTime,
) -> Result<Event, CodecError> {
    let input: EventIn = serde_json::from_slice(body)?;
    event_from_input(input, collection, now)
}

/// Like [`decode_event`], from an already parsed JSON value.
pub fn event_from_value(value: Value, now: SystemTime) -> Result<Event, CodecError> {
    event_from_input(serde_json::from_value(value)?, None, now)
}

fn event_from_input(
    input: EventIn,
    collection: Option<&str>,
    now: SystemTime,
) -> Result<Event, CodecError> {
    let event_type = EventType::parse(&input.event_type.ok_or(CodecError::Missing("type"))?)?;
    let collection = match collection {
        Some(c) => c.to_owned(),
        None => input.collection.ok_or(CodecError::Missing("collection"))?,
    };
    let record_id = match input.record_id {
        Value::Null => String::new(),
        Value::String(s) => s,
        Value::Number(n) => n.to_string(),
        _ => return Err(CodecError::RecordId),
    };
    let timestamp = match input.timestamp {
        Some(text) => parse_timestamp(&text)?,
        None => now,
    };
    let event = Event {
        event_type,
        collection,
        record_id,
        data: input.data.unwrap_or_else(Event::empty_data),
        old_data: input.old_data.filter(|v| !v.is_null()),
        timestamp,
        seq: 0,
        sender: input.sender,
        origin: input.origin,
        id: input.id,
    };
    event.validate()?;
    Ok(event)
}

#[derive(Serialize)]
struct EventOut<'a> {
    #[serde(rename = "type")]
    event_type: &'a str,
    collection: &'a str,
    record_id: Option<&'a str>,
    data: &'a Value,
    old_data: Option<&'a Value>,
    timestamp: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    seq: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    partition: Option<u32>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    left_filter: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    channel: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sender: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    origin: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
}

/// What a withheld `data` is sent as.
static NO_IMAGE: LazyLock<Value> = LazyLock::new(|| Value::Object(Map::new()));

fn event_out(event: &Event, seq: Option<u64>, view: View) -> EventOut<'_> {
    let broadcast = event.event_type == EventType::Broadcast;
    let (data, old_data) = view.images(event);
    EventOut {
        event_type: event.event_type.as_str(),
        collection: &event.collection,
        record_id: (!event.record_id.is_empty()).then_some(event.record_id.as_str()),
        data: data.unwrap_or(&NO_IMAGE),
        old_data,
        timestamp: format_timestamp(event.timestamp),
        seq,
        partition: None,
        left_filter: view.left_filter,
        channel: broadcast.then_some(event.collection.as_str()),
        sender: event.sender.as_deref(),
        origin: None,
        id: event.id.as_deref(),
    }
}

/// The event as delivered to subscribers, with its `seq`.
pub fn encode_event(event: &Event, view: View) -> Vec<u8> {
    encode_delivered(event, None, view)
}

/// The event as delivered, with the NATS stream it is in when collections
/// are spread over several (see [`crate::event::Position`]).
pub fn encode_delivered(event: &Event, partition: Option<u32>, view: View) -> Vec<u8> {
    let out = EventOut {
        partition,
        ..event_out(event, Some(event.seq), view)
    };
    serde_json::to_vec(&out).expect("JSON of an event")
}

/// The event as a NATS message body: no `seq`, which the stream assigns,
/// and the `origin` connection.
pub fn encode_bus_body(event: &Event) -> Vec<u8> {
    let out = EventOut {
        origin: event.origin.as_deref(),
        ..event_out(event, None, View::default())
    };
    serde_json::to_vec(&out).expect("JSON of an event")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn round_trip() {
        let now = SystemTime::UNIX_EPOCH;
        let body = br#"{"type":"record.updated","collection":"posts","record_id":7,
            "data":{"a":1},"old_data":{"a":0},"timestamp":"2025-01-15T10:30:00Z"}"#;
        let mut event = decode_event(body, None, now).unwrap();
        assert_eq!(event.record_id, "7");
        event.seq = 3;
        let out: Value = serde_json::from_slice(&encode_event(
            &event,
            View {
                left_filter: true,
                withheld: false,
            },
        ))
        .unwrap();
        assert_eq!(
            out,
            json!({"type":"record.updated","collection":"posts","record_id":"7",
                "data":{"a":1},"old_data":{"a":0},
                "timestamp":"2025-01-15T10:30:00.000000Z","seq":3,"left_filter":true})
        );
        let again = decode_event(&encode_bus_body(&event), None, now).unwrap();
        assert_eq!(again, Event { seq: 0, ..event });
    }

    #[test]
    fn a_withheld_image_is_not_encoded() {
        let body = br#"{"type":"record.updated","collection":"orders","record_id":"1",
            "data":{"owner":"b"},"old_data":{"owner":"a"}}"#;
        let event = decode_event(body, None, SystemTime::UNIX_EPOCH).unwrap();
        let images = |view| {
            let out: Value = serde_json::from_slice(&encode_event(&event, view)).unwrap();
            (out["data"].clone(), out["old_data"].clone())
        };
        let left = View {
            left_filter: true,
            withheld: true,
        };
        assert_eq!(images(left), (json!({}), json!({"owner": "a"})));
        let entered = View {
            left_filter: false,
            withheld: true,
        };
        assert_eq!(images(entered), (json!({"owner": "b"}), Value::Null));
        assert_eq!(
            images(View::default()),
            (json!({"owner": "b"}), json!({"owner": "a"}))
        );
    }

    #[test]
    fn errors_say_what_is_wrong() {
        let now = SystemTime::UNIX_EPOCH;
        let err = |body: &str| {
            decode_event(body.as_bytes(), None, now)
                .unwrap_err()
                .to_string()
        };
        assert!(err("{").contains("invalid JSON"));
        assert!(err(r#"{"collection":"a"}"#).contains("missing field `type`"));
        assert!(err(r#"{"type":"record.created"}"#).contains("missing field `collection`"));
        assert!(err(r#"{"type":"nope","collection":"a"}"#).contains("unknown event type"));
        assert!(err(r#"{"type":"record.created","collection":"a b"}"#).contains("collection"));
        assert!(err(r#"{"type":"record.created","collection":"a","data":[1]}"#).contains("data"));
        assert!(
            err(r#"{"type":"record.created","collection":"a","record_id":{}}"#)
                .contains("record_id")
        );
        // The subject's collection wins over the body's.
        let event = decode_event(br#"{"type":"record.created"}"#, Some("posts"), now).unwrap();
        assert_eq!(event.collection, "posts");
    }
}
