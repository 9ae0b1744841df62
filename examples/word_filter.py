"""A word filter: masks words on a list in every message, and refuses a message that is
nothing but shouting. `python server.py --plugin examples/word_filter.py`."""

from __future__ import annotations

import re

from relaychat import Message, Refuse, Server

#: Words masked wherever they appear (case-insensitive, whole words).
BANNED = ("darn", "heck")
_PATTERN = re.compile(r"\b(" + "|".join(BANNED) + r")\b", re.IGNORECASE)


def setup(server: Server) -> None:
    @server.before_message
    def filter_words(msg: Message) -> str:
        if len(msg.text) > 8 and msg.text.isupper():
            raise Refuse("no shouting, please")
        return _PATTERN.sub(lambda m: m.group(0)[0] + "*" * (len(m.group(0)) - 1), msg.text)
