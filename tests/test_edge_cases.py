"""The lab report's error handling and edge cases (§7), and the lab's known faults that
relaychat fixes (docs/PROTOCOL.md §8): bad headers, dribbled uploads, atomic receive,
disconnect cleanup, refused names, usage lines, odd input."""

from __future__ import annotations

import os
import random
import time

import pytest
from relaychat import (
    Ack,
    Client,
    FileFailed,
    FileIncoming,
    FileReceived,
    PrivateMessage,
    RefusedError,
    Server,
    ServerError,
    UserNotFound,
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
    next_of,
    random_file,
    server_copy,
    take,
    wait_until,
)

USAGE_MSG = "Usage: msg <username> <message>"
UNKNOWN = "Unknown command. Use msg/broadcast/list/join/send_group"


# --- invalid file headers ---------------------------------------------------------------

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

    if size_readable:
        # The size is clear, so exactly that many bytes are skipped: the next upload may
        # follow in the very same segment.
        alice_files.send(header + junk + good_upload)
        alice_chat.expect(f"ERROR: {reason}")
    else:
        alice_files.send(header + junk)
        alice_chat.expect(f"ERROR: {reason}")
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
    assert sorted(p.name for p in data_dir.iterdir()) == ["received_from_alice_ok.bin"]
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


# --- atomic writes and aborted uploads --------------------------------------------------


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
    wait_until(
        lambda: not list(data_dir.iterdir()), what="the server removes its partial spool file"
    )
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


# --- disconnect cleanup -----------------------------------------------------------------


def test_a_disconnected_user_is_forgotten_everywhere(net):
    alice_chat = net.chat("alice")
    alice_files = net.file("alice")
    bob = net.client("bob")
    alice_chat.send("join devs\n")
    alice_chat.expect("You joined group 'devs'")
    bob.join("devs")
    assert bob.list_users() == ["alice"]

    alice_chat.close()

    # The server closes alice's file socket (it does so once it has forgotten her chat).
    assert alice_files.expect_closed() == b""
    assert bob.list_users() == []
    bob.msg("alice", "are you there?")
    missing = next_of(bob, UserNotFound)
    assert (missing.user, missing.line) == ("alice", "User alice not found.")

    # A new alice does not inherit the old one's groups.
    new_alice = net.chat("alice")
    new_alice.send("send_group devs hi\n")
    new_alice.expect("You are not in group 'devs'")
    bob.send_group("devs", "only me here")
    assert drain_wire(new_alice, "alice", bob) == []
    assert bob.list_users() == ["alice"]


def test_a_client_closing_frees_its_name_and_its_file_slot(net):
    bob = net.client("bob")
    alice = net.client("alice")
    alice.close()
    wait_until(lambda: bob.list_users() == [], what="alice leaves the list")
    # The name and the file slot are free again: a new alice gets messages and files.
    again = net.client("alice")
    bob.msg("alice", "welcome back")
    assert next_of(again, PrivateMessage).text == "welcome back"
    gift = random_file(net.root / "gift.bin", 1000)
    bob.send_file("alice", gift)
    got = {type(e): e for e in take(again, 2)}
    assert got[FileReceived].path.read_bytes() == gift.read_bytes()
    assert FileIncoming in got


# --- slow readers ------------------------------------------------------------------------


def test_a_user_who_stops_reading_is_dropped_and_slows_nobody(tmp_path):
    """Each chat connection has a bounded outbox; a reader that lets it overflow is
    disconnected, and everyone else gets every message."""
    with Server(HOST, 0, 0, tmp_path / "data", send_queue=64) as srv:
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


# --- refused names and duplicate connections --------------------------------------------


def test_a_duplicate_username_is_refused_and_the_first_session_is_untouched(net, server):
    alice = net.chat("alice")
    bob = net.client("bob")
    impostor = net.wire("chat", "impostor")
    impostor.send("alice\n")
    assert impostor.expect_closed() == b"ERROR: username 'alice' is already connected\n"

    with pytest.raises(RefusedError, match="already connected"):
        Client(HOST, server.chat_port, server.file_port, username="alice", timeout=TIMEOUT)

    bob.msg("alice", "is it really you?")
    alice.expect("[PRIVATE from bob]: is it really you?")
    alice.send("list\n")
    alice.expect("Connected users: bob")
    assert bob.list_users() == ["alice"]


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("a b", "username may not contain whitespace"),
        ("a|b", "username may not contain '|'"),
        ("../x", "username may not contain '/'"),
        ("x" * 33, "username is longer than 32 characters"),
        ("GROUP:x", "username may not contain the prefix 'GROUP:'"),
    ],
)
def test_an_invalid_username_is_refused_with_a_reason(net, name, reason):
    wire = net.wire("chat")
    wire.send(f"{name}\n")
    assert wire.expect_closed() == f"ERROR: {reason}\n".encode()


def test_a_second_file_connection_for_a_name_is_refused_before_any_greeting(net):
    bob = net.client("bob")
    net.chat("alice")
    alice_files = net.file("alice")
    second = net.wire("file", "alice-again")
    second.send("alice\n")
    assert second.expect_closed() == b"ERROR: 'alice' already has a file connection\n"
    # The first one still works.
    payload = b"still mine"
    alice_files.send(f"alice|bob|x.txt|{len(payload)}\n".encode() + payload)
    notice, received = file_arrival(bob)
    assert notice.filename == "x.txt"
    assert received.path.read_bytes() == payload


def test_a_file_connection_needs_a_chat_session_of_the_same_name(net, server):
    """Nobody can take a file slot (or sign uploads) for a name they are not logged in as."""
    ghost = net.wire("file", "ghost")
    ghost.send("ghost\n")
    # The server waits briefly for the chat handshake (the lab's client sends both
    # usernames at once), then refuses without a greeting.
    assert ghost.expect_closed(timeout=TIMEOUT) == (
        b"ERROR: 'ghost' has no chat session; log in on the chat port first\n"
    )
    # A Client's file handshake can therefore not be taken over either.
    alice = net.client("alice")
    bob = net.client("bob")
    gift = random_file(net.root / "gift.bin", 100)
    bob.send_file("alice", gift)
    assert file_arrival(alice)[1].path.read_bytes() == gift.read_bytes()


def test_a_file_connection_may_arrive_before_its_chat_handshake(net):
    """The lab's client sends its file-port username right after its chat username: the
    file handshake waits for the chat session instead of losing the race."""
    alice_files = net.wire("file", "alice")
    alice_files.send("alice")
    alice_chat = net.wire("chat", "alice")
    alice_chat.send("alice")
    alice_chat.expect("Welcome, alice!")
    assert alice_files.recv_exact(len(FILE_GREETING), TIMEOUT) == FILE_GREETING


def test_a_file_connection_from_another_address_is_refused(net, server):
    net.chat("alice")  # from 127.0.0.1
    elsewhere = Wire(server.file_port, "alice/file@127.0.0.2", source="127.0.0.2")
    net.adopt(elsewhere)
    elsewhere.send("alice\n")
    assert elsewhere.expect_closed() == b"ERROR: 'alice' is connected from another address\n"


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
            wait_until(lambda: not list((tmp_path / "data").iterdir()), what="spool removed")
            assert not list(net.downloads("bob").iterdir())
        finally:
            net.close()


# --- usage lines, unknown commands, odd input -------------------------------------------


@pytest.mark.parametrize(
    ("command", "reply"),
    [
        ("broadcast", "Usage: broadcast <message>"),
        ("join", "Usage: join <group_name>"),
        ("msg", USAGE_MSG),
        ("msg bob", USAGE_MSG),
        ("msg bob ", USAGE_MSG),
        ("send_group", "Usage: send_group <group_name> <message>"),
        ("send_group g", "Usage: send_group <group_name> <message>"),
        ("msgfoo bob hi", UNKNOWN),
        ("listing", UNKNOWN),
        ("send_file bob x.txt", UNKNOWN),
        ("LIST", "Connected users: bob"),
        ("Msg bob hi", None),
        ("join a|b", "ERROR: group name may not contain '|'"),
        (
            "FILE_RECEIVED|bob",
            "ERROR: malformed acknowledgement: expected FILE_RECEIVED|<sender>|<filename>",
        ),
    ],
)
def test_each_command_line_gets_its_reply(net, command, reply):
    alice = net.chat("alice")
    bob = net.chat("bob")
    alice.send(f"{command}\n")
    if reply is None:
        bob.expect("[PRIVATE from alice]: hi")
    else:
        alice.expect(reply)
    # One reply and no more: the next command's reply comes next.
    alice.send("list\n")
    alice.expect("Connected users: bob")


def test_a_session_survives_usage_errors_and_its_messages_still_flow(net):
    alice = net.chat("alice")
    bob = net.client("bob")
    for bare in ("broadcast", "join", "msg bob", "send_group g"):
        alice.send(f"{bare}\n")
        assert alice.line().startswith("Usage: ")
    alice.send("msg bob still connected\n")
    assert next_of(bob, PrivateMessage).text == "still connected"


def test_the_user_list_is_empty_with_a_trailing_space_when_alone(net):
    alice = net.chat("alice")
    alice.send("list\n")
    alice.expect("Connected users: ")


def test_a_non_utf8_command_gets_an_error_and_the_session_continues(net):
    alice = net.chat("alice")
    bob = net.client("bob")
    alice.send(b"msg bob \xff\xfe caf\xe9\n")
    alice.expect("ERROR: command is not valid UTF-8")
    alice.send("msg bob caf\u00e9 ok\n")
    assert next_of(bob, PrivateMessage).line == "[PRIVATE from alice]: caf\u00e9 ok"


def test_a_non_utf8_username_is_refused(net):
    wire = net.wire("chat")
    wire.send(b"\xffalice\n")
    assert wire.expect_closed() == b"ERROR: username is not valid UTF-8\n"


def test_blank_lines_are_ignored(net):
    alice = net.chat("alice")
    alice.send(b"\n\r\n   \n\t\nlist\n")
    alice.expect("Connected users: ")


def test_an_overlong_chat_line_is_refused_and_the_connection_closed(tmp_path):
    with Server(HOST, 0, 0, tmp_path, max_line=100) as srv, Wire(srv.chat_port) as alice:
        alice.send("alice\n")
        alice.expect("Welcome, alice!")
        alice.send("broadcast " + "x" * 200)
        assert alice.expect_closed() == b"ERROR: line longer than 100 bytes\n"


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


def test_a_user_can_be_in_at_most_256_groups(net):
    """Joins are cheap to send in bulk; the memberships they create are bounded."""
    alice = net.chat("alice")
    alice.send("".join(f"join g{i}\n" for i in range(257)))
    for i in range(256):
        alice.expect(f"You joined group 'g{i}'")
    alice.expect("ERROR: you are in too many groups (at most 256)")
    alice.send("join g0\n")  # already a member: still fine
    alice.expect("You joined group 'g0'")
