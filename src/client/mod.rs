//! The client engine: both sockets, typed events, atomic file receive.
//!
//! It speaks to our server and to the lab's alike: the username goes alone and the engine
//! waits for the reply, every command is one newline-terminated line in one write (the
//! lab's server strips the newline), `TCP_NODELAY` is on, and only valid UTF-8 is sent.
//! Files arrive as `received_from_<sender>_<filename>.tmp` in the download directory, are
//! renamed into place once whole, and only then acknowledged with `FILE_RECEIVED|...`.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::flow::{Ended, Step, Stop};
use crate::net::{Conn, ConnWrite, LineReader};
use crate::protocol::command::{
    check_password, format_ack, format_command, format_file_failed, format_inbox_received,
    parse_command, Parsed, Spec, BROADCAST, FILES, GET, HELLO, HISTORY, JOIN, LEAVE, LIST, MSG,
    PASSWD, REGISTER, SEND_GROUP,
};
use crate::protocol::file_header::{Trailer, GROUP_PREFIX};
use crate::protocol::names::{
    check_filename, check_group, check_username, MAX_FILENAME_BYTES, TMP_SUFFIX,
};
use crate::protocol::{normalize, saved_name, ForwardHeader, ServerLine, Target, UploadHeader};
use crate::tls::{self, TlsClientOptions};
use crate::transfer::{receive_rest, Body, BodyError, Partial, BODY_CHUNK};
use crate::{Error, Result};

/// Least time the client waits for an upload's verdict after its last byte.
const VERDICT_WAIT: Duration = Duration::from_secs(60);
/// How long the end of the chat connection waits for the file side to report the
/// transfer it was in, so `FileFailed` comes before `Disconnected`.
const FILES_REPORT_GRACE: Duration = Duration::from_secs(2);
/// Longest line the client accepts from a server.
const MAX_SERVER_LINE: usize = 1024 * 1024;
/// Events buffered for the application before the engine stops reading the sockets.
const EVENT_QUEUE: usize = 65_536;
/// What [`Client::upload_once`] says of an upload that broke off and was kept by the server.
const KEPT: &str = "the upload broke off; the server kept what arrived";

/// How often a checked upload is sent again after its file connection broke (waiting
/// 0.4 s, 0.8 s, ... between tries).
const UPLOAD_RETRIES: u32 = 5;
/// How often, and how patiently, a lost file connection is re-opened.
const FILE_RECONNECT_TRIES: u32 = 10;

/// Which way a transfer goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Our upload.
    Upload,
    /// A file coming to us.
    Download,
}

/// Least time between two progress events of one transfer.
const PROGRESS_EVERY: Duration = Duration::from_millis(100);

/// Turns a transfer's running byte count into at most 10 progress events a second (and
/// one at the end). Events that find the queue full are dropped, not waited for.
struct Meter<'a> {
    direction: Direction,
    peer: &'a str,
    filename: &'a str,
    total: u64,
    tx: &'a mpsc::Sender<Event>,
    start: std::time::Instant,
    last: Option<std::time::Instant>,
}

impl<'a> Meter<'a> {
    fn new(
        direction: Direction,
        peer: &'a str,
        filename: &'a str,
        total: u64,
        tx: &'a mpsc::Sender<Event>,
    ) -> Self {
        Self {
            direction,
            peer,
            filename,
            total,
            tx,
            start: std::time::Instant::now(),
            last: None,
        }
    }

    fn update(&mut self, done: u64) {
        let now = std::time::Instant::now();
        let due = self.last.is_none_or(|t| now - t >= PROGRESS_EVERY) || done == self.total;
        if !due {
            return;
        }
        self.last = Some(now);
        let secs = (now - self.start).as_secs_f64();
        let rate = match secs > 0.0 {
            true => (done as f64 / secs) as u64,
            false => 0,
        };
        let _ = self.tx.try_send(Event::Progress {
            direction: self.direction,
            peer: self.peer.to_owned(),
            filename: self.filename.to_owned(),
            done,
            total: self.total,
            rate,
        });
    }
}

/// Where and as whom to connect.
#[derive(Clone)]
pub struct ClientConfig {
    /// Server host name or address.
    pub host: String,
    /// Server chat port.
    pub chat_port: u16,
    /// Server file port.
    pub file_port: u16,
    /// The username to claim.
    pub username: String,
    /// Where received files are saved.
    pub download_dir: PathBuf,
    /// How long to wait for a connection, a handshake reply or a command's reply.
    pub timeout: Duration,
    /// The password, for a registered name (the server asks for it at login).
    pub password: Option<String>,
    /// TLS on both connections, and how the server's certificate is checked (`None`:
    /// plain text, as the lab).
    pub tls: Option<TlsClientOptions>,
    /// Send passwords over plain text to another machine too (by default a password goes
    /// only over TLS or to a loopback address, whatever the server asks).
    pub allow_plaintext_login: bool,
    /// Report transfers as they go (`Event::Progress`); off, the events are the lab's.
    pub progress: bool,
}

impl std::fmt::Debug for ClientConfig {
    /// Everything but the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConfig")
            .field("host", &self.host)
            .field("chat_port", &self.chat_port)
            .field("file_port", &self.file_port)
            .field("username", &self.username)
            .field("download_dir", &self.download_dir)
            .field("timeout", &self.timeout)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("tls", &self.tls)
            .field("allow_plaintext_login", &self.allow_plaintext_login)
            .field("progress", &self.progress)
            .finish()
    }
}

impl ClientConfig {
    /// The lab's defaults (127.0.0.1, ports 2003 and 2007, files into the current
    /// directory) for `username`.
    pub fn new(username: impl Into<String>) -> Self {
        Self {
            host: "127.0.0.1".into(),
            chat_port: 2003,
            file_port: 2007,
            username: username.into(),
            download_dir: PathBuf::from("."),
            timeout: Duration::from_secs(10),
            password: None,
            tls: None,
            allow_plaintext_login: false,
            progress: false,
        }
    }
}

/// Something that happened, in the order it happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A line from the server's chat port, parsed.
    Line(ServerLine),
    /// A message kept for us while we were away, and when it was sent (UTC, ISO 8601).
    Queued {
        /// When it was sent.
        at: String,
        /// The message, as it would have come live.
        line: ServerLine,
    },
    /// A file arrived whole, was renamed into place, and has been acknowledged.
    FileReceived {
        /// Who sent it.
        sender: String,
        /// Its name as sent.
        filename: String,
        /// Where it was saved.
        path: PathBuf,
        /// Its size in bytes.
        size: u64,
    },
    /// An incoming file could not be received; no file is left under its final name.
    FileFailed {
        /// What went wrong.
        reason: String,
    },
    /// How far a transfer has got (when [`ClientConfig::progress`] is on): at most 10 a
    /// second per transfer, the first when it starts and the last at its total.
    Progress {
        /// An upload of ours, or a file coming to us.
        direction: Direction,
        /// The other end: the upload's target, or the file's sender.
        peer: String,
        /// The file's name.
        filename: String,
        /// Bytes done so far.
        done: u64,
        /// Bytes in all.
        total: u64,
        /// Bytes per second since the transfer began.
        rate: u64,
    },
    /// The chat connection closed: no more events will come.
    Disconnected,
}

/// What an upload's verdict says: the name of the server's copy, or why it failed.
type Verdict = std::result::Result<String, Unsaved>;

/// Why an upload is not saved.
#[derive(Debug)]
enum Unsaved {
    /// Refused, or it broke off for good: the server's reason.
    Refused(String),
    /// It broke off with its file connection, and the server kept what arrived.
    Kept,
}

/// Callers waiting for the reply to their own command (the reply is theirs, not an event).
///
/// Every `list` and `join` sent has an entry, in the order sent: a caller's channel, or
/// `None` for a raw command whose reply is an event. The server answers in order, so each
/// reply goes to its own command, never to someone else's. The same holds for the
/// extension's hello and for upload verdicts (one per upload, in the order of uploads).
#[derive(Default)]
struct Waiters {
    users: VecDeque<Option<oneshot::Sender<Vec<String>>>>,
    joins: VecDeque<(String, Option<oneshot::Sender<()>>)>,
    /// The hello sent at login, until the server answers it.
    hello: Option<oneshot::Sender<bool>>,
    /// Uploads whose verdict has not come yet.
    uploads: VecDeque<oneshot::Sender<Verdict>>,
    /// The checked upload waiting for the server's go-ahead (one at a time: the file
    /// connection carries one upload at a time).
    ready: Option<oneshot::Sender<(u64, Option<String>)>>,
    /// `register`, `passwd` and `history` calls, in the order sent.
    requests: VecDeque<Request>,
    /// The time of a `[QUEUED <time>]` line, for the message that follows it.
    queued_at: Option<String>,
}

/// One of the messages of a conversation, as `history` returns them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryEntry {
    /// When it was sent (UTC, ISO 8601).
    pub at: String,
    /// Who wrote it.
    pub sender: String,
    /// What it said.
    pub text: String,
}

/// A call waiting for its answer, which is its own line or an `ERROR:` line.
enum Request {
    /// `Registered <name>.`
    Register(oneshot::Sender<std::result::Result<(), String>>),
    /// `Password changed.`
    Passwd(oneshot::Sender<std::result::Result<(), String>>),
    /// `[FILES #...]` lines, then `[FILES END]`.
    Files(
        Vec<ServerLine>,
        oneshot::Sender<std::result::Result<Vec<ServerLine>, String>>,
    ),
    /// `[HISTORY ...]` lines, then `[HISTORY END]`.
    History(
        Vec<HistoryEntry>,
        oneshot::Sender<std::result::Result<Vec<HistoryEntry>, String>>,
    ),
}

/// What a command that is about to be sent will be answered with.
enum Expect {
    /// Nothing to route.
    Nothing,
    /// A `Connected users:` line, for this caller (or `None`: for the events).
    Users(Option<oneshot::Sender<Vec<String>>>),
    /// A `You joined group` line.
    Joined(String, Option<oneshot::Sender<()>>),
    /// `[HELLO]` (extensions on), or the unknown-command line (a lab server).
    Hello(oneshot::Sender<bool>),
    /// The answer of `register`, `passwd` or `history`.
    Request(Request),
}

struct Inner {
    config: ClientConfig,
    /// The secret that proves our file connection (given at a login with a password).
    proof: Option<String>,
    /// Whether passwords may go over the chat connection (see [`secrets_allowed`]), and
    /// whether the server is on this machine.
    reach: Reach,
    /// Chat write half: one command per write, never two at once.
    chat: tokio::sync::Mutex<ConnWrite>,
    /// File write half, for uploads (`None` while the file connection is being re-opened).
    file: tokio::sync::Mutex<Option<ConnWrite>>,
    waiters: Mutex<Waiters>,
    /// Whether the server speaks the extensions (it answered our hello).
    extended: std::sync::atomic::AtomicBool,
    /// Fires when the client is closed or the chat connection ends.
    closed: CancellationToken,
    /// Where progress events of uploads go (weak: the channel ends with the readers).
    events: mpsc::WeakSender<Event>,
    /// Downloads broken off with their file connection, by file id, until they resume.
    kept: Mutex<Vec<(u64, KeptDownload)>>,
}

/// The part of a checked download whose file connection broke, kept to be resumed.
struct KeptDownload {
    /// The `.tmp` holding the bytes that arrived (deleted if dropped).
    partial: Partial,
    /// The hash state of exactly those bytes.
    hasher: blake3::Hasher,
    /// Who sent the file.
    sender: String,
    /// Its name.
    filename: String,
    /// Its size.
    size: u64,
}

/// Broken downloads kept at most (the oldest goes first).
const MAX_KEPT_DOWNLOADS: usize = 8;

impl Inner {
    fn kept(&self) -> std::sync::MutexGuard<'_, Vec<(u64, KeptDownload)>> {
        self.kept.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn take_kept(&self, id: u64) -> Option<KeptDownload> {
        let mut kept = self.kept();
        let i = kept.iter().position(|(k, _)| *k == id)?;
        Some(kept.remove(i).1)
    }
}

/// A connected client. Cheap to clone; every clone drives the same connections.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

/// The stream of [`Event`]s of one client.
pub struct Events {
    rx: mpsc::Receiver<Event>,
}

impl Events {
    /// The next event; `None` once the client is closed and every event has been taken.
    pub async fn next(&mut self) -> Option<Event> {
        self.rx.recv().await
    }

    /// An event that is already waiting, without waiting for one: `Ok(None)` means none is
    /// there yet, `Err(())` that the stream has ended.
    #[allow(clippy::result_unit_err)]
    pub fn try_next(&mut self) -> Result<Option<Event>, ()> {
        match self.rx.try_recv() {
            Ok(event) => Ok(Some(event)),
            Err(mpsc::error::TryRecvError::Empty) => Ok(None),
            Err(mpsc::error::TryRecvError::Disconnected) => Err(()),
        }
    }
}

fn io(context: &str) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |e| Error::io(context, e)
}

async fn connect(config: &ClientConfig, port: u16) -> Result<Conn> {
    let addr = (config.host.as_str(), port);
    let stream = tokio::time::timeout(config.timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| Error::Timeout("connecting"))?
        .map_err(|e| Error::io(format!("cannot connect to {}:{port}", config.host), e))?;
    let Some(options) = &config.tls else {
        return Ok(Conn::tcp(stream));
    };
    let _ = stream.set_nodelay(true);
    let tls = tls::connect(stream, &config.host, port, options);
    // A plain-text server waits for a username and never answers a handshake (the lab's
    // dies on the bytes): say so rather than just "timed out".
    let tls = tokio::time::timeout(config.timeout, tls)
        .await
        .map_err(|_| {
            Error::Tls(format!(
                "no answer to the TLS handshake from {}:{port} within {:?}: it may not speak TLS",
                config.host, config.timeout
            ))
        })??;
    Ok(Conn::Tls(tls))
}

/// Whether a password may be sent over `conn`: over TLS, to a loopback address, or
/// anywhere if the user allowed it (someone in the middle could ask for it otherwise).
fn secrets_allowed(config: &ClientConfig, conn: &Conn) -> bool {
    conn.is_tls() || config.allow_plaintext_login || conn.peer_is_loopback()
}

/// The error for a password that would cross a network in clear.
fn plaintext_password(config: &ClientConfig) -> Error {
    Error::Tls(format!(
        "refusing to send a password in plain text to {}: connect with TLS (or allow \
         plain-text logins)",
        config.host
    ))
}

/// Writes `bytes` whole and flushes them (TLS may hold the last record back otherwise).
async fn send_all(wr: &mut ConnWrite, bytes: &[u8]) -> std::io::Result<()> {
    wr.write_all(bytes).await?;
    wr.flush().await
}

/// What a connection is: whether passwords may go over it, and whether the server is on
/// this machine.
#[derive(Clone, Copy)]
struct Reach {
    secrets: bool,
    local: bool,
}

/// Sends `first` (the username, alone) and reads the one-line reply; also says what the
/// connection is.
async fn handshake(
    config: &ClientConfig,
    port: u16,
    first: &str,
) -> Result<(LineReader, ConnWrite, ServerLine, Reach)> {
    let conn = connect(config, port).await?;
    let reach = Reach {
        secrets: secrets_allowed(config, &conn),
        local: conn.peer_is_loopback(),
    };
    let (rd, mut wr) = conn.split();
    send_all(&mut wr, format!("{first}\n").as_bytes())
        .await
        .map_err(io("sending username"))?;
    let mut reader = LineReader::line_framed(rd, MAX_SERVER_LINE);
    let reply = next_reply(config, &mut reader).await?;
    Ok((reader, wr, reply, reach))
}

/// The next line of a handshake; an `ERROR:` line is a refusal.
async fn next_reply(config: &ClientConfig, reader: &mut LineReader) -> Result<ServerLine> {
    let never = CancellationToken::new();
    let line = tokio::time::timeout(config.timeout, reader.next_line(&never))
        .await
        .map_err(|_| Error::Timeout("waiting for the server's greeting"))?
        .map_err(|_| Error::Refused("the server closed the connection".into()))?;
    match ServerLine::parse(&String::from_utf8_lossy(&line)) {
        ServerLine::Error { reason } => Err(Error::Refused(reason)),
        reply => Ok(reply),
    }
}

/// Logs in on the chat port: the username, and the password if the server asks for one
/// (after asking for the extensions, so the server gives us the file connection's proof
/// and the times of queued messages). Returns the welcome and the proof.
async fn log_in(config: &ClientConfig) -> Result<(LineReader, ConnWrite, ServerLine, Login)> {
    let (mut reader, mut wr, reply, reach) =
        handshake(config, config.chat_port, &config.username).await?;
    let guest = Login { proof: None, reach };
    let ServerLine::PasswordPrompt { .. } = reply else {
        return Ok((reader, wr, reply, guest));
    };
    let Some(password) = &config.password else {
        return Err(Error::PasswordRequired(config.username.clone()));
    };
    if !reach.secrets {
        return Err(plaintext_password(config));
    }
    send_all(&mut wr, format!("{HELLO}\n{password}\n").as_bytes())
        .await
        .map_err(io("sending password"))?;
    let welcome = next_reply(config, &mut reader).await?;
    let proof = match next_reply(config, &mut reader).await? {
        ServerLine::Session { token } if token == "-" => return Ok((reader, wr, welcome, guest)),
        ServerLine::Session { token } => token,
        other => {
            return Err(Error::Protocol(format!(
                "expected the session's proof after the welcome, got {other}"
            )))
        }
    };
    let login = Login {
        proof: Some(proof),
        reach,
    };
    Ok((reader, wr, welcome, login))
}

/// What a login leaves for the session.
struct Login {
    /// The secret that proves the file connection (a login with a password).
    proof: Option<String>,
    /// What the chat connection is.
    reach: Reach,
}

async fn open_file_connection(
    config: &ClientConfig,
    proof: Option<&str>,
) -> Result<(LineReader, ConnWrite)> {
    let first = match proof {
        Some(proof) => format!("{} {proof}", config.username),
        None => config.username.clone(),
    };
    let (reader, wr, greeting, _) = handshake(config, config.file_port, &first).await?;
    match greeting {
        ServerLine::Other(line) if line == "FILE_SOCKET_CONNECTED" => Ok((reader, wr)),
        other => Err(Error::Protocol(format!(
            "expected FILE_SOCKET_CONNECTED on the file port, got {other:?}"
        ))),
    }
}

/// A message or command argument must stay on its line.
fn one_line(what: &str, text: &str) -> Result<()> {
    if text.contains(['\n', '\r']) {
        return Err(Error::InvalidArgument(format!(
            "{what} may not contain a line break"
        )));
    }
    if text.trim().is_empty() {
        return Err(Error::InvalidArgument(format!("{what} is empty")));
    }
    Ok(())
}

fn invalid(e: impl std::fmt::Display) -> Error {
    Error::InvalidArgument(e.to_string())
}

/// Whether an upload's body goes compressed (zstd, with our server only; the server
/// saves and forwards the original bytes to everyone who is not our client).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Compression {
    /// When it pays: the server is on another machine (on this one, bytes cost less than
    /// compressing them) and the file's first 128 KiB shrink to 90% or less.
    #[default]
    Auto,
    /// Always (except an empty file).
    Always,
    /// Never.
    Never,
}

impl Client {
    /// Connects both sockets as `config.username` and starts the engine's reader tasks
    /// on the current tokio runtime.
    pub async fn connect(mut config: ClientConfig) -> Result<(Client, Events)> {
        config.username = normalize(&config.username).into_owned();
        check_username(&config.username).map_err(invalid)?;
        std::fs::create_dir_all(&config.download_dir).map_err(io("creating download directory"))?;
        let (chat_reader, chat_wr, welcome, login) = log_in(&config).await?;
        let Login { proof, reach } = login;
        if welcome
            != (ServerLine::Welcome {
                user: config.username.clone(),
            })
        {
            return Err(Error::Protocol(format!(
                "expected a welcome, got {welcome}"
            )));
        }
        let (file_reader, file_wr) = open_file_connection(&config, proof.as_deref()).await?;
        let (tx, rx) = mpsc::channel(EVENT_QUEUE);
        let inner = Arc::new(Inner {
            config,
            proof,
            reach,
            chat: tokio::sync::Mutex::new(chat_wr),
            file: tokio::sync::Mutex::new(Some(file_wr)),
            waiters: Mutex::default(),
            extended: std::sync::atomic::AtomicBool::new(false),
            closed: CancellationToken::new(),
            events: tx.downgrade(),
            kept: Mutex::default(),
        });
        let _ = tx.send(Event::Line(welcome)).await;
        let files = tokio::spawn(read_files(inner.clone(), file_reader, tx.clone()));
        tokio::spawn(read_chat(inner.clone(), chat_reader, tx, files));
        let client = Client { inner };
        client.hello().await?;
        Ok((client, Events { rx }))
    }

    /// Asks for the protocol's extensions: our server answers `[HELLO]`, the lab's its
    /// unknown-command line; neither answer becomes an event.
    async fn hello(&self) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        let line = format!("{HELLO}\n");
        self.write_chat(line, Expect::Hello(tx)).await?;
        let extended = match self.await_reply(rx).await {
            Ok(extended) => extended,
            Err(Error::Timeout(_)) => false,
            Err(e) => return Err(e),
        };
        self.inner.extended.store(extended, Relaxed);
        Ok(())
    }

    /// Whether the server speaks the extensions (upload verdicts, failed receipts).
    pub fn extended(&self) -> bool {
        self.inner.extended.load(Relaxed)
    }

    /// The username this client is connected as.
    pub fn username(&self) -> &str {
        &self.inner.config.username
    }

    /// Whether the client is closed or its chat connection has ended.
    pub fn is_closed(&self) -> bool {
        self.inner.closed.is_cancelled()
    }

    /// Sends one raw command line, as the lab's client does with whatever is typed. It may
    /// not contain a line break (that would make it two commands).
    pub async fn send_command(&self, line: &str) -> Result<()> {
        one_line("a command", line)?;
        let parsed = parse_command(line);
        if let Ok(Parsed::Call(call)) = &parsed {
            if call.is(&REGISTER) || call.is(&PASSWD) {
                self.may_send_passwords()?;
            }
        }
        let expect = match parsed {
            Ok(Parsed::Call(call)) if call.is(&LIST) => Expect::Users(None),
            Ok(Parsed::Call(call)) if call.is(&JOIN) => Expect::Joined(call.arg(0).into(), None),
            _ => Expect::Nothing,
        };
        self.write_chat(format!("{line}\n"), expect).await
    }

    /// Writes one command; its expected reply is registered under the writer's lock, so
    /// the order of registration is the order on the wire.
    async fn write_chat(&self, line: String, expect: Expect) -> Result<()> {
        if self.is_closed() {
            return Err(Error::Closed);
        }
        // In a task of its own: a caller cancelled mid-write (Ctrl-C, asyncio) must not
        // leave half a command on the wire for the next one to run into.
        let inner = self.inner.clone();
        let write = tokio::spawn(async move {
            let mut chat = inner.chat.lock().await;
            inner.waiters().expect(expect);
            send_all(&mut chat, line.as_bytes())
                .await
                .map_err(io("sending command"))
        });
        write.await.map_err(|_| Error::Closed)?
    }

    async fn command(&self, spec: &Spec, args: &[&str]) -> Result<()> {
        self.write_chat(format_command(spec, args), Expect::Nothing)
            .await
    }

    /// `msg <to> <text>`: a private message.
    pub async fn msg(&self, to: &str, text: &str) -> Result<()> {
        check_username(to).map_err(invalid)?;
        one_line("a message", text)?;
        self.command(&MSG, &[to, text]).await
    }

    /// `broadcast <text>`: to every other connected user.
    pub async fn broadcast(&self, text: &str) -> Result<()> {
        one_line("a message", text)?;
        self.command(&BROADCAST, &[text]).await
    }

    /// `send_group <group> <text>`.
    pub async fn send_group(&self, group: &str, text: &str) -> Result<()> {
        check_group(group).map_err(invalid)?;
        one_line("a message", text)?;
        self.command(&SEND_GROUP, &[group, text]).await
    }

    /// `list`: the other connected users, in order of arrival. The reply is returned here
    /// and is not also delivered as an event.
    pub async fn list_users(&self) -> Result<Vec<String>> {
        let (tx, rx) = oneshot::channel();
        let line = format_command(&LIST, &[]);
        self.write_chat(line, Expect::Users(Some(tx))).await?;
        self.await_reply(rx).await
    }

    /// `join <group>`: returns once the server has confirmed (the confirmation is returned
    /// here and is not also delivered as an event).
    pub async fn join(&self, group: &str) -> Result<()> {
        // The server answers with the name in NFC: wait for that one.
        let group = normalize(group);
        check_group(&group).map_err(invalid)?;
        let (tx, rx) = oneshot::channel();
        let line = format_command(&JOIN, &[&group]);
        self.write_chat(line, Expect::Joined(group.into_owned(), Some(tx)))
            .await?;
        self.await_reply(rx).await
    }

    /// `register <password>`: claims our name; returns once the server has registered it
    /// (an `ERROR:` answer is raised as a refusal).
    pub async fn register(&self, password: &str) -> Result<()> {
        check_password(password).map_err(invalid)?;
        self.may_send_passwords()?;
        let (tx, rx) = oneshot::channel();
        let line = format_command(&REGISTER, &[password]);
        self.write_chat(line, Expect::Request(Request::Register(tx)))
            .await?;
        self.await_reply(rx).await?.map_err(Error::Refused)
    }

    /// A password goes over TLS or to this machine only, unless the user allowed more.
    fn may_send_passwords(&self) -> Result<()> {
        match self.inner.reach.secrets {
            true => Ok(()),
            false => Err(plaintext_password(&self.inner.config)),
        }
    }

    /// `passwd <old> <new>`: returns once the password is changed.
    pub async fn passwd(&self, old: &str, new: &str) -> Result<()> {
        one_line("the old password", old)?;
        if old.contains(' ') {
            return Err(Error::InvalidArgument(
                "a password may not contain spaces".into(),
            ));
        }
        check_password(new).map_err(invalid)?;
        self.may_send_passwords()?;
        let (tx, rx) = oneshot::channel();
        let line = format_command(&PASSWD, &[old, new]);
        self.write_chat(line, Expect::Request(Request::Passwd(tx)))
            .await?;
        self.await_reply(rx).await?.map_err(Error::Refused)
    }

    /// `history <user|GROUP:group> [count]`: the last messages of a conversation, oldest
    /// first (returned here, not as events).
    pub async fn history(&self, with: &str, count: usize) -> Result<Vec<HistoryEntry>> {
        let name = with.strip_prefix(GROUP_PREFIX);
        match name {
            Some(group) => check_group(group),
            None => check_username(with),
        }
        .map_err(invalid)?;
        let (tx, rx) = oneshot::channel();
        let arg = format!("{with} {}", count.max(1));
        let line = format_command(&HISTORY, &[&arg]);
        let request = Request::History(Vec::new(), tx);
        self.write_chat(line, Expect::Request(request)).await?;
        self.await_reply(rx).await?.map_err(Error::Refused)
    }

    /// `files`: the last files we sent or received (also to our groups), oldest first, as
    /// `ServerLine::FileEntry` lines (returned here, not as events).
    pub async fn files(&self) -> Result<Vec<ServerLine>> {
        let (tx, rx) = oneshot::channel();
        let line = format_command(&FILES, &[]);
        self.write_chat(line, Expect::Request(Request::Files(Vec::new(), tx)))
            .await?;
        self.await_reply(rx).await?.map_err(Error::Refused)
    }

    /// `get <id>`: the server sends file `id` of its index again, as a forward (its events
    /// follow: the `[FILE]` notice and `FileReceived`, or an `ERROR:` line).
    pub async fn get(&self, id: u64) -> Result<()> {
        self.command(&GET, &[&id.to_string()]).await
    }

    /// `leave <group>`: its answer (`You left group`, or `You are not in group`) comes as
    /// an event.
    pub async fn leave(&self, group: &str) -> Result<()> {
        let group = normalize(group);
        check_group(&group).map_err(invalid)?;
        self.command(&LEAVE, &[&group]).await
    }

    async fn await_reply<T>(&self, rx: oneshot::Receiver<T>) -> Result<T> {
        tokio::select! {
            reply = tokio::time::timeout(self.inner.config.timeout, rx) => match reply {
                Ok(Ok(value)) => Ok(value),
                Ok(Err(_)) => Err(Error::Closed),
                Err(_) => Err(Error::Timeout("waiting for the server's reply")),
            },
            _ = self.inner.closed.cancelled() => Err(Error::Closed),
        }
    }

    /// Sends the file at `path` to a user or to `GROUP:<group>`, streaming it from disk,
    /// compressed or not as `compression` says. Returns the file's size once the server has
    /// it (the lab's server: once the last byte is written).
    pub async fn send_file(
        &self,
        target: &str,
        path: &Path,
        compression: Compression,
    ) -> Result<u64> {
        let target = match target.strip_prefix(GROUP_PREFIX) {
            Some(group) => check_group(group).map(|()| Target::Group(group.into())),
            None => check_username(target).map(|()| Target::User(target.into())),
        }
        .map_err(invalid)?;
        let meta = tokio::fs::metadata(path).await;
        if !meta.as_ref().is_ok_and(|m| m.is_file()) {
            return Err(Error::InvalidArgument("File does not exist".into()));
        }
        let filename = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| Error::InvalidArgument("the file name is not valid UTF-8".into()))?;
        check_filename(filename).map_err(invalid)?;
        let open = || async {
            tokio::fs::File::open(path)
                .await
                .map_err(io("opening file"))
        };
        let size = open()
            .await?
            .metadata()
            .await
            .map_err(io("reading file size"))?
            .len();
        let checked = self.extended();
        let compressed = checked
            && match compression {
                Compression::Always => size > 0,
                Compression::Never => false,
                Compression::Auto if self.inner.reach.local => false,
                Compression::Auto => {
                    let mut sample = Vec::new();
                    (&mut open().await?)
                        .take(crate::compress::SAMPLE_BYTES as u64)
                        .read_to_end(&mut sample)
                        .await
                        .map_err(io("reading file"))?;
                    crate::compress::pays(size, &sample)
                }
            };
        let header = UploadHeader {
            sender: self.inner.config.username.clone(),
            target,
            filename: filename.to_owned(),
            size,
            checked,
            compressed,
        };
        // A checked upload whose file connection breaks is sent again once the connection
        // is back: the server kept what arrived, so it continues from there.
        let mut retries = 0;
        loop {
            let broke = match self.upload_once(&header, open().await?).await {
                Ok(()) => return Ok(size),
                // The connection broke while sending (the server kept what arrived), or the
                // server said it kept it. A verdict that never came is not retried: the file
                // may be saved already, and a second copy would go out.
                Err(Error::Io { .. }) => true,
                Err(Error::Refused(reason)) if reason == KEPT => true,
                Err(e) => return Err(e),
            };
            if !(broke && header.checked && retries < UPLOAD_RETRIES && !self.is_closed()) {
                return Err(Error::Refused(format!(
                    "the upload of '{}' broke off with the file connection",
                    header.filename
                )));
            }
            retries += 1;
            let pause = Duration::from_millis(200) * 2u32.pow(retries);
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = self.inner.closed.cancelled() => return Err(Error::Closed),
            }
        }
    }

    /// Sends one upload and waits for the server's verdict (with the lab's server, which
    /// gives none, the last byte written is all we can know).
    async fn upload_once(&self, header: &UploadHeader, file: tokio::fs::File) -> Result<()> {
        let Some(rx) = self.upload(header, file).await? else {
            return Ok(());
        };
        let patience = self.inner.config.timeout.max(VERDICT_WAIT);
        let verdict = tokio::select! {
            verdict = tokio::time::timeout(patience, rx) => verdict,
            _ = self.inner.closed.cancelled() => return Err(Error::Closed),
        };
        match verdict {
            Ok(Ok(Ok(_saved_as))) => Ok(()),
            Ok(Ok(Err(Unsaved::Refused(reason)))) => Err(Error::Refused(reason)),
            Ok(Ok(Err(Unsaved::Kept))) => Err(Error::Refused(KEPT.into())),
            Ok(Err(_)) => Err(Error::Closed),
            Err(_) => Err(Error::Timeout(
                "waiting for the server to confirm the upload",
            )),
        }
    }

    /// Writes one upload (header and body) on the file connection. With a server that
    /// speaks the extensions, returns where its verdict will arrive: the waiter is queued
    /// before the header goes out, so it can never miss a verdict that comes fast.
    async fn upload(
        &self,
        header: &UploadHeader,
        file: tokio::fs::File,
    ) -> Result<Option<oneshot::Receiver<Verdict>>> {
        let size = header.size;
        let mut slot = self.inner.file.lock().await;
        // From the header on, anything short of the whole body (an error, a shrinking file,
        // `close()`, or this future being dropped: Ctrl-C, asyncio cancellation) leaves the
        // file connection out of step: the guard then drops it, and the reader task
        // re-opens a fresh one.
        let mut guard = OutOfStep(Some(&mut *slot));
        let Some(Some(wr)) = guard.0.as_mut().map(|slot| slot.as_mut()) else {
            return Err(Error::Closed);
        };
        let verdict = self.extended().then(|| {
            let (tx, rx) = oneshot::channel();
            let (go, ready) = oneshot::channel();
            let mut waiters = self.inner.waiters();
            waiters.uploads.push_back(tx);
            waiters.ready = Some(go);
            (rx, ready)
        });
        // Until the whole header is out, no verdict will come for it: if the write fails,
        // or this future is dropped (Ctrl-C, asyncio), un-queue ours (the last one: the
        // file lock keeps other uploads out).
        let unqueue = Unqueue(verdict.is_some().then_some(&*self.inner));
        let wire = header.to_wire();
        let sent = tokio::select! {
            sent = send_all(wr, wire.as_bytes()) => sent,
            _ = self.inner.closed.cancelled() => Err(std::io::ErrorKind::Interrupted.into()),
        };
        if let Err(e) = sent {
            return Err(Error::io("sending file", e));
        }
        unqueue.disarm();
        // A checked upload (our server) sends its body only once the server takes it: a
        // refusal costs no bytes and leaves the connection in step.
        let verdict = match verdict {
            None => None,
            Some((mut verdict, ready)) => {
                let go = tokio::select! {
                    go = ready => go.map_err(|_| Error::Closed),
                    refused = &mut verdict => {
                        // Only a refusal of this header leaves the connection in step; any
                        // other verdict here is out of order (a stale one from a broken
                        // connection): the guard drops this connection and a fresh one opens.
                        return Err(match refused {
                            Ok(Err(Unsaved::Refused(reason))) => {
                                guard.disarm();
                                Error::Refused(reason)
                            }
                            Ok(_) => Error::Protocol("a verdict before the body".into()),
                            Err(_) => Error::Closed,
                        });
                    }
                    _ = tokio::time::sleep(self.inner.config.timeout.max(VERDICT_WAIT)) => {
                        Err(Error::Timeout("waiting for the server to take the upload"))
                    }
                    _ = self.inner.closed.cancelled() => Err(Error::Closed),
                };
                let (offset, prefix) = go?;
                if offset > size {
                    return Err(Error::Protocol(format!(
                        "the server asked for the body from byte {offset} of {size}"
                    )));
                }
                Some((verdict, offset, prefix))
            }
        };
        let mut file = file;
        let mut hasher = blake3::Hasher::new();
        let mut start = 0;
        let verdict = match verdict {
            None => None,
            Some((verdict, 0, _)) => Some(verdict),
            Some((verdict, offset, prefix)) => {
                // The server kept the first `offset` bytes of this upload: if they are our
                // file's, only the rest goes.
                let kept = async {
                    let mut head = (&mut file).take(offset);
                    let mut buf = vec![0u8; BODY_CHUNK];
                    let mut read = 0u64;
                    loop {
                        let n = head.read(&mut buf).await?;
                        if n == 0 {
                            break;
                        }
                        hasher.update(&buf[..n]);
                        read += n as u64;
                    }
                    std::io::Result::Ok(read == offset)
                };
                let whole = kept.await.map_err(io("reading file"))?;
                let same = whole && prefix.as_deref() == Some(hasher.finalize().to_hex().as_str());
                if same {
                    start = offset;
                } else {
                    use tokio::io::AsyncSeekExt;
                    file.seek(std::io::SeekFrom::Start(0))
                        .await
                        .map_err(io("reading file"))?;
                    hasher = blake3::Hasher::new();
                }
                send_all(wr, format!("from {start}\n").as_bytes())
                    .await
                    .map_err(|e| Error::io("sending file", e))?;
                Some(verdict)
            }
        };
        let peer = header.target.to_string();
        let events = match self.inner.config.progress {
            true => self.inner.events.upgrade(),
            false => None,
        };
        let body = async {
            let mut meter = events
                .as_ref()
                .map(|tx| Meter::new(Direction::Upload, &peer, &header.filename, size, tx));
            let mut body = BufReader::with_capacity(BODY_CHUNK, file.take(size - start));
            let mut deflate = match header.compressed {
                true => Some((crate::compress::Deflate::new()?, Vec::new())),
                false => None,
            };
            let mut sent = start;
            loop {
                let chunk = body.fill_buf().await?;
                if chunk.is_empty() {
                    break;
                }
                let n = chunk.len();
                if header.checked {
                    hasher.update(chunk);
                }
                match deflate.as_mut() {
                    Some((deflate, packed)) => {
                        packed.clear();
                        deflate.push(chunk, packed)?;
                        wr.write_all(packed).await?;
                    }
                    None => wr.write_all(chunk).await?,
                }
                body.consume(n);
                sent += n as u64;
                if let Some(meter) = meter.as_mut() {
                    meter.update(sent);
                }
            }
            if let Some((mut deflate, mut packed)) = deflate {
                packed.clear();
                deflate.finish(&mut packed)?;
                wr.write_all(&packed).await?;
            }
            if header.checked && sent == size {
                let trailer = Trailer::Hash(hasher.finalize().to_hex().to_string());
                wr.write_all(trailer.to_wire().as_bytes()).await?;
            }
            wr.flush().await?;
            std::io::Result::Ok(sent - start)
        };
        let sent = tokio::select! {
            sent = body => sent.map_err(|e| Error::io("sending file", e)),
            _ = self.inner.closed.cancelled() => Err(Error::Closed),
        };
        match sent {
            Ok(n) if n == size - start => {
                guard.disarm();
                Ok(verdict)
            }
            Ok(n) => Err(Error::Protocol(format!(
                "the file shrank while sending: {} of {size} bytes",
                start + n
            ))),
            Err(e) => Err(e),
        }
    }

    /// Closes both connections; the event stream ends after a final `Disconnected`.
    pub async fn close(&self) {
        self.inner.closed.cancel();
        let _ = self.inner.chat.lock().await.shutdown().await;
        if let Some(mut wr) = self.inner.file.lock().await.take() {
            let _ = wr.shutdown().await;
        }
    }
}

/// Takes the last upload waiter back off the queue, unless disarmed (see `upload`).
struct Unqueue<'a>(Option<&'a Inner>);

impl Unqueue<'_> {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for Unqueue<'_> {
    fn drop(&mut self) {
        if let Some(inner) = self.0.take() {
            let mut waiters = inner.waiters();
            waiters.uploads.pop_back();
            waiters.ready = None;
        }
    }
}

/// The file connection's write half, dropped unless disarmed (see `send_file`).
struct OutOfStep<'a>(Option<&'a mut Option<ConnWrite>>);

impl OutOfStep<'_> {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for OutOfStep<'_> {
    fn drop(&mut self) {
        if let Some(slot) = self.0.take() {
            slot.take(); // dropping the write half shuts it down
        }
    }
}

impl Waiters {
    /// Notes what the command about to be written will be answered with.
    fn expect(&mut self, expect: Expect) {
        match expect {
            Expect::Nothing => {}
            Expect::Users(tx) => self.users.push_back(tx),
            Expect::Joined(group, tx) => self.joins.push_back((group, tx)),
            Expect::Hello(tx) => self.hello = Some(tx),
            Expect::Request(request) => self.requests.push_back(request),
        }
    }

    /// Hands a line to the oldest waiting request if it answers it; returns the line if
    /// it does not. An `ERROR:` line while a request waits is taken as its answer (the
    /// server answers commands in order; its own notices about files can come between,
    /// and would be taken too: a known limit of this plain-text protocol).
    fn route_request(&mut self, line: ServerLine) -> Option<ServerLine> {
        let request = match self.requests.pop_front() {
            Some(request) => request,
            None => return Some(line),
        };
        match (request, line) {
            (Request::Register(tx), ServerLine::Registered { .. }) => {
                let _ = tx.send(Ok(()));
            }
            (Request::Passwd(tx), ServerLine::PasswordChanged) => {
                let _ = tx.send(Ok(()));
            }
            (Request::History(mut got, tx), ServerLine::History { at, from, text }) => {
                got.push(HistoryEntry {
                    at,
                    sender: from,
                    text,
                });
                self.requests.push_front(Request::History(got, tx));
            }
            (Request::History(got, tx), ServerLine::HistoryEnd { .. }) => {
                let _ = tx.send(Ok(got));
            }
            (Request::Files(mut got, tx), line @ ServerLine::FileEntry { .. }) => {
                got.push(line);
                self.requests.push_front(Request::Files(got, tx));
            }
            (Request::Files(got, tx), ServerLine::FilesEnd { .. }) => {
                let _ = tx.send(Ok(got));
            }
            (Request::Files(_, tx), ServerLine::Error { reason }) => {
                let _ = tx.send(Err(reason));
            }
            (Request::Register(tx) | Request::Passwd(tx), ServerLine::Error { reason }) => {
                let _ = tx.send(Err(reason));
            }
            (Request::History(_, tx), ServerLine::Error { reason }) => {
                let _ = tx.send(Err(reason));
            }
            (Request::History(_, tx), ServerLine::NotInGroup { group }) => {
                let _ = tx.send(Err(format!("You are not in group '{group}'")));
            }
            (request, line) => {
                self.requests.push_front(request);
                return Some(line);
            }
        }
        None
    }

    /// Hands a reply to the caller waiting for it; returns the line if nobody waits.
    fn route(&mut self, line: ServerLine) -> Option<ServerLine> {
        match line {
            ServerLine::Users { users } => match self.users.pop_front() {
                Some(Some(tx)) => {
                    let _ = tx.send(users);
                    None
                }
                _ => Some(ServerLine::Users { users }),
            },
            ServerLine::Joined { group } => {
                let i = self.joins.iter().position(|(g, _)| *g == group);
                match i.and_then(|i| self.joins.remove(i)) {
                    Some((_, Some(tx))) => {
                        let _ = tx.send(());
                        None
                    }
                    _ => Some(ServerLine::Joined { group }),
                }
            }
            ServerLine::Hello => {
                if let Some(tx) = self.hello.take() {
                    let _ = tx.send(true);
                }
                None
            }
            ServerLine::UnknownCommand if self.hello.is_some() => {
                if let Some(tx) = self.hello.take() {
                    let _ = tx.send(false);
                }
                None
            }
            // Verdicts are the engine's own business: one per upload, never an event.
            ServerLine::UploadOk { saved_as } => {
                if let Some(tx) = self.uploads.pop_front() {
                    let _ = tx.send(Ok(saved_as));
                }
                None
            }
            ServerLine::UploadFailed { reason } => {
                if let Some(tx) = self.uploads.pop_front() {
                    let _ = tx.send(Err(Unsaved::Refused(reason)));
                }
                None
            }
            ServerLine::UploadKept { .. } => {
                if let Some(tx) = self.uploads.pop_front() {
                    let _ = tx.send(Err(Unsaved::Kept));
                }
                None
            }
            ServerLine::UploadReady { offset, prefix } => {
                if let Some(tx) = self.ready.take() {
                    let _ = tx.send((offset, prefix));
                }
                None
            }
            line @ (ServerLine::Registered { .. }
            | ServerLine::PasswordChanged
            | ServerLine::History { .. }
            | ServerLine::HistoryEnd { .. }
            | ServerLine::FileEntry { .. }
            | ServerLine::FilesEnd { .. }
            | ServerLine::Error { .. }
            | ServerLine::NotInGroup { .. }) => self.route_request(line),
            line => Some(line),
        }
    }
}

impl Inner {
    fn waiters(&self) -> std::sync::MutexGuard<'_, Waiters> {
        self.waiters.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Reads the chat connection until it ends; then lets the file side report the transfer
/// it was in (`FileFailed`) before the last event, `Disconnected`.
async fn read_chat(
    inner: Arc<Inner>,
    mut reader: LineReader,
    tx: mpsc::Sender<Event>,
    files: tokio::task::JoinHandle<()>,
) {
    while let Ok(line) = reader.next_line(&inner.closed).await {
        let line = ServerLine::parse(&String::from_utf8_lossy(&line));
        if let ServerLine::InboxSent { upto } = line {
            // Every queued message before it is in the events already: the server may
            // forget them.
            let receipt = format_inbox_received(upto);
            let _ = send_all(&mut *inner.chat.lock().await, receipt.as_bytes()).await;
            continue;
        }
        let event = {
            let mut waiters = inner.waiters();
            match (line, waiters.queued_at.take()) {
                (ServerLine::QueuedAt { at }, _) => {
                    waiters.queued_at = Some(at);
                    None
                }
                (line, Some(at)) => Some(Event::Queued { at, line }),
                (ServerLine::ResumeFailed { id, reason }, None) => {
                    drop(waiters);
                    inner.take_kept(id).map(|k| Event::FileFailed {
                        reason: format!(
                            "transfer of '{}' from {} broke off and cannot resume: {reason}",
                            k.filename, k.sender
                        ),
                    })
                }
                (line, None) => waiters.route(line).map(Event::Line),
            }
        };
        if let Some(event) = event {
            let _ = tx.send(event).await;
        }
    }
    inner.closed.cancel();
    *inner.waiters() = Waiters::default();
    let _ = tokio::time::timeout(FILES_REPORT_GRACE, files).await;
    let _ = tx.send(Event::Disconnected).await;
}

/// Receives forwarded files for as long as the client lives, re-opening the file connection
/// if the server closes it (as it does when an upload to us breaks off).
async fn read_files(inner: Arc<Inner>, mut reader: LineReader, tx: mpsc::Sender<Event>) {
    'connection: loop {
        while receive_one(&inner, &mut reader, &tx).await.is_ok() {}
        inner.file.lock().await.take();
        for attempt in 1..=FILE_RECONNECT_TRIES {
            tokio::select! {
                _ = inner.closed.cancelled() => return give_up_kept(&inner, &tx).await,
                _ = tokio::time::sleep(Duration::from_millis(100) * attempt) => {}
            }
            if attempt == 1 {
                // Verdicts for uploads the server did read were sent before it closed the
                // connection, and have had this pause to arrive; an upload still waiting
                // now was never read and will never have one.
                let mut waiters = inner.waiters();
                waiters.uploads.clear();
                waiters.ready = None;
            }
            if let Ok((rd, mut wr)) =
                open_file_connection(&inner.config, inner.proof.as_deref()).await
            {
                // Ask for the rest of what broke off with the old connection.
                let wanted: String = inner
                    .kept()
                    .iter()
                    .map(|(id, k)| format!("resume {id} {}\n", k.partial.written()))
                    .collect();
                if !wanted.is_empty() && send_all(&mut wr, wanted.as_bytes()).await.is_err() {
                    continue;
                }
                *inner.file.lock().await = Some(wr);
                reader = rd;
                continue 'connection;
            }
        }
        give_up_kept(&inner, &tx).await;
        let reason = "the file connection was lost and could not be re-opened".to_owned();
        let _ = tx.send(Event::FileFailed { reason }).await;
        return;
    }
}

/// The file connection is gone for good: every download kept to resume has failed.
async fn give_up_kept(inner: &Inner, tx: &mpsc::Sender<Event>) {
    let kept = std::mem::take(&mut *inner.kept());
    for (_, k) in kept {
        let reason = format!("transfer of '{}' from {} broke off", k.filename, k.sender);
        drop(k.partial);
        let _ = tx.send(Event::FileFailed { reason }).await;
    }
}

/// Reads past what follows a forward's header that is not being saved: the body, and the
/// trailer of a checked forward.
async fn skip_forward(
    reader: &mut LineReader,
    body: Skip,
    checked: bool,
    closed: &CancellationToken,
) -> Step {
    match body {
        Skip::Bytes(n) => skip(reader, n, closed).await?,
        Skip::Frame => skip_frame(reader, closed).await?,
    }
    if checked {
        reader.next_line_within(closed, BODY_STALL).await?;
    }
    Ok(())
}

/// How long a file body from the server may pause before the file connection counts as
/// dead.
const BODY_STALL: Duration = Duration::from_secs(300);

/// Reports a file we cannot save to the server (when it speaks the extensions), so its
/// uploader hears of it instead of waiting for an `[ACK]`.
async fn not_saved(inner: &Inner, sender: &str, filename: &str, e: &std::io::Error) {
    if inner.extended.load(Relaxed) {
        let line = format_file_failed(sender, filename, &e.to_string());
        let _ = send_all(&mut *inner.chat.lock().await, line.as_bytes()).await;
    }
}

/// A body to read past: so many bytes, or a compressed one (its zstd frame).
enum Skip {
    Bytes(u64),
    Frame,
}

impl Skip {
    /// The body of `header`, past its first `at` bytes (`unread` of them, when plain).
    fn rest(compressed: bool, unread: u64) -> Self {
        match compressed {
            true => Skip::Frame,
            false => Skip::Bytes(unread),
        }
    }
}

/// Reads past a compressed body (decoding it, since only the frame says where it ends).
async fn skip_frame(reader: &mut LineReader, closed: &CancellationToken) -> Step {
    let broken = |e: std::io::Error| Stop::Ended(Ended::Io(e));
    let mut inflate = crate::compress::Inflate::new().map_err(broken)?;
    let mut scratch = Vec::with_capacity(BODY_CHUNK);
    loop {
        let chunk = tokio::select! {
            _ = closed.cancelled() => return Err(Stop::Ended(Ended::Closed)),
            chunk = tokio::time::timeout(BODY_STALL, reader.read_raw(BODY_CHUNK, BODY_CHUNK)) => chunk,
        };
        let chunk = match chunk {
            Ok(Ok(bytes)) if !bytes.is_empty() => bytes,
            Ok(Ok(_)) => return Err(Stop::Ended(Ended::Closed)),
            Ok(Err(e)) => return Err(broken(e)),
            Err(_) => return Err(Stop::Ended(Ended::Stalled(BODY_STALL))),
        };
        let mut input = &chunk[..];
        loop {
            scratch.clear();
            let pulled = inflate.pull(input, &mut scratch).map_err(broken)?;
            input = &input[pulled.read..];
            if pulled.ended {
                reader.unread(input);
                return Ok(());
            }
            if input.is_empty() && scratch.len() < scratch.capacity() {
                break;
            }
        }
    }
}

/// Reads past `n` body bytes of a file that is not being saved.
async fn skip(reader: &mut LineReader, n: u64, closed: &CancellationToken) -> Step {
    reader
        .skip(n, BODY_CHUNK, closed, BODY_STALL)
        .await
        .map_err(|e| Stop::Ended(Ended::Io(e)))
}

/// Receives one forwarded file. `Err` only once the file connection is gone (a file that
/// could not be saved is reported, its body skipped, and the connection stays in step).
async fn receive_one(inner: &Inner, reader: &mut LineReader, tx: &mpsc::Sender<Event>) -> Step {
    let closed = &inner.closed;
    let line = reader.next_line(closed).await?;
    if line.is_empty() {
        return Ok(());
    }
    let fail = |reason: String| async move {
        let _ = tx.send(Event::FileFailed { reason }).await;
    };
    let header = match ForwardHeader::parse(&line) {
        Ok(header) => header,
        Err(e) => {
            let shown: String = String::from_utf8_lossy(&line).chars().take(200).collect();
            fail(format!(
                "ignored a file header from the server ({shown:?}): {e}"
            ))
            .await;
            // Skip its body (and trailer) when the header says how long it is, to stay in
            // step.
            let checked = ForwardHeader::declares_trailer(&line);
            return match ForwardHeader::declared_size(&line) {
                Some(size) => skip_forward(reader, Skip::Bytes(size), checked, closed).await,
                // A frame ends itself, whatever the header says.
                None if ForwardHeader::declares_compressed(&line) => {
                    skip_forward(reader, Skip::Frame, checked, closed).await
                }
                None => Ok(()),
            };
        }
    };
    let body = Skip::rest(header.compressed, header.body());
    let ForwardHeader {
        sender,
        filename,
        size,
        checked,
        compressed,
        id,
        at,
    } = header;
    let saved = saved_name(&sender, &filename);
    let dir = &inner.config.download_dir;
    let tmp = dir.join(format!("{saved}{TMP_SUFFIX}"));
    let cannot_save = |e: std::io::Error| format!("cannot save '{filename}' from {sender}: {e}");

    // A resumed forward (`at` past 0) continues a part we kept; a fresh one starts a file.
    let same = |k: &KeptDownload| k.sender == sender && k.filename == filename && k.size == size;
    let started = match (at, id.and_then(|id| inner.take_kept(id))) {
        (0, kept) => {
            drop(kept); // sent again from the start: the old part goes
                        // So does any kept part under the same temporary name (it would be overwritten).
            inner.kept().retain(|(_, k)| k.partial.path() != tmp);
            match saved.len() + TMP_SUFFIX.len() > MAX_FILENAME_BYTES {
                true => Err(std::io::Error::other("file name too long")),
                false => Partial::create(tmp, false).await,
            }
            .map(|partial| (partial, blake3::Hasher::new()))
        }
        (at, Some(kept)) if same(&kept) && kept.partial.written() == at => {
            Ok((kept.partial, kept.hasher))
        }
        (_, None) => {
            // The rest of a part we no longer hold (a fresh copy came first): not ours to
            // save, and nothing failed.
            return skip_forward(reader, body, checked, closed).await;
        }
        (at, Some(_)) => Err(std::io::Error::other(format!(
            "the server resumed it at byte {at}, which does not continue this client's part"
        ))),
    };
    let (mut partial, mut hasher) = match started {
        Ok(started) => started,
        Err(e) => {
            not_saved(inner, &sender, &filename, &e).await;
            fail(cannot_save(e)).await;
            return skip_forward(reader, body, checked, closed).await;
        }
    };
    let mut meter = inner
        .config
        .progress
        .then(|| Meter::new(Direction::Download, &sender, &filename, size, tx));
    let rest = Body {
        from: at,
        size,
        stall: BODY_STALL,
        compressed,
    };
    let received = receive_rest(reader, &mut partial, &mut hasher, rest, closed, |n| {
        if let Some(meter) = meter.as_mut() {
            meter.update(n);
        }
    })
    .await;
    match received {
        Ok(()) => {}
        Err(BodyError::Write(e, unread)) => {
            drop(partial);
            not_saved(inner, &sender, &filename, &e).await;
            fail(cannot_save(e)).await;
            if compressed {
                // Mid-frame, only the decoder knows where the body ends: close rather
                // than fall out of step (a fresh file connection opens).
                return Err(Stop::Ended(Ended::Closed));
            }
            return skip_forward(reader, Skip::Bytes(unread), checked, closed).await;
        }
        Err(BodyError::Read(end)) => {
            // A checked forward can resume once the connection is back: keep the part (on
            // disk, not in memory).
            let resumable = checked && !closed.is_cancelled() && partial.park().await.is_ok();
            if let (true, Some(id)) = (resumable, id) {
                let evicted = {
                    let mut kept = inner.kept();
                    (kept.len() >= MAX_KEPT_DOWNLOADS).then(|| kept.remove(0).1)
                };
                if let Some(old) = evicted {
                    let (who, what) = (old.sender.clone(), old.filename.clone());
                    drop(old);
                    fail(format!(
                        "transfer of '{what}' from {who} broke off (too many to resume)"
                    ))
                    .await;
                }
                let mut kept = inner.kept();
                let part = KeptDownload {
                    partial,
                    hasher,
                    sender,
                    filename,
                    size,
                };
                kept.push((id, part));
                return Err(Stop::Ended(end));
            }
            drop(partial);
            let got = match &end {
                Ended::BrokeOff { got, .. } => format!(" after {got} of {size} bytes"),
                _ => String::new(),
            };
            fail(format!(
                "transfer of '{filename}' from {sender} broke off{got}"
            ))
            .await;
            return Err(Stop::Ended(end));
        }
    };
    let hash = hasher.finalize();
    if checked {
        // The server's word on the bytes: their hash (checked here before the rename), or
        // why the file is not good after all.
        let trailer = match reader.next_line_within(closed, BODY_STALL).await {
            Ok(line) => Trailer::parse(&line),
            Err(end) => {
                drop(partial);
                fail(format!(
                    "'{filename}' from {sender} came without its BLAKE3 check"
                ))
                .await;
                return Err(Stop::Ended(end));
            }
        };
        let why = match trailer {
            Some(Trailer::Hash(sent)) if sent == hash.to_hex().as_str() => None,
            Some(Trailer::Hash(sent)) => {
                let why = format!(
                    "'{filename}' from {sender} arrived corrupted (BLAKE3 {}, the server's is \
                     {sent}); it was not saved",
                    hash.to_hex()
                );
                // The uploader hears of it (the server could not have known).
                let e = std::io::Error::other("it arrived corrupted");
                not_saved(inner, &sender, &filename, &e).await;
                Some(why)
            }
            Some(Trailer::Failed(why)) => Some(why),
            None => {
                drop(partial);
                let e = std::io::Error::other("the file's BLAKE3 trailer is missing or garbled");
                return Err(Stop::Ended(Ended::Io(e)));
            }
        };
        if let Some(why) = why {
            drop(partial);
            fail(why).await;
            return Ok(());
        }
    }
    let path = match partial.finish_unique(dir, &saved).await {
        Ok(name) => dir.join(name),
        Err(e) => {
            not_saved(inner, &sender, &filename, &e).await;
            fail(cannot_save(e)).await;
            return Ok(());
        }
    };
    let ack = format_ack(&sender, &filename);
    let _ = tx
        .send(Event::FileReceived {
            sender,
            filename,
            path,
            size,
        })
        .await;
    let mut chat = inner.chat.lock().await;
    let _ = send_all(&mut chat, ack.as_bytes()).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_reply_goes_to_its_own_command_in_order() {
        let mut waiters = Waiters::default();
        let (mine, mut mine_rx) = oneshot::channel();
        waiters.expect(Expect::Users(None)); // a raw `list`: its reply is an event
        waiters.expect(Expect::Users(Some(mine)));
        waiters.expect(Expect::Nothing);
        let first = ServerLine::Users {
            users: vec!["a".into()],
        };
        assert_eq!(waiters.route(first.clone()), Some(first));
        assert!(mine_rx.try_recv().is_err(), "the first reply was not ours");
        let second = ServerLine::Users {
            users: vec!["b".into()],
        };
        assert_eq!(waiters.route(second), None);
        assert_eq!(mine_rx.try_recv().expect("ours"), ["b"]);
        let third = ServerLine::Users { users: vec![] };
        assert_eq!(waiters.route(third.clone()), Some(third), "nobody waits");
    }

    #[test]
    fn a_join_confirmation_goes_to_the_caller_of_that_group() {
        let mut waiters = Waiters::default();
        let (devs, mut devs_rx) = oneshot::channel();
        waiters.expect(Expect::Joined("devs".into(), Some(devs)));
        waiters.expect(Expect::Joined("ops".into(), None));
        let ops = ServerLine::Joined {
            group: "ops".into(),
        };
        assert_eq!(waiters.route(ops.clone()), Some(ops));
        assert!(devs_rx.try_recv().is_err());
        let joined = ServerLine::Joined {
            group: "devs".into(),
        };
        assert_eq!(waiters.route(joined), None);
        assert!(devs_rx.try_recv().is_ok());
        let other = ServerLine::Broadcast {
            from: "x".into(),
            text: "y".into(),
        };
        assert_eq!(waiters.route(other.clone()), Some(other));
    }
}
