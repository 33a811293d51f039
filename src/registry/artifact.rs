//! Artifact downloads as streams; the byte ranges a download can ask for and how a backend
//! settles which part it serves; and the body wrapper that checks a sha256 digest while the
//! bytes pass, holding back the last chunk until the digest is known to match.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex};
use std::task::{ready, Context, Poll, Waker};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use pin_project_lite::pin_project;
use sha2::{Digest, Sha256};
use tokio::task::JoinHandle;

use crate::registry::Source;
use crate::BoxError;

/// The bytes of an artifact, streamed from wherever the backend keeps them.
pub type ArtifactBody = UnsyncBoxBody<Bytes, BoxError>;

/// A download in progress: headers known, body still streaming.
#[derive(Debug)]
pub struct Artifact {
    /// The file name offered to the client in `Content-Disposition`.
    pub filename: String,
    /// The exact length when the backend knows it, so clients can show progress and detect
    /// truncation. Taken from metadata (asset size, layer size, file size) where there is one,
    /// so a HEAD answer has it too and an aborted body is never taken for a complete one.
    pub content_length: Option<u64>,
    /// `sha256:<hex>`, when the backend knows the digest the bytes are checked against.
    pub checksum: Option<String>,
    /// Which part of the artifact `body` holds: the whole of it, one range, or nothing
    /// because the range asked for lies past its end. `content_length` is the body's length.
    pub served: Served,
    pub body: ArtifactBody,
}

impl Artifact {
    /// The artifact as a HEAD answer shows it: described from metadata, with no body.
    pub fn head(filename: String, content_length: Option<u64>, checksum: Option<String>) -> Self {
        Self {
            filename,
            content_length,
            checksum,
            served: Served::Whole,
            body: crate::body::empty(),
        }
    }

    /// The answer to a range that lies past the end of an artifact of `size` bytes: nothing
    /// is opened, and the edge answers 416.
    pub fn unsatisfiable(filename: String, size: u64, checksum: Option<String>) -> Self {
        Self {
            served: Served::Unsatisfiable { size },
            ..Self::head(filename, None, checksum)
        }
    }
}

/// The one byte range a download may ask for (`Range: bytes=…`), parsed and checked at the
/// HTTP edge; the backend resolves it against the artifact's size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RangeSpec {
    /// `bytes=first-last`, inclusive, `first <= last`; `last` may lie past the end.
    Bounded { first: u64, last: u64 },
    /// `bytes=first-`: from `first` to the end.
    From(u64),
    /// `bytes=-n`: the last `n` bytes.
    Suffix(u64),
}

/// A range request of a download: the range, and the `If-Range` condition it holds under.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ByteRange {
    pub spec: RangeSpec,
    /// The strong entity-tag of `If-Range`, quotes included: the range is served only if it
    /// is the artifact's own ETag (see [`download_etag`]), else the whole artifact is.
    pub if_etag: Option<String>,
}

/// Bytes `first..=last` of an artifact of `size` bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    pub first: u64,
    pub last: u64,
    pub size: u64,
}

impl Span {
    /// The number of bytes in the span (never 0).
    pub fn length(&self) -> u64 {
        self.last - self.first + 1
    }

    /// The value of `Content-Range` for this span: `bytes first-last/size`.
    pub fn content_range(&self) -> String {
        format!("bytes {}-{}/{}", self.first, self.last, self.size)
    }
}

/// Which part of an artifact a download answer carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Served {
    /// All of it: a 200, verified against the digest when there is one.
    Whole,
    /// One range of it: a 206, not verified (only a whole body can be).
    Part(Span),
    /// Nothing: the range asked for starts at or past the end of `size` bytes; a 416.
    Unsatisfiable { size: u64 },
}

impl ByteRange {
    /// What to serve of an artifact of `size` bytes whose digest is `checksum`, per RFC 9110
    /// §13.1.5 and §14.1.2: the whole artifact when `If-Range` names another (or the digest is
    /// unknown, so nothing can match); otherwise the range, its end clamped to the artifact,
    /// or unsatisfiable when it starts at or past the end (`-0` and any range of an empty
    /// artifact included).
    pub fn select(&self, size: u64, checksum: Option<&str>) -> Served {
        if let Some(wanted) = &self.if_etag {
            if checksum.and_then(download_etag).as_ref() != Some(wanted) {
                return Served::Whole;
            }
        }
        let (first, last) = match self.spec {
            RangeSpec::Bounded { first, last } => (first, last.min(size.saturating_sub(1))),
            RangeSpec::From(first) => (first, size.saturating_sub(1)),
            RangeSpec::Suffix(0) => return Served::Unsatisfiable { size },
            RangeSpec::Suffix(n) => (size.saturating_sub(n), size.saturating_sub(1)),
        };
        if first >= size {
            return Served::Unsatisfiable { size };
        }
        Served::Part(Span { first, last, size })
    }
}

/// What a backend should serve for an optional range request.
pub fn select(range: Option<&ByteRange>, size: u64, checksum: Option<&str>) -> Served {
    range.map_or(Served::Whole, |r| r.select(size, checksum))
}

/// The strong ETag of a download whose digest is `checksum`: `"sha256:<lowercase hex>"`.
pub fn download_etag(checksum: &str) -> Option<String> {
    sha256_digest(checksum).map(|digest| format!("\"sha256:{}\"", encode_hex(&digest)))
}

/// The error a download ends with when its bytes do not match the expected digest (counted
/// per backend instance by `middleware::backend_metrics`).
#[derive(Debug, thiserror::Error)]
#[error("{backend} artifact {what}: sha256 mismatch (expected {expected}, got {actual})")]
pub struct DigestMismatch {
    backend: Source,
    what: String,
    expected: String,
    actual: String,
}

/// Past this many bytes a download is hashed on a blocking thread beside the one moving its
/// bytes, so a large artifact streams faster than one core can hash it; a small one is hashed
/// in place, where a thread hand-off would cost more than the hashing.
const HASH_ASIDE_AFTER: u64 = 1024 * 1024;

/// Bytes handed to the hashing thread and not hashed yet, at most (a single larger frame is
/// taken when nothing else is queued). When hashing falls behind, the stream waits for it, so
/// a download holds at most this much more (references to bytes already received, not copies).
/// Counted in bytes, not frames: a frame is what one read of the backend brought, from a few
/// KiB to 1 MiB.
const HASH_QUEUE_BYTES: usize = 4 * 1024 * 1024;

/// Bytes the hashing thread waits for before it is woken (unless the stream ends first). It
/// hashes faster than a download arrives, so woken per small frame it would sleep and be woken
/// again for every frame: a futex call and, as often as not, an interrupt to another core.
const HASH_WAKE_BYTES: usize = 1024 * 1024;

/// Where a download's digest is computed: in place until the stream proves large, then on a
/// blocking thread fed through a bounded queue.
enum Hasher {
    Here {
        sha: Sha256,
        bytes: u64,
    },
    Aside {
        queue: HashQueue,
        digest: JoinHandle<[u8; 32]>,
    },
    Finished,
}

impl Hasher {
    /// Takes `data` into the digest; pending while the hashing thread's queue is full.
    fn poll_update(&mut self, cx: &mut Context<'_>, data: &Bytes) -> Poll<Result<(), BoxError>> {
        match self {
            Self::Here { sha, bytes } => {
                sha.update(data);
                *bytes += data.len() as u64;
                if *bytes > HASH_ASIDE_AFTER {
                    self.set_aside();
                }
            }
            Self::Aside { queue, .. } => ready!(queue.poll_push(cx, data))?,
            Self::Finished => {
                return Poll::Ready(Err("the download's digest is already taken".into()))
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Moves the digest so far to a blocking thread, when there is a runtime to run one.
    fn set_aside(&mut self) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let Self::Here { sha, .. } = std::mem::replace(self, Self::Finished) else {
            return;
        };
        let queue = HashQueue::default();
        let thread = HashingThread {
            shared: queue.shared.clone(),
        };
        let digest = runtime.spawn_blocking(move || thread.run(sha));
        *self = Self::Aside { queue, digest };
    }

    /// The digest of every byte taken, once the hashing thread (if any) has caught up.
    fn poll_finish(&mut self, cx: &mut Context<'_>) -> Poll<Result<[u8; 32], BoxError>> {
        let digest = match self {
            Self::Here { sha, .. } => std::mem::take(sha).finalize().into(),
            Self::Aside { queue, digest } => {
                queue.shared.close();
                ready!(Pin::new(digest).poll(cx))?
            }
            Self::Finished => {
                return Poll::Ready(Err("the download's digest is already taken".into()))
            }
        };
        *self = Self::Finished;
        Poll::Ready(Ok(digest))
    }
}

/// The stream's end of the queue to the hashing thread. Dropping it (a download abandoned, or
/// its digest taken) drops the frames still queued and ends the thread once it has hashed the
/// batch in hand.
#[derive(Default)]
struct HashQueue {
    shared: Arc<QueueShared>,
}

#[derive(Default)]
struct QueueShared {
    state: Mutex<QueueState>,
    /// The hashing thread waits here for frames.
    filled: Condvar,
}

#[derive(Default)]
struct QueueState {
    frames: Vec<Bytes>,
    /// The bytes of `frames`.
    queued: usize,
    /// Bytes the thread has taken and is hashing: they count towards the bound until done.
    hashing: usize,
    /// The thread waits for frames: only then is a wake-up (a system call) of use.
    waiting: bool,
    closed: bool,
    /// The stream, waiting for room.
    room: Option<Waker>,
}

impl HashQueue {
    /// Queues `data` for hashing, waking the thread once [`HASH_WAKE_BYTES`] wait; pending
    /// while it would take the bytes queued or being hashed past [`HASH_QUEUE_BYTES`].
    fn poll_push(&mut self, cx: &mut Context<'_>, data: &Bytes) -> Poll<Result<(), BoxError>> {
        let mut state = self.shared.lock();
        if state.closed {
            return Poll::Ready(Err("the download's hashing thread ended".into()));
        }
        let held = state.queued + state.hashing;
        if held > 0 && held + data.len() > HASH_QUEUE_BYTES {
            state.room = Some(cx.waker().clone());
            // Fewer than `HASH_WAKE_BYTES` may be queued: the thread takes them now.
            let wake = state.waiting;
            drop(state);
            if wake {
                self.shared.filled.notify_one();
            }
            return Poll::Pending;
        }
        state.frames.push(data.clone());
        state.queued += data.len();
        let wake = state.waiting && state.queued >= HASH_WAKE_BYTES;
        drop(state);
        if wake {
            self.shared.filled.notify_one();
        }
        Poll::Ready(Ok(()))
    }
}

impl Drop for HashQueue {
    fn drop(&mut self) {
        let abandoned = {
            let mut state = self.shared.lock();
            state.closed = true;
            state.queued = 0;
            std::mem::take(&mut state.frames)
        };
        self.shared.filled.notify_one();
        drop(abandoned);
    }
}

impl QueueShared {
    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        // The lock guards plain moves of `Bytes`: a panic cannot leave the state half-made.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// No more frames: the thread hashes what is queued and ends.
    fn close(&self) {
        self.lock().closed = true;
        self.filled.notify_one();
    }

    /// Swaps the frames queued into the empty `batch`, once [`HASH_WAKE_BYTES`] wait, the
    /// stream waits for room, or it has ended; false when it has ended and all are taken.
    fn take_batch(&self, batch: &mut Vec<Bytes>) -> bool {
        let mut state = self.lock();
        while !state.closed
            && (state.frames.is_empty() || (state.queued < HASH_WAKE_BYTES && state.room.is_none()))
        {
            state.waiting = true;
            state = self
                .filled
                .wait(state)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            state.waiting = false;
        }
        if state.frames.is_empty() {
            return false;
        }
        std::mem::swap(&mut state.frames, batch);
        state.hashing = std::mem::take(&mut state.queued);
        true
    }

    /// The batch taken last is hashed and dropped: room for the stream, woken if it waits.
    fn hashed(&self) {
        let room = {
            let mut state = self.lock();
            state.hashing = 0;
            state.room.take()
        };
        if let Some(stream) = room {
            stream.wake();
        }
    }
}

/// The hashing thread's end of the queue.
struct HashingThread {
    shared: Arc<QueueShared>,
}

impl HashingThread {
    fn run(self, mut sha: Sha256) -> [u8; 32] {
        let mut batch = Vec::new();
        while self.shared.take_batch(&mut batch) {
            batch.drain(..).for_each(|data| sha.update(data));
            self.shared.hashed();
        }
        sha.finalize().into()
    }
}

impl Drop for HashingThread {
    /// Ended, or unwound: a stream waiting for room must not wait any longer.
    fn drop(&mut self) {
        let room = {
            let mut state = self.shared.lock();
            state.closed = true;
            state.room.take()
        };
        if let Some(stream) = room {
            stream.wake();
        }
    }
}

pin_project! {
    /// Hashes every data frame and delays each one by a frame, so the final bytes are released
    /// only once the whole stream has matched `expected`. On a mismatch the stream ends in an
    /// error instead: the connection is aborted and the client never holds a complete-looking
    /// wrong file. Past [`HASH_ASIDE_AFTER`] bytes the hashing runs on a blocking thread while
    /// the frames go on; only the held last frame waits for it.
    pub struct VerifyingBody<B> {
        #[pin]
        inner: B,
        hasher: Hasher,
        expected: [u8; 32],
        // Received, and waiting for room in the hashing thread's queue.
        queued: Option<Bytes>,
        held: Option<Bytes>,
        ended: bool,
        finished: bool,
        backend: Source,
        what: String,
    }
}

impl<B> VerifyingBody<B> {
    /// Wraps `inner` to be checked against `checksum` (`sha256:<hex>` or bare hex). Returns
    /// `None` when the checksum is not a sha256 digest, as then there is nothing to verify.
    pub fn new(inner: B, checksum: &str, backend: Source, what: String) -> Option<Self> {
        let expected = sha256_digest(checksum)?;
        Some(Self {
            inner,
            hasher: Hasher::Here {
                sha: Sha256::new(),
                bytes: 0,
            },
            expected,
            queued: None,
            held: None,
            ended: false,
            finished: false,
            backend,
            what,
        })
    }
}

/// The 32 bytes of a checksum written `sha256:<hex>` or as bare hex.
pub fn sha256_digest(checksum: &str) -> Option<[u8; 32]> {
    let hex = checksum.strip_prefix("sha256:").unwrap_or(checksum);
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn encode_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl<B> Body for VerifyingBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        if *this.finished {
            return Poll::Ready(None);
        }
        loop {
            if *this.ended {
                let actual = ready!(this.hasher.poll_finish(cx));
                *this.finished = true;
                let actual = match actual {
                    Ok(actual) => actual,
                    Err(e) => return Poll::Ready(Some(Err(e))),
                };
                if actual == *this.expected {
                    return Poll::Ready(this.held.take().map(|b| Ok(Frame::data(b))));
                }
                let err = DigestMismatch {
                    backend: *this.backend,
                    what: std::mem::take(this.what),
                    expected: encode_hex(this.expected),
                    actual: encode_hex(&actual),
                };
                tracing::error!(error = %err, "download aborted");
                return Poll::Ready(Some(Err(err.into())));
            }
            if let Some(data) = this.queued.take() {
                match this.hasher.poll_update(cx, &data) {
                    Poll::Pending => {
                        *this.queued = Some(data);
                        return Poll::Pending;
                    }
                    Poll::Ready(Err(e)) => {
                        *this.finished = true;
                        return Poll::Ready(Some(Err(e)));
                    }
                    Poll::Ready(Ok(())) => {}
                }
                if let Some(previous) = this.held.replace(data) {
                    return Poll::Ready(Some(Ok(Frame::data(previous))));
                }
            }
            match ready!(this.inner.as_mut().poll_frame(cx)) {
                Some(Ok(frame)) => {
                    // An empty frame must not take the place of the held one: that would
                    // release every real byte before the digest is known.
                    if let Ok(data) = frame.into_data() {
                        if !data.is_empty() {
                            *this.queued = Some(data);
                        }
                    }
                }
                Some(Err(e)) => {
                    *this.finished = true;
                    return Poll::Ready(Some(Err(e.into())));
                }
                None => *this.ended = true,
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.finished
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};

    fn chunks(parts: &[&'static [u8]]) -> impl Body<Data = Bytes, Error = BoxError> {
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = parts
            .iter()
            .map(|p| Ok(Frame::data(Bytes::from_static(p))))
            .collect();
        StreamBody::new(futures_util::stream::iter(frames))
    }

    fn sha(data: &[u8]) -> String {
        format!("sha256:{}", encode_hex(&Sha256::digest(data)))
    }

    #[tokio::test]
    async fn passes_matching_bytes_through() {
        let body = VerifyingBody::new(
            chunks(&[b"ab", b"c", b"d"]),
            &sha(b"abcd"),
            Source::Local,
            "x".into(),
        )
        .unwrap();
        let got = body.collect().await.unwrap().to_bytes();
        assert_eq!(&got[..], b"abcd");
    }

    #[tokio::test]
    async fn withholds_the_last_chunk_on_mismatch() {
        let mut body = VerifyingBody::new(
            chunks(&[b"ab", b"cd"]),
            &sha(b"abce"),
            Source::Oci,
            "x".into(),
        )
        .unwrap();
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&first[..], b"ab");
        let err = body.frame().await.unwrap().unwrap_err();
        assert!(err.to_string().contains("sha256 mismatch"), "{err}");
        assert!(body.frame().await.is_none());
    }

    #[tokio::test]
    async fn an_empty_last_frame_does_not_release_the_held_bytes() {
        let mut body = VerifyingBody::new(
            chunks(&[b"ab", b"cd", b""]),
            &sha(b"abce"),
            Source::Oci,
            "x".into(),
        )
        .unwrap();
        let mut released = Vec::new();
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(frame) => released.extend_from_slice(&frame.into_data().unwrap()),
                Err(_) => break,
            }
        }
        assert_eq!(released, b"ab");
    }

    /// 40 distinct frames of 64 KiB: past the size where hashing moves to its own thread.
    fn large() -> (Vec<Bytes>, Vec<u8>) {
        let frames: Vec<Bytes> = (0..40u8).map(|i| Bytes::from(vec![i; 64 * 1024])).collect();
        let whole = frames.concat();
        assert!(whole.len() as u64 > 2 * HASH_ASIDE_AFTER);
        (frames, whole)
    }

    fn stream(frames: Vec<Bytes>) -> impl Body<Data = Bytes, Error = BoxError> {
        StreamBody::new(futures_util::stream::iter(
            frames
                .into_iter()
                .map(|b| Ok::<_, BoxError>(Frame::data(b))),
        ))
    }

    /// Every byte released until the stream ends, and how it ended.
    async fn drain<B>(mut body: VerifyingBody<B>) -> (Vec<u8>, Result<(), BoxError>)
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Into<BoxError>,
    {
        let mut released = Vec::new();
        let mut set_aside = false;
        while let Some(frame) = body.frame().await {
            set_aside |= matches!(body.hasher, Hasher::Aside { .. });
            match frame {
                Ok(frame) => released.extend_from_slice(&frame.into_data().unwrap()),
                Err(e) => return (released, Err(e)),
            }
        }
        assert!(set_aside, "a large download is hashed on its own thread");
        (released, Ok(()))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_large_download_is_hashed_aside_and_still_checked() {
        let (frames, whole) = large();
        let body = VerifyingBody::new(stream(frames), &sha(&whole), Source::Oci, "x".into());
        let (released, end) = drain(body.unwrap()).await;
        assert!(end.is_ok(), "{end:?}");
        assert_eq!(released, whole);
    }

    #[tokio::test]
    async fn a_large_download_that_does_not_match_withholds_its_last_frame() {
        let (frames, whole) = large();
        let last = frames.last().unwrap().len();
        let mut wrong = whole.clone();
        wrong[0] ^= 1;
        let body = VerifyingBody::new(stream(frames), &sha(&wrong), Source::Oci, "x".into());
        let (released, end) = drain(body.unwrap()).await;
        let err = end.unwrap_err();
        assert!(err.to_string().contains("sha256 mismatch"), "{err}");
        assert_eq!(released, whole[..whole.len() - last]);
    }

    /// The size of the frames pushed into a [`FullQueue`].
    const FRAME: usize = 256 * 1024;

    /// A stream's side of a hashing queue, filled to the brim: pushed into until it was
    /// pending, and so waiting for room with a waker that counts its wakes.
    struct FullQueue {
        queue: HashQueue,
        wakes: Arc<Wakes>,
        waker: Waker,
    }

    struct Wakes(AtomicUsize);

    impl std::task::Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, SeqCst);
        }
    }

    impl FullQueue {
        fn new() -> Self {
            let wakes = Arc::new(Wakes(AtomicUsize::new(0)));
            let mut full = Self {
                queue: HashQueue::default(),
                waker: Waker::from(wakes.clone()),
                wakes,
            };
            for _ in 0..HASH_QUEUE_BYTES / FRAME {
                assert!(full.push().is_ready());
            }
            assert!(full.push().is_pending());
            assert_eq!(full.wakes.0.load(SeqCst), 0);
            full
        }

        fn push(&mut self) -> Poll<Result<(), BoxError>> {
            self.push_bytes(FRAME)
        }

        fn push_bytes(&mut self, len: usize) -> Poll<Result<(), BoxError>> {
            let mut cx = Context::from_waker(&self.waker);
            self.queue.poll_push(&mut cx, &Bytes::from(vec![0; len]))
        }
    }

    #[test]
    fn the_hashing_queue_holds_a_bounded_number_of_bytes_and_wakes_the_stream_for_room() {
        let mut full = FullQueue::new();
        let mut batch = Vec::new();
        assert!(full.queue.shared.take_batch(&mut batch));
        assert_eq!(batch.len(), HASH_QUEUE_BYTES / FRAME);
        assert!(
            full.push().is_pending(),
            "frames being hashed count towards the bound"
        );
        assert_eq!(full.wakes.0.load(SeqCst), 0);
        batch.clear();
        full.queue.shared.hashed();
        assert_eq!(full.wakes.0.load(SeqCst), 1);
        assert!(matches!(full.push(), Poll::Ready(Ok(()))));
        assert!(
            full.push_bytes(HASH_QUEUE_BYTES).is_pending(),
            "a frame that would pass the bound waits"
        );
    }

    #[test]
    fn a_frame_larger_than_the_bound_is_taken_into_an_empty_queue() {
        let mut full = FullQueue::emptied();
        assert!(matches!(
            full.push_bytes(HASH_QUEUE_BYTES + 1),
            Poll::Ready(Ok(()))
        ));
        assert!(full.push_bytes(1).is_pending());
    }

    #[test]
    fn a_hashing_thread_that_ended_fails_the_stream_instead_of_leaving_it_waiting() {
        let mut full = FullQueue::new();
        drop(HashingThread {
            shared: full.queue.shared.clone(),
        });
        assert_eq!(full.wakes.0.load(SeqCst), 1);
        assert!(matches!(full.push(), Poll::Ready(Err(_))));
    }

    impl FullQueue {
        /// A queue that was full and whose batch was hashed: empty, the stream woken once.
        fn emptied() -> Self {
            let full = Self::new();
            let mut batch = Vec::new();
            assert!(full.queue.shared.take_batch(&mut batch));
            batch.clear();
            full.queue.shared.hashed();
            full
        }
    }

    /// A hashing thread's stand-in: takes one batch, hands its room back, and sends its
    /// length; returns once it waits for frames.
    fn taking_one_batch(
        shared: &Arc<QueueShared>,
    ) -> (
        std::sync::mpsc::Receiver<usize>,
        std::thread::JoinHandle<()>,
    ) {
        let (taken, took) = std::sync::mpsc::channel();
        let thread = std::thread::spawn({
            let shared = shared.clone();
            move || {
                let mut batch = Vec::new();
                shared.take_batch(&mut batch);
                let len = batch.len();
                batch.clear();
                shared.hashed();
                taken.send(len).unwrap();
            }
        });
        until_waiting(shared);
        (took, thread)
    }

    /// Returns once the hashing thread waits for frames.
    fn until_waiting(shared: &QueueShared) {
        while !shared.lock().waiting {
            std::thread::yield_now();
        }
    }

    #[test]
    fn the_hashing_thread_is_woken_once_enough_bytes_wait() {
        let mut full = FullQueue::emptied();
        let (took, thread) = taking_one_batch(&full.queue.shared);
        for _ in 0..HASH_WAKE_BYTES / FRAME {
            assert!(matches!(full.push(), Poll::Ready(Ok(()))));
        }
        // A deadline for a hang, not a measurement: the batch comes at once or never.
        let batch = took.recv_timeout(std::time::Duration::from_secs(30));
        assert_eq!(batch, Ok(HASH_WAKE_BYTES / FRAME));
        thread.join().unwrap();
    }

    #[test]
    fn a_stream_waiting_for_room_has_the_thread_take_what_is_queued() {
        let mut full = FullQueue::emptied();
        let woken = full.wakes.0.load(SeqCst);
        let (took, thread) = taking_one_batch(&full.queue.shared);
        // Less than the thread waits for, then a frame that does not fit beside it.
        assert!(matches!(full.push(), Poll::Ready(Ok(()))));
        assert!(full.push_bytes(HASH_QUEUE_BYTES).is_pending());
        // A deadline for a hang, not a measurement: the batch comes at once or never.
        let batch = took.recv_timeout(std::time::Duration::from_secs(30));
        assert_eq!(batch, Ok(1));
        thread.join().unwrap();
        assert_eq!(full.wakes.0.load(SeqCst), woken + 1, "room is handed back");
        assert!(matches!(
            full.push_bytes(HASH_QUEUE_BYTES),
            Poll::Ready(Ok(()))
        ));
    }

    #[test]
    fn an_abandoned_download_ends_its_hashing_thread() {
        // Built by hand so that a thread that never ends fails the test rather than hanging
        // the runtime's shutdown.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_time()
            .build()
            .unwrap();
        let ended = runtime.block_on(async {
            let (frames, whole) = large();
            let mut body =
                VerifyingBody::new(stream(frames), &sha(&whole), Source::Oci, "x".into()).unwrap();
            while !matches!(body.hasher, Hasher::Aside { .. }) {
                body.frame().await.unwrap().unwrap();
            }
            let Hasher::Aside { queue, digest } =
                std::mem::replace(&mut body.hasher, Hasher::Finished)
            else {
                unreachable!()
            };
            until_waiting(&queue.shared);
            drop(queue);
            // A deadline for a hang, not a measurement: the thread ends at once or never.
            tokio::time::timeout(std::time::Duration::from_secs(30), digest).await
        });
        runtime.shutdown_background();
        assert!(matches!(ended, Ok(Ok(_))), "the thread ends");
    }

    fn range(spec: RangeSpec) -> ByteRange {
        ByteRange {
            spec,
            if_etag: None,
        }
    }

    fn part(first: u64, last: u64, size: u64) -> Served {
        Served::Part(Span { first, last, size })
    }

    #[test]
    fn ranges_are_resolved_against_the_size() {
        use RangeSpec::*;
        let cases = [
            (Bounded { first: 0, last: 9 }, 100, part(0, 9, 100)),
            (Bounded { first: 5, last: 5 }, 100, part(5, 5, 100)),
            (
                Bounded {
                    first: 90,
                    last: 500,
                },
                100,
                part(90, 99, 100),
            ),
            (
                Bounded {
                    first: 100,
                    last: 200,
                },
                100,
                Served::Unsatisfiable { size: 100 },
            ),
            (From(0), 100, part(0, 99, 100)),
            (From(99), 100, part(99, 99, 100)),
            (From(100), 100, Served::Unsatisfiable { size: 100 }),
            (Suffix(10), 100, part(90, 99, 100)),
            (Suffix(500), 100, part(0, 99, 100)),
            (Suffix(0), 100, Served::Unsatisfiable { size: 100 }),
            (From(0), 0, Served::Unsatisfiable { size: 0 }),
            (Suffix(5), 0, Served::Unsatisfiable { size: 0 }),
        ];
        for (spec, size, expected) in cases {
            assert_eq!(
                range(spec).select(size, None),
                expected,
                "{spec:?} of {size}"
            );
        }
        assert_eq!(select(None, 100, None), Served::Whole);
        let Served::Part(span) = range(From(90)).select(100, None) else {
            panic!("not a part");
        };
        assert_eq!(
            (span.length(), span.content_range()),
            (10, "bytes 90-99/100".into())
        );
    }

    #[test]
    fn if_range_holds_only_for_the_artifacts_own_etag() {
        let checksum = sha(b"abcd");
        let etag = download_etag(&checksum).unwrap();
        assert!(
            etag.starts_with("\"sha256:") && etag.ends_with('"'),
            "{etag}"
        );
        let mut asked = range(RangeSpec::From(1));
        asked.if_etag = Some(etag);
        assert_eq!(asked.select(4, Some(&checksum)), part(1, 3, 4));
        assert_eq!(asked.select(4, Some(&sha(b"abce"))), Served::Whole);
        assert_eq!(asked.select(4, None), Served::Whole);
        // A mismatch serves the whole artifact, even where the range could not be satisfied.
        asked.spec = RangeSpec::From(10);
        assert_eq!(asked.select(4, Some(&sha(b"other"))), Served::Whole);
        assert_eq!(
            asked.select(4, Some(&checksum)),
            Served::Unsatisfiable { size: 4 }
        );
    }

    #[test]
    fn refuses_checksums_that_are_not_sha256() {
        assert!(VerifyingBody::new(chunks(&[]), "md5:abc", Source::Local, "x".into()).is_none());
    }
}
