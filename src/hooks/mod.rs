//! Who may announce changes, and what they announce: the secrets of the webhook and purge
//! routes (read at start), checking a request against them in constant time, and reading
//! the forge's and the registry's payloads into the extensions they concern. No I/O but
//! reading the secret files; the routes themselves live in `api::hooks`.
//!
//! Every check runs on the raw body before any of it is parsed.

pub mod gitea;
pub mod oci;

use http::header::AUTHORIZATION;
use http::HeaderMap;
use subtle::ConstantTimeEq;

use crate::config::{Config, ConfigError, Secret};
use crate::registry::ExtensionKey;

/// The secrets and scopes of the routes that change cached state; a route whose secret is
/// not configured does not exist.
#[derive(Clone, Debug, Default)]
pub struct Keys {
    /// `POST /api/v1/hooks/gitea`.
    pub gitea: Option<gitea::Receiver>,
    /// `POST /api/v1/hooks/oci`.
    pub oci: Option<oci::Receiver>,
    /// `POST /api/v1/cache/purge`: the operators' bearer token.
    pub admin: Option<Secret>,
}

impl Keys {
    /// Reads the secret files `config` names (`[gitea] webhook_secret_path`, `[oci]
    /// webhook_token_path`, `[admin] token_path`). One instance of a kind may set its
    /// kind's webhook secret (validated with the configuration).
    pub fn load(config: &Config) -> Result<Self, ConfigError> {
        let gitea = config
            .gitea
            .iter()
            .find_map(|g| Some((g, g.webhook_secret_path.as_ref()?)))
            .map(|(g, path)| {
                Ok::<_, ConfigError>(gitea::Receiver::new(
                    Secret::from_file(path, "[gitea] webhook_secret_path")?,
                    &g.organization,
                ))
            })
            .transpose()?;
        let oci = config
            .oci
            .iter()
            .find_map(|o| Some((o, o.webhook_token_path.as_ref()?)))
            .map(|(o, path)| {
                Ok::<_, ConfigError>(oci::Receiver::new(
                    Secret::from_file(path, "[oci] webhook_token_path")?,
                    o,
                ))
            })
            .transpose()?;
        let admin = config
            .admin
            .token_path
            .as_ref()
            .map(|path| Secret::from_file(path, "[admin] token_path"))
            .transpose()?;
        Ok(Self { gitea, oci, admin })
    }
}

/// Why a request was not accepted; the message never holds a secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Missing or wrong signature or token: `401`.
    Unauthorized(&'static str),
    /// Authentic, but not a payload of the expected shape: `400`.
    InvalidBody(String),
}

/// What an authentic delivery announced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Announcement {
    /// The event, for `hooks_received_total` and the answer: `release`, `push`, ...
    pub event: &'static str,
    /// The extensions it changed; empty when it concerns none (another organization, a
    /// repository off the naming convention, a branch push, a pull).
    pub changed: Vec<ExtensionKey>,
}

/// Whether `headers` carry `Authorization: Bearer <expected>`, compared in constant time
/// (the time taken tells nothing about how much of a guess was right).
pub fn bearer_matches(headers: &HeaderMap, expected: &Secret) -> bool {
    let Some(given) = headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        })
    else {
        return false;
    };
    bool::from(given.as_bytes().ct_eq(expected.expose().as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(value: &str) -> Secret {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, value).unwrap();
        Secret::from_file(&path, "test").unwrap()
    }

    fn with_authorization(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, value.parse().unwrap());
        headers
    }

    #[test]
    fn only_the_exact_bearer_token_matches() {
        let token = secret("s3cret-token");
        assert!(bearer_matches(
            &with_authorization("Bearer s3cret-token"),
            &token
        ));
        assert!(bearer_matches(
            &with_authorization("bearer s3cret-token"),
            &token
        ));
        for wrong in [
            "Bearer s3cret-toke",
            "Bearer s3cret-token2",
            "Bearer ",
            "Basic s3cret-token",
            "s3cret-token",
        ] {
            assert!(
                !bearer_matches(&with_authorization(wrong), &token),
                "{wrong}"
            );
        }
        assert!(!bearer_matches(&HeaderMap::new(), &token));
    }
}
