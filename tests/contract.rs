//! The client contract: the OpenAPI document served at `/api/v1/openapi.json` is OpenAPI 3.1,
//! names exactly the service's routes, and every route answers each status it can reach over
//! the local backend as the document says (each request goes through `app::send`, which checks
//! the response against the document; so do the other whole-app tests, e.g. the unhealthy
//! `503`s of health and readiness in `api.rs`).

#[allow(dead_code)]
#[path = "support/app.rs"]
mod app;

use std::sync::Arc;

use app::contract::{self, document, resolve};
use app::{app_with, get, local_config, samples, send, send_request};
use extension_registry::api::openapi;
use extension_registry::api::Route;
use extension_registry::body;
use extension_registry::registry::{RegistryError, Source, Sources};
use extension_registry::server::PeerAddr;
use http::{HeaderMap, HeaderValue, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tokio::sync::Notify;
use tower::ServiceExt;

/// The official OpenAPI 3.1 schema (see `tests/fixtures/openapi/README.md`).
const OAS_3_1_SCHEMA: &str = include_str!("fixtures/openapi/oas-3.1-schema.json");

/// A request to each route that asks the backends.
const BACKEND_ROUTES: [&str; 5] = [
    "/api/v1/extensions",
    "/api/v1/extensions/search?q=aws",
    "/api/v1/extensions/provider/aws",
    "/api/v1/extensions/provider/aws/versions",
    "/api/v1/extensions/provider/aws/latest",
];

/// Every `$ref` in `value`, with where it is.
fn references<'v>(value: &'v Value, at: String, out: &mut Vec<(String, &'v str)>) {
    match value {
        Value::Object(map) => {
            for (key, item) in map {
                match (key.as_str(), item.as_str()) {
                    ("$ref", Some(target)) => out.push((at.clone(), target)),
                    _ => references(item, format!("{at}/{key}"), out),
                }
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                references(item, format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
}

#[test]
fn the_document_is_openapi_3_1_and_its_schemas_are_json_schema_2020_12() {
    let meta: Value = serde_json::from_str(OAS_3_1_SCHEMA).unwrap();
    let problems = contract::errors(&meta, document());
    assert!(problems.is_empty(), "not OpenAPI 3.1: {problems:#?}");
    // The meta-schema does refuse what is not OpenAPI 3.1.
    let mut older = document().clone();
    older["openapi"] = json!("3.0.3");
    assert!(!contract::errors(&meta, &older).is_empty());
    let mut undescribed = document().clone();
    undescribed["components"]["responses"]["Extension"]
        .as_object_mut()
        .unwrap()
        .remove("description");
    assert!(!contract::errors(&meta, &undescribed).is_empty());

    let mut refs = Vec::new();
    references(document(), String::new(), &mut refs);
    for (at, target) in &refs {
        let pointer = target.strip_prefix('#').unwrap_or(target);
        assert!(
            document().pointer(pointer).is_some(),
            "{at}: dangling {target}"
        );
    }
    for (name, schema) in document()["components"]["schemas"].as_object().unwrap() {
        let meta = jsonschema::draft202012::meta::validate(schema);
        assert!(meta.is_ok(), "schema {name}: {meta:?}");
        contract::validator(&json!({ "$ref": format!("#/components/schemas/{name}") }));
    }
}

#[test]
fn the_document_names_exactly_the_routes_and_every_status_of_the_stack() {
    let paths = document()["paths"].as_object().unwrap();
    let mut documented: Vec<&str> = paths.keys().map(String::as_str).collect();
    let mut routes: Vec<&str> = Route::ALL.iter().map(|r| r.template()).collect();
    documented.sort_unstable();
    routes.sort_unstable();
    assert_eq!(documented, routes, "document paths vs. the route table");

    for route in Route::ALL {
        let path = route.template();
        let methods: Vec<String> = paths[path].as_object().unwrap().keys().cloned().collect();
        let allowed: Vec<String> = (route.allow().split(", "))
            .filter(|m| *m != "HEAD")
            .map(str::to_ascii_lowercase)
            .collect();
        assert_eq!(
            methods, allowed,
            "{path}: the methods of Allow (HEAD described by GET)"
        );
    }
    for (path, operations) in paths {
        let operations = operations.as_object().unwrap();
        assert_eq!(operations.len(), 1, "{path}: one operation");
        let responses = operations.values().next().unwrap()["responses"]
            .as_object()
            .unwrap();
        // The layers around the router can answer these on any route.
        for status in ["400", "429", "500", "503", "504"] {
            assert!(responses.contains_key(status), "{path} omits {status}");
        }
        for (status, response) in responses {
            let response = resolve(response);
            assert!(response["description"].is_string(), "{path} {status}");
            let headers = response["headers"].as_object();
            let has = |name: &str| headers.is_some_and(|h| h.contains_key(name));
            assert!(has("X-Request-Id"), "{path} {status}: X-Request-Id");
            if matches!(status.as_str(), "429" | "503") {
                assert!(has("Retry-After"), "{path} {status}: Retry-After");
            }
        }
    }
}

#[tokio::test]
async fn the_document_is_served_with_an_etag_and_revalidates() {
    let (app, _) = app::sample_app();
    let served = get(&app, "/api/v1/openapi.json").await;
    assert_eq!(served.status, StatusCode::OK);
    // As written, with `source=` narrowed to what the sample app (one local backend) accepts.
    let sources = Sources::new(vec![Source::Local.into()]);
    assert_eq!(served.body, openapi::document(&sources).as_bytes());
    assert_eq!(served.json()["openapi"], "3.1.0");
    let etag = served.header("etag").to_owned();

    let again = Request::get("/api/v1/openapi.json")
        .header("if-none-match", &etag)
        .body(body::empty())
        .unwrap();
    let again = send_request(&app, again).await;
    assert_eq!(again.status, StatusCode::NOT_MODIFIED);
    assert!(again.body.is_empty());
}

#[tokio::test]
async fn every_route_answers_its_documented_statuses_over_the_local_backend() {
    let (app, _) = app::sample_app();
    let ok = [
        "/api/v1/extensions",
        "/api/v1/extensions?type=provider&source=local&limit=2&offset=1",
        "/api/v1/extensions/search?q=kube&type=taskserv&limit=5",
        "/api/v1/extensions/provider/aws",
        "/api/v1/extensions/provider/aws?source=local",
        "/api/v1/extensions/provider/aws/versions",
        "/api/v1/extensions/taskserv/cilium/versions",
        "/api/v1/extensions/cluster/web/0.3.0",
        "/api/v1/extensions/cluster/web/latest?source=local",
        "/api/v1/health",
        "/livez",
        "/readyz",
        "/api/v1/metrics",
        "/api/v1/cache/stats",
        "/api/v1/openapi.json",
    ];
    for uri in ok {
        assert_eq!(get(&app, uri).await.status, StatusCode::OK, "GET {uri}");
        assert_eq!(
            send(&app, "HEAD", uri).await.status,
            StatusCode::OK,
            "HEAD {uri}"
        );
    }
    let download = get(&app, "/api/v1/extensions/cluster/web/0.3.0").await;
    assert!(download.header("content-disposition").contains("web-0.3.0"));

    for uri in &ok[..7] {
        let etag = get(&app, uri).await.header("etag").to_owned();
        let req = Request::get(*uri)
            .header("if-none-match", etag)
            .body(body::empty())
            .unwrap();
        let status = send_request(&app, req).await.status;
        assert_eq!(status, StatusCode::NOT_MODIFIED, "{uri}");
    }

    let bad = [
        ("/api/v1/extensions?limit=1001", "invalid_parameter"),
        ("/api/v1/extensions?offset=-1", "invalid_parameter"),
        ("/api/v1/extensions?type=plugin", "invalid_type"),
        ("/api/v1/extensions?source=gitlab", "invalid_parameter"),
        ("/api/v1/extensions/search", "invalid_parameter"),
        ("/api/v1/extensions/search?q=%ff", "invalid_parameter"),
        ("/api/v1/extensions/plugin/aws", "invalid_type"),
        ("/api/v1/extensions/provider/AWS", "invalid_name"),
        (
            "/api/v1/extensions/provider/aws/versions?source=x",
            "invalid_parameter",
        ),
        ("/api/v1/extensions/provider/aws/1..2", "invalid_version"),
        ("/api/v1/extensions/provider/a%2Fb", "invalid_path"),
        ("/livez?x=%zz", "invalid_parameter"),
    ];
    for (uri, code) in bad {
        let answer = get(&app, uri).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{uri}");
        assert_eq!(answer.json()["error"], code, "{uri}");
    }
    let long = format!("/api/v1/extensions?q={}", "a".repeat(4096));
    let refused = get(&app, &long).await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST);
    assert_eq!(refused.json()["error"], "invalid_parameter");

    // The edge: a repeated parameter, a request from a client without exactly one Host, an
    // OPTIONS that is not a CORS preflight.
    let repeated = get(&app, "/api/v1/extensions?type=provider&type=cluster").await;
    assert_eq!(repeated.status, StatusCode::BAD_REQUEST);
    assert_eq!(repeated.json()["error"], "invalid_parameter");
    for hosts in [&[][..], &["a.example", "b.example"][..]] {
        let mut req = Request::get("/api/v1/extensions")
            .body(body::empty())
            .unwrap();
        req.extensions_mut()
            .insert(PeerAddr("192.0.2.10:50000".parse().unwrap()));
        for host in hosts {
            req.headers_mut()
                .append("host", HeaderValue::from_static(host));
        }
        let answer = send_request(&app, req).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{hosts:?}");
        assert_eq!(answer.json()["error"], "invalid_host", "{hosts:?}");
    }
    for uri in ["/api/v1/extensions", "/api/v1/resolve", "/no/such/route"] {
        let answer = send(&app, "OPTIONS", uri).await;
        assert_eq!(answer.status, StatusCode::METHOD_NOT_ALLOWED, "{uri}");
        assert!(answer.headers.contains_key("allow"), "{uri}");
    }

    for uri in [
        "/api/v1/extensions/provider/nope",
        "/api/v1/extensions/provider/nope/versions",
        "/api/v1/extensions/provider/aws/9.9.9",
        "/api/v1/extensions/provider/aws?source=gitea",
        "/no/such/route",
    ] {
        let answer = get(&app, uri).await;
        assert_eq!(answer.status, StatusCode::NOT_FOUND, "{uri}");
        assert_eq!(answer.json()["error"], "not_found", "{uri}");
    }
    for method in ["POST", "PUT", "DELETE", "PATCH", "TRACE"] {
        let answer = send(&app, method, "/api/v1/openapi.json").await;
        assert_eq!(answer.status, StatusCode::METHOD_NOT_ALLOWED, "{method}");
        assert_eq!(answer.header("allow"), "GET, HEAD");
    }
}

#[tokio::test]
async fn over_the_quota_every_rate_limited_route_answers_429() {
    let config = local_config(
        &samples(),
        "[rate_limit]\nrequests_per_second = 1\nburst = 1\nexempt_paths = []\n",
    );
    let app = app_with(&config, |_| async {
        Err(RegistryError::unavailable(Source::Local, "not asked"))
    });
    for template in Route::ALL.map(Route::template) {
        let uri = template
            .replace("{type}", "provider")
            .replace("{name}", "aws")
            .replace("{version}", "1.0.0");
        // The quota is one request a second: within a few requests one is refused, however
        // slowly the machine runs them.
        let mut refused = None;
        for _ in 0..10 {
            let answer = get(&app, &format!("{uri}?q=aws")).await;
            if answer.status == StatusCode::TOO_MANY_REQUESTS {
                refused = Some(answer);
                break;
            }
        }
        let refused = refused.unwrap_or_else(|| panic!("{uri} was never rate limited"));
        assert_eq!(refused.json()["error"], "rate_limited");
        assert!(refused.header("retry-after").parse::<u64>().is_ok());
    }
}

/// Makes the error a failing backend answers.
type Fault = fn() -> RegistryError;

#[tokio::test]
async fn backend_faults_answer_the_documented_5xx_on_every_backend_route() {
    let config = local_config(&samples(), "");
    let faults: [(Fault, StatusCode, &str); 4] = [
        (
            || RegistryError::unavailable(Source::Local, "down"),
            StatusCode::BAD_GATEWAY,
            "backend_unavailable",
        ),
        (
            || RegistryError::auth_failed(Source::Local),
            StatusCode::BAD_GATEWAY,
            "backend_auth_failed",
        ),
        (
            || RegistryError::timeout(Source::Local),
            StatusCode::GATEWAY_TIMEOUT,
            "timeout",
        ),
        (
            || RegistryError::Internal("a bug".into()),
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
        ),
    ];
    for (fault, status, code) in faults {
        let app = app_with(&config, move |_| async move { Err(fault()) });
        for uri in BACKEND_ROUTES {
            let answer = get(&app, uri).await;
            assert_eq!(
                (answer.status, answer.json()["error"].clone()),
                (status, json!(code)),
                "{uri}"
            );
        }
    }
    let panicking = app_with(&config, |_| async { panic!("a bug in a backend") });
    for uri in BACKEND_ROUTES {
        let answer = get(&panicking, uri).await;
        assert_eq!(answer.status, StatusCode::INTERNAL_SERVER_ERROR, "{uri}");
    }
}

#[tokio::test(start_paused = true)]
async fn slow_backends_answer_504_and_a_full_service_503() {
    let config = local_config(
        &samples(),
        "[server]\nrequest_timeout_seconds = 2\nmax_concurrent_requests = 1\n",
    );
    let entered = Arc::new(Notify::new());
    let seen = entered.clone();
    let app = app_with(&config, move |_| {
        seen.notify_one();
        std::future::pending()
    });
    let listing = Request::get("/api/v1/extensions").body(body::empty());
    let slow = tokio::spawn(app.clone().oneshot(listing.unwrap()));
    entered.notified().await;
    for uri in BACKEND_ROUTES {
        let answer = get(&app, uri).await;
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE, "{uri}");
        assert_eq!(answer.json()["error"], "overloaded");
    }
    let (timed_out, body) = slow.await.unwrap().unwrap().into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    contract::check(
        "GET",
        "/api/v1/extensions",
        timed_out.status,
        &timed_out.headers,
        &body,
    );
    assert_eq!(timed_out.status, StatusCode::GATEWAY_TIMEOUT);
    assert!(body.starts_with(br#"{"error":"timeout""#), "{body:?}");
}

#[test]
fn the_check_refuses_what_the_document_does_not_promise() {
    let json_headers = || {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        headers.insert("x-request-id", HeaderValue::from_static("1"));
        headers
    };
    let refused =
        |method: &'static str, path: &'static str, status, headers, body: &'static [u8]| {
            let outcome = std::panic::catch_unwind(|| {
                contract::check(method, path, status, &headers, body);
            });
            assert!(outcome.is_err(), "{method} {path} {status} {body:?} passed");
        };
    let mut listed = json_headers();
    listed.insert("x-total-count", HeaderValue::from_static("0"));
    listed.insert(
        "etag",
        HeaderValue::from_static("\"0123456789abcdef0123456789abcdef\""),
    );
    contract::check("GET", "/api/v1/extensions", StatusCode::OK, &listed, b"[]");

    // An undocumented status, a missing required header, a body of another shape, an
    // undocumented field, an unknown error code, a 405 without Allow.
    refused(
        "GET",
        "/api/v1/extensions",
        StatusCode::IM_A_TEAPOT,
        listed.clone(),
        b"[]",
    );
    refused(
        "GET",
        "/api/v1/extensions",
        StatusCode::OK,
        json_headers(),
        b"[]",
    );
    refused(
        "GET",
        "/api/v1/extensions",
        StatusCode::OK,
        listed.clone(),
        b"{}",
    );
    refused(
        "GET",
        "/api/v1/extensions",
        StatusCode::OK,
        listed.clone(),
        b"[{\"name\":\"x\"}]",
    );
    refused(
        "GET",
        "/api/v1/extensions/provider/x",
        StatusCode::NOT_FOUND,
        json_headers(),
        b"{\"error\":\"gone\",\"message\":\"m\"}",
    );
    refused(
        "POST",
        "/api/v1/extensions",
        StatusCode::METHOD_NOT_ALLOWED,
        json_headers(),
        b"{\"error\":\"method_not_allowed\",\"message\":\"m\"}",
    );
}

#[tokio::test]
async fn resolution_answers_its_documented_statuses_over_the_local_backend() {
    let (app, _) = app::sample_app();
    for (uri, status) in [
        (
            "/api/v1/resolve/provider/aws?constraint=%5E1.0",
            StatusCode::OK,
        ),
        (
            "/api/v1/resolve/provider/aws?constraint=~%3E%201.0&source=local&prerelease=true",
            StatusCode::OK,
        ),
        (
            "/api/v1/resolve/provider/aws?constraint=%5E3",
            StatusCode::NOT_FOUND,
        ),
        (
            "/api/v1/resolve/provider/nope?constraint=1",
            StatusCode::NOT_FOUND,
        ),
        (
            "/api/v1/resolve/provider/aws?constraint=%5E%5E",
            StatusCode::BAD_REQUEST,
        ),
        ("/api/v1/resolve/provider/aws", StatusCode::BAD_REQUEST),
        (
            "/api/v1/resolve/provider/aws?constraint=1&prerelease=yes",
            StatusCode::BAD_REQUEST,
        ),
        (
            "/api/v1/extensions/provider/aws/versions?constraint=%3E%3D1.1",
            StatusCode::OK,
        ),
        (
            "/api/v1/extensions/provider/aws/versions?constraint=!",
            StatusCode::BAD_REQUEST,
        ),
    ] {
        assert_eq!(get(&app, uri).await.status, status, "{uri}");
    }
    for method in ["GET", "HEAD", "PUT"] {
        let answer = send(&app, method, "/api/v1/resolve").await;
        assert_eq!(answer.status, StatusCode::METHOD_NOT_ALLOWED, "{method}");
        assert_eq!(answer.header("allow"), "POST");
    }

    let post = |body: Vec<u8>| {
        Request::post("/api/v1/resolve")
            .header("content-type", "application/json")
            .body(body::full(body))
            .unwrap()
    };
    let plan = json!({"requirements": [
        {"type": "provider", "name": "aws", "constraint": "~> 1.0"},
        {"type": "taskserv", "name": "containerd", "constraint": "^2", "source": "local"},
        {"type": "plugin", "name": "x", "constraint": "*"},
    ]});
    let answer = send_request(&app, post(plan.to_string().into_bytes())).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.json()["resolved"][0]["version"], "v1.2.0");
    assert_eq!(answer.json()["errors"][0]["error"], "no_matching_version");
    assert_eq!(answer.json()["errors"][1]["error"], "invalid_type");

    // A null source is taken as absent, and the document's request schema says so.
    let null_source = json!({"requirements": [
        {"type": "provider", "name": "aws", "constraint": "*", "source": null},
    ]});
    let plan_schema = json!({ "$ref": "#/components/schemas/Plan" });
    assert_eq!(
        contract::errors(&plan_schema, &null_source),
        Vec::<String>::new()
    );
    let answer = send_request(&app, post(null_source.to_string().into_bytes())).await;
    assert_eq!(answer.json()["resolved"][0]["name"], "aws");

    let one = json!({"type": "provider", "name": "aws", "constraint": "*"});
    let many = json!({ "requirements": vec![one; 201] });
    for (body, status, code) in [
        (b"{}".to_vec(), StatusCode::BAD_REQUEST, "invalid_body"),
        (
            b"{\"requirements\": []}".to_vec(),
            StatusCode::BAD_REQUEST,
            "invalid_body",
        ),
        (
            many.to_string().into_bytes(),
            StatusCode::BAD_REQUEST,
            "too_many_requirements",
        ),
        (
            vec![b' '; 1024 * 1024 + 1],
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
        ),
    ] {
        let answer = send_request(&app, post(body)).await;
        assert_eq!(answer.status, status, "{code}");
        assert_eq!(answer.json()["error"], code);
    }
}
