"""A server Python extends: hooks before messages, logins and uploads (allow, deny,
rewrite), observers, custom commands with rate limits and `help`, the control API
(users, groups, send, kick), plugins and their errors, hooks that raise or run too long
(the others keep chatting), async hooks, and the examples/ plugins. Over real sockets.
"""

from __future__ import annotations

import asyncio
import json
import queue
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from relaychat import FileReceived, Login, Message, Refuse, RefusedError, Server, Upload

from tests.conftest import HOST, REPO, TIMEOUT, Net, random_file, take, wait_until

EXAMPLES = REPO / "examples"


@pytest.fixture
def hooked(tmp_path: Path) -> Iterator[Callable[..., tuple[Server, Net]]]:
    """`make(setup)`: a server whose hooks `setup(server)` registers, started, with a
    `Net` to it."""
    made: list[tuple[Server, Net]] = []

    def make(setup: Callable[[Server], None], **options) -> tuple[Server, Net]:
        srv = Server(HOST, 0, 0, tmp_path / "data", **options)
        setup(srv)
        srv.start()
        net = Net(srv, tmp_path)
        made.append((srv, net))
        return srv, net

    yield make
    for srv, net in made:
        net.close()
        srv.stop()


def test_a_message_hook_allows_denies_and_rewrites_every_kind(hooked):
    seen: list[Message] = []

    def setup(srv: Server) -> None:
        @srv.before_message
        def hook(msg: Message):
            seen.append(msg)
            if "forbidden" in msg.text:
                raise Refuse("that word is not allowed here")
            if msg.text == "quiet":
                return False
            if msg.text == "inject":
                raise Refuse("no\n[PRIVATE from root]: fake")
            return msg.text.replace("darn", "d**n")

    _, net = hooked(setup)
    alice, bob = net.chat("alice"), net.chat("bob")
    for w in (alice, bob):
        w.send("join team\n")
        w.expect("You joined group 'team'")
    alice.send("msg bob hello\n")
    bob.expect("[PRIVATE from alice]: hello")
    alice.send("msg bob darn it\n")
    bob.expect("[PRIVATE from alice]: d**n it")
    alice.send("send_group team darn again\n")
    bob.expect("[GROUP team] alice: d**n again")
    alice.send("broadcast a forbidden word\n")
    alice.expect("ERROR: that word is not allowed here")
    alice.send("msg bob quiet\n")
    alice.expect("ERROR: refused by the server")
    # A plugin's text never makes a line of its own.
    alice.send("msg bob inject\n")
    alice.expect("ERROR: no [PRIVATE from root]: fake")
    bob.assert_silent()
    kinds = [(m.kind, m.to) for m in seen]
    assert kinds[:4] == [
        ("private", "bob"),
        ("private", "bob"),
        ("group", "team"),
        ("broadcast", ""),
    ]
    assert seen[0].sender == "alice"


def test_chained_hooks_see_each_others_rewrites_and_the_first_refusal_wins(hooked):
    def setup(srv: Server) -> None:
        @srv.before_message(priority=3)
        def shout(msg: Message) -> str:
            return msg.text.upper()

        @srv.before_message(priority=2, fail="open")
        def broken_but_open(msg: Message):
            if "BUG" in msg.text:
                raise KeyError("bug")

        @srv.before_message(priority=1)
        def no_secrets(msg: Message):
            if "SECRET" in msg.text:
                return False
            return msg.text + "!" if msg.text == "HI" else None

    _, net = hooked(setup)
    alice, bob = net.chat("alice"), net.chat("bob")
    alice.send("msg bob hi\n")
    bob.expect("[PRIVATE from alice]: HI!")
    # A hook that fails open keeps what the hooks before it made of the text.
    alice.send("msg bob a bug\n")
    bob.expect("[PRIVATE from alice]: A BUG")
    alice.send("msg bob a secret\n")
    alice.expect("ERROR: refused by the server")
    bob.assert_silent()


def test_login_and_upload_hooks_refuse_with_the_reason(hooked, tmp_path):
    def setup(srv: Server) -> None:
        @srv.before_login
        def only_friends(login: Login):
            assert type(login) is Login and len(login) == len(Login._fields)
            assert login.address == "127.0.0.1" and login.registered is False
            return login.name != "mallory"

        @srv.before_upload
        def no_exe(upload: Upload):
            # Every field, in its place (events are made from the engine's tuples as they
            # are).
            assert type(upload) is Upload and len(upload) == len(Upload._fields)
            assert (upload.target, upload.size) == ("bob", 100)
            if upload.filename.endswith(".exe"):
                raise Refuse(f"{upload.sender} may not send programs")

    _, net = hooked(setup)
    wire = net.wire("chat", "mallory")
    wire.send("mallory\n")
    wire.expect("ERROR: refused by the server")
    wire.expect_closed()
    alice = net.client("alice")
    net.client("bob")
    with pytest.raises(RefusedError, match="alice may not send programs"):
        alice.send_file("bob", random_file(tmp_path / "tool.exe", 100))
    assert alice.send_file("bob", random_file(tmp_path / "notes.txt", 100)) == 100


def test_observers_hear_every_kind_of_event_in_order(hooked, tmp_path):
    events: queue.Queue = queue.Queue()

    def setup(srv: Server) -> None:
        for name in ("connect", "join", "message", "file_saved", "file_acknowledged", "leave"):
            srv.on(name, events.put)
        srv.on("disconnect")(events.put)

    _, net = hooked(setup)
    alice = net.client("alice")
    bob = net.client("bob")
    alice.join("team")
    alice.msg("bob", "hi")
    alice.send_file("bob", random_file(tmp_path / "a.bin", 1000))
    # bob's client acknowledges the file once it has it.
    assert any(isinstance(e, FileReceived) for e in take(bob, 3))
    alice.leave("team")
    bob.close()

    def next_event() -> dict:
        return events.get(timeout=TIMEOUT)

    got = [next_event() for _ in range(8)]
    names = [e["event"] for e in got]
    assert names[:4] == ["connect", "connect", "join", "message"], got
    assert set(names[4:]) == {"file_saved", "file_acknowledged", "leave", "disconnect"}, got
    assert got[3] == {
        "event": "message",
        "kind": "private",
        "sender": "alice",
        "to": "bob",
        "text": "hi",
    }
    saved = next(e for e in got if e["event"] == "file_saved")
    assert saved["saved_as"] == "received_from_alice_a.bin" and saved["size"] == "1000"


def test_commands_reply_refuse_are_rate_limited_and_listed_by_help(hooked):
    def setup(srv: Server) -> None:
        @srv.command("roll", usage="roll <dice>", help="roll dice", rate="2/60s")
        def roll(caller: str, args: str) -> list[str]:
            if not args:
                raise Refuse("roll what?")
            return [f"{caller} rolls {args}", "good luck"]

    srv, net = hooked(setup)
    alice = net.chat("alice")
    alice.send("ROLL 2d6\n")  # commands are case-insensitive
    alice.expect("alice rolls 2d6")
    alice.expect("good luck")
    alice.send("roll\n")
    alice.expect("ERROR: roll what?")
    alice.send("roll 1d4\n")
    alice.expect("ERROR: slow down")
    # Another user has a rate of their own.
    bob = net.chat("bob")
    bob.send("roll 1d4\n")
    bob.expect("bob rolls 1d4")
    bob.expect("good luck")
    bob.send("help\n")
    lines = bob.lines_until(lambda line: line.startswith("[HELP] roll"))
    assert lines[0] == "[HELP] msg <username> <message> - send a private message to one user"
    assert lines[-1] == "[HELP] roll <dice> - roll dice"
    bob.send("unknown_thing\n")
    bob.expect("Unknown command. Use msg/broadcast/list/join/send_group")
    with pytest.raises(ValueError, match="built-in"):
        Server(HOST, 0, 0).command("msg")(lambda c, a: None)
    with pytest.raises(RuntimeError, match="before start"):
        srv.command("late")(lambda c, a: None)


def test_the_server_lists_sends_and_kicks(hooked):
    srv, net = hooked(lambda srv: None)
    alice, bob = net.chat("alice"), net.chat("bob")
    # Without commands of its own, the server answers `help` to a lab client as the lab did.
    alice.send("help\n")
    alice.expect("Unknown command. Use msg/broadcast/list/join/send_group")
    alice.send("join team\n")
    alice.expect("You joined group 'team'")
    assert srv.users() == ["alice", "bob"]
    assert srv.groups() == [("team", ["alice"])]
    assert srv.send("GROUP:team", "team meeting at 10") == 1
    alice.expect("[SERVER] team meeting at 10")
    assert srv.send(None, "maintenance soon") == 2
    alice.expect("[SERVER] maintenance soon")
    bob.expect("[SERVER] maintenance soon")
    assert srv.send("bob", "just you") == 1
    bob.expect("[SERVER] just you")
    with pytest.raises(Exception, match="one line"):
        srv.send("bob", "two\nlines")
    assert srv.kick("bob", "spamming") is True
    bob.expect("ERROR: kicked: spamming")
    bob.expect_closed()
    assert srv.kick("nobody", "x") is False
    alice.send("msg alice still here\n")
    alice.expect("[PRIVATE from alice]: still here")


def test_a_hook_that_raises_follows_its_failure_policy(hooked):
    def setup(srv: Server) -> None:
        @srv.before_message(fail="open")
        def broken_but_open(msg: Message):
            raise KeyError("bug")

        @srv.before_login
        def broken_and_closed(login: Login):
            if login.name == "carol":
                raise KeyError("bug")

    _, net = hooked(setup)
    alice, bob = net.chat("alice"), net.chat("bob")
    alice.send("msg bob through anyway\n")
    bob.expect("[PRIVATE from alice]: through anyway")
    carol = net.wire("chat", "carol")
    carol.send("carol\n")
    carol.expect("ERROR: refused: a server hook failed")


def test_a_hook_past_its_limit_is_cut_off_and_others_keep_chatting(hooked):
    release = threading.Event()

    def setup(srv: Server) -> None:
        @srv.before_message(timeout=0.3)
        def slow_for_alice(msg: Message):
            if msg.sender == "alice":
                release.wait(10)  # far past its limit

    _, net = hooked(setup)
    try:
        alice, bob, carol = net.chat("alice"), net.chat("bob"), net.chat("carol")
        alice.send("msg bob are you there\n")
        # While alice's hook hangs, bob and carol chat on.
        for i in range(20):
            bob.send(f"msg carol ping {i}\n")
            carol.expect(f"[PRIVATE from bob]: ping {i}")
        alice.expect("ERROR: refused: a server hook took longer than 550ms")
    finally:
        release.set()


@pytest.mark.parametrize("wait", [0.005, 0.0005])
def test_hooks_that_wait_on_io_run_side_by_side(hooked, wait):
    # A hook that blocks outside Python (a lookup, here a sleep) lets go of the GIL: once
    # the dispatcher that answers alone finds it slow, the other dispatchers answer the
    # next questions meanwhile, up to 8 at once. Each user pipelines 4 messages, so that
    # even a short wait adds up to a batch that is found slow.
    lock = threading.Lock()
    inside, most = [0], [0]

    def setup(srv: Server) -> None:
        @srv.before_message(timeout=10)
        def lookup(msg: Message):
            with lock:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
            time.sleep(wait)
            with lock:
                inside[0] -= 1

    _, net = hooked(setup)
    bob = net.chat("bob")
    names = [f"user{i}" for i in range(16)]
    wires = [net.chat(n) for n in names]
    for name, w in zip(names, wires):
        w.send("".join(f"msg bob {k} from {name}\n" for k in range(4)))
    got = {bob.line() for _ in range(4 * len(names))}
    assert got == {f"[PRIVATE from {n}]: {k} from {n}" for n in names for k in range(4)}
    assert most[0] >= 2, f"at most {most[0]} hook call at once"


def test_a_command_answer_of_the_wrong_type_refuses_only_that_call(hooked):
    def setup(srv: Server) -> None:
        @srv.command("broken")
        def broken(caller: str, args: str):
            return 42  # neither a str nor lines

        @srv.command("fine")
        def fine(caller: str, args: str) -> str:
            return "ok"

    _, net = hooked(setup)
    alice, bob = net.chat("alice"), net.chat("bob")
    alice.send("broken\n")
    alice.expect("ERROR: refused: a server hook failed")
    alice.send("fine\n")
    alice.expect("ok")
    alice.send("msg bob still here\n")
    bob.expect("[PRIVATE from alice]: still here")


def test_async_hooks_and_commands_run_on_the_hooks_loop(hooked):
    def setup(srv: Server) -> None:
        @srv.before_message
        async def later(msg: Message) -> str:
            await asyncio.sleep(0.01)
            return msg.text + " (checked)"

        @srv.command("wait", timeout=0.2)
        async def wait(caller: str, args: str) -> str:
            await asyncio.sleep(float(args))
            return "done"

    _, net = hooked(setup)
    alice, bob = net.chat("alice"), net.chat("bob")
    alice.send("msg bob hi\n")
    bob.expect("[PRIVATE from alice]: hi (checked)")
    alice.send("wait 0\n")
    alice.expect("done")
    alice.send("wait 5\n")
    alice.expect("ERROR: the command wait took too long")


def test_plugins_load_by_name_and_path_and_a_broken_one_stops_the_start(hooked, tmp_path):
    plugin = tmp_path / "greeter.py"
    plugin.write_text(
        "def setup(server):\n"
        "    @server.command('hi', help='say hi')\n"
        "    def hi(caller, args):\n"
        "        return f'hi {caller}'\n"
    )
    _, net = hooked(lambda srv: None, plugins=[str(plugin), "tests.plugin_for_tests"])
    alice = net.chat("alice")
    alice.send("hi\n")
    alice.expect("hi alice")
    alice.send("ping\n")
    alice.expect("pong")
    broken = tmp_path / "broken.py"
    broken.write_text("def setup(server):\n    raise RuntimeError('cannot start: no config')\n")
    with pytest.raises(RuntimeError, match="no config"):
        Server(HOST, 0, 0, tmp_path / "d2", plugins=[str(broken)])
    nosetup = tmp_path / "nosetup.py"
    nosetup.write_text("x = 1\n")
    with pytest.raises(TypeError, match="no setup"):
        Server(HOST, 0, 0, tmp_path / "d3", plugins=[str(nosetup)])


def test_server_py_loads_plugins_and_a_broken_one_stops_it_with_its_traceback(tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("def setup(server):\n    raise RuntimeError('cannot start: no config')\n")
    argv = [sys.executable, str(REPO / "server.py"), "--chat-port", "0", "--file-port", "0"]
    argv += ["--data-dir", str(tmp_path / "data"), "--plugin", str(broken)]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert out.returncode != 0
    assert "Traceback" in out.stderr and "cannot start: no config" in out.stderr
    assert "Listening" not in out.stdout


def test_the_examples_work(hooked, tmp_path, monkeypatch):
    allowed = tmp_path / "allowed.txt"
    allowed.write_text("alice\nbob\n")
    audit = tmp_path / "audit.jsonl"
    monkeypatch.setenv("RELAYCHAT_ALLOW_FILE", str(allowed))
    monkeypatch.setenv("RELAYCHAT_AUDIT_LOG", str(audit))
    plugins = [
        str(EXAMPLES / f"{name}.py")
        for name in ("word_filter", "dice_bot", "allow_list", "audit_log")
    ]
    _, net = hooked(lambda srv: None, plugins=plugins)
    alice, bob = net.chat("alice"), net.chat("bob")
    eve = net.wire("chat", "eve")
    eve.send("eve\n")
    eve.expect("ERROR: eve is not on this server's list")
    alice.send("msg bob what the heck\n")
    bob.expect("[PRIVATE from alice]: what the h***")
    alice.send("broadcast STOP SHOUTING\n")
    alice.expect("ERROR: no shouting, please")
    alice.send("roll 3d6\n")
    assert alice.line().startswith("alice rolled 3d6: ")
    alice.send("roll 99d1\n")
    alice.expect("ERROR: usage: roll <N>d<M>, with N from 1 to 20 and M from 2 to 1000")
    alice.send("echo hello there\n")
    alice.expect("hello there")
    wait_until(lambda: audit.exists() and audit.read_text().count("\n") >= 3, what="audited")
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [e["event"] for e in lines][:3] == ["connect", "connect", "message"]
    assert lines[2]["text"] == "what the h***"


def test_metrics_are_served_for_prometheus_and_match_stats(hooked, tmp_path):
    def setup(srv: Server) -> None:
        srv.before_message(lambda msg: None)

    srv, net = hooked(setup, metrics_port=0)
    alice, bob = net.client("alice"), net.chat("bob")
    net.chat("carol")
    alice.join("team")
    bob.send("join team\n")
    bob.expect("You joined group 'team'")
    alice.msg("bob", "one")
    alice.broadcast("two")
    alice.send_group("team", "three")
    for text in ("[PRIVATE from alice]: one", "[BROADCAST from alice]: two"):
        bob.expect(text)
    bob.expect("[GROUP team] alice: three")
    alice.send_file("bob", random_file(tmp_path / "f.bin", 5000))
    url = f"http://{HOST}:{srv.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    for sample in (
        'relaychat_messages_total{kind="private"} 1',
        'relaychat_deliveries_total{kind="broadcast"} 2',
        'relaychat_deliveries_total{kind="group"} 1',
        "relaychat_users 3",
        'relaychat_connections{port="chat"} 3',
        'relaychat_file_bytes_total{direction="in"} 5000',
        'relaychat_hook_calls_total{kind="message"} 3',
        'relaychat_hook_failures_total{kind="message"} 0',
    ):
        assert sample in text, (sample, text)
    assert 'relaychat_hook_latency_seconds_count{kind="message"} 3' in text
    stats = srv.stats()
    assert stats["relaychat_users"] == 3
    assert stats["relaychat_messages_total"] == {"private": 1, "group": 1, "broadcast": 1}
    assert stats["relaychat_hook_latency_seconds_count"]["message"] == 3


def test_pipelined_messages_through_a_hook_keep_their_order_and_their_own_answers(hooked):
    def setup(srv: Server) -> None:
        @srv.before_message
        def odd_ones_refused(msg: Message):
            n = int(msg.text.split()[-1])
            if n % 2:
                raise Refuse(f"no {n}")
            return f"even {n}"

    _, net = hooked(setup)
    alice, bob = net.chat("alice"), net.chat("bob")
    # One write of 200 commands, a list in the middle: the session asks about many at
    # once, and answers each in order.
    lines = [f"msg bob number {i}\n" for i in range(200)]
    lines.insert(100, "list\n")
    alice.send("".join(lines))
    for i in range(0, 200, 2):
        bob.expect(f"[PRIVATE from alice]: even {i}")
    replies = [alice.line() for _ in range(101)]
    want = [f"ERROR: no {i}" for i in range(1, 200, 2)]
    want.insert(50, "Connected users: bob")
    assert replies == want


def test_a_hook_sees_each_message_with_its_own_sender_and_recipient(hooked):
    # Messages of several pipelining senders to several recipients reach the hook in
    # batches; each question carries its own names and text.
    seen: list[tuple[str, str, str]] = []

    def setup(srv: Server) -> None:
        @srv.before_message
        def record(msg: Message) -> None:
            seen.append((msg.sender, msg.to, msg.text))

    _, net = hooked(setup)
    names = ["ann", "ben", "cat"]
    wires = {n: net.chat(n) for n in names}
    sent = []
    for round_ in range(3):
        for n in names:
            lines = []
            for k, to in enumerate(m for m in names if m != n):
                text = f"{round_}.{k} {n} to {to}"
                lines.append(f"msg {to} {text}\n")
                sent.append((n, to, text))
            wires[n].send("".join(lines))
    for n in names:
        for _ in range(2 * 3):
            wires[n].line()
    assert sorted(seen) == sorted(sent)
