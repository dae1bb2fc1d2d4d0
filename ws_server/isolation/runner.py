"""Isolated mode: the model runs in a long-lived worker (a local process, or a Ray actor)
with its own environment and limits; sessions are multiplexed over one worker link.

The runner starts workers through its link factory (``link.py``), routes their messages to
sessions, applies flow control, replaces a worker that dies (with backoff) and gives up
after repeated crashes. Each session re-runs ``on_chat_start`` in a new worker before its
next turn, with its history intact (the history lives in the server's session).
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Final

from ws_server import metrics
from ws_server.exceptions import ModelFailed, ModelLoadError, ResourceExhausted, WorkerCrashed
from ws_server.isolation import history_sync
from ws_server.isolation.link import LinkEnd, LinkFactory, WorkerLink, WorkerSpec
from ws_server.isolation.messages import (
    Cancel,
    Chunks,
    Emitted,
    End,
    Ended,
    LoadFailed,
    Pause,
    Ping,
    Pong,
    Ready,
    Resume,
    ServerMessage,
    Start,
    Started,
    Turn,
    TurnEnd,
    WorkerMessage,
)
from ws_server.sdk import EVENT_LIMIT, EventSink, Message

log = logging.getLogger("anything_agent.isolated")

CRASH_LIMIT: Final = 5
CRASH_WINDOW: Final = 60.0
LOAD_TIMEOUT: Final = 300.0
STOP_TIMEOUT: Final = 5.0
# A stopped turn's generator gets this long to close in the worker (shorter than the
# session's own cleanup limit, so this check always gets to run). If the worker's event
# loop then does not answer a ping, the worker is wedged and is replaced; if it answers,
# a blocking step in a thread is still running and the turn is left to finish there.
CLEANUP_LIMIT: Final = 5.0
PING_TIMEOUT: Final = 2.0
# Bytes of chunks queued for one session: above HIGH the worker is asked to pause that
# session's generator, below LOW to resume. Memory stays bounded when a client reads slowly.
QUEUE_HIGH: Final = 1024 * 1024
QUEUE_LOW: Final = 256 * 1024
# A worker that keeps sending after "pause" ignores flow control (a hostile model writing
# to the channel itself): past this much queued for one session, it is stopped.
QUEUE_HARD_LIMIT: Final = 16 * 1024 * 1024


@dataclass(frozen=True)
class _Run:
    """A run of chunks the worker sent together, each still yielded as its own."""

    texts: list[str]
    size: int  # characters of them all, counted for flow control


@dataclass(frozen=True)
class _Event:
    """Something the model emitted, in its place among the turn's chunks."""

    name: str
    data: dict[str, Any]
    size: int  # bytes of its data, counted with the chunks' for flow control


@dataclass(frozen=True)
class _Crash:
    """Queued to a session whose turn was running when its worker died."""

    reason: str
    memory: bool = False  # the kernel killed it for going past its memory limit


_Item = _Run | _Event | TurnEnd | _Crash  # what a running turn's queue holds
_ANSWERS: Final = (Started, Ended, Pong)  # replies a session waits for, by their type


class IsolatedRunner:
    """Runs one model version in a worker, through links made by ``links``; makes an
    ``IsolatedSession`` per chat."""

    mode = "isolated"

    def __init__(
        self, spec: WorkerSpec, links: LinkFactory, on_failed: Callable[[str], None]
    ) -> None:
        self.spec = spec
        self.name = spec.name
        self.links = links
        self.placement: str | None = links.kind
        self.on_failed = on_failed
        self.generation = 0
        self.failed: str | None = None
        self.description = ""
        self.sessions: dict[str, IsolatedSession] = {}
        self._link: WorkerLink | None = None
        self.sandbox: dict[str, Any] | None = None  # the listing's "sandbox" field
        self._ready: asyncio.Future[None] | None = None
        self._loading: int | None = None  # the generation loading its model right now
        self._exiting: int | None = None  # a generation that said it exits (memory limit)
        self._crashes: collections.deque[float] = collections.deque()
        self._closing = False
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def alive(self) -> bool:
        """A worker is (or is about to be) serving: not failed, not stopping."""
        return self.failed is None and not self._closing

    @property
    def serving(self) -> bool:
        """The current worker is up and not on its way out (a planned memory exit)."""
        return self.alive and self._exiting != self.generation

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Start the first worker and wait until the model has loaded in it."""
        await self._spawn()

    async def _spawn(self) -> None:
        self.generation += 1
        generation = self.generation
        if self._ready is None or self._ready.done():  # else requests already wait on it
            self._ready = self._new_ready()
        self._loading = generation
        link = self.links.link(
            self.spec,
            lambda message: self.receive(message, generation),
            lambda end: self._link_ended(end, generation),
        )
        self._link = link
        await link.open()
        self.sandbox = link.sandbox
        if self._closing:  # close() ran while we were starting it
            await link.close()
            return
        ready = self._ready
        try:
            await asyncio.wait_for(asyncio.shield(ready), LOAD_TIMEOUT)
        except TimeoutError:
            self.kill_worker()
            raise ModelLoadError(
                f"main.py: the worker did not load within {LOAD_TIMEOUT:g} s"
            ) from None
        log.info(
            "model %s: %s ready (generation %d, %s; limits: %s)",
            self.name,
            link.label,
            generation,
            "sandboxed" if link.sandbox.get("bubblewrap") else "not sandboxed",
            link.sandbox.get("limits"),
        )

    @staticmethod
    def _new_ready() -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # Waiters see the exception; nobody waiting is normal, not worth a warning.
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        return future

    def _track(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _link_ended(self, end: LinkEnd, generation: int) -> None:
        """A worker ended by itself or was killed (not by ``close``)."""
        if self._closing or generation != self.generation:
            return
        ready = self._ready
        if self._loading == generation:  # it never said Ready: its start fails, no crash
            if ready is not None and not ready.done():
                ready.set_exception(
                    ModelLoadError(
                        f"main.py: the worker exited while loading the model ({end.reason})"
                    )
                )
            return
        # A memory kill during a turn is that turn's breach; one with no turn running (the
        # model's own background work) counts as a crash: a model that keeps doing it is
        # backed off and, at the crash limit, failed rather than restarted for ever.
        planned = self._exiting == generation or (end.memory and self._turn_running())
        self._crashed(end.reason, counted=not planned, memory=end.memory)

    def _crashed(self, reason: str, counted: bool = True, memory: bool = False) -> None:
        """A worker died: tell its sessions, then restart it (with backoff) or give up.
        One the kernel killed for memory is a breach, not a crash (``counted`` False)."""
        (log.error if counted else log.info)("model %s: worker exited (%s)", self.name, reason)
        for session in self.sessions.values():
            session.worker_died(reason, memory=memory)
        if self._ready is None or self._ready.done():
            self._ready = self._new_ready()
        delay = 0.0
        if counted:
            now = time.monotonic()
            self._crashes.append(now)
            while self._crashes and now - self._crashes[0] > CRASH_WINDOW:
                self._crashes.popleft()
            if len(self._crashes) >= CRASH_LIMIT:
                self.failed = (
                    f"crashed {CRASH_LIMIT} times in {CRASH_WINDOW:g} s; last exit: {reason}"
                )
                log.error("model %s: %s; not restarting", self.name, self.failed)
                self._ready.set_exception(ModelLoadError(self.failed))
                self.on_failed(self.failed)
                return
            delay = min(0.1 * 2 ** (len(self._crashes) - 1), 5.0)
        self._track(self._restart(delay))

    async def _restart(self, delay: float) -> None:
        await asyncio.sleep(delay)
        if self._closing:
            return
        metrics.WORKER_RESTARTS.labels(model=self.name).inc()
        try:
            await self._spawn()
        except ModelLoadError as exc:
            self._crashed(exc.message)
        except Exception as exc:  # the env vanished, no file handles...: still a crash
            log.exception("model %s: restarting the worker failed", self.name)
            self._crashed(f"restart failed: {type(exc).__name__}: {exc}")

    async def ensure_running(self) -> int:
        """Wait until a worker is ready (restarts included); its generation."""
        if self.failed is not None:
            raise WorkerCrashed(f"the model's worker keeps crashing: {self.failed}")
        if self._closing:
            raise WorkerCrashed("the model's worker is stopping")
        assert self._ready is not None
        try:
            await asyncio.shield(self._ready)
        except ModelLoadError as exc:
            raise WorkerCrashed(f"the model's worker could not restart: {exc.message}") from None
        return self.generation

    def _turn_running(self) -> bool:
        return any(session.turn_running for session in self.sessions.values())

    def _breached(self, since: int) -> bool:
        return self._link is not None and self._link.memory_breached(since)

    def oom_kills(self) -> int:
        """Memory kills in the current worker so far (a turn's starting mark)."""
        return self._link.oom_kills() if self._link is not None else 0

    def kill_worker(self) -> None:
        """Kill the current worker; requests wait for its replacement from now on."""
        if self._link is not None:
            self._link.kill()
            if self._ready is not None and self._ready.done():
                self._ready = self._new_ready()

    async def close(self) -> None:
        """Stop the worker (after the sessions on it have ended)."""
        self._closing = True
        for session in list(self.sessions.values()):
            session.worker_died("the worker is stopping")
        if self._link is not None:
            await self._link.close()
        for task in list(self._tasks):
            task.cancel()
        log.info("model %s: worker stopped", self.name)

    # ------------------------------------------------------------------ link
    def send(self, message: ServerMessage) -> None:
        if self._link is not None:
            self._link.send(message)

    def receive(self, message: WorkerMessage, generation: int) -> None:
        """A message from the worker of ``generation``; those of a worker already replaced
        are dropped."""
        if generation != self.generation:
            return
        if isinstance(message, Ready):
            self.description = message.description
            self._loading = None
            if self._ready is not None and not self._ready.done():
                self._ready.set_result(None)
            return
        if isinstance(message, LoadFailed):
            if self._ready is not None and not self._ready.done():
                self._ready.set_exception(ModelLoadError(message.message, detail=message.detail))
            return
        session = self.sessions.get(message.sid)
        if isinstance(message, TurnEnd):
            if (
                session is not None
                and message.outcome != "resource_exhausted"
                and self._breached(session.oom_mark)
            ):
                # One of the worker's processes was killed for memory during this turn: the
                # turn is a breach, and the worker is replaced (its state is not to be
                # trusted). A kill before the turn began is not blamed on it.
                message = message._replace(
                    outcome="resource_exhausted", detail="killed for memory by the kernel"
                )
                self.kill_worker()
            if message.outcome == "resource_exhausted" and self._exiting != generation:
                # The worker exits right after this message: from now on, requests wait
                # for its replacement, and the exit is a planned one, not a crash.
                self._exiting = generation
                if self._ready is not None and self._ready.done():
                    self._ready = self._new_ready()
        if session is not None:
            session.receive(message)

    def open_session(self) -> IsolatedSession:
        session = IsolatedSession(self, uuid.uuid4().hex)
        self.sessions[session.sid] = session
        return session


class IsolatedSession:
    """One conversation's model instance living in the worker."""

    def __init__(self, runner: IsolatedRunner, sid: str) -> None:
        self.runner = runner
        self.sid = sid
        # The worker (generation) that runs this session's on_chat_start; None once it died.
        self._sent_start_to: int | None = None
        self._replies: dict[type, asyncio.Future[Any]] = {}  # by the answer's type
        self._queue: asyncio.Queue[_Item] | None = None
        self._queued_bytes = 0
        self._paused = False
        self._overrun = False
        self._turn_id = 0  # numbers this session's turns on the channel
        self.oom_mark = 0  # the worker group's memory kills when the running turn began
        self._context: dict[str, Any] = {}  # the snapshot the last turn_end carried
        # The history the worker holds for this session, as last sent (None: none there).
        self._held: list[Message] | None = None

    # ------------------------------------------------------------------ from the worker
    def receive(self, message: WorkerMessage) -> None:
        if isinstance(message, Chunks):
            queue = self._queue
            if message.turn_id == self._turn_id and queue is not None and not self._overrun:
                run = _Run(message.texts, sum(map(len, message.texts)))
                queue.put_nowait(run)
                self._queued(run.size)
        elif isinstance(message, Emitted):
            if message.turn_id != self._turn_id:
                return  # from a turn already given up on (it was wedged, then replaced)
            event = _checked_event(self.runner.name, message)
            if event is not None and self._queue is not None and not self._overrun:
                self._queue.put_nowait(event)
                self._queued(event.size)
        elif isinstance(message, TurnEnd):
            if message.turn_id != self._turn_id:
                return
            if message.context is not None:
                self._context = message.context
            if self._queue is not None:
                self._queue.put_nowait(message)
        elif isinstance(message, _ANSWERS):
            reply = self._replies.pop(type(message), None)
            if reply is not None and not reply.done():
                reply.set_result(message)

    def _queued(self, size: int) -> None:
        """``size`` more bytes wait for the session: past QUEUE_HIGH the worker is asked to
        pause; past the hard limit it ignored that, and is stopped."""
        self._queued_bytes += size
        if not self._paused and self._queued_bytes > QUEUE_HIGH:
            self._paused = True
            self.runner.send(Pause(self.sid))
        elif self._queued_bytes > QUEUE_HARD_LIMIT:
            log.error(
                "model %s: the worker ignored flow control (%d bytes queued); stopping it",
                self.runner.name,
                self._queued_bytes,
            )
            self._overrun = True  # what else it sends is dropped; its death ends
            self.runner.kill_worker()  # the turn with model_crashed

    @property
    def turn_running(self) -> bool:
        return self._queue is not None

    def worker_died(self, reason: str, memory: bool = False) -> None:
        self._sent_start_to = None  # nothing of this session lives on in any worker
        self._held = None
        if self._queue is not None:
            self._queue.put_nowait(_Crash(reason, memory))
        for reply in self._replies.values():
            if not reply.done():
                reply.set_exception(WorkerCrashed(reason))
        self._replies.clear()

    async def _request(self, message: ServerMessage, answer: type[Any]) -> Any:
        """Send ``message`` and wait for the worker's answer of type ``answer``."""
        reply = asyncio.get_running_loop().create_future()
        self._replies[answer] = reply
        self.runner.send(message)
        return await reply

    # ------------------------------------------------------------------ ModelSession
    async def start(self, context: dict[str, Any] | None = None) -> None:
        generation = await self.runner.ensure_running()
        self._sent_start_to = generation
        self._held = None  # a new instance there: it holds no history yet
        started = await self._request(Start(self.sid, context), Started)
        if started.error:
            raise ModelFailed(f"on_chat_start raised in the worker:\n{started.error}")

    async def end(self) -> None:
        try:
            if self._sent_start_to == self.runner.generation and self.runner.serving:
                try:
                    ended = await asyncio.wait_for(
                        self._request(End(self.sid), Ended), STOP_TIMEOUT
                    )
                except WorkerCrashed:
                    return  # its instance died with the worker: nothing left to end
                if ended.error:
                    raise ModelFailed(f"on_chat_end raised in the worker:\n{ended.error}")
        finally:
            self.runner.sessions.pop(self.sid, None)

    def snapshot(self) -> dict[str, Any]:
        return self._context

    async def stream(
        self,
        messages: list[Message],
        snapshot: bool = False,
        params: dict[str, Any] | None = None,
        events: EventSink | None = None,
    ) -> AsyncIterator[str]:
        if self._sent_start_to != await self.runner.ensure_running():
            await self.start()  # a new worker: on_chat_start runs again there
        queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._queue, self._queued_bytes, self._paused = queue, 0, False
        self._overrun = False
        self._turn_id += 1
        self.oom_mark = self.runner.oom_kills()
        change = history_sync.delta(self._held, messages)
        self._held = messages  # a list of the session's own for this turn: never changed
        self.runner.send(Turn(self.sid, self._turn_id, *change, snapshot, params))
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, _Run):
                    # Counted off as a whole (a run is at most the worker's 256 KiB batch):
                    # bookkeeping per chunk was a twentieth of an isolated stream's time.
                    self._queued_bytes -= item.size
                    if self._paused and self._queued_bytes < QUEUE_LOW:
                        self._paused = False
                        self.runner.send(Resume(self.sid))
                    for text in item.texts:
                        yield text
                    continue
                if isinstance(item, _Event):
                    self._queued_bytes -= item.size
                    if events is not None:
                        events(item.name, item.data)
                    continue
                finished = True
                self._raise_for(item)
                return
        finally:
            if not finished:
                await self._cancel_in_worker(queue, events)
            self._queue = None

    async def _cancel_in_worker(
        self, queue: asyncio.Queue[_Item], events: EventSink | None
    ) -> None:
        """Stopped early (cancel, timeout, client gone): close the generator in the worker
        and wait until its ``finally`` has run there (what it emits meanwhile, such as its
        steps closing as ``error``, still goes out); a wedged worker gets replaced."""
        self.runner.send(Cancel(self.sid, self._turn_id))
        if self._paused:
            self.runner.send(Resume(self.sid))

        async def turn_over() -> None:
            while not isinstance(item := await queue.get(), (TurnEnd, _Crash)):
                if isinstance(item, _Event) and events is not None:
                    events(item.name, item.data)

        try:
            await asyncio.wait_for(turn_over(), CLEANUP_LIMIT)
        except TimeoutError:
            if not await self._worker_responds():
                log.error(
                    "model %s: worker unresponsive after cancelling a turn; replacing it",
                    self.runner.name,
                )
                self.runner.kill_worker()
        except asyncio.CancelledError:
            self.runner.kill_worker()  # stopped while waiting: never leave it wedged
            raise

    async def _worker_responds(self) -> bool:
        try:
            await asyncio.wait_for(self._request(Ping(self.sid), Pong), PING_TIMEOUT)
        except (TimeoutError, WorkerCrashed):
            return False
        return True

    def _raise_for(self, end: TurnEnd | _Crash) -> None:
        if isinstance(end, _Crash) and end.memory:
            raise ResourceExhausted(
                f"the turn went past the model's memory limit ({self.runner.spec.memory_text}); "
                "its worker is being replaced"
            )
        if isinstance(end, _Crash):
            raise WorkerCrashed(
                "the model's worker crashed; a new one is starting, send your message again"
            )
        if end.outcome == "error":
            raise ModelFailed(f"on_chat_messages raised in the worker:\n{end.detail}")
        if end.outcome == "resource_exhausted":
            limit = self.runner.spec.memory_text or "its limit"
            raise ResourceExhausted(
                f"the turn went past the model's memory limit ({limit}); "
                "its worker is being replaced"
            )


def _checked_event(model: str, message: Emitted) -> _Event | None:
    """An event from a worker, if it is one the SDK would have sent (a model writing to
    the channel itself gets its malformed events dropped, and a log line)."""
    name, data = message.name, message.data
    try:
        name.encode()
        size = len(json.dumps(data, ensure_ascii=False, allow_nan=False).encode())
    except (TypeError, ValueError, RecursionError):  # lone surrogates, NaN, depth
        size = EVENT_LIMIT + 1
    if 0 < len(name) <= 64 and name != "queued" and size <= EVENT_LIMIT:
        return _Event(name, data, size)
    log.warning("model %s: dropped a malformed event from its worker", model)
    return None
