"""Shared fixtures and helpers: a server on free ports, raw sockets read with deadlines
(`Wire`), lab-style and netcat-style logins, and connected `Client`s.

Every read has a deadline. Nothing here sleeps to let the server "catch up": tests wait for
an observable effect (a line, an event, a file) instead.
"""

from __future__ import annotations

import ipaddress
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest
from relaychat import (
    Client,
    FileIncoming,
    FileReceived,
    GroupFileIncoming,
    PrivateMessage,
    Server,
    Welcome,
)

HOST = "127.0.0.1"
#: The repository, where `server.py` and `client.py` live.
REPO = Path(__file__).resolve().parent.parent
#: How long to wait for anything the server should do promptly.
TIMEOUT = 5.0
#: How long to wait for a whole file transfer.
FILE_TIMEOUT = 30.0
#: The file port's greeting, sent alone after the username.
FILE_GREETING = b"FILE_SOCKET_CONNECTED\n"
#: After a file header whose body length is unknown, the server discards input until this
#: much quiet (docs/PROTOCOL.md §5).
RESYNC_QUIET = 0.2
#: The marker text `drain` sends to close off an inbox.
MARK = "--end-of-inbox--"


class Wire:
    """One raw TCP connection to the server, as netcat or the lab's client would hold it.

    Reads go through a buffer, so header lines and raw file bytes can be mixed, and each
    read waits at most until its deadline.
    """

    def __init__(
        self,
        port: int,
        name: str = "wire",
        *,
        rcvbuf: int | None = None,
        source: str | None = None,
        tls: ssl.SSLContext | None = None,
        host: str = HOST,
    ) -> None:
        self.name = name
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            if rcvbuf is not None:
                # Set before connecting, so the advertised window stays small.
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            if source is not None:
                # Another loopback address (all of 127/8 is local on Linux).
                self.sock.bind((source, 0))
            self.sock.settimeout(TIMEOUT)
            self.sock.connect((host, port))
            # Each send leaves as its own segment, at once (as the tests intend it).
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if tls is not None:
                # Python's own TLS (OpenSSL): a third-party client of the server's TLS.
                self.sock = tls.wrap_socket(self.sock, server_hostname="localhost")
        except OSError:
            self.sock.close()
            raise
        self.buf = bytearray()

    def __repr__(self) -> str:
        return f"Wire({self.name})"

    def __enter__(self) -> Wire:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes | str) -> None:
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def _fill(self, deadline: float, what: str) -> None:
        """Reads once more into the buffer; fails at the deadline or at end of stream."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(
                f"{self}: timed out waiting for {what}; buffered {bytes(self.buf)[:300]!r}"
            )
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(1 << 20)
        except socket.timeout:
            raise AssertionError(
                f"{self}: timed out waiting for {what}; buffered {bytes(self.buf)[:300]!r}"
            ) from None
        if not chunk:
            raise AssertionError(
                f"{self}: connection closed while waiting for {what}; "
                f"buffered {bytes(self.buf)[:300]!r}"
            )
        self.buf += chunk

    def recv_once(self, timeout: float = TIMEOUT) -> bytes:
        """Exactly one `recv`, as the lab's client reads its file-socket greeting."""
        assert not self.buf, f"{self}: unread bytes {bytes(self.buf)!r}"
        self.sock.settimeout(timeout)
        return self.sock.recv(4096)

    def line(self, timeout: float = TIMEOUT) -> str:
        """The next line, decoded, without its `\\n` (a `\\r` would be kept and noticed)."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            self._fill(deadline, "a line")
        end = self.buf.index(b"\n")
        raw = bytes(self.buf[:end])
        del self.buf[: end + 1]
        return raw.decode()

    def expect(self, text: str, timeout: float = TIMEOUT) -> None:
        got = self.line(timeout)
        assert got == text, f"{self}: expected {text!r}, got {got!r}"

    def lines_until(self, pred: Callable[[str], bool], timeout: float = TIMEOUT) -> list[str]:
        """Every line up to and including the first one that satisfies `pred`."""
        deadline = time.monotonic() + timeout
        out = []
        while True:
            out.append(self.line(max(deadline - time.monotonic(), 0.001)))
            if pred(out[-1]):
                return out

    def recv_exact(self, n: int, timeout: float = FILE_TIMEOUT) -> bytes:
        deadline = time.monotonic() + timeout
        while len(self.buf) < n:
            self._fill(deadline, f"{n} bytes (have {len(self.buf)})")
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    def expect_closed(self, timeout: float = TIMEOUT) -> bytes:
        """Waits for the server to close the connection; returns what came before."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"{self}: still open after {timeout}s"
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(1 << 16)
            except socket.timeout:
                raise AssertionError(f"{self}: still open after {timeout}s") from None
            except (ConnectionResetError, ssl.SSLEOFError):
                chunk = b""  # (TLS: closed without close_notify)
            if not chunk:
                data = bytes(self.buf)
                self.buf.clear()
                return data
            self.buf += chunk

    def assert_silent(self, duration: float = 0.2) -> None:
        """Nothing arrives for `duration` seconds. Use sparingly: prefer a marker."""
        assert not self.buf, f"{self}: unexpected {bytes(self.buf)!r}"
        self.sock.settimeout(duration)
        try:
            chunk = self.sock.recv(4096)
        except socket.timeout:
            return
        raise AssertionError(f"{self}: expected silence, got {chunk!r}")


def wait_until(pred: Callable[[], object], timeout: float = TIMEOUT, what: str = "") -> None:
    """Polls `pred` until it is true (for state with no event, such as files on disk)."""
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting until {what or pred}"
        time.sleep(0.005)


#: The server's own files in its data directory (its SQLite store), beside saved copies.
STORE_FILES = {"relaychat.db", "relaychat.db-wal", "relaychat.db-shm", "relaychat.db.lock"}


def saved(directory: Path) -> list[str]:
    """The names in a data directory, sorted, without the server's store files."""
    return sorted(p.name for p in directory.iterdir() if p.name not in STORE_FILES)


def server_copy(path: Path) -> bytes:
    """The server's saved copy at `path`. It is renamed into place right after the last
    byte is on disk, which a recipient reading the cut-through forward may beat."""
    wait_until(path.exists, what=f"{path.name} is saved")
    return path.read_bytes()


def next_of(client: Client, kind: type, timeout: float = TIMEOUT):
    """The client's next event, which must be a `kind`."""
    event = client.next_event(timeout=timeout)
    assert isinstance(event, kind), f"{client.username}: expected {kind.__name__}, got {event!r}"
    return event


def take(client: Client, n: int, timeout: float = FILE_TIMEOUT) -> list:
    """The client's next `n` events."""
    events = []
    for _ in range(n):
        event = client.next_event(timeout=timeout)
        assert event is not None, f"{client.username}: only {events!r} of {n} events came"
        events.append(event)
    return events


def file_arrival(client: Client, timeout: float = FILE_TIMEOUT) -> tuple:
    """The chat notice and the `FileReceived` of one incoming file, as `(notice, received)`.

    They come over two sockets, so either may be reported first.
    """
    events = take(client, 2, timeout)
    notices = [e for e in events if isinstance(e, (FileIncoming, GroupFileIncoming))]
    received = [e for e in events if isinstance(e, FileReceived)]
    assert len(notices) == 1 and len(received) == 1, f"{client.username}: {events!r}"
    return notices[0], received[0]


def drain(recipient: Client, via: Client) -> list:
    """Everything `recipient` still gets before a marker `via` sends it now.

    A chat connection's lines arrive in the order the server queued them, so once the
    marker arrives, every line the server queued for `recipient` before it has arrived too.
    """
    via.msg(recipient.username, MARK)
    events = []
    deadline = time.monotonic() + TIMEOUT
    while True:
        event = recipient.next_event(timeout=max(deadline - time.monotonic(), 0.001))
        assert event is not None, f"{recipient.username}: the marker never came; got {events!r}"
        if isinstance(event, PrivateMessage) and event.text == MARK:
            assert event.sender == via.username
            return events
        events.append(event)


def drain_wire(wire: Wire, user: str, via: Client) -> list[str]:
    """`drain` for a raw chat connection logged in as `user`."""
    via.msg(user, MARK)
    marker = f"[PRIVATE from {via.username}]: {MARK}"
    return wire.lines_until(lambda line: line == marker)[:-1]


def lines(events: Iterable) -> Counter:
    """The events' `.line`s as a multiset (events from two sockets have no fixed order)."""
    return Counter(event.line for event in events)


def random_file(path: Path, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(size))
    return path


class Net:
    """Opens raw connections and Clients to one server; closes them all at teardown."""

    def __init__(self, server: Server, root: Path) -> None:
        self.server = server
        self.root = root
        self._wires: list[Wire] = []
        self._clients: list[Client] = []

    def wire(self, port: str, name: str = "wire", tls: ssl.SSLContext | None = None) -> Wire:
        """A raw connection to the `"chat"` or `"file"` port, not logged in (over TLS with
        `tls`)."""
        number = self.server.chat_port if port == "chat" else self.server.file_port
        wire = Wire(number, f"{name}/{port}", tls=tls)
        self._wires.append(wire)
        return wire

    def chat(self, name: str, *, lab: bool = False, tls: ssl.SSLContext | None = None) -> Wire:
        """A chat connection logged in as `name`: netcat-style (`name\\n`), or lab-style
        (the bare name, no newline, as the lab's client sends it)."""
        wire = self.wire("chat", name, tls)
        wire.send(name if lab else f"{name}\n")
        wire.expect(f"Welcome, {name}!")
        return wire

    def file(self, name: str, *, lab: bool = False, tls: ssl.SSLContext | None = None) -> Wire:
        """A file connection logged in as `name` (greeting consumed). The server accepts it
        only for a live chat session of that name from the same address: log in on chat
        first."""
        wire = self.wire("file", name, tls)
        wire.send(name if lab else f"{name}\n")
        assert wire.recv_exact(len(FILE_GREETING), TIMEOUT) == FILE_GREETING
        return wire

    def adopt(self, wire: Wire) -> Wire:
        """Closes `wire` at teardown too."""
        self._wires.append(wire)
        return wire

    def adopt_client(self, client: Client) -> Client:
        """Closes `client` at teardown too."""
        self._clients.append(client)
        return client

    def downloads(self, name: str) -> Path:
        return self.root / "downloads" / name

    def client(self, name: str, password: str | None = None, **options) -> Client:
        """A `Client` logged in as `name` (with `password` for a registered name, and any
        other `Client` keyword, e.g. `tls_ca`), its `Welcome` event consumed."""
        client = Client(
            options.pop("host", HOST),
            self.server.chat_port,
            self.server.file_port,
            username=name,
            download_dir=self.downloads(name),
            timeout=TIMEOUT,
            password=password,
            **options,
        )
        self._clients.append(client)
        welcome = next_of(client, Welcome)
        assert welcome.user == name
        return client

    def close(self) -> None:
        for client in self._clients:
            client.close()
        for wire in self._wires:
            wire.close()


#: The password the account helpers register with.
PASSWORD = "s3cret-pass"


def register(net: Net, name: str, password: str = PASSWORD) -> None:
    """Registers `name` from a guest session, then leaves (and waits until the server has
    seen it leave)."""
    wire = net.chat(name)
    wire.send(f"register {password}\n")
    wire.expect(f"Registered {name}.")
    wire.close()
    wait_gone(net, name)


def wait_gone(net: Net, name: str) -> None:
    """Waits until the server has seen `name`'s chat connection close."""
    probe = net.chat(f"probe-{name}")
    wait_until(lambda: name not in connected(probe), what=f"{name} has left")
    probe.close()


def connected(wire: Wire) -> list[str]:
    wire.send("list\n")
    return wire.line().removeprefix("Connected users: ").split(", ")


def log_in(net: Net, name: str, password: str = PASSWORD, *, lab: bool = False) -> Wire:
    """A raw chat connection logged in with a password (lab-style: no newlines)."""
    return password_login(net.wire("chat", name), name, password, lab=lab)


def log_in_at(port: int, name: str, password: str = PASSWORD) -> Wire:
    """`log_in` to a server known only by its chat port (a `server.py` process)."""
    return password_login(Wire(port, name), name, password)


def password_login(wire: Wire, name: str, password: str, *, lab: bool = False) -> Wire:
    wire.send(name if lab else f"{name}\n")
    wire.expect(f"Password for {name}:")
    wire.send(password if lab else f"{password}\n")
    wire.expect(f"Welcome, {name}!")
    return wire


def vm(field: str, pid: int | str = "self") -> int:
    """A memory figure of a process, in KiB, from /proc/<pid>/status."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+) kB", status).group(1))


def start_server(tmp_path: Path, *extra: str) -> tuple[subprocess.Popen, dict, list]:
    """`server.py` on free ports; returns the process, its ports and its output lines."""
    args = ["--chat-port", "0", "--file-port", "0", "--data-dir", str(tmp_path / "data")]
    proc = subprocess.Popen(
        [sys.executable, "-u", "server.py", *args, *extra],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    out: list[str] = []
    ports: dict[str, int] = {}
    ready = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            out.append(line.rstrip("\n"))
            m = re.match(r"\[(CHAT|FILE) SERVER\] Listening on (\d+)", line)
            if m:
                ports[m.group(1)] = int(m.group(2))
                if len(ports) == 2:
                    ready.set()

    threading.Thread(target=read, daemon=True).start()
    assert ready.wait(TIMEOUT * 2), f"server did not start: {out}"
    return proc, ports, out


def stop_server(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=TIMEOUT * 2)
    finally:
        proc.stdout.close()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """Where the `server` fixture saves uploads."""
    return tmp_path / "server-data"


@pytest.fixture
def server(data_dir: Path) -> Iterator[Server]:
    """A relaychat server on free ports, saving into `data_dir`; stopped afterwards."""
    srv = Server(HOST, 0, 0, data_dir)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def net(server: Server, tmp_path: Path) -> Iterator[Net]:
    """Raw connections and Clients to `server`, closed afterwards."""
    n = Net(server, tmp_path)
    try:
        yield n
    finally:
        n.close()


@pytest.fixture
def limited(tmp_path):
    """A server with small limits, and a `Net` to it."""
    servers = []

    def start(**limits) -> Net:
        srv = Server(HOST, 0, 0, tmp_path / "data", **limits)
        srv.start()
        net = Net(srv, tmp_path)
        servers.append((srv, net))
        return net

    yield start
    for srv, net in servers:
        net.close()
        srv.stop()


@pytest.fixture
def outside() -> str:
    """This machine's address on its network, to connect from as another machine would."""
    address = outside_address()
    if address is None:
        pytest.skip("this machine has no non-loopback address to connect from")
    return address


def outside_address() -> str | None:
    """This machine's address on its network (not loopback), if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # TEST-NET: nothing is sent, a route is chosen
            address = s.getsockname()[0]
        except OSError:
            return None
    return None if ipaddress.ip_address(address).is_loopback else address
