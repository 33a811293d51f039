//! Capturing what the service logs during a test, to look for secrets that must not be there
//! and for details that must be (with the request id) rather than in a client's answer; and
//! that answer, as a client of the whole application sees it.

use std::sync::{Arc, Mutex, OnceLock};

use http_body_util::BodyExt;
use tower::ServiceExt;

/// What a client is told about a backend failure.
pub struct Failure {
    /// The JSON body's `message`.
    pub message: String,
    /// The whole body, as sent.
    pub body: String,
    /// The response's `x-request-id`, which the log lines of the request carry.
    pub request_id: String,
}

/// GETs `uri` from the whole application configured by `toml`, asserting that it answers
/// `502 backend_unavailable`.
pub async fn backend_failure(toml: &str, uri: &str) -> Failure {
    let config = extension_registry::config::Config::parse(toml, "test.toml", None).unwrap();
    let app = extension_registry::build(&config).unwrap();
    let request = http::Request::get(uri)
        .body(extension_registry::body::empty())
        .unwrap();
    let response = app.oneshot(request).await.unwrap();
    assert_eq!(response.status(), 502);
    let request_id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(json["error"], "backend_unavailable", "{json}");
    Failure {
        message: json["message"].as_str().unwrap().to_owned(),
        body: String::from_utf8_lossy(&bytes).into_owned(),
        request_id,
    }
}

/// Everything logged on this thread, at every level, while the guard lives. (`#[tokio::test]`
/// runs the service's tasks on the test's thread.)
pub struct LogCapture {
    lines: Arc<Mutex<Vec<u8>>>,
    _guard: tracing::subscriber::DefaultGuard,
}

/// Appends to the shared buffer; one per event, as `fmt` asks its writer factory.
struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A dispatcher that lives as long as the test binary, so that tracing never sees just one.
/// With one registered dispatcher, tracing decides whether a callsite is ever enabled by the
/// default of the thread that first reaches it: a test thread without a capture would then
/// switch a log line off for the capturing test too, and "nothing was logged".
static SECOND_DISPATCHER: OnceLock<tracing::Dispatch> = OnceLock::new();

impl LogCapture {
    pub fn start() -> Self {
        SECOND_DISPATCHER
            .get_or_init(|| tracing::Dispatch::new(tracing::subscriber::NoSubscriber::default()));
        let lines = Arc::new(Mutex::new(Vec::new()));
        let writer = lines.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || LogWriter(writer.clone()))
            .finish();
        LogCapture {
            lines,
            _guard: tracing::subscriber::set_default(subscriber),
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.lines.lock().unwrap()).into_owned()
    }

    pub fn assert_free_of(&self, secrets: &[&str]) {
        let text = self.text();
        assert!(
            !text.is_empty(),
            "nothing was logged: the check would prove nothing"
        );
        for secret in secrets {
            assert!(!text.contains(secret), "a secret was logged");
        }
    }

    /// Asserts that one logged line holds every one of `parts`.
    pub fn assert_line_with(&self, parts: &[&str]) {
        let text = self.text();
        assert!(
            text.lines().any(|l| parts.iter().all(|p| l.contains(p))),
            "no line holds all of {parts:?}:\n{text}"
        );
    }
}
