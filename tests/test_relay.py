"""The file relay streams: cut-through, parallel group delivery, slow recipients that slow
nobody else, and flat server memory whatever the file size."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest
from relaychat import FileReceived

from tests.conftest import (
    FILE_GREETING,
    TIMEOUT,
    Net,
    Wire,
    file_arrival,
    start_server,
    stop_server,
    take,
    vm,
)


def test_recipients_receive_while_the_upload_is_still_arriving(net):
    net.chat("bob")
    net.chat("alice")
    bob_files = net.file("bob")
    alice_files = net.file("alice")
    body = os.urandom(2_000_000)
    alice_files.send(f"alice|bob|big.bin|{len(body)}\n".encode() + body[:1_000_000])
    # Bob gets the header and the first bytes while half the upload is unsent.
    assert bob_files.line() == f"alice|big.bin|{len(body)}"
    first = bob_files.recv_exact(1)
    alice_files.send(body[1_000_000:])
    assert first + bob_files.recv_exact(len(body) - 1) == body


def test_a_stalled_group_member_slows_neither_the_sender_nor_the_others(net, tmp_path):
    payload = tmp_path / "video.bin"
    payload.write_bytes(os.urandom(48 * 1024 * 1024))
    sara, ahmad, yasser = (net.client(name) for name in ("sara", "ahmad", "yasser"))
    sleepy_chat = net.chat("sleepy")
    # sleepy never reads its file socket: 48 MB cannot fit in its socket buffers.
    sleepy_files = net.adopt(Wire(net.server.file_port, "sleepy/file", rcvbuf=4096))
    sleepy_files.send("sleepy\n")
    assert sleepy_files.recv_exact(len(FILE_GREETING), TIMEOUT) == FILE_GREETING
    for c in (sara, ahmad, yasser):
        c.join("team")
    sleepy_chat.send("join team\n")
    sleepy_chat.expect("You joined group 'team'")
    assert yasser.send_file("GROUP:team", payload) == payload.stat().st_size
    digest = hashlib.sha256(payload.read_bytes()).digest()
    for c in (sara, ahmad):
        got = file_arrival(c)[1]
        assert got.sender == "yasser"
        assert hashlib.sha256(got.path.read_bytes()).digest() == digest


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

        net = Net(Ports, tmp_path)
        try:
            alice, bob = net.client("alice"), net.client("bob")
            assert alice.send_file("bob", big) == size
            got = file_arrival(bob, timeout=120)[1]
            assert got.size == size
            assert got.path.stat().st_size == size
        finally:
            net.close()
        peak = vm("VmHWM", proc.pid)
        print(f"server VmHWM: {baseline} KiB at start, {peak} KiB after a {size >> 20} MiB relay")
        assert peak < 64 * 1024, f"server peak RSS {peak} KiB for a {size >> 20} MiB file"
    finally:
        assert stop_server(proc) == 0


def test_two_transfers_to_one_recipient_never_interleave(net, tmp_path):
    """alice and carol upload to bob at the same time; both files arrive intact."""
    files = {}
    for name in ("alice", "carol"):
        files[name] = tmp_path / f"from-{name}.bin"
        files[name].write_bytes(os.urandom(8 * 1024 * 1024))
    bob = net.client("bob")
    senders = {name: net.client(name) for name in files}
    threads = [threading.Thread(target=senders[n].send_file, args=("bob", files[n])) for n in files]
    for t in threads:
        t.start()
    received = [e for e in take(bob, 4) if isinstance(e, FileReceived)]
    for t in threads:
        t.join(timeout=30)
    assert {e.sender for e in received} == set(files)
    for e in received:
        assert e.path.read_bytes() == files[e.sender].read_bytes()
