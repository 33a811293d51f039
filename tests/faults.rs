//! The fault matrix (README, "Fault matrix"): one test per backend fault, against the real
//! registry (stopped, or frozen with SIGSTOP) or the Gitea simulator (its fault modes). Each
//! warms the cache, breaks the backend, then checks that
//! - the kept answer comes at once: every request is bounded by [`PROMPT`], a third of the
//!   backend timeout, so no answer can have waited for the backend to time out;
//! - the backend is asked at most once for the key while it is sick (counted at the backend
//!   service's door, and by the simulator);
//! - a key never cached gets a clear error naming the backend.
//!
//! Every answer is stale as soon as it is cached (TTL 0), so each request after the fault
//! would reach the backend if nothing held it back.

#[allow(dead_code)]
#[path = "support/gitea_sim.rs"]
mod gitea_sim;
#[path = "support/registry/mod.rs"]
mod registry;

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use extension_registry::config::Config;
use extension_registry::registry::{BackendRequest, BackendService, ExtensionKey};
use extension_registry::{backend, server, stack};
use gitea_sim::fault_modes::{Certificate, Fault};
use gitea_sim::{GiteaSim, Mode, SimConfig, SimRelease, SimRepo};
use registry::{Auth, Registry};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tower::ServiceExt;

/// The backends' timeout in these tests: far above [`PROMPT`].
const BACKEND_TIMEOUT_SECONDS: u64 = 30;
/// How long any request here may take before the test fails: a third of the backend timeout.
const PROMPT: Duration = Duration::from_secs(10);
/// Requests made at once for the warm key once the backend is sick.
const REQUESTS: usize = 20;
/// The key that is cached before the fault.
const WARM: &str = "provider/aws";
/// The key that is first asked for during the fault.
const COLD: &str = "provider/gcp";
const ORG: &str = "extensions";
const NAMESPACE: &str = "provisioning";

/// Backend calls, by the key they were about (`provider/aws`); health probes and listings are
/// not recorded.
#[derive(Clone, Default)]
struct Calls(Arc<Mutex<Vec<String>>>);

impl Calls {
    /// Wraps a backend so that every call about a key is recorded before it goes through.
    fn counting(&self, inner: BackendService) -> BackendService {
        let calls = self.clone();
        BackendService::new(tower::service_fn(move |req: BackendRequest| {
            let key: Option<&ExtensionKey> = match &req {
                BackendRequest::Get { key, .. }
                | BackendRequest::Versions { key, .. }
                | BackendRequest::Download { key, .. }
                | BackendRequest::DownloadHead { key, .. } => Some(key),
                BackendRequest::List(_) | BackendRequest::Health => None,
            };
            if let Some(key) = key {
                calls.0.lock().unwrap().push(key.to_string());
            }
            inner.clone().oneshot(req)
        }))
    }

    fn of(&self, key: &str) -> usize {
        self.0.lock().unwrap().iter().filter(|k| *k == key).count()
    }
}

/// The service on a loopback port, built from a configuration with its backends counted.
struct Service {
    addr: SocketAddr,
    calls: Calls,
    http: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl Service {
    async fn start(config: &Config) -> Self {
        let calls = Calls::default();
        let backends = backend::from_config(config)
            .expect("backends build")
            .into_iter()
            .map(|(source, service)| (source, calls.counting(service)))
            .collect();
        let app = stack::app(config, backends);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server::run(
            listener,
            app,
            async {
                let _ = stopped.await;
            },
            Duration::from_secs(1),
        ));
        Self {
            addr,
            calls,
            http: reqwest::Client::new(),
            stop: Some(stop),
            task: Some(task),
        }
    }

    async fn get(&self, key: &str) -> Answer {
        answer(
            &self.http,
            format!("http://{}/api/v1/extensions/{key}", self.addr),
        )
        .await
    }

    /// Asks for [`WARM`] while the backend is healthy: the answer every stale one must repeat.
    async fn warm(&self) -> Value {
        let fresh = self.get(WARM).await;
        assert_eq!(fresh.status, 200, "{fresh:?}");
        assert_eq!(self.calls.of(WARM), 1);
        fresh.body
    }

    /// Requests for the warm key, each answered with `fresh`, marked stale, within [`PROMPT`];
    /// the backend asked about it at most once since it was warmed.
    async fn assert_stale_at_once(&self, fresh: &Value) {
        assert_stale_at_once(|| self.get(WARM), fresh).await;
        assert!(
            self.calls.of(WARM) <= 2,
            "the sick backend was asked {} times about {WARM} after the warm-up",
            self.calls.of(WARM) - 1
        );
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }
}

/// Asks `ask` [`REQUESTS`] times at once, then [`REQUESTS`] times one after the other (each
/// of which would be a refresh if nothing held it back), and checks that each answer is
/// `fresh`, marked stale.
async fn assert_stale_at_once<F, Fut>(ask: F, fresh: &Value)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Answer>,
{
    let mut answers = futures_util::future::join_all((0..REQUESTS).map(|_| ask())).await;
    for _ in 0..REQUESTS {
        answers.push(ask().await);
    }
    for stale in answers {
        assert_eq!(stale.status, 200, "{stale:?}");
        assert_eq!(&stale.body, fresh);
        let cache_status = stale.cache_status.as_deref().unwrap_or_default();
        assert!(cache_status.contains("fwd=stale"), "{stale:?}");
        let cache_control = stale.cache_control.as_deref().unwrap_or_default();
        assert!(cache_control.ends_with("max-age=0"), "{stale:?}");
    }
}

/// A response read whole.
#[derive(Debug)]
struct Answer {
    status: u16,
    cache_control: Option<String>,
    cache_status: Option<String>,
    retry_after: Option<String>,
    body: Value,
}

impl Answer {
    /// Checks a JSON error: its status, its code, and that its message names `backend`, once.
    fn assert_error(&self, status: u16, code: &str, backend: &str) {
        assert_eq!(self.status, status, "{self:?}");
        assert_eq!(self.body["error"], code, "{self:?}");
        let message = self.body["message"].as_str().unwrap_or_default();
        let named = format!("{backend} backend");
        assert!(message.starts_with(&named), "{self:?}");
        assert_eq!(message.matches(&named).count(), 1, "{self:?}");
    }
}

/// One GET, which fails the test unless answered within [`PROMPT`].
async fn answer(http: &reqwest::Client, url: String) -> Answer {
    let response = tokio::time::timeout(PROMPT, http.get(&url).send())
        .await
        .unwrap_or_else(|_| panic!("{url}: no answer within {PROMPT:?}"))
        .unwrap();
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
    };
    let (cache_control, cache_status) = (header("cache-control"), header("cache-status"));
    let retry_after = header("retry-after");
    let status = response.status().as_u16();
    let body = tokio::time::timeout(PROMPT, response.json())
        .await
        .expect("the body within the deadline")
        .expect("a JSON body");
    Answer {
        status,
        cache_control,
        cache_status,
        retry_after,
        body,
    }
}

/// Every answer stale at once, so each request after the fault would reach the backend if
/// nothing held it back; no rate limit, as every request comes from one address.
fn config(backend_toml: &str) -> Config {
    let toml = format!("{backend_toml}\n[rate_limit]\nenabled = false\n");
    let mut config = Config::parse(&toml, "faults.toml", None).expect("valid configuration");
    config.cache.ttl_seconds = 0;
    config
}

// ---------------------------------------------------------------------------------------------
// Gitea simulator rows
// ---------------------------------------------------------------------------------------------

/// A simulated instance holding the warm and the cold key.
async fn gitea(sim: SimConfig) -> GiteaSim {
    let repo = |name: &str| {
        SimRepo::new(&format!("{name}_prov"))
            .release(SimRelease::new("1.0.0", 1_735_689_600).artifact(name))
    };
    GiteaSim::start(sim.repo(repo("aws")).repo(repo("gcp"))).await
}

fn gitea_toml(sim: &GiteaSim, timeout_seconds: u64) -> String {
    format!(
        "[gitea]\nurl = {:?}\norganization = {ORG:?}\ntimeout_seconds = {timeout_seconds}\n",
        sim.url()
    )
}

/// Requests about the warm key that reached the simulator: one refresh of it costs two (its
/// repository and its releases, asked together).
fn gitea_calls(sim: &GiteaSim) -> usize {
    sim.requests_about("aws_prov")
}

/// One Gitea row: warms the cache, applies `fault`, checks the stale answers and that at
/// most `per_refresh` API calls reached the simulator, then returns the service (for the
/// cold key's check) with the simulator.
async fn gitea_row(fault: impl FnOnce(&GiteaSim), per_refresh: usize) -> (GiteaSim, Service) {
    let sim = gitea(SimConfig::new(ORG)).await;
    let service = Service::start(&config(&gitea_toml(&sim, BACKEND_TIMEOUT_SECONDS))).await;
    let fresh = service.warm().await;
    let before = gitea_calls(&sim);
    fault(&sim);
    service.assert_stale_at_once(&fresh).await;
    let during = gitea_calls(&sim) - before;
    assert!(
        during <= per_refresh,
        "{during} API calls reached the sick instance; one refresh makes {per_refresh}"
    );
    (sim, service)
}

/// The cold key through a service whose Gitea timeout is 1 s: what a client waits for when
/// nothing is cached and the instance does not answer in time.
async fn gitea_cold_timeout(sim: &GiteaSim) {
    let service = Service::start(&config(&gitea_toml(sim, 1))).await;
    service
        .get(COLD)
        .await
        .assert_error(504, "timeout", "gitea");
    service.stop().await;
}

#[tokio::test]
async fn slow_beyond_the_timeout() {
    let (sim, service) = gitea_row(
        |sim| sim.set_fault(Fault::Delay(Duration::from_secs(60))),
        2,
    )
    .await;
    service.stop().await;
    gitea_cold_timeout(&sim).await;
}

/// A Gitea row whose cold key fails at once, with `status` and `code`, its message saying
/// `says`.
async fn gitea_row_failing_fast(
    fault: impl FnOnce(&GiteaSim),
    per_refresh: usize,
    (status, code, says): (u16, &str, &str),
) {
    let (_sim, service) = gitea_row(fault, per_refresh).await;
    let cold = service.get(COLD).await;
    cold.assert_error(status, code, "gitea");
    let message = cold.body["message"].as_str().unwrap_or_default();
    assert!(message.contains(says), "{cold:?}");
    service.stop().await;
}

#[tokio::test]
async fn server_error_500() {
    let cold = (502, "backend_unavailable", "HTTP 500");
    gitea_row_failing_fast(|sim| sim.set_mode(Mode::ServerError), 2, cold).await;
}

#[tokio::test]
async fn malformed_json() {
    let cold = (502, "backend_unavailable", "malformed or unexpected JSON");
    gitea_row_failing_fast(|sim| sim.set_mode(Mode::MalformedJson), 2, cold).await;
}

#[tokio::test]
async fn truncated_body() {
    let cold = (502, "backend_unavailable", "interrupted response body");
    gitea_row_failing_fast(|sim| sim.set_fault(Fault::TruncatedBody), 2, cold).await;
}

#[tokio::test]
async fn redirect_loop() {
    // Each hop is followed by hand and a target seen before ends the chain as a loop.
    let cold = (502, "backend_unavailable", "redirect loop");
    gitea_row_failing_fast(|sim| sim.set_fault(Fault::RedirectLoop), 12, cold).await;
}

#[tokio::test]
async fn wrong_credentials_401() {
    let cold = (
        502,
        "backend_auth_failed",
        "rejected the configured credentials",
    );
    gitea_row_failing_fast(|sim| sim.set_fault(Fault::RevokedToken), 2, cold).await;
}

/// 429 and 503 with `Retry-After`: the instance is not asked again before that time, for the
/// warm key or any other, and a cold key gets a 503 saying when to come back.
async fn retry_after_row(fault: Fault) {
    let (sim, service) = gitea_row(|sim| sim.set_fault(fault), 2).await;
    let asked = || gitea_calls(&sim) + sim.requests_about("gcp_prov");
    let before = asked();
    let cold = service.get(COLD).await;
    cold.assert_error(503, "backend_unavailable", "gitea");
    let seconds: u64 = cold.retry_after.as_deref().unwrap_or("0").parse().unwrap();
    assert!((1..=120).contains(&seconds), "{cold:?}");
    assert_eq!(asked(), before, "asked before its Retry-After");
    service.stop().await;
}

#[tokio::test]
async fn too_many_requests_429_with_retry_after() {
    retry_after_row(Fault::TooManyRequests(120)).await;
}

#[tokio::test]
async fn unavailable_503_with_retry_after() {
    retry_after_row(Fault::Maintenance(120)).await;
}

// ---------------------------------------------------------------------------------------------
// Real registry rows
// ---------------------------------------------------------------------------------------------

/// A registry holding the warm and the cold key, and the service over it, warmed.
async fn oci_row(timeout_seconds: u64) -> (Registry, Service, Value) {
    let registry = Registry::start(Auth::Anonymous).await;
    for name in ["aws", "gcp"] {
        let repo = format!("{NAMESPACE}/{name}-provider");
        let artifact = format!("{name} 1.0.0 tarball").repeat(64);
        registry
            .push(&repo, "1.0.0", artifact.as_bytes(), &[])
            .await;
    }
    let toml = format!(
        "[oci]\nregistry = {:?}\nnamespace = {NAMESPACE:?}\ntimeout_seconds = {timeout_seconds}\n",
        registry.host()
    );
    let service = Service::start(&config(&toml)).await;
    let fresh = service.warm().await;
    (registry, service, fresh)
}

#[tokio::test]
async fn refused_connection() {
    let (mut registry, service, fresh) = oci_row(BACKEND_TIMEOUT_SECONDS).await;
    registry.stop();
    service.assert_stale_at_once(&fresh).await;
    service
        .get(COLD)
        .await
        .assert_error(502, "backend_unavailable", "oci");
    service.stop().await;
}

#[tokio::test]
async fn accepts_and_never_answers() {
    let (registry, service, fresh) = oci_row(BACKEND_TIMEOUT_SECONDS).await;
    registry.freeze();
    service.assert_stale_at_once(&fresh).await;
    service.stop().await;

    // Nothing cached, and the registry's 1 s timeout is all a client waits.
    let (registry, service, _) = oci_row(1).await;
    registry.freeze();
    service.get(COLD).await.assert_error(504, "timeout", "oci");
    service.stop().await;
}

// ---------------------------------------------------------------------------------------------
// TLS: the release binary, trusting the simulator's CA through `SSL_CERT_FILE`, until the
// instance presents a self-signed certificate.
// ---------------------------------------------------------------------------------------------

/// The release binary on a loopback port, killed when dropped.
struct Binary {
    child: tokio::process::Child,
    addr: String,
    /// Its configuration and trust store.
    _dir: tempfile::TempDir,
}

impl Binary {
    async fn start(config_toml: &str, ca_pem: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.toml");
        let ca = dir.path().join("ca.pem");
        std::fs::write(&config, config_toml).unwrap();
        std::fs::write(&ca, ca_pem).unwrap();
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_extension-registry"))
            .arg("--config")
            .arg(&config)
            .args(["--host", "127.0.0.1", "--port", "0", "--json-log"])
            .args(["--log-level", "warn,extension_registry=info"])
            .env("SSL_CERT_FILE", &ca)
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let (tx, rx) = oneshot::channel();
        // Reads the log until the binary says where it listens, then keeps draining it so the
        // binary never blocks on a full pipe.
        tokio::spawn(async move {
            let mut tx = Some(tx);
            while let Ok(Some(line)) = lines.next_line().await {
                let Ok(json) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                if json["message"] == "listening" {
                    if let (Some(tx), Some(addr)) = (tx.take(), json["address"].as_str()) {
                        let _ = tx.send(addr.to_owned());
                    }
                }
            }
        });
        let addr = tokio::time::timeout(PROMPT, rx)
            .await
            .expect("the binary starts")
            .expect("the binary logs its address");
        Self {
            child,
            addr,
            _dir: dir,
        }
    }

    async fn get(&self, http: &reqwest::Client, path: &str) -> Answer {
        answer(http, format!("http://{}{path}", self.addr)).await
    }

    /// `backend_requests_total{backend="gitea",operation="get"}`, all outcomes.
    async fn gitea_gets(&self, http: &reqwest::Client) -> u64 {
        let url = format!("http://{}/api/v1/metrics", self.addr);
        let text = http.get(url).send().await.unwrap().text().await.unwrap();
        text.lines()
            .filter(|l| {
                l.starts_with("backend_requests_total{")
                    && l.contains("backend=\"gitea\"")
                    && l.contains("operation=\"get\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

#[tokio::test]
async fn tls_failure_self_signed_certificate() {
    let sim = gitea(SimConfig::new(ORG).tls()).await;
    assert!(sim.url().starts_with("https://"), "{}", sim.url());
    // The smallest TTL a file can set: the cached answer is stale a second after the warm-up.
    let toml = format!(
        "{}\n[cache]\nttl_seconds = 1\n[rate_limit]\nenabled = false\n\
         [server]\nprobe_interval_seconds = 3600\n",
        gitea_toml(&sim, BACKEND_TIMEOUT_SECONDS)
    );
    let service = Binary::start(&toml, sim.ca_pem()).await;
    let http = reqwest::Client::new();
    let (warm, cold) = (
        format!("/api/v1/extensions/{WARM}"),
        format!("/api/v1/extensions/{COLD}"),
    );
    let fresh = service.get(&http, &warm).await;
    assert_eq!(fresh.status, 200, "{fresh:?}");
    let warmed = tokio::time::Instant::now();
    assert_eq!(service.gitea_gets(&http).await, 1);

    sim.present(Certificate::SelfSigned);
    let handshakes = sim.tls_handshakes();
    // Waits out the TTL (no synchronisation: nothing else is waited for).
    tokio::time::sleep_until(warmed + Duration::from_secs(1)).await;
    assert_stale_at_once(|| service.get(&http, &warm), &fresh.body).await;
    assert!(
        service.gitea_gets(&http).await <= 2,
        "the instance was asked more than once about {WARM}"
    );
    // One refresh is two calls, so two handshakes.
    assert!(sim.tls_handshakes() - handshakes <= 2);

    let cold = service.get(&http, &cold).await;
    cold.assert_error(502, "backend_unavailable", "gitea");
}

// ---------------------------------------------------------------------------------------------
// The harness itself: each simulated fault is what its row says it is.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn the_simulated_faults_are_what_they_claim() {
    let sim = gitea(SimConfig::new(ORG)).await;
    let url = format!("{}api/v1/repos/{ORG}/aws_prov", sim.url());
    let http = reqwest::Client::builder()
        .read_timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    let status_of = |fault| {
        sim.set_fault(fault);
        let request = http.get(&url).send();
        async move { tokio::time::timeout(PROMPT, request).await.unwrap() }
    };

    assert!(status_of(Fault::Delay(Duration::from_secs(60)))
        .await
        .unwrap_err()
        .is_timeout());

    let truncated = status_of(Fault::TruncatedBody).await.unwrap();
    assert_eq!(truncated.status(), 200);
    assert_eq!(truncated.content_length(), Some(4096));
    assert!(truncated.bytes().await.is_err(), "the body is cut short");

    let before = sim.requests_about("aws_prov");
    let looping = status_of(Fault::RedirectLoop).await.unwrap_err();
    assert!(looping.is_redirect(), "{looping}");
    // The first request and reqwest's ten redirects, all to the same place.
    assert_eq!(sim.requests_about("aws_prov") - before, 11);

    let revoked = status_of(Fault::RevokedToken).await.unwrap();
    assert_eq!(revoked.status(), 401);
    for (fault, status) in [
        (Fault::TooManyRequests(120), 429),
        (Fault::Maintenance(90), 503),
    ] {
        let refused = status_of(fault).await.unwrap();
        assert_eq!(refused.status(), status);
        let wait = if status == 429 { "120" } else { "90" };
        assert_eq!(refused.headers()["retry-after"], wait);
    }
    assert_eq!(status_of(Fault::None).await.unwrap().status(), 200);

    // TLS: trusted while the certificate comes from the simulator's CA, refused once it is
    // self-signed; each request is a new connection, so a new handshake.
    let sim = gitea(SimConfig::new(ORG).tls()).await;
    let url = format!("{}api/v1/version", sim.url());
    let ca = reqwest::Certificate::from_pem(sim.ca_pem().as_bytes()).unwrap();
    let http = reqwest::Client::builder()
        .tls_certs_only([ca])
        .build()
        .unwrap();
    for _ in 0..2 {
        assert_eq!(http.get(&url).send().await.unwrap().status(), 200);
    }
    sim.present(Certificate::SelfSigned);
    let refused = http.get(&url).send().await.unwrap_err();
    assert!(refused.is_connect(), "{refused:?}");
    assert_eq!(sim.tls_handshakes(), 3);
    assert_eq!(sim.calls().version, 2);
}
