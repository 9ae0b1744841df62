"""Hardening (docs/SECURITY.md): quotas, disk space, connection limits, stalled peers,
hostile bytes at scale, a hostile server, and processes killed mid-transfer. Each test
checks the offender's error line (or clean close) and that everyone else is unaffected."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from relaychat import (
    Client,
    FileFailed,
    FileIncoming,
    FileReceived,
    NoFileSocket,
    Server,
    ServerError,
    Welcome,
)

from tests.conftest import (
    FILE_TIMEOUT,
    HOST,
    TIMEOUT,
    Net,
    Wire,
    drain,
    file_arrival,
    next_of,
    start_server,
    stop_server,
    vm,
    wait_until,
)


def error_on(chat: Wire) -> str:
    """The next `ERROR:` line on a chat connection (acknowledgements may come first)."""
    return chat.lines_until(lambda line: line.startswith("ERROR:"))[-1]


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


# --- quotas and disk space -----------------------------------------------------------------


def test_the_per_user_quota_refuses_an_upload_and_skips_its_body(limited, tmp_path):
    net = limited(user_quota=1500)
    alice_chat = net.chat("alice")
    alice_files = net.file("alice")
    bob = net.client("bob")
    alice_files.send(b"alice|bob|one.bin|1000\n" + b"1" * 1000)
    assert file_arrival(bob)[1].size == 1000
    alice_files.send(b"alice|bob|two.bin|1000\n" + b"2" * 1000)
    assert error_on(alice_chat) == (
        "ERROR: upload quota exceeded: 1000 of 1500 bytes used, this file needs 1000"
    )
    # The refused body was skipped: the connection is in step and others still have room.
    alice_files.send(b"alice|bob|small.bin|400\n" + b"3" * 400)
    assert file_arrival(bob)[1].path.read_bytes() == b"3" * 400
    carol = net.client("carol")
    carol_file = tmp_path / "c.bin"
    carol_file.write_bytes(b"c" * 1400)
    carol.send_file("bob", carol_file)
    assert file_arrival(bob)[1].sender == "carol"
    assert not (tmp_path / "data" / "received_from_alice_two.bin").exists()


def test_an_upload_that_would_fill_the_disk_is_refused(limited, tmp_path):
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    net = limited(min_free_disk=free)  # any upload would eat into the reserve
    alice_chat = net.chat("alice")
    alice_files = net.file("alice")
    bob = net.client("bob")
    alice_files.send(b"alice|bob|any.bin|10\n" + b"x" * 10)
    assert error_on(alice_chat) == "ERROR: not enough disk space on the server for this file"
    assert [e.line for e in drain(bob, net.client("carol"))] == []


# --- connection limits ----------------------------------------------------------------------


def test_connections_over_the_total_limit_are_refused_and_the_rest_go_on(limited):
    net = limited(max_connections=3)
    alice = net.client("alice")  # two connections
    bob_chat = net.chat("bob")  # the third
    extra = net.wire("chat", "extra")
    assert extra.expect_closed() == b"ERROR: the server is full; try again later\n"
    alice.msg("bob", "still here")
    bob_chat.expect("[PRIVATE from alice]: still here")


def test_connections_over_the_per_address_limit_are_refused(limited):
    net = limited(max_per_address=2)
    alice = net.client("alice")  # two connections from 127.0.0.1
    extra = net.wire("chat", "extra")
    assert extra.expect_closed() == b"ERROR: too many connections from your address\n"
    # Another address still gets in (all of 127/8 is this machine).
    other = net.adopt(Wire(net.server.chat_port, "other", source="127.0.0.2"))
    other.send("bob\n")
    other.expect("Welcome, bob!")
    alice.msg("bob", "hi")
    other.expect("[PRIVATE from alice]: hi")


# --- stalled peers --------------------------------------------------------------------------


def test_a_recipient_that_stops_reading_its_file_socket_is_dropped_after_the_send_timeout(
    limited, tmp_path
):
    net = limited(send_timeout=0.5)
    alice, bob = net.client("alice"), net.client("bob")
    sleepy_chat = net.chat("sleepy")
    sleepy_files = net.adopt(Wire(net.server.file_port, "sleepy/file", rcvbuf=4096))
    sleepy_files.send("sleepy\n")
    assert sleepy_files.recv_exact(22, TIMEOUT) == b"FILE_SOCKET_CONNECTED\n"
    for c in (alice, bob):
        c.join("team")
    sleepy_chat.send("join team\n")
    sleepy_chat.expect("You joined group 'team'")
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(16 << 20))
    assert alice.send_file("GROUP:team", big) == 16 << 20
    assert file_arrival(bob)[1].path.read_bytes() == big.read_bytes()
    # sleepy reads nothing (reading would be progress). Once a write to it has made no
    # progress for 0.5 s its file connection is dropped: files to it then find none.
    tiny = tmp_path / "tiny.txt"
    tiny.write_bytes(b"?")
    deadline = time.monotonic() + FILE_TIMEOUT
    seen = []
    while True:
        assert time.monotonic() < deadline, "sleepy's file connection was never dropped"
        alice.send_file("sleepy", tiny)
        event = alice.next_event(timeout=0.2)
        seen.append(event)
        if isinstance(event, NoFileSocket):
            assert event.user == "sleepy"
            break
    # alice is told what was not delivered: the big file, and any probe still queued.
    errors = [e.reason for e in seen if isinstance(e, ServerError)]
    expected = "'big.bin' could not be delivered to sleepy: the recipient read nothing for 500ms"
    assert expected in errors
    sleepy_files.expect_closed(timeout=FILE_TIMEOUT)
    sleepy_chat.expect("[FILE] alice sent file 'big.bin' to group 'team'.")


PAD = "p" * 300


def test_tens_of_thousands_of_broadcasts_reach_every_reader_while_one_never_reads(net):
    """One client never reads its chat socket while others exchange 30,000 broadcasts
    (9 MB, more than its queue and socket buffers hold): the readers get every message;
    the non-reader is dropped, nobody waits for it."""
    readers = [net.client(name) for name in ("ann", "ben", "cat")]
    sleepy = net.adopt(Wire(net.server.chat_port, "sleepy", rcvbuf=4096))
    sleepy.send("sleepy\n")
    sleepy.expect("Welcome, sleepy!")
    flood = net.chat("flood")
    per_batch, batches = 1000, 30
    for b in range(batches):
        flood.send("".join(f"broadcast m{b * per_batch + i} {PAD}\n" for i in range(per_batch)))
    # The server answers in order: once `list` is answered, every broadcast is queued.
    flood.send("list\n")
    flood.lines_until(lambda line: line.startswith("Connected users: "), timeout=FILE_TIMEOUT)
    for reader in readers:
        got = drain(reader, readers[0] if reader is not readers[0] else readers[1])
        texts = [e.text for e in got]
        assert texts == [f"m{i} {PAD}" for i in range(per_batch * batches)], reader.username
    assert "sleepy" not in readers[0].list_users()
    sleepy.expect_closed(timeout=FILE_TIMEOUT)


# --- hostile bytes at scale -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("port", "login", "answer"),
    [
        ("chat", None, "ERROR: line longer than 65536 bytes"),
        ("chat", "mallory\n", "ERROR: line longer than 65536 bytes"),
        ("file", None, "ERROR: line longer than 4096 bytes"),
    ],
)
def test_tens_of_megabytes_without_a_newline_are_cut_off_with_bounded_memory(
    tmp_path, port, login, answer
):
    proc, ports, _ = start_server(tmp_path)
    try:
        with Wire(ports["CHAT"], "bob") as bob, Wire(ports[port.upper()], "mallory") as wire:
            bob.send("bob\n")
            bob.expect("Welcome, bob!")
            if login:
                wire.send(login)
                wire.expect("Welcome, mallory!")
            chunk = b"A" * (1 << 20)
            before = vm("VmHWM", proc.pid)
            sent = 0
            try:
                for _ in range(32):
                    wire.send(chunk)
                    sent += len(chunk)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server closed the connection part-way: that is the point
            assert wire.expect_closed(timeout=FILE_TIMEOUT).decode().startswith(answer)
            # The server buffered at most one line's worth, not what was sent.
            grew = vm("VmHWM", proc.pid) - before
            assert grew < 16 * 1024, f"server memory grew {grew} KiB while {sent} B came"
            bob.send("list\n")
            bob.expect("Connected users: ")
    finally:
        assert stop_server(proc) == 0


def test_a_file_connection_cannot_sign_uploads_with_another_name(net):
    bob = net.client("bob")
    net.chat("mallory")
    mallory_files = net.file("mallory")
    mallory_files.send(b"alice|bob|from-alice.txt|3\nhey")
    notice, received = file_arrival(bob)
    assert notice.sender == received.sender == "mallory"
    assert received.path.name == "received_from_mallory_from-alice.txt"


# --- a hostile server ---------------------------------------------------------------------------


def test_a_hostile_server_cannot_make_the_client_write_outside_its_download_dir(tmp_path):
    """A fake server forwards `../` names and then an honest file; the client refuses the
    first (skipping its body), receives the second, and writes nothing outside."""
    chat_srv = socket.create_server((HOST, 0))
    file_srv = socket.create_server((HOST, 0))
    evil_body = b"owned!"

    def serve() -> None:
        chat, _ = chat_srv.accept()
        with chat:
            chat.recv(1024)
            chat.sendall(b"Welcome, victim!\n")
            files, _ = file_srv.accept()
            with files:
                files.recv(1024)
                files.sendall(b"FILE_SOCKET_CONNECTED\n")
                for name in ("../escape.txt", "/tmp/abs.txt", "..", "a\\..\\b"):
                    files.sendall(f"evil|{name}|{len(evil_body)}\n".encode() + evil_body)
                files.sendall(b"../evil|x.txt|6\n" + evil_body)
                files.sendall(b"friend|fine.txt|4\nokay")
                chat.recv(1024)  # the acknowledgement of fine.txt
                chat.recv(1024)  # until the client goes

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    downloads = tmp_path / "inner" / "downloads"
    with Client(
        HOST,
        chat_srv.getsockname()[1],
        file_srv.getsockname()[1],
        username="victim",
        download_dir=downloads,
    ) as victim:
        assert isinstance(victim.next_event(timeout=TIMEOUT), Welcome)
        failures = [next_of(victim, FileFailed) for _ in range(5)]
        assert all("ignored a file header" in f.reason for f in failures)
        received = next_of(victim, FileReceived)
        assert received.path == downloads / "received_from_friend_fine.txt"
        assert received.path.read_bytes() == b"okay"
    chat_srv.close()
    file_srv.close()
    thread.join(timeout=TIMEOUT)
    assert sorted(p.name for p in downloads.iterdir()) == ["received_from_friend_fine.txt"]
    assert sorted(p.name for p in (tmp_path / "inner").iterdir()) == ["downloads"]
    assert not Path("/tmp/abs.txt").exists() or Path("/tmp/abs.txt").read_bytes() != evil_body


# --- processes killed mid-transfer ----------------------------------------------------------------


def test_sigterm_mid_upload_exits_0_and_leaves_no_partial_file(tmp_path):
    spool = tmp_path / "data"
    spool.mkdir()
    stale = spool / ".relaychat-upload-999.part"
    stale.write_bytes(b"left by a killed server")
    proc, ports, out = start_server(tmp_path)
    try:
        assert not stale.exists(), "a stale spool file survived the start"
        assert any(line.startswith("[LIMITS] open files ") for line in out), out
        with Wire(ports["CHAT"], "alice") as chat, Wire(ports["FILE"], "alice") as files:
            chat.send("alice\n")
            chat.expect("Welcome, alice!")
            files.send("alice\n")
            assert files.recv_exact(22) == b"FILE_SOCKET_CONNECTED\n"
            files.send(b"alice|alice|half.bin|1000000\n" + b"h" * 500_000)
            wait_until(lambda: any(spool.glob(".relaychat-upload-*.part")), what="spooling")
            assert stop_server(proc) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert list(spool.iterdir()) == []


DOOMED_CLIENT = """
import socket, sys, time
chat = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
chat.sendall(b"doomed\\n")
assert chat.recv(100) == b"Welcome, doomed!\\n"
files = socket.create_connection(("127.0.0.1", int(sys.argv[2])))
files.sendall(b"doomed\\n")
assert files.recv(100) == b"FILE_SOCKET_CONNECTED\\n"
files.sendall(b"doomed|watcher|big.bin|10000000\\n" + b"d" * 5000000)
print("half sent", flush=True)
time.sleep(600)
"""


def test_a_client_killed_mid_upload_hurts_nobody(tmp_path):
    proc, ports, _ = start_server(tmp_path)
    try:
        net_server = type("Ports", (), {"chat_port": ports["CHAT"], "file_port": ports["FILE"]})
        net = Net(net_server, tmp_path)
        try:
            watcher = net.client("watcher")
            other = net.client("other")
            args = [str(ports["CHAT"]), str(ports["FILE"])]
            doomed = subprocess.Popen(
                [sys.executable, "-c", DOOMED_CLIENT, *args], stdout=subprocess.PIPE, text=True
            )
            with doomed.stdout:
                assert doomed.stdout.readline() == "half sent\n"
                assert next_of(watcher, FileIncoming, FILE_TIMEOUT).sender == "doomed"
                doomed.kill()
                doomed.wait(timeout=TIMEOUT)
            assert isinstance(watcher.next_event(timeout=FILE_TIMEOUT), FileFailed)
            other.msg("watcher", "still alive?")
            got = drain(watcher, other)
            assert [e.line for e in got] == ["[PRIVATE from other]: still alive?"]
            wait_until(lambda: "doomed" not in other.list_users(), what="doomed is gone")
            data = tmp_path / "data"
            wait_until(lambda: not list(data.glob(".relaychat-upload-*")), what="spool removed")
            assert not (data / "received_from_doomed_big.bin").exists()
            assert not list(net.downloads("watcher").glob("received_from_doomed*"))
        finally:
            net.close()
        assert proc.poll() is None, "the server died"
    finally:
        assert stop_server(proc) == 0


def test_the_server_stays_small_when_many_users_connect_and_leave(tmp_path):
    """Churn: 10 rounds of 50 users logging in, chatting and leaving (half by reset)."""
    proc, ports, _ = start_server(tmp_path)
    try:
        fds = lambda: len(os.listdir(f"/proc/{proc.pid}/fd"))  # noqa: E731
        start_fds = None
        for round_ in range(10):
            wires = []
            for i in range(50):
                w = Wire(ports["CHAT"], f"u{i}")
                w.send(f"u{round_}_{i}\n")
                wires.append(w)
            for w in wires:
                assert w.line().startswith("Welcome, ")
            wires[0].send("broadcast hello\n")
            for w in wires[1:]:
                assert w.line().startswith("[BROADCAST from ")
            for i, w in enumerate(wires):
                if i % 2:
                    w.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
                w.close()
            if start_fds is None:
                wait_until(lambda: fds() < 20, what="connections closed")
                start_fds = fds()
                start_rss = vm("VmRSS", proc.pid)
        wait_until(lambda: fds() <= start_fds, what="no leaked descriptors")
        assert vm("VmRSS", proc.pid) - start_rss < 5 * 1024
    finally:
        assert stop_server(proc) == 0
