//! One function per route: validate the rest of the request, ask the registry, render JSON
//! or stream the artifact.

use std::fmt::Write;
use std::ops::Range;
use std::sync::Arc;

use http::header::{
    HeaderValue, ACCEPT_RANGES, CACHE_CONTROL, CONTENT_DISPOSITION, CONTENT_LENGTH, CONTENT_RANGE,
    CONTENT_TYPE, ETAG, X_CONTENT_TYPE_OPTIONS,
};
use http::{Response, StatusCode};
use serde::Serialize;

use crate::api::openapi;
use crate::api::query::Query;
use crate::api::representation::{self, Keep, MemoStats, Rendered};
use crate::api::resolve::Filter;
use crate::api::{Params, Route, Shared};
use crate::body::{self, Body};
use crate::error::ApiError;
use crate::middleware::cache::CacheStats;
use crate::registry::{
    download_etag, search, sha256_digest, Artifact, BackendRequest, BackendResponse, ByteRange,
    ExtensionKey, ExtensionName, ExtensionType, ListFilter, RegistryError, Served, SourceSelector,
    VersionSelector,
};

/// Most items a listing or search returns at once.
const MAX_LIMIT: usize = 1000;
/// Longest search query, in characters.
const MAX_QUERY_CHARS: usize = 256;

/// One request being handled.
pub struct Call<'a> {
    pub shared: &'a Shared,
    pub params: Params<'a>,
    pub query: Option<&'a str>,
    /// A HEAD request: a download is answered from metadata, without opening its stream.
    pub head: bool,
    /// The byte range a download asks for (see `api::range`); `None` for the whole.
    pub range: Option<ByteRange>,
}

/// Serialises a value the API shows. These values always serialise.
pub(super) fn to_json<T: Serialize + ?Sized>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_default()
}

/// A value rendered for the memo, without a total.
pub(super) fn rendered<T: Serialize + ?Sized>(value: &T) -> Rendered {
    Rendered {
        json: to_json(value),
        total: None,
    }
}

/// The body of `/api/v1/cache/stats`: the caches' counts and the rendered-answer memo's.
#[derive(Serialize)]
struct Stats {
    #[serde(flatten)]
    caches: CacheStats,
    #[serde(flatten)]
    rendered: MemoStats,
}

/// The `Cache-Control` of fresh cacheable answers, built once: `public, max-age=<max_age>`.
pub fn cache_control(max_age: std::time::Duration) -> HeaderValue {
    HeaderValue::try_from(format!("public, max-age={}", max_age.as_secs()))
        .unwrap_or_else(|_| HeaderValue::from_static("no-cache"))
}

/// Room for a memo key in its first allocation.
const MEMO_KEY_CAPACITY: usize = 128;

/// A memo key of the rendered answers, built in one allocation: what is answered, then each
/// part after a space. Written piece by piece rather than formatted: on a cached GET,
/// formatting the key cost about as much as the rest of the handler's own work.
pub(super) struct MemoKey(String);

impl MemoKey {
    pub(super) fn new(answer: &'static str) -> Self {
        let mut key = String::with_capacity(MEMO_KEY_CAPACITY);
        key.push_str(answer);
        Self(key)
    }

    /// A part without spaces, or the last part.
    pub(super) fn part(mut self, part: &str) -> Self {
        self.0.push(' ');
        self.0.push_str(part);
        self
    }

    /// A number, as `Debug` would write it, without the formatting machinery.
    pub(super) fn number(mut self, n: usize) -> Self {
        self.0.push(' ');
        self.0.push_str(itoa::Buffer::new().format(n));
        self
    }

    /// A page of items, as `Debug` would write the range.
    pub(super) fn page(self, page: &Range<usize>) -> Self {
        let mut key = self.number(page.start);
        key.0.push_str("..");
        key.0.push_str(itoa::Buffer::new().format(page.end));
        key
    }

    /// A part as `Debug` writes it.
    pub(super) fn debug(mut self, part: &impl std::fmt::Debug) -> Self {
        // Writing into a `String` cannot fail.
        let _ = write!(self.0, " {part:?}");
        self
    }

    pub(super) fn extension(mut self, key: &ExtensionKey) -> Self {
        self.0.push(' ');
        self.0.push_str(key.ty.as_str());
        self.0.push('/');
        self.0.push_str(key.name.as_str());
        self
    }

    /// `*` for any type.
    pub(super) fn ty(self, ty: Option<ExtensionType>) -> Self {
        self.part(ty.map_or("*", ExtensionType::as_str))
    }

    /// `*` for any source; a pinned one as `Debug` writes it, which quotes instance names.
    pub(super) fn source(self, source: &Option<SourceSelector>) -> Self {
        match source {
            None => self.part("*"),
            Some(selector) => self.debug(selector),
        }
    }

    pub(super) fn into_string(self) -> String {
        self.0
    }
}

/// Renders a JSON answer; `Content-Length` is set so HEAD answers carry it too.
pub fn json<T: Serialize + ?Sized>(status: StatusCode, value: &T) -> Response<Body> {
    let bytes = to_json(value);
    let mut response = Response::new(body::empty());
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(CONTENT_LENGTH, HeaderValue::from(bytes.len()));
    *response.body_mut() = body::full(bytes);
    response
}

impl Call<'_> {
    pub async fn handle(self, route: Route) -> Result<Response<Body>, ApiError> {
        let query = Query::parse(self.query)?;
        match route {
            Route::List => self.list(&query).await,
            Route::Search => self.search(&query).await,
            Route::Get => self.get(&query).await,
            Route::Versions => self.versions(&query).await,
            Route::Download => self
                .download(&query)
                .await
                .map_err(|e| self.version_not_found(e)),
            Route::Resolve => self.resolve(&query).await,
            // Answered by the router, which hands these handlers the request body.
            Route::ResolveBatch | Route::HookGitea | Route::HookOci | Route::CachePurge => {
                Err(ApiError::internal())
            }
            Route::Health => Ok(self.shared.health.health_response().await),
            Route::Livez => Ok(json(
                StatusCode::OK,
                &serde_json::json!({"status": "alive"}),
            )),
            Route::Readyz => Ok(self.shared.health.ready_response().await),
            Route::Metrics => Ok(self.metrics()),
            Route::CacheStats => Ok(self.stats()),
            Route::OpenApi => Ok(openapi::response(&self.shared.openapi)),
        }
    }

    /// A download's "not found" names the version asked for (`provider/aws 9.9.9 not found`):
    /// the backends only know that nothing matched.
    fn version_not_found(&self, error: ApiError) -> ApiError {
        if error.status != StatusCode::NOT_FOUND {
            return error;
        }
        match (self.key(), self.params.version()) {
            (Ok(key), Ok(version)) => ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("{key} {version} not found"),
            ),
            _ => error,
        }
    }

    pub(super) fn key(&self) -> Result<ExtensionKey, ApiError> {
        let ty = self.params.ty()?.parse::<ExtensionType>()?;
        let name = ExtensionName::parse(&self.params.name()?)?;
        Ok(ExtensionKey { ty, name })
    }

    /// The answer, and whether it is stale.
    pub(super) async fn ask(
        &self,
        req: BackendRequest,
    ) -> Result<(BackendResponse, Stale), ApiError> {
        let response = self.shared.registry.ask(req).await?;
        let stale = response.is_stale().then(|| response.stale_error().cloned());
        Ok((response, stale))
    }

    /// Marks an answer as cacheable by clients and intermediaries for the cache TTL; a stale
    /// answer says so and must be revalidated, so downstream caches do not keep it longer.
    pub(super) fn cacheable(&self, mut response: Response<Body>, stale: Stale) -> Response<Body> {
        let headers = response.headers_mut();
        let cache_control = match stale {
            Some(_) => HeaderValue::from_static("public, max-age=0"),
            None => self.shared.cache_control.clone(),
        };
        headers.insert(CACHE_CONTROL, cache_control);
        if let Some(error) = stale {
            if let Ok(v) = HeaderValue::from_str(&stale_cache_status(error.as_ref())) {
                headers.insert("cache-status", v);
            }
        }
        response
    }

    /// The JSON 200 answer rendered from `value`, from the memo when the answer named `key`
    /// was last rendered from the same value. `key` is built from the validated parameters,
    /// so spellings of one request that differ in ignored parameters share one rendering.
    pub(super) fn represent<T: std::any::Any + Send + Sync>(
        &self,
        key: MemoKey,
        keep: Keep,
        value: &Arc<T>,
        render: impl FnOnce(&T) -> Rendered,
    ) -> Response<Body> {
        self.shared
            .renderings
            .respond(key.into_string(), keep, value, render)
    }

    async fn listing(
        &self,
        ty: Option<ExtensionType>,
        source: Option<SourceSelector>,
    ) -> Result<(Arc<Vec<crate::registry::Extension>>, Stale), ApiError> {
        let (response, stale) = self
            .ask(BackendRequest::List(ListFilter { ty, source }))
            .await?;
        Ok((response.into_list()?, stale))
    }

    /// `source=`: a backend kind or a configured instance's name.
    pub(super) fn source(&self, query: &Query<'_>) -> Result<Option<SourceSelector>, ApiError> {
        let sources = &self.shared.sources;
        Ok(query.parsed("source", |text| sources.selector(text))?)
    }

    async fn list(&self, query: &Query<'_>) -> Result<Response<Body>, ApiError> {
        let ty = query.parsed("type", str::parse::<ExtensionType>)?;
        let source = self.source(query)?;
        let limit = query.int("limit", 100, 0, MAX_LIMIT)?;
        let offset = query.int("offset", 0, 0, u32::MAX as usize)?;
        let (all, stale) = self.listing(ty, source.clone()).await?;
        // Keyed by the items the page holds, not by how it was asked for: every empty page
        // (past the end, `limit=0`) is one entry, and so is every spelling of a last page.
        let total = all.len();
        let page = offset.min(total)..offset.saturating_add(limit).min(total);
        let key = match page.is_empty() {
            true => MemoKey::new("list").ty(ty).source(&source).part("empty"),
            false => MemoKey::new("list").ty(ty).source(&source).page(&page),
        };
        let response = self.represent(key, Keep::Always, &all, |all| Rendered {
            json: to_json(&all[page]),
            total: Some(total),
        });
        Ok(self.cacheable(response, stale))
    }

    async fn search(&self, query: &Query<'_>) -> Result<Response<Body>, ApiError> {
        let q = query.get("q").unwrap_or_default();
        let chars = q.chars().count();
        if chars == 0 || chars > MAX_QUERY_CHARS {
            return Err(ApiError::invalid_parameter(
                "q",
                format!("is required and must be 1 to {MAX_QUERY_CHARS} characters"),
            ));
        }
        let ty = query.parsed("type", str::parse::<ExtensionType>)?;
        let limit = query.int("limit", 50, 0, MAX_LIMIT)?;
        let (all, stale) = self.listing(ty, None).await?;
        let key = MemoKey::new("search").ty(ty).number(limit).part(q);
        let response = self.represent(key, Keep::FromSecondAsk, &all, |all| {
            rendered(&search(all, q, limit))
        });
        Ok(self.cacheable(response, stale))
    }

    async fn get(&self, query: &Query<'_>) -> Result<Response<Body>, ApiError> {
        let key = self.key()?;
        let source = self.source(query)?;
        let memo = MemoKey::new("get").extension(&key).source(&source);
        let (response, stale) = self.ask(BackendRequest::Get { key, source }).await?;
        let extension = response.into_extension()?;
        let response = self.represent(memo, Keep::Always, &extension, rendered);
        Ok(self.cacheable(response, stale))
    }

    async fn versions(&self, query: &Query<'_>) -> Result<Response<Body>, ApiError> {
        let key = self.key()?;
        let source = self.source(query)?;
        let filter = Filter::from_query(query)?;
        let memo = MemoKey::new("versions").extension(&key).source(&source);
        let memo = match &filter {
            Some(filter) => filter.memo_key(memo),
            None => memo,
        };
        let (response, stale) = self.ask(BackendRequest::Versions { key, source }).await?;
        let versions = response.into_versions()?;
        let response = self.represent(memo, Keep::Always, &versions, |all| match &filter {
            Some(filter) => rendered(&filter.select(all)),
            None => rendered(all),
        });
        Ok(self.cacheable(response, stale))
    }

    async fn download(&self, query: &Query<'_>) -> Result<Response<Body>, ApiError> {
        let key = self.key()?;
        let version = VersionSelector::parse(&self.params.version()?)?;
        let source = self.source(query)?;
        let request = if self.head {
            BackendRequest::DownloadHead {
                key,
                version,
                source,
            }
        } else {
            BackendRequest::Download {
                key,
                version,
                source,
                range: self.range.clone(),
            }
        };
        let (response, _) = self.ask(request).await?;
        Ok(artifact_response(response.into_artifact()?))
    }

    fn stats(&self) -> Response<Body> {
        let stats = Stats {
            caches: self.shared.caches.stats(),
            rendered: self.shared.renderings.stats(),
        };
        json(StatusCode::OK, &stats)
    }

    fn metrics(&self) -> Response<Body> {
        let rendering = self
            .shared
            .metrics
            .current(|| self.shared.caches.record_entries());
        let mut response = representation::response(&rendering, None);
        response.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        );
        response
    }
}

/// Whether an answer is stale, and why: `Some(Some(error))` when it stands in for a backend
/// failure, `Some(None)` when it is served while a refresh runs, `None` when fresh.
type Stale = Option<Option<RegistryError>>;

/// The RFC 9211 `Cache-Status` of an answer served stale (`fwd=stale`): while a refresh runs,
/// or because the backends failed with `fwd-status` and the kept answer was served. `detail`
/// is an sf-string: printable ASCII with `"` and `\` escaped.
fn stale_cache_status(error: Option<&RegistryError>) -> String {
    let Some(error) = error else {
        return "extension-registry; fwd=stale".to_owned();
    };
    let status = ApiError::from(error.clone()).status.as_u16();
    let mut detail = String::new();
    for c in error.to_string().chars() {
        match c {
            '"' | '\\' => {
                detail.push('\\');
                detail.push(c);
            }
            ' '..='~' => detail.push(c),
            _ => detail.push('?'),
        }
    }
    format!("extension-registry; fwd=stale; fwd-status={status}; detail=\"{detail}\"")
}

/// The streamed download response (or, for HEAD, its head alone): 200 with the whole
/// artifact, 206 with the one range served (`Content-Range`), or 416 when the range lies past
/// the end. `Accept-Ranges`, the strong `ETag` `If-Range` is checked against and `Repr-Digest`
/// (RFC 9530; of the whole artifact, also on a 206) come with each answer that has them;
/// `Content-Length` is the body's, from the backend's metadata.
fn artifact_response(artifact: Artifact) -> Response<Body> {
    let etag = artifact.checksum.as_deref().and_then(download_etag);
    let mut response = match artifact.served {
        Served::Unsatisfiable { size } => {
            let mut response = ApiError::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "range_not_satisfiable",
                format!("the range asked for starts past the end of the {size}-byte artifact"),
            )
            .into_response();
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                response.headers_mut().insert(CONTENT_RANGE, v);
            }
            response
        }
        Served::Whole | Served::Part(_) => {
            let mut response = Response::new(artifact.body);
            let headers = response.headers_mut();
            headers.insert(
                CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            headers.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
            let filename = safe_filename(&artifact.filename);
            if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{filename}\"")) {
                headers.insert(CONTENT_DISPOSITION, v);
            }
            if let Some(len) = artifact.content_length {
                headers.insert(CONTENT_LENGTH, HeaderValue::from(len));
            }
            if let Some(digest) = artifact.checksum.as_deref().and_then(repr_digest) {
                headers.insert("repr-digest", digest);
            }
            if let Served::Part(span) = artifact.served {
                *response.status_mut() = StatusCode::PARTIAL_CONTENT;
                if let Ok(v) = HeaderValue::from_str(&span.content_range()) {
                    response.headers_mut().insert(CONTENT_RANGE, v);
                }
            }
            response
        }
    };
    let headers = response.headers_mut();
    headers.insert(ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if let Some(v) = etag.and_then(|e| HeaderValue::from_str(&e).ok()) {
        headers.insert(ETAG, v);
    }
    response
}

/// A file name safe inside a quoted `Content-Disposition` parameter.
fn safe_filename(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-+".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// `sha-256=:<base64>:` for a `sha256:<hex>` checksum.
fn repr_digest(checksum: &str) -> Option<HeaderValue> {
    use base64::Engine;
    let digest = sha256_digest(checksum)?;
    let encoded = base64::engine::general_purpose::STANDARD.encode(digest);
    HeaderValue::from_str(&format!("sha-256=:{encoded}:")).ok()
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::registry::{Instance, Source};

    fn get(key: &ExtensionKey, source: &Option<SourceSelector>) -> String {
        MemoKey::new("get")
            .extension(key)
            .source(source)
            .into_string()
    }

    #[test]
    fn memo_keys_tell_apart_answers_that_differ() {
        let aws = ExtensionKey {
            ty: ExtensionType::Provider,
            name: ExtensionName::parse("aws").expect("valid name"),
        };
        let aws_taskserv = ExtensionKey {
            ty: ExtensionType::Taskserv,
            ..aws.clone()
        };
        let named = |name: &str| {
            Some(SourceSelector::Instance(Instance {
                kind: Source::Gitea,
                name: name.into(),
            }))
        };
        let list = |ty, source: &Option<SourceSelector>, page: std::ops::Range<usize>| {
            MemoKey::new("list")
                .ty(ty)
                .source(source)
                .page(&page)
                .into_string()
        };
        let keys = [
            get(&aws, &None),
            get(&aws_taskserv, &None),
            get(&aws, &Some(SourceSelector::Kind(Source::Gitea))),
            get(&aws, &named("gitea")),
            get(&aws, &named("*")),
            get(&aws, &named("a b")),
            list(None, &None, 0..100),
            list(None, &None, 0..10),
            list(Some(ExtensionType::Provider), &None, 0..100),
            list(None, &named("a"), 0..100),
            MemoKey::new("list")
                .ty(None)
                .source(&None)
                .part("empty")
                .into_string(),
        ];
        let distinct: HashSet<&String> = keys.iter().collect();
        assert_eq!(distinct.len(), keys.len(), "{keys:#?}");
        assert_eq!(get(&aws, &None), "get provider/aws *");
    }

    #[test]
    fn memo_keys_write_numbers_and_pages_as_debug_does() {
        for (n, page) in [(0, 0..0), (7, 3..10), (usize::MAX, 100..usize::MAX)] {
            assert_eq!(
                MemoKey::new("k").number(n).page(&page).into_string(),
                format!("k {n:?} {page:?}")
            );
        }
    }

    #[test]
    fn memo_keys_of_versions_and_searches_tell_apart_their_filters() {
        let aws = ExtensionKey {
            ty: ExtensionType::Provider,
            name: ExtensionName::parse("aws").expect("valid name"),
        };
        let versions = |query: Option<&str>| {
            let query = Query::parse(query).expect("valid query");
            let key = MemoKey::new("versions").extension(&aws).source(&None);
            match Filter::from_query(&query).expect("valid filter") {
                Some(filter) => filter.memo_key(key),
                None => key,
            }
            .into_string()
        };
        let search = |limit: usize, q: &str| {
            MemoKey::new("search")
                .ty(None)
                .number(limit)
                .part(q)
                .into_string()
        };
        let keys = [
            versions(None),
            versions(Some("constraint=%5E1")),
            versions(Some("constraint=%5E1&prerelease=true")),
            versions(Some("constraint=%3E%3D1%20%3C2")),
            search(5, "a b"),
            search(5, "a"),
            search(50, "b"),
        ];
        let distinct: HashSet<&String> = keys.iter().collect();
        assert_eq!(distinct.len(), keys.len(), "{keys:#?}");
    }
}
