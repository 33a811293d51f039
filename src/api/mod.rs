//! The HTTP edge: a router service that matches the path, validates the request and answers
//! from the registry service; the handlers for each route; version-constraint resolution;
//! request validation; `Range` of downloads; health probes; the metrics exposition within its
//! budget; the OpenAPI document describing all of it.

pub mod exposition;
mod handlers;
mod health;
mod hooks;
pub mod openapi;
pub mod query;
pub mod range;
pub mod representation;
pub mod request_body;
pub mod resolve;

use std::borrow::Cow;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{HeaderValue, Method, Request, Response};
use tower::Service;

use crate::body::{self, Body};
use crate::error::ApiError;
use crate::invalidation::Invalidator;
use crate::middleware::cache::Caches;
use crate::middleware::compression::Representation;
use crate::middleware::rate_limit::QuotaCharge;
use crate::registry::{Registry, Sources};
use crate::BoxError;

use self::exposition::Exposition;
pub use self::handlers::cache_control;
pub use self::health::HealthProbe;
use self::representation::Renderings;

/// The routes, matched on the path alone; each answers GET and HEAD, but the batch resolve,
/// the webhooks and the purge, which answer POST only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    List,
    Search,
    Get,
    Versions,
    Download,
    Resolve,
    ResolveBatch,
    Health,
    Livez,
    Readyz,
    Metrics,
    CacheStats,
    HookGitea,
    HookOci,
    CachePurge,
    OpenApi,
}

impl Route {
    /// The route's path template, the only form of a path that metrics and logs may carry.
    pub fn template(self) -> &'static str {
        match self {
            Self::List => "/api/v1/extensions",
            Self::Search => "/api/v1/extensions/search",
            Self::Get => "/api/v1/extensions/{type}/{name}",
            Self::Versions => "/api/v1/extensions/{type}/{name}/versions",
            Self::Download => "/api/v1/extensions/{type}/{name}/{version}",
            Self::Resolve => "/api/v1/resolve/{type}/{name}",
            Self::ResolveBatch => "/api/v1/resolve",
            Self::Health => "/api/v1/health",
            Self::Livez => "/livez",
            Self::Readyz => "/readyz",
            Self::Metrics => "/api/v1/metrics",
            Self::CacheStats => "/api/v1/cache/stats",
            Self::HookGitea => "/api/v1/hooks/gitea",
            Self::HookOci => "/api/v1/hooks/oci",
            Self::CachePurge => "/api/v1/cache/purge",
            Self::OpenApi => "/api/v1/openapi.json",
        }
    }

    /// The methods the route answers, as a 405's `Allow` lists them.
    pub fn allow(self) -> &'static str {
        if self.takes_post() {
            "POST"
        } else {
            ALLOW
        }
    }

    /// Whether the route answers POST (and only POST).
    fn takes_post(self) -> bool {
        matches!(
            self,
            Self::ResolveBatch | Self::HookGitea | Self::HookOci | Self::CachePurge
        )
    }

    /// Every route, in declaration order.
    pub const ALL: [Route; 16] = [
        Self::List,
        Self::Search,
        Self::Get,
        Self::Versions,
        Self::Download,
        Self::Resolve,
        Self::ResolveBatch,
        Self::Health,
        Self::Livez,
        Self::Readyz,
        Self::Metrics,
        Self::CacheStats,
        Self::HookGitea,
        Self::HookOci,
        Self::CachePurge,
        Self::OpenApi,
    ];
}

// `route as usize` indexes tables kept in `Route::ALL` order (the metrics' series, the route
// table's slash counts): the two orders are checked to agree when the crate compiles.
const _: () = {
    let mut i = 0;
    while i < Route::ALL.len() {
        assert!(
            Route::ALL[i] as usize == i,
            "Route::ALL is not in declaration order"
        );
        i += 1;
    }
};

/// The route table, built once: each route's template split at its `/`s. A path is split
/// the same way once and compared segment by segment with the templates of as many segments;
/// a parameter takes one whole non-empty segment, never a `/` (no template has a catch-all),
/// and where two templates take some paths alike, the one with a literal where the other has
/// a parameter wins (`.../{name}/versions` is the versions route, not a download of version
/// `versions`).
pub struct RouteTable {
    /// Every route's template, in `Route::ALL` (declaration) order.
    templates: [Template; Route::ALL.len()],
    /// The routes in the order they are tried: fewer segments first, then more literals.
    tried: [Route; Route::ALL.len()],
    /// Where the routes of each number of segments start in `tried`; they end where the next
    /// number's start.
    starts: [usize; MOST_SEGMENTS + 2],
}

/// The most segments a template has, the empty one before the leading `/` included.
const MOST_SEGMENTS: usize = 7;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Segment {
    Literal(&'static str),
    Type,
    Name,
    Version,
}

/// A template's segments.
#[derive(Clone, Copy, Debug)]
struct Template {
    len: usize,
    segments: [Segment; MOST_SEGMENTS],
}

impl Template {
    fn parse(template: &'static str) -> Self {
        let mut parsed = Template {
            len: 0,
            segments: [Segment::Literal(""); MOST_SEGMENTS],
        };
        for piece in template.split('/') {
            let slot = parsed.segments.get_mut(parsed.len).unwrap_or_else(|| {
                panic!("route table is inconsistent: {template} has too many segments")
            });
            *slot = match piece {
                "{type}" => Segment::Type,
                "{name}" => Segment::Name,
                "{version}" => Segment::Version,
                _ if piece.contains(['{', '}']) => {
                    panic!("route table is inconsistent: {template} has an unknown parameter")
                }
                _ => Segment::Literal(piece),
            };
            parsed.len += 1;
        }
        parsed
    }

    fn segments(&self) -> &[Segment] {
        &self.segments[..self.len]
    }

    fn literals(&self) -> usize {
        self.segments()
            .iter()
            .filter(|s| matches!(s, Segment::Literal(_)))
            .count()
    }

    /// The parameters of a path split into `pieces`, when it is this template's.
    fn fit<'p>(&self, pieces: &[&'p str]) -> Option<Params<'p>> {
        if pieces.len() != self.len {
            return None;
        }
        let mut params = Params::default();
        for (segment, &piece) in self.segments().iter().zip(pieces) {
            match segment {
                Segment::Literal(literal) if *literal == piece => {}
                Segment::Literal(_) => return None,
                _ if piece.is_empty() => return None,
                Segment::Type => params.ty = piece,
                Segment::Name => params.name = piece,
                Segment::Version => params.version = piece,
            }
        }
        Some(params)
    }

    /// Whether some path is both templates'.
    fn overlaps(&self, other: &Template) -> bool {
        self.len == other.len
            && self
                .segments()
                .iter()
                .zip(other.segments())
                .all(|pair| match pair {
                    (Segment::Literal(a), Segment::Literal(b)) => a == b,
                    _ => true,
                })
    }

    /// Whether every path of this template is also `other`'s: it has a literal wherever
    /// `other` has one.
    fn within(&self, other: &Template) -> bool {
        self.overlaps(other)
            && self.segments().iter().zip(other.segments()).all(|pair| {
                matches!(
                    pair,
                    (Segment::Literal(_), _)
                        | (_, Segment::Type | Segment::Name | Segment::Version)
                )
            })
    }
}

/// `path` split at its `/`s, or `None` when it has more segments than any template. By
/// bytes: `str::split`'s pattern searcher costs several times more on paths this short.
fn split(path: &str) -> Option<([&str; MOST_SEGMENTS], usize)> {
    let mut pieces = [""; MOST_SEGMENTS];
    let mut len = 0;
    let mut start = 0;
    for (i, byte) in path.bytes().enumerate() {
        if byte == b'/' {
            *pieces.get_mut(len)? = &path[start..i];
            len += 1;
            start = i + 1;
        }
    }
    *pieces.get_mut(len)? = &path[start..];
    Some((pieces, len + 1))
}

impl RouteTable {
    pub fn new() -> Self {
        let templates = Route::ALL.map(|route| Template::parse(route.template()));
        // Trying the templates with more literals first is right only where, of two that
        // take some path alike, one takes a subset of the other's.
        for (i, a) in Route::ALL.into_iter().enumerate() {
            for b in Route::ALL.into_iter().skip(i + 1) {
                let (ta, tb) = (&templates[a as usize], &templates[b as usize]);
                assert!(
                    !ta.overlaps(tb)
                        || ta.literals() != tb.literals() && (ta.within(tb) || tb.within(ta)),
                    "route table is inconsistent: {} and {} share paths neither one decides",
                    a.template(),
                    b.template()
                );
            }
        }
        let mut tried = Route::ALL;
        tried.sort_by_key(|&route| {
            let template = &templates[route as usize];
            (template.len, std::cmp::Reverse(template.literals()))
        });
        let mut starts = [0; MOST_SEGMENTS + 2];
        for (len, start) in starts.iter_mut().enumerate() {
            *start = tried
                .iter()
                .take_while(|&&route| templates[route as usize].len < len)
                .count();
        }
        Self {
            templates,
            tried,
            starts,
        }
    }

    /// The route of a path, for layers that need no parameters.
    pub fn route(&self, path: &str) -> Option<Route> {
        self.at(path).map(|(route, _)| route)
    }

    /// Whether `path` is `route`'s; most paths are told apart by their number of segments.
    pub fn is(&self, path: &str, route: Route) -> bool {
        let segments = path.bytes().filter(|&b| b == b'/').count() + 1;
        segments == self.templates[route as usize].len && self.route(path) == Some(route)
    }

    /// The route and its path parameters (still percent-encoded) for a path.
    pub fn at<'p>(&self, path: &'p str) -> Option<(Route, Params<'p>)> {
        let (pieces, len) = split(path)?;
        self.fit(&pieces[..len])
    }

    fn fit<'p>(&self, pieces: &[&'p str]) -> Option<(Route, Params<'p>)> {
        let candidates = &self.tried[self.starts[pieces.len()]..self.starts[pieces.len() + 1]];
        candidates.iter().find_map(|&route| {
            let params = self.templates[route as usize].fit(pieces)?;
            Some((route, params))
        })
    }
}

impl Default for RouteTable {
    fn default() -> Self {
        Self::new()
    }
}

/// The path parameters of the extension routes, still percent-encoded; read decoded.
#[derive(Clone, Copy, Debug, Default)]
pub struct Params<'p> {
    ty: &'p str,
    name: &'p str,
    version: &'p str,
    /// Whether the whole path was found plain (see [`query::check_target`]), set by the
    /// router alone.
    plain: bool,
}

impl<'p> Params<'p> {
    pub fn ty(&self) -> Result<Cow<'p, str>, ApiError> {
        self.decoded(self.ty)
    }

    pub fn name(&self) -> Result<Cow<'p, str>, ApiError> {
        self.decoded(self.name)
    }

    pub fn version(&self) -> Result<Cow<'p, str>, ApiError> {
        self.decoded(self.version)
    }

    /// One of these parameters decoded and checked by [`query::decode_segment`]; as it is when
    /// the path was found plain, which is what decoding would give.
    fn decoded(&self, raw: &'p str) -> Result<Cow<'p, str>, ApiError> {
        if self.plain {
            Ok(Cow::Borrowed(raw))
        } else {
            query::decode_segment(raw)
        }
    }
}

/// What every handler may use; shared by all clones of the router.
pub struct Shared {
    /// Route matching.
    pub routes: RouteTable,
    /// The registry: the cached, merged backends.
    pub registry: Registry,
    /// The configured backend instances, for reading `source=`.
    pub sources: Sources,
    /// Cached backend health, for `/health` and `/readyz`.
    pub health: HealthProbe,
    /// Renders the Prometheus exposition for `/metrics`, within its budget.
    pub metrics: Exposition,
    /// The registry's caches, for `/cache/stats`.
    pub caches: Caches,
    /// Rendered answers with their ETags and compressed forms.
    pub renderings: Renderings,
    /// Drops cached answers when extensions change upstream.
    pub invalidator: Invalidator,
    /// `Cache-Control` of fresh cacheable answers (see [`cache_control`]).
    pub cache_control: HeaderValue,
    /// The secrets of the webhook and purge routes; a route without one does not exist.
    pub hooks: crate::hooks::Keys,
    /// Which routes exist, from `hooks`.
    pub existing: Existing,
    /// The OpenAPI document as served here (see [`openapi::rendered`]).
    pub openapi: Arc<Representation>,
    /// The memory the request bodies being read may hold.
    pub bodies: request_body::Budget,
}

/// Which routes exist here: the webhook and purge routes only with their secret; a route
/// without one answers `404` to every method, `OPTIONS` and CORS preflights included.
#[derive(Clone, Copy, Debug)]
pub struct Existing {
    gitea: bool,
    oci: bool,
    purge: bool,
}

impl Existing {
    pub fn new(keys: &crate::hooks::Keys) -> Self {
        Self {
            gitea: keys.gitea.is_some(),
            oci: keys.oci.is_some(),
            purge: keys.admin.is_some(),
        }
    }

    fn route(self, route: Route) -> bool {
        match route {
            Route::HookGitea => self.gitea,
            Route::HookOci => self.oci,
            Route::CachePurge => self.purge,
            _ => true,
        }
    }

    /// The answer to an `OPTIONS` on `path`, decided above the router (see
    /// `middleware::preflight`): `404` on a route that does not exist here; none for a CORS
    /// preflight (the CORS layer answers it); else `405` with the route's own methods, GET and
    /// HEAD for unknown paths.
    pub fn options_refusal(self, path: &str, preflight: bool) -> Option<ApiError> {
        static ROUTES: std::sync::OnceLock<RouteTable> = std::sync::OnceLock::new();
        match ROUTES.get_or_init(RouteTable::new).at(path) {
            Some((route, _)) if !self.route(route) => Some(ApiError::route_not_found()),
            _ if preflight => None,
            found => Some(ApiError::method_not_allowed(
                found.map_or(ALLOW, |(route, _)| route.allow()),
            )),
        }
    }
}

/// The router: a plain service that matches the path and calls the handler.
#[derive(Clone)]
pub struct Router {
    shared: Arc<Shared>,
}

impl Router {
    pub fn new(shared: Shared) -> Self {
        Self {
            shared: Arc::new(shared),
        }
    }
}

/// The methods most paths answer: the API is read-only but for the batch resolve, the
/// webhooks and the purge.
pub const ALLOW: &str = "GET, HEAD";

impl<B> Service<Request<B>> for Router
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let shared = self.shared.clone();
        let host = query::check_host(&req);
        let (mut parts, body) = req.into_parts();
        let quota = parts.extensions.remove::<QuotaCharge>();
        let http::request::Parts {
            method,
            uri,
            headers,
            ..
        } = parts;
        Box::pin(async move {
            if let Err(e) = host {
                return Ok(e.into_response());
            }
            let path = uri.path();
            let found = shared.routes.at(path);
            // A route whose secret is not configured does not exist, whatever the method.
            if found.is_some_and(|(route, _)| !shared.existing.route(route)) {
                return Ok(ApiError::route_not_found().into_response());
            }
            // Before anything else about the path: each route answers its own methods; unknown
            // paths and `*` answer GET and HEAD only.
            let allowed = match found {
                Some((route, _)) if route.takes_post() => method == Method::POST,
                _ => method == Method::GET || method == Method::HEAD,
            };
            if !allowed {
                let allow = found.as_ref().map_or(ALLOW, |(route, _)| route.allow());
                return Ok(ApiError::method_not_allowed(allow).into_response());
            }
            let plain = match query::check_target(path, uri.query()) {
                Ok(checked) => checked == query::Path::Plain,
                Err(e) => return Ok(e.into_response()),
            };
            let Some((route, mut params)) = found else {
                return Ok(ApiError::route_not_found().into_response());
            };
            params.plain = plain;
            if route.takes_post() {
                // These routes take no parameters, but a query is checked as on every other.
                if let Err(e) = query::Query::parse(uri.query()) {
                    return Ok(e.into_response());
                }
                if let Some(refused) = request_body::coding_refused(&headers) {
                    return Ok(refused);
                }
            }
            // Read for downloads alone. Range is defined for GET alone (RFC 9110 §14.2): a
            // HEAD describes the whole.
            let range = (route == Route::Download && method == Method::GET)
                .then(|| range::requested(&headers))
                .flatten();
            let call = handlers::Call {
                shared: &shared,
                params,
                query: uri.query(),
                head: method == Method::HEAD,
                range,
            };
            let answer = match route {
                Route::ResolveBatch => resolve::batch(&shared, body, quota).await,
                Route::HookGitea => {
                    hooks::deliver(&shared, hooks::Sender::Gitea, &headers, body).await
                }
                Route::HookOci => hooks::deliver(&shared, hooks::Sender::Oci, &headers, body).await,
                Route::CachePurge => hooks::purge(&shared, &headers, body).await,
                _ => call.handle(route).await,
            };
            let mut response = match answer {
                Ok(response) => response,
                Err(e) => e.into_response(),
            };
            response.extensions_mut().insert(route);
            if method == Method::HEAD {
                // Here, before compression and the rest see a body for nothing.
                body::for_head(&mut response);
            }
            Ok(response)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_parameters_are_found_by_name() {
        let table = RouteTable::new();
        let cases = [
            (
                "/api/v1/extensions/provider/aws/1.2.0",
                Route::Download,
                ["provider", "aws", "1.2.0"],
            ),
            (
                "/api/v1/extensions/cluster/web/versions",
                Route::Versions,
                ["cluster", "web", ""],
            ),
            (
                "/api/v1/extensions/taskserv/k%38s",
                Route::Get,
                ["taskserv", "k%38s", ""],
            ),
            (
                "/api/v1/resolve/provider/gcp",
                Route::Resolve,
                ["provider", "gcp", ""],
            ),
            ("/api/v1/extensions", Route::List, ["", "", ""]),
        ];
        for (path, route, [ty, name, version]) in cases {
            let (found, params) = table.at(path).expect(path);
            assert_eq!(found, route, "{path}");
            assert_eq!(
                (params.ty, params.name, params.version),
                (ty, name, version),
                "{path}"
            );
            assert!(!params.plain, "{path}: plain is the router's to say");
        }
    }

    #[test]
    fn telling_one_route_agrees_with_the_table() {
        let table = RouteTable::new();
        let paths = [
            "/",
            "*",
            "",
            "/livez",
            "/api/v1/extensions",
            "/api/v1/extensions/search",
            "/api/v1/extensions/provider/aws",
            "/api/v1/extensions/provider/aws/",
            "/api/v1/extensions/provider/aws/versions",
            "/api/v1/extensions/provider/aws/1.2.0",
            "/api/v1/extensions/provider/aws/1.2.0/",
            "/api/v1/extensions/provider/aws%2F1.2.0",
            "/api/v1/extensions//aws/1.2.0",
            "/api/v1/resolve/provider/aws",
            "/api/v1/cache/stats",
            "/api/v1/openapi.json",
            "/a/b/c/d/e/f/g/h/i/j",
        ];
        for path in paths {
            for route in Route::ALL {
                assert_eq!(
                    table.is(path, route),
                    table.route(path) == Some(route),
                    "{path} {route:?}"
                );
            }
        }
        assert!(table.is("/api/v1/extensions/provider/aws/1.2.0", Route::Download));
    }

    /// The table finds what matchit, the router it replaced, finds for the same templates:
    /// the route and every parameter, for each template's paths with each segment in turn
    /// replaced by another route's literal, a value, nothing, or cut off or doubled.
    #[test]
    fn the_table_finds_what_matchit_finds() {
        let table = RouteTable::new();
        let mut reference = matchit::Router::new();
        for route in Route::ALL {
            reference.insert(route.template(), route).unwrap();
        }
        let mut pool: Vec<&str> = Route::ALL
            .iter()
            .flat_map(|route| route.template().split('/'))
            .filter(|piece| !piece.starts_with('{'))
            .collect();
        pool.extend(["aws", "1.2.0", "k%38s", "a b", "*", "{type}"]);
        pool.sort_unstable();
        pool.dedup();
        let mut checked = 0;
        for route in Route::ALL {
            let pieces: Vec<&str> = route.template().split('/').collect();
            let mut paths = Vec::new();
            for i in 0..pieces.len() {
                for replacement in &pool {
                    let mut path: Vec<&str> = pieces
                        .iter()
                        .enumerate()
                        .map(|(k, &piece)| match piece.starts_with('{') {
                            true if k < i => "y",
                            true => "x",
                            false => piece,
                        })
                        .collect();
                    path[i] = replacement;
                    paths.push(path.join("/"));
                    paths.push(format!("{}/", path.join("/")));
                    paths.push(path[..i].join("/"));
                    paths.push(format!("{}/extra", path.join("/")));
                }
            }
            for path in &paths {
                let expected = reference.at(path).ok().map(|m| {
                    let param = |name| m.params.get(name).unwrap_or("");
                    (*m.value, [param("type"), param("name"), param("version")])
                });
                let found = table
                    .at(path)
                    .map(|(route, p)| (route, [p.ty, p.name, p.version]));
                assert_eq!(found, expected, "{path:?}");
                checked += 1;
            }
        }
        assert!(checked > 5_000, "{checked} paths");
    }
}
