"""The interactive client: `python client.py` when standard input and output are a terminal.

`cli_client.main` chooses it (unless `--plain`), after connecting with a `Connector`, which
also reconnects. The commands are those of the plain client; on prompt_toolkit:

- The input line stays at the bottom: every line is printed above it, and what is typed
  is never disturbed (`print_formatted_text` erases the prompt, prints, draws it again).
- Tab completes commands, user names (asked of the server when Tab is pressed), the groups
  joined in this session, and paths after `send_file <target> `. `help` lists the commands.
- Each line is the event's `.line`, as the plain client prints it, coloured by its kind
  (not with `--no-color` or a non-empty `NO_COLOR`).
- `send_file` runs in a worker thread. Every upload and download has a line in the bottom
  toolbar (name, percent, rate, time left) until its final line prints above.
- History survives the run in `$XDG_STATE_HOME/relaychat/history` (default
  `~/.local/state/relaychat/history`, owner only), without `register` and `passwd` lines.
- Ctrl-C clears the line, Ctrl-D on an empty line or `quit` leaves, Ctrl-R searches the
  history. When the server goes away, it offers to reconnect.

Threads: the prompt and all screen state belong to the asyncio loop's thread. The events
thread of each connection and the upload workers hand what they have to it with
`call_soon_threadsafe`; prompt_toolkit's completion thread only reads (the user list comes
from the server; the groups are a tuple, replaced whole).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import textwrap
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Callable

from prompt_toolkit import PromptSession, print_formatted_text
from prompt_toolkit.completion import CompleteEvent, Completer, Completion, PathCompleter
from prompt_toolkit.document import Document
from prompt_toolkit.enums import DEFAULT_BUFFER
from prompt_toolkit.filters import has_focus
from prompt_toolkit.formatted_text import FormattedText
from prompt_toolkit.history import FileHistory
from prompt_toolkit.key_binding import KeyBindings, KeyPressEvent
from prompt_toolkit.output import ColorDepth
from prompt_toolkit.styles import Style

from relaychat import (
    COMMANDS,
    Ack,
    BroadcastMessage,
    Client,
    Disconnected,
    Event,
    FileFailed,
    FileIncoming,
    FileReceived,
    FileSaved,
    GroupFileIncoming,
    GroupList,
    GroupMessage,
    Joined,
    Left,
    NoFileSocket,
    PrivateMessage,
    RelaychatError,
    ServerError,
    TlsError,
    TransferProgress,
)
from relaychat.cli_client import (
    LINGER_SECONDS,
    SEND_FILE_USAGE,
    Connector,
    is_send_file,
    parse_send_file,
    send_file,
)

#: Every command as `(name, usage, help)`: the server's, then the client's own.
ALL_COMMANDS = (
    *COMMANDS,
    ("send_file", SEND_FILE_USAGE, "send a file to a user, or to a group as GROUP:<group_name>"),
    ("help", "Usage: help", "show this list"),
    ("quit", "Usage: quit", "leave (Ctrl-D on an empty line too)"),
)
#: Commands whose first argument is a user (`send_file` and `history` take `GROUP:<g>` too).
USER_COMMANDS = {"msg", "send_file", "history"}
#: Commands whose first argument is a group.
GROUP_COMMANDS = {"send_group", "leave", "members"}
#: Commands whose line holds a password: never kept in the history.
SECRET_COMMANDS = {"register", "passwd"}
GROUP_PREFIX = "GROUP:"

#: The style class of each kind of event; the others print plain.
KINDS = {
    PrivateMessage: "private",
    GroupMessage: "group",
    BroadcastMessage: "broadcast",
    FileIncoming: "file",
    GroupFileIncoming: "file",
    FileSaved: "file",
    FileReceived: "file",
    FileFailed: "file",
    NoFileSocket: "file",
    Ack: "ack",
    ServerError: "error",
}
STYLE = Style.from_dict(
    {
        "private": "ansimagenta",
        "group": "ansicyan",
        "broadcast": "ansiyellow",
        "file": "ansibrightblue",
        "ack": "ansigreen",
        "error": "ansired",
        "prompt": "bold",
        "bottom-toolbar": "noreverse",
        "bottom-toolbar transfer": "ansibrightblue",
        "bottom-toolbar status": "ansibrightblack",
    }
)


def history_path() -> Path:
    """Where typed lines are kept between runs (XDG base directories: a relative
    `XDG_STATE_HOME` is ignored)."""
    state = os.environ.get("XDG_STATE_HOME", "")
    base = Path(state) if os.path.isabs(state) else Path.home() / ".local" / "state"
    return base / "relaychat" / "history"


class _History(FileHistory):
    """The history file, owner only, without lines that hold passwords. If it cannot be
    written, the history lasts for this run only."""

    def __init__(self, path: Path) -> None:
        with contextlib.suppress(OSError):
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
        super().__init__(path)

    def append_string(self, string: str) -> None:
        words = string.split(maxsplit=1)
        if not (words and words[0].lower() in SECRET_COMMANDS):  # the server ignores case
            super().append_string(string)

    def store_string(self, string: str) -> None:
        with contextlib.suppress(OSError):
            super().store_string(string)


class _Completer(Completer):
    """Command names, then the first argument's users or groups, then `send_file`'s path.
    Runs in prompt_toolkit's completion thread."""

    def __init__(self, ui: Interactive) -> None:
        self.ui = ui
        self.paths = PathCompleter()

    def get_completions(self, document: Document, event: CompleteEvent) -> Iterator[Completion]:
        text = document.text_before_cursor
        words = text.split(" ")
        if len(words) == 1:
            for name, usage, help_text in ALL_COMMANDS:
                if name.startswith(text):
                    takes_arguments = len(usage.split()) > 2
                    yield Completion(
                        name + " " * takes_arguments,
                        -len(text),
                        display=name,
                        display_meta=help_text,
                    )
        elif len(words) == 2:
            command, start = words
            for name in self._names(command):
                if name.startswith(start):
                    yield Completion(name + " ", -len(start))
        elif words[0] == "send_file":
            path = text.split(" ", 2)[2]
            yield from self.paths.get_completions(Document(path), event)

    def _names(self, command: str) -> Iterable[str]:
        groups = self.ui.groups
        if command in USER_COMMANDS:
            yield from self.ui.users()
            if command != "msg":
                yield from (GROUP_PREFIX + group for group in groups)
        elif command in GROUP_COMMANDS:
            yield from groups


class Interactive:
    """One interactive run, over as many connections as reconnecting takes."""

    def __init__(self, connector: Connector, client: Client, *, color: bool) -> None:
        self.connector = connector
        self.client = client
        self.color_depth = None if color else ColorDepth.DEPTH_1_BIT
        #: The groups joined in this session (for completion).
        self.groups: tuple[str, ...] = ()
        #: Each transfer under way, by (direction, peer, filename): its last progress, or
        #: None for an upload that has not begun.
        self.transfers: dict[tuple[str, str, str], TransferProgress | None] = {}
        #: Set when we close the connection ourselves (its end is then no news).
        self.closing = False
        #: The end of the connection, when the server went away (until reconnected).
        self.lost: Disconnected | None = None
        #: What was typed when the connection was lost, offered again once reconnected.
        self.draft = ""
        #: Lines to print, as (style, text) fragments (see `_say`).
        self.unsaid: list[tuple[str, str]] = []
        self.threads: list[threading.Thread] = []
        self.loop: asyncio.AbstractEventLoop | None = None
        keys = KeyBindings()
        keys.add("c-c", filter=has_focus(DEFAULT_BUFFER))(self._clear_line)
        # While a line prints, the terminal is in cooked mode and Ctrl-C comes as SIGINT.
        keys.add("<sigint>")(self._clear_line)
        self.session: PromptSession[str] = PromptSession(
            [("class:prompt", f"{client.username}> ")],
            history=_History(history_path()),
            completer=_Completer(self),
            complete_in_thread=True,
            complete_while_typing=False,
            bottom_toolbar=self._toolbar,
            style=STYLE,
            color_depth=self.color_depth,
            key_bindings=keys,
        )
        #: Asks whether to reconnect (its answers are kept out of the history).
        self.question: PromptSession[str] = PromptSession(color_depth=self.color_depth)

    # --- the loop's thread -------------------------------------------------------------

    async def main(self) -> int:
        """Reads and carries out lines until the user leaves; the exit status."""
        self.loop = asyncio.get_running_loop()
        self._listen()
        try:
            while True:
                if self.lost is not None and not await self._reconnect():
                    return 0
                draft, self.draft = self.draft, ""
                self._flush()  # what was said before the prompt, above it
                try:
                    line = await self.session.prompt_async(default=draft)
                except EOFError:  # Ctrl-D on an empty line
                    return 0
                if self.lost is not None:
                    self.draft = self.draft or line  # not sent: offered again
                elif not self._run(line):
                    return 0
        finally:
            self._flush()

    def _run(self, line: str) -> bool:
        """Carries out one typed line; false for `quit`."""
        command = line.strip()
        if command == "quit":
            return False
        if command == "help":
            self._help()
        elif is_send_file(line):
            self._start_upload(line)
        elif command:
            try:
                self.client.send_command(line)
            except TlsError as e:  # a password that would have crossed the network in clear
                self._say(f"ERROR: {e}", "error")
            except (RelaychatError, OSError, ValueError) as e:
                self._say(f"Chat send error: {e}", "error")
        return True

    def _help(self) -> None:
        """Every command's usage, and beside it what it does (wrapped to the terminal)."""
        usages = [usage.removeprefix("Usage: ") for _, usage, _ in ALL_COMMANDS]
        width = max(map(len, usages)) + 2
        columns = max(self.session.app.output.get_size().columns - 1, width + 20)
        indent = " " * width
        wrapper = textwrap.TextWrapper(columns, initial_indent=indent, subsequent_indent=indent)
        for usage, (_, _, help_text) in zip(usages, ALL_COMMANDS):
            self._say(usage + wrapper.fill(help_text)[len(usage) :])

    def _start_upload(self, line: str) -> None:
        try:
            target, path = parse_send_file(line)
        except ValueError as e:
            self._say(str(e), "error")
            return
        key = ("upload", target, os.path.basename(path))
        self.transfers[key] = None
        self._invalidate()
        self._thread(self._upload, self.client, key, target, path)

    def _uploaded(self, key: tuple[str, str, str], sent: bool, report: str) -> None:
        self.transfers.pop(key, None)
        self._invalidate()
        self._say(report, "file" if sent else "error")

    def _on_event(self, client: Client, event: Event) -> None:
        if client is not self.client:
            return  # from a connection we have left
        if isinstance(event, TransferProgress):
            key = (event.direction, event.peer, event.filename)
            # An upload's line goes when its worker is done: a late progress event must
            # not bring it back.
            if event.direction == "download" or key in self.transfers:
                self.transfers[key] = event
                self._invalidate()
            return
        if isinstance(event, Disconnected):
            if not self.closing:
                self._lose(event)
            return
        if isinstance(event, Joined) and event.group not in self.groups:
            self.groups = (*self.groups, event.group)
        elif isinstance(event, Left):
            self.groups = tuple(g for g in self.groups if g != event.group)
        elif isinstance(event, GroupList):
            self.groups = tuple(event.groups)
        elif isinstance(event, FileReceived):
            self.transfers.pop(("download", event.sender, event.filename), None)
            self._invalidate()
        elif isinstance(event, FileFailed):
            # One file connection receives one file at a time: the failed one is it.
            for download in [key for key in self.transfers if key[0] == "download"]:
                del self.transfers[download]
            self._invalidate()
        self._say(event.line, KINDS.get(type(event), ""))

    def _lose(self, event: Disconnected) -> None:
        """The server went away: stop the prompt, keeping what was typed (the offer to
        reconnect comes next, from `main`)."""
        self.lost = event
        self.transfers.clear()
        app = self.session.app
        if app.is_running and not app.is_done:
            self.draft = self.session.default_buffer.text
            self.session.default_buffer.reset()
            app.exit(result="")

    async def _reconnect(self) -> bool:
        """Says the connection is lost and offers to reconnect, until it works (true) or
        the user declines (false)."""
        assert self.lost is not None
        self._say(self.lost.line, "error")
        where = f"{self.connector.args.host}:{self.connector.args.chat_port}"
        while True:
            self._flush()
            try:
                answer = await self.question.prompt_async(
                    f"Connection to {where} lost. Reconnect? [Y/n] "
                )
            except (EOFError, KeyboardInterrupt):
                return False
            if answer.strip().lower() not in ("", "y", "yes"):
                return False
            try:
                client = self.connector.connect()
            except (RelaychatError, OSError, ValueError, TimeoutError) as e:
                self._say(f"ERROR: {e}", "error")
                continue
            except (EOFError, KeyboardInterrupt):  # at the password prompt
                return False
            if client is None:
                return False
            self.client = client
            self.lost = None
            self._listen()
            return True

    def _say(self, text: str, kind: str = "") -> None:
        """Prints one line above the prompt (or plainly, between prompts). The lines said
        before the loop looks up are printed together: a burst redraws the prompt once."""
        self.unsaid.append((f"class:{kind}", text + "\n"))
        if len(self.unsaid) == 1:
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        if self.unsaid:
            lines, self.unsaid = self.unsaid, []
            print_formatted_text(
                FormattedText(lines),
                end="",
                style=STYLE,
                color_depth=self.color_depth,
                flush=True,
            )

    def _invalidate(self) -> None:
        self.session.app.invalidate()  # does nothing when no prompt runs

    def _clear_line(self, event: KeyPressEvent) -> None:
        """Ctrl-C: clears the line instead of leaving."""
        self.session.default_buffer.reset()

    def _toolbar(self) -> FormattedText:
        fragments = [
            ("class:transfer", describe(*key, progress) + "\n")
            for key, progress in self.transfers.items()
        ]
        args = self.connector.args
        status = (
            f"{self.client.username}@{args.host}:{args.chat_port}  "
            "Tab: complete  Ctrl-R: search  Ctrl-D: quit  help: commands"
        )
        return FormattedText([*fragments, ("class:status", status)])

    # --- other threads -----------------------------------------------------------------

    def users(self) -> list[str]:
        """The other users online now (asked of the server: the completion thread)."""
        try:
            return self.client.list_users()
        except (RelaychatError, OSError, ValueError, TimeoutError):
            return []

    def _listen(self) -> None:
        self._thread(self._read_events, self.client)

    def _read_events(self, client: Client) -> None:
        for event in client.events():
            self._post(self._on_event, client, event)

    def _upload(self, client: Client, key: tuple[str, str, str], target: str, path: str) -> None:
        sent, report = send_file(client, target, path)
        self._post(self._uploaded, key, sent, report)

    def _thread(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self.threads = [*(t for t in self.threads if t.is_alive()), thread]
        thread.start()

    def _post(self, callback: Callable[..., None], *args: object) -> None:
        """Runs `callback` on the loop's thread (not at all once the run has ended)."""
        assert self.loop is not None
        with contextlib.suppress(RuntimeError):  # the loop is closed: we are leaving
            self.loop.call_soon_threadsafe(callback, *args)

    def close(self) -> None:
        """Closes the connection and lets the threads end (uploads end with it)."""
        self.closing = True
        self.client.close()
        for thread in self.threads:
            thread.join(LINGER_SECONDS)


def describe(direction: str, peer: str, filename: str, progress: TransferProgress | None) -> str:
    """A transfer's toolbar line: `report.pdf -> bob  [####------]  40%  2.1 MB/s  0:03 left`."""
    arrow = f"{filename} -> {peer}" if direction == "upload" else f"{filename} <- {peer}"
    if progress is None:
        return f"{arrow}  waiting"
    done = progress.done / progress.total if progress.total else 1.0
    bar = "#" * round(done * 20)
    left = (progress.total - progress.done) / progress.rate if progress.rate else None
    return f"{arrow}  [{bar:-<20}] {done:4.0%}  {size(progress.rate)}/s  {duration(left)} left"


def size(count: float) -> str:
    """A byte count for people: `512 B`, `1.5 kB`, `12.3 MB`."""
    units = ("B", "kB", "MB", "GB")
    power = 0
    while count >= 1000 and power < len(units) - 1:
        count /= 1000
        power += 1
    return f"{count:.0f} B" if power == 0 else f"{count:.1f} {units[power]}"


def duration(seconds: float | None) -> str:
    """`m:ss` or `h:mm:ss`; `-:--` when unknown."""
    if seconds is None:
        return "-:--"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02}:{secs:02}" if hours else f"{minutes}:{secs:02}"


def run(connector: Connector, client: Client, *, color: bool) -> int:
    """Runs the interactive client on a connected `client`; the exit status."""
    ui = Interactive(connector, client, color=color)
    try:
        return asyncio.run(ui.main())
    except KeyboardInterrupt:
        return 0
    finally:
        ui.close()
