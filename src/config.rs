//! Configuration: one documented struct per TOML section, parsed purely from text so tests can
//! feed strings, validated with messages that name the file, the key and what would be valid.

use std::borrow::Cow;
use std::fmt;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::registry::{InstanceName, Source};

/// The configuration that ships with the binary: the local backend over the sample extensions.
pub const EMBEDDED_DEFAULT: &str = include_str!("../config.example.toml");

/// The name the embedded default goes by in messages.
pub const EMBEDDED_ORIGIN: &str = "<embedded config.example.toml>";

/// A configuration error: where it is and what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {message}")]
pub struct ConfigError {
    pub file: String,
    pub message: String,
}

/// The whole file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    /// Gitea/Forgejo releases backends: `[gitea]` (one) or `[[gitea]]` (any number); none
    /// means disabled.
    #[serde(default, deserialize_with = "one_or_many")]
    pub gitea: Vec<GiteaConfig>,
    /// OCI registry backends: `[oci]` or `[[oci]]`; none means disabled.
    #[serde(default, deserialize_with = "one_or_many")]
    pub oci: Vec<OciConfig>,
    /// GitHub (github.com or Enterprise Server) releases backends: `[github]` or
    /// `[[github]]`; none means disabled.
    #[serde(default, deserialize_with = "one_or_many")]
    pub github: Vec<GithubConfig>,
    /// Local directory backends: `[local]` or `[[local]]`; none means disabled.
    #[serde(default, deserialize_with = "one_or_many")]
    pub local: Vec<LocalConfig>,
    #[serde(default)]
    pub cache: CacheConfig,
    #[serde(default)]
    pub rate_limit: RateLimitConfig,
    #[serde(default)]
    pub circuit_breaker: CircuitBreakerConfig,
    /// Redis (or Valkey) shared by several replicas; absent means each replica stands alone.
    pub redis: Option<RedisConfig>,
    #[serde(default)]
    pub admin: AdminConfig,
}

/// `[server]`: the listening socket and the HTTP edge.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address to bind.
    pub host: IpAddr,
    /// Port to bind; 0 picks a free one.
    pub port: u16,
    /// Tokio worker threads; 0 means one per CPU.
    pub workers: usize,
    /// Answer CORS preflights and add CORS headers.
    pub enable_cors: bool,
    /// Origins allowed by CORS; empty means any origin.
    pub cors_allowed_origins: Vec<String>,
    /// Compress JSON and text responses when the client accepts it.
    pub enable_compression: bool,
    /// How long in-flight requests may run after SIGTERM/SIGINT before the process exits.
    pub shutdown_grace_seconds: u64,
    /// Longest time one request may take before it is answered 504.
    pub request_timeout_seconds: u64,
    /// Most requests being worked on at once; beyond it requests are answered 503 at once
    /// instead of queueing behind slow backends. The `[rate_limit] exempt_paths` (probes,
    /// scrapes) are not counted.
    pub max_concurrent_requests: usize,
    /// How long a new connection may take to send its first complete request head (protocol
    /// detection included), and an HTTP/1 request head once its first byte has arrived;
    /// past it the connection is closed, so an empty or trickling connection is not held.
    pub header_read_timeout_seconds: u64,
    /// How long a connection with no request in flight (idle HTTP/1 keep-alive, HTTP/2 with
    /// no open stream) stays open.
    pub keepalive_timeout_seconds: u64,
    /// Most streams one HTTP/2 connection may have open at once (`SETTINGS_MAX_CONCURRENT_STREAMS`).
    pub http2_max_concurrent_streams: u32,
    /// Most connections open at once; beyond it new connections are closed at once (reset),
    /// so idle sockets cannot exhaust the process's file descriptors.
    pub max_connections: usize,
    /// How long a response body may wait for the client to take its next bytes (a client that
    /// does not read, an HTTP/2 stream whose window stays shut) before it is aborted and its
    /// upstream released.
    pub send_timeout_seconds: u64,
    /// Most downloads streaming at once (HTTP/2 streams each count); beyond it a download is
    /// answered 503 at once.
    pub max_concurrent_downloads: usize,
    /// Most of those one client (as the rate limit tells clients apart) may have streaming
    /// at once; beyond it its next download is answered 429 at once, so one client cannot take
    /// every download slot (with HTTP/2 streams whose windows it keeps shut, say).
    pub max_downloads_per_client: usize,
    /// With rate limiting on, most requests in progress (until their response head) one
    /// client may have; beyond it its next request is answered 429 at once, so a few clients
    /// with slow requests cannot hold every one of `max_concurrent_requests`.
    pub max_requests_per_client: u32,
    /// How often the backends are probed in the background for `/api/v1/health` and
    /// `/readyz`, which answer from the last probe.
    pub probe_interval_seconds: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            host: IpAddr::from([0, 0, 0, 0]),
            port: 8082,
            workers: 0,
            enable_cors: true,
            cors_allowed_origins: Vec::new(),
            enable_compression: true,
            shutdown_grace_seconds: 30,
            request_timeout_seconds: 30,
            max_concurrent_requests: 1024,
            header_read_timeout_seconds: 10,
            keepalive_timeout_seconds: 60,
            http2_max_concurrent_streams: 128,
            max_connections: 10_000,
            send_timeout_seconds: 60,
            max_concurrent_downloads: 256,
            max_downloads_per_client: 16,
            max_requests_per_client: 128,
            probe_interval_seconds: 5,
        }
    }
}

impl ServerConfig {
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_seconds)
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_seconds)
    }

    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_secs(self.header_read_timeout_seconds)
    }

    pub fn keepalive_timeout(&self) -> Duration {
        Duration::from_secs(self.keepalive_timeout_seconds)
    }

    pub fn send_timeout(&self) -> Duration {
        Duration::from_secs(self.send_timeout_seconds)
    }

    pub fn probe_interval(&self) -> Duration {
        Duration::from_secs(self.probe_interval_seconds)
    }
}

/// `[gitea]`: extensions kept as releases of `{name}_prov|_taskserv|_cluster` repositories.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GiteaConfig {
    /// The instance's name (`[a-z0-9-]{1,32}`, unique), for `source=`, the `instance` field,
    /// health and metrics; default: the kind, `gitea`.
    pub name: Option<String>,
    /// Precedence among all instances, lower first; default: the instance's position in the
    /// default order (see [`Config::backends`]).
    pub priority: Option<u32>,
    /// Root URL of the instance, possibly with a sub-path (`https://host/git/`).
    pub url: String,
    /// The organization whose repositories hold the extensions.
    pub organization: String,
    /// File holding a personal access token; absent means anonymous.
    pub token_path: Option<PathBuf>,
    /// Per-request timeout towards Gitea.
    #[serde(default = "default_backend_timeout")]
    pub timeout_seconds: u64,
    /// Verify the TLS certificate of the instance.
    #[serde(default = "yes")]
    pub verify_ssl: bool,
    /// Most calls in flight at once when fanning out over repositories.
    #[serde(default = "default_max_concurrency")]
    pub max_concurrency: usize,
    /// List archived repositories too.
    #[serde(default)]
    pub include_archived: bool,
    /// File holding the shared secret of the organization's webhook; `POST
    /// /api/v1/hooks/gitea` accepts deliveries signed with it (HMAC-SHA256 of the body).
    /// Absent: that route answers 404.
    pub webhook_secret_path: Option<PathBuf>,
}

/// `[oci]`: extensions kept as OCI artifacts in `{namespace}/{name}-provider|-taskserv|-cluster`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OciConfig {
    /// The instance's name (`[a-z0-9-]{1,32}`, unique); default: `oci`.
    pub name: Option<String>,
    /// Precedence among all instances, lower first; default: see [`Config::backends`].
    pub priority: Option<u32>,
    /// `host[:port]`, or a URL with an explicit `http://` or `https://` scheme.
    pub registry: String,
    /// The repository prefix under which extensions live.
    pub namespace: String,
    /// File holding a static bearer token; absent means none.
    pub auth_token_path: Option<PathBuf>,
    /// User for basic auth and token exchange.
    pub username: Option<String>,
    /// File holding the password of `username`.
    pub password_path: Option<PathBuf>,
    /// Per-request timeout towards the registry.
    #[serde(default = "default_backend_timeout")]
    pub timeout_seconds: u64,
    /// Verify the TLS certificate of the registry.
    #[serde(default = "yes")]
    pub verify_ssl: bool,
    /// Speak plain HTTP to a registry given without a scheme.
    #[serde(default)]
    pub insecure: bool,
    /// Repositories to use when the registry does not offer `_catalog`.
    pub repositories: Option<Vec<String>>,
    /// Most calls in flight at once when fanning out over repositories.
    #[serde(default = "default_max_concurrency")]
    pub max_concurrency: usize,
    /// File holding the bearer token the registry's notifications carry (`Authorization:
    /// Bearer …`, set in its `notifications` endpoint `headers`); `POST /api/v1/hooks/oci`
    /// accepts only those. Absent: that route answers 404.
    pub webhook_token_path: Option<PathBuf>,
}

/// `[admin]`: operators' routes.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// File holding the bearer token `POST /api/v1/cache/purge` requires. Absent: that
    /// route answers 404.
    pub token_path: Option<PathBuf>,
}

/// `[github]`: extensions kept as releases of `{name}_prov|_taskserv|_cluster` repositories
/// of one GitHub organization or user, on github.com or a GitHub Enterprise Server.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GithubConfig {
    /// The instance's name (`[a-z0-9-]{1,32}`, unique); default: `github`.
    pub name: Option<String>,
    /// Precedence among all instances, lower first; default: see [`Config::backends`].
    pub priority: Option<u32>,
    /// The REST API's base URL: `https://api.github.com`, or `https://HOST/api/v3` for
    /// GitHub Enterprise Server.
    #[serde(default = "default_github_api_url")]
    pub api_url: String,
    /// The organization or user whose repositories hold the extensions.
    pub owner: String,
    /// File holding a token (fine-grained or classic PAT, or an app token); absent means
    /// anonymous (public repositories only, 60 requests an hour on github.com).
    pub token_path: Option<PathBuf>,
    /// Per-request timeout towards GitHub.
    #[serde(default = "default_backend_timeout")]
    pub timeout_seconds: u64,
    /// Most calls in flight at once when fanning out over repositories.
    #[serde(default = "default_max_concurrency")]
    pub max_concurrency: usize,
    /// List archived repositories too.
    #[serde(default)]
    pub include_archived: bool,
}

fn default_github_api_url() -> String {
    "https://api.github.com".into()
}

/// `[local]`: a directory laid out as `<type>/<name>/<version>/<artifact>.tar.gz`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalConfig {
    /// The instance's name (`[a-z0-9-]{1,32}`, unique); default: `local`.
    pub name: Option<String>,
    /// Precedence among all instances, lower first; default: see [`Config::backends`].
    pub priority: Option<u32>,
    /// The root directory; relative paths are taken from the configuration file's directory.
    pub path: PathBuf,
}

/// `[cache]`: the in-memory caches in front of the backends.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Most entries per cache.
    pub capacity: u64,
    /// How long an answer is fresh.
    pub ttl_seconds: u64,
    /// Cache single extensions and their versions.
    pub enable_metadata_cache: bool,
    /// Cache listings.
    pub enable_list_cache: bool,
    /// How long a "not found" answer is remembered, so repeated lookups of a missing
    /// extension do not each reach the backends; 0 disables negative caching.
    pub negative_ttl_seconds: u64,
    /// How long past `ttl_seconds` an answer is kept to stand in for the backends when a
    /// refresh fails with a backend fault; 0 disables stale-if-error.
    pub stale_if_error_seconds: u64,
    /// How long past `ttl_seconds` an answer is still served at once, marked stale, while
    /// one background refresh per key fetches the new one; 0 disables it (requests then
    /// wait for the refresh).
    pub stale_while_revalidate_seconds: u64,
    /// Most background refreshes running at once; a stale answer found while all are busy is
    /// served without starting another.
    pub max_background_refreshes: usize,
    /// When a webhook or a purge invalidates one extension, fetch its metadata and versions
    /// again at once in the background (sharing `max_background_refreshes`), so the next
    /// client finds a warm answer.
    pub refresh_on_invalidate: bool,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            capacity: 1000,
            ttl_seconds: 300,
            enable_metadata_cache: true,
            enable_list_cache: true,
            negative_ttl_seconds: 30,
            stale_if_error_seconds: 86400,
            stale_while_revalidate_seconds: 60,
            max_background_refreshes: 16,
            refresh_on_invalidate: true,
        }
    }
}

/// `[rate_limit]`: requests per client, refused with 429 beyond the quota.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitConfig {
    /// On by default: the service is meant to be reachable publicly, and one client must not
    /// be able to starve the others or hammer the backends.
    pub enabled: bool,
    /// Sustained requests per second one client may make.
    pub requests_per_second: NonZeroU32,
    /// Requests one client may make at once after being idle.
    pub burst: NonZeroU32,
    /// Proxies whose `client_ip_header` names the client; from any other peer the header is
    /// ignored, so clients cannot pick their own key.
    pub trusted_proxies: Vec<TrustedProxy>,
    /// The one header trusted proxies name the client in; the others are never read, so a
    /// proxy that writes one and passes a client's copy of another through cannot be fooled.
    pub client_ip_header: ClientIpHeader,
    /// Paths never limited, so probes and scrapes keep working under load.
    pub exempt_paths: Vec<String>,
    /// Most clients tracked at once; beyond it new clients share one quota, so a flood of
    /// distinct addresses cannot grow memory without limit.
    pub max_clients: usize,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            requests_per_second: const { NonZeroU32::new(50).unwrap() },
            burst: const { NonZeroU32::new(100).unwrap() },
            trusted_proxies: Vec::new(),
            client_ip_header: ClientIpHeader::XForwardedFor,
            exempt_paths: ["/api/v1/health", "/livez", "/readyz", "/api/v1/metrics"]
                .map(String::from)
                .to_vec(),
            max_clients: 65_536,
        }
    }
}

/// `[circuit_breaker]`: per backend, stop calling a backend that keeps failing.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CircuitBreakerConfig {
    /// Consecutive faults (timeouts, 5xx, refused connections, malformed answers) after which
    /// a backend's breaker opens; while open, requests needing it are answered from the cache
    /// or with 503 at once.
    pub failure_threshold: u32,
    /// How long the breaker stays open the first time; each failed probe doubles it.
    pub open_seconds: u64,
    /// The longest the breaker stays open before letting a probe through.
    pub max_open_seconds: u64,
}

impl Default for CircuitBreakerConfig {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            open_seconds: 10,
            max_open_seconds: 300,
        }
    }
}

/// `[redis]`: the Redis or Valkey several replicas share, so that they act as one registry.
/// Redis is never needed to answer: when it is down or slow each replica goes on alone.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://host[:port][/database]`, or `rediss://` for TLS; without a password (see
    /// `password_path`).
    pub url: String,
    /// File holding the password (with `AUTH`); absent means none.
    pub password_path: Option<PathBuf>,
    /// Prefix of every key and channel, so several deployments can share one Redis.
    #[serde(default = "default_redis_prefix")]
    pub key_prefix: String,
    /// Longest time one Redis command may take; past it the command counts as failed, Redis
    /// as unavailable, and the request goes on without it.
    #[serde(default = "default_redis_timeout")]
    pub timeout_milliseconds: u64,
    /// Share answers across replicas (a second cache level under the in-process one) and
    /// refresh a cold key on one replica only.
    #[serde(default = "yes")]
    pub enable_cache: bool,
    /// Count each client's `[rate_limit]` quota across replicas (one GCRA state per client in
    /// Redis); each replica's own quota still refuses first, and decides alone while Redis
    /// does not answer.
    #[serde(default = "yes")]
    pub enable_rate_limit: bool,
    /// Carry invalidations to every replica.
    #[serde(default = "yes")]
    pub enable_invalidation: bool,
}

impl RedisConfig {
    /// The per-command bound.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_milliseconds)
    }
}

fn default_redis_prefix() -> String {
    "extension-registry:".into()
}

fn default_redis_timeout() -> u64 {
    50
}

/// `[rate_limit] client_ip_header`: how the trusted proxy in front names the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClientIpHeader {
    /// `X-Forwarded-For: client, proxy, ...`, each proxy appending the address it saw.
    XForwardedFor,
    /// `Forwarded: for=client, for=proxy` (RFC 7239).
    Forwarded,
    /// `X-Real-IP: client`, one address set by the proxy.
    XRealIp,
}

/// One `trusted_proxies` entry: a CIDR, or a bare address meaning a network of one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct TrustedProxy(pub ipnet::IpNet);

impl TryFrom<String> for TrustedProxy {
    type Error = String;

    fn try_from(entry: String) -> Result<Self, String> {
        entry
            .parse::<ipnet::IpNet>()
            .or_else(|_| entry.parse::<IpAddr>().map(ipnet::IpNet::from))
            .map(|net| Self(net.trunc()))
            .map_err(|_| {
                format!(
                    "trusted_proxies: '{entry}' is neither an address nor a CIDR \
                     (e.g. \"10.0.0.0/8\", \"192.0.2.7\", \"fd00::/8\")"
                )
            })
    }
}

/// Below the default request timeout (30 s), so a backend that times out leaves the request
/// time to be answered from a stale cache entry instead of a bare 504.
fn default_backend_timeout() -> u64 {
    10
}

fn default_max_concurrency() -> usize {
    8
}

fn yes() -> bool {
    true
}

impl Config {
    /// Parses and validates `text`; `origin` names the file in messages and is where relative
    /// paths are resolved from (`None`: the current directory).
    pub fn parse(text: &str, origin: &str, base: Option<&Path>) -> Result<Self, ConfigError> {
        let err = |message: String| ConfigError {
            file: origin.to_owned(),
            message,
        };
        let mut config: Config = toml::from_str(text).map_err(|e| err(e.to_string()))?;
        config.validate().map_err(err)?;
        for local in &mut config.local {
            if let (true, Some(base)) = (local.path.is_relative(), base) {
                local.path = base.join(&local.path);
            }
        }
        for path in config.secret_paths_mut() {
            if let (true, Some(base)) = (path.is_relative(), base) {
                *path = base.join(&*path);
            }
        }
        Ok(config)
    }

    /// Reads and parses a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.display().to_string(),
            message: format!("cannot read the configuration file: {e}"),
        })?;
        Self::parse(&text, &path.display().to_string(), path.parent())
    }

    /// The embedded default configuration, paths taken from the current directory.
    pub fn embedded() -> Result<Self, ConfigError> {
        Self::parse(EMBEDDED_DEFAULT, EMBEDDED_ORIGIN, None)
    }

    fn secret_paths_mut(&mut self) -> impl Iterator<Item = &mut PathBuf> {
        let gitea = self
            .gitea
            .iter_mut()
            .flat_map(|g| [g.token_path.as_mut(), g.webhook_secret_path.as_mut()]);
        let oci = self.oci.iter_mut().flat_map(|o| {
            [
                o.auth_token_path.as_mut(),
                o.password_path.as_mut(),
                o.webhook_token_path.as_mut(),
            ]
        });
        let github = self.github.iter_mut().map(|g| g.token_path.as_mut());
        let admin = self.admin.token_path.as_mut();
        let redis = self.redis.as_mut().and_then(|r| r.password_path.as_mut());
        gitea
            .chain(oci)
            .chain(github)
            .chain([admin, redis])
            .flatten()
    }

    /// Every configured backend, in precedence order: by `priority`, lower first. An
    /// instance without one takes its position in the default order (Gitea, OCI, GitHub,
    /// local; each kind's instances in file order) as its priority, and ties keep that order.
    pub fn backends(&self) -> Vec<BackendSection<'_>> {
        let gitea = self.gitea.iter().enumerate();
        let oci = self.oci.iter().enumerate();
        let github = self.github.iter().enumerate();
        let local = self.local.iter().enumerate();
        let by_default = (gitea.map(|(i, c)| BackendSection::Gitea(c, i)))
            .chain(oci.map(|(i, c)| BackendSection::Oci(c, i)))
            .chain(github.map(|(i, c)| BackendSection::Github(c, i)))
            .chain(local.map(|(i, c)| BackendSection::Local(c, i)));
        let mut ranked: Vec<_> = by_default
            .enumerate()
            .map(|(position, s)| (s.priority().map_or(position as u64, u64::from), s))
            .collect();
        // Stable, so equal priorities keep the default order.
        ranked.sort_by_key(|(priority, _)| *priority);
        ranked.into_iter().map(|(_, s)| s).collect()
    }

    fn validate(&self) -> Result<(), String> {
        if self.backends().is_empty() {
            return Err("no backend configured: add at least one of the sections [gitea], [oci], [github], [local] (or [[gitea]] …)".into());
        }
        let positive = |key: &str, value: u64| {
            if value == 0 {
                Err(format!("{key}: must be a whole number above 0"))
            } else {
                Ok(())
            }
        };
        positive(
            "[server] request_timeout_seconds",
            self.server.request_timeout_seconds,
        )?;
        positive(
            "[server] max_concurrent_requests",
            self.server.max_concurrent_requests as u64,
        )?;
        let server = &self.server;
        for (key, value) in [
            (
                "header_read_timeout_seconds",
                server.header_read_timeout_seconds,
            ),
            (
                "keepalive_timeout_seconds",
                server.keepalive_timeout_seconds,
            ),
            (
                "http2_max_concurrent_streams",
                server.http2_max_concurrent_streams.into(),
            ),
            ("max_connections", server.max_connections as u64),
            ("send_timeout_seconds", server.send_timeout_seconds),
            (
                "max_concurrent_downloads",
                server.max_concurrent_downloads as u64,
            ),
            (
                "max_downloads_per_client",
                server.max_downloads_per_client as u64,
            ),
            (
                "max_requests_per_client",
                server.max_requests_per_client.into(),
            ),
        ] {
            positive(&format!("[server] {key}"), value)?;
        }
        positive("[cache] capacity", self.cache.capacity)?;
        positive("[cache] ttl_seconds", self.cache.ttl_seconds)?;
        positive(
            "[cache] max_background_refreshes",
            self.cache.max_background_refreshes as u64,
        )?;
        positive(
            "[server] probe_interval_seconds",
            self.server.probe_interval_seconds,
        )?;
        let breaker = &self.circuit_breaker;
        positive(
            "[circuit_breaker] failure_threshold",
            breaker.failure_threshold.into(),
        )?;
        positive("[circuit_breaker] open_seconds", breaker.open_seconds)?;
        if breaker.max_open_seconds < breaker.open_seconds {
            return Err(format!(
                "[circuit_breaker] max_open_seconds: must be at least open_seconds ({})",
                breaker.open_seconds
            ));
        }
        if let Some(origin) = self
            .server
            .cors_allowed_origins
            .iter()
            .find(|o| http::HeaderValue::from_str(o).is_err() || o.is_empty())
        {
            return Err(format!(
                "[server] cors_allowed_origins: '{origin}' is not a valid origin (e.g. \"https://app.example.com\")"
            ));
        }
        if let Some(origin) = self
            .server
            .cors_allowed_origins
            .iter()
            .find(|o| *o != "*" && (o.ends_with('/') || !o.contains("://")))
        {
            return Err(format!(
                "[server] cors_allowed_origins: '{origin}' is not an origin: write scheme://host[:port] \
                 without a path or trailing slash (e.g. \"https://app.example.com\"), or \"*\" for any"
            ));
        }
        let limit = &self.rate_limit;
        positive("[rate_limit] max_clients", limit.max_clients as u64)?;
        if let Some(path) = limit.exempt_paths.iter().find(|p| !p.starts_with('/')) {
            return Err(format!(
                "[rate_limit] exempt_paths: '{path}' must be a path starting with '/' (e.g. \"/livez\")"
            ));
        }
        if let Some(r) = &self.redis {
            let url = reqwest::Url::parse(&r.url).map_err(|e| {
                format!(
                    "[redis] url: '{}' is not a URL ({e}); expected e.g. \"redis://127.0.0.1:6379/0\"",
                    redacted(&r.url)
                )
            })?;
            if !matches!(url.scheme(), "redis" | "rediss") || url.host_str().is_none() {
                return Err(
                    "[redis] url: expected redis://host[:port][/database] or rediss://...".into(),
                );
            }
            if url.password().is_some() {
                return Err(
                    "[redis] url: must not hold a password; put it in a file named by password_path"
                        .into(),
                );
            }
            let database = url.path().trim_start_matches('/');
            if !database.is_empty() && database.parse::<u16>().is_err() {
                return Err(format!(
                    "[redis] url: the path '/{database}' must be a database number (e.g. /0)"
                ));
            }
            if r.key_prefix.is_empty() {
                return Err("[redis] key_prefix: must not be empty".into());
            }
            positive("[redis] timeout_milliseconds", r.timeout_milliseconds)?;
        }
        let hooked = |count: usize, kind: &str, key: &str| match count {
            0 | 1 => Ok(()),
            _ => Err(format!(
                "{kind}: {key} is set on {count} [[{kind}]] tables; set it on one (its route \
                 checks deliveries against one secret)"
            )),
        };
        let gitea_hooks = self
            .gitea
            .iter()
            .filter(|g| g.webhook_secret_path.is_some());
        hooked(gitea_hooks.count(), "gitea", "webhook_secret_path")?;
        let oci_hooks = self.oci.iter().filter(|o| o.webhook_token_path.is_some());
        hooked(oci_hooks.count(), "oci", "webhook_token_path")?;
        let mut named: Vec<(String, &str)> = Vec::new();
        for section in self.backends() {
            let at = |key: &str| section.key(self, key);
            let name = section.name();
            if !InstanceName::is_valid(name) {
                return Err(format!(
                    "{}: '{name}' is not a valid name: use 1 to 32 lowercase ASCII letters, \
                     digits or '-'",
                    at("name")
                ));
            }
            let kinds = Source::ALL.map(Source::as_str);
            if let Some(kind) = kinds.iter().find(|k| **k == name && **k != section.kind()) {
                return Err(format!(
                    "{}: '{name}' is the name of the kind [{kind}]; only a [{kind}] may be named so",
                    at("name")
                ));
            }
            if let Some((other, _)) = named.iter().find(|(_, n)| *n == name) {
                return Err(format!(
                    "{}: '{name}' is already the name of {other}; give each backend its own name",
                    at("name")
                ));
            }
            named.push((at("").trim_end_matches(['.', ' ']).to_owned(), name));
            section.validate(&at)?;
        }
        Ok(())
    }
}

/// One configured backend section, of whichever kind.
#[derive(Clone, Copy, Debug)]
pub enum BackendSection<'a> {
    Gitea(&'a GiteaConfig, usize),
    Oci(&'a OciConfig, usize),
    Github(&'a GithubConfig, usize),
    Local(&'a LocalConfig, usize),
}

impl<'a> BackendSection<'a> {
    /// `gitea`, `oci`, `github` or `local`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Gitea(..) => "gitea",
            Self::Oci(..) => "oci",
            Self::Github(..) => "github",
            Self::Local(..) => "local",
        }
    }

    /// The instance's name: the configured one, or the kind's.
    pub fn name(&self) -> &'a str {
        match *self {
            Self::Gitea(c, _) => c.instance_name(),
            Self::Oci(c, _) => c.instance_name(),
            Self::Github(c, _) => c.instance_name(),
            Self::Local(c, _) => c.instance_name(),
        }
    }

    fn priority(&self) -> Option<u32> {
        match self {
            Self::Gitea(c, _) => c.priority,
            Self::Oci(c, _) => c.priority,
            Self::Github(c, _) => c.priority,
            Self::Local(c, _) => c.priority,
        }
    }

    fn index(&self) -> usize {
        match self {
            Self::Gitea(_, i) | Self::Oci(_, i) | Self::Github(_, i) | Self::Local(_, i) => *i,
        }
    }

    /// How messages name `key` of this section: `[gitea] url` when it is the only one of its
    /// kind, `gitea[1].url` (index in file order) when there are several.
    fn key(&self, config: &Config, key: &str) -> String {
        let count = match self {
            Self::Gitea(..) => config.gitea.len(),
            Self::Oci(..) => config.oci.len(),
            Self::Github(..) => config.github.len(),
            Self::Local(..) => config.local.len(),
        };
        if count == 1 {
            format!("[{}] {key}", self.kind())
        } else {
            format!("{}[{}].{key}", self.kind(), self.index())
        }
    }

    fn validate(&self, at: &dyn Fn(&str) -> String) -> Result<(), String> {
        let positive = |key: &str, value: u64| {
            if value == 0 {
                Err(format!("{}: must be a whole number above 0", at(key)))
            } else {
                Ok(())
            }
        };
        // An http(s) URL (which always has a base to join paths onto).
        let http_url = |key: &str, value: &str, expected: &str| {
            let url = reqwest::Url::parse(value).map_err(|e| {
                format!(
                    "{}: '{}' is not a URL ({e}); expected {expected}",
                    at(key),
                    redacted(value)
                )
            })?;
            if !matches!(url.scheme(), "http" | "https") {
                return Err(format!("{}: the scheme must be http or https", at(key)));
            }
            Ok(url)
        };
        match self {
            Self::Gitea(g, _) => {
                http_url("url", &g.url, "e.g. \"https://gitea.example.com/\"")?;
                if g.organization.is_empty() {
                    return Err(format!("{}: must not be empty", at("organization")));
                }
                positive("timeout_seconds", g.timeout_seconds)?;
                positive("max_concurrency", g.max_concurrency as u64)?;
            }
            Self::Oci(o, _) => {
                if o.registry.is_empty() {
                    return Err(format!(
                        "{}: must not be empty; expected host[:port] or a URL",
                        at("registry")
                    ));
                }
                if o.namespace.is_empty() {
                    return Err(format!("{}: must not be empty", at("namespace")));
                }
                if o.password_path.is_some() != o.username.is_some() {
                    return Err(format!(
                        "{} and password_path: set both or neither",
                        at("username")
                    ));
                }
                positive("timeout_seconds", o.timeout_seconds)?;
                positive("max_concurrency", o.max_concurrency as u64)?;
            }
            Self::Github(g, _) => {
                let url = http_url(
                    "api_url",
                    &g.api_url,
                    "\"https://api.github.com\" or \"https://HOST/api/v3\"",
                )?;
                if url.query().is_some() || !url.username().is_empty() || url.password().is_some() {
                    return Err(format!(
                        "{}: must not carry a query or credentials; put the token in token_path",
                        at("api_url")
                    ));
                }
                let valid_login = !g.owner.is_empty()
                    && g.owner.len() <= 39
                    && g.owner
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-');
                if !valid_login {
                    return Err(format!(
                        "{}: '{}' is not a GitHub login (letters, digits and '-', at most 39)",
                        at("owner"),
                        g.owner
                    ));
                }
                positive("timeout_seconds", g.timeout_seconds)?;
                positive("max_concurrency", g.max_concurrency as u64)?;
            }
            Self::Local(..) => {}
        }
        Ok(())
    }
}

/// A backend section's kind, for messages about its tables.
trait Section {
    /// `gitea`, `oci`, `github` or `local`.
    const KIND: &'static str;
}

/// `instance_name()` for each backend section: its `name`, or its kind's.
macro_rules! instance_names {
    ($($section:ty => $kind:literal),*) => {$(
        impl Section for $section {
            const KIND: &'static str = $kind;
        }

        impl $section {
            /// The instance's name: `name`, or the kind's when not set.
            pub fn instance_name(&self) -> &str {
                self.name.as_deref().unwrap_or($kind)
            }
        }
    )*};
}

instance_names!(GiteaConfig => "gitea", OciConfig => "oci", GithubConfig => "github", LocalConfig => "local");

/// Reads `[kind]` (one table) or `[[kind]]` (an array of tables) into a list; an error in
/// the array names the table's index (`gitea[1]: …`).
fn one_or_many<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de> + Section,
{
    struct OneOrMany<T>(std::marker::PhantomData<T>);

    impl<'de, T: Deserialize<'de> + Section> serde::de::Visitor<'de> for OneOrMany<T> {
        type Value = Vec<T>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a table or an array of tables")
        }

        fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Vec<T>, A::Error> {
            T::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(|one| vec![one])
        }

        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            let mut all = Vec::new();
            while let Some(one) = seq.next_element().map_err(|e: A::Error| {
                serde::de::Error::custom(format!("{}[{}]: {e}", T::KIND, all.len()))
            })? {
                all.push(one);
            }
            Ok(all)
        }
    }

    deserializer.deserialize_any(OneOrMany(std::marker::PhantomData))
}

/// A secret read from a file. Its `Debug` and `Display` never show the value.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    /// Reads a token or password file, trimming the trailing newline. Warns when the file can be
    /// read by group or others.
    pub fn from_file(path: &Path, key: &str) -> Result<Self, ConfigError> {
        let err = |message: String| ConfigError {
            file: path.display().to_string(),
            message,
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| err(format!("cannot read the file named by {key}: {e}")))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            if let Ok(meta) = std::fs::metadata(path) {
                if meta.permissions().mode() & 0o077 != 0 {
                    tracing::warn!(
                        path = %path.display(),
                        key,
                        "secret file is readable by group or others; chmod 600 it"
                    );
                }
            }
        }
        let value = text.trim().to_owned();
        if value.is_empty() {
            return Err(err(format!("the file named by {key} is empty")));
        }
        Ok(Self(value))
    }

    /// The value, for building a request header. Never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// `text`, a URL or what was meant as one, with everything between its scheme and its last
/// `@` (user information, which may hold a password) shown as `***`: for the messages about
/// a URL that did not parse, which cannot ask the parser where its password is.
pub(crate) fn redacted(text: &str) -> Cow<'_, str> {
    let start = text.find("://").map_or(0, |i| i + 3);
    match text[start..].rfind('@') {
        Some(at) => Cow::Owned(format!("{}***{}", &text[..start], &text[start + at..])),
        None => Cow::Borrowed(text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_that_does_not_parse_is_shown_without_its_password() {
        for text in [
            "[local]\npath = \"x\"\n[redis]\nurl = \"redis://:S3cr3t-pw@127.0.0.1:36155:99/0\"\n",
            "[local]\npath = \"x\"\n[redis]\nurl = \"rediss://:S3cr3t-pw@[::1/0\"\n",
            "[gitea]\nurl = \"http://u:S3cr3t-pw@forge.test:99999/\"\norganization = \"o\"\n",
        ] {
            let refused = Config::parse(text, "config.toml", None)
                .unwrap_err()
                .to_string();
            assert!(!refused.contains("S3cr3t"), "{refused}");
            assert!(refused.contains("***@"), "{refused}");
        }
    }

    fn gitea(name: &str, extra: &str) -> String {
        format!("[[gitea]]\nname = {name:?}\nurl = \"http://forge.test/\"\norganization = \"o\"\n{extra}")
    }

    fn oci(name: &str, extra: &str) -> String {
        format!(
            "[[oci]]\nname = {name:?}\nregistry = \"registry.test\"\nnamespace = \"x\"\n{extra}"
        )
    }

    fn order(text: &str) -> Vec<String> {
        let config = Config::parse(text, "config.toml", None).unwrap();
        let names = config
            .backends()
            .iter()
            .map(|s| s.name().to_owned())
            .collect();
        names
    }

    fn refusal(text: &str) -> String {
        Config::parse(text, "config.toml", None)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn single_tables_are_named_after_their_kind_in_the_default_order() {
        let text = "[local]\npath = \".\"\n[oci]\nregistry = \"r.test\"\nnamespace = \"x\"\n\
                    [gitea]\nurl = \"http://forge.test/\"\norganization = \"o\"\n";
        assert_eq!(order(text), ["gitea", "oci", "local"]);
    }

    #[test]
    fn arrays_of_tables_keep_file_order_within_a_kind_and_mix_with_single_tables() {
        let text = format!(
            "{}{}{}[local]\npath = \".\"\n",
            gitea("public", ""),
            gitea("private", ""),
            oci("eu", "")
        );
        assert_eq!(order(&text), ["public", "private", "eu", "local"]);
    }

    #[test]
    fn priority_orders_across_kinds_lower_first() {
        let text = format!(
            "{}{}{}[[local]]\nname = \"disk\"\npath = \".\"\npriority = 0\n",
            gitea("public", "priority = 30\n"),
            gitea("private", "priority = 10\n"),
            oci("eu", "priority = 20\n"),
        );
        assert_eq!(order(&text), ["disk", "private", "eu", "public"]);
        // Without a priority, an instance ranks by its position in the default order.
        let text = format!(
            "{}{}[local]\npath = \".\"\npriority = 0\n",
            gitea("a", ""),
            gitea("b", "")
        );
        assert_eq!(order(&text), ["a", "local", "b"]);
    }

    #[test]
    fn names_are_unique_valid_and_not_another_kind() {
        let duplicate = refusal(&format!("{}{}", gitea("forge", ""), oci("forge", "")));
        assert_eq!(
            duplicate,
            "config.toml: [oci] name: 'forge' is already the name of [gitea]; give each backend \
             its own name"
        );
        let unnamed = refusal(&format!(
            "{}[[gitea]]\nurl = \"http://forge.test/\"\norganization = \"o\"\n",
            gitea("gitea", "")
        ));
        assert!(
            unnamed
                .starts_with("config.toml: gitea[1].name: 'gitea' is already the name of gitea[0]"),
            "{unnamed}"
        );
        for bad in ["Forge", "a_b", "", &"a".repeat(33)] {
            let text = format!("{}{}", gitea("ok", ""), gitea(bad, ""));
            let refused = refusal(&text);
            assert!(
                refused.starts_with(&format!(
                    "config.toml: gitea[1].name: '{bad}' is not a valid name"
                )),
                "{refused}"
            );
        }
        let kind = refusal(&gitea("oci", ""));
        assert!(
            kind.starts_with("config.toml: [gitea] name: 'oci' is the name of the kind [oci]"),
            "{kind}"
        );
        assert_eq!(order(&gitea("gitea", "")), ["gitea"]);
    }

    #[test]
    fn errors_name_the_file_the_table_index_and_the_key() {
        let checked = refusal(&format!(
            "{}{}",
            gitea("a", ""),
            gitea("b", "max_concurrency = 0\n")
        ));
        assert_eq!(
            checked,
            "config.toml: gitea[1].max_concurrency: must be a whole number above 0"
        );
        let parsed = refusal(&format!(
            "{}{}",
            oci("a", ""),
            oci("b", "timeout_seconds = \"x\"\n")
        ));
        assert!(parsed.starts_with("config.toml: "), "{parsed}");
        assert!(parsed.contains("oci[1]: invalid type"), "{parsed}");
        assert!(parsed.contains("timeout_seconds"), "{parsed}");
        let missing = refusal(&format!(
            "{}[[oci]]\nname = \"b\"\nregistry = \"r\"\n",
            oci("a", "")
        ));
        assert!(
            missing.contains("oci[1]: missing field `namespace`"),
            "{missing}"
        );
        let single = refusal("[gitea]\nurl = \"ftp://x/\"\norganization = \"o\"\n");
        assert_eq!(
            single,
            "config.toml: [gitea] url: the scheme must be http or https"
        );
    }

    #[test]
    fn one_instance_per_kind_takes_webhook_deliveries() {
        let hook = "webhook_secret_path = \"secret\"\n";
        let refused = refusal(&format!("{}{}", gitea("a", hook), gitea("b", hook)));
        assert!(
            refused.contains("gitea: webhook_secret_path is set on 2"),
            "{refused}"
        );
        assert!(Config::parse(
            &format!("{}{}", gitea("a", hook), gitea("b", "")),
            "c",
            None
        )
        .is_ok());
    }
}
