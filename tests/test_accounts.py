"""Accounts: `register`, logging in with a password (netcat-style, the lab's way, and through
the Python API), `passwd`, lockouts, the operator's policies and `relaychat-server accounts`,
the file connection's proof, and what survives a restart."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from relaychat import (
    AccountBook,
    PasswordRequiredError,
    RefusedError,
    RelaychatError,
    Server,
    Welcome,
)

from tests.conftest import (
    FILE_GREETING,
    HOST,
    PASSWORD,
    REPO,
    TIMEOUT,
    Net,
    Wire,
    file_arrival,
    log_in,
    log_in_at,
    random_file,
    register,
    start_server,
    stop_server,
)


def test_a_guest_registers_its_name_and_then_needs_its_password(net):
    alice = net.chat("alice")
    alice.send("register short\n")
    alice.expect("ERROR: password is shorter than 8 characters")
    alice.send(f"register {'x' * 129}\n")
    alice.expect("ERROR: password is longer than 128 bytes")
    alice.send("register\n")
    alice.expect("Usage: register <password>")
    alice.send(f"register {PASSWORD}\n")
    alice.expect("Registered alice.")
    alice.send("register another-pass\n")
    alice.expect("ERROR: 'alice' is registered already")
    alice.close()

    wrong = net.wire("chat", "alice")
    wrong.send("alice\n")
    wrong.expect("Password for alice:")
    wrong.send("not-the-password\n")
    assert wrong.expect_closed() == b"ERROR: wrong password\n"

    log_in(net, "alice")


def lab_login(net: Net, name: str) -> tuple[Wire, Wire]:
    """The lab's client starting up as a registered `name`: its name on both sockets at
    once (no newline), up to the password prompt."""
    register(net, name)
    chat = net.wire("chat", name)
    chat.send(name)
    files = net.wire("file", name)
    files.send(name)
    chat.expect(f"Password for {name}:")
    return chat, files


def test_the_labs_client_logs_in_with_a_password_and_keeps_its_file_connection(net):
    # The lab's client waits up to 2 s for the file greeting before its user can type: the
    # password comes later.
    chat, files = lab_login(net, "alice")
    with pytest.raises(TimeoutError):
        files.recv_once(timeout=2)  # the lab's client gives up on the greeting here
    chat.send(PASSWORD)
    chat.expect("Welcome, alice!")

    # The held file connection is alice's now, and no greeting arrives late on it to be
    # taken for a file header: the first thing on it is a real one.
    bob = net.client("bob")
    report = random_file(net.root / "report.txt", 1000)
    bob.send_file("alice", report)
    chat.expect("[FILE] bob sent you file 'report.txt' (1000 bytes). Incoming on file socket.")
    assert files.line() == "bob|report.txt|1000"
    assert files.recv_exact(1000) == report.read_bytes()


def test_a_password_typed_within_the_greeting_window_gets_the_greeting(net):
    chat, files = lab_login(net, "alice")
    chat.send(PASSWORD)
    assert files.recv_once(timeout=2) == FILE_GREETING
    chat.expect("Welcome, alice!")


def test_a_wrong_password_frees_the_held_file_connection_without_a_word(net):
    register(net, "alice")
    chat = net.wire("chat", "alice")
    chat.send("alice\n")
    chat.expect("Password for alice:")
    files = net.wire("file", "alice")
    files.send("alice\n")
    chat.send("guess-one\n")
    assert chat.expect_closed() == b"ERROR: wrong password\n"
    assert files.expect_closed() == b""


def test_passwd_changes_the_password(net):
    register(net, "alice")
    alice = log_in(net, "alice")
    alice.send("passwd wrong-old-pw new-password\n")
    alice.expect("ERROR: wrong password")
    alice.send(f"passwd {PASSWORD} short\n")
    alice.expect("ERROR: password is shorter than 8 characters")
    alice.send(f"passwd {PASSWORD} new-password\n")
    alice.expect("Password changed.")
    alice.close()
    log_in(net, "alice", "new-password")

    guest = net.chat("carol")
    guest.send("passwd a-password b-password\n")
    guest.expect("ERROR: passwd needs an account (register first)")


def test_repeated_failures_lock_a_name_out(limited):
    net = limited(login_attempts=2, login_lockout=60)
    register(net, "alice")
    for guess in ("guess-one", "guess-two"):
        wire = net.wire("chat", "alice")
        wire.send("alice\n")
        wire.expect("Password for alice:")
        wire.send(f"{guess}\n")
        assert wire.expect_closed() == b"ERROR: wrong password\n"
    # Locked: not even asked for the password, the right one included.
    wire = net.wire("chat", "alice")
    wire.send("alice\n")
    closing = wire.expect_closed().decode()
    assert closing.startswith("ERROR: too many attempts, try again in "), closing
    seconds = int(closing.removeprefix("ERROR: too many attempts, try again in ").split()[0])
    assert 1 <= seconds <= 60


def test_the_operator_can_require_accounts_and_close_registration(tmp_path):
    data = tmp_path / "data"
    book = AccountBook(data / "relaychat.db")
    assert book.add("alice", PASSWORD) == "alice"
    del book  # the server needs the database to itself

    with Server(HOST, 0, 0, data, require_account=True, registration=False) as srv:
        net = Net(srv, tmp_path)
        try:
            guest = net.wire("chat", "guest")
            guest.send("bob\n")
            assert guest.expect_closed() == b"ERROR: this server requires an account\n"
            alice = log_in(net, "alice")
            alice.send("register another-pass\n")
            alice.expect("ERROR: registration is closed on this server")
        finally:
            net.close()


def test_a_name_that_looks_like_a_registered_one_is_refused(net):
    register(net, "alice")
    fake = net.wire("chat", "fake")
    fake.send("\u0430lice\n")  # Cyrillic a
    assert fake.expect_closed().decode() == (
        "ERROR: username '\u0430lice' looks too much like 'alice', which is registered\n"
    )
    # A guest of a name unlike any registered one is let in as before.
    net.chat("alicia")


def test_the_python_client_logs_in_registers_and_changes_its_password(net):
    alice = net.client("alice")
    with pytest.raises(ValueError, match="shorter than 8"):
        alice.register("short")
    alice.register(PASSWORD)
    with pytest.raises(RefusedError, match="registered already"):
        alice.register("another-pass")
    alice.passwd(PASSWORD, "new-password")
    with pytest.raises(RefusedError, match="wrong password"):
        alice.passwd(PASSWORD, "other-password")
    alice.close()

    with pytest.raises(PasswordRequiredError):
        net.client("alice")
    with pytest.raises(RefusedError, match="wrong password"):
        net.client("alice", "not-the-password")
    again = net.client("alice", "new-password")
    assert again.extended
    # The file connection was proven with the session's secret: files reach it.
    bob = net.client("bob")
    report = random_file(net.root / "r.bin", 5000)
    bob.send_file("alice", report)
    _, received = file_arrival(again)
    assert received.path.read_bytes() == report.read_bytes()


def test_a_file_connection_with_a_wrong_proof_is_refused(net):
    register(net, "alice")
    net.client("alice", PASSWORD)  # holds the file slot; a stranger tries another proof
    stranger = net.wire("file", "alice")
    stranger.send("alice 00000000000000000000000000000000\n")
    assert stranger.expect_closed() == (
        b"ERROR: the file connection's proof does not match a chat session of 'alice'\n"
    )
    # Without a proof, the same address is not enough for a session that was given one.
    bare = net.wire("file", "alice")
    bare.send("alice\n")
    assert bare.expect_closed() == (
        b"ERROR: 'alice' must open its file connection with its session's proof\n"
    )


def test_accounts_survive_a_restart(tmp_path):
    data = tmp_path / "data"
    with Server(HOST, 0, 0, data) as srv:
        net = Net(srv, tmp_path)
        register(net, "alice")
        net.close()
    with Server(HOST, 0, 0, data) as srv:
        net = Net(srv, tmp_path)
        try:
            with pytest.raises(PasswordRequiredError):
                net.client("alice")
            assert net.client("alice", PASSWORD).username == "alice"
        finally:
            net.close()


def accounts(data, *args, password=None):
    return subprocess.run(
        [sys.executable, str(REPO / "server.py"), "accounts", *args, "--data-dir", str(data)],
        input=None if password is None else password + "\n",
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL if password is None else None,
    )


def test_the_accounts_command_manages_accounts_offline(tmp_path):
    data = tmp_path / "data"
    added = accounts(data, "add", "alice", password=PASSWORD)
    assert (added.returncode, added.stdout) == (0, "Registered alice.\n"), added.stderr
    bad = accounts(data, "add", "bob", password="short")
    assert bad.returncode == 1 and "shorter than 8" in bad.stderr
    twice = accounts(data, "add", "alice", password=PASSWORD)
    assert twice.returncode == 1 and "registered already" in twice.stderr
    accounts(data, "add", "bob", password=PASSWORD)
    listed = accounts(data, "list")
    assert [line.split("\t")[0] for line in listed.stdout.splitlines()] == ["alice", "bob"]
    changed = accounts(data, "passwd", "alice", password="new-password")
    assert (changed.returncode, changed.stdout) == (0, "Password changed.\n")
    removed = accounts(data, "remove", "bob")
    assert (removed.returncode, removed.stdout) == (0, "Removed bob.\n")
    assert accounts(data, "remove", "bob").returncode == 1

    proc, ports, _ = start_server(tmp_path)
    try:
        busy = accounts(data, "list")
        assert busy.returncode == 1 and "in use" in busy.stderr, busy.stderr
        wire = log_in_at(ports["CHAT"], "alice", "new-password")
        wire.close()
        bob = Wire(ports["CHAT"], "bob")
        bob.send("bob\n")
        bob.expect("Welcome, bob!")  # removed: a guest name again
        bob.close()
    finally:
        assert stop_server(proc) == 0


def test_no_password_reaches_the_log(tmp_path):
    proc, ports, out = start_server(tmp_path, "--log-level", "debug")
    try:
        wire = Wire(ports["CHAT"], "alice")
        wire.send("alice\n")
        wire.expect("Welcome, alice!")
        wire.send("register first-secret-pw\n")
        wire.expect("Registered alice.")
        wire.send("passwd first-secret-pw second-secret-pw\n")
        wire.expect("Password changed.")
        wire.close()
        again = Wire(ports["CHAT"], "alice")
        again.send("alice\n")
        again.expect("Password for alice:")
        again.send("wrong-secret-pw\n")
        assert again.expect_closed() == b"ERROR: wrong password\n"
        again.close()
    finally:
        assert stop_server(proc) == 0
    log = "\n".join(out)
    assert "register" in log and "[LOGIN FAILED]" in log, log
    for secret in ("first-secret-pw", "second-secret-pw", "wrong-secret-pw"):
        assert secret not in log


def test_the_cli_client_asks_for_the_password(net, tmp_path):
    register(net, "alice")
    args = [
        sys.executable,
        str(REPO / "client.py"),
        "--chat-port",
        str(net.server.chat_port),
        "--file-port",
        str(net.server.file_port),
        "--username",
        "alice",
        "--download-dir",
        str(tmp_path / "dl"),
    ]
    # Piped: the server's prompt is shown and the next input line is the password.
    piped = subprocess.run(
        args, input=f"{PASSWORD}\nlist\n", capture_output=True, text=True, timeout=30
    )
    assert piped.stdout.splitlines()[:3] == [
        "Password for alice:",
        "Welcome, alice!",
        "Connected users: ",
    ], piped.stdout
    # From the environment, and from a file: no prompt.
    env = {**os.environ, "RELAYCHAT_PASSWORD": PASSWORD}
    from_env = subprocess.run(
        args, input="list\n", capture_output=True, text=True, timeout=30, env=env
    )
    assert from_env.stdout.splitlines()[0] == "Welcome, alice!", from_env.stdout
    secret = tmp_path / "pw"
    secret.write_text(PASSWORD + "\n")
    from_file = subprocess.run(
        [*args, "--password-file", str(secret)],
        input="list\n",
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert from_file.stdout.splitlines()[0] == "Welcome, alice!", from_file.stdout
    wrong = subprocess.run(
        args, input="wrong-password\n", capture_output=True, text=True, timeout=30
    )
    assert wrong.returncode == 1
    assert wrong.stdout.splitlines()[-1] == "ERROR: wrong password"


def test_an_async_client_logs_in_with_a_password(net):
    import asyncio

    from relaychat import AsyncClient

    register(net, "alice")

    async def main() -> None:
        client = await AsyncClient.connect(
            HOST,
            net.server.chat_port,
            net.server.file_port,
            username="alice",
            download_dir=net.downloads("alice"),
            timeout=TIMEOUT,
            password=PASSWORD,
        )
        async with client:
            assert isinstance(await client.next_event(timeout=TIMEOUT), Welcome)
            await client.passwd(PASSWORD, "new-password")
        with pytest.raises(RelaychatError):
            await AsyncClient.connect(
                HOST, net.server.chat_port, net.server.file_port, username="alice"
            )

    asyncio.run(main())
