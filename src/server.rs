//! The accept loop: HTTP/1.1 and h2c on one listener, with graceful shutdown that stops
//! accepting at once and lets in-flight requests finish within a grace period, and the limits
//! that keep any client from holding a connection for ever: at most `max_connections`, each
//! closed when idle or slow to send its head ([`connection`]), no more than the open-file
//! limit leaves room for ([`descriptors`]), and a send timeout on every response body
//! ([`send_timeout`]).

mod connection;
pub mod descriptors;
pub mod send_timeout;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{ready, Context, Poll, Waker};
use std::time::Duration;

use http::{Method, Request, Response};
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tower::{Service, ServiceExt};

use self::connection::{Clock, InFlight, ResponseBody, Timeouts, Watched, WhenWoken};
use self::send_timeout::{Executor, SendTimeout};
use crate::api::Route;
use crate::config::ServerConfig;
use crate::stack::HttpService;
use crate::telemetry::Gauged;
use crate::BoxError;

/// Gauge of the client connections open now.
pub const HTTP_CONNECTIONS_OPEN: &str = "http_connections_open";
/// Gauge of the connections accepted at once (`[server] max_connections`, or fewer when the
/// open-file limit leaves room for fewer), so alerts can compare the open connections with it.
pub const HTTP_CONNECTIONS_MAX: &str = "http_connections_max";
/// Counter of connections closed at once because the connection cap was reached.
pub const HTTP_CONNECTIONS_REFUSED_TOTAL: &str = "http_connections_refused_total";

/// Pause after a failed accept (e.g. out of file descriptors) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

pub use crate::middleware::rate_limit::PeerAddr;

/// Serves `app` on `listener` with the default `[server]` limits until `shutdown` completes,
/// then waits at most `grace` for in-flight requests.
pub async fn run(
    listener: TcpListener,
    app: HttpService,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) -> std::io::Result<()> {
    serve(listener, app, shutdown, &ServerConfig::default(), grace).await
}

/// Serves `app` on `listener` with the limits of `config` until `shutdown` completes, then
/// waits at most `shutdown_grace_seconds` for in-flight requests.
pub async fn run_with(
    listener: TcpListener,
    app: HttpService,
    shutdown: impl Future<Output = ()>,
    config: &ServerConfig,
) -> std::io::Result<()> {
    serve(listener, app, shutdown, config, config.shutdown_grace()).await
}

/// The accept loop. At the connection cap (`max_connections`, or less under the open-file
/// limit: see [`descriptors`]), a new connection is accepted and closed at once
/// with a reset (and counted), rather than left in the kernel's backlog: the client learns at
/// once instead of waiting on a connection nothing reads, and the process never holds more
/// descriptors than the limit.
async fn serve(
    listener: TcpListener,
    app: HttpService,
    shutdown: impl Future<Output = ()>,
    config: &ServerConfig,
    grace: Duration,
) -> std::io::Result<()> {
    let builder = builder(config);
    let timeouts = Timeouts {
        header: config.header_read_timeout(),
        keepalive: config.keepalive_timeout(),
    };
    let limit = descriptors::open_file_limit();
    let cap = descriptors::connection_cap(
        config.max_connections,
        config.max_concurrent_downloads,
        limit,
    );
    if cap < config.max_connections {
        tracing::warn!(
            max_connections = config.max_connections,
            open_file_limit = limit,
            accepted_at_most = cap,
            "[server] max_connections is more than the open-file limit leaves room for beside \
             the downloads, backends and files; raise the limit (systemd LimitNOFILE=, \
             ulimit -n) to accept more"
        );
    }
    let slots = Arc::new(Semaphore::new(cap.min(Semaphore::MAX_PERMITS)));
    // Shown from the start, so dashboards and alerts see zeros rather than nothing.
    metrics::gauge!(HTTP_CONNECTIONS_OPEN).increment(0.0);
    metrics::gauge!(HTTP_CONNECTIONS_MAX).set(cap as f64);
    metrics::counter!(HTTP_CONNECTIONS_REFUSED_TOTAL).increment(0);
    metrics::counter!(send_timeout::DOWNLOAD_STALLED_TOTAL).increment(0);
    // Told to every connection when the service stops; closed once they all have ended.
    let (stop, _) = watch::channel(());
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors and the like: keep serving the others, and pause
                    // so a persistent failure does not spin the accept loop.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            refuse(stream);
            continue;
        };
        let clock = Clock::new(timeouts);
        let service = PerConnection {
            app: Mutex::new(app.clone()),
            peer,
            clock: clock.clone(),
        };
        let io = TokioIo::new(Watched::new(stream, clock.clone()));
        let conn = builder.serve_connection_with_upgrades(io, service);
        // HTTP/1 response bodies are driven by the connection's task: the send timeout wraps it.
        let conn = SendTimeout::new(conn.into_owned(), config.send_timeout());
        let mut stopping = stop.subscribe();
        tokio::spawn(async move {
            let _open = Gauged::new(slot, HTTP_CONNECTIONS_OPEN);
            let mut conn = pin!(conn);
            // Polled beside the connection, but only when their own wakers fire; first, so
            // that a connection spending the task's whole budget (a flood of HTTP/2 frames)
            // cannot keep them from their timer or channel, and they cost nothing unwoken.
            let mut idle = pin!(WhenWoken::new(clock.expired()));
            let mut told = pin!(WhenWoken::new(stopping.changed()));
            let mut stopped = false;
            loop {
                tokio::select! {
                    biased;
                    _ = told.as_mut(), if !stopped => {
                        // Finish what is in flight, then close (HTTP/2: GOAWAY first).
                        stopped = true;
                        conn.as_mut().inner().graceful_shutdown();
                    }
                    () = idle.as_mut() => {
                        tracing::debug!(%peer, "idle connection closed");
                        break;
                    }
                    ended = conn.as_mut() => {
                        if let Some(Err(e)) = ended {
                            tracing::debug!(error = %e, %peer, "connection ended with an error");
                        }
                        break;
                    }
                }
            }
        });
    }
    drop(listener);
    tracing::info!(
        grace_seconds = grace.as_secs(),
        "shutting down: no new connections"
    );
    let _ = stop.send(());
    if tokio::time::timeout(grace, stop.closed()).await.is_err() {
        tracing::warn!("grace period over; closing the remaining connections");
    }
    Ok(())
}

/// hyper's settings for both protocols.
fn builder(config: &ServerConfig) -> auto::Builder<Executor> {
    let mut builder = auto::Builder::new(Executor {
        send_timeout: config.send_timeout(),
    });
    builder
        .http1()
        .timer(TokioTimer::new())
        // The connection's clock does this, from accept and without cutting keep-alive short.
        .header_read_timeout(None);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(config.http2_max_concurrent_streams)
        // Pings find peers that are gone while streams are open (an idle connection is closed
        // by its clock anyway); one unanswered for the header timeout closes the connection.
        .keep_alive_interval(config.keepalive_timeout())
        .keep_alive_timeout(config.header_read_timeout());
    builder
}

/// Closes a connection over the limit at once, with a reset so no state lingers.
fn refuse(stream: TcpStream) {
    metrics::counter!(HTTP_CONNECTIONS_REFUSED_TOTAL).increment(1);
    if let Err(e) = stream.set_zero_linger() {
        tracing::debug!(error = %e, "cannot set SO_LINGER on a refused connection");
    }
    tracing::debug!("connection refused: the connection cap is reached");
}

/// The application as one connection's hyper service: hands each request over with one body
/// type and the peer's address, and keeps the connection's clock stopped while it is in
/// flight.
///
/// The connection's own copy of the application answers its requests in place: hyper calls
/// it from the connection's task, one request at a time (HTTP/2 streams too), so the lock is
/// never contended, and no request pays for copying every layer of the stack. Should a layer
/// not be ready at once (none is, today), the request waits on it as `oneshot` would.
struct PerConnection {
    app: Mutex<HttpService>,
    peer: SocketAddr,
    clock: Arc<Clock>,
}

impl hyper::service::Service<Request<Incoming>> for PerConnection {
    type Response = Response<ResponseBody>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn call(&self, mut req: Request<Incoming>) -> Self::Future {
        let in_flight = self.clock.start();
        let head = req.method() == Method::HEAD;
        req.extensions_mut().insert(PeerAddr(self.peer));
        // A request whose body has already ended (a GET without one) gets the empty body,
        // which allocates nothing, instead of a box around hyper's.
        let req = req.map(|b| {
            if b.is_end_stream() {
                crate::body::empty()
            } else {
                b.map_err(|e| -> BoxError { Box::new(e) }).boxed_unsync()
            }
        });
        // A panic in a layer's `call` leaves the stack as it was before the call began.
        let mut app = self.app.lock().unwrap_or_else(PoisonError::into_inner);
        let inner = match app.poll_ready(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(Ok(())) => app.call(req),
            Poll::Ready(Err(never)) => match never {},
            // The copy that was polled holds whatever it waits for; it goes on waiting (with
            // a real waker) for this request, and a fresh copy stays for the next.
            Poll::Pending => {
                let fresh = app.clone();
                let waiting = std::mem::replace(&mut *app, fresh);
                Box::pin(waiting.oneshot(req))
            }
        };
        ResponseFuture {
            inner,
            in_flight: Some(in_flight),
            head,
        }
    }
}

/// The application's answer, its body still holding the request in flight.
struct ResponseFuture {
    inner: <HttpService as Service<Request<crate::body::Body>>>::Future,
    in_flight: Option<InFlight>,
    /// Whether the request is a HEAD, whose answer must not carry a body: hyper leaves it out
    /// over HTTP/1 but sends it over HTTP/2, and answers made above the router (a 429, a 503
    /// shed, a 504, a caught panic's 500) still have theirs.
    head: bool,
}

impl Future for ResponseFuture {
    type Output = Result<Response<ResponseBody>, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut response = ready!(self.inner.as_mut().poll(cx))?;
        if self.head {
            crate::body::for_head(&mut response);
        }
        let download = response.extensions().get::<Route>() == Some(&Route::Download);
        let in_flight = self
            .in_flight
            .take()
            .expect("ResponseFuture polled after completion");
        Poll::Ready(Ok(
            response.map(|body| ResponseBody::new(body, download, in_flight))
        ))
    }
}

/// Completes on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutdown signal received");
}
