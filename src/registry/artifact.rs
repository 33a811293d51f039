//! Artifact downloads as streams, and the body wrapper that checks a sha256 digest while the
//! bytes pass, holding back the last chunk until the digest is known to match.

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use pin_project_lite::pin_project;
use sha2::{Digest, Sha256};

use crate::registry::Source;
use crate::BoxError;

/// The bytes of an artifact, streamed from wherever the backend keeps them.
pub type ArtifactBody = UnsyncBoxBody<Bytes, BoxError>;

/// A download in progress: headers known, body still streaming.
#[derive(Debug)]
pub struct Artifact {
    /// The file name offered to the client in `Content-Disposition`.
    pub filename: String,
    /// The exact length when the backend knows it, so clients can show progress and detect
    /// truncation. Taken from metadata (asset size, layer size, file size) where there is one,
    /// so a HEAD answer has it too and an aborted body is never taken for a complete one.
    pub content_length: Option<u64>,
    /// `sha256:<hex>`, when the backend knows the digest the bytes are checked against.
    pub checksum: Option<String>,
    pub body: ArtifactBody,
}

impl Artifact {
    /// The artifact as a HEAD answer shows it: described from metadata, with no body.
    pub fn head(filename: String, content_length: Option<u64>, checksum: Option<String>) -> Self {
        Self {
            filename,
            content_length,
            checksum,
            body: crate::body::empty(),
        }
    }
}

/// The error a download ends with when its bytes do not match the expected digest.
#[derive(Debug, thiserror::Error)]
#[error("{backend} artifact {what}: sha256 mismatch (expected {expected}, got {actual})")]
pub struct DigestMismatch {
    backend: Source,
    what: String,
    expected: String,
    actual: String,
}

pin_project! {
    /// Hashes every data frame and delays each one by a frame, so the final bytes are released
    /// only once the whole stream has matched `expected`. On a mismatch the stream ends in an
    /// error instead: the connection is aborted and the client never holds a complete-looking
    /// wrong file.
    pub struct VerifyingBody<B> {
        #[pin]
        inner: B,
        hasher: Sha256,
        expected: [u8; 32],
        held: Option<Bytes>,
        finished: bool,
        backend: Source,
        what: String,
    }
}

impl<B> VerifyingBody<B> {
    /// Wraps `inner` to be checked against `checksum` (`sha256:<hex>` or bare hex). Returns
    /// `None` when the checksum is not a sha256 digest, as then there is nothing to verify.
    pub fn new(inner: B, checksum: &str, backend: Source, what: String) -> Option<Self> {
        let expected = sha256_digest(checksum)?;
        Some(Self {
            inner,
            hasher: Sha256::new(),
            expected,
            held: None,
            finished: false,
            backend,
            what,
        })
    }
}

/// The 32 bytes of a checksum written `sha256:<hex>` or as bare hex.
pub fn sha256_digest(checksum: &str) -> Option<[u8; 32]> {
    let hex = checksum.strip_prefix("sha256:").unwrap_or(checksum);
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn encode_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl<B> Body for VerifyingBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        if *this.finished {
            return Poll::Ready(None);
        }
        loop {
            match ready!(this.inner.as_mut().poll_frame(cx)) {
                Some(Ok(frame)) => {
                    // An empty frame must not take the place of the held one: that would
                    // release every real byte before the digest is known.
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    if data.is_empty() {
                        continue;
                    }
                    this.hasher.update(&data);
                    if let Some(previous) = this.held.replace(data) {
                        return Poll::Ready(Some(Ok(Frame::data(previous))));
                    }
                }
                Some(Err(e)) => {
                    *this.finished = true;
                    return Poll::Ready(Some(Err(e.into())));
                }
                None => {
                    *this.finished = true;
                    let actual = std::mem::take(this.hasher).finalize();
                    if actual.as_slice() == this.expected.as_slice() {
                        return Poll::Ready(this.held.take().map(|b| Ok(Frame::data(b))));
                    }
                    let err = DigestMismatch {
                        backend: *this.backend,
                        what: std::mem::take(this.what),
                        expected: encode_hex(this.expected),
                        actual: encode_hex(&actual),
                    };
                    tracing::error!(error = %err, "download aborted");
                    metrics::counter!("download_digest_mismatch_total", "backend" => this.backend.as_str())
                        .increment(1);
                    return Poll::Ready(Some(Err(err.into())));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.finished
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    fn chunks(parts: &[&'static [u8]]) -> impl Body<Data = Bytes, Error = BoxError> {
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = parts
            .iter()
            .map(|p| Ok(Frame::data(Bytes::from_static(p))))
            .collect();
        StreamBody::new(futures_util::stream::iter(frames))
    }

    fn sha(data: &[u8]) -> String {
        format!("sha256:{}", encode_hex(&Sha256::digest(data)))
    }

    #[tokio::test]
    async fn passes_matching_bytes_through() {
        let body = VerifyingBody::new(
            chunks(&[b"ab", b"c", b"d"]),
            &sha(b"abcd"),
            Source::Local,
            "x".into(),
        )
        .unwrap();
        let got = body.collect().await.unwrap().to_bytes();
        assert_eq!(&got[..], b"abcd");
    }

    #[tokio::test]
    async fn withholds_the_last_chunk_on_mismatch() {
        let mut body = VerifyingBody::new(
            chunks(&[b"ab", b"cd"]),
            &sha(b"abce"),
            Source::Oci,
            "x".into(),
        )
        .unwrap();
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&first[..], b"ab");
        let err = body.frame().await.unwrap().unwrap_err();
        assert!(err.to_string().contains("sha256 mismatch"), "{err}");
        assert!(body.frame().await.is_none());
    }

    #[tokio::test]
    async fn an_empty_last_frame_does_not_release_the_held_bytes() {
        let mut body = VerifyingBody::new(
            chunks(&[b"ab", b"cd", b""]),
            &sha(b"abce"),
            Source::Oci,
            "x".into(),
        )
        .unwrap();
        let mut released = Vec::new();
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(frame) => released.extend_from_slice(&frame.into_data().unwrap()),
                Err(_) => break,
            }
        }
        assert_eq!(released, b"ab");
    }

    #[test]
    fn refuses_checksums_that_are_not_sha256() {
        assert!(VerifyingBody::new(chunks(&[]), "md5:abc", Source::Local, "x".into()).is_none());
    }
}
