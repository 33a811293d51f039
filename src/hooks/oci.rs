//! The CNCF distribution registry's notifications: an envelope
//! (`application/vnd.docker.distribution.events.v1+json`) of `events[]`, each with an
//! `action` (`push`, `pull`, `delete`, `mount`) and a `target` naming the `repository` and the
//! `tag` or `digest` (distribution's `notifications/event.go`). The registry sends the headers
//! its endpoint configuration lists, so it authenticates with a bearer token. Example
//! envelopes are kept under `tests/fixtures/hooks/`.

use std::collections::HashSet;

use http::HeaderMap;
use serde::Deserialize;

use super::{bearer_matches, Announcement, Refusal};
use crate::api::request_body::{objects, Object};
use crate::backend::oci::{extension_of, namespace_of};
use crate::config::{OciConfig, Secret};
use crate::registry::ExtensionKey;

/// Accepts the notifications of the registry the OCI backend reads.
#[derive(Clone, Debug)]
pub struct Receiver {
    token: Secret,
    /// The backend's namespace: repositories elsewhere are ignored.
    namespace: String,
}

impl Receiver {
    pub fn new(token: Secret, config: &OciConfig) -> Self {
        Self {
            token,
            namespace: namespace_of(config),
        }
    }

    /// Checks the bearer token, before the body is read (`401`).
    pub fn admit(&self, headers: &HeaderMap) -> Result<Admitted<'_>, Refusal> {
        if !bearer_matches(headers, &self.token) {
            return Err(Refusal::Unauthorized(
                "a notification needs Authorization: Bearer with the configured token",
            ));
        }
        Ok(Admitted { receiver: self })
    }
}

/// A notification whose token was admitted, waiting for its body.
pub struct Admitted<'r> {
    receiver: &'r Receiver,
}

impl Admitted<'_> {
    /// Reads which extensions the envelope's pushes and deletes concern (each once). Pulls
    /// change nothing and are skipped. The event reported is the first push or delete, else
    /// the first notice's action.
    pub fn receive(self, body: &[u8]) -> Result<Announcement, Refusal> {
        let Object(envelope) = serde_json::from_slice::<Object<Envelope>>(body).map_err(|e| {
            Refusal::InvalidBody(format!(
                "not a registry notification envelope ({e}); expected {{\"events\": \
                 [{{\"action\", \"target\": {{\"repository\", \"tag\"?, \"digest\"?}}}}]}}"
            ))
        })?;
        let mut changed: Vec<ExtensionKey> = Vec::new();
        // A set beside the list, which keeps the order: an envelope may name thousands.
        let mut seen = HashSet::new();
        let mut event = envelope.events.first().map_or("none", |n| n.action.name());
        let mut seen_change = false;
        for notice in envelope.events {
            let Some(Object(target)) = notice.target.filter(|_| notice.action.changes()) else {
                continue;
            };
            if !seen_change {
                event = notice.action.name();
                seen_change = true;
            }
            if let Some(key) = extension_of(&self.receiver.namespace, &target.repository) {
                if seen.insert(key.clone()) {
                    changed.push(key);
                }
            }
        }
        Ok(Announcement { event, changed })
    }
}

/// The envelope; each part a JSON object (see [`Object`]).
#[derive(Deserialize)]
struct Envelope {
    #[serde(deserialize_with = "objects")]
    events: Vec<Notice>,
}

#[derive(Deserialize)]
struct Notice {
    action: Action,
    /// Used only for pushes and deletes.
    target: Option<Object<Target>>,
}

#[derive(Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Action {
    Push,
    Delete,
    Pull,
    Mount,
    #[serde(other)]
    Other,
}

impl Action {
    /// Whether the action can add or remove a tag.
    fn changes(self) -> bool {
        matches!(self, Self::Push | Self::Delete)
    }

    fn name(self) -> &'static str {
        match self {
            Self::Push => "push",
            Self::Delete => "delete",
            Self::Pull => "pull",
            Self::Mount => "mount",
            Self::Other => "other",
        }
    }
}

/// What a notice is about; `tag` and `digest` are carried for the log, the repository
/// decides.
#[derive(Deserialize)]
struct Target {
    repository: String,
}

#[cfg(test)]
mod tests {
    use http::header::AUTHORIZATION;

    use super::*;
    use crate::registry::{ExtensionName, ExtensionType};

    fn receiver() -> Receiver {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "notify-token").unwrap();
        let config: crate::config::Config = toml::from_str(
            "[oci]\nregistry = \"127.0.0.1:5000\"\nnamespace = \"/provisioning/\"\n",
        )
        .unwrap();
        Receiver::new(Secret::from_file(&path, "test").unwrap(), &config.oci[0])
    }

    /// A notification of `headers` and `body`, admitted then received.
    fn receive(headers: &HeaderMap, body: &[u8]) -> Result<Announcement, Refusal> {
        receiver().admit(headers)?.receive(body)
    }

    fn authorized() -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, "Bearer notify-token".parse().unwrap());
        headers
    }

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!("{}/tests/fixtures/hooks/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    fn key(ty: ExtensionType, name: &str) -> ExtensionKey {
        ExtensionKey {
            ty,
            name: ExtensionName::parse(name).unwrap(),
        }
    }

    #[test]
    fn pushes_and_deletes_under_the_namespace_name_their_extension_once() {
        let got = receive(&authorized(), &fixture("oci-push.json")).unwrap();
        assert_eq!(got.event, "push");
        assert_eq!(got.changed, vec![key(ExtensionType::Provider, "aws")]);
        let got = receive(&authorized(), &fixture("oci-delete.json")).unwrap();
        assert_eq!(got.event, "delete");
        assert_eq!(
            got.changed,
            vec![key(ExtensionType::Taskserv, "kubernetes")]
        );
    }

    #[test]
    fn pulls_and_other_repositories_change_nothing() {
        let pulls = br#"{"events": [
            {"action": "pull", "target": {"repository": "provisioning/aws-provider"}}
        ]}"#;
        let got = receive(&authorized(), pulls).unwrap();
        assert_eq!(got.changed, vec![]);
        let elsewhere = br#"{"events": [
            {"action": "push", "target": {"repository": "other/aws-provider", "tag": "1.0.0"}},
            {"action": "push", "target": {"repository": "provisioning/website", "tag": "1"}},
            {"action": "push", "target": {"repository": "provisioning/a/b-provider"}}
        ]}"#;
        let got = receive(&authorized(), elsewhere).unwrap();
        assert_eq!(got.changed, vec![]);
    }

    #[test]
    fn only_objects_are_read_as_the_envelope_and_its_parts() {
        for body in [
            &br#"{"events": [["push", ["provisioning/aws-provider"]]]}"#[..],
            br#"[[{"action": "push", "target": {"repository": "provisioning/aws-provider"}}]]"#,
            br#"{"events": [{"action": "push", "target": ["provisioning/aws-provider"]}]}"#,
        ] {
            let got = receive(&authorized(), body);
            assert!(matches!(got, Err(Refusal::InvalidBody(_))), "{got:?}");
        }
    }

    #[test]
    fn the_token_is_checked_before_the_body() {
        let mut wrong = HeaderMap::new();
        wrong.insert(AUTHORIZATION, "Bearer notify-tokeN".parse().unwrap());
        for headers in [HeaderMap::new(), wrong] {
            let got = receive(&headers, b"not JSON");
            assert!(matches!(got, Err(Refusal::Unauthorized(_))), "{got:?}");
        }
        for body in [
            &b"not JSON"[..],
            b"{}",
            b"{\"events\": [{\"action\": \"push\"}]}",
        ] {
            let got = receive(&authorized(), body);
            let invalid = matches!(got, Err(Refusal::InvalidBody(_)));
            // A push without a target names nothing: acknowledged, nothing changed.
            let nothing = got.as_ref().is_ok_and(|a| a.changed.is_empty());
            assert!(invalid || nothing, "{got:?}");
        }
    }
}
