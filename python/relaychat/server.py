"""`relaychat.Server`: the engine's server, extensible from Python.

Hooks decide about events before they happen (a message, a login, an upload), observers
hear of them afterwards, and custom commands add words to the chat protocol. The engine
still does all the networking: it asks the hooks through one queue, in batches, and a
session waits for its own answer only (at most the hook's time limit), so a slow hook
delays nobody else. A server without hooks pays nothing for the feature::

    from relaychat import Refuse, Server

    server = Server(chat_port=0, file_port=0)

    @server.before_message
    def no_shouting(msg):
        if msg.text.isupper():
            raise Refuse("no shouting, please")
        return msg.text.replace("darn", "d**n")  # a str rewrites the message

    @server.command("roll", help="roll dice, e.g. roll 2d6", rate="5/10s")
    def roll(caller, args):
        return f"{caller} rolled 4"

    server.serve_forever()

A hook returns `None` or `True` to allow, `False` to refuse, a `str` (message hooks) to
rewrite, or raises `Refuse(reason)`; it may be a plain or an `async` function. An error
in a hook is logged and its failure policy decides: `fail="closed"` (the default for
"before" hooks) refuses, `fail="open"` lets the event through; so does running past its
`timeout` (1 s by default). Plugins are modules with a `setup(server)` function, loaded
by dotted name or file path (`Server(plugins=[...])`, `python server.py --plugin ...`).
docs/PLUGINS.md has the whole API.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import importlib
import importlib.util
import inspect
import logging
import os
import queue
import re
import sys
import threading
import time
import types
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypeVar

from relaychat import _native

__all__ = ["Login", "Message", "Refuse", "Server", "Upload"]

log = logging.getLogger("relaychat.server")

F = TypeVar("F", bound=Callable[..., Any])

#: What a refusal without a reason says.
REFUSED = "refused by the server"
#: What a failed hook (an exception, or past its time limit) says under `fail="closed"`.
HOOK_FAILED = "refused: a server hook failed"
#: How many hook calls may run at once (a hook that sleeps holds one).
WORKERS = 8
#: While hooks answer quickly, one dispatcher (the lead) takes each batch and answers it,
#: and one other (the watch) looks now and then whether the lead is stuck: more Python
#: threads on quick hooks only pass the GIL to and fro, and split the answers the engine
#: hands over together. Every dispatcher takes part (up to `WORKERS` hook calls at once)
#: for `SIDE_BY_SIDE` seconds once a batch took `SLOW` seconds or more per question over
#: at least `SLOW_OVER` seconds (a hook that waits on I/O), or one batch has been answered
#: for `STUCK` seconds (a hook that hangs). The watch looks every `WATCH` seconds while
#: the lead answers a batch, and every `WATCH_IDLE` seconds otherwise.
SLOW = 50e-6
SLOW_OVER = 0.001
STUCK = 0.005
WATCH = 0.001
WATCH_IDLE = 0.05
SIDE_BY_SIDE = 1.0
#: How long one wait on the engine for a batch lasts at most.
IDLE = 0.2
#: Observations waiting for the observers at most; past it they are dropped (counted).
OBSERVED_QUEUE = 65_536
#: The engine waits this much past a hook's own limit before it applies the failure
#: policy itself (an async hook is cut off at its limit here; a plain one cannot be).
GRACE = 0.25
#: The events observers may hear of.
EVENTS = frozenset(
    {
        "connect",
        "disconnect",
        "join",
        "leave",
        "message",
        "file_saved",
        "file_acknowledged",
    }
)


class Refuse(Exception):
    """Raise in a hook or a command to refuse: the user gets `ERROR: <reason>`."""


class Message(NamedTuple):
    """A message about to be delivered."""

    #: `private`, `group` or `broadcast`.
    kind: Literal["private", "group", "broadcast"]
    sender: str
    #: The recipient (private), the group (group), or `""` (broadcast).
    to: str
    text: str


class Login(NamedTuple):
    """A login about to complete (after the password, for a registered name)."""

    name: str
    address: str
    registered: bool


class Upload(NamedTuple):
    """An upload about to be taken."""

    sender: str
    #: A user, or `GROUP:<group>`.
    target: str
    filename: str
    size: int


_EVENTS: dict[str, Any] = {"message": Message, "login": Login, "upload": Upload}
#: Makes an event from the engine's `args` without the NamedTuple's Python-level `__new__`
#: (a quarter of a hooked message's cost in Python).
_new_tuple = tuple.__new__
#: What a hook returns that is never awaitable (`inspect.isawaitable` costs as much as a
#: hook call).
_PLAIN = frozenset({str, bool})


@dataclasses.dataclass
class _Hook:
    fn: Callable[..., Any]
    timeout: float
    fail_open: bool
    priority: int


@dataclasses.dataclass
class _Command:
    fn: Callable[[str, str], Any]
    usage: str
    help: str
    timeout: float
    #: At most `rate[0]` calls per user in `rate[1]` seconds.
    rate: tuple[int, float] | None
    calls: dict[str, collections.deque[float]] = dataclasses.field(default_factory=dict)
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)


def _rate(text: str | None) -> tuple[int, float] | None:
    """`"5/10s"` (or `/2m`, `/1h`, `/30`): at most 5 calls in 10 seconds."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if not m or int(m.group(1)) < 1:
        raise ValueError(f"rate must look like '5/10s', not {text!r}")
    unit = {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(3)]
    return int(m.group(1)), float(m.group(2)) * unit


def _fail(fail: str) -> bool:
    if fail not in ("open", "closed"):
        raise ValueError(f"fail must be 'open' or 'closed', not {fail!r}")
    return fail == "open"


class _HookTimeout(Exception):
    pass


class Server(_native.Server):
    """The relay server (see `relaychat._native.Server` for its settings), with hooks,
    observers, custom commands, plugins, and a control API (`users()`, `groups()`,
    `send()`, `kick()`) once it runs."""

    def __new__(cls, *args: Any, plugins: Iterable[str] = (), **kwargs: Any) -> Server:
        return super().__new__(cls, *args, **kwargs)

    def __init__(self, *args: Any, plugins: Iterable[str] = (), **kwargs: Any) -> None:
        self._before: dict[str, list[_Hook]] = {"message": [], "login": [], "upload": []}
        self._commands: dict[str, _Command] = {}
        self._observers: dict[str, list[Callable[[dict[str, Any]], Any]]] = {}
        self._run: _Run | None = None
        self._stop_lock = threading.Lock()
        for plugin in plugins:
            self.load_plugin(plugin)

    # --- registering ---------------------------------------------------------------------

    def _before_hook(
        self,
        kind: str,
        fn: F | None,
        timeout: float,
        fail: str,
        priority: int,
    ) -> Any:
        fail_open = _fail(fail)
        if timeout <= 0:
            raise ValueError("timeout must be positive")

        def register(fn: F) -> F:
            self._check_not_running()
            hooks = self._before[kind]
            hooks.append(_Hook(fn, timeout, fail_open, priority))
            hooks.sort(key=lambda h: -h.priority)  # stable: equal priorities keep order
            return fn

        return register(fn) if fn is not None else register

    def before_message(
        self,
        fn: F | None = None,
        *,
        timeout: float = 1.0,
        fail: str = "closed",
        priority: int = 0,
    ) -> Any:
        """Decorates `fn(msg: Message)`, asked before every private, group and broadcast
        message is delivered: allow (`None`/`True`), refuse (`False`, `Refuse(reason)`), or
        return the text to send instead. Hooks run by `priority`, highest first; each sees
        the text the one before it returned."""
        return self._before_hook("message", fn, timeout, fail, priority)

    def before_login(
        self,
        fn: F | None = None,
        *,
        timeout: float = 1.0,
        fail: str = "closed",
        priority: int = 0,
    ) -> Any:
        """Decorates `fn(login: Login)`, asked before a login completes (a registered
        name's password is already checked): allow, or refuse with a reason the user gets
        as `ERROR: <reason>` before the connection closes."""
        return self._before_hook("login", fn, timeout, fail, priority)

    def before_upload(
        self,
        fn: F | None = None,
        *,
        timeout: float = 1.0,
        fail: str = "closed",
        priority: int = 0,
    ) -> Any:
        """Decorates `fn(upload: Upload)`, asked before an upload is taken (after the
        server's own checks of name and size, before the quota)."""
        return self._before_hook("upload", fn, timeout, fail, priority)

    def on(self, event: str, fn: F | None = None) -> Any:
        """Decorates `fn(fields: dict)`, told after `event` happened: `connect` (user,
        address, registered), `disconnect` (user, reason), `join` and `leave` (user,
        group), `message` (kind, sender, to, text), `file_saved` (sender, target,
        filename, saved_as, size), `file_acknowledged` (recipient, sender, filename).
        Every value is a string; `fields["event"]` is the event's name. Observers run one
        at a time in the order events happened, and can never slow delivery: when they
        fall far behind, observations are dropped (`Server.hook_drops` counts them)."""
        if event not in EVENTS:
            raise ValueError(f"unknown event {event!r}; one of {sorted(EVENTS)}")

        def register(fn: F) -> F:
            self._check_not_running()
            self._observers.setdefault(event, []).append(fn)
            return fn

        return register(fn) if fn is not None else register

    def command(
        self,
        name: str,
        fn: F | None = None,
        *,
        help: str = "",
        usage: str | None = None,
        rate: str | None = None,
        timeout: float = 1.0,
    ) -> Any:
        """Decorates `fn(caller: str, args: str)` as the chat command `name`: what it
        returns (a `str`, or a list of lines) goes to the caller; `Refuse(reason)` answers
        `ERROR: <reason>`. `rate="5/10s"` allows each user 5 calls in 10 seconds (more are
        answered `ERROR: slow down`). `help` and `usage` show in the server's `help`
        answer. A built-in command's name cannot be taken."""
        word = name.lower()
        if not re.fullmatch(r"[a-z0-9_][a-z0-9_-]*", word):
            raise ValueError(f"a command is one word of letters, digits, - and _: {name!r}")
        if word == "help" or any(word == c[0] for c in _native.COMMANDS):
            raise ValueError(f"'{word}' is a built-in command")
        if word in self._commands:
            raise ValueError(f"the command '{word}' is already registered")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        limit = _rate(rate)

        def register(fn: F) -> F:
            self._check_not_running()
            self._commands[word] = _Command(fn, usage or word, help or "", timeout, limit)
            return fn

        return register(fn) if fn is not None else register

    def load_plugin(self, spec: str) -> types.ModuleType:
        """Imports a plugin by dotted name (`mypkg.module`) or file path (`./bot.py`) and
        calls its `setup(server)`. Any error propagates: a plugin that cannot load stops
        the start."""
        if spec.endswith(".py") or os.sep in spec:
            path = Path(spec).resolve()
            name = f"relaychat_plugin_{path.stem}"
            loaded = importlib.util.spec_from_file_location(name, path)
            if loaded is None or loaded.loader is None:
                raise ImportError(f"cannot load a plugin from {spec}")
            module = importlib.util.module_from_spec(loaded)
            sys.modules[name] = module
            loaded.loader.exec_module(module)
        else:
            module = importlib.import_module(spec)
        setup = getattr(module, "setup", None)
        if not callable(setup):
            raise TypeError(f"plugin {spec} has no setup(server) function")
        setup(self)
        return module

    def _check_not_running(self) -> None:
        if self.is_running:
            raise RuntimeError("hooks, observers and commands are added before start()")

    # --- running -----------------------------------------------------------------------

    def _hooked(self) -> bool:
        return any(self._before.values()) or bool(self._commands) or bool(self._observers)

    def start(self) -> None:
        """Binds both ports and starts serving in the background, with the hooks."""
        if self.is_running:
            return
        if self._hooked():
            self._install()
        super().start()
        if self._hooked() and self._run is None:
            self._run_dispatcher()

    def serve_forever(self) -> None:
        """Starts the server if needed and blocks until it stops (Ctrl-C: gracefully)."""
        self.start()
        try:
            super().serve_forever()
        finally:
            self._stop_dispatcher()

    def stop(self, timeout: float = 10.0) -> None:
        """Stops the server (see `relaychat._native.Server.stop`), then its hook threads."""
        try:
            super().stop(timeout)
        finally:
            self._stop_dispatcher()

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _install(self) -> None:
        def policy(hooks: list[_Hook]) -> tuple[float, bool] | None:
            if not hooks:
                return None
            # The chain may take each hook's limit; it fails open only if all of them do.
            limit = sum(h.timeout for h in hooks) + GRACE
            return limit, all(h.fail_open for h in hooks)

        commands = self._commands.values()
        self._install_hooks(
            message=policy(self._before["message"]),
            login=policy(self._before["login"]),
            upload=policy(self._before["upload"]),
            command=(max(c.timeout for c in commands) + GRACE, False) if commands else None,
            commands=[
                (w, c.usage, c.help or "(no description)") for w, c in self._commands.items()
            ],
            observe=bool(self._observers),
        )

    def _run_dispatcher(self) -> None:
        self._run = _Run(self)

    def _stop_dispatcher(self) -> None:
        with self._stop_lock:
            run, self._run = self._run, None
        if run is not None:
            run.stop()

    @property
    def hook_drops(self) -> int:
        """Observations dropped because the observers fell behind (in the engine's queue
        or in the observers' own)."""
        run = self._run
        return super().hook_drops + (run.drops if run else 0)

    def _answer_from(self, batch: _native.HookBatch, items: Iterator, run: _Run) -> int:
        """Answers `batch`'s questions as `items` yields them (an iterator shared by the
        dispatchers: one stuck in a slow hook holds only its own question, the others take
        on the rest); returns how many it answered. The engine hands the answers over
        together, within a millisecond.

        Each answer is what `HookBatch.answer` takes. This loop is the hot path of every
        hooked message, kept lean: the hooks are called in it (no Python call per
        question beyond theirs), the event is made from the engine's `args` (which match
        its fields) with no Python-level constructor, an awaitable is looked for only in
        what is not a plain answer, and the clock is read once per hook call."""
        clock = time.monotonic
        started = clock()
        answered = 0
        before, awaitable = self._before, inspect.isawaitable
        for i, (kind, args) in items:
            answered += 1
            verdict: Any = None
            try:
                if kind == "command":
                    verdict = self._run_command(args, run)
                    started = clock()
                    hooks = ()
                else:
                    event = _new_tuple(_EVENTS[kind], args)
                    hooks = before[kind]
                for hook in hooks:
                    try:
                        out = hook.fn(event)
                        if out is not None and out.__class__ not in _PLAIN and awaitable(out):
                            out = run.wait(out, hook.timeout)
                    except Exception as e:
                        started = clock()
                        failed = _failed(kind, hook, e)
                        if failed is None:  # it fails open: on to the next hook
                            continue
                        verdict = failed
                        break
                    now = clock()
                    if now - started > hook.timeout:
                        log.warning("%s hook %s took over %s s", kind, _name(hook.fn), hook.timeout)
                    started = now
                    if out is None:
                        continue
                    if out is False:
                        verdict = ("deny", REFUSED)
                        break
                    if out.__class__ is str and kind == "message" and out != event.text:
                        event = event._replace(text=out)
                        # The text as it came needs no rewrite (nor its checks).
                        verdict = ("rewrite", out) if out != args[3] else None
            except Exception:  # a bug of ours or an odd plugin: this question only
                log.exception("answering %s %r failed", kind, args)
                verdict, started = ("deny", HOOK_FAILED), clock()
            batch.answer(i, verdict)
        batch.flush()
        return answered

    def _run_command(self, args: tuple, run: _Run) -> tuple[str, Any]:
        """A custom command's answer, as `HookBatch.answer` takes it."""
        caller, name, text = args
        command = self._commands[name]
        if command.rate is not None:
            most, window = command.rate
            with command.lock:
                now = time.monotonic()
                calls = command.calls.setdefault(caller, collections.deque())
                while calls and now - calls[0] > window:
                    calls.popleft()
                if len(calls) >= most:
                    return "deny", "slow down"
                calls.append(now)
        try:
            out = command.fn(caller, text)
            if inspect.isawaitable(out):
                out = run.wait(out, command.timeout)
        except Refuse as refused:
            return "deny", str(refused) or REFUSED
        except _HookTimeout:
            return "deny", f"the command {name} took too long"
        except Exception:
            log.exception("command %s failed", name)
            return "deny", f"the command {name} failed"
        if out is None:
            lines: list[str] = []
        elif isinstance(out, str):
            lines = out.splitlines()
        else:
            lines = [line for item in out for line in str(item).splitlines()]
        return "reply", lines


def _name(fn: Any) -> str:
    """A hook's name for the log (a `functools.partial` or a callable object has no
    `__qualname__`)."""
    return getattr(fn, "__qualname__", None) or repr(fn)


def _failed(kind: str, hook: _Hook, e: Exception) -> tuple[str, str] | None:
    """The answer when `hook` raised `e` (called in its `except`): its refusal, or its
    failure policy's (`None`: it fails open)."""
    if isinstance(e, Refuse):
        return "deny", str(e) or REFUSED
    name = _name(hook.fn)
    if isinstance(e, _HookTimeout):
        log.warning("%s hook %s took over %s s", kind, name, hook.timeout)
    else:
        log.exception("%s hook %s failed", kind, name)
    return None if hook.fail_open else ("deny", HOOK_FAILED)


class _Run:
    """One run's hook threads: 8 dispatchers, one observer thread (in order), and the
    event loop async hooks run on. All daemons: a hook stuck forever never blocks exit.

    While hooks answer quickly, one dispatcher (the lead) takes the engine's batches and
    answers them, one (the watch) looks whether the lead is stuck, and the others wait.
    When hooks are slow or stuck (see `SLOW`), every dispatcher answers: one at a time
    waits on the engine for a batch, and they take its questions one at a time from a
    shared iterator (up to 8 hook calls at once; a stuck hook holds one dispatcher and its
    one question while the others go on)."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.stopping = threading.Event()
        self.loop = asyncio.new_event_loop()
        self.observed: queue.Queue[dict[str, Any] | None] = queue.Queue(OBSERVED_QUEUE)
        self.drops = 0
        self.taking = threading.Lock()
        self.leading = threading.Lock()
        self.watching = threading.Lock()
        #: Where the dispatchers that are neither lead nor watch wait to take part.
        self.joining = threading.Condition()
        #: Batches whose questions are being answered, each with the iterator every
        #: dispatcher takes its next question from.
        self.work: collections.deque[tuple[_native.HookBatch, Iterator]] = collections.deque()
        self.popping = threading.Lock()
        #: When the batch the lead answers was begun (`None`: none is), and until when
        #: every dispatcher answers (`time.monotonic()`).
        self.begun: float | None = None
        self.side_by_side = 0.0
        self.threads = [
            threading.Thread(target=self.loop.run_forever, name="relaychat-hook-loop"),
            threading.Thread(target=self.observe, name="relaychat-observers"),
            *(
                threading.Thread(target=self.dispatch, name=f"relaychat-hooks-{i}")
                for i in range(WORKERS)
            ),
        ]
        for t in self.threads:
            t.daemon = True
            t.start()

    def together(self) -> bool:
        """Whether every dispatcher answers now."""
        return self.side_by_side > time.monotonic()

    def join_in(self) -> None:
        """Every dispatcher answers for the next `SIDE_BY_SIDE` seconds."""
        self.side_by_side = time.monotonic() + SIDE_BY_SIDE
        with self.joining:
            self.joining.notify_all()

    def dispatch(self) -> None:
        while not self.stopping.is_set():
            if self.together():
                self.share()
            elif self.leading.acquire(blocking=False):
                try:
                    self.lead()
                finally:
                    self.leading.release()
            elif self.watching.acquire(blocking=False):
                try:
                    self.watch()
                finally:
                    self.watching.release()
            else:
                with self.joining:
                    if not self.stopping.is_set() and not self.together():
                        self.joining.wait()

    def lead(self) -> None:
        """Takes each batch and answers it, and finds out whether the hooks are slow."""
        clock = time.monotonic
        while not self.stopping.is_set() and not self.together():
            if not self.work:
                with self.taking:
                    self.take()
                continue
            self.begun = begun = clock()
            try:
                answered = self.answer_front()
            finally:
                self.begun = None
            took = clock() - begun
            if took >= SLOW_OVER and took >= answered * SLOW:
                self.join_in()

    def watch(self) -> None:
        """Looks whether the lead has been answering one batch for `STUCK` seconds."""
        while not self.stopping.is_set() and not self.together():
            begun = self.begun
            if begun is not None and time.monotonic() - begun >= STUCK:
                self.join_in()
                return
            self.stopping.wait(WATCH if begun is not None else WATCH_IDLE)

    def share(self) -> None:
        """One step of answering side by side: the first batch's next questions, or (when
        none is queued) the next batch, taken by one dispatcher at a time."""
        if self.work:
            self.answer_front()
            return
        with self.taking:
            if not self.work:  # no one else took one meanwhile
                self.take()

    def answer_front(self) -> int:
        """Answers questions of the first queued batch until none is left to take; returns
        how many this thread answered."""
        try:
            batch, items = self.work[0]
        except IndexError:  # another dispatcher finished it just now
            return 0
        answered = 0
        try:
            answered = self.server._answer_from(batch, items, self)
        except Exception:  # ours: the questions left get their failure policy
            log.exception("answering %r failed", batch)
        finally:
            with self.popping:
                if self.work and self.work[0][0] is batch:
                    self.work.popleft()
        return answered

    def take(self) -> None:
        """Holding `taking`: waits on the engine for a batch and queues it and its
        observations (so the observers hear events in the engine's order). When the hooks
        are gone, the run stops."""
        if self.stopping.is_set():
            return
        taken = self.server._next_hooks(IDLE)
        if taken is None:
            self.stopping.set()
            with self.joining:
                self.joining.notify_all()
            return
        batch, questions, observations = taken
        for fields in observations:
            try:
                self.observed.put_nowait(fields)
            except queue.Full:
                self.drops += 1
        if questions:
            self.work.append((batch, enumerate(questions)))

    def wait(self, awaitable: Any, timeout: float | None) -> Any:
        """Runs an async hook's awaitable on the hooks' event loop, within `timeout`."""

        async def wait() -> Any:
            return await awaitable

        future = asyncio.run_coroutine_threadsafe(wait(), self.loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise _HookTimeout from None

    def observe(self) -> None:
        while (fields := self.observed.get()) is not None:
            for fn in self.server._observers.get(fields["event"], ()):
                try:
                    out = fn(fields)
                    if inspect.isawaitable(out):
                        self.wait(out, None)
                except Exception:
                    log.exception("observer %s of %s failed", _name(fn), fields["event"])

    def stop(self) -> None:
        """Ends the threads (waiting a little for each; never for the calling one). A
        batch not yet answered is let go: its questions get their failure policy."""
        self.stopping.set()
        self.work.clear()
        with self.joining:
            self.joining.notify_all()
        with contextlib.suppress(queue.Full):
            self.observed.put(None, timeout=1)
        self.loop.call_soon_threadsafe(self.loop.stop)
        me = threading.current_thread()
        for t in self.threads:
            if t is not me:
                t.join(2)
        if not self.loop.is_running():
            self.loop.close()
