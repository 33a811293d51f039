//! The OCI registry backend: extensions are artifacts in `{namespace}/{name}-{type}`
//! repositories, tags are versions, manifest annotations are metadata and one gzip layer is
//! the `.tar.gz`. This module owns the mapping onto the backend vocabulary; `client` owns the
//! HTTP and auth flow, `model` the JSON shapes and naming rules.

mod client;
mod model;

/// The extension a repository under the namespace holds, by the naming convention.
pub use self::model::extension_of;

use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::stream::{self, StreamExt};
use reqwest::{Method, Url};
use sha2::{Digest, Sha256};

use crate::backend::direct::{Direct, OWN_CONNECTION_FROM};
use crate::backend::http;
use crate::config::{ConfigError, OciConfig, Secret};
use crate::registry::{
    select, version, Artifact, BackendFuture, BackendHealth, BackendRequest, BackendResponse,
    ByteRange, Extension, ExtensionInfo, ExtensionKey, HealthReport, ListFilter, RegistryError,
    Served, Source, Span, VerifyingBody, Version, VersionSelector, VersionTag,
};

use self::client::{BasicCredentials, CallError, Client, Scope};
use self::model::{
    is_sha256_digest, is_valid_repository, is_version_tag, repository_of, Catalog, Descriptor,
    ManifestDoc, ManifestMetadata, TagList, MANIFEST_ACCEPT,
};

/// Catalog page size asked for: distribution's maximum (`n` above 1000 is a 400).
pub const CATALOG_PAGE: usize = 1000;

/// Bytes of parsed manifests remembered by digest (each weighed by [`ManifestDoc::weight`]).
/// They never change, so this only bounds memory: a registry can hand out manifests of up to
/// 16 MiB, and a count alone would let a few thousand of them hold gigabytes.
pub const MANIFEST_MEMO_BYTES: u64 = 32 * 1024 * 1024;

/// Rounds of tags tried for an extension's current version when the highest cannot be read
/// (see `OciBackend::current_in`): bounds the manifests one lookup asks for.
const CURRENT_ROUNDS: usize = 4;

/// The repository prefix extensions live under, as configured less any outer `/`.
pub fn namespace_of(config: &OciConfig) -> String {
    config.namespace.trim_matches('/').to_owned()
}

/// The OCI backend as a tower service; clones share one client, token cache and manifest cache.
#[derive(Clone)]
pub struct OciBackend {
    /// Shared by every clone the stack makes, so caches and the concurrency bound are too.
    inner: Arc<Inner>,
}

struct Inner {
    /// The registry, its credentials and token cache.
    client: Client,
    /// The repository prefix extensions live under.
    namespace: String,
    /// Repositories to list when the registry refuses `_catalog`.
    repositories: Option<Vec<String>>,
    /// Repositories (and tags within one) asked about at once.
    max_concurrency: usize,
    /// `n` of each catalog request.
    catalog_page: usize,
    /// Parsed image manifests by the digest a tag pointed at (for an index, its resolved
    /// first manifest): a known digest costs one `HEAD` instead of a `GET`.
    manifests: moka::future::Cache<String, Arc<ManifestDoc>>,
}

/// One tag resolved through its manifest.
struct Resolved {
    /// The version as listed.
    version: Version,
    /// The descriptive fields, for the extension when this is its current version.
    meta: ManifestMetadata,
    /// The blob a download streams and verifies.
    layer: Descriptor,
}

impl OciBackend {
    /// Builds the backend from `[oci]`, reading the secret files.
    pub fn new(config: &OciConfig) -> Result<Self, ConfigError> {
        Self::with_catalog_page(config, CATALOG_PAGE)
    }

    /// Like [`OciBackend::new`] with another catalog page size, so paging can be exercised
    /// without a thousand repositories.
    pub fn with_catalog_page(config: &OciConfig, catalog_page: usize) -> Result<Self, ConfigError> {
        let err = |message: String| ConfigError {
            file: "[oci]".into(),
            message,
        };
        let base = base_url(&config.registry, config.insecure).map_err(err)?;
        let namespace = namespace_of(config);
        if !is_valid_repository(&namespace) {
            return Err(err(format!(
                "namespace: '{namespace}' is not a valid OCI repository path \
                 (lowercase letters, digits, '.', '_', '-', components separated by '/')"
            )));
        }
        let basic = match (&config.username, &config.password_path) {
            (Some(username), Some(path)) => Some(BasicCredentials {
                username: username.clone(),
                password: Secret::from_file(path, "[oci] password_path")?,
            }),
            _ => None,
        };
        let static_token = match config.auth_token_path.as_deref() {
            Some(path) => {
                let token = Secret::from_file(path, "[oci] auth_token_path")?;
                if reqwest::header::HeaderValue::from_str(token.expose()).is_err() {
                    return Err(ConfigError {
                        file: path.display().to_string(),
                        message: "the token holds characters not allowed in a header".into(),
                    });
                }
                Some(token)
            }
            None => None,
        };
        // The client follows a blob's redirect to storage itself, without the credentials.
        let http = http::client(
            "[oci]",
            Duration::from_secs(config.timeout_seconds),
            config.verify_ssl,
        )?;
        let direct = Direct::new(
            Duration::from_secs(config.timeout_seconds),
            config.verify_ssl,
        );
        let max_concurrency = config.max_concurrency.max(1);
        Ok(Self {
            inner: Arc::new(Inner {
                client: Client::new(
                    http,
                    direct,
                    base,
                    namespace.clone(),
                    basic,
                    static_token,
                    max_concurrency,
                ),
                namespace,
                repositories: config.repositories.clone(),
                max_concurrency,
                catalog_page: catalog_page.max(1),
                manifests: manifest_memo(MANIFEST_MEMO_BYTES),
            }),
        })
    }
}

/// The memo of parsed manifests by digest, holding at most `bytes` of them by weight.
fn manifest_memo(bytes: u64) -> moka::future::Cache<String, Arc<ManifestDoc>> {
    moka::future::Cache::builder()
        .max_capacity(bytes)
        .weigher(|digest: &String, doc: &Arc<ManifestDoc>| {
            u32::try_from(digest.len() + doc.weight()).unwrap_or(u32::MAX)
        })
        .build()
}

/// The registry's base URL: an explicit scheme is kept; a bare `host[:port]` is HTTPS unless
/// `insecure` is set or the host is loopback, which is plain HTTP (as Docker treats it).
fn base_url(registry: &str, insecure: bool) -> Result<Url, String> {
    let registry = registry.trim().trim_end_matches('/');
    let with_scheme = if registry.starts_with("http://") || registry.starts_with("https://") {
        registry.to_owned()
    } else {
        let host = registry.rsplit_once(':').map_or(registry, |(h, _)| h);
        let loopback = host == "localhost"
            || host
                .trim_matches(['[', ']'])
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        let scheme = if insecure || loopback {
            "http"
        } else {
            "https"
        };
        format!("{scheme}://{registry}")
    };
    let url = Url::parse(&with_scheme).map_err(|e| {
        format!(
            "registry: '{}' is not host[:port] or an http(s) URL ({e})",
            crate::config::redacted(registry)
        )
    })?;
    if url.host_str().is_none() || url.path() != "/" || url.query().is_some() {
        return Err(format!(
            "registry: '{}' must be host[:port] or scheme://host[:port], without a path",
            crate::config::redacted(registry)
        ));
    }
    Ok(url)
}

impl Inner {
    async fn handle(&self, request: BackendRequest) -> Result<BackendResponse, RegistryError> {
        match request {
            BackendRequest::List(filter) => self
                .list(&filter)
                .await
                .map(|l| BackendResponse::List(Arc::new(l))),
            BackendRequest::Get { key, .. } => {
                let (extension, _) = self.current(&key).await?;
                Ok(BackendResponse::Extension(Arc::new(extension)))
            }
            BackendRequest::Versions { key, .. } => {
                let repo = self.repository(&key)?;
                let mut versions: Vec<Version> = self
                    .resolve_all(&repo, &key)
                    .await?
                    .into_iter()
                    .map(|r| r.version)
                    .collect();
                version::sort_newest_first(&mut versions);
                Ok(BackendResponse::Versions(Arc::new(versions)))
            }
            BackendRequest::Download {
                key,
                version,
                range,
                ..
            } => self
                .download(&key, &version, Some(range))
                .await
                .map(BackendResponse::Artifact),
            BackendRequest::DownloadHead { key, version, .. } => self
                .download(&key, &version, None)
                .await
                .map(BackendResponse::Artifact),
            BackendRequest::Health => Ok(BackendResponse::Health(HealthReport(vec![
                self.health().await,
            ]))),
        }
    }

    fn repository(&self, key: &ExtensionKey) -> Result<String, RegistryError> {
        repository_of(&self.namespace, key).ok_or_else(|| RegistryError::not_found(key))
    }

    async fn health(&self) -> BackendHealth {
        let outcome = self.client.ping().await;
        BackendHealth {
            source: Source::Oci,
            healthy: outcome.is_ok(),
            detail: outcome.err(),
        }
    }

    /// Every extension at its current version. Repositories that fail are left out (and
    /// logged), unless the registry as a whole fails or every repository did.
    async fn list(&self, filter: &ListFilter) -> Result<Vec<Extension>, RegistryError> {
        let keys: Vec<(ExtensionKey, String)> = self
            .repositories()
            .await?
            .into_iter()
            .filter_map(|repo| Some((extension_of(&self.namespace, &repo)?, repo)))
            .filter(|(key, _)| filter.ty.is_none_or(|ty| ty == key.ty))
            .collect();
        let results = self
            .fan_out(keys, |(key, repo)| async move {
                self.current_in(&key, &repo).await
            })
            .await;
        let mut extensions = Vec::new();
        let mut first_failure = None;
        for ((key, _), outcome) in results {
            match outcome {
                Ok(Some((extension, _))) => extensions.push(extension),
                Ok(None) | Err(CallError::NotFound) => {}
                Err(CallError::Fatal(e)) => return Err(e),
                Err(failure) => {
                    let e = registry_error(failure, &key);
                    tracing::warn!(extension = %key, error = %e, "OCI repository left out of the list");
                    first_failure.get_or_insert(e);
                }
            }
        }
        match first_failure {
            Some(e) if extensions.is_empty() => Err(e),
            _ => Ok(extensions),
        }
    }

    /// Runs `call` over `items`, at most `max_concurrency` at once, pairing each item with
    /// its outcome.
    async fn fan_out<T: Clone, R, F: Future<Output = R>>(
        &self,
        items: Vec<T>,
        call: impl Fn(T) -> F,
    ) -> Vec<(T, R)> {
        stream::iter(items)
            .map(|item| {
                let outcome = call(item.clone());
                async move { (item, outcome.await) }
            })
            .buffer_unordered(self.max_concurrency)
            .collect()
            .await
    }

    /// The repositories to consider: the catalog, or the configured list when the catalog is
    /// refused.
    async fn repositories(&self) -> Result<Vec<String>, RegistryError> {
        let refusal = match self.catalog().await {
            Ok(repos) => return Ok(repos),
            Err(CallError::Denied) => "refused",
            Err(CallError::NotFound) => "not offered (404)",
            Err(CallError::Broken(e) | CallError::Fatal(e)) => return Err(e),
        };
        match &self.repositories {
            Some(configured) => Ok(configured
                .iter()
                .map(|r| {
                    if r.contains('/') {
                        r.clone()
                    } else {
                        format!("{}/{r}", self.namespace)
                    }
                })
                .collect()),
            None => Err(RegistryError::unavailable(
                Source::Oci,
                format!(
                    "the registry's catalog (/v2/_catalog) is {refusal} and [oci] repositories \
                     is not set; list the repositories there"
                ),
            )),
        }
    }

    async fn catalog(&self) -> Result<Vec<String>, CallError> {
        let first = self.client.catalog_url(self.catalog_page);
        self.client
            .get_paged(first, Scope::Catalog, "catalog", |page: Catalog| {
                page.repositories.unwrap_or_default()
            })
            .await
    }

    /// The version tags of a repository (not `latest`, not digest-like, valid tags only).
    async fn tags(&self, repo: &str) -> Result<Vec<VersionTag>, CallError> {
        let first = self.client.url(repo, &["tags", "list"]);
        self.client
            .get_paged(first, Scope::Pull(repo), "tag list", |page: TagList| {
                page.tags
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|t| is_version_tag(t))
                    .filter_map(|t| VersionTag::parse(&t).ok())
                    .collect()
            })
            .await
    }

    async fn current(&self, key: &ExtensionKey) -> Result<(Extension, Resolved), RegistryError> {
        let repo = self.repository(key)?;
        match self.current_in(key, &repo).await {
            Ok(Some(found)) => Ok(found),
            Ok(None) => Err(RegistryError::not_found(key)),
            Err(e) => Err(self.lookup_error(e, key, &repo).await),
        }
    }

    /// The domain error for a failed lookup of `key` in `repo`. A refusal is a 404 when `repo`
    /// is absent from the catalog (or the configured list): registries like GHCR answer 401 for
    /// a repository that does not exist, even to a valid token. When the list cannot be read
    /// either, the refusal stands.
    async fn lookup_error(&self, e: CallError, key: &ExtensionKey, repo: &str) -> RegistryError {
        if matches!(e, CallError::Denied) {
            if let Ok(known) = self.repositories().await {
                if !known.iter().any(|r| r == repo) {
                    return RegistryError::not_found(key);
                }
            }
        }
        registry_error(e, key)
    }

    /// The extension at its current version. Only the tags that can be current are resolved:
    /// with semver tags, those equal to the highest (stable first); else every tag, as then
    /// the publication time decides. When none of them can be read (a tag listed before its
    /// manifest, as while a push settles, or one without an artifact), the next highest are
    /// tried, [`CURRENT_ROUNDS`] times at most: an extension with older versions is never
    /// reported missing for its newest tag alone.
    async fn current_in(
        &self,
        key: &ExtensionKey,
        repo: &str,
    ) -> Result<Option<(Extension, Resolved)>, CallError> {
        let mut tags = self.tags(repo).await?;
        let mut resolved = Vec::new();
        for _ in 0..CURRENT_ROUNDS {
            let candidates = current_candidates(&tags);
            if candidates.is_empty() {
                break;
            }
            tags.retain(|tag| !candidates.contains(tag));
            resolved = self.resolve_tags(repo, key, candidates).await?;
            if !resolved.is_empty() {
                break;
            }
        }
        let versions: Vec<Version> = resolved.iter().map(|r| r.version.clone()).collect();
        let Some(current) = version::current(&versions) else {
            return Ok(None);
        };
        let current_tag = current.version.clone();
        let Some(resolved) = resolved
            .into_iter()
            .find(|r| r.version.version == current_tag)
        else {
            return Ok(None);
        };
        let info = ExtensionInfo {
            description: resolved.meta.description.clone(),
            author: resolved.meta.author.clone(),
            repository: resolved
                .meta
                .repository
                .clone()
                .unwrap_or_else(|| format!("{}/{repo}", self.client.host())),
            tags: Vec::new(),
        };
        let extension = Extension::new(key, Source::Oci, info, &resolved.version);
        Ok(Some((extension, resolved)))
    }

    async fn resolve_all(
        &self,
        repo: &str,
        key: &ExtensionKey,
    ) -> Result<Vec<Resolved>, RegistryError> {
        let outcome = match self.tags(repo).await {
            Ok(tags) => self.resolve_tags(repo, key, tags).await,
            Err(e) => Err(e),
        };
        match outcome {
            Ok(resolved) => Ok(resolved),
            Err(e) => Err(self.lookup_error(e, key, repo).await),
        }
    }

    /// Resolves tags concurrently. A tag whose manifest is broken or holds no artifact layer
    /// is left out (and logged); registry-wide failures end the whole call.
    async fn resolve_tags(
        &self,
        repo: &str,
        key: &ExtensionKey,
        tags: Vec<VersionTag>,
    ) -> Result<Vec<Resolved>, CallError> {
        let results = self
            .fan_out(tags, |tag| async move { self.resolve(repo, &tag).await })
            .await;
        let mut resolved = Vec::new();
        let mut broken = None;
        for (tag, outcome) in results {
            match outcome {
                Ok(Some(r)) => resolved.push(r),
                Ok(None) => {
                    tracing::warn!(extension = %key, %tag, "OCI manifest has no .tar.gz layer; tag left out");
                }
                Err(CallError::NotFound) => {}
                Err(e @ (CallError::Fatal(_) | CallError::Denied)) => return Err(e),
                Err(CallError::Broken(e)) => {
                    tracing::warn!(extension = %key, %tag, error = %e, "OCI tag left out");
                    broken.get_or_insert(e);
                }
            }
        }
        // When nothing could be read, say why rather than claim there is nothing.
        match broken {
            Some(e) if resolved.is_empty() => Err(CallError::Broken(e)),
            _ => Ok(resolved),
        }
    }

    /// A tag's version, metadata and artifact layer; `None` when its manifest has no artifact.
    async fn resolve(&self, repo: &str, tag: &VersionTag) -> Result<Option<Resolved>, CallError> {
        let manifest = self.manifest(repo, tag.as_str()).await?;
        let Some(layer) = manifest.artifact_layer().cloned() else {
            return Ok(None);
        };
        if !is_sha256_digest(&layer.digest) {
            return Err(broken(
                "artifact layer digest is not sha256:<64 hex digits>",
            ));
        }
        let meta = manifest.metadata();
        let version = Version {
            version: tag.as_str().to_owned(),
            published_at: meta.published_at,
            download_url: self.client.url(repo, &["blobs", &layer.digest]).to_string(),
            size: layer.size,
            checksum: Some(layer.digest.clone()),
        };
        Ok(Some(Resolved {
            version,
            meta,
            layer,
        }))
    }

    /// The image manifest a tag points at: `HEAD` for its digest, then the cache, else a
    /// `GET` by digest (checked against it); an index resolves to its first manifest.
    async fn manifest(&self, repo: &str, tag: &str) -> Result<Arc<ManifestDoc>, CallError> {
        let head = self
            .client
            .send(
                Method::HEAD,
                self.client.url(repo, &["manifests", tag]),
                Scope::Pull(repo),
                client::accept_header(Some(MANIFEST_ACCEPT)),
                "manifest",
            )
            .await?;
        let known = head
            .headers()
            .get("docker-content-digest")
            .and_then(|d| d.to_str().ok())
            .filter(|d| is_sha256_digest(d))
            .map(str::to_owned);
        if let Some(digest) = &known {
            if let Some(doc) = self.manifests.get(digest).await {
                return Ok(doc);
            }
        }
        // Without a digest header the manifest is fetched by tag and addressed by the hash of
        // its bytes.
        let reference = known.as_deref().unwrap_or(tag);
        let (top, digest) = self.get_manifest(repo, reference, known.as_deref()).await?;
        let doc = Arc::new(self.image_manifest(repo, top).await?);
        self.manifests.insert(digest, doc.clone()).await;
        Ok(doc)
    }

    /// An image manifest as it is; an index resolved to its first image manifest, whose
    /// missing annotations the index's fill in.
    async fn image_manifest(&self, repo: &str, doc: ManifestDoc) -> Result<ManifestDoc, CallError> {
        if !doc.is_index() {
            return Ok(doc);
        }
        let child = doc
            .manifests
            .iter()
            .find(|d| !d.media_type.contains("index") && !d.media_type.contains("list"))
            .or_else(|| doc.manifests.first())
            .ok_or_else(|| broken("empty OCI index"))?;
        if !is_sha256_digest(&child.digest) {
            return Err(broken(
                "OCI index entry digest is not sha256:<64 hex digits>",
            ));
        }
        let (mut resolved, _) = self
            .get_manifest(repo, &child.digest, Some(&child.digest))
            .await?;
        if resolved.is_index() {
            return Err(broken("OCI index nested in an index"));
        }
        for (k, v) in doc.annotations {
            resolved.annotations.entry(k).or_insert(v);
        }
        Ok(resolved)
    }

    /// GETs a manifest by tag or digest; returns it with the digest of its bytes, which must
    /// be `expected` when that is known.
    async fn get_manifest(
        &self,
        repo: &str,
        reference: &str,
        expected: Option<&str>,
    ) -> Result<(ManifestDoc, String), CallError> {
        let (body, _) = self
            .client
            .get_bytes(
                self.client.url(repo, &["manifests", reference]),
                Scope::Pull(repo),
                Some(MANIFEST_ACCEPT),
                "manifest",
            )
            .await?;
        let digest = format!("sha256:{:x}", Sha256::digest(&body));
        if expected.is_some_and(|e| e != digest) {
            return Err(broken("manifest bytes do not match their digest"));
        }
        let doc = serde_json::from_slice(&body).map_err(|e| {
            tracing::warn!(repo, reference, error = %e, "malformed manifest");
            broken("malformed manifest")
        })?;
        Ok((doc, digest))
    }

    /// Streams a version's artifact layer: whole, verified against its digest, or the range
    /// `open` holds (not verifiable); with `open` `None`, only describes it from the manifest
    /// (for HEAD). The length is the layer's size from the manifest; a blob answering another
    /// length is refused.
    async fn download(
        &self,
        key: &ExtensionKey,
        selector: &VersionSelector,
        open: Option<Option<ByteRange>>,
    ) -> Result<Artifact, RegistryError> {
        let repo = self.repository(key)?;
        let resolved = match selector {
            VersionSelector::Latest => self.current(key).await?.1,
            VersionSelector::Exact(tag) if is_version_tag(tag.as_str()) => {
                match self.resolve(&repo, tag).await {
                    Ok(found) => found.ok_or_else(|| RegistryError::not_found(key))?,
                    Err(e) => return Err(self.lookup_error(e, key, &repo).await),
                }
            }
            VersionSelector::Exact(_) => return Err(RegistryError::not_found(key)),
        };
        let version = resolved.version.version;
        let filename = filename(key, &version, &resolved.layer);
        let size = resolved.layer.size;
        let digest = resolved.layer.digest;
        let Some(range) = open else {
            return Ok(Artifact::head(filename, Some(size), Some(digest)));
        };
        let span = match select(range.as_ref(), size, Some(&digest)) {
            Served::Unsatisfiable { size } => {
                return Ok(Artifact::unsatisfiable(filename, size, Some(digest)))
            }
            Served::Whole => None,
            Served::Part(span) => Some(span),
        };
        let (response, served) = http::open_range(Source::Oci, span, |span| {
            let length = span.map_or(size, |s| s.length());
            self.blob(&repo, &digest, span, length >= OWN_CONNECTION_FROM, key)
        })
        .await?;
        let Served::Part(span) = served else {
            if response.content_length().is_some_and(|len| len != size) {
                return Err(RegistryError::unavailable(
                    Source::Oci,
                    "blob length differs from the layer size in the manifest",
                ));
            }
            let what = format!("{key} {version}");
            let body = http::stream_body(response);
            let body = VerifyingBody::new(body, &digest, Source::Oci, what).ok_or_else(|| {
                RegistryError::unavailable(Source::Oci, "artifact layer digest is not sha256")
            })?;
            return Ok(Artifact {
                filename,
                content_length: Some(size),
                checksum: Some(digest),
                served,
                body: http_body_util::BodyExt::boxed_unsync(body),
            });
        };
        // A part cannot be verified: only the whole blob has a known digest.
        Ok(Artifact {
            filename,
            content_length: Some(span.length()),
            checksum: Some(digest),
            served,
            body: http::stream_body(response),
        })
    }

    /// Starts the GET of a blob, or of the bytes `span` names of it, on its own connection
    /// when `large`: a 2xx answer that is not an HTML page.
    async fn blob(
        &self,
        repo: &str,
        digest: &str,
        span: Option<Span>,
        large: bool,
        key: &ExtensionKey,
    ) -> Result<reqwest::Response, RegistryError> {
        let url = self.client.url(repo, &["blobs", digest]);
        let headers = http::range_headers(span);
        let sent = if large {
            self.client
                .send_download(url, Scope::Pull(repo), headers, "blob")
                .await
        } else {
            self.client
                .send(Method::GET, url, Scope::Pull(repo), headers, "blob")
                .await
        };
        let response = sent.map_err(|e| registry_error(e, key))?;
        if http::is_html(&response) {
            return Err(RegistryError::unavailable(
                Source::Oci,
                "blob download answered with an HTML page",
            ));
        }
        Ok(response)
    }
}

/// The tags that can be an extension's current version (see `version::current`).
fn current_candidates(tags: &[VersionTag]) -> Vec<VersionTag> {
    let parsed: Vec<_> = tags
        .iter()
        .filter_map(|t| Some((t, version::parse_semver(t.as_str())?)))
        .collect();
    let stable: Vec<_> = parsed.iter().filter(|(_, v)| v.pre.is_empty()).collect();
    let pool: Vec<_> = if stable.is_empty() {
        parsed.iter().collect()
    } else {
        stable
    };
    let Some(highest) = pool.iter().map(|(_, v)| v).max() else {
        return tags.to_vec();
    };
    pool.iter()
        .filter(|(_, v)| v == highest)
        .map(|(t, _)| (*t).clone())
        .collect()
}

/// The layer's own file name when it is a plain `.tar.gz`/`.tgz` name, else
/// `<name>-<version>.tar.gz`.
fn filename(key: &ExtensionKey, version: &str, layer: &Descriptor) -> String {
    let safe = |n: &str| {
        (n.ends_with(".tar.gz") || n.ends_with(".tgz"))
            && n.len() <= 255
            && !n.starts_with('.')
            && n.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    };
    match layer.title() {
        Some(title) if safe(title) => title.to_owned(),
        _ => format!("{}-{version}.tar.gz", key.name),
    }
}

fn broken(reason: &str) -> CallError {
    CallError::Broken(RegistryError::unavailable(Source::Oci, reason))
}

/// The domain error for a failed call about `key`.
fn registry_error(e: CallError, key: &ExtensionKey) -> RegistryError {
    match e {
        CallError::NotFound => RegistryError::not_found(key),
        CallError::Denied => RegistryError::auth_failed(Source::Oci),
        CallError::Broken(e) | CallError::Fatal(e) => e,
    }
}

impl tower::Service<BackendRequest> for OciBackend {
    type Response = BackendResponse;
    type Error = RegistryError;
    type Future = BackendFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: BackendRequest) -> Self::Future {
        let inner = self.inner.clone();
        Box::pin(async move { inner.handle(request).await })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_manifest_memo_is_bounded_by_bytes_not_by_count() {
        let memo = manifest_memo(MANIFEST_MEMO_BYTES);
        for i in 0..100 {
            let description = format!("{i}{}", "x".repeat(1 << 20));
            let doc: ManifestDoc = serde_json::from_value(serde_json::json!({
                "layers": [{"mediaType": "application/gzip", "digest": format!("sha256:{i:064x}")}],
                "annotations": {"org.opencontainers.image.description": description},
            }))
            .unwrap();
            memo.insert(format!("sha256:{i:064x}"), Arc::new(doc)).await;
        }
        memo.run_pending_tasks().await;
        // 100 manifests of 1 MiB each: a count bound would keep them all.
        let weight = memo.weighted_size();
        assert!(weight <= MANIFEST_MEMO_BYTES, "{weight}");
        assert!(weight >= MANIFEST_MEMO_BYTES / 2, "{weight}");
        assert!(memo.entry_count() < 40, "{}", memo.entry_count());
    }

    #[test]
    fn a_typical_manifest_weighs_about_its_heap_size() {
        // Config and artifact layer, a title and three annotations: what publishers push.
        let digest = |c: &str| format!("sha256:{}", c.repeat(64));
        let doc: ManifestDoc = serde_json::from_value(serde_json::json!({
            "schemaVersion": 2,
            "config": {"mediaType": "application/vnd.provisioning.extension.config.v1+json",
                       "digest": digest("a"), "size": 40},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                        "digest": digest("b"), "size": 48213,
                        "annotations": {"org.opencontainers.image.title": "aws-provider-1.2.0.tar.gz"}}],
            "annotations": {"org.opencontainers.image.description": "AWS provider extension",
                            "org.opencontainers.image.authors": "provisioning team",
                            "org.opencontainers.image.created": "2025-03-14T09:26:53Z"},
        }))
        .unwrap();
        let weight = doc.weight();
        // So the 32 MiB memo holds tens of thousands of such manifests.
        assert!((500..2000).contains(&weight), "{weight}");
    }

    #[test]
    fn a_registry_address_that_is_refused_is_shown_without_its_password() {
        for registry in [
            "http://reader:S3cr3t-pw@127.0.0.1:99999",
            "reader:S3cr3t-pw@127.0.0.1:99999",
            "https://reader:S3cr3t-pw@registry.test/some/path",
        ] {
            let refused = base_url(registry, false).unwrap_err();
            assert!(!refused.contains("S3cr3t"), "{refused}");
            assert!(refused.contains("***@"), "{refused}");
        }
    }

    #[test]
    fn registry_addresses_pick_their_scheme() {
        let url = |r: &str, insecure| base_url(r, insecure).map(|u| u.to_string());
        for (registry, insecure, expected) in [
            (
                "registry.example.com",
                false,
                "https://registry.example.com/",
            ),
            (
                "registry.example.com:5000",
                true,
                "http://registry.example.com:5000/",
            ),
            ("127.0.0.1:5000", false, "http://127.0.0.1:5000/"),
            ("localhost:5000", false, "http://localhost:5000/"),
            ("[::1]:5000", false, "http://[::1]:5000/"),
            ("http://reg.internal:80/", false, "http://reg.internal/"),
            ("https://127.0.0.1:5000", false, "https://127.0.0.1:5000/"),
        ] {
            assert_eq!(url(registry, insecure).unwrap(), expected, "{registry}");
        }
        assert!(url("https://reg.example.com/v2", false).is_err());
        assert!(url("", false).is_err());
    }

    #[test]
    fn only_tags_that_can_be_current_are_resolved() {
        let tags = |ts: &[&str]| -> Vec<VersionTag> {
            ts.iter().map(|t| VersionTag::parse(t).unwrap()).collect()
        };
        let names = |ts: Vec<VersionTag>| -> Vec<String> {
            ts.into_iter().map(|t| t.as_str().to_owned()).collect()
        };
        assert_eq!(
            names(current_candidates(&tags(&[
                "1.0.0",
                "v1.2.0",
                "1.2.0",
                "2.0.0-rc.1",
                "edge"
            ]))),
            ["v1.2.0", "1.2.0"]
        );
        assert_eq!(
            names(current_candidates(&tags(&[
                "0.1.0-alpha",
                "0.2.0-beta",
                "edge"
            ]))),
            ["0.2.0-beta"]
        );
        assert_eq!(
            names(current_candidates(&tags(&["edge", "nightly"]))),
            ["edge", "nightly"]
        );
    }

    #[test]
    fn download_names_come_from_a_safe_layer_title() {
        let key = ExtensionKey {
            ty: crate::registry::ExtensionType::Provider,
            name: crate::registry::ExtensionName::parse("aws").unwrap(),
        };
        let layer = |title: &str| -> Descriptor {
            serde_json::from_value(serde_json::json!({
                "digest": "sha256:00",
                "annotations": {"org.opencontainers.image.title": title}
            }))
            .unwrap()
        };
        assert_eq!(
            filename(&key, "1.0.0", &layer("aws-1.0.0.tgz")),
            "aws-1.0.0.tgz"
        );
        for unsafe_title in ["../x.tar.gz", "a b.tar.gz", "x.zip", ".tar.gz"] {
            assert_eq!(
                filename(&key, "1.0.0", &layer(unsafe_title)),
                "aws-1.0.0.tar.gz"
            );
        }
    }
}
