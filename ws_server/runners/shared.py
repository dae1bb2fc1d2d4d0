"""Shared mode: the model runs inside the server process, one instance per session.

The adapter here is forgiving the way model authors expect: ``on_chat_messages`` may be an
async generator (the documented form), a plain generator (run in a thread so it cannot
block the event loop), or a function or coroutine returning one whole string.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
import inspect
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, Final

from ws_server.sdk import AnythingBaseModel, EventSink, Message, context_snapshot

# Blocking model code (sync generators and hooks) runs here, off the event loop.
MODEL_THREADS: Final = concurrent.futures.ThreadPoolExecutor(
    max_workers=64, thread_name_prefix="model"
)
_END: Final = object()


class SharedRunner:
    """Creates a fresh model instance per session from one loaded version's class."""

    mode = "shared"
    placement: str | None = None  # not isolated: it runs in the server process
    sandbox: dict[str, Any] | None = None  # no sandbox: it runs in the server

    def __init__(
        self,
        model_class: type[AnythingBaseModel],
        config: dict[str, Any],
        model_dir: Path,
        resources: Any,
    ) -> None:
        self.model_class = model_class
        self.config = config
        self.model_dir = model_dir
        self.resources = resources

    def open_session(self) -> SharedSession:
        instance = self.model_class.create_session_instance(
            config=self.config, model_dir=self.model_dir, resources=self.resources
        )
        return SharedSession(instance)

    async def close(self) -> None:
        """Nothing to stop: the model's code lives and dies with the server process."""


class SharedSession:
    """One model instance driven in-process."""

    __slots__ = ("_events", "_sink", "model")

    def __init__(self, model: AnythingBaseModel) -> None:
        self.model = model
        self._events: EventSink | None = None  # the last turn's events, and their sink
        self._sink: EventSink = _dropped

    def _event_sink(self, events: EventSink | None) -> EventSink:
        """``events`` as the model's turn calls them (``_on_loop``), made once per session:
        a conversation passes the same callback every turn."""
        if events is None:
            return _dropped
        if events != self._events:
            self._events, self._sink = events, _on_loop(events)
        return self._sink

    async def start(self, context: dict[str, Any] | None = None) -> None:
        await call_hook(self.model.on_chat_start)
        if context:  # a session moved here from another node: what it had carries on
            self.model.context.update(context)

    def snapshot(self) -> dict[str, Any]:
        return context_snapshot(self.model.context)

    async def end(self) -> None:
        await call_hook(self.model.on_chat_end)

    async def stream(
        self,
        messages: list[Message],
        snapshot: bool = False,
        params: dict[str, Any] | None = None,
        events: EventSink | None = None,
    ) -> AsyncIterator[str]:
        model = self.model
        model.params = params if params is not None else {}  # this turn's, never the last's
        model._begin_turn(self._event_sink(events))
        chunks: Any = None  # the model's chunks: an async generator, however written
        try:
            method: Callable[..., Any] = model.on_chat_messages
            kind = kind_of(method)
            if kind is ASYNC_GENERATOR:
                chunks = method(messages)
            elif kind is GENERATOR:
                chunks = _iterate_in_thread(method(messages))
            elif kind is COROUTINE:
                chunks = _whole_reply(await method(messages))
            else:
                result = await asyncio.get_running_loop().run_in_executor(
                    MODEL_THREADS, method, messages
                )
                chunks = _whole_reply(result)
            async for chunk in chunks:
                if not isinstance(chunk, str):
                    raise TypeError(
                        f"on_chat_messages yielded {type(chunk).__name__}; chunks must be str"
                    )
                if chunk:
                    yield chunk
        finally:
            try:
                if chunks is not None:  # runs the model's finally blocks on cancel and timeout
                    await chunks.aclose()
            finally:
                model._end_turn()  # steps left open end as error, before done


ASYNC_GENERATOR: Final = "async generator"
GENERATOR: Final = "generator"
COROUTINE: Final = "coroutine"
FUNCTION: Final = "function"


def kind_of(method: Callable[..., Any]) -> str:
    """How ``on_chat_messages`` is written: looked up once per function, not per turn."""
    function = getattr(method, "__func__", method)
    try:
        return _kind(function)
    except TypeError:  # an unhashable callable object
        return _kind.__wrapped__(function)


@functools.lru_cache(maxsize=1024)
def _kind(function: Callable[..., Any]) -> str:
    if inspect.isasyncgenfunction(function):
        return ASYNC_GENERATOR
    if inspect.isgeneratorfunction(function):
        return GENERATOR
    if inspect.iscoroutinefunction(function):
        return COROUTINE
    return FUNCTION


def _on_loop(events: EventSink) -> EventSink:
    """``events``, called on the event loop whichever thread the model emits from (a plain
    generator runs in a pool thread): in order with the chunks, which cross the same way."""
    loop = asyncio.get_running_loop()
    owner = threading.get_ident()

    def emitted(name: str, data: dict[str, Any]) -> None:
        if threading.get_ident() == owner:
            events(name, data)
        else:
            loop.call_soon_threadsafe(events, name, data)

    return emitted


def _dropped(name: str, data: dict[str, Any]) -> None:
    """Events of a turn nobody listens to (a caller that passed no sink)."""


async def call_hook(hook: Callable[[], Any]) -> None:
    """Await an async hook; run a plain one in a thread so it cannot block the loop."""
    if inspect.iscoroutinefunction(hook):
        await hook()
        return
    result = await asyncio.get_running_loop().run_in_executor(MODEL_THREADS, hook)
    if inspect.isawaitable(result):
        await result


async def _whole_reply(result: Any) -> AsyncIterator[Any]:
    """What a non-generator ``on_chat_messages`` returned, as a stream of chunks."""
    if inspect.isawaitable(result):
        result = await result
    if result is None:
        return
    if isinstance(result, str):
        yield result
    elif inspect.isasyncgen(result):
        try:
            async for chunk in result:
                yield chunk
        finally:
            await result.aclose()
    elif inspect.isgenerator(result):
        async for chunk in _iterate_in_thread(result):
            yield chunk
    else:
        raise TypeError(
            f"on_chat_messages returned {type(result).__name__}; yield str chunks or return one str"
        )


async def _iterate_in_thread(generator: Iterator[Any]) -> AsyncIterator[Any]:
    """Drive a blocking generator from the pool, one ``next()`` per chunk.

    When the consumer stops early (cancel, timeout, disconnect), a step already running
    cannot be interrupted: closing waits for it, then closes the generator in the pool so
    its ``finally`` runs there, before the turn counts as over. So ``on_chat_end`` and the
    next turn never overlap a step of this one.
    """
    loop = asyncio.get_running_loop()
    # Every step of the generator runs in one context of its own (a pool thread's would
    # carry over from whatever ran there before): the model's steps nest as written.
    context = contextvars.copy_context()
    step: concurrent.futures.Future[Any] | None = None
    try:
        while True:
            step = MODEL_THREADS.submit(context.run, _advance, generator)
            item = await asyncio.wrap_future(step, loop=loop)
            step = None
            if item is _END:
                return
            yield item
    finally:
        running = step

        def finish() -> None:
            if running is not None:
                concurrent.futures.wait([running])
            close = getattr(generator, "close", None)
            if close is not None:
                context.run(close)

        await asyncio.wrap_future(MODEL_THREADS.submit(finish), loop=loop)


def _advance(generator: Iterator[Any]) -> Any:
    """The generator's next item, or ``_END`` once it is done."""
    return next(generator, _END)
