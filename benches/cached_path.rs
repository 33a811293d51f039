//! The cached path through the full stack, in process: `stack::app` with every layer the
//! default configuration turns on (cache, compression, CORS, rate limit), over a backend of
//! 150 extensions, cache warm; and a client over its quota answered 429. Plus what a first rendering costs (the work a warm hit skips),
//! the router, the longest query a client may send, the version ordering alone, and resolves
//! (one by GET, batches by POST) over an extension of 8,000 versions.
//!
//! `cargo bench --bench cached_path -- --warm-up-time 1 --measurement-time 3`
//!
//! Targets on the 2-core CI machines: single GET < 20 µs median, 100-item list < 50 µs,
//! the same with `Accept-Encoding: gzip` < 60 µs.

use std::hint::black_box;
use std::num::NonZeroU32;
use std::sync::Arc;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use http::{header, Request, StatusCode};
use http_body_util::BodyExt;
use tokio::runtime::Runtime;
use tower::ServiceExt;

use extension_registry::api::query::{Query, MAX_QUERY_LEN};
use extension_registry::api::representation::representation;
use extension_registry::api::RouteTable;
use extension_registry::body;
use extension_registry::config::Config;
use extension_registry::middleware::compression::Coding;
use extension_registry::registry::version::sort_newest_first;
use extension_registry::registry::{
    BackendRequest, BackendResponse, BackendService, Extension, ExtensionType, RegistryError,
    Source, Timestamp, Version,
};
use extension_registry::stack::{self, HttpService};

/// How many extensions the backend lists.
const EXTENSIONS: usize = 150;

fn extension(i: usize) -> Extension {
    Extension {
        name: format!("ext{i:03}"),
        ty: ExtensionType::ALL[i % 3],
        version: format!("1.{i}.0"),
        description: format!("Extension number {i}, provisioning things in a realistic way"),
        author: "provisioning-team".into(),
        repository: format!("https://git.example.com/extensions/ext{i:03}_prov"),
        source: Source::Local,
        instance: Source::Local.into(),
        published_at: Timestamp::unix_epoch(),
        download_url: format!("/api/v1/extensions/provider/ext{i:03}/1.{i}.0"),
        size: 4096 + i as u64,
        checksum: Some(format!("sha256:{:064x}", i)),
        tags: vec!["cloud".into(), "bench".into()],
    }
}

/// A backend answering every listing with `EXTENSIONS` extensions and lookups from them.
fn backend() -> BackendService {
    let all: Arc<Vec<Extension>> = Arc::new((0..EXTENSIONS).map(extension).collect());
    BackendService::new(tower::service_fn(move |req: BackendRequest| {
        let all = all.clone();
        async move {
            match req {
                BackendRequest::Get { key, .. } => all
                    .iter()
                    .find(|e| e.name == key.name.as_str() && e.ty == key.ty)
                    .map(|e| BackendResponse::Extension(Arc::new(e.clone())))
                    .ok_or_else(|| RegistryError::not_found(&key)),
                _ => Ok(BackendResponse::List(all)),
            }
        }
    }))
}

/// The configuration of the benched stack: the shipped defaults (cache, compression, CORS,
/// rate limit on, its burst of 100), with a quota no bench loop exhausts, as it earns a
/// request back at once, so the limiter does its bookkeeping on every request without
/// refusing the cases that measure the cached answers.
fn full_stack_config() -> Config {
    let mut config = Config::embedded().expect("the embedded configuration parses");
    config.rate_limit.requests_per_second = NonZeroU32::MAX;
    config
}

/// The same stack with a burst of one: after one request, every request is a 429.
fn rate_limited_config() -> Config {
    let mut config = Config::embedded().expect("the embedded configuration parses");
    config.rate_limit.requests_per_second = NonZeroU32::MIN;
    config.rate_limit.burst = NonZeroU32::MIN;
    config
}

/// Request headers of a case.
type Headers<'a> = &'a [(header::HeaderName, &'a str)];

fn request(uri: &str, headers: Headers) -> Request<body::Body> {
    let mut req = Request::get(uri);
    for (name, value) in headers {
        req = req.header(name, *value);
    }
    req.body(body::empty()).expect("valid request")
}

async fn call(app: &HttpService, req: Request<body::Body>) -> (StatusCode, Bytes) {
    let response = app.clone().oneshot(req).await.expect("infallible");
    let status = response.status();
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("in-memory body")
        .to_bytes();
    (status, bytes)
}

fn full_stack(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let app = stack::app(&full_stack_config(), vec![(Source::Local, backend())]);

    let single = "/api/v1/extensions/provider/ext042";
    let list = "/api/v1/extensions?limit=100";
    let search = "/api/v1/extensions/search?q=ext04";
    let gzip = [(header::ACCEPT_ENCODING, "gzip, deflate, br;q=0.9")];
    let cases: [(&str, &str, Headers); 4] = [
        ("single_get", single, &[]),
        ("list_100", list, &[]),
        ("search", search, &[]),
        ("list_100_gzip", list, &gzip),
    ];
    let mut group = c.benchmark_group("full_stack");
    for (name, uri, headers) in cases {
        warm(&rt, &app, uri, headers, StatusCode::OK);
        group.bench_function(name, |b| {
            b.to_async(&rt)
                .iter(|| async { black_box(call(&app, request(uri, headers)).await) })
        });
    }

    let etag = rt.block_on(async {
        let response = app.clone().oneshot(request(list, &[])).await.expect("ok");
        response.headers()[header::ETAG]
            .to_str()
            .expect("ascii")
            .to_owned()
    });
    let revalidate = [(header::IF_NONE_MATCH, etag.as_str())];
    warm(&rt, &app, list, &revalidate, StatusCode::NOT_MODIFIED);
    group.bench_function("revalidate_304", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(call(&app, request(list, &revalidate)).await) })
    });

    let limited = stack::app(&rate_limited_config(), vec![(Source::Local, backend())]);
    warm(&rt, &limited, single, &[], StatusCode::OK);
    warm(&rt, &limited, single, &[], StatusCode::TOO_MANY_REQUESTS);
    group.bench_function("rate_limited_429", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(call(&limited, request(single, &[])).await) })
    });
    group.finish();
}

/// Fills the caches and checks the case answers as it should, so a broken stack cannot
/// post good numbers.
fn warm(rt: &Runtime, app: &HttpService, uri: &str, headers: Headers, expected: StatusCode) {
    let (status, _) = rt.block_on(call(app, request(uri, headers)));
    assert_eq!(status, expected, "{uri}");
}

/// What a memo miss costs and every hit saves: rendering a 100-item page, its ETag and its
/// gzip form.
fn first_rendering(c: &mut Criterion) {
    let page: Vec<Extension> = (0..100).map(extension).collect();
    c.bench_function("rendering/list_100_json_etag_gzip", |b| {
        b.iter(|| {
            let json = serde_json::to_vec(black_box(&page)).expect("serialises");
            let representation = representation(json, Some(page.len()));
            black_box(representation.encoded(Coding::Gzip).map(|e| e.bytes.len()))
        })
    });
}

fn router(c: &mut Criterion) {
    let routes = RouteTable::new();
    let paths = [
        "/api/v1/extensions",
        "/api/v1/extensions/provider/aws",
        "/api/v1/extensions/taskserv/kubernetes/versions",
        "/api/v1/extensions/cluster/web/0.3.0",
        "/api/v1/nope",
    ];
    c.bench_function("router/match_5_paths", |b| {
        b.iter(|| {
            for path in paths {
                black_box(routes.at(black_box(path)).map(|(route, _)| route));
            }
        })
    });
}

/// The query a client can make costliest to read: as many distinct names as fit in the longest
/// query accepted, every one of them checked against the others for a repeat.
fn longest_query(c: &mut Criterion) {
    let names = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut query = String::new();
    'filled: for first in names {
        for second in names {
            if query.len() + 3 > MAX_QUERY_LEN {
                break 'filled;
            }
            query.extend(['&', char::from(*first), char::from(*second)]);
        }
    }
    assert!(Query::parse(Some(&query)).is_ok());
    c.bench_function("query/parse_1296_distinct_names", |b| {
        b.iter(|| black_box(Query::parse(black_box(Some(&query))).is_ok()))
    });
}

/// Versions of the extension the resolve cases ask about: 4,000 releases, each after its
/// release candidate, newest first as backends answer.
const BIG_RELEASES: usize = 4000;

/// A backend whose every extension has the `BIG_RELEASES` releases and their candidates.
fn big_backend() -> BackendService {
    let versions: Arc<Vec<Version>> = Arc::new(
        (0..BIG_RELEASES)
            .rev()
            .flat_map(|i| [format!("1.{i}.0"), format!("1.{i}.0-rc.1")])
            .map(|version| Version {
                version,
                published_at: Timestamp::unix_epoch(),
                download_url: String::new(),
                size: 0,
                checksum: None,
            })
            .collect(),
    );
    BackendService::new(tower::service_fn(move |_: BackendRequest| {
        let versions = versions.clone();
        async move { Ok::<_, RegistryError>(BackendResponse::Versions(versions)) }
    }))
}

/// Requirements of one constraint on that extension, alone and in batches, through the full
/// stack, versions cached: the matching is all the work.
fn resolve(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let app = stack::app(&full_stack_config(), vec![(Source::Local, big_backend())]);
    let alternatives = ["<0"; 64].join("||");
    let cases = [
        ("batch_200_caret", "^1.2", 200, StatusCode::OK),
        ("batch_200_lt0", "<0", 200, StatusCode::OK),
        // 200 × 64 × 8,000 comparisons: refused, as over the batch's bound.
        (
            "batch_200_64_alternatives",
            alternatives.as_str(),
            200,
            StatusCode::BAD_REQUEST,
        ),
        // 7 × 64 × 8,000, every version checked: near the bound, the costliest answered.
        (
            "batch_7_64_alternatives",
            alternatives.as_str(),
            7,
            StatusCode::OK,
        ),
    ];
    let mut group = c.benchmark_group("resolve");
    group.sample_size(10);
    // One requirement by GET: the newest version matches at once; or none does, and the
    // answer names the nearest.
    for (name, constraint, expected) in [
        ("get_caret", "%5E1.2", StatusCode::OK),
        ("get_lt0", "%3C0", StatusCode::NOT_FOUND),
    ] {
        let uri = format!("/api/v1/resolve/provider/big?constraint={constraint}");
        let get = || {
            Request::get(&uri)
                .body(body::empty())
                .expect("valid request")
        };
        let (status, _) = rt.block_on(call(&app, get()));
        assert_eq!(status, expected, "{name}");
        group.bench_function(name, |b| {
            b.to_async(&rt)
                .iter(|| async { black_box(call(&app, get()).await) })
        });
    }
    for (name, constraint, n, expected) in cases {
        let requirement =
            serde_json::json!({"type": "provider", "name": "big", "constraint": constraint});
        let plan = serde_json::json!({ "requirements": vec![requirement; n] }).to_string();
        let post = || {
            Request::post("/api/v1/resolve")
                .body(body::full(plan.clone()))
                .expect("valid request")
        };
        let (status, _) = rt.block_on(call(&app, post()));
        assert_eq!(status, expected, "{name}");
        group.bench_function(name, |b| {
            b.to_async(&rt)
                .iter(|| async { black_box(call(&app, post()).await) })
        });
    }
    group.finish();
}

fn version_ordering(c: &mut Criterion) {
    let tags = ["1.{i}.0", "v2.{i}.1", "0.{i}.0-rc.1", "nightly-{i}"];
    let versions: Vec<Version> = (0..100)
        .map(|i| Version {
            version: tags[i % tags.len()].replace("{i}", &i.to_string()),
            published_at: Timestamp::from_unix(i as i64 * 3600).expect("valid"),
            download_url: String::new(),
            size: 0,
            checksum: None,
        })
        .collect();
    c.bench_function("version/sort_100_newest_first", |b| {
        b.iter_batched(
            || versions.clone(),
            |mut v| {
                sort_newest_first(&mut v);
                v
            },
            criterion::BatchSize::SmallInput,
        )
    });
}

criterion_group!(
    benches,
    full_stack,
    first_rendering,
    router,
    longest_query,
    version_ordering,
    resolve
);
criterion_main!(benches);
