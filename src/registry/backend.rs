//! The request/response vocabulary every backend speaks. Backends are tower services from
//! `BackendRequest` to `BackendResponse`, so the cache can wrap them and `Merge` can fan out.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use tower::util::BoxCloneSyncService;
use tower::{Service, ServiceExt};

use crate::registry::{
    Artifact, ByteRange, Extension, ExtensionKey, ExtensionType, RegistryError, Source,
    SourceSelector, Version, VersionSelector,
};

/// A backend as the rest of the program holds it.
pub type BackendService = BoxCloneSyncService<BackendRequest, BackendResponse, RegistryError>;

/// The cached, merged registry as the handlers ask it: through a shared reference, each
/// question put to a clone of the service. Asking a [`BackendService`] meant cloning it into
/// a new box and boxing its (already boxed) future again, two allocations per request.
pub struct Registry(Box<dyn Ask>);

impl Registry {
    pub fn new(service: impl Ask + 'static) -> Self {
        Self(Box::new(service))
    }

    /// Puts the question at once (the service is called here, not when the future is first
    /// polled); the future answers it.
    pub fn ask(&self, req: BackendRequest) -> BackendFuture {
        self.0.ask(req)
    }
}

/// What a [`Registry`] can be made of: every cloneable service from `BackendRequest` whose
/// future is already a [`BackendFuture`].
pub trait Ask: Send + Sync {
    fn ask(&self, req: BackendRequest) -> BackendFuture;
}

impl<S> Ask for S
where
    S: Service<
            BackendRequest,
            Response = BackendResponse,
            Error = RegistryError,
            Future = BackendFuture,
        > + Clone
        + Send
        + Sync
        + 'static,
{
    fn ask(&self, req: BackendRequest) -> BackendFuture {
        let mut service = self.clone();
        // The registry's services are ready at once (each call clones what it needs); one
        // that is not gets the question once ready, as `oneshot` does, woken for real then.
        match service.poll_ready(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(Ok(())) => service.call(req),
            Poll::Ready(Err(e)) => Box::pin(std::future::ready(Err(e))),
            Poll::Pending => Box::pin(service.oneshot(req)),
        }
    }
}

/// The future of a backend call, for services whose `call` is an async block.
pub type BackendFuture =
    Pin<Box<dyn Future<Output = Result<BackendResponse, RegistryError>> + Send>>;

/// Which extensions a listing asks for.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct ListFilter {
    pub ty: Option<ExtensionType>,
    pub source: Option<SourceSelector>,
}

/// What a backend (or the merged registry) can be asked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackendRequest {
    /// Every extension matching the filter, each at its current version, in no particular order.
    List(ListFilter),
    /// One extension at its current version. `source` pins the backends when merged.
    Get {
        key: ExtensionKey,
        source: Option<SourceSelector>,
    },
    /// All versions of one extension, newest first.
    Versions {
        key: ExtensionKey,
        source: Option<SourceSelector>,
    },
    /// The artifact of one version, as a stream: all of it, or the one byte range asked for
    /// (see [`crate::registry::select`] for how a backend settles what it serves).
    Download {
        key: ExtensionKey,
        version: VersionSelector,
        source: Option<SourceSelector>,
        range: Option<ByteRange>,
    },
    /// What `Download` would answer, from metadata alone (name, size, checksum), with an
    /// empty body: no stream is opened. For HEAD.
    DownloadHead {
        key: ExtensionKey,
        version: VersionSelector,
        source: Option<SourceSelector>,
    },
    /// Whether the backend answers.
    Health,
}

/// The answers, one variant per request kind. Values are shared so a cache hit is a pointer copy.
#[derive(Debug)]
pub enum BackendResponse {
    List(Arc<Vec<Extension>>),
    Extension(Arc<Extension>),
    Versions(Arc<Vec<Version>>),
    Artifact(Artifact),
    Health(HealthReport),
    /// An answer that is not fresh, and why: served although a backend failed with `error`
    /// (kept from before by the cache, or, from the merge, complete but for what the failed
    /// backend would have added); or, with no `error`, kept past its TTL by the cache and
    /// served while a refresh runs (stale-while-revalidate). The HTTP edge says so in
    /// `Cache-Status`.
    Stale {
        response: Box<BackendResponse>,
        error: Option<RegistryError>,
    },
    /// An answer another replica fetched `age` ago, found in the shared cache: the cache above
    /// judges its freshness from when it was fetched, so every replica judges it alike.
    Shared {
        response: Box<BackendResponse>,
        age: std::time::Duration,
    },
}

/// One backend's health as its probe saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendHealth {
    pub source: Source,
    pub healthy: bool,
    /// Why it is unhealthy, for logs and the health endpoint.
    pub detail: Option<String>,
}

/// The health of every configured backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthReport(pub Vec<BackendHealth>);

fn mismatch(expected: &str) -> RegistryError {
    RegistryError::Internal(format!(
        "backend answered with something other than {expected}"
    ))
}

impl BackendResponse {
    /// The backend failure a stale answer stands in for.
    pub fn stale_error(&self) -> Option<&RegistryError> {
        match self {
            Self::Stale { error, .. } => error.as_ref(),
            _ => None,
        }
    }

    /// Whether the answer is not fresh (see [`BackendResponse::Stale`]).
    pub fn is_stale(&self) -> bool {
        matches!(self, Self::Stale { .. })
    }

    fn fresh(self) -> Self {
        match self {
            Self::Stale { response, .. } | Self::Shared { response, .. } => response.fresh(),
            other => other,
        }
    }

    pub fn into_list(self) -> Result<Arc<Vec<Extension>>, RegistryError> {
        match self.fresh() {
            Self::List(l) => Ok(l),
            _ => Err(mismatch("a list")),
        }
    }

    pub fn into_extension(self) -> Result<Arc<Extension>, RegistryError> {
        match self.fresh() {
            Self::Extension(e) => Ok(e),
            _ => Err(mismatch("an extension")),
        }
    }

    pub fn into_versions(self) -> Result<Arc<Vec<Version>>, RegistryError> {
        match self.fresh() {
            Self::Versions(v) => Ok(v),
            _ => Err(mismatch("versions")),
        }
    }

    pub fn into_artifact(self) -> Result<Artifact, RegistryError> {
        match self.fresh() {
            Self::Artifact(a) => Ok(a),
            _ => Err(mismatch("an artifact")),
        }
    }

    pub fn into_health(self) -> Result<HealthReport, RegistryError> {
        match self.fresh() {
            Self::Health(h) => Ok(h),
            _ => Err(mismatch("a health report")),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Mutex;
    use std::time::Duration;

    use super::*;

    /// Ready once opened; until then, keeps the waker of its last `poll_ready`, as a service
    /// must, to be woken by whoever opens it. Lists nothing.
    #[derive(Clone, Default)]
    struct Gated {
        open: Arc<AtomicBool>,
        waiting: Arc<Mutex<Option<Waker>>>,
        polls: Arc<AtomicUsize>,
    }

    impl Service<BackendRequest> for Gated {
        type Response = BackendResponse;
        type Error = RegistryError;
        type Future = BackendFuture;

        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), RegistryError>> {
            self.polls.fetch_add(1, Ordering::SeqCst);
            if self.open.load(Ordering::SeqCst) {
                return Poll::Ready(Ok(()));
            }
            *self.waiting.lock().unwrap() = Some(cx.waker().clone());
            Poll::Pending
        }

        fn call(&mut self, _: BackendRequest) -> BackendFuture {
            Box::pin(async { Ok(BackendResponse::List(Arc::default())) })
        }
    }

    fn list() -> BackendRequest {
        BackendRequest::List(ListFilter::default())
    }

    #[tokio::test]
    async fn a_ready_registry_is_asked_at_once() {
        let service = Gated::default();
        service.open.store(true, Ordering::SeqCst);
        let polls = service.polls.clone();
        let answer = Registry::new(service).ask(list()).await;
        assert!(matches!(answer, Ok(BackendResponse::List(_))));
        assert_eq!(polls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_registry_not_ready_at_once_is_asked_once_it_wakes_the_question() {
        let service = Gated::default();
        let gate = service.clone();
        let question = tokio::spawn(Registry::new(service).ask(list()));
        // The first readiness poll was `ask`'s, with a no-op waker; wait for the one made with
        // the question's own task, whose waker the gate keeps.
        while gate.polls.load(Ordering::SeqCst) < 2 {
            assert!(
                !question.is_finished(),
                "answered before the registry was ready"
            );
            tokio::task::yield_now().await;
        }
        gate.open.store(true, Ordering::SeqCst);
        let waker = gate
            .waiting
            .lock()
            .unwrap()
            .take()
            .expect("a waker is kept");
        waker.wake();
        // A question left with the no-op waker would never run again: time runs out instead.
        let answer = tokio::time::timeout(Duration::from_secs(5), question)
            .await
            .expect("the question is woken once the registry is ready")
            .expect("the question's task");
        assert!(matches!(answer, Ok(BackendResponse::List(_))));
    }
}
