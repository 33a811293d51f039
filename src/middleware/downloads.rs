//! The download cap: at most `max_concurrent_downloads` artifact bodies stream at once (each
//! HTTP/2 stream counts), and, with rate limiting on, at most `max_downloads_per_client` of
//! them one client's (told apart as the rate limit tells them, [`Clients`]; counted in
//! `rate_limited_total` too). Beyond the first a download is answered `503 overloaded`,
//! beyond the second `429 rate_limited`, both with `Retry-After` at once,
//! before any backend is asked: one client cannot hold every slot, with HTTP/2 streams whose
//! windows it keeps shut until the send timeout, say. A download holds its slots from the
//! request until its body is dropped — finished, aborted by the send timeout, or its client
//! gone — and the `downloads_in_flight` gauge shows the slots taken. HEAD takes no slot: it
//! opens no stream. The per-client counts have an entry only while their client has a
//! download streaming, so at most `max_concurrent_downloads` of them.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
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
use crate::error::{ApiError, Overload};
use crate::middleware::rate_limit::{Clients, RATE_LIMITED_TOTAL};
use crate::middleware::KeyHasher;
use crate::telemetry::Gauged;
use crate::BoxError;

/// Gauge of the downloads streaming now.
pub const DOWNLOADS_IN_FLIGHT: &str = "downloads_in_flight";

/// Adds [`Downloads`] with room for `max` downloads at once.
#[derive(Clone)]
pub struct DownloadsLayer {
    slots: Arc<Semaphore>,
    per_client: Option<Arc<PerClient>>,
    routes: Arc<RouteTable>,
}

impl DownloadsLayer {
    pub fn new(max: usize) -> Self {
        // Shown from the start, so dashboards see a zero rather than nothing.
        metrics::gauge!(DOWNLOADS_IN_FLIGHT).increment(0.0);
        Self {
            slots: Arc::new(Semaphore::new(max.min(Semaphore::MAX_PERMITS))),
            per_client: None,
            routes: Arc::new(RouteTable::new()),
        }
    }

    /// At most `max` of the downloads one client's, clients told apart by `clients`.
    pub fn per_client(self, max: usize, clients: Arc<Clients>) -> Self {
        Self {
            per_client: Some(Arc::new(PerClient {
                clients,
                max,
                streaming: Mutex::default(),
            })),
            ..self
        }
    }
}

impl<S> Layer<S> for DownloadsLayer {
    type Service = Downloads<S>;

    fn layer(&self, inner: S) -> Downloads<S> {
        Downloads {
            inner,
            slots: self.slots.clone(),
            per_client: self.per_client.clone(),
            routes: self.routes.clone(),
        }
    }
}

/// The downloads each client has streaming.
struct PerClient {
    clients: Arc<Clients>,
    max: usize,
    /// An entry for each client with a download streaming, removed with its last one.
    streaming: Mutex<HashMap<IpAddr, usize, KeyHasher>>,
}

impl PerClient {
    /// A slot of `client`'s, unless it has `max` downloads streaming.
    fn take(self: &Arc<Self>, client: IpAddr) -> Option<ClientSlot> {
        let mut streaming = self
            .streaming
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let taken = streaming.entry(client).or_insert(0);
        if *taken >= self.max {
            return None;
        }
        *taken += 1;
        Some(ClientSlot {
            per_client: self.clone(),
            client,
        })
    }
}

/// One of a client's download slots, given back when dropped.
struct ClientSlot {
    per_client: Arc<PerClient>,
    client: IpAddr,
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut streaming = self
            .per_client
            .streaming
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Entry::Occupied(mut taken) = streaming.entry(self.client) {
            *taken.get_mut() -= 1;
            if *taken.get() == 0 {
                taken.remove();
            }
        }
    }
}

/// See the module documentation.
#[derive(Clone)]
pub struct Downloads<S> {
    inner: S,
    /// One permit per download that may stream; shared by every clone.
    slots: Arc<Semaphore>,
    per_client: Option<Arc<PerClient>>,
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
        let client_slot = match &self.per_client {
            None => None,
            Some(per_client) => match per_client.take(per_client.clients.key(&req)) {
                Some(slot) => Some(slot),
                None => {
                    metrics::counter!(RATE_LIMITED_TOTAL).increment(1);
                    let max = per_client.max;
                    return refused(
                        ApiError::new(
                            StatusCode::TOO_MANY_REQUESTS,
                            "rate_limited",
                            format!(
                                "this client has {max} downloads streaming, the most it may \
                                 have at once; retry when one ends"
                            ),
                        )
                        .with_retry_after(1),
                    );
                }
            },
        };
        match self.slots.clone().try_acquire_owned() {
            Ok(permit) => ResponseFuture::Counted {
                inner: self.inner.call(req),
                slot: Some(Slot {
                    _all: Gauged::new(permit, DOWNLOADS_IN_FLIGHT),
                    _client: client_slot,
                }),
            },
            Err(_) => refused(ApiError::overloaded(Overload::Downloads)),
        }
    }
}

fn refused<F>(error: ApiError) -> ResponseFuture<F> {
    ResponseFuture::Refused {
        response: Some(error.into_response()),
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

/// A taken download slot, and its client's (with the per-client cap): the first counted in
/// the gauge while it lives.
struct Slot {
    _all: Gauged<OwnedSemaphorePermit>,
    _client: Option<ClientSlot>,
}

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
    use crate::config::RateLimitConfig;
    use crate::middleware::rate_limit::PeerAddr;
    use tower::ServiceExt;

    fn layer(max: usize, per_client: usize) -> DownloadsLayer {
        let clients = Arc::new(Clients::new(&RateLimitConfig::default()));
        DownloadsLayer::new(max).per_client(per_client, clients)
    }

    fn get_from(path: &str, peer: &str) -> Request<Body> {
        let mut req = get(path);
        let peer = format!("{peer}:40000").parse().unwrap();
        req.extensions_mut().insert(PeerAddr(peer));
        req
    }

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
        let service = layer(1, 2).layer(tower::service_fn(answer));
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

    #[tokio::test]
    async fn one_client_takes_no_more_than_its_share_of_the_slots() {
        let layer = layer(3, 2);
        let per_client = layer.per_client.clone().unwrap();
        let service = layer.layer(tower::service_fn(answer));
        let download = "/api/v1/extensions/provider/aws/1.0.0";
        let send = |peer: &'static str| service.clone().oneshot(get_from(download, peer));

        let first = send("192.0.2.1").await.unwrap();
        let second = send("192.0.2.1").await.unwrap();
        let refused = send("192.0.2.1").await.unwrap();
        assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(refused.headers()["retry-after"], "1");
        let body = refused.into_body().collect().await.unwrap().to_bytes();
        assert!(String::from_utf8_lossy(&body).contains("\"rate_limited\""));
        // Another client has the slot left; after it, every slot is taken.
        let other = send("198.51.100.7").await.unwrap();
        assert_eq!(other.status(), StatusCode::OK);
        let status = send("203.0.113.9").await.unwrap().status();
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        // Refusals hold nothing; a finished download gives its client's slot back.
        drop(first);
        assert_eq!(send("192.0.2.1").await.unwrap().status(), StatusCode::OK);
        drop((second, other));
        let streaming = per_client.streaming.lock().unwrap();
        assert_eq!(streaming.get(&"192.0.2.1".parse::<IpAddr>().unwrap()), None);
        assert!(streaming.is_empty(), "{:?}", *streaming);
    }
}
