//! A deadline on every socket write, for every transport at once.
//!
//! A client that stops reading fills its TCP window, and from then on a
//! write to its socket never completes. Whatever task writes for that
//! client (a WebSocket session, hyper serving an SSE body or a gRPC stream)
//! would wait forever, holding the socket and everything queued for it.
//! [`WriteDeadline`] wraps the listener so that each accepted socket fails a
//! write, flush or shutdown that has made no progress for the deadline with
//! `TimedOut`. The writer sees an ordinary I/O error and closes the
//! connection; nothing else needs to know.
//!
//! The clock only runs while a write is blocked: a write that completes (even
//! partly) disarms it, so a slow but moving client is never cut off by it.

use crate::metrics::{Eviction, METRICS};
use axum::serve::Listener;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// A listener whose connections time out blocked writes after `timeout`.
pub struct WriteDeadline<L> {
    inner: L,
    timeout: Duration,
}

impl<L> WriteDeadline<L> {
    pub fn new(inner: L, timeout: Duration) -> Self {
        WriteDeadline { inner, timeout }
    }
}

impl<L: Listener> Listener for WriteDeadline<L> {
    type Io = DeadlineIo<L::Io>;
    type Addr = L::Addr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (io, addr) = self.inner.accept().await;
        (DeadlineIo::new(io, self.timeout), addr)
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// A socket whose writes fail once blocked for longer than the deadline.
pub struct DeadlineIo<T> {
    io: T,
    timeout: Duration,
    /// Allocated the first time a write blocks; idle connections stay small.
    timer: Option<Pin<Box<Sleep>>>,
    /// Whether `timer` measures the current blocked write.
    armed: bool,
    /// Whether a write has timed out already (counted once per socket).
    missed: bool,
}

impl<T> DeadlineIo<T> {
    pub fn new(io: T, timeout: Duration) -> Self {
        DeadlineIo {
            io,
            timeout,
            timer: None,
            armed: false,
            missed: false,
        }
    }

    /// Passes a ready result through (disarming the clock); on `Pending`,
    /// runs the clock and fails with `TimedOut` once it has run out.
    fn watch<R>(&mut self, cx: &mut Context<'_>, poll: Poll<io::Result<R>>) -> Poll<io::Result<R>> {
        if poll.is_ready() {
            self.armed = false;
            return poll;
        }
        let deadline = Instant::now() + self.timeout;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if !self.armed {
            timer.as_mut().reset(deadline);
            self.armed = true;
        }
        ready!(timer.as_mut().poll(cx));
        self.armed = false;
        if !std::mem::replace(&mut self.missed, true) {
            METRICS.evicted(Eviction::WriteTimeout);
        }
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "the client read nothing for {} ms: write deadline missed",
                self.timeout.as_millis()
            ),
        )))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for DeadlineIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for DeadlineIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.io).poll_write(cx, buf);
        self.watch(cx, poll)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.watch(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.io).poll_flush(cx);
        self.watch(cx, poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.io).poll_shutdown(cx);
        self.watch(cx, poll)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// A duplex pipe whose reader never reads: writes block once its buffer
    /// is full, and the deadline turns that into `TimedOut`.
    #[tokio::test(start_paused = true)]
    async fn a_blocked_write_times_out() {
        let (client, _unread) = tokio::io::duplex(64);
        let mut io = DeadlineIo::new(client, Duration::from_secs(5));
        io.write_all(&[0; 64]).await.expect("fits the buffer");
        let error = io.write_all(&[0; 64]).await.expect_err("blocked");
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
    }

    /// A reader that drains slowly but steadily keeps the writer going: the
    /// clock restarts whenever a write makes progress.
    #[tokio::test(start_paused = true)]
    async fn a_slow_reader_is_not_cut_off() {
        use tokio::io::AsyncReadExt;
        let (client, mut server) = tokio::io::duplex(64);
        let reader = tokio::spawn(async move {
            let mut buf = [0; 16];
            let mut total = 0;
            while total < 1024 {
                tokio::time::sleep(Duration::from_secs(3)).await;
                total += server.read(&mut buf).await.unwrap();
            }
            total
        });
        let mut io = DeadlineIo::new(client, Duration::from_secs(5));
        io.write_all(&[1; 1024]).await.expect("progress every 3 s");
        assert_eq!(reader.await.unwrap(), 1024);
    }
}
