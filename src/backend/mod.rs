//! The backends, each a tower `Service<BackendRequest>`: Gitea/Forgejo releases, OCI
//! registries, GitHub releases and a local directory; and building them from the
//! configuration.

pub mod direct;
pub mod forge;
pub mod gitea;
pub mod github;
pub mod http;
pub mod local;
pub mod oci;

use crate::config::{BackendSection, Config, ConfigError};
use crate::registry::{BackendService, Instance, Source};

/// Builds every configured backend instance, in precedence order (see
/// [`Config::backends`]). Secret files are read here, at start-up.
pub fn from_config(config: &Config) -> Result<Vec<(Instance, BackendService)>, ConfigError> {
    config
        .backends()
        .into_iter()
        .map(|section| {
            let (kind, backend) = match section {
                BackendSection::Gitea(c, _) => {
                    (Source::Gitea, BackendService::new(gitea::Gitea::new(c)?))
                }
                BackendSection::Oci(c, _) => {
                    (Source::Oci, BackendService::new(oci::OciBackend::new(c)?))
                }
                BackendSection::Github(c, _) => {
                    (Source::Github, BackendService::new(github::Github::new(c)?))
                }
                BackendSection::Local(c, _) => {
                    (Source::Local, BackendService::new(local::Local::new(c)?))
                }
            };
            let name = section.name().into();
            Ok((Instance { kind, name }, backend))
        })
        .collect()
}
