//! The one way to drop cached answers when extensions change upstream.
//!
//! [`Invalidator::invalidate`] drops what this replica holds for a [`Scope`] and hands the
//! scope to the [`Bus`], when one is attached, so the other replicas drop it too; a scope
//! arriving from another replica goes to [`Invalidator::apply`], which drops locally only.
//! Whatever learns of a change (a webhook, an operator's purge) calls `invalidate` and
//! nothing else.
//!
//! Renderings need no dropping of their own: each is served only while the cached value it
//! was rendered from is the one in the cache, so the next answer after an invalidation is
//! rendered afresh. A refresh already under way when an invalidation arrives may have read
//! the old state; its answer is handed to the requests waiting for it but not kept.

use std::sync::Arc;

use serde::Serialize;

use crate::middleware::cache::Caches;
use crate::registry::{ExtensionKey, ExtensionType, ListFilter};

/// What changed.
#[derive(Clone, Debug, PartialEq, Eq)]
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
    /// Tells the other replicas that `scope` changed; never waits for them.
    fn publish(&self, scope: &Scope);
}

/// Drops cached answers here and, through the bus, on every other replica.
#[derive(Clone)]
pub struct Invalidator {
    caches: Caches,
    bus: Option<Arc<dyn Bus>>,
}

impl Invalidator {
    /// Invalidates this replica's `caches` only.
    pub fn new(caches: Caches) -> Self {
        Self { caches, bus: None }
    }

    /// Invalidates the other replicas too, through `bus`.
    pub fn with_bus(self, bus: Arc<dyn Bus>) -> Self {
        Self {
            bus: Some(bus),
            ..self
        }
    }

    /// `scope` changed: drops it here and tells the other replicas.
    pub async fn invalidate(&self, scope: Scope) -> Dropped {
        let dropped = self.drop_local(&scope, "local").await;
        if let Some(bus) = &self.bus {
            bus.publish(&scope);
        }
        dropped
    }

    /// Another replica announced that `scope` changed: drops it here only.
    pub async fn apply(&self, scope: &Scope) -> Dropped {
        self.drop_local(scope, "peer").await
    }

    async fn drop_local(&self, scope: &Scope, origin: &'static str) -> Dropped {
        let dropped = self.caches.invalidate(scope).await;
        metrics::counter!("invalidations_total", "scope" => scope.label(), "origin" => origin)
            .increment(1);
        tracing::info!(?scope, origin, ?dropped, "cached answers invalidated");
        dropped
    }
}
