"""`python client.py` / `relaychat-client`: the lab's terminal client, on the Rust engine.

Reads commands from standard input (typed or piped), one per line. `send_file <user|GROUP:g>
<path>` sends a file; `quit` or end of input exits; everything else goes to the server as
typed. Every server line and file event is printed as the lab's client prints it.
"""

from __future__ import annotations

import _thread
import argparse
import contextlib
import os
import sys
import threading

from relaychat import Client, Disconnected, RelaychatError

SEND_FILE_USAGE = "Usage: send_file <username/group> <filepath>"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="relaychat-client", description="relaychat client")
    p.add_argument("--host", default="127.0.0.1", help="server address (default %(default)s)")
    p.add_argument("--chat-port", type=int, default=2003, help="server chat port")
    p.add_argument("--file-port", type=int, default=2007, help="server file port")
    p.add_argument("--username", help="the name to use (asked for when missing)")
    p.add_argument(
        "--download-dir", default=".", help="where received files go (default: current directory)"
    )
    return p.parse_args(argv)


def _print_events(client: Client, gone: threading.Event) -> None:
    for event in client.events():
        print(event.line, flush=True)
        if isinstance(event, Disconnected):
            break
    if not gone.is_set():
        gone.set()
        _thread.interrupt_main()


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
        print(SEND_FILE_USAGE, flush=True)
        return
    target, path = parts[1], parts[2]
    if not os.path.isfile(path):
        print("File does not exist", flush=True)
        return
    try:
        client.send_file(target, path)
    except (RelaychatError, OSError, ValueError) as e:
        print(f"[FILE SEND ERROR] {e}", flush=True)
        return
    print(f"[FILE SENT SUCCESSFULLY] {path} -> {target}", flush=True)


def _repl(client: Client) -> None:
    while True:
        line = _read_line()
        if line is None or line.strip() == "quit":
            return
        if not line.strip():
            continue
        if line == "send_file" or line.startswith("send_file "):
            _send_file(client, line)
            continue
        try:
            client.send_command(line)
        except (RelaychatError, OSError, ValueError) as e:
            print(f"Chat send error: {e}", flush=True)
            return


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
        )
    except (RelaychatError, OSError, ValueError, TimeoutError) as e:
        print(f"ERROR: {e}", flush=True)
        return 1
    gone = threading.Event()
    printer = threading.Thread(target=_print_events, args=(client, gone), daemon=True)
    printer.start()
    try:
        _repl(client)
    except KeyboardInterrupt:
        pass
    finally:
        gone.set()
        with contextlib.suppress(KeyboardInterrupt):
            client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
