//! The domain's errors. `crate::error` is the one place that maps them to HTTP statuses.

use std::time::Duration;

use crate::registry::{Instance, InstanceName, Source};

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

    // The backend faults carry the backend's kind, set where they arise, and the instance's
    // name, set by the stack above each instance (see [`RegistryError::with_instance`]) when
    // it is not the kind's: with two `[[gitea]]` tables the message says which one failed.
    /// The backend answered, but not usefully: 5xx, malformed body, refused connection.
    #[error("{backend} backend{} unavailable: {reason}", named(.instance))]
    BackendUnavailable {
        backend: Source,
        instance: Option<InstanceName>,
        reason: String,
    },

    /// The backend refused the configured credentials. Never carries the credentials.
    #[error("{backend} backend{} rejected the configured credentials", named(.instance))]
    BackendAuthFailed {
        backend: Source,
        instance: Option<InstanceName>,
    },

    #[error("{backend} backend{} did not answer in time", named(.instance))]
    BackendTimeout {
        backend: Source,
        instance: Option<InstanceName>,
    },

    /// The backend is not asked for `retry_after`: its circuit breaker is open after repeated
    /// faults, or it answered `429`/`503` with `Retry-After`.
    #[error("{backend} backend{} unavailable: {reason}", named(.instance))]
    BackendSuspended {
        backend: Source,
        instance: Option<InstanceName>,
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
            instance: None,
            reason: reason.into(),
        }
    }

    pub fn auth_failed(backend: Source) -> Self {
        Self::BackendAuthFailed {
            backend,
            instance: None,
        }
    }

    pub fn timeout(backend: Source) -> Self {
        Self::BackendTimeout {
            backend,
            instance: None,
        }
    }

    pub fn suspended(backend: Source, reason: impl Into<String>, retry_after: Duration) -> Self {
        Self::BackendSuspended {
            backend,
            instance: None,
            reason: reason.into(),
            retry_after,
        }
    }

    /// The error as the instance it came from says it: a backend fault names the instance
    /// when its name is not its kind's (so a single-table configuration's messages stay
    /// "gitea backend unavailable: …"); other errors are returned as they are.
    pub fn with_instance(mut self, from: &Instance) -> Self {
        if let Self::BackendUnavailable { instance, .. }
        | Self::BackendAuthFailed { instance, .. }
        | Self::BackendTimeout { instance, .. }
        | Self::BackendSuspended { instance, .. } = &mut self
        {
            *instance = (from.name.as_str() != from.kind.as_str()).then(|| from.name.clone());
        }
        self
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

/// What follows the kind in a backend fault's message: the instance's name, quoted, if set.
fn named(instance: &Option<InstanceName>) -> String {
    instance
        .as_ref()
        .map(|name| format!(" '{name}'"))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn faults() -> [RegistryError; 4] {
        [
            RegistryError::unavailable(Source::Gitea, "organization repositories: HTTP 500"),
            RegistryError::auth_failed(Source::Gitea),
            RegistryError::timeout(Source::Gitea),
            RegistryError::suspended(Source::Gitea, "circuit open", Duration::from_secs(10)),
        ]
    }

    #[test]
    fn a_single_table_instance_leaves_the_message_as_it_was() {
        let messages = faults().map(|e| e.with_instance(&Source::Gitea.into()).to_string());
        assert_eq!(
            messages,
            [
                "gitea backend unavailable: organization repositories: HTTP 500",
                "gitea backend rejected the configured credentials",
                "gitea backend did not answer in time",
                "gitea backend unavailable: circuit open",
            ]
        );
    }

    #[test]
    fn a_named_instance_is_said_after_its_kind() {
        let forge = Instance {
            kind: Source::Gitea,
            name: "forge-b".into(),
        };
        let faults = faults().map(|e| e.with_instance(&forge));
        let messages = faults.clone().map(|e| e.to_string());
        assert_eq!(
            messages,
            [
                "gitea backend 'forge-b' unavailable: organization repositories: HTTP 500",
                "gitea backend 'forge-b' rejected the configured credentials",
                "gitea backend 'forge-b' did not answer in time",
                "gitea backend 'forge-b' unavailable: circuit open",
            ]
        );
        assert_eq!(faults[3].retry_after(), Some(Duration::from_secs(10)));
        assert!(faults.iter().all(RegistryError::is_backend_fault));
    }

    #[test]
    fn other_errors_are_left_alone() {
        let forge = Instance {
            kind: Source::Gitea,
            name: "forge-b".into(),
        };
        let missing = RegistryError::not_found("provider/aws");
        assert_eq!(missing.clone().with_instance(&forge), missing);
    }
}
