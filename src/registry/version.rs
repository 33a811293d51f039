//! The one version ordering every backend uses: semver (a leading `v` tolerated) newest first,
//! then tags that are not semver, newest published first; and the choice of an extension's
//! current version; and versions read as semver at most once, for matching them against constraints.

use std::cell::OnceCell;
use std::cmp::Ordering;

use crate::registry::Version;

/// Parses a tag as semver, tolerating one leading `v`.
pub fn parse_semver(tag: &str) -> Option<semver::Version> {
    let bare = tag.strip_prefix('v').unwrap_or(tag);
    semver::Version::parse(bare).ok()
}

/// A version with its tag read as semver when first asked, at most once, so that matching it
/// against constraints only compares, and a scan that stops early reads no further.
#[derive(Clone, Debug)]
pub struct ParsedVersion<'v> {
    pub version: &'v Version,
    semver: OnceCell<Option<semver::Version>>,
}

impl<'v> ParsedVersion<'v> {
    pub fn new(version: &'v Version) -> Self {
        Self {
            version,
            semver: OnceCell::new(),
        }
    }

    /// The tag as semver; `None` for a tag that is not semver.
    pub fn semver(&self) -> Option<&semver::Version> {
        self.semver
            .get_or_init(|| parse_semver(&self.version.version))
            .as_ref()
    }

    /// Whether its tag has been read yet.
    #[cfg(test)]
    pub fn was_read(&self) -> bool {
        self.semver.get().is_some()
    }

    /// Whether it is a semver prerelease (`2.0.0-rc.1`).
    pub fn is_prerelease(&self) -> bool {
        self.semver().is_some_and(|s| !s.pre.is_empty())
    }
}

/// Every version, each to be read as semver when first asked, in the order given.
pub fn parse_lazily(versions: &[Version]) -> Vec<ParsedVersion<'_>> {
    versions.iter().map(ParsedVersion::new).collect()
}

/// Orders two versions newest first.
pub fn newest_first(a: &Version, b: &Version) -> Ordering {
    match (parse_semver(&a.version), parse_semver(&b.version)) {
        (Some(x), Some(y)) => y.cmp(&x),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => Ordering::Equal,
    }
    .then_with(|| b.published_at.cmp(&a.published_at))
    .then_with(|| a.version.cmp(&b.version))
}

/// Sorts versions newest first, in place.
pub fn sort_newest_first(versions: &mut [Version]) {
    versions.sort_by(newest_first);
}

/// The version an extension is shown at: the highest stable semver, else the highest
/// prerelease, else the newest tag that is not semver.
pub fn current(versions: &[Version]) -> Option<&Version> {
    let stable = versions
        .iter()
        .filter(|v| parse_semver(&v.version).is_some_and(|s| s.pre.is_empty()))
        .min_by(|a, b| newest_first(a, b));
    stable.or_else(|| versions.iter().min_by(|a, b| newest_first(a, b)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Timestamp;

    fn v(tag: &str, published: i64) -> Version {
        Version {
            version: tag.into(),
            published_at: Timestamp::from_unix(published).unwrap(),
            download_url: String::new(),
            size: 0,
            checksum: None,
        }
    }

    fn order(mut vs: Vec<Version>) -> Vec<String> {
        sort_newest_first(&mut vs);
        vs.into_iter().map(|v| v.version).collect()
    }

    #[test]
    fn semver_beats_tags_and_v_prefix_is_tolerated() {
        let got = order(vec![
            v("nightly", 50),
            v("1.2.0", 1),
            v("v1.10.0", 2),
            v("2.0.0-rc.1", 3),
            v("edge", 60),
            v("1.9.9", 4),
        ]);
        assert_eq!(
            got,
            ["2.0.0-rc.1", "v1.10.0", "1.9.9", "1.2.0", "edge", "nightly"]
        );
    }

    #[test]
    fn current_prefers_stable_then_prerelease_then_newest_tag() {
        let vs = [v("2.0.0-rc.1", 3), v("1.0.0", 1), v("v1.1.0", 2)];
        assert_eq!(current(&vs).unwrap().version, "v1.1.0");
        let pre = [v("0.1.0-alpha", 1), v("0.2.0-beta.2", 2)];
        assert_eq!(current(&pre).unwrap().version, "0.2.0-beta.2");
        let tags = [v("old", 1), v("new", 2)];
        assert_eq!(current(&tags).unwrap().version, "new");
        assert!(current(&[]).is_none());
    }
}
