//! Several instances of the backend kinds together, through the whole stack: two Gitea
//! simulators (`[[gitea]]` tables), a real `docker-registry` (`[oci]`) and a local directory
//! (`[local]`). Precedence by priority across instances, `source=` by kind and by instance
//! name, the `source` and `instance` fields, cache entries kept per instance, and one
//! instance down while the others serve, health saying which.

#[allow(dead_code)]
#[path = "support/app.rs"]
mod app;
#[allow(dead_code)]
#[path = "support/gitea_sim.rs"]
mod gitea_sim;
#[allow(dead_code)]
#[path = "support/logs.rs"]
mod logs;
#[path = "support/registry/mod.rs"]
mod registry;

use app::{get, probed, samples, Answer};
use extension_registry::config::Config;
use extension_registry::stack::HttpService;
use gitea_sim::{GiteaSim, Mode, SimConfig, SimRelease, SimRepo};
use http::StatusCode;
use registry::{Auth, Registry};

const NS: &str = "provisioning";

/// The bytes of `shared` 1.0.0 as forge `forge` holds them: the same version, another file.
fn shared_bytes(forge: &str) -> Vec<u8> {
    format!("shared 1.0.0 as {forge} holds it\n")
        .repeat(32)
        .into_bytes()
}

/// A forge holding `aws` at `aws_tag`, `shared` 1.0.0 (its own bytes) and `only` one
/// extension of its own.
async fn forge(name: &str, aws_tag: &str, only: &str) -> GiteaSim {
    let repos = vec![
        SimRepo::new("aws_prov").release(SimRelease::new(aws_tag, 1_735_689_600).artifact("aws")),
        SimRepo::new("shared_prov").release(
            SimRelease::new("1.0.0", 1_735_689_600)
                .asset("shared-1.0.0.tar.gz", shared_bytes(name))
                .sha256_sidecar(true),
        ),
        SimRepo::new(&format!("{only}_prov"))
            .release(SimRelease::new("0.1.0", 1_735_689_600).artifact(only)),
    ];
    GiteaSim::start(SimConfig::new("extensions").repos(repos)).await
}

/// Two forges, a registry and the sample directory, and the configuration over them:
/// `forge-b` first (priority 1), then `forge-a` (2), the registry (3), the directory (4).
struct Sources {
    forge_a: GiteaSim,
    forge_b: GiteaSim,
    _registry: Registry,
    config: Config,
}

async fn sources() -> Sources {
    let forge_a = forge("forge-a", "3.0.0", "alpha").await;
    let forge_b = forge("forge-b", "4.0.0", "beta").await;
    let registry = Registry::start(Auth::Anonymous).await;
    registry
        .push(
            &format!("{NS}/aws-provider"),
            "5.0.0",
            b"aws from the registry",
            &[],
        )
        .await;
    let gitea = |name: &str, sim: &GiteaSim, priority: u32| {
        format!(
            "[[gitea]]\nname = {name:?}\nurl = {:?}\norganization = \"extensions\"\n\
             priority = {priority}\ntimeout_seconds = 5\n",
            sim.url()
        )
    };
    let text = format!(
        "{}{}{}priority = 3\n[local]\npath = {:?}\npriority = 4\n[rate_limit]\nenabled = false\n",
        gitea("forge-a", &forge_a, 2),
        gitea("forge-b", &forge_b, 1),
        registry.oci_toml(NS, None),
        samples().display().to_string(),
    );
    let config = Config::parse(&text, "sources.toml", None).expect("valid configuration");
    Sources {
        forge_a,
        forge_b,
        _registry: registry,
        config,
    }
}

fn app(config: &Config) -> HttpService {
    extension_registry::build(config).expect("the backends build")
}

fn provenance(answer: &Answer) -> (String, String, String) {
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    let json = answer.json();
    let field = |name: &str| json[name].as_str().unwrap_or_default().to_owned();
    (field("source"), field("instance"), field("version"))
}

/// Asserts an error answer's status and how its message starts.
/// `key` of every item of a listing, in order.
fn each(listing: &Answer, key: &str) -> Vec<serde_json::Value> {
    let items = listing.json();
    let items = items.as_array().expect("a listing is an array");
    items.iter().map(|e| e[key].clone()).collect()
}

fn assert_error(answer: &Answer, status: StatusCode, message_start: &str) {
    assert_eq!(answer.status, status, "{:?}", answer.body);
    let json = answer.json();
    let message = json["message"].as_str().unwrap_or_default();
    assert!(message.starts_with(message_start), "{message}");
}

fn triple(source: &str, instance: &str, version: &str) -> (String, String, String) {
    (source.into(), instance.into(), version.into())
}

#[tokio::test]
async fn lookups_take_the_first_instance_by_priority_unless_source_names_a_kind_or_an_instance() {
    let sources = sources().await;
    let app = app(&sources.config);
    let aws = |query: &'static str| {
        let app = app.clone();
        async move { provenance(&get(&app, &format!("/api/v1/extensions/provider/aws{query}")).await) }
    };

    // forge-b has priority 1, though forge-a comes first in the file.
    assert_eq!(aws("").await, triple("gitea", "forge-b", "4.0.0"));
    // A kind: its instances, by priority.
    assert_eq!(
        aws("?source=gitea").await,
        triple("gitea", "forge-b", "4.0.0")
    );
    // An instance's name: that instance alone (and its own cache entry, not forge-b's).
    assert_eq!(
        aws("?source=forge-a").await,
        triple("gitea", "forge-a", "3.0.0")
    );
    assert_eq!(
        aws("?source=forge-b").await,
        triple("gitea", "forge-b", "4.0.0")
    );
    // Single-table sections are named after their kind.
    assert_eq!(aws("?source=oci").await, triple("oci", "oci", "5.0.0"));
    assert_eq!(aws("?source=local").await.1, "local");
    // Only one forge has `alpha`: found there whatever comes first.
    let alpha = get(&app, "/api/v1/extensions/provider/alpha?source=gitea").await;
    assert_eq!(provenance(&alpha), triple("gitea", "forge-a", "0.1.0"));
    let elsewhere = get(&app, "/api/v1/extensions/provider/alpha?source=forge-b").await;
    assert_eq!(elsewhere.status, StatusCode::NOT_FOUND);

    // Versions follow the same precedence.
    let versions = get(&app, "/api/v1/extensions/provider/aws/versions").await;
    assert_eq!(versions.json()[0]["version"], "4.0.0");
    let versions = get(
        &app,
        "/api/v1/extensions/provider/aws/versions?source=forge-a",
    )
    .await;
    assert_eq!(versions.json()[0]["version"], "3.0.0");

    // Downloads too: the same version from the first instance holding it, or the one named.
    let download = get(&app, "/api/v1/extensions/provider/shared/1.0.0").await;
    assert_eq!(download.status, StatusCode::OK);
    assert_eq!(download.body, shared_bytes("forge-b"));
    assert_eq!(
        sources.forge_a.calls().downloads,
        0,
        "forge-a not asked: forge-b held it"
    );
    let download = get(
        &app,
        "/api/v1/extensions/provider/shared/1.0.0?source=forge-a",
    )
    .await;
    assert_eq!(download.body, shared_bytes("forge-a"));
}

#[tokio::test]
async fn an_unknown_source_is_refused_with_what_is_accepted() {
    let sources = sources().await;
    let app = app(&sources.config);
    for uri in [
        "/api/v1/extensions?source=forge-c",
        "/api/v1/extensions/provider/aws?source=GITEA",
        "/api/v1/extensions/provider/aws/versions?source=forge",
        "/api/v1/extensions/provider/aws/1.0.0?source=x",
    ] {
        let refused = get(&app, uri).await;
        assert_eq!(refused.status, StatusCode::BAD_REQUEST, "{uri}");
        let json = refused.json();
        assert_eq!(json["error"], "invalid_parameter", "{uri}");
        let message = json["message"].as_str().unwrap();
        for accepted in ["gitea", "oci", "github", "local", "forge-a", "forge-b"] {
            assert!(message.contains(accepted), "{uri}: {message}");
        }
    }
}

#[tokio::test]
async fn listings_hold_every_instance_ordered_as_before_then_by_priority() {
    let sources = sources().await;
    let app = app(&sources.config);
    let listed = get(&app, "/api/v1/extensions?type=provider").await;
    assert_eq!(listed.status, StatusCode::OK);
    let rows: Vec<(String, String, String)> = listed
        .json()
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| ["aws", "shared"].contains(&e["name"].as_str().unwrap()))
        .map(|e| {
            let field = |n: &str| e[n].as_str().unwrap().to_owned();
            (field("name"), field("instance"), field("version"))
        })
        .collect();
    let row = |n: &str, i: &str, v: &str| (n.to_owned(), i.to_owned(), v.to_owned());
    let local_aws = provenance(&get(&app, "/api/v1/extensions/provider/aws?source=local").await);
    assert_eq!(
        rows,
        [
            // By name, then kind (gitea, oci, github, local), then version, then priority.
            row("aws", "forge-a", "3.0.0"),
            row("aws", "forge-b", "4.0.0"),
            row("aws", "oci", "5.0.0"),
            row("aws", "local", &local_aws.2),
            row("shared", "forge-b", "1.0.0"),
            row("shared", "forge-a", "1.0.0"),
        ]
    );
    let by_kind = get(&app, "/api/v1/extensions?type=provider&source=gitea").await;
    let instances = each(&by_kind, "instance");
    assert!(
        instances.iter().all(|i| i == "forge-a" || i == "forge-b"),
        "{instances:?}"
    );
    assert_eq!(instances.len(), 6, "three extensions in each forge");
    let by_name = get(&app, "/api/v1/extensions?type=provider&source=forge-b").await;
    let names = each(&by_name, "name");
    assert_eq!(names, ["aws", "beta", "shared"]);
}

#[tokio::test]
async fn one_instance_down_leaves_the_others_serving_and_health_names_it() {
    let mut sources = sources().await;
    sources.config.circuit_breaker.failure_threshold = 2;
    sources.forge_b.set_mode(Mode::ServerError);
    let app = app(&sources.config);
    probed(&app).await;

    // forge-b comes first but fails: forge-a's answer is served, the fault said in Cache-Status.
    let aws = get(&app, "/api/v1/extensions/provider/aws").await;
    assert_eq!(provenance(&aws), triple("gitea", "forge-a", "3.0.0"));
    assert!(
        aws.header("cache-status").contains("fwd=stale"),
        "{:?}",
        aws.headers
    );
    let pinned = get(&app, "/api/v1/extensions/provider/aws?source=forge-b").await;
    // The message names the instance that failed, not just its kind.
    assert_error(
        &pinned,
        StatusCode::BAD_GATEWAY,
        "gitea backend 'forge-b' unavailable: ",
    );
    // Two faults: forge-b's breaker opens, and it alone is no longer called.
    let calls = sources.forge_b.calls().api;
    let cut_off = get(&app, "/api/v1/extensions/provider/beta?source=forge-b").await;
    // The breaker's refusal names it too.
    assert_error(
        &cut_off,
        StatusCode::SERVICE_UNAVAILABLE,
        "gitea backend 'forge-b' unavailable: ",
    );
    assert_eq!(
        sources.forge_b.calls().api,
        calls,
        "no call past an open breaker"
    );
    let alpha = get(&app, "/api/v1/extensions/provider/alpha?source=forge-a").await;
    assert_eq!(provenance(&alpha).1, "forge-a");
    let listed = get(&app, "/api/v1/extensions?source=forge-a").await;
    assert_eq!(listed.status, StatusCode::OK);
    assert_eq!(listed.json().as_array().unwrap().len(), 3);

    let health = get(&app, "/api/v1/health").await;
    assert_eq!(health.status, StatusCode::OK);
    let json = health.json();
    assert_eq!(json["status"], "degraded");
    let backends = &json["backends"];
    assert_eq!(backends["forge-b"]["healthy"], false);
    assert_eq!(backends["forge-b"]["kind"], "gitea");
    assert_eq!(backends["forge-b"]["circuit"], "open");
    for up in ["forge-a", "oci", "local"] {
        assert_eq!(backends[up]["healthy"], true, "{up}: {backends}");
        assert_eq!(backends[up]["enabled"], true, "{up}");
        assert_eq!(backends[up]["circuit"], "closed", "{up}");
    }
    assert_eq!(backends["forge-a"]["kind"], "gitea");
    assert!(
        backends["oci"].get("kind").is_none(),
        "named after its kind"
    );
    // The kinds with no instance are listed as before, disabled; `gitea` is no instance here.
    assert_eq!(backends["github"]["enabled"], false);
    assert!(backends.get("gitea").is_none(), "{backends}");
}

#[tokio::test]
async fn the_single_table_health_body_keeps_its_shape() {
    let sources = sources().await;
    let text = format!(
        "[gitea]\nurl = {:?}\norganization = \"extensions\"\n[local]\npath = {:?}\n",
        sources.forge_a.url(),
        samples().display().to_string()
    );
    let config = Config::parse(&text, "single.toml", None).unwrap();
    let app = app(&config);
    probed(&app).await;
    let json = get(&app, "/api/v1/health").await.json();
    let keys: Vec<_> = json["backends"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    assert_eq!(keys, ["gitea", "github", "local", "oci"]);
    assert_eq!(json["backends"]["gitea"]["enabled"], true);
    assert_eq!(json["backends"]["oci"]["enabled"], false);
    let aws = get(&app, "/api/v1/extensions/provider/aws").await;
    assert_eq!(provenance(&aws), triple("gitea", "gitea", "3.0.0"));

    // The single instance's faults read as they always did: named by the kind alone.
    sources.forge_a.set_mode(Mode::ServerError);
    let down = get(&app, "/api/v1/extensions/provider/alpha?source=gitea").await;
    assert_error(
        &down,
        StatusCode::BAD_GATEWAY,
        "gitea backend unavailable: ",
    );
}

#[tokio::test]
async fn a_digest_mismatch_is_counted_under_the_instance_that_served_it() {
    let bad = SimRepo::new("tampered_prov").release(
        SimRelease::new("1.0.0", 1_735_689_600)
            .artifact("tampered")
            .sha256_sidecar(false),
    );
    let sim = GiteaSim::start(SimConfig::new("extensions").repo(bad)).await;
    let text = format!(
        "[[gitea]]\nname = \"forge-tampered\"\nurl = {:?}\norganization = \"extensions\"\n\
         [rate_limit]\nenabled = false\n",
        sim.url()
    );
    let app = app(&Config::parse(&text, "tampered.toml", None).unwrap());
    let request = http::Request::get("/api/v1/extensions/provider/tampered/1.0.0")
        .body(extension_registry::body::empty())
        .unwrap();
    let response = tower::ServiceExt::oneshot(app.clone(), request)
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let streamed = http_body_util::BodyExt::collect(response.into_body()).await;
    assert!(streamed.is_err(), "the download ends in an error");
    let metrics = String::from_utf8(get(&app, "/api/v1/metrics").await.body.to_vec()).unwrap();
    assert!(
        metrics.contains("download_digest_mismatch_total{backend=\"forge-tampered\"} 1"),
        "{}",
        metrics
            .lines()
            .filter(|l| l.contains("mismatch"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}
