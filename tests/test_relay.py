"""The file relay streams: cut-through, parallel group delivery, slow recipients that slow
nobody else, and flat server memory whatever the file size."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
from pathlib import Path

import pytest
from relaychat import Client, FileReceived, Welcome

from tests.conftest import start_server, stop_server, vm

REPO = Path(__file__).resolve().parent.parent


def raw_file_socket(port: int, username: str, rcvbuf: int | None = None) -> socket.socket:
    """A file connection that has done its handshake and then reads only when told to
    (with a small receive window if `rcvbuf` is given: set before connecting)."""
    s = socket.socket()
    if rcvbuf is not None:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(10)
    s.connect(("127.0.0.1", port))
    s.sendall(f"{username}\n".encode())
    assert s.recv(1024) == b"FILE_SOCKET_CONNECTED\n"
    return s


def raw_chat(port: int, username: str) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(f"{username}\n".encode())
    assert s.recv(1024) == f"Welcome, {username}!\n".encode()
    return s


def client(srv, name: str, downloads: Path) -> Client:
    c = Client("127.0.0.1", srv.chat_port, srv.file_port, username=name, download_dir=downloads)
    assert isinstance(c.next_event(timeout=5), Welcome)
    return c


def wait_received(c: Client, timeout: float = 30) -> FileReceived:
    for event in c.events(timeout=timeout):
        if isinstance(event, FileReceived):
            return event
    raise AssertionError(f"{c.username} received no file")


def test_recipients_receive_while_the_upload_is_still_arriving(server):
    with (
        raw_chat(server.chat_port, "bob") as bob_chat,
        raw_chat(server.chat_port, "alice") as alice_chat,
    ):
        bob_files = raw_file_socket(server.file_port, "bob")
        alice_files = raw_file_socket(server.file_port, "alice")
        with bob_files, alice_files:
            body = os.urandom(2_000_000)
            alice_files.sendall(f"alice|bob|big.bin|{len(body)}\n".encode())
            alice_files.sendall(body[:1_000_000])
            # Bob gets the header and the first bytes while half the upload is unsent.
            head = b""
            while b"\n" not in head:
                chunk = bob_files.recv(65536)
                assert chunk, "bob's file connection closed"
                head += chunk
            header, _, first = head.partition(b"\n")
            assert header == f"alice|big.bin|{len(body)}".encode()
            while len(first) == 0:
                chunk = bob_files.recv(65536)
                assert chunk, "bob's file connection closed"
                first += chunk
            assert body.startswith(first)
            alice_files.sendall(body[1_000_000:])
            got = bytearray(first)
            while len(got) < len(body):
                chunk = bob_files.recv(1 << 20)
                assert chunk, "bob's file connection closed early"
                got += chunk
            assert bytes(got) == body
        del bob_chat, alice_chat


def test_a_stalled_group_member_slows_neither_the_sender_nor_the_others(server, tmp_path):
    payload = tmp_path / "video.bin"
    payload.write_bytes(os.urandom(48 * 1024 * 1024))
    sara = client(server, "sara", tmp_path / "sara")
    ahmad = client(server, "ahmad", tmp_path / "ahmad")
    yasser = client(server, "yasser", tmp_path / "yasser")
    with sara, ahmad, yasser, raw_chat(server.chat_port, "sleepy") as sleepy_chat:
        # sleepy never reads its file socket: 48 MB cannot fit in its socket buffers.
        sleepy_files = raw_file_socket(server.file_port, "sleepy", rcvbuf=4096)
        with sleepy_files:
            for c in (sara, ahmad, yasser):
                c.join("team")
            sleepy_chat.sendall(b"join team\n")
            assert sleepy_chat.recv(1024) == b"You joined group 'team'\n"
            assert yasser.send_file("GROUP:team", payload) == payload.stat().st_size
            digest = hashlib.sha256(payload.read_bytes()).digest()
            for c in (sara, ahmad):
                got = wait_received(c)
                assert got.sender == "yasser"
                assert hashlib.sha256(got.path.read_bytes()).digest() == digest
        del sleepy_chat


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_server_memory_stays_flat_for_a_file_far_larger_than_its_buffers(tmp_path):
    """A 512 MB relay through a server subprocess: its peak RSS stays far below the file."""
    size = 512 * 1024 * 1024
    big = tmp_path / "big.bin"
    with big.open("wb") as f:
        block = os.urandom(1 << 20)
        for _ in range(size >> 20):
            f.write(block)
    proc, ports, _ = start_server(tmp_path)
    try:
        baseline = vm("VmHWM", proc.pid)

        class Ports:
            chat_port, file_port = ports["CHAT"], ports["FILE"]

        with (
            client(Ports, "alice", tmp_path / "a") as alice,
            client(Ports, "bob", tmp_path / "b") as bob,
        ):
            assert alice.send_file("bob", big) == size
            got = wait_received(bob, timeout=120)
            assert got.size == size
            assert got.path.stat().st_size == size
        peak = vm("VmHWM", proc.pid)
        print(f"server VmHWM: {baseline} KiB at start, {peak} KiB after a {size >> 20} MiB relay")
        assert peak < 64 * 1024, f"server peak RSS {peak} KiB for a {size >> 20} MiB file"
    finally:
        assert stop_server(proc) == 0


def test_two_transfers_to_one_recipient_never_interleave(server, tmp_path):
    """alice and carol upload to bob at the same time; both files arrive intact."""
    files = {}
    for name in ("alice", "carol"):
        files[name] = tmp_path / f"from-{name}.bin"
        files[name].write_bytes(os.urandom(8 * 1024 * 1024))
    bob = client(server, "bob", tmp_path / "bob")
    senders = {name: client(server, name, tmp_path / name) for name in files}
    with bob, senders["alice"], senders["carol"]:
        threads = [
            threading.Thread(target=senders[n].send_file, args=("bob", files[n])) for n in files
        ]
        for t in threads:
            t.start()
        received = {wait_received(bob).sender for _ in files}
        for t in threads:
            t.join(timeout=30)
        assert set(received) == set(files)
        for name, path in files.items():
            saved = tmp_path / "bob" / f"received_from_{name}_{path.name}"
            assert saved.read_bytes() == path.read_bytes()
