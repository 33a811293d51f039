//! Talking to one registry: URLs, the `WWW-Authenticate` challenge flow (basic, bearer token
//! exchange, static token), which URLs may carry the credentials (re-checked on every redirect
//! hop), the per-scope token cache, the bound on calls in flight, and the reading of error
//! answers into [`CallError`].

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use reqwest::header::{HeaderMap, HeaderValue, ACCEPT, LINK, WWW_AUTHENTICATE};
use reqwest::{Method, StatusCode, Url};
use serde::Deserialize;
use tokio::sync::Semaphore;

use crate::backend::direct::Direct;
use crate::backend::http::{
    authority, next_link, read_capped, send_per_hop, send_per_hop_via, throttled, transport_error,
    HopError, Via, MAX_METADATA_BYTES,
};
use crate::backend::oci::model::{describe_error_body, is_not_found_code};
use crate::config::Secret;
use crate::registry::{RegistryError, Source};

/// Characters kept as they are in a path segment; `:` stays so digests read as the registry
/// expects (`sha256:<hex>`).
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b':');

/// Token lifetime when the token server does not say (the distribution token spec's default).
const DEFAULT_TOKEN_SECONDS: u64 = 60;

/// Most pages one list (catalog, tag list) may have; a `Link` chain longer than this (100,000
/// repositories at 1000 a page) is refused rather than followed forever, as every page is held
/// until the list is whole.
const MAX_PAGES: usize = 100;

/// Most bytes of JSON one paged list (catalog, tag list) reads over all its pages, each also
/// at most [`MAX_METADATA_BYTES`]: some 400,000 repository names or tags, and what one list
/// holds at once however many pages the registry offers.
const MAX_LIST_BYTES: usize = 32 * 1024 * 1024;

/// How a registry call failed, in the terms the backend decides on.
#[derive(Debug)]
pub enum CallError {
    /// 404: no such repository, tag or blob (JSON `*_UNKNOWN` or a plain-text 404).
    NotFound,
    /// Refused after authenticating (401 again, or 403): this scope is not granted.
    Denied,
    /// This answer was unusable (5xx, malformed body); other calls may still work.
    Broken(RegistryError),
    /// The registry or its token server cannot be used at all (unreachable, timed out, or the
    /// configured credentials rejected): no point in asking about other repositories.
    Fatal(RegistryError),
}

impl CallError {
    fn broken(reason: impl Into<String>) -> Self {
        Self::Broken(RegistryError::unavailable(Source::Oci, reason))
    }

    fn transport(e: &reqwest::Error) -> Self {
        Self::Fatal(transport_error(Source::Oci, e))
    }

    /// A transport failure leaves the registry unusable; redirects that lead nowhere are this
    /// answer's fault.
    fn hop(e: HopError) -> Self {
        match e {
            HopError::Redirect(reason) => Self::broken(reason),
            e => Self::Fatal(e.into_registry_error(Source::Oci)),
        }
    }
}

/// What a call is allowed to do, as the registry's token scopes name it.
#[derive(Clone, Copy, Debug)]
pub enum Scope<'a> {
    Catalog,
    Pull(&'a str),
}

impl Scope<'_> {
    fn as_string(self) -> String {
        match self {
            Scope::Catalog => "registry:catalog:*".to_owned(),
            Scope::Pull(repo) => format!("repository:{repo}:pull"),
        }
    }
}

/// A `WWW-Authenticate` challenge: the scheme (lowercase) and its parameters.
#[derive(Debug, PartialEq, Eq)]
pub struct Challenge {
    /// `basic` or `bearer`: which credentials to answer with.
    pub scheme: String,
    /// `realm`, `service`, `scope`, `error`: where and what to ask a token for.
    pub params: HashMap<String, String>,
}

/// Parses the first challenge of a `WWW-Authenticate` value (`Bearer realm="..",scope=".."`).
/// Quoted values may hold commas (`scope="repository:x:pull,push"`).
pub fn parse_challenge(value: &str) -> Option<Challenge> {
    let value = value.trim();
    let (scheme, mut rest) = value.split_once(' ').unwrap_or((value, ""));
    if scheme.is_empty() {
        return None;
    }
    let mut params = HashMap::new();
    loop {
        rest = rest.trim_start_matches([' ', ',', '\t']);
        let Some((key, after)) = rest.split_once('=') else {
            break;
        };
        let key = key.trim().to_ascii_lowercase();
        let (val, remaining) = if let Some(quoted) = after.strip_prefix('"') {
            let mut val = String::new();
            let mut chars = quoted.char_indices();
            let mut end = quoted.len();
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => val.extend(chars.next().map(|(_, c)| c)),
                    '"' => {
                        end = i + 1;
                        break;
                    }
                    c => val.push(c),
                }
            }
            (val, &quoted[end..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (after[..end].trim().to_owned(), &after[end..])
        };
        params.insert(key, val);
        rest = remaining;
    }
    Some(Challenge {
        scheme: scheme.to_ascii_lowercase(),
        params,
    })
}

/// Bearer tokens by scope, each kept until shortly before it expires.
#[derive(Default)]
pub struct TokenCache {
    /// The `Authorization` value and the instant it stops being sent, by scope.
    tokens: HashMap<String, (HeaderValue, Instant)>,
}

impl TokenCache {
    pub fn get(&self, scope: &str, now: Instant) -> Option<HeaderValue> {
        let (value, until) = self.tokens.get(scope)?;
        (now < *until).then(|| value.clone())
    }

    /// Keeps `value` for `expires_in` seconds less a margin (a tenth, at most 10 s), so a
    /// token is never sent in the second it expires.
    pub fn insert(&mut self, scope: String, value: HeaderValue, expires_in: u64, now: Instant) {
        let margin = (expires_in / 10).clamp(1, 10);
        let until = now + Duration::from_secs(expires_in.saturating_sub(margin));
        self.tokens.retain(|_, (_, t)| *t > now);
        // Scopes follow the extension names clients ask for: past the bound, the token closest
        // to expiry makes room, so a stream of distinct names cannot grow the cache.
        if self.tokens.len() >= MAX_TOKENS && !self.tokens.contains_key(&scope) {
            let soonest = self
                .tokens
                .iter()
                .min_by_key(|(_, (_, t))| *t)
                .map(|(k, _)| k.clone());
            if let Some(soonest) = soonest {
                self.tokens.remove(&soonest);
            }
        }
        self.tokens.insert(scope, (value, until));
    }
}

/// Most bearer tokens kept at once.
const MAX_TOKENS: usize = 1024;

/// The token server's answer; `access_token` is the OAuth2 spelling some servers use.
#[derive(Deserialize)]
struct TokenAnswer {
    /// The token (distribution's spelling).
    token: Option<String>,
    /// The token (OAuth2's spelling).
    access_token: Option<String>,
    /// Seconds the token is valid; 60 when absent.
    expires_in: Option<u64>,
}

/// Basic credentials: sent on a `Basic` challenge and to the token server.
pub struct BasicCredentials {
    /// `[oci] username`; also sent to the token server as `account`.
    pub username: String,
    /// Read from `[oci] password_path`; never logged.
    pub password: Secret,
}

impl BasicCredentials {
    /// `Basic base64(user:password)`, marked sensitive; `None` if unfit for a header.
    fn header(&self) -> Option<HeaderValue> {
        let pair = format!("{}:{}", self.username, self.password.expose());
        sensitive(&format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(pair)
        ))
    }
}

/// One registry, its credentials, and the state the auth flow keeps.
pub struct Client {
    /// The shared reqwest client (timeouts, TLS verification); it follows no redirect,
    /// [`send_per_hop`] does.
    http: reqwest::Client,
    /// Large downloads' own connections, when the shared client's settings allow them.
    direct: Option<Direct>,
    /// `scheme://host[:port]/`: every path is resolved against it, and a `Link` or realm on
    /// another origin is treated as foreign.
    base: Url,
    /// The repository prefix extensions live under: credentials go only to repositories
    /// below it.
    namespace: String,
    /// Used on a `Basic` challenge and for token exchange.
    basic: Option<BasicCredentials>,
    /// The `Authorization` value of `basic`, built once.
    basic_header: Option<HeaderValue>,
    /// A token sent as `Bearer` on every call when configured.
    static_token: Option<Secret>,
    /// Set once the registry (its own origin, not a host a redirect led to) asked for basic
    /// credentials, so later calls send them at once instead of paying a 401 round trip each.
    basic_wanted: AtomicBool,
    /// Tokens from the challenge flow, reused until shortly before they expire.
    tokens: Mutex<TokenCache>,
    /// Bounds the calls in flight towards this registry (`max_concurrency`).
    permits: Semaphore,
}

impl Client {
    pub fn new(
        http: reqwest::Client,
        direct: Option<Direct>,
        base: Url,
        namespace: String,
        basic: Option<BasicCredentials>,
        static_token: Option<Secret>,
        max_concurrency: usize,
    ) -> Self {
        Self {
            http,
            direct,
            base,
            namespace,
            basic_header: basic.as_ref().and_then(BasicCredentials::header),
            basic,
            static_token,
            basic_wanted: AtomicBool::new(false),
            tokens: Mutex::new(TokenCache::default()),
            permits: Semaphore::new(max_concurrency),
        }
    }

    /// The registry's host as references name it (`host[:port]`).
    pub fn host(&self) -> String {
        authority(&self.base).unwrap_or_default()
    }

    /// `<base>/v2/<repo>/<rest...>`, every piece percent-encoded.
    pub fn url(&self, repo: &str, rest: &[&str]) -> Url {
        let mut path = String::from("v2");
        for piece in repo.split('/').chain(rest.iter().copied()) {
            path.push('/');
            path.extend(utf8_percent_encode(piece, SEGMENT));
        }
        self.join(&path)
    }

    /// `<base>/v2/_catalog?n=<page>`.
    pub fn catalog_url(&self, page: usize) -> Url {
        self.join(&format!("v2/_catalog?n={page}"))
    }

    fn join(&self, relative: &str) -> Url {
        // Cannot fail: `base` is an http(s) URL ending in '/' and `relative` a plain path.
        self.base
            .join(relative)
            .unwrap_or_else(|_| self.base.clone())
    }

    /// GETs a JSON list that may be paged, following `Link: <...>; rel="next"` on this
    /// registry, at most [`MAX_PAGES`] pages and [`MAX_LIST_BYTES`] of JSON in all; `items`
    /// takes each page apart.
    pub async fn get_paged<T: serde::de::DeserializeOwned, I>(
        &self,
        first: Url,
        scope: Scope<'_>,
        what: &str,
        items: impl Fn(T) -> Vec<I>,
    ) -> Result<Vec<I>, CallError> {
        let mut all = Vec::new();
        let mut seen = HashSet::new();
        let mut next = Some(first);
        let mut budget = MAX_LIST_BYTES;
        while let Some(url) = next {
            if !seen.insert(url.clone()) {
                return Err(CallError::broken(format!(
                    "{what} pages link back to themselves"
                )));
            }
            if seen.len() > MAX_PAGES {
                return Err(CallError::broken(format!(
                    "{what} has more than {MAX_PAGES} pages"
                )));
            }
            let (body, headers) = self
                .get_capped(url, scope, None, budget.min(MAX_METADATA_BYTES), what)
                .await?;
            let body = body.ok_or_else(|| {
                CallError::broken(if budget < MAX_METADATA_BYTES {
                    format!("{what} pages larger than {MAX_LIST_BYTES} bytes in all")
                } else {
                    format!("{what} larger than {MAX_METADATA_BYTES} bytes")
                })
            })?;
            budget -= body.len();
            let page: T = serde_json::from_slice(&body).map_err(|e| {
                tracing::warn!(%what, error = %e, "malformed registry answer");
                CallError::broken(format!("malformed {what}"))
            })?;
            all.extend(items(page));
            next = self.next_page(&headers)?;
        }
        Ok(all)
    }

    /// The next page named by a `Link: <...>; rel="next"` header, if on this registry.
    fn next_page(&self, headers: &HeaderMap) -> Result<Option<Url>, CallError> {
        let link = headers.get(LINK).and_then(|l| l.to_str().ok());
        let Some(target) = link.and_then(next_link) else {
            return Ok(None);
        };
        let url = self
            .base
            .join(target)
            .map_err(|_| CallError::broken("unreadable Link header"))?;
        if url.origin() != self.base.origin() {
            return Err(CallError::broken("Link header points to another host"));
        }
        Ok(Some(url))
    }

    /// `GET /v2/`, unauthenticated: 200 or 401 means the registry is up.
    pub async fn ping(&self) -> Result<(), String> {
        let response = send_per_hop(
            &self.http,
            &Method::GET,
            self.join("v2/"),
            &HeaderMap::new(),
            None,
            |_| false,
        )
        .await
        .map_err(|e| e.into_registry_error(Source::Oci).to_string())?;
        match response.status() {
            StatusCode::OK | StatusCode::UNAUTHORIZED => Ok(()),
            status => Err(format!("GET /v2/ answered {status}")),
        }
    }

    /// A GET whose whole (bounded) body is read.
    pub async fn get_bytes(
        &self,
        url: Url,
        scope: Scope<'_>,
        accept: Option<&str>,
        what: &str,
    ) -> Result<(Bytes, HeaderMap), CallError> {
        let (body, headers) = self
            .get_capped(url, scope, accept, MAX_METADATA_BYTES, what)
            .await?;
        let body = body.ok_or_else(|| {
            CallError::broken(format!("{what} larger than {MAX_METADATA_BYTES} bytes"))
        })?;
        Ok((body, headers))
    }

    /// A GET whose body is read whole if it is at most `cap` bytes (else `None`, and no more
    /// is read); with its headers.
    async fn get_capped(
        &self,
        url: Url,
        scope: Scope<'_>,
        accept: Option<&str>,
        cap: usize,
        what: &str,
    ) -> Result<(Option<Bytes>, HeaderMap), CallError> {
        let response = self
            .send(Method::GET, url, scope, accept_header(accept), what)
            .await?;
        let headers = response.headers().clone();
        let body = read_capped(response, cap)
            .await
            .map_err(|e| CallError::transport(&e))?;
        Ok((body, headers))
    }

    /// Sends a GET or HEAD with `headers` (on every hop) through the challenge flow and
    /// returns a 2xx response; any other status becomes a [`CallError`]. Redirects are followed
    /// with the credentials only on the hops [`Client::carries_credentials`] accepts for `scope`;
    /// a 401 from a hop on another origin is a failure, never a challenge.
    pub async fn send(
        &self,
        method: Method,
        url: Url,
        scope: Scope<'_>,
        headers: HeaderMap,
        what: &str,
    ) -> Result<reqwest::Response, CallError> {
        self.send_on(false, method, url, scope, headers, what).await
    }

    /// [`Client::send`] for a large download: each hop on its own connection (see [`Direct`])
    /// where there is one for this registry, else on the shared client.
    pub async fn send_download(
        &self,
        url: Url,
        scope: Scope<'_>,
        headers: HeaderMap,
        what: &str,
    ) -> Result<reqwest::Response, CallError> {
        self.send_on(true, Method::GET, url, scope, headers, what)
            .await
    }

    async fn send_on(
        &self,
        download: bool,
        method: Method,
        url: Url,
        scope: Scope<'_>,
        headers: HeaderMap,
        what: &str,
    ) -> Result<reqwest::Response, CallError> {
        let scope_key = scope.as_string();
        let mut challenged = false;
        loop {
            let (credential, sent_basic) = self.credential(&scope_key);
            let (response, answered_by) = {
                let _permit = self.permits.acquire().await.map_err(|_| {
                    CallError::Fatal(RegistryError::Internal("registry permits closed".into()))
                })?;
                let via = match self.direct.as_ref().filter(|_| download) {
                    Some(direct) => Via::Own(direct),
                    None => Via::Shared(&self.http),
                };
                send_per_hop_via(
                    via,
                    &method,
                    url.clone(),
                    &headers,
                    credential.as_ref(),
                    |hop| self.carries_credentials(hop, scope),
                )
                .await
                .map_err(CallError::hop)?
            };
            let status = response.status();
            if status.is_success() {
                return Ok(response);
            }
            if status != StatusCode::UNAUTHORIZED {
                return Err(failure(response, what).await);
            }
            if !self.carries_credentials(&answered_by, scope) {
                // Only the registry's challenge is acted on, from its API for this scope:
                // storage a redirect led to, on another host or on the registry's own outside
                // its API, would otherwise name the realm the credentials go to and the token
                // kept for this scope, or switch every later call to basic credentials.
                tracing::warn!(%what, "a host a redirect led to answered 401");
                return Err(CallError::broken(format!(
                    "{what} redirect target answered {status}"
                )));
            }
            if challenged {
                // Basic credentials refused are wrong credentials, as htpasswd grants every
                // user everything; a refused token is a scope this account is not granted.
                return Err(if sent_basic {
                    CallError::Fatal(RegistryError::auth_failed(Source::Oci))
                } else {
                    CallError::Denied
                });
            }
            challenged = true;
            let challenge = response
                .headers()
                .get(WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_challenge);
            match challenge {
                Some(c) if c.scheme == "bearer" => self.fetch_token(&c, scope_key.clone()).await?,
                Some(c) if c.scheme == "basic" && self.basic.is_some() => {
                    self.basic_wanted.store(true, Ordering::Relaxed);
                }
                _ => return Err(CallError::Denied),
            }
        }
    }

    /// Whether `url` may carry the registry credentials for `scope`: only the `/v2/` API URLs
    /// this client builds on the registry's own origin, the catalog for [`Scope::Catalog`] and
    /// the tag list, manifests and blobs of that repository, under the namespace, for
    /// [`Scope::Pull`]. A blob's redirect to storage, on another host or another path of the
    /// same one, gets none.
    fn carries_credentials(&self, url: &Url, scope: Scope<'_>) -> bool {
        if url.origin() != self.base.origin()
            || !url.username().is_empty()
            || url.password().is_some()
        {
            return false;
        }
        let Some(rest) = url.path().strip_prefix("/v2/") else {
            return false;
        };
        match scope {
            Scope::Catalog => rest == "_catalog",
            Scope::Pull(repo) => {
                let under_namespace = repo
                    .strip_prefix(self.namespace.as_str())
                    .is_some_and(|r| r.starts_with('/'));
                let encoded: String = repo
                    .split('/')
                    .map(|p| utf8_percent_encode(p, SEGMENT).to_string())
                    .collect::<Vec<_>>()
                    .join("/");
                let route = rest
                    .strip_prefix(encoded.as_str())
                    .and_then(|r| r.strip_prefix('/'));
                under_namespace
                    && match route.map(|r| r.split_once('/').unwrap_or((r, ""))) {
                        Some(("tags", "list")) => true,
                        Some(("manifests" | "blobs", reference)) => {
                            !reference.is_empty() && !reference.contains('/')
                        }
                        _ => false,
                    }
            }
        }
    }

    /// The credentials to send for `scope`, if any; says whether they are basic ones.
    fn credential(&self, scope: &str) -> (Option<HeaderValue>, bool) {
        if self.basic_wanted.load(Ordering::Relaxed) {
            if let Some(basic) = &self.basic_header {
                return (Some(basic.clone()), true);
            }
        }
        let cached = self
            .tokens
            .lock()
            .ok()
            .and_then(|t| t.get(scope, Instant::now()));
        let bearer = cached.or_else(|| {
            self.static_token
                .as_ref()
                .and_then(|t| sensitive(&format!("Bearer {}", t.expose())))
        });
        (bearer, false)
    }

    /// Whether the basic credentials may go to the token `realm`: over TLS to any host, or over
    /// plain HTTP only when the registry itself is plain HTTP on the same host (they travel
    /// there in the clear already; a token server on another port is common). A plain-HTTP
    /// realm of an https registry, on its host or not, would expose them.
    fn may_send_basic_to(&self, realm: &Url) -> bool {
        realm.scheme() == "https"
            || (realm.scheme() == self.base.scheme() && realm.host() == self.base.host())
    }

    /// Gets a token from the challenge's realm and caches it under `scope_key`.
    async fn fetch_token(&self, challenge: &Challenge, scope_key: String) -> Result<(), CallError> {
        let Some(realm) = challenge.params.get("realm") else {
            return Err(CallError::broken("bearer challenge without a realm"));
        };
        let mut realm = Url::parse(realm)
            .map_err(|_| CallError::broken("bearer challenge with an unreadable realm"))?;
        if !matches!(realm.scheme(), "http" | "https") {
            return Err(CallError::broken("bearer challenge realm is not http(s)"));
        }
        if self.basic.is_none() && self.static_token.is_some() {
            // The static token is the one credential there is, and it was just refused.
            return Err(CallError::Denied);
        }
        {
            let mut query = realm.query_pairs_mut();
            if let Some(service) = challenge.params.get("service") {
                query.append_pair("service", service);
            }
            let scopes = challenge
                .params
                .get("scope")
                .map_or(scope_key.as_str(), String::as_str);
            for scope in scopes.split(' ').filter(|s| !s.is_empty()) {
                query.append_pair("scope", scope);
            }
            if let Some(basic) = &self.basic {
                query.append_pair("account", &basic.username);
            }
        }
        if self.basic.is_some() && !self.may_send_basic_to(&realm) {
            return Err(CallError::broken(
                "refusing to send credentials to a plain-HTTP token server",
            ));
        }
        // The credentials go to the realm itself; wherever it redirects, they do not follow.
        let response = send_per_hop(
            &self.http,
            &Method::GET,
            realm.clone(),
            &HeaderMap::new(),
            self.basic_header.as_ref(),
            |hop| hop.origin() == realm.origin() && hop.path() == realm.path(),
        )
        .await
        .map_err(CallError::hop)?;
        match response.status() {
            s if s.is_success() => {}
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                return Err(CallError::Fatal(RegistryError::auth_failed(Source::Oci)))
            }
            s => {
                return Err(CallError::broken(format!("token server answered {s}")));
            }
        }
        let body = read_bounded(response)
            .await?
            .ok_or_else(|| CallError::broken("token answer too large"))?;
        let answer: TokenAnswer = serde_json::from_slice(&body)
            .map_err(|_| CallError::broken("malformed token server answer"))?;
        let token = answer
            .token
            .or(answer.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| CallError::broken("token server answer without a token"))?;
        let value = sensitive(&format!("Bearer {token}"))
            .ok_or_else(|| CallError::broken("token server sent a token unfit for a header"))?;
        let expires_in = answer.expires_in.unwrap_or(DEFAULT_TOKEN_SECONDS);
        if let Ok(mut tokens) = self.tokens.lock() {
            tokens.insert(scope_key, value, expires_in, Instant::now());
        }
        Ok(())
    }
}

/// A header value marked sensitive, so it is left out of any debug output.
/// The `Accept` header a request sends, if any.
pub fn accept_header(accept: Option<&str>) -> HeaderMap {
    let mut headers = HeaderMap::new();
    if let Some(accept) = accept.and_then(|a| HeaderValue::from_str(a).ok()) {
        headers.insert(ACCEPT, accept);
    }
    headers
}

fn sensitive(value: &str) -> Option<HeaderValue> {
    let mut value = HeaderValue::from_str(value).ok()?;
    value.set_sensitive(true);
    Some(value)
}

/// Reads a body up to [`MAX_METADATA_BYTES`]; `None` when it is larger.
async fn read_bounded(response: reqwest::Response) -> Result<Option<Bytes>, CallError> {
    read_capped(response, MAX_METADATA_BYTES)
        .await
        .map_err(|e| CallError::transport(&e))
}

/// Turns a non-2xx answer into a [`CallError`], reading the registry's error body (JSON or the
/// plain-text 404 some routes give).
async fn failure(response: reqwest::Response, what: &str) -> CallError {
    let status = response.status();
    if let Some(throttled) = throttled(Source::Oci, &response, what) {
        return CallError::Fatal(throttled);
    }
    let body = match read_bounded(response).await {
        Ok(body) => body.unwrap_or_default(),
        Err(e) => return e,
    };
    let (code, text) = describe_error_body(&body);
    match status {
        StatusCode::NOT_FOUND if code.as_deref().is_none_or(is_not_found_code) => {
            CallError::NotFound
        }
        StatusCode::FORBIDDEN => CallError::Denied,
        // The registry's own words stay in the log, under the request's id: they may name
        // repositories, paths or accounts the client has no business seeing.
        _ => {
            tracing::warn!(%status, %what, error = %text, "registry error answer");
            CallError::broken(format!("registry answered {status} for {what}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_with_quoted_commas_are_parsed() {
        let c = parse_challenge(
            r#"Bearer realm="http://127.0.0.1:1/token",service="reg",scope="repository:p/a:pull,push",error="insufficient_scope""#,
        )
        .unwrap();
        assert_eq!(c.scheme, "bearer");
        assert_eq!(c.params["realm"], "http://127.0.0.1:1/token");
        assert_eq!(c.params["service"], "reg");
        assert_eq!(c.params["scope"], "repository:p/a:pull,push");
        assert_eq!(c.params["error"], "insufficient_scope");
        let basic = parse_challenge(r#"Basic realm="provisioning-registry""#).unwrap();
        assert_eq!(basic.scheme, "basic");
        let bare = parse_challenge("Bearer realm=x, service=y").unwrap();
        assert_eq!(
            (
                bare.params["realm"].as_str(),
                bare.params["service"].as_str()
            ),
            ("x", "y")
        );
        assert!(parse_challenge("").is_none());
    }

    #[test]
    fn credentials_go_only_to_the_api_urls_of_the_scope() {
        let client = Client::new(
            reqwest::Client::new(),
            None,
            Url::parse("https://reg.test/").unwrap(),
            "ns".into(),
            None,
            None,
            1,
        );
        let carries = |u: &str, scope| client.carries_credentials(&Url::parse(u).unwrap(), scope);
        let aws = Scope::Pull("ns/aws-provider");
        for allowed in [
            "https://reg.test/v2/ns/aws-provider/tags/list?n=100&last=1.0.0",
            "https://reg.test/v2/ns/aws-provider/manifests/1.0.0",
            "https://reg.test/v2/ns/aws-provider/blobs/sha256:00ff",
        ] {
            assert!(carries(allowed, aws), "{allowed}");
        }
        assert!(carries(
            "https://reg.test/v2/_catalog?n=1000",
            Scope::Catalog
        ));
        for refused in [
            // Object storage on the same host, another repository, another origin.
            "https://reg.test/docker/registry/v2/blobs/sha256/00/00ff/data",
            "https://reg.test/v2/ns/other-provider/blobs/sha256:00ff",
            "https://reg.test/v2/ns/aws-provider/blobs/uploads/x",
            "https://reg.test/v2/ns/aws-provider/",
            "https://reg.test/v2/_catalog",
            "https://reg.test:8443/v2/ns/aws-provider/blobs/sha256:00ff",
            "http://reg.test/v2/ns/aws-provider/blobs/sha256:00ff",
            "https://storage.test/v2/ns/aws-provider/blobs/sha256:00ff",
            "https://u:p@reg.test/v2/ns/aws-provider/blobs/sha256:00ff",
        ] {
            assert!(!carries(refused, aws), "{refused}");
        }
        assert!(!carries(
            "https://reg.test/v2/ns/aws-provider/tags/list",
            Scope::Catalog
        ));
        let outside = Scope::Pull("other/aws-provider");
        assert!(!carries(
            "https://reg.test/v2/other/aws-provider/tags/list",
            outside
        ));
    }

    /// A token server on a loopback port that records each request head and answers a token.
    async fn token_server() -> (u16, std::sync::Arc<Mutex<Vec<String>>>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let heads = std::sync::Arc::new(Mutex::new(Vec::new()));
        let seen = std::sync::Arc::clone(&heads);
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut head = Vec::new();
                let mut buf = [0; 1024];
                while !head.ends_with(b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                seen.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&head).into_owned());
                let body = r#"{"token":"t"}"#;
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                     content-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(answer.as_bytes()).await;
            }
        });
        (port, heads)
    }

    fn with_basic(base: &str) -> Client {
        let password = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(password.path(), "s3cret").unwrap();
        Client::new(
            reqwest::Client::new(),
            None,
            Url::parse(base).unwrap(),
            "ns".into(),
            Some(BasicCredentials {
                username: "reader".into(),
                password: Secret::from_file(password.path(), "password_path").unwrap(),
            }),
            None,
            1,
        )
    }

    #[tokio::test]
    async fn basic_credentials_never_go_to_a_plain_http_realm_of_an_https_registry() {
        let (port, heads) = token_server().await;
        let challenge = |host: &str| Challenge {
            scheme: "bearer".into(),
            params: HashMap::from([("realm".into(), format!("http://{host}:{port}/token"))]),
        };
        let scope = || Scope::Pull("ns/aws-provider").as_string();
        // Same host as the https registry, its port or another: plain HTTP all the same.
        for base in [
            "https://127.0.0.1/".to_owned(),
            format!("https://127.0.0.1:{port}/"),
            "https://localhost/".to_owned(),
        ] {
            let refused = with_basic(&base)
                .fetch_token(&challenge("127.0.0.1"), scope())
                .await;
            assert!(matches!(refused, Err(CallError::Broken(_))), "{base}");
        }
        assert!(heads.lock().unwrap().is_empty(), "{:?}", heads.lock());

        // A plain-HTTP registry's credentials already travel in the clear to its host: its token
        // server there, on another port, gets them; another host does not.
        let plain = with_basic("http://127.0.0.1:1/");
        assert!(matches!(
            plain.fetch_token(&challenge("localhost"), scope()).await,
            Err(CallError::Broken(_))
        ));
        assert!(heads.lock().unwrap().is_empty(), "{:?}", heads.lock());
        plain
            .fetch_token(&challenge("127.0.0.1"), scope())
            .await
            .unwrap();
        let heads = heads.lock().unwrap().clone();
        assert_eq!(heads.len(), 1);
        assert!(heads[0]
            .to_ascii_lowercase()
            .contains("authorization: basic "));
    }

    #[test]
    fn the_token_cache_is_bounded_whatever_scopes_are_asked_for() {
        let mut cache = TokenCache::default();
        let now = Instant::now();
        let value = HeaderValue::from_static("Bearer t");
        for i in 0..(MAX_TOKENS + 500) {
            cache.insert(
                format!("repository:ns/x{i}-provider:pull"),
                value.clone(),
                300 + i as u64,
                now,
            );
        }
        assert_eq!(cache.tokens.len(), MAX_TOKENS);
        let newest = format!("repository:ns/x{}-provider:pull", MAX_TOKENS + 499);
        assert!(cache.get(&newest, now).is_some());
        assert!(cache.get("repository:ns/x0-provider:pull", now).is_none());
    }

    #[test]
    fn tokens_expire_shortly_before_their_lifetime() {
        let mut cache = TokenCache::default();
        let t0 = Instant::now();
        let value = HeaderValue::from_static("Bearer abc");
        cache.insert("s".into(), value.clone(), 60, t0);
        assert_eq!(cache.get("s", t0 + Duration::from_secs(53)), Some(value));
        assert_eq!(cache.get("s", t0 + Duration::from_secs(54)), None);
        assert_eq!(cache.get("other", t0), None);
        cache.insert("short".into(), HeaderValue::from_static("x"), 2, t0);
        assert!(cache.get("short", t0).is_some());
        assert!(cache.get("short", t0 + Duration::from_secs(1)).is_none());
    }
}
