//! What the server keeps beyond a connection, behind one narrow interface: the [`Store`]
//! trait.
//!
//! Accounts, group memberships, offline inboxes, message history, the file index and
//! upload quotas all live here. The server talks to the trait only; nothing else in the
//! server knows how they are kept. [`SqliteStore`] keeps them in one SQLite file (or, for
//! `:memory:`, in memory: a restart forgets everything, as the lab's server does); a
//! networked database shared by several nodes can implement the same trait later.
//!
//! Every method returns a boxed future, so an implementation that does I/O can do it on
//! threads of its own and never block the server's tokio workers. [`SqliteStore`] keeps it
//! all in one SQLite file (one writer thread with group commit, readers on their own
//! connections).

mod sqlite;

use std::future::Future;
use std::pin::Pin;
use std::time::SystemTime;

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
    /// Not a message: an acknowledgement kept for a sender who was away (`from` received
    /// the file named `text`); replayed as `[ACK] <from> received file '<text>'`.
    Ack,
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

impl Scope {
    /// The scope, borrowed.
    pub fn as_ref(&self) -> ScopeRef<'_> {
        match self {
            Scope::User(user) => ScopeRef::User(user),
            Scope::Group(group) => ScopeRef::Group(group),
            Scope::Everyone => ScopeRef::Everyone,
            Scope::Ack => ScopeRef::Ack,
        }
    }
}

/// Where a message went, borrowed (see [`Scope`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum ScopeRef<'a> {
    User(&'a str),
    Group(&'a str),
    Everyone,
    Ack,
}

/// A message as the history takes it: borrowed from the line it came in, so keeping it
/// copies its parts once, into the history's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageRef<'a> {
    /// Who sent it.
    pub from: &'a str,
    /// Where it went.
    pub to: ScopeRef<'a>,
    /// What it said.
    pub text: &'a str,
    /// When the server accepted it.
    pub at: SystemTime,
}

impl Message {
    /// The message, borrowed.
    pub fn as_ref(&self) -> MessageRef<'_> {
        MessageRef {
            from: &self.from,
            to: self.to.as_ref(),
            text: &self.text,
            at: self.at,
        }
    }
}

/// One file the server saved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRecord {
    /// Its id in the index (given by [`Store::record_file`], which ignores this field).
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

/// One message waiting in an offline inbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queued {
    /// Its place in the inbox (increasing; entries up to one are dropped together).
    pub id: u64,
    /// The message.
    pub message: Message,
}

/// The server's persistent state. Implementations are shared by every connection task.
pub trait Store: Send + Sync + 'static {
    /// The account that owns `name`, if it is registered.
    fn account(&self, name: &str) -> StoreFuture<'_, Option<Account>>;
    /// Registers a name; fails with [`StoreError::Exists`] if it is taken.
    fn create_account(&self, account: Account) -> StoreFuture<'_, ()>;
    /// Replaces an account's password hash; false if there is no such account.
    fn set_password(&self, name: &str, password_hash: String) -> StoreFuture<'_, bool>;
    /// Deletes an account with its memberships, inbox, kept files and private history;
    /// false if there was none.
    fn remove_account(&self, name: &str) -> StoreFuture<'_, bool>;
    /// Every account, by name.
    fn accounts(&self) -> StoreFuture<'_, Vec<Account>>;

    /// Every `(user, group)` membership, in order of joining.
    fn memberships(&self) -> StoreFuture<'_, Vec<(String, String)>>;
    /// Records that `user` is in `group`.
    fn add_membership(&self, user: &str, group: &str) -> StoreFuture<'_, ()>;
    /// Records that `user` left `group`.
    fn remove_membership(&self, user: &str, group: &str) -> StoreFuture<'_, ()>;

    /// Keeps `message` for each of `users` until they next log in, except for those whose
    /// inbox holds `max` messages already: those are returned.
    fn push_inbox(
        &self,
        users: Vec<String>,
        message: Message,
        max: u64,
    ) -> StoreFuture<'_, Vec<String>>;
    /// Up to `limit` messages of `user`'s inbox after entry `after`, oldest first.
    fn peek_inbox(&self, user: &str, after: u64, limit: usize) -> StoreFuture<'_, Vec<Queued>>;
    /// Forgets `user`'s inbox entries up to and including `upto` (they were delivered);
    /// how many there were.
    fn drop_inbox(&self, user: &str, upto: u64) -> StoreFuture<'_, u64>;

    /// Appends a delivered message to the history: `None` if it was taken with nothing
    /// to wait for (the common case, which costs the caller no future), else what to await
    /// (flow control). Either way it may not be durable yet; a later [`Store::history`]
    /// sees it all the same.
    fn append_history(&self, message: MessageRef<'_>) -> Option<StoreFuture<'_, ()>>;
    /// The last `limit` messages of a conversation sent at or after `since`, oldest
    /// first: of group `g` for `Scope::Group(g)`, between `me` and `u` (both ways) for
    /// `Scope::User(u)`.
    fn history(
        &self,
        me: &str,
        scope: &Scope,
        limit: usize,
        since: SystemTime,
    ) -> StoreFuture<'_, Vec<Message>>;
    /// Forgets history older than `before`; returns how many messages went.
    fn prune_history(&self, before: SystemTime) -> StoreFuture<'_, u64>;

    /// Adds a saved file to the index; returns its id there.
    fn record_file(&self, file: FileRecord) -> StoreFuture<'_, u64>;
    /// The last `limit` files sent by `user` or to one of `targets` (`bob`, `GROUP:devs`),
    /// oldest first.
    fn files_of(
        &self,
        user: &str,
        targets: Vec<String>,
        limit: usize,
    ) -> StoreFuture<'_, Vec<FileRecord>>;
    /// The indexed file with this id.
    fn file(&self, id: u64) -> StoreFuture<'_, Option<FileRecord>>;

    /// Keeps file `id` for `user` until its next login with a file connection.
    fn queue_file(&self, user: &str, id: u64) -> StoreFuture<'_, ()>;
    /// The files kept for `user`, oldest first.
    fn queued_files(&self, user: &str) -> StoreFuture<'_, Vec<FileRecord>>;
    /// Forgets that file `id` waits for `user` (it was delivered).
    fn drop_queued_file(&self, user: &str, id: u64) -> StoreFuture<'_, ()>;

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

    async fn append(store: &dyn Store, message: Message) {
        if let Some(pending) = store.append_history(message.as_ref()) {
            pending.await.expect("kept");
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
        assert!(store.set_password("alice", "new".into()).await.expect("ok"));
        assert!(!store.set_password("nobody", "x".into()).await.expect("ok"));
        let alice = store.account("alice").await.expect("read").expect("there");
        assert_eq!(alice.password_hash, "new");
        for name in ["carol", "dave"] {
            let account = Account {
                name: name.into(),
                password_hash: "h".into(),
                created: at(1_700_000_000),
            };
            store.create_account(account).await.expect("new");
        }
        let names: Vec<String> = store
            .accounts()
            .await
            .expect("read")
            .into_iter()
            .map(|a| a.name)
            .collect();
        assert_eq!(names, ["alice", "carol", "dave"]);

        // Inboxes: pushed to several at once, read in pages, dropped once delivered, and
        // capped per user.
        let to_bob = |text: &str| message("alice", Scope::User("bob".into()), text);
        for text in ["one", "two", "three"] {
            let full = store
                .push_inbox(vec!["bob".into(), "dave".into()], to_bob(text), 3)
                .await
                .expect("kept");
            assert!(full.is_empty());
        }
        let full = store
            .push_inbox(vec!["bob".into(), "carol".into()], to_bob("four"), 3)
            .await
            .expect("kept");
        assert_eq!(full, ["bob"], "bob's inbox is full; carol's is not");
        let page = store.peek_inbox("bob", 0, 2).await.expect("read");
        let texts: Vec<&str> = page.iter().map(|q| q.message.text.as_str()).collect();
        assert_eq!(texts, ["one", "two"]);
        assert_eq!(page[0].message.at, at(1_700_000_000));
        assert_eq!(page[0].message.to, Scope::User("bob".into()));
        let rest = store.peek_inbox("bob", page[1].id, 10).await.expect("read");
        assert_eq!(rest.len(), 1);
        let gone = store.drop_inbox("bob", page[1].id).await.expect("dropped");
        assert_eq!(gone, 2);
        let left = store.peek_inbox("bob", 0, 10).await.expect("read");
        assert_eq!(left, rest, "only what was delivered is gone");
        let gone = store.drop_inbox("bob", rest[0].id).await.expect("dropped");
        assert_eq!(gone, 1);
        let again = store.drop_inbox("bob", rest[0].id).await.expect("dropped");
        assert_eq!(again, 0, "what is gone is gone once");
        assert!(store
            .peek_inbox("bob", 0, 10)
            .await
            .expect("read")
            .is_empty());
        let room = store
            .push_inbox(vec!["bob".into()], to_bob("five"), 3)
            .await
            .expect("kept");
        assert!(room.is_empty(), "delivered messages make room");
        assert_eq!(
            store.peek_inbox("dave", 0, 10).await.expect("read").len(),
            3
        );
        let ack = message("bob", Scope::Ack, "report.pdf");
        store
            .push_inbox(vec!["carol".into()], ack.clone(), 3)
            .await
            .expect("kept");
        let kept = store.peek_inbox("carol", 0, 10).await.expect("read");
        assert_eq!(kept.last().map(|q| &q.message), Some(&ack));

        // History: a group's, and a private conversation seen from either side.
        let devs = Scope::Group("devs".into());
        for i in 0..5 {
            let m = message("alice", devs.clone(), &i.to_string());
            append(store, m).await;
        }
        append(store, to_bob("hi bob")).await;
        let reply = message("bob", Scope::User("alice".into()), "hi alice");
        append(store, reply).await;
        let other = message("carol", Scope::User("bob".into()), "not yours");
        append(store, other).await;
        let note = message("carol", Scope::User("carol".into()), "to myself");
        append(store, note).await;
        let notes = store
            .history("carol", &Scope::User("carol".into()), 10, at(0))
            .await
            .expect("read");
        assert_eq!(notes.len(), 1, "a note to oneself is one message");
        let last = store.history("alice", &devs, 2, at(0)).await.expect("read");
        let texts: Vec<&str> = last.iter().map(|m| m.text.as_str()).collect();
        assert_eq!(texts, ["3", "4"]);
        for (me, other) in [("alice", "bob"), ("bob", "alice")] {
            let talk = store
                .history(me, &Scope::User(other.into()), 10, at(0))
                .await
                .expect("read");
            let texts: Vec<&str> = talk.iter().map(|m| m.text.as_str()).collect();
            assert_eq!(texts, ["hi bob", "hi alice"]);
        }
        let newer = message("alice", devs.clone(), "new");
        let newer = Message {
            at: at(1_800_000_000),
            ..newer
        };
        append(store, newer).await;
        let pruned = store.prune_history(at(1_750_000_000)).await.expect("ok");
        assert_eq!(pruned, 9);
        let kept = store
            .history("alice", &devs, 10, at(0))
            .await
            .expect("read");
        assert_eq!(kept.len(), 1);
        let since = store
            .history("alice", &devs, 10, at(1_800_000_001))
            .await
            .expect("read");
        assert!(since.is_empty(), "nothing sent before `since`");

        // Memberships, in order of joining; removing an account takes its inbox and
        // memberships with it.
        store.add_membership("bob", "devs").await.expect("ok");
        store.add_membership("bob", "devs").await.expect("ok");
        store.add_membership("bob", "ops").await.expect("ok");
        store.add_membership("dave", "ops").await.expect("ok");
        store.remove_membership("bob", "ops").await.expect("ok");
        let all = store.memberships().await.expect("read");
        let pair = |u: &str, g: &str| (u.to_owned(), g.to_owned());
        assert_eq!(all, [pair("bob", "devs"), pair("dave", "ops")]);
        assert!(store.remove_account("dave").await.expect("ok"));
        assert!(!store.remove_account("dave").await.expect("ok"));
        assert_eq!(
            store.memberships().await.expect("read"),
            [pair("bob", "devs")]
        );
        assert!(store
            .peek_inbox("dave", 0, 10)
            .await
            .expect("read")
            .is_empty());

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
        let id = store.record_file(file.clone()).await.expect("ok");
        let file = FileRecord { id, ..file };
        let to_group = FileRecord {
            target: "GROUP:devs".into(),
            ..file.clone()
        };
        let group_id = store.record_file(to_group.clone()).await.expect("ok");
        let to_group = FileRecord {
            id: group_id,
            ..to_group
        };
        assert_ne!(id, group_id);
        let of = |user: &'static str, targets: &[&str], limit| {
            let targets = targets.iter().map(|t| t.to_string()).collect();
            store.files_of(user, targets, limit)
        };
        assert_eq!(
            of("bob", &["bob"], 10).await.expect("read"),
            std::slice::from_ref(&file)
        );
        assert_eq!(
            of("bob", &["bob", "GROUP:devs"], 10).await.expect("read"),
            [file.clone(), to_group.clone()]
        );
        assert_eq!(
            of("alice", &["alice"], 10).await.expect("read"),
            [file.clone(), to_group.clone()],
            "what one sent"
        );
        assert_eq!(
            of("alice", &["alice"], 1).await.expect("read"),
            std::slice::from_ref(&to_group),
            "the last ones"
        );
        assert!(of("carol", &["carol"], 10).await.expect("read").is_empty());
        assert_eq!(store.file(id).await.expect("read"), Some(file.clone()));
        assert_eq!(store.file(id + 100).await.expect("read"), None);

        store.queue_file("carol", id).await.expect("ok");
        store.queue_file("carol", group_id).await.expect("ok");
        let waiting = store.queued_files("carol").await.expect("read");
        assert_eq!(waiting, [file.clone(), to_group]);
        store.drop_queued_file("carol", id).await.expect("ok");
        assert_eq!(store.queued_files("carol").await.expect("read").len(), 1);

        store.add_bytes_stored("alice", 100).await.expect("ok");
        store.add_bytes_stored("alice", -30).await.expect("ok");
        assert_eq!(store.bytes_stored("alice").await.expect("read"), 70);
        store.add_bytes_stored("alice", -100).await.expect("ok");
        assert_eq!(store.bytes_stored("alice").await.expect("read"), 0);
    }
}
