//! Resource limits that span connections: the connection gate (in total and per address)
//! and the disk ledger (free space and each user's quota for the server's saved copies).

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::warn;

use crate::flow::Refusal;
use crate::store::Store;

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Admits connections while there is room, overall and for their source address.
pub(crate) struct Gate {
    total: Arc<Semaphore>,
    per_address: Mutex<HashMap<IpAddr, usize>>,
    max_per_address: usize,
}

/// A connection's place; dropping it frees the place.
pub(crate) struct Admission {
    _permit: OwnedSemaphorePermit,
    gate: Arc<Gate>,
    ip: IpAddr,
}

impl Drop for Admission {
    fn drop(&mut self) {
        let mut map = locked(&self.gate.per_address);
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

impl Gate {
    pub(crate) fn new(max_connections: usize, max_per_address: usize) -> Arc<Self> {
        Arc::new(Self {
            total: Arc::new(Semaphore::new(
                max_connections.clamp(1, Semaphore::MAX_PERMITS),
            )),
            per_address: Mutex::default(),
            max_per_address: max_per_address.max(1),
        })
    }

    /// A place for a connection from `ip`, or why there is none.
    pub(crate) fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Admission, Refusal> {
        let permit = self
            .total
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refusal::ServerFull)?;
        let mut map = locked(&self.per_address);
        let n = map.entry(ip).or_insert(0);
        if *n >= self.max_per_address {
            return Err(Refusal::TooManyFromAddress);
        }
        *n += 1;
        Ok(Admission {
            _permit: permit,
            gate: self.clone(),
            ip,
        })
    }
}

#[derive(Default)]
struct InFlight {
    /// Bytes promised to uploads under way, per user.
    per_user: HashMap<String, u64>,
    /// Bytes promised to uploads under way, in all.
    total: u64,
}

impl InFlight {
    fn release(&mut self, user: &str, size: u64) {
        self.total -= size;
        if let Some(n) = self.per_user.get_mut(user) {
            *n -= size;
            if *n == 0 {
                self.per_user.remove(user);
            }
        }
    }
}

/// Decides whether an upload fits: the user's quota (bytes stored, kept in the [`Store`],
/// plus uploads under way) and the disk's free space.
pub(crate) struct DiskLedger {
    data_dir: PathBuf,
    quota: u64,
    min_free: u64,
    store: Arc<dyn Store>,
    in_flight: Mutex<InFlight>,
    /// Orders reservations and commits: a reservation never reads the stored bytes between
    /// a commit's store write and its release of the in-flight bytes.
    order: tokio::sync::Mutex<()>,
}

/// Space set aside for one upload. Dropped without `commit`, it is given back.
pub(crate) struct Reservation {
    ledger: Arc<DiskLedger>,
    user: String,
    size: u64,
}

impl DiskLedger {
    pub(crate) fn new(
        data_dir: PathBuf,
        quota: u64,
        min_free: u64,
        store: Arc<dyn Store>,
    ) -> Arc<Self> {
        Arc::new(Self {
            data_dir,
            quota,
            min_free,
            store,
            in_flight: Mutex::default(),
            order: tokio::sync::Mutex::new(()),
        })
    }

    /// Free bytes on the data directory's file system (for unprivileged users).
    fn free_space(&self) -> Option<u64> {
        let st = rustix::fs::statvfs(&self.data_dir).ok()?;
        Some(st.f_bavail.saturating_mul(st.f_frsize))
    }

    /// Sets `size` bytes aside for `user`, or says why the upload cannot be stored.
    pub(crate) async fn reserve(
        self: &Arc<Self>,
        user: &str,
        size: u64,
    ) -> Result<Reservation, Refusal> {
        let _order = self.order.lock().await;
        let stored = self.store.bytes_stored(user).await.map_err(|e| {
            warn!("[STORE] cannot read {user}'s stored bytes: {e}");
            Refusal::Store(e.to_string())
        })?;
        let mut in_flight = locked(&self.in_flight);
        let pending = in_flight.per_user.get(user).copied().unwrap_or(0);
        let used = stored.saturating_add(pending);
        if used.saturating_add(size) > self.quota {
            return Err(Refusal::Quota {
                used,
                quota: self.quota,
                size,
            });
        }
        if let Some(free) = self.free_space() {
            let needed = in_flight
                .total
                .saturating_add(size)
                .saturating_add(self.min_free);
            if needed > free {
                return Err(Refusal::DiskFull);
            }
        }
        in_flight.total += size;
        *in_flight.per_user.entry(user.to_owned()).or_insert(0) += size;
        Ok(Reservation {
            ledger: self.clone(),
            user: user.to_owned(),
            size,
        })
    }
}

impl Reservation {
    /// The upload is on disk (under a name of its own: saved copies never replace one
    /// another).
    pub(crate) async fn commit(self) {
        // Stored before the in-flight bytes are released (by the drop), under the order
        // lock, so a concurrent reservation never sees neither.
        let ledger = self.ledger.clone();
        let _order = ledger.order.lock().await;
        let delta = i64::try_from(self.size).unwrap_or(i64::MAX);
        if let Err(e) = ledger.store.add_bytes_stored(&self.user, delta).await {
            warn!("[STORE] cannot record {}'s stored bytes: {e}", self.user);
        }
        drop(self);
    }
}

impl Drop for Reservation {
    /// In-flight bytes are given back however the upload ended (committed or not, or its
    /// future dropped mid-commit).
    fn drop(&mut self) {
        locked(&self.ledger.in_flight).release(&self.user, self.size);
    }
}

/// Raises the open-file soft limit to the hard limit; returns (soft, hard) as now in force.
pub fn raise_open_file_limit() -> (Option<u64>, Option<u64>) {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        let raised = rustix::process::Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        let _ = setrlimit(Resource::Nofile, raised);
    }
    let now = getrlimit(Resource::Nofile);
    (now.current, now.maximum)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gate_counts_per_address_and_in_total() {
        let gate = Gate::new(3, 2);
        let a: IpAddr = "127.0.0.1".parse().expect("ip");
        let b: IpAddr = "127.0.0.2".parse().expect("ip");
        let first = gate.admit(a).expect("room");
        let _second = gate.admit(a).expect("room");
        assert!(matches!(gate.admit(a), Err(Refusal::TooManyFromAddress)));
        let _third = gate.admit(b).expect("room");
        assert!(matches!(gate.admit(b), Err(Refusal::ServerFull)));
        drop(first);
        assert!(gate.admit(a).is_ok());
    }

    fn ledger(quota: u64, min_free: u64) -> (tempfile::TempDir, Arc<DiskLedger>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(crate::store::SqliteStore::in_memory());
        let ledger = DiskLedger::new(dir.path().into(), quota, min_free, store);
        (dir, ledger)
    }

    #[tokio::test]
    async fn the_ledger_enforces_the_quota_and_gives_back_failed_uploads() {
        let (_dir, ledger) = ledger(100, 0);
        let r = ledger.reserve("alice", 60).await.expect("fits");
        assert!(ledger.reserve("alice", 50).await.is_err());
        assert!(ledger.reserve("bob", 50).await.is_ok());
        drop(r);
        let r = ledger.reserve("alice", 90).await.expect("given back");
        r.commit().await;
        let err = ledger.reserve("alice", 20).await.err().expect("over quota");
        assert_eq!(
            err.to_string(),
            "upload quota exceeded: 90 of 100 bytes used, this file needs 20"
        );
        let r = ledger.reserve("alice", 10).await.expect("fits exactly");
        r.commit().await;
        assert!(
            ledger.reserve("alice", 1).await.is_err(),
            "the quota is used up"
        );
    }

    #[tokio::test]
    async fn the_ledger_keeps_the_minimum_free_space() {
        let (_dir, ledger) = ledger(u64::MAX, u64::MAX / 2);
        let err = ledger.reserve("alice", 1).await.err().expect("no room");
        assert!(matches!(err, Refusal::DiskFull));
    }
}
