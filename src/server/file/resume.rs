//! Downloads that resume: a recipient (our client) whose file connection broke keeps the
//! part it received and, once its connection is back, names the file's id and how many
//! bytes it has (`resume <id> <have>`). The rest comes from the upload still arriving, the
//! server's saved copy, or, when the upload itself broke and waits to be resumed, from the
//! resumed upload.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::super::Shared;
use super::forward::{Progress, Source};

/// Who an upload was forwarded to: each name with its chat session's id at the time.
pub(crate) type Recipients = Vec<(String, u64)>;

/// Whether `user` may resume a download of a file forwarded to `recipients`: it was one of
/// them, and is the same account (registered) or still the same session (a guest: the
/// name may have passed to someone else since).
pub(crate) fn may_resume(shared: &Shared, user: &str, recipients: &Recipients) -> bool {
    recipients.iter().any(|(name, chat)| {
        name == user
            && (shared.registry.is_registered(user)
                || shared.registry.chat_session(user).map(|c| c.0) == Some(*chat))
    })
}

/// Wishes (a recipient waiting for a broken upload to resume) kept at most.
const MAX_WANTED: usize = 10_000;
/// How long a wish waits for its upload to resume.
const WANTED_FOR: Duration = Duration::from_secs(86_400);

/// An upload arriving now, which recipients whose connection broke can rejoin.
pub(crate) struct Live {
    /// Where its bytes are read.
    pub(crate) src: Source,
    /// Whether its forwards go compressed.
    pub(crate) compressed: bool,
    /// How far the upload has got.
    pub(crate) progress: watch::Receiver<Progress>,
    /// The uploader.
    pub(crate) sender: String,
    /// The file's name as sent.
    pub(crate) filename: String,
    /// Its size.
    pub(crate) size: u64,
    /// Who it was forwarded to (only they may resume it).
    pub(crate) recipients: Recipients,
}

/// Uploads saved lately whose id a recipient may still name (an upload's id is this run's
/// count; the index has its own): at most this many are remembered.
const MAX_SAVED: usize = 10_000;

/// The uploads arriving now, recipients waiting for broken ones, and where lately saved
/// uploads are in the index.
#[derive(Default)]
pub(crate) struct Resumes {
    live: Mutex<HashMap<u64, Arc<Live>>>,
    wanted: Mutex<HashMap<(String, u64), (u64, Instant)>>,
    /// Where uploads saved lately are in the index.
    saved: Mutex<Saved>,
}

/// Upload id to index id (and its recipients) and back, for the last [`MAX_SAVED`] uploads
/// saved.
#[derive(Default)]
struct Saved {
    to_index: HashMap<u64, SavedUpload>,
    to_upload: HashMap<u64, u64>,
    order: std::collections::VecDeque<u64>,
}

/// An upload saved lately, as a recipient resuming it needs it.
#[derive(Clone)]
pub(crate) struct SavedUpload {
    /// Its id in the index.
    pub(crate) index: u64,
    /// Who it was forwarded to.
    pub(crate) recipients: Recipients,
    /// Whether its forwards went compressed (a resumed one goes the same way).
    pub(crate) compressed: bool,
}

/// Removes a live upload from [`Resumes`] when it ends, however it ends.
pub(crate) struct LiveGuard<'a> {
    resumes: &'a Resumes,
    id: u64,
}

impl Drop for LiveGuard<'_> {
    fn drop(&mut self) {
        self.resumes
            .live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
    }
}

impl Resumes {
    /// Registers upload `id` as arriving, until the guard is dropped.
    pub(crate) fn arriving(&self, id: u64, live: Live) -> LiveGuard<'_> {
        self.live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, Arc::new(live));
        LiveGuard { resumes: self, id }
    }

    /// The upload `id` if it is arriving now.
    pub(crate) fn live(&self, id: u64) -> Option<Arc<Live>> {
        let live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        live.get(&id).cloned()
    }

    /// Notes that `user` has the first `have` bytes of upload `id`, which broke off and
    /// may resume.
    pub(crate) fn want(&self, user: &str, id: u64, have: u64) {
        let mut wanted = self.wanted.lock().unwrap_or_else(PoisonError::into_inner);
        wanted.retain(|_, (_, since)| since.elapsed() < WANTED_FOR);
        if wanted.len() < MAX_WANTED {
            wanted.insert((user.to_owned(), id), (have, Instant::now()));
        }
    }

    /// Notes that upload `upload`, forwarded to `recipients`, was saved as file `index`
    /// of the index.
    pub(crate) fn saved(&self, upload: u64, saved_as: SavedUpload) {
        let index = saved_as.index;
        let mut saved = self.saved.lock().unwrap_or_else(PoisonError::into_inner);
        let saved = &mut *saved;
        if saved.order.len() >= MAX_SAVED {
            if let Some(old) = saved.order.pop_front() {
                if let Some(old) = saved.to_index.remove(&old) {
                    saved.to_upload.remove(&old.index);
                }
            }
        }
        saved.to_index.insert(upload, saved_as);
        saved.to_upload.insert(index, upload);
        saved.order.push_back(upload);
    }

    /// Where upload `upload` is in the index, and how it was forwarded, if it was saved
    /// lately.
    pub(crate) fn index_of(&self, upload: u64) -> Option<SavedUpload> {
        let saved = self.saved.lock().unwrap_or_else(PoisonError::into_inner);
        saved.to_index.get(&upload).cloned()
    }

    /// The upload id of file `index`, if this run received it lately.
    pub(crate) fn upload_of(&self, index: u64) -> Option<u64> {
        let saved = self.saved.lock().unwrap_or_else(PoisonError::into_inner);
        saved.to_upload.get(&index).copied()
    }

    /// Forgets what recipients said they have of upload `id` (it starts over).
    pub(crate) fn forget(&self, id: u64) {
        let mut wanted = self.wanted.lock().unwrap_or_else(PoisonError::into_inner);
        wanted.retain(|(_, upload), _| *upload != id);
    }

    /// How many bytes of upload `id` `user` already has (0 if it did not say).
    pub(crate) fn has(&self, user: &str, id: u64) -> u64 {
        let mut wanted = self.wanted.lock().unwrap_or_else(PoisonError::into_inner);
        wanted
            .remove(&(user.to_owned(), id))
            .map_or(0, |(have, _)| have)
    }
}
