//! The routes that change cached state: `POST /api/v1/hooks/gitea` (Gitea/Forgejo webhooks),
//! `POST /api/v1/hooks/oci` (CNCF registry notifications) and `POST /api/v1/cache/purge`
//! (an operator's purge). Each refuses what its headers alone can (a missing signature, a
//! wrong token) before reading anything, reads its body whole (capped, with a timeout,
//! within the bodies' budget), checks the signature against the raw bytes before parsing
//! anything, and answers what it dropped. A route whose secret is not configured answers 404
//! like an unknown path. They pass the rate limit like every other route. Replaying a
//! delivery only invalidates again.

use http::header::{HeaderValue, WWW_AUTHENTICATE};
use http::{HeaderMap, Response, StatusCode};
use serde::{Deserialize, Serialize};

use super::handlers::json;
use super::request_body::{self, Object};
use super::Shared;
use crate::body::Body;
use crate::error::ApiError;
use crate::hooks::{self, Announcement, Refusal};
use crate::invalidation::{Dropped, Scope};
use crate::registry::{ExtensionKey, ExtensionName, ExtensionType};
use crate::BoxError;

/// Who sent a delivery: the `source` label of `hooks_received_total`.
#[derive(Clone, Copy)]
pub(super) enum Sender {
    /// `POST /api/v1/hooks/gitea`.
    Gitea,
    /// `POST /api/v1/hooks/oci`.
    Oci,
}

impl Sender {
    fn label(self) -> &'static str {
        match self {
            Self::Gitea => "gitea",
            Self::Oci => "oci",
        }
    }
}

/// The answer to an accepted delivery or purge.
#[derive(Serialize)]
struct Answer {
    /// The event read (`release`, `push`, `delete`, ...; `purge` for a purge).
    event: &'static str,
    /// The extensions invalidated, as `{type}/{name}`; empty when the delivery concerned
    /// none of them.
    invalidated: Vec<String>,
    /// What this replica dropped.
    dropped: Dropped,
}

/// A delivery whose headers were admitted, waiting for its body.
enum Admitted<'k> {
    Gitea(hooks::gitea::Admitted<'k>),
    Oci(hooks::oci::Admitted<'k>),
}

impl Admitted<'_> {
    /// Checks the raw body and reads what the delivery announced.
    fn receive(self, body: &[u8]) -> Result<Announcement, Refusal> {
        match self {
            Self::Gitea(admitted) => admitted.receive(body),
            Self::Oci(admitted) => admitted.receive(body),
        }
    }
}

/// `POST /api/v1/hooks/{gitea,oci}`. What the headers alone can refuse (a missing or
/// malformed signature, a wrong token) is refused before the body is read, so an
/// unauthenticated client holds none of it. Registry notifications invalidate settling, as
/// the registry may notify before its tag list shows the change.
pub(super) async fn deliver<B>(
    shared: &Shared,
    sender: Sender,
    headers: &HeaderMap,
    body: B,
) -> Result<Response<Body>, ApiError>
where
    B: http_body::Body,
    B::Error: Into<BoxError>,
{
    let keys = &shared.hooks;
    let admitted = match sender {
        Sender::Gitea => {
            let receiver = keys.gitea.as_ref().ok_or_else(ApiError::route_not_found)?;
            receiver.admit(headers).map(Admitted::Gitea)
        }
        Sender::Oci => {
            let receiver = keys.oci.as_ref().ok_or_else(ApiError::route_not_found)?;
            receiver.admit(headers).map(Admitted::Oci)
        }
    };
    let admitted = match admitted {
        Ok(admitted) => admitted,
        Err(refusal) => return invalidate(shared, sender, Err(refusal)).await,
    };
    // The body is let go before invalidating, as it is no longer counted in the budget.
    let announced = admitted.receive(&read(shared, sender, body).await?);
    invalidate(shared, sender, announced).await
}

/// Reads a delivery's body, counting a refused one.
async fn read<B>(shared: &Shared, sender: Sender, body: B) -> Result<bytes::Bytes, ApiError>
where
    B: http_body::Body,
    B::Error: Into<BoxError>,
{
    request_body::read(body, &shared.bodies)
        .await
        .inspect_err(|e| {
            count(sender, "unknown", e.code);
        })
}

async fn invalidate(
    shared: &Shared,
    sender: Sender,
    announced: Result<Announcement, Refusal>,
) -> Result<Response<Body>, ApiError> {
    let announcement = announced.map_err(|refusal| {
        let error = refused(refusal);
        count(sender, "unknown", error.code);
        tracing::warn!(
            source = sender.label(),
            error = error.code,
            "webhook delivery refused"
        );
        bearer_challenge(error, matches!(sender, Sender::Oci))
    });
    let announcement = match announcement {
        Ok(a) => a,
        Err(response) => return Ok(response),
    };
    let mut dropped = Dropped::default();
    let mut invalidated = Vec::new();
    for key in &announcement.changed {
        let scope = Scope::Extension(key.clone());
        let now = if matches!(sender, Sender::Oci) {
            shared.invalidator.invalidate_settling(scope).await
        } else {
            shared.invalidator.invalidate(scope).await
        };
        dropped = add(dropped, now);
        invalidated.push(key.to_string());
    }
    let outcome = if invalidated.is_empty() {
        "ignored"
    } else {
        "invalidated"
    };
    count(sender, announcement.event, outcome);
    tracing::info!(
        source = sender.label(),
        event = announcement.event,
        outcome,
        extensions = ?invalidated,
        "webhook delivery accepted"
    );
    Ok(json(
        StatusCode::OK,
        &Answer {
            event: announcement.event,
            invalidated,
            dropped,
        },
    ))
}

/// The body of `POST /api/v1/cache/purge`: `{}`, `{"type"}` or `{"type", "name"}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Purge {
    #[serde(rename = "type", default, deserialize_with = "request_body::present")]
    ty: Option<String>,
    #[serde(default, deserialize_with = "request_body::present")]
    name: Option<String>,
}

/// `POST /api/v1/cache/purge`.
pub(super) async fn purge<B>(
    shared: &Shared,
    headers: &HeaderMap,
    body: B,
) -> Result<Response<Body>, ApiError>
where
    B: http_body::Body,
    B::Error: Into<BoxError>,
{
    let token = shared
        .hooks
        .admin
        .as_ref()
        .ok_or_else(ApiError::route_not_found)?;
    // Before the body is read, so an unauthenticated client holds none of it.
    if !hooks::bearer_matches(headers, token) {
        let error = ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a purge needs Authorization: Bearer with the [admin] token",
        );
        return Ok(bearer_challenge(error, true));
    }
    let scope = purge_scope(&request_body::read(body, &shared.bodies).await?)?;
    let key = match &scope {
        Scope::Extension(key) => vec![key.to_string()],
        _ => Vec::new(),
    };
    tracing::info!(?scope, "purge requested");
    let dropped = shared.invalidator.invalidate(scope).await;
    Ok(json(
        StatusCode::OK,
        &Answer {
            event: "purge",
            invalidated: key,
            dropped,
        },
    ))
}

/// The scope a purge body asks for, validated like the API validates type and name.
fn purge_scope(bytes: &[u8]) -> Result<Scope, ApiError> {
    let shape = "the body is {}, {\"type\": \"...\"} or {\"type\": \"...\", \"name\": \"...\"}";
    let Object(purge) = serde_json::from_slice::<Object<Purge>>(bytes)
        .map_err(|e| request_body::invalid_body(format!("{e}; {shape}")))?;
    Ok(match (purge.ty, purge.name) {
        (None, None) => Scope::All,
        (Some(ty), None) => Scope::Type(ty.parse::<ExtensionType>()?),
        (Some(ty), Some(name)) => Scope::Extension(ExtensionKey {
            ty: ty.parse()?,
            name: ExtensionName::parse(&name)?,
        }),
        (None, Some(_)) => {
            return Err(request_body::invalid_body(format!(
                "a name needs its type; {shape}"
            )))
        }
    })
}

/// The API error for a refused delivery.
fn refused(refusal: Refusal) -> ApiError {
    match refusal {
        Refusal::Unauthorized(message) => {
            ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
        }
        Refusal::InvalidBody(message) => request_body::invalid_body(message),
    }
}

/// The error as a response; a 401 on a bearer route names the scheme (`WWW-Authenticate`).
fn bearer_challenge(error: ApiError, bearer: bool) -> Response<Body> {
    let challenge = bearer && error.status == StatusCode::UNAUTHORIZED;
    let mut response = error.into_response();
    if challenge {
        response.headers_mut().insert(
            WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"extension-registry\""),
        );
    }
    response
}

fn add(a: Dropped, b: Dropped) -> Dropped {
    Dropped {
        listings: a.listings + b.listings,
        metadata: a.metadata + b.metadata,
        versions: a.versions + b.versions,
    }
}

/// `hooks_received_total{source, event, outcome}`: outcome `invalidated`, `ignored`, or the
/// error code of a refusal.
fn count(sender: Sender, event: &'static str, outcome: &'static str) {
    metrics::counter!(
        "hooks_received_total",
        "source" => sender.label(),
        "event" => event,
        "outcome" => outcome
    )
    .increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn purge_bodies_name_their_scope_or_are_refused() {
        assert_eq!(purge_scope(b"{}"), Ok(Scope::All));
        assert_eq!(
            purge_scope(br#"{"type": "taskserv"}"#),
            Ok(Scope::Type(ExtensionType::Taskserv))
        );
        let aws = purge_scope(br#"{"type": "provider", "name": "aws"}"#).unwrap();
        assert_eq!(aws.label(), "extension");
        for body in [
            &br#"{"name": "aws"}"#[..],
            br#"{"type": "nope"}"#,
            br#"{"type": "provider", "name": "../x"}"#,
            br#"{"type": "provider", "extra": 1}"#,
            // A null is not a field left out: `{"type": null}` from an unset variable must not
            // purge everything.
            br#"{"type": null}"#,
            br#"{"type": null, "name": null}"#,
            br#"{"type": "provider", "name": null}"#,
            b"[]",
            b"",
        ] {
            let e = purge_scope(body).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{body:?}");
        }
    }
}
