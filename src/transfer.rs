//! Moving file bytes, for the server's uploads and the client's downloads alike: a file
//! written under a temporary name and renamed into place only once whole ([`Partial`]),
//! and the one loop that streams a body from a connection into it ([`receive_rest`]),
//! reporting progress and hashing it (BLAKE3) as it goes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::flow::Ended;
use crate::net::LineReader;
use crate::protocol::names::{numbered, MAX_FILENAME_BYTES, TMP_SUFFIX};

/// How many numbered names a saved file may try before giving up.
const MAX_NUMBERED: u32 = 10_000;

/// Bytes moved per read or write of a file body.
pub(crate) const BODY_CHUNK: usize = 256 * 1024;

/// A file being written under a temporary name. Dropped before
/// [`Partial::finish_unique`], it is removed: nobody ever sees a partial file under its
/// final name.
pub(crate) struct Partial {
    /// The temporary name.
    path: PathBuf,
    /// Open for writing until finished.
    file: Option<tokio::fs::File>,
    /// Whether others read the file while it grows (the server's spool, which forwards
    /// follow): then every chunk is flushed before its progress is reported.
    followed: bool,
    /// Bytes written so far.
    written: u64,
}

impl Partial {
    /// Creates (or truncates) the temporary file; `followed` as in [`Partial`].
    pub(crate) async fn create(path: PathBuf, followed: bool) -> std::io::Result<Self> {
        let file = tokio::fs::File::create(&path).await?;
        Ok(Self {
            path,
            file: Some(file),
            followed,
            written: 0,
        })
    }

    /// Bytes written so far.
    pub(crate) fn written(&self) -> u64 {
        self.written
    }

    /// Empties the file, to be written again from its first byte.
    pub(crate) async fn restart(&mut self) -> std::io::Result<()> {
        use tokio::io::AsyncSeekExt;
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| std::io::Error::other("file already finished"))?;
        file.flush().await?;
        file.set_len(0).await?;
        file.seek(std::io::SeekFrom::Start(0)).await?;
        self.written = 0;
        Ok(())
    }

    /// The temporary name (readers may follow the file as it grows).
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    async fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| std::io::Error::other("file already finished"))?;
        file.write_all(bytes).await?;
        self.written += bytes.len() as u64;
        // tokio's file writes go through a blocking thread; flushing makes each chunk
        // visible to readers following the file before its progress is published. Nobody
        // follows a download, so its writes overlap the next read instead.
        match self.followed {
            true => file.flush().await,
            false => Ok(()),
        }
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
        if let Some(mut file) = self.file.take() {
            file.flush().await?;
        }
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
/// already) up to `size`, giving up after `stall` without a byte.
pub(crate) struct Body {
    pub(crate) from: u64,
    pub(crate) size: u64,
    pub(crate) stall: Duration,
}

/// Streams the rest of a body into `out`, hashing it into `hasher` (which holds the hash
/// state of the bytes before `from`); `progress` gets the running total from the body's
/// first byte. On a broken connection, `out` and `hasher` hold exactly the bytes that
/// arrived, so the body can be resumed.
pub(crate) async fn receive_rest<R: AsyncRead + Unpin>(
    reader: &mut LineReader<R>,
    out: &mut Partial,
    hasher: &mut blake3::Hasher,
    body: Body,
    cancel: &CancellationToken,
    mut progress: impl FnMut(u64),
) -> Result<(), BodyError> {
    let Body { from, size, stall } = body;
    let mut got = from;
    while got < size {
        let want = usize::try_from(size - got)
            .unwrap_or(usize::MAX)
            .min(BODY_CHUNK);
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
        got += chunk.len() as u64;
        if let Err(e) = out.write(&chunk).await {
            return Err(BodyError::Write(e, size - got));
        }
        hasher.update(&chunk);
        progress(got);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
        out.write(b"hello ").await.expect("write");
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"hello ");
        let body = Body {
            from: 6,
            size: 11,
            stall,
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
