//! The client contract: the OpenAPI 3.1 document of every route, parameter, body, header and
//! status, written by hand in `openapi.json` beside this file and served as it is at
//! `/api/v1/openapi.json`. `tests/contract.rs` keeps it true: the document validates as
//! OpenAPI 3.1, and every response the whole-app tests receive is checked against it.

use std::sync::{Arc, OnceLock};

use http::Response;

use crate::api::representation;
use crate::body::Body;
use crate::middleware::compression::Representation;

/// The document, as served.
pub const DOCUMENT: &str = include_str!("openapi.json");

/// The document's answer: JSON with a strong ETag (so clients revalidate with a 304) and its
/// compressed forms, rendered once per process.
pub fn response() -> Response<Body> {
    static RENDERED: OnceLock<Arc<Representation>> = OnceLock::new();
    let rendered =
        RENDERED.get_or_init(|| Arc::new(representation::representation(DOCUMENT.into(), None)));
    representation::response(rendered, None)
}
