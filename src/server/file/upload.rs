//! One upload, in stages: admit it (name, size, quota and disk), plan who gets it and
//! queue their forwards, receive the body into a spool file while the forwards stream it
//! out, then put the server's copy in place and tell the uploader. Every refusal, at any
//! stage, takes the one path in [`refuse`].

use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::super::hooks::{Answer, HookCall};
use super::super::limits::Reservation;
use super::super::Shared;
use super::forward::{
    fail_upload, speaks_extensions, verdict, FileLink, ForwardJob, Progress, Source,
    MAX_QUEUED_FORWARDS,
};
use super::partial::{Kept, Key};
use super::resume::{Live, SavedUpload};
use super::spool;
use crate::flow::{Ended, Refusal, Step, Stop};
use crate::net::LineReader;
use crate::protocol::file_header::{Target, Trailer, UploadHeader};
use crate::protocol::names::{saved_name, MAX_FILENAME_BYTES, TMP_SUFFIX};
use crate::protocol::ServerLine;
use crate::store::FileRecord;
use crate::transfer::{receive_rest, Body, BodyError, Partial, BODY_CHUNK};

/// What the uploader is told once the file is saved, besides its forwards (made into
/// lines only then, since they name the server's copy).
#[derive(Debug, PartialEq, Eq)]
enum Notice {
    /// The file was sent to its own uploader: saved, not forwarded.
    ToSelf,
    /// The recipient has no file connection: saved only.
    NoFileSocket(String),
    /// The recipient is registered and away: saved, and forwarded at its next login.
    Queued(String),
    /// The uploader is not in the group it sent to.
    NotInGroup(String),
    /// The recipient had too many forwards waiting.
    TooManyWaiting(String),
    /// The forward could not be queued.
    NotDelivered {
        /// Who it was for.
        recipient: String,
        /// Why.
        why: String,
    },
}

impl Notice {
    fn line(&self, filename: &str, saved: &str) -> ServerLine {
        let error = |refusal: Refusal| ServerLine::Error {
            reason: refusal.to_string(),
        };
        match self {
            Notice::ToSelf => ServerLine::FileSelf {
                filename: filename.into(),
                saved_as: saved.into(),
            },
            Notice::NoFileSocket(user) => ServerLine::NoFileSocket {
                user: user.clone(),
                saved_as: saved.into(),
            },
            Notice::Queued(user) => ServerLine::FileQueued { user: user.clone() },
            Notice::NotInGroup(group) => ServerLine::NotInGroup {
                group: group.clone(),
            },
            Notice::TooManyWaiting(recipient) => error(Refusal::TooManyWaiting {
                recipient: recipient.clone(),
                saved_as: saved.into(),
            }),
            Notice::NotDelivered { recipient, why } => error(Refusal::NotDelivered {
                filename: filename.into(),
                recipient: recipient.clone(),
                why: why.clone(),
            }),
        }
    }
}

/// One recipient's share of an upload, as planned when its header arrives.
struct Forward {
    recipient: String,
    link: Arc<FileLink>,
    /// The chat notice sent when the forward starts.
    notice: ServerLine,
}

/// Receives one upload whose header is `header`. `Err` only when the connection is over;
/// a refused upload has been told and its body skipped.
pub(super) async fn upload(
    shared: &Arc<Shared>,
    user: &str,
    header: UploadHeader,
    reader: &mut LineReader,
    kill: &CancellationToken,
) -> Step {
    let size = header.size;
    if header.sender != user {
        warn!(
            "[FILE] {user} signed an upload as '{}'; it is sent as from {user}",
            header.sender
        );
    }
    let saved = saved_name(user, &header.filename);
    // A checked upload (our client) sends its body only after the go-ahead: a refusal
    // leaves nothing to skip.
    let body = if header.checked { 0 } else { size };
    let cannot_save = |error| Refusal::CannotSave {
        filename: header.filename.clone(),
        error,
    };
    // The same checked upload broken off earlier continues where it stopped.
    let key = Key::of(user, &header);
    let ttl = shared.config.limits.partial_ttl;
    let kept = match header.checked {
        true => shared.partials.take(&key, ttl),
        false => None,
    };
    let (id, reservation, mut partial, mut hasher, before) = match kept {
        Some(kept) => (
            kept.id,
            kept.reservation,
            kept.partial,
            kept.hasher,
            kept.recipients,
        ),
        None => {
            let reservation = match admit(shared, user, &header, &saved).await {
                Ok(reservation) => reservation,
                Err(refusal) => return refuse(shared, user, refusal, body, reader, kill).await,
            };
            let partial = match Partial::create(spool::path(shared), true).await {
                Ok(partial) => partial,
                Err(e) => return refuse(shared, user, cannot_save(e), body, reader, kill).await,
            };
            (
                shared.upload_id(),
                reservation,
                partial,
                blake3::Hasher::new(),
                Vec::new(),
            )
        }
    };
    if header.checked {
        let have = partial.written();
        let prefix = (have > 0).then(|| hasher.clone().finalize().to_hex().to_string());
        verdict(
            shared,
            user,
            ServerLine::UploadReady {
                offset: have,
                prefix,
            },
        );
        if have > 0 {
            // The client checks the kept bytes against its file and says where it starts.
            match read_from(shared, reader, kill).await {
                Ok(from) if from == have => {
                    info!(
                        "[FILE] '{}' from {user} resumes at byte {have}",
                        header.filename
                    );
                }
                Ok(0) => {
                    info!(
                        "[FILE] '{}' from {user} starts over: its kept bytes differ",
                        header.filename
                    );
                    hasher = blake3::Hasher::new();
                    // Recipients' parts are of the old bytes: they start over too.
                    shared.resumes.forget(id);
                    if let Err(e) = partial.restart().await {
                        // The body is coming: close rather than sink it.
                        fail_upload(shared, user, cannot_save(e));
                        return Err(Stop::Ended(Ended::Closed));
                    }
                }
                Ok(other) => {
                    let why = format!("asked to resume at byte {other}, not {have} or 0");
                    return Err(Stop::Ended(Ended::Io(std::io::Error::other(why))));
                }
                Err(end) => {
                    let kept = Kept::new((id, partial, hasher), reservation, before);
                    shared.partials.keep(key, kept, ttl);
                    return Err(Stop::Ended(end));
                }
            }
        }
    }
    let from = partial.written();
    let (progress, watcher) = watch::channel(Progress::Receiving(from));
    let (notices, live) = queue_forwards(shared, user, (id, &header), &partial, &watcher);
    drop(watcher);
    // Recipients whose connection breaks may rejoin while it arrives (and those of the
    // broken attempt this one resumes).
    let mut recipients = before;
    if let Some(live) = &live {
        recipients.extend(live.recipients.iter().cloned());
    }
    let _live = live.map(|mut live| {
        live.recipients = recipients.clone();
        shared.resumes.arriving(id, live)
    });

    let stall = shared.config.limits.transfer_timeout;
    let mut counted = from;
    let report = |n| {
        shared.metrics.file_bytes(true, n - counted);
        counted = n;
        let _ = progress.send(Progress::Receiving(n));
    };
    let rest = Body {
        from,
        size,
        stall,
        compressed: header.compressed,
    };
    match receive_rest(reader, &mut partial, &mut hasher, rest, kill, report).await {
        Ok(()) => {}
        Err(BodyError::Write(e, unread)) => {
            let _ = progress.send(Progress::Aborted);
            if header.checked {
                // A trailer follows the body: close rather than fall out of step.
                warn!(
                    "[FILE ERROR] {user}: could not save '{}': {e}",
                    header.filename
                );
                fail_upload(shared, user, cannot_save(e));
                return Err(Stop::Ended(Ended::Closed));
            }
            return refuse(shared, user, cannot_save(e), unread, reader, kill).await;
        }
        Err(BodyError::Read(end)) => {
            let _ = progress.send(Progress::Aborted);
            let name = &header.filename;
            warn!("[FILE ERROR] upload of '{name}' from {user} ended: {end}");
            let have = partial.written();
            // Kept on disk only: a kept part holds no memory while it waits.
            if header.checked && have > 0 && !ttl.is_zero() && partial.park().await.is_ok() {
                info!(
                    "[FILE] kept {have} of {size} bytes of '{name}' from {user} for it to resume"
                );
                let kept = Kept::new((id, partial, hasher), reservation, recipients);
                shared.partials.keep(key, kept, ttl);
                verdict(shared, user, ServerLine::UploadKept { have });
            } else {
                let reason = format!("the upload of '{name}' {end}");
                verdict(shared, user, ServerLine::UploadFailed { reason });
            }
            return Err(Stop::Ended(end));
        }
    }
    let hash = hasher.finalize();
    let _ = progress.send(Progress::Done(size));
    if header.checked {
        if let Err(refusal) = check_trailer(shared, reader, kill, &header.filename, &hash).await {
            // The spool is dropped with `partial`: the file never gets its name.
            let _ = progress.send(Progress::Rejected(size, refusal.to_string().into()));
            return match refusal {
                Refusal::Trailer(end) => {
                    warn!(
                        "[FILE ERROR] upload of '{}' from {user}: {end}",
                        header.filename
                    );
                    verdict(
                        shared,
                        user,
                        ServerLine::UploadFailed {
                            reason: end.to_string(),
                        },
                    );
                    Err(Stop::Ended(end))
                }
                refusal => refuse(shared, user, refusal, 0, reader, kill).await,
            };
        }
    }
    let _ = progress.send(Progress::Verified(size, hash));
    let saved = match partial.finish_unique(&shared.config.data_dir, &saved).await {
        Ok(name) => name,
        Err(e) => return refuse(shared, user, cannot_save(e), 0, reader, kill).await,
    };
    reservation.commit().await;
    let target = header.target.to_string();
    info!("[FILE RECEIVED] {saved} from {user} (intended for {target})");
    if let Some(hooks) = shared.config.hooks.as_deref() {
        let fields = vec![
            ("sender", user.to_owned()),
            ("target", target.clone()),
            ("filename", header.filename.clone()),
            ("saved_as", saved.clone()),
            ("size", size.to_string()),
        ];
        hooks.observe("file_saved", fields);
    }
    let record_name = header.filename.clone();
    let record = FileRecord {
        id,
        sender: user.to_owned(),
        target,
        filename: header.filename,
        saved_as: saved.clone(),
        size,
        blake3: hash.to_hex().to_string(),
        at: SystemTime::now(),
    };
    let indexed = shared.store.record_file(record).await;
    match &indexed {
        // Recipients whose connection broke near the end resume from the saved copy.
        Ok(index_id) => shared.resumes.saved(
            id,
            SavedUpload {
                index: *index_id,
                recipients,
                compressed: header.compressed,
            },
        ),
        Err(e) => warn!("[STORE] cannot index a saved file: {e}"),
    }
    // Recipients who are away get the file at their next login: keep it for them (before
    // its sender is told so).
    let mut notices = notices;
    for notice in &mut notices {
        let Notice::Queued(recipient) = notice else {
            continue;
        };
        let kept = match &indexed {
            Ok(id) => shared.store.queue_file(recipient, *id).await,
            Err(e) => Err(e.clone()),
        };
        if let Err(e) = kept {
            warn!("[STORE] cannot keep '{saved}' for {recipient}: {e}");
            *notice = Notice::NoFileSocket(std::mem::take(recipient));
        }
    }
    if let Some(outbox) = shared.registry.outbox(user) {
        for notice in &notices {
            outbox.line(&notice.line(&record_name, &saved));
        }
    }
    verdict(shared, user, ServerLine::UploadOk { saved_as: saved });
    Ok(())
}

/// Reads the client's `from <n>` answer to a resumable go-ahead.
async fn read_from(
    shared: &Shared,
    reader: &mut LineReader,
    kill: &CancellationToken,
) -> Result<u64, Ended> {
    let stall = shared.config.limits.transfer_timeout;
    let line = reader.next_line_within(kill, stall).await?;
    let line = String::from_utf8_lossy(&line);
    line.strip_prefix("from ")
        .and_then(|n| n.trim().parse().ok())
        .ok_or_else(|| {
            Ended::Io(std::io::Error::other(
                "expected 'from <byte>' before the body",
            ))
        })
}

/// Reads a checked upload's trailer and compares it with the hash of what arrived. A
/// mismatch, or the uploader's own `failed` line, refuses the file; a missing or garbled
/// trailer ends the connection (it is out of step).
async fn check_trailer(
    shared: &Shared,
    reader: &mut LineReader,
    kill: &CancellationToken,
    filename: &str,
    hash: &blake3::Hash,
) -> Result<(), Refusal> {
    let stall = shared.config.limits.transfer_timeout;
    let line = (reader.next_line_within(kill, stall).await).map_err(Refusal::Trailer)?;
    let got = hash.to_hex();
    match Trailer::parse(&line) {
        Some(Trailer::Hash(sent)) if sent == got.as_str() => Ok(()),
        Some(Trailer::Hash(sent)) => Err(Refusal::Corrupted {
            filename: filename.to_owned(),
            sent,
            got: got.to_string(),
        }),
        Some(Trailer::Failed(why)) => Err(Refusal::SenderGaveUp {
            filename: filename.to_owned(),
            why,
        }),
        None => Err(Refusal::Trailer(Ended::Io(std::io::Error::other(
            "the upload's BLAKE3 trailer is missing or garbled",
        )))),
    }
}

/// How long a refused body may take to pass before the file connection is closed instead
/// (a refused upload must not turn the connection into a silent sink).
pub(super) const REFUSED_BODY_WINDOW: std::time::Duration = std::time::Duration::from_secs(1);

/// The one refusal path of an upload: log it, tell the uploader, and read past the
/// `unread` body bytes so the connection stays in step, if they come within a second;
/// otherwise the file connection is closed (our client's checked uploads never get here
/// with a body: they send none before the go-ahead, and a refusal after it closes the
/// connection, which the client re-opens).
async fn refuse(
    shared: &Shared,
    user: &str,
    refusal: Refusal,
    unread: u64,
    reader: &mut LineReader,
    kill: &CancellationToken,
) -> Step {
    warn!("[FILE ERROR] {user}: {refusal}");
    fail_upload(shared, user, refusal);
    match tokio::time::timeout(REFUSED_BODY_WINDOW, skip_body(shared, reader, unread, kill)).await {
        Ok(skipped) => skipped,
        Err(_) => {
            warn!("[FILE ERROR] {user}: the refused body did not end within {REFUSED_BODY_WINDOW:?}; closing the file connection");
            Err(Stop::Ended(Ended::Stalled(REFUSED_BODY_WINDOW)))
        }
    }
}

/// Reads and drops `n` body bytes of a refused upload; `Err` if the connection ended (or
/// stalled for the transfer timeout) first.
pub(super) async fn skip_body(
    shared: &Shared,
    reader: &mut LineReader,
    n: u64,
    kill: &CancellationToken,
) -> Step {
    let stall = shared.config.limits.transfer_timeout;
    reader
        .skip(n, BODY_CHUNK, kill, stall)
        .await
        .map_err(|e| Stop::Ended(Ended::Io(e)))
}

/// Whether the upload may be stored at all: its saved name fits, it is within the size
/// limit, and the user's quota and the disk have room (which it then holds).
async fn admit(
    shared: &Arc<Shared>,
    user: &str,
    header: &UploadHeader,
    saved: &str,
) -> Result<Reservation, Refusal> {
    if saved.len() + TMP_SUFFIX.len() > MAX_FILENAME_BYTES {
        return Err(Refusal::SavedNameTooLong(saved.to_owned()));
    }
    let limit = shared.config.limits.max_file_size;
    if header.size > limit {
        return Err(Refusal::TooLarge {
            size: header.size,
            limit,
        });
    }
    if let Some(hooks) = shared.config.hooks.as_deref() {
        if let Some(policy) = hooks.spec.upload {
            let question = HookCall::Upload {
                sender: user.to_owned(),
                target: header.target.to_string(),
                filename: header.filename.clone(),
                size: header.size,
            };
            if let Answer::Deny(reason) = hooks.ask(question, policy, &shared.metrics).await {
                return Err(Refusal::Hook(reason));
            }
        }
    }
    shared.disk.reserve(user, header.size).await
}

/// Who gets an upload: a forward per recipient with a file connection, and what its
/// sender is told once the file is saved.
fn plan(shared: &Shared, user: &str, header: &UploadHeader) -> (Vec<Forward>, Vec<Notice>) {
    let registry = &shared.registry;
    let filename = &header.filename;
    let (mut forwards, mut notices) = (Vec::new(), Vec::new());
    match &header.target {
        Target::User(to) if to == user => notices.push(Notice::ToSelf),
        Target::User(to) if registry.away(to) => notices.push(Notice::Queued(to.clone())),
        Target::User(to) => match registry.file_link(to) {
            Some(link) => forwards.push(Forward {
                recipient: to.clone(),
                link,
                notice: ServerLine::FileIncoming {
                    from: user.into(),
                    filename: filename.clone(),
                    size: header.size,
                },
            }),
            None => notices.push(Notice::NoFileSocket(to.clone())),
        },
        Target::Group(group) => match registry.members_except(group, user) {
            None => notices.push(Notice::NotInGroup(group.clone())),
            Some(members) => {
                for member in members {
                    if registry.away(&member) {
                        notices.push(Notice::Queued(member));
                        continue;
                    }
                    match registry.file_link(&member) {
                        Some(link) => forwards.push(Forward {
                            recipient: member,
                            link,
                            notice: ServerLine::FileToGroup {
                                from: user.into(),
                                filename: filename.clone(),
                                group: group.clone(),
                            },
                        }),
                        None => notices.push(Notice::NoFileSocket(member)),
                    }
                }
            }
        },
    }
    (forwards, notices)
}

/// Plans the upload and queues a forward on each recipient's file connection; returns
/// what its sender is told once the file is saved, and, when it has forwards, the upload
/// as recipients whose connection breaks can rejoin it.
fn queue_forwards(
    shared: &Shared,
    user: &str,
    (id, header): (u64, &UploadHeader),
    partial: &Partial,
    watcher: &watch::Receiver<Progress>,
) -> (Vec<Notice>, Option<Live>) {
    let (forwards, mut notices) = plan(shared, user, header);
    if forwards.is_empty() {
        return (notices, None);
    }
    // One read handle for every forward of this upload (each reads at its own offset), so
    // queued forwards cost no descriptors.
    let src = match std::fs::File::open(partial.path()) {
        Ok(file) => Source::following(file, partial.recent()),
        Err(e) => {
            let path = partial.path().display();
            warn!("[FILE FORWARD ERROR] cannot open {path}: {e}");
            notices.extend(forwards.into_iter().map(|f| Notice::NotDelivered {
                recipient: f.recipient,
                why: e.to_string(),
            }));
            return (notices, None);
        }
    };
    let mut recipients = Vec::new();
    for Forward {
        recipient,
        link,
        notice,
    } in forwards
    {
        // Our clients get a checked forward (a BLAKE3 trailer after the body, the file's
        // id to resume it, and only the bytes they lack if they had some); others, the
        // lab's header.
        let ours = speaks_extensions(shared, &recipient);
        let from = match ours {
            true => shared.resumes.has(&recipient, id).min(header.size),
            false => 0,
        };
        let job = ForwardJob {
            notice: (from == 0).then_some(notice),
            from,
            checked: ours,
            // Compressed for our clients when its uploader judged it worth it.
            compressed: header.compressed,
            id: Some(id),
            src: src.clone(),
            follower: src.follower(from),
            progress: watcher.clone(),
            size: header.size,
            sender: user.into(),
            filename: header.filename.clone(),
            queued: None,
        };
        match link.jobs.try_send(Box::new(job)) {
            Ok(()) => {
                let chat = shared.registry.chat_session(&recipient).map_or(0, |c| c.0);
                recipients.push((recipient, chat));
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                warn!("[FILE FORWARD ERROR] {recipient} -> {MAX_QUEUED_FORWARDS} files already waiting");
                notices.push(Notice::TooManyWaiting(recipient));
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                notices.push(Notice::NoFileSocket(recipient));
            }
        }
    }
    let live = Live {
        src,
        compressed: header.compressed,
        progress: watcher.clone(),
        sender: user.into(),
        filename: header.filename.clone(),
        size: header.size,
        recipients,
    };
    (notices, Some(live))
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;
    use crate::net::SendQueue;
    use crate::server::registry::Outbox;
    use crate::server::ServerConfig;
    use bytes::Bytes;

    /// A server state with alice, bob and carol logged in; only bob has a file connection.
    fn three_users(dir: &std::path::Path) -> Arc<Shared> {
        let mut config = ServerConfig {
            data_dir: dir.into(),
            ..ServerConfig::default()
        };
        config.limits.max_file_size = 1000;
        config.limits.user_quota = 1500;
        config.limits.min_free_disk = 0;
        let shared = Shared::for_tests(config);
        for (id, name) in [(1, "alice"), (2, "bob"), (3, "carol")] {
            let queue = SendQueue::new(64, 1 << 20, 1 << 20);
            let outbox = Outbox::new(name, queue, CancellationToken::new());
            let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
            let registry = &shared.registry;
            registry
                .add_chat(name, id, ip, outbox, Bytes::new(), None)
                .expect("free");
            registry.join("devs", name).expect("joins");
        }
        let (jobs, queue) = mpsc::channel(1);
        std::mem::forget(queue); // keep the link open for the test's life
        let link = Arc::new(FileLink {
            jobs,
            kill: CancellationToken::new(),
        });
        shared.registry.add_file("bob", 2, 10, link).expect("bound");
        shared
    }

    fn header(target: &str, size: u64) -> UploadHeader {
        let line = format!("alice|{target}|a.txt|{size}");
        UploadHeader::parse(line.as_bytes()).expect("valid")
    }

    #[test]
    fn a_plan_forwards_to_file_connections_and_tells_the_sender_the_rest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let shared = three_users(dir.path());
        let recipients = |forwards: &[Forward]| -> Vec<String> {
            forwards.iter().map(|f| f.recipient.clone()).collect()
        };

        let (forwards, after) = plan(&shared, "alice", &header("bob", 5));
        assert_eq!(recipients(&forwards), ["bob"]);
        assert!(after.is_empty());
        assert!(matches!(
            &forwards[0].notice,
            ServerLine::FileIncoming { size: 5, .. }
        ));

        let (forwards, after) = plan(&shared, "alice", &header("carol", 5));
        assert!(forwards.is_empty());
        assert_eq!(after, [Notice::NoFileSocket("carol".into())]);
        assert_eq!(
            after[0].line("a.txt", "received_from_alice_a (2).txt"),
            ServerLine::NoFileSocket {
                user: "carol".into(),
                saved_as: "received_from_alice_a (2).txt".into()
            },
            "the line names the copy as it was saved"
        );

        let (forwards, after) = plan(&shared, "alice", &header("alice", 5));
        assert!(forwards.is_empty());
        assert_eq!(after, [Notice::ToSelf]);

        let (forwards, after) = plan(&shared, "alice", &header("GROUP:devs", 5));
        assert_eq!(recipients(&forwards), ["bob"]);
        assert_eq!(after, [Notice::NoFileSocket("carol".into())]);

        let (forwards, after) = plan(&shared, "alice", &header("GROUP:ops", 5));
        assert!(forwards.is_empty());
        assert_eq!(after, [Notice::NotInGroup("ops".into())]);
    }

    #[tokio::test]
    async fn admission_checks_the_name_the_size_and_the_quota() {
        let dir = tempfile::tempdir().expect("tempdir");
        let shared = three_users(dir.path());
        let long = "x".repeat(252); // with ".tmp", one byte over a path component
        let refused = admit(&shared, "alice", &header("bob", 1), &long).await;
        assert!(matches!(refused, Err(Refusal::SavedNameTooLong(_))));
        let saved = "received_from_alice_a.txt";
        let refused = admit(&shared, "alice", &header("bob", 1001), saved).await;
        assert_eq!(
            refused.err().map(|r| r.to_string()),
            Some("file too large: 1001 bytes (limit 1000)".into())
        );
        let first = admit(&shared, "alice", &header("bob", 1000), saved)
            .await
            .expect("fits");
        let refused = admit(&shared, "alice", &header("bob", 1000), saved).await;
        assert!(matches!(
            refused,
            Err(Refusal::Quota {
                used: 1000,
                quota: 1500,
                size: 1000
            })
        ));
        drop(first);
        admit(&shared, "alice", &header("bob", 1000), saved)
            .await
            .expect("a dropped reservation is given back");
    }
}
