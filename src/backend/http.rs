//! What the HTTP backends (Gitea, OCI) share: one way to build a reqwest client, to follow
//! redirects deciding the credential hop by hop, to map its errors to the domain's, to ask for
//! a byte range and check the answer, and to turn a response into a streamed artifact body.

use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use futures_util::TryStreamExt;
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_RANGE, LOCATION, RANGE};
use reqwest::{Method, StatusCode, Url};

use crate::backend::direct::{Direct, Failure};
use crate::config::ConfigError;
use crate::registry::{ArtifactBody, RegistryError, Served, Source, Span};
use crate::BoxError;

/// How many redirects one backend request may follow (object storage answers with one or two).
pub const MAX_REDIRECTS: usize = 5;

/// The most bytes read whole from a metadata answer (a Gitea JSON page, a registry catalog page,
/// tag list, manifest or error body): an answer that is larger is broken or hostile, and memory
/// must stay bounded whatever a backend sends.
pub const MAX_METADATA_BYTES: usize = 16 * 1024 * 1024;

/// Builds the client a backend uses for all its calls.
///
/// `timeout` bounds connecting and each read, not a whole transfer, so a large artifact that
/// keeps streaming is never cut off while a stalled backend still is. The client follows no
/// redirect: reqwest's own following keeps `Authorization` on any redirect within the origin,
/// so [`send_per_hop`] follows them, deciding the credential at every hop.
/// A failure to build it is a configuration error of `section`.
pub fn client(
    section: &str,
    timeout: Duration,
    verify_tls: bool,
) -> Result<reqwest::Client, ConfigError> {
    reqwest::Client::builder()
        .user_agent(concat!("extension-registry/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(timeout)
        .read_timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .tls_danger_accept_invalid_certs(!verify_tls)
        .build()
        .map_err(|e| ConfigError {
            file: section.into(),
            message: format!("cannot build the HTTP client: {e}"),
        })
}

/// Why [`send_per_hop`] got no answer.
#[derive(Debug)]
pub enum HopError {
    /// A hop could not be sent or answered (connect, timeout, protocol).
    Transport(reqwest::Error),
    /// The same, on a download's own connection.
    Direct(Failure),
    /// The redirects led nowhere usable: a loop, more than [`MAX_REDIRECTS`], or a `Location`
    /// that is not an http(s) URL.
    Redirect(String),
}

impl HopError {
    /// The domain error, naming `backend`.
    pub fn into_registry_error(self, backend: Source) -> RegistryError {
        match self {
            Self::Transport(e) => transport_error(backend, &e),
            Self::Direct(Failure::Timeout) => RegistryError::timeout(backend),
            Self::Direct(Failure::Connect) => RegistryError::unavailable(backend, "cannot connect"),
            Self::Direct(Failure::Protocol) => {
                RegistryError::unavailable(backend, "request failed")
            }
            Self::Redirect(reason) => RegistryError::unavailable(backend, reason),
        }
    }
}

/// Sends a GET or HEAD and follows its redirects itself, up to [`MAX_REDIRECTS`], with the
/// same method and `headers` on every hop. `credential` (an `Authorization` value) goes only
/// with a hop `may_carry` accepts: a redirect is written by whoever answers, so a hop that does
/// not qualify (object storage's presigned URL, another path of the same host) is followed
/// without it, never with it. A loop or a longer chain is an error.
pub async fn send_per_hop(
    http: &reqwest::Client,
    method: &Method,
    first: Url,
    headers: &HeaderMap,
    credential: Option<&HeaderValue>,
    may_carry: impl Fn(&Url) -> bool,
) -> Result<reqwest::Response, HopError> {
    let (response, _) = send_per_hop_via(
        Via::Shared(http),
        method,
        first,
        headers,
        credential,
        may_carry,
    )
    .await?;
    Ok(response)
}

/// What sends each hop of a request.
#[derive(Clone, Copy)]
pub enum Via<'a> {
    /// The backend's shared client, pooling its connections.
    Shared(&'a reqwest::Client),
    /// A download's own connection per hop (see [`Direct`]).
    Own(&'a Direct),
}

/// [`send_per_hop`], each hop sent `via` the shared client or a connection of its own; also
/// returns the URL of the hop that answered, so a caller can tell the origin's own answer from
/// one a redirect led to (a connection of its own leaves [`reqwest::Response::url`] unset).
pub async fn send_per_hop_via(
    via: Via<'_>,
    method: &Method,
    first: Url,
    headers: &HeaderMap,
    credential: Option<&HeaderValue>,
    may_carry: impl Fn(&Url) -> bool,
) -> Result<(reqwest::Response, Url), HopError> {
    let mut visited: Vec<Url> = Vec::new();
    let mut url = first;
    loop {
        if visited.contains(&url) {
            return Err(HopError::Redirect("redirect loop".into()));
        }
        if visited.len() > MAX_REDIRECTS {
            return Err(HopError::Redirect(format!(
                "more than {MAX_REDIRECTS} redirects"
            )));
        }
        let mut hop_headers = headers.clone();
        if let Some(value) = credential.filter(|_| may_carry(&url)) {
            hop_headers.insert(AUTHORIZATION, value.clone());
        }
        let response = match via {
            Via::Shared(http) => http
                .request(method.clone(), url.clone())
                .headers(hop_headers)
                .send()
                .await
                .map_err(HopError::Transport)?,
            Via::Own(direct) => direct
                .send(method, &url, hop_headers)
                .await
                .map_err(HopError::Direct)?,
        };
        let location = response
            .headers()
            .get(LOCATION)
            .and_then(|v| v.to_str().ok());
        let next = match location {
            Some(location) if response.status().is_redirection() => url
                .join(location)
                .ok()
                .filter(|u| matches!(u.scheme(), "http" | "https"))
                .ok_or_else(|| HopError::Redirect("redirect to an unusable location".into()))?,
            _ => return Ok((response, url)),
        };
        visited.push(url);
        url = next;
    }
}

/// `host[:port]` of `url`, the port only when not the scheme's default; `None` without a host.
pub fn authority(url: &Url) -> Option<String> {
    let host = url.host_str()?;
    Some(match url.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_owned(),
    })
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
        RegistryError::timeout(backend)
    } else if e.is_connect() {
        RegistryError::unavailable(backend, "cannot connect")
    } else if e.is_decode() || e.is_body() {
        RegistryError::unavailable(backend, "malformed or interrupted response body")
    } else {
        RegistryError::unavailable(backend, "request failed")
    }
}

/// The longest `Retry-After` believed: a proxy asking for days is taken to mean an hour, so a
/// misconfigured header cannot switch a backend off for longer than that.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// An upstream `429` or `503` with `Retry-After`: the backend asks not to be called for that
/// long, and its circuit breaker honours it. `None` for any other answer.
pub fn throttled(
    backend: Source,
    response: &reqwest::Response,
    what: &str,
) -> Option<RegistryError> {
    let status = response.status();
    if !matches!(status.as_u16(), 429 | 503) {
        return None;
    }
    let header = response.headers().get(reqwest::header::RETRY_AFTER)?;
    let retry_after = parse_retry_after(header.to_str().ok()?, SystemTime::now())?;
    Some(RegistryError::suspended(
        backend,
        format!(
            "{what}: HTTP {status} asking to retry after {} s",
            retry_after.as_secs()
        ),
        retry_after,
    ))
}

/// A `Retry-After` value (RFC 9110 §10.2.3: delta-seconds or an HTTP-date) as a wait from
/// `now`, at most [`MAX_RETRY_AFTER`]; `None` when unreadable.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    let wait = match value.parse::<u64>() {
        Ok(seconds) => Duration::from_secs(seconds),
        Err(_) => {
            let date =
                time::OffsetDateTime::parse(value, &time::format_description::well_known::Rfc2822)
                    .ok()?;
            SystemTime::from(date)
                .duration_since(now)
                .unwrap_or_default()
        }
    };
    Some(wait.min(MAX_RETRY_AFTER))
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

/// The headers asking an upstream for `span` (`Range: bytes=first-last`), or none.
pub fn range_headers(span: Option<Span>) -> HeaderMap {
    let mut headers = HeaderMap::new();
    let value =
        span.and_then(|s| HeaderValue::from_str(&format!("bytes={}-{}", s.first, s.last)).ok());
    if let Some(value) = value {
        headers.insert(RANGE, value);
    }
    headers
}

/// How an upstream answered a request for a byte range.
#[derive(Debug, PartialEq, Eq)]
pub enum RangeAnswer {
    /// A 206 of exactly the span asked for.
    Part,
    /// A 200: the upstream ignored `Range` (RFC 9110 allows it) and sends the whole.
    Whole,
    /// Anything else: a 206 of another span or size, or without a usable `Content-Range`;
    /// it must not be passed on as the part asked for.
    Wrong(String),
}

/// Whether `response`, to a request for `span`, is that span (a 206 whose `Content-Range` is
/// exactly `bytes first-last/size` and whose length, when given, is the span's), the whole (a
/// 200), or something that must not be served as either.
pub fn range_answer(response: &reqwest::Response, span: &Span) -> RangeAnswer {
    match response.status() {
        StatusCode::OK => return RangeAnswer::Whole,
        StatusCode::PARTIAL_CONTENT => {}
        other => return RangeAnswer::Wrong(format!("answered HTTP {other} to a range request")),
    }
    let content_range = response
        .headers()
        .get(CONTENT_RANGE)
        .and_then(|v| v.to_str().ok());
    if !content_range.is_some_and(|v| is_content_range_of(v, span)) {
        return RangeAnswer::Wrong(format!(
            "answered a range request with Content-Range {content_range:?} instead of {:?}",
            span.content_range()
        ));
    }
    if response
        .content_length()
        .is_some_and(|n| n != span.length())
    {
        return RangeAnswer::Wrong("a partial answer's length differs from its range".into());
    }
    RangeAnswer::Part
}

/// Opens a download of `span` (or of the whole when `None`) with `open`, and says what the
/// answer holds: the span when the upstream sent exactly it, the whole when it ignored the
/// range. An answer that is neither (a 206 of another span) is never passed on as the part:
/// the whole is opened again instead, so a client never gets a wrong 206.
pub async fn open_range<F, Fut>(
    backend: Source,
    span: Option<Span>,
    open: F,
) -> Result<(reqwest::Response, Served), RegistryError>
where
    F: Fn(Option<Span>) -> Fut,
    Fut: std::future::Future<Output = Result<reqwest::Response, RegistryError>>,
{
    let response = open(span).await?;
    let Some(span) = span else {
        return Ok((response, Served::Whole));
    };
    match range_answer(&response, &span) {
        RangeAnswer::Part => Ok((response, Served::Part(span))),
        RangeAnswer::Whole => Ok((response, Served::Whole)),
        RangeAnswer::Wrong(reason) => {
            tracing::warn!(%backend, %reason, "range answer refused; fetching the whole artifact");
            drop(response);
            Ok((open(None).await?, Served::Whole))
        }
    }
}

/// Whether a `Content-Range` value (`bytes first-last/size`, the size possibly `*`) names
/// exactly `span`.
fn is_content_range_of(value: &str, span: &Span) -> bool {
    let Some((unit, rest)) = value.trim().split_once(' ') else {
        return false;
    };
    let Some((range, size)) = rest.trim_start().split_once('/') else {
        return false;
    };
    let Some((first, last)) = range.split_once('-') else {
        return false;
    };
    let number = |s: &str| {
        s.parse::<u64>()
            .ok()
            .filter(|_| s.bytes().all(|b| b.is_ascii_digit()))
    };
    unit.eq_ignore_ascii_case("bytes")
        && number(first) == Some(span.first)
        && number(last) == Some(span.last)
        && (size == "*" || number(size) == Some(span.size))
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

    fn answer(status: u16, retry_after: Option<&str>) -> reqwest::Response {
        let mut response = http::Response::builder().status(status);
        if let Some(value) = retry_after {
            response = response.header("retry-after", value);
        }
        reqwest::Response::from(response.body("").unwrap())
    }

    fn ranged(status: u16, content_range: Option<&str>, len: usize) -> reqwest::Response {
        let mut builder = http::Response::builder().status(status);
        if let Some(value) = content_range {
            builder = builder.header("content-range", value);
        }
        let body = vec![0u8; len];
        builder
            .header("content-length", len)
            .body(body)
            .unwrap()
            .into()
    }

    #[test]
    fn only_a_206_of_the_span_asked_for_is_taken_for_it() {
        let span = Span {
            first: 10,
            last: 19,
            size: 100,
        };
        let cases = [
            (206, Some("bytes 10-19/100"), 10, RangeAnswer::Part),
            (206, Some("bytes 10-19/*"), 10, RangeAnswer::Part),
            (200, None, 100, RangeAnswer::Whole),
        ];
        for (status, content_range, len, expected) in cases {
            assert_eq!(
                range_answer(&ranged(status, content_range, len), &span),
                expected
            );
        }
        for (status, content_range, len) in [
            (206, Some("bytes 0-9/100"), 10),
            (206, Some("bytes 10-19/101"), 10),
            (206, Some("bytes 10-20/100"), 11),
            (206, Some("bytes 10-19/100"), 11),
            (206, Some("items 10-19/100"), 10),
            (206, Some("bytes +10-19/100"), 10),
            (206, None, 10),
            (204, None, 0),
        ] {
            let answer = range_answer(&ranged(status, content_range, len), &span);
            assert!(
                matches!(answer, RangeAnswer::Wrong(_)),
                "{status} {content_range:?} {len}: {answer:?}"
            );
        }
        assert_eq!(range_headers(Some(span))["range"], "bytes=10-19");
        assert!(range_headers(None).is_empty());
    }

    #[test]
    fn only_429_and_503_with_retry_after_suspend_the_backend() {
        let throttled = |status, retry_after| {
            throttled(
                Source::Gitea,
                &answer(status, retry_after),
                "releases of aws_prov",
            )
        };
        let Some(RegistryError::BackendSuspended {
            backend: Source::Gitea,
            reason,
            retry_after,
            ..
        }) = throttled(429, Some("7"))
        else {
            panic!("a 429 with Retry-After suspends");
        };
        assert_eq!(retry_after, Duration::from_secs(7));
        assert!(
            reason.contains("429") && reason.contains("aws_prov"),
            "{reason}"
        );
        assert_eq!(
            throttled(503, Some("30")).and_then(|e| e.retry_after()),
            Some(Duration::from_secs(30))
        );
        assert_eq!(throttled(503, None), None);
        assert_eq!(throttled(429, Some("later")), None);
        assert_eq!(throttled(500, Some("30")), None);
        assert_eq!(throttled(200, Some("30")), None);
    }

    #[test]
    fn retry_after_is_read_as_seconds_or_a_date_and_capped() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777);
        let parse = |v| parse_retry_after(v, now);
        assert_eq!(parse("120"), Some(Duration::from_secs(120)));
        assert_eq!(parse(" 0 "), Some(Duration::ZERO));
        // 784111777 is Sun, 06 Nov 1994 08:49:37 GMT, RFC 9110's example.
        assert_eq!(
            parse("Sun, 06 Nov 1994 08:50:07 GMT"),
            Some(Duration::from_secs(30))
        );
        assert_eq!(parse("Sun, 06 Nov 1994 08:00:00 GMT"), Some(Duration::ZERO));
        assert_eq!(parse("99999999"), Some(MAX_RETRY_AFTER));
        assert_eq!(parse("soon"), None);
        assert_eq!(parse("-5"), None);
    }

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
