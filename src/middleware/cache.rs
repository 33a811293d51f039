//! The cache in front of the merged backends: listings (keyed like `list:{type}:{source}`),
//! single extensions (`{type}/{name}`, with the source when pinned) and their versions
//! (`{type}/{name}/versions`). Values are `Arc`s, so a hit is a pointer copy.
//!
//! An answer goes through four stages:
//! - Fresh for `ttl_seconds` (`negative_ttl_seconds` for "not found"): served from memory.
//! - Stale-while-revalidate, for `stale_while_revalidate_seconds` more: served at once, marked
//!   stale, while one background refresh per key fetches the new one (at most
//!   `max_background_refreshes` run at once; they survive the client hanging up).
//! - Stale-if-error, up to `stale_if_error_seconds` past the TTL: the request waits for the
//!   refresh; when it fails with a backend fault the old answer is served as
//!   `BackendResponse::Stale` (logged, counted in `stale_served_total`), and when it takes
//!   longer than the request may wait the old answer is served and the refresh finishes in
//!   the background (or, when every background permit is taken, is given up then). Once a refresh of the key has failed (or was given up as too slow), the
//!   backends are known sick and are not waited for: the old answer is served at once while
//!   the next try runs in the background.
//! - Past that, only the refresh's outcome stands.
//!
//! Concurrent refreshes of one key are one backend call: whoever comes while a key is being
//! refreshed waits for that refresh (or is served stale). After a refresh fails with a backend
//! fault the key is not refreshed again for a backoff (1 s doubling to 30 s, lengthened by up
//! to a quarter at random so keys do not retry in step, and never before a backend's own
//! `Retry-After`); meanwhile its stale answer, or its error, is served at once. A refresh
//! given up as too slow (in the background at the request timeout, or when the request that
//! runs it may wait no longer) backs off alike, its kept answer served stale meanwhile.
//! "Not found" is remembered for `negative_ttl_seconds`. Downloads and health probes pass
//! through: artifact bytes always stream.
//!
//! Freshness is judged on `tokio::time::Instant`, so tests drive it with a paused clock;
//! moka's own expiry only frees the memory of entries that can no longer serve.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

// moka's sync cache: a hit is a plain call, with no future to poll and box into the request's
// (a lookup costs about 40% fewer instructions than through `moka::future`). Refreshes and
// their single flight are this layer's own, so no request waits on the cache for an answer.
// Writes may run a batch of moka's housekeeping in place, as the future cache's did; with the
// stores' few entries that is microseconds, and a write meeting a full queue while another
// thread holds the housekeeping waits 50 µs for it where the future cache would yield.
use moka::sync::Cache as Moka;
use serde::Serialize;
use tokio::sync::{watch, Semaphore};
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};

use crate::config::CacheConfig;
use crate::invalidation::{Dropped, Scope};
use crate::middleware::recent::Recent;
use crate::middleware::KeyHasher;
use crate::registry::{
    BackendFuture, BackendRequest, BackendResponse, Extension, ExtensionKey, ListFilter,
    RegistryError, SourceSelector, Version,
};

/// Key of the metadata and versions caches: the extension, and the backend kind or instance
/// when pinned.
type ExtensionCacheKey = (ExtensionKey, Option<SourceSelector>);

/// The first wait before a key whose refresh failed is refreshed again.
const BACKOFF_INITIAL: Duration = Duration::from_secs(1);
/// The longest such wait, before jitter.
const BACKOFF_MAX: Duration = Duration::from_secs(30);

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
    /// After refreshes failed with backend faults or were given up as too slow: how many in
    /// a row, and the time before which the key is not refreshed again.
    backoff: Option<(u32, Instant)>,
}

impl Entry {
    /// The remembered failure, a suspension's `Retry-After` counting down with the backoff.
    fn waiting(&self, error: &RegistryError, now: Instant) -> RegistryError {
        let mut error = error.clone();
        if let (RegistryError::BackendSuspended { retry_after, .. }, Some((_, until))) =
            (&mut error, self.backoff)
        {
            *retry_after = until.saturating_duration_since(now);
        }
        error
    }

    /// The kept answer served in place of a fresh one: marked with the backend failure it
    /// stands in for, if any.
    fn stale(&self) -> Option<BackendResponse> {
        let Some((Ok(value), _)) = &self.answer else {
            return None;
        };
        Some(BackendResponse::Stale {
            response: Box::new(value.response()),
            error: self.failure.clone().filter(RegistryError::is_backend_fault),
        })
    }
}

/// What a lookup does with the entry it found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Judgement {
    /// Answer from it.
    Fresh,
    /// Its refresh failed or was given up a moment ago: answer from it (stale, or the error)
    /// without asking.
    BackingOff,
    /// Serve it stale at once and refresh it in the background.
    Revalidate,
    /// Refresh it and answer with the outcome; `stale_held` when a stale answer may stand in
    /// if the refresh fails or takes too long.
    Refresh { stale_held: bool },
}

/// The time rules, from `[cache]` and the request timeout.
#[derive(Clone, Copy, Debug)]
struct Policy {
    /// How long an answer is fresh.
    ttl: Duration,
    /// How long a "not found" is fresh.
    negative_ttl: Duration,
    /// How long past `ttl` an answer may still stand in for failing backends.
    stale_if_error: Duration,
    /// How long past `ttl` an answer is served at once while it is refreshed.
    stale_while_revalidate: Duration,
    /// How long a request holding a stale answer waits for a refresh before it is answered
    /// with the stale one.
    wait_for_refresh: Duration,
    /// How long a refresh in the background may take: the request timeout, which bounds one
    /// that a request waits for.
    background_limit: Duration,
}

impl Policy {
    fn is_fresh(&self, entry: &Entry, now: Instant) -> bool {
        match (&entry.answer, &entry.failure) {
            (Some((Ok(_), at)), None) => now < *at + self.ttl,
            (Some((Err(_), at)), None) => now < *at + self.negative_ttl,
            _ => false,
        }
    }

    fn judge(&self, entry: Option<&Entry>, now: Instant) -> Judgement {
        let Some(entry) = entry else {
            return Judgement::Refresh { stale_held: false };
        };
        if self.is_fresh(entry, now) {
            return Judgement::Fresh;
        }
        // A refresh given up leaves no failure to answer with: only its kept answer, while
        // that may still stand in.
        let answers = entry.failure.is_some()
            || matches!(&entry.answer, Some((Ok(_), at)) if self.may_stand_in(*at, now));
        if answers && entry.backoff.is_some_and(|(_, until)| now < until) {
            return Judgement::BackingOff;
        }
        // A backoff, run out, is left by a failed refresh or one given up as too slow.
        let known_sick = entry.backoff.is_some()
            || entry
                .failure
                .as_ref()
                .is_some_and(RegistryError::is_backend_fault);
        match &entry.answer {
            Some((Ok(_), at)) if now < *at + self.ttl + self.stale_while_revalidate => {
                Judgement::Revalidate
            }
            // The last refresh failed or was given up: the backends are known sick, so the
            // stale answer is served at once while the next try runs in the background.
            Some((Ok(_), at)) if known_sick && now < *at + self.ttl + self.stale_if_error => {
                Judgement::Revalidate
            }
            Some((Ok(_), at)) => Judgement::Refresh {
                stale_held: now < *at + self.ttl + self.stale_if_error,
            },
            _ => Judgement::Refresh { stale_held: false },
        }
    }

    /// How long moka keeps an entry: as long as it can serve, fresh or stale.
    fn keep(&self, entry: &Entry) -> Duration {
        match &entry.answer {
            Some((Ok(_), _)) => self.ttl + self.stale_if_error.max(self.stale_while_revalidate),
            Some((Err(_), _)) => self.negative_ttl,
            // Only failures so far: kept while its backoff runs, so the requests meanwhile
            // share it; the next attempt replaces it.
            None => self.ttl.max(self.backoff_bound()),
        }
    }

    /// The longest backoff, jitter included.
    fn backoff_bound(&self) -> Duration {
        BACKOFF_MAX + BACKOFF_MAX / 4
    }

    /// The wait after the `failures`-th failed refresh in a row.
    fn backoff(failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(16);
        let wait = BACKOFF_INITIAL
            .saturating_mul(1 << doublings)
            .min(BACKOFF_MAX);
        wait.mul_f64(1.0 + fastrand::f64() / 4.0)
    }

    /// Whether an answer from `at` may still stand in for a fresh one, stale.
    fn may_stand_in(&self, at: Instant, now: Instant) -> bool {
        now < at + self.ttl + self.stale_if_error.max(self.stale_while_revalidate)
    }

    /// The entry a refresh given up as too slow leaves, from the one it found: the kept
    /// answer, served stale while a backoff runs (counted with the failures before it), and the
    /// backend fault known, if any; `None` when no kept answer may stand in any more.
    fn given_up(&self, current: Option<&Entry>, now: Instant) -> Option<Entry> {
        let current = current?;
        let Some((Ok(value), at)) = &current.answer else {
            return None;
        };
        if !self.may_stand_in(*at, now) {
            return None;
        }
        let failures = current.backoff.map_or(0, |(n, _)| n) + 1;
        Some(Entry {
            answer: Some((Ok(value.clone()), *at)),
            failure: current
                .failure
                .clone()
                .filter(RegistryError::is_backend_fault),
            backoff: Some((failures, now + Self::backoff(failures))),
        })
    }

    /// The entry a refresh leaves, from the one it found and the backends' outcome.
    fn next(
        &self,
        current: Option<&Entry>,
        outcome: Result<BackendResponse, RegistryError>,
        now: Instant,
    ) -> Entry {
        // A degraded answer (some backend failed, the others answered) counts as a failure:
        // the complete answer kept from before is served stale in its place, and only with
        // nothing kept does the degraded one stand, never as fresh.
        let (result, degraded) = match outcome {
            Ok(BackendResponse::Stale { response, error }) => {
                (Value::from_response(*response), error)
            }
            other => (other.and_then(Value::from_response), None),
        };
        let kept = current.and_then(|c| match &c.answer {
            Some((Ok(value), at)) => Some((Ok(value.clone()), *at)),
            _ => None,
        });
        let backoff = |error: &RegistryError| {
            if !error.is_backend_fault() {
                return None;
            }
            let failures = current.and_then(|c| c.backoff).map_or(0, |(n, _)| n) + 1;
            let wait = Self::backoff(failures).max(error.retry_after().unwrap_or_default());
            Some((failures, now + wait))
        };
        match (result, degraded) {
            (Ok(value), None) => Entry {
                answer: Some((Ok(value), now)),
                failure: None,
                backoff: None,
            },
            (Ok(value), Some(e)) => Entry {
                answer: kept.or(Some((Ok(value), now))),
                backoff: backoff(&e),
                failure: Some(e),
            },
            (Err(e), _) if e.is_not_found() => Entry {
                answer: Some((Err(e), now)),
                failure: None,
                backoff: None,
            },
            (Err(e), _) => Entry {
                answer: kept,
                backoff: backoff(&e),
                failure: Some(e),
            },
        }
    }

    /// The answer an entry gives at `now`, once no refresh is to be waited for.
    fn resolve(&self, entry: &Entry, now: Instant) -> Result<BackendResponse, RegistryError> {
        match (&entry.failure, &entry.answer) {
            // Backing off with no failure known: its refresh was given up.
            (None, Some((Ok(value), _))) if entry.backoff.is_some() => Ok(BackendResponse::Stale {
                response: Box::new(value.response()),
                error: None,
            }),
            (None, Some((Ok(value), _))) => Ok(value.response()),
            (None, Some((Err(not_found), _))) => Err(not_found.clone()),
            (Some(error), Some((Ok(value), at)))
                if error.is_backend_fault() && now < *at + self.ttl + self.stale_if_error =>
            {
                Ok(BackendResponse::Stale {
                    response: Box::new(value.response()),
                    error: Some(error.clone()),
                })
            }
            (Some(error), _) => Err(entry.waiting(error, now)),
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
    entries: Moka<K, Arc<Entry>, KeyHasher>,
    /// The keys being refreshed now; each receiver closes when its refresh ends. At most one
    /// per key, so bounded by the keys requested at once plus the background refreshes.
    refreshing: Mutex<HashMap<K, watch::Receiver<()>>>,
    /// Moved on by every invalidation of this store: a refresh begun under an older one may
    /// have read what the invalidation announced as changed, so its answer is not kept.
    generation: AtomicU64,
    /// Counted here too, for `/cache/stats`, as the Prometheus recorder may be absent.
    hits: AtomicU64,
    misses: AtomicU64,
    /// Registered once, so counting is an atomic add.
    hits_total: metrics::Counter,
    misses_total: metrics::Counter,
    stale_total: metrics::Counter,
    /// Requests that waited for another request's refresh of their key instead of asking the
    /// backends themselves.
    waits_total: metrics::Counter,
    /// Set from the entry count when metrics are scraped.
    entries_gauge: metrics::Gauge,
    /// Entries served or stored lately, weakly (moka alone decides what stays), each under
    /// the generation read before moka was: an invalidation moves the store's on, and the
    /// slot is passed by from then on. A key asked again whose entry is still fresh is served
    /// from here. Bounded: `recent::SLOTS` keys per store.
    recent: Recent<K, Entry>,
}

/// The one refresh of a key under way: while it lives, others wait for it instead of asking
/// the backends themselves; dropping it (done, or its request gone) lets them go on.
struct Refresh<K: Hash + Eq> {
    store: Arc<Store<K>>,
    key: K,
    /// The store's generation when the refresh began.
    generation: u64,
    /// Closes the waiters' receivers when dropped, after the key left `refreshing`.
    done: watch::Sender<()>,
}

impl<K: Hash + Eq> Drop for Refresh<K> {
    fn drop(&mut self) {
        lock(&self.store.refreshing).remove(&self.key);
    }
}

/// What a request finds in its cache when called.
enum AtOnce {
    /// The answer, as the entry holds it.
    Served(Result<BackendResponse, RegistryError>),
    /// The entry, if any, is due for a refresh.
    Due(Option<Arc<Entry>>),
}

/// Either this request refreshes the key, or it waits for the refresh under way.
enum Flight<K: Hash + Eq> {
    Lead(Refresh<K>),
    Follow(watch::Receiver<()>),
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every change under this lock is one insert or remove: consistent whatever panicked.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl<K: Hash + Eq + Clone + Send + Sync + 'static> Store<K> {
    fn new(name: &'static str, enabled: bool, capacity: u64, policy: Policy) -> Self {
        Self {
            name,
            enabled,
            entries: Moka::builder()
                .max_capacity(capacity)
                .expire_after(Expiry(policy))
                .build_with_hasher(KeyHasher::default()),
            refreshing: Mutex::default(),
            generation: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            hits_total: metrics::counter!("cache_hits_total", "cache" => name),
            misses_total: metrics::counter!("cache_misses_total", "cache" => name),
            stale_total: metrics::counter!("stale_served_total", "cache" => name),
            waits_total: metrics::counter!("cache_singleflight_waits_total", "cache" => name),
            entries_gauge: metrics::gauge!("cache_entries", "cache" => name),
            recent: Recent::new(),
        }
    }

    fn entry_count(&self) -> u64 {
        // Counts are eventually consistent; settle pending inserts and expiries first.
        self.entries.run_pending_tasks();
        self.entries.entry_count()
    }

    fn hit(&self) {
        self.hits.fetch_add(1, Ordering::Relaxed);
        self.hits_total.increment(1);
    }

    /// The answer of `key`'s entry when it is served as it is (fresh, or backing off), counted
    /// as a hit; else the entry as found, for the lookup to go on from without asking again.
    fn at_once(&self, key: &K, policy: Policy) -> AtOnce {
        let now = Instant::now();
        if let Some(entry) = self.recent(key) {
            if let Judgement::Fresh | Judgement::BackingOff = policy.judge(Some(&entry), now) {
                self.hit();
                return AtOnce::Served(self.served(policy.resolve(&entry, now)));
            }
        }
        // Read before the lookup, so that an invalidation in between leaves the slot unused.
        let generation = self.generation.load(Ordering::Acquire);
        let Some(entry) = self.entries.get(key) else {
            return AtOnce::Due(None);
        };
        match policy.judge(Some(&entry), now) {
            Judgement::Fresh | Judgement::BackingOff => {
                self.recent.keep(key, &entry, generation);
                self.hit();
                AtOnce::Served(self.served(policy.resolve(&entry, now)))
            }
            Judgement::Revalidate | Judgement::Refresh { .. } => AtOnce::Due(Some(entry)),
        }
    }

    /// `key`'s entry from its slot of recent ones, unless the slot went to another key, the
    /// store was invalidated since, or moka dropped the entry.
    fn recent(&self, key: &K) -> Option<Arc<Entry>> {
        let recent = self
            .recent
            .get(key, self.generation.load(Ordering::Acquire))?;
        if recent.tell {
            self.entries.get(key);
        }
        Some(recent.value)
    }

    fn miss(&self) {
        self.misses.fetch_add(1, Ordering::Relaxed);
        self.misses_total.increment(1);
    }

    /// Joins the refresh of `key` under way, or becomes it.
    fn board(self: &Arc<Self>, key: &K) -> Flight<K> {
        let mut refreshing = lock(&self.refreshing);
        if let Some(done) = refreshing.get(key) {
            return Flight::Follow(done.clone());
        }
        let (done, waiters) = watch::channel(());
        refreshing.insert(key.clone(), waiters);
        Flight::Lead(Refresh {
            store: self.clone(),
            key: key.clone(),
            generation: self.generation.load(Ordering::Acquire),
            done,
        })
    }

    /// Drops the entries whose key `matches`, and keeps no refresh already under way (for
    /// any key: it may have read before the change); returns how many were dropped.
    fn invalidate(&self, matches: impl Fn(&K) -> bool) -> u64 {
        self.generation.fetch_add(1, Ordering::AcqRel);
        let doomed: Vec<Arc<K>> = self
            .entries
            .iter()
            .filter_map(|(key, _)| matches(&key).then_some(key))
            .collect();
        for key in &doomed {
            self.entries.invalidate(key.as_ref());
        }
        // Moved on again: an entry served while the walk ran was remembered in its slot under
        // the generation the walk began with, and moka may hold a dropped entry a while yet.
        self.generation.fetch_add(1, Ordering::AcqRel);
        doomed.len() as u64
    }

    /// Logs and counts an answer standing in for a failed backend.
    fn served(
        &self,
        result: Result<BackendResponse, RegistryError>,
    ) -> Result<BackendResponse, RegistryError> {
        if let Some(error) = result.as_ref().ok().and_then(BackendResponse::stale_error) {
            tracing::warn!(cache = self.name, %error, "backend failed; serving the stale answer");
            self.stale_total.increment(1);
        }
        result
    }
}

/// The three caches, shared by the cache layer and the `/cache/stats` handler.
#[derive(Clone)]
pub struct Caches(Arc<Stores>);

struct Stores {
    list: Arc<Store<ListFilter>>,
    metadata: Arc<Store<ExtensionCacheKey>>,
    versions: Arc<Store<ExtensionCacheKey>>,
    policy: Policy,
    /// One permit per refresh running in the background.
    background: Arc<Semaphore>,
}

impl Caches {
    /// Builds the caches `[cache]` asks for; a request holding a stale answer waits at most
    /// nine tenths of `request_timeout` for a refresh, so it is answered stale before it
    /// would time out. Metrics counters are registered here, so the recorder must be
    /// installed before.
    pub fn new(config: &CacheConfig, request_timeout: Duration) -> Self {
        let policy = Policy {
            ttl: Duration::from_secs(config.ttl_seconds),
            negative_ttl: Duration::from_secs(config.negative_ttl_seconds),
            stale_if_error: Duration::from_secs(config.stale_if_error_seconds),
            stale_while_revalidate: Duration::from_secs(config.stale_while_revalidate_seconds),
            wait_for_refresh: request_timeout.mul_f64(0.9),
            background_limit: request_timeout,
        };
        let capacity = config.capacity;
        let (list, metadata) = (config.enable_list_cache, config.enable_metadata_cache);
        Self(Arc::new(Stores {
            list: Arc::new(Store::new("list", list, capacity, policy)),
            metadata: Arc::new(Store::new("metadata", metadata, capacity, policy)),
            // Versions are metadata too: one switch for both.
            versions: Arc::new(Store::new("versions", metadata, capacity, policy)),
            policy,
            background: Arc::new(Semaphore::new(config.max_background_refreshes)),
        }))
    }

    /// Sets the `cache_entries` gauges from the caches' entry counts (approximate: inserts
    /// and expiries not yet settled are not counted), for a metrics scrape.
    pub fn record_entries(&self) {
        let stores = &self.0;
        for (gauge, count) in [
            (
                &stores.list.entries_gauge,
                stores.list.entries.entry_count(),
            ),
            (
                &stores.metadata.entries_gauge,
                stores.metadata.entries.entry_count(),
            ),
            (
                &stores.versions.entries_gauge,
                stores.versions.entries.entry_count(),
            ),
        ] {
            gauge.set(count as f64);
        }
    }

    /// Drops what `scope` covers: its extensions' metadata and versions (pinned to a source
    /// or not) and every listing that may hold them. See [`crate::invalidation`].
    pub fn invalidate(&self, scope: &Scope) -> Dropped {
        let stores = &self.0;
        Dropped {
            listings: stores
                .list
                .invalidate(|filter| scope.covers_listing(filter)),
            metadata: stores.metadata.invalidate(|(key, _)| scope.covers(key)),
            versions: stores.versions.invalidate(|(key, _)| scope.covers(key)),
        }
    }

    /// A permit for one refresh run in the background, if one of `max_background_refreshes`
    /// is free; held until that refresh ends.
    pub fn background_permit(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.0.background.clone().try_acquire_owned().ok()
    }

    /// Entry counts, hits, misses and hit ratios, for `/api/v1/cache/stats`.
    pub fn stats(&self) -> CacheStats {
        let stores = &self.0;
        let list = Counts::of(&stores.list);
        let metadata = Counts::of(&stores.metadata);
        let versions = Counts::of(&stores.versions);
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
    fn of<K: Hash + Eq + Clone + Send + Sync + 'static>(store: &Store<K>) -> Self {
        Self {
            entries: store.entry_count(),
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
    S::Future: Send + 'static,
{
    type Response = BackendResponse;
    type Error = RegistryError;
    type Future = BackendFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), RegistryError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: BackendRequest) -> BackendFuture {
        let stores = &self.caches.0;
        // The request becomes its key, with nothing copied: most requests are answered from
        // the key at once, and only a miss or a refresh needs the request again
        // (`Key::request`).
        let key = match req {
            BackendRequest::List(filter) if stores.list.enabled => Key::List(filter),
            BackendRequest::Get { key, source } if stores.metadata.enabled => {
                Key::Metadata((key, source))
            }
            BackendRequest::Versions { key, source } if stores.versions.enabled => {
                Key::Versions((key, source))
            }
            req => return Box::pin(self.inner.call(req)),
        };
        // Most requests end here: an answer served as it is needs no lookup future, which
        // would be built, boxed and polled around the same lookup (about 2.5 KiB).
        let policy = stores.policy;
        let at_once = match &key {
            Key::List(k) => stores.list.at_once(k, policy),
            Key::Metadata(k) => stores.metadata.at_once(k, policy),
            Key::Versions(k) => stores.versions.at_once(k, policy),
        };
        let seen = match at_once {
            AtOnce::Served(answer) => return Box::pin(std::future::ready(answer)),
            AtOnce::Due(seen) => seen,
        };
        // Refreshes may outlive this request, so each takes its own clone of the backends
        // (and waits for its readiness); the ready service is left unused.
        let lookup = Lookup {
            inner: self.inner.clone(),
            req: key.request(),
            policy,
            background: stores.background.clone(),
        };
        let stores = self.caches.0.clone();
        Box::pin(async move {
            match key {
                Key::List(k) => lookup.run(stores.list.clone(), k, seen).await,
                Key::Metadata(k) => lookup.run(stores.metadata.clone(), k, seen).await,
                Key::Versions(k) => lookup.run(stores.versions.clone(), k, seen).await,
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

impl Key {
    /// The backend request answered under this key.
    fn request(&self) -> BackendRequest {
        match self {
            Key::List(filter) => BackendRequest::List(filter.clone()),
            Key::Metadata((key, source)) => BackendRequest::Get {
                key: key.clone(),
                source: source.clone(),
            },
            Key::Versions((key, source)) => BackendRequest::Versions {
                key: key.clone(),
                source: source.clone(),
            },
        }
    }
}

/// One request to answer from a cache.
struct Lookup<S> {
    /// The backends, asked on a refresh.
    inner: S,
    req: BackendRequest,
    policy: Policy,
    /// Permits for background refreshes.
    background: Arc<Semaphore>,
}

impl<S> Lookup<S>
where
    S: Service<BackendRequest, Response = BackendResponse, Error = RegistryError>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    /// Answers from `store`, refreshing `key` as its entry's stage asks (see the module
    /// documentation); `first` is the entry as `call` found it.
    async fn run<K>(
        self,
        store: Arc<Store<K>>,
        key: K,
        first: Option<Arc<Entry>>,
    ) -> Result<BackendResponse, RegistryError>
    where
        K: Hash + Eq + Clone + Send + Sync + 'static,
    {
        let policy = self.policy;
        let mut started = None;
        let mut counted = false;
        let mut first = Some(first);
        loop {
            let now = Instant::now();
            let started = *started.get_or_insert(now);
            // Looked up once per round; the first round's was `call`'s.
            let seen = first.take().unwrap_or_else(|| store.entries.get(&key));
            let stale_held = match (policy.judge(seen.as_deref(), now), &seen) {
                (Judgement::Fresh | Judgement::BackingOff, Some(entry)) => {
                    store.hit();
                    return store.served(policy.resolve(entry, now));
                }
                (Judgement::Revalidate, Some(entry)) => {
                    store.hit();
                    if let Flight::Lead(refresh) = store.board(&key) {
                        if self.in_background(refresh).is_err() {
                            tracing::debug!(
                                cache = store.name,
                                "every background refresh permit is taken; serving stale without refreshing"
                            );
                        }
                    }
                    return store.served(entry.stale().ok_or_else(no_answer));
                }
                (Judgement::Refresh { stale_held }, _) => stale_held,
                (_, None) => false,
            };
            if !counted {
                store.miss();
                counted = true;
            }
            // With a stale answer to fall back on, the request waits for the refresh only as
            // long as it may; without, as long as the refresh takes (the request timeout
            // above bounds it).
            let deadline = stale_held.then(|| started + policy.wait_for_refresh);
            let waited = match store.board(&key) {
                Flight::Lead(refresh) => match deadline {
                    Some(deadline) => match self.in_background(refresh) {
                        Ok(done) => wait(done, Some(deadline)).await,
                        Err(refresh) => {
                            // Every background permit is taken: refresh here, for as long as
                            // this request may wait (not at all with no time left).
                            let left = deadline.saturating_duration_since(Instant::now());
                            !left.is_zero() && self.refresh(refresh, Some(left)).await
                        }
                    },
                    None => self.refresh(refresh, None).await,
                },
                Flight::Follow(done) => {
                    store.waits_total.increment(1);
                    wait(done, deadline).await
                }
            };
            if !waited {
                // Out of time: the stale answer, while the refresh goes on.
                if let Some(stale) = seen.as_deref().and_then(Entry::stale) {
                    return store.served(Ok(stale));
                }
            }
            match store.entries.get(&key) {
                Some(entry) if !seen.as_ref().is_some_and(|s| Arc::ptr_eq(s, &entry)) => {
                    return store.served(policy.resolve(&entry, Instant::now()));
                }
                // The refresh waited for was abandoned (its request gone): try again.
                _ => continue,
            }
        }
    }

    /// Runs `refresh` as a task of its own, so it survives this request, if a background
    /// permit is free: returns what closes when it ends; else gives it back. It is given up
    /// past the request timeout, as a refresh a request waits for would be, so a backend that
    /// drips its answer cannot hold the permit and its connection for ever; the key then backs
    /// off as after a failure (see [`Policy::given_up`]).
    fn in_background<K>(&self, refresh: Refresh<K>) -> Result<watch::Receiver<()>, Refresh<K>>
    where
        K: Hash + Eq + Clone + Send + Sync + 'static,
    {
        let Ok(permit) = self.background.clone().try_acquire_owned() else {
            return Err(refresh);
        };
        let done = refresh.done.subscribe();
        let task = self.refresh(refresh, Some(self.policy.background_limit));
        tokio::spawn(async move {
            task.await;
            drop(permit);
        });
        Ok(done)
    }

    /// Asks the backends and stores what the key's entry becomes; with a `limit`, gives the
    /// backends up after it and stores what that leaves (see [`Policy::given_up`]), before
    /// its waiters are let go. Whether the backends answered in time.
    fn refresh<K>(
        &self,
        refresh: Refresh<K>,
        limit: Option<Duration>,
    ) -> impl std::future::Future<Output = bool> + Send
    where
        K: Hash + Eq + Clone + Send + Sync + 'static,
    {
        let ask = self.inner.clone().oneshot(self.req.clone());
        let policy = self.policy;
        async move {
            let asked = match limit {
                None => Some(ask.await),
                Some(limit) => tokio::time::timeout(limit, ask).await.ok(),
            };
            let answered = asked.is_some();
            let store = &refresh.store;
            if store.generation.load(Ordering::Acquire) != refresh.generation {
                // Invalidated meanwhile: its waiters find no new entry and ask again.
                return answered;
            }
            let current = store.entries.get(&refresh.key);
            let entry = match asked {
                Some(outcome) => {
                    // An answer from the shared cache was fetched `age` ago, on whichever
                    // replica.
                    let (outcome, fetched) = match outcome {
                        Ok(BackendResponse::Shared { response, age }) => {
                            (Ok(*response), Instant::now().checked_sub(age))
                        }
                        other => (other, None),
                    };
                    let now = fetched.unwrap_or_else(Instant::now);
                    policy.next(current.as_deref(), outcome, now)
                }
                None => {
                    let now = Instant::now();
                    let given_up = policy.given_up(current.as_deref(), now);
                    let (failures, backoff_ms) = given_up
                        .as_ref()
                        .and_then(|entry| entry.backoff)
                        .map_or((0, 0), |(n, until)| (n, (until - now).as_millis()));
                    let limit_ms = limit.unwrap_or_default().as_millis();
                    // With nothing kept, its waiters find no new entry and ask again.
                    let Some(entry) = given_up else {
                        tracing::warn!(
                            cache = store.name,
                            limit_ms,
                            "a refresh outlasted its time and was given up; no kept answer may stand in"
                        );
                        return answered;
                    };
                    tracing::warn!(
                        cache = store.name,
                        limit_ms,
                        failures,
                        backoff_ms,
                        "a refresh outlasted its time and was given up; the key backs off"
                    );
                    entry
                }
            };
            let entry = Arc::new(entry);
            store.entries.insert(refresh.key.clone(), entry.clone());
            if store.generation.load(Ordering::Acquire) != refresh.generation {
                // Invalidated between the check above and the insert: not kept.
                store.entries.invalidate(&refresh.key);
                return answered;
            }
            store.recent.keep(&refresh.key, &entry, refresh.generation);
            // `refresh` drops here: its waiters find the new entry.
            answered
        }
    }
}

/// Waits for a refresh to end, until `deadline` if any; whether it ended.
async fn wait(mut done: watch::Receiver<()>, deadline: Option<Instant>) -> bool {
    // Nothing is ever sent: `changed` returns when the sender is dropped.
    let ended = done.changed();
    match deadline {
        Some(deadline) => tokio::time::timeout_at(deadline, ended).await.is_ok(),
        None => {
            let _ = ended.await;
            true
        }
    }
}

fn no_answer() -> RegistryError {
    RegistryError::Internal("cache entry judged stale holds no answer".into())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use futures_util::future::join_all;
    use tower::ServiceExt;

    use super::*;
    use crate::registry::{ExtensionName, ExtensionType, Source, Timestamp};

    const TTL: Duration = Duration::from_secs(300);
    const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

    /// Without stale-while-revalidate: every refresh is waited for.
    fn config() -> CacheConfig {
        CacheConfig {
            capacity: 100,
            ttl_seconds: TTL.as_secs(),
            stale_while_revalidate_seconds: 0,
            ..CacheConfig::default()
        }
    }

    fn caches(config: &CacheConfig) -> Caches {
        Caches::new(config, REQUEST_TIMEOUT)
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
            instance: Source::Local.into(),
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

    /// A backend whose answers the test switches, counting its calls. Its extensions have
    /// the version `1.0.<call>`, so tests see which call an answer came from.
    #[derive(Clone)]
    struct Backend {
        calls: Arc<AtomicUsize>,
        /// `Some(error)`: fail with it; `None`: answer.
        failing: Arc<std::sync::Mutex<Option<RegistryError>>>,
        /// While set, calls wait for a permit of this semaphore before answering.
        held: Arc<std::sync::Mutex<Option<Arc<tokio::sync::Semaphore>>>>,
    }

    impl Backend {
        fn new() -> Self {
            Self {
                calls: Arc::default(),
                failing: Arc::default(),
                held: Arc::default(),
            }
        }

        /// Calls from now on wait until `release`.
        fn hold(&self) {
            *self.held.lock().unwrap() = Some(Arc::new(tokio::sync::Semaphore::new(0)));
        }

        fn release(&self) {
            if let Some(gate) = self.held.lock().unwrap().take() {
                gate.add_permits(tokio::sync::Semaphore::MAX_PERMITS);
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
                    Future = impl Send + 'static,
                > + Clone
                + Send
                + 'static,
        > {
            self.service_with(&config())
        }

        fn service_with(
            &self,
            config: &CacheConfig,
        ) -> Cache<
            impl Service<
                    BackendRequest,
                    Response = BackendResponse,
                    Error = RegistryError,
                    Future = impl Send + 'static,
                > + Clone
                + Send
                + 'static,
        > {
            let this = self.clone();
            let backend = tower::service_fn(move |req: BackendRequest| {
                let this = this.clone();
                async move {
                    let call = this.calls.fetch_add(1, Ordering::SeqCst) + 1;
                    let gate = this.held.lock().unwrap().clone();
                    if let Some(gate) = gate {
                        let _permit = gate.acquire().await;
                    }
                    if let Some(e) = this.failing.lock().unwrap().clone() {
                        return Err(e);
                    }
                    Ok(match req {
                        BackendRequest::Get { key, .. } => {
                            let mut extension = extension(key.name.as_str());
                            extension.version = format!("1.0.{call}");
                            BackendResponse::Extension(Arc::new(extension))
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
            CacheLayer::new(caches(config)).layer(backend)
        }
    }

    fn version(response: BackendResponse) -> String {
        response.into_extension().unwrap().version.clone()
    }

    /// Lets spawned refreshes run until `done` holds, without moving the paused clock.
    async fn until(mut done: impl FnMut() -> bool) {
        for _ in 0..10_000 {
            if done() {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("the condition never held");
    }

    /// The first answer for `aws` that is not stale, letting the background refresh run.
    async fn first_fresh<S>(cache: &Cache<S>) -> BackendResponse
    where
        S: Service<BackendRequest, Response = BackendResponse, Error = RegistryError>
            + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
    {
        for _ in 0..10_000 {
            let answer = cache.clone().oneshot(get("aws")).await.unwrap();
            if !answer.is_stale() {
                return answer;
            }
            tokio::task::yield_now().await;
        }
        panic!("the background refresh never ended");
    }

    fn aws() -> ExtensionKey {
        ExtensionKey {
            ty: ExtensionType::Provider,
            name: ExtensionName::parse("aws").unwrap(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_invalidation_drops_what_its_scope_covers_and_nothing_else() {
        let backend = Backend::new();
        let cache = backend.service();
        let list = BackendRequest::List(ListFilter {
            ty: Some(ExtensionType::Taskserv),
            source: None,
        });
        cache.clone().oneshot(get("aws")).await.unwrap();
        cache.clone().oneshot(list.clone()).await.unwrap();
        assert_eq!(backend.calls(), 2);

        let other = ExtensionKey {
            name: ExtensionName::parse("gcp").unwrap(),
            ..aws()
        };
        let dropped = cache.caches.invalidate(&Scope::Extension(other));
        assert_eq!(
            dropped,
            Dropped::default(),
            "a provider leaves taskserv listings alone"
        );
        assert_eq!(
            version(cache.clone().oneshot(get("aws")).await.unwrap()),
            "1.0.1"
        );

        let dropped = cache.caches.invalidate(&Scope::Extension(aws()));
        assert_eq!((dropped.metadata, dropped.listings), (1, 0));
        assert_eq!(
            version(cache.clone().oneshot(get("aws")).await.unwrap()),
            "1.0.3"
        );

        let dropped = cache.caches.invalidate(&Scope::All);
        assert_eq!((dropped.metadata, dropped.listings), (1, 1));
        cache.clone().oneshot(list).await.unwrap();
        assert_eq!(backend.calls(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn an_entry_served_again_and_again_is_dropped_by_an_invalidation() {
        let backend = Backend::new();
        let cache = backend.service();
        for _ in 0..3 {
            cache.clone().oneshot(get("aws")).await.unwrap();
        }
        assert_eq!(backend.calls(), 1);
        cache.caches.invalidate(&Scope::Extension(aws()));
        let after = cache.clone().oneshot(get("aws")).await.unwrap();
        assert_eq!(backend.calls(), 2, "the invalidated entry was served");
        assert_eq!(version(after), "1.0.2");
    }

    #[tokio::test(start_paused = true)]
    async fn an_entry_served_while_an_invalidation_runs_is_not_served_after_it() {
        let backend = Backend::new();
        let cache = backend.service();
        cache.clone().oneshot(get("aws")).await.unwrap();
        let stores = &cache.caches.0;
        let key = (aws(), None);
        // A request for the key between the invalidation's first step and its last.
        let dropped = stores.metadata.invalidate(|k| {
            let served = stores.metadata.at_once(&key, stores.policy);
            assert!(matches!(served, AtOnce::Served(Ok(_))));
            *k == key
        });
        assert_eq!(dropped, 1);
        assert!(
            matches!(
                stores.metadata.at_once(&key, stores.policy),
                AtOnce::Due(None)
            ),
            "the invalidated entry was served"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_refresh_under_way_when_invalidated_is_not_kept_and_its_waiters_ask_again() {
        let backend = Backend::new();
        let cache = backend.service();
        backend.hold();
        let waiting = tokio::spawn(cache.clone().oneshot(get("aws")));
        until(|| backend.calls() == 1).await;

        cache
            .caches
            .invalidate(&Scope::Type(ExtensionType::Provider));
        backend.release();

        let answer = waiting.await.unwrap().unwrap();
        assert_eq!(
            version(answer),
            "1.0.2",
            "the answer read before the change is not served"
        );
        assert_eq!(
            version(cache.clone().oneshot(get("aws")).await.unwrap()),
            "1.0.2"
        );
        assert_eq!(backend.calls(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_hundred_requests_for_a_stale_key_are_answered_at_once_by_one_background_call() {
        let backend = Backend::new();
        let cache = backend.service_with(&CacheConfig {
            stale_while_revalidate_seconds: 60,
            ..config()
        });
        assert_eq!(
            version(cache.clone().oneshot(get("aws")).await.unwrap()),
            "1.0.1"
        );
        tokio::time::advance(TTL + Duration::from_secs(59)).await;

        // The backend is slow now, and the answer past its TTL: each request gets the kept
        // answer at once, marked stale with no failure (a refresh is running).
        backend.hold();
        let requests = (0..100).map(|_| cache.clone().oneshot(get("aws")));
        // On the paused clock, any wait at all would end this timeout.
        let responses = tokio::time::timeout(Duration::from_millis(1), join_all(requests));
        for response in responses.await.expect("stale answers come at once") {
            let response = response.unwrap();
            assert!(response.is_stale() && response.stale_error().is_none());
            assert_eq!(version(response), "1.0.1");
        }
        until(|| backend.calls() == 2).await;

        // The refresh ends: the next request gets its answer, fresh, and nothing more was
        // asked of the backend.
        backend.release();
        let answer = first_fresh(&cache).await;
        assert_eq!(version(answer), "1.0.2");
        assert_eq!(backend.calls(), 2);
        let stats = cache.caches.stats();
        assert_eq!(
            stats.metadata_misses, 1,
            "stale answers are served from the cache"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_refresh_outlasting_the_request_is_answered_stale_and_finishes_in_the_background() {
        let backend = Backend::new();
        let cache = backend.service();
        cache.clone().oneshot(get("aws")).await.unwrap();
        tokio::time::advance(TTL).await;

        // Past the TTL with no stale-while-revalidate: the request waits for the refresh, but
        // not past nine tenths of the request timeout, when the kept answer is served.
        backend.hold();
        let started = Instant::now();
        let response = tokio::time::timeout(REQUEST_TIMEOUT, cache.clone().oneshot(get("aws")))
            .await
            .expect("answered before the request timeout")
            .unwrap();
        assert_eq!(started.elapsed(), REQUEST_TIMEOUT.mul_f64(0.9));
        assert!(response.is_stale());
        assert_eq!(version(response), "1.0.1");

        // The refresh went on without the request and its answer is there for the next one.
        backend.release();
        until(|| backend.calls() == 2).await;
        let answer = first_fresh(&cache).await;
        assert_eq!(version(answer), "1.0.2");
        assert_eq!(backend.calls(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_background_refresh_is_given_up_at_the_request_timeout_and_backs_off() {
        let backend = Backend::new();
        let cache = backend.service_with(&CacheConfig {
            stale_while_revalidate_seconds: 60,
            ..config()
        });
        cache.clone().oneshot(get("aws")).await.unwrap();
        tokio::time::advance(TTL + Duration::from_secs(1)).await;
        let permits = || cache.caches.0.background.available_permits();
        let free = permits();

        // The backend never answers: the refresh holds a permit, until the request timeout.
        backend.hold();
        let response = cache.clone().oneshot(get("aws")).await.unwrap();
        assert!(response.is_stale());
        until(|| backend.calls() == 2).await;
        assert_eq!(permits(), free - 1);
        tokio::time::advance(REQUEST_TIMEOUT - Duration::from_millis(1)).await;
        assert_eq!(permits(), free - 1);
        tokio::time::advance(Duration::from_millis(1)).await;
        until(|| permits() == free).await;

        until(|| lock(&cache.caches.0.metadata.refreshing).is_empty()).await;

        // The key backs off as after a failure: within the backoff (1 to 1.25 s) the kept
        // answer is served stale at once and the backend is not asked again, though the key is
        // still within its stale-while-revalidate window.
        for _ in 0..20 {
            let response = cache.clone().oneshot(get("aws")).await.unwrap();
            assert!(response.is_stale());
            assert_eq!(response.stale_error(), None);
            assert_eq!(version(response), "1.0.1");
        }
        assert_eq!(permits(), free);
        assert!(lock(&cache.caches.0.metadata.refreshing).is_empty());
        tokio::time::advance(Duration::from_millis(999)).await;
        assert!(cache.clone().oneshot(get("aws")).await.unwrap().is_stale());
        assert_eq!(backend.calls(), 2);

        // After it, one refresh in the background, whose answer serves from then on.
        tokio::time::advance(Duration::from_millis(251)).await;
        backend.release();
        assert!(cache.clone().oneshot(get("aws")).await.unwrap().is_stale());
        until(|| backend.calls() == 3).await;
        until(|| lock(&cache.caches.0.metadata.refreshing).is_empty()).await;
        assert_eq!(version(first_fresh(&cache).await), "1.0.3");
        assert_eq!(backend.calls(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_refresh_run_in_place_and_given_up_backs_off_too() {
        // No background permit: a request holding a stale answer refreshes in place.
        let backend = Backend::new();
        let cache = backend.service_with(&CacheConfig {
            max_background_refreshes: 0,
            ..config()
        });
        cache.clone().oneshot(get("aws")).await.unwrap();
        tokio::time::advance(TTL).await;
        backend.hold();
        let started = Instant::now();
        let response = cache.clone().oneshot(get("aws")).await.unwrap();
        assert_eq!(started.elapsed(), REQUEST_TIMEOUT.mul_f64(0.9));
        assert!(response.is_stale());
        assert_eq!(version(response), "1.0.1");
        assert_eq!(backend.calls(), 2);

        // Given up at the request's deadline: the key backs off, so the next requests are
        // answered stale at once instead of waiting for the slow backend again.
        for _ in 0..5 {
            let at_once =
                tokio::time::timeout(Duration::from_millis(1), cache.clone().oneshot(get("aws")));
            let response = at_once.await.expect("not waited for").unwrap();
            assert!(response.is_stale());
        }
        assert_eq!(backend.calls(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_refresh_given_up_keeps_only_what_may_stand_in() {
        let policy = Policy {
            ttl: TTL,
            negative_ttl: TTL,
            stale_if_error: Duration::from_secs(600),
            stale_while_revalidate: Duration::from_secs(60),
            wait_for_refresh: REQUEST_TIMEOUT.mul_f64(0.9),
            background_limit: REQUEST_TIMEOUT,
        };
        let at = Instant::now();
        let kept = Entry {
            answer: Some((Ok(Value::Extension(Arc::new(extension("aws")))), at)),
            failure: Some(RegistryError::Internal("a bug".into())),
            backoff: None,
        };
        let now = at + TTL + Duration::from_secs(30);
        let once = policy.given_up(Some(&kept), now).expect("kept");
        // Only a backend fault is kept to answer with; the kept answer stands in meanwhile.
        assert_eq!(once.failure, None);
        assert_eq!(policy.judge(Some(&once), now), Judgement::BackingOff);
        assert!(policy.resolve(&once, now).unwrap().is_stale());
        // Given up again, the backoff doubles (2 to 2.5 s); an answer clears it.
        let twice = policy.given_up(Some(&once), now).expect("kept");
        let (failures, until) = twice.backoff.unwrap();
        assert_eq!(failures, 2);
        assert!(until >= now + Duration::from_secs(2), "{:?}", until - now);
        let answer = BackendResponse::Extension(Arc::new(extension("aws")));
        let answered = policy.next(Some(&twice), Ok(answer), now);
        assert_eq!(answered.backoff, None);
        // Past stale-if-error nothing may stand in: nothing is kept, and a backoff running
        // past that point does not answer with the old value.
        let late = at + TTL + Duration::from_secs(600);
        assert!(policy.given_up(Some(&kept), late).is_none());
        let edge = policy
            .given_up(Some(&kept), late - Duration::from_millis(500))
            .expect("kept");
        assert_eq!(
            policy.judge(Some(&edge), late - Duration::from_millis(1)),
            Judgement::BackingOff
        );
        assert_eq!(
            policy.judge(Some(&edge), late),
            Judgement::Refresh { stale_held: false }
        );
        // Without an answer there is nothing to keep.
        let failed = Entry {
            answer: None,
            failure: Some(unavailable()),
            backoff: None,
        };
        assert!(policy.given_up(Some(&failed), now).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_refresh_is_not_retried_before_its_backoff_and_doubles_it() {
        let backend = Backend::new();
        let cache = backend.service();
        cache.clone().oneshot(get("aws")).await.unwrap();
        tokio::time::advance(TTL).await;
        backend.fail_with(Some(unavailable()));
        let stale = cache.clone().oneshot(get("aws")).await.unwrap();
        assert_eq!(stale.stale_error(), Some(&unavailable()));
        assert_eq!(backend.calls(), 2);

        // Within the backoff (1 to 1.25 s) every request is answered stale at once, and the
        // backend is not asked.
        for _ in 0..50 {
            let response = cache.clone().oneshot(get("aws")).await.unwrap();
            assert_eq!(response.stale_error(), Some(&unavailable()));
        }
        tokio::time::advance(Duration::from_millis(999)).await;
        cache.clone().oneshot(get("aws")).await.unwrap();
        assert_eq!(backend.calls(), 2);
        // After it, one refresh, in the background: a key whose backends are known to fail is
        // not waited for, however slow they are now (on the paused clock, any wait at all
        // would end the timeout).
        tokio::time::advance(Duration::from_millis(251)).await;
        backend.hold();
        let at_once =
            tokio::time::timeout(Duration::from_millis(1), cache.clone().oneshot(get("aws")));
        let response = at_once.await.expect("not waited for").unwrap();
        assert_eq!(response.stale_error(), Some(&unavailable()));
        until(|| backend.calls() == 3).await;
        // It fails again: the next backoff is 2 to 2.5 s.
        backend.release();
        until(|| lock(&cache.caches.0.metadata.refreshing).is_empty()).await;
        tokio::time::advance(Duration::from_millis(1999)).await;
        cache.clone().oneshot(get("aws")).await.unwrap();
        assert_eq!(backend.calls(), 3);
        tokio::time::advance(Duration::from_millis(501)).await;
        cache.clone().oneshot(get("aws")).await.unwrap();
        until(|| backend.calls() == 4).await;

        // A cold key has its error at once meanwhile.
        let cold = cache.clone().oneshot(get("gcp")).await.unwrap_err();
        assert_eq!(cold, unavailable());
        for _ in 0..10 {
            assert_eq!(
                cache.clone().oneshot(get("gcp")).await.unwrap_err(),
                unavailable()
            );
        }
        assert_eq!(backend.calls(), 5);

        // A backend asking for more time (Retry-After) is given it.
        let suspended = RegistryError::suspended(
            Source::Gitea,
            "HTTP 429 asking to retry after 60 s",
            Duration::from_secs(60),
        );
        backend.fail_with(Some(suspended.clone()));
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(
            cache.clone().oneshot(get("gcp")).await.unwrap_err(),
            suspended
        );
        assert_eq!(backend.calls(), 6);
        tokio::time::advance(Duration::from_secs(59)).await;
        let waiting = cache.clone().oneshot(get("gcp")).await.unwrap_err();
        assert_eq!(
            waiting.retry_after(),
            Some(Duration::from_secs(1)),
            "counts down"
        );
        assert_eq!(backend.calls(), 6);
        backend.fail_with(None);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(
            version(cache.clone().oneshot(get("gcp")).await.unwrap()),
            "1.0.7"
        );
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
        let refreshed = cache.clone().oneshot(get("aws")).await.unwrap();
        assert_eq!(backend.calls(), 2, "expired entries are refreshed");
        let again = cache.clone().oneshot(get("aws")).await.unwrap();
        assert_eq!(backend.calls(), 2, "the refreshed entry is served");
        assert!(Arc::ptr_eq(
            &refreshed.into_extension().unwrap(),
            &again.into_extension().unwrap()
        ));
        let stats = cache.caches.stats();
        assert_eq!((stats.metadata_hits, stats.metadata_misses), (2, 2));
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

        // Recovered: once the backoff after that second failure (2 to 2.5 s) is over, fresh
        // again, no longer stale.
        backend.fail_with(None);
        tokio::time::advance(Duration::from_millis(2500)).await;
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
        // Past the backoff of the failure (1 to 1.25 s).
        tokio::time::advance(Duration::from_millis(1250)).await;
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
        let cache = CacheLayer::new(caches(&config())).layer(backend);
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
        let stats = cache.caches.stats();
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
        let uncached = CacheLayer::new(caches(&off)).layer(counting);
        for _ in 0..2 {
            let list = BackendRequest::List(ListFilter::default());
            uncached.clone().oneshot(list).await.unwrap();
        }
        assert_eq!(backend.calls(), 4);
        assert_eq!(uncached.caches.stats().list_misses, 0);
    }
}
