//! The server: a chat listener and a file listener sharing one registry.
//!
//! Every connection gets a reader task and a writer task; every task watches one shutdown
//! token, and [`Server::run`] waits for all of them before it returns (tokio-util's
//! `CancellationToken` and `TaskTracker`).

mod accounts;
mod chat;
mod file;
pub mod hooks;
mod limits;
pub mod metrics;
mod registry;
pub mod settings;

pub use accounts::{add_account, hash_password, set_account_password, verify_password};
pub use limits::raise_open_file_limit;
pub use settings::{Limits, Number, Setting, SettingError, Unit, SETTINGS};

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::flow::{Ended, Refusal, Step};
use crate::net::{Conn, LineReader};
use crate::protocol::names::{check_username, normalize};
use crate::protocol::ServerLine;
use crate::store::{SqliteStore, Store};
use crate::tls::{self, ServerTls, TlsSource};
use crate::{Error, Result};
use registry::Registry;

/// Everything an operator can set. `Default` is the lab's setup (127.0.0.1, ports 2003 and
/// 2007, files saved in the current directory) with the default [`Limits`].
#[derive(Clone)]
pub struct ServerConfig {
    /// Address to listen on.
    pub host: String,
    /// Chat port; 0 picks a free one.
    pub chat_port: u16,
    /// File port; 0 picks a free one.
    pub file_port: u16,
    /// Where uploads are saved as `received_from_<sender>_<filename>`.
    pub data_dir: PathBuf,
    /// Every limit (see [`settings`]).
    pub limits: Limits,
    /// What persists beyond a connection (`None`: a private in-memory SQLite database,
    /// opened when the server is bound).
    pub store: Option<Arc<dyn Store>>,
    /// Who may log in and what the server keeps.
    pub policy: Policy,
    /// TLS on both ports (beside plain text, told apart by a connection's first byte).
    pub tls: Option<TlsSource>,
    /// Where Prometheus scrapes the server's metrics (`None`: nowhere; 0 picks a port).
    pub metrics_port: Option<u16>,
    /// What the embedder decides and observes (`None`: nothing, at no cost).
    pub hooks: Option<Arc<hooks::Hooks>>,
}

/// What an embedder (a plugin, an operator's script) can do to a running server.
#[derive(Clone)]
pub struct Control(Arc<Shared>);

impl Control {
    /// Every connected user, in order of arrival.
    pub fn users(&self) -> Vec<String> {
        self.0.registry.users_except("")
    }

    /// Every group with its members, by name.
    pub fn groups(&self) -> Vec<(String, Vec<String>)> {
        self.0.registry.all_groups()
    }

    /// Sends `[SERVER] <text>` to a user, to every member of `GROUP:<g>`, or (`None`) to
    /// everyone connected; returns how many it reached. The text must be one line.
    pub fn say(&self, to: Option<&str>, text: &str) -> Result<usize> {
        if text.contains(['\n', '\r']) || text.trim().is_empty() {
            return Err(Error::InvalidArgument(
                "a server message is one line, not empty".into(),
            ));
        }
        let registry = &self.0.registry;
        let users = match to {
            None => registry.users_except(""),
            Some(target) => match target.strip_prefix(crate::protocol::file_header::GROUP_PREFIX) {
                Some(group) => registry.group_members(group),
                None => vec![target.to_owned()],
            },
        };
        let line = ServerLine::FromServer { text: text.into() };
        let reached = users
            .iter()
            .filter_map(|u| registry.outbox(u))
            .filter(|outbox| outbox.line(&line))
            .count();
        Ok(reached)
    }

    /// Disconnects `user` after `ERROR: kicked: <reason>`; false if they are not connected.
    pub async fn kick(&self, user: &str, reason: &str) -> bool {
        let Some(outbox) = self.0.registry.outbox(user) else {
            return false;
        };
        let reason = crate::protocol::server_line::one_line(reason);
        info!("[KICKED] {user}: {reason}");
        let line = ServerLine::Error {
            reason: format!("kicked: {reason}"),
        };
        outbox.close_after(&line, Duration::from_secs(1)).await;
        true
    }
}

/// The operator's yes-or-no choices about accounts and history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Only registered names may log in (guests get an error).
    pub require_account: bool,
    /// Guests may `register` their name.
    pub registration: bool,
    /// Messages are kept for `history` (for `history_days`).
    pub history: bool,
    /// Plain-text connections are refused (both ports).
    pub require_tls: bool,
    /// Passwords may come over plain text from other machines (by default only over TLS
    /// or from a loopback address).
    pub allow_plaintext_login: bool,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            require_account: false,
            registration: true,
            history: true,
            require_tls: false,
            allow_plaintext_login: false,
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            chat_port: 2003,
            file_port: 2007,
            data_dir: PathBuf::from("."),
            limits: Limits::default(),
            store: None,
            policy: Policy::default(),
            tls: None,
            metrics_port: None,
            hooks: None,
        }
    }
}

impl std::fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConfig")
            .field("host", &self.host)
            .field("chat_port", &self.chat_port)
            .field("file_port", &self.file_port)
            .field("data_dir", &self.data_dir)
            .field("limits", &self.limits)
            .field("policy", &self.policy)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

/// Descriptors kept free of connections: listeners, spool files, the spare, logging.
const FD_HEADROOM: usize = 128;

/// What every connection task shares.
pub(crate) struct Shared {
    pub(crate) config: ServerConfig,
    pub(crate) registry: Registry,
    /// What persists beyond a connection.
    pub(crate) store: Arc<dyn Store>,
    /// Cancelled once, to shut everything down.
    pub(crate) shutdown: CancellationToken,
    /// Every connection and forward task, so shutdown can wait for them.
    pub(crate) tasks: TaskTracker,
    /// Room for connections.
    gate: Arc<limits::Gate>,
    /// Room on disk, and each user's quota.
    pub(crate) disk: Arc<limits::DiskLedger>,
    /// Password hashing and the brakes on guessing.
    pub(crate) accounts: accounts::Accounts,
    /// Broken uploads kept for resuming.
    pub(crate) partials: file::Partials,
    /// Uploads arriving now, and recipients waiting to resume broken downloads.
    pub(crate) resumes: file::Resumes,
    /// The certificate, when the server speaks TLS.
    pub(crate) tls: Option<Arc<ServerTls>>,
    /// What the server counts.
    pub(crate) metrics: Arc<metrics::Metrics>,
    /// A descriptor held in reserve, given up at the descriptor ceiling to refuse cleanly.
    spare_fd: std::sync::Mutex<Option<std::fs::File>>,
    next_id: AtomicU64,
    /// Where this run's upload ids start (random, below 2^62).
    upload_base: u64,
}

impl Shared {
    /// What every connection of a server with `config` shares, admitting at most
    /// `max_connections` at once.
    fn new(config: ServerConfig, max_connections: usize, tls: Option<Arc<ServerTls>>) -> Arc<Self> {
        let limits = &config.limits;
        let store: Arc<dyn Store> = match &config.store {
            Some(store) => store.clone(),
            None => Arc::new(SqliteStore::in_memory()),
        };
        Arc::new(Shared {
            metrics: Arc::new(metrics::Metrics::new()),
            gate: limits::Gate::new(max_connections, limits.max_per_address),
            disk: limits::DiskLedger::new(
                config.data_dir.clone(),
                limits.user_quota,
                limits.min_free_disk,
                store.clone(),
            ),
            accounts: accounts::Accounts::new(limits.login_attempts, limits.login_lockout),
            spare_fd: std::sync::Mutex::new(std::fs::File::open("/dev/null").ok()),
            partials: file::Partials::default(),
            resumes: file::Resumes::default(),
            tls,
            store,
            config,
            registry: Registry::default(),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            next_id: AtomicU64::new(1),
            upload_base: {
                let mut bytes = [0u8; 4];
                let _ = getrandom::getrandom(&mut bytes);
                u64::from(u32::from_le_bytes(bytes)) << 30
            },
        })
    }

    /// A server's shared state without listeners, for unit tests.
    #[cfg(test)]
    pub(crate) fn for_tests(config: ServerConfig) -> Arc<Self> {
        let n = config.limits.max_connections;
        Self::new(config, n, None)
    }

    /// A fresh id for a connection or an upload.
    pub(crate) fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// A fresh upload id, which clients name to resume a download: unlike [`Self::next_id`]
    /// it starts at a random point each run, so an id from a previous run names nothing.
    pub(crate) fn upload_id(&self) -> u64 {
        self.upload_base + self.next_id()
    }
}

/// A bound, not yet running server.
pub struct Server {
    chat: TcpListener,
    file: TcpListener,
    /// The Prometheus endpoint's listener (`metrics_port`).
    metrics: Option<TcpListener>,
    shared: Arc<Shared>,
}

impl Server {
    /// Binds both ports and checks the data directory.
    pub async fn bind(config: ServerConfig) -> Result<Server> {
        std::fs::create_dir_all(&config.data_dir).map_err(|e| {
            Error::io(
                format!("cannot create data directory {}", config.data_dir.display()),
                e,
            )
        })?;
        let bind = |port: u16| {
            let addr = (config.host.clone(), port);
            async move {
                TcpListener::bind(addr.clone())
                    .await
                    .map_err(|e| Error::io(format!("cannot listen on {}:{}", addr.0, addr.1), e))
            }
        };
        let chat = bind(config.chat_port).await?;
        let file = bind(config.file_port).await?;
        let metrics = match config.metrics_port {
            Some(port) => Some(bind(port).await?),
            None => None,
        };
        let tls = match &config.tls {
            Some(source) => Some(Arc::new(ServerTls::new(
                source,
                &config.data_dir,
                &config.host,
            )?)),
            None if config.policy.require_tls => {
                return Err(Error::Tls(
                    "require_tls needs a certificate (tls: a PEM pair, or self-signed)".into(),
                ))
            }
            None => None,
        };
        describe_tls(&config, tls.as_deref());
        file::remove_stale_spools(&config.data_dir);
        let (soft, hard) = limits::raise_open_file_limit();
        let or_unlimited = |n: Option<u64>| n.map_or("unlimited".to_owned(), |n| n.to_string());
        info!(
            "[LIMITS] open files {} (hard {}); {}",
            or_unlimited(soft),
            or_unlimited(hard),
            config.limits.describe()
        );

        // Never admit more connections than there are descriptors for (leaving room for
        // listeners, spool files and the spare): past that, refuse with a line.
        let fd_room = soft.map_or(usize::MAX, |n| usize::try_from(n).unwrap_or(usize::MAX));
        let max_connections = config
            .limits
            .max_connections
            .min(fd_room.saturating_sub(FD_HEADROOM).max(1));
        if max_connections < config.limits.max_connections {
            warn!(
                "[LIMITS] {max_connections} connections at most: the open-file limit is {fd_room}"
            );
        }
        let shared = Shared::new(config, max_connections, tls);
        let store = &shared.store;
        let accounts = store
            .accounts()
            .await
            .map_err(|e| Error::Store(e.to_string()))?;
        let memberships = store
            .memberships()
            .await
            .map_err(|e| Error::Store(e.to_string()))?;
        info!(
            "[STORE] {} accounts, {} group memberships",
            accounts.len(),
            memberships.len()
        );
        shared
            .registry
            .load(accounts.into_iter().map(|a| a.name).collect(), memberships);
        Ok(Server {
            chat,
            file,
            metrics,
            shared,
        })
    }

    /// Re-reads the TLS certificate and key (as SIGHUP does): new handshakes use them,
    /// live connections keep theirs; on failure the old pair stays. Returns the new
    /// certificate's SHA-256 fingerprint.
    pub fn reload_tls(&self) -> Result<String> {
        self.tls_handle().reload()
    }

    /// The server's metrics (what `metrics_port` serves).
    pub fn metrics(&self) -> Arc<metrics::Metrics> {
        self.shared.metrics.clone()
    }

    /// The Prometheus endpoint's real address, when there is one.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// A handle for the embedder: who is there, messages as the server, kicks.
    pub fn control(&self) -> Control {
        Control(self.shared.clone())
    }

    /// A handle that reloads the certificate of the running server (see
    /// [`Server::reload_tls`]).
    pub fn tls_handle(&self) -> TlsHandle {
        TlsHandle(self.shared.tls.clone())
    }

    /// The chat listener's real address.
    pub fn chat_addr(&self) -> Result<SocketAddr> {
        self.chat
            .local_addr()
            .map_err(|e| Error::io("chat listener", e))
    }

    /// The file listener's real address.
    pub fn file_addr(&self) -> Result<SocketAddr> {
        self.file
            .local_addr()
            .map_err(|e| Error::io("file listener", e))
    }

    /// Serves until `shutdown` completes, then stops accepting, closes every connection
    /// (aborting transfers and removing their partial files) and waits for every task.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let Server {
            chat,
            file,
            metrics,
            shared,
        } = self;
        if let Some(listener) = metrics {
            let stop = shared.shutdown.clone();
            shared
                .tasks
                .spawn(metrics::serve(shared.metrics.clone(), listener, stop));
        }
        shared
            .tasks
            .spawn(accept_loop(shared.clone(), chat, Port::Chat));
        shared
            .tasks
            .spawn(accept_loop(shared.clone(), file, Port::File));
        shared.tasks.spawn(housekeeping(shared.clone()));
        tokio::select! {
            _ = shutdown => {}
            _ = shared.shutdown.cancelled() => {}
        }
        info!("[SHUTDOWN] closing connections");
        shared.shutdown.cancel();
        shared.tasks.close();
        shared.tasks.wait().await;
        info!("[SHUTDOWN] done");
    }
}

/// Reloads a running server's certificate (see [`Server::reload_tls`]).
#[derive(Clone)]
pub struct TlsHandle(Option<Arc<ServerTls>>);

impl TlsHandle {
    /// See [`Server::reload_tls`].
    pub fn reload(&self) -> Result<String> {
        let Some(tls) = &self.0 else {
            return Err(Error::Tls(
                "this server has no certificate to reload".into(),
            ));
        };
        match tls.reload() {
            Ok(fp) => {
                info!("[TLS] reloaded {}: SHA-256 {fp}", tls.cert_path().display());
                Ok(fp)
            }
            Err(e) => {
                warn!("[TLS] reload failed, keeping the old certificate: {e}");
                Err(e)
            }
        }
    }

    /// The SHA-256 fingerprint of the certificate in use (`None` without TLS).
    pub fn fingerprint(&self) -> Option<String> {
        self.0.as_deref().map(ServerTls::fingerprint)
    }
}

/// Logs how the server stands on TLS, with the certificate's fingerprint (what a client
/// pins or compares on first use).
fn describe_tls(config: &ServerConfig, tls: Option<&ServerTls>) {
    match tls {
        Some(tls) => info!(
            "[TLS] on both ports ({}), certificate {} SHA-256 {}",
            match config.policy.require_tls {
                true => "plain text refused",
                false => "plain text too",
            },
            tls.cert_path().display(),
            tls.fingerprint()
        ),
        None => {
            let local = config
                .host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
                || config.host == "localhost";
            if !local && !config.policy.allow_plaintext_login {
                info!("[TLS] off: registered users can log in from this machine only (--tls-cert/--tls-key or --tls-self-signed to serve TLS)");
            }
        }
    }
}

#[derive(Clone, Copy)]
enum Port {
    Chat,
    File,
}

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener, port: Port) {
    let mut backoff = Duration::from_millis(10);
    loop {
        let accepted = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, addr)) => {
                backoff = Duration::from_millis(10);
                match shared.gate.admit(addr.ip()) {
                    Ok(admission) => match port {
                        Port::Chat => {
                            let task = served(&shared, stream, addr, admission, true, chat::serve);
                            shared.tasks.spawn(task);
                        }
                        Port::File => {
                            let task = served(&shared, stream, addr, admission, false, file::serve);
                            shared.tasks.spawn(task);
                        }
                    },
                    Err(refusal) => {
                        shared.metrics.dropped(metrics::Dropped::Refused);
                        refuse_now(&stream, addr, refusal);
                    }
                }
            }
            Err(e) => {
                // EMFILE and friends: the listener is fine, the process is out of something.
                warn!("[ACCEPT ERROR] {e}; retrying in {backoff:?}");
                if matches!(e.raw_os_error(), Some(23 | 24)) {
                    refuse_at_the_ceiling(&shared, &listener).await;
                }
                tokio::select! {
                    _ = shared.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// How often the server tidies up: history older than `history_days`, and broken
/// uploads kept longer than `partial_ttl`.
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(3600);

/// Deletes history older than `history_days` (when the server keeps history) and drops
/// broken uploads older than `partial_ttl` (their spools and quota), at start and then
/// every hour.
async fn housekeeping(shared: Arc<Shared>) {
    let limits = &shared.config.limits;
    let keep = Duration::from_secs(limits.history_days.saturating_mul(86_400));
    loop {
        shared.partials.sweep(limits.partial_ttl);
        if shared.config.policy.history {
            let before = std::time::SystemTime::now()
                .checked_sub(keep)
                .unwrap_or(std::time::UNIX_EPOCH);
            match shared.store.prune_history(before).await {
                Ok(0) => {}
                Ok(n) => info!("[STORE] {n} messages older than {keep:?} left the history"),
                Err(e) => warn!("[STORE] cannot prune the history: {e}"),
            }
        }
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = tokio::time::sleep(HOUSEKEEPING_EVERY) => {}
        }
    }
}

/// Reads and checks the username a connection opens with, on either port, within the
/// handshake timeout counted from `opened` (when the connection was accepted).
pub(crate) async fn read_username(
    shared: &Shared,
    reader: &mut LineReader,
    kill: &CancellationToken,
    opened: Instant,
) -> Step<String> {
    let line = read_first_line(shared, reader, kill, opened).await?;
    checked_name(&line)
}

/// A username as sent, normalized and checked.
pub(crate) fn checked_name(name: &str) -> Step<String> {
    let name = normalize(name.trim()).into_owned();
    check_username(&name).map_err(Refusal::from)?;
    Ok(name)
}

/// Reads the first line of a connection as UTF-8, within the handshake timeout counted
/// from `opened` (the first byte and a TLS handshake came out of the same time).
pub(crate) async fn read_first_line(
    shared: &Shared,
    reader: &mut LineReader,
    kill: &CancellationToken,
    opened: Instant,
) -> Step<String> {
    let limit = shared.config.limits.handshake_timeout;
    let line = match tokio::time::timeout_at(opened + limit, reader.next_line(kill)).await {
        Ok(Ok(line)) => line,
        Ok(Err(Ended::Frame(e))) => return Err(Refusal::Frame(e).into()),
        Ok(Err(end)) => return Err(end.into()),
        Err(_) => return Err(Refusal::NoUsername(limit).into()),
    };
    let line = std::str::from_utf8(&line).map_err(|_| Refusal::UsernameNotUtf8)?;
    Ok(line.trim().to_owned())
}

/// Tells a connection refused before any handshake why, if it takes the line at once.
fn refuse_now(stream: &TcpStream, addr: SocketAddr, refusal: Refusal) {
    warn!("[REFUSED] {addr}: {refusal}");
    let line = ServerLine::Error {
        reason: refusal.to_string(),
    };
    let _ = stream.try_write(line.to_wire().as_bytes());
}

/// Out of descriptors: frees the spare one, accepts the waiting connection only to tell it
/// the server is full (instead of leaving it hanging in the backlog), then takes the spare
/// descriptor back.
async fn refuse_at_the_ceiling(shared: &Shared, listener: &TcpListener) {
    let spare = shared
        .spare_fd
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take();
    drop(spare);
    if let Ok(Ok((stream, addr))) =
        tokio::time::timeout(Duration::from_millis(10), listener.accept()).await
    {
        refuse_now(&stream, addr, Refusal::ServerFull);
    }
    *shared
        .spare_fd
        .lock()
        .unwrap_or_else(PoisonError::into_inner) = std::fs::File::open("/dev/null").ok();
}

/// An accepted connection's task (`chat`: on the chat port): opened (see [`open`]), then
/// `serve`d (`chat::serve` or `file::serve`). Each port's task is the size of its own
/// future: an idle user's chat task is not made as large as a file task.
fn served<F, Fut>(
    shared: &Arc<Shared>,
    stream: TcpStream,
    addr: SocketAddr,
    admission: limits::Admission,
    chat: bool,
    serve: F,
) -> impl Future<Output = ()> + Send + 'static
where
    F: FnOnce(Arc<Shared>, Conn, SocketAddr, Instant) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let shared = shared.clone();
    async move {
        shared.metrics.connection(chat, true);
        let opened = Instant::now();
        // Boxed: the TLS handshake's state lives on the heap only while it runs.
        if let Some(conn) = Box::pin(open(&shared, stream, addr, opened)).await {
            serve(shared.clone(), conn, addr, opened).await;
        }
        shared.metrics.connection(chat, false);
        drop(admission);
    }
}

/// Whether secrets (a password, a file connection's session proof) may come over a
/// connection: over TLS, from this machine, or from anywhere if the operator allows
/// plain-text logins.
pub(crate) fn secrets_allowed(shared: &Shared, tls: bool, addr: SocketAddr) -> bool {
    tls || plain_secrets_allowed(addr.ip(), shared.config.policy.allow_plaintext_login)
}

/// The plain-text half of [`secrets_allowed`]: only from a loopback address (an IPv4
/// address mapped into IPv6 counts as the IPv4 address), unless allowed.
fn plain_secrets_allowed(ip: std::net::IpAddr, allow_plaintext_login: bool) -> bool {
    allow_plaintext_login || ip.to_canonical().is_loopback()
}

/// Opens a connection as plain text or TLS, told apart by its first byte (a TLS handshake
/// record cannot start a username), within the handshake timeout; completes the TLS
/// handshake. `None`: the connection was refused or failed (and the log says why).
async fn open(
    shared: &Shared,
    stream: TcpStream,
    addr: SocketAddr,
    opened: Instant,
) -> Option<Conn> {
    let limit = shared.config.limits.handshake_timeout;
    let deadline = opened + limit;
    let mut first = [0u8; 1];
    let peeked = tokio::select! {
        _ = shared.shutdown.cancelled() => return None,
        peeked = tokio::time::timeout_at(deadline, stream.peek(&mut first)) => peeked,
    };
    let tls = match peeked {
        Ok(Ok(1)) if first[0] == tls::HANDSHAKE_RECORD => true,
        Ok(Ok(_)) => false, // a first byte of plain text, or the end (the reader sees it)
        Ok(Err(_)) => return None,
        Err(_) => {
            refuse_plain(stream, addr, Refusal::NoUsername(limit)).await;
            return None;
        }
    };
    if !tls {
        if shared.config.policy.require_tls {
            refuse_plain(stream, addr, Refusal::TlsRequired).await;
            return None;
        }
        return Some(Conn::tcp(stream));
    }
    let Some(server_tls) = &shared.tls else {
        warn!("[TLS] {addr}: a TLS handshake, but this server has no certificate (--tls-cert and --tls-key, or --tls-self-signed)");
        return None;
    };
    let _ = stream.set_nodelay(true);
    let handshake = tokio::select! {
        _ = shared.shutdown.cancelled() => return None,
        done = tokio::time::timeout_at(deadline, server_tls.accept(stream)) => done,
    };
    match handshake {
        Ok(Ok(tls)) => Some(Conn::Tls(tls)),
        Ok(Err(e)) => {
            warn!("[TLS] handshake with {addr} failed: {e}");
            None
        }
        Err(_) => {
            warn!("[TLS] handshake with {addr} not done within {limit:?}; dropped");
            None
        }
    }
}

/// Refuses a plain-text connection with its error line, then closes it: the write side
/// first, then whatever the peer had sent is read and dropped (for at most a second), so
/// the close is a FIN after the line and not a reset that could destroy it.
async fn refuse_plain(mut stream: TcpStream, addr: SocketAddr, refusal: Refusal) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    warn!("[REFUSED] {addr}: {refusal}");
    let line = ServerLine::Error {
        reason: refusal.to_string(),
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(line.to_wire().as_bytes()).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 1024];
        while stream.read(&mut sink).await? > 0 {}
        std::io::Result::Ok(())
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every idle connection keeps its tasks' futures alive, so their size is memory per
    /// user (docs/BENCHMARKS.md). A large buffer on an await path (a stack array, an
    /// unboxed upload) would multiply it; these budgets catch that.
    #[test]
    fn plain_text_secrets_come_only_from_loopback_unless_allowed() {
        let ip = |s: &str| s.parse::<std::net::IpAddr>().expect("an address");
        for local in ["127.0.0.1", "127.3.2.1", "::1", "::ffff:127.0.0.1"] {
            assert!(plain_secrets_allowed(ip(local), false), "{local}");
        }
        for remote in [
            "10.0.0.1",
            "192.0.2.2",
            "::ffff:10.0.0.1",
            "2001:db8::1",
            "0.0.0.0",
        ] {
            assert!(!plain_secrets_allowed(ip(remote), false), "{remote}");
            assert!(plain_secrets_allowed(ip(remote), true), "{remote}, allowed");
        }
    }

    #[tokio::test]
    async fn connection_futures_stay_small() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = ServerConfig {
            chat_port: 0,
            file_port: 0,
            data_dir: dir.path().into(),
            ..ServerConfig::default()
        };
        let server = Server::bind(cfg).await.expect("binds");
        let addr = server.chat_addr().expect("addr");
        let shared = server.shared.clone();
        let stream = || async {
            Conn::tcp(
                tokio::net::TcpStream::connect(addr)
                    .await
                    .expect("connects"),
            )
        };
        let chat = chat::serve(shared.clone(), stream().await, addr, Instant::now());
        let file = file::serve(shared.clone(), stream().await, addr, Instant::now());
        let queue = crate::net::SendQueue::new(1, 1, 1);
        let (_rd, wr) = stream().await.split();
        let writer =
            crate::net::write_loop(wr, queue, CancellationToken::new(), Duration::from_secs(1));
        // Each port's task is its own size: a chat connection's is not a file one's.
        let chat_task = {
            let stream = tokio::net::TcpStream::connect(addr)
                .await
                .expect("connects");
            let admission = shared.gate.admit(addr.ip()).expect("admitted");
            std::mem::size_of_val(&served(&shared, stream, addr, admission, true, chat::serve))
        };
        let file_task = {
            let stream = tokio::net::TcpStream::connect(addr)
                .await
                .expect("connects");
            let admission = shared.gate.admit(addr.ip()).expect("admitted");
            std::mem::size_of_val(&served(
                &shared,
                stream,
                addr,
                admission,
                false,
                file::serve,
            ))
        };
        // One wrapper (the opening, the metrics, the admission) around each, no more.
        let (chat_size, file_size) = (std::mem::size_of_val(&chat), std::mem::size_of_val(&file));
        assert!(
            chat_task - chat_size == file_task - file_size && chat_task - chat_size <= 256,
            "chat task {chat_task} around {chat_size}, file task {file_task} around {file_size}"
        );
        // 904 since the message hook's read-ahead (one pointer; nothing else without hooks),
        // 912 since a line reader without a pause to wait for makes no timer, 920 since a
        // hooked line's question is a group and an index (no allocation of its own).
        assert!(
            std::mem::size_of_val(&chat) <= 920,
            "chat: {}",
            std::mem::size_of_val(&chat)
        );
        assert!(
            std::mem::size_of_val(&file) <= 1152,
            "file: {}",
            std::mem::size_of_val(&file)
        );
        assert!(
            std::mem::size_of_val(&writer) <= 768,
            "writer: {}",
            std::mem::size_of_val(&writer)
        );
    }
}
