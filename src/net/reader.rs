//! A connection's read side, cut into lines by [`LineFramer`] (with the idle-pause rule
//! where the server needs it), plus the raw reads a file body needs.

use std::future::poll_fn;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};
use tokio_util::sync::CancellationToken;

use super::ConnRead;
use crate::flow::Ended;
use crate::protocol::LineFramer;

/// How much a reader asks the kernel for at a time on a chat connection.
const READ_CHUNK: usize = 8 * 1024;
/// A raw read takes a fresh buffer when less than this is left of the current one.
const MIN_RAW_READ: usize = 16 * 1024;

/// A stream's read side, cut into lines. Generic over the stream so that the same reader
/// serves plain and TLS connections, and in-memory pipes in tests.
pub(crate) struct LineReader<R = ConnRead> {
    /// The stream's read half.
    rd: R,
    /// Bytes read but not yet consumed.
    buf: BytesMut,
    /// The framing state (pause- or line-framed).
    framer: LineFramer,
    /// How long bytes without a newline may sit before they count as a line.
    idle_pause: Duration,
    /// Whether bytes left without a newline when the peer closes count as a last line
    /// (they do for the lab's newline-less client; not once newlines are required).
    partial_at_eof: bool,
}

/// The buffers a body's reads were carved from (see [`LineReader::read_body`]), kept to be
/// used again once every piece of one is gone: fresh memory costs a page fault per page
/// (page faults and zeroing were 6% of the server's CPU in a 1 GB relay). Dropped with the
/// body, so an idle connection keeps none.
#[derive(Default)]
pub(crate) struct Spare(Vec<BytesMut>);

impl Spare {
    /// Buffers kept at most: more than a spool and its forwards hold at once (about 11 MiB
    /// at most, in the 1 MiB buffers an upload reads into). Past it the oldest is let go
    /// (it is freed once its pieces are).
    const MAX: usize = 24;

    /// Keeps `done` (a used buffer) and returns one of `size` bytes: a kept one whose
    /// pieces are all gone, or a new one.
    fn swap(&mut self, done: BytesMut, size: usize) -> BytesMut {
        if self.0.len() == Self::MAX {
            self.0.remove(0);
        }
        self.0.push(done);
        match self
            .0
            .iter_mut()
            .position(|b| b.is_empty() && b.try_reclaim(size))
        {
            Some(i) => self.0.swap_remove(i),
            None => BytesMut::with_capacity(size),
        }
    }
}

impl<R: AsyncRead + Unpin> LineReader<R> {
    pub(crate) fn new(rd: R, max_line: usize, idle_pause: Duration) -> Self {
        Self {
            rd,
            buf: BytesMut::new(),
            framer: LineFramer::new(max_line),
            idle_pause,
            partial_at_eof: true,
        }
    }

    /// A reader on which only a newline ends a line (how a client reads the server).
    pub(crate) fn line_framed(rd: R, max_line: usize) -> Self {
        Self {
            rd,
            buf: BytesMut::new(),
            framer: LineFramer::line_framed(max_line),
            idle_pause: Duration::ZERO,
            partial_at_eof: true,
        }
    }

    /// From now on only a newline ends a line (file headers, after the username), and a
    /// line cut short by the peer closing is dropped, not taken for a whole one.
    pub(crate) fn require_newlines(&mut self, max_line: usize) {
        self.framer = LineFramer::line_framed(max_line);
        self.partial_at_eof = false;
    }

    /// Reads what the stream has (at most [`READ_CHUNK`] bytes) onto the buffer; 0 at end
    /// of stream. The read lands on the stack inside one poll and only what came is kept:
    /// a connection's buffer is sized by its traffic, not by the read size, and no scratch
    /// array lives in the connection's future across an await (no transient 8 KiB blocks
    /// to fragment the heap of a server with 100,000 users).
    async fn fill(&mut self) -> std::io::Result<usize> {
        poll_fn(|cx| {
            // Not zeroed: the kernel writes what it reads, and only that is kept (zeroing
            // 8 KiB per read was half of the server's instructions per chat message).
            let mut chunk = [MaybeUninit::<u8>::uninit(); READ_CHUNK];
            let mut rb = ReadBuf::uninit(&mut chunk);
            match Pin::new(&mut self.rd).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    self.buf.extend_from_slice(rb.filled());
                    Poll::Ready(Ok(rb.filled().len()))
                }
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            }
        })
        .await
    }

    /// The next line within `limit` ([`Ended::Stalled`] past it): a line that must follow
    /// at once, such as a transfer's trailer.
    pub(crate) async fn next_line_within(
        &mut self,
        cancel: &CancellationToken,
        limit: std::time::Duration,
    ) -> Result<Bytes, Ended> {
        match tokio::time::timeout(limit, self.next_line(cancel)).await {
            Ok(line) => line,
            Err(_) => Err(Ended::Stalled(limit)),
        }
    }

    /// The next line, or why there is none. Bytes left without a newline when the peer
    /// closes its side count as a last line.
    pub(crate) async fn next_line(&mut self, cancel: &CancellationToken) -> Result<Bytes, Ended> {
        self.next_line_or(cancel, true).await
    }

    /// [`next_line`](Self::next_line), watching `cancel` only if `watch`: a reader whose
    /// stream is ended when its connection is killed (a chat session's plain TCP socket,
    /// shut by its writer task: see `QueueSink`) need not register with the kill token on
    /// every read.
    pub(crate) async fn next_line_or(
        &mut self,
        cancel: &CancellationToken,
        watch: bool,
    ) -> Result<Bytes, Ended> {
        loop {
            match self.framer.next_line(&mut self.buf) {
                Ok(Some(line)) => return Ok(line),
                Ok(None) => {}
                Err(e) => return Err(Ended::Frame(e)),
            }
            let pausing = self.framer.wants_idle_flush(&self.buf);
            if self.buf.is_empty() && self.buf.capacity() > 0 {
                // An idle connection holds no buffer: the one for the next read is taken
                // once the stream is readable (most users are idle most of the time).
                self.buf = BytesMut::new();
            }
            // Two selects, so that the timer is made only when a pause can end a line
            // (`select!` makes every branch's future, enabled or not).
            let read = match pausing {
                true => tokio::select! {
                    biased;
                    _ = cancel.cancelled(), if watch => return Err(Ended::Closed),
                    _ = tokio::time::sleep(self.idle_pause) => {
                        match self.framer.take_idle_line(&mut self.buf) {
                            Some(line) => return Ok(line),
                            None => continue,
                        }
                    }
                    read = self.fill() => read,
                },
                false => tokio::select! {
                    biased;
                    _ = cancel.cancelled(), if watch => return Err(Ended::Closed),
                    read = self.fill() => read,
                },
            };
            match read {
                Ok(0) => {
                    return match self.buf.is_empty() || !self.partial_at_eof {
                        true => Err(Ended::Closed),
                        false => Ok(self.buf.split().freeze()),
                    };
                }
                Ok(_) => {}
                Err(e) => return Err(Ended::Io(e)),
            }
        }
    }

    /// Up to `max` raw bytes (a file body): first what is buffered, then from the stream.
    /// An empty result means the peer closed its side.
    pub(crate) async fn read_raw(&mut self, max: usize, chunk: usize) -> std::io::Result<Bytes> {
        if self.buf.is_empty() {
            // Reads carve consecutive pieces out of one `chunk`-sized buffer until little
            // is left of it, so pieces that are kept (a spool's newest bytes) pin about
            // their own size, not a buffer each.
            if self.buf.capacity() < MIN_RAW_READ {
                self.buf.reserve(chunk);
            }
            if self.read_more(chunk.min(max)).await? == 0 {
                return Ok(Bytes::new());
            }
        }
        Ok(self.take_buffered(max))
    }

    /// Reads up to `want` more bytes into the buffer; how many came (0: the peer closed).
    async fn read_more(&mut self, want: usize) -> std::io::Result<usize> {
        (&mut self.rd)
            .take(want as u64)
            .read_buf(&mut self.buf)
            .await
    }

    /// Up to `max` of the buffered bytes, taken out of the buffer.
    fn take_buffered(&mut self, max: usize) -> Bytes {
        let take = self.buf.len().min(max);
        self.buf.split_to(take).freeze()
    }

    /// As [`LineReader::read_raw`], for a body whose next byte goes to offset `at` of a
    /// file written with direct I/O (see `transfer::Disk`): the body is laid out in memory
    /// as in the file (a buffer's address agrees with the file offset modulo `align`, and
    /// it is filled up to a block boundary), so that the blocks a piece holds whole can be
    /// written from where they are. (Not the bytes read with the line before the body.)
    pub(crate) async fn read_body(
        &mut self,
        max: usize,
        chunk: usize,
        (at, align): (u64, usize),
        spare: &mut Spare,
    ) -> std::io::Result<Bytes> {
        if self.buf.is_empty() {
            let into = usize::try_from(at % align as u64).unwrap_or(0);
            // Bytes that can still be read into the buffer up to its last block boundary.
            let room = |buf: &BytesMut| {
                let start = buf.as_ptr().addr();
                ((start + buf.capacity()) / align * align).saturating_sub(start)
            };
            if room(&self.buf) == 0 || self.buf.as_ptr().addr() % align != into {
                let done = std::mem::take(&mut self.buf);
                self.buf = spare.swap(done, chunk + 2 * align);
                let pad = (self.buf.as_ptr().align_offset(align) + into) % align;
                self.buf.resize(pad, 0);
                drop(self.buf.split_to(pad));
            }
            if self.read_more(room(&self.buf).min(max)).await? == 0 {
                return Ok(Bytes::new());
            }
        }
        Ok(self.take_buffered(max))
    }

    /// Whether nothing read is left unconsumed.
    pub(crate) fn is_drained(&self) -> bool {
        self.buf.is_empty()
    }

    /// The next line if it is already buffered whole (no read, no wait): a pipelining
    /// client's next commands.
    pub(crate) fn buffered_line(&mut self) -> Option<Result<Bytes, crate::protocol::FrameError>> {
        self.framer.next_line(&mut self.buf).transpose()
    }

    /// Puts `bytes` back in front of what is buffered, to be read again: what a raw read
    /// took past the end of a body that ends itself (a zstd frame).
    pub(crate) fn unread(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let mut buf = BytesMut::with_capacity(bytes.len() + self.buf.len());
        buf.extend_from_slice(bytes);
        buf.extend_from_slice(&self.buf);
        self.buf = buf;
        self.framer.rescan();
    }

    /// Reads and drops exactly `n` raw bytes. Fails with `UnexpectedEof` if the peer
    /// closed, `TimedOut` if it went `stall` without sending a byte, and `Interrupted` if
    /// `cancel` fired first.
    pub(crate) async fn skip(
        &mut self,
        mut n: u64,
        chunk: usize,
        cancel: &CancellationToken,
        stall: Duration,
    ) -> std::io::Result<()> {
        use std::io::{Error, ErrorKind};
        while n > 0 {
            let want = usize::try_from(n).unwrap_or(usize::MAX).min(chunk);
            let got = tokio::select! {
                _ = cancel.cancelled() => return Err(Error::from(ErrorKind::Interrupted)),
                got = tokio::time::timeout(stall, self.read_raw(want, chunk)) => got,
            };
            match got {
                Ok(Ok(bytes)) if !bytes.is_empty() => n -= bytes.len() as u64,
                Ok(Ok(_)) => return Err(Error::from(ErrorKind::UnexpectedEof)),
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(Error::from(ErrorKind::TimedOut)),
            }
        }
        Ok(())
    }

    /// Drops buffered bytes and reads until the peer has been quiet for `quiet` (to resync
    /// after a header whose body length is unknown). Returns how many bytes it dropped, or
    /// `None` if the peer closed, `cancel` fired, or it never went quiet within `limit`.
    pub(crate) async fn discard_until_quiet(
        &mut self,
        quiet: Duration,
        limit: Duration,
        cancel: &CancellationToken,
    ) -> Option<u64> {
        let mut dropped = self.buf.len() as u64;
        self.buf.clear();
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let read = tokio::select! {
                _ = cancel.cancelled() => return None,
                _ = tokio::time::sleep_until(deadline) => return None,
                read = tokio::time::timeout(quiet, self.fill()) => read,
            };
            match read {
                Err(_) => return Some(dropped),
                Ok(Ok(0)) | Ok(Err(_)) => return None,
                Ok(Ok(n)) => {
                    dropped += n as u64;
                    self.buf.clear();
                }
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    fn never() -> CancellationToken {
        CancellationToken::new()
    }

    #[tokio::test]
    async fn a_body_is_read_in_pieces_laid_out_as_in_its_file() {
        const ALIGN: usize = 4096;
        let body: Vec<u8> = (0..1_000_003u32).map(|i| (i % 251) as u8).collect();
        let (mut peer, ours) = tokio::io::duplex(10_000); // reads come in odd sizes
        let mut reader = LineReader::line_framed(ours, 100);
        let sent = body.clone();
        let writer = tokio::spawn(async move {
            peer.write_all(b"a|b|1000003\n").await.expect("write");
            for part in sent.chunks(7_777) {
                peer.write_all(part).await.expect("write");
            }
            peer
        });
        assert_eq!(
            reader.next_line(&never()).await.expect("line"),
            "a|b|1000003"
        );
        // A part is in the file already: the body goes on at offset 10.
        let (from, mut at) = (10u64, 10u64);
        let (mut got, mut laid_out) = (Vec::new(), 0);
        let mut spare = Spare::default();
        while got.len() < body.len() {
            let left = body.len() - got.len();
            let piece = reader
                .read_body(left, 64 * 1024, (at, ALIGN), &mut spare)
                .await
                .expect("body");
            assert!(!piece.is_empty());
            let end = at + piece.len() as u64;
            if piece.as_ptr().addr() % ALIGN == (at % ALIGN as u64) as usize {
                laid_out += piece.len();
            }
            got.extend_from_slice(&piece);
            at = end;
        }
        assert_eq!(got, body);
        assert_eq!(at - from, body.len() as u64);
        // All but the bytes read with the line (at most one 10,000-byte read) are laid out.
        assert!(
            laid_out >= body.len() - 20_000,
            "{laid_out} of {}",
            body.len()
        );
        drop(writer.await.expect("writer"));
    }

    #[tokio::test]
    async fn a_body_read_in_blocks_never_holds_back_bytes_that_came() {
        let (mut peer, ours) = tokio::io::duplex(1 << 20);
        let mut reader = LineReader::line_framed(ours, 100);
        let mut spare = Spare::default();
        peer.write_all(b"h\n").await.expect("write");
        assert_eq!(reader.next_line(&never()).await.expect("line"), "h");
        // 199,999 of 200,000 bytes, and the sender waits: all of them must come out.
        peer.write_all(&[7u8; 199_999]).await.expect("write");
        let mut at = 0u64;
        while at < 199_999 {
            let left = 200_000 - at as usize;
            let read = reader.read_body(left, 1 << 20, (at, 4096), &mut spare);
            let piece = tokio::time::timeout(Duration::from_secs(5), read)
                .await
                .expect("the bytes that came are handed out without waiting for more")
                .expect("body");
            at += piece.len() as u64;
        }
        assert_eq!(at, 199_999);
    }

    #[tokio::test]
    async fn lines_then_raw_bytes_from_one_stream() {
        let (mut peer, ours) = tokio::io::duplex(64);
        let mut reader = LineReader::line_framed(ours, 100);
        peer.write_all(b"a|b|3\nxyzrest\n").await.expect("write");
        assert_eq!(reader.next_line(&never()).await.expect("line"), "a|b|3");
        assert_eq!(reader.read_raw(3, 16).await.expect("raw"), "xyz");
        assert_eq!(reader.next_line(&never()).await.expect("line"), "rest");
        drop(peer);
        assert!(matches!(
            reader.next_line(&never()).await,
            Err(Ended::Closed)
        ));
    }

    #[tokio::test]
    async fn a_pause_ends_a_line_sent_without_a_newline() {
        let (mut peer, ours) = tokio::io::duplex(64);
        let mut reader = LineReader::new(ours, 100, Duration::from_millis(25));
        peer.write_all(b"alice").await.expect("write");
        assert_eq!(reader.next_line(&never()).await.expect("line"), "alice");
    }

    #[tokio::test]
    async fn a_line_cut_short_counts_only_where_newlines_are_not_required() {
        let (mut peer, ours) = tokio::io::duplex(64);
        let mut reader = LineReader::new(ours, 100, Duration::from_secs(60));
        peer.write_all(b"alice").await.expect("write");
        drop(peer);
        assert_eq!(reader.next_line(&never()).await.expect("line"), "alice");

        let (mut peer, ours) = tokio::io::duplex(64);
        let mut reader = LineReader::new(ours, 100, Duration::from_secs(60));
        reader.require_newlines(100);
        peer.write_all(b"alice|bob|f|1").await.expect("write");
        drop(peer);
        assert!(matches!(
            reader.next_line(&never()).await,
            Err(Ended::Closed)
        ));
    }

    #[tokio::test]
    async fn skip_reports_how_it_ended() {
        let (mut peer, ours) = tokio::io::duplex(64);
        let mut reader = LineReader::line_framed(ours, 100);
        peer.write_all(b"0123456789next\n").await.expect("write");
        reader
            .skip(10, 4, &never(), Duration::from_secs(5))
            .await
            .expect("skipped");
        assert_eq!(reader.next_line(&never()).await.expect("line"), "next");
        drop(peer);
        let end = reader.skip(1, 4, &never(), Duration::from_secs(5)).await;
        assert_eq!(
            end.map_err(|e| e.kind()),
            Err(std::io::ErrorKind::UnexpectedEof)
        );
    }

    #[tokio::test]
    async fn discarding_counts_what_it_dropped() {
        let (mut peer, ours) = tokio::io::duplex(64);
        let mut reader = LineReader::line_framed(ours, 100);
        peer.write_all(b"garbage").await.expect("write");
        let quiet = Duration::from_millis(200);
        let dropped = reader
            .discard_until_quiet(quiet, Duration::from_secs(5), &never())
            .await;
        assert_eq!(dropped, Some(7));
    }
}
