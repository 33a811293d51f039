//! Reading a request body, for the routes that take one (the batch resolve, the webhooks, the
//! purge): at most [`MAX_BODY_BYTES`], within [`BODY_READ_TIMEOUT`], whole before anything
//! looks at it, and within the bodies' shared [`Budget`].

use std::fmt;
use std::marker::PhantomData;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{HeaderValue, ACCEPT_ENCODING, CONTENT_ENCODING};
use http::{HeaderMap, Response, StatusCode};
use http_body_util::BodyExt;
use serde::de::value::MapAccessDeserializer;
use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::body::Body;
use crate::error::{ApiError, Overload};
use crate::BoxError;

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// How long a client may take to send a request body.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes of each body read without asking the [`Budget`]: room for every batch and delivery
/// the API expects (200 requirements, a release event), so these are never refused for it.
pub const FREE_BYTES: usize = 64 * 1024;
/// Bytes past their [`FREE_BYTES`] that all the bodies being read may hold together.
pub const BUDGET_BYTES: usize = 64 * 1024 * 1024;

/// `400 invalid_body`, the answer to a body that cannot be used.
pub fn invalid_body(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "invalid_body", message)
}

fn too_large() -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
        format!("the body is larger than {MAX_BODY_BYTES} bytes"),
    )
}

/// The `415 unsupported_encoding`, with `Accept-Encoding: identity`, when the body comes with a
/// content coding other than `identity` (RFC 9110 §8.4.1, §15.5.16): bodies are read as they
/// come, and a compressed one would only fail as JSON, with a message about its first byte.
pub fn coding_refused(headers: &HeaderMap) -> Option<Response<Body>> {
    let coded = headers
        .get_all(CONTENT_ENCODING)
        .iter()
        .flat_map(|value| value.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .find(|coding| !coding.is_empty() && !coding.eq_ignore_ascii_case(b"identity"));
    let coding = coded?;
    let mut refused = ApiError::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_encoding",
        format!(
            "a body in Content-Encoding {} is not taken; send it uncompressed",
            String::from_utf8_lossy(&coding[..coding.len().min(32)])
        ),
    )
    .into_response();
    refused
        .headers_mut()
        .insert(ACCEPT_ENCODING, HeaderValue::from_static("identity"));
    Some(refused)
}

/// The memory the bodies being read may hold past their first [`FREE_BYTES`] each. Without
/// it, clients sending bodies of nearly [`MAX_BODY_BYTES`] and stalling held that much per
/// request in progress (a GiB at the default limit); with it, the bodies hold at most
/// `max_concurrent_requests` × [`FREE_BYTES`] plus the budget, and a body that would go past
/// it is refused with `503 overloaded` at once.
#[derive(Clone, Debug)]
pub struct Budget(Arc<Semaphore>);

impl Budget {
    /// A budget of `bytes` in all.
    pub fn new(bytes: usize) -> Self {
        Self(Arc::new(Semaphore::new(bytes)))
    }

    /// Bytes left now.
    #[cfg(test)]
    fn available(&self) -> usize {
        self.0.available_permits()
    }

    /// Takes `bytes` more into `held`; `503 overloaded` when the budget cannot give them.
    fn take(&self, held: &mut Option<OwnedSemaphorePermit>, bytes: usize) -> Result<(), ApiError> {
        if bytes == 0 {
            return Ok(());
        }
        let taken = u32::try_from(bytes)
            .ok()
            .and_then(|n| self.0.clone().try_acquire_many_owned(n).ok())
            .ok_or_else(|| ApiError::overloaded(Overload::RequestBodies))?;
        match held {
            Some(permit) => permit.merge(taken),
            None => *held = Some(taken),
        }
        Ok(())
    }
}

impl Default for Budget {
    fn default() -> Self {
        Self::new(BUDGET_BYTES)
    }
}

/// Reads a body of at most [`MAX_BODY_BYTES`] within [`BODY_READ_TIMEOUT`]: `413
/// body_too_large` beyond (refused at once when `Content-Length` says so), `408
/// body_timeout` when it trickles, `503 overloaded` when its bytes past [`FREE_BYTES`] do
/// not fit in `budget`. What it takes of the budget is given back when it returns.
pub async fn read<B>(body: B, budget: &Budget) -> Result<Bytes, ApiError>
where
    B: http_body::Body,
    B::Error: Into<BoxError>,
{
    if body.size_hint().lower() > MAX_BODY_BYTES as u64 {
        return Err(too_large());
    }
    match tokio::time::timeout(BODY_READ_TIMEOUT, collect(body, budget)).await {
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            format!(
                "the body did not arrive within {} s",
                BODY_READ_TIMEOUT.as_secs()
            ),
        )),
        Ok(read) => read,
    }
}

async fn collect<B>(body: B, budget: &Budget) -> Result<Bytes, ApiError>
where
    B: http_body::Body,
    B::Error: Into<BoxError>,
{
    let mut body = pin!(body);
    // Room for what the body says it holds (its `Content-Length`), taken from the budget at
    // once; a body that grows past its room takes what the buffer grows by. The budget is
    // charged for the buffer's capacity, what is really held.
    let declared = usize::try_from(body.size_hint().lower()).unwrap_or(MAX_BODY_BYTES);
    let mut read = BytesMut::with_capacity(declared.min(MAX_BODY_BYTES));
    let (mut held, mut charged) = (None, 0);
    loop {
        let room = read.capacity().saturating_sub(FREE_BYTES);
        budget.take(&mut held, room.saturating_sub(charged))?;
        charged = charged.max(room);
        let Some(frame) = body.frame().await else {
            return Ok(read.freeze());
        };
        let frame = frame.map_err(|_| invalid_body("the body could not be read"))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if read.len() + data.remaining() > MAX_BODY_BYTES {
            return Err(too_large());
        }
        read.put(data);
    }
}

/// A `T` read from a JSON object alone. serde's derived structs also take an array of their
/// fields in declaration order (`["provider", "aws"]` for `{"type", "name"}`), a shape the API
/// documents nowhere and whose meaning changes with the order of a struct's fields.
pub struct Object<T>(pub T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct OnlyAMap<T>(PhantomData<T>);

        impl<'de, T: Deserialize<'de>> Visitor<'de> for OnlyAMap<T> {
            type Value = T;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(MapAccessDeserializer::new(map))
            }
        }

        deserializer
            .deserialize_map(OnlyAMap(PhantomData))
            .map(Object)
    }
}

/// For `#[serde(deserialize_with)]`: a `T` read as an [`Object`].
pub fn object<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Object::deserialize(deserializer).map(|Object(t)| t)
}

/// For `#[serde(default, deserialize_with)]` on an `Option<T>`: a field that may be left out
/// but, when given, is a `T`. serde reads `null` as `None` otherwise, so a field set from an
/// unset variable would read as a field left out.
pub fn present<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(deserializer).map(Some)
}

/// For `#[serde(deserialize_with)]`: an array of `T`, each read as an [`Object`].
pub fn objects<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    let objects = Vec::<Object<T>>::deserialize(deserializer)?;
    Ok(objects.into_iter().map(|Object(t)| t).collect())
}

#[cfg(test)]
mod tests {
    use http_body_util::channel::Channel;
    use http_body_util::Full;

    use super::*;

    /// What reading `bytes` in one frame answers, with `budget` bytes of budget.
    async fn read_whole(bytes: usize, budget: usize) -> Result<Bytes, ApiError> {
        super::read(
            Full::new(Bytes::from(vec![b' '; bytes])),
            &Budget::new(budget),
        )
        .await
    }

    fn coded(codings: &[&'static str]) -> HeaderMap {
        codings
            .iter()
            .map(|coding| (CONTENT_ENCODING, HeaderValue::from_static(coding)))
            .collect()
    }

    #[test]
    fn only_bodies_without_a_content_coding_are_taken() {
        for codings in [&[][..], &["identity"], &["Identity , identity"], &[""]] {
            assert!(coding_refused(&coded(codings)).is_none(), "{codings:?}");
        }
        for codings in [&["gzip"][..], &["identity, br"], &["identity", "x-custom"]] {
            let refused = coding_refused(&coded(codings)).unwrap();
            assert_eq!(refused.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
            assert_eq!(refused.headers()[ACCEPT_ENCODING], "identity");
        }
    }

    #[tokio::test]
    async fn a_body_takes_only_its_bytes_past_the_free_ones_and_gives_them_back() {
        let budget = Budget::new(BUDGET_BYTES);
        let (mut sender, body) = Channel::<Bytes>::new(1);
        let reading = tokio::spawn({
            let budget = budget.clone();
            async move { super::read(body, &budget).await }
        });
        sender
            .send_data(vec![b' '; FREE_BYTES / 2].into())
            .await
            .unwrap();
        sender
            .send_data(vec![b' '; FREE_BYTES / 2].into())
            .await
            .unwrap();
        // The channel holds one frame: once the next is taken, the last is counted.
        sender.send_data(Bytes::from_static(b" ")).await.unwrap();
        sender.send_data(Bytes::from_static(b" ")).await.unwrap();
        // The buffer's room past the free bytes: at least the byte past them, at most what
        // doubling the buffer for it makes.
        let taken = BUDGET_BYTES - budget.available();
        assert!((1..=FREE_BYTES + 2).contains(&taken), "{taken}");
        drop(sender);
        assert_eq!(reading.await.unwrap().unwrap().len(), FREE_BYTES + 2);
        assert_eq!(budget.available(), BUDGET_BYTES);
    }

    #[tokio::test]
    async fn small_bodies_need_no_budget_and_large_ones_are_refused_past_it() {
        assert_eq!(read_whole(FREE_BYTES, 0).await.unwrap().len(), FREE_BYTES);
        let refused = read_whole(FREE_BYTES + 1, 0).await.unwrap_err();
        assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(refused.code, "overloaded");
        let fits = read_whole(MAX_BODY_BYTES, MAX_BODY_BYTES - FREE_BYTES).await;
        assert_eq!(fits.unwrap().len(), MAX_BODY_BYTES);
        let refused = read_whole(MAX_BODY_BYTES + 1, BUDGET_BYTES)
            .await
            .unwrap_err();
        assert_eq!(refused.status, StatusCode::PAYLOAD_TOO_LARGE);
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Pair {
        a: u8,
        #[serde(default)]
        b: Option<u8>,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    struct Pairs {
        #[serde(deserialize_with = "objects")]
        pairs: Vec<Pair>,
    }

    fn read<T: for<'de> Deserialize<'de>>(json: &str) -> Result<T, String> {
        serde_json::from_str::<Object<T>>(json)
            .map(|Object(t)| t)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn objects_are_read_as_the_struct_says() {
        assert_eq!(read::<Pair>(r#"{"a": 1}"#), Ok(Pair { a: 1, b: None }));
        assert_eq!(
            read::<Pair>(r#"{"b": 2, "a": 1}"#),
            Ok(Pair { a: 1, b: Some(2) })
        );
        assert!(read::<Pair>(r#"{"a": 1, "c": 3}"#)
            .unwrap_err()
            .contains("unknown field"));
        assert_eq!(
            read::<Pairs>(r#"{"pairs": [{"a": 1}]}"#),
            Ok(Pairs {
                pairs: vec![Pair { a: 1, b: None }]
            })
        );
    }

    #[derive(Debug, Deserialize, PartialEq)]
    struct Optional {
        #[serde(default, deserialize_with = "present")]
        a: Option<u8>,
    }

    #[test]
    fn a_field_left_out_is_none_but_a_null_one_is_refused() {
        assert_eq!(read::<Optional>("{}"), Ok(Optional { a: None }));
        assert_eq!(read::<Optional>(r#"{"a": 1}"#), Ok(Optional { a: Some(1) }));
        let error = read::<Optional>(r#"{"a": null}"#).unwrap_err();
        assert!(error.contains("invalid type: null"), "{error}");
    }

    #[test]
    fn arrays_in_place_of_objects_are_refused() {
        // Through serde's derive alone, an array reads as the struct.
        assert!(serde_json::from_str::<Pair>("[1, 2]").is_ok());
        for json in ["[1, 2]", "[]", "1", "null", "\"a\""] {
            let error = read::<Pair>(json).unwrap_err();
            assert!(error.contains("expected a JSON object"), "{json}: {error}");
        }
        for json in [r#"[[[1]]]"#, r#"{"pairs": [[1]]}"#] {
            let error = read::<Pairs>(json).unwrap_err();
            assert!(error.contains("expected a JSON object"), "{json}: {error}");
        }
    }
}
