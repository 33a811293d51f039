//! Redis (or Valkey) shared by several replicas, so that they act as one registry: the
//! connection and its health here, the shared cache level and cluster-wide single-flight in
//! [`cache`], each client's quota counted across replicas in [`quota`], the invalidation bus
//! in [`bus`].
//!
//! Redis is never needed to answer. Every command is bounded by `timeout_milliseconds`; the
//! first one that fails or times out marks Redis unavailable (logged once), and from then on
//! commands are not sent at all, so a dead Redis costs at most one timeout per request under
//! way when it dies, not one per request. A Redis that answers but refuses writes (out of
//! memory under `noeviction`, a read-only replica after a failover, a failed snapshot, still
//! loading its data) is unavailable too: every use of it writes. A background probe (a `SET`
//! of `{key_prefix}v1:probe`, once a second) marks it available again (logged once) when it
//! takes a write. The connection reconnects by itself after an I/O error (redis-rs's
//! `ConnectionManager`); one that failed otherwise (a handshake refused: a wrong password, a
//! server that answered something that is not RESP) keeps giving its failure back, so each
//! probe answered with a failure (not a time-out) puts a new connection in its place.

pub mod bus;
pub mod cache;
pub mod quota;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{FromRedisValue, IntoConnectionInfo};
use serde::Serialize;

use crate::config::{ConfigError, RedisConfig, Secret};

/// The wire schema of everything this module writes; a replica only reads its own version, so
/// a rolling upgrade never reads a shape it does not know.
pub const SCHEMA_VERSION: u32 = 1;

/// How often an unavailable Redis is probed.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// The reply errors of a Redis that answers but takes no writes (see the module
/// documentation); any other reply error concerns one command only.
const REFUSING_WRITES: [&str; 5] = ["OOM", "READONLY", "MISCONF", "LOADING", "MASTERDOWN"];

/// The shared Redis: cheap to clone.
#[derive(Clone)]
pub struct Redis(Arc<Inner>);

struct Inner {
    /// For the subscriber's own connection (pub/sub needs one of its own).
    client: redis::Client,
    /// The connection commands go through; reconnects by itself after an I/O error, and is
    /// replaced after a failed probe. Read on every command, replaced only while no command
    /// is sent.
    connection: ArcSwap<ConnectionManager>,
    /// How `connection` (and each one put in its place) is made.
    manager: ConnectionManagerConfig,
    /// `key_prefix` plus the schema version.
    prefix: String,
    /// The key the probe writes.
    probe_key: String,
    /// The bound on every command.
    timeout: Duration,
    /// `false` while Redis is unavailable: no command is sent then.
    available: AtomicBool,
    /// Whether the probe task runs.
    probing: AtomicBool,
    config: RedisConfig,
}

/// The `redis` component of `/api/v1/health`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RedisStatus {
    Healthy,
    Unavailable,
}

impl Redis {
    /// Reads the password and prepares the connection; connects in the background (call within
    /// a Tokio runtime). Redis is counted unavailable until it first answers.
    pub fn connect(config: &RedisConfig) -> Result<Self, ConfigError> {
        let err = |message: String| ConfigError {
            file: "[redis]".into(),
            message,
        };
        let mut info = config
            .url
            .as_str()
            .into_connection_info()
            .map_err(|e| err(format!("url: {e}")))?;
        if let Some(path) = &config.password_path {
            let password = Secret::from_file(path, "[redis] password_path")?;
            let settings = info
                .redis_settings()
                .clone()
                .set_password(password.expose());
            info = info.set_redis_settings(settings);
        }
        let client = redis::Client::open(info).map_err(|e| err(format!("url: {e}")))?;
        let timeout = config.timeout();
        let manager = ConnectionManagerConfig::new()
            .set_response_timeout(Some(timeout))
            // Connecting happens in the background (probe, reconnect); a request never waits
            // for it longer than its own command's bound.
            .set_connection_timeout(Some(timeout.max(Duration::from_secs(1))))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(1));
        let connection = ConnectionManager::new_lazy_with_config(client.clone(), manager.clone())
            .map_err(|e| err(format!("cannot prepare the connection: {e}")))?;
        let prefix = format!("{}v{SCHEMA_VERSION}:", config.key_prefix);
        metrics::gauge!("redis_available").set(0.0);
        let redis = Self(Arc::new(Inner {
            client,
            connection: ArcSwap::from_pointee(connection),
            manager,
            probe_key: format!("{prefix}probe"),
            prefix,
            timeout,
            available: AtomicBool::new(false),
            probing: AtomicBool::new(false),
            config: config.clone(),
        }));
        redis.probe_in_background();
        Ok(redis)
    }

    /// The `[redis]` section it was built from.
    pub fn config(&self) -> &RedisConfig {
        &self.0.config
    }

    /// A key (or channel) under the prefix and schema version.
    pub fn key(&self, rest: &str) -> String {
        format!("{}{rest}", self.0.prefix)
    }

    pub fn status(&self) -> RedisStatus {
        if self.is_available() {
            RedisStatus::Healthy
        } else {
            RedisStatus::Unavailable
        }
    }

    pub fn is_available(&self) -> bool {
        self.0.available.load(Ordering::Acquire)
    }

    pub(crate) fn client(&self) -> &redis::Client {
        &self.0.client
    }

    /// Runs `cmd`, bounded by the timeout; `None` when Redis is unavailable (nothing is
    /// sent), fails or is too slow (then it is marked unavailable). Counted in
    /// `redis_commands_total{outcome}`.
    pub async fn run<T: FromRedisValue>(&self, cmd: &redis::Cmd) -> Option<T> {
        self.bounded(|mut connection| async move { cmd.query_async(&mut connection).await })
            .await
    }

    /// Runs `script` with its keys and arguments (`EVALSHA`, `EVAL` when Redis does not know
    /// it yet), like [`Redis::run`].
    pub async fn invoke<T: FromRedisValue>(
        &self,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> Option<T> {
        self.bounded(|mut connection| async move { invocation.invoke_async(&mut connection).await })
            .await
    }

    async fn bounded<T, F, Fut>(&self, command: F) -> Option<T>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        if !self.is_available() {
            count("skipped");
            return None;
        }
        let connection = ConnectionManager::clone(&self.0.connection.load());
        match tokio::time::timeout(self.0.timeout, command(connection)).await {
            Ok(Ok(value)) => {
                count("ok");
                Some(value)
            }
            Ok(Err(e)) => {
                let (outcome, unavailable) = failure(&e);
                count(outcome);
                if unavailable {
                    self.unavailable(&e.to_string());
                } else {
                    tracing::warn!(error = %e, "redis command failed");
                }
                None
            }
            Err(_) => {
                count("timeout");
                self.unavailable("command timed out");
                None
            }
        }
    }

    /// Marks Redis unavailable, logging once, and probes it until it answers.
    fn unavailable(&self, reason: &str) {
        if self.0.available.swap(false, Ordering::AcqRel) {
            tracing::warn!(
                reason,
                "redis unavailable; each replica goes on alone until it answers again"
            );
            metrics::gauge!("redis_available").set(0.0);
        }
        self.probe_in_background();
    }

    fn probe_in_background(&self) {
        if self.0.probing.swap(true, Ordering::AcqRel) {
            return;
        }
        tokio::spawn(probe(Arc::downgrade(&self.0)));
    }
}

/// How a failed command is counted in `redis_commands_total`, and whether it says Redis is
/// unavailable: an I/O error, a connection that must be made again (dropped, its handshake
/// refused, its replies not RESP), or a refusal to write. Other reply errors (a script's, a
/// wrong type) concern that command only.
fn failure(e: &redis::RedisError) -> (&'static str, bool) {
    if e.is_timeout() {
        return ("timeout", true);
    }
    let refuses_writes = e.code().is_some_and(|code| REFUSING_WRITES.contains(&code));
    (
        "error",
        e.is_io_error() || e.is_unrecoverable_error() || refuses_writes,
    )
}

/// Writes the probe key until Redis takes it, then marks it available; ends with the
/// application. After each failed answer (not a time-out) the connection is replaced by a new
/// one, which the next probe makes (see the module documentation). Its first failure is
/// logged, with the reason: a Redis that never answers from start (or refuses this key) shows
/// in the log.
async fn probe(inner: Weak<Inner>) {
    let mut failed_before = false;
    loop {
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let mut connection = ConnectionManager::clone(&inner.connection.load());
        let write = redis::cmd("SET")
            .arg(&inner.probe_key)
            .arg(1)
            .arg("PX")
            .arg(PROBE_INTERVAL.as_millis() as u64)
            .clone();
        let answered = tokio::time::timeout(
            inner.timeout.max(Duration::from_secs(1)),
            write.query_async::<()>(&mut connection),
        )
        .await;
        let reason = match answered {
            Ok(Ok(())) => {
                inner.probing.store(false, Ordering::Release);
                inner.available.store(true, Ordering::Release);
                metrics::gauge!("redis_available").set(1.0);
                tracing::info!("redis available");
                return;
            }
            Ok(Err(e)) => {
                // A connection that answered with a failure is replaced; one still connecting
                // (a slow handshake) is left to finish for the next probe.
                inner.renew_connection();
                e.to_string()
            }
            Err(_) => "timed out".to_owned(),
        };
        if !std::mem::replace(&mut failed_before, true) {
            tracing::warn!(%reason, "redis probe failed; probing each second until it succeeds");
        }
        drop(inner);
        tokio::time::sleep(PROBE_INTERVAL).await;
    }
}

impl Inner {
    /// Puts a new connection, made on first use, in the place of the current one. Called only
    /// while Redis is unavailable, when no command goes through the connection.
    fn renew_connection(&self) {
        match ConnectionManager::new_lazy_with_config(self.client.clone(), self.manager.clone()) {
            Ok(fresh) => self.connection.store(Arc::new(fresh)),
            Err(e) => tracing::warn!(error = %e, "cannot prepare a new redis connection"),
        }
    }
}

fn count(outcome: &'static str) {
    metrics::counter!("redis_commands_total", "outcome" => outcome).increment(1);
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    fn reply_error(reply: &[u8]) -> redis::RedisError {
        redis::parse_redis_value(reply)
            .unwrap()
            .extract_error()
            .unwrap_err()
    }

    #[test]
    fn failures_are_counted_as_what_they_are() {
        let timed_out = redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut));
        assert_eq!(failure(&timed_out), ("timeout", true));
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert_eq!(failure(&redis::RedisError::from(reset)), ("error", true));
        // The connection's handshake was refused, or its replies were not RESP.
        for broken in [
            redis::ErrorKind::AuthenticationFailed,
            redis::ErrorKind::Parse,
        ] {
            let e = redis::RedisError::from((broken, "the connection failed"));
            assert_eq!(failure(&e), ("error", true));
        }
        for refusal in [
            &b"-OOM command not allowed when used memory > 'maxmemory'.\r\n"[..],
            b"-READONLY You can't write against a read only replica.\r\n",
            b"-MISCONF Redis is configured to save RDB snapshots\r\n",
            b"-LOADING Redis is loading the dataset in memory\r\n",
            b"-MASTERDOWN Link with MASTER is down\r\n",
            // Redis 7 keeps the code of a refusal inside a script.
            b"-OOM command not allowed when used memory > 'maxmemory'. script: 4f1c, on @user_script:3.\r\n",
        ] {
            assert_eq!(failure(&reply_error(refusal)), ("error", true));
        }
        let wrong_type = reply_error(b"-WRONGTYPE Operation against a key\r\n");
        assert_eq!(failure(&wrong_type), ("error", false));
        let script = reply_error(b"-ERR user_script:1: Script attempted to access key\r\n");
        assert_eq!(failure(&script), ("error", false));
    }

    /// A server that answers whatever it is sent with bytes that are not RESP; it counts the
    /// connections it takes.
    async fn garbling_server() -> (String, Arc<AtomicUsize>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("redis://{}", listener.local_addr().unwrap());
        let accepted = Arc::new(AtomicUsize::new(0));
        let counted = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut request = [0; 1024];
                    while socket.read(&mut request).await.is_ok_and(|n| n > 0) {
                        if socket.write_all(b"?not resp\r\n").await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        (url, accepted)
    }

    #[tokio::test]
    async fn a_connection_that_failed_otherwise_than_by_io_is_replaced_after_each_probe() {
        let (url, accepted) = garbling_server().await;
        let text = format!("[local]\npath = \".\"\n[redis]\nurl = \"{url}\"\n");
        let config = crate::config::Config::parse(&text, "test", None).unwrap();
        let redis = Redis::connect(config.redis.as_ref().unwrap()).unwrap();
        // One connection's attempts (the first and its two retries) end in a parse error,
        // which it would give back to every later command; so each probe after the first
        // makes a new connection, with attempts of its own.
        for _ in 0..300 {
            if accepted.load(Ordering::SeqCst) >= 8 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            accepted.load(Ordering::SeqCst) >= 8,
            "no new connection after a failure"
        );
        assert_eq!(redis.status(), RedisStatus::Unavailable);
    }

    #[tokio::test]
    async fn redis_counts_as_unavailable_until_it_first_answers() {
        let recorder = crate::telemetry::recorder();
        let handle = recorder.handle();
        let _local = metrics::set_default_local_recorder(&recorder);
        let text = "[local]\npath = \".\"\n[redis]\nurl = \"redis://127.0.0.1:1\"\n";
        let config = crate::config::Config::parse(text, "test", None).unwrap();
        let redis = Redis::connect(config.redis.as_ref().unwrap()).unwrap();
        assert_eq!(redis.status(), RedisStatus::Unavailable);
        assert!(handle.render().contains("redis_available 0"));
    }
}
