"""Persistence: the server keeps its state in one SQLite file, `<data-dir>/relaychat.db` unless
`Server(db=...)` / `--db` says otherwise (`:memory:` forgets at exit). What lives there today
is what the server already keeps beyond a connection (the per-user quota and the index of
saved files); a database it cannot trust is refused, never wiped."""

from __future__ import annotations

import sqlite3
import subprocess
import sys

import pytest
from relaychat import RelaychatError, Server

from tests.conftest import HOST, REPO, TIMEOUT, Net

REPO_SERVER = ["server.py", "--chat-port", "0", "--file-port", "0"]


def upload(net: Net, name: str, size: int) -> str:
    """alice sends bob a file of `size` bytes on a raw file connection; the chat reply."""
    alice_chat = net.chat("alice")
    alice_files = net.file("alice")
    alice_files.send(f"alice|bob|{name}|{size}\n".encode() + b"x" * size)
    try:
        return alice_chat.lines_until(lambda line: line.startswith(("ERROR", "User")))[-1]
    finally:
        alice_chat.close()
        alice_files.close()


def test_the_quota_counts_across_restarts(tmp_path):
    db = tmp_path / "state" / "relaychat.db"
    db.parent.mkdir()
    for attempt, want in [(1, "User bob has no file socket"), (2, "ERROR: upload quota")]:
        with Server(HOST, 0, 0, tmp_path / "data", db=db, user_quota=1500) as srv:
            assert srv.db == db
            net = Net(srv, tmp_path)
            try:
                assert upload(net, f"f{attempt}.bin", 1000).startswith(want), attempt
            finally:
                net.close()
    rows = sqlite3.connect(db).execute("SELECT sender, filename, size FROM files").fetchall()
    assert rows == [("alice", "f1.bin", 1000)]


def test_by_default_state_lives_in_the_data_directory(tmp_path):
    data = tmp_path / "data"
    for attempt, want in [(1, "User bob has no file socket"), (2, "ERROR: upload quota")]:
        with Server(HOST, 0, 0, data, user_quota=1500) as srv:
            assert srv.db == data / "relaychat.db"
            net = Net(srv, tmp_path)
            try:
                assert upload(net, f"f{attempt}.bin", 1000).startswith(want), attempt
            finally:
                net.close()
    assert (data / "relaychat.db").is_file()


def test_memory_keeps_nothing_across_restarts(tmp_path):
    for _ in range(2):
        with Server(HOST, 0, 0, tmp_path / "data", db=":memory:", user_quota=1500) as srv:
            net = Net(srv, tmp_path)
            try:
                assert upload(net, "f.bin", 1000).startswith("User bob has no file socket")
            finally:
                net.close()


def test_a_database_it_cannot_trust_is_refused_and_left_as_it_was(tmp_path):
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(bytes(range(256)) * 64)
    newer = tmp_path / "newer.db"
    with sqlite3.connect(newer) as conn:
        conn.execute("PRAGMA user_version = 99")
    for path, reason in [
        (garbage, "is not a relaychat database, or is corrupt"),
        (newer, "is from a newer relaychat (schema version 99"),
    ]:
        before = path.read_bytes()
        srv = Server(HOST, 0, 0, tmp_path / "data", db=path)
        with pytest.raises(RelaychatError, match=reason.replace("(", r"\(")):
            srv.start()
        assert not srv.is_running
        assert path.read_bytes() == before


def test_two_servers_cannot_share_a_database(tmp_path):
    db = tmp_path / "relaychat.db"
    with Server(HOST, 0, 0, tmp_path / "a", db=db):
        second = Server(HOST, 0, 0, tmp_path / "b", db=db)
        with pytest.raises(RelaychatError, match="in use by another relaychat server"):
            second.start()


def test_the_command_line_refuses_a_corrupt_database_with_a_clear_message(tmp_path):
    db = tmp_path / "relaychat.db"
    db.write_bytes(b"not a database at all" * 100)
    proc = subprocess.run(
        [sys.executable, *REPO_SERVER, "--data-dir", str(tmp_path), "--db", str(db)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 4,
    )
    assert proc.returncode == 1
    assert "is not a relaychat database, or is corrupt" in proc.stderr
    assert "[CHAT SERVER]" not in proc.stdout
    assert db.read_bytes() == b"not a database at all" * 100


def test_the_file_index_keeps_each_saved_copy_with_its_blake3_hash(tmp_path):
    db = tmp_path / "relaychat.db"
    with Server(HOST, 0, 0, tmp_path / "data", db=db) as srv:
        net = Net(srv, tmp_path)
        try:
            alice_chat, alice_files = net.chat("alice"), net.file("alice")
            for name, size in [("a.bin", 1000), ("a.bin", 1000), ("b.bin", 999)]:
                alice_files.send(f"alice|bob|{name}|{size}\n".encode() + b"x" * size)
                assert alice_chat.line().startswith("User bob has no file socket")
        finally:
            net.close()
    rows = sqlite3.connect(db).execute("SELECT saved_as, blake3 FROM files ORDER BY id").fetchall()
    names = [saved_as for saved_as, _ in rows]
    assert names == [
        "received_from_alice_a.bin",
        "received_from_alice_a (2).bin",
        "received_from_alice_b.bin",
    ]
    hashes = [h for _, h in rows]
    assert all(len(h) == 64 and set(h) <= set("0123456789abcdef") for h in hashes)
    assert hashes[0] == hashes[1] != hashes[2], "the same bytes, the same hash"
