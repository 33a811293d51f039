//! extension-registry: one REST API over provisioning extensions kept in Gitea/Forgejo
//! releases, OCI registries and local directories.
//!
//! Module map:
//! - [`config`]: the TOML configuration, one struct per section, validated with clear errors.
//! - [`registry`]: the domain (extensions, names, version ordering, search), the
//!   request/response vocabulary every backend speaks, and the service merging backends.
//! - [`backend`]: one tower service per backend kind (Gitea, OCI, local directory);
//!   [`backend::oci`] reads OCI registries (catalog, tags, manifest annotations, blobs).
//! - [`error`]: the API error (status, code, message) and the one mapping from domain errors.
//! - [`body`]: the one response body type.

pub mod backend;
pub mod body;
pub mod config;
pub mod error;
pub mod registry;

/// The error type of services below the error-rescue layer.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
