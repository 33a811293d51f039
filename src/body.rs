//! The one response body type of the service, and constructors for it.

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_LENGTH};
use http::Response;
use http_body::Body as _;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};

use crate::BoxError;

/// Every response body: in-memory JSON, an empty body, or a streamed artifact.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// Makes `response` the answer to a HEAD: its body goes, and its length stays told as a
/// GET's would be, unless the answer says a `Content-Length` already. An answer without a
/// body is left as it is (an artifact's HEAD, answered from metadata, says its own length).
pub fn for_head(response: &mut Response<Body>) {
    if response.body().is_end_stream() {
        return;
    }
    let length = response.body().size_hint().exact();
    *response.body_mut() = empty();
    if let Some(length) = length {
        response
            .headers_mut()
            .entry(CONTENT_LENGTH)
            .or_insert_with(|| HeaderValue::from(length));
    }
}
