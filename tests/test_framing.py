"""How the chat port cuts bytes into commands, for both kinds of clients it serves.

The lab's client sends its username and every command with no newline, one `send` each,
so a connection that has never sent a newline is framed by a short idle pause. Netcat and
scripts send newline-terminated lines, many at once; from its first newline a connection is
strictly line-framed (docs/PROTOCOL.md §2).

To prove two no-newline commands were taken separately, a test sends the first, waits for
its effect, then sends the second: a lab-style command only takes effect once its pause
has passed, so the two can never share a pause.
"""

from __future__ import annotations

import os
import time

import pytest
from relaychat import Server

from tests.conftest import FILE_GREETING, HOST, Net, server_copy


def test_a_lab_style_command_split_into_two_segments_is_one_command(tmp_path):
    # A long pause (0.5 s) so that a busy test machine cannot separate the two sends.
    with Server(HOST, 0, 0, tmp_path / "data", idle_pause=0.5) as srv:
        net = Net(srv, tmp_path)
        try:
            alice = net.chat("alice", lab=True)
            bob = net.chat("bob", lab=True)
            # One `send` of the lab's client may reach the server as two segments
            # microseconds apart: still one command.
            alice.send("msg bo")
            alice.send("b hi")
            bob.expect("[PRIVATE from alice]: hi")
            # No "Usage" or "Unknown command" from two halves: the next reply is list's.
            alice.send("list")
            alice.expect("Connected users: bob")
        finally:
            net.close()


def test_a_lab_style_last_command_before_closing_is_not_lost(net):
    bob = net.chat("bob")
    alice = net.chat("alice", lab=True)
    alice.send("broadcast bye")
    alice.close()
    bob.expect("[BROADCAST from alice]: bye")


@pytest.mark.parametrize("eol", ["\n", "\r\n"], ids=["LF", "CRLF"])
def test_netcat_style_lines_with_lf_or_crlf(net, eol):
    bob = net.chat("bob")
    alice = net.wire("chat", "alice")
    alice.send(f"alice{eol}")
    alice.expect("Welcome, alice!")
    alice.send(f"msg bob hi  there {eol}")
    bob.expect("[PRIVATE from alice]: hi  there")
    alice.send(f"list{eol}")
    alice.expect("Connected users: bob")
    alice.send(f"join devs{eol}send_group devs x{eol}")
    alice.expect("You joined group 'devs'")
    alice.send(f"send_group nope x{eol}")
    alice.expect("You are not in group 'nope'")


def test_many_commands_in_one_segment_are_all_answered_in_order(net):
    bob = net.chat("bob")
    alice = net.chat("alice")
    alice.send(
        "list\n"
        "msg ghost hi\n"
        "join devs\n"
        "broadcast\n"
        "send_group devs nobody else here\n"
        "msg bob one\n"
        "msg bob two\n"
        "LIST\n"
        "msgfoo x\n"
        "send_group ops x\n"
    )
    for reply in [
        "Connected users: bob",
        "User ghost not found.",
        "You joined group 'devs'",
        "Usage: broadcast <message>",
        "Connected users: bob",
        "Unknown command. Use msg/broadcast/list/join/send_group",
        "You are not in group 'ops'",
    ]:
        alice.expect(reply)
    bob.expect("[PRIVATE from alice]: one")
    bob.expect("[PRIVATE from alice]: two")


def test_a_pause_framed_connection_sending_a_batch_gets_every_line_separately(net):
    """The lab's server merged two commands that came in one read; a batch from a
    connection that had used no newline so far must still be split on its newlines."""
    bob = net.chat("bob")
    alice = net.chat("alice", lab=True)
    alice.send("msg bob one\nmsg bob two\nlist\n")
    bob.expect("[PRIVATE from alice]: one")
    bob.expect("[PRIVATE from alice]: two")
    alice.expect("Connected users: bob")


def test_username_and_first_command_in_one_segment(net):
    bob = net.chat("bob")
    alice = net.wire("chat", "alice")
    alice.send("alice\nlist\nmsg bob hello\n")
    alice.expect("Welcome, alice!")
    alice.expect("Connected users: bob")
    bob.expect("[PRIVATE from alice]: hello")


def test_a_line_framed_connection_never_splits_a_line_at_a_pause(net, server):
    bob = net.chat("bob")
    alice = net.chat("alice")
    alice.send("msg bob hel")
    # The pause itself is what is tested: four idle pauses with no newline.
    time.sleep(0.1)
    alice.send("lo wor")
    time.sleep(0.1)
    alice.send("ld\n")
    bob.expect("[PRIVATE from alice]: hello world")
    # Had the line been cut, alice would have had "Unknown command" replies first.
    alice.send("list\n")
    alice.expect("Connected users: bob")


def test_a_line_framed_connection_never_merges_lines(net):
    bob = net.chat("bob")
    alice = net.chat("alice")
    # The lab's server read this as one command: a message "a\nmsg bob b" to bob.
    alice.send("msg bob a\nmsg bob b\n")
    alice.send("msg bob c\n")
    bob.expect("[PRIVATE from alice]: a")
    bob.expect("[PRIVATE from alice]: b")
    bob.expect("[PRIVATE from alice]: c")


def test_the_file_port_username_may_come_with_or_without_a_newline(net):
    net.chat("carol")
    netcat = net.wire("file", "nc")
    netcat.send("carol\n")
    assert netcat.recv_once() == FILE_GREETING
    net.chat("dave", lab=True)
    lab = net.wire("file", "lab")
    lab.send("dave")
    assert lab.recv_once() == FILE_GREETING


def test_uploads_back_to_back_in_one_segment_are_each_delivered(net, data_dir):
    alice_chat = net.chat("alice")
    alice_files = net.file("alice")
    bob_chat = net.chat("bob")
    bob_files = net.file("bob")
    files = {"one.bin": os.urandom(1000), "two.txt": b"second\nfile|with|pipes\n"}
    alice_files.send(
        f"alice|bob|one.bin|{len(files['one.bin'])}\n".encode()
        + files["one.bin"]
        # An empty line between uploads is ignored; a CRLF header is fine.
        + f"\nalice|bob|two.txt|{len(files['two.txt'])}\r\n".encode()
        + files["two.txt"]
    )
    # Each arrives whole, header then exactly its bytes (their order is checked in
    # test_a_senders_files_reach_a_recipient_in_the_order_sent).
    got = {}
    for _ in files:
        sender, name, size = bob_files.line().split("|")
        assert (sender, int(size)) == ("alice", len(files[name]))
        got[name] = bob_files.recv_exact(int(size))
    assert got == files
    notices = {bob_chat.line(), bob_chat.line()}
    assert notices == {
        f"[FILE] alice sent you file '{name}' ({len(body)} bytes). Incoming on file socket."
        for name, body in files.items()
    }
    for name, body in files.items():
        assert server_copy(data_dir / f"received_from_alice_{name}") == body
    bob_chat.send("FILE_RECEIVED|alice|one.bin\nFILE_RECEIVED|alice|two.txt\n")
    alice_chat.expect("[ACK] bob received file 'one.bin'")
    alice_chat.expect("[ACK] bob received file 'two.txt'")


def test_a_senders_files_reach_a_recipient_in_the_order_sent(net):
    net.chat("alice")
    net.chat("bob")
    alice_files = net.file("alice")
    bob_files = net.file("bob")
    sent = [f"part{i:02}.txt" for i in range(30)]
    # How often the order breaks depends on scheduling: try up to 50 batches.
    for _attempt in range(50):
        alice_files.send(b"".join(f"alice|bob|{name}|3\n".encode() + b"abc" for name in sent))
        received = []
        for _ in sent:
            received.append(bob_files.line().split("|")[1])
            assert bob_files.recv_exact(3) == b"abc"
        assert received == sent
