//! Logs and metrics plumbing: the tracing subscriber (human or JSON lines), the per-request
//! span and log line, and the process-wide Prometheus recorder.

use std::sync::OnceLock;
use std::time::Duration;

use http::{Request, Response};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};
use tracing::Span;
use tracing_subscriber::EnvFilter;

/// Installs the global tracing subscriber. `level` is a filter directive (`info`,
/// `extension_registry=debug`, ...); `RUST_LOG` is not consulted so the flag is the one truth.
pub fn init_logging(level: &str, json: bool) -> Result<(), String> {
    let filter = EnvFilter::try_new(level)
        .map_err(|e| format!("invalid --log-level '{level}': {e} (e.g. info, debug, warn)"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    let result = if json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
    result.map_err(|e| format!("cannot install the logger: {e}"))
}

/// Upper bounds of the duration histograms, in seconds: from a cached answer (well under a
/// millisecond) to a backend call running into the request timeout.
const DURATION_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 30.0,
];

/// How often histogram samples are folded into their buckets when nobody scrapes, so they
/// cannot pile up in memory.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// A Prometheus recorder as this service configures it: durations as histograms (with
/// buckets, so they aggregate across instances) rather than summaries.
pub fn recorder() -> PrometheusRecorder {
    PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Suffix("_duration_seconds".into()),
            &DURATION_BUCKETS,
        )
        .unwrap_or_else(|e| panic!("duration buckets are not empty: {e}"))
        .build_recorder()
}

/// The process-wide Prometheus recorder, installed on first use. The exporter's own HTTP
/// listener is not used: `/api/v1/metrics` renders this handle.
pub fn prometheus() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (a test harness); then this handle
            // renders nothing, which is what a process without our recorder would show.
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed");
            }
            describe_metrics();
            handle
        })
        .clone()
}

/// Help text and units of the metrics the HTTP edge, the rate limit and the per-backend
/// layer emit.
fn describe_metrics() {
    use crate::middleware::{backend_metrics as backend, breaker, metrics as http, rate_limit};
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};

    describe_counter!(
        http::HTTP_REQUESTS_TOTAL,
        Unit::Count,
        "HTTP requests answered, by method, route template and status"
    );
    describe_histogram!(
        http::HTTP_REQUEST_DURATION_SECONDS,
        Unit::Seconds,
        "Time from request to response head, by route template"
    );
    describe_counter!(
        rate_limit::RATE_LIMITED_TOTAL,
        Unit::Count,
        "Requests refused with 429 because the client was over its quota"
    );
    describe_counter!(
        backend::BACKEND_REQUESTS_TOTAL,
        Unit::Count,
        "Calls to a backend, by backend, operation and outcome"
    );
    describe_histogram!(
        backend::BACKEND_REQUEST_DURATION_SECONDS,
        Unit::Seconds,
        "Time a backend took to answer, by backend, operation and outcome"
    );
    describe_counter!(
        backend::DOWNLOAD_BYTES_TOTAL,
        Unit::Bytes,
        "Artifact bytes streamed from a backend to clients, counted as they pass"
    );
    describe_counter!(
        backend::EXTENSIONS_TOTAL,
        Unit::Count,
        "Extensions returned by backend listings, by backend and type; divide its increase \
         by that of backend_requests_total{operation=\"list\",outcome=\"ok\"} for the \
         size of a listing"
    );
    describe_counter!(
        "cache_hits_total",
        Unit::Count,
        "Lookups answered from a cache without waiting for the backends (fresh, or stale \
         while refreshed or backing off), by cache (list, metadata, versions)"
    );
    describe_counter!(
        "cache_misses_total",
        Unit::Count,
        "Lookups that had to ask the backends, by cache"
    );
    describe_counter!(
        "stale_served_total",
        Unit::Count,
        "Answers served stale because the backends failed, by cache"
    );
    describe_gauge!(
        breaker::BACKEND_CIRCUIT_STATE,
        "State of each backend's circuit breaker: 0 closed, 1 half-open (probing), 2 open \
         (not called until its cool-down ends)"
    );
    describe_counter!(
        "download_digest_mismatch_total",
        Unit::Count,
        "Downloads aborted because the bytes did not match the expected sha256, by backend"
    );
}

/// Folds histogram samples into buckets every few seconds; runs until the process ends.
pub async fn metrics_upkeep() {
    let handle = prometheus();
    let mut tick = tokio::time::interval(UPKEEP_INTERVAL);
    loop {
        tick.tick().await;
        handle.run_upkeep();
    }
}

/// The span every request runs in: method, path and request id.
pub fn request_span<B>(req: &Request<B>) -> Span {
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-");
    tracing::info_span!(
        "request",
        method = %req.method(),
        path = %req.uri().path(),
        request_id = %id,
    )
}

/// The one log line per request.
pub fn log_response<B>(response: &Response<B>, latency: Duration, _span: &Span) {
    tracing::info!(
        status = response.status().as_u16(),
        latency_ms = latency.as_secs_f64() * 1000.0,
        "request finished"
    );
}
