//! Socket plumbing shared by the server and the client engine: a framed line reader (with
//! the idle-pause rule where the server needs it) and the writer task that drains a
//! connection's bounded outbox.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::OwnedReadHalf;
use tokio_util::sync::CancellationToken;

use crate::protocol::{FrameError, LineFramer};

/// How much a reader asks the kernel for at a time on a chat connection.
const READ_CHUNK: usize = 8 * 1024;
/// Slots an emptied send queue may keep (a few are reused by every message; a burst's
/// worth is given back).
const KEEP_LINES: usize = 8;
/// Largest batch the writer hands to one `write` call.
const WRITE_BATCH: usize = 64 * 1024;

/// What ended a read.
#[derive(Debug)]
pub(crate) enum ReadEnd {
    /// The peer closed its side (or the connection was cancelled).
    Closed,
    /// The peer broke the framing rules.
    Frame(FrameError),
    /// The socket failed.
    Io(std::io::Error),
}

/// A socket's read side, cut into lines by [`LineFramer`].
pub(crate) struct LineReader {
    /// The socket's read half.
    rd: OwnedReadHalf,
    /// Bytes read but not yet consumed.
    buf: BytesMut,
    /// The framing state (pause- or line-framed).
    framer: LineFramer,
    /// How long bytes without a newline may sit before they count as a line.
    idle_pause: Duration,
}

impl LineReader {
    pub(crate) fn new(rd: OwnedReadHalf, max_line: usize, idle_pause: Duration) -> Self {
        Self {
            rd,
            buf: BytesMut::new(),
            framer: LineFramer::new(max_line),
            idle_pause,
        }
    }

    /// A reader on which only a newline ends a line (how a client reads the server).
    pub(crate) fn line_framed(rd: OwnedReadHalf, max_line: usize) -> Self {
        Self {
            rd,
            buf: BytesMut::new(),
            framer: LineFramer::line_framed(max_line),
            idle_pause: Duration::ZERO,
        }
    }

    /// From now on only a newline ends a line (file headers, after the username).
    pub(crate) fn require_newlines(&mut self, max_line: usize) {
        self.framer = LineFramer::line_framed(max_line);
    }

    /// The next line, or why there is none. Bytes left without a newline when the peer
    /// closes its side count as a last line.
    pub(crate) async fn next_line(&mut self, cancel: &CancellationToken) -> Result<Bytes, ReadEnd> {
        loop {
            match self.framer.next_line(&mut self.buf) {
                Ok(Some(line)) => return Ok(line),
                Ok(None) => {}
                Err(e) => return Err(ReadEnd::Frame(e)),
            }
            let pausing = self.framer.wants_idle_flush(&self.buf);
            if self.buf.is_empty() && self.buf.capacity() > 0 {
                // An idle connection holds no buffer: the one for the next read is taken
                // once the socket is readable (most users are idle most of the time).
                self.buf = BytesMut::new();
            }
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return Err(ReadEnd::Closed),
                _ = tokio::time::sleep(self.idle_pause), if pausing => {
                    if let Some(line) = self.framer.take_idle_line(&mut self.buf) {
                        return Ok(line);
                    }
                }
                ready = self.rd.readable() => {
                    if let Err(e) = ready {
                        return Err(ReadEnd::Io(e));
                    }
                    // Read on the stack, keep only what came: a connection's buffer is
                    // sized by its traffic, not by the read size (no transient 8 KiB
                    // blocks to fragment the heap of a server with 100,000 users).
                    let mut chunk = [0u8; READ_CHUNK];
                    match self.rd.try_read(&mut chunk) {
                        Ok(n @ 1..) => self.buf.extend_from_slice(&chunk[..n]),
                        Ok(0) => {
                            return match self.buf.is_empty() {
                                true => Err(ReadEnd::Closed),
                                false => Ok(self.buf.split().freeze()),
                            };
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(e) => return Err(ReadEnd::Io(e)),
                    }
                }
            }
        }
    }

    /// Up to `max` raw bytes (a file body): first what is buffered, then from the socket.
    /// An empty result means the peer closed its side.
    pub(crate) async fn read_raw(&mut self, max: usize, chunk: usize) -> std::io::Result<Bytes> {
        if self.buf.is_empty() {
            self.buf.reserve(chunk);
            let want = chunk.min(max);
            let n = (&mut self.rd)
                .take(want as u64)
                .read_buf(&mut self.buf)
                .await?;
            if n == 0 {
                return Ok(Bytes::new());
            }
        }
        let take = self.buf.len().min(max);
        Ok(self.buf.split_to(take).freeze())
    }

    /// Reads and drops exactly `n` raw bytes; false if the peer closed, went `stall`
    /// without sending a byte, or `cancel` fired first.
    pub(crate) async fn skip(
        &mut self,
        mut n: u64,
        chunk: usize,
        cancel: &CancellationToken,
        stall: Duration,
    ) -> bool {
        while n > 0 {
            let want = usize::try_from(n).unwrap_or(usize::MAX).min(chunk);
            let got = tokio::select! {
                _ = cancel.cancelled() => return false,
                got = tokio::time::timeout(stall, self.read_raw(want, chunk)) => got,
            };
            match got {
                Ok(Ok(bytes)) if !bytes.is_empty() => n -= bytes.len() as u64,
                _ => return false,
            }
        }
        true
    }

    /// Drops buffered bytes and reads until the peer has been quiet for `quiet` (to resync
    /// after a header whose body length is unknown). Returns false if the peer closed, if
    /// `cancel` fired, or if it never went quiet within `limit`.
    pub(crate) async fn discard_until_quiet(
        &mut self,
        quiet: Duration,
        limit: Duration,
        cancel: &CancellationToken,
    ) -> bool {
        self.buf.clear();
        // On the heap: a stack array would live in every file connection's future.
        let mut scratch = vec![0u8; 4096];
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let read = tokio::select! {
                _ = cancel.cancelled() => return false,
                _ = tokio::time::sleep_until(deadline) => return false,
                read = tokio::time::timeout(quiet, self.rd.read(&mut scratch)) => read,
            };
            match read {
                Err(_) => return true,
                Ok(Ok(0)) | Ok(Err(_)) => return false,
                Ok(Ok(_)) => {}
            }
        }
    }

    /// Releases a large body buffer once a transfer is over, so idle connections stay small.
    pub(crate) fn shrink(&mut self) {
        if self.buf.is_empty() && self.buf.capacity() > READ_CHUNK {
            self.buf = BytesMut::new();
        }
    }
}

/// Writes all of `buf`, failing with `TimedOut` only if the peer accepts *nothing* for
/// `stall`: a slow but steady reader is never cut off, a stopped one is.
pub(crate) async fn write_with_progress<W: AsyncWrite + Unpin>(
    wr: &mut W,
    mut buf: &[u8],
    stall: Duration,
) -> std::io::Result<()> {
    use std::io::{Error, ErrorKind};
    while !buf.is_empty() {
        match tokio::time::timeout(stall, wr.write(buf)).await {
            Ok(Ok(0)) => return Err(Error::from(ErrorKind::WriteZero)),
            Ok(Ok(n)) => buf = &buf[n..],
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(Error::from(ErrorKind::TimedOut)),
        }
    }
    Ok(())
}

/// A connection's outgoing lines: a bounded FIFO of ready-made buffers, filled by any task
/// without waiting and drained by the connection's one writer. Unlike a channel it holds no
/// memory while empty, and most connections are idle most of the time.
pub(crate) struct SendQueue {
    state: std::sync::Mutex<QueueState>,
    /// Wakes the writer; a notification sent while it is busy is kept for its next wait.
    ready: tokio::sync::Notify,
    /// Lines that may wait before the reader counts as not reading.
    capacity: usize,
    /// Bytes that may wait: long lines reach it before `capacity` does.
    max_bytes: usize,
}

#[derive(Default)]
struct QueueState {
    lines: std::collections::VecDeque<Bytes>,
    /// Bytes in `lines`.
    bytes: usize,
    /// No more lines will come: the writer drains what is left and stops.
    closed: bool,
}

/// What became of a pushed line.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Pushed {
    /// Queued for the writer.
    Queued,
    /// The queue is at capacity: the reader is not keeping up.
    Full,
    /// The connection is closing.
    Closed,
}

/// What the writer took from the queue.
enum Taken {
    /// One line, to write as it is.
    One(Bytes),
    /// Several lines, copied into the batch buffer.
    Batch,
    /// The queue is closed and empty.
    End,
}

impl SendQueue {
    pub(crate) fn new(capacity: usize, max_bytes: usize) -> Arc<Self> {
        Arc::new(Self {
            state: std::sync::Mutex::default(),
            ready: tokio::sync::Notify::new(),
            capacity: capacity.max(1),
            max_bytes: max_bytes.max(1),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Queues `bytes` without waiting.
    pub(crate) fn push(&self, bytes: Bytes) -> Pushed {
        let mut st = self.state();
        if st.closed {
            return Pushed::Closed;
        }
        let over_bytes = st.bytes + bytes.len() > self.max_bytes && !st.lines.is_empty();
        if st.lines.len() >= self.capacity || over_bytes {
            return Pushed::Full;
        }
        st.bytes += bytes.len();
        st.lines.push_back(bytes);
        drop(st);
        self.ready.notify_one();
        Pushed::Queued
    }

    /// No more lines: the writer sends what is queued and then shuts the socket.
    pub(crate) fn close(&self) {
        self.state().closed = true;
        self.ready.notify_one();
    }

    /// Waits for lines and takes them: one as it is, or up to `WRITE_BATCH` bytes of several
    /// copied into `batch`. An emptied queue gives its memory back.
    async fn take(&self, batch: &mut BytesMut) -> Taken {
        loop {
            {
                let mut st = self.state();
                let taken = match st.lines.len() {
                    0 if st.closed => return Taken::End,
                    0 => None,
                    1 => st.lines.pop_front().map(Taken::One),
                    _ => {
                        batch.clear();
                        while batch.len() < WRITE_BATCH {
                            match st.lines.pop_front() {
                                Some(line) => batch.extend_from_slice(&line),
                                None => break,
                            }
                        }
                        Some(Taken::Batch)
                    }
                };
                st.bytes -= match &taken {
                    Some(Taken::One(line)) => line.len(),
                    Some(Taken::Batch) => batch.len(),
                    _ => 0,
                };
                if let Some(taken) = taken {
                    if st.lines.is_empty() && st.lines.capacity() > KEEP_LINES {
                        st.lines = std::collections::VecDeque::new();
                    }
                    return taken;
                }
            }
            self.ready.notified().await;
        }
    }
}

/// Drains `queue` into the socket until it is closed and empty or `kill` fires, batching
/// whatever is queued into one write. A peer that accepts nothing for `stall` is not
/// reading: the connection is killed. Shuts the write side down at the end.
pub(crate) async fn write_loop<W: AsyncWrite + Unpin>(
    mut wr: W,
    queue: Arc<SendQueue>,
    kill: CancellationToken,
    stall: Duration,
) {
    let mut batch = BytesMut::new();
    loop {
        let taken = tokio::select! {
            biased;
            _ = kill.cancelled() => break,
            taken = queue.take(&mut batch) => taken,
        };
        let write = async {
            match &taken {
                Taken::One(line) => write_with_progress(&mut wr, line, stall).await,
                Taken::Batch => write_with_progress(&mut wr, &batch, stall).await,
                Taken::End => Ok(()),
            }
        };
        if matches!(taken, Taken::End) {
            break;
        }
        let ok = tokio::select! {
            biased;
            _ = kill.cancelled() => false,
            res = write => match res {
                Ok(()) => true,
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                    tracing::warn!("[SLOW CONSUMER] no write progress for {stall:?}; disconnecting");
                    false
                }
                Err(_) => false,
            },
        };
        if !ok {
            kill.cancel();
            break;
        }
        if batch.capacity() > 0 && matches!(taken, Taken::Batch) {
            batch = BytesMut::new(); // idle connections hold no batch buffer
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), wr.shutdown()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_send_queue_is_bounded_ordered_and_gives_memory_back() {
        let q = SendQueue::new(20, 1 << 20);
        for i in 0..20 {
            assert_eq!(q.push(Bytes::from(format!("{i}\n"))), Pushed::Queued);
        }
        assert_eq!(q.push(Bytes::from("full\n")), Pushed::Full);
        let mut batch = BytesMut::new();
        assert!(matches!(q.take(&mut batch).await, Taken::Batch));
        let expected: String = (0..20).map(|i| format!("{i}\n")).collect();
        assert_eq!(&batch[..], expected.as_bytes());
        assert_eq!(
            q.state().lines.capacity(),
            0,
            "an emptied burst keeps no memory"
        );
        q.push(Bytes::from("e\n"));
        assert!(matches!(q.take(&mut batch).await, Taken::One(line) if line == "e\n"));
        assert_eq!(q.state().bytes, 0);
        q.close();
        assert_eq!(q.push(Bytes::from("f\n")), Pushed::Closed);
        assert!(matches!(q.take(&mut batch).await, Taken::End));
    }

    #[test]
    fn the_send_queue_is_bounded_in_bytes_too() {
        let q = SendQueue::new(1000, 100);
        assert_eq!(
            q.push(Bytes::from(vec![b'x'; 150])),
            Pushed::Queued,
            "one line always fits"
        );
        assert_eq!(q.push(Bytes::from("y")), Pushed::Full);
        let q = SendQueue::new(1000, 100);
        assert_eq!(q.push(Bytes::from(vec![b'x'; 60])), Pushed::Queued);
        assert_eq!(q.push(Bytes::from(vec![b'x'; 40])), Pushed::Queued);
        assert_eq!(q.push(Bytes::from("z")), Pushed::Full);
    }

    #[tokio::test]
    async fn the_writer_wakes_for_a_line_pushed_while_it_waits() {
        let q = SendQueue::new(8, 1 << 20);
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
}
