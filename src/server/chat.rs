//! The chat port: the username handshake (and, for a registered name, its password), the
//! delivery of what waited in the user's offline inbox, then one command per line, each
//! answered by its handler in [`HANDLERS`] (the protocol's command table paired with the
//! code that runs it). A first word that names no command goes to [`unknown`], the one
//! place a later extension hooks.
//!
//! A handler either answers at once ([`Handler::Now`]) or may need the store
//! ([`Handler::Later`]): then it hands back a future, which the session awaits before it
//! reads the next command, so replies keep the order of the commands.

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::hooks::{Answer, Asked, Burst, HookCall, Hooks, MessageFields, MessageKind};
use super::metrics::Dropped;
use super::registry::{Held, InboxTicket, Outbox, Sent};
use super::{read_username, secrets_allowed, Shared};
use crate::flow::{Ended, Refusal, Step, Stop};
use crate::net::{write_loop, Conn, LineReader, SendQueue};
use crate::protocol::command::{
    check_password, parse_command, parse_history, Call, Parsed, Spec, BROADCAST, COMMANDS, FILES,
    GET, GROUPS, HELLO, HISTORY, JOIN, LEAVE, LIST, MEMBERS, MSG, PASSWD, REGISTER, SEND_GROUP,
};
use crate::protocol::file_header::GROUP_PREFIX;
use crate::protocol::names::{check_group, normalize};
use crate::protocol::server_line::utc;
use crate::protocol::{CommandError, FrameError, ServerLine};
use crate::store::{Account, Message, MessageRef, Scope, ScopeRef, StoreError};

/// How long a closing connection's writer may take to flush what is queued.
const FLUSH_GRACE: Duration = Duration::from_secs(2);
/// How long a session waits on a congested recipient that takes nothing at all before it
/// goes on without waiting for it (that recipient's queue then fills to its hard cap, and
/// `send_timeout` drops it if it still takes nothing).
const FLOW_GRACE: Duration = Duration::from_secs(1);
/// Inbox messages read from the store at a time while they are delivered.
const REPLAY_PAGE: usize = 512;

/// One user's chat session, as its command handlers see it.
struct Session<'a> {
    shared: &'a Shared,
    /// The user's name.
    user: &'a str,
    /// The chat connection's id.
    id: u64,
    /// Where it connected from.
    ip: std::net::IpAddr,
    /// The user's own outgoing queue (for replies).
    outbox: &'a Outbox,
    /// Whether the name is a registered account.
    registered: AtomicBool,
    /// Whether a password may come over this connection (see [`passwords_allowed`]).
    passwords: bool,
    /// What the current command's deliveries left to wait for (flow control).
    held: std::sync::Mutex<Held>,
    /// The last inbox entry written to this session and not yet forgotten (0: none): our
    /// client confirms it (`INBOX_RECEIVED|<id>`); for a client that cannot, it is
    /// forgotten once the session goes on (see [`forget_delivered`]).
    inbox_sent: AtomicU64,
    /// Cancelled when the session ends (a lab client's delivered inbox is forgotten only if
    /// the session outlives `inbox_settle` after it).
    ended: CancellationToken,
}

impl Drop for Session<'_> {
    fn drop(&mut self) {
        self.ended.cancel();
    }
}

impl Session<'_> {
    fn held(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn reply(&self, line: ServerLine) {
        self.outbox
            .deliver(Bytes::from(line.to_wire()), &mut self.held());
    }

    fn refuse(&self, refusal: Refusal) {
        self.reply(ServerLine::Error {
            reason: refusal.to_string(),
        });
    }

    fn registered(&self) -> bool {
        self.registered.load(Ordering::Relaxed)
    }

    fn hooks(&self) -> Option<&Hooks> {
        self.shared.config.hooks.as_deref()
    }

    /// Counts a message that went out to `recipients` users (to a user, a group, or
    /// everyone: `to` empty), and tells observers.
    fn delivered(&self, kind: MessageKind, recipients: u64, to: &str, text: &str) {
        self.shared.metrics.message(kind, recipients);
        if let Some(hooks) = self.hooks() {
            let fields = vec![
                ("kind", kind.name().to_owned()),
                ("sender", self.user.to_owned()),
                ("to", to.to_owned()),
                ("text", text.to_owned()),
            ];
            hooks.observe("message", fields);
        }
    }

    /// A message from this user to `to`, sent now.
    fn message(&self, to: Scope, text: &str) -> Message {
        Message {
            from: self.user.to_owned(),
            to,
            text: text.to_owned(),
            at: SystemTime::now(),
        }
    }

    /// Whether this user's private messages go into the history: the server keeps one, and
    /// the user is registered (a guest's name is anyone's); so must the other party be.
    fn keeps_history(&self) -> bool {
        self.shared.config.policy.history && self.registered()
    }

    /// Adds a delivered message to the history (when the server keeps one; the caller has
    /// checked that both parties of a private message are registered); what is left to
    /// await, if anything (usually nothing).
    fn remember(&self, message: MessageRef<'_>) -> Option<Later<'_>> {
        if !self.shared.config.policy.history {
            return None;
        }
        let pending = self.shared.store.append_history(message)?;
        Some(Box::pin(async move {
            if let Err(e) = pending.await {
                warn!("[STORE] cannot append to the history: {e}");
            }
        }))
    }

    /// Puts `message` in the inboxes of the ticket's users; returns those whose inbox is
    /// full, or the refusal if the store failed.
    async fn queue(
        &self,
        ticket: InboxTicket<'_>,
        message: Message,
    ) -> Result<Vec<String>, Refusal> {
        if ticket.users.is_empty() {
            return Ok(Vec::new());
        }
        let max = self.shared.config.limits.inbox_max;
        let pushed = self
            .shared
            .store
            .push_inbox(ticket.users.clone(), message, max)
            .await;
        drop(ticket);
        pushed.map_err(store_failed("queue a message"))
    }
}

/// A future a handler hands back for the session to await.
type Later<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// A command's handler.
#[derive(Clone, Copy)]
enum Handler {
    /// Answers at once.
    Now(fn(&Session<'_>, &Call<'_>)),
    /// May need the store: the session awaits what it hands back before the next command.
    Later(for<'a> fn(&'a Session<'a>, Call<'a>) -> Option<Later<'a>>),
}

/// Every command of the protocol's table with the code that runs it.
static HANDLERS: [(&Spec, Handler); 13] = [
    (&MSG, Handler::Later(msg)),
    (&BROADCAST, Handler::Now(broadcast)),
    (&LIST, Handler::Now(list)),
    (&JOIN, Handler::Later(join)),
    (&SEND_GROUP, Handler::Later(send_group)),
    (&LEAVE, Handler::Later(leave)),
    (&GROUPS, Handler::Now(groups)),
    (&MEMBERS, Handler::Now(members)),
    (&HISTORY, Handler::Later(history)),
    (&FILES, Handler::Later(files)),
    (&GET, Handler::Later(get)),
    (&REGISTER, Handler::Later(register)),
    (&PASSWD, Handler::Later(passwd)),
];

/// What a login established.
struct Login {
    /// The name is a registered account (its password was right).
    registered: bool,
    /// The client asked for the extensions before its password.
    extended: bool,
}

pub(super) async fn serve(shared: Arc<Shared>, conn: Conn, addr: SocketAddr, opened: Instant) {
    let passwords = secrets_allowed(&shared, conn.is_tls(), addr);
    let kill = shared.shutdown.child_token();
    let limits = &shared.config.limits;
    // In a block: what is moved into the writer task takes no room in this future.
    let (rd, queue, writer) = {
        let (rd, wr) = conn.split();
        let (queue, sink) = SendQueue::attach(
            limits.send_queue,
            limits.send_queue_bytes,
            limits.send_queue_high_water,
            wr,
        );
        let kill = kill.clone();
        let writer = tokio::spawn(write_loop(sink, queue.clone(), kill, limits.send_timeout));
        (rd, queue, writer)
    };
    let mut reader = LineReader::new(rd, limits.max_line, limits.idle_pause);
    let id = shared.next_id();

    // Boxed: the handshake's state lives on the heap only while it runs, so an idle
    // session stays small.
    let claimed = Box::pin(async {
        let name = read_username(&shared, &mut reader, &kill, opened).await?;
        // Known to the registry until claimed (a file connection of that name waits).
        let _pending = PendingLogin::new(&shared, &name, addr);
        let via = (&mut reader, &*queue, &kill);
        let login = login(&shared, &name, addr, passwords, via).await?;
        ask_login(&shared, &name, addr, login.registered).await?;
        let outbox = claim(&shared, &name, id, addr, &queue, &kill, &login)?;
        Step::Ok((outbox, login))
    })
    .await;
    match claimed {
        Ok((outbox, login)) => {
            let user = outbox.user().to_owned();
            info!("[NEW CONNECTION] {user} connected from {addr}");
            shared.metrics.user(true);
            let hooks = shared.config.hooks.as_deref();
            if let Some(hooks) = hooks {
                let fields = vec![
                    ("user", user.clone()),
                    ("address", addr.ip().to_string()),
                    ("registered", login.registered.to_string()),
                ];
                hooks.observe("connect", fields);
            }
            // Boxed: a session lives as long as its connection, and the connection's future
            // stays small (see `connection_futures_stay_small`).
            let session = Box::new(Session {
                shared: &shared,
                user: &user,
                id,
                ip: addr.ip(),
                outbox: &outbox,
                registered: AtomicBool::new(login.registered),
                passwords,
                held: std::sync::Mutex::default(),
                inbox_sent: AtomicU64::new(0),
                ended: CancellationToken::new(),
            });
            if login.registered {
                Box::pin(replay_inbox(&session, &queue, &kill)).await;
                let upto = session.inbox_sent.load(Ordering::Relaxed);
                if upto > 0 && !session.outbox.extended() {
                    let (shared, user) = (shared.clone(), user.clone());
                    let ended = session.ended.clone();
                    let settle = shared.config.limits.inbox_settle;
                    tokio::spawn(async move {
                        tokio::select! {
                            _ = ended.cancelled() => {}
                            _ = tokio::time::sleep(settle) => {
                                forget_delivered(&shared, &user, upto, false).await;
                            }
                        }
                    });
                }
            }
            let end = run(&session, &mut reader, &kill).await;
            if let Ended::Frame(e) = &end {
                session.reply(ServerLine::Error {
                    reason: e.to_string(),
                });
            }
            shared.registry.remove_chat(&user, id);
            shared.metrics.user(false);
            info!("[DISCONNECTED] {user} ({end})");
            if let Some(hooks) = hooks {
                let fields = vec![("user", user.clone()), ("reason", end.to_string())];
                hooks.observe("disconnect", fields);
            }
        }
        Err(Stop::Refused(refusal)) => {
            warn!("[REFUSED] {addr}: {refusal}");
            let line = ServerLine::Error {
                reason: refusal.to_string(),
            };
            queue.push(Bytes::from(line.to_wire()));
        }
        Err(Stop::Ended(_)) => {}
    }
    queue.close();
    let abort = writer.abort_handle();
    match tokio::time::timeout(FLUSH_GRACE, writer).await {
        Ok(Ok(true)) => shared.metrics.dropped(Dropped::SlowConsumer),
        Ok(_) => {}
        Err(_) => abort.abort(),
    }
}

/// A login waiting for its password, known to the registry until it is over (a file
/// connection of the same name and address waits for it meanwhile).
struct PendingLogin<'a> {
    shared: &'a Shared,
    name: String,
    addr: SocketAddr,
}

impl<'a> PendingLogin<'a> {
    fn new(shared: &'a Shared, name: &str, addr: SocketAddr) -> Self {
        shared.registry.begin_login(name, addr.ip());
        Self {
            shared,
            name: name.to_owned(),
            addr,
        }
    }
}

impl Drop for PendingLogin<'_> {
    fn drop(&mut self) {
        self.shared.registry.end_login(&self.name, self.addr.ip());
    }
}

/// Decides whether `name` may log in: a guest if the name is not registered (and the
/// server takes guests), else the holder of its password, asked for with
/// `Password for <name>:`.
async fn login(
    shared: &Shared,
    name: &str,
    addr: SocketAddr,
    passwords: bool,
    (reader, queue, kill): (&mut LineReader, &SendQueue, &CancellationToken),
) -> Step<Login> {
    // Guests cost no store read: the registry knows every registered name.
    let account = match shared.registry.is_registered(name) {
        true => (shared.store.account(name).await)
            .map_err(store_failed(format_args!("look up account '{name}'")))?,
        false => None,
    };
    let Some(account) = account else {
        if shared.config.policy.require_account {
            return Err(Refusal::AccountRequired.into());
        }
        return Ok(Login {
            registered: false,
            extended: false,
        });
    };
    if !passwords {
        return Err(Refusal::PasswordNeedsTls.into());
    }
    let ip = addr.ip();
    // Checked before the prompt (a locked name is not even asked), and again with the
    // password in hand (other connections may have failed meanwhile).
    drop(shared.accounts.attempt(name, ip)?);
    let prompt = ServerLine::PasswordPrompt { user: name.into() };
    queue.push_notice(Bytes::from(prompt.to_wire()));
    let limit = shared.config.limits.handshake_timeout;
    let deadline = Instant::now() + limit;
    let mut extended = false;
    let line = loop {
        let line = match tokio::time::timeout_at(deadline, reader.next_line(kill)).await {
            Ok(Ok(line)) => line,
            Ok(Err(Ended::Frame(e))) => return Err(Refusal::Frame(e).into()),
            Ok(Err(end)) => return Err(end.into()),
            Err(_) => return Err(Refusal::NoPassword(limit).into()),
        };
        // Our client asks for the extensions before its password (so its inbox comes
        // with the times the messages were sent); a password is never this word.
        if !extended && line.as_ref() == HELLO.as_bytes() {
            extended = true;
            continue;
        }
        break line;
    };
    let password = String::from_utf8_lossy(&line).trim().to_owned();
    let attempt = shared.accounts.attempt(name, ip)?;
    if shared
        .accounts
        .verify(password, account.password_hash)
        .await?
    {
        attempt.succeeded();
        return Ok(Login {
            registered: true,
            extended,
        });
    }
    let delay = attempt.failed();
    warn!("[LOGIN FAILED] wrong password for {name} from {addr}");
    tokio::select! {
        _ = kill.cancelled() => {}
        _ = tokio::time::sleep(delay) => {}
    }
    Err(Refusal::WrongPassword.into())
}

/// Asks the login hook, if there is one, whether `name` may log in.
async fn ask_login(shared: &Shared, name: &str, addr: SocketAddr, registered: bool) -> Step {
    let Some((hooks, policy)) = shared
        .config
        .hooks
        .as_deref()
        .and_then(|h| Some((h, h.spec.login?)))
    else {
        return Ok(());
    };
    let question = HookCall::Login {
        name: name.to_owned(),
        addr: addr.ip(),
        registered,
    };
    match hooks.ask(question, policy, &shared.metrics).await {
        Answer::Deny(reason) => Err(Refusal::Hook(reason).into()),
        _ => Ok(()),
    }
}

/// Claims a checked username and queues its welcome (and, for our client logged in with a
/// password, the secret that proves its file connection).
fn claim(
    shared: &Shared,
    name: &str,
    id: u64,
    addr: SocketAddr,
    queue: &Arc<SendQueue>,
    kill: &CancellationToken,
    login: &Login,
) -> Result<Outbox, Refusal> {
    let outbox = Outbox::new(name, queue.clone(), kill.clone());
    let mut greeting = ServerLine::Welcome { user: name.into() }.to_wire();
    // A registered user's session; its proof only for our client (which asked for the
    // extensions), whose file connection must then bring it.
    let token = match login.extended && login.registered {
        true => super::accounts::token(),
        false => None,
    };
    let session = login.registered.then(|| token.clone().unwrap_or_default());
    if login.extended {
        outbox.extend();
        if login.registered {
            // `-`: no proof (no randomness); the file port then goes by name and address.
            let token = token.unwrap_or_else(|| "-".into());
            greeting.push_str(&ServerLine::Session { token }.to_wire());
        }
    }
    shared.registry.add_chat(
        name,
        id,
        addr.ip(),
        outbox.clone(),
        Bytes::from(greeting),
        session,
    )?;
    Ok(outbox)
}

/// Delivers what waited in the user's inbox, oldest first, each as the line it would have
/// been live (our client gets `[QUEUED <time>]` before each, and `[INBOX] <id>` after each
/// page), before any live message. Nothing is forgotten here: our client confirms what it
/// got (`INBOX_RECEIVED|<id>`); for a client that cannot, the entries written (up to
/// `session.inbox_sent`) are forgotten once its session goes on. A session that ends
/// first leaves them for the next login: a message may come twice, but is never lost.
async fn replay_inbox(session: &Session<'_>, queue: &SendQueue, kill: &CancellationToken) {
    let (shared, user) = (session.shared, session.user);
    let registry = &shared.registry;
    let mut after = 0u64;
    let mut delivered = 0usize;
    loop {
        let mark = registry.inbox_mark(user);
        let page = match shared.store.peek_inbox(user, after, REPLAY_PAGE).await {
            Ok(page) => page,
            Err(e) => {
                warn!("[STORE] cannot read {user}'s inbox: {e}");
                break;
            }
        };
        let Some(last) = page.last().map(|q| q.id) else {
            if registry.finish_replay(user, session.id, mark, &mut session.held()) {
                if delivered > 0 {
                    info!("[INBOX] {user}: {delivered} queued messages written");
                }
                return;
            }
            // A message for the user is being queued: read again once it is.
            tokio::select! {
                _ = kill.cancelled() => return,
                _ = registry.inbox_written.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
            continue;
        };
        let extended = session.outbox.extended();
        for (i, queued) in page.iter().enumerate() {
            // Our client gets the time first, in the same write as the line it belongs to,
            // and after the page, what to confirm.
            let mut wire = String::new();
            if extended {
                let at = utc(queued.message.at);
                wire = ServerLine::QueuedAt { at }.to_wire();
            }
            wire.push_str(&live_line(&queued.message).to_wire());
            if extended && i + 1 == page.len() {
                wire.push_str(&ServerLine::InboxSent { upto: last }.to_wire());
            }
            session
                .outbox
                .deliver(Bytes::from(wire), &mut session.held());
            let held = std::mem::take(&mut *session.held());
            if !held.is_empty() {
                Box::pin(held.settle(FLOW_GRACE, kill)).await;
            }
        }
        let written = tokio::select! {
            biased;
            written = queue.until_written(queue.pushed()) => written,
            _ = kill.cancelled() => false,
        };
        if !written {
            return;
        }
        session.inbox_sent.store(last, Ordering::Relaxed);
        after = last;
        delivered += page.len();
    }
    // The store failed: go live; what is left waits for the next login.
    registry.end_replay(user, session.id, &mut session.held());
}

/// Forgets `user`'s inbox entries up to `upto`, delivered (`confirmed` by our client, or
/// written to a client that cannot confirm, whose session went on).
async fn forget_delivered(shared: &Shared, user: &str, upto: u64, confirmed: bool) {
    match shared.store.drop_inbox(user, upto).await {
        Ok(0) => {}
        Ok(n) => {
            shared.metrics.inbox_delivered(confirmed, n);
            debug!("[INBOX] {user}: {n} delivered messages forgotten");
        }
        // They stay, and come again at the next login.
        Err(e) => warn!("[STORE] cannot clear {user}'s delivered inbox: {e}"),
    }
}

/// `INBOX_RECEIVED|<id>`: our client has the queued messages up to `upto`.
fn inbox_received<'a>(session: &'a Session<'a>, upto: u64) -> Option<Later<'a>> {
    let sent = session.inbox_sent.load(Ordering::Relaxed);
    if upto == 0 || upto > sent {
        session.refuse(Refusal::InboxNotSent(upto));
        return None;
    }
    Some(Box::pin(forget_delivered(
        session.shared,
        session.user,
        upto,
        true,
    )))
}

/// What a failed store operation becomes: a log line saying what it was for, and
/// `Refusal::StoreFailed` for the user.
fn store_failed(what: impl std::fmt::Display) -> impl FnOnce(StoreError) -> Refusal {
    move |e| {
        warn!("[STORE] cannot {what}: {e}");
        Refusal::StoreFailed
    }
}

/// The line a queued message would have been, had its recipient been there.
fn live_line(message: &Message) -> ServerLine {
    let (from, text) = (message.from.clone(), message.text.clone());
    match &message.to {
        Scope::User(_) => ServerLine::Private { from, text },
        Scope::Group(group) => ServerLine::Group {
            group: group.clone(),
            from,
            text,
        },
        Scope::Everyone => ServerLine::Broadcast { from, text },
        Scope::Ack => ServerLine::Ack {
            recipient: from,
            filename: text,
        },
    }
}

/// Reads and answers commands until the connection ends; returns how it ended.
async fn run(session: &Session<'_>, reader: &mut LineReader, kill: &CancellationToken) -> Ended {
    // With a message hook: lines already read whose questions are out (see `ask_ahead`).
    // Boxed, as the questions are: a session without hooks stays small.
    let mut ahead: Option<Box<Ahead>> = None;
    loop {
        // A client can send thousands of commands in one read; let the writers that fan
        // them out run in between, so a flood is spread over time, not over queues.
        tokio::task::coop::consume_budget().await;
        // Nothing but `ahead` lives across the read: an idle session stays small.
        let read = match ahead.as_ref().is_some_and(|a| !a.lines.is_empty()) {
            true => None,
            // Plain TCP: the writer task ends the socket when the connection is killed, and
            // what was still to be read then (or a reset, if the peer kept sending) is not
            // run.
            false => Some(
                match reader
                    .next_line_or(kill, !session.outbox.ends_reader())
                    .await
                {
                    _ if kill.is_cancelled() => Err(Ended::Closed),
                    read => read,
                },
            ),
        };
        let (line, asked) = match read {
            Some(Ok(line)) => {
                let asked = match session.hooks().is_some_and(|h| h.spec.message.is_some()) {
                    true => ask_early(session, &line, &mut ahead.get_or_insert_default().burst),
                    false => None,
                };
                (line, asked)
            }
            Some(Err(end)) => return end,
            None => match ahead.as_mut().and_then(|a| a.lines.pop_front()) {
                Some((Ok(line), asked)) => (line, asked),
                Some((Err(e), _)) => return Ended::Frame(e),
                None => continue,
            },
        };
        // This line's question goes out with those of the lines read ahead.
        if asked.is_some() {
            ask_ahead(session, reader, ahead.get_or_insert_with(Box::default));
        }
        // A client that cannot confirm its queued messages went on after them.
        if session.inbox_sent.load(Ordering::Relaxed) != 0 && !session.outbox.extended() {
            let upto = session.inbox_sent.swap(0, Ordering::Relaxed);
            forget_delivered(session.shared, session.user, upto, false).await;
        }
        // The last line read so far: a private message is written at once, by this task
        // (earlier ones are queued, to be written together by the recipients' writers).
        if reader.is_drained() && ahead.as_ref().is_none_or(|a| a.lines.is_empty()) {
            session.held().write_at_once();
        }
        match std::str::from_utf8(&line) {
            Ok(text) => {
                if let Some(later) = handle(session, text, asked) {
                    later.await;
                }
            }
            Err(_) => session.refuse(Refusal::CommandNotUtf8),
        }
        // Flow control: past a recipient's high-water mark, this session reads no more of
        // its socket until that recipient has drained (or is found to take nothing).
        let held = std::mem::take(&mut *session.held());
        if !held.is_empty() {
            // Boxed: its state lives on the heap only while a session is held back, so an
            // idle session stays small.
            Box::pin(held.settle(FLOW_GRACE, kill)).await;
        }
    }
}

/// Lines a session asks its message hook about before it has handled the ones before
/// them (a pipelining client's): one round trip to the hooks for many, in order.
const ASK_AHEAD: usize = 64;

/// The message hook's question about `line`, if it is a message and there is a message
/// hook: asked as one of `burst`, which goes to the hooks when `ask_ahead` sends it (before
/// the answer is awaited).
fn ask_early(session: &Session<'_>, line: &[u8], burst: &mut Burst) -> Option<Asked> {
    let hooks = session.hooks()?;
    let policy = hooks.spec.message?;
    let text = std::str::from_utf8(line).ok()?;
    let Ok(Parsed::Call(call)) = parse_command(text) else {
        return None;
    };
    let (kind, text_arg) = message_kind(&call)?;
    let question = message_question(session, kind, &call, text_arg);
    Some(hooks.ask_in(burst, question, policy))
}

/// Lines read ahead, each with its message question if it is a message, and the
/// questions asked but not yet sent.
#[derive(Default)]
struct Ahead {
    lines: VecDeque<(Result<Bytes, FrameError>, Option<Asked>)>,
    burst: Burst,
}

/// Takes the lines already buffered (no wait) and asks the message hook about those that
/// are messages, up to [`ASK_AHEAD`] lines ahead; then sends the questions asked so far
/// (this line's among them) together.
fn ask_ahead(session: &Session<'_>, reader: &mut LineReader, ahead: &mut Ahead) {
    while ahead.lines.len() < ASK_AHEAD {
        match reader.buffered_line() {
            Some(Ok(line)) => {
                let asked = ask_early(session, &line, &mut ahead.burst);
                ahead.lines.push_back((Ok(line), asked));
            }
            Some(Err(e)) => {
                ahead.lines.push_back((Err(e), None));
                break;
            }
            None => break,
        }
    }
    if let Some(hooks) = session.hooks() {
        hooks.send_burst(&mut ahead.burst);
    }
}

/// Answers one command line, or hands back what is left to await; `asked`: the message
/// hook's question about it, already sent.
fn handle<'a>(session: &'a Session<'a>, text: &'a str, asked: Option<Asked>) -> Option<Later<'a>> {
    match parse_command(text) {
        Ok(Parsed::Call(call)) => {
            // Passwords never reach the log.
            match call.is(&REGISTER) || call.is(&PASSWD) {
                true => debug!("[{}] {} ...", session.user, call.spec.name),
                false => debug!("[{}] {text}", session.user),
            }
            if let Some(hooked) = hooked_message(session, call, asked) {
                return hooked;
            }
            return dispatch(session, call);
        }
        Ok(Parsed::Ack { sender, filename }) => return ack(session, sender, filename),
        Ok(Parsed::InboxReceived { upto }) => return inbox_received(session, upto),
        Ok(Parsed::Hello) => {
            session.outbox.extend();
            session.reply(ServerLine::Hello);
        }
        Ok(Parsed::FileFailed {
            sender,
            filename,
            reason,
        }) => not_saved(session, sender, filename, reason),
        Ok(Parsed::Unknown { word, rest }) => return unknown(session, word, rest),
        Err(CommandError::Empty) => {}
        Err(CommandError::Usage(spec)) => session.reply(ServerLine::Usage(spec)),
        Err(CommandError::MalformedAck) => session.refuse(Refusal::MalformedAck),
        Err(CommandError::MalformedInboxReceipt) => session.refuse(Refusal::MalformedInboxReceipt),
    }
    None
}

/// Runs a command's handler.
fn dispatch<'a>(session: &'a Session<'a>, call: Call<'a>) -> Option<Later<'a>> {
    match HANDLERS.iter().find(|(spec, _)| call.is(spec)) {
        Some((_, Handler::Now(handler))) => handler(session, &call),
        Some((_, Handler::Later(handler))) => return handler(session, call),
        None => session.reply(ServerLine::UnknownCommand),
    }
    None
}

/// Which kind of message `call` is, and which argument is its text.
fn message_kind(call: &Call<'_>) -> Option<(MessageKind, usize)> {
    match call.spec.name {
        name if name == MSG.name => Some((MessageKind::Private, 1)),
        name if name == SEND_GROUP.name => Some((MessageKind::Group, 1)),
        name if name == BROADCAST.name => Some((MessageKind::Broadcast, 0)),
        _ => None,
    }
}

/// The message hook's question about `call`.
fn message_question(
    session: &Session<'_>,
    kind: MessageKind,
    call: &Call<'_>,
    text_arg: usize,
) -> HookCall {
    let to = match kind {
        MessageKind::Broadcast => std::borrow::Cow::Borrowed(""),
        _ => normalize(call.arg(0)),
    };
    HookCall::Message {
        kind,
        fields: MessageFields::new(session.user, &to, call.arg(text_arg)),
    }
}

/// A message the message hook is asked about (`None`: `call` is not one, or there is no
/// message hook): refused, or run as allowed or rewritten. An answer that is in already
/// (`asked` ahead) is acted on at once; only a wait or a rewrite is handed back to await.
fn hooked_message<'a>(
    session: &'a Session<'a>,
    call: Call<'a>,
    asked: Option<Asked>,
) -> Option<Option<Later<'a>>> {
    let hooks = session.hooks()?;
    let policy = hooks.spec.message?;
    let (kind, text_arg) = message_kind(&call)?;
    let mut asked = match asked {
        Some(asked) => asked,
        None => hooks.send(message_question(session, kind, &call, text_arg), policy),
    };
    let metrics = &session.shared.metrics;
    let answer = match asked.answered(metrics) {
        Some(Answer::Allow | Answer::Reply(_)) => return Some(dispatch(session, call)),
        Some(Answer::Deny(reason)) => {
            session.refuse(Refusal::Hook(reason));
            return Some(None);
        }
        rewrite_or_wait => rewrite_or_wait,
    };
    Some(Some(Box::pin(async move {
        let answer = match answer {
            Some(answer) => answer,
            None => asked.answer(metrics).await,
        };
        let rewritten = match answer {
            Answer::Allow | Answer::Reply(_) => None,
            Answer::Rewrite(text) if text.trim().is_empty() || text.contains(['\n', '\r']) => {
                let why = "refused: a server hook made the message empty or more than one line";
                return session.refuse(Refusal::Hook(why.into()));
            }
            Answer::Rewrite(text) => Some(text),
            Answer::Deny(reason) => return session.refuse(Refusal::Hook(reason)),
        };
        let mut call = call;
        if let Some(text) = &rewritten {
            call.args[text_arg] = text;
        }
        let later = dispatch(session, call);
        if let Some(later) = later {
            later.await;
        }
    })))
}

/// Where every line whose first word names no command ends up: `help`, a custom command
/// (answered by a hook), or the lab's unknown-command line.
fn unknown<'a>(session: &'a Session<'a>, word: &'a str, rest: &'a str) -> Option<Later<'a>> {
    let name = word.to_lowercase();
    // `help` is an extension: the lab's client gets the lab's answer, unless the server
    // has commands of its own to show.
    let commands = session.hooks().is_some_and(|h| !h.spec.commands.is_empty());
    if name == "help" && (session.outbox.extended() || commands) {
        help(session);
        return None;
    }
    let Some(hooks) = session.hooks() else {
        unknown_command(session, word);
        return None;
    };
    let (Some(_), Some(policy)) = (hooks.command(&name), hooks.spec.command) else {
        unknown_command(session, word);
        return None;
    };
    Some(Box::pin(async move {
        let question = HookCall::Command {
            caller: session.user.to_owned(),
            name,
            args: rest.to_owned(),
        };
        match hooks.ask(question, policy, &session.shared.metrics).await {
            Answer::Reply(lines) => {
                for line in lines {
                    // One line each, as typed by the plugin; never a line break inside.
                    let line: String = line.chars().filter(|c| *c != '\n' && *c != '\r').collect();
                    session.reply(ServerLine::Other(line));
                }
            }
            Answer::Deny(reason) => session.refuse(Refusal::Hook(reason)),
            Answer::Allow | Answer::Rewrite(_) => {}
        }
    }))
}

fn unknown_command(session: &Session<'_>, word: &str) {
    // Not the word itself: a password typed by mistake must not reach the log.
    debug!("[{}] unknown command ({} bytes)", session.user, word.len());
    session.reply(ServerLine::UnknownCommand);
}

/// `help`: every command, built in and custom, with its usage and what it does.
fn help(session: &Session<'_>) {
    for spec in COMMANDS {
        let usage = spec.usage.strip_prefix("Usage: ").unwrap_or(spec.usage);
        session.reply(ServerLine::Help {
            usage: usage.into(),
            help: spec.help.into(),
        });
    }
    for custom in session.hooks().map_or(&[][..], |h| &h.spec.commands) {
        session.reply(ServerLine::Help {
            usage: custom.usage.clone(),
            help: custom.help.clone(),
        });
    }
}

fn msg<'a>(session: &'a Session<'a>, call: Call<'a>) -> Option<Later<'a>> {
    let (to, text) = (normalize(call.arg(0)), call.arg(1));
    let bytes = ServerLine::private_wire(session.user, text);
    let sent = session
        .shared
        .registry
        .send_to(&to, bytes, &mut session.held());
    if !matches!(sent, Sent::NotFound) {
        session.delivered(MessageKind::Private, 1, &to, text);
    }
    match sent {
        // The common case costs no store work: nothing to keep, or a guest involved.
        Sent::Live(registered) if !(registered && session.keeps_history()) => None,
        Sent::Live(_) => session.remember(MessageRef {
            from: session.user,
            to: ScopeRef::User(&to),
            text,
            at: SystemTime::now(),
        }),
        Sent::Queue(ticket) => Some(Box::pin(async move {
            let to = to.into_owned();
            let message = session.message(Scope::User(to.clone()), text);
            match session.queue(ticket, message.clone()).await {
                Ok(full) if full.is_empty() => {
                    session.reply(ServerLine::MessageQueued { user: to });
                    let later = session
                        .keeps_history()
                        .then(|| session.remember(message.as_ref()));
                    if let Some(later) = later.flatten() {
                        later.await;
                    }
                }
                Ok(_) => session.refuse(Refusal::InboxFull(to)),
                Err(refusal) => session.refuse(refusal),
            }
        })),
        Sent::NotFound => {
            session.reply(ServerLine::UserNotFound {
                user: to.into_owned(),
            });
            None
        }
    }
}

fn broadcast(session: &Session<'_>, call: &Call<'_>) {
    let line = ServerLine::Broadcast {
        from: session.user.into(),
        text: call.arg(0).into(),
    };
    let bytes = Bytes::from(line.to_wire());
    let reached = session
        .shared
        .registry
        .broadcast(session.user, &bytes, &mut session.held());
    session.delivered(MessageKind::Broadcast, reached, "", call.arg(0));
}

fn list(session: &Session<'_>, _call: &Call<'_>) {
    let users = session.shared.registry.users_except(session.user);
    session.reply(ServerLine::Users { users });
}

fn join<'a>(session: &'a Session<'a>, call: Call<'a>) -> Option<Later<'a>> {
    Some(Box::pin(async move {
        let group = normalize(call.arg(0)).into_owned();
        let joined = check_group(&group)
            .map_err(Refusal::from)
            .and_then(|()| session.shared.registry.join(&group, session.user));
        if let Err(refusal) = joined {
            return session.refuse(refusal);
        }
        if session.registered() {
            let stored = session.shared.store.add_membership(session.user, &group);
            if let Err(e) = stored.await {
                warn!(
                    "[STORE] cannot record {} joining '{group}': {e}",
                    session.user
                );
            }
        }
        if let Some(hooks) = session.hooks() {
            let fields = vec![("user", session.user.to_owned()), ("group", group.clone())];
            hooks.observe("join", fields);
        }
        session.reply(ServerLine::Joined { group });
    }))
}

fn send_group<'a>(session: &'a Session<'a>, call: Call<'a>) -> Option<Later<'a>> {
    Some(Box::pin(async move {
        let (group, text) = (normalize(call.arg(0)).into_owned(), call.arg(1));
        let line = ServerLine::Group {
            group: group.clone(),
            from: session.user.into(),
            text: text.into(),
        };
        let bytes = Bytes::from(line.to_wire());
        let sent =
            session
                .shared
                .registry
                .send_group(session.user, &group, &bytes, &mut session.held());
        let Some((away, reached)) = sent else {
            return session.reply(ServerLine::NotInGroup { group });
        };
        session.delivered(MessageKind::Group, reached, &group, text);
        let message = session.message(Scope::Group(group), text);
        match session.queue(away, message.clone()).await {
            Ok(full) => {
                for user in full {
                    session.refuse(Refusal::InboxFull(user));
                }
                if let Some(later) = session.remember(message.as_ref()) {
                    later.await;
                }
            }
            Err(refusal) => session.refuse(refusal),
        }
    }))
}

fn leave<'a>(session: &'a Session<'a>, call: Call<'a>) -> Option<Later<'a>> {
    Some(Box::pin(async move {
        let group = normalize(call.arg(0)).into_owned();
        if !session.shared.registry.leave(&group, session.user) {
            return session.reply(ServerLine::NotInGroup { group });
        }
        if session.registered() {
            let stored = session.shared.store.remove_membership(session.user, &group);
            if let Err(e) = stored.await {
                warn!(
                    "[STORE] cannot record {} leaving '{group}': {e}",
                    session.user
                );
            }
        }
        if let Some(hooks) = session.hooks() {
            let fields = vec![("user", session.user.to_owned()), ("group", group.clone())];
            hooks.observe("leave", fields);
        }
        session.reply(ServerLine::Left { group });
    }))
}

fn groups(session: &Session<'_>, _call: &Call<'_>) {
    let groups = session.shared.registry.groups_of(session.user);
    session.reply(ServerLine::Groups { groups });
}

fn members(session: &Session<'_>, call: &Call<'_>) {
    let group = normalize(call.arg(0)).into_owned();
    session.reply(
        match session.shared.registry.members(&group, session.user) {
            Some(members) => ServerLine::Members { group, members },
            None => ServerLine::NotInGroup { group },
        },
    );
}

/// `history <user|GROUP:group> [n]`: the last messages of a conversation one is part of.
fn history<'a>(session: &'a Session<'a>, call: Call<'a>) -> Option<Later<'a>> {
    Some(Box::pin(async move {
        if !session.shared.config.policy.history {
            return session.refuse(Refusal::HistoryOff);
        }
        if !session.registered() {
            return session.refuse(Refusal::NeedsAccount("history"));
        }
        let Some(request) = parse_history(call.arg(0)) else {
            return session.refuse(Refusal::BadHistory);
        };
        let with = normalize(request.with).into_owned();
        let scope = match request.group {
            true => {
                if session
                    .shared
                    .registry
                    .members(&with, session.user)
                    .is_none()
                {
                    return session.reply(ServerLine::NotInGroup { group: with });
                }
                Scope::Group(with)
            }
            false => Scope::User(with),
        };
        // Only what was said since the account was made: a name may have been someone
        // else's before.
        let account = session.shared.store.account(session.user).await;
        let since = match account.map_err(store_failed("read history")) {
            Ok(Some(account)) => account.created,
            Ok(None) => return session.refuse(Refusal::NeedsAccount("history")),
            Err(refusal) => return session.refuse(refusal),
        };
        let messages = session
            .shared
            .store
            .history(session.user, &scope, request.count, since)
            .await;
        let messages = match messages.map_err(store_failed("read history")) {
            Ok(messages) => messages,
            Err(refusal) => return session.refuse(refusal),
        };
        let count = messages.len();
        for m in messages {
            session.reply(ServerLine::History {
                at: utc(m.at),
                from: m.from,
                text: m.text,
            });
        }
        session.reply(ServerLine::HistoryEnd { count });
    }))
}

/// Files `files` lists at most.
const FILES_LISTED: usize = 50;

/// `files`: the last files one sent, or that were sent to one or to one's groups.
fn files<'a>(session: &'a Session<'a>, _call: Call<'a>) -> Option<Later<'a>> {
    Some(Box::pin(async move {
        if !session.registered() {
            return session.refuse(Refusal::NeedsAccount("files"));
        }
        let user = session.user;
        let groups = session.shared.registry.groups_of(user);
        let targets = std::iter::once(user.to_owned())
            .chain(groups.into_iter().map(|g| format!("{GROUP_PREFIX}{g}")))
            .collect();
        let found = session
            .shared
            .store
            .files_of(user, targets, FILES_LISTED)
            .await;
        let found = match found.map_err(store_failed(format_args!("list {user}'s files"))) {
            Ok(found) => found,
            Err(refusal) => return session.refuse(refusal),
        };
        let count = found.len();
        for file in found {
            session.reply(ServerLine::FileEntry {
                id: file.id,
                at: utc(file.at),
                sender: file.sender,
                target: file.target,
                filename: file.filename,
                size: file.size,
                blake3: match file.blake3.is_empty() {
                    true => "-".into(),
                    false => file.blake3,
                },
            });
        }
        session.reply(ServerLine::FilesEnd { count });
    }))
}

/// `get <id>`: a file of the index, sent again on one's file connection as a forward.
fn get<'a>(session: &'a Session<'a>, call: Call<'a>) -> Option<Later<'a>> {
    Some(Box::pin(async move {
        if let Err(refusal) = send_again(session, call.arg(0)).await {
            session.refuse(refusal);
        }
    }))
}

async fn send_again(session: &Session<'_>, arg: &str) -> Result<(), Refusal> {
    let (shared, user) = (session.shared, session.user);
    if !session.registered() {
        return Err(Refusal::NeedsAccount("get"));
    }
    let id: u64 = arg
        .trim()
        .trim_start_matches('#')
        .parse()
        .map_err(|_| Refusal::NoSuchFile(0))?;
    let file =
        (shared.store.file(id).await).map_err(store_failed(format_args!("look up file #{id}")))?;
    let mine = |f: &crate::store::FileRecord| {
        f.sender == user
            || f.target == user
            || f.target
                .strip_prefix(GROUP_PREFIX)
                .is_some_and(|g| shared.registry.members(g, user).is_some())
    };
    let file = file.filter(mine).ok_or(Refusal::NoSuchFile(id))?;
    info!(
        "[FILE] {user} asked for file #{id} ({}) again",
        file.saved_as
    );
    super::file::forward_saved(shared, user, &file, false)
}

/// `register <password>`: a guest claims its name.
fn register<'a>(session: &'a Session<'a>, call: Call<'a>) -> Option<Later<'a>> {
    Some(Box::pin(async move {
        if let Err(refusal) = claim_name(session, call.arg(0)).await {
            return session.refuse(refusal);
        }
        session.registered.store(true, Ordering::Relaxed);
        info!("[ACCOUNTS] {} registered", session.user);
        // From now on its groups outlast its connections.
        let groups = session.shared.registry.groups_of(session.user);
        for group in groups {
            let stored = session.shared.store.add_membership(session.user, &group);
            if let Err(e) = stored.await {
                warn!("[STORE] cannot record {} in '{group}': {e}", session.user);
            }
        }
        session.reply(ServerLine::Registered {
            user: session.user.into(),
        });
    }))
}

async fn claim_name(session: &Session<'_>, password: &str) -> Result<(), Refusal> {
    let (shared, user) = (session.shared, session.user);
    if !shared.config.policy.registration {
        return Err(Refusal::RegistrationClosed);
    }
    if session.registered() {
        return Err(Refusal::AlreadyRegistered(user.into()));
    }
    if !session.passwords {
        return Err(Refusal::PasswordNeedsTls);
    }
    check_password(password)?;
    shared.registry.claim_account(user)?;
    let stored = async {
        let password_hash = shared.accounts.hash(password.to_owned()).await?;
        let account = Account {
            name: user.into(),
            password_hash,
            created: SystemTime::now(),
        };
        shared.store.create_account(account).await.map_err(|e| {
            warn!("[STORE] cannot register {user}: {e}");
            match e {
                crate::store::StoreError::Exists(_) => Refusal::AlreadyRegistered(user.into()),
                _ => Refusal::StoreFailed,
            }
        })
    };
    stored
        .await
        .inspect_err(|_| shared.registry.unclaim_account(user))
}

/// `passwd <old> <new>`.
fn passwd<'a>(session: &'a Session<'a>, call: Call<'a>) -> Option<Later<'a>> {
    Some(Box::pin(async move {
        match change_password(session, call.arg(0), call.arg(1)).await {
            Ok(()) => session.reply(ServerLine::PasswordChanged),
            Err(refusal) => session.refuse(refusal),
        }
    }))
}

async fn change_password(session: &Session<'_>, old: &str, new: &str) -> Result<(), Refusal> {
    let (shared, user) = (session.shared, session.user);
    if !session.registered() {
        return Err(Refusal::NeedsAccount("passwd"));
    }
    if !session.passwords {
        return Err(Refusal::PasswordNeedsTls);
    }
    let what = format!("change {user}'s password");
    let account = shared
        .store
        .account(user)
        .await
        .map_err(store_failed(&what))?;
    let account = account.ok_or(Refusal::NeedsAccount("passwd"))?;
    // A wrong old password counts as a failed login (and is slowed down like one).
    let attempt = shared.accounts.attempt(user, session.ip)?;
    if !shared
        .accounts
        .verify(old.to_owned(), account.password_hash)
        .await?
    {
        warn!("[ACCOUNTS] {user}: wrong old password for passwd");
        tokio::time::sleep(attempt.failed()).await;
        return Err(Refusal::WrongPassword);
    }
    attempt.succeeded();
    check_password(new)?;
    let hash = shared.accounts.hash(new.to_owned()).await?;
    match shared.store.set_password(user, hash).await {
        Ok(true) => {
            info!("[ACCOUNTS] {user} changed their password");
            Ok(())
        }
        Ok(false) => Err(Refusal::NeedsAccount("passwd")),
        Err(e) => Err(store_failed(&what)(e)),
    }
}

/// `FILE_RECEIVED|<sender>|<filename>`: relayed to the sender as `[ACK]`, once per forward.
/// A registered sender who is away gets it at its next login (kept in its inbox).
fn ack<'a>(session: &'a Session<'a>, sender: &'a str, filename: &'a str) -> Option<Later<'a>> {
    let registry = &session.shared.registry;
    if !registry.take_ack(session.user, sender, filename) {
        session.refuse(Refusal::NoSuchAck {
            sender: sender.into(),
            filename: filename.into(),
        });
        return None;
    }
    if let Some(hooks) = session.hooks() {
        let fields = vec![
            ("recipient", session.user.to_owned()),
            ("sender", sender.to_owned()),
            ("filename", filename.to_owned()),
        ];
        hooks.observe("file_acknowledged", fields);
    }
    let ack = ServerLine::Ack {
        recipient: session.user.into(),
        filename: filename.into(),
    };
    let Sent::Queue(ticket) =
        registry.send_to(sender, Bytes::from(ack.to_wire()), &mut session.held())
    else {
        return None;
    };
    Some(Box::pin(async move {
        let kept = session.message(Scope::Ack, filename);
        match session.queue(ticket, kept).await {
            Ok(full) if full.is_empty() => {}
            Ok(_) => warn!(
                "[INBOX] {sender}'s inbox is full: the [ACK] from {} is dropped",
                session.user
            ),
            Err(_) => warn!(
                "[STORE] cannot keep the [ACK] from {} for {sender}",
                session.user
            ),
        }
    }))
}

/// `FILE_FAILED|<sender>|<filename>|<reason>`: the recipient could not save a file; its
/// uploader is told instead of waiting for an `[ACK]` that will not come.
fn not_saved(session: &Session<'_>, sender: &str, filename: &str, reason: &str) {
    let registry = &session.shared.registry;
    if !registry.take_ack(session.user, sender, filename) {
        return session.refuse(Refusal::NoSuchAck {
            sender: sender.into(),
            filename: filename.into(),
        });
    }
    warn!(
        "[FILE ERROR] {} could not save '{filename}' from {sender}: {reason}",
        session.user
    );
    let refusal = Refusal::NotSaved {
        filename: filename.into(),
        recipient: session.user.into(),
        reason: reason.into(),
    };
    let line = ServerLine::Error {
        reason: refusal.to_string(),
    };
    registry.deliver_to(sender, Bytes::from(line.to_wire()), &mut session.held());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::COMMANDS;

    #[test]
    fn every_command_of_the_protocol_has_exactly_one_handler() {
        for spec in COMMANDS {
            let n = HANDLERS.iter().filter(|(s, _)| s.name == spec.name).count();
            assert_eq!(n, 1, "{}", spec.name);
        }
        assert_eq!(HANDLERS.len(), COMMANDS.len());
    }
}
