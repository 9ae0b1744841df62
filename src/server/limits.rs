//! Resource limits that span connections: the connection gate (in total and per address)
//! and the disk ledger (free space and each user's quota for the server's saved copies).

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

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
    pub(crate) fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Admission, &'static str> {
        let permit = self
            .total
            .clone()
            .try_acquire_owned()
            .map_err(|_| "the server is full; try again later")?;
        let mut map = locked(&self.per_address);
        let n = map.entry(ip).or_insert(0);
        if *n >= self.max_per_address {
            return Err("too many connections from your address");
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
struct Usage {
    /// Bytes of saved copies per user, counted since the server started.
    per_user: HashMap<String, u64>,
    /// Bytes promised to uploads under way (not yet on disk).
    in_flight: u64,
}

/// Decides whether an upload fits: the user's quota and the disk's free space.
pub(crate) struct DiskLedger {
    data_dir: PathBuf,
    quota: u64,
    min_free: u64,
    usage: Mutex<Usage>,
}

/// Space set aside for one upload. Dropped without `commit`, it is given back.
pub(crate) struct Reservation {
    ledger: Arc<DiskLedger>,
    user: String,
    size: u64,
    committed: bool,
}

impl DiskLedger {
    pub(crate) fn new(data_dir: PathBuf, quota: u64, min_free: u64) -> Arc<Self> {
        Arc::new(Self {
            data_dir,
            quota,
            min_free,
            usage: Mutex::default(),
        })
    }

    /// Free bytes on the data directory's file system (for unprivileged users).
    fn free_space(&self) -> Option<u64> {
        let st = rustix::fs::statvfs(&self.data_dir).ok()?;
        Some(st.f_bavail.saturating_mul(st.f_frsize))
    }

    /// Sets `size` bytes aside for `user`, or says why the upload cannot be stored.
    pub(crate) fn reserve(self: &Arc<Self>, user: &str, size: u64) -> Result<Reservation, String> {
        let mut usage = locked(&self.usage);
        let used = usage.per_user.get(user).copied().unwrap_or(0);
        if used.saturating_add(size) > self.quota {
            return Err(format!(
                "upload quota exceeded: {used} of {} bytes used, this file needs {size}",
                self.quota
            ));
        }
        if let Some(free) = self.free_space() {
            let needed = usage
                .in_flight
                .saturating_add(size)
                .saturating_add(self.min_free);
            if needed > free {
                return Err("not enough disk space on the server for this file".into());
            }
        }
        usage.in_flight += size;
        *usage.per_user.entry(user.to_owned()).or_insert(0) += size;
        Ok(Reservation {
            ledger: self.clone(),
            user: user.to_owned(),
            size,
            committed: false,
        })
    }
}

impl Reservation {
    /// The upload is on disk; `replaced` bytes of an older copy of the same name are gone.
    pub(crate) fn commit(mut self, replaced: u64) {
        self.committed = true;
        let mut usage = locked(&self.ledger.usage);
        usage.in_flight -= self.size;
        if let Some(used) = usage.per_user.get_mut(&self.user) {
            *used = used.saturating_sub(replaced);
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        let mut usage = locked(&self.ledger.usage);
        usage.in_flight -= self.size;
        if let Some(used) = usage.per_user.get_mut(&self.user) {
            *used = used.saturating_sub(self.size);
        }
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
        assert_eq!(
            gate.admit(a).err(),
            Some("too many connections from your address")
        );
        let _third = gate.admit(b).expect("room");
        assert_eq!(
            gate.admit(b).err(),
            Some("the server is full; try again later")
        );
        drop(first);
        assert!(gate.admit(a).is_ok());
    }

    #[test]
    fn the_ledger_enforces_the_quota_and_gives_back_failed_uploads() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ledger = DiskLedger::new(dir.path().into(), 100, 0);
        let r = ledger.reserve("alice", 60).expect("fits");
        assert!(ledger.reserve("alice", 50).is_err());
        assert!(ledger.reserve("bob", 50).is_ok());
        drop(r);
        let r = ledger.reserve("alice", 90).expect("given back");
        r.commit(0);
        let err = ledger.reserve("alice", 20).err().expect("over quota");
        assert_eq!(
            err,
            "upload quota exceeded: 90 of 100 bytes used, this file needs 20"
        );
        let r = ledger.reserve("alice", 10).expect("fits exactly");
        r.commit(90);
        assert!(ledger.reserve("alice", 80).is_ok());
    }

    #[test]
    fn the_ledger_keeps_the_minimum_free_space() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ledger = DiskLedger::new(dir.path().into(), u64::MAX, u64::MAX / 2);
        let err = ledger.reserve("alice", 1).err().expect("no room");
        assert_eq!(err, "not enough disk space on the server for this file");
    }
}
