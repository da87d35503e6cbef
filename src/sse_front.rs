//! SSE streams served without hyper's connection state.
//!
//! An SSE stream is an HTTP/1.1 response that lasts as long as the client
//! stays, often hours, and most of that time it is idle. hyper keeps two
//! 8 KiB buffers (the read buffer and the header write buffer) for the
//! whole life of a connection, which made an idle SSE stream cost about
//! 24 KiB where a WebSocket costs 7.
//!
//! So the accept loop reads the opening of each connection here: a whole
//! first request head, or an HTTP/2 preface with its SETTINGS frame, by
//! one deadline from accept (the header timeout, a TLS handshake
//! included); a connection that does not send that much in time is closed.
//! A `GET /api/v1/realtime…` head (an SSE stream, see `edge::sse`) is
//! parsed here and handed to the same axum router; the response is written
//! here, chunked, with `Connection: close`. Everything else, with the bytes
//! already read, goes to hyper unchanged (HTTP/2 and gRPC included). A stream asked for on a connection
//! that already carried another request is served by hyper as before.
//! Limits are the same: the connection was admitted and counted by the accept
//! loop, and its writes have the same deadline.

use axum::body::Body;
use futures_util::StreamExt;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tower::ServiceExt;

/// What the path of every SSE stream starts with.
const SSE_PATH: &[u8] = b"/api/v1/realtime";

/// The longest request head read here; a longer one goes to hyper, which
/// refuses it.
const MAX_HEAD: usize = 16 * 1024;

/// The headers of a request head parsed here, at most.
const MAX_HEADERS: usize = 64;

/// The HTTP/2 connection preface every HTTP/2 client opens with.
const HTTP2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// An HTTP/2 frame header's length; SETTINGS is frame type 4.
const FRAME_HEADER: usize = 9;
const SETTINGS: u8 = 4;

/// A connection after its opening was read.
pub enum Sniffed<T> {
    /// An SSE stream request, and the connection it came on.
    Sse(Box<http::Request<Body>>, T),
    /// A complete first request head, an HTTP/2 preface with its SETTINGS,
    /// or bytes that are neither (hyper answers those): the connection,
    /// with what was read of it.
    Other(Prefixed<T>),
    /// Closed, or its opening was not complete by the deadline (then it
    /// was told so and closed): it holds no slot any more.
    Gone,
}

/// Reads the opening of `io` until the deadline (from accept, the TLS
/// handshake included): a whole first request head, or an HTTP/2 preface
/// with its SETTINGS frame. A connection that sends less in time is closed,
/// a partial HTTP/1.1 head with `408`: silent or slow sockets must not hold
/// the slots the connection caps count (hyper would wait for a first byte
/// with no timer, and an HTTP/2 connection's handshake has none).
pub async fn sniff<T>(mut io: T, deadline: tokio::time::Instant) -> Sniffed<T>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let mut head = Vec::new();
    loop {
        match parse(&head) {
            Parse::Sse(request) => return Sniffed::Sse(request, io),
            Parse::Other => return Sniffed::Other(Prefixed::new(head, io)),
            Parse::Partial => {}
        }
        let mut chunk = [0u8; 1024];
        match tokio::time::timeout_at(deadline, io.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => head.extend_from_slice(&chunk[..n]),
            Ok(_) => return Sniffed::Gone,
            Err(_) => {
                if !head.is_empty() && !opens_http2(&head) {
                    let _ = io.write_all(request_timeout().as_bytes()).await;
                }
                let _ = io.shutdown().await;
                return Sniffed::Gone;
            }
        }
    }
}

/// The answer to an HTTP/1.1 head not complete by the deadline.
fn request_timeout() -> String {
    let body = r#"{"error":{"code":"invalid_argument","message":"the request header did not arrive within the header timeout"}}"#;
    format!(
        "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// Whether `head` agrees with the HTTP/2 preface as far as it goes.
fn opens_http2(head: &[u8]) -> bool {
    HTTP2_PREFACE.starts_with(&head[..head.len().min(HTTP2_PREFACE.len())])
}

enum Parse {
    Sse(Box<http::Request<Body>>),
    Other,
    Partial,
}

fn parse(head: &[u8]) -> Parse {
    if opens_http2(head) {
        return parse_http2(head);
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    let len = match parsed.parse(head) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if head.len() < MAX_HEAD => return Parse::Partial,
        // Too long, too many headers, not HTTP: hyper's answer.
        Ok(httparse::Status::Partial) | Err(_) => return Parse::Other,
    };
    let path = parsed.path.unwrap_or_default().as_bytes();
    let sse = parsed.method == Some("GET")
        && path.starts_with(SSE_PATH)
        && matches!(path.get(SSE_PATH.len()), None | Some(b'?' | b'/'))
        && parsed.version == Some(1)
        // Pipelined requests, and a GET that frames a body: hyper's, which
        // checks the framing as it does on every other path.
        && len == head.len()
        && !parsed.headers.iter().any(|header| {
            header.name.eq_ignore_ascii_case("content-length")
                || header.name.eq_ignore_ascii_case("transfer-encoding")
        });
    if !sse {
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

/// An HTTP/2 opening (`head` agrees with the preface so far): partial
/// until the preface and the whole first frame have come, which must be
/// SETTINGS (RFC 9113 §3.4); anything else goes to hyper to refuse.
fn parse_http2(head: &[u8]) -> Parse {
    let Some(frame) = head.get(HTTP2_PREFACE.len()..) else {
        return Parse::Partial;
    };
    if frame.len() < FRAME_HEADER {
        return Parse::Partial;
    }
    let length = u32::from_be_bytes([0, frame[0], frame[1], frame[2]]) as usize;
    if frame[3] != SETTINGS || frame.len() >= FRAME_HEADER + length || head.len() >= MAX_HEAD {
        return Parse::Other;
    }
    Parse::Partial
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
    // Read only to notice the client leaving. A GET sends nothing more, so
    // the probe is small (it lives in every idle stream's task); a client
    // that sends more anyway is read in large chunks from then on.
    let mut probe = [0u8; 16];
    let mut sink = Vec::new();
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
            read = io.read(if sink.is_empty() { &mut probe[..] } else { &mut sink[..] }) => match read {
                Ok(0) | Err(_) => return,
                Ok(_) if sink.is_empty() => sink = vec![0; 16 * 1024],
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
        assert_eq!(kind("POST /api/v1/publish HTTP/1.1\r\n"), "partial");
        assert_eq!(kind("POST /api/v1/publish HTTP/1.1\r\n\r\n{}"), "other");
        assert_eq!(
            kind("\u{16}\u{3}\u{1}"),
            "other",
            "not HTTP: hyper refuses it"
        );
        assert_eq!(kind("GET /api/v1/realtime HTTP/1.0\r\n\r\n"), "other");
        // A second request behind the first: hyper serves both.
        assert_eq!(
            kind("GET /api/v1/realtime HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\n\r\n"),
            "other"
        );
    }

    #[test]
    fn an_http2_opening_is_whole_with_its_settings_frame() {
        let preface = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
        assert_eq!(kind(&preface[..10]), "partial");
        assert_eq!(kind(preface), "partial", "the preface alone");
        let settings = |length: u8| format!("{preface}\0\0{}\u{4}\0\0\0\0\0", length as char);
        assert_eq!(kind(&settings(0)), "other", "an empty SETTINGS frame");
        assert_eq!(
            kind(&settings(6)),
            "partial",
            "SETTINGS without its payload"
        );
        assert_eq!(
            kind(&format!("{}\0\u{3}\0\0\0\u{64}", settings(6))),
            "other"
        );
        let ping = format!("{preface}\0\0\u{8}\u{6}\0\0\0\0\0");
        assert_eq!(kind(&ping), "other", "not SETTINGS first: hyper refuses it");
    }

    #[test]
    fn an_sse_get_that_frames_a_body_goes_to_hyper() {
        for framing in [
            "Content-Length: -1",
            "Content-Length: 0",
            "Transfer-Encoding: chunked, gzip",
        ] {
            let head = format!("GET /api/v1/realtime HTTP/1.1\r\nHost: x\r\n{framing}\r\n\r\n");
            assert_eq!(kind(&head), "other", "{framing}");
        }
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

    /// A reader that counts the reads made of it.
    struct CountingReads<T> {
        io: T,
        reads: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    }

    impl<T: AsyncRead + Unpin> AsyncRead for CountingReads<T> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            self.reads
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Pin::new(&mut self.io).poll_read(cx, buf)
        }
    }

    #[tokio::test]
    async fn bytes_a_client_sends_after_its_head_are_read_in_large_chunks() {
        let endless = || async {
            let stream = futures_util::stream::pending::<Result<bytes::Bytes, io::Error>>();
            axum::response::Response::new(Body::from_stream(stream))
        };
        let app = axum::Router::new().route("/api/v1/realtime", axum::routing::get(endless));
        let Parse::Sse(request) = parse(b"GET /api/v1/realtime HTTP/1.1\r\n\r\n") else {
            panic!("not taken")
        };
        let (mut client, server) = tokio::io::duplex(256 * 1024);
        let reads = std::sync::Arc::default();
        let (from_client, to_client) = tokio::io::split(server);
        let counted = CountingReads {
            io: from_client,
            reads: std::sync::Arc::clone(&reads),
        };
        let served = tokio::spawn(serve(app, request, tokio::io::join(counted, to_client)));
        // 1 MiB the client should not have sent, then it goes.
        client.write_all(&vec![b'x'; 1 << 20]).await.unwrap();
        client.shutdown().await.unwrap();
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.unwrap();
        served.await.unwrap();
        let reads = reads.load(std::sync::atomic::Ordering::Relaxed);
        // 16 bytes a read would take 65,536 reads.
        assert!(reads < 1_000, "{reads} reads for 1 MiB");
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
