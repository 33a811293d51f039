//! The OCI backend against the real CNCF distribution registry (Debian `docker-registry`),
//! started by each test on a free loopback port: listing with catalog paging, annotations,
//! indexes, tag rules, downloads verified against the layer digest, basic and bearer-token auth,
//! credentials kept off blob redirects and challenges from where they lead, bounded paging, the
//! static repository list, a corrupted registry disk and a registry that went away.

#[path = "support/logs.rs"]
mod logs;
#[path = "support/registry/mod.rs"]
mod registry;

use std::collections::BTreeMap;

use extension_registry::backend::direct::OWN_CONNECTION_FROM;
use extension_registry::backend::oci::OciBackend;
use extension_registry::registry::{
    Artifact, BackendHealth, BackendRequest, BackendResponse, Extension, ExtensionKey,
    ExtensionName, ExtensionType, ListFilter, RegistryError, Source, VersionSelector,
};
use http_body_util::BodyExt;
use tower::ServiceExt;

use registry::front::{Demand, Front, Storage};
use registry::{Auth, Registry, ADMIN, READER};

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

async fn health(backend: &OciBackend) -> BackendHealth {
    let report = ask(backend, BackendRequest::Health).await.unwrap();
    let mut report = report.into_health().unwrap();
    assert_eq!(report.0.len(), 1);
    report.0.remove(0)
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
        range: None,
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

/// Tags a manifest whose one layer is no `.tar.gz`: not a version.
async fn push_without_artifact(reg: &Registry, repo: &str, tag: &str) {
    let config_digest = reg.upload_blob(repo, b"{}").await;
    let layer_digest = reg.upload_blob(repo, b"not a tarball").await;
    reg.put_manifest(
        repo,
        tag,
        registry::MANIFEST_TYPE,
        &serde_json::json!({
            "schemaVersion": 2,
            "mediaType": registry::MANIFEST_TYPE,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": 2},
            "layers": [{"mediaType": "application/vnd.example.text", "digest": layer_digest, "size": 13}]
        }),
    )
    .await;
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
    let mut aws_annotations = annotations("AWS provider", "2025-03-14T10:26:53+01:00");
    aws_annotations.push((
        "org.opencontainers.image.source",
        "https://git.example.com/aws",
    ));
    let aws_repo = "provisioning/aws-provider";
    let old_annotations = annotations("AWS old", "2025-01-01T00:00:00+02:00");
    reg.push(aws_repo, "1.0.0", &aws_old, &old_annotations)
        .await;
    let aws = reg
        .push(aws_repo, "1.2.0", &aws_new, &aws_annotations)
        .await;
    reg.push(aws_repo, "latest", &aws_new, &aws_annotations)
        .await;
    let digest_tag = format!("sha256-{}", "ab".repeat(32));
    reg.push(aws_repo, &digest_tag, &artifact(4, 10), &[]).await;
    let k8s = reg
        .push("provisioning/k8s-taskserv", "0.9.0", &artifact(5, 100), &[])
        .await;
    // (repository, tag, artifact seed, description, created); no date: no annotations.
    // The edge provider has only tags that are not semver: the newest publication is current.
    // The last two are not extensions.
    let fixtures = [
        (aws_repo, "nightly", 3, "nightly", "2026-01-01T00:00:00Z"),
        (
            "provisioning/buildkit-cluster",
            "0.1.0",
            6,
            "BuildKit 0.1",
            "2025-01-01T00:00:00Z",
        ),
        (
            "provisioning/edge-provider",
            "weekly",
            8,
            "edge",
            "2025-03-01T00:00:00Z",
        ),
        (
            "provisioning/edge-provider",
            "nightly",
            9,
            "edge",
            "2025-02-01T00:00:00Z",
        ),
        ("other/aws-provider", "1.0.0", 10, "", ""),
        ("provisioning/readme", "1.0.0", 11, "", ""),
    ];
    for (repo, tag, seed, description, created) in fixtures {
        let notes = match created {
            "" => Vec::new(),
            _ => annotations(description, created),
        };
        reg.push(repo, tag, &artifact(seed, 10), &notes).await;
    }
    // An index tagged 0.2.0 over the manifest of another artifact.
    let child_annotations = annotations("BuildKit", "2025-02-01T00:00:00Z");
    let child = reg
        .push(
            "provisioning/buildkit-cluster",
            "0.2.0-child",
            &artifact(7, 20),
            &child_annotations,
        )
        .await;
    reg.push_index("provisioning/buildkit-cluster", "0.2.0", &[&child])
        .await;
    // Nothing to serve: a repository holding only a blob, and a manifest without a gzip layer.
    reg.upload_blob("provisioning/blobonly-provider", b"interrupted push")
        .await;
    push_without_artifact(&reg, "provisioning/nolayer-provider", "1.0.0").await;

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

    let health = health(&backend).await;
    assert!(health.healthy, "{health:?}");
}

#[tokio::test]
async fn reads_an_artifact_pushed_by_skopeo() {
    let reg = Registry::start(Auth::Anonymous).await;
    let bytes = artifact(20, 70_000);
    let layer = reg
        .push_with_skopeo(
            "provisioning/kubectl-taskserv",
            "1.4.0",
            &bytes,
            &annotations("kubectl", "2025-05-05T05:05:05Z"),
        )
        .await;
    let backend = OciBackend::new(&reg.oci_config(NS, None)).unwrap();
    let kubectl = key(ExtensionType::Taskserv, "kubectl");
    let found = get(&backend, &kubectl).await.unwrap();
    assert_eq!(found.version, "1.4.0");
    assert_eq!(found.description, "kubectl");
    assert_eq!(found.published_at.to_string(), "2025-05-05T05:05:05Z");
    assert_eq!(found.checksum.as_deref(), Some(layer.as_str()));
    let (downloaded, got) = download_bytes(&backend, &kubectl, "1.4.0").await;
    assert_eq!(got, bytes);
    assert_eq!(
        downloaded.filename, "kubectl-1.4.0.tar.gz",
        "no title: named after the extension"
    );
}

#[tokio::test]
async fn basic_auth_accepts_the_right_credentials_only() {
    let reg = Registry::start(Auth::Basic).await;
    let bytes = artifact(30, 4096);
    reg.push("provisioning/aws-provider", "1.0.0", &bytes, &[])
        .await;
    let aws = key(ExtensionType::Provider, "aws");

    let reader = OciBackend::new(&reg.oci_config(NS, Some(READER))).unwrap();
    assert_eq!(list(&reader, None).await.unwrap().len(), 1);
    assert_eq!(get(&reader, &aws).await.unwrap().version, "1.0.0");
    assert_eq!(download_bytes(&reader, &aws, "latest").await.1, bytes);

    let wrong = OciBackend::new(&reg.oci_config(NS, Some((ADMIN.0, "wrong")))).unwrap();
    let auth_failed = RegistryError::auth_failed(Source::Oci);
    assert_eq!(list(&wrong, None).await.unwrap_err(), auth_failed);
    assert_eq!(get(&wrong, &aws).await.unwrap_err(), auth_failed);
    assert_eq!(
        download(&wrong, &aws, "1.0.0").await.unwrap_err(),
        auth_failed
    );
    let message = auth_failed.to_string();
    assert!(
        !message.contains("wrong") && !message.contains(READER.1),
        "{message}"
    );

    // 401 still means the registry is up.
    let health = health(&wrong).await;
    assert!(health.healthy, "{health:?}");
}

#[tokio::test]
async fn bearer_tokens_are_fetched_per_scope_and_reused() {
    let reg = Registry::start(Auth::Token {
        anonymous_pull: false,
        lifetime: 300,
    })
    .await;
    let aws_bytes = artifact(40, 2048);
    reg.push("provisioning/aws-provider", "1.0.0", &aws_bytes, &[])
        .await;
    reg.push("provisioning/k8s-taskserv", "2.0.0", &artifact(41, 10), &[])
        .await;
    let aws = key(ExtensionType::Provider, "aws");

    let logs = logs::LogCapture::start();
    let reader = OciBackend::new(&reg.oci_config(NS, Some(READER))).unwrap();
    let before = reg.tokens_issued();
    let calls_before = reg.requests().len();
    assert_eq!(list(&reader, None).await.unwrap().len(), 2);
    // One token for the catalog, one per repository.
    assert_eq!(reg.tokens_issued() - before, 3);
    // The anonymous cold list's calls (1 catalog page, 2 tag lists, 2 × HEAD + GET) plus
    // the 401 that starts each scope's token flow (catalog, 2 repositories).
    let cold = reg.requests()[calls_before..].to_vec();
    assert_eq!(cold.len(), 1 + 2 + 2 * 2 + 3, "{cold:#?}");
    assert_eq!(list(&reader, None).await.unwrap().len(), 2);
    assert_eq!(get(&reader, &aws).await.unwrap().version, "1.0.0");
    assert_eq!(download_bytes(&reader, &aws, "1.0.0").await.1, aws_bytes);
    assert_eq!(reg.tokens_issued() - before, 3, "cached tokens are reused");

    let auth_failed = RegistryError::auth_failed(Source::Oci);
    let wrong = OciBackend::new(&reg.oci_config(NS, Some((READER.0, "wrong")))).unwrap();
    assert_eq!(list(&wrong, None).await.unwrap_err(), auth_failed);
    assert_eq!(get(&wrong, &aws).await.unwrap_err(), auth_failed);

    // Anonymous tokens grant nothing here: the retry with the token is refused again.
    let anonymous = OciBackend::new(&reg.oci_config(NS, None)).unwrap();
    assert_eq!(get(&anonymous, &aws).await.unwrap_err(), auth_failed);
    let refused = list(&anonymous, None).await.unwrap_err().to_string();
    assert!(refused.contains("[oci] repositories"), "{refused}");

    use base64::Engine as _;
    let basic =
        base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", READER.0, READER.1));
    logs.assert_free_of(&[READER.1, &basic, "eyJ"]);
}

#[tokio::test]
async fn a_static_token_is_sent_as_is() {
    let reg = Registry::start(Auth::Token {
        anonymous_pull: false,
        lifetime: 300,
    })
    .await;
    let bytes = artifact(45, 100);
    reg.push("provisioning/aws-provider", "1.0.0", &bytes, &[])
        .await;
    let aws = key(ExtensionType::Provider, "aws");
    let token = reg.token_for(
        READER.0,
        &[
            "registry:catalog:*",
            "repository:provisioning/aws-provider:pull",
        ],
    );
    let mut config = reg.oci_config(NS, None);
    config.auth_token_path = Some(reg.secret_file("static.token", &token));
    let logs = logs::LogCapture::start();
    let backend = OciBackend::new(&config).unwrap();
    let before = reg.tokens_issued();
    assert_eq!(list(&backend, None).await.unwrap().len(), 1);
    assert_eq!(download_bytes(&backend, &aws, "latest").await.1, bytes);
    assert_eq!(
        reg.tokens_issued(),
        before,
        "no token exchange with a static token"
    );

    config.auth_token_path = Some(reg.secret_file("bogus.token", "not.a.token"));
    let bogus = OciBackend::new(&config).unwrap();
    let auth_failed = RegistryError::auth_failed(Source::Oci);
    assert_eq!(get(&bogus, &aws).await.unwrap_err(), auth_failed);
    let signature = token.rsplit('.').next().unwrap();
    logs.assert_free_of(&[&token, signature, "not.a.token"]);
}

#[tokio::test]
async fn a_hung_registry_times_out() {
    let reg = Registry::start(Auth::Anonymous).await;
    reg.push("provisioning/aws-provider", "1.0.0", &artifact(80, 10), &[])
        .await;
    let mut config = reg.oci_config(NS, None);
    config.timeout_seconds = 1;
    let backend = OciBackend::new(&config).unwrap();
    reg.freeze();
    let timeout = RegistryError::timeout(Source::Oci);
    assert_eq!(
        get(&backend, &key(ExtensionType::Provider, "aws"))
            .await
            .unwrap_err(),
        timeout
    );
    let health = health(&backend).await;
    assert!(!health.healthy, "{health:?}");
}

#[tokio::test]
async fn an_extension_whose_newest_tags_cannot_be_read_is_at_its_newest_readable_version() {
    let reg = Registry::start(Auth::Anonymous).await;
    let repo = "provisioning/halfway-provider";
    reg.push(repo, "1.0.0", &artifact(70, 10), &[]).await;
    push_without_artifact(&reg, repo, "2.0.0").await;
    // 3.0.0 is listed, but its manifest is unknown, as while a push settles.
    reg.push(repo, "3.0.0", &artifact(71, 10), &[]).await;
    let link = reg
        .dir()
        .join("data/docker/registry/v2/repositories")
        .join(repo)
        .join("_manifests/tags/3.0.0/current/link");
    std::fs::remove_file(&link).unwrap();

    let backend = OciBackend::new(&reg.oci_config(NS, None)).unwrap();
    let halfway = key(ExtensionType::Provider, "halfway");
    assert_eq!(get(&backend, &halfway).await.unwrap().version, "1.0.0");
    assert_eq!(versions(&backend, &halfway).await.unwrap(), ["1.0.0"]);
}

#[tokio::test]
async fn a_refused_catalog_falls_back_to_the_configured_repositories() {
    let reg = Registry::start(Auth::Token {
        anonymous_pull: true,
        lifetime: 300,
    })
    .await;
    reg.push("provisioning/aws-provider", "1.0.0", &artifact(50, 10), &[])
        .await;
    reg.push("provisioning/k8s-taskserv", "2.0.0", &artifact(51, 10), &[])
        .await;
    reg.push(
        "provisioning/hidden-cluster",
        "1.0.0",
        &artifact(52, 10),
        &[],
    )
    .await;

    let mut config = reg.oci_config(NS, None);
    let without = OciBackend::new(&config).unwrap();
    let refused = list(&without, None).await.unwrap_err();
    assert!(
        matches!(&refused, RegistryError::BackendUnavailable { reason, .. } if reason.contains("[oci] repositories")),
        "{refused}"
    );
    // Lookups of one extension need no catalog.
    assert_eq!(
        get(&without, &key(ExtensionType::Cluster, "hidden"))
            .await
            .unwrap()
            .version,
        "1.0.0"
    );

    config.repositories = Some(vec![
        "aws-provider".into(),
        "provisioning/k8s-taskserv".into(),
        "provisioning/missing-provider".into(),
    ]);
    let with = OciBackend::new(&config).unwrap();
    let listed = list(&with, None).await.unwrap();
    assert_eq!(
        listed.keys().collect::<Vec<_>>(),
        ["provider/aws", "taskserv/k8s"]
    );
}

#[tokio::test]
async fn corrupted_registry_storage_never_yields_a_complete_looking_file() {
    let reg = Registry::start(Auth::Anonymous).await;
    let bytes = artifact(60, 1024 * 1024);
    let aws = reg
        .push("provisioning/aws-provider", "1.0.0", &bytes, &[])
        .await;
    let large = artifact(63, LARGE);
    let big = reg
        .push("provisioning/big-provider", "1.0.0", &large, &[])
        .await;
    let k8s = reg
        .push("provisioning/k8s-taskserv", "1.0.0", &artifact(61, 10), &[])
        .await;
    reg.push("provisioning/ok-cluster", "1.0.0", &artifact(62, 10), &[])
        .await;

    // Same size, one byte changed: only the digest can tell.
    for layer in [&aws.layer, &big.layer] {
        let blob = reg.blob_path(layer);
        let mut on_disk = std::fs::read(&blob).unwrap();
        on_disk[512 * 1024] ^= 0xff;
        std::fs::write(&blob, on_disk).unwrap();
    }
    // A manifest whose bytes no longer parse.
    std::fs::write(reg.blob_path(&k8s.manifest), b"{not json").unwrap();

    let backend = OciBackend::new(&reg.oci_config(NS, None)).unwrap();
    let listed = list(&backend, None).await.unwrap();
    assert!(
        listed.contains_key("cluster/ok") && listed.contains_key("provider/aws"),
        "{listed:?}"
    );
    assert!(
        !listed.contains_key("taskserv/k8s"),
        "a broken repository is left out"
    );
    let k8s_error = get(&backend, &key(ExtensionType::Taskserv, "k8s"))
        .await
        .unwrap_err();
    assert!(
        matches!(&k8s_error, RegistryError::BackendUnavailable { reason, .. } if reason.contains("500")),
        "{k8s_error:?}"
    );

    for (name, len) in [("aws", bytes.len()), ("big", large.len())] {
        let artifact = download(&backend, &key(ExtensionType::Provider, name), "1.0.0")
            .await
            .unwrap();
        assert_withheld(artifact, len).await;
    }
}

/// Reads `artifact` (of `len` bytes) until it fails: short of its last bytes, on a mismatch.
async fn assert_withheld(artifact: Artifact, len: usize) {
    assert_eq!(artifact.content_length, Some(len as u64));
    let mut body = artifact.body;
    let mut received = 0;
    let error = loop {
        match body.frame().await {
            Some(Ok(frame)) => received += frame.into_data().map(|d| d.len()).unwrap_or(0),
            Some(Err(e)) => break e,
            None => panic!("a corrupted artifact was delivered complete ({received} bytes)"),
        }
    };
    assert!(received < len, "the last bytes are withheld");
    assert!(error.to_string().contains("sha256 mismatch"), "{error}");
}

#[tokio::test]
async fn a_stopped_registry_is_reported_unavailable() {
    let mut reg = Registry::start(Auth::Anonymous).await;
    reg.push("provisioning/aws-provider", "1.0.0", &artifact(70, 10), &[])
        .await;
    let backend = OciBackend::new(&reg.oci_config(NS, None)).unwrap();
    let aws = key(ExtensionType::Provider, "aws");
    assert_eq!(get(&backend, &aws).await.unwrap().version, "1.0.0");

    reg.stop();
    let unavailable = |e: RegistryError| {
        matches!(
            e,
            RegistryError::BackendUnavailable {
                backend: Source::Oci,
                ..
            }
        )
    };
    assert!(unavailable(list(&backend, None).await.unwrap_err()));
    assert!(unavailable(get(&backend, &aws).await.unwrap_err()));
    assert!(unavailable(versions(&backend, &aws).await.unwrap_err()));
    assert!(unavailable(
        download(&backend, &aws, "1.0.0").await.unwrap_err()
    ));
    let health = health(&backend).await;
    assert!(!health.healthy);
    assert!(
        health
            .detail
            .as_deref()
            .is_some_and(|d| d.contains("cannot connect")),
        "{health:?}"
    );
}

#[tokio::test]
async fn a_name_a_ghcr_style_registry_refuses_is_not_found_when_absent_from_the_list() {
    let reg = Registry::start(Auth::Token {
        anonymous_pull: true,
        lifetime: 300,
    })
    .await;
    reg.push("provisioning/aws-provider", "1.0.0", &artifact(90, 10), &[])
        .await;
    reg.grant_existing_repositories_only();
    let aws = key(ExtensionType::Provider, "aws");
    let missing = key(ExtensionType::Provider, "nosuch");
    let not_found = |e: RegistryError| e.is_not_found();
    let auth_failed = RegistryError::auth_failed(Source::Oci);

    // With the catalog: valid credentials, yet the registry answers 401 for the missing name.
    let reader = OciBackend::new(&reg.oci_config(NS, Some(READER))).unwrap();
    assert_eq!(get(&reader, &aws).await.unwrap().version, "1.0.0");
    assert!(not_found(get(&reader, &missing).await.unwrap_err()));
    assert!(not_found(versions(&reader, &missing).await.unwrap_err()));
    assert!(not_found(
        download(&reader, &missing, "latest").await.unwrap_err()
    ));
    assert!(not_found(
        download(&reader, &missing, "1.0.0").await.unwrap_err()
    ));
    // Wrong credentials are still wrong credentials.
    let wrong = OciBackend::new(&reg.oci_config(NS, Some((READER.0, "wrong")))).unwrap();
    assert_eq!(get(&wrong, &missing).await.unwrap_err(), auth_failed);

    // Anonymous: no catalog, so the configured list decides; a listed name that is refused
    // stays a refusal, and without a list nothing can tell absence from refusal.
    let mut config = reg.oci_config(NS, None);
    config.repositories = Some(vec!["aws-provider".into(), "listed-provider".into()]);
    let anonymous = OciBackend::new(&config).unwrap();
    assert_eq!(get(&anonymous, &aws).await.unwrap().version, "1.0.0");
    assert!(not_found(get(&anonymous, &missing).await.unwrap_err()));
    assert_eq!(
        get(&anonymous, &key(ExtensionType::Provider, "listed"))
            .await
            .unwrap_err(),
        auth_failed
    );
    let unlisted = OciBackend::new(&reg.oci_config(NS, None)).unwrap();
    assert_eq!(get(&unlisted, &missing).await.unwrap_err(), auth_failed);
}

#[tokio::test]
async fn a_registry_error_body_stays_in_the_log_and_out_of_the_clients_answer() {
    let reg = Registry::start(Auth::Anonymous).await;
    reg.push("provisioning/k8s-taskserv", "1.0.0", &artifact(95, 10), &[])
        .await;
    // The repository's tag directory replaced by a file: the registry cannot list the tags.
    let tags = reg
        .dir()
        .join("data/docker/registry/v2/repositories/provisioning/k8s-taskserv/_manifests/tags");
    std::fs::remove_dir_all(&tags).unwrap();
    std::fs::write(&tags, b"").unwrap();
    // What the registry says about it, asked directly.
    let raw = reqwest::Client::new()
        .get(format!(
            "{}/v2/provisioning/k8s-taskserv/tags/list",
            reg.url()
        ))
        .send()
        .await
        .unwrap();
    assert!(raw.status().is_server_error(), "{}", raw.status());
    let raw: serde_json::Value = raw.json().await.unwrap();
    let upstream = raw["errors"][0]["message"].as_str().unwrap().to_owned();
    assert!(!upstream.is_empty(), "{raw}");

    let logs = logs::LogCapture::start();
    let failure =
        logs::backend_failure(&reg.oci_toml(NS, None), "/api/v1/extensions/taskserv/k8s").await;
    let message = &failure.message;
    assert!(message.starts_with("oci backend unavailable"), "{message}");
    assert!(
        !failure.body.contains(&upstream),
        "{message} holds {upstream}"
    );
    assert!(
        !failure.body.contains(reg.dir().to_str().unwrap()),
        "{message}"
    );
    logs.assert_line_with(&[&upstream, &failure.request_id]);
}

/// A registry with basic auth behind a [`Front`] whose storage answers its blob redirects, one
/// artifact pushed, and a backend (reader credentials) that talks to the front.
async fn behind_a_front(bytes: &[u8]) -> (Front, Registry, OciBackend) {
    let front = Front::start().await;
    let reg = Registry::start_behind(&front, Auth::Basic).await;
    reg.push("provisioning/aws-provider", "1.0.0", bytes, &[])
        .await;
    let config = extension_registry::config::OciConfig {
        registry: front.host(),
        ..reg.oci_config(NS, Some(READER))
    };
    (front, reg, OciBackend::new(&config).unwrap())
}

/// A blob large enough to be downloaded on its own connection.
const LARGE: usize = OWN_CONNECTION_FROM as usize + 12_345;

#[tokio::test]
async fn a_blob_redirect_within_the_registry_host_gets_no_credentials() {
    for bytes in [artifact(50, 6000), artifact(52, LARGE)] {
        blob_redirect_gets_no_credentials(&bytes).await;
    }
}

async fn blob_redirect_gets_no_credentials(bytes: &[u8]) {
    let (front, _reg, backend) = behind_a_front(bytes).await;
    let aws = key(ExtensionType::Provider, "aws");

    let (_, downloaded) = download_bytes(&backend, &aws, "1.0.0").await;
    assert!(downloaded == bytes, "{} bytes downloaded", downloaded.len());
    let seen = front.seen();
    let blob = registry::sha256(bytes);
    let asked: Vec<_> = seen
        .iter()
        .filter(|s| s.target.ends_with(&format!("/blobs/{blob}")))
        .collect();
    assert!(
        asked.last().is_some_and(|s| s.authorization),
        "the registry's own blob URL gets the credentials: {seen:?}"
    );
    let stored: Vec<_> = seen
        .iter()
        .filter(|s| s.target.starts_with("/docker/registry/v2/blobs/"))
        .collect();
    assert_eq!(stored.len(), 1, "{seen:?}");
    // Same host and port as the registry, another path: reqwest's own following would have
    // kept the header.
    assert!(!stored[0].authorization, "{seen:?}");
    assert!(seen
        .iter()
        .filter(|s| s.authorization)
        .all(|s| s.target.starts_with("/v2/provisioning/aws-provider/")
            || s.target.starts_with("/v2/_catalog")));
}

#[tokio::test]
async fn blob_redirects_are_followed_up_to_five_hops_and_a_loop_is_a_backend_failure() {
    for bytes in [artifact(51, 3000), artifact(53, LARGE)] {
        blob_redirects_are_bounded(&bytes).await;
    }
}

async fn blob_redirects_are_bounded(bytes: &[u8]) {
    let (front, _reg, backend) = behind_a_front(bytes).await;
    let aws = key(ExtensionType::Provider, "aws");

    // The registry's 307 and four more: five redirects.
    front.set_storage(Storage::Chain(4));
    assert!(download_bytes(&backend, &aws, "1.0.0").await.1 == bytes);
    assert!(front
        .seen()
        .iter()
        .filter(|s| s.target.starts_with("/hop/"))
        .all(|s| !s.authorization));

    front.set_storage(Storage::Chain(5));
    let err = download(&backend, &aws, "1.0.0").await.unwrap_err();
    assert_eq!(
        err,
        RegistryError::unavailable(Source::Oci, "more than 5 redirects")
    );

    front.set_storage(Storage::Loop);
    let err = download(&backend, &aws, "1.0.0").await.unwrap_err();
    assert_eq!(
        err,
        RegistryError::unavailable(Source::Oci, "redirect loop")
    );
    assert!(err.to_string().starts_with("oci backend"), "{err}");
}

/// What a blob download whose redirect ends at storage answering `401` fails with.
fn storage_refused() -> RegistryError {
    RegistryError::unavailable(
        Source::Oci,
        "blob redirect target answered 401 Unauthorized",
    )
}

#[tokio::test]
async fn a_bearer_challenge_from_storage_gets_no_credentials_and_no_token_is_kept() {
    for storage in [Storage::Foreign, Storage::Beside] {
        for bytes in [artifact(54, 5000), artifact(55, LARGE)] {
            a_bearer_challenge_from_storage_is_a_backend_failure(&bytes, storage(Demand::Bearer))
                .await;
        }
    }
}

async fn a_bearer_challenge_from_storage_is_a_backend_failure(bytes: &[u8], storage: Storage) {
    let (front, _reg, backend) = behind_a_front(bytes).await;
    let aws = key(ExtensionType::Provider, "aws");

    // Storage on another host, or on the registry's origin outside its API, names a realm on
    // the registry's own origin: its challenge is not the registry's, so neither the basic
    // credentials nor a token exchange follow it.
    front.set_storage(storage);
    let err = download(&backend, &aws, "1.0.0").await.unwrap_err();
    assert_eq!(err, storage_refused());
    let seen = front.seen();
    assert!(
        seen.iter()
            .all(|s| s.target != "/token" && !s.target.starts_with("/token?")),
        "{seen:?}"
    );
    assert!(
        seen.iter()
            .filter(|s| s.target.starts_with("/foreign/"))
            .all(|s| !s.authorization),
        "{seen:?}"
    );

    front.set_storage(Storage::Serve);
    assert!(download_bytes(&backend, &aws, "1.0.0").await.1 == bytes);
}

#[tokio::test]
async fn a_basic_challenge_from_storage_leaves_a_token_registry_on_tokens() {
    for storage in [Storage::Foreign, Storage::Beside] {
        for bytes in [artifact(56, 5000), artifact(57, LARGE)] {
            a_basic_challenge_from_storage_changes_nothing(&bytes, storage(Demand::Basic)).await;
        }
    }
}

async fn a_basic_challenge_from_storage_changes_nothing(bytes: &[u8], storage: Storage) {
    let front = Front::start().await;
    let reg = Registry::start_behind(
        &front,
        Auth::Token {
            anonymous_pull: false,
            lifetime: 300,
        },
    )
    .await;
    reg.push("provisioning/aws-provider", "1.0.0", bytes, &[])
        .await;
    let config = extension_registry::config::OciConfig {
        registry: front.host(),
        ..reg.oci_config(NS, Some(READER))
    };
    let backend = OciBackend::new(&config).unwrap();
    let aws = key(ExtensionType::Provider, "aws");

    front.set_storage(storage);
    let err = download(&backend, &aws, "1.0.0").await.unwrap_err();
    assert_eq!(err, storage_refused());

    // The registry still gets its tokens, not the basic credentials storage asked for.
    front.set_storage(Storage::Serve);
    assert!(download_bytes(&backend, &aws, "1.0.0").await.1 == bytes);
    assert_eq!(list(&backend, None).await.unwrap().len(), 1);
}

/// The catalog pages the front was asked for so far.
fn catalog_calls(front: &Front) -> usize {
    front
        .seen()
        .iter()
        .filter(|s| s.target.starts_with("/v2/_catalog"))
        .count()
}

#[tokio::test]
async fn a_catalog_of_more_than_100_pages_is_refused() {
    let (front, _reg, backend) = behind_a_front(&artifact(58, 100)).await;

    front.page_catalog(100);
    assert!(list(&backend, None).await.unwrap().is_empty());
    let before = catalog_calls(&front);
    front.page_catalog(101);
    let err = list(&backend, None).await.unwrap_err();
    assert_eq!(
        err,
        RegistryError::unavailable(Source::Oci, "catalog has more than 100 pages")
    );
    assert_eq!(catalog_calls(&front) - before, 100);
}

/// Pages each well under the 16 MiB cap still stop once one list has read 32 MiB of them.
#[tokio::test]
async fn the_pages_of_one_catalog_are_read_up_to_32_mib_in_all() {
    let (front, _reg, backend) = behind_a_front(&artifact(59, 100)).await;
    // Five pages of 10 MiB: the fourth passes the budget.
    front.page_catalog_padded(5, 10 * 1024 * 1024);
    let err = list(&backend, None).await.unwrap_err();
    assert_eq!(
        err,
        RegistryError::unavailable(
            Source::Oci,
            "catalog pages larger than 33554432 bytes in all"
        )
    );
    assert_eq!(catalog_calls(&front), 4);
}
