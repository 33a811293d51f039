//! The ONE function that composes the service: every layer, outermost first, each with why it
//! sits where it sits. Read it top to bottom to know what a request goes through.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderName, HeaderValue, CONTENT_TYPE, IF_NONE_MATCH, IF_RANGE, RANGE};
use http::{Method, Request, Response};
use tower::util::BoxCloneSyncService;
use tower::ServiceBuilder;
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::api::exposition::Exposition;
use crate::api::representation::Renderings;
use crate::api::{self, HealthProbe, RouteTable, Router, Shared};
use crate::body::Body;
use crate::config::{Config, ServerConfig};
use crate::hooks::Keys;
use crate::invalidation::Invalidator;
use crate::middleware::backend_metrics::BackendMetricsLayer;
use crate::middleware::breaker::{BreakerLayer, Gate};
use crate::middleware::cache::{CacheLayer, Caches};
use crate::middleware::catch_panic::CatchPanicLayer;
use crate::middleware::compression::{self, PrecompressedLayer};
use crate::middleware::conditional::ConditionalLayer;
use crate::middleware::cors;
use crate::middleware::downloads::DownloadsLayer;
use crate::middleware::load_shed::LoadShedLayer;
use crate::middleware::metrics::HttpMetricsLayer;
use crate::middleware::normalise::NormalisePathLayer;
use crate::middleware::preflight::PreflightOnlyLayer;
use crate::middleware::rate_limit::{Clients, RateLimitLayer};
use crate::middleware::request_id::RequestIdLayer;
use crate::middleware::rescue::RescueLayer;
use crate::middleware::timeout::TimeoutLayer;
use crate::middleware::trace::TraceLayer;
use crate::redis::bus::RedisBus;
use crate::redis::cache::SharedCacheLayer;
use crate::redis::quota::RedisQuota;
use crate::redis::Redis;
use crate::registry::{BackendService, Instance, Merge, Registry, RegistryError};
use crate::telemetry;

/// Memory for rendered and compressed JSON answers (see `api::representation`).
const RENDERINGS_MAX_BYTES: u64 = 64 * 1024 * 1024;

/// The whole application as hyper is given it: infallible, cloneable, shareable.
pub type HttpService = BoxCloneSyncService<Request<Body>, Response<Body>, Infallible>;

/// Builds the application around the given backends (instances, or kinds standing for their
/// single instance, in precedence order), standing alone and without the webhook and purge
/// secrets: those routes answer 404 and `[redis]` is not used (see [`app_with`]).
pub fn app(config: &Config, backends: Vec<(impl Into<Instance>, BackendService)>) -> HttpService {
    app_with(config, backends, Keys::default(), None)
}

/// Builds the application around the given backends (in precedence order), with the secrets
/// of the webhook and purge routes read at start, sharing `redis` with the other replicas
/// when given (as `[redis]` switches each part on).
pub fn app_with(
    config: &Config,
    backends: Vec<(impl Into<Instance>, BackendService)>,
    hooks: Keys,
    redis: Option<Redis>,
) -> HttpService {
    let shared = |enabled: fn(&crate::config::RedisConfig) -> bool| {
        redis.clone().filter(|r| enabled(r.config()))
    };
    let backends: Vec<(Instance, BackendService)> = backends
        .into_iter()
        .map(|(instance, backend)| (instance.into(), backend))
        .collect();
    // First, so the counters layers register at construction go to the process recorder.
    let metrics = telemetry::prometheus();
    // One circuit breaker per backend instance, read by the health endpoint too.
    let gates: Vec<Gate> = backends
        .iter()
        .map(|(instance, _)| Gate::new(instance.clone(), &config.circuit_breaker))
        .collect();
    let backends = backends
        .into_iter()
        .zip(&gates)
        .map(|((instance, backend), gate)| {
            let named = instance.clone();
            let backend = ServiceBuilder::new()
                // Above everything that fails per instance, the breaker included: a backend
                // fault names the instance it came from when its name is not its kind's
                // ("gitea backend 'forge-b' unavailable: …"); the backends only know their kind.
                .map_err(move |e: RegistryError| e.with_instance(&named))
                // The circuit breaker, below the merge: a backend that keeps failing is
                // not called for a cool-down, so the merge gets its error at once and serves
                // the others' answers (and the cache above a stale one).
                .layer(BreakerLayer::new(gate.clone()))
                // Per-backend metrics below the breaker, so each backend's calls, outcomes,
                // latency and download bytes are what that backend answered, and calls the
                // breaker refused are not counted as calls.
                .layer(BackendMetricsLayer::new(instance.clone()))
                .service(backend);
            (instance, BackendService::new(backend))
        })
        .collect();
    // The registry: what the router asks.
    let merge = Merge::new(backends);
    let sources = merge.sources();
    let caches = Caches::new(&config.cache, config.server.request_timeout());
    let shared_cache = shared(|r| r.enable_cache)
        .map(|redis| SharedCacheLayer::new(redis, &config.cache, config.server.request_timeout()));
    let registry = ServiceBuilder::new()
        // List, metadata and versions caches with single-flight, negative caching,
        // stale-while-revalidate, stale-if-error and a backoff per failing key; above the
        // merge so one cached answer serves every backend combination.
        .layer(CacheLayer::new(caches.clone()))
        // The shared cache level and cluster-wide single-flight: under the in-process cache,
        // so only its misses and refreshes reach Redis and a hit costs no network; above the
        // merge, so one shared answer stands for every backend combination, as above.
        .option_layer(shared_cache.clone())
        // Fans out over the backends (each measured, see above) and merges their answers.
        .service(merge);
    // The handlers ask it through a shared reference; the probes and the refreshes ahead
    // hold it as a service.
    let asked = Registry::new(registry.clone());
    let registry = BackendService::new(registry);
    // Drops cached answers when webhooks or a purge say what changed; refreshes an invalidated
    // extension ahead through the cached registry (so the refresh is single-flight with
    // clients' requests, and cluster-wide through the shared cache's lock) when `[cache]
    // refresh_on_invalidate`. The shared answers of what changed are dropped first (by this
    // replica only), so no replica takes the old answer back from Redis.
    let invalidator = Invalidator::new(caches.clone());
    let invalidator = match shared_cache {
        Some(layer) => invalidator.with_shared(Arc::new(layer)),
        None => invalidator,
    };
    let invalidator = if config.cache.refresh_on_invalidate {
        invalidator.refreshing_ahead(registry.clone())
    } else {
        invalidator
    };

    // Invalidations reach the other replicas over the bus, and theirs reach this one's
    // caches.
    let invalidator = match shared(|r| r.enable_invalidation) {
        Some(redis) => {
            let bus = RedisBus::new(redis);
            bus.subscribe(invalidator.clone());
            invalidator.with_bus(Arc::new(bus))
        }
        None => invalidator,
    };
    // The webhook and purge routes exist only with their secrets.
    let existing = api::Existing::new(&hooks);
    let router = Router::new(Shared {
        routes: RouteTable::new(),
        openapi: api::openapi::rendered(&sources),
        health: HealthProbe::new(
            registry.clone(),
            sources.clone(),
            gates,
            config.server.probe_interval(),
            redis.clone(),
        ),
        registry: asked,
        sources,
        metrics: Exposition::new(metrics),
        invalidator,
        caches,
        renderings: Renderings::new(
            RENDERINGS_MAX_BYTES,
            Duration::from_secs(config.cache.ttl_seconds),
        ),
        cache_control: api::cache_control(Duration::from_secs(config.cache.ttl_seconds)),
        hooks,
        existing,
        bodies: Default::default(),
    });

    let cors = if config.server.enable_cors {
        cors::CorsLayer::new(cors_rules(&config.server), any_origin(&config.server))
    } else {
        cors::CorsLayer::off()
    };
    let downloads = DownloadsLayer::new(config.server.max_concurrent_downloads);
    let load_shed = LoadShedLayer::new(
        config.server.max_concurrent_requests,
        &config.rate_limit.exempt_paths,
    );
    let (rate_limit, downloads, load_shed) = if config.rate_limit.enabled {
        // One reading of who a request comes from, for the quota and the shares of downloads
        // and requests in progress alike; with rate limiting off, clients are not told apart
        // for any of them.
        let clients = Arc::new(Clients::new(&config.rate_limit));
        let quota = shared(|r| r.enable_rate_limit)
            .map(|redis| Arc::new(RedisQuota::new(redis, &config.rate_limit)) as _);
        (
            RateLimitLayer::shared(&config.rate_limit, quota, clients.clone()),
            downloads.per_client(config.server.max_downloads_per_client, clients.clone()),
            load_shed.per_client(config.server.max_requests_per_client, clients),
        )
    } else {
        (RateLimitLayer::off(), downloads, load_shed)
    };
    let service = ServiceBuilder::new()
        // Outermost: every response, errors and 429s included, carries the request id, and the
        // id exists before the trace span is opened so the span can record it. A client's id
        // is kept only when short and safe to echo and log; otherwise one is generated.
        .layer(RequestIdLayer::default())
        // One span and one log line per request, with the final status of whatever answered.
        .layer(TraceLayer)
        // Below the log line, which shows the path as sent; above every layer that tells routes
        // apart by the path, so all of them and the router read `%76ersions` as `versions`.
        .layer(NormalisePathLayer)
        // HTTP metrics: here, so they see every final status, 429s, 503s, 504s and CORS
        // preflights included, each labelled by route template.
        .layer(HttpMetricsLayer::new())
        // Right above CORS, which takes every OPTIONS for a preflight: an OPTIONS that is not
        // one gets 405 with Allow, like any other method the read-only API does not answer,
        // and any OPTIONS on a route that does not exist here 404.
        .layer(PreflightOnlyLayer::new(existing))
        // CORS above the error rescue and the rate limit, so 429s, 503s, 504s and 500s carry
        // CORS headers too and browsers can read them; preflights are answered here, before
        // the rate limit and any work. With any origin allowed, simple answers get CORS
        // headers made once (see `middleware::cors`).
        .layer(cors)
        // Below this, services fail with BoxError; above it, the service is Infallible and
        // every failure is a JSON error response.
        .layer(RescueLayer)
        // A panic in a handler becomes a 500 JSON answer instead of a dropped connection.
        .layer(CatchPanicLayer)
        // Compression: below CORS so CORS headers are added to the final response either way,
        // above the rate limit so 429 bodies get no special path. Rendered answers bring their
        // memoised compressed form (`PrecompressedLayer`), the metrics text too; tower-http
        // compresses the rest (errors, health), never downloads, and is passed by when the client
        // takes identity. Both see only the coding negotiated once (by the first), so they
        // agree, and a client refusing every coding gets identity, never 406. Switched off
        // inside the layers, like CORS and the rate limit: an `Either` would name the stack
        // below twice, and the box that kept its type in check cost every request.
        .layer(compression::streaming(config.server.enable_compression))
        .layer(PrecompressedLayer::new(config.server.enable_compression))
        // Refuses clients over their quota with 429 before any work is done for them; above
        // the concurrency limit so a flooding client cannot take the others' slots. With
        // Redis, the quota is the cluster's (each replica's own refusing first).
        .layer(rate_limit)
        // At most `max_concurrent_downloads` artifact bodies streaming, and (with rate
        // limiting on) at most `max_downloads_per_client` of them one client's, each held from
        // here until its body is dropped (the concurrency limit below lets go at the response
        // head): past them 503 or 429 at once, before any backend is asked. Below the rate
        // limit so a flooding client is refused there first.
        .layer(downloads)
        // At the concurrency limit, answers 503 at once (load shedding) rather than queueing
        // behind slow backends; the limit counts requests until their response head. With
        // rate limiting on, one client past `max_requests_per_client` of them gets 429 at
        // once, so a few clients with slow requests cannot fill it. The exempt paths (probes,
        // scrapes) answer without backend work and are not counted, so polling them can never
        // fill the service.
        .layer(load_shed)
        // Bounds the time to the response head (not the streaming of a download's body): 504.
        // Its timer is made only for a request that waits (see `middleware::timeout`).
        .layer(TimeoutLayer::new(config.server.request_timeout()))
        // Conditional GET right above the router: it sees the identity ETag of every rendered
        // answer and turns a match into a 304 before compression or anything else touches it.
        .layer(ConditionalLayer)
        .service(router);
    BoxCloneSyncService::new(service)
}

/// Whether `cors_allowed_origins` allows every origin: empty, or `*` among them.
fn any_origin(server: &ServerConfig) -> bool {
    let origins = &server.cors_allowed_origins;
    origins.is_empty() || origins.iter().any(|o| o == "*")
}

/// CORS for a public API: GET and HEAD, and POST for the batch resolve and the hooks (with a
/// JSON `Content-Type`, which makes a browser preflight), from the configured origins (any by
/// default), no credentials; the request headers of revalidation and resumed downloads, and the
/// response headers clients need readable.
fn cors_rules(server: &ServerConfig) -> CorsLayer {
    let allow_origin = if any_origin(server) {
        AllowOrigin::any()
    } else {
        let origins = &server.cors_allowed_origins;
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    CorsLayer::new()
        .allow_origin(allow_origin)
        .allow_methods([Method::GET, Method::HEAD, Method::POST])
        .allow_headers([
            IF_NONE_MATCH,
            HeaderName::from_static("x-request-id"),
            CONTENT_TYPE,
            RANGE,
            IF_RANGE,
        ])
        .expose_headers(
            [
                "x-total-count",
                "etag",
                "retry-after",
                "ratelimit-limit",
                "ratelimit-remaining",
                "ratelimit-reset",
                "x-request-id",
                "cache-status",
                "content-disposition",
                "repr-digest",
                "content-range",
                "accept-ranges",
            ]
            .map(HeaderName::from_static),
        )
        // Browsers cache the preflight answer (Chromium caps this at two hours).
        .max_age(Duration::from_secs(86_400))
}
