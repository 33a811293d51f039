//! The whole stack in-process: every endpoint, every error code, HEAD, 405, 404, hostile input,
//! configuration errors and the local backend's behaviour.

#[allow(dead_code)]
#[path = "support/app.rs"]
mod app;

use std::sync::atomic::Ordering;

use app::{app_with, get, local_config, samples, send};
use extension_registry::config::Config;
use extension_registry::registry::{BackendRequest, BackendResponse, RegistryError, Source};
use http::StatusCode;
use sha2::{Digest, Sha256};

#[tokio::test]
async fn lists_in_a_stable_order_with_paging_and_total() {
    let (app, _) = app::sample_app();
    let all = get(&app, "/api/v1/extensions").await;
    assert_eq!(all.status, StatusCode::OK);
    assert_eq!(all.header("x-total-count"), "8");
    let names: Vec<String> = all
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            format!(
                "{}/{}",
                e["type"].as_str().unwrap(),
                e["name"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        names,
        [
            "provider/aws",
            "provider/local",
            "provider/upcloud",
            "taskserv/cilium",
            "taskserv/containerd",
            "taskserv/kubernetes",
            "cluster/buildkit",
            "cluster/web",
        ]
    );

    let page = get(&app, "/api/v1/extensions?limit=3&offset=2").await;
    assert_eq!(page.header("x-total-count"), "8");
    let page_names = app::field(&page.json(), "name");
    assert_eq!(page_names, ["upcloud", "cilium", "containerd"]);

    let taskservs = get(&app, "/api/v1/extensions?type=taskserv&source=local").await;
    assert_eq!(taskservs.header("x-total-count"), "3");
    let none = get(&app, "/api/v1/extensions?source=gitea").await;
    assert_eq!(none.json(), serde_json::json!([]));
    let past_end = get(&app, "/api/v1/extensions?offset=100").await;
    assert_eq!(past_end.json(), serde_json::json!([]));
    assert_eq!(past_end.header("x-total-count"), "8");
}

#[tokio::test]
async fn gets_one_extension_at_its_current_version() {
    let (app, _) = app::sample_app();
    let aws = get(&app, "/api/v1/extensions/provider/aws").await;
    assert_eq!(aws.status, StatusCode::OK);
    let json = aws.json();
    // 2.0.0-rc.1 is newer but a prerelease; v1.2.0 is the highest stable one.
    assert_eq!(json["version"], "v1.2.0");
    assert_eq!(json["source"], "local");
    assert_eq!(json["type"], "provider");
    assert_eq!(json["published_at"], "2024-09-20T14:00:00Z");
    assert_eq!(json["tags"], serde_json::json!(["cloud", "aws"]));
    assert!(json["checksum"].as_str().unwrap().starts_with("sha256:"));
    assert_eq!(aws.header("content-type"), "application/json");

    // Only prereleases: the highest prerelease.
    let local = get(&app, "/api/v1/extensions/provider/local").await.json();
    assert_eq!(local["version"], "0.1.0-beta.2");
    // No tags in the metadata: the key is left out, never null.
    let web = get(&app, "/api/v1/extensions/cluster/web?source=local")
        .await
        .json();
    assert!(web.get("tags").is_none(), "{web}");
}

#[tokio::test]
async fn versions_are_newest_first() {
    let (app, _) = app::sample_app();
    let versions = get(&app, "/api/v1/extensions/provider/aws/versions")
        .await
        .json();
    let tags = app::field(&versions, "version");
    assert_eq!(tags, ["2.0.0-rc.1", "v1.2.0", "1.1.0", "1.0.0"]);
    let cilium = get(&app, "/api/v1/extensions/taskserv/cilium/versions")
        .await
        .json();
    let tags = app::field(&cilium, "version");
    assert_eq!(tags, ["1.15.3", "1.15.0", "nightly"]);
    for key in [
        "version",
        "published_at",
        "download_url",
        "size",
        "checksum",
    ] {
        assert!(versions[0].get(key).is_some(), "{key}");
    }
}

/// RFC 3986 §6.2.2.2: a path's unreserved characters mean the same percent-encoded, in the
/// words of a route as in its parameters. `%76ersions` was a download of version `versions`.
#[tokio::test]
async fn encoded_letters_name_the_routes_they_spell() {
    let (app, _) = app::sample_app();
    for (encoded, written) in [
        (
            "/api/v1/extensions/provider/aws/%76ersions",
            "/api/v1/extensions/provider/aws/versions",
        ),
        (
            "/api/v1/%65xtensions/%73earch?q=aws",
            "/api/v1/extensions/search?q=aws",
        ),
        ("/api/v1/%65xtensions?limit=2", "/api/v1/extensions?limit=2"),
        (
            "/%61pi/v1/extensions/%70rovider/aws/v1%2E2%2e0",
            "/api/v1/extensions/provider/aws/v1.2.0",
        ),
        ("/%6Civez", "/livez"),
    ] {
        let (encoded_answer, written_answer) = (get(&app, encoded).await, get(&app, written).await);
        assert_eq!(written_answer.status, StatusCode::OK, "{written}");
        assert_eq!(encoded_answer.status, written_answer.status, "{encoded}");
        assert_eq!(encoded_answer.body, written_answer.body, "{encoded}");
    }
    // Other escapes stay escapes: an encoded slash is still refused, not a path separator; and
    // a malformed escape is refused, not made into one around a decoded letter (`%2e`).
    for refused in [
        "/api/v1/extensions/provider%2Faws",
        "/api/v1/extensions/provider/aws/v1%2%652.0",
        "/api/v1/extensions/provider/aws/v1%%32%652.0",
    ] {
        let answer = get(&app, refused).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{refused}");
        assert_eq!(answer.json()["error"], "invalid_path", "{refused}");
    }
}

#[tokio::test]
async fn downloads_stream_the_file_bytes() {
    let (app, _) = app::sample_app();
    let file = std::fs::read(samples().join("provider/aws/v1.2.0/aws-v1.2.0.tar.gz")).unwrap();
    for version in ["v1.2.0", "latest"] {
        let dl = get(&app, &format!("/api/v1/extensions/provider/aws/{version}")).await;
        assert_eq!(dl.status, StatusCode::OK);
        assert_eq!(&dl.body[..], &file[..]);
        assert_eq!(dl.header("content-type"), "application/octet-stream");
        assert_eq!(dl.header("content-length"), file.len().to_string());
        assert_eq!(
            dl.header("content-disposition"),
            "attachment; filename=\"aws-v1.2.0.tar.gz\""
        );
    }
    let meta = get(&app, "/api/v1/extensions/provider/aws").await.json();
    assert_eq!(
        meta["checksum"],
        format!("sha256:{:x}", Sha256::digest(&file))
    );
    assert_eq!(meta["size"], file.len());
    let missing = get(&app, "/api/v1/extensions/provider/aws/9.9.9").await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert_eq!(missing.json()["error"], "not_found");
}

#[tokio::test]
async fn searches_rank_name_matches_before_description_matches() {
    let (app, _) = app::sample_app();
    let hits = get(&app, "/api/v1/extensions/search?q=KUBE").await.json();
    let names = app::field(&hits, "name");
    assert_eq!(names, ["kubernetes", "cilium"]);
    let typed = get(&app, "/api/v1/extensions/search?q=a&type=cluster&limit=1")
        .await
        .json();
    assert_eq!(typed.as_array().unwrap().len(), 1);
    assert_eq!(typed[0]["type"], "cluster");
}

#[tokio::test]
async fn health_liveness_readiness_metrics_and_cache_stats_answer() {
    let (app, _) = app::sample_app();
    app::probed(&app).await;
    let health = get(&app, "/api/v1/health").await;
    assert_eq!(health.status, StatusCode::OK);
    let json = health.json();
    assert_eq!(json["status"], "healthy");
    assert_eq!(
        json["backends"]["local"],
        serde_json::json!({"enabled": true, "healthy": true, "circuit": "closed"})
    );
    assert_eq!(json["backends"]["gitea"]["enabled"], false);
    assert!(json["uptime"].is_u64() && json["version"].is_string());
    assert_eq!(get(&app, "/livez").await.status, StatusCode::OK);
    assert_eq!(get(&app, "/readyz").await.status, StatusCode::OK);
    let metrics = get(&app, "/api/v1/metrics").await;
    assert_eq!(metrics.status, StatusCode::OK);
    assert!(metrics.header("content-type").starts_with("text/plain"));
    let stats = get(&app, "/api/v1/cache/stats").await.json();
    assert!(stats["total_entries"].is_u64(), "{stats}");
}

/// One client asking for the metrics back to back gets fresh renderings up to the budget
/// (`api::exposition`, on tokio's clock, stopped here), then the latest one again; counters
/// never go back.
#[tokio::test(start_paused = true)]
async fn metrics_asked_back_to_back_are_rendered_within_a_budget() {
    let (app, _) = app::sample_app();
    let mut answers = Vec::new();
    for _ in 0..100 {
        let answer = get(&app, "/api/v1/metrics").await;
        assert_eq!(answer.status, StatusCode::OK);
        answers.push(answer);
    }
    // Each fresh rendering counts the ask before it (the recorder is the process's, shared
    // with the other tests here, whose counts only add to it).
    let scrapes: Vec<f64> = answers
        .iter()
        .map(|a| {
            let text = std::str::from_utf8(&a.body).unwrap();
            text.lines()
                .find_map(|l| {
                    l.strip_prefix(
                        r#"http_requests_total{method="GET",route="/api/v1/metrics",status="200"} "#,
                    )
                })
                .map_or(0.0, |n| n.parse().unwrap())
        })
        .collect();
    assert!(scrapes.windows(2).all(|w| w[0] <= w[1]), "{scrapes:?}");
    let renderings = 1 + scrapes.windows(2).filter(|w| w[0] < w[1]).count();
    // The budget's burst, with no time passing.
    assert_eq!(renderings, 32);
    let etags: std::collections::HashSet<&str> = answers.iter().map(|a| a.header("etag")).collect();
    assert_eq!(etags.len(), renderings, "one ETag per rendering");
}

#[tokio::test]
async fn unhealthy_backends_make_health_503_and_readyz_503() {
    let config = local_config(&samples(), "");
    let app = app_with(&config, |req| async move {
        match req {
            BackendRequest::Health => Ok(BackendResponse::Health(
                extension_registry::registry::HealthReport(vec![
                    extension_registry::registry::BackendHealth {
                        source: Source::Local,
                        healthy: false,
                        detail: Some("disk gone".into()),
                    },
                ]),
            )),
            _ => Err(RegistryError::unavailable(Source::Local, "down")),
        }
    });
    app::probed(&app).await;
    let health = get(&app, "/api/v1/health").await;
    assert_eq!(health.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(health.json()["status"], "unhealthy");
    assert_eq!(
        get(&app, "/readyz").await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(get(&app, "/livez").await.status, StatusCode::OK);
}

#[tokio::test]
async fn head_works_wherever_get_does_and_other_methods_get_405() {
    let (app, _) = app::sample_app();
    // Health answers 503 `starting` until the first background probe ends.
    app::probed(&app).await;
    for uri in [
        "/api/v1/extensions",
        "/api/v1/extensions/provider/aws",
        "/api/v1/extensions/provider/aws/versions",
        "/api/v1/extensions/provider/aws/1.0.0",
        "/api/v1/health",
        "/livez",
        // Errors a handler answers describe their body too.
        "/api/v1/extensions/provider/nope",
        "/api/v1/extensions/provider/aws/9.9.9",
        "/api/v1/extensions?limit=x",
        "/api/v1/extensions?type=nope",
    ] {
        let get_answer = get(&app, uri).await;
        let head = send(&app, "HEAD", uri).await;
        assert_eq!(head.status, get_answer.status, "{uri}");
        assert!(head.body.is_empty(), "{uri}");
        assert_eq!(
            head.header("content-length"),
            get_answer.body.len().to_string(),
            "{uri}"
        );
    }
    // The metrics text, rendered apart from the GET before; its length is still told.
    let head = send(&app, "HEAD", "/api/v1/metrics").await;
    assert_eq!(head.status, StatusCode::OK);
    assert!(head.body.is_empty());
    assert!(head.header("content-length").parse::<usize>().unwrap() > 0);
    for method in ["POST", "PUT", "DELETE", "PATCH"] {
        let answer = send(&app, method, "/api/v1/extensions/provider/aws").await;
        assert_eq!(answer.status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(answer.header("allow"), "GET, HEAD");
        assert_eq!(answer.json()["error"], "method_not_allowed");
    }
    // Every path answers GET and HEAD only, unknown ones included.
    for uri in [
        "/api/v2/whatever",
        "/api/v1/extensions/provider/aws/1.0.0/x",
        "*",
    ] {
        for method in ["OPTIONS", "POST"] {
            let answer = send(&app, method, uri).await;
            assert_eq!(
                answer.status,
                StatusCode::METHOD_NOT_ALLOWED,
                "{method} {uri}"
            );
            assert_eq!(answer.header("allow"), "GET, HEAD");
        }
    }
    let unknown = get(&app, "/api/v2/whatever").await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    assert_eq!(unknown.json()["error"], "not_found");
}

#[tokio::test]
async fn a_repeated_parameter_is_refused_by_name() {
    let (app, calls) = app::sample_app();
    let answer = get(&app, "/api/v1/extensions?type=provider&type=bogus").await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert_eq!(answer.json()["error"], "invalid_parameter");
    let message = answer.json()["message"].as_str().unwrap().to_owned();
    assert!(message.contains("'type'"), "{message}");
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

/// `q` may be 256 characters whatever their UTF-8 length: 256 four-byte characters,
/// percent-encoded, beside the other parameters, fit the query limit; 257 do not, and neither
/// does a query string over 4096 bytes.
#[tokio::test]
async fn the_query_limit_fits_256_characters_of_any_width() {
    let (app, _) = app::sample_app();
    let encoded = |c: char, n: usize| {
        let mut utf8 = [0; 4];
        let one: String = c
            .encode_utf8(&mut utf8)
            .bytes()
            .map(|b| format!("%{b:02X}"))
            .collect();
        one.repeat(n)
    };
    let tail = "&type=taskserv&limit=1000";
    for c in ['k', 'é', 'ｋ', '𝕜'] {
        let fits = format!("/api/v1/extensions/search?q={}{tail}", encoded(c, 256));
        let answer = get(&app, &fits).await;
        assert_eq!(
            answer.status,
            StatusCode::OK,
            "256 of {c}: {:?}",
            answer.body
        );
        let over = format!("/api/v1/extensions/search?q={}{tail}", encoded(c, 257));
        let answer = get(&app, &over).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "257 of {c}");
        let message = answer.json()["message"].as_str().unwrap().to_owned();
        assert!(message.contains("'q'"), "{message}");
    }
    let query = |bytes: usize| {
        let q = "q=kube&pad=";
        format!(
            "/api/v1/extensions/search?{q}{}",
            "x".repeat(bytes - q.len())
        )
    };
    assert_eq!(get(&app, &query(4096)).await.status, StatusCode::OK);
    let over = get(&app, &query(4097)).await;
    assert_eq!(over.status, StatusCode::BAD_REQUEST);
    assert!(over.json()["message"]
        .as_str()
        .unwrap()
        .contains("4096 bytes"));
}

#[tokio::test]
async fn a_missing_version_is_named() {
    let (app, _) = app::sample_app();
    for (uri, message) in [
        (
            "/api/v1/extensions/provider/aws/9.9.9",
            "provider/aws 9.9.9 not found",
        ),
        (
            "/api/v1/extensions/provider/nope/latest",
            "provider/nope latest not found",
        ),
        (
            "/api/v1/extensions/provider/nope",
            "Extension provider/nope not found",
        ),
    ] {
        let answer = get(&app, uri).await;
        assert_eq!(answer.status, StatusCode::NOT_FOUND, "{uri}");
        assert_eq!(answer.json()["error"], "not_found");
        assert_eq!(answer.json()["message"], message, "{uri}");
    }
}

#[tokio::test]
async fn every_response_carries_a_request_id_and_echoes_a_given_one() {
    let (app, _) = app::sample_app();
    let generated = get(&app, "/api/v1/extensions/provider/nope").await;
    assert!(!generated.header("x-request-id").is_empty());
    let req = http::Request::get("/livez")
        .header("x-request-id", "abc-123")
        .body(extension_registry::body::empty())
        .unwrap();
    let response = tower::ServiceExt::oneshot(app.clone(), req).await.unwrap();
    assert_eq!(response.headers()["x-request-id"], "abc-123");
}

/// A client's id is echoed (and logged) only when short and safe; anything else is replaced.
#[tokio::test]
async fn unsafe_request_ids_are_replaced() {
    let (app, _) = app::sample_app();
    let huge = "a".repeat(300 * 1024);
    let longest = "b".repeat(128);
    let id = |sent: &[u8]| {
        let req = http::Request::get("/livez")
            .header("x-request-id", http::HeaderValue::from_bytes(sent).unwrap())
            .body(extension_registry::body::empty())
            .unwrap();
        let app = app.clone();
        async move {
            let response = tower::ServiceExt::oneshot(app, req).await.unwrap();
            response.headers()["x-request-id"]
                .to_str()
                .unwrap()
                .to_owned()
        }
    };
    assert_eq!(id(longest.as_bytes()).await, longest);
    assert_eq!(id(b"A.b_c:d-9").await, "A.b_c:d-9");
    for refused in [
        huge.as_bytes(),
        &longest.replace('b', "bb").as_bytes()[..129],
        b"abc def}: request finished status=200",
        "caf\u{e9}".as_bytes(),
    ] {
        let replaced = id(refused).await;
        assert_ne!(replaced.as_bytes(), refused);
        assert!(replaced.len() <= 32, "{replaced}");
        assert!(replaced.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-'));
    }
}

#[tokio::test]
async fn hostile_input_gets_400_json_and_never_reaches_a_backend() {
    let (app, calls) = app::sample_app();
    let long_name = format!("/api/v1/extensions/provider/{}", "a".repeat(129));
    let long_path = format!("/api/v1/extensions/provider/{}", "a".repeat(2000));
    let long_query = format!("/api/v1/extensions?type={}", "x".repeat(5000));
    let long_q = format!("/api/v1/extensions/search?q={}", "k".repeat(257));
    let cases: Vec<(&str, &str)> = vec![
        ("/api/v1/extensions/provider/..", "invalid_path"),
        (
            "/api/v1/extensions/provider/%2e%2e/versions",
            "invalid_path",
        ),
        ("/api/v1/extensions/provider/..%2F..%2Fetc", "invalid_path"),
        ("/api/v1/extensions/provider/aws%2F..%2F..", "invalid_path"),
        ("/api/v1/extensions/provider/aws%5Cx", "invalid_path"),
        ("/api/v1/extensions/provider/aws%00", "invalid_path"),
        ("/api/v1/extensions/provider/aws%ff", "invalid_path"),
        ("/api/v1/extensions/provider/aws%zz", "invalid_path"),
        ("/api/v1/extensions/provider/aws/1.0.0%2F..", "invalid_path"),
        ("/api/v1/extensions/provider/AWS", "invalid_name"),
        ("/api/v1/extensions/provider/-aws", "invalid_name"),
        ("/api/v1/extensions/provider/a..b", "invalid_name"),
        ("/api/v1/extensions/provider/%C3%A4ws", "invalid_name"),
        (&long_name, "invalid_name"),
        ("/api/v1/extensions/provider/aws/.hidden", "invalid_version"),
        (
            "/api/v1/extensions/provider/aws/1.0.0+build",
            "invalid_version",
        ),
        ("/api/v1/extensions/plugin/aws", "invalid_type"),
        ("/api/v1/extensions?type=plugin", "invalid_type"),
        ("/api/v1/extensions?source=s3", "invalid_parameter"),
        ("/api/v1/extensions?limit=abc", "invalid_parameter"),
        ("/api/v1/extensions?limit=-1", "invalid_parameter"),
        ("/api/v1/extensions?limit=1001", "invalid_parameter"),
        ("/api/v1/extensions?offset=1.5", "invalid_parameter"),
        (
            "/api/v1/extensions?offset=99999999999999999999999",
            "invalid_parameter",
        ),
        ("/api/v1/extensions?limit=%ff", "invalid_parameter"),
        ("/api/v1/extensions?type=%00", "invalid_parameter"),
        ("/api/v1/extensions/search", "invalid_parameter"),
        ("/api/v1/extensions/search?q=", "invalid_parameter"),
        (&long_q, "invalid_parameter"),
        (
            "/api/v1/extensions/search?q=aws&limit=0x10",
            "invalid_parameter",
        ),
        (&long_path, "invalid_path"),
        (&long_query, "invalid_parameter"),
        (
            "/api/v1/extensions?type=provider&type=bogus",
            "invalid_parameter",
        ),
        (
            "/api/v1/extensions?limit=1&offset=0&limit=1",
            "invalid_parameter",
        ),
        ("/api/v1/extensions/search?q=aws&q=gcp", "invalid_parameter"),
        (
            "/api/v1/extensions/provider/aws?source=local&so%75rce=oci",
            "invalid_parameter",
        ),
    ];
    for (uri, code) in cases {
        let answer = get(&app, uri).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{uri}");
        let json = answer.json();
        assert_eq!(json["error"], code, "{uri}: {json}");
        assert!(!json["message"].as_str().unwrap().is_empty());
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        0,
        "a hostile request reached the backend"
    );
    // Unknown query parameters are ignored.
    assert_eq!(
        get(&app, "/api/v1/extensions?colour=blue").await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn backend_faults_map_to_502_and_504_and_bugs_to_500() {
    let config = local_config(&samples(), "");
    let unavailable = app_with(&config, |_| async {
        Err(RegistryError::unavailable(Source::Local, "disk on fire"))
    });
    let answer = get(&unavailable, "/api/v1/extensions/provider/aws").await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    assert_eq!(answer.json()["error"], "backend_unavailable");
    assert!(answer.json()["message"].as_str().unwrap().contains("local"));

    let auth = app_with(&config, |_| async {
        Err(RegistryError::auth_failed(Source::Local))
    });
    assert_eq!(
        get(&auth, "/api/v1/extensions").await.json()["error"],
        "backend_auth_failed"
    );

    let slow = app_with(&config, |_| async {
        Err(RegistryError::timeout(Source::Local))
    });
    let answer = get(&slow, "/api/v1/extensions/provider/aws/versions").await;
    assert_eq!(answer.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(answer.json()["error"], "timeout");

    let buggy = app_with(&config, |_| async {
        Err(RegistryError::Internal("secret internals".into()))
    });
    let answer = get(&buggy, "/api/v1/extensions/provider/aws").await;
    assert_eq!(answer.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(answer.json()["error"], "internal");
    assert!(!String::from_utf8_lossy(&answer.body).contains("secret"));

    let panicking = app_with(&config, |_| async { panic!("a bug in a backend") });
    let answer = get(&panicking, "/api/v1/extensions/provider/aws").await;
    assert_eq!(answer.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(answer.json()["error"], "internal");
}

#[tokio::test(start_paused = true)]
async fn a_request_over_the_timeout_gets_504() {
    let config = local_config(&samples(), "[server]\nrequest_timeout_seconds = 2\n");
    let app = app_with(&config, |_| std::future::pending());
    let answer = get(&app, "/api/v1/extensions").await;
    assert_eq!(answer.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(answer.json()["error"], "timeout");
}

#[test]
fn the_example_configuration_parses_and_serves_the_samples() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config.example.toml");
    let config = Config::load(&path).unwrap();
    assert_eq!(config.server.port, 8082);
    assert_eq!(config.local.len(), 1);
    assert_eq!(config.local[0].path, samples());
    assert!(config.gitea.is_empty() && config.oci.is_empty() && config.github.is_empty());
    assert_eq!(
        Config::embedded().unwrap().server.shutdown_grace_seconds,
        30
    );
}

#[test]
fn configuration_errors_name_the_file_the_key_and_what_is_valid() {
    let typo = Config::parse(
        "[server]\nprot = 1\n[local]\npath = \".\"\n",
        "my.toml",
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(typo.starts_with("my.toml: "), "{typo}");
    assert!(typo.contains("prot") && typo.contains("port"), "{typo}");

    let section = Config::parse("[locale]\npath = \".\"\n", "my.toml", None)
        .unwrap_err()
        .to_string();
    assert!(section.contains("locale"), "{section}");

    let none = Config::parse("[server]\nport = 1\n", "my.toml", None)
        .unwrap_err()
        .to_string();
    assert!(
        none.contains("no backend configured") && none.contains("[local]"),
        "{none}"
    );

    let zero = Config::parse(
        "[local]\npath = \".\"\n[cache]\nttl_seconds = 0\n",
        "my.toml",
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(
        zero.contains("[cache] ttl_seconds") && zero.contains("above 0"),
        "{zero}"
    );

    let url = Config::parse(
        "[gitea]\nurl = \"not a url\"\norganization = \"x\"\n",
        "my.toml",
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(url.contains("[gitea] url"), "{url}");
}

#[test]
fn a_missing_token_file_is_an_error_naming_the_path() {
    let text = "[gitea]\nurl = \"http://127.0.0.1:1/\"\norganization = \"x\"\ntoken_path = \"/nonexistent/gitea-token\"\n";
    let config = Config::parse(text, "my.toml", None).unwrap();
    let err = match extension_registry::build(&config) {
        Ok(_) => panic!("a missing token file was accepted"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("/nonexistent/gitea-token") && err.contains("token_path"),
        "{err}"
    );
}

#[tokio::test]
async fn symlinks_leaving_the_root_are_refused() {
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret.tar.gz"), b"not yours").unwrap();
    std::fs::create_dir_all(outside.path().join("evil/1.0.0")).unwrap();
    std::fs::write(
        outside.path().join("evil/1.0.0/evil.tar.gz"),
        b"not yours either",
    )
    .unwrap();

    let root = tempfile::tempdir().unwrap();
    let version = root.path().join("provider/leak/1.0.0");
    std::fs::create_dir_all(&version).unwrap();
    std::os::unix::fs::symlink(
        outside.path().join("secret.tar.gz"),
        version.join("leak.tar.gz"),
    )
    .unwrap();
    std::fs::create_dir_all(root.path().join("provider")).unwrap();
    std::os::unix::fs::symlink(
        outside.path().join("evil"),
        root.path().join("provider/evil"),
    )
    .unwrap();
    let inside = root.path().join("provider/ok/1.0.0");
    std::fs::create_dir_all(&inside).unwrap();
    std::fs::write(inside.join("ok.tar.gz"), b"fine").unwrap();

    let backend = app::local_backend(root.path());
    let app = extension_registry::stack::app(
        &local_config(root.path(), ""),
        vec![(Source::Local, backend)],
    );
    let list = get(&app, "/api/v1/extensions").await.json();
    let names = app::field(&list, "name");
    assert_eq!(names, ["ok"]);
    for uri in [
        "/api/v1/extensions/provider/leak/1.0.0",
        "/api/v1/extensions/provider/evil/1.0.0",
        "/api/v1/extensions/provider/evil",
    ] {
        let answer = get(&app, uri).await;
        assert_eq!(answer.status, StatusCode::NOT_FOUND, "{uri}");
        assert!(!String::from_utf8_lossy(&answer.body).contains("not yours"));
    }
    assert_eq!(
        &get(&app, "/api/v1/extensions/provider/ok/latest")
            .await
            .body[..],
        b"fine"
    );
}

#[tokio::test]
async fn checksums_follow_file_changes() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("cluster/c/1.0.0");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("c.tar.gz"), b"one").unwrap();
    let app = extension_registry::stack::app(
        &local_config(
            root.path(),
            "[cache]\nenable_metadata_cache = false\nenable_list_cache = false\n",
        ),
        vec![(Source::Local, app::local_backend(root.path()))],
    );
    let first = get(&app, "/api/v1/extensions/cluster/c").await.json();
    assert_eq!(
        first["checksum"],
        format!("sha256:{:x}", Sha256::digest(b"one"))
    );
    std::fs::write(dir.join("c.tar.gz"), b"two, longer").unwrap();
    let second = get(&app, "/api/v1/extensions/cluster/c").await.json();
    assert_eq!(
        second["checksum"],
        format!("sha256:{:x}", Sha256::digest(b"two, longer"))
    );
}
