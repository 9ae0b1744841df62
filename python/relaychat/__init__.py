"""relaychat: a multi-user chat and file relay with a Rust (tokio) engine.

Wire-compatible with the socket lab it grew from (see docs/PROTOCOL.md)::

    from relaychat import Server, Client

    with Server(chat_port=0, file_port=0, data_dir="data") as srv:
        with Client("127.0.0.1", srv.chat_port, srv.file_port, username="ahmad") as c:
            c.broadcast("hello")
            for event in c.events(timeout=1):
                print(event.line)
"""

from relaychat import _native
from relaychat._native import *  # noqa: F403  (the engine's classes; `__all__` lists them)

__all__: list[str] = []
__all__ += _native.__all__  # the form type checkers follow for re-exports

# The server Python can extend (hooks, commands, plugins) over the engine's.
from relaychat.server import Login, Message, Refuse, Server, Upload  # noqa: E402, F401

__all__ += ["Login", "Message", "Refuse", "Upload"]
