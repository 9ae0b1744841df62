"""The benchmark suite cannot rot: a tiny run of every scenario, each verified exactly-once
by the load generator, must complete and report every figure."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO

SCENARIOS = [
    "relay limit",
    "file: 1 GB to one user |",
    "file: 1 GB to one user over TLS",
    "file: 100 MB to a group of 5",
    "file: 256 MB of text, our Client to our Client (checked), plain body",
    "file: 256 MB of text, our Client to our Client (checked), zstd body",
    "costs on one core: BLAKE3 and zstd",
    "private, 50 pairs, closed loop |",
    "private, 50 pairs, closed loop, through a pass-through message hook",
    "private, 50 pairs, pipelined (window 64), --history off |",
    "private, 50 pairs, pipelined (window 64), --history off, through a pass-through",
    "private, 50 pairs, pipelined (window 64), over TLS",
    "private, 50 pairs, pipelined (window 64), history on",
    "inbox: 100,000 messages",
    "logins: 50,000 private msgs/s offered",
    "broadcast, 50 users, 5 senders, closed loop",
    "broadcast, 1000 users, 5 senders, pipelined",
    "storm:",
    "connect: 9,500 idle users",
    "connect: 5,000 idle TLS users",
    "TLS handshakes per second",
    "churn:",
    "Python bot, relaychat.Client",
    "Python bot, relaychat.AsyncClient",
]


@pytest.mark.timeout(900)  # the first run builds the load generator
def test_every_benchmark_scenario_runs_in_miniature(tmp_path):
    report = tmp_path / "BENCHMARKS.md"
    run = subprocess.run(
        [sys.executable, "bench/run.py", "--smoke", "--out", str(report)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=850,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [line for line in report.read_text().splitlines() if line.startswith("| ")]
    for name in SCENARIOS:
        matching = [row for row in rows if row.startswith(f"| {name}")]
        assert len(matching) == 1, f"{name}: {matching}"
    assert "still chatting: yes" in report.read_text()
