//! Socket plumbing shared by the server and the client engine: a framed line reader (with
//! the idle-pause rule where the server needs it) and the writer task that drains a
//! connection's bounded outbox.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::OwnedReadHalf;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::protocol::{FrameError, LineFramer};

/// How much a reader asks the kernel for at a time on a chat connection.
const READ_CHUNK: usize = 8 * 1024;
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
    /// after a header whose body length is unknown). Returns false if the peer closed.
    pub(crate) async fn discard_until_quiet(&mut self, quiet: Duration) -> bool {
        self.buf.clear();
        // On the heap: a stack array would live in every file connection's future.
        let mut scratch = vec![0u8; 4096];
        loop {
            match tokio::time::timeout(quiet, self.rd.read(&mut scratch)).await {
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

/// Drains `rx` into the socket until the queue closes or `kill` fires, batching whatever is
/// already queued into one write. A write that makes no progress for `stall` means the
/// peer is not reading: the connection is killed. Shuts the write side down at the end.
pub(crate) async fn write_loop<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut rx: mpsc::Receiver<Bytes>,
    kill: CancellationToken,
    stall: Duration,
) {
    let mut batch = BytesMut::new();
    loop {
        let first = tokio::select! {
            biased;
            _ = kill.cancelled() => break,
            next = rx.recv() => match next {
                Some(bytes) => bytes,
                None => break,
            },
        };
        let write = async {
            if rx.is_empty() {
                return write_with_progress(&mut wr, &first, stall).await;
            }
            batch.clear();
            batch.extend_from_slice(&first);
            while batch.len() < WRITE_BATCH {
                match rx.try_recv() {
                    Ok(more) => batch.extend_from_slice(&more),
                    Err(_) => break,
                }
            }
            write_with_progress(&mut wr, &batch, stall).await
        };
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
        if rx.is_empty() && batch.capacity() > 0 {
            batch = BytesMut::new(); // idle connections hold no batch buffer
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), wr.shutdown()).await;
}
