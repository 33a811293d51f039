//! extension-registry: one REST API over provisioning extensions kept in Gitea/Forgejo
//! releases, OCI registries and local directories.
//!
//! Module map:
//! - [`config`]: the TOML configuration, one struct per section, validated with clear errors.
//! - [`server`]: the accept loop (HTTP/1.1 and h2c), graceful shutdown, and the connection
//!   limits: connection cap (held within the open-file limit, raised at start), header and
//!   keep-alive timeouts, the send timeout on bodies.
//! - [`stack`]: the one function composing every layer around the router and the backends.
//! - [`api`]: the HTTP edge: router, request validation (`Range` of downloads in
//!   [`api::range`]), handlers, health probes, the metrics exposition rendered within a
//!   budget ([`api::exposition`]), and the OpenAPI 3.1 document of all of it (served at
//!   `/api/v1/openapi.json`).
//! - [`middleware`]: the project's own tower layers, and the slots of recent values in front
//!   of the caches.
//! - [`error`]: the API error (status, code, message) and the one mapping from domain errors.
//! - [`body`]: the one response body type.
//! - [`registry`]: the domain (extensions, names, version ordering, version constraints in
//!   [`registry::constraint`], search), the request/response vocabulary every backend
//!   speaks (downloads whole or one byte range), and the service merging backends.
//! - [`backend`]: one tower service per backend kind (Gitea, OCI, GitHub, local directory);
//!   [`backend::gitea`] reads extensions from Gitea/Forgejo releases, [`backend::oci`] from
//!   OCI registries (catalog, tags, manifest annotations, blobs), [`backend::github`] from
//!   GitHub releases (rate limits, conditional requests); [`backend::forge`] holds the naming,
//!   artifact and checksum rules the two forges share; [`backend::http`] what the HTTP
//!   backends share (one client, redirects checked hop by hop); [`backend::direct`] a large
//!   download's own connection, driven by the task sending the answer.
//! - [`invalidation`]: the one way to drop cached answers for a changed extension, type or
//!   everything, on this replica and (through a bus) on the others.
//! - [`hooks`]: the secrets of the webhook and purge routes, checking deliveries against them
//!   (HMAC-SHA256, bearer tokens, constant time) and reading Gitea/Forgejo webhooks and CNCF
//!   registry notifications into the extensions they change; the routes are in `api`.
//! - [`redis`]: Redis (or Valkey) shared by several replicas: the connection and its health,
//!   the shared cache level with cluster-wide single-flight ([`redis::cache`]), the quota
//!   shared by the replicas ([`redis::quota`]), the invalidation bus ([`redis::bus`]). Never
//!   needed to answer.
//! - [`telemetry`]: logging, per-request spans, the Prometheus recorder.

pub mod api;
pub mod backend;
pub mod body;
pub mod config;
pub mod error;
pub mod hooks;
pub mod invalidation;
pub mod middleware;
pub mod redis;
pub mod registry;
pub mod server;
pub mod stack;
pub mod telemetry;

/// The error type of services below the error-rescue layer.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Builds the application for a configuration: its backends, the webhook and purge secrets
/// (read here, at start) and Redis (connected in the background), then the stack around them.
/// Call within a Tokio runtime when `[redis]` is set.
pub fn build(config: &config::Config) -> Result<stack::HttpService, config::ConfigError> {
    // First, so what is reported while connecting (Redis counted unavailable) is kept.
    telemetry::prometheus();
    let backends = backend::from_config(config)?;
    let redis = config
        .redis
        .as_ref()
        .map(redis::Redis::connect)
        .transpose()?;
    Ok(stack::app_with(
        config,
        backends,
        hooks::Keys::load(config)?,
        redis,
    ))
}
