//! Moving file bytes, for the server's uploads and the client's downloads alike: a file
//! written under a temporary name and renamed into place only once whole ([`Partial`]),
//! and the one loop that streams a body from a connection into it ([`receive_rest`]),
//! reporting progress and hashing it (BLAKE3) as it goes.

use std::io::ErrorKind::InvalidData;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::AsyncRead;
use tokio_util::sync::CancellationToken;

use crate::compress::Inflate;
use crate::flow::Ended;
use crate::net::{LineReader, Spare};
use crate::protocol::names::{numbered, MAX_FILENAME_BYTES, TMP_SUFFIX};

/// How many numbered names a saved file may try before giving up.
const MAX_NUMBERED: u32 = 10_000;

/// Bytes moved per read or write of a file body.
pub(crate) const BODY_CHUNK: usize = 256 * 1024;

/// Bytes a followed [`Partial`] keeps in memory once they are on disk, for the readers
/// that keep up (see [`Recent`]).
pub(crate) const RECENT_BYTES: usize = 4 * BODY_CHUNK;
/// Bytes a followed [`Partial`] holds for its followers (see [`Recent`]) beyond what waits
/// for the disk and [`RECENT_BYTES`]: past this, the appender waits for the slowest.
const FOLLOWED_SLACK: usize = 4 * BODY_CHUNK;
/// How long an appender waits for a follower that holds it up before that follower is let
/// go (it reads the file from then on). Longer than a file connection's first forward may
/// wait for the greeting to go alone (100 ms).
const PATIENCE: Duration = Duration::from_millis(250);
/// Bytes per write to disk: at least this ...
const WRITE_MIN: usize = 4 * BODY_CHUNK;
/// ... and at most this. Large writes cost the server less (4 MiB against 1 MiB direct
/// writes: 0.70-0.75 against 0.90-0.93 server CPU-seconds per GB relayed, 3 pairs).
const WRITE_MAX: usize = 16 * BODY_CHUNK;
/// What all the spools together may hold waiting for the disk: each open spool gets an
/// equal share, between two writes of [`WRITE_MIN`] and two of [`WRITE_MAX`].
const SPOOL_BUDGET: usize = 64 << 20;
/// Followed [`Partial`]s (spools) open now.
static SPOOLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
/// Chunks a [`Partial`] holds at most, whatever their size (a sender of tiny segments
/// waits for the disk sooner, and the window stays quick to search).
const MAX_CHUNKS: usize = 256;

/// The newest bytes of a file being written, in memory: every byte not yet on disk, and
/// (for a followed file) the last [`RECENT_BYTES`] that are, or more for its followers.
///
/// A reader that keeps up (a [`Follower`]) takes its bytes from here and never reads them
/// back from the file: the bytes it has not taken stay (up to [`Chunks::followed_max`], after
/// which the appender waits for it, up to [`PATIENCE`] at a time). One that falls behind
/// further is let go and finds its bytes on disk, since only bytes already written leave.
#[derive(Default)]
pub(crate) struct Recent {
    inner: std::sync::Mutex<Chunks>,
    /// Told after each write to disk, when the writer stops and when a follower moves on.
    moved: tokio::sync::Notify,
}

/// One reader following a [`Recent`]: where it is, so that the bytes it still needs stay
/// in memory while it keeps up. Dropped, it holds nothing.
pub(crate) struct Follower {
    recent: Arc<Recent>,
    /// Its entry in [`Chunks::followers`]; `None` before it reads from memory, or once it
    /// was let go.
    id: Option<u64>,
}

#[derive(Default)]
struct Chunks {
    /// The file offset of `chunks[0]`'s first byte.
    start: u64,
    /// In file order, each as it was read from the connection (shared, not copied).
    chunks: std::collections::VecDeque<Bytes>,
    /// Bytes in `chunks`.
    held: usize,
    /// The bytes before this offset are on disk.
    on_disk: u64,
    /// Bytes kept in memory once on disk (0 unless followed).
    keep: usize,
    /// A writer is draining the unwritten chunks to disk.
    writing: bool,
    /// The first write error: every later write and flush fails with it.
    failed: Option<(std::io::ErrorKind, String)>,
    /// The followers that keep up: id and the offset each reads next.
    followers: Vec<(u64, u64)>,
    /// The next follower's id.
    next_id: u64,
}

impl Chunks {
    fn end(&self) -> u64 {
        self.start + self.held as u64
    }

    /// Bytes per write to disk: [`WRITE_MIN`] for a file nobody follows, else the spool's
    /// share of [`SPOOL_BUDGET`] for two writes.
    fn write_size(&self) -> usize {
        if self.keep == 0 {
            return WRITE_MIN;
        }
        let spools = SPOOLS.load(std::sync::atomic::Ordering::Relaxed).max(1);
        (SPOOL_BUDGET / 2 / spools).clamp(WRITE_MIN, WRITE_MAX) / DIRECT_ALIGN * DIRECT_ALIGN
    }

    /// Bytes that may wait for the disk: two writes' worth, so that the next fills while
    /// one is on its way.
    fn unwritten_max(&self) -> u64 {
        2 * self.write_size() as u64
    }

    /// Bytes that may be held for the followers.
    fn followed_max(&self) -> usize {
        RECENT_BYTES + 2 * self.write_size() + FOLLOWED_SLACK
    }

    /// Too much is waiting for the disk, or for a follower: the appender waits (a slow disk
    /// slows the sender rather than fill memory).
    fn backlog(&self) -> bool {
        self.end() - self.on_disk > self.unwritten_max()
            || self.chunks.len() >= MAX_CHUNKS
            || self.held > self.followed_max()
    }

    /// Where the slowest follower is (the end when there is none).
    fn slowest(&self) -> u64 {
        self.followers
            .iter()
            .map(|&(_, at)| at)
            .min()
            .unwrap_or(u64::MAX)
    }

    /// Lets the slowest follower go, if the followers (not the disk) hold the appender up.
    fn let_slowest_go(&mut self) {
        let disk_keeps_up = self.end() - self.on_disk <= self.unwritten_max();
        let slowest = self.slowest();
        if disk_keeps_up && self.held > self.followed_max() {
            self.followers.retain(|&(_, at)| at != slowest);
            self.trim_to_keep();
        }
    }

    /// [`Chunks::trim`] down to what the file keeps for its readers.
    fn trim_to_keep(&mut self) {
        self.trim(self.keep);
    }

    /// Lets go of the oldest chunks that are on disk and that no follower needs while
    /// more than `keep` bytes (or more than half of [`MAX_CHUNKS`] chunks) are held.
    fn trim(&mut self, keep: usize) {
        let needed = self.slowest();
        while let Some(first) = self.chunks.front() {
            let end = self.start + first.len() as u64;
            let len = first.len();
            let over = self.held > keep || self.chunks.len() > MAX_CHUNKS / 2;
            if !over || end > self.on_disk || end > needed {
                break;
            }
            self.chunks.pop_front();
            self.start += len as u64;
            self.held -= len;
        }
    }

    /// The chunks from `on_disk` on (not written yet), and the offset of the first.
    fn unwritten(&self) -> (u64, Vec<Bytes>) {
        let mut at = self.start;
        let mut out = Vec::new();
        for chunk in &self.chunks {
            let end = at + chunk.len() as u64;
            if end > self.on_disk {
                let skip = usize::try_from(self.on_disk.saturating_sub(at)).unwrap_or(0);
                out.push(chunk.slice(skip..));
            }
            at = end;
        }
        (self.on_disk.max(self.start), out)
    }
}

impl Recent {
    fn lock(&self) -> std::sync::MutexGuard<'_, Chunks> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A reader that will follow the file from offset `at` (see [`Follower::get`]): from
    /// now on, if those bytes are still in memory.
    pub(crate) fn follower(self: &Arc<Self>, at: u64) -> Follower {
        let mut follower = Follower {
            recent: self.clone(),
            id: None,
        };
        follower.get(at, 0, &mut Vec::new());
        follower
    }

    /// Up to `max` bytes from offset `at`, if they are still in memory: into `out` as the
    /// chunks that hold them (shared, not copied); returns how many. 0 means: read them
    /// from the file, where they are when `at` is below what was written.
    fn take(chunks: &mut Chunks, at: u64, max: usize, out: &mut Vec<Bytes>) -> usize {
        out.clear();
        if at < chunks.start {
            return 0;
        }
        let mut offset = chunks.start;
        let mut got = 0;
        for chunk in &chunks.chunks {
            let end = offset + chunk.len() as u64;
            if at < end && got < max {
                let from = usize::try_from(at.saturating_sub(offset)).unwrap_or(0);
                let to = chunk.len().min(from + (max - got));
                out.push(chunk.slice(from..to));
                got += to - from;
            }
            offset = end;
        }
        got
    }
}

impl Follower {
    /// As [`Recent::take`], for a reader that has taken every byte before `at`: the bytes
    /// from `at` on stay in memory for it while it keeps up, from the first call that finds
    /// them there.
    pub(crate) fn get(&mut self, at: u64, max: usize, out: &mut Vec<Bytes>) -> usize {
        let mut chunks = self.recent.lock();
        let me = self
            .id
            .and_then(|id| chunks.followers.iter().position(|f| f.0 == id));
        match me {
            Some(i) => {
                let moved = chunks.followers[i].1 != at;
                chunks.followers[i].1 = at;
                if moved {
                    chunks.trim_to_keep();
                    self.recent.moved.notify_one();
                }
            }
            // Let go (or never in): in again once it has caught up with the window.
            None if at >= chunks.start && at <= chunks.end() => {
                let id = chunks.next_id;
                chunks.next_id += 1;
                chunks.followers.push((id, at));
                self.id = Some(id);
            }
            None => self.id = None,
        }
        Recent::take(&mut chunks, at, max, out)
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            let mut chunks = self.recent.lock();
            chunks.followers.retain(|f| f.0 != id);
            chunks.trim_to_keep();
            self.recent.moved.notify_one();
        }
    }
}

/// Writes `chunks` at `offset`, several per system call (`pwritev`); returns how many bytes
/// were written, and how it ended.
fn write_all_at(file: &std::fs::File, chunks: &[Bytes], offset: u64) -> (u64, std::io::Result<()>) {
    use std::io::IoSlice;
    let mut written = 0u64;
    let (mut first, mut skip) = (0, 0);
    while first < chunks.len() {
        // At most IOV_MAX-safe slices per call.
        let slices: Vec<IoSlice<'_>> = std::iter::once(&chunks[first][skip..])
            .chain(chunks[first + 1..].iter().map(|c| &c[..]))
            .take(512)
            .map(IoSlice::new)
            .collect();
        let n = match rustix::io::pwritev(file, &slices, offset + written) {
            Ok(0) => return (written, Err(std::io::ErrorKind::WriteZero.into())),
            Ok(n) => n,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return (written, Err(e.into())),
        };
        written += n as u64;
        (first, skip) = crate::net::advance(chunks, (first, skip), n);
    }
    (written, Ok(()))
}

/// Offsets, lengths and memory of direct writes are multiples of this (the page size, which
/// every common device's logical block divides).
const DIRECT_ALIGN: usize = 4096;

/// Where a [`Partial`]'s bytes go: its file, and for a followed file (the server's spool)
/// the same file opened for direct I/O when the file system allows it.
///
/// Why direct: the readers that keep up take a followed file's bytes from memory
/// ([`Recent`]), so copying them into the page cache too only costs the server's CPU
/// (fresh page-cache pages are the dearest copy of a relayed byte: `dd` to a fresh file on
/// this project's test machine spends 2.1 CPU-seconds per GB buffered, 0.12 direct).
/// A direct write needs aligned offsets, lengths and memory: the whole blocks a chunk
/// holds at an aligned address go as they are, the other blocks are copied into an
/// aligned buffer ([`Blocks`]), and what does not fill a whole block (the end of the file,
/// or the bytes up to the next block after a resumed part) goes through the page cache.
struct Disk {
    file: std::fs::File,
    direct: Option<Direct>,
}

struct Direct {
    file: std::fs::File,
    /// Gathers the chunks of a write that do not lie as blocks in memory, with
    /// [`DIRECT_ALIGN`] to spare so that an aligned window fits.
    scratch: std::sync::Mutex<Vec<u8>>,
    /// Cleared if the file system refuses a direct write after all: buffered from then on.
    usable: std::sync::atomic::AtomicBool,
}

/// What [`drain`] writes next.
#[derive(Clone, Copy)]
enum Step {
    /// This many bytes through the page cache.
    Buffered(usize),
    /// This many bytes (whole blocks) directly.
    Direct(usize),
    /// Nothing for now: less than a block is left, and the file is not being flushed.
    Wait,
}

impl Disk {
    fn open(file: std::fs::File, path: &Path, direct: bool) -> Self {
        let direct = direct.then(|| Direct::open(path)).flatten();
        Self { file, direct }
    }

    /// The next write of the `unwritten` bytes from `at`, at most `size` at a time;
    /// `whole`: all of them must go.
    fn step(&self, at: u64, unwritten: usize, size: usize, whole: bool) -> Step {
        use std::sync::atomic::Ordering::Relaxed;
        let Some(_) = self.direct.as_ref().filter(|d| d.usable.load(Relaxed)) else {
            return Step::Buffered(unwritten);
        };
        let into_block = (at % DIRECT_ALIGN as u64) as usize;
        if into_block != 0 {
            // Up to the next block boundary (a resumed part may end anywhere).
            return Step::Buffered(unwritten.min(DIRECT_ALIGN - into_block));
        }
        match unwritten.min(size) / DIRECT_ALIGN * DIRECT_ALIGN {
            0 if whole => Step::Buffered(unwritten),
            0 => Step::Wait,
            blocks => Step::Direct(blocks),
        }
    }

    /// Writes the first `len` bytes of `chunks` at `at` as `step` says; how many bytes were
    /// written, and how it ended.
    fn write(&self, step: &Step, chunks: &[Bytes], at: u64) -> (u64, std::io::Result<()>) {
        match (*step, &self.direct) {
            (Step::Direct(len), Some(direct)) => direct.write(chunks, len, at),
            (Step::Buffered(len), _) => write_all_at(&self.file, &first_bytes(chunks, len), at),
            _ => (0, Ok(())),
        }
    }
}

impl Direct {
    #[cfg(target_os = "linux")]
    fn open(path: &Path) -> Option<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let flags = rustix::fs::OFlags::DIRECT.bits();
        let file = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(i32::try_from(flags).ok()?)
            .open(path)
            .ok()?; // e.g. EINVAL: this file system has no direct I/O
        Some(Self {
            file,
            scratch: std::sync::Mutex::new(Vec::new()),
            usable: true.into(),
        })
    }

    #[cfg(not(target_os = "linux"))]
    fn open(_: &Path) -> Option<Self> {
        None
    }

    /// Writes the first `len` bytes of `chunks` (whole blocks) at `at` (a block boundary):
    /// the blocks that lie whole in one chunk's memory as they are (see
    /// [`LineReader::read_body`]), the others copied into the aligned buffer first.
    fn write(&self, chunks: &[Bytes], len: usize, at: u64) -> (u64, std::io::Result<()>) {
        let mut scratch = self
            .scratch
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let plan = Blocks::plan(chunks, len, &mut scratch);
        let slices = plan.slices(chunks, &scratch);
        loop {
            return match rustix::io::pwritev(&self.file, &slices, at) {
                Err(rustix::io::Errno::INTR) => continue,
                // Short (a full disk): the next step goes on from what was written.
                Ok(n) => (n as u64, Ok(())),
                Err(rustix::io::Errno::INVAL) => self.refused(),
                Err(e) => (0, Err(e.into())),
            };
        }
    }
}

/// How one direct write takes its blocks: in file order, each a run of whole blocks in one
/// chunk (`Chunk(index, range)`) or in the aligned buffer (`Copied(range)`).
struct Blocks(Vec<Run>);

enum Run {
    Chunk(usize, std::ops::Range<usize>),
    Copied(std::ops::Range<usize>),
}

/// One part of a direct write, in file order (see [`Blocks::walk`]).
enum Part<'a> {
    /// Bytes to copy into the aligned buffer.
    Copy(&'a [u8]),
    /// Whole blocks of chunk `.0`, written from where they lie.
    InPlace(usize, std::ops::Range<usize>),
}

impl Blocks {
    /// Plans the write of the first `len` bytes of `chunks` (a multiple of
    /// [`DIRECT_ALIGN`], from a block boundary), copying into `scratch` the bytes of the
    /// blocks that no one chunk holds whole at an aligned address (`scratch` grows to what
    /// is copied, not to the write).
    fn plan(chunks: &[Bytes], len: usize, scratch: &mut Vec<u8>) -> Self {
        let mut need = 0;
        Self::walk(chunks, len, |part| {
            if let Part::Copy(bytes) = part {
                need += bytes.len();
            }
        });
        if scratch.len() < need + DIRECT_ALIGN {
            scratch.resize(need + DIRECT_ALIGN, 0);
        }
        let base = scratch.as_ptr().align_offset(DIRECT_ALIGN);
        let (mut runs, mut copied) = (Vec::new(), base);
        Self::walk(chunks, len, |part| match part {
            Part::Copy(bytes) => {
                scratch[copied..copied + bytes.len()].copy_from_slice(bytes);
                copied += bytes.len();
            }
            Part::InPlace(i, range) => {
                Self::copied_so_far(&mut runs, base, copied);
                runs.push(Run::Chunk(i, range));
            }
        });
        Self::copied_so_far(&mut runs, base, copied);
        Self(runs)
    }

    /// The parts of the write of the first `len` bytes of `chunks`, in file order.
    fn walk<'a>(chunks: &'a [Bytes], len: usize, mut part: impl FnMut(Part<'a>)) {
        let (mut copied, mut left) = (0, len);
        for (i, chunk) in chunks.iter().enumerate() {
            if left == 0 {
                break;
            }
            let piece = &chunk[..chunk.len().min(left)];
            left -= piece.len();
            // Mid-block in the buffer: the block is filled from here first.
            let from = match copied % DIRECT_ALIGN {
                0 => 0,
                into => piece.len().min(DIRECT_ALIGN - into),
            };
            // The whole blocks this chunk holds at an aligned address go as they are.
            let rest = &piece[from..];
            let whole = match rest.as_ptr().addr() % DIRECT_ALIGN {
                0 => rest.len() / DIRECT_ALIGN * DIRECT_ALIGN,
                _ => 0,
            };
            let tail = &piece[from + whole..];
            if from > 0 {
                part(Part::Copy(&piece[..from]));
            }
            if whole > 0 {
                part(Part::InPlace(i, from..from + whole));
            }
            if !tail.is_empty() {
                part(Part::Copy(tail));
            }
            copied += from + tail.len();
        }
    }

    /// Closes the run of copied bytes that ends at `copied` (the start of the buffer's
    /// next run is where the last one ended).
    fn copied_so_far(runs: &mut Vec<Run>, base: usize, copied: usize) {
        let start = runs.iter().rev().find_map(|r| match r {
            Run::Copied(range) => Some(range.end),
            Run::Chunk(..) => None,
        });
        let start = start.unwrap_or(base);
        if copied > start {
            runs.push(Run::Copied(start..copied));
        }
    }

    fn slices<'a>(&self, chunks: &'a [Bytes], scratch: &'a [u8]) -> Vec<std::io::IoSlice<'a>> {
        self.0
            .iter()
            .map(|run| match run {
                Run::Chunk(i, range) => std::io::IoSlice::new(&chunks[*i][range.clone()]),
                Run::Copied(range) => std::io::IoSlice::new(&scratch[range.clone()]),
            })
            .collect()
    }
}

impl Direct {
    /// The file system refused a direct write after all (the open succeeded): the page
    /// cache takes the rest.
    fn refused(&self) -> (u64, std::io::Result<()>) {
        tracing::debug!("[SPOOL] no direct writes here: buffered from now on");
        self.usable
            .store(false, std::sync::atomic::Ordering::Relaxed);
        (0, Ok(()))
    }
}

/// The first `len` bytes of `chunks` (shared, not copied).
fn first_bytes(chunks: &[Bytes], len: usize) -> Vec<Bytes> {
    let mut left = len;
    let mut out = Vec::with_capacity(chunks.len());
    for chunk in chunks {
        if left == 0 {
            break;
        }
        let n = chunk.len().min(left);
        out.push(chunk.slice(..n));
        left -= n;
    }
    out
}

/// Writes the unwritten chunks of `recent` to `disk` until there are none left (more may
/// arrive meanwhile: it takes them too) or only part of a block is left (unless `whole`),
/// then says it has stopped. The decision to stop is made under the lock that
/// [`Partial::write`] takes to add a chunk, so no chunk is ever left behind without a
/// writer, other than the part of a block that [`Partial::flush`] writes.
fn drain(disk: &Disk, recent: &Recent, whole: bool) {
    loop {
        let (at, batch, step) = {
            let mut chunks = recent.lock();
            let (at, batch) = chunks.unwritten();
            let unwritten = usize::try_from(chunks.end() - at).unwrap_or(usize::MAX);
            let step = disk.step(at, unwritten, chunks.write_size(), whole);
            if batch.is_empty() || chunks.failed.is_some() || matches!(step, Step::Wait) {
                chunks.writing = false;
                drop(chunks);
                recent.moved.notify_one();
                return;
            }
            (at, batch, step)
        };
        let (n, done) = disk.write(&step, &batch, at);
        let mut chunks = recent.lock();
        chunks.on_disk += n;
        chunks.trim_to_keep();
        if let Err(e) = done {
            chunks.failed = Some((e.kind(), e.to_string()));
            chunks.writing = false;
        }
        let stopped = !chunks.writing;
        drop(chunks);
        recent.moved.notify_one();
        if stopped {
            return;
        }
    }
}

/// A file being written under a temporary name. Dropped before
/// [`Partial::finish_unique`], it is removed: nobody ever sees a partial file under its
/// final name.
///
/// Writes are pipelined: [`Partial::write`] takes a chunk as it came from the connection
/// (no copy), and a blocking-pool thread ([`drain`]) writes whatever has accumulated while
/// the next chunk is read; at most two writes' worth (or [`MAX_CHUNKS`] chunks) wait for
/// the disk. A followed file (the server's spool, which forwards read as it grows) also
/// keeps its newest bytes in [`Recent`].
pub(crate) struct Partial {
    /// The temporary name.
    path: PathBuf,
    /// Open for writing until finished.
    file: Option<Arc<Disk>>,
    /// The bytes not yet on disk, and the newest that are.
    recent: Arc<Recent>,
    /// The latest writer.
    writer: Option<tokio::task::JoinHandle<()>>,
}

impl Partial {
    /// Creates (or truncates) the temporary file; `followed` as in [`Partial`].
    pub(crate) async fn create(path: PathBuf, followed: bool) -> std::io::Result<Self> {
        let file = tokio::fs::File::create(&path).await?.into_std().await;
        let disk = Disk::open(file, &path, followed);
        let recent = Recent::default();
        recent.lock().keep = if followed { RECENT_BYTES } else { 0 };
        if followed {
            SPOOLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(Self {
            path,
            file: Some(Arc::new(disk)),
            recent: Arc::new(recent),
            writer: None,
        })
    }

    /// Bytes written so far (some may still be on their way to the disk).
    pub(crate) fn written(&self) -> u64 {
        self.recent.lock().end()
    }

    /// The newest bytes, for readers that follow the file as it grows.
    pub(crate) fn recent(&self) -> Arc<Recent> {
        self.recent.clone()
    }

    /// The temporary name (readers may follow the file as it grows).
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The file, unless it is finished or a write failed.
    fn file(&self) -> std::io::Result<Arc<Disk>> {
        if let Some((kind, why)) = &self.recent.lock().failed {
            return Err(std::io::Error::new(*kind, why.clone()));
        }
        self.file
            .clone()
            .ok_or_else(|| std::io::Error::other("file already finished"))
    }

    /// Starts a writer for the unwritten chunks (the caller set `writing`); `whole` as in
    /// [`drain`].
    fn spawn_writer(&mut self, disk: Arc<Disk>, whole: bool) {
        let recent = self.recent.clone();
        self.writer = Some(tokio::task::spawn_blocking(move || {
            drain(&disk, &recent, whole)
        }));
    }

    /// Waits for the writer to stop (it stops once everything given is on disk, or on
    /// an error).
    async fn settle(&mut self) -> std::io::Result<()> {
        if let Some(writer) = self.writer.take() {
            writer.await.map_err(std::io::Error::other)?;
        }
        self.file().map(drop)
    }

    /// Appends `bytes`. Returns once they are taken: on disk, or on their way there behind
    /// two writes' worth. A failed write shows here or at the next call.
    pub(crate) async fn write(&mut self, bytes: Bytes) -> std::io::Result<()> {
        let file = self.file()?;
        let (start, backlog) = {
            let mut chunks = self.recent.lock();
            chunks.held += bytes.len();
            chunks.chunks.push_back(bytes);
            let start = !std::mem::replace(&mut chunks.writing, true);
            (start, chunks.backlog())
        };
        if start {
            self.spawn_writer(file, false);
        }
        if backlog {
            self.catch_up().await?;
        }
        Ok(())
    }

    /// Waits until the writer has brought the bytes waiting for the disk back under the
    /// limit (not until it has written them all: it goes on while more are read), and the
    /// followers the bytes they hold: a follower that holds it up for [`PATIENCE`] is let
    /// go.
    async fn catch_up(&self) -> std::io::Result<()> {
        loop {
            // A wake-up given before this waits is kept for it (`notify_one`).
            let moved = self.recent.moved.notified();
            {
                let chunks = self.recent.lock();
                let stuck = !chunks.writing && chunks.followers.is_empty();
                if chunks.failed.is_some() || stuck || !chunks.backlog() {
                    break;
                }
            }
            if tokio::time::timeout(PATIENCE, moved).await.is_err() {
                self.recent.lock().let_slowest_go();
            }
        }
        self.file().map(drop)
    }

    /// Waits until every byte written is on disk.
    pub(crate) async fn flush(&mut self) -> std::io::Result<()> {
        self.settle().await?;
        // What the writers left: the part of a block after the last whole one.
        let disk = self.file()?;
        let start = {
            let mut chunks = self.recent.lock();
            chunks.end() > chunks.on_disk && !std::mem::replace(&mut chunks.writing, true)
        };
        if start {
            self.spawn_writer(disk, true);
        }
        self.settle().await
    }

    /// Waits until every byte written is on disk and lets go of the ones in memory: for a
    /// part kept a long while (a broken transfer waiting to resume).
    pub(crate) async fn park(&mut self) -> std::io::Result<()> {
        self.flush().await?;
        let mut chunks = self.recent.lock();
        chunks.followers.clear(); // one that has caught up is in again at its next read
        chunks.trim(0);
        Ok(())
    }

    /// Empties the file, to be written again from its first byte.
    pub(crate) async fn restart(&mut self) -> std::io::Result<()> {
        self.flush().await?;
        let disk = self.file()?;
        tokio::task::spawn_blocking(move || disk.file.set_len(0))
            .await
            .map_err(std::io::Error::other)??;
        let mut chunks = self.recent.lock();
        let keep = chunks.keep;
        *chunks = Chunks {
            keep,
            ..Chunks::default()
        };
        Ok(())
    }

    /// Closes the file and gives it the name `saved` in `dir`, or, when a file of that name
    /// exists, the first free `numbered` name (`saved (2).ext`, ...): nothing is ever
    /// overwritten. The rename is atomic and refuses to replace (`RENAME_NOREPLACE`), so
    /// two writers can never take the same name. Returns the name given.
    pub(crate) async fn finish_unique(
        mut self,
        dir: &Path,
        saved: &str,
    ) -> std::io::Result<String> {
        use rustix::fs::{renameat_with, RenameFlags, CWD};
        self.flush().await?;
        self.file.take();
        for n in 1..=MAX_NUMBERED {
            let name = match n {
                1 => saved.to_owned(),
                n => numbered(saved, n),
            };
            if name.len() + TMP_SUFFIX.len() > MAX_FILENAME_BYTES {
                break;
            }
            let dest = dir.join(&name);
            let renamed = match renameat_with(CWD, &self.path, CWD, &dest, RenameFlags::NOREPLACE) {
                // A file system without RENAME_NOREPLACE: a hard link refuses to replace too
                // (and the temporary name is removed on drop).
                Err(rustix::io::Errno::INVAL) => {
                    std::fs::hard_link(&self.path, &dest).map(|()| false)
                }
                renamed => renamed.map(|()| true).map_err(std::io::Error::from),
            };
            match renamed {
                Ok(moved) => {
                    if moved {
                        self.path = PathBuf::new();
                    }
                    return Ok(name);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
        Err(std::io::Error::other(format!("no free name for {saved}")))
    }
}

impl Drop for Partial {
    fn drop(&mut self) {
        if self.recent.lock().keep != 0 {
            SPOOLS.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
        self.file.take();
        if !self.path.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Why a body did not arrive whole.
#[derive(Debug)]
pub(crate) enum BodyError {
    /// The file could not be written; this many body bytes are still to come.
    Write(std::io::Error, u64),
    /// The connection ended (or was cancelled, or stalled) first.
    Read(Ended),
}

/// Which bytes of a body to receive: from byte `from` (the ones before are in the file
/// already) up to `size`, giving up after `stall` without a byte; `compressed`: they come
/// as one zstd frame.
pub(crate) struct Body {
    pub(crate) from: u64,
    pub(crate) size: u64,
    pub(crate) stall: Duration,
    pub(crate) compressed: bool,
}

/// Streams the rest of a body into `out`, hashing it into `hasher` (which holds the hash
/// state of the bytes before `from`); `progress` gets the running total from the body's
/// first byte. On a broken connection, `out` and `hasher` hold exactly the bytes that
/// arrived, so the body can be resumed. A compressed body is decoded as it arrives; the
/// bytes after its frame stay in `reader`.
pub(crate) async fn receive_rest<R: AsyncRead + Unpin>(
    reader: &mut LineReader<R>,
    out: &mut Partial,
    hasher: &mut blake3::Hasher,
    body: Body,
    cancel: &CancellationToken,
    mut progress: impl FnMut(u64),
) -> Result<(), BodyError> {
    let Body {
        from,
        size,
        stall,
        compressed,
    } = body;
    let bad = |why: String| BodyError::Read(Ended::Io(std::io::Error::new(InvalidData, why)));
    let mut inflate = match compressed {
        true => Some(Inflate::new().map_err(|e| BodyError::Read(Ended::Io(e)))?),
        false => None,
    };
    let mut got = from;
    let mut spare = Spare::default();
    let mut decoded = match compressed {
        true => Vec::with_capacity(BODY_CHUNK),
        false => Vec::new(),
    };
    // Plain, the body ends at `size`; compressed, where its frame does.
    while got < size || inflate.is_some() {
        let want = match inflate {
            Some(_) => BODY_CHUNK,
            None => usize::try_from(size - got)
                .unwrap_or(usize::MAX)
                .min(4 * BODY_CHUNK),
        };
        let chunk = tokio::select! {
            _ = cancel.cancelled() => return Err(BodyError::Read(Ended::Closed)),
            chunk = tokio::time::timeout(stall, async {
                match inflate {
                    Some(_) => reader.read_raw(want, BODY_CHUNK).await,
                    None => {
                        let layout = (got, DIRECT_ALIGN);
                        reader.read_body(want, 4 * BODY_CHUNK, layout, &mut spare).await
                    }
                }
            }) => chunk,
        };
        let chunk = match chunk {
            Ok(Ok(bytes)) if !bytes.is_empty() => bytes,
            Ok(Ok(_)) => return Err(BodyError::Read(Ended::BrokeOff { got, size })),
            Ok(Err(e)) => return Err(BodyError::Read(Ended::Io(e))),
            Err(_) => return Err(BodyError::Read(Ended::Stalled(stall))),
        };
        let Some(inflating) = inflate.as_mut() else {
            got += chunk.len() as u64;
            hasher.update(&chunk);
            if let Err(e) = out.write(chunk).await {
                return Err(BodyError::Write(e, size - got));
            }
            progress(got);
            continue;
        };
        let mut input = &chunk[..];
        loop {
            decoded.clear();
            let pulled = inflating
                .pull(input, &mut decoded)
                .map_err(|e| BodyError::Read(Ended::Io(e)))?;
            input = &input[pulled.read..];
            let full = decoded.len() == decoded.capacity();
            if !decoded.is_empty() {
                got += decoded.len() as u64;
                if got > size {
                    return Err(bad(format!("the body holds more than {size} bytes")));
                }
                hasher.update(&decoded);
                // A copy of exactly what was decoded: the scratch buffer is used again.
                if let Err(e) = out.write(Bytes::copy_from_slice(&decoded)).await {
                    return Err(BodyError::Write(e, size - got));
                }
                progress(got);
            }
            if pulled.ended {
                if got < size {
                    return Err(bad(format!("the body ended at byte {got} of {size}")));
                }
                reader.unread(input);
                inflate = None;
                break;
            }
            if input.is_empty() && !full {
                break;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn a_followed_file_serves_its_newest_bytes_from_memory_and_the_rest_from_disk() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tmp = dir.path().join("s.part");
        let mut out = Partial::create(tmp.clone(), true).await.expect("create");
        let recent = out.recent();
        let chunk = |i: u8| Bytes::from(vec![i; BODY_CHUNK / 2]);
        let n = 20u8;
        for i in 0..n {
            out.write(chunk(i)).await.expect("write");
        }
        let total = u64::from(n) * (BODY_CHUNK / 2) as u64;
        assert_eq!(out.written(), total);
        // The last chunk is in memory, sliced from any offset within it.
        let last = total - (BODY_CHUNK / 2) as u64;
        let mut got = Vec::new();
        assert_eq!(recent.follower(0).get(last + 10, 5, &mut got), 5);
        assert_eq!(&got[0][..], &[n - 1; 5]);
        // Across chunks, up to the most asked for.
        assert_eq!(recent.follower(0).get(last - 3, 10, &mut got), 10);
        assert_eq!(got.len(), 2);
        assert_eq!(
            (&got[0][..], &got[1][..]),
            (&[n - 2; 3][..], &[n - 1; 7][..])
        );
        out.flush().await.expect("flush");
        // At most RECENT_BYTES stay once on disk: the first chunk is read from the file.
        assert_eq!(recent.follower(0).get(0, 1, &mut got), 0);
        let on_disk = std::fs::read(&tmp).expect("read");
        assert_eq!(on_disk.len() as u64, total);
        assert!(on_disk[..BODY_CHUNK / 2].iter().all(|b| *b == 0));
        assert!(on_disk[last as usize..].iter().all(|b| *b == n - 1));
        assert_eq!(
            recent.follower(0).get(last, 1, &mut got),
            1,
            "the newest bytes stay"
        );
        // Parked, it holds nothing in memory, and writing goes on where it stopped.
        out.park().await.expect("park");
        assert_eq!(recent.follower(0).get(last, 1, &mut got), 0);
        out.write(Bytes::from_static(b"tail")).await.expect("write");
        assert_eq!(recent.follower(0).get(total, 10, &mut got), 4);
        assert_eq!(&got[0][..], b"tail");
        let name = out
            .finish_unique(dir.path(), "s.bin")
            .await
            .expect("renamed");
        let whole = std::fs::read(dir.path().join(name)).expect("read");
        assert_eq!(whole.len() as u64, total + 4);
        assert_eq!(&whole[whole.len() - 4..], b"tail");
    }

    /// Whether this directory's file system takes direct writes (tmpfs, for one, may not).
    fn takes_direct_writes(dir: &Path) -> bool {
        let probe = dir.join("probe");
        std::fs::write(&probe, b"").expect("probe");
        Direct::open(&probe).is_some()
    }

    #[tokio::test]
    async fn a_spool_goes_on_directly_after_a_part_that_ends_mid_block() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tmp = dir.path().join("d.part");
        let mut out = Partial::create(tmp.clone(), true).await.expect("create");
        let direct = out.file().expect("open").direct.is_some();
        assert_eq!(direct, takes_direct_writes(dir.path()));
        let body: Vec<u8> = (0..3_000_017u32).map(|i| (i % 253) as u8).collect();
        // A part of 5,000 bytes kept (as for a resume), then the rest in odd pieces, some
        // from one buffer as a reader lays them out, some copied.
        out.write(Bytes::copy_from_slice(&body[..5_000]))
            .await
            .expect("write");
        out.park().await.expect("park");
        assert_eq!(std::fs::read(&tmp).expect("read"), &body[..5_000]);
        let rest = Bytes::copy_from_slice(&body[5_000..]);
        let mut at = 0;
        for (i, len) in [3_192usize, 65_536, 100_003, 4_096]
            .iter()
            .cycle()
            .enumerate()
        {
            let len = (*len).min(rest.len() - at);
            let piece = match i % 3 {
                0 => Bytes::copy_from_slice(&rest[at..at + len]),
                _ => rest.slice(at..at + len),
            };
            out.write(piece).await.expect("write");
            at += len;
            if at == rest.len() {
                break;
            }
        }
        out.flush().await.expect("flush");
        assert_eq!(std::fs::read(&tmp).expect("read"), body);
        assert!(out
            .file()
            .expect("open")
            .direct
            .as_ref()
            .is_none_or(|d| { d.usable.load(std::sync::atomic::Ordering::Relaxed) }));
    }

    #[test]
    fn a_direct_write_takes_whole_blocks_from_where_they_lie_and_copies_the_rest() {
        const A: usize = DIRECT_ALIGN;
        // One buffer laid out as in the file (offset 0 at an aligned address), cut into
        // pieces as reads cut it: whole blocks, a piece that ends mid-block, odd pieces.
        let data: Vec<u8> = (0..40 * A).map(|i| (i % 251) as u8).collect();
        let mut owned = vec![0u8; data.len() + A];
        let pad = owned.as_ptr().align_offset(A);
        owned[pad..pad + data.len()].copy_from_slice(&data);
        let buffer = Bytes::from(owned).slice(pad..pad + data.len());
        let cuts = [
            0,
            3 * A,
            3 * A + 100,
            9 * A + 7,
            9 * A + 8,
            20 * A,
            21 * A - 1,
            40 * A,
        ];
        let mut chunks: Vec<Bytes> = cuts.windows(2).map(|w| buffer.slice(w[0]..w[1])).collect();
        // And a copy (not laid out) in the middle, as the bytes read with a header are.
        chunks[4] = Bytes::copy_from_slice(&chunks[4]);
        let mut scratch = Vec::new();
        // In place: blocks 0-2, 4-8 and 21-39; copied: block 3 (cut), 9-19 (the copy, and
        // the block it starts in) and 20 (cut).
        for (len, in_place) in [(A, A), (10 * A, 8 * A), (40 * A, 27 * A)] {
            let plan = Blocks::plan(&chunks, len, &mut scratch);
            let slices = plan.slices(&chunks, &scratch);
            assert!(slices
                .iter()
                .all(|s| s.as_ptr().addr() % A == 0 && s.len() % A == 0));
            let written: Vec<u8> = slices.iter().flat_map(|s| s.iter().copied()).collect();
            assert_eq!(written, &data[..len]);
            let direct: usize = plan
                .0
                .iter()
                .map(|r| match r {
                    Run::Chunk(_, range) => range.len(),
                    Run::Copied(_) => 0,
                })
                .sum();
            assert_eq!(direct, in_place, "bytes in place of {len}");
        }
    }

    #[tokio::test]
    async fn a_follower_that_keeps_up_takes_every_byte_from_memory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut out = Partial::create(dir.path().join("f.part"), true)
            .await
            .expect("create");
        let mut follower = out.recent().follower(0);
        let total = 40 * BODY_CHUNK; // ten times what stays in memory for nobody
        let chunk = |i: usize| Bytes::from(vec![(i % 256) as u8; BODY_CHUNK]);
        let writer = tokio::spawn(async move {
            for i in 0..total / BODY_CHUNK {
                out.write(chunk(i)).await.expect("write");
            }
            out.flush().await.expect("flush");
            out
        });
        let (mut at, mut got) = (0u64, Vec::new());
        while at < total as u64 {
            match follower.get(at, BODY_CHUNK, &mut got) {
                0 => tokio::task::yield_now().await, // not written yet, or let go
                n => {
                    let i = at as usize / BODY_CHUNK;
                    assert!(got.iter().all(|c| c.iter().all(|b| *b == (i % 256) as u8)));
                    at += n as u64;
                }
            }
            assert!(
                at >= out_start(&follower),
                "a follower that keeps up is never let go (at {at})"
            );
        }
        drop(writer.await.expect("writer"));
    }

    /// The offset of the oldest byte in memory.
    fn out_start(follower: &Follower) -> u64 {
        follower.recent.lock().start
    }

    #[tokio::test]
    async fn a_follower_that_stops_reading_is_let_go_and_the_upload_goes_on() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tmp = dir.path().join("s.part");
        let mut out = Partial::create(tmp.clone(), true).await.expect("create");
        let mut stuck = out.recent().follower(0);
        let total = 2 * (RECENT_BYTES + 2 * WRITE_MAX + FOLLOWED_SLACK); // twice the most held
        for i in 0..total / BODY_CHUNK {
            out.write(Bytes::from(vec![i as u8; BODY_CHUNK]))
                .await
                .expect("write");
        }
        out.flush().await.expect("flush");
        // It waited for the follower (at most PATIENCE), then let it go: its bytes are on
        // disk, not held in memory for it.
        let mut got = Vec::new();
        assert_eq!(stuck.get(0, 1, &mut got), 0);
        let chunks = out.recent.lock();
        assert!(chunks.held <= chunks.followed_max());
        assert_eq!(std::fs::metadata(&tmp).expect("stat").len(), total as u64);
    }

    #[tokio::test]
    async fn a_restarted_file_is_empty_and_written_again_from_byte_zero() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tmp = dir.path().join("r.part");
        let mut out = Partial::create(tmp.clone(), true).await.expect("create");
        out.write(Bytes::from_static(b"old bytes"))
            .await
            .expect("write");
        out.restart().await.expect("restart");
        assert_eq!(out.written(), 0);
        assert_eq!(out.recent().follower(0).get(0, 1, &mut Vec::new()), 0);
        out.write(Bytes::from_static(b"new")).await.expect("write");
        out.flush().await.expect("flush");
        assert_eq!(std::fs::read(&tmp).expect("read"), b"new");
    }

    #[tokio::test]
    async fn a_whole_body_lands_under_its_final_name_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tmp = dir.path().join("f.tmp");
        let (mut peer, ours) = tokio::io::duplex(1024);
        let mut reader = LineReader::line_framed(ours, 100);
        peer.write_all(b"world").await.expect("write");
        let mut out = Partial::create(tmp.clone(), false).await.expect("create");
        let mut seen = Vec::new();
        let never = CancellationToken::new();
        let stall = Duration::from_secs(5);
        // The first 6 bytes are in the file already (a resumed body): the rest comes.
        out.write(Bytes::from_static(b"hello "))
            .await
            .expect("write");
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"hello ");
        let body = Body {
            from: 6,
            size: 11,
            stall,
            compressed: false,
        };
        receive_rest(&mut reader, &mut out, &mut hasher, body, &never, |n| {
            seen.push(n)
        })
        .await
        .expect("whole");
        assert_eq!(hasher.finalize(), blake3::hash(b"hello world"));
        assert_eq!(out.written(), 11);
        assert!(!dir.path().join("f.txt").exists());
        let name = out
            .finish_unique(dir.path(), "f.txt")
            .await
            .expect("renamed");
        assert_eq!(name, "f.txt");
        assert_eq!(
            std::fs::read(dir.path().join("f.txt")).expect("read"),
            b"hello world"
        );
        assert!(!tmp.exists());
        assert_eq!(seen.last(), Some(&11));
    }

    #[tokio::test]
    async fn a_compressed_body_is_decoded_and_what_follows_its_frame_stays_unread() {
        let dir = tempfile::tempdir().expect("tempdir");
        let text: Vec<u8> = (0..50_000)
            .flat_map(|i| format!("line {i}\n").into_bytes())
            .collect();
        let mut deflate = crate::compress::Deflate::new().expect("encoder");
        let mut wire = Vec::new();
        deflate.push(&text[100..], &mut wire).expect("push");
        deflate.finish(&mut wire).expect("finish");
        assert!(wire.len() < text.len() / 4);
        wire.extend_from_slice(b"b3 abc\n");
        let (mut peer, ours) = tokio::io::duplex(4096);
        let writer = tokio::spawn(async move { peer.write_all(&wire).await.expect("write") });
        let mut reader = LineReader::line_framed(ours, 100);
        let mut out = Partial::create(dir.path().join("z.tmp"), false)
            .await
            .expect("create");
        // The first 100 bytes are there already (a resumed body).
        out.write(Bytes::copy_from_slice(&text[..100]))
            .await
            .expect("write");
        let mut hasher = blake3::Hasher::new();
        hasher.update(&text[..100]);
        let body = Body {
            from: 100,
            size: text.len() as u64,
            stall: Duration::from_secs(5),
            compressed: true,
        };
        let never = CancellationToken::new();
        let mut last = 0;
        receive_rest(&mut reader, &mut out, &mut hasher, body, &never, |n| {
            assert!(n > last);
            last = n;
        })
        .await
        .expect("whole");
        writer.await.expect("writer");
        assert_eq!(last, text.len() as u64);
        assert_eq!(hasher.finalize(), blake3::hash(&text));
        assert_eq!(
            &reader.next_line(&never).await.expect("trailer")[..],
            b"b3 abc"
        );
        let name = out
            .finish_unique(dir.path(), "z.txt")
            .await
            .expect("renamed");
        assert_eq!(std::fs::read(dir.path().join(name)).expect("read"), text);
    }

    #[tokio::test]
    async fn a_taken_name_is_never_overwritten() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("f.txt"), b"first").expect("write");
        std::fs::write(dir.path().join("f (2).txt"), b"second").expect("write");
        let out = Partial::create(dir.path().join("x.tmp"), false)
            .await
            .expect("create");
        let name = out
            .finish_unique(dir.path(), "f.txt")
            .await
            .expect("renamed");
        assert_eq!(name, "f (3).txt");
        assert_eq!(
            std::fs::read(dir.path().join("f.txt")).expect("read"),
            b"first"
        );
        assert_eq!(
            std::fs::read(dir.path().join("f (2).txt")).expect("read"),
            b"second"
        );
    }

    #[tokio::test]
    async fn a_broken_body_leaves_nothing_behind() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tmp = dir.path().join("g.tmp");
        let (mut peer, ours) = tokio::io::duplex(1024);
        let mut reader = LineReader::line_framed(ours, 100);
        peer.write_all(b"abc").await.expect("write");
        drop(peer);
        let mut out = Partial::create(tmp.clone(), false).await.expect("create");
        let never = CancellationToken::new();
        let stall = Duration::from_secs(5);
        let body = Body {
            from: 0,
            size: 10,
            stall,
            compressed: false,
        };
        let mut hasher = blake3::Hasher::new();
        let end = receive_rest(&mut reader, &mut out, &mut hasher, body, &never, |_| {}).await;
        assert!(matches!(
            end,
            Err(BodyError::Read(Ended::BrokeOff { got: 3, size: 10 }))
        ));
        drop(out);
        assert!(!tmp.exists());
    }
}
