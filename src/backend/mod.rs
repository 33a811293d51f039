//! The backends, each a tower `Service<BackendRequest>`: Gitea/Forgejo releases, OCI
//! registries, GitHub releases and a local directory; and building them from the
//! configuration.

pub mod forge;
pub mod gitea;
pub mod github;
pub mod http;
pub mod local;
pub mod oci;

use crate::config::{Config, ConfigError};
use crate::registry::{BackendService, Source};

/// Builds every configured backend, in precedence order (Gitea, OCI, GitHub, local). Secret files
/// are read here, at start-up.
pub fn from_config(config: &Config) -> Result<Vec<(Source, BackendService)>, ConfigError> {
    let mut backends = Vec::new();
    if let Some(gitea) = &config.gitea {
        backends.push((
            Source::Gitea,
            BackendService::new(gitea::Gitea::new(gitea)?),
        ));
    }
    if let Some(oci) = &config.oci {
        backends.push((Source::Oci, BackendService::new(oci::OciBackend::new(oci)?)));
    }
    if let Some(github) = &config.github {
        backends.push((
            Source::Github,
            BackendService::new(github::Github::new(github)?),
        ));
    }
    if let Some(local) = &config.local {
        backends.push((
            Source::Local,
            BackendService::new(local::Local::new(local)?),
        ));
    }
    Ok(backends)
}
