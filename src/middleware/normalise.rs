//! A request's path with its percent-encoded unreserved characters decoded, before any layer
//! reads it (RFC 3986 §6.2.2.2: `%76` and `v` name the same path). Without it, the router
//! decoded the parameters of a path (`/provider/%61ws` was `aws`) but not its literal words
//! (`/%76ersions` was a download of a version named `versions`), and each layer that tells
//! routes apart by the path (downloads, metrics, preflights) had to agree with the router on
//! which spelling it took. Other escapes, `%2F` among them, stay as written, for the router to
//! decode or refuse; the query is left alone, as it is decoded pair by pair.

use std::task::{Context, Poll};

use http::uri::PathAndQuery;
use http::{Request, Uri};
use tower::{Layer, Service};

use crate::api::query::{hex, MAX_PATH_LEN};

/// Adds [`NormalisePath`].
#[derive(Clone, Copy, Debug, Default)]
pub struct NormalisePathLayer;

impl<S> Layer<S> for NormalisePathLayer {
    type Service = NormalisePath<S>;

    fn layer(&self, inner: S) -> NormalisePath<S> {
        NormalisePath { inner }
    }
}

/// See the module documentation.
#[derive(Clone, Debug)]
pub struct NormalisePath<S> {
    inner: S,
}

impl<S, B> Service<Request<B>> for NormalisePath<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        if escaped(req.uri().path()) {
            normalise(req.uri_mut());
        }
        self.inner.call(req)
    }
}

/// Whether `path` has a `%`. The bytes are folded without stopping early, which the compiler
/// turns into vector compares: a search that stops at the first costs several times more on
/// a path this short, and almost every path has none.
fn escaped(path: &str) -> bool {
    path.bytes().fold(false, |found, b| found | (b == b'%'))
}

/// Decodes the unreserved characters of `uri`'s path, where [`path`] finds any.
#[cold]
#[inline(never)]
fn normalise(uri: &mut Uri) {
    if let Some(normalised) = normalised(uri) {
        *uri = normalised;
    }
}

/// The URI with the unreserved characters of its path decoded; `None` where [`path`] is.
fn normalised(uri: &Uri) -> Option<Uri> {
    let decoded = path(uri.path())?;
    let path_and_query = match uri.query() {
        Some(query) => format!("{decoded}?{query}"),
        None => decoded,
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(PathAndQuery::try_from(path_and_query).ok()?);
    Uri::from_parts(parts).ok()
}

/// `path` with each `%XX` that encodes an unreserved character (`A-Z a-z 0-9 - . _ ~`)
/// replaced by the character, as the layers below see it; `None` when there is none (almost
/// every request: its path has no `%`), or the path is longer than any the router takes,
/// which it then refuses as it was sent.
pub fn path(path: &str) -> Option<String> {
    if path.len() > MAX_PATH_LEN {
        return None;
    }
    let bytes = path.as_bytes();
    let mut decoded = String::with_capacity(path.len());
    // Where the part of `path` not yet copied starts; past 0 once anything is decoded.
    let mut kept = 0;
    for (at, _) in path.match_indices('%') {
        let digit = |i: usize| hex(*bytes.get(i)?);
        // A `%` without two hex digits after it leaves the path as sent, for the router to
        // refuse: decoding around it could make an escape of it (`%2%65` into `%2e`), which
        // the router would then decode a second time.
        let byte = digit(at + 1)? << 4 | digit(at + 2)?;
        if !(byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~')) {
            continue;
        }
        decoded.push_str(&path[kept..at]);
        decoded.push(char::from(byte));
        kept = at + 3;
    }
    decoded.push_str(&path[kept..]);
    (kept > 0).then_some(decoded)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn normalise(uri: &str) -> String {
        let uri: Uri = uri.parse().unwrap();
        normalised(&uri).map_or_else(|| uri.to_string(), |u| u.to_string())
    }

    #[test]
    fn unreserved_characters_are_decoded_in_the_path_alone() {
        for (sent, seen) in [
            (
                "/api/v1/extensions/provider/aws/%76ersions",
                "/api/v1/extensions/provider/aws/versions",
            ),
            (
                "/api/v1/%65xtensions/%73earch?q=%61ws",
                "/api/v1/extensions/search?q=%61ws",
            ),
            ("/%6C%69vez", "/livez"),
            ("/a/%2d%2E%5f%7E%30%5A", "/a/-._~0Z"),
            // Dot segments are decoded too; the router refuses them.
            ("/api/v1/extensions/%2e%2e", "/api/v1/extensions/.."),
            // Escapes of anything else stay, around decoded ones.
            ("/a/%2F%61%2f%25%5C%00%20", "/a/%2Fa%2f%25%5C%00%20"),
            ("/a/%25%36%31", "/a/%2561"),
            ("/a/%C3%A9", "/a/%C3%A9"),
            // A malformed escape leaves the whole path as sent, and no escape is made anew.
            ("/a/%2%65", "/a/%2%65"),
            ("/a/%%32%65", "/a/%%32%65"),
            ("/a/%61%zz", "/a/%61%zz"),
            ("/a/%61%4", "/a/%61%4"),
            ("/a/%61%", "/a/%61%"),
            ("http://host:8080/%61?x", "http://host:8080/a?x"),
        ] {
            assert_eq!(normalise(sent), seen, "{sent}");
        }
    }

    #[test]
    fn paths_without_escapes_or_too_long_are_left_as_sent() {
        let plain: Uri = "/api/v1/extensions?q=%61".parse().unwrap();
        assert!(normalised(&plain).is_none());
        let long: Uri = format!("/{}", "%61".repeat(MAX_PATH_LEN / 3 + 1))
            .parse()
            .unwrap();
        assert!(normalised(&long).is_none());
        let kept: Uri = "/a/%2F".parse().unwrap();
        assert!(normalised(&kept).is_none());
    }
}
