//! A circuit breaker per backend, between the merge and the backend: after
//! `failure_threshold` consecutive faults (timeouts, 5xx, refused connections, malformed
//! answers) the backend is not called for a cool-down, and requests needing it fail at once
//! with `BackendSuspended` (503 with `Retry-After`, or a stale answer from the cache above).
//! When the cool-down ends, one request goes through as a probe (half-open): an answer closes
//! the breaker, a fault opens it again for twice as long, up to `max_open_seconds`. An
//! upstream `429`/`503` with `Retry-After` opens it for that long whatever the count.
//!
//! The state of each backend is held by its [`Gate`], which the health endpoint reads and
//! which sets the `backend_circuit_state` gauge on every change. Health probes pass by the
//! breaker: they neither wait on it nor count.
//!
//! Times are `tokio::time::Instant`, so tests drive cool-downs with a paused clock.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use serde::Serialize;
use tokio::time::Instant;
use tower::{Layer, Service};

use crate::config::CircuitBreakerConfig;
use crate::registry::{BackendRequest, BackendResponse, Instance, RegistryError, Source};

/// Gauge of each backend's breaker: 0 closed, 1 half-open, 2 open.
pub const BACKEND_CIRCUIT_STATE: &str = "backend_circuit_state";

/// What `Retry-After` says while a probe is in flight: its outcome is about to be known.
const PROBE_RETRY_AFTER: Duration = Duration::from_secs(1);

/// The shortest opening an upstream `Retry-After` causes (`Retry-After: 0` still means "not
/// now").
const MIN_SUSPENSION: Duration = Duration::from_secs(1);

/// A breaker's state as the health endpoint and the gauge show it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CircuitState {
    Closed,
    HalfOpen,
    Open,
}

impl CircuitState {
    fn gauge_value(self) -> f64 {
        match self {
            Self::Closed => 0.0,
            Self::HalfOpen => 1.0,
            Self::Open => 2.0,
        }
    }
}

#[derive(Debug)]
enum State {
    /// Calls go through; `failures` consecutive faults so far.
    Closed { failures: u32 },
    /// Calls fail at once until `until`; `reason` says why, for their error message.
    Open { until: Instant, reason: String },
    /// The cool-down is over: the next call is the probe; `probing` while it runs.
    HalfOpen { probing: bool },
}

#[derive(Debug)]
struct Breaker {
    state: State,
    /// Openings since the breaker was last closed: each doubles the cool-down.
    openings: u32,
}

/// The rules, from `[circuit_breaker]`.
#[derive(Clone, Copy, Debug)]
struct Policy {
    threshold: u32,
    open: Duration,
    max_open: Duration,
}

impl Policy {
    /// The cool-down after the `openings`-th opening in a row.
    fn cool_down(&self, openings: u32) -> Duration {
        let doublings = openings.saturating_sub(1).min(16);
        self.open.saturating_mul(1 << doublings).min(self.max_open)
    }
}

/// One backend's breaker, shared by every clone of its service and by the health endpoint.
#[derive(Clone, Debug)]
pub struct Gate(Arc<GateInner>);

#[derive(Debug)]
struct GateInner {
    backend: Instance,
    policy: Policy,
    breaker: Mutex<Breaker>,
    /// `backend_circuit_state{backend}`, registered once.
    gauge: metrics::Gauge,
}

/// How a call was let through, so its outcome is recorded right.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Admission {
    Normal,
    Probe,
}

impl Gate {
    /// A closed breaker for the backend instance `backend`. Registers its gauge, so the
    /// recorder must be installed before.
    pub fn new(backend: impl Into<Instance>, config: &CircuitBreakerConfig) -> Self {
        let backend = backend.into();
        let gauge =
            metrics::gauge!(BACKEND_CIRCUIT_STATE, "backend" => backend.name.as_str().to_owned());
        gauge.set(CircuitState::Closed.gauge_value());
        Self(Arc::new(GateInner {
            backend,
            policy: Policy {
                threshold: config.failure_threshold.max(1),
                open: Duration::from_secs(config.open_seconds),
                max_open: Duration::from_secs(config.max_open_seconds),
            },
            breaker: Mutex::new(Breaker {
                state: State::Closed { failures: 0 },
                openings: 0,
            }),
            gauge,
        }))
    }

    /// The kind of backend behind the breaker.
    pub fn backend(&self) -> Source {
        self.0.backend.kind
    }

    /// The backend instance behind the breaker.
    pub fn instance(&self) -> &Instance {
        &self.0.backend
    }

    /// The state now; an open breaker whose cool-down is over shows as half-open.
    pub fn state(&self) -> CircuitState {
        let breaker = self.lock();
        match &breaker.state {
            State::Closed { .. } => CircuitState::Closed,
            State::Open { until, .. } if Instant::now() < *until => CircuitState::Open,
            State::Open { .. } | State::HalfOpen { .. } => CircuitState::HalfOpen,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Breaker> {
        // The state stays consistent whatever panicked while holding the lock: every change
        // is one assignment.
        self.0
            .breaker
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn set(&self, breaker: &mut Breaker, state: State) {
        let shown = match &state {
            State::Closed { .. } => CircuitState::Closed,
            State::Open { .. } => CircuitState::Open,
            State::HalfOpen { .. } => CircuitState::HalfOpen,
        };
        breaker.state = state;
        self.0.gauge.set(shown.gauge_value());
    }

    fn suspended(&self, reason: String, retry_after: Duration) -> RegistryError {
        RegistryError::suspended(self.0.backend.kind, reason, retry_after)
    }

    /// Lets a call through, or refuses it with the error its client gets.
    fn admit(&self) -> Result<Admission, RegistryError> {
        let mut breaker = self.lock();
        let now = Instant::now();
        match &breaker.state {
            State::Closed { .. } => Ok(Admission::Normal),
            State::Open { until, reason } if now < *until => {
                Err(self.suspended(reason.clone(), *until - now))
            }
            State::Open { .. } | State::HalfOpen { probing: false } => {
                tracing::info!(backend = %self.0.backend.name, "circuit half-open: probing the backend");
                self.set(&mut breaker, State::HalfOpen { probing: true });
                Ok(Admission::Probe)
            }
            State::HalfOpen { probing: true } => Err(self.suspended(
                "circuit half-open: a probe request is checking whether it recovered".into(),
                PROBE_RETRY_AFTER,
            )),
        }
    }

    /// Opens the breaker for `wait`, unless it is already open for longer.
    fn open(&self, breaker: &mut Breaker, wait: Duration, reason: String) {
        let until = Instant::now() + wait;
        if let State::Open { until: current, .. } = &breaker.state {
            if *current >= until {
                return;
            }
        }
        tracing::warn!(
            backend = %self.0.backend.name,
            seconds = wait.as_secs_f64(),
            %reason,
            "circuit open: the backend is not called until the cool-down ends"
        );
        self.set(breaker, State::Open { until, reason });
    }

    /// Records how an admitted call ended.
    fn record(&self, admission: Admission, result: Result<(), &RegistryError>) {
        let mut breaker = self.lock();
        let policy = self.0.policy;
        // The backend's own words, not the whole message: the refusals built from this
        // reason name the backend already.
        if let Err(RegistryError::BackendSuspended {
            reason,
            retry_after,
            ..
        }) = result
        {
            let reason = format!("{reason}; not called again before it said");
            self.open(&mut breaker, (*retry_after).max(MIN_SUSPENSION), reason);
            return;
        }
        let sick = result.err().filter(|e| e.is_backend_sickness());
        match (admission, &breaker.state, sick) {
            // An answer from the probe (not-found and refused credentials are answers too).
            (Admission::Probe, _, None) => {
                tracing::info!(backend = %self.0.backend.name, "circuit closed: the backend answered the probe");
                breaker.openings = 0;
                self.set(&mut breaker, State::Closed { failures: 0 });
            }
            (Admission::Probe, _, Some(e)) => {
                breaker.openings += 1;
                let wait = policy.cool_down(breaker.openings);
                self.open(
                    &mut breaker,
                    wait,
                    format!("circuit open: the probe failed ({e})"),
                );
            }
            (Admission::Normal, State::Closed { .. }, None) => {
                self.set(&mut breaker, State::Closed { failures: 0 });
            }
            (Admission::Normal, State::Closed { failures }, Some(e)) => {
                let failures = failures + 1;
                if failures >= policy.threshold {
                    breaker.openings += 1;
                    let wait = policy.cool_down(breaker.openings);
                    let reason =
                        format!("circuit open after {failures} consecutive failures (last: {e})");
                    self.open(&mut breaker, wait, reason);
                } else {
                    self.set(&mut breaker, State::Closed { failures });
                }
            }
            // Calls admitted before the breaker opened, ending after: the probe decides.
            (Admission::Normal, _, _) => {}
        }
    }

    /// A probe dropped before its outcome (its client hung up): the next call probes.
    fn probe_abandoned(&self) {
        let mut breaker = self.lock();
        if let State::HalfOpen { probing: true } = breaker.state {
            self.set(&mut breaker, State::HalfOpen { probing: false });
        }
    }
}

/// Puts a backend behind its [`Gate`].
#[derive(Clone, Debug)]
pub struct BreakerLayer {
    gate: Gate,
}

impl BreakerLayer {
    pub fn new(gate: Gate) -> Self {
        Self { gate }
    }
}

impl<S> Layer<S> for BreakerLayer {
    type Service = CircuitBreaker<S>;

    fn layer(&self, inner: S) -> CircuitBreaker<S> {
        CircuitBreaker {
            inner,
            gate: self.gate.clone(),
        }
    }
}

/// See the module documentation.
#[derive(Clone, Debug)]
pub struct CircuitBreaker<S> {
    inner: S,
    gate: Gate,
}

impl<S> Service<BackendRequest> for CircuitBreaker<S>
where
    S: Service<BackendRequest, Response = BackendResponse, Error = RegistryError>,
{
    type Response = BackendResponse;
    type Error = RegistryError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), RegistryError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: BackendRequest) -> Self::Future {
        if req == BackendRequest::Health {
            return ResponseFuture::passing(self.inner.call(req), None);
        }
        match self.gate.admit() {
            Ok(admission) => {
                let ticket = Ticket {
                    gate: self.gate.clone(),
                    admission,
                    recorded: false,
                };
                ResponseFuture::passing(self.inner.call(req), Some(ticket))
            }
            Err(refused) => ResponseFuture {
                inner: None,
                refused: Some(refused),
                ticket: None,
            },
        }
    }
}

/// An admitted call whose outcome is still to be recorded.
struct Ticket {
    gate: Gate,
    admission: Admission,
    recorded: bool,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.recorded && self.admission == Admission::Probe {
            self.gate.probe_abandoned();
        }
    }
}

pin_project! {
    /// The backend's future, recording its outcome; or the refusal of an open breaker.
    pub struct ResponseFuture<F> {
        #[pin]
        inner: Option<F>,
        refused: Option<RegistryError>,
        ticket: Option<Ticket>,
    }
}

impl<F> ResponseFuture<F> {
    fn passing(inner: F, ticket: Option<Ticket>) -> Self {
        Self {
            inner: Some(inner),
            refused: None,
            ticket,
        }
    }
}

impl<F> Future for ResponseFuture<F>
where
    F: Future<Output = Result<BackendResponse, RegistryError>>,
{
    type Output = Result<BackendResponse, RegistryError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Some(inner) = this.inner.as_pin_mut() else {
            return Poll::Ready(Err(this.refused.take().unwrap_or_else(|| {
                RegistryError::Internal("circuit breaker future polled after completion".into())
            })));
        };
        let result = ready!(inner.poll(cx));
        if let Some(ticket) = this.ticket.as_mut() {
            ticket
                .gate
                .record(ticket.admission, result.as_ref().map(|_| ()));
            ticket.recorded = true;
        }
        Poll::Ready(result)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tower::ServiceExt;

    use super::*;
    use crate::registry::{ExtensionKey, ExtensionName, ExtensionType, HealthReport};

    fn config() -> CircuitBreakerConfig {
        CircuitBreakerConfig {
            failure_threshold: 3,
            open_seconds: 10,
            max_open_seconds: 25,
        }
    }

    fn get() -> BackendRequest {
        BackendRequest::Get {
            key: ExtensionKey {
                ty: ExtensionType::Provider,
                name: ExtensionName::parse("aws").unwrap(),
            },
            source: None,
        }
    }

    /// A backend failing with the error the test sets (none: answering), counting calls.
    #[derive(Clone, Default)]
    struct Backend {
        calls: Arc<AtomicUsize>,
        failing: Arc<Mutex<Option<RegistryError>>>,
    }

    impl Backend {
        fn fail_with(&self, error: Option<RegistryError>) {
            *self.failing.lock().unwrap() = error;
        }

        fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }

        fn behind(
            &self,
            gate: &Gate,
        ) -> impl Service<
            BackendRequest,
            Response = BackendResponse,
            Error = RegistryError,
            Future = impl Future<Output = Result<BackendResponse, RegistryError>>,
        > + Clone {
            let this = self.clone();
            let backend = tower::service_fn(move |req: BackendRequest| {
                let this = this.clone();
                async move {
                    this.calls.fetch_add(1, Ordering::SeqCst);
                    if let Some(e) = this.failing.lock().unwrap().clone() {
                        return Err(e);
                    }
                    Ok(match req {
                        BackendRequest::Health => BackendResponse::Health(HealthReport(vec![])),
                        _ => BackendResponse::Versions(Arc::new(Vec::new())),
                    })
                }
            });
            BreakerLayer::new(gate.clone()).layer(backend)
        }
    }

    fn timeout() -> RegistryError {
        RegistryError::timeout(Source::Gitea)
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_consecutive_faults_probes_half_open_and_closes() {
        let gate = Gate::new(Source::Gitea, &config());
        let backend = Backend::default();
        let service = backend.behind(&gate);

        // Two faults, an answer, two faults: never three in a row, so still closed.
        backend.fail_with(Some(timeout()));
        for _ in 0..2 {
            service.clone().oneshot(get()).await.unwrap_err();
        }
        backend.fail_with(None);
        service.clone().oneshot(get()).await.unwrap();
        backend.fail_with(Some(timeout()));
        for _ in 0..2 {
            service.clone().oneshot(get()).await.unwrap_err();
        }
        assert_eq!(gate.state(), CircuitState::Closed);

        // The third in a row opens it: calls fail at once without reaching the backend.
        service.clone().oneshot(get()).await.unwrap_err();
        assert_eq!(gate.state(), CircuitState::Open);
        let calls = backend.calls();
        let refused = service.clone().oneshot(get()).await.unwrap_err();
        assert_eq!(backend.calls(), calls);
        let RegistryError::BackendSuspended {
            backend: Source::Gitea,
            retry_after,
            reason,
            ..
        } = &refused
        else {
            panic!("not a suspension: {refused:?}");
        };
        assert_eq!(*retry_after, Duration::from_secs(10));
        assert!(reason.contains("3 consecutive failures"), "{reason}");
        // Health probes are not held back.
        service
            .clone()
            .oneshot(BackendRequest::Health)
            .await
            .unwrap_err();
        assert_eq!(backend.calls(), calls + 1);

        // Cool-down over: half-open, one probe. It fails: open again for twice as long.
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(gate.state(), CircuitState::HalfOpen);
        service.clone().oneshot(get()).await.unwrap_err();
        assert_eq!(backend.calls(), calls + 2);
        let again = service.clone().oneshot(get()).await.unwrap_err();
        assert_eq!(again.retry_after(), Some(Duration::from_secs(20)));
        // Doubling stops at max_open_seconds.
        tokio::time::advance(Duration::from_secs(20)).await;
        service.clone().oneshot(get()).await.unwrap_err();
        let capped = service.clone().oneshot(get()).await.unwrap_err();
        assert_eq!(capped.retry_after(), Some(Duration::from_secs(25)));

        // The backend recovered: the probe closes the breaker and calls flow again.
        tokio::time::advance(Duration::from_secs(25)).await;
        backend.fail_with(None);
        service.clone().oneshot(get()).await.unwrap();
        assert_eq!(gate.state(), CircuitState::Closed);
        let calls = backend.calls();
        service.clone().oneshot(get()).await.unwrap();
        assert_eq!(backend.calls(), calls + 1);

        // And the next opening starts from open_seconds again.
        backend.fail_with(Some(timeout()));
        for _ in 0..3 {
            service.clone().oneshot(get()).await.unwrap_err();
        }
        let reopened = service.clone().oneshot(get()).await.unwrap_err();
        assert_eq!(reopened.retry_after(), Some(Duration::from_secs(10)));
    }

    #[tokio::test(start_paused = true)]
    async fn one_probe_at_a_time_and_an_abandoned_probe_frees_the_slot() {
        let gate = Gate::new(Source::Oci, &config());
        let backend = Backend::default();
        backend.fail_with(Some(RegistryError::unavailable(Source::Oci, "HTTP 500")));
        let service = backend.behind(&gate);
        for _ in 0..3 {
            service.clone().oneshot(get()).await.unwrap_err();
        }
        tokio::time::advance(Duration::from_secs(10)).await;

        // The probe is in flight (called, not yet polled to its end): others are refused.
        let mut probe_service = service.clone();
        let probe = probe_service.call(get());
        let refused = service.clone().oneshot(get()).await.unwrap_err();
        assert_eq!(refused.retry_after(), Some(PROBE_RETRY_AFTER));
        // Its client hung up: the next call is the probe.
        drop(probe);
        backend.fail_with(None);
        service.clone().oneshot(get()).await.unwrap();
        assert_eq!(gate.state(), CircuitState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn an_upstream_retry_after_opens_it_for_that_long_and_not_found_is_no_fault() {
        let gate = Gate::new(Source::Gitea, &config());
        let backend = Backend::default();
        let service = backend.behind(&gate);
        for _ in 0..5 {
            backend.fail_with(Some(RegistryError::not_found("provider/aws")));
            service.clone().oneshot(get()).await.unwrap_err();
            backend.fail_with(Some(RegistryError::auth_failed(Source::Gitea)));
            service.clone().oneshot(get()).await.unwrap_err();
        }
        assert_eq!(gate.state(), CircuitState::Closed);

        backend.fail_with(Some(RegistryError::suspended(
            Source::Gitea,
            "HTTP 429 asking to retry after 42 s",
            Duration::from_secs(42),
        )));
        service.clone().oneshot(get()).await.unwrap_err();
        assert_eq!(gate.state(), CircuitState::Open);
        let calls = backend.calls();
        // Never called sooner than asked, even one second before.
        tokio::time::advance(Duration::from_secs(41)).await;
        let refused = service.clone().oneshot(get()).await.unwrap_err();
        assert_eq!(refused.retry_after(), Some(Duration::from_secs(1)));
        assert!(refused.to_string().contains("429"), "{refused}");
        assert_eq!(backend.calls(), calls);
        tokio::time::advance(Duration::from_secs(1)).await;
        backend.fail_with(None);
        service.clone().oneshot(get()).await.unwrap();
        assert_eq!(backend.calls(), calls + 1);
        assert_eq!(gate.state(), CircuitState::Closed);
    }
}
