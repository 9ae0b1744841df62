"""Limits and hardening (docs/SECURITY.md): the connection gate, timeouts, send queues,
quotas, disk space, sizes, and resources over many connections. Each test checks the
offender's error line (or clean close) and that everyone else is unaffected."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest
from relaychat import FileFailed, FileIncoming, NoFileSocket, Server, ServerError

from tests.conftest import (
    FILE_TIMEOUT,
    HOST,
    TIMEOUT,
    Net,
    Wire,
    drain,
    file_arrival,
    next_of,
    saved,
    start_server,
    stop_server,
    vm,
    wait_until,
)


def error_on(chat: Wire) -> str:
    """The next `ERROR:` line on a chat connection (acknowledgements may come first)."""
    return chat.lines_until(lambda line: line.startswith("ERROR:"))[-1]


# --- the connection gate -----------------------------------------------------------------


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


# --- timeouts ----------------------------------------------------------------------------


def test_a_connection_that_never_sends_its_username_is_dropped(tmp_path):
    with (
        Server(HOST, 0, 0, tmp_path, handshake_timeout=0.3) as srv,
        Wire(srv.chat_port, "silent/chat") as chat,
        Wire(srv.file_port, "silent/file") as files,
    ):
        assert chat.expect_closed() == b"ERROR: no username within 0.3 s\n"
        assert files.expect_closed() == b"ERROR: no username within 0.3 s\n"


def test_an_upload_that_stalls_is_aborted(tmp_path):
    with Server(HOST, 0, 0, tmp_path / "data", transfer_timeout=0.3) as srv:
        net = Net(srv, tmp_path)
        try:
            bob = net.client("bob")
            net.chat("alice")
            alice_files = net.file("alice")
            alice_files.send(b"alice|bob|slow.bin|1000\n" + b"z" * 10)
            assert next_of(bob, FileIncoming).size == 1000
            # Nothing more comes: the server gives up on the upload and its forward.
            assert alice_files.expect_closed() == b""
            assert next_of(bob, FileFailed).reason
            wait_until(lambda: not saved(tmp_path / "data"), what="spool removed")
            assert not list(net.downloads("bob").iterdir())
        finally:
            net.close()


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


# --- send queues: readers that stop reading ----------------------------------------------


def test_a_user_who_stops_reading_is_dropped_and_nothing_is_lost_for_others(tmp_path):
    """Each chat connection has a bounded outbox; a reader that takes nothing for
    `send_timeout` is disconnected, and everyone else gets every message."""
    with Server(HOST, 0, 0, tmp_path / "data", send_queue=64, send_timeout=2.0) as srv:
        net = Net(srv, tmp_path)
        try:
            alice = net.client("alice")
            bob = net.client("bob")
            sleepy = Wire(srv.chat_port, "sleepy", rcvbuf=4096)
            net.adopt(sleepy)
            sleepy.send("sleepy\n")
            sleepy.expect("Welcome, sleepy!")
            line = "z" * 60_000
            sent = 0
            # Bursts smaller than the outbox, with a round trip between them: bob (who
            # reads) never has more than one burst queued; sleepy's socket buffers fill.
            while "sleepy" in alice.list_users():
                assert sent < 2000, "sleepy was never dropped"
                for _ in range(8):
                    alice.broadcast(line)
                    sent += 1
            got = drain(bob, alice)
            assert len(got) == sent
            assert all(e.line == f"[BROADCAST from alice]: {line}" for e in got)
            # sleepy's connection was closed by the server: whatever it reads now ends.
            sleepy.expect_closed(timeout=FILE_TIMEOUT)
            assert alice.list_users() == ["bob"]
        finally:
            net.close()


PAD = "p" * 300


def test_tens_of_thousands_of_broadcasts_reach_every_reader_while_one_never_reads(limited):
    """One client never reads its chat socket while others exchange 30,000 broadcasts
    (9 MB, more than its queue and socket buffers hold): the readers get every message;
    the non-reader is dropped once it has taken nothing for `send_timeout`, and nothing is
    lost for anyone else."""
    net = limited(send_timeout=2.0)
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


# --- quotas and disk space ---------------------------------------------------------------


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


def test_a_user_can_be_in_at_most_256_groups(net):
    """Joins are cheap to send in bulk; the memberships they create are bounded."""
    alice = net.chat("alice")
    alice.send("".join(f"join g{i}\n" for i in range(257)))
    for i in range(256):
        alice.expect(f"You joined group 'g{i}'")
    alice.expect("ERROR: you are in too many groups (at most 256)")
    alice.send("join g0\n")  # already a member: still fine
    alice.expect("You joined group 'g0'")


# --- sizes: files and lines --------------------------------------------------------------


def test_a_file_over_the_size_limit_is_refused_and_skipped(tmp_path):
    with Server(HOST, 0, 0, tmp_path / "data", max_file_size=100) as srv:
        net = Net(srv, tmp_path)
        try:
            alice_chat = net.chat("alice")
            alice_files = net.file("alice")
            bob = net.client("bob")
            alice_files.send(b"alice|bob|big.bin|101\n" + b"x" * 101)
            alice_chat.expect("ERROR: file too large: 101 bytes (limit 100)")
            alice_files.send(b"alice|bob|fits.bin|100\n" + b"y" * 100)
            assert file_arrival(bob)[1].path.read_bytes() == b"y" * 100
            assert not (tmp_path / "data" / "received_from_alice_big.bin").exists()
        finally:
            net.close()


def test_an_overlong_chat_line_is_refused_and_the_connection_closed(tmp_path):
    with Server(HOST, 0, 0, tmp_path, max_line=100) as srv, Wire(srv.chat_port) as alice:
        alice.send("alice\n")
        alice.expect("Welcome, alice!")
        alice.send("broadcast " + "x" * 200)
        assert alice.expect_closed() == b"ERROR: line longer than 100 bytes\n"


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


# --- resources over many connections -----------------------------------------------------


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


def _storm(net: Net, users: int, per_user: int) -> dict[str, list[str]]:
    """`users` raw clients each write `per_user` broadcasts in one write, all at once, and
    read what the others send; returns what each one received."""
    wires = [net.chat(f"u{i}") for i in range(users)]
    want = (users - 1) * per_user
    got: dict[str, list[str]] = {}
    errors: list[BaseException] = []

    def read(i: int, wire: Wire) -> None:
        try:
            got[f"u{i}"] = [wire.line(timeout=FILE_TIMEOUT) for _ in range(want)]
        except BaseException as e:  # reported by the test
            errors.append(e)

    readers = [threading.Thread(target=read, args=(i, w)) for i, w in enumerate(wires)]
    for t in readers:
        t.start()
    for i, wire in enumerate(wires):
        wire.send("".join(f"broadcast {i}:{k}\n" for k in range(per_user)))
    for t in readers:
        t.join(FILE_TIMEOUT * 2)
    assert not errors, errors[0]
    return got


def _check_storm(got: dict[str, list[str]], users: int, per_user: int) -> None:
    """Every delivery made, exactly once, in order per sender."""
    for me, lines in got.items():
        seen: dict[int, list[int]] = {}
        for line in lines:
            sender, k = line.split("]: ", 1)[1].split(":")
            seen.setdefault(int(sender), []).append(int(k))
        others = [i for i in range(users) if f"u{i}" != me]
        assert sorted(seen) == others, me
        for sender, ks in seen.items():
            assert ks == list(range(per_user)), f"{me} from u{sender}"


def test_a_burst_slows_its_senders_and_drops_no_reader(limited):
    """30 clients each pipeline 100 broadcasts at once into queues far smaller than the
    burst: everyone who reads gets every message, exactly once and in order per sender;
    nobody is dropped (before flow control, each reader passed its queue and was cut off
    with `[SENDQ EXCEEDED]`)."""
    net = limited(send_queue=64, send_queue_bytes=16384, send_queue_high_water=2048)
    users, per_user = 30, 100
    _check_storm(_storm(net, users, per_user), users, per_user)
    assert len(net.client("late").list_users()) == users


def test_a_slow_but_reading_client_is_never_dropped(limited):
    """A client that reads slowly but steadily slows the flood that feeds it, and gets all
    of it; the queue limit never cuts it off."""
    net = limited(send_queue=16, send_queue_bytes=4096, send_queue_high_water=1024)
    slow = net.adopt(Wire(net.server.chat_port, "slow", rcvbuf=4096))
    slow.send("slow\n")
    slow.expect("Welcome, slow!")
    flood = net.chat("flood")
    n = 3000
    flood.send("".join(f"broadcast s{i} {PAD}\n" for i in range(n)))
    for i in range(n):
        assert slow.line(timeout=FILE_TIMEOUT) == f"[BROADCAST from flood]: s{i} {PAD}"
        if i % 100 == 0:
            time.sleep(0.01)  # the slowness is what this test checks
    flood.send("list\n")
    flood.expect("Connected users: slow", timeout=FILE_TIMEOUT)


def test_a_reader_that_takes_nothing_does_not_hold_up_every_command(limited):
    """Past a non-reader's high-water mark its senders do not wait for it (it is not
    reading): 50 more broadcasts go through promptly, where waiting a grace period for it
    on each would take far longer than the deadline of the `list` below."""
    net = limited(
        send_queue_high_water=64,
        send_queue=1_000_000,
        send_queue_bytes=64 << 20,
        send_timeout=30.0,
    )
    sleepy = net.adopt(Wire(net.server.chat_port, "sleepy", rcvbuf=4096))
    sleepy.send("sleepy\n")
    sleepy.expect("Welcome, sleepy!")
    flood = net.chat("flood")
    # More than sleepy's socket buffers hold (the queue's cap is far above it), so its
    # writer ends up taking nothing more.
    for _ in range(10):
        flood.send("".join(f"broadcast fill {PAD}\n" for _ in range(2000)))
    flood.send("list\n")
    flood.expect("Connected users: sleepy", timeout=FILE_TIMEOUT)
    for i in range(50):
        flood.send(f"broadcast late{i}\n")
    flood.send("list\n")
    flood.expect("Connected users: sleepy", timeout=TIMEOUT)


def test_notices_for_a_client_that_reads_nothing_are_bounded(limited):
    """A client that floods its file port with bad headers and never reads its chat gets an
    error line for each, but not without bound: past twice its queue's cap it is dropped."""
    net = limited(send_queue=16, send_queue_bytes=4096)
    chat = net.adopt(Wire(net.server.chat_port, "spam", rcvbuf=4096))
    chat.send("spam\n")
    chat.expect("Welcome, spam!")
    files = net.file("spam")
    try:
        for _ in range(50):
            files.send(b"spam|bob|/|0\n" * 200)
    except OSError:
        pass  # dropped mid-flood
    chat.expect_closed(timeout=FILE_TIMEOUT)
    watcher = net.client("watcher")
    wait_until(lambda: "spam" not in watcher.list_users(), what="spam dropped")
