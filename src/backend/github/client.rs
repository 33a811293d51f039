//! HTTP towards the GitHub REST API (github.com or Enterprise Server): the contract's headers
//! on every call, the token only on hops under the configured API URL (never on an asset's
//! redirect to storage), pagination by the `Link` header's `rel="next"` followed verbatim,
//! conditional requests answered from a memo of validators and parsed pages, and rate limits
//! read from every answer so that an exhausted limit stops the calls until it resets.

use std::any::Any;
use std::collections::HashSet;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use reqwest::header::{
    HeaderMap, HeaderName, HeaderValue, ACCEPT, ETAG, IF_MODIFIED_SINCE, IF_NONE_MATCH,
    LAST_MODIFIED, LINK, RETRY_AFTER,
};
use reqwest::{Method, Response, StatusCode, Url};
use serde::de::DeserializeOwned;
use tokio::time::Instant;

use super::model::AssetRef;
use crate::backend::http::{
    is_html, next_link, parse_retry_after, read_capped, send_per_hop, transport_error,
    MAX_METADATA_BYTES, MAX_RETRY_AFTER,
};
use crate::registry::{RegistryError, Source};

/// Gauge of the requests GitHub says are left in the current rate-limit window.
pub const BACKEND_RATE_LIMIT_REMAINING: &str = "backend_rate_limit_remaining";

/// Counter of conditional requests by outcome: `not_modified` (a `304`, answered from the memo,
/// free of rate limit on GitHub) or `changed` (a full answer).
pub const BACKEND_REVALIDATIONS_TOTAL: &str = "backend_revalidations_total";

/// Items per page: GitHub's maximum (larger values are cut to it silently).
const PER_PAGE: &str = "100";

/// The API version the backend is written against.
const API_VERSION: &str = "2022-11-28";

/// Bytes of answers held for revalidation (validators, next link and the parsed page, each
/// weighed by the size of the JSON it was parsed from, which is larger than what is kept).
/// A page of 100 repositories is about 600 KB of JSON and a release list a few KB, so this
/// holds an organization of some hundred pages of repositories or several thousand release
/// lists; past it the least used pages are fetched whole again.
pub const MEMO_BYTES: u64 = 64 * 1024 * 1024;

/// Largest checksum file read (see the Gitea backend's bound: one line per file).
const MAX_SIDECAR_BYTES: usize = 64 * 1024;

/// Most pages one list may have; a `Link` chain longer than this (10,000 repositories or
/// releases at 100 a page) is refused rather than followed forever.
const MAX_PAGES: usize = 100;

/// Most bytes of JSON one list reads over all its pages (each is also at most
/// [`MAX_METADATA_BYTES`]): what a list holds at once however large the pages GitHub offers.
/// A page of 100 repositories is about 600 KB, so [`MAX_PAGES`] of them fit (about 60 MB):
/// the page count ends a long list of usual pages, this one a list of unusually large ones.
const MAX_LIST_BYTES: usize = 64 * 1024 * 1024;

/// How long to wait after a secondary rate limit that names no time: GitHub asks for at least
/// a minute.
const SECONDARY_WAIT: Duration = Duration::from_secs(60);

fn unavailable(reason: impl Into<String>) -> RegistryError {
    RegistryError::unavailable(Source::Github, reason)
}

/// One remembered answer: what to revalidate it with, and what it said.
struct Held {
    /// `ETag` of the answer, sent back as `If-None-Match`.
    etag: Option<HeaderValue>,
    /// `Last-Modified` of the answer, sent back as `If-Modified-Since` when there is no ETag.
    last_modified: Option<HeaderValue>,
    /// The page's `rel="next"` link.
    next: Option<Url>,
    /// The parsed body (a `T` of [`Api::fetch`]).
    value: Arc<dyn Any + Send + Sync>,
    /// The size of the JSON it was parsed from, for the memo's weight.
    body_bytes: usize,
}

/// Whether the owner is an organization or a user: decides the repository listing's route.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum OwnerKind {
    Unknown = 0,
    Organization = 1,
    User = 2,
}

/// The API of one GitHub, reached through one client.
pub struct Api {
    /// The shared client; it follows no redirect, [`send_per_hop`] does, deciding the token
    /// at each hop.
    http: reqwest::Client,
    /// The configured API URL, ending in `/`: the only URLs the token is sent to.
    root: Url,
    /// The organization or user holding the extension repositories.
    owner: String,
    /// `Bearer <token>`, marked sensitive; `None` is anonymous.
    authorization: Option<HeaderValue>,
    /// Answers kept for revalidation, by URL, bounded by [`MEMO_BYTES`].
    memo: moka::future::Cache<String, Arc<Held>>,
    /// Until when the rate limit forbids calls, and what GitHub said.
    suspended: Mutex<Option<(Instant, String)>>,
    /// Whether the owner's repositories are listed under `orgs/` or `users/`.
    owner_kind: AtomicU8,
    /// The instance's name: the `backend` label of its metrics.
    instance: String,
}

/// A page (or object) as [`Api::fetch`] returns it.
pub struct Fetched<T> {
    /// The parsed body, shared with the memo.
    pub value: Arc<T>,
    /// The page's `rel="next"` link.
    pub next: Option<Url>,
    /// The size of the JSON it was parsed from (for a `304`, the held answer's).
    pub bytes: usize,
}

impl Api {
    pub fn new(
        http: reqwest::Client,
        root: Url,
        owner: String,
        authorization: Option<HeaderValue>,
        instance: String,
    ) -> Self {
        Self {
            http,
            root,
            owner,
            authorization,
            instance,
            memo: moka::future::Cache::builder()
                .max_capacity(MEMO_BYTES)
                .weigher(|url: &String, held: &Arc<Held>| {
                    let weight = url.len() + held_weight(held);
                    u32::try_from(weight).unwrap_or(u32::MAX)
                })
                .build(),
            suspended: Mutex::new(None),
            owner_kind: AtomicU8::new(OwnerKind::Unknown as u8),
        }
    }

    /// The organization or user holding the extension repositories.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// `{api_url}/<segments>`, each segment percent-encoded.
    pub fn api_url(&self, segments: &[&str]) -> Url {
        let mut url = self.root.clone();
        // Always `Ok`: the configured URL was checked to be http(s).
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        url
    }

    /// Whether the token may go with a request to `url`: only to the configured API, never to
    /// storage (a presigned URL refuses a second credential, and must not see it anyway), nor
    /// to another path of the same host (GHES serves its web and storage routes there too).
    fn carries_token(&self, url: &Url) -> bool {
        url.origin() == self.root.origin()
            && url.username().is_empty()
            && url.password().is_none()
            && url.path().starts_with(self.root.path())
    }

    /// Refuses a call while the rate limit is known to be exhausted.
    fn admit(&self) -> Result<(), RegistryError> {
        let mut suspended = self.suspended.lock().unwrap_or_else(|p| p.into_inner());
        match &*suspended {
            Some((until, reason)) if Instant::now() < *until => Err(RegistryError::suspended(
                Source::Github,
                reason.clone(),
                *until - Instant::now(),
            )),
            Some(_) => {
                *suspended = None;
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// Stops calls for `wait`, unless they are already stopped for longer.
    fn suspend(&self, wait: Duration, reason: String) -> RegistryError {
        let until = Instant::now() + wait;
        let mut suspended = self.suspended.lock().unwrap_or_else(|p| p.into_inner());
        if suspended
            .as_ref()
            .is_none_or(|(current, _)| *current < until)
        {
            tracing::warn!(seconds = wait.as_secs(), %reason, "github rate limit: no calls until it resets");
            *suspended = Some((until, reason.clone()));
        }
        RegistryError::suspended(Source::Github, reason, wait)
    }

    /// Reads the rate-limit headers of an API answer: records what is left, and when nothing
    /// is, stops the calls until the window resets, so the next call is not the one refused.
    fn observe(&self, response: &Response) {
        let headers = response.headers();
        let Some(remaining) = header_u64(headers, "x-ratelimit-remaining") else {
            // GHES without rate limits sends none.
            return;
        };
        metrics::gauge!(BACKEND_RATE_LIMIT_REMAINING, "backend" => self.instance.clone())
            .set(remaining as f64);
        if remaining == 0 && response.status().is_success() {
            let wait = until_reset(headers, SystemTime::now()).unwrap_or(SECONDARY_WAIT);
            self.suspend(
                wait,
                format!(
                    "rate limit exhausted; it resets in {} s",
                    wait.as_secs().max(1)
                ),
            );
        }
    }

    /// Sends a GET with the API headers, following redirects with the token only on hops
    /// under the API URL, after checking the rate limit allows it.
    async fn get(&self, url: Url, extra: HeaderMap) -> Result<Response, RegistryError> {
        self.admit()?;
        let mut headers = extra;
        headers
            .entry(ACCEPT)
            .or_insert(HeaderValue::from_static("application/vnd.github+json"));
        headers.insert(
            HeaderName::from_static("x-github-api-version"),
            HeaderValue::from_static(API_VERSION),
        );
        let response = send_per_hop(
            &self.http,
            &Method::GET,
            url,
            &headers,
            self.authorization.as_ref(),
            |url| self.carries_token(url),
        )
        .await
        .map_err(|e| e.into_registry_error(Source::Github))?;
        self.observe(&response);
        Ok(response)
    }

    /// One JSON answer, revalidated when a previous one is held: a `304` returns the held
    /// value without reading or parsing anything. `Ok(None)` on 404 (missing, or private and
    /// not visible to the token).
    pub async fn fetch<T>(&self, url: Url, what: &str) -> Result<Option<Fetched<T>>, RegistryError>
    where
        T: DeserializeOwned + Send + Sync + 'static,
    {
        self.fetch_within(url, what, MAX_METADATA_BYTES, || {
            format!("{what}: larger than {MAX_METADATA_BYTES} bytes")
        })
        .await
    }

    /// [`Api::fetch`] of an answer of at most `cap` bytes of JSON (held or read), else the
    /// error `oversize` words.
    async fn fetch_within<T>(
        &self,
        url: Url,
        what: &str,
        cap: usize,
        oversize: impl FnOnce() -> String,
    ) -> Result<Option<Fetched<T>>, RegistryError>
    where
        T: DeserializeOwned + Send + Sync + 'static,
    {
        let key = url.as_str().to_owned();
        let held = self.memo.get(&key).await;
        let mut conditions = HeaderMap::new();
        if let Some(held) = &held {
            match (&held.etag, &held.last_modified) {
                (Some(etag), _) => {
                    conditions.insert(IF_NONE_MATCH, etag.clone());
                }
                (None, Some(date)) => {
                    conditions.insert(IF_MODIFIED_SINCE, date.clone());
                }
                (None, None) => {}
            }
        }
        let response = self.get(url, conditions).await?;
        if response.status() == StatusCode::NOT_MODIFIED {
            let held = held.ok_or_else(|| unavailable(format!("{what}: HTTP 304 unasked")))?;
            if held.body_bytes > cap {
                return Err(unavailable(oversize()));
            }
            let value = Arc::clone(&held.value)
                .downcast::<T>()
                .map_err(|_| RegistryError::Internal(format!("{what}: memo of another type")))?;
            metrics::counter!(BACKEND_REVALIDATIONS_TOTAL, "backend" => self.instance.clone(), "outcome" => "not_modified").increment(1);
            return Ok(Some(Fetched {
                value,
                next: held.next.clone(),
                bytes: held.body_bytes,
            }));
        }
        let Some(response) = self.api_status(response, what).await? else {
            self.memo.invalidate(&key).await;
            return Ok(None);
        };
        if held.is_some() {
            metrics::counter!(BACKEND_REVALIDATIONS_TOTAL, "backend" => self.instance.clone(), "outcome" => "changed").increment(1);
        }
        let headers = response.headers();
        let etag = headers.get(ETAG).cloned();
        let last_modified = headers.get(LAST_MODIFIED).cloned();
        let next = match headers
            .get(LINK)
            .and_then(|v| v.to_str().ok())
            .and_then(next_link)
        {
            None => None,
            Some(link) => Some(
                response
                    .url()
                    .join(link)
                    .map_err(|_| unavailable(format!("{what}: pagination link is not a URL")))?,
            ),
        };
        let bytes = read_capped(response, cap)
            .await
            .map_err(|e| transport_error(Source::Github, &e))?
            .ok_or_else(|| unavailable(oversize()))?;
        let value: Arc<T> = Arc::new(serde_json::from_slice(&bytes).map_err(|e| {
            tracing::warn!(%what, error = %e, "github answered malformed or unexpected JSON");
            unavailable(format!("{what}: malformed or unexpected JSON"))
        })?);
        if etag.is_some() || last_modified.is_some() {
            let held = Held {
                etag,
                last_modified,
                next: next.clone(),
                value: Arc::clone(&value) as Arc<dyn Any + Send + Sync>,
                body_bytes: bytes.len(),
            };
            self.memo.insert(key, Arc::new(held)).await;
        }
        Ok(Some(Fetched {
            value,
            next,
            bytes: bytes.len(),
        }))
    }

    /// Every page of a list, from `first` along `rel="next"` until it is absent (links are
    /// followed verbatim, as GitHub asks), at most [`MAX_PAGES`] pages and [`MAX_LIST_BYTES`]
    /// of JSON in all; `Ok(None)` on 404.
    pub async fn pages<T>(
        &self,
        first: Url,
        what: &str,
    ) -> Result<Option<Vec<Arc<T>>>, RegistryError>
    where
        T: DeserializeOwned + Send + Sync + 'static,
    {
        let mut url = first;
        url.query_pairs_mut().append_pair("per_page", PER_PAGE);
        let mut pages = Vec::new();
        let mut seen = HashSet::new();
        let mut budget = MAX_LIST_BYTES;
        loop {
            if !seen.insert(url.clone()) || pages.len() >= MAX_PAGES {
                return Err(unavailable(format!(
                    "{what}: pagination loops or passes {MAX_PAGES} pages"
                )));
            }
            let oversize = || {
                if budget < MAX_METADATA_BYTES {
                    format!("{what}: the pages are larger than {MAX_LIST_BYTES} bytes in all")
                } else {
                    format!("{what}: larger than {MAX_METADATA_BYTES} bytes")
                }
            };
            let cap = budget.min(MAX_METADATA_BYTES);
            let Some(page) = self.fetch_within::<T>(url, what, cap, oversize).await? else {
                return Ok(None);
            };
            budget -= page.bytes;
            pages.push(page.value);
            match page.next {
                Some(next) => url = next,
                None => return Ok(Some(pages)),
            }
        }
    }

    /// The owner's repositories: `orgs/{owner}/repos`, or `users/{owner}/repos` (public ones
    /// only) when the owner is a user; which one is remembered.
    pub async fn repositories<T>(&self) -> Result<Option<Vec<Arc<T>>>, RegistryError>
    where
        T: DeserializeOwned + Send + Sync + 'static,
    {
        let what = "owner repositories";
        let kind = self.owner_kind.load(Ordering::Relaxed);
        if kind != OwnerKind::User as u8 {
            let url = self.api_url(&["orgs", &self.owner, "repos"]);
            if let Some(pages) = self.pages(url, what).await? {
                self.owner_kind
                    .store(OwnerKind::Organization as u8, Ordering::Relaxed);
                return Ok(Some(pages));
            }
            if kind == OwnerKind::Organization as u8 {
                return Ok(None);
            }
        }
        let url = self.api_url(&["users", &self.owner, "repos"]);
        let pages = self.pages(url, what).await?;
        if pages.is_some() {
            self.owner_kind
                .store(OwnerKind::User as u8, Ordering::Relaxed);
        }
        Ok(pages)
    }

    /// Starts the download of an asset through its API URL with `Accept:
    /// application/octet-stream`: GitHub answers the bytes, or a redirect to storage that is
    /// followed without the token.
    pub async fn download(&self, asset: &AssetRef, what: &str) -> Result<Response, RegistryError> {
        let url = Url::parse(&asset.api_url)
            .map_err(|_| unavailable(format!("{what}: the asset URL is not a URL")))?;
        let mut accept = HeaderMap::new();
        accept.insert(ACCEPT, HeaderValue::from_static("application/octet-stream"));
        let response = self.get(url, accept).await?;
        let Some(response) = self.api_status(response, what).await? else {
            return Err(unavailable(format!("{what}: the asset answered HTTP 404")));
        };
        if is_html(&response) {
            return Err(unavailable(format!(
                "{what}: the download ended on an HTML page instead of the file"
            )));
        }
        Ok(response)
    }

    /// The text of a small asset (a checksum file), read whole up to a cap.
    pub async fn small_text(&self, asset: &AssetRef, what: &str) -> Result<String, RegistryError> {
        let response = self.download(asset, what).await?;
        let bytes = read_capped(response, MAX_SIDECAR_BYTES)
            .await
            .map_err(|e| transport_error(Source::Github, &e))?
            .ok_or_else(|| unavailable(format!("{what}: larger than {MAX_SIDECAR_BYTES} bytes")))?;
        String::from_utf8(bytes.into()).map_err(|_| unavailable(format!("{what}: not UTF-8 text")))
    }

    /// Maps an answer: 2xx passes, 404 is `None`; a rate limit stops the calls until GitHub's
    /// time and is `BackendSuspended`; everything else an error naming `what`.
    async fn api_status(
        &self,
        response: Response,
        what: &str,
    ) -> Result<Option<Response>, RegistryError> {
        let status = response.status();
        match status {
            s if s.is_success() => return Ok(Some(response)),
            StatusCode::NOT_FOUND => return Ok(None),
            StatusCode::UNAUTHORIZED => return Err(RegistryError::auth_failed(Source::Github)),
            _ => {}
        }
        let headers = response.headers().clone();
        let says_rate_limit = if matches!(status.as_u16(), 403 | 429) {
            read_capped(response, MAX_SIDECAR_BYTES)
                .await
                .ok()
                .flatten()
                .is_some_and(|body| {
                    String::from_utf8_lossy(&body)
                        .to_ascii_lowercase()
                        .contains("rate limit")
                })
        } else {
            false
        };
        if let Some(wait) = rate_limit_wait(status, &headers, says_rate_limit, SystemTime::now()) {
            return Err(self.suspend(
                wait,
                format!(
                    "{what}: HTTP {status}, rate limited for {} s",
                    wait.as_secs().max(1)
                ),
            ));
        }
        Err(match status {
            StatusCode::FORBIDDEN => {
                unavailable(format!("{what}: HTTP 403 (the token lacks a permission)"))
            }
            _ => unavailable(format!("{what}: HTTP {status}")),
        })
    }
}

/// What a held answer weighs in the memo: its parts, and the JSON it was parsed from (which
/// is larger than what is kept).
fn held_weight(held: &Held) -> usize {
    std::mem::size_of::<Held>()
        + held.body_bytes
        + held.etag.as_ref().map_or(0, HeaderValue::len)
        + held.last_modified.as_ref().map_or(0, HeaderValue::len)
        + held.next.as_ref().map_or(0, |u| u.as_str().len())
}

fn header_u64(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers.get(name)?.to_str().ok()?.trim().parse().ok()
}

/// How long until `x-ratelimit-reset` (epoch seconds), at least a second, at most
/// [`MAX_RETRY_AFTER`].
fn until_reset(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let reset =
        SystemTime::UNIX_EPOCH + Duration::from_secs(header_u64(headers, "x-ratelimit-reset")?);
    let wait = reset.duration_since(now).unwrap_or_default();
    Some(wait.clamp(Duration::from_secs(1), MAX_RETRY_AFTER))
}

/// How long GitHub asks not to be called after a refused answer, as its rate-limit rules say:
/// `retry-after` if present; else, with `x-ratelimit-remaining: 0`, until `x-ratelimit-reset`;
/// else, for a `429` or a `403` whose body speaks of a rate limit (a secondary limit), a minute.
/// `None` when the refusal is not about rate limits (a `403` for a missing permission).
fn rate_limit_wait(
    status: StatusCode,
    headers: &HeaderMap,
    says_rate_limit: bool,
    now: SystemTime,
) -> Option<Duration> {
    if !matches!(status.as_u16(), 403 | 429) {
        return None;
    }
    if let Some(wait) = headers
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, now))
    {
        return Some(wait.max(Duration::from_secs(1)));
    }
    if header_u64(headers, "x-ratelimit-remaining") == Some(0) {
        return Some(until_reset(headers, now).unwrap_or(SECONDARY_WAIT));
    }
    (status == StatusCode::TOO_MANY_REQUESTS || says_rate_limit).then_some(SECONDARY_WAIT)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, value.parse().unwrap());
        }
        map
    }

    #[test]
    fn rate_limits_are_told_from_permission_refusals() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let wait = |status: u16, pairs: &[(&'static str, &str)], says: bool| {
            rate_limit_wait(
                StatusCode::from_u16(status).unwrap(),
                &headers(pairs),
                says,
                now,
            )
        };
        let exhausted = [
            ("x-ratelimit-remaining", "0"),
            ("x-ratelimit-reset", "1000120"),
        ];
        assert_eq!(wait(403, &exhausted, true), Some(Duration::from_secs(120)));
        assert_eq!(wait(429, &exhausted, false), Some(Duration::from_secs(120)));
        assert_eq!(
            wait(
                403,
                &[("retry-after", "30"), ("x-ratelimit-remaining", "12")],
                true
            ),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            wait(429, &[("x-ratelimit-remaining", "12")], false),
            Some(SECONDARY_WAIT)
        );
        assert_eq!(
            wait(403, &[("x-ratelimit-remaining", "12")], true),
            Some(SECONDARY_WAIT)
        );
        assert_eq!(wait(403, &[("x-ratelimit-remaining", "12")], false), None);
        assert_eq!(wait(404, &exhausted, true), None);
        // A reset already past still waits a second, never zero.
        let past = [("x-ratelimit-remaining", "0"), ("x-ratelimit-reset", "5")];
        assert_eq!(wait(403, &past, false), Some(Duration::from_secs(1)));
    }

    #[test]
    fn the_token_goes_only_under_the_api_url() {
        let api = Api::new(
            reqwest::Client::new(),
            Url::parse("https://ghe.test/api/v3/").unwrap(),
            "o".into(),
            None,
            "github".into(),
        );
        let carries = |u: &str| api.carries_token(&Url::parse(u).unwrap());
        assert!(carries("https://ghe.test/api/v3/orgs/o/repos?per_page=100"));
        assert!(carries(
            "https://ghe.test/api/v3/repos/o/r/releases/assets/7"
        ));
        for refused in [
            "https://ghe.test/storage/releases/7?token=x",
            "https://objects.githubusercontent.com/x",
            "http://ghe.test/api/v3/orgs/o/repos",
            "https://ghe.test:8443/api/v3/orgs/o/repos",
            "https://u:p@ghe.test/api/v3/orgs/o/repos",
        ] {
            assert!(!carries(refused), "{refused}");
        }
        assert_eq!(
            api.api_url(&["repos", "o", "a b"]).as_str(),
            "https://ghe.test/api/v3/repos/o/a%20b"
        );
    }
}
