"""A bot of two commands: `roll NdM` rolls dice (at most 5 rolls per user in 10 s) and
`echo TEXT` says it back. `python server.py --plugin examples/dice_bot.py`."""

from __future__ import annotations

import random
import re

from relaychat import Refuse, Server


def setup(server: Server) -> None:
    @server.command("roll", usage="roll <N>d<M>", help="roll N dice of M sides", rate="5/10s")
    def roll(caller: str, args: str) -> str:
        m = re.fullmatch(r"\s*(\d{1,2})d(\d{1,4})\s*", args)
        if not m or not (1 <= int(m.group(1)) <= 20 and 2 <= int(m.group(2)) <= 1000):
            raise Refuse("usage: roll <N>d<M>, with N from 1 to 20 and M from 2 to 1000")
        dice = [random.randint(1, int(m.group(2))) for _ in range(int(m.group(1)))]
        return f"{caller} rolled {args.strip()}: {' + '.join(map(str, dice))} = {sum(dice)}"

    @server.command("echo", usage="echo <text>", help="say it back")
    def echo(caller: str, args: str) -> str:
        return args or "(nothing to echo)"
