//! Forwards: each file connection has one forwarder task that owns its write half and
//! runs the forwards queued for it one at a time, in the order their uploads began, each
//! streaming its upload's spool file as it grows (cut-through).
//!
//! A forward whose upload broke off before it started is dropped; any failure once its
//! header is out closes the connection, since the header promised bytes that will not
//! come. Whatever cannot be delivered is told to its uploader: nothing is lost silently.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::super::metrics::Metrics;
use super::super::Shared;
use crate::compress::Deflate;
use crate::flow::Refusal;
use crate::net::{write_chunks, write_with_progress, ConnWrite};
use crate::protocol::file_header::Trailer;
use crate::protocol::file_header::GROUP_PREFIX;
use crate::protocol::{ForwardHeader, ServerLine};
use crate::store::FileRecord;
use crate::transfer::{Follower, Recent, BODY_CHUNK};

/// Forwards that may wait on one file connection; more are refused with an error line.
pub(crate) const MAX_QUEUED_FORWARDS: usize = 64;

/// How far an upload has got, as its forwards see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Progress {
    /// This many bytes arrived (in memory or on disk: see [`Source`]), more to come.
    Receiving(u64),
    /// All bytes arrived, not yet checked.
    Done(u64),
    /// All bytes arrived and the file is good: its BLAKE3 hash (checked against the
    /// uploader's, when it sent one).
    Verified(u64, blake3::Hash),
    /// All bytes arrived but the file is not good (why): checked forwards end with a
    /// `failed` trailer instead of the hash.
    Rejected(u64, Arc<str>),
    /// The upload broke off; forwards must abort.
    Aborted,
}

impl Progress {
    /// The bytes that arrived so far, unless the upload broke off.
    fn arrived(&self) -> Option<u64> {
        match self {
            Progress::Receiving(n)
            | Progress::Done(n)
            | Progress::Verified(n, _)
            | Progress::Rejected(n, _) => Some(*n),
            Progress::Aborted => None,
        }
    }
}

/// A file connection's outgoing side, as the registry holds it: the queue of its
/// forwarder and the connection's kill switch.
pub(crate) struct FileLink {
    /// Forwards waiting for this connection.
    pub(crate) jobs: mpsc::Sender<Box<ForwardJob>>,
    /// Closes the file connection (chat disconnect, an aborted forward, shutdown).
    pub(crate) kill: CancellationToken,
}

/// A forward queued on a recipient's file connection.
pub(crate) struct ForwardJob {
    /// The chat notice sent to the recipient when the forward starts (none for a resumed
    /// forward: the recipient had it the first time).
    pub(crate) notice: Option<ServerLine>,
    /// The first byte of the file this forward sends (past 0: a resumed download).
    pub(crate) from: u64,
    /// The recipient is our client: a BLAKE3 trailer follows the body.
    pub(crate) checked: bool,
    /// The body goes compressed (zstd; only when `checked`).
    pub(crate) compressed: bool,
    /// The upload's id, which a checked recipient names to resume it (when it can be).
    pub(crate) id: Option<u64>,
    /// Where the body's bytes are read.
    pub(crate) src: Source,
    /// Where it is in the upload it follows, if that is still arriving.
    pub(crate) follower: Option<Follower>,
    /// The upload's progress, which the forward follows.
    pub(crate) progress: watch::Receiver<Progress>,
    /// Body size.
    pub(crate) size: u64,
    /// The uploader (told if the forward fails).
    pub(crate) sender: String,
    /// The file's name as sent.
    pub(crate) filename: String,
    /// A file that waited for its recipient: its index id, forgotten once it is sent.
    pub(crate) queued: Option<u64>,
}

impl ForwardJob {
    /// A forward of a file the server has saved (a file that waited for its recipient, or
    /// one asked for again with `get`).
    pub(crate) fn saved(
        shared: &Shared,
        recipient: &str,
        file: &FileRecord,
        queued: bool,
        Part { from, compressed }: Part,
    ) -> std::io::Result<ForwardJob> {
        let src = std::fs::File::open(shared.config.data_dir.join(&file.saved_as))?;
        let hash = blake3::Hash::from_hex(&file.blake3)
            .map_err(|e| std::io::Error::other(format!("the index's hash is not valid: {e}")))?;
        let (_done, progress) = watch::channel(Progress::Verified(file.size, hash));
        let checked = speaks_extensions(shared, recipient);
        let notice = match file.target.strip_prefix(GROUP_PREFIX) {
            Some(group) => ServerLine::FileToGroup {
                from: file.sender.clone(),
                filename: file.filename.clone(),
                group: group.into(),
            },
            None => ServerLine::FileIncoming {
                from: file.sender.clone(),
                filename: file.filename.clone(),
                size: file.size,
            },
        };
        Ok(ForwardJob {
            notice: (from == 0).then_some(notice),
            from,
            checked,
            compressed,
            // Resumable with the upload's id, when this server run received it (the index
            // counts its own ids).
            id: shared.resumes.upload_of(file.id),
            src: Source::file(src),
            follower: None,
            progress,
            size: file.size,
            sender: file.sender.clone(),
            filename: file.filename.clone(),
            queued: queued.then_some(file.id),
        })
    }

    fn aborted(&self) -> bool {
        *self.progress.borrow() == Progress::Aborted
    }

    /// The forward's header: the lab's, or checked (for our client: compressed or not,
    /// with the upload's id when it can be resumed, from byte `from`).
    fn header(&self) -> ForwardHeader {
        ForwardHeader {
            sender: self.sender.clone(),
            filename: self.filename.clone(),
            size: self.size,
            checked: self.checked,
            compressed: self.compressed && self.checked,
            id: self.id.filter(|_| self.checked),
            at: self.from,
        }
    }
}

/// Where a forward reads its upload's bytes: from memory while it keeps up with an upload
/// still arriving, else from the spool file (or the saved copy) with one read handle
/// shared by every forward of it. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Source {
    file: Arc<std::fs::File>,
    recent: Option<Arc<Recent>>,
}

impl Source {
    /// A file on disk, whole or growing.
    pub(crate) fn file(file: std::fs::File) -> Self {
        Self {
            file: Arc::new(file),
            recent: None,
        }
    }

    /// A spool file that is being written, with its newest bytes in memory.
    pub(crate) fn following(file: std::fs::File, recent: Arc<Recent>) -> Self {
        Self {
            file: Arc::new(file),
            recent: Some(recent),
        }
    }

    /// For one forward from byte `at`: where it takes the bytes still in memory, if the
    /// upload is still arriving (see [`Follower`]). Taken when the forward is queued, so
    /// that the bytes it needs wait for it from the start.
    pub(crate) fn follower(&self, at: u64) -> Option<Follower> {
        self.recent.as_ref().map(|r| r.follower(at))
    }

    /// Up to `max` bytes from offset `at`, which must be below the bytes written so far,
    /// read from the file into `buf` (allocated on first use); returns how many.
    async fn read_file(&self, at: u64, max: usize, buf: &mut Vec<u8>) -> Result<usize, String> {
        use std::os::unix::fs::FileExt;
        let mut owned = std::mem::take(buf);
        owned.resize(BODY_CHUNK, 0);
        let file = self.file.clone();
        let want = max.min(BODY_CHUNK);
        let (read, back) = tokio::task::spawn_blocking(move || {
            let read = file.read_at(&mut owned[..want], at);
            (read, owned)
        })
        .await
        .map_err(|e| e.to_string())?;
        *buf = back;
        match read.map_err(|e| e.to_string())? {
            0 => Err("the spool file ended early".into()),
            n => Ok(n),
        }
    }
}

/// Whether `user`'s client speaks the extensions (it said hello): then its forwards are
/// checked (a BLAKE3 trailer follows each body).
pub(crate) fn speaks_extensions(shared: &Shared, user: &str) -> bool {
    shared
        .registry
        .outbox(user)
        .is_some_and(|outbox| outbox.extended())
}

/// Tells `user` on their chat connection, if they have one, that something failed.
pub(super) fn tell(shared: &Shared, user: &str, refusal: Refusal) {
    if let Some(outbox) = shared.registry.outbox(user) {
        outbox.line(&ServerLine::Error {
            reason: refusal.to_string(),
        });
    }
}

/// Gives the uploader's client its upload's verdict, if it speaks the extensions: exactly
/// one `[UPLOAD OK]` or `[UPLOAD FAILED]` per upload header, in order.
pub(super) fn verdict(shared: &Shared, user: &str, line: ServerLine) {
    if let Some(outbox) = shared.registry.outbox(user) {
        if outbox.extended() {
            outbox.line(&line);
        }
    }
}

/// An upload header that ends in a refusal: the uploader's `ERROR:` line and, for a client
/// that speaks the extensions, the `[UPLOAD FAILED]` verdict with the same reason.
pub(super) fn fail_upload(shared: &Shared, user: &str, refusal: Refusal) {
    let Some(outbox) = shared.registry.outbox(user) else {
        return;
    };
    let reason = refusal.to_string();
    outbox.line(&ServerLine::Error {
        reason: reason.clone(),
    });
    if outbox.extended() {
        outbox.line(&ServerLine::UploadFailed { reason });
    }
}

fn not_delivered(job: &ForwardJob, recipient: &str, why: String) -> Refusal {
    Refusal::NotDelivered {
        filename: job.filename.clone(),
        recipient: recipient.to_owned(),
        why,
    }
}

/// The forwarder of one file connection (see the module docs). `ready_at` keeps the first
/// header out of the greeting's read (the lab's client reads the greeting with one
/// `recv` and must not find a header glued to it).
pub(super) async fn forward_all(
    shared: Arc<Shared>,
    recipient: String,
    mut wr: ConnWrite,
    mut queue: mpsc::Receiver<Box<ForwardJob>>,
    kill: CancellationToken,
    ready_at: Instant,
) {
    let stall = shared.config.limits.send_timeout;
    loop {
        let mut job = tokio::select! {
            _ = kill.cancelled() => break,
            job = queue.recv() => match job {
                Some(job) => job,
                None => break,
            },
        };
        tokio::select! {
            _ = kill.cancelled() => break,
            _ = tokio::time::sleep_until(ready_at) => {}
        }
        if job.aborted() {
            continue;
        }
        if let Some(notice) = &job.notice {
            if let Some(outbox) = shared.registry.outbox(&recipient) {
                outbox.line(notice);
            }
            shared
                .registry
                .expect_ack(&recipient, &job.sender, &job.filename);
        }
        let mut progress = job.progress.clone();
        let follower = job.follower.take();
        let sent = tokio::select! {
            _ = kill.cancelled() => Err("file connection closed".to_owned()),
            sent = stream(&mut wr, &job, follower, &mut progress, (stall, &shared.metrics)) => sent,
        };
        if let Err(why) = sent {
            warn!("[FILE FORWARD ERROR] {recipient} -> {why}");
            if !job.aborted() {
                tell(&shared, &job.sender, not_delivered(&job, &recipient, why));
            }
            kill.cancel();
            break;
        }
        if let Some(id) = job.queued {
            if let Err(e) = shared.store.drop_queued_file(&recipient, id).await {
                warn!("[STORE] cannot note file #{id} as delivered to {recipient}: {e}");
            }
        }
    }
    // Forwards still waiting will never run: their senders hear it.
    queue.close();
    while let Ok(job) = queue.try_recv() {
        if !job.aborted() {
            let why = "their file connection closed".to_owned();
            tell(&shared, &job.sender, not_delivered(&job, &recipient, why));
        }
    }
}

/// Queues the forward of a saved file on `recipient`'s file connection.
pub(crate) fn forward_saved(
    shared: &Shared,
    recipient: &str,
    file: &FileRecord,
    queued: bool,
) -> Result<(), Refusal> {
    queue_saved(shared, recipient, file, queued, Part::default())
}

/// Which part of a saved file a forward sends, and how.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Part {
    /// From this byte (past 0: a resumed download).
    pub(crate) from: u64,
    /// Compressed, for our client (a resumed download goes as the first attempt went).
    pub(crate) compressed: bool,
}

/// Queues the forward of `part` of a saved file on `recipient`'s file connection.
pub(crate) fn queue_saved(
    shared: &Shared,
    recipient: &str,
    file: &FileRecord,
    queued: bool,
    part: Part,
) -> Result<(), Refusal> {
    let link = shared
        .registry
        .file_link(recipient)
        .ok_or(Refusal::NoFileConnection)?;
    let job = ForwardJob::saved(shared, recipient, file, queued, part).map_err(|e| {
        warn!("[FILE FORWARD ERROR] cannot open {}: {e}", file.saved_as);
        Refusal::NotDelivered {
            filename: file.filename.clone(),
            recipient: recipient.into(),
            why: format!("the server's copy cannot be read ({e})"),
        }
    })?;
    link.jobs.try_send(Box::new(job)).map_err(|e| match e {
        mpsc::error::TrySendError::Full(_) => Refusal::TooManyWaiting {
            recipient: recipient.into(),
            saved_as: file.saved_as.clone(),
        },
        mpsc::error::TrySendError::Closed(_) => Refusal::NoFileConnection,
    })
}

/// Waits until more than `sent` bytes arrived; returns how many.
async fn wait_for_bytes(
    progress: &mut watch::Receiver<Progress>,
    sent: u64,
) -> Result<u64, String> {
    loop {
        let now = progress.borrow_and_update().clone();
        match now.arrived() {
            Some(n) if n > sent => return Ok(n),
            None => return Err("the upload broke off".into()),
            Some(_) if !matches!(now, Progress::Receiving(_)) => {
                return Err("the spool file is shorter than announced".into())
            }
            Some(_) => {}
        }
        if progress.changed().await.is_err() {
            return Err("the upload ended".into());
        }
    }
}

/// Waits for the upload's verdict on its bytes: the trailer a checked forward ends with.
async fn wait_for_trailer(progress: &mut watch::Receiver<Progress>) -> Result<Trailer, String> {
    loop {
        match progress.borrow_and_update().clone() {
            Progress::Verified(_, hash) => return Ok(Trailer::Hash(hash.to_hex().to_string())),
            Progress::Rejected(_, why) => return Ok(Trailer::Failed(why.to_string())),
            Progress::Aborted => return Err("the upload broke off".into()),
            Progress::Receiving(_) | Progress::Done(_) => {}
        }
        if progress.changed().await.is_err() {
            return Err("the upload ended".into());
        }
    }
}

/// Writes one forward: its header, then its body as the spool file grows.
async fn stream(
    wr: &mut ConnWrite,
    job: &ForwardJob,
    mut follower: Option<Follower>,
    progress: &mut watch::Receiver<Progress>,
    (stall, metrics): (Duration, &Metrics),
) -> Result<(), String> {
    let sent_err = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::TimedOut => format!("the recipient read nothing for {stall:?}"),
        _ => e.to_string(),
    };
    let header = job.header();
    write_with_progress(wr, header.to_wire().as_bytes(), stall, || ())
        .await
        .map_err(sent_err)?;
    // Bytes still in memory go out as they are (several chunks per write); others are
    // read back from the file into `buf`. Compressed, both go through the encoder into
    // `packed`.
    let mut chunks = Vec::new();
    let mut buf = Vec::new();
    let mut deflate = match job.compressed && job.checked {
        true => Some((Deflate::new().map_err(|e| e.to_string())?, Vec::new())),
        false => None,
    };
    let mut sent = job.from;
    while sent < job.size {
        let available = wait_for_bytes(progress, sent).await?;
        let want = usize::try_from(available - sent)
            .unwrap_or(usize::MAX)
            .min(4 * BODY_CHUNK);
        let in_memory = follower
            .as_mut()
            .map_or(0, |f| f.get(sent, want, &mut chunks));
        let n = match (in_memory, deflate.as_mut()) {
            (0, None) => {
                let n = job.src.read_file(sent, want, &mut buf).await?;
                write_with_progress(wr, &buf[..n], stall, || ())
                    .await
                    .map(|()| n)
            }
            (n, None) => write_chunks(wr, &chunks, stall).await.map(|()| n),
            (n, Some((deflate, packed))) => {
                packed.clear();
                let n = match n {
                    0 => {
                        let n = job.src.read_file(sent, want, &mut buf).await?;
                        deflate.push(&buf[..n], packed).map(|()| n)
                    }
                    n => chunks
                        .iter()
                        .try_for_each(|c| deflate.push(c, packed))
                        .map(|()| n),
                }
                .map_err(|e| e.to_string())?;
                // Caught up with the upload: what is encoded goes now, not when a block
                // fills (a slow upload would otherwise starve its recipient).
                if sent + (n as u64) >= available && sent + (n as u64) < job.size {
                    deflate.flush(packed).map_err(|e| e.to_string())?;
                }
                write_with_progress(wr, packed, stall, || ())
                    .await
                    .map(|()| n)
            }
        }
        .map_err(sent_err)?;
        sent += n as u64;
        metrics.file_bytes(false, n as u64);
    }
    if let Some((mut deflate, mut packed)) = deflate {
        packed.clear();
        deflate.finish(&mut packed).map_err(|e| e.to_string())?;
        write_with_progress(wr, &packed, stall, || ())
            .await
            .map_err(sent_err)?;
    }
    if job.checked {
        let trailer = wait_for_trailer(progress).await?;
        write_with_progress(wr, trailer.to_wire().as_bytes(), stall, || ())
            .await
            .map_err(sent_err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_forward_follows_the_upload_and_stops_when_it_breaks_off() {
        let (tx, mut rx) = watch::channel(Progress::Receiving(0));
        let waiter = tokio::spawn(async move { wait_for_bytes(&mut rx, 0).await });
        tx.send(Progress::Receiving(10)).expect("sent");
        assert_eq!(waiter.await.expect("task"), Ok(10));

        let mut rx = tx.subscribe();
        tx.send(Progress::Done(10)).expect("sent");
        assert_eq!(wait_for_bytes(&mut rx, 4).await, Ok(10));
        assert!(
            wait_for_bytes(&mut rx, 10).await.is_err(),
            "nothing more comes"
        );

        let mut rx = tx.subscribe();
        tx.send(Progress::Aborted).expect("sent");
        assert_eq!(
            wait_for_bytes(&mut rx, 0).await,
            Err("the upload broke off".to_owned())
        );
    }
}
