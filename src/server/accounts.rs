//! Passwords: argon2id hashing on a bounded pool, and the brakes on guessing.
//!
//! * Hashes use argon2id with OWASP's current parameters (19 MiB, 2 passes, 1 lane) and a
//!   random salt, kept as PHC strings; verifying compares in constant time (the
//!   `password-hash` crate's output comparison).
//! * Hashing costs tens of milliseconds of one core by design, so it runs on one thread of
//!   its own at the lowest priority (nice 19), fed by a bounded queue: a flood of logins
//!   queues there, and the chat tasks take the CPU from it whenever they have work.
//! * Failures are counted per name and per address. After the first, each wrong answer is
//!   slowed by a second more (up to [`MAX_DELAY`]); at `login_attempts` failures the name
//!   (or the address) is locked out for `login_lockout`, and a try meanwhile is refused
//!   without looking at its password. A success clears the name's and the address's count.
//!
//! No password is ever logged: they are moved into the hashing task and dropped there.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use tokio::sync::{mpsc, oneshot};

use crate::flow::Refusal;
use crate::protocol::command::check_password;
use crate::protocol::names::{check_username, normalize};
use crate::protocol::skeleton;
use crate::store::{Account, Store};

/// Hashing jobs waiting at most; past it, logins wait to queue theirs.
const HASHING_QUEUE: usize = 256;
/// The longest a wrong password's answer is held back.
const MAX_DELAY: Duration = Duration::from_secs(5);
/// Names and addresses with recent failures remembered at most (the oldest are forgotten).
const MAX_TRACKED: usize = 100_000;

/// argon2id with OWASP's parameters: m = 19 MiB, t = 2, p = 1.
fn argon2() -> Argon2<'static> {
    let params = Params::new(19 * 1024, 2, 1, None).unwrap_or_default();
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

/// Hashes `password` (blocking: tens of milliseconds). Also used offline, by the
/// `accounts` command.
pub fn hash_password(password: &str) -> Result<String, String> {
    let mut salt = [0u8; 16];
    getrandom::getrandom(&mut salt).map_err(|e| format!("no randomness: {e}"))?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| e.to_string())?;
    argon2()
        .hash_password(password.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(|e| e.to_string())
}

/// Whether `password` matches the PHC string `hash` (blocking; constant-time comparison).
pub fn verify_password(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|parsed| {
        argon2()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok()
    })
}

/// A random secret, in hex (for the file connection's proof); `None` without randomness
/// (then no proof is given, and the file port goes by name and address).
pub(crate) fn token() -> Option<String> {
    let mut bytes = [0u8; 16];
    if let Err(e) = getrandom::getrandom(&mut bytes) {
        tracing::error!("[ACCOUNTS] no randomness for a session token: {e}");
        return None;
    }
    Some(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Registers `name` with `password` in `store`, offline (the operator's `accounts add`):
/// the same rules as `register` (a valid name, a valid password, no look-alike of a
/// registered name). Returns the name as stored (in NFC).
pub async fn add_account(store: &dyn Store, name: &str, password: &str) -> Result<String, String> {
    let name = checked_name(name)?;
    check_password(password).map_err(|e| e.to_string())?;
    let taken = store.accounts().await.map_err(|e| e.to_string())?;
    let wanted = skeleton(&name);
    if let Some(other) = taken.iter().find(|a| skeleton(&a.name) == wanted) {
        return Err(match other.name == name {
            true => format!("'{name}' is registered already"),
            false => format!(
                "'{name}' looks too much like '{}', which is registered",
                other.name
            ),
        });
    }
    let password_hash = hash_blocking(password).await?;
    let account = Account {
        name: name.clone(),
        password_hash,
        created: std::time::SystemTime::now(),
    };
    store
        .create_account(account)
        .await
        .map_err(|e| e.to_string())?;
    Ok(name)
}

/// Sets `name`'s password, offline (`accounts passwd`); false if no such account.
pub async fn set_account_password(
    store: &dyn Store,
    name: &str,
    password: &str,
) -> Result<bool, String> {
    let name = checked_name(name)?;
    check_password(password).map_err(|e| e.to_string())?;
    let hash = hash_blocking(password).await?;
    store
        .set_password(&name, hash)
        .await
        .map_err(|e| e.to_string())
}

fn checked_name(name: &str) -> Result<String, String> {
    let name = normalize(name.trim()).into_owned();
    check_username(&name).map_err(|e| e.to_string())?;
    Ok(name)
}

async fn hash_blocking(password: &str) -> Result<String, String> {
    let password = password.to_owned();
    tokio::task::spawn_blocking(move || hash_password(&password))
        .await
        .map_err(|e| e.to_string())?
}

/// Starts the hashing thread, at the lowest priority; it ends when the server drops its
/// queue.
fn start_hasher() -> mpsc::Sender<Job> {
    let (tx, mut rx) = mpsc::channel::<Job>(HASHING_QUEUE);
    let started = std::thread::Builder::new()
        .name("relaychat-hash".into())
        .spawn(move || {
            // On Linux a thread's nice value is its own (setpriority on its thread id).
            let me = rustix::thread::gettid();
            if let Err(e) = rustix::process::setpriority_process(Some(me), 19) {
                tracing::warn!("[ACCOUNTS] cannot lower the hashing thread's priority: {e}");
            }
            while let Some(job) = rx.blocking_recv() {
                job();
            }
        });
    if let Err(e) = started {
        tracing::error!("[ACCOUNTS] cannot start the hashing thread: {e}");
    }
    tx
}

#[derive(Clone, PartialEq, Eq, Hash)]
enum Key {
    Name(String),
    Address(IpAddr),
}

struct Failures {
    /// Wrong passwords in the current streak.
    count: u32,
    /// Attempts whose password is being checked.
    in_flight: u32,
    /// When the last one failed.
    last: Instant,
}

/// A password job for the hashing thread.
type Job = Box<dyn FnOnce() + Send>;

/// The server's password work and its guessing brakes.
pub(crate) struct Accounts {
    /// Jobs for the hashing thread (started with the first one).
    hasher: std::sync::OnceLock<mpsc::Sender<Job>>,
    failures: Mutex<HashMap<Key, Failures>>,
    /// Failures that lock a name or an address out.
    attempts: u32,
    /// How long a lockout lasts (and how long failures are remembered).
    lockout: Duration,
}

impl Accounts {
    pub(crate) fn new(attempts: usize, lockout: Duration) -> Self {
        Self {
            hasher: std::sync::OnceLock::new(),
            failures: Mutex::default(),
            attempts: u32::try_from(attempts).unwrap_or(u32::MAX).max(1),
            lockout,
        }
    }

    async fn on_pool<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Refusal> {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(f());
        });
        let hasher = self.hasher.get_or_init(start_hasher);
        hasher.send(job).await.map_err(|_| Refusal::StoreFailed)?;
        rx.await.map_err(|_| Refusal::StoreFailed)
    }

    /// Hashes a new password on the pool.
    pub(crate) async fn hash(&self, password: String) -> Result<String, Refusal> {
        self.on_pool(move || hash_password(&password))
            .await?
            .map_err(|e| {
                tracing::error!("[ACCOUNTS] cannot hash a password: {e}");
                Refusal::StoreFailed
            })
    }

    /// Checks a password against its hash on the pool.
    pub(crate) async fn verify(&self, password: String, hash: String) -> Result<bool, Refusal> {
        self.on_pool(move || verify_password(&password, &hash))
            .await
    }

    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Failures>> {
        self.failures.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts a password attempt for `name` from `ip`: refused while the name or the
    /// address is locked out, or has as many attempts under way as it may still fail
    /// (so parallel connections cannot guess past the limit).
    pub(crate) fn attempt(&self, name: &str, ip: IpAddr) -> Result<Attempt<'_>, Refusal> {
        let mut table = self.table();
        let now = Instant::now();
        let keys = [Key::Name(name.to_owned()), Key::Address(ip)];
        let mut wait = None;
        for key in &keys {
            let Some(f) = table.get_mut(key) else {
                continue;
            };
            if f.in_flight == 0 && now.duration_since(f.last) >= self.lockout {
                f.count = 0; // an old streak is forgiven
            }
            if f.count >= self.attempts {
                let left = (f.last + self.lockout).saturating_duration_since(now);
                wait = wait.max(Some(left.as_secs().max(1)));
            } else if f.count + f.in_flight >= self.attempts {
                wait = wait.max(Some(1));
            }
        }
        if let Some(secs) = wait {
            return Err(Refusal::TooManyAttempts(secs));
        }
        if table.len() >= MAX_TRACKED {
            table.retain(|_, f| f.in_flight > 0 || now.duration_since(f.last) < self.lockout);
        }
        for key in &keys {
            let entry = table.entry(key.clone()).or_insert(Failures {
                count: 0,
                in_flight: 0,
                last: now,
            });
            entry.in_flight += 1;
        }
        Ok(Attempt {
            accounts: self,
            keys,
        })
    }
}

/// A password attempt under way (see [`Accounts::attempt`]); counted as a failure unless
/// it [`succeeded`](Attempt::succeeded).
pub(crate) struct Attempt<'a> {
    accounts: &'a Accounts,
    keys: [Key; 2],
}

impl Attempt<'_> {
    /// A wrong password: counted against the name and the address; returns how long to
    /// hold the answer back.
    pub(crate) fn failed(self) -> Duration {
        let mut table = self.accounts.table();
        let now = Instant::now();
        let mut worst = 0;
        for key in &self.keys {
            if let Some(f) = table.get_mut(key) {
                f.count += 1;
                f.last = now;
                worst = worst.max(f.count);
            }
        }
        Duration::from_secs(u64::from(worst.saturating_sub(1))).min(MAX_DELAY)
    }

    /// The right password: the name's failures are forgotten (the address's are not, or
    /// one account of one's own would wash a guessing spree clean).
    pub(crate) fn succeeded(self) {
        let mut table = self.accounts.table();
        if let Some(f) = table.get_mut(&self.keys[0]) {
            f.count = 0;
        }
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        let mut table = self.accounts.table();
        for key in &self.keys {
            if let Some(f) = table.get_mut(key) {
                f.in_flight = f.in_flight.saturating_sub(1);
                if f.in_flight == 0 && f.count == 0 {
                    table.remove(key);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hash_verifies_its_password_only() {
        let hash = hash_password("correct horse").expect("hashes");
        assert!(
            hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
            "{hash}"
        );
        assert!(verify_password("correct horse", &hash));
        assert!(!verify_password("correct horsf", &hash));
        assert!(!verify_password("correct horse", "not a hash"));
        assert_ne!(
            hash,
            hash_password("correct horse").expect("hashes"),
            "salted"
        );
    }

    #[test]
    fn failures_slow_down_then_lock_out_and_a_success_clears_them() {
        let accounts = Accounts::new(3, Duration::from_secs(60));
        let ip: IpAddr = "10.0.0.1".parse().expect("ip");
        let other: IpAddr = "10.0.0.2".parse().expect("ip");
        let try_ = |name, ip| accounts.attempt(name, ip);
        assert_eq!(try_("alice", ip).expect("free").failed(), Duration::ZERO);
        assert_eq!(
            try_("alice", ip).expect("free").failed(),
            Duration::from_secs(1)
        );
        try_("alice", ip).expect("one left").failed();
        let Err(Refusal::TooManyAttempts(left)) = try_("alice", other) else {
            panic!("the name is locked");
        };
        assert!((59..=60).contains(&left), "{left}");
        assert!(try_("bob", ip).is_err(), "so is the address");
        try_("bob", other).expect("free").succeeded();

        // Attempts under way count: parallel connections cannot guess past the limit.
        let fresh = Accounts::new(2, Duration::from_secs(60));
        let first = fresh.attempt("carol", other).expect("free");
        let second = fresh.attempt("carol", other).expect("free");
        assert!(matches!(
            fresh.attempt("carol", other),
            Err(Refusal::TooManyAttempts(1))
        ));
        first.succeeded();
        drop(second);
        fresh
            .attempt("carol", other)
            .expect("free again")
            .succeeded();
    }

    #[test]
    fn tokens_are_random_hex() {
        let (a, b) = (token().expect("random"), token().expect("random"));
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
