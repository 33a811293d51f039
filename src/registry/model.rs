//! The domain's nouns: extension types, sources, validated names and versions, and the JSON
//! shapes the API renders. Every value that reaches a backend URL passes through a constructor
//! here first.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use time::format_description::well_known::Rfc3339;
use time::{OffsetDateTime, UtcOffset};

use crate::registry::RegistryError;

/// The three kinds of extension the provisioning tools know.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExtensionType {
    Provider,
    Taskserv,
    Cluster,
}

impl ExtensionType {
    pub const ALL: [ExtensionType; 3] = [Self::Provider, Self::Taskserv, Self::Cluster];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Provider => "provider",
            Self::Taskserv => "taskserv",
            Self::Cluster => "cluster",
        }
    }
}

impl fmt::Display for ExtensionType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ExtensionType {
    type Err = RegistryError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| RegistryError::InvalidType(s.chars().take(64).collect()))
    }
}

/// Where an extension was found. The order of the variants is the tie-break order of listings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Gitea,
    Oci,
    Github,
    Local,
}

impl Source {
    pub const ALL: [Source; 4] = [Self::Gitea, Self::Oci, Self::Github, Self::Local];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Gitea => "gitea",
            Self::Oci => "oci",
            Self::Github => "github",
            Self::Local => "local",
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Source {
    type Err = RegistryError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| RegistryError::InvalidParameter {
                name: "source",
                reason: "must be one of: gitea, oci, github, local".into(),
            })
    }
}

/// The name of one configured backend instance (`[a-z0-9-]{1,32}`, unique in the
/// configuration); a single-table `[gitea]` … is named after its kind. Cheap to clone.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct InstanceName(Arc<str>);

impl InstanceName {
    pub const MAX_LEN: usize = 32;

    /// Whether `s` may name an instance.
    pub fn is_valid(s: &str) -> bool {
        (1..=Self::MAX_LEN).contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name, shared (for metric labels, cloned per call).
    pub fn shared(&self) -> Arc<str> {
        Arc::clone(&self.0)
    }
}

impl From<&str> for InstanceName {
    fn from(s: &str) -> Self {
        Self(s.into())
    }
}

impl From<Source> for InstanceName {
    fn from(kind: Source) -> Self {
        Self::from(kind.as_str())
    }
}

impl fmt::Display for InstanceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for InstanceName {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

/// Read back from answers the replicas share (`[redis]`), which this service wrote.
impl<'de> Deserialize<'de> for InstanceName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(|name| Self(name.into()))
    }
}

/// One configured backend: its kind and its name.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Instance {
    pub kind: Source,
    pub name: InstanceName,
}

impl From<Source> for Instance {
    /// The instance a single-table section (`[gitea]` …) configures.
    fn from(kind: Source) -> Self {
        Self {
            kind,
            name: kind.into(),
        }
    }
}

/// What `source=` pins a request to: every instance of a kind, or one instance.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum SourceSelector {
    Kind(Source),
    Instance(Instance),
}

impl SourceSelector {
    /// Whether `instance` is one the selector names.
    pub fn admits(&self, instance: &Instance) -> bool {
        match self {
            Self::Kind(kind) => *kind == instance.kind,
            Self::Instance(named) => named == instance,
        }
    }

    /// The kind of backend every admitted instance is.
    pub fn kind(&self) -> Source {
        match self {
            Self::Kind(kind) => *kind,
            Self::Instance(instance) => instance.kind,
        }
    }
}

impl From<Source> for SourceSelector {
    fn from(kind: Source) -> Self {
        Self::Kind(kind)
    }
}

/// The configured instances, in precedence order: what `source=` may name.
#[derive(Clone, Debug, Default)]
pub struct Sources(Arc<[Instance]>);

impl Sources {
    pub fn new(instances: Vec<Instance>) -> Self {
        Self(instances.into())
    }

    pub fn iter(&self) -> std::slice::Iter<'_, Instance> {
        self.0.iter()
    }

    /// Reads a `source=` value: a kind (all its instances, configured or not) or the name
    /// of a configured instance. Anything else is refused with the list of what is accepted.
    pub fn selector(&self, text: &str) -> Result<SourceSelector, RegistryError> {
        if let Some(kind) = Source::ALL.into_iter().find(|k| k.as_str() == text) {
            return Ok(SourceSelector::Kind(kind));
        }
        if let Some(instance) = self.0.iter().find(|i| i.name.as_str() == text) {
            return Ok(SourceSelector::Instance(instance.clone()));
        }
        let kinds = Source::ALL.map(Source::as_str);
        let names = self.0.iter().map(|i| i.name.as_str());
        let accepted: Vec<&str> = kinds
            .into_iter()
            .chain(names.filter(|n| !kinds.contains(n)))
            .collect();
        Err(RegistryError::InvalidParameter {
            name: "source",
            reason: format!(
                "must be a backend kind or a configured instance, one of: {}",
                accepted.join(", ")
            ),
        })
    }
}

/// A validated extension name: lowercase ASCII letters, digits, `.`, `_`, `-`, starting with a
/// letter or digit, at most 128 characters. Safe to put into any backend URL or file path.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ExtensionName(String);

impl ExtensionName {
    pub const MAX_LEN: usize = 128;

    pub fn parse(s: &str) -> Result<Self, RegistryError> {
        let valid = !s.is_empty()
            && s.len() <= Self::MAX_LEN
            && s.bytes()
                .next()
                .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
            && s.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
            })
            && !has_dot_dot(s);
        if valid {
            Ok(Self(s.to_owned()))
        } else {
            Err(RegistryError::InvalidName)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ExtensionName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Whether `s` holds `..`. A pass over pairs of bytes: names are short, and a substring
/// search sets up more than it scans here (about 200 instructions a name).
fn has_dot_dot(s: &str) -> bool {
    s.as_bytes().windows(2).any(|pair| pair == b"..")
}

/// A validated version tag, following the OCI tag grammar `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct VersionTag(String);

impl VersionTag {
    pub fn parse(s: &str) -> Result<Self, RegistryError> {
        let valid = s.len() <= 128
            && s.bytes()
                .next()
                .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_')
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
            && !has_dot_dot(s);
        if valid {
            Ok(Self(s.to_owned()))
        } else {
            Err(RegistryError::InvalidVersion)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for VersionTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Which version a download asks for.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum VersionSelector {
    Latest,
    Exact(VersionTag),
}

impl VersionSelector {
    pub fn parse(s: &str) -> Result<Self, RegistryError> {
        if s == "latest" {
            Ok(Self::Latest)
        } else {
            VersionTag::parse(s).map(Self::Exact)
        }
    }
}

impl fmt::Display for VersionSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Latest => f.write_str("latest"),
            Self::Exact(tag) => tag.fmt(f),
        }
    }
}

/// One extension, named by type and name; the key of the metadata and versions caches.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ExtensionKey {
    pub ty: ExtensionType,
    pub name: ExtensionName,
}

impl fmt::Display for ExtensionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.ty, self.name)
    }
}

/// A point in time, always rendered as RFC 3339 in UTC with a `Z`, whatever offset a backend sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(OffsetDateTime);

impl Timestamp {
    /// Parses RFC 3339 with any offset and normalises it to UTC.
    pub fn parse_rfc3339(s: &str) -> Option<Self> {
        OffsetDateTime::parse(s, &Rfc3339).ok().map(Self::from)
    }

    pub fn from_unix(seconds: i64) -> Option<Self> {
        OffsetDateTime::from_unix_timestamp(seconds)
            .ok()
            .map(Self::from)
    }

    pub fn unix_epoch() -> Self {
        Self(OffsetDateTime::UNIX_EPOCH)
    }
}

impl From<OffsetDateTime> for Timestamp {
    fn from(t: OffsetDateTime) -> Self {
        Self(
            t.to_offset(UtcOffset::UTC)
                .replace_nanosecond(0)
                .unwrap_or(t),
        )
    }
}

impl From<std::time::SystemTime> for Timestamp {
    fn from(t: std::time::SystemTime) -> Self {
        Self::from(OffsetDateTime::from(t))
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.format(&Rfc3339) {
            Ok(s) => f.write_str(&s),
            Err(_) => Err(fmt::Error),
        }
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Read back what [`Serialize`] wrote (answers shared between replicas).
impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Self::parse_rfc3339(&text)
            .ok_or_else(|| serde::de::Error::custom("expected an RFC 3339 timestamp"))
    }
}

/// An extension as the API shows it: the fields of its latest version plus its description.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extension {
    pub name: String,
    #[serde(rename = "type")]
    pub ty: ExtensionType,
    pub version: String,
    pub description: String,
    pub author: String,
    pub repository: String,
    pub source: Source,
    /// The configured instance it was found in (see [`InstanceName`]).
    pub instance: InstanceName,
    pub published_at: Timestamp,
    pub download_url: String,
    pub size: u64,
    /// `sha256:<hex>` when the backend knows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksum: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
}

/// One published version of an extension.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Version {
    pub version: String,
    pub published_at: Timestamp,
    pub download_url: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksum: Option<String>,
}

/// The descriptive fields an extension has apart from its versions.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExtensionInfo {
    pub description: String,
    pub author: String,
    pub repository: String,
    pub tags: Vec<String>,
}

impl Extension {
    /// Builds the API view of an extension from its descriptive fields and its latest version,
    /// named after the single instance of its kind; the merge names the instance that found it.
    pub fn new(key: &ExtensionKey, source: Source, info: ExtensionInfo, latest: &Version) -> Self {
        Self {
            name: key.name.as_str().to_owned(),
            ty: key.ty,
            version: latest.version.clone(),
            description: info.description,
            author: info.author,
            repository: info.repository,
            source,
            instance: source.into(),
            published_at: latest.published_at,
            download_url: latest.download_url.clone(),
            size: latest.size,
            checksum: latest.checksum.clone(),
            tags: info.tags,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_rules() {
        for ok in ["aws", "k8s-1.29", "a_b", "0day", &"a".repeat(128)] {
            assert!(ExtensionName::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "Aws",
            "-x",
            ".x",
            "a/b",
            "a..b",
            "a%2fb",
            "a\0",
            "ä",
            &"a".repeat(129),
        ] {
            assert!(ExtensionName::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn versions_follow_the_oci_tag_rule() {
        for ok in [
            "1.0.0",
            "v1.2.3-rc.1",
            "_x",
            "1.0.0+build",
            &"1".repeat(128),
        ] {
            let accepted = VersionTag::parse(ok).is_ok();
            assert_eq!(accepted, !ok.contains('+'), "{ok}");
        }
        for bad in ["", ".1", "-1", "1/2", "..", "1..2", &"1".repeat(129)] {
            assert!(VersionTag::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            VersionSelector::parse("latest").unwrap(),
            VersionSelector::Latest
        );
    }

    #[test]
    fn timestamps_render_in_utc_with_z() {
        let t = Timestamp::parse_rfc3339("2025-03-14T10:26:53+01:00").unwrap();
        assert_eq!(t.to_string(), "2025-03-14T09:26:53Z");
        assert_eq!(
            serde_json::to_string(&t).unwrap(),
            "\"2025-03-14T09:26:53Z\""
        );
    }
}
