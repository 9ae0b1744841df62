"""An allow-list: only the names in a file (one per line; `RELAYCHAT_ALLOW_FILE`, default
`allowed.txt`) may log in. The file is read at each login, so it can change while the
server runs. `python server.py --plugin examples/allow_list.py`."""

from __future__ import annotations

import os
from pathlib import Path

from relaychat import Login, Refuse, Server


def setup(server: Server) -> None:
    path = Path(os.environ.get("RELAYCHAT_ALLOW_FILE", "allowed.txt"))

    @server.before_login
    def allowed(login: Login) -> None:
        names = {line.strip() for line in path.read_text().splitlines()}
        if login.name not in names:
            raise Refuse(f"{login.name} is not on this server's list")
