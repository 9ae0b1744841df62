"""Our client against a server that behaves like the lab's (one recv per command, no line
splitting): every command the lab's server has must work."""

from __future__ import annotations

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

from tests.conftest import file_arrival, next_of, random_file
from tests.labstyle_server import LabStyleServer


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
