//! The cache, conditional GET and compression through the whole application: a backend that
//! fails once the cache is warm (over a real socket), revalidation, precompressed answers,
//! the stats endpoint and the cache counters in `/api/v1/metrics`; and what a rendered-answer
//! memo entry really costs against what it is weighed at.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, StatusCode};
use http_body_util::BodyExt;
use tower::ServiceExt;

use extension_registry::api::representation::{Keep, Rendered, Renderings, ENTRY_OVERHEAD};
use extension_registry::body;
use extension_registry::config::Config;
use extension_registry::registry::{
    BackendRequest, BackendResponse, BackendService, Extension, ExtensionType, HealthReport,
    RegistryError, Source, Timestamp,
};
use extension_registry::stack::{self, HttpService};

/// Counts the bytes each thread holds allocated, so a single-threaded test can weigh what it
/// builds while other tests run beside it.
struct Counting;

thread_local! {
    static HELD: Cell<isize> = const { Cell::new(0) };
}

fn held() -> isize {
    HELD.with(Cell::get)
}

// SAFETY: every call is passed on to the system allocator unchanged; the count is a
// thread-local `Cell` without destructor, which allocates nothing.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = HELD.try_with(|h| h.set(h.get() + layout.size() as isize));
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let _ = HELD.try_with(|h| h.set(h.get() - layout.size() as isize));
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let grown = new_size as isize - layout.size() as isize;
        let _ = HELD.try_with(|h| h.set(h.get() + grown));
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// A backend with 150 extensions whose failure the test switches on.
#[derive(Clone, Default)]
struct Backend {
    calls: Arc<AtomicUsize>,
    failing: Arc<AtomicBool>,
}

impl Backend {
    fn service(&self) -> BackendService {
        let this = self.clone();
        BackendService::new(tower::service_fn(move |req: BackendRequest| {
            let this = this.clone();
            async move {
                if req == BackendRequest::Health {
                    return Ok(BackendResponse::Health(HealthReport(Vec::new())));
                }
                this.calls.fetch_add(1, Ordering::SeqCst);
                if this.failing.load(Ordering::SeqCst) {
                    return Err(RegistryError::unavailable(Source::Local, "disk \"gone\""));
                }
                let all = (0..150).map(extension);
                Ok(match req {
                    BackendRequest::Get { key, .. } => BackendResponse::Extension(Arc::new(
                        all.into_iter()
                            .find(|e| e.name == key.name.as_str())
                            .ok_or_else(|| RegistryError::not_found(&key))?,
                    )),
                    _ => BackendResponse::List(Arc::new(all.collect())),
                })
            }
        }))
    }
}

fn extension(i: usize) -> Extension {
    Extension {
        name: format!("ext{i}"),
        ty: ExtensionType::Provider,
        version: "1.0.0".into(),
        description: format!("extension number {i}"),
        author: "team".into(),
        repository: String::new(),
        source: Source::Local,
        instance: Source::Local.into(),
        published_at: Timestamp::unix_epoch(),
        download_url: format!("/api/v1/extensions/provider/ext{i}/1.0.0"),
        size: 0,
        checksum: None,
        tags: Vec::new(),
    }
}

fn config(ttl_seconds: u64) -> Config {
    let mut config = Config::parse(
        "[local]\npath = \"tests/fixtures/extensions\"\n",
        "test",
        None,
    )
    .unwrap();
    config.cache.ttl_seconds = ttl_seconds;
    // Every refresh is waited for, so what a failing backend leaves shows at once.
    config.cache.stale_while_revalidate_seconds = 0;
    config
}

fn app(backend: &Backend, ttl_seconds: u64) -> HttpService {
    stack::app(
        &config(ttl_seconds),
        vec![(Source::Local, backend.service())],
    )
}

async fn get(
    app: &HttpService,
    uri: &str,
    headers: &[(header::HeaderName, &str)],
) -> (http::response::Parts, Bytes) {
    let mut req = Request::get(uri);
    for (name, value) in headers {
        req = req.header(name, *value);
    }
    let response = app
        .clone()
        .oneshot(req.body(body::empty()).unwrap())
        .await
        .unwrap();
    let (parts, body) = response.into_parts();
    (parts, body.collect().await.unwrap().to_bytes())
}

#[tokio::test]
async fn a_failing_backend_behind_a_warm_cache_gets_stale_answers_over_the_socket() {
    let backend = Backend::default();
    // A TTL of zero makes every request a refresh, so the failure is met without waiting.
    let app = app(&backend, 0);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(extension_registry::server::run(
        listener,
        app,
        async {
            stopped.await.ok();
        },
        Duration::from_secs(5),
    ));
    let client = reqwest::Client::new();
    let url = format!("http://{addr}/api/v1/extensions/provider/ext7");

    let fresh = client.get(&url).send().await.unwrap();
    assert_eq!(fresh.status(), 200);
    assert!(fresh.headers().get("cache-status").is_none());
    let fresh = fresh.text().await.unwrap();

    backend.failing.store(true, Ordering::SeqCst);
    let stale = client.get(&url).send().await.unwrap();
    assert_eq!(stale.status(), 200);
    assert_eq!(
        stale.headers()["cache-status"],
        "extension-registry; fwd=stale; fwd-status=502; \
         detail=\"local backend unavailable: disk \\\"gone\\\"\""
    );
    assert_eq!(stale.text().await.unwrap(), fresh);

    // Never cached: nothing to stand in, so the failure stands.
    let cold = client
        .get(format!("http://{addr}/api/v1/extensions/provider/ext8"))
        .send()
        .await
        .unwrap();
    assert_eq!(cold.status(), 502);
    assert_eq!(backend.calls.load(Ordering::SeqCst), 3);

    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn revalidation_compression_and_stats_through_the_stack() {
    let backend = Backend::default();
    let app = app(&backend, 300);
    let list = "/api/v1/extensions?limit=120";

    let (plain, json) = get(&app, list, &[]).await;
    assert_eq!(plain.status, StatusCode::OK);
    assert_eq!(plain.headers["x-total-count"], "150");
    assert_eq!(plain.headers[header::CACHE_CONTROL], "public, max-age=300");
    let items: Vec<serde_json::Value> = serde_json::from_slice(&json).unwrap();
    assert_eq!(items.len(), 120);
    let etag = plain.headers[header::ETAG].to_str().unwrap().to_owned();

    let (not_modified, body) = get(&app, list, &[(header::IF_NONE_MATCH, &etag)]).await;
    assert_eq!(not_modified.status, StatusCode::NOT_MODIFIED);
    assert!(body.is_empty());
    assert_eq!(not_modified.headers[header::ETAG], etag.as_str());

    let (gzip, compressed) = get(&app, list, &[(header::ACCEPT_ENCODING, "gzip")]).await;
    assert_eq!(gzip.headers[header::CONTENT_ENCODING], "gzip");
    assert!(compressed.len() < json.len() / 4);
    let gzip_tag = gzip.headers[header::ETAG].to_str().unwrap().to_owned();
    assert_ne!(gzip_tag, etag);
    let (revalidated, _) = get(
        &app,
        list,
        &[
            (header::ACCEPT_ENCODING, "gzip"),
            (header::IF_NONE_MATCH, &gzip_tag),
        ],
    )
    .await;
    assert_eq!(revalidated.status, StatusCode::NOT_MODIFIED);
    assert_eq!(revalidated.headers[header::ETAG], gzip_tag.as_str());

    let (missing, _) = get(&app, "/api/v1/extensions/provider/nope", &[]).await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    get(&app, "/api/v1/extensions/provider/nope", &[]).await;
    assert_eq!(
        backend.calls.load(Ordering::SeqCst),
        2,
        "one listing and one negative lookup reached the backend"
    );

    let (_, stats) = get(&app, "/api/v1/cache/stats", &[]).await;
    let stats: serde_json::Value = serde_json::from_slice(&stats).unwrap();
    assert_eq!(stats["list_entries"], 1);
    assert_eq!(stats["metadata_entries"], 1);
    assert_eq!(stats["version_entries"], 0);
    assert_eq!(stats["total_entries"], 2);
    assert_eq!(stats["list_hits"], 3);
    assert_eq!(stats["list_misses"], 1);
    assert_eq!(stats["list_hit_ratio"], 0.75);
    assert_eq!(stats["metadata_hits"], 1);

    let (_, metrics) = get(&app, "/api/v1/metrics", &[]).await;
    let metrics = String::from_utf8(metrics.to_vec()).unwrap();
    // The recorder is process-wide: only list lookups, which no other test here makes.
    assert!(
        metrics.contains("cache_hits_total{cache=\"list\"} 3"),
        "{metrics}"
    );
    assert!(
        metrics.contains("cache_misses_total{cache=\"list\"} 1"),
        "{metrics}"
    );
}

/// What a memo entry really costs (every byte allocated for it, moka's bookkeeping included)
/// is at most what it is weighed at, so the byte bound holds in real memory.
#[test]
fn a_memo_entry_weighs_at_least_what_it_costs() {
    let entries = 20_000;
    let renderings = Renderings::new(1 << 30, Duration::from_secs(3600));
    let listing = Arc::new(vec![extension(0)]);
    // Warm up whatever is made once.
    renderings.respond("warm".into(), Keep::Always, &listing, |_| Rendered {
        json: b"[]".to_vec(),
        total: Some(0),
    });
    renderings.stats();
    let (before, weighed_before) = (held(), renderings.stats().rendered_bytes);
    let mut keys = 0;
    for i in 0..entries {
        // What a hostile sweep makes: empty pages under distinct keys.
        let key = format!("list Some(Provider) None {i}..{i}");
        keys += key.len() as u64;
        let response = renderings.respond(key, Keep::Always, &listing, |all| Rendered {
            json: serde_json::to_vec(&all[..0]).unwrap(),
            total: Some(all.len()),
        });
        drop(response);
    }
    let stats = renderings.stats();
    let cost = (held() - before) as u64;
    let weighed = stats.rendered_bytes - weighed_before;
    eprintln!(
        "{entries} entries: {cost} bytes allocated, {} per entry beyond its key and JSON; \
         weighed {weighed} ({ENTRY_OVERHEAD} per entry beyond its key and JSON)",
        (cost - keys - 2 * entries) / entries,
    );
    assert_eq!(stats.rendered_entries, entries + 1);
    assert!(cost <= weighed, "{cost} bytes allocated, weighed {weighed}");
    assert!(
        weighed < 2 * cost,
        "weighed {weighed} for {cost} bytes: the bound would waste memory"
    );
}
