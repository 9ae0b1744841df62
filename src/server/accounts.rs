//! Passwords: argon2id hashing on a bounded pool, and the brakes on guessing.
//!
//! * Hashes use argon2id with OWASP's current parameters (19 MiB, 2 passes, 1 lane) and a
//!   random salt, kept as PHC strings; verifying compares in constant time (the
//!   `password-hash` crate's output comparison).
//! * Hashing costs tens of milliseconds of one core by design, so it runs on tokio's
//!   blocking pool behind a semaphore of [`HASHING_THREADS`] permits: a flood of logins
//!   queues there and never takes the cores the chat tasks run on.
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
use tokio::sync::Semaphore;

use crate::flow::Refusal;
use crate::protocol::command::check_password;
use crate::protocol::names::{check_username, normalize};
use crate::protocol::skeleton;
use crate::store::{Account, Store};

/// Hashes computed at once (each takes one core for tens of milliseconds).
pub(crate) const HASHING_THREADS: usize = 1;
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

/// A random secret, in hex (for the file connection's proof).
pub(crate) fn token() -> String {
    let mut bytes = [0u8; 16];
    // Without randomness the token is all zeros and proves nothing; the file port then
    // still accepts the name-and-address way, so log it and go on.
    if let Err(e) = getrandom::getrandom(&mut bytes) {
        tracing::error!("[ACCOUNTS] no randomness for a session token: {e}");
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
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

#[derive(Clone, PartialEq, Eq, Hash)]
enum Key {
    Name(String),
    Address(IpAddr),
}

struct Failures {
    count: u32,
    last: Instant,
}

/// The server's password work and its guessing brakes.
pub(crate) struct Accounts {
    pool: Semaphore,
    failures: Mutex<HashMap<Key, Failures>>,
    /// Failures that lock a name or an address out.
    attempts: u32,
    /// How long a lockout lasts (and how long failures are remembered).
    lockout: Duration,
}

impl Accounts {
    pub(crate) fn new(attempts: usize, lockout: Duration) -> Self {
        Self {
            pool: Semaphore::new(HASHING_THREADS),
            failures: Mutex::default(),
            attempts: u32::try_from(attempts).unwrap_or(u32::MAX).max(1),
            lockout,
        }
    }

    async fn on_pool<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Refusal> {
        let _permit = self
            .pool
            .acquire()
            .await
            .map_err(|_| Refusal::ShuttingDown)?;
        tokio::task::spawn_blocking(f)
            .await
            .map_err(|_| Refusal::StoreFailed)
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

    /// If `name` or `ip` is locked out: for how many more seconds.
    pub(crate) fn locked(&self, name: &str, ip: IpAddr) -> Option<u64> {
        let table = self.table();
        let left = [Key::Name(name.to_owned()), Key::Address(ip)]
            .iter()
            .filter_map(|key| table.get(key))
            .filter(|f| f.count >= self.attempts)
            .filter_map(|f| (f.last + self.lockout).checked_duration_since(Instant::now()))
            .max()?;
        Some(left.as_secs().max(1))
    }

    /// Counts a wrong password; returns how long to hold the answer back.
    pub(crate) fn failed(&self, name: &str, ip: IpAddr) -> Duration {
        let mut table = self.table();
        let now = Instant::now();
        if table.len() >= MAX_TRACKED {
            table.retain(|_, f| now.duration_since(f.last) < self.lockout);
        }
        let mut worst = 0;
        for key in [Key::Name(name.to_owned()), Key::Address(ip)] {
            let entry = table.entry(key).or_insert(Failures {
                count: 0,
                last: now,
            });
            if now.duration_since(entry.last) >= self.lockout {
                entry.count = 0; // an old streak is forgiven
            }
            entry.count += 1;
            entry.last = now;
            worst = worst.max(entry.count);
        }
        (Duration::from_secs(u64::from(worst - 1))).min(MAX_DELAY)
    }

    /// A right password: the name's and the address's failures are forgotten.
    pub(crate) fn succeeded(&self, name: &str, ip: IpAddr) {
        let mut table = self.table();
        table.remove(&Key::Name(name.to_owned()));
        table.remove(&Key::Address(ip));
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
        assert_eq!(accounts.failed("alice", ip), Duration::ZERO);
        assert_eq!(accounts.failed("alice", ip), Duration::from_secs(1));
        assert_eq!(accounts.locked("alice", ip), None);
        accounts.failed("alice", ip);
        let left = accounts.locked("alice", other).expect("the name is locked");
        assert!((59..=60).contains(&left), "{left}");
        assert!(accounts.locked("bob", ip).is_some(), "so is the address");
        assert_eq!(accounts.locked("bob", other), None);
        accounts.succeeded("alice", ip);
        assert_eq!(accounts.locked("alice", ip), None);
    }

    #[test]
    fn tokens_are_random_hex() {
        let (a, b) = (token(), token());
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
