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

#[tokio::test]
async fn silent_and_half_open_connections_are_closed_and_free_their_slots() {
    let server = with_limits(ConnectionLimits {
        total: 4,
        header_timeout: Duration::from_secs(1),
        ..ConnectionLimits::default()
    })
    .await;
    // Four ways to hold a slot without ever sending a request: nothing,
    // half an HTTP/2 preface, the whole preface without its SETTINGS
    // frame, and half an HTTP/1.1 head (on the SSE path, read by strom
    // itself rather than hyper).
    let openings: [&[u8]; 4] = [
        b"",
        b"PRI * HTTP/2.0\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"GET /api/v1/realtime/posts HTTP/1.1\r\nHost: x\r\n",
    ];
    let mut held = Vec::new();
    for opening in openings {
        let mut socket = TcpStream::connect(server.addr).await.unwrap();
        socket.write_all(opening).await.unwrap();
        held.push(socket);
    }
    let (status, body) = server.get("/healthz").await;
    assert_eq!(status, 503, "the cap is full: {body}");

    for (mut socket, opening) in held.into_iter().zip(openings) {
        let mut answer = Vec::new();
        let closed = within("the server to close a silent connection", async {
            socket.read_to_end(&mut answer).await
        });
        let _ = closed.await;
        let answer = String::from_utf8_lossy(&answer);
        if opening.starts_with(b"GET") {
            assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
            assert!(answer.contains("header timeout"), "{answer}");
        } else {
            assert_eq!(answer, "", "an HTTP/2 opening is closed without an answer");
        }
    }
    // The slots are free again (each once its task has ended).
    within("a healthy client to be served", async {
        while server.get("/healthz").await.0 != 200 {
            tokio::task::yield_now().await;
        }
    })
    .await;
}

#[tokio::test]
async fn an_sse_request_with_a_body_framing_hyper_refuses_is_refused() {
    let server = TestServer::memory().await;
    for framing in [
        "Content-Length: -1",
        "Content-Length: 1\r\nContent-Length: 2",
        "Transfer-Encoding: chunked, gzip",
    ] {
        let mut socket = TcpStream::connect(server.addr).await.unwrap();
        let head = format!("GET /api/v1/realtime/posts HTTP/1.1\r\nHost: x\r\n{framing}\r\n\r\n");
        socket.write_all(head.as_bytes()).await.unwrap();
        let mut answer = vec![0; 12];
        within("an answer", socket.read_exact(&mut answer))
            .await
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&answer),
            "HTTP/1.1 400",
            "{framing}"
        );
    }
}
