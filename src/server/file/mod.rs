//! The file port: the username handshake, then upload headers, each followed by its body.
//!
//! * this module: the file-port handshake (the connection is bound to its user's live chat
//!   session from the same address) and the loop over upload headers, with the resync
//!   after a bad header;
//! * [`upload`]: one upload, in stages, with one refusal path;
//! * [`forward`]: each file connection's forwarder, which streams uploads to it;
//! * [`spool`]: where uploads wait until they are whole.
//!
//! An upload writes each chunk to its spool file and then publishes how many bytes are on
//! disk (a `watch` channel). Each recipient's forwarder reads the spool file up to that
//! mark, so recipients receive while the upload is still arriving, in parallel, each at
//! its own pace, and no file is ever held in memory. If the upload breaks off, forwards
//! that have not started are dropped and those under way close the recipient's file
//! connection (its client discards the partial `.tmp`): nobody keeps a partial file under
//! its final name.

mod forward;
mod partial;
mod resume;
mod spool;
mod upload;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub(crate) use forward::{forward_saved, FileLink};
use forward::{queue_saved, Part};
pub(crate) use spool::remove_stale as remove_stale_spools;

use super::{checked_name, read_first_line, secrets_allowed, Shared};
use crate::flow::{Ended, Refusal, Step, Stop};
use crate::net::{Conn, ConnWrite, LineReader};
use crate::protocol::file_header::{HeaderError, UploadHeader};
use crate::protocol::{ServerLine, FILE_SOCKET_CONNECTED};
use forward::{fail_upload, forward_all, speaks_extensions, tell, MAX_QUEUED_FORWARDS};
pub(crate) use partial::Partials;
pub(crate) use resume::Resumes;
use upload::{skip_body, upload};

/// How long a file handshake waits for the chat session of the same name to appear
/// (longer while that session's login waits for its password).
const CHAT_SESSION_WAIT: Duration = Duration::from_secs(2);
/// The lab's client waits 2 s for the greeting; a file connection held longer than this
/// (its chat login waited for a password) is not greeted at all, or the client, which has
/// stopped waiting, would read the greeting as a file header. Refusals are not sent then
/// either, for the same reason.
const GREETING_WINDOW: Duration = Duration::from_millis(1500);
/// After a header whose body length is unknown, input is discarded until this much quiet.
const RESYNC_QUIET: Duration = Duration::from_millis(200);
/// Gap between the greeting and a first forward (the lab's client reads the greeting with
/// one `recv` and must not find a header glued to it).
const GREETING_GAP: Duration = Duration::from_millis(100);

pub(super) async fn serve(shared: Arc<Shared>, conn: Conn, addr: SocketAddr, opened: Instant) {
    let secrets = secrets_allowed(&shared, conn.is_tls(), addr);
    let (rd, wr) = conn.split();
    let kill = shared.shutdown.child_token();
    let limits = &shared.config.limits;
    let mut reader = LineReader::new(rd, limits.max_header, limits.idle_pause);
    let id = shared.next_id();

    // Boxed: the opening's state lives on the heap only while it runs, so an idle file
    // connection stays small.
    let opening = open(&shared, &mut reader, wr, (addr, opened, secrets), id, &kill);
    let Some(user) = Box::pin(opening).await else {
        return;
    };
    reader.require_newlines(shared.config.limits.max_header);

    loop {
        let step = match reader.next_line(&kill).await {
            Ok(line) if line.is_empty() => Ok(()),
            Ok(line) if line.starts_with(RESUME) && speaks_extensions(&shared, &user) => {
                // Boxed, as uploads are: a rare request's state stays off the idle future.
                Box::pin(resume(&shared, &user, &line)).await;
                Ok(())
            }
            Ok(line) => match parse_header(&shared, &user, &line) {
                // Boxed: an upload's state lives on the heap only while an upload runs,
                // so an idle file connection stays small.
                Ok(header) => Box::pin(upload(&shared, &user, header, &mut reader, &kill)).await,
                Err(e) => {
                    let shown: String = String::from_utf8_lossy(&line).chars().take(200).collect();
                    warn!("[FILE ERROR] Invalid header from {addr}: {shown:?}: {e}");
                    fail_upload(&shared, &user, Refusal::Header(e));
                    Box::pin(resync(&shared, &user, &mut reader, &line, &kill)).await
                }
            },
            Err(Ended::Frame(e)) => {
                warn!("[FILE ERROR] {addr}: {e}");
                fail_upload(&shared, &user, Refusal::HeaderFrame(e));
                break;
            }
            Err(_) => break,
        };
        if step.is_err() {
            break;
        }
        reader.shrink();
    }
    shared.registry.remove_file(&user, id);
    kill.cancel();
    info!("[FILE SOCKET CLOSED] {addr}");
}

/// What our client sends on its file connection to resume a download.
const RESUME: &[u8] = b"resume ";

/// `resume <id> <have>`: our client has the first `have` bytes of file `id` (its file
/// connection broke while receiving it) and wants the rest: from the upload still
/// arriving, from the server's copy, or, when the upload itself broke, once it resumes.
/// Only a recipient of the file gets it; anything else is `[RESUME FAILED] <id> <reason>`.
async fn resume(shared: &Shared, user: &str, line: &[u8]) {
    let line = String::from_utf8_lossy(&line[RESUME.len()..]).into_owned();
    let mut words = line.split_whitespace().map(str::parse::<u64>);
    let (Some(Ok(id)), Some(Ok(have))) = (words.next(), words.next()) else {
        return warn!("[FILE ERROR] {user}: a resume request that does not parse");
    };
    let failed = |reason: &str| {
        info!("[FILE] {user} cannot resume #{id}: {reason}");
        if let Some(outbox) = shared.registry.outbox(user) {
            outbox.line(&ServerLine::ResumeFailed {
                id,
                reason: reason.to_owned(),
            });
        }
    };
    if let Some(live) = shared.resumes.live(id) {
        if !resume::may_resume(shared, user, &live.recipients) {
            return failed("it was not sent to you");
        }
        let from = have.min(live.size);
        info!("[FILE] {user} resumes '{}' at byte {from}", live.filename);
        let job = forward::ForwardJob {
            notice: None,
            from,
            checked: true,
            compressed: live.compressed,
            id: Some(id),
            src: live.src.clone(),
            follower: live.src.follower(from),
            progress: live.progress.clone(),
            size: live.size,
            sender: live.sender.clone(),
            filename: live.filename.clone(),
            queued: None,
        };
        let queued = shared
            .registry
            .file_link(user)
            .map(|link| link.jobs.try_send(Box::new(job)));
        if !matches!(queued, Some(Ok(()))) {
            failed("too many files are waiting for you");
        }
        return;
    }
    if let Some(saved) = shared.resumes.index_of(id) {
        if !resume::may_resume(shared, user, &saved.recipients) {
            return failed("it was not sent to you");
        }
        let file = match shared.store.file(saved.index).await {
            Ok(Some(file)) => file,
            Ok(None) => return failed("the file is no longer in the index"),
            Err(e) => return failed(&format!("the server could not look it up ({e})")),
        };
        info!("[FILE] {user} resumes '{}' at byte {have}", file.filename);
        let part = Part {
            from: have.min(file.size),
            compressed: saved.compressed,
        };
        if let Err(refusal) = queue_saved(shared, user, &file, false, part) {
            failed(&refusal.to_string());
        }
        return;
    }
    match shared.partials.recipients_of(id) {
        // The upload broke too: the rest comes when it resumes.
        Some(recipients) if resume::may_resume(shared, user, &recipients) => {
            shared.resumes.want(user, id, have);
        }
        Some(_) => failed("it was not sent to you"),
        None => failed("its upload broke off and is not kept"),
    }
}

/// Parses an upload header. Options are for our client, which said hello: from anyone
/// else, a fifth field is a malformed header, as in the lab's protocol.
fn parse_header(shared: &Shared, user: &str, line: &[u8]) -> Result<UploadHeader, HeaderError> {
    if UploadHeader::has_options(line) && !speaks_extensions(shared, user) {
        return Err(HeaderError::FieldCount(5));
    }
    UploadHeader::parse(line)
}

/// Opens a file connection: the handshake, the greeting (unless it was held for a login
/// too long to be greeted), its forwarder, and the files that waited for its user.
/// `None` if it was refused or ended.
async fn open(
    shared: &Arc<Shared>,
    reader: &mut LineReader,
    wr: ConnWrite,
    (addr, opened, secrets): (SocketAddr, Instant, bool),
    id: u64,
    kill: &CancellationToken,
) -> Option<String> {
    let started = Instant::now();
    let mut held = false;
    let peer = (addr, opened, secrets);
    let (user, link) = match handshake(shared, reader, peer, id, kill, &mut held).await {
        Ok(claimed) => claimed,
        Err(Stop::Refused(refusal)) if held && started.elapsed() >= GREETING_WINDOW => {
            warn!("[REFUSED] {addr}: {refusal} (held for a login too long to be told)");
            return None;
        }
        Err(Stop::Refused(refusal)) => {
            refuse(wr, addr, refusal).await;
            return None;
        }
        Err(Stop::Ended(_)) => return None,
    };
    // Greet in a write of its own: the greeting is the first thing written, and forwards
    // only start once the forwarder owns the writer.
    let mut wr = wr;
    let mut ready_at = Instant::now();
    if !held || started.elapsed() < GREETING_WINDOW {
        let greeted = async {
            wr.write_all(FILE_SOCKET_CONNECTED).await?;
            wr.flush().await
        };
        if greeted.await.is_err() {
            shared.registry.remove_file(&user, id);
            return None;
        }
        ready_at += GREETING_GAP;
    } else {
        info!("[FILE SOCKET] {user}: held for its login, so not greeted");
    }
    shared.tasks.spawn(forward_all(
        shared.clone(),
        user.clone(),
        wr,
        link,
        kill.clone(),
        ready_at,
    ));
    info!("[FILE SOCKET] {user} connected for files from {addr}");
    deliver_queued(shared, &user).await;
    Some(user)
}

/// Reads the username, waits for its chat session and claims the name's file slot;
/// returns the user and the queue its forwarder will run.
async fn handshake(
    shared: &Shared,
    reader: &mut LineReader,
    (addr, opened, secrets): (SocketAddr, Instant, bool),
    id: u64,
    kill: &CancellationToken,
    held: &mut bool,
) -> Step<(String, mpsc::Receiver<Box<forward::ForwardJob>>)> {
    // `<name>`, or from our client logged in with a password, `<name> <secret>`.
    let line = read_first_line(shared, reader, kill, opened).await?;
    let (name, proof) = match line.split_once(' ') {
        Some((name, proof)) => (name, Some(proof.trim())),
        None => (line.as_str(), None),
    };
    let user = checked_name(name)?;
    let chat_id = match proof {
        // A session's secret travels like a password: over TLS or from this machine.
        Some(_) if !secrets => return Err(Refusal::PasswordNeedsTls.into()),
        Some(proof) => shared
            .registry
            .chat_by_token(&user, proof)
            .ok_or_else(|| Refusal::BadProof(user.clone()))?,
        // The lab's client sends both usernames at once: give the chat handshake time to
        // win.
        None => await_chat_session(shared, &user, addr, kill, held).await?,
    };
    let (jobs, queue) = mpsc::channel(MAX_QUEUED_FORWARDS);
    let link = Arc::new(FileLink {
        jobs,
        kill: kill.clone(),
    });
    shared.registry.add_file(&user, chat_id, id, link)?;
    Ok((user, queue))
}

/// Forwards the files that waited for `user` while it was away (each is forgotten once it
/// has been sent whole).
async fn deliver_queued(shared: &Shared, user: &str) {
    if !shared.registry.is_registered(user) {
        return;
    }
    let waiting = match shared.store.queued_files(user).await {
        Ok(waiting) => waiting,
        Err(e) => return warn!("[STORE] cannot read the files kept for {user}: {e}"),
    };
    for file in waiting {
        if let Err(refusal) = forward_saved(shared, user, &file, true) {
            warn!(
                "[FILE FORWARD ERROR] {user} <- kept file #{}: {refusal}",
                file.id
            );
            break;
        }
    }
}

/// After a bad header: skip the body when the header's last field is a size, else discard
/// input until the peer goes quiet. Either way the uploader is told how many bytes were
/// dropped.
async fn resync(
    shared: &Shared,
    user: &str,
    reader: &mut LineReader,
    line: &[u8],
    kill: &CancellationToken,
) -> Step {
    // Our client sends a header with options only to a server that said hello, and then
    // no body before the go-ahead: there is nothing to skip.
    if UploadHeader::has_options(line) && speaks_extensions(shared, user) {
        return Ok(());
    }
    let dropped = match UploadHeader::declared_size(line) {
        // As after a refusal: a body that has not passed within the window closes the
        // connection rather than sinking into it.
        Some(size) => match tokio::time::timeout(
            upload::REFUSED_BODY_WINDOW,
            skip_body(shared, reader, size, kill),
        )
        .await
        {
            Ok(skipped) => skipped.map(|()| size)?,
            Err(_) => {
                warn!("[FILE ERROR] {user}: the refused body did not end within {:?}; closing the file connection", upload::REFUSED_BODY_WINDOW);
                return Err(Stop::Ended(Ended::Stalled(upload::REFUSED_BODY_WINDOW)));
            }
        },
        None => {
            let limit = shared.config.limits.transfer_timeout;
            let quiet = reader.discard_until_quiet(RESYNC_QUIET, limit, kill).await;
            quiet.ok_or(Stop::Ended(Ended::Closed))?
        }
    };
    if dropped > 0 {
        tell(shared, user, Refusal::Discarded(dropped));
    }
    Ok(())
}

/// Waits (briefly, or while its login waits for a password) for `user`'s chat session and
/// returns its id. A file connection belongs to a live chat session from the same address,
/// or to nobody. `held` says whether it waited for a login's password.
async fn await_chat_session(
    shared: &Shared,
    user: &str,
    addr: SocketAddr,
    kill: &CancellationToken,
    held: &mut bool,
) -> Result<u64, Refusal> {
    let start = Instant::now();
    // A password must come within the handshake timeout after the name did.
    let held_at_most = start + 2 * shared.config.limits.handshake_timeout + CHAT_SESSION_WAIT;
    loop {
        let joined = shared.registry.chat_joined.notified();
        tokio::pin!(joined);
        joined.as_mut().enable();
        if let Some((chat_id, ip, proof_required)) = shared.registry.chat_session(user) {
            return match (ip == addr.ip(), proof_required) {
                (_, true) => Err(Refusal::ProofRequired(user.to_owned())),
                (true, false) => Ok(chat_id),
                (false, false) => Err(Refusal::OtherAddress(user.to_owned())),
            };
        }
        let pending = shared.registry.login_pending(user, addr.ip());
        *held |= pending;
        let deadline = match pending {
            true => held_at_most,
            false => start + CHAT_SESSION_WAIT,
        };
        if Instant::now() >= deadline {
            return Err(Refusal::NoChatSession(user.to_owned()));
        }
        tokio::select! {
            _ = joined => {}
            _ = tokio::time::sleep_until(deadline) => {}
            _ = kill.cancelled() => return Err(Refusal::ShuttingDown),
        }
    }
}

/// Refuses a file connection with an error line and closes it.
async fn refuse(mut wr: ConnWrite, addr: SocketAddr, refusal: Refusal) {
    warn!("[REFUSED] {addr}: {refusal}");
    let line = ServerLine::Error {
        reason: refusal.to_string(),
    };
    let _ = wr.write_all(line.to_wire().as_bytes()).await;
    let _ = wr.flush().await;
}
