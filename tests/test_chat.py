"""Chat commands: msg, broadcast, list, join and send_group; their usage lines, unknown
commands, malformed acknowledgement lines and odd input (the lab report §6 scenario 1, §7).

Each scenario test counts what every user got: the expected lines exactly once, and nothing
else before a closing marker (see `drain`)."""

from __future__ import annotations

import threading
from collections import Counter

import pytest
from relaychat import BroadcastMessage, GroupList, Left, NotInGroup, PrivateMessage

from tests.conftest import drain, lines, next_of

# --- the lab report's scenario 1 (§6): concurrent messages -------------------------------


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


# --- usage lines, unknown commands, odd input --------------------------------------------


USAGE_MSG = "Usage: msg <username> <message>"


UNKNOWN = "Unknown command. Use msg/broadcast/list/join/send_group"


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


def test_blank_lines_are_ignored(net):
    alice = net.chat("alice")
    alice.send(b"\n\r\n   \n\t\nlist\n")
    alice.expect("Connected users: ")


# --- leave, groups, members ----------------------------------------------------------------


def test_groups_members_and_leave(net):
    alice, bob = net.chat("alice"), net.chat("bob")
    for wire, group in [(alice, "devs"), (bob, "devs"), (alice, "ops")]:
        wire.send(f"join {group}\n")
        wire.expect(f"You joined group '{group}'")
    alice.send("groups\n")
    alice.expect("Your groups: devs, ops")
    bob.send("members devs\n")
    bob.expect("Members of 'devs': alice, bob")
    bob.send("members ops\n")
    bob.expect("You are not in group 'ops'")  # only members see who is in a group
    alice.send("leave devs\n")
    alice.expect("You left group 'devs'")
    alice.send("send_group devs still here?\n")
    alice.expect("You are not in group 'devs'")
    alice.send("leave devs\n")
    alice.expect("You are not in group 'devs'")
    bob.send("members devs\n")
    bob.expect("Members of 'devs': bob")
    bob.send("leave devs\n")
    bob.expect("You left group 'devs'")
    bob.send("groups\n")
    bob.expect("Your groups: ")
    for line, usage in [
        ("leave", "Usage: leave <group_name>"),
        ("members", "Usage: members <group_name>"),
    ]:
        bob.send(f"{line}\n")
        bob.expect(usage)


def test_the_client_leaves_and_hears_it_as_an_event(net):
    alice = net.client("alice")
    alice.join("devs")
    alice.leave("devs")
    assert next_of(alice, Left).group == "devs"
    alice.send_command("groups")
    assert next_of(alice, GroupList).groups == []
    alice.leave("devs")
    assert next_of(alice, NotInGroup).group == "devs"
