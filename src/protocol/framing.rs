//! Cutting a byte stream into lines, for both kinds of clients the server must serve.
//!
//! The rule (documented for users in `docs/PROTOCOL.md`):
//!
//! 1. A `\n` ends a line; a `\r` right before it is dropped. Several lines in one read are
//!    several lines, never one.
//! 2. A connection that has never sent a `\n` is *pause-framed*: bytes that sit without a
//!    newline for the idle pause (a few tens of milliseconds, chosen by the caller) form one
//!    line. This is how the lab's client talks: one `send` per command, no newline, paced by
//!    a person typing.
//! 3. Once a connection has sent a `\n` it is *line-framed* for good: an unfinished line waits
//!    for its newline, however long that takes.
//! 4. A line longer than the framer's limit is an error; the caller answers it and closes
//!    the connection, so no peer can make the server buffer without bound.
//!
//! The framer works on the caller's buffer: `next_line` takes complete lines out of it, and
//! `take_idle_line` is what the caller invokes when its idle timer fires.

use bytes::{Bytes, BytesMut};

/// Why a stream could not be framed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// More than `limit` bytes arrived without a line ending.
    #[error("line longer than {limit} bytes")]
    TooLong {
        /// The limit that was passed.
        limit: usize,
    },
}

/// Per-connection framing state.
#[derive(Debug, Clone)]
pub struct LineFramer {
    /// Longest line accepted, in bytes, without its line ending.
    max_line: usize,
    /// Whether this connection has ever sent a `\n` (then idle pauses no longer end lines).
    line_mode: bool,
    /// How much of the buffer is already known to hold no `\n`, so each byte is scanned once.
    scanned: usize,
}

impl LineFramer {
    /// A framer for a new connection, accepting lines of at most `max_line` bytes.
    pub fn new(max_line: usize) -> Self {
        Self {
            max_line,
            line_mode: false,
            scanned: 0,
        }
    }

    /// A framer that is line-framed from the start: only a newline ends a line (file
    /// headers, which always carry one, and the server's lines as a client reads them).
    pub fn line_framed(max_line: usize) -> Self {
        Self {
            max_line,
            line_mode: true,
            scanned: 0,
        }
    }

    /// Whether the connection has switched to strict newline framing.
    pub fn is_line_mode(&self) -> bool {
        self.line_mode
    }

    /// Takes the next complete line out of `buf`: `Ok(None)` means more bytes are needed.
    pub fn next_line(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, FrameError> {
        let from = self.scanned.min(buf.len());
        match buf[from..].iter().position(|&b| b == b'\n') {
            Some(offset) => {
                let end = from + offset;
                self.line_mode = true;
                self.scanned = 0;
                let mut line = buf.split_to(end + 1);
                line.truncate(end);
                if line.last() == Some(&b'\r') {
                    line.truncate(end - 1);
                }
                if line.len() > self.max_line {
                    return Err(FrameError::TooLong {
                        limit: self.max_line,
                    });
                }
                Ok(Some(line.freeze()))
            }
            None => {
                self.scanned = buf.len();
                if buf.len() > self.max_line {
                    return Err(FrameError::TooLong {
                        limit: self.max_line,
                    });
                }
                Ok(None)
            }
        }
    }

    /// Forgets how much of the buffer was scanned: for a caller that put bytes back at its
    /// front.
    pub fn rescan(&mut self) {
        self.scanned = 0;
    }

    /// Whether bytes are waiting that an idle pause would turn into a line.
    pub fn wants_idle_flush(&self, buf: &BytesMut) -> bool {
        !self.line_mode && !buf.is_empty()
    }

    /// Called when the buffered bytes have sat for the idle pause: on a pause-framed
    /// connection they form one line (without a trailing `\r`); otherwise nothing happens.
    pub fn take_idle_line(&mut self, buf: &mut BytesMut) -> Option<Bytes> {
        if !self.wants_idle_flush(buf) {
            return None;
        }
        self.scanned = 0;
        let mut line = buf.split();
        if line.last() == Some(&b'\r') {
            line.truncate(line.len() - 1);
        }
        Some(line.freeze())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(framer: &mut LineFramer, buf: &mut BytesMut) -> Vec<Bytes> {
        let mut out = Vec::new();
        while let Some(line) = framer.next_line(buf).expect("frames") {
            out.push(line);
        }
        out
    }

    #[test]
    fn many_lines_in_one_read_stay_separate() {
        let mut f = LineFramer::new(100);
        let mut buf = BytesMut::from(&b"alice\nmsg bob hi\r\nlist\n"[..]);
        assert_eq!(lines(&mut f, &mut buf), vec!["alice", "msg bob hi", "list"]);
        assert!(buf.is_empty());
        assert!(f.is_line_mode());
    }

    #[test]
    fn a_line_split_across_reads_is_one_line() {
        let mut f = LineFramer::new(100);
        let mut buf = BytesMut::from(&b"msg bo"[..]);
        assert!(lines(&mut f, &mut buf).is_empty());
        buf.extend_from_slice(b"b hi\nli");
        assert_eq!(lines(&mut f, &mut buf), vec!["msg bob hi"]);
        assert_eq!(&buf[..], b"li");
    }

    #[test]
    fn pause_framed_until_the_first_newline() {
        let mut f = LineFramer::new(100);
        let mut buf = BytesMut::from(&b"alice"[..]);
        assert!(lines(&mut f, &mut buf).is_empty());
        assert!(f.wants_idle_flush(&buf));
        assert_eq!(f.take_idle_line(&mut buf).as_deref(), Some(&b"alice"[..]));
        assert!(buf.is_empty());
        assert!(!f.wants_idle_flush(&buf));
        buf.extend_from_slice(b"list");
        assert_eq!(f.take_idle_line(&mut buf).as_deref(), Some(&b"list"[..]));
    }

    #[test]
    fn idle_pause_drops_a_trailing_carriage_return() {
        let mut f = LineFramer::new(100);
        let mut buf = BytesMut::from(&b"alice\r"[..]);
        assert_eq!(f.take_idle_line(&mut buf).as_deref(), Some(&b"alice"[..]));
    }

    #[test]
    fn line_framed_after_a_newline_ignores_pauses() {
        let mut f = LineFramer::new(100);
        let mut buf = BytesMut::from(&b"alice\nmsg bob half"[..]);
        assert_eq!(lines(&mut f, &mut buf), vec!["alice"]);
        assert!(!f.wants_idle_flush(&buf));
        assert_eq!(f.take_idle_line(&mut buf), None);
        buf.extend_from_slice(b" done\n");
        assert_eq!(lines(&mut f, &mut buf), vec!["msg bob half done"]);
    }

    #[test]
    fn a_line_framed_framer_never_takes_idle_lines() {
        let mut f = LineFramer::line_framed(100);
        let mut buf = BytesMut::from(&b"partial"[..]);
        assert!(!f.wants_idle_flush(&buf));
        assert_eq!(f.take_idle_line(&mut buf), None);
        assert_eq!(&buf[..], b"partial");
    }

    #[test]
    fn empty_lines_are_lines() {
        let mut f = LineFramer::new(100);
        let mut buf = BytesMut::from(&b"\n\r\nx\n"[..]);
        assert_eq!(lines(&mut f, &mut buf), vec!["", "", "x"]);
    }

    #[test]
    fn an_overlong_line_is_an_error_before_its_newline_arrives() {
        let mut f = LineFramer::new(4);
        let mut buf = BytesMut::from(&b"abcde"[..]);
        assert_eq!(f.next_line(&mut buf), Err(FrameError::TooLong { limit: 4 }));
        let mut f = LineFramer::new(4);
        let mut buf = BytesMut::from(&b"abcdef\n"[..]);
        assert_eq!(f.next_line(&mut buf), Err(FrameError::TooLong { limit: 4 }));
        let mut f = LineFramer::new(4);
        let mut buf = BytesMut::from(&b"abcd\r\n"[..]);
        assert_eq!(
            f.next_line(&mut buf).expect("fits").as_deref(),
            Some(&b"abcd"[..])
        );
    }

    #[test]
    fn each_byte_is_scanned_once_across_reads() {
        let mut f = LineFramer::new(1000);
        let mut buf = BytesMut::new();
        for _ in 0..10 {
            buf.extend_from_slice(b"0123456789");
            assert!(f.next_line(&mut buf).expect("fits").is_none());
            assert_eq!(f.scanned, buf.len());
        }
        buf.extend_from_slice(b"\n");
        assert_eq!(
            f.next_line(&mut buf).expect("fits").map(|l| l.len()),
            Some(100)
        );
    }
}
