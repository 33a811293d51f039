//! Gitea and Forgejo webhook deliveries: the signature, the event and the repository.
//!
//! Gitea (`services/webhook/deliver.go`) signs the raw body with HMAC-SHA256 under the
//! webhook's secret and sends the hex digest as `X-Gitea-Signature`, and again as
//! `X-Hub-Signature-256: sha256=<hex>`; Forgejo adds `X-Forgejo-Signature`. The event is in
//! `X-Gitea-Event` (Forgejo: `X-Forgejo-Event` too). Payload shapes follow
//! `modules/structs/hook.go`: `release` and `repository` events carry `action` and
//! `repository`, `push` carries `ref` and `repository`; the repository's `owner.login` is
//! the organization. Example deliveries are kept under `tests/fixtures/hooks/`.

use hmac::{Hmac, Mac};
use http::HeaderMap;
use serde::Deserialize;
use sha2::Sha256;

use super::{Announcement, Refusal};
use crate::api::request_body::{object, Object};
use crate::backend::forge::extension_of;
use crate::config::Secret;

/// The signature headers, each a hex HMAC-SHA256 of the body, with the prefix its value
/// carries.
const SIGNATURE_HEADERS: [(&str, &str); 3] = [
    ("x-forgejo-signature", ""),
    ("x-gitea-signature", ""),
    ("x-hub-signature-256", "sha256="),
];

/// Bytes of an HMAC-SHA256.
const SIGNATURE_BYTES: usize = 32;

const MISMATCH: Refusal = Refusal::Unauthorized("the delivery's signature does not match");

/// The event headers, Forgejo's first.
const EVENT_HEADERS: [&str; 2] = ["x-forgejo-event", "x-gitea-event"];

/// Accepts the deliveries of one organization's webhook.
#[derive(Clone, Debug)]
pub struct Receiver {
    secret: Secret,
    /// `[gitea] organization`: events of other owners are ignored.
    organization: String,
}

impl Receiver {
    pub fn new(secret: Secret, organization: &str) -> Self {
        Self {
            secret,
            organization: organization.to_owned(),
        }
    }

    /// What the headers alone tell, checked before the body is read: a signature of the
    /// right form (`401` without one). A missing event is told only once the body is found
    /// authentic, so an unauthentic delivery learns nothing but `401`.
    pub fn admit(&self, headers: &HeaderMap) -> Result<Admitted<'_>, Refusal> {
        let (value, prefix) = SIGNATURE_HEADERS
            .iter()
            .find_map(|(name, prefix)| Some((headers.get(*name)?, *prefix)))
            .ok_or(Refusal::Unauthorized(
                "the delivery is not signed: X-Gitea-Signature, X-Forgejo-Signature or \
                 X-Hub-Signature-256 is required",
            ))?;
        let signature = value
            .to_str()
            .ok()
            .and_then(|v| v.trim().strip_prefix(prefix))
            .and_then(decode_hex)
            .filter(|digest| digest.len() == SIGNATURE_BYTES)
            .ok_or(MISMATCH)?;
        Ok(Admitted {
            receiver: self,
            signature,
            event: event(headers),
        })
    }

    /// The extensions an authentic delivery of `event` concerns.
    fn read(&self, event: Event, body: &[u8]) -> Result<Announcement, Refusal> {
        let Object(payload) = serde_json::from_slice::<Object<Payload>>(body).map_err(|e| {
            Refusal::InvalidBody(format!(
                "not a Gitea {} payload ({e}); expected a JSON object with \"repository\": \
                 {{\"name\", \"owner\": {{\"login\"}}}}",
                event.name()
            ))
        })?;
        let ours = payload
            .repository
            .owner
            .login
            .eq_ignore_ascii_case(&self.organization);
        let relevant = match event {
            Event::Release | Event::Repository => true,
            // Only tags can be versions; branch pushes change no release.
            Event::Push => payload.git_ref.as_deref().is_some_and(is_tag_ref),
            Event::Other => false,
        };
        let changed = (ours && relevant)
            .then(|| extension_of(&payload.repository.name))
            .flatten();
        Ok(Announcement {
            event: event.name(),
            changed: changed.into_iter().collect(),
        })
    }
}

/// A delivery whose headers were admitted, waiting for its body.
pub struct Admitted<'r> {
    receiver: &'r Receiver,
    /// The HMAC-SHA256 the delivery claims for its body.
    signature: Vec<u8>,
    event: Result<Event, Refusal>,
}

impl Admitted<'_> {
    /// Checks the signature against `body` in constant time (`Mac::verify_slice`), then
    /// reads what the delivery announces.
    pub fn receive(self, body: &[u8]) -> Result<Announcement, Refusal> {
        let mut mac = Hmac::<Sha256>::new_from_slice(self.receiver.secret.expose().as_bytes())
            .expect("HMAC takes a key of any length");
        mac.update(body);
        mac.verify_slice(&self.signature).map_err(|_| MISMATCH)?;
        self.receiver.read(self.event?, body)
    }
}

/// The events that can change an extension; the rest are acknowledged and ignored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Event {
    /// A release published, updated or deleted.
    Release,
    /// A repository created or deleted (Gitea and Forgejo send no event for a rename).
    Repository,
    /// Commits or tags pushed.
    Push,
    Other,
}

impl Event {
    fn name(self) -> &'static str {
        match self {
            Self::Release => "release",
            Self::Repository => "repository",
            Self::Push => "push",
            Self::Other => "other",
        }
    }
}

/// The delivery's event; `400` without an event header.
fn event(headers: &HeaderMap) -> Result<Event, Refusal> {
    let name = EVENT_HEADERS
        .iter()
        .find_map(|h| headers.get(*h)?.to_str().ok())
        .ok_or_else(|| {
            Refusal::InvalidBody("the delivery names no event (X-Gitea-Event)".into())
        })?;
    Ok(match name.trim() {
        "release" => Event::Release,
        "repository" => Event::Repository,
        "push" => Event::Push,
        _ => Event::Other,
    })
}

fn is_tag_ref(git_ref: &str) -> bool {
    git_ref.starts_with("refs/tags/")
}

/// The part of every payload read here; each part is a JSON object (see [`Object`]).
#[derive(Deserialize)]
struct Payload {
    #[serde(deserialize_with = "object")]
    repository: Repository,
    /// `push` only: `refs/heads/…` or `refs/tags/…`.
    #[serde(rename = "ref", default)]
    git_ref: Option<String>,
}

#[derive(Deserialize)]
struct Repository {
    name: String,
    #[serde(deserialize_with = "object")]
    owner: Owner,
}

#[derive(Deserialize)]
struct Owner {
    login: String,
}

/// The bytes `text` spells in hex digits, two a byte; `None` for anything else (`from_str_radix`
/// alone would take a sign: `+f` for `0f`).
fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;
    use crate::registry::{ExtensionKey, ExtensionName, ExtensionType};

    const SECRET: &str = "webhook-s3cret";

    fn receiver() -> Receiver {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, SECRET).unwrap();
        Receiver::new(Secret::from_file(&path, "test").unwrap(), "extensions")
    }

    /// A delivery of `headers` and `body`, admitted then received.
    fn receive(headers: &HeaderMap, body: &[u8]) -> Result<Announcement, Refusal> {
        receiver().admit(headers)?.receive(body)
    }

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!("{}/tests/fixtures/hooks/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    fn sign(body: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
        mac.update(body);
        mac.finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    http::HeaderName::from_static(k),
                    HeaderValue::from_str(v).unwrap(),
                )
            })
            .collect()
    }

    fn aws() -> ExtensionKey {
        ExtensionKey {
            ty: ExtensionType::Provider,
            name: ExtensionName::parse("aws").unwrap(),
        }
    }

    #[test]
    fn each_signature_header_form_is_accepted() {
        let body = fixture("gitea-release-published.json");
        let sig = sign(&body);
        for (name, value) in [
            ("x-gitea-signature", sig.clone()),
            ("x-forgejo-signature", sig.clone()),
            ("x-hub-signature-256", format!("sha256={sig}")),
        ] {
            let got = receive(
                &headers(&[(name, &value), ("x-gitea-event", "release")]),
                &body,
            );
            assert_eq!(
                got,
                Ok(Announcement {
                    event: "release",
                    changed: vec![aws()],
                }),
                "{name}"
            );
        }
    }

    #[test]
    fn only_hex_digits_spell_a_signature() {
        assert_eq!(decode_hex("0fA0"), Some(vec![0x0f, 0xa0]));
        for text in ["+f", "-0", "0", "0g", " f"] {
            assert_eq!(decode_hex(text), None, "{text:?}");
        }
    }

    #[test]
    fn a_missing_or_wrong_signature_is_refused_before_the_body_is_read() {
        let body = b"not even JSON";
        let sig = sign(body);
        let mut flipped = sig.clone().into_bytes();
        flipped[0] = if flipped[0] == b'0' { b'1' } else { b'0' };
        let flipped = String::from_utf8(flipped).unwrap();
        for pairs in [
            vec![("x-gitea-event", "release")],
            vec![("x-gitea-signature", flipped.as_str())],
            vec![("x-gitea-signature", "zz")],
            vec![("x-gitea-signature", &sig[..10])],
            vec![("x-hub-signature-256", sig.as_str())],
        ] {
            let got = receive(&headers(&pairs), body);
            assert!(
                matches!(got, Err(Refusal::Unauthorized(_))),
                "{pairs:?}: {got:?}"
            );
        }
        // Signed, so now the body counts.
        let got = receive(
            &headers(&[("x-gitea-signature", &sig), ("x-gitea-event", "release")]),
            body,
        );
        assert!(matches!(got, Err(Refusal::InvalidBody(_))), "{got:?}");
    }

    #[test]
    fn events_map_to_extensions_by_the_naming_convention() {
        let cases: [(&str, &str, Vec<ExtensionKey>); 6] = [
            ("gitea-release-published.json", "release", vec![aws()]),
            ("forgejo-release-deleted.json", "release", vec![aws()]),
            ("gitea-repository-created.json", "repository", vec![aws()]),
            ("gitea-push-tag.json", "push", vec![aws()]),
            ("gitea-push-branch.json", "push", vec![]),
            ("gitea-release-other-org.json", "release", vec![]),
        ];
        for (file, event, changed) in cases {
            let body = fixture(file);
            let got = receive(
                &headers(&[
                    ("x-gitea-signature", &sign(&body)),
                    ("x-gitea-event", event),
                ]),
                &body,
            );
            assert_eq!(got, Ok(Announcement { event, changed }), "{file}");
        }
    }

    #[test]
    fn repositories_off_the_convention_and_other_events_change_nothing() {
        let body = br#"{"repository": {"name": "website", "owner": {"login": "extensions"}}}"#;
        for event in ["release", "issues"] {
            let got = receive(
                &headers(&[("x-gitea-signature", &sign(body)), ("x-gitea-event", event)]),
                body,
            );
            assert_eq!(got.unwrap().changed, vec![], "{event}");
        }
    }

    #[test]
    fn wrong_shapes_are_invalid_bodies() {
        for body in [
            &b"[1, 2]"[..],
            b"{\"repository\": 7}",
            b"{}",
            b"\xff",
            // serde's derive alone reads these arrays as the payload and its parts.
            br#"[["aws_prov", ["extensions"]], "refs/tags/1.0"]"#,
            br#"{"repository": ["aws_prov", ["extensions"]]}"#,
            br#"{"repository": {"name": "aws_prov", "owner": ["extensions"]}}"#,
        ] {
            let got = receive(
                &headers(&[
                    ("x-gitea-signature", &sign(body)),
                    ("x-gitea-event", "release"),
                ]),
                body,
            );
            assert!(matches!(got, Err(Refusal::InvalidBody(_))), "{got:?}");
        }
        let body = fixture("gitea-release-published.json");
        let got = receive(&headers(&[("x-gitea-signature", &sign(&body))]), &body);
        assert!(
            matches!(got, Err(Refusal::InvalidBody(_))),
            "no event: {got:?}"
        );
    }
}
