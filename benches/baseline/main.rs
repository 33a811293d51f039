//! The bare-hyper baseline of `benches/compare.sh`: hyper-util's auto (HTTP/1.1 + h2c) server
//! with one `service_fn` answering captured bytes, nothing else. What the service's cached
//! path is measured against: the same bytes and roughly the same headers, none of the work.
//!
//!   baseline ADDR URI=CAPTURE...
//!
//! Each argument is split at its last `=`, so URI may carry a query. Each CAPTURE names
//! `CAPTURE.headers` (a `curl -D` dump of the service's answer) and `CAPTURE.body`; a request
//! whose path and query is URI gets them, anything else 404.
//! Headers hyper writes itself (`date`, `content-length`, `connection`) are not replayed.
//! Run without an address first (as `cargo bench` and `cargo test` run it), it only prints
//! this usage.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;

/// A captured answer: its headers and body, cloned (reference counts only) per request.
#[derive(Clone)]
struct Answer {
    headers: HeaderMap,
    body: Bytes,
}

fn load(capture: &str) -> Answer {
    let raw = std::fs::read_to_string(format!("{capture}.headers")).expect("readable headers");
    let mut headers = HeaderMap::new();
    for line in raw.lines().skip(1) {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let name: HeaderName = name.trim().parse().expect("header name");
        if ["date", "content-length", "connection", "transfer-encoding"].contains(&name.as_str()) {
            continue;
        }
        let value = HeaderValue::from_str(value.trim()).expect("header value");
        headers.append(name, value);
    }
    let body = std::fs::read(format!("{capture}.body")).expect("readable body");
    Answer {
        headers,
        body: Bytes::from(body),
    }
}

fn answer(answers: &HashMap<String, Answer>, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let key = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
    match answers.get(key) {
        Some(answer) => {
            let mut response = Response::new(Full::new(answer.body.clone()));
            *response.headers_mut() = answer.headers.clone();
            response
        }
        None => {
            let mut response = Response::new(Full::new(Bytes::new()));
            *response.status_mut() = StatusCode::NOT_FOUND;
            response
        }
    }
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // Anything else (cargo's `--bench`, a test filter) is not a server's command line.
    let Some((addr, routes)) = args
        .split_first()
        .and_then(|(addr, routes)| Some((addr.parse::<SocketAddr>().ok()?, routes)))
    else {
        eprintln!("usage: baseline ADDR URI=CAPTURE... (see benches/compare.sh)");
        return;
    };
    let answers: Arc<HashMap<String, Answer>> = Arc::new(
        routes
            .iter()
            .map(|route| {
                let (uri, capture) = route.rsplit_once('=').expect("URI=CAPTURE");
                (uri.to_owned(), load(capture))
            })
            .collect(),
    );
    let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
    // Returns on SIGINT, so that a build instrumented for profile-guided optimisation
    // (`benches/pgo.sh`) writes its counts on the way out.
    let stop = tokio::signal::ctrl_c();
    tokio::pin!(stop);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = &mut stop => return,
        };
        let Ok((stream, _)) = accepted else {
            continue;
        };
        let answers = answers.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let response = answer(&answers, &req);
                async move { Ok::<_, Infallible>(response) }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
