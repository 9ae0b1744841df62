//! The file port: the username handshake, upload headers, uploads streamed to a spool file
//! in the data directory, and cut-through forwards to every recipient.
//!
//! An upload writes each chunk to its spool file and then publishes how many bytes are on
//! disk (a `watch` channel). Each recipient has its own forward task that reads the spool
//! file through its own handle up to that mark, so recipients receive while the upload is
//! still arriving, in parallel, each at its own pace, and no file is ever held in memory.
//! A forward holds its recipient's file-connection writer from header to last byte, so two
//! transfers to one recipient never interleave. If the upload breaks off, forwards that have
//! not started are dropped and those under way close the recipient's file connection (its
//! client discards the partial `.tmp`): nobody keeps a partial file under its final name.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::registry::{FileLink, FileRefusal};
use super::{read_username, Shared};
use crate::net::{write_with_progress, LineReader, ReadEnd};
use crate::protocol::file_header::{ForwardHeader, Target, UploadHeader};
use crate::protocol::names::{saved_name, MAX_FILENAME_BYTES, TMP_SUFFIX};
use crate::protocol::{ServerLine, FILE_SOCKET_CONNECTED};

/// Bytes moved per read or write on the file path.
const BODY_CHUNK: usize = 256 * 1024;
/// Spool files are `<data_dir>/.relaychat-upload-<id>.part` until complete.
const SPOOL_PREFIX: &str = ".relaychat-upload-";
/// How long a file handshake waits for the chat session of the same name to appear.
const CHAT_SESSION_WAIT: Duration = Duration::from_secs(2);
/// After a header whose body length is unknown, input is discarded until this much quiet.
const RESYNC_QUIET: Duration = Duration::from_millis(200);
/// Forwards that may wait on one file connection; more are refused with an error line.
const MAX_QUEUED_FORWARDS: usize = 64;
/// Gap between the greeting and a first forward (the lab's client reads the greeting with
/// one `recv` and must not find a header glued to it).
const GREETING_GAP: Duration = Duration::from_millis(100);

/// How far an upload has got, as its forwards see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Progress {
    /// This many bytes are on disk, more to come.
    Receiving(u64),
    /// All bytes are on disk.
    Done(u64),
    /// The upload broke off; forwards must abort.
    Aborted,
}

pub(super) async fn serve(shared: Arc<Shared>, stream: TcpStream, addr: SocketAddr) {
    let (rd, wr) = stream.into_split();
    let kill = shared.shutdown.child_token();
    let cfg = &shared.config;
    let mut reader = LineReader::new(rd, cfg.max_header, cfg.idle_pause);
    let id = shared.next_id();

    let user = match read_username(&shared, &mut reader, &kill).await {
        Ok(user) => user,
        Err(Some(reason)) => return refuse(wr, addr, reason).await,
        Err(None) => return,
    };
    // The lab's client sends both usernames at once: give the chat handshake time to win.
    let chat_id = match await_chat_session(&shared, &user, addr, &kill).await {
        Ok(chat_id) => chat_id,
        Err(reason) => return refuse(wr, addr, reason).await,
    };
    // Claim the slot, then greet in a write of its own: the greeting (or the refusal) is
    // the first thing written, and forwards only start once the forwarder owns the writer.
    let (jobs, queue) = mpsc::channel(MAX_QUEUED_FORWARDS);
    let link = Arc::new(FileLink {
        jobs,
        kill: kill.clone(),
    });
    let mut wr = wr;
    if let Err(refusal) = shared.registry.add_file(&user, chat_id, id, link) {
        let reason = match refusal {
            FileRefusal::Taken => format!("'{user}' already has a file connection"),
            FileRefusal::NoSession => no_session(&user),
        };
        return refuse(wr, addr, reason).await;
    }
    if wr.write_all(FILE_SOCKET_CONNECTED).await.is_err() {
        shared.registry.remove_file(&user, id);
        return;
    }
    let ready_at = Instant::now() + GREETING_GAP;
    let forwarder = forward_all(
        shared.clone(),
        user.clone(),
        wr,
        queue,
        kill.clone(),
        ready_at,
    );
    shared.tasks.spawn(forwarder);
    info!("[FILE SOCKET] {user} connected for files from {addr}");
    reader.require_newlines(cfg.max_header);

    loop {
        let line = match reader.next_line(&kill).await {
            Ok(line) => line,
            Err(ReadEnd::Frame(e)) => {
                warn!("[FILE ERROR] {addr}: {e}");
                tell(&shared, &user, format!("invalid file header: {e}"));
                break;
            }
            Err(_) => break,
        };
        if line.is_empty() {
            continue;
        }
        let alive = match UploadHeader::parse(&line) {
            // Boxed: an upload's state lives on the heap only while an upload runs, so an
            // idle file connection stays small.
            Ok(header) => Box::pin(upload(&shared, &user, header, &mut reader, &kill)).await,
            Err(e) => {
                let shown: String = String::from_utf8_lossy(&line).chars().take(200).collect();
                warn!("[FILE ERROR] Invalid header from {addr}: {shown:?}: {e}");
                tell(&shared, &user, e.to_string());
                match UploadHeader::declared_size(&line) {
                    Some(size) => skip_body(&shared, &mut reader, size, &kill).await,
                    None => {
                        let limit = shared.config.transfer_timeout;
                        reader.discard_until_quiet(RESYNC_QUIET, limit, &kill).await
                    }
                }
            }
        };
        if !alive {
            break;
        }
        reader.shrink();
    }
    shared.registry.remove_file(&user, id);
    kill.cancel();
    info!("[FILE SOCKET CLOSED] {addr}");
}

/// Waits (briefly) for `user`'s chat session and returns its id. A file connection belongs
/// to a live chat session from the same address, or to nobody.
async fn await_chat_session(
    shared: &Shared,
    user: &str,
    addr: SocketAddr,
    kill: &CancellationToken,
) -> Result<u64, String> {
    let deadline = Instant::now() + CHAT_SESSION_WAIT;
    loop {
        let joined = shared.registry.chat_joined.notified();
        tokio::pin!(joined);
        joined.as_mut().enable();
        if let Some((chat_id, ip)) = shared.registry.chat_session(user) {
            return match ip == addr.ip() {
                true => Ok(chat_id),
                false => Err(format!("'{user}' is connected from another address")),
            };
        }
        tokio::select! {
            _ = joined => {}
            _ = tokio::time::sleep_until(deadline) => {
                return Err(no_session(user));
            }
            _ = kill.cancelled() => return Err("the server is shutting down".into()),
        }
    }
}

fn no_session(user: &str) -> String {
    format!("'{user}' has no chat session; log in on the chat port first")
}

/// Refuses a file connection with an error line and closes it.
async fn refuse(mut wr: OwnedWriteHalf, addr: SocketAddr, reason: String) {
    warn!("[REFUSED] {addr}: {reason}");
    let _ = wr
        .write_all(ServerLine::Error { reason }.to_wire().as_bytes())
        .await;
}

/// Tells `user` on their chat connection, if they have one, that something failed.
fn tell(shared: &Shared, user: &str, reason: String) {
    if let Some(outbox) = shared.registry.outbox(user) {
        outbox.line(&ServerLine::Error { reason });
    }
}

/// Reads and drops `n` body bytes of a refused upload, so the connection stays in step;
/// false if it ended (or stalled for the transfer timeout) first.
async fn skip_body(
    shared: &Shared,
    reader: &mut LineReader,
    n: u64,
    kill: &CancellationToken,
) -> bool {
    reader
        .skip(n, BODY_CHUNK, kill, shared.config.transfer_timeout)
        .await
}

/// Deletes spool files left by a server that was killed mid-upload.
pub(super) fn remove_stale_spools(data_dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(data_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(SPOOL_PREFIX) && name.ends_with(".part") {
            match std::fs::remove_file(entry.path()) {
                Ok(()) => info!("[CLEANUP] removed stale spool file {name}"),
                Err(e) => warn!("[CLEANUP] cannot remove {name}: {e}"),
            }
        }
    }
}

fn clamp(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX).min(BODY_CHUNK)
}

/// One recipient's share of an upload, as planned when its header arrives.
struct Forward {
    recipient: String,
    link: Arc<FileLink>,
    /// The chat notice sent when the forward starts.
    notice: ServerLine,
}

/// A forward queued on a recipient's file connection; its forwarder runs them in order.
pub(crate) struct ForwardJob {
    notice: ServerLine,
    /// The forward header (`sender|filename|size\n`).
    header: Bytes,
    /// The upload's spool file, opened for this forward.
    src: Arc<std::fs::File>,
    progress: watch::Receiver<Progress>,
    size: u64,
    sender: String,
    filename: String,
}

/// Who gets an upload, and what its sender is told once it is saved.
fn plan(
    shared: &Shared,
    user: &str,
    target: &Target,
    filename: &str,
    size: u64,
    saved: &str,
) -> (Vec<Forward>, Vec<ServerLine>) {
    let registry = &shared.registry;
    let no_socket = |who: &str| ServerLine::NoFileSocket {
        user: who.into(),
        saved_as: saved.into(),
    };
    let forward = |recipient: &str, link, notice| Forward {
        recipient: recipient.into(),
        link,
        notice,
    };
    let (mut forwards, mut after) = (Vec::new(), Vec::new());
    match target {
        Target::User(to) if to == user => after.push(ServerLine::FileSelf {
            filename: filename.into(),
            saved_as: saved.into(),
        }),
        Target::User(to) => match registry.file_link(to) {
            Some(link) => {
                let notice = ServerLine::FileIncoming {
                    from: user.into(),
                    filename: filename.into(),
                    size,
                };
                forwards.push(forward(to, link, notice));
            }
            None => after.push(no_socket(to)),
        },
        Target::Group(group) => match registry.members_except(group, user) {
            None => after.push(ServerLine::NotInGroup {
                group: group.clone(),
            }),
            Some(members) => {
                for member in members {
                    match registry.file_link(&member) {
                        Some(link) => {
                            let notice = ServerLine::FileToGroup {
                                from: user.into(),
                                filename: filename.into(),
                                group: group.clone(),
                            };
                            forwards.push(forward(&member, link, notice));
                        }
                        None => after.push(no_socket(&member)),
                    }
                }
            }
        },
    }
    (forwards, after)
}

/// Receives one upload whose header is `header`; false if the connection is gone.
async fn upload(
    shared: &Arc<Shared>,
    user: &str,
    header: UploadHeader,
    reader: &mut LineReader,
    kill: &CancellationToken,
) -> bool {
    let UploadHeader {
        sender,
        target,
        filename,
        size,
    } = header;
    if sender != user {
        warn!("[FILE] {user} signed an upload as '{sender}'; it is sent as from {user}");
    }
    let saved = saved_name(user, &filename);
    if saved.len() + TMP_SUFFIX.len() > MAX_FILENAME_BYTES {
        tell(
            shared,
            user,
            format!("file name too long to save as {saved}"),
        );
        warn!("[FILE ERROR] {user}: file name too long to save as {saved}");
        return skip_body(shared, reader, size, kill).await;
    }
    if size > shared.config.max_file_size {
        let limit = shared.config.max_file_size;
        warn!("[FILE ERROR] {user}: '{filename}' is {size} bytes, over the {limit}-byte limit");
        tell(
            shared,
            user,
            format!("file too large: {size} bytes (limit {limit})"),
        );
        return skip_body(shared, reader, size, kill).await;
    }
    let reservation = match shared.disk.reserve(user, size) {
        Ok(reservation) => reservation,
        Err(reason) => {
            warn!("[FILE ERROR] {user}: '{filename}' refused: {reason}");
            tell(shared, user, reason);
            return skip_body(shared, reader, size, kill).await;
        }
    };
    let data_dir = &shared.config.data_dir;
    let final_path = data_dir.join(&saved);
    let spool_path = data_dir.join(format!("{SPOOL_PREFIX}{}.part", shared.next_id()));
    let spool = match std::fs::File::create(&spool_path) {
        Ok(file) => file,
        Err(e) => {
            warn!("[FILE ERROR] cannot create {}: {e}", spool_path.display());
            tell(
                shared,
                user,
                format!("could not save file '{filename}': {e}"),
            );
            return skip_body(shared, reader, size, kill).await;
        }
    };

    let (forwards, mut after) = plan(shared, user, &target, &filename, size, &saved);
    let (progress, watcher) = watch::channel(Progress::Receiving(0));
    let header = Bytes::from(
        ForwardHeader {
            sender: user.into(),
            filename: filename.clone(),
            size,
        }
        .to_wire(),
    );
    // One read handle for every forward of this upload (each reads at its own offset), so
    // queued forwards cost no descriptors.
    let src = match forwards.is_empty() {
        true => None,
        false => match std::fs::File::open(&spool_path) {
            Ok(file) => Some(Arc::new(file)),
            Err(e) => {
                warn!(
                    "[FILE FORWARD ERROR] cannot open {}: {e}",
                    spool_path.display()
                );
                None
            }
        },
    };
    for Forward {
        recipient,
        link,
        notice,
    } in forwards
    {
        let Some(src) = src.clone() else {
            break;
        };
        let job = ForwardJob {
            notice,
            header: header.clone(),
            src,
            progress: watcher.clone(),
            size,
            sender: user.into(),
            filename: filename.clone(),
        };
        match link.jobs.try_send(Box::new(job)) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                warn!("[FILE FORWARD ERROR] {recipient} -> {MAX_QUEUED_FORWARDS} files already waiting");
                let reason =
                    format!("{recipient} has too many files waiting; file saved as {saved}");
                after.push(ServerLine::Error { reason });
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                after.push(ServerLine::NoFileSocket {
                    user: recipient,
                    saved_as: saved.clone(),
                });
            }
        }
    }
    drop(watcher);

    let mut spool = tokio::fs::File::from_std(spool);
    let stall = shared.config.transfer_timeout;
    let outcome = receive_body(reader, &mut spool, size, kill, stall, &progress).await;
    drop(spool);
    match outcome {
        Ok(()) => {
            let _ = progress.send(Progress::Done(size));
            let replaced = std::fs::metadata(&final_path).map_or(0, |m| m.len());
            if let Err(e) = std::fs::rename(&spool_path, &final_path) {
                warn!("[FILE ERROR] cannot save {}: {e}", final_path.display());
                tell(
                    shared,
                    user,
                    format!("could not save file '{filename}': {e}"),
                );
                let _ = std::fs::remove_file(&spool_path);
                return true;
            }
            reservation.commit(replaced);
            info!("[FILE RECEIVED] {saved} from {user} (intended for {target})");
            if let Some(outbox) = shared.registry.outbox(user) {
                for line in &after {
                    outbox.line(line);
                }
            }
            true
        }
        Err(Broken::Disk(e, left)) => {
            let _ = progress.send(Progress::Aborted);
            let _ = std::fs::remove_file(&spool_path);
            warn!("[FILE ERROR] writing {}: {e}", spool_path.display());
            tell(
                shared,
                user,
                format!("could not save file '{filename}': {e}"),
            );
            skip_body(shared, reader, left, kill).await
        }
        Err(Broken::Connection(got)) => {
            let _ = progress.send(Progress::Aborted);
            let _ = std::fs::remove_file(&spool_path);
            warn!("[FILE ERROR] upload of '{filename}' from {user} broke off after {got} of {size} bytes");
            false
        }
    }
}

/// Why an upload's body did not arrive whole.
enum Broken {
    /// The spool file could not be written; this many body bytes are still to come.
    Disk(std::io::Error, u64),
    /// The connection ended (or the server is shutting down) after this many bytes.
    Connection(u64),
}

/// Streams `size` body bytes into the spool file, publishing progress after each chunk.
async fn receive_body(
    reader: &mut LineReader,
    spool: &mut tokio::fs::File,
    size: u64,
    kill: &CancellationToken,
    stall: Duration,
    progress: &watch::Sender<Progress>,
) -> Result<(), Broken> {
    let mut got = 0u64;
    while got < size {
        let chunk = tokio::select! {
            _ = kill.cancelled() => return Err(Broken::Connection(got)),
            chunk = tokio::time::timeout(stall, reader.read_raw(clamp(size - got), BODY_CHUNK)) => chunk,
        };
        let chunk = match chunk {
            Ok(Ok(bytes)) if !bytes.is_empty() => bytes,
            Ok(_) => return Err(Broken::Connection(got)),
            Err(_) => {
                warn!("[FILE ERROR] upload stalled: no byte for {stall:?}");
                return Err(Broken::Connection(got));
            }
        };
        got += chunk.len() as u64;
        let written = async {
            spool.write_all(&chunk).await?;
            spool.flush().await
        };
        if let Err(e) = written.await {
            return Err(Broken::Disk(e, size - got));
        }
        let _ = progress.send(Progress::Receiving(got));
    }
    Ok(())
}

/// The forwarder of one file connection: runs its queued forwards one at a time, in the
/// order their uploads began, each streaming its spool file as it grows. A forward whose
/// upload broke off before it started is dropped; any failure once its header is out closes
/// the connection, since the header promised bytes that will not come.
async fn forward_all(
    shared: Arc<Shared>,
    recipient: String,
    mut wr: OwnedWriteHalf,
    mut queue: mpsc::Receiver<Box<ForwardJob>>,
    kill: CancellationToken,
    ready_at: Instant,
) {
    let stall = shared.config.send_timeout;
    loop {
        let job = tokio::select! {
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
        if *job.progress.borrow() == Progress::Aborted {
            continue;
        }
        let ForwardJob {
            notice,
            header,
            src,
            mut progress,
            size,
            sender,
            filename,
        } = *job;
        if let Some(outbox) = shared.registry.outbox(&recipient) {
            outbox.line(&notice);
        }
        shared.registry.expect_ack(&recipient, &sender, &filename);
        let sent = tokio::select! {
            _ = kill.cancelled() => Err("file connection closed".to_owned()),
            sent = stream(&mut wr, &src, &header, &mut progress, size, stall) => sent,
        };
        if let Err(reason) = sent {
            warn!("[FILE FORWARD ERROR] {recipient} -> {reason}");
            if *progress.borrow() != Progress::Aborted {
                let why = format!("'{filename}' could not be delivered to {recipient}: {reason}");
                tell(&shared, &sender, why);
            }
            kill.cancel();
            break;
        }
    }
    // Forwards still waiting will never run: their senders hear it, nothing is lost silently.
    queue.close();
    while let Ok(job) = queue.try_recv() {
        if *job.progress.borrow() != Progress::Aborted {
            let why = format!(
                "'{}' could not be delivered to {recipient}: their file connection closed",
                job.filename
            );
            tell(&shared, &job.sender, why);
        }
    }
}

/// Waits until the spool holds more than `sent` bytes; returns how many it holds.
async fn wait_for_bytes(
    progress: &mut watch::Receiver<Progress>,
    sent: u64,
) -> Result<u64, String> {
    loop {
        match *progress.borrow_and_update() {
            Progress::Receiving(n) | Progress::Done(n) if n > sent => return Ok(n),
            Progress::Aborted => return Err("the upload broke off".into()),
            Progress::Done(_) => return Err("the spool file is shorter than announced".into()),
            Progress::Receiving(_) => {}
        }
        if progress.changed().await.is_err() {
            return Err("the upload ended".into());
        }
    }
}

async fn stream(
    wr: &mut OwnedWriteHalf,
    src: &Arc<std::fs::File>,
    header: &[u8],
    progress: &mut watch::Receiver<Progress>,
    size: u64,
    stall: Duration,
) -> Result<(), String> {
    use std::os::unix::fs::FileExt;
    let sent_err = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::TimedOut => format!("the recipient read nothing for {stall:?}"),
        _ => e.to_string(),
    };
    write_with_progress(wr, header, stall)
        .await
        .map_err(sent_err)?;
    let mut buf = vec![0u8; BODY_CHUNK];
    let mut sent = 0u64;
    while sent < size {
        let on_disk = wait_for_bytes(progress, sent).await?;
        let want = clamp(on_disk - sent);
        let file = src.clone();
        let (read, back) = tokio::task::spawn_blocking(move || {
            let read = file.read_at(&mut buf[..want], sent);
            (read, buf)
        })
        .await
        .map_err(|e| e.to_string())?;
        buf = back;
        let n = read.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("the spool file ended early".into());
        }
        write_with_progress(wr, &buf[..n], stall)
            .await
            .map_err(sent_err)?;
        sent += n as u64;
    }
    Ok(())
}
