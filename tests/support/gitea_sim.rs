//! A Gitea 1.26 simulator (Forgejo 11 in `forgejo` mode) for the endpoints the Gitea backend
//! uses, built from `CONTRACT.md`: org repositories and releases with Gitea's pagination
//! (50-item cap, `X-Total-Count`, `Link` from a ROOT_URL with a sub-path, `200 []` past the end,
//! short pages for signed-in callers), private repositories (404), 401 for a wrong token on
//! every route, asset downloads served directly or by a 303 to a second "object storage" host,
//! the sign-in trap, slow and failing modes, Gitea's JSON error bodies, and single byte ranges
//! on asset downloads as Go's `http.ServeContent` answers them (or ignored, or misanswered,
//! per [`Ranges`]).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use extension_registry::config::GiteaConfig;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, LOCATION};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, CONTROLS};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use time::format_description::well_known::Rfc3339;
use time::{OffsetDateTime, UtcOffset};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::rustls;

/// Gitea's `[api] MAX_RESPONSE_ITEMS` and `DEFAULT_PAGING_NUM` defaults.
const MAX_RESPONSE_ITEMS: i64 = 50;
const DEFAULT_PAGING_NUM: i64 = 30;

/// What Go's `url.PathEscape` escapes, near enough for tags and file names.
const PATH_PIECE: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'/')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'`')
    .add(b'{')
    .add(b'}');

/// The file content a seeded artifact has, so tests know what a download must yield.
pub fn artifact_bytes(name: &str, tag: &str) -> Bytes {
    Bytes::from(format!("tarball of {name} {tag}\n").repeat(64))
}

/// The lowercase hex sha256 of some bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Writes a token file readable by its owner only, as the service expects.
pub fn token_file(dir: &Path, token: &str) -> PathBuf {
    let path = dir.join("gitea-token");
    std::fs::write(&path, format!("{token}\n")).expect("write token file");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .expect("chmod token file");
    }
    path
}

/// One release asset.
#[derive(Clone, Debug)]
pub struct SimAsset {
    /// The file name, which decides its role (artifact, sidecar, other).
    pub name: String,
    /// The content, served by the download routes; its length is the asset's `size`.
    pub bytes: Bytes,
    /// Assigned at start; also makes the asset's UUID.
    id: u64,
    /// How its download routes answer instead of serving the bytes (see [`Hop`]).
    pub hop: Option<Hop>,
}

/// One release.
#[derive(Clone, Debug)]
pub struct SimRelease {
    /// The tag, i.e. the version.
    pub tag: String,
    /// Hidden from every caller here (none has write access).
    pub draft: bool,
    /// Listed, but not chosen as the current version while a stable one exists.
    pub prerelease: bool,
    /// Creation (= publication) time, Unix seconds.
    pub created: i64,
    /// The author's login; `None` shows the organization as author.
    pub author: Option<String>,
    /// The attached files.
    pub assets: Vec<SimAsset>,
    /// Assigned at start, in seeding order.
    id: u64,
    /// Its assets' `browser_download_url` is `{ROOT_URL}attachments/{uuid}`, as Gitea writes
    /// it when two assets of a release share a name.
    pub uuid_urls: bool,
}

impl SimRelease {
    pub fn new(tag: &str, created: i64) -> Self {
        Self {
            tag: tag.into(),
            draft: false,
            prerelease: false,
            created,
            author: Some("release-bot".into()),
            assets: Vec::new(),
            id: 0,
            uuid_urls: false,
        }
    }

    pub fn draft(mut self) -> Self {
        self.draft = true;
        self
    }

    pub fn prerelease(mut self) -> Self {
        self.prerelease = true;
        self
    }

    pub fn without_author(mut self) -> Self {
        self.author = None;
        self
    }

    pub fn asset(mut self, name: &str, bytes: impl Into<Bytes>) -> Self {
        self.assets.push(SimAsset {
            name: name.into(),
            bytes: bytes.into(),
            id: 0,
            hop: None,
        });
        self
    }

    /// Adds `{name}-{tag}.tar.gz` holding [`artifact_bytes`].
    pub fn artifact(self, name: &str) -> Self {
        let file = format!("{name}-{}.tar.gz", self.tag);
        let bytes = artifact_bytes(name, &self.tag);
        self.asset(&file, bytes)
    }

    /// Adds `<first tarball>.sha256` in `sha256sum` format; `correct = false` writes the digest
    /// of other bytes.
    pub fn sha256_sidecar(self, correct: bool) -> Self {
        let Some(tarball) = self
            .assets
            .iter()
            .find(|a| a.name.ends_with(".tar.gz") || a.name.ends_with(".tgz"))
        else {
            return self;
        };
        let digest = if correct {
            sha256_hex(&tarball.bytes)
        } else {
            sha256_hex(b"some other bytes")
        };
        let text = format!("{digest}  {}\n", tarball.name);
        let name = format!("{}.sha256", tarball.name);
        self.asset(&name, text)
    }
}

/// One repository of the organization.
#[derive(Clone, Debug)]
pub struct SimRepo {
    /// `{name}_prov|_taskserv|_cluster` for extensions, anything for others.
    pub name: String,
    /// Shown as the extension's description.
    pub description: String,
    /// Visible to the token holder only; 404 to anonymous callers.
    pub private: bool,
    /// Private and not readable by the configured token either.
    pub hidden_from_token: bool,
    /// Listed with `archived: true`.
    pub archived: bool,
    /// Its releases route answers 500.
    pub failing: bool,
    /// Its releases route answers 429 with `Retry-After` of this many seconds, as a
    /// rate-limiting proxy in front of the instance does once its budget runs out mid-listing.
    pub throttled: Option<u64>,
    /// The repository's topics.
    pub topics: Vec<String>,
    /// In any order; served newest first by creation time.
    pub releases: Vec<SimRelease>,
    /// Assigned at start, in seeding order (Gitea lists by id).
    id: u64,
}

impl SimRepo {
    pub fn new(name: &str) -> Self {
        Self {
            name: name.into(),
            description: format!("The {name} extension"),
            private: false,
            hidden_from_token: false,
            archived: false,
            failing: false,
            throttled: None,
            topics: Vec::new(),
            releases: Vec::new(),
            id: 0,
        }
    }

    pub fn private(mut self) -> Self {
        self.private = true;
        self
    }

    pub fn hidden_from_token(mut self) -> Self {
        self.private = true;
        self.hidden_from_token = true;
        self
    }

    pub fn archived(mut self) -> Self {
        self.archived = true;
        self
    }

    pub fn failing(mut self) -> Self {
        self.failing = true;
        self
    }

    pub fn topic(mut self, topic: &str) -> Self {
        self.topics.push(topic.into());
        self
    }

    pub fn release(mut self, release: SimRelease) -> Self {
        self.releases.push(release);
        self
    }
}

/// The extension repositories of [`seeded_org`]`(n)`, as `(type, name)`.
pub fn seeded_extensions(n: usize) -> Vec<(&'static str, String)> {
    (0..n)
        .map(|i| {
            (
                ["provider", "taskserv", "cluster"][i % 3],
                format!("ext{i:03}"),
            )
        })
        .collect()
}

/// An organization with `n` extension repositories `ext{i:03}_{prov|taskserv|cluster}`, each
/// with one release `1.0.{i}` carrying `ext{i:03}-1.0.{i}.tar.gz`; after every tenth a
/// repository that is no extension, after every seventh an archived extension repository.
pub fn seeded_org(n: usize) -> Vec<SimRepo> {
    let mut repos = Vec::new();
    for (i, (ty, name)) in seeded_extensions(n).into_iter().enumerate() {
        let suffix = match ty {
            "provider" => "prov",
            "taskserv" => "taskserv",
            _ => "cluster",
        };
        let tag = format!("1.0.{i}");
        let created = 1_735_689_600 + i as i64 * 60;
        repos.push(
            SimRepo::new(&format!("{name}_{suffix}"))
                .release(SimRelease::new(&tag, created).artifact(&name)),
        );
        if i % 10 == 9 {
            repos.push(SimRepo::new(&format!("notes{i}")));
        }
        if i % 7 == 6 {
            repos.push(
                SimRepo::new(&format!("old{i:03}_prov"))
                    .archived()
                    .release(SimRelease::new("0.1.0", created).artifact(&format!("old{i:03}"))),
            );
        }
    }
    repos
}

/// How the simulated instance is set up.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// The one organization served; others are 404 `GetOrgByName`.
    pub org: String,
    /// Path under which the instance is served, with leading and trailing `/`.
    pub sub_path: String,
    /// The organization's repositories, in creation order.
    pub repos: Vec<SimRepo>,
    /// The one valid personal access token.
    pub token: Option<String>,
    /// Forgejo 11: lowercase `token` only, its version string and error bodies.
    pub forgejo: bool,
    /// `REQUIRE_SIGNIN_VIEW`: anonymous API calls get 403, downloads the login page.
    pub require_signin: bool,
    /// `SERVE_DIRECT`: downloads answer 303 to the object storage host.
    pub storage_redirect: bool,
    /// The zone timestamps are rendered in (`DEFAULT_UI_LOCATION`).
    pub utc_offset_hours: i8,
    /// When above 0, each releases request waits until this many are in flight together:
    /// a client that does not overlap them stalls, which proves it does.
    pub releases_rendezvous: usize,
    /// Serve the API over TLS (see [`SimConfig::tls`]); object storage stays plain HTTP.
    pub tls: bool,
    /// How asset downloads (on either host) answer `Range`.
    pub ranges: Ranges,
}

/// How asset downloads answer a `Range` request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ranges {
    /// Like Gitea (Go's `http.ServeContent`) and object storage: one `bytes=` range is a 206
    /// with `Content-Range`, one past the end a 416.
    Honour,
    /// Like a host that does not do ranges: 200 with the whole file.
    Ignore,
    /// A broken host: a 206 whose bytes and `Content-Range` start one byte late.
    OffByOne,
}

impl SimConfig {
    pub fn new(org: &str) -> Self {
        Self {
            org: org.into(),
            sub_path: "/git/".into(),
            repos: Vec::new(),
            token: None,
            forgejo: false,
            require_signin: false,
            storage_redirect: false,
            utc_offset_hours: 0,
            releases_rendezvous: 0,
            tls: false,
            ranges: Ranges::Honour,
        }
    }

    pub fn repos(mut self, repos: Vec<SimRepo>) -> Self {
        self.repos = repos;
        self
    }

    pub fn repo(mut self, repo: SimRepo) -> Self {
        self.repos.push(repo);
        self
    }

    pub fn token(mut self, token: &str) -> Self {
        self.token = Some(token.into());
        self
    }

    pub fn forgejo(mut self) -> Self {
        self.forgejo = true;
        self
    }

    pub fn require_signin(mut self) -> Self {
        self.require_signin = true;
        self
    }

    pub fn storage_redirect(mut self) -> Self {
        self.storage_redirect = true;
        self
    }

    pub fn releases_rendezvous(mut self, together: usize) -> Self {
        self.releases_rendezvous = together;
        self
    }

    pub fn utc_offset_hours(mut self, hours: i8) -> Self {
        self.utc_offset_hours = hours;
        self
    }
}

/// How every request to the Gitea host is answered, switchable while running.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Normal,
    /// Never answers (until the simulator is dropped).
    Slow,
    /// 500 with Gitea's error body.
    ServerError,
    /// API routes answer 200 with truncated JSON.
    MalformedJson,
    /// Releases routes answer 500 (as [`SimRepo::failing`] does for one repository); every
    /// other route as usual.
    FailingReleases,
    /// The organization's repositories: every page is answered as the first and names the next
    /// one, up to page 300, past what any client should follow.
    RunawayPages,
}

/// Requests seen, by route.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Calls {
    /// Every request to `{ROOT_URL}api/…`.
    pub api: u64,
    /// `GET api/v1/orgs/{org}/repos` pages.
    pub org_repos: u64,
    /// `GET api/v1/repos/{owner}/{repo}`.
    pub repo: u64,
    /// `GET api/v1/repos/{owner}/{repo}/releases` pages.
    pub releases: u64,
    /// `GET api/v1/repos/{owner}/{repo}/releases/tags/{tag}`.
    pub release_by_tag: u64,
    /// `GET api/v1/version`.
    pub version: u64,
    /// `…/releases/download/…` web routes.
    pub downloads: u64,
    /// Downloads that carried an `Authorization` header.
    pub downloads_with_authorization: u64,
    /// Requests to the object storage host.
    pub storage: u64,
    /// Object storage requests that carried an `Authorization` header: must stay 0.
    pub storage_with_authorization: u64,
    /// Most releases requests ever in flight at once.
    pub releases_in_flight_max: u64,
    /// Asset downloads (either host) that asked for a `Range`.
    pub ranged_downloads: u64,
}

struct State {
    /// The seeded instance, ids assigned.
    config: SimConfig,
    /// `http://127.0.0.1:PORT/git/`.
    root: String,
    /// `http://127.0.0.1:PORT2/`, another host as far as clients are concerned.
    storage: String,
    /// How requests are answered now.
    mode: Mutex<Mode>,
    /// Requests seen so far.
    calls: Mutex<Calls>,
    /// Releases requests being answered now.
    releases_in_flight: Mutex<u64>,
    /// Where releases requests meet, per `SimConfig::releases_rendezvous`.
    rendezvous: Option<tokio::sync::Barrier>,
    /// Every request to either host, in order, with whether it carried credentials.
    seen: Mutex<Vec<Seen>>,
    /// Assets replaced while running (see [`GiteaSim::reupload`]).
    reuploads: Mutex<Reuploads>,
    /// Releases published while running (see [`GiteaSim::publish`]).
    published: Mutex<Vec<(String, SimRelease)>>,
    /// The fault-matrix state: the current [`Fault`] and the TLS listener's certificates.
    faults: Faults,
}

/// Counts a releases request as in flight while it lives (also when its connection is cut).
struct InFlight<'a>(&'a State);

impl<'a> InFlight<'a> {
    fn new(state: &'a State) -> Self {
        let mut now = state.releases_in_flight.lock().expect("in flight");
        *now += 1;
        state.count(|c| c.releases_in_flight_max = c.releases_in_flight_max.max(*now));
        Self(state)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        *self.0.releases_in_flight.lock().expect("in flight") -= 1;
    }
}

/// A running simulator; dropping it stops both listeners and every open connection.
pub struct GiteaSim {
    /// Shared with the connection handlers.
    state: Arc<State>,
    /// The two accept loops, aborted on drop.
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for GiteaSim {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl GiteaSim {
    pub async fn start(mut config: SimConfig) -> Self {
        let (mut repo_id, mut release_id, mut asset_id) = (10, 100, 500);
        for repo in &mut config.repos {
            repo_id += 1;
            repo.id = repo_id;
            for release in &mut repo.releases {
                release_id += 1;
                release.id = release_id;
                for asset in &mut release.assets {
                    asset_id += 1;
                    asset.id = asset_id;
                }
            }
        }
        let gitea = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let storage = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = |l: &TcpListener| -> SocketAddr { l.local_addr().expect("addr") };
        let rendezvous = (config.releases_rendezvous > 0)
            .then(|| tokio::sync::Barrier::new(config.releases_rendezvous));
        let faults = Faults::new(config.tls);
        let state = Arc::new(State {
            root: format!("{}://{}{}", faults.scheme(), addr(&gitea), config.sub_path),
            storage: format!("http://{}/", addr(&storage)),
            config,
            mode: Mutex::new(Mode::Normal),
            calls: Mutex::new(Calls::default()),
            releases_in_flight: Mutex::new(0),
            rendezvous,
            seen: Mutex::new(Vec::new()),
            reuploads: Mutex::new(Reuploads::default()),
            published: Mutex::new(Vec::new()),
            faults,
        });
        let tasks = vec![
            if state.faults.is_tls() {
                tokio::spawn(serve_tls(gitea, Arc::clone(&state)))
            } else {
                tokio::spawn(serve(gitea, Arc::clone(&state), false))
            },
            tokio::spawn(serve(storage, Arc::clone(&state), true)),
        ];
        Self { state, tasks }
    }

    /// The ROOT_URL, with its sub-path and trailing `/`.
    pub fn url(&self) -> String {
        self.state.root.clone()
    }

    pub fn calls(&self) -> Calls {
        *self.state.calls.lock().expect("calls")
    }

    pub fn set_mode(&self, mode: Mode) {
        *self.state.mode.lock().expect("mode") = mode;
    }

    /// A `[gitea]` section pointing at this simulator, anonymous, 5 s timeout.
    pub fn gitea_config(&self) -> GiteaConfig {
        GiteaConfig {
            name: None,
            priority: None,
            url: self.url(),
            organization: self.state.config.org.clone(),
            token_path: None,
            timeout_seconds: 5,
            verify_ssl: true,
            max_concurrency: 8,
            include_archived: false,
            webhook_secret_path: None,
        }
    }

    /// The same, with the simulator's valid token written to a file in `dir`.
    pub fn gitea_config_with_token(&self, dir: &Path) -> GiteaConfig {
        let token = self
            .state
            .config
            .token
            .as_deref()
            .expect("SimConfig::token");
        GiteaConfig {
            token_path: Some(token_file(dir, token)),
            ..self.gitea_config()
        }
    }
}

async fn serve(listener: TcpListener, state: Arc<State>, storage: bool) {
    // Dropping the set (when the accept task is aborted) aborts every connection, including
    // those parked by `Mode::Slow`.
    let mut connections = JoinSet::new();
    while let Ok((stream, _)) = listener.accept().await {
        let state = Arc::clone(&state);
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let state = Arc::clone(&state);
            async move {
                let reply = if storage {
                    state.storage_route(&req)
                } else {
                    state.route(&req).await
                };
                Ok::<_, Infallible>(state.ranged(&req, reply).await)
            }
        });
        connections.spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
        while connections.try_join_next().is_some() {}
    }
}

type Reply = Response<Full<Bytes>>;

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Reply {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, content_type.parse().expect("content type"));
    r
}

fn text(status: StatusCode, body: &'static str) -> Reply {
    reply(status, "text/plain; charset=utf-8", body)
}

/// `r` with `Retry-After: {seconds}`.
fn retry_after(mut r: Reply, seconds: u64) -> Reply {
    add_header(&mut r, "retry-after", &seconds.to_string());
    r
}

/// Gitea's JSON: compact, newline-terminated.
fn json_reply(status: StatusCode, value: &Value) -> Reply {
    let mut body = serde_json::to_vec(value).expect("json");
    body.push(b'\n');
    reply(status, "application/json;charset=utf-8", body)
}

fn redirect(location: &str) -> Reply {
    let mut r = reply(StatusCode::SEE_OTHER, "text/html; charset=utf-8", "");
    r.headers_mut()
        .insert(LOCATION, location.parse().expect("location"));
    r
}

fn add_header(r: &mut Reply, name: &'static str, value: &str) {
    r.headers_mut()
        .insert(name, value.parse().expect("header value"));
}

/// Who is calling, as Gitea's auth middleware decides it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Caller {
    Anonymous,
    /// The holder of the configured token.
    User,
    /// Credentials that are not valid: 401 everywhere.
    Invalid,
}

/// Decodes standard base64 (Basic credentials).
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.trim_end_matches('=').bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

fn query_value<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query
        .split('&')
        .filter_map(|p| p.split_once('=').or(Some((p, ""))))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

impl State {
    fn count(&self, f: impl FnOnce(&mut Calls)) {
        f(&mut self.calls.lock().expect("calls"));
    }

    fn mode(&self) -> Mode {
        *self.mode.lock().expect("mode")
    }

    fn caller(&self, req: &Request<Incoming>) -> Caller {
        let Some(value) = req
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
        else {
            return Caller::Anonymous;
        };
        let (scheme, credential) = value.split_once(' ').unwrap_or((value, ""));
        let presented = if scheme == "token" || scheme.eq_ignore_ascii_case("bearer") {
            credential.trim().to_owned()
        } else if scheme.eq_ignore_ascii_case("token") {
            // Forgejo (and Gitea before 1.25) ignore any other casing: anonymous.
            if self.config.forgejo {
                return Caller::Anonymous;
            }
            credential.trim().to_owned()
        } else if scheme.eq_ignore_ascii_case("basic") {
            let decoded = base64_decode(credential.trim())
                .and_then(|b| String::from_utf8(b).ok())
                .unwrap_or_default();
            let (user, password) = decoded.split_once(':').unwrap_or((&decoded, ""));
            if password.is_empty() || password == "x-oauth-basic" {
                user.to_owned()
            } else {
                password.to_owned()
            }
        } else {
            return Caller::Anonymous;
        };
        if self.config.token.as_deref() == Some(presented.as_str()) {
            Caller::User
        } else {
            Caller::Invalid
        }
    }

    fn timestamp(&self, unix: i64) -> String {
        let offset = UtcOffset::from_hms(self.config.utc_offset_hours, 0, 0).expect("offset");
        OffsetDateTime::from_unix_timestamp(unix)
            .expect("time")
            .to_offset(offset)
            .format(&Rfc3339)
            .expect("format")
    }

    fn swagger_url(&self) -> String {
        format!("{}api/swagger", self.root)
    }

    fn not_found_json(&self) -> Reply {
        let body = if self.config.forgejo {
            json!({"message": "The target couldn't be found.", "url": self.swagger_url(), "errors": []})
        } else {
            json!({"errors": null, "message": "not found", "url": self.swagger_url()})
        };
        json_reply(StatusCode::NOT_FOUND, &body)
    }

    fn unauthorized_json(&self) -> Reply {
        let message = if self.config.forgejo {
            "user does not exist [uid: 0, name: ]"
        } else {
            "invalid username, password or token"
        };
        json_reply(
            StatusCode::UNAUTHORIZED,
            &json!({"message": message, "url": self.swagger_url()}),
        )
    }

    fn server_error_json(&self) -> Reply {
        json_reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            &json!({"message": "", "url": self.swagger_url()}),
        )
    }

    fn can_read(&self, repo: &SimRepo, caller: Caller) -> bool {
        !repo.private || (caller == Caller::User && !repo.hidden_from_token)
    }

    fn repo(&self, owner: &str, name: &str, caller: Caller) -> Option<&SimRepo> {
        if owner != self.config.org {
            return None;
        }
        self.config
            .repos
            .iter()
            .find(|r| r.name.eq_ignore_ascii_case(name) && self.can_read(r, caller))
    }

    async fn route(&self, req: &Request<Incoming>) -> Reply {
        self.record(req, false);
        let path = req.uri().path();
        let Some(rel) = path.strip_prefix(self.config.sub_path.as_str()) else {
            return text(StatusCode::NOT_FOUND, "Not found.");
        };
        let segments: Vec<String> = rel
            .split('/')
            .map(|s| percent_decode_str(s).decode_utf8_lossy().into_owned())
            .collect();
        let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
        let query = req.uri().query().unwrap_or("");
        let caller = self.caller(req);
        let api = segments.first() == Some(&"api");
        if api {
            self.count(|c| c.api += 1);
        }
        if let [_, _, "releases", "download", ..] = segments.as_slice() {
            let has_auth = req.headers().contains_key(AUTHORIZATION);
            self.count(|c| {
                c.downloads += 1;
                c.downloads_with_authorization += u64::from(has_auth);
            });
        }
        if let Some(reply) = self.fault(req, api).await {
            return reply;
        }
        match self.mode() {
            Mode::Normal => {}
            Mode::Slow => std::future::pending::<()>().await,
            Mode::ServerError if api => return self.server_error_json(),
            Mode::ServerError => {
                return text(StatusCode::INTERNAL_SERVER_ERROR, "Internal Server Error")
            }
            Mode::MalformedJson if api => {
                return reply(
                    StatusCode::OK,
                    "application/json;charset=utf-8",
                    "[{\"id\":1,\"name\":",
                )
            }
            Mode::FailingReleases
                if matches!(
                    segments.as_slice(),
                    ["api", "v1", "repos", _, _, "releases"]
                ) =>
            {
                return self.server_error_json()
            }
            Mode::MalformedJson | Mode::FailingReleases | Mode::RunawayPages => {}
        }
        if let Some(reply) = self.hop_route(&segments, caller) {
            return reply;
        }
        if let ["api", "v1", "repos", _, _, "releases"] = segments.as_slice() {
            let _in_flight = InFlight::new(self);
            if let Some(rendezvous) = &self.rendezvous {
                rendezvous.wait().await;
            }
            return self.api(&segments[1..], rel, query, caller);
        }
        if api {
            self.api(&segments[1..], rel, query, caller)
        } else {
            self.web(&segments, rel, caller)
        }
    }

    fn api(&self, segments: &[&str], rel: &str, query: &str, caller: Caller) -> Reply {
        if caller == Caller::Invalid {
            return self.unauthorized_json();
        }
        if let ["healthz"] = segments {
            let now = self.timestamp(1_742_000_000);
            let body = json!({"status": "pass", "description": if self.config.forgejo {
                "Forgejo: Beyond coding. We Forge." } else { "Gitea: Git with a cup of tea" },
                "checks": {"cache:ping": [{"status": "pass", "time": now}],
                           "database:ping": [{"status": "pass", "time": now}]}});
            let pretty = serde_json::to_string_pretty(&body).expect("json");
            return reply(StatusCode::OK, "application/json", pretty);
        }
        if self.config.require_signin && caller == Caller::Anonymous {
            return json_reply(
                StatusCode::FORBIDDEN,
                &json!({"message": "Only signed in user is allowed to call APIs."}),
            );
        }
        match segments {
            ["v1", "version"] => {
                self.count(|c| c.version += 1);
                let version = if self.config.forgejo {
                    "11.0.1+gitea-1.22.0"
                } else {
                    "1.26.3"
                };
                json_reply(StatusCode::OK, &json!({ "version": version }))
            }
            ["v1", "orgs", org, "repos"] => {
                self.count(|c| c.org_repos += 1);
                if *org != self.config.org {
                    return json_reply(
                        StatusCode::NOT_FOUND,
                        &json!({"errors": [format!("org does not exist [id: 0, name: {org}]")],
                                "message": "GetOrgByName", "url": self.swagger_url()}),
                    );
                }
                // Signed-in callers query every repository and lose the unreadable ones from
                // the page afterwards; anonymous ones query public repositories only.
                let queried: Vec<&SimRepo> = self
                    .config
                    .repos
                    .iter()
                    .filter(|r| caller == Caller::User || !r.private)
                    .collect();
                let runaway = self.mode() == Mode::RunawayPages;
                let asked = if runaway { "page=1" } else { query };
                let (range, mut headers) = self.paginate(rel, asked, queried.len());
                if runaway {
                    let page = query_value(query, "page")
                        .and_then(|p| p.parse::<u64>().ok())
                        .unwrap_or(1);
                    headers.retain(|(name, _)| *name != "link");
                    if page < 300 {
                        let next = format!("<{}{rel}?page={}>; rel=\"next\"", self.root, page + 1);
                        headers.push(("link", next));
                    }
                }
                let items: Vec<Value> = queried[range]
                    .iter()
                    .filter(|r| self.can_read(r, caller))
                    .map(|r| self.repo_json(r))
                    .collect();
                let mut r = json_reply(StatusCode::OK, &Value::Array(items));
                for (name, value) in headers.drain(..) {
                    add_header(&mut r, name, &value);
                }
                r
            }
            ["v1", "repos", owner, name] => {
                self.count(|c| c.repo += 1);
                match self.repo(owner, name, caller) {
                    Some(repo) => json_reply(StatusCode::OK, &self.repo_json(repo)),
                    None => self.not_found_json(),
                }
            }
            ["v1", "repos", owner, name, "releases"] => {
                self.count(|c| c.releases += 1);
                let (repo, mut releases) = match self.visible_releases(owner, name, caller) {
                    Ok(found) => found,
                    Err(refusal) => return *refusal,
                };
                releases.sort_by(|a, b| b.created.cmp(&a.created).then(b.id.cmp(&a.id)));
                let (range, headers) = self.paginate(rel, query, releases.len());
                let items: Vec<Value> = releases[range]
                    .iter()
                    .map(|r| self.release_json(repo, r))
                    .collect();
                let mut r = json_reply(StatusCode::OK, &Value::Array(items));
                for (name, value) in headers {
                    add_header(&mut r, name, &value);
                }
                r
            }
            ["v1", "repos", owner, name, "releases", "tags", tag] => {
                self.count(|c| c.release_by_tag += 1);
                let (repo, releases) = match self.visible_releases(owner, name, caller) {
                    Ok(found) => found,
                    Err(refusal) => return *refusal,
                };
                // Looked up by the lowercased tag (CONTRACT.md §4.4).
                match releases.iter().find(|r| r.tag.eq_ignore_ascii_case(tag)) {
                    Some(release) => json_reply(StatusCode::OK, &self.release_json(repo, release)),
                    None => self.not_found_json(),
                }
            }
            _ => self.not_found_json(),
        }
    }

    /// The repository and the releases of it the caller sees, published ones included; never
    /// drafts, as the caller never has write access here. Or the answer refusing them.
    fn visible_releases(
        &self,
        owner: &str,
        name: &str,
        caller: Caller,
    ) -> Result<(&SimRepo, Vec<SimRelease>), Box<Reply>> {
        let Some(repo) = self.repo(owner, name, caller) else {
            return Err(Box::new(self.not_found_json()));
        };
        if repo.failing {
            return Err(Box::new(self.server_error_json()));
        }
        if let Some(seconds) = repo.throttled {
            let refusal = text(StatusCode::TOO_MANY_REQUESTS, "Too Many Requests");
            return Err(Box::new(retry_after(refusal, seconds)));
        }
        let releases = repo
            .releases
            .iter()
            .cloned()
            .chain(self.published_in(&repo.name))
            .filter(|r| !r.draft)
            .collect();
        Ok((repo, releases))
    }

    /// Gitea's paging of `total` items: the slice to return and the `X-Total-Count`/`Link`
    /// headers, per CONTRACT.md §3.
    fn paginate(
        &self,
        rel: &str,
        query: &str,
        total: usize,
    ) -> (std::ops::Range<usize>, Vec<(&'static str, String)>) {
        let number = |key: &str| query_value(query, key).and_then(|v| v.parse::<i64>().ok());
        let page = number("page").filter(|p| *p > 0).unwrap_or(1);
        let limit = number("limit")
            .filter(|l| *l > 0)
            .unwrap_or(DEFAULT_PAGING_NUM)
            .min(MAX_RESPONSE_ITEMS);
        let start = usize::try_from((page - 1).saturating_mul(limit))
            .unwrap_or(usize::MAX)
            .min(total);
        let end = start.saturating_add(limit as usize).min(total);
        let mut headers = vec![
            ("x-total-count", total.to_string()),
            (
                "access-control-expose-headers",
                "Link, X-Total-Count".to_owned(),
            ),
        ];
        let pages = (total as i64 + limit - 1) / limit;
        if pages > 1 {
            let current = page.min(pages);
            let link = |p: i64, rel_name: &str| {
                let mut pairs: Vec<(String, String)> = query
                    .split('&')
                    .filter(|s| !s.is_empty())
                    .map(|s| {
                        let (k, v) = s.split_once('=').unwrap_or((s, ""));
                        (k.to_owned(), v.to_owned())
                    })
                    .filter(|(k, _)| k != "page")
                    .collect();
                pairs.push(("page".into(), p.to_string()));
                pairs.sort();
                let q: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
                format!("<{}{}?{}>; rel=\"{rel_name}\"", self.root, rel, q.join("&"))
            };
            let mut links = Vec::new();
            if current < pages {
                links.push(link(current + 1, "next"));
                links.push(link(pages, "last"));
            }
            if current > 1 {
                links.push(link(1, "first"));
                links.push(link(current - 1, "prev"));
            }
            headers.push(("link", links.join(",")));
        }
        (start..end, headers)
    }

    fn user_json(&self, id: u64, login: &str) -> Value {
        let host = self.root.split('/').nth(2).unwrap_or_default().to_owned();
        json!({
            "id": id, "login": login, "login_name": "", "source_id": 0, "full_name": login,
            "email": format!("{id}+{login}@noreply.{host}"),
            "avatar_url": format!("{}avatars/{:032x}", self.root, id),
            "html_url": format!("{}{login}", self.root), "language": "", "is_admin": false,
            "last_login": "0001-01-01T00:00:00Z", "created": self.timestamp(1_704_067_200),
            "restricted": false, "active": false, "prohibit_login": false, "location": "",
            "website": "", "description": "", "visibility": "public", "followers_count": 0,
            "following_count": 0, "starred_repos_count": 0, "username": login
        })
    }

    fn repo_json(&self, repo: &SimRepo) -> Value {
        let org = &self.config.org;
        let full = format!("{org}/{}", repo.name);
        let released = repo.releases.iter().filter(|r| !r.draft).count();
        let updated = repo
            .releases
            .iter()
            .map(|r| r.created)
            .max()
            .unwrap_or(1_706_781_600);
        let mut value = json!({
            "id": repo.id, "owner": self.user_json(3, org), "name": repo.name,
            "full_name": full, "description": repo.description, "empty": false,
            "private": repo.private, "fork": false, "template": false, "mirror": false,
            "size": 412, "language": "Shell",
            "languages_url": format!("{}api/v1/repos/{full}/languages", self.root),
            "html_url": format!("{}{full}", self.root),
            "url": format!("{}api/v1/repos/{full}", self.root), "link": "",
            "ssh_url": format!("git@127.0.0.1:{full}.git"),
            "clone_url": format!("{}{full}.git", self.root), "original_url": "", "website": "",
            "stars_count": 0, "forks_count": 0, "watchers_count": 1, "open_issues_count": 0,
            "open_pr_counter": 0, "release_counter": released, "default_branch": "main",
            "archived": repo.archived, "created_at": self.timestamp(1_706_781_600),
            "updated_at": self.timestamp(updated),
            "archived_at": if repo.archived { self.timestamp(1_740_000_000) } else { self.timestamp(0) },
            "permissions": {"admin": false, "push": false, "pull": true},
            "topics": repo.topics
        });
        // Split in two: one `json!` this size exceeds the macro recursion limit.
        let settings = json!({
            "has_issues": true,
            "internal_tracker": {"enable_time_tracker": true,
                "allow_only_contributors_to_track_time": true, "enable_issue_dependencies": true},
            "has_wiki": true, "has_pull_requests": true, "has_projects": true,
            "has_releases": true, "has_packages": true, "has_actions": true,
            "ignore_whitespace_conflicts": false, "allow_merge_commits": true,
            "allow_rebase": true, "allow_rebase_explicit": true, "allow_squash_merge": true,
            "allow_fast_forward_only_merge": true, "allow_rebase_update": true,
            "default_delete_branch_after_merge": false, "default_merge_style": "merge",
            "default_allow_maintainer_edit": false, "avatar_url": "", "internal": false,
            "mirror_interval": "", "object_format_name": "sha1",
            "mirror_updated": "0001-01-01T00:00:00Z"
        });
        merge(&mut value, settings);
        let extra = if self.config.forgejo {
            json!({"wiki_branch": "main", "globally_editable_wiki": false,
                   "default_update_style": "merge", "parent": null, "repo_transfer": null})
        } else {
            json!({"branch_count": 1, "has_code": true, "projects_mode": "all",
                   "allow_manual_merge": false, "autodetect_manual_merge": false, "licenses": []})
        };
        merge(&mut value, extra);
        value
    }

    fn download_url(&self, repo: &SimRepo, tag: &str, name: &str) -> String {
        format!(
            "{}{}/{}/releases/download/{}/{}",
            self.root,
            self.config.org,
            repo.name,
            utf8_percent_encode(tag, PATH_PIECE),
            utf8_percent_encode(name, PATH_PIECE)
        )
    }

    fn release_json(&self, repo: &SimRepo, release: &SimRelease) -> Value {
        let full = format!("{}/{}", self.config.org, repo.name);
        let tag = utf8_percent_encode(&release.tag, PATH_PIECE).to_string();
        let mut assets: Vec<SimAsset> = release
            .assets
            .iter()
            .map(|a| self.current_asset(repo, release, a))
            .collect();
        assets.sort_by(|a, b| a.name.cmp(&b.name));
        let assets: Vec<Value> = assets
            .iter()
            .map(|a| {
                let mut v = json!({
                    "id": a.id, "name": a.name, "size": a.bytes.len(), "download_count": 0,
                    "created_at": self.timestamp(release.created + 60),
                    "uuid": uuid(a.id),
                    "browser_download_url": self.download_url(repo, &release.tag, &a.name)
                });
                if self.config.forgejo {
                    merge(&mut v, json!({"type": "attachment"}));
                }
                self.hop_asset_json(&mut v, release, a);
                v
            })
            .collect();
        let mut value = json!({
            "id": release.id, "tag_name": release.tag, "target_commitish": "main",
            "name": release.tag, "body": format!("Release {}.", release.tag),
            "url": format!("{}api/v1/repos/{full}/releases/{}", self.root, release.id),
            "html_url": format!("{}{full}/releases/tag/{tag}", self.root),
            "tarball_url": format!("{}{full}/archive/{tag}.tar.gz", self.root),
            "zipball_url": format!("{}{full}/archive/{tag}.zip", self.root),
            "upload_url": format!("{}api/v1/repos/{full}/releases/{}/assets", self.root, release.id),
            "draft": release.draft, "prerelease": release.prerelease,
            "created_at": self.timestamp(release.created),
            "published_at": self.timestamp(release.created),
            "assets": assets
        });
        if let Some(login) = &release.author {
            merge(&mut value, json!({"author": self.user_json(7, login)}));
        }
        if self.config.forgejo {
            merge(
                &mut value,
                json!({"hide_archive_links": false, "archive_download_count": {"tar_gz": 0, "zip": 0}}),
            );
        }
        value
    }

    fn web(&self, segments: &[&str], rel: &str, caller: Caller) -> Reply {
        match segments {
            ["user", "login"] => reply(
                StatusCode::OK,
                "text/html; charset=utf-8",
                "<!DOCTYPE html><html><head><title>Sign In</title></head><body><form></form></body></html>\n",
            ),
            [owner, name, "releases", "download", tag, file] => {
                if caller == Caller::Invalid {
                    return text(StatusCode::UNAUTHORIZED, "Failed to authenticate user");
                }
                if self.config.require_signin && caller == Caller::Anonymous {
                    let back = utf8_percent_encode(&format!("{}{rel}", self.config.sub_path), PATH_PIECE)
                        .to_string();
                    return redirect(&format!("{}user/login?redirect_to={back}", self.config.sub_path));
                }
                let Some(repo) = self.repo(owner, name, caller) else {
                    return text(StatusCode::NOT_FOUND, "Not found.");
                };
                let published = repo.releases.iter().filter(|r| !r.draft);
                let release = match published.clone().find(|r| r.tag == *tag) {
                    Some(r) => Some(r),
                    None if *tag == "latest" => published
                        .filter(|r| !r.prerelease)
                        .max_by(|a, b| a.created.cmp(&b.created).then(a.id.cmp(&b.id))),
                    None => None,
                };
                let Some((release, asset)) =
                    release.and_then(|r| Some((r, r.assets.iter().find(|a| a.name == *file)?)))
                else {
                    return text(StatusCode::NOT_FOUND, "Not found.");
                };
                let asset = &self.current_asset(repo, release, asset);
                if let Some(reply) = self.hop_reply(asset) {
                    return reply;
                }
                if self.config.storage_redirect {
                    return redirect(&format!(
                        "{}bucket/{}?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Expires=300&X-Amz-Signature={}",
                        self.storage,
                        uuid(asset.id),
                        sha256_hex(asset.name.as_bytes())
                    ));
                }
                self.asset_reply(asset)
            }
            _ => text(StatusCode::NOT_FOUND, "Not found."),
        }
    }

    fn asset_reply(&self, asset: &SimAsset) -> Reply {
        let mut r = reply(
            StatusCode::OK,
            "application/octet-stream",
            asset.bytes.clone(),
        );
        add_header(
            &mut r,
            "content-disposition",
            &format!("inline; filename={}", asset.name),
        );
        add_header(&mut r, "etag", &format!("\"{}\"", uuid(asset.id)));
        add_header(&mut r, "cache-control", "private, max-age=300");
        add_header(&mut r, "x-content-type-options", "nosniff");
        r
    }

    fn storage_route(&self, req: &Request<Incoming>) -> Reply {
        self.record(req, true);
        let has_auth = req.headers().contains_key(AUTHORIZATION);
        self.count(|c| {
            c.storage += 1;
            c.storage_with_authorization += u64::from(has_auth);
        });
        let wanted = req
            .uri()
            .path()
            .strip_prefix("/bucket/")
            .unwrap_or_default();
        let reuploaded = self.reuploaded_by_uuid(wanted);
        match reuploaded.as_ref().or_else(|| self.asset_by_uuid(wanted)) {
            Some(asset) => reply(
                StatusCode::OK,
                "application/octet-stream",
                asset.bytes.clone(),
            ),
            None => reply(
                StatusCode::NOT_FOUND,
                "application/xml",
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>NoSuchKey</Code></Error>",
            ),
        }
    }
}

impl State {
    /// Applies the request's `Range` to a 200 file answer (an asset's bytes), per
    /// `SimConfig::ranges`; other answers pass unchanged.
    async fn ranged(&self, req: &Request<Incoming>, answer: Reply) -> Reply {
        use http_body_util::BodyExt;
        let Some(range) = req.headers().get(hyper::header::RANGE) else {
            return answer;
        };
        let is_file = answer.status() == StatusCode::OK
            && answer
                .headers()
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                == Some("application/octet-stream");
        if !is_file {
            return answer;
        }
        self.count(|c| c.ranged_downloads += 1);
        if self.config.ranges == Ranges::Ignore {
            return answer;
        }
        let (mut parts, body) = answer.into_parts();
        let bytes = body.collect().await.expect("full body").to_bytes();
        let size = bytes.len() as u64;
        let Some((first, last)) = range
            .to_str()
            .ok()
            .and_then(|r| r.strip_prefix("bytes="))
            .and_then(|r| r.split_once('-'))
            .and_then(|(a, b)| match (a, b) {
                ("", n) => Some((size.saturating_sub(n.parse().ok()?), size.checked_sub(1)?)),
                (a, "") => Some((a.parse().ok()?, size.checked_sub(1)?)),
                (a, b) => Some((
                    a.parse().ok()?,
                    b.parse::<u64>().ok()?.min(size.checked_sub(1)?),
                )),
            })
            .filter(|(first, last)| first <= last && *first < size)
        else {
            let mut r = reply(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "text/plain; charset=utf-8",
                "",
            );
            add_header(&mut r, "content-range", &format!("bytes */{size}"));
            return r;
        };
        let shift = u64::from(self.config.ranges == Ranges::OffByOne);
        let (first, last) = ((first + shift).min(last), last);
        parts.status = StatusCode::PARTIAL_CONTENT;
        parts.headers.insert(
            "content-range",
            format!("bytes {first}-{last}/{size}")
                .parse()
                .expect("header"),
        );
        let part = bytes.slice(first as usize..=last as usize);
        Response::from_parts(parts, Full::new(part))
    }
}

fn uuid(id: u64) -> String {
    format!("8f14e45f-ceea-467f-a0e6-{id:012x}")
}

fn merge(value: &mut Value, extra: Value) {
    if let (Value::Object(target), Value::Object(extra)) = (value, extra) {
        target.extend(extra);
    }
}

// Redirects, external assets, attachment routes and a request log: what a client that sends a
// token must survive (CONTRACT.md §4.6 and §7). Kept apart from the routes above.

/// How an asset's download routes answer instead of serving its bytes. Targets are paths
/// relative to ROOT_URL (or absolute URLs); `{uuid}` stands for the asset's UUID.
#[derive(Clone, Debug)]
pub enum Hop {
    /// A Forgejo external asset: `browser_download_url` is this link, `size` 0, `type`
    /// `"external"`, and the by-name route answers `303` to it.
    External(String),
    /// The by-name and UUID routes answer `302` to this target on the same host.
    Redirect(String),
}

impl SimAsset {
    /// Where this asset's hop leads, with `{uuid}` filled in.
    fn hop_target(&self, root: &str) -> Option<String> {
        let target = match self.hop.as_ref()? {
            Hop::External(t) | Hop::Redirect(t) => t.replace("{uuid}", &uuid(self.id)),
        };
        Some(if target.starts_with("http") {
            target
        } else {
            format!("{root}{target}")
        })
    }
}

impl SimRelease {
    /// Adds an asset whose download routes answer with `hop` instead of bytes.
    pub fn hop_asset(mut self, name: &str, bytes: impl Into<Bytes>, hop: Hop) -> Self {
        self = self.asset(name, bytes);
        if let Some(last) = self.assets.last_mut() {
            last.hop = Some(hop);
        }
        self
    }

    /// Writes `browser_download_url` in the `attachments/{uuid}` form for every asset.
    pub fn uuid_urls(mut self) -> Self {
        self.uuid_urls = true;
        self
    }
}

/// One request the simulator saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    /// Whether it went to the object storage host.
    pub storage: bool,
    /// Its path and query, as sent.
    pub target: String,
    /// Whether it carried an `Authorization` header.
    pub authorization: bool,
}

impl GiteaSim {
    /// Every request seen so far, in order.
    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().expect("seen").clone()
    }

    /// The requests whose path contains `part`.
    pub fn seen_at(&self, part: &str) -> Vec<Seen> {
        self.seen()
            .into_iter()
            .filter(|s| s.target.contains(part))
            .collect()
    }
}

impl State {
    fn record(&self, req: &Request<Incoming>, storage: bool) {
        let seen = Seen {
            storage,
            target: req
                .uri()
                .path_and_query()
                .map_or_else(String::new, ToString::to_string),
            authorization: req.headers().contains_key(AUTHORIZATION),
        };
        self.seen.lock().expect("seen").push(seen);
    }

    /// The routes added for hops: `attachments/{uuid}`, a repository's archive through the
    /// API, a redirect chain `hops/{n}/{uuid}` (n redirects, then the asset's bytes without any
    /// check, like object storage) and `loop`, which redirects to itself.
    fn hop_route(&self, segments: &[&str], caller: Caller) -> Option<Reply> {
        match segments {
            ["attachments", wanted] => {
                if caller == Caller::Invalid {
                    return Some(text(
                        StatusCode::UNAUTHORIZED,
                        "Failed to authenticate user",
                    ));
                }
                let found = self.config.repos.iter().find_map(|repo| {
                    let asset = repo
                        .releases
                        .iter()
                        .filter(|r| !r.draft)
                        .flat_map(|r| &r.assets)
                        .find(|a| uuid(a.id) == *wanted)?;
                    Some((repo, asset))
                });
                Some(match found {
                    Some((repo, asset)) if self.can_read(repo, caller) => self
                        .hop_reply(asset)
                        .unwrap_or_else(|| self.asset_reply(asset)),
                    _ => text(StatusCode::NOT_FOUND, "Not found."),
                })
            }
            ["api", "v1", "repos", owner, name, "archive", archive] => {
                if caller == Caller::Invalid {
                    return Some(self.unauthorized_json());
                }
                Some(match self.repo(owner, name, caller) {
                    Some(repo) => reply(
                        StatusCode::OK,
                        "application/octet-stream",
                        format!("archive {archive} of {}\n", repo.name),
                    ),
                    None => self.not_found_json(),
                })
            }
            ["hops", n, wanted] => {
                let n: u32 = n.parse().ok()?;
                if n > 0 {
                    return Some(found_redirect(&format!(
                        "{}hops/{}/{wanted}",
                        self.root,
                        n - 1
                    )));
                }
                Some(self.asset_reply(self.asset_by_uuid(wanted)?))
            }
            ["loop"] => Some(found_redirect(&format!("{}loop", self.root))),
            _ => None,
        }
    }

    /// Any asset of any release, by its UUID.
    fn asset_by_uuid(&self, wanted: &str) -> Option<&SimAsset> {
        self.config
            .repos
            .iter()
            .flat_map(|r| &r.releases)
            .flat_map(|r| &r.assets)
            .find(|a| uuid(a.id) == wanted)
    }

    /// The answer of an asset's download routes when it has a hop.
    fn hop_reply(&self, asset: &SimAsset) -> Option<Reply> {
        let target = asset.hop_target(&self.root)?;
        Some(match asset.hop {
            Some(Hop::External(_)) => redirect(&target),
            _ => found_redirect(&target),
        })
    }

    /// Rewrites an asset's JSON for its release's URL form and its hop.
    fn hop_asset_json(&self, value: &mut Value, release: &SimRelease, asset: &SimAsset) {
        if release.uuid_urls {
            merge(
                value,
                json!({"browser_download_url": format!("{}attachments/{}", self.root, uuid(asset.id))}),
            );
        }
        if let (Some(Hop::External(_)), Some(target)) = (&asset.hop, asset.hop_target(&self.root)) {
            merge(
                value,
                json!({"browser_download_url": target, "size": 0, "type": "external"}),
            );
        }
    }
}

/// A `302 Found`, as a reverse proxy or a moved route answers.
fn found_redirect(location: &str) -> Reply {
    let mut r = redirect(location);
    *r.status_mut() = StatusCode::FOUND;
    r
}

// Re-uploads: an asset deleted and uploaded again under the same name while the simulator
// runs, as a publisher fixing a release does. Gitea gives the new file a new attachment (new id
// and UUID, its own size); the by-name URL stays the same. Kept apart from the routes above.

/// The assets replaced so far.
#[derive(Default)]
struct Reuploads {
    /// The current asset by `(repository, tag, name)`.
    by_name: std::collections::HashMap<(String, String, String), SimAsset>,
    /// Ids handed out so far, above every seeded one.
    issued: u64,
}

impl GiteaSim {
    /// Replaces the asset `name` of release `tag` of `repo` with `bytes`, under a new id.
    pub fn reupload(&self, repo: &str, tag: &str, name: &str, bytes: impl Into<Bytes>) {
        let mut reuploads = self.state.reuploads.lock().expect("reuploads");
        reuploads.issued += 1;
        let asset = SimAsset {
            name: name.into(),
            bytes: bytes.into(),
            id: 1_000_000 + reuploads.issued,
            hop: None,
        };
        reuploads
            .by_name
            .insert((repo.into(), tag.into(), name.into()), asset);
    }
}

impl State {
    /// `asset` of `release` as it is now: its re-upload, if any.
    fn current_asset(&self, repo: &SimRepo, release: &SimRelease, asset: &SimAsset) -> SimAsset {
        let key = (repo.name.clone(), release.tag.clone(), asset.name.clone());
        let reuploads = self.reuploads.lock().expect("reuploads");
        reuploads.by_name.get(&key).unwrap_or(asset).clone()
    }

    /// A re-uploaded asset by its UUID.
    fn reuploaded_by_uuid(&self, wanted: &str) -> Option<SimAsset> {
        let reuploads = self.reuploads.lock().expect("reuploads");
        reuploads
            .by_name
            .values()
            .find(|a| uuid(a.id) == wanted)
            .cloned()
    }
}

// ---------------------------------------------------------------------------------------------
// Fault modes for the fault matrix (`tests/faults.rs`): how a sick instance, or the proxy in
// front of it, answers, beyond `Mode`; and a TLS listener whose certificate can be swapped.
// ---------------------------------------------------------------------------------------------
use fault_modes::{serve_tls, Faults};

// Used by tests/faults.rs; the other test binaries include this file too.
#[allow(dead_code)]
pub mod fault_modes {
    use super::*;

    /// How every request to the Gitea host is answered while a fault is on. Checked after the
    /// request is counted, before [`Mode`].
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Fault {
        /// No fault: [`Mode`] decides.
        None,
        /// Answers as usual, but only after this long: slower than a client's timeout.
        Delay(Duration),
        /// `200` whose `Content-Length` promises more bytes than are sent before the connection
        /// closes.
        TruncatedBody,
        /// `303` back to the same URL, forever.
        RedirectLoop,
        /// `401` everywhere, as for a token that was revoked.
        RevokedToken,
        /// `429` with `Retry-After` (seconds), as a rate-limiting proxy answers.
        TooManyRequests(u64),
        /// `503` with `Retry-After` (seconds), as a proxy answers while the instance is down for
        /// maintenance.
        Maintenance(u64),
    }

    /// Which certificate the TLS listener presents (see [`SimConfig::tls`]).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Certificate {
        /// Issued for `127.0.0.1` and `localhost` by the simulator's own CA, which a client can be
        /// told to trust ([`GiteaSim::ca_pem`]).
        Issued,
        /// Self-signed for the same names: nobody trusts it.
        SelfSigned,
    }

    impl SimConfig {
        /// Serves the API over TLS, presenting [`Certificate::Issued`] until told otherwise. Each
        /// connection carries one request, so every request makes a handshake with whatever
        /// certificate is presented at that moment.
        pub fn tls(mut self) -> Self {
            self.tls = true;
            self
        }
    }

    impl GiteaSim {
        pub fn set_fault(&self, fault: Fault) {
            *self.state.faults.fault.lock().expect("fault") = fault;
        }

        /// The PEM of the CA that issued [`Certificate::Issued`].
        pub fn ca_pem(&self) -> &str {
            &self.tls().ca_pem
        }

        /// Switches the certificate presented to the next connections.
        pub fn present(&self, certificate: Certificate) {
            *self.tls().presented.lock().expect("certificate") = certificate;
        }

        /// Requests so far whose path has `segment` as one of its segments (a repository name
        /// counts the calls about one extension), whatever answered them: a fault, a [`Mode`]
        /// or the API.
        pub fn requests_about(&self, segment: &str) -> usize {
            let paths = self.state.faults.paths.lock().expect("paths");
            paths
                .iter()
                .filter(|p| p.split('/').any(|s| s == segment))
                .count()
        }

        /// TLS connections accepted so far, failed handshakes included: the calls that a TLS
        /// failure keeps from reaching any route.
        pub fn tls_handshakes(&self) -> u64 {
            self.tls().handshakes.load(Ordering::SeqCst)
        }

        fn tls(&self) -> &Tls {
            self.state
                .faults
                .tls
                .as_ref()
                .expect("a simulator started with SimConfig::tls")
        }
    }

    /// The fault-matrix state of a running simulator.
    pub(super) struct Faults {
        /// The fault on now.
        fault: Mutex<Fault>,
        /// The path of every request that reached the Gitea host, whatever answered it.
        paths: Mutex<Vec<String>>,
        /// Present when the API is served over TLS.
        tls: Option<Tls>,
    }

    impl Faults {
        pub(super) fn new(tls: bool) -> Self {
            Self {
                fault: Mutex::new(Fault::None),
                paths: Mutex::new(Vec::new()),
                tls: tls.then(Tls::new),
            }
        }

        pub(super) fn is_tls(&self) -> bool {
            self.tls.is_some()
        }

        pub(super) fn scheme(&self) -> &'static str {
            if self.tls.is_some() {
                "https"
            } else {
                "http"
            }
        }
    }

    /// The TLS listener's two identities and which one it presents.
    struct Tls {
        /// The CA that issued `issued`, for the client's trust store.
        ca_pem: String,
        issued: Arc<rustls::ServerConfig>,
        self_signed: Arc<rustls::ServerConfig>,
        presented: Mutex<Certificate>,
        /// Connections accepted: handshakes attempted, failed ones included.
        handshakes: AtomicU64,
    }

    impl Tls {
        fn new() -> Self {
            let mut ca =
                rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
            ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            ca.distinguished_name
                .push(rcgen::DnType::CommonName, "gitea-sim test CA");
            ca.key_usages = vec![
                rcgen::KeyUsagePurpose::KeyCertSign,
                rcgen::KeyUsagePurpose::DigitalSignature,
            ];
            let ca_key = rcgen::KeyPair::generate().expect("CA key");
            let ca_pem = ca.self_signed(&ca_key).expect("CA certificate").pem();
            let ca = rcgen::Issuer::new(ca, ca_key);
            Self {
                ca_pem,
                issued: server_identity(Some(&ca)),
                self_signed: server_identity(None),
                presented: Mutex::new(Certificate::Issued),
                handshakes: AtomicU64::new(0),
            }
        }

        fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
            let config = match *self.presented.lock().expect("certificate") {
                Certificate::Issued => &self.issued,
                Certificate::SelfSigned => &self.self_signed,
            };
            tokio_rustls::TlsAcceptor::from(Arc::clone(config))
        }
    }

    /// A server certificate for `127.0.0.1` and `localhost`, issued by `ca` or self-signed.
    fn server_identity(
        ca: Option<&rcgen::Issuer<'_, rcgen::KeyPair>>,
    ) -> Arc<rustls::ServerConfig> {
        let mut params =
            rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
                .expect("certificate parameters");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "gitea-sim");
        params.use_authority_key_identifier_extension = ca.is_some();
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let key = rcgen::KeyPair::generate().expect("server key");
        let certificate = match ca {
            Some(ca) => params.signed_by(&key, ca),
            None => params.self_signed(&key),
        }
        .expect("server certificate");
        let key = rustls::pki_types::PrivatePkcs8KeyDer::from(key.serialize_der());
        let config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(vec![certificate.der().clone()], key.into())
            .expect("TLS server configuration");
        Arc::new(config)
    }

    /// The TLS accept loop: one request per connection (no keep-alive), so that each request
    /// meets the certificate presented when it is made.
    pub(super) async fn serve_tls(listener: TcpListener, state: Arc<State>) {
        let mut connections = JoinSet::new();
        while let Ok((stream, _)) = listener.accept().await {
            let Some(tls) = &state.faults.tls else {
                return;
            };
            tls.handshakes.fetch_add(1, Ordering::SeqCst);
            let acceptor = tls.acceptor();
            let state = Arc::clone(&state);
            connections.spawn(async move {
                let Ok(stream) = acceptor.accept(stream).await else {
                    return;
                };
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let state = Arc::clone(&state);
                    async move {
                        let reply = state.route(&req).await;
                        Ok::<_, Infallible>(state.ranged(&req, reply).await)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .keep_alive(false)
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
            while connections.try_join_next().is_some() {}
        }
    }

    impl State {
        /// Records the request, then gives the answer the current [`Fault`] makes it get, or
        /// `None` to answer as usual.
        pub(super) async fn fault(&self, req: &Request<Incoming>, api: bool) -> Option<Reply> {
            let path = req.uri().path().to_owned();
            self.faults.paths.lock().expect("paths").push(path);
            let fault = *self.faults.fault.lock().expect("fault");
            match fault {
                Fault::None => None,
                Fault::Delay(delay) => {
                    tokio::time::sleep(delay).await;
                    None
                }
                Fault::TruncatedBody => {
                    let mut r = reply(
                        StatusCode::OK,
                        "application/json;charset=utf-8",
                        "[{\"id\":11,\"name\":\"aws_prov\",\"description\":\"The",
                    );
                    // hyper (release builds) trusts a length the service sets and sends the short
                    // body; `connection: close` makes it close the connection then, so the client
                    // sees the transfer cut short.
                    add_header(&mut r, "content-length", "4096");
                    add_header(&mut r, "connection", "close");
                    Some(r)
                }
                Fault::RedirectLoop => Some(redirect(&req.uri().to_string())),
                Fault::RevokedToken if api => Some(self.unauthorized_json()),
                Fault::RevokedToken => Some(text(
                    StatusCode::UNAUTHORIZED,
                    "Failed to authenticate user",
                )),
                Fault::TooManyRequests(seconds) => Some(retry_after(
                    text(StatusCode::TOO_MANY_REQUESTS, "Too Many Requests"),
                    seconds,
                )),
                Fault::Maintenance(seconds) => Some(retry_after(
                    reply(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "text/html; charset=utf-8",
                        "<html><body><h1>503 Service Temporarily Unavailable</h1></body></html>\n",
                    ),
                    seconds,
                )),
            }
        }
    }
}

// Publishing while running, and the webhook deliveries Gitea sends for it (services/webhook/
// deliver.go: the JSON body signed with HMAC-SHA256 under the webhook's secret, hex, in
// `X-Gitea-Signature` and `X-Hub-Signature-256: sha256=…`; Forgejo adds `X-Forgejo-*`).
// Kept apart from the routes above; published releases are listed, not downloadable.

impl GiteaSim {
    /// Publishes `release` in `repo` (a seeded repository): listed from now on.
    pub fn publish(&self, repo: &str, mut release: SimRelease) -> Value {
        let mut published = self.state.published.lock().expect("published");
        release.id = 2_000_000 + published.len() as u64;
        let json = self.state.release_json(self.seeded(repo), &release);
        published.push((repo.to_owned(), release));
        json
    }

    /// The `release` event payload Gitea sends for `action` (`published`, `updated`,
    /// `deleted`) of `release` (as [`GiteaSim::publish`] returned it) in `repo`.
    pub fn release_payload(&self, repo: &str, action: &str, release: &Value) -> Value {
        json!({
            "action": action,
            "release": release,
            "repository": self.state.repo_json(self.seeded(repo)),
            "sender": self.state.user_json(7, "release-bot"),
        })
    }

    /// POSTs `payload` as a delivery of `event` to `url`, signed with `secret` the way this
    /// instance (Gitea, or Forgejo) signs; `secret` `None` sends it unsigned.
    pub async fn deliver(
        &self,
        url: &str,
        event: &str,
        payload: &Value,
        secret: Option<&str>,
    ) -> reqwest::Response {
        let body = serde_json::to_vec_pretty(payload).expect("payload JSON");
        let delivery = format!("{:032x}", fastrand::u128(..));
        let mut request = reqwest::Client::new()
            .post(url)
            .header(CONTENT_TYPE, "application/json")
            .header("X-Gitea-Delivery", &delivery)
            .header("X-Gitea-Event", event)
            .header("X-Gitea-Event-Type", event)
            .header("X-Gogs-Delivery", &delivery)
            .header("X-Gogs-Event", event)
            .header("X-GitHub-Delivery", &delivery)
            .header("X-GitHub-Event", event);
        if self.state.config.forgejo {
            request = request
                .header("X-Forgejo-Delivery", &delivery)
                .header("X-Forgejo-Event", event);
        }
        if let Some(secret) = secret {
            let signature = hook_signature(secret, &body);
            request = request
                .header("X-Gitea-Signature", &signature)
                .header("X-Gogs-Signature", &signature)
                .header("X-Hub-Signature-256", format!("sha256={signature}"));
            if self.state.config.forgejo {
                request = request.header("X-Forgejo-Signature", &signature);
            }
        }
        request
            .body(body)
            .send()
            .await
            .expect("deliver the webhook")
    }
}

impl GiteaSim {
    fn seeded(&self, repo: &str) -> &SimRepo {
        self.state
            .config
            .repos
            .iter()
            .find(|r| r.name == repo)
            .expect("a seeded repository")
    }
}

/// The hex HMAC-SHA256 of `body` under `secret`, as Gitea signs deliveries.
pub fn hook_signature(secret: &str, body: &[u8]) -> String {
    use hmac::{Hmac, Mac};
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(body);
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl State {
    /// The releases of `repo` published while running.
    fn published_in(&self, repo: &str) -> Vec<SimRelease> {
        let published = self.published.lock().expect("published");
        published
            .iter()
            .filter(|(r, _)| r.eq_ignore_ascii_case(repo))
            .map(|(_, release)| release.clone())
            .collect()
    }
}
