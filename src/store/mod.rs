//! What the server keeps beyond a connection, behind one narrow interface: the [`Store`]
//! trait.
//!
//! Accounts, group memberships, offline inboxes, message history, the file index and
//! upload quotas all live here. The server talks to the trait only; nothing else in the
//! server knows how they are kept. [`MemoryStore`] keeps them in memory (a restart forgets
//! everything, as the lab's server does); an embedded SQLite store, and later a networked
//! database shared by several nodes, implement the same trait.
//!
//! Every method returns a boxed future, so an implementation that does I/O can do it on
//! threads of its own and never block the server's tokio workers. [`SqliteStore`] keeps it
//! all in one SQLite file (one writer thread with group commit, readers on their own
//! connections).

mod memory;
mod sqlite;

use std::future::Future;
use std::pin::Pin;
use std::time::SystemTime;

pub use memory::MemoryStore;
pub use sqlite::SqliteStore;

/// A store operation in flight.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// Why a store operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The store could not be read or written.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// A record that must be unique exists already.
    #[error("{0} exists already")]
    Exists(String),
}

/// A registered name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    /// The username it owns.
    pub name: String,
    /// The password hash, in PHC string format.
    pub password_hash: String,
    /// When it was registered.
    pub created: SystemTime,
}

/// Where a message went.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Scope {
    /// A private message to this user.
    User(String),
    /// A message to this group.
    Group(String),
    /// A broadcast.
    Everyone,
}

/// One chat message, as kept for history and offline inboxes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Who sent it.
    pub from: String,
    /// Where it went.
    pub to: Scope,
    /// What it said.
    pub text: String,
    /// When the server accepted it.
    pub at: SystemTime,
}

/// One file the server saved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRecord {
    /// The upload's id (unique for the server's life).
    pub id: u64,
    /// Who uploaded it.
    pub sender: String,
    /// Where it was sent (`bob` or `GROUP:devs`).
    pub target: String,
    /// Its name as sent.
    pub filename: String,
    /// The server's copy, in the data directory.
    pub saved_as: String,
    /// Its size in bytes.
    pub size: u64,
    /// Its BLAKE3 hash, in hex (empty for files indexed before hashes were kept).
    pub blake3: String,
    /// When it was saved.
    pub at: SystemTime,
}

/// The server's persistent state. Implementations are shared by every connection task.
pub trait Store: Send + Sync + 'static {
    /// The account that owns `name`, if it is registered.
    fn account(&self, name: &str) -> StoreFuture<'_, Option<Account>>;
    /// Registers a name; fails with [`StoreError::Exists`] if it is taken.
    fn create_account(&self, account: Account) -> StoreFuture<'_, ()>;

    /// The groups `user` belongs to (beyond its connection).
    fn memberships(&self, user: &str) -> StoreFuture<'_, Vec<String>>;
    /// Records that `user` is in `group`.
    fn add_membership(&self, user: &str, group: &str) -> StoreFuture<'_, ()>;
    /// Records that `user` left `group`.
    fn remove_membership(&self, user: &str, group: &str) -> StoreFuture<'_, ()>;

    /// Keeps a message for `user` until it next logs in.
    fn push_inbox(&self, user: &str, message: Message) -> StoreFuture<'_, ()>;
    /// Takes (and forgets) every message kept for `user`, oldest first.
    fn take_inbox(&self, user: &str) -> StoreFuture<'_, Vec<Message>>;

    /// Appends a delivered message to the history.
    fn append_history(&self, message: Message) -> StoreFuture<'_, ()>;
    /// The last `limit` messages of a conversation, oldest first.
    fn history(&self, scope: &Scope, limit: usize) -> StoreFuture<'_, Vec<Message>>;

    /// Adds a saved file to the index.
    fn record_file(&self, file: FileRecord) -> StoreFuture<'_, ()>;
    /// Files sent by or to `user` (directly), oldest first.
    fn files_of(&self, user: &str) -> StoreFuture<'_, Vec<FileRecord>>;

    /// Bytes of saved copies `user` has stored.
    fn bytes_stored(&self, user: &str) -> StoreFuture<'_, u64>;
    /// Changes the bytes `user` has stored by `delta` (never below zero).
    fn add_bytes_stored(&self, user: &str, delta: i64) -> StoreFuture<'_, ()>;
}

/// What every [`Store`] must do, as one test run against each implementation.
#[cfg(test)]
pub(crate) mod contract {
    use std::time::{Duration, SystemTime};

    use super::*;

    fn at(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(s)
    }

    fn message(from: &str, to: Scope, text: &str) -> Message {
        Message {
            from: from.into(),
            to,
            text: text.into(),
            at: at(1_700_000_000),
        }
    }

    /// Runs every operation of the trait against `store` (which must start empty).
    pub(crate) async fn check(store: &dyn Store) {
        let account = Account {
            name: "alice".into(),
            password_hash: "$argon2id$v=19$...".into(),
            created: at(1_700_000_000),
        };
        store.create_account(account.clone()).await.expect("new");
        assert!(matches!(
            store.create_account(account.clone()).await,
            Err(StoreError::Exists(_))
        ));
        assert_eq!(store.account("alice").await.expect("read"), Some(account));
        assert_eq!(store.account("bob").await.expect("read"), None);
        assert_eq!(
            store
                .account("'; DROP TABLE accounts; --")
                .await
                .expect("read"),
            None
        );

        for text in ["one", "two"] {
            let m = message("alice", Scope::User("bob".into()), text);
            store.push_inbox("bob", m).await.expect("kept");
        }
        let inbox = store.take_inbox("bob").await.expect("taken");
        let texts: Vec<&str> = inbox.iter().map(|m| m.text.as_str()).collect();
        assert_eq!(texts, ["one", "two"]);
        assert_eq!(inbox[0].at, at(1_700_000_000));
        assert!(store.take_inbox("bob").await.expect("taken").is_empty());

        let devs = Scope::Group("devs".into());
        for i in 0..5 {
            let m = message("alice", devs.clone(), &i.to_string());
            store.append_history(m).await.expect("kept");
        }
        store
            .append_history(message("bob", Scope::Everyone, "hi"))
            .await
            .expect("kept");
        let last = store.history(&devs, 2).await.expect("read");
        let texts: Vec<&str> = last.iter().map(|m| m.text.as_str()).collect();
        assert_eq!(texts, ["3", "4"]);
        assert_eq!(
            store
                .history(&Scope::Everyone, 10)
                .await
                .expect("read")
                .len(),
            1
        );

        store.add_membership("bob", "devs").await.expect("ok");
        store.add_membership("bob", "devs").await.expect("ok");
        store.add_membership("bob", "ops").await.expect("ok");
        store.remove_membership("bob", "ops").await.expect("ok");
        assert_eq!(store.memberships("bob").await.expect("read"), ["devs"]);

        let file = FileRecord {
            id: 7,
            sender: "alice".into(),
            target: "bob".into(),
            filename: "a.txt".into(),
            saved_as: "received_from_alice_a.txt".into(),
            size: 3,
            blake3: blake3::hash(b"abc").to_hex().to_string(),
            at: at(1_700_000_001),
        };
        store.record_file(file.clone()).await.expect("ok");
        assert_eq!(
            store.files_of("bob").await.expect("read"),
            std::slice::from_ref(&file)
        );
        assert_eq!(store.files_of("alice").await.expect("read"), [file]);
        assert!(store.files_of("carol").await.expect("read").is_empty());

        store.add_bytes_stored("alice", 100).await.expect("ok");
        store.add_bytes_stored("alice", -30).await.expect("ok");
        assert_eq!(store.bytes_stored("alice").await.expect("read"), 70);
        store.add_bytes_stored("alice", -100).await.expect("ok");
        assert_eq!(store.bytes_stored("alice").await.expect("read"), 0);
    }
}
