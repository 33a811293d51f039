//! Version constraints: what `?constraint=` and the batch resolve accept, parsed into sets of
//! comparators over the project's version ordering ([`super::version`]). Pure: no I/O.
//!
//! Both grammars are accepted, in one syntax:
//! - npm/Cargo: `1.2.3`, `=1.2.3`, `^1.2`, `~1.4`, `1.x`, `1.2.*`, `*`, comparators
//!   `>=1.2, <2.0` (a comma or a space means "and"), `a || b` (or), hyphen ranges `1.2 - 1.4`;
//! - Terraform/OpenTofu: `~> 1.4` (pessimistic), `>= 1.2, != 1.3.1, < 2.0`.
//!
//! Where the grammars disagree about a partial version, the npm/Cargo meaning is taken: `1.2`
//! and `=1.2` mean any 1.2.x, `> 1.2` means at least 1.3.0, `<= 1.2` means up to any 1.2.x.
//! `!=`, which only Terraform has, pads with zeros: `!= 1.3` excludes 1.3.0 alone. `~> 1`
//! means 1.x, as Terraform's provider constraints read it. Upper bounds that the grammar
//! implies (`^1.2` is below 2.0.0) exclude the prereleases of that bound (`2.0.0-rc.1`).
//!
//! A leading `v` on a version is tolerated. A version that is not semver (`nightly`) matches
//! only a constraint naming exactly that tag. A prerelease matches only when the caller asks
//! for prereleases or when a comparator of the same alternative names a prerelease of the
//! same major.minor.patch (npm's rule): `>=1.3.0-beta.1` admits `1.3.0-beta.2`, not
//! `1.4.0-alpha`.

use std::cmp::Ordering;

use semver::{Prerelease, Version as Semver};

use crate::registry::version::{parse_semver, ParsedVersion};
use crate::registry::{Version, VersionTag};

/// Longest constraint accepted, in bytes.
pub const MAX_LEN: usize = 256;

/// What a valid constraint looks like, for error messages.
const VALID_FORMS: &str = "use an exact version (1.2.3, =1.2.3, v1.2.3), a wildcard (1.x, \
    1.2.*, *), a caret or tilde range (^1.2, ~1.4), a pessimistic range (~> 1.4), comparators \
    joined by ',' or ' ' (>= 1.2, != 1.3.1, < 2.0), a hyphen range (1.2 - 1.4), alternatives \
    joined by '||', or an exact tag that is not semver (nightly)";

/// Why a constraint was refused; its text says what is valid.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid constraint: {reason}; {VALID_FORMS}")]
pub struct ConstraintError {
    reason: String,
}

fn invalid(reason: impl Into<String>) -> ConstraintError {
    ConstraintError {
        reason: reason.into(),
    }
}

/// A parsed constraint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Constraint {
    kind: Kind,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Kind {
    /// A tag that is not semver: matches that tag only.
    Tag(String),
    /// Alternatives (`||`); a version matches when it satisfies any of them.
    Alternatives(Vec<Set>),
}

/// What one scan for the best version found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pick<'v> {
    /// The highest version that satisfies the constraint.
    pub best: Option<&'v Version>,
    /// When there is none and prereleases were not asked for: the highest prerelease that
    /// would satisfy it with them.
    pub prerelease_would: Option<&'v Version>,
}

/// Comparators that must all hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Set {
    comparators: Vec<Comparator>,
    /// The major.minor.patch of every prerelease a comparator names: prereleases of these
    /// admit themselves (npm's rule).
    prereleases_of: Vec<(u64, u64, u64)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Comparator {
    op: Op,
    version: Semver,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

/// The operators a comparator may start with, longest first so `~>` is not read as `~`.
const OPERATORS: [&str; 9] = ["~>", ">=", "<=", "!=", ">", "<", "=", "^", "~"];

/// Semver precedence: build metadata does not count.
fn precedence(a: &Semver, b: &Semver) -> Ordering {
    (a.major, a.minor, a.patch, &a.pre).cmp(&(b.major, b.minor, b.patch, &b.pre))
}

impl Comparator {
    fn matches(&self, v: &Semver) -> bool {
        let ord = precedence(v, &self.version);
        match self.op {
            Op::Eq => ord == Ordering::Equal,
            Op::Ne => ord != Ordering::Equal,
            Op::Lt => ord == Ordering::Less,
            Op::Le => ord != Ordering::Greater,
            Op::Gt => ord == Ordering::Greater,
            Op::Ge => ord != Ordering::Less,
        }
    }
}

impl Set {
    fn matches(&self, v: &Semver, prerelease: bool) -> bool {
        let pre_allowed = v.pre.is_empty()
            || prerelease
            || self.prereleases_of.contains(&(v.major, v.minor, v.patch));
        pre_allowed && self.comparators.iter().all(|c| c.matches(v))
    }

    fn push(&mut self, op: Op, version: Semver) {
        self.comparators.push(Comparator { op, version });
    }
}

/// A version as a constraint writes it: missing or wildcard parts are `None`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Partial {
    major: Option<u64>,
    minor: Option<u64>,
    patch: Option<u64>,
    pre: Prerelease,
}

/// `major.minor.patch-pre` without build metadata.
fn semver(major: u64, minor: u64, patch: u64, pre: Prerelease) -> Semver {
    Semver {
        major,
        minor,
        patch,
        pre,
        build: semver::BuildMetadata::EMPTY,
    }
}

/// The lowest prerelease of a version, so `< 2.0.0-0` excludes 2.0.0's prereleases too.
fn lowest_pre() -> Prerelease {
    Prerelease::new("0").unwrap_or(Prerelease::EMPTY)
}

fn bump(n: u64) -> Result<u64, ConstraintError> {
    n.checked_add(1)
        .ok_or_else(|| invalid("a version number is too large"))
}

impl Partial {
    fn parse(text: &str) -> Result<Self, ConstraintError> {
        // A lower-case `v` alone, as the ordering tolerates it (`registry::version`): read
        // as semver, `V4.0.0` could never match the tag, which the ordering keeps as a tag.
        let bare = text.strip_prefix('v').unwrap_or(text);
        let bare = bare.split_once('+').map_or(bare, |(v, _build)| v);
        let (numbers, pre) = match bare.split_once('-') {
            Some((numbers, pre)) => (numbers, Some(pre)),
            None => (bare, None),
        };
        let not_a_version = || invalid(format!("'{text}' is not a version"));
        let mut parts = [None; 3];
        let mut wildcard_seen = false;
        let mut count = 0;
        for (i, piece) in numbers.split('.').enumerate() {
            let slot = parts.get_mut(i).ok_or_else(not_a_version)?;
            count = i + 1;
            if matches!(piece, "x" | "X" | "*") {
                wildcard_seen = true;
            } else if wildcard_seen {
                return Err(invalid(format!(
                    "'{text}': a number may not follow a wildcard"
                )));
            } else if !piece.is_empty() && piece.bytes().all(|b| b.is_ascii_digit()) {
                *slot = Some(piece.parse::<u64>().map_err(|_| not_a_version())?);
            } else {
                return Err(not_a_version());
            }
        }
        let pre = match pre {
            None => Prerelease::EMPTY,
            Some(_) if count < 3 || wildcard_seen => {
                return Err(invalid(format!(
                    "'{text}': a prerelease needs a full major.minor.patch version"
                )))
            }
            Some(pre) => Prerelease::new(pre).map_err(|_| not_a_version())?,
        };
        let [major, minor, patch] = parts;
        Ok(Self {
            major,
            minor,
            patch,
            pre,
        })
    }

    /// The version with missing parts as zeros.
    fn floor(&self) -> Semver {
        semver(
            self.major.unwrap_or(0),
            self.minor.unwrap_or(0),
            self.patch.unwrap_or(0),
            self.pre.clone(),
        )
    }

    /// The first version above every version this partial stands for, or `None` when it
    /// stands for a single version (or for all of them).
    fn ceiling(&self) -> Result<Option<Semver>, ConstraintError> {
        Ok(match (self.major, self.minor, self.patch) {
            (Some(major), None, _) => Some(semver(bump(major)?, 0, 0, lowest_pre())),
            (Some(major), Some(minor), None) => Some(semver(major, bump(minor)?, 0, lowest_pre())),
            _ => None,
        })
    }

    fn is_full(&self) -> bool {
        self.patch.is_some()
    }
}

/// Adds the comparators of one `op version` to `set`.
fn desugar(set: &mut Set, op: &str, p: &Partial) -> Result<(), ConstraintError> {
    if !p.pre.is_empty() {
        set.prereleases_of.push((
            p.major.unwrap_or(0),
            p.minor.unwrap_or(0),
            p.patch.unwrap_or(0),
        ));
    }
    let floor = p.floor();
    let any = p.major.is_none();
    match op {
        "" | "=" => match p.ceiling()? {
            _ if any => {}
            Some(ceiling) => {
                set.push(Op::Ge, floor);
                set.push(Op::Lt, ceiling);
            }
            None => set.push(Op::Eq, floor),
        },
        "!=" if any => return Err(invalid("'!=' needs a version, not a wildcard")),
        "!=" => set.push(Op::Ne, floor),
        ">=" => set.push(Op::Ge, floor),
        "<=" => match p.ceiling()? {
            _ if any => {}
            Some(ceiling) => set.push(Op::Lt, ceiling),
            None => set.push(Op::Le, floor),
        },
        // Nothing is above or below every version.
        ">" | "<" if any => set.push(Op::Lt, semver(0, 0, 0, lowest_pre())),
        ">" => match p.ceiling()? {
            Some(mut ceiling) => {
                ceiling.pre = Prerelease::EMPTY;
                set.push(Op::Ge, ceiling);
            }
            None => set.push(Op::Gt, floor),
        },
        "<" if p.is_full() => set.push(Op::Lt, floor),
        "<" => set.push(Op::Lt, semver(floor.major, floor.minor, 0, lowest_pre())),
        "^" | "~" | "~>" if any => {}
        "^" => {
            let ceiling = match (p.major, p.minor, p.patch) {
                (Some(0), Some(0), Some(patch)) => semver(0, 0, bump(patch)?, lowest_pre()),
                (Some(0), Some(minor), _) => semver(0, bump(minor)?, 0, lowest_pre()),
                _ => semver(bump(floor.major)?, 0, 0, lowest_pre()),
            };
            set.push(Op::Ge, floor);
            set.push(Op::Lt, ceiling);
        }
        "~" | "~>" => {
            // `~1.2` and `~1.2.3` stay within 1.2; `~> 1.2` within 1; `~1` and `~> 1` within 1.
            let within_minor = if op == "~" {
                p.minor.is_some()
            } else {
                p.is_full()
            };
            let ceiling = if within_minor {
                semver(floor.major, bump(floor.minor)?, 0, lowest_pre())
            } else {
                semver(bump(floor.major)?, 0, 0, lowest_pre())
            };
            set.push(Op::Ge, floor);
            set.push(Op::Lt, ceiling);
        }
        other => return Err(invalid(format!("unknown operator '{other}'"))),
    }
    Ok(())
}

/// Parses one alternative: a hyphen range, or comparators separated by ',' or spaces.
fn parse_set(text: &str) -> Result<Set, ConstraintError> {
    let tokens: Vec<&str> = text
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|t| !t.is_empty())
        .collect();
    if tokens.is_empty() {
        return Err(invalid("an alternative is empty"));
    }
    let mut set = Set::default();
    if tokens.contains(&"-") {
        let [low, "-", high] = tokens[..] else {
            return Err(invalid(
                "a hyphen range is 'low - high', with no other comparators",
            ));
        };
        let (low, high) = (Partial::parse(low)?, Partial::parse(high)?);
        desugar(&mut set, ">=", &low)?;
        desugar(&mut set, "<=", &high)?;
        return Ok(set);
    }
    let mut tokens = tokens.into_iter();
    while let Some(token) = tokens.next() {
        let op = OPERATORS
            .into_iter()
            .find(|op| token.starts_with(op))
            .unwrap_or("");
        let rest = &token[op.len()..];
        // An operator alone (`>= 1.2`) takes the next token; tokens are never empty, so a
        // token without an operator is its own version.
        let version = if rest.is_empty() {
            tokens
                .next()
                .ok_or_else(|| invalid(format!("'{op}' needs a version after it")))?
        } else {
            rest
        };
        if OPERATORS.iter().any(|o| version.starts_with(o)) {
            return Err(invalid(format!("'{op}' is followed by another operator")));
        }
        desugar(&mut set, op, &Partial::parse(version)?)?;
    }
    Ok(set)
}

impl Constraint {
    /// Parses a constraint in either grammar (see the module documentation).
    pub fn parse(text: &str) -> Result<Self, ConstraintError> {
        if text.len() > MAX_LEN {
            return Err(invalid(format!("it is longer than {MAX_LEN} bytes")));
        }
        let text = text.trim();
        if text.is_empty() {
            return Err(invalid("it is empty"));
        }
        let parsed = text
            .split("||")
            .map(parse_set)
            .collect::<Result<Vec<_>, _>>();
        match parsed {
            Ok(sets) => Ok(Self {
                kind: Kind::Alternatives(sets),
            }),
            Err(e) => {
                let tag = text.strip_prefix('=').unwrap_or(text);
                match VersionTag::parse(tag) {
                    Ok(tag) if parse_semver(tag.as_str()).is_none() => Ok(Self {
                        kind: Kind::Tag(tag.as_str().to_owned()),
                    }),
                    _ => Err(e),
                }
            }
        }
    }

    /// How many comparisons matching one version against the constraint makes at most: one
    /// per comparator, and at least one per alternative (`^1.2` makes 2, `*` or a tag 1).
    pub fn comparisons(&self) -> usize {
        match &self.kind {
            Kind::Tag(_) => 1,
            Kind::Alternatives(sets) => sets.iter().map(|s| s.comparators.len().max(1)).sum(),
        }
    }

    /// Whether the version satisfies the constraint; prereleases always may when
    /// `prerelease` is set.
    pub fn matches(&self, v: &ParsedVersion<'_>, prerelease: bool) -> bool {
        match &self.kind {
            Kind::Tag(wanted) => v.version.version == *wanted,
            Kind::Alternatives(sets) => v
                .semver()
                .is_some_and(|s| sets.iter().any(|set| set.matches(s, prerelease))),
        }
    }

    /// The versions that satisfy the constraint, in the order given.
    pub fn select<'v>(&self, versions: &'v [Version], prerelease: bool) -> Vec<&'v Version> {
        versions
            .iter()
            .map(ParsedVersion::new)
            .filter(|v| self.matches(v, prerelease))
            .map(|v| v.version)
            .collect()
    }

    /// The highest version that satisfies the constraint, from versions sorted newest first,
    /// and, when none does and prereleases were not asked for, the highest prerelease that
    /// would with them; in one scan, which stops at the first match.
    pub fn pick<'v>(&self, versions: &[ParsedVersion<'v>], prerelease: bool) -> Pick<'v> {
        let mut prerelease_would = None;
        for v in versions {
            if self.matches(v, prerelease) {
                return Pick {
                    best: Some(v.version),
                    prerelease_would: None,
                };
            }
            // A stable version or a tag matches alike with or without prereleases, so only
            // a prerelease can be the one that would.
            if prerelease_would.is_none() && v.is_prerelease() && self.matches(v, true) {
                prerelease_would = Some(v.version);
            }
        }
        Pick {
            best: None,
            prerelease_would,
        }
    }

    /// The available versions nearest to what the constraint asks for, at most `n`, for
    /// telling a client why nothing matched: the semver versions around the first version
    /// the constraint names, highest first; for a tag, or among tags only, the first `n`.
    pub fn nearest<'v>(&self, versions: &[ParsedVersion<'v>], n: usize) -> Vec<&'v str> {
        let pivot = match &self.kind {
            Kind::Alternatives(sets) => sets
                .iter()
                .flat_map(|s| s.comparators.first())
                .map(|c| &c.version)
                .next(),
            Kind::Tag(_) => None,
        };
        let mut semvers: Vec<(&Semver, &'v str)> = versions
            .iter()
            .filter_map(|v| Some((v.semver()?, v.version.version.as_str())))
            .collect();
        let Some(pivot) = pivot.filter(|_| !semvers.is_empty()) else {
            return versions
                .iter()
                .take(n)
                .map(|v| v.version.version.as_str())
                .collect();
        };
        semvers.sort_by(|a, b| precedence(b.0, a.0));
        // The first version below the pivot, with up to n/2 above it and the rest below.
        let split = semvers
            .iter()
            .position(|(s, _)| precedence(s, pivot) == Ordering::Less)
            .unwrap_or(semvers.len());
        let start = split.saturating_sub(n / 2);
        let start = start.min(semvers.len().saturating_sub(n));
        semvers
            .into_iter()
            .skip(start)
            .take(n)
            .map(|(_, tag)| tag)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::version::parse_lazily;
    use crate::registry::Timestamp;

    /// The version set every case is matched against, newest first as backends answer.
    const SET: [&str; 19] = [
        "2.1.0",
        "2.0.0",
        "2.0.0-rc.1",
        "1.10.0",
        "1.4.7",
        "1.4.0",
        "1.3.1",
        "1.3.0",
        "1.3.0-beta.1",
        "1.2.9",
        "v1.2.3",
        "1.2.0",
        "1.0.0",
        "0.2.5",
        "0.1.0",
        "0.0.4",
        "0.0.3",
        // Not semver: the ordering tolerates a lower-case `v` alone.
        "V4.0.0",
        "nightly",
    ];

    fn versions() -> Vec<Version> {
        SET.iter()
            .map(|tag| Version {
                version: (*tag).into(),
                published_at: Timestamp::unix_epoch(),
                download_url: String::new(),
                size: 0,
                checksum: None,
            })
            .collect()
    }

    fn matching(constraint: &str, prerelease: bool) -> Vec<String> {
        let c =
            Constraint::parse(constraint).unwrap_or_else(|e| panic!("{constraint:?} refused: {e}"));
        c.select(&versions(), prerelease)
            .into_iter()
            .map(|v| v.version.clone())
            .collect()
    }

    const ONE_X: &str = "1.10.0 1.4.7 1.4.0 1.3.1 1.3.0 1.2.9 v1.2.3 1.2.0 1.0.0";
    const ZERO_X: &str = "0.2.5 0.1.0 0.0.4 0.0.3";
    const EVERY_SEMVER: &str = "2.1.0 2.0.0 2.0.0-rc.1 1.10.0 1.4.7 1.4.0 1.3.1 1.3.0 \
                                1.3.0-beta.1 1.2.9 v1.2.3 1.2.0 1.0.0 0.2.5 0.1.0 0.0.4 0.0.3";
    const STABLE: &str = "2.1.0 2.0.0 1.10.0 1.4.7 1.4.0 1.3.1 1.3.0 1.2.9 v1.2.3 1.2.0 1.0.0 \
                          0.2.5 0.1.0 0.0.4 0.0.3";

    #[test]
    fn constraints_select_the_right_versions() {
        // (constraint, prerelease=true, the matching versions newest first)
        let cases: &[(&str, bool, &str)] = &[
            // npm / Cargo: exact versions, with or without '=' and 'v'.
            ("1.2.3", false, "v1.2.3"),
            ("=1.2.3", false, "v1.2.3"),
            ("v1.2.3", false, "v1.2.3"),
            ("=v1.2.3", false, "v1.2.3"),
            ("1.2.3+build.7", false, "v1.2.3"),
            ("2.0.0-rc.1", false, "2.0.0-rc.1"),
            // Caret: up to the next major, or minor below 1.0, or patch below 0.1.
            ("^1.2", false, "1.10.0 1.4.7 1.4.0 1.3.1 1.3.0 1.2.9 v1.2.3 1.2.0"),
            ("^1.2.5", false, "1.10.0 1.4.7 1.4.0 1.3.1 1.3.0 1.2.9"),
            ("^v1.4", false, "1.10.0 1.4.7 1.4.0"),
            ("^0.2", false, "0.2.5"),
            ("^0.0.3", false, "0.0.3"),
            ("^0", false, ZERO_X),
            // Tilde: within the minor when one is given.
            ("~1.4", false, "1.4.7 1.4.0"),
            ("~1.2.5", false, "1.2.9"),
            ("~1", false, ONE_X),
            // Wildcards and partial versions.
            ("1.x", false, ONE_X),
            ("1", false, ONE_X),
            ("1.2.*", false, "1.2.9 v1.2.3 1.2.0"),
            ("1.2.X", false, "1.2.9 v1.2.3 1.2.0"),
            ("=1.2", false, "1.2.9 v1.2.3 1.2.0"),
            ("*", false, STABLE),
            ("3.x", false, ""),
            // Comparators: comma or space mean "and"; partial versions as npm reads them.
            (">=1.2, <2.0", false, "1.10.0 1.4.7 1.4.0 1.3.1 1.3.0 1.2.9 v1.2.3 1.2.0"),
            (">=1.2 <1.4", false, "1.3.1 1.3.0 1.2.9 v1.2.3 1.2.0"),
            (">=1.2,<=1.3", false, "1.3.1 1.3.0 1.2.9 v1.2.3 1.2.0"),
            (">1.2", false, "2.1.0 2.0.0 1.10.0 1.4.7 1.4.0 1.3.1 1.3.0"),
            (">1.2.3", false, "2.1.0 2.0.0 1.10.0 1.4.7 1.4.0 1.3.1 1.3.0 1.2.9"),
            ("<=1.2", false, "1.2.9 v1.2.3 1.2.0 1.0.0 0.2.5 0.1.0 0.0.4 0.0.3"),
            ("<1.2", false, "1.0.0 0.2.5 0.1.0 0.0.4 0.0.3"),
            (">= v1.10", false, "2.1.0 2.0.0 1.10.0"),
            ("<= 0.1", false, "0.1.0 0.0.4 0.0.3"),
            // Alternatives and hyphen ranges.
            ("^1.3 || ^0.1", false, "1.10.0 1.4.7 1.4.0 1.3.1 1.3.0 0.1.0"),
            ("1.2.3 || 2.1.0", false, "2.1.0 v1.2.3"),
            ("1.2 - 1.4", false, "1.4.7 1.4.0 1.3.1 1.3.0 1.2.9 v1.2.3 1.2.0"),
            ("1.2.3 - 1.3.0", false, "1.3.0 1.2.9 v1.2.3"),
            ("* - 1.0", false, "1.0.0 0.2.5 0.1.0 0.0.4 0.0.3"),
            // Prereleases: only when asked for, or named with the same major.minor.patch.
            ("*", true, EVERY_SEMVER),
            ("^1.2", true, "1.10.0 1.4.7 1.4.0 1.3.1 1.3.0 1.3.0-beta.1 1.2.9 v1.2.3 1.2.0"),
            ("<2.0.0", true, &EVERY_SEMVER[12..]),
            (">=1.3.0-beta.1", false, "2.1.0 2.0.0 1.10.0 1.4.7 1.4.0 1.3.1 1.3.0 1.3.0-beta.1"),
            (">=1.3.0-beta.1 <1.3.0 || >=2.0.0-rc.0", false, "2.1.0 2.0.0 2.0.0-rc.1 1.3.0-beta.1"),
            // Tags that are not semver match only exactly, and nothing else matches them.
            ("nightly", false, "nightly"),
            ("=nightly", false, "nightly"),
            ("V4.0.0", false, "V4.0.0"),
            ("=V4.0.0", false, "V4.0.0"),
            (">=0.0.0", true, EVERY_SEMVER),
            // Terraform / OpenTofu: pessimistic ranges.
            ("~> 1.4", false, "1.10.0 1.4.7 1.4.0"),
            ("~>1.4", false, "1.10.0 1.4.7 1.4.0"),
            ("~> 1.2.0", false, "1.2.9 v1.2.3 1.2.0"),
            ("~> 1.3.1", false, "1.3.1"),
            ("~> 1", false, ONE_X),
            ("~> 2.0", true, "2.1.0 2.0.0"),
            ("~> 2.0.0-rc.1", false, "2.0.0 2.0.0-rc.1"),
            ("~> v0.1", false, "0.2.5 0.1.0"),
            // Terraform comparator lists, with spaces after operators and '!='.
            (">= 1.2, != 1.3.1, < 2.0", false, "1.10.0 1.4.7 1.4.0 1.3.0 1.2.9 v1.2.3 1.2.0"),
            (">= 1.2.0, < 1.3.0", false, "1.2.9 v1.2.3 1.2.0"),
            ("= 1.4.7", false, "1.4.7"),
            ("!= 1.3", false, "2.1.0 2.0.0 1.10.0 1.4.7 1.4.0 1.3.1 1.2.9 v1.2.3 1.2.0 1.0.0 0.2.5 0.1.0 0.0.4 0.0.3"),
            ("> 2.0.0, != 2.1.0", false, ""),
        ];
        assert!(cases.len() >= 40);
        let mut failures = Vec::new();
        for (constraint, prerelease, expected) in cases {
            let got = matching(constraint, *prerelease).join(" ");
            let expected = expected.split_whitespace().collect::<Vec<_>>().join(" ");
            if got != expected {
                failures.push(format!(
                    "{constraint:?} (prerelease={prerelease}):\n  got      {got}\n  expected {expected}"
                ));
            }
        }
        assert!(failures.is_empty(), "\n{}", failures.join("\n"));
    }

    #[test]
    fn invalid_constraints_say_what_is_valid() {
        let too_long = "1".repeat(MAX_LEN + 1);
        for bad in [
            "",
            "   ",
            ">=",
            "^",
            "~>",
            "1.2 -",
            "- 1.2",
            "1.2 - 1.4 - 1.6",
            ">= 1.2 - 1.4",
            "1.x.3 || 2",
            ">1.2-rc.1",
            ">=nightly",
            "!= *",
            "^1.2 ||",
            "|| ^1",
            "^1.2 || nightly",
            "a b",
            ">>1",
            "=>1.2",
            "^18446744073709551615",
            "1.2.3/4",
            "1.2.3 !",
            &too_long,
        ] {
            let error = Constraint::parse(bad).expect_err(bad).to_string();
            assert!(
                error.starts_with("invalid constraint: ") && error.contains("~> 1.4"),
                "{bad:?}: {error}"
            );
        }
    }

    #[test]
    fn the_best_is_the_highest_match() {
        let vs = versions();
        let parsed = parse_lazily(&vs);
        let best = |c: &str, pre| {
            Constraint::parse(c)
                .unwrap()
                .pick(&parsed, pre)
                .best
                .map(|v| v.version.as_str())
        };
        assert_eq!(best("^1.2", false), Some("1.10.0"));
        assert_eq!(best("*", true), Some("2.1.0"));
        assert_eq!(best("<2.0.0", true), Some("2.0.0-rc.1"));
        assert_eq!(best("nightly", false), Some("nightly"));
        assert_eq!(best("^3", false), None);
    }

    #[test]
    fn one_scan_finds_the_best_and_the_prerelease_that_would_match() {
        let vs = versions();
        let parsed = parse_lazily(&vs);
        let first = |c: &Constraint, pre| c.select(&vs, pre).first().map(|v| v.version.clone());
        for text in [
            "^1.2",
            "*",
            "<2.0.0",
            ">=2.0.0-rc.0",
            "~> 2.0",
            ">2.1",
            "<0",
            "^3",
            ">=1.3.0-beta.1",
            "2.0.0-rc.1",
            "nightly",
            "V4.0.0",
            "<0 || ^2.0.0-rc.0",
            "1.3.0 - 1.3.1",
            ">1.10.0 <2.0.0",
            ">1.2.9 <1.3.0 || <0",
        ] {
            let c = Constraint::parse(text).unwrap();
            for pre in [false, true] {
                let pick = c.pick(&parsed, pre);
                let best = pick.best.map(|v| v.version.clone());
                assert_eq!(best, first(&c, pre), "{text} (prerelease={pre})");
                let would = pick.prerelease_would.map(|v| v.version.clone());
                let expected = if best.is_none() && !pre {
                    first(&c, true)
                } else {
                    None
                };
                assert_eq!(would, expected, "{text} (prerelease={pre})");
            }
        }
        let pick = Constraint::parse(">1.10.0 <2.0.0")
            .unwrap()
            .pick(&parsed, false);
        assert_eq!(pick.best, None);
        assert_eq!(pick.prerelease_would.unwrap().version, "2.0.0-rc.1");
    }

    #[test]
    fn a_scan_reads_no_tag_past_its_match() {
        let vs = versions();
        let parsed = parse_lazily(&vs);
        let best = Constraint::parse("^2").unwrap().pick(&parsed, false).best;
        assert_eq!(best.map(|v| v.version.as_str()), Some("2.1.0"));
        assert!(parsed[0].was_read());
        assert!(parsed[1..].iter().all(|v| !v.was_read()));

        assert_eq!(
            Constraint::parse("^3").unwrap().pick(&parsed, false).best,
            None
        );
        assert!(parsed.iter().all(ParsedVersion::was_read));
    }

    #[test]
    fn comparisons_count_comparators_and_alternatives() {
        let comparisons = |c: &str| Constraint::parse(c).unwrap().comparisons();
        assert_eq!(comparisons("^1.2"), 2);
        assert_eq!(comparisons(">= 1.2, != 1.3.1, < 2.0"), 3);
        assert_eq!(comparisons(">=1.2, <2.0 || 3.x"), 4);
        assert_eq!(comparisons("*"), 1);
        assert_eq!(comparisons("nightly"), 1);
        assert_eq!(comparisons(&["<0"; 64].join("||")), 64);
    }

    #[test]
    fn nearest_versions_surround_what_was_asked() {
        let vs = versions();
        let parsed = parse_lazily(&vs);
        let nearest = |c: &str| Constraint::parse(c).unwrap().nearest(&parsed, 4);
        assert_eq!(nearest("~1.5"), ["2.0.0-rc.1", "1.10.0", "1.4.7", "1.4.0"]);
        assert_eq!(nearest("^3"), ["2.1.0", "2.0.0", "2.0.0-rc.1", "1.10.0"]);
        assert_eq!(nearest("<0.0.1"), ["0.2.5", "0.1.0", "0.0.4", "0.0.3"]);
        assert_eq!(
            nearest("stable"),
            ["2.1.0", "2.0.0", "2.0.0-rc.1", "1.10.0"]
        );
        // Only tags: the first of them, whatever the constraint.
        let tags = &parsed[parsed.len() - 1..];
        let nearest = Constraint::parse("^1").unwrap().nearest(tags, 4);
        assert_eq!(nearest, ["nightly"]);
    }
}
