"""`python server.py` / `relaychat-server`: run the relay until Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import signal
import sys

from relaychat import Server, init_logging

LIMIT_FLAGS = [
    ("--max-line", int, "longest chat line, bytes"),
    ("--max-header", int, "longest file-port line, bytes"),
    ("--send-queue", int, "lines queued for one chat connection before it is dropped"),
    ("--send-queue-bytes", int, "bytes queued for one chat connection before it is dropped"),
    ("--send-timeout", float, "seconds a peer may read nothing before it is dropped"),
    ("--idle-pause", float, "seconds of quiet that end a line sent without a newline"),
    ("--handshake-timeout", float, "seconds to send a username"),
    ("--transfer-timeout", float, "longest pause inside an upload, seconds"),
    ("--max-connections", int, "open connections, both ports"),
    ("--max-per-address", int, "open connections from one IP address"),
    ("--max-file-size", int, "largest file, bytes"),
    ("--user-quota", int, "bytes of saved copies per user"),
    ("--min-free-disk", int, "bytes always left free in the data directory"),
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="relaychat-server",
        description="relaychat server: chat on one port, file transfer on another.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    p.add_argument("--chat-port", type=int, default=2003, help="chat port; 0 picks a free one")
    p.add_argument("--file-port", type=int, default=2007, help="file port; 0 picks a free one")
    p.add_argument(
        "--data-dir", default=".", help="where uploads are saved (default: current directory)"
    )
    limits = p.add_argument_group("limits (defaults in docs/SECURITY.md)")
    for flag, kind, text in LIMIT_FLAGS:
        limits.add_argument(flag, type=kind, metavar="N", help=text)
    p.add_argument(
        "--log-level",
        default="info",
        choices=["error", "warn", "info", "debug", "trace"],
        help="how much to log (default %(default)s)",
    )
    return p.parse_args(argv)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    init_logging(args.log_level)
    limits = {
        flag[2:].replace("-", "_"): getattr(args, flag[2:].replace("-", "_"))
        for flag, _, _ in LIMIT_FLAGS
    }
    server = Server(args.host, args.chat_port, args.file_port, args.data_dir, **limits)
    # Before start(): a SIGTERM right after "Listening" must already stop us gracefully.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        server.start()
        print(f"[CHAT SERVER] Listening on {server.chat_port}", flush=True)
        print(f"[FILE SERVER] Listening on {server.file_port}", flush=True)
        server.serve_forever()
    except KeyboardInterrupt:
        server.stop()
    except OSError as e:
        print(f"relaychat-server: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
