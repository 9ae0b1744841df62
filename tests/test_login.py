"""Logging in and out: the username handshake, the rules for names, one identity per name,
the file connection bound to its user's chat session, and what leaving frees.

Framing of the username line itself (with or without a newline, together with the first
command) is in test_framing.py; the handshake timeout is in test_limits.py."""

from __future__ import annotations

import pytest
from relaychat import Client, FileIncoming, FileReceived, PrivateMessage, RefusedError, UserNotFound

from tests.conftest import (
    FILE_GREETING,
    HOST,
    TIMEOUT,
    Wire,
    drain_wire,
    file_arrival,
    next_of,
    random_file,
    saved,
    take,
    wait_until,
)

# --- the username handshake --------------------------------------------------------------


def test_a_file_connection_may_arrive_before_its_chat_handshake(net):
    """The lab's client sends its file-port username right after its chat username: the
    file handshake waits for the chat session instead of losing the race."""
    alice_files = net.wire("file", "alice")
    alice_files.send("alice")
    alice_chat = net.wire("chat", "alice")
    alice_chat.send("alice")
    alice_chat.expect("Welcome, alice!")
    assert alice_files.recv_exact(len(FILE_GREETING), TIMEOUT) == FILE_GREETING


def test_a_non_utf8_username_is_refused(net):
    wire = net.wire("chat")
    wire.send(b"\xffalice\n")
    assert wire.expect_closed() == b"ERROR: username is not valid UTF-8\n"


# --- refused names -----------------------------------------------------------------------


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


# --- one identity per user ---------------------------------------------------------------


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


def test_a_file_connection_cannot_sign_uploads_with_another_name(net):
    bob = net.client("bob")
    net.chat("mallory")
    mallory_files = net.file("mallory")
    mallory_files.send(b"alice|bob|from-alice.txt|3\nhey")
    notice, received = file_arrival(bob)
    assert notice.sender == received.sender == "mallory"
    assert received.path.name == "received_from_mallory_from-alice.txt"


# --- the file connection, bound to its chat session --------------------------------------


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


def test_a_file_connection_from_another_address_is_refused(net, server):
    net.chat("alice")  # from 127.0.0.1
    elsewhere = Wire(server.file_port, "alice/file@127.0.0.2", source="127.0.0.2")
    net.adopt(elsewhere)
    elsewhere.send("alice\n")
    assert elsewhere.expect_closed() == b"ERROR: 'alice' is connected from another address\n"


# --- leaving: disconnect cleanup ---------------------------------------------------------


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


# --- look-alike names ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("alice\u200b", "username may not contain U+200B, an invisible character"),
        ("\u202eecila", "username may not contain U+202E, a bidirectional control character"),
        ("al\u2066ice", "username may not contain U+2066, a bidirectional control character"),
        ("a\u00adlice", "username may not contain U+00AD, an invisible character"),
    ],
)
def test_invisible_and_bidi_code_points_are_refused_in_usernames(net, name, reason):
    net.chat("alice")
    wire = net.wire("chat")
    wire.send(f"{name}\n".encode())
    assert wire.expect_closed() == f"ERROR: {reason}\n".encode()


def test_a_look_alike_of_a_connected_user_is_refused(net):
    alice = net.chat("alice")
    carol = net.client("carol")
    fake = net.wire("chat")
    fake.send("\u0430lice\n".encode())  # U+0430, Cyrillic small a
    assert fake.expect_closed() == (
        "ERROR: username '\u0430lice' looks too much like 'alice', who is connected\n".encode()
    )
    assert carol.list_users() == ["alice"]
    alice.send("list\n")
    alice.expect("Connected users: carol")


def test_names_are_compared_in_nfc(net):
    decomposed = "zoe\u0308"  # e + combining diaeresis
    zoe = net.wire("chat")
    zoe.send(f"{decomposed}\n".encode())
    zoe.expect("Welcome, zo\u00eb!")
    bob = net.client("bob")
    assert bob.list_users() == ["zo\u00eb"]
    bob.msg("zo\u00eb", "hi")
    zoe.expect("[PRIVATE from bob]: hi")
    again = net.wire("chat")
    again.send("zo\u00eb\n".encode())
    assert again.expect_closed() == "ERROR: username 'zo\u00eb' is already connected\n".encode()


def test_a_bidi_override_in_a_file_name_is_refused(net, data_dir):
    alice_chat = net.chat("alice")
    alice_files = net.file("alice")
    alice_files.send("alice|bob|up_a\u202etxt.exe|3\nabc".encode())
    alice_chat.expect(
        "ERROR: invalid file header: file name may not contain U+202E, "
        "a bidirectional control character"
    )
    alice_chat.expect("ERROR: discarded 3 bytes after an invalid header")
    assert saved(data_dir) == []
