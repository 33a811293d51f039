//! Input validation at the edge: path pieces and query parameters are decoded, checked and
//! turned into domain values before any backend is asked.

use std::borrow::Cow;
use std::collections::HashSet;

use http::header::HOST;
use http::{Request, StatusCode, Version};

use crate::error::ApiError;
use crate::middleware::rate_limit::PeerAddr;

/// Longest path accepted; no valid route comes near it.
pub const MAX_PATH_LEN: usize = 1024;
/// Longest query string accepted, in bytes: room for a search text of the longest promised
/// length (256 characters) written entirely in 4-byte characters, each percent-encoded to 12
/// bytes (3,072 bytes), beside every other parameter.
pub const MAX_QUERY_LEN: usize = 4096;

/// Percent-decodes one path segment, refusing what could smuggle structure or bytes past the
/// name rules: encoded slashes and backslashes, NUL, bad escapes, non-UTF-8, dot segments.
pub fn decode_segment(raw: &str) -> Result<Cow<'_, str>, ApiError> {
    let bytes = percent_decode(raw, false)
        .ok_or_else(|| ApiError::invalid_path("malformed percent-encoding in the path"))?;
    if bytes.iter().any(|b| matches!(b, b'/' | b'\\' | 0)) {
        return Err(ApiError::invalid_path(
            "the path may not contain encoded slashes, backslashes or NUL bytes",
        ));
    }
    let text =
        utf8(raw, bytes).ok_or_else(|| ApiError::invalid_path("the path is not valid UTF-8"))?;
    if text == "." || text == ".." {
        return Err(ApiError::invalid_path(
            "the path may not contain '.' or '..' segments",
        ));
    }
    Ok(text)
}

/// What [`check_target`] found of the path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// No escape, backslash, NUL or segment starting with '.': every segment is its own
    /// decoding, and [`decode_segment`] would accept it as it is.
    Plain,
    /// Every segment decodes and passes [`decode_segment`].
    Decodable,
}

/// Checks the parts of a request target that every route shares.
pub fn check_target(path: &str, query: Option<&str>) -> Result<Path, ApiError> {
    if path.len() > MAX_PATH_LEN {
        return Err(ApiError::invalid_path(format!(
            "the path is longer than {MAX_PATH_LEN} bytes"
        )));
    }
    if query.is_some_and(|q| q.len() > MAX_QUERY_LEN) {
        return Err(ApiError::invalid_parameter(
            "query",
            format!("the query string is longer than {MAX_QUERY_LEN} bytes"),
        ));
    }
    // Almost every path has no escape, backslash, NUL or segment starting with '.': nothing
    // in it to decode or to refuse. The bytes are folded without stopping early, which the
    // compiler turns into vector compares; only a path with a '.' is looked at again.
    let bytes = path.as_bytes();
    let (escaped, dotted) = bytes.iter().fold((false, false), |(escaped, dotted), &b| {
        (
            escaped | matches!(b, b'%' | b'\\' | 0),
            dotted | (b == b'.'),
        )
    });
    let dot_segment = || {
        bytes
            .iter()
            .enumerate()
            .any(|(i, &b)| b == b'.' && (i == 0 || bytes[i - 1] == b'/'))
    };
    if !(escaped || dotted && dot_segment()) {
        return Ok(Path::Plain);
    }
    for segment in path.split('/') {
        decode_segment(segment)?;
    }
    Ok(Path::Decodable)
}

/// An HTTP/1.1 request received from a client carries exactly one `Host` (RFC 9112 §3.2).
/// Requests handed over in-process (without a peer address) have no wire form to check.
pub fn check_host<B>(req: &Request<B>) -> Result<(), ApiError> {
    let from_a_client = req.extensions().get::<PeerAddr>().is_some();
    let hosts = req.headers().get_all(HOST).iter().count();
    if from_a_client && req.version() == Version::HTTP_11 && hosts != 1 {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_host",
            format!("an HTTP/1.1 request carries exactly one Host header, not {hosts}"),
        ));
    }
    Ok(())
}

/// The value of one hex digit of a percent-escape.
pub(crate) fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// Percent-decodes `input` (and `+` to a space when `plus_is_space`); `None` for a bad escape.
/// Borrows when there is nothing to decode, as in almost every path and query, so the hot path
/// allocates nothing for it.
fn percent_decode(input: &str, plus_is_space: bool) -> Option<Cow<'_, [u8]>> {
    let input = input.as_bytes();
    if !input
        .iter()
        .any(|&b| b == b'%' || (plus_is_space && b == b'+'))
    {
        return Some(Cow::Borrowed(input));
    }
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    while i < input.len() {
        match input[i] {
            b'%' => {
                let hi = hex(*input.get(i + 1)?)?;
                let lo = hex(*input.get(i + 2)?)?;
                out.push(hi << 4 | lo);
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    Some(Cow::Owned(out))
}

/// The bytes `percent_decode` made of `input` as text: `input` itself when nothing was
/// decoded; `None` when decoded bytes are not UTF-8.
fn utf8<'a>(input: &'a str, bytes: Cow<'a, [u8]>) -> Option<Cow<'a, str>> {
    match bytes {
        Cow::Borrowed(_) => Some(Cow::Borrowed(input)),
        Cow::Owned(b) => String::from_utf8(b).ok().map(Cow::Owned),
    }
}

/// The decoded query parameters of a request. Unknown parameters are ignored; a parameter
/// given twice is refused, whichever it is, rather than one of its values silently chosen.
#[derive(Debug)]
pub struct Query<'q>(Pairs<'q>);

/// Most pairs kept in place; no route takes more than four parameters.
const IN_PLACE: usize = 4;

/// Up to this many pairs, a name is checked for a repeat by comparing it with each one before
/// it; past them, by looking it up in a set of them. A query of the longest length holds up
/// to about 1,300 pairs, and comparing each with all before it took 2.7 ms.
const COMPARED_PAIRS: usize = 16;

#[derive(Debug)]
enum Pairs<'q> {
    /// No `%`, `+` or NUL anywhere and at most [`IN_PLACE`] pairs, as almost every query:
    /// where each pair lies in the query, kept without an allocation. Offsets rather than
    /// slices keep a request's future small, which holds its query until it is answered.
    InPlace {
        query: &'q str,
        spans: [[u16; 3]; IN_PLACE],
        len: usize,
    },
    Decoded(Vec<(Cow<'q, str>, Cow<'q, str>)>),
}

/// Where each `key=value` pair lies in a query, as `[start, eq, end]`: the key is
/// `start..eq`, the value `eq + 1..end`, and a pair without `=` has `eq == end`. Found by a
/// plain scan of the bytes, which costs less than a searcher's set-up on a short query.
fn spans(query: &str) -> impl Iterator<Item = [usize; 3]> + '_ {
    let bytes = query.as_bytes();
    let find = move |from: usize, to: usize, byte: u8| {
        bytes[from..to]
            .iter()
            .position(|&b| b == byte)
            .map_or(to, |at| from + at)
    };
    let mut start = 0;
    std::iter::from_fn(move || {
        while start < bytes.len() {
            let end = find(start, bytes.len(), b'&');
            let span = [start, find(start, end, b'='), end];
            start = end + 1;
            if span[0] < end {
                return Some(span);
            }
        }
        None
    })
}

/// The key and value a span of [`spans`] marks in `query`; both end at ASCII bytes or at the
/// end, so they are whole characters.
fn pair(query: &str, [start, eq, end]: [usize; 3]) -> (&str, &str) {
    (&query[start..eq], query.get(eq + 1..end).unwrap_or(""))
}

/// The bytes of a key that [`spans`] found, to compare without slicing at characters.
fn key(query: &str, start: usize, eq: usize) -> &[u8] {
    &query.as_bytes()[start..eq]
}

/// The `key=value` pairs of a query as written; a pair without `=` has an empty value.
fn pairs(query: &str) -> impl Iterator<Item = (&str, &str)> {
    spans(query).map(|span| pair(query, span))
}

fn given_twice(name: &str) -> ApiError {
    ApiError::invalid_parameter(name, "given more than once")
}

impl<'q> Query<'q> {
    pub fn parse(query: Option<&'q str>) -> Result<Self, ApiError> {
        let query = query.unwrap_or("");
        let plain = !query.bytes().any(|b| matches!(b, b'%' | b'+' | 0));
        if plain && query.len() <= usize::from(u16::MAX) {
            let mut in_place = [[0; 3]; IN_PLACE];
            let mut len = 0;
            for span @ [start, eq, _] in spans(query) {
                let k = &query[start..eq];
                if in_place[..len]
                    .iter()
                    .any(|&[start, eq, _]| key(query, start.into(), eq.into()) == k.as_bytes())
                {
                    return Err(given_twice(k));
                }
                let Some(slot) = in_place.get_mut(len) else {
                    return Self::decoded(query);
                };
                // Within the query, which fits in `u16`.
                *slot = span.map(|at| at as u16);
                len += 1;
            }
            return Ok(Self(Pairs::InPlace {
                query,
                spans: in_place,
                len,
            }));
        }
        Self::decoded(query)
    }

    fn decoded(query: &'q str) -> Result<Self, ApiError> {
        let mut decoded = Vec::new();
        // The names so far, once there are too many to compare each new one with.
        let mut names = None::<HashSet<Cow<'q, str>>>;
        for (k, v) in pairs(query) {
            let decode = |s: &'q str| {
                percent_decode(s, true)
                    .and_then(|bytes| utf8(s, bytes))
                    .filter(|s| !s.contains('\0'))
            };
            let (Some(k), Some(v)) = (decode(k), decode(v)) else {
                return Err(ApiError::invalid_parameter(
                    k,
                    "malformed percent-encoding, NUL or bytes that are not UTF-8",
                ));
            };
            let repeated = match &mut names {
                Some(names) => !names.insert(k.clone()),
                None => decoded.iter().any(|(seen, _)| *seen == k),
            };
            if repeated {
                return Err(given_twice(&k));
            }
            decoded.push((k, v));
            if decoded.len() == COMPARED_PAIRS {
                names = Some(decoded.iter().map(|(k, _)| k.clone()).collect());
            }
        }
        Ok(Self(Pairs::Decoded(decoded)))
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        match &self.0 {
            Pairs::InPlace { query, spans, len } => spans[..*len]
                .iter()
                .map(|span| span.map(usize::from))
                .find(|&[start, eq, _]| key(query, start, eq) == name.as_bytes())
                .map(|span| pair(query, span).1),
            Pairs::Decoded(pairs) => pairs.iter().find(|(k, _)| k == name).map(|(_, v)| &**v),
        }
    }

    /// An integer parameter within `min..=max`, or `default` when absent.
    pub fn int(
        &self,
        name: &str,
        default: usize,
        min: usize,
        max: usize,
    ) -> Result<usize, ApiError> {
        let Some(raw) = self.get(name) else {
            return Ok(default);
        };
        let invalid = || {
            ApiError::invalid_parameter(name, format!("must be a whole number from {min} to {max}"))
        };
        // Digits alone: `parse` takes a leading `+` too. However many leading zeros there are,
        // the value is what counts; one too large for `usize` fails to parse.
        if raw.is_empty() || !raw.bytes().all(|b| b.is_ascii_digit()) {
            return Err(invalid());
        }
        raw.parse::<usize>()
            .ok()
            .filter(|n| (min..=max).contains(n))
            .ok_or_else(invalid)
    }

    /// A parameter parsed with `parse` when present.
    pub fn parsed<T, E>(
        &self,
        name: &str,
        parse: impl FnOnce(&str) -> Result<T, E>,
    ) -> Result<Option<T>, E> {
        self.get(name).map(parse).transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_refuse_smuggled_structure() {
        assert_eq!(decode_segment("aws%2Dx").unwrap(), "aws-x");
        for bad in [
            "a%2Fb", "a%2fb", "%5C", "%00", "%zz", "%4", "%FF", "..", "%2E%2E", ".",
        ] {
            assert!(decode_segment(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn targets_are_checked_the_short_way_and_the_long_way_alike() {
        for good in [
            "/api/v1/extensions/provider/aws",
            "/api/v1/extensions/provider/aws/1.0.0",
            "/api/v1/extensions/provider/aws/.hidden",
            "/api/v1/extensions/provider/aws%2Dx",
            "/a.b/c..d/e.",
            "",
        ] {
            let path = check_target(good, None).unwrap_or_else(|e| panic!("{good}: {e:?}"));
            // A plain path's segments are what decoding them gives, and decoding accepts them.
            for segment in good.split('/') {
                let decoded = decode_segment(segment).unwrap();
                if path == Path::Plain {
                    assert!(
                        matches!(decoded, Cow::Borrowed(s) if s == segment),
                        "{good}"
                    );
                }
            }
        }
        assert_eq!(
            check_target("/api/v1/extensions/provider/aws/1.0.0", None).unwrap(),
            Path::Plain
        );
        for decodable in ["/api/v1/extensions/provider/aws%2Dx", "/a/.hidden", ".x"] {
            assert_eq!(
                check_target(decodable, None).unwrap(),
                Path::Decodable,
                "{decodable}"
            );
        }
        for bad in [
            "/api/v1/../x",
            "/api/./v1",
            "/api/v1/..",
            "..",
            "/a\\b",
            "/a/%2e%2E/b",
            "/a/b%2F",
            "/a/%zz",
            "/a/%00",
            "/a\0b",
            "./a",
        ] {
            assert!(check_target(bad, None).is_err(), "{bad}");
        }
    }

    #[test]
    fn integers_are_checked() {
        let q = Query::parse(Some("limit=10&offset=x&big=99999999999999999999999&neg=-1")).unwrap();
        assert_eq!(q.int("limit", 100, 1, 1000).unwrap(), 10);
        assert_eq!(q.int("absent", 100, 1, 1000).unwrap(), 100);
        assert!(q.int("offset", 0, 0, 10).is_err());
        assert!(q.int("big", 0, 0, usize::MAX).is_err());
        assert!(q.int("neg", 0, 0, 10).is_err());
        assert!(q.int("limit", 0, 11, 20).is_err());
        // Leading zeros past the 20 digits of `usize::MAX` still spell a number in range.
        let padded = format!("limit=000000000000000000001&offset={}7", "0".repeat(4_000));
        let q = Query::parse(Some(&padded)).unwrap();
        assert_eq!(q.int("limit", 100, 1, 1000).unwrap(), 1);
        assert_eq!(q.int("offset", 0, 0, 10).unwrap(), 7);
        let q = Query::parse(Some("big=018446744073709551616&plus=+1")).unwrap();
        assert!(q.int("big", 0, 0, usize::MAX).is_err());
        assert!(q.int("plus", 0, 0, 10).is_err());
    }

    #[test]
    fn query_values_are_decoded() {
        let q = Query::parse(Some("q=a+b%21&flag")).unwrap();
        assert_eq!(q.get("q"), Some("a b!"));
        assert_eq!(q.get("flag"), Some(""));
        assert!(Query::parse(Some("q=%ff")).is_err());
        assert!(Query::parse(Some("q=%00")).is_err());
    }

    #[test]
    fn pairs_are_split_at_the_first_equals_sign_and_empty_ones_skipped() {
        let q = Query::parse(Some("&&a=&b&c=1=2&=x&")).unwrap();
        assert!(matches!(q.0, Pairs::InPlace { .. }));
        assert_eq!(q.get("a"), Some(""));
        assert_eq!(q.get("b"), Some(""));
        assert_eq!(q.get("c"), Some("1=2"));
        assert_eq!(q.get(""), Some("x"));
        assert_eq!(q.get("absent"), None);
    }

    #[test]
    fn a_query_kept_in_place_stays_small() {
        // Every request's future holds its query until it is answered.
        assert!(std::mem::size_of::<Query<'_>>() <= 48);
    }

    #[test]
    fn pairs_kept_in_place_read_as_decoded_ones_do() {
        for (query, in_place) in [
            ("", true),
            ("limit=100", true),
            ("&&a=&b&c=1=2&d&", true),
            ("a=1&b=2&c=3&d=4&e=5", false),
            ("a=%41", false),
            ("a=b+c", false),
        ] {
            let parsed = Query::parse(Some(query)).unwrap();
            assert_eq!(
                matches!(parsed.0, Pairs::InPlace { .. }),
                in_place,
                "{query}"
            );
            // The same pairs and one more that needs decoding are all decoded.
            let decoded = format!("{query}&zz=%41");
            let decoded = Query::parse(Some(&decoded)).unwrap();
            assert!(matches!(decoded.0, Pairs::Decoded(_)), "{query}");
            assert_eq!(decoded.get("zz"), Some("A"));
            for name in ["", "a", "b", "c", "d", "e", "limit", "absent"] {
                assert_eq!(parsed.get(name), decoded.get(name), "{query}: {name}");
            }
        }
    }

    #[test]
    fn a_repeated_parameter_is_refused_by_name() {
        for query in [
            "type=provider&type=bogus",
            "type=a&%74ype=a",
            "flag&flag",
            // More pairs than are kept in place: the fifth repeats one, or a later one does.
            "type&b&c&d&type",
            "type=a&b&c&d&e&f&g&h&i&type=b",
        ] {
            let error = Query::parse(Some(query)).unwrap_err();
            assert_eq!(error.code, "invalid_parameter");
            let name = if query.starts_with("flag") {
                "flag"
            } else {
                "type"
            };
            assert!(
                error.message.contains(&format!("'{name}'")),
                "{}",
                error.message
            );
        }
    }

    /// Past [`COMPARED_PAIRS`], names are looked up in a set: the first repeat is still the one
    /// refused, written or encoded, and every other name is still read.
    #[test]
    fn repeats_among_many_pairs_are_found_as_among_few() {
        let names: Vec<String> = (0..1_000).map(|i| format!("n{i}")).collect();
        let many = names
            .iter()
            .map(|n| format!("{n}={n}"))
            .collect::<Vec<_>>()
            .join("&");
        let query = Query::parse(Some(&many)).unwrap();
        assert_eq!(query.get("n0"), Some("n0"));
        assert_eq!(query.get("n999"), Some("n999"));
        for (repeat, name) in [
            (format!("{many}&n500=again"), "n500"),
            (format!("{many}&%6e7=again&n8=again"), "n7"),
            (format!("n%31=a&{many}"), "n1"),
            (format!("{}&x&x&n3", names[..COMPARED_PAIRS].join("&")), "x"),
            (
                format!("{}&n0", names[..COMPARED_PAIRS - 1].join("&")),
                "n0",
            ),
            (format!("{}&n0", names[..COMPARED_PAIRS].join("&")), "n0"),
            (format!("{}&n15", names[..COMPARED_PAIRS].join("&")), "n15"),
        ] {
            let error = Query::parse(Some(&repeat)).unwrap_err();
            assert!(
                error.message.contains(&format!("'{name}'")),
                "{name}: {}",
                error.message
            );
        }
    }
}
