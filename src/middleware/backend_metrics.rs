//! Per-backend metrics, between the merge and each backend instance (the `backend` label is
//! the instance's name, so bounded by the configuration): how often each backend is asked
//! what, how it answers and how long it takes; the bytes of the downloads it streams, counted
//! as they pass; and the extensions its listings return.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;
use metrics::SharedString;
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use crate::registry::{
    ArtifactBody, BackendRequest, BackendResponse, DigestMismatch, Extension, ExtensionType,
    Instance, RegistryError,
};
use crate::BoxError;

/// Counter of calls to a backend, by backend, operation and outcome.
pub const BACKEND_REQUESTS_TOTAL: &str = "backend_requests_total";
/// Histogram of the time a backend took to answer, by backend, operation and outcome.
pub const BACKEND_REQUEST_DURATION_SECONDS: &str = "backend_request_duration_seconds";
/// Counter of artifact bytes streamed from a backend, by backend.
pub const DOWNLOAD_BYTES_TOTAL: &str = "download_bytes_total";
/// Counter of downloads aborted because their bytes did not match the digest, by backend.
pub const DOWNLOAD_DIGEST_MISMATCH_TOTAL: &str = "download_digest_mismatch_total";
/// Counter of downloads cut short because the backend's stream failed, by backend.
pub const DOWNLOAD_BACKEND_ERRORS_TOTAL: &str = "download_backend_errors_total";
/// Counter of the extensions backend listings returned, by backend and type.
pub const EXTENSIONS_TOTAL: &str = "extensions_total";

fn operation(req: &BackendRequest) -> &'static str {
    match req {
        BackendRequest::List(_) => "list",
        BackendRequest::Get { .. } => "get",
        BackendRequest::Versions { .. } => "versions",
        // A HEAD is the download route's call too, answered without the stream.
        BackendRequest::Download { .. } | BackendRequest::DownloadHead { .. } => "download",
        BackendRequest::Health => "health",
    }
}

fn outcome(result: &Result<BackendResponse, RegistryError>) -> &'static str {
    match result {
        // A probe that ran and found the backend sick still answers `Ok`.
        Ok(BackendResponse::Health(report)) if report.0.iter().any(|h| !h.healthy) => "unhealthy",
        Ok(_) => "ok",
        Err(RegistryError::NotFound(_)) => "not_found",
        Err(
            RegistryError::InvalidType(_)
            | RegistryError::InvalidName
            | RegistryError::InvalidVersion
            | RegistryError::InvalidParameter { .. },
        ) => "invalid",
        Err(RegistryError::BackendUnavailable { .. } | RegistryError::BackendSuspended { .. }) => {
            "unavailable"
        }
        Err(RegistryError::BackendAuthFailed { .. }) => "auth_failed",
        Err(RegistryError::BackendTimeout { .. }) => "timeout",
        Err(RegistryError::Internal(_)) => "internal",
    }
}

/// Adds [`BackendMetrics`] to one backend instance.
#[derive(Clone, Debug)]
pub struct BackendMetricsLayer {
    backend: SharedString,
}

impl BackendMetricsLayer {
    pub fn new(backend: impl Into<Instance>) -> Self {
        Self {
            backend: backend.into().name.shared().into(),
        }
    }
}

impl<S> Layer<S> for BackendMetricsLayer {
    type Service = BackendMetrics<S>;

    fn layer(&self, inner: S) -> BackendMetrics<S> {
        BackendMetrics {
            inner,
            backend: self.backend.clone(),
        }
    }
}

/// See the module documentation.
#[derive(Clone, Debug)]
pub struct BackendMetrics<S> {
    inner: S,
    /// The `backend` label: the instance's name, shared, so a clone per call is a count.
    backend: SharedString,
}

impl<S> Service<BackendRequest> for BackendMetrics<S>
where
    S: Service<BackendRequest, Response = BackendResponse, Error = RegistryError>,
{
    type Response = BackendResponse;
    type Error = RegistryError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), RegistryError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: BackendRequest) -> Self::Future {
        ResponseFuture {
            backend: self.backend.clone(),
            operation: operation(&req),
            start: Instant::now(),
            inner: self.inner.call(req),
        }
    }
}

pin_project! {
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        backend: SharedString,
        operation: &'static str,
        start: Instant,
    }
}

impl<F> Future for ResponseFuture<F>
where
    F: Future<Output = Result<BackendResponse, RegistryError>>,
{
    type Output = Result<BackendResponse, RegistryError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        let backend = &*this.backend;
        let labels = [
            ("backend", backend.clone()),
            ("operation", SharedString::from(*this.operation)),
            ("outcome", SharedString::from(outcome(&result))),
        ];
        metrics::counter!(BACKEND_REQUESTS_TOTAL, &labels).increment(1);
        metrics::histogram!(BACKEND_REQUEST_DURATION_SECONDS, &labels).record(this.start.elapsed());
        Poll::Ready(result.map(|response| match response {
            BackendResponse::List(list) => {
                count_extensions(backend, &list);
                BackendResponse::List(list)
            }
            BackendResponse::Artifact(mut artifact) => {
                artifact.body = CountingBody {
                    inner: artifact.body,
                    bytes: metrics::counter!(DOWNLOAD_BYTES_TOTAL, "backend" => backend.clone()),
                    backend: backend.clone(),
                }
                .boxed_unsync();
                BackendResponse::Artifact(artifact)
            }
            other => other,
        }))
    }
}

fn count_extensions(backend: &SharedString, list: &[Extension]) {
    for ty in ExtensionType::ALL {
        let n = list.iter().filter(|e| e.ty == ty).count();
        if n > 0 {
            metrics::counter!(EXTENSIONS_TOTAL, "backend" => backend.clone(), "type" => ty.as_str())
                .increment(n as u64);
        }
    }
}

pin_project! {
    /// A download body that counts its bytes as they stream, so aborted and partial downloads
    /// count what was actually sent, and HEAD requests (whose body is dropped) count nothing;
    /// and a stream ended by a digest mismatch or cut by its backend, by the instance it came
    /// from. The client has its head (`200`) already: the counter and the log line say that it
    /// got less than `Content-Length`.
    struct CountingBody {
        #[pin]
        inner: ArtifactBody,
        bytes: metrics::Counter,
        // The `backend` label of a digest mismatch.
        backend: SharedString,
    }
}

impl http_body::Body for CountingBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        match &frame {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    this.bytes.increment(data.len() as u64);
                }
            }
            Some(Err(e)) if e.is::<DigestMismatch>() => {
                let backend = this.backend.clone();
                metrics::counter!(DOWNLOAD_DIGEST_MISMATCH_TOTAL, "backend" => backend)
                    .increment(1);
            }
            Some(Err(e)) => {
                let backend = this.backend.clone();
                tracing::warn!(%backend, error = %e, "download cut short: the backend's stream failed");
                metrics::counter!(DOWNLOAD_BACKEND_ERRORS_TOTAL, "backend" => backend).increment(1);
            }
            _ => {}
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
    use super::*;
    use crate::registry::{
        Artifact, BackendHealth, ExtensionKey, ExtensionName, HealthReport, Served, Source,
        VersionSelector,
    };
    use crate::telemetry;
    use tower::ServiceExt;

    fn key() -> ExtensionKey {
        ExtensionKey {
            ty: ExtensionType::Provider,
            name: ExtensionName::parse("aws").unwrap(),
        }
    }

    async fn backend(req: BackendRequest) -> Result<BackendResponse, RegistryError> {
        match req {
            BackendRequest::Download { key, .. } => {
                let cut = key.name.as_str() == "cut";
                let chunks = ["abc", "defg"].map(|c| match c {
                    "defg" if cut => Err(BoxError::from("connection reset")),
                    _ => Ok(Frame::data(Bytes::from(c))),
                });
                let body = http_body_util::StreamBody::new(futures_util::stream::iter(chunks));
                Ok(BackendResponse::Artifact(Artifact {
                    filename: "aws.tar.gz".into(),
                    content_length: Some(1000),
                    checksum: None,
                    served: Served::Whole,
                    body: body.boxed_unsync(),
                }))
            }
            BackendRequest::Get { .. } => Err(RegistryError::timeout(Source::Oci)),
            BackendRequest::Health => {
                Ok(BackendResponse::Health(HealthReport(vec![BackendHealth {
                    source: Source::Oci,
                    healthy: false,
                    detail: Some("HTTP 503".into()),
                }])))
            }
            _ => Err(RegistryError::not_found(key())),
        }
    }

    #[tokio::test]
    async fn calls_are_counted_per_backend_operation_and_outcome() {
        let recorder = telemetry::recorder();
        let handle = recorder.handle();
        let _local = metrics::set_default_local_recorder(&recorder);
        let service = BackendMetricsLayer::new(Source::Oci).layer(tower::service_fn(backend));

        let get = BackendRequest::Get {
            key: key(),
            source: None,
        };
        assert!(service.clone().oneshot(get).await.is_err());
        let versions = BackendRequest::Versions {
            key: key(),
            source: None,
        };
        assert!(service.clone().oneshot(versions).await.is_err());
        let health = service.clone().oneshot(BackendRequest::Health).await;
        assert!(health.unwrap().into_health().is_ok());
        let download = BackendRequest::Download {
            key: key(),
            version: VersionSelector::Latest,
            source: None,
            range: None,
        };
        let response = service.clone().oneshot(download).await.unwrap();
        let body = response.into_artifact().unwrap().body;
        // Nothing is counted before the bytes stream, and then what streamed, not the
        // announced length.
        assert!(handle
            .render()
            .contains(r#"download_bytes_total{backend="oci"} 0"#));
        assert_eq!(body.collect().await.unwrap().to_bytes(), "abcdefg");
        let cut = BackendRequest::Download {
            key: ExtensionKey {
                name: ExtensionName::parse("cut").unwrap(),
                ..key()
            },
            version: VersionSelector::Latest,
            source: None,
            range: None,
        };
        let response = service.clone().oneshot(cut).await.unwrap();
        assert!(response
            .into_artifact()
            .unwrap()
            .body
            .collect()
            .await
            .is_err());

        let text = handle.render();
        for line in [
            r#"backend_requests_total{backend="oci",operation="get",outcome="timeout"} 1"#,
            r#"backend_requests_total{backend="oci",operation="versions",outcome="not_found"} 1"#,
            r#"backend_requests_total{backend="oci",operation="download",outcome="ok"} 2"#,
            r#"backend_requests_total{backend="oci",operation="health",outcome="unhealthy"} 1"#,
            r#"backend_request_duration_seconds_count{backend="oci",operation="get",outcome="timeout"} 1"#,
            r#"download_bytes_total{backend="oci"} 10"#,
            r#"download_backend_errors_total{backend="oci"} 1"#,
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
        assert!(text.contains("# TYPE backend_request_duration_seconds histogram"));
    }
}
