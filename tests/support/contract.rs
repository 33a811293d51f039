//! The client contract as the tests hold the service to it: the OpenAPI document the service
//! serves (`src/api/openapi.json`) and [`check`], which fails a test when a response differs
//! from what the document promises for its route, method and status: an undocumented status,
//! a missing or malformed documented header, another content type, or a body its JSON Schema
//! refuses. The shared request helpers in `app.rs` call it for every response they receive.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use extension_registry::api::openapi::DOCUMENT;
use extension_registry::api::RouteTable;
use http::header::{ALLOW, CONTENT_ENCODING, CONTENT_TYPE};
use http::{HeaderMap, StatusCode};
use jsonschema::Validator;
use serde_json::{json, Value};

/// The document, parsed.
pub fn document() -> &'static Value {
    static DOC: OnceLock<Value> = OnceLock::new();
    DOC.get_or_init(|| serde_json::from_str(DOCUMENT).expect("the OpenAPI document is JSON"))
}

/// Follows a local `$ref` (`#/components/...`) until a non-reference object.
pub fn resolve(value: &Value) -> &Value {
    match value.get("$ref").and_then(Value::as_str) {
        Some(reference) => {
            let pointer = reference.strip_prefix('#').expect("only local references");
            resolve(
                document()
                    .pointer(pointer)
                    .unwrap_or_else(|| panic!("dangling reference {reference}")),
            )
        }
        None => value,
    }
}

/// A validator for `schema`, whose `$ref`s point into the document's components; built once
/// per schema and kept.
pub fn validator(schema: &Value) -> Arc<Validator> {
    static MADE: OnceLock<Mutex<HashMap<String, Arc<Validator>>>> = OnceLock::new();
    let mut made = MADE
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    made.entry(schema.to_string())
        .or_insert_with(|| {
            let root = json!({ "allOf": [schema], "components": document()["components"] });
            let validator = jsonschema::options()
                .with_draft(jsonschema::Draft::Draft202012)
                .should_validate_formats(true)
                .build(&root)
                .unwrap_or_else(|e| panic!("{schema}: not a valid JSON Schema: {e}"));
            Arc::new(validator)
        })
        .clone()
}

/// The errors of `value` against `schema`, named by JSON path; empty when it conforms.
pub fn errors(schema: &Value, value: &Value) -> Vec<String> {
    let validator = validator(schema);
    validator
        .iter_errors(value)
        .map(|e| format!("{}: {e}", e.instance_path()))
        .collect()
}

/// Checks one response against the document; panics saying what differs.
///
/// `path` is the request path (no query). A path that is no route can only answer the stack's
/// errors or `404 not_found` to GET and HEAD, and a method the document does not give the path
/// (any but GET and HEAD on a path that is no route) only `405` (with `Allow`), a CORS
/// preflight's `200`, or the stack's errors; all as the `Error` schema.
/// HEAD is held to the GET operation's statuses and headers, with an empty body.
pub fn check(method: &str, path: &str, status: StatusCode, headers: &HeaderMap, body: &[u8]) {
    let what = format!("{method} {path} -> {status}");
    // As the layers below the log line see it.
    let normal = extension_registry::middleware::normalise::path(path);
    let route = RouteTable::new()
        .at(normal.as_deref().unwrap_or(path))
        .map(|(route, _)| route.template());
    let documented_method = match method {
        "HEAD" => "get".to_owned(),
        other => other.to_ascii_lowercase(),
    };
    let operation =
        route.and_then(|template| document()["paths"][template].get(&documented_method));
    let response = match operation {
        Some(operation) => {
            let documented = operation["responses"].get(status.as_str());
            resolve(documented.unwrap_or_else(|| {
                panic!(
                    "{what}: status not in the document for {documented_method} {}",
                    route.unwrap_or_default()
                )
            }))
        }
        None => {
            if method == "OPTIONS" && status == StatusCode::OK && body.is_empty() {
                return; // a CORS preflight, answered by the CORS layer
            }
            // A path that is no route answers GET and HEAD (with 404) and nothing else.
            let expected = match (route, method) {
                (None, "GET" | "HEAD") => StatusCode::NOT_FOUND,
                _ => StatusCode::METHOD_NOT_ALLOWED,
            };
            let stack = [400, 429, 500, 503, 504];
            assert!(
                status == expected || stack.contains(&status.as_u16()),
                "{what}: expected {expected} or one of the stack's errors {stack:?}"
            );
            if status == StatusCode::METHOD_NOT_ALLOWED {
                assert!(headers.contains_key(ALLOW), "{what}: 405 without Allow");
            }
            if method != "HEAD" {
                let error = json!({ "$ref": "#/components/schemas/Error" });
                check_json(&what, &error, headers, body);
            }
            return;
        }
    };
    for (name, header) in response["headers"].as_object().into_iter().flatten() {
        let header = resolve(header);
        let Some(value) = headers.get(name.as_str()) else {
            assert!(
                header["required"] != true,
                "{what}: documented header {name} is missing from {headers:?}"
            );
            continue;
        };
        let text = value
            .to_str()
            .unwrap_or_else(|_| panic!("{what}: header {name} is not visible ASCII"));
        let schema = &header["schema"];
        let typed = if schema["type"] == "integer" {
            text.parse::<u64>()
                .map(Value::from)
                .unwrap_or_else(|_| panic!("{what}: header {name}: {text:?} is not an integer"))
        } else {
            Value::from(text)
        };
        let problems = errors(schema, &typed);
        assert!(problems.is_empty(), "{what}: header {name}: {problems:?}");
    }
    let Some(content) = response.get("content").and_then(Value::as_object) else {
        assert!(
            body.is_empty(),
            "{what}: documented without a body, sent {body:?}"
        );
        return;
    };
    let content_type = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_else(|| panic!("{what}: no Content-Type"));
    let media = content_type.split(';').next().unwrap_or_default().trim();
    let documented = content.get(media).unwrap_or_else(|| {
        panic!(
            "{what}: Content-Type {content_type} not documented (documented: {:?})",
            content.keys().collect::<Vec<_>>()
        )
    });
    if method == "HEAD" {
        assert!(body.is_empty(), "{what}: HEAD with a body");
    } else if media == "application/json" {
        check_json(&what, &documented["schema"], headers, body);
    }
}

/// Checks a JSON body against `schema`; a compressed body is left to the tests that ask for it.
fn check_json(what: &str, schema: &Value, headers: &HeaderMap, body: &[u8]) {
    if headers.contains_key(CONTENT_ENCODING) {
        return;
    }
    let media = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok());
    assert_eq!(media, Some("application/json"), "{what}: Content-Type");
    let value: Value = serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("{what}: body is not JSON ({e}): {body:?}"));
    let problems = errors(schema, &value);
    assert!(
        problems.is_empty(),
        "{what}: body {value} differs from the document: {problems:?}"
    );
}
