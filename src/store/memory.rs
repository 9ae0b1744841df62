//! [`MemoryStore`]: the [`Store`] kept in memory, forgotten at exit.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard, PoisonError};

use super::{Account, FileRecord, Message, Scope, Store, StoreError, StoreFuture};

/// Messages of history kept per conversation; older ones are forgotten.
const HISTORY_PER_SCOPE: usize = 1000;
/// Messages kept per offline inbox; older ones are forgotten.
const INBOX_PER_USER: usize = 1000;
/// Files kept in the index; older entries are forgotten.
const FILES_KEPT: usize = 100_000;

#[derive(Default)]
struct State {
    accounts: HashMap<String, Account>,
    memberships: HashMap<String, Vec<String>>,
    inboxes: HashMap<String, VecDeque<Message>>,
    history: HashMap<Scope, VecDeque<Message>>,
    files: VecDeque<FileRecord>,
    stored: HashMap<String, u64>,
}

/// Everything in memory, bounded: each list keeps its newest entries.
#[derive(Default)]
pub struct MemoryStore {
    state: Mutex<State>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut State) -> Result<T, StoreError>,
    ) -> StoreFuture<'_, T> {
        let result = f(&mut self.state());
        Box::pin(std::future::ready(result))
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn push_bounded<T>(list: &mut VecDeque<T>, item: T, keep: usize) {
    if list.len() >= keep {
        list.pop_front();
    }
    list.push_back(item);
}

impl Store for MemoryStore {
    fn account(&self, name: &str) -> StoreFuture<'_, Option<Account>> {
        self.with(|st| Ok(st.accounts.get(name).cloned()))
    }

    fn create_account(&self, account: Account) -> StoreFuture<'_, ()> {
        self.with(move |st| {
            if st.accounts.contains_key(&account.name) {
                return Err(StoreError::Exists(format!("account '{}'", account.name)));
            }
            st.accounts.insert(account.name.clone(), account);
            Ok(())
        })
    }

    fn memberships(&self, user: &str) -> StoreFuture<'_, Vec<String>> {
        self.with(|st| Ok(st.memberships.get(user).cloned().unwrap_or_default()))
    }

    fn add_membership(&self, user: &str, group: &str) -> StoreFuture<'_, ()> {
        self.with(|st| {
            let groups = st.memberships.entry(user.to_owned()).or_default();
            if !groups.iter().any(|g| g == group) {
                groups.push(group.to_owned());
            }
            Ok(())
        })
    }

    fn remove_membership(&self, user: &str, group: &str) -> StoreFuture<'_, ()> {
        self.with(|st| {
            if let Some(groups) = st.memberships.get_mut(user) {
                groups.retain(|g| g != group);
            }
            Ok(())
        })
    }

    fn push_inbox(&self, user: &str, message: Message) -> StoreFuture<'_, ()> {
        self.with(move |st| {
            let inbox = st.inboxes.entry(user.to_owned()).or_default();
            push_bounded(inbox, message, INBOX_PER_USER);
            Ok(())
        })
    }

    fn take_inbox(&self, user: &str) -> StoreFuture<'_, Vec<Message>> {
        self.with(|st| Ok(st.inboxes.remove(user).map(Vec::from).unwrap_or_default()))
    }

    fn append_history(&self, message: Message) -> StoreFuture<'_, ()> {
        self.with(move |st| {
            let list = st.history.entry(message.to.clone()).or_default();
            push_bounded(list, message, HISTORY_PER_SCOPE);
            Ok(())
        })
    }

    fn history(&self, scope: &Scope, limit: usize) -> StoreFuture<'_, Vec<Message>> {
        self.with(|st| {
            let list = st.history.get(scope);
            let skip = list.map_or(0, |l| l.len().saturating_sub(limit));
            Ok(list.map_or_else(Vec::new, |l| l.iter().skip(skip).cloned().collect()))
        })
    }

    fn record_file(&self, file: FileRecord) -> StoreFuture<'_, ()> {
        self.with(move |st| {
            push_bounded(&mut st.files, file, FILES_KEPT);
            Ok(())
        })
    }

    fn files_of(&self, user: &str) -> StoreFuture<'_, Vec<FileRecord>> {
        self.with(|st| {
            let mine = st
                .files
                .iter()
                .filter(|f| f.sender == user || f.target == user);
            Ok(mine.cloned().collect())
        })
    }

    fn bytes_stored(&self, user: &str) -> StoreFuture<'_, u64> {
        self.with(|st| Ok(st.stored.get(user).copied().unwrap_or(0)))
    }

    fn add_bytes_stored(&self, user: &str, delta: i64) -> StoreFuture<'_, ()> {
        self.with(|st| {
            let n = st.stored.entry(user.to_owned()).or_insert(0);
            *n = n.saturating_add_signed(delta);
            if *n == 0 {
                st.stored.remove(user);
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;

    fn message(from: &str, to: Scope, text: &str) -> Message {
        Message {
            from: from.into(),
            to,
            text: text.into(),
            at: SystemTime::UNIX_EPOCH,
        }
    }

    #[tokio::test]
    async fn an_account_is_claimed_once() {
        let store = MemoryStore::new();
        let account = Account {
            name: "alice".into(),
            password_hash: "$argon2id$...".into(),
            created: SystemTime::UNIX_EPOCH,
        };
        store.create_account(account.clone()).await.expect("new");
        assert!(matches!(
            store.create_account(account.clone()).await,
            Err(StoreError::Exists(_))
        ));
        assert_eq!(store.account("alice").await.expect("read"), Some(account));
        assert_eq!(store.account("bob").await.expect("read"), None);
    }

    #[tokio::test]
    async fn an_inbox_is_taken_once_in_order() {
        let store = MemoryStore::new();
        for text in ["one", "two"] {
            let m = message("alice", Scope::User("bob".into()), text);
            store.push_inbox("bob", m).await.expect("kept");
        }
        let inbox = store.take_inbox("bob").await.expect("taken");
        let texts: Vec<&str> = inbox.iter().map(|m| m.text.as_str()).collect();
        assert_eq!(texts, ["one", "two"]);
        assert!(store.take_inbox("bob").await.expect("taken").is_empty());
    }

    #[tokio::test]
    async fn history_keeps_the_newest_per_conversation() {
        let store = MemoryStore::new();
        let devs = Scope::Group("devs".into());
        for i in 0..HISTORY_PER_SCOPE + 5 {
            let m = message("alice", devs.clone(), &i.to_string());
            store.append_history(m).await.expect("kept");
        }
        store
            .append_history(message("bob", Scope::Everyone, "hi"))
            .await
            .expect("kept");
        let last = store.history(&devs, 2).await.expect("read");
        let texts: Vec<&str> = last.iter().map(|m| m.text.as_str()).collect();
        let (a, b) = (HISTORY_PER_SCOPE + 3, HISTORY_PER_SCOPE + 4);
        assert_eq!(texts, [a.to_string(), b.to_string()]);
        let all = store.history(&devs, usize::MAX).await.expect("read");
        assert_eq!(all.len(), HISTORY_PER_SCOPE);
    }

    #[tokio::test]
    async fn memberships_files_and_quotas() {
        let store = MemoryStore::new();
        store.add_membership("bob", "devs").await.expect("ok");
        store.add_membership("bob", "devs").await.expect("ok");
        store.add_membership("bob", "ops").await.expect("ok");
        store.remove_membership("bob", "ops").await.expect("ok");
        assert_eq!(store.memberships("bob").await.expect("read"), ["devs"]);

        let file = FileRecord {
            id: 1,
            sender: "alice".into(),
            target: "bob".into(),
            filename: "a.txt".into(),
            saved_as: "received_from_alice_a.txt".into(),
            size: 3,
            at: SystemTime::UNIX_EPOCH,
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
