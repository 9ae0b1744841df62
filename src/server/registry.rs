//! Who is online, and in which groups: the one place that decides who receives what.
//!
//! All shared state sits behind one short, non-async mutex that is never held across an
//! `.await`. Delivery to a chat connection is a non-blocking push onto its bounded outbox,
//! so a broadcast never waits on anyone; a connection whose outbox is full is dropped
//! (IRC's "SendQ exceeded") instead of slowing the others.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::file::FileLink;
use crate::flow::Refusal;
use crate::net::{Pushed, SendQueue};
use crate::protocol::{skeleton, ServerLine};

/// A chat connection's outgoing side: its bounded queue.
#[derive(Clone)]
pub(crate) struct Outbox {
    /// Whose queue this is (for log lines).
    user: Arc<str>,
    /// Ready-made lines for the writer task.
    queue: Arc<SendQueue>,
    /// Cancels the whole connection (a client that takes nothing while the server's own
    /// notices pile up past twice its queue's cap).
    kill: CancellationToken,
    /// Whether the client asked for the protocol's extensions (`relaychat/1`).
    extended: Arc<AtomicBool>,
}

impl Outbox {
    pub(crate) fn new(user: &str, queue: Arc<SendQueue>, kill: CancellationToken) -> Self {
        Self {
            user: user.into(),
            queue,
            kill,
            extended: Arc::default(),
        }
    }

    /// Sends `line`, waits (at most `grace`) until it is written, then closes the
    /// connection: how the server kicks a user with a reason they can read.
    pub(crate) async fn close_after(&self, line: &ServerLine, grace: std::time::Duration) {
        self.line(line);
        let mark = self.queue.pushed();
        let _ = tokio::time::timeout(grace, self.queue.until_written(mark)).await;
        self.kill.cancel();
    }

    /// Whether the connection's reader is ended when it is killed (`SendQueue::ends_reader`).
    pub(crate) fn ends_reader(&self) -> bool {
        self.queue.ends_reader()
    }

    /// Marks the client as speaking the extensions.
    pub(crate) fn extend(&self) {
        self.extended.store(true, Ordering::Relaxed);
    }

    /// Whether the client speaks the extensions.
    pub(crate) fn extended(&self) -> bool {
        self.extended.load(Ordering::Relaxed)
    }

    /// Whose outbox this is.
    pub(crate) fn user(&self) -> &str {
        &self.user
    }

    /// Queues a line a chat session sends on behalf of its user, without waiting; if the
    /// queue is congested or full, `held` keeps what the session must wait on before it
    /// reads its next command.
    pub(crate) fn deliver(&self, bytes: Bytes, held: &mut Held) {
        // Behind a line of this command that found the queue full, every later one waits
        // too: a smaller one that fits must not overtake it.
        let waiting = held
            .0
            .iter_mut()
            .find(|(o, lines)| !lines.is_empty() && Arc::ptr_eq(&o.queue, &self.queue));
        if let Some((_, lines)) = waiting {
            return lines.push_back(bytes);
        }
        self.hold(self.queue.push(bytes), held);
    }

    /// Like `deliver`, but if the session may write at once (see `Held::write_at_once`)
    /// and the connection is not being closed, the line is written by the calling task
    /// (`SendQueue::push_now`). Never with the registry locked: the write is a system call.
    pub(crate) fn deliver_now(&self, bytes: Bytes, held: &mut Held) {
        match std::mem::take(&mut held.2) && !self.kill.is_cancelled() {
            true => self.hold(self.queue.push_now(bytes), held),
            false => self.deliver(bytes, held),
        }
    }

    /// Keeps in `held` what a push left to wait for.
    fn hold(&self, pushed: Pushed, held: &mut Held) {
        match pushed {
            Pushed::Queued | Pushed::Closed => {}
            Pushed::Congested => held.0.push((self.clone(), VecDeque::new())),
            Pushed::Full(bytes) => {
                debug!("[SENDQ FULL] {} takes nothing; its senders wait", self.user);
                held.0.push((self.clone(), VecDeque::from([bytes])));
            }
        }
    }

    /// Formats and queues one of the server's own lines (a file notice, an error, a
    /// verdict), from a task that cannot wait for the reader. False if the connection is
    /// closing.
    pub(crate) fn line(&self, line: &ServerLine) -> bool {
        match self.queue.push_notice(Bytes::from(line.to_wire())) {
            Pushed::Queued | Pushed::Congested => true,
            Pushed::Closed => false,
            Pushed::Full(_) => {
                if !self.kill.is_cancelled() {
                    warn!(
                        "[SENDQ EXCEEDED] {} takes nothing; disconnecting",
                        self.user
                    );
                    self.kill.cancel();
                }
                false
            }
        }
    }
}

/// What one command's deliveries left to wait for: queues past their high-water mark, and
/// lines that found a queue full (with every later line for that queue, in order). The
/// chat session settles them before it reads its next command, which is how a burst slows
/// its sender instead of dropping its readers.
///
/// It also says whether the command's private message may be written at once by the
/// session itself (`SendQueue::push_now`) instead of by the recipient's writer task.
#[derive(Default)]
pub(crate) struct Held(Vec<(Outbox, VecDeque<Bytes>)>, Vec<Arc<ReplayGate>>, bool);

impl Held {
    /// Lets the command's private message be written at once by the caller.
    pub(crate) fn write_at_once(&mut self) {
        self.2 = true;
    }

    /// Whether there is nothing to wait for.
    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty() && self.1.is_empty()
    }

    /// Delivers the lines that found a queue full and waits until every congested queue is
    /// relieved (see `SendQueue::until_relieved`); gives up when `kill` fires.
    pub(crate) async fn settle(self, grace: Duration, kill: &CancellationToken) {
        for (outbox, mut lines) in self.0 {
            let queue = &outbox.queue;
            while let Some(bytes) = lines.pop_front() {
                tokio::select! {
                    _ = kill.cancelled() => return,
                    _ = queue.until_room(bytes.len()) => {}
                }
                if let Pushed::Full(bytes) = queue.push(bytes) {
                    lines.push_front(bytes);
                }
            }
            tokio::select! {
                _ = kill.cancelled() => return,
                _ = queue.until_relieved(grace) => {}
            }
        }
        // Recipients whose replay has as much waiting behind it as it may.
        for gate in self.1 {
            tokio::select! {
                _ = kill.cancelled() => return,
                _ = gate.until_open(grace) => {}
            }
        }
    }
}

struct ChatEntry {
    /// Which connection registered the name (a stale one must not remove a newer one).
    id: u64,
    /// Whether the name is a registered account (logged in with its password).
    registered: bool,
    /// The secret that proves this session's file connection (hex).
    token: Box<str>,
    /// While its offline inbox is being delivered: what waits behind it (boxed: most
    /// entries never have one, and an idle user's entry stays small).
    replay: Option<Box<Replay>>,
    /// Where it connected from: the user's file connection must come from there too.
    ip: IpAddr,
    /// Arrival order, for `list`.
    seq: u64,
    outbox: Outbox,
}

struct FileEntry {
    id: u64,
    link: Arc<FileLink>,
}

/// Files forwarded to a recipient and not yet acknowledged, kept per recipient up to this
/// many; only these can be acknowledged.
const MAX_UNACKED: usize = 1024;

#[derive(Default)]
struct State {
    chats: HashMap<String, ChatEntry>,
    files: HashMap<String, FileEntry>,
    /// Group name → members in order of joining. Empty groups are removed.
    groups: HashMap<String, Vec<String>>,
    /// Confusable skeleton → the connected user who has it (no two look-alikes online).
    skeletons: HashMap<String, String>,
    /// User → the groups it is in (so a disconnect touches only those).
    memberships: HashMap<String, Vec<String>>,
    /// Recipient → (sender, filename) of files forwarded to it and not yet acknowledged.
    unacked: HashMap<String, VecDeque<(String, String)>>,
    next_seq: u64,
    /// Every registered name.
    accounts: HashSet<String>,
    /// Confusable skeleton → the registered name that has it.
    account_skeletons: HashMap<String, String>,
    /// Inbox writes under way, per recipient (see [`InboxTicket`]).
    inbox_writes: HashMap<String, InboxWrites>,
    /// (name, address) → logins waiting for their password.
    pending_logins: HashMap<(String, IpAddr), u32>,
}

/// Where a line for a user goes.
enum Route {
    /// Its live queue (the user is registered if true).
    Live(bool),
    /// Behind its inbox replay (taken already).
    Behind,
    /// Behind its inbox replay (taken already), which has as much waiting behind it as it
    /// may: the sender waits for the gate before its next command.
    BehindFull(Arc<ReplayGate>),
    /// Its inbox: it is away.
    Inbox,
    /// Nowhere: no such user.
    Nowhere,
}

/// Opens when a user's inbox replay ends.
#[derive(Default)]
pub(crate) struct ReplayGate {
    open: AtomicBool,
    opened: tokio::sync::Notify,
}

impl ReplayGate {
    fn open(&self) {
        self.open.store(true, Ordering::Release);
        self.opened.notify_waiters();
    }

    /// Waits until the gate opens, or `grace` passes.
    async fn until_open(&self, grace: Duration) {
        let opened = self.opened.notified();
        tokio::pin!(opened);
        opened.as_mut().enable();
        if self.open.load(Ordering::Acquire) {
            return;
        }
        let _ = tokio::time::timeout(grace, opened).await;
    }
}

/// A replay under way, as the registry sees it.
#[derive(Default)]
struct Replay {
    /// Live lines that came during the replay, delivered right after it. Past
    /// [`BEHIND_LINES`] or [`BEHIND_BYTES`], each sender also waits for the replay to end
    /// before its next command (flow control), so this stays near those bounds.
    behind: Vec<Bytes>,
    /// Bytes in `behind`.
    behind_bytes: usize,
    /// Opens when the replay ends (senders held back by a full `behind` wait on it).
    gate: Arc<ReplayGate>,
}

/// Live lines that may wait behind one user's inbox replay.
const BEHIND_LINES: usize = 4096;
/// Bytes of live lines that may wait behind one user's inbox replay.
const BEHIND_BYTES: usize = 4 << 20;

/// The offline-inbox writes of one recipient: how many are under way, and how many have
/// finished since the entry was made. A replay goes live only when none is under way and
/// none finished since it last read the inbox, so nothing queued is left behind.
#[derive(Default)]
struct InboxWrites {
    writers: u32,
    done: u64,
}

/// Groups one user may be in at once.
pub(crate) const MAX_GROUPS_PER_USER: usize = 256;

impl State {
    fn registered(&self, user: &str) -> bool {
        self.accounts.contains(user)
    }

    /// Where a line for `user` goes; `line` is taken if it waits behind a replay.
    fn route(&mut self, user: &str, line: &Bytes) -> Route {
        if let Some(e) = self.chats.get_mut(user) {
            let Some(replay) = e.replay.as_mut() else {
                return Route::Live(e.registered);
            };
            let full = replay.behind.len() >= BEHIND_LINES || replay.behind_bytes >= BEHIND_BYTES;
            replay.behind_bytes += line.len();
            replay.behind.push(line.clone());
            return match full {
                true => Route::BehindFull(replay.gate.clone()),
                false => Route::Behind,
            };
        }
        match self.registered(user) {
            true => Route::Inbox,
            false => Route::Nowhere,
        }
    }

    /// Forgets `user`'s inbox-write entry once no write is under way and no replay
    /// watches it.
    fn tidy_inbox_writes(&mut self, user: &str) {
        let replaying = self.chats.get(user).is_some_and(|e| e.replay.is_some());
        if !replaying && self.inbox_writes.get(user).is_some_and(|w| w.writers == 0) {
            self.inbox_writes.remove(user);
        }
    }

    /// Takes `user` out of `group`'s member list; a group left empty is deleted.
    fn drop_member(&mut self, group: &str, user: &str) {
        if let Some(members) = self.groups.get_mut(group) {
            members.retain(|m| m != user);
            if members.is_empty() {
                self.groups.remove(group);
            }
        }
    }
}

/// The registry of sessions and groups.
#[derive(Default)]
pub(crate) struct Registry {
    state: Mutex<State>,
    /// Woken whenever a chat session registers (file handshakes wait for theirs).
    pub(crate) chat_joined: tokio::sync::Notify,
    /// Woken whenever inbox writes finish (a replay waiting to go live reads again).
    pub(crate) inbox_written: tokio::sync::Notify,
}

impl Registry {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Claims `user` for a chat connection and queues `greeting` as its first line, under
    /// the lock, so no message can overtake it; fails while another connection holds it.
    /// A registered user (`session` holds its file-connection token, empty if its client
    /// was given none) starts with its inbox to deliver: messages for it are queued behind the inbox until
    /// [`Registry::finish_replay`].
    pub(crate) fn add_chat(
        &self,
        user: &str,
        id: u64,
        ip: IpAddr,
        outbox: Outbox,
        greeting: Bytes,
        session: Option<String>,
    ) -> Result<(), Refusal> {
        {
            let mut st = self.state();
            if st.chats.contains_key(user) {
                return Err(Refusal::NameTaken(user.to_owned()));
            }
            let skeleton = skeleton(user);
            if let Some(other) = st.skeletons.get(&skeleton) {
                return Err(Refusal::LookAlike {
                    name: user.to_owned(),
                    other: other.clone(),
                });
            }
            let registered = session.is_some();
            match st.account_skeletons.get(&skeleton) {
                Some(owner) if owner == user && !registered => {
                    return Err(Refusal::AlreadyRegistered(user.to_owned()));
                }
                Some(other) if other != user => {
                    return Err(Refusal::LookAlikeRegistered {
                        name: user.to_owned(),
                        other: other.clone(),
                    });
                }
                _ => {}
            }
            st.skeletons.insert(skeleton, user.to_owned());
            outbox.queue.push_notice(greeting);
            st.next_seq += 1;
            let seq = st.next_seq;
            if registered {
                st.inbox_writes.entry(user.to_owned()).or_default();
            }
            st.chats.insert(
                user.to_owned(),
                ChatEntry {
                    id,
                    registered,
                    token: session.unwrap_or_default().into(),
                    replay: registered.then(Box::default),
                    ip,
                    seq,
                    outbox,
                },
            );
        }
        self.chat_joined.notify_waiters();
        Ok(())
    }

    /// Makes every account and its stored memberships known (at start).
    pub(crate) fn load(&self, accounts: Vec<String>, memberships: Vec<(String, String)>) {
        let mut st = self.state();
        for name in accounts {
            st.account_skeletons.insert(skeleton(&name), name.clone());
            st.accounts.insert(name);
        }
        for (user, group) in memberships {
            if st.registered(&user) {
                st.memberships
                    .entry(user.clone())
                    .or_default()
                    .push(group.clone());
                st.groups.entry(group).or_default().push(user);
            }
        }
    }

    /// Claims `user`'s name as an account (before the store records it): refused if it, or
    /// a name that looks like it, is registered.
    pub(crate) fn claim_account(&self, user: &str) -> Result<(), Refusal> {
        let mut st = self.state();
        let skeleton = skeleton(user);
        match st.account_skeletons.get(&skeleton) {
            Some(owner) if owner == user => Err(Refusal::AlreadyRegistered(user.to_owned())),
            Some(other) => Err(Refusal::LookAlikeRegistered {
                name: user.to_owned(),
                other: other.clone(),
            }),
            None => {
                st.account_skeletons.insert(skeleton, user.to_owned());
                st.accounts.insert(user.to_owned());
                if let Some(e) = st.chats.get_mut(user) {
                    e.registered = true;
                }
                Ok(())
            }
        }
    }

    /// Gives back a claim the store could not record.
    pub(crate) fn unclaim_account(&self, user: &str) {
        let mut st = self.state();
        st.account_skeletons.remove(&skeleton(user));
        st.accounts.remove(user);
        if let Some(e) = st.chats.get_mut(user) {
            e.registered = false;
        }
    }

    /// Whether `user` is a registered name (the registry knows every account: they are
    /// loaded at start and added by `register`; no other process changes them while the
    /// server holds the database).
    pub(crate) fn is_registered(&self, user: &str) -> bool {
        self.state().registered(user)
    }

    /// Whether `user` is registered and has no chat session (what is sent to it waits).
    pub(crate) fn away(&self, user: &str) -> bool {
        let st = self.state();
        st.registered(user) && !st.chats.contains_key(user)
    }

    /// A login for `user` from `ip` waits for its password (a file connection of that
    /// name from that address is held meanwhile).
    pub(crate) fn begin_login(&self, user: &str, ip: IpAddr) {
        *self
            .state()
            .pending_logins
            .entry((user.to_owned(), ip))
            .or_default() += 1;
    }

    /// That login is over, either way.
    pub(crate) fn end_login(&self, user: &str, ip: IpAddr) {
        {
            let mut st = self.state();
            let key = (user.to_owned(), ip);
            if let Some(n) = st.pending_logins.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    st.pending_logins.remove(&key);
                }
            }
        }
        self.chat_joined.notify_waiters();
    }

    /// Whether a login for `user` from `ip` waits for its password.
    pub(crate) fn login_pending(&self, user: &str, ip: IpAddr) -> bool {
        self.state()
            .pending_logins
            .contains_key(&(user.to_owned(), ip))
    }

    /// The id of `user`'s chat session if `token` is its file-connection secret.
    pub(crate) fn chat_by_token(&self, user: &str, token: &str) -> Option<u64> {
        let st = self.state();
        let e = st.chats.get(user)?;
        (e.registered && !e.token.is_empty() && same_secret(&e.token, token)).then_some(e.id)
    }

    /// How many of `user`'s inbox writes have finished (a replay's mark; see
    /// [`Registry::finish_replay`]).
    pub(crate) fn inbox_mark(&self, user: &str) -> u64 {
        self.state().inbox_writes.get(user).map_or(0, |w| w.done)
    }

    /// Ends `user`'s inbox replay (chat connection `id`) and delivers what waited behind
    /// it, unless an inbox write is under way or has finished since `mark`: then the
    /// replay must read the inbox again. (During the replay, new messages wait behind it in
    /// memory, so only writes begun while the user was away, or past what may wait behind,
    /// can hold it up.)
    pub(crate) fn finish_replay(&self, user: &str, id: u64, mark: u64, held: &mut Held) -> bool {
        let mut st = self.state();
        let busy = st
            .inbox_writes
            .get(user)
            .is_some_and(|w| w.writers > 0 || w.done != mark);
        if busy {
            return false;
        }
        Self::go_live(&mut st, user, id, held);
        true
    }

    /// Ends `user`'s inbox replay (chat connection `id`) whatever is under way (the store
    /// failed: what is left in the inbox waits for the next login).
    pub(crate) fn end_replay(&self, user: &str, id: u64, held: &mut Held) {
        Self::go_live(&mut self.state(), user, id, held);
    }

    fn go_live(st: &mut State, user: &str, id: u64, held: &mut Held) {
        if let Some(e) = st.chats.get_mut(user).filter(|e| e.id == id) {
            if let Some(replay) = e.replay.take() {
                for line in replay.behind {
                    e.outbox.deliver(line, held);
                }
                replay.gate.open();
            }
        }
        st.tidy_inbox_writes(user);
    }

    /// Counts inbox writes for `users` as under way until the ticket is dropped.
    fn ticket(&self, st: &mut State, users: Vec<String>) -> InboxTicket<'_> {
        for user in &users {
            st.inbox_writes.entry(user.clone()).or_default().writers += 1;
        }
        InboxTicket {
            registry: self,
            users,
        }
    }

    /// The id and address of `user`'s chat session, and whether its file connection must
    /// bring the session's proof (its client was given one).
    pub(crate) fn chat_session(&self, user: &str) -> Option<(u64, IpAddr, bool)> {
        self.state()
            .chats
            .get(user)
            .map(|e| (e.id, e.ip, !e.token.is_empty()))
    }

    /// Forgets chat connection `id` of `user`: the name is free again, its group
    /// memberships and pending acknowledgements end, and its file connection is closed (as
    /// the lab's server does).
    pub(crate) fn remove_chat(&self, user: &str, id: u64) {
        let mut st = self.state();
        if st.chats.get(user).map(|e| e.id) != Some(id) {
            return;
        }
        let registered = st.chats.remove(user).is_some_and(|e| e.registered);
        st.skeletons.remove(&skeleton(user));
        st.unacked.remove(user);
        // A registered user stays in its groups while away (their messages are queued).
        if !registered {
            for group in st.memberships.remove(user).unwrap_or_default() {
                st.drop_member(&group, user);
            }
        }
        st.tidy_inbox_writes(user);
        if let Some(file) = st.files.remove(user) {
            file.link.kill.cancel();
        }
    }

    /// Attaches a file connection to chat session `chat_id` of `user`: refused unless that
    /// session is live and has no live file connection.
    pub(crate) fn add_file(
        &self,
        user: &str,
        chat_id: u64,
        id: u64,
        link: Arc<FileLink>,
    ) -> Result<(), Refusal> {
        let mut st = self.state();
        if st.chats.get(user).map(|e| e.id) != Some(chat_id) {
            return Err(Refusal::NoChatSession(user.to_owned()));
        }
        if st.files.contains_key(user) {
            return Err(Refusal::FileConnectionTaken(user.to_owned()));
        }
        st.files.insert(user.to_owned(), FileEntry { id, link });
        Ok(())
    }

    /// Notes that a file from `sender` named `filename` is being forwarded to `recipient`,
    /// which may then acknowledge it once.
    pub(crate) fn expect_ack(&self, recipient: &str, sender: &str, filename: &str) {
        let mut st = self.state();
        if !st.chats.contains_key(recipient) {
            return;
        }
        let queue = st.unacked.entry(recipient.to_owned()).or_default();
        if queue.len() >= MAX_UNACKED {
            queue.pop_front();
        }
        queue.push_back((sender.to_owned(), filename.to_owned()));
    }

    /// Takes one pending acknowledgement; false if no such file was forwarded to `recipient`.
    pub(crate) fn take_ack(&self, recipient: &str, sender: &str, filename: &str) -> bool {
        let mut st = self.state();
        let Some(queue) = st.unacked.get_mut(recipient) else {
            return false;
        };
        match queue.iter().position(|(s, f)| s == sender && f == filename) {
            Some(i) => {
                queue.remove(i);
                true
            }
            None => false,
        }
    }

    /// Forgets file connection `id` of `user`.
    pub(crate) fn remove_file(&self, user: &str, id: u64) {
        let mut st = self.state();
        if st.files.get(user).map(|e| e.id) == Some(id) {
            st.files.remove(user);
        }
    }

    /// The outbox of `user`'s chat connection.
    pub(crate) fn outbox(&self, user: &str) -> Option<Outbox> {
        self.state().chats.get(user).map(|e| e.outbox.clone())
    }

    /// The file connection of `user`.
    pub(crate) fn file_link(&self, user: &str) -> Option<Arc<FileLink>> {
        self.state().files.get(user).map(|e| e.link.clone())
    }

    /// Queues `bytes` for `user` if it is connected; says so (false if it is not).
    pub(crate) fn deliver_to(&self, user: &str, bytes: Bytes, held: &mut Held) -> bool {
        match self.state().chats.get(user) {
            Some(e) => {
                e.outbox.deliver(bytes, held);
                true
            }
            None => false,
        }
    }

    /// Queues `bytes` for `user` if it is live; a registered user who is away (or whose
    /// inbox is being delivered) gets a ticket to put the message in its inbox instead.
    pub(crate) fn send_to(&self, user: &str, bytes: Bytes, held: &mut Held) -> Sent<'_> {
        let mut st = self.state();
        match st.route(user, &bytes) {
            Route::Live(registered) => {
                // Delivered with the registry unlocked: it may be written at once.
                let outbox = st.chats.get(user).map(|e| e.outbox.clone());
                drop(st);
                if let Some(outbox) = outbox {
                    outbox.deliver_now(bytes, held);
                }
                Sent::Live(registered)
            }
            // Only registered users have an inbox to replay.
            Route::Behind => Sent::Live(true),
            Route::BehindFull(gate) => {
                held.1.push(gate);
                Sent::Live(true)
            }
            Route::Inbox => Sent::Queue(self.ticket(&mut st, vec![user.to_owned()])),
            Route::Nowhere => Sent::NotFound,
        }
    }

    /// Queues `bytes` for every connected user but `from`, and returns how many; those
    /// whose inbox is being delivered get it behind what waited for them.
    pub(crate) fn broadcast(&self, from: &str, bytes: &Bytes, held: &mut Held) -> u64 {
        let mut st = self.state();
        let others = st
            .chats
            .len()
            .saturating_sub(usize::from(st.chats.contains_key(from)));
        let mut replaying = Vec::new();
        for (user, e) in &st.chats {
            match (user == from, e.replay.is_some()) {
                (true, _) => {}
                (false, false) => e.outbox.deliver(bytes.clone(), held),
                (false, true) => replaying.push(user.clone()),
            }
        }
        for user in replaying {
            if let Route::BehindFull(gate) = st.route(&user, bytes) {
                held.1.push(gate);
            }
        }
        others as u64
    }

    /// Every connected user but `me`, in order of arrival.
    pub(crate) fn users_except(&self, me: &str) -> Vec<String> {
        let st = self.state();
        let mut users: Vec<(&String, u64)> = st
            .chats
            .iter()
            .filter(|(u, _)| *u != me)
            .map(|(u, e)| (u, e.seq))
            .collect();
        users.sort_unstable_by_key(|&(_, seq)| seq);
        users.into_iter().map(|(u, _)| u.clone()).collect()
    }

    /// Adds `user` to `group`, creating the group on first join; refused past
    /// [`MAX_GROUPS_PER_USER`] groups.
    pub(crate) fn join(&self, group: &str, user: &str) -> Result<(), Refusal> {
        let mut st = self.state();
        let mine = st.memberships.entry(user.to_owned()).or_default();
        if mine.iter().any(|g| g == group) {
            return Ok(());
        }
        if mine.len() >= MAX_GROUPS_PER_USER {
            return Err(Refusal::TooManyGroups(MAX_GROUPS_PER_USER));
        }
        mine.push(group.to_owned());
        st.groups
            .entry(group.to_owned())
            .or_default()
            .push(user.to_owned());
        Ok(())
    }

    /// Takes `user` out of `group`; false if it was not a member.
    pub(crate) fn leave(&self, group: &str, user: &str) -> bool {
        let mut st = self.state();
        let Some(mine) = st.memberships.get_mut(user) else {
            return false;
        };
        let Some(i) = mine.iter().position(|g| g == group) else {
            return false;
        };
        mine.remove(i);
        if mine.is_empty() {
            st.memberships.remove(user);
        }
        st.drop_member(group, user);
        true
    }

    /// Every group with its members (in order of joining), by name.
    pub(crate) fn all_groups(&self) -> Vec<(String, Vec<String>)> {
        let st = self.state();
        let mut groups: Vec<(String, Vec<String>)> = st
            .groups
            .iter()
            .map(|(g, members)| (g.clone(), members.clone()))
            .collect();
        groups.sort_unstable();
        groups
    }

    /// The members of `group` (none if there is no such group).
    pub(crate) fn group_members(&self, group: &str) -> Vec<String> {
        self.state().groups.get(group).cloned().unwrap_or_default()
    }

    /// The groups `user` is in, in order of joining.
    pub(crate) fn groups_of(&self, user: &str) -> Vec<String> {
        self.state()
            .memberships
            .get(user)
            .cloned()
            .unwrap_or_default()
    }

    /// Every member of `group`, in order of joining, or `None` if `me` is not one of them.
    pub(crate) fn members(&self, group: &str, me: &str) -> Option<Vec<String>> {
        let st = self.state();
        let members = st.groups.get(group)?;
        members.iter().any(|m| m == me).then(|| members.clone())
    }

    /// The members of `group` other than `me`, or `None` if `me` is not a member.
    pub(crate) fn members_except(&self, group: &str, me: &str) -> Option<Vec<String>> {
        let st = self.state();
        let members = st.groups.get(group)?;
        if !members.iter().any(|m| m == me) {
            return None;
        }
        Some(members.iter().filter(|m| *m != me).cloned().collect())
    }

    /// Queues `bytes` for every other member of `group`: live members get it now, the
    /// registered ones who are away get a ticket for their inboxes. `None` if `from` is not
    /// a member.
    pub(crate) fn send_group(
        &self,
        from: &str,
        group: &str,
        bytes: &Bytes,
        held: &mut Held,
    ) -> Option<(InboxTicket<'_>, u64)> {
        let mut st = self.state();
        let members = st.groups.get(group)?;
        if !members.iter().any(|m| m == from) {
            return None;
        }
        let others: Vec<String> = members.iter().filter(|m| *m != from).cloned().collect();
        let reached = others.len() as u64;
        let mut away = Vec::new();
        for member in others {
            match st.route(&member, bytes) {
                Route::Live(_) => {
                    if let Some(e) = st.chats.get(&member) {
                        e.outbox.deliver(bytes.clone(), held);
                    }
                }
                Route::Inbox => away.push(member),
                Route::BehindFull(gate) => held.1.push(gate),
                Route::Behind | Route::Nowhere => {}
            }
        }
        Some((self.ticket(&mut st, away), reached))
    }
}

/// Where a message went.
pub(crate) enum Sent<'r> {
    /// Queued for the live recipient (registered if true).
    Live(bool),
    /// To the recipient's inbox (it is away): write it there, then drop the ticket.
    Queue(InboxTicket<'r>),
    /// No such user, live or registered.
    NotFound,
}

/// Inbox writes under way for `users`. Whoever holds it writes the message to those
/// inboxes and then drops it; until then a replay of those inboxes does not go live.
#[must_use]
pub(crate) struct InboxTicket<'r> {
    registry: &'r Registry,
    /// The recipients whose inboxes get the message.
    pub(crate) users: Vec<String>,
}

impl Drop for InboxTicket<'_> {
    fn drop(&mut self) {
        if self.users.is_empty() {
            return;
        }
        let mut st = self.registry.state();
        for user in &self.users {
            if let Some(w) = st.inbox_writes.get_mut(user) {
                w.writers -= 1;
                w.done += 1;
            }
            st.tidy_inbox_writes(user);
        }
        drop(st);
        self.registry.inbox_written.notify_waiters();
    }
}

/// Compares two secrets in time that does not depend on where they differ.
fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    const HERE: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    /// A registered user with a queue the test can read.
    fn user(registry: &Registry, name: &str, id: u64) -> Arc<SendQueue> {
        let queue = SendQueue::new(64, 1 << 20, 1 << 20);
        let outbox = Outbox::new(name, queue.clone(), CancellationToken::new());
        let welcome = Bytes::from(format!("Welcome, {name}!\n"));
        registry
            .add_chat(name, id, HERE, outbox, welcome, None)
            .expect("name is free");
        queue
    }

    fn lines(queue: &SendQueue) -> Vec<String> {
        queue
            .drain_now()
            .iter()
            .map(|b| String::from_utf8_lossy(b).trim_end().to_owned())
            .collect()
    }

    #[test]
    fn a_name_is_held_by_one_connection_and_freed_only_by_it() {
        let registry = Registry::default();
        let _alice = user(&registry, "alice", 1);
        let queue = SendQueue::new(4, 1024, 1024);
        let outbox = Outbox::new("alice", queue, CancellationToken::new());
        let again = registry.add_chat("alice", 2, HERE, outbox, Bytes::new(), None);
        assert!(matches!(again, Err(Refusal::NameTaken(n)) if n == "alice"));
        registry.remove_chat("alice", 2); // a stale connection's removal is ignored
        assert_eq!(registry.chat_session("alice"), Some((1, HERE, false)));
        registry.remove_chat("alice", 1);
        assert_eq!(registry.chat_session("alice"), None);
    }

    #[test]
    fn a_look_alike_of_a_connected_user_is_refused_until_that_user_leaves() {
        let registry = Registry::default();
        let _alice = user(&registry, "alice", 1);
        let queue = SendQueue::new(4, 1024, 1024);
        let outbox = Outbox::new("\u{0430}lice", queue, CancellationToken::new());
        let fake = registry.add_chat("\u{0430}lice", 2, HERE, outbox.clone(), Bytes::new(), None);
        assert_eq!(
            fake.map_err(|e| e.to_string()),
            Err("username '\u{0430}lice' looks too much like 'alice', who is connected".into())
        );
        registry.remove_chat("alice", 1);
        registry
            .add_chat("\u{0430}lice", 2, HERE, outbox, Bytes::new(), None)
            .expect("free once alice left");
    }

    #[test]
    fn the_welcome_comes_first_and_list_keeps_arrival_order() {
        let registry = Registry::default();
        let alice = user(&registry, "alice", 1);
        let _carol = user(&registry, "carol", 2);
        let _bob = user(&registry, "bob", 3);
        registry.broadcast("bob", &Bytes::from("hi\n"), &mut Held::default());
        assert_eq!(lines(&alice), ["Welcome, alice!", "hi"]);
        assert_eq!(registry.users_except("alice"), ["carol", "bob"]);
    }

    #[test]
    fn group_messages_reach_the_other_members_only() {
        let registry = Registry::default();
        let (alice, bob, carol) = (
            user(&registry, "alice", 1),
            user(&registry, "bob", 2),
            user(&registry, "carol", 3),
        );
        for q in [&alice, &bob, &carol] {
            lines(q);
        }
        registry.join("devs", "alice").expect("joins");
        registry.join("devs", "bob").expect("joins");
        assert!(registry
            .send_group("alice", "devs", &Bytes::from("g\n"), &mut Held::default())
            .is_some());
        assert!(registry
            .send_group("carol", "devs", &Bytes::from("x\n"), &mut Held::default())
            .is_none());
        assert_eq!(lines(&bob), ["g"]);
        assert!(lines(&alice).is_empty() && lines(&carol).is_empty());
        assert_eq!(
            registry.members_except("devs", "alice"),
            Some(vec!["bob".to_owned()])
        );
        registry.remove_chat("bob", 2);
        assert_eq!(registry.members_except("devs", "alice"), Some(vec![]));
        registry.remove_chat("alice", 1);
        assert_eq!(
            registry.members_except("devs", "carol"),
            None,
            "empty groups go"
        );
    }

    #[test]
    fn leaving_a_group_and_listing_groups_and_members() {
        let registry = Registry::default();
        let (_alice, _bob) = (user(&registry, "alice", 1), user(&registry, "bob", 2));
        for (group, who) in [("devs", "alice"), ("devs", "bob"), ("ops", "alice")] {
            registry.join(group, who).expect("joins");
        }
        assert_eq!(registry.groups_of("alice"), ["devs", "ops"]);
        assert_eq!(
            registry.members("devs", "bob"),
            Some(vec!["alice".to_owned(), "bob".to_owned()])
        );
        assert_eq!(registry.members("ops", "bob"), None, "members only");
        assert!(registry.leave("devs", "alice"));
        assert!(!registry.leave("devs", "alice"), "not a member any more");
        assert_eq!(registry.groups_of("alice"), ["ops"]);
        assert_eq!(
            registry.members("devs", "bob"),
            Some(vec!["bob".to_owned()])
        );
        assert!(registry.leave("devs", "bob"));
        assert_eq!(
            registry.members("devs", "bob"),
            None,
            "an empty group is gone"
        );
        registry.join("devs", "alice").expect("a fresh group");
        assert_eq!(registry.groups_of("alice"), ["ops", "devs"]);
    }

    #[test]
    fn a_user_may_join_only_so_many_groups() {
        let registry = Registry::default();
        let _alice = user(&registry, "alice", 1);
        for i in 0..MAX_GROUPS_PER_USER {
            registry.join(&format!("g{i}"), "alice").expect("room");
        }
        registry
            .join("g0", "alice")
            .expect("joining again is no new group");
        assert!(matches!(
            registry.join("one-more", "alice"),
            Err(Refusal::TooManyGroups(MAX_GROUPS_PER_USER))
        ));
    }

    #[test]
    fn an_acknowledgement_counts_once_per_forward() {
        let registry = Registry::default();
        let _bob = user(&registry, "bob", 1);
        assert!(!registry.take_ack("bob", "alice", "a.txt"));
        registry.expect_ack("bob", "alice", "a.txt");
        registry.expect_ack("nobody", "alice", "a.txt");
        assert!(!registry.take_ack("bob", "alice", "b.txt"));
        assert!(registry.take_ack("bob", "alice", "a.txt"));
        assert!(!registry.take_ack("bob", "alice", "a.txt"));
        assert!(!registry.take_ack("nobody", "alice", "a.txt"));
    }

    #[test]
    fn a_file_connection_needs_its_chat_session_and_is_closed_with_it() {
        let registry = Registry::default();
        let _bob = user(&registry, "bob", 1);
        let link = || {
            let (jobs, _queue) = tokio::sync::mpsc::channel(1);
            Arc::new(FileLink {
                jobs,
                kill: CancellationToken::new(),
            })
        };
        let stale = registry.add_file("bob", 99, 10, link());
        assert!(matches!(stale, Err(Refusal::NoChatSession(_))));
        let first = link();
        registry
            .add_file("bob", 1, 10, first.clone())
            .expect("bound");
        let second = registry.add_file("bob", 1, 11, link());
        assert!(matches!(second, Err(Refusal::FileConnectionTaken(_))));
        registry.remove_chat("bob", 1);
        assert!(first.kill.is_cancelled());
        assert!(registry.file_link("bob").is_none());
    }
}
