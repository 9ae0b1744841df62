//! A connection's outgoing side: the bounded send queue that any task fills without
//! waiting, and the one writer task that drains it into the socket.
//!
//! Flow control lives here too. A push never blocks, but it says when the queue is past
//! its high-water mark ([`Pushed::Congested`]) or at its hard cap ([`Pushed::Full`], the
//! line not taken): the chat session that pushed then stops reading its own socket until
//! the queue is relieved ([`SendQueue::until_relieved`]) or has room again
//! ([`SendQueue::until_room`]). So a burst slows its senders instead of dropping the
//! readers it is meant for, and memory stays bounded.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::ConnWrite;

/// Slots an emptied send queue may keep (a few are reused by every message; a burst's
/// worth is given back).
const KEEP_LINES: usize = 8;
/// Largest batch the writer hands to one `write` call.
const WRITE_BATCH: usize = 64 * 1024;

/// Writes all of `buf`, failing with `TimedOut` only if the peer accepts *nothing* for
/// `stall`: a slow but steady reader is never cut off, a stopped one is. `progressed` is
/// called after every write that took some bytes once the first has not taken them all
/// (the caller knows when it began).
///
/// The usual case, a socket that takes the whole of `buf` at once, is tried first without
/// a timer (arming one reads the clock and finds the runtime's timer for every line).
pub(crate) async fn write_with_progress<W: AsyncWrite + Unpin>(
    wr: &mut W,
    mut buf: &[u8],
    stall: Duration,
    mut progressed: impl FnMut(),
) -> std::io::Result<()> {
    use std::io::{Error, ErrorKind};
    // (An empty `buf`, such as a compressor's output that is not due yet, writes nothing.)
    if !buf.is_empty() {
        match poll_once(|cx| Pin::new(&mut *wr).poll_write(cx, buf)).await {
            Some(Ok(0)) => return Err(Error::from(ErrorKind::WriteZero)),
            Some(Ok(n)) => buf = &buf[n..],
            Some(Err(e)) => return Err(e),
            None => {}
        }
    }
    while !buf.is_empty() {
        match tokio::time::timeout(stall, wr.write(buf)).await {
            Ok(Ok(0)) => return Err(Error::from(ErrorKind::WriteZero)),
            Ok(Ok(n)) => {
                buf = &buf[n..];
                progressed();
            }
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(Error::from(ErrorKind::TimedOut)),
        }
    }
    // TLS may hold back the last record when the socket was full (plain TCP: at once).
    if let Some(flushed) = poll_once(|cx| Pin::new(&mut *wr).poll_flush(cx)).await {
        return flushed;
    }
    match tokio::time::timeout(stall, wr.flush()).await {
        Ok(flushed) => flushed,
        Err(_) => Err(Error::from(ErrorKind::TimedOut)),
    }
}

/// Polls `poll` once: its result if it is ready at once, `None` if it would wait (the
/// waker is registered, so the caller can await the same operation next).
async fn poll_once<T>(mut poll: impl FnMut(&mut Context<'_>) -> Poll<T>) -> Option<T> {
    std::future::poll_fn(|cx| {
        Poll::Ready(match poll(cx) {
            Poll::Ready(v) => Some(v),
            Poll::Pending => None,
        })
    })
    .await
}

/// Where the next byte of `chunks` is, `n` bytes after chunk `first`'s byte `skip`: a
/// chunk index and an offset in it, past every chunk written whole (index `chunks.len()`
/// once all are).
pub(crate) fn advance(
    chunks: &[bytes::Bytes],
    (mut first, mut skip): (usize, usize),
    mut n: usize,
) -> (usize, usize) {
    while first < chunks.len() {
        let left = chunks[first].len() - skip;
        if n < left {
            return (first, skip + n);
        }
        n -= left;
        first += 1;
        skip = 0;
    }
    (first, skip)
}

/// Writes all of `chunks`, in order, several per system call (`writev`), with the stall
/// rule of [`write_with_progress`].
pub(crate) async fn write_chunks<W: AsyncWrite + Unpin>(
    wr: &mut W,
    chunks: &[bytes::Bytes],
    stall: Duration,
) -> std::io::Result<()> {
    use std::io::{Error, ErrorKind, IoSlice};
    // The next byte to write: chunk `first`, from offset `skip`.
    let (mut first, mut skip) = (0, 0);
    let mut slices = Vec::with_capacity(chunks.len());
    while first < chunks.len() {
        slices.clear();
        slices.push(IoSlice::new(&chunks[first][skip..]));
        slices.extend(chunks[first + 1..].iter().map(|c| IoSlice::new(c)));
        let n = match tokio::time::timeout(stall, wr.write_vectored(&slices)).await {
            Ok(Ok(0)) => return Err(Error::from(ErrorKind::WriteZero)),
            Ok(Ok(n)) => n,
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(Error::from(ErrorKind::TimedOut)),
        };
        (first, skip) = advance(chunks, (first, skip), n);
    }
    match tokio::time::timeout(stall, wr.flush()).await {
        Ok(flushed) => flushed,
        Err(_) => Err(Error::from(ErrorKind::TimedOut)),
    }
}

/// A connection's outgoing lines: a bounded FIFO of ready-made buffers, filled by any task
/// without waiting and drained by the connection's one writer. Unlike a channel it holds no
/// memory while empty, and most connections are idle most of the time.
pub(crate) struct SendQueue {
    state: std::sync::Mutex<QueueState>,
    /// Wakes the writer; a notification sent while it is busy is kept for its next wait.
    ready: tokio::sync::Notify,
    /// Wakes senders waiting for this queue to drain (see the module docs).
    drained: tokio::sync::Notify,
    /// Senders waiting for the queue to be relieved (woken at its low-water mark).
    waiting_relief: AtomicUsize,
    /// Senders waiting for room for a line (woken by every take).
    waiting_room: AtomicUsize,
    /// Tasks waiting for lines to be written (see `until_written`).
    waiting_written: AtomicUsize,
    /// Lines written into the socket so far.
    written: AtomicU64,
    /// The connection's socket when it is plain TCP: the writer task writes through it
    /// ([`QueueSink`]), and so may a task that pushes a line (see [`SendQueue::push_now`]).
    socket: Option<OwnedWriteHalf>,
    /// The hard cap in lines: a push past it is refused.
    capacity: usize,
    /// The hard cap in bytes: long lines reach it before `capacity` does.
    max_bytes: usize,
    /// Past this many bytes (or a quarter of `capacity` in lines) the queue is congested.
    high_bytes: usize,
}

struct QueueState {
    lines: std::collections::VecDeque<Bytes>,
    /// Lines ever queued.
    pushed: u64,
    /// Bytes in `lines`.
    bytes: usize,
    /// No more lines will come: the writer drains what is left and stops.
    closed: bool,
    /// Someone is writing into the socket: the writer task, or a task in `push_now`.
    writing: bool,
    /// The writer task has ended: nobody may write into the socket any more.
    stopped: bool,
    /// When the writer last took lines or got bytes into the socket: a queue whose reader
    /// takes nothing for a while stops holding senders up.
    progress: Instant,
}

impl Default for QueueState {
    fn default() -> Self {
        Self {
            lines: std::collections::VecDeque::new(),
            pushed: 0,
            bytes: 0,
            closed: false,
            writing: false,
            stopped: false,
            progress: Instant::now(),
        }
    }
}

/// What became of a pushed line.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Pushed {
    /// Queued for the writer.
    Queued,
    /// Queued, past the high-water mark: the sender should wait until it is relieved.
    Congested,
    /// Not queued (here it is back): the queue is at its hard cap. The sender keeps the
    /// line and waits for room.
    Full(Bytes),
    /// The connection is closing.
    Closed,
}

/// What the writer took from the queue.
enum Taken {
    /// One line, to write as it is.
    One(Bytes),
    /// This many lines, copied into the batch buffer.
    Batch(u64),
    /// The queue is closed and empty.
    End,
}

impl SendQueue {
    /// A queue that refuses lines past `capacity` lines or `max_bytes` bytes and counts as
    /// congested past `high_bytes` bytes or a quarter of `capacity`.
    pub(crate) fn new(capacity: usize, max_bytes: usize, high_bytes: usize) -> Arc<Self> {
        Self::with_socket(capacity, max_bytes, high_bytes, None)
    }

    /// A queue for a connection's write half, and what its writer task writes into: the
    /// queue's own socket for plain TCP (so that a line can also be written by the task
    /// that pushes it), the half itself for TLS.
    pub(crate) fn attach(
        capacity: usize,
        max_bytes: usize,
        high_bytes: usize,
        wr: ConnWrite,
    ) -> (Arc<Self>, QueueSink) {
        match wr {
            ConnWrite::Tcp(half) => {
                let queue = Self::with_socket(capacity, max_bytes, high_bytes, Some(half));
                (queue.clone(), QueueSink::Socket(queue))
            }
            tls => (
                Self::new(capacity, max_bytes, high_bytes),
                QueueSink::Half(tls),
            ),
        }
    }

    fn with_socket(
        capacity: usize,
        max_bytes: usize,
        high_bytes: usize,
        socket: Option<OwnedWriteHalf>,
    ) -> Arc<Self> {
        let max_bytes = max_bytes.max(1);
        Arc::new(Self {
            socket,
            state: std::sync::Mutex::default(),
            ready: tokio::sync::Notify::new(),
            drained: tokio::sync::Notify::new(),
            waiting_relief: AtomicUsize::new(0),
            waiting_room: AtomicUsize::new(0),
            waiting_written: AtomicUsize::new(0),
            written: AtomicU64::new(0),
            capacity: capacity.max(1),
            max_bytes,
            high_bytes: high_bytes.clamp(1, max_bytes),
        })
    }

    fn high_lines(&self) -> usize {
        (self.capacity / 4).max(1)
    }

    fn congested(&self, st: &QueueState) -> bool {
        st.bytes > self.high_bytes || st.lines.len() > self.high_lines()
    }

    /// At or under half the high-water mark: senders waiting on it may go on.
    fn low(&self, st: &QueueState) -> bool {
        st.bytes <= self.high_bytes / 2 && st.lines.len() <= self.high_lines() / 2
    }

    fn has_room(&self, st: &QueueState, len: usize) -> bool {
        let over_bytes = st.bytes + len > self.max_bytes && !st.lines.is_empty();
        st.lines.len() < self.capacity && !over_bytes
    }

    fn state(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Queues `bytes` without waiting, unless the queue is at its hard cap.
    pub(crate) fn push(&self, bytes: Bytes) -> Pushed {
        self.queue_line(self.state(), bytes)
    }

    /// Whether the connection's reader is ended when the writer task ends (plain TCP: see
    /// [`QueueSink`]'s `poll_shutdown`), so that it need not watch the kill token.
    pub(crate) fn ends_reader(&self) -> bool {
        self.socket.is_some()
    }

    /// Like [`push`](Self::push), but a line for an empty queue of a plain TCP connection
    /// that nobody is writing into is written at once by the calling task, without waking
    /// the writer task (a closed loop's message costs one `send` and no task switch); what
    /// the socket does not take at once is queued, in front, for the writer task (even if
    /// others filled the queue meanwhile: the line was admitted to an empty queue). Once
    /// the writer task has ended, nothing is written at once any more.
    ///
    /// For the last line of what a chat session has read: lines pushed one after another
    /// are better queued and written together by the writer task.
    pub(crate) fn push_now(&self, bytes: Bytes) -> Pushed {
        let mut st = self.state();
        let socket = match &self.socket {
            Some(socket) if !st.closed && !st.stopped && !st.writing && st.lines.is_empty() => {
                socket
            }
            _ => return self.queue_line(st, bytes),
        };
        st.writing = true;
        st.pushed += 1;
        drop(st);
        // An error is the writer task's to find on its next write.
        let n = socket.try_write(&bytes).unwrap_or(0);
        let mut st = self.state();
        st.writing = false;
        if n < bytes.len() {
            st.bytes += bytes.len() - n;
            st.lines.push_front(bytes.slice(n..));
            st.progress = Instant::now();
        }
        let wake = !st.lines.is_empty() || st.closed || st.stopped;
        let congested = self.congested(&st);
        drop(st);
        if n == bytes.len() {
            self.count_written(1);
        }
        if wake {
            self.ready.notify_one();
        }
        match congested {
            true => Pushed::Congested,
            false => Pushed::Queued,
        }
    }

    fn queue_line(&self, mut st: std::sync::MutexGuard<'_, QueueState>, bytes: Bytes) -> Pushed {
        if st.closed {
            return Pushed::Closed;
        }
        if !self.has_room(&st, bytes.len()) {
            return Pushed::Full(bytes);
        }
        self.append(&mut st, bytes);
        let congested = self.congested(&st);
        drop(st);
        self.ready.notify_one();
        match congested {
            true => Pushed::Congested,
            false => Pushed::Queued,
        }
    }

    /// Queues one of the server's own notices (a file notice, an error, a verdict), sent
    /// from a task that cannot wait for the reader: allowed past the hard cap up to twice
    /// it, so a burst of them never needs a sender to wait; past that, `Full` (the reader
    /// takes nothing and the notices keep coming: the caller drops the connection).
    pub(crate) fn push_notice(&self, bytes: Bytes) -> Pushed {
        let mut st = self.state();
        if st.closed {
            return Pushed::Closed;
        }
        let over =
            st.lines.len() >= 2 * self.capacity || st.bytes + bytes.len() > 2 * self.max_bytes;
        if over && !st.lines.is_empty() {
            return Pushed::Full(bytes);
        }
        self.append(&mut st, bytes);
        drop(st);
        self.ready.notify_one();
        Pushed::Queued
    }

    fn append(&self, st: &mut QueueState, bytes: Bytes) {
        if st.lines.is_empty() && !st.writing {
            // A reader is stalled when it has taken nothing for a while *of what it had*.
            st.progress = Instant::now();
        }
        st.pushed += 1;
        st.bytes += bytes.len();
        st.lines.push_back(bytes);
    }

    /// The writer got bytes into the socket.
    fn progressed(&self) {
        self.state().progress = Instant::now();
    }

    /// Waits until `check` holds, or `deadline` (from the state) passes. The writer wakes
    /// waiters as the queue drains (see `take`), and on close. `count` says how many wait
    /// (kept right even if this future is dropped mid-wait).
    async fn wait_until(
        &self,
        count: &AtomicUsize,
        check: impl Fn(&QueueState) -> Result<(), Option<Instant>>,
    ) {
        struct Waiting<'a>(&'a AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::AcqRel);
            }
        }
        count.fetch_add(1, Ordering::AcqRel);
        let _waiting = Waiting(count);
        loop {
            let notified = self.drained.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let deadline = match check(&self.state()) {
                Ok(()) => return,
                Err(deadline) => deadline,
            };
            match deadline {
                Some(at) => {
                    tokio::select! {
                        _ = notified => {}
                        _ = tokio::time::sleep_until(at.into()) => {}
                    }
                }
                None => notified.await,
            }
        }
    }

    /// Waits until a sender need no longer hold back for this queue: it is at its low-water
    /// mark, closed, or its reader has taken nothing for `grace` (a reader that does not
    /// read is not waited for; the hard cap and `send_timeout` deal with it).
    pub(crate) async fn until_relieved(&self, grace: Duration) {
        self.wait_until(&self.waiting_relief, |st| {
            let stalled = st.progress + grace;
            match st.closed || self.low(st) || Instant::now() >= stalled {
                true => Ok(()),
                false => Err(Some(stalled)),
            }
        })
        .await;
    }

    /// Waits until a line of `len` bytes fits, or the queue is closed.
    pub(crate) async fn until_room(&self, len: usize) {
        self.wait_until(&self.waiting_room, |st| {
            match st.closed || self.has_room(st, len) {
                true => Ok(()),
                false => Err(None),
            }
        })
        .await;
    }

    /// How many lines have been queued so far: `until_written` of it waits for all of
    /// them.
    pub(crate) fn pushed(&self) -> u64 {
        self.state().pushed
    }

    /// Waits until the first `mark` lines ever queued have been written into the socket;
    /// false if the queue closed first (they may not have been).
    pub(crate) async fn until_written(&self, mark: u64) -> bool {
        self.wait_until(&self.waiting_written, |st| {
            match st.closed || self.written.load(Ordering::Acquire) >= mark {
                true => Ok(()),
                false => Err(None),
            }
        })
        .await;
        self.written.load(Ordering::Acquire) >= mark
    }

    /// The writer task is done writing what it took: `lines` whole lines.
    fn wrote(&self, lines: u64) {
        self.state().writing = false;
        self.count_written(lines);
    }

    /// `lines` more whole lines are in the socket.
    fn count_written(&self, lines: u64) {
        self.written.fetch_add(lines, Ordering::AcqRel);
        if self.waiting_written.load(Ordering::Acquire) > 0 {
            self.drained.notify_waiters();
        }
    }

    /// Takes every queued line at once, without waiting (for tests that read a queue).
    #[cfg(test)]
    pub(crate) fn drain_now(&self) -> Vec<Bytes> {
        let mut st = self.state();
        st.bytes = 0;
        st.lines.drain(..).collect()
    }

    /// The writer task ends (having written what it took, or not): once a `push_now` in
    /// flight is done, nothing more is written into the socket.
    async fn stop(&self, writer_was_writing: bool) {
        loop {
            let done = self.ready.notified();
            {
                let mut st = self.state();
                if writer_was_writing {
                    st.writing = false;
                }
                st.stopped = true;
                if !st.writing {
                    return;
                }
            }
            done.await;
        }
    }

    /// No more lines: the writer sends what is queued and then shuts the socket.
    pub(crate) fn close(&self) {
        self.state().closed = true;
        self.ready.notify_one();
        self.drained.notify_waiters();
    }

    /// Waits for lines and takes them: one as it is, or up to `WRITE_BATCH` bytes of several
    /// copied into `batch`. An emptied queue gives its memory back.
    async fn take(&self, batch: &mut BytesMut) -> Taken {
        loop {
            {
                let mut st = self.state();
                let taken = match st.lines.len() {
                    // A task in `push_now` writes; it wakes the writer when done.
                    _ if st.writing => None,
                    0 if st.closed => return Taken::End,
                    0 => None,
                    1 => st.lines.pop_front().map(Taken::One),
                    _ => {
                        batch.clear();
                        let mut n = 0;
                        while batch.len() < WRITE_BATCH {
                            match st.lines.pop_front() {
                                Some(line) => batch.extend_from_slice(&line),
                                None => break,
                            }
                            n += 1;
                        }
                        Some(Taken::Batch(n))
                    }
                };
                st.bytes -= match &taken {
                    Some(Taken::One(line)) => line.len(),
                    Some(Taken::Batch(_)) => batch.len(),
                    _ => 0,
                };
                if let Some(taken) = taken {
                    st.writing = true;
                    if st.lines.is_empty() && st.lines.capacity() > KEEP_LINES {
                        st.lines = std::collections::VecDeque::new();
                    }
                    // The writer is at work: a reader that takes is not a stalled one.
                    st.progress = Instant::now();
                    let wake = self.waiting_room.load(Ordering::Acquire) > 0
                        || (self.low(&st) && self.waiting_relief.load(Ordering::Acquire) > 0);
                    drop(st);
                    if wake {
                        self.drained.notify_waiters();
                    }
                    return taken;
                }
            }
            self.ready.notified().await;
        }
    }
}

/// What a connection's writer task writes into (see [`SendQueue::attach`]).
pub(crate) enum QueueSink {
    /// The queue's own plain TCP socket, shared with tasks in `push_now`.
    Socket(Arc<SendQueue>),
    /// A write half of its own (TLS).
    Half(ConnWrite),
}

impl QueueSink {
    /// The shared socket; `None` for a half of its own.
    fn socket(&self) -> Option<&TcpStream> {
        match self {
            QueueSink::Socket(queue) => queue.socket.as_ref().map(AsRef::as_ref),
            QueueSink::Half(_) => None,
        }
    }
}

/// Writes through `socket`'s readiness: `try_write` until it would block, then waits for
/// the socket to be writable (what tokio's own write half does, but through `&self`).
fn poll_shared<T>(
    socket: &TcpStream,
    cx: &mut Context<'_>,
    mut write: impl FnMut(&TcpStream) -> io::Result<T>,
) -> Poll<io::Result<T>> {
    loop {
        ready!(socket.poll_write_ready(cx))?;
        match write(socket) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            done => return Poll::Ready(done),
        }
    }
}

impl Drop for QueueSink {
    /// A writer task that is aborted still ends the shared socket, as its end does (see
    /// `poll_shutdown`).
    fn drop(&mut self) {
        if let Some(socket) = self.socket() {
            let _ = rustix::net::shutdown(socket, rustix::net::Shutdown::Both);
        }
    }
}

impl AsyncWrite for QueueSink {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.socket() {
            Some(socket) => poll_shared(socket, cx, |s| s.try_write(buf)),
            None => match self.get_mut() {
                QueueSink::Half(half) => Pin::new(half).poll_write(cx, buf),
                QueueSink::Socket(_) => Poll::Ready(Err(io::ErrorKind::NotConnected.into())),
            },
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.socket() {
            Some(socket) => poll_shared(socket, cx, |s| s.try_write_vectored(bufs)),
            None => match self.get_mut() {
                QueueSink::Half(half) => Pin::new(half).poll_write_vectored(cx, bufs),
                QueueSink::Socket(_) => Poll::Ready(Err(io::ErrorKind::NotConnected.into())),
            },
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            QueueSink::Socket(_) => true,
            QueueSink::Half(half) => half.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            QueueSink::Socket(_) => Poll::Ready(Ok(())),
            QueueSink::Half(half) => Pin::new(half).poll_flush(cx),
        }
    }

    /// For the shared socket, both sides: the writer task ends only when its connection
    /// does (closed, or killed), and ending the read side too wakes the chat session's
    /// reader with the end of its stream, so that it need not watch the kill token itself
    /// (`LineReader::next_line_or`).
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.socket() {
            Some(socket) => Poll::Ready(
                rustix::net::shutdown(socket, rustix::net::Shutdown::Both).map_err(Into::into),
            ),
            None => match self.get_mut() {
                QueueSink::Half(half) => Pin::new(half).poll_shutdown(cx),
                QueueSink::Socket(_) => Poll::Ready(Ok(())),
            },
        }
    }
}

/// Drains `queue` into the socket until it is closed and empty or `kill` fires, batching
/// whatever is queued into one write. A peer that accepts nothing for `stall` is not
/// reading: the connection is killed (and true is returned). Shuts the write side down at
/// the end.
pub(crate) async fn write_loop<W: AsyncWrite + Unpin>(
    mut wr: W,
    queue: Arc<SendQueue>,
    kill: CancellationToken,
    stall: Duration,
) -> bool {
    let mut batch = BytesMut::new();
    let mut slow = false;
    // Whether the writer has taken lines it has not finished writing.
    let mut writing = false;
    loop {
        let taken = tokio::select! {
            biased;
            _ = kill.cancelled() => break,
            taken = queue.take(&mut batch) => taken,
        };
        if matches!(taken, Taken::End) {
            break;
        }
        writing = true;
        let res = {
            let progressed = || queue.progressed();
            let line = match &taken {
                Taken::One(line) => &line[..],
                _ => &batch[..],
            };
            let mut write = std::pin::pin!(write_with_progress(&mut wr, line, stall, progressed));
            // Most writes are done at once; only one that waits also waits for `kill`.
            match poll_once(|cx| std::future::Future::poll(write.as_mut(), cx)).await {
                Some(res) => Some(res),
                None => tokio::select! {
                    biased;
                    _ = kill.cancelled() => None,
                    res = &mut write => Some(res),
                },
            }
        };
        let ok = match res {
            Some(Ok(())) => true,
            Some(Err(e)) if e.kind() == std::io::ErrorKind::TimedOut => {
                tracing::warn!("[SLOW CONSUMER] no write progress for {stall:?}; disconnecting");
                slow = true;
                false
            }
            Some(Err(_)) | None => false,
        };
        if !ok {
            kill.cancel();
            break;
        }
        queue.wrote(match taken {
            Taken::Batch(n) => n,
            _ => 1,
        });
        writing = false;
        if batch.capacity() > 0 && matches!(taken, Taken::Batch(_)) {
            batch = BytesMut::new(); // idle connections hold no batch buffer
        }
    }
    queue.stop(writing).await;
    let _ = tokio::time::timeout(Duration::from_secs(1), wr.shutdown()).await;
    slow
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn chunks_are_written_whole_and_in_order_through_short_writes() {
        use tokio::io::AsyncReadExt;
        // A pipe of 7 bytes: every write is short, most end inside a chunk.
        let (mut wr, mut rd) = tokio::io::duplex(7);
        let chunks: Vec<bytes::Bytes> = ["hello ", "", "chunked ", "w", "orld"]
            .iter()
            .map(|s| bytes::Bytes::from_static(s.as_bytes()))
            .collect();
        let reader = tokio::spawn(async move {
            let mut all = Vec::new();
            rd.read_to_end(&mut all).await.expect("read");
            all
        });
        write_chunks(&mut wr, &chunks, Duration::from_secs(5))
            .await
            .expect("written");
        drop(wr);
        assert_eq!(reader.await.expect("task"), b"hello chunked world");
    }

    #[tokio::test]
    async fn an_empty_write_writes_nothing_and_succeeds() {
        let (mut wr, _rd) = tokio::io::duplex(7);
        write_with_progress(&mut wr, b"", Duration::from_secs(5), || {})
            .await
            .expect("nothing to write is no error");
    }

    #[tokio::test]
    async fn the_send_queue_is_bounded_ordered_and_gives_memory_back() {
        let q = SendQueue::new(20, 1 << 20, 1 << 20);
        for i in 0..20 {
            // Past a quarter of the lines the queue is congested, but it still takes them.
            let want = if i < 5 {
                Pushed::Queued
            } else {
                Pushed::Congested
            };
            assert_eq!(q.push(Bytes::from(format!("{i}\n"))), want);
        }
        assert_eq!(
            q.push(Bytes::from("full\n")),
            Pushed::Full(Bytes::from("full\n"))
        );
        let mut batch = BytesMut::new();
        assert!(matches!(q.take(&mut batch).await, Taken::Batch(20)));
        q.wrote(20);
        let expected: String = (0..20).map(|i| format!("{i}\n")).collect();
        assert_eq!(&batch[..], expected.as_bytes());
        assert_eq!(
            q.state().lines.capacity(),
            0,
            "an emptied burst keeps no memory"
        );
        q.push(Bytes::from("e\n"));
        assert!(matches!(q.take(&mut batch).await, Taken::One(line) if line == "e\n"));
        q.wrote(1);
        assert_eq!(q.state().bytes, 0);
        q.close();
        assert_eq!(q.push(Bytes::from("f\n")), Pushed::Closed);
        assert!(matches!(q.take(&mut batch).await, Taken::End));
    }

    #[test]
    fn the_send_queue_is_bounded_in_bytes_too() {
        let q = SendQueue::new(1000, 100, 50);
        assert_eq!(
            q.push(Bytes::from(vec![b'x'; 150])),
            Pushed::Congested,
            "one line always fits"
        );
        assert_eq!(q.push(Bytes::from("y")), Pushed::Full(Bytes::from("y")));
        let q = SendQueue::new(1000, 100, 50);
        assert_eq!(q.push(Bytes::from(vec![b'x'; 40])), Pushed::Queued);
        assert_eq!(q.push(Bytes::from(vec![b'x'; 20])), Pushed::Congested);
        assert_eq!(q.push(Bytes::from(vec![b'x'; 40])), Pushed::Congested);
        assert_eq!(q.push(Bytes::from("z")), Pushed::Full(Bytes::from("z")));
        assert_eq!(
            q.push_notice(Bytes::from("notice")),
            Pushed::Queued,
            "the server's own lines still go"
        );
        assert!(
            matches!(q.push_notice(Bytes::from(vec![b'n'; 100])), Pushed::Full(_)),
            "but not past twice the cap"
        );
    }

    #[tokio::test]
    async fn a_sender_waits_until_the_reader_drains_the_queue() {
        let q = SendQueue::new(1000, 1 << 20, 100);
        for _ in 0..3 {
            q.push(Bytes::from(vec![b'x'; 60]));
        }
        let grace = Duration::from_secs(60);
        let waiter = {
            let q = q.clone();
            tokio::spawn(async move { q.until_relieved(grace).await })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "congested: the sender holds back");
        let mut batch = BytesMut::new();
        q.take(&mut batch).await;
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("relieved once drained")
            .expect("task");
    }

    #[tokio::test]
    async fn a_reader_that_takes_nothing_is_not_waited_for_past_the_grace() {
        let q = SendQueue::new(1000, 1 << 20, 10);
        q.push(Bytes::from(vec![b'x'; 60]));
        let started = Instant::now();
        q.until_relieved(Duration::from_millis(50)).await;
        assert!(started.elapsed() >= Duration::from_millis(40));
    }

    #[tokio::test]
    async fn a_full_queue_has_room_again_once_the_writer_takes() {
        let q = SendQueue::new(2, 1 << 20, 1 << 20);
        q.push(Bytes::from("a\n"));
        q.push(Bytes::from("b\n"));
        assert_eq!(q.push(Bytes::from("c\n")), Pushed::Full(Bytes::from("c\n")));
        let waiter = {
            let q = q.clone();
            tokio::spawn(async move { q.until_room(2).await })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        let mut batch = BytesMut::new();
        q.take(&mut batch).await;
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("room once taken")
            .expect("task");
        assert_eq!(q.push(Bytes::from("c\n")), Pushed::Queued);
    }

    #[tokio::test]
    async fn the_writer_wakes_for_a_line_pushed_while_it_waits() {
        let q = SendQueue::new(8, 1 << 20, 1 << 20);
        let waiter = {
            let q = q.clone();
            tokio::spawn(async move {
                let mut batch = BytesMut::new();
                matches!(q.take(&mut batch).await, Taken::One(line) if line == "late\n")
            })
        };
        tokio::task::yield_now().await;
        q.push(Bytes::from("late\n"));
        assert!(tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .expect("task"));
    }

    /// A connected pair of loopback TCP sockets: ours and the peer's.
    async fn tcp_pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let ours = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (peer, _) = listener.accept().await.expect("accept");
        (ours, peer)
    }

    async fn read_exactly(peer: &mut TcpStream, n: usize) -> Vec<u8> {
        use tokio::io::AsyncReadExt;
        let mut got = vec![0; n];
        tokio::time::timeout(Duration::from_secs(5), peer.read_exact(&mut got))
            .await
            .expect("in time")
            .expect("read");
        got
    }

    #[tokio::test]
    async fn a_line_for_an_idle_socket_is_written_by_the_task_that_pushes_it() {
        let (ours, mut peer) = tcp_pair().await;
        let (_rd, wr) = ours.into_split();
        let (q, sink) = SendQueue::attach(64, 1 << 20, 1 << 20, ConnWrite::Tcp(wr));
        // No writer task runs yet: only the pushing task can have written this.
        assert_eq!(q.push_now(Bytes::from("one\n")), Pushed::Queued);
        assert_eq!(read_exactly(&mut peer, 4).await, b"one\n");
        assert_eq!(q.written.load(Ordering::Acquire), 1);
        // Behind a queued line, a line waits its turn.
        q.push(Bytes::from("two\n"));
        assert_eq!(q.push_now(Bytes::from("three\n")), Pushed::Queued);
        assert_eq!(q.state().lines.len(), 2);
        let kill = CancellationToken::new();
        let writer = tokio::spawn(write_loop(sink, q.clone(), kill, Duration::from_secs(5)));
        assert_eq!(read_exactly(&mut peer, 10).await, b"two\nthree\n");
        q.close();
        assert!(!tokio::time::timeout(Duration::from_secs(5), writer)
            .await
            .expect("the writer ends once closed")
            .expect("task"));
        assert_eq!(q.written.load(Ordering::Acquire), 3);
    }

    #[tokio::test]
    async fn nothing_is_written_at_once_after_the_writer_ended() {
        use tokio::io::AsyncReadExt;
        let (ours, mut peer) = tcp_pair().await;
        let (_rd, wr) = ours.into_split();
        let (q, sink) = SendQueue::attach(64, 1 << 20, 1 << 20, ConnWrite::Tcp(wr));
        let kill = CancellationToken::new();
        let writer = tokio::spawn(write_loop(
            sink,
            q.clone(),
            kill.clone(),
            Duration::from_secs(5),
        ));
        kill.cancel(); // a kick, a slow consumer, a shutdown
        tokio::time::timeout(Duration::from_secs(5), writer)
            .await
            .expect("ends")
            .expect("task");
        assert!(q.state().stopped, "the writer says it has ended");
        assert_eq!(q.push_now(Bytes::from("late\n")), Pushed::Queued);
        assert_eq!(q.state().lines.len(), 1, "left queued, not written");
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), peer.read_to_end(&mut rest))
            .await
            .expect("the write side was shut")
            .expect("read");
        assert!(rest.is_empty(), "written after the end: {rest:?}");
    }

    #[tokio::test]
    async fn a_killed_connections_reader_sees_the_end_of_its_stream() {
        use tokio::io::AsyncReadExt;
        let (ours, _peer) = tcp_pair().await; // the peer keeps its side open
        let (mut rd, wr) = ours.into_split();
        let (q, sink) = SendQueue::attach(64, 1 << 20, 1 << 20, ConnWrite::Tcp(wr));
        assert!(q.ends_reader());
        let kill = CancellationToken::new();
        let writer = tokio::spawn(write_loop(sink, q, kill.clone(), Duration::from_secs(5)));
        let mut byte = [0u8; 1];
        let read = tokio::spawn(async move { rd.read(&mut byte).await });
        kill.cancel();
        let n = tokio::time::timeout(Duration::from_secs(5), read)
            .await
            .expect("the reader is woken without watching the kill token")
            .expect("task")
            .expect("read");
        assert_eq!(n, 0, "the end of the stream");
        writer.await.expect("task");
    }

    #[tokio::test]
    async fn what_the_socket_does_not_take_at_once_is_written_first_by_the_writer() {
        let (ours, mut peer) = tcp_pair().await;
        let (_rd, wr) = ours.into_split();
        let (q, sink) = SendQueue::attach(64, 64 << 20, 64 << 20, ConnWrite::Tcp(wr));
        // Far more than loopback buffers while the peer reads nothing (at most 4 MiB).
        let big: Vec<u8> = (0..32 << 20).map(|i: u32| (i % 251) as u8).collect();
        assert_eq!(q.push_now(Bytes::from(big.clone())), Pushed::Queued);
        let rest = q.state().bytes;
        assert!(rest > 0 && rest < big.len(), "written in part: {rest} left");
        assert_eq!(q.written.load(Ordering::Acquire), 0, "not whole yet");
        assert_eq!(q.push_now(Bytes::from("after\n")), Pushed::Queued);
        let kill = CancellationToken::new();
        let writer = tokio::spawn(write_loop(sink, q.clone(), kill, Duration::from_secs(5)));
        let got = read_exactly(&mut peer, big.len() + 6).await;
        assert!(
            got[..big.len()] == big[..],
            "the big line arrives whole and first"
        );
        assert_eq!(&got[big.len()..], b"after\n");
        q.close();
        tokio::time::timeout(Duration::from_secs(5), writer)
            .await
            .expect("ends")
            .expect("task");
        assert_eq!(q.written.load(Ordering::Acquire), 2);
    }
}
