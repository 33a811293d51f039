//! The request timeout: the time to the response head is bounded, and past it the request
//! fails with tower's `Elapsed`, which the rescue layer answers with 504.
//!
//! tower's own timeout makes its timer as the request comes in: a clock read and a timer
//! entry (with its runtime handle) on every request, about 180 instructions, while a cached
//! answer is ready at its first poll and never needs one. This one makes the timer only when
//! the request first waits, so the bound counts from its first poll. Over HTTP/1 that is the
//! poll in which the request reached the layer; over HTTP/2 it is the first run of the
//! stream's task, so time a stream waits for a worker before it first runs is not counted
//! (tower's counted it from the call, made on the connection's task).
//!
//! The timer is boxed: a request that waits is already on a slow path (a backend call, a wait
//! for another request's fetch, a body still arriving), and a future that does not wait stays
//! small. Every layer above moves this future whole when it wraps it, so an inline timer (120
//! bytes) would be copied a dozen times on every request.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower::timeout::error::Elapsed;
use tower::{Layer, Service};

use crate::BoxError;

/// Bounds each request's time to its response head by `timeout`.
#[derive(Clone, Copy, Debug)]
pub struct TimeoutLayer {
    timeout: Duration,
}

impl TimeoutLayer {
    pub fn new(timeout: Duration) -> Self {
        Self { timeout }
    }
}

impl<S> Layer<S> for TimeoutLayer {
    type Service = Timeout<S>;

    fn layer(&self, inner: S) -> Timeout<S> {
        Timeout {
            inner,
            timeout: self.timeout,
        }
    }
}

/// See the module documentation.
#[derive(Clone, Debug)]
pub struct Timeout<S> {
    inner: S,
    timeout: Duration,
}

impl<S, R> Service<R> for Timeout<S>
where
    S: Service<R>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: R) -> Self::Future {
        ResponseFuture {
            inner: self.inner.call(req),
            sleep: None,
            timeout: self.timeout,
        }
    }
}

pin_project! {
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        // Made at the first poll that finds the request waiting.
        sleep: Option<Pin<Box<Sleep>>>,
        timeout: Duration,
    }
}

impl<F, T, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(result) = this.inner.poll(cx) {
            return Poll::Ready(result.map_err(Into::into));
        }
        let timeout = *this.timeout;
        let sleep = this
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(Elapsed::new().into())),
            Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use tokio::time::Instant;
    use tower::{service_fn, ServiceExt};

    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(30);

    /// The layers above move this future whole on every request: the timer it may make takes
    /// a pointer's room until then.
    #[test]
    fn the_timer_takes_a_pointers_room() {
        type Inner = std::future::Ready<Result<u64, Infallible>>;
        let around = size_of::<ResponseFuture<Inner>>() - size_of::<Inner>();
        assert!(
            around <= size_of::<usize>() + size_of::<Duration>(),
            "{around} bytes"
        );
    }

    /// A service answering after `wait`.
    fn answers_after(
        wait: Duration,
    ) -> Timeout<impl Service<(), Response = (), Error = Infallible>> {
        TimeoutLayer::new(TIMEOUT).layer(service_fn(move |()| async move {
            tokio::time::sleep(wait).await;
            Ok::<_, Infallible>(())
        }))
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_ready_at_once_or_in_time_passes() {
        assert!(answers_after(Duration::ZERO).oneshot(()).await.is_ok());
        let start = Instant::now();
        assert!(answers_after(TIMEOUT - Duration::from_millis(1))
            .oneshot(())
            .await
            .is_ok());
        assert_eq!(start.elapsed(), TIMEOUT - Duration::from_millis(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_still_waiting_at_the_timeout_fails_with_elapsed() {
        let start = Instant::now();
        let error = answers_after(Duration::from_secs(3600))
            .oneshot(())
            .await
            .unwrap_err();
        assert!(error.is::<Elapsed>(), "{error}");
        assert_eq!(start.elapsed(), TIMEOUT);
    }

    #[tokio::test(start_paused = true)]
    async fn the_timeout_counts_from_the_first_wait() {
        // A future made and first polled later: the bound starts at that poll.
        let mut timeout = answers_after(Duration::from_secs(3600));
        let future = timeout.call(());
        tokio::time::advance(Duration::from_secs(10)).await;
        let start = Instant::now();
        assert!(future.await.unwrap_err().is::<Elapsed>());
        assert_eq!(start.elapsed(), TIMEOUT);
    }
}
