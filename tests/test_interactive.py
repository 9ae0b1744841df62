"""The interactive client: `client.py` in a real pseudo-terminal, read as a person sees it.

Each test runs `client.py` under pexpect (a 100x30 pseudo-terminal, `TERM=xterm-256color`)
and feeds everything it writes into a pyte screen, a VT100 emulator that also answers the
client's cursor-position queries as a terminal would. Assertions are on the rendered
screen lines; every wait polls the terminal's output until a deadline.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pexpect
import pyte
import pytest
from relaychat import COMMANDS, FileReceived, PrivateMessage, Server

from tests.conftest import (
    FILE_TIMEOUT,
    HOST,
    REPO,
    TIMEOUT,
    random_file,
    wait_gone,
    wait_until,
)

ROWS, COLUMNS = 30, 100
#: Starting a Python process that imports the engine and prompt_toolkit can be slow.
START_TIMEOUT = 20.0
CTRL_C, CTRL_D, CTRL_R, TAB, ENTER = "\x03", "\x04", "\x12", "\t", "\r"
UP, DOWN = "\x1b[A", "\x1b[B"
#: An SGR sequence (`ESC [ ... m`): its parameters.
SGR = re.compile(rb"\x1b\[([0-9;:]*)m")


class Screen(pyte.Screen):
    """A screen that answers the client's cursor-position queries, as a terminal does
    (prompt_toolkit asks, to know how much room its toolbar has)."""

    def __init__(self, child: pexpect.spawn) -> None:
        super().__init__(COLUMNS, ROWS)
        self.child = child

    def write_process_input(self, data: str) -> None:
        self.child.send(data.encode())


class Terminal:
    """`client.py` in a pseudo-terminal, and the screen a person would see."""

    def __init__(self, cwd: Path, env: dict[str, str], args: list[str]) -> None:
        self.child = pexpect.spawn(
            sys.executable,
            [str(REPO / "client.py"), *args],
            cwd=str(cwd),
            env=env,
            dimensions=(ROWS, COLUMNS),
        )
        self.screen = Screen(self.child)
        self.stream = pyte.ByteStream(self.screen)
        #: Every byte the client wrote, escape sequences included.
        self.output = bytearray()
        self.ended = False

    def send(self, keys: str) -> None:
        self.child.send(keys.encode())

    def lines(self) -> list[str]:
        return [line.rstrip() for line in self.screen.display]

    def input_line(self) -> str:
        """The screen line the cursor is on: the prompt and what is typed."""
        return self.lines()[self.screen.cursor.y]

    def row_of(self, line: str) -> int:
        return self.lines().index(line)

    def wait(self, what: str, pred: Callable[[], object], timeout: float = TIMEOUT) -> None:
        """Reads the client's output until `pred()` holds for the screen."""
        deadline = time.monotonic() + timeout
        while not pred():
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.ended:
                screen = "\n".join(f"  |{line}" for line in self.lines())
                state = "the client exited" if self.ended else f"timed out after {timeout}s"
                raise AssertionError(f"{state} waiting for {what}; the screen:\n{screen}")
            self._read(remaining)

    def wait_line(self, line: str, timeout: float = TIMEOUT) -> int:
        """Waits until `line` is a whole screen line; its row."""
        self.wait(repr(line), lambda: line in self.lines(), timeout)
        return self.row_of(line)

    def wait_input(self, text: str, timeout: float = TIMEOUT) -> None:
        self.wait(f"the input line {text!r}", lambda: self.input_line() == text, timeout)

    def wait_prompt_below(self, line: str, prompt: str, timeout: float = TIMEOUT) -> None:
        """Waits until `line` is on the screen and the prompt drawn again below it. (While
        a line prints, the terminal is in cooked mode, where a control key is not a key:
        Ctrl-D, for one, would be lost.)"""

        def ready() -> bool:
            lines = self.lines()
            below = line in lines and self.screen.cursor.y > lines.index(line)
            return below and self.input_line() == prompt

        self.wait(f"{line!r}, then the prompt {prompt!r} below it", ready, timeout)

    def exit_status(self, timeout: float = TIMEOUT) -> int:
        self.wait("the client to exit", lambda: self.ended, timeout)
        wait_until(lambda: not self.child.isalive(), what="the client's process ends")
        assert self.child.signalstatus is None, f"killed by signal {self.child.signalstatus}"
        return self.child.exitstatus

    def _read(self, timeout: float) -> None:
        try:
            data = self.child.read_nonblocking(1 << 16, timeout)
        except pexpect.TIMEOUT:
            return
        except pexpect.EOF:
            self.ended = True
            return
        self.output += data
        self.stream.feed(data)

    def close(self) -> None:
        self.child.close(force=True)


def client_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment of a person's terminal, with a home and state dir of the test's."""
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in ("NO_COLOR", "RELAYCHAT_PASSWORD", "PROMPT_TOOLKIT_COLOR_DEPTH")
    }
    env.update(
        TERM="xterm-256color",
        HOME=str(tmp_path / "home"),
        XDG_STATE_HOME=str(tmp_path / "state"),
    )
    env.update(extra)
    return env


@pytest.fixture
def terminal(server: Server, tmp_path: Path) -> Iterator[Callable[..., Terminal]]:
    """Starts `client.py` in a terminal, logged in to `server`, and waits for its prompt;
    ends whatever is still running afterwards. It runs in `tmp_path` (short paths)."""
    started: list[Terminal] = []

    def start(
        *args: str,
        name: str = "alice",
        env: dict[str, str] | None = None,
        chat_port: int | None = None,
        file_port: int | None = None,
    ) -> Terminal:
        ports = ["--chat-port", str(chat_port or server.chat_port)]
        ports += ["--file-port", str(file_port or server.file_port)]
        term = Terminal(
            tmp_path,
            env or client_env(tmp_path),
            ["--host", HOST, *ports, "--username", name,
             "--download-dir", str(tmp_path / "downloads" / name), *args],
        )  # fmt: skip
        started.append(term)
        term.wait_prompt_below(f"Welcome, {name}!", f"{name}>", START_TIMEOUT)
        return term

    try:
        yield start
    finally:
        for term in started:
            term.close()


def test_typing_is_never_disturbed_by_messages_arriving(net, terminal):
    bob = net.client("bob")
    alice = terminal()
    alice.send("msg bob half a li")
    alice.wait_input("alice> msg bob half a li")

    bob.msg("alice", "are you there?")
    bob.broadcast("hello everyone")
    private, broadcast = (
        "[PRIVATE from bob]: are you there?",
        "[BROADCAST from bob]: hello everyone",
    )
    typed = "alice> msg bob half a li"
    alice.wait(
        "both messages and the input line",
        lambda: {private, broadcast} <= set(alice.lines()) and alice.input_line() == typed,
    )
    # Above the input line, which holds exactly what was typed, once.
    assert alice.row_of(private) < alice.row_of(broadcast) < alice.screen.cursor.y
    assert [line for line in alice.lines() if "half a li" in line] == [typed]

    alice.send("ne" + ENTER)
    event = bob.next_event(timeout=TIMEOUT)
    assert isinstance(event, PrivateMessage), event
    assert (event.sender, event.text) == ("alice", "half a line")


def test_tab_completes_user_names_groups_and_paths(net, terminal, tmp_path):
    net.client("bob")
    outbox = tmp_path / "outbox"
    random_file(outbox / "first-report.txt", 10)
    random_file(outbox / "second.txt", 10)
    alice = terminal()

    alice.send("msg bo" + TAB)
    alice.wait_input("alice> msg bob")
    assert alice.screen.cursor.x == len("alice> msg bob "), "a space follows the name"
    alice.send(CTRL_C + "send_file bob outbox/fi" + TAB)
    alice.wait_input("alice> send_file bob outbox/first-report.txt")

    alice.send(CTRL_C + "join devs" + ENTER)
    alice.wait_prompt_below("You joined group 'devs'", "alice>")
    alice.send("send_group d" + TAB)
    alice.wait_input("alice> send_group devs")
    alice.send(CTRL_C + "send_file GROUP:d" + TAB)
    alice.wait_input("alice> send_file GROUP:devs")


def test_help_lists_every_command_and_is_not_sent_to_the_server(terminal):
    alice = terminal()
    alice.send("help" + ENTER)
    # The server answers in order: once `list` is answered, an answer to `help` (its
    # `[HELP]` lines, or the lab's unknown-command line) would be on the screen too.
    alice.send("list" + ENTER)
    alice.wait_line("Connected users:")
    lines = alice.lines()
    usages = [usage.removeprefix("Usage: ") for _, usage, _ in COMMANDS]
    for usage in [*usages, "send_file <username/group> <filepath>"]:
        assert any(line.startswith(usage + "  ") for line in lines), f"{usage!r} is missing"
    assert not [line for line in lines if line.startswith(("[HELP]", "Unknown command"))]


class VerdictGate:
    """Proxies for the chat and file ports that hold back an upload's verdict: once
    `threshold` bytes have gone up the file connection, nothing more comes down the chat
    connection (where `[UPLOAD OK]` comes) until `release()`."""

    def __init__(self, server: Server, threshold: int) -> None:
        self.threshold = threshold
        self.file_up = 0
        self.released = threading.Event()
        self.socks: list[socket.socket] = []
        self.chat_port = self._listen(server.chat_port, up=self._pass, down=self._hold)
        self.file_port = self._listen(server.file_port, up=self._count, down=self._pass)

    def release(self) -> None:
        self.released.set()

    def close(self) -> None:
        self.released.set()
        for sock in self.socks:
            sock.close()

    def _pass(self, chunk: bytes) -> None:
        pass

    def _count(self, chunk: bytes) -> None:
        self.file_up += len(chunk)

    def _hold(self, chunk: bytes) -> None:
        if self.file_up >= self.threshold:
            self.released.wait(FILE_TIMEOUT)

    def _listen(self, port: int, *, up: Callable, down: Callable) -> int:
        listener = socket.create_server((HOST, 0))
        self.socks.append(listener)
        threading.Thread(target=self._accept, args=(listener, port, up, down), daemon=True).start()
        return listener.getsockname()[1]

    def _accept(self, listener: socket.socket, port: int, up: Callable, down: Callable) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            server = socket.create_connection((HOST, port))
            self.socks += [client, server]
            for src, dst, hook in ((client, server, up), (server, client, down)):
                threading.Thread(target=self._pump, args=(src, dst, hook), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, hook: Callable[[bytes], None]) -> None:
        try:
            while chunk := src.recv(1 << 16):
                hook(chunk)
                dst.sendall(chunk)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def test_an_upload_shows_its_progress_up_to_100_percent_while_typing_goes_on(
    net, server, terminal, tmp_path
):
    bob = net.client("bob")
    big = random_file(tmp_path / "big.bin", 4 << 20)
    gate = VerdictGate(server, big.stat().st_size)
    try:
        alice = terminal(chat_port=gate.chat_port, file_port=gate.file_port)
        alice.send("send_file bob big.bin" + ENTER)
        # The whole body is out, the server's verdict held back: the toolbar says 100%.
        toolbar = re.compile(r"big\.bin -> bob  \[#{20}\] 100%  .*/s  0:00 left")
        alice.wait("100% in the toolbar", lambda: any(map(toolbar.fullmatch, alice.lines())))
        # Typing goes on meanwhile.
        alice.send("msg bob still typing" + ENTER)
        gate.release()
        alice.wait_line("[FILE SENT SUCCESSFULLY] big.bin -> bob", FILE_TIMEOUT)
        alice.wait("the toolbar line to go", lambda: not any(map(toolbar.match, alice.lines())))
        # (The message may still be on its way through the gate.)
        events = [bob.next_event(timeout=FILE_TIMEOUT) for _ in range(3)]
    finally:
        gate.close()
    texts = [e.text for e in events if isinstance(e, PrivateMessage)]
    received = [e for e in events if isinstance(e, FileReceived)]
    assert texts == ["still typing"], events
    assert len(received) == 1, events
    assert received[0].path.read_bytes() == big.read_bytes()


def test_ctrl_c_clears_the_line_and_ctrl_d_or_quit_exit_with_status_0(terminal):
    alice = terminal()
    alice.send("msg bob never sent")
    alice.wait_input("alice> msg bob never sent")
    alice.send(CTRL_C)
    alice.wait_input("alice>")
    # While a line prints, the terminal is in cooked mode: Ctrl-C comes as SIGINT.
    alice.send("msg bob not sent either")
    alice.wait_input("alice> msg bob not sent either")
    alice.child.kill(signal.SIGINT)
    alice.wait_input("alice>")
    assert alice.child.isalive()
    alice.send(CTRL_D)
    assert alice.exit_status() == 0

    carol = terminal(name="carol")
    carol.send("quit" + ENTER)
    assert carol.exit_status() == 0


def test_history_persists_across_runs_without_passwords(net, terminal, tmp_path):
    alice = terminal()
    for line in ("msg bob first run", "register tiny", " PASSWD old-password new-password"):
        alice.send(line + ENTER)
    alice.send("list" + ENTER)
    alice.wait_prompt_below("Connected users:", "alice>")
    alice.send(CTRL_D)
    assert alice.exit_status() == 0
    history = tmp_path / "state" / "relaychat" / "history"
    kept = history.read_text()
    assert "+msg bob first run\n" in kept
    for secret in ("register", "passwd", "tiny", "old-password", "new-password"):
        assert secret not in kept.lower()
    assert stat.S_IMODE(history.stat().st_mode) == 0o600
    assert stat.S_IMODE(history.parent.stat().st_mode) == 0o700

    wait_gone(net, "alice")
    again = terminal()
    again.send(UP)
    again.wait_input("alice> list")
    again.send(UP)
    again.wait_input("alice> msg bob first run")
    again.send(DOWN + DOWN)
    again.wait_input("alice>")
    again.send(CTRL_R + "first")
    again.wait_input("(reverse-i-search)`first': msg bob first run")


@pytest.mark.parametrize(
    ("args", "env", "coloured"),
    [([], {}, True), ([], {"NO_COLOR": "1"}, False), (["--no-color"], {}, False)],
    ids=["default", "NO_COLOR", "--no-color"],
)
def test_message_lines_are_coloured_unless_colour_is_off(
    net, terminal, tmp_path, args, env, coloured
):
    bob = net.client("bob")
    alice = terminal(*args, env=client_env(tmp_path, **env))
    bob.msg("alice", "colours?")
    row = alice.wait_line("[PRIVATE from bob]: colours?")
    line = alice.screen.buffer[row]
    colours = {line[column].fg for column in range(len("[PRIVATE from bob]: colours?"))}
    if coloured:
        assert colours == {"magenta"}
    else:
        assert colours == {"default"}
        # No colour at all in what was written (SGR 30-49, 90-107; 39 and 49 are the
        # terminal's own colours).
        codes = {
            int(code)
            for params in SGR.findall(bytes(alice.output))
            for code in re.split(rb"[;:]", params)
            if code
        }
        assert not {c for c in codes if 30 <= c <= 48 or 90 <= c <= 107} - {39}


def test_the_server_going_away_offers_to_reconnect_and_no_exits_cleanly(server, terminal):
    alice = terminal()
    alice.send("half typed")
    alice.wait_input("alice> half typed")
    question = f"Connection to {HOST}:{server.chat_port} lost. Reconnect? [Y/n]"
    server.stop()
    alice.wait_line("Chat connection closed.")
    alice.wait_input(question)
    # Yes, but the server is still gone: the error, and the question again.
    alice.send(ENTER)
    alice.wait(
        "the connection error", lambda: any(line.startswith("ERROR: ") for line in alice.lines())
    )
    alice.wait_input(question)
    alice.send("n" + ENTER)
    assert alice.exit_status() == 0
