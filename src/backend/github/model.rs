//! The parts of GitHub's JSON bodies the backend reads (API version `2022-11-28`), and the
//! rules that turn a release into a version, shared with Gitea through [`crate::backend::forge`]:
//! which asset is the artifact and where its sha256 is (GitHub's own asset `digest` first, then a
//! checksum file). Unknown fields are ignored and optional ones may be missing, so GitHub
//! Enterprise Server versions that lack newer fields parse alike.

use serde::Deserialize;

use crate::backend::forge::{
    self, choose_assets, is_hex_digest, release_date, SidecarKind, User, Weigh,
};
use crate::registry::Version;

/// One release of `GET /repos/{owner}/{repo}/releases`.
#[derive(Debug, Deserialize)]
pub struct Release {
    /// The version string.
    pub tag_name: String,
    /// Drafts are listed to push-access tokens only, and are never versions.
    #[serde(default)]
    pub draft: bool,
    /// `null` for drafts; dates the version.
    #[serde(default)]
    pub published_at: Option<String>,
    /// The date of the release's commit: the fallback when `published_at` is missing.
    #[serde(default)]
    pub created_at: Option<String>,
    /// Shown as the extension's author.
    #[serde(default)]
    pub author: Option<User>,
    /// Where the artifact and its checksum are.
    #[serde(default)]
    pub assets: Vec<Asset>,
}

/// One `release-asset`.
#[derive(Clone, Debug, Deserialize)]
pub struct Asset {
    /// The asset's id: a new upload, even under the same name, is a new asset.
    pub id: u64,
    /// Decides whether the asset is the artifact or its checksum.
    pub name: String,
    /// Shown as the version's size, in bytes.
    #[serde(default)]
    pub size: u64,
    /// The asset's API URL: with `Accept: application/octet-stream` it answers the bytes or a
    /// redirect to storage; the only download route that works for private repositories.
    pub url: String,
    /// The web URL shown to clients as the version's download URL.
    pub browser_download_url: String,
    /// `uploaded`, or `open` for an unfinished upload (not offered).
    #[serde(default)]
    pub state: Option<String>,
    /// `sha256:<hex>` for assets uploaded since June 2025; `null` or missing before.
    #[serde(default)]
    pub digest: Option<String>,
    /// Changes when the asset is replaced or edited; part of what identifies its bytes.
    #[serde(default)]
    pub updated_at: Option<String>,
}

impl Asset {
    fn is_uploaded(&self) -> bool {
        self.state.as_deref().is_none_or(|s| s == "uploaded")
    }

    /// GitHub's digest of the asset, as `sha256:<lowercase hex>`, if it sent a usable one.
    fn sha256(&self) -> Option<String> {
        let hex = self.digest.as_deref()?.strip_prefix("sha256:")?;
        is_hex_digest(hex).then(|| format!("sha256:{}", hex.to_ascii_lowercase()))
    }

    fn reference(&self) -> AssetRef {
        AssetRef {
            id: self.id,
            name: self.name.clone(),
            api_url: self.url.clone(),
            size: self.size,
            updated_at: self.updated_at.clone(),
        }
    }
}

/// An asset as the backend fetches it: through its API URL.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct AssetRef {
    /// The asset id.
    pub id: u64,
    /// Its file name.
    pub name: String,
    /// `…/releases/assets/{id}`, fetched with `Accept: application/octet-stream`.
    pub api_url: String,
    /// Its size in bytes.
    pub size: u64,
    /// When it was last changed: with the id and size, what identifies its bytes.
    pub updated_at: Option<String>,
}

impl Weigh for AssetRef {
    /// Roughly the heap bytes this reference holds, for a memo bounded in bytes.
    fn weight(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.name.len()
            + self.api_url.len()
            + self.updated_at.as_ref().map_or(0, String::len)
    }
}

/// Where a version's sha256 comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Checksum {
    /// GitHub's own digest of the artifact: no file to fetch.
    Digest(String),
    /// A checksum file among the release's assets.
    Sidecar(SidecarKind, AssetRef),
    /// Neither: the version is served unverified.
    Unknown,
}

/// A release that qualifies as a version: its artifact asset and where its sha256 is.
pub type Candidate = forge::Candidate<AssetRef, Checksum>;

impl Release {
    /// The release as a version of extension `name` kept in `repo`, or `None` when it is a
    /// draft, has no uploaded artifact asset or no readable date.
    pub fn to_candidate(&self, repo: &str, name: &str) -> Option<Candidate> {
        if self.draft {
            return None;
        }
        let assets: Vec<&Asset> = self.assets.iter().filter(|a| a.is_uploaded()).collect();
        let chosen = choose_assets(&assets, |a| a.name.as_str(), repo, name, &self.tag_name)?;
        let artifact = *chosen.artifact;
        let Some(published_at) = release_date(&self.published_at, &self.created_at) else {
            tracing::warn!(repo, tag = %self.tag_name, "release has no readable date; left out");
            return None;
        };
        let checksum = match (artifact.sha256(), chosen.sidecar) {
            (Some(digest), _) => Checksum::Digest(digest),
            (None, Some((kind, sidecar))) => Checksum::Sidecar(kind, sidecar.reference()),
            (None, None) => Checksum::Unknown,
        };
        Some(Candidate {
            version: Version {
                version: self.tag_name.clone(),
                published_at,
                download_url: artifact.browser_download_url.clone(),
                size: artifact.size,
                checksum: None,
            },
            artifact: artifact.reference(),
            author: self.author.as_ref().map(|u| u.login.clone()),
            checksum,
        })
    }
}

/// The body of `GET /rate_limit`: only `resources.core` is read (`rate` is gone in later API
/// versions).
#[derive(Debug, Deserialize)]
pub struct RateLimitOverview {
    pub resources: RateResources,
}

/// The buckets of [`RateLimitOverview`].
#[derive(Debug, Deserialize)]
pub struct RateResources {
    /// The bucket the REST calls of this backend count against.
    pub core: RateBucket,
}

/// One rate-limit bucket.
#[derive(Debug, Deserialize)]
pub struct RateBucket {
    /// Requests allowed per window.
    pub limit: u64,
    /// Requests left in this window.
    pub remaining: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn asset(name: &str, digest: Option<&str>) -> Asset {
        Asset {
            id: 1,
            name: name.into(),
            size: 7,
            url: "https://api.github.com/repos/o/r/releases/assets/1".into(),
            browser_download_url: format!("https://github.com/o/r/releases/download/t/{name}"),
            state: Some("uploaded".into()),
            digest: digest.map(String::from),
            updated_at: Some("2025-03-14T09:26:53Z".into()),
        }
    }

    fn release(assets: Vec<Asset>) -> Release {
        Release {
            tag_name: "1.0.0".into(),
            draft: false,
            published_at: Some("2025-03-14T09:26:53Z".into()),
            created_at: None,
            author: None,
            assets,
        }
    }

    #[test]
    fn githubs_digest_wins_over_a_checksum_file() {
        let hex = "AB".repeat(32);
        let with_digest = release(vec![
            asset("x-1.0.0.tar.gz", Some(&format!("sha256:{hex}"))),
            asset("x-1.0.0.tar.gz.sha256", None),
        ]);
        let c = with_digest.to_candidate("x_prov", "x").unwrap();
        assert_eq!(
            c.checksum,
            Checksum::Digest(format!("sha256:{}", "ab".repeat(32)))
        );
        let without = release(vec![
            asset("x-1.0.0.tar.gz", None),
            asset("x-1.0.0.tar.gz.sha256", None),
        ]);
        let c = without.to_candidate("x_prov", "x").unwrap();
        assert!(matches!(
            c.checksum,
            Checksum::Sidecar(SidecarKind::Single, _)
        ));
        let odd = release(vec![asset("x-1.0.0.tar.gz", Some("md5:abc"))]);
        assert_eq!(
            odd.to_candidate("x_prov", "x").unwrap().checksum,
            Checksum::Unknown
        );
    }

    #[test]
    fn drafts_and_unfinished_uploads_are_not_versions() {
        let mut draft = release(vec![asset("x.tar.gz", None)]);
        draft.draft = true;
        assert!(draft.to_candidate("x_prov", "x").is_none());
        let mut open = asset("x.tar.gz", None);
        open.state = Some("open".into());
        assert!(release(vec![open]).to_candidate("x_prov", "x").is_none());
    }
}
