//! The GitHub backend against the GitHub simulator: listing, lookups, versions and downloads;
//! the token kept off the storage host; private repositories; rate limits that stop the calls;
//! GitHub's digests instead of checksum files; conditional requests on refresh; and the
//! simulator's own fidelity to GitHub's OpenAPI description and paging.

#[allow(dead_code)]
#[path = "support/app.rs"]
mod app;
#[path = "support/github_sim.rs"]
mod github_sim;
#[allow(dead_code)]
#[path = "support/swagger.rs"]
mod swagger;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use extension_registry::backend::github::Github;
use extension_registry::config::{Config, GithubConfig};
use extension_registry::registry::{
    Artifact, BackendRequest, BackendResponse, Extension, ExtensionKey, ExtensionName,
    ExtensionType, ListFilter, RegistryError, Source, Version, VersionSelector,
};
use github_sim::{
    artifact_bytes, seeded_org, sha256_hex, GhCalls, GhConfig, GhRelease, GhRepo, GithubSim,
    Secondary,
};
use http_body_util::BodyExt;
use tower::ServiceExt;

const OWNER: &str = "provisioning-ext";
const TOKEN: &str = "ghp_simulatedtoken0123456789";
/// 2025-01-01T00:00:00Z.
const T0: i64 = 1_735_689_600;

fn backend(config: &GithubConfig) -> Github {
    Github::new(config).expect("backend")
}

fn token_file(dir: &Path) -> PathBuf {
    let path = dir.join("github-token");
    std::fs::write(&path, format!("{TOKEN}\n")).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    path
}

async fn ask(b: &Github, req: BackendRequest) -> Result<BackendResponse, RegistryError> {
    b.clone().oneshot(req).await
}

async fn list(b: &Github) -> Result<Vec<Extension>, RegistryError> {
    let l = ask(b, BackendRequest::List(ListFilter::default()))
        .await?
        .into_list()?;
    Ok(l.as_ref().clone())
}

fn provider(name: &str) -> ExtensionKey {
    ExtensionKey {
        ty: ExtensionType::Provider,
        name: ExtensionName::parse(name).unwrap(),
    }
}

async fn get(b: &Github, k: &ExtensionKey) -> Result<Arc<Extension>, RegistryError> {
    let req = BackendRequest::Get {
        key: k.clone(),
        source: Some(Source::Github.into()),
    };
    ask(b, req).await?.into_extension()
}

async fn versions(b: &Github, k: &ExtensionKey) -> Result<Arc<Vec<Version>>, RegistryError> {
    let req = BackendRequest::Versions {
        key: k.clone(),
        source: Some(Source::Github.into()),
    };
    ask(b, req).await?.into_versions()
}

async fn download(b: &Github, k: &ExtensionKey, v: &str) -> Result<Artifact, RegistryError> {
    let req = BackendRequest::Download {
        key: k.clone(),
        version: VersionSelector::parse(v).unwrap(),
        source: Some(Source::Github.into()),
        range: None,
    };
    ask(b, req).await?.into_artifact()
}

async fn bytes_of(artifact: Artifact) -> Bytes {
    artifact.body.collect().await.unwrap().to_bytes()
}

fn names(list: &[Extension]) -> Vec<String> {
    let mut names: Vec<String> = list.iter().map(|e| e.name.clone()).collect();
    names.sort();
    names
}

fn sample_org() -> GhConfig {
    GhConfig::new(OWNER)
        .token(TOKEN)
        .repo(
            GhRepo::new("aws_prov")
                .topic("cloud")
                .release(GhRelease::new("1.0.0", T0).artifact("aws"))
                .release(GhRelease::new("1.1.0", T0 + 10).artifact("aws"))
                .release(GhRelease::new("2.0.0", T0 + 20).artifact("aws").draft()),
        )
        .repo(
            GhRepo::new("k8s_taskserv")
                .release(GhRelease::new("0.3.0", T0).artifact_with_sidecar("k8s")),
        )
        .repo(
            GhRepo::new("old_prov")
                .archived()
                .release(GhRelease::new("1.0.0", T0).artifact("old")),
        )
        .repo(GhRepo::new("docs"))
        .repo(GhRepo::new("empty_cluster"))
}

#[tokio::test]
async fn lists_gets_versions_and_downloads_with_githubs_digest() {
    let sim = GithubSim::start(sample_org()).await;
    let b = backend(&sim.github_config());
    let listed = list(&b).await.unwrap();
    assert_eq!(names(&listed), ["aws", "k8s"]);
    let aws = listed.iter().find(|e| e.name == "aws").unwrap();
    assert_eq!(aws.source, Source::Github);
    assert_eq!(aws.version, "1.1.0");
    assert_eq!(aws.tags, ["cloud"]);

    let before = sim.calls();
    let one = get(&b, &provider("aws")).await.unwrap();
    let digest = format!("sha256:{}", sha256_hex(&artifact_bytes("aws", "1.1.0")));
    assert_eq!(one.checksum.as_deref(), Some(digest.as_str()));
    let vs = versions(&b, &provider("aws")).await.unwrap();
    let tags: Vec<&str> = vs.iter().map(|v| v.version.as_str()).collect();
    // The draft is not listed to an anonymous caller, nor ever a version.
    assert_eq!(tags, ["1.1.0", "1.0.0"]);
    assert!(vs.iter().all(|v| v.checksum.is_some()));
    // GitHub's digest stands in for a checksum file: no asset was fetched for metadata.
    assert_eq!(sim.calls().assets, before.assets);

    let artifact = download(&b, &provider("aws"), "1.0.0").await.unwrap();
    assert_eq!(artifact.filename, "aws-1.0.0.tar.gz");
    assert_eq!(bytes_of(artifact).await, artifact_bytes("aws", "1.0.0"));
    let calls = sim.calls();
    assert_eq!(calls.assets, before.assets + 1);
    assert_eq!(calls.storage, 1);
    assert_eq!(calls.storage_authorizations, 0);

    assert!(get(&b, &provider("old")).await.unwrap_err().is_not_found());
    assert!(get(&b, &provider("nosuch"))
        .await
        .unwrap_err()
        .is_not_found());
}

/// Downloads find their release in the repository's release pages, which are revalidated: a
/// version that does not exist, asked for again and again, costs nothing against the rate
/// limit once the pages are held (a lookup by tag would be a counted `404` each time).
#[tokio::test]
async fn downloads_of_a_missing_version_cost_no_counted_requests_once_pages_are_held() {
    let history = (0..250).fold(GhRepo::new("hist_prov"), |repo, i| {
        repo.release(GhRelease::new(&format!("1.{i}.0"), T0 + i).artifact("hist"))
    });
    let sim = GithubSim::start(GhConfig::new(OWNER).token(TOKEN).repo(history)).await;
    let b = backend(&sim.github_config());
    let hist = provider("hist");
    let artifact = download(&b, &hist, "1.7.0").await.unwrap();
    assert_eq!(bytes_of(artifact).await, artifact_bytes("hist", "1.7.0"));

    let held = sim.calls();
    for _ in 0..5 {
        assert!(download(&b, &hist, "9.9.9")
            .await
            .unwrap_err()
            .is_not_found());
    }
    let calls = sim.calls();
    assert_eq!(calls.counted, held.counted, "{calls:?}");
    // The repository and its 3 pages, each a `304`.
    assert_eq!(calls.not_modified - held.not_modified, 5 * 4);
}

#[tokio::test]
async fn without_a_digest_the_checksum_file_is_read_once() {
    let sim = GithubSim::start(sample_org()).await;
    let b = backend(&sim.github_config());
    let k8s = ExtensionKey {
        ty: ExtensionType::Taskserv,
        name: ExtensionName::parse("k8s").unwrap(),
    };
    let digest = format!("sha256:{}", sha256_hex(&artifact_bytes("k8s", "0.3.0")));
    assert_eq!(
        get(&b, &k8s).await.unwrap().checksum.as_deref(),
        Some(digest.as_str())
    );
    assert_eq!(
        get(&b, &k8s).await.unwrap().checksum.as_deref(),
        Some(digest.as_str())
    );
    let calls = sim.calls();
    assert_eq!((calls.assets, calls.storage), (1, 1), "{calls:?}");
    assert_eq!(calls.storage_authorizations, 0);
}

#[tokio::test]
async fn private_repositories_need_the_token_which_never_reaches_storage() {
    let dir = tempfile::tempdir().unwrap();
    let sim = GithubSim::start(
        sample_org().repo(
            GhRepo::new("secret_prov")
                .private()
                .release(GhRelease::new("1.0.0", T0).artifact("secret")),
        ),
    )
    .await;
    let anonymous = backend(&sim.github_config());
    assert!(!names(&list(&anonymous).await.unwrap()).contains(&"secret".to_owned()));
    assert!(get(&anonymous, &provider("secret"))
        .await
        .unwrap_err()
        .is_not_found());

    let with_token = backend(&GithubConfig {
        token_path: Some(token_file(dir.path())),
        ..sim.github_config()
    });
    assert!(names(&list(&with_token).await.unwrap()).contains(&"secret".to_owned()));
    let artifact = download(&with_token, &provider("secret"), "latest")
        .await
        .unwrap();
    assert_eq!(bytes_of(artifact).await, artifact_bytes("secret", "1.0.0"));
    let calls = sim.calls();
    assert!(calls.storage >= 1);
    assert_eq!(calls.storage_authorizations, 0, "{calls:?}");
}

#[tokio::test]
async fn an_exhausted_rate_limit_stops_the_calls_until_it_resets() {
    let sim = GithubSim::start(GhConfig::new(OWNER).repos(seeded_org(5, T0))).await;
    // One call at a time, so the answer saying nothing is left comes before the next call.
    let b = backend(&GithubConfig {
        max_concurrency: 1,
        ..sim.github_config()
    });
    // One org page and one releases call left: the listing needs six.
    sim.set_remaining(2);
    let err = list(&b).await.unwrap_err();
    let RegistryError::BackendSuspended {
        backend: Source::Github,
        retry_after,
        ..
    } = &err
    else {
        panic!("a rate limit suspends the backend: {err:?}");
    };
    assert!(*retry_after > Duration::from_secs(3000), "{retry_after:?}");
    let spent = sim.calls();
    assert_eq!(spent.counted, 2, "{spent:?}");
    // Once GitHub said nothing is left, nothing more is asked, whatever is requested.
    assert_eq!(spent.rate_limited, 0, "{spent:?}");
    for _ in 0..3 {
        assert!(matches!(
            list(&b).await,
            Err(RegistryError::BackendSuspended { .. })
        ));
        assert!(matches!(
            get(&b, &provider("ext000")).await,
            Err(RegistryError::BackendSuspended { .. })
        ));
    }
    assert_eq!(sim.calls(), spent);
}

#[tokio::test]
async fn a_refusal_for_the_rate_limit_suspends_without_a_retry_storm() {
    for status in [403, 429] {
        let config = GhConfig::new(OWNER)
            .exhausted_with(status)
            .repos(seeded_org(3, T0));
        let sim = GithubSim::start(config).await;
        let b = backend(&sim.github_config());
        sim.set_remaining(0);
        let err = list(&b).await.unwrap_err();
        assert!(
            err.retry_after()
                .is_some_and(|w| w > Duration::from_secs(3000)),
            "{status}: {err:?}"
        );
        assert!(matches!(
            get(&b, &provider("ext001")).await,
            Err(RegistryError::BackendSuspended { .. })
        ));
        let calls = sim.calls();
        assert_eq!(
            (calls.api, calls.rate_limited),
            (1, 1),
            "{status}: {calls:?}"
        );
    }
}

#[tokio::test]
async fn a_secondary_limit_waits_what_retry_after_says() {
    let sim = GithubSim::start(GhConfig::new(OWNER).repos(seeded_org(3, T0))).await;
    let b = backend(&sim.github_config());
    sim.set_secondary(Some(Secondary {
        status: 429,
        retry_after: Some(42),
    }));
    let err = list(&b).await.unwrap_err();
    assert_eq!(err.retry_after(), Some(Duration::from_secs(42)), "{err:?}");
    assert!(get(&b, &provider("ext000"))
        .await
        .unwrap_err()
        .retry_after()
        .is_some());
    assert_eq!(sim.calls().api, 1);

    // A 403 naming a secondary limit without retry-after waits a minute.
    let sim = GithubSim::start(GhConfig::new(OWNER).repos(seeded_org(1, T0))).await;
    let b = backend(&sim.github_config());
    sim.set_secondary(Some(Secondary {
        status: 403,
        retry_after: None,
    }));
    let err = list(&b).await.unwrap_err();
    assert_eq!(err.retry_after(), Some(Duration::from_secs(60)), "{err:?}");
}

/// The figure: a refresh of an unchanged organization of 300 repositories costs 303
/// counted requests without conditional requests (3 pages of repositories + 300 release lists)
/// and none with them (303 answers `304`, free on GitHub).
#[tokio::test]
async fn a_refresh_of_an_unchanged_organization_costs_no_counted_requests() {
    let sim = GithubSim::start(GhConfig::new(OWNER).repos(seeded_org(300, T0))).await;
    let b = backend(&sim.github_config());
    assert_eq!(list(&b).await.unwrap().len(), 300);
    let full = sim.calls();
    assert_eq!((full.counted, full.not_modified), (303, 0), "{full:?}");

    let again = list(&b).await.unwrap();
    assert_eq!(again.len(), 300);
    let refresh = sim.calls();
    let delta = GhCalls {
        api: refresh.api - full.api,
        counted: refresh.counted - full.counted,
        not_modified: refresh.not_modified - full.not_modified,
        ..GhCalls::default()
    };
    println!("refresh of 300 repositories: full {full:?}, revalidated {delta:?}");
    assert_eq!(
        (delta.api, delta.counted, delta.not_modified),
        (303, 0, 303)
    );
    assert_eq!(sim.remaining(), 5000 - 303);
}

/// Pages each under the 16 MiB cap still stop once one list has read 64 MiB of them.
#[tokio::test]
async fn the_pages_of_one_list_are_read_up_to_64_mib_in_all() {
    // 500 repositories of 140 KiB each: five pages of about 14 MiB.
    let mut repos = seeded_org(500, T0);
    for repo in &mut repos {
        repo.description = Some("x".repeat(140 * 1024));
    }
    let sim = GithubSim::start(GhConfig::new(OWNER).repos(repos)).await;
    let b = backend(&sim.github_config());
    // (Only lengths are unwrapped: a failure must not print the pages.)
    let err = list(&b).await.map(|l| l.len()).unwrap_err();
    assert!(
        matches!(&err, RegistryError::BackendUnavailable { backend: Source::Github, reason, .. } if reason.contains("larger than 67108864 bytes in all")),
        "{err}"
    );
    // The fifth page passes the budget: no release list is asked for.
    assert_eq!(sim.calls().api, 5, "{:?}", sim.calls());
}

#[tokio::test]
async fn enterprise_server_urls_work_and_health_reads_the_free_rate_limit() {
    let sim = GithubSim::start(GhConfig::new(OWNER).enterprise().repos(seeded_org(2, T0))).await;
    assert!(sim.url().ends_with("/api/v3"));
    let b = backend(&sim.github_config());
    assert_eq!(list(&b).await.unwrap().len(), 2);
    let before = sim.calls().counted;
    let report = ask(&b, BackendRequest::Health)
        .await
        .unwrap()
        .into_health()
        .unwrap();
    assert!(report.0[0].healthy, "{report:?}");
    assert_eq!(sim.calls().counted, before);
}

#[tokio::test]
async fn the_github_section_is_parsed_and_validated() {
    let ok = Config::parse(&format!("[github]\nowner = \"{OWNER}\"\n"), "t.toml", None).unwrap();
    let github = &ok.github[0];
    assert_eq!(github.api_url, "https://api.github.com");
    assert_eq!(github.timeout_seconds, 10);
    for (text, key) in [
        ("[github]\nowner = \"a b\"\n", "[github] owner"),
        (
            "[github]\nowner = \"o\"\napi_url = \"ftp://x/\"\n",
            "[github] api_url",
        ),
        (
            "[github]\nowner = \"o\"\nmax_concurrency = 0\n",
            "[github] max_concurrency",
        ),
    ] {
        let err = Config::parse(text, "t.toml", None).unwrap_err().to_string();
        assert!(err.contains(key), "{err}");
    }
}

/// Every body the simulator serves, fetched raw and checked against GitHub's description;
/// also its paging (100 a page, `Link` by rel, `[]` past the end) and `ETag`/`304`.
#[tokio::test]
async fn simulator_bodies_match_githubs_description() {
    let schema = swagger::Swagger::from_openapi("tests/fixtures/github/openapi-subset.json");
    let sim = GithubSim::start(sample_org().repos(seeded_org(250, T0))).await;
    let raw = reqwest::Client::new();
    let get_json = |path: String| {
        let req = raw
            .get(format!("{}{path}", sim.url()))
            .header("accept", "application/vnd.github+json");
        async move {
            let r = req.send().await.unwrap();
            let status = r.status().as_u16();
            let headers = r.headers().clone();
            let value: serde_json::Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
            (status, headers, value)
        }
    };
    let check = |definition: &str, value: &serde_json::Value| {
        if let Err(errors) = schema.validate(definition, value) {
            panic!("{definition}: {errors:#?}");
        }
    };
    let (status, headers, repos) = get_json(format!("/orgs/{OWNER}/repos?per_page=500")).await;
    assert_eq!(status, 200);
    assert_eq!(repos.as_array().unwrap().len(), 100);
    for repo in repos.as_array().unwrap() {
        check("minimal-repository", repo);
    }
    let link = headers["link"].to_str().unwrap();
    assert!(link.contains("page=2>; rel=\"next\""), "{link}");
    assert!(link.contains("page=3>; rel=\"last\""), "{link}");
    assert!(headers.contains_key("etag"));
    assert_eq!(headers["x-ratelimit-remaining"], "4999");
    let (status, _, past) = get_json("/organizations/1/repos?per_page=100&page=9".into()).await;
    assert_eq!((status, past), (200, serde_json::json!([])));

    let (_, _, repo) = get_json(format!("/repos/{OWNER}/aws_prov")).await;
    check("full-repository", &repo);
    let (_, _, releases) = get_json(format!("/repos/{OWNER}/aws_prov/releases")).await;
    for release in releases.as_array().unwrap() {
        check("release", release);
    }
    let asset_url = releases[0]["assets"][0]["url"].as_str().unwrap().to_owned();
    let asset = raw.get(&asset_url).send().await.unwrap();
    let asset: serde_json::Value = asset.json().await.unwrap();
    check("release-asset", &asset);
    let (_, _, k8s) = get_json(format!("/repos/{OWNER}/k8s_taskserv/releases")).await;
    assert!(k8s[0]["assets"][0]["digest"].is_null());
    check("release", &k8s[0]);
    let (status, _, missing) = get_json(format!("/repos/{OWNER}/nosuch")).await;
    assert_eq!(status, 404);
    check("basic-error", &missing);
    let (_, _, rate) = get_json("/rate_limit".into()).await;
    check("rate-limit-overview", &rate);

    // ETag/304: not charged.
    let first = raw
        .get(format!("{}/repos/{OWNER}/aws_prov", sim.url()))
        .send()
        .await
        .unwrap();
    let etag = first.headers()["etag"].clone();
    let before = sim.remaining();
    let second = raw
        .get(format!("{}/repos/{OWNER}/aws_prov", sim.url()))
        .header("if-none-match", etag)
        .send()
        .await
        .unwrap();
    assert_eq!(second.status(), 304);
    assert_eq!(sim.remaining(), before);
}

/// Through the whole service: `source=github`, the JSON `source` field, and a rate limit met
/// by an uncached request: `503` with `Retry-After`, GitHub not called again, the breaker shown
/// open by the health endpoint.
#[tokio::test]
async fn the_service_names_github_and_stops_calling_it_when_rate_limited() {
    let sim = GithubSim::start(sample_org()).await;
    let text = format!(
        "[github]\napi_url = {:?}\nowner = \"{OWNER}\"\n[rate_limit]\nenabled = false\n",
        sim.url()
    );
    let config = Config::parse(&text, "t.toml", None).unwrap();
    let service = extension_registry::build(&config).unwrap();
    let listed = app::get(&service, "/api/v1/extensions?source=github").await;
    assert_eq!(listed.status, 200);
    assert_eq!(app::field(&listed.json(), "source"), ["github", "github"]);
    let bad = app::get(&service, "/api/v1/extensions?source=gitlab").await;
    assert_eq!(bad.status, 400);
    assert!(String::from_utf8_lossy(&bad.body).contains("github"));

    sim.set_remaining(0);
    let refused = app::get(&service, "/api/v1/extensions/taskserv/k8s").await;
    assert_eq!(refused.status, 503, "{:?}", refused.body);
    assert!(refused.header("retry-after").parse::<u64>().unwrap() > 3000);
    let spent = sim.calls();
    let again = app::get(&service, "/api/v1/extensions/provider/aws/versions").await;
    assert_eq!(again.status, 503);
    assert_eq!(sim.calls().api, spent.api);
    let health = app::get(&service, "/api/v1/health").await.json();
    assert_eq!(health["backends"]["github"]["circuit"], "open", "{health}");
}

/// Every releases list failing is a failed listing, not an empty one: the service keeps
/// serving the listing it holds, marked stale (TTL 0, every refresh waited for), and a service
/// that holds none answers `502`.
#[tokio::test]
async fn a_listing_whose_releases_all_fail_is_served_stale_not_empty() {
    let sim = GithubSim::start(GhConfig::new(OWNER).repos(seeded_org(3, T0))).await;
    let service_over = |sim: &GithubSim| {
        let text = format!(
            "[github]\napi_url = {:?}\nowner = \"{OWNER}\"\n[rate_limit]\nenabled = false\n",
            sim.url()
        );
        let mut config = Config::parse(&text, "t.toml", None).unwrap();
        config.cache.ttl_seconds = 0;
        config.cache.stale_while_revalidate_seconds = 0;
        extension_registry::build(&config).unwrap()
    };
    let service = service_over(&sim);
    let fresh = app::get(&service, "/api/v1/extensions").await;
    assert_eq!(fresh.status, 200);
    assert_eq!(fresh.header("x-total-count"), "3");

    sim.set_failing_releases(true);
    let before = sim.calls().api;
    let stale = app::get(&service, "/api/v1/extensions").await;
    assert!(sim.calls().api > before, "the refresh reached GitHub");
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
