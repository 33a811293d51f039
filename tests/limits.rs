//! The limits that keep a hostile client from holding the service's resources, through real
//! sockets: the header and keep-alive timeouts, HTTP/2 pings, the connection cap (on the
//! release binary, counting its descriptors), the send timeout on downloads over HTTP/1 and
//! HTTP/2, the download cap, and HEAD answered from metadata without opening a stream.
//!
//! Timeouts are configured short (1 s) and every wait is bounded by [`BOUND`], far above them,
//! so a limit that does not work fails the test instead of hanging it.

#[allow(dead_code)]
#[path = "support/app.rs"]
mod app;
#[allow(dead_code)]
#[path = "support/gitea_sim.rs"]
mod gitea_sim;
#[path = "support/registry/mod.rs"]
mod registry;

use std::future::Future;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use extension_registry::config::Config;
use extension_registry::registry::{
    Artifact, BackendRequest, BackendResponse, RegistryError, Served,
};
use extension_registry::{server, BoxError};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

/// How long any wait may take before the test fails: far above every configured timeout.
const BOUND: Duration = Duration::from_secs(60);

const DOWNLOAD: &str = "/api/v1/extensions/provider/big/1.0.0";

/// Waits for `future`, failing the test after [`BOUND`].
async fn bounded<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(BOUND, future)
        .await
        .unwrap_or_else(|_| panic!("{what}: still waiting after {BOUND:?}"))
}

/// Serves `config` over a backend whose downloads are `body()`, on a free loopback port.
async fn serve(
    config: &Config,
    body: impl Fn() -> StreamBody<BodyStream> + Clone + Send + Sync + 'static,
) -> SocketAddr {
    let app = app::app_with(config, move |req| {
        let body = body.clone();
        async move {
            match req {
                BackendRequest::Download { .. } => Ok(BackendResponse::Artifact(Artifact {
                    filename: "big-1.0.0.tar.gz".into(),
                    content_length: None,
                    checksum: None,
                    served: Served::Whole,
                    body: body().boxed_unsync(),
                })),
                BackendRequest::DownloadHead { .. } => Ok(BackendResponse::Artifact(
                    Artifact::head("big-1.0.0.tar.gz".into(), None, None),
                )),
                _ => Err(RegistryError::not_found("x")),
            }
        }
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = config.server.clone();
    tokio::spawn(async move {
        server::run_with(listener, app, std::future::pending(), &server)
            .await
            .unwrap();
    });
    addr
}

type BodyStream =
    std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<Frame<Bytes>, BoxError>> + Send>>;

/// Sends on `dropped` when dropped: tells the test the backend's stream was let go.
struct DropSignal(Option<oneshot::Sender<()>>);

impl Drop for DropSignal {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(());
        }
    }
}

/// A backend stream that never ends: 64 KiB chunks as fast as they are taken.
fn endless(signal: DropSignal) -> StreamBody<BodyStream> {
    let chunk = Bytes::from(vec![7u8; 64 * 1024]);
    StreamBody::new(Box::pin(futures_util::stream::repeat_with(move || {
        let _alive = &signal;
        Ok(Frame::data(chunk.clone()))
    })))
}

/// A backend stream that never yields a byte.
fn silent() -> StreamBody<BodyStream> {
    StreamBody::new(Box::pin(futures_util::stream::poll_fn(|_| Poll::Pending)))
}

/// A backend whose single download reports when its stream is dropped.
fn one_endless_download() -> (
    impl Fn() -> StreamBody<BodyStream> + Clone + Send + Sync + 'static,
    oneshot::Receiver<()>,
) {
    let (tx, rx) = oneshot::channel();
    let tx = std::sync::Arc::new(std::sync::Mutex::new(Some(tx)));
    let body = move || endless(DropSignal(tx.lock().unwrap().take()));
    (body, rx)
}

fn config(server: &str) -> Config {
    app::local_config(&app::samples(), &format!("[server]\n{server}"))
}

/// Reads until the server closes the connection; what was read.
async fn read_until_closed(stream: &mut TcpStream) -> Vec<u8> {
    let mut seen = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return seen,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test]
async fn empty_half_preface_and_trickled_head_connections_are_closed_at_the_header_timeout() {
    let addr = serve(
        &config("header_read_timeout_seconds = 1\nkeepalive_timeout_seconds = 3600\n"),
        silent,
    )
    .await;
    for sent in [
        &b""[..],
        b"PRI * HTTP/2.0\r\n",
        b"GET /livez HTTP/1.1\r\nhost: x\r\n",
    ] {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(sent).await.unwrap();
        let answer = bounded("an idle connection", read_until_closed(&mut stream)).await;
        assert!(
            answer.is_empty() || answer.starts_with(b"HTTP/1.1 408"),
            "after {:?}: {:?}",
            String::from_utf8_lossy(sent),
            String::from_utf8_lossy(&answer)
        );
    }
}

/// HTTP/2 frames, written and read by hand: a hostile client need not behave like a library.
mod h2_frames {
    use super::*;

    pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    pub const SETTINGS: u8 = 0x4;
    pub const PING: u8 = 0x6;
    const HEADERS: u8 = 0x1;

    pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut out = len.to_be_bytes()[1..].to_vec();
        out.extend_from_slice(&[kind, flags]);
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    /// A connection that sent the preface and empty SETTINGS, as every HTTP/2 client does.
    pub async fn connect(addr: SocketAddr) -> TcpStream {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(PREFACE).await.unwrap();
        stream.write_all(&frame(SETTINGS, 0, 0, &[])).await.unwrap();
        stream
    }

    /// A GET as one HEADERS frame, every field a literal without indexing.
    pub fn get(stream: u32, path: &str) -> Vec<u8> {
        let mut block = Vec::new();
        for (name, value) in [
            (":method", "GET"),
            (":scheme", "http"),
            (":authority", "test"),
            (":path", path),
        ] {
            block.push(0);
            for s in [name, value] {
                block.push(s.len() as u8);
                block.extend_from_slice(s.as_bytes());
            }
        }
        // END_STREAM | END_HEADERS.
        frame(HEADERS, 0x5, stream, &block)
    }

    /// Reads frames until the connection closes, acknowledging the server's SETTINGS but
    /// nothing else; the kinds and flags seen.
    pub async fn read_until_closed(stream: &mut TcpStream) -> Vec<(u8, u8)> {
        let mut seen = Vec::new();
        loop {
            let mut head = [0u8; 9];
            if stream.read_exact(&mut head).await.is_err() {
                return seen;
            }
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let mut payload = vec![0u8; len];
            if stream.read_exact(&mut payload).await.is_err() {
                return seen;
            }
            let (kind, flags) = (head[3], head[4]);
            if kind == SETTINGS && flags & 1 == 0 {
                let _ = stream.write_all(&frame(SETTINGS, 1, 0, &[])).await;
            }
            seen.push((kind, flags));
        }
    }
}

#[tokio::test]
async fn an_http2_connection_idle_after_its_preface_is_closed_at_the_keepalive_timeout() {
    // The header timeout (and with it the ping deadline) is far away: only the keep-alive
    // timeout can close this connection within the bound.
    let addr = serve(
        &config("header_read_timeout_seconds = 3600\nkeepalive_timeout_seconds = 1\n"),
        silent,
    )
    .await;
    let mut stream = h2_frames::connect(addr).await;
    let frames = bounded(
        "an idle HTTP/2 connection",
        h2_frames::read_until_closed(&mut stream),
    )
    .await;
    assert!(frames.contains(&(h2_frames::SETTINGS, 0)), "{frames:?}");
}

#[tokio::test]
async fn an_http2_peer_that_stops_answering_pings_is_dropped_while_a_stream_is_open() {
    // A download whose backend sends nothing keeps a stream open: the connection is not
    // idle and no body waits on the client; only the unanswered pings can end it.
    let addr = serve(
        &config(
            "header_read_timeout_seconds = 1\nkeepalive_timeout_seconds = 1\n\
             send_timeout_seconds = 3600\nrequest_timeout_seconds = 3600\n",
        ),
        silent,
    )
    .await;
    let mut stream = h2_frames::connect(addr).await;
    stream
        .write_all(&h2_frames::get(1, DOWNLOAD))
        .await
        .unwrap();
    let frames = bounded(
        "an HTTP/2 connection not answering pings",
        h2_frames::read_until_closed(&mut stream),
    )
    .await;
    assert!(frames.contains(&(h2_frames::PING, 0)), "{frames:?}");
}

#[tokio::test]
async fn a_download_the_client_stops_reading_is_aborted_and_its_backend_stream_dropped() {
    let (body, backend_dropped) = one_endless_download();
    let addr = serve(&config("send_timeout_seconds = 1\n"), body).await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let head = format!("GET {DOWNLOAD} HTTP/1.1\r\nhost: test\r\n\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut first = [0u8; 12];
    stream.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    // The client reads no more: the socket buffers fill, and the send timeout lets go.
    bounded("the backend stream of a stalled download", backend_dropped)
        .await
        .unwrap();
    let rest = bounded("the stalled connection", read_until_closed(&mut stream)).await;
    assert!(!rest.is_empty());

    let metrics = metrics(addr).await;
    assert!(sample(&metrics, "download_stalled_total") >= 1.0);
    assert!(metrics.contains("# HELP download_stalled_total "));
}

/// The Prometheus text the service at `addr` exposes.
async fn metrics(addr: SocketAddr) -> String {
    let response = reqwest::get(format!("http://{addr}/api/v1/metrics"));
    response.await.unwrap().text().await.unwrap()
}

/// The value of an unlabelled metric.
fn sample(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{metrics}"))
}

/// An HTTP/2 client that announces a zero stream window: the server may send no body bytes.
async fn shut_window_client(addr: SocketAddr) -> h2::client::SendRequest<Bytes> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (client, connection) = h2::client::Builder::new()
        .initial_window_size(0)
        .handshake(tcp)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
}

async fn h2_get(
    client: &h2::client::SendRequest<Bytes>,
    method: &str,
    path: &str,
) -> http::Response<h2::RecvStream> {
    let request = http::Request::builder()
        .method(method)
        .uri(format!("http://test{path}"))
        .body(())
        .unwrap();
    let (response, _) = client
        .clone()
        .ready()
        .await
        .unwrap()
        .send_request(request, true)
        .unwrap();
    bounded("an HTTP/2 response head", response).await.unwrap()
}

#[tokio::test]
async fn an_http2_stream_whose_window_stays_shut_is_reset_and_the_connection_goes_on() {
    let (body, backend_dropped) = one_endless_download();
    let addr = serve(&config("send_timeout_seconds = 1\n"), body).await;
    let client = shut_window_client(addr).await;
    let response = h2_get(&client, "GET", DOWNLOAD).await;
    assert_eq!(response.status(), 200);
    bounded(
        "the backend stream of a shut-window download",
        backend_dropped,
    )
    .await
    .unwrap();
    let mut body = response.into_body();
    let end = bounded("the reset of the stalled stream", body.data()).await;
    assert!(
        matches!(end, Some(Err(ref e)) if e.is_reset()),
        "the stream was not reset: {end:?}"
    );
    // Only that stream was let go: the connection serves the next request.
    let livez = h2_get(&client, "GET", "/livez").await;
    assert_eq!(livez.status(), 200);
}

/// Serves endless downloads with `server` settings (and a send timeout of an hour), to one
/// HTTP/2 client that keeps its windows shut; its first two downloads (both 200, holding
/// their slots) and the answer to its third.
async fn third_of_three_stalled_downloads(
    server: &str,
) -> (
    SocketAddr,
    h2::client::SendRequest<Bytes>,
    [http::Response<h2::RecvStream>; 2],
    http::Response<h2::RecvStream>,
) {
    let server = format!("send_timeout_seconds = 3600\n{server}");
    let addr = serve(&config(&server), || endless(DropSignal(None))).await;
    let client = shut_window_client(addr).await;
    let first = h2_get(&client, "GET", DOWNLOAD).await;
    let second = h2_get(&client, "GET", DOWNLOAD).await;
    assert_eq!(first.status(), 200);
    assert_eq!(second.status(), 200);
    let third = h2_get(&client, "GET", DOWNLOAD).await;
    (addr, client, [first, second], third)
}

#[tokio::test]
async fn downloads_past_the_cap_are_refused_at_once_counting_http2_streams() {
    // One connection, two streams that cannot drain: both hold their slot.
    let (addr, client, held, third) =
        third_of_three_stalled_downloads("max_concurrent_downloads = 2\n").await;
    assert_eq!(third.status(), 503);
    assert_eq!(third.headers()["retry-after"], "1");
    // HEAD opens no stream and takes no slot; another client is refused the same.
    let head = h2_get(&client, "HEAD", DOWNLOAD).await;
    assert_eq!(head.status(), 200);
    let other = reqwest::get(format!("http://{addr}{DOWNLOAD}"))
        .await
        .unwrap();
    assert_eq!(other.status(), 503);
    let error: serde_json::Value = other.json().await.unwrap();
    assert_eq!(error["error"], "overloaded");

    let metrics = metrics(addr).await;
    assert!(
        metrics.contains("# TYPE downloads_in_flight gauge"),
        "{metrics}"
    );
    drop(held);
}

#[tokio::test]
async fn one_client_with_shut_windows_holds_no_more_than_its_share_of_the_slots() {
    // Streams that cannot drain hold their slots: two, then this client is refused.
    let (addr, _client, held, third) = third_of_three_stalled_downloads(
        "max_concurrent_downloads = 4\nmax_downloads_per_client = 2\n",
    )
    .await;
    assert_eq!(third.status(), 429);
    assert_eq!(third.headers()["retry-after"], "1");
    // Another client (another loopback address) still downloads.
    let other = reqwest::Client::builder()
        .local_address("127.0.0.2".parse::<std::net::IpAddr>().unwrap())
        .build()
        .unwrap()
        .get(format!("http://{addr}{DOWNLOAD}"))
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 200);
    // Other tests in this binary share the process's recorder: at least this one.
    assert!(sample(&metrics(addr).await, "rate_limited_total") >= 1.0);
    drop((held, other));
}

#[tokio::test]
async fn with_rate_limiting_off_clients_are_not_told_apart_for_downloads_either() {
    let (_addr, _client, held, third) = third_of_three_stalled_downloads(
        "max_concurrent_downloads = 4\nmax_downloads_per_client = 2\n\
         [rate_limit]\nenabled = false\n",
    )
    .await;
    assert_eq!(third.status(), 200);
    drop((held, third));
}

#[tokio::test]
async fn an_http2_head_refused_above_the_router_carries_no_body() {
    let addr = serve(
        &config("[rate_limit]\nrequests_per_second = 1\nburst = 1\n"),
        || endless(DropSignal(None)),
    )
    .await;
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    // The quota of one is spent by the first; a later one within the second is refused.
    let mut refused = None;
    for _ in 0..10 {
        let answer = h2_get(&client, "HEAD", "/api/v1/extensions").await;
        if answer.status() == 429 {
            refused = Some(answer);
            break;
        }
    }
    let refused = refused.expect("a HEAD over the quota");
    assert!(refused.headers().contains_key("content-length"));
    let mut body = refused.into_body();
    let data = bounded("the end of a HEAD stream", body.data()).await;
    assert!(data.is_none(), "a HEAD answer carried {data:?}");
}

#[tokio::test]
async fn head_of_a_gitea_download_answers_from_metadata_without_opening_the_stream() {
    use gitea_sim::{artifact_bytes, sha256_hex, GiteaSim, SimConfig, SimRelease, SimRepo};
    let sim = GiteaSim::start(
        SimConfig::new("extensions").repo(
            SimRepo::new("aws_prov").release(
                SimRelease::new("1.0.0", 1_735_689_600)
                    .artifact("aws")
                    .sha256_sidecar(true),
            ),
        ),
    )
    .await;
    let toml = format!(
        "[gitea]\nurl = {:?}\norganization = \"extensions\"\n",
        sim.url()
    );
    let config = Config::parse(&toml, "test.toml", None).unwrap();
    let app = extension_registry::build(&config).unwrap();
    let bytes = artifact_bytes("aws", "1.0.0");
    let path = "/api/v1/extensions/provider/aws/1.0.0";

    let head = app::send(&app, "HEAD", path).await;
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-length"), bytes.len().to_string());
    assert_eq!(head.header("repr-digest"), repr_digest(&sha256_hex(&bytes)));
    assert!(head
        .header("content-disposition")
        .contains("aws-1.0.0.tar.gz"));
    // The checksum sidecar was read; the artifact was not.
    assert_eq!(sim.calls().downloads, 1);

    let get = app::get(&app, path).await;
    assert_eq!(get.body, bytes);
    assert_eq!(get.header("content-length"), bytes.len().to_string());
    assert_eq!(get.header("repr-digest"), head.header("repr-digest"));
    assert!(sim.calls().downloads >= 2);
}

#[tokio::test]
async fn head_of_an_oci_download_answers_from_the_manifest_without_fetching_the_blob() {
    use registry::{Auth, Registry};
    let reg = Registry::start(Auth::Anonymous).await;
    let artifact = vec![42u8; 5000];
    let pushed = reg
        .push("provisioning/aws-provider", "1.2.0", &artifact, &[])
        .await;
    let config = Config::parse(&reg.oci_toml("provisioning", None), "t.toml", None).unwrap();
    let app = extension_registry::build(&config).unwrap();
    let path = "/api/v1/extensions/provider/aws/1.2.0";
    let blob_fetches = || {
        reg.requests()
            .iter()
            .filter(|line| line.contains(&format!("/blobs/{}", pushed.layer)))
            .count()
    };

    let pushing = blob_fetches();
    let head = app::send(&app, "HEAD", path).await;
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-length"), "5000");
    let hex = pushed.layer.strip_prefix("sha256:").unwrap();
    assert_eq!(head.header("repr-digest"), repr_digest(hex));
    assert_eq!(blob_fetches(), pushing);

    let get = app::get(&app, path).await;
    assert_eq!(get.body, artifact);
    assert_eq!(get.header("content-length"), "5000");
    assert_eq!(blob_fetches(), pushing + 1);
}

/// RFC 9530 `Repr-Digest` for a sha256 in hex.
fn repr_digest(hex: &str) -> String {
    use base64::Engine;
    let bytes: Vec<u8> = (0..32)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    format!(
        "sha-256=:{}:",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

/// The release binary, serving the sample extensions with `server` settings; killed on drop.
struct Binary {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Binary {
    fn start(server: &str) -> Self {
        Self::start_with(server, None)
    }

    /// Started under a soft and a hard open-file limit.
    fn start_with_open_files(server: &str, soft: u64, hard: u64) -> Self {
        Self::start_with(server, Some((soft, hard)))
    }

    fn start_with(server: &str, open_files: Option<(u64, u64)>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("config.toml");
        let toml = format!(
            "[server]\nhost = \"127.0.0.1\"\nport = 0\n{server}\n[local]\npath = {:?}\n",
            app::samples().display().to_string()
        );
        std::fs::write(&file, toml).unwrap();
        let binary = env!("CARGO_BIN_EXE_extension-registry");
        let mut command = match open_files {
            None => Command::new(binary),
            Some((soft, hard)) => {
                let mut shell = Command::new("sh");
                shell
                    .arg("-c")
                    .arg(format!(
                        "ulimit -Sn {soft} && ulimit -Hn {hard} && exec \"$0\" \"$@\""
                    ))
                    .arg(binary);
                shell
            }
        };
        let mut child = command
            .args(["--json-log", "--config"])
            .arg(&file)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let addr = lines
            .by_ref()
            .map_while(Result::ok)
            .find_map(|line| {
                let json: serde_json::Value = serde_json::from_str(&line).ok()?;
                (json["message"] == "listening").then(|| json["address"].as_str()?.parse().ok())?
            })
            .expect("the binary logs its address");
        // Keep draining the log so the binary never blocks on a full pipe.
        std::thread::spawn(move || lines.map_while(Result::ok).for_each(drop));
        Self {
            child,
            addr,
            _dir: dir,
        }
    }

    /// The binary's soft and hard open-file limits.
    fn open_file_limits(&self) -> (u64, u64) {
        let limits = std::fs::read_to_string(format!("/proc/{}/limits", self.child.id())).unwrap();
        let line = limits
            .lines()
            .find(|line| line.starts_with("Max open files"))
            .unwrap();
        let mut numbers = line.split_whitespace().filter_map(|word| word.parse().ok());
        (numbers.next().unwrap(), numbers.next().unwrap())
    }

    /// The binary's open file descriptors.
    fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .unwrap()
            .count()
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether a plain GET of `/livez` on a new connection is answered 200.
async fn livez(addr: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect(addr).await else {
        return false;
    };
    let head = b"GET /livez HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n";
    if stream.write_all(head).await.is_err() {
        return false;
    }
    read_until_closed(&mut stream)
        .await
        .starts_with(b"HTTP/1.1 200")
}

#[tokio::test]
async fn idle_sockets_past_max_connections_hold_no_descriptors_and_time_out() {
    let binary = Binary::start("max_connections = 50\nheader_read_timeout_seconds = 1\n");
    assert!(livez(binary.addr).await);
    let baseline = binary.fds();

    // Each idle socket ends, refused at once (possibly before its connect returns) or timed
    // out; watch them end.
    let (ended_tx, mut ended) = tokio::sync::mpsc::unbounded_channel();
    for _ in 0..200 {
        let ended_tx = ended_tx.clone();
        match TcpStream::connect(binary.addr).await {
            Ok(mut socket) => {
                tokio::spawn(async move {
                    let _ = read_until_closed(&mut socket).await;
                    let _ = ended_tx.send(());
                });
            }
            Err(_) => {
                let _ = ended_tx.send(());
            }
        }
    }
    for _ in 0..150 {
        bounded("the refusal of sockets past the cap", ended.recv()).await;
    }
    let held = binary.fds();
    assert!(
        held <= baseline + 50 + 2,
        "{held} descriptors with 50 connections held over a baseline of {baseline}"
    );
    for _ in 150..200 {
        bounded("the header timeout of idle sockets", ended.recv()).await;
    }
    // The 51st real client is served once the idle ones have timed out.
    assert!(livez(binary.addr).await);
    assert!(binary.fds() <= baseline + 2);

    let metrics = metrics(binary.addr).await;
    // Those past the cap while the first 50 were held: how many depends on how fast this
    // machine opened them against the 1 s header timeout.
    assert!(sample(&metrics, "http_connections_refused_total") > 0.0);
    assert!(metrics.contains("# TYPE http_connections_open gauge"));
}

#[tokio::test]
async fn the_soft_open_file_limit_is_raised_to_the_hard_one() {
    // Lowering a hard limit needs no privilege; 2048 unless this process may not have it.
    let ours = rustix::process::getrlimit(rustix::process::Resource::Nofile).maximum;
    let hard = ours.unwrap_or(u64::MAX).min(2048);
    let binary = Binary::start_with_open_files("", 256, hard);
    assert_eq!(binary.open_file_limits(), (hard, hard));
    let metrics = metrics(binary.addr).await;
    // A quarter of the limit is kept, or room for the 256 downloads and 64 more.
    let cap = hard - (hard / 4).max(256 + 64);
    assert_eq!(sample(&metrics, "http_connections_max"), cap as f64);
}

#[tokio::test]
async fn connections_stop_where_the_open_file_limit_leaves_room_for_files() {
    // 256 descriptors in all: 176 connections at most, 80 kept for 16 downloads and the rest.
    let binary = Binary::start_with_open_files(
        "header_read_timeout_seconds = 60\nmax_concurrent_downloads = 16\n",
        256,
        256,
    );
    let metrics = metrics(binary.addr).await;
    assert_eq!(sample(&metrics, "http_connections_max"), 176.0);
    let mut kept = TcpStream::connect(binary.addr).await.unwrap();

    // 300 idle sockets: those past the cap are closed at once, the rest held.
    let (ended_tx, mut ended) = tokio::sync::mpsc::unbounded_channel();
    let mut idle = Vec::new();
    for _ in 0..300 {
        let ended_tx = ended_tx.clone();
        match TcpStream::connect(binary.addr).await {
            Ok(mut socket) => idle.push(tokio::spawn(async move {
                let _ = read_until_closed(&mut socket).await;
                let _ = ended_tx.send(());
            })),
            Err(_) => {
                let _ = ended_tx.send(());
            }
        }
    }
    // 175 held beside the kept one; one more may be held while the metrics client's
    // connection is being closed.
    for _ in 0..(300 - 175 - 1) {
        bounded("the refusal of sockets past the cap", ended.recv()).await;
    }

    // With the cap reached, a download still opens its file.
    let head = b"GET /api/v1/extensions/provider/aws/1.1.0 HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n";
    kept.write_all(head).await.unwrap();
    let answer = bounded("the download", read_until_closed(&mut kept)).await;
    let artifact =
        std::fs::read(app::samples().join("provider/aws/1.1.0/aws-1.1.0.tar.gz")).unwrap();
    assert!(
        answer.starts_with(b"HTTP/1.1 200") && answer.ends_with(&artifact),
        "{}",
        String::from_utf8_lossy(&answer[..answer.len().min(400)])
    );
    for socket in idle {
        socket.abort();
    }
}

#[test]
fn the_limits_have_their_documented_defaults_and_refuse_zero() {
    let server = &config("").server;
    assert_eq!(
        (
            server.header_read_timeout_seconds,
            server.keepalive_timeout_seconds,
            server.http2_max_concurrent_streams,
            server.max_connections,
            server.send_timeout_seconds,
            server.max_concurrent_downloads,
            server.max_downloads_per_client,
        ),
        (10, 60, 128, 10_000, 60, 256, 16)
    );
    for key in [
        "header_read_timeout_seconds",
        "keepalive_timeout_seconds",
        "http2_max_concurrent_streams",
        "max_connections",
        "send_timeout_seconds",
        "max_concurrent_downloads",
        "max_downloads_per_client",
    ] {
        let text = format!("[server]\n{key} = 0\n[local]\npath = \".\"\n");
        let error = Config::parse(&text, "t.toml", None)
            .unwrap_err()
            .to_string();
        assert!(error.contains(&format!("[server] {key}")), "{error}");
    }
}
