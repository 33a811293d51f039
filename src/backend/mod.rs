//! The backends, each a tower `Service<BackendRequest>`: Gitea/Forgejo releases, OCI
//! registries and a local directory; and building them from the configuration.

pub mod gitea;
pub mod http;
pub mod local;
pub mod oci;

use crate::config::{Config, ConfigError};
use crate::registry::{BackendService, Source};

/// Builds every configured backend, in precedence order (Gitea, OCI, local). Secret files
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
    if let Some(local) = &config.local {
        backends.push((
            Source::Local,
            BackendService::new(local::Local::new(local)?),
        ));
    }
    Ok(backends)
}
