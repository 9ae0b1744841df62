"""`python client.py` / `relaychat-client`: the lab's terminal client, on the Rust engine.

Reads commands from standard input (typed or piped), one per line. `send_file <user|GROUP:g>
<path>` sends a file; `quit` or end of input exits; everything else goes to the server as
typed. Every server line and file event is printed as the lab's client prints it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading

from relaychat import Client, Disconnected, RelaychatError

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
    return p.parse_args(argv)


def _print_events(client: Client, gone: threading.Event) -> None:
    for event in client.events():
        if isinstance(event, Disconnected):
            if not gone.is_set():  # the server went away, not us
                say(event.line)
            break
        say(event.line)
    if not gone.is_set():
        gone.set()
        # A signal (not interrupt_main) also breaks a blocking read of standard input.
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)


def _read_line() -> str | None:
    if sys.stdin.isatty():
        try:
            return input("")
        except EOFError:
            return None
    line = sys.stdin.readline()
    return line.rstrip("\r\n") if line else None


def _send_file(client: Client, line: str) -> None:
    parts = line.split(" ", 2)
    if len(parts) < 3 or not parts[1] or not parts[2]:
        say(SEND_FILE_USAGE)
        return
    target, path = parts[1], parts[2]
    if not os.path.isfile(path):
        say("File does not exist")
        return
    try:
        client.send_file(target, path)
    except (RelaychatError, OSError, ValueError) as e:
        say(f"[FILE SEND ERROR] {e}")
        return
    say(f"[FILE SENT SUCCESSFULLY] {path} -> {target}")


def _repl(client: Client) -> bool:
    """Runs typed commands; true when input ended (end of input or `quit`)."""
    while True:
        line = _read_line()
        if line is None or line.strip() == "quit":
            return True
        if not line.strip():
            continue
        if line == "send_file" or line.startswith("send_file "):
            _send_file(client, line)
            continue
        try:
            client.send_command(line)
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
    username = args.username
    if username is None:
        try:
            username = input("Enter username: ").strip()
        except (EOFError, KeyboardInterrupt):
            return 0
    try:
        client = Client(
            args.host,
            args.chat_port,
            args.file_port,
            username=username,
            download_dir=args.download_dir,
            timeout=args.timeout,
        )
    except KeyboardInterrupt:
        return 0
    except (RelaychatError, OSError, ValueError, TimeoutError) as e:
        say(f"ERROR: {e}")
        return 1
    gone = threading.Event()
    printer = threading.Thread(target=_print_events, args=(client, gone), daemon=True)
    printer.start()
    try:
        if _repl(client):
            _linger(client)
    except KeyboardInterrupt:
        pass
    finally:
        gone.set()
        with contextlib.suppress(KeyboardInterrupt):
            client.close()
            # The printer ends after the last event (`Disconnected`): let it print them all.
            printer.join(LINGER_SECONDS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
