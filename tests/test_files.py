"""Files: upload, forward and acknowledgement, saved names, sending to oneself, to a group or
to a user with no file socket, relaying big files (cut-through, parallel group delivery,
flat server memory), invalid headers and resync, and uploads that break off.

Each scenario test counts what every user got: the expected lines exactly once, and nothing
else before a closing marker (see `drain`). Several uploads in one segment, and the order of
a sender's files, are in test_framing.py; size limits, quotas and stalls in test_limits.py."""

from __future__ import annotations

import hashlib
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from relaychat import (
    Ack,
    Client,
    Disconnected,
    FileFailed,
    FileIncoming,
    FileReceived,
    FileSaved,
    GroupFileIncoming,
    GroupMessage,
    NoFileSocket,
    NotInGroup,
    PrivateMessage,
    RefusedError,
    ServerError,
    Welcome,
)

from tests.conftest import (
    FILE_GREETING,
    FILE_TIMEOUT,
    HOST,
    RESYNC_QUIET,
    TIMEOUT,
    Net,
    Wire,
    drain,
    drain_wire,
    file_arrival,
    lines,
    next_of,
    random_file,
    saved,
    server_copy,
    start_server,
    stop_server,
    take,
    vm,
    wait_until,
)

# --- the lab report's file scenarios (§6, scenarios 2 to 6) ------------------------------


SCRIPT = b"""#!/usr/bin/env python3
# Lines that look like chat commands must stay inside the file.
msg bob hi
broadcast x
list
join devs
send_group devs hello
FILE_RECEIVED|alice|script.py
Welcome, bob!
[PRIVATE from mallory]: gotcha
alice|bob|inner.txt|3
print("done")
"""


def test_2_a_python_file_of_command_lines_arrives_as_a_file_and_never_as_chat(net, data_dir):
    alice = net.client("alice")
    bob = net.client("bob")
    carol = net.chat("carol")  # a raw chat user, to see whatever leaks onto chat
    script = net.root / "script.py"
    script.write_bytes(SCRIPT)

    assert alice.send_file("bob", script) == len(SCRIPT)

    bob_got = take(bob, 2)
    assert lines(bob_got) == Counter(
        {
            f"[FILE] alice sent you file 'script.py' ({len(SCRIPT)} bytes). "
            "Incoming on file socket.": 1,
            f"[FILE RECEIVED] {net.downloads('bob') / 'received_from_alice_script.py'} "
            f"({len(SCRIPT)} bytes) from alice": 1,
        }
    )
    received = next(e for e in bob_got if isinstance(e, FileReceived))
    assert received.path.read_bytes() == SCRIPT
    assert next_of(alice, Ack).line == "[ACK] bob received file 'script.py'"
    assert server_copy(data_dir / "received_from_alice_script.py") == SCRIPT

    # Nothing of the file showed on anyone's chat.
    assert drain(alice, bob) == []
    assert drain(bob, alice) == []
    assert drain_wire(carol, "carol", alice) == []


def test_3_a_large_binary_arrives_byte_identical_with_one_notice_and_one_ack(net, data_dir):
    size = 21 * 1024 * 1024 + 7
    photo = random_file(net.root / "photo.raw", size)
    digest = hashlib.sha256(photo.read_bytes()).hexdigest()
    alice = net.client("alice")
    bob = net.client("bob")

    assert alice.send_file("bob", photo) == size

    incoming, received = sorted(take(bob, 2), key=lambda e: isinstance(e, FileReceived))
    assert isinstance(incoming, FileIncoming)
    assert (incoming.sender, incoming.filename, incoming.size) == ("alice", "photo.raw", size)
    assert isinstance(received, FileReceived)
    assert (received.sender, received.filename, received.size) == ("alice", "photo.raw", size)
    assert received.path == net.downloads("bob") / "received_from_alice_photo.raw"
    assert hashlib.sha256(received.path.read_bytes()).hexdigest() == digest
    assert not list(net.downloads("bob").glob("*.tmp"))

    ack = next_of(alice, Ack)
    assert (ack.recipient, ack.filename) == ("bob", "photo.raw")
    assert (
        hashlib.sha256(server_copy(data_dir / "received_from_alice_photo.raw")).hexdigest()
        == digest
    )

    # Exactly one of each: nothing more before the markers.
    assert drain(bob, alice) == []
    assert drain(alice, bob) == []


def test_4_group_messages_and_files_reach_only_the_other_members(net, data_dir):
    ana, ben, cat, dan = (net.client(n) for n in ("ana", "ben", "cat", "dan"))
    for member in (ana, ben, cat):
        member.join("team")
    slides = random_file(net.root / "slides.pptx", 300_000)

    ana.send_group("team", "Standup at 10 AM.")
    dan.send_group("team", "let me in")
    assert next_of(dan, NotInGroup).line == "You are not in group 'team'"

    ana.send_file("GROUP:team", slides)
    for member in (ben, cat):
        saved = net.downloads(member.username) / "received_from_ana_slides.pptx"
        got = take(member, 3)
        assert lines(got) == Counter(
            {
                "[GROUP team] ana: Standup at 10 AM.": 1,
                "[FILE] ana sent file 'slides.pptx' to group 'team'.": 1,
                f"[FILE RECEIVED] {saved} ({slides.stat().st_size} bytes) from ana": 1,
            }
        ), member.username
        assert next(e for e in got if isinstance(e, GroupMessage)).group == "team"
        notice = next(e for e in got if isinstance(e, GroupFileIncoming))
        assert (notice.sender, notice.filename, notice.group) == ("ana", "slides.pptx", "team")
        received = next(e for e in got if isinstance(e, FileReceived))
        assert received.path.read_bytes() == slides.read_bytes()
    assert lines(take(ana, 2)) == Counter(
        {"[ACK] ben received file 'slides.pptx'": 1, "[ACK] cat received file 'slides.pptx'": 1}
    )
    assert server_copy(data_dir / "received_from_ana_slides.pptx") == slides.read_bytes()

    # A non-member's file to the group goes nowhere (the server keeps its copy).
    intruder = random_file(net.root / "intruder.bin", 1000)
    dan.send_file("GROUP:team", intruder)
    assert next_of(dan, NotInGroup).line == "You are not in group 'team'"

    # The sender got none of its own group traffic; the non-member got none at all.
    for user in (ana, ben, cat, dan):
        via = ben if user is ana else ana
        assert drain(user, via) == [], user.username
    assert not net.downloads("dan").exists() or not list(net.downloads("dan").iterdir())
    assert not (net.downloads("ana") / "received_from_ana_slides.pptx").exists()
    for member in ("ana", "ben", "cat"):
        assert not (net.downloads(member) / "received_from_dan_intruder.bin").exists()


def test_5_a_target_without_a_file_socket_gets_nothing_and_the_server_keeps_the_file(net, data_dir):
    alice = net.client("alice")
    bob = net.chat("bob")  # connected to chat only, like a client whose file socket is gone
    report = random_file(net.root / "report.pdf", 12345)

    alice.send_file("bob", report)
    event = next_of(alice, NoFileSocket)
    assert event.line == "User bob has no file socket; file saved as received_from_alice_report.pdf"
    assert (event.user, event.saved_as) == ("bob", "received_from_alice_report.pdf")
    assert server_copy(data_dir / "received_from_alice_report.pdf") == report.read_bytes()
    # No promise of a file that cannot come.
    assert drain_wire(bob, "bob", alice) == []

    # The same for a user who is not connected at all; the first copy is kept, the second
    # gets a name of its own.
    alice.send_file("nobody", report)
    assert (
        next_of(alice, NoFileSocket).line
        == "User nobody has no file socket; file saved as received_from_alice_report (2).pdf"
    )
    assert drain(alice, net.client("carol")) == []


def test_6_a_file_sent_to_oneself_is_saved_and_not_forwarded(net, data_dir):
    alice_chat = net.chat("alice")
    alice_files = net.file("alice")
    body = bytes(range(256)) * 40
    alice_files.send(f"alice|alice|foo.bin|{len(body)}\n".encode() + body)

    alice_chat.expect("[FILE] You sent file 'foo.bin' (saved as received_from_alice_foo.bin).")
    assert server_copy(data_dir / "received_from_alice_foo.bin") == body

    # A marker file from bob, sent only now that the self-send is saved: had the self-send
    # been forwarded, its notice and header would have come first.
    bob = net.client("bob")
    marker = random_file(net.root / "marker.txt", 10)
    bob.send_file("alice", marker)
    alice_chat.expect("[FILE] bob sent you file 'marker.txt' (10 bytes). Incoming on file socket.")
    assert alice_files.line() == "bob|marker.txt|10"
    assert alice_files.recv_exact(10) == marker.read_bytes()


def test_6_a_client_sending_to_itself_gets_the_saved_line_and_no_file(net, data_dir):
    alice = net.client("alice")
    foo = random_file(net.root / "foo.bin", 4096)
    alice.send_file("alice", foo)
    saved = next_of(alice, FileSaved)
    assert saved.line == "[FILE] You sent file 'foo.bin' (saved as received_from_alice_foo.bin)."
    assert (saved.filename, saved.saved_as) == ("foo.bin", "received_from_alice_foo.bin")
    assert server_copy(data_dir / "received_from_alice_foo.bin") == foo.read_bytes()
    assert drain(alice, net.client("bob")) == []
    assert not (net.downloads("alice") / "received_from_alice_foo.bin").exists()


# --- acknowledgements --------------------------------------------------------------------


def test_only_a_forwarded_file_can_be_acknowledged_once_and_to_its_sender(net):
    alice = net.client("alice")
    bob_chat = net.chat("bob")
    bob_files = net.file("bob")
    carol = net.client("carol")
    # An acknowledgement for a file that was never forwarded is refused.
    bob_chat.send("FILE_RECEIVED|alice|report.pdf\n")
    bob_chat.expect("ERROR: no file 'report.pdf' from alice is waiting for your acknowledgement")
    report = random_file(net.root / "report.pdf", 100)
    alice.send_file("bob", report)
    bob_chat.expect("[FILE] alice sent you file 'report.pdf' (100 bytes). Incoming on file socket.")
    assert bob_files.line() == "alice|report.pdf|100"
    assert bob_files.recv_exact(100) == report.read_bytes()
    bob_chat.send("FILE_RECEIVED|alice|report.pdf\n")
    ack = next_of(alice, Ack)
    assert (ack.recipient, ack.filename, ack.line) == (
        "bob",
        "report.pdf",
        "[ACK] bob received file 'report.pdf'",
    )
    # Once only.
    bob_chat.send("FILE_RECEIVED|alice|report.pdf\n")
    bob_chat.expect("ERROR: no file 'report.pdf' from alice is waiting for your acknowledgement")
    assert drain(carol, alice) == []
    assert drain(alice, carol) == []


# --- saved names -------------------------------------------------------------------------


def test_file_names_must_leave_room_for_the_saved_prefix_and_the_tmp_suffix(net, data_dir):
    """`received_from_<sender>_<name>.tmp` must fit in one 255-byte path component."""
    alice = net.client("alice")
    bob = net.client("bob")
    room = 255 - len("received_from_alice_") - len(".tmp")
    longest = net.root / ("f" * (room - 4) + ".bin")
    longest.write_bytes(b"hello")
    assert alice.send_file("bob", longest) == 5
    notice, received = file_arrival(bob)
    assert notice.filename == longest.name
    assert received.path.read_bytes() == b"hello"
    assert len(received.path.name) == 255 - len(".tmp")
    assert next_of(alice, Ack).filename == longest.name

    too_long = net.root / ("g" * (room + 1))
    too_long.write_bytes(b"12345")
    with pytest.raises(RefusedError, match="file name too long to save as"):
        alice.send_file("bob", too_long)
    error = next_of(alice, ServerError)
    saved = f"received_from_alice_{too_long.name}"
    assert error.line == f"ERROR: file name too long to save as {saved}"
    # Exactly the 5 body bytes were skipped: the next file goes through.
    ok = net.root / "ok.txt"
    ok.write_bytes(b"ok")
    alice.send_file("bob", ok)
    assert file_arrival(bob)[1].path.read_bytes() == b"ok"
    assert not (data_dir / f"received_from_alice_{too_long.name}").exists()


# --- invalid file headers and resync -----------------------------------------------------


BAD_HEADERS = [
    pytest.param(
        b"alice|bob|x.txt\n",
        "invalid file header: expected sender|target|filename|filesize, got 3 field(s)",
        False,
        id="three-fields",
    ),
    pytest.param(
        b"alice|bob|x.txt|lots\n",
        "invalid file header: filesize 'lots' is not a whole number of bytes",
        False,
        id="non-numeric-size",
    ),
    pytest.param(
        b"alice|bob|x.txt|-5\n",
        "invalid file header: filesize '-5' is not a whole number of bytes",
        False,
        id="negative-size",
    ),
    pytest.param(
        b"alice|bob|../evil|8\n",
        "invalid file header: file name may not contain '/'",
        True,
        id="dot-dot-slash",
    ),
]


@pytest.mark.parametrize(("header", "reason", "size_readable"), BAD_HEADERS)
def test_an_invalid_header_is_refused_on_chat_and_the_file_connection_keeps_working(
    net, data_dir, header, reason, size_readable
):
    alice_chat = net.chat("alice")
    alice_files = net.file("alice")
    bob = net.client("bob")
    carol = net.client("carol")
    # The refused header's body looks like a header itself: it must never be taken for one.
    junk = b"a|b|c|1\n"
    good = os.urandom(5000)
    good_upload = f"alice|bob|ok.bin|{len(good)}\n".encode() + good

    dropped = f"ERROR: discarded {len(junk)} bytes after an invalid header"
    if size_readable:
        # The size is clear, so exactly that many bytes are skipped: the next upload may
        # follow in the very same segment.
        alice_files.send(header + junk + good_upload)
        alice_chat.expect(f"ERROR: {reason}")
        alice_chat.expect(dropped)
    else:
        alice_files.send(header + junk)
        alice_chat.expect(f"ERROR: {reason}")
        alice_chat.expect(dropped)
        # The body's length is unknown: the server resyncs on a quiet pause (no event to
        # wait for; this pause IS the protocol).
        time.sleep(RESYNC_QUIET + 0.3)
        alice_files.send(good_upload)

    notice, received = file_arrival(bob)
    assert (notice.sender, notice.filename, notice.size) == ("alice", "ok.bin", len(good))
    assert received.path.read_bytes() == good
    alice_chat.expect("[ACK] bob received file 'ok.bin'")
    assert server_copy(data_dir / "received_from_alice_ok.bin") == good

    # Only the good file was saved, nothing escaped the data directory.
    assert saved(data_dir) == ["received_from_alice_ok.bin"]
    assert not (data_dir.parent / "evil").exists()
    assert not (data_dir.parent / "received_from_alice_..").exists()
    # Nobody else noticed anything.
    carol.msg("bob", "still here?")
    assert next_of(bob, PrivateMessage).text == "still here?"
    assert drain(bob, carol) == []
    assert drain(carol, bob) == []
    assert drain_wire(alice_chat, "alice", carol) == []


def test_an_overlong_file_header_is_refused_and_the_server_goes_on(net):
    alice_chat = net.chat("alice")
    alice_files = net.file("alice")
    alice_files.send(b"x" * 5000)
    alice_chat.expect("ERROR: invalid file header: line longer than 4096 bytes")
    assert alice_files.expect_closed() == b""
    bob = net.client("bob")
    assert bob.list_users() == ["alice"]


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
                # Like the lab's server, it knows no extensions.
                assert chat.recv(1024) == b"relaychat/1\n"
                chat.sendall(b"Unknown command. Use msg/broadcast/list/join/send_group\n")
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


# --- partial reads -----------------------------------------------------------------------


def test_a_header_and_body_dribbled_in_tiny_pieces_arrive_whole(net, data_dir):
    alice_chat = net.chat("alice")
    alice_files = net.file("alice")
    bob = net.client("bob")
    body = os.urandom(3000)
    header = f"alice|bob|dribble.bin|{len(body)}\n".encode()
    rng = random.Random(7)

    for i, byte in enumerate(header):
        alice_files.send(bytes([byte]))
        # A header is ended by its newline only: a pause longer than the chat's idle pause
        # in the middle of it changes nothing.
        time.sleep(0.06 if i == 10 else 0.001)
    pos = 0
    while pos < len(body):
        step = rng.randint(1, 97)
        alice_files.send(body[pos : pos + step])
        pos += step
        time.sleep(0.06 if pos > len(body) // 2 > pos - step else 0.001)

    notice, received = file_arrival(bob)
    assert notice.size == len(body)
    assert received.path.read_bytes() == body
    alice_chat.expect("[ACK] bob received file 'dribble.bin'")
    assert server_copy(data_dir / "received_from_alice_dribble.bin") == body


# --- atomic writes and aborted uploads ---------------------------------------------------


def test_an_upload_that_breaks_off_leaves_no_file_under_its_final_name(net, data_dir):
    bob = net.client("bob")
    bob_dir = net.downloads("bob")
    net.chat("mallory")
    mallory_files = net.file("mallory")
    size = 1_000_000
    mallory_files.send(f"mallory|bob|big.bin|{size}\n".encode() + os.urandom(size // 2))

    # bob's copy is under way (cut-through), but only as a .tmp.
    assert next_of(bob, FileIncoming).size == size
    tmp = bob_dir / "received_from_mallory_big.bin.tmp"
    wait_until(tmp.exists, what="bob's .tmp appears")
    assert not (bob_dir / "received_from_mallory_big.bin").exists()
    assert list(data_dir.glob(".relaychat-upload-*.part"))
    assert not (data_dir / "received_from_mallory_big.bin").exists()

    mallory_files.close()

    failed = next_of(bob, FileFailed)
    assert "big.bin" in failed.reason
    assert failed.line == f"[FILE RECEIVE ERROR] {failed.reason}"
    assert sorted(p.name for p in bob_dir.iterdir()) == []
    wait_until(lambda: not saved(data_dir), what="the server removes its partial spool file")
    assert drain(bob, net.client("carol")) == []


def test_a_recipient_never_sees_a_final_file_before_the_last_byte(net, data_dir):
    """Watches bob's download directory while the upload is held at its last byte."""
    bob = net.client("bob")
    bob_dir = net.downloads("bob")
    alice_chat = net.chat("alice")
    alice_files = net.file("alice")
    body = os.urandom(200_000)
    alice_files.send(f"alice|bob|held.bin|{len(body)}\n".encode() + body[:-1])
    next_of(bob, FileIncoming)
    tmp = bob_dir / "received_from_alice_held.bin.tmp"
    wait_until(lambda: tmp.exists() and tmp.stat().st_size == len(body) - 1, what="199999 bytes")
    assert [p.name for p in bob_dir.iterdir()] == [tmp.name]

    alice_files.send(body[-1:])
    received = next_of(bob, FileReceived)
    assert received.path.read_bytes() == body
    assert [p.name for p in bob_dir.iterdir()] == ["received_from_alice_held.bin"]
    alice_chat.expect("[ACK] bob received file 'held.bin'")


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
    assert saved(spool) == []


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


# --- relaying big files: cut-through, parallel groups, flat memory -----------------------


def test_recipients_receive_while_the_upload_is_still_arriving(net):
    net.chat("bob")
    net.chat("alice")
    bob_files = net.file("bob")
    alice_files = net.file("alice")
    body = os.urandom(2_000_000)
    alice_files.send(f"alice|bob|big.bin|{len(body)}\n".encode() + body[:1_000_000])
    # Bob gets the header and the first bytes while half the upload is unsent.
    assert bob_files.line() == f"alice|big.bin|{len(body)}"
    first = bob_files.recv_exact(1)
    alice_files.send(body[1_000_000:])
    assert first + bob_files.recv_exact(len(body) - 1) == body


def test_a_stalled_group_member_slows_neither_the_sender_nor_the_others(net, tmp_path):
    payload = tmp_path / "video.bin"
    payload.write_bytes(os.urandom(48 * 1024 * 1024))
    sara, ahmad, yasser = (net.client(name) for name in ("sara", "ahmad", "yasser"))
    sleepy_chat = net.chat("sleepy")
    # sleepy never reads its file socket: 48 MB cannot fit in its socket buffers.
    sleepy_files = net.adopt(Wire(net.server.file_port, "sleepy/file", rcvbuf=4096))
    sleepy_files.send("sleepy\n")
    assert sleepy_files.recv_exact(len(FILE_GREETING), TIMEOUT) == FILE_GREETING
    for c in (sara, ahmad, yasser):
        c.join("team")
    sleepy_chat.send("join team\n")
    sleepy_chat.expect("You joined group 'team'")
    assert yasser.send_file("GROUP:team", payload) == payload.stat().st_size
    digest = hashlib.sha256(payload.read_bytes()).digest()
    for c in (sara, ahmad):
        got = file_arrival(c)[1]
        assert got.sender == "yasser"
        assert hashlib.sha256(got.path.read_bytes()).digest() == digest


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_server_memory_stays_flat_for_a_file_far_larger_than_its_buffers(tmp_path):
    """A 512 MB relay through a server subprocess: its peak RSS stays far below the file."""
    size = 512 * 1024 * 1024
    big = tmp_path / "big.bin"
    with big.open("wb") as f:
        block = os.urandom(1 << 20)
        for _ in range(size >> 20):
            f.write(block)
    proc, ports, _ = start_server(tmp_path)
    try:
        baseline = vm("VmHWM", proc.pid)

        class Ports:
            chat_port, file_port = ports["CHAT"], ports["FILE"]

        net = Net(Ports, tmp_path)
        try:
            alice, bob = net.client("alice"), net.client("bob")
            assert alice.send_file("bob", big) == size
            got = file_arrival(bob, timeout=120)[1]
            assert got.size == size
            assert got.path.stat().st_size == size
        finally:
            net.close()
        peak = vm("VmHWM", proc.pid)
        print(f"server VmHWM: {baseline} KiB at start, {peak} KiB after a {size >> 20} MiB relay")
        assert peak < 64 * 1024, f"server peak RSS {peak} KiB for a {size >> 20} MiB file"
    finally:
        assert stop_server(proc) == 0


def test_two_transfers_to_one_recipient_never_interleave(net, tmp_path):
    """alice and carol upload to bob at the same time; both files arrive intact."""
    files = {}
    for name in ("alice", "carol"):
        files[name] = tmp_path / f"from-{name}.bin"
        files[name].write_bytes(os.urandom(8 * 1024 * 1024))
    bob = net.client("bob")
    senders = {name: net.client(name) for name in files}
    threads = [threading.Thread(target=senders[n].send_file, args=("bob", files[n])) for n in files]
    for t in threads:
        t.start()
    received = [e for e in take(bob, 4) if isinstance(e, FileReceived)]
    for t in threads:
        t.join(timeout=30)
    assert {e.sender for e in received} == set(files)
    for e in received:
        assert e.path.read_bytes() == files[e.sender].read_bytes()


def test_a_good_upload_right_after_a_bad_header_with_a_size_survives(net, data_dir):
    """The bad header's last field is a size: exactly that many bytes are skipped, so the
    valid upload in the same write goes through."""
    alice_chat = net.chat("alice")
    alice_files = net.file("alice")
    bob = net.client("bob")
    good = os.urandom(3000)
    alice_files.send(
        b"alice|bob|a|b.txt|5\nHELLO" + f"alice|bob|ok.bin|{len(good)}\n".encode() + good
    )
    alice_chat.expect(
        "ERROR: invalid file header: expected sender|target|filename|filesize, got 5 field(s)"
    )
    alice_chat.expect("ERROR: discarded 5 bytes after an invalid header")
    assert file_arrival(bob)[1].path.read_bytes() == good
    alice_chat.expect("[ACK] bob received file 'ok.bin'")


def test_what_a_resync_discards_is_reported_to_the_uploader(net, data_dir):
    """A bad header without a readable size: the rest of the write is discarded until the
    connection goes quiet, and the uploader hears exactly how much."""
    alice_chat = net.chat("alice")
    alice_files = net.file("alice")
    bob = net.client("bob")
    lost = b"alice|bob|ok.bin|4\nabcd"
    alice_files.send(b"not a header\n" + lost)
    alice_chat.expect(
        "ERROR: invalid file header: expected sender|target|filename|filesize, got 1 field(s)"
    )
    alice_chat.expect(f"ERROR: discarded {len(lost)} bytes after an invalid header")
    assert drain(bob, net.client("carol")) == []


def test_saved_names_never_collide_on_the_server_or_at_the_recipient(net, data_dir):
    """`a` sending `b_c.txt` and `a_b` sending `c.txt` both map to
    `received_from_a_b_c.txt`; a sender re-sending a name maps to it again. Every upload
    keeps its own copy, and every sender is told the name it got."""
    a, a_b = net.client("a"), net.client("a_b")
    carol = net.client("carol")
    first, second, third = (
        random_file(net.root / n, 100 + i) for i, n in enumerate(["b_c.txt", "c.txt", "again.txt"])
    )
    (net.root / "x").mkdir()
    resent = random_file(net.root / "x" / "b_c.txt", 300)

    received = []
    for sender, path in [(a, first), (a_b, second), (a, resent)]:
        sender.send_file("carol", path)
        received.append(file_arrival(carol)[1])
        next_of(sender, Ack)
    names = [r.path.name for r in received]
    assert names == [
        "received_from_a_b_c.txt",
        "received_from_a_b_c (2).txt",
        "received_from_a_b_c (3).txt",
    ]
    for r, path in zip(received, [first, second, resent]):
        assert r.path.read_bytes() == path.read_bytes()
    for name, path in zip(names, [first, second, resent]):
        assert server_copy(data_dir / name) == path.read_bytes()

    # The server names the copy it actually kept.
    a.send_file("nobody", third)
    assert next_of(a, NoFileSocket).saved_as == "received_from_a_again.txt"
    a.send_file("nobody", third)
    assert next_of(a, NoFileSocket).saved_as == "received_from_a_again (2).txt"


# --- every transfer ends in one outcome, told to both ends ---------------------------------


def test_send_file_returns_once_the_server_has_the_file_and_raises_when_refused(limited):
    net = limited(max_file_size=1000)
    alice = net.client("alice")
    assert alice.extended
    small = random_file(net.root / "small.bin", 1000)
    assert alice.send_file("nobody", small) == 1000
    # Saved by the time send_file returned: no waiting, no polling.
    assert (net.server.data_dir / "received_from_alice_small.bin").read_bytes() == (
        small.read_bytes()
    )
    big = random_file(net.root / "big.bin", 1001)
    with pytest.raises(RefusedError, match=r"file too large: 1001 bytes \(limit 1000\)"):
        alice.send_file("nobody", big)
    # The connection is in step: the next upload goes through.
    assert alice.send_file("nobody", small) == 1000


def test_a_recipient_that_cannot_save_tells_the_uploader(net):
    alice, bob = net.client("alice"), net.client("bob")
    # Something the recipient's client cannot write over, even as root: a directory where
    # its temporary file would go.
    (net.downloads("bob") / "received_from_alice_f.txt.tmp").mkdir(parents=True)
    f = random_file(net.root / "f.txt", 100)
    alice.send_file("bob", f)
    assert next_of(bob, FileIncoming).filename == "f.txt"
    failed = next_of(bob, FileFailed)
    assert "cannot save 'f.txt' from alice" in failed.reason
    error = next_of(alice, ServerError)
    assert error.reason.startswith("'f.txt' could not be saved by bob: ")
    assert drain(alice, bob) == []


def test_a_download_cut_off_by_the_server_stopping_fails_before_the_disconnect(net):
    """bob is receiving when the server goes away: he gets `FileFailed` for the transfer,
    then `Disconnected`, and keeps no partial file."""
    alice_chat = net.chat("alice")
    alice_files = net.file("alice")
    bob = net.client("bob")
    alice_files.send(b"alice|bob|half.bin|2000\n" + b"h" * 1000)  # half the body, then wait
    assert next_of(bob, FileIncoming).filename == "half.bin"
    net.server.stop()
    events = []
    while not events or not isinstance(events[-1], Disconnected):
        event = bob.next_event(timeout=TIMEOUT)
        assert event is not None, f"no Disconnected after {events}"
        events.append(event)
    kinds = [type(e).__name__ for e in events]
    assert kinds[-2:] == ["FileFailed", "Disconnected"], kinds
    assert "half.bin" in events[-2].reason
    assert list(net.downloads("bob").iterdir()) == []
    alice_chat.close()
