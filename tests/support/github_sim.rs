//! A GitHub REST API simulator (API version 2022-11-28) for the routes the GitHub backend uses,
//! built from `/work/shared/github/CONTRACT.md` (§10's checklist): organization repositories and
//! releases paged at most 100 a page with `Link` headers whose URLs have another path shape than
//! the request (`/organizations/{id}/repos`, `/repositories/{id}/releases`), `200 []` past the
//! end; `ETag` on every 200 and `304` to a matching `If-None-Match`, not charged; the
//! `x-ratelimit-*` headers counting down, `403` (or `429`) when exhausted, secondary limits with
//! or without `retry-after`; private repositories `404` without the token, `401` for a wrong
//! one; assets through the API URL with `Accept: application/octet-stream` answered by a `302`
//! to a second listener ("storage") that refuses any `Authorization` with S3's `400`. Bodies
//! are built from the upstream description's own examples (`tests/fixtures/github/`), so they
//! carry every field the schemas require.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use extension_registry::config::GithubConfig;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, IF_NONE_MATCH, LOCATION};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use percent_encoding::percent_decode_str;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

/// The description's examples the bodies are built from.
const OPENAPI: &str = "tests/fixtures/github/openapi-subset.json";

/// The file content a seeded artifact has.
pub fn artifact_bytes(name: &str, tag: &str) -> Bytes {
    Bytes::from(format!("github tarball of {name} {tag}\n").repeat(64))
}

/// The lowercase hex sha256 of some bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// One release asset.
#[derive(Clone, Debug)]
pub struct GhAsset {
    pub name: String,
    pub bytes: Bytes,
    /// Whether the asset JSON carries `digest` (`sha256:…`) or `null` (an older upload).
    pub digest: bool,
    id: u64,
}

/// One release.
#[derive(Clone, Debug)]
pub struct GhRelease {
    pub tag: String,
    /// Listed to the token holder only (it has push access); never to anonymous callers.
    pub draft: bool,
    /// Creation time, Unix seconds.
    pub created: i64,
    pub assets: Vec<GhAsset>,
    id: u64,
}

impl GhRelease {
    pub fn new(tag: &str, created: i64) -> Self {
        Self {
            tag: tag.into(),
            draft: false,
            created,
            assets: Vec::new(),
            id: 0,
        }
    }

    pub fn draft(mut self) -> Self {
        self.draft = true;
        self
    }

    pub fn asset(mut self, name: &str, bytes: impl Into<Bytes>, digest: bool) -> Self {
        self.assets.push(GhAsset {
            name: name.into(),
            bytes: bytes.into(),
            digest,
            id: 0,
        });
        self
    }

    /// Adds `{name}-{tag}.tar.gz` with GitHub's digest.
    pub fn artifact(self, name: &str) -> Self {
        let file = format!("{name}-{}.tar.gz", self.tag);
        let bytes = artifact_bytes(name, &self.tag);
        self.asset(&file, bytes, true)
    }

    /// Adds `{name}-{tag}.tar.gz` without a digest (`null`) and its `.sha256` checksum file.
    pub fn artifact_with_sidecar(self, name: &str) -> Self {
        let file = format!("{name}-{}.tar.gz", self.tag);
        let bytes = artifact_bytes(name, &self.tag);
        let text = format!("{}  {file}\n", sha256_hex(&bytes));
        self.asset(&file, bytes, false)
            .asset(&format!("{file}.sha256"), text, false)
    }
}

/// One repository of the organization.
#[derive(Clone, Debug)]
pub struct GhRepo {
    pub name: String,
    pub description: Option<String>,
    /// Visible to the token holder only; `404` to anyone else.
    pub private: bool,
    pub archived: bool,
    pub topics: Vec<String>,
    pub releases: Vec<GhRelease>,
    id: u64,
}

impl GhRepo {
    pub fn new(name: &str) -> Self {
        Self {
            name: name.into(),
            description: Some(format!("The {name} extension")),
            private: false,
            archived: false,
            topics: Vec::new(),
            releases: Vec::new(),
            id: 0,
        }
    }

    pub fn private(mut self) -> Self {
        self.private = true;
        self
    }

    pub fn archived(mut self) -> Self {
        self.archived = true;
        self
    }

    pub fn topic(mut self, topic: &str) -> Self {
        self.topics.push(topic.into());
        self
    }

    pub fn release(mut self, release: GhRelease) -> Self {
        self.releases.push(release);
        self
    }
}

/// `n` extension repositories (`ext000_prov`, …), each with one release with a digest.
pub fn seeded_org(n: usize, created: i64) -> Vec<GhRepo> {
    (0..n)
        .map(|i| {
            let name = format!("ext{i:03}");
            GhRepo::new(&format!("{name}_prov"))
                .release(GhRelease::new("1.0.0", created).artifact(&name))
        })
        .collect()
}

/// How the simulator is set up.
#[derive(Clone, Debug)]
pub struct GhConfig {
    pub owner: String,
    /// The valid token; any other presented is `401`.
    pub token: Option<String>,
    /// `""` (github.com) or `/api/v3` (Enterprise Server).
    pub prefix: String,
    pub repos: Vec<GhRepo>,
    /// The primary limit of the window (5,000 for a token, 60 anonymous on github.com).
    pub limit: u64,
    /// The status of an exhausted primary limit: `403` or `429`.
    pub exhausted_status: u16,
}

impl GhConfig {
    pub fn new(owner: &str) -> Self {
        Self {
            owner: owner.into(),
            token: None,
            prefix: String::new(),
            repos: Vec::new(),
            limit: 5000,
            exhausted_status: 403,
        }
    }

    pub fn token(mut self, token: &str) -> Self {
        self.token = Some(token.into());
        self
    }

    pub fn enterprise(mut self) -> Self {
        self.prefix = "/api/v3".into();
        self
    }

    /// Answers an exhausted primary limit with `status` (`403` or `429`).
    pub fn exhausted_with(mut self, status: u16) -> Self {
        self.exhausted_status = status;
        self
    }

    pub fn repos(mut self, repos: Vec<GhRepo>) -> Self {
        self.repos.extend(repos);
        self
    }

    pub fn repo(mut self, repo: GhRepo) -> Self {
        self.repos.push(repo);
        self
    }
}

/// A secondary rate limit the simulator imposes on every API call while set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Secondary {
    /// `403` or `429`.
    pub status: u16,
    /// The `retry-after` seconds, if sent.
    pub retry_after: Option<u64>,
}

/// What the simulator was asked, counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GhCalls {
    /// Every API request (the storage host not included).
    pub api: u64,
    /// Those charged against the primary limit (not `304`s, not `/rate_limit`).
    pub counted: u64,
    /// `304 Not Modified` answers.
    pub not_modified: u64,
    /// Refusals for a primary or secondary rate limit.
    pub rate_limited: u64,
    /// Asset API requests (JSON or `octet-stream`).
    pub assets: u64,
    /// Requests to the storage host.
    pub storage: u64,
    /// Storage requests that carried an `Authorization` header (refused with `400`).
    pub storage_authorizations: u64,
}

struct State {
    config: GhConfig,
    /// `http://127.0.0.1:port{prefix}`: the API base.
    api: String,
    /// `http://127.0.0.1:port/`: the storage host.
    storage: String,
    /// The description's examples, the templates of every body.
    examples: Value,
    remaining: Mutex<u64>,
    /// Epoch seconds the window resets at.
    reset: u64,
    secondary: Mutex<Option<Secondary>>,
    /// While set, every releases list answers `500`.
    failing_releases: Mutex<bool>,
    calls: Mutex<GhCalls>,
}

/// The simulator: an API listener and a storage listener.
pub struct GithubSim {
    state: Arc<State>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for GithubSim {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

type Reply = Response<Full<Bytes>>;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Caller {
    Anonymous,
    User,
    Invalid,
}

impl GithubSim {
    pub async fn start(mut config: GhConfig) -> Self {
        let (mut repo_id, mut release_id, mut asset_id) = (1000, 5000, 90000);
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
        let api = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let storage = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = |l: &TcpListener| -> SocketAddr { l.local_addr().expect("addr") };
        let doc: Value =
            serde_json::from_str(&std::fs::read_to_string(OPENAPI).expect("read OpenAPI subset"))
                .expect("parse OpenAPI subset");
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_secs();
        let state = Arc::new(State {
            api: format!("http://{}{}", addr(&api), config.prefix),
            storage: format!("http://{}/", addr(&storage)),
            examples: doc["components"]["examples"].clone(),
            remaining: Mutex::new(config.limit),
            reset: now + 3600,
            secondary: Mutex::new(None),
            failing_releases: Mutex::new(false),
            calls: Mutex::new(GhCalls::default()),
            config,
        });
        let tasks = vec![
            tokio::spawn(serve(api, Arc::clone(&state), false)),
            tokio::spawn(serve(storage, Arc::clone(&state), true)),
        ];
        Self { state, tasks }
    }

    /// The API base URL (`http://host:port` or `http://host:port/api/v3`).
    pub fn url(&self) -> String {
        self.state.api.clone()
    }

    pub fn calls(&self) -> GhCalls {
        *self.state.calls.lock().expect("calls")
    }

    /// Requests left in the window.
    pub fn remaining(&self) -> u64 {
        *self.state.remaining.lock().expect("remaining")
    }

    pub fn set_remaining(&self, remaining: u64) {
        *self.state.remaining.lock().expect("remaining") = remaining;
    }

    pub fn set_secondary(&self, secondary: Option<Secondary>) {
        *self.state.secondary.lock().expect("secondary") = secondary;
    }

    /// Makes every releases list answer `500` (or answer again).
    pub fn set_failing_releases(&self, failing: bool) {
        *self
            .state
            .failing_releases
            .lock()
            .expect("failing releases") = failing;
    }

    /// A `[github]` section pointing at this simulator, anonymous.
    pub fn github_config(&self) -> GithubConfig {
        GithubConfig {
            name: None,
            priority: None,
            api_url: self.url(),
            owner: self.state.config.owner.clone(),
            token_path: None,
            timeout_seconds: 5,
            max_concurrency: 8,
            include_archived: false,
        }
    }
}

async fn serve(listener: TcpListener, state: Arc<State>, storage: bool) {
    let mut connections = JoinSet::new();
    while let Ok((stream, _)) = listener.accept().await {
        let state = Arc::clone(&state);
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let state = Arc::clone(&state);
            async move {
                Ok::<_, Infallible>(if storage {
                    state.storage_route(&req)
                } else {
                    state.route(&req)
                })
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

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Reply {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, content_type.parse().expect("content type"));
    r
}

fn add_header(r: &mut Reply, name: &'static str, value: &str) {
    r.headers_mut()
        .insert(name, value.parse().expect("header value"));
}

fn timestamp(unix: i64) -> String {
    OffsetDateTime::from_unix_timestamp(unix)
        .expect("time")
        .format(&Rfc3339)
        .expect("format")
}

fn query_value<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query
        .split('&')
        .filter_map(|p| p.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

/// Overwrites `value`'s fields with `extra`'s.
fn merge(value: &mut Value, extra: Value) {
    if let (Some(target), Value::Object(extra)) = (value.as_object_mut(), extra) {
        for (k, v) in extra {
            target.insert(k, v);
        }
    }
}

impl State {
    fn count(&self, f: impl FnOnce(&mut GhCalls)) {
        f(&mut self.calls.lock().expect("calls"));
    }

    fn caller(&self, req: &Request<Incoming>) -> Caller {
        let Some(value) = req.headers().get(AUTHORIZATION) else {
            return Caller::Anonymous;
        };
        let value = value.to_str().unwrap_or_default();
        let presented = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("token "));
        match (presented, &self.config.token) {
            (Some(p), Some(t)) if p == t => Caller::User,
            _ => Caller::Invalid,
        }
    }

    fn error(&self, status: StatusCode, message: &str) -> Reply {
        let body = json!({
            "message": message,
            "documentation_url": "https://docs.github.com/rest",
            "status": status.as_u16().to_string(),
        });
        reply(
            status,
            "application/json; charset=utf-8",
            serde_json::to_vec(&body).expect("json"),
        )
    }

    fn rate_headers(&self, r: &mut Reply, remaining: u64) {
        add_header(r, "x-ratelimit-limit", &self.config.limit.to_string());
        add_header(r, "x-ratelimit-remaining", &remaining.to_string());
        add_header(
            r,
            "x-ratelimit-used",
            &(self.config.limit.saturating_sub(remaining)).to_string(),
        );
        add_header(r, "x-ratelimit-reset", &self.reset.to_string());
        add_header(r, "x-ratelimit-resource", "core");
    }

    fn route(&self, req: &Request<Incoming>) -> Reply {
        self.count(|c| c.api += 1);
        let caller = self.caller(req);
        let path = req.uri().path();
        let query = req.uri().query().unwrap_or_default();
        let Some(rest) = path.strip_prefix(&self.config.prefix) else {
            return self.error(StatusCode::NOT_FOUND, "Not Found");
        };
        let segments: Vec<String> = rest
            .trim_start_matches('/')
            .split('/')
            .map(|s| percent_decode_str(s).decode_utf8_lossy().into_owned())
            .collect();
        let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
        if segments == ["rate_limit"] {
            let remaining = *self.remaining.lock().expect("remaining");
            let mut body = self.examples["rate-limit-overview"]["value"].clone();
            let bucket = json!({"limit": self.config.limit, "remaining": remaining,
                                "used": self.config.limit - remaining, "reset": self.reset});
            merge(&mut body["resources"]["core"], bucket.clone());
            merge(&mut body["rate"], bucket);
            let mut r = self.json(&body, req);
            self.rate_headers(&mut r, remaining);
            return r;
        }
        if caller == Caller::Invalid {
            return self.error(StatusCode::UNAUTHORIZED, "Bad credentials");
        }
        if let Some(secondary) = *self.secondary.lock().expect("secondary") {
            self.count(|c| c.rate_limited += 1);
            let mut r = self.error(
                StatusCode::from_u16(secondary.status).expect("status"),
                "You have exceeded a secondary rate limit. Please wait a few minutes before you try again.",
            );
            if let Some(seconds) = secondary.retry_after {
                add_header(&mut r, "retry-after", &seconds.to_string());
            }
            let remaining = *self.remaining.lock().expect("remaining");
            self.rate_headers(&mut r, remaining);
            return r;
        }
        {
            let remaining = *self.remaining.lock().expect("remaining");
            if remaining == 0 {
                self.count(|c| c.rate_limited += 1);
                let mut r = self.error(
                    StatusCode::from_u16(self.config.exhausted_status).expect("status"),
                    "API rate limit exceeded for 127.0.0.1. (But here's the good news: Authenticated requests get a higher rate limit.)",
                );
                self.rate_headers(&mut r, 0);
                return r;
            }
        }
        let failing = *self.failing_releases.lock().expect("failing releases");
        let answer = match segments.as_slice() {
            ["repos", _, _, "releases"] if failing => {
                Answer::Reply(self.error(StatusCode::INTERNAL_SERVER_ERROR, "Server Error"))
            }
            _ => self.api(&segments, query, caller, req),
        };
        let mut answer = match answer {
            Answer::Json(value, link) => {
                let mut r = self.json(&value, req);
                if let Some(link) = link {
                    add_header(&mut r, "link", &link);
                }
                r
            }
            Answer::Reply(r) => r,
        };
        let remaining = {
            let mut remaining = self.remaining.lock().expect("remaining");
            if answer.status() != StatusCode::NOT_MODIFIED {
                *remaining -= 1;
                self.count(|c| c.counted += 1);
            } else {
                self.count(|c| c.not_modified += 1);
            }
            *remaining
        };
        self.rate_headers(&mut answer, remaining);
        answer
    }

    /// A 200 with an `ETag`, or a `304` when the request's `If-None-Match` names it.
    fn json(&self, value: &Value, req: &Request<Incoming>) -> Reply {
        let body = serde_json::to_vec(value).expect("json");
        let etag = format!("\"{}\"", &sha256_hex(&body)[..40]);
        let matches = req
            .headers()
            .get(IF_NONE_MATCH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.split(',')
                    .any(|t| t.trim().trim_start_matches("W/") == etag)
            });
        let mut r = if matches {
            reply(
                StatusCode::NOT_MODIFIED,
                "application/json; charset=utf-8",
                "",
            )
        } else {
            reply(StatusCode::OK, "application/json; charset=utf-8", body)
        };
        add_header(&mut r, "etag", &etag);
        r
    }

    fn visible(&self, repo: &GhRepo, caller: Caller) -> bool {
        !repo.private || caller == Caller::User
    }

    fn repo_by_name(&self, owner: &str, name: &str, caller: Caller) -> Option<&GhRepo> {
        if !owner.eq_ignore_ascii_case(&self.config.owner) {
            return None;
        }
        self.config
            .repos
            .iter()
            .find(|r| r.name.eq_ignore_ascii_case(name) && self.visible(r, caller))
    }

    fn repo_by_id(&self, id: &str, caller: Caller) -> Option<&GhRepo> {
        self.config
            .repos
            .iter()
            .find(|r| r.id.to_string() == id && self.visible(r, caller))
    }

    fn api(
        &self,
        segments: &[&str],
        query: &str,
        caller: Caller,
        req: &Request<Incoming>,
    ) -> Answer {
        let not_found = || Answer::Reply(self.error(StatusCode::NOT_FOUND, "Not Found"));
        match segments {
            ["orgs", org, "repos"] if org.eq_ignore_ascii_case(&self.config.owner) => {
                self.org_repos(query, caller)
            }
            ["organizations", "1", "repos"] => self.org_repos(query, caller),
            ["repos", owner, name] => match self.repo_by_name(owner, name, caller) {
                Some(repo) => {
                    let mut full =
                        self.examples["full-repository-default-response"]["value"].clone();
                    // The upstream example itself strays from its schema: it lacks the required
                    // `language` and its fork parents carry undeclared fields. Our repositories
                    // are not forks, so those optional parts are left out.
                    if let Some(fields) = full.as_object_mut() {
                        for fork_only in ["parent", "source", "template_repository"] {
                            fields.remove(fork_only);
                        }
                        fields.insert("language".into(), Value::Null);
                    }
                    merge(&mut full, self.repo_fields(repo));
                    Answer::Json(full, None)
                }
                None => not_found(),
            },
            ["repos", owner, name, "releases"] => match self.repo_by_name(owner, name, caller) {
                Some(repo) => self.releases(repo, query, caller),
                None => not_found(),
            },
            ["repositories", id, "releases"] => match self.repo_by_id(id, caller) {
                Some(repo) => self.releases(repo, query, caller),
                None => not_found(),
            },
            ["repos", owner, name, "releases", "assets", id] => {
                self.count(|c| c.assets += 1);
                let Some(repo) = self.repo_by_name(owner, name, caller) else {
                    return not_found();
                };
                let found = repo.releases.iter().find_map(|rel| {
                    rel.assets
                        .iter()
                        .find(|a| a.id.to_string() == *id)
                        .map(|a| (rel, a))
                });
                let Some((release, asset)) = found else {
                    return not_found();
                };
                let octet = req
                    .headers()
                    .get(ACCEPT)
                    .is_some_and(|v| v.as_bytes() == b"application/octet-stream");
                if octet {
                    let mut r = reply(StatusCode::FOUND, "text/html; charset=utf-8", "");
                    let location = format!(
                        "{}assets/{}?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Signature=sim",
                        self.storage, asset.id
                    );
                    r.headers_mut()
                        .insert(LOCATION, location.parse().expect("location"));
                    Answer::Reply(r)
                } else {
                    Answer::Json(self.asset_json(repo, release, asset), None)
                }
            }
            _ => not_found(),
        }
    }

    /// One page of `items` and its `Link` header, built on `base` (another path shape than
    /// the request's, as GitHub's are).
    fn page(&self, items: Vec<Value>, query: &str, base: &str) -> Answer {
        let per_page: usize = query_value(query, "per_page")
            .and_then(|v| v.parse().ok())
            .unwrap_or(30)
            .clamp(1, 100);
        let page: usize = query_value(query, "page")
            .and_then(|v| v.parse().ok())
            .unwrap_or(1)
            .max(1);
        let last = items.len().div_ceil(per_page).max(1);
        let chunk: Vec<Value> = items
            .into_iter()
            .skip((page - 1) * per_page)
            .take(per_page)
            .collect();
        let link_to =
            |n: usize, rel: &str| format!("<{base}?per_page={per_page}&page={n}>; rel=\"{rel}\"");
        let mut links = Vec::new();
        if page > 1 && page <= last {
            links.push(link_to(page - 1, "prev"));
        }
        if page < last {
            links.push(link_to(page + 1, "next"));
            links.push(link_to(last, "last"));
        }
        if page > 1 && page <= last {
            links.push(link_to(1, "first"));
        }
        let link = (!links.is_empty()).then(|| links.join(", "));
        Answer::Json(Value::Array(chunk), link)
    }

    fn org_repos(&self, query: &str, caller: Caller) -> Answer {
        let template = self.examples["minimal-repository-items"]["value"][0].clone();
        let items = self
            .config
            .repos
            .iter()
            .filter(|r| self.visible(r, caller))
            .map(|repo| {
                let mut item = template.clone();
                merge(&mut item, self.repo_fields(repo));
                item
            })
            .collect();
        self.page(items, query, &format!("{}/organizations/1/repos", self.api))
    }

    fn releases(&self, repo: &GhRepo, query: &str, caller: Caller) -> Answer {
        let mut releases: Vec<&GhRelease> = repo
            .releases
            .iter()
            .filter(|r| !r.draft || caller == Caller::User)
            .collect();
        releases.sort_by_key(|r| std::cmp::Reverse(r.created));
        let items = releases
            .into_iter()
            .map(|release| self.release_json(repo, release))
            .collect();
        self.page(
            items,
            query,
            &format!("{}/repositories/{}/releases", self.api, repo.id),
        )
    }

    fn user_json(&self) -> Value {
        let mut user = self.examples["release-items"]["value"][0]["author"].clone();
        merge(
            &mut user,
            json!({"login": "release-bot", "html_url": "https://github.com/release-bot"}),
        );
        user
    }

    fn repo_fields(&self, repo: &GhRepo) -> Value {
        let owner = &self.config.owner;
        let mut owner_json = self.user_json();
        merge(
            &mut owner_json,
            json!({"login": owner, "type": "Organization"}),
        );
        json!({
            "id": repo.id,
            "name": repo.name,
            "full_name": format!("{owner}/{}", repo.name),
            "private": repo.private,
            "visibility": if repo.private { "private" } else { "public" },
            "archived": repo.archived,
            "description": repo.description,
            "topics": repo.topics,
            "html_url": format!("https://github.com/{owner}/{}", repo.name),
            "url": format!("{}/repos/{owner}/{}", self.api, repo.name),
            "owner": owner_json,
        })
    }

    fn release_json(&self, repo: &GhRepo, release: &GhRelease) -> Value {
        let mut value = self.examples["release-items"]["value"][0].clone();
        let owner = &self.config.owner;
        merge(
            &mut value,
            json!({
                "id": release.id,
                "tag_name": release.tag,
                "name": release.tag,
                "draft": release.draft,
                "prerelease": false,
                "created_at": timestamp(release.created),
                "published_at": if release.draft { Value::Null } else { json!(timestamp(release.created)) },
                "author": self.user_json(),
                "url": format!("{}/repos/{owner}/{}/releases/{}", self.api, repo.name, release.id),
                "html_url": format!("https://github.com/{owner}/{}/releases/tag/{}", repo.name, release.tag),
                "assets": release.assets.iter().map(|a| self.asset_json(repo, release, a)).collect::<Vec<_>>(),
            }),
        );
        value
    }

    fn asset_json(&self, repo: &GhRepo, release: &GhRelease, asset: &GhAsset) -> Value {
        let mut value = self.examples["release-items"]["value"][0]["assets"][0].clone();
        let owner = &self.config.owner;
        merge(
            &mut value,
            json!({
                "id": asset.id,
                "name": asset.name,
                "label": Value::Null,
                "size": asset.bytes.len(),
                "content_type": "application/gzip",
                "state": "uploaded",
                "digest": if asset.digest { json!(format!("sha256:{}", sha256_hex(&asset.bytes))) } else { Value::Null },
                "created_at": timestamp(release.created),
                "updated_at": timestamp(release.created),
                "url": format!("{}/repos/{owner}/{}/releases/assets/{}", self.api, repo.name, asset.id),
                "browser_download_url": format!("https://github.com/{owner}/{}/releases/download/{}/{}", repo.name, release.tag, asset.name),
                "uploader": self.user_json(),
            }),
        );
        value
    }

    fn storage_route(&self, req: &Request<Incoming>) -> Reply {
        self.count(|c| c.storage += 1);
        if req.headers().contains_key(AUTHORIZATION) {
            self.count(|c| c.storage_authorizations += 1);
            return reply(
                StatusCode::BAD_REQUEST,
                "application/xml",
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>InvalidArgument</Code><Message>Only one auth mechanism allowed; only the X-Amz-Algorithm query parameter, Signature query string parameter or the Authorization header should be specified</Message></Error>",
            );
        }
        let id = req
            .uri()
            .path()
            .strip_prefix("/assets/")
            .unwrap_or_default();
        let asset = self
            .config
            .repos
            .iter()
            .flat_map(|r| r.releases.iter())
            .flat_map(|r| r.assets.iter())
            .find(|a| a.id.to_string() == id);
        match asset {
            Some(asset) => reply(
                StatusCode::OK,
                "application/octet-stream",
                asset.bytes.clone(),
            ),
            None => reply(
                StatusCode::NOT_FOUND,
                "application/xml",
                "<Error><Code>NoSuchKey</Code></Error>",
            ),
        }
    }
}

enum Answer {
    /// A JSON body (answered with an `ETag`, or `304`), with its `Link` header.
    Json(Value, Option<String>),
    Reply(Reply),
}
