//! Request ids for `x-request-id`: a short per-process prefix and a counter, so ids are unique
//! across restarts without a random-number dependency on the hot path.
//!
//! [`RequestIdLayer`] gives every request an id before anything below sees it, and every
//! response (errors and 429s included) the same id, unless the response already names one.
//! A client's own id is kept only when it is short and safe to echo and log
//! (`[A-Za-z0-9._:-]{1,128}`, one header line); any other is replaced by a generated one, and
//! the request's log line says so with the refused id's length (never its content).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{Entry, OccupiedEntry};
use http::{HeaderName, HeaderValue, Request, Response};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

/// Makes ids like `3f9a1c2b-42`; cheap to clone, shared counter.
#[derive(Clone, Debug)]
struct RequestIds {
    /// Distinguishes this process from earlier ones: start time mixed with the pid.
    prefix: Arc<str>,
    next: Arc<AtomicU64>,
}

impl RequestIds {
    fn new() -> Self {
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

    /// The next id, in one allocation that its copies (request and response) share.
    fn next(&self) -> Option<HeaderValue> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let mut id = IdBytes::default();
        id.push(self.prefix.as_bytes())?;
        id.push(b"-")?;
        id.push(itoa::Buffer::new().format(n).as_bytes())?;
        HeaderValue::from_maybe_shared(Bytes::from_owner(id)).ok()
    }
}

impl Default for RequestIds {
    fn default() -> Self {
        Self::new()
    }
}

/// Adds [`RequestId`] to a stack: screens a client's id, sets one where there is none, and
/// copies it onto the response.
#[derive(Clone, Debug, Default)]
pub struct RequestIdLayer {
    ids: RequestIds,
}

impl<S> Layer<S> for RequestIdLayer {
    type Service = RequestId<S>;

    fn layer(&self, inner: S) -> RequestId<S> {
        RequestId {
            inner,
            ids: self.ids.clone(),
        }
    }
}

/// See the module documentation.
#[derive(Clone, Debug)]
pub struct RequestId<S> {
    inner: S,
    ids: RequestIds,
}

impl<S, B, ResBody> Service<Request<B>> for RequestId<S>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let id = identify(&mut req, &self.ids);
        ResponseFuture {
            inner: self.inner.call(req),
            id,
        }
    }
}

pin_project! {
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        id: Option<HeaderValue>,
    }
}

impl<F, ResBody, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<ResBody>, E>>,
{
    type Output = Result<Response<ResBody>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut response = ready!(this.inner.poll(cx))?;
        if let Some(id) = this.id.take() {
            response.headers_mut().entry(&X_REQUEST_ID).or_insert(id);
        }
        Poll::Ready(Ok(response))
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

/// The request's id, set on it: the client's `x-request-id` if it is one line of 1 to
/// [`MAX_CLIENT_ID_LEN`] of `A-Z a-z 0-9 . _ : -`, else a generated one (a refused id's
/// length marked on the request). The header is looked up once, and written in the same place.
fn identify<B>(req: &mut Request<B>, ids: &RequestIds) -> Option<HeaderValue> {
    let refused = match req.headers_mut().entry(&X_REQUEST_ID) {
        Entry::Vacant(line) => {
            return ids.next().inspect(|id| {
                line.insert(id.clone());
            })
        }
        Entry::Occupied(sent) => match screen(sent) {
            Ok(id) => return Some(id),
            Err(refused) => refused,
        },
    };
    req.extensions_mut().insert(refused);
    ids.next().inspect(|id| {
        req.headers_mut().insert(X_REQUEST_ID.clone(), id.clone());
    })
}

/// The id a client sent, when it is one line and safe; else its lines are removed and their
/// length returned.
fn screen(sent: OccupiedEntry<'_, HeaderValue>) -> Result<HeaderValue, RefusedRequestId> {
    let mut lines = sent.iter();
    if let (Some(id), None) = (lines.next(), lines.next()) {
        if is_safe(id.as_bytes()) {
            return Ok(id.clone());
        }
    }
    let (_, lines) = sent.remove_entry_mult();
    Err(RefusedRequestId(lines.map(|line| line.len()).sum()))
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
        let id = identify(&mut req, &RequestIds::new());
        assert_eq!(id.as_ref(), req.headers().get(&X_REQUEST_ID));
        req
    }

    #[test]
    fn generated_ids_are_the_prefix_and_a_counter() {
        let ids = RequestIds::new();
        let first = ids.next().unwrap();
        let second = ids.next().unwrap();
        assert_eq!(first.as_bytes(), format!("{}-1", ids.prefix).as_bytes());
        assert_eq!(second.as_bytes(), format!("{}-2", ids.prefix).as_bytes());
        assert!(
            is_safe(first.as_bytes()),
            "a generated id passes the screen"
        );
        ids.next.store(u64::MAX, Ordering::Relaxed);
        let largest = ids.next().unwrap();
        assert_eq!(
            largest.as_bytes(),
            format!("{}-{}", ids.prefix, u64::MAX).as_bytes()
        );
    }

    /// The id a request reached the service with, the response's, and the length of a refused
    /// id the request was marked with.
    async fn ids_through_the_layer(
        sent: Option<&str>,
        answered: Option<&str>,
    ) -> (String, String, Option<usize>) {
        let answered = answered.map(HeaderValue::from_str).transpose().unwrap();
        let service = RequestIdLayer::default().layer(tower::service_fn(move |req: Request<()>| {
            let mut response = Response::new(());
            let seen = req.headers()[&X_REQUEST_ID].clone();
            response.headers_mut().insert("seen", seen);
            if let Some(RefusedRequestId(length)) = req.extensions().get() {
                response
                    .headers_mut()
                    .insert("refused", HeaderValue::from(*length));
            }
            if let Some(id) = answered.clone() {
                response.headers_mut().insert(&X_REQUEST_ID, id);
            }
            std::future::ready(Ok::<_, std::convert::Infallible>(response))
        }));
        let mut req = Request::get("/").body(()).unwrap();
        if let Some(id) = sent {
            req.headers_mut()
                .insert(&X_REQUEST_ID, HeaderValue::from_str(id).unwrap());
        }
        let response = tower::ServiceExt::oneshot(service, req).await.unwrap();
        let text = |name: &str| response.headers()[name].to_str().unwrap().to_owned();
        let refused = response.headers().get("refused").map(|v| {
            v.to_str()
                .ok()
                .and_then(|v| v.parse().ok())
                .expect("a length")
        });
        (text("seen"), text(X_REQUEST_ID.as_str()), refused)
    }

    #[tokio::test]
    async fn every_request_and_its_response_carry_one_id() {
        let (seen, answered, refused) = ids_through_the_layer(None, None).await;
        assert!(seen.ends_with("-1"), "{seen}");
        assert_eq!((answered, refused), (seen, None));

        let (seen, answered, refused) = ids_through_the_layer(Some("client-7"), None).await;
        assert_eq!((seen.as_str(), answered.as_str()), ("client-7", "client-7"));
        assert_eq!(refused, None);

        let (seen, answered, refused) = ids_through_the_layer(Some("not safe"), None).await;
        assert!(seen.ends_with("-1"), "the first generated id: {seen}");
        assert_eq!((answered, refused), (seen, Some("not safe".len())));

        let (_, answered, _) = ids_through_the_layer(Some("client-7"), Some("upstream-1")).await;
        assert_eq!(
            answered, "upstream-1",
            "an id the response names is left alone"
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
            let lines: Vec<_> = req.headers().get_all(&X_REQUEST_ID).iter().collect();
            assert!(
                matches!(&lines[..], [id] if id.as_bytes().ends_with(b"-1")),
                "{ids:?} replaced by a generated id: {lines:?}"
            );
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
