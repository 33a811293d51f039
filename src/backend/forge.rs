//! The conventions the forge backends (Gitea/Forgejo and GitHub releases) share: which
//! repositories hold extensions (`{name}_prov|_taskserv|_cluster`), which release asset is the
//! artifact, which one carries its sha256, and how a checksum file is read; the repository as
//! both APIs describe it, a release that qualifies as a version, how an extension is shown
//! from them and how a listing is gathered from its repositories.

use std::future::Future;
use std::hash::Hash;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use futures_util::{future, StreamExt};
use reqwest::header::HeaderValue;
use reqwest::Url;
use serde::Deserialize;

use crate::config::{ConfigError, Secret};
use crate::registry::{
    version, Extension, ExtensionInfo, ExtensionKey, ExtensionName, ExtensionType, RegistryError,
    Source, Timestamp, Version,
};

/// The repository suffix of each extension type.
const SUFFIXES: [(&str, ExtensionType); 3] = [
    ("_prov", ExtensionType::Provider),
    ("_taskserv", ExtensionType::Taskserv),
    ("_cluster", ExtensionType::Cluster),
];

/// Splits a repository name into the extension's type and name; `None` for other repositories.
pub fn split_repo_name(repo: &str) -> Option<(ExtensionType, &str)> {
    SUFFIXES.iter().find_map(|(suffix, ty)| {
        repo.strip_suffix(suffix)
            .filter(|name| !name.is_empty())
            .map(|name| (*ty, name))
    })
}

/// The repository that holds an extension.
pub fn repo_name(ty: ExtensionType, name: &str) -> String {
    let suffix = SUFFIXES
        .iter()
        .find(|(_, t)| *t == ty)
        .map_or("", |(s, _)| *s);
    format!("{name}{suffix}")
}

/// How a checksum file gives the digest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SidecarKind {
    /// `<artifact>.sha256`: the digest is the first word.
    Single,
    /// `SHA256SUMS`: one `<digest>  <file>` line per file.
    Sums,
}

/// The assets of a release that make it a version: the artifact, and its checksum file if any.
pub struct Chosen<'a, A> {
    pub artifact: &'a A,
    pub sidecar: Option<(SidecarKind, &'a A)>,
}

fn is_tarball(name: &str) -> bool {
    name.ends_with(".tar.gz") || name.ends_with(".tgz")
}

/// Picks the artifact of release `tag` of extension `name` kept in `repo`, in rule order
/// (`{repo}.tar.gz`, then `{name}-{tag}.tar.gz`, then the first tarball), and its checksum file
/// (`<artifact>.sha256`, `<stem>.sha256`, then `SHA256SUMS`); `None` without a tarball.
pub fn choose_assets<'a, A>(
    assets: &'a [A],
    name_of: impl Fn(&A) -> &str,
    repo: &str,
    name: &str,
    tag: &str,
) -> Option<Chosen<'a, A>> {
    let by_name = |wanted: &str| assets.iter().find(|a| name_of(a) == wanted);
    let artifact = by_name(&format!("{repo}.tar.gz"))
        .or_else(|| by_name(&format!("{name}-{tag}.tar.gz")))
        .or_else(|| assets.iter().find(|a| is_tarball(name_of(a))))?;
    let artifact_name = name_of(artifact);
    // Both spellings are in use: `x-1.0.tar.gz.sha256` and `x-1.0.sha256`.
    let stem = artifact_name
        .strip_suffix(".tar.gz")
        .or_else(|| artifact_name.strip_suffix(".tgz"))
        .unwrap_or(artifact_name);
    let sidecar = by_name(&format!("{artifact_name}.sha256"))
        .or_else(|| by_name(&format!("{stem}.sha256")))
        .map(|a| (SidecarKind::Single, a))
        .or_else(|| by_name("SHA256SUMS").map(|a| (SidecarKind::Sums, a)));
    Some(Chosen { artifact, sidecar })
}

/// Reads the digest of `artifact` from a checksum file's text, as `sha256:<hex>`.
pub fn parse_sidecar(kind: SidecarKind, text: &str, artifact: &str) -> Option<String> {
    let digest = match kind {
        SidecarKind::Single => text.split_whitespace().next().filter(|w| is_hex_digest(w)),
        SidecarKind::Sums => text.lines().find_map(|line| {
            let mut words = line.split_whitespace();
            let digest = words.next().filter(|w| is_hex_digest(w))?;
            // `sha256sum -b` marks binary files with a leading `*`.
            let file = words.next()?.trim_start_matches('*');
            (file == artifact).then_some(digest)
        }),
    }?;
    Some(format!("sha256:{}", digest.to_ascii_lowercase()))
}

/// Whether `word` is a sha256 digest in hex.
pub fn is_hex_digest(word: &str) -> bool {
    word.len() == 64 && word.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The extension a repository holds by the naming convention (`{name}_prov`,
/// `{name}_taskserv`, `{name}_cluster` with a valid name); `None` for any other repository.
pub fn extension_of(repository: &str) -> Option<ExtensionKey> {
    let (ty, name) = split_repo_name(repository)?;
    let name = ExtensionName::parse(name).ok()?;
    Some(ExtensionKey { ty, name })
}

/// The API root `url` names (`field` of `section`, for errors) as a base that paths extend:
/// an http or https URL ending in `/`.
pub fn api_root(url: &str, section: &str, field: &str) -> Result<Url, ConfigError> {
    let err = |message: String| ConfigError {
        file: section.into(),
        message: format!("{field}: {message}"),
    };
    let mut root = Url::parse(url).map_err(|e| err(e.to_string()))?;
    if root.cannot_be_a_base() || !matches!(root.scheme(), "http" | "https") {
        return Err(err("must be an http or https URL".into()));
    }
    if !root.path().ends_with('/') {
        root.set_path(&format!("{}/", root.path()));
    }
    Ok(root)
}

/// The `Authorization` value `{scheme} {token}` for the token in the file at `path`
/// (`token_path` of `section`), marked sensitive so that no log shows it.
pub fn authorization(path: &Path, section: &str, scheme: &str) -> Result<HeaderValue, ConfigError> {
    let token = Secret::from_file(path, &format!("{section} token_path"))?;
    let mut value =
        HeaderValue::from_str(&format!("{scheme} {}", token.expose())).map_err(|_| {
            ConfigError {
                file: path.display().to_string(),
                message: "the token holds characters not allowed in a header".into(),
            }
        })?;
    value.set_sensitive(true);
    Ok(value)
}

/// A repository as both APIs give it (Gitea's `Repository`; GitHub's `minimal-repository` in
/// listings, `full-repository` alone): the fields the backends read. Unknown fields are
/// ignored and optional ones may be missing, so newer and older servers parse alike.
#[derive(Clone, Debug, Deserialize)]
pub struct Repository {
    /// Carries the extension's name and type in its suffix.
    pub name: String,
    /// Shown as the extension's description.
    #[serde(default)]
    pub description: Option<String>,
    /// Shown as the extension's repository.
    pub html_url: String,
    /// Archived repositories are left out unless configured otherwise; missing means `false`.
    #[serde(default)]
    pub archived: bool,
    /// The author shown when a release carries none.
    #[serde(default)]
    pub owner: Option<User>,
    /// Gitea only: its non-draft releases, so a repository with none costs no releases call.
    #[serde(default)]
    pub release_counter: Option<u64>,
    /// Shown as the extension's tags, so search finds them; missing means none.
    #[serde(default)]
    pub topics: Option<Vec<String>>,
}

/// A user as embedded in repositories and releases (GitHub's `simple-user`).
#[derive(Clone, Debug, Deserialize)]
pub struct User {
    /// Shown as the extension's author.
    pub login: String,
}

impl Repository {
    /// The extension this repository holds, if it should be shown: `None` for other
    /// repositories, and for archived ones unless `include_archived`.
    pub fn extension(&self, include_archived: bool) -> Option<ExtensionKey> {
        split_repo_name(&self.name)?;
        if self.archived && !include_archived {
            return None;
        }
        let key = extension_of(&self.name);
        if key.is_none() {
            tracing::warn!(repo = %self.name, "repository name is not a valid extension name; ignored");
        }
        key
    }
}

/// When a release was published: `published_at`, else `created_at`, whichever reads first.
pub fn release_date(
    published_at: &Option<String>,
    created_at: &Option<String>,
) -> Option<Timestamp> {
    [published_at, created_at]
        .into_iter()
        .flatten()
        .find_map(|t| Timestamp::parse_rfc3339(t))
}

/// A release that qualifies as a version: the version as the API shows it (its checksum is
/// filled in on demand), the artifact asset `A`, and where its checksum is, `C`.
#[derive(Clone, Debug)]
pub struct Candidate<A, C> {
    /// What the API shows for this version.
    pub version: Version,
    /// The artifact asset.
    pub artifact: A,
    /// The release author's login, if the forge sent one.
    pub author: Option<String>,
    /// Where the artifact's sha256 is.
    pub checksum: C,
}

/// A repository that holds an extension, with the releases that qualify as its versions.
pub struct Found<A, C> {
    /// The extension asked for (or listed).
    pub key: ExtensionKey,
    /// Its descriptive fields.
    pub repo: Arc<Repository>,
    /// Its releases that qualify as versions.
    pub candidates: Vec<Candidate<A, C>>,
}

impl<A, C> Found<A, C> {
    /// The release tagged exactly `tag`.
    pub fn candidate(&self, tag: &str) -> Option<&Candidate<A, C>> {
        self.candidates.iter().find(|c| c.version.version == tag)
    }

    /// The release the extension is shown at, chosen by the domain's ordering.
    pub fn current(&self) -> Result<&Candidate<A, C>, RegistryError> {
        let versions: Vec<Version> = self.candidates.iter().map(|c| c.version.clone()).collect();
        version::current(&versions)
            .and_then(|v| self.candidate(&v.version))
            .ok_or_else(|| RegistryError::not_found(&self.key))
    }

    /// The API view of the extension, kept in `source`, whose current release is `current`
    /// (shown as `latest`, which may carry a checksum).
    pub fn extension(
        &self,
        source: Source,
        current: &Candidate<A, C>,
        latest: &Version,
    ) -> Extension {
        let author = current
            .author
            .clone()
            .filter(|a| !a.is_empty())
            .or_else(|| self.repo.owner.as_ref().map(|o| o.login.clone()))
            .unwrap_or_default();
        let info = ExtensionInfo {
            description: self.repo.description.clone().unwrap_or_default(),
            author,
            repository: self.repo.html_url.clone(),
            tags: self.repo.topics.clone().unwrap_or_default(),
        };
        Extension::new(&self.key, source, info, latest)
    }
}

/// A listing of `source`: every extension of `wanted` (taken as it is read, so a repository is
/// held only while its releases are) at its current version, reading at most `concurrency`
/// repositories' releases at once with `candidates` (`None` when a repository is not visible).
/// Repositories that fail are logged and left out, unless every one that was read failed (then
/// the listing fails with the first failure), or one met a rate limit: then no further
/// repository is read and the whole listing fails as suspended. Either way the cache above
/// serves what it holds instead of an empty listing or one with holes.
pub async fn list<A, C, F, Fut>(
    source: Source,
    wanted: impl IntoIterator<Item = (ExtensionKey, Arc<Repository>)>,
    concurrency: usize,
    candidates: F,
) -> Result<Vec<Extension>, RegistryError>
where
    F: Fn(Arc<Repository>) -> Fut,
    Fut: Future<Output = Result<Option<Vec<Candidate<A, C>>>, RegistryError>>,
{
    let candidates = &candidates;
    let suspended = &AtomicBool::new(false);
    let listed: Vec<Result<Option<Extension>, RegistryError>> = futures_util::stream::iter(wanted)
        .take_while(|_| future::ready(!suspended.load(Ordering::Relaxed)))
        .map(|(key, repo)| async move {
            let candidates = match candidates(Arc::clone(&repo)).await {
                Ok(Some(candidates)) => candidates,
                Ok(None) => return Ok(None),
                Err(error @ RegistryError::BackendSuspended { .. }) => {
                    suspended.store(true, Ordering::Relaxed);
                    tracing::warn!(repo = %repo.name, %error, "rate limited; the listing fails whole");
                    return Err(error);
                }
                Err(error) => {
                    tracing::warn!(repo = %repo.name, %error, "repository left out of the listing");
                    return Err(error);
                }
            };
            let found = Found {
                key,
                repo,
                candidates,
            };
            Ok(found
                .current()
                .ok()
                .map(|current| found.extension(source, current, &current.version)))
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let mut extensions = Vec::new();
    let mut first_failure = None;
    for item in listed {
        match item {
            Ok(listed) => extensions.extend(listed),
            Err(error @ RegistryError::BackendSuspended { .. }) => return Err(error),
            Err(error) => {
                first_failure.get_or_insert(error);
            }
        }
    }
    match first_failure {
        Some(error) if extensions.is_empty() => Err(error),
        _ => Ok(extensions),
    }
}

/// What a checksum memo weighs its keys by.
pub trait Weigh {
    /// Roughly the bytes this identity holds, itself and on the heap.
    fn weight(&self) -> usize;
}

/// Checksums read from checksum files, by the file's identity `S` and the artifact's name (a
/// `SHA256SUMS` holds many), so a refresh of an unchanged extension costs its pages only.
pub type SidecarMemo<S> = moka::future::Cache<(S, String), Arc<str>>;

/// A [`SidecarMemo`] holding at most `bytes` of checksums, each entry weighed by its key and
/// digest (about 300 bytes).
pub fn sidecar_memo<S>(bytes: u64) -> SidecarMemo<S>
where
    S: Weigh + Hash + Eq + Send + Sync + 'static,
{
    moka::future::Cache::builder()
        .max_capacity(bytes)
        .weigher(|(sidecar, artifact): &(S, String), digest: &Arc<str>| {
            u32::try_from(sidecar.weight() + artifact.len() + digest.len()).unwrap_or(u32::MAX)
        })
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_names_carry_type_and_name() {
        assert_eq!(
            split_repo_name("aws_prov"),
            Some((ExtensionType::Provider, "aws"))
        );
        assert_eq!(
            split_repo_name("k8s_taskserv"),
            Some((ExtensionType::Taskserv, "k8s"))
        );
        assert_eq!(
            split_repo_name("web_cluster"),
            Some((ExtensionType::Cluster, "web"))
        );
        assert_eq!(split_repo_name("_prov"), None);
        assert_eq!(split_repo_name("docs"), None);
        assert_eq!(repo_name(ExtensionType::Cluster, "web"), "web_cluster");
    }

    #[test]
    fn sums_files_are_read_by_file_name() {
        let hex = "AB".repeat(32);
        let text = format!("{}  other.tar.gz\n{hex} *x-1.0.tar.gz\n", "cd".repeat(32));
        assert_eq!(
            parse_sidecar(SidecarKind::Sums, &text, "x-1.0.tar.gz"),
            Some(format!("sha256:{}", "ab".repeat(32)))
        );
        assert_eq!(parse_sidecar(SidecarKind::Sums, &text, "y.tar.gz"), None);
        assert_eq!(parse_sidecar(SidecarKind::Single, "nothex  x\n", "x"), None);
    }
}
