"""`python client.py` / `relaychat-client`: the lab's terminal client, on the Rust engine.

Reads commands from standard input, one per line. `send_file <user|GROUP:g> <path>` sends a
file; `quit` or end of input exits; everything else goes to the server as typed. Every
server line and file event is printed as the lab's client prints it.

When standard input and output are both a terminal (and `--plain` is not given), the same
commands run in the interactive client of `relaychat.interactive` instead: an input line
that stays at the bottom, completion, colour, progress and history. Piped, the output is
the lab's, line for line.

A registered name's password comes from `--password-file`, `RELAYCHAT_PASSWORD`, or, when
the server asks for it, a hidden prompt (on a terminal) or the next line of standard input.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import os
import signal
import sys
import threading

from relaychat import (
    Client,
    Disconnected,
    PasswordRequiredError,
    RelaychatError,
    TlsError,
    TransferProgress,
)

SEND_FILE_USAGE = "Usage: send_file <username/group> <filepath>"
#: How long to wait, after the last command, for its replies before exiting.
LINGER_SECONDS = 5.0

_print_lock = threading.Lock()


def say(text: str) -> None:
    """Prints one line whole: the event thread and the input loop both print."""
    with _print_lock:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="relaychat-client", description="relaychat client")
    p.add_argument("--host", default="127.0.0.1", help="server address (default %(default)s)")
    p.add_argument("--chat-port", type=int, default=2003, help="server chat port")
    p.add_argument("--file-port", type=int, default=2007, help="server file port")
    p.add_argument("--username", help="the name to use (asked for when missing)")
    p.add_argument(
        "--download-dir", default=".", help="where received files go (default: current directory)"
    )
    p.add_argument(
        "--timeout", type=float, default=10.0, help="seconds to wait for the server (default 10)"
    )
    p.add_argument(
        "--password-file",
        metavar="FILE",
        help="read a registered name's password from the first line of FILE "
        "(else RELAYCHAT_PASSWORD, else asked when the server wants it)",
    )
    p.add_argument(
        "--plain",
        action="store_true",
        help="on a terminal too, read and print plain lines as when piped "
        "(no completion, colour, progress or history)",
    )
    p.add_argument(
        "--no-color",
        action="store_true",
        help="interactive client without colour (as does a non-empty NO_COLOR)",
    )
    tls = p.add_argument_group(
        "TLS",
        "The server is checked by --tls-ca, else --tls-pin, else the system's trust store, "
        "else trust on first use (its fingerprint is kept in --known-hosts; a change is "
        "refused).",
    )
    tls.add_argument("--tls", action="store_true", help="speak TLS on both sockets")
    tls.add_argument(
        "--tls-ca",
        metavar="FILE",
        help="PEM file of the CA(s) to trust, or of the server's own certificate (implies --tls)",
    )
    tls.add_argument(
        "--tls-pin",
        metavar="SHA256",
        help="the server certificate's SHA-256 fingerprint, as the server logs it (implies --tls)",
    )
    tls.add_argument(
        "--known-hosts",
        metavar="FILE",
        help="where trust on first use keeps fingerprints "
        "(default: $XDG_CONFIG_HOME/relaychat/known_hosts or ~/.config/relaychat/known_hosts)",
    )
    tls.add_argument(
        "--allow-plaintext-login",
        action="store_true",
        help="send a password in plain text to another machine too (by default only over "
        "TLS or to this machine)",
    )
    return p.parse_args(argv)


def _given_password(args: argparse.Namespace) -> str | None:
    if args.password_file:
        with open(args.password_file, encoding="utf-8") as f:
            return f.readline().rstrip("\r\n")
    return os.environ.get("RELAYCHAT_PASSWORD")


def _ask_password(username: str) -> str | None:
    """The password the server asked for: hidden on a terminal; else the next line of
    standard input, after the server's prompt line (as the lab's client would show it)."""
    if sys.stdin.isatty():
        return getpass.getpass(f"Password for {username}: ")
    say(f"Password for {username}:")
    return _read_line()


class Connector:
    """Opens connections as the command line says: the same for the first one and for a
    reconnection, which reuses the password that worked."""

    def __init__(self, args: argparse.Namespace, username: str, *, progress: bool) -> None:
        self.args = args
        self.username = username
        self.progress = progress
        self.password = _given_password(args)

    def connect(self) -> Client | None:
        """A connected client; None if the server wants a password and none came (end of
        input). Raises what `Client` raises, and `EOFError` or `KeyboardInterrupt` from
        the password prompt."""
        try:
            return self._client(self.password)
        except PasswordRequiredError:
            password = _ask_password(self.username)
            if password is None:
                return None
            client = self._client(password)
            self.password = password
            return client

    def _client(self, password: str | None) -> Client:
        args = self.args
        return Client(
            args.host,
            args.chat_port,
            args.file_port,
            username=self.username,
            download_dir=args.download_dir,
            timeout=args.timeout,
            password=password,
            tls=args.tls,
            tls_ca=args.tls_ca,
            tls_pin=args.tls_pin,
            known_hosts=args.known_hosts,
            allow_plaintext_login=args.allow_plaintext_login,
            progress=self.progress,
        )


class Session:
    """What the command line knows about its run."""

    def __init__(self, client: Client) -> None:
        self.client = client
        #: Set once the chat connection is over (the server went away, or we closed it).
        self.gone = threading.Event()
        #: Whether an upload was refused, lost, or cut short: the exit status says so.
        self.transfer_broken = False
        #: Set while the input loop waits on standard input (only then is it interrupted).
        self.reading = threading.Event()


def _print_events(session: Session) -> None:
    gone = session.gone
    for event in session.client.events():
        if isinstance(event, TransferProgress):
            continue  # the lab's client shows none; output stays line for line
        if isinstance(event, Disconnected):
            if not gone.is_set():  # the server went away, not us
                say(event.line)
            break
        say(event.line)
    if not gone.is_set():
        gone.set()
        # Only a wait on standard input needs breaking (a signal, not interrupt_main, also
        # breaks a blocking read); anything else the loop is doing ends on its own, since
        # the engine's calls fail once the connection is gone. `gone` is set first, and the
        # loop sets `reading` before it looks at `gone`: one of the two always sees the other.
        if session.reading.is_set():
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)


def _read_line() -> str | None:
    if sys.stdin.isatty():
        try:
            return input("")
        except EOFError:
            return None
    line = sys.stdin.readline()
    return line.rstrip("\r\n") if line else None


def is_send_file(line: str) -> bool:
    """Whether a typed line is the client's own `send_file` (never sent as a command)."""
    return line == "send_file" or line.startswith("send_file ")


def parse_send_file(line: str) -> tuple[str, str]:
    """The target and path of a `send_file` line; `ValueError` with the line to print if
    one is missing or the file does not exist."""
    parts = line.split(" ", 2)
    if len(parts) < 3 or not parts[1] or not parts[2]:
        raise ValueError(SEND_FILE_USAGE)
    target, path = parts[1], parts[2]
    if not os.path.isfile(path):
        raise ValueError("File does not exist")
    return target, path


def send_file(client: Client, target: str, path: str) -> tuple[bool, str]:
    """Sends one file; returns whether the server has it whole, and the line that says so
    (success only then; a lab server cannot say so: there, once the last byte is
    written)."""
    try:
        client.send_file(target, path)
    except (RelaychatError, OSError, ValueError, TimeoutError) as e:
        return False, f"[FILE SEND ERROR] {e}"
    return True, f"[FILE SENT SUCCESSFULLY] {path} -> {target}"


def _send_file(session: Session, line: str) -> None:
    try:
        target, path = parse_send_file(line)
    except ValueError as e:
        say(str(e))
        return
    try:
        sent, report = send_file(session.client, target, path)
    except KeyboardInterrupt:
        session.transfer_broken = True
        why = "the server closed the connection" if session.gone.is_set() else "interrupted"
        say(f"[FILE SEND ERROR] {path} -> {target}: {why}")
        raise
    session.transfer_broken |= not sent
    say(report)


def _repl(session: Session) -> bool:
    """Runs typed commands; true when input ended (end of input or `quit`)."""
    client = session.client
    while True:
        session.reading.set()
        try:
            if session.gone.is_set():
                return False
            line = _read_line()
        finally:
            session.reading.clear()
        if line is None or line.strip() == "quit":
            return True
        if not line.strip():
            continue
        if is_send_file(line):
            _send_file(session, line)
            continue
        try:
            client.send_command(line)
        except TlsError as e:  # a password that would have crossed the network in clear
            say(f"ERROR: {e}")
            continue
        except (RelaychatError, OSError, ValueError) as e:
            say(f"Chat send error: {e}")
            return False


def _linger(client: Client) -> None:
    """Waits until the server has answered every command sent so far: it answers in order,
    so the reply to one more `list` comes after all of them (and works on the lab's server
    too)."""
    with contextlib.suppress(RelaychatError, OSError, TimeoutError, ValueError):
        client.list_users()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # The event thread ends a wait on standard input with SIGINT: make sure it is not
    # ignored (a background job of a non-interactive shell starts with it ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    username = args.username
    if username is None:
        try:
            username = input("Enter username: ").strip()
        except (EOFError, KeyboardInterrupt):
            return 0
    interactive = not args.plain and sys.stdin.isatty() and sys.stdout.isatty()
    try:
        connector = Connector(args, username, progress=interactive)
        client = connector.connect()
    except (KeyboardInterrupt, EOFError):
        return 0
    except (RelaychatError, OSError, ValueError, TimeoutError) as e:
        say(f"ERROR: {e}")
        return 1
    if client is None:
        return 1
    if interactive:
        from relaychat.interactive import run  # prompt_toolkit only when it is needed

        color = not args.no_color and not os.environ.get("NO_COLOR")
        return run(connector, client, color=color)
    session = Session(client)
    gone = session.gone
    printer = threading.Thread(target=_print_events, args=(session,), daemon=True)
    printer.start()
    try:
        if _repl(session):
            _linger(client)
    except KeyboardInterrupt:
        pass
    finally:
        gone.set()
        with contextlib.suppress(KeyboardInterrupt):
            client.close()
            # The printer ends after the last event (`Disconnected`): let it print them all.
            printer.join(LINGER_SECONDS)
    return 1 if session.transfer_broken else 0


if __name__ == "__main__":
    sys.exit(main())
