//! Conditional GET: a GET or HEAD whose `If-None-Match` matches the `ETag` of the 200 answer
//! gets a 304 without a body, keeping the validator and caching headers (RFC 9110 §13.1.2,
//! §15.4.5), so a client revalidating an unchanged listing downloads nothing.
//!
//! Comparison is weak, as If-None-Match requires: `W/"x"` matches `"x"`. A validator of a
//! compressed form (`"x-gzip"`, given by the compression layer above) matches its identity
//! form, which is what this layer sees. The 304 carries the entity-tag that matched, as the
//! client sent it, so the client (or a cache) finds the stored response it freshens; for `*`,
//! the identity form's. A malformed field (`"x"y`, an unclosed quote) matches nothing.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use http::header::{
    HeaderName, HeaderValue, CACHE_CONTROL, CONTENT_LOCATION, DATE, ETAG, EXPIRES, IF_NONE_MATCH,
    VARY,
};
use http::{Method, Request, Response, StatusCode};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use crate::body::{self, Body};
use crate::middleware::compression::without_coding;

/// The headers a 304 keeps from the 200 it stands for.
const KEPT: [HeaderName; 7] = [
    CACHE_CONTROL,
    CONTENT_LOCATION,
    DATE,
    ETAG,
    EXPIRES,
    VARY,
    HeaderName::from_static("cache-status"),
];

#[derive(Clone, Copy, Debug, Default)]
pub struct ConditionalLayer;

impl<S> Layer<S> for ConditionalLayer {
    type Service = Conditional<S>;

    fn layer(&self, inner: S) -> Conditional<S> {
        Conditional { inner }
    }
}

/// See the module documentation.
#[derive(Clone, Debug)]
pub struct Conditional<S> {
    inner: S,
}

impl<S, B> Service<Request<B>> for Conditional<S>
where
    S: Service<Request<B>, Response = Response<Body>>,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let conditional = matches!(*req.method(), Method::GET | Method::HEAD);
        let if_none_match = if conditional {
            req.headers()
                .get_all(IF_NONE_MATCH)
                .iter()
                .cloned()
                .collect()
        } else {
            Vec::new()
        };
        ResponseFuture {
            inner: self.inner.call(req),
            if_none_match,
        }
    }
}

pin_project! {
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        // Every `If-None-Match` line of a GET or HEAD; empty otherwise.
        if_none_match: Vec<HeaderValue>,
    }
}

impl<F, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<Body>, E>>,
{
    type Output = Result<Response<Body>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = ready!(this.inner.poll(cx))?;
        if this.if_none_match.is_empty() || response.status() != StatusCode::OK {
            return Poll::Ready(Ok(response));
        }
        let Some(etag) = response.headers().get(ETAG).and_then(|v| v.to_str().ok()) else {
            return Poll::Ready(Ok(response));
        };
        let Some(matched) = matching(this.if_none_match, etag) else {
            return Poll::Ready(Ok(response));
        };
        let (parts, _) = response.into_parts();
        let mut not_modified = Response::new(body::empty());
        *not_modified.status_mut() = StatusCode::NOT_MODIFIED;
        for name in &KEPT {
            for value in parts.headers.get_all(name) {
                not_modified.headers_mut().append(name, value.clone());
            }
        }
        not_modified.headers_mut().insert(ETAG, matched);
        // Extensions travel up: the route for metrics, the representation for compression.
        *not_modified.extensions_mut() = parts.extensions;
        Poll::Ready(Ok(not_modified))
    }
}

/// The entity-tag of the `If-None-Match` lines that names `etag` (weak comparison), or `etag`
/// itself for `*`; `None` when nothing matches or any line is malformed.
fn matching(lines: &[HeaderValue], etag: &str) -> Option<HeaderValue> {
    let mut found = None;
    for line in lines {
        let Ok(text) = std::str::from_utf8(line.as_bytes()) else {
            return None;
        };
        if text.trim_matches([' ', '\t']) == "*" {
            found = found.or_else(|| HeaderValue::from_str(etag).ok());
            continue;
        }
        for tag in entity_tags(text)? {
            let candidate = opaque(tag);
            if found.is_none()
                && (candidate == opaque(etag) || without_coding(candidate) == opaque(etag))
            {
                found = HeaderValue::from_str(tag).ok();
            }
        }
    }
    found
}

/// The text of an entity-tag between its quotes; weak comparison ignores `W/`.
fn opaque(tag: &str) -> &str {
    let tag = tag.strip_prefix("W/").unwrap_or(tag);
    tag.trim_matches('"')
}

/// The entity-tags of a list such as `W/"a", "b,c"` (quotes may hold commas; empty elements
/// are allowed), or `None` when anything in it is not an entity-tag (RFC 9110 §8.8.3).
fn entity_tags(line: &str) -> Option<Vec<&str>> {
    let ows = [' ', '\t'];
    let mut tags = Vec::new();
    let mut rest = line.trim_start_matches(ows);
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix(',') {
            rest = after.trim_start_matches(ows);
            continue;
        }
        let quoted = rest.strip_prefix("W/").unwrap_or(rest);
        let inner = quoted.strip_prefix('"')?;
        let close = inner.find('"')?;
        // etagc: visible characters but the quote, and obs-text.
        if !inner[..close]
            .chars()
            .all(|c| c == '!' || (c > '"' && c != '\x7f'))
        {
            return None;
        }
        let end = (rest.len() - quoted.len()) + close + 2;
        tags.push(&rest[..end]);
        rest = rest[end..].trim_start_matches(ows);
        if !(rest.is_empty() || rest.starts_with(',')) {
            return None;
        }
    }
    Some(tags)
}

#[cfg(test)]
mod tests {
    use http::header::CONTENT_TYPE;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    use super::*;
    use crate::BoxError;

    const TAG: &str = "\"abc123\"";

    /// Answers 200 with `TAG`, or 404 for `/missing`.
    fn app() -> Conditional<
        impl Service<
                Request<()>,
                Response = Response<Body>,
                Error = BoxError,
                Future = impl Future<Output = Result<Response<Body>, BoxError>>,
            > + Clone,
    > {
        ConditionalLayer.layer(tower::service_fn(|req: Request<()>| async move {
            let mut response = Response::new(body::full("[1,2,3]"));
            if req.uri().path() == "/missing" {
                *response.status_mut() = StatusCode::NOT_FOUND;
            }
            let headers = response.headers_mut();
            headers.insert(ETAG, HeaderValue::from_static(TAG));
            headers.insert(
                CACHE_CONTROL,
                HeaderValue::from_static("public, max-age=300"),
            );
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            headers.insert("x-total-count", HeaderValue::from(3));
            Ok::<_, BoxError>(response)
        }))
    }

    async fn ask(method: Method, path: &str, if_none_match: &[&str]) -> Response<Body> {
        let mut req = Request::builder().method(method).uri(path);
        for line in if_none_match {
            req = req.header(IF_NONE_MATCH, *line);
        }
        app().oneshot(req.body(()).unwrap()).await.unwrap()
    }

    #[tokio::test]
    async fn a_matching_tag_gets_304_without_body_but_with_the_tag_that_matched() {
        for (lines, matched) in [
            (&[TAG][..], TAG),
            (&["W/\"abc123\""], "W/\"abc123\""),
            (&["\"other\", W/\"abc123\""], "W/\"abc123\""),
            (&["\"x,y\"", "\"abc123\""], TAG),
            (&[" ,\"x\" ,, \"abc123\"\t"], TAG),
            (&["*"], TAG),
            (&["\"abc123-gzip\""], "\"abc123-gzip\""),
        ] {
            let response = ask(Method::GET, "/", lines).await;
            assert_eq!(response.status(), StatusCode::NOT_MODIFIED, "{lines:?}");
            let headers = response.headers();
            assert_eq!(headers[ETAG], matched, "{lines:?}");
            assert_eq!(headers[CACHE_CONTROL], "public, max-age=300");
            assert!(headers.get(CONTENT_TYPE).is_none());
            assert!(headers.get("x-total-count").is_none());
            let body = response.into_body().collect().await.unwrap().to_bytes();
            assert!(body.is_empty());
        }
    }

    #[tokio::test]
    async fn other_tags_methods_and_statuses_get_the_full_answer() {
        let cases = [
            (Method::GET, "/", &["\"abc1234\""][..], StatusCode::OK),
            (Method::GET, "/", &["\"abc\""], StatusCode::OK),
            (Method::GET, "/", &["abc123"], StatusCode::OK),
            (Method::GET, "/", &[], StatusCode::OK),
            (Method::POST, "/", &[TAG], StatusCode::OK),
            (Method::GET, "/missing", &[TAG], StatusCode::NOT_FOUND),
        ];
        for (method, path, lines, status) in cases {
            let response = ask(method.clone(), path, lines).await;
            assert_eq!(response.status(), status, "{method} {path} {lines:?}");
        }
        assert_eq!(
            ask(Method::HEAD, "/", &[TAG]).await.status(),
            StatusCode::NOT_MODIFIED
        );
    }

    #[tokio::test]
    async fn a_malformed_field_matches_nothing() {
        for lines in [
            &["\"abc123\"x"][..],
            &["\"abc123\" \"other\""],
            &["\"abc123"],
            &["\"ab c123\""],
            &["W/ \"abc123\""],
            &["\"abc123\", x"],
            &["*, \"abc123\""],
            &["\"abc123\"", "\"other\"x"],
        ] {
            let response = ask(Method::GET, "/", lines).await;
            assert_eq!(response.status(), StatusCode::OK, "{lines:?}");
        }
    }
}
