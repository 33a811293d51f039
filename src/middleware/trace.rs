//! One span and one log line per request: the span of [`telemetry::request_span`], entered
//! while the request is served and while its body is polled (so what a handler or a streaming
//! download logs carries it), and the line of [`telemetry::log_response`] with the time to
//! the response head.
//!
//! The log filter decides what this costs. With the span and the line both filtered out (as
//! `extension_registry::telemetry=warn` does), a request reads no clock and its body is left
//! as it is; with the span on, the body is wrapped once to enter it.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use pin_project_lite::pin_project;
use tower::{Layer, Service};
use tracing::Span;

use crate::body::Body;
use crate::telemetry;
use crate::BoxError;

/// Adds [`Trace`] to a stack.
#[derive(Clone, Copy, Debug, Default)]
pub struct TraceLayer;

impl<S> Layer<S> for TraceLayer {
    type Service = Trace<S>;

    fn layer(&self, inner: S) -> Trace<S> {
        Trace { inner }
    }
}

/// See the module documentation.
#[derive(Clone, Debug)]
pub struct Trace<S> {
    inner: S,
}

impl<S, B> Service<Request<B>> for Trace<S>
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
        let span = telemetry::request_span(&req);
        let start = (!span.is_disabled() || telemetry::logs_responses()).then(Instant::now);
        let inner = span.in_scope(|| self.inner.call(req));
        ResponseFuture { inner, span, start }
    }
}

pin_project! {
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        span: Span,
        // When the request came, if anything logged needs it.
        start: Option<Instant>,
    }
}

impl<F, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<Body>, E>>,
{
    type Output = Result<Response<Body>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let _entered = this.span.enter();
        let response = ready!(this.inner.poll(cx))?;
        if let Some(start) = this.start {
            telemetry::log_response(&response, start.elapsed());
        }
        if this.span.is_disabled() {
            return Poll::Ready(Ok(response));
        }
        let span = this.span.clone();
        let start = *this.start;
        Poll::Ready(Ok(
            response.map(|inner| Traced { inner, span, start }.boxed_unsync())
        ))
    }
}

pin_project! {
    /// A body polled within its request's span.
    struct Traced {
        #[pin]
        inner: Body,
        span: Span,
        start: Option<Instant>,
    }
}

impl HttpBody for Traced {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        let _entered = this.span.enter();
        let frame = ready!(this.inner.as_mut().poll_frame(cx));
        // hyper stops polling once a body says it has ended, so the end is also a data frame
        // after which the body is at its end, not only the `None` after it.
        let ended = match &frame {
            None => true,
            Some(Ok(frame)) => frame.is_trailers() || this.inner.is_end_stream(),
            Some(Err(_)) => false,
        };
        if let (true, Some(start)) = (ended, this.start.take()) {
            telemetry::log_end_of_stream(start.elapsed());
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use tower::{service_fn, ServiceExt};
    use tracing_subscriber::EnvFilter;

    use super::*;
    use crate::telemetry::tests::Captured;
    use crate::telemetry::text_logger;

    /// Serves one request whose handler logs, under `filter`; returns the log.
    async fn serve(filter: &str) -> String {
        let captured = Captured::default();
        let sink = captured.clone();
        let logger = text_logger(EnvFilter::new(filter), false, move || sink.clone()).finish();
        let _installed = tracing::subscriber::set_default(logger);
        let handler = service_fn(|_: Request<Body>| async {
            tracing::warn!("from the handler");
            Ok::<_, Infallible>(Response::new(crate::body::full("ok")))
        });
        let req = Request::get("/api/v1/extensions")
            .body(crate::body::empty())
            .unwrap();
        let response = TraceLayer.layer(handler).oneshot(req).await.unwrap();
        // As hyper reads it: one frame, then no more once the body says it has ended.
        let mut body = response.into_body();
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(&frame.into_data().unwrap()[..], b"ok");
        assert!(body.is_end_stream());
        captured.text()
    }

    #[tokio::test]
    async fn the_handler_logs_within_the_span_and_the_request_gets_its_line() {
        let log = serve("debug").await;
        let handler = log
            .lines()
            .find(|l| l.contains("from the handler"))
            .unwrap();
        assert!(
            handler.contains("request{method=GET path=/api/v1/extensions"),
            "{log}"
        );
        let finished = log
            .lines()
            .find(|l| l.contains("request finished"))
            .unwrap();
        assert!(finished.contains("status=200"), "{log}");
        assert!(finished.contains("latency_ms="), "{log}");
        let end = log.lines().find(|l| l.contains("end of stream")).unwrap();
        assert!(end.contains("request{method=GET"), "{log}");
    }

    #[tokio::test]
    async fn with_the_request_lines_filtered_out_nothing_of_them_is_logged() {
        let log = serve("warn,extension_registry::telemetry=warn").await;
        assert!(log.contains("from the handler"), "{log}");
        assert!(!log.contains("request{"), "{log}");
        assert!(!log.contains("request finished"), "{log}");
    }
}
