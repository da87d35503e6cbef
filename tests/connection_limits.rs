//! Limits applied before any request is read: connections per address and
//! in total, and the deadline for a request's header.

mod common;

use common::*;
use std::time::Duration;
use strom::accept::ConnectionLimits;
use strom::server::ServerConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn with_limits(limits: ConnectionLimits) -> TestServer {
    TestServer::start(ServerConfig {
        connections: limits,
        ..ServerConfig::default()
    })
    .await
}

#[tokio::test]
async fn connections_over_the_per_address_cap_are_refused_with_a_reason() {
    let server = with_limits(ConnectionLimits {
        per_ip: 2,
        ..ConnectionLimits::default()
    })
    .await;
    let _first = WsClient::connect(server.addr, "").await.unwrap();
    let _second = WsClient::connect(server.addr, "").await.unwrap();
    let (status, body) = server.get("/healthz").await;
    assert_eq!(status, 429, "{body}");
    assert!(
        body.contains("too many connections from 127.0.0.1"),
        "{body}"
    );
    assert_eq!(
        WsClient::connect(server.addr, "").await.err(),
        Some(429),
        "a WebSocket handshake too"
    );
}

#[tokio::test]
async fn connections_over_the_total_cap_are_refused_with_a_reason() {
    let server = with_limits(ConnectionLimits {
        total: 1,
        ..ConnectionLimits::default()
    })
    .await;
    let _only = WsClient::connect(server.addr, "").await.unwrap();
    let (status, body) = server.get("/healthz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("limit of 1 connections"), "{body}");
}

#[tokio::test]
async fn a_client_that_never_finishes_its_header_is_disconnected() {
    let server = with_limits(ConnectionLimits {
        header_timeout: Duration::from_secs(1),
        ..ConnectionLimits::default()
    })
    .await;
    let mut slow = TcpStream::connect(server.addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    within(
        "the server to close the connection",
        slow.read_to_end(&mut rest),
    )
    .await
    .unwrap();
    // The server survives and serves others.
    let (status, _) = server.get("/healthz").await;
    assert_eq!(status, 200);
}
