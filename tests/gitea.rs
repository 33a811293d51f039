//! The Gitea backend against the Gitea simulator: pagination, visibility, tokens, version
//! choice, checksums, downloads through object storage, failure modes, and the simulator's
//! own fidelity to Gitea's schema and paging.

#[allow(dead_code)]
#[path = "support/app.rs"]
mod app;
#[allow(dead_code)]
#[path = "support/gitea_sim.rs"]
mod gitea_sim;
#[path = "support/logs.rs"]
mod logs;
#[allow(dead_code)]
#[path = "support/swagger.rs"]
mod swagger;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use extension_registry::backend::gitea::Gitea;
use extension_registry::config::{Config, GiteaConfig};
use extension_registry::registry::{
    Artifact, BackendHealth, BackendRequest, BackendResponse, Extension, ExtensionKey,
    ExtensionName, ExtensionType, ListFilter, RegistryError, Source, Version, VersionSelector,
    VersionTag,
};
use extension_registry::BoxError;
use gitea_sim::{
    artifact_bytes, seeded_extensions, seeded_org, sha256_hex, token_file, GiteaSim, Hop, Mode,
    Seen, SimConfig, SimRelease, SimRepo,
};
use http_body_util::BodyExt;
use tower::ServiceExt;

const ORG: &str = "extensions";
const TOKEN: &str = "0123456789abcdef-pat";
/// 2025-01-01T00:00:00Z.
const T0: i64 = 1_735_689_600;

fn backend(config: &GiteaConfig) -> Gitea {
    Gitea::new(config).expect("backend")
}

async fn ask(b: &Gitea, req: BackendRequest) -> Result<BackendResponse, RegistryError> {
    b.clone().oneshot(req).await
}

async fn list(b: &Gitea) -> Result<Vec<Extension>, RegistryError> {
    let l = ask(b, BackendRequest::List(ListFilter::default()))
        .await?
        .into_list()?;
    Ok(l.as_ref().clone())
}

fn key(ty: ExtensionType, name: &str) -> ExtensionKey {
    ExtensionKey {
        ty,
        name: ExtensionName::parse(name).unwrap(),
    }
}

async fn get(b: &Gitea, k: &ExtensionKey) -> Result<Arc<Extension>, RegistryError> {
    let req = BackendRequest::Get {
        key: k.clone(),
        source: Some(Source::Gitea.into()),
    };
    ask(b, req).await?.into_extension()
}

async fn versions(b: &Gitea, k: &ExtensionKey) -> Result<Arc<Vec<Version>>, RegistryError> {
    let req = BackendRequest::Versions {
        key: k.clone(),
        source: Some(Source::Gitea.into()),
    };
    ask(b, req).await?.into_versions()
}

async fn download(b: &Gitea, k: &ExtensionKey, v: &str) -> Result<Artifact, RegistryError> {
    let req = BackendRequest::Download {
        key: k.clone(),
        version: VersionSelector::parse(v).unwrap(),
        source: Some(Source::Gitea.into()),
        range: None,
    };
    ask(b, req).await?.into_artifact()
}

async fn bytes_of(artifact: Artifact) -> Result<Bytes, BoxError> {
    Ok(artifact.body.collect().await?.to_bytes())
}

/// A private repository with one release `1.0.0` carrying an artifact and its good sidecar.
fn private_with_checksum(repo: &str, name: &str) -> SimRepo {
    SimRepo::new(repo).private().release(
        SimRelease::new("1.0.0", T0)
            .artifact(name)
            .sha256_sidecar(true),
    )
}

async fn health(b: &Gitea) -> BackendHealth {
    let report = ask(b, BackendRequest::Health)
        .await
        .unwrap()
        .into_health()
        .unwrap();
    assert_eq!(report.0.len(), 1);
    report.0.into_iter().next().unwrap()
}

fn provider(name: &str) -> ExtensionKey {
    key(ExtensionType::Provider, name)
}

fn keys(list: &[Extension]) -> BTreeSet<(String, String)> {
    list.iter()
        .map(|e| (e.ty.to_string(), e.name.clone()))
        .collect()
}

fn tags(vs: &[Version]) -> Vec<&str> {
    vs.iter().map(|v| v.version.as_str()).collect()
}

#[tokio::test]
async fn lists_organisations_of_every_size_with_one_releases_call_per_repository() {
    for n in [0, 1, 49, 50, 51, 130] {
        let repos = seeded_org(n);
        let total = repos.len() as u64;
        let sim = GiteaSim::start(SimConfig::new(ORG).repos(repos)).await;
        let b = backend(&sim.gitea_config());
        let started = Instant::now();
        let listed = list(&b).await.unwrap();
        let took = started.elapsed();
        let expected: BTreeSet<(String, String)> = seeded_extensions(n)
            .into_iter()
            .map(|(t, name)| (t.to_owned(), name))
            .collect();
        assert_eq!(keys(&listed), expected, "n = {n}");
        assert_eq!(listed.len(), n);
        let calls = sim.calls();
        // ceil(total / 50) org pages (at least one) + one releases page per extension repo.
        assert_eq!(calls.org_repos, total.div_ceil(50).max(1), "n = {n}");
        assert_eq!(calls.releases, n as u64, "n = {n}");
        assert_eq!((calls.repo, calls.downloads), (0, 0), "n = {n}");
        assert_eq!(calls.api, calls.org_repos + calls.releases);
        if n == 130 {
            println!(
                "cold list of 130 repos ({total} in the org): {} calls, {took:?}",
                calls.api
            );
        }
    }
}

#[tokio::test]
async fn releases_calls_overlap_up_to_max_concurrency() {
    // The simulator holds releases requests until 4 are in flight together: a client that
    // did not overlap them would stall into its timeout and lose repositories.
    let sim = GiteaSim::start(
        SimConfig::new(ORG)
            .repos(seeded_org(12))
            .releases_rendezvous(4),
    )
    .await;
    let b = backend(&GiteaConfig {
        max_concurrency: 4,
        ..sim.gitea_config()
    });
    assert_eq!(list(&b).await.unwrap().len(), 12);
    assert_eq!(sim.calls().releases_in_flight_max, 4);
}

#[tokio::test]
async fn a_gitea_section_builds_the_backend() {
    let sim = GiteaSim::start(SimConfig::new(ORG).token(TOKEN).repos(seeded_org(3))).await;
    let dir = tempfile::tempdir().unwrap();
    token_file(dir.path(), TOKEN);
    let text = format!(
        "[gitea]\nurl = {:?}\norganization = {ORG:?}\ntoken_path = \"gitea-token\"\n",
        sim.url().trim_end_matches('/')
    );
    let config = Config::parse(&text, "test.toml", Some(dir.path())).unwrap();
    let backends = extension_registry::backend::from_config(&config).unwrap();
    assert_eq!(backends.len(), 1);
    let (source, service) = backends.into_iter().next().unwrap();
    assert_eq!(source, Source::Gitea.into());
    let listed = service
        .oneshot(BackendRequest::List(ListFilter::default()))
        .await
        .unwrap()
        .into_list()
        .unwrap();
    assert_eq!(listed.len(), 3);
    // A URL without its trailing `/` still keeps the sub-path.
    assert!(listed[0].repository.starts_with(&sim.url()));
    assert_eq!(sim.calls().api, 4);

    let missing_token =
        "[gitea]\nurl = \"http://127.0.0.1:9/\"\norganization = \"o\"\ntoken_path = \"nope\"\n";
    let missing = Config::parse(missing_token, "test.toml", Some(dir.path())).unwrap();
    let err = extension_registry::backend::from_config(&missing)
        .err()
        .unwrap();
    assert!(err.to_string().contains("nope"), "{err}");
}

#[tokio::test]
async fn list_maps_gitea_fields_to_extensions() {
    let sim = GiteaSim::start(
        SimConfig::new(ORG).utc_offset_hours(1).repo(
            SimRepo::new("aws_prov")
                .topic("cloud")
                .release(SimRelease::new("v1.2.0", T0).artifact("aws"))
                .release(
                    SimRelease::new("v1.1.0", T0 - 100)
                        .artifact("aws")
                        .without_author(),
                ),
        ),
    )
    .await;
    let b = backend(&sim.gitea_config());
    let listed = list(&b).await.unwrap();
    assert_eq!(listed.len(), 1);
    let e = &listed[0];
    let root = sim.url();
    assert_eq!(e.name, "aws");
    assert_eq!(e.ty, ExtensionType::Provider);
    assert_eq!(e.version, "v1.2.0");
    assert_eq!(e.description, "The aws_prov extension");
    assert_eq!(e.author, "release-bot");
    assert_eq!(e.repository, format!("{root}extensions/aws_prov"));
    assert_eq!(e.source, Source::Gitea);
    // The simulator renders +01:00; the API shows UTC.
    assert_eq!(e.published_at.to_string(), "2025-01-01T00:00:00Z");
    assert_eq!(
        e.download_url,
        format!("{root}extensions/aws_prov/releases/download/v1.2.0/aws-v1.2.0.tar.gz")
    );
    assert_eq!(e.size, artifact_bytes("aws", "v1.2.0").len() as u64);
    assert_eq!(e.checksum, None);
    assert_eq!(e.tags, ["cloud"]);

    // A release without an author shows the organization.
    let vs = versions(&b, &provider("aws")).await.unwrap();
    assert_eq!(tags(&vs), ["v1.2.0", "v1.1.0"]);
    let only_old = GiteaSim::start(
        SimConfig::new(ORG).repo(
            SimRepo::new("old_prov").release(
                SimRelease::new("1.0.0", T0)
                    .artifact("old")
                    .without_author(),
            ),
        ),
    )
    .await;
    let e = get(&backend(&only_old.gitea_config()), &provider("old"))
        .await
        .unwrap();
    assert_eq!(e.author, ORG);
}

#[tokio::test]
async fn archived_repositories_are_listed_only_when_asked() {
    let sim = GiteaSim::start(SimConfig::new(ORG).repos(seeded_org(14))).await;
    let b = backend(&sim.gitea_config());
    let listed = list(&b).await.unwrap();
    assert!(listed.iter().all(|e| !e.name.starts_with("old")));
    assert!(matches!(
        get(&b, &provider("old006")).await,
        Err(RegistryError::NotFound(_))
    ));
    let with_archived = backend(&GiteaConfig {
        include_archived: true,
        ..sim.gitea_config()
    });
    let listed = list(&with_archived).await.unwrap();
    let old: Vec<&str> = listed
        .iter()
        .filter(|e| e.name.starts_with("old"))
        .map(|e| e.name.as_str())
        .collect();
    assert_eq!(listed.len(), 14 + 2);
    assert!(
        old.contains(&"old006") && old.contains(&"old013"),
        "{old:?}"
    );
    assert_eq!(
        get(&with_archived, &provider("old006"))
            .await
            .unwrap()
            .version,
        "0.1.0"
    );
}

#[tokio::test]
async fn the_type_filter_narrows_the_listing() {
    let sim = GiteaSim::start(SimConfig::new(ORG).repos(seeded_org(9))).await;
    let b = backend(&sim.gitea_config());
    let filter = ListFilter {
        ty: Some(ExtensionType::Cluster),
        source: None,
    };
    let listed = ask(&b, BackendRequest::List(filter))
        .await
        .unwrap()
        .into_list()
        .unwrap();
    assert_eq!(listed.len(), 3);
    assert!(listed.iter().all(|e| e.ty == ExtensionType::Cluster));
    // Repositories of other types cost no releases call.
    assert_eq!(sim.calls().releases, 3);
}

#[tokio::test]
async fn a_repository_with_120_releases_is_read_across_pages_and_drafts_stay_hidden() {
    let mut repo = SimRepo::new("big_taskserv");
    for i in 0..120 {
        repo = repo.release(SimRelease::new(&format!("1.0.{i}"), T0 + i).artifact("big"));
    }
    repo = repo
        .release(SimRelease::new("9.0.0", T0 + 500).artifact("big").draft())
        .release(SimRelease::new("9.1.0", T0 + 501).artifact("big").draft());
    let sim = GiteaSim::start(SimConfig::new(ORG).repo(repo)).await;
    let b = backend(&sim.gitea_config());
    let k = key(ExtensionType::Taskserv, "big");
    let vs = versions(&b, &k).await.unwrap();
    assert_eq!(vs.len(), 120);
    assert_eq!(vs[0].version, "1.0.119");
    assert_eq!(vs[119].version, "1.0.0");
    assert!(vs.iter().all(|v| !v.version.starts_with('9')));
    assert_eq!(sim.calls().releases, 3, "120 releases are 3 pages of 50");
    assert_eq!(get(&b, &k).await.unwrap().version, "1.0.119");
    let listed = list(&b).await.unwrap();
    assert_eq!(listed[0].version, "1.0.119");
}

#[tokio::test]
async fn version_choice_follows_the_domain_ordering() {
    let sim = GiteaSim::start(
        SimConfig::new(ORG)
            .repo(
                SimRepo::new("pre_prov")
                    .release(
                        SimRelease::new("0.1.0-alpha", T0)
                            .artifact("pre")
                            .prerelease(),
                    )
                    .release(
                        SimRelease::new("0.2.0-beta.2", T0 + 1)
                            .artifact("pre")
                            .prerelease(),
                    ),
            )
            .repo(
                // Newest by date is the prerelease, then a non-semver tag: neither is current.
                SimRepo::new("mixed_prov")
                    .release(SimRelease::new("v1.10.0", T0).artifact("mixed"))
                    .release(SimRelease::new("v1.2.0", T0 + 1).artifact("mixed"))
                    .release(
                        SimRelease::new("2.0.0-rc.1", T0 + 2)
                            .artifact("mixed")
                            .prerelease(),
                    )
                    .release(SimRelease::new("nightly", T0 + 3).artifact("mixed")),
            )
            .repo(
                SimRepo::new("tags_prov")
                    .release(SimRelease::new("edge", T0).artifact("tags"))
                    .release(SimRelease::new("nightly", T0 + 1).artifact("tags")),
            ),
    )
    .await;
    let b = backend(&sim.gitea_config());
    assert_eq!(
        get(&b, &provider("pre")).await.unwrap().version,
        "0.2.0-beta.2"
    );
    assert_eq!(
        get(&b, &provider("mixed")).await.unwrap().version,
        "v1.10.0"
    );
    assert_eq!(get(&b, &provider("tags")).await.unwrap().version, "nightly");
    let vs = versions(&b, &provider("mixed")).await.unwrap();
    assert_eq!(tags(&vs), ["2.0.0-rc.1", "v1.10.0", "v1.2.0", "nightly"]);
    let listed = list(&b).await.unwrap();
    let by_name = |n: &str| listed.iter().find(|e| e.name == n).unwrap().version.clone();
    assert_eq!(by_name("mixed"), "v1.10.0");
    assert_eq!(by_name("pre"), "0.2.0-beta.2");
    // `latest` downloads the current version, not Gitea's newest-by-date.
    let a = download(&b, &provider("mixed"), "latest").await.unwrap();
    assert_eq!(a.filename, "mixed-v1.10.0.tar.gz");
    assert_eq!(
        bytes_of(a).await.unwrap(),
        artifact_bytes("mixed", "v1.10.0")
    );
}

#[tokio::test]
async fn releases_without_an_artifact_are_not_versions() {
    let sim = GiteaSim::start(
        SimConfig::new(ORG)
            .repo(
                SimRepo::new("half_prov")
                    .release(SimRelease::new("2.0.0", T0 + 1).asset("notes.txt", "hi"))
                    .release(SimRelease::new("1.0.0", T0).artifact("half")),
            )
            .repo(SimRepo::new("bare_prov").release(SimRelease::new("1.0.0", T0)))
            .repo(SimRepo::new("empty_prov"))
            .repo(
                // Artifact rules: `{repo}.tar.gz` first, then `{name}-{version}.tar.gz`, then
                // any tarball.
                SimRepo::new("rules_cluster")
                    .release(
                        SimRelease::new("1.0.0", T0)
                            .asset("a.tgz", "x")
                            .asset("rules-1.0.0.tar.gz", "y")
                            .asset("rules_cluster.tar.gz", "z"),
                    )
                    .release(SimRelease::new("1.1.0", T0 + 1).asset("other.tgz", "t")),
            ),
    )
    .await;
    let b = backend(&sim.gitea_config());
    let listed = list(&b).await.unwrap();
    assert_eq!(
        keys(&listed),
        BTreeSet::from([
            ("cluster".to_owned(), "rules".to_owned()),
            ("provider".to_owned(), "half".to_owned())
        ])
    );
    // A repository without releases costs no releases call.
    assert_eq!(sim.calls().releases, 3);
    assert_eq!(get(&b, &provider("half")).await.unwrap().version, "1.0.0");
    let err = get(&b, &provider("bare")).await.unwrap_err();
    assert_eq!(err.to_string(), "Extension provider/bare not found");
    assert!(matches!(
        get(&b, &provider("nosuch")).await,
        Err(RegistryError::NotFound(_))
    ));
    let rules = key(ExtensionType::Cluster, "rules");
    let a = download(&b, &rules, "1.0.0").await.unwrap();
    assert_eq!(a.filename, "rules_cluster.tar.gz");
    assert_eq!(bytes_of(a).await.unwrap(), "z");
    assert_eq!(
        download(&b, &rules, "1.1.0").await.unwrap().filename,
        "other.tgz"
    );
    let err = download(&b, &rules, "3.0.0").await.unwrap_err();
    assert!(err.is_not_found(), "{err}");
}

#[tokio::test]
async fn sha256_sidecars_give_checksums_and_a_wrong_one_aborts_the_download() {
    let sums = format!(
        "{}  unrelated.tar.gz\n{}  sums-1.0.0.tar.gz\n",
        sha256_hex(b"x"),
        sha256_hex(&artifact_bytes("sums", "1.0.0"))
    );
    let sim = GiteaSim::start(
        SimConfig::new(ORG)
            .repo(
                SimRepo::new("good_prov")
                    .release(
                        SimRelease::new("1.0.0", T0)
                            .artifact("good")
                            .sha256_sidecar(true),
                    )
                    .release(SimRelease::new("0.9.0", T0 - 1).artifact("good")),
            )
            .repo(
                SimRepo::new("sums_prov").release(
                    SimRelease::new("1.0.0", T0)
                        .artifact("sums")
                        .asset("SHA256SUMS", sums),
                ),
            )
            .repo(
                SimRepo::new("bad_prov").release(
                    SimRelease::new("1.0.0", T0)
                        .artifact("bad")
                        .sha256_sidecar(false),
                ),
            ),
    )
    .await;
    let b = backend(&sim.gitea_config());
    let good_digest = format!("sha256:{}", sha256_hex(&artifact_bytes("good", "1.0.0")));

    // The listing never fetches sidecars.
    let listed = list(&b).await.unwrap();
    assert!(listed.iter().all(|e| e.checksum.is_none()));
    assert_eq!(sim.calls().downloads, 0);

    assert_eq!(
        get(&b, &provider("good")).await.unwrap().checksum,
        Some(good_digest.clone())
    );
    let vs = versions(&b, &provider("good")).await.unwrap();
    assert_eq!(vs[0].checksum, Some(good_digest));
    assert_eq!(vs[1].checksum, None);
    let sums_digest = format!("sha256:{}", sha256_hex(&artifact_bytes("sums", "1.0.0")));
    assert_eq!(
        get(&b, &provider("sums")).await.unwrap().checksum,
        Some(sums_digest)
    );

    let a = download(&b, &provider("good"), "1.0.0").await.unwrap();
    assert_eq!(
        a.content_length,
        Some(artifact_bytes("good", "1.0.0").len() as u64)
    );
    assert_eq!(bytes_of(a).await.unwrap(), artifact_bytes("good", "1.0.0"));
    let a = download(&b, &provider("sums"), "latest").await.unwrap();
    assert_eq!(bytes_of(a).await.unwrap(), artifact_bytes("sums", "1.0.0"));

    let a = download(&b, &provider("bad"), "1.0.0").await.unwrap();
    let err = bytes_of(a).await.unwrap_err();
    assert!(err.to_string().contains("sha256 mismatch"), "{err}");
}

#[tokio::test]
async fn tokens_present_absent_and_wrong() {
    let sim = GiteaSim::start(
        SimConfig::new(ORG)
            .token(TOKEN)
            .repo(SimRepo::new("pub_prov").release(SimRelease::new("1.0.0", T0).artifact("pub")))
            .repo(
                SimRepo::new("priv_prov")
                    .private()
                    .release(SimRelease::new("1.0.0", T0).artifact("priv")),
            ),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();

    let anonymous = backend(&sim.gitea_config());
    let names = |l: &[Extension]| l.iter().map(|e| e.name.clone()).collect::<Vec<_>>();
    assert_eq!(names(&list(&anonymous).await.unwrap()), ["pub"]);
    // Private and invisible is "not found", never an error.
    let err = get(&anonymous, &provider("priv")).await.unwrap_err();
    assert!(err.is_not_found(), "{err}");
    assert_eq!(sim.calls().downloads_with_authorization, 0);

    let with_token = backend(&sim.gitea_config_with_token(dir.path()));
    let mut listed = names(&list(&with_token).await.unwrap());
    listed.sort();
    assert_eq!(listed, ["priv", "pub"]);
    let a = download(&with_token, &provider("priv"), "latest")
        .await
        .unwrap();
    assert_eq!(bytes_of(a).await.unwrap(), artifact_bytes("priv", "1.0.0"));
    assert_eq!(sim.calls().downloads_with_authorization, 1);

    let wrong_dir = tempfile::tempdir().unwrap();
    let wrong = backend(&GiteaConfig {
        token_path: Some(token_file(wrong_dir.path(), "not-the-token")),
        ..sim.gitea_config()
    });
    for err in [
        list(&wrong).await.unwrap_err(),
        get(&wrong, &provider("pub")).await.unwrap_err(),
    ] {
        assert_eq!(err, RegistryError::auth_failed(Source::Gitea));
        assert!(!err.to_string().contains("not-the-token"));
    }
    let h = health(&wrong).await;
    assert!(!h.healthy);
    assert!(h.detail.as_deref().unwrap().contains("credentials"));
}

#[tokio::test]
async fn short_pages_do_not_end_the_listing() {
    // Signed in, Gitea pages over every repository and then drops the unreadable ones: the
    // first page comes back empty and the second short, yet more follow.
    let mut config = SimConfig::new(ORG).token(TOKEN);
    for i in 0..70 {
        config = config.repo(
            SimRepo::new(&format!("hidden{i:02}_prov"))
                .hidden_from_token()
                .release(SimRelease::new("1.0.0", T0).artifact(&format!("hidden{i:02}"))),
        );
    }
    config.repos.extend(seeded_org(45));
    let sim = GiteaSim::start(config).await;
    let dir = tempfile::tempdir().unwrap();
    let b = backend(&sim.gitea_config_with_token(dir.path()));
    let listed = list(&b).await.unwrap();
    assert_eq!(listed.len(), 45);
    assert!(listed.iter().all(|e| !e.name.starts_with("hidden")));
    assert_eq!(sim.calls().org_repos, 3);
}

#[tokio::test]
async fn the_object_storage_redirect_never_carries_the_token() {
    let sim = GiteaSim::start(
        SimConfig::new(ORG)
            .token(TOKEN)
            .storage_redirect()
            .repo(private_with_checksum("s3_prov", "s3")),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let b = backend(&sim.gitea_config_with_token(dir.path()));
    let a = download(&b, &provider("s3"), "1.0.0").await.unwrap();
    assert_eq!(bytes_of(a).await.unwrap(), artifact_bytes("s3", "1.0.0"));
    let calls = sim.calls();
    // The sidecar and the artifact: both asked of Gitea with the token, both fetched from
    // storage without it.
    assert_eq!(calls.downloads, 2);
    assert_eq!(calls.downloads_with_authorization, 2);
    assert_eq!(calls.storage, 2);
    assert_eq!(calls.storage_with_authorization, 0);
}

#[tokio::test]
async fn an_html_sign_in_page_is_a_failed_download() {
    let sim = GiteaSim::start(
        SimConfig::new(ORG)
            .token(TOKEN)
            .require_signin()
            .repo(SimRepo::new("web_prov").release(SimRelease::new("1.0.0", T0).artifact("web"))),
    )
    .await;
    // Anonymous on a sign-in-only instance: the API refuses.
    let err = list(&backend(&sim.gitea_config())).await.unwrap_err();
    assert!(
        matches!(err, RegistryError::BackendUnavailable { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("403"), "{err}");

    // Configured under another name than the instance's ROOT_URL: the asset URLs in bodies are
    // on another host, so the token is (rightly) not sent there and the download lands on the
    // sign-in page.
    let dir = tempfile::tempdir().unwrap();
    let b = backend(&GiteaConfig {
        url: sim.url().replace("127.0.0.1", "localhost"),
        ..sim.gitea_config_with_token(dir.path())
    });
    assert_eq!(list(&b).await.unwrap().len(), 1);
    let err = download(&b, &provider("web"), "1.0.0").await.unwrap_err();
    assert!(
        matches!(err, RegistryError::BackendUnavailable { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("HTML"), "{err}");
    assert_eq!(sim.calls().downloads_with_authorization, 0);
}

#[tokio::test]
async fn a_slow_backend_times_out_as_a_gitea_timeout() {
    let sim = GiteaSim::start(SimConfig::new(ORG).repos(seeded_org(3))).await;
    sim.set_mode(Mode::Slow);
    let b = backend(&GiteaConfig {
        timeout_seconds: 1,
        ..sim.gitea_config()
    });
    // The simulator never answers, so only the configured 1 s read timeout can end the call;
    // the guard, far above it, turns a missing timeout into a failure instead of a hang.
    let guard = Duration::from_secs(30);
    let err = tokio::time::timeout(guard, list(&b))
        .await
        .expect("the configured timeout ends the call")
        .unwrap_err();
    let h = tokio::time::timeout(guard, health(&b))
        .await
        .expect("the health probe times out too");
    assert!(!h.healthy);
    let timeout = RegistryError::timeout(Source::Gitea);
    assert_eq!(err, timeout);
    assert_eq!(h.detail, Some(timeout.to_string()));
}

#[tokio::test]
async fn server_errors_and_malformed_json_are_backend_failures() {
    let sim = GiteaSim::start(
        SimConfig::new(ORG).repos(seeded_org(4)).repo(
            SimRepo::new("broken_prov")
                .failing()
                .release(SimRelease::new("1.0.0", T0).artifact("broken")),
        ),
    )
    .await;
    let b = backend(&sim.gitea_config());
    let unknown_org = backend(&GiteaConfig {
        organization: "nosuch".into(),
        ..sim.gitea_config()
    });
    let err = list(&unknown_org).await.unwrap_err();
    assert!(
        err.to_string().contains("organization was not found"),
        "{err}"
    );
    assert!(!err.to_string().contains("nosuch"), "{err}");
    // One broken repository is left out; the others are listed.
    let listed = list(&b).await.unwrap();
    assert_eq!(listed.len(), 4);
    let err = get(&b, &provider("broken")).await.unwrap_err();
    assert!(err.to_string().contains("HTTP 500"), "{err}");

    let h = health(&b).await;
    assert!(h.healthy);

    sim.set_mode(Mode::ServerError);
    let err = list(&b).await.unwrap_err();
    assert!(matches!(
        err,
        RegistryError::BackendUnavailable {
            backend: Source::Gitea,
            ..
        }
    ));
    assert!(
        err.to_string().starts_with("gitea backend unavailable"),
        "{err}"
    );
    let h = health(&b).await;
    assert!(!h.healthy);
    assert!(h.detail.as_deref().unwrap().contains("500"));

    sim.set_mode(Mode::MalformedJson);
    let err = list(&b).await.unwrap_err();
    assert!(matches!(
        err,
        RegistryError::BackendUnavailable {
            backend: Source::Gitea,
            ..
        }
    ));
    assert!(err.to_string().contains("JSON"), "{err}");
}

#[tokio::test]
async fn a_failing_download_is_an_error_not_bytes() {
    let sim = GiteaSim::start(SimConfig::new(ORG).repos(seeded_org(1))).await;
    let b = backend(&sim.gitea_config());
    let k = provider("ext000");
    // Metadata first, then the instance starts failing.
    let vs = versions(&b, &k).await.unwrap();
    assert_eq!(tags(&vs), ["1.0.0"]);
    sim.set_mode(Mode::ServerError);
    let err = download(&b, &k, "1.0.0").await.unwrap_err();
    assert!(err.is_backend_fault(), "{err}");
}

#[tokio::test]
async fn forgejo_mode_works_with_a_lowercase_token() {
    let sim = GiteaSim::start(
        SimConfig::new(ORG)
            .forgejo()
            .token(TOKEN)
            .repo(private_with_checksum("fj_cluster", "fj")),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let b = backend(&sim.gitea_config_with_token(dir.path()));
    let k = key(ExtensionType::Cluster, "fj");
    assert_eq!(list(&b).await.unwrap().len(), 1);
    assert!(get(&b, &k).await.unwrap().checksum.is_some());
    let a = download(&b, &k, "latest").await.unwrap();
    assert_eq!(bytes_of(a).await.unwrap(), artifact_bytes("fj", "1.0.0"));
    let h = health(&b).await;
    assert!(h.healthy);

    // The simulator's own strictness: Forgejo ignores `Token`, so the private repo is hidden.
    let raw = reqwest::Client::new();
    let repo_url = format!("{}api/v1/repos/{ORG}/fj_cluster", sim.url());
    let status = |casing: &'static str| {
        let req = raw
            .get(&repo_url)
            .header("authorization", format!("{casing} {TOKEN}"));
        async move { req.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(status("token").await, 200);
    assert_eq!(status("Token").await, 404);
}

#[tokio::test]
async fn versions_and_downloads_of_unknown_extensions_are_not_found() {
    let sim = GiteaSim::start(SimConfig::new(ORG).repos(seeded_org(2))).await;
    let b = backend(&sim.gitea_config());
    let k = key(ExtensionType::Cluster, "nosuch");
    assert!(versions(&b, &k).await.unwrap_err().is_not_found());
    assert!(download(&b, &k, "latest").await.unwrap_err().is_not_found());
    // The right name with the wrong type is another extension.
    assert!(get(&b, &key(ExtensionType::Cluster, "ext000"))
        .await
        .unwrap_err()
        .is_not_found());
    let tag = VersionTag::parse("1.0.0").unwrap();
    assert_eq!(tag.as_str(), "1.0.0");
}

/// Bodies of every kind the simulator serves, fetched raw.
#[tokio::test]
async fn simulator_bodies_match_giteas_schema() {
    let schema = swagger::Swagger::from_file("tests/fixtures/gitea/swagger.v1.json")
        // CONTRACT.md §0: users carry a duplicate `username` the schema does not declare.
        .allow_extra("User.username");
    let sim = GiteaSim::start(
        SimConfig::new(ORG)
            .token(TOKEN)
            .utc_offset_hours(1)
            .repos(seeded_org(3))
            .repo(
                SimRepo::new("full_prov")
                    .topic("cloud")
                    .archived()
                    .release(
                        SimRelease::new("v1.0.0", T0)
                            .artifact("full")
                            .sha256_sidecar(true),
                    )
                    .release(
                        SimRelease::new("v0.9.0", T0 - 1)
                            .artifact("full")
                            .without_author(),
                    ),
            ),
    )
    .await;
    let raw = reqwest::Client::new();
    let get_json = |path: String, token: Option<&'static str>| {
        let mut req = raw.get(format!("{}{path}", sim.url()));
        if let Some(t) = token {
            req = req.header("authorization", format!("token {t}"));
        }
        async move {
            let r = req.send().await.unwrap();
            let status = r.status().as_u16();
            assert_eq!(
                r.headers()["content-type"],
                "application/json;charset=utf-8",
                "{path}"
            );
            let text = r.text().await.unwrap();
            assert!(text.ends_with('\n'));
            (
                status,
                serde_json::from_str::<serde_json::Value>(&text).unwrap(),
            )
        }
    };
    let check = |definition: &str, value: &serde_json::Value| {
        if let Err(errors) = schema.validate(definition, value) {
            panic!("{definition}: {errors:#?}\n{value:#}");
        }
    };

    let (status, repos) = get_json(format!("api/v1/orgs/{ORG}/repos?limit=50"), None).await;
    assert_eq!(status, 200);
    assert_eq!(repos.as_array().unwrap().len(), 4);
    for repo in repos.as_array().unwrap() {
        check("Repository", repo);
    }
    let (_, repo) = get_json(format!("api/v1/repos/{ORG}/full_prov"), Some(TOKEN)).await;
    check("Repository", &repo);
    let (_, releases) = get_json(format!("api/v1/repos/{ORG}/full_prov/releases"), None).await;
    assert_eq!(releases.as_array().unwrap().len(), 2);
    for release in releases.as_array().unwrap() {
        check("Release", release);
        for asset in release["assets"].as_array().unwrap() {
            check("Attachment", asset);
        }
    }
    assert_eq!(releases[0]["published_at"], "2025-01-01T01:00:00+01:00");
    // One release by its tag, looked up ignoring case.
    let (status, tagged) = get_json(
        format!("api/v1/repos/{ORG}/full_prov/releases/tags/V1.0.0"),
        None,
    )
    .await;
    assert_eq!(status, 200);
    check("Release", &tagged);
    assert_eq!(tagged, releases[0]);
    let (status, _) = get_json(
        format!("api/v1/repos/{ORG}/full_prov/releases/tags/v2.0.0"),
        None,
    )
    .await;
    assert_eq!(status, 404);
    let (_, version) = get_json("api/v1/version".into(), None).await;
    check("ServerVersion", &version);
    assert_eq!(version["version"], "1.26.3");

    // Error bodies where the schema has them (APIError); 404 bodies add `errors`, which the
    // schema's `notFound` response leaves undescribed.
    let (status, unauthorized) = get_json("api/v1/version".into(), Some("wrong")).await;
    assert_eq!(status, 401);
    check("APIError", &unauthorized);
    sim.set_mode(Mode::ServerError);
    let (status, failed) = get_json("api/v1/version".into(), None).await;
    assert_eq!(status, 500);
    check("APIError", &failed);
    sim.set_mode(Mode::Normal);
    let (status, missing) = get_json(format!("api/v1/repos/{ORG}/nosuch"), None).await;
    assert_eq!(status, 404);
    assert_eq!(missing["errors"], serde_json::Value::Null);
    assert_eq!(missing["url"], format!("{}api/swagger", sim.url()));

    let signin = GiteaSim::start(SimConfig::new(ORG).require_signin()).await;
    let r = raw
        .get(format!("{}api/v1/version", signin.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    check("APIError", &r.json().await.unwrap());
}

#[tokio::test]
async fn simulator_paginates_like_gitea() {
    let sim = GiteaSim::start(SimConfig::new(ORG).repos(seeded_org(60))).await;
    let total = seeded_org(60).len();
    let raw = reqwest::Client::new();
    let page = |query: &'static str| {
        let req = raw.get(format!("{}api/v1/orgs/{ORG}/repos?{query}", sim.url()));
        async move {
            let r = req.send().await.unwrap();
            let count: usize = r.headers()["x-total-count"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            let link = r
                .headers()
                .get("link")
                .map(|v| v.to_str().unwrap().to_owned());
            let items = r.json::<Vec<serde_json::Value>>().await.unwrap().len();
            (count, link, items)
        }
    };
    let base = format!("{}api/v1/orgs/{ORG}/repos", sim.url());
    // Keys re-sorted, other parameters kept as sent, no space after the commas.
    let (count, link, items) = page("page=2&limit=30&zeta=1").await;
    assert_eq!((count, items), (total, 30));
    assert_eq!(
        link.unwrap(),
        format!(
            "<{base}?limit=30&page=3&zeta=1>; rel=\"next\",<{base}?limit=30&page=3&zeta=1>; rel=\"last\",\
             <{base}?limit=30&page=1&zeta=1>; rel=\"first\",<{base}?limit=30&page=1&zeta=1>; rel=\"prev\""
        )
    );
    // Over the cap: silently 50.
    let (_, link, items) = page("limit=100").await;
    assert_eq!(items, 50);
    assert!(link
        .unwrap()
        .starts_with(&format!("<{base}?limit=100&page=2>; rel=\"next\"")));
    // No limit: 30.
    assert_eq!(page("").await.2, 30);
    // Past the end: 200 [] with the links of the last page.
    let (count, link, items) = page("limit=50&page=9").await;
    assert_eq!((count, items), (total, 0));
    assert_eq!(
        link.unwrap(),
        format!("<{base}?limit=50&page=1>; rel=\"first\",<{base}?limit=50&page=1>; rel=\"prev\"")
    );
    // One page only: no Link.
    let one = GiteaSim::start(SimConfig::new(ORG).repos(seeded_org(2))).await;
    let r = raw
        .get(format!("{}api/v1/orgs/{ORG}/repos", one.url()))
        .send()
        .await
        .unwrap();
    assert!(r.headers().get("link").is_none());
    // Unknown organization: Gitea's GetOrgByName body.
    let r = raw
        .get(format!("{}api/v1/orgs/nosuch/repos", one.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["message"], "GetOrgByName");
}

/// Whether every request of `seen` went without credentials; false for none at all (then the
/// check would prove nothing).
fn all_anonymous(seen: &[Seen]) -> bool {
    !seen.is_empty() && seen.iter().all(|s| !s.authorization)
}

/// An instance holding a private repository `secret_prov` (release `1.0.0` with its artifact)
/// beside `repo`, and a backend holding the token that can read both.
async fn beside_a_secret(config: SimConfig, repo: SimRepo) -> (GiteaSim, Gitea, tempfile::TempDir) {
    let sim = GiteaSim::start(
        config
            .token(TOKEN)
            .repo(repo)
            .repo(private_with_checksum("secret_prov", "secret")),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let b = backend(&sim.gitea_config_with_token(dir.path()));
    (sim, b, dir)
}

const SECRET_ARCHIVE: &str = "api/v1/repos/extensions/secret_prov/archive/main.tar.gz";
const SECRET_ASSET: &str = "extensions/secret_prov/releases/download/1.0.0/secret-1.0.0.tar.gz";

#[tokio::test]
async fn an_external_asset_pointing_at_a_private_archive_gets_no_token() {
    // Forgejo: whoever publishes a release may make an asset a link to anything, here the
    // API archive of a private repository the service's token can read.
    let release = SimRelease::new("1.0.0", T0).hop_asset(
        "ext-1.0.0.tar.gz",
        "",
        Hop::External(SECRET_ARCHIVE.into()),
    );
    let (sim, b, _dir) = beside_a_secret(
        SimConfig::new(ORG).forgejo(),
        SimRepo::new("ext_prov").release(release),
    )
    .await;
    assert_eq!(
        get(&b, &provider("ext")).await.unwrap().download_url,
        format!("{}{SECRET_ARCHIVE}", sim.url())
    );
    let err = download(&b, &provider("ext"), "1.0.0").await.unwrap_err();
    assert!(
        matches!(
            err,
            RegistryError::BackendUnavailable {
                backend: Source::Gitea,
                ..
            }
        ),
        "{err}"
    );
    assert!(all_anonymous(&sim.seen_at("/archive/")), "{:?}", sim.seen());
}

#[tokio::test]
async fn a_same_host_redirect_to_another_repository_drops_the_token() {
    let logs = logs::LogCapture::start();
    let release = SimRelease::new("1.0.0", T0)
        .hop_asset("hop-1.0.0.tar.gz", "", Hop::Redirect(SECRET_ASSET.into()))
        .hop_asset(
            "hop-1.0.0.tar.gz.sha256",
            "",
            Hop::Redirect(SECRET_ARCHIVE.into()),
        );
    let (sim, b, _dir) = beside_a_secret(
        SimConfig::new(ORG),
        SimRepo::new("hop_prov").release(release),
    )
    .await;
    let err = download(&b, &provider("hop"), "1.0.0").await.unwrap_err();
    assert!(err.is_backend_fault(), "{err}");
    // The checksum sidecar is fetched first and follows the same rule: its first hop is the
    // release's own asset (token), the second another repository's archive (none).
    let sidecar = sim.seen_at("hop-1.0.0.tar.gz.sha256");
    assert_eq!(sidecar.len(), 1);
    assert!(sidecar[0].authorization);
    assert!(all_anonymous(&sim.seen_at("/archive/")), "{:?}", sim.seen());

    // Without a sidecar, the artifact's own hop carries the token, the redirect to the
    // private repository's asset does not, so nothing of it is served.
    let release = SimRelease::new("1.0.0", T0).hop_asset(
        "hop-1.0.0.tar.gz",
        "",
        Hop::Redirect(SECRET_ASSET.into()),
    );
    let (sim, b, _dir) = beside_a_secret(
        SimConfig::new(ORG),
        SimRepo::new("hop_prov").release(release),
    )
    .await;
    let err = download(&b, &provider("hop"), "1.0.0").await.unwrap_err();
    assert!(err.to_string().contains("HTTP 404"), "{err}");
    let own = sim.seen_at("hop_prov/releases/download/1.0.0/hop-1.0.0.tar.gz");
    assert_eq!(own.len(), 1);
    assert!(own[0].authorization);
    assert!(
        all_anonymous(&sim.seen_at(SECRET_ASSET)),
        "{:?}",
        sim.seen()
    );
    logs.assert_free_of(&[TOKEN]);
}

#[tokio::test]
async fn a_private_repositorys_own_assets_are_fetched_with_the_token_in_both_url_forms() {
    // Two releases: one with by-name URLs, one with `attachments/{uuid}` URLs (what Gitea
    // writes when two assets of a release share a name). Both with a checksum sidecar.
    let repo = SimRepo::new("own_prov")
        .private()
        .release(
            SimRelease::new("1.0.0", T0)
                .artifact("own")
                .sha256_sidecar(true),
        )
        .release(
            SimRelease::new("2.0.0", T0 + 10)
                .artifact("own")
                .sha256_sidecar(true)
                .uuid_urls(),
        );
    let (sim, b, _dir) = beside_a_secret(SimConfig::new(ORG), repo).await;
    for (version, form) in [("1.0.0", "/releases/download/"), ("2.0.0", "/attachments/")] {
        let a = download(&b, &provider("own"), version).await.unwrap();
        assert_eq!(bytes_of(a).await.unwrap(), artifact_bytes("own", version));
        let hops = sim.seen_at(form);
        // The sidecar and the artifact, each straight from the instance, with the token.
        assert_eq!(hops.len(), 2, "{version}: {hops:?}");
        assert!(hops.iter().all(|s| s.authorization), "{version}: {hops:?}");
    }
    let latest = get(&b, &provider("own")).await.unwrap();
    assert_eq!(latest.version, "2.0.0");
    assert!(latest.download_url.contains("/attachments/"));
    assert!(latest.checksum.is_some());
}

#[tokio::test]
async fn redirect_chains_are_followed_up_to_five_hops_without_the_token() {
    let release = |tag: &str, hop: Hop| {
        SimRelease::new(tag, T0).hop_asset(
            &format!("chain-{tag}.tar.gz"),
            artifact_bytes("chain", tag),
            hop,
        )
    };
    let repo = SimRepo::new("chain_prov")
        .private()
        // The asset route, then 4 hops on the same host: 5 redirects.
        .release(release("1.0.0", Hop::Redirect("hops/4/{uuid}".into())))
        // One more: 6.
        .release(release("2.0.0", Hop::Redirect("hops/5/{uuid}".into())))
        .release(release("3.0.0", Hop::Redirect("loop".into())));
    let (sim, b, _dir) = beside_a_secret(SimConfig::new(ORG), repo).await;
    let a = download(&b, &provider("chain"), "1.0.0").await.unwrap();
    assert_eq!(bytes_of(a).await.unwrap(), artifact_bytes("chain", "1.0.0"));
    assert_eq!(sim.seen_at("/hops/").len(), 5);
    assert!(all_anonymous(&sim.seen_at("/hops/")), "{:?}", sim.seen());

    for (version, reason) in [
        ("2.0.0", "more than 5 redirects"),
        ("3.0.0", "redirect loop"),
    ] {
        let err = download(&b, &provider("chain"), version).await.unwrap_err();
        assert!(
            matches!(&err, RegistryError::BackendUnavailable { backend: Source::Gitea, reason: r, .. } if r == reason),
            "{version}: {err}"
        );
    }
    assert!(all_anonymous(&sim.seen_at("loop")), "{:?}", sim.seen());
}

#[tokio::test]
async fn oversized_json_pages_and_sidecars_are_refused() {
    // A description just over the 16 MiB cap makes both the organization page and the
    // repository object too large; the sidecar is a good digest padded past its 64 KiB cap.
    let artifact = artifact_bytes("padded", "1.0.0");
    let padded = format!(
        "{}  padded-1.0.0.tar.gz\n{}",
        sha256_hex(&artifact),
        "# padding\n".repeat(7 * 1024)
    );
    let mut big = SimRepo::new("big_prov").release(SimRelease::new("1.0.0", T0).artifact("big"));
    big.description = "x".repeat(16 * 1024 * 1024);
    let sim = GiteaSim::start(
        SimConfig::new(ORG).repo(big).repo(
            SimRepo::new("padded_prov").release(
                SimRelease::new("1.0.0", T0)
                    .artifact("padded")
                    .asset("padded-1.0.0.tar.gz.sha256", padded),
            ),
        ),
    )
    .await;
    let b = backend(&sim.gitea_config());
    // (Only lengths are unwrapped: a failure must not print 16 MiB.)
    for err in [
        list(&b).await.map(|l| l.len()).unwrap_err(),
        get(&b, &provider("big"))
            .await
            .map(|e| e.version.clone())
            .unwrap_err(),
    ] {
        assert!(
            matches!(&err, RegistryError::BackendUnavailable { backend: Source::Gitea, reason, .. } if reason.contains("larger than 16777216 bytes")),
            "{err}"
        );
    }
    assert_eq!(get(&b, &provider("padded")).await.unwrap().checksum, None);
    let err = download(&b, &provider("padded"), "1.0.0")
        .await
        .unwrap_err();
    assert!(
        matches!(&err, RegistryError::BackendUnavailable { backend: Source::Gitea, reason, .. } if reason.contains("larger than 65536 bytes")),
        "{err}"
    );
}

#[tokio::test]
async fn upstream_names_stay_in_the_log_and_out_of_the_clients_answer() {
    let org = "acme-internal-4711";
    let sim = GiteaSim::start(SimConfig::new(ORG).token(TOKEN).repos(seeded_org(1))).await;
    let dir = tempfile::tempdir().unwrap();
    let logs = logs::LogCapture::start();
    let toml = format!(
        "[gitea]\nurl = {:?}\norganization = {org:?}\ntoken_path = {:?}\n",
        sim.url(),
        token_file(dir.path(), TOKEN)
    );
    let failure = logs::backend_failure(&toml, "/api/v1/extensions").await;
    let message = &failure.message;
    assert!(
        message.starts_with("gitea backend unavailable"),
        "{message}"
    );
    assert!(
        !failure.body.contains(org) && !failure.body.contains(&sim.url()),
        "{message}"
    );
    // The operator still finds it, under the request's id.
    logs.assert_line_with(&[org, &failure.request_id]);
    logs.assert_free_of(&[TOKEN]);
}

/// A repository `hist_prov` with `n` releases `1.{i}.0`, each with its artifact and sidecar.
fn with_history(n: usize) -> SimRepo {
    (0..n).fold(SimRepo::new("hist_prov"), |repo, i| {
        repo.release(
            SimRelease::new(&format!("1.{i}.0"), T0 + i as i64)
                .artifact("hist")
                .sha256_sidecar(true),
        )
    })
}

/// Every request the simulator has answered, API and downloads.
fn all_calls(sim: &GiteaSim) -> u64 {
    let calls = sim.calls();
    calls.api + calls.downloads + calls.storage
}

#[tokio::test]
async fn a_versions_refresh_of_an_unchanged_extension_costs_the_pages_only() {
    for n in [1usize, 25, 200] {
        let sim = GiteaSim::start(SimConfig::new(ORG).repo(with_history(n))).await;
        let b = backend(&sim.gitea_config());
        let hist = provider("hist");
        let pages = (n as u64).div_ceil(50);

        let first = versions(&b, &hist).await.unwrap();
        let cold = sim.calls();
        let cold_total = all_calls(&sim);
        assert_eq!(first.len(), n);
        assert!(first.iter().all(|v| v.checksum.is_some()));
        // The repository, the release pages, and every sidecar once.
        assert_eq!(
            (cold.repo, cold.releases, cold.downloads),
            (1, pages, n as u64)
        );

        // What the cache layer does when its TTL has passed: ask the backend again.
        let second = versions(&b, &hist).await.unwrap();
        let warm = sim.calls();
        assert_eq!(second, first);
        assert_eq!(
            (
                warm.repo - cold.repo,
                warm.releases - cold.releases,
                warm.downloads - cold.downloads
            ),
            (1, pages, 0),
            "{n} releases"
        );
        println!(
            "versions refresh of {n} releases: {cold_total} calls cold, {} calls after",
            all_calls(&sim) - cold_total
        );
    }
}

/// A download of a version named exactly costs the repository and that one release, however
/// long the history; only the latest needs the whole listing to be chosen.
#[tokio::test]
async fn a_download_of_a_named_version_costs_the_same_however_long_the_history() {
    for n in [1usize, 25, 200] {
        let repo =
            with_history(n).release(SimRelease::new("9.0.0", T0 - 1).artifact("hist").draft());
        let sim = GiteaSim::start(SimConfig::new(ORG).repo(repo)).await;
        let b = backend(&sim.gitea_config());
        let hist = provider("hist");
        let wanted = format!("1.{}.0", n / 2);

        let artifact = download(&b, &hist, &wanted).await.unwrap();
        assert_eq!(
            bytes_of(artifact).await.unwrap(),
            artifact_bytes("hist", &wanted)
        );
        let calls = sim.calls();
        // The repository, the release by its tag, then its sidecar and its artifact.
        assert_eq!(
            (
                calls.repo,
                calls.release_by_tag,
                calls.releases,
                calls.downloads
            ),
            (1, 1, 0, 2),
            "{n} releases"
        );
        println!("download of one of {n} releases: {} calls", all_calls(&sim));
        // A draft's tag is no version, and the latest is still chosen from every release.
        assert!(download(&b, &hist, "9.0.0")
            .await
            .unwrap_err()
            .is_not_found());
        let latest = download(&b, &hist, "latest").await.unwrap();
        let latest_tag = format!("1.{}.0", n - 1);
        assert_eq!(
            bytes_of(latest).await.unwrap(),
            artifact_bytes("hist", &latest_tag)
        );
    }
}

/// Gitea looks tags up ignoring case (CONTRACT.md §4.4) and a version is its tag as written:
/// `V1.0.0` is not `v1.0.0`, and where both are releases each is downloaded as itself.
#[tokio::test]
async fn tags_differing_in_case_are_different_versions() {
    let repo = SimRepo::new("case_prov").release(SimRelease::new("v1.0.0", T0).artifact("case"));
    let sim = GiteaSim::start(SimConfig::new(ORG).repo(repo)).await;
    let b = backend(&sim.gitea_config());
    let case = provider("case");
    assert!(download(&b, &case, "V1.0.0")
        .await
        .unwrap_err()
        .is_not_found());
    assert_eq!(sim.calls().release_by_tag, 1);
    assert!(download(&b, &case, "v1.0.0").await.is_ok());

    let both = SimRepo::new("case_prov")
        .release(SimRelease::new("v1.0.0", T0).artifact("case"))
        .release(SimRelease::new("V1.0.0", T0 + 1).artifact("case"));
    let sim = GiteaSim::start(SimConfig::new(ORG).repo(both)).await;
    let b = backend(&sim.gitea_config());
    for tag in ["v1.0.0", "V1.0.0"] {
        let artifact = download(&b, &case, tag).await.unwrap();
        assert_eq!(
            bytes_of(artifact).await.unwrap(),
            artifact_bytes("case", tag)
        );
    }
}

#[tokio::test]
async fn a_reuploaded_sidecar_is_read_again() {
    let repo = SimRepo::new("fix_prov")
        .release(
            SimRelease::new("1.0.0", T0)
                .artifact("fix")
                .sha256_sidecar(true),
        )
        .release(
            SimRelease::new("1.1.0", T0 + 10)
                .artifact("fix")
                .sha256_sidecar(true),
        );
    let sim = GiteaSim::start(SimConfig::new(ORG).repo(repo)).await;
    let b = backend(&sim.gitea_config());
    let fix = provider("fix");
    let digest = |bytes: &[u8]| Some(format!("sha256:{}", sha256_hex(bytes)));

    let before = versions(&b, &fix).await.unwrap();
    assert_eq!(before[0].checksum, digest(&artifact_bytes("fix", "1.1.0")));
    assert_eq!(sim.calls().downloads, 2);

    // The publisher replaces 1.1.0's sidecar: a new attachment under the same name and URL.
    let rebuilt = b"fix 1.1.0, rebuilt";
    sim.reupload(
        "fix_prov",
        "1.1.0",
        "fix-1.1.0.tar.gz.sha256",
        format!("{}  fix-1.1.0.tar.gz\n", sha256_hex(rebuilt)),
    );
    let after = versions(&b, &fix).await.unwrap();
    assert_eq!(after[0].checksum, digest(rebuilt));
    assert_eq!(after[1].checksum, before[1].checksum);
    // Only the replaced sidecar was read again.
    assert_eq!(sim.calls().downloads, 3);
    let reads = sim.seen_at(".sha256");
    assert!(reads[2].target.contains("/1.1.0/"), "{reads:?}");
}

/// A log line another test's thread reaches first, while this test alone captures, is
/// captured all the same (tracing once switched it off for every thread).
#[test]
fn a_log_line_first_reached_on_a_thread_without_a_capture_is_captured() {
    fn say() {
        tracing::warn!(seen = "by the capture", "a line two threads reach");
    }
    let logs = logs::LogCapture::start();
    std::thread::spawn(say).join().unwrap();
    say();
    logs.assert_line_with(&["a line two threads reach", "by the capture"]);
}

/// An instance that names a next page on every page: the chain is cut at 200 pages (10,000
/// repositories at 50 a page), not followed to its end.
#[tokio::test]
async fn a_pagination_chain_past_200_pages_is_refused() {
    let sim = GiteaSim::start(SimConfig::new(ORG).repos(seeded_org(3))).await;
    let b = backend(&sim.gitea_config());
    sim.set_mode(Mode::RunawayPages);
    let err = list(&b).await.map(|l| l.len()).unwrap_err();
    assert!(
        matches!(&err, RegistryError::BackendUnavailable { backend: Source::Gitea, reason, .. } if reason.contains("passes 200 pages")),
        "{err}"
    );
    assert_eq!(sim.calls().org_repos, 200);
}

/// Pages each well under the 16 MiB cap still stop once one list has read 32 MiB of them.
#[tokio::test]
async fn the_pages_of_one_list_are_read_up_to_32_mib_in_all() {
    let mut big = SimRepo::new("big_prov").release(SimRelease::new("1.0.0", T0).artifact("big"));
    big.description = "x".repeat(512 * 1024);
    let sim = GiteaSim::start(SimConfig::new(ORG).repos(seeded_org(2)).repo(big)).await;
    let b = backend(&sim.gitea_config());
    sim.set_mode(Mode::RunawayPages);
    // (Only lengths are unwrapped: a failure must not print the pages.)
    let err = list(&b).await.map(|l| l.len()).unwrap_err();
    assert!(
        matches!(&err, RegistryError::BackendUnavailable { backend: Source::Gitea, reason, .. } if reason.contains("larger than 33554432 bytes in all")),
        "{err}"
    );
    // A little over 512 KiB a page: some 63 pages are read, not the 300 offered.
    let pages = sim.calls().org_repos;
    assert!((62..=64).contains(&pages), "{pages}");
}

#[tokio::test]
async fn a_listing_that_meets_a_rate_limit_fails_as_suspended_not_with_holes() {
    // A rate-limiting proxy's budget runs out in the middle of the listing: one repository's
    // releases are refused with 429. Leaving it out would cache a listing with a hole as
    // complete; suspended, the cache above serves the listing it holds. Read one at a time,
    // the repositories after it are not asked for.
    let mut repos = seeded_org(3);
    repos[1].throttled = Some(30);
    let sim = GiteaSim::start(SimConfig::new(ORG).repos(repos)).await;
    let b = backend(&GiteaConfig {
        max_concurrency: 1,
        ..sim.gitea_config()
    });
    let err = list(&b).await.unwrap_err();
    let RegistryError::BackendSuspended {
        backend: Source::Gitea,
        retry_after,
        ..
    } = &err
    else {
        panic!("a rate limit suspends the listing: {err:?}");
    };
    assert_eq!(*retry_after, Duration::from_secs(30));
    assert_eq!(sim.calls().releases, 2, "{:?}", sim.calls());
}

/// The whole service over a simulator, with every answer stale as soon as it is cached (TTL 0)
/// and every refresh waited for, so a failing backend shows at the next request.
fn service_over(sim: &GiteaSim) -> extension_registry::stack::HttpService {
    let text = format!(
        "[gitea]\nurl = {:?}\norganization = {ORG:?}\n[rate_limit]\nenabled = false\n",
        sim.url()
    );
    let mut config = Config::parse(&text, "test.toml", None).unwrap();
    config.cache.ttl_seconds = 0;
    config.cache.stale_while_revalidate_seconds = 0;
    extension_registry::build(&config).unwrap()
}

#[tokio::test]
async fn a_listing_whose_releases_all_fail_is_served_stale_not_empty() {
    let sim = GiteaSim::start(SimConfig::new(ORG).repos(seeded_org(3))).await;
    let service = service_over(&sim);
    let fresh = app::get(&service, "/api/v1/extensions").await;
    assert_eq!(fresh.status, 200);
    assert_eq!(fresh.header("x-total-count"), "3");

    sim.set_mode(Mode::FailingReleases);
    let before = sim.requests_about("releases");
    let stale = app::get(&service, "/api/v1/extensions").await;
    assert!(
        sim.requests_about("releases") > before,
        "the refresh reached Gitea"
    );
    assert_eq!(stale.status, 200, "{:?}", stale.body);
    assert!(
        stale.header("cache-status").contains("fwd=stale"),
        "{:?}",
        stale.headers
    );
    assert_eq!(stale.header("x-total-count"), "3");
    assert_eq!(stale.body, fresh.body);

    // Never cached: nothing to stand in, so the failure stands.
    let cold = app::get(&service_over(&sim), "/api/v1/extensions").await;
    assert_eq!(cold.status, 502, "{:?}", cold.body);
    assert_eq!(cold.json()["error"], "backend_unavailable");
}
