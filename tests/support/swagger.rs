//! A validator for the subset of Swagger 2.0 that Gitea's document uses for the bodies we
//! read (`type`, `properties`, `required`, `items`, `$ref`, `additionalProperties`, formats
//! `date-time` and `int64`), and of OpenAPI 3.0 that GitHub's description adds (schemas under
//! `components`, `nullable`, `enum`). Stricter than the spec on purpose: a property the schema
//! does not define is an error, so a simulator cannot grow fields the real server never sends.

use serde_json::{Map, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// The definitions of one Swagger document.
pub struct Swagger {
    definitions: Map<String, Value>,
    /// What `$ref`s start with: `#/definitions/` (Swagger 2.0) or `#/components/schemas/`.
    prefix: &'static str,
    /// `Definition.property` pairs the server sends although the schema lacks them.
    known_extras: Vec<String>,
}

impl Swagger {
    pub fn from_file(path: &str) -> Self {
        let text = std::fs::read_to_string(path).expect("read swagger document");
        let doc: Value = serde_json::from_str(&text).expect("parse swagger document");
        let definitions = doc["definitions"].as_object().expect("definitions").clone();
        Self {
            definitions,
            prefix: "#/definitions/",
            known_extras: Vec::new(),
        }
    }

    /// The schemas of an OpenAPI 3.0 document (`components.schemas`).
    pub fn from_openapi(path: &str) -> Self {
        let text = std::fs::read_to_string(path).expect("read OpenAPI document");
        let doc: Value = serde_json::from_str(&text).expect("parse OpenAPI document");
        let definitions = doc["components"]["schemas"]
            .as_object()
            .expect("components.schemas")
            .clone();
        Self {
            definitions,
            prefix: "#/components/schemas/",
            known_extras: Vec::new(),
        }
    }

    /// Allows `Definition.property` although the schema does not define it.
    pub fn allow_extra(mut self, qualified: &str) -> Self {
        self.known_extras.push(qualified.into());
        self
    }

    /// Checks `value` against definition `name`; the errors name JSON paths.
    pub fn validate(&self, name: &str, value: &Value) -> Result<(), Vec<String>> {
        let mut errors = Vec::new();
        let schema = Value::String(format!("{}{name}", self.prefix));
        let schema = serde_json::json!({ "$ref": schema });
        self.check(&schema, value, "$", None, &mut errors);
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    fn check(
        &self,
        schema: &Value,
        value: &Value,
        path: &str,
        definition: Option<&str>,
        errors: &mut Vec<String>,
    ) {
        if let Some(reference) = schema.get("$ref").and_then(Value::as_str) {
            let name = reference
                .strip_prefix(self.prefix)
                .expect("only local definitions");
            let Some(target) = self.definitions.get(name) else {
                errors.push(format!("{path}: unknown definition {name}"));
                return;
            };
            return self.check(target, value, path, Some(name), errors);
        }
        if value.is_null() && schema.get("nullable").and_then(Value::as_bool) == Some(true) {
            return;
        }
        if let Some(allowed) = schema.get("enum").and_then(Value::as_array) {
            if !allowed.contains(value) {
                errors.push(format!("{path}: {value} is not one of {allowed:?}"));
            }
        }
        let ty = schema.get("type").and_then(Value::as_str);
        let format = schema.get("format").and_then(Value::as_str);
        let ok = match ty {
            None => true,
            Some("object") => value.is_object(),
            Some("array") => value.is_array(),
            Some("string") => value.is_string(),
            Some("boolean") => value.is_boolean(),
            Some("integer") => value.is_i64() || (value.is_u64() && format != Some("int64")),
            Some("number") => value.is_number(),
            Some(other) => {
                errors.push(format!("{path}: schema type {other} not supported"));
                return;
            }
        };
        if !ok {
            errors.push(format!(
                "{path}: expected {}, got {value}",
                ty.unwrap_or("?")
            ));
            return;
        }
        if format == Some("date-time") {
            let text = value.as_str().unwrap_or_default();
            if OffsetDateTime::parse(text, &Rfc3339).is_err() {
                errors.push(format!("{path}: '{text}' is not an RFC 3339 date-time"));
            }
        }
        if let Some(items) = schema.get("items") {
            for (i, item) in value.as_array().into_iter().flatten().enumerate() {
                self.check(items, item, &format!("{path}[{i}]"), None, errors);
            }
        }
        if let Some(object) = value.as_object() {
            let properties = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties");
            for (key, item) in object {
                let sub = format!("{path}.{key}");
                match (properties.and_then(|p| p.get(key)), additional) {
                    (Some(s), _) => self.check(s, item, &sub, None, errors),
                    (None, Some(s)) if s.is_object() => self.check(s, item, &sub, None, errors),
                    _ => {
                        let extra = format!("{}.{key}", definition.unwrap_or("?"));
                        if !self.known_extras.contains(&extra) {
                            errors.push(format!("{sub}: not defined by the schema"));
                        }
                    }
                }
            }
            for required in schema
                .get("required")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
            {
                if !object.contains_key(required) {
                    errors.push(format!("{path}: missing required '{required}'"));
                }
            }
        }
    }
}
