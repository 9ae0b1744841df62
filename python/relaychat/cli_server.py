"""`python server.py` / `relaychat-server`: run the relay until Ctrl-C or SIGTERM.

`relaychat-server accounts add|remove|list|passwd [NAME] --data-dir D` manages accounts
while the server is stopped (the password from a hidden prompt, or the first line of
standard input when it is not a terminal).
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import logging
import os
import signal
import sys

from relaychat import SETTINGS, AccountBook, RelaychatError, Server, init_logging

DEFAULT_DB = "relaychat.db"


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
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (0 picks a free port)",
    )
    p.add_argument(
        "--plugin",
        metavar="MODULE",
        action="append",
        default=[],
        help="load a plugin: a dotted module name or a .py file with a setup(server) function "
        "(repeatable; docs/PLUGINS.md)",
    )
    p.add_argument(
        "--db",
        metavar="PATH",
        help="the SQLite file that keeps accounts, groups, inboxes, history, the file index and "
        "quotas (default: DATA_DIR/relaychat.db; ':memory:' forgets everything at exit)",
    )
    accounts = p.add_argument_group("accounts and history (docs/SECURITY.md)")
    accounts.add_argument(
        "--require-account",
        action="store_true",
        help="only registered names may log in (guests are refused)",
    )
    accounts.add_argument(
        "--registration",
        choices=["open", "closed"],
        default="open",
        help="whether guests may 'register' their name (default %(default)s; "
        "'relaychat-server accounts add' works either way)",
    )
    accounts.add_argument(
        "--history",
        choices=["on", "off"],
        default="on",
        help="keep message history for 'history' (default %(default)s; see --history-days)",
    )
    tls = p.add_argument_group(
        "TLS (both ports serve TLS and plain text; a connection's first byte tells which)"
    )
    tls.add_argument("--tls-cert", metavar="PEM", help="certificate chain (reloaded on SIGHUP)")
    tls.add_argument("--tls-key", metavar="PEM", help="its private key (reloaded on SIGHUP)")
    tls.add_argument(
        "--tls-self-signed",
        action="store_true",
        help="make a key and a self-signed certificate in DATA_DIR on first start and keep "
        "them; the log shows its SHA-256 fingerprint for clients to pin",
    )
    tls.add_argument(
        "--require-tls", action="store_true", help="refuse plain-text connections (both ports)"
    )
    tls.add_argument(
        "--allow-plaintext-login",
        action="store_true",
        help="take passwords over plain text from other machines too (by default only over "
        "TLS or from this machine)",
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


def _reload(server: Server) -> None:
    with contextlib.suppress(RelaychatError, RuntimeError):
        server.reload_tls()


def parse_accounts_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="relaychat-server accounts",
        description="Manage accounts while the server is stopped. Passwords come from a "
        "hidden prompt, or from the first line of standard input when it is not a terminal.",
    )
    p.add_argument("action", choices=["add", "remove", "list", "passwd"])
    p.add_argument("name", nargs="?", help="the account (all but 'list')")
    p.add_argument("--data-dir", default=".", help="the server's data directory")
    p.add_argument("--db", metavar="PATH", help="the database (default: DATA_DIR/relaychat.db)")
    args = p.parse_args(argv)
    if args.action != "list" and not args.name:
        p.error(f"'{args.action}' needs a NAME")
    return args


def read_password(name: str) -> str:
    if sys.stdin.isatty():
        first = getpass.getpass(f"Password for {name}: ")
        if getpass.getpass("Again: ") != first:
            raise ValueError("the passwords differ")
        return first
    return sys.stdin.readline().rstrip("\r\n")


def accounts_main(argv: list[str]) -> int:
    args = parse_accounts_args(argv)
    db = args.db or os.path.join(args.data_dir, DEFAULT_DB)
    try:
        book = AccountBook(db)
        if args.action == "list":
            for name, created in book.list():
                print(f"{name}\t{created}")
        elif args.action == "remove":
            if not book.remove(args.name):
                print(f"relaychat-server: no account '{args.name}'", file=sys.stderr)
                return 1
            print(f"Removed {args.name}.")
        elif args.action == "add":
            name = book.add(args.name, read_password(args.name))
            print(f"Registered {name}.")
        elif not book.passwd(args.name, read_password(args.name)):
            print(f"relaychat-server: no account '{args.name}'", file=sys.stderr)
            return 1
        else:
            print("Password changed.")
    except (ValueError, OSError, RelaychatError) as e:
        print(f"relaychat-server: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["accounts"]:
        return accounts_main(argv[1:])
    args = parse_args(argv)
    init_logging(args.log_level)
    limits = {name: getattr(args, name) for name, *_ in SETTINGS}
    limits = {name: value for name, value in limits.items() if value is not None}
    try:
        server = Server(
            args.host,
            args.chat_port,
            args.file_port,
            args.data_dir,
            db=args.db,
            require_account=args.require_account,
            registration=args.registration == "open",
            history=args.history == "on",
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            tls_self_signed=args.tls_self_signed,
            require_tls=args.require_tls,
            allow_plaintext_login=args.allow_plaintext_login,
            metrics_port=args.metrics_port,
            **limits,
        )
    except (TypeError, ValueError) as e:
        print(f"relaychat-server: {e}", file=sys.stderr)
        return 2
    # A plugin that cannot load stops the start, with its traceback; at run time its
    # errors are logged.
    logging.basicConfig(format="[PLUGIN] %(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    for plugin in args.plugin:
        server.load_plugin(plugin)
    # Before start(): a SIGTERM right after "Listening" must already stop us gracefully.
    signal.signal(signal.SIGTERM, _interrupt)
    if args.tls_cert or args.tls_self_signed:
        # The engine logs the outcome (the new fingerprint, or why the old pair stays).
        signal.signal(signal.SIGHUP, lambda signum, frame: _reload(server))
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
