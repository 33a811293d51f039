//! Error rescue: below this layer services fail with `BoxError`; above it the service is
//! `Infallible` and every failure is a JSON error response. This is what makes the service
//! handed to hyper infallible.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use http::{Response, StatusCode};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use crate::body::Body;
use crate::error::{ApiError, Overload};
use crate::middleware::load_shed::ClientBusy;
use crate::middleware::rate_limit::RATE_LIMITED_TOTAL;
use crate::BoxError;

/// Turns an error from the inner stack into its JSON response.
pub fn error_response(error: BoxError) -> Response<Body> {
    if error.is::<tower::timeout::error::Elapsed>() {
        ApiError::timeout().into_response()
    } else if error.is::<tower::load_shed::error::Overloaded>() {
        ApiError::overloaded(Overload::Requests).into_response()
    } else if let Some(busy) = error.downcast_ref::<ClientBusy>() {
        metrics::counter!(RATE_LIMITED_TOTAL).increment(1);
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!("{busy}; retry when one has been answered"),
        )
        .with_retry_after(1)
        .into_response()
    } else {
        tracing::error!(%error, "request failed");
        ApiError::internal().into_response()
    }
}

#[derive(Clone, Copy, Debug, Default)]
pub struct RescueLayer;

impl<S> Layer<S> for RescueLayer {
    type Service = Rescue<S>;

    fn layer(&self, inner: S) -> Rescue<S> {
        Rescue {
            inner,
            not_ready: None,
        }
    }
}

/// See the module documentation.
#[derive(Debug)]
pub struct Rescue<S> {
    inner: S,
    /// A readiness error, answered as the response of the next call.
    not_ready: Option<BoxError>,
}

impl<S: Clone> Clone for Rescue<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            not_ready: None,
        }
    }
}

impl<S, R> Service<R> for Rescue<S>
where
    S: Service<R, Response = Response<Body>>,
    S::Error: Into<BoxError>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // A readiness error cannot be returned from an infallible service, so the next call
        // answers it instead of reaching the inner service.
        if let Err(e) = ready!(self.inner.poll_ready(cx)) {
            self.not_ready = Some(e.into());
        }
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: R) -> Self::Future {
        match self.not_ready.take() {
            Some(error) => ResponseFuture::Early {
                response: Some(error_response(error)),
            },
            None => ResponseFuture::Called {
                inner: self.inner.call(req),
            },
        }
    }
}

pin_project! {
    /// An enum rather than a struct with both: every layer above moves this future whole, so
    /// the early answer (a response, 120 bytes) shares its room with the inner future.
    #[project = Projected]
    pub enum ResponseFuture<F> {
        Called { #[pin] inner: F },
        /// Answered at the call; taken at the first poll.
        Early { response: Option<Response<Body>> },
    }
}

impl<F, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<Body>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Response<Body>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            Projected::Called { inner } => Poll::Ready(Ok(match ready!(inner.poll(cx)) {
                Ok(response) => response,
                Err(error) => error_response(error.into()),
            })),
            // Polled again after its answer: a fault of the caller's, answered as one.
            Projected::Early { response } => Poll::Ready(Ok(response
                .take()
                .unwrap_or_else(|| ApiError::internal().into_response()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    /// The layers above move this future whole on every request: the early answer takes no
    /// room beside an inner future at least as big as a response.
    #[test]
    fn the_early_answer_shares_the_inner_futures_room() {
        type Inner = std::future::Ready<Result<Response<Body>, BoxError>>;
        assert!(
            size_of::<ResponseFuture<Inner>>() <= size_of::<Inner>() + size_of::<usize>(),
            "{} bytes around {}",
            size_of::<ResponseFuture<Inner>>(),
            size_of::<Inner>()
        );
    }

    #[tokio::test]
    async fn errors_become_json_responses() {
        let failing = tower::service_fn(|_: ()| async {
            Err::<Response<Body>, BoxError>(Box::new(tower::timeout::error::Elapsed::new()))
        });
        let response = RescueLayer.layer(failing).oneshot(()).await.unwrap();
        assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);

        let failing =
            tower::service_fn(|_: ()| async { Err::<Response<Body>, BoxError>("boom".into()) });
        let response = RescueLayer.layer(failing).oneshot(()).await.unwrap();
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);

        let busy = error_response(Box::new(ClientBusy(128)));
        assert_eq!(busy.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(busy.headers()["retry-after"], "1");
    }
}
