//! The parts of Gitea's JSON bodies the backend reads, and the rules that turn a release into a
//! version: which asset is the artifact and which one carries its sha256. Unknown fields are
//! ignored and optional ones may be missing, so newer Gitea and Forgejo versions parse alike.

use serde::Deserialize;

use crate::backend::forge::{self, choose_assets, release_date, SidecarKind, User, Weigh};
use crate::registry::Version;

/// One release of `GET /repos/{owner}/{repo}/releases`.
#[derive(Debug, Deserialize)]
pub struct Release {
    /// The version string.
    pub tag_name: String,
    /// Drafts are never versions, even if a writer's token makes Gitea list them.
    #[serde(default)]
    pub draft: bool,
    /// Equal to `created_at` on Gitea; either one dates the version.
    #[serde(default)]
    pub published_at: Option<String>,
    /// The fallback date when `published_at` is missing.
    #[serde(default)]
    pub created_at: Option<String>,
    /// Shown as the extension's author.
    #[serde(default)]
    pub author: Option<User>,
    /// Where the artifact and its checksum are.
    #[serde(default)]
    pub assets: Option<Vec<Attachment>>,
}

/// One asset of a release.
#[derive(Clone, Debug, Deserialize)]
pub struct Attachment {
    /// The attachment's id: a new upload, even under the same name, is a new attachment.
    #[serde(default)]
    pub id: Option<i64>,
    /// Decides whether the asset is the artifact or its checksum.
    pub name: String,
    /// Shown as the version's size, in bytes.
    #[serde(default)]
    pub size: u64,
    /// Where the bytes are (a web route of the instance, or an external link on Forgejo).
    pub browser_download_url: String,
    /// The asset's own id in the `{ROOT_URL}attachments/{uuid}` form of its URL.
    #[serde(default)]
    pub uuid: Option<String>,
    /// Forgejo: `"external"` for a link to a file stored elsewhere, whose bytes may change.
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
}

impl Attachment {
    /// What identifies this asset's bytes, when they are stored by the instance; `None` for a
    /// Forgejo external link (nothing is stored, the target may change) or without an id.
    fn stamp(&self) -> Option<AssetStamp> {
        if self.kind.as_deref() == Some("external") {
            return None;
        }
        Some(AssetStamp {
            id: self.id?,
            size: self.size,
            uuid: self.uuid.clone(),
            url: self.browser_download_url.clone(),
        })
    }
}

/// The identity of a stored release asset's bytes. Gitea never rewrites an attachment in
/// place: replacing a file is a new upload, with a new id, UUID and size; and it gives no
/// `updated_at` for attachments (only `created_at`, fixed at upload). So assets with equal
/// stamps have equal bytes, and anything read from one can be remembered.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct AssetStamp {
    /// The attachment id.
    pub id: i64,
    /// Its size in bytes.
    pub size: u64,
    /// Its UUID (the stored file's name), if Gitea sent one.
    pub uuid: Option<String>,
    /// Where it is fetched from (an edited name moves it).
    pub url: String,
}

impl Weigh for AssetStamp {
    /// Roughly the heap bytes this stamp holds, for a memo bounded in bytes.
    fn weight(&self) -> usize {
        std::mem::size_of::<Self>() + self.uuid.as_ref().map_or(0, String::len) + self.url.len()
    }
}

/// A release asset as its release's own asset list gives it: the URL to fetch, and what the
/// client needs to tell whether a URL is this asset's own download route on the instance (the
/// only web URLs the token may be sent to).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AssetLink {
    /// `browser_download_url`, as the release gives it (also what the API shows).
    pub url: String,
    /// The repository the release belongs to.
    pub repo: String,
    /// The release's tag.
    pub tag: String,
    /// The asset's file name.
    pub name: String,
    /// The asset's uuid, for the `attachments/{uuid}` form; `None` if Gitea sent none.
    pub uuid: Option<String>,
    /// What identifies its bytes, when the instance stores them.
    pub stamp: Option<AssetStamp>,
}

/// The body of `GET /version`.
#[derive(Debug, Deserialize)]
pub struct ServerVersion {
    /// Logged: which server answered the health probe.
    pub version: String,
}

/// Where a version's sha256 can be read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Sidecar {
    /// `<artifact>.sha256`: the digest is the first word.
    Single(AssetLink),
    /// `SHA256SUMS`: one `<digest>  <file>` line per file.
    Sums(AssetLink),
}

impl Sidecar {
    /// How the checksum file gives the digest.
    pub fn kind(&self) -> SidecarKind {
        match self {
            Sidecar::Single(_) => SidecarKind::Single,
            Sidecar::Sums(_) => SidecarKind::Sums,
        }
    }

    pub fn asset(&self) -> &AssetLink {
        match self {
            Sidecar::Single(asset) | Sidecar::Sums(asset) => asset,
        }
    }
}

/// A release that qualifies as a version: its artifact asset (whose name is offered to clients
/// and looked up in `SHA256SUMS`) and its checksum file, if the release has one.
pub type Candidate = forge::Candidate<AssetLink, Option<Sidecar>>;

impl Release {
    /// The release as a version of extension `name` kept in `repo`, or `None` when it is a
    /// draft, has no artifact asset or no readable date.
    pub fn into_candidate(self, repo: &str, name: &str) -> Option<Candidate> {
        if self.draft {
            return None;
        }
        let assets = self.assets.unwrap_or_default();
        let chosen = choose_assets(&assets, |a| a.name.as_str(), repo, name, &self.tag_name)?;
        let artifact = chosen.artifact;
        let Some(published_at) = release_date(&self.published_at, &self.created_at) else {
            tracing::warn!(repo, tag = %self.tag_name, "release has no readable date; left out");
            return None;
        };
        let link = |a: &Attachment| AssetLink {
            url: a.browser_download_url.clone(),
            repo: repo.to_owned(),
            tag: self.tag_name.clone(),
            name: a.name.clone(),
            uuid: a.uuid.clone(),
            stamp: a.stamp(),
        };
        let sidecar = chosen.sidecar.map(|(kind, a)| match kind {
            SidecarKind::Single => Sidecar::Single(link(a)),
            SidecarKind::Sums => Sidecar::Sums(link(a)),
        });
        let artifact_link = link(artifact);
        Some(Candidate {
            version: Version {
                version: self.tag_name,
                published_at,
                download_url: artifact.browser_download_url.clone(),
                size: artifact.size,
                checksum: None,
            },
            artifact: artifact_link,
            author: self.author.map(|u| u.login),
            checksum: sidecar,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn asset(name: &str) -> Attachment {
        Attachment {
            id: Some(1),
            name: name.into(),
            size: 7,
            browser_download_url: format!("https://h/o/r/releases/download/t/{name}"),
            uuid: None,
            kind: None,
        }
    }

    fn release(tag: &str, assets: &[&str]) -> Release {
        Release {
            tag_name: tag.into(),
            draft: false,
            published_at: Some("2025-03-14T10:26:53+01:00".into()),
            created_at: None,
            author: None,
            assets: Some(assets.iter().map(|a| asset(a)).collect()),
        }
    }

    #[test]
    fn the_artifact_is_chosen_in_rule_order() {
        let pick = |assets: &[&str]| {
            release("v1.0.0", assets)
                .into_candidate("aws_prov", "aws")
                .map(|c| c.artifact.name)
        };
        assert_eq!(
            pick(&["a.tgz", "aws-v1.0.0.tar.gz", "aws_prov.tar.gz"]).as_deref(),
            Some("aws_prov.tar.gz")
        );
        assert_eq!(
            pick(&["a.tar.gz", "aws-v1.0.0.tar.gz"]).as_deref(),
            Some("aws-v1.0.0.tar.gz")
        );
        assert_eq!(pick(&["notes.txt", "b.tgz"]).as_deref(), Some("b.tgz"));
        assert_eq!(pick(&["notes.txt", "a.zip"]), None);
    }

    #[test]
    fn sidecars_are_found_and_read() {
        let c = release("1.0", &["x-1.0.tar.gz", "x-1.0.sha256"])
            .into_candidate("x_prov", "x")
            .unwrap();
        assert!(matches!(c.checksum, Some(Sidecar::Single(_))));
        assert_eq!(c.version.published_at.to_string(), "2025-03-14T09:26:53Z");
        let c = release("1.0", &["SHA256SUMS", "x-1.0.tar.gz"])
            .into_candidate("x_prov", "x")
            .unwrap();
        assert_eq!(c.checksum.map(|s| s.kind()), Some(SidecarKind::Sums));
    }

    #[test]
    fn only_stored_assets_with_an_id_have_a_stamp() {
        let stored = asset("x.sha256");
        let stamp = stored.stamp().unwrap();
        let reuploaded = Attachment {
            id: Some(2),
            ..stored.clone()
        };
        assert_ne!(reuploaded.stamp(), Some(stamp));
        let external = Attachment {
            kind: Some("external".into()),
            ..stored.clone()
        };
        assert_eq!(external.stamp(), None);
        assert_eq!(Attachment { id: None, ..stored }.stamp(), None);
    }

    #[test]
    fn drafts_are_never_versions() {
        let mut r = release("1.0", &["x.tar.gz"]);
        r.draft = true;
        assert!(r.into_candidate("x_prov", "x").is_none());
    }
}
