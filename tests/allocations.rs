//! Heap allocations per cached request through the full default stack, in process (the way
//! `benches/cached_path.rs` drives it): a counting global allocator, this test binary only,
//! counts what one request costs on the calling thread once the caches are warm. The bounds
//! are the measured counts, so an allocation added to the hot path fails here instead of
//! creeping in; when a change removes some, lower the bound to the new count.
//!
//! What is not counted: hyper's connection handling (the requests are `oneshot` calls) and a
//! log subscriber (none is installed; production at `info` adds the span's and the log line's
//! formatting).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::num::NonZeroU32;
use std::path::Path;

use extension_registry::backend::local::Local;
use extension_registry::body;
use extension_registry::config::Config;
use extension_registry::registry::{BackendService, Source};
use extension_registry::stack::{self, HttpService};
use http::{header, HeaderName, Request, StatusCode};
use http_body_util::BodyExt;
use tower::ServiceExt;

/// Counts the allocations of the threads that asked to be counted.
struct Counting;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

fn note() {
    // `try_with`: the allocator is also called while thread-locals are torn down.
    let _ = COUNTING.try_with(|on| {
        if on.get() {
            let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        }
    });
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note();
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note();
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note();
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Extensions in the local tree, the shape `benches/compare.sh` serves.
const EXTENSIONS: usize = 120;
/// Requests measured per case; the count per request is their average, rounded up.
const REQUESTS: usize = 200;

/// A local backend root with `EXTENSIONS` providers, each one version and realistic fields.
fn local_tree() -> tempfile::TempDir {
    let root = tempfile::tempdir().expect("temporary directory");
    for i in 0..EXTENSIONS {
        let dir = root.path().join(format!("provider/ext{i:03}"));
        let version = dir.join(format!("1.{i}.0"));
        std::fs::create_dir_all(&version).expect("create the extension");
        std::fs::write(
            version.join(format!("ext{i:03}-1.{i}.0.tar.gz")),
            [0u8; 4096],
        )
        .expect("write the artifact");
        std::fs::write(
            dir.join("extension.toml"),
            format!(
                "description = \"Extension number {i}, provisioning things in a realistic way\"\n\
                 author = \"provisioning-team\"\n\
                 repository = \"https://git.example.com/extensions/ext{i:03}_prov\"\n\
                 tags = [\"cloud\", \"bench\"]\n"
            ),
        )
        .expect("write the metadata");
    }
    root
}

/// The shipped defaults (cache, compression, CORS, rate limit on, its burst of 100) with a
/// quota the test cannot exhaust, as it earns a request back at once, so the limiter does its
/// bookkeeping on every request and its `RateLimit-*` values are small, as a client's are
/// (`RateLimit-Reset` is 0 here, a second or two for a client at the shipped rate).
fn config(root: &Path) -> Config {
    let text = format!("[local]\npath = {:?}\n", root.display().to_string());
    let mut config = Config::parse(&text, "allocations.toml", None).expect("valid configuration");
    config.rate_limit.requests_per_second = NonZeroU32::MAX;
    config
}

fn request(uri: &str, headers: &[(HeaderName, &str)]) -> Request<body::Body> {
    let mut req = Request::get(uri);
    for (name, value) in headers {
        req = req.header(name, *value);
    }
    req.body(body::empty()).expect("valid request")
}

/// One request, its body read to the end; returns the status.
async fn call(app: &HttpService, req: Request<body::Body>) -> StatusCode {
    let response = app.clone().oneshot(req).await.expect("infallible");
    let status = response.status();
    response
        .into_body()
        .collect()
        .await
        .expect("in-memory body");
    status
}

/// The average allocations of one request (building it included), rounded up, after one
/// warming request that must answer `expected`.
async fn allocations_per_request(
    app: &HttpService,
    uri: &str,
    headers: &[(HeaderName, &str)],
    expected: StatusCode,
) -> usize {
    assert_eq!(call(app, request(uri, headers)).await, expected, "{uri}");
    ALLOCATIONS.with(|n| n.set(0));
    COUNTING.with(|on| on.set(true));
    for _ in 0..REQUESTS {
        let status = call(app, request(uri, headers)).await;
        debug_assert_eq!(status, expected);
    }
    COUNTING.with(|on| on.set(false));
    ALLOCATIONS.with(|n| n.get()).div_ceil(REQUESTS)
}

/// One measured request: its name, URI, headers, expected status, and allocation bound.
type Case<'a> = (
    &'a str,
    &'a str,
    &'a [(HeaderName, &'a str)],
    StatusCode,
    usize,
);

#[test]
fn cached_answers_allocate_a_small_fixed_number_of_times() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let root = local_tree();
        let config = config(root.path());
        let local = Local::new(config.local.first().expect("[local] is set")).expect("local root");
        let app = stack::app(&config, vec![(Source::Local, BackendService::new(local))]);
        let single = "/api/v1/extensions/provider/ext042";
        let list = "/api/v1/extensions?limit=100";
        let etag = app
            .clone()
            .oneshot(request(list, &[]))
            .await
            .expect("infallible")
            .headers()[header::ETAG]
            .to_str()
            .expect("ascii")
            .to_owned();
        let cases: [Case; 4] = [
            ("single GET", single, &[], StatusCode::OK, 20),
            ("list of 100", list, &[], StatusCode::OK, 19),
            (
                "list of 100, gzip",
                list,
                &[(header::ACCEPT_ENCODING, "gzip, deflate, br;q=0.9")],
                StatusCode::OK,
                23,
            ),
            (
                "304",
                list,
                &[(header::IF_NONE_MATCH, etag.as_str())],
                StatusCode::NOT_MODIFIED,
                27,
            ),
        ];
        let mut report = String::new();
        let mut over = false;
        for (name, uri, headers, expected, bound) in cases {
            let count = allocations_per_request(&app, uri, headers, expected).await;
            report.push_str(&format!("{name}: {count} allocations (bound {bound})\n"));
            over |= count > bound;
        }
        println!("{report}");
        assert!(
            !over,
            "allocations per cached request over their bound:\n{report}"
        );
    });
}
