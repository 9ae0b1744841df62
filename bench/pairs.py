"""Interleaved A/B pairs of one scenario of bench/run.py, for changes too small to see in
one full run on a noisy machine: each pair runs build A, then build B, of the compiled
engine (`_native.abi3.so` files), or of `python/relaychat/server.py`.

    python bench/pairs.py A.so B.so --pairs 4
    python bench/pairs.py old_server.py new_server.py --pairs 4 --scenario history

The scenarios are the table's pipelined ones (`run.history_cost`: 50 pairs of registered
users, 2,000,000 private messages, window 64): `hook` (`--history off`, through the
pass-through message hook), `plain` (`--history off`) and `history` (history on). It prints
msgs/s per run, and puts the installed file back afterwards.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

import run

PACKAGE = run.REPO / "python" / "relaychat"


#: Each scenario's `run.history_cost` arguments: history kept, server flags.
SCENARIOS = {
    "hook": (False, ("--plugin", run.PASSTHROUGH)),
    "plain": (False, ()),
    "history": (True, ()),
}


def one(scenario: str) -> int:
    history, flags = SCENARIOS[scenario]
    with tempfile.TemporaryDirectory() as d:
        return run.history_cost(history, 40000, Path(d), flags=flags)["msgs/s"]


def put(source: Path, target: Path) -> None:
    """Puts `source` in `target`'s place by a rename: a process that has the old file
    mapped (this one may, through `run`) keeps its copy intact."""
    swap = target.with_name(target.name + ".swap")
    shutil.copy2(source, swap)
    os.replace(swap, target)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a", type=Path, help="build A: a _native*.so or a server.py")
    p.add_argument("b", type=Path, help="build B, of the same kind")
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--scenario", choices=SCENARIOS, default="hook")
    args = p.parse_args()
    target = PACKAGE / ("server.py" if args.a.suffix == ".py" else "_native.abi3.so")
    with tempfile.TemporaryDirectory() as d:
        kept = Path(d) / target.name
        shutil.copy2(target, kept)
        try:
            for _ in range(args.pairs):
                for name, build in (("A", args.a), ("B", args.b)):
                    put(build, target)
                    print(name, one(args.scenario), flush=True)
        finally:
            put(kept, target)


if __name__ == "__main__":
    main()
