//! A whole cluster: three replicas of the release binary (separate processes and ports), one
//! real `redis-server` and the Gitea simulator. Cold listings fan out once over the cluster,
//! an answer fetched by one replica is served by the others, an invalidation reaches every
//! replica, and losing Redis costs no answer.

#[allow(dead_code)]
#[path = "support/gitea_sim.rs"]
mod gitea_sim;
#[path = "support/redis.rs"]
mod redis_server;

use std::process::{Child, Command, Stdio};

use gitea_sim::{seeded_org, Calls, GiteaSim, SimConfig};
use redis_server::{until, RedisServer};

/// Extension repositories in the simulated organization.
const EXTENSIONS: usize = 30;

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
    let mut text = format!(
        "[server]\nhost = \"127.0.0.1\"\n[rate_limit]\nenabled = false\n\
         [gitea]\nurl = {:?}\norganization = \"extensions\"\n",
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
    drop(alone);

    let gitea = GiteaSim::start(org()).await;
    let mut redis = RedisServer::start().await;
    let shared = config(dir.path(), &gitea, Some(&redis));
    let replicas = [
        start(&shared).await,
        start(&shared).await,
        start(&shared).await,
    ];
    for replica in &replicas {
        until("the replica sees redis", || async {
            health(replica).await == ("healthy".into(), "healthy".into())
        })
        .await;
    }

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
    assert_eq!(
        (after.0 - before.0, after.1 - before.1, after.2 - before.2),
        one_listing,
        "the cluster fanned out once"
    );

    // Fetched through A, served by B and C without a backend call.
    let one = "/api/v1/extensions/provider/ext000";
    let through_a = json(&replicas[0], one).await;
    let calls = gitea.calls();
    assert_eq!(json(&replicas[1], one).await, through_a);
    assert_eq!(json(&replicas[2], one).await, through_a);
    assert_eq!(listing_calls(gitea.calls()), listing_calls(calls));

    // An invalidation of ext000 (published as a replica would) empties B's and C's copies.
    let entries = |stats: serde_json::Value| stats["metadata_entries"].as_u64().unwrap();
    for replica in &replicas[1..] {
        assert_eq!(entries(json(replica, "/api/v1/cache/stats").await), 1);
    }
    let message =
        r#"{"v":1,"from":"a-replica","scope":"extension","type":"provider","name":"ext000"}"#;
    let receivers: i64 = redis
        .command(
            redis::cmd("PUBLISH")
                .arg("cluster:v1:invalidations")
                .arg(message),
        )
        .await;
    assert_eq!(receivers, 3);
    for replica in &replicas[1..] {
        until("the replica dropped ext000", || async {
            entries(json(replica, "/api/v1/cache/stats").await) == 0
        })
        .await;
    }

    // Redis killed: every replica answers, and says it is degraded.
    redis.stop();
    for replica in &replicas {
        for path in [
            "/api/v1/extensions",
            one,
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
