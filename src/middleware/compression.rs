//! Response compression: gzip, brotli or zstd, chosen from `Accept-Encoding` with its
//! q-values, for JSON and text only.
//!
//! Compressing a 30 KB listing costs about twenty times what serving it from the cache
//! does, so rendered answers are compressed once: a response carrying an
//! `Arc<Representation>` (a body kept with its compressed forms, see `api::representation`
//! for the memo that keeps them, and `api::exposition` for the metrics text) gets the
//! representation's compressed form (this layer).
//! Everything else (errors, health) goes through tower-http's streaming
//! compression, which never sees artifact downloads (`application/octet-stream`: already
//! compressed) nor bodies too small to gain.
//!
//! The codings are negotiated once, by the streaming layer before anything else
//! (`negotiated`), and both compressors are shown only the result: a client that refuses
//! every coding, identity included (`identity;q=0`, `*;q=0`), is served identity rather than
//! `406`, as RFC 9110 §12.5.3 allows.

use std::fmt;
use std::future::Future;
use std::io::{self, Write};
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{ready, Context, Poll};

use http::header::{
    Entry, HeaderMap, HeaderValue, ACCEPT_ENCODING, CONTENT_ENCODING, CONTENT_LENGTH, ETAG, VARY,
};
use http::{Extensions, Method, Request, Response, StatusCode, Version};
use pin_project_lite::pin_project;
use tower::{Layer, Service};
use tower_http::compression::predicate::{NotForContentType, Predicate, SizeAbove};
use tower_http::compression::{Compression, CompressionLayer};

use bytes::Bytes;

use crate::body::{self, Body};

/// Below this many bytes, compression saves less than it costs on either end.
pub const MIN_SIZE: usize = 1024;

/// A content coding this service produces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Coding {
    Identity,
    Gzip,
    Brotli,
    Zstd,
}

impl Coding {
    /// The codings that compress, in the order preferred when the client rates them equally.
    pub const COMPRESSED: [Coding; 3] = [Self::Brotli, Self::Gzip, Self::Zstd];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Identity => "identity",
            Self::Gzip => "gzip",
            Self::Brotli => "br",
            Self::Zstd => "zstd",
        }
    }

    fn named(name: &str) -> Option<Self> {
        [Self::Identity, Self::Gzip, Self::Brotli, Self::Zstd]
            .into_iter()
            .find(|c| name.eq_ignore_ascii_case(c.as_str()))
            .or_else(|| name.eq_ignore_ascii_case("x-gzip").then_some(Self::Gzip))
    }
}

impl fmt::Display for Coding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The coding to answer with for an `Accept-Encoding` value (RFC 9110 §12.5.3): the
/// compressing coding with the highest q-value, `*` standing for those not named; identity
/// when it is rated higher than all of them, or nothing compressing is acceptable.
pub fn negotiate(accept: &[u8]) -> Coding {
    let Ok(accept) = std::str::from_utf8(accept) else {
        return Coding::Identity;
    };
    // Per coding in `Coding::COMPRESSED` order, then identity: the q-value named for it.
    let mut named: [Option<f32>; 4] = [None; 4];
    let mut wildcard = None;
    for item in accept.split(',') {
        let mut parts = item.split(';');
        let name = parts.next().unwrap_or_default().trim();
        let mut q = 1.0;
        for param in parts {
            if let Some((k, v)) = param.split_once('=') {
                if k.trim().eq_ignore_ascii_case("q") {
                    q = v.trim().parse::<f32>().unwrap_or(0.0).clamp(0.0, 1.0);
                }
            }
        }
        if name == "*" {
            wildcard = Some(q);
        } else if let Some(coding) = Coding::named(name) {
            let slot = Coding::COMPRESSED
                .iter()
                .position(|c| *c == coding)
                .unwrap_or(3);
            named[slot] = Some(q);
        }
    }
    let mut best = (Coding::Identity, named[3].unwrap_or(0.0));
    for (coding, q) in Coding::COMPRESSED.into_iter().zip(named) {
        let q = q.or(wildcard).unwrap_or(0.0);
        if q > 0.0 && (q > best.1 || (q == best.1 && best.0 == Coding::Identity)) {
            best = (coding, q);
        }
    }
    best.0
}

/// Compresses `data` with `coding`, at levels meant for compressing once and serving often.
pub fn encode(coding: Coding, data: &[u8]) -> io::Result<Vec<u8>> {
    match coding {
        Coding::Identity => Ok(data.to_vec()),
        Coding::Gzip => {
            let mut encoder =
                flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            encoder.write_all(data)?;
            encoder.finish()
        }
        Coding::Brotli => {
            let params = brotli::enc::BrotliEncoderParams {
                quality: 6,
                size_hint: data.len(),
                ..Default::default()
            };
            let mut out = Vec::new();
            brotli::BrotliCompress(&mut &data[..], &mut out, &params)?;
            Ok(out)
        }
        Coding::Zstd => zstd::bulk::compress(data, 3),
    }
}

/// An entity-tag's text (between the quotes) with this layer's coding suffix removed, so a
/// validator of a compressed form matches its identity form (`abc-gzip` → `abc`).
pub fn without_coding(tag: &str) -> &str {
    Coding::COMPRESSED
        .iter()
        .find_map(|c| tag.strip_suffix(c.as_str())?.strip_suffix('-'))
        .unwrap_or(tag)
}

/// Rewrites `Accept-Encoding` to the one coding [`negotiate`] picks (removing it for
/// identity), so the compressors below agree with each other and never find every coding
/// refused: tower-http would turn any answer into a `406` then. Returns that coding.
fn negotiated<B>(req: &mut Request<B>) -> Coding {
    let mut lines = req.headers().get_all(ACCEPT_ENCODING).iter();
    let coding = match (lines.next(), lines.next()) {
        (None, _) => return Coding::Identity,
        // The usual case, negotiated in place.
        (Some(line), None) => negotiate(line.as_bytes()),
        _ => negotiate(
            &req.headers()
                .get_all(ACCEPT_ENCODING)
                .iter()
                .map(|v| v.as_bytes())
                .collect::<Vec<_>>()
                .join(&b","[..]),
        ),
    };
    let headers = req.headers_mut();
    headers.remove(ACCEPT_ENCODING);
    if coding != Coding::Identity {
        headers.insert(ACCEPT_ENCODING, HeaderValue::from_static(coding.as_str()));
    }
    coding
}

/// One encoded form of a representation and the ETag that names it.
pub struct Encoded {
    pub bytes: Bytes,
    /// Differs per coding, as RFC 9110 wants for strong validators.
    pub etag: HeaderValue,
    /// The `Content-Length` of `bytes`, made once: every answer serving them shares it.
    pub length: HeaderValue,
}

impl Encoded {
    fn new(bytes: Bytes, etag: HeaderValue) -> Self {
        Self {
            length: HeaderValue::from(bytes.len()),
            bytes,
            etag,
        }
    }
}

/// A body kept to be served many times: its bytes, the strong ETag naming them, and its
/// compressed forms, each made on first demand.
pub struct Representation {
    /// The identity form.
    identity: Encoded,
    /// The compressed forms, made on first demand; `None` when compressing failed.
    compressed: [OnceLock<Option<Encoded>>; Coding::COMPRESSED.len()],
}

impl Representation {
    pub fn new(bytes: Bytes, etag: HeaderValue) -> Self {
        Self {
            identity: Encoded::new(bytes, etag),
            compressed: Default::default(),
        }
    }

    pub fn bytes(&self) -> &Bytes {
        &self.identity.bytes
    }

    pub fn etag(&self) -> &HeaderValue {
        &self.identity.etag
    }

    /// The `Content-Length` of the identity form.
    pub fn length(&self) -> &HeaderValue {
        &self.identity.length
    }

    /// The form for `coding`, compressing on first demand only.
    pub fn encoded(&self, coding: Coding) -> Option<&Encoded> {
        let Some(slot) = Coding::COMPRESSED.iter().position(|c| *c == coding) else {
            return Some(&self.identity);
        };
        self.compressed[slot]
            .get_or_init(|| {
                let bytes = encode(coding, self.bytes())
                    .inspect_err(|e| tracing::warn!(error = %e, %coding, "compression failed"))
                    .ok()?;
                let tag = self.etag().to_str().ok()?.trim_end_matches('"');
                let etag = HeaderValue::from_str(&format!("{tag}-{coding}\"")).ok()?;
                Some(Encoded::new(bytes.into(), etag))
            })
            .as_ref()
    }
}

/// The coding negotiated first (see [`negotiated`]), then tower-http's streaming compression
/// for responses without a representation: not for downloads, not for small bodies, not for
/// what `PrecompressedLayer` below already serves. With `enabled` false, requests and
/// responses pass as they are.
pub fn streaming(enabled: bool) -> StreamingLayer<impl Predicate> {
    fn not_precomputed(_: StatusCode, _: Version, _: &HeaderMap, ext: &Extensions) -> bool {
        ext.get::<Arc<Representation>>().is_none()
    }
    StreamingLayer {
        compression: CompressionLayer::new().compress_when(
            SizeAbove::new(MIN_SIZE as u64)
                .and(NotForContentType::const_new("application/octet-stream"))
                .and(not_precomputed),
        ),
        enabled,
    }
}

/// tower-http's compression, passed by for a request whose client takes identity (`negotiated`
/// left it no `Accept-Encoding`): its body wrapper, boxed again, and its future would cost
/// every such request for nothing. Switched off inside the layer, not by leaving it out: an
/// `Either` around the stack below would name it twice, and boxing that cost every request
/// an allocation.
#[derive(Clone)]
pub struct StreamingLayer<P> {
    compression: CompressionLayer<P>,
    enabled: bool,
}

impl<S, P: Predicate> Layer<S> for StreamingLayer<P> {
    type Service = Streaming<S, P>;

    fn layer(&self, inner: S) -> Self::Service {
        Streaming {
            compression: self.compression.layer(inner),
            enabled: self.enabled,
        }
    }
}

/// See [`StreamingLayer`].
#[derive(Clone)]
pub struct Streaming<S, P> {
    compression: Compression<S, P>,
    enabled: bool,
}

impl<S, P, B> Service<Request<B>> for Streaming<S, P>
where
    S: Service<Request<B>, Response = Response<Body>>,
    P: Predicate,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = StreamingFuture<S::Future, P>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        // Compression's readiness is its inner service's, which both paths call.
        self.compression.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        if !self.enabled {
            return StreamingFuture::Plain {
                future: self.compression.get_mut().call(req),
            };
        }
        if negotiated(&mut req) != Coding::Identity {
            StreamingFuture::Compressing {
                future: self.compression.call(req),
            }
        } else {
            StreamingFuture::Plain {
                future: self.compression.get_mut().call(req),
            }
        }
    }
}

pin_project! {
    /// The response of [`Streaming`]: straight from the service below, or through
    /// tower-http's compression.
    #[project = StreamingProjection]
    pub enum StreamingFuture<F, P> {
        Plain { #[pin] future: F },
        Compressing { #[pin] future: tower_http::compression::ResponseFuture<F, P> },
    }
}

impl<F, P, E> Future for StreamingFuture<F, P>
where
    F: Future<Output = Result<Response<Body>, E>>,
    P: Predicate,
{
    type Output = Result<Response<Body>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            StreamingProjection::Plain { future } => future.poll(cx),
            StreamingProjection::Compressing { future } => {
                let response = ready!(future.poll(cx))?;
                Poll::Ready(Ok(response.map(http_body_util::BodyExt::boxed_unsync)))
            }
        }
    }
}

/// Serves the memoised compressed form of responses carrying a representation; with
/// `enabled` false, passes responses as they are (see [`StreamingLayer`] for why a switch).
#[derive(Clone, Copy, Debug)]
pub struct PrecompressedLayer {
    enabled: bool,
}

impl PrecompressedLayer {
    pub fn new(enabled: bool) -> Self {
        Self { enabled }
    }
}

impl<S> Layer<S> for PrecompressedLayer {
    type Service = Precompressed<S>;

    fn layer(&self, inner: S) -> Precompressed<S> {
        Precompressed {
            inner,
            enabled: self.enabled,
        }
    }
}

/// See the module documentation.
#[derive(Clone, Debug)]
pub struct Precompressed<S> {
    inner: S,
    enabled: bool,
}

impl<S, B> Service<Request<B>> for Precompressed<S>
where
    S: Service<Request<B>, Response = Response<Body>>,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        ResponseFuture {
            accept: self
                .enabled
                .then(|| req.headers().get(ACCEPT_ENCODING).cloned())
                .flatten(),
            head: req.method() == Method::HEAD,
            enabled: self.enabled,
            inner: self.inner.call(req),
        }
    }
}

pin_project! {
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        // The request's `Accept-Encoding`.
        accept: Option<HeaderValue>,
        // A HEAD answer gets the headers of the chosen form but no body.
        head: bool,
        enabled: bool,
    }
}

impl<F, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<Body>, E>>,
{
    type Output = Result<Response<Body>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = ready!(this.inner.poll(cx))?;
        if !*this.enabled {
            return Poll::Ready(Ok(response));
        }
        Poll::Ready(Ok(precompressed(
            response,
            this.accept.as_ref(),
            *this.head,
        )))
    }
}

fn precompressed(
    mut response: Response<Body>,
    accept: Option<&HeaderValue>,
    head: bool,
) -> Response<Body> {
    let Some(representation) = response.extensions().get::<Arc<Representation>>().cloned() else {
        return response;
    };
    let status = response.status();
    let headers = response.headers_mut();
    if headers.contains_key(CONTENT_ENCODING)
        || !(status == StatusCode::OK || status == StatusCode::NOT_MODIFIED)
    {
        return response;
    }
    // One lookup of `Vary`, which is seldom there yet.
    match headers.entry(VARY) {
        Entry::Vacant(vary) => {
            vary.insert(HeaderValue::from_static("accept-encoding"));
        }
        Entry::Occupied(mut vary) => {
            if !vary
                .iter()
                .any(|v| v.as_bytes().eq_ignore_ascii_case(b"accept-encoding"))
            {
                vary.append(HeaderValue::from_static("accept-encoding"));
            }
        }
    }
    // A 304 keeps the validator the conditional layer gave it: the one the client matched.
    let coding = accept.map_or(Coding::Identity, |a| negotiate(a.as_bytes()));
    if status != StatusCode::OK
        || coding == Coding::Identity
        || representation.bytes().len() < MIN_SIZE
    {
        return response;
    }
    let Some(form) = representation.encoded(coding) else {
        return response;
    };
    headers.insert(ETAG, form.etag.clone());
    headers.insert(CONTENT_ENCODING, HeaderValue::from_static(coding.as_str()));
    headers.insert(CONTENT_LENGTH, form.length.clone());
    if !head {
        *response.body_mut() = body::full(form.bytes.clone());
    }
    response
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use http::header::CONTENT_TYPE;
    use http_body_util::BodyExt;
    use tower::{ServiceBuilder, ServiceExt};

    use super::*;
    use crate::BoxError;

    #[test]
    fn negotiation_honours_q_values() {
        let cases = [
            ("", Coding::Identity),
            ("gzip", Coding::Gzip),
            ("x-gzip", Coding::Gzip),
            ("gzip, deflate, br, zstd", Coding::Brotli),
            ("gzip;q=1.0, br;q=0.8", Coding::Gzip),
            ("br;q=0, gzip;q=0.2", Coding::Gzip),
            ("zstd, gzip;q=0.9", Coding::Zstd),
            ("*", Coding::Brotli),
            ("*;q=0.5, br;q=0, GZIP;Q=0.5", Coding::Gzip),
            ("identity", Coding::Identity),
            ("gzip;q=0.3, identity;q=0.5", Coding::Identity),
            ("gzip;q=0", Coding::Identity),
            ("deflate, compress", Coding::Identity),
            ("gzip;q=nonsense", Coding::Identity),
        ];
        for (accept, expected) in cases {
            assert_eq!(negotiate(accept.as_bytes()), expected, "{accept:?}");
        }
    }

    #[test]
    fn coding_suffixes_come_off_validators() {
        assert_eq!(without_coding("abc-gzip"), "abc");
        assert_eq!(without_coding("abc-br"), "abc");
        assert_eq!(without_coding("abc-zstd"), "abc");
        assert_eq!(without_coding("abcgzip"), "abcgzip");
        assert_eq!(without_coding("abc"), "abc");
    }

    fn big_json() -> Vec<u8> {
        serde_json::to_vec(&vec!["provider/aws"; 500]).unwrap()
    }

    fn kept(json: Vec<u8>) -> Arc<Representation> {
        Arc::new(Representation::new(
            json.into(),
            HeaderValue::from_static("\"abc\""),
        ))
    }

    /// A 200 as a handler answers it: identity JSON with its ETag, the representation attached.
    fn rendered(representation: &Arc<Representation>) -> Response<Body> {
        let mut response = Response::new(body::full(representation.bytes().clone()));
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(ETAG, representation.etag().clone());
        response.extensions_mut().insert(representation.clone());
        response
    }

    /// The compression stack as `stack::app` builds it, over a handler answering `/rendered`
    /// with a representation, `/download` with octet-stream bytes and anything else with
    /// plain JSON.
    fn app(
        representation: Arc<Representation>,
    ) -> impl Service<Request<()>, Response = Response<Body>, Error = BoxError> + Clone {
        app_with(representation, true)
    }

    /// [`app`], with compression switched on or off.
    fn app_with(
        representation: Arc<Representation>,
        enabled: bool,
    ) -> impl Service<Request<()>, Response = Response<Body>, Error = BoxError> + Clone {
        ServiceBuilder::new()
            .map_response(|r: Response<_>| r.map(BodyExt::boxed_unsync))
            .layer(streaming(enabled))
            .layer(PrecompressedLayer::new(enabled))
            .service(tower::service_fn(move |req: Request<()>| {
                let representation = representation.clone();
                async move {
                    let mut response = match req.uri().path() {
                        "/rendered" => return Ok::<_, BoxError>(rendered(&representation)),
                        "/download" => Response::new(body::full(big_json())),
                        _ => Response::new(body::full(serde_json::to_vec(&vec!["x"; 500])?)),
                    };
                    let content_type = match req.uri().path() {
                        "/download" => "application/octet-stream",
                        _ => "application/json",
                    };
                    response
                        .headers_mut()
                        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
                    Ok(response)
                }
            }))
    }

    async fn get(
        app: impl Service<Request<()>, Response = Response<Body>, Error = BoxError>,
        path: &str,
        accept: &str,
    ) -> (http::response::Parts, bytes::Bytes) {
        let req = Request::get(path)
            .header(ACCEPT_ENCODING, accept)
            .body(())
            .unwrap();
        let (parts, body) = app.oneshot(req).await.unwrap().into_parts();
        (parts, body.collect().await.unwrap().to_bytes())
    }

    fn gunzip(bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(bytes)
            .read_to_end(&mut out)
            .unwrap();
        out
    }

    #[tokio::test]
    async fn a_rendered_answer_is_compressed_once_and_served_from_its_memo() {
        let representation = kept(big_json());
        let app = app(representation.clone());
        let (first, body) = get(app.clone(), "/rendered", "gzip, br;q=0.5").await;
        assert_eq!(first.headers[CONTENT_ENCODING], "gzip");
        assert_eq!(first.headers[VARY], "accept-encoding");
        assert_eq!(first.headers[CONTENT_LENGTH], body.len().to_string());
        assert_eq!(first.headers[ETAG], "\"abc-gzip\"");
        assert_eq!(gunzip(&body), big_json());

        let memo = representation.encoded(Coding::Gzip).unwrap().bytes.as_ptr();
        let (_, again) = get(app.clone(), "/rendered", "gzip").await;
        assert_eq!(
            again.as_ptr(),
            memo,
            "served the memoised bytes, not a new compression"
        );

        let (br, body) = get(app.clone(), "/rendered", "br").await;
        assert_eq!(br.headers[CONTENT_ENCODING], "br");
        let mut plain = Vec::new();
        brotli::BrotliDecompress(&mut &body[..], &mut plain).unwrap();
        assert_eq!(plain, big_json());

        let (identity, body) = get(app, "/rendered", "identity").await;
        assert!(identity.headers.get(CONTENT_ENCODING).is_none());
        assert_eq!(identity.headers[VARY], "accept-encoding");
        assert_eq!(identity.headers[ETAG], representation.etag());
        assert_eq!(body, big_json());
    }

    #[tokio::test]
    async fn downloads_stay_as_they_are_and_other_json_is_streamed_compressed() {
        let app = app(kept(big_json()));
        let (download, body) = get(app.clone(), "/download", "gzip").await;
        assert!(download.headers.get(CONTENT_ENCODING).is_none());
        assert_eq!(body, big_json());

        let (other, body) = get(app.clone(), "/other", "gzip").await;
        assert_eq!(other.headers[CONTENT_ENCODING], "gzip");
        assert_eq!(gunzip(&body), serde_json::to_vec(&vec!["x"; 500]).unwrap());
    }

    #[tokio::test]
    async fn a_client_refusing_every_coding_gets_identity_never_406() {
        let app = app(kept(big_json()));
        for accept in [
            "identity;q=0",
            "*;q=0",
            "identity;q=0, gzip;q=0",
            "br;q=0, *;q=0",
        ] {
            for path in ["/rendered", "/download", "/other"] {
                let (parts, body) = get(app.clone(), path, accept).await;
                assert_eq!(parts.status, StatusCode::OK, "{path} {accept}");
                assert!(parts.headers.get(CONTENT_ENCODING).is_none(), "{path}");
                assert!(serde_json::from_slice::<serde_json::Value>(&body).is_ok());
            }
        }
        let mut req = Request::get("/")
            .header(ACCEPT_ENCODING, "gzip;q=0.2")
            .header(ACCEPT_ENCODING, "br")
            .body(())
            .unwrap();
        assert_eq!(negotiated(&mut req), Coding::Brotli);
        assert_eq!(req.headers()[ACCEPT_ENCODING], "br");
    }

    #[tokio::test]
    async fn switched_off_every_answer_passes_as_it_is() {
        let representation = kept(big_json());
        let app = app_with(representation.clone(), false);
        for path in ["/rendered", "/download", "/other"] {
            let (parts, body) = get(app.clone(), path, "gzip, br").await;
            assert!(parts.headers.get(CONTENT_ENCODING).is_none(), "{path}");
            assert!(parts.headers.get(VARY).is_none(), "{path}");
            assert!(serde_json::from_slice::<serde_json::Value>(&body).is_ok());
        }
        let (parts, _) = get(app, "/rendered", "gzip").await;
        assert_eq!(parts.headers[ETAG], representation.etag());
    }

    #[tokio::test]
    async fn a_304_keeps_the_validator_it_was_given() {
        let representation = kept(big_json());
        let answer = representation.clone();
        let not_modified =
            PrecompressedLayer::new(true).layer(tower::service_fn(move |_: Request<()>| {
                let mut response = rendered(&answer);
                *response.status_mut() = StatusCode::NOT_MODIFIED;
                *response.body_mut() = body::empty();
                response
                    .headers_mut()
                    .insert(ETAG, HeaderValue::from_static("W/\"abc-br\""));
                async move { Ok::<_, BoxError>(response) }
            }));
        let (parts, body) = get(not_modified, "/rendered", "gzip").await;
        assert_eq!(parts.status, StatusCode::NOT_MODIFIED);
        assert!(body.is_empty());
        assert!(parts.headers.get(CONTENT_ENCODING).is_none());
        assert_eq!(parts.headers[ETAG], "W/\"abc-br\"");
        assert_eq!(parts.headers[VARY], "accept-encoding");
    }

    #[tokio::test]
    async fn vary_names_accept_encoding_once() {
        let representation = kept(big_json());
        for (had, want) in [
            (&["origin"][..], &["origin", "accept-encoding"][..]),
            (&["Accept-Encoding"], &["Accept-Encoding"]),
            (
                &["origin", "accept-encoding"],
                &["origin", "accept-encoding"],
            ),
        ] {
            let answer = representation.clone();
            let service =
                PrecompressedLayer::new(true).layer(tower::service_fn(move |_: Request<()>| {
                    let mut response = rendered(&answer);
                    for line in had {
                        response
                            .headers_mut()
                            .append(VARY, HeaderValue::from_static(line));
                    }
                    async move { Ok::<_, BoxError>(response) }
                }));
            let (parts, _) = get(service, "/rendered", "gzip").await;
            let vary: Vec<_> = parts.headers.get_all(VARY).iter().collect();
            assert_eq!(vary, want, "{had:?}");
        }
    }
}
