//! The whole stack while backends are sick: stale answers served at once while one refresh
//! runs, a backend that keeps failing cut off by its circuit breaker (and let back in), an
//! upstream `Retry-After` honoured, and probes that answer at once and hold no slot.
//!
//! The breaker test is the only one here with an OCI backend, so the process-wide
//! `backend_circuit_state{backend="oci"}` gauge is its alone.

#[allow(dead_code)]
#[path = "support/app.rs"]
mod app;
#[allow(dead_code)]
#[path = "support/gitea_sim.rs"]
mod gitea_sim;

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use app::{get, local_backend, local_config, samples, Answer};
use bytes::Bytes;
use extension_registry::config::GiteaConfig;
use extension_registry::registry::{
    BackendHealth, BackendRequest, BackendResponse, BackendService, Extension, ExtensionType,
    HealthReport, RegistryError, Source, Timestamp, HEALTH_PROBE_TIMEOUT,
};
use extension_registry::stack::{self, HttpService};
use futures_util::future::join_all;
use gitea_sim::{seeded_org, GiteaSim, Mode, SimConfig};
use http::StatusCode;
use http_body_util::BodyExt;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use tokio::sync::Semaphore;
use tower::{Service, ServiceExt};

/// No rate limit: these tests send many requests from one client.
const NO_RATE_LIMIT: &str = "[rate_limit]\nenabled = false\n";

fn extension(version: String) -> Extension {
    Extension {
        name: "aws".into(),
        ty: ExtensionType::Provider,
        version,
        description: String::new(),
        author: String::new(),
        repository: String::new(),
        source: Source::Local,
        instance: Source::Local.into(),
        published_at: Timestamp::unix_epoch(),
        download_url: String::new(),
        size: 0,
        checksum: None,
        tags: Vec::new(),
    }
}

/// A backend listing one extension at version `1.0.<call>`, whose calls can be held; health
/// probes are answered at once and not counted.
#[derive(Clone, Default)]
struct Listing {
    calls: Arc<AtomicUsize>,
    /// While set, calls wait for a permit of it.
    held: Arc<Mutex<Option<Arc<Semaphore>>>>,
}

impl Listing {
    fn service(&self) -> BackendService {
        let this = self.clone();
        BackendService::new(tower::service_fn(move |req: BackendRequest| {
            let this = this.clone();
            async move {
                if req == BackendRequest::Health {
                    return Ok(BackendResponse::Health(HealthReport(Vec::new())));
                }
                let call = this.calls.fetch_add(1, Ordering::SeqCst) + 1;
                let gate = this.held.lock().unwrap().clone();
                if let Some(gate) = gate {
                    let _permit = gate.acquire().await;
                }
                let listed = vec![extension(format!("1.0.{call}"))];
                Ok::<_, RegistryError>(BackendResponse::List(Arc::new(listed)))
            }
        }))
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn hold(&self) {
        *self.held.lock().unwrap() = Some(Arc::new(Semaphore::new(0)));
    }

    fn release(&self) {
        if let Some(gate) = self.held.lock().unwrap().take() {
            gate.add_permits(Semaphore::MAX_PERMITS);
        }
    }
}

fn version_listed(answer: &Answer) -> String {
    answer.json()[0]["version"].as_str().unwrap().to_owned()
}

/// Lets background work run (without moving a paused clock) until `done` holds.
async fn until(mut done: impl FnMut() -> bool) {
    for _ in 0..100_000 {
        if done() {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("the condition never held");
}

#[tokio::test(start_paused = true)]
async fn a_stale_listing_is_served_at_once_and_marked_while_one_refresh_runs() {
    let listing = Listing::default();
    let extra = format!("[cache]\nttl_seconds = 60\n{NO_RATE_LIMIT}");
    let config = local_config(&samples(), &extra);
    let app = stack::app(&config, vec![(Source::Local, listing.service())]);

    let fresh = get(&app, "/api/v1/extensions").await;
    assert_eq!(fresh.header("cache-control"), "public, max-age=60");
    assert!(fresh.headers.get("cache-status").is_none());
    assert_eq!(version_listed(&fresh), "1.0.1");

    // Past the TTL, within stale_while_revalidate_seconds (60 by default), with a backend
    // that does not answer: a hundred requests are answered at once (on the paused clock, any
    // wait would end the timeout), stale and saying so, from one backend call.
    tokio::time::advance(Duration::from_secs(61)).await;
    listing.hold();
    let requests = (0..100).map(|_| get(&app, "/api/v1/extensions"));
    let answers = tokio::time::timeout(Duration::from_millis(1), join_all(requests))
        .await
        .expect("stale answers come at once");
    for answer in &answers {
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(
            answer.header("cache-status"),
            "extension-registry; fwd=stale"
        );
        assert_eq!(answer.header("cache-control"), "public, max-age=0");
        assert_eq!(version_listed(answer), "1.0.1");
    }
    until(|| listing.calls() == 2).await;

    // The refresh ends: from the next request on, its answer, fresh.
    listing.release();
    let mut answer = get(&app, "/api/v1/extensions").await;
    for _ in 0..100_000 {
        if answer.headers.get("cache-status").is_none() {
            break;
        }
        tokio::task::yield_now().await;
        answer = get(&app, "/api/v1/extensions").await;
    }
    assert_eq!(answer.header("cache-control"), "public, max-age=60");
    assert_eq!(version_listed(&answer), "1.0.2");
    assert_eq!(listing.calls(), 2);
}

/// A backend that times out on every call but health probes while `failing`, and else finds
/// nothing; counting the calls that reach it.
#[derive(Clone, Default)]
struct Flaky {
    calls: Arc<AtomicUsize>,
    recovered: Arc<std::sync::atomic::AtomicBool>,
}

impl Flaky {
    fn service(&self, source: Source) -> BackendService {
        let this = self.clone();
        BackendService::new(tower::service_fn(move |req: BackendRequest| {
            let this = this.clone();
            async move {
                if req == BackendRequest::Health {
                    let health = BackendHealth {
                        source,
                        healthy: true,
                        detail: None,
                    };
                    return Ok(BackendResponse::Health(HealthReport(vec![health])));
                }
                this.calls.fetch_add(1, Ordering::SeqCst);
                if this.recovered.load(Ordering::SeqCst) {
                    Err(RegistryError::not_found("that extension"))
                } else {
                    Err(RegistryError::timeout(source))
                }
            }
        }))
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

fn metric_line(app_metrics: &str, line: &str) -> bool {
    app_metrics.lines().any(|l| l == line)
}

#[tokio::test(start_paused = true)]
async fn a_failing_backend_is_cut_off_by_its_breaker_and_let_back_in_by_a_probe() {
    let oci = Flaky::default();
    let config = local_config(&samples(), NO_RATE_LIMIT);
    let app: HttpService = stack::app(
        &config,
        vec![
            (Source::Oci, oci.service(Source::Oci)),
            (Source::Local, local_backend(&samples())),
        ],
    );
    app::probed(&app).await;

    // Five timeouts in a row (five different keys, so the cache asks each time) open it.
    for i in 0..5 {
        let answer = get(
            &app,
            &format!("/api/v1/extensions/provider/x{i}?source=oci"),
        )
        .await;
        assert_eq!(answer.status, StatusCode::GATEWAY_TIMEOUT);
    }
    assert_eq!(oci.calls(), 5);

    // Open: what needs the registry is refused at once, naming it, without calling it.
    let refused = get(&app, "/api/v1/extensions/provider/y?source=oci").await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refused.header("retry-after"), "10");
    let error = refused.json();
    assert_eq!(error["error"], "backend_unavailable");
    let message = error["message"].as_str().unwrap();
    assert!(message.starts_with("oci backend unavailable"), "{message}");
    assert!(message.contains("5 consecutive failures"), "{message}");

    // The merged listing is served from the healthy backend, marked partial.
    let listing = get(&app, "/api/v1/extensions?type=provider").await;
    assert_eq!(listing.status, StatusCode::OK);
    assert!(
        listing
            .header("cache-status")
            .contains("fwd=stale; fwd-status=503"),
        "{:?}",
        listing.headers
    );
    assert!(app::field(&listing.json(), "source")
        .iter()
        .all(|s| s == "local"));
    assert_eq!(oci.calls(), 5, "an open breaker lets no call through");

    let health = get(&app, "/api/v1/health").await.json();
    assert_eq!(health["status"], "degraded");
    assert_eq!(
        health["backends"]["oci"],
        serde_json::json!({"enabled": true, "healthy": false, "circuit": "open"})
    );
    let metrics = get(&app, "/api/v1/metrics").await;
    let metrics = std::str::from_utf8(&metrics.body).unwrap();
    assert!(
        metric_line(metrics, "backend_circuit_state{backend=\"oci\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("# HELP backend_circuit_state "),
        "{metrics}"
    );

    // After the cool-down one request probes it; an answer ("not found" is one) closes it.
    tokio::time::advance(Duration::from_secs(10)).await;
    oci.recovered.store(true, Ordering::SeqCst);
    let probe = get(&app, "/api/v1/extensions/provider/z?source=oci").await;
    assert_eq!(probe.status, StatusCode::NOT_FOUND);
    assert_eq!(oci.calls(), 6);
    let health = get(&app, "/api/v1/health").await.json();
    assert_eq!(health["backends"]["oci"]["circuit"], "closed");
    let metrics = get(&app, "/api/v1/metrics").await;
    let metrics = std::str::from_utf8(&metrics.body).unwrap();
    assert!(
        metric_line(metrics, "backend_circuit_state{backend=\"oci\"} 0"),
        "{metrics}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_backend_that_never_answers_its_probe_leaves_the_others_healthy() {
    let silent = tower::service_fn(|req: BackendRequest| async move {
        if req == BackendRequest::Health {
            std::future::pending::<()>().await;
        }
        Err::<BackendResponse, _>(RegistryError::not_found("anything"))
    });
    let config = local_config(&samples(), NO_RATE_LIMIT);
    let answering = Flaky::default().service(Source::Local);
    let app = stack::app(
        &config,
        vec![
            (Source::Gitea, BackendService::new(silent)),
            (Source::Local, answering),
        ],
    );
    tokio::task::yield_now().await;
    tokio::time::advance(HEALTH_PROBE_TIMEOUT).await;
    app::probed(&app).await;
    let health = get(&app, "/api/v1/health").await;
    assert_eq!(health.status, StatusCode::OK);
    let health = health.json();
    assert_eq!(health["status"], "degraded", "{health}");
    assert_eq!(health["backends"]["local"]["healthy"], true, "{health}");
    assert_eq!(health["backends"]["gitea"]["healthy"], false, "{health}");
    assert_eq!(get(&app, "/readyz").await.status, StatusCode::OK);
}

/// A "Gitea" behind a proxy answering every API call `429` with `Retry-After: 120`, counting
/// the calls other than health probes.
async fn throttling_gitea() -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let counted = counted.clone();
            let service = hyper::service::service_fn(move |req: hyper::Request<_>| {
                if req.uri().path() != "/api/v1/version" {
                    counted.fetch_add(1, Ordering::SeqCst);
                }
                let mut answer = hyper::Response::new(Full::new(Bytes::from_static(
                    b"{\"message\":\"rate limit exceeded\"}",
                )));
                *answer.status_mut() = StatusCode::TOO_MANY_REQUESTS;
                answer
                    .headers_mut()
                    .insert("retry-after", http::HeaderValue::from_static("120"));
                async { Ok::<_, Infallible>(answer) }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    (url, calls)
}

#[tokio::test]
async fn an_upstream_retry_after_is_passed_on_and_the_backend_not_called_before_it() {
    let (url, calls) = throttling_gitea().await;
    let mut config = local_config(&samples(), NO_RATE_LIMIT);
    config.gitea = vec![GiteaConfig {
        name: None,
        priority: None,
        url,
        organization: "extensions".into(),
        token_path: None,
        timeout_seconds: 5,
        verify_ssl: true,
        max_concurrency: 8,
        include_archived: false,
        webhook_secret_path: None,
    }];
    let app = extension_registry::build(&config).unwrap();

    let first = get(&app, "/api/v1/extensions?source=gitea").await;
    assert_eq!(first.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(first.header("retry-after"), "120");
    assert_eq!(first.json()["error"], "backend_unavailable");
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    // Another request needing Gitea: refused here, with what is left of the wait.
    let second = get(&app, "/api/v1/extensions/provider/aws?source=gitea").await;
    assert_eq!(second.status, StatusCode::SERVICE_UNAVAILABLE);
    let retry_after: u64 = second.header("retry-after").parse().unwrap();
    assert!((110..=120).contains(&retry_after), "{retry_after}");
    assert!(second.json()["message"].as_str().unwrap().contains("429"));
    assert_eq!(calls.load(Ordering::SeqCst), 1, "not called before it said");

    // The rest of the service is untouched.
    let local = get(&app, "/api/v1/extensions?source=local").await;
    assert_eq!(local.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_health_requests_beside_a_slow_gitea_answer_at_once_and_hold_no_slot() {
    let sim = GiteaSim::start(SimConfig::new("extensions").repos(seeded_org(3))).await;
    sim.set_mode(Mode::Slow);
    let extra = format!("[server]\nmax_concurrent_requests = 8\n{NO_RATE_LIMIT}");
    let mut config = local_config(&samples(), &extra);
    config.gitea = vec![GiteaConfig {
        timeout_seconds: 60,
        ..sim.gitea_config()
    }];
    let app = extension_registry::build(&config).unwrap();

    // The background probe is stuck on Gitea (until its 5 s timeout); meanwhile 2,000 health
    // requests, and a listing beside them, which must not find the service full.
    let mut health = Vec::new();
    for _ in 0..2000 {
        let mut app = app.clone();
        let request = http::Request::get("/api/v1/health")
            .body(extension_registry::body::empty())
            .unwrap();
        let call = app.ready().await.unwrap().call(request);
        health.push(tokio::spawn(async move {
            let body = call.await.unwrap().into_body().collect().await.unwrap();
            serde_json::from_slice::<serde_json::Value>(&body.to_bytes()).unwrap()
        }));
    }
    let listing = get(&app, "/api/v1/extensions?source=local").await;
    assert_eq!(listing.status, StatusCode::OK, "{:?}", listing.body);

    // Far below the probe's 5 s timeout, which answers waiting on the probe would take.
    let answers = tokio::time::timeout(Duration::from_secs(4), join_all(health))
        .await
        .expect("health answers at once");
    for answer in answers {
        let body = answer.unwrap();
        assert!(body.get("error").is_none(), "{body}");
        assert_eq!(body["backends"]["gitea"]["enabled"], true, "{body}");
    }
}
