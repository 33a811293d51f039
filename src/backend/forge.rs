//! The conventions the forge backends (Gitea/Forgejo and GitHub releases) share: which
//! repositories hold extensions (`{name}_prov|_taskserv|_cluster`), which release asset is the
//! artifact, which one carries its sha256, and how a checksum file is read.

use crate::registry::ExtensionType;

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
