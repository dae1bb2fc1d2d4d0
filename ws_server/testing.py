"""Test a model the way the server runs it, in plain pytest: no server, no sockets.

``ModelTester`` loads a model directory with the registry's own loader (config.yaml
validated, secrets resolved, ``load_resources`` run), opens one chat session on it with the
server's own turn machine (``session.conversation.Conversation``: ``on_chat_start``, one
turn at a time, timeout, cancel, ``done`` once, the history, ``on_chat_end`` exactly once)
and reads the session's frames as a client would parse them. So a turn behaves in a test
as it does behind ``anything-agent serve``, and what a test asserts is what a client gets::

    from ws_server.testing import ModelTester

    def test_echo_repeats_me():                      # plain pytest: no asyncio plugin needed
        with ModelTester("models/echo") as model:    # loads it, runs on_chat_start
            turn = model.send("hello there", params={"temperature": 0})
            assert turn.text == "hello there" and turn.reason == "stop"
            assert turn.chunks == ["hello", " there"]
            assert model.history[-1] == {"role": "assistant", "content": "hello there"}
        # on_chat_end has run, once

    async def test_the_same_from_an_async_test():    # with pytest-asyncio
        async with ModelTester("models/echo") as model:
            turn = await model.asend("hello there")

A ``Turn`` holds the turn's ``chunks`` (and ``text``, them joined), its ``events``
(``Event(name, data)``: ``status``, ``step`` and the model's own, from ``self.emit``),
``items`` (chunks and events interleaved as they came), ``errors`` (``Error(code,
message)``, exactly as a client gets them) and ``reason`` (``stop``, ``cancelled``,
``timeout`` or ``error``). When the model raised, the client only gets a generic
``model_error``; the test author also gets what the server log would show:
``turn.exception`` (the exception object, for a model running in this process) and
``turn.traceback`` (its text, the worker's traceback for an isolated model). The same
lines reach pytest's captured log, so a failing test shows them.

- ``send(content, params=None, cancel_after=None)`` appends a user message and runs a turn;
  ``send_messages([...])`` replaces the history first (clients that keep their own);
  ``asend`` and ``asend_messages`` are the same inside ``async with``. ``content`` may be
  a string or a list of content parts, as on the wire. ``cancel_after=N`` cancels the turn
  as its Nth chunk arrives (as if the client sent ``cancel`` that instant), so the turn has
  exactly N chunks; 0 cancels it right behind the message.
- A message the server would refuse (``params`` over 16 KiB, a bad role) gives a turn with
  ``reason`` None, ``number`` None and the ``bad_request`` in ``errors``: no turn ran.
- ``config_overrides={"settings": {"timeout": 0.5}}`` goes on top of config.yaml (mappings
  merge key by key, anything else replaces), ``secrets={"api_key": "sk-test"}`` gives the
  model ``self.config["secrets"]["api_key"]`` whatever config.yaml's entry says (so no
  environment variable is needed in a test).
- A model that fails to load raises ``ModelLoadError`` naming the directory, the file and
  the problem, as the model list would show it (the model's own traceback is attached as
  a note). ``on_chat_start`` failing raises ``ChatStartError`` (after ``on_chat_end`` ran,
  as in the server).
- The synchronous form runs the session on a private event loop (uvloop where installed,
  as the server) in a background thread, which keeps running between calls, so tasks and
  threads a model starts carry on as they would in the server. Blocking model code runs
  where the server runs it (a plain generator in the model thread pool), and a coroutine
  that blocks the loop gets the server's "event loop blocked" warning. One difference:
  the model's async code runs in that thread, not the main thread (signal handlers can't
  be set there). The async form runs on the test's own loop; ``asend`` also works on a
  synchronous tester, from an async test.
- Isolated models (``isolation: true`` in config.yaml) run in this process, like any
  other, so their requirements must be installed here. ``isolated=True`` runs them as the
  server does instead: in a worker process started from their own virtualenv, built from
  requirements.txt with uv in ``env_cache`` (default: the server's own cache,
  ``~/.cache/anything-agent/envs``, so builds are shared with ``serve``; the first build
  takes a while), sandboxed where bubblewrap exists. (``isolated=True`` on a model that
  does not ask for isolation raises; ``config_overrides={"isolation": True}`` asks.)

``anything-agent test MODEL_DIR [-- PYTEST_ARGS]`` runs the model's own ``tests/``
directory with pytest from the server's environment, in the model directory (so
``ModelTester(".")`` or ``ModelTester(Path(__file__).parent.parent)`` finds the model);
its exit code is pytest's.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from pydantic import ValidationError

from ws_server import protocol
from ws_server.exceptions import AnythingAgentError, ModelLoadError
from ws_server.isolation.environments import EnvironmentBuilder, default_cache_dir
from ws_server.loop_watch import LoopWatch
from ws_server.registry.catalog import ModelVersion
from ws_server.registry.config import (
    CONFIG_FILE,
    NAME_PATTERN,
    NAME_RULE,
    ModelConfig,
    describe_errors,
    load_yaml,
    read_config,
    resolve_secrets,
)
from ws_server.registry.loader import MAIN_FILE, unload_package
from ws_server.registry.placement import ModelFiles, Placements, StartedModel, start_shared
from ws_server.registry.revision import compute_revision
from ws_server.sdk import Message
from ws_server.session.conversation import Conversation
from ws_server.session.outbox import Outbox

__all__ = ["ChatStartError", "Error", "Event", "ModelLoadError", "ModelTester", "Turn"]

T = TypeVar("T")
log = logging.getLogger("anything_agent.testing")


class Event(NamedTuple):
    """Something the model reported besides text: ``Event("status", {"text": "..."})``."""

    name: str
    data: dict[str, Any]


class Error(NamedTuple):
    """An ``error`` frame as the client gets it: ``Error("model_error", "...")``."""

    code: str
    message: str


@dataclass
class Turn:
    """What one turn sent the client, and what the author needs to debug it."""

    number: int | None  # the turn's number (1, 2, ...); None when the message was refused
    chunks: list[str] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    items: list[str | Event] = field(default_factory=list)  # chunks and events, in order
    errors: list[Error] = field(default_factory=list)
    reason: str | None = None  # the done reason: stop, cancelled, timeout or error
    exception: BaseException | None = None  # the model's exception (in this process)
    traceback: str = ""  # what the server log says went wrong, tracebacks included

    @property
    def text(self) -> str:
        """The reply: the chunks joined."""
        return "".join(self.chunks)


class ChatStartError(Exception):
    """``on_chat_start`` failed or took too long: the client would get error ``code`` and
    the connection would close. ``traceback`` is what the server log says."""

    def __init__(self, code: str, message: str, traceback: str = "") -> None:
        text = f"on_chat_start failed: {code}: {message}"
        super().__init__(f"{text}\n{traceback}".rstrip() if traceback else text)
        self.code = code
        self.message = message
        self.traceback = traceback


class ModelTester:
    """One chat session on the model in ``model_dir``, for tests; see the module docstring.

    ``with ModelTester(...) as model`` (synchronous) or ``async with`` loads the model and
    runs ``on_chat_start``; leaving the block runs ``on_chat_end`` (once) and unloads it.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        *,
        config_overrides: Mapping[str, Any] | None = None,
        secrets: Mapping[str, str] | None = None,
        isolated: bool = False,
        env_cache: str | os.PathLike[str] | None = None,
    ) -> None:
        self.model_dir = Path(model_dir).resolve()
        self.config_overrides = copy.deepcopy(dict(config_overrides or {}))
        self.secrets = dict(secrets or {})
        self.isolated = isolated
        self.env_cache = Path(env_cache) if env_cache is not None else default_cache_dir()
        self._session: _Session | None = None
        self._used = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None  # the private loop's (sync form)
        self._stopped: asyncio.Future[None] | None = None  # set: the private loop ends

    # ------------------------------------------------------------------ what a test reads
    @property
    def history(self) -> list[Message]:
        """The session's history, as the model sees it at its next turn."""
        return self._open_session().conversation.history.messages()

    @property
    def mode(self) -> str:
        """Where the model runs: ``shared`` (this process) or ``isolated`` (a worker)."""
        return self._open_session().version.mode

    # ------------------------------------------------------------------ synchronous form
    def __enter__(self) -> ModelTester:
        self._claim()
        self._start_loop()
        try:
            self._call(self._open())
        except BaseException:
            self._stop_loop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            self._call(self._close())
        finally:
            self._stop_loop()

    def send(
        self,
        content: str | list[dict[str, Any]],
        params: dict[str, Any] | None = None,
        *,
        cancel_after: int | None = None,
    ) -> Turn:
        """Send a user message (appended to the history) and wait for the turn's end."""
        return self._call(self._run(protocol.encode_message(content, params), cancel_after))

    def send_messages(
        self,
        messages: list[Message],
        params: dict[str, Any] | None = None,
        *,
        cancel_after: int | None = None,
    ) -> Turn:
        """Replace the history with ``messages`` and run a turn on it."""
        return self._call(self._run(protocol.encode_messages(messages, params), cancel_after))

    # ------------------------------------------------------------------ asynchronous form
    async def __aenter__(self) -> ModelTester:
        self._claim()
        self._loop = asyncio.get_running_loop()
        await self._open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._close()

    async def asend(
        self,
        content: str | list[dict[str, Any]],
        params: dict[str, Any] | None = None,
        *,
        cancel_after: int | None = None,
    ) -> Turn:
        """``send``, awaited."""
        return await self._acall(self._run(protocol.encode_message(content, params), cancel_after))

    async def asend_messages(
        self,
        messages: list[Message],
        params: dict[str, Any] | None = None,
        *,
        cancel_after: int | None = None,
    ) -> Turn:
        """``send_messages``, awaited."""
        frame = protocol.encode_messages(messages, params)
        return await self._acall(self._run(frame, cancel_after))

    # ------------------------------------------------------------------ the session
    async def _open(self) -> None:
        watch = LoopWatch(asyncio.get_running_loop())
        watch.start()
        try:
            version, environments = await self._load()
        except BaseException:
            watch.stop()
            raise
        conversation = _RecordingConversation(version, Outbox(0))
        session = _Session(version, conversation, environments, watch)
        failure = await conversation.start()
        if failure is not None:
            code, message = failure
            await session.close()
            raise ChatStartError(code, message, conversation.problems_text(0))
        self._session = session

    async def _close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def _run(self, data: str, cancel_after: int | None) -> Turn:
        if cancel_after is not None and cancel_after < 0:
            raise ValueError(f"cancel_after counts chunks: 0 or more, not {cancel_after}")
        session = self._open_session()
        conversation = session.conversation
        loop = asyncio.get_running_loop()
        recorder = _TurnRecorder(loop, cancel_after, conversation)
        conversation.outbox.attach(recorder)
        logged = len(conversation.problems)
        before = conversation.turn
        try:
            frame = protocol.parse_client_frame(data)
        except AnythingAgentError as exc:  # refused as the server would: an error frame
            await conversation.refuse(exc)
        else:
            await conversation.receive(frame)
        if conversation.turn == before:  # refused (bad_request, busy): no turn ran
            return recorder.turn(None, conversation.problems[logged:])
        if cancel_after == 0:
            await conversation.receive(protocol.CancelTurn())
        await recorder.finished
        running = conversation.running_turn
        if running is not None:  # the done frame is out; let the turn's task wind up
            await asyncio.wait({running})
        return recorder.turn(conversation.turn, conversation.problems[logged:])

    async def _load(self) -> tuple[ModelVersion, EnvironmentBuilder | None]:
        """The model as the registry loads it; ``ModelLoadError`` naming the directory."""
        directory = self.model_dir
        try:
            if not (directory / MAIN_FILE).is_file():
                raise ModelLoadError(
                    f"no {MAIN_FILE} (a model is a directory with a main.py)"
                    if directory.is_dir()
                    else "no such directory"
                )
            config, raw = _read_config(directory, self.config_overrides, self.secrets)
            name = config.name or directory.name
            if config.name is None and not NAME_PATTERN.match(name):
                raise ModelLoadError(
                    f"directory name {name!r} breaks the naming rule ({NAME_RULE}); "
                    "rename the directory or set `name` in config.yaml"
                )
            revision = await asyncio.to_thread(compute_revision, directory)
            files = ModelFiles(name, revision, directory, raw, config)
            if self.isolated:
                if not config.isolated:
                    raise ModelLoadError(
                        f"{CONFIG_FILE}: isolated=True, but the model does not ask for "
                        "isolation (pass config_overrides={'isolation': True} to try it)"
                    )
                environments = EnvironmentBuilder(self.env_cache)
                try:
                    started = await _start_worker(Placements(environments), files)
                except BaseException:
                    await environments.close()
                    raise
                return _version(files, started), environments
            try:
                started = await start_shared(files)
            except ModelLoadError as exc:
                if config.isolated:
                    exc.add_note(
                        "This model asks for isolation; ModelTester runs it in this process "
                        "unless isolated=True, which runs it in its own environment, built "
                        "from requirements.txt."
                    )
                raise
            return _version(files, started), None
        except ModelLoadError as exc:
            raise _naming(directory, exc) from None

    # ------------------------------------------------------------------ plumbing
    def _claim(self) -> None:
        if self._used:
            raise RuntimeError("a ModelTester opens one session; make a new one for another")
        self._used = True

    def _open_session(self) -> _Session:
        if self._session is None:
            raise RuntimeError("the session is not open: use `with ModelTester(...) as model`")
        return self._session

    def _start_loop(self) -> None:
        """The synchronous form's private loop, running in a thread of its own."""
        started = threading.Event()

        def run() -> None:
            try:
                runner = asyncio.Runner(loop_factory=_loop_factory())
                loop = runner.get_loop()
                self._stopped = loop.create_future()
                self._loop = loop
            finally:
                started.set()
            with runner:  # until _stop_loop; then it cancels what is left and closes
                runner.run(_wait(self._stopped))

        self._thread = threading.Thread(target=run, name="model-tester", daemon=True)
        self._thread.start()
        started.wait()
        if self._loop is None:
            raise RuntimeError("the test session's event loop did not start")

    def _stop_loop(self) -> None:
        thread, loop, stopped = self._thread, self._loop, self._stopped
        if thread is not None and loop is not None and stopped is not None:
            loop.call_soon_threadsafe(_resolve, stopped)
            thread.join()
        self._thread = self._loop = self._stopped = None

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run ``coroutine`` on the private loop and wait for it (synchronous form)."""
        loop = self._loop
        if self._thread is None or loop is None:
            coroutine.close()
            raise RuntimeError(
                "use `await model.asend(...)` inside `async with ModelTester(...)`, or "
                "`with ModelTester(...)` for send()"
            )
        future = asyncio.run_coroutine_threadsafe(coroutine, loop)
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            raise RuntimeError("the test session's event loop stopped") from None

    async def _acall(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run ``coroutine`` on the session's loop, from the loop a test awaits on."""
        loop = self._loop
        if loop is None:
            coroutine.close()
            raise RuntimeError("the session is not open: use `async with ModelTester(...)`")
        if loop is asyncio.get_running_loop():
            return await coroutine
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coroutine, loop))


# ---------------------------------------------------------------------- the session's parts
@dataclass
class _Session:
    version: ModelVersion
    conversation: _RecordingConversation
    environments: EnvironmentBuilder | None
    watch: LoopWatch

    async def close(self) -> None:
        """``on_chat_end`` (once: the conversation sees to that), then unload the model."""
        try:
            await self.conversation.end()
        finally:
            await self.version.runner.close()
            if self.version.package:
                unload_package(self.version.package)
            if self.environments is not None:
                await self.environments.close()
            self.watch.stop()


class _Problem(NamedTuple):
    text: str
    exception: BaseException | None


class _RecordingConversation(Conversation):
    """The server's conversation, keeping what it logs at ERROR (the model's exceptions
    with their tracebacks, a start that timed out) for the test author. The log line goes
    out as in the server too."""

    __slots__ = ("problems",)

    def __init__(self, version: ModelVersion, outbox: Outbox) -> None:
        super().__init__(version, outbox)
        self.problems: list[_Problem] = []

    def log(self, level: int, message: str, *args: object, exc_info: Any = False) -> None:
        super().log(level, message, *args, exc_info=exc_info)
        if level < logging.ERROR:
            return
        error = _exception(exc_info)
        text = message % args if args else message
        if error is not None:
            text += "\n" + "".join(traceback.format_exception(error)).rstrip()
        self.problems.append(_Problem(text, error))

    def problems_text(self, since: int) -> str:
        return "\n".join(problem.text for problem in self.problems[since:])


def _exception(exc_info: Any) -> BaseException | None:
    if exc_info is True:
        return sys.exc_info()[1]
    if isinstance(exc_info, tuple):
        error = exc_info[1]
        return error if isinstance(error, BaseException) else None
    return exc_info if isinstance(exc_info, BaseException) else None


class _TurnRecorder:
    """The in-memory ``Sink`` a turn's frames go to: parsed as a client parses them."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, cancel_after: int | None, conversation: Conversation
    ) -> None:
        self.cancel_after = cancel_after
        self.conversation = conversation
        self.finished: asyncio.Future[None] = loop.create_future()
        self.record = Turn(None)
        self._cancelling: asyncio.Task[None] | None = None

    async def write(self, data: bytes) -> None:
        self.post(data)
        due = self.cancel_after
        if due and self._cancelling is None and len(self.record.chunks) >= due:
            # As if the client sent cancel now: it lands before the model's next chunk.
            cancel = self.conversation.receive(protocol.CancelTurn())
            self._cancelling = asyncio.get_running_loop().create_task(cancel)
            await asyncio.sleep(0)

    async def write_now(self, data: bytes) -> None:
        self.post(data)

    def post(self, data: bytes) -> None:
        frame = protocol.parse_server_frame(data.decode())
        record = self.record
        if isinstance(frame, protocol.Chunk):
            record.chunks.append(frame.content)
            record.items.append(frame.content)
        elif isinstance(frame, protocol.Event):
            event = Event(frame.name, frame.data)
            record.events.append(event)
            record.items.append(event)
        elif isinstance(frame, protocol.ErrorReport):
            record.errors.append(Error(frame.code, frame.message))
        elif isinstance(frame, protocol.Done):
            record.reason = frame.reason
            if not self.finished.done():
                self.finished.set_result(None)

    def turn(self, number: int | None, problems: list[_Problem]) -> Turn:
        record = self.record
        record.number = number
        record.traceback = "\n".join(problem.text for problem in problems)
        errors = [p.exception for p in problems if p.exception is not None]
        record.exception = errors[-1] if errors else None
        return record


# ---------------------------------------------------------------------- loading
def _read_config(
    directory: Path, overrides: dict[str, Any], secrets: dict[str, str]
) -> tuple[ModelConfig, dict[str, Any]]:
    """config.yaml as the server reads it, with a test's overrides and secrets on top
    (before its secrets are resolved, so an ``{env: VARIABLE}`` entry a test gives a value
    needs no variable)."""
    if not overrides and not secrets:
        return read_config(directory)
    path = directory / CONFIG_FILE
    try:
        raw = load_yaml(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{CONFIG_FILE}: cannot be read: {exc}") from None
    _merge(raw, overrides)
    if secrets:
        entries = raw.get("secrets")
        raw["secrets"] = {**(entries if isinstance(entries, dict) else {}), **secrets}
    resolve_secrets(raw)
    try:
        config = ModelConfig.model_validate(raw)
    except ValidationError as exc:
        raise ModelLoadError(
            f"{CONFIG_FILE} (with config_overrides): {describe_errors(exc)}"
        ) from None
    return config, raw


def _merge(base: dict[str, Any], overrides: Mapping[str, Any]) -> None:
    """``overrides`` into ``base``: mappings key by key, anything else replaces."""
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)


async def _start_worker(placements: Placements, files: ModelFiles) -> StartedModel:
    """The environment built (or reused) and a worker with the model loaded in it, as
    the registry starts an isolated model."""
    try:
        return await placements.start(
            files, lambda runner, reason: log.error("model %s: %s", files.name, reason)
        )
    except (ModelLoadError, asyncio.CancelledError):
        raise
    except Exception as exc:
        raise ModelLoadError(
            f"isolation: starting the model in its environment failed: {type(exc).__name__}: {exc}"
        ) from None


def _version(files: ModelFiles, started: StartedModel) -> ModelVersion:
    return ModelVersion(
        name=files.name,
        directory=files.directory,
        revision=files.revision,
        config=files.config,
        description=files.config.description or started.description,
        runner=started.runner,
        package=started.package,
        loaded_at=time.time(),
    )


def _naming(directory: Path, exc: ModelLoadError) -> ModelLoadError:
    """The registry's error, naming the model directory too; the model's own traceback
    (which the server keeps for its log) goes along as a note."""
    named = ModelLoadError(f"{directory}: {exc.message}", detail=exc.detail)
    for note in getattr(exc, "__notes__", []):
        named.add_note(note)
    if exc.detail:
        named.add_note(exc.detail.rstrip())
    return named


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    """uvloop where it is installed, as the server runs (``run_with_best_loop``)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - non-Linux platforms
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def _wait(future: asyncio.Future[None]) -> None:
    await future
