//! The whole application through a real socket, over real or simulated backends side by side:
//! the Gitea simulator, the real OCI registry and the local directory.

#[allow(dead_code)]
#[path = "support/app.rs"]
mod app;
#[allow(dead_code)]
#[path = "support/gitea_sim.rs"]
mod gitea_sim;
#[path = "support/registry/mod.rs"]
mod registry;
#[path = "support/running.rs"]
mod running;

use extension_registry::config::Config;
use gitea_sim::{artifact_bytes, sha256_hex, GiteaSim, SimConfig, SimRelease, SimRepo};
use running::Running;
use serde_json::Value;

fn names(list: &Value) -> Vec<String> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            format!(
                "{}/{}@{}",
                e["type"].as_str().unwrap(),
                e["name"].as_str().unwrap(),
                e["source"].as_str().unwrap()
            )
        })
        .collect()
}

#[tokio::test]
async fn serves_gitea_releases_beside_the_local_directory() {
    let sim = GiteaSim::start(
        SimConfig::new("extensions")
            .storage_redirect()
            .repo(
                SimRepo::new("aws_prov")
                    .topic("cloud")
                    .release(
                        SimRelease::new("v2.0.0", 1_735_700_000)
                            .artifact("aws")
                            .sha256_sidecar(true),
                    )
                    .release(
                        SimRelease::new("2.1.0-rc.1", 1_735_800_000)
                            .artifact("aws")
                            .prerelease(),
                    )
                    .release(SimRelease::new("1.0.0", 1_735_600_000).artifact("aws")),
            )
            .repo(
                SimRepo::new("etcd_taskserv")
                    .release(SimRelease::new("3.5.0", 1_735_600_000).artifact("etcd")),
            )
            .repo(SimRepo::new("notes")),
    )
    .await;
    let mut config = app::local_config(&app::samples(), "");
    config.gitea = vec![sim.gitea_config()];
    let service = Running::start(&config).await;

    // List: both backends, in (type, name, source) order.
    let providers = service.json("/api/v1/extensions?type=provider").await;
    assert_eq!(
        names(&providers),
        [
            "provider/aws@gitea",
            "provider/aws@local",
            "provider/local@local",
            "provider/upcloud@local"
        ]
    );
    let only_gitea = service.json("/api/v1/extensions?source=gitea").await;
    assert_eq!(
        names(&only_gitea),
        ["provider/aws@gitea", "taskserv/etcd@gitea"]
    );

    // Get: Gitea comes first in precedence; ?source= picks the local one.
    let aws = service.json("/api/v1/extensions/provider/aws").await;
    assert_eq!(aws["source"], "gitea");
    assert_eq!(aws["version"], "v2.0.0");
    assert_eq!(aws["tags"], serde_json::json!(["cloud"]));
    let expected = format!("sha256:{}", sha256_hex(&artifact_bytes("aws", "v2.0.0")));
    assert_eq!(aws["checksum"], expected);
    let local_aws = service
        .json("/api/v1/extensions/provider/aws?source=local")
        .await;
    assert_eq!(local_aws["source"], "local");

    // Versions, newest first, prerelease included.
    let versions = service
        .json("/api/v1/extensions/provider/aws/versions")
        .await;
    let tags = app::field(&versions, "version");
    assert_eq!(tags, ["2.1.0-rc.1", "v2.0.0", "1.0.0"]);

    // Search spans both backends.
    let hits = service.json("/api/v1/extensions/search?q=etcd").await;
    assert_eq!(names(&hits), ["taskserv/etcd@gitea"]);

    // Download: streamed through the object-storage redirect, verified, byte for byte.
    let response = reqwest::get(service.url("/api/v1/extensions/provider/aws/latest"))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"],
        "application/octet-stream"
    );
    let bytes = response.bytes().await.unwrap();
    assert_eq!(bytes, artifact_bytes("aws", "v2.0.0"));

    // Gitea failing: what was never fetched is a 502 naming the backend, the local
    // extensions still answer.
    sim.set_mode(gitea_sim::Mode::ServerError);
    let response =
        reqwest::get(service.url("/api/v1/extensions/taskserv/etcd/versions?source=gitea"))
            .await
            .unwrap();
    assert_eq!(response.status(), 502);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"], "backend_unavailable");
    assert!(
        error["message"].as_str().unwrap().contains("gitea"),
        "{error}"
    );
    let local = service
        .json("/api/v1/extensions/cluster/web?source=local")
        .await;
    assert_eq!(local["name"], "web");

    service.stop().await;
}

#[tokio::test]
async fn serves_a_real_oci_registry_beside_the_local_directory() {
    let mut registry = registry::Registry::start(registry::Auth::Basic).await;
    let created = (
        "org.opencontainers.image.created",
        "2025-01-10T12:00:00+02:00",
    );
    let describe = (
        "org.opencontainers.image.description",
        "HashiCorp Vault server",
    );
    let author = ("org.opencontainers.image.authors", "security-team");
    let v1 = b"vault 1.15.0 tarball".repeat(100);
    let v2 = b"vault 1.16.1 tarball".repeat(100);
    registry
        .push(
            "provisioning/vault-taskserv",
            "1.15.0",
            &v1,
            &[created, describe, author],
        )
        .await;
    let pushed = registry
        .push(
            "provisioning/vault-taskserv",
            "1.16.1",
            &v2,
            &[created, describe, author],
        )
        .await;
    registry
        .push(
            "provisioning/vault-taskserv",
            "latest",
            &v2,
            &[created, describe],
        )
        .await;
    registry
        .push("provisioning/aws-provider", "0.5.0", b"oci aws", &[])
        .await;
    registry
        .push("elsewhere/skip-provider", "1.0.0", b"not ours", &[])
        .await;

    let toml = format!(
        "[local]\npath = {:?}\n{}",
        app::samples().display().to_string(),
        registry.oci_toml("provisioning", Some(registry::READER))
    );
    let mut config = Config::parse(&toml, "e2e.toml", None).unwrap();
    // Every answer is stale at once and waited for, so each request asks the backends again
    // and what the cache falls back on when the registry is gone shows.
    config.cache.ttl_seconds = 0;
    config.cache.stale_while_revalidate_seconds = 0;
    // The first failure opens the registry's circuit breaker, so health shows it at once
    // rather than at the next background probe.
    config.circuit_breaker.failure_threshold = 1;
    let service = Running::start(&config).await;

    let all = service.json("/api/v1/extensions?type=provider").await;
    assert_eq!(
        names(&all),
        [
            "provider/aws@oci",
            "provider/aws@local",
            "provider/local@local",
            "provider/upcloud@local"
        ]
    );

    // OCI comes before local in precedence.
    let aws = service.json("/api/v1/extensions/provider/aws").await;
    assert_eq!(aws["source"], "oci");

    let vault = service.json("/api/v1/extensions/taskserv/vault").await;
    assert_eq!(vault["version"], "1.16.1");
    assert_eq!(vault["description"], "HashiCorp Vault server");
    assert_eq!(vault["author"], "security-team");
    assert_eq!(vault["published_at"], "2025-01-10T10:00:00Z");
    assert_eq!(vault["checksum"], pushed.layer);
    assert_eq!(vault["size"], v2.len());

    let versions = service
        .json("/api/v1/extensions/taskserv/vault/versions")
        .await;
    let tags = app::field(&versions, "version");
    assert_eq!(tags, ["1.16.1", "1.15.0"], "latest is not a version");

    let hits = service
        .json("/api/v1/extensions/search?q=vault%20server")
        .await;
    assert_eq!(names(&hits), ["taskserv/vault@oci"]);

    let response = reqwest::get(service.url("/api/v1/extensions/taskserv/vault/1.15.0"))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-length"], v1.len().to_string());
    assert_eq!(&response.bytes().await.unwrap()[..], &v1[..]);

    // The registry goes away mid-test: what needs it is a 502 naming it, the rest still answers.
    registry.stop();
    let response = reqwest::get(service.url("/api/v1/extensions/taskserv/vault/1.15.0"))
        .await
        .unwrap();
    assert_eq!(response.status(), 502);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"], "backend_unavailable");
    assert!(
        error["message"].as_str().unwrap().contains("oci"),
        "{error}"
    );
    let local = service.json("/api/v1/extensions/cluster/buildkit").await;
    assert_eq!(local["source"], "local");
    // The listing does not shrink to what the local backend has: the complete one kept from
    // before is served, marked stale.
    let listing = reqwest::get(service.url("/api/v1/extensions?type=provider"))
        .await
        .unwrap();
    assert_eq!(listing.status(), 200);
    let cache_status = listing.headers()["cache-status"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(cache_status.contains("fwd=stale"), "{cache_status}");
    let listing: Value = listing.json().await.unwrap();
    assert_eq!(names(&listing)[0], "provider/aws@oci");
    let health = reqwest::get(service.url("/api/v1/health")).await.unwrap();
    assert_eq!(health.status(), 200);
    let health: Value = health.json().await.unwrap();
    assert_eq!(health["status"], "degraded");
    assert_eq!(
        health["backends"]["oci"],
        serde_json::json!({"enabled": true, "healthy": false, "circuit": "open"})
    );

    service.stop().await;
}
