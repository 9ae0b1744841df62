"""Settings: one table in the engine (`relaychat.SETTINGS`) feeds `Server(...)`'s keywords,
the `relaychat-server` flags and their `--help`, and must match the stubs and the limits
table of docs/SECURITY.md."""

from __future__ import annotations

import ast
import re
import subprocess
import sys

import pytest
from relaychat import SETTINGS, Server

from tests.conftest import REPO

GIB, MIB = 1 << 30, 1 << 20


def shown(unit: str, value: float) -> str:
    """A default as docs/SECURITY.md writes it."""
    if unit == "seconds":
        return f"{value:g} s" if value >= 1 else f"{value * 1000:g} ms"
    if unit == "bytes" and value >= GIB and value % GIB == 0:
        return f"{value // GIB} GiB"
    if unit == "bytes" and value >= MIB and value % MIB == 0:
        return f"{value // MIB} MiB"
    if unit == "bytes":
        return f"{value} B"
    return str(value)


def test_every_setting_is_a_server_keyword_and_reads_back():
    srv = Server("127.0.0.1", 0, 0, "x", **{name: default for name, _, default, _ in SETTINGS})
    assert srv.limits == {name: default for name, _, default, _ in SETTINGS}
    srv = Server("127.0.0.1", 0, 0, "x", max_file_size=123, send_timeout=1.5, idle_pause=None)
    assert srv.limits["max_file_size"] == 123
    assert srv.limits["send_timeout"] == 1.5
    assert srv.limits["idle_pause"] == dict((n, d) for n, _, d, _ in SETTINGS)["idle_pause"]


def test_values_below_a_minimum_are_raised_and_bad_ones_refused():
    srv = Server("127.0.0.1", 0, 0, "x", max_header=1, send_queue=0)
    assert srv.limits["max_header"] == 64
    assert srv.limits["send_queue"] == 1
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_lines'"):
        Server(max_lines=5)
    with pytest.raises(ValueError, match="may not be negative"):
        Server(max_file_size=-1)
    with pytest.raises(ValueError, match="max_file_size"):
        Server(max_file_size=1.5)
    with pytest.raises(TypeError, match="must be a number"):
        Server(max_line="64")
    with pytest.raises(TypeError, match="must be a number"):
        Server(max_line=True)


def test_the_stubs_list_every_setting_as_a_keyword():
    tree = ast.parse((REPO / "python" / "relaychat" / "_native.pyi").read_text())
    server = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Server")
    new = next(n for n in server.body if isinstance(n, ast.FunctionDef) and n.name == "__new__")
    policy = (
        "db",
        "require_account",
        "registration",
        "history",
        "tls_cert",
        "tls_key",
        "tls_self_signed",
        "require_tls",
        "allow_plaintext_login",
        "metrics_port",
    )
    limits = [a.arg for a in new.args.kwonlyargs if a.arg not in policy]
    assert limits == [name for name, *_ in SETTINGS]


def test_the_security_doc_shows_every_setting_with_its_default():
    text = (REPO / "docs" / "SECURITY.md").read_text()
    rows = {}
    for line in text.splitlines():
        m = re.match(r"\| `(\w+)`: [^|]*\| ([^|]+) \|", line)
        if m:
            rows[m.group(1)] = m.group(2).strip()
    for name, unit, default, _ in SETTINGS:
        assert name in rows, f"docs/SECURITY.md has no row for {name}"
        assert rows[name] == shown(unit, default), name


def test_the_server_flags_come_from_the_table_with_their_defaults():
    out = subprocess.run(
        [sys.executable, str(REPO / "server.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    flat = " ".join(out.split())
    for name, unit, default, text in SETTINGS:
        assert "--" + name.replace("_", "-") in flat
        assert f"{text} ({unit}; default {default})" in flat, name


def test_a_bad_flag_value_is_a_clear_error():
    proc = subprocess.run(
        [sys.executable, str(REPO / "server.py"), "--max-file-size", "-5"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert "max_file_size may not be negative" in proc.stderr
