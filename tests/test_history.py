"""`history`: the last messages of a conversation one is part of, for registered users, with
the server's retention policy; and what survives a restart."""

from __future__ import annotations

import re

import pytest
from relaychat import HistoryEntry, PrivateMessage, RefusedError, Server

from tests.conftest import (
    HOST,
    PASSWORD,
    Net,
    log_in,
    next_of,
    register,
)

#: `[HISTORY 2026-11-29T14:00:00Z] alice: text`
ENTRY = re.compile(r"\[HISTORY (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ)\] ([^:]+): (.*)")


def test_history_shows_both_sides_of_a_conversation_oldest_first(net):
    for name in ("alice", "bob"):
        register(net, name)
    alice, bob = log_in(net, "alice"), log_in(net, "bob")
    alice.send("msg bob hi bob\n")
    bob.expect("[PRIVATE from alice]: hi bob")
    bob.send("msg alice hi alice: how are you?\n")
    alice.expect("[PRIVATE from bob]: hi alice: how are you?")
    carol = net.chat("carol")
    carol.send("msg bob not alice's business\n")
    bob.expect("[PRIVATE from carol]: not alice's business")

    alice.send("history bob\n")
    got = alice.lines_until(lambda line: line.startswith("[HISTORY END]"))
    assert got[-1] == "[HISTORY END] 2 messages"
    entries = [ENTRY.fullmatch(line).groups()[1:] for line in got[:-1]]
    assert entries == [("alice", "hi bob"), ("bob", "hi alice: how are you?")]

    alice.send("history bob 1\n")
    got = alice.lines_until(lambda line: line.startswith("[HISTORY END]"))
    assert [ENTRY.fullmatch(line).group(3) for line in got[:-1]] == ["hi alice: how are you?"]

    for bad in ("history bob 0", "history bob many", "history bob 5 more"):
        alice.send(bad + "\n")
        alice.expect("ERROR: usage: history <username|GROUP:group_name> [count], count from 1")
    alice.send("history\n")
    alice.expect("Usage: history <username|GROUP:group_name> [count]")


def test_a_group_history_is_for_its_members(net):
    for name in ("alice", "bob"):
        register(net, name)
    alice, bob = log_in(net, "alice"), log_in(net, "bob")
    for wire in (alice, bob):
        wire.send("join devs\n")
        wire.expect("You joined group 'devs'")
    for i in range(3):
        alice.send(f"send_group devs update {i}\n")
        bob.expect(f"[GROUP devs] alice: update {i}")
    bob.send("history GROUP:devs 2\n")
    got = bob.lines_until(lambda line: line.startswith("[HISTORY END]"))
    assert [ENTRY.fullmatch(line).group(3) for line in got[:-1]] == ["update 1", "update 2"]
    bob.send("leave devs\n")
    bob.expect("You left group 'devs'")
    bob.send("history GROUP:devs\n")
    bob.expect("You are not in group 'devs'")


def test_what_a_name_said_as_a_guest_is_not_its_new_owners_history(net):
    register(net, "bob")
    bob = log_in(net, "bob")
    stranger = net.chat("alice")  # a guest, before anyone registered "alice"
    stranger.send("msg bob a guest's secret\n")
    bob.expect("[PRIVATE from alice]: a guest's secret")
    stranger.send(f"register {PASSWORD}\n")  # now someone owns the name
    stranger.expect("Registered alice.")
    stranger.send("history bob\n")
    stranger.expect("[HISTORY END] 0 messages")
    bob.send("msg alice welcome\n")
    stranger.expect("[PRIVATE from bob]: welcome")
    stranger.send("history bob\n")
    got = stranger.lines_until(lambda line: line.startswith("[HISTORY END]"))
    assert [ENTRY.fullmatch(line).group(3) for line in got[:-1]] == ["welcome"]


def test_guests_have_no_history(net):
    guest = net.chat("guest")
    guest.send("history bob\n")
    guest.expect("ERROR: history needs an account (register first)")


def test_a_huge_count_is_cut_to_the_limit_and_every_message_is_kept(net):
    register(net, "alice")
    alice = log_in(net, "alice")
    alice.send("".join(f"msg alice note {i}\n" for i in range(1500)))
    alice.lines_until(lambda line: line == "[PRIVATE from alice]: note 1499")
    alice.send("history alice 99999999999999999999\n")
    alice.expect("ERROR: usage: history <username|GROUP:group_name> [count], count from 1")
    alice.send("history alice 5000\n")
    got = alice.lines_until(lambda line: line.startswith("[HISTORY END]"), timeout=30)
    assert got[-1] == "[HISTORY END] 1000 messages"
    assert ENTRY.fullmatch(got[0]).group(3) == "note 500"


def test_history_survives_a_restart_and_the_api_returns_entries(tmp_path):
    data = tmp_path / "data"
    with Server(HOST, 0, 0, data) as srv:
        net = Net(srv, tmp_path)
        try:
            register(net, "alice")
            alice = net.client("alice", PASSWORD)
            alice.msg("alice", "'); DROP TABLE history; --")
            # Delivered, so the server has it (a line still in flight at the stop is not).
            said = next_of(alice, PrivateMessage)
            assert (said.sender, said.text) == ("alice", "'); DROP TABLE history; --")
        finally:
            net.close()
    with Server(HOST, 0, 0, data) as srv:
        net = Net(srv, tmp_path)
        try:
            alice = net.client("alice", PASSWORD)
            entries = alice.history("alice")
            assert [(e.sender, e.text) for e in entries] == [
                ("alice", "'); DROP TABLE history; --")
            ]
            assert all(isinstance(e, HistoryEntry) for e in entries)
            guest = net.client("guest")
            with pytest.raises(RefusedError, match="history needs an account"):
                guest.history("alice")
        finally:
            net.close()


def test_history_off_keeps_nothing(tmp_path):
    with Server(HOST, 0, 0, tmp_path / "data", history=False) as srv:
        net = Net(srv, tmp_path)
        try:
            register(net, "alice")
            alice = log_in(net, "alice")
            alice.send("history alice\n")
            alice.expect("ERROR: history is off on this server")
        finally:
            net.close()
