//! The API error: a status, a snake_case code and a message, rendered as
//! `{"error": "<code>", "message": "..."}`. This is the one place where domain errors become
//! HTTP statuses.

use http::header::{HeaderValue, ALLOW, CONTENT_TYPE, RETRY_AFTER};
use http::{Response, StatusCode};
use serde::Serialize;

use crate::body::{self, Body};
use crate::registry::RegistryError;

/// Counter of `503 overloaded` answers, by the limit they ran into ([`Overload`]).
pub const OVERLOADED_TOTAL: &str = "overloaded_total";

/// The limits a request can find full, each answered `503 overloaded` at once; the `limit`
/// label of [`OVERLOADED_TOTAL`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Overload {
    /// `[server] max_concurrent_requests` (load shedding).
    Requests,
    /// `[server] max_concurrent_downloads`.
    Downloads,
    /// The memory the request bodies being read may hold.
    RequestBodies,
}

impl Overload {
    pub const ALL: [Self; 3] = [Self::Requests, Self::Downloads, Self::RequestBodies];

    pub fn label(self) -> &'static str {
        match self {
            Self::Requests => "requests",
            Self::Downloads => "downloads",
            Self::RequestBodies => "request_bodies",
        }
    }
}

/// An error response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// `Retry-After` seconds, for 429 and 503.
    pub retry_after: Option<u64>,
    /// `Allow` header, for 405.
    pub allow: Option<&'static str>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    message: &'a str,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
            allow: None,
        }
    }

    pub fn invalid_parameter(name: &str, reason: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_parameter",
            format!("invalid parameter '{name}': {reason}"),
        )
    }

    pub fn invalid_path(reason: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_path", reason)
    }

    pub fn route_not_found() -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such endpoint; the API lives under /api/v1 (see the README)",
        )
    }

    pub fn method_not_allowed(allow: &'static str) -> Self {
        Self {
            allow: Some(allow),
            ..Self::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("method not allowed here; allowed: {allow}"),
            )
        }
    }

    pub fn timeout() -> Self {
        Self::new(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout",
            "the request took longer than the configured request timeout",
        )
    }

    /// `503 overloaded` with `Retry-After: 1`, counted by the limit it ran into.
    pub fn overloaded(limit: Overload) -> Self {
        metrics::counter!(OVERLOADED_TOTAL, "limit" => limit.label()).increment(1);
        let message = match limit {
            Overload::Requests => "the service is at its concurrency limit; retry shortly",
            Overload::Downloads => {
                "the service is at its limit of concurrent downloads; retry shortly"
            }
            Overload::RequestBodies => {
                "the request bodies being read fill the service's budget for them; retry shortly"
            }
        };
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "overloaded", message).with_retry_after(1)
    }

    pub fn internal() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; the request id in x-request-id identifies it in the logs",
        )
    }

    pub fn with_retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    /// The JSON response. Never fails: the body is two strings.
    pub fn into_response(self) -> Response<Body> {
        let json = serde_json::to_vec(&ErrorBody {
            error: self.code,
            message: &self.message,
        })
        .unwrap_or_default();
        let mut response = Response::new(body::full(json));
        *response.status_mut() = self.status;
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(seconds) = self.retry_after {
            headers.insert(RETRY_AFTER, HeaderValue::from(seconds));
        }
        if let Some(allow) = self.allow {
            headers.insert(ALLOW, HeaderValue::from_static(allow));
        }
        response
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        let message = e.to_string();
        match e {
            RegistryError::InvalidType(_) => {
                Self::new(StatusCode::BAD_REQUEST, "invalid_type", message)
            }
            RegistryError::InvalidName => {
                Self::new(StatusCode::BAD_REQUEST, "invalid_name", message)
            }
            RegistryError::InvalidVersion => {
                Self::new(StatusCode::BAD_REQUEST, "invalid_version", message)
            }
            RegistryError::InvalidParameter { .. } => {
                Self::new(StatusCode::BAD_REQUEST, "invalid_parameter", message)
            }
            RegistryError::NotFound(_) => Self::new(StatusCode::NOT_FOUND, "not_found", message),
            RegistryError::BackendUnavailable { .. } => {
                Self::new(StatusCode::BAD_GATEWAY, "backend_unavailable", message)
            }
            RegistryError::BackendAuthFailed { .. } => {
                Self::new(StatusCode::BAD_GATEWAY, "backend_auth_failed", message)
            }
            RegistryError::BackendTimeout { .. } => {
                Self::new(StatusCode::GATEWAY_TIMEOUT, "timeout", message)
            }
            RegistryError::BackendSuspended { retry_after, .. } => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "backend_unavailable",
                message,
            )
            .with_retry_after(retry_after.as_secs_f64().ceil().max(1.0) as u64),
            RegistryError::Internal(detail) => {
                tracing::error!(%detail, "internal error");
                Self::internal()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overloaded_answers_are_alike_and_counted_by_the_limit_they_ran_into() {
        let recorder = crate::telemetry::recorder();
        let handle = recorder.handle();
        let _local = metrics::set_default_local_recorder(&recorder);
        for limit in [
            Overload::Requests,
            Overload::Downloads,
            Overload::RequestBodies,
            Overload::RequestBodies,
        ] {
            let refused = ApiError::overloaded(limit);
            assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!((refused.code, refused.retry_after), ("overloaded", Some(1)));
        }
        let text = handle.render();
        for line in [
            r#"overloaded_total{limit="requests"} 1"#,
            r#"overloaded_total{limit="downloads"} 1"#,
            r#"overloaded_total{limit="request_bodies"} 2"#,
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
    }
}
