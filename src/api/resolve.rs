//! Version-constraint resolution: `GET /api/v1/resolve/{type}/{name}?constraint=` answers the
//! highest version satisfying a constraint, `POST /api/v1/resolve` a whole plan of
//! requirements in one round trip, and `?constraint=` on the versions route filters the list
//! by the same rules ([`crate::registry::constraint`]). Every answer comes from the cached
//! versions of each extension, each read as semver at most once per request, when a scan
//! reaches it.

use std::collections::HashMap;
use std::sync::Arc;

use futures_util::stream::{self, StreamExt};
use http::{Response, StatusCode};
use serde::{Deserialize, Serialize};

use super::handlers::{json, rendered, Call, MemoKey};
use super::query::Query;
use super::representation::Keep;
use super::request_body::{self, Object};
use super::Shared;
use crate::body::Body;
use crate::error::ApiError;
use crate::middleware::rate_limit::QuotaCharge;
use crate::registry::constraint::Constraint;
use crate::registry::version::{parse_lazily, ParsedVersion};
use crate::registry::{
    BackendRequest, ExtensionKey, ExtensionName, ExtensionType, SourceSelector, Version,
};
use crate::BoxError;

/// Most requirements one batch may hold.
pub const MAX_REQUIREMENTS: usize = 200;
/// Most comparisons one batch may make: the sum over its requirements of the versions of the
/// extension × the comparisons its constraint makes of each
/// ([`Constraint::comparisons`]), counted as if every version were checked. 200
/// requirements of `^1.2` on an extension of 8,000 versions make 3,200,000.
pub const MAX_COMPARISONS: usize = 4_000_000;
/// Extensions of one batch whose versions are asked for at once.
pub const BATCH_CONCURRENCY: usize = 8;
/// How many available versions a `no_matching_version` message lists.
const NEAREST: usize = 5;

/// The `constraint` and `prerelease` parameters, parsed.
pub struct Filter {
    constraint: Constraint,
    /// As the client wrote it (trimmed), for messages and memo keys.
    text: String,
    prerelease: bool,
}

impl Filter {
    fn new(text: &str, prerelease: bool) -> Result<Self, ApiError> {
        let constraint = Constraint::parse(text).map_err(|e| {
            ApiError::new(StatusCode::BAD_REQUEST, "invalid_constraint", e.to_string())
        })?;
        Ok(Self {
            constraint,
            text: text.trim().to_owned(),
            prerelease,
        })
    }

    /// The filter a query asks for, if it has a `constraint`.
    pub fn from_query(query: &Query<'_>) -> Result<Option<Self>, ApiError> {
        let prerelease = match query.get("prerelease") {
            None | Some("false") => false,
            Some("true") => true,
            Some(_) => {
                return Err(ApiError::invalid_parameter(
                    "prerelease",
                    "must be true or false",
                ))
            }
        };
        query
            .get("constraint")
            .map(|text| Self::new(text, prerelease))
            .transpose()
    }

    /// Names the filter in a memo key, as its last parts.
    pub(super) fn memo_key(&self, key: MemoKey) -> MemoKey {
        key.part(if self.prerelease { "true" } else { "false" })
            .part(&self.text)
    }

    /// The versions that pass, in the order given.
    pub fn select<'v>(&self, versions: &'v [Version]) -> Vec<&'v Version> {
        self.constraint.select(versions, self.prerelease)
    }

    /// The highest version that passes, or the `no_matching_version` error naming the
    /// versions nearest to what was asked.
    fn pick(&self, key: &ExtensionKey, versions: &[ParsedVersion]) -> Result<Resolved, ApiError> {
        let pick = self.constraint.pick(versions, self.prerelease);
        if let Some(best) = pick.best {
            return Ok(Resolved {
                ty: key.ty,
                name: key.name.as_str().to_owned(),
                version: best.clone(),
            });
        }
        let mut message = format!("no version of {key} satisfies '{}'", self.text);
        if let Some(pre) = pick.prerelease_would {
            message.push_str(&format!(
                " (prerelease {} would, with prerelease=true)",
                pre.version
            ));
        }
        let nearest = self.constraint.nearest(versions, NEAREST);
        if nearest.is_empty() {
            message.push_str("; it has no versions");
        } else {
            message.push_str(&format!("; nearest available: {}", nearest.join(", ")));
        }
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "no_matching_version",
            message,
        ))
    }
}

/// A resolved requirement: the extension's identity and the version object.
#[derive(Clone, Debug, Serialize)]
pub struct Resolved {
    #[serde(rename = "type")]
    ty: ExtensionType,
    name: String,
    #[serde(flatten)]
    version: Version,
}

impl Call<'_> {
    /// `GET /api/v1/resolve/{type}/{name}?constraint=…[&source=…][&prerelease=true]`.
    pub(super) async fn resolve(&self, query: &Query<'_>) -> Result<Response<Body>, ApiError> {
        let key = self.key()?;
        let source = self.source(query)?;
        let filter = match Filter::from_query(query)? {
            Some(filter) => filter,
            // Required here: refused as an empty one, with the same explanation.
            None => Filter::new("", false)?,
        };
        let memo = filter.memo_key(MemoKey::new("resolve").extension(&key).source(&source));
        let (response, stale) = self
            .ask(BackendRequest::Versions {
                key: key.clone(),
                source,
            })
            .await?;
        let versions = response.into_versions()?;
        let resolved = filter.pick(&key, &parse_lazily(&versions))?;
        let response = self.represent(memo, Keep::Always, &versions, |_| rendered(&resolved));
        Ok(self.cacheable(response, stale))
    }
}

/// The body of `POST /api/v1/resolve`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Plan {
    #[serde(deserialize_with = "request_body::objects")]
    requirements: Vec<Requirement>,
    #[serde(default)]
    prerelease: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Requirement {
    #[serde(rename = "type")]
    ty: String,
    name: String,
    constraint: String,
    #[serde(default)]
    source: Option<String>,
}

/// One requirement that could not be resolved, named as the client wrote it.
#[derive(Serialize)]
struct Failure {
    #[serde(rename = "type")]
    ty: String,
    name: String,
    error: &'static str,
    message: String,
}

#[derive(Serialize)]
struct Answer {
    resolved: Vec<Resolved>,
    errors: Vec<Failure>,
}

fn invalid_body(reason: impl std::fmt::Display) -> ApiError {
    request_body::invalid_body(format!(
        "{reason}; the body is {{\"requirements\": [{{\"type\", \"name\", \"constraint\", \
             \"source\"?}}], \"prerelease\"?: bool}} with 1 to {MAX_REQUIREMENTS} requirements"
    ))
}

/// `POST /api/v1/resolve`: resolves every requirement and answers 200 with the results and
/// the failures, each in request order. The versions of each extension (and source) it names
/// are asked for once, at most [`BATCH_CONCURRENCY`] at once, and read as semver at most
/// once for the whole batch; a
/// batch that would make more than [`MAX_COMPARISONS`] is refused before any is made. A
/// batch of n requirements costs n requests of the client's quota (see `QuotaCharge`).
pub(super) async fn batch<B>(
    shared: &Shared,
    body: B,
    quota: Option<QuotaCharge>,
) -> Result<Response<Body>, ApiError>
where
    B: http_body::Body,
    B::Error: Into<BoxError>,
{
    // The body is let go once parsed: resolving may take a while, and its bytes are no longer
    // counted in the bodies' budget then.
    let Object(plan) = {
        let bytes = request_body::read(body, &shared.bodies).await?;
        serde_json::from_slice::<Object<Plan>>(&bytes).map_err(invalid_body)?
    };
    let n = plan.requirements.len();
    if n == 0 {
        return Err(invalid_body("requirements is empty"));
    }
    if n > MAX_REQUIREMENTS {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "too_many_requirements",
            format!("{n} requirements; a batch holds at most {MAX_REQUIREMENTS}"),
        ));
    }
    if let Some(quota) = quota {
        // The rate-limit layer took one request already.
        quota.charge(u32::try_from(n - 1).unwrap_or(u32::MAX))?;
    }
    let mut asks: HashMap<Ask, usize> = HashMap::new();
    let checked: Vec<_> = plan
        .requirements
        .iter()
        .map(|requirement| {
            let (ask, filter) = check(shared, requirement, plan.prerelease)?;
            let next = asks.len();
            let list = *asks.entry(ask.clone()).or_insert(next);
            Ok::<_, ApiError>((ask.0, filter, list))
        })
        .collect();
    let mut asks: Vec<(Ask, usize)> = asks.into_iter().collect();
    asks.sort_unstable_by_key(|(_, list)| *list);
    let lists: Vec<Result<Arc<Vec<Version>>, ApiError>> = stream::iter(asks)
        .map(|((key, source), _)| async move {
            let response = shared
                .registry
                .ask(BackendRequest::Versions { key, source })
                .await?;
            Ok(response.into_versions()?)
        })
        .buffered(BATCH_CONCURRENCY)
        .collect()
        .await;
    let comparisons = checked
        .iter()
        .filter_map(|c| {
            let (_, filter, list) = c.as_ref().ok()?;
            let versions = lists[*list].as_ref().ok()?;
            Some(
                filter
                    .constraint
                    .comparisons()
                    .saturating_mul(versions.len()),
            )
        })
        .fold(0, usize::saturating_add);
    if comparisons > MAX_COMPARISONS {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "too_many_comparisons",
            format!(
                "this batch would make up to {comparisons} comparisons (for each requirement, \
                 the versions of its extension × the comparators of its constraint); a batch \
                 makes at most {MAX_COMPARISONS}: split it, or write fewer alternatives"
            ),
        ));
    }
    let mut parsed: Vec<Option<Vec<ParsedVersion>>> = vec![None; lists.len()];
    let mut answer = Answer {
        resolved: Vec::new(),
        errors: Vec::new(),
    };
    for (requirement, checked) in plan.requirements.into_iter().zip(checked) {
        let outcome = checked.and_then(|(key, filter, list)| {
            let versions = lists[list].as_ref().map_err(ApiError::clone)?;
            let parsed = parsed[list].get_or_insert_with(|| parse_lazily(versions));
            filter.pick(&key, parsed)
        });
        match outcome {
            Ok(resolved) => answer.resolved.push(resolved),
            Err(e) => answer.errors.push(Failure {
                ty: requirement.ty,
                name: requirement.name,
                error: e.code,
                message: e.message,
            }),
        }
        // Between requirements the worker is let go, so that a batch holds it for one
        // requirement's work at a time (one extension's versions read, one scan) and
        // other requests, probes included, are not kept waiting for the whole batch.
        tokio::task::yield_now().await;
    }
    Ok(json(StatusCode::OK, &answer))
}

/// The versions a requirement needs: its extension and source.
type Ask = (ExtensionKey, Option<SourceSelector>);

/// One requirement of a batch, validated like the single route's request.
fn check(
    shared: &Shared,
    requirement: &Requirement,
    prerelease: bool,
) -> Result<(Ask, Filter), ApiError> {
    let key = ExtensionKey {
        ty: requirement.ty.parse()?,
        name: ExtensionName::parse(&requirement.name)?,
    };
    let source = requirement
        .source
        .as_deref()
        .map(|text| shared.sources.selector(text))
        .transpose()?;
    let filter = Filter::new(&requirement.constraint, prerelease)?;
    Ok(((key, source), filter))
}
