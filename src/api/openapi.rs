//! The client contract: the OpenAPI 3.1 document of every route, parameter, body, header and
//! status, written by hand in `openapi.json` beside this file. `tests/contract.rs` keeps it
//! true: the document validates as OpenAPI 3.1, and every response the whole-app tests receive
//! is checked against it.
//!
//! It is served at `/api/v1/openapi.json` as written but for one schema: `source=`, which the
//! file can only describe as any instance name, is narrowed to the values this configuration
//! accepts (the kinds and the configured instances' names).

use std::sync::Arc;

use http::Response;

use crate::api::representation;
use crate::body::Body;
use crate::middleware::compression::Representation;
use crate::registry::{Source, Sources};

/// The document, as written.
pub const DOCUMENT: &str = include_str!("openapi.json");

/// The schema of `source=` in [`DOCUMENT`] (`components.parameters.SourceFilter`), as written.
const SOURCE_SCHEMA: &str = r#""schema": {
          "type": "string",
          "pattern": "^[a-z0-9-]{1,32}$"
        }"#;

/// The document as served with `sources` configured.
pub fn document(sources: &Sources) -> String {
    let kinds = Source::ALL.map(Source::as_str);
    let names = sources.iter().map(|i| i.name.as_str());
    let accepted: Vec<&str> = kinds
        .into_iter()
        .chain(names.filter(|n| !kinds.contains(n)))
        .collect();
    let schema = serde_json::json!({ "type": "string", "enum": accepted });
    DOCUMENT.replacen(SOURCE_SCHEMA, &format!(r#""schema": {schema}"#), 1)
}

/// The served document rendered once, with a strong ETag (so clients revalidate with a 304)
/// and its compressed forms.
pub fn rendered(sources: &Sources) -> Arc<Representation> {
    Arc::new(representation::representation(
        document(sources).into_bytes(),
        None,
    ))
}

/// The document's answer.
pub fn response(rendered: &Arc<Representation>) -> Response<Body> {
    representation::response(rendered, None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Instance;

    #[test]
    fn source_is_narrowed_to_the_kinds_and_the_configured_names() {
        assert_eq!(DOCUMENT.matches(SOURCE_SCHEMA).count(), 1);
        let sources = Sources::new(vec![
            Instance {
                kind: Source::Gitea,
                name: "forge-eu".into(),
            },
            Source::Local.into(),
        ]);
        let served: serde_json::Value = serde_json::from_str(&document(&sources)).unwrap();
        assert_eq!(
            served["components"]["parameters"]["SourceFilter"]["schema"]["enum"],
            serde_json::json!(["gitea", "oci", "github", "local", "forge-eu"])
        );
        let mut written: serde_json::Value = serde_json::from_str(DOCUMENT).unwrap();
        written["components"]["parameters"]["SourceFilter"]["schema"] =
            served["components"]["parameters"]["SourceFilter"]["schema"].clone();
        assert_eq!(served, written, "nothing else differs");
    }
}
