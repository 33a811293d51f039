//! Load shedding at the concurrency limit: at most `max_concurrent_requests` requests are
//! worked on at once (each counted until its response head); beyond it a request fails at once
//! with tower's `Overloaded` (503 with `Retry-After: 1` from the error rescue) instead of
//! queueing behind slow backends. Exempt paths (probes, scrapes) are never counted nor refused:
//! they answer without backend work, and must keep answering when the service is full.
//!
//! The slot is taken in `call`, not `poll_ready`, so a request that turns out exempt never
//! holds one.
//!
//! With rate limiting on, one client (told apart as the rate limit tells clients apart,
//! [`Clients`]) may have at most `max_requests_per_client` of those requests in progress; its
//! next fails at once with [`ClientBusy`] (429 with `Retry-After: 1` from the error rescue).
//! Without it, a client whose requests are slow to finish (bodies sent a byte at a time,
//! say) could hold every slot for as long as the rate limit lets it send requests. The
//! counts are kept in a fixed table of [`CLIENT_COUNTERS`] counters, each client's placed by
//! a per-process seed: no client adds state, and clients whose keys share a counter share
//! its cap.

use std::future::Future;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use http::Request;
use pin_project_lite::pin_project;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::load_shed::error::Overloaded;
use tower::{Layer, Service};

use crate::middleware::rate_limit::Clients;
use crate::middleware::KeyHasher;
use crate::BoxError;

/// Counters of the requests in progress per client: 16 KiB.
pub const CLIENT_COUNTERS: usize = 4096;

/// The error of a request whose client already has its most requests in progress.
#[derive(Debug, thiserror::Error)]
#[error("this client has {0} requests in progress, the most one client may have")]
pub struct ClientBusy(pub u32);

/// The requests in progress of each client, by counter.
struct PerClient {
    clients: Arc<Clients>,
    max: u32,
    counters: Box<[AtomicU32]>,
    hasher: KeyHasher,
}

impl PerClient {
    /// One of `client`'s places, unless it has `max` requests in progress.
    fn take(self: &Arc<Self>, client: IpAddr) -> Result<ClientPlace, ClientBusy> {
        let index = self.hasher.hash_one(client) as usize % self.counters.len();
        let taken = self.counters[index].fetch_add(1, Ordering::Relaxed);
        let place = ClientPlace {
            per_client: self.clone(),
            index,
        };
        match taken < self.max {
            true => Ok(place),
            // Dropping the place gives the count back.
            false => Err(ClientBusy(self.max)),
        }
    }
}

/// A request's place in its client's count, given back when dropped.
struct ClientPlace {
    per_client: Arc<PerClient>,
    index: usize,
}

impl Drop for ClientPlace {
    fn drop(&mut self) {
        self.per_client.counters[self.index].fetch_sub(1, Ordering::Relaxed);
    }
}

/// Limits the requests in progress, paths in `exempt` aside.
#[derive(Clone)]
pub struct LoadShedLayer {
    slots: Arc<Semaphore>,
    exempt: Arc<[String]>,
    per_client: Option<Arc<PerClient>>,
}

impl LoadShedLayer {
    pub fn new(max_concurrent: usize, exempt: &[String]) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(max_concurrent)),
            exempt: exempt.into(),
            per_client: None,
        }
    }

    /// At most `max` of the requests in progress one client's, clients told apart by
    /// `clients`.
    pub fn per_client(self, max: u32, clients: Arc<Clients>) -> Self {
        Self {
            per_client: Some(Arc::new(PerClient {
                clients,
                max,
                counters: (0..CLIENT_COUNTERS).map(|_| AtomicU32::new(0)).collect(),
                hasher: KeyHasher::default(),
            })),
            ..self
        }
    }
}

impl<S> Layer<S> for LoadShedLayer {
    type Service = LoadShed<S>;

    fn layer(&self, inner: S) -> LoadShed<S> {
        LoadShed {
            inner,
            slots: self.slots.clone(),
            exempt: self.exempt.clone(),
            per_client: self.per_client.clone(),
        }
    }
}

/// See the module documentation.
#[derive(Clone)]
pub struct LoadShed<S> {
    inner: S,
    /// One permit per request in progress, shared by every clone.
    slots: Arc<Semaphore>,
    /// Exact paths neither counted nor refused.
    exempt: Arc<[String]>,
    per_client: Option<Arc<PerClient>>,
}

impl<S, B> Service<Request<B>> for LoadShed<S>
where
    S: Service<Request<B>>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let path = req.uri().path();
        if self.exempt.iter().any(|p| p == path) {
            return ResponseFuture::taking(self.inner.call(req), None, None);
        }
        let place = match &self.per_client {
            None => None,
            Some(per_client) => match per_client.take(per_client.clients.key(&req)) {
                Ok(place) => Some(place),
                Err(busy) => return ResponseFuture::refused(busy.into()),
            },
        };
        match self.slots.clone().try_acquire_owned() {
            Ok(permit) => ResponseFuture::taking(self.inner.call(req), Some(permit), place),
            Err(_) => ResponseFuture::refused(Box::new(Overloaded::new())),
        }
    }
}

pin_project! {
    /// The inner future holding its slot and its client's place until the response head; or
    /// a refusal.
    pub struct ResponseFuture<F> {
        #[pin]
        inner: Option<F>,
        refusal: Option<BoxError>,
        _permit: Option<OwnedSemaphorePermit>,
        _place: Option<ClientPlace>,
    }
}

impl<F> ResponseFuture<F> {
    fn taking(inner: F, permit: Option<OwnedSemaphorePermit>, place: Option<ClientPlace>) -> Self {
        Self {
            inner: Some(inner),
            refusal: None,
            _permit: permit,
            _place: place,
        }
    }

    fn refused(error: BoxError) -> Self {
        Self {
            inner: None,
            refusal: Some(error),
            _permit: None,
            _place: None,
        }
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
        match this.inner.as_pin_mut() {
            Some(inner) => Poll::Ready(ready!(inner.poll(cx)).map_err(Into::into)),
            None => Poll::Ready(Err(this
                .refusal
                .take()
                .unwrap_or_else(|| Box::new(Overloaded::new())))),
        }
    }
}

#[cfg(test)]
mod tests {
    use tower::ServiceExt;

    use super::*;
    use crate::middleware::rate_limit::PeerAddr;

    fn req(path: &str) -> Request<()> {
        Request::get(path).body(()).unwrap()
    }

    /// Answers each request with its path; `/slow` never, until dropped.
    fn answering() -> impl Service<Request<()>, Response = String, Error = BoxError> + Clone {
        tower::service_fn(|req: Request<()>| async move {
            if req.uri().path() == "/slow" {
                std::future::pending::<()>().await;
            }
            Ok::<_, BoxError>(req.uri().path().to_owned())
        })
    }

    #[tokio::test]
    async fn refuses_beyond_the_limit_at_once_but_never_exempt_paths() {
        let inner = answering();
        let exempt = ["/api/v1/health".to_owned()];
        let service = LoadShedLayer::new(2, &exempt).layer(inner);

        // Two slow requests take both slots.
        let mut slow = Vec::new();
        for _ in 0..2 {
            let mut s = service.clone();
            slow.push(s.ready().await.unwrap().call(req("/slow")));
        }
        let refused = service.clone().oneshot(req("/other")).await.unwrap_err();
        assert!(refused.is::<Overloaded>());
        // Health answers however full the service is, and takes no slot doing so.
        for _ in 0..100 {
            let answer = service.clone().oneshot(req("/api/v1/health")).await;
            assert_eq!(answer.unwrap(), "/api/v1/health");
        }
        // A slot is freed when a request ends.
        drop(slow.pop());
        assert_eq!(
            service.clone().oneshot(req("/other")).await.unwrap(),
            "/other"
        );
    }

    fn from(peer: &str, path: &str) -> Request<()> {
        let mut req = req(path);
        req.extensions_mut()
            .insert(PeerAddr(format!("{peer}:40000").parse().unwrap()));
        req
    }

    #[tokio::test]
    async fn one_client_holds_no_more_than_its_share_of_the_slots() {
        let inner = answering();
        let config = crate::config::Config::parse("[local]\npath = \".\"\n", "test", None)
            .unwrap()
            .rate_limit;
        let clients = Arc::new(Clients::new(&config));
        let exempt = ["/livez".to_owned()];
        let service = LoadShedLayer::new(100, &exempt)
            .per_client(3, clients)
            .layer(inner);

        // One client's three slow requests take its share, not the service's slots.
        let mut slow = Vec::new();
        for _ in 0..3 {
            let mut s = service.clone();
            slow.push(s.ready().await.unwrap().call(from("192.0.2.1", "/slow")));
        }
        let refused = service
            .clone()
            .oneshot(from("192.0.2.1", "/other"))
            .await
            .unwrap_err();
        assert_eq!(refused.downcast_ref::<ClientBusy>().unwrap().0, 3);
        // Another client, and the exempt paths, are let through.
        let other = service.clone().oneshot(from("192.0.2.2", "/other")).await;
        assert_eq!(other.unwrap(), "/other");
        let probe = service.clone().oneshot(from("192.0.2.1", "/livez")).await;
        assert_eq!(probe.unwrap(), "/livez");
        // A refusal takes nothing: once one request ends, the client has a place again.
        drop(slow.pop());
        let again = service.clone().oneshot(from("192.0.2.1", "/other")).await;
        assert_eq!(again.unwrap(), "/other");
        let counted: u32 = service
            .per_client
            .as_ref()
            .unwrap()
            .counters
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum();
        assert_eq!(counted, 2, "the two slow requests still in progress");
    }
}
