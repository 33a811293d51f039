//! Search over a listing: case-insensitive match on name and description, ranked exact name,
//! name prefix, name substring, description substring; ties broken by name.

use crate::registry::Extension;

/// How well an extension matches a query; lower is better.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Rank {
    ExactName,
    NamePrefix,
    NameSubstring,
    Description,
}

fn rank(ext: &Extension, needle: &str) -> Option<Rank> {
    let name = ext.name.to_lowercase();
    if name == needle {
        Some(Rank::ExactName)
    } else if name.starts_with(needle) {
        Some(Rank::NamePrefix)
    } else if name.contains(needle) {
        Some(Rank::NameSubstring)
    } else if ext.description.to_lowercase().contains(needle) {
        Some(Rank::Description)
    } else {
        None
    }
}

/// The matches of `query` in `extensions`, best first, at most `limit` of them.
pub fn search<'a>(extensions: &'a [Extension], query: &str, limit: usize) -> Vec<&'a Extension> {
    let needle = query.to_lowercase();
    let mut hits: Vec<(Rank, &Extension)> = extensions
        .iter()
        .filter_map(|e| rank(e, &needle).map(|r| (r, e)))
        .collect();
    hits.sort_by(|(ra, a), (rb, b)| {
        ra.cmp(rb)
            .then_with(|| a.name.cmp(&b.name))
            .then_with(|| a.ty.cmp(&b.ty))
            .then_with(|| a.source.cmp(&b.source))
    });
    hits.into_iter().take(limit).map(|(_, e)| e).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{ExtensionType, Source, Timestamp};

    fn ext(name: &str, description: &str) -> Extension {
        Extension {
            name: name.into(),
            ty: ExtensionType::Provider,
            version: "1.0.0".into(),
            description: description.into(),
            author: String::new(),
            repository: String::new(),
            source: Source::Local,
            instance: Source::Local.into(),
            published_at: Timestamp::unix_epoch(),
            download_url: String::new(),
            size: 0,
            checksum: None,
            tags: Vec::new(),
        }
    }

    #[test]
    fn ranks_exact_prefix_substring_description() {
        let all = [
            ext("myaws", "x"),
            ext("cloud", "Runs on AWS"),
            ext("aws-lite", "x"),
            ext("aws", "x"),
            ext("azure", "x"),
            ext("aws-extra", "x"),
        ];
        let names: Vec<_> = search(&all, "AWS", 10).iter().map(|e| &e.name).collect();
        assert_eq!(names, ["aws", "aws-extra", "aws-lite", "myaws", "cloud"]);
        assert_eq!(search(&all, "aws", 2).len(), 2);
    }
}
