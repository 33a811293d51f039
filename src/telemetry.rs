//! Logs and metrics plumbing: the tracing subscriber (human or JSON lines), the per-request
//! span and log line, the process-wide Prometheus recorder and the process metrics (memory,
//! file descriptors, CPU) it exports.
//!
//! Log lines carry client data (paths, methods). In JSON lines every value is a JSON string;
//! in text lines a value is quoted and escaped unless it holds only characters that cannot
//! pass for log structure ([`SafeFields`]), so no client can forge a field or a line. Colours
//! are used only when stdout is a terminal (and `NO_COLOR` is unset).

use std::fmt::{self, Write as _};
use std::io::IsTerminal;
use std::sync::OnceLock;
use std::time::Duration;

use http::{Request, Response};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};
use metrics_process::Collector;
use tracing::field::{Field, Visit};
use tracing::Span;
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::{Format, Json, JsonFields, Writer};
use tracing_subscriber::fmt::{FormatFields, MakeWriter, SubscriberBuilder};
use tracing_subscriber::EnvFilter;

use crate::middleware::request_id::{RefusedRequestId, X_REQUEST_ID};

/// Installs the global tracing subscriber. `level` is a filter directive (`info`,
/// `extension_registry=debug`, ...); `RUST_LOG` is not consulted so the flag is the one truth.
pub fn init_logging(level: &str, json: bool) -> Result<(), String> {
    let filter = EnvFilter::try_new(level)
        .map_err(|e| format!("invalid --log-level '{level}': {e} (e.g. info, debug, warn)"))?;
    let result = if json {
        json_logger(filter, std::io::stdout).try_init()
    } else {
        let colour = std::io::stdout().is_terminal()
            && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
        text_logger(filter, colour, std::io::stdout).try_init()
    };
    result.map_err(|e| format!("cannot install the logger: {e}"))
}

/// The JSON-lines logger, writing to `writer`: an event's fields at the top level, and the
/// fields of the spans it happened in once, in `spans` (outermost first; a request's line
/// carries its method, path and id there). The current span alone (`span`) is left out: it
/// is the last of `spans`, and writing it again made every line nearly twice as long.
pub fn json_logger<W>(
    filter: EnvFilter,
    writer: W,
) -> SubscriberBuilder<JsonFields, Format<Json>, EnvFilter, W>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_writer(writer)
}

/// The human-readable logger, writing to `writer`, in colour or not.
pub fn text_logger<W>(
    filter: EnvFilter,
    colour: bool,
    writer: W,
) -> SubscriberBuilder<SafeFields, Format, EnvFilter, W>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(colour)
        .fmt_fields(SafeFields)
        .with_writer(writer)
}

/// Text-log fields as `name=value`, the value quoted and escaped (Rust string syntax) unless
/// every character is one of `A-Z a-z 0-9 . _ : / - + @ % , = [ ] *`; the message is escaped
/// only when it holds control characters.
#[derive(Clone, Copy, Debug, Default)]
pub struct SafeFields;

impl<'w> FormatFields<'w> for SafeFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'w>, fields: R) -> fmt::Result {
        let mut visitor = SafeVisitor {
            writer,
            separator: "",
            result: Ok(()),
        };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct SafeVisitor<'w> {
    writer: Writer<'w>,
    /// Empty before the first field, a space after.
    separator: &'static str,
    result: fmt::Result,
}

impl SafeVisitor<'_> {
    fn write(&mut self, field: &Field, value: &str) {
        if self.result.is_err() {
            return;
        }
        let separator = std::mem::replace(&mut self.separator, " ");
        let plain = |c: char| c.is_ascii_alphanumeric() || "._:/-+@%,=[]*".contains(c);
        self.result = if field.name() == "message" {
            if value.contains(char::is_control) {
                write!(self.writer, "{separator}{value:?}")
            } else {
                write!(self.writer, "{separator}{value}")
            }
        } else if !value.is_empty() && value.chars().all(plain) {
            write!(self.writer, "{separator}{}={value}", field.name())
        } else {
            write!(self.writer, "{separator}{}={value:?}", field.name())
        };
    }
}

impl Visit for SafeVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.write(field, value);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = write!(text, "{value:?}");
        self.write(field, &text);
    }
}

/// Upper bounds of the duration histograms, in seconds: from a cached answer (well under a
/// millisecond) to a backend call running into the request timeout.
const DURATION_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 30.0,
];

/// How often histogram samples are folded into their buckets when nobody scrapes, so they
/// cannot pile up in memory, and the process metrics are read again.
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
            describe_process_metrics();
            // Shown from the start, so dashboards see zeros rather than nothing.
            for limit in crate::error::Overload::ALL {
                metrics::counter!(crate::error::OVERLOADED_TOTAL, "limit" => limit.label())
                    .increment(0);
            }
            handle
        })
        .clone()
}

/// Help text and units of the metrics the HTTP edge, the rate limit and the per-backend
/// layer emit.
fn describe_metrics() {
    use crate::middleware::{
        backend_metrics as backend, breaker, downloads, metrics as http, rate_limit,
    };
    use crate::server::{self, send_timeout};
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
    describe_gauge!(
        rate_limit::RATE_LIMIT_CLIENTS,
        Unit::Count,
        "Clients whose rate-limit state is kept (at most [rate_limit] max_clients), as of \
         the last sweep"
    );
    describe_counter!(
        rate_limit::RATE_LIMITED_TOTAL,
        Unit::Count,
        "Requests refused with 429: the client over its quota, or a download past its share"
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
    describe_gauge!(
        "cache_entries",
        Unit::Count,
        "Entries held by a cache, by cache, as counted at the last scrape"
    );
    describe_counter!(
        "cache_singleflight_waits_total",
        Unit::Count,
        "Lookups that waited for another request's refresh of the same key instead of \
         asking the backends, by cache"
    );
    describe_counter!(
        "stale_served_total",
        Unit::Count,
        "Answers served stale because the backends failed, by cache"
    );
    describe_gauge!(
        server::HTTP_CONNECTIONS_OPEN,
        Unit::Count,
        "Client connections open now"
    );
    describe_gauge!(
        server::HTTP_CONNECTIONS_MAX,
        Unit::Count,
        "Client connections the server accepts at once ([server] max_connections, or fewer when \
         the open-file limit leaves room for fewer)"
    );
    describe_counter!(
        server::HTTP_CONNECTIONS_REFUSED_TOTAL,
        Unit::Count,
        "Connections closed at once because http_connections_max were open"
    );
    describe_gauge!(
        downloads::DOWNLOADS_IN_FLIGHT,
        Unit::Count,
        "Downloads streaming now, HTTP/2 streams each counted; at most max_concurrent_downloads"
    );
    describe_counter!(
        send_timeout::DOWNLOAD_STALLED_TOTAL,
        Unit::Count,
        "Downloads aborted because the client took no bytes for send_timeout_seconds"
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
    describe_counter!(
        crate::error::OVERLOADED_TOTAL,
        Unit::Count,
        "Requests answered 503 overloaded, by the limit they found full: requests (load \
         shedding), downloads, request_bodies"
    );
    describe_counter!(
        backend::DOWNLOAD_BACKEND_ERRORS_TOTAL,
        Unit::Count,
        "Downloads cut short because the backend's stream failed after the answer began, by \
         backend"
    );
    describe_gauge!(
        crate::backend::github::BACKEND_RATE_LIMIT_REMAINING,
        "Requests the upstream says are left in its rate-limit window, by backend (GitHub)"
    );
    describe_counter!(
        crate::backend::github::BACKEND_REVALIDATIONS_TOTAL,
        Unit::Count,
        "Conditional upstream requests by outcome: not_modified (304, answer reused) or changed"
    );
    describe_counter!(
        rate_limit::RATE_LIMIT_DECISIONS_TOTAL,
        Unit::Count,
        "Rate-limit decisions by who decided (local: this replica's governor, shared: the \
         cluster's quota in Redis, fallback: the governor while Redis did not answer) and outcome"
    );
    describe_counter!(
        "redis_commands_total",
        Unit::Count,
        "Redis commands by outcome (ok, error, timeout; skipped: not sent, Redis unavailable)"
    );
    describe_gauge!(
        "redis_available",
        "1 while Redis answers and takes writes; 0 from start until it first does, and after a \
         failure until a background probe does"
    );
    describe_counter!(
        "redis_cache_hits_total",
        Unit::Count,
        "Shared-cache lookups answered from Redis"
    );
    describe_counter!(
        "redis_cache_misses_total",
        Unit::Count,
        "Shared-cache misses this replica fetched from the backends under the refresh lock"
    );
    describe_counter!(
        "redis_cache_lock_waits_total",
        Unit::Count,
        "Waits for another replica's refresh of the same key"
    );
    describe_counter!(
        "redis_cache_lock_takeovers_total",
        Unit::Count,
        "Backends asked after such a wait: the holder left no answer or fault (it died, ran \
         out of time, failed in a way not shared, or an invalidation kept its answer)"
    );
    describe_counter!(
        "redis_cache_faults_shared_total",
        Unit::Count,
        "Backend failures and timeouts a replica that waited on the refresh lock took from its \
         holder instead of asking the backends again"
    );
    describe_counter!(
        "redis_invalidations_sent_total",
        Unit::Count,
        "Invalidations published to the other replicas, by outcome"
    );
    describe_counter!(
        "redis_invalidations_received_total",
        Unit::Count,
        "Other replicas' invalidations applied here, by scope"
    );
}

/// Something held (a connection's or a download's slot) and counted in a gauge while it lives.
pub struct Gauged<T> {
    _held: T,
    gauge: metrics::Gauge,
}

impl<T> Gauged<T> {
    pub fn new(held: T, gauge: &'static str) -> Self {
        let gauge = metrics::gauge!(gauge);
        gauge.increment(1);
        Self { _held: held, gauge }
    }
}

impl<T> Drop for Gauged<T> {
    fn drop(&mut self) {
        self.gauge.decrement(1);
    }
}

/// Folds histogram samples into buckets and reads the process metrics every few seconds; runs
/// until the process ends.
pub async fn metrics_upkeep() {
    let handle = prometheus();
    let mut tick = tokio::time::interval(UPKEEP_INTERVAL);
    loop {
        tick.tick().await;
        handle.run_upkeep();
        collect_process_metrics();
    }
}

/// The collector of the standard process metrics: `process_resident_memory_bytes`,
/// `process_virtual_memory_bytes`, `process_virtual_memory_max_bytes`, `process_open_fds`,
/// `process_max_fds`, `process_cpu_seconds_total`, `process_threads` and
/// `process_start_time_seconds`, read from `/proc` on Linux.
fn process_collector() -> &'static Collector {
    static COLLECTOR: OnceLock<Collector> = OnceLock::new();
    COLLECTOR.get_or_init(Collector::default)
}

/// Help text of the process metrics, and their first values, so that a scrape right after
/// start shows them.
fn describe_process_metrics() {
    process_collector().describe();
    collect_process_metrics();
}

/// Reads the process metrics again (a few files under `/proc/self`).
fn collect_process_metrics() {
    process_collector().collect();
}

/// Most bytes of a request's method a log line carries: every method the service answers is
/// a few letters, and hyper takes one as long as the request head may be.
const LOGGED_METHOD_BYTES: usize = 32;

/// Most bytes of a request's path a log line carries: as long as the longest path the API
/// takes (`api::query::MAX_PATH_LEN`); hyper takes one up to 64 KiB, and answers it with 414
/// only past that.
const LOGGED_PATH_BYTES: usize = 1024;

/// The span every request runs in: method, path and request id, and the length of a client's
/// request id that was refused and replaced (see `middleware::request_id`). A method or path
/// longer than its [`LOGGED_METHOD_BYTES`] or [`LOGGED_PATH_BYTES`] is cut there and its
/// length recorded (`method_len`, `path_len`), so that one request, refused or not, writes a
/// line of a few KB at most (escaping can triple a path), whatever its head holds.
pub fn request_span<B>(req: &Request<B>) -> Span {
    // The fields are worked out only when the span is on: with request spans filtered out
    // (as the benchmarks run), the header lookup and the cuts would be spent on every
    // request for nothing.
    let method = || cut(req.method().as_str(), LOGGED_METHOD_BYTES);
    let path = || cut(req.uri().path(), LOGGED_PATH_BYTES);
    tracing::info_span!(
        "request",
        method = %method().0,
        path = %path().0,
        request_id = %request_id(req),
        refused_request_id_len = req
            .extensions()
            .get::<RefusedRequestId>()
            .map(|RefusedRequestId(length)| *length),
        method_len = method().1,
        path_len = path().1,
    )
}

/// The request's id, as the request id layer set it.
fn request_id<B>(req: &Request<B>) -> &str {
    req.headers()
        .get(&X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
}

/// `text` cut to at most `max` bytes (at a character's start), and its whole length when cut.
fn cut(text: &str, max: usize) -> (&str, Option<usize>) {
    if text.len() <= max {
        return (text, None);
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    (&text[..end], Some(text.len()))
}

/// The one log line per request.
pub fn log_response<B>(response: &Response<B>, latency: Duration) {
    tracing::info!(
        status = response.status().as_u16(),
        latency_ms = milliseconds(latency),
        "request finished"
    );
}

/// Whether the log filter lets [`log_response`]'s line through.
pub fn logs_responses() -> bool {
    tracing::enabled!(tracing::Level::INFO)
}

/// The end of a response body, `latency` after its request came.
pub fn log_end_of_stream(latency: Duration) {
    tracing::debug!(stream_duration_ms = milliseconds(latency), "end of stream");
}

/// `duration` in milliseconds to the microsecond, so a log shows `0.187`, not the
/// `0.18703799999999998` of the seconds' float scaled.
fn milliseconds(duration: Duration) -> f64 {
    duration.as_micros() as f64 / 1000.0
}

#[cfg(test)]
mod process_metrics_tests {
    use super::*;

    /// The value of an unlabelled sample in a Prometheus exposition.
    fn sample(text: &str, name: &str) -> f64 {
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no sample of {name} in\n{text}"))
            .parse()
            .unwrap()
    }

    #[test]
    fn process_metrics_are_exported_with_help_and_live_values() {
        let recorder = recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, describe_process_metrics);
        let text = handle.render();
        for name in [
            "process_resident_memory_bytes",
            "process_open_fds",
            "process_max_fds",
            "process_cpu_seconds_total",
            "process_threads",
            "process_start_time_seconds",
        ] {
            assert!(
                text.contains(&format!("# HELP {name} ")),
                "no help for {name}"
            );
        }
        // This test's own process: some memory, stdin/stdout/stderr open, at least one thread.
        assert!(sample(&text, "process_resident_memory_bytes") > 1_000_000.0);
        assert!(sample(&text, "process_open_fds") >= 3.0);
        assert!(sample(&text, "process_max_fds") >= sample(&text, "process_open_fds"));
        assert!(sample(&text, "process_threads") >= 1.0);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::{Arc, Mutex};

    use http::{Request, StatusCode};
    use tower::ServiceExt;

    use super::*;
    use crate::config::Config;

    /// A log destination the test reads back.
    #[derive(Clone, Default)]
    pub(crate) struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Captured {
        /// What was logged so far.
        pub(crate) fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The status of `req` through the app over the sample extensions, the text the info log
    /// got, and its one "request finished" line.
    async fn logged(req: Request<crate::body::Body>) -> (StatusCode, String, String) {
        logged_as(req, false).await
    }

    /// As [`logged`], in the JSON log when `json`.
    async fn logged_as(
        req: Request<crate::body::Body>,
        json: bool,
    ) -> (StatusCode, String, String) {
        let captured = Captured::default();
        let sink = captured.clone();
        let writer = move || sink.clone();
        let logger: tracing::Dispatch = if json {
            json_logger(EnvFilter::new("info"), writer).finish().into()
        } else {
            text_logger(EnvFilter::new("info"), false, writer)
                .finish()
                .into()
        };
        let _installed = tracing::dispatcher::set_default(&logger);
        let config = Config::parse(
            "[local]\npath = \"tests/fixtures/extensions\"\n",
            "test",
            None,
        )
        .unwrap();
        let app = crate::build(&config).unwrap();
        let status = app.oneshot(req).await.unwrap().status();
        let log = captured.text();
        let lines: Vec<_> = log
            .lines()
            .filter(|l| l.contains("request finished"))
            .collect();
        assert_eq!(lines.len(), 1, "{log}");
        let line = lines[0].to_owned();
        (status, log, line)
    }

    #[tokio::test]
    async fn client_data_cannot_forge_log_fields_or_lines() {
        let forged = "abc def}: request finished status=200";
        let req = Request::get("/api/v1/a}{\"b")
            .header("x-request-id", forged)
            .body(crate::body::empty())
            .unwrap();
        let (status, log, line) = logged(req).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(line.contains(r#"path="/api/v1/a}{\"b""#), "{line}");
        assert!(
            line.contains(&format!("refused_request_id_len={}", forged.len())),
            "{line}"
        );
        assert!(line.contains("status=404"), "{line}");
        assert!(!line.contains("abc def"), "{line}");
        assert!(!log.contains('\x1b'), "{log:?}");
    }

    #[tokio::test]
    async fn a_long_method_or_path_is_logged_cut_with_its_length() {
        let method = "M".repeat(60_000);
        let path = format!("/api/v1/{}", "a".repeat(60_000));
        let req = Request::builder()
            .method(method.as_str())
            .uri(path.as_str())
            .body(crate::body::empty())
            .unwrap();
        let (status, _, line) = logged(req).await;
        assert!(status.is_client_error(), "{status}");
        assert!(line.len() < 1_500, "a line of {} bytes", line.len());
        assert!(line.contains(&"M".repeat(LOGGED_METHOD_BYTES)), "{line}");
        assert!(line.contains("method_len=60000"), "{line}");
        assert!(line.contains("path_len=60008"), "{line}");
    }

    #[tokio::test]
    async fn a_json_line_carries_the_request_once_and_its_latency_to_the_microsecond() {
        let req = Request::get("/api/v1/extensions/provider/nope")
            .header("x-request-id", "json-line-1")
            .body(crate::body::empty())
            .unwrap();
        let (status, _, line) = logged_as(req, true).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(line.matches("json-line-1").count(), 1, "{line}");
        let line: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(line["status"], 404);
        let request = &line["spans"][0];
        assert_eq!(request["name"], "request");
        assert_eq!(request["path"], "/api/v1/extensions/provider/nope");
        assert_eq!(request["request_id"], "json-line-1");
        assert!(line.get("span").is_none(), "{line}");
        let latency = line["latency_ms"].to_string();
        let decimals = latency.split_once('.').map_or(0, |(_, d)| d.len());
        assert!(decimals <= 3, "{latency}");
    }

    #[test]
    fn milliseconds_are_counted_to_the_microsecond() {
        assert_eq!(
            milliseconds(Duration::from_nanos(187_038_999)).to_string(),
            "187.038"
        );
        assert_eq!(
            milliseconds(Duration::from_nanos(187_038)).to_string(),
            "0.187"
        );
    }

    #[test]
    fn the_logged_path_is_as_long_as_the_longest_the_api_takes() {
        assert_eq!(LOGGED_PATH_BYTES, crate::api::query::MAX_PATH_LEN);
    }

    #[test]
    fn text_is_cut_at_a_character_start() {
        assert_eq!(cut("GET", 32), ("GET", None));
        assert_eq!(cut("abcdef", 6), ("abcdef", None));
        assert_eq!(cut("abcdef", 4), ("abcd", Some(6)));
        // `é` is two bytes: a cut inside it keeps the character out.
        assert_eq!(cut("aéb", 2), ("a", Some(4)));
    }
}
