"""Type stubs for relaychat's compiled engine (`relaychat._native`), written by hand.

Every blocking method releases the GIL and waits in slices of at most 50 ms, checking for
signals in between, so Ctrl-C always interrupts it.
"""

from __future__ import annotations

import os
import pathlib
import types
from collections.abc import AsyncIterator, Awaitable, Iterator
from typing import Any, ClassVar, Literal, final

from typing_extensions import Self, disjoint_base

__all__ = [
    "COMMANDS",
    "SETTINGS",
    "AccountBook",
    "Ack",
    "AsyncClient",
    "AsyncEventIterator",
    "BroadcastMessage",
    "Client",
    "Disconnected",
    "Event",
    "EventIterator",
    "FileEntry",
    "FileFailed",
    "FileIncoming",
    "FileQueued",
    "FileReceived",
    "FileSaved",
    "FilesEnd",
    "GroupFileIncoming",
    "GroupList",
    "GroupMessage",
    "HistoryEnd",
    "HistoryEntry",
    "HookBatch",
    "Joined",
    "Left",
    "MemberList",
    "MessageQueued",
    "NoFileSocket",
    "NotInGroup",
    "PasswordChanged",
    "PasswordRequiredError",
    "PrivateMessage",
    "ProtocolError",
    "RefusedError",
    "Registered",
    "RelaychatError",
    "Server",
    "ServerError",
    "ServerText",
    "TlsError",
    "TransferProgress",
    "UnknownCommand",
    "Usage",
    "UserList",
    "UserNotFound",
    "Welcome",
    "__version__",
    "init_logging",
]

__version__: str

_StrPath = str | os.PathLike[str]

def init_logging(level: Literal["error", "warn", "info", "debug", "trace"] = "info") -> None:
    """Send the engine's log lines (`[NEW CONNECTION] ...`, `[DISCONNECTED] ...`,
    `[FILE RECEIVED] ...`, `[FILE ERROR] ...`) to standard output. Later calls do nothing."""

COMMANDS: tuple[tuple[str, str, str], ...]
"""Every chat command as `(name, usage, help)`, in the order the server's usage lines and
a client's `help` list them."""

SETTINGS: tuple[tuple[str, Literal["bytes", "count", "seconds"], int | float, str], ...]
"""Every limit of `Server(...)` as `(name, unit, default, help)`, in the engine's order."""

class RelaychatError(Exception):
    """Base class of relaychat's own errors."""

class RefusedError(RelaychatError):
    """The server refused the request (an `ERROR: ...` line, or a closed handshake),
    e.g. a username that is invalid or already connected."""

class PasswordRequiredError(RefusedError):
    """The name is registered on the server and no password was given."""

class ProtocolError(RelaychatError):
    """The peer broke the wire protocol."""

class TlsError(RelaychatError):
    """TLS failed, and the message says why: the server's certificate is for another
    host name, signed by an unknown issuer, expired, does not match the pin, has changed
    since first use (with both fingerprints and the known_hosts file to edit), or the
    server speaks no TLS."""

@disjoint_base
class Server:
    """The relay server: a chat port and a file port sharing one registry.

    `start()` runs it in the background; `chat_port` and `file_port` then hold the real
    ports (pass 0 to pick free ones). As a context manager it starts on enter and stops on
    exit. Other errors: `OSError` if a port cannot be bound.
    """

    def __new__(
        cls,
        host: str = "127.0.0.1",
        chat_port: int = 2003,
        file_port: int = 2007,
        data_dir: _StrPath = ".",
        *,
        db: _StrPath | None = None,
        require_account: bool = False,
        registration: bool = True,
        history: bool = True,
        tls_cert: _StrPath | None = None,
        tls_key: _StrPath | None = None,
        tls_self_signed: bool = False,
        require_tls: bool = False,
        allow_plaintext_login: bool = False,
        metrics_port: int | None = None,
        idle_pause: float | None = None,
        max_line: int | None = None,
        max_header: int | None = None,
        send_queue: int | None = None,
        send_queue_bytes: int | None = None,
        send_queue_high_water: int | None = None,
        send_timeout: float | None = None,
        handshake_timeout: float | None = None,
        transfer_timeout: float | None = None,
        max_connections: int | None = None,
        max_per_address: int | None = None,
        max_file_size: int | None = None,
        user_quota: int | None = None,
        min_free_disk: int | None = None,
        inbox_max: int | None = None,
        inbox_settle: float | None = None,
        history_days: int | None = None,
        login_attempts: int | None = None,
        login_lockout: float | None = None,
        partial_ttl: float | None = None,
    ) -> Self:
        """Configure a server. Every keyword after `data_dir` is a limit of `SETTINGS`
        (sizes and counts as ints, times in seconds); `None` or leaving it out keeps its
        default. A value below a limit's minimum is raised to it. Unknown names raise
        `TypeError`, negative or fractional byte counts `ValueError`.

        - `data_dir`: where uploads are saved as `received_from_<sender>_<filename>`.
        - `db`: the SQLite file that keeps state (accounts, groups, inboxes, history, the
          file index, quotas), created and migrated at `start()`; default
          `<data_dir>/relaychat.db`; `":memory:"` for a private in-memory one, forgotten at
          exit. `start()` raises `RelaychatError` for a database that is corrupt, from a
          newer relaychat or in use by another server.
        - `idle_pause` (0.025 s): how long bytes without a newline wait before they count
          as a line, for clients that never send newlines (the lab's).
        - `max_line` (65536 B): longest chat line; `max_header` (4096 B, at least 64):
          longest file-port line.
        - `send_queue_high_water` (256 KiB, or a quarter of `send_queue` in lines): past it,
          the sessions sending to a chat connection stop reading their own sockets until it
          has drained to half (flow control: senders slow down, readers are not dropped).
          `send_queue` (8192 lines) and `send_queue_bytes` (4 MiB) cap a queue; its senders
          wait past them. `send_timeout` (30 s): a peer that takes nothing that long is
          dropped.
        - `handshake_timeout` (10 s): time to send a username. `transfer_timeout` (60 s):
          longest pause inside an upload.
        - `max_connections` (10000) and `max_per_address` (256): open connections, both
          ports together.
        - `max_file_size` (4 GiB), `user_quota` (16 GiB of saved copies per user),
          `min_free_disk` (256 MiB left free in `data_dir`), in bytes.
        - `metrics_port`: serve Prometheus' text format over HTTP on this port of `host`
          (0 picks a free one; see `metrics_port` and `stats()`).
        - `require_account`: only registered names may log in. `registration=False`:
          `register` is refused (the operator adds accounts with `AccountBook`).
          `history=False`: no message history is kept.
        - `tls_cert` and `tls_key` (PEM files), or `tls_self_signed` (a pair made once in
          `data_dir`): TLS on both ports, beside plain text (a connection's first byte
          tells them apart). `require_tls` refuses plain text. Passwords are taken over
          TLS or from a loopback address only, unless `allow_plaintext_login`.
        - `inbox_max` (10000): messages kept for one registered user while away. A queued
          message is forgotten once delivered: when our client confirms it, or, for a
          client that cannot (the lab's), once that session has sent a line after it or
          stayed connected `inbox_settle` (2 s).
          `history_days` (30): days of history kept. `login_attempts` (5) wrong passwords
          per name and per address lock it out for `login_lockout` (300 s).
        """
    @property
    def limits(self) -> dict[str, int | float]:
        """Every limit in force, by name (times in seconds)."""
    def start(self) -> None:
        """Bind both ports and serve in the background. Does nothing if already running."""
    def serve_forever(self) -> None:
        """Start if needed and block until the server stops. Ctrl-C stops it gracefully,
        then raises KeyboardInterrupt."""
    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, close every connection (aborting transfers, removing their
        partial files) and wait up to `timeout` seconds for the engine to finish."""
    @property
    def is_running(self) -> bool: ...
    @property
    def chat_port(self) -> int:
        """The bound chat port (the configured one before `start()`)."""
    @property
    def file_port(self) -> int:
        """The bound file port (the configured one before `start()`)."""
    @property
    def host(self) -> str: ...
    @property
    def data_dir(self) -> pathlib.Path: ...
    @property
    def db(self) -> pathlib.Path: ...
    @property
    def metrics_port(self) -> int | None:
        """The Prometheus endpoint's real port while running; `None` without one."""
    def stats(self) -> dict[str, float | dict[str, float]]:
        """What the metrics endpoint serves: each metric's name (`relaychat_users`,
        `relaychat_messages_total`, ...) to its value, or for a labelled one to a dict by
        the label's value (`{"private": 3.0, ...}`); histograms give `_sum` and
        `_count`."""
    @property
    def tls_fingerprint(self) -> str | None:
        """The SHA-256 fingerprint of the certificate in use (`AB:CD:...`), once
        started with TLS; else `None`. What clients pass as `tls_pin`."""
    def reload_tls(self) -> str:
        """Re-read the certificate and key files (SIGHUP does this to `python server.py`):
        new handshakes use them, live connections are untouched. Returns the new
        fingerprint; raises `TlsError` (keeping the old certificate) if they are
        unusable, `RuntimeError` if the server is not running."""
    def _install_hooks(
        self,
        *,
        message: tuple[float, bool] | None = None,
        login: tuple[float, bool] | None = None,
        upload: tuple[float, bool] | None = None,
        command: tuple[float, bool] | None = None,
        commands: list[tuple[str, str, str]] = ...,
        observe: bool = False,
    ) -> None:
        """Give the engine its hooks before `start()` (used by `relaychat.Server`): each
        kind's `(time limit in seconds, fail_open)` or `None`, the custom commands as
        `(name, usage, help)`, and whether observations are wanted."""
    def _next_hooks(
        self, timeout: float
    ) -> (
        tuple[
            HookBatch,
            list[tuple[Literal["message", "login", "upload", "command"], tuple[Any, ...]]],
            list[dict[str, str]],
        ]
        | None
    ):
        """The next requests for the hooks (waits up to `timeout` s for one, then takes
        what else waits): the batch to answer, its questions in order as `(kind, args)`
        (`args` as `Message`, `Login`, `Upload` take them; a command's caller, name and
        args), and the observations, each its fields by name (`event` its name). All
        empty if none came; `None` without hooks."""
    @property
    def hook_drops(self) -> int:
        """Observations dropped because the observers fell behind."""
    def users(self) -> list[str]:
        """Every connected user, in order of arrival (`RuntimeError` if not running)."""
    def groups(self) -> list[tuple[str, list[str]]]:
        """Every group and its members, by group name."""
    def send(self, to: str | None, text: str) -> int:
        """Send `[SERVER] <text>` to a user, to `GROUP:<g>`'s members, or (`None`) to
        everyone connected; returns how many it reached."""
    def kick(self, user: str, reason: str) -> bool:
        """Disconnect `user` after `ERROR: kicked: <reason>`; `False` if not connected."""
    def __enter__(self) -> Self: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> bool: ...

@final
class HookBatch:
    """The questions of one batch from the engine to `relaychat.Server`'s hooks, each
    answered once."""

    def answer(self, index: int, answer: tuple[str, Any] | None) -> None:
        """Answers question `index` (once): `None` lets it happen, `("deny", reason)`
        refuses it, `("rewrite", text)` sends a message with `text` instead,
        `("reply", lines)` answers a command. It goes out at the next `flush()`, or
        within a millisecond."""
    def flush(self) -> None:
        """Hands the answers given so far to the sessions that asked."""
    def __len__(self) -> int: ...

@final
class Client:
    """A connected client with blocking methods.

    Connecting opens the chat socket (username, then `Welcome, <u>!`) and the file socket.
    Incoming files are written to `<download_dir>/received_from_<sender>_<name>.tmp`,
    renamed into place once whole, acknowledged, and reported as `FileReceived`.

    A registered name needs its `password` (the server asks for it at login):
    `PasswordRequiredError` without one, `RefusedError("wrong password")` for a wrong one.

    `tls=True` (implied by `tls_ca` or `tls_pin`) speaks TLS on both sockets. The server
    is checked by, in this order: `tls_ca` (a PEM file of CAs, or the server's own
    certificate), `tls_pin` (its SHA-256 fingerprint), the system's trust store, else
    trust on first use: the first fingerprint seen for host:port is kept in `known_hosts`
    (default `$XDG_CONFIG_HOME/relaychat/known_hosts` or `~/.config/...`) and a later
    change is refused (as is a self-signed certificate from a server a CA vouched for
    before). Failures raise `TlsError`. A password (at login, `register`, `passwd`) goes
    only over TLS or to a loopback address: otherwise `TlsError`, unless
    `allow_plaintext_login=True`.

    `progress=True` adds `TransferProgress` events for uploads and downloads.

    Raises `RefusedError` if the server refuses the username, `OSError` if it cannot be
    reached, `TimeoutError` after `timeout` seconds, `ValueError` for an invalid username.
    """

    def __new__(
        cls,
        host: str = "127.0.0.1",
        chat_port: int = 2003,
        file_port: int = 2007,
        *,
        username: str,
        download_dir: _StrPath = ".",
        timeout: float = 10.0,
        password: str | None = None,
        tls: bool = False,
        tls_ca: _StrPath | None = None,
        tls_pin: str | None = None,
        known_hosts: _StrPath | None = None,
        allow_plaintext_login: bool = False,
        progress: bool = False,
    ) -> Self: ...
    @property
    def username(self) -> str: ...
    @property
    def closed(self) -> bool:
        """True once `close()` was called or the server closed the chat connection."""
    @property
    def extended(self) -> bool:
        """Whether the server speaks relaychat's extensions (asked for at login; ours
        does, the lab's does not)."""
    def msg(self, to: str, text: str) -> None:
        """Private message. `ValueError` if `text` is empty or holds a line break."""
    def broadcast(self, text: str) -> None:
        """Message to every other connected user."""
    def send_group(self, group: str, text: str) -> None:
        """Message to the other members of `group` (the server answers `NotInGroup` if
        you are not one)."""
    def send_command(self, line: str) -> None:
        """Send one raw command line exactly as typed (what the terminal client does)."""
    def list_users(self) -> list[str]:
        """The other connected users, in order of arrival. The reply is returned here, not
        also delivered as an event."""
    def leave(self, group: str) -> None:
        """`leave <group>`; the answer comes as an event (`Left` or `NotInGroup`)."""
    def join(self, group: str) -> None:
        """Join `group`, creating it; returns once the server confirms."""
    def send_file(self, target: str, path: _StrPath, compress: bool | None = None) -> int:
        """Send a file to a user or to `GROUP:<group>`, streamed from disk. `compress`
        (our server only): `True` sends the body zstd-compressed, `False` never, `None`
        when it pays (the server is on another machine and the file's first 128 KiB
        shrink to 90% or less). The server saves, and lab clients get, the original
        bytes; our clients receive it compressed too, and every copy is checked. Returns the
        bytes sent once the server has saved the whole file (with a server that speaks the
        extensions; with the lab's server, once the last byte is written). `RefusedError`
        with the server's reason if it refused or lost the upload;
        `ValueError("File does not exist")` if `path` is not a file."""
    def register(self, password: str) -> None:
        """Register the name we are connected as; later logins need `password`.
        `ValueError` for a password the rules refuse (8 characters to 128 bytes, no
        spaces); `RefusedError` with the server's reason if it refuses."""
    def passwd(self, old: str, new: str) -> None:
        """Change our password; `RefusedError("wrong password")` if `old` is wrong."""
    def history(self, conversation: str, count: int = 20) -> list[HistoryEntry]:
        """The last `count` (at most 1000) messages with a user, or in `GROUP:<group>`,
        oldest first. Registered users only (`RefusedError` for guests)."""
    def files(self) -> list[FileEntry]:
        """The last 50 files we sent or received (also to our groups), oldest first, with
        their ids. Registered users only."""
    def get(self, id: int) -> None:
        """Ask for file `id` of `files()` again: it arrives as a forward (`FileIncoming`
        and `FileReceived` events), or a `ServerError` says why not."""
    def next_event(self, timeout: float | None = None) -> _AnyEvent | None:
        """The next event; `None` if none comes within `timeout` seconds (`None`: wait
        forever) or after the stream has ended."""
    def events(self, timeout: float | None = None) -> EventIterator:
        """Iterate over events. Ends after `Disconnected`, or when no event comes within
        `timeout` seconds."""
    def close(self) -> None:
        """Close both connections."""
    def __enter__(self) -> Self: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> bool: ...

@final
class EventIterator(Iterator[_AnyEvent]):
    def __iter__(self) -> Self: ...
    def __next__(self) -> _AnyEvent: ...

@final
class AsyncClient:
    """The same client for asyncio: `client = await AsyncClient.connect(...)`; every
    method returns an awaitable; `async for event in client.events(timeout=...)`."""

    @staticmethod
    def connect(
        host: str = "127.0.0.1",
        chat_port: int = 2003,
        file_port: int = 2007,
        *,
        username: str,
        download_dir: _StrPath = ".",
        timeout: float = 10.0,
        password: str | None = None,
        tls: bool = False,
        tls_ca: _StrPath | None = None,
        tls_pin: str | None = None,
        known_hosts: _StrPath | None = None,
        allow_plaintext_login: bool = False,
        progress: bool = False,
    ) -> Awaitable[AsyncClient]: ...
    @property
    def username(self) -> str: ...
    @property
    def closed(self) -> bool: ...
    @property
    def extended(self) -> bool: ...
    def msg(self, to: str, text: str) -> Awaitable[None]: ...
    def broadcast(self, text: str) -> Awaitable[None]: ...
    def send_group(self, group: str, text: str) -> Awaitable[None]: ...
    def send_command(self, line: str) -> Awaitable[None]: ...
    def list_users(self) -> Awaitable[list[str]]: ...
    def join(self, group: str) -> Awaitable[None]: ...
    def leave(self, group: str) -> Awaitable[None]: ...
    def send_file(
        self, target: str, path: _StrPath, compress: bool | None = None
    ) -> Awaitable[int]: ...
    def register(self, password: str) -> Awaitable[None]: ...
    def passwd(self, old: str, new: str) -> Awaitable[None]: ...
    def history(self, conversation: str, count: int = 20) -> Awaitable[list[HistoryEntry]]: ...
    def files(self) -> Awaitable[list[FileEntry]]: ...
    def get(self, id: int) -> Awaitable[None]: ...
    def next_event(self, timeout: float | None = None) -> Awaitable[_AnyEvent | None]: ...
    def events(self, timeout: float | None = None) -> AsyncEventIterator: ...
    def close(self) -> Awaitable[None]: ...
    def __aenter__(self) -> Awaitable[Self]: ...
    def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> Awaitable[bool]: ...

@final
class AsyncEventIterator(AsyncIterator[_AnyEvent]):
    def __aiter__(self) -> Self: ...
    def __anext__(self) -> Awaitable[_AnyEvent]: ...

@disjoint_base
class Event:
    """The base class of every event: frozen, with `line`, the text the lab's client prints
    for it, and `__match_args__` (the fields in order) for `match` statements.
    `str(event) == event.line`."""

    __match_args__: ClassVar[tuple[str, ...]]
    @property
    def line(self) -> str: ...

@final
class Welcome(Event):
    """`Welcome, <user>!`: the server accepted the username (always the first event)."""

    user: str

@final
class PrivateMessage(Event):
    """`[PRIVATE from <sender>]: <text>`. `queued_at`: when it was sent (UTC, ISO 8601) if
    it waited in our inbox while we were away, else `None`."""

    sender: str
    text: str
    queued_at: str | None

@final
class BroadcastMessage(Event):
    """`[BROADCAST from <sender>]: <text>` (`queued_at` as for `PrivateMessage`)."""

    sender: str
    text: str
    queued_at: str | None

@final
class GroupMessage(Event):
    """`[GROUP <group>] <sender>: <text>` (`queued_at` as for `PrivateMessage`)."""

    group: str
    sender: str
    text: str
    queued_at: str | None

@final
class Joined(Event):
    """`You joined group '<group>'`, for a `join` sent with `send_command`."""

    group: str

@final
class Left(Event):
    """`You left group '<group>'`."""

    group: str

@final
class GroupList(Event):
    """`Your groups: ...`: the groups one is in, in order of joining (answer to `groups`)."""

    groups: list[str]

@final
class MemberList(Event):
    """`Members of '<group>': ...`, in order of joining (answer to `members <group>`)."""

    group: str
    members: list[str]

@final
class NotInGroup(Event):
    """`You are not in group '<group>'`."""

    group: str

@final
class UserList(Event):
    """`Connected users: a, b`, for a `list` sent with `send_command`."""

    users: list[str]

@final
class UserNotFound(Event):
    """`User <user> not found.`"""

    user: str

@final
class Usage(Event):
    """A usage line: a command lacked arguments."""

    text: str

@final
class UnknownCommand(Event):
    """`Unknown command. Use msg/broadcast/list/join/send_group`."""

@final
class FileIncoming(Event):
    """`[FILE] <sender> sent you file '<filename>' (<size> bytes). Incoming on file socket.`"""

    sender: str
    filename: str
    size: int

@final
class GroupFileIncoming(Event):
    """`[FILE] <sender> sent file '<filename>' to group '<group>'.`"""

    sender: str
    filename: str
    group: str

@final
class FileSaved(Event):
    """`[FILE] You sent file '<filename>' (saved as <saved_as>).`: a file sent to yourself."""

    filename: str
    saved_as: str

@final
class NoFileSocket(Event):
    """`User <user> has no file socket; file saved as <saved_as>`."""

    user: str
    saved_as: str

@final
class Ack(Event):
    """`[ACK] <recipient> received file '<filename>'`."""

    recipient: str
    filename: str

@final
class ServerError(Event):
    """`ERROR: <reason>`: the server refused something."""

    reason: str

@final
class ServerText(Event):
    """A server line of no known shape, as it came."""

    text: str

@final
class FileReceived(Event):
    """A file arrived whole, was renamed into place and acknowledged.
    `line` is `[FILE RECEIVED] <path> (<size> bytes) from <sender>`."""

    sender: str
    filename: str
    path: pathlib.Path
    size: int

@final
class FileFailed(Event):
    """An incoming file failed; nothing was left under its final name.
    `line` is `[FILE RECEIVE ERROR] <reason>`."""

    reason: str

@final
class TransferProgress(Event):
    """How far a transfer has got (for a client made with `progress=True`): at most 10 a
    second per transfer, the first after the first chunk and the last at `total`. `direction` is
    `"upload"` (ours, to `peer`: a user or `GROUP:<g>`) or `"download"` (from `peer`);
    `rate` is bytes per second since it began."""

    direction: Literal["upload", "download"]
    peer: str
    filename: str
    done: int
    total: int
    rate: int

@final
class Registered(Event):
    """`Registered <user>.`, for a `register` sent with `send_command`."""

    user: str

@final
class PasswordChanged(Event):
    """`Password changed.`, for a `passwd` sent with `send_command`."""

@final
class MessageQueued(Event):
    """`User <user> is offline; message queued.`: it reaches them at their next login."""

    user: str

@final
class HistoryEntry(Event):
    """`[HISTORY <at>] <sender>: <text>`: one message of a conversation (`at` in UTC, ISO
    8601)."""

    at: str
    sender: str
    text: str

@final
class HistoryEnd(Event):
    """`[HISTORY END] <count> messages`: the end of a `history` answer."""

    count: int

@final
class FileQueued(Event):
    """`User <user> is offline; file queued.`: it reaches them at their next login."""

    user: str

@final
class FileEntry(Event):
    """`[FILES #<id>] <at> <sender> -> <target>: '<filename>' (<size> bytes, blake3 <hex>)`:
    one file of the server's index (`blake3` is `-` for files saved before hashes were
    kept)."""

    id: int
    at: str
    sender: str
    target: str
    filename: str
    size: int
    blake3: str

@final
class FilesEnd(Event):
    """`[FILES END] <count> files`: the end of a `files` answer."""

    count: int

@final
class AccountBook:
    """The accounts of a database, managed offline (refused while a server uses it).
    `relaychat-server accounts ...` is built on it."""

    def __new__(cls, db: _StrPath) -> Self: ...
    def add(self, name: str, password: str) -> str:
        """Register `name`; returns it as stored (NFC). `ValueError` if the name or the
        password breaks the rules, or the name or a look-alike is registered."""
    def passwd(self, name: str, password: str) -> bool:
        """Set `name`'s password; False if there is no such account."""
    def remove(self, name: str) -> bool:
        """Delete `name` with its memberships and inbox; False if there was none."""
    def list(self) -> list[tuple[str, str]]:
        """Every account as `(name, created)` (UTC, ISO 8601), by name."""

@final
class Disconnected(Event):
    """The chat connection closed; no event follows. `line` is `Chat connection closed.`"""

_AnyEvent = (
    Welcome
    | PrivateMessage
    | BroadcastMessage
    | GroupMessage
    | Joined
    | NotInGroup
    | Left
    | GroupList
    | MemberList
    | UserList
    | UserNotFound
    | Usage
    | UnknownCommand
    | FileIncoming
    | GroupFileIncoming
    | FileSaved
    | NoFileSocket
    | Ack
    | ServerError
    | ServerText
    | Registered
    | PasswordChanged
    | MessageQueued
    | HistoryEntry
    | HistoryEnd
    | FileQueued
    | FileEntry
    | FilesEnd
    | FileReceived
    | FileFailed
    | Disconnected
    | TransferProgress
)
