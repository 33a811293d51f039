//! Conditional GET: a GET or HEAD whose `If-None-Match` matches the `ETag` of the 200 answer
//! gets a 304 without a body, keeping the validator and caching headers (RFC 9110 §13.1.2,
//! §15.4.5), so a client revalidating an unchanged listing downloads nothing.
//!
//! Comparison is weak, as If-None-Match requires: `W/"x"` matches `"x"`. A validator of a
//! compressed form (`"x-gzip"`, given by the compression layer above) matches its identity
//! form, which is what this layer sees.

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
const KEPT: [HeaderName; 6] = [CACHE_CONTROL, CONTENT_LOCATION, DATE, ETAG, EXPIRES, VARY];

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
        if !this
            .if_none_match
            .iter()
            .any(|v| matches(v.as_bytes(), etag))
        {
            return Poll::Ready(Ok(response));
        }
        let (parts, _) = response.into_parts();
        let mut not_modified = Response::new(body::empty());
        *not_modified.status_mut() = StatusCode::NOT_MODIFIED;
        for name in KEPT
            .iter()
            .chain([&HeaderName::from_static("cache-status")])
        {
            for value in parts.headers.get_all(name) {
                not_modified.headers_mut().append(name, value.clone());
            }
        }
        // Extensions travel up: the route for metrics, the representation for compression.
        *not_modified.extensions_mut() = parts.extensions;
        Poll::Ready(Ok(not_modified))
    }
}

/// Whether an `If-None-Match` line names `etag` (weak comparison) or is `*`.
fn matches(line: &[u8], etag: &str) -> bool {
    let Ok(line) = std::str::from_utf8(line) else {
        return false;
    };
    if line.trim() == "*" {
        return true;
    }
    let etag = opaque(etag);
    entity_tags(line).any(|candidate| {
        let candidate = opaque(candidate);
        candidate == etag || without_coding(candidate) == etag
    })
}

/// The text of an entity-tag between its quotes; weak comparison ignores `W/`.
fn opaque(tag: &str) -> &str {
    let tag = tag.strip_prefix("W/").unwrap_or(tag);
    tag.trim_matches('"')
}

/// The entity-tags of a list such as `W/"a", "b,c"` (quotes may hold commas); stops at the
/// first malformed one.
fn entity_tags(mut line: &str) -> impl Iterator<Item = &str> {
    std::iter::from_fn(move || {
        line = line.trim_start_matches([' ', '\t', ',']);
        let quoted = line.strip_prefix("W/").unwrap_or(line);
        let close = quoted.strip_prefix('"')?.find('"')?;
        let end = (line.len() - quoted.len()) + close + 2;
        let (tag, rest) = line.split_at(end);
        line = rest;
        Some(tag)
    })
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
    async fn a_matching_tag_gets_304_without_body_but_with_validators() {
        for lines in [
            &[TAG][..],
            &["W/\"abc123\""],
            &["\"other\", W/\"abc123\""],
            &["\"x,y\"", "\"abc123\""],
            &["*"],
            &["\"abc123-gzip\""],
        ] {
            let response = ask(Method::GET, "/", lines).await;
            assert_eq!(response.status(), StatusCode::NOT_MODIFIED, "{lines:?}");
            let headers = response.headers();
            assert_eq!(headers[ETAG], TAG);
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
}
