//! CORS preflights only: tower-http's CORS layer answers every `OPTIONS` as a preflight (200,
//! whatever the path). This layer, right above it, answers an `OPTIONS` that is not one (it
//! lacks `Origin` or `Access-Control-Request-Method`) with `405` and the path's `Allow` at
//! once, on any path, unknown ones and `*` included, as the router does without CORS; and
//! any `OPTIONS` on a route that does not exist here (a webhook or purge route without its
//! secret) with `404`, as the router answers every other method there.

use std::future::Ready;
use std::task::{Context, Poll};

use futures_util::future::Either;
use http::header::{ACCESS_CONTROL_REQUEST_METHOD, ORIGIN};
use http::{Method, Request, Response};
use tower::{Layer, Service};

use crate::api::Existing;
use crate::body::Body;

/// Adds [`PreflightOnly`], knowing which routes exist.
#[derive(Clone, Copy, Debug)]
pub struct PreflightOnlyLayer {
    existing: Existing,
}

impl PreflightOnlyLayer {
    pub fn new(existing: Existing) -> Self {
        Self { existing }
    }
}

impl<S> Layer<S> for PreflightOnlyLayer {
    type Service = PreflightOnly<S>;

    fn layer(&self, inner: S) -> PreflightOnly<S> {
        PreflightOnly {
            inner,
            existing: self.existing,
        }
    }
}

/// See the module documentation.
#[derive(Clone, Debug)]
pub struct PreflightOnly<S> {
    inner: S,
    existing: Existing,
}

/// Whether a request is a CORS preflight (Fetch standard: `OPTIONS` with `Origin` and
/// `Access-Control-Request-Method`).
fn is_preflight<B>(req: &Request<B>) -> bool {
    let headers = req.headers();
    headers.contains_key(ORIGIN) && headers.contains_key(ACCESS_CONTROL_REQUEST_METHOD)
}

impl<S, B> Service<Request<B>> for PreflightOnly<S>
where
    S: Service<Request<B>, Response = Response<Body>>,
{
    type Response = Response<Body>;
    type Error = S::Error;
    /// The inner future, or the 404 or 405 answered at once.
    type Future = Either<S::Future, Ready<Result<Response<Body>, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let refused = (req.method() == Method::OPTIONS)
            .then(|| {
                self.existing
                    .options_refusal(req.uri().path(), is_preflight(&req))
            })
            .flatten();
        match refused {
            Some(refused) => Either::Right(std::future::ready(Ok(refused.into_response()))),
            None => Either::Left(self.inner.call(req)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use http::{HeaderValue, StatusCode};
    use tower::ServiceExt;

    use super::*;
    use crate::api::ALLOW;

    async fn status(method: Method, uri: &str, headers: &[(&str, &str)]) -> Response<Body> {
        let inner = tower::service_fn(|_: Request<()>| async {
            Ok::<_, Infallible>(Response::new(crate::body::empty()))
        });
        let mut req = Request::builder().method(method).uri(uri);
        for (name, value) in headers {
            req = req.header(*name, HeaderValue::from_str(value).unwrap());
        }
        PreflightOnlyLayer::new(Existing::new(&Default::default()))
            .layer(inner)
            .oneshot(req.body(()).unwrap())
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn only_preflights_and_other_methods_pass() {
        let origin = ("origin", "https://app.example.com");
        let asks = ("access-control-request-method", "GET");
        for (uri, headers) in [
            ("/api/v1/extensions", &[][..]),
            ("*", &[]),
            ("/nope", &[origin]),
            ("/livez", &[asks]),
        ] {
            let response = status(Method::OPTIONS, uri, headers).await;
            assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED, "{uri}");
            assert_eq!(response.headers()["allow"], ALLOW);
        }
        let preflight = status(Method::OPTIONS, "/livez", &[origin, asks]).await;
        assert_eq!(preflight.status(), StatusCode::OK);
        // A route without its secret does not exist, preflights included.
        for headers in [&[][..], &[origin, asks]] {
            let response = status(Method::OPTIONS, "/api/v1/cache/purge", headers).await;
            assert_eq!(response.status(), StatusCode::NOT_FOUND);
        }
        assert_eq!(
            status(Method::GET, "/livez", &[]).await.status(),
            StatusCode::OK
        );
    }
}
