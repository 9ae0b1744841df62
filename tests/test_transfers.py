"""Transfers between our client and our server: end-to-end BLAKE3 integrity (a bit flipped
on the way up or down is caught and the file never gets its name), refused uploads that
cost no body bytes, a lab client's refused body that is skipped within a second or closes
the connection, and progress events (docs/PROTOCOL.md §9).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from relaychat import (
    Ack,
    Client,
    FileFailed,
    FileReceived,
    RefusedError,
    ServerError,
    TransferProgress,
    Welcome,
)

from tests.conftest import HOST, TIMEOUT, Net, next_of, random_file, saved, wait_gone
from tests.proxy import Proxy

#: Far enough into the file connection's stream to be inside a body of 1 MB.
INSIDE_THE_BODY = 100_000


def via(net: Net, proxy: Proxy, name: str) -> Client:
    """Our client with its file connection through `proxy` (the chat goes direct)."""
    client = Client(
        HOST,
        net.server.chat_port,
        proxy.port,
        username=name,
        download_dir=net.downloads(name),
        timeout=TIMEOUT,
    )
    net.adopt_client(client)
    assert next_of(client, Welcome).user == name
    return client


def events_until(client: Client, kind: type, timeout: float = 30.0) -> list:
    """The client's events up to and including the first `kind`."""
    seen = []
    deadline = time.monotonic() + timeout
    while True:
        event = client.next_event(timeout=max(0.0, deadline - time.monotonic()))
        assert event is not None, f"{client.username}: no {kind.__name__} in {seen!r}"
        seen.append(event)
        if isinstance(event, kind):
            return seen


def without_progress(events: list) -> list:
    return [e for e in events if not isinstance(e, TransferProgress)]


def test_a_bit_flipped_on_the_way_up_is_caught_and_never_saved(net, tmp_path, data_dir):
    proxy = Proxy(net.server.file_port, flip_up=INSIDE_THE_BODY)
    try:
        alice = via(net, proxy, "alice")
        bob = net.client("bob")
        body = random_file(tmp_path / "data.bin", 1_000_000)
        with pytest.raises(RefusedError, match=r"'data.bin' arrived corrupted \(BLAKE3 "):
            alice.send_file("bob", body)
        # Bob was receiving it (cut-through): his client is told, and keeps nothing.
        events = without_progress(events_until(bob, FileFailed))
        assert isinstance(events[-1], FileFailed), events
        assert "arrived corrupted" in events[-1].reason
        assert saved(net.downloads("bob")) == []
        assert not any(p.name.startswith("received_from_alice") for p in data_dir.iterdir())
        # The file connection is in step: the next file goes through whole.
        again = random_file(tmp_path / "again.bin", 200_000)
        alice.send_file("bob", again)
        received = next(e for e in events_until(bob, FileReceived) if isinstance(e, FileReceived))
        assert Path(received.path).read_bytes() == again.read_bytes()
    finally:
        proxy.close()


def test_a_bit_flipped_on_the_way_down_is_caught_and_never_renamed(net, tmp_path):
    proxy = Proxy(net.server.file_port, flip_down=INSIDE_THE_BODY)
    try:
        bob = via(net, proxy, "bob")
        alice = net.client("alice")
        body = random_file(tmp_path / "data.bin", 1_000_000)
        alice.send_file("bob", body)  # the server has it whole and good
        failed = without_progress(events_until(bob, FileFailed))[-1]
        assert "'data.bin' from alice arrived corrupted" in failed.reason
        assert saved(net.downloads("bob")) == []
        # The uploader hears of it instead of waiting for an [ACK].
        error = next(e for e in events_until(alice, ServerError) if isinstance(e, ServerError))
        assert error.reason == "'data.bin' could not be saved by bob: it arrived corrupted"
    finally:
        proxy.close()


def test_a_refused_upload_costs_no_body_bytes_and_the_connection_stays_usable(limited, tmp_path):
    net = limited(max_file_size=1000)
    proxy = Proxy(net.server.file_port)
    try:
        alice = via(net, proxy, "alice")
        big = random_file(tmp_path / "big.bin", 5_000_000)
        with pytest.raises(RefusedError, match=r"file too large: 5000000 bytes \(limit 1000\)"):
            alice.send_file("alice", big)
        # The header went up, not the body.
        assert proxy.bytes["up"] < 1000, proxy.bytes
        small = random_file(tmp_path / "small.bin", 500)
        assert alice.send_file("alice", small) == 500
    finally:
        proxy.close()


def test_a_lab_clients_refused_body_that_keeps_coming_closes_its_file_connection(limited):
    net = limited(max_file_size=1000)
    chat = net.chat("lab", lab=True)
    files = net.file("lab", lab=True)
    files.send("lab|lab|big.bin|10000000\n")
    chat.expect("ERROR: file too large: 10000000 bytes (limit 1000)")
    # The body trickles in: the server does not sink it for long.
    started = time.monotonic()
    closed = False
    while time.monotonic() - started < 5:
        try:
            files.send(b"x" * 1000)
        except OSError:
            closed = True
            break
        try:
            files.sock.settimeout(0.05)
            if files.sock.recv(1) == b"":
                closed = True
                break
        except TimeoutError:
            pass
        except OSError:
            closed = True
            break
    assert closed, "the file connection kept swallowing a refused body"
    assert time.monotonic() - started < 3
    # The chat session goes on.
    chat.send("list")
    chat.expect("Connected users: ")


def test_progress_is_reported_both_ways_monotonic_and_ends_at_the_total(net, tmp_path):
    alice, bob = net.client("alice", progress=True), net.client("bob", progress=True)
    body = random_file(tmp_path / "big.bin", 20_000_000)
    started = time.monotonic()
    alice.send_file("bob", body)
    downs = [e for e in events_until(bob, FileReceived) if isinstance(e, TransferProgress)]
    ups = [e for e in events_until(alice, Ack) if isinstance(e, TransferProgress)]
    elapsed = time.monotonic() - started
    for series, direction, peer in ((ups, "upload", "bob"), (downs, "download", "alice")):
        assert series, direction
        assert {(e.direction, e.peer, e.filename, e.total) for e in series} == {
            (direction, peer, "big.bin", 20_000_000)
        }
        dones = [e.done for e in series]
        assert dones == sorted(dones)
        assert dones[-1] == 20_000_000
        # At most 10 a second (and the first and the last).
        assert len(series) <= elapsed * 10 + 2, (len(series), elapsed)
        assert all(e.rate > 0 for e in series[1:])
    # Without `progress=True` there are none: the events are the lab's.
    carol = net.client("carol")
    alice.send_file("carol", body)
    assert not [e for e in events_until(carol, FileReceived) if isinstance(e, TransferProgress)]


@pytest.mark.parametrize("cut_at", [300_000, 2_500_000])
def test_a_broken_upload_resumes_and_sends_only_the_rest(net, tmp_path, data_dir, cut_at):
    proxy = Proxy(net.server.file_port, cut_up=cut_at)
    try:
        alice = via(net, proxy, "alice")
        bob = net.client("bob")
        body = random_file(tmp_path / "data.bin", 4_000_000)
        # The file connection breaks mid-body; the client re-opens it and sends the same
        # upload again, and the server takes it from the byte it has.
        assert alice.send_file("bob", body) == 4_000_000
        size = body.stat().st_size
        # Everything crossed the proxy about once: the rest was not sent again.
        assert proxy.bytes["up"] < size + 100_000, proxy.bytes
        assert (data_dir / "received_from_alice_data.bin").read_bytes() == body.read_bytes()
        received = next(e for e in events_until(bob, FileReceived) if isinstance(e, FileReceived))
        assert Path(received.path).read_bytes() == body.read_bytes()
    finally:
        proxy.close()


def broken_upload(net: Net, name: str, body: bytes, sent: int) -> None:
    """Our client's protocol by hand: a checked upload of `body` that breaks off after
    `sent` bytes; then `name` logs out."""
    chat = net.chat(name)
    chat.send("relaychat/1\n")
    chat.expect("[HELLO] relaychat/1")
    files = net.file(name)
    files.send(f"{name}|{name}|data.bin|{len(body)}|b3\n")
    chat.expect("[UPLOAD READY] 0")
    files.send(body[:sent])
    files.close()
    chat.expect(f"[UPLOAD KEPT] {sent}")
    chat.close()
    wait_gone(net, name)


def test_an_upload_resumes_only_where_the_kept_bytes_are_the_files(net, tmp_path, data_dir):
    original = random_file(tmp_path / "data.bin", 2_000_000).read_bytes()
    proxy = Proxy(net.server.file_port)
    try:
        # Resumed: the kept 700,000 bytes are the file's, only the rest goes.
        broken_upload(net, "alice", original, 700_000)
        alice = via(net, proxy, "alice")
        assert alice.send_file("alice", tmp_path / "data.bin") == 2_000_000
        assert proxy.bytes["up"] < 2_000_000 - 600_000, proxy.bytes
        assert (data_dir / "received_from_alice_data.bin").read_bytes() == original
        alice.close()
        wait_gone(net, "alice")

        # Started over: the file changed while its upload was broken (same name and size).
        broken_upload(net, "carol", original, 700_000)
        changed = bytes([original[0] ^ 0xFF]) + original[1:]
        (tmp_path / "data.bin").write_bytes(changed)
        carol = net.client("carol")
        assert carol.send_file("carol", tmp_path / "data.bin") == 2_000_000
        assert (data_dir / "received_from_carol_data.bin").read_bytes() == changed
    finally:
        proxy.close()


@pytest.mark.parametrize("cut_at", [400_000, 3_000_000])
def test_a_broken_download_resumes_and_gets_only_the_rest(net, tmp_path, cut_at):
    proxy = Proxy(net.server.file_port, cut_down=cut_at)
    try:
        bob = via(net, proxy, "bob")
        alice = net.client("alice")
        body = random_file(tmp_path / "data.bin", 4_000_000)
        alice.send_file("bob", body)
        events = events_until(bob, FileReceived)
        assert not [e for e in events if isinstance(e, FileFailed)], events
        received = events[-1]
        assert Path(received.path).read_bytes() == body.read_bytes()
        # bob's side crossed the proxy about once: the rest, not a second copy.
        assert proxy.bytes["down"] < 4_000_000 + 100_000, proxy.bytes
        assert next(e for e in events_until(alice, Ack) if isinstance(e, Ack)).recipient == "bob"
    finally:
        proxy.close()


def test_when_both_ends_break_the_download_resumes_with_the_upload(net, tmp_path, data_dir):
    up = Proxy(net.server.file_port, cut_up=1_500_000)
    down = Proxy(net.server.file_port)
    try:
        bob = via(net, down, "bob")
        alice = via(net, up, "alice")
        body = random_file(tmp_path / "data.bin", 4_000_000)
        # The upload breaks (so does bob's forward, whose header promised the bytes); alice's
        # client resumes it, and bob gets the rest of his part once it does.
        assert alice.send_file("bob", body) == 4_000_000
        events = events_until(bob, FileReceived)
        assert not [e for e in events if isinstance(e, FileFailed)], events
        assert Path(events[-1].path).read_bytes() == body.read_bytes()
        assert up.bytes["up"] < 4_000_000 + 100_000, up.bytes
        # bob's side gets only the rest when his resume reaches the server before the upload
        # resumes (his connection is back in 0.1 s, alice's retry waits 0.4 s); otherwise a
        # fresh copy, which is still whole and checked.
    finally:
        up.close()
        down.close()


def extended(net: Net, name: str) -> tuple:
    """A raw session that speaks our extensions (hello said), and its file connection."""
    chat = net.chat(name)
    chat.send("relaychat/1\n")
    chat.expect("[HELLO] relaychat/1")
    return chat, net.file(name)


def test_only_a_recipient_in_the_same_session_may_resume_a_download(net, tmp_path):
    alice = net.client("alice")
    bob_chat, bob_files = extended(net, "bob")
    body = random_file(tmp_path / "secret.bin", 100_000)
    alice.send_file("bob", body)
    header = bob_files.line()
    assert header.startswith("alice|secret.bin|100000|b3,id="), header
    upload_id = int(header.rsplit("id=", 1)[1])
    assert bob_files.recv_exact(100_000) == body.read_bytes()
    assert bob_files.line().startswith("b3 ")

    # Someone else names the id: nothing is sent, and they are told why.
    mallory_chat, mallory_files = extended(net, "mallory")
    mallory_files.send(f"resume {upload_id} 0\n")
    mallory_chat.expect(f"[RESUME FAILED] {upload_id} it was not sent to you")
    mallory_files.assert_silent()

    # bob (this session) may: he gets the rest from the saved copy.
    bob_files.send(f"resume {upload_id} 60000\n")
    assert bob_files.line() == f"alice|secret.bin|100000|b3,id={upload_id},at=60000"
    assert bob_files.recv_exact(40_000) == body.read_bytes()[60_000:]
    assert bob_files.line().startswith("b3 ")

    # A guest who takes the name later is another session: refused.
    bob_chat.close()
    bob_files.close()
    wait_gone(net, "bob")
    new_chat, new_files = extended(net, "bob")
    new_files.send(f"resume {upload_id} 0\n")
    new_chat.expect(f"[RESUME FAILED] {upload_id} it was not sent to you")


# --- compression (zstd) ---------------------------------------------------------------------


def text_file(path: Path, size: int) -> Path:
    """`size` bytes of chat-log-like text: it compresses well."""
    lines = (f"{i:08d} alice -> bob: see you at the standup, room {i % 17}\n" for i in range(size))
    text = "".join(next(lines) for _ in range(size // 40 + 1)).encode()[:size]
    path.write_bytes(text)
    return path


def test_compressed_text_crosses_the_wire_smaller_and_everyone_gets_the_original(
    net, tmp_path, data_dir
):
    up = Proxy(net.server.file_port)
    down = Proxy(net.server.file_port)
    try:
        alice = via(net, up, "alice")
        bob = via(net, down, "bob")
        # A lab client in the same group gets the lab's header and the original bytes.
        carol_chat = net.chat("carol", lab=True)
        carol_files = net.file("carol", lab=True)
        for client in (alice, bob):
            client.join("team")
        carol_chat.send("join team")
        carol_chat.expect("You joined group 'team'")
        body = text_file(tmp_path / "log.txt", 4_000_000)
        size = body.stat().st_size
        assert alice.send_file("GROUP:team", body, compress=True) == size
        assert up.bytes["up"] < size // 5, up.bytes
        assert (data_dir / "received_from_alice_log.txt").read_bytes() == body.read_bytes()
        received = next(e for e in events_until(bob, FileReceived) if isinstance(e, FileReceived))
        assert Path(received.path).read_bytes() == body.read_bytes()
        assert down.bytes["down"] < size // 5, down.bytes
        assert carol_files.line() == f"alice|log.txt|{size}"
        assert carol_files.recv_exact(size) == body.read_bytes()
    finally:
        up.close()
        down.close()


def test_auto_compresses_only_what_shrinks_and_only_for_another_machine(
    net, tmp_path, data_dir, outside
):
    text = text_file(tmp_path / "log.txt", 1_000_000)
    noise = random_file(tmp_path / "noise.bin", 1_000_000)
    # On this machine (loopback) bytes are cheaper than compressing them: never.
    local = Proxy(net.server.file_port)
    try:
        alice = via(net, local, "alice")
        alice.send_file("alice", text)
        assert local.bytes["up"] >= 1_000_000, local.bytes
        alice.close()
        wait_gone(net, "alice")
    finally:
        local.close()
    # From another machine: text goes compressed, random bytes as they are.
    chat = Proxy(net.server.chat_port, host=outside)
    files = Proxy(net.server.file_port, host=outside)
    try:
        bob = Client(outside, chat.port, files.port, username="bob", timeout=TIMEOUT)
        net.adopt_client(bob)
        assert next_of(bob, Welcome).user == "bob"
        bob.send_file("bob", text)
        assert files.bytes["up"] < 1_000_000 // 5, files.bytes
        before = files.bytes["up"]
        bob.send_file("bob", noise)
        assert files.bytes["up"] - before >= 1_000_000, files.bytes
        assert (data_dir / "received_from_bob_log.txt").read_bytes() == text.read_bytes()
        assert (data_dir / "received_from_bob_noise.bin").read_bytes() == noise.read_bytes()
    finally:
        chat.close()
        files.close()


@pytest.mark.parametrize("way", ["up", "down"])
def test_a_broken_compressed_transfer_resumes_and_arrives_whole(net, tmp_path, data_dir, way):
    body = text_file(tmp_path / "log.txt", 8_000_000)
    # Inside the compressed stream (about 1/20 of the file).
    proxy = Proxy(net.server.file_port, **{f"cut_{way}": 120_000})
    try:
        if way == "up":
            alice, bob = via(net, proxy, "alice"), net.client("bob")
        else:
            bob, alice = via(net, proxy, "bob"), net.client("alice")
        assert alice.send_file("bob", body, compress=True) == body.stat().st_size
        events = events_until(bob, FileReceived)
        assert not [e for e in events if isinstance(e, FileFailed)], events
        assert Path(events[-1].path).read_bytes() == body.read_bytes()
        assert (data_dir / "received_from_alice_log.txt").read_bytes() == body.read_bytes()
        # The rest only, compressed: far less than the file went through the proxy.
        assert proxy.bytes[way] < body.stat().st_size // 5, proxy.bytes
    finally:
        proxy.close()
