//! [`SqliteStore`]: the [`Store`] in one SQLite file (rusqlite, bundled SQLite).
//!
//! * One writer thread owns the writing connection. Writes queue to it; it takes every
//!   write that is waiting, runs them in one transaction (each in a savepoint of its own,
//!   so one failing write does not undo the others) and commits once: many writes, one
//!   fsync (group commit). A write's future completes only after its commit.
//! * Reads run on tokio's blocking pool, on connections of their own (WAL lets them read
//!   while the writer writes), so no store access ever blocks a tokio worker.
//! * The schema is versioned with `PRAGMA user_version` and brought up to date at open by
//!   the migrations in [`MIGRATIONS`]. A file that is not a database, is corrupt, is from a
//!   newer relaychat or is in use by another server is refused with a clear message and
//!   left exactly as it was.
//! * `:memory:` gives a private in-memory database on the same code path (forgotten at
//!   exit); there, reads go through the writer thread too (one connection holds it).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use tokio::sync::{mpsc, oneshot};

use super::{
    Account, FileRecord, Message, MessageRef, Queued, Scope, ScopeRef, Store, StoreError,
    StoreFuture,
};

/// The schema this build writes.
pub const SCHEMA_VERSION: i64 = 3;

/// Migration `i` takes a database from version `i` to `i + 1`.
const MIGRATIONS: [&str; 3] = [
    r#"
CREATE TABLE accounts (
    name TEXT PRIMARY KEY,
    password_hash TEXT NOT NULL,
    created_ms INTEGER NOT NULL
);
CREATE TABLE memberships (
    user TEXT NOT NULL,
    grp TEXT NOT NULL,
    PRIMARY KEY (user, grp)
);
CREATE TABLE inbox (
    id INTEGER PRIMARY KEY,
    user TEXT NOT NULL,
    sender TEXT NOT NULL,
    scope_kind INTEGER NOT NULL,
    scope TEXT NOT NULL,
    text TEXT NOT NULL,
    at_ms INTEGER NOT NULL
);
CREATE INDEX inbox_by_user ON inbox (user, id);
CREATE TABLE history (
    id INTEGER PRIMARY KEY,
    scope_kind INTEGER NOT NULL,
    scope TEXT NOT NULL,
    sender TEXT NOT NULL,
    text TEXT NOT NULL,
    at_ms INTEGER NOT NULL
);
CREATE INDEX history_by_scope ON history (scope_kind, scope, id);
CREATE TABLE files (
    id INTEGER PRIMARY KEY,
    upload_id INTEGER NOT NULL,
    sender TEXT NOT NULL,
    target TEXT NOT NULL,
    filename TEXT NOT NULL,
    saved_as TEXT NOT NULL,
    size INTEGER NOT NULL,
    at_ms INTEGER NOT NULL
);
CREATE INDEX files_by_sender ON files (sender, id);
CREATE INDEX files_by_target ON files (target, id);
CREATE TABLE stored (
    user TEXT PRIMARY KEY,
    bytes INTEGER NOT NULL
);
"#,
    r#"
ALTER TABLE files ADD COLUMN blake3 TEXT NOT NULL DEFAULT '';
"#,
    r#"
CREATE TABLE inbox_sizes (
    user TEXT PRIMARY KEY,
    n INTEGER NOT NULL
);
-- No released server wrote the v1 history table (history came with v3): it is replaced
-- by one that keeps a batch of a conversation's messages per row.
DROP INDEX history_by_scope;
DROP TABLE history;
CREATE TABLE history (
    id INTEGER PRIMARY KEY,
    scope_kind INTEGER NOT NULL,
    a TEXT NOT NULL,
    b TEXT NOT NULL,
    last_ms INTEGER NOT NULL,
    n INTEGER NOT NULL,
    messages BLOB NOT NULL
);
CREATE INDEX history_by_conversation ON history (scope_kind, a, b, id);
CREATE INDEX history_by_time ON history (last_ms);
INSERT INTO inbox_sizes (user, n) SELECT user, count(*) FROM inbox GROUP BY user;
CREATE TABLE queued_files (
    user TEXT NOT NULL,
    file INTEGER NOT NULL,
    PRIMARY KEY (user, file)
);
"#,
];

/// Most writes committed in one transaction.
const MAX_BATCH: usize = 1024;
/// Writes waiting for the writer at most; past it, writers wait (backpressure).
const WRITE_QUEUE: usize = 16 * 1024;

/// What a job hands back after running: called once its transaction has committed (`None`)
/// or failed (`Some(error)`), to hand the result over.
type Deliver = Box<dyn FnOnce(Option<&StoreError>) + Send>;

/// A write for the writer thread. Called with the connection inside the batch's
/// transaction, it runs its SQL and returns its `Deliver`; called with an error (the batch
/// could not begin, or the transaction was lost), it runs nothing and reports the error.
type Run = Box<dyn FnOnce(Result<&Connection, &StoreError>) -> Option<Deliver> + Send>;

/// A write and how durable its commit must be.
struct Job {
    /// The commit must survive a power loss (`synchronous=FULL`: the WAL is synced at
    /// commit). `false` (history rows): a crash of the process still loses nothing
    /// committed, a power loss may lose the last commits (`synchronous=NORMAL`).
    durable: bool,
    run: Run,
}

/// The store in one SQLite file.
pub struct SqliteStore {
    /// Writes for the writer thread (`None` once the store is being dropped).
    writer: Mutex<Option<mpsc::Sender<Job>>>,
    /// The writer thread, joined on drop (before the lock is let go).
    thread: Option<std::thread::JoinHandle<()>>,
    /// Connections for readers, opened on demand and reused (`None` for `:memory:`, whose
    /// one connection is the writer's).
    readers: Option<Arc<Readers>>,
    /// The lock that keeps a second server off this database (held while the store lives).
    _lock: Option<std::fs::File>,
    /// History appends not yet handed to the writer (see `append_history`).
    history: Arc<HistoryBuffer>,
}

/// History appends gathered in memory and written many to a job: a message's history row
/// costs an append here, and each conversation's batch becomes one row of the table.
#[derive(Default)]
struct HistoryBuffer {
    pending: Mutex<Pending>,
    /// A flush is queued (or will be, see [`HISTORY_PACE`]) that will take the rows.
    flushing: std::sync::atomic::AtomicBool,
    /// When the last flush took its rows.
    last_flush: Mutex<Option<std::time::Instant>>,
}

/// Appends not yet written, encoded as they came (so nothing of a message outlives the
/// append: the appending thread frees what it allocated, and a flush allocates nothing
/// per message).
#[derive(Default)]
struct Pending {
    /// Each message's conversation key (two names) and stored form (see `encode`).
    bytes: Vec<u8>,
    rows: Vec<PendingRow>,
}

/// Where one pending message is in [`Pending::bytes`].
struct PendingRow {
    /// The conversation's kind (see [`conversation`]).
    kind: i64,
    a: std::ops::Range<usize>,
    b: std::ops::Range<usize>,
    /// Its stored form.
    body: std::ops::Range<usize>,
    at_ms: i64,
}

impl Pending {
    fn push(&mut self, message: MessageRef<'_>) {
        let (kind, a, b) = conversation_of(message.from, message.to);
        let put = |bytes: &mut Vec<u8>, s: &[u8]| {
            bytes.extend_from_slice(s);
            bytes.len() - s.len()..bytes.len()
        };
        let a = put(&mut self.bytes, a.as_bytes());
        let b = put(&mut self.bytes, b.as_bytes());
        let start = self.bytes.len();
        let at_ms = ms(message.at);
        encode_one(&mut self.bytes, at_ms, message.from, message.text);
        let body = start..self.bytes.len();
        self.rows.push(PendingRow {
            kind,
            a,
            b,
            body,
            at_ms,
        });
    }

    /// The key of `row`'s conversation.
    fn key(&self, row: &PendingRow) -> Conversation<'_> {
        let text =
            |r: &std::ops::Range<usize>| std::str::from_utf8(&self.bytes[r.clone()]).unwrap_or("");
        (row.kind, text(&row.a), text(&row.b))
    }

    /// Puts `later`'s messages after these.
    fn append(&mut self, later: Pending) {
        let shift = self.bytes.len();
        let moved = |r: std::ops::Range<usize>| r.start + shift..r.end + shift;
        self.bytes.extend_from_slice(&later.bytes);
        self.rows.extend(later.rows.into_iter().map(|r| PendingRow {
            a: moved(r.a),
            b: moved(r.b),
            body: moved(r.body),
            ..r
        }));
    }
}

impl HistoryBuffer {
    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// History rows that may wait in memory; past it, appends wait for the writer.
const HISTORY_BUFFER: usize = 128 * 1024;
/// Bytes of history that may wait in memory; past it, appends wait for the writer.
const HISTORY_BUFFER_BYTES: usize = 16 << 20;
/// Most bytes of messages in one row of the history table.
const HISTORY_ROW_BYTES: usize = 1 << 20;
/// Least time between two history flushes (while the buffer is not full): a busy server
/// commits its history in a few large transactions a second rather than one per
/// scheduling round, and so writes each page of the table's indexes far fewer times.
/// History was never durable before the message went out; this is how much more of it a
/// crash may take.
const HISTORY_PACE: Duration = Duration::from_millis(50);

struct Readers {
    /// The database file.
    path: PathBuf,
    /// Connections not in use (at most [`MAX_READERS`]).
    idle: Mutex<Vec<Connection>>,
    /// Reads at once (each holds a connection and a blocking thread).
    slots: tokio::sync::Semaphore,
}

/// Reads that run at once, and reader connections kept open.
const MAX_READERS: usize = 4;

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn ms(t: SystemTime) -> i64 {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn time(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

fn int(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn scope_parts(scope: &Scope) -> (i64, &str) {
    match scope {
        Scope::User(u) => (0, u),
        Scope::Group(g) => (1, g),
        Scope::Everyone => (2, ""),
        Scope::Ack => (3, ""),
    }
}

fn scope_from(kind: i64, name: String) -> Scope {
    match kind {
        0 => Scope::User(name),
        1 => Scope::Group(name),
        3 => Scope::Ack,
        _ => Scope::Everyone,
    }
}

/// Opens the database by its path (never as a URI, so no character in it means anything).
fn open_connection(path: &Path, read_only: bool) -> rusqlite::Result<Connection> {
    let mut flags = OpenFlags::SQLITE_OPEN_NO_MUTEX;
    flags |= match read_only {
        true => OpenFlags::SQLITE_OPEN_READ_ONLY,
        false => OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE,
    };
    let conn = Connection::open_with_flags(path, flags)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    Ok(conn)
}

/// Takes the lock file beside the database, or says who holds it.
fn lock(path: &Path) -> Result<std::fs::File, StoreError> {
    use rustix::fs::{flock, FlockOperation};
    let mut lock_path = path.as_os_str().to_owned();
    lock_path.push(".lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| {
            unavailable(format!(
                "cannot open {}: {e}",
                Path::new(&lock_path).display()
            ))
        })?;
    flock(&file, FlockOperation::NonBlockingLockExclusive).map_err(|e| match e {
        rustix::io::Errno::WOULDBLOCK => unavailable(format!(
            "database {} is in use by another relaychat server",
            path.display()
        )),
        e => unavailable(format!("cannot lock {}: {e}", path.display())),
    })?;
    Ok(file)
}

/// Looks at an existing database without changing a byte of it: it must be a SQLite
/// database of a schema version we know, intact, and (at version 0) empty, not some other
/// program's.
fn inspect(conn: &Connection, shown: &str) -> Result<(), StoreError> {
    let refused = |e: rusqlite::Error| {
        unavailable(format!(
            "{shown} is not a relaychat database, or is corrupt ({e}); it was left as it is"
        ))
    };
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |row| row.get(0))
        .map_err(refused)?;
    if version > SCHEMA_VERSION {
        return Err(unavailable(format!(
            "{shown} is from a newer relaychat (schema version {version}; this one knows up to \
             {SCHEMA_VERSION}); it was left as it is"
        )));
    }
    if version < 0 {
        return Err(unavailable(format!(
            "{shown} is not a relaychat database (schema version {version}); it was left as it is"
        )));
    }
    if version == 0 {
        let tables: i64 = conn
            .query_row("SELECT count(*) FROM sqlite_master", [], |row| row.get(0))
            .map_err(refused)?;
        if tables > 0 {
            return Err(unavailable(format!(
                "{shown} is another program's database ({tables} schema objects, no relaychat \
                 schema version); it was left as it is"
            )));
        }
    }
    let check: String = conn
        .query_row("PRAGMA quick_check", [], |row| row.get(0))
        .map_err(refused)?;
    if check != "ok" {
        return Err(unavailable(format!(
            "{shown} is corrupt ({check}); it was left as it is"
        )));
    }
    Ok(())
}

/// Sets the writer's connection up and brings the schema up to date.
fn prepare(conn: &mut Connection, shown: &str, file: bool) -> Result<(), StoreError> {
    inspect(conn, shown)?;
    let failed = |e: rusqlite::Error| unavailable(format!("{shown}: {e}"));
    if file {
        let mode: String = conn
            .query_row("PRAGMA journal_mode=WAL", [], |row| row.get(0))
            .map_err(failed)?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(
                "[STORE] {shown}: journal mode {mode}, not WAL: readers wait for writes"
            );
        }
    }
    conn.execute_batch("PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON;")
        .map_err(failed)?;
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |row| row.get(0))
        .map_err(failed)?;
    for (from, sql) in MIGRATIONS
        .iter()
        .enumerate()
        .skip(usize::try_from(version).unwrap_or(0))
    {
        let to = from + 1;
        let tx = conn.transaction().map_err(failed)?;
        tx.execute_batch(sql).map_err(|e| {
            unavailable(format!(
                "{shown}: migration to schema version {to} failed: {e}"
            ))
        })?;
        tx.pragma_update(None, "user_version", to as i64)
            .map_err(failed)?;
        tx.commit().map_err(failed)?;
        tracing::info!("[STORE] {shown}: schema version {to}");
    }
    Ok(())
}

/// The writer thread: batches whatever writes are waiting into one transaction. A job's
/// result is handed over only after the commit; if the transaction is lost on the way
/// (SQLite rolls back by itself on some errors), every job of the batch is told it failed.
fn write_loop(conn: Connection, mut jobs: mpsc::Receiver<Job>) {
    // As `prepare` left it; a batch that wants the other mode sets it first. A failure to
    // set NORMAL leaves FULL, which is only slower; one to set FULL fails the batch.
    let mut full = true;
    while let Some(first) = jobs.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        // One job that must be durable makes the whole commit durable.
        let durable = batch.iter().any(|job| job.durable);
        if durable != full {
            let mode = if durable { "FULL" } else { "NORMAL" };
            match conn.execute_batch(&format!("PRAGMA synchronous={mode}")) {
                Ok(()) => full = durable,
                // A durable write is never committed without its sync.
                Err(e) if durable => {
                    let e = unavailable(format!("cannot set synchronous=FULL: {e}"));
                    batch.into_iter().for_each(|job| drop((job.run)(Err(&e))));
                    continue;
                }
                Err(e) => tracing::warn!("[STORE] cannot set synchronous={mode}: {e}"),
            }
        }
        if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE").map_err(unavailable) {
            batch.into_iter().for_each(|job| drop((job.run)(Err(&e))));
            continue;
        }
        let mut done: Vec<Deliver> = Vec::with_capacity(batch.len());
        let mut lost = None;
        let mut rest = batch.into_iter();
        for job in rest.by_ref() {
            if let Err(e) = conn.execute_batch("SAVEPOINT job") {
                lost = Some(unavailable(e));
                drop((job.run)(Err(lost.as_ref().expect("just set"))));
                break;
            }
            done.extend((job.run)(Ok(&conn)));
            if conn.execute_batch("RELEASE job").is_err() || conn.is_autocommit() {
                lost = Some(unavailable("the transaction was lost"));
                break;
            }
        }
        let lost = match lost {
            Some(e) => Some(e),
            None => conn.execute_batch("COMMIT").map_err(unavailable).err(),
        };
        match lost {
            None => done.into_iter().for_each(|deliver| deliver(None)),
            Some(e) => {
                if !conn.is_autocommit() && conn.execute_batch("ROLLBACK").is_err() {
                    tracing::error!("[STORE] cannot roll back a failed batch: the store stops");
                    rest.for_each(|job| drop((job.run)(Err(&e))));
                    done.into_iter().for_each(|deliver| deliver(Some(&e)));
                    return;
                }
                rest.for_each(|job| drop((job.run)(Err(&e))));
                done.into_iter().for_each(|deliver| deliver(Some(&e)));
            }
        }
    }
}

impl SqliteStore {
    /// Opens (creating if need be) the database at `path`, or a private in-memory one for
    /// `:memory:`. Blocks while it checks and migrates: call it before serving.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let memory = path.as_os_str() == ":memory:";
        let shown = path.display().to_string();
        let lock = match memory {
            true => None,
            false => {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir).map_err(|e| {
                        unavailable(format!("cannot create {}: {e}", dir.display()))
                    })?;
                }
                let lock = lock(path)?;
                // An existing database is looked at read-only first: one we refuse is left
                // byte for byte as it was.
                if std::fs::metadata(path).is_ok_and(|m| m.len() > 0) {
                    let conn = open_connection(path, true).map_err(|e| {
                        unavailable(format!("{shown} is not a relaychat database, or is corrupt ({e}); it was left as it is"))
                    })?;
                    inspect(&conn, &shown)?;
                }
                Some(lock)
            }
        };
        let mut conn = open_connection(path, false)
            .map_err(|e| unavailable(format!("cannot open {shown}: {e}")))?;
        prepare(&mut conn, &shown, !memory)?;
        let (tx, rx) = mpsc::channel::<Job>(WRITE_QUEUE);
        let thread = std::thread::Builder::new()
            .name("relaychat-store".into())
            .spawn(move || write_loop(conn, rx))
            .map_err(unavailable)?;
        Ok(Self {
            writer: Mutex::new(Some(tx)),
            thread: Some(thread),
            readers: (!memory).then(|| {
                Arc::new(Readers {
                    path: path.to_owned(),
                    idle: Mutex::default(),
                    slots: tokio::sync::Semaphore::new(MAX_READERS),
                })
            }),
            _lock: lock,
            history: Arc::default(),
        })
    }

    /// A private in-memory database (forgotten when the store is dropped).
    ///
    /// # Panics
    /// If the process cannot start the writer thread.
    #[allow(clippy::expect_used)]
    pub fn in_memory() -> Self {
        Self::open(Path::new(":memory:")).expect("an in-memory SQLite database opens")
    }

    /// Runs `f` in the writer's next transaction; completes once it has committed.
    fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> StoreFuture<'_, T> {
        let (tx, rx) = oneshot::channel();
        let queued = self.enqueue(f, move |result| {
            let _ = tx.send(result);
        });
        Box::pin(async move {
            queued.await?;
            rx.await
                .map_err(|_| unavailable("the store's writer has stopped"))?
        })
    }

    /// Queues a job that runs `f` and hands its result (after the commit) to `done`.
    fn enqueue<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
        done: impl FnOnce(Result<T, StoreError>) + Send + 'static,
    ) -> StoreFuture<'_, ()> {
        enqueue_on(self.writer(), true, f, done)
    }

    /// The writer's queue (`None` once the store is being dropped).
    fn writer(&self) -> Option<mpsc::Sender<Job>> {
        self.writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Writes every history row gathered so far (one row per conversation batch); completes
    /// once they are committed. If the write fails, the rows go back to the front of the
    /// buffer for the next flush; either way the next append may queue a flush again.
    fn flush_history(&self) -> StoreFuture<'_, ()> {
        let (queued, committed) = self.queue_history_flush();
        Box::pin(async move {
            queued.await?;
            committed
                .await
                .map_err(|_| unavailable("the store's writer has stopped"))?
        })
    }

    /// Queues a flush of the history buffer (see `flush_history`): completes once queued;
    /// the receiver gets the result once it has committed.
    fn queue_history_flush(
        &self,
    ) -> (
        StoreFuture<'_, ()>,
        oneshot::Receiver<Result<(), StoreError>>,
    ) {
        queue_history_flush_on(self.writer(), self.history.clone())
    }

    /// Runs `f` on a reader connection on the blocking pool (for `:memory:`, in the
    /// writer's thread: its one connection holds the database).
    fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> StoreFuture<'_, T> {
        let Some(readers) = self.readers.clone() else {
            return self.write(f);
        };
        Box::pin(async move {
            let _slot = readers.slots.acquire().await.map_err(unavailable)?;
            let readers = readers.clone();
            tokio::task::spawn_blocking(move || {
                let idle = readers
                    .idle
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .pop();
                let conn = match idle {
                    Some(conn) => conn,
                    None => open_connection(&readers.path, true).map_err(unavailable)?,
                };
                let result = f(&conn);
                readers
                    .idle
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(conn);
                result
            })
            .await
            .map_err(unavailable)?
        })
    }
}

/// Queues on `writer` a job that runs `f` and hands its result (after the commit) to
/// `done`.
fn enqueue_on<T: Send + 'static>(
    writer: Option<mpsc::Sender<Job>>,
    durable: bool,
    f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    done: impl FnOnce(Result<T, StoreError>) + Send + 'static,
) -> StoreFuture<'static, ()> {
    let run: Run = Box::new(move |conn| {
        let conn = match conn {
            Ok(conn) => conn,
            Err(e) => {
                done(Err(e.clone()));
                return None;
            }
        };
        let result = f(conn);
        if result.is_err() {
            let _ = conn.execute_batch("ROLLBACK TO job");
        }
        Some(Box::new(move |commit: Option<&StoreError>| {
            done(match commit {
                Some(e) => Err(e.clone()),
                None => result,
            });
        }))
    });
    let job = Job { durable, run };
    let stopped = || unavailable("the store's writer has stopped");
    // Queued at once when there is room (the job runs even if the future is dropped);
    // else the future waits for room.
    match writer.map(|writer| (writer.try_send(job), writer)) {
        Some((Ok(()), _)) => Box::pin(std::future::ready(Ok(()))),
        Some((Err(mpsc::error::TrySendError::Full(job)), writer)) => {
            Box::pin(async move { writer.send(job).await.map_err(|_| stopped()) })
        }
        _ => Box::pin(std::future::ready(Err(stopped()))),
    }
}

/// Queues on `writer` a flush of `history` (see `SqliteStore::flush_history`): completes
/// once queued; the receiver gets the result once it has committed.
fn queue_history_flush_on(
    writer: Option<mpsc::Sender<Job>>,
    history: Arc<HistoryBuffer>,
) -> (
    StoreFuture<'static, ()>,
    oneshot::Receiver<Result<(), StoreError>>,
) {
    use std::sync::atomic::Ordering;
    let (buffer, restore) = (history.clone(), history);
    let taken: Arc<Mutex<Pending>> = Arc::default();
    let kept = taken.clone();
    let (tx, rx) = oneshot::channel();
    let queued = enqueue_on(
        writer,
        false,
        move |conn| {
            // Cleared before the rows are taken: a row added after this is either taken
            // now or queues a flush of its own.
            buffer.flushing.store(false, Ordering::Release);
            *buffer
                .last_flush
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(std::time::Instant::now());
            let rows = std::mem::take(&mut *buffer.lock());
            let written = write_history(conn, &rows);
            *kept.lock().unwrap_or_else(PoisonError::into_inner) = rows;
            written
        },
        move |result: Result<(), StoreError>| {
            restore.flushing.store(false, Ordering::Release);
            if let Err(e) = &result {
                tracing::warn!("[STORE] cannot write the history: {e}");
                let mut back =
                    std::mem::take(&mut *taken.lock().unwrap_or_else(PoisonError::into_inner));
                let mut pending = restore.lock();
                back.append(std::mem::take(&mut *pending));
                *pending = back;
            }
            let _ = tx.send(result);
        },
    );
    (queued, rx)
}

impl Drop for SqliteStore {
    /// Lets the writer finish what is queued (with the history not yet queued, see
    /// [`HISTORY_PACE`]) and joins it, before the lock is let go.
    fn drop(&mut self) {
        if !self.history.lock().rows.is_empty() {
            // A full queue would leave the flush in a future that is never polled: wait
            // for room instead (the writer drains it; it is joined below anyway).
            if let Some(writer) = self.writer() {
                while writer.capacity() == 0 && !writer.is_closed() {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            drop(self.queue_history_flush());
        }
        self.writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn sql(e: rusqlite::Error) -> StoreError {
    unavailable(e)
}

fn message_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Message> {
    Ok(Message {
        from: row.get(0)?,
        to: scope_from(row.get(1)?, row.get(2)?),
        text: row.get(3)?,
        at: time(row.get(4)?),
    })
}

/// A conversation's key in the history table: private conversations are the unordered
/// pair of their two users (`a` the smaller name), a group's is its name.
type Conversation<'a> = (i64, &'a str, &'a str);

fn conversation<'a>(me: &'a str, scope: &'a Scope) -> Conversation<'a> {
    conversation_of(me, scope.as_ref())
}

fn conversation_of<'a>(me: &'a str, scope: ScopeRef<'a>) -> Conversation<'a> {
    match scope {
        ScopeRef::User(other) if other < me => (0, other, me),
        ScopeRef::User(other) => (0, me, other),
        ScopeRef::Group(group) => (1, group, ""),
        ScopeRef::Everyone => (2, "", ""),
        ScopeRef::Ack => (3, "", ""),
    }
}

/// Inserts buffered history rows: per conversation, in order, in rows of at most
/// [`HISTORY_ROW_BYTES`].
fn write_history(conn: &Connection, pending: &Pending) -> Result<(), StoreError> {
    let mut insert = conn
        .prepare_cached(
            "INSERT INTO history (scope_kind, a, b, last_ms, n, messages) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )
        .map_err(sql)?;
    let mut blob = Vec::new();
    for (key, batch) in conversations(pending) {
        let mut start = 0;
        while start < batch.len() {
            blob.clear();
            let mut end = start;
            while end < batch.len() && (end == start || blob.len() < HISTORY_ROW_BYTES) {
                blob.extend_from_slice(&pending.bytes[batch[end].body.clone()]);
                end += 1;
            }
            let last = batch[end - 1].at_ms;
            let n = i64::try_from(end - start).unwrap_or(i64::MAX);
            insert
                .execute(params![key.0, key.1, key.2, last, n, &blob])
                .map_err(sql)?;
            start = end;
        }
    }
    Ok(())
}

/// Buffered messages grouped by conversation, each group in order.
fn conversations(pending: &Pending) -> Vec<(Conversation<'_>, Vec<&PendingRow>)> {
    let mut at: std::collections::HashMap<Conversation<'_>, usize> = Default::default();
    let mut groups: Vec<(Conversation<'_>, Vec<&PendingRow>)> = Vec::new();
    let mut last = None;
    for m in &pending.rows {
        let key = pending.key(m);
        // A conversation's messages tend to come one after another: most need no lookup.
        let i = match last {
            Some((k, i)) if k == key => i,
            _ => *at.entry(key).or_insert_with(|| {
                groups.push((key, Vec::new()));
                groups.len() - 1
            }),
        };
        groups[i].1.push(m);
        last = Some((key, i));
    }
    groups
}

/// One batch of a conversation, as stored: per message its time (ms, 8 bytes LE), its
/// sender and its text (each a 4-byte LE length and UTF-8 bytes).
#[cfg(test)]
fn encode(batch: &[&Message]) -> Vec<u8> {
    let mut out = Vec::new();
    for m in batch {
        encode_one(&mut out, ms(m.at), &m.from, &m.text);
    }
    out
}

/// Appends one message's stored form to `out` (see `encode`).
fn encode_one(out: &mut Vec<u8>, at_ms: i64, from: &str, text: &str) {
    out.extend_from_slice(&at_ms.to_le_bytes());
    for field in [from, text] {
        out.extend_from_slice(&u32::try_from(field.len()).unwrap_or(u32::MAX).to_le_bytes());
        out.extend_from_slice(field.as_bytes());
    }
}

/// The messages of a stored batch of conversation `key` (a damaged batch yields what could
/// be read of it).
fn decode(mut blob: &[u8], key: Conversation<'_>) -> Vec<Message> {
    fn take<'b>(blob: &mut &'b [u8], n: usize) -> Option<&'b [u8]> {
        let (head, rest) = (blob.get(..n)?, blob.get(n..)?);
        *blob = rest;
        Some(head)
    }
    fn text(blob: &mut &[u8]) -> Option<String> {
        let len = u32::from_le_bytes(take(blob, 4)?.try_into().ok()?);
        let bytes = take(blob, usize::try_from(len).ok()?)?;
        String::from_utf8(bytes.to_vec()).ok()
    }
    let mut out = Vec::new();
    while !blob.is_empty() {
        let Some(at) = take(&mut blob, 8).and_then(|b| b.try_into().ok()) else {
            break;
        };
        let (Some(from), Some(text)) = (text(&mut blob), text(&mut blob)) else {
            break;
        };
        let to = match key.0 {
            0 if from == key.1 => Scope::User(key.2.to_owned()),
            0 => Scope::User(key.1.to_owned()),
            1 => Scope::Group(key.1.to_owned()),
            _ => Scope::Everyone,
        };
        out.push(Message {
            from,
            to,
            text,
            at: time(i64::from_le_bytes(at)),
        });
    }
    out
}

/// The columns `file_row` reads, in its order.
const FILE_COLUMNS: &str = "id, sender, target, filename, saved_as, size, at_ms, blake3";

fn file_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<FileRecord> {
    Ok(FileRecord {
        id: u64::try_from(row.get::<_, i64>(0)?).unwrap_or(0),
        sender: row.get(1)?,
        target: row.get(2)?,
        filename: row.get(3)?,
        saved_as: row.get(4)?,
        size: u64::try_from(row.get::<_, i64>(5)?).unwrap_or(0),
        at: time(row.get(6)?),
        blake3: row.get(7)?,
    })
}

impl Store for SqliteStore {
    fn account(&self, name: &str) -> StoreFuture<'_, Option<Account>> {
        let name = name.to_owned();
        self.read(move |conn| {
            conn.query_row(
                "SELECT name, password_hash, created_ms FROM accounts WHERE name = ?1",
                [&name],
                |row| {
                    Ok(Account {
                        name: row.get(0)?,
                        password_hash: row.get(1)?,
                        created: time(row.get(2)?),
                    })
                },
            )
            .optional()
            .map_err(sql)
        })
    }

    fn create_account(&self, account: Account) -> StoreFuture<'_, ()> {
        self.write(move |conn| {
            let added = conn
                .execute(
                    "INSERT OR IGNORE INTO accounts (name, password_hash, created_ms) VALUES (?1, ?2, ?3)",
                    params![account.name, account.password_hash, ms(account.created)],
                )
                .map_err(sql)?;
            match added {
                0 => Err(StoreError::Exists(format!("account '{}'", account.name))),
                _ => Ok(()),
            }
        })
    }

    fn set_password(&self, name: &str, password_hash: String) -> StoreFuture<'_, bool> {
        let name = name.to_owned();
        self.write(move |conn| {
            conn.execute(
                "UPDATE accounts SET password_hash = ?2 WHERE name = ?1",
                params![name, password_hash],
            )
            .map(|n| n > 0)
            .map_err(sql)
        })
    }

    fn remove_account(&self, name: &str) -> StoreFuture<'_, bool> {
        let name = name.to_owned();
        self.write(move |conn| {
            let gone = conn
                .execute("DELETE FROM accounts WHERE name = ?1", [&name])
                .map_err(sql)?;
            for table in ["memberships", "inbox", "inbox_sizes", "queued_files"] {
                conn.execute(&format!("DELETE FROM {table} WHERE user = ?1"), [&name])
                    .map_err(sql)?;
            }
            conn.execute(
                "DELETE FROM history WHERE scope_kind = 0 AND (a = ?1 OR b = ?1)",
                [&name],
            )
            .map_err(sql)?;
            Ok(gone > 0)
        })
    }

    fn accounts(&self) -> StoreFuture<'_, Vec<Account>> {
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT name, password_hash, created_ms FROM accounts ORDER BY name",
                )
                .map_err(sql)?;
            let rows = stmt
                .query_map([], |row| {
                    Ok(Account {
                        name: row.get(0)?,
                        password_hash: row.get(1)?,
                        created: time(row.get(2)?),
                    })
                })
                .map_err(sql)?;
            rows.collect::<Result<_, _>>().map_err(sql)
        })
    }

    fn memberships(&self) -> StoreFuture<'_, Vec<(String, String)>> {
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached("SELECT user, grp FROM memberships ORDER BY rowid")
                .map_err(sql)?;
            let rows = stmt
                .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
                .map_err(sql)?;
            rows.collect::<Result<_, _>>().map_err(sql)
        })
    }

    fn add_membership(&self, user: &str, group: &str) -> StoreFuture<'_, ()> {
        let (user, group) = (user.to_owned(), group.to_owned());
        self.write(move |conn| {
            conn.execute(
                "INSERT OR IGNORE INTO memberships (user, grp) VALUES (?1, ?2)",
                params![user, group],
            )
            .map(drop)
            .map_err(sql)
        })
    }

    fn remove_membership(&self, user: &str, group: &str) -> StoreFuture<'_, ()> {
        let (user, group) = (user.to_owned(), group.to_owned());
        self.write(move |conn| {
            conn.execute(
                "DELETE FROM memberships WHERE user = ?1 AND grp = ?2",
                params![user, group],
            )
            .map(drop)
            .map_err(sql)
        })
    }

    fn push_inbox(
        &self,
        users: Vec<String>,
        message: Message,
        max: u64,
    ) -> StoreFuture<'_, Vec<String>> {
        self.write(move |conn| {
            let (kind, scope) = scope_parts(&message.to);
            let mut full = Vec::new();
            for user in users {
                let n: i64 = conn
                    .prepare_cached("SELECT n FROM inbox_sizes WHERE user = ?1")
                    .and_then(|mut stmt| stmt.query_row([&user], |row| row.get(0)).optional())
                    .map_err(sql)?
                    .unwrap_or(0);
                if u64::try_from(n).unwrap_or(0) >= max {
                    full.push(user);
                    continue;
                }
                conn.prepare_cached(
                    "INSERT INTO inbox (user, sender, scope_kind, scope, text, at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )
                .and_then(|mut stmt| {
                    stmt.execute(params![user, message.from, kind, scope, message.text, ms(message.at)])
                })
                .map_err(sql)?;
                conn.prepare_cached(
                    "INSERT INTO inbox_sizes (user, n) VALUES (?1, 1) \
                     ON CONFLICT (user) DO UPDATE SET n = n + 1",
                )
                .and_then(|mut stmt| stmt.execute([&user]))
                .map_err(sql)?;
            }
            Ok(full)
        })
    }

    fn peek_inbox(&self, user: &str, after: u64, limit: usize) -> StoreFuture<'_, Vec<Queued>> {
        let user = user.to_owned();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT sender, scope_kind, scope, text, at_ms, id FROM inbox \
                     WHERE user = ?1 AND id > ?2 ORDER BY id LIMIT ?3",
                )
                .map_err(sql)?;
            let rows = stmt
                .query_map(params![user, int(after), limit], |row| {
                    Ok(Queued {
                        message: message_row(row)?,
                        id: u64::try_from(row.get::<_, i64>(5)?).unwrap_or(0),
                    })
                })
                .map_err(sql)?;
            rows.collect::<Result<_, _>>().map_err(sql)
        })
    }

    fn drop_inbox(&self, user: &str, upto: u64) -> StoreFuture<'_, u64> {
        let user = user.to_owned();
        self.write(move |conn| {
            let gone = conn
                .execute(
                    "DELETE FROM inbox WHERE user = ?1 AND id <= ?2",
                    params![user, int(upto)],
                )
                .map_err(sql)?;
            conn.execute(
                "UPDATE inbox_sizes SET n = max(n - ?2, 0) WHERE user = ?1",
                params![user, i64::try_from(gone).unwrap_or(i64::MAX)],
            )
            .map_err(sql)?;
            Ok(u64::try_from(gone).unwrap_or(u64::MAX))
        })
    }

    fn append_history(&self, message: MessageRef<'_>) -> Option<StoreFuture<'_, ()>> {
        use std::sync::atomic::Ordering;
        let (rows, bytes) = {
            let mut buffer = self.history.lock();
            buffer.push(message);
            (buffer.rows.len(), buffer.bytes.len())
        };
        // A flush is queued with the first row after the last one started; and when the
        // buffer is full the appender waits for a flush of its own (flow control, and a
        // flush that failed to be queued cannot leave rows behind for long).
        let full = rows >= HISTORY_BUFFER || bytes >= HISTORY_BUFFER_BYTES;
        if full {
            return Some(self.flush_history());
        }
        if self.history.flushing.swap(true, Ordering::AcqRel) {
            return None;
        }
        // Not sooner than HISTORY_PACE after the last flush: then later.
        let last = *self
            .history
            .last_flush
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let wait = last.map_or(Duration::ZERO, |t| HISTORY_PACE.saturating_sub(t.elapsed()));
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) if !wait.is_zero() => {
                // Weak: a flush that waits keeps no store open (a store dropped meanwhile
                // flushed the buffer itself).
                let writer = self.writer().map(|w| w.downgrade());
                let history = self.history.clone();
                runtime.spawn(async move {
                    tokio::time::sleep(wait).await;
                    let Some(writer) = writer.and_then(|w| w.upgrade()) else {
                        return;
                    };
                    let (queued, _) = queue_history_flush_on(Some(writer), history);
                    if let Err(e) = queued.await {
                        tracing::warn!("[STORE] cannot write the history: {e}");
                    }
                });
                None
            }
            // Waited for until queued, not until committed (a history row costs no commit
            // wait).
            _ => Some(self.queue_history_flush().0),
        }
    }

    fn history(
        &self,
        me: &str,
        scope: &Scope,
        limit: usize,
        since: SystemTime,
    ) -> StoreFuture<'_, Vec<Message>> {
        let key = conversation(me, scope);
        let key = (key.0, key.1.to_owned(), key.2.to_owned());
        let since = ms(since);
        // Appends are not waited for: first write every one made so far.
        let barrier = self.flush_history();
        let read = self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT messages FROM history WHERE scope_kind = ?1 AND a = ?2 AND b = ?3 \
                     AND last_ms >= ?4 ORDER BY id DESC",
                )
                .map_err(sql)?;
            let mut rows = stmt
                .query(params![key.0, key.1, key.2, since])
                .map_err(sql)?;
            // Newest batch first; each batch is in order.
            let mut batches: Vec<Vec<Message>> = Vec::new();
            let mut found = 0;
            while found < limit {
                let Some(row) = rows.next().map_err(sql)? else {
                    break;
                };
                let blob: Vec<u8> = row.get(0).map_err(sql)?;
                let mut batch = decode(&blob, (key.0, &key.1, &key.2));
                batch.retain(|m| ms(m.at) >= since);
                found += batch.len();
                batches.push(batch);
            }
            let mut all: Vec<Message> = batches.into_iter().rev().flatten().collect();
            let skip = all.len().saturating_sub(limit);
            all.drain(..skip);
            Ok(all)
        });
        Box::pin(async move {
            barrier.await?;
            read.await
        })
    }

    fn prune_history(&self, before: SystemTime) -> StoreFuture<'_, u64> {
        // A bounded batch of rows per transaction, so inbox writes never wait long behind
        // a big prune. A row goes when its newest message is older than `before`.
        const BATCH: i64 = 1000;
        let before = ms(before);
        Box::pin(async move {
            let mut gone = 0u64;
            loop {
                let (rows, messages) = self
                    .write(move |conn| {
                        let messages: i64 = conn
                            .query_row(
                                "SELECT coalesce(sum(n), 0) FROM (SELECT n FROM history \
                                 WHERE last_ms < ?1 ORDER BY last_ms LIMIT ?2)",
                                params![before, BATCH],
                                |row| row.get(0),
                            )
                            .map_err(sql)?;
                        let rows = conn
                            .execute(
                                "DELETE FROM history WHERE id IN (SELECT id FROM history \
                                 WHERE last_ms < ?1 ORDER BY last_ms LIMIT ?2)",
                                params![before, BATCH],
                            )
                            .map_err(sql)?;
                        Ok((rows, messages))
                    })
                    .await?;
                gone += u64::try_from(messages).unwrap_or(0);
                if (rows as i64) < BATCH {
                    return Ok(gone);
                }
            }
        })
    }

    fn record_file(&self, file: FileRecord) -> StoreFuture<'_, u64> {
        self.write(move |conn| {
            conn.execute(
                "INSERT INTO files (upload_id, sender, target, filename, saved_as, size, at_ms, blake3) \
                 VALUES (0, ?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    file.sender,
                    file.target,
                    file.filename,
                    file.saved_as,
                    int(file.size),
                    ms(file.at),
                    file.blake3
                ],
            )
            .map_err(sql)?;
            Ok(u64::try_from(conn.last_insert_rowid()).unwrap_or(0))
        })
    }

    fn files_of(
        &self,
        user: &str,
        targets: Vec<String>,
        limit: usize,
    ) -> StoreFuture<'_, Vec<FileRecord>> {
        let user = user.to_owned();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(move |conn| {
            // The user's own uploads, and each target's: one index range each.
            let mut found: Vec<FileRecord> = Vec::new();
            let mut by_sender = conn
                .prepare_cached(&format!(
                    "SELECT {FILE_COLUMNS} FROM files WHERE sender = ?1 ORDER BY id DESC LIMIT ?2"
                ))
                .map_err(sql)?;
            let rows = by_sender
                .query_map(params![user, limit], file_row)
                .map_err(sql)?;
            found.extend(rows.collect::<Result<Vec<_>, _>>().map_err(sql)?);
            let mut by_target = conn
                .prepare_cached(&format!(
                    "SELECT {FILE_COLUMNS} FROM files WHERE target = ?1 ORDER BY id DESC LIMIT ?2"
                ))
                .map_err(sql)?;
            for target in &targets {
                let rows = by_target
                    .query_map(params![target, limit], file_row)
                    .map_err(sql)?;
                found.extend(rows.collect::<Result<Vec<_>, _>>().map_err(sql)?);
            }
            found.sort_unstable_by_key(|f| std::cmp::Reverse(f.id));
            found.dedup_by_key(|f| f.id);
            found.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
            found.reverse();
            Ok(found)
        })
    }

    fn file(&self, id: u64) -> StoreFuture<'_, Option<FileRecord>> {
        self.read(move |conn| {
            conn.prepare_cached(&format!("SELECT {FILE_COLUMNS} FROM files WHERE id = ?1"))
                .and_then(|mut stmt| stmt.query_row([int(id)], file_row).optional())
                .map_err(sql)
        })
    }

    fn queue_file(&self, user: &str, id: u64) -> StoreFuture<'_, ()> {
        let user = user.to_owned();
        self.write(move |conn| {
            conn.execute(
                "INSERT OR IGNORE INTO queued_files (user, file) VALUES (?1, ?2)",
                params![user, int(id)],
            )
            .map(drop)
            .map_err(sql)
        })
    }

    fn queued_files(&self, user: &str) -> StoreFuture<'_, Vec<FileRecord>> {
        let user = user.to_owned();
        self.read(move |conn| {
            let columns = FILE_COLUMNS.replace(", ", ", f.");
            let mut stmt = conn
                .prepare_cached(&format!(
                    "SELECT f.{columns} FROM queued_files q JOIN files f ON f.id = q.file \
                     WHERE q.user = ?1 ORDER BY q.file"
                ))
                .map_err(sql)?;
            let rows = stmt.query_map([&user], file_row).map_err(sql)?;
            rows.collect::<Result<_, _>>().map_err(sql)
        })
    }

    fn drop_queued_file(&self, user: &str, id: u64) -> StoreFuture<'_, ()> {
        let user = user.to_owned();
        self.write(move |conn| {
            conn.execute(
                "DELETE FROM queued_files WHERE user = ?1 AND file = ?2",
                params![user, int(id)],
            )
            .map(drop)
            .map_err(sql)
        })
    }

    fn bytes_stored(&self, user: &str) -> StoreFuture<'_, u64> {
        let user = user.to_owned();
        self.read(move |conn| {
            let bytes: Option<i64> = conn
                .query_row("SELECT bytes FROM stored WHERE user = ?1", [&user], |row| {
                    row.get(0)
                })
                .optional()
                .map_err(sql)?;
            Ok(u64::try_from(bytes.unwrap_or(0)).unwrap_or(0))
        })
    }

    fn add_bytes_stored(&self, user: &str, delta: i64) -> StoreFuture<'_, ()> {
        let user = user.to_owned();
        self.write(move |conn| {
            conn.execute(
                "INSERT INTO stored (user, bytes) VALUES (?1, max(?2, 0)) \
                 ON CONFLICT (user) DO UPDATE SET bytes = max(bytes + ?2, 0)",
                params![user, delta],
            )
            .map(drop)
            .map_err(sql)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_history_keeps_each_message_and_its_conversation_across_a_restore() {
        let at = UNIX_EPOCH + Duration::from_millis(1_700_000_000_000);
        let m = |from: &str, to: Scope, text: &str| Message {
            from: from.into(),
            to,
            text: text.into(),
            at,
        };
        let first = [
            m("bob", Scope::User("alice".into()), "hi"),
            m("alice", Scope::Group("devs".into()), "all"),
        ];
        let later = m("alice", Scope::User("bob".into()), "hey");
        let (mut failed, mut newer) = (Pending::default(), Pending::default());
        first.iter().for_each(|x| failed.push(x.as_ref()));
        newer.push(later.as_ref());
        // A failed flush's rows go back in front of what came meanwhile.
        failed.append(newer);
        let got: Vec<(Conversation<'_>, Vec<Message>)> = failed
            .rows
            .iter()
            .map(|r| {
                let key = failed.key(r);
                (key, decode(&failed.bytes[r.body.clone()], key))
            })
            .collect();
        assert_eq!(got[0], ((0, "alice", "bob"), vec![first[0].clone()]));
        assert_eq!(got[1], ((1, "devs", ""), vec![first[1].clone()]));
        assert_eq!(got[2], ((0, "alice", "bob"), vec![later.clone()]));
        let groups = conversations(&failed);
        assert_eq!(groups.len(), 2, "one group per conversation");
        assert_eq!(groups[0].1.len(), 2, "alice and bob's, in order");
    }

    #[test]
    fn a_history_batch_decodes_to_what_was_encoded_and_a_damaged_one_to_a_prefix() {
        let at = |s| UNIX_EPOCH + Duration::from_millis(s);
        let scope = Scope::User("alice".into());
        let key = conversation("bob", &scope);
        assert_eq!(key, (0, "alice", "bob"));
        let batch = vec![
            Message {
                from: "alice".into(),
                to: Scope::User("bob".into()),
                text: "hi, \u{1F600} 'quoted'".into(),
                at: at(5),
            },
            Message {
                from: "bob".into(),
                to: Scope::User("alice".into()),
                text: String::new(),
                at: at(7),
            },
        ];
        let blob = encode(&batch.iter().collect::<Vec<_>>());
        assert_eq!(decode(&blob, key), batch);
        for cut in 0..blob.len() {
            let some = decode(&blob[..cut], key);
            assert!(some.len() < 2 && batch.starts_with(&some), "cut at {cut}");
        }
    }

    #[tokio::test]
    async fn in_memory_it_keeps_the_store_contract() {
        let store = SqliteStore::open(Path::new(":memory:")).expect("opens");
        super::super::contract::check(&store).await;
    }

    #[tokio::test]
    async fn in_a_file_it_keeps_the_store_contract_and_everything_survives_a_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("relaychat.db");
        {
            let store = SqliteStore::open(&path).expect("opens");
            super::super::contract::check(&store).await;
            store.add_bytes_stored("carol", 42).await.expect("ok");
        }
        let store = SqliteStore::open(&path).expect("reopens");
        assert_eq!(store.bytes_stored("carol").await.expect("read"), 42);
        assert!(store.account("alice").await.expect("read").is_some());
        assert_eq!(
            store.memberships().await.expect("read"),
            [("bob".to_owned(), "devs".to_owned())]
        );
    }

    #[tokio::test]
    async fn history_held_back_by_the_pace_is_written_when_the_store_is_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("relaychat.db");
        let said = |text: &'static str| MessageRef {
            from: "alice",
            to: ScopeRef::User("bob"),
            text,
            at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        };
        let to_bob = Scope::User("bob".into());
        let since = SystemTime::UNIX_EPOCH;
        {
            let store = SqliteStore::open(&path).expect("opens");
            // The first flush goes at once; read back, it has committed.
            assert!(store.append_history(said("one")).is_some());
            let kept = store
                .history("alice", &to_bob, 10, since)
                .await
                .expect("read");
            assert_eq!(kept.len(), 1);
            // The next, right after it, waits for the pace (then there is nothing to await),
            // and the store goes before it is due (on this one thread, it cannot run).
            for text in ["two", "three"] {
                drop(store.append_history(said(text)));
            }
        }
        let store = SqliteStore::open(&path).expect("reopens");
        let kept = store
            .history("alice", &to_bob, 10, since)
            .await
            .expect("read");
        let texts: Vec<&str> = kept.iter().map(|m| m.text.as_str()).collect();
        assert_eq!(texts, ["one", "two", "three"]);
    }

    #[tokio::test]
    async fn history_held_back_by_the_pace_is_written_soon_without_a_reader() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("relaychat.db");
        let store = SqliteStore::open(&path).expect("opens");
        let said = MessageRef {
            from: "alice",
            to: ScopeRef::Group("devs"),
            text: "hi",
            at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        };
        for _ in 0..3 {
            if let Some(pending) = store.append_history(said) {
                pending.await.expect("queued");
            }
        }
        // Another connection sees the rows once the paced flush has committed.
        let other = open_connection(&path, true).expect("opens");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let n: i64 = other
                .query_row("SELECT coalesce(sum(n), 0) FROM history", [], |r| r.get(0))
                .expect("reads");
            if n == 3 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{n} of 3 rows written"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Queues a durable job that holds the writer until the sender returned is used (or
    /// dropped, or 10 s pass).
    async fn hold_the_writer(store: &SqliteStore) -> std::sync::mpsc::Sender<()> {
        let (release, held) = std::sync::mpsc::channel::<()>();
        let blocker = enqueue_on(
            store.writer(),
            true,
            move |_| {
                let _ = held.recv_timeout(Duration::from_secs(10));
                Ok(())
            },
            |_: Result<(), StoreError>| {},
        );
        blocker.await.expect("queued");
        release
    }

    #[test]
    fn history_held_back_is_written_on_drop_even_when_the_writer_queue_is_full() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("relaychat.db");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let store = SqliteStore::open(&path).expect("opens");
        let said = |text: &'static str| MessageRef {
            from: "alice",
            to: ScopeRef::User("bob"),
            text,
            at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        };
        rt.block_on(async {
            // The first flush goes at once; the next row waits for the pace.
            if let Some(first) = store.append_history(said("one")) {
                first.await.expect("queued");
            }
            // The writer is held, and its queue filled behind it.
            let release = hold_the_writer(&store).await;
            while store.writer().expect("open").capacity() > 0 {
                let noop = enqueue_on(
                    store.writer(),
                    true,
                    |_| Ok(()),
                    |_: Result<(), StoreError>| {},
                );
                noop.await.expect("queued");
            }
            drop(store.append_history(said("two")));
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(100));
                let _ = release.send(());
            });
            drop(store);
        });
        let other = open_connection(&path, true).expect("opens");
        let n: i64 = other
            .query_row("SELECT coalesce(sum(n), 0) FROM history", [], |r| r.get(0))
            .expect("reads");
        assert_eq!(n, 2, "both rows are in the history");
    }

    #[tokio::test]
    async fn only_commits_that_need_not_be_durable_skip_the_sync() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SqliteStore::open(&dir.path().join("relaychat.db")).expect("opens");
        // Each job reads the synchronous mode its commit runs under (1 NORMAL, 2 FULL).
        let mode = |durable: bool| {
            let (tx, rx) = oneshot::channel();
            let queued = enqueue_on(
                store.writer(),
                durable,
                |conn| {
                    conn.query_row("PRAGMA synchronous", [], |r| r.get::<_, i64>(0))
                        .map_err(sql)
                },
                move |mode| drop(tx.send(mode)),
            );
            async move {
                queued.await.expect("queued");
                rx.await.expect("ran").expect("read")
            }
        };
        assert_eq!(mode(false).await, 1, "history alone: NORMAL");
        assert_eq!(mode(true).await, 2, "an inbox or account write: FULL");
        assert_eq!(mode(false).await, 1, "and back");
        // Queued together they share a commit: one durable job makes it FULL for both. A
        // durable job holds the writer until both are queued (whichever batch it shares
        // with them, theirs is durable too).
        let release = hold_the_writer(&store).await;
        let (a, b) = (mode(false), mode(true));
        release.send(()).expect("the writer waits");
        assert_eq!(tokio::join!(a, b), (2, 2));
    }

    #[test]
    fn an_empty_file_is_migrated_to_the_current_schema() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("empty.db");
        std::fs::write(&path, b"").expect("write");
        drop(SqliteStore::open(&path).expect("opens"));
        let conn = Connection::open(&path).expect("open");
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |row| row.get(0))
            .expect("version");
        assert_eq!(version, SCHEMA_VERSION);
    }

    #[tokio::test]
    async fn a_database_of_every_earlier_version_is_migrated_and_keeps_its_rows() {
        for version in 1..SCHEMA_VERSION {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("old.db");
            {
                let conn = Connection::open(&path).expect("open");
                for sql in &MIGRATIONS[..usize::try_from(version).expect("small")] {
                    conn.execute_batch(sql).expect("old schema");
                }
                conn.pragma_update(None, "user_version", version)
                    .expect("set");
                conn.execute(
                    "INSERT INTO files (upload_id, sender, target, filename, saved_as, size, at_ms) \
                     VALUES (1, 'alice', 'bob', 'a.txt', 'received_from_alice_a.txt', 3, 0)",
                    [],
                )
                .expect("old row");
                conn.execute("INSERT INTO stored (user, bytes) VALUES ('alice', 3)", [])
                    .expect("old row");
                conn.execute(
                    "INSERT INTO inbox (user, sender, scope_kind, scope, text, at_ms) \
                     VALUES ('bob', 'alice', 0, 'bob', 'kept', 0)",
                    [],
                )
                .expect("old row");
            }
            let store = SqliteStore::open(&path).expect("migrates");
            let files = store.files_of("alice", Vec::new(), 10).await.expect("read");
            assert_eq!(files.len(), 1, "from version {version}");
            assert_eq!(files[0].filename, "a.txt");
            assert_eq!(files[0].blake3, "", "no hash was kept then");
            assert_eq!(store.bytes_stored("alice").await.expect("read"), 3);
            let inbox = store.peek_inbox("bob", 0, 10).await.expect("read");
            assert_eq!(inbox.len(), 1);
            let message = |text: &str| Message {
                from: "alice".into(),
                to: Scope::User("bob".into()),
                text: text.into(),
                at: SystemTime::now(),
            };
            let full = store
                .push_inbox(vec!["bob".into()], message("more"), 1)
                .await
                .expect("ok");
            assert_eq!(full, ["bob"], "the old entry counts against the cap");
            drop(store);
            let conn = Connection::open(&path).expect("open");
            let now: i64 = conn
                .query_row("PRAGMA user_version", [], |row| row.get(0))
                .expect("version");
            assert_eq!(now, SCHEMA_VERSION);
        }
    }

    #[test]
    fn a_second_server_on_the_same_database_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("relaychat.db");
        let first = SqliteStore::open(&path).expect("opens");
        let second = SqliteStore::open(&path).err().expect("refused");
        assert!(
            second
                .to_string()
                .contains("in use by another relaychat server"),
            "{second}"
        );
        drop(first);
        SqliteStore::open(&path).expect("free again");
    }

    #[test]
    fn a_newer_or_corrupt_database_is_refused_and_left_as_it_was() {
        let dir = tempfile::tempdir().expect("tempdir");
        let newer = dir.path().join("newer.db");
        {
            let conn = Connection::open(&newer).expect("open");
            conn.pragma_update(None, "user_version", 99).expect("set");
        }
        let before = std::fs::read(&newer).expect("read");
        let err = SqliteStore::open(&newer).err().expect("refused");
        assert!(
            err.to_string()
                .contains("from a newer relaychat (schema version 99"),
            "{err}"
        );
        assert_eq!(std::fs::read(&newer).expect("read"), before);

        let garbage = dir.path().join("garbage.db");
        let junk: Vec<u8> = (0..8192u32).map(|i| (i * 7919 % 251) as u8).collect();
        std::fs::write(&garbage, &junk).expect("write");
        let err = SqliteStore::open(&garbage).err().expect("refused");
        assert!(
            err.to_string()
                .contains("is not a relaychat database, or is corrupt"),
            "{err}"
        );
        assert_eq!(std::fs::read(&garbage).expect("read"), junk);
    }

    #[test]
    fn another_programs_database_is_refused_and_left_as_it_was() {
        let dir = tempfile::tempdir().expect("tempdir");
        let theirs = dir.path().join("theirs.db");
        {
            let conn = Connection::open(&theirs).expect("open");
            conn.execute_batch("CREATE TABLE notes (body TEXT); INSERT INTO notes VALUES ('x');")
                .expect("their schema");
        }
        let before = std::fs::read(&theirs).expect("read");
        let err = SqliteStore::open(&theirs).err().expect("refused");
        assert!(
            err.to_string().contains("another program's database"),
            "{err}"
        );
        assert_eq!(std::fs::read(&theirs).expect("read"), before);
    }

    #[tokio::test]
    async fn a_path_is_a_path_whatever_characters_it_holds() {
        let dir = tempfile::tempdir().expect("tempdir");
        let odd = dir.path().join("100%41 ?x#y.db");
        {
            let store = SqliteStore::open(&odd).expect("opens");
            store.add_bytes_stored("alice", 5).await.expect("ok");
        }
        assert!(odd.is_file(), "the file is the one named");
        assert!(!dir.path().join("100A ").exists());
        let store = SqliteStore::open(&odd).expect("reopens");
        assert_eq!(store.bytes_stored("alice").await.expect("read"), 5);
    }

    #[tokio::test]
    async fn many_writes_at_once_are_committed_together_and_all_land() {
        let store = Arc::new(SqliteStore::open(Path::new(":memory:")).expect("opens"));
        let mut writes = Vec::new();
        for i in 0..500 {
            let store = store.clone();
            writes.push(tokio::spawn(async move {
                store.add_bytes_stored("alice", 1).await.expect("ok");
                i
            }));
        }
        for w in writes {
            w.await.expect("task");
        }
        assert_eq!(store.bytes_stored("alice").await.expect("read"), 500);
    }
}
