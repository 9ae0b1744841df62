"""A plugin loaded by dotted name in tests/test_hooks.py."""

from __future__ import annotations

from relaychat import Server


def setup(server: Server) -> None:
    server.command("ping", help="answers pong")(lambda caller, args: "pong")
