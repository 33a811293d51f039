//! Replicas sharing a real `redis-server`, in process: each replica is a whole application over
//! its own counting backend, so a test sees which replica asked its backends. The shared cache
//! level, cluster-wide single-flight, the shared quota, the invalidation bus, and what happens
//! when Redis dies and comes back.

#[allow(dead_code)]
#[path = "support/app.rs"]
mod app;
#[path = "support/redis.rs"]
mod redis_server;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use extension_registry::config::Config;
use extension_registry::redis::Redis;
use extension_registry::registry::{BackendRequest, BackendService, RegistryError, Source};
use extension_registry::stack::{self, HttpService};
use http::StatusCode;
use tokio::sync::Semaphore;
use tower::ServiceExt;

use app::{counting, get, local_backend, samples, send_request};
use redis_server::{until, RedisServer};

/// One replica: the app and how often its backend was asked.
struct Replica {
    app: HttpService,
    calls: Arc<AtomicUsize>,
}

impl Replica {
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

fn config(redis: &RedisServer, prefix: &str) -> Config {
    config_with(redis, prefix, "")
}

/// [`config`] with more sections.
fn config_with(redis: &RedisServer, prefix: &str, more: &str) -> Config {
    let text = format!(
        "[local]\npath = {:?}\n[cache]\nstale_while_revalidate_seconds = 0\n\
         [server]\nrequest_timeout_seconds = 10\n\
         [redis]\nurl = {:?}\nkey_prefix = {prefix:?}\ntimeout_milliseconds = 500\n{more}",
        samples().display().to_string(),
        redis.url(),
    );
    Config::parse(&text, "test.toml", None).expect("valid test configuration")
}

/// A replica over the sample extensions; `gate`, if given, holds every backend call until it
/// has a permit.
fn replica(config: &Config, gate: Option<Arc<Semaphore>>) -> Replica {
    replica_over(config, gate, false)
}

/// [`replica`], whose backend fails every call past the gate when `sick` (its health probe
/// still passes).
fn replica_over(config: &Config, gate: Option<Arc<Semaphore>>, sick: bool) -> Replica {
    let local = local_backend(&samples());
    // Counted as it is asked, before the gate: a test sees a call while it is held.
    let (backend, calls) = counting(BackendService::new(tower::service_fn(
        move |req: BackendRequest| {
            let (backend, gate) = (local.clone(), gate.clone());
            async move {
                if req == BackendRequest::Health {
                    return backend.oneshot(req).await;
                }
                if let Some(gate) = gate {
                    let _permit = gate.acquire().await;
                }
                if sick {
                    return Err(RegistryError::unavailable(Source::Local, "disk gone"));
                }
                backend.oneshot(req).await
            }
        },
    )));
    let redis = Redis::connect(config.redis.as_ref().unwrap()).expect("redis config");
    let app = stack::app_with(
        config,
        vec![(Source::Local, backend)],
        extension_registry::hooks::Keys::load(config).expect("secret files"),
        Some(redis),
    );
    Replica { app, calls }
}

async fn redis_status(replica: &Replica) -> (String, String) {
    let health = get(&replica.app, "/api/v1/health").await.json();
    (
        health["status"].as_str().unwrap_or_default().to_owned(),
        health["redis"].as_str().unwrap_or_default().to_owned(),
    )
}

async fn connected(replicas: &[&Replica]) {
    for replica in replicas {
        until("the replica sees redis", || async {
            redis_status(replica).await == ("healthy".into(), "healthy".into())
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_answer_fetched_by_one_replica_is_served_by_another_without_a_backend_call() {
    let redis = RedisServer::start().await;
    let config = config(&redis, "shared:");
    let (a, b) = (replica(&config, None), replica(&config, None));
    connected(&[&a, &b]).await;

    let from_a = get(&a.app, "/api/v1/extensions/provider/aws").await;
    assert_eq!(from_a.status, StatusCode::OK);
    assert_eq!(a.calls(), 1);
    let from_b = get(&b.app, "/api/v1/extensions/provider/aws").await;
    assert_eq!(from_b.status, StatusCode::OK);
    assert_eq!(from_b.json(), from_a.json());
    assert_eq!(b.calls(), 0, "B took A's answer from redis");

    // "Not found" is shared too.
    let missing = "/api/v1/extensions/provider/nope";
    assert_eq!(get(&a.app, missing).await.status, StatusCode::NOT_FOUND);
    assert_eq!(get(&b.app, missing).await.status, StatusCode::NOT_FOUND);
    assert_eq!((a.calls(), b.calls()), (2, 0));

    // Stored versioned, under the prefix, with when it was fetched.
    let stored: String = redis
        .command(redis::cmd("GET").arg("shared:v1:cache:get:provider/aws:any"))
        .await;
    let stored: serde_json::Value = serde_json::from_str(&stored).unwrap();
    assert!(stored["fetched_at_ms"].as_u64().unwrap() > 0);
    assert_eq!(stored["answer"]["extension"]["name"], "aws");
}

/// Sends `n` requests for `path`, alternating between `a` and `b`, whose backends `gate`
/// holds; lets the backends answer once one replica holds the lock and asks its backend and the
/// other has found the lock taken (seen as two more `SET`s in redis's command statistics: the
/// lock taken and the lock refused). The statuses.
async fn over_one_lock(
    redis: &RedisServer,
    (a, b): (&Replica, &Replica),
    gate: &Semaphore,
    path: &str,
    n: usize,
) -> Vec<StatusCode> {
    let sets = set_calls(redis, "calls").await;
    let requests: Vec<_> = (0..n)
        .map(|i| {
            let app = if i % 2 == 0 { &a.app } else { &b.app };
            let req: http::Request<extension_registry::body::Body> = http::Request::get(path)
                .body(extension_registry::body::empty())
                .unwrap();
            // The service's own future, spawned as it is: an `async` block around it would
            // have to be `Send` for every lifetime of the body's error type.
            tokio::spawn(app.clone().oneshot(req))
        })
        .collect();
    until("one replica asked its backend", || async {
        a.calls() + b.calls() == 1
    })
    .await;
    until("the other replica found the lock taken", || async {
        set_calls(redis, "calls").await >= sets + 2
    })
    .await;
    gate.add_permits(1000);
    let mut statuses = Vec::new();
    for request in requests {
        statuses.push(request.await.unwrap().unwrap().status());
    }
    statuses
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_cold_requests_over_two_replicas_make_one_backend_call() {
    let redis = RedisServer::start().await;
    let config = config(&redis, "flight:");
    let gate = Arc::new(Semaphore::new(0));
    let (a, b) = (
        replica(&config, Some(gate.clone())),
        replica(&config, Some(gate.clone())),
    );
    connected(&[&a, &b]).await;

    let statuses = over_one_lock(&redis, (&a, &b), &gate, "/api/v1/extensions", 40).await;
    assert!(
        statuses.iter().all(|s| *s == StatusCode::OK),
        "{statuses:?}"
    );
    assert_eq!(
        a.calls() + b.calls(),
        1,
        "one listing's worth of backend calls"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backend_fault_met_by_one_replica_is_given_to_those_waiting_on_it() {
    let redis = RedisServer::start().await;
    let config = config(&redis, "sick:");
    let gate = Arc::new(Semaphore::new(0));
    let (a, b) = (
        replica_over(&config, Some(gate.clone()), true),
        replica_over(&config, Some(gate.clone()), true),
    );
    connected(&[&a, &b]).await;

    let aws = "/api/v1/extensions/provider/aws";
    let statuses = over_one_lock(&redis, (&a, &b), &gate, aws, 2).await;
    assert_eq!(statuses, [StatusCode::BAD_GATEWAY; 2]);
    assert_eq!(
        a.calls() + b.calls(),
        1,
        "the waiting replica took the fault instead of asking its sick backend again"
    );
    // A request that did not wait asks its backend, even while a fault is kept (here for a
    // minute), on a replica that has not met it.
    let kept = r#"{"fault":"timeout","backend":"local","instance":null}"#;
    let fault = redis::cmd("SET")
        .arg("sick:v1:fault:get:provider/aws:any")
        .arg(kept)
        .arg("PX")
        .arg(60_000)
        .clone();
    let () = redis.command(&fault).await;
    let c = replica_over(&config, Some(gate.clone()), true);
    connected(&[&c]).await;
    assert_eq!(get(&c.app, aws).await.status, StatusCode::BAD_GATEWAY);
    assert_eq!(c.calls(), 1, "C did not wait: it asked its backend");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refresh_under_way_when_an_invalidation_arrives_does_not_share_its_old_answer() {
    let redis = RedisServer::start().await;
    let (config, _dir) = purging_config(&redis, "race:");
    let gate = Arc::new(Semaphore::new(0));
    let (a, b) = (replica(&config, Some(gate.clone())), replica(&config, None));
    connected(&[&a, &b]).await;

    // A holds the shared lock and asks its (held) backend, which reads the old state.
    let aws = "/api/v1/extensions/provider/aws";
    let refresh = tokio::spawn(
        a.app.clone().oneshot(
            http::Request::get(aws)
                .body(extension_registry::body::empty())
                .unwrap(),
        ),
    );
    until("A asked its backend", || async { a.calls() == 1 }).await;

    // The change is learnt (here by B) while A's refresh is under way.
    assert_eq!(
        send_request(&b.app, purge_aws()).await.status,
        StatusCode::OK
    );
    gate.add_permits(1);
    assert_eq!(refresh.await.unwrap().unwrap().status(), StatusCode::OK);

    // A's in-process cache drops the answer read before the change and asks again: the
    // backends, since Redis must not hold that answer either (it did: A took it back from
    // there, and every replica served it until it expired).
    assert_eq!(
        a.calls(),
        2,
        "A asked its backend again after the invalidation"
    );
    // What A fetched the second time is what the cluster shares from now on.
    assert_eq!(get(&b.app, aws).await.status, StatusCode::OK);
    assert_eq!(b.calls(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_invalidation_made_while_redis_is_frozen_reaches_the_cluster_once_it_answers() {
    let redis = RedisServer::start().await;
    let (config, _dir) = purging_config(&redis, "frozen:");
    let (a, b) = (replica(&config, None), replica(&config, None));
    connected(&[&a, &b]).await;
    let aws = "/api/v1/extensions/provider/aws";
    get(&a.app, aws).await;
    get(&b.app, aws).await;
    assert_eq!(
        (a.calls(), b.calls()),
        (1, 0),
        "B took A's answer from Redis"
    );

    // A learns of a change while Redis answers nothing: its commands time out.
    redis.signal("STOP");
    assert_eq!(
        send_request(&a.app, purge_aws()).await.status,
        StatusCode::OK
    );
    redis.signal("CONT");

    // Once Redis answers, A delivers it: the shared answer is dropped, A's own again (it may
    // have taken the old one back from Redis meanwhile) and B is told, so B drops its own
    // and asks again (Redis, or its backend). Before, B served the old answer from its own
    // cache, and both took it back from Redis, until it expired.
    let misses = metadata(&b, "metadata_misses").await;
    until("B drops its answer and asks again", || async {
        get(&a.app, aws).await;
        get(&b.app, aws).await;
        metadata(&b, "metadata_misses").await > misses
    })
    .await;
    assert!(a.calls() >= 2, "A asked its backend again");
}

/// [`config`] with the operators' purge (token `purge-t0ken`, in the directory returned),
/// without rate limiting, and without refreshing ahead, so the drop itself can be seen.
fn purging_config(redis: &RedisServer, prefix: &str) -> (Config, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("admin-token");
    std::fs::write(&token, "purge-t0ken\n").unwrap();
    // Not limited: a test polls the replicas for as long as a change takes.
    let admin = format!(
        "[admin]\ntoken_path = {:?}\n[rate_limit]\nenabled = false\n",
        token.display().to_string()
    );
    let mut config = config_with(redis, prefix, &admin);
    config.cache.refresh_on_invalidate = false;
    (config, dir)
}

/// The operators' purge of provider/aws.
fn purge_aws() -> http::Request<extension_registry::body::Body> {
    http::Request::post("/api/v1/cache/purge")
        .header("authorization", "Bearer purge-t0ken")
        .body(extension_registry::body::full(
            r#"{"type": "provider", "name": "aws"}"#,
        ))
        .unwrap()
}

/// How many `SET`s redis has run.
/// One of the `SET` command's statistics (`calls`, `rejected_calls`, …).
async fn set_calls(redis: &RedisServer, field: &str) -> u64 {
    let info: String = redis.command(redis::cmd("INFO").arg("commandstats")).await;
    info.lines()
        .find_map(|line| line.strip_prefix("cmdstat_set:"))
        .and_then(|stats| {
            stats
                .split(',')
                .find_map(|stat| stat.strip_prefix(field)?.strip_prefix('='))
        })
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_invalidation_on_the_bus_empties_every_replicas_cache_for_that_extension() {
    let redis = RedisServer::start().await;
    let mut config = config(&redis, "bus:");
    // Not refreshing ahead, so the drop itself can be seen (tests/cluster.rs shows the
    // refresh ahead after an invalidation, fetched once for the cluster).
    config.cache.refresh_on_invalidate = false;
    let (a, b) = (replica(&config, None), replica(&config, None));
    connected(&[&a, &b]).await;
    let aws = "/api/v1/extensions/provider/aws";
    get(&a.app, aws).await;
    get(&b.app, aws).await;
    assert_eq!((a.calls(), b.calls()), (1, 0));
    get(&a.app, "/api/v1/extensions/provider/upcloud").await;
    for replica in [&a, &b] {
        assert!(metadata(replica, "metadata_entries").await >= 1);
    }

    // Another replica (the test) announces a change of provider/aws, in the wire format.
    let message =
        r#"{"v":1,"from":"elsewhere","scope":"extension","type":"provider","name":"aws"}"#;
    until("both replicas subscribed", || async {
        let numsub: Vec<redis::Value> = redis
            .command(
                redis::cmd("PUBSUB")
                    .arg("NUMSUB")
                    .arg("bus:v1:invalidations"),
            )
            .await;
        matches!(numsub.get(1), Some(redis::Value::Int(2)))
    })
    .await;
    let receivers: i64 = redis
        .command(
            redis::cmd("PUBLISH")
                .arg("bus:v1:invalidations")
                .arg(message),
        )
        .await;
    assert_eq!(receivers, 2);
    until("B's cached provider/aws is dropped", || async {
        metadata(&b, "metadata_entries").await == 0
    })
    .await;
    until("A's cached provider/aws is dropped", || async {
        metadata(&a, "metadata_entries").await == 1
    })
    .await;
    // So B asks again (here the shared cache answers).
    let misses = metadata(&b, "metadata_misses").await;
    assert_eq!(get(&b.app, aws).await.status, StatusCode::OK);
    assert_eq!(metadata(&b, "metadata_misses").await, misses + 1);
    // A's upcloud stays: one hit more, no miss.
    let misses = metadata(&a, "metadata_misses").await;
    get(&a.app, "/api/v1/extensions/provider/upcloud").await;
    assert_eq!(metadata(&a, "metadata_misses").await, misses);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_that_refuses_writes_is_unavailable_until_it_takes_them_again() {
    let redis = RedisServer::start().await;
    let config = config(&redis, "full:");
    let a = replica(&config, None);
    connected(&[&a]).await;
    let set =
        |name: &str, value: &str| redis::cmd("CONFIG").arg("SET").arg(name).arg(value).clone();

    // Out of memory, evicting nothing: reads are answered, writes refused.
    let () = redis.command(&set("maxmemory-policy", "noeviction")).await;
    let () = redis.command(&set("maxmemory", "1")).await;
    let aws = "/api/v1/extensions/provider/aws";
    assert_eq!(get(&a.app, aws).await.status, StatusCode::OK);
    assert_eq!(
        redis_status(&a).await,
        ("degraded".into(), "unavailable".into()),
        "the first refused write marks redis unavailable"
    );
    let refused = set_calls(&redis, "rejected_calls").await;
    assert_eq!(get(&a.app, aws).await.status, StatusCode::OK);
    // The probe writes, so it does not take a Redis that answers for one that takes writes.
    until("the probe's write was refused", || async {
        set_calls(&redis, "rejected_calls").await > refused
    })
    .await;
    assert_eq!(
        redis_status(&a).await,
        ("degraded".into(), "unavailable".into())
    );

    let () = redis.command(&set("maxmemory", "0")).await;
    connected(&[&a]).await;
}

/// One number of a replica's `/api/v1/cache/stats`.
async fn metadata(replica: &Replica, field: &str) -> u64 {
    let stats = get(&replica.app, "/api/v1/cache/stats").await.json();
    stats[field]
        .as_u64()
        .unwrap_or_else(|| panic!("no {field} in {stats}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_redis_every_request_is_answered_and_redis_is_used_again_once_back() {
    let mut redis = RedisServer::start().await;
    let config = config(&redis, "outage:");
    let (a, b) = (replica(&config, None), replica(&config, None));
    connected(&[&a, &b]).await;

    redis.stop();
    for path in ["/api/v1/extensions", "/api/v1/extensions/provider/aws"] {
        for replica in [&a, &b] {
            assert_eq!(get(&replica.app, path).await.status, StatusCode::OK);
        }
    }
    for replica in [&a, &b] {
        until("health says degraded", || async {
            redis_status(replica).await == ("degraded".into(), "unavailable".into())
        })
        .await;
        assert_eq!(get(&replica.app, "/readyz").await.status, StatusCode::OK);
        let answer = get(&replica.app, "/api/v1/extensions/taskserv/cilium").await;
        assert_eq!(answer.status, StatusCode::OK);
    }

    redis.restart().await;
    connected(&[&a, &b]).await;
    let (before_a, before_b) = (a.calls(), b.calls());
    get(&a.app, "/api/v1/extensions/cluster/web").await;
    get(&b.app, "/api/v1/extensions/cluster/web").await;
    assert_eq!(a.calls(), before_a + 1);
    assert_eq!(b.calls(), before_b, "the shared cache is used again");
}

/// A burst far above what the rate of one request a second adds while a test runs, so a
/// client's quota within the test is its burst (give or take a request per second taken).
const BURST: usize = 30;

/// Sends `n` listings round robin over `replicas` (one client: in-process requests have no
/// peer address); returns how many were let through. Every answer is a 200 or a 429.
async fn through(replicas: &[&Replica], n: usize) -> usize {
    let mut through = 0;
    for i in 0..n {
        let answer = get(&replicas[i % replicas.len()].app, "/api/v1/extensions").await;
        match answer.status {
            StatusCode::OK => through += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                assert!(answer.header("retry-after").parse::<u64>().unwrap() >= 1);
                assert_eq!(answer.header("ratelimit-remaining"), "0");
            }
            other => panic!("{other}: {:?}", answer.body),
        }
    }
    through
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_clients_burst_holds_across_replicas_and_each_replica_limits_alone_without_redis() {
    let mut redis = RedisServer::start().await;
    let quota = format!("[rate_limit]\nrequests_per_second = 1\nburst = {BURST}\n");
    let config = config_with(&redis, "quota:", &quota);
    let replicas = [
        replica(&config, None),
        replica(&config, None),
        replica(&config, None),
    ];
    let all: Vec<&Replica> = replicas.iter().collect();
    connected(&all).await;

    // Three times the burst over three replicas: the burst, not three.
    let got = through(&all, 3 * BURST).await;
    assert!((BURST..=BURST + 2).contains(&got), "{got} let through");
    let state: String = redis
        .command(redis::cmd("GET").arg("quota:v1:rl:api:0.0.0.0"))
        .await;
    assert!(state.parse::<u64>().unwrap() > 0, "{state}");

    // Redis gone: no request fails, and each replica counts the client alone (these replicas
    // had no Redis from the start, so their own quotas are full).
    redis.stop();
    through(&all, 3 * BURST).await;
    let alone = [
        replica(&config, None),
        replica(&config, None),
        replica(&config, None),
    ];
    let alone: Vec<&Replica> = alone.iter().collect();
    let got = through(&alone, 3 * BURST).await;
    assert!(got >= 3 * BURST - 2, "{got} let through");
}
