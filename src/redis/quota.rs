//! The quota shared by the replicas: each client's GCRA state (the algorithm the local
//! governor uses, with the same rate and burst) kept in Redis, so a client with burst B gets B
//! across all replicas, not one B per replica.
//!
//! One decision is one atomic server-side script ([`GCRA`], sent as `EVALSHA`, as `EVAL` when
//! Redis does not know it yet, e.g. after a restart): it reads Redis's own clock (`TIME`), so
//! the replicas' clocks do not matter, and keeps the client's theoretical arrival time (TAT,
//! microseconds) under `{key_prefix}v1:rl:{route class}:{client}`, expiring when the client's
//! burst is full again. There is one route class today, `api`: the local quota, too, is one
//! per client for every limited route.
//!
//! The rate-limit layer asks this quota after the local one let a request through (the local
//! one refuses a flooding client without a round trip); when Redis does not answer within
//! `timeout_milliseconds`, the local decision stands.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;

use super::Redis;
use crate::config::RateLimitConfig;
use crate::middleware::rate_limit::{SharedDecision, SharedQuota};

/// The route class of every limited route (see the module documentation).
const ROUTE_CLASS: &str = "api";

/// GCRA, one decision. `KEYS[1]`: the client's key; `ARGV`: the emission interval (µs per
/// request), the burst, the cost of this request. Answers `{allowed, remaining, wait µs,
/// reset µs}`: `wait` until the request would fit (0 when allowed), `reset` until the burst is
/// full again.
const GCRA: &str = r"
local now = redis.call('TIME')
now = tonumber(now[1]) * 1000000 + tonumber(now[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + cost * interval
local over = new_tat - now - burst * interval
if over > 0 then
  return {0, 0, over, tat - now}
end
local reset = new_tat - now
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil(reset / 1000))
return {1, math.floor((burst * interval - reset) / interval), 0, reset}
";

/// See the module documentation.
#[derive(Clone)]
pub struct RedisQuota(Arc<State>);

struct State {
    redis: Redis,
    script: redis::Script,
    /// Microseconds to earn back one request.
    interval_us: u64,
    burst: u32,
}

impl RedisQuota {
    pub fn new(redis: Redis, config: &RateLimitConfig) -> Self {
        Self(Arc::new(State {
            redis,
            script: redis::Script::new(GCRA),
            interval_us: 1_000_000 / u64::from(config.requests_per_second.get()),
            burst: config.burst.get(),
        }))
    }
}

impl SharedQuota for RedisQuota {
    fn check(&self, client: IpAddr, cost: u32) -> BoxFuture<'static, Option<SharedDecision>> {
        let state = self.0.clone();
        Box::pin(async move {
            let key = state.redis.key(&format!("rl:{ROUTE_CLASS}:{client}"));
            let mut invocation = state.script.key(key);
            invocation.arg(state.interval_us).arg(state.burst).arg(cost);
            let (allowed, remaining, wait, reset): (u8, u32, u64, u64) =
                state.redis.invoke(&invocation).await?;
            Some(SharedDecision {
                allowed: allowed == 1,
                remaining,
                wait: Duration::from_micros(wait),
                reset: Duration::from_micros(reset),
            })
        })
    }
}
