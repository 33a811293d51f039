//! One connection's clock: how long it may stay open without a request in flight.
//!
//! - From accept, the client has `header_read_timeout` to send its first complete request
//!   head. hyper-util reads the protocol preface before hyper's own header timeout starts,
//!   so without this an empty connection, or one that sent half a preface, is held for ever.
//! - An HTTP/1 connection with nothing in flight has `keepalive_timeout`; once the first
//!   byte of its next request head arrives, at most `header_read_timeout` more. (hyper's own
//!   header timeout also runs while a connection is idle between requests, so it would cut
//!   keep-alive at the header timeout; it is off and this clock does both.)
//! - An HTTP/2 connection with no stream in flight has `keepalive_timeout` (hyper has no idle
//!   timeout for HTTP/2, and its pings only find peers that are gone, not idle ones).
//! - While a request is in flight the clock stops: the request timeout bounds the time to
//!   the response head and the send timeout a body the client does not take.
//!
//! A request is in flight from the moment hyper hands it to the service until its response
//! body is dropped (finished, aborted or its connection gone).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use http_body::{Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::body::Body;
use crate::server::send_timeout;
use crate::BoxError;

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The two durations the clock is made of.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// To the first complete request head, and from the first byte of a later HTTP/1 head.
    pub header: Duration,
    /// With nothing in flight.
    pub keepalive: Duration,
}

/// What the bytes read so far say the connection speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Protocol {
    /// This many bytes matched the HTTP/2 preface so far.
    Detecting(usize),
    Http1,
    Http2,
}

#[derive(Debug)]
struct State {
    protocol: Protocol,
    /// Requests handed to the service whose response bodies are still alive.
    in_flight: usize,
    /// When the connection is closed unless a request starts first; `None` while one is in
    /// flight.
    deadline: Option<Instant>,
    /// When the watcher ([`Clock::expired`]) wakes to look at the deadline again; `None`
    /// while it waits for a deadline to be set.
    armed: Option<Instant>,
}

/// The clock of one connection, shared by its I/O, its service and its response bodies.
#[derive(Debug)]
pub struct Clock {
    timeouts: Timeouts,
    state: Mutex<State>,
    /// Wakes [`Clock::expired`] when a deadline is set earlier than it is armed for.
    changed: Notify,
}

impl Clock {
    /// The clock of a connection accepted now.
    pub fn new(timeouts: Timeouts) -> Arc<Self> {
        Arc::new(Self {
            timeouts,
            state: Mutex::new(State {
                protocol: Protocol::Detecting(0),
                in_flight: 0,
                deadline: Some(Instant::now() + timeouts.header),
                armed: None,
            }),
            changed: Notify::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is a few integers updated in one step: a panic elsewhere cannot leave
        // it half-written, so a poisoned lock is still good.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets the deadline, waking the watcher only when it would otherwise wake too late: a
    /// later deadline is found when the watcher wakes as armed.
    fn set_deadline(&self, state: &mut State, deadline: Instant) {
        state.deadline = Some(deadline);
        if state.armed.is_none_or(|armed| deadline < armed) {
            self.changed.notify_one();
        }
    }

    /// Notes bytes the client sent.
    fn read(&self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let mut state = self.lock();
        if let Protocol::Detecting(matched) = state.protocol {
            let rest = &H2_PREFACE[matched..];
            let same = bytes.iter().zip(rest).take_while(|(a, b)| a == b).count();
            state.protocol = if same == rest.len() {
                Protocol::Http2
            } else if same == bytes.len() {
                Protocol::Detecting(matched + same)
            } else {
                Protocol::Http1
            };
            if state.protocol == Protocol::Http2 && state.in_flight == 0 {
                // The preface is all an HTTP/2 client owes before it is idle.
                self.set_deadline(&mut state, Instant::now() + self.timeouts.keepalive);
            }
            return;
        }
        if state.protocol == Protocol::Http1 && state.in_flight == 0 {
            // The first byte of a request head starts the header clock; later bytes of the
            // same head do not restart it, so a trickling head is cut all the same.
            let by = Instant::now() + self.timeouts.header;
            if state.deadline.is_none_or(|d| by < d) {
                self.set_deadline(&mut state, by);
            }
        }
    }

    /// A request was handed to the service: the clock stops until its response is gone.
    pub fn start(self: &Arc<Self>) -> InFlight {
        let mut state = self.lock();
        state.in_flight += 1;
        state.deadline = None;
        InFlight(self.clone())
    }

    /// Completes when the deadline passes with nothing in flight.
    ///
    /// Sleeps at most the header timeout at once. A request head starting moves the deadline
    /// to no earlier than then, so requests on a kept-alive connection never wake the
    /// watcher, and its timer is set again only when it wakes (about once per header timeout,
    /// or per keep-alive timeout when that is shorter), not per request.
    pub async fn expired(&self) {
        loop {
            let changed = self.changed.notified();
            let now = Instant::now();
            let armed = {
                let mut state = self.lock();
                let armed = match state.deadline {
                    Some(deadline) if deadline <= now => return,
                    Some(deadline) => Some(deadline.min(now + self.timeouts.header)),
                    None => None,
                };
                state.armed = armed;
                armed
            };
            match armed {
                Some(armed) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(armed) => {}
                        () = changed => {}
                    }
                }
                None => changed.await,
            }
        }
    }

    #[cfg(test)]
    fn deadline(&self) -> Option<Instant> {
        self.lock().deadline
    }
}

/// A request in flight; dropping it (with its response body) restarts the idle clock.
#[derive(Debug)]
pub struct InFlight(Arc<Clock>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let clock = &self.0;
        let mut state = clock.lock();
        state.in_flight -= 1;
        if state.in_flight == 0 {
            clock.set_deadline(&mut state, Instant::now() + clock.timeouts.keepalive);
        }
    }
}

pin_project! {
    /// A connection's socket, telling the clock what the client sends.
    pub struct Watched<I> {
        #[pin]
        io: I,
        clock: Arc<Clock>,
    }
}

impl<I> Watched<I> {
    pub fn new(io: I, clock: Arc<Clock>) -> Self {
        Self { io, clock }
    }
}

impl<I: AsyncRead> AsyncRead for Watched<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let result = this.io.poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = result {
            this.clock.read(&buf.filled()[before..]);
        }
        result
    }
}

impl<I: AsyncWrite> AsyncWrite for Watched<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().io.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().io.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }
}

pin_project! {
    /// A response body as hyper sends it: keeps its request in flight while alive, and tells
    /// the send timeout when it has handed bytes over and waits for the client to take them.
    pub struct ResponseBody {
        #[pin]
        inner: Body,
        download: bool,
        in_flight: InFlight,
    }

    impl PinnedDrop for ResponseBody {
        fn drop(this: Pin<&mut Self>) {
            send_timeout::asked();
        }
    }
}

impl ResponseBody {
    /// `download` says whether a stall is counted as a stalled download.
    pub fn new(inner: Body, download: bool, in_flight: InFlight) -> Self {
        Self {
            inner,
            download,
            in_flight,
        }
    }
}

impl http_body::Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        // Asked for more: whatever it waits for now is the backend, not the client.
        send_timeout::asked();
        let frame = this.inner.poll_frame(cx);
        if let Poll::Ready(Some(Ok(_))) = frame {
            send_timeout::handed_over(*this.download);
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

pin_project! {
    /// A future polled only once something it waits on has woken it.
    ///
    /// A connection's task polls the connection beside its clock's watcher
    /// ([`Clock::expired`]) and the notice that the service stops, and a select polls every
    /// branch on every wake-up: each would be polled on every request, registering its waker
    /// with its timer or channel again each time (about 300 instructions for the watcher, 200
    /// for the notice), with nothing to look at. Polled through this, a future gets a waker of
    /// its own, and is polled only when that waker has fired.
    pub struct WhenWoken<F> {
        #[pin]
        inner: F,
        woken: Arc<Woken>,
        waker: Waker,
    }
}

/// Set by the inner future's waker, which then wakes the task.
struct Woken {
    flag: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Woken {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.flag.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl<F> WhenWoken<F> {
    /// `inner`, polled the first time and from then on only when it woke.
    pub fn new(inner: F) -> Self {
        let woken = Arc::new(Woken {
            flag: AtomicBool::new(true),
            task: AtomicWaker::new(),
        });
        Self {
            inner,
            waker: Waker::from(woken.clone()),
            woken,
        }
    }
}

impl<F: Future> Future for WhenWoken<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        // Registered before the flag is read: a wake in between wakes this task again.
        this.woken.task.register(cx.waker());
        if !this.woken.flag.swap(false, Ordering::Acquire) {
            return Poll::Pending;
        }
        this.inner.poll(&mut Context::from_waker(this.waker))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    const TIMEOUTS: Timeouts = Timeouts {
        header: Duration::from_secs(10),
        keepalive: Duration::from_secs(60),
    };

    #[tokio::test(start_paused = true)]
    async fn a_new_connection_has_the_header_timeout() {
        let clock = Clock::new(TIMEOUTS);
        assert_eq!(clock.deadline(), Some(Instant::now() + TIMEOUTS.header));
        // Half a preface decides nothing and moves nothing.
        tokio::time::advance(Duration::from_secs(3)).await;
        clock.read(b"PRI * HTTP");
        assert_eq!(clock.lock().protocol, Protocol::Detecting(10));
        let start = Instant::now();
        tokio::time::timeout(Duration::from_secs(3600), clock.expired())
            .await
            .unwrap();
        assert_eq!(start.elapsed(), Duration::from_secs(7));
    }

    #[tokio::test(start_paused = true)]
    async fn http2_is_idle_after_its_preface_and_between_streams() {
        let clock = Clock::new(TIMEOUTS);
        clock.read(&H2_PREFACE[..5]);
        clock.read(&H2_PREFACE[5..]);
        assert_eq!(clock.lock().protocol, Protocol::Http2);
        assert_eq!(clock.deadline(), Some(Instant::now() + TIMEOUTS.keepalive));
        // Frames with no request (SETTINGS, PING) neither stop nor tighten the clock.
        clock.read(b"\0\0\0\x04\0\0\0\0\0");
        assert_eq!(clock.deadline(), Some(Instant::now() + TIMEOUTS.keepalive));
        let one = clock.start();
        let two = clock.start();
        assert_eq!(clock.deadline(), None);
        drop(one);
        assert_eq!(clock.deadline(), None);
        tokio::time::advance(Duration::from_secs(5)).await;
        drop(two);
        assert_eq!(clock.deadline(), Some(Instant::now() + TIMEOUTS.keepalive));
    }

    #[tokio::test(start_paused = true)]
    async fn a_preface_wakes_a_watcher_waiting_on_a_later_header_deadline() {
        let clock = Clock::new(Timeouts {
            header: Duration::from_secs(3600),
            keepalive: Duration::from_secs(1),
        });
        let start = Instant::now();
        let watcher = {
            let clock = clock.clone();
            tokio::spawn(async move { clock.expired().await })
        };
        tokio::task::yield_now().await;
        clock.read(H2_PREFACE);
        tokio::time::timeout(Duration::from_secs(60), watcher)
            .await
            .expect("the watcher slept through the earlier keep-alive deadline")
            .unwrap();
        assert_eq!(start.elapsed(), Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn http1_keep_alive_has_the_keepalive_timeout_until_a_head_starts() {
        let clock = Clock::new(TIMEOUTS);
        clock.read(b"GET / HTTP/1.1\r\n");
        assert_eq!(clock.lock().protocol, Protocol::Http1);
        let request = clock.start();
        // Pipelined bytes while busy change nothing.
        clock.read(b"GET /next");
        assert_eq!(clock.deadline(), None);
        drop(request);
        let idle = Instant::now();
        assert_eq!(clock.deadline(), Some(idle + TIMEOUTS.keepalive));
        tokio::time::advance(Duration::from_secs(30)).await;
        clock.read(b"G");
        let first_byte = Instant::now();
        assert_eq!(clock.deadline(), Some(first_byte + TIMEOUTS.header));
        // A trickling head does not push its deadline.
        tokio::time::advance(Duration::from_secs(5)).await;
        clock.read(b"E");
        assert_eq!(clock.deadline(), Some(first_byte + TIMEOUTS.header));
    }

    /// Counts the wake-ups of a future polled by hand.
    struct Wakes(AtomicUsize);

    impl Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn requests_on_a_kept_alive_connection_do_not_wake_the_watcher() {
        let clock = Clock::new(TIMEOUTS);
        let wakes = Arc::new(Wakes(AtomicUsize::new(0)));
        let waker = Waker::from(wakes.clone());
        let mut watcher = std::pin::pin!(clock.expired());
        let mut idle = Instant::now();
        for _ in 0..100 {
            // Polled as its task would be, after each request.
            assert!(watcher
                .as_mut()
                .poll(&mut Context::from_waker(&waker))
                .is_pending());
            clock.read(b"GET / HTTP/1.1\r\n\r\n");
            let request = clock.start();
            tokio::time::advance(Duration::from_millis(10)).await;
            drop(request);
            idle = Instant::now();
            tokio::time::advance(Duration::from_millis(10)).await;
        }
        assert_eq!(wakes.0.load(Ordering::SeqCst), 0);
        // It still closes the connection when it has been idle for the keep-alive timeout.
        tokio::time::timeout(Duration::from_secs(3600), watcher)
            .await
            .unwrap();
        assert_eq!(idle.elapsed(), TIMEOUTS.keepalive);
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_started_near_the_end_of_keep_alive_keeps_the_earlier_deadline() {
        let clock = Clock::new(TIMEOUTS);
        clock.read(b"GET");
        drop(clock.start());
        tokio::time::advance(Duration::from_secs(55)).await;
        clock.read(b"G");
        let start = Instant::now();
        tokio::time::timeout(Duration::from_secs(3600), clock.expired())
            .await
            .unwrap();
        assert_eq!(start.elapsed(), Duration::from_secs(5));
    }

    /// Counts its polls; ready once told to be, waking whoever polled it last.
    #[derive(Default)]
    struct Polls {
        count: AtomicUsize,
        ready: AtomicBool,
        waker: Mutex<Option<Waker>>,
    }

    impl Polls {
        fn future(self: &Arc<Self>) -> impl Future<Output = ()> + use<> {
            let polls = self.clone();
            std::future::poll_fn(move |cx| {
                polls.count.fetch_add(1, Ordering::SeqCst);
                if polls.ready.load(Ordering::SeqCst) {
                    return Poll::Ready(());
                }
                *polls.waker.lock().unwrap() = Some(cx.waker().clone());
                Poll::Pending
            })
        }

        fn finish(&self) {
            self.ready.store(true, Ordering::SeqCst);
            if let Some(waker) = self.waker.lock().unwrap().take() {
                waker.wake();
            }
        }
    }

    #[test]
    fn a_future_when_woken_is_polled_only_once_it_woke() {
        let polls = Arc::new(Polls::default());
        let wakes = Arc::new(Wakes(AtomicUsize::new(0)));
        let task = Waker::from(wakes.clone());
        let mut cx = Context::from_waker(&task);
        let mut watched = std::pin::pin!(WhenWoken::new(polls.future()));
        for _ in 0..5 {
            assert!(watched.as_mut().poll(&mut cx).is_pending());
        }
        assert_eq!(
            polls.count.load(Ordering::SeqCst),
            1,
            "polled the first time only"
        );
        assert_eq!(wakes.0.load(Ordering::SeqCst), 0);
        polls.finish();
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1, "its wake woke the task");
        assert!(watched.as_mut().poll(&mut cx).is_ready());
        assert_eq!(polls.count.load(Ordering::SeqCst), 2);
    }
}
