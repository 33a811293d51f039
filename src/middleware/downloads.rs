//! The download cap: at most `max_concurrent_downloads` artifact bodies stream at once (each
//! HTTP/2 stream counts); beyond it a download is answered `503 overloaded` with
//! `Retry-After` at once, before any backend is asked. A download holds its slot from the
//! request until its body is dropped — finished, aborted by the send timeout, or its client
//! gone — and the `downloads_in_flight` gauge shows the slots taken. HEAD takes no slot: it
//! opens no stream.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;
use pin_project_lite::pin_project;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::{Layer, Service};

use crate::api::{Route, RouteTable};
use crate::body::Body;
use crate::error::ApiError;
use crate::telemetry::Gauged;
use crate::BoxError;

/// Gauge of the downloads streaming now.
pub const DOWNLOADS_IN_FLIGHT: &str = "downloads_in_flight";

/// Adds [`Downloads`] with room for `max` downloads at once.
#[derive(Clone)]
pub struct DownloadsLayer {
    slots: Arc<Semaphore>,
    routes: Arc<RouteTable>,
}

impl DownloadsLayer {
    pub fn new(max: usize) -> Self {
        // Shown from the start, so dashboards see a zero rather than nothing.
        metrics::gauge!(DOWNLOADS_IN_FLIGHT).increment(0.0);
        Self {
            slots: Arc::new(Semaphore::new(max.min(Semaphore::MAX_PERMITS))),
            routes: Arc::new(RouteTable::new()),
        }
    }
}

impl<S> Layer<S> for DownloadsLayer {
    type Service = Downloads<S>;

    fn layer(&self, inner: S) -> Downloads<S> {
        Downloads {
            inner,
            slots: self.slots.clone(),
            routes: self.routes.clone(),
        }
    }
}

/// See the module documentation.
#[derive(Clone)]
pub struct Downloads<S> {
    inner: S,
    /// One permit per download that may stream; shared by every clone.
    slots: Arc<Semaphore>,
    /// To tell downloads from other requests before the router runs.
    routes: Arc<RouteTable>,
}

impl<S, B> Service<Request<B>> for Downloads<S>
where
    S: Service<Request<B>, Response = Response<Body>>,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let download =
            req.method() == Method::GET && self.routes.is(req.uri().path(), Route::Download);
        if !download {
            return ResponseFuture::Passed {
                inner: self.inner.call(req),
            };
        }
        match self.slots.clone().try_acquire_owned() {
            Ok(permit) => ResponseFuture::Counted {
                inner: self.inner.call(req),
                slot: Some(Gauged::new(permit, DOWNLOADS_IN_FLIGHT)),
            },
            Err(_) => ResponseFuture::Refused {
                response: Some(
                    ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "overloaded",
                        "the service is at its limit of concurrent downloads; retry shortly",
                    )
                    .with_retry_after(1)
                    .into_response(),
                ),
            },
        }
    }
}

pin_project! {
    #[project = Projected]
    pub enum ResponseFuture<F> {
        /// Not a download.
        Passed { #[pin] inner: F },
        /// A download with its slot, handed to the body once the answer is a stream.
        Counted { #[pin] inner: F, slot: Option<Slot> },
        /// No slot free.
        Refused { response: Option<Response<Body>> },
    }
}

impl<F, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<Body>, E>>,
{
    type Output = Result<Response<Body>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            Projected::Passed { inner } => inner.poll(cx),
            Projected::Counted { inner, slot } => {
                let response = ready!(inner.poll(cx))?;
                // An error answer has no stream: its slot is free at once.
                let slot = slot.take().filter(|_| response.status().is_success());
                Poll::Ready(Ok(match slot {
                    Some(slot) => {
                        response.map(|inner| SlottedBody { inner, _slot: slot }.boxed_unsync())
                    }
                    None => response,
                }))
            }
            Projected::Refused { response } => Poll::Ready(Ok(response
                .take()
                .unwrap_or_else(|| ApiError::internal().into_response()))),
        }
    }
}

/// A taken download slot, counted in the gauge while it lives.
type Slot = Gauged<OwnedSemaphorePermit>;

pin_project! {
    /// A download body holding its slot until it is dropped.
    struct SlottedBody {
        #[pin]
        inner: Body,
        _slot: Slot,
    }
}

impl http_body::Body for SlottedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::body;
    use tower::ServiceExt;

    fn get(path: &str) -> Request<Body> {
        Request::get(path).body(body::empty()).unwrap()
    }

    async fn answer(req: Request<Body>) -> Result<Response<Body>, BoxError> {
        let status = if req.uri().path().ends_with("missing") {
            StatusCode::NOT_FOUND
        } else {
            StatusCode::OK
        };
        let mut response = Response::new(body::full("bytes"));
        *response.status_mut() = status;
        Ok(response)
    }

    #[tokio::test]
    async fn the_download_past_the_cap_is_refused_until_a_body_is_dropped() {
        let service = DownloadsLayer::new(1).layer(tower::service_fn(answer));
        let download = "/api/v1/extensions/provider/aws/1.0.0";
        // A failed download frees its slot at once.
        let missing = get("/api/v1/extensions/provider/aws/missing");
        let status = service.clone().oneshot(missing).await.unwrap().status();
        assert_eq!(status, StatusCode::NOT_FOUND);

        let streaming = service.clone().oneshot(get(download)).await.unwrap();
        assert_eq!(streaming.status(), StatusCode::OK);
        let refused = service.clone().oneshot(get(download)).await.unwrap();
        assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(refused.headers()["retry-after"], "1");
        let body = refused.into_body().collect().await.unwrap().to_bytes();
        assert!(String::from_utf8_lossy(&body).contains("\"overloaded\""));

        // Other routes and HEAD take no slot.
        for req in [
            get("/api/v1/extensions"),
            Request::head(download).body(body::empty()).unwrap(),
        ] {
            let status = service.clone().oneshot(req).await.unwrap().status();
            assert_eq!(status, StatusCode::OK);
        }

        drop(streaming);
        let again = service.clone().oneshot(get(download)).await.unwrap();
        assert_eq!(again.status(), StatusCode::OK);
    }
}
