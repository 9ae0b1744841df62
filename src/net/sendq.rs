//! A connection's outgoing side: the bounded send queue that any task fills without
//! waiting, and the one writer task that drains it into the socket.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// Slots an emptied send queue may keep (a few are reused by every message; a burst's
/// worth is given back).
const KEEP_LINES: usize = 8;
/// Largest batch the writer hands to one `write` call.
const WRITE_BATCH: usize = 64 * 1024;

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

    /// Takes every queued line at once, without waiting (for tests that read a queue).
    #[cfg(test)]
    pub(crate) fn drain_now(&self) -> Vec<Bytes> {
        let mut st = self.state();
        st.bytes = 0;
        st.lines.drain(..).collect()
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
