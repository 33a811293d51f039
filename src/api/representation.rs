//! Rendered answers, kept: the JSON bytes of an answer, its strong ETag and its compressed
//! forms. Rendering a 100-item listing costs more than everything else a cached request
//! does, and compressing it twenty times more, so each rendering is memoised per request
//! target (path and query) for as long as the cached domain value behind it is the same
//! `Arc`. A cache refresh yields a new `Arc`, so the next request renders afresh.
//!
//! The handler attaches the `Arc<Representation>` to its response's extensions; the
//! compression layer takes the compressed form from it instead of compressing the body.

use std::any::Any;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE, ETAG};
use http::Response;
use sha2::{Digest, Sha256};

use crate::body::{self, Body};
use crate::middleware::compression::{self, Coding};

/// One encoded form of a representation and the ETag that names it.
pub struct Encoded {
    pub bytes: Bytes,
    /// Differs per coding, as RFC 9110 wants for strong validators.
    pub etag: HeaderValue,
}

/// A rendered JSON answer.
pub struct Representation {
    /// The identity form.
    identity: Encoded,
    /// The compressed forms, made on first demand; `None` when compressing failed.
    compressed: [OnceLock<Option<Encoded>>; Coding::COMPRESSED.len()],
}

impl Representation {
    /// Takes rendered JSON; its ETag is a digest of the bytes, so equal answers from
    /// different renderings carry equal validators.
    pub fn new(json: Vec<u8>) -> Self {
        let digest = Sha256::digest(&json);
        let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
        let etag = HeaderValue::from_str(&format!("\"{hex}\""))
            .unwrap_or_else(|_| HeaderValue::from_static("\"\""));
        Self {
            identity: Encoded {
                bytes: json.into(),
                etag,
            },
            compressed: Default::default(),
        }
    }

    pub fn json(&self) -> &Bytes {
        &self.identity.bytes
    }

    pub fn etag(&self) -> &HeaderValue {
        &self.identity.etag
    }

    /// The form for `coding`, compressing on first demand only.
    pub fn encoded(&self, coding: Coding) -> Option<&Encoded> {
        let Some(slot) = Coding::COMPRESSED.iter().position(|c| *c == coding) else {
            return Some(&self.identity);
        };
        self.compressed[slot]
            .get_or_init(|| {
                let bytes = compression::encode(coding, self.json())
                    .inspect_err(|e| tracing::warn!(error = %e, %coding, "compression failed"))
                    .ok()?;
                let tag = self.etag().to_str().ok()?.trim_end_matches('"');
                let etag = HeaderValue::from_str(&format!("{tag}-{coding}\"")).ok()?;
                Some(Encoded {
                    bytes: bytes.into(),
                    etag,
                })
            })
            .as_ref()
    }

    /// The 200 response: identity JSON with its ETag, the representation attached.
    pub fn response(self: &Arc<Self>) -> Response<Body> {
        let mut response = Response::new(body::full(self.json().clone()));
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(CONTENT_LENGTH, HeaderValue::from(self.json().len()));
        headers.insert(ETAG, self.etag().clone());
        response.extensions_mut().insert(self.clone());
        response
    }
}

/// The memo of renderings, keyed by request target.
pub struct Renderings {
    memo: moka::future::Cache<String, Arc<Rendering>>,
}

struct Rendering {
    /// The domain value it was rendered from; held so its address stays its own.
    source: Arc<dyn Any + Send + Sync>,
    representation: Arc<Representation>,
}

impl Renderings {
    /// Keeps renderings worth at most `max_bytes` (the JSON counted twice, for the compressed
    /// forms it may gain), so however many distinct answers clients ask for, the memo stays
    /// bounded in memory; one unused for `idle` is dropped with the domain value it holds.
    pub fn new(max_bytes: u64, idle: Duration) -> Self {
        Self {
            memo: moka::future::Cache::builder()
                .weigher(|key: &String, kept: &Arc<Rendering>| {
                    let bytes = key.len() + 2 * kept.representation.identity.bytes.len();
                    u32::try_from(bytes).unwrap_or(u32::MAX)
                })
                .max_capacity(max_bytes)
                .time_to_idle(idle)
                .build(),
        }
    }

    /// The representation of `source` named `key`, rendered by `render` only when `key` was
    /// last rendered from another value.
    pub async fn get_or_render<T: Any + Send + Sync>(
        &self,
        key: String,
        source: &Arc<T>,
        render: impl FnOnce(&T) -> Vec<u8>,
    ) -> Arc<Representation> {
        if let Some(kept) = self.memo.get(&key).await {
            if std::ptr::addr_eq(Arc::as_ptr(&kept.source), Arc::as_ptr(source)) {
                return kept.representation.clone();
            }
        }
        let representation = Arc::new(Representation::new(render(source)));
        let source: Arc<dyn Any + Send + Sync> = source.clone();
        self.memo
            .insert(
                key,
                Arc::new(Rendering {
                    source,
                    representation: representation.clone(),
                }),
            )
            .await;
        representation
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_rendering_is_reused_while_the_value_is_the_same_arc() {
        let renderings = Renderings::new(1 << 20, Duration::from_secs(60));
        let value = Arc::new(vec![1, 2, 3]);
        let render = |v: &Vec<i32>| serde_json::to_vec(v).unwrap();
        let first = renderings.get_or_render("a".into(), &value, render).await;
        let again = renderings
            .get_or_render("a".into(), &value, |_| unreachable!())
            .await;
        assert!(Arc::ptr_eq(&first, &again));

        let other_target = renderings.get_or_render("b".into(), &value, render).await;
        assert!(!Arc::ptr_eq(&first, &other_target));

        let refreshed = Arc::new(vec![1, 2, 3, 4]);
        let third = renderings
            .get_or_render("a".into(), &refreshed, render)
            .await;
        assert_eq!(&third.json()[..], b"[1,2,3,4]");
        assert_ne!(first.etag(), third.etag());
    }

    #[tokio::test]
    async fn the_memo_stays_within_its_byte_budget_whatever_clients_ask() {
        let budget = 64 * 1024;
        let renderings = Renderings::new(budget, Duration::from_secs(60));
        let value = Arc::new(vec![7u8; 4096]);
        for i in 0..200 {
            renderings
                .get_or_render(format!("search {i}"), &value, |v| v.clone())
                .await;
        }
        renderings.memo.run_pending_tasks().await;
        assert!(renderings.memo.weighted_size() <= budget);
        assert!(renderings.memo.entry_count() < 200);
    }

    #[test]
    fn compressed_forms_are_made_once_and_named_by_their_own_etag() {
        let representation = Representation::new(b"{\"a\":1}".repeat(100));
        let gzip = representation.encoded(Coding::Gzip).unwrap();
        let again = representation.encoded(Coding::Gzip).unwrap();
        assert_eq!(gzip.bytes.as_ptr(), again.bytes.as_ptr());
        let tag = representation.etag().to_str().unwrap();
        assert_eq!(
            gzip.etag.to_str().unwrap(),
            format!("{}-gzip\"", &tag[..tag.len() - 1])
        );
        assert!(gzip.bytes.len() < representation.json().len());
    }
}
