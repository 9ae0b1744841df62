//! Broken uploads kept for resuming: when a checked upload (our client's) breaks off
//! mid-body, its spool, the hash state of the bytes that arrived and its quota reservation
//! wait here for `partial_ttl`; the same upload again (same sender, target, name and size)
//! takes them back and continues from the byte the server has.
//!
//! In memory: a restart forgets them (and removes their spool files, as every spool).

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::super::limits::Reservation;
use crate::protocol::UploadHeader;
use crate::transfer::Partial;

/// Broken uploads kept per user at most (each holds a descriptor); past it, the oldest
/// goes.
const PER_USER: usize = 8;
/// Broken uploads kept in all at most (guest names cost nothing to make): past it, the
/// oldest goes.
const IN_ALL: usize = 256;

/// What identifies an upload across connections.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Key {
    sender: String,
    target: String,
    filename: String,
    size: u64,
}

impl Key {
    /// The key of `user`'s upload with `header`.
    pub(crate) fn of(user: &str, header: &UploadHeader) -> Self {
        Self {
            sender: user.to_owned(),
            target: header.target.to_string(),
            filename: header.filename.clone(),
            size: header.size,
        }
    }
}

/// A broken upload.
pub(crate) struct Kept {
    /// The upload's id (its index id once saved).
    pub(crate) id: u64,
    /// The spool, holding the bytes that arrived.
    pub(crate) partial: Partial,
    /// The hash state of exactly those bytes.
    pub(crate) hasher: blake3::Hasher,
    /// The quota and disk space it holds.
    pub(crate) reservation: Reservation,
    /// Who it was being forwarded to when it broke (they may resume their downloads).
    pub(crate) recipients: super::resume::Recipients,
    /// When it was kept.
    since: Instant,
}

impl Kept {
    pub(crate) fn new(
        (id, partial, hasher): (u64, Partial, blake3::Hasher),
        reservation: Reservation,
        recipients: super::resume::Recipients,
    ) -> Self {
        Self {
            id,
            partial,
            hasher,
            reservation,
            recipients,
            since: Instant::now(),
        }
    }
}

/// The broken uploads of every user.
#[derive(Default)]
pub(crate) struct Partials {
    kept: Mutex<HashMap<Key, Kept>>,
}

impl Partials {
    /// Keeps a broken upload (dropping the user's oldest past [`PER_USER`], and any that
    /// outlived `ttl`: their spools are deleted and their quota given back).
    pub(crate) fn keep(&self, key: Key, kept: Kept, ttl: Duration) {
        let mut map = self.kept.lock().unwrap_or_else(PoisonError::into_inner);
        map.retain(|_, k| k.since.elapsed() < ttl);
        let mine: Vec<(Instant, Key)> = map
            .iter()
            .filter(|(k, _)| k.sender == key.sender)
            .map(|(k, v)| (v.since, k.clone()))
            .collect();
        if mine.len() >= PER_USER {
            if let Some((_, oldest)) = mine.into_iter().min_by_key(|(since, _)| *since) {
                map.remove(&oldest);
            }
        }
        if map.len() >= IN_ALL {
            let oldest = map
                .iter()
                .min_by_key(|(_, k)| k.since)
                .map(|(k, _)| k.clone());
            if let Some(oldest) = oldest {
                map.remove(&oldest);
            }
        }
        map.insert(key, kept);
    }

    /// Takes back the broken upload with `key`, if it is still kept.
    pub(crate) fn take(&self, key: &Key, ttl: Duration) -> Option<Kept> {
        let mut map = self.kept.lock().unwrap_or_else(PoisonError::into_inner);
        map.retain(|_, k| k.since.elapsed() < ttl);
        map.remove(key)
    }

    /// Who the broken upload with this id was forwarded to, if it is kept.
    pub(crate) fn recipients_of(&self, id: u64) -> Option<super::resume::Recipients> {
        let map = self.kept.lock().unwrap_or_else(PoisonError::into_inner);
        map.values()
            .find(|k| k.id == id)
            .map(|k| k.recipients.clone())
    }

    /// Drops the broken uploads that outlived `ttl`.
    pub(crate) fn sweep(&self, ttl: Duration) {
        let mut map = self.kept.lock().unwrap_or_else(PoisonError::into_inner);
        map.retain(|_, k| k.since.elapsed() < ttl);
    }
}
