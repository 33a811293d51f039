//! CORS by tower-http's rules, with the headers of a simple (not preflight) answer made once
//! when they cannot depend on the request: with every origin allowed (the default), every
//! GET, HEAD or POST answer gets the same `Access-Control-Allow-Origin: *` and
//! `Access-Control-Expose-Headers`, with or without `Origin`. They are computed at start by
//! the rules themselves, on a sample request, and added to each answer as they are, instead
//! of being built per request. Preflights, and every request under a list of origins (whose
//! answer depends on `Origin`), go through tower-http's `Cors` as they come. With CORS off
//! (`[server] enable_cors = false`) every request passes by untouched, preflights included.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use futures_util::FutureExt;
use http::header::{ORIGIN, VARY};
use http::{HeaderMap, Method, Request, Response};
use pin_project_lite::pin_project;
use tower::{Layer, Service, ServiceExt};

/// Adds [`Cors`] to a stack.
#[derive(Clone, Debug)]
pub struct CorsLayer {
    rules: tower_http::cors::CorsLayer,
    mode: Mode,
}

/// How a [`Cors`] answers.
#[derive(Clone, Debug)]
enum Mode {
    /// No CORS: every request passes by untouched.
    Off,
    /// Every request by the rules.
    Rules,
    /// Simple answers get these CORS headers, the same for all; preflights by the rules.
    Fixed(Arc<HeaderMap>),
}

impl CorsLayer {
    /// `any_origin` says that `rules` allow every origin, so that a simple answer's CORS
    /// headers are the same for every request.
    pub fn new(rules: tower_http::cors::CorsLayer, any_origin: bool) -> Self {
        let mode = if any_origin {
            Mode::Fixed(Arc::new(simple_answer_headers(&rules)))
        } else {
            Mode::Rules
        };
        Self { rules, mode }
    }

    /// CORS off. A layer all the same, so that the stack has one type either way.
    pub fn off() -> Self {
        Self {
            rules: tower_http::cors::CorsLayer::new(),
            mode: Mode::Off,
        }
    }
}

/// What `rules` add to the answer of a simple cross-origin GET.
fn simple_answer_headers(rules: &tower_http::cors::CorsLayer) -> HeaderMap {
    let answer = tower::service_fn(|_: Request<()>| async {
        Ok::<_, Infallible>(Response::new(String::new()))
    });
    let sample = Request::get("/")
        .header(ORIGIN, "https://origin.invalid")
        .body(())
        .expect("a valid request");
    let response = match rules.layer(answer).oneshot(sample).now_or_never() {
        Some(Ok(response)) => response,
        Some(Err(never)) => match never {},
        None => unreachable!("CORS rules over an answer that is ready answer at once"),
    };
    response.headers().clone()
}

impl<S> Layer<S> for CorsLayer {
    type Service = Cors<S>;

    fn layer(&self, inner: S) -> Cors<S> {
        Cors {
            cors: self.rules.layer(inner),
            mode: self.mode.clone(),
        }
    }
}

/// See the module documentation.
#[derive(Clone, Debug)]
pub struct Cors<S> {
    cors: tower_http::cors::Cors<S>,
    mode: Mode,
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
        match &self.mode {
            Mode::Off => ResponseFuture::Passed {
                inner: self.cors.get_mut().call(req),
            },
            Mode::Fixed(fixed) if req.method() != Method::OPTIONS => ResponseFuture::Fixed {
                headers: fixed.clone(),
                inner: self.cors.get_mut().call(req),
            },
            _ => ResponseFuture::Rules {
                inner: Box::pin(self.cors.call(req)),
            },
        }
    }
}

pin_project! {
    #[project = Projected]
    pub enum ResponseFuture<F> {
        /// Answered by tower-http's rules: preflights, and every request under an origin list.
        /// Boxed: its future carries the headers it will add (180 bytes), and every layer
        /// above moves this future whole on every request.
        Rules { inner: Pin<Box<tower_http::cors::ResponseFuture<F>>> },
        /// A simple request under rules that answer every one alike.
        Fixed { #[pin] inner: F, headers: Arc<HeaderMap> },
        /// CORS off.
        Passed { #[pin] inner: F },
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
            Projected::Rules { inner } => inner.as_mut().poll(cx),
            Projected::Passed { inner } => inner.poll(cx),
            Projected::Fixed { inner, headers } => {
                let mut response = ready!(inner.poll(cx))?;
                // As tower-http does: `Vary` is added to, any other of its headers replaces
                // those of the same name.
                let answer = response.headers_mut();
                let mut previous = None;
                for (name, value) in headers.iter() {
                    if name == VARY || previous == Some(name) {
                        answer.append(name, value.clone());
                    } else {
                        answer.insert(name, value.clone());
                    }
                    previous = Some(name);
                }
                Poll::Ready(Ok(response))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use http::header::{ACCESS_CONTROL_REQUEST_METHOD, ALLOW};
    use http::StatusCode;
    use tower::ServiceExt;

    use super::*;

    /// The layers above move this future whole on every request: whatever the mode, it adds
    /// no more than a pointer and its variant to the inner future.
    #[test]
    fn the_future_adds_a_pointer_at_most() {
        type Inner = std::future::Ready<Result<Response<String>, Infallible>>;
        assert!(
            size_of::<ResponseFuture<Inner>>() <= size_of::<Inner>() + 2 * size_of::<usize>(),
            "{} bytes around {}",
            size_of::<ResponseFuture<Inner>>(),
            size_of::<Inner>()
        );
    }

    #[tokio::test]
    async fn switched_off_it_passes_preflights_and_simple_requests_untouched() {
        let inner = tower::service_fn(|req: Request<()>| async move {
            let mut response = Response::new(String::new());
            *response.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
            response.headers_mut().insert(ALLOW, "GET".parse().unwrap());
            response
                .headers_mut()
                .insert("x-method", req.method().as_str().parse().unwrap());
            Ok::<_, Infallible>(response)
        });
        let service = CorsLayer::off().layer(inner);
        for method in [Method::OPTIONS, Method::GET] {
            let req = Request::builder()
                .method(method.clone())
                .uri("/api/v1/extensions")
                .header(ORIGIN, "https://example.com")
                .header(ACCESS_CONTROL_REQUEST_METHOD, "GET")
                .body(())
                .unwrap();
            let response = service.clone().oneshot(req).await.unwrap();
            assert_eq!(response.headers()["x-method"], method.as_str());
            let names: Vec<_> = response.headers().keys().map(|n| n.as_str()).collect();
            assert_eq!(names, ["allow", "x-method"], "{method}");
        }
    }
}
