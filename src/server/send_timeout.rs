//! The send timeout: a response body that has handed bytes to hyper and is not asked for
//! more for `send_timeout` is aborted, with its backend stream.
//!
//! hyper polls a body only when it can send: while an HTTP/1 client does not read (the socket
//! and hyper's buffer full) or an HTTP/2 stream's window stays shut, the body is not polled,
//! so it cannot time itself out. The task that drives it can: the body notes in a task-local
//! that it handed a frame over and that it was asked again ([`handed_over`], [`asked`]), and
//! [`SendTimeout`], wrapping that task's future, reads the clock when a poll leaves a frame
//! handed over and not yet taken, sleeps until then plus the timeout, and then drops the
//! future. For HTTP/1 that task is the connection (one response at
//! a time), so the connection is closed; for HTTP/2 it is the stream's task, spawned by
//! [`Executor`], so only that stream is reset and the connection's other streams go on.
//! Dropping the body drops the backend's response, which releases its connection or file.
//!
//! A body waiting on its backend is being asked, so a slow backend is not a stall: the
//! backend's own read timeout bounds that.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

/// Counter of downloads aborted because the client took no bytes for the send timeout.
pub const DOWNLOAD_STALLED_TOTAL: &str = "download_stalled_total";

/// Since when the body of the task's current response has waited for the client, and
/// whether it is a download. The time is read when the task next has nothing to do (`None`
/// until then): a response sent whole within one poll, as most are, reads no clock.
type Handed = Option<(Option<Instant>, bool)>;

tokio::task_local! {
    static HANDED: Cell<Handed>;
}

/// The body handed a frame to hyper; `download` says how a stall is counted.
pub fn handed_over(download: bool) {
    let _ = HANDED.try_with(|h| h.set(Some((None, download))));
}

/// The body is asked for its next frame, or is gone: nothing waits on the client.
pub fn asked() {
    let _ = HANDED.try_with(|h| h.set(None));
}

pin_project! {
    /// Runs `inner` and drops it when a response body it drives has waited on the client for
    /// longer than the timeout; then completes with `None`.
    pub struct SendTimeout<F> {
        #[pin]
        inner: F,
        #[pin]
        sleep: Sleep,
        timeout: Duration,
        handed: Handed,
    }
}

impl<F> SendTimeout<F> {
    pub fn new(inner: F, timeout: Duration) -> Self {
        Self {
            inner,
            sleep: tokio::time::sleep(timeout),
            timeout,
            handed: None,
        }
    }

    /// The future it runs.
    pub fn inner(self: Pin<&mut Self>) -> Pin<&mut F> {
        self.project().inner
    }
}

impl<F: Future> Future for SendTimeout<F> {
    type Output = Option<F::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let inner = this.inner.as_mut();
        let (polled, handed) = HANDED.sync_scope(Cell::new(*this.handed), || {
            let polled = inner.poll(cx);
            (polled, HANDED.with(Cell::get))
        });
        if let Poll::Ready(output) = polled {
            return Poll::Ready(Some(output));
        }
        let Some((since, download)) = handed else {
            *this.handed = None;
            return Poll::Pending;
        };
        let since = since.unwrap_or_else(Instant::now);
        *this.handed = Some((Some(since), download));
        let deadline = since + *this.timeout;
        if this.sleep.deadline() != deadline {
            this.sleep.as_mut().reset(deadline);
        }
        ready!(this.sleep.poll(cx));
        tracing::warn!(
            send_timeout_seconds = this.timeout.as_secs(),
            download,
            "response aborted: the client took no bytes for the send timeout"
        );
        if download {
            metrics::counter!(DOWNLOAD_STALLED_TOTAL).increment(1);
        }
        Poll::Ready(None)
    }
}

/// Spawns hyper's HTTP/2 stream tasks under the send timeout.
#[derive(Clone, Copy, Debug)]
pub struct Executor {
    pub send_timeout: Duration,
}

impl<F> hyper::rt::Executor<F> for Executor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, future: F) {
        tokio::spawn(SendTimeout::new(future, self.send_timeout));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A task that hands a frame over on its first poll and then waits for ever, as a body
    /// does when the client stops reading.
    fn stalls_after_one_frame() -> impl Future<Output = ()> {
        let mut first = true;
        std::future::poll_fn(move |_| {
            if std::mem::take(&mut first) {
                handed_over(true);
            }
            Poll::Pending
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_not_asked_again_is_dropped_after_the_timeout() {
        let start = Instant::now();
        let timeout = Duration::from_secs(60);
        let cut = SendTimeout::new(stalls_after_one_frame(), timeout).await;
        assert!(cut.is_none());
        assert_eq!(start.elapsed(), timeout);
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_waiting_on_its_backend_is_not_cut() {
        let waits_on_backend = async {
            handed_over(false);
            asked();
            tokio::time::sleep(Duration::from_secs(3600)).await;
            "done"
        };
        let out = SendTimeout::new(waits_on_backend, Duration::from_secs(60)).await;
        assert_eq!(out, Some("done"));
    }

    #[tokio::test(start_paused = true)]
    async fn each_frame_taken_restarts_the_timeout() {
        let start = Instant::now();
        let steady = async {
            for _ in 0..10 {
                handed_over(true);
                tokio::time::sleep(Duration::from_secs(50)).await;
                asked();
            }
        };
        let out = SendTimeout::new(steady, Duration::from_secs(60)).await;
        assert_eq!(out, Some(()));
        assert_eq!(start.elapsed(), Duration::from_secs(500));
    }
}
