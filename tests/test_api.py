"""The Python API: `Client`, `AsyncClient`, typed events and `Server`."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
import relaychat
from relaychat import (
    Ack,
    AsyncClient,
    BroadcastMessage,
    Client,
    Disconnected,
    FileIncoming,
    FileReceived,
    GroupMessage,
    Joined,
    NotInGroup,
    PrivateMessage,
    RefusedError,
    Server,
    ServerError,
    UnknownCommand,
    Usage,
    UserList,
    UserNotFound,
    Welcome,
)

from tests.conftest import (
    HOST,
    TIMEOUT,
    Wire,
    drain,
    file_arrival,
    next_of,
    random_file,
    saved,
    wait_until,
)

# --- Client ------------------------------------------------------------------------------


def test_the_first_event_is_welcome(server, tmp_path):
    with Client(
        HOST, server.chat_port, server.file_port, username="alice", download_dir=tmp_path
    ) as alice:
        welcome = alice.next_event(timeout=TIMEOUT)
        assert isinstance(welcome, Welcome)
        assert (welcome.user, welcome.line, str(welcome)) == (
            "alice",
            "Welcome, alice!",
            "Welcome, alice!",
        )
        assert alice.username == "alice"
        assert not alice.closed
    assert alice.closed


def test_a_conversation_through_the_sync_client(net):
    alice, bob, carol = net.client("alice"), net.client("bob"), net.client("carol")

    # list_users: the others, in order of arrival; the reply is not also an event.
    assert alice.list_users() == ["bob", "carol"]
    assert carol.list_users() == ["alice", "bob"]

    alice.msg("bob", "hi  there")
    pm = next_of(bob, PrivateMessage)
    assert (pm.sender, pm.text, pm.line) == (
        "alice",
        "hi  there",
        "[PRIVATE from alice]: hi  there",
    )

    alice.broadcast("hello all")
    for other in (bob, carol):
        bm = next_of(other, BroadcastMessage)
        assert (bm.sender, bm.text, bm.line) == (
            "alice",
            "hello all",
            "[BROADCAST from alice]: hello all",
        )

    # join waits for the confirmation, which is not also an event.
    assert alice.join("devs") is None
    bob.join("devs")
    alice.send_group("devs", "Standup at 10 AM.")
    gm = next_of(bob, GroupMessage)
    assert (gm.group, gm.sender, gm.text, gm.line) == (
        "devs",
        "alice",
        "Standup at 10 AM.",
        "[GROUP devs] alice: Standup at 10 AM.",
    )
    carol.send_group("devs", "me too")
    nig = next_of(carol, NotInGroup)
    assert (nig.group, nig.line) == ("devs", "You are not in group 'devs'")

    alice.msg("ghost", "anyone?")
    unf = next_of(alice, UserNotFound)
    assert (unf.user, unf.line) == ("ghost", "User ghost not found.")

    # Raw command lines: their replies are events.
    alice.send_command("broadcast")
    usage = next_of(alice, Usage)
    assert usage.text == usage.line == "Usage: broadcast <message>"
    alice.send_command("dance")
    assert next_of(alice, UnknownCommand).line == (
        "Unknown command. Use msg/broadcast/list/join/send_group"
    )
    alice.send_command("list")
    ul = next_of(alice, UserList)
    assert (ul.users, ul.line) == (["bob", "carol"], "Connected users: bob, carol")
    alice.send_command("join ops")
    joined = next_of(alice, Joined)
    assert (joined.group, joined.line) == ("ops", "You joined group 'ops'")
    # Only a file that was forwarded to alice can be acknowledged.
    alice.send_command("FILE_RECEIVED|bob|notes.txt")
    refused = next_of(alice, ServerError)
    assert refused.reason == "no file 'notes.txt' from bob is waiting for your acknowledgement"
    alice.send_command("FILE_RECEIVED|bob")
    err = next_of(alice, ServerError)
    assert err.reason.startswith("malformed acknowledgement")
    assert err.line == f"ERROR: {err.reason}"

    for user, via in ((alice, bob), (bob, alice), (carol, alice)):
        assert drain(user, via) == [], user.username


def test_events_are_frozen_and_matchable(net):
    alice, bob = net.client("alice"), net.client("bob")
    alice.msg("bob", "x")
    event = next_of(bob, PrivateMessage)
    with pytest.raises(AttributeError):
        event.text = "changed"
    assert PrivateMessage.__match_args__ == ("sender", "text", "queued_at")
    assert GroupMessage.__match_args__ == ("group", "sender", "text", "queued_at")
    assert FileReceived.__match_args__ == ("sender", "filename", "path", "size")
    assert repr(event) == 'PrivateMessage(sender="alice", text="x", queued_at=None)'


def test_events_iterator_stops_when_quiet(net):
    alice, bob = net.client("alice"), net.client("bob")
    for i in range(3):
        alice.msg("bob", f"m{i}")
    alice.list_users()  # every msg above is queued for bob now
    started = time.monotonic()
    got = [e.text for e in bob.events(timeout=0.5)]
    assert got == ["m0", "m1", "m2"]
    assert time.monotonic() - started < 3
    assert bob.next_event(timeout=0.05) is None


def test_send_file_returns_the_size_and_the_recipient_gets_typed_events(net):
    alice, bob = net.client("alice"), net.client("bob")
    notes = random_file(net.root / "my notes.txt", 5000)
    assert alice.send_file("bob", notes) == 5000
    incoming, received = file_arrival(bob)
    assert isinstance(incoming, FileIncoming)
    assert (incoming.sender, incoming.filename, incoming.size) == ("alice", "my notes.txt", 5000)
    assert received.path == net.downloads("bob") / "received_from_alice_my notes.txt"
    assert received.line == f"[FILE RECEIVED] {received.path} (5000 bytes) from alice"
    assert received.path.read_bytes() == notes.read_bytes()
    assert next_of(alice, Ack).filename == "my notes.txt"


def test_send_file_to_a_group_accepts_the_group_prefix_and_an_empty_file(net):
    alice, bob = net.client("alice"), net.client("bob")
    alice.join("team")
    bob.join("team")
    empty = net.root / "empty.txt"
    empty.write_bytes(b"")
    assert alice.send_file("GROUP:team", str(empty)) == 0
    got = {type(e).__name__: e for e in (bob.next_event(TIMEOUT), bob.next_event(TIMEOUT))}
    assert got["GroupFileIncoming"].group == "team"
    assert got["FileReceived"].size == 0
    assert got["FileReceived"].path.read_bytes() == b""
    assert next_of(alice, Ack).recipient == "bob"


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.msg("bob", "two\nlines"),
        lambda c: c.msg("bob", "carriage\rreturn"),
        lambda c: c.msg("bob", ""),
        lambda c: c.msg("b o b", "spaces in the name"),
        lambda c: c.broadcast("a\nb"),
        lambda c: c.send_group("devs", "a\nb"),
        lambda c: c.send_group("dev team", "bad group"),
        lambda c: c.send_command("list\nlist"),
        lambda c: c.join("a|b"),
        lambda c: c.send_file("a b", __file__),
    ],
    ids=[
        "newline-in-message",
        "cr-in-message",
        "empty-message",
        "bad-recipient",
        "newline-in-broadcast",
        "newline-in-group-message",
        "bad-group",
        "two-commands",
        "bad-group-to-join",
        "bad-file-target",
    ],
)
def test_arguments_the_protocol_cannot_carry_raise_value_error(net, call):
    alice = net.client("alice")
    bob = net.client("bob")
    with pytest.raises(ValueError):
        call(alice)
    # Nothing was sent: the session is fine and bob got nothing.
    assert drain(bob, alice) == []
    assert drain(alice, bob) == []


def test_send_file_of_a_missing_path_raises(net, tmp_path):
    alice = net.client("alice")
    with pytest.raises(ValueError, match="File does not exist"):
        alice.send_file("alice", tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="File does not exist"):
        alice.send_file("alice", tmp_path)  # a directory is no file either


@pytest.mark.parametrize("name", ["a b", "", "x" * 33, "a|b", "GROUP:x"])
def test_an_invalid_username_raises_value_error(server, tmp_path, name):
    with pytest.raises(ValueError):
        Client(HOST, server.chat_port, server.file_port, username=name, download_dir=tmp_path)


def test_a_duplicate_username_raises_refused_error(net, server, tmp_path):
    alice = net.client("alice")
    with pytest.raises(RefusedError, match="username 'alice' is already connected"):
        Client(HOST, server.chat_port, server.file_port, username="alice", download_dir=tmp_path)
    assert isinstance(RefusedError("x"), relaychat.RelaychatError)
    assert alice.list_users() == []


def test_connecting_to_a_closed_port_raises_os_error(tmp_path):
    with socket.socket() as s:
        s.bind((HOST, 0))
        port = s.getsockname()[1]
    with pytest.raises(OSError):
        Client(HOST, port, port, username="alice", download_dir=tmp_path, timeout=2)


def test_when_the_server_stops_clients_get_disconnected(server, net):
    alice = net.client("alice")
    bob = net.client("bob")
    server.stop()
    events = list(alice.events(timeout=TIMEOUT))
    assert len(events) == 1 and isinstance(events[-1], Disconnected)
    assert events[-1].line == "Chat connection closed."
    assert alice.closed
    with pytest.raises(ConnectionError):
        alice.msg("bob", "hello?")
    with pytest.raises(ConnectionError):
        alice.list_users()
    # The stream has ended: no wait, no more events.
    started = time.monotonic()
    assert alice.next_event(timeout=2) is None
    assert list(alice.events(timeout=2)) == []
    assert time.monotonic() - started < 1
    assert isinstance(next_of(bob, Disconnected), Disconnected)


def test_closing_a_client_lets_the_others_see_it_leave(net):
    bob = net.client("bob")
    with net.client("alice") as alice:
        assert bob.list_users() == ["alice"]
    assert alice.closed
    with pytest.raises(ConnectionError):
        alice.msg("bob", "still there?")
    wait_until(lambda: bob.list_users() == [], what="alice leaves")
    bob.msg("alice", "gone?")
    assert next_of(bob, UserNotFound).user == "alice"
    alice.close()  # closing twice is harmless


# --- AsyncClient -------------------------------------------------------------------------


def test_the_async_client(server, tmp_path):
    report = random_file(tmp_path / "report.pdf", 100_000)

    async def scenario() -> None:
        def connect(name: str):
            return AsyncClient.connect(
                HOST,
                server.chat_port,
                server.file_port,
                username=name,
                download_dir=tmp_path / name,
                timeout=TIMEOUT,
            )

        async with await connect("alice") as alice, await connect("bob") as bob:
            assert isinstance(await alice.next_event(timeout=TIMEOUT), Welcome)
            assert isinstance(await bob.next_event(timeout=TIMEOUT), Welcome)
            assert alice.username == "alice" and not alice.closed

            assert await alice.list_users() == ["bob"]
            await alice.join("devs")
            await bob.join("devs")
            await alice.msg("bob", "hi bob")
            await alice.send_group("devs", "standup")
            await alice.broadcast("all")
            await alice.send_command("dance")
            assert await alice.send_file("bob", report) == 100_000

            got = []
            async for event in bob.events(timeout=TIMEOUT):
                got.append(event)
                if len(got) == 5:
                    break
            kinds = [type(e).__name__ for e in got]
            assert kinds[:3] == ["PrivateMessage", "GroupMessage", "BroadcastMessage"]
            assert sorted(kinds[3:]) == ["FileIncoming", "FileReceived"]
            assert got[0].line == "[PRIVATE from alice]: hi bob"
            received = next(e for e in got if isinstance(e, FileReceived))
            assert received.path.read_bytes() == report.read_bytes()

            assert isinstance(await alice.next_event(timeout=TIMEOUT), UnknownCommand)
            ack = await alice.next_event(timeout=TIMEOUT)
            assert isinstance(ack, Ack) and ack.line == "[ACK] bob received file 'report.pdf'"
            # Nothing else is pending: the iterator stops at its timeout.
            assert [e async for e in alice.events(timeout=0.3)] == []

            with pytest.raises(ValueError):
                await alice.msg("bob", "two\nlines")
        assert alice.closed and bob.closed

    asyncio.run(asyncio.wait_for(scenario(), timeout=30))


def test_the_async_client_sees_the_server_stop(server, tmp_path):
    async def scenario() -> None:
        alice = await AsyncClient.connect(
            HOST, server.chat_port, server.file_port, username="alice", download_dir=tmp_path
        )
        try:
            assert isinstance(await alice.next_event(timeout=TIMEOUT), Welcome)
            server.stop()
            events = [e async for e in alice.events(timeout=TIMEOUT)]
            assert [type(e) for e in events] == [Disconnected]
            assert alice.closed
            with pytest.raises(ConnectionError):
                await alice.broadcast("anyone?")
        finally:
            await alice.close()

    asyncio.run(asyncio.wait_for(scenario(), timeout=30))


def test_the_async_client_is_refused_a_duplicate_name(net, server, tmp_path):
    net.client("alice")

    async def scenario() -> None:
        with pytest.raises(RefusedError):
            await AsyncClient.connect(
                HOST, server.chat_port, server.file_port, username="alice", download_dir=tmp_path
            )

    asyncio.run(asyncio.wait_for(scenario(), timeout=30))


# --- Server -------------------------------------------------------------------------------


def refused(port: int) -> bool:
    try:
        socket.create_connection((HOST, port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def test_the_server_as_a_context_manager_and_stop_refuses_connections(tmp_path):
    data = tmp_path / "nested" / "data"
    srv = Server(HOST, 0, 0, data)
    assert not srv.is_running
    assert (srv.chat_port, srv.file_port) == (0, 0)
    with srv as running:
        assert running is srv
        assert srv.is_running
        assert srv.chat_port != 0 and srv.file_port != 0 and srv.chat_port != srv.file_port
        assert srv.data_dir == data and data.is_dir()
        srv.start()  # idempotent
        chat_port, file_port = srv.chat_port, srv.file_port
        with Wire(chat_port) as alice:
            alice.send("alice\n")
            alice.expect("Welcome, alice!")
            stayed = Wire(file_port)
            stayed.send("alice\n")
            assert stayed.recv_exact(22, TIMEOUT) == b"FILE_SOCKET_CONNECTED\n"
            srv.stop()
            assert not srv.is_running
            # stop() closed every connection and both listeners.
            assert alice.expect_closed() == b""
            assert stayed.expect_closed() == b""
            stayed.close()
    assert refused(chat_port)
    assert refused(file_port)
    srv.stop()  # stopping twice is harmless


def test_stopping_the_server_aborts_an_upload_and_removes_its_partial_files(server, net, data_dir):
    bob = net.client("bob")
    net.chat("mallory")
    mallory = net.file("mallory")
    mallory.send(b"mallory|bob|big.bin|1000000\n" + b"x" * 300_000)
    assert next_of(bob, FileIncoming).size == 1_000_000
    wait_until(lambda: list(data_dir.glob(".relaychat-upload-*.part")), what="the spool file")
    server.stop()
    assert mallory.expect_closed() == b""
    assert saved(data_dir) == []
    wait_until(
        lambda: not list(net.downloads("bob").iterdir()), what="bob's client removes its .tmp"
    )


def test_a_busy_port_raises_os_error(tmp_path):
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        srv = Server(HOST, taken.getsockname()[1], 0, tmp_path)
        with pytest.raises(OSError):
            srv.start()
        assert not srv.is_running


def test_serve_forever_returns_when_stopped_from_another_thread(tmp_path):
    import threading

    srv = Server(HOST, 0, 0, tmp_path)
    srv.start()
    done = threading.Event()

    def serve() -> None:
        srv.serve_forever()
        done.set()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    with Wire(srv.chat_port) as alice:
        alice.send("alice\n")
        alice.expect("Welcome, alice!")
    srv.stop()
    assert done.wait(TIMEOUT)
    thread.join(TIMEOUT)


def test_each_reply_goes_to_its_own_command(net):
    """A raw `list`/`join` and the API's `list_users()`/`join()` interleave: each caller
    gets the reply to its own command, and raw commands' replies arrive as events."""
    alice = net.client("alice")
    net.client("bob")
    alice.send_command("list")
    alice.send_command("join raw")
    assert alice.list_users() == ["bob"]
    alice.join("api")
    alice.send_command("list")
    first, second, third = (alice.next_event(timeout=TIMEOUT) for _ in range(3))
    assert isinstance(first, UserList) and first.users == ["bob"]
    assert isinstance(second, Joined) and second.group == "raw"
    assert isinstance(third, UserList)
    assert alice.next_event(timeout=0.2) is None


def test_joining_a_group_spelled_in_another_normal_form_returns(net):
    alice = net.client("alice")
    alice.join("caf\u0065\u0301")  # e + combining acute: the server answers in NFC
    bob = net.client("bob")
    bob.join("caf\u00e9")
    alice.send_group("caf\u00e9", "hi")
    assert next_of(bob, GroupMessage).group == "caf\u00e9"
