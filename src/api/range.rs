//! `Range` and `If-Range` of a download, read strictly into the domain's [`ByteRange`], so the
//! backends never see header text. RFC 9110 §14.2 lets a server ignore `Range`, and this edge
//! does whenever the header is not one satisfiable-looking byte range: several ranges, another
//! unit, a malformed or overlong value, or several `Range` lines all answer 200 with the whole
//! artifact. `If-Range` holds only for a strong entity-tag (the download's ETag is
//! `"sha256:<hex>"`); a weak one, a date (downloads carry no `Last-Modified` to match it) or a
//! malformed one can never match, so the range is dropped and the whole artifact served.

use http::header::{IF_RANGE, RANGE};
use http::HeaderMap;

use crate::registry::{ByteRange, RangeSpec};

/// The longest `Range` value read, in bytes: `bytes=` and two 20-digit numbers fit with room
/// to spare; anything longer is ignored unread.
pub const MAX_RANGE_HEADER: usize = 64;

/// The longest `If-Range` value read: a `"sha256:<64 hex>"` tag is 73 bytes.
pub const MAX_IF_RANGE_HEADER: usize = 128;

/// The range a GET asks for, or `None` when the whole artifact is to be served.
pub fn requested(headers: &HeaderMap) -> Option<ByteRange> {
    let spec = parse_range(only(headers, RANGE)?.as_bytes())?;
    let if_etag = match headers.get(IF_RANGE) {
        None => None,
        Some(_) => Some(strong_etag(only(headers, IF_RANGE)?.as_bytes())?),
    };
    Some(ByteRange { spec, if_etag })
}

/// The one line of a header, `None` when it appears more than once (or not at all).
fn only(headers: &HeaderMap, name: http::HeaderName) -> Option<&http::HeaderValue> {
    let mut lines = headers.get_all(name).iter();
    match (lines.next(), lines.next()) {
        (Some(line), None) => Some(line),
        _ => None,
    }
}

/// `bytes=a-b`, `bytes=a-` or `bytes=-n` (unit case-insensitive, optional whitespace around
/// the range), with `a <= b`; anything else is `None`.
fn parse_range(value: &[u8]) -> Option<RangeSpec> {
    if value.len() > MAX_RANGE_HEADER {
        return None;
    }
    let text = std::str::from_utf8(value).ok()?;
    let (unit, spec) = text.split_once('=')?;
    if !unit.eq_ignore_ascii_case("bytes") {
        return None;
    }
    let (first, last) = spec.trim_matches([' ', '\t']).split_once('-')?;
    match (first, last) {
        ("", n) => Some(RangeSpec::Suffix(number(n)?)),
        (first, "") => Some(RangeSpec::From(number(first)?)),
        (first, last) => {
            // Compared as written: two numbers past `u64::MAX` both read as it.
            let ordered = not_above(first, last);
            let (first, last) = (number(first)?, number(last)?);
            ordered.then_some(RangeSpec::Bounded { first, last })
        }
    }
}

/// A run of ASCII digits (no sign, no space); one too large for a `u64` is `u64::MAX`, past the
/// end of any artifact, as RFC 9110 §14.1.2 puts no bound on the digits: an end so large is cut
/// to the artifact's, a suffix so long is all of it, and a start so large is unsatisfiable.
fn number(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(text.parse().unwrap_or(u64::MAX))
}

/// Whether the decimal `a` is at most `b`, however many digits either has.
fn not_above(a: &str, b: &str) -> bool {
    let (a, b) = (a.trim_start_matches('0'), b.trim_start_matches('0'));
    (a.len(), a) <= (b.len(), b)
}

/// A strong entity-tag (`"…"` of RFC 9110 `etagc` characters), quotes included.
fn strong_etag(value: &[u8]) -> Option<String> {
    if value.len() > MAX_IF_RANGE_HEADER {
        return None;
    }
    let text = std::str::from_utf8(value).ok()?.trim_matches([' ', '\t']);
    let opaque = text.strip_prefix('"')?.strip_suffix('"')?;
    opaque
        .bytes()
        .all(|b| b == 0x21 || (0x23..=0x7e).contains(&b))
        .then(|| text.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(lines: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in lines {
            map.append(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    fn spec(range: &str) -> Option<RangeSpec> {
        requested(&headers(&[("range", range)])).map(|r| r.spec)
    }

    #[test]
    fn one_byte_range_is_read() {
        use RangeSpec::*;
        let cases = [
            ("bytes=0-99", Bounded { first: 0, last: 99 }),
            ("bytes=5-5", Bounded { first: 5, last: 5 }),
            ("BYTES=10-", From(10)),
            ("bytes=-500", Suffix(500)),
            ("bytes=-0", Suffix(0)),
            ("bytes= 1-2 ", Bounded { first: 1, last: 2 }),
            ("bytes=007-", From(7)),
            ("bytes=18446744073709551615-", From(u64::MAX)),
            ("bytes=18446744073709551616-", From(u64::MAX)),
            (
                "bytes=0-99999999999999999999999",
                Bounded {
                    first: 0,
                    last: u64::MAX,
                },
            ),
            ("bytes=-18446744073709551616", Suffix(u64::MAX)),
            (
                "bytes=20000000000000000000-30000000000000000000",
                Bounded {
                    first: u64::MAX,
                    last: u64::MAX,
                },
            ),
            ("bytes=007-7", Bounded { first: 7, last: 7 }),
        ];
        for (value, expected) in cases {
            assert_eq!(spec(value), Some(expected), "{value}");
        }
    }

    #[test]
    fn anything_else_is_ignored() {
        for value in [
            "bytes=0-1,5-6",
            "bytes=0-1,",
            "bytes=5-3",
            "bytes=-",
            "bytes=",
            "bytes=a-b",
            "bytes=+1-2",
            "bytes=1 -2",
            "bytes=0x10-",
            "bytes=99999999999999999999999-1",
            "bytes=30000000000000000000-20000000000000000000",
            "items=0-1",
            "bytes 0-1",
            "0-1",
            "",
            "bytes=1-2-3",
            format!("bytes=0-{}", "0".repeat(80)).as_str(),
        ] {
            assert_eq!(spec(value), None, "{value}");
        }
        let twice = headers(&[("range", "bytes=0-1"), ("range", "bytes=2-3")]);
        assert_eq!(requested(&twice), None);
        assert_eq!(requested(&HeaderMap::new()), None);
    }

    #[test]
    fn if_range_keeps_the_range_only_with_one_strong_entity_tag() {
        let tag = format!("\"sha256:{}\"", "ab".repeat(32));
        let asked = requested(&headers(&[
            ("range", "bytes=1-"),
            ("if-range", tag.as_str()),
        ]))
        .unwrap();
        assert_eq!(asked.if_etag.as_deref(), Some(tag.as_str()));
        for validator in [
            format!("W/{tag}"),
            "Wed, 21 Oct 2015 07:28:00 GMT".to_owned(),
            "\"unclosed".to_owned(),
            "\"in\"side\"".to_owned(),
            format!("\"{}\"", "a".repeat(200)),
        ] {
            let found = requested(&headers(&[
                ("range", "bytes=1-"),
                ("if-range", validator.as_str()),
            ]));
            assert_eq!(found, None, "{validator}");
        }
        let twice = headers(&[
            ("range", "bytes=1-"),
            ("if-range", tag.as_str()),
            ("if-range", tag.as_str()),
        ]);
        assert_eq!(requested(&twice), None);
    }
}
