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

    #[tokio::test]
    async fn it_keeps_the_store_contract() {
        super::super::contract::check(&MemoryStore::new()).await;
    }

    #[tokio::test]
    async fn history_keeps_the_newest_per_conversation() {
        let store = MemoryStore::new();
        let devs = Scope::Group("devs".into());
        for i in 0..HISTORY_PER_SCOPE + 5 {
            let m = Message {
                from: "alice".into(),
                to: devs.clone(),
                text: i.to_string(),
                at: SystemTime::UNIX_EPOCH,
            };
            store.append_history(m).await.expect("kept");
        }
        let all = store.history(&devs, usize::MAX).await.expect("read");
        assert_eq!(all.len(), HISTORY_PER_SCOPE);
        assert_eq!(all[0].text, "5");
    }
}
