//! CORS for the requests that are CORS requests: tower-http's `Cors` answers every request
//! that carries `Origin`, which is every cross-origin request a browser makes, preflights
//! included. A request without `Origin` (a provisioning tool, a script, curl) is not one: it
//! goes straight to the service below and its answer gets no CORS headers, so it does not pay
//! for building them.
//!
//! Whether CORS headers are added depends on `Origin`, so both kinds of answer carry
//! `Vary: origin` (the CORS rules are built with it, see `stack`): a shared cache keeps them
//! apart and never hands an answer made for no origin to a browser.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use http::header::{HeaderValue, ORIGIN, VARY};
use http::{Request, Response};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

/// Adds [`Cors`] to a stack, with tower-http's CORS rules for requests carrying `Origin`;
/// the rules must add `Vary: origin` as answers without `Origin` do.
#[derive(Clone, Debug)]
pub struct CorsLayer {
    rules: tower_http::cors::CorsLayer,
}

impl CorsLayer {
    pub fn new(rules: tower_http::cors::CorsLayer) -> Self {
        Self { rules }
    }
}

impl<S> Layer<S> for CorsLayer {
    type Service = Cors<S>;

    fn layer(&self, inner: S) -> Cors<S> {
        Cors {
            cors: self.rules.layer(inner),
        }
    }
}

/// See the module documentation.
#[derive(Clone, Debug)]
pub struct Cors<S> {
    cors: tower_http::cors::Cors<S>,
}

impl<S, B, ResBody> Service<Request<B>> for Cors<S>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
    ResBody: Default,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.cors.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        if req.headers().contains_key(ORIGIN) {
            ResponseFuture::Cors {
                inner: self.cors.call(req),
            }
        } else {
            ResponseFuture::Plain {
                inner: self.cors.get_mut().call(req),
            }
        }
    }
}

pin_project! {
    #[project = Projected]
    pub enum ResponseFuture<F> {
        /// A CORS request, answered by tower-http's rules.
        Cors { #[pin] inner: tower_http::cors::ResponseFuture<F> },
        /// No `Origin`: the answer as it is, with `Vary: origin` as a CORS answer has.
        Plain { #[pin] inner: F },
    }
}

impl<F, ResBody, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<ResBody>, E>>,
    ResBody: Default,
{
    type Output = Result<Response<ResBody>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            Projected::Cors { inner } => inner.poll(cx),
            Projected::Plain { inner } => {
                let mut response = ready!(inner.poll(cx))?;
                response
                    .headers_mut()
                    .append(VARY, HeaderValue::from_static("origin"));
                Poll::Ready(Ok(response))
            }
        }
    }
}
