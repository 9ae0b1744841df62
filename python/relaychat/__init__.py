"""relaychat: a multi-user chat and file relay with a Rust (tokio) engine.

Wire-compatible with the socket lab it grew from (see docs/PROTOCOL.md)::

    from relaychat import Server, Client

    with Server(chat_port=0, file_port=0, data_dir="data") as srv:
        with Client("127.0.0.1", srv.chat_port, srv.file_port, username="ahmad") as c:
            c.broadcast("hello")
            for event in c.events(timeout=1):
                print(event.line)
"""

from relaychat._native import (
    SETTINGS,
    Ack,
    AsyncClient,
    AsyncEventIterator,
    BroadcastMessage,
    Client,
    Disconnected,
    Event,
    EventIterator,
    FileFailed,
    FileIncoming,
    FileReceived,
    FileSaved,
    GroupFileIncoming,
    GroupMessage,
    Joined,
    NoFileSocket,
    NotInGroup,
    PrivateMessage,
    ProtocolError,
    RefusedError,
    RelaychatError,
    Server,
    ServerError,
    ServerText,
    UnknownCommand,
    Usage,
    UserList,
    UserNotFound,
    Welcome,
    __version__,
    init_logging,
)

__all__ = [
    "SETTINGS",
    "Ack",
    "AsyncClient",
    "AsyncEventIterator",
    "BroadcastMessage",
    "Client",
    "Disconnected",
    "Event",
    "EventIterator",
    "FileFailed",
    "FileIncoming",
    "FileReceived",
    "FileSaved",
    "GroupFileIncoming",
    "GroupMessage",
    "Joined",
    "NoFileSocket",
    "NotInGroup",
    "PrivateMessage",
    "ProtocolError",
    "RefusedError",
    "RelaychatError",
    "Server",
    "ServerError",
    "ServerText",
    "UnknownCommand",
    "Usage",
    "UserList",
    "UserNotFound",
    "Welcome",
    "__version__",
    "init_logging",
]
