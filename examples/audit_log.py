"""An audit log: every connect, disconnect, join, leave, message, saved file and
acknowledgement as one JSON line (`RELAYCHAT_AUDIT_LOG`, default `audit.jsonl`), in the
order they happened. `python server.py --plugin examples/audit_log.py`."""

from __future__ import annotations

import json
import os
import time
from typing import Any

from relaychat import Server
from relaychat.server import EVENTS


def setup(server: Server) -> None:
    path = os.environ.get("RELAYCHAT_AUDIT_LOG", "audit.jsonl")

    def write(fields: dict[str, Any]) -> None:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"at": time.time(), **fields}) + "\n")

    for event in sorted(EVENTS):
        server.on(event, write)
