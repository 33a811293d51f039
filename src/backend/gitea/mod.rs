//! The Gitea/Forgejo releases backend: extensions are releases of the repositories
//! `{name}_prov`, `{name}_taskserv`, `{name}_cluster` of one organization. A tower service
//! speaking the domain's backend vocabulary; `client` holds the HTTP, `model` the JSON shapes
//! and the release-to-version rules.

mod client;
mod model;

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::{future, StreamExt};
use http_body_util::BodyExt;
use tower::Service;

use self::client::Api;
use self::model::{AssetLink, AssetStamp, Candidate, Release, ServerVersion, Sidecar};
use crate::backend::forge::{self, Repository, SidecarMemo};
use crate::backend::http;
use crate::config::{ConfigError, GiteaConfig};
use crate::registry::{
    select, version, Artifact, BackendFuture, BackendHealth, BackendRequest, BackendResponse,
    ByteRange, Extension, ExtensionKey, HealthReport, ListFilter, RegistryError, Served, Source,
    VerifyingBody, Version, VersionSelector,
};

/// Bytes of checksums remembered by the sidecar they were read from. A sidecar of a published
/// release never changes (see [`AssetStamp`]), so this only bounds memory: about 300 bytes an
/// entry, so some 28,000 releases' checksums, far more than one instance's extensions carry.
pub const SIDECAR_MEMO_BYTES: u64 = 8 * 1024 * 1024;

/// A repository that holds an extension, with the releases that qualify as its versions.
type Found = forge::Found<AssetLink, Option<Sidecar>>;

/// The backend. Cheap to clone: the state is shared.
#[derive(Clone)]
pub struct Gitea {
    /// Everything the requests share; one copy per backend, whatever the clones.
    inner: Arc<Inner>,
}

struct Inner {
    /// The instance's API, for the configured organization.
    api: Api,
    /// Whether archived repositories still count as extensions.
    include_archived: bool,
    /// Most per-repository calls in flight at once.
    max_concurrency: usize,
    /// Checksums read from sidecars, so a refresh of an unchanged extension costs its pages
    /// only; a replaced sidecar has another stamp and is read again.
    sidecars: SidecarMemo<AssetStamp>,
}

impl Gitea {
    /// Builds the backend, reading the token file if one is configured.
    pub fn new(config: &GiteaConfig) -> Result<Self, ConfigError> {
        let root = forge::api_root(&config.url, "[gitea]", "url")?;
        // Lowercase `token`: Forgejo and Gitea before 1.25 ignore other casings.
        let authorization = config
            .token_path
            .as_deref()
            .map(|path| forge::authorization(path, "[gitea]", "token"))
            .transpose()?;
        // No redirect is followed by reqwest: `Api` follows them, checking every hop.
        let client = http::client(
            "[gitea]",
            Duration::from_secs(config.timeout_seconds),
            config.verify_ssl,
        )?;
        Ok(Self {
            inner: Arc::new(Inner {
                api: Api::new(client, root, config.organization.clone(), authorization),
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
            BackendRequest::Download {
                key,
                version,
                range,
                ..
            } => BackendResponse::Artifact(self.download(&key, &version, Some(range)).await?),
            BackendRequest::DownloadHead { key, version, .. } => {
                BackendResponse::Artifact(self.download(&key, &version, None).await?)
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
            checksum: self.checksum_or_none(shown).await,
            ..shown.version.clone()
        };
        Ok(found.extension(Source::Gitea, shown, &latest))
    }

    /// Every version with its checksum, newest first.
    async fn versions(&self, key: &ExtensionKey) -> Result<Vec<Version>, RegistryError> {
        let found = self.find(key).await?;
        let mut versions: Vec<Version> = futures_util::stream::iter(found.candidates)
            .map(|c| async move {
                Version {
                    checksum: self.checksum_or_none(&c).await,
                    ..c.version
                }
            })
            .buffer_unordered(self.max_concurrency)
            .collect()
            .await;
        version::sort_newest_first(&mut versions);
        Ok(versions)
    }

    /// Every extension at its current version (see [`forge::list`]).
    async fn list(&self, filter: &ListFilter) -> Result<Vec<Extension>, RegistryError> {
        if filter
            .source
            .as_ref()
            .is_some_and(|s| s.kind() != Source::Gitea)
        {
            return Ok(Vec::new());
        }
        let repos: Vec<Repository> = self
            .api
            .pages(&["orgs", self.api.org(), "repos"], "organization repositories")
            .await?
            .ok_or_else(|| {
                // The name stays in the log: clients learn only what kind of failure it is.
                tracing::warn!(organization = %self.api.org(), "gitea organization not found or not visible");
                RegistryError::unavailable(
                    Source::Gitea,
                    "the configured organization was not found or is not visible",
                )
            })?;
        let wanted = repos.into_iter().filter_map(|repo| {
            let key = repo.extension(self.include_archived)?;
            let wanted = filter.ty.is_none_or(|ty| ty == key.ty) && repo.release_counter != Some(0);
            wanted.then(|| (key, Arc::new(repo)))
        });
        forge::list(
            Source::Gitea,
            wanted,
            self.max_concurrency,
            |repo| async move { self.candidates(&repo.name).await },
        )
        .await
    }

    /// The releases of a repository that qualify as versions; `None` when it is not visible.
    async fn candidates(&self, repo: &str) -> Result<Option<Vec<Candidate>>, RegistryError> {
        let releases: Option<Vec<Release>> = self
            .api
            .pages(&["repos", self.api.org(), repo, "releases"], "releases")
            .await?;
        let name = forge::split_repo_name(repo).map_or(repo, |(_, name)| name);
        Ok(releases.map(|rs| {
            rs.into_iter()
                .filter_map(|r| r.into_candidate(repo, name))
                .collect()
        }))
    }

    /// One extension's repository and versions, or not found.
    async fn find(&self, key: &ExtensionKey) -> Result<Found, RegistryError> {
        let name = forge::repo_name(key.ty, key.name.as_str());
        let (repo, candidates) = future::try_join(
            self.api
                .object::<Repository>(&["repos", self.api.org(), &name], "repository"),
            self.candidates(&name),
        )
        .await?;
        match (repo, candidates) {
            (Some(repo), Some(candidates))
                if !candidates.is_empty()
                    && repo.extension(self.include_archived).as_ref() == Some(key) =>
            {
                Ok(Found {
                    key: key.clone(),
                    repo: Arc::new(repo),
                    candidates,
                })
            }
            _ => Err(RegistryError::not_found(key)),
        }
    }

    /// The checksum for metadata: a sidecar that cannot be read is logged and shown as unknown.
    async fn checksum_or_none(&self, candidate: &Candidate) -> Option<String> {
        self.checksum(candidate).await.unwrap_or_else(|error| {
            tracing::warn!(url = %candidate.version.download_url, %error, "checksum file unreadable");
            None
        })
    }

    /// The artifact's digest from its sidecar, if the release has one: remembered when the
    /// sidecar's bytes are known not to change, else read.
    async fn checksum(&self, candidate: &Candidate) -> Result<Option<String>, RegistryError> {
        let Some(sidecar) = &candidate.checksum else {
            return Ok(None);
        };
        let stamp = sidecar.asset().stamp.clone();
        let key = stamp.map(|stamp| (stamp, candidate.artifact.name.clone()));
        if let Some(key) = &key {
            if let Some(digest) = self.sidecars.get(key).await {
                return Ok(Some(digest.to_string()));
            }
        }
        let what = format!("checksum of {}", candidate.artifact.name);
        let text = self.api.small_text(sidecar.asset(), &what).await?;
        let digest = forge::parse_sidecar(sidecar.kind(), &text, &candidate.artifact.name)
            .ok_or_else(|| {
                RegistryError::unavailable(Source::Gitea, format!("{what}: no sha256 digest found"))
            })?;
        if let Some(key) = key {
            self.sidecars.insert(key, Arc::from(digest.as_str())).await;
        }
        Ok(Some(digest))
    }

    /// The release tagged `tag` as a version of `key`: the repository and that one release,
    /// two calls however many releases there are (the listing would page through them all).
    async fn find_tagged(&self, key: &ExtensionKey, tag: &str) -> Result<Candidate, RegistryError> {
        let repo = forge::repo_name(key.ty, key.name.as_str());
        let org = self.api.org();
        let (found, release) = future::try_join(
            self.api
                .object::<Repository>(&["repos", org, &repo], "repository"),
            self.api
                .object::<Release>(&["repos", org, &repo, "releases", "tags", tag], "release"),
        )
        .await?;
        if found.is_none_or(|found| found.extension(self.include_archived).as_ref() != Some(key)) {
            return Err(RegistryError::not_found(key));
        }
        let missing = || RegistryError::NotFound(format!("Version {tag} of {key}"));
        match release {
            Some(release) if release.tag_name == tag => release
                .into_candidate(&repo, key.name.as_str())
                .ok_or_else(missing),
            // Gitea looks tags up ignoring case, and a version is its tag as written: another
            // release came back (`V1.0` for `v1.0`), so the listing tells whether there is one.
            Some(_) => match self.find(key).await {
                Ok(found) => found.candidate(tag).cloned().ok_or_else(missing),
                Err(e) if e.is_not_found() => Err(missing()),
                Err(e) => Err(e),
            },
            None => Err(missing()),
        }
    }

    /// Streams a version's asset: whole, verified when its checksum is known, or the range
    /// `open` holds (not verifiable); with `open` `None`, only describes it (for HEAD). A
    /// checksum file that exists but cannot be read fails the download: the bytes could not be
    /// vouched for. The length is the asset's size from the release; a download answering
    /// another length is refused. A version named exactly is looked up by its tag alone.
    async fn download(
        &self,
        key: &ExtensionKey,
        selector: &VersionSelector,
        open: Option<Option<ByteRange>>,
    ) -> Result<Artifact, RegistryError> {
        let chosen = match selector {
            VersionSelector::Latest => self.find(key).await?.current()?.clone(),
            VersionSelector::Exact(tag) => self.find_tagged(key, tag.as_str()).await?,
        };
        let checksum = self.checksum(&chosen).await?;
        let size = chosen.version.size;
        let filename = chosen.artifact.name.clone();
        let Some(range) = open else {
            return Ok(Artifact::head(filename, Some(size), checksum));
        };
        // A size of 0 is also what an external link shows, whose real length is unknown: its
        // range is ignored (RFC 9110 allows it) rather than answered 416.
        let range = range.filter(|_| size > 0);
        let span = match select(range.as_ref(), size, checksum.as_deref()) {
            Served::Unsatisfiable { size } => {
                return Ok(Artifact::unsatisfiable(filename, size, checksum))
            }
            Served::Whole => None,
            Served::Part(span) => Some(span),
        };
        let what = format!("{key} {}", chosen.version.version);
        let (response, served) = http::open_range(Source::Gitea, span, |span| {
            self.api.download(&chosen.artifact, span, &what)
        })
        .await?;
        let Served::Part(span) = served else {
            if response.content_length().is_some_and(|len| len != size) {
                return Err(RegistryError::unavailable(
                    Source::Gitea,
                    format!("{what}: the download's length differs from the asset's size"),
                ));
            }
            let body = http::stream_body(response);
            let body = match &checksum {
                None => body,
                Some(checksum) => VerifyingBody::new(body, checksum, Source::Gitea, what)
                    .map(BodyExt::boxed_unsync)
                    .ok_or_else(|| RegistryError::Internal(format!("bad digest {checksum}")))?,
            };
            return Ok(Artifact {
                filename,
                content_length: Some(size),
                checksum,
                served,
                body,
            });
        };
        // A part cannot be verified: only the whole asset has a known digest.
        Ok(Artifact {
            filename,
            content_length: Some(span.length()),
            checksum,
            served,
            body: http::stream_body(response),
        })
    }

    async fn health(&self) -> BackendHealth {
        let detail = match self
            .api
            .object::<ServerVersion>(&["version"], "version")
            .await
        {
            Ok(Some(v)) => {
                tracing::debug!(version = %v.version, "gitea answered");
                None
            }
            Ok(None) => {
                Some(RegistryError::unavailable(Source::Gitea, "version: HTTP 404").to_string())
            }
            Err(e) => Some(e.to_string()),
        };
        BackendHealth {
            source: Source::Gitea,
            healthy: detail.is_none(),
            detail,
        }
    }
}

impl Service<BackendRequest> for Gitea {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::forge::Weigh;

    #[tokio::test]
    async fn the_sidecar_memo_is_bounded_by_bytes() {
        let memo: SidecarMemo<AssetStamp> = forge::sidecar_memo(SIDECAR_MEMO_BYTES);
        let digest: Arc<str> = Arc::from(format!("sha256:{}", "ab".repeat(32)).as_str());
        let mut weight = 0;
        for id in 0..60_000 {
            let stamp = AssetStamp {
                id,
                size: 96,
                uuid: Some(format!("8f14e45f-ceea-467f-a0e6-{id:012x}")),
                url: format!(
                    "https://git.example.com/extensions/ext{id}_prov/releases/download/1.0.{id}/ext{id}-1.0.{id}.tar.gz.sha256"
                ),
            };
            let artifact = format!("ext{id}-1.0.{id}.tar.gz");
            weight = stamp.weight() + artifact.len() + digest.len();
            let key = (stamp, artifact);
            memo.insert(key, digest.clone()).await;
        }
        memo.run_pending_tasks().await;
        // A typical entry, as the bound's documentation counts it.
        assert!((250..400).contains(&weight), "{weight}");
        let held = memo.weighted_size();
        assert!(held <= SIDECAR_MEMO_BYTES, "{held}");
        assert!(held >= SIDECAR_MEMO_BYTES / 2, "{held}");
        assert!(memo.entry_count() < 60_000, "{}", memo.entry_count());
    }
}
