//! Rate limiting per client: a GCRA quota (governor) keyed by the client's address. Over the
//! quota the request is answered 429 from `call`, so nothing below does any work for it.
//!
//! The client is the connecting peer ([`PeerAddr`]), unless the peer is a trusted proxy:
//! then the right-most address in the configured `client_ip_header` (`X-Forwarded-For`,
//! `Forwarded` or `X-Real-IP`, and only that one) that is not itself a trusted proxy, so a
//! client cannot choose its key by prepending addresses nor by sending another header the
//! proxy passes through. IPv6 clients are
//! keyed by their /64, since one host usually holds a whole /64.
//!
//! A request that costs more than one (a batch resolve of n requirements costs n) is charged
//! one here, before its body is read, and the rest by its handler through the [`QuotaCharge`]
//! this layer puts in the request's extensions. Only a POST can ask for several answers at
//! once, so only a POST carries one.
//!
//! The per-client state is bounded: it is swept of idle clients at most once a second, and at
//! `max_clients` new clients share one overflow quota instead of getting their own entry.
//!
//! With a [`SharedQuota`] (Redis, `[redis] enable_rate_limit`), the replicas count each client
//! together: a request the local quota lets through is then decided by the shared one, and
//! answered exactly as the local quota answers (429, `Retry-After`, `RateLimit-*`). The local
//! quota stays in front as a pre-filter (a flooding client is refused without a round trip)
//! and decides alone while the shared one does not answer in time. The extra charge of a
//! batch ([`QuotaCharge`]) is taken from the local quota only.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::num::NonZeroU32;
use std::ops::Add;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use futures_util::future::BoxFuture;
use governor::clock::{Clock, Reference};
use governor::middleware::StateInformationMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::{DashMapStateStore, ShrinkableKeyedStateStore};
use governor::state::{NotKeyed, StateStore};
use governor::{Quota, RateLimiter};
use http::header::HeaderName;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use ipnet::IpNet;
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use crate::body::Body;
use crate::config::{ClientIpHeader, RateLimitConfig};
use crate::error::ApiError;
use crate::middleware::KeyHasher;

/// The address on the other end of the connection a request came on, set on every request by
/// the accept loop (`server`). Defined here, where it is read to tell clients apart, so the
/// limiter does not depend on the server that composes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerAddr(pub SocketAddr);

/// Counter of requests refused with 429.
pub const RATE_LIMITED_TOTAL: &str = "rate_limited_total";
/// Gauge of the clients whose quota state is kept, set at every sweep.
pub const RATE_LIMIT_CLIENTS: &str = "rate_limit_clients";
/// Counter of decisions, by which quota decided (`local`; `shared`; `fallback`: the local one
/// because the shared one did not answer) and `outcome` (`allowed`, `refused`).
pub const RATE_LIMIT_DECISIONS_TOTAL: &str = "rate_limit_decisions_total";

/// A quota the replicas share, asked after the local one let a request through.
pub trait SharedQuota: Send + Sync + 'static {
    /// Takes `cost` requests from `client`'s shared quota, if they fit; `None` when the quota
    /// did not answer in time (the local decision stands).
    fn check(&self, client: IpAddr, cost: u32) -> BoxFuture<'static, Option<SharedDecision>>;
}

/// What the shared quota decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SharedDecision {
    pub allowed: bool,
    /// Requests the client may still make at once.
    pub remaining: u32,
    /// Until the request would fit (zero when allowed).
    pub wait: Duration,
    /// Until the client's whole burst is available again.
    pub reset: Duration,
}

/// [`RATE_LIMIT_DECISIONS_TOTAL`], one series per label pair, registered once.
struct Decisions {
    local: [metrics::Counter; 2],
    shared: [metrics::Counter; 2],
    fallback: metrics::Counter,
}

impl Decisions {
    fn new() -> Self {
        let counter = |by: &'static str, outcome: &'static str| metrics::counter!(RATE_LIMIT_DECISIONS_TOTAL, "by" => by, "outcome" => outcome);
        Self {
            local: [counter("local", "allowed"), counter("local", "refused")],
            shared: [counter("shared", "allowed"), counter("shared", "refused")],
            fallback: counter("fallback", "allowed"),
        }
    }
}

/// How often idle clients are forgotten, at most.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// The key of requests that arrive without a peer address (in-process callers): one shared
/// quota, so they are limited too.
const UNKNOWN_CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::UNSPECIFIED);

/// The key new clients share once `max_clients` are tracked; no real client has it.
/// IPv6 clients are keyed by their /64 (see [`client_key`]), so no client's key has bits in the
/// low 64: `::1` is no client's, while `::`, the key of `::1` and of the rest of `::/64`, is.
const OVERFLOW_CLIENT: IpAddr = IpAddr::V6(Ipv6Addr::LOCALHOST);

static RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
static RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
static RATELIMIT_RESET: HeaderName = HeaderName::from_static("ratelimit-reset");

/// Governor's clock reading tokio's time, so a limiter follows `tokio::time::pause()` and
/// `advance()` in tests like every other timed thing here.
#[derive(Clone, Copy, Debug, Default)]
pub struct TokioClock;

/// A reading of [`TokioClock`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct TokioInstant(tokio::time::Instant);

impl Add<Nanos> for TokioInstant {
    type Output = Self;

    fn add(self, nanos: Nanos) -> Self {
        Self(self.0 + Duration::from(nanos))
    }
}

impl Reference for TokioInstant {
    fn duration_since(&self, earlier: Self) -> Nanos {
        self.0.saturating_duration_since(earlier.0).into()
    }

    fn saturating_sub(&self, nanos: Nanos) -> Self {
        self.0.checked_sub(nanos.into()).map_or(*self, Self)
    }
}

impl Clock for TokioClock {
    type Instant = TokioInstant;

    fn now(&self) -> TokioInstant {
        TokioInstant(tokio::time::Instant::now())
    }
}

/// Governor's map of client states with a cap on the number of clients.
struct BoundedStore {
    /// One GCRA state per client key.
    clients: DashMapStateStore<IpAddr, KeyHasher>,
    /// Beyond this many clients, new ones are keyed as [`OVERFLOW_CLIENT`].
    max_clients: usize,
}

impl StateStore for BoundedStore {
    type Key = IpAddr;

    fn measure_and_replace<T, F, E>(&self, key: &IpAddr, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        // A known client's state is measured where it was found; only new clients pay for
        // counting the map.
        if let Some(state) = self.clients.get(key) {
            return state.measure_and_replace(&NotKeyed::NonKey, f);
        }
        let key = if self.clients.len() >= self.max_clients {
            &OVERFLOW_CLIENT
        } else {
            key
        };
        self.clients.measure_and_replace(key, f)
    }
}

impl ShrinkableKeyedStateStore<IpAddr> for BoundedStore {
    fn retain_recent(&self, drop_below: Nanos) {
        self.clients.retain_recent(drop_below);
    }

    fn shrink_to_fit(&self) {
        self.clients.shrink_to_fit();
    }

    fn len(&self) -> usize {
        self.clients.len()
    }

    fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }
}

type Limiter = RateLimiter<IpAddr, BoundedStore, TokioClock, StateInformationMiddleware>;

/// What every clone of the layer shares.
struct Limits {
    limiter: Limiter,
    /// The burst, advertised as `RateLimit-Limit`.
    limit: u32,
    /// Time to earn back one request.
    per_request: Duration,
    /// Who a request comes from.
    clients: Arc<Clients>,
    /// Paths never limited.
    exempt: Vec<String>,
    /// When idle clients were last forgotten, in nanoseconds since `epoch`.
    last_sweep: AtomicU64,
    /// The origin of `last_sweep`.
    epoch: tokio::time::Instant,
    /// `rate_limit_clients`, registered once.
    clients_gauge: metrics::Gauge,
    /// Counts every decision.
    decisions: Decisions,
    /// The quota shared with the other replicas, if any.
    shared: Option<Arc<dyn SharedQuota>>,
}

/// The quota state a response reports in `RateLimit-*` headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Quotas {
    limit: u32,
    remaining: u32,
    /// Whole seconds until the full burst is available again.
    reset: u64,
}

fn whole_seconds_up(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

impl Quotas {
    fn insert_into(self, headers: &mut HeaderMap) {
        headers.insert(RATELIMIT_LIMIT.clone(), number(self.limit.into()));
        headers.insert(RATELIMIT_REMAINING.clone(), number(self.remaining.into()));
        headers.insert(RATELIMIT_RESET.clone(), number(self.reset));
    }
}

/// Numbers below this are written once per process, so most `RateLimit-*` values cost no
/// allocation: a burst, what is left of it and the seconds until it is whole again are
/// usually small. 1,024 short strings, about 40 KiB.
const WRITTEN_ONCE: usize = 1024;

/// `n` as a header value; below [`WRITTEN_ONCE`] one of the values written once.
fn number(n: u64) -> HeaderValue {
    static WRITTEN: LazyLock<Box<[String]>> =
        LazyLock::new(|| (0..WRITTEN_ONCE).map(|n| n.to_string()).collect());
    match usize::try_from(n).ok().and_then(|n| WRITTEN.get(n)) {
        Some(text) => HeaderValue::from_static(text),
        None => HeaderValue::from(n),
    }
}

/// What the limiter decided for one request.
enum Decision {
    Exempt,
    /// Let through; the key the client was charged under.
    Allowed(Quotas, IpAddr),
    Refused {
        quotas: Quotas,
        retry_after: u64,
    },
}

impl Limits {
    fn new(config: &RateLimitConfig, clients: Arc<Clients>) -> Self {
        let burst = config.burst;
        let quota = Quota::per_second(config.requests_per_second).allow_burst(burst);
        let store = BoundedStore {
            clients: DashMapStateStore::default(),
            max_clients: config.max_clients,
        };
        Self {
            limiter: RateLimiter::new(quota, store, TokioClock),
            limit: burst.get(),
            per_request: quota.replenish_interval(),
            clients,
            exempt: config.exempt_paths.clone(),
            last_sweep: AtomicU64::new(0),
            epoch: tokio::time::Instant::now(),
            clients_gauge: metrics::gauge!(RATE_LIMIT_CLIENTS),
            decisions: Decisions::new(),
            shared: None,
        }
    }

    /// Forgets clients whose quota is full again, at most once per [`SWEEP_INTERVAL`]; says
    /// whether this call did.
    fn sweep_if_due(&self) -> bool {
        let now = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let last = self.last_sweep.load(Ordering::Relaxed);
        let due = now.saturating_sub(last) >= SWEEP_INTERVAL.as_nanos() as u64;
        if due
            && self
                .last_sweep
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.limiter.retain_recent();
            self.limiter.shrink_to_fit();
            self.clients_gauge.set(self.limiter.len() as f64);
            return true;
        }
        false
    }

    fn decide<B>(&self, req: &Request<B>) -> Decision {
        let path = req.uri().path();
        if self.exempt.iter().any(|p| p == path) {
            return Decision::Exempt;
        }
        // The request that sweeps is the one looked at for the hint: at most one a second,
        // so the others do not pay for a header lookup that logs once in the process's life.
        if self.sweep_if_due() {
            self.clients.hint_if_forwarded(req);
        }
        let key = self.clients.key(req);
        let decided = self.limiter.check_key(&key);
        // What the local quota lets through is decided, and counted, by the shared one when
        // there is one.
        if decided.is_err() || self.shared.is_none() {
            self.decisions.local[usize::from(decided.is_err())].increment(1);
        }
        match decided {
            Ok(state) => {
                let remaining = state.remaining_burst_capacity();
                let used = self.limit.saturating_sub(remaining);
                Decision::Allowed(
                    Quotas {
                        limit: self.limit,
                        remaining,
                        reset: whole_seconds_up(self.per_request * used),
                    },
                    key,
                )
            }
            Err(not_until) => {
                let wait = not_until.wait_time_from(self.limiter.clock().now());
                let (quotas, retry_after) =
                    self.refused(wait, wait + self.per_request * (self.limit - 1));
                Decision::Refused {
                    quotas,
                    retry_after,
                }
            }
        }
    }

    /// A refusal's headers and `Retry-After`: the request fits after `wait`, the whole burst
    /// after `full`.
    fn refused(&self, wait: Duration, full: Duration) -> (Quotas, u64) {
        let retry_after = retry_after(wait);
        let quotas = Quotas {
            limit: self.limit,
            remaining: 0,
            reset: whole_seconds_up(full).max(retry_after),
        };
        (quotas, retry_after)
    }

    /// The shared quota's decision on a request the local one let through with the headers
    /// `local`: the headers to pass it with, or those of the 429 and its `Retry-After`. The
    /// local decision when the shared quota did not answer.
    fn shared_decision(
        &self,
        decided: Option<SharedDecision>,
        local: Quotas,
    ) -> Result<Quotas, (Quotas, u64)> {
        let Some(decided) = decided else {
            self.decisions.fallback.increment(1);
            return Ok(local);
        };
        self.decisions.shared[usize::from(!decided.allowed)].increment(1);
        if !decided.allowed {
            return Err(self.refused(decided.wait, decided.reset));
        }
        Ok(Quotas {
            limit: self.limit,
            remaining: decided.remaining,
            reset: whole_seconds_up(decided.reset),
        })
    }
}

fn retry_after(wait: Duration) -> u64 {
    whole_seconds_up(wait).max(1)
}

/// The 429 answer with its `RateLimit-*` headers.
fn refused_response(quotas: Quotas, retry_after: u64) -> Response<Body> {
    let mut response = refusal(retry_after).into_response();
    quotas.insert_into(response.headers_mut());
    response
}

/// The 429 answer, counted.
fn refusal(retry_after: u64) -> ApiError {
    metrics::counter!(RATE_LIMITED_TOTAL).increment(1);
    ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        format!("too many requests from this client; retry in {retry_after} s"),
    )
    .with_retry_after(retry_after)
}

/// The quota of the client a request was let through for, so its handler can charge the
/// request more than the one request the layer took (see the module documentation).
#[derive(Clone)]
pub struct QuotaCharge {
    limits: Arc<Limits>,
    key: IpAddr,
}

impl QuotaCharge {
    /// Takes `extra` more requests from the client's quota, all or none. The charge is capped
    /// at the burst less the one already taken, so that any request can be paid for from a
    /// full quota; over the quota it is the 429 the layer answers.
    pub fn charge(&self, extra: u32) -> Result<(), ApiError> {
        let Some(n) = NonZeroU32::new(extra.min(self.limits.limit - 1)) else {
            return Ok(());
        };
        match self.limits.limiter.check_key_n(&self.key, n) {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(not_until)) => {
                let now = self.limits.limiter.clock().now();
                Err(refusal(retry_after(not_until.wait_time_from(now))))
            }
            // Unreachable: n is below the burst.
            Err(_) => Err(refusal(retry_after(self.limits.per_request * n.get()))),
        }
    }
}

/// Who a request comes from: see the module documentation. Shared by the rate limit and the
/// per-client download cap (`middleware::downloads`), so both count a client alike.
pub struct Clients {
    /// Peers whose forwarding header is believed.
    trusted: Vec<IpNet>,
    /// The forwarding header, and how to read the hops of one of its lines.
    forwarded: (HeaderName, Hops),
    /// Whether the hint about forwarding headers from untrusted peers was logged.
    hinted: AtomicBool,
}

impl Clients {
    pub fn new(config: &RateLimitConfig) -> Self {
        Self {
            trusted: config.trusted_proxies.iter().map(|p| p.0).collect(),
            forwarded: match config.client_ip_header {
                ClientIpHeader::XForwardedFor => {
                    (HeaderName::from_static("x-forwarded-for"), list_hops)
                }
                ClientIpHeader::Forwarded => (HeaderName::from_static("forwarded"), forwarded_hops),
                ClientIpHeader::XRealIp => (HeaderName::from_static("x-real-ip"), list_hops),
            },
            hinted: AtomicBool::new(false),
        }
    }

    /// The key a request's client is counted under: its address, IPv6 by its /64.
    pub fn key<B>(&self, req: &Request<B>) -> IpAddr {
        client_key(self.client(req))
    }

    /// Logs once that requests carry the `client_ip_header` while no proxy is trusted to set
    /// it. Called by the rate limit alone, for the request that sweeps (one a second at
    /// most), so no other request, and no layer that reads a request's key again, looks.
    fn hint_if_forwarded<B>(&self, req: &Request<B>) {
        let header = &self.forwarded.0;
        if self.trusted.is_empty()
            && !self.hinted.load(Ordering::Relaxed)
            && req.headers().contains_key(header)
            && !self.hinted.swap(true, Ordering::Relaxed)
        {
            let peer = req
                .extensions()
                .get::<PeerAddr>()
                .map_or(UNKNOWN_CLIENT, |PeerAddr(peer)| peer.ip().to_canonical());
            tracing::warn!(
                %peer,
                %header,
                "requests carry the client_ip_header but [rate_limit] trusted_proxies is \
                 empty: clients are keyed by the connecting address; list your reverse \
                 proxy in trusted_proxies if one fronts this service"
            );
        }
    }

    fn is_trusted(&self, ip: IpAddr) -> bool {
        self.trusted.iter().any(|net| net.contains(&ip))
    }

    /// The client's address: see the module documentation.
    fn client<B>(&self, req: &Request<B>) -> IpAddr {
        let Some(PeerAddr(peer)) = req.extensions().get::<PeerAddr>() else {
            return UNKNOWN_CLIENT;
        };
        let peer = peer.ip().to_canonical();
        let (header, hops) = &self.forwarded;
        if !self.is_trusted(peer) {
            return peer;
        }
        let hops = forwarded_chain(req.headers(), header, *hops);
        // Walk from the nearest hop outwards: the first one that is not a trusted proxy is the
        // client. A hop that is not an address ("unknown", an obfuscated name) ends the walk
        // at the trusted proxy that reported it.
        let mut client = peer;
        for hop in hops.into_iter().rev() {
            match hop {
                Some(ip) if self.is_trusted(ip) => client = ip,
                Some(ip) => return ip,
                None => return client,
            }
        }
        client
    }
}

/// The key a client is limited by: IPv6 addresses by their /64.
fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !u128::from(u64::MAX))),
        v4 => v4,
    }
}

/// Reads the hops of one forwarding header line, left (farthest) to right (nearest); `None`
/// for a hop that is not an address.
type Hops = fn(&str) -> Vec<Option<IpAddr>>;

/// Every hop named by the `name` header lines, left (farthest) to right (nearest).
fn forwarded_chain(headers: &HeaderMap, name: &HeaderName, hops: Hops) -> Vec<Option<IpAddr>> {
    headers
        .get_all(name)
        .iter()
        .flat_map(|line| match line.to_str() {
            Ok(text) => hops(text),
            Err(_) => vec![None],
        })
        .collect()
}

/// `X-Forwarded-For: 203.0.113.7, 10.0.0.2` (some proxies add ports), or
/// `X-Real-IP: 203.0.113.7`.
fn list_hops(line: &str) -> Vec<Option<IpAddr>> {
    line.split(',').map(|hop| parse_hop(hop.trim())).collect()
}

/// `Forwarded: for=203.0.113.7;proto=https, for="[2001:db8::1]:4711"` (RFC 7239).
fn forwarded_hops(line: &str) -> Vec<Option<IpAddr>> {
    line.split(',')
        .map(|element| {
            element
                .split(';')
                .filter_map(|pair| pair.split_once('='))
                .find(|(name, _)| name.trim().eq_ignore_ascii_case("for"))
                .and_then(|(_, value)| parse_hop(value.trim().trim_matches('"')))
        })
        .collect()
}

fn parse_hop(hop: &str) -> Option<IpAddr> {
    let ip = hop
        .parse::<IpAddr>()
        .ok()
        .or_else(|| hop.parse::<SocketAddr>().ok().map(|s| s.ip()))
        .or_else(|| {
            hop.strip_prefix('[')
                .and_then(|rest| rest.split_once(']'))
                .and_then(|(v6, _)| v6.parse::<Ipv6Addr>().ok())
                .map(IpAddr::V6)
        })?;
    Some(ip.to_canonical())
}

/// Adds [`RateLimit`] to a stack.
#[derive(Clone)]
pub struct RateLimitLayer {
    /// `None` when rate limiting is off: every request passes as an exempt one does.
    limits: Option<Arc<Limits>>,
}

impl RateLimitLayer {
    /// Rate limiting off (`[rate_limit] enabled = false`): no quota, no `RateLimit-*`
    /// headers. A layer all the same, so that the stack has one type either way.
    pub fn off() -> Self {
        Self { limits: None }
    }

    /// Each replica counting its own clients; see [`RateLimitLayer::shared`].
    pub fn new(config: &RateLimitConfig) -> Self {
        Self::shared(config, None, Arc::new(Clients::new(config)))
    }

    /// Counting clients together with the other replicas through `shared`, when given, each
    /// told apart by `clients`.
    pub fn shared(
        config: &RateLimitConfig,
        shared: Option<Arc<dyn SharedQuota>>,
        clients: Arc<Clients>,
    ) -> Self {
        // Registered at zero so the series exists before the first refusal.
        metrics::counter!(RATE_LIMITED_TOTAL).increment(0);
        Self {
            limits: Some(Arc::new(Limits {
                shared,
                ..Limits::new(config, clients)
            })),
        }
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;

    fn layer(&self, inner: S) -> RateLimit<S> {
        RateLimit {
            inner,
            limits: self.limits.clone(),
        }
    }
}

/// See the module documentation.
#[derive(Clone)]
pub struct RateLimit<S> {
    inner: S,
    limits: Option<Arc<Limits>>,
}

impl<S, B> Service<Request<B>> for RateLimit<S>
where
    S: Service<Request<B>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send,
    B: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let Some(limits) = &self.limits else {
            return ResponseFuture::Passed {
                inner: self.inner.call(req),
                quotas: None,
            };
        };
        match limits.decide(&req) {
            Decision::Exempt => ResponseFuture::Passed {
                inner: self.inner.call(req),
                quotas: None,
            },
            Decision::Allowed(quotas, key) => {
                if req.method() == Method::POST {
                    req.extensions_mut().insert(QuotaCharge {
                        limits: limits.clone(),
                        key,
                    });
                }
                let Some(shared) = &limits.shared else {
                    return ResponseFuture::Passed {
                        inner: self.inner.call(req),
                        quotas: Some(quotas),
                    };
                };
                let check = shared.check(key, 1);
                let limits = limits.clone();
                // The ready service is called once the shared quota has answered.
                let clone = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, clone);
                ResponseFuture::Shared {
                    future: Box::pin(async move {
                        match limits.shared_decision(check.await, quotas) {
                            Ok(quotas) => {
                                let mut response = inner.call(req).await?;
                                quotas.insert_into(response.headers_mut());
                                Ok(response)
                            }
                            Err((quotas, retry_after)) => Ok(refused_response(quotas, retry_after)),
                        }
                    }),
                }
            }
            Decision::Refused {
                quotas,
                retry_after,
            } => ResponseFuture::Refused {
                response: Some(refused_response(quotas, retry_after)),
            },
        }
    }
}

pin_project! {
    #[project = ResponseFutureProj]
    pub enum ResponseFuture<F, E> {
        Passed {
            #[pin]
            inner: F,
            quotas: Option<Quotas>,
        },
        /// Waiting for the shared quota, then for the inner service.
        Shared {
            future: BoxFuture<'static, Result<Response<Body>, E>>,
        },
        Refused {
            response: Option<Response<Body>>,
        },
    }
}

impl<F, E> Future for ResponseFuture<F, E>
where
    F: Future<Output = Result<Response<Body>, E>>,
{
    type Output = Result<Response<Body>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            ResponseFutureProj::Passed { inner, quotas } => {
                let mut response = ready!(inner.poll(cx))?;
                if let Some(quotas) = quotas.take() {
                    quotas.insert_into(response.headers_mut());
                }
                Poll::Ready(Ok(response))
            }
            ResponseFutureProj::Shared { future } => future.as_mut().poll(cx),
            ResponseFutureProj::Refused { response } => match response.take() {
                Some(response) => Poll::Ready(Ok(response)),
                None => panic!("ResponseFuture polled after completion"),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use http_body_util::BodyExt;
    use std::convert::Infallible;
    use tower::ServiceExt;

    /// One request per second, `burst` at once.
    fn config(burst: u32, extra: &str) -> RateLimitConfig {
        let text = format!(
            "[local]\npath = \".\"\n[rate_limit]\nrequests_per_second = 1\nburst = {burst}\n{extra}"
        );
        Config::parse(&text, "test", None).unwrap().rate_limit
    }

    /// A stack whose inner service counts its calls.
    fn limited(
        layer: &RateLimitLayer,
    ) -> (
        RateLimit<
            impl Service<Request<()>, Response = Response<Body>, Error = Infallible, Future: Send>
                + Clone
                + Send
                + 'static,
        >,
        Arc<AtomicU64>,
    ) {
        let calls = Arc::new(AtomicU64::new(0));
        let counter = calls.clone();
        let inner = tower::service_fn(move |_: Request<()>| {
            counter.fetch_add(1, Ordering::Relaxed);
            async { Ok::<_, Infallible>(Response::new(crate::body::empty())) }
        });
        (layer.layer(inner), calls)
    }

    fn request(path: &str, peer: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut req = Request::get(path).body(()).unwrap();
        req.extensions_mut()
            .insert(PeerAddr(format!("{peer}:40000").parse().unwrap()));
        for (name, value) in headers {
            req.headers_mut().append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        req
    }

    fn header(response: &Response<Body>, name: &str) -> String {
        response.headers()[name].to_str().unwrap().to_owned()
    }

    async fn respond<S>(service: &S, req: Request<()>) -> Response<Body>
    where
        S: Service<Request<()>, Response = Response<Body>, Error = Infallible> + Clone,
    {
        service.clone().oneshot(req).await.unwrap()
    }

    async fn status<S>(service: &S, req: Request<()>) -> StatusCode
    where
        S: Service<Request<()>, Response = Response<Body>, Error = Infallible> + Clone,
    {
        respond(service, req).await.status()
    }

    #[tokio::test]
    async fn over_the_quota_answers_429_with_headers_without_calling_inner() {
        tokio::time::pause();
        let layer = RateLimitLayer::new(&config(2, ""));
        let (service, calls) = limited(&layer);
        let req = || request("/api/v1/extensions", "192.0.2.1", &[]);
        let first = respond(&service, req()).await;
        assert_eq!(first.status(), StatusCode::OK);
        assert_eq!(header(&first, "ratelimit-limit"), "2");
        assert_eq!(header(&first, "ratelimit-remaining"), "1");
        assert_eq!(header(&first, "ratelimit-reset"), "1");
        assert_eq!(status(&service, req()).await, StatusCode::OK);

        tokio::time::advance(Duration::from_millis(300)).await;
        let refused = respond(&service, req()).await;
        assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            calls.load(Ordering::Relaxed),
            2,
            "a 429 never reaches inner"
        );
        // 0.7 s until the next request: rounded up to whole seconds.
        assert_eq!(header(&refused, "retry-after"), "1");
        assert_eq!(header(&refused, "ratelimit-remaining"), "0");
        assert_eq!(header(&refused, "ratelimit-reset"), "2");
        let body = http_body_util::BodyExt::collect(refused.into_body())
            .await
            .unwrap()
            .to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["error"], "rate_limited");

        // Another client has its own quota.
        let other = request("/api/v1/extensions", "192.0.2.2", &[]);
        assert_eq!(status(&service, other).await, StatusCode::OK);

        // One request earned back per second.
        tokio::time::advance(Duration::from_millis(700)).await;
        assert_eq!(status(&service, req()).await, StatusCode::OK);
        assert_eq!(status(&service, req()).await, StatusCode::TOO_MANY_REQUESTS);
    }

    #[tokio::test]
    async fn exempt_paths_are_never_limited_nor_labelled() {
        tokio::time::pause();
        let layer = RateLimitLayer::new(&config(1, ""));
        let (service, calls) = limited(&layer);
        for _ in 0..5 {
            let response = respond(&service, request("/livez", "192.0.2.1", &[])).await;
            assert_eq!(response.status(), StatusCode::OK);
            assert!(!response.headers().contains_key("ratelimit-limit"));
        }
        assert_eq!(calls.load(Ordering::Relaxed), 5);
        // The probes did not use the client's quota.
        let req = request("/api/v1/extensions", "192.0.2.1", &[]);
        assert_eq!(status(&service, req).await, StatusCode::OK);
    }

    #[tokio::test]
    async fn the_forwarding_hint_looks_at_the_request_that_sweeps_alone() {
        tokio::time::pause();
        let layer = RateLimitLayer::new(&config(100, ""));
        let (service, _) = limited(&layer);
        let limits = layer.limits.as_ref().expect("rate limiting on");
        let send = |forwarded: bool| {
            let headers: &[(&str, &str)] = if forwarded {
                &[("x-forwarded-for", "203.0.113.9")]
            } else {
                &[]
            };
            status(
                &service,
                request("/api/v1/extensions", "192.0.2.1", headers),
            )
        };
        let hinted = || limits.clients.hinted.load(Ordering::Relaxed);
        // No sweep is due in the first second: forwarded requests are not looked at.
        for _ in 0..3 {
            send(true).await;
        }
        assert!(!hinted());
        // The request that sweeps carries no header: nothing to hint about yet.
        tokio::time::advance(SWEEP_INTERVAL).await;
        send(false).await;
        send(true).await;
        assert!(!hinted());
        // The next request that sweeps carries it.
        tokio::time::advance(SWEEP_INTERVAL).await;
        send(true).await;
        assert!(hinted());
    }

    #[tokio::test]
    async fn forwarded_addresses_are_believed_only_from_trusted_proxies() {
        tokio::time::pause();
        let trusted = "trusted_proxies = [\"10.0.0.0/8\", \"192.0.2.9\"]\n";
        let layer = RateLimitLayer::new(&config(1, trusted));
        let (service, _) = limited(&layer);
        let (ok, refused) = (StatusCode::OK, StatusCode::TOO_MANY_REQUESTS);
        let proxy = "10.1.2.3";
        // (peer, X-Forwarded-For lines separated by '|', expected, case)
        let cases = [
            // Behind the proxy, clients are told apart by X-Forwarded-For.
            (proxy, "203.0.113.1", ok, "first client"),
            (proxy, "203.0.113.2", ok, "second client"),
            (proxy, "203.0.113.1", refused, "first again"),
            // Prepending a fake address gives no fresh quota: the right-most untrusted address
            // (the one the proxy saw) is the key.
            (proxy, "198.51.100.7, 203.0.113.1", refused, "prepended"),
            // Trusted hops are skipped, whichever header line they are on.
            (
                proxy,
                "198.51.100.8, 203.0.113.1|192.0.2.9, 10.9.9.9",
                refused,
                "chained proxies",
            ),
            // From an untrusted peer the header is ignored: spoofing does not escape the limit.
            ("198.51.100.1", "203.0.113.50", ok, "direct"),
            ("198.51.100.1", "203.0.113.51", refused, "direct, spoofed"),
        ];
        for (peer, lines, expected, case) in cases {
            let headers: Vec<_> = lines.split('|').map(|l| ("x-forwarded-for", l)).collect();
            let req = request("/api/v1/extensions", peer, &headers);
            assert_eq!(status(&service, req).await, expected, "{case}");
        }
    }

    #[test]
    fn numbers_written_once_read_as_any_other() {
        for n in [0, 7, 1023, 1024, 86_400, u64::MAX] {
            assert_eq!(number(n), HeaderValue::from(n), "{n}");
        }
    }

    #[test]
    fn forwarding_headers_are_parsed() {
        let clients = Clients::new(&config(
            1,
            "trusted_proxies = [\"10.0.0.0/8\", \"2001:db8:ffff::/48\"]\n",
        ));
        let client = |peer: &str, headers: &[(&str, &str)]| {
            clients.client(&request("/api/v1/extensions", peer, headers))
        };
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            client(
                "10.0.0.1",
                &[("x-forwarded-for", "203.0.113.9:5555, 10.2.2.2")]
            ),
            ip("203.0.113.9")
        );
        // A hop that is no address stops the walk at the proxy that reported it.
        assert_eq!(
            client(
                "10.0.0.1",
                &[("x-forwarded-for", "203.0.113.9, unknown, 10.2.2.2")]
            ),
            ip("10.2.2.2")
        );
        // Every hop trusted: the farthest one.
        assert_eq!(
            client("10.0.0.1", &[("x-forwarded-for", "10.3.3.3, 10.2.2.2")]),
            ip("10.3.3.3")
        );
        // IPv4-mapped peers match IPv4 networks.
        assert_eq!(
            client("[::ffff:10.0.0.1]", &[("x-forwarded-for", "203.0.113.9")]),
            ip("203.0.113.9")
        );
        assert_eq!(client("[2001:db8:ffff::1]", &[]), ip("2001:db8:ffff::1"));
        assert_eq!(client_key(ip("2001:db8:1:2:3:4:5:6")), ip("2001:db8:1:2::"));
        // No client shares the overflow quota's key, IPv6 loopback clients included.
        for address in [
            "::1",
            "::",
            "::2",
            "0.0.0.1",
            "2001:db8::1",
            "255.255.255.255",
        ] {
            assert_ne!(client_key(ip(address)), OVERFLOW_CLIENT, "{address}");
        }
        let no_peer = Request::get("/").body(()).unwrap();
        assert_eq!(clients.client(&no_peer), UNKNOWN_CLIENT);
    }

    #[test]
    fn only_the_configured_client_ip_header_is_read() {
        let trusted = "trusted_proxies = [\"10.0.0.0/8\"]\n";
        let client = |header: &str, headers: &[(&str, &str)]| {
            let setting = format!("{trusted}client_ip_header = \"{header}\"\n");
            let clients = Clients::new(&config(1, &setting));
            clients.client(&request("/api/v1/extensions", "10.0.0.1", headers))
        };
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let spoofed = ("x-forwarded-for", "198.51.100.66");
        let forwarded = (
            "forwarded",
            "for=198.51.100.3;proto=https, for=\"[2001:db8::1]:4711\"",
        );
        let real = ("x-real-ip", "203.0.113.5");
        // A proxy writing X-Real-IP that passes the client's X-Forwarded-For through.
        assert_eq!(client("x-real-ip", &[spoofed, real]), ip("203.0.113.5"));
        assert_eq!(
            client("forwarded", &[spoofed, forwarded]),
            ip("2001:db8::1")
        );
        assert_eq!(
            client("x-forwarded-for", &[real, forwarded]),
            ip("10.0.0.1")
        );
        assert_eq!(
            client("x-forwarded-for", &[spoofed, real]),
            ip("198.51.100.66")
        );
        // Without the configured header, the proxy itself is the client.
        assert_eq!(client("x-real-ip", &[spoofed]), ip("10.0.0.1"));

        let text = "[local]\npath = \".\"\n[rate_limit]\nclient_ip_header = \"true-client-ip\"\n";
        let error = Config::parse(text, "test", None).unwrap_err().to_string();
        assert!(error.contains("x-real-ip"), "{error}");
    }

    #[tokio::test]
    async fn a_flood_of_distinct_clients_is_bounded() {
        tokio::time::pause();
        let layer = RateLimitLayer::new(&config(1, "max_clients = 8\n"));
        let (service, _) = limited(&layer);
        let mut statuses = Vec::new();
        for i in 0..1000u32 {
            let peer = Ipv4Addr::from(0x0a00_0000 + i).to_string();
            let req = request("/api/v1/extensions", &peer, &[]);
            statuses.push(status(&service, req).await);
        }
        let limiter = &layer.limits.as_ref().expect("rate limiting on").limiter;
        assert!(
            limiter.len() <= 9,
            "8 clients and the overflow key, not {}",
            limiter.len()
        );
        // The first 8 got their own quota, the 9th the shared overflow one, the rest were refused.
        let ok = statuses.iter().filter(|s| **s == StatusCode::OK).count();
        assert_eq!(ok, 9);

        // Once their quotas are full again, idle clients are forgotten and new ones get room.
        tokio::time::advance(Duration::from_secs(3)).await;
        let req = request("/api/v1/extensions", "198.51.100.1", &[]);
        assert_eq!(status(&service, req).await, StatusCode::OK);
        assert_eq!(limiter.len(), 1);
    }

    #[tokio::test]
    async fn a_handler_can_charge_more_all_or_none() {
        tokio::time::pause();
        let layer = RateLimitLayer::new(&config(5, ""));
        // The body says how many more requests the handler charges.
        let service = layer.layer(tower::service_fn(|req: Request<u32>| async move {
            let charge = req
                .extensions()
                .get::<QuotaCharge>()
                .expect("set by the layer");
            Ok::<_, Infallible>(match charge.charge(*req.body()) {
                Ok(()) => Response::new(crate::body::empty()),
                Err(e) => e.into_response(),
            })
        }));
        let send = |extra: u32| {
            let mut req = request("/api/v1/resolve", "192.0.2.1", &[]).map(|()| extra);
            *req.method_mut() = Method::POST;
            service.clone().oneshot(req)
        };
        assert_eq!(send(2).await.unwrap().status(), StatusCode::OK);
        // 2 left: the layer takes 1, the handler's 3 do not fit and are not taken.
        let refused = send(3).await.unwrap();
        assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
        assert!(refused.headers().contains_key("retry-after"));
        assert_eq!(send(0).await.unwrap().status(), StatusCode::OK);
        assert_eq!(
            send(0).await.unwrap().status(),
            StatusCode::TOO_MANY_REQUESTS
        );
        // From a full quota, a charge beyond the burst costs the whole burst.
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(send(100).await.unwrap().status(), StatusCode::OK);
        assert_eq!(
            send(0).await.unwrap().status(),
            StatusCode::TOO_MANY_REQUESTS
        );
    }

    #[tokio::test]
    async fn switched_off_it_passes_every_request_untouched() {
        let (service, calls) = limited(&RateLimitLayer::off());
        for _ in 0..10 {
            let mut req = request("/api/v1/resolve", "192.0.2.1", &[]);
            *req.method_mut() = Method::POST;
            let response = respond(&service, req).await;
            assert_eq!(response.status(), StatusCode::OK);
            assert!(!response.headers().contains_key("ratelimit-remaining"));
        }
        assert_eq!(calls.load(Ordering::Relaxed), 10);
    }

    #[tokio::test]
    async fn only_a_post_carries_a_charge() {
        let layer = RateLimitLayer::new(&config(5, ""));
        let service = layer.layer(tower::service_fn(|req: Request<()>| async move {
            let charged = req.extensions().get::<QuotaCharge>().is_some();
            Ok::<_, Infallible>(Response::new(crate::body::full(charged.to_string())))
        }));
        for (method, charged) in [(Method::GET, "false"), (Method::POST, "true")] {
            let mut req = request("/api/v1/resolve", "192.0.2.1", &[]);
            *req.method_mut() = method;
            let body = service.clone().oneshot(req).await.unwrap().into_body();
            assert_eq!(body.collect().await.unwrap().to_bytes(), charged);
        }
    }

    #[test]
    fn trusted_proxies_are_validated() {
        let text = "[local]\npath = \".\"\n[rate_limit]\ntrusted_proxies = [\"10.0.0.0/33\"]\n";
        let error = Config::parse(text, "test", None).unwrap_err().to_string();
        assert!(error.contains("trusted_proxies: '10.0.0.0/33'"), "{error}");
    }

    /// A shared quota answering what it is given, remembering who asked.
    struct Answering(Option<SharedDecision>, std::sync::Mutex<Vec<IpAddr>>);

    impl SharedQuota for Answering {
        fn check(&self, client: IpAddr, _: u32) -> BoxFuture<'static, Option<SharedDecision>> {
            self.1.lock().unwrap().push(client);
            let decided = self.0;
            Box::pin(async move { decided })
        }
    }

    #[tokio::test]
    async fn the_shared_quota_decides_what_the_local_one_lets_through_and_answers_alike() {
        tokio::time::pause();
        let recorder = crate::telemetry::recorder();
        let metrics = recorder.handle();
        let _local = metrics::set_default_local_recorder(&recorder);
        let refusing = SharedDecision {
            allowed: false,
            remaining: 0,
            wait: Duration::from_millis(1500),
            reset: Duration::from_millis(2500),
        };
        let allowing = SharedDecision {
            allowed: true,
            remaining: 7,
            wait: Duration::ZERO,
            reset: Duration::from_millis(2100),
        };
        for (decided, status, remaining, reset) in [
            (Some(refusing), StatusCode::TOO_MANY_REQUESTS, "0", "3"),
            (Some(allowing), StatusCode::OK, "7", "3"),
            // Not answering: the local quota decides.
            (None, StatusCode::OK, "9", "1"),
        ] {
            let shared = Arc::new(Answering(decided, Default::default()));
            let layer = RateLimitLayer::shared(
                &config(10, ""),
                Some(shared.clone()),
                Arc::new(Clients::new(&config(10, ""))),
            );
            let (service, calls) = limited(&layer);
            let response = respond(&service, request("/api/v1/extensions", "192.0.2.1", &[])).await;
            assert_eq!(response.status(), status, "{decided:?}");
            assert_eq!(header(&response, "ratelimit-limit"), "10");
            assert_eq!(header(&response, "ratelimit-remaining"), remaining);
            assert_eq!(header(&response, "ratelimit-reset"), reset);
            let refused = status == StatusCode::TOO_MANY_REQUESTS;
            if refused {
                assert_eq!(header(&response, "retry-after"), "2");
            }
            assert_eq!(calls.load(Ordering::Relaxed), u64::from(!refused));
            assert_eq!(
                *shared.1.lock().unwrap(),
                ["192.0.2.1".parse::<IpAddr>().unwrap()]
            );
        }

        // What the local quota refuses never reaches the shared one, nor do exempt paths.
        let shared = Arc::new(Answering(Some(allowing), Default::default()));
        let layer = RateLimitLayer::shared(
            &config(1, ""),
            Some(shared.clone()),
            Arc::new(Clients::new(&config(1, ""))),
        );
        let (service, _) = limited(&layer);
        let req = || request("/api/v1/extensions", "192.0.2.1", &[]);
        assert_eq!(status(&service, req()).await, StatusCode::OK);
        assert_eq!(status(&service, req()).await, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            status(&service, request("/livez", "192.0.2.1", &[])).await,
            StatusCode::OK
        );
        assert_eq!(shared.1.lock().unwrap().len(), 1);

        // One decision per limited request, counted by the quota that made it.
        let text = metrics.render();
        for (by, outcome, n) in [
            ("local", "allowed", 0),
            ("local", "refused", 1),
            ("shared", "allowed", 2),
            ("shared", "refused", 1),
            ("fallback", "allowed", 1),
        ] {
            let line =
                format!(r#"rate_limit_decisions_total{{by="{by}",outcome="{outcome}"}} {n}"#);
            assert!(text.contains(&line), "missing {line} in\n{text}");
        }
    }
}
