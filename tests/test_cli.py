"""`python server.py` and `python client.py`, driven through pipes as a person (or a script)
would use them."""

from __future__ import annotations

import codecs
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import FILE_GREETING, HOST, TIMEOUT, Wire, server_copy

REPO = Path(__file__).resolve().parent.parent
#: Starting a Python process that imports the engine can be slow on a busy machine.
START_TIMEOUT = 20.0


class Proc:
    """A subprocess whose output is read by a thread, so every wait has a deadline.

    Output is kept as text; `expect` searches it from where the last match ended (prompts
    have no newline, so it works on text, not on lines).
    """

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-u", *args],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self.chunks: queue.Queue[bytes] = queue.Queue()
        self.text = ""
        self.pos = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        fd = self.proc.stdout.fileno()
        while True:
            chunk = os.read(fd, 65536)
            self.chunks.put(chunk)
            if not chunk:
                return

    def _pull(self, timeout: float) -> bool:
        """Waits up to `timeout` for more output; False at end of output."""
        try:
            chunk = self.chunks.get(timeout=max(timeout, 0.001))
        except queue.Empty:
            return True
        if not chunk:
            self.chunks.put(b"")  # keep the end of output visible to later calls
            return False
        self.text += self._decoder.decode(chunk)
        return True

    def expect(self, pattern: str, timeout: float = TIMEOUT) -> re.Match:
        """The next match of the regex `pattern` in the output."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.text, self.pos)
            if match:
                self.pos = match.end()
                return match
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._pull(remaining):
                raise AssertionError(
                    f"{self.proc.args[2]}: no {pattern!r} in output after {timeout}s; "
                    f"unread output: {self.text[self.pos :]!r}"
                )

    def expect_each(self, patterns: list[str], timeout: float = TIMEOUT) -> None:
        """Every regex in `patterns`, in any order, after the current position (for lines
        printed from two sockets, whose order is not fixed)."""
        start, end = self.pos, self.pos
        for pattern in patterns:
            self.pos = start
            end = max(end, self.expect(pattern, timeout).end())
        self.pos = end

    @staticmethod
    def whole_line(line: str) -> str:
        """A regex for `line` as a whole output line, with its newline."""
        return f"(?:\\A|(?<=\n)){re.escape(line)}\n"

    def expect_line(self, line: str, timeout: float = TIMEOUT) -> None:
        """A whole output line, exactly, with its newline."""
        self.expect(self.whole_line(line), timeout)

    def send(self, line: str) -> None:
        self.proc.stdin.write(f"{line}\n".encode())
        self.proc.stdin.flush()

    def close_stdin(self) -> None:
        self.proc.stdin.close()

    def wait(self, timeout: float = TIMEOUT) -> int:
        return self.proc.wait(timeout=timeout)

    def all_output(self, timeout: float = TIMEOUT) -> str:
        """Everything the process printed, once it has exited."""
        deadline = time.monotonic() + timeout
        while self._pull(deadline - time.monotonic()):
            assert time.monotonic() < deadline, "output did not end"
        return self.text

    def kill(self) -> None:
        """Ends the process if still running and releases its pipes."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=TIMEOUT)
        self._reader.join(timeout=TIMEOUT)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if not pipe.closed:
                pipe.close()


@pytest.fixture
def procs():
    """Starts processes; kills whatever is still running afterwards."""
    started: list[Proc] = []

    def start(*args: str) -> Proc:
        proc = Proc(*args)
        started.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in started:
            proc.kill()


def start_server(procs, data_dir: Path, *extra: str) -> tuple[Proc, int, int]:
    server = procs(
        "server.py", "--host", HOST, "--chat-port", "0", "--file-port", "0",
        "--data-dir", str(data_dir), *extra,
    )  # fmt: skip
    chat = int(server.expect(r"\[CHAT SERVER\] Listening on (\d+)\n", START_TIMEOUT).group(1))
    file = int(server.expect(r"\[FILE SERVER\] Listening on (\d+)\n", TIMEOUT).group(1))
    assert chat != 0 and file != 0
    return server, chat, file


def start_client(procs, chat: int, file: int, downloads: Path, *extra: str) -> Proc:
    return procs(
        "client.py", "--host", HOST, "--chat-port", str(chat), "--file-port", str(file),
        "--download-dir", str(downloads), *extra,
    )  # fmt: skip


def test_two_terminal_clients_chat_and_send_a_file(procs, tmp_path):
    data = tmp_path / "data"
    server, chat, file = start_server(procs, data)

    alice = start_client(procs, chat, file, tmp_path / "alice", "--username", "alice")
    alice.expect_line("Welcome, alice!", START_TIMEOUT)
    server.expect(r"\[NEW CONNECTION\] alice connected from 127\.0\.0\.1:\d+")

    # Without --username the client asks for one.
    bob = start_client(procs, chat, file, tmp_path / "bob")
    bob.expect("Enter username: ", START_TIMEOUT)
    bob.send("bob")
    bob.expect("Welcome, bob!\n")
    server.expect(r"\[NEW CONNECTION\] bob connected from 127\.0\.0\.1:\d+")

    alice.send("list")
    alice.expect_line("Connected users: bob")
    alice.send("msg bob Hi Bob!")
    bob.expect_line("[PRIVATE from alice]: Hi Bob!")
    bob.send("broadcast Hello everyone!")
    alice.expect_line("[BROADCAST from bob]: Hello everyone!")

    alice.send("join devs")
    alice.expect_line("You joined group 'devs'")
    bob.send("join devs")
    bob.expect_line("You joined group 'devs'")
    alice.send("send_group devs Standup at 10 AM.")
    bob.expect_line("[GROUP devs] alice: Standup at 10 AM.")

    alice.send("dance")
    alice.expect_line("Unknown command. Use msg/broadcast/list/join/send_group")

    notes = tmp_path / "notes.txt"
    notes.write_text("msg bob this line is file content, not a command\n" * 100)
    size = notes.stat().st_size
    alice.send(f"send_file bob {notes}")
    # These two are printed by two threads at about the same time, and the client does
    # not keep their lines apart (see test_output_lines_never_run_together): search for
    # each text on its own.
    alice.expect_each(
        [
            re.escape(f"[FILE SENT SUCCESSFULLY] {notes} -> bob"),
            re.escape("[ACK] bob received file 'notes.txt'"),
        ]
    )
    # The notice comes on bob's chat socket, the file on his file socket: either first.
    saved = tmp_path / "bob" / "received_from_alice_notes.txt"
    bob.expect_each(
        [
            Proc.whole_line(
                f"[FILE] alice sent you file 'notes.txt' ({size} bytes). Incoming on file socket."
            ),
            Proc.whole_line(f"[FILE RECEIVED] {saved} ({size} bytes) from alice"),
        ]
    )
    assert saved.read_bytes() == notes.read_bytes()
    assert server_copy(data / "received_from_alice_notes.txt") == notes.read_bytes()
    server.expect(r"\[FILE RECEIVED\] received_from_alice_notes\.txt from alice")

    alice.send(f"send_file bob {tmp_path / 'missing.txt'}")
    alice.expect_line("File does not exist")
    alice.send("send_file bob")
    alice.expect_line("Usage: send_file <username/group> <filepath>")

    # `quit` ends alice; the end of input ends bob. Both exit 0.
    alice.send("quit")
    assert alice.wait() == 0
    server.expect(r"\[DISCONNECTED\] alice")
    bob.send("list")
    bob.expect_line("Connected users: ")
    bob.close_stdin()
    assert bob.wait() == 0
    server.expect(r"\[DISCONNECTED\] bob")

    server.proc.send_signal(signal.SIGINT)
    assert server.wait() == 0


def test_the_server_exits_cleanly_on_sigterm_and_logs_bad_headers(procs, tmp_path):
    server, chat, file = start_server(procs, tmp_path / "data")
    with Wire(chat, "alice/chat") as alice, Wire(file, "alice/file") as alice_files:
        alice.send("alice\n")
        alice.expect("Welcome, alice!")
        alice_files.send("alice\n")
        assert alice_files.recv_exact(len(FILE_GREETING), TIMEOUT) == FILE_GREETING
        alice_files.send("alice|bob|../evil|0\n")
        alice.expect("ERROR: invalid file header: file name may not contain '/'")
        server.expect(r"\[FILE ERROR\] .*\.\./evil")
    server.expect(r"\[DISCONNECTED\] alice")
    server.proc.send_signal(signal.SIGTERM)
    assert server.wait() == 0


def test_a_piped_script_runs_to_the_end_of_input(procs, tmp_path):
    """A whole session piped in at once: every command is carried out, then exit 0."""
    server, chat, file = start_server(procs, tmp_path / "data")
    bob = start_client(procs, chat, file, tmp_path / "bob", "--username", "bob")
    bob.expect_line("Welcome, bob!", START_TIMEOUT)
    script = start_client(procs, chat, file, tmp_path / "alice", "--username", "alice")
    for line in ("msg bob one", "msg bob two", "broadcast three", "msg bob four"):
        script.send(line)
    script.close_stdin()
    assert script.wait(START_TIMEOUT) == 0
    for line in (
        "[PRIVATE from alice]: one",
        "[PRIVATE from alice]: two",
        "[BROADCAST from alice]: three",
        "[PRIVATE from alice]: four",
    ):
        bob.expect_line(line)
    server.expect(r"\[DISCONNECTED\] alice")


def test_the_client_exits_cleanly_on_sigint(procs, tmp_path):
    server, chat, file = start_server(procs, tmp_path / "data")
    alice = start_client(procs, chat, file, tmp_path / "alice", "--username", "alice")
    alice.expect_line("Welcome, alice!", START_TIMEOUT)
    # A reply to a typed command: the client is in its command loop now.
    alice.send("list")
    alice.expect_line("Connected users: ")
    alice.proc.send_signal(signal.SIGINT)
    assert alice.wait() == 0
    server.expect(r"\[DISCONNECTED\] alice")


def test_the_client_reports_a_refused_username(procs, tmp_path):
    server, chat, file = start_server(procs, tmp_path / "data")
    with Wire(chat, "alice") as alice:
        alice.send("alice\n")
        alice.expect("Welcome, alice!")
        second = start_client(procs, chat, file, tmp_path / "alice2", "--username", "alice")
        second.expect(r"ERROR: .*username 'alice' is already connected",
                           START_TIMEOUT)  # fmt: skip
        assert second.wait() == 1
        server.expect(r"\[REFUSED\] .*already connected")


def test_output_lines_never_run_together(procs, tmp_path):
    server, chat, file = start_server(procs, tmp_path / "data")
    alice = start_client(procs, chat, file, tmp_path / "alice", "--username", "alice")
    alice.expect_line("Welcome, alice!", START_TIMEOUT)
    count = 5000
    with Wire(chat, "bob") as bob:
        bob.send("bob\n")
        bob.expect("Welcome, bob!")
        # bob's broadcasts are printed by alice's event thread while her main thread
        # answers commands from standard input.
        spam = threading.Thread(
            target=bob.send, args=("".join(f"broadcast b{i}\n" for i in range(count)),)
        )
        spam.start()
        alice.proc.stdin.write(b"send_file bob /no/such/file\n" * count)
        alice.proc.stdin.flush()
        spam.join(TIMEOUT)
        alice.send("list")
        alice.expect("Connected users: bob\n", START_TIMEOUT)
    alice.send("quit")
    assert alice.wait() == 0
    allowed = {"Welcome, alice!", "Connected users: bob", "File does not exist"}
    allowed |= {f"[BROADCAST from bob]: b{i}" for i in range(count)}
    garbled = [line for line in alice.all_output().splitlines() if line not in allowed]
    assert garbled == [], f"{len(garbled)} garbled lines, e.g. {garbled[:4]}"
    del server


def test_the_client_exits_cleanly_on_sigint_while_connecting(procs, tmp_path):
    # A listener that accepts and never answers: the client waits for its welcome.
    with socket.create_server((HOST, 0)) as silent:
        port = silent.getsockname()[1]
        alice = start_client(procs, port, port, tmp_path / "alice", "--username", "alice")
        silent.settimeout(START_TIMEOUT)
        conn, _ = silent.accept()
        with conn:
            conn.settimeout(TIMEOUT)
            assert conn.recv(100) == b"alice\n"  # the client now waits for the reply
            alice.proc.send_signal(signal.SIGINT)
            status = alice.wait()
    assert status == 0, f"exit status {status}; output: {alice.all_output()[-300:]!r}"


def test_a_piped_command_prints_its_reply_before_the_client_exits(procs, tmp_path):
    _server, chat, file = start_server(procs, tmp_path / "data")
    for i in range(5):
        name = f"script{i}"
        script = start_client(procs, chat, file, tmp_path / name, "--username", name)
        script.send("list")
        script.close_stdin()
        assert script.wait(START_TIMEOUT) == 0
        output = script.all_output()
        assert f"Welcome, {name}!\n" in output, output
        assert "Connected users: " in output, output


def test_the_client_exits_when_the_server_goes_away(procs, tmp_path):
    server, chat, file = start_server(procs, tmp_path / "data")
    alice = start_client(procs, chat, file, tmp_path / "alice", "--username", "alice")
    alice.expect_line("Welcome, alice!", START_TIMEOUT)
    # Standard input stays open: the client is blocked reading it when the server stops.
    server.proc.send_signal(signal.SIGTERM)
    assert server.wait() == 0
    alice.expect_line("Chat connection closed.", START_TIMEOUT)
    assert alice.wait() == 0


def test_a_refused_upload_is_never_reported_as_sent_and_the_exit_status_says_so(procs, tmp_path):
    """The server has no room: the client prints the server's reason and its own
    `[FILE SEND ERROR]`, never `[FILE SENT SUCCESSFULLY]`, and exits 1."""
    _server, chat, file = start_server(procs, tmp_path / "data", "--min-free-disk", str(1 << 62))
    bob = start_client(procs, chat, file, tmp_path / "bob", "--username", "bob")
    bob.expect_line("Welcome, bob!", START_TIMEOUT)
    report = tmp_path / "report.txt"
    report.write_bytes(b"x" * 1000)
    alice = start_client(procs, chat, file, tmp_path / "alice", "--username", "alice")
    alice.send(f"send_file bob {report}")
    alice.close_stdin()
    assert alice.wait(START_TIMEOUT) == 1
    out = alice.all_output()
    assert "ERROR: not enough disk space on the server for this file\n" in out
    assert "[FILE SEND ERROR] not enough disk space on the server for this file\n" in out
    assert "[FILE SENT SUCCESSFULLY]" not in out


def test_an_upload_cut_off_by_the_server_dying_is_reported_and_fails_the_exit_status(
    procs, tmp_path
):
    data = tmp_path / "data"
    server, chat, file = start_server(procs, data)
    big = tmp_path / "big.bin"
    with big.open("wb") as f:
        f.truncate(64 << 20)
    alice = start_client(procs, chat, file, tmp_path / "alice", "--username", "alice")
    alice.expect_line("Welcome, alice!", START_TIMEOUT)
    alice.send(f"send_file nobody {big}")
    # The upload has begun once its spool file exists; stop the server there, so the body
    # cannot finish, and then kill it.
    deadline = time.monotonic() + START_TIMEOUT
    while not list(data.glob(".relaychat-upload-*.part")):
        assert time.monotonic() < deadline, "the upload never began"
        time.sleep(0.01)  # polling the file system: there is no event to wait on
    server.proc.send_signal(signal.SIGSTOP)
    server.proc.kill()
    server.wait()
    assert alice.wait(START_TIMEOUT) == 1
    out = alice.all_output()
    assert "[FILE SEND ERROR]" in out, out
    assert "[FILE SENT SUCCESSFULLY]" not in out
