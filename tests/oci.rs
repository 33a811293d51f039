//! The OCI backend against the real CNCF distribution registry (Debian `docker-registry`),
//! started by each test on a free loopback port: listing with catalog paging, annotations,
//! indexes, tag rules, downloads verified against the layer digest, basic and bearer-token auth,
//! the static repository list, a corrupted registry disk and a registry that went away.

#[path = "support/registry/mod.rs"]
mod registry;

use std::collections::BTreeMap;

use extension_registry::backend::oci::OciBackend;
use extension_registry::registry::{
    Artifact, BackendRequest, BackendResponse, Extension, ExtensionKey, ExtensionName,
    ExtensionType, ListFilter, RegistryError, Source, VersionSelector,
};
use http_body_util::BodyExt;
use tower::ServiceExt;

use registry::{Auth, Registry};

const NS: &str = "provisioning";

async fn ask(
    backend: &OciBackend,
    request: BackendRequest,
) -> Result<BackendResponse, RegistryError> {
    backend.clone().oneshot(request).await
}

fn key(ty: ExtensionType, name: &str) -> ExtensionKey {
    ExtensionKey {
        ty,
        name: ExtensionName::parse(name).unwrap(),
    }
}

async fn list(
    backend: &OciBackend,
    ty: Option<ExtensionType>,
) -> Result<BTreeMap<String, Extension>, RegistryError> {
    let filter = ListFilter { ty, source: None };
    let listed = ask(backend, BackendRequest::List(filter))
        .await?
        .into_list()?;
    Ok(listed
        .iter()
        .map(|e| (format!("{}/{}", e.ty, e.name), e.clone()))
        .collect())
}

async fn get(backend: &OciBackend, key: &ExtensionKey) -> Result<Extension, RegistryError> {
    let request = BackendRequest::Get {
        key: key.clone(),
        source: None,
    };
    Ok((*ask(backend, request).await?.into_extension()?).clone())
}

async fn versions(backend: &OciBackend, key: &ExtensionKey) -> Result<Vec<String>, RegistryError> {
    let request = BackendRequest::Versions {
        key: key.clone(),
        source: None,
    };
    let versions = ask(backend, request).await?.into_versions()?;
    Ok(versions.iter().map(|v| v.version.clone()).collect())
}

async fn download(
    backend: &OciBackend,
    key: &ExtensionKey,
    version: &str,
) -> Result<Artifact, RegistryError> {
    let request = BackendRequest::Download {
        key: key.clone(),
        version: VersionSelector::parse(version).unwrap(),
        source: None,
    };
    ask(backend, request).await?.into_artifact()
}

async fn download_bytes(
    backend: &OciBackend,
    key: &ExtensionKey,
    version: &str,
) -> (Artifact, Vec<u8>) {
    let mut artifact = download(backend, key, version).await.unwrap();
    let body = std::mem::replace(
        &mut artifact.body,
        extension_registry::backend::http::full_body(Default::default()),
    );
    let bytes = body.collect().await.unwrap().to_bytes().to_vec();
    (artifact, bytes)
}

/// Deterministic bytes standing in for a `.tar.gz`.
fn artifact(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn annotations<'a>(description: &'a str, created: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("org.opencontainers.image.description", description),
        ("org.opencontainers.image.authors", "provisioning team"),
        ("org.opencontainers.image.created", created),
    ]
}

#[tokio::test]
async fn lists_gets_versions_and_downloads_from_an_anonymous_registry() {
    let reg = Registry::start(Auth::Anonymous).await;
    let aws_old = artifact(1, 3000);
    let aws_new = artifact(2, 5000);
    reg.push(
        "provisioning/aws-provider",
        "1.0.0",
        &aws_old,
        &annotations("AWS old", "2025-01-01T00:00:00+02:00"),
    )
    .await;
    let mut aws_annotations = annotations("AWS provider", "2025-03-14T10:26:53+01:00");
    aws_annotations.push((
        "org.opencontainers.image.source",
        "https://git.example.com/aws",
    ));
    let aws = reg
        .push(
            "provisioning/aws-provider",
            "1.2.0",
            &aws_new,
            &aws_annotations,
        )
        .await;
    reg.push(
        "provisioning/aws-provider",
        "latest",
        &aws_new,
        &aws_annotations,
    )
    .await;
    reg.push(
        "provisioning/aws-provider",
        "nightly",
        &artifact(3, 10),
        &annotations("nightly", "2026-01-01T00:00:00Z"),
    )
    .await;
    let digest_tag = format!("sha256-{}", "ab".repeat(32));
    reg.push(
        "provisioning/aws-provider",
        &digest_tag,
        &artifact(4, 10),
        &[],
    )
    .await;
    let k8s = reg
        .push("provisioning/k8s-taskserv", "0.9.0", &artifact(5, 100), &[])
        .await;
    // An index tagged 0.2.0 over the manifest of another artifact.
    reg.push(
        "provisioning/buildkit-cluster",
        "0.1.0",
        &artifact(6, 10),
        &annotations("BuildKit 0.1", "2025-01-01T00:00:00Z"),
    )
    .await;
    let child = reg
        .push(
            "provisioning/buildkit-cluster",
            "0.2.0-child",
            &artifact(7, 20),
            &annotations("BuildKit", "2025-02-01T00:00:00Z"),
        )
        .await;
    reg.push_index("provisioning/buildkit-cluster", "0.2.0", &[&child])
        .await;
    // Only tags that are not semver: the newest publication is current.
    reg.push(
        "provisioning/edge-provider",
        "weekly",
        &artifact(8, 10),
        &annotations("edge", "2025-03-01T00:00:00Z"),
    )
    .await;
    reg.push(
        "provisioning/edge-provider",
        "nightly",
        &artifact(9, 10),
        &annotations("edge", "2025-02-01T00:00:00Z"),
    )
    .await;
    // Not extensions, or nothing to serve.
    reg.push("other/aws-provider", "1.0.0", &artifact(10, 10), &[])
        .await;
    reg.push("provisioning/readme", "1.0.0", &artifact(11, 10), &[])
        .await;
    reg.upload_blob("provisioning/blobonly-provider", b"interrupted push")
        .await;
    let config_digest = reg
        .upload_blob("provisioning/nolayer-provider", b"{}")
        .await;
    let layer_digest = reg
        .upload_blob("provisioning/nolayer-provider", b"not a tarball")
        .await;
    reg.put_manifest(
        "provisioning/nolayer-provider",
        "1.0.0",
        registry::MANIFEST_TYPE,
        &serde_json::json!({
            "schemaVersion": 2,
            "mediaType": registry::MANIFEST_TYPE,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": 2},
            "layers": [{"mediaType": "application/vnd.example.text", "digest": layer_digest, "size": 13}]
        }),
    )
    .await;

    // Pages of two repositories exercise the catalog's relative `Link`.
    let backend = OciBackend::with_catalog_page(&reg.oci_config(NS, None), 2).unwrap();
    let before = reg.requests().len();
    let listed = list(&backend, None).await.unwrap();
    let cold: Vec<String> = reg.requests()[before..].to_vec();
    assert_eq!(
        listed.keys().collect::<Vec<_>>(),
        [
            "cluster/buildkit",
            "provider/aws",
            "provider/edge",
            "taskserv/k8s"
        ]
    );

    // 8 repositories in the catalog, 2 per page: 4 pages. Then per repository named like an
    // extension (6): one tag list, and HEAD + GET for each tag that can be current (one
    // each here, the edge provider's two non-semver tags both), + GET of an index's child.
    let catalog_calls = cold.iter().filter(|r| r.contains("/v2/_catalog")).count();
    let tag_calls = cold.iter().filter(|r| r.contains("/tags/list")).count();
    let heads = cold
        .iter()
        .filter(|r| r.starts_with("HEAD ") && r.contains("/manifests/"))
        .count();
    let gets = cold
        .iter()
        .filter(|r| r.starts_with("GET ") && r.contains("/manifests/"))
        .count();
    assert_eq!((catalog_calls, tag_calls), (4, 6), "{cold:#?}");
    // aws 1, k8s 1, buildkit 1 (+1 child), edge 2, nolayer 1, blobonly 0.
    assert_eq!((heads, gets), (6, 7), "{cold:#?}");
    assert_eq!(cold.len(), 4 + 6 + 6 + 7, "{cold:#?}");

    // Warm: manifests are known by digest, a HEAD per candidate tag suffices.
    let before = reg.requests().len();
    assert_eq!(list(&backend, None).await.unwrap(), listed);
    let warm = reg.requests()[before..].to_vec();
    assert_eq!(warm.len(), 4 + 6 + 6, "{warm:#?}");

    let aws_ext = &listed["provider/aws"];
    assert_eq!(aws_ext.version, "1.2.0");
    assert_eq!(aws_ext.source, Source::Oci);
    assert_eq!(aws_ext.description, "AWS provider");
    assert_eq!(aws_ext.author, "provisioning team");
    assert_eq!(aws_ext.repository, "https://git.example.com/aws");
    assert_eq!(aws_ext.published_at.to_string(), "2025-03-14T09:26:53Z");
    assert_eq!(aws_ext.size, aws_new.len() as u64);
    assert_eq!(aws_ext.checksum.as_deref(), Some(aws.layer.as_str()));
    assert_eq!(
        aws_ext.download_url,
        format!(
            "{}/v2/provisioning/aws-provider/blobs/{}",
            reg.url(),
            aws.layer
        )
    );

    let k8s_ext = &listed["taskserv/k8s"];
    assert_eq!(
        (k8s_ext.description.as_str(), k8s_ext.author.as_str()),
        ("", "")
    );
    assert_eq!(
        k8s_ext.repository,
        format!("{}/provisioning/k8s-taskserv", reg.host())
    );
    assert_eq!(k8s_ext.published_at.to_string(), "1970-01-01T00:00:00Z");
    assert_eq!(k8s_ext.checksum.as_deref(), Some(k8s.layer.as_str()));

    let buildkit = &listed["cluster/buildkit"];
    assert_eq!(
        (buildkit.version.as_str(), buildkit.description.as_str()),
        ("0.2.0", "BuildKit")
    );
    assert_eq!(buildkit.checksum.as_deref(), Some(child.layer.as_str()));
    assert_eq!(listed["provider/edge"].version, "weekly");

    let taskservs = list(&backend, Some(ExtensionType::Taskserv)).await.unwrap();
    assert_eq!(taskservs.keys().collect::<Vec<_>>(), ["taskserv/k8s"]);

    let aws_key = key(ExtensionType::Provider, "aws");
    assert_eq!(&get(&backend, &aws_key).await.unwrap(), aws_ext);
    assert_eq!(
        versions(&backend, &aws_key).await.unwrap(),
        ["1.2.0", "1.0.0", "nightly"],
        "latest and digest-like tags are not versions"
    );
    assert_eq!(
        versions(&backend, &key(ExtensionType::Cluster, "buildkit"))
            .await
            .unwrap(),
        ["0.2.0", "0.2.0-child", "0.1.0"]
    );
    assert_eq!(
        versions(&backend, &key(ExtensionType::Provider, "edge"))
            .await
            .unwrap(),
        ["weekly", "nightly"]
    );

    let missing = key(ExtensionType::Provider, "nope");
    assert_eq!(
        get(&backend, &missing).await.unwrap_err().to_string(),
        "Extension provider/nope not found"
    );
    for outcome in [
        get(&backend, &missing).await.err(),
        versions(&backend, &missing).await.err(),
        download(&backend, &missing, "latest").await.err(),
        download(&backend, &aws_key, "9.9.9").await.err(),
        get(&backend, &key(ExtensionType::Provider, "nolayer"))
            .await
            .err(),
        get(&backend, &key(ExtensionType::Provider, "blobonly"))
            .await
            .err(),
    ] {
        assert!(
            matches!(outcome, Some(RegistryError::NotFound(_))),
            "{outcome:?}"
        );
    }

    let (latest, bytes) = download_bytes(&backend, &aws_key, "latest").await;
    assert_eq!(bytes, aws_new);
    assert_eq!(latest.filename, "aws-provider-1.2.0.tar.gz");
    assert_eq!(latest.content_length, Some(aws_new.len() as u64));
    let (old, bytes) = download_bytes(&backend, &aws_key, "1.0.0").await;
    assert_eq!(bytes, aws_old);
    assert_eq!(old.filename, "aws-provider-1.0.0.tar.gz");

    let health = ask(&backend, BackendRequest::Health)
        .await
        .unwrap()
        .into_health()
        .unwrap();
    assert!(health.0[0].healthy, "{health:?}");
}
