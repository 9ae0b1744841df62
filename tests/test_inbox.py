"""Store and forward: messages for a registered user who is away are kept and arrive at their
next login, as the lines they would have been, oldest first, before anything live; groups of
registered users outlast their connections; nothing is lost to a kill -9."""

from __future__ import annotations

import contextlib
import os
import signal
import threading

from relaychat import Client, GroupMessage, MessageQueued, PrivateMessage, ServerError, UserNotFound

from tests.conftest import (
    PASSWORD,
    TIMEOUT,
    Net,
    Wire,
    connected,
    drain,
    log_in,
    log_in_at,
    next_of,
    register,
    start_server,
    stop_server,
    wait_gone,
    wait_until,
)


def test_a_message_to_a_registered_user_who_is_away_waits_for_them(net):
    register(net, "bob")
    alice = net.chat("alice")
    alice.send("msg bob are you there?\n")
    alice.expect("User bob is offline; message queued.")
    alice.send("msg bob second\n")
    alice.expect("User bob is offline; message queued.")
    alice.send("msg nobody hi\n")
    alice.expect("User nobody not found.")

    # A lab-style login: right after the welcome, the lines it would have got live.
    bob = net.wire("chat", "bob")
    bob.send("bob")
    bob.expect("Password for bob:")
    bob.send(PASSWORD)
    bob.expect("Welcome, bob!")
    bob.expect("[PRIVATE from alice]: are you there?")
    bob.expect("[PRIVATE from alice]: second")
    alice.send("msg bob live now\n")
    bob.expect("[PRIVATE from alice]: live now")
    # The lab's client cannot confirm what it got; a line after it shows it went on.
    bob.send("list")
    assert bob.line().startswith("Connected users: ")
    bob.close()

    # Delivered once: the next login finds the inbox empty.
    again = log_in(net, "bob")
    alice.send("msg bob marker\n")
    again.expect("[PRIVATE from alice]: marker")


def inbox_delivered(net: Net, known_by: str) -> float:
    """How many queued messages the server has forgotten as delivered, `known_by`
    `confirmed` (our client said so) or `session_went_on` (a client that cannot)."""
    figures = net.server.stats()["relaychat_inbox_delivered_total"]
    assert isinstance(figures, dict)
    return figures[known_by]


def queue_for_bob(net: Net, *texts: str) -> Wire:
    register(net, "bob")
    alice = net.chat("alice")
    for text in texts:
        alice.send(f"msg bob {text}\n")
        alice.expect("User bob is offline; message queued.")
    return alice


def assert_inbox_empty_next_time(net: Net, bob: Wire | Client, alice: Wire) -> None:
    """`bob` leaves; at its next login, the first line is one sent after it."""
    bob.close()
    wait_gone(net, "bob")
    again = log_in(net, "bob")
    alice.send("msg bob marker\n")
    again.expect("[PRIVATE from alice]: marker")


def test_a_client_that_leaves_before_it_could_have_read_gets_the_inbox_again(net):
    """Written to the socket is not delivered: a lab-style session that ends at once
    (sending nothing, before `inbox_settle`) leaves its inbox for the next login."""
    queue_for_bob(net, "one", "two")
    for _ in range(2):
        bob = log_in(net, "bob", lab=True)
        bob.expect("[PRIVATE from alice]: one")
        bob.expect("[PRIVATE from alice]: two")
        bob.close()
        wait_gone(net, "bob")
    assert inbox_delivered(net, "session_went_on") == 0


def test_a_quiet_client_that_stays_connected_has_its_inbox_forgotten(limited):
    net = limited(inbox_settle=0.05)
    alice = queue_for_bob(net, "one", "two")
    bob = log_in(net, "bob", lab=True)
    bob.expect("[PRIVATE from alice]: one")
    bob.expect("[PRIVATE from alice]: two")
    wait_until(lambda: inbox_delivered(net, "session_went_on") == 2, what="forgotten")
    assert_inbox_empty_next_time(net, bob, alice)


def extended_log_in(net: Net, name: str) -> Wire:
    """A raw login that asks for the extensions before its password, as our client does."""
    wire = net.wire("chat", name)
    wire.send(f"{name}\n")
    wire.expect(f"Password for {name}:")
    wire.send(f"relaychat/1\n{PASSWORD}\n")
    wire.expect(f"Welcome, {name}!")
    assert wire.line().startswith("[SESSION] ")
    return wire


def test_our_protocol_forgets_the_inbox_only_when_the_client_confirms_it(net):
    alice = queue_for_bob(net, "one", "two")
    receipts = []
    for _ in range(2):
        bob = extended_log_in(net, "bob")
        got = bob.lines_until(lambda line: line.startswith("[INBOX] "))
        assert [line for line in got if not line.startswith("[QUEUED ")] == [
            "[PRIVATE from alice]: one",
            "[PRIVATE from alice]: two",
            got[-1],
        ], got
        receipts.append(int(got[-1].removeprefix("[INBOX] ")))
        # Not confirmed: it stays, even though this session goes on.
        bob.send("list\n")
        assert bob.line().startswith("Connected users: ")
        if len(receipts) == 1:
            bob.close()
            wait_gone(net, "bob")
    assert receipts[0] == receipts[1]
    upto = receipts[1]
    bob.send(f"INBOX_RECEIVED|{upto + 1}\n")
    bob.expect(f"ERROR: no queued messages up to {upto + 1} were sent to you")
    bob.send("INBOX_RECEIVED|soon\n")
    bob.expect("ERROR: malformed inbox receipt: expected INBOX_RECEIVED|<id>")
    bob.send(f"INBOX_RECEIVED|{upto}\n")
    bob.send("list\n")
    assert bob.line().startswith("Connected users: ")
    assert inbox_delivered(net, "confirmed") == 2
    bob.close()
    wait_gone(net, "bob")
    again = extended_log_in(net, "bob")
    alice.send("msg bob marker\n")
    again.expect("[PRIVATE from alice]: marker")


def test_our_client_confirms_its_inbox_so_the_next_login_finds_it_empty(net):
    alice = queue_for_bob(net, *(f"m{i}" for i in range(1200)))
    bob = net.client("bob", PASSWORD)
    texts = [next_of(bob, PrivateMessage).text for _ in range(1200)]
    assert texts == [f"m{i}" for i in range(1200)]
    # Three pages, each confirmed as soon as its messages were events.
    wait_until(lambda: inbox_delivered(net, "confirmed") == 1200, what="all confirmed")
    assert_inbox_empty_next_time(net, bob, alice)


def test_our_client_is_told_when_each_queued_message_was_sent(net):
    register(net, "bob")
    alice = net.client("alice")
    alice.msg("bob", "one")
    assert next_of(alice, MessageQueued).user == "bob"
    bob = net.client("bob", PASSWORD)
    first = next_of(bob, PrivateMessage)
    assert (first.sender, first.text) == ("alice", "one")
    assert first.queued_at is not None and first.queued_at.endswith("Z"), first.queued_at
    assert first.line == "[PRIVATE from alice]: one"
    alice.msg("bob", "two")
    assert next_of(bob, PrivateMessage).queued_at is None


def test_messages_sent_while_the_inbox_is_delivered_come_after_it(net):
    register(net, "bob")
    alice = net.chat("alice")
    queued = 3000
    alice.send("".join(f"msg bob q{i}\n" for i in range(queued)))
    for _ in range(queued):
        alice.expect("User bob is offline; message queued.")
    bob = net.wire("chat", "bob")
    bob.send("bob\n")
    bob.expect("Password for bob:")
    bob.send(f"{PASSWORD}\n")
    # Live messages race the delivery of the inbox: every one of them comes after it.
    alice.send("".join(f"msg bob live{i}\n" for i in range(100)))
    got = bob.lines_until(lambda line: line == "[PRIVATE from alice]: live99", timeout=30)
    assert got[0] == "Welcome, bob!"
    texts = [line.removeprefix("[PRIVATE from alice]: ") for line in got[1:]]
    assert texts == [f"q{i}" for i in range(queued)] + [f"live{i}" for i in range(100)]


def test_a_flood_during_the_replay_does_not_hold_the_user_back(net):
    """Messages that keep coming while the inbox is delivered wait behind it in memory:
    the replay ends, and the user's own commands are answered."""
    register(net, "bob")
    alice = net.chat("alice")
    alice.send("".join(f"msg bob q{i}\n" for i in range(500)))
    for _ in range(500):
        alice.expect("User bob is offline; message queued.")
    stop = threading.Event()

    def flood() -> None:
        flooder = net.chat("flooder")
        i = 0
        # The flooder reads none of its replies (`... message queued.` while bob is away),
        # so flow control may stop the server reading it: a send that times out ends the
        # flood, as it would end a real one.
        with contextlib.suppress(OSError):
            while not stop.is_set():
                flooder.send("".join(f"msg bob f{i + j}\n" for j in range(50)))
                i += 50

    thread = threading.Thread(target=flood)
    thread.start()
    try:
        bob = log_in(net, "bob")
        bob.send("groups\n")
        got = bob.lines_until(lambda line: line.startswith("Your groups:"), timeout=10)
    finally:
        stop.set()
        thread.join()
    queued = [line for line in got if ": q" in line]
    assert queued == [f"[PRIVATE from alice]: q{i}" for i in range(500)]


def test_group_messages_wait_for_registered_members_and_groups_outlast_connections(net):
    bob = net.chat("bob")
    bob.send("join devs\n")
    bob.expect("You joined group 'devs'")
    bob.send(f"register {PASSWORD}\n")  # groups joined as a guest are kept from now on
    bob.expect("Registered bob.")
    bob.send("join ops\n")
    bob.expect("You joined group 'ops'")
    bob.close()
    wait_gone(net, "bob")
    alice = net.client("alice")
    alice.join("devs")
    alice.send_command("members devs")
    assert alice.next_event(timeout=TIMEOUT).line == "Members of 'devs': bob, alice"

    alice.send_group("devs", "standup at 10")
    bob = log_in(net, "bob")
    bob.expect("[GROUP devs] alice: standup at 10")
    bob.send("groups\n")
    bob.expect("Your groups: devs, ops")
    bob.send("leave ops\n")
    bob.expect("You left group 'ops'")


def test_an_inbox_holds_only_so_many_messages(limited):
    net = limited(inbox_max=2)
    register(net, "bob")
    alice = net.client("alice")
    for text in ("one", "two"):
        alice.msg("bob", text)
        assert next_of(alice, MessageQueued).user == "bob"
    alice.msg("bob", "three")
    assert next_of(alice, ServerError).reason == "bob's inbox is full"
    bob = net.client("bob", PASSWORD)
    assert [next_of(bob, PrivateMessage).text for _ in range(2)] == ["one", "two"]
    # Delivered messages make room again.
    alice.msg("bob", "four")
    assert next_of(bob, PrivateMessage).text == "four"


def test_hostile_texts_are_kept_and_delivered_verbatim(net):
    register(net, "bob")
    alice = net.client("alice")
    texts = [
        "'); DROP TABLE inbox; --",
        "Robert'); DELETE FROM accounts WHERE ('1'='1",
        "\u202e\u0000 not really",
        "x" * 60_000,
    ]
    for text in texts:
        alice.send_command(f"msg bob {text}")
        assert next_of(alice, MessageQueued).user == "bob"
    bob = net.client("bob", PASSWORD)
    assert [next_of(bob, PrivateMessage).text for _ in texts] == texts
    assert drain(bob, alice) == []


def test_nothing_queued_is_lost_to_a_kill_9(tmp_path):
    """kill -9 right after `... message queued.`; the restarted server delivers it, once."""
    proc, ports, _ = start_server(tmp_path)
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
        wait_until(lambda: "bob" not in connected(alice), what="bob has left")
        alice.send("msg bob kept\n")
        alice.expect("User bob is offline; message queued.")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=TIMEOUT)
        alice.close()
    finally:
        stop_server(proc)

    proc, ports, _ = start_server(tmp_path)
    try:
        for login in ("first", "second"):
            bob = log_in_at(ports["CHAT"], "bob")
            bob.send("msg bob marker\n")  # to oneself: after whatever was queued
            got = bob.lines_until(lambda line: line.endswith("marker"))
            bob.close()
            queued = [line for line in got if "kept" in line]
            if login == "first":
                assert queued == ["[PRIVATE from alice]: kept"], got
            else:
                assert queued == [], f"delivered twice: {got}"
    finally:
        assert stop_server(proc) == 0


def test_the_python_api_sees_queued_and_not_found(net: Net):
    register(net, "bob")
    alice = net.client("alice")
    alice.msg("ghost", "hi")
    assert next_of(alice, UserNotFound).user == "ghost"
    alice.join("devs")
    bob = net.client("bob", PASSWORD)
    bob.join("devs")
    bob.close()
    wait_gone(net, "bob")
    alice.send_group("devs", "later")
    bob = net.client("bob", PASSWORD)
    event = next_of(bob, GroupMessage)
    assert (event.group, event.text, event.queued_at is not None) == ("devs", "later", True)


def test_a_full_disk_refuses_the_message_and_the_server_goes_on(tmp_path):
    """The store's file cannot grow (RLIMIT_FSIZE stands in for a full disk): the sender is
    told, nothing is claimed queued that is not, and chat goes on."""
    import resource
    import subprocess
    import sys

    from tests.conftest import REPO, TIMEOUT

    def limited() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write instead of dying
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    data = tmp_path / "data"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-u",
            "server.py",
            "--chat-port",
            "0",
            "--file-port",
            "0",
            "--data-dir",
            str(data),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=limited,
    )
    try:
        port = None
        for line in proc.stdout:
            if line.startswith("[CHAT SERVER] Listening on "):
                port = int(line.split()[-1])
                break
        assert port is not None
        threading.Thread(target=proc.stdout.read, daemon=True).start()
        bob = Wire(port, "bob")
        bob.send("bob\n")
        bob.expect("Welcome, bob!")
        bob.send(f"register {PASSWORD}\n")
        bob.expect("Registered bob.")
        bob.close()
        alice = Wire(port, "alice")
        alice.send("alice\n")
        alice.expect("Welcome, alice!")
        wait_until(lambda: "bob" not in connected(alice), what="bob has left")
        big = "x" * 60_000
        answers = []
        for _ in range(100):
            alice.send(f"msg bob {big}\n")
            answers.append(alice.line())
            if answers[-1].startswith("ERROR"):
                break
        assert answers[-1] == "ERROR: the server could not store that just now; try again later"
        queued = answers.count("User bob is offline; message queued.")
        assert queued == len(answers) - 1 and queued > 0
        # The server goes on: commands are answered, live messages delivered.
        carol = Wire(port, "carol")
        carol.send("carol\n")
        carol.expect("Welcome, carol!")
        alice.send("msg carol still here\n")
        carol.expect("[PRIVATE from alice]: still here")
        # What was claimed queued is there.
        bob = log_in_at(port, "bob")
        for _ in range(queued):
            bob.expect(f"[PRIVATE from alice]: {big}")
        for wire in (alice, bob, carol):
            wire.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=TIMEOUT * 2) == 0
        proc.stdout.close()
