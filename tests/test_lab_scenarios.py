"""The lab report's six test scenarios (§6), black-box over real sockets.

Each test counts what every user got: the expected lines exactly once, and nothing else
before a closing marker (see `drain`).
"""

from __future__ import annotations

import hashlib
import threading
from collections import Counter

from relaychat import (
    Ack,
    BroadcastMessage,
    FileIncoming,
    FileReceived,
    FileSaved,
    GroupFileIncoming,
    GroupMessage,
    NoFileSocket,
    NotInGroup,
    PrivateMessage,
)

from tests.conftest import (
    drain,
    drain_wire,
    lines,
    next_of,
    random_file,
    server_copy,
    take,
)


def test_1_five_concurrent_clients_each_message_delivered_once_to_its_recipients(net):
    """Five users broadcast and send private messages all at once: no crash, and every
    message reaches exactly its recipients, exactly once."""
    names = ["ana", "ben", "cat", "dan", "eve"]
    clients = {name: net.client(name) for name in names}
    rounds = 15
    start = threading.Barrier(len(names))
    errors: list[BaseException] = []

    def chatter(me: str) -> None:
        c = clients[me]
        try:
            start.wait(timeout=10)
            for i in range(rounds):
                c.broadcast(f"{me} says {i} to all")
                for other in names:
                    if other != me:
                        c.msg(other, f"{me} whispers {i} to {other}")
            # A reply to our own command: every command before it has been handled.
            c.list_users()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=chatter, args=(name,)) for name in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors
    assert not any(t.is_alive() for t in threads)

    for me in names:
        via = clients["ben" if me == "ana" else "ana"]
        got = drain(clients[me], via)
        expected = Counter()
        for other in names:
            if other == me:
                continue
            for i in range(rounds):
                expected[f"[BROADCAST from {other}]: {other} says {i} to all"] += 1
                expected[f"[PRIVATE from {other}]: {other} whispers {i} to {me}"] += 1
        assert lines(got) == expected, me
        assert all(isinstance(e, (BroadcastMessage, PrivateMessage)) for e in got)
        # Each sender's messages arrive in the order they were sent.
        for other in (n for n in names if n != me):
            mine = [e.text for e in got if e.sender == other and isinstance(e, PrivateMessage)]
            assert mine == [f"{other} whispers {i} to {me}" for i in range(rounds)]


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

    # The same for a user who is not connected at all.
    alice.send_file("nobody", report)
    assert (
        next_of(alice, NoFileSocket).line
        == "User nobody has no file socket; file saved as received_from_alice_report.pdf"
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
