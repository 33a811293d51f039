//! The registry as one service over every configured backend instance: listings fan out and
//! merge in a fixed order, single lookups take the first instance (in precedence order) that
//! has the extension, downloads try instances one at a time so only one stream is ever opened.
//! Each extension answered is named after the instance that found it.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::join_all;
use tower::{Service, ServiceExt};

use crate::registry::{
    BackendFuture, BackendHealth, BackendRequest, BackendResponse, BackendService, Extension,
    HealthReport, Instance, RegistryError, Sources,
};

/// How long each backend's health probe may take: one slow backend is reported unhealthy
/// without holding back the others' reports.
pub const HEALTH_PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Fans requests out over the backend instances, held in precedence order (by `priority`;
/// by default Gitea, OCI, GitHub, local, each kind's instances in file order).
#[derive(Clone)]
pub struct Merge {
    backends: Arc<[(Instance, BackendService)]>,
}

impl Merge {
    pub fn new(backends: Vec<(Instance, BackendService)>) -> Self {
        Self {
            backends: backends.into(),
        }
    }

    /// The configured instances, in precedence order.
    pub fn sources(&self) -> Sources {
        Sources::new(self.backends.iter().map(|(i, _)| i.clone()).collect())
    }
}

async fn ask(
    mut backend: BackendService,
    req: BackendRequest,
) -> Result<BackendResponse, RegistryError> {
    backend.ready().await?.call(req).await
}

/// Asks one instance, naming it in the extensions it answers with.
async fn ask_instance(
    (instance, backend): (Instance, BackendService),
    req: BackendRequest,
) -> Result<BackendResponse, RegistryError> {
    ask(backend, req)
        .await
        .map(|response| found_in(&instance, response))
}

/// `response` with every extension in it named after `instance`.
fn found_in(instance: &Instance, response: BackendResponse) -> BackendResponse {
    let name = |e: &mut Extension| e.instance = instance.name.clone();
    match response {
        BackendResponse::List(mut list) => {
            Arc::make_mut(&mut list).iter_mut().for_each(name);
            BackendResponse::List(list)
        }
        BackendResponse::Extension(mut extension) => {
            name(Arc::make_mut(&mut extension));
            BackendResponse::Extension(extension)
        }
        BackendResponse::Stale { response, error } => BackendResponse::Stale {
            response: Box::new(found_in(instance, *response)),
            error,
        },
        other => other,
    }
}

/// The answer for a lookup that every candidate backend was asked: the first success in
/// precedence order (marked degraded when a backend before it failed, as that one might
/// have had the extension); else a backend fault if there was one; else not found.
fn first_found(
    results: Vec<Result<BackendResponse, RegistryError>>,
    not_found: RegistryError,
) -> Result<BackendResponse, RegistryError> {
    let mut fault = None;
    for result in results {
        match result {
            Ok(found) => return Ok(degraded(found, fault)),
            Err(e) if e.is_not_found() => {}
            Err(e) => {
                fault.get_or_insert(e);
            }
        }
    }
    Err(fault.unwrap_or(not_found))
}

impl Service<BackendRequest> for Merge {
    type Response = BackendResponse;
    type Error = RegistryError;
    type Future = BackendFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Each call clones the backends it needs and waits for their readiness itself.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: BackendRequest) -> Self::Future {
        let backends = self.backends.clone();
        Box::pin(async move {
            let pinned = match &req {
                BackendRequest::List(f) => f.source.as_ref(),
                BackendRequest::Get { source, .. }
                | BackendRequest::Versions { source, .. }
                | BackendRequest::Download { source, .. }
                | BackendRequest::DownloadHead { source, .. } => source.as_ref(),
                BackendRequest::Health => None,
            };
            let candidates: Vec<_> = backends
                .iter()
                .filter(|(instance, _)| pinned.is_none_or(|p| p.admits(instance)))
                .cloned()
                .collect();
            match req {
                BackendRequest::List(_) => list(candidates, req).await,
                BackendRequest::Get { ref key, .. } | BackendRequest::Versions { ref key, .. } => {
                    let not_found = RegistryError::not_found(key);
                    let asks = candidates.into_iter().map(|c| ask_instance(c, req.clone()));
                    first_found(join_all(asks).await, not_found)
                }
                BackendRequest::Download { ref key, .. }
                | BackendRequest::DownloadHead { ref key, .. } => {
                    let mut results = Vec::new();
                    for candidate in candidates {
                        let result = ask_instance(candidate, req.clone()).await;
                        let found = result.is_ok();
                        results.push(result);
                        if found {
                            break;
                        }
                    }
                    first_found(results, RegistryError::not_found(key))
                }
                BackendRequest::Health => health(candidates).await,
            }
        })
    }
}

async fn list(
    candidates: Vec<(Instance, BackendService)>,
    req: BackendRequest,
) -> Result<BackendResponse, RegistryError> {
    let names: Vec<_> = candidates.iter().map(|(i, _)| i.name.clone()).collect();
    let asks = candidates.into_iter().map(|c| ask_instance(c, req.clone()));
    let results = join_all(asks).await;
    let mut merged = Vec::new();
    let mut fault = None;
    let mut answered = names.is_empty();
    for (name, result) in names.iter().zip(results) {
        match result.and_then(BackendResponse::into_list) {
            Ok(list) => {
                answered = true;
                merged.extend(list.iter().cloned());
            }
            Err(e) => {
                tracing::warn!(backend = %name, error = %e, "backend left out of the listing");
                fault.get_or_insert(e);
            }
        }
    }
    if !answered {
        if let Some(e) = fault {
            return Err(e);
        }
    }
    // Stable: entries equal in all of this stay in precedence order, as collected.
    merged.sort_by(|a, b| {
        (a.ty, &a.name, a.source)
            .cmp(&(b.ty, &b.name, b.source))
            .then_with(|| a.version.cmp(&b.version))
    });
    Ok(degraded(BackendResponse::List(Arc::new(merged)), fault))
}

/// An answer missing what a failed backend would have added is marked with that failure, so
/// the cache keeps serving the complete answer it has rather than taking this one as fresh.
fn degraded(response: BackendResponse, fault: Option<RegistryError>) -> BackendResponse {
    match fault {
        Some(error) => BackendResponse::Stale {
            response: Box::new(response),
            error: Some(error),
        },
        None => response,
    }
}

/// One report per instance, in precedence order (the order [`Merge::sources`] gives).
async fn health(
    candidates: Vec<(Instance, BackendService)>,
) -> Result<BackendResponse, RegistryError> {
    let asks = candidates.iter().map(|(instance, b)| async move {
        let probe = ask(b.clone(), BackendRequest::Health);
        tokio::time::timeout(HEALTH_PROBE_TIMEOUT, probe)
            .await
            .unwrap_or_else(|_| {
                // Made here, above the instance's stack: named as the stack names its
                // errors.
                Err(RegistryError::unavailable(
                    instance.kind,
                    format!(
                        "no answer to the health probe within {} s",
                        HEALTH_PROBE_TIMEOUT.as_secs()
                    ),
                )
                .with_instance(instance))
            })
    });
    let results = join_all(asks).await;
    let report = candidates
        .iter()
        .zip(results)
        .map(|((Instance { kind: source, .. }, _), result)| {
            match result.and_then(BackendResponse::into_health) {
                Ok(HealthReport(mut own)) if !own.is_empty() => own.swap_remove(0),
                Ok(_) => BackendHealth {
                    source: *source,
                    healthy: false,
                    detail: Some("no health report".into()),
                },
                Err(e) => BackendHealth {
                    source: *source,
                    healthy: false,
                    detail: Some(e.to_string()),
                },
            }
        })
        .collect();
    Ok(BackendResponse::Health(HealthReport(report)))
}
