//! HTTP metrics: one count and one duration per request, labelled by the route template —
//! never the raw path, so the number of series stays fixed whatever clients send.
//!
//! The route is the `Route` the router put in the response extensions; answers given above
//! the router (429, 503, 504, CORS preflights) are matched on their path instead, and paths
//! matching no route are labelled `unmatched`.
//!
//! The series' handles are registered once per layer (the histograms when it is built, each
//! counter at its first request) and kept, so counting a request allocates nothing: the
//! `counter!` macro with labels builds a key, its label list and the status text each time.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{ready, Context, Poll};
use std::time::Instant;

use http::{Method, Request, Response, StatusCode, Uri};
use metrics::{Counter, Histogram};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use crate::api::{Route, RouteTable};

/// Counter of answered requests, by method, route and status.
pub const HTTP_REQUESTS_TOTAL: &str = "http_requests_total";
/// Histogram of the time to the response head, by route.
pub const HTTP_REQUEST_DURATION_SECONDS: &str = "http_request_duration_seconds";

/// The route label of paths no route matches.
const UNMATCHED: &str = "unmatched";

/// The method label: the methods the API knows by name, every other one as `other`.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        _ => "other",
    }
}

/// The registered series of one route label.
struct Series {
    route: &'static str,
    duration: Histogram,
    /// Counters by method label and status, registered at their first request. Bounded: a
    /// handful of method labels times the statuses the service itself answers, so few that
    /// a scan finds one sooner than hashing the pair would.
    requests: RwLock<Vec<(&'static str, StatusCode, Counter)>>,
}

impl Series {
    fn new(route: &'static str) -> Self {
        Self {
            route,
            duration: metrics::histogram!(HTTP_REQUEST_DURATION_SECONDS, "route" => route),
            requests: RwLock::default(),
        }
    }

    fn count_request(&self, method: &'static str, status: StatusCode) {
        let at = |requests: &[(&str, StatusCode, Counter)]| {
            requests
                .iter()
                .position(|(m, s, _)| *s == status && *m == method)
        };
        let requests = self
            .requests
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(i) = at(&requests) {
            requests[i].2.increment(1);
            return;
        }
        drop(requests);
        let mut requests = self
            .requests
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let i = at(&requests).unwrap_or_else(|| {
            requests.push((
                method,
                status,
                metrics::counter!(
                    HTTP_REQUESTS_TOTAL,
                    "method" => method,
                    "route" => self.route,
                    "status" => status.as_u16().to_string(),
                ),
            ));
            requests.len() - 1
        });
        requests[i].2.increment(1);
    }
}

/// What every clone of the layer's service shares.
struct Shared {
    /// Matches the paths of answers that never reached the router.
    routes: RouteTable,
    /// One per route, in `Route::ALL` (declaration) order, so `route as usize` indexes it.
    by_route: Vec<Series>,
    unmatched: Series,
}

impl Shared {
    fn series(&self, route: Option<Route>) -> &Series {
        route
            .and_then(|route| self.by_route.get(route as usize))
            .unwrap_or(&self.unmatched)
    }
}

/// Adds [`HttpMetrics`] to a stack.
#[derive(Clone)]
pub struct HttpMetricsLayer {
    shared: Arc<Shared>,
}

impl HttpMetricsLayer {
    /// Registers the histograms with the recorder installed now.
    pub fn new() -> Self {
        Self {
            shared: Arc::new(Shared {
                routes: RouteTable::new(),
                by_route: Route::ALL.map(|r| Series::new(r.template())).into(),
                unmatched: Series::new(UNMATCHED),
            }),
        }
    }
}

impl Default for HttpMetricsLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl<S> Layer<S> for HttpMetricsLayer {
    type Service = HttpMetrics<S>;

    fn layer(&self, inner: S) -> HttpMetrics<S> {
        HttpMetrics {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// See the module documentation.
#[derive(Clone)]
pub struct HttpMetrics<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S, B, ResBody> Service<Request<B>> for HttpMetrics<S>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        ResponseFuture {
            method: method_label(req.method()),
            uri: req.uri().clone(),
            shared: self.shared.clone(),
            start: Instant::now(),
            inner: self.inner.call(req),
        }
    }
}

pin_project! {
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        method: &'static str,
        uri: Uri,
        shared: Arc<Shared>,
        start: Instant,
    }
}

impl<F, ResBody, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<ResBody>, E>>,
{
    type Output = Result<Response<ResBody>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        if let Ok(response) = &result {
            let route = response
                .extensions()
                .get::<Route>()
                .copied()
                .or_else(|| this.shared.routes.route(this.uri.path()));
            let series = this.shared.series(route);
            series.count_request(this.method, response.status());
            series.duration.record(this.start.elapsed());
        }
        Poll::Ready(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::body::{self, Body};
    use crate::telemetry;
    use http::StatusCode;
    use std::convert::Infallible;
    use tower::ServiceExt;

    /// Answers like the router: routed paths carry their `Route`, `/slow/...` answers 503
    /// without one (as a layer above the router would).
    async fn app(req: Request<Body>) -> Result<Response<Body>, Infallible> {
        let mut response = Response::new(body::empty());
        match RouteTable::new().at(req.uri().path()) {
            Some((route, _)) if req.uri().query() != Some("shed") => {
                response.extensions_mut().insert(route);
            }
            Some(_) => *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE,
            None => *response.status_mut() = StatusCode::NOT_FOUND,
        }
        Ok(response)
    }

    #[tokio::test]
    async fn requests_are_counted_by_route_template_method_and_status() {
        let recorder = telemetry::recorder();
        let handle = recorder.handle();
        let _local = metrics::set_default_local_recorder(&recorder);
        let service = HttpMetricsLayer::new().layer(tower::service_fn(app));
        let requests = [
            (Method::GET, "/api/v1/extensions/provider/aws"),
            (Method::GET, "/api/v1/extensions/provider/gcp"),
            (Method::HEAD, "/api/v1/extensions/taskserv/k8s/1.0.0"),
            (Method::GET, "/api/v1/extensions?shed"),
            (Method::from_bytes(b"BREW").unwrap(), "/no/such/thing"),
        ];
        for (method, uri) in requests {
            let req = Request::builder()
                .method(method)
                .uri(uri)
                .body(body::empty())
                .unwrap();
            service.clone().oneshot(req).await.unwrap();
        }
        let text = handle.render();
        for line in [
            r#"http_requests_total{method="GET",route="/api/v1/extensions/{type}/{name}",status="200"} 2"#,
            r#"http_requests_total{method="HEAD",route="/api/v1/extensions/{type}/{name}/{version}",status="200"} 1"#,
            r#"http_requests_total{method="GET",route="/api/v1/extensions",status="503"} 1"#,
            r#"http_requests_total{method="other",route="unmatched",status="404"} 1"#,
            r#"http_request_duration_seconds_count{route="/api/v1/extensions/{type}/{name}"} 2"#,
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
        assert!(!text.contains("aws"), "raw paths never become labels");
        // Rendered as a histogram with buckets, not as a summary.
        assert!(text.contains("# TYPE http_request_duration_seconds histogram"));
        assert!(text
            .contains(r#"http_request_duration_seconds_bucket{route="unmatched",le="0.005"} 1"#));
    }
}
