//! Fresh on push: Gitea/Forgejo webhooks, CNCF registry notifications and the operator's
//! purge, through a real socket. The real `docker-registry` notifies the running service of
//! pushes and deletes; the Gitea simulator signs and POSTs release events as Gitea does.
//! Answers are cached for an hour, so only an invalidation can make a change visible.

#[allow(dead_code)]
#[path = "support/app.rs"]
mod app;
#[allow(dead_code)]
#[path = "support/gitea_sim.rs"]
mod gitea_sim;
#[path = "support/registry/mod.rs"]
mod registry;
#[allow(dead_code)]
#[path = "support/running.rs"]
mod running;

use std::path::Path;
use std::time::Duration;

use extension_registry::config::Config;
use gitea_sim::{hook_signature, GiteaSim, SimConfig, SimRelease, SimRepo};
use registry::{Auth, Registry};
use reqwest::StatusCode;
use running::Running;
use serde_json::{json, Value};
use tokio::net::TcpListener;

/// An hour: nothing in these tests expires by itself.
const CACHED_FOR_AN_HOUR: &str = "[cache]\nttl_seconds = 3600\n";
/// How long a change may take to show after its notification, at most (it takes
/// milliseconds; the bound only keeps a broken build from hanging).
const VISIBLE_WITHIN: Duration = Duration::from_secs(30);
const OCI_TOKEN: &str = "notify-t0ken";
const GITEA_SECRET: &str = "gitea-hook-s3cret";
const ADMIN_TOKEN: &str = "admin-t0ken";

/// The service on a bound loopback listener until dropped, and a client for it.
struct Service {
    running: Running,
    http: reqwest::Client,
}

impl Service {
    fn serve(listener: TcpListener, config: &Config) -> Self {
        Self {
            running: Running::serve(listener, config),
            http: reqwest::Client::new(),
        }
    }

    fn url(&self, path: &str) -> String {
        self.running.url(path)
    }

    async fn versions(&self, path: &str) -> Vec<String> {
        let response = self.http.get(self.url(path)).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        app::field(&response.json::<Value>().await.unwrap(), "version")
    }

    /// Polls `path`'s versions until `done` holds, for at most [`VISIBLE_WITHIN`].
    async fn versions_until(&self, path: &str, done: impl Fn(&[String]) -> bool) -> Vec<String> {
        let deadline = tokio::time::Instant::now() + VISIBLE_WITHIN;
        loop {
            let versions = self.versions(path).await;
            if done(&versions) || tokio::time::Instant::now() > deadline {
                return versions;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn post(
        &self,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<reqwest::Body>,
    ) -> (StatusCode, reqwest::header::HeaderMap, Value) {
        let mut request = self.http.post(self.url(path)).body(body);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await.unwrap();
        let (status, headers) = (response.status(), response.headers().clone());
        let body = response.bytes().await.unwrap();
        app::contract::check("POST", path, status, &headers, &body);
        let json = serde_json::from_slice(&body)
            .unwrap_or_else(|e| panic!("{path} {status}: not JSON ({e}): {body:?}"));
        (status, headers, json)
    }

    async fn metrics(&self) -> String {
        let response = self
            .http
            .get(self.url("/api/v1/metrics"))
            .send()
            .await
            .unwrap();
        response.text().await.unwrap()
    }
}

/// A bad Gitea delivery: what is wrong, its body, its signature, the status and error code.
type BadDelivery = (
    &'static str,
    Vec<u8>,
    Option<String>,
    StatusCode,
    &'static str,
);

/// Writes a secret file readable by its owner only.
fn secret(dir: &Path, name: &str, value: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, format!("{value}\n")).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    path.display().to_string()
}

const AWS_VERSIONS: &str = "/api/v1/extensions/provider/aws/versions";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_push_or_delete_shows_at_once_through_its_notification() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = format!("http://{}/api/v1/hooks/oci", listener.local_addr().unwrap());
    let reg = Registry::start_notifying(Auth::Anonymous, &hook, OCI_TOKEN).await;
    reg.push("provisioning/aws-provider", "1.0.0", b"aws 1.0.0", &[])
        .await;
    let token = secret(reg.dir(), "oci-hook-token", OCI_TOKEN);
    let text = format!(
        "{}webhook_token_path = {token:?}\n{CACHED_FOR_AN_HOUR}",
        reg.oci_toml("provisioning", None)
    );
    let config = Config::parse(&text, "hooks.toml", None).unwrap();
    let service = Service::serve(listener, &config);

    let before = service
        .versions_until(AWS_VERSIONS, |v| v == ["1.0.0"])
        .await;
    assert_eq!(before, ["1.0.0"]);

    let pushed = reg
        .push("provisioning/aws-provider", "1.1.0", b"aws 1.1.0", &[])
        .await;
    let after_push = service
        .versions_until(AWS_VERSIONS, |v| v.contains(&"1.1.0".to_owned()))
        .await;
    assert_eq!(after_push, ["1.1.0", "1.0.0"], "no purge, no restart");

    let deleted = reqwest::Client::new()
        .delete(format!(
            "{}/v2/provisioning/aws-provider/manifests/{}",
            reg.url(),
            pushed.manifest
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), StatusCode::ACCEPTED);
    let after_delete = service
        .versions_until(AWS_VERSIONS, |v| !v.contains(&"1.1.0".to_owned()))
        .await;
    assert_eq!(after_delete, ["1.0.0"]);

    let metrics = service.metrics().await;
    assert!(
        metrics
            .contains(r#"hooks_received_total{source="oci",event="push",outcome="invalidated"}"#),
        "{metrics}"
    );
}

fn gitea_sim_config() -> SimConfig {
    SimConfig::new("extensions").repo(
        SimRepo::new("aws_prov").release(SimRelease::new("1.0.0", 1_730_000_000).artifact("aws")),
    )
}

async fn gitea_service(sim: &GiteaSim, dir: &Path) -> Service {
    let secret = secret(dir, "gitea-hook-secret", GITEA_SECRET);
    let text = format!(
        "[gitea]\nurl = {:?}\norganization = \"extensions\"\nwebhook_secret_path = {secret:?}\n\
         {CACHED_FOR_AN_HOUR}[rate_limit]\nenabled = false\n",
        sim.url()
    );
    let config = Config::parse(&text, "hooks.toml", None).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    Service::serve(listener, &config)
}

#[tokio::test]
async fn a_signed_release_event_shows_the_release_at_once_and_a_bad_signature_changes_nothing() {
    for forgejo in [false, true] {
        let sim_config = if forgejo {
            gitea_sim_config().forgejo()
        } else {
            gitea_sim_config()
        };
        let sim = GiteaSim::start(sim_config).await;
        let dir = tempfile::tempdir().unwrap();
        let service = gitea_service(&sim, dir.path()).await;
        let hook = service.url("/api/v1/hooks/gitea");

        assert_eq!(service.versions(AWS_VERSIONS).await, ["1.0.0"]);
        let release = sim.publish(
            "aws_prov",
            SimRelease::new("1.1.0", 1_740_000_000).artifact("aws"),
        );
        let payload = sim.release_payload("aws_prov", "published", &release);
        assert_eq!(service.versions(AWS_VERSIONS).await, ["1.0.0"], "cached");
        let releases_read = sim.calls().releases;

        let forged = sim
            .deliver(&hook, "release", &payload, Some("not-the-secret"))
            .await;
        assert_eq!(forged.status(), StatusCode::UNAUTHORIZED);
        let error: Value = forged.json().await.unwrap();
        assert_eq!(error["error"], "unauthorized");
        assert_eq!(service.versions(AWS_VERSIONS).await, ["1.0.0"]);
        assert_eq!(sim.calls().releases, releases_read, "nothing invalidated");

        let signed = sim
            .deliver(&hook, "release", &payload, Some(GITEA_SECRET))
            .await;
        assert_eq!(signed.status(), StatusCode::OK, "forgejo: {forgejo}");
        let answer: Value = signed.json().await.unwrap();
        assert_eq!(answer["event"], "release");
        assert_eq!(answer["invalidated"], json!(["provider/aws"]));
        assert_eq!(answer["dropped"]["versions"], 1);
        assert_eq!(service.versions(AWS_VERSIONS).await, ["1.1.0", "1.0.0"]);

        // A replay only invalidates again.
        let replay = sim
            .deliver(&hook, "release", &payload, Some(GITEA_SECRET))
            .await;
        assert_eq!(replay.status(), StatusCode::OK);
        assert_eq!(service.versions(AWS_VERSIONS).await, ["1.1.0", "1.0.0"]);
    }
}

#[tokio::test]
async fn bad_deliveries_are_refused_with_their_status_and_invalidate_nothing() {
    let sim = GiteaSim::start(gitea_sim_config()).await;
    let dir = tempfile::tempdir().unwrap();
    let service = gitea_service(&sim, dir.path()).await;
    assert_eq!(service.versions(AWS_VERSIONS).await, ["1.0.0"]);
    let releases_read = sim.calls().releases;

    let fixture = |name: &str| {
        std::fs::read(format!(
            "{}/tests/fixtures/hooks/{name}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap()
    };
    let signed = |body: &[u8]| hook_signature(GITEA_SECRET, body);
    let published = fixture("gitea-release-published.json");
    let other_org = fixture("gitea-release-other-org.json");
    let oversized = vec![b' '; 2 * 1024 * 1024];
    let not_json = b"event=release".to_vec();
    let wrong_shape = br#"{"repository": ["aws_prov"]}"#.to_vec();
    let cases: [BadDelivery; 6] = [
        (
            "unsigned",
            published.clone(),
            None,
            StatusCode::UNAUTHORIZED,
            "unauthorized",
        ),
        (
            "wrongly signed",
            published.clone(),
            Some(signed(b"another body")),
            StatusCode::UNAUTHORIZED,
            "unauthorized",
        ),
        (
            "oversized",
            oversized.clone(),
            Some(signed(&oversized)),
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
        ),
        (
            "not JSON",
            not_json.clone(),
            Some(signed(&not_json)),
            StatusCode::BAD_REQUEST,
            "invalid_body",
        ),
        (
            "wrong shape",
            wrong_shape.clone(),
            Some(signed(&wrong_shape)),
            StatusCode::BAD_REQUEST,
            "invalid_body",
        ),
        (
            "other organisation",
            other_org.clone(),
            Some(signed(&other_org)),
            StatusCode::OK,
            "",
        ),
    ];
    for (what, body, signature, status, code) in cases {
        let mut headers = vec![("X-Gitea-Event", "release")];
        if let Some(signature) = &signature {
            headers.push(("X-Gitea-Signature", signature.as_str()));
        }
        let (got, _, answer) = service.post("/api/v1/hooks/gitea", &headers, body).await;
        assert_eq!(got, status, "{what}: {answer}");
        if status == StatusCode::OK {
            assert_eq!(answer["invalidated"], json!([]), "{what}");
        } else {
            assert_eq!(answer["error"], code, "{what}");
        }
        assert_eq!(service.versions(AWS_VERSIONS).await, ["1.0.0"], "{what}");
        assert_eq!(
            sim.calls().releases,
            releases_read,
            "{what}: nothing invalidated"
        );
    }
    let metrics = service.metrics().await;
    for outcome in ["unauthorized", "body_too_large", "invalid_body", "ignored"] {
        assert!(
            metrics.contains(&format!("outcome=\"{outcome}\"")),
            "{outcome}: {metrics}"
        );
    }
}

/// The service over the sample extensions, with the purge token when `admin`.
async fn local_service(dir: &Path, admin: bool) -> Service {
    let mut text = format!(
        "[local]\npath = {:?}\n{CACHED_FOR_AN_HOUR}[rate_limit]\nenabled = false\n",
        app::samples().display().to_string()
    );
    if admin {
        let token = secret(dir, "admin-token", ADMIN_TOKEN);
        text.push_str(&format!("[admin]\ntoken_path = {token:?}\n"));
    }
    let config = Config::parse(&text, "hooks.toml", None).unwrap();
    Service::serve(TcpListener::bind("127.0.0.1:0").await.unwrap(), &config)
}

async fn warm(service: &Service) {
    for path in [
        "/api/v1/extensions",
        "/api/v1/extensions/provider/aws",
        AWS_VERSIONS,
        "/api/v1/extensions/taskserv/kubernetes/versions",
    ] {
        let response = service.http.get(service.url(path)).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
    }
}

#[tokio::test]
async fn a_purge_drops_what_its_scope_covers_and_needs_the_admin_token() {
    let dir = tempfile::tempdir().unwrap();
    let service = local_service(dir.path(), true).await;
    let bearer = format!("Bearer {ADMIN_TOKEN}");
    let auth = [("Authorization", bearer.as_str())];

    warm(&service).await;
    let (status, headers, answer) = service.post("/api/v1/cache/purge", &[], "{}").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{answer}");
    assert_eq!(answer["error"], "unauthorized");
    assert!(headers["www-authenticate"]
        .to_str()
        .unwrap()
        .starts_with("Bearer"));
    let wrong = [("Authorization", "Bearer admin-t0keN")];
    let (status, _, _) = service.post("/api/v1/cache/purge", &wrong, "{}").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let (status, _, answer) = service
        .post(
            "/api/v1/cache/purge",
            &auth,
            r#"{"type": "provider", "name": "aws"}"#,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["invalidated"], json!(["provider/aws"]));
    assert_eq!(
        answer["dropped"],
        json!({"listings": 1, "metadata": 1, "versions": 1})
    );

    warm(&service).await;
    let (_, _, answer) = service
        .post("/api/v1/cache/purge", &auth, r#"{"type": "taskserv"}"#)
        .await;
    assert_eq!(answer["dropped"]["versions"], 1, "{answer}");
    assert_eq!(answer["dropped"]["listings"], 1, "{answer}");

    warm(&service).await;
    let (_, _, answer) = service.post("/api/v1/cache/purge", &auth, "{}").await;
    assert_eq!(answer["dropped"]["listings"], 1, "{answer}");
    assert!(
        answer["dropped"]["versions"].as_u64().unwrap() >= 2,
        "{answer}"
    );

    for bad in [
        r#"{"type": "nope"}"#,
        r#"{"name": "aws"}"#,
        r#"{"type": "provider", "name": "A/B"}"#,
        "[]",
        // The fields in order, as an array: not the documented object.
        r#"["provider", "aws"]"#,
    ] {
        let (status, _, answer) = service.post("/api/v1/cache/purge", &auth, bad).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {answer}");
    }
    let get = service
        .http
        .get(service.url("/api/v1/cache/purge"))
        .send()
        .await
        .unwrap();
    assert_eq!(get.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(get.headers()["allow"], "POST");
    let options = service
        .http
        .request(http::Method::OPTIONS, service.url("/api/v1/cache/purge"))
        .send()
        .await
        .unwrap();
    assert_eq!(options.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(options.headers()["allow"], "POST");
}

#[tokio::test(start_paused = true)]
async fn unauthenticated_deliveries_and_purges_are_refused_before_their_bodies_arrive() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[local]\npath = {samples:?}\n\
         [gitea]\nurl = \"http://127.0.0.1:9/\"\norganization = \"extensions\"\n\
         webhook_secret_path = {gitea:?}\n\
         [oci]\nregistry = \"127.0.0.1:9\"\nnamespace = \"provisioning\"\n\
         webhook_token_path = {oci:?}\n\
         [admin]\ntoken_path = {admin:?}\n[rate_limit]\nenabled = false\n",
        samples = app::samples().display().to_string(),
        gitea = secret(dir.path(), "gitea-hook-secret", GITEA_SECRET),
        oci = secret(dir.path(), "oci-token", OCI_TOKEN),
        admin = secret(dir.path(), "admin-token", ADMIN_TOKEN),
    );
    let config = Config::parse(&text, "hooks.toml", None).unwrap();
    let service = extension_registry::build(&config).unwrap();
    let cases: [(&str, &[(&str, &str)]); 7] = [
        ("/api/v1/cache/purge", &[]),
        (
            "/api/v1/cache/purge",
            &[("authorization", "Bearer admin-t0keN")],
        ),
        ("/api/v1/hooks/oci", &[]),
        (
            "/api/v1/hooks/oci",
            &[("authorization", "Bearer notify-t0keN")],
        ),
        ("/api/v1/hooks/gitea", &[("x-gitea-event", "release")]),
        (
            "/api/v1/hooks/gitea",
            &[("x-gitea-event", "release"), ("x-gitea-signature", "abcd")],
        ),
        (
            "/api/v1/hooks/gitea",
            &[("x-gitea-event", "release"), ("x-gitea-signature", "zz")],
        ),
    ];
    for (path, headers) in cases {
        let mut request = http::Request::post(path)
            .header("content-type", "application/json")
            .header("content-length", "1048576");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        // A body that never arrives: a route that waited for it would answer 408 once its
        // timeout ran out on the paused clock.
        let stalled = http_body_util::StreamBody::new(futures_util::stream::pending::<
            Result<http_body::Frame<bytes::Bytes>, extension_registry::BoxError>,
        >());
        let request = request
            .body(http_body_util::BodyExt::boxed_unsync(stalled))
            .unwrap();
        let answer = app::send_request(&service, request).await;
        assert_eq!(
            answer.status,
            StatusCode::UNAUTHORIZED,
            "{path} {headers:?}"
        );
    }
}

#[tokio::test]
async fn routes_without_their_secret_do_not_exist() {
    let dir = tempfile::tempdir().unwrap();
    let service = local_service(dir.path(), false).await;
    for path in [
        "/api/v1/hooks/gitea",
        "/api/v1/hooks/oci",
        "/api/v1/cache/purge",
    ] {
        let (status, _, answer) = service.post(path, &[], "{}").await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
        assert_eq!(answer["error"], "not_found", "{path}");
        // Whatever the method, a CORS preflight included.
        let preflight = [
            ("origin", "https://app.example.com"),
            ("access-control-request-method", "POST"),
        ];
        for (method, headers) in [
            (http::Method::GET, &[][..]),
            (http::Method::OPTIONS, &[]),
            (http::Method::OPTIONS, &preflight),
        ] {
            let mut req = service.http.request(method.clone(), service.url(path));
            for (name, value) in headers {
                req = req.header(*name, *value);
            }
            let answer = req.send().await.unwrap();
            assert_eq!(answer.status(), StatusCode::NOT_FOUND, "{method} {path}");
        }
    }
}

#[test]
fn secret_files_are_read_at_start_relative_to_the_config_and_never_shown() {
    let dir = tempfile::tempdir().unwrap();
    secret(dir.path(), "admin-token", ADMIN_TOKEN);
    let text = format!(
        "[local]\npath = {:?}\n[admin]\ntoken_path = \"admin-token\"\n",
        app::samples().display().to_string()
    );
    let config = Config::parse(&text, "hooks.toml", Some(dir.path())).unwrap();
    assert_eq!(
        config.admin.token_path,
        Some(dir.path().join("admin-token"))
    );
    assert!(config.cache.refresh_on_invalidate, "on by default");
    let keys = extension_registry::hooks::Keys::load(&config).unwrap();
    assert!(!format!("{keys:?}").contains(ADMIN_TOKEN));

    let missing = text.replace("admin-token", "no-such-file");
    let config = Config::parse(&missing, "hooks.toml", Some(dir.path())).unwrap();
    let Err(error) = extension_registry::build(&config) else {
        panic!("a missing secret file builds");
    };
    assert!(error.to_string().contains("[admin] token_path"), "{error}");
}
