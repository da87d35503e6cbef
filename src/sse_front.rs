//! SSE streams served without hyper's connection state.
//!
//! An SSE stream is an HTTP/1.1 response that lasts as long as the client
//! stays, often hours, and most of that time it is idle. hyper keeps two
//! 8 KiB buffers (the read buffer and the header write buffer) for the
//! whole life of a connection, which made an idle SSE stream cost about
//! 24 KiB where a WebSocket costs 7.
//!
//! So the accept loop looks at the first bytes of each connection. One that
//! starts with `GET /api/v1/realtime` (an SSE stream, see `edge::sse`)
//! has its request head read and parsed here and handed to the same axum
//! router. The response is written here, chunked, with `Connection:
//! close`. Everything else, with the bytes already read, goes to hyper
//! unchanged (HTTP/2 and gRPC included). A stream asked for on a connection
//! that already carried another request is served by hyper as before.
//! Limits are the same: the connection was admitted and counted by the accept
//! loop, its writes have the same deadline, and a head must arrive within
//! the header timeout.

use axum::body::Body;
use futures_util::StreamExt;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tower::ServiceExt;

/// What every SSE stream's request line starts with.
const SSE_PREFIX: &[u8] = b"GET /api/v1/realtime";

/// The longest request head read here; a longer one goes to hyper, which
/// refuses it.
const MAX_HEAD: usize = 16 * 1024;

/// The headers of a request head parsed here, at most.
const MAX_HEADERS: usize = 64;

/// A connection after its first bytes were looked at.
pub enum Sniffed<T> {
    /// An SSE stream request, and the connection it came on.
    Sse(Box<http::Request<Body>>, T),
    /// Anything else: the connection, with what was read of it.
    Other(Prefixed<T>),
}

/// Reads as much of `io` as it takes to tell an SSE stream request from
/// anything else (at most a request head, within `timeout`).
pub async fn sniff<T: AsyncRead + Unpin>(mut io: T, timeout: Duration) -> Sniffed<T> {
    let mut head = Vec::new();
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match parse(&head) {
            Parse::Sse(request) => return Sniffed::Sse(request, io),
            Parse::Other => return Sniffed::Other(Prefixed::new(head, io)),
            Parse::Partial => {}
        }
        let mut chunk = [0u8; 1024];
        match tokio::time::timeout_at(deadline, io.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => head.extend_from_slice(&chunk[..n]),
            // Closed, failed or too slow: hyper says what it says to those.
            _ => return Sniffed::Other(Prefixed::new(head, io)),
        }
    }
}

enum Parse {
    Sse(Box<http::Request<Body>>),
    Other,
    Partial,
}

fn parse(head: &[u8]) -> Parse {
    let compared = head.len().min(SSE_PREFIX.len());
    if head[..compared] != SSE_PREFIX[..compared] {
        return Parse::Other;
    }
    match head.get(SSE_PREFIX.len()) {
        None => return Parse::Partial,
        Some(b' ' | b'?' | b'/') => {}
        Some(_) => return Parse::Other,
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    match parsed.parse(head) {
        Ok(httparse::Status::Complete(len)) if len == head.len() => {}
        // Pipelined requests, bad heads: hyper's business.
        Ok(httparse::Status::Complete(_)) | Err(_) => return Parse::Other,
        Ok(httparse::Status::Partial) if head.len() < MAX_HEAD => return Parse::Partial,
        Ok(httparse::Status::Partial) => return Parse::Other,
    }
    if parsed.version != Some(1) {
        return Parse::Other;
    }
    let mut request = http::Request::builder()
        .method(http::Method::GET)
        .uri(parsed.path.unwrap_or("/"))
        .version(http::Version::HTTP_11);
    for header in parsed.headers.iter() {
        request = request.header(header.name, header.value);
    }
    match request.body(Body::empty()) {
        Ok(request) => Parse::Sse(Box::new(request)),
        Err(_) => Parse::Other,
    }
}

/// Serves one SSE request on `io` with `app`: the response, chunked, until
/// the stream ends or the client goes away; then the connection closes.
pub async fn serve<T>(app: axum::Router, request: Box<http::Request<Body>>, mut io: T)
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let Ok(response) = app.oneshot(*request).await;
    let (parts, body) = response.into_parts();
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(parts.status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(parts.status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in &parts.headers {
        if matches!(
            name,
            &http::header::CONTENT_LENGTH
                | &http::header::TRANSFER_ENCODING
                | &http::header::CONNECTION
        ) {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"transfer-encoding: chunked\r\nconnection: close\r\n\r\n");
    if io.write_all(&out).await.is_err() {
        return;
    }
    let mut data = body.into_data_stream();
    // Read only to notice the client leaving (a GET sends nothing more).
    let mut probe = [0u8; 16];
    loop {
        tokio::select! {
            chunk = data.next() => match chunk {
                Some(Ok(bytes)) if bytes.is_empty() => continue,
                Some(Ok(bytes)) => {
                    out.clear();
                    out.extend_from_slice(format!("{:x}\r\n", bytes.len()).as_bytes());
                    out.extend_from_slice(&bytes);
                    out.extend_from_slice(b"\r\n");
                    if io.write_all(&out).await.is_err() {
                        return;
                    }
                    // A large frame leaves a large buffer: give it back.
                    if out.capacity() > 4096 {
                        out = Vec::new();
                    }
                }
                _ => break,
            },
            read = io.read(&mut probe) => match read {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            },
        }
    }
    let _ = io.write_all(b"0\r\n\r\n").await;
    let _ = io.shutdown().await;
}

/// A connection whose first bytes were already read: reads give those
/// first, then the connection's.
pub struct Prefixed<T> {
    prefix: Vec<u8>,
    at: usize,
    io: T,
}

impl<T> Prefixed<T> {
    fn new(prefix: Vec<u8>, io: T) -> Self {
        Prefixed { prefix, at: 0, io }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Prefixed<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.at < this.prefix.len() {
            let n = (this.prefix.len() - this.at).min(buf.remaining());
            buf.put_slice(&this.prefix[this.at..this.at + n]);
            this.at += n;
            if this.at == this.prefix.len() {
                this.prefix = Vec::new();
                this.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Prefixed<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bytes: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, bytes)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(head: &str) -> &'static str {
        match parse(head.as_bytes()) {
            Parse::Sse(_) => "sse",
            Parse::Other => "other",
            Parse::Partial => "partial",
        }
    }

    #[test]
    fn only_complete_sse_heads_are_taken() {
        let head = "GET /api/v1/realtime/posts?query=a%3D1 HTTP/1.1\r\nHost: x\r\nLast-Event-ID: 7\r\n\r\n";
        assert_eq!(kind(head), "sse");
        assert_eq!(kind(&head[..30]), "partial");
        assert_eq!(kind("GET /api/v1/re"), "partial");
        assert_eq!(kind("GET /api/v1/realtime HTTP/1.1\r\n\r\n"), "sse");
        assert_eq!(kind("GET /api/v1/realtimes HTTP/1.1\r\n\r\n"), "other");
        assert_eq!(kind("GET /api/v1/ws/realtime HTTP/1.1\r\n\r\n"), "other");
        assert_eq!(kind("POST /api/v1/publish HTTP/1.1\r\n"), "other");
        assert_eq!(kind("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), "other");
        assert_eq!(kind("GET /api/v1/realtime HTTP/1.0\r\n\r\n"), "other");
        // A second request behind the first: hyper serves both.
        assert_eq!(
            kind("GET /api/v1/realtime HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\n\r\n"),
            "other"
        );
    }

    #[test]
    fn headers_and_query_reach_the_request() {
        let head = "GET /api/v1/realtime/posts?since=3 HTTP/1.1\r\nLast-Event-ID: 7\r\nAuthorization: Bearer t\r\n\r\n";
        let Parse::Sse(request) = parse(head.as_bytes()) else {
            panic!("not taken")
        };
        assert_eq!(request.uri().path(), "/api/v1/realtime/posts");
        assert_eq!(request.uri().query(), Some("since=3"));
        assert_eq!(request.headers()["last-event-id"], "7");
        assert_eq!(request.headers()["authorization"], "Bearer t");
    }

    #[tokio::test]
    async fn what_was_read_is_read_again_first() {
        let (mut client, server) = tokio::io::duplex(64);
        client.write_all(b"world").await.unwrap();
        drop(client);
        let mut prefixed = Prefixed::new(b"hello ".to_vec(), server);
        let mut all = String::new();
        prefixed.read_to_string(&mut all).await.unwrap();
        assert_eq!(all, "hello world");
    }
}
