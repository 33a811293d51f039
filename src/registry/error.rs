//! The domain's errors. `crate::error` is the one place that maps them to HTTP statuses.

use std::time::Duration;

use crate::registry::Source;

/// Everything that can go wrong between a validated request and a backend's answer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    #[error("invalid extension type '{0}': valid types are provider, taskserv, cluster")]
    InvalidType(String),

    #[error(
        "invalid extension name: use 1 to 128 lowercase ASCII letters, digits, '.', '_' or '-', \
         starting with a letter or digit"
    )]
    InvalidName,

    #[error(
        "invalid version: use 'latest' or 1 to 128 ASCII letters, digits, '.', '_' or '-', \
         starting with a letter, digit or '_'"
    )]
    InvalidVersion,

    #[error("invalid parameter '{name}': {reason}")]
    InvalidParameter { name: &'static str, reason: String },

    /// The thing asked for does not exist; the text names it ("Extension provider/x not found").
    #[error("{0} not found")]
    NotFound(String),

    /// The backend answered, but not usefully: 5xx, malformed body, refused connection.
    #[error("{backend} backend unavailable: {reason}")]
    BackendUnavailable { backend: Source, reason: String },

    /// The backend refused the configured credentials. Never carries the credentials.
    #[error("{backend} backend rejected the configured credentials")]
    BackendAuthFailed { backend: Source },

    #[error("{backend} backend did not answer in time")]
    BackendTimeout { backend: Source },

    /// The backend is not asked for `retry_after`: its circuit breaker is open after repeated
    /// faults, or it answered `429`/`503` with `Retry-After`.
    #[error("{backend} backend unavailable: {reason}")]
    BackendSuspended {
        backend: Source,
        reason: String,
        retry_after: Duration,
    },

    /// A bug or an impossible state; the text is logged, never sent to clients.
    #[error("internal error: {0}")]
    Internal(String),
}

impl RegistryError {
    pub fn not_found(what: impl std::fmt::Display) -> Self {
        Self::NotFound(format!("Extension {what}"))
    }

    pub fn unavailable(backend: Source, reason: impl Into<String>) -> Self {
        Self::BackendUnavailable {
            backend,
            reason: reason.into(),
        }
    }

    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::NotFound(_))
    }

    /// Whether the error says the backend is down or slow (as opposed to a bad request or a
    /// missing extension): stale data may stand in for such answers.
    pub fn is_backend_fault(&self) -> bool {
        matches!(
            self,
            Self::BackendUnavailable { .. }
                | Self::BackendAuthFailed { .. }
                | Self::BackendTimeout { .. }
                | Self::BackendSuspended { .. }
        )
    }

    /// Whether the error says the backend is sick (down, failing or too slow), as opposed to
    /// answering usefully: what a circuit breaker counts. Refused credentials are a
    /// configuration problem, and a suspension is counted by its own `retry_after`.
    pub fn is_backend_sickness(&self) -> bool {
        matches!(
            self,
            Self::BackendUnavailable { .. } | Self::BackendTimeout { .. }
        )
    }

    /// How long the backend asked not to be called, or is not called, for.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::BackendSuspended { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }
}
