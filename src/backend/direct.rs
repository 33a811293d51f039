//! A large download's own HTTP/1.1 connection, driven by the task that sends the answer.
//!
//! Through the shared client, a download's bytes cross two tasks: the pooled connection's,
//! which reads the upstream socket, and the answer's, which writes the client's. They wake
//! each other about once a frame, and tokio runs at most three such wake-ups in a row on the
//! same worker (`MAX_LIFO_POLLS_PER_TICK`): the next wakes the idle worker to steal the task,
//! at the cost of an interrupt and two context switches, about once a frame. Here the
//! connection is polled from inside the body the answer's task polls, so the frame read is the
//! frame written in the same poll, with no wake-up between tasks; and reads take up to
//! [`READ_BUFFER`] bytes at a time. The connection serves this one download and closes with it.
//!
//! It sends what the shared client would (the same user agent and `Accept`, TLS verified by the
//! platform's verifier), over HTTP/1.1 where the shared client may negotiate HTTP/2. Where the
//! shared client's settings cannot be matched (a proxy named by the environment, TLS
//! verification switched off) there is no [`Direct`], and downloads go through the shared
//! client like every other call.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll, Wake, Waker};
use std::time::Duration;

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder, MaybeHttpsStream};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use reqwest::header::{HeaderMap, HeaderValue, ACCEPT, HOST, USER_AGENT};
use reqwest::{Method, Url};
use sync_wrapper::SyncWrapper;
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};
use tower::Service;

use crate::backend::http::authority;
use crate::BoxError;

/// The most bytes the read buffer of a download's connection grows to (hyper's default is about
/// 400 KiB): a read takes what the buffer has room for, so a frame handed on is about this
/// large at most.
pub const READ_BUFFER: usize = 1024 * 1024;

/// Downloads of at least this many bytes get their own connection. A smaller one is a few
/// frames, whose wake-ups cost less than a new connection's TCP and TLS handshakes.
pub const OWN_CONNECTION_FROM: u64 = 4 * 1024 * 1024;

/// The variables naming a proxy that the shared client (reqwest) follows.
const PROXY_VARIABLES: [&str; 6] = [
    "http_proxy",
    "HTTP_PROXY",
    "https_proxy",
    "HTTPS_PROXY",
    "all_proxy",
    "ALL_PROXY",
];

type Io = MaybeHttpsStream<TokioIo<TcpStream>>;
type Connection = http1::Connection<Io, Empty<Bytes>>;

/// Why a download's connection gave no answer.
#[derive(Debug)]
pub enum Failure {
    /// Connecting, the TLS handshake, or waiting for the answer's head took longer than the
    /// backend's timeout.
    Timeout,
    /// No connection could be made (refused, unresolvable, TLS refused).
    Connect,
    /// The connection broke or the answer was not HTTP.
    Protocol,
}

/// Opens a connection per download; shared by all downloads of a backend.
#[derive(Clone)]
pub struct Direct {
    connector: HttpsConnector<HttpConnector>,
    timeout: Duration,
}

impl Direct {
    /// The connection maker for a backend with `timeout` (connecting, each wait for bytes) and
    /// `verify_tls`; `None` when the shared client's settings cannot be matched.
    pub fn new(timeout: Duration, verify_tls: bool) -> Option<Self> {
        let proxied = PROXY_VARIABLES
            .iter()
            .any(|name| std::env::var_os(name).is_some_and(|v| !v.is_empty()));
        if proxied || !verify_tls {
            return None;
        }
        Self::verifying(timeout)
    }

    /// The connection maker with TLS verified, whatever the environment says.
    fn verifying(timeout: Duration) -> Option<Self> {
        // As the pooled client: hyper-util splits the connect timeout between the addresses a
        // name resolves to, so one that does not answer leaves time for the next. The whole of
        // connecting, TLS included, is bounded again in `send`.
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(timeout));
        http.set_nodelay(true);
        let connector = HttpsConnectorBuilder::new()
            .try_with_platform_verifier()
            .ok()?
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        Some(Self { connector, timeout })
    }

    /// Sends a GET or HEAD for `url` with `headers` (the caller decides `Authorization`) on a
    /// new connection, and returns the answer's head with a body that drives the connection.
    pub async fn send(
        &self,
        method: &Method,
        url: &Url,
        headers: HeaderMap,
    ) -> Result<reqwest::Response, Failure> {
        let target: hyper::Uri = url.as_str().parse().map_err(|_| Failure::Connect)?;
        let mut connector = self.connector.clone();
        let io = tokio::time::timeout(self.timeout, connector.call(target))
            .await
            .map_err(|_| Failure::Timeout)?
            .map_err(|e| {
                tracing::debug!(error = %e, "cannot connect for a download");
                if timed_out(e.as_ref()) {
                    Failure::Timeout
                } else {
                    Failure::Connect
                }
            })?;
        let (mut sender, connection) = http1::Builder::new()
            .max_buf_size(READ_BUFFER)
            .handshake::<_, Empty<Bytes>>(io)
            .await
            .map_err(protocol)?;
        let request = request(method, url, headers)?;
        let answer = sender.send_request(request);
        // No other request follows: the connection closes once this answer is read.
        drop(sender);
        let mut connection = Some(Box::pin(connection));
        let mut answer = std::pin::pin!(answer);
        let head = std::future::poll_fn(|cx| {
            if let Poll::Ready(head) = answer.as_mut().poll(cx) {
                return Poll::Ready(head.map_err(protocol));
            }
            let Some(driving) = connection.as_mut() else {
                return Poll::Ready(Err(Failure::Protocol));
            };
            let ended = ready!(driving.as_mut().poll(cx));
            connection = None;
            // The head may have come in the same poll as the connection's end.
            match answer.as_mut().poll(cx) {
                Poll::Ready(head) => Poll::Ready(head.map_err(protocol)),
                Poll::Pending => Poll::Ready(Err(ended.err().map_or(Failure::Protocol, protocol))),
            }
        });
        let response = tokio::time::timeout(self.timeout, head)
            .await
            .map_err(|_| Failure::Timeout)??;
        let (parts, body) = response.into_parts();
        let body = Driven::new(connection, body, self.timeout);
        Ok(http::Response::from_parts(parts, reqwest::Body::wrap(body)).into())
    }
}

/// Whether `error` or one of its causes is an I/O time-out (the connect timeout's).
fn timed_out(error: &(dyn std::error::Error + 'static)) -> bool {
    std::iter::successors(Some(error), |e| e.source()).any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
    })
}

/// A broken connection or an answer that is not HTTP, its cause logged (it names no URL).
fn protocol(e: hyper::Error) -> Failure {
    tracing::debug!(error = %e, "download connection failed");
    Failure::Protocol
}

/// The request line and headers for `url` in origin form, with `Host`, the user agent and
/// (unless given) `Accept: */*`, as the pooled client sends.
fn request(
    method: &Method,
    url: &Url,
    mut headers: HeaderMap,
) -> Result<http::Request<Empty<Bytes>>, Failure> {
    let path = match url.query() {
        Some(query) => format!("{}?{query}", url.path()),
        None => url.path().to_owned(),
    };
    let host = authority(url).ok_or(Failure::Connect)?;
    headers.insert(
        HOST,
        HeaderValue::from_str(&host).map_err(|_| Failure::Connect)?,
    );
    headers.insert(
        USER_AGENT,
        HeaderValue::from_static(concat!("extension-registry/", env!("CARGO_PKG_VERSION"))),
    );
    headers
        .entry(ACCEPT)
        .or_insert(HeaderValue::from_static("*/*"));
    let mut request = http::Request::builder()
        .method(method.clone())
        .uri(path)
        .body(Empty::new())
        .map_err(|_| Failure::Connect)?;
    *request.headers_mut() = headers;
    Ok(request)
}

/// [`InPoll`]'s states: the task is not polling, is polling, or is polling and was woken.
const IDLE: u8 = 0;
const POLLING: u8 = 1;
const WOKEN: u8 = 2;

/// Polls in a row within one [`Driven::poll_frame`] before it yields to other tasks.
const POLLS_IN_A_ROW: usize = 32;

/// What a wake-up of the connection or body does: while [`Driven`] is polling them, it only
/// notes that they must be polled again (waking the task from inside its own poll would make
/// tokio reschedule it as a yield, and wake the idle worker to steal it); otherwise it wakes
/// the task. One atomic state, so a wake-up from another thread is either seen by the poll
/// or wakes the task, never lost between the two.
#[derive(Default)]
struct InPoll {
    task: AtomicWaker,
    state: AtomicU8,
}

impl InPoll {
    /// Runs `poll` as the task's poll; true when it was woken meanwhile.
    fn polling<T>(&self, poll: impl FnOnce() -> T) -> (T, bool) {
        self.state.store(POLLING, Ordering::SeqCst);
        let polled = poll();
        let woken = self.state.swap(IDLE, Ordering::SeqCst) == WOKEN;
        (polled, woken)
    }
}

impl Wake for InPoll {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if let Err(IDLE) =
            self.state
                .compare_exchange(POLLING, WOKEN, Ordering::SeqCst, Ordering::SeqCst)
        {
            self.task.wake();
        }
    }
}

/// An answer's body that drives its own connection when polled; a wait for bytes longer than
/// the timeout fails it.
struct Driven {
    inner: SyncWrapper<State>,
    in_poll: Arc<InPoll>,
    /// The waker the connection and body are polled with, built once from `in_poll`.
    waker: Waker,
    /// The bytes still to come, when the answer gave its length.
    remaining: Option<u64>,
}

struct State {
    /// `None` once the connection has finished.
    connection: Option<Pin<Box<Connection>>>,
    body: Incoming,
    /// Fires when no frame came for `timeout` since the body was first found waiting.
    idle: Pin<Box<Sleep>>,
    /// Whether `idle` runs: set from the first wait after a frame, not from the frame, so
    /// time the answer's side spends elsewhere does not count against the upstream.
    armed: bool,
    timeout: Duration,
}

impl Driven {
    fn new(connection: Option<Pin<Box<Connection>>>, body: Incoming, timeout: Duration) -> Self {
        let remaining = body.size_hint().exact();
        let in_poll = Arc::new(InPoll::default());
        let waker = Waker::from(in_poll.clone());
        Self {
            inner: SyncWrapper::new(State {
                connection,
                body,
                idle: Box::pin(tokio::time::sleep(timeout)),
                armed: false,
                timeout,
            }),
            in_poll,
            waker,
            remaining,
        }
    }
}

impl State {
    /// Polls the body, and the connection when the body has nothing yet.
    fn poll_once(&mut self, waker: &Waker) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut cx = Context::from_waker(waker);
        if let Poll::Ready(frame) = Pin::new(&mut self.body).poll_frame(&mut cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let Some(connection) = self.connection.as_mut() else {
            return Poll::Pending;
        };
        let ended = connection.as_mut().poll(&mut cx);
        if ended.is_ready() {
            self.connection = None;
        }
        // The connection may have handed the body a frame, or its end, before it ended: those
        // come first, and hyper passes a break in the middle of the body on to the body.
        match Pin::new(&mut self.body).poll_frame(&mut cx) {
            Poll::Ready(frame) => Poll::Ready(frame.map(|f| f.map_err(Into::into))),
            Poll::Pending => match ended {
                Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e.into()))),
                _ => Poll::Pending,
            },
        }
    }
}

impl Body for Driven {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let state = this.inner.get_mut();
        this.in_poll.task.register(cx.waker());
        for _ in 0..POLLS_IN_A_ROW {
            let (polled, woken) = this.in_poll.polling(|| state.poll_once(&this.waker));
            match polled {
                Poll::Ready(Some(Ok(frame))) => {
                    if let (Some(remaining), Some(data)) =
                        (this.remaining.as_mut(), frame.data_ref())
                    {
                        *remaining = remaining.saturating_sub(data.len() as u64);
                    }
                    state.armed = false;
                    return Poll::Ready(Some(Ok(frame)));
                }
                Poll::Ready(other) => return Poll::Ready(other),
                Poll::Pending if woken => continue,
                Poll::Pending => {
                    if !state.armed {
                        let deadline = Instant::now() + state.timeout;
                        state.idle.as_mut().reset(deadline);
                        state.armed = true;
                    }
                    if state.idle.as_mut().poll(cx).is_ready() {
                        let stalled = std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "the upstream sent nothing in time",
                        );
                        return Poll::Ready(Some(Err(stalled.into())));
                    }
                    return Poll::Pending;
                }
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    fn size_hint(&self) -> SizeHint {
        self.remaining
            .map_or_else(SizeHint::default, SizeHint::with_exact)
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;
    use std::sync::atomic::AtomicUsize;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio::task::JoinHandle;

    use super::*;

    #[derive(Default)]
    struct Wakes(AtomicUsize);

    impl Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_wake_inside_the_poll_is_noted_and_one_outside_wakes_the_task() {
        let wakes = Arc::new(Wakes::default());
        let in_poll = Arc::new(InPoll::default());
        in_poll.task.register(&Waker::from(wakes.clone()));
        let waker = Waker::from(in_poll.clone());

        let ((), woken) = in_poll.polling(|| waker.wake_by_ref());
        assert!(woken);
        assert_eq!(wakes.0.load(Ordering::SeqCst), 0);
        let ((), woken) = in_poll.polling(|| ());
        assert!(!woken);

        waker.wake_by_ref();
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1);
    }

    /// A server for one request: it answers `answer` (when any) and holds the connection open
    /// until the client closes it; the task returns the request's head.
    async fn upstream(answer: Option<&'static [u8]>) -> (Url, JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let url = Url::parse(&format!("http://{address}/v2/a/blobs/sha256:00?n=1")).unwrap();
        let task = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") {
                let mut byte = [0];
                if socket.read(&mut byte).await.unwrap() == 0 {
                    break;
                }
                head.push(byte[0]);
            }
            if let Some(answer) = answer {
                socket.write_all(answer).await.unwrap();
            }
            let _ = socket.read(&mut [0; 1]).await;
            String::from_utf8(head).unwrap()
        });
        (url, task)
    }

    /// A server for one request that answers `head`, then `rest` once `go` is sent.
    async fn upstream_in_two(
        head: &'static [u8],
        rest: &'static [u8],
    ) -> (Url, tokio::sync::oneshot::Sender<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = Url::parse(&format!("http://{}/v2/", listener.local_addr().unwrap())).unwrap();
        let (go, went) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = [0; 1024];
            let _ = socket.read(&mut request).await.unwrap();
            socket.write_all(head).await.unwrap();
            went.await.unwrap();
            socket.write_all(rest).await.unwrap();
            let _ = socket.read(&mut [0; 1]).await;
        });
        (url, go)
    }

    fn direct(timeout: Duration) -> Direct {
        Direct::verifying(timeout).unwrap()
    }

    #[tokio::test]
    async fn a_download_is_asked_for_in_origin_form_and_its_answer_streamed() {
        let (url, server) =
            upstream(Some(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello")).await;
        let mut headers = HeaderMap::new();
        headers.insert("range", HeaderValue::from_static("bytes=0-4"));
        let response = direct(Duration::from_secs(30))
            .send(&Method::GET, &url, headers)
            .await
            .unwrap();
        assert_eq!(response.content_length(), Some(5));
        assert_eq!(response.bytes().await.unwrap(), "hello");
        let head = server.await.unwrap().to_ascii_lowercase();
        assert!(
            head.starts_with("get /v2/a/blobs/sha256:00?n=1 http/1.1\r\n"),
            "{head}"
        );
        let port = url.port().unwrap();
        for line in [
            format!("host: 127.0.0.1:{port}\r\n"),
            "range: bytes=0-4\r\n".into(),
            "user-agent: extension-registry/".into(),
        ] {
            assert!(head.contains(&line), "{line:?} in {head}");
        }
    }

    #[tokio::test]
    async fn a_whole_answer_is_delivered_even_when_its_head_came_with_the_break() {
        let (url, _server) = upstream(Some(
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhelloHTTP/1.1 200 OK\r\n\r\n",
        ))
        .await;
        let response = direct(Duration::from_secs(30))
            .send(&Method::GET, &url, HeaderMap::new())
            .await
            .unwrap();
        assert_eq!(response.bytes().await.unwrap(), "hello");
    }

    #[tokio::test]
    async fn a_whole_body_is_delivered_even_when_the_connection_then_breaks() {
        let (url, go) = upstream_in_two(
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n",
            b"helloHTTP/1.1 200 OK\r\n\r\n",
        )
        .await;
        let response = direct(Duration::from_secs(30))
            .send(&Method::GET, &url, HeaderMap::new())
            .await
            .unwrap();
        go.send(()).unwrap();
        assert_eq!(response.bytes().await.unwrap(), "hello");
    }

    /// An error caused by another, as the connector's errors are.
    #[derive(Debug)]
    struct Caused(std::io::Error);

    impl std::fmt::Display for Caused {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("tcp connect error")
        }
    }

    impl std::error::Error for Caused {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn a_connect_timeout_among_the_causes_is_a_timeout() {
        let timed_out_io = std::io::Error::from(std::io::ErrorKind::TimedOut);
        assert!(timed_out(&Caused(timed_out_io)));
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert!(!timed_out(&Caused(refused)));
    }

    #[tokio::test]
    async fn an_upstream_that_stops_sending_fails_the_download() {
        let (url, _server) =
            upstream(Some(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhello")).await;
        let response = direct(Duration::from_secs(1))
            .send(&Method::GET, &url, HeaderMap::new())
            .await
            .unwrap();
        let error = response.bytes().await.unwrap_err();
        assert!(error.is_timeout(), "{error:?}");
        let mut causes = std::iter::successors(error.source(), |e| (*e).source());
        assert!(
            causes.any(|e| e.to_string().contains("sent nothing in time")),
            "{error:?}"
        );
    }

    #[tokio::test]
    async fn an_upstream_that_never_answers_times_out() {
        let (url, _server) = upstream(None).await;
        let failure = direct(Duration::from_secs(1))
            .send(&Method::GET, &url, HeaderMap::new())
            .await
            .unwrap_err();
        assert!(matches!(failure, Failure::Timeout), "{failure:?}");
    }

    #[tokio::test]
    async fn an_upstream_that_refuses_the_connection_cannot_be_connected_to() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = Url::parse(&format!("http://{}/v2/", listener.local_addr().unwrap())).unwrap();
        drop(listener);
        let failure = direct(Duration::from_secs(30))
            .send(&Method::GET, &url, HeaderMap::new())
            .await
            .unwrap_err();
        assert!(matches!(failure, Failure::Connect), "{failure:?}");
    }
}
