//! Logs and metrics plumbing: the tracing subscriber (human or JSON lines), the per-request
//! span and log line, and the process-wide Prometheus recorder.

use std::sync::OnceLock;
use std::time::Duration;

use http::{Request, Response};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
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

/// The process-wide Prometheus recorder, installed on first use. The exporter's own HTTP
/// listener is not used: `/api/v1/metrics` renders this handle.
pub fn prometheus() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (a test harness); then this handle
            // renders nothing, which is what a process without our recorder would show.
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed");
            }
            handle
        })
        .clone()
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
