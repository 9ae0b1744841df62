"""A program that uses `AsyncClient` exits cleanly right after its last await: the engine's
thread that handed the awaitable its result is never cut off by the interpreter's
finalization (a fatal `PyGILState_Release` abort in about 1 exit in 40 before the fix,
with the program and that thread on one CPU)."""

from __future__ import annotations

import os
import subprocess
import sys

from relaychat import Server

from tests.conftest import HOST

PROGRAM = """
import asyncio, os, sys
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # its threads share one CPU
from relaychat import AsyncClient

async def main():
    c = await AsyncClient.connect(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]),
                                  username=sys.argv[4])
    async with c:
        for _ in range(50):  # each a Rust future whose result a tokio thread hands over
            await c.next_event(timeout=0.0005)

asyncio.run(main())
"""

#: Exits tried: with the race open, the chance that all of them pass is about 2%.
EXITS = 150


def test_async_programs_exit_cleanly_right_after_an_await(server: Server) -> None:
    env = {**os.environ, "PYTHONFAULTHANDLER": "0"}
    failed = []
    for i in range(EXITS):
        argv = [sys.executable, "-c", PROGRAM, HOST, str(server.chat_port)]
        argv += [str(server.file_port), f"exit{i}"]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)
        if out.returncode != 0:
            failed.append((out.returncode, out.stderr[-300:]))
    assert not failed, f"{len(failed)} of {EXITS} exits failed; the first: {failed[0]}"
