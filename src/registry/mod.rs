//! The domain: what an extension is, how versions are ordered and constrained, how search
//! ranks, the request/response vocabulary every backend speaks, and the service that merges
//! backends.

mod artifact;
mod backend;
pub mod constraint;
mod error;
mod merge;
mod model;
mod search;
pub mod version;

pub use self::artifact::{
    download_etag, select, sha256_digest, Artifact, ArtifactBody, ByteRange, DigestMismatch,
    RangeSpec, Served, Span, VerifyingBody,
};
pub use self::backend::{
    BackendFuture, BackendHealth, BackendRequest, BackendResponse, BackendService, HealthReport,
    ListFilter, Registry,
};
pub use self::error::RegistryError;
pub use self::merge::{Merge, HEALTH_PROBE_TIMEOUT};
pub use self::model::{
    Extension, ExtensionInfo, ExtensionKey, ExtensionName, ExtensionType, Instance, InstanceName,
    Source, SourceSelector, Sources, Timestamp, Version, VersionSelector, VersionTag,
};
pub use self::search::search;
