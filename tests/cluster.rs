//! A whole cluster: three replicas of the release binary (separate processes and ports), one
//! real `redis-server` and the Gitea simulator. Cold listings fan out once over the cluster,
//! an answer fetched by one replica is served by the others, a webhook on one replica makes
//! every replica serve the new release at once (fetched once for the cluster), and losing
//! Redis costs no answer.

#[allow(dead_code)]
#[path = "support/gitea_sim.rs"]
mod gitea_sim;
#[allow(dead_code)]
#[path = "support/redis.rs"]
mod redis_server;

use std::process::{Child, Command, Stdio};

use gitea_sim::{seeded_org, token_file, Calls, GiteaSim, SimConfig, SimRelease};
use redis_server::{until, RedisServer};

/// Extension repositories in the simulated organization.
const EXTENSIONS: usize = 30;

/// The secret Gitea signs its webhooks with.
const HOOK_SECRET: &str = "cluster-hook-secret";

/// The extension a release is published for while the cluster runs.
const ONE: &str = "/api/v1/extensions/provider/ext000";

/// One replica process, killed on drop.
struct Replica {
    child: Child,
    base: String,
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// The configuration every replica runs with; `redis` absent for a replica standing alone.
fn config(
    dir: &std::path::Path,
    gitea: &GiteaSim,
    redis: Option<&RedisServer>,
) -> std::path::PathBuf {
    config_with(dir, gitea, redis, "enabled = false")
}

/// [`config`] with this `[rate_limit]` section.
fn config_with(
    dir: &std::path::Path,
    gitea: &GiteaSim,
    redis: Option<&RedisServer>,
    rate_limit: &str,
) -> std::path::PathBuf {
    let secret = token_file(dir, HOOK_SECRET);
    let mut text = format!(
        "[server]\nhost = \"127.0.0.1\"\n[rate_limit]\n{rate_limit}\n\
         [gitea]\nurl = {:?}\norganization = \"extensions\"\nwebhook_secret_path = {secret:?}\n",
        gitea.url()
    );
    if let Some(redis) = redis {
        text += &format!(
            "[redis]\nurl = {:?}\nkey_prefix = \"cluster:\"\ntimeout_milliseconds = 500\n",
            redis.url()
        );
    }
    let path = dir.join(format!("config-{}.toml", redis.is_some()));
    std::fs::write(&path, text).unwrap();
    path
}

async fn start(config: &std::path::Path) -> Replica {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_extension-registry"))
        .arg("--config")
        .arg(config)
        .args(["--port", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("the release binary starts");
    let replica = Replica {
        child,
        base: format!("http://127.0.0.1:{port}"),
    };
    until("the replica is ready", || async {
        status(&replica, "/readyz").await == Some(200)
    })
    .await;
    replica
}

async fn status(replica: &Replica, path: &str) -> Option<u16> {
    let response = reqwest::get(format!("{}{path}", replica.base)).await.ok()?;
    Some(response.status().as_u16())
}

async fn json(replica: &Replica, path: &str) -> serde_json::Value {
    reqwest::get(format!("{}{path}", replica.base))
        .await
        .expect("the replica answers")
        .json()
        .await
        .expect("a JSON body")
}

/// The calls that make up listings and lookups (the health probes' are left out).
fn listing_calls(calls: Calls) -> (u64, u64, u64) {
    (calls.org_repos, calls.repo, calls.releases)
}

/// What a listing or lookup cost Gitea since `before`.
fn since(gitea: &GiteaSim, before: (u64, u64, u64)) -> (u64, u64, u64) {
    let now = listing_calls(gitea.calls());
    (now.0 - before.0, now.1 - before.1, now.2 - before.2)
}

/// Publishes 2.0.0 of ext000 and tells `hooked` through a signed Gitea release event; returns
/// what Gitea was asked once every one of `replicas` serves 2.0.0 as ext000's current version
/// and among its versions.
async fn release_through_hook(
    gitea: &GiteaSim,
    hooked: &Replica,
    replicas: &[&Replica],
) -> (u64, u64, u64) {
    let before = listing_calls(gitea.calls());
    let release = gitea.publish(
        "ext000_prov",
        SimRelease::new("2.0.0", 1_800_000_000).artifact("ext000"),
    );
    let payload = gitea.release_payload("ext000_prov", "published", &release);
    let hook = format!("{}/api/v1/hooks/gitea", hooked.base);
    let delivered = gitea
        .deliver(&hook, "release", &payload, Some(HOOK_SECRET))
        .await;
    assert_eq!(delivered.status(), 200);
    for replica in replicas {
        until("the replica serves the new release", || async {
            let versions = json(replica, &format!("{ONE}/versions")).await;
            json(replica, ONE).await["version"] == "2.0.0"
                && versions
                    .as_array()
                    .is_some_and(|v| v.iter().any(|v| v["version"] == "2.0.0"))
        })
        .await;
    }
    since(gitea, before)
}

/// The invalidations a replica received from the others.
async fn peer_invalidations(replica: &Replica) -> u64 {
    let text = reqwest::get(format!("{}/api/v1/metrics", replica.base))
        .await
        .expect("the replica answers")
        .text()
        .await
        .expect("a body");
    text.lines()
        .filter(|l| l.starts_with("invalidations_total{") && l.contains("origin=\"peer\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Three replicas with `config`, once each sees Redis.
async fn three(config: &std::path::Path) -> [Replica; 3] {
    let replicas = [
        start(config).await,
        start(config).await,
        start(config).await,
    ];
    for replica in &replicas {
        until("the replica sees redis", || async {
            health(replica).await == ("healthy".into(), "healthy".into())
        })
        .await;
    }
    replicas
}

async fn health(replica: &Replica) -> (String, String) {
    let health = json(replica, "/api/v1/health").await;
    (
        health["status"].as_str().unwrap_or_default().to_owned(),
        health["redis"].as_str().unwrap_or_default().to_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_sharing_redis_act_as_one_registry() {
    let dir = tempfile::tempdir().unwrap();
    let org = || SimConfig::new("extensions").repos(seeded_org(EXTENSIONS));

    // What one cold listing costs a replica standing alone.
    let alone_gitea = GiteaSim::start(org()).await;
    let alone = start(&config(dir.path(), &alone_gitea, None)).await;
    let before = listing_calls(alone_gitea.calls());
    assert_eq!(status(&alone, "/api/v1/extensions").await, Some(200));
    let after = listing_calls(alone_gitea.calls());
    let one_listing = (after.0 - before.0, after.1 - before.1, after.2 - before.2);
    assert!(one_listing.2 >= EXTENSIONS as u64, "{one_listing:?}");
    // What refreshing one extension after a webhook costs it.
    assert_eq!(status(&alone, ONE).await, Some(200));
    assert_eq!(status(&alone, &format!("{ONE}/versions")).await, Some(200));
    let one_refresh = release_through_hook(&alone_gitea, &alone, &[&alone]).await;
    assert!(one_refresh.2 >= 1, "{one_refresh:?}");
    drop(alone);

    let gitea = GiteaSim::start(org()).await;
    let mut redis = RedisServer::start().await;
    let shared = config(dir.path(), &gitea, Some(&redis));
    let replicas = three(&shared).await;

    // 60 concurrent cold listings, round robin over the replicas: one listing's worth.
    let before = listing_calls(gitea.calls());
    let listings = (0..60).map(|i| {
        let url = format!("{}/api/v1/extensions", replicas[i % 3].base);
        tokio::spawn(async move { reqwest::get(url).await.unwrap().status().as_u16() })
    });
    for listing in futures_util::future::join_all(listings).await {
        assert_eq!(listing.unwrap(), 200);
    }
    let after = listing_calls(gitea.calls());
    let cluster = (after.0 - before.0, after.1 - before.1, after.2 - before.2);
    eprintln!(
        "cold listing, Gitea calls as (org repo pages, repo calls, release pages): \
         one replica {one_listing:?}, 60 over three replicas sharing Redis {cluster:?}"
    );
    assert_eq!(cluster, one_listing, "the cluster fanned out once");

    // Fetched through A, served by B and C without a backend call.
    let through_a = json(&replicas[0], ONE).await;
    let versions = format!("{ONE}/versions");
    json(&replicas[0], &versions).await;
    let calls = listing_calls(gitea.calls());
    for replica in &replicas[1..] {
        assert_eq!(json(replica, ONE).await, through_a);
        json(replica, &versions).await;
    }
    assert_eq!(since(&gitea, calls), (0, 0, 0));

    // A release announced to A by a webhook: B and C drop their copies (and take no old one
    // back from Redis), every replica serves the new release before any TTL ends, and the
    // cluster fetched it once, as one replica alone does.
    let received: Vec<u64> =
        futures_util::future::join_all(replicas.iter().map(peer_invalidations)).await;
    let all: Vec<&Replica> = replicas.iter().collect();
    let refresh = release_through_hook(&gitea, &replicas[0], &all).await;
    assert_eq!(
        refresh, one_refresh,
        "the cluster fetched the new release once"
    );
    for (replica, before) in replicas.iter().zip(&received).skip(1) {
        assert!(
            peer_invalidations(replica).await > *before,
            "{}",
            replica.base
        );
    }
    assert_eq!(
        peer_invalidations(&replicas[0]).await,
        received[0],
        "A's own is not received"
    );

    // Redis killed: every replica answers, and says it is degraded.
    redis.stop();
    for replica in &replicas {
        for path in [
            "/api/v1/extensions",
            ONE,
            "/api/v1/extensions/taskserv/ext001",
        ] {
            assert_eq!(status(replica, path).await, Some(200), "{path}");
        }
        until("health says degraded", || async {
            health(replica).await == ("degraded".into(), "unavailable".into())
        })
        .await;
        assert_eq!(status(replica, "/readyz").await, Some(200));
    }

    // Redis back: the replicas find it again by themselves and share answers again.
    redis.restart().await;
    for replica in &replicas {
        until("the replica sees redis again", || async {
            health(replica).await == ("healthy".into(), "healthy".into())
        })
        .await;
    }
    let other = "/api/v1/extensions/cluster/ext002";
    let through_a = json(&replicas[0], other).await;
    let calls = gitea.calls();
    assert_eq!(json(&replicas[1], other).await, through_a);
    assert_eq!(json(&replicas[2], other).await, through_a);
    assert_eq!(listing_calls(gitea.calls()), listing_calls(calls));
}

/// A client's burst in the quota test: with a refill of one request a second, its quota
/// within the test's span is this burst plus a request per second the test takes.
const BURST: u64 = 60;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_clients_quota_holds_across_three_replicas_behind_round_robin() {
    let dir = tempfile::tempdir().unwrap();
    let gitea = GiteaSim::start(SimConfig::new("extensions").repos(seeded_org(3))).await;
    let redis = RedisServer::start().await;
    let rate_limit = format!("requests_per_second = 1\nburst = {BURST}");
    let shared = config_with(dir.path(), &gitea, Some(&redis), &rate_limit);
    let replicas = three(&shared).await;

    // Three times the quota, round robin: within 10% of the quota gets through.
    let (mut through, mut refused) = (0, 0);
    for i in 0..3 * BURST as usize {
        match status(&replicas[i % 3], "/api/v1/extensions").await {
            Some(200) => through += 1,
            Some(429) => refused += 1,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(through + refused, 3 * BURST);
    assert!(
        through.abs_diff(BURST) <= BURST / 10,
        "{through} of {} let through, the quota is {BURST}",
        3 * BURST
    );
}

#[test]
fn the_operators_three_replica_config_is_valid_and_shares_everything() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/cluster/config.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let config =
        extension_registry::config::Config::parse(&text, "deploy/cluster/config.toml", None)
            .expect("deploy/cluster/config.toml is valid");
    let redis = config.redis.expect("[redis]");
    assert!(redis.enable_cache && redis.enable_rate_limit && redis.enable_invalidation);
    assert!(config.rate_limit.enabled && !config.rate_limit.trusted_proxies.is_empty());
}
