//! Panic catcher: a panic while calling or polling the inner service becomes a 500 JSON
//! answer (logged with its message) instead of a dropped connection.

use std::any::Any;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::future::CatchUnwind;
use futures_util::FutureExt;
use http::Response;
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use crate::body::Body;
use crate::error::ApiError;

#[derive(Clone, Copy, Debug, Default)]
pub struct CatchPanicLayer;

impl<S> Layer<S> for CatchPanicLayer {
    type Service = CatchPanic<S>;

    fn layer(&self, inner: S) -> CatchPanic<S> {
        CatchPanic { inner }
    }
}

/// See the module documentation.
#[derive(Clone, Debug)]
pub struct CatchPanic<S> {
    inner: S,
}

fn panic_response(panic: Box<dyn Any + Send>) -> Response<Body> {
    let detail = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_default();
    tracing::error!(%detail, "handler panicked");
    ApiError::internal().into_response()
}

impl<S, R> Service<R> for CatchPanic<S>
where
    S: Service<R, Response = Response<Body>>,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: R) -> Self::Future {
        match catch_unwind(AssertUnwindSafe(|| self.inner.call(req))) {
            Ok(future) => ResponseFuture {
                inner: Some(AssertUnwindSafe(future).catch_unwind()),
                panicked: None,
            },
            Err(panic) => ResponseFuture {
                inner: None,
                panicked: Some(panic),
            },
        }
    }
}

pin_project! {
    pub struct ResponseFuture<F> {
        #[pin]
        inner: Option<CatchUnwind<AssertUnwindSafe<F>>>,
        panicked: Option<Box<dyn Any + Send>>,
    }
}

impl<F, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<Body>, E>>,
{
    type Output = Result<Response<Body>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Some(panic) = this.panicked.take() {
            return Poll::Ready(Ok(panic_response(panic)));
        }
        let Some(inner) = this.inner.as_pin_mut() else {
            return Poll::Ready(Ok(ApiError::internal().into_response()));
        };
        inner.poll(cx).map(|result| match result {
            Ok(response) => response,
            Err(panic) => Ok(panic_response(panic)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BoxError;
    use tower::ServiceExt;

    #[tokio::test]
    async fn a_panic_becomes_a_500() {
        let panicking = tower::service_fn(|_: ()| async {
            if true {
                panic!("handler bug");
            }
            Ok::<Response<Body>, BoxError>(Response::new(crate::body::empty()))
        });
        let response = CatchPanicLayer.layer(panicking).oneshot(()).await.unwrap();
        assert_eq!(response.status(), http::StatusCode::INTERNAL_SERVER_ERROR);
    }
}
