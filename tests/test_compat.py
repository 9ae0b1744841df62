"""Compatibility with the lab's programs, both ways.

A client that behaves like the lab's (bare usernames and commands with no newline, the
file-socket greeting read with one recv, automatic acknowledgements) against our server;
and our client against a server that behaves like the lab's (`tests/labstyle_server.py`:
one recv per command, no line splitting): every command the lab's server has must work."""

from __future__ import annotations

import os

import pytest
from relaychat import (
    Ack,
    BroadcastMessage,
    Client,
    FileIncoming,
    GroupMessage,
    PrivateMessage,
    UnknownCommand,
    UserNotFound,
    Welcome,
)

from tests.conftest import FILE_GREETING, file_arrival, next_of, random_file, server_copy
from tests.labstyle_server import LabStyleServer

# --- the lab's client against our server -------------------------------------------------


def test_a_lab_style_client_works_end_to_end(net, data_dir):
    # The lab's client sends the username on the chat socket and opens the file socket at
    # once, without waiting for the welcome, so both usernames arrive almost together.
    alice_chat = net.wire("chat", "alice")
    alice_chat.send("alice")
    alice_files = net.wire("file", "alice")
    alice_files.send("alice")
    # It reads the greeting with ONE recv (2 s timeout): the greeting must come alone.
    assert alice_files.recv_once(timeout=2) == FILE_GREETING
    alice_chat.expect("Welcome, alice!")

    bob_chat = net.wire("chat", "bob")
    bob_chat.send("bob")
    bob_files = net.wire("file", "bob")
    bob_files.send("bob")
    assert bob_files.recv_once(timeout=2) == FILE_GREETING
    bob_chat.expect("Welcome, bob!")

    alice_chat.send("list")
    alice_chat.expect("Connected users: bob")
    alice_chat.send("msg bob Hi Bob!")
    bob_chat.expect("[PRIVATE from alice]: Hi Bob!")
    bob_chat.send("broadcast Hello everyone!")
    alice_chat.expect("[BROADCAST from bob]: Hello everyone!")
    alice_chat.send("join devs")
    alice_chat.expect("You joined group 'devs'")
    bob_chat.send("join devs")
    bob_chat.expect("You joined group 'devs'")
    alice_chat.send("send_group devs Standup at 10 AM.")
    bob_chat.expect("[GROUP devs] alice: Standup at 10 AM.")
    alice_chat.send("msg nobody hi")
    alice_chat.expect("User nobody not found.")

    # A file, the lab's way: header with its newline in one send, then the bytes.
    body = os.urandom(70_000)
    alice_files.send(f"alice|bob|report.pdf|{len(body)}\n")
    alice_files.send(body)
    bob_chat.expect(
        f"[FILE] alice sent you file 'report.pdf' ({len(body)} bytes). Incoming on file socket."
    )
    assert bob_files.line() == f"alice|report.pdf|{len(body)}"
    assert bob_files.recv_exact(len(body)) == body

    # The lab's client acknowledges automatically (no newline), and the user types a
    # command right after: both take effect, separately.
    bob_chat.send("FILE_RECEIVED|alice|report.pdf")
    alice_chat.expect("[ACK] bob received file 'report.pdf'")
    bob_chat.send("msg alice thanks!")
    alice_chat.expect("[PRIVATE from bob]: thanks!")
    assert server_copy(data_dir / "received_from_alice_report.pdf") == body


# --- our client against the lab's server -------------------------------------------------


@pytest.fixture
def lab(tmp_path):
    data = tmp_path / "lab-data"
    data.mkdir()
    server = LabStyleServer(data)
    yield server
    server.close()


def connect(lab, name, tmp_path):
    downloads = tmp_path / name
    client = Client(
        "127.0.0.1", lab.chat_port, lab.file_port, username=name, download_dir=downloads
    )
    assert isinstance(client.next_event(timeout=5), Welcome)
    return client


def test_every_lab_command_works_from_our_client(lab, tmp_path):
    with connect(lab, "yasser", tmp_path) as yasser, connect(lab, "ahmad", tmp_path) as ahmad:
        assert yasser.list_users() == ["ahmad"]

        yasser.msg("ahmad", "Hi Ahmad!")
        assert next_of(ahmad, PrivateMessage).line == "[PRIVATE from yasser]: Hi Ahmad!"

        yasser.broadcast("Hello everyone!")
        assert next_of(ahmad, BroadcastMessage).text == "Hello everyone!"

        yasser.join("devs")
        ahmad.join("devs")
        yasser.send_group("devs", "Standup at 10 AM.")
        assert next_of(ahmad, GroupMessage).line == "[GROUP devs] yasser: Standup at 10 AM."

        yasser.msg("nobody", "hi")
        assert next_of(yasser, UserNotFound).user == "nobody"

        yasser.send_command("dance")
        assert isinstance(next_of(yasser, UnknownCommand), UnknownCommand)


def test_a_file_round_trip_with_the_labs_server(lab, tmp_path):
    report = random_file(tmp_path / "report.pdf", 300_000)
    with connect(lab, "yasser", tmp_path) as yasser, connect(lab, "ahmad", tmp_path) as ahmad:
        assert yasser.send_file("ahmad", report) == 300_000
        notice, received = file_arrival(ahmad)
        assert isinstance(notice, FileIncoming) and notice.size == 300_000
        assert received.path.name == "received_from_yasser_report.pdf"
        assert received.path.read_bytes() == report.read_bytes()
        assert next_of(yasser, Ack).line == "[ACK] ahmad received file 'report.pdf'"
    assert (lab.data_dir / "received_from_yasser_report.pdf").read_bytes() == report.read_bytes()
