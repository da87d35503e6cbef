//! strom: a realtime service. Publishers push events (gRPC, REST, NATS);
//! subscribers receive the ones matching their filters over gRPC, gRPC-Web,
//! WebSocket or Server-Sent Events.
//!
//! The map of the crate, in the direction dependencies point:
//! - [`edge`]: the transports and the one error map. Edges translate wire
//!   formats to engine calls; they own no delivery logic.
//! - [`engine`]: connections, subscriptions, the match index and fan-out.
//!   Knows nothing of HTTP, gRPC, JSON framing or NATS.
//! - [`auth`]: tokens, API keys and the authorization policy the engine
//!   applies on every subscribe, publish and `*` delivery.
//! - [`bus`]: moves events between publishers and the engines of every node
//!   (in memory, or NATS JetStream).
//! - [`filter`]: the filter language, its evaluation and the match index;
//!   depends on nothing else here.
//! - [`capture`]: database change sources (Postgres), publishing through
//!   the engine like any publisher.
//! - [`event`]: the event model and the per-wire-format encoding cache.
//! - [`codec`]: the JSON spelling of events, shared by the JSON edges and
//!   the NATS bus body.
//! - [`metrics`]: the process's counters and histograms for `/metrics`.
//! - [`server`]: wires it all onto one listener, whose sockets get a
//!   [`write_deadline`] and, when configured, [`tls`]; [`proto`]: generated code;
//!   [`client`]: a small Rust client over the generated one.

pub mod accept;
pub mod auth;
pub mod bus;
pub mod capture;
pub mod client;
pub mod codec;
pub mod edge;
pub mod engine;
pub mod event;
pub mod filter;
pub mod metrics;
pub mod server;
pub mod sse_front;
pub mod tls;
pub mod write_deadline;

/// Code generated from `proto/strom/v1/realtime.proto`.
pub mod proto {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("strom.v1");

    /// The encoded descriptors, served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/strom_descriptor.bin"));
}
