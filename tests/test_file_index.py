"""The file index: `files` and `get` for registered users, and files kept for registered users
who are away (`User <u> is offline; file queued.`), delivered at their next login, also
after a kill -9."""

from __future__ import annotations

import os
import re
import signal

import pytest
from relaychat import Ack, FileEntry, FileQueued, RefusedError, ServerError

from tests.conftest import (
    FILE_GREETING,
    PASSWORD,
    TIMEOUT,
    Wire,
    file_arrival,
    log_in_at,
    next_of,
    random_file,
    register,
    start_server,
    stop_server,
    wait_gone,
)


def test_files_lists_what_one_sent_and_received_and_get_sends_it_again(net):
    for name in ("alice", "bob"):
        register(net, name)
    alice, bob = net.client("alice", PASSWORD), net.client("bob", PASSWORD)
    report = random_file(net.root / "report.bin", 20_000)
    alice.send_file("bob", report)
    _, first = file_arrival(bob)
    same = random_file(net.root / "again" / "report.bin", 0)
    same.write_bytes(report.read_bytes())
    alice.send_file("bob", same)
    file_arrival(bob)

    listed = bob.files()
    assert [(f.sender, f.target, f.filename, f.size) for f in listed] == [
        ("alice", "bob", "report.bin", 20_000),
        ("alice", "bob", "report.bin", 20_000),
    ]
    assert all(isinstance(f, FileEntry) for f in listed)
    assert re.fullmatch(r"[0-9a-f]{64}", listed[0].blake3)
    assert listed[0].blake3 == listed[1].blake3, "the same bytes, the same hash"
    assert listed[0].id != listed[1].id
    assert [f.id for f in alice.files()] == [f.id for f in listed], "the sender sees them too"

    # The download was lost: ask again.
    first.path.unlink()
    bob.get(listed[0].id)
    notice, again = file_arrival(bob)
    assert (
        notice.line
        == "[FILE] alice sent you file 'report.bin' (20000 bytes). Incoming on file socket."
    )
    assert again.path.read_bytes() == report.read_bytes()

    carol = net.client("carol")
    with pytest.raises(RefusedError, match="files needs an account"):
        carol.files()
    carol.register("another-pass")
    assert carol.files() == []
    carol.get(listed[0].id)
    assert next_of(carol, ServerError).reason == f"no file #{listed[0].id} of yours is in the index"
    carol.send_command("get nonsense")
    assert next_of(carol, ServerError).reason == "no file #0 of yours is in the index"


def test_a_file_for_a_registered_user_who_is_away_waits_for_their_login(net):
    register(net, "bob")
    alice = net.client("alice")
    report = random_file(net.root / "report.bin", 300_000)
    alice.send_file("bob", report)
    assert next_of(alice, FileQueued).user == "bob"

    bob = net.client("bob", PASSWORD)
    notice, received = file_arrival(bob)
    assert notice.sender == "alice" and received.size == 300_000
    assert received.path.read_bytes() == report.read_bytes()
    assert next_of(alice, Ack).line == "[ACK] bob received file 'report.bin'"
    bob.close()
    wait_gone(net, "bob")

    # Delivered once: the next login brings nothing.
    bob = net.client("bob", PASSWORD)
    alice.msg("bob", "marker")
    assert bob.next_event(timeout=TIMEOUT).line == "[PRIVATE from alice]: marker"


def test_group_files_wait_for_registered_members_who_are_away(net):
    bob = net.client("bob")
    bob.join("devs")
    bob.register(PASSWORD)
    bob.close()
    wait_gone(net, "bob")
    alice = net.client("alice")
    alice.join("devs")
    plan = random_file(net.root / "plan.txt", 1000)
    alice.send_file("GROUP:devs", plan)
    assert next_of(alice, FileQueued).user == "bob"
    bob = net.client("bob", PASSWORD)
    notice, received = file_arrival(bob)
    assert notice.line == "[FILE] alice sent file 'plan.txt' to group 'devs'."
    assert received.path.read_bytes() == plan.read_bytes()


def test_a_queued_file_survives_a_kill_9(tmp_path):
    proc, ports, _ = start_server(tmp_path)
    body = os.urandom(50_000)
    try:
        bob = Wire(ports["CHAT"], "bob")
        bob.send("bob\n")
        bob.expect("Welcome, bob!")
        bob.send(f"register {PASSWORD}\n")
        bob.expect("Registered bob.")
        bob.close()
        alice = Wire(ports["CHAT"], "alice")
        alice.send("alice\n")
        alice.expect("Welcome, alice!")
        files = Wire(ports["FILE"], "alice-files")
        files.send("alice\n")
        assert files.recv_exact(len(FILE_GREETING), TIMEOUT) == FILE_GREETING
        while True:  # bob's session may still be closing
            alice.send("list\n")
            if "bob" not in alice.line():
                break
        files.send(f"alice|bob|kept.bin|{len(body)}\n".encode() + body)
        alice.expect("User bob is offline; file queued.")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=TIMEOUT)
        alice.close()
        files.close()
    finally:
        stop_server(proc)

    proc, ports, _ = start_server(tmp_path)
    try:
        for login in ("first", "second"):
            chat = log_in_at(ports["CHAT"], "bob")
            files = Wire(ports["FILE"], "bob-files")
            files.send("bob\n")
            assert files.recv_exact(len(FILE_GREETING), TIMEOUT) == FILE_GREETING
            if login == "first":
                assert files.line() == f"alice|kept.bin|{len(body)}"
                assert files.recv_exact(len(body)) == body
                chat.expect(
                    f"[FILE] alice sent you file 'kept.bin' ({len(body)} bytes). "
                    "Incoming on file socket."
                )
            else:
                files.assert_silent(0.5)
            chat.close()
            files.close()
            if login == "first":
                # The server notes the delivery right after the last byte; a new login
                # must come after that (it also waits for the old session to go).
                probe = Wire(ports["CHAT"], "probe")
                probe.send("probe\n")
                probe.expect("Welcome, probe!")
                while True:
                    probe.send("list\n")
                    if "bob" not in probe.line():
                        break
                probe.close()
    finally:
        assert stop_server(proc) == 0


def test_an_ack_waits_for_a_registered_sender_who_is_away(net):
    register(net, "alice")
    alice = net.client("alice", PASSWORD)
    bob_chat = net.chat("bob")
    bob_files = net.file("bob")
    report = random_file(net.root / "report.bin", 2000)
    alice.send_file("bob", report)
    bob_chat.expect(
        "[FILE] alice sent you file 'report.bin' (2000 bytes). Incoming on file socket."
    )
    assert bob_files.line() == "alice|report.bin|2000"
    assert bob_files.recv_exact(2000) == report.read_bytes()
    alice.close()
    wait_gone(net, "alice")
    # bob's client acknowledges only now, with alice away: the [ACK] waits for her.
    bob_chat.send("FILE_RECEIVED|alice|report.bin\n")
    bob_chat.send("list\n")
    bob_chat.expect("Connected users: ")  # the acknowledgement has been handled
    alice = net.client("alice", PASSWORD)
    assert next_of(alice, Ack).line == "[ACK] bob received file 'report.bin'"
