//! The service through real sockets: `server::run` on port 0 with graceful shutdown, and the
//! binary itself with its embedded default configuration and SIGTERM.

#[allow(dead_code)]
#[path = "support/app.rs"]
mod app;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use extension_registry::registry::{Artifact, BackendRequest, BackendResponse, Served};
use extension_registry::server;
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

/// `app` served by `server::run` on a free loopback port: its address, the sender that stops
/// it, and its task.
async fn start(
    app: extension_registry::stack::HttpService,
    grace: Duration,
) -> (
    SocketAddr,
    oneshot::Sender<()>,
    tokio::task::JoinHandle<std::io::Result<()>>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let server = tokio::spawn(server::run(
        listener,
        app,
        async {
            let _ = stop_rx.await;
        },
        grace,
    ));
    (addr, stop_tx, server)
}

/// Sends a raw HTTP/1.1 request and returns the connection for reading the answer.
async fn request(addr: SocketAddr, path: &str) -> std::io::Result<TcpStream> {
    let mut stream = TcpStream::connect(addr).await?;
    let head = format!("GET {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n");
    stream.write_all(head.as_bytes()).await?;
    Ok(stream)
}

#[tokio::test]
async fn graceful_shutdown_finishes_a_slow_download_and_refuses_new_connections() {
    // A download whose bytes the test releases one chunk at a time.
    let (chunks_tx, chunks_rx) = mpsc::channel::<Bytes>(4);
    let chunks_rx = std::sync::Arc::new(tokio::sync::Mutex::new(Some(chunks_rx)));
    let config = app::local_config(&app::samples(), "");
    let app = app::app_with(&config, move |req| {
        let chunks_rx = chunks_rx.clone();
        async move {
            match req {
                BackendRequest::Download { .. } => {
                    let rx = chunks_rx.lock().await.take().expect("one download");
                    let frames = futures_util::stream::unfold(rx, |mut rx| async move {
                        rx.recv()
                            .await
                            .map(|b| (Ok::<_, extension_registry::BoxError>(Frame::data(b)), rx))
                    });
                    Ok(BackendResponse::Artifact(Artifact {
                        filename: "slow-1.0.0.tar.gz".into(),
                        content_length: Some(10),
                        checksum: None,
                        served: Served::Whole,
                        body: StreamBody::new(frames).boxed_unsync(),
                    }))
                }
                _ => Err(extension_registry::registry::RegistryError::not_found("x")),
            }
        }
    });
    let (addr, stop_tx, server) = start(app, Duration::from_secs(30)).await;

    let mut download = request(addr, "/api/v1/extensions/provider/slow/1.0.0")
        .await
        .unwrap();
    chunks_tx.send(Bytes::from_static(b"hello")).await.unwrap();
    let mut head = vec![0u8; 1024];
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("hello") {
        let n = download.read(&mut head).await.unwrap();
        assert!(n > 0, "connection closed early");
        seen.extend_from_slice(&head[..n]);
    }
    assert!(String::from_utf8_lossy(&seen).starts_with("HTTP/1.1 200"));

    stop_tx.send(()).unwrap();
    // Once the accept loop has stopped, connecting is refused. Connections that raced the
    // stop are closed unanswered.
    let mut refused = false;
    for _ in 0..10_000 {
        match request(addr, "/livez").await {
            Err(_) => {
                refused = true;
                break;
            }
            Ok(mut stream) => {
                let mut buf = Vec::new();
                let _ = stream.read_to_end(&mut buf).await;
                tokio::task::yield_now().await;
            }
        }
    }
    assert!(
        refused,
        "new connections were still accepted after shutdown began"
    );
    assert!(
        !server.is_finished(),
        "the server stopped before the download finished"
    );

    chunks_tx.send(Bytes::from_static(b"world")).await.unwrap();
    drop(chunks_tx);
    download.read_to_end(&mut seen).await.unwrap();
    assert!(
        String::from_utf8_lossy(&seen).ends_with("helloworld"),
        "{}",
        String::from_utf8_lossy(&seen)
    );
    server.await.unwrap().unwrap();
}

/// Kept-alive connections with nothing in flight, HTTP/1 and HTTP/2, are closed as soon as
/// the service stops (HTTP/2 with a GOAWAY), and the service then ends without waiting out
/// its grace period. Left open, they would last their keep-alive timeout (60 s).
#[tokio::test]
async fn shutdown_closes_idle_kept_alive_connections_at_once() {
    let (app, _) = app::sample_app();
    let (addr, stop_tx, server) = start(app, Duration::from_secs(3600)).await;

    let mut http1 = TcpStream::connect(addr).await.unwrap();
    http1
        .write_all(b"GET /livez HTTP/1.1\r\nhost: test\r\n\r\n")
        .await
        .unwrap();
    let mut head = [0u8; 1024];
    let n = http1.read(&mut head).await.unwrap();
    assert!(head[..n].starts_with(b"HTTP/1.1 200"));

    let (http2, connection) = h2::client::handshake(TcpStream::connect(addr).await.unwrap())
        .await
        .unwrap();
    let connection = tokio::spawn(connection);
    let request = http::Request::get("http://test/livez").body(()).unwrap();
    let (response, _) = http2
        .ready()
        .await
        .unwrap()
        .send_request(request, true)
        .unwrap();
    assert_eq!(response.await.unwrap().status(), 200);

    stop_tx.send(()).unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(30), async {
        let mut rest = Vec::new();
        http1.read_to_end(&mut rest).await.unwrap();
        let _ = connection.await.unwrap();
        server.await.unwrap().unwrap();
    })
    .await;
    assert!(
        closed.is_ok(),
        "idle connections were left open after the service stopped"
    );
}

#[tokio::test]
async fn serves_the_samples_over_http1_and_h2c() {
    let (app, _) = app::sample_app();
    let (addr, stop_tx, server) = start(app, Duration::from_secs(5)).await;

    let http1 = reqwest::Client::new();
    let list: serde_json::Value = http1
        .get(format!("http://{addr}/api/v1/extensions?type=provider"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list.as_array().unwrap().len(), 3);

    let h2c = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let response = h2c
        .get(format!(
            "http://{addr}/api/v1/extensions/taskserv/kubernetes/latest"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(response.version(), http::Version::HTTP_2);
    let bytes = response.bytes().await.unwrap();
    let file =
        std::fs::read(app::samples().join("taskserv/kubernetes/1.29.0/kubernetes-1.29.0.tar.gz"))
            .unwrap();
    assert_eq!(&bytes[..], &file[..]);

    // A request body reaches the handler over either protocol (GETs, whose bodies have
    // ended when they arrive, are given the empty body instead).
    let plan = serde_json::json!({"requirements": [
        {"type": "provider", "name": "aws", "constraint": "^1"},
    ]});
    for client in [&http1, &h2c] {
        let response = client
            .post(format!("http://{addr}/api/v1/resolve"))
            .header("content-type", "application/json")
            .body(plan.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), http::StatusCode::OK);
        let answer: serde_json::Value = response.json().await.unwrap();
        assert_eq!(answer["resolved"][0]["version"], "v1.2.0", "{answer}");
    }

    stop_tx.send(()).unwrap();
    server.await.unwrap().unwrap();
}

/// The binary on a free loopback port with JSON logs and `args`: the child, the address it
/// listens on, and the rest of its log lines.
fn spawn_binary(
    args: &[&std::ffi::OsStr],
) -> (
    std::process::Child,
    String,
    impl Iterator<Item = std::io::Result<String>>,
) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_extension-registry"))
        .args(["--host", "127.0.0.1", "--port", "0", "--json-log"])
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let address = lines
        .by_ref()
        .map_while(Result::ok)
        .find_map(|line| {
            let json: serde_json::Value = serde_json::from_str(&line).ok()?;
            (json["message"] == "listening").then(|| json["address"].as_str().unwrap().to_owned())
        })
        .expect("the binary logs its address");
    (child, address, lines)
}

/// The binary's metrics exposition.
fn metrics_of(runtime: &tokio::runtime::Runtime, address: &str) -> String {
    runtime.block_on(async {
        let response = reqwest::get(format!("http://{address}/api/v1/metrics"));
        response.await.unwrap().text().await.unwrap()
    })
}

#[test]
fn the_binary_serves_its_embedded_default_and_exits_0_on_sigterm() {
    let (mut child, address, lines) = spawn_binary(&[]);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let names = runtime.block_on(async {
        let list: serde_json::Value =
            reqwest::get(format!("http://{address}/api/v1/extensions?type=cluster"))
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
        list.as_array()
            .unwrap()
            .iter()
            .map(|e| e["name"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    });
    assert_eq!(names, ["buildkit", "web"]);
    // The limits' metrics are there before anything hits them.
    let metrics = metrics_of(&runtime, &address);
    for line in [
        "# TYPE http_connections_open gauge",
        "download_stalled_total 0",
        "http_connections_refused_total 0",
        "downloads_in_flight 0",
        r#"overloaded_total{limit="request_bodies"} 0"#,
    ] {
        assert!(metrics.contains(line), "no {line:?} in\n{metrics}");
    }
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = child.wait().unwrap();
    assert_eq!(exit.code(), Some(0));
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(
        rest.iter().any(|l| l.contains("request finished")),
        "one log line per request: {rest:?}"
    );
    assert!(rest.iter().any(|l| l.contains("stopped")), "{rest:?}");
}

#[test]
fn a_redis_that_never_answers_is_shown_unavailable_from_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("redis.toml");
    let text = format!(
        "[local]\npath = {:?}\n[redis]\nurl = \"redis://127.0.0.1:1/\"\n",
        app::samples().display().to_string()
    );
    std::fs::write(&config, text).unwrap();
    let (mut child, address, _) = spawn_binary(&["--config".as_ref(), config.as_os_str()]);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let metrics = metrics_of(&runtime, &address);
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(metrics.contains("redis_available 0"), "{metrics}");
}

#[test]
fn check_config_exits_0_when_valid_and_1_with_the_reason_otherwise() {
    let bin = env!("CARGO_BIN_EXE_extension-registry");
    let ok = Command::new(bin)
        .args(["--check-config", "--config", "config.example.toml"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stdout)
    );
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[local]\npath = \".\"\nunknown_key = 1\n").unwrap();
    let out = Command::new(bin)
        .args(["--check-config", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("bad.toml") && text.contains("unknown_key"),
        "{text}"
    );
}
