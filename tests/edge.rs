//! The HTTP edge as a whole: CORS on every kind of answer, the 429, 503 and 504 paths through
//! the full stack, and the metrics they leave, in-process and through a real socket; HTTP/1.1
//! conformance on the wire (Host, OPTIONS), content negotiation that never refuses, and logs.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use extension_registry::body::{self, Body};
use extension_registry::config::Config;
use extension_registry::registry::{
    BackendRequest, BackendResponse, BackendService, HealthReport, Source,
};
use extension_registry::server::{self, PeerAddr};
use extension_registry::stack::{self, HttpService};
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use tokio::sync::Notify;
use tower::ServiceExt;

type Answer = Pin<Box<dyn Future<Output = BackendResponse> + Send>>;

/// The whole app over one backend answering with `answer`; the counter says how often the
/// backend was asked. The background health probes are answered at once and not counted.
fn app(extra_config: &str, answer: fn() -> Answer) -> (HttpService, Arc<AtomicUsize>) {
    let text = format!("[local]\npath = \".\"\n{extra_config}");
    let config = Config::parse(&text, "test", None).unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let backend = tower::service_fn(move |req: BackendRequest| {
        let probe = req == BackendRequest::Health;
        if !probe {
            counter.fetch_add(1, Ordering::SeqCst);
        }
        async move {
            Ok(match probe {
                true => BackendResponse::Health(HealthReport(Vec::new())),
                false => answer().await,
            })
        }
    });
    let backends = vec![(Source::Local, BackendService::new(backend))];
    (stack::app(&config, backends), calls)
}

fn empty_list() -> Answer {
    Box::pin(async { BackendResponse::List(Arc::new(Vec::new())) })
}

fn never() -> Answer {
    Box::pin(std::future::pending())
}

fn get(uri: &str) -> Request<Body> {
    let mut req = Request::get(uri)
        .header("host", "registry.example")
        .header("origin", "https://app.example.com")
        .body(body::empty())
        .unwrap();
    req.extensions_mut()
        .insert(PeerAddr("192.0.2.10:50000".parse().unwrap()));
    req
}

async fn call(app: &HttpService, req: Request<Body>) -> Response<Body> {
    app.clone().oneshot(req).await.unwrap()
}

async fn json(response: Response<Body>) -> serde_json::Value {
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&bytes).unwrap()
}

fn header<'r>(response: &'r Response<Body>, name: &str) -> &'r str {
    response
        .headers()
        .get(name)
        .unwrap_or_else(|| panic!("no {name} header"))
        .to_str()
        .unwrap()
}

#[tokio::test]
async fn preflights_are_answered_without_touching_the_stack() {
    let (app, calls) = app("[rate_limit]\nburst = 1\n", empty_list);
    // A revalidation, a resumed download, and a JSON POST (the batch resolve, the hooks).
    for (path, method, headers) in [
        ("/api/v1/extensions", "GET", "if-none-match"),
        (
            "/api/v1/extensions/provider/aws/1.0.0",
            "GET",
            "range,if-range",
        ),
        ("/api/v1/resolve", "POST", "content-type,x-request-id"),
    ] {
        let mut req = get(path);
        *req.method_mut() = Method::OPTIONS;
        let asked = req.headers_mut();
        asked.insert("access-control-request-method", method.parse().unwrap());
        asked.insert("access-control-request-headers", headers.parse().unwrap());
        let response = call(&app, req).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(header(&response, "access-control-allow-origin"), "*");
        assert_eq!(
            header(&response, "access-control-allow-methods"),
            "GET,HEAD,POST"
        );
        let allowed = header(&response, "access-control-allow-headers");
        for name in headers.split(',') {
            assert!(allowed.contains(name), "{name} not allowed: {allowed}");
        }
        assert_eq!(header(&response, "access-control-max-age"), "86400");
        assert!(!response
            .headers()
            .contains_key("access-control-allow-credentials"));
    }
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    // Nor do preflights use the client's quota.
    assert_eq!(
        call(&app, get("/api/v1/extensions")).await.status(),
        StatusCode::OK
    );
}

#[tokio::test]
async fn with_any_origin_every_simple_answer_carries_the_same_cors_headers() {
    let (app, _) = app("", empty_list);
    let browser = call(&app, get("/api/v1/extensions")).await;
    let mut plain = get("/api/v1/extensions");
    plain.headers_mut().remove("origin");
    let tool = call(&app, plain).await;
    assert_eq!(tool.status(), StatusCode::OK);
    assert_eq!(header(&browser, "access-control-allow-origin"), "*");
    // Cached for one client, right for any: same CORS headers and `Vary` with or without
    // `Origin`.
    let cors = |response: &Response<Body>| -> Vec<(String, String)> {
        response
            .headers()
            .iter()
            .filter(|(name, _)| name.as_str().starts_with("access-control-") || *name == "vary")
            .map(|(name, value)| (name.to_string(), value.to_str().unwrap().to_owned()))
            .collect()
    };
    assert_eq!(cors(&tool), cors(&browser));
    assert!(cors(&tool)
        .iter()
        .any(|(name, _)| name == "access-control-expose-headers"));
}

#[tokio::test]
async fn configured_origins_are_the_only_ones_allowed() {
    let config = "[server]\ncors_allowed_origins = [\"https://app.example.com\"]\n";
    let (app, _) = app(config, empty_list);
    let allowed = call(&app, get("/api/v1/extensions")).await;
    assert_eq!(
        header(&allowed, "access-control-allow-origin"),
        "https://app.example.com"
    );
    // Shared caches must not hand one origin's answer to another.
    let vary: Vec<_> = allowed
        .headers()
        .get_all("vary")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    assert!(vary.iter().any(|v| v.contains("origin")), "{vary:?}");
    let mut other = get("/api/v1/extensions");
    other
        .headers_mut()
        .insert("origin", "https://evil.example.net".parse().unwrap());
    let refused = call(&app, other).await;
    assert!(!refused
        .headers()
        .contains_key("access-control-allow-origin"));
}

#[tokio::test]
async fn a_429_carries_cors_and_rate_limit_headers() {
    let (app, calls) = app(
        "[rate_limit]\nrequests_per_second = 1\nburst = 1\n",
        empty_list,
    );
    let ok = call(&app, get("/api/v1/extensions")).await;
    assert_eq!(ok.status(), StatusCode::OK);
    let exposed = header(&ok, "access-control-expose-headers");
    for name in [
        "x-total-count",
        "etag",
        "retry-after",
        "ratelimit-remaining",
        "x-request-id",
        "content-range",
        "accept-ranges",
    ] {
        assert!(exposed.contains(name), "{name} not exposed: {exposed}");
    }
    let refused = call(&app, get("/api/v1/extensions")).await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&refused, "access-control-allow-origin"), "*");
    assert_eq!(header(&refused, "retry-after"), "1");
    assert_eq!(header(&refused, "ratelimit-limit"), "1");
    assert_eq!(header(&refused, "ratelimit-remaining"), "0");
    assert!(refused.headers().contains_key("x-request-id"));
    assert_eq!(json(refused).await["error"], "rate_limited");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "the 429 reached no backend"
    );
    // Probes are exempt.
    assert_eq!(call(&app, get("/livez")).await.status(), StatusCode::OK);
}

#[tokio::test]
async fn a_request_over_the_timeout_is_a_504_with_cors_headers() {
    tokio::time::pause();
    let (app, _) = app("[server]\nrequest_timeout_seconds = 2\n", never);
    // The paused clock jumps to the deadline as soon as everything is idle.
    let response = call(&app, get("/api/v1/extensions")).await;
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(header(&response, "access-control-allow-origin"), "*");
    assert_eq!(json(response).await["error"], "timeout");
}

static RELEASE: Notify = Notify::const_new();
static ENTERED: Notify = Notify::const_new();

fn held() -> Answer {
    Box::pin(async {
        ENTERED.notify_one();
        RELEASE.notified().await;
        BackendResponse::List(Arc::new(Vec::new()))
    })
}

#[tokio::test]
async fn at_the_concurrency_limit_requests_are_shed_with_503() {
    let (app, _) = app("[server]\nmax_concurrent_requests = 1\n", held);
    let first = tokio::spawn(app.clone().oneshot(get("/api/v1/extensions")));
    ENTERED.notified().await;

    let shed = call(&app, get("/api/v1/extensions")).await;
    assert_eq!(shed.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(header(&shed, "retry-after"), "1");
    assert_eq!(header(&shed, "access-control-allow-origin"), "*");
    assert_eq!(json(shed).await["error"], "overloaded");

    RELEASE.notify_one();
    assert_eq!(first.await.unwrap().unwrap().status(), StatusCode::OK);
    // The slot is free again (another listing, so the cache cannot answer it).
    let next = tokio::spawn(app.clone().oneshot(get("/api/v1/extensions?type=cluster")));
    ENTERED.notified().await;
    RELEASE.notify_one();
    assert_eq!(next.await.unwrap().unwrap().status(), StatusCode::OK);
}

static CLIENT_RELEASE: Notify = Notify::const_new();
static CLIENT_ENTERED: Notify = Notify::const_new();

fn held_for_a_client() -> Answer {
    Box::pin(async {
        CLIENT_ENTERED.notify_one();
        CLIENT_RELEASE.notified().await;
        BackendResponse::List(Arc::new(Vec::new()))
    })
}

#[tokio::test]
async fn a_client_at_its_share_of_the_requests_in_progress_gets_429() {
    let (app, _) = app("[server]\nmax_requests_per_client = 1\n", held_for_a_client);
    let first = tokio::spawn(app.clone().oneshot(get("/api/v1/extensions")));
    CLIENT_ENTERED.notified().await;

    // Its next request is refused at once, whatever it asks for.
    let refused = call(&app, get("/api/v1/openapi.json")).await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&refused, "retry-after"), "1");
    assert_eq!(header(&refused, "access-control-allow-origin"), "*");
    assert_eq!(json(refused).await["error"], "rate_limited");
    // Another client is answered, and so are the probes.
    let mut other = get("/api/v1/openapi.json");
    other
        .extensions_mut()
        .insert(PeerAddr("192.0.2.11:50000".parse().unwrap()));
    assert_eq!(call(&app, other).await.status(), StatusCode::OK);
    assert_eq!(call(&app, get("/livez")).await.status(), StatusCode::OK);

    CLIENT_RELEASE.notify_one();
    assert_eq!(first.await.unwrap().unwrap().status(), StatusCode::OK);
    // Its place is free again.
    let again = call(&app, get("/api/v1/openapi.json")).await;
    assert_eq!(again.status(), StatusCode::OK);
}

/// Serves `app` on a loopback port until the returned sender is dropped.
async fn serve(app: HttpService) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(server::run(
        listener,
        app,
        async {
            stopped.await.ok();
        },
        Duration::from_secs(1),
    ));
    (addr, stop)
}

/// Through a real socket and the real local backend over the sample extensions: the client
/// is keyed by its address, and every metric of the edge shows up in the exposition.
#[tokio::test]
async fn through_a_socket_clients_are_limited_and_metrics_are_exposed() {
    let mut config = Config::embedded().unwrap();
    config.rate_limit.requests_per_second = 1.try_into().unwrap();
    config.rate_limit.burst = 8.try_into().unwrap();
    let (addr, _stop) = serve(extension_registry::build(&config).unwrap()).await;
    let client = reqwest::Client::new();
    let base = format!("http://{addr}");
    let fetch = |path: &str| client.get(format!("{base}{path}")).send();

    let list = fetch("/api/v1/extensions").await.unwrap();
    assert_eq!(list.status(), 200);
    assert_eq!(list.headers()["ratelimit-remaining"], "7");
    let download = fetch("/api/v1/extensions/cluster/web/0.3.0").await.unwrap();
    assert_eq!(download.status(), 200);
    let bytes = download.bytes().await.unwrap().len();
    assert!(bytes > 0);
    for _ in 0..6 {
        fetch("/api/v1/extensions/provider/nope").await.unwrap();
    }
    let refused = fetch("/api/v1/extensions").await.unwrap();
    assert_eq!(refused.status(), 429);
    assert!(refused.headers().contains_key("retry-after"));

    // The metrics endpoint is exempt from the limit.
    let metrics = fetch("/api/v1/metrics").await.unwrap();
    assert_eq!(metrics.status(), 200);
    let text = metrics.text().await.unwrap();
    for line in [
        r#"http_requests_total{method="GET",route="/api/v1/extensions",status="200"}"#,
        r#"http_requests_total{method="GET",route="/api/v1/extensions",status="429"}"#,
        r#"http_requests_total{method="GET",route="/api/v1/extensions/{type}/{name}",status="404"}"#,
        r#"http_request_duration_seconds_bucket{route="/api/v1/extensions/{type}/{name}/{version}",le="+Inf"}"#,
        r#"backend_requests_total{backend="local",operation="list",outcome="ok"}"#,
        r#"backend_requests_total{backend="local",operation="get",outcome="not_found"}"#,
        r#"backend_request_duration_seconds_bucket{backend="local",operation="download",outcome="ok",le="+Inf"}"#,
        r#"extensions_total{backend="local",type="cluster"}"#,
        "# HELP rate_limited_total",
        "# TYPE http_request_duration_seconds histogram",
    ] {
        assert!(text.contains(line), "missing {line} in\n{text}");
    }
    let downloaded: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix(r#"download_bytes_total{backend="local"} "#))
        .expect("download_bytes_total")
        .parse()
        .unwrap();
    assert!(downloaded >= bytes as u64);
    let limited: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("rate_limited_total "))
        .expect("rate_limited_total")
        .parse()
        .unwrap();
    assert!(limited >= 1);
}

/// Sends `request` as raw bytes and reads the answer until the server closes.
async fn raw(addr: SocketAddr, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), stream.read_to_end(&mut answer))
        .await
        .expect("the server answers and closes")
        .unwrap();
    String::from_utf8_lossy(&answer).into_owned()
}

/// RFC 9112 §3.2: an HTTP/1.1 request without `Host`, or with two, is a 400; and every path,
/// `*` included, answers an OPTIONS that is no CORS preflight with 405 and `Allow`.
#[tokio::test]
async fn over_the_wire_host_is_required_once_and_options_get_405() {
    let (addr, _stop) =
        serve(extension_registry::build(&Config::embedded().unwrap()).unwrap()).await;
    let close = "Connection: close\r\n";
    for (request, status) in [
        (format!("GET /livez HTTP/1.1\r\n{close}\r\n"), "400"),
        (
            format!("GET /livez HTTP/1.1\r\nHost: a\r\nHost: b\r\n{close}\r\n"),
            "400",
        ),
        (
            format!("GET /livez HTTP/1.1\r\nHost: a\r\n{close}\r\n"),
            "200",
        ),
        ("GET /livez HTTP/1.0\r\n\r\n".to_owned(), "200"),
        (
            format!("OPTIONS * HTTP/1.1\r\nHost: a\r\n{close}\r\n"),
            "405",
        ),
        (
            format!("OPTIONS /nope HTTP/1.1\r\nHost: a\r\n{close}\r\n"),
            "405",
        ),
        (
            format!(
                "OPTIONS /livez HTTP/1.1\r\nHost: a\r\nOrigin: https://x.example\r\n{close}\r\n"
            ),
            "405",
        ),
        (
            format!(
                "OPTIONS /nope HTTP/1.1\r\nHost: a\r\nOrigin: https://x.example\r\n\
                 Access-Control-Request-Method: GET\r\n{close}\r\n"
            ),
            "200",
        ),
    ] {
        let answer = raw(addr, &request).await;
        let status_line = answer.lines().next().unwrap_or_default();
        assert!(
            status_line.starts_with(&format!("HTTP/1.1 {status}"))
                || status_line.starts_with(&format!("HTTP/1.0 {status}")),
            "{request:?} got {answer}"
        );
        let lower = answer.to_ascii_lowercase();
        match status {
            "400" => assert!(answer.contains("\"invalid_host\""), "{answer}"),
            "405" => assert!(lower.contains("\r\nallow: get, head\r\n"), "{answer}"),
            _ => {}
        }
    }
}

/// `Accept-Encoding` refusing every coding, identity included, is served identity: never a
/// 406, whether the answer is JSON, an error, a 304 or a download.
#[tokio::test]
async fn a_client_refusing_identity_is_served_identity_never_406() {
    let app = extension_registry::build(&Config::embedded().unwrap()).unwrap();
    let ask = |uri: &str, extra: Option<(&'static str, String)>| {
        let mut req = get(uri);
        req.headers_mut()
            .insert("accept-encoding", "identity;q=0, *;q=0".parse().unwrap());
        if let Some((name, value)) = extra {
            req.headers_mut().insert(name, value.parse().unwrap());
        }
        call(&app, req)
    };
    let list = ask("/api/v1/extensions", None).await;
    assert_eq!(list.status(), StatusCode::OK);
    let etag = header(&list, "etag").to_owned();
    let cases = [
        (ask("/livez", None).await, StatusCode::OK),
        (list, StatusCode::OK),
        (
            ask("/api/v1/extensions/provider/nope", None).await,
            StatusCode::NOT_FOUND,
        ),
        (
            ask("/api/v1/extensions", Some(("if-none-match", etag))).await,
            StatusCode::NOT_MODIFIED,
        ),
        (
            ask("/api/v1/extensions/cluster/web/0.3.0", None).await,
            StatusCode::OK,
        ),
        (ask("/api/v1/metrics", None).await, StatusCode::OK),
    ];
    for (response, status) in cases {
        assert_eq!(response.status(), status);
        assert!(!response.headers().contains_key("content-encoding"));
    }
}

/// Logs written where no terminal reads them carry no colour codes.
#[test]
fn logs_to_a_pipe_carry_no_colour_codes() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_extension-registry"))
        .args(["--config", "/nonexistent/extension-registry.toml"])
        .env_remove("NO_COLOR")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("ERROR"), "{stdout}");
    assert!(
        stdout.contains("cannot read the configuration file"),
        "{stdout}"
    );
    assert!(!stdout.contains('\x1b'), "{stdout:?}");
}

/// Resident memory of this process, in bytes.
fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

/// 200,000 distinct requests a hostile client can make without end (pages past the end,
/// `limit=0`, one-off searches) leave the memo within its bound, with few entries, and the
/// process's memory nearly where it was.
#[tokio::test]
async fn a_sweep_of_distinct_keys_leaves_memory_bounded() {
    let mut config = Config::embedded().unwrap();
    config.rate_limit.enabled = false;
    let app = extension_registry::build(&config).unwrap();
    let total = call(&app, get("/api/v1/extensions?limit=1")).await;
    let total: u32 = header(&total, "x-total-count").parse().unwrap();
    let before = rss();
    for i in 0..200_000u32 {
        let uri = match i % 3 {
            0 => format!("/api/v1/extensions?offset={}", total + i),
            1 => format!("/api/v1/extensions?limit=0&offset={i}"),
            _ => format!("/api/v1/extensions/search?q=zz{i}"),
        };
        let response = call(&app, get(&uri)).await;
        assert_eq!(response.status(), StatusCode::OK, "{uri}");
    }
    let grown = rss().saturating_sub(before);
    let stats = json(call(&app, get("/api/v1/cache/stats")).await).await;
    let (entries, bytes, max) = (
        stats["rendered_entries"].as_u64().unwrap(),
        stats["rendered_bytes"].as_u64().unwrap(),
        stats["rendered_max_bytes"].as_u64().unwrap(),
    );
    eprintln!("after 200,000 keys: memo {entries} entries, {bytes} bytes; RSS grew {grown} bytes");
    assert!(bytes <= max, "{bytes} > {max}");
    assert!(
        entries <= 4,
        "{entries} entries: past-the-end pages share one, searches wait"
    );
    assert!(
        grown < max,
        "RSS grew {grown} bytes, over the memo's bound {max}"
    );
}
