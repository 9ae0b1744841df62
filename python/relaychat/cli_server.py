"""`python server.py` / `relaychat-server`: run the relay until Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import signal
import sys

from relaychat import SETTINGS, RelaychatError, Server, init_logging


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
    p.add_argument(
        "--db",
        metavar="PATH",
        help="the SQLite file that keeps accounts, groups, inboxes, history, the file index and "
        "quotas (default: DATA_DIR/relaychat.db; ':memory:' forgets everything at exit)",
    )
    limits = p.add_argument_group("limits (docs/SECURITY.md says what each one answers)")
    for name, unit, default, text in SETTINGS:
        limits.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            type=float if unit == "seconds" else int,
            metavar="SECONDS" if unit == "seconds" else "N",
            help=f"{text} ({unit}; default {default})",
        )
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
    limits = {name: getattr(args, name) for name, *_ in SETTINGS}
    limits = {name: value for name, value in limits.items() if value is not None}
    try:
        server = Server(
            args.host, args.chat_port, args.file_port, args.data_dir, db=args.db, **limits
        )
    except (TypeError, ValueError) as e:
        print(f"relaychat-server: {e}", file=sys.stderr)
        return 2
    # Before start(): a SIGTERM right after "Listening" must already stop us gracefully.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        server.start()
        print(f"[CHAT SERVER] Listening on {server.chat_port}", flush=True)
        print(f"[FILE SERVER] Listening on {server.file_port}", flush=True)
        server.serve_forever()
    except KeyboardInterrupt:
        server.stop()
    except (OSError, RelaychatError) as e:
        print(f"relaychat-server: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
