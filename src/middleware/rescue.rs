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
            Some(error) => ResponseFuture {
                inner: None,
                early: Some(error_response(error)),
            },
            None => ResponseFuture {
                inner: Some(self.inner.call(req)),
                early: None,
            },
        }
    }
}

pin_project! {
    pub struct ResponseFuture<F> {
        #[pin]
        inner: Option<F>,
        early: Option<Response<Body>>,
    }
}

impl<F, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<Body>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Response<Body>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Some(response) = this.early.take() {
            return Poll::Ready(Ok(response));
        }
        let Some(inner) = this.inner.as_pin_mut() else {
            return Poll::Ready(Ok(ApiError::internal().into_response()));
        };
        Poll::Ready(Ok(match ready!(inner.poll(cx)) {
            Ok(response) => response,
            Err(error) => error_response(error.into()),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

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
