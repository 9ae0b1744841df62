"""A plugin that asks about every message and lets each through unchanged: what a hook
costs, measured by bench/run.py."""

from __future__ import annotations

from relaychat import Message, Server


def setup(server: Server) -> None:
    @server.before_message
    def allow(msg: Message) -> None:
        return None
