"""relaychat: a multi-user chat and file relay with a Rust (tokio) engine.

Wire-compatible with the socket lab it grew from (see docs/PROTOCOL.md)::

    from relaychat import Server, Client

    with Server(chat_port=0, file_port=0, data_dir="data") as srv:
        with Client("127.0.0.1", srv.chat_port, srv.file_port, username="ahmad") as c:
            c.broadcast("hello")
            for event in c.events(timeout=1):
                print(event.line)
"""

import atexit
import time

from relaychat import _native
from relaychat._native import *  # noqa: F403  (the engine's classes; `__all__` lists them)

__all__: list[str] = []
__all__ += _native.__all__  # the form type checkers follow for re-exports

# The server Python can extend (hooks, commands, plugins) over the engine's.
from relaychat.server import Login, Message, Refuse, Server, Upload  # noqa: E402, F401

__all__ += ["Login", "Message", "Refuse", "Upload"]


@atexit.register
def _let_the_engine_hand_over() -> None:
    """At exit, lets go of the GIL for a moment. The engine's thread that hands an awaitable
    its result runs a little Python (asyncio's `call_soon_threadsafe`); if the interpreter
    took the GIL from it there and began to finalize, that thread could not finish and the
    process aborted (`PyGILState_Release: thread state ... must be current when releasing`,
    pyo3-async-runtimes issue 40; seen in about 1 exit of 40 right after an await). Atexit
    handlers run after the program's own threads ended, before finalization."""
    time.sleep(0.005)
