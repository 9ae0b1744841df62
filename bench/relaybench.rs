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
            _ => return Err(arg.unexpected()),
        }
    }
    Ok(a)
}

fn main() -> Res<()> {
    let args = parse_args()?;
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

impl Conn {
    async fn line(&mut self, buf: &mut Vec<u8>) -> Res<()> {
        buf.clear();
        if self.rd.read_until(b'\n', buf).await? == 0 {
            return Err("connection closed".into());
        }
        buf.pop();
        Ok(())
    }
}

/// Logs `name` in on the chat port (and on the file port if `files`).
async fn login(a: &Args, name: &str, from: IpAddr, files: bool) -> Res<(Conn, Option<Conn>)> {
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

/// Parses `<seq> <t_ns>` at the end of a message line.
fn seq_and_time(line: &[u8]) -> Option<(u64, u64)> {
    let text = std::str::from_utf8(line).ok()?;
    let body = text.rsplit(": ").next()?;
    let (seq, t) = body.split_once(' ')?;
    Some((seq.parse().ok()?, t.parse().ok()?))
}

async fn private(a: &Args) -> Res<()> {
    let t0 = Instant::now();
    // Senders start together, once every user is logged in.
    let (go, ready) = tokio::sync::watch::channel(false);
    let lat = Arc::new(Latencies::default());
    let mut tasks = Vec::new();
    for i in 0..a.pairs {
        let from = source(i, a.sources);
        let (mut rx, _) = login(a, &format!("r{i}"), from, false).await?;
        let (tx, _) = login(a, &format!("s{i}"), from, false).await?;
        let window = Arc::new(Semaphore::new(a.window.max(1)));
        let (m, lat, win) = (a.messages, lat.clone(), window.clone());
        let receiver = tokio::spawn(async move {
            let mut buf = Vec::new();
            let mut samples = Vec::with_capacity(m as usize);
            for expect in 0..m {
                rx.line(&mut buf).await?;
                let (seq, t) = seq_and_time(&buf).ok_or("bad message")?;
                if seq != expect {
                    return Err(format!("r{i}: got #{seq}, expected #{expect}").into());
                }
                samples.push(((since(t0) - t) / 1000) as u32);
                win.add_permits(1);
            }
            lat.add(samples);
            Res::Ok(rx)
        });
        let mut wr = tx.wr;
        let mut ready = ready.clone();
        let interval = Duration::from_millis(a.interval_ms);
        let sender = tokio::spawn(async move {
            ready.wait_for(|go| *go).await?;
            let mut out = Vec::with_capacity(64 * 1024);
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
                out.clear();
                for seq in next..next + n {
                    use std::io::Write;
                    writeln!(out, "msg r{i} {seq} {}", since(t0))?;
                }
                wr.send(&out).await?;
                next += n;
            }
            Res::Ok(wr)
        });
        tasks.push((sender, receiver));
    }
    let start = Instant::now();
    go.send(true)?;
    let mut keep = Vec::new();
    for (s, r) in tasks {
        keep.push((s.await??, r.await??));
    }
    let secs = start.elapsed().as_secs_f64();
    let total = a.messages * a.pairs as u64;
    println!(
        "{{\"scenario\": \"private\", \"pairs\": {}, \"window\": {}, \"messages\": {total}, \"seconds\": {secs:.3}, \"msgs_per_s\": {:.0}, {}}}",
        a.pairs,
        a.window,
        total as f64 / secs,
        lat.summary()
    );
    Ok(())
}

async fn broadcast(a: &Args) -> Res<()> {
    let t0 = Instant::now();
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
    let mut conns = Vec::new();
    for u in 0..n {
        conns.push(
            login(a, &format!("b{u}"), source(u, a.sources), false)
                .await?
                .0,
        );
    }
    let deliveries = Arc::new(AtomicU64::new(0));
    let mut readers = Vec::new();
    let mut writers = Vec::new();
    for (u, conn) in conns.into_iter().enumerate() {
        let Conn { mut rd, wr } = conn;
        writers.push(wr);
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
            let mut buf = Vec::new();
            let mut next_seq: HashMap<usize, u64> = HashMap::new();
            for _ in 0..expected {
                buf.clear();
                if rd.read_until(b'\n', &mut buf).await? == 0 {
                    return Err(format!("b{u}: closed").into());
                }
                buf.pop();
                let text = std::str::from_utf8(&buf)?;
                let from = text
                    .strip_prefix("[BROADCAST from b")
                    .and_then(|r| r.split(']').next())
                    .and_then(|x| x.parse::<usize>().ok())
                    .ok_or("bad broadcast")?;
                let (seq, _) = seq_and_time(&buf).ok_or("bad broadcast")?;
                let want = next_seq.entry(from).or_insert(0);
                if seq != *want {
                    return Err(format!("b{u}: from b{from} got #{seq}, expected #{want}").into());
                }
                *want += 1;
                last[from][seq as usize].fetch_max(since(t0), Ordering::Relaxed);
                if countdown[from][seq as usize % ring].fetch_sub(1, Ordering::AcqRel) == 1 {
                    windows[from].add_permits(1);
                }
            }
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
    for (j, mut wr) in writers.into_iter().enumerate() {
        let (window, countdown, sent_at) = (windows[j].clone(), countdown.clone(), sent_at.clone());
        let recipients = (n - 1) as u32;
        let mut ready = ready.clone();
        senders.push(tokio::spawn(async move {
            ready.wait_for(|go| *go).await?;
            let mut out = Vec::with_capacity(64 * 1024);
            let mut next = 0;
            while next < m {
                window.acquire().await?.forget();
                let mut k = 1;
                while k < 512 && next + k < m && window.try_acquire().map(|p| p.forget()).is_ok() {
                    k += 1;
                }
                out.clear();
                for seq in next..next + k {
                    use std::io::Write;
                    countdown[j][seq as usize % ring].store(recipients, Ordering::Release);
                    let t = since(t0);
                    sent_at[j][seq as usize].store(t, Ordering::Relaxed);
                    writeln!(out, "broadcast {seq} {t}")?;
                }
                wr.send(&out).await?;
                next += k;
            }
            Res::Ok(wr)
        }));
    }
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
        "{{\"scenario\": \"broadcast\", \"users\": {n}, \"senders\": {s}, \"window\": {ring}, \"messages\": {}, \"deliveries\": {total}, \"seconds\": {secs:.3}, \"deliveries_per_s\": {:.0}, \"first_sender_done_ms\": {:.1}, \"last_sender_done_ms\": {:.1}, {}}}",
        m * s as u64,
        total as f64 / secs,
        first_done as f64 / 1e6,
        last_done as f64 / 1e6,
        lat.summary()
    );
    Ok(())
}

/// Deterministic file content: byte `i` of the file.
fn pattern(offset: u64, out: &mut [u8]) {
    for (k, b) in out.iter_mut().enumerate() {
        let i = offset + k as u64;
        *b = (i.wrapping_mul(2_654_435_761) >> 13) as u8;
    }
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
            let mut want = vec![0u8; 256 * 1024];
            while got < size {
                let n = file.rd.read(&mut buf).await?;
                if n == 0 {
                    return Err(format!("frecv{k}: closed after {got} bytes").into());
                }
                pattern(got, &mut want[..n]);
                if buf[..n] != want[..n] {
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
        let mut chunk = vec![0u8; 256 * 1024];
        let mut sent = 0u64;
        while sent < size {
            let n = (size - sent).min(chunk.len() as u64) as usize;
            pattern(sent, &mut chunk[..n]);
            sender_file.wr.write_all(&chunk[..n]).await?;
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
    let mut conns = Vec::with_capacity(a.users);
    let mut pending = Vec::new();
    let per = Arc::new(Semaphore::new(256));
    for u in 0..a.users {
        let (a2, per) = (a.clone(), per.clone());
        pending.push(tokio::spawn(async move {
            let _permit = per.acquire_owned().await?;
            login(&a2, &format!("idle{u}"), source(u, a2.sources), true).await
        }));
    }
    for p in pending {
        conns.push(p.await??);
    }
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
