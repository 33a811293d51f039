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
#[derive(Clone)]
pub struct Registry(Arc<dyn Ask>);

impl Registry {
    pub fn new<S>(service: S) -> Self
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
        Self(Arc::new(service))
    }

    pub fn ask(&self, req: BackendRequest) -> BackendFuture {
        self.0.ask(req)
    }
}

trait Ask: Send + Sync {
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
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// Not ready on its first `poll_ready` (waking the caller, as a service must), then ready;
    /// answers the versions of nothing.
    #[derive(Clone, Default)]
    struct ReadyOnSecondPoll(Arc<AtomicUsize>);

    impl Service<BackendRequest> for ReadyOnSecondPoll {
        type Response = BackendResponse;
        type Error = RegistryError;
        type Future = BackendFuture;

        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), RegistryError>> {
            if self.0.fetch_add(1, Ordering::Relaxed) == 0 {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: BackendRequest) -> BackendFuture {
            Box::pin(async { Ok(BackendResponse::Versions(Arc::default())) })
        }
    }

    #[tokio::test]
    async fn a_registry_not_ready_at_once_is_asked_once_ready() {
        let service = ReadyOnSecondPoll::default();
        let polls = service.0.clone();
        let answer = Registry::new(service).ask(BackendRequest::Health).await;
        assert!(matches!(answer, Ok(BackendResponse::Versions(_))));
        assert_eq!(polls.load(Ordering::Relaxed), 2);
    }
}
