//! Accepting HTTP connections: what axum's `serve` does, plus the limits a
//! public server needs before any request is read.
//!
//! - A cap on connections in total and per client IP address. A connection
//!   over a cap gets one plain HTTP answer (503 for the total, 429 per
//!   address) with a JSON error, and is closed.
//! - One deadline from accept to a whole first request head, or to an
//!   HTTP/2 preface and its SETTINGS (a TLS handshake included): a client
//!   that opens a connection and sends nothing, or never finishes, is
//!   disconnected and frees its slot. Later requests' heads have hyper's
//!   header timeout.
//! - The cap in total never exceeds what the open-file limit allows: past
//!   that limit `accept` would fail for everyone, instead of one clear 503
//!   for the connection too many.
//!
//! Shutdown stops accepting, asks every connection to finish its requests
//! (HTTP/2 `GOAWAY`, HTTP/1.1 close after the response) and waits for them.

use crate::sse_front::{self, Sniffed};
use axum::body::Body;
use axum::serve::Listener;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

/// Connection limits, checked when a connection is accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Open connections in total.
    pub total: usize,
    /// Open connections from one IP address.
    pub per_ip: usize,
    /// The longest a client may take to send a request's header.
    pub header_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            total: 15_000,
            per_ip: 1_000,
            header_timeout: Duration::from_secs(10),
        }
    }
}

/// Files kept back from the connection cap for everything else a node
/// opens (NATS, the history store, logs).
const SPARE_FILES: usize = 256;

/// Raises the process's soft open-file limit to its hard limit, and returns
/// `total` lowered, if need be, to the connections that limit leaves room
/// for.
pub fn fit_to_open_file_limit(total: usize) -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: both calls only read or write the `rlimit` they are given.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return total;
        }
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            ..limit
        };
        if limit.rlim_cur < limit.rlim_max && libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
            limit = raised;
        }
    }
    let files = usize::try_from(limit.rlim_cur).unwrap_or(usize::MAX);
    total.min(files.saturating_sub(SPARE_FILES))
}

/// Open connections, in total and by address.
struct Census {
    limits: ConnectionLimits,
    open: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

/// One admitted connection; counted until dropped.
struct Admitted {
    census: Arc<Census>,
    ip: IpAddr,
}

/// A connection's socket with its admission, so that it is counted for as
/// long as the socket lives, through a WebSocket upgrade too.
struct Counted<T> {
    io: T,
    _admitted: Admitted,
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bytes: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, bytes)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut open = self.census.open.lock().expect("census lock");
        open.0 -= 1;
        if let Some(count) = open.1.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                open.1.remove(&self.ip);
            }
        }
    }
}

impl Census {
    /// Counts a connection from `ip` in, or says why it is refused: the
    /// HTTP status and message.
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Admitted, (u16, String)> {
        let mut open = self.open.lock().expect("census lock");
        if open.0 >= self.limits.total {
            let total = self.limits.total;
            return Err((
                503,
                format!("the server is at its limit of {total} connections; retry later"),
            ));
        }
        let from_ip = open.1.entry(ip).or_default();
        if *from_ip >= self.limits.per_ip {
            let per_ip = self.limits.per_ip;
            return Err((
                429,
                format!("too many connections from {ip} (at most {per_ip}); close some first"),
            ));
        }
        *from_ip += 1;
        open.0 += 1;
        Ok(Admitted {
            census: Arc::clone(self),
            ip,
        })
    }
}

/// Serves `app` on `listener` (over TLS, with `tls`) until `shutdown`
/// completes, then waits up to `drain_timeout` for open connections to
/// finish; returns when that drain time ends, for the caller's own waits.
pub async fn serve<L>(
    mut listener: L,
    app: axum::Router,
    limits: ConnectionLimits,
    tls: Option<TlsAcceptor>,
    drain_timeout: Duration,
    shutdown: impl Future<Output = ()>,
) -> tokio::time::Instant
where
    L: Listener<Addr = SocketAddr>,
    L::Io: Unpin,
{
    let census = Arc::new(Census {
        limits,
        open: Mutex::new((0, HashMap::new())),
    });
    let (stop, stopping) = watch::channel(());
    let connections = TaskTracker::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (io, peer) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let admitted = match census.admit(peer.ip()) {
            Ok(admitted) => admitted,
            Err((status, message)) => {
                connections.spawn(refuse(io, status, message));
                continue;
            }
        };
        let app = app.clone();
        let header_timeout = census.limits.header_timeout;
        // One deadline from accept to a whole first request head (or an
        // HTTP/2 preface with its SETTINGS), a TLS handshake included.
        let opened_by = tokio::time::Instant::now() + header_timeout;
        let stopping = stopping.clone();
        let io = Counted {
            io,
            _admitted: admitted,
        };
        let tls = tls.clone();
        connections.spawn(async move {
            match tls {
                None => serve_connection(io, app, header_timeout, opened_by, stopping).await,
                // Boxed: a TLS connection's state is large, and inline it
                // would size every plain connection's task (an idle SSE
                // stream lives in this task for hours).
                Some(tls) => {
                    let serve = serve_tls(tls, io, peer, app, header_timeout, opened_by, stopping);
                    Box::pin(serve).await;
                }
            }
        });
    }
    // New connections are refused from now on, not left waiting.
    drop(listener);
    let deadline = tokio::time::Instant::now() + drain_timeout;
    drop(stop);
    connections.close();
    if tokio::time::timeout_at(deadline, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            open = connections.len(),
            "drain: connections still open after {drain_timeout:?} are cut"
        );
    }
    deadline
}

/// Serves one connection over TLS, once its handshake (which shares the
/// opening's deadline) is done.
async fn serve_tls<T>(
    tls: TlsAcceptor,
    io: T,
    peer: SocketAddr,
    app: axum::Router,
    header_timeout: Duration,
    opened_by: tokio::time::Instant,
    stopping: watch::Receiver<()>,
) where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    match tokio::time::timeout_at(opened_by, tls.accept(io)).await {
        Ok(Ok(io)) => serve_connection(io, app, header_timeout, opened_by, stopping).await,
        Ok(Err(error)) => tracing::debug!(%peer, "TLS handshake failed: {error}"),
        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
    }
}

/// Serves one connection whose opening must arrive by `opened_by`: an SSE
/// stream here, anything else with hyper (whose header timeout bounds the
/// heads of later requests), until it ends or, once `stopping` changes,
/// gracefully.
async fn serve_connection<T>(
    io: T,
    app: axum::Router,
    header_timeout: Duration,
    opened_by: tokio::time::Instant,
    mut stopping: watch::Receiver<()>,
) where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = match sse_front::sniff(io, opened_by).await {
        Sniffed::Sse(request, io) => return sse_front::serve(app, request, io).await,
        Sniffed::Other(io) => io,
        Sniffed::Gone => return,
    };
    let service = TowerToHyperService::new(
        app.map_request(|request: axum::extract::Request<Incoming>| request.map(Body::new)),
    );
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    // The CONNECT protocol carries WebSockets over HTTP/2.
    builder.http2().enable_connect_protocol();
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    let mut connection = std::pin::pin!(connection);
    tokio::select! {
        _ = connection.as_mut() => return,
        _ = stopping.changed() => {}
    }
    connection.as_mut().graceful_shutdown();
    let _ = connection.await;
}

/// Answers a refused connection once, plainly, and closes it (reading what
/// the client sent meanwhile, briefly, so the answer is not lost to a reset).
async fn refuse(mut io: impl AsyncRead + AsyncWrite + Unpin, status: u16, message: String) {
    let code = if status == 429 {
        "resource_exhausted"
    } else {
        "unavailable"
    };
    let reason = if status == 429 {
        "Too Many Requests"
    } else {
        "Service Unavailable"
    };
    let body = serde_json::json!({"error": {"code": code, "message": message}}).to_string();
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = io.write_all(response.as_bytes()).await;
    let _ = io.shutdown().await;
    let mut sink = [0; 4096];
    let drain = async { while matches!(io.read(&mut sink).await, Ok(n) if n > 0) {} };
    let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connection_cap_fits_under_the_raised_open_file_limit() {
        let fitted = fit_to_open_file_limit(usize::MAX);
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: only writes `limit`.
        assert_eq!(
            unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
            0
        );
        assert_eq!(limit.rlim_cur, limit.rlim_max, "the soft limit was raised");
        let files = usize::try_from(limit.rlim_cur).unwrap_or(usize::MAX);
        assert_eq!(fitted, files.saturating_sub(SPARE_FILES));
        assert_eq!(
            fit_to_open_file_limit(10),
            10,
            "a cap below the limit stays"
        );
    }
}
