//! The backends, each a tower `Service<BackendRequest>`: Gitea/Forgejo releases, OCI
//! registries and a local directory.

pub mod http;
pub mod oci;
