//! Helpers for tests of the whole application: configurations, backends that count or fail,
//! and one-call requests through the full stack, each response checked against the OpenAPI
//! document (`contract.rs`).

#[path = "contract.rs"]
pub mod contract;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use extension_registry::body;
use extension_registry::config::Config;
use extension_registry::registry::{
    BackendRequest, BackendResponse, BackendService, RegistryError, Source,
};
use extension_registry::stack::{self, HttpService};
use http::{HeaderMap, Request, StatusCode};
use http_body_util::BodyExt;
use tower::ServiceExt;

/// The sample extensions shipped in the repository.
pub fn samples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/extensions")
}

/// A configuration with only the local backend at `root`, plus `extra` TOML.
pub fn local_config(root: &Path, extra: &str) -> Config {
    let text = format!("[local]\npath = {:?}\n{extra}", root.display().to_string());
    Config::parse(&text, "test.toml", None).expect("test configuration is valid")
}

/// Wraps a backend so tests can see how often it was asked for extensions (the background
/// health probes are not counted).
pub fn counting(inner: BackendService) -> (BackendService, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    let service = tower::service_fn(move |req: BackendRequest| {
        if req != BackendRequest::Health {
            seen.fetch_add(1, Ordering::SeqCst);
        }
        inner.clone().oneshot(req)
    });
    (BackendService::new(service), calls)
}

/// The local backend over `root`.
pub fn local_backend(root: &Path) -> BackendService {
    let config = local_config(root, "");
    let local = extension_registry::backend::local::Local::new(&config.local[0])
        .expect("local root exists");
    BackendService::new(local)
}

/// The app over the sample extensions, with a call counter on the backend.
pub fn sample_app() -> (HttpService, Arc<AtomicUsize>) {
    let (backend, calls) = counting(local_backend(&samples()));
    let app = stack::app(
        &local_config(&samples(), ""),
        vec![(Source::Local, backend)],
    );
    (app, calls)
}

/// An app whose only backend answers every request with `answer`.
pub fn app_with<F, Fut>(config: &Config, answer: F) -> HttpService
where
    F: Fn(BackendRequest) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<BackendResponse, RegistryError>> + Send + 'static,
{
    stack::app(
        config,
        vec![(
            Source::Local,
            BackendService::new(tower::service_fn(answer)),
        )],
    )
}

/// One string field of every item of a JSON array, in order.
pub fn field(list: &serde_json::Value, key: &str) -> Vec<String> {
    list.as_array()
        .unwrap_or_else(|| panic!("not a JSON array: {list}"))
        .iter()
        .map(|item| {
            item[key]
                .as_str()
                .unwrap_or_else(|| panic!("no string {key} in {item}"))
                .to_owned()
        })
        .collect()
}

/// A response read whole.
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.body))
    }

    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_else(|| panic!("no {name} header in {:?}", self.headers))
    }
}

/// Sends one request through the whole stack; the response must match the OpenAPI document.
pub async fn send(app: &HttpService, method: &str, uri: &str) -> Answer {
    send_with(app, method, uri, &[]).await
}

/// Sends one request with `headers` through the whole stack, checked as [`send`] does.
pub async fn send_with(
    app: &HttpService,
    method: &str,
    uri: &str,
    headers: &[(&str, &str)],
) -> Answer {
    let mut req = Request::builder().method(method).uri(uri);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let req = req.body(body::empty()).expect("test request is valid");
    send_request(app, req).await
}

/// Sends a request built by the caller, checked as [`send`] does.
pub async fn send_request(app: &HttpService, req: Request<body::Body>) -> Answer {
    let method = req.method().to_string();
    let path = req.uri().path().to_owned();
    let response = app.clone().oneshot(req).await.expect("infallible");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("body streams").to_bytes();
    contract::check(&method, &path, parts.status, &parts.headers, &body);
    Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

pub async fn get(app: &HttpService, uri: &str) -> Answer {
    send(app, "GET", uri).await
}

/// Waits until the background health probe has reported once (health answers at once from
/// the last probe, and says `starting` before the first), letting it run meanwhile.
pub async fn probed(app: &HttpService) {
    for _ in 0..100_000 {
        if get(app, "/api/v1/health").await.json()["status"] != "starting" {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("the first health probe never ended");
}
