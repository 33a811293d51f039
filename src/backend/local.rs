//! The local directory backend, the embedded default: extensions laid out as
//! `<root>/<type>/<name>/<version>/<artifact>.tar.gz`, with an optional
//! `<root>/<type>/<name>/extension.toml` for the descriptive fields. Nothing outside the root
//! is ever served, symlinks included.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::SystemTime;

use futures_util::TryStreamExt;
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio_util::io::ReaderStream;
use tower::Service;

use crate::config::{ConfigError, LocalConfig};
use crate::registry::{
    select, version, Artifact, ArtifactBody, BackendFuture, BackendHealth, BackendRequest,
    BackendResponse, Extension, ExtensionInfo, ExtensionKey, ExtensionName, ExtensionType,
    HealthReport, RegistryError, Served, Source, Timestamp, VerifyingBody, Version,
    VersionSelector, VersionTag,
};
use crate::BoxError;

/// Read size for streaming artifacts.
const CHUNK: usize = 64 * 1024;

/// The optional `extension.toml` beside the version directories.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Metadata {
    #[serde(default)]
    description: String,
    #[serde(default)]
    author: String,
    #[serde(default)]
    repository: String,
    #[serde(default)]
    tags: Vec<String>,
    /// Publication times per version (RFC 3339), overriding the artifact's mtime.
    #[serde(default)]
    published_at: BTreeMap<String, String>,
}

/// A version found on disk, with the file that holds it.
struct Found {
    version: Version,
    path: PathBuf,
}

/// What the checksum memo remembers a digest by: the file is unchanged while these are.
#[derive(Clone, PartialEq, Eq)]
struct FileStamp {
    len: u64,
    modified: Option<SystemTime>,
}

/// The local backend. Cheap to clone.
#[derive(Clone)]
pub struct Local {
    inner: Arc<Inner>,
}

struct Inner {
    /// The canonical root; every path served must stay below it.
    root: PathBuf,
    /// sha256 digests by canonical artifact path, kept while the file is unchanged.
    checksums: Mutex<HashMap<PathBuf, (FileStamp, String)>>,
}

fn unavailable(reason: impl Into<String>) -> RegistryError {
    RegistryError::unavailable(Source::Local, reason)
}

impl Local {
    pub fn new(config: &LocalConfig) -> Result<Self, ConfigError> {
        let root = config.path.canonicalize().map_err(|e| ConfigError {
            file: config.path.display().to_string(),
            message: format!("[local] path: cannot open the directory: {e}"),
        })?;
        if !root.is_dir() {
            return Err(ConfigError {
                file: config.path.display().to_string(),
                message: "[local] path: not a directory".into(),
            });
        }
        Ok(Self {
            inner: Arc::new(Inner {
                root,
                checksums: Mutex::new(HashMap::new()),
            }),
        })
    }
}

impl Inner {
    /// Resolves `path` through symlinks and refuses it unless it stays below the root.
    fn contained(&self, path: &Path) -> Option<PathBuf> {
        let real = path.canonicalize().ok()?;
        if real.starts_with(&self.root) {
            Some(real)
        } else {
            tracing::warn!(path = %path.display(), "refusing a path that leaves the local root");
            None
        }
    }

    fn checksum(&self, path: &Path, stamp: FileStamp) -> Result<String, RegistryError> {
        if let Ok(memo) = self.checksums.lock() {
            if let Some((seen, sum)) = memo.get(path) {
                if *seen == stamp {
                    return Ok(sum.clone());
                }
            }
        }
        let mut file = std::fs::File::open(path)
            .map_err(|e| unavailable(format!("cannot read an artifact: {e}")))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0; CHUNK];
        loop {
            let n = file
                .read(&mut buf)
                .map_err(|e| unavailable(format!("cannot read an artifact: {e}")))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        let sum = format!("sha256:{:x}", hasher.finalize());
        if let Ok(mut memo) = self.checksums.lock() {
            memo.insert(path.to_owned(), (stamp, sum.clone()));
        }
        Ok(sum)
    }

    fn metadata(&self, dir: &Path, key: &ExtensionKey) -> Result<Metadata, RegistryError> {
        let path = dir.join("extension.toml");
        let Some(path) = path.exists().then(|| self.contained(&path)).flatten() else {
            return Ok(Metadata::default());
        };
        let text = std::fs::read_to_string(&path)
            .map_err(|e| unavailable(format!("cannot read the extension.toml of {key}: {e}")))?;
        toml::from_str(&text).map_err(|e| {
            unavailable(format!(
                "the extension.toml of {key} is invalid: {}",
                e.message()
            ))
        })
    }

    /// The artifact of one version directory: the first `.tar.gz` or `.tgz` file by name.
    fn artifact_in(&self, dir: &Path) -> Option<PathBuf> {
        let mut names: Vec<_> = std::fs::read_dir(dir)
            .ok()?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tar.gz") || n.ends_with(".tgz"))
            .collect();
        names.sort();
        names
            .into_iter()
            .filter_map(|n| self.contained(&dir.join(n)))
            .find(|p| p.is_file())
    }

    /// Every version of one extension, newest first, with its descriptive fields; `None` when
    /// the extension does not exist here.
    fn scan(
        &self,
        key: &ExtensionKey,
    ) -> Result<Option<(ExtensionInfo, Vec<Found>)>, RegistryError> {
        let dir = self.root.join(key.ty.as_str()).join(key.name.as_str());
        let Some(dir) = dir.is_dir().then(|| self.contained(&dir)).flatten() else {
            return Ok(None);
        };
        let meta = self.metadata(&dir, key)?;
        let entries = std::fs::read_dir(&dir)
            .map_err(|e| unavailable(format!("cannot read the directory of {key}: {e}")))?;
        let mut found = Vec::new();
        for entry in entries.filter_map(|e| e.ok()) {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Ok(tag) = VersionTag::parse(&name) else {
                continue;
            };
            let Some(path) = self.artifact_in(&entry.path()) else {
                continue;
            };
            let Ok(file_meta) = std::fs::metadata(&path) else {
                continue;
            };
            let stamp = FileStamp {
                len: file_meta.len(),
                modified: file_meta.modified().ok(),
            };
            let published_at = match meta.published_at.get(tag.as_str()) {
                Some(text) => Timestamp::parse_rfc3339(text).ok_or_else(|| {
                    unavailable(format!(
                        "the extension.toml of {key} has an invalid published_at for {tag}"
                    ))
                })?,
                None => stamp
                    .modified
                    .map(Timestamp::from)
                    .unwrap_or_else(Timestamp::unix_epoch),
            };
            let checksum = self.checksum(&path, stamp.clone())?;
            found.push(Found {
                version: Version {
                    download_url: format!("/api/v1/extensions/{}/{}/{tag}", key.ty, key.name),
                    version: tag.as_str().to_owned(),
                    published_at,
                    size: stamp.len,
                    checksum: Some(checksum),
                },
                path,
            });
        }
        found.sort_by(|a, b| version::newest_first(&a.version, &b.version));
        let info = ExtensionInfo {
            description: meta.description,
            author: meta.author,
            repository: meta.repository,
            tags: meta.tags,
        };
        Ok(Some((info, found)))
    }

    fn extension(&self, key: &ExtensionKey) -> Result<Option<Extension>, RegistryError> {
        let Some((info, found)) = self.scan(key)? else {
            return Ok(None);
        };
        let versions: Vec<Version> = found.into_iter().map(|f| f.version).collect();
        Ok(version::current(&versions)
            .map(|latest| Extension::new(key, Source::Local, info, latest)))
    }

    fn list(&self, ty: Option<ExtensionType>) -> Result<Vec<Extension>, RegistryError> {
        let mut all = Vec::new();
        for ty in ExtensionType::ALL
            .into_iter()
            .filter(|t| ty.is_none_or(|f| f == *t))
        {
            let Ok(entries) = std::fs::read_dir(self.root.join(ty.as_str())) else {
                continue;
            };
            for entry in entries.filter_map(|e| e.ok()) {
                let Ok(name) = ExtensionName::parse(&entry.file_name().to_string_lossy()) else {
                    continue;
                };
                let key = ExtensionKey { ty, name };
                match self.extension(&key) {
                    Ok(Some(ext)) => all.push(ext),
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(extension = %key, error = %e, "left out of the listing")
                    }
                }
            }
        }
        Ok(all)
    }

    fn find(&self, key: &ExtensionKey, wanted: &VersionSelector) -> Result<Found, RegistryError> {
        let (_, found) = self
            .scan(key)?
            .ok_or_else(|| RegistryError::not_found(key))?;
        let chosen = match wanted {
            VersionSelector::Latest => {
                let versions: Vec<Version> = found.iter().map(|f| f.version.clone()).collect();
                version::current(&versions).map(|v| v.version.clone())
            }
            VersionSelector::Exact(tag) => Some(tag.as_str().to_owned()),
        };
        found
            .into_iter()
            .find(|f| Some(&f.version.version) == chosen.as_ref())
            .ok_or_else(|| RegistryError::not_found(format!("{key} version {wanted}")))
    }
}

/// The file name a download of `found` is offered under.
fn artifact_name(name: &ExtensionName, found: &Found) -> String {
    format!("{name}-{}.tar.gz", found.version.version)
}

/// Streams `len` bytes of the file at `path` from byte `first`: the file is seeked there, so
/// what comes before is never read, and nothing after is.
async fn stream_file(path: &Path, first: u64, len: u64) -> Result<ArtifactBody, RegistryError> {
    let mut file = tokio::fs::File::open(path)
        .await
        .map_err(|e| unavailable(format!("cannot open an artifact: {e}")))?;
    if first > 0 {
        file.seek(std::io::SeekFrom::Start(first))
            .await
            .map_err(|e| unavailable(format!("cannot seek in an artifact: {e}")))?;
    }
    let frames = ReaderStream::with_capacity(file.take(len), CHUNK)
        .map_ok(Frame::data)
        .map_err(|e| -> BoxError { Box::new(e) });
    Ok(StreamBody::new(frames).boxed_unsync())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, RegistryError> + Send + 'static,
) -> Result<T, RegistryError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| RegistryError::Internal(format!("local backend task failed: {e}")))?
}

impl Local {
    async fn answer(self, req: BackendRequest) -> Result<BackendResponse, RegistryError> {
        let inner = self.inner;
        match req {
            BackendRequest::List(filter) => {
                let list = blocking(move || inner.list(filter.ty)).await?;
                Ok(BackendResponse::List(Arc::new(list)))
            }
            BackendRequest::Get { key, .. } => {
                let ext = blocking(move || {
                    inner
                        .extension(&key)?
                        .ok_or_else(|| RegistryError::not_found(&key))
                })
                .await?;
                Ok(BackendResponse::Extension(Arc::new(ext)))
            }
            BackendRequest::Versions { key, .. } => {
                let versions = blocking(move || {
                    let (_, found) = inner
                        .scan(&key)?
                        .ok_or_else(|| RegistryError::not_found(&key))?;
                    Ok(found.into_iter().map(|f| f.version).collect())
                })
                .await?;
                Ok(BackendResponse::Versions(Arc::new(versions)))
            }
            BackendRequest::DownloadHead { key, version, .. } => {
                let name = key.name.clone();
                let found = blocking(move || inner.find(&key, &version)).await?;
                Ok(BackendResponse::Artifact(Artifact::head(
                    artifact_name(&name, &found),
                    Some(found.version.size),
                    found.version.checksum,
                )))
            }
            BackendRequest::Download {
                key,
                version,
                range,
                ..
            } => {
                let name = key.name.clone();
                let found = blocking(move || inner.find(&key, &version)).await?;
                let filename = artifact_name(&name, &found);
                // The advertised checksum is remembered by size and mtime; a file rewritten in
                // place with both kept is caught here rather than served as if it matched.
                let checksum = found.version.checksum.clone().ok_or_else(|| {
                    RegistryError::Internal("a local artifact without a sha256 checksum".into())
                })?;
                let served = select(range.as_ref(), found.version.size, Some(&checksum));
                let (content_length, body) = match served {
                    Served::Unsatisfiable { size } => {
                        return Ok(BackendResponse::Artifact(Artifact::unsatisfiable(
                            filename,
                            size,
                            Some(checksum),
                        )))
                    }
                    Served::Whole => {
                        let body = stream_file(&found.path, 0, found.version.size).await?;
                        let body =
                            VerifyingBody::new(body, &checksum, Source::Local, filename.clone())
                                .ok_or_else(|| {
                                    RegistryError::Internal(format!("bad digest {checksum}"))
                                })?
                                .boxed_unsync();
                        (found.version.size, body)
                    }
                    // A part cannot be verified: only the whole file has a known digest.
                    Served::Part(span) => (
                        span.length(),
                        stream_file(&found.path, span.first, span.length()).await?,
                    ),
                };
                Ok(BackendResponse::Artifact(Artifact {
                    filename,
                    content_length: Some(content_length),
                    checksum: Some(checksum),
                    served,
                    body,
                }))
            }
            BackendRequest::Health => {
                let readable = tokio::fs::read_dir(&inner.root).await;
                Ok(BackendResponse::Health(HealthReport(vec![BackendHealth {
                    source: Source::Local,
                    healthy: readable.is_ok(),
                    detail: readable
                        .err()
                        .map(|e| format!("cannot read the root directory: {e}")),
                }])))
            }
        }
    }
}

impl Service<BackendRequest> for Local {
    type Response = BackendResponse;
    type Error = RegistryError;
    type Future = BackendFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), RegistryError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: BackendRequest) -> Self::Future {
        Box::pin(self.clone().answer(req))
    }
}
