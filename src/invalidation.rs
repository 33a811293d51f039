//! The one way to drop cached answers when extensions change upstream.
//!
//! [`Invalidator::invalidate`] drops what this replica holds for a [`Scope`] and hands the
//! scope to the [`Bus`], when one is attached, so the other replicas drop it too; a scope
//! arriving from another replica goes to [`Invalidator::apply`], which drops locally only.
//! Whatever learns of a change (a webhook, an operator's purge) calls `invalidate` and
//! nothing else; a source that may announce a change before it can be seen (the CNCF
//! registry, distribution issue #2625) calls [`Invalidator::invalidate_settling`], which
//! invalidates once more [`SETTLE`] later, so an answer read in between is not kept for the
//! whole TTL.
//!
//! The level the replicas share (Redis, [`SharedLevel`]) is dropped by the replica that learns
//! of the change, before it drops its own entries and before it tells the others: every
//! replica that then asks again (a client, or a refresh ahead) finds the shared level empty
//! for that scope and fetches once for the whole cluster, through the shared single-flight,
//! instead of taking the old answer back from it. Replicas applying a peer's invalidation do
//! not drop the shared level again: they would drop the new answer the first one fetched.
//!
//! With `[cache] refresh_on_invalidate`, dropping one extension also fetches its metadata and
//! versions again in the background (on every replica that drops it), under one of the
//! cache's background-refresh permits: none free, no refresh ahead, and the next client
//! fetches as it would have.
//!
//! An invalidation the shared level or the bus could not take (Redis down or frozen) is
//! remembered and delivered again every [`REDELIVER_AFTER`] until Redis takes it: otherwise
//! the shared answers it should have dropped would outlive it, and every replica would take
//! them back once Redis answered again (all of them drop their own entries when their
//! subscription is renewed). At most [`MAX_UNDELIVERED`] scopes are remembered; past that,
//! everything is.
//!
//! Renderings need no dropping of their own: each is served only while the cached value it
//! was rendered from is the one in the cache, so the next answer after an invalidation is
//! rendered afresh. A refresh already under way when an invalidation arrives may have read
//! the old state; its answer is handed to the requests waiting for it but not kept, here nor
//! in the shared level (which counts invalidations for that, see [`crate::redis::cache`]).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use serde::Serialize;
use tower::ServiceExt;

use crate::middleware::cache::Caches;
use crate::registry::{BackendRequest, BackendService, ExtensionKey, ExtensionType, ListFilter};

/// How long after a settling invalidation the scope is invalidated again: the CNCF registry
/// notifies as soon as a manifest is written, and its tag list may lag that by moments.
pub const SETTLE: Duration = Duration::from_secs(2);

/// Most settling re-checks waiting at once (one per scope); past it a new one is skipped,
/// and that scope's answer is as fresh as the TTL keeps it.
pub const MAX_SETTLING: usize = 1024;

/// How often invalidations Redis could not take are delivered again, while there are any.
pub const REDELIVER_AFTER: Duration = Duration::from_secs(1);

/// Most undelivered invalidations remembered one by one; past it they become one of
/// [`Scope::All`].
pub const MAX_UNDELIVERED: usize = 64;

/// What changed.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Anything: every cached answer.
    All,
    /// The extensions of one type.
    Type(ExtensionType),
    /// One extension, from whichever source.
    Extension(ExtensionKey),
}

impl Scope {
    /// The label of `invalidations_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Self::All => "all",
            Self::Type(_) => "type",
            Self::Extension(_) => "extension",
        }
    }

    /// Whether the metadata and versions of `key` may have changed.
    pub fn covers(&self, key: &ExtensionKey) -> bool {
        match self {
            Self::All => true,
            Self::Type(ty) => key.ty == *ty,
            Self::Extension(changed) => key == changed,
        }
    }

    /// Whether a listing under `filter` may hold a changed extension.
    pub fn covers_listing(&self, filter: &ListFilter) -> bool {
        let ty = match self {
            Self::All => return true,
            Self::Type(ty) => ty,
            Self::Extension(key) => &key.ty,
        };
        filter.ty.is_none_or(|listed| listed == *ty)
    }
}

/// What an invalidation dropped on this replica.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Dropped {
    pub listings: u64,
    pub metadata: u64,
    pub versions: u64,
}

/// Carries invalidations to the other replicas.
pub trait Bus: Send + Sync + 'static {
    /// Tells the other replicas that `scope` changed, without waiting for them; `false` when
    /// the message could not be sent.
    fn publish<'a>(&'a self, scope: &'a Scope) -> BoxFuture<'a, bool>;
}

/// The cache level every replica reads (Redis).
pub trait SharedLevel: Send + Sync + 'static {
    /// Drops the shared answers `scope` covers, returning how many; `None` when the level
    /// did not answer (so some may be left).
    fn forget<'a>(&'a self, scope: &'a Scope) -> BoxFuture<'a, Option<u64>>;
}

/// Drops cached answers here and, through the bus, on every other replica.
#[derive(Clone)]
pub struct Invalidator {
    caches: Caches,
    bus: Option<Arc<dyn Bus>>,
    /// The level shared with the other replicas, dropped by the replica learning of a change.
    shared: Option<Arc<dyn SharedLevel>>,
    /// The cached registry, asked again for an invalidated extension when refreshing ahead.
    ahead: Option<BackendService>,
    /// The scopes with a settling re-check waiting.
    settling: Arc<Mutex<HashSet<Scope>>>,
    /// Invalidations the shared level or the bus could not take, delivered again.
    undelivered: Arc<Mutex<Undelivered>>,
}

#[derive(Default)]
struct Undelivered {
    scopes: Vec<Scope>,
    /// Whether the task delivering them again runs.
    redelivering: bool,
}

impl Undelivered {
    /// Adds `scope` once; past [`MAX_UNDELIVERED`], or for everything, keeps everything alone.
    fn add(&mut self, scope: Scope) {
        let scopes = &mut self.scopes;
        if scopes.first() == Some(&Scope::All) || scopes.contains(&scope) {
            return;
        }
        if scope == Scope::All || scopes.len() >= MAX_UNDELIVERED {
            *scopes = vec![Scope::All];
        } else {
            scopes.push(scope);
        }
    }
}

impl Invalidator {
    /// Invalidates this replica's `caches` only.
    pub fn new(caches: Caches) -> Self {
        Self {
            caches,
            bus: None,
            shared: None,
            ahead: None,
            settling: Arc::default(),
            undelivered: Arc::default(),
        }
    }

    /// Invalidates the other replicas too, through `bus`.
    pub fn with_bus(self, bus: Arc<dyn Bus>) -> Self {
        Self {
            bus: Some(bus),
            ..self
        }
    }

    /// Drops `shared` too when this replica learns of a change.
    pub fn with_shared(self, shared: Arc<dyn SharedLevel>) -> Self {
        Self {
            shared: Some(shared),
            ..self
        }
    }

    /// After dropping one extension, asks `registry` (the cached one) for its metadata and
    /// versions again in the background, so the next client finds them warm.
    pub fn refreshing_ahead(self, registry: BackendService) -> Self {
        Self {
            ahead: Some(registry),
            ..self
        }
    }

    /// `scope` changed: drops it from the shared level, here, and tells the other replicas.
    pub async fn invalidate(&self, scope: Scope) -> Dropped {
        let forgotten = self.forget_shared(&scope).await;
        let dropped = self.drop_local(&scope, "local");
        let told = self.tell(&scope).await;
        if !(forgotten && told) {
            self.remember_undelivered(scope);
        }
        dropped
    }

    /// Drops `scope` from the shared level; whether the level took it (or there is none).
    async fn forget_shared(&self, scope: &Scope) -> bool {
        let Some(shared) = &self.shared else {
            return true;
        };
        let forgotten = shared.forget(scope).await;
        tracing::debug!(?scope, ?forgotten, "shared answers dropped");
        forgotten.is_some()
    }

    /// Tells the other replicas; whether the bus took it (or there is none).
    async fn tell(&self, scope: &Scope) -> bool {
        match &self.bus {
            Some(bus) => bus.publish(scope).await,
            None => true,
        }
    }

    /// Keeps `scope` to deliver again, and starts delivering while none does.
    fn remember_undelivered(&self, scope: Scope) {
        let mut undelivered = lock(&self.undelivered);
        undelivered.add(scope);
        if undelivered.redelivering {
            return;
        }
        undelivered.redelivering = true;
        tracing::warn!("invalidations did not reach redis; delivering them again until it answers");
        let this = self.clone();
        tokio::spawn(async move { this.redeliver().await });
    }

    /// Delivers the undelivered invalidations every [`REDELIVER_AFTER`] until all are: each
    /// is dropped from the shared level, then here again (an answer this replica took back
    /// from Redis before it was dropped there would otherwise stay), then told.
    async fn redeliver(&self) {
        loop {
            tokio::time::sleep(REDELIVER_AFTER).await;
            let pending = std::mem::take(&mut lock(&self.undelivered).scopes);
            let mut failed = Vec::new();
            for scope in pending {
                let forgotten = self.forget_shared(&scope).await;
                if forgotten {
                    self.drop_local(&scope, "redelivered");
                }
                if !(forgotten && self.tell(&scope).await) {
                    failed.push(scope);
                }
            }
            let mut undelivered = lock(&self.undelivered);
            for scope in failed {
                undelivered.add(scope);
            }
            if undelivered.scopes.is_empty() {
                undelivered.redelivering = false;
                tracing::info!("undelivered invalidations delivered");
                return;
            }
        }
    }

    /// `scope` changed, but its source may not show the change yet: invalidates now and once
    /// more [`SETTLE`] later (at most one re-check waits per scope; replays while one waits
    /// add none). Returns what was dropped now.
    pub async fn invalidate_settling(&self, scope: Scope) -> Dropped {
        let dropped = self.invalidate(scope.clone()).await;
        let fresh = {
            let mut settling = lock(&self.settling);
            settling.len() < MAX_SETTLING && settling.insert(scope.clone())
        };
        if fresh {
            let this = self.clone();
            tokio::spawn(async move {
                tokio::time::sleep(SETTLE).await;
                lock(&this.settling).remove(&scope);
                this.invalidate(scope).await;
            });
        }
        dropped
    }

    /// Another replica announced that `scope` changed: drops it here only.
    pub fn apply(&self, scope: &Scope) -> Dropped {
        self.drop_local(scope, "peer")
    }

    fn drop_local(&self, scope: &Scope, origin: &'static str) -> Dropped {
        let dropped = self.caches.invalidate(scope);
        metrics::counter!("invalidations_total", "scope" => scope.label(), "origin" => origin)
            .increment(1);
        tracing::info!(?scope, origin, ?dropped, "cached answers invalidated");
        self.refresh_ahead(scope);
        dropped
    }

    /// Fetches an invalidated extension's metadata and versions in the background, when
    /// refreshing ahead and a background permit is free.
    fn refresh_ahead(&self, scope: &Scope) {
        let (Some(registry), Scope::Extension(key)) = (&self.ahead, scope) else {
            return;
        };
        let Some(permit) = self.caches.background_permit() else {
            tracing::debug!(%key, "every background refresh permit is taken; not refreshing ahead");
            return;
        };
        let (registry, key) = (registry.clone(), key.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let requests = [
                BackendRequest::Get {
                    key: key.clone(),
                    source: None,
                },
                BackendRequest::Versions { key, source: None },
            ];
            for request in requests {
                // A failure is the cache's to remember and the next client's to see.
                let _ = registry.clone().oneshot(request).await;
            }
        });
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // One insert or remove at a time: consistent whatever panicked.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tower::Layer;

    use super::*;
    use crate::config::CacheConfig;
    use crate::middleware::cache::CacheLayer;
    use crate::registry::{BackendResponse, ExtensionName, RegistryError};

    /// A cached registry over a backend counting its calls.
    fn registry(caches: &Caches) -> (BackendService, Arc<AtomicUsize>) {
        let calls = Arc::new(AtomicUsize::new(0));
        let seen = calls.clone();
        let backend = tower::service_fn(move |req: BackendRequest| {
            seen.fetch_add(1, Ordering::SeqCst);
            async move {
                match req {
                    BackendRequest::Get { key, .. } => Err(RegistryError::not_found(&key)),
                    _ => Ok(BackendResponse::Versions(Arc::new(Vec::new()))),
                }
            }
        });
        let service = BackendService::new(CacheLayer::new(caches.clone()).layer(backend));
        (service, calls)
    }

    fn caches() -> Caches {
        Caches::new(&CacheConfig::default(), Duration::from_secs(30))
    }

    fn aws() -> ExtensionKey {
        ExtensionKey {
            ty: ExtensionType::Provider,
            name: ExtensionName::parse("aws").unwrap(),
        }
    }

    async fn versions(registry: &BackendService) {
        let request = BackendRequest::Versions {
            key: aws(),
            source: None,
        };
        registry.clone().oneshot(request).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_settling_invalidation_drops_again_what_was_read_in_between() {
        for settling in [false, true] {
            let caches = caches();
            let (registry, calls) = registry(&caches);
            let invalidator = Invalidator::new(caches);
            versions(&registry).await;
            let scope = Scope::Extension(aws());
            if settling {
                invalidator.invalidate_settling(scope).await;
            } else {
                invalidator.invalidate(scope).await;
            }
            // Read at once, as the registry's tag list may still lack the new tag.
            versions(&registry).await;
            assert_eq!(calls.load(Ordering::SeqCst), 2);
            tokio::time::sleep(SETTLE + Duration::from_millis(1)).await;
            versions(&registry).await;
            // Without settling, the early read stays fresh for the whole TTL.
            let expected = if settling { 3 } else { 2 };
            assert_eq!(
                calls.load(Ordering::SeqCst),
                expected,
                "settling: {settling}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn replayed_settling_invalidations_wait_for_one_recheck() {
        let caches = caches();
        let (registry, calls) = registry(&caches);
        let invalidator = Invalidator::new(caches);
        for _ in 0..5 {
            invalidator
                .invalidate_settling(Scope::Extension(aws()))
                .await;
        }
        assert_eq!(lock(&invalidator.settling).len(), 1);
        tokio::time::sleep(SETTLE + Duration::from_millis(1)).await;
        assert!(lock(&invalidator.settling).is_empty());
        versions(&registry).await;
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn refreshing_ahead_warms_an_invalidated_extension() {
        let caches = caches();
        let (registry, calls) = registry(&caches);
        let invalidator = Invalidator::new(caches).refreshing_ahead(registry.clone());
        versions(&registry).await;
        invalidator.invalidate(Scope::Extension(aws())).await;
        // The background refresh asks for the metadata and the versions.
        while calls.load(Ordering::SeqCst) < 3 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        versions(&registry).await;
        assert_eq!(
            calls.load(Ordering::SeqCst),
            3,
            "the client found them warm"
        );
        // A whole type is not refreshed ahead.
        invalidator
            .invalidate(Scope::Type(ExtensionType::Provider))
            .await;
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    /// A shared level remembering what it was told to forget.
    #[derive(Default)]
    struct Forgetting(Mutex<Vec<Scope>>);

    impl SharedLevel for Forgetting {
        fn forget<'a>(&'a self, scope: &'a Scope) -> BoxFuture<'a, Option<u64>> {
            lock(&self.0).push(scope.clone());
            Box::pin(async { Some(1) })
        }
    }

    /// A shared level and a bus that take nothing until `answering`, remembering what they
    /// were given.
    #[derive(Default)]
    struct Down {
        answering: std::sync::atomic::AtomicBool,
        forgot: Mutex<Vec<Scope>>,
        told: Mutex<Vec<Scope>>,
    }

    impl Down {
        fn answers(&self) -> bool {
            self.answering.load(Ordering::SeqCst)
        }
    }

    impl SharedLevel for Down {
        fn forget<'a>(&'a self, scope: &'a Scope) -> BoxFuture<'a, Option<u64>> {
            lock(&self.forgot).push(scope.clone());
            Box::pin(async { self.answers().then_some(1) })
        }
    }

    impl Bus for Down {
        fn publish<'a>(&'a self, scope: &'a Scope) -> BoxFuture<'a, bool> {
            lock(&self.told).push(scope.clone());
            Box::pin(async { self.answers() })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn invalidations_redis_could_not_take_are_delivered_once_it_answers() {
        let down = Arc::new(Down::default());
        let invalidator = Invalidator::new(caches())
            .with_shared(down.clone())
            .with_bus(down.clone());
        let type_scope = Scope::Type(ExtensionType::Taskserv);
        invalidator.invalidate(Scope::Extension(aws())).await;
        invalidator.invalidate(type_scope.clone()).await;
        invalidator.invalidate(Scope::Extension(aws())).await;
        assert_eq!((lock(&down.forgot).len(), lock(&down.told).len()), (3, 3));
        // Tried again while Redis does not answer: each scope once a round, the shared level
        // first.
        tokio::time::sleep(REDELIVER_AFTER * 3 + Duration::from_millis(1)).await;
        assert_eq!((lock(&down.forgot).len(), lock(&down.told).len()), (9, 3));
        down.answering.store(true, Ordering::SeqCst);
        tokio::time::sleep(REDELIVER_AFTER + Duration::from_millis(1)).await;
        let told = lock(&down.told).clone();
        assert_eq!(told[3..], [Scope::Extension(aws()), type_scope]);
        assert_eq!(lock(&down.forgot).len(), 11);
        // All delivered: nothing more is sent.
        tokio::time::sleep(REDELIVER_AFTER * 5).await;
        assert_eq!((lock(&down.forgot).len(), lock(&down.told).len()), (11, 5));
    }

    #[test]
    fn too_many_undelivered_invalidations_become_one_of_everything() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let _entered = runtime.enter();
        let invalidator = Invalidator::new(caches());
        for n in 0..=MAX_UNDELIVERED {
            let name = ExtensionName::parse(&format!("e{n}")).unwrap();
            invalidator.remember_undelivered(Scope::Extension(ExtensionKey {
                ty: ExtensionType::Provider,
                name,
            }));
        }
        assert_eq!(lock(&invalidator.undelivered).scopes, [Scope::All]);
        invalidator.remember_undelivered(Scope::Type(ExtensionType::Cluster));
        assert_eq!(lock(&invalidator.undelivered).scopes, [Scope::All]);
    }

    #[tokio::test(start_paused = true)]
    async fn the_shared_level_is_dropped_by_the_replica_learning_of_a_change_only() {
        let shared = Arc::new(Forgetting::default());
        let invalidator = Invalidator::new(caches()).with_shared(shared.clone());
        invalidator.invalidate(Scope::Extension(aws())).await;
        invalidator.invalidate_settling(Scope::All).await;
        assert_eq!(
            *lock(&shared.0),
            [Scope::Extension(aws()), Scope::All],
            "dropped at once"
        );
        // A peer's invalidation: the peer dropped it; dropping again here would drop the
        // answer fetched since.
        invalidator.apply(&Scope::Extension(aws()));
        assert_eq!(lock(&shared.0).len(), 2);
        // The settling re-check drops it again.
        tokio::time::sleep(SETTLE + Duration::from_millis(1)).await;
        assert_eq!(lock(&shared.0).len(), 3);
    }
}
