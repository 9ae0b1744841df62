#!/usr/bin/env python3
"""Runs every benchmark scenario and writes docs/BENCHMARKS.md.

    python bench/run.py                 # the full suite, 3 runs each (several minutes)
    python bench/run.py --smoke --out /tmp/b.md   # a tiny run of each scenario (the tests)

The server (`python server.py`) runs pinned to CPU 0 and the load generator (`relaybench`,
bench/relaybench.rs, plus the Python bots) pinned to CPU 1, a fresh server for every run.
Every scenario verifies that each message and byte arrived exactly once; a run that fails
verification fails the whole benchmark. The TLS scenarios start the server with
`--tls-self-signed` and give relaybench its certificate's fingerprint (`--tls-pin`); each
sits right after the plain-text scenario it is compared with.

With `--peers`, three more scenarios run the same load generator (`relaybench --irc`) against
ngIRCd and InspIRCd as well, configured from bench/peers/, each pinned to CPU 0 as relaychat's
server is, and the report gains a section "relaychat beside ngIRCd and InspIRCd".
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import sqlite3
import ssl
import statistics
import string
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from relaychat import AccountBook

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "target" / "release" / "relaybench"
SERVER_CPU, LOAD_CPU = "0", "1"


def pinned(cpu: str, argv: list[str]) -> list[str]:
    return ["taskset", "-c", cpu, *argv] if shutil.which("taskset") else argv


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "Threads"):
            out[key] = int(value.split()[0])
    out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return out


#: What `--tls-self-signed` makes in the data directory on first start.
TLS_CERT = "relaychat-tls-cert.pem"


def fingerprint(cert: Path) -> str:
    """A PEM certificate's SHA-256 fingerprint, as the server's `[TLS]` log line prints it."""
    der = ssl.PEM_cert_to_DER_cert(cert.read_text())
    return ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())


class ServerProc:
    """`python server.py` on free ports, pinned to the server CPU; with `tls`, it serves TLS
    too (`--tls-self-signed`) and `pin` is its certificate's fingerprint."""

    def __init__(self, data: Path, *flags: str, tls: bool = False) -> None:
        argv = [sys.executable, "-u", str(REPO / "server.py"), "--chat-port", "0"]
        argv += ["--file-port", "0", "--data-dir", str(data), "--log-level", "warn", *flags]
        argv += ["--tls-self-signed"] if tls else []
        self.proc = subprocess.Popen(
            pinned(SERVER_CPU, argv), stdout=subprocess.PIPE, text=True, cwd=REPO
        )
        ports = {}
        while len(ports) < 2:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError("the server exited before listening")
            m = re.match(r"\[(CHAT|FILE) SERVER\] Listening on (\d+)", line)
            if m:
                ports[m.group(1)] = int(m.group(2))
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()
        self.chat, self.file = ports["CHAT"], ports["FILE"]
        # The fingerprint the server logs (`[TLS] on both ports ... SHA-256 <fp>`), taken from
        # the certificate it made: that line is at info level, and the benchmark runs the
        # server at warn (info logs every login, which would weigh on the TLS runs only).
        self.pin = fingerprint(data / TLS_CERT) if tls else None

    def generator_args(self) -> list[str]:
        """relaybench's flags to reach this server (over TLS if it serves TLS)."""
        args = ["--chat", str(self.chat), "--file", str(self.file)]
        return args + (["--tls-pin", self.pin] if self.pin else [])

    def status(self) -> dict[str, int]:
        return proc_status(self.proc.pid)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        if self.proc.wait(timeout=60) != 0:
            raise RuntimeError(f"the server exited with {self.proc.returncode}")
        self.proc.stdout.close()


def generator(*args: str, stdin=None) -> subprocess.Popen:
    return subprocess.Popen(
        pinned(LOAD_CPU, [str(BENCH), *args]),
        stdin=stdin,
        stdout=subprocess.PIPE,
        text=True,
    )


def json_line(p: subprocess.Popen) -> dict:
    line = p.stdout.readline()
    if not line:
        p.wait()
        raise RuntimeError(f"relaybench failed (exit {p.returncode})")
    return json.loads(line)


def run_generator(server: ServerProc, *args: str) -> dict:
    p = generator(*args, *server.generator_args())
    result = json_line(p)
    if p.wait(timeout=600) != 0:
        raise RuntimeError(f"relaybench {args[0]} exited with {p.returncode}")
    p.stdout.close()
    return result


# --- scenarios: each returns a dict of figures ----------------------------------------------


def relay_limit(size: int, tmp: Path) -> dict:
    gen = generator("relay-limit", "--bytes", str(size), stdin=subprocess.PIPE)
    sink = json_line(gen)["sink_port"]
    relay = subprocess.Popen(
        pinned(SERVER_CPU, [str(BENCH), "relay", "--to", str(sink)]),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        gen.stdin.write(f"{json_line(relay)['relay_port']}\n")
        gen.stdin.flush()
        result = json_line(gen)
        gen.wait(timeout=60)
    finally:
        relay.kill()
        relay.wait()
        relay.stdout.close()
        gen.stdin.close()
        gen.stdout.close()
    return {"MB/s": result["mb_per_s"]}


def with_server(tmp: Path, fn, *flags: str, tls: bool = False) -> dict:
    data = Path(tempfile.mkdtemp(dir=tmp))
    server = ServerProc(data, *flags, tls=tls)
    try:
        return fn(server)
    finally:
        server.stop()
        shutil.rmtree(data, ignore_errors=True)


def file_relay(size: int, receivers: int, tmp: Path, tls: bool = False) -> dict:
    def go(server: ServerProc) -> dict:
        r = run_generator(server, "file", "--bytes", str(size), "--receivers", str(receivers))
        hwm = server.status()["VmHWM"]
        return {
            "seconds": r["seconds"],
            "MB/s (slowest receiver)": min(r["mb_per_s_each"]),
            "server VmHWM MB": hwm / 1024,
        }

    return with_server(tmp, go, tls=tls)


def measured(server: ServerProc | PeerProc, kind: str, *args: str) -> dict:
    """relaybench `kind` (private or broadcast) against `server`: the rate, the latencies, and
    the server's CPU time per message sent (private) or delivered (broadcast), in µs: user +
    system time of all its threads, from /proc/<pid>/stat, which relaybench reads at its start
    signal and once the last message is verified (`--server-pid`), so logins, JOINs and
    disconnections are not counted."""
    r = run_generator(server, kind, *args, "--server-pid", str(server.proc.pid))
    used = r["server_cpu_ticks"] / os.sysconf("SC_CLK_TCK")
    if kind == "private":
        rate, count = {"msgs/s": r["msgs_per_s"]}, r["messages"]
        cpu = "server CPU µs/msg"
    else:
        rate, count = {"deliveries/s": r["deliveries_per_s"]}, r["deliveries"]
        cpu = "server CPU µs/delivery"
    latency = {"p50 µs": r["p50_us"], "p99 µs": r["p99_us"], "max µs": r["max_us"]}
    return rate | latency | {cpu: 1e6 * used / count}


def messages(kind: str, tmp: Path, *args: str, flags: tuple[str, ...] = ()) -> dict:
    return with_server(tmp, lambda server: measured(server, kind, *args), *flags)


#: A plugin whose message hook lets everything through (what a hook costs).
PASSTHROUGH = str(REPO / "bench" / "passthrough.py")


def history_cost(
    history: bool, msgs: int, tmp: Path, tls: bool = False, flags: tuple[str, ...] = ()
) -> dict:
    """Private messages, pipelined, with the history kept or not (over TLS with `tls`);
    afterwards every message must be in the history (or none, with `--history off`)."""
    data = Path(tempfile.mkdtemp(dir=tmp))
    # Private messages are kept between registered users only: register all 100 first.
    book = AccountBook(data / "relaychat.db")
    for i in range(50):
        for name in (f"r{i}", f"s{i}"):
            book.add(name, "bench-password")
    del book
    server = ServerProc(data, *([] if history else ["--history", "off"]), *flags, tls=tls)
    try:
        r = run_generator(
            server,
            "private",
            "--pairs",
            "50",
            "--messages",
            str(msgs),
            "--window",
            "64",
            "--password",
            "bench-password",
        )
    finally:
        server.stop()
    with sqlite3.connect(data / "relaychat.db") as db:
        kept = db.execute("SELECT coalesce(sum(n), 0) FROM history").fetchone()[0]
    shutil.rmtree(data, ignore_errors=True)
    expected = 50 * msgs if history else 0
    if kept != expected:
        raise RuntimeError(f"{kept} messages in the history, expected {expected}")
    return {"msgs/s": r["msgs_per_s"], "p99 µs": r["p99_us"], "in history": kept}


class Line:
    """A netcat-style chat connection: lines out, lines in."""

    def __init__(self, port: int, name: str, password: str | None = None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.reader = self.sock.makefile("rb")
        self.send(f"{name}\n")
        line = self.reader.readline()
        if password is not None:
            if line != f"Password for {name}:\n".encode():
                raise RuntimeError(f"{name}: expected the password prompt, got {line!r}")
            self.send(f"{password}\n")
            line = self.reader.readline()
        if line != f"Welcome, {name}!\n".encode():
            raise RuntimeError(f"{name}: expected the welcome, got {line!r}")

    def send(self, text: str) -> None:
        self.sock.sendall(text.encode())

    def line(self) -> bytes:
        return self.reader.readline()

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


def register_user(port: int, name: str, password: str) -> None:
    user = Line(port, name)
    user.send(f"register {password}\n")
    if user.line() != f"Registered {name}.\n".encode():
        raise RuntimeError(f"cannot register {name}")
    user.close()
    probe = Line(port, f"probe-{name}")
    while True:  # until the server has seen the session end
        probe.send("list\n")
        if name not in probe.line().decode():
            break
    probe.close()


def inbox(total: int, senders: int, tmp: Path) -> dict:
    """`senders` guests queue `total` messages for a registered user who is away (each
    pipelining its share; `--inbox-max` raised to `total`); then the user logs in: how long
    until the last one is there. Every message must arrive once, in each sender's order."""

    def go(server: ServerProc) -> dict:
        register_user(server.chat, "owner", "owner-password")
        per = total // senders
        conns = [Line(server.chat, f"q{k}") for k in range(senders)]
        t0 = time.perf_counter()

        def queue(k: int) -> None:
            conn = conns[k]
            conn.send("".join(f"msg owner {k} {i}\n" for i in range(per)))
            for _ in range(per):
                if conn.line() != b"User owner is offline; message queued.\n":
                    raise RuntimeError("a message was not queued")

        threads = [threading.Thread(target=queue, args=(k,)) for k in range(senders)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        queued_s = time.perf_counter() - t0
        sock = socket.create_connection(("127.0.0.1", server.chat), timeout=60)
        reader = sock.makefile("rb")
        sock.sendall(b"owner\n")
        if reader.readline() != b"Password for owner:\n":
            raise RuntimeError("no password prompt")
        t1 = time.perf_counter()
        sock.sendall(b"owner-password\n")
        if reader.readline() != b"Welcome, owner!\n":
            raise RuntimeError("no welcome")
        seen = [0] * senders
        for _ in range(per * senders):
            line = reader.readline().decode()
            k, i = (int(x) for x in line.split("]: ", 1)[1].split())
            if i != seen[k]:
                raise RuntimeError(f"from q{k}: got #{i}, expected #{seen[k]}")
            seen[k] += 1
        delivered_s = time.perf_counter() - t1
        reader.close()
        sock.close()
        for conn in conns:
            conn.close()
        return {
            "queued msgs/s": per * senders / queued_s,
            "login to last message s": delivered_s,
        }

    return with_server(tmp, go, "--inbox-max", str(total))


#: Concurrent login bots (a login waits for its hash: one bot alone cannot offer 20/s).
BOTS = 4


def logins_vs_chat(rate: int, msgs: int, tmp: Path) -> dict:
    """Chat latency alone and while a registered user logs in and out `rate` times a second
    (each login checks a password with argon2id). The chat is an offered load (50 pairs,
    each sending a message every millisecond, closed loop): a busy server that still has
    CPU to spare, as a server serving people is; a load that takes all of it would leave
    nothing for logins (they run at the lowest priority)."""

    def go(server: ServerProc) -> dict:
        register_user(server.chat, "visitor", "visitor-password")
        args = ["private", "--pairs", "50", "--messages", str(msgs), "--interval-ms", "1"]
        alone = run_generator(server, *args)
        stop, done = threading.Event(), []

        def log_in_and_out() -> None:
            while not stop.is_set():
                t = time.perf_counter()
                Line(server.chat, "visitor", "visitor-password").close()
                done.append(time.perf_counter() - t)
                # The bots share the rate: each logs in every BOTS/rate seconds.
                stop.wait(max(0.0, BOTS / rate - (time.perf_counter() - t)))

        bots = [threading.Thread(target=log_in_and_out) for _ in range(BOTS)]
        t0 = time.perf_counter()
        for b in bots:
            b.start()
        try:
            busy = run_generator(server, *args)
        finally:
            stop.set()
            for b in bots:
                b.join()
        seconds = time.perf_counter() - t0
        return {
            "p99 µs alone": alone["p99_us"],
            "p99 µs with logins": busy["p99_us"],
            "p99 ratio": busy["p99_us"] / max(alone["p99_us"], 1),
            "logins/s": len(done) / seconds,
            "login ms p50": 1000 * statistics.median(done) if done else 0,
        }

    return with_server(tmp, go)


def storm(users: int, per_user: int, tmp: Path) -> dict:
    """Every user pipelines all its broadcasts in one write, at once, and reads everyone
    else's: relaybench fails the run if any delivery is missing, doubled or out of order
    per sender (a dropped reader fails it too)."""

    def go(server: ServerProc) -> dict:
        r = run_generator(
            server, "broadcast", "--users", str(users), "--senders", str(users),
            "--messages", str(per_user), "--window", str(per_user), "--sources", "4",
        )  # fmt: skip
        want = users * (users - 1) * per_user
        return {
            "deliveries": r["deliveries"],
            "lost": want - r["deliveries"],
            "seconds": r["seconds"],
            "deliveries/s": r["deliveries_per_s"],
            "first sender done s": r["first_sender_done_ms"] / 1000,
            "last sender done s": r["last_sender_done_ms"] / 1000,
            "server VmHWM MB": server.status()["VmHWM"] / 1024,
        }

    return with_server(tmp, go)


def connect_users(users: int, sources: int, extra: int, tmp: Path, tls: bool = False) -> dict:
    flags = ("--max-connections", "30000", "--max-per-address", "30000")

    def go(server: ServerProc) -> dict:
        before = server.status()
        gen = generator(
            "connect",
            *("--users", str(users), "--sources", str(sources)),
            *server.generator_args(),
            stdin=subprocess.PIPE,
        )
        r = json_line(gen)
        held = server.status()
        # Past the ceiling: more connections are refused cleanly, the server goes on.
        refused = accepted = 0
        extras = []
        for i in range(extra):
            s = socket.socket()
            s.settimeout(5)
            try:
                s.connect(("127.0.0.1", server.chat))
                s.sendall(f"extra{i}\n".encode())
                reply = s.recv(100)
                accepted += reply.startswith(b"Welcome")
                refused += not reply.startswith(b"Welcome")
            except OSError:
                refused += 1
            extras.append(s)
        for s in extras:
            s.close()
        gen.stdin.write("go\n")
        gen.stdin.flush()
        check = json_line(gen)
        gen.wait(timeout=120)
        gen.stdin.close()
        gen.stdout.close()
        per_user = (held["VmRSS"] - before["VmRSS"]) * 1024 / users
        figures = {
            "users": users,
            "seconds": r["seconds"],
            "server KB/user": per_user / 1000,
            "server threads": held["Threads"],
            "server fds": held["fds"],
        }
        if extra:  # none tried: no figures that would read as "none refused"
            figures |= {"extra refused": refused, "extra accepted": accepted}
        return figures | {
            "still chatting": check["ok"],
            "MB for 100k users (extrapolated)": per_user * 100_000 / 1e6 + before["VmRSS"] / 1024,
        }

    return with_server(tmp, go, *flags, tls=tls)


def tls_handshakes(connections: int, window: int, tmp: Path) -> dict:
    """Full TLS handshakes on the chat port, `window` at a time, each then closed; the
    server's CPU time over the run tells whether its one core was the limit."""

    def go(server: ServerProc) -> dict:
        cpu = cpu_seconds(server.proc.pid)
        r = run_generator(
            server, "handshakes", "--connections", str(connections), "--window", str(window)
        )
        cpu = cpu_seconds(server.proc.pid) - cpu
        if r["version"] != "TLSv1_3":
            raise RuntimeError(f"negotiated {r['version']}, expected TLS 1.3")
        return {
            "handshakes/s": r["handshakes_per_s"],
            "server CPU busy %": 100 * cpu / r["seconds"],
            "handshakes per server CPU-second": connections / max(cpu, 0.01),
            "p50 µs": r["p50_us"],
            "p99 µs": r["p99_us"],
        }

    return with_server(tmp, go, tls=True)


def churn(cycles: int, users: int, tmp: Path) -> dict:
    def go(server: ServerProc) -> dict:
        start = server.status()
        for c in range(cycles):
            conns = []
            for i in range(users):
                s = socket.create_connection(("127.0.0.1", server.chat), timeout=10)
                s.sendall(f"c{c}u{i}\n".encode())
                conns.append(s)
            for s in conns:
                assert s.recv(100).startswith(b"Welcome"), "login failed"
            conns[0].sendall(b"broadcast hello\n")
            for s in conns[1:]:
                buf = b""
                while b"\n" not in buf:
                    buf += s.recv(4096)
                assert buf.startswith(b"[BROADCAST from "), buf
            for i, s in enumerate(conns):
                if i % 2:  # half leave by reset
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
                s.close()
        deadline = time.monotonic() + 30
        while server.status()["fds"] > start["fds"] and time.monotonic() < deadline:
            time.sleep(0.05)
        end = server.status()
        return {
            "fds before": start["fds"],
            "fds after": end["fds"],
            "threads after": end["Threads"],
            "RSS growth MB": (end["VmRSS"] - start["VmRSS"]) / 1024,
        }

    # All from one address, and a cycle's closes may still be in flight as the next logs in.
    return with_server(tmp, go, "--max-per-address", "10000")


BOT = r"""
import asyncio, socket, sys, threading, time
from relaychat import AsyncClient, BroadcastMessage, Client
chat, file, n, mode = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
flood = socket.create_connection(("127.0.0.1", chat))
flood.sendall(b"flood\n"); flood.recv(100)
# The flood keeps at most LEAD events ahead of the bot: a bot that let the server queue
# more than its send queue would be dropped as a slow consumer (as it should be).
BATCH, LEAD = 5000, 20000
got = 0
progress = threading.Condition()

def pump():
    for start in range(0, n, BATCH):
        with progress:
            progress.wait_for(lambda: start - got < LEAD)
        end = min(start + BATCH, n)
        flood.sendall(b"".join(b"broadcast %d\n" % i for i in range(start, end)))

def take(ev, t0):
    global got
    if not isinstance(ev, BroadcastMessage):
        return t0
    if int(ev.text) != got:
        raise SystemExit(f"got {ev.text}, expected {got}")
    got += 1
    if got % 1000 == 0:
        with progress:
            progress.notify()
    return t0 or time.perf_counter()

def count_sync():
    with Client("127.0.0.1", chat, file, username="bot") as c:
        c.next_event(timeout=10)
        threading.Thread(target=pump, daemon=True).start()
        t0 = None
        for ev in c.events(timeout=30):
            t0 = take(ev, t0)
            if got == n:
                return time.perf_counter() - t0

async def count_async():
    c = await AsyncClient.connect("127.0.0.1", chat, file, username="bot")
    async with c:
        await c.next_event(timeout=10)
        threading.Thread(target=pump, daemon=True).start()
        t0 = None
        async for ev in c.events(timeout=30):
            t0 = take(ev, t0)
            if got == n:
                return time.perf_counter() - t0

secs = count_sync() if mode == "sync" else asyncio.run(count_async())
assert got == n and secs, (got, n)
print(n / secs)
"""


def python_bot(mode: str, n: int, tmp: Path) -> dict:
    def go(server: ServerProc) -> dict:
        argv = [sys.executable, "-c", BOT, str(server.chat), str(server.file), str(n), mode]
        out = subprocess.run(pinned(LOAD_CPU, argv), capture_output=True, text=True, timeout=300)
        if out.returncode != 0:
            why = out.stderr[-2000:] or f"exit status {out.returncode}, nothing on stderr"
            raise RuntimeError(f"the {mode} bot failed: {why}")
        return {"events/s": float(out.stdout.strip())}

    return with_server(tmp, go)


def codec(size: int, tmp: Path) -> dict:
    """What a checked (and compressed) transfer's extra work costs one core (the server's):
    BLAKE3, and the engine's zstd on chat-like text and on random bytes."""
    p = subprocess.run(
        pinned(SERVER_CPU, [str(BENCH), "codec", "--bytes", str(size)]),
        capture_output=True,
        text=True,
        check=True,
    )
    r = json.loads(p.stdout)
    return {
        "BLAKE3 MB/s": r["blake3_mb_per_s"],
        "zstd text MB/s": r["zstd_text_mb_per_s"],
        "unzstd text MB/s": r["unzstd_text_mb_per_s"],
        "text compressed to %": 100 * r["text_ratio"],
        "zstd random MB/s": r["zstd_random_mb_per_s"],
        "random compressed to %": 100 * r["random_ratio"],
    }


CHECKED = r"""
import json, sys, time
from pathlib import Path
from relaychat import Client, FileFailed, FileReceived, Welcome
chat, file, path, compress, downloads = sys.argv[1:6]
compress = compress == "zstd"
def client(name):
    c = Client("127.0.0.1", int(chat), int(file), username=name, download_dir=f"{downloads}/{name}")
    assert isinstance(c.next_event(timeout=10), Welcome)
    return c
alice, bob = client("alice"), client("bob")
size = Path(path).stat().st_size
t0 = time.perf_counter()
alice.send_file("bob", path, compress=compress)
for ev in bob.events(timeout=300):
    if isinstance(ev, FileFailed):
        raise SystemExit(ev.reason)
    if isinstance(ev, FileReceived):
        break
secs = time.perf_counter() - t0
# bob's engine checked the BLAKE3 hash alice's computed before it renamed the file.
assert Path(ev.path).stat().st_size == size
print(json.dumps({"seconds": secs, "mb_per_s": size / 1e6 / secs}))
"""


def text_file(path: Path, size: int) -> Path:
    """`size` bytes of chat-log-like text, made once per run of the benchmark."""
    if not path.exists():
        with path.open("w") as f:
            written, i = 0, 0
            while written < size:
                block = "".join(
                    f"{j:08} alice -> bob: see you at the standup, room {j % 17}, "
                    f"ticket #{j * 2654435761 % 100000}\n"
                    for j in range(i, i + 10_000)
                )
                f.write(block)
                written, i = written + len(block), i + 10_000
        with path.open("r+b") as f:
            f.truncate(size)
    return path


def checked_file(size: int, compress: str, tmp: Path) -> dict:
    """One text file from our `Client` to our `Client` (both in one process on the load
    CPU): the checked path (BLAKE3 at the sender, the server and the receiver; the go-ahead
    and the trailer), its body plain or zstd-compressed."""
    text = text_file(tmp / "text.log", size)

    def go(server: ServerProc) -> dict:
        downloads = Path(tempfile.mkdtemp(dir=tmp))
        argv = [sys.executable, "-c", CHECKED, str(server.chat), str(server.file)]
        argv += [str(text), compress, str(downloads)]
        before = cpu_seconds(server.proc.pid)
        out = subprocess.run(pinned(LOAD_CPU, argv), capture_output=True, text=True, timeout=600)
        used = cpu_seconds(server.proc.pid) - before
        shutil.rmtree(downloads, ignore_errors=True)
        if out.returncode != 0:
            raise RuntimeError(f"the checked transfer failed: {out.stderr[-2000:]}")
        r = json.loads(out.stdout)
        return {
            "seconds": r["seconds"],
            "MB/s": r["mb_per_s"],
            "server CPU s per GB": used / (size / 1e9),
        }

    return with_server(tmp, go)


# --- relaychat beside ngIRCd and InspIRCd (--peers) -------------------------------------------

PEERS = REPO / "bench" / "peers"


class Peer:
    """An IRC server run beside relaychat: its Debian package, how it runs in the foreground
    with a config written from its template in bench/peers/, and relaybench's extra flags."""

    def __init__(self, name: str, package: str, *args: str, flags: tuple[str, ...] = ()) -> None:
        self.name, self.package, self.args, self.flags = name, package, args, flags

    def command(self, conf: Path) -> list[str]:
        binary = shutil.which(self.package, path=SBIN_PATH) or self.package
        return [binary, *self.args, str(conf)]


#: Where the servers' binaries are (root's PATH has it; another user's may not).
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])

PEER_SERVERS = {
    # ngIRCd accepts from a listen backlog of 10 (hard-coded): relaybench's users log in one
    # after the other (its default), which never overflows it.
    "ngIRCd": Peer("ngIRCd", "ngircd", "--nodaemon", "--config"),
    # As root, InspIRCd runs only with --runasroot (ngIRCd switches to "nobody" by itself).
    # It ends registrations only in its once-a-second timer: 256 users log in at a time.
    "InspIRCd": Peer(
        "InspIRCd",
        "inspircd",
        *("--nofork", "--runasroot", "--nopid", "--config"),
        flags=("--logins-at-once", "256"),
    ),
}
#: The columns of the comparison.
SIDE_BY_SIDE = ("relaychat", *PEER_SERVERS)


def install_peers() -> None:
    """Installs the Debian packages of the servers that are missing (apt-get, as root), and
    lets the servers started from here open as many files as the hard limit allows."""
    packages = [p.package for p in PEER_SERVERS.values()]
    missing = [p for p in packages if not shutil.which(p, path=SBIN_PATH)]
    if missing:
        print(f"installing {' '.join(missing)} with apt-get", flush=True)
        subprocess.run(["apt-get", "update"], check=True)
        subprocess.run(["apt-get", "install", "-y", *missing], check=True)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def package_version(package: str) -> str:
    out = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Version}", package], capture_output=True, text=True
    )
    return out.stdout.strip() or "unknown version"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PeerProc:
    """An IRC server on a free port of 127.0.0.1, in the foreground, pinned to the server CPU
    as relaychat's server is; its config is its template from bench/peers/ with the port and
    this run's directory filled in. Its output and logs go to that directory."""

    def __init__(self, peer: Peer, data: Path) -> None:
        self.peer, self.chat, self.data = peer, free_port(), data
        conf = data / f"{peer.package}.conf"
        template = string.Template((PEERS / f"{peer.package}.conf").read_text())
        conf.write_text(template.substitute(port=self.chat, dir=data))
        with (data / f"{peer.package}.out").open("w") as log:
            self.proc = subprocess.Popen(
                pinned(SERVER_CPU, peer.command(conf)),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=data,
            )
        deadline = time.monotonic() + 30
        while True:  # until its port accepts
            if self.proc.poll() is not None:
                raise RuntimeError(f"{peer.name} exited: {self.logs()}")
            try:
                socket.create_connection(("127.0.0.1", self.chat), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{peer.name} is not listening on {self.chat}") from None
                time.sleep(0.05)

    def generator_args(self) -> list[str]:
        return ["--chat", str(self.chat), "--irc", *self.peer.flags]

    def logs(self) -> str:
        """The end of what the server wrote (its output, and its log file if it has one)."""
        files = sorted(self.data.glob("*.out")) + sorted(self.data.glob("*.log"))
        return "".join(f"\n--- {f.name}:\n{f.read_text(errors='replace')[-2000:]}" for f in files)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def with_peer(peer: Peer, tmp: Path, fn) -> dict:
    data = Path(tempfile.mkdtemp(dir=tmp))
    server = PeerProc(peer, data)
    try:
        return fn(server)
    except Exception as e:
        raise RuntimeError(f"{peer.name}: {e}; the end of its logs:{server.logs()}") from e
    finally:
        server.stop()
        shutil.rmtree(data, ignore_errors=True)


def on(name: str, tmp: Path, fn) -> dict:
    """`fn(server)` on a fresh server `name` (one of SIDE_BY_SIDE), stopped afterwards."""
    return with_server(tmp, fn) if name == "relaychat" else with_peer(PEER_SERVERS[name], tmp, fn)


def beside(kind: str, tmp: Path, *args: str) -> dict:
    """One run of a relaybench scenario against relaychat, ngIRCd and InspIRCd in turn, a
    fresh server each: per server the rate, the server's CPU time per message, p50 and p99."""
    figures = {}
    for name in SIDE_BY_SIDE:
        r = on(name, tmp, lambda server: measured(server, kind, *args))
        r.pop("max µs")
        figures |= {f"{name} {key}": value for key, value in r.items()}
    return figures


def irc_login(port: int, name: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(f"NICK {name}\r\nUSER {name} 0 * :{name}\r\n".encode())
    got = b""
    while not re.search(rb"^:\S+ (376|422) ", got, re.M):
        data = sock.recv(65536)
        if not data:
            raise RuntimeError(f"{name}: closed during registration: {got[-500:]!r}")
        got += data
    return sock


def socket_options(tmp: Path) -> dict[str, list[str] | None]:
    """The socket options each server sets on a client's connection: `strace -f -p` attached
    to the running server (all its threads) while one user connects and logs in. None when
    strace is missing."""
    out: dict[str, list[str] | None] = {}
    for name in SIDE_BY_SIDE:
        if not shutil.which("strace"):
            out[name] = None
            continue

        def probe(server, name=name) -> dict:
            trace = Path(tempfile.mkdtemp(dir=tmp)) / "strace.txt"
            argv = ["strace", "-f", "-e", "trace=setsockopt", "-o", str(trace)]
            st = subprocess.Popen(
                [*argv, "-p", str(server.proc.pid)], stderr=subprocess.PIPE, text=True
            )
            try:
                # strace tells on stderr when it has attached (once per thread).
                while "attached" not in (line := st.stderr.readline()):
                    if not line:
                        raise RuntimeError(f"strace could not attach to {name}")
                time.sleep(0.3)
                if isinstance(server, PeerProc):
                    irc_login(server.chat, "probe").close()
                else:
                    Line(server.chat, "probe").close()
                time.sleep(0.3)
            finally:
                st.send_signal(signal.SIGINT)
                st.wait(timeout=30)
                st.stderr.close()
            found = re.findall(r"setsockopt\(\d+, \w+, (\w+)", trace.read_text())
            return {"options": sorted(set(found))}

        out[name] = on(name, tmp, probe)["options"]
    return out


def peers_section(results: list[tuple[str, dict]], options: dict, runs: int) -> list[str]:
    """The report's section on the `--peers` scenarios: a row per scenario, a column per
    server, and what the figures mean."""
    names = SIDE_BY_SIDE
    versions = ", ".join(f"{p.name} {package_version(p.package)}" for p in PEER_SERVERS.values())
    lines = [
        "",
        "## relaychat beside ngIRCd and InspIRCd",
        "",
        f"The same load generator against each server ({versions}, Debian packages), a fresh "
        "server for every run, each pinned to CPU 0 exactly as relaychat's server is (the "
        "generator on CPU 1); relaybench speaks IRC to the C servers (`--irc`: `NICK`/`USER`, "
        "`PRIVMSG r<i>`, and `JOIN #bench` then `PRIVMSG #bench` for the broadcast) and "
        "verifies every message the same way: each exactly once, in order per sender. "
        f"Median (min-max) of {runs} run(s).",
        "",
        "| scenario | " + " | ".join(names) + " |",
        "|---" * (len(names) + 1) + "|",
    ]
    for scenario, figs in results:
        cells = []
        for name in names:
            mine = {k[len(name) + 1 :]: v for k, v in figs.items() if k.startswith(name + " ")}
            rate = next(f"{v} {k}" for k, v in mine.items() if k.endswith("/s"))
            cpu = next(f"{v} µs" for k, v in mine.items() if k.startswith("server CPU"))
            cells.append(f"{rate}; CPU {cpu}; p50 {mine['p50 µs']} µs, p99 {mine['p99 µs']} µs")
        lines.append(f"| {scenario.removeprefix(PEERS_PREFIX)} | " + " | ".join(cells) + " |")

    def told(name: str) -> str:
        found = options.get(name)
        if found is None:
            return f"{name}: not checked (no strace)"
        verb = "sets" if "TCP_NODELAY" in found else "does not set"
        return f"{name} {verb} it (options set: {', '.join(found) or 'none'})"

    lines += [
        "",
        "- **msgs/s, deliveries/s**: messages sent and received (private), or copies delivered "
        "to recipients (broadcast: each message reaches the 999 other users), per second "
        "from the start signal to the last one verified.",
        "- **CPU**: the server process's CPU time (user + system, all threads, from "
        "/proc/<pid>/stat, read by relaybench at its start signal and when the last message "
        "was verified: logins, JOINs and disconnections not counted) per message (private) or "
        "per delivery (broadcast), in µs: what one message costs the server's one core, "
        "whatever the rate. Rate x CPU is the share of its core the server used: below 100% "
        "the load generator (one core for every user) was the limit, not the server.",
        "- **p50, p99**: latency from a message's send to its arrival (broadcast: at its last "
        "recipient), in µs; pipelined runs measure queueing more than the server.",
        "- **configs**: bench/peers/ngircd.conf and bench/peers/inspircd.conf, written with a "
        "free port into the run's temporary directory: listening on 127.0.0.1 only, no DNS, "
        "ident or PAM per connection, no MOTD file, no limit on connections per address, and "
        "the flood limits lifted (ngIRCd: `MaxPenaltyTime = 0` and user mode F for everyone "
        "through `DefaultUserModes`; InspIRCd: a penalty threshold no client reaches and "
        "fakelag off, 16 MB send and receive queues); relaychat runs with its defaults.",
        "- **TCP_NODELAY** (socket options each server set on a client's connection, seen by "
        "`strace -f -e trace=setsockopt` attached while one user logged in): "
        + "; ".join(told(name) for name in names)
        + ". relaybench sets it on its own sockets.",
    ]
    return lines


PEERS_PREFIX = "peers: "


# --- the report --------------------------------------------------------------------------------


def fmt(v: float) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"


def summary(runs: list[dict]) -> dict[str, str]:
    out = {}
    for key in runs[0]:
        values = [r[key] for r in runs]
        if len(values) == 1:
            out[key] = fmt(values[0])
        else:
            out[key] = f"{fmt(statistics.median(values))} ({fmt(min(values))}-{fmt(max(values))})"
    return out


def machine() -> list[str]:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = int(Path("/proc/meminfo").read_text().split()[1]) // 1024 // 1024
    rustc = subprocess.run(["rustc", "--version"], capture_output=True, text=True).stdout.strip()
    return [
        f"- CPU: {cpu}, {os.cpu_count()} cores; memory {mem} GiB; Linux {platform.release()}",
        f"- {rustc}; Python {platform.python_version()}",
        f"- open files (hard limit): {os.popen('ulimit -Hn').read().strip()}",
        "- placement: server (and the trivial relay) pinned to CPU 0 with `taskset -c 0`; "
        "load generator and Python bots pinned to CPU 1 with `taskset -c 1`"
        + ("" if shutil.which("taskset") else " (taskset missing: NOT pinned)"),
    ]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, one run each")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "docs" / "BENCHMARKS.md"))
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument(
        "--only",
        metavar="TEXT",
        action="append",
        help="run only the scenarios whose name contains TEXT (repeatable); for quick checks, "
        "the table written is partial",
    )
    ap.add_argument(
        "--peers",
        action="store_true",
        help="also run relaychat beside ngIRCd and InspIRCd (configs in bench/peers/): three "
        f"scenarios named '{PEERS_PREFIX}...' on all three servers, and a section comparing "
        "them; installs the Debian packages ngircd and inspircd with apt-get update && "
        "apt-get install -y if they are missing (as root; only with --peers)",
    )
    args = ap.parse_args()
    if args.peers:
        install_peers()
    if not args.no_build:
        cargo = ["cargo", "build", "--release", "--quiet", "--features", "bench"]
        subprocess.run([*cargo, "--bin", "relaybench"], cwd=REPO, check=True)
    s = args.smoke
    runs = 1 if s else args.runs
    gb, hundred_mb = (10_000_000, 5_000_000) if s else (1_000_000_000, 100_000_000)
    quarter_gb = 2_000_000 if s else 256_000_000

    def n(smoke: int, full: int) -> str:
        return str(smoke if s else full)

    private_args = ["--pairs", "50", "--messages"]
    fanout_args = ["--senders", "5", "--messages"]
    # 1,000 users (4 source addresses), 5 senders pipelining 256 broadcasts each.
    fanout_1000 = ["--users", n(100, 1000), *fanout_args, n(20, 4000), "--window", "256"]
    fanout_1000 += ["--sources", "4"]
    scenarios = [
        ("relay limit: 1 GB through a trivial relay", lambda t: relay_limit(gb, t)),
        ("file: 1 GB to one user", lambda t: file_relay(gb, 1, t)),
        ("file: 1 GB to one user over TLS", lambda t: file_relay(gb, 1, t, tls=True)),
        ("file: 100 MB to a group of 5", lambda t: file_relay(hundred_mb, 5, t)),
        (
            "file: 256 MB of text, our Client to our Client (checked), plain body",
            lambda t: checked_file(quarter_gb, "plain", t),
        ),
        (
            "file: 256 MB of text, our Client to our Client (checked), zstd body",
            lambda t: checked_file(quarter_gb, "zstd", t),
        ),
        ("costs on one core: BLAKE3 and zstd, 256 MB each", lambda t: codec(quarter_gb, t)),
        (
            "private, 50 pairs, closed loop",
            lambda t: messages("private", t, *private_args, n(40, 4000)),
        ),
        (
            "broadcast, 50 users, 5 senders, closed loop",
            lambda t: messages("broadcast", t, "--users", "50", *fanout_args, n(20, 2000)),
        ),
        (
            "broadcast, 1000 users, 5 senders, pipelined (window 256)",
            lambda t: messages("broadcast", t, *fanout_1000),
        ),
        (
            "private, 50 pairs, pipelined (window 64), --history off",
            lambda t: history_cost(False, int(n(200, 40000)), t),
        ),
        (
            "private, 50 pairs, pipelined (window 64), over TLS, --history off",
            lambda t: history_cost(False, int(n(200, 40000)), t, tls=True),
        ),
        (
            "private, 50 pairs, pipelined (window 64), --history off, through a pass-through "
            "message hook (bench/passthrough.py)",
            lambda t: history_cost(False, int(n(200, 40000)), t, flags=("--plugin", PASSTHROUGH)),
        ),
        (
            "private, 50 pairs, closed loop, through a pass-through message hook",
            lambda t: messages(
                "private", t, *private_args, n(40, 4000), flags=("--plugin", PASSTHROUGH)
            ),
        ),
        (
            "private, 50 pairs, pipelined (window 64), history on (default; every message "
            "checked in it afterwards)",
            lambda t: history_cost(True, int(n(200, 40000)), t),
        ),
        (
            "inbox: 100,000 messages queued by 100 senders, then their owner logs in",
            lambda t: inbox(int(n(1000, 100_000)), int(n(10, 100)), t),
        ),
        (
            "logins: 50,000 private msgs/s offered, alone and with 20 logins/s (argon2id)",
            lambda t: logins_vs_chat(20, int(n(40, 4000)), t),
        ),
        (
            "storm: 200 users each pipelining 200 broadcasts at once",
            lambda t: storm(int(n(20, 200)), int(n(20, 200)), t),
        ),
        (
            "connect: 9,500 idle users (19,000 sockets) from 16 addresses",
            lambda t: connect_users(int(n(50, 9500)), 16, int(n(20, 1200)), t),
        ),
        (
            "connect: 5,000 idle TLS users (10,000 TLS sockets) from 16 addresses",
            lambda t: connect_users(int(n(50, 5000)), 16, 0, t, tls=True),
        ),
        (
            "TLS handshakes per second, server pinned to one core (64 at a time)",
            lambda t: tls_handshakes(int(n(200, 10_000)), 64, t),
        ),
        (
            "churn: 20 x 200 users in and out",
            lambda t: churn(int(n(2, 20)), int(n(20, 200)), t),
        ),
        ("Python bot, relaychat.Client", lambda t: python_bot("sync", int(n(2000, 500_000)), t)),
        (
            "Python bot, relaychat.AsyncClient",
            lambda t: python_bot("async", int(n(2000, 500_000)), t),
        ),
    ]
    if args.peers:
        per_pair, per_sender = n(40, 4000), n(400, 20000)
        scenarios += [
            (
                f"{PEERS_PREFIX}private, 50 pairs, closed loop (window 1)",
                lambda t: beside("private", t, *private_args, per_pair),
            ),
            (
                f"{PEERS_PREFIX}private, 50 pairs, pipelined (window 32)",
                lambda t: beside("private", t, *private_args, per_sender, "--window", "32"),
            ),
            (
                f"{PEERS_PREFIX}broadcast, 1000 users, 5 senders, pipelined (window 256)",
                lambda t: beside("broadcast", t, *fanout_1000),
            ),
        ]
    # A TLS (or hooked) scenario's rate as a share of its twin's in this same run: the ratio
    # of the two medians (twin scenario, figure, what the twin is).
    twins = {
        "file: 1 GB to one user over TLS": (
            "file: 1 GB to one user",
            "MB/s (slowest receiver)",
            "plain text",
        ),
        "private, 50 pairs, pipelined (window 64), over TLS, --history off": (
            "private, 50 pairs, pipelined (window 64), --history off",
            "msgs/s",
            "plain text",
        ),
        "private, 50 pairs, pipelined (window 64), --history off, through a pass-through "
        "message hook (bench/passthrough.py)": (
            "private, 50 pairs, pipelined (window 64), --history off",
            "msgs/s",
            "no hook",
        ),
    }
    if args.only:
        scenarios = [(name, fn) for name, fn in scenarios if any(o in name for o in args.only)]
    results = []
    raw: dict[str, list[dict]] = {}
    peers = any(name.startswith(PEERS_PREFIX) for name, _ in scenarios)
    with tempfile.TemporaryDirectory(prefix="relaybench-") as tmp:
        options = socket_options(Path(tmp)) if peers else {}
        for name, fn in scenarios:
            figures = raw[name] = [fn(Path(tmp)) for _ in range(runs)]
            figs = summary(figures)
            if name in twins and twins[name][0] in raw:
                twin, key, label = twins[name]
                ratio = statistics.median(f[key] for f in figures) / statistics.median(
                    f[key] for f in raw[twin]
                )
                figs[f"{key} vs {label} (medians)"] = f"{ratio:.0%}"
            results.append((name, figs))
            print(f"{name}: {results[-1][1]}", flush=True)
    command = "python bench/run.py" + (" --smoke" if s else f" --runs {runs}")
    command += " --peers" if args.peers else ""
    lines = [
        "# relaychat benchmarks",
        "",
        f"Made by `{command}` on {time.strftime('%Y-%m-%d')}: median (min-max) of {runs} "
        "run(s), a fresh server for every run. Every run verified that each message and byte "
        "arrived exactly once.",
        "",
        *machine(),
        "",
        "| scenario | figures |",
        "|---|---|",
    ]
    for name, figs in results:
        lines.append(f"| {name} | " + "; ".join(f"{k}: {v}" for k, v in figs.items()) + " |")
    if peers:
        beside_results = [(name, f) for name, f in results if name.startswith(PEERS_PREFIX)]
        lines += peers_section(beside_results, options, runs)
    if not s:  # the analysis is about the full run's figures
        lines += ["", (REPO / "bench" / "NOTES.md").read_text().rstrip()]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
