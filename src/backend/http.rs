//! What the HTTP backends (Gitea, OCI) share: one way to build a reqwest client, to map its
//! errors to the domain's, and to turn a response into a streamed artifact body.

use std::time::Duration;

use bytes::Bytes;
use futures_util::TryStreamExt;
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};

use crate::registry::{ArtifactBody, RegistryError, Source};
use crate::BoxError;

/// How many redirects a download may follow (object storage answers with one or two).
pub const MAX_REDIRECTS: usize = 5;

/// Builds the client a backend uses for all its calls.
///
/// `timeout` bounds connecting and each read, not a whole transfer, so a large artifact that
/// keeps streaming is never cut off while a stalled backend still is. reqwest drops
/// `Authorization` when a redirect leaves the origin, so credentials never reach object storage.
pub fn client(timeout: Duration, verify_tls: bool) -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .user_agent(concat!("extension-registry/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(timeout)
        .read_timeout(timeout)
        .redirect(reqwest::redirect::Policy::limited(MAX_REDIRECTS))
        .tls_danger_accept_invalid_certs(!verify_tls)
        .build()
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

/// A body of known bytes, for small answers built in memory.
pub fn full_body(bytes: Bytes) -> ArtifactBody {
    http_body_util::Full::new(bytes)
        .map_err(|never| match never {})
        .boxed_unsync()
}
