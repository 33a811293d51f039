//! What the HTTP backends (Gitea, OCI) share: one way to build a reqwest client, to map its
//! errors to the domain's, and to turn a response into a streamed artifact body.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::TryStreamExt;
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};

use crate::registry::{ArtifactBody, RegistryError, Source};
use crate::BoxError;

/// How many redirects a download may follow (object storage answers with one or two).
pub const MAX_REDIRECTS: usize = 5;

/// The most bytes read whole from a metadata answer (a Gitea JSON page, a registry catalog page,
/// tag list, manifest or error body): an answer that is larger is broken or hostile, and memory
/// must stay bounded whatever a backend sends.
pub const MAX_METADATA_BYTES: usize = 16 * 1024 * 1024;

/// Builds the client a backend uses for all its calls.
///
/// `timeout` bounds connecting and each read, not a whole transfer, so a large artifact that
/// keeps streaming is never cut off while a stalled backend still is. `redirects` is the
/// backend's redirect policy: reqwest's own following drops `Authorization` only when a redirect
/// leaves the origin, so a backend that must re-check every hop passes `Policy::none()`.
pub fn client(
    timeout: Duration,
    verify_tls: bool,
    redirects: reqwest::redirect::Policy,
) -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .user_agent(concat!("extension-registry/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(timeout)
        .read_timeout(timeout)
        .redirect(redirects)
        .tls_danger_accept_invalid_certs(!verify_tls)
        .build()
}

/// Reads a whole body of at most `cap` bytes; `None` when it is larger, known from
/// `Content-Length` before any byte is read, or else as soon as the bytes pass the cap.
pub async fn read_capped(
    mut response: reqwest::Response,
    cap: usize,
) -> Result<Option<Bytes>, reqwest::Error> {
    if response.content_length().is_some_and(|n| n > cap as u64) {
        return Ok(None);
    }
    let mut body = BytesMut::new();
    while let Some(chunk) = response.chunk().await? {
        if body.len() + chunk.len() > cap {
            return Ok(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(body.freeze()))
}

/// Maps a transport error to the domain: timeouts are 504s, everything else a 502. The text
/// never carries the URL (it could hold a presigned query).
pub fn transport_error(backend: Source, e: &reqwest::Error) -> RegistryError {
    if e.is_timeout() {
        RegistryError::BackendTimeout { backend }
    } else if e.is_connect() {
        RegistryError::unavailable(backend, "cannot connect")
    } else if e.is_redirect() {
        RegistryError::unavailable(backend, format!("more than {MAX_REDIRECTS} redirects"))
    } else if e.is_decode() || e.is_body() {
        RegistryError::unavailable(backend, "malformed or interrupted response body")
    } else {
        RegistryError::unavailable(backend, "request failed")
    }
}

/// Streams a response's body as an artifact body, without buffering it.
pub fn stream_body(response: reqwest::Response) -> ArtifactBody {
    let frames = response
        .bytes_stream()
        .map_ok(Frame::data)
        .map_err(|e| -> BoxError { Box::new(e.without_url()) });
    StreamBody::new(frames).boxed_unsync()
}

/// The target of the `rel="next"` link of an RFC 8288 `Link` header, as written: Gitea
/// links are absolute, registries' relative to the host.
pub fn next_link(header: &str) -> Option<&str> {
    let mut rest = header;
    while let Some(start) = rest.find('<') {
        let after = &rest[start + 1..];
        let end = after.find('>')?;
        let tail = &after[end + 1..];
        let params = &tail[..tail.find('<').unwrap_or(tail.len())];
        let is_next = params
            .split([';', ','])
            .filter_map(|p| p.trim().split_once('='))
            .any(|(k, v)| k.trim().eq_ignore_ascii_case("rel") && v.trim_matches('"') == "next");
        if is_next {
            return Some(&after[..end]);
        }
        rest = tail;
    }
    None
}

/// Whether a response is an HTML page: what a sign-in wall answers with instead of a file.
pub fn is_html(response: &reqwest::Response) -> bool {
    response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().to_ascii_lowercase().starts_with("text/html"))
}

/// A body of known bytes, for small answers built in memory.
pub fn full_body(bytes: Bytes) -> ArtifactBody {
    http_body_util::Full::new(bytes)
        .map_err(|never| match never {})
        .boxed_unsync()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_links_of_gitea_and_registries_are_found() {
        let gitea = "<https://h/api/v1/orgs/o/repos?page=2>; rel=\"next\",<https://h/api/v1/orgs/o/repos?page=5>; rel=\"last\"";
        assert_eq!(
            next_link(gitea),
            Some("https://h/api/v1/orgs/o/repos?page=2")
        );
        let registry = "</v2/_catalog?last=provisioning%2Fbuildkit-cluster&n=2>; rel=\"next\"";
        assert_eq!(
            next_link(registry),
            Some("/v2/_catalog?last=provisioning%2Fbuildkit-cluster&n=2")
        );
        assert_eq!(next_link("</a?page=1>; rel=\"prev\""), None);
    }
}
