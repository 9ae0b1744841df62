//! relaybench: the load generator behind `docs/BENCHMARKS.md`.
//!
//! It speaks relaychat's wire protocol over real sockets, verifies that every message and
//! byte arrives exactly once, and prints one JSON object per run on standard output.
//! `bench/run.py` starts the server and this generator pinned to separate CPUs, repeats each
//! scenario and writes the report. Subcommands:
//!
//! * `relay --to PORT` — a trivial TCP relay (the machine's own limit), prints its port.
//! * `relay-limit --port P --bytes N` — pushes N bytes through `relay` into a sink.
//! * `file --bytes N --receivers R` — one upload to one user (R=1) or a group of R.
//! * `private --pairs P --messages M --window W` — private messages, W in flight per sender.
//! * `broadcast --users N --senders S --messages M --window W` — broadcast fan-out.
//! * `connect --users N --sources K` — N idle users (chat + file each) from K addresses;
//!   prints when connected and holds them until standard input closes.
//! * `handshakes --chat P --connections N --window W --tls-pin FP` — N TLS handshakes on
//!   chat port P, W at a time: each opens TCP, completes a full TLS handshake (the client
//!   has checked the server's Finished), sends close_notify and reads until the server's
//!   own; prints the rate and the handshake latency (TCP connect to TLS established).
//!
//! * `codec --bytes N` — what a file's bytes cost one core: BLAKE3, and zstd (the engine's
//!   own encoder and decoder) on text and on random bytes; MB/s each, and the ratios.
//!
//! `--irc` makes `private` and `broadcast` speak IRC to an IRC server on `--chat` (ngIRCd and
//! InspIRCd in `bench/run.py --peers`): each user registers with `NICK <name>` and
//! `USER <name> 0 * :<name>` and is in once the server ends its MOTD (376) or says it has none
//! (422); a private message is `PRIVMSG r<i> :<seq> <t_ns>`; for a broadcast every user first
//! joins `#bench` (and has its NAMES list, 366) and senders send `PRIVMSG #bench :<seq> <t_ns>`,
//! which an IRC server does not echo to its sender, as relaychat's broadcast does not. PINGs
//! are answered at any time; error replies (numerics from 400 up, but 422) and `ERROR` fail
//! the run. Windows, verification (each message exactly once, in order per sender) and
//! latencies are the same as for relaychat, and so is the JSON printed.
//!
//! `--server-pid PID` adds to `private` and `broadcast`'s JSON the CPU time the server used
//! from the start signal to the last message verified (`server_cpu_ticks`, from
//! `/proc/<pid>/stat`).
//!
//! `--logins-at-once N`: how many users log in at the same time (`private`, `broadcast`:
//! one by default, one after the other; `connect`: 256). InspIRCd needs many: it ends
//! registrations only in its once-a-second timer, a second per user one at a time.
//!
//! `--tls-pin FP` (the server certificate's SHA-256 fingerprint) makes every chat and file
//! connection to the server TLS, trusting exactly that certificate; without it they are
//! plain TCP. The trivial relay (`relay`, `relay-limit`) is always plain TCP.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use relaychat::tls::{TlsClientOptions, TlsStream};
use tokio::io::{
    AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, ReadBuf,
    ReadHalf, WriteHalf,
};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::Semaphore;

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

#[derive(Debug, Clone)]
struct Args {
    cmd: String,
    chat: u16,
    file: u16,
    port: u16,
    to: u16,
    bytes: u64,
    receivers: usize,
    pairs: usize,
    messages: u64,
    window: usize,
    users: usize,
    senders: usize,
    sources: u8,
    /// Answers a server that asks for a password (registered names).
    password: Option<String>,
    /// `private`: each sender pauses this long between writes (an offered load, instead
    /// of as fast as the window allows).
    interval_ms: u64,
    /// `--tls-pin`: every chat and file connection is TLS, trusting this certificate only.
    tls: Option<TlsClientOptions>,
    /// `handshakes`: how many.
    connections: usize,
    /// `--irc`: `private` and `broadcast` speak IRC to an IRC server on `--chat`.
    proto: Proto,
    /// `--server-pid`: `private` and `broadcast` report the CPU time this process (the server)
    /// used while the messages went through.
    server_pid: Option<u32>,
    /// `--logins-at-once`: users logging in at the same time (by default one for `private`
    /// and `broadcast`, 256 for `connect`).
    logins_at_once: Option<usize>,
}

fn parse_args() -> Result<Args, lexopt::Error> {
    use lexopt::prelude::*;
    let mut a = Args {
        cmd: String::new(),
        chat: 2003,
        file: 2007,
        port: 0,
        to: 0,
        bytes: 1 << 30,
        receivers: 1,
        pairs: 50,
        messages: 10_000,
        window: 1,
        users: 50,
        senders: 5,
        sources: 1,
        password: None,
        interval_ms: 0,
        tls: None,
        connections: 1000,
        proto: Proto::Relaychat,
        logins_at_once: None,
        server_pid: None,
    };
    let mut p = lexopt::Parser::from_env();
    while let Some(arg) = p.next()? {
        match arg {
            Value(cmd) if a.cmd.is_empty() => a.cmd = cmd.string()?,
            Long("chat") => a.chat = p.value()?.parse()?,
            Long("file") => a.file = p.value()?.parse()?,
            Long("port") => a.port = p.value()?.parse()?,
            Long("to") => a.to = p.value()?.parse()?,
            Long("bytes") => a.bytes = p.value()?.parse()?,
            Long("receivers") => a.receivers = p.value()?.parse()?,
            Long("pairs") => a.pairs = p.value()?.parse()?,
            Long("messages") => a.messages = p.value()?.parse()?,
            Long("window") => a.window = p.value()?.parse()?,
            Long("users") => a.users = p.value()?.parse()?,
            Long("senders") => a.senders = p.value()?.parse()?,
            Long("sources") => a.sources = p.value()?.parse()?,
            Long("password") => a.password = Some(p.value()?.string()?),
            Long("interval-ms") => a.interval_ms = p.value()?.parse()?,
            Long("tls-pin") => {
                a.tls = Some(TlsClientOptions {
                    pin: Some(p.value()?.string()?),
                    ..Default::default()
                })
            }
            Long("connections") => a.connections = p.value()?.parse()?,
            Long("irc") => a.proto = Proto::Irc,
            Long("logins-at-once") => a.logins_at_once = Some(p.value()?.parse()?),
            Long("server-pid") => a.server_pid = Some(p.value()?.parse()?),
            _ => return Err(arg.unexpected()),
        }
    }
    Ok(a)
}

fn main() -> Res<()> {
    let args = parse_args()?;
    if args.proto == Proto::Irc {
        if !matches!(args.cmd.as_str(), "private" | "broadcast") {
            return Err("--irc is for private and broadcast only".into());
        }
        if args.password.is_some() {
            return Err("--irc logs in without a password".into());
        }
    }
    relaychat::server::raise_open_file_limit();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match args.cmd.as_str() {
            "relay" => relay(&args).await,
            "relay-limit" => relay_limit(&args).await,
            "file" => file(&args).await,
            "private" => private(&args).await,
            "broadcast" => broadcast(&args).await,
            "connect" => connect(&args).await,
            "handshakes" => handshakes(&args).await,
            "codec" => codec(&args),
            other => Err(format!("unknown scenario {other:?}").into()),
        }
    })
}

/// Source address number `i` of `k`: 127.0.0.1, 127.0.0.2, ...
fn source(i: usize, k: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(
        127,
        0,
        0,
        1 + (i % usize::from(k.max(1))) as u8,
    ))
}

async fn dial(port: u16, from: IpAddr) -> Res<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from, 0))?;
    let stream = socket
        .connect(SocketAddr::from(([127, 0, 0, 1], port)))
        .await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// A connection's read half: plain TCP (split without a lock, as before TLS) or TLS.
enum Rd {
    Tcp(OwnedReadHalf),
    Tls(ReadHalf<TlsStream>),
}

/// A connection's write half. Every write sequence ends with a flush ([`Wr::send`]): TLS
/// may keep the last record buffered when the socket was full (a no-op on plain TCP).
enum Wr {
    Tcp(OwnedWriteHalf),
    Tls(WriteHalf<TlsStream>),
}

impl AsyncRead for Rd {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Rd::Tcp(r) => Pin::new(r).poll_read(cx, buf),
            Rd::Tls(r) => Pin::new(r).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Wr {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Wr::Tcp(w) => Pin::new(w).poll_write(cx, buf),
            Wr::Tls(w) => Pin::new(w).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Wr::Tcp(w) => Pin::new(w).poll_flush(cx),
            Wr::Tls(w) => Pin::new(w).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Wr::Tcp(w) => Pin::new(w).poll_shutdown(cx),
            Wr::Tls(w) => Pin::new(w).poll_shutdown(cx),
        }
    }
}

impl Wr {
    /// Writes `bytes` and flushes.
    async fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.write_all(bytes).await?;
        self.flush().await
    }
}

/// Connects to the server's `port` from `from`: TLS if `--tls-pin` was given.
async fn open(a: &Args, port: u16, from: IpAddr) -> Res<(Rd, Wr)> {
    let stream = dial(port, from).await?;
    Ok(match &a.tls {
        None => {
            let (rd, wr) = stream.into_split();
            (Rd::Tcp(rd), Wr::Tcp(wr))
        }
        Some(options) => {
            let tls = relaychat::tls::connect(stream, "127.0.0.1", port, options).await?;
            let (rd, wr) = tokio::io::split(tls);
            (Rd::Tls(rd), Wr::Tls(wr))
        }
    })
}

struct Conn {
    rd: BufReader<Rd>,
    wr: Wr,
}

/// Reads one line into `buf`, without its `\n` (nor the `\r` before it, which IRC servers
/// send).
async fn read_line(rd: &mut BufReader<Rd>, buf: &mut Vec<u8>) -> Res<()> {
    buf.clear();
    if rd.read_until(b'\n', buf).await? == 0 {
        return Err("connection closed".into());
    }
    buf.pop();
    if buf.last() == Some(&b'\r') {
        buf.pop();
    }
    Ok(())
}

impl Conn {
    async fn line(&mut self, buf: &mut Vec<u8>) -> Res<()> {
        read_line(&mut self.rd, buf).await
    }

    /// IRC: reads until a line whose command (or numeric) is one of `done`, answering PINGs
    /// on the way; an error reply (433 nickname in use, ...) or `ERROR` fails.
    async fn irc_until(&mut self, done: &[&str]) -> Res<()> {
        let mut buf = Vec::new();
        loop {
            self.line(&mut buf).await?;
            let pong = match Proto::Irc.parse(&buf)? {
                Incoming::Other { command } if done.contains(&command) => return Ok(()),
                Incoming::Other { .. } => continue,
                Incoming::Msg { from, .. } => {
                    return Err(format!("a message from {from} before {done:?}").into())
                }
                Incoming::Ping(token) => format!("PONG {token}\r\n"),
            };
            self.wr.send(pong.as_bytes()).await?;
        }
    }
}

/// Logs `name` in on the chat port (and on the file port if `files`); with `--irc`, registers
/// the IRC user `name` instead.
async fn login(a: &Args, name: &str, from: IpAddr, files: bool) -> Res<(Conn, Option<Conn>)> {
    if a.proto == Proto::Irc {
        return Ok((irc_login(a, name, from).await?, None));
    }
    let (rd, mut wr) = open(a, a.chat, from).await?;
    wr.send(format!("{name}\n").as_bytes()).await?;
    let mut chat = Conn {
        rd: BufReader::with_capacity(64 * 1024, rd),
        wr,
    };
    let mut buf = Vec::new();
    chat.line(&mut buf).await?;
    if let (true, Some(password)) = (
        buf == format!("Password for {name}:").as_bytes(),
        &a.password,
    ) {
        chat.wr.send(format!("{password}\n").as_bytes()).await?;
        chat.line(&mut buf).await?;
    }
    if buf != format!("Welcome, {name}!").as_bytes() {
        return Err(format!("{name}: {}", String::from_utf8_lossy(&buf)).into());
    }
    let file = match files {
        false => None,
        true => {
            let (rd, mut wr) = open(a, a.file, from).await?;
            wr.send(format!("{name}\n").as_bytes()).await?;
            let mut conn = Conn {
                rd: BufReader::with_capacity(256 * 1024, rd),
                wr,
            };
            conn.line(&mut buf).await?;
            if buf != b"FILE_SOCKET_CONNECTED" {
                return Err(format!("{name}: {}", String::from_utf8_lossy(&buf)).into());
            }
            Some(conn)
        }
    };
    Ok((chat, file))
}

/// Logs in every user of `users` (name, source address), `--logins-at-once` at a time (or
/// `at_once`), with its file connection if `files`; with `join`, each IRC user then joins the
/// broadcast channel (its JOIN done, its NAMES list ended). Many at a time do not suit every
/// server: relaychat limits password attempts per address, and a server that accepts from a
/// short listen backlog (ngIRCd's is 10) has the kernel reset connections that overflow it.
async fn login_all(
    a: &Args,
    users: Vec<(String, IpAddr)>,
    at_once: usize,
    files: bool,
    join: bool,
) -> Res<Vec<(Conn, Option<Conn>)>> {
    let at_once = Arc::new(Semaphore::new(a.logins_at_once.unwrap_or(at_once).max(1)));
    let mut pending = Vec::with_capacity(users.len());
    for (name, from) in users {
        let (a, at_once) = (a.clone(), at_once.clone());
        pending.push(tokio::spawn(async move {
            let _permit = at_once.acquire_owned().await?;
            let (mut chat, file) = login(&a, &name, from, files).await?;
            if join && a.proto == Proto::Irc {
                chat.wr
                    .send(format!("JOIN {CHANNEL}\r\n").as_bytes())
                    .await?;
                chat.irc_until(&["366"])
                    .await
                    .map_err(|e| format!("{name}: joining {CHANNEL}: {e}"))?;
            }
            Res::Ok((chat, file))
        }));
    }
    let mut conns = Vec::with_capacity(pending.len());
    for p in pending {
        conns.push(p.await??);
    }
    Ok(conns)
}

/// Registers the IRC user `name` (`NICK`, `USER`) and waits for the end of registration: the
/// end of the MOTD (376) or its absence (422).
async fn irc_login(a: &Args, name: &str, from: IpAddr) -> Res<Conn> {
    let (rd, mut wr) = open(a, a.chat, from).await?;
    wr.send(format!("NICK {name}\r\nUSER {name} 0 * :{name}\r\n").as_bytes())
        .await?;
    let mut conn = Conn {
        rd: BufReader::with_capacity(64 * 1024, rd),
        wr,
    };
    conn.irc_until(&["376", "422"])
        .await
        .map_err(|e| format!("{name}: {e}"))?;
    Ok(conn)
}

/// The channel every IRC user joins for `broadcast`.
const CHANNEL: &str = "#bench";

/// How `private` and `broadcast` talk to the server: relaychat's own lines, or IRC (`--irc`,
/// for the C servers `bench/run.py --peers` runs beside relaychat). Login, the lines sent and
/// the reading of lines received differ; windows, verification and latencies are shared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proto {
    Relaychat,
    Irc,
}

/// A line received, as far as a scenario cares.
enum Incoming<'a> {
    /// A message from user `from`, carrying `<seq> <t_ns>`.
    Msg { from: &'a str, seq: u64, t: u64 },
    /// IRC `PING <token>`, to answer with `PONG <token>` (at any time).
    Ping(&'a str),
    /// IRC: a line carrying no message (another user's JOIN, a MODE, a NOTICE, a reply
    /// below 400), with its command or numeric.
    Other { command: &'a str },
}

impl Proto {
    /// Appends a private message to `to`.
    fn private(self, out: &mut Vec<u8>, to: &str, seq: u64, t: u64) -> io::Result<()> {
        use std::io::Write;
        match self {
            Proto::Relaychat => writeln!(out, "msg {to} {seq} {t}"),
            Proto::Irc => write!(out, "PRIVMSG {to} :{seq} {t}\r\n"),
        }
    }

    /// Appends a message to everyone else: relaychat's broadcast, IRC's channel.
    fn broadcast(self, out: &mut Vec<u8>, seq: u64, t: u64) -> io::Result<()> {
        use std::io::Write;
        match self {
            Proto::Relaychat => writeln!(out, "broadcast {seq} {t}"),
            Proto::Irc => write!(out, "PRIVMSG {CHANNEL} :{seq} {t}\r\n"),
        }
    }

    /// What a received line (without its line end) is. A line that must not come is an
    /// error: for relaychat anything but a message (`[PRIVATE from u]: ...`, `[BROADCAST from
    /// u]: ...`), for IRC an error reply (a numeric from 400 up but 422, no MOTD) or `ERROR`.
    fn parse(self, line: &[u8]) -> Res<Incoming<'_>> {
        let text = std::str::from_utf8(line)?;
        let bad = || format!("unexpected line: {text}");
        match self {
            Proto::Relaychat => {
                let rest = text
                    .strip_prefix("[PRIVATE from ")
                    .or_else(|| text.strip_prefix("[BROADCAST from "))
                    .ok_or_else(bad)?;
                let (from, body) = rest.split_once("]: ").ok_or_else(bad)?;
                let (seq, t) = seq_and_time(body).ok_or_else(bad)?;
                Ok(Incoming::Msg { from, seq, t })
            }
            Proto::Irc => {
                // `:<prefix> <command> <params>`; from a server, only PING and ERROR come
                // without a prefix.
                let Some(rest) = text.strip_prefix(':') else {
                    return match text.strip_prefix("PING ") {
                        Some(token) => Ok(Incoming::Ping(token)),
                        None => Err(bad().into()),
                    };
                };
                let (prefix, rest) = rest.split_once(' ').ok_or_else(bad)?;
                let (command, params) = rest.split_once(' ').unwrap_or((rest, ""));
                if command == "PRIVMSG" {
                    // `:<nick>!<user>@<host> PRIVMSG <target> :<seq> <t_ns>`
                    let from = prefix.split_once('!').map_or(prefix, |(nick, _)| nick);
                    let (_target, body) = params.split_once(" :").ok_or_else(bad)?;
                    let (seq, t) = seq_and_time(body).ok_or_else(bad)?;
                    return Ok(Incoming::Msg { from, seq, t });
                }
                // Numerics from 400 up are errors, but for 422 (no MOTD), which can end a
                // registration.
                let numeric = command.len() == 3 && command.bytes().all(|b| b.is_ascii_digit());
                if numeric && command >= "400" && command != "422" {
                    return Err(bad().into());
                }
                Ok(Incoming::Other { command })
            }
        }
    }
}

/// A connection's writer, shared by the task that sends on it and the task that reads the
/// connection (which answers PINGs on it).
type Out = Arc<tokio::sync::Mutex<Wr>>;

fn shared(wr: Wr) -> Out {
    Arc::new(tokio::sync::Mutex::new(wr))
}

/// Answers `PING <token>` on `out` without making the reader wait: the writer may be held by a
/// sender blocked on a full socket, and the server may be waiting for this reader to read.
fn pong(out: &Out, token: &str) {
    let (out, line) = (out.clone(), format!("PONG {token}\r\n"));
    tokio::spawn(async move { out.lock().await.send(line.as_bytes()).await });
}

/// Reads until `count` messages have come, handing each to `take` (`from`, `seq`, `t_ns`),
/// which verifies it; answers PINGs on `out` and skips lines without a message.
async fn read_messages(
    proto: Proto,
    rd: &mut BufReader<Rd>,
    out: &Out,
    count: u64,
    mut take: impl FnMut(&str, u64, u64) -> Res<()>,
) -> Res<()> {
    let mut buf = Vec::new();
    let mut got = 0;
    while got < count {
        read_line(rd, &mut buf).await?;
        match proto.parse(&buf)? {
            Incoming::Msg { from, seq, t } => {
                take(from, seq, t)?;
                got += 1;
            }
            Incoming::Ping(token) => pong(out, token),
            Incoming::Other { .. } => {}
        }
    }
    Ok(())
}

/// IRC: reads a private-message sender's own connection while it sends, for the PINGs to
/// answer and the error replies (401 no such nick, ...) that would otherwise leave the run
/// waiting for messages that never come. Ends only with an error.
async fn watch(proto: Proto, mut rd: BufReader<Rd>, out: Out, name: String) -> Res<()> {
    read_messages(proto, &mut rd, &out, u64::MAX, |from, _, _| {
        Err(format!("a message from {from}").into())
    })
    .await
    .map_err(|e| format!("{name}: {e}"))?;
    Err(format!("{name}: stopped reading").into())
}

/// `--server-pid`: the server's CPU time (user + system, all its threads) from the start
/// signal to the last message verified, so without logins, JOINs and disconnections (the JOINs
/// of 1,000 IRC users alone cost ngIRCd seconds). In clock ticks, as `/proc/<pid>/stat` counts
/// them: `bench/run.py` divides by the system's ticks per second.
struct ServerCpu(Option<(u32, u64)>);

impl ServerCpu {
    fn ticks(pid: u32) -> Res<u64> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // After the command name in parentheses: state is field 3, utime 14, stime 15.
        let (_, rest) = stat.rsplit_once(')').ok_or("bad /proc stat")?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let (utime, stime) = (fields.get(11), fields.get(12));
        let (Some(utime), Some(stime)) = (utime, stime) else {
            return Err("bad /proc stat".into());
        };
        Ok(utime.parse::<u64>()? + stime.parse::<u64>()?)
    }

    fn start(pid: Option<u32>) -> Res<Self> {
        Ok(Self(match pid {
            Some(pid) => Some((pid, Self::ticks(pid)?)),
            None => None,
        }))
    }

    /// `, "server_cpu_ticks": N` for the JSON line (nothing without `--server-pid`).
    fn end(self) -> Res<String> {
        Ok(match self.0 {
            Some((pid, before)) => {
                format!(", \"server_cpu_ticks\": {}", Self::ticks(pid)? - before)
            }
            None => String::new(),
        })
    }
}

/// Latency samples in microseconds.
#[derive(Default)]
struct Latencies(Mutex<Vec<u32>>);

impl Latencies {
    fn add(&self, mut v: Vec<u32>) {
        self.0.lock().expect("lock").append(&mut v);
    }

    fn summary(&self) -> String {
        let mut v = std::mem::take(&mut *self.0.lock().expect("lock"));
        v.sort_unstable();
        let pick = |q: f64| {
            v.get(((v.len() as f64 - 1.0) * q).round() as usize)
                .copied()
                .unwrap_or(0)
        };
        format!(
            "\"p50_us\": {}, \"p99_us\": {}, \"max_us\": {}, \"samples\": {}",
            pick(0.5),
            pick(0.99),
            v.last().copied().unwrap_or(0),
            v.len()
        )
    }
}

/// Nanoseconds since `t0`, as carried in messages.
fn since(t0: Instant) -> u64 {
    t0.elapsed().as_nanos() as u64
}

/// Parses a message's text, `<seq> <t_ns>`.
fn seq_and_time(body: &str) -> Option<(u64, u64)> {
    let (seq, t) = body.split_once(' ')?;
    Some((seq.parse().ok()?, t.parse().ok()?))
}

async fn private(a: &Args) -> Res<()> {
    let t0 = Instant::now();
    let proto = a.proto;
    // Senders start together, once every user is logged in.
    let (go, ready) = tokio::sync::watch::channel(false);
    let lat = Arc::new(Latencies::default());
    let mut tasks = Vec::new();
    let mut watchers = tokio::task::JoinSet::new();
    let users = (0..a.pairs).flat_map(|i| {
        let from = source(i, a.sources);
        [(format!("r{i}"), from), (format!("s{i}"), from)]
    });
    let mut conns = login_all(a, users.collect(), 1, false, false)
        .await?
        .into_iter();
    for i in 0..a.pairs {
        let (Some((rx, _)), Some((tx, _))) = (conns.next(), conns.next()) else {
            return Err("a user missing".into());
        };
        let window = Arc::new(Semaphore::new(a.window.max(1)));
        let (m, lat, win) = (a.messages, lat.clone(), window.clone());
        let Conn { mut rd, wr } = rx;
        let rx_out = shared(wr);
        let receiver = tokio::spawn(async move {
            let sender = format!("s{i}");
            let mut samples = Vec::with_capacity(m as usize);
            let mut expect = 0;
            read_messages(proto, &mut rd, &rx_out, m, |from, seq, t| {
                if seq != expect || from != sender {
                    return Err(format!(
                        "got #{seq} from {from}, expected #{expect} from {sender}"
                    )
                    .into());
                }
                expect += 1;
                samples.push(((since(t0) - t) / 1000) as u32);
                win.add_permits(1);
                Ok(())
            })
            .await
            .map_err(|e| format!("r{i}: {e}"))?;
            lat.add(samples);
            Res::Ok((rd, rx_out))
        });
        let Conn { rd, wr } = tx;
        let out = shared(wr);
        if proto == Proto::Irc {
            watchers.spawn(watch(proto, rd, out.clone(), format!("s{i}")));
        }
        let mut ready = ready.clone();
        let interval = Duration::from_millis(a.interval_ms);
        let sender = tokio::spawn(async move {
            ready.wait_for(|go| *go).await?;
            let to = format!("r{i}");
            let mut buf = Vec::with_capacity(64 * 1024);
            let mut next = 0;
            let mut tick = tokio::time::interval(interval.max(Duration::from_micros(1)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while next < m {
                if !interval.is_zero() {
                    tick.tick().await;
                }
                let mut n = 1;
                window.acquire().await?.forget();
                while n < 512 && next + n < m && window.try_acquire().map(|p| p.forget()).is_ok() {
                    n += 1;
                }
                buf.clear();
                for seq in next..next + n {
                    proto.private(&mut buf, &to, seq, since(t0))?;
                }
                out.lock().await.send(&buf).await?;
                next += n;
            }
            Res::Ok(out)
        });
        tasks.push((sender, receiver));
    }
    let cpu = ServerCpu::start(a.server_pid)?;
    let start = Instant::now();
    go.send(true)?;
    let run = async {
        let mut keep = Vec::new();
        for (s, r) in tasks {
            keep.push((s.await??, r.await??));
        }
        Res::Ok(keep)
    };
    // A sender's connection that fails (IRC) fails the run instead of leaving it waiting.
    let _keep = tokio::select! {
        keep = run => keep?,
        Some(ended) = watchers.join_next() => {
            ended??;
            return Err("a sender's connection ended".into());
        }
    };
    let secs = start.elapsed().as_secs_f64();
    let cpu = cpu.end()?;
    let total = a.messages * a.pairs as u64;
    println!(
        "{{\"scenario\": \"private\", \"pairs\": {}, \"window\": {}, \"messages\": {total}, \"seconds\": {secs:.3}, \"msgs_per_s\": {:.0}, {}{cpu}}}",
        a.pairs,
        a.window,
        total as f64 / secs,
        lat.summary()
    );
    Ok(())
}

async fn broadcast(a: &Args) -> Res<()> {
    let t0 = Instant::now();
    let proto = a.proto;
    let n = a.users;
    let s = a.senders.min(n);
    let m = a.messages;
    let ring = a.window.max(1);
    // Per sender: in-flight window, and a countdown of recipients per message slot.
    let windows: Vec<Arc<Semaphore>> = (0..s).map(|_| Arc::new(Semaphore::new(ring))).collect();
    let countdown: Arc<Vec<Vec<AtomicU32>>> = Arc::new(
        (0..s)
            .map(|_| (0..ring).map(|_| AtomicU32::new(0)).collect())
            .collect(),
    );
    // Per sender and message: the latest arrival, for latency to the last recipient.
    let last: Arc<Vec<Vec<AtomicU64>>> = Arc::new(
        (0..s)
            .map(|_| (0..m).map(|_| AtomicU64::new(0)).collect())
            .collect(),
    );
    // IRC: every user is in the channel before the senders start.
    let users = (0..n).map(|u| (format!("b{u}"), source(u, a.sources)));
    let conns = login_all(a, users.collect(), 1, false, true).await?;
    let deliveries = Arc::new(AtomicU64::new(0));
    let mut readers = Vec::new();
    let mut writers = Vec::new();
    for (u, (conn, _)) in conns.into_iter().enumerate() {
        let Conn { mut rd, wr } = conn;
        let out = shared(wr);
        writers.push(out.clone());
        let expected = if u < s {
            (s as u64 - 1) * m
        } else {
            s as u64 * m
        };
        let (windows, countdown, last, deliveries) = (
            windows.clone(),
            countdown.clone(),
            last.clone(),
            deliveries.clone(),
        );
        readers.push(tokio::spawn(async move {
            let mut next_seq: HashMap<usize, u64> = HashMap::new();
            read_messages(proto, &mut rd, &out, expected, |from, seq, _| {
                // From one of the other senders, `b<j>`: a sender does not get its own.
                let j = from
                    .strip_prefix('b')
                    .and_then(|x| x.parse::<usize>().ok())
                    .filter(|&j| j < s && j != u)
                    .ok_or_else(|| format!("a broadcast from {from}"))?;
                let want = next_seq.entry(j).or_insert(0);
                if seq != *want {
                    return Err(format!("from b{j} got #{seq}, expected #{want}").into());
                }
                *want += 1;
                last[j][seq as usize].fetch_max(since(t0), Ordering::Relaxed);
                if countdown[j][seq as usize % ring].fetch_sub(1, Ordering::AcqRel) == 1 {
                    windows[j].add_permits(1);
                }
                Ok(())
            })
            .await
            .map_err(|e| format!("b{u}: {e}"))?;
            deliveries.fetch_add(expected, Ordering::Relaxed);
            Res::Ok(())
        }));
    }
    let sent_at: Arc<Vec<Vec<AtomicU64>>> = Arc::new(
        (0..s)
            .map(|_| (0..m).map(|_| AtomicU64::new(0)).collect())
            .collect(),
    );
    let (go, ready) = tokio::sync::watch::channel(false);
    let mut senders = Vec::new();
    // Every writer stays open: dropping one would end that user's session.
    let idle_writers = writers.split_off(s);
    for (j, out) in writers.into_iter().enumerate() {
        let (window, countdown, sent_at) = (windows[j].clone(), countdown.clone(), sent_at.clone());
        let recipients = (n - 1) as u32;
        let mut ready = ready.clone();
        senders.push(tokio::spawn(async move {
            ready.wait_for(|go| *go).await?;
            let mut buf = Vec::with_capacity(64 * 1024);
            let mut next = 0;
            while next < m {
                window.acquire().await?.forget();
                let mut k = 1;
                while k < 512 && next + k < m && window.try_acquire().map(|p| p.forget()).is_ok() {
                    k += 1;
                }
                buf.clear();
                for seq in next..next + k {
                    countdown[j][seq as usize % ring].store(recipients, Ordering::Release);
                    let t = since(t0);
                    sent_at[j][seq as usize].store(t, Ordering::Relaxed);
                    proto.broadcast(&mut buf, seq, t)?;
                }
                out.lock().await.send(&buf).await?;
                next += k;
            }
            Res::Ok(out)
        }));
    }
    let cpu = ServerCpu::start(a.server_pid)?;
    let start = Instant::now();
    go.send(true)?;
    let mut keep = Vec::new();
    for t in senders {
        keep.push(t.await??);
    }
    for r in readers {
        r.await??;
    }
    let secs = start.elapsed().as_secs_f64();
    let cpu = cpu.end()?;
    drop(idle_writers);
    let lat = Latencies::default();
    lat.add(
        (0..s)
            .flat_map(|j| (0..m as usize).map(move |q| (j, q)))
            .map(|(j, q)| {
                let t = last[j][q].load(Ordering::Relaxed) - sent_at[j][q].load(Ordering::Relaxed);
                (t / 1000) as u32
            })
            .collect(),
    );
    let total = deliveries.load(Ordering::Relaxed);
    // Fairness: when each sender's last message had reached its last recipient, counted
    // from the start signal (arrival times are nanoseconds since `t0`).
    let go_ns = start.duration_since(t0).as_nanos() as u64;
    let done: Vec<u64> = (0..s)
        .map(|j| {
            last[j][m as usize - 1]
                .load(Ordering::Relaxed)
                .saturating_sub(go_ns)
        })
        .collect();
    let first_done = done.iter().min().copied().unwrap_or(0);
    let last_done = done.iter().max().copied().unwrap_or(0);
    println!(
        "{{\"scenario\": \"broadcast\", \"users\": {n}, \"senders\": {s}, \"window\": {ring}, \"messages\": {}, \"deliveries\": {total}, \"seconds\": {secs:.3}, \"deliveries_per_s\": {:.0}, \"first_sender_done_ms\": {:.1}, \"last_sender_done_ms\": {:.1}, {}{cpu}}}",
        m * s as u64,
        total as f64 / secs,
        first_done as f64 / 1e6,
        last_done as f64 / 1e6,
        lat.summary()
    );
    Ok(())
}

/// Deterministic file content: byte `i` of the file is bits 13-20 of `i * 2654435761`,
/// which depend on the low 21 bits of `i` only; so the content repeats every 2 MiB, and one
/// period computed once is copied and compared (the load generator must not be what limits
/// the relay: five receivers checking every byte one multiplication at a time were).
const PERIOD: usize = 1 << 21;

fn period() -> &'static [u8] {
    static TABLE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        (0..PERIOD as u64)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect()
    })
}

/// The bytes from `offset` on, piece by piece (each within one period).
fn pattern_pieces(offset: u64, len: usize) -> impl Iterator<Item = &'static [u8]> {
    let table = period();
    let mut at = (offset % PERIOD as u64) as usize;
    let mut left = len;
    std::iter::from_fn(move || {
        if left == 0 {
            return None;
        }
        let n = left.min(PERIOD - at);
        let piece = &table[at..at + n];
        (at, left) = ((at + n) % PERIOD, left - n);
        Some(piece)
    })
}

/// Whether `got` is the file's bytes from `offset` on.
fn is_pattern(offset: u64, got: &[u8]) -> bool {
    let mut checked = 0;
    pattern_pieces(offset, got.len()).all(|piece| {
        let same = got[checked..checked + piece.len()] == *piece;
        checked += piece.len();
        same
    })
}

async fn file(a: &Args) -> Res<()> {
    let r = a.receivers.max(1);
    let from = source(0, 1);
    let (mut sender_chat, sender_file) = login(a, "fsender", from, true).await?;
    let mut sender_file = sender_file.ok_or("no file connection")?;
    let mut receivers = Vec::new();
    for k in 0..r {
        let (chat, file) = login(a, &format!("frecv{k}"), from, true).await?;
        receivers.push((chat, file.ok_or("no file connection")?));
    }
    let target = if r > 1 {
        let mut buf = Vec::new();
        for (k, (chat, _)) in receivers.iter_mut().enumerate() {
            chat.wr.send(b"join bench\n").await?;
            chat.line(&mut buf).await?;
            if buf != b"You joined group 'bench'" {
                return Err(format!("frecv{k}: {}", String::from_utf8_lossy(&buf)).into());
            }
        }
        sender_chat.wr.send(b"join bench\n").await?;
        sender_chat.line(&mut buf).await?;
        "GROUP:bench".to_owned()
    } else {
        "frecv0".to_owned()
    };
    // A file connection's first forward waits 100 ms after its greeting (the lab's client
    // must read the greeting alone): the relay is timed on connections older than that.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let size = a.bytes;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (k, (chat, mut file)) in receivers.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let mut header = Vec::new();
            file.line(&mut header).await?;
            let expect = format!("fsender|bench.bin|{size}");
            if header != expect.as_bytes() {
                return Err(
                    format!("frecv{k}: header {}", String::from_utf8_lossy(&header)).into(),
                );
            }
            let mut got = 0u64;
            let mut buf = vec![0u8; 256 * 1024];
            while got < size {
                let n = file.rd.read(&mut buf).await?;
                if n == 0 {
                    return Err(format!("frecv{k}: closed after {got} bytes").into());
                }
                if !is_pattern(got, &buf[..n]) {
                    return Err(format!("frecv{k}: wrong bytes at {got}").into());
                }
                got += n as u64;
            }
            Res::Ok((start.elapsed().as_secs_f64(), chat))
        }));
    }
    let upload = tokio::spawn(async move {
        sender_file
            .wr
            .write_all(format!("fsender|{target}|bench.bin|{size}\n").as_bytes())
            .await?;
        // Written straight from the pattern's table, 256 KiB at a time (as the relay limit
        // writes its buffer).
        let mut sent = 0u64;
        while sent < size {
            let n = (size - sent).min(256 * 1024) as usize;
            for piece in pattern_pieces(sent, n) {
                sender_file.wr.write_all(piece).await?;
            }
            sent += n as u64;
        }
        sender_file.wr.flush().await?;
        Res::Ok((start.elapsed().as_secs_f64(), sender_file, sender_chat))
    });
    let (upload_secs, _f, _c) = upload.await??;
    let mut each = Vec::new();
    let mut keep = Vec::new();
    for t in tasks {
        let (secs, chat) = t.await??;
        each.push(secs);
        keep.push(chat);
    }
    let secs = each.iter().copied().fold(0.0, f64::max);
    let mb = size as f64 / 1e6;
    let per: Vec<String> = each.iter().map(|s| format!("{:.1}", mb / s)).collect();
    println!(
        "{{\"scenario\": \"file\", \"bytes\": {size}, \"receivers\": {r}, \"seconds\": {secs:.3}, \"upload_seconds\": {upload_secs:.3}, \"mb_per_s\": {:.1}, \"mb_per_s_each\": [{}]}}",
        mb / secs,
        per.join(", ")
    );
    Ok(())
}

async fn relay(a: &Args) -> Res<()> {
    let listener = TcpListener::bind(("127.0.0.1", a.port)).await?;
    println!("{{\"relay_port\": {}}}", listener.local_addr()?.port());
    let to = a.to;
    loop {
        let (inbound, _) = listener.accept().await?;
        tokio::spawn(async move {
            let outbound = TcpStream::connect(("127.0.0.1", to)).await?;
            let (mut ri, _wi) = inbound.into_split();
            let (_ro, mut wo) = outbound.into_split();
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                let n = ri.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                wo.write_all(&buf[..n]).await?;
            }
            Res::Ok(())
        });
    }
}

async fn relay_limit(a: &Args) -> Res<()> {
    let size = a.bytes;
    let sink = TcpListener::bind("127.0.0.1:0").await?;
    let sink_port = sink.local_addr()?.port();
    // The relay runs elsewhere (`relay --to`); tell the driver where the sink is first.
    println!("{{\"sink_port\": {sink_port}}}");
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    let relay_port: u16 = line.trim().parse()?;
    let reader = tokio::spawn(async move {
        let (mut s, _) = sink.accept().await?;
        let mut buf = vec![0u8; 256 * 1024];
        let mut got = 0u64;
        while got < size {
            let n = s.read(&mut buf).await?;
            if n == 0 {
                return Err("sink closed early".into());
            }
            got += n as u64;
        }
        Res::Ok(Instant::now())
    });
    let mut out = TcpStream::connect(("127.0.0.1", relay_port)).await?;
    let chunk = vec![7u8; 256 * 1024];
    let start = Instant::now();
    let mut sent = 0u64;
    while sent < size {
        let n = (size - sent).min(chunk.len() as u64) as usize;
        out.write_all(&chunk[..n]).await?;
        sent += n as u64;
    }
    let end = reader.await??;
    let secs = (end - start).as_secs_f64();
    println!(
        "{{\"scenario\": \"relay-limit\", \"bytes\": {size}, \"seconds\": {secs:.3}, \"mb_per_s\": {:.1}}}",
        size as f64 / 1e6 / secs
    );
    Ok(())
}

async fn connect(a: &Args) -> Res<()> {
    let start = Instant::now();
    let users = (0..a.users).map(|u| (format!("idle{u}"), source(u, a.sources)));
    let mut conns = login_all(a, users.collect(), 256, true, false).await?;
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{{\"scenario\": \"connect\", \"users\": {}, \"sockets\": {}, \"seconds\": {secs:.3}}}",
        a.users,
        2 * a.users
    );
    // Hold the users until told to go, then check the server still answers.
    let mut line = String::new();
    tokio::task::spawn_blocking(move || std::io::stdin().read_line(&mut line)).await??;
    let (first, _) = &mut conns[0];
    first.wr.send(b"msg idle1 still there?\n").await?;
    let (second, _) = &mut conns[1];
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), second.line(&mut buf)).await??;
    if buf != b"[PRIVATE from idle0]: still there?" {
        return Err(format!("unexpected: {}", String::from_utf8_lossy(&buf)).into());
    }
    println!("{{\"scenario\": \"connect-check\", \"ok\": true}}");
    Ok(())
}

/// N full TLS handshakes on the chat port, W at a time. Each one: TCP connect, TLS
/// handshake (done when the client has checked the server's Finished; every connection
/// has its own client config, so none is resumed), close_notify, then read until the
/// server's own close_notify, so every handshake counted is one the server finished.
async fn handshakes(a: &Args) -> Res<()> {
    let options = Arc::new(a.tls.clone().ok_or("handshakes needs --tls-pin")?);
    let (n, port) = (a.connections, a.chat);
    let next = Arc::new(AtomicUsize::new(0));
    let lat = Arc::new(Latencies::default());
    let version = Arc::new(Mutex::new(None));
    let start = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..a.window.clamp(1, n.max(1)) {
        let (options, next, lat, version) =
            (options.clone(), next.clone(), lat.clone(), version.clone());
        workers.push(tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut sink = [0u8; 1024];
            while next.fetch_add(1, Ordering::Relaxed) < n {
                let t = Instant::now();
                // No bind: connect-time ports may reuse those of earlier connections (in
                // TIME_WAIT, ours since we close first) towards other ports.
                let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
                tcp.set_nodelay(true)?;
                let mut tls = relaychat::tls::connect(tcp, "127.0.0.1", port, &options).await?;
                samples.push(t.elapsed().as_micros() as u32);
                let state = tls.get_ref().1;
                if state.handshake_kind() != Some(rustls::HandshakeKind::Full) {
                    return Err(
                        format!("not a full handshake: {:?}", state.handshake_kind()).into(),
                    );
                }
                if let (Some(v), Some(suite)) =
                    (state.protocol_version(), state.negotiated_cipher_suite())
                {
                    version
                        .lock()
                        .expect("lock")
                        .get_or_insert((v, suite.suite()));
                }
                tls.shutdown().await?;
                // The server's session tickets, then its own close_notify: a clean end
                // (an alert, such as a refused Finished, would be an error).
                while tls.read(&mut sink).await? > 0 {}
            }
            lat.add(samples);
            Res::Ok(())
        }));
    }
    for w in workers {
        w.await??;
    }
    let secs = start.elapsed().as_secs_f64();
    let (version, suite) = version.lock().expect("lock").ok_or("no handshake")?;
    println!(
        "{{\"scenario\": \"handshakes\", \"connections\": {n}, \"window\": {}, \"version\": \"{version:?}\", \"suite\": \"{suite:?}\", \"seconds\": {secs:.3}, \"handshakes_per_s\": {:.0}, {}}}",
        a.window,
        n as f64 / secs,
        lat.summary()
    );
    Ok(())
}

/// `size` bytes of chat-log-like text (each line different, as a log's are).
fn text(size: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(size + 100);
    let mut i = 0u64;
    while out.len() < size {
        let line = format!(
            "{i:08} alice -> bob: see you at the standup, room {}, ticket #{}\n",
            i % 17,
            i.wrapping_mul(2_654_435_761) % 100_000
        );
        out.extend_from_slice(line.as_bytes());
        i += 1;
    }
    out.truncate(size);
    out
}

/// MB/s of `bytes` done in `secs`.
fn mb_per_s(bytes: usize, secs: f64) -> f64 {
    bytes as f64 / 1e6 / secs
}

/// See the module docs: one core's cost per byte of the work a checked (and compressed)
/// transfer adds.
fn codec(a: &Args) -> Res<()> {
    use relaychat::compress::{Deflate, Inflate};
    let size = usize::try_from(a.bytes)?;
    let chunk = 256 * 1024;
    let text = text(size);
    let mut random = vec![0u8; size];
    getrandom::getrandom(&mut random).map_err(|e| e.to_string())?;

    let t = Instant::now();
    let mut hasher = blake3::Hasher::new();
    for piece in random.chunks(chunk) {
        hasher.update(piece);
    }
    std::hint::black_box(hasher.finalize());
    let blake3 = mb_per_s(size, t.elapsed().as_secs_f64());

    let compress = |data: &[u8]| -> Res<(Vec<u8>, f64)> {
        let t = Instant::now();
        let mut deflate = Deflate::new()?;
        let mut out = Vec::new();
        for piece in data.chunks(chunk) {
            deflate.push(piece, &mut out)?;
        }
        deflate.finish(&mut out)?;
        Ok((out, mb_per_s(data.len(), t.elapsed().as_secs_f64())))
    };
    let decompress = |frame: &[u8], size: usize| -> Res<f64> {
        let t = Instant::now();
        let mut inflate = Inflate::new()?;
        let mut got = 0;
        let mut out = Vec::with_capacity(chunk);
        let mut input = frame;
        loop {
            out.clear();
            let pulled = inflate.pull(input, &mut out)?;
            input = &input[pulled.read..];
            got += out.len();
            if pulled.ended {
                break;
            }
        }
        if got != size {
            return Err(format!("decoded {got} bytes of {size}").into());
        }
        Ok(mb_per_s(size, t.elapsed().as_secs_f64()))
    };
    let (packed_text, zstd_text) = compress(&text)?;
    let unzstd_text = decompress(&packed_text, size)?;
    let (packed_random, zstd_random) = compress(&random)?;
    let unzstd_random = decompress(&packed_random, size)?;
    println!(
        "{{\"blake3_mb_per_s\":{blake3:.0},\"zstd_text_mb_per_s\":{zstd_text:.0},\
         \"unzstd_text_mb_per_s\":{unzstd_text:.0},\"text_ratio\":{:.4},\
         \"zstd_random_mb_per_s\":{zstd_random:.0},\"unzstd_random_mb_per_s\":{unzstd_random:.0},\
         \"random_ratio\":{:.4}}}",
        packed_text.len() as f64 / size as f64,
        packed_random.len() as f64 / size as f64,
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_pattern_is_each_byte_computed_alone() {
        let byte = |i: u64| (i.wrapping_mul(2_654_435_761) >> 13) as u8;
        for offset in [0, 1, super::PERIOD as u64 - 3, 5 * super::PERIOD as u64 + 7] {
            let out = super::pattern_pieces(offset, 10_000)
                .collect::<Vec<_>>()
                .concat();
            let want: Vec<u8> = (0..10_000).map(|k| byte(offset + k)).collect();
            assert_eq!(out, want);
            assert!(super::is_pattern(offset, &want));
            assert!(!super::is_pattern(offset + 1, &want));
        }
    }
}
