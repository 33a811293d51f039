//! The cache in front of the merged backends: listings (keyed like `list:{type}:{source}`),
//! single extensions (`{type}/{name}`, with the source when pinned) and their versions
//! (`{type}/{name}/versions`). Values are `Arc`s, so a hit is a pointer copy.
//!
//! - Concurrent misses for one key make one backend call: the refresh runs under moka's
//!   per-key compute lock, and whoever waited behind it takes its outcome.
//! - "Not found" is remembered for `negative_ttl_seconds`.
//! - Stale-if-error: an answer is kept `stale_if_error_seconds` past its TTL; when a refresh
//!   fails with a backend fault, the old answer is served as `BackendResponse::Stale` (logged
//!   and counted in `stale_served_total`). With nothing to fall back on, the error stands.
//! - Downloads and health probes pass through: artifact bytes always stream.
//!
//! Freshness is judged on `tokio::time::Instant`, so tests drive it with a paused clock;
//! moka's own expiry only frees the memory of entries that can no longer serve.

use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use moka::future::Cache as Moka;
use moka::ops::compute::Op;
use serde::Serialize;
use tokio::time::Instant;
use tower::{Layer, Service};

use crate::config::CacheConfig;
use crate::registry::{
    BackendFuture, BackendRequest, BackendResponse, Extension, ExtensionKey, ListFilter,
    RegistryError, Source, Version,
};

/// Key of the metadata and versions caches: the extension, and the backend when pinned.
type ExtensionCacheKey = (ExtensionKey, Option<Source>);

/// A cacheable answer, cheap to clone.
#[derive(Clone, Debug)]
enum Value {
    List(Arc<Vec<Extension>>),
    Extension(Arc<Extension>),
    Versions(Arc<Vec<Version>>),
}

impl Value {
    fn from_response(response: BackendResponse) -> Result<Self, RegistryError> {
        match response {
            BackendResponse::List(l) => Ok(Self::List(l)),
            BackendResponse::Extension(e) => Ok(Self::Extension(e)),
            BackendResponse::Versions(v) => Ok(Self::Versions(v)),
            _ => Err(RegistryError::Internal(
                "backend answered a cacheable request with an uncacheable answer".into(),
            )),
        }
    }

    fn response(&self) -> BackendResponse {
        match self {
            Self::List(l) => BackendResponse::List(l.clone()),
            Self::Extension(e) => BackendResponse::Extension(e.clone()),
            Self::Versions(v) => BackendResponse::Versions(v.clone()),
        }
    }
}

/// What the cache knows about one key.
#[derive(Debug)]
struct Entry {
    /// The last answer the backends gave (a value, or "not found") and when; `None` when
    /// every attempt so far failed.
    answer: Option<(Result<Value, RegistryError>, Instant)>,
    /// Why the latest attempt failed, if it did; cleared by the next answer.
    failure: Option<RegistryError>,
}

/// The time rules, from `[cache]`.
#[derive(Clone, Copy, Debug)]
struct Policy {
    /// How long an answer is fresh.
    ttl: Duration,
    /// How long a "not found" is fresh.
    negative_ttl: Duration,
    /// How long past `ttl` an answer may still stand in for failing backends.
    stale_if_error: Duration,
}

impl Policy {
    fn is_fresh(&self, entry: &Entry, now: Instant) -> bool {
        match (&entry.answer, &entry.failure) {
            (Some((Ok(_), at)), None) => now < *at + self.ttl,
            (Some((Err(_), at)), None) => now < *at + self.negative_ttl,
            _ => false,
        }
    }

    /// How long moka keeps an entry: as long as it can serve, fresh or stale.
    fn keep(&self, entry: &Entry) -> Duration {
        match &entry.answer {
            Some((Ok(_), _)) => self.ttl + self.stale_if_error,
            Some((Err(_), _)) => self.negative_ttl,
            // Only failures so far: kept so the requests of the same wave share them; the
            // next attempt replaces it.
            None => self.ttl,
        }
    }

    /// The answer an entry gives at `now`.
    fn resolve(&self, entry: &Entry, now: Instant) -> Result<BackendResponse, RegistryError> {
        match (&entry.failure, &entry.answer) {
            (None, Some((Ok(value), _))) => Ok(value.response()),
            (None, Some((Err(not_found), _))) => Err(not_found.clone()),
            (Some(error), Some((Ok(value), at)))
                if error.is_backend_fault() && now < *at + self.ttl + self.stale_if_error =>
            {
                Ok(BackendResponse::Stale {
                    response: Box::new(value.response()),
                    error: error.clone(),
                })
            }
            (Some(error), _) => Err(error.clone()),
            (None, None) => Err(RegistryError::Internal(
                "cache entry without answer or failure".into(),
            )),
        }
    }
}

/// Frees entries once they can no longer serve.
struct Expiry(Policy);

impl<K> moka::Expiry<K, Arc<Entry>> for Expiry {
    fn expire_after_create(
        &self,
        _: &K,
        entry: &Arc<Entry>,
        _: std::time::Instant,
    ) -> Option<Duration> {
        Some(self.0.keep(entry))
    }

    fn expire_after_update(
        &self,
        _: &K,
        entry: &Arc<Entry>,
        _: std::time::Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(self.0.keep(entry))
    }
}

/// One of the three caches, with its counters.
struct Store<K> {
    /// The `cache` label of its metrics and its name in logs.
    name: &'static str,
    /// Switched on in `[cache]`; a switched-off store stays empty and requests pass by it.
    enabled: bool,
    entries: Moka<K, Arc<Entry>>,
    /// Counted here too, for `/cache/stats`, as the Prometheus recorder may be absent.
    hits: AtomicU64,
    misses: AtomicU64,
    /// Registered once, so counting is an atomic add.
    hits_total: metrics::Counter,
    misses_total: metrics::Counter,
    stale_total: metrics::Counter,
}

impl<K: Hash + Eq + Send + Sync + 'static> Store<K> {
    fn new(name: &'static str, enabled: bool, capacity: u64, policy: Policy) -> Self {
        Self {
            name,
            enabled,
            entries: Moka::builder()
                .max_capacity(capacity)
                .expire_after(Expiry(policy))
                .build(),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            hits_total: metrics::counter!("cache_hits_total", "cache" => name),
            misses_total: metrics::counter!("cache_misses_total", "cache" => name),
            stale_total: metrics::counter!("stale_served_total", "cache" => name),
        }
    }

    async fn entry_count(&self) -> u64 {
        // Counts are eventually consistent; settle pending inserts and expiries first.
        self.entries.run_pending_tasks().await;
        self.entries.entry_count()
    }
}

/// The three caches, shared by the cache layer and the `/cache/stats` handler.
#[derive(Clone)]
pub struct Caches(Arc<Stores>);

struct Stores {
    list: Store<ListFilter>,
    metadata: Store<ExtensionCacheKey>,
    versions: Store<ExtensionCacheKey>,
    policy: Policy,
}

impl Caches {
    /// Builds the caches `[cache]` asks for. Metrics counters are registered here, so the
    /// recorder must be installed before.
    pub fn new(config: &CacheConfig) -> Self {
        let policy = Policy {
            ttl: Duration::from_secs(config.ttl_seconds),
            negative_ttl: Duration::from_secs(config.negative_ttl_seconds),
            stale_if_error: Duration::from_secs(config.stale_if_error_seconds),
        };
        let capacity = config.capacity;
        let (list, metadata) = (config.enable_list_cache, config.enable_metadata_cache);
        Self(Arc::new(Stores {
            list: Store::new("list", list, capacity, policy),
            metadata: Store::new("metadata", metadata, capacity, policy),
            // Versions are metadata too: one switch for both.
            versions: Store::new("versions", metadata, capacity, policy),
            policy,
        }))
    }

    /// Entry counts, hits, misses and hit ratios, for `/api/v1/cache/stats`.
    pub async fn stats(&self) -> CacheStats {
        let stores = &self.0;
        let list = Counts::of(&stores.list).await;
        let metadata = Counts::of(&stores.metadata).await;
        let versions = Counts::of(&stores.versions).await;
        CacheStats {
            list_entries: list.entries,
            metadata_entries: metadata.entries,
            version_entries: versions.entries,
            total_entries: list.entries + metadata.entries + versions.entries,
            list_hits: list.hits,
            list_misses: list.misses,
            list_hit_ratio: list.ratio(),
            metadata_hits: metadata.hits,
            metadata_misses: metadata.misses,
            metadata_hit_ratio: metadata.ratio(),
            version_hits: versions.hits,
            version_misses: versions.misses,
            version_hit_ratio: versions.ratio(),
        }
    }
}

struct Counts {
    entries: u64,
    hits: u64,
    misses: u64,
}

impl Counts {
    async fn of<K: Hash + Eq + Send + Sync + 'static>(store: &Store<K>) -> Self {
        Self {
            entries: store.entry_count().await,
            hits: store.hits.load(Ordering::Relaxed),
            misses: store.misses.load(Ordering::Relaxed),
        }
    }

    fn ratio(&self) -> f64 {
        match self.hits + self.misses {
            0 => 0.0,
            n => self.hits as f64 / n as f64,
        }
    }
}

/// The body of `/api/v1/cache/stats`. Entries kept for stale-if-error count too.
#[derive(Debug, Serialize)]
pub struct CacheStats {
    pub list_entries: u64,
    pub metadata_entries: u64,
    pub version_entries: u64,
    pub total_entries: u64,
    pub list_hits: u64,
    pub list_misses: u64,
    /// Hits over lookups since start; 0 before the first lookup.
    pub list_hit_ratio: f64,
    pub metadata_hits: u64,
    pub metadata_misses: u64,
    pub metadata_hit_ratio: f64,
    pub version_hits: u64,
    pub version_misses: u64,
    pub version_hit_ratio: f64,
}

/// Puts the caches in front of a registry service.
#[derive(Clone)]
pub struct CacheLayer {
    caches: Caches,
}

impl CacheLayer {
    pub fn new(caches: Caches) -> Self {
        Self { caches }
    }
}

impl<S> Layer<S> for CacheLayer {
    type Service = Cache<S>;

    fn layer(&self, inner: S) -> Cache<S> {
        Cache {
            inner,
            caches: self.caches.clone(),
        }
    }
}

/// See the module documentation.
#[derive(Clone)]
pub struct Cache<S> {
    inner: S,
    caches: Caches,
}

impl<S> Service<BackendRequest> for Cache<S>
where
    S: Service<BackendRequest, Response = BackendResponse, Error = RegistryError>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    type Response = BackendResponse;
    type Error = RegistryError;
    type Future = BackendFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), RegistryError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: BackendRequest) -> BackendFuture {
        let stores = &self.caches.0;
        let key = match &req {
            BackendRequest::List(filter) if stores.list.enabled => Key::List(filter.clone()),
            BackendRequest::Get { key, source } if stores.metadata.enabled => {
                Key::Metadata((key.clone(), *source))
            }
            BackendRequest::Versions { key, source } if stores.versions.enabled => {
                Key::Versions((key.clone(), *source))
            }
            _ => return Box::pin(self.inner.call(req)),
        };
        // The ready service goes with this call; the clone left behind gets its own
        // `poll_ready`.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let caches = self.caches.clone();
        Box::pin(async move {
            let stores = &caches.0;
            let policy = stores.policy;
            match key {
                Key::List(k) => lookup(&stores.list, k, policy, inner, req).await,
                Key::Metadata(k) => lookup(&stores.metadata, k, policy, inner, req).await,
                Key::Versions(k) => lookup(&stores.versions, k, policy, inner, req).await,
            }
        })
    }
}

/// Which cache a request is answered from, and its key there.
enum Key {
    List(ListFilter),
    Metadata(ExtensionCacheKey),
    Versions(ExtensionCacheKey),
}

/// Answers `req` from `store`, asking `inner` when the entry is missing or not fresh.
async fn lookup<K, S>(
    store: &Store<K>,
    key: K,
    policy: Policy,
    mut inner: S,
    req: BackendRequest,
) -> Result<BackendResponse, RegistryError>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    S: Service<BackendRequest, Response = BackendResponse, Error = RegistryError>,
{
    let seen = store.entries.get(&key).await;
    if let Some(entry) = &seen {
        let now = Instant::now();
        if policy.is_fresh(entry, now) {
            store.hits.fetch_add(1, Ordering::Relaxed);
            store.hits_total.increment(1);
            return policy.resolve(entry, now);
        }
    }
    store.misses.fetch_add(1, Ordering::Relaxed);
    store.misses_total.increment(1);

    let computed = store
        .entries
        .entry(key)
        .and_compute_with(|current| async move {
            let current = current.map(|e| e.into_value());
            // The entry changed while this request waited for the key's lock: another
            // request asked the backends, and its outcome is this request's too. (`seen` is
            // held, so its address cannot be reused by a newer entry.)
            let changed = match (&current, &seen) {
                (Some(current), Some(before)) => !Arc::ptr_eq(current, before),
                (Some(_), None) => true,
                (None, _) => false,
            };
            if changed {
                return Op::Nop;
            }
            // A degraded answer (some backend failed, the others answered) counts as a
            // failure: the complete answer kept from before is served stale in its place, and
            // only with nothing kept does the degraded one stand, never as fresh.
            let (result, degraded) = match inner.call(req).await {
                Ok(BackendResponse::Stale { response, error }) => {
                    (Value::from_response(*response), Some(error))
                }
                other => (other.and_then(Value::from_response), None),
            };
            let now = Instant::now();
            let kept = current.and_then(|c| match &c.answer {
                Some((Ok(value), at)) => Some((Ok(value.clone()), *at)),
                _ => None,
            });
            let entry = match (result, degraded) {
                (Ok(value), None) => Entry {
                    answer: Some((Ok(value), now)),
                    failure: None,
                },
                (Ok(value), Some(e)) => Entry {
                    answer: kept.or(Some((Ok(value), now))),
                    failure: Some(e),
                },
                (Err(e), _) if e.is_not_found() => Entry {
                    answer: Some((Err(e), now)),
                    failure: None,
                },
                (Err(e), _) => Entry {
                    answer: kept,
                    failure: Some(e),
                },
            };
            Op::Put(Arc::new(entry))
        })
        .await;
    let Some(entry) = computed.into_entry() else {
        return Err(RegistryError::Internal(
            "cache refresh left no entry".into(),
        ));
    };
    let response = policy.resolve(entry.value(), Instant::now())?;
    if let Some(error) = response.stale_error() {
        tracing::warn!(cache = store.name, %error, "backend failed; serving the stale answer");
        store.stale_total.increment(1);
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use futures_util::future::join_all;
    use tower::ServiceExt;

    use super::*;
    use crate::registry::{ExtensionName, ExtensionType, Timestamp};

    const TTL: Duration = Duration::from_secs(300);

    fn config() -> CacheConfig {
        CacheConfig {
            capacity: 100,
            ttl_seconds: TTL.as_secs(),
            ..CacheConfig::default()
        }
    }

    fn extension(name: &str) -> Extension {
        Extension {
            name: name.into(),
            ty: ExtensionType::Provider,
            version: "1.0.0".into(),
            description: String::new(),
            author: String::new(),
            repository: String::new(),
            source: Source::Local,
            published_at: Timestamp::unix_epoch(),
            download_url: String::new(),
            size: 0,
            checksum: None,
            tags: Vec::new(),
        }
    }

    fn get(name: &str) -> BackendRequest {
        BackendRequest::Get {
            key: ExtensionKey {
                ty: ExtensionType::Provider,
                name: ExtensionName::parse(name).unwrap(),
            },
            source: None,
        }
    }

    /// A backend whose answers the test switches, counting its calls.
    #[derive(Clone)]
    struct Backend {
        calls: Arc<AtomicUsize>,
        /// `Some(error)`: fail with it; `None`: answer.
        failing: Arc<std::sync::Mutex<Option<RegistryError>>>,
    }

    impl Backend {
        fn new() -> Self {
            Self {
                calls: Arc::default(),
                failing: Arc::default(),
            }
        }

        fn fail_with(&self, error: Option<RegistryError>) {
            *self.failing.lock().unwrap() = error;
        }

        fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }

        fn service(
            &self,
        ) -> Cache<
            impl Service<
                    BackendRequest,
                    Response = BackendResponse,
                    Error = RegistryError,
                    Future = impl Send,
                > + Clone
                + Send
                + 'static,
        > {
            let this = self.clone();
            let backend = tower::service_fn(move |req: BackendRequest| {
                let this = this.clone();
                async move {
                    this.calls.fetch_add(1, Ordering::SeqCst);
                    if let Some(e) = this.failing.lock().unwrap().clone() {
                        return Err(e);
                    }
                    Ok(match req {
                        BackendRequest::Get { key, .. } => {
                            BackendResponse::Extension(Arc::new(extension(key.name.as_str())))
                        }
                        BackendRequest::List(_) => {
                            BackendResponse::List(Arc::new(vec![extension("aws")]))
                        }
                        BackendRequest::Health => {
                            BackendResponse::Health(crate::registry::HealthReport(Vec::new()))
                        }
                        _ => BackendResponse::Versions(Arc::new(Vec::new())),
                    })
                }
            });
            CacheLayer::new(Caches::new(&config())).layer(backend)
        }
    }

    fn unavailable() -> RegistryError {
        RegistryError::unavailable(Source::Gitea, "503 from upstream")
    }

    #[tokio::test(start_paused = true)]
    async fn a_hit_is_the_same_arc_until_the_ttl_passes() {
        let backend = Backend::new();
        let cache = backend.service();
        let first = cache.clone().oneshot(get("aws")).await.unwrap();
        let second = cache.clone().oneshot(get("aws")).await.unwrap();
        assert_eq!(backend.calls(), 1);
        assert!(Arc::ptr_eq(
            &first.into_extension().unwrap(),
            &second.into_extension().unwrap()
        ));
        tokio::time::advance(TTL).await;
        cache.clone().oneshot(get("aws")).await.unwrap();
        assert_eq!(backend.calls(), 2, "expired entries are refreshed");
        let stats = cache.caches.stats().await;
        assert_eq!((stats.metadata_hits, stats.metadata_misses), (1, 2));
        assert_eq!(stats.metadata_entries, 1);
        assert_eq!(stats.total_entries, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn not_found_is_remembered_for_the_negative_ttl() {
        let backend = Backend::new();
        let cache = backend.service();
        backend.fail_with(Some(RegistryError::not_found("provider/nope")));
        for _ in 0..3 {
            let e = cache.clone().oneshot(get("nope")).await.unwrap_err();
            assert!(e.is_not_found());
        }
        assert_eq!(backend.calls(), 1);
        tokio::time::advance(Duration::from_secs(30)).await;
        backend.fail_with(None);
        assert!(cache.clone().oneshot(get("nope")).await.is_ok());
        assert_eq!(backend.calls(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_refresh_serves_the_stale_answer_within_the_window() {
        let backend = Backend::new();
        let cache = backend.service();
        cache.clone().oneshot(get("aws")).await.unwrap();
        tokio::time::advance(TTL).await;
        backend.fail_with(Some(unavailable()));
        let response = cache.clone().oneshot(get("aws")).await.unwrap();
        assert_eq!(response.stale_error(), Some(&unavailable()));
        assert_eq!(response.into_extension().unwrap().name, "aws");

        // Still failing a day later: nothing left to stand in, the error stands.
        tokio::time::advance(Duration::from_secs(86400)).await;
        let e = cache.clone().oneshot(get("aws")).await.unwrap_err();
        assert_eq!(e, unavailable());

        // Recovered: fresh again, no longer stale.
        backend.fail_with(None);
        let response = cache.clone().oneshot(get("aws")).await.unwrap();
        assert!(response.stale_error().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn only_backend_faults_fall_back_and_cold_failures_stand() {
        let backend = Backend::new();
        let cache = backend.service();
        backend.fail_with(Some(unavailable()));
        assert_eq!(
            cache.clone().oneshot(get("aws")).await.unwrap_err(),
            unavailable()
        );
        backend.fail_with(None);
        cache.clone().oneshot(get("aws")).await.unwrap();
        tokio::time::advance(TTL).await;
        let internal = RegistryError::Internal("bug".into());
        backend.fail_with(Some(internal.clone()));
        assert_eq!(
            cache.clone().oneshot(get("aws")).await.unwrap_err(),
            internal
        );
    }

    #[tokio::test]
    async fn a_hundred_concurrent_cold_requests_make_one_backend_call() {
        let calls = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let backend = tower::service_fn({
            let (calls, gate) = (calls.clone(), gate.clone());
            move |_: BackendRequest| {
                let (calls, gate) = (calls.clone(), gate.clone());
                async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    // Held until every request is in flight.
                    let _permit = gate.acquire().await;
                    Ok::<_, RegistryError>(BackendResponse::List(Arc::new(vec![extension("aws")])))
                }
            }
        });
        let cache = CacheLayer::new(Caches::new(&config())).layer(backend);
        let list = || BackendRequest::List(ListFilter::default());
        let requests = (0..100).map(|_| tokio::spawn(cache.clone().oneshot(list())));
        let requests: Vec<_> = requests.collect();
        while calls.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        gate.add_permits(1000);
        for response in join_all(requests).await {
            assert_eq!(response.unwrap().unwrap().into_list().unwrap().len(), 1);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        let stats = cache.caches.stats().await;
        assert_eq!(stats.list_hits + stats.list_misses, 100);
    }

    #[tokio::test(start_paused = true)]
    async fn downloads_health_and_switched_off_caches_pass_through() {
        let backend = Backend::new();
        let cache = backend.service();
        for _ in 0..2 {
            cache.clone().oneshot(BackendRequest::Health).await.unwrap();
        }
        assert_eq!(backend.calls(), 2);

        let calls = backend.calls.clone();
        let counting = tower::service_fn(move |_: BackendRequest| {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, RegistryError>(BackendResponse::List(Arc::new(Vec::new()))) }
        });
        let off = CacheConfig {
            enable_list_cache: false,
            ..config()
        };
        let uncached = CacheLayer::new(Caches::new(&off)).layer(counting);
        for _ in 0..2 {
            let list = BackendRequest::List(ListFilter::default());
            uncached.clone().oneshot(list).await.unwrap();
        }
        assert_eq!(backend.calls(), 4);
        assert_eq!(uncached.caches.stats().await.list_misses, 0);
    }
}
