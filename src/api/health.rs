//! Health, liveness and readiness. The backends are probed in the background every
//! `probe_interval_seconds`, one probe at a time; `/api/v1/health` and `/readyz` answer at once
//! from the last result, so however often they are polled and however slow a backend is, no
//! request waits on a probe and backends see one probe per interval.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::{Duration, Instant};

use http::{Response, StatusCode};
use serde::Serialize;
use tower::ServiceExt;

use crate::api::handlers::json;
use crate::body::Body;
use crate::middleware::breaker::{CircuitState, Gate};
use crate::redis::{Redis, RedisStatus};
use crate::registry::{
    BackendHealth, BackendRequest, BackendService, HealthReport, Instance, Source, Sources,
    HEALTH_PROBE_TIMEOUT,
};

/// How long a probe may take before every backend counts as unhealthy: a backstop, a little
/// longer than the merge's bound on each backend's probe, whose report names the slow one.
const PROBE_TIMEOUT: Duration = HEALTH_PROBE_TIMEOUT.saturating_add(Duration::from_secs(1));

/// Probes the backends in the background and keeps the last answer.
pub struct HealthProbe {
    state: Arc<ProbeState>,
}

struct ProbeState {
    /// Asked for `BackendRequest::Health`.
    registry: BackendService,
    /// The configured backend instances, in precedence order: the merge's health report
    /// holds one entry per instance, in this order.
    sources: Sources,
    /// Each instance's circuit breaker, shown beside its probe result.
    gates: Vec<Gate>,
    /// Time between the end of one probe and the start of the next.
    interval: Duration,
    /// For `uptime`.
    started: Instant,
    /// The last probe's report; `None` until the first probe ends.
    last: RwLock<Option<Arc<HealthReport>>>,
    /// Set once any backend has answered a probe; readiness never goes back.
    ready: AtomicBool,
    /// Whether the probing task runs.
    probing: AtomicBool,
    /// The shared Redis, if configured: its own probe keeps its status.
    redis: Option<Redis>,
}

#[derive(Serialize)]
struct BackendStatus {
    /// The kind of an enabled instance not named after its kind (the single-table sections
    /// keep their former shape).
    #[serde(skip_serializing_if = "Option::is_none")]
    kind: Option<Source>,
    enabled: bool,
    healthy: bool,
    /// The circuit breaker's state, for enabled backends.
    #[serde(skip_serializing_if = "Option::is_none")]
    circuit: Option<CircuitState>,
}

#[derive(Serialize)]
struct HealthBody {
    status: &'static str,
    version: &'static str,
    uptime: u64,
    /// By instance name; kinds with no instance are listed by kind, disabled.
    backends: BTreeMap<String, BackendStatus>,
    /// Present when `[redis]` is configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    redis: Option<RedisStatus>,
}

impl HealthProbe {
    /// Starts probing at once when called within a Tokio runtime; otherwise at the first
    /// health or readiness request.
    pub fn new(
        registry: BackendService,
        sources: Sources,
        gates: Vec<Gate>,
        interval: Duration,
        redis: Option<Redis>,
    ) -> Self {
        let probe = Self {
            state: Arc::new(ProbeState {
                registry,
                sources,
                gates,
                interval,
                started: Instant::now(),
                last: RwLock::new(None),
                ready: AtomicBool::new(false),
                probing: AtomicBool::new(false),
                redis,
            }),
        };
        if tokio::runtime::Handle::try_current().is_ok() {
            probe.start();
        }
        probe
    }

    /// Spawns the probing task unless it runs. It holds the state weakly, so it ends once the
    /// application is dropped.
    fn start(&self) {
        if self.state.probing.swap(true, Ordering::AcqRel) {
            return;
        }
        let state = Arc::downgrade(&self.state);
        tokio::spawn(probe_forever(state));
    }

    fn last(&self) -> Option<Arc<HealthReport>> {
        self.start();
        let last = self.state.last.read().unwrap_or_else(|p| p.into_inner());
        last.clone()
    }

    /// `/api/v1/health`: healthy when every backend is (and Redis, when configured, answers),
    /// degraded when some are or Redis does not answer (200),
    /// unhealthy when none is (503), starting before the first probe has ended (503). A backend
    /// is healthy when it answered the last probe and its circuit breaker is not open.
    pub async fn health_response(&self) -> Response<Body> {
        let report = self.last();
        let probed = |i: usize| report.as_ref().and_then(|r| r.0.get(i));
        let healthy_now = |(i, instance): (usize, &Instance)| {
            probed(i).is_some_and(|health| health.healthy)
                && self
                    .gate(instance)
                    .is_none_or(|g| g.state() != CircuitState::Open)
        };
        let instances = self.state.sources.iter().enumerate();
        let healthy = instances.clone().filter(|&b| healthy_now(b)).count();
        let (status, code) = match (&report, healthy) {
            (None, _) => ("starting", StatusCode::SERVICE_UNAVAILABLE),
            (Some(_), 0) => ("unhealthy", StatusCode::SERVICE_UNAVAILABLE),
            (Some(r), n) if n == r.0.len() => ("healthy", StatusCode::OK),
            _ => ("degraded", StatusCode::OK),
        };
        // Without Redis the replica still answers correctly, alone: degraded, not unhealthy.
        let redis = self.state.redis.as_ref().map(Redis::status);
        let status = match (status, redis) {
            ("healthy", Some(RedisStatus::Unavailable)) => "degraded",
            (status, _) => status,
        };
        let disabled = Source::ALL
            .into_iter()
            .filter(|kind| self.state.sources.iter().all(|i| i.kind != *kind))
            .map(|kind| {
                let status = BackendStatus {
                    kind: None,
                    enabled: false,
                    healthy: false,
                    circuit: None,
                };
                (kind.to_string(), status)
            });
        let backends = instances
            .map(|(i, instance)| {
                let status = BackendStatus {
                    kind: (instance.name.as_str() != instance.kind.as_str())
                        .then_some(instance.kind),
                    enabled: true,
                    healthy: healthy_now((i, instance)),
                    circuit: self.gate(instance).map(Gate::state),
                };
                (instance.name.to_string(), status)
            })
            .chain(disabled)
            .collect();
        let body = HealthBody {
            status,
            version: env!("CARGO_PKG_VERSION"),
            uptime: self.state.started.elapsed().as_secs(),
            backends,
            redis,
        };
        json(code, &body)
    }

    fn gate(&self, instance: &Instance) -> Option<&Gate> {
        self.state.gates.iter().find(|g| g.instance() == instance)
    }

    /// `/readyz`: ready once any backend has answered a health probe.
    pub async fn ready_response(&self) -> Response<Body> {
        self.start();
        if self.state.ready.load(Ordering::Acquire) {
            json(StatusCode::OK, &serde_json::json!({"status": "ready"}))
        } else {
            json(
                StatusCode::SERVICE_UNAVAILABLE,
                &serde_json::json!({"status": "not_ready"}),
            )
        }
    }
}

/// Probes, waits the interval, and again, while the application lives.
async fn probe_forever(state: Weak<ProbeState>) {
    loop {
        let Some(state) = state.upgrade() else {
            return;
        };
        state.probe().await;
        let interval = state.interval;
        drop(state);
        tokio::time::sleep(interval).await;
    }
}

impl ProbeState {
    async fn probe(&self) {
        let probe = self.registry.clone().oneshot(BackendRequest::Health);
        let report = match tokio::time::timeout(PROBE_TIMEOUT, probe).await {
            Ok(Ok(response)) => response.into_health().ok(),
            Ok(Err(_)) | Err(_) => None,
        }
        .unwrap_or_else(|| {
            HealthReport(
                self.sources
                    .iter()
                    .map(|instance| BackendHealth {
                        source: instance.kind,
                        healthy: false,
                        detail: Some("health probe failed or timed out".into()),
                    })
                    .collect(),
            )
        });
        let probed = self.sources.iter().zip(&report.0);
        for (instance, unhealthy) in probed.filter(|(_, b)| !b.healthy) {
            tracing::warn!(backend = %instance.name, detail = ?unhealthy.detail, "backend unhealthy");
        }
        if report.0.iter().any(|b| b.healthy) {
            self.ready.store(true, Ordering::Release);
        }
        *self.last.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(report));
    }
}
