//! Load shedding at the concurrency limit: at most `max_concurrent_requests` requests are
//! worked on at once (each counted until its response head); beyond it a request fails at once
//! with tower's `Overloaded` (503 with `Retry-After: 1` from the error rescue) instead of
//! queueing behind slow backends. Exempt paths (probes, scrapes) are never counted nor refused:
//! they answer without backend work, and must keep answering when the service is full.
//!
//! The slot is taken in `call`, not `poll_ready`, so a request that turns out exempt never
//! holds one.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use http::Request;
use pin_project_lite::pin_project;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::load_shed::error::Overloaded;
use tower::{Layer, Service};

use crate::BoxError;

/// Limits the requests in progress, paths in `exempt` aside.
#[derive(Clone, Debug)]
pub struct LoadShedLayer {
    slots: Arc<Semaphore>,
    exempt: Arc<[String]>,
}

impl LoadShedLayer {
    pub fn new(max_concurrent: usize, exempt: &[String]) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(max_concurrent)),
            exempt: exempt.into(),
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
        }
    }
}

/// See the module documentation.
#[derive(Clone, Debug)]
pub struct LoadShed<S> {
    inner: S,
    /// One permit per request in progress, shared by every clone.
    slots: Arc<Semaphore>,
    /// Exact paths neither counted nor refused.
    exempt: Arc<[String]>,
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
        let permit = if self.exempt.iter().any(|p| p == path) {
            None
        } else {
            match self.slots.clone().try_acquire_owned() {
                Ok(permit) => Some(permit),
                Err(_) => {
                    return ResponseFuture {
                        inner: None,
                        _permit: None,
                    }
                }
            }
        };
        ResponseFuture {
            inner: Some(self.inner.call(req)),
            _permit: permit,
        }
    }
}

pin_project! {
    /// The inner future holding its slot until the response head; or a refusal.
    pub struct ResponseFuture<F> {
        #[pin]
        inner: Option<F>,
        _permit: Option<OwnedSemaphorePermit>,
    }
}

impl<F, T, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().inner.as_pin_mut() {
            Some(inner) => Poll::Ready(ready!(inner.poll(cx)).map_err(Into::into)),
            None => Poll::Ready(Err(Box::new(Overloaded::new()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use tower::ServiceExt;

    use super::*;

    fn req(path: &str) -> Request<()> {
        Request::get(path).body(()).unwrap()
    }

    #[tokio::test]
    async fn refuses_beyond_the_limit_at_once_but_never_exempt_paths() {
        let gate = Arc::new(Semaphore::new(0));
        let inner = tower::service_fn(move |req: Request<()>| {
            let gate = gate.clone();
            async move {
                if req.uri().path() == "/slow" {
                    let _held = gate.acquire().await;
                }
                Ok::<_, BoxError>(req.uri().path().to_owned())
            }
        });
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
}
