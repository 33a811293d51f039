//! The real CNCF distribution registry (Debian package `docker-registry`) for tests: started on
//! a free loopback port with a temporary storage directory, anonymous, htpasswd (basic) or
//! bearer-token auth (with the in-process token server of `token`), killed when its handle is
//! dropped (also when a test panics). Artifacts are pushed with the project's own helper
//! speaking the distribution API, or with skopeo as a client nobody here wrote.
//!
//! Include it with `#[path = "support/registry/mod.rs"] mod registry;`. Not every test binary
//! uses every helper.
#![allow(dead_code)]

pub mod front;
mod token;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use extension_registry::config::{Config, OciConfig};
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, LOCATION};
use reqwest::StatusCode;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

pub use self::token::{Account, TokenServer};

/// The account that pushes (all actions, catalog).
pub const ADMIN: (&str, &str) = ("ci", "s3cret");
/// A pull-only account (catalog too).
pub const READER: (&str, &str) = ("reader", "r3ad");

pub const LAYER_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
pub const INDEX_TYPE: &str = "application/vnd.oci.image.index.v1+json";
const CONFIG_TYPE: &str = "application/vnd.provisioning.extension.config.v1+json";

/// How the registry authenticates clients.
#[derive(Clone, Debug)]
pub enum Auth {
    Anonymous,
    /// htpasswd (bcrypt) with [`ADMIN`] and [`READER`].
    Basic,
    /// Bearer tokens from an in-process token server: [`ADMIN`] may push, [`READER`] pull;
    /// anonymous clients get pull when `anonymous_pull`, and never the catalog.
    Token {
        anonymous_pull: bool,
        /// `expires_in` of the tokens, in seconds.
        lifetime: u64,
    },
}

/// A running registry. Dropping it kills the process.
pub struct Registry {
    /// `None` once stopped.
    child: Option<Child>,
    /// Where it listens, read from its log.
    addr: SocketAddr,
    /// How pushes authenticate.
    auth: Auth,
    /// Config, storage, logs and secret files; removed on drop.
    dir: tempfile::TempDir,
    /// Running while the registry uses token auth.
    token_server: Option<TokenServer>,
    /// The push helper's client.
    http: reqwest::Client,
}

/// What a push stored.
#[derive(Clone, Debug)]
pub struct Pushed {
    /// Digest of the manifest the tag points at.
    pub manifest: String,
    /// Size of the manifest, for an index entry.
    pub manifest_size: usize,
    /// Digest of the artifact layer.
    pub layer: String,
}

fn need(binary: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|p| p.join(binary).is_file()));
    assert!(
        found,
        "`{binary}` is not installed; these tests need it: apt-get install -y {package}"
    );
}

pub fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

impl Registry {
    /// Starts a registry and waits until it listens.
    pub async fn start(auth: Auth) -> Registry {
        Self::launch(auth, None, None).await
    }

    /// Starts a registry that notifies `endpoint` of pushes and deletes (pulls ignored), with
    /// `Authorization: Bearer <token>`: the `notifications` block an operator writes.
    pub async fn start_notifying(auth: Auth, endpoint: &str, token: &str) -> Registry {
        Self::launch(auth, None, Some((endpoint, token))).await
    }

    /// Starts a registry behind `front`: its `redirect` storage middleware answers blob
    /// downloads with a `307` to the front's origin, which serves the blob from storage; the
    /// front forwards everything else here. Clients are configured with the front's address.
    pub async fn start_behind(front: &front::Front, auth: Auth) -> Registry {
        let registry = Self::launch(auth, Some(&front.url()), None).await;
        front.forward_to(&registry);
        registry
    }

    async fn launch(
        auth: Auth,
        blob_redirect: Option<&str>,
        notify: Option<(&str, &str)>,
    ) -> Registry {
        need("docker-registry", "docker-registry");
        let dir = tempfile::tempdir().expect("registry temp dir");
        let mut config = format!(
            "version: 0.1\n\
             log:\n  level: info\n  formatter: text\n\
             storage:\n  filesystem:\n    rootdirectory: {data}\n  delete:\n    enabled: true\n\
             http:\n  addr: 127.0.0.1:0\n  secret: test-secret\n",
            data = dir.path().join("data").display()
        );
        if let Some(base) = blob_redirect {
            config.push_str(&format!(
                "middleware:\n  storage:\n    - name: redirect\n      options:\n        baseurl: {base}\n"
            ));
        }
        if let Some((endpoint, token)) = notify {
            config.push_str(&notifications_block(endpoint, token));
        }
        let token_server = match &auth {
            Auth::Anonymous => None,
            Auth::Basic => {
                need("htpasswd", "apache2-utils");
                let htpasswd = dir.path().join("htpasswd");
                let mut file = std::fs::File::create(&htpasswd).expect("htpasswd file");
                for (user, password) in [ADMIN, READER] {
                    let out = Command::new("htpasswd")
                        .args(["-Bbn", user, password])
                        .output()
                        .expect("run htpasswd");
                    assert!(out.status.success(), "htpasswd failed");
                    file.write_all(&out.stdout).expect("write htpasswd");
                }
                config.push_str(&format!(
                    "auth:\n  htpasswd:\n    realm: test-registry\n    path: {}\n",
                    htpasswd.display()
                ));
                None
            }
            Auth::Token {
                anonymous_pull,
                lifetime,
            } => {
                let accounts = HashMap::from([
                    (
                        ADMIN.0.to_owned(),
                        Account {
                            password: ADMIN.1.to_owned(),
                            actions: vec!["pull".into(), "push".into()],
                            catalog: true,
                        },
                    ),
                    (
                        READER.0.to_owned(),
                        Account {
                            password: READER.1.to_owned(),
                            actions: vec!["pull".into()],
                            catalog: true,
                        },
                    ),
                ]);
                let server = TokenServer::start(accounts, *anonymous_pull, *lifetime).await;
                let cert = dir.path().join("token.crt");
                std::fs::write(&cert, &server.cert_pem).expect("write token certificate");
                config.push_str(&format!(
                    "auth:\n  token:\n    realm: http://{}/token\n    service: {}\n    issuer: {}\n    rootcertbundle: {}\n",
                    server.addr,
                    token::SERVICE,
                    token::ISSUER,
                    cert.display()
                ));
                Some(server)
            }
        };
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config).expect("write registry config");
        let access_log =
            std::fs::File::create(dir.path().join("access.log")).expect("access log file");
        let mut child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config_path)
            .stdout(Stdio::from(access_log))
            .stderr(Stdio::piped())
            .spawn()
            .expect("start docker-registry");
        let stderr = child.stderr.take().expect("registry stderr");
        let (tx, rx) = mpsc::channel();
        let log_path = dir.path().join("registry.log");
        // Reads the log until the registry says where it listens, then keeps draining it so
        // the registry never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut log = std::fs::File::create(log_path).ok();
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(log) = log.as_mut() {
                    let _ = writeln!(log, "{line}");
                }
                if let Some(rest) = line.split("msg=\"listening on ").nth(1) {
                    if let (Some(tx), Some(addr)) = (tx.take(), rest.split('"').next()) {
                        let _ = tx.send(addr.to_owned());
                    }
                }
            }
        });
        let addr = rx.recv_timeout(Duration::from_secs(30));
        let mut registry = Registry {
            child: Some(child),
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            auth,
            dir,
            token_server,
            http: reqwest::Client::new(),
        };
        match addr.ok().and_then(|a| a.parse().ok()) {
            Some(addr) => registry.addr = addr,
            None => {
                registry.stop();
                panic!(
                    "docker-registry did not start:\n{}",
                    std::fs::read_to_string(registry.dir.path().join("registry.log"))
                        .unwrap_or_default()
                );
            }
        }
        registry
    }

    /// `127.0.0.1:<port>`, as `[oci] registry` takes it.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The directory holding the registry's storage, config and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Where the registry keeps a blob on disk.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
        self.dir
            .path()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    /// Kills the registry and waits for it; later calls to it fail to connect.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends the registry SIGSTOP: it still accepts connections (the kernel queues them) but
    /// answers nothing, like a hung server. Dropping the handle still kills it.
    pub fn freeze(&self) {
        let pid = self.child.as_ref().expect("registry running").id();
        // The shell's builtin `kill`: procps may be missing on a minimal machine.
        let status = Command::new("sh")
            .args(["-c", &format!("kill -STOP {pid}")])
            .status()
            .expect("run sh");
        assert!(status.success(), "kill -STOP {pid}");
    }

    /// A token for `scopes` (`repository:<name>:pull`, `registry:catalog:*`) on behalf of
    /// `account`, signed like the token server's; for `[oci] auth_token_path`.
    pub fn token_for(&self, account: &str, scopes: &[&str]) -> String {
        let server = self
            .token_server
            .as_ref()
            .expect("registry with token auth");
        let scopes: Vec<String> = scopes.iter().map(|s| (*s).to_owned()).collect();
        server.mint(account, &scopes)
    }

    /// Writes `contents` to a file only the owner can read, in the registry's directory.
    pub fn secret_file(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, format!("{contents}\n")).expect("write secret file");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .expect("chmod secret file");
        }
        path
    }

    /// The request lines the registry served so far (`GET /v2/... HTTP/1.1`), from its access
    /// log. A line is written before the response is flushed, so after a call has returned
    /// its line is there.
    pub fn requests(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join("access.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| Some(l.split('"').nth(1)?.to_owned()))
            .collect()
    }

    /// Makes the token server grant nothing on repositories that hold no manifest, as GHCR's
    /// does: the registry then answers 401 for a missing repository even with valid
    /// credentials.
    pub fn grant_existing_repositories_only(&self) {
        self.token_server
            .as_ref()
            .expect("registry with token auth")
            .grant_existing_repositories_only();
    }

    /// Tokens handed out by the token server (0 without token auth).
    pub fn tokens_issued(&self) -> usize {
        self.token_server.as_ref().map_or(0, TokenServer::issued)
    }

    /// The `[oci]` TOML section for this registry (for whole-app configurations);
    /// `credentials` are written to a password file it names.
    pub fn oci_toml(&self, namespace: &str, credentials: Option<(&str, &str)>) -> String {
        let mut toml = format!(
            "[oci]\nregistry = {:?}\nnamespace = {namespace:?}\ntimeout_seconds = 10\n",
            self.host()
        );
        if let Some((user, password)) = credentials {
            let path = self.secret_file(&format!("{user}.password"), password);
            toml.push_str(&format!(
                "username = {user:?}\npassword_path = {:?}\n",
                path.display().to_string()
            ));
        }
        toml
    }

    /// The `[oci]` section of [`Registry::oci_toml`], parsed as the service parses it.
    pub fn oci_config(&self, namespace: &str, credentials: Option<(&str, &str)>) -> OciConfig {
        let toml = self.oci_toml(namespace, credentials);
        let config = Config::parse(&toml, "oci-test.toml", None).expect("valid [oci] section");
        config.oci.into_iter().next().expect("an [oci] section")
    }

    fn push_auth(&self, repo: &str, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match (&self.auth, &self.token_server) {
            (Auth::Basic, _) => request.basic_auth(ADMIN.0, Some(ADMIN.1)),
            (Auth::Token { .. }, Some(server)) => {
                let token = server.mint(ADMIN.0, &[format!("repository:{repo}:pull,push")]);
                request.header(AUTHORIZATION, format!("Bearer {token}"))
            }
            _ => request,
        }
    }

    /// Uploads a blob (skipped when the repository has it) and returns its digest.
    pub async fn upload_blob(&self, repo: &str, bytes: &[u8]) -> String {
        let digest = sha256(bytes);
        let blob = format!("{}/v2/{repo}/blobs/{digest}", self.url());
        let head = self
            .push_auth(repo, self.http.head(&blob))
            .send()
            .await
            .expect("HEAD blob");
        if head.status() == StatusCode::OK {
            return digest;
        }
        let start = self
            .push_auth(
                repo,
                self.http
                    .post(format!("{}/v2/{repo}/blobs/uploads/", self.url())),
            )
            .send()
            .await
            .expect("start upload");
        assert_eq!(
            start.status(),
            StatusCode::ACCEPTED,
            "start upload of {repo}"
        );
        let location = start.headers()[LOCATION]
            .to_str()
            .expect("upload location")
            .to_owned();
        // The location is absolute in 2.8 and already carries `_state`; relative ones are
        // allowed by the spec.
        let mut url = reqwest::Url::parse(&self.url())
            .and_then(|base| base.join(&location))
            .expect("upload URL");
        url.query_pairs_mut().append_pair("digest", &digest);
        let put = self
            .push_auth(repo, self.http.put(url))
            .header(CONTENT_TYPE, "application/octet-stream")
            .body(bytes.to_vec())
            .send()
            .await
            .expect("upload blob");
        assert_eq!(put.status(), StatusCode::CREATED, "upload blob to {repo}");
        digest
    }

    /// Stores a manifest (any JSON) under `reference`; returns its digest.
    pub async fn put_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        manifest: &Value,
    ) -> String {
        let body = serde_json::to_vec(manifest).expect("manifest JSON");
        if let Some(server) = &self.token_server {
            server.note_repository(repo);
        }
        let put = self
            .push_auth(
                repo,
                self.http
                    .put(format!("{}/v2/{repo}/manifests/{reference}", self.url())),
            )
            .header(CONTENT_TYPE, media_type)
            .body(body.clone())
            .send()
            .await
            .expect("put manifest");
        assert_eq!(
            put.status(),
            StatusCode::CREATED,
            "put manifest {repo}:{reference}"
        );
        sha256(&body)
    }

    /// Pushes an extension artifact: a config blob, the `.tar.gz` layer (titled
    /// `<repo name>-<tag>.tar.gz`) and an OCI manifest with `annotations`, tagged `tag`.
    pub async fn push(
        &self,
        repo: &str,
        tag: &str,
        artifact: &[u8],
        annotations: &[(&str, &str)],
    ) -> Pushed {
        let name = repo.rsplit('/').next().unwrap_or(repo);
        let config = json!({"name": name, "version": tag}).to_string();
        let config_digest = self.upload_blob(repo, config.as_bytes()).await;
        let layer = self.upload_blob(repo, artifact).await;
        let annotations: serde_json::Map<String, Value> = annotations
            .iter()
            .map(|(k, v)| ((*k).to_owned(), Value::from(*v)))
            .collect();
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST_TYPE,
            "config": {"mediaType": CONFIG_TYPE, "digest": config_digest, "size": config.len()},
            "layers": [{
                "mediaType": LAYER_TYPE,
                "digest": layer,
                "size": artifact.len(),
                "annotations": {"org.opencontainers.image.title": format!("{name}-{tag}.tar.gz")}
            }],
            "annotations": annotations,
        });
        let manifest_size = serde_json::to_vec(&manifest).expect("manifest JSON").len();
        let digest = self.put_manifest(repo, tag, MANIFEST_TYPE, &manifest).await;
        Pushed {
            manifest: digest,
            manifest_size,
            layer,
        }
    }

    /// Tags an OCI index over already pushed manifests.
    pub async fn push_index(&self, repo: &str, tag: &str, manifests: &[&Pushed]) -> String {
        let entries: Vec<Value> = manifests
            .iter()
            .map(|m| json!({"mediaType": MANIFEST_TYPE, "digest": m.manifest, "size": m.manifest_size}))
            .collect();
        let index = json!({"schemaVersion": 2, "mediaType": INDEX_TYPE, "manifests": entries});
        self.put_manifest(repo, tag, INDEX_TYPE, &index).await
    }

    /// Pushes an artifact with skopeo from an OCI image layout written here (manifest with
    /// `annotations`, no layer title). Returns the layer digest.
    pub async fn push_with_skopeo(
        &self,
        repo: &str,
        tag: &str,
        artifact: &[u8],
        annotations: &[(&str, &str)],
    ) -> String {
        need("skopeo", "skopeo");
        let layout = tempfile::tempdir().expect("layout dir");
        let blobs = layout.path().join("blobs/sha256");
        std::fs::create_dir_all(&blobs).expect("layout blobs dir");
        let add = |bytes: &[u8]| {
            let digest = sha256(bytes);
            std::fs::write(blobs.join(&digest["sha256:".len()..]), bytes).expect("layout blob");
            digest
        };
        let config = json!({"name": repo, "version": tag}).to_string();
        let annotations: serde_json::Map<String, Value> = annotations
            .iter()
            .map(|(k, v)| ((*k).to_owned(), Value::from(*v)))
            .collect();
        let layer = add(artifact);
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST_TYPE,
            "config": {"mediaType": CONFIG_TYPE, "digest": add(config.as_bytes()), "size": config.len()},
            "layers": [{"mediaType": LAYER_TYPE, "digest": layer, "size": artifact.len()}],
            "annotations": annotations,
        })
        .to_string();
        let index = json!({
            "schemaVersion": 2,
            "mediaType": INDEX_TYPE,
            "manifests": [{
                "mediaType": MANIFEST_TYPE,
                "digest": add(manifest.as_bytes()),
                "size": manifest.len(),
                "annotations": {"org.opencontainers.image.ref.name": tag}
            }]
        });
        std::fs::write(layout.path().join("index.json"), index.to_string()).expect("index.json");
        std::fs::write(
            layout.path().join("oci-layout"),
            r#"{"imageLayoutVersion":"1.0.0"}"#,
        )
        .expect("oci-layout");
        let mut command = tokio::process::Command::new("skopeo");
        command.args(["copy", "--dest-tls-verify=false"]);
        if !matches!(self.auth, Auth::Anonymous) {
            command.arg(format!("--dest-creds={}:{}", ADMIN.0, ADMIN.1));
        }
        let out = command
            .arg(format!("oci:{}:{tag}", layout.path().display()))
            .arg(format!("docker://{}/{repo}:{tag}", self.host()))
            .output()
            .await
            .expect("run skopeo");
        assert!(
            out.status.success(),
            "skopeo copy failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        layer
    }
}

/// The registry's `notifications` configuration for one endpoint: pushes and deletes are
/// sent at once (`threshold`/`backoff` retry a failing endpoint), pulls are not sent at all.
pub fn notifications_block(endpoint: &str, token: &str) -> String {
    format!(
        "notifications:\n  endpoints:\n    - name: extension-registry\n      url: {endpoint}\n      \
         headers:\n        Authorization: [\"Bearer {token}\"]\n      timeout: 5s\n      \
         threshold: 3\n      backoff: 100ms\n      ignore:\n        actions: [pull]\n"
    )
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}
