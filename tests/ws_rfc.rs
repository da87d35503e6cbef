//! What strom writes itself on a WebSocket, checked byte by byte against
//! RFC 6455 (and RFC 8441 for HTTP/2): the handshake's refusals, failing a
//! connection that breaks the protocol with 1002 or 1007, a frame too large
//! answered with 1009 before a graceful close, and a WebSocket over an
//! HTTP/2 extended CONNECT.

mod common;

use common::*;
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// Sends a handshake with `extra` headers; the status line and head of
/// the answer.
async fn handshake(addr: SocketAddr, extra: &str) -> (TcpStream, String) {
    let mut socket = TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "GET /api/v1/ws/realtime HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n{extra}\r\n"
    );
    socket.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0];
        within("the handshake's answer", socket.read_exact(&mut byte))
            .await
            .unwrap();
        head.push(byte[0]);
    }
    (socket, String::from_utf8(head).unwrap())
}

/// One server frame: opcode and payload (server frames are unmasked).
async fn read_frame(socket: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut header = [0; 2];
    within("a frame", socket.read_exact(&mut header))
        .await
        .unwrap();
    assert_eq!(header[1] & 0x80, 0, "server frames are not masked");
    let len = match header[1] & 0x7f {
        126 => {
            let mut len = [0; 2];
            socket.read_exact(&mut len).await.unwrap();
            u16::from_be_bytes(len) as usize
        }
        127 => {
            let mut len = [0; 8];
            socket.read_exact(&mut len).await.unwrap();
            u64::from_be_bytes(len) as usize
        }
        len => len as usize,
    };
    let mut payload = vec![0; len];
    socket.read_exact(&mut payload).await.unwrap();
    (header[0] & 0x0f, payload)
}

/// Reads frames until the close frame; its code.
async fn close_code(socket: &mut TcpStream) -> u16 {
    loop {
        let (opcode, payload) = read_frame(socket).await;
        if opcode == 0x8 {
            return u16::from_be_bytes([payload[0], payload[1]]);
        }
    }
}

/// A client frame, masked (with a zero key, which leaves the payload as it is).
fn client_frame(first: u8, payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![first];
    match payload.len() {
        len @ 0..=125 => frame.push(0x80 | len as u8),
        len @ 126..=0xffff => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(len as u16).to_be_bytes());
        }
        len => {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(&[0; 4]);
    frame.extend_from_slice(payload);
    frame
}

#[tokio::test]
async fn malformed_handshakes_get_400_and_other_versions_426_naming_13() {
    let server = TestServer::memory().await;
    let version = "Sec-WebSocket-Version: 13\r\n";
    for (extra, why) in [
        (format!("Sec-WebSocket-Key: \r\n{version}"), "an empty key"),
        (
            format!("Sec-WebSocket-Key: not-a-key\r\n{version}"),
            "a key that is not 16 bytes in base64",
        ),
        (
            format!("Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Key: {KEY}\r\n{version}"),
            "two keys",
        ),
        (
            format!("Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13, 8\r\n"),
            "two versions",
        ),
    ] {
        let (_, head) = handshake(server.addr, &extra).await;
        assert!(head.starts_with("HTTP/1.1 400 "), "{why}: {head}");
    }
    let (_, head) = handshake(
        server.addr,
        &format!("Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 8\r\n"),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 426 "), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("sec-websocket-version: 13\r\n"),
        "{head}"
    );
    // The sample handshake of RFC 6455 §1.3 is accepted, with its answer.
    let (_, head) = handshake(
        server.addr,
        &format!("Sec-WebSocket-Key: {KEY}\r\n{version}"),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    assert!(head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "{head}");
}

#[tokio::test]
async fn a_client_that_breaks_the_protocol_is_failed_with_1002_or_1007() {
    let server = TestServer::memory().await;
    let open = || {
        handshake(
            server.addr,
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n",
        )
    };
    let unmasked = b"\x81\x02{}".to_vec();
    let rsv = {
        let mut frame = client_frame(0x81, b"{}");
        frame[0] |= 0x40;
        frame
    };
    let bad_opcode = client_frame(0x83, b"");
    let fragmented_ping = client_frame(0x09, b"");
    let long_ping = client_frame(0x89, &[0; 126]);
    for (frame, code, why) in [
        (unmasked, 1002, "an unmasked frame"),
        (rsv, 1002, "an RSV bit"),
        (bad_opcode, 1002, "an unknown opcode"),
        (fragmented_ping, 1002, "a fragmented control frame"),
        (long_ping, 1002, "a control frame over 125 bytes"),
        (
            client_frame(0x81, b"\xff\xfe"),
            1007,
            "text that is not UTF-8",
        ),
    ] {
        let (mut socket, head) = open().await;
        assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
        let (opcode, greeting) = read_frame(&mut socket).await;
        assert_eq!(opcode, 0x1, "{}", String::from_utf8_lossy(&greeting));
        socket.write_all(&frame).await.unwrap();
        assert_eq!(close_code(&mut socket).await, code, "{why}");
    }
}

#[tokio::test]
async fn a_frame_too_large_gets_1009_and_a_graceful_close() {
    let server = TestServer::memory().await;
    let (mut socket, _) = handshake(
        server.addr,
        &format!("Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n"),
    )
    .await;
    read_frame(&mut socket).await;
    // Over twice --ws-max-frame-bytes (64 KiB): tungstenite refuses its
    // header and leaves the payload unread.
    let frame = client_frame(0x81, &vec![b'a'; 200 * 1024]);
    socket.write_all(&frame).await.unwrap();
    let (opcode, error) = read_frame(&mut socket).await;
    assert_eq!(opcode, 0x1);
    assert!(String::from_utf8_lossy(&error).contains("\"error\""));
    assert_eq!(close_code(&mut socket).await, 1009);
    // Read what is left: the server closes without resetting the
    // connection, so nothing it sent is lost.
    let mut rest = Vec::new();
    let closed = within("the server to close", socket.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "{closed:?}");
}

#[tokio::test]
async fn a_websocket_opens_over_an_http2_extended_connect() {
    let server = TestServer::memory().await;
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let (mut client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    // Any answer comes after the server's SETTINGS.
    let health = http::Request::get(format!("http://{}/healthz", server.addr))
        .body(())
        .unwrap();
    let (answer, _) = client.send_request(health, true).unwrap();
    within("an answer", answer).await.unwrap();
    let mut client = client.ready().await.unwrap();
    assert!(
        client.is_extended_connect_protocol_enabled(),
        "SETTINGS_ENABLE_CONNECT_PROTOCOL"
    );
    let mut request = http::Request::builder()
        .method("CONNECT")
        .uri(format!("http://{}/api/v1/ws/realtime", server.addr))
        .header("sec-websocket-version", "13")
        .body(())
        .unwrap();
    request
        .extensions_mut()
        .insert(h2::ext::Protocol::from("websocket"));
    let (response, _send) = client.send_request(request, false).unwrap();
    let response = within("the CONNECT's answer", response).await.unwrap();
    assert_eq!(response.status(), 200, "RFC 8441 §5: 2xx opens the tunnel");
    // The tunnel carries WebSocket frames: the greeting comes first.
    let mut body = response.into_body();
    let mut bytes = Vec::new();
    // A frame's header and payload lengths, once its header is in.
    let lengths = |bytes: &[u8]| match bytes.get(1).map(|b| b & 0x7f) {
        Some(126) if bytes.len() >= 4 => {
            Some((4, u16::from_be_bytes([bytes[2], bytes[3]]) as usize))
        }
        Some(len) if len < 126 => Some((2, len as usize)),
        _ => None,
    };
    while lengths(&bytes).is_none_or(|(header, len)| bytes.len() < header + len) {
        let chunk = within("the greeting", body.data()).await.unwrap().unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
        bytes.extend_from_slice(&chunk);
    }
    assert_eq!(bytes[0], 0x81, "a final text frame");
    let (header, len) = lengths(&bytes).unwrap();
    let greeting: serde_json::Value = serde_json::from_slice(&bytes[header..header + len]).unwrap();
    assert_eq!(greeting["type"], "connected", "{greeting}");
}
