//! Request ids for `x-request-id`: a short per-process prefix and a counter, so ids are unique
//! across restarts without a random-number dependency on the hot path.
//!
//! A client's own id is kept only when it is short and safe to echo and log
//! (`[A-Za-z0-9._:-]{1,128}`, one header line); any other is replaced by a generated one, and
//! the request's log line says so with the refused id's length (never its content).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request};
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
        let mut id = IdBytes::default();
        id.push(self.prefix.as_bytes())?;
        id.push(b"-")?;
        id.push(itoa::Buffer::new().format(n).as_bytes())?;
        // One allocation, which the id's copies (request, extensions, response) share.
        HeaderValue::from_maybe_shared(Bytes::from_owner(id))
            .ok()
            .map(RequestId::new)
    }
}

/// A generated id, held inline: an 8-digit prefix, `-`, and at most 20 digits.
#[derive(Default)]
struct IdBytes {
    bytes: [u8; 32],
    len: usize,
}

impl IdBytes {
    /// Appends `part`; `None` when it does not fit.
    fn push(&mut self, part: &[u8]) -> Option<()> {
        let end = self.len + part.len();
        self.bytes.get_mut(self.len..end)?.copy_from_slice(part);
        self.len = end;
        Some(())
    }
}

impl AsRef<[u8]> for IdBytes {
    fn as_ref(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// The header the id travels in, both ways.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Longest client id kept.
pub const MAX_CLIENT_ID_LEN: usize = 128;

/// Set on a request whose client-sent id was refused: the total length of what was sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RefusedRequestId(pub usize);

/// Removes a client's `x-request-id` unless it is one line of 1 to [`MAX_CLIENT_ID_LEN`] of
/// `A-Z a-z 0-9 . _ : -`, so the id set afterwards is the client's or a generated one.
pub fn screen<B>(mut req: Request<B>) -> Request<B> {
    let lines = req.headers().get_all(&X_REQUEST_ID);
    let mut sent = lines.iter();
    let kept = match (sent.next(), sent.next()) {
        (None, _) => return req,
        (Some(id), None) => is_safe(id.as_bytes()),
        _ => false,
    };
    if !kept {
        let length = lines.iter().map(|v| v.len()).sum();
        req.headers_mut().remove(&X_REQUEST_ID);
        req.extensions_mut().insert(RefusedRequestId(length));
    }
    req
}

fn is_safe(id: &[u8]) -> bool {
    (1..=MAX_CLIENT_ID_LEN).contains(&id.len())
        && id
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b".:_-".contains(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn screened(ids: &[&[u8]]) -> Request<()> {
        let mut req = Request::get("/").body(()).unwrap();
        for id in ids {
            req.headers_mut()
                .append(&X_REQUEST_ID, HeaderValue::from_bytes(id).unwrap());
        }
        screen(req)
    }

    #[test]
    fn generated_ids_are_the_prefix_and_a_counter() {
        let mut ids = RequestIds::new();
        let req = Request::get("/").body(()).unwrap();
        let first = ids.make_request_id(&req).unwrap().into_header_value();
        let second = ids.make_request_id(&req).unwrap().into_header_value();
        assert_eq!(first.as_bytes(), format!("{}-1", ids.prefix).as_bytes());
        assert_eq!(second.as_bytes(), format!("{}-2", ids.prefix).as_bytes());
        assert!(
            is_safe(first.as_bytes()),
            "a generated id passes the screen"
        );
        ids.next.store(u64::MAX, Ordering::Relaxed);
        let largest = ids.make_request_id(&req).unwrap().into_header_value();
        assert_eq!(
            largest.as_bytes(),
            format!("{}-{}", ids.prefix, u64::MAX).as_bytes()
        );
    }

    #[test]
    fn only_short_safe_ids_are_kept() {
        let long = [b'a'; MAX_CLIENT_ID_LEN];
        for ok in [&b"abc-123"[..], b"A.b_c:d-e", &long] {
            let req = screened(&[ok]);
            assert_eq!(req.headers()[&X_REQUEST_ID].as_bytes(), ok);
            assert!(req.extensions().get::<RefusedRequestId>().is_none());
        }
        let too_long = [b'a'; MAX_CLIENT_ID_LEN + 1];
        for (ids, length) in [
            (&[&too_long[..]][..], MAX_CLIENT_ID_LEN + 1),
            (&[b"abc def}: request finished status=200"], 37),
            (&["caf\u{e9}".as_bytes()], 5),
            (&[b""], 0),
            (&[b"a", b"b"], 2),
        ] {
            let req = screened(ids);
            assert!(req.headers().get(&X_REQUEST_ID).is_none(), "{ids:?}");
            assert_eq!(
                req.extensions().get::<RefusedRequestId>(),
                Some(&RefusedRequestId(length))
            );
        }
        assert!(screened(&[])
            .extensions()
            .get::<RefusedRequestId>()
            .is_none());
    }
}
