//! The shared cache level, under each replica's in-process cache: what one replica fetched
//! from the backends, the others take from Redis; and a key cold everywhere is fetched by one
//! replica only (cluster-wide single-flight).
//!
//! Only listings, single extensions and versions are shared (renderings and compressed forms
//! are cheap to rebuild per replica). A value is stored as JSON with the time it was fetched
//! (`fetched_at_ms`, wall clock) and the schema version in its key; the replica that takes it
//! hands its age up ([`BackendResponse::Shared`]), so the cache above judges its freshness,
//! stale-while-revalidate and stale-if-error windows from when it was fetched, as every other
//! replica does. It is served from here only while fresh (`ttl_seconds`); "not found" is
//! shared too, for `negative_ttl_seconds`. Redis expires a value once no replica could serve
//! it any more.
//!
//! Single-flight: the replica that misses takes a lock (`SET NX PX`, expiring after the
//! request timeout, so a replica dying with it holds nobody up for longer) and asks the
//! backends; the others poll for its answer (every 10 ms, doubling to 200 ms) while the lock
//! is held, for at most nine tenths of the request timeout, then ask the backends
//! themselves. A lock gone with no answer (its holder failed or died) is taken over by the
//! next poller. Whenever Redis does not answer, the request goes straight to the backends.
//!
//! A backend that failed or did not answer in time for the lock holder fails its waiters
//! too: the holder keeps the fault under `{key_prefix}v1:fault:{key}` for
//! [`FAULT_SHARED_FOR`], and a replica that waited for the lock reads it there instead of
//! asking the sick backend again, one replica after another, each for as long as it takes to
//! fail. A request that did not wait never reads it: the next one asks again, and the next
//! holder drops it before asking, so its own waiters never take an earlier fault. A waiter given
//! the fault serves what its own cache may still serve in its place (stale-if-error), as the
//! holder does. Suspensions (a circuit breaker's, or an upstream's `Retry-After`) are each
//! replica's own, and are not shared.
//!
//! A holder stores (a Lua script, so the checks and the write are one step) only while the
//! lock is still its own: a refresh that outlived its lock, which another replica has since
//! taken over, never overwrites what that one stored.
//!
//! An invalidation drops the shared answers its scope covers ([`SharedLevel::forget`]): the
//! keys under `{key_prefix}v1:cache:` are walked with `SCAN` (1000 at a time, each step
//! bounded like any command) and the covered ones removed with `UNLINK`, so its cost grows
//! with the number of keys in the database, once per invalidation, never per request.
//!
//! A refresh already under way when an invalidation arrives may have read the old state: it
//! must not store that answer after the keys were dropped, where it would stay until it
//! expires. An invalidation first increments one cluster-wide generation,
//! `{key_prefix}v1:gen`; the replica holding the lock reads it before asking the backends,
//! and stores their answer (a Lua script, so the check and the write are one step) only if
//! the generation is still the one it read. Such an answer still goes to the requests that
//! waited for it, it is only not shared. A generation that cannot be read (Redis failing)
//! means the answer is not shared either.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};

use super::Redis;
use crate::config::CacheConfig;
use crate::invalidation::{Scope, SharedLevel};
use crate::registry::{
    BackendFuture, BackendRequest, BackendResponse, Extension, InstanceName, RegistryError, Source,
    SourceSelector, Version,
};

/// How many keys one `SCAN` step of an invalidation looks at.
const SCAN_COUNT: u64 = 1000;

/// The first wait between polls for another replica's answer.
const POLL_INITIAL: Duration = Duration::from_millis(10);
/// The longest.
const POLL_MAX: Duration = Duration::from_millis(200);

/// How long a backend fault met by the lock holder is kept for its waiters: several of the
/// longest polls, so every waiter sees it, and no longer (Redis expires it).
const FAULT_SHARED_FOR: Duration = Duration::from_secs(1);

/// Deletes the lock only if it is still the one this replica took (a lock that expired may
/// have been taken over).
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// Stores `ARGV[1]` under `KEYS[1]`, kept `ARGV[2]` ms, only while the lock (`KEYS[3]`) is
/// still the one this replica took (`ARGV[4]`) and the generation (`KEYS[2]`, none counting
/// as 0) is still `ARGV[3]`, the one read before the backends were asked.
const STORE: &str = r"
if redis.call('GET', KEYS[3]) == ARGV[4] and (redis.call('GET', KEYS[2]) or '0') == ARGV[3] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
";

/// An answer as it is kept in Redis.
#[derive(Debug, Serialize, Deserialize)]
struct Stored {
    /// When a backend gave it, in milliseconds since the Unix epoch.
    fetched_at_ms: u64,
    answer: Answer,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Answer {
    List(Vec<Extension>),
    Extension(Box<Extension>),
    Versions(Vec<Version>),
    /// "Not found", with its message.
    NotFound(String),
}

/// A backend fault as the lock holder shares it with its waiters.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "fault", rename_all = "snake_case")]
enum Fault {
    Unavailable {
        backend: Source,
        instance: Option<InstanceName>,
        reason: String,
    },
    Timeout {
        backend: Source,
        instance: Option<InstanceName>,
    },
}

impl Fault {
    /// What of a failure is shared: a backend asked that failed or did not answer in time.
    fn of(error: &RegistryError) -> Option<Self> {
        match error {
            RegistryError::BackendUnavailable {
                backend,
                instance,
                reason,
            } => Some(Self::Unavailable {
                backend: *backend,
                instance: instance.clone(),
                reason: reason.clone(),
            }),
            RegistryError::BackendTimeout { backend, instance } => Some(Self::Timeout {
                backend: *backend,
                instance: instance.clone(),
            }),
            _ => None,
        }
    }

    fn error(self) -> RegistryError {
        match self {
            Self::Unavailable {
                backend,
                instance,
                reason,
            } => RegistryError::BackendUnavailable {
                backend,
                instance,
                reason,
            },
            Self::Timeout { backend, instance } => {
                RegistryError::BackendTimeout { backend, instance }
            }
        }
    }
}

impl Answer {
    /// What of a backend outcome is shared as an answer: values and "not found" (faults,
    /// see [`Fault`]).
    fn of(outcome: &Result<BackendResponse, RegistryError>) -> Option<Self> {
        match outcome {
            Ok(BackendResponse::List(l)) => Some(Self::List(l.to_vec())),
            Ok(BackendResponse::Extension(e)) => Some(Self::Extension(Box::new((**e).clone()))),
            Ok(BackendResponse::Versions(v)) => Some(Self::Versions(v.to_vec())),
            Err(RegistryError::NotFound(message)) => Some(Self::NotFound(message.clone())),
            _ => None,
        }
    }

    fn outcome(self, age: Duration) -> Result<BackendResponse, RegistryError> {
        let response = match self {
            Self::List(l) => BackendResponse::List(Arc::new(l)),
            Self::Extension(e) => BackendResponse::Extension(Arc::from(e)),
            Self::Versions(v) => BackendResponse::Versions(Arc::new(v)),
            Self::NotFound(message) => return Err(RegistryError::NotFound(message)),
        };
        Ok(BackendResponse::Shared {
            response: Box::new(response),
            age,
        })
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The freshness rules, from `[cache]` and the request timeout.
#[derive(Clone, Copy, Debug)]
struct Rules {
    ttl: Duration,
    negative_ttl: Duration,
    /// How long Redis keeps a value: as long as a replica could serve it, fresh or stale.
    keep: Duration,
    /// The lock's expiry.
    lock: Duration,
    /// How long a replica waits for another's answer.
    wait: Duration,
}

/// Counters of the shared cache.
struct Counters {
    hits: metrics::Counter,
    misses: metrics::Counter,
    lock_waits: metrics::Counter,
    takeovers: metrics::Counter,
    faults: metrics::Counter,
}

/// Puts the shared cache under the in-process one.
#[derive(Clone)]
pub struct SharedCacheLayer {
    state: Arc<State>,
}

struct State {
    redis: Redis,
    rules: Rules,
    counters: Counters,
    release: redis::Script,
    store: redis::Script,
    /// The generation key, `{key_prefix}v1:gen`.
    generation: String,
}

impl SharedCacheLayer {
    pub fn new(redis: Redis, cache: &CacheConfig, request_timeout: Duration) -> Self {
        let ttl = Duration::from_secs(cache.ttl_seconds);
        let rules = Rules {
            ttl,
            negative_ttl: Duration::from_secs(cache.negative_ttl_seconds),
            keep: ttl
                + Duration::from_secs(
                    cache
                        .stale_if_error_seconds
                        .max(cache.stale_while_revalidate_seconds),
                ),
            lock: request_timeout,
            wait: request_timeout.mul_f64(0.9),
        };
        Self {
            state: Arc::new(State {
                rules,
                counters: Counters {
                    hits: metrics::counter!("redis_cache_hits_total"),
                    misses: metrics::counter!("redis_cache_misses_total"),
                    lock_waits: metrics::counter!("redis_cache_lock_waits_total"),
                    takeovers: metrics::counter!("redis_cache_lock_takeovers_total"),
                    faults: metrics::counter!("redis_cache_faults_shared_total"),
                },
                release: redis::Script::new(RELEASE),
                store: redis::Script::new(STORE),
                generation: redis.key("gen"),
                redis,
            }),
        }
    }
}

impl SharedLevel for SharedCacheLayer {
    fn forget<'a>(&'a self, scope: &'a Scope) -> BoxFuture<'a, Option<u64>> {
        Box::pin(self.state.forget(scope))
    }
}

impl<S> Layer<S> for SharedCacheLayer {
    type Service = SharedCache<S>;

    fn layer(&self, inner: S) -> SharedCache<S> {
        SharedCache {
            inner,
            state: self.state.clone(),
        }
    }
}

/// See the module documentation.
#[derive(Clone)]
pub struct SharedCache<S> {
    inner: S,
    state: Arc<State>,
}

impl<S> Service<BackendRequest> for SharedCache<S>
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
        let Some(key) = key_of(&req) else {
            return Box::pin(self.inner.call(req));
        };
        // Answered from Redis or by the backends after a wait: a clone of the backends is
        // asked then; the ready one is left unused.
        let inner = self.inner.clone();
        let state = self.state.clone();
        Box::pin(async move { state.answer(inner, req, key).await })
    }
}

/// Whether the shared key `key` (as [`key_of`] makes it) may hold an answer `scope` changed.
fn covered(scope: &Scope, key: &str) -> bool {
    // `list:{type|any}:{source}`, `get:{type}/{name}:{source}`, `versions:{type}/{name}:{source}`
    // where the source is `any`, a kind, or `@{instance}`
    let Some((kind, what)) = key.split_once(':') else {
        return false;
    };
    let Some((what, _source)) = what.rsplit_once(':') else {
        return false;
    };
    match (scope, kind) {
        (Scope::All, _) => true,
        (Scope::Type(ty), "list") => what == "any" || what == ty.as_str(),
        (Scope::Extension(key), "list") => what == "any" || what == key.ty.as_str(),
        (Scope::Type(ty), _) => what
            .split_once('/')
            .is_some_and(|(listed, _)| listed == ty.as_str()),
        (Scope::Extension(key), _) => what == key.to_string(),
    }
}

/// The key of a shared request, without the prefix; `None` for what is not shared.
fn key_of(req: &BackendRequest) -> Option<String> {
    // A kind by its name, an instance as `@name` (instance names may repeat a kind's).
    let source = |s: &Option<SourceSelector>| match s {
        None => "any".to_owned(),
        Some(SourceSelector::Kind(kind)) => kind.as_str().to_owned(),
        Some(SourceSelector::Instance(instance)) => format!("@{}", instance.name),
    };
    match req {
        BackendRequest::List(filter) => Some(format!(
            "list:{}:{}",
            filter.ty.map_or("any", |t| t.as_str()),
            source(&filter.source)
        )),
        BackendRequest::Get { key, source: s } => Some(format!("get:{key}:{}", source(s))),
        BackendRequest::Versions { key, source: s } => {
            Some(format!("versions:{key}:{}", source(s)))
        }
        _ => None,
    }
}

impl State {
    async fn answer<S>(
        &self,
        inner: S,
        req: BackendRequest,
        key: String,
    ) -> Result<BackendResponse, RegistryError>
    where
        S: Service<BackendRequest, Response = BackendResponse, Error = RegistryError>,
    {
        let redis = &self.redis;
        let flight = Flight {
            value: redis.key(&format!("cache:{key}")),
            fault: redis.key(&format!("fault:{key}")),
            lock: redis.key(&format!("lock:{key}")),
            token: format!("{:016x}", fastrand::u64(..)),
        };
        let started = Instant::now();
        let mut poll = POLL_INITIAL;
        let mut waited = false;
        loop {
            if let Some(found) = self.lookup(&flight.value).await {
                return found;
            }
            if waited {
                if let Some(fault) = self.fault(&flight.fault).await {
                    return Err(fault);
                }
            }
            if !redis.is_available() || started.elapsed() >= self.rules.wait {
                // Redis gone, or the other replica too slow: the backends, unshared.
                return inner.oneshot(req).await;
            }
            let take = redis::cmd("SET")
                .arg(&flight.lock)
                .arg(&flight.token)
                .arg("NX")
                .arg("PX")
                .arg(self.rules.lock.as_millis() as u64)
                .clone();
            match redis.run::<Option<String>>(&take).await {
                Some(Some(_)) => {
                    // Another replica may have stored its answer (or its fault) and let go of
                    // the lock between the lookups above and taking it.
                    let outcome = match self.lookup(&flight.value).await {
                        Some(found) => found,
                        None => match waited.then(|| self.fault(&flight.fault)) {
                            Some(fault) => match fault.await {
                                Some(fault) => Err(fault),
                                None => self.fetch(inner, req, &flight, waited).await,
                            },
                            None => self.fetch(inner, req, &flight, waited).await,
                        },
                    };
                    let mut release = self.release.key(&flight.lock);
                    release.arg(&flight.token);
                    redis.invoke::<i64>(&release).await;
                    return outcome;
                }
                Some(None) => {
                    if !waited {
                        self.counters.lock_waits.increment(1);
                        waited = true;
                    }
                    tokio::time::sleep(poll).await;
                    poll = (poll * 2).min(POLL_MAX);
                }
                // Redis failed just now.
                None => return inner.oneshot(req).await,
            }
        }
    }

    /// Asks the backends under the lock, and shares their answer, or their fault with the
    /// waiters.
    async fn fetch<S>(
        &self,
        inner: S,
        req: BackendRequest,
        flight: &Flight,
        waited: bool,
    ) -> Result<BackendResponse, RegistryError>
    where
        S: Service<BackendRequest, Response = BackendResponse, Error = RegistryError>,
    {
        self.counters.misses.increment(1);
        if waited {
            self.counters.takeovers.increment(1);
        }
        // A fault an earlier holder left is not this flight's: its waiters must not take it.
        self.redis
            .run::<u64>(redis::cmd("DEL").arg(&flight.fault))
            .await;
        // Read before the backends are asked: see the module documentation.
        let generation = self
            .redis
            .run::<Option<u64>>(redis::cmd("GET").arg(&self.generation))
            .await;
        let outcome = inner.oneshot(req).await;
        let Some(generation) = generation.map(Option::unwrap_or_default) else {
            return outcome;
        };
        // Taken out first: an answer is not `Sync` (downloads stream).
        let shared = match Answer::of(&outcome) {
            Some(answer) => {
                let keep = match answer {
                    Answer::NotFound(_) => self.rules.negative_ttl,
                    _ => self.rules.keep,
                };
                let stored = Stored {
                    fetched_at_ms: now_ms(),
                    answer,
                };
                Some((&flight.value, json(&stored), keep))
            }
            None => outcome
                .as_ref()
                .err()
                .and_then(Fault::of)
                .map(|fault| (&flight.fault, json(&fault), FAULT_SHARED_FOR)),
        };
        if let Some((key, Some(text), keep)) = shared {
            if !keep.is_zero() {
                self.store(key, text, keep, flight, generation).await;
            }
        }
        outcome
    }

    /// Drops the shared answers `scope` covers, counting them; `None` when Redis did not
    /// take every command (some may be left). See the module documentation.
    async fn forget(&self, scope: &Scope) -> Option<u64> {
        // First, so a refresh that read the old state stores nothing from now on; the keys
        // stored before are dropped below.
        let bump = redis::cmd("INCR").arg(&self.generation).clone();
        self.redis.run::<u64>(&bump).await?;
        let base = self.redis.key("cache:");
        let pattern = format!("{base}*");
        let (mut cursor, mut forgotten) = (0_u64, 0);
        loop {
            let scan = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(SCAN_COUNT)
                .clone();
            let (next, keys) = self.redis.run::<(u64, Vec<String>)>(&scan).await?;
            let covered: Vec<&String> = keys
                .iter()
                .filter(|k| k.strip_prefix(&base).is_some_and(|k| covered(scope, k)))
                .collect();
            if !covered.is_empty() {
                let unlink = redis::cmd("UNLINK").arg(&covered).clone();
                forgotten += self.redis.run::<u64>(&unlink).await?;
            }
            if next == 0 {
                return Some(forgotten);
            }
            cursor = next;
        }
    }

    /// A fresh shared answer for `value_key`, if Redis has one; counted.
    async fn lookup(&self, value_key: &str) -> Option<Result<BackendResponse, RegistryError>> {
        let text: Option<String> = self
            .redis
            .run(redis::cmd("GET").arg(value_key))
            .await
            .flatten();
        let stored: Stored = match serde_json::from_str(&text?) {
            Ok(stored) => stored,
            Err(e) => {
                tracing::warn!(key = value_key, error = %e, "unreadable shared answer ignored");
                return None;
            }
        };
        let age = Duration::from_millis(now_ms().saturating_sub(stored.fetched_at_ms));
        let fresh_for = match stored.answer {
            Answer::NotFound(_) => self.rules.negative_ttl,
            _ => self.rules.ttl,
        };
        let fresh = age < fresh_for;
        if fresh {
            self.counters.hits.increment(1);
        }
        fresh.then(|| stored.answer.outcome(age))
    }

    /// The fault the lock holder kept under `fault_key`, if any; counted.
    async fn fault(&self, fault_key: &str) -> Option<RegistryError> {
        let text: Option<String> = self
            .redis
            .run(redis::cmd("GET").arg(fault_key))
            .await
            .flatten();
        let fault: Fault = serde_json::from_str(&text?)
            .inspect_err(
                |e| tracing::warn!(key = fault_key, error = %e, "unreadable shared fault ignored"),
            )
            .ok()?;
        self.counters.faults.increment(1);
        Some(fault.error())
    }

    /// Stores `text` under `key` for `keep`, while `flight`'s lock is still this replica's
    /// and no invalidation has moved the generation on from `generation`.
    async fn store(
        &self,
        key: &str,
        text: String,
        keep: Duration,
        flight: &Flight,
        generation: u64,
    ) {
        let mut store = self.store.key(key);
        store
            .key(&self.generation)
            .key(&flight.lock)
            .arg(text)
            .arg(keep.as_millis() as u64)
            .arg(generation)
            .arg(&flight.token);
        self.redis.invoke::<i64>(&store).await;
    }
}

/// The keys of one shared request, and the token of this replica's lock on it.
struct Flight {
    value: String,
    fault: String,
    lock: String,
    token: String,
}

fn json<T: Serialize>(value: &T) -> Option<String> {
    serde_json::to_string(value).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{
        ExtensionKey, ExtensionName, ExtensionType, Instance, ListFilter, Source,
    };

    #[test]
    fn backends_that_failed_or_timed_out_are_shared_as_they_were_met_and_nothing_else_is() {
        let named = |e: RegistryError| {
            e.with_instance(&Instance {
                kind: Source::Gitea,
                name: "forge-b".into(),
            })
        };
        for fault in [
            RegistryError::unavailable(Source::Gitea, "HTTP 502"),
            named(RegistryError::unavailable(
                Source::Gitea,
                "connection refused",
            )),
            RegistryError::timeout(Source::Oci),
            named(RegistryError::timeout(Source::Gitea)),
        ] {
            let shared = Fault::of(&fault).unwrap_or_else(|| panic!("{fault:?} is not shared"));
            let text = serde_json::to_string(&shared).unwrap();
            let read: Fault = serde_json::from_str(&text).unwrap();
            assert_eq!(read.error(), fault, "{text}");
        }
        for not_shared in [
            // Each replica's own circuit breaker, or an upstream's Retry-After.
            RegistryError::suspended(Source::Gitea, "circuit open", Duration::from_secs(30)),
            RegistryError::auth_failed(Source::Gitea),
            RegistryError::Internal("bug".into()),
            RegistryError::InvalidName,
            RegistryError::not_found("provider/aws"),
        ] {
            assert!(Fault::of(&not_shared).is_none(), "{not_shared:?}");
        }
    }

    #[test]
    fn an_invalidation_drops_the_shared_keys_the_in_process_cache_drops() {
        let key = |ty, name| ExtensionKey {
            ty,
            name: ExtensionName::parse(name).unwrap(),
        };
        let (aws, aws2, k8s) = (
            key(ExtensionType::Provider, "aws"),
            key(ExtensionType::Provider, "aws2"),
            key(ExtensionType::Taskserv, "k8s.io"),
        );
        let mut requests = Vec::new();
        let named = SourceSelector::Instance(Instance {
            kind: Source::Gitea,
            name: "forge-b".into(),
        });
        for source in [
            None,
            Some(Source::Gitea.into()),
            Some(Source::Local.into()),
            Some(named),
        ] {
            for ty in [
                None,
                Some(ExtensionType::Provider),
                Some(ExtensionType::Cluster),
            ] {
                requests.push(BackendRequest::List(ListFilter {
                    ty,
                    source: source.clone(),
                }));
            }
            for key in [&aws, &aws2, &k8s] {
                requests.push(BackendRequest::Get {
                    key: key.clone(),
                    source: source.clone(),
                });
                requests.push(BackendRequest::Versions {
                    key: key.clone(),
                    source: source.clone(),
                });
            }
        }
        let scopes = [
            Scope::All,
            Scope::Type(ExtensionType::Provider),
            Scope::Type(ExtensionType::Taskserv),
            Scope::Extension(aws.clone()),
            Scope::Extension(k8s.clone()),
        ];
        for scope in &scopes {
            for request in &requests {
                let expected = match request {
                    BackendRequest::List(filter) => scope.covers_listing(filter),
                    BackendRequest::Get { key, .. } | BackendRequest::Versions { key, .. } => {
                        scope.covers(key)
                    }
                    _ => unreachable!(),
                };
                let shared = key_of(request).unwrap();
                assert_eq!(covered(scope, &shared), expected, "{scope:?} {shared}");
            }
        }
    }
}
