//! Request ids for `x-request-id`: a short per-process prefix and a counter, so ids are unique
//! across restarts without a random-number dependency on the hot path.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use http::{HeaderValue, Request};
use tower_http::request_id::{MakeRequestId, RequestId};

/// Makes ids like `3f9a1c2b-42`; cheap to clone, shared counter.
#[derive(Clone, Debug)]
pub struct RequestIds {
    /// Distinguishes this process from earlier ones: start time mixed with the pid.
    prefix: Arc<str>,
    next: Arc<AtomicU64>,
}

impl RequestIds {
    pub fn new() -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or_default();
        let seed = nanos ^ (u64::from(std::process::id()) << 32);
        Self {
            prefix: format!("{:08x}", (seed ^ (seed >> 29)) as u32).into(),
            next: Arc::new(AtomicU64::new(1)),
        }
    }
}

impl Default for RequestIds {
    fn default() -> Self {
        Self::new()
    }
}

impl MakeRequestId for RequestIds {
    fn make_request_id<B>(&mut self, _: &Request<B>) -> Option<RequestId> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        HeaderValue::from_str(&format!("{}-{n}", self.prefix))
            .ok()
            .map(RequestId::new)
    }
}
