//! A recording front for the registry, on its own loopback port: it forwards the distribution
//! API to the registry and plays the object storage the registry's `redirect` storage
//! middleware sends blob downloads to (on the front's own origin, so a redirect stays on the
//! host the client was configured with), serving the blob file from the registry's storage
//! directory. It records every request with whether it carried `Authorization`, can stretch
//! the storage redirect into a chain or a loop or send it to storage on another host that asks
//! for credentials, and can answer the catalog itself with a long chain of pages.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, HOST, LINK, LOCATION, TRANSFER_ENCODING, WWW_AUTHENTICATE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

/// Where the registry's redirect middleware points blob downloads: paths under it are the
/// storage driver's (`/docker/registry/v2/blobs/sha256/ab/<hex>/data`).
const STORAGE_PREFIX: &str = "/docker/registry/v2/";

/// How the storage side answers a blob download.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Storage {
    /// The file's bytes.
    Serve,
    /// `n` more `307`s (through `/hop/{n - 1}/…` down to `/hop/0/…`) before the bytes.
    Chain(u32),
    /// A `307` to the very same URL, forever.
    Loop,
    /// A `307` to storage on another host (`localhost` instead of `127.0.0.1`, on the front's
    /// port), which answers `401` with this challenge.
    Foreign(Demand),
    /// A `307` to storage on the front's own origin, outside the registry's API
    /// (`/foreign/…`), which answers `401` with this challenge.
    Beside(Demand),
}

/// What the storage of [`Storage::Foreign`] and [`Storage::Beside`] asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Demand {
    /// `Bearer`, naming as realm the front's own `/token`, on the registry's origin.
    Bearer,
    /// `Basic`.
    Basic,
}

/// One request the front saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontSeen {
    /// Path and query, as sent.
    pub target: String,
    /// Whether it carried an `Authorization` header.
    pub authorization: bool,
}

struct State {
    /// Where the front listens, for the URLs it writes.
    addr: SocketAddr,
    /// The registry being fronted and its storage directory, once started.
    registry: Mutex<Option<(SocketAddr, PathBuf)>>,
    /// How blob downloads are answered now.
    storage: Mutex<Storage>,
    /// Every request, in order.
    seen: Mutex<Vec<FrontSeen>>,
    /// When set, `/v2/_catalog` is answered here: this many pages, chained by `Link`, each
    /// naming repositories outside any namespace the tests use, about this many bytes of them.
    catalog_pages: Mutex<Option<(u32, usize)>>,
    /// Forwards the API to the registry, following nothing.
    http: reqwest::Client,
}

/// A running front; dropping it stops it.
pub struct Front {
    /// Where it listens.
    addr: SocketAddr,
    /// Shared with the connections.
    state: Arc<State>,
    /// The accept loop, aborted on drop.
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Front {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Front {
    /// Binds the front; it answers 502 until [`Front::forward_to`] names the registry.
    pub async fn start() -> Front {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind front");
        let addr = listener.local_addr().expect("front addr");
        let state = Arc::new(State {
            addr,
            registry: Mutex::new(None),
            storage: Mutex::new(Storage::Serve),
            seen: Mutex::new(Vec::new()),
            catalog_pages: Mutex::new(None),
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .expect("front client"),
        });
        let task = tokio::spawn(serve(listener, Arc::clone(&state)));
        Front { addr, state, task }
    }

    /// `http://127.0.0.1:<port>`: the base URL of the registry's redirect middleware.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `127.0.0.1:<port>`, as `[oci] registry` takes it.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// Fronts `registry` from now on.
    pub fn forward_to(&self, registry: &super::Registry) {
        let target = (registry.addr, registry.dir().join("data"));
        *self.state.registry.lock().expect("registry") = Some(target);
    }

    pub fn set_storage(&self, storage: Storage) {
        *self.state.storage.lock().expect("storage") = storage;
    }

    /// Answers the catalog with `pages` empty pages from now on, each but the last naming the
    /// next in `Link`.
    pub fn page_catalog(&self, pages: u32) {
        self.page_catalog_padded(pages, 0);
    }

    /// As [`Front::page_catalog`], each page naming about `bytes` of repositories outside the
    /// namespace (`elsewhere/…`).
    pub fn page_catalog_padded(&self, pages: u32, bytes: usize) {
        *self.state.catalog_pages.lock().expect("catalog pages") = Some((pages, bytes));
    }

    /// Every request seen so far, in order.
    pub fn seen(&self) -> Vec<FrontSeen> {
        self.state.seen.lock().expect("seen").clone()
    }
}

async fn serve(listener: TcpListener, state: Arc<State>) {
    let mut connections = JoinSet::new();
    while let Ok((stream, _)) = listener.accept().await {
        let state = Arc::clone(&state);
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let state = Arc::clone(&state);
            async move { Ok::<_, Infallible>(state.answer(req).await) }
        });
        connections.spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
        while connections.try_join_next().is_some() {}
    }
}

type Reply = Response<Full<Bytes>>;

fn status(code: StatusCode) -> Reply {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = code;
    r
}

fn temporary_redirect(location: &str) -> Reply {
    let mut r = status(StatusCode::TEMPORARY_REDIRECT);
    r.headers_mut()
        .insert(LOCATION, location.parse().expect("location"));
    r
}

impl State {
    async fn answer(&self, req: Request<Incoming>) -> Reply {
        let target = req
            .uri()
            .path_and_query()
            .map_or_else(String::new, ToString::to_string);
        self.seen.lock().expect("seen").push(FrontSeen {
            target: target.clone(),
            authorization: req.headers().contains_key(AUTHORIZATION),
        });
        let Some((registry, data)) = self.registry.lock().expect("registry").clone() else {
            return status(StatusCode::BAD_GATEWAY);
        };
        let path = req.uri().path().to_owned();
        if path.starts_with(STORAGE_PREFIX) {
            return match *self.storage.lock().expect("storage") {
                Storage::Serve | Storage::Chain(0) => file(&data, &path),
                Storage::Chain(n) => temporary_redirect(&format!("/hop/{}{path}", n - 1)),
                Storage::Loop => temporary_redirect(&target),
                Storage::Foreign(_) => temporary_redirect(&format!(
                    "http://localhost:{}/foreign{path}",
                    self.addr.port()
                )),
                Storage::Beside(_) => temporary_redirect(&format!("/foreign{path}")),
            };
        }
        if path.starts_with("/foreign/") {
            let challenge = match *self.storage.lock().expect("storage") {
                Storage::Foreign(Demand::Basic) | Storage::Beside(Demand::Basic) => {
                    r#"Basic realm="storage""#.to_owned()
                }
                _ => format!(
                    r#"Bearer realm="http://{}/token",service="storage""#,
                    self.addr
                ),
            };
            let mut r = status(StatusCode::UNAUTHORIZED);
            r.headers_mut()
                .insert(WWW_AUTHENTICATE, challenge.parse().expect("challenge"));
            return r;
        }
        if path == "/v2/_catalog" {
            if let Some((pages, bytes)) = *self.catalog_pages.lock().expect("catalog pages") {
                return catalog_page(&target, pages, bytes);
            }
        }
        if let Some(rest) = path.strip_prefix("/hop/") {
            let Some((n, blob)) = rest.split_once('/') else {
                return status(StatusCode::NOT_FOUND);
            };
            return match n.parse::<u32>() {
                Ok(0) => file(&data, &format!("/{blob}")),
                Ok(n) => temporary_redirect(&format!("/hop/{}/{blob}", n - 1)),
                Err(_) => status(StatusCode::NOT_FOUND),
            };
        }
        self.forward(registry, req, &target).await
    }

    /// The same request to the registry, and its answer back as it was.
    async fn forward(&self, registry: SocketAddr, req: Request<Incoming>, target: &str) -> Reply {
        let (parts, body) = req.into_parts();
        let body = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let mut headers = parts.headers;
        headers.remove(HOST);
        let sent = self
            .http
            .request(parts.method, format!("http://{registry}{target}"))
            .headers(headers)
            .body(body)
            .send()
            .await;
        let Ok(answer) = sent else {
            return status(StatusCode::BAD_GATEWAY);
        };
        let mut reply = status(answer.status());
        *reply.headers_mut() = answer.headers().clone();
        reply.headers_mut().remove(TRANSFER_ENCODING);
        let bytes = answer.bytes().await.unwrap_or_default();
        *reply.body_mut() = Full::new(bytes);
        reply
    }
}

/// Page `page=<k>` of the query (0 without one) of a catalog of `pages` pages, each naming
/// about `bytes` of repositories outside the namespace.
fn catalog_page(target: &str, pages: u32, bytes: usize) -> Reply {
    let page: u32 = target
        .split_once("page=")
        .and_then(|(_, k)| k.parse().ok())
        .unwrap_or(0);
    let mut r = status(StatusCode::OK);
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        "application/json".parse().expect("content type"),
    );
    if page + 1 < pages {
        let next = format!("</v2/_catalog?n=1000&page={}>; rel=\"next\"", page + 1);
        r.headers_mut().insert(LINK, next.parse().expect("link"));
    }
    // Names of 100 bytes with their quotes and comma.
    let names: Vec<String> = (0..bytes / 100)
        .map(|i| format!("elsewhere/{page:04}-{i:08}-{}", "x".repeat(73)))
        .collect();
    let body = serde_json::json!({ "repositories": names }).to_string();
    *r.body_mut() = Full::new(Bytes::from(body));
    r
}

/// A file of the registry's storage, by its storage path.
fn file(data: &std::path::Path, path: &str) -> Reply {
    let relative = path.trim_start_matches('/');
    if relative.split('/').any(|p| p == "..") {
        return status(StatusCode::BAD_REQUEST);
    }
    match std::fs::read(data.join(relative)) {
        Ok(bytes) => {
            let mut r = status(StatusCode::OK);
            *r.body_mut() = Full::new(Bytes::from(bytes));
            r
        }
        Err(_) => status(StatusCode::NOT_FOUND),
    }
}
