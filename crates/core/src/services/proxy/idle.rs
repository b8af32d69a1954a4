//! Idle timeouts for proxied connections: [`watch`] wraps a guest's stream so that every
//! byte read from it or written to it marks it active, and [`Watch::idle`] completes once
//! it has carried nothing either way for a given time. A relay or a connection races its
//! work against that (`--proxy-idle-timeout`), so that a guest that opens connections and
//! leaves them silent cannot keep them, and their tasks and descriptors, for ever.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// When the stream last carried a byte, in milliseconds since `base`, and which way.
#[derive(Clone)]
pub struct Watch {
    base: Instant,
    last: Arc<AtomicU64>,
    /// The last byte was written to the guest (an answer), not read from it.
    answered: Arc<AtomicBool>,
}

impl Watch {
    fn touch(&self, written: bool) {
        self.last.store(self.base.elapsed().as_millis() as u64, Ordering::Relaxed);
        self.answered.store(written, Ordering::Relaxed);
    }

    /// True when the last byte went to the guest: on an HTTP connection, the guest has
    /// sent nothing since its last answer (a quiet kept-alive connection, not a request
    /// cut short).
    pub fn answered_last(&self) -> bool {
        self.answered.load(Ordering::Relaxed)
    }

    /// Completes once the stream has carried nothing for `limit`.
    pub async fn idle(&self, limit: Duration) {
        loop {
            let last = self.base + Duration::from_millis(self.last.load(Ordering::Relaxed));
            // A limit too long to add to a time (no flag allows one) never comes.
            let Some(due) = last.checked_add(limit) else { return std::future::pending().await };
            if Instant::now() >= due {
                return;
            }
            tokio::time::sleep_until(due).await;
        }
    }
}

/// A stream whose traffic a [`Watch`] follows.
pub struct Activity<T> {
    inner: T,
    watch: Watch,
}

/// Wraps `inner`; the watch says when it last carried a byte (from now on).
pub fn watch<T>(inner: T) -> (Activity<T>, Watch) {
    let watch =
        Watch { base: Instant::now(), last: Arc::new(AtomicU64::new(0)), answered: Arc::new(AtomicBool::new(false)) };
    (Activity { inner, watch: watch.clone() }, watch)
}

impl<T: AsyncRead + Unpin> AsyncRead for Activity<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.watch.touch(false);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Activity<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.watch.touch(true);
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn idle_counts_from_the_last_byte_either_way() {
        let (a, mut b) = tokio::io::duplex(64);
        let (mut a, w) = watch(a);
        let start = Instant::now();
        tokio::time::sleep(Duration::from_secs(3)).await;
        a.write_all(b"x").await.unwrap();
        assert!(w.answered_last());
        let mut one = [0u8; 1];
        b.read_exact(&mut one).await.unwrap();
        tokio::time::sleep(Duration::from_secs(3)).await;
        b.write_all(b"y").await.unwrap();
        a.read_exact(&mut one).await.unwrap();
        assert!(!w.answered_last());
        w.idle(Duration::from_secs(5)).await;
        // The last byte came at 6 s: idle at 11 s.
        assert_eq!(start.elapsed().as_secs(), 11);
    }
}
