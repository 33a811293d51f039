//! Rendered answers, kept: the JSON bytes of an answer, its strong ETag and its compressed
//! forms (a `compression::Representation`). Rendering a 100-item listing costs more than
//! everything else a cached request does, and compressing it twenty times more, so each
//! rendering is memoised per request target for as long as the cached domain value behind it
//! is the same `Arc`. A cache refresh yields a new `Arc`, so the next request renders afresh.
//!
//! The memo is bounded in bytes against clients that ask for many distinct answers: every
//! entry weighs what it really costs ([`ENTRY_OVERHEAD`] on top of its key and JSON), and
//! an entry holds only a weak reference to the value it was rendered from, so a replaced
//! listing is freed at once rather than when the last page rendered from it leaves the memo.
//! Handlers keep keys few (every empty page of a listing shares one), and answers a client
//! may vary without end (searches) are kept only from their second ask ([`Keep`]). A key
//! asked again is looked for first among slots of recent renderings, held weakly
//! (`middleware::recent`), which costs a fraction of the memo's own lookup.
//!
//! The handler's response carries the `Arc<Representation>` in its extensions; the
//! compression layer takes the compressed form from it instead of compressing the body.

use std::any::Any;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use http::header::{HeaderName, HeaderValue, CONTENT_LENGTH, CONTENT_TYPE, ETAG};
use http::Response;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::body::{self, Body};
use crate::middleware::compression::Representation;
use crate::middleware::recent::Recent;
use crate::middleware::KeyHasher;

/// Bytes an entry costs beyond its key and JSON: the memo's own bookkeeping (moka's entry,
/// its deques and hash-table slot), the entry, the representation with its slots for
/// compressed forms, the ETag and the weak reference's allocation. Measured with a counting
/// allocator (`tests/cache.rs`: 1,003 bytes per entry, as asked for), rounded up by more than a
/// quarter for the allocator's size classes and bookkeeping over about a dozen allocations.
pub const ENTRY_OVERHEAD: usize = 1280;

/// How many searches the first-ask filter remembers; a search asked again before its slot is
/// taken by another is memoised. 8 bytes each.
const FIRST_ASKS: usize = 4096;

/// Whether an answer earns a memo entry on its first ask.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Keep {
    /// Keys a client cannot vary without end (a listing page, one extension).
    Always,
    /// Keys a client can vary without end (a search text): kept from the second ask, so
    /// one-off requests do not push out answers that are asked for again.
    FromSecondAsk,
}

/// What a handler renders.
pub struct Rendered {
    pub json: Vec<u8>,
    /// The number of matches before paging, sent as `X-Total-Count`; the ETag covers it.
    pub total: Option<usize>,
}

/// The memo of renderings, keyed by request target.
pub struct Renderings {
    /// Sync: a hit is a plain call on every cached request, with no future to poll.
    memo: moka::sync::Cache<Arc<str>, Arc<Rendering>, KeyHasher>,
    /// Renderings found or kept lately, weakly: the memo alone decides what stays. Nothing
    /// here is invalidated (a rendering is checked against its source instead), so every
    /// one is kept under generation 0. 24 KiB of slots, and at most 512 keys they hold.
    recent: Recent<Arc<str>, Rendering>,
    max_bytes: u64,
    /// Hashes of keys asked once, one per slot; see [`Keep::FromSecondAsk`].
    first_asks: Box<[AtomicU64]>,
    /// Seeded per process, so clients cannot aim keys at one slot; SipHash, as a client can
    /// time whether two of its keys share a slot (see `middleware::KeyHasher`).
    hasher: std::collections::hash_map::RandomState,
}

struct Rendering {
    /// Its key in the memo, shared with the memo's entry (and its slot of recent ones, unless
    /// the slot kept an earlier copy of the same key).
    key: Arc<str>,
    /// The domain value it was rendered from; weak, so the value is freed once the caches
    /// drop it, while its address stays its own for as long as the entry holds it.
    source: Weak<dyn Any + Send + Sync>,
    representation: Arc<Representation>,
    /// The `X-Total-Count` value, made once.
    total: Option<HeaderValue>,
}

/// The memo's part of `/api/v1/cache/stats`.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct MemoStats {
    pub rendered_entries: u64,
    /// Weighed as in [`Renderings::new`]; at most `rendered_max_bytes`.
    pub rendered_bytes: u64,
    pub rendered_max_bytes: u64,
}

impl Renderings {
    /// Keeps renderings weighing at most `max_bytes` in all: each weighs its key, its JSON
    /// twice (for the compressed forms it may gain) and [`ENTRY_OVERHEAD`]. One unused for
    /// `idle` is dropped.
    pub fn new(max_bytes: u64, idle: Duration) -> Self {
        Self::with_recent(max_bytes, idle, Recent::new())
    }

    fn with_recent(max_bytes: u64, idle: Duration, recent: Recent<Arc<str>, Rendering>) -> Self {
        Self {
            memo: moka::sync::Cache::builder()
                .weigher(|key: &Arc<str>, kept: &Arc<Rendering>| {
                    let bytes = ENTRY_OVERHEAD + key.len() + 2 * kept.representation.bytes().len();
                    u32::try_from(bytes).unwrap_or(u32::MAX)
                })
                .max_capacity(max_bytes)
                .time_to_idle(idle)
                .build_with_hasher(KeyHasher::default()),
            recent,
            max_bytes,
            first_asks: (0..FIRST_ASKS).map(|_| AtomicU64::new(0)).collect(),
            hasher: Default::default(),
        }
    }

    /// The 200 answer of `source` named `key`, rendered by `render` only when `key` was last
    /// rendered from another value (or, under [`Keep::FromSecondAsk`], not kept yet).
    pub fn respond<T: Any + Send + Sync>(
        &self,
        key: String,
        keep: Keep,
        source: &Arc<T>,
        render: impl FnOnce(&T) -> Rendered,
    ) -> Response<Body> {
        if let Some(recent) = self.recent.get(&*key, 0) {
            if recent.value.rendered_from(source) {
                if recent.tell {
                    self.memo.get(&*key);
                }
                return recent.value.response();
            }
        } else if let Some(kept) = self.memo.get(&*key) {
            if kept.rendered_from(source) {
                self.recent.keep(&kept.key, &kept, 0);
                return kept.response();
            }
        }
        let Rendered { json, total } = render(source);
        let source: Arc<dyn Any + Send + Sync> = source.clone();
        let rendering = Arc::new(Rendering {
            key: key.into(),
            source: Arc::downgrade(&source),
            representation: Arc::new(representation(json, total)),
            total: total.map(HeaderValue::from),
        });
        let response = rendering.response();
        if keep == Keep::Always || self.asked_before(&rendering.key) {
            self.recent.keep(&rendering.key, &rendering, 0);
            self.memo.insert(rendering.key.clone(), rendering);
        }
        response
    }

    /// Whether `key` was asked for since its slot last changed hands; remembers it if not.
    fn asked_before(&self, key: &str) -> bool {
        let hash = self.hasher.hash_one(key);
        let slot = &self.first_asks[hash as usize % self.first_asks.len()];
        slot.swap(hash, Ordering::Relaxed) == hash
    }

    /// Entries and their weight, settled first (the memo counts lazily).
    pub fn stats(&self) -> MemoStats {
        self.memo.run_pending_tasks();
        MemoStats {
            rendered_entries: self.memo.entry_count(),
            rendered_bytes: self.memo.weighted_size(),
            rendered_max_bytes: self.max_bytes,
        }
    }
}

impl Rendering {
    fn rendered_from<T: Any + Send + Sync>(&self, source: &Arc<T>) -> bool {
        std::ptr::addr_eq(self.source.as_ptr(), Arc::as_ptr(source))
    }

    fn response(&self) -> Response<Body> {
        response(&self.representation, self.total.as_ref())
    }
}

/// A custom name given as text would be parsed, and copied, on every insert.
static X_TOTAL_COUNT: HeaderName = HeaderName::from_static("x-total-count");

/// Headers a cached answer leaves the service with, at most, in the default stack.
const RESPONSE_HEADERS: usize = 16;

/// The 200 response of a kept answer: identity JSON with its ETag (and `X-Total-Count` when
/// there is a total), the representation attached for the compression layer.
pub fn response(
    representation: &Arc<Representation>,
    total: Option<&HeaderValue>,
) -> Response<Body> {
    let mut response = Response::new(body::full(representation.bytes().clone()));
    let headers = response.headers_mut();
    // Room for every header the layers above add (cache, rate limit, CORS, request id), so
    // the map is allocated once instead of grown twice on the way out.
    headers.reserve(RESPONSE_HEADERS);
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(CONTENT_LENGTH, representation.length().clone());
    headers.insert(ETAG, representation.etag().clone());
    if let Some(total) = total {
        headers.insert(&X_TOTAL_COUNT, total.clone());
    }
    response.extensions_mut().insert(representation.clone());
    response
}

/// Rendered JSON kept as a representation: the bytes boxed to their length (serialisers leave
/// spare capacity that would go unweighed) and a strong ETag digesting them and the total that
/// goes with them, so equal answers from different renderings carry equal validators, and
/// equal pages of listings of different lengths do not.
pub fn representation(json: Vec<u8>, total: Option<usize>) -> Representation {
    let etag = etag(&json, total);
    Representation::new(json.into_boxed_slice().into(), etag)
}

fn etag(json: &[u8], total: Option<usize>) -> HeaderValue {
    let mut digest = Sha256::new();
    digest.update(json);
    if let Some(total) = total {
        digest.update(format!("\ntotal={total}"));
    }
    let hex: String = digest.finalize()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    HeaderValue::from_str(&format!("\"{hex}\""))
        .unwrap_or_else(|_| HeaderValue::from_static("\"\""))
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;

    fn json(v: &Vec<i32>) -> Rendered {
        Rendered {
            json: serde_json::to_vec(v).unwrap(),
            total: None,
        }
    }

    fn answer(
        renderings: &Renderings,
        key: &str,
        keep: Keep,
        value: &Arc<Vec<i32>>,
    ) -> Arc<Representation> {
        renderings
            .respond(key.into(), keep, value, json)
            .extensions()
            .get::<Arc<Representation>>()
            .unwrap()
            .clone()
    }

    #[test]
    fn a_rendering_is_reused_while_the_value_is_the_same_arc() {
        let renderings = Renderings::new(1 << 20, Duration::from_secs(60));
        let value = Arc::new(vec![1, 2, 3]);
        let first = answer(&renderings, "a", Keep::Always, &value);
        let again = renderings.respond("a".into(), Keep::Always, &value, |_| unreachable!());
        let again = again.extensions().get::<Arc<Representation>>().unwrap();
        assert!(Arc::ptr_eq(&first, again));

        let other_target = answer(&renderings, "b", Keep::Always, &value);
        assert!(!Arc::ptr_eq(&first, &other_target));

        let refreshed = Arc::new(vec![1, 2, 3, 4]);
        let third = answer(&renderings, "a", Keep::Always, &refreshed);
        assert_eq!(&third.bytes()[..], b"[1,2,3,4]");
        assert_ne!(first.etag(), third.etag());
    }

    #[test]
    fn keys_sharing_a_recent_slot_each_keep_their_rendering() {
        let renderings =
            Renderings::with_recent(1 << 20, Duration::from_secs(60), Recent::with_slots(1));
        let value = Arc::new(vec![1, 2, 3]);
        let a = answer(&renderings, "a", Keep::Always, &value);
        let b = answer(&renderings, "b", Keep::Always, &value);
        assert!(!Arc::ptr_eq(&a, &b));
        for (key, first) in [("a", &a), ("b", &b), ("b", &b), ("a", &a)] {
            let again = renderings.respond(key.into(), Keep::Always, &value, |_| unreachable!());
            let again = again.extensions().get::<Arc<Representation>>().unwrap();
            assert!(Arc::ptr_eq(first, again), "{key}");
        }
    }

    /// A rendering of `[0]` from `source`, made by hand to sit in a slot of recent ones only.
    fn slotted(renderings: &Renderings, source: &Arc<Vec<i32>>) -> Arc<Rendering> {
        let source: Arc<dyn Any + Send + Sync> = source.clone();
        let rendering = Arc::new(Rendering {
            key: "a".into(),
            source: Arc::downgrade(&source),
            representation: Arc::new(representation(b"[0]".to_vec(), None)),
            total: None,
        });
        renderings.recent.keep(&rendering.key, &rendering, 0);
        rendering
    }

    /// The slots hold renderings weakly, so what the memo dropped, once freed, is rendered
    /// again. The rendering is put in a slot by hand rather than dropped from the memo: moka
    /// frees a removed entry when crossbeam-epoch collects it, which other threads' pins put off.
    #[test]
    fn what_only_a_recent_slot_holds_is_rendered_again() {
        let renderings = Renderings::new(1 << 20, Duration::from_secs(60));
        let value = Arc::new(vec![1, 2, 3]);
        let held = slotted(&renderings, &value);
        let served = answer(&renderings, "a", Keep::Always, &value);
        assert!(Arc::ptr_eq(&served, &held.representation));

        let renderings = Renderings::new(1 << 20, Duration::from_secs(60));
        drop(slotted(&renderings, &value));
        let again = answer(&renderings, "a", Keep::Always, &value);
        assert_eq!(
            &again.bytes()[..],
            b"[1,2,3]",
            "a slot of recent renderings kept a rendering alive"
        );
    }

    #[test]
    fn a_replaced_value_is_not_kept_alive_by_the_memo() {
        let renderings = Renderings::new(1 << 20, Duration::from_secs(60));
        let value = Arc::new(vec![1, 2, 3]);
        answer(&renderings, "a", Keep::Always, &value);
        let watch = Arc::downgrade(&value);
        drop(value);
        assert!(watch.upgrade().is_none());
    }

    #[test]
    fn searches_are_kept_from_their_second_ask() {
        let renderings = Renderings::new(1 << 20, Duration::from_secs(60));
        let value = Arc::new(vec![1]);
        for i in 0..100 {
            answer(
                &renderings,
                &format!("once {i}"),
                Keep::FromSecondAsk,
                &value,
            );
        }
        assert_eq!(renderings.stats().rendered_entries, 0);
        let first = answer(&renderings, "twice", Keep::FromSecondAsk, &value);
        let second = answer(&renderings, "twice", Keep::FromSecondAsk, &value);
        assert!(!Arc::ptr_eq(&first, &second), "the first ask kept nothing");
        let third = answer(&renderings, "twice", Keep::FromSecondAsk, &value);
        assert!(Arc::ptr_eq(&second, &third), "the second ask was kept");
        assert_eq!(renderings.stats().rendered_entries, 1);
    }

    #[tokio::test]
    async fn the_total_is_sent_and_covered_by_the_etag() {
        let renderings = Renderings::new(1 << 20, Duration::from_secs(60));
        let page = |total| {
            move |_: &Vec<i32>| Rendered {
                json: b"[]".to_vec(),
                total: Some(total),
            }
        };
        let short = renderings.respond("a".into(), Keep::Always, &Arc::new(vec![]), page(2));
        let long = renderings.respond("a".into(), Keep::Always, &Arc::new(vec![]), page(3));
        assert_eq!(short.headers()["x-total-count"], "2");
        assert_eq!(long.headers()["x-total-count"], "3");
        assert_ne!(short.headers()[ETAG], long.headers()[ETAG]);
        let body = long.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"[]");
    }

    #[test]
    fn the_memo_stays_within_its_byte_budget_whatever_clients_ask() {
        let budget = 64 * 1024;
        let renderings = Renderings::new(budget, Duration::from_secs(60));
        let value = Arc::new(vec![7; 1024]);
        for i in 0..200 {
            answer(&renderings, &format!("page {i}"), Keep::Always, &value);
        }
        let stats = renderings.stats();
        assert!(stats.rendered_bytes <= budget);
        assert!(stats.rendered_entries < 200);
        assert_eq!(stats.rendered_max_bytes, budget);
    }
}
