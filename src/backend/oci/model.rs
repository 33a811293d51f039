//! The registry's JSON shapes (manifest, index, tag list, catalog, error body), the mapping from
//! a manifest to the domain's fields, and the naming rules that turn repositories into
//! extensions and back.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::registry::{ExtensionKey, ExtensionName, ExtensionType, Timestamp};

/// The `Accept` header for manifest GETs: distribution answers 404 to a manifest GET whose
/// `Accept` does not name the manifest's media type, even by digest.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
     application/vnd.oci.image.index.v1+json, \
     application/vnd.docker.distribution.manifest.v2+json, \
     application/vnd.docker.distribution.manifest.list.v2+json";

const ANNOTATION_TITLE: &str = "org.opencontainers.image.title";
const ANNOTATION_DESCRIPTION: &str = "org.opencontainers.image.description";
const ANNOTATION_AUTHORS: &str = "org.opencontainers.image.authors";
const ANNOTATION_CREATED: &str = "org.opencontainers.image.created";
const ANNOTATION_SOURCE: &str = "org.opencontainers.image.source";
const ANNOTATION_URL: &str = "org.opencontainers.image.url";

/// A content descriptor: what a manifest says about a blob or a child manifest.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// Tells the artifact layer apart from other layers, and a manifest from an index.
    #[serde(default)]
    pub media_type: String,
    /// `sha256:<hex>`: the blob's address and the checksum a download is verified against.
    pub digest: String,
    /// The size the publisher declared; the registry does not check it.
    #[serde(default)]
    pub size: u64,
    /// The layer's file name lives here (`org.opencontainers.image.title`).
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

/// An OCI image manifest, a Docker v2 manifest, or an index (manifest list): one shape, as the
/// fields that matter do not overlap.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ManifestDoc {
    /// Present in an image manifest; the artifact is one of them.
    #[serde(default)]
    pub layers: Vec<Descriptor>,
    /// Present in an index; it resolves to its first manifest.
    #[serde(default)]
    pub manifests: Vec<Descriptor>,
    /// Where the extension's metadata is kept.
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

impl ManifestDoc {
    /// Whether this is an index pointing at manifests rather than an image manifest.
    pub fn is_index(&self) -> bool {
        self.layers.is_empty() && !self.manifests.is_empty()
    }

    /// The layer holding the `.tar.gz`: the first with a gzip media type, else the first whose
    /// title is a `.tar.gz`/`.tgz` file name.
    pub fn artifact_layer(&self) -> Option<&Descriptor> {
        let gzip = |d: &&Descriptor| {
            let media_type = d.media_type.split(';').next().unwrap_or_default();
            media_type.trim().ends_with("gzip")
        };
        self.layers.iter().find(gzip).or_else(|| {
            self.layers
                .iter()
                .find(|d| d.title().is_some_and(is_tarball_name))
        })
    }

    /// The descriptive annotations, in the domain's terms.
    pub fn metadata(&self) -> ManifestMetadata {
        let get = |k: &str| self.annotations.get(k).map(|v| v.trim().to_owned());
        ManifestMetadata {
            description: get(ANNOTATION_DESCRIPTION).unwrap_or_default(),
            author: get(ANNOTATION_AUTHORS).unwrap_or_default(),
            repository: get(ANNOTATION_SOURCE).or_else(|| get(ANNOTATION_URL)),
            published_at: get(ANNOTATION_CREATED)
                .and_then(|c| Timestamp::parse_rfc3339(&c))
                .unwrap_or_else(Timestamp::unix_epoch),
        }
    }
}

/// What each string held in a document costs beyond its bytes: its `String` and the
/// allocator's bookkeeping, or its share of a `BTreeMap` node.
const STRING_OVERHEAD: usize = 40;

impl ManifestDoc {
    /// The heap bytes this document holds, near enough to bound a memo by bytes: its strings,
    /// each with [`STRING_OVERHEAD`], and its descriptors.
    pub fn weight(&self) -> usize {
        let strings = |m: &BTreeMap<String, String>| -> usize {
            m.iter()
                .map(|(k, v)| k.len() + v.len() + 2 * STRING_OVERHEAD)
                .sum()
        };
        let descriptor = |d: &Descriptor| {
            std::mem::size_of::<Descriptor>()
                + d.media_type.len()
                + d.digest.len()
                + 2 * STRING_OVERHEAD
                + strings(&d.annotations)
        };
        std::mem::size_of::<Self>()
            + self
                .layers
                .iter()
                .chain(&self.manifests)
                .map(descriptor)
                .sum::<usize>()
            + strings(&self.annotations)
    }
}

impl Descriptor {
    pub fn title(&self) -> Option<&str> {
        self.annotations.get(ANNOTATION_TITLE).map(String::as_str)
    }
}

fn is_tarball_name(name: &str) -> bool {
    name.ends_with(".tar.gz") || name.ends_with(".tgz")
}

/// What the manifest's annotations say about an extension.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestMetadata {
    /// `org.opencontainers.image.description`, empty when absent.
    pub description: String,
    /// `org.opencontainers.image.authors`, empty when absent.
    pub author: String,
    /// The source repository, when the publisher named one.
    pub repository: Option<String>,
    /// From `org.opencontainers.image.created`; the Unix epoch when absent or unreadable, so such
    /// versions sort as oldest among tags that are not semver.
    pub published_at: Timestamp,
}

/// `GET /v2/<name>/tags/list`.
#[derive(Debug, Deserialize)]
pub struct TagList {
    /// The repository's tags, unsorted (distribution lists them in directory order);
    /// `null` once every manifest of the repository is deleted.
    #[serde(default)]
    pub tags: Option<Vec<String>>,
}

/// `GET /v2/_catalog`.
#[derive(Debug, Deserialize)]
pub struct Catalog {
    /// One page of repository names, sorted.
    #[serde(default)]
    pub repositories: Option<Vec<String>>,
}

/// The registry's error body; `detail` changes type from call to call and is not needed.
#[derive(Debug, Deserialize)]
pub struct ErrorBody {
    /// Usually one; the first is reported.
    pub errors: Vec<ErrorEntry>,
}

#[derive(Debug, Deserialize)]
pub struct ErrorEntry {
    /// `NAME_UNKNOWN`, `MANIFEST_UNKNOWN`, ...: what tells "not found" apart.
    #[serde(default)]
    pub code: String,
    /// Human text, logged with the request id (never sent to the client).
    #[serde(default)]
    pub message: String,
}

/// The first error of a registry error body, or the start of a plain-text body, for the log.
/// Returns the error code separately so callers can tell "not found" codes apart.
pub fn describe_error_body(body: &[u8]) -> (Option<String>, String) {
    if let Ok(parsed) = serde_json::from_slice::<ErrorBody>(body) {
        if let Some(first) = parsed.errors.into_iter().next() {
            let text = format!("{}: {}", first.code, first.message);
            return (Some(first.code), text);
        }
    }
    let text: String = String::from_utf8_lossy(body)
        .chars()
        .filter(|c| !c.is_control())
        .take(200)
        .collect();
    (None, text.trim().to_owned())
}

/// Whether `digest` is `sha256:` and 64 lowercase hex digits: the only digests put into a
/// URL, and the only ones a download can be verified against.
pub fn is_sha256_digest(digest: &str) -> bool {
    digest.strip_prefix("sha256:").is_some_and(|hex| {
        hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// Error codes that mean the repository, tag or blob does not exist.
pub fn is_not_found_code(code: &str) -> bool {
    matches!(code, "MANIFEST_UNKNOWN" | "NAME_UNKNOWN" | "BLOB_UNKNOWN")
}

/// Whether a tag names a version: `latest` is a moving pointer and digest-like tags
/// (`sha256-<hex>`, referrer and signature tags) are not versions.
pub fn is_version_tag(tag: &str) -> bool {
    if tag == "latest" {
        return false;
    }
    let digest_like = tag.split_once('-').is_some_and(|(alg, rest)| {
        matches!(alg, "sha256" | "sha512")
            && rest.len() >= 64
            && rest
                .split('.')
                .next()
                .is_some_and(|hex| hex.bytes().all(|b| b.is_ascii_hexdigit()))
    });
    !digest_like
}

/// Whether `name` follows the OCI distribution repository name grammar:
/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*` components separated by `/`.
pub fn is_valid_repository(name: &str) -> bool {
    !name.is_empty() && name.len() <= 255 && name.split('/').all(is_valid_component)
}

fn is_valid_component(component: &str) -> bool {
    let bytes = component.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if !bytes.first().copied().is_some_and(alnum) || !bytes.last().copied().is_some_and(alnum) {
        return false;
    }
    let mut i = 0;
    while i < bytes.len() {
        if alnum(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let separator = &component[start..i];
        let ok = separator == "."
            || separator == "_"
            || separator == "__"
            || separator.bytes().all(|b| b == b'-');
        if !ok {
            return false;
        }
    }
    true
}

/// The repository suffix of each extension type.
fn suffix(ty: ExtensionType) -> &'static str {
    match ty {
        ExtensionType::Provider => "-provider",
        ExtensionType::Taskserv => "-taskserv",
        ExtensionType::Cluster => "-cluster",
    }
}

/// `{namespace}/{name}-{type}`, or `None` when that is not a valid repository name (an
/// extension name may end in `-` or hold `..`-free runs the OCI grammar refuses).
pub fn repository_of(namespace: &str, key: &ExtensionKey) -> Option<String> {
    let repo = format!("{namespace}/{}{}", key.name, suffix(key.ty));
    is_valid_repository(&repo).then_some(repo)
}

/// The extension a repository holds, if it is `{namespace}/{name}-{type}` with a valid name.
pub fn extension_of(namespace: &str, repository: &str) -> Option<ExtensionKey> {
    let rest = repository.strip_prefix(namespace)?.strip_prefix('/')?;
    if rest.contains('/') || !is_valid_repository(repository) {
        return None;
    }
    ExtensionType::ALL.into_iter().find_map(|ty| {
        let name = rest.strip_suffix(suffix(ty))?;
        let name = ExtensionName::parse(name).ok()?;
        Some(ExtensionKey { ty, name })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_bodies_of_any_detail_type_and_plain_text_are_read() {
        for body in [
            r#"{"errors":[{"code":"NAME_UNKNOWN","message":"repository name not known to registry","detail":{"name":"p/x"}}]}"#,
            r#"{"errors":[{"code":"BLOB_UNKNOWN","message":"blob unknown to registry","detail":"sha256:00"}]}"#,
            r#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required","detail":null}]}"#,
            r#"{"errors":[{"code":"DENIED","message":"no","detail":[{"Type":"repository"}]}]}"#,
        ] {
            let (code, text) = describe_error_body(body.as_bytes());
            let code = code.unwrap();
            assert!(text.starts_with(&code), "{text}");
        }
        let (code, text) = describe_error_body(b"404 page not found\n");
        assert_eq!((code, text.as_str()), (None, "404 page not found"));
        assert!(is_not_found_code("MANIFEST_UNKNOWN") && !is_not_found_code("DENIED"));
        assert!(is_sha256_digest(&format!("sha256:{}", "0a".repeat(32))));
        for bad in [
            "sha256:../../x",
            "sha512:00",
            &format!("sha256:{}", "0A".repeat(32)),
        ] {
            assert!(!is_sha256_digest(bad), "{bad}");
        }
    }

    #[test]
    fn annotations_map_to_metadata_and_absent_ones_to_defaults() {
        let doc: ManifestDoc = serde_json::from_str(
            r#"{"schemaVersion":2,"layers":[
                 {"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:aa","size":1},
                 {"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:bb","size":7}],
               "annotations":{"org.opencontainers.image.description":"AWS",
                 "org.opencontainers.image.authors":"team",
                 "org.opencontainers.image.created":"2025-03-14T10:26:53+01:00",
                 "org.opencontainers.image.url":"https://example.com/aws"}}"#,
        )
        .unwrap();
        let meta = doc.metadata();
        assert_eq!(meta.description, "AWS");
        assert_eq!(meta.author, "team");
        assert_eq!(meta.repository.as_deref(), Some("https://example.com/aws"));
        assert_eq!(meta.published_at.to_string(), "2025-03-14T09:26:53Z");
        assert_eq!(doc.artifact_layer().unwrap().digest, "sha256:bb");

        let bare: ManifestDoc = serde_json::from_str(
            r#"{"layers":[{"mediaType":"application/octet-stream","digest":"sha256:cc","size":3,
                 "annotations":{"org.opencontainers.image.title":"x-1.0.0.tgz"}}]}"#,
        )
        .unwrap();
        assert_eq!(bare.metadata().published_at, Timestamp::unix_epoch());
        assert_eq!(bare.metadata().repository, None);
        assert_eq!(bare.artifact_layer().unwrap().digest, "sha256:cc");
        let none: ManifestDoc = serde_json::from_str(r#"{"layers":[]}"#).unwrap();
        assert!(none.artifact_layer().is_none() && !none.is_index());
    }

    #[test]
    fn latest_and_digest_tags_are_not_versions() {
        assert!(is_version_tag("1.2.0") && is_version_tag("nightly") && is_version_tag("v2"));
        assert!(!is_version_tag("latest"));
        let hex = "a".repeat(64);
        assert!(!is_version_tag(&format!("sha256-{hex}")));
        assert!(!is_version_tag(&format!("sha256-{hex}.sig")));
        assert!(is_version_tag("sha256-notadigest"));
    }

    #[test]
    fn repository_names_follow_the_oci_grammar() {
        for ok in ["a", "provisioning/aws-provider", "a__b/c--d", "x.y/z_1"] {
            assert!(is_valid_repository(ok), "{ok}");
        }
        for bad in [
            "", "A", "a/", "/a", "a//b", "a-", "a___b", "a._b", "a/.b", "ä",
        ] {
            assert!(!is_valid_repository(bad), "{bad:?}");
        }
    }

    #[test]
    fn repositories_and_extensions_map_both_ways() {
        let key = extension_of("provisioning", "provisioning/aws-provider").unwrap();
        assert_eq!(key.to_string(), "provider/aws");
        assert_eq!(
            repository_of("provisioning", &key).as_deref(),
            Some("provisioning/aws-provider")
        );
        let k8s = extension_of("org/ext", "org/ext/k8s-1.29-taskserv").unwrap();
        assert_eq!(k8s.to_string(), "taskserv/k8s-1.29");
        for other in [
            "provisioning/readme",
            "provisioning/-provider",
            "other/aws-provider",
            "provisioning/sub/aws-provider",
            "provisioningx/aws-provider",
        ] {
            assert!(extension_of("provisioning", other).is_none(), "{other}");
        }
        let trailing_dash = ExtensionKey {
            ty: ExtensionType::Cluster,
            name: ExtensionName::parse("a-").unwrap(),
        };
        assert_eq!(
            repository_of("provisioning", &trailing_dash).as_deref(),
            Some("provisioning/a--cluster")
        );
        let underscores = ExtensionKey {
            ty: ExtensionType::Cluster,
            name: ExtensionName::parse("a___b").unwrap(),
        };
        assert_eq!(repository_of("provisioning", &underscores), None);
    }
}
