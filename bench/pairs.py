"""Interleaved A/B pairs of one scenario of bench/run.py, for changes too small to see in
one full run on a noisy machine: each pair runs build A, then build B, of the compiled
engine (`_native.abi3.so` files), or of `python/relaychat/server.py`.

    python bench/pairs.py A.so B.so --pairs 4
    python bench/pairs.py old_server.py new_server.py --pairs 4 --no-hook

The scenario is `--history off`, 50 pairs of users pipelining private messages (window 64,
2,000,000 messages), through the pass-through message hook unless `--no-hook`; it prints
msgs/s per run. The installed file is put back afterwards.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

import run

PACKAGE = run.REPO / "python" / "relaychat"


def one(hook: bool) -> int:
    flags = ["--history", "off"] + (["--plugin", run.PASSTHROUGH] if hook else [])
    with tempfile.TemporaryDirectory() as d:
        server = run.ServerProc(Path(d), *flags)
        try:
            args = ["--pairs", "50", "--messages", "40000", "--window", "64"]
            result = run.run_generator(server, "private", *args)
        finally:
            server.stop()
    return int(result["msgs_per_s"])


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
    p.add_argument("--no-hook", action="store_true", help="without the pass-through hook")
    args = p.parse_args()
    target = PACKAGE / ("server.py" if args.a.suffix == ".py" else "_native.abi3.so")
    with tempfile.TemporaryDirectory() as d:
        kept = Path(d) / target.name
        shutil.copy2(target, kept)
        try:
            for _ in range(args.pairs):
                for name, build in (("A", args.a), ("B", args.b)):
                    put(build, target)
                    print(name, one(not args.no_hook), flush=True)
        finally:
            put(kept, target)


if __name__ == "__main__":
    main()
