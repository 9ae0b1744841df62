//! Spool files: an upload is written to `<data_dir>/.relaychat-upload-<id>.part` until it
//! is whole, then renamed to its saved name. A server killed mid-upload leaves spool files
//! behind; the next start removes them.

use std::path::{Path, PathBuf};

use tracing::{info, warn};

use super::super::Shared;

/// Every spool file's name starts with this.
const PREFIX: &str = ".relaychat-upload-";
/// ... and ends with this.
const SUFFIX: &str = ".part";

/// A fresh spool path for one upload.
pub(super) fn path(shared: &Shared) -> PathBuf {
    let id = shared.next_id();
    shared.config.data_dir.join(format!("{PREFIX}{id}{SUFFIX}"))
}

/// Deletes spool files left by a server that was killed mid-upload.
pub(crate) fn remove_stale(data_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(data_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(PREFIX) && name.ends_with(SUFFIX) {
            match std::fs::remove_file(entry.path()) {
                Ok(()) => info!("[CLEANUP] removed stale spool file {name}"),
                Err(e) => warn!("[CLEANUP] cannot remove {name}: {e}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_spool_files_are_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let keep = ["received_from_a_x.part", ".relaychat-upload-7.txt", "notes"];
        for name in keep {
            std::fs::write(dir.path().join(name), b"x").expect("write");
        }
        std::fs::write(dir.path().join(".relaychat-upload-7.part"), b"x").expect("write");
        remove_stale(dir.path());
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .expect("dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        let mut want: Vec<String> = keep.iter().map(|s| s.to_string()).collect();
        want.sort();
        assert_eq!(left, want);
    }
}
