//! Reading a request body, for the routes that take one (the batch resolve, the webhooks, the
//! purge): at most [`MAX_BODY_BYTES`], within [`BODY_READ_TIMEOUT`], whole before anything
//! looks at it.

use std::fmt;
use std::marker::PhantomData;
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::de::value::MapAccessDeserializer;
use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer};

use crate::error::ApiError;
use crate::BoxError;

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// How long a client may take to send a request body.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);

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

/// Reads a body of at most [`MAX_BODY_BYTES`] within [`BODY_READ_TIMEOUT`]: `413
/// body_too_large` beyond (refused at once when `Content-Length` says so), `408
/// body_timeout` when it trickles.
pub async fn read<B>(body: B) -> Result<Bytes, ApiError>
where
    B: http_body::Body,
    B::Error: Into<BoxError>,
{
    if body.size_hint().lower() > MAX_BODY_BYTES as u64 {
        return Err(too_large());
    }
    let read = Limited::new(body, MAX_BODY_BYTES).collect();
    match tokio::time::timeout(BODY_READ_TIMEOUT, read).await {
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            format!(
                "the body did not arrive within {} s",
                BODY_READ_TIMEOUT.as_secs()
            ),
        )),
        Ok(Err(e)) if e.is::<LengthLimitError>() => Err(too_large()),
        Ok(Err(_)) => Err(invalid_body("the body could not be read")),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
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
    use super::*;

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
