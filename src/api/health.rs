//! Health, liveness and readiness. Backend probes are cached for a few seconds and run one at
//! a time, so however often the endpoints are polled, backends see at most one probe per
//! interval.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Response, StatusCode};
use serde::Serialize;
use tokio::sync::Mutex;
use tower::ServiceExt;

use crate::api::handlers::json;
use crate::body::Body;
use crate::registry::{BackendHealth, BackendRequest, BackendService, HealthReport, Source};

/// How long a probe result is reused.
const PROBE_TTL: Duration = Duration::from_secs(5);
/// How long a probe may take before the backends count as unhealthy.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Probes the backends and remembers the answer.
pub struct HealthProbe {
    /// Asked for `BackendRequest::Health`.
    registry: BackendService,
    /// The configured backends, in precedence order.
    sources: Vec<Source>,
    /// For `uptime`.
    started: Instant,
    /// The last probe and when it ran; the lock also makes concurrent probes wait for one.
    last: Mutex<Option<(Instant, Arc<HealthReport>)>>,
    /// Set once any backend has answered a probe; readiness never goes back.
    ready: AtomicBool,
}

#[derive(Serialize)]
struct BackendStatus {
    enabled: bool,
    healthy: bool,
}

#[derive(Serialize)]
struct HealthBody {
    status: &'static str,
    version: &'static str,
    uptime: u64,
    backends: BTreeMap<&'static str, BackendStatus>,
}

impl HealthProbe {
    pub fn new(registry: BackendService, sources: Vec<Source>) -> Self {
        Self {
            registry,
            sources,
            started: Instant::now(),
            last: Mutex::new(None),
            ready: AtomicBool::new(false),
        }
    }

    async fn report(&self) -> Arc<HealthReport> {
        let mut last = self.last.lock().await;
        if let Some((at, report)) = last.as_ref() {
            if at.elapsed() < PROBE_TTL {
                return report.clone();
            }
        }
        let probe = self.registry.clone().oneshot(BackendRequest::Health);
        let report = match tokio::time::timeout(PROBE_TIMEOUT, probe).await {
            Ok(Ok(response)) => response.into_health().ok(),
            Ok(Err(_)) | Err(_) => None,
        }
        .unwrap_or_else(|| {
            HealthReport(
                self.sources
                    .iter()
                    .map(|&source| BackendHealth {
                        source,
                        healthy: false,
                        detail: Some("health probe failed or timed out".into()),
                    })
                    .collect(),
            )
        });
        for unhealthy in report.0.iter().filter(|b| !b.healthy) {
            tracing::warn!(backend = %unhealthy.source, detail = ?unhealthy.detail, "backend unhealthy");
        }
        if report.0.iter().any(|b| b.healthy) {
            self.ready.store(true, Ordering::Relaxed);
        }
        let report = Arc::new(report);
        *last = Some((Instant::now(), report.clone()));
        report
    }

    /// `/api/v1/health`: healthy when every backend is, degraded when some are (200),
    /// unhealthy when none is (503).
    pub async fn health_response(&self) -> Response<Body> {
        let report = self.report().await;
        let healthy = report.0.iter().filter(|b| b.healthy).count();
        let (status, code) = match healthy {
            0 => ("unhealthy", StatusCode::SERVICE_UNAVAILABLE),
            n if n == report.0.len() => ("healthy", StatusCode::OK),
            _ => ("degraded", StatusCode::OK),
        };
        let backends = Source::ALL
            .into_iter()
            .map(|source| {
                let probed = report.0.iter().find(|b| b.source == source);
                let status = BackendStatus {
                    enabled: probed.is_some(),
                    healthy: probed.is_some_and(|b| b.healthy),
                };
                (source.as_str(), status)
            })
            .collect();
        let body = HealthBody {
            status,
            version: env!("CARGO_PKG_VERSION"),
            uptime: self.started.elapsed().as_secs(),
            backends,
        };
        json(code, &body)
    }

    /// `/readyz`: ready once any backend has answered a health probe.
    pub async fn ready_response(&self) -> Response<Body> {
        let ready = self.ready.load(Ordering::Relaxed) || {
            self.report().await;
            self.ready.load(Ordering::Relaxed)
        };
        if ready {
            json(StatusCode::OK, &serde_json::json!({"status": "ready"}))
        } else {
            json(
                StatusCode::SERVICE_UNAVAILABLE,
                &serde_json::json!({"status": "not_ready"}),
            )
        }
    }
}
