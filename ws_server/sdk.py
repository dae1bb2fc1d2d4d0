"""The model author's API: subclass ``AnythingBaseModel`` in your model's ``main.py``.

Standard library only: isolated workers import this module from their own virtualenv,
which has none of the server's dependencies.
"""

from __future__ import annotations

import contextvars
import inspect
import itertools
import json
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar

__version__ = "0.1.0"

__all__ = [
    "AnythingBaseModel",
    "EventError",
    "Message",
    "Step",
    "__version__",
    "context_snapshot",
]

CONTEXT_SNAPSHOT_LIMIT = 64 * 1024  # bytes of JSON kept of a session's context
EVENT_LIMIT = 64 * 1024  # bytes of JSON an event's data may take
TURN_EVENTS_LIMIT = 4 * 1024 * 1024  # bytes of events one turn may send (a flood is refused)
STEP_STATUSES = ("running", "done", "error")

_log = logging.getLogger("anything_agent.model")
# The step the running code is inside of (per task, and per thread a plain generator's
# steps run in): what a new step's parent is.
_CURRENT_STEP: contextvars.ContextVar[Step | None] = contextvars.ContextVar(
    "anything_agent_step", default=None
)

EventSink = Callable[[str, dict[str, Any]], None]
"""Where a turn's events go (the runner sets it for the turn): name, data."""


class EventError(ValueError):
    """An event the server cannot send: its data is not JSON, or over 64 KiB, or it was
    emitted outside a turn, or a step was closed twice. The turn goes on."""


def _as_json(value: Any) -> Any:
    """A step's input or output as JSON: as it is when it is JSON, else its text."""
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError, RecursionError):
        return str(value)


class Step:
    """One step of what a model does (a tool call, a search, a sub-task), reported as a
    ``step`` event when it starts and when it ends. Use it as a context manager::

        with self.step("search", input=query) as step:
            step.output = search(query)

    It ends ``done``, or ``error`` when the block raised. Steps opened inside it are its
    children (``parent_id``): inside it as the code runs, so tools run at once with
    ``asyncio.gather`` are siblings, each the parent of its own steps."""

    def __init__(self, model: AnythingBaseModel, name: str, input: Any, parent: str | None):
        self._model = model
        self._token: contextvars.Token[Step | None] | None = None
        self.id = f"step-{next(model._step_ids)}"
        self.parent_id = parent
        self.name = name
        self.input = input
        self.output: Any = None
        self.status = "running"

    def _report(self) -> None:
        self._model.emit(
            "step",
            id=self.id,
            parent_id=self.parent_id,
            name=self.name,
            status=self.status,
            input=_as_json(self.input),
            output=_as_json(self.output),
        )

    def open(self) -> Step:
        self._report()  # first: a step that could not be reported is nobody's parent
        self._model._open_steps.append(self)
        self._token = _CURRENT_STEP.set(self)
        return self

    def close(self, status: str = "done") -> None:
        """End the step (``done`` or ``error``); a step ends once."""
        if status not in ("done", "error"):
            raise self._model._refused(f"a step ends done or error, not {status!r}")
        if self.status != "running":
            raise self._model._refused(
                f"step {self.name!r} ({self.id}) is already closed ({self.status})"
            )
        self.status = status
        if self in self._model._open_steps:
            self._model._open_steps.remove(self)
        token, self._token = self._token, None
        if token is not None:
            try:
                _CURRENT_STEP.reset(token)
            except ValueError:  # closed from another task than the one it opened in
                pass
        self._report()

    def __enter__(self) -> Step:
        return self.open()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if self.status == "running":
            self.close("error" if kind is not None else "done")

    async def __aenter__(self) -> Step:
        return self.open()

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.__exit__(kind, error, trace)


Message = dict[str, Any]
"""One chat message: ``{"role": "user" | "assistant" | "system", "content": "..."}``.

``content`` is always a string. A message whose client sent a list of content parts
holding more than text (an image, a file) also has them, as sent, under ``parts``."""


def context_snapshot(context: dict[Any, Any]) -> dict[str, Any]:
    """The part of ``self.context`` that can move to another node: every entry whose key is
    a string and whose value is JSON, as long as the whole stays under 64 KiB (entries
    past that are left out). A client object or an open file stays behind."""
    kept: dict[str, Any] = {}
    size = 2
    for key, value in list(context.items()):
        if not isinstance(key, str):
            continue
        try:
            text = json.dumps(value)
        except (TypeError, ValueError, RecursionError):
            continue
        size += len(key) + len(text) + 4
        if size > CONTEXT_SNAPSHOT_LIMIT:
            break
        kept[key] = json.loads(text)
    return kept


class AnythingBaseModel:
    """Base class of every model.

    The server creates one instance per chat session, so ``self.context`` and the hooks
    belong to that conversation. Work that should happen once per model version rather
    than once per session (loading weights, building an index) goes in the class method
    ``load_resources``; its return value is available to every session as
    ``self.resources``.

    Hooks, in the order the server calls them:

    * ``on_chat_start()`` once, when a client connects;
    * ``on_chat_messages(messages)`` once per user turn, yielding the reply in chunks;
    * ``on_chat_end()`` exactly once, when the connection goes, whatever the cause.
    """

    config: dict[str, Any]
    """The model's parsed ``config.yaml`` (an empty dict when there is none)."""
    model_dir: Path
    """The model's directory."""
    data_dir: Path
    """``model_dir / "data"``: data files the model reads (vocabularies, weights)."""
    resources: Any
    """What ``load_resources`` returned for this model version (``None`` by default)."""
    context: dict[str, Any]
    """Per-session scratch space; ``clear_context()`` empties it."""
    params: dict[str, Any]
    """The client's parameters for the running turn (``temperature``, ``max_tokens``, ...
    or anything the client chose); set before each ``on_chat_messages``, ``{}`` when the
    client sent none."""

    _anything_bound: ClassVar[bool] = False
    _event_sink: EventSink | None = None  # set by the runner while a turn runs
    _open_steps: list[Step]
    _step_ids: itertools.count[int]
    _event_bytes: int = 0  # this turn's, so far

    def __init__(self) -> None:
        # Subclasses may define __init__(self) and call super().__init__(); the
        # attributes bound by the server before __init__ must survive that call.
        if not hasattr(self, "context"):
            self.context = {}
        if not hasattr(self, "config"):
            self.config = {}
        if not hasattr(self, "resources"):
            self.resources = None
        if not hasattr(self, "params"):
            self.params = {}
        if not hasattr(self, "_open_steps"):
            self._open_steps = []
            self._step_ids = itertools.count(1)

    # ----------------------------------------------------------------- per version
    @classmethod
    def load_resources(cls, model_dir: Path, config: dict[str, Any]) -> Any:
        """Load what every session of this model version shares; runs once per version.

        Override it (sync or ``async``) to read weights or build an index from
        ``model_dir / "data"``; the return value becomes ``self.resources``. It runs when
        the model is loaded or reloaded, never per session. An exception here marks the
        model ``failed`` with the exception's message.
        """
        return None

    # ----------------------------------------------------------------- per session
    async def on_chat_start(self) -> None:
        """Called once when a chat session opens, before the first turn."""

    def on_chat_messages(self, messages: list[Message]) -> AsyncIterator[str] | Iterator[str]:
        """Yield the reply to ``messages`` (the whole history, last one the user's).

        Implement it as an ``async`` generator yielding text chunks; each chunk reaches
        the client as its own frame the moment it is yielded. A plain generator (run off
        the event loop) and a coroutine returning one whole string also work.
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement on_chat_messages")

    async def on_chat_end(self) -> None:
        """Called exactly once when the session ends: client left, server stopped, or error."""

    def clear_context(self) -> None:
        """Forget everything stored in ``self.context`` for this session."""
        self.context.clear()

    # ----------------------------------------------------------------- events
    def emit(self, name: str, /, **data: Any) -> None:
        """Report something besides text during a turn: the client gets an ``event``
        frame named ``name`` with ``data`` (JSON, at most 64 KiB), in order with the
        chunks yielded. ``EventError`` when it can't be sent; the turn goes on."""
        sink = self._event_sink
        if sink is None:
            raise self._refused("events can be sent only while on_chat_messages runs")
        if not isinstance(name, str) or not name or len(name) > 64:
            raise self._refused("an event's name is a string of 1 to 64 characters")
        if name == "queued":
            raise self._refused('"queued" is the server\'s event (a turn waiting for a slot)')
        try:
            text = json.dumps(data, ensure_ascii=False, allow_nan=False)
            size = len(text.encode())
        except (TypeError, ValueError, RecursionError) as exc:
            raise self._refused(f"event {name!r}: its data is not JSON ({exc})") from None
        if size > EVENT_LIMIT:
            raise self._refused(f"event {name!r}: its data takes {size} bytes, over {EVENT_LIMIT}")
        self._event_bytes += size
        if self._event_bytes > TURN_EVENTS_LIMIT:
            raise self._refused(
                f"this turn's events take over {TURN_EVENTS_LIMIT} bytes: no more are sent"
            )
        # A copy, as checked: a model that changes its data after emit (a plain generator
        # emits from its thread, sent on the loop later) can't change what goes out.
        sink(name, json.loads(text))

    def _refused(self, problem: str) -> EventError:
        """The error for an event that can't be sent, logged with the model's name (the
        model may catch it, and the turn goes on)."""
        where = getattr(self, "model_dir", None)
        _log.warning("model %s: %s", where.name if where else type(self).__name__, problem)
        return EventError(problem)

    def status(self, text: str) -> None:
        """A one-line progress note ("searching the docs..."): a ``status`` event."""
        self.emit("status", text=str(text))

    def step(self, name: str, input: Any = None) -> Step:
        """A step of the turn, to use with ``with`` (or ``async with``): reported running
        when it starts, and done (or error) with its ``output`` when it ends."""
        current = _CURRENT_STEP.get()
        running = current is not None and current._model is self and current.status == "running"
        return Step(self, str(name), input, current.id if running and current else None)

    def _begin_turn(self, sink: EventSink | None) -> None:
        """The runner: a turn starts, its events going to ``sink``."""
        self._event_sink = sink
        if self._open_steps:  # (allocations per turn only when steps were used)
            self._open_steps = []
        if self._event_bytes:
            self._step_ids = itertools.count(1)
            self._event_bytes = 0

    def _end_turn(self) -> None:
        """The runner: the turn is over; steps left open end as ``error``."""
        if self._open_steps:
            for step in reversed(list(self._open_steps)):
                try:
                    step.close("error")
                except EventError:
                    pass
        self._event_sink = None

    # ----------------------------------------------------------------- framework
    @classmethod
    def description(cls) -> str:
        """The class docstring, cleaned: what the model list shows without a config one."""
        doc = cls.__doc__
        if doc is None or cls.__doc__ == AnythingBaseModel.__doc__:
            return ""
        return inspect.cleandoc(doc)

    @classmethod
    def create_session_instance(
        cls, *, config: dict[str, Any], model_dir: Path, resources: Any
    ) -> AnythingBaseModel:
        """Make the instance for one session with its attributes bound before ``__init__``.

        Binding first means a subclass ``__init__`` can already read ``self.config`` and
        ``self.data_dir``, and one that never calls ``super().__init__()`` still works.
        """
        instance = cls.__new__(cls)
        instance.config = config
        instance.model_dir = model_dir
        instance.data_dir = model_dir / "data"
        instance.resources = resources
        instance.context = {}
        instance.params = {}
        instance._open_steps = []
        instance._step_ids = itertools.count(1)
        instance.__init__()  # type: ignore[misc]
        return instance
