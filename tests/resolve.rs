//! Version-constraint resolution through the whole stack over the sample extensions: the
//! single route, the versions filter, the batch route with its limits, its quota cost and its
//! use of the cache.

#[allow(dead_code)]
#[path = "support/app.rs"]
mod app;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use app::{app_with, get, local_config, samples, send, Answer};
use bytes::Bytes;
use extension_registry::body::{self, Body};
use extension_registry::registry::{BackendResponse, Source, Timestamp, Version};
use extension_registry::stack::{self, HttpService};
use extension_registry::BoxError;
use http::{Request, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use serde_json::{json, Value};
use tower::ServiceExt;

/// Sends a POST with `body` through the whole stack.
async fn post(app: &HttpService, uri: &str, body: Body) -> Answer {
    let req = Request::post(uri)
        .body(body)
        .expect("test request is valid");
    let response = app.clone().oneshot(req).await.expect("infallible");
    let (parts, body) = response.into_parts();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.expect("body streams").to_bytes(),
    }
}

async fn post_json(app: &HttpService, value: &Value) -> Answer {
    post(app, "/api/v1/resolve", body::full(value.to_string())).await
}

fn requirement(ty: &str, name: &str, constraint: &str) -> Value {
    json!({"type": ty, "name": name, "constraint": constraint})
}

/// The app over the samples with `extra` configuration, with a call counter on the backend.
fn app_configured(extra: &str) -> (HttpService, Arc<AtomicUsize>) {
    let (backend, calls) = app::counting(app::local_backend(&samples()));
    let app = stack::app(
        &local_config(&samples(), extra),
        vec![(Source::Local, backend)],
    );
    (app, calls)
}

/// Without rate limiting, for tests that send more than a quota's worth.
const UNLIMITED: &str = "[rate_limit]\nenabled = false\n";

/// The app over a backend whose every extension has `releases` releases, each after its
/// release candidate (`1.0.0-rc.1`, `1.0.0`, … `1.{releases - 1}.0`), without rate limiting.
fn app_with_releases(releases: usize) -> HttpService {
    let versions: Arc<Vec<Version>> = Arc::new(
        (0..releases)
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
    app_with(&local_config(&samples(), UNLIMITED), move |_| {
        let versions = versions.clone();
        async move { Ok(BackendResponse::Versions(versions)) }
    })
}

fn resolve_uri(path: &str, constraint: &str, extra: &str) -> String {
    let encoded: String = constraint
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' | b'_' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    format!("/api/v1/{path}?constraint={encoded}{extra}")
}

async fn resolve(app: &HttpService, path: &str, constraint: &str, extra: &str) -> Answer {
    get(
        app,
        &resolve_uri(&format!("resolve/{path}"), constraint, extra),
    )
    .await
}

#[tokio::test]
async fn resolves_the_highest_version_satisfying_a_constraint() {
    let (app, _) = app::sample_app();
    let answer = resolve(&app, "provider/aws", "^1.0", "").await;
    assert_eq!(answer.status, StatusCode::OK);
    let json = answer.json();
    assert_eq!(json["type"], "provider");
    assert_eq!(json["name"], "aws");
    assert_eq!(json["version"], "v1.2.0");
    assert_eq!(json["published_at"], "2024-09-20T14:00:00Z");
    assert!(json["checksum"].as_str().unwrap().starts_with("sha256:"));
    assert!(json["size"].as_u64().unwrap() > 0);
    assert!(json["download_url"].as_str().unwrap().contains("aws"));
    assert_eq!(answer.header("content-type"), "application/json");
    assert!(answer.headers.contains_key("etag"));

    // (path, constraint, extra parameters, expected version)
    let cases = [
        ("provider/aws", "~> 1.0", "", "v1.2.0"),
        ("provider/aws", ">= 1.0, != v1.2.0, < 2.0", "", "1.1.0"),
        ("provider/aws", "=1.1.0", "&source=local", "1.1.0"),
        ("provider/aws", "1.0 - 1.1", "", "1.1.0"),
        ("provider/aws", "*", "&prerelease=true", "2.0.0-rc.1"),
        ("provider/aws", "^2.0.0-rc.0", "", "2.0.0-rc.1"),
        ("taskserv/kubernetes", "~> 1.28.0", "", "1.28.4"),
        (
            "taskserv/kubernetes",
            "1.x || 2.x",
            "&prerelease=false",
            "1.29.0",
        ),
        ("taskserv/containerd", "v1.7.13", "", "v1.7.13"),
    ];
    for (path, constraint, extra, expected) in cases {
        let answer = resolve(&app, path, constraint, extra).await;
        assert_eq!(
            answer.status,
            StatusCode::OK,
            "{constraint}: {:?}",
            answer.body
        );
        assert_eq!(answer.json()["version"], expected, "{path} {constraint}");
    }

    let head = send(&app, "HEAD", &resolve_uri("resolve/provider/aws", "^1", "")).await;
    assert_eq!(head.status, StatusCode::OK);
    assert!(head.body.is_empty());
}

#[tokio::test]
async fn no_match_is_404_naming_the_nearest_versions() {
    let (app, _) = app::sample_app();
    let answer = resolve(&app, "provider/aws", ">=1.5", "").await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND);
    let json = answer.json();
    assert_eq!(json["error"], "no_matching_version");
    let message = json["message"].as_str().unwrap();
    for expected in [
        "provider/aws",
        "'>=1.5'",
        "v1.2.0",
        "2.0.0-rc.1 would",
        "prerelease=true",
    ] {
        assert!(message.contains(expected), "{expected} not in {message}");
    }

    let answer = resolve(&app, "taskserv/kubernetes", "< 1.0", "").await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND);
    let message = answer.json()["message"].as_str().unwrap().to_owned();
    assert!(
        message.contains("nearest available: 1.30.0-beta.1, 1.29.0, 1.28.4"),
        "{message}"
    );

    // An extension that does not exist is not_found, as on every other route.
    let answer = resolve(&app, "provider/nope", "*", "").await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND);
    assert_eq!(answer.json()["error"], "not_found");
}

#[tokio::test]
async fn bad_constraints_and_parameters_are_400() {
    let (app, calls) = app::sample_app();
    let too_long = "1".repeat(300);
    for bad in [">=", "^1 ||", "1.2 - ", ">= nightly", "~>", &too_long] {
        let answer = resolve(&app, "provider/aws", bad, "").await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{bad}");
        let json = answer.json();
        assert_eq!(json["error"], "invalid_constraint", "{bad}");
        let message = json["message"].as_str().unwrap();
        assert!(
            message.contains("~> 1.4") && message.contains("^1.2"),
            "{message}"
        );
    }
    let missing = get(&app, "/api/v1/resolve/provider/aws").await;
    assert_eq!(missing.status, StatusCode::BAD_REQUEST);
    assert_eq!(missing.json()["error"], "invalid_constraint");
    let answer = resolve(&app, "provider/aws", "^1", "&prerelease=yes").await;
    assert_eq!(answer.json()["error"], "invalid_parameter");
    let answer = resolve(&app, "provider/aws", "^1", "&source=ftp").await;
    assert_eq!(answer.json()["error"], "invalid_parameter");
    let answer = resolve(&app, "plugin/aws", "^1", "").await;
    assert_eq!(answer.json()["error"], "invalid_type");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        0,
        "nothing reached the backend"
    );

    // The batch route answers POST only; every other route keeps refusing POST.
    let refused = get(&app, "/api/v1/resolve").await;
    assert_eq!(refused.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(refused.header("allow"), "POST");
    for path in ["/api/v1/extensions", "/api/v1/resolve/provider/aws"] {
        let refused = post(&app, path, body::empty()).await;
        assert_eq!(refused.status, StatusCode::METHOD_NOT_ALLOWED, "{path}");
        assert_eq!(refused.header("allow"), "GET, HEAD");
    }
}

#[tokio::test]
async fn versions_are_filtered_by_the_same_rules() {
    let (app, _) = app::sample_app();
    let versions = |constraint: &'static str, extra: &'static str| {
        let app = app.clone();
        async move {
            let uri = resolve_uri("extensions/provider/aws/versions", constraint, extra);
            let answer = get(&app, &uri).await;
            assert_eq!(answer.status, StatusCode::OK, "{uri}");
            app::field(&answer.json(), "version")
        }
    };
    assert_eq!(versions(">=1.1", "").await, ["v1.2.0", "1.1.0"]);
    assert_eq!(
        versions(">=1.1", "&prerelease=true").await,
        ["2.0.0-rc.1", "v1.2.0", "1.1.0"]
    );
    assert_eq!(
        versions("~> 1.0.0 || =1.2.0", "").await,
        ["v1.2.0", "1.0.0"]
    );
    assert!(versions("3.x", "").await.is_empty());
    let all = get(&app, "/api/v1/extensions/provider/aws/versions").await;
    assert_eq!(app::field(&all.json(), "version").len(), 4);

    let bad = get(
        &app,
        &resolve_uri("extensions/provider/aws/versions", "^^1", ""),
    )
    .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert_eq!(bad.json()["error"], "invalid_constraint");
}

#[tokio::test]
async fn a_batch_answers_every_requirement_in_order_through_the_cache() {
    let (app, calls) = app::sample_app();
    let plan = json!({"requirements": [
        requirement("provider", "aws", "^1"),
        requirement("taskserv", "kubernetes", "~> 1.28.0"),
        requirement("taskserv", "containerd", "9.x"),
        requirement("plugin", "aws", "^1"),
        requirement("provider", "nope", "*"),
        requirement("provider", "aws", ">= oops"),
        {"type": "provider", "name": "upcloud", "constraint": "<1", "source": "local"},
        {"type": "provider", "name": "upcloud", "constraint": "*", "source": "ftp"},
        requirement("provider", "aws", "=1.0.0"),
    ]});
    let answer = post_json(&app, &plan).await;
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    let json = answer.json();
    let resolved: Vec<String> = json["resolved"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| format!("{}/{}@{}", r["type"], r["name"], r["version"]).replace('"', ""))
        .collect();
    assert_eq!(
        resolved,
        [
            "provider/aws@v1.2.0",
            "taskserv/kubernetes@1.28.4",
            "provider/upcloud@0.9.0",
            "provider/aws@1.0.0",
        ]
    );
    assert!(json["resolved"][0]["checksum"].is_string());
    let errors: Vec<String> = json["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| format!("{}/{} {}", e["type"], e["name"], e["error"]).replace('"', ""))
        .collect();
    assert_eq!(
        errors,
        [
            "taskserv/containerd no_matching_version",
            "plugin/aws invalid_type",
            "provider/nope not_found",
            "provider/aws invalid_constraint",
            "provider/upcloud invalid_parameter",
        ]
    );
    assert!(json["errors"][0]["message"]
        .as_str()
        .unwrap()
        .contains("v1.7.14"));

    // aws three times, kubernetes, containerd, nope and upcloud: one backend call each, and
    // none the second time.
    let first = calls.load(Ordering::SeqCst);
    assert_eq!(first, 5);
    assert_eq!(post_json(&app, &plan).await.status, StatusCode::OK);
    assert_eq!(calls.load(Ordering::SeqCst), first);
}

#[tokio::test]
async fn batch_limits_and_bad_bodies_are_refused() {
    let (app, calls) = app_configured(UNLIMITED);
    let many: Vec<Value> = (0..201)
        .map(|_| requirement("provider", "aws", "^1"))
        .collect();
    let answer = post_json(&app, &json!({ "requirements": many })).await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert_eq!(answer.json()["error"], "too_many_requirements");
    let answer = post_json(&app, &json!({ "requirements": &many[..200] })).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.json()["resolved"].as_array().unwrap().len(), 200);

    // One byte over the cap: refused from its length, and from its bytes when it streams
    // without one.
    let big = vec![b' '; 1024 * 1024 + 1];
    let answer = post(&app, "/api/v1/resolve", body::full(big.clone())).await;
    assert_eq!(answer.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(answer.json()["error"], "body_too_large");
    let chunks = big
        .chunks(64 * 1024)
        .map(|c| Ok::<_, BoxError>(Frame::data(Bytes::copy_from_slice(c))))
        .collect::<Vec<_>>();
    let streamed = StreamBody::new(futures_util::stream::iter(chunks)).boxed_unsync();
    let answer = post(&app, "/api/v1/resolve", streamed).await;
    assert_eq!(answer.status, StatusCode::PAYLOAD_TOO_LARGE);

    let bad_bodies = [
        "not json".to_owned(),
        "[]".to_owned(),
        json!({"requirements": "aws"}).to_string(),
        json!({"requirements": [{"type": "provider", "name": "aws"}]}).to_string(),
        json!({"requirements": [requirement("provider", "aws", "^1")], "prerelease": "yes"})
            .to_string(),
        json!({"requirements": [requirement("provider", "aws", "^1")], "extra": 1}).to_string(),
        json!({"requirements": []}).to_string(),
        String::new(),
        // The fields in order, as arrays: not the documented objects.
        json!([[requirement("provider", "aws", "^1")]]).to_string(),
        json!({"requirements": [["provider", "aws", "^1"]]}).to_string(),
    ];
    for bad in bad_bodies {
        let answer = post(&app, "/api/v1/resolve", body::full(bad.clone())).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{bad}");
        let json = answer.json();
        assert_eq!(json["error"], "invalid_body", "{bad}");
        assert!(json["message"].as_str().unwrap().contains("requirements"));
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "only the 200-item batch asked"
    );
}

#[tokio::test]
async fn a_batch_making_too_many_comparisons_is_refused() {
    // 8,000 versions; 64 alternatives of one comparator each, in 254 bytes.
    let app = app_with_releases(4000);
    let alternatives = ["<0"; 64].join("||");
    assert!(alternatives.len() <= 256);
    let plan = |constraint: &str, n: usize| json!({ "requirements": vec![requirement("provider", "big", constraint); n] });

    // 200 × 64 × 8,000: refused, saying what the bound counts.
    let answer = post_json(&app, &plan(&alternatives, 200)).await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{:?}", answer.body);
    assert_eq!(answer.header("content-type"), "application/json");
    let json = answer.json();
    assert_eq!(json["error"], "too_many_comparisons");
    let message = json["message"].as_str().unwrap();
    for expected in ["102400000", "4000000", "versions", "comparators"] {
        assert!(message.contains(expected), "{expected} not in {message}");
    }

    // The bound is on the sum: 7 such requirements (3,584,000) are answered, 8 are not.
    let answer = post_json(&app, &plan(&alternatives, 7)).await;
    assert_eq!(answer.status, StatusCode::OK);
    let errors = answer.json()["errors"].as_array().unwrap().clone();
    assert_eq!(errors.len(), 7);
    assert_eq!(errors[0]["error"], "no_matching_version");
    let answer = post_json(&app, &plan(&alternatives, 8)).await;
    assert_eq!(answer.json()["error"], "too_many_comparisons");

    // Usual constraints on the same extension are well within it: 200 × 2 × 8,000.
    let answer = post_json(&app, &plan("^1.2", 200)).await;
    assert_eq!(answer.status, StatusCode::OK);
    let json = answer.json();
    assert_eq!(json["resolved"].as_array().unwrap().len(), 200);
    assert_eq!(json["resolved"][199]["version"], "1.3999.0");
    let answer = post_json(&app, &plan("<1.0.0", 1)).await;
    let message = answer.json()["errors"][0]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        message.contains("(prerelease 1.0.0-rc.1 would, with prerelease=true)"),
        "{message}"
    );
}

#[tokio::test]
async fn a_batch_is_refused_for_its_query_or_its_content_coding_before_its_body_is_read() {
    let (app, calls) = app_configured(UNLIMITED);
    let plan = json!({"requirements": [requirement("provider", "aws", "^1")]}).to_string();
    let send = |uri: &'static str, coding: Option<&'static str>| {
        let mut req = Request::post(uri).header("content-type", "application/json");
        if let Some(coding) = coding {
            req = req.header("content-encoding", coding);
        }
        app::send_request(&app, req.body(body::full(plan.clone())).unwrap())
    };
    for uri in [
        "/api/v1/resolve?a=1&a=2",
        "/api/v1/resolve?x=%ff",
        "/api/v1/resolve?x=%00",
    ] {
        let answer = send(uri, None).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{uri}");
        assert_eq!(answer.json()["error"], "invalid_parameter", "{uri}");
    }
    let answer = send("/api/v1/resolve", Some("gzip")).await;
    assert_eq!(answer.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(answer.json()["error"], "unsupported_encoding");
    assert_eq!(answer.header("accept-encoding"), "identity");
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    // Unknown parameters are ignored here as everywhere, and identity is no coding.
    let answer = send("/api/v1/resolve?x=1", Some("identity")).await;
    assert_eq!(answer.status, StatusCode::OK);
}

#[tokio::test(start_paused = true)]
async fn a_body_that_does_not_arrive_is_408() {
    let (app, _) = app::sample_app();
    let stalled = StreamBody::new(futures_util::stream::pending::<
        Result<Frame<Bytes>, BoxError>,
    >());
    let answer = post(&app, "/api/v1/resolve", stalled.boxed_unsync()).await;
    assert_eq!(answer.status, StatusCode::REQUEST_TIMEOUT);
    assert_eq!(answer.json()["error"], "body_timeout");
}

#[tokio::test(start_paused = true)]
async fn a_batch_costs_one_request_of_quota_per_requirement() {
    let (app, _) = app_configured("[rate_limit]\nrequests_per_second = 1\nburst = 10\n");
    let plan = |n: usize| json!({"requirements": vec![requirement("provider", "aws", "^1"); n]});
    let answer = post_json(&app, &plan(4)).await;
    assert_eq!(answer.status, StatusCode::OK);
    // 10 - 4 for the batch - 1 for this request.
    let after = get(&app, "/api/v1/extensions").await;
    assert_eq!(after.header("ratelimit-remaining"), "5");

    // 5 left: the layer takes 1, the remaining 5 of a 6-batch do not fit, and the refusal
    // costs nothing more than that 1.
    let refused = post_json(&app, &plan(6)).await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.json()["error"], "rate_limited");
    assert!(refused.headers.contains_key("retry-after"));
    let after = get(&app, "/api/v1/extensions").await;
    assert_eq!(after.header("ratelimit-remaining"), "3");

    // Once the quota is full again, even a batch larger than the burst is paid for: it
    // costs the whole burst.
    tokio::time::advance(std::time::Duration::from_secs(10)).await;
    assert_eq!(post_json(&app, &plan(200)).await.status, StatusCode::OK);
    let refused = get(&app, "/api/v1/extensions").await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
}
