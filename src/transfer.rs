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
use crate::net::LineReader;
use crate::protocol::names::{numbered, MAX_FILENAME_BYTES, TMP_SUFFIX};

/// How many numbered names a saved file may try before giving up.
const MAX_NUMBERED: u32 = 10_000;

/// Bytes moved per read or write of a file body.
pub(crate) const BODY_CHUNK: usize = 256 * 1024;

/// Bytes a followed [`Partial`] keeps in memory once they are on disk, for the readers
/// that keep up (see [`Recent`]).
pub(crate) const RECENT_BYTES: usize = 4 * BODY_CHUNK;
/// Bytes a [`Partial`] holds that are not yet on disk before [`Partial::write`] waits for
/// the disk (a slow disk slows the sender rather than fill memory).
const UNWRITTEN_BYTES: usize = 4 * BODY_CHUNK;
/// Chunks a [`Partial`] holds at most, whatever their size (a sender of tiny segments
/// waits for the disk sooner, and the window stays quick to search).
const MAX_CHUNKS: usize = 256;

/// The newest bytes of a file being written, in memory: every byte not yet on disk, and
/// (for a followed file) the last [`RECENT_BYTES`] that are. A reader that keeps up takes
/// its bytes from here and never reads them back from the file; one that falls behind
/// finds them on disk, since only bytes already written leave.
#[derive(Default)]
pub(crate) struct Recent {
    inner: std::sync::Mutex<Chunks>,
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
}

impl Chunks {
    fn end(&self) -> u64 {
        self.start + self.held as u64
    }

    /// Lets go of the oldest chunks that are on disk while more than `keep` bytes (or more
    /// than half of [`MAX_CHUNKS`] chunks) are held.
    fn trim(&mut self, keep: usize) {
        while let Some(first) = self.chunks.front() {
            let len = first.len();
            let over = self.held > keep || self.chunks.len() > MAX_CHUNKS / 2;
            if !over || self.start + len as u64 > self.on_disk {
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

    /// Up to `max` bytes from offset `at`, if they are still in memory: into `out` as the
    /// chunks that hold them (shared, not copied); returns how many. 0 means: read them
    /// from the file, where they are when `at` is below what was written.
    pub(crate) fn get(&self, at: u64, max: usize, out: &mut Vec<Bytes>) -> usize {
        out.clear();
        let chunks = self.lock();
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

/// Writes the unwritten chunks of `recent` to `file` until there are none left (more may
/// arrive meanwhile: it takes them too), then says it has stopped. The decision to stop is
/// made under the lock that [`Partial::write`] takes to add a chunk, so no chunk is ever
/// left behind without a writer.
fn drain(file: &std::fs::File, recent: &Recent) {
    loop {
        let (at, batch) = {
            let mut chunks = recent.lock();
            let (at, batch) = chunks.unwritten();
            if batch.is_empty() || chunks.failed.is_some() {
                chunks.writing = false;
                return;
            }
            (at, batch)
        };
        let (n, done) = write_all_at(file, &batch, at);
        let mut chunks = recent.lock();
        chunks.on_disk += n;
        let keep = chunks.keep;
        chunks.trim(keep);
        if let Err(e) = done {
            chunks.failed = Some((e.kind(), e.to_string()));
            chunks.writing = false;
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
/// the next chunk is read; at most [`UNWRITTEN_BYTES`] (or [`MAX_CHUNKS`] chunks) wait for
/// the disk. A followed file (the server's spool, which forwards read as it grows) also
/// keeps its newest bytes in [`Recent`].
pub(crate) struct Partial {
    /// The temporary name.
    path: PathBuf,
    /// Open for writing until finished.
    file: Option<Arc<std::fs::File>>,
    /// The bytes not yet on disk, and the newest that are.
    recent: Arc<Recent>,
    /// The latest writer.
    writer: Option<tokio::task::JoinHandle<()>>,
}

impl Partial {
    /// Creates (or truncates) the temporary file; `followed` as in [`Partial`].
    pub(crate) async fn create(path: PathBuf, followed: bool) -> std::io::Result<Self> {
        let file = tokio::fs::File::create(&path).await?.into_std().await;
        let recent = Recent::default();
        recent.lock().keep = if followed { RECENT_BYTES } else { 0 };
        Ok(Self {
            path,
            file: Some(Arc::new(file)),
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
    fn file(&self) -> std::io::Result<Arc<std::fs::File>> {
        if let Some((kind, why)) = &self.recent.lock().failed {
            return Err(std::io::Error::new(*kind, why.clone()));
        }
        self.file
            .clone()
            .ok_or_else(|| std::io::Error::other("file already finished"))
    }

    /// Starts a writer for the unwritten chunks (the caller set `writing`).
    fn spawn_writer(&mut self, file: Arc<std::fs::File>) {
        let recent = self.recent.clone();
        self.writer = Some(tokio::task::spawn_blocking(move || drain(&file, &recent)));
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
    /// fewer than [`UNWRITTEN_BYTES`]. A failed write shows here or at the next call.
    pub(crate) async fn write(&mut self, bytes: Bytes) -> std::io::Result<()> {
        let file = self.file()?;
        let (start, backlog) = {
            let mut chunks = self.recent.lock();
            chunks.held += bytes.len();
            chunks.chunks.push_back(bytes);
            let start = !std::mem::replace(&mut chunks.writing, true);
            let unwritten = chunks.end() - chunks.on_disk;
            let backlog = unwritten > UNWRITTEN_BYTES as u64 || chunks.chunks.len() >= MAX_CHUNKS;
            (start, backlog)
        };
        if start {
            self.spawn_writer(file);
        }
        if backlog {
            self.settle().await?;
        }
        Ok(())
    }

    /// Waits until every byte written is on disk.
    pub(crate) async fn flush(&mut self) -> std::io::Result<()> {
        self.settle().await
    }

    /// Waits until every byte written is on disk and lets go of the ones in memory: for a
    /// part kept a long while (a broken transfer waiting to resume).
    pub(crate) async fn park(&mut self) -> std::io::Result<()> {
        self.flush().await?;
        self.recent.lock().trim(0);
        Ok(())
    }

    /// Empties the file, to be written again from its first byte.
    pub(crate) async fn restart(&mut self) -> std::io::Result<()> {
        self.flush().await?;
        let file = self.file()?;
        tokio::task::spawn_blocking(move || file.set_len(0))
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
                .min(BODY_CHUNK),
        };
        let chunk = tokio::select! {
            _ = cancel.cancelled() => return Err(BodyError::Read(Ended::Closed)),
            chunk = tokio::time::timeout(stall, reader.read_raw(want, BODY_CHUNK)) => chunk,
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
        assert_eq!(recent.get(last + 10, 5, &mut got), 5);
        assert_eq!(&got[0][..], &[n - 1; 5]);
        // Across chunks, up to the most asked for.
        assert_eq!(recent.get(last - 3, 10, &mut got), 10);
        assert_eq!(got.len(), 2);
        assert_eq!(
            (&got[0][..], &got[1][..]),
            (&[n - 2; 3][..], &[n - 1; 7][..])
        );
        out.flush().await.expect("flush");
        // At most RECENT_BYTES stay once on disk: the first chunk is read from the file.
        assert_eq!(recent.get(0, 1, &mut got), 0);
        let on_disk = std::fs::read(&tmp).expect("read");
        assert_eq!(on_disk.len() as u64, total);
        assert!(on_disk[..BODY_CHUNK / 2].iter().all(|b| *b == 0));
        assert!(on_disk[last as usize..].iter().all(|b| *b == n - 1));
        assert_eq!(recent.get(last, 1, &mut got), 1, "the newest bytes stay");
        // Parked, it holds nothing in memory, and writing goes on where it stopped.
        out.park().await.expect("park");
        assert_eq!(recent.get(last, 1, &mut got), 0);
        out.write(Bytes::from_static(b"tail")).await.expect("write");
        assert_eq!(recent.get(total, 10, &mut got), 4);
        assert_eq!(&got[0][..], b"tail");
        let name = out
            .finish_unique(dir.path(), "s.bin")
            .await
            .expect("renamed");
        let whole = std::fs::read(dir.path().join(name)).expect("read");
        assert_eq!(whole.len() as u64, total + 4);
        assert_eq!(&whole[whole.len() - 4..], b"tail");
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
        assert_eq!(out.recent().get(0, 1, &mut Vec::new()), 0);
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
