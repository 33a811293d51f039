//! The GitHub releases backend (github.com and GitHub Enterprise Server): extensions are
//! releases of the repositories `{name}_prov`, `{name}_taskserv`, `{name}_cluster` of one
//! organization or user, with the Gitea backend's naming, artifact and checksum rules. A tower
//! service speaking the domain's backend vocabulary; `client` holds the HTTP (rate limits and
//! conditional requests included), `model` the JSON shapes and the release-to-version rules.

mod client;
mod model;

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::{future, StreamExt};
use http_body_util::BodyExt;
use tower::Service;

pub use self::client::{BACKEND_RATE_LIMIT_REMAINING, BACKEND_REVALIDATIONS_TOTAL, MEMO_BYTES};

use self::client::Api;
use self::model::{AssetRef, Candidate, Checksum, RateLimitOverview, Release};
use crate::backend::forge::{self, Repository, SidecarMemo};
use crate::backend::http;
use crate::config::{ConfigError, GithubConfig};
use crate::registry::{
    version, Artifact, BackendFuture, BackendHealth, BackendRequest, BackendResponse, Extension,
    ExtensionKey, HealthReport, ListFilter, RegistryError, Served, Source, VerifyingBody, Version,
    VersionSelector,
};

/// Bytes of checksums remembered by the checksum file they were read from (only for releases
/// whose assets carry no digest); about 300 bytes an entry.
const SIDECAR_MEMO_BYTES: u64 = 8 * 1024 * 1024;

/// The backend. Cheap to clone: the state is shared.
#[derive(Clone)]
pub struct Github {
    /// Everything the requests share; one copy per backend, whatever the clones.
    inner: Arc<Inner>,
}

struct Inner {
    /// The API, for the configured owner.
    api: Api,
    /// Whether archived repositories still count as extensions.
    include_archived: bool,
    /// Most per-repository calls in flight at once.
    max_concurrency: usize,
    /// Checksums read from checksum files, by the file's identity and the artifact's name.
    sidecars: SidecarMemo<AssetRef>,
}

/// A repository that holds an extension (its fields shared with the client's memo), with the
/// releases that qualify as its versions.
type Found = forge::Found<AssetRef, Checksum>;

impl Github {
    /// Builds the backend, reading the token file if one is configured.
    pub fn new(config: &GithubConfig) -> Result<Self, ConfigError> {
        let root = forge::api_root(&config.api_url, "[github]", "api_url")?;
        let authorization = config
            .token_path
            .as_deref()
            .map(|path| forge::authorization(path, "[github]", "Bearer"))
            .transpose()?;
        // No redirect is followed by reqwest: `send_per_hop` follows them, checking every hop.
        let client = http::client(
            "[github]",
            Duration::from_secs(config.timeout_seconds),
            true,
        )?;
        Ok(Self {
            inner: Arc::new(Inner {
                api: Api::new(
                    client,
                    root,
                    config.owner.clone(),
                    authorization,
                    config.instance_name().to_owned(),
                ),
                include_archived: config.include_archived,
                max_concurrency: config.max_concurrency.max(1),
                sidecars: forge::sidecar_memo(SIDECAR_MEMO_BYTES),
            }),
        })
    }
}

impl Inner {
    async fn handle(&self, request: BackendRequest) -> Result<BackendResponse, RegistryError> {
        Ok(match request {
            BackendRequest::List(filter) => {
                BackendResponse::List(Arc::new(self.list(&filter).await?))
            }
            BackendRequest::Get { key, .. } => {
                BackendResponse::Extension(Arc::new(self.get(&key).await?))
            }
            BackendRequest::Versions { key, .. } => {
                BackendResponse::Versions(Arc::new(self.versions(&key).await?))
            }
            BackendRequest::Download { key, version, .. } => {
                BackendResponse::Artifact(self.download(&key, &version, true).await?)
            }
            BackendRequest::DownloadHead { key, version, .. } => {
                BackendResponse::Artifact(self.download(&key, &version, false).await?)
            }
            BackendRequest::Health => {
                BackendResponse::Health(HealthReport(vec![self.health().await]))
            }
        })
    }

    /// One extension at its current version, with that version's checksum.
    async fn get(&self, key: &ExtensionKey) -> Result<Extension, RegistryError> {
        let found = self.find(key).await?;
        let shown = found.current()?;
        let latest = Version {
            checksum: self.checksum_or_none(shown).await?,
            ..shown.version.clone()
        };
        Ok(found.extension(Source::Github, shown, &latest))
    }

    /// Every version with its checksum, newest first.
    async fn versions(&self, key: &ExtensionKey) -> Result<Vec<Version>, RegistryError> {
        let found = self.find(key).await?;
        let versions: Vec<Result<Version, RegistryError>> =
            futures_util::stream::iter(found.candidates)
                .map(|c| async move {
                    Ok(Version {
                        checksum: self.checksum_or_none(&c).await?,
                        ..c.version
                    })
                })
                .buffer_unordered(self.max_concurrency)
                .collect()
                .await;
        let mut versions = versions.into_iter().collect::<Result<Vec<_>, _>>()?;
        version::sort_newest_first(&mut versions);
        Ok(versions)
    }

    /// Every extension at its current version (see [`forge::list`]).
    async fn list(&self, filter: &ListFilter) -> Result<Vec<Extension>, RegistryError> {
        if filter
            .source
            .as_ref()
            .is_some_and(|s| s.kind() != Source::Github)
        {
            return Ok(Vec::new());
        }
        let pages = self
            .api
            .repositories::<Vec<Repository>>()
            .await?
            .ok_or_else(|| {
                // The name stays in the log: clients learn only what kind of failure it is.
                tracing::warn!(owner = %self.api.owner(), "github owner not found or not visible");
                RegistryError::unavailable(
                    Source::Github,
                    "the configured owner was not found or is not visible",
                )
            })?;
        // Pages and places, so each repository is copied out of its page only when its turn
        // comes (the pages are shared with the client's memo).
        let wanted: Vec<(ExtensionKey, Arc<Vec<Repository>>, usize)> = pages
            .iter()
            .flat_map(|page| (0..page.len()).map(move |i| (Arc::clone(page), i)))
            .filter_map(|(page, i)| {
                let key = page[i].extension(self.include_archived)?;
                let wanted = filter.ty.is_none_or(|ty| ty == key.ty);
                wanted.then_some((key, page, i))
            })
            .collect();
        let wanted = wanted
            .into_iter()
            .map(|(key, page, i)| (key, Arc::new(page[i].clone())));
        forge::list(
            Source::Github,
            wanted,
            self.max_concurrency,
            |repo| async move { self.candidates(&repo.name).await },
        )
        .await
    }

    /// The releases of a repository that qualify as versions; `None` when it is not visible.
    async fn candidates(&self, repo: &str) -> Result<Option<Vec<Candidate>>, RegistryError> {
        let url = self
            .api
            .api_url(&["repos", self.api.owner(), repo, "releases"]);
        let pages = self.api.pages::<Vec<Release>>(url, "releases").await?;
        let name = forge::split_repo_name(repo).map_or(repo, |(_, name)| name);
        Ok(pages.map(|pages| {
            pages
                .iter()
                .flat_map(|page| page.iter())
                .filter_map(|r| r.to_candidate(repo, name))
                .collect()
        }))
    }

    /// One extension's repository and versions, or not found.
    async fn find(&self, key: &ExtensionKey) -> Result<Found, RegistryError> {
        let name = forge::repo_name(key.ty, key.name.as_str());
        let url = self.api.api_url(&["repos", self.api.owner(), &name]);
        let (repo, candidates) = future::try_join(
            self.api.fetch::<Repository>(url, "repository"),
            self.candidates(&name),
        )
        .await?;
        match (repo, candidates) {
            (Some(repo), Some(candidates))
                if !candidates.is_empty()
                    && repo.value.extension(self.include_archived).as_ref() == Some(key) =>
            {
                Ok(Found {
                    key: key.clone(),
                    repo: repo.value,
                    candidates,
                })
            }
            _ => Err(RegistryError::not_found(key)),
        }
    }

    /// The checksum for metadata: a checksum file that cannot be read is logged and shown as
    /// unknown; a rate limit is not swallowed.
    async fn checksum_or_none(
        &self,
        candidate: &Candidate,
    ) -> Result<Option<String>, RegistryError> {
        match self.checksum(candidate).await {
            Ok(checksum) => Ok(checksum),
            Err(error @ RegistryError::BackendSuspended { .. }) => Err(error),
            Err(error) => {
                tracing::warn!(url = %candidate.version.download_url, %error, "checksum file unreadable");
                Ok(None)
            }
        }
    }

    /// The artifact's digest: GitHub's own when it gave one, else read from the checksum file
    /// (remembered by the file's id, size and update time).
    async fn checksum(&self, candidate: &Candidate) -> Result<Option<String>, RegistryError> {
        let (kind, sidecar) = match &candidate.checksum {
            Checksum::Digest(digest) => return Ok(Some(digest.clone())),
            Checksum::Unknown => return Ok(None),
            Checksum::Sidecar(kind, sidecar) => (*kind, sidecar),
        };
        let key = (sidecar.clone(), candidate.artifact.name.clone());
        if let Some(digest) = self.sidecars.get(&key).await {
            return Ok(Some(digest.to_string()));
        }
        let what = format!("checksum of {}", candidate.artifact.name);
        let text = self.api.small_text(sidecar, &what).await?;
        let digest =
            forge::parse_sidecar(kind, &text, &candidate.artifact.name).ok_or_else(|| {
                RegistryError::unavailable(
                    Source::Github,
                    format!("{what}: no sha256 digest found"),
                )
            })?;
        self.sidecars.insert(key, Arc::from(digest.as_str())).await;
        Ok(Some(digest))
    }

    /// Streams a version's artifact, verified when its checksum is known; with `open` false,
    /// only describes it (for HEAD). The length is the asset's size from the release; a
    /// download answering another length is refused.
    async fn download(
        &self,
        key: &ExtensionKey,
        selector: &VersionSelector,
        open: bool,
    ) -> Result<Artifact, RegistryError> {
        let found = self.find(key).await?;
        let chosen = match selector {
            VersionSelector::Latest => found.current()?,
            VersionSelector::Exact(tag) => found
                .candidate(tag.as_str())
                .ok_or_else(|| RegistryError::NotFound(format!("Version {tag} of {key}")))?,
        };
        let checksum = self.checksum(chosen).await?;
        let size = chosen.version.size;
        if !open {
            return Ok(Artifact::head(
                chosen.artifact.name.clone(),
                Some(size),
                checksum,
            ));
        }
        let what = format!("{key} {}", chosen.version.version);
        let response = self.api.download(&chosen.artifact, &what).await?;
        if response.content_length().is_some_and(|len| len != size) {
            return Err(RegistryError::unavailable(
                Source::Github,
                format!("{what}: the download's length differs from the asset's size"),
            ));
        }
        let body = http::stream_body(response);
        let body = match &checksum {
            None => body,
            Some(checksum) => VerifyingBody::new(body, checksum, Source::Github, what)
                .map(BodyExt::boxed_unsync)
                .ok_or_else(|| RegistryError::Internal(format!("bad digest {checksum}")))?,
        };
        Ok(Artifact {
            filename: chosen.artifact.name.clone(),
            content_length: Some(size),
            checksum,
            body,
            // Ranges are not asked of GitHub's storage yet: the whole body, verified.
            served: Served::Whole,
        })
    }

    /// `GET /rate_limit`, which costs nothing against the limit: healthy when it answers and
    /// requests are left (or GHES has no limits).
    async fn health(&self) -> BackendHealth {
        let url = self.api.api_url(&["rate_limit"]);
        let detail = match self.api.fetch::<RateLimitOverview>(url, "rate limit").await {
            Ok(Some(overview)) if overview.value.resources.core.remaining > 0 => None,
            Ok(Some(overview)) => Some(format!(
                "rate limit of {} requests an hour exhausted",
                overview.value.resources.core.limit
            )),
            // GHES with rate limits disabled answers 404 here.
            Ok(None) => None,
            Err(e) => Some(e.to_string()),
        };
        BackendHealth {
            source: Source::Github,
            healthy: detail.is_none(),
            detail,
        }
    }
}

impl Service<BackendRequest> for Github {
    type Response = BackendResponse;
    type Error = RegistryError;
    type Future = BackendFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: BackendRequest) -> Self::Future {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move { inner.handle(request).await })
    }
}
