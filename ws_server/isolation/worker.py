"""The isolated worker: runs one model version inside its own environment.

It loads the model exactly as shared mode does (``registry/loader.py``, then the same
forgiving adapter of ``runners/shared.py``), then serves any number of sessions, driven by
the typed messages of ``messages.py``. What carries them is an ``Outlet``: the framed socket
of a local worker process (``Channel`` here, started by ``local_link.py`` with the
environment's interpreter) or a Ray actor's calls (``ray_actor.py``). Standard library
only: the server's dependencies are not here.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import socket
import sys
import traceback
from pathlib import Path
from typing import Any, Protocol, cast

from ws_server.exceptions import ModelLoadError
from ws_server.isolation import history_sync, ipc
from ws_server.isolation.messages import (
    Cancel,
    Chunks,
    Config,
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
from ws_server.runners.shared import SharedRunner, SharedSession

# Outcome sent when a turn allocates past the worker's memory limit; the worker exits
# afterwards (its heap may be in any state) and the server starts a new one.
RESOURCE_EXHAUSTED = "resource_exhausted"
EXIT_MEMORY = 70
BATCH = 64 * 1024  # bytes of channel messages written in one go


class Outlet(Protocol):
    """Where the worker's messages go: ``send`` queues one, ``chunk`` one piece a model
    yielded (the hot path: no message built per piece), ``writable`` is clear while the
    carrier wants the model held back, ``drain`` waits (briefly) until what was sent left."""

    writable: asyncio.Event

    def send(self, message: WorkerMessage) -> None: ...

    def chunk(self, sid: str, turn_id: int, text: str) -> None: ...

    async def drain(self) -> None: ...


class Channel(asyncio.Protocol):
    """The local worker's end of the socket pair: decodes frames, applies write backpressure."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.decoder = ipc.FrameDecoder()
        self.transport: asyncio.Transport | None = None
        self.writable = asyncio.Event()
        self.writable.set()
        self.closed = asyncio.Event()
        self._batch: list[WorkerMessage] = []
        self._run: Chunks | None = None  # the batch's last message, while it is a chunk run
        self._batched = 0
        self._scheduled = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        for message in self.decoder.feed(data):
            self.worker.dispatch(cast(ServerMessage, message))  # the server sends no others

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed.set()

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def send(self, message: WorkerMessage) -> None:
        """Queue a message for the server. One that finds nothing waiting is written at
        once; those that follow within the same turn of the loop are written together
        (one system call for many chunks), on the loop's next turn or at BATCH bytes."""
        if self.transport is None or self.transport.is_closing():
            return
        if not self._batch and not self._scheduled:
            self.transport.write(ipc.encode(message))
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_soon)
            return
        self._batch.append(message)
        self._run = message if isinstance(message, Chunks) else None
        self._batched += 64
        if self._batched >= BATCH:
            self.flush()

    def chunk(self, sid: str, turn_id: int, text: str) -> None:
        """One piece a model yielded: added to the chunk run being batched when it is this
        turn's, else sent as a run of its own."""
        run = self._run
        if run is not None and run.turn_id == turn_id and run.sid == sid:
            run.texts.append(text)
            self._batched += len(text)
            if self._batched >= BATCH:
                self.flush()
            return
        self.send(Chunks(sid, turn_id, [text]))
        self._batched += len(text)

    def _flush_soon(self) -> None:
        self._scheduled = False
        self.flush()

    def flush(self) -> None:
        if self._batch and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join([ipc.encode(message) for message in self._batch]))
        self._batch.clear()
        self._run = None
        self._batched = 0

    async def drain(self) -> None:
        """Give what was written up to a second to reach the server (before an exit)."""
        self.flush()
        transport = self.transport
        for _ in range(100):
            if transport is None or transport.get_write_buffer_size() == 0:
                return
            await asyncio.sleep(0.01)


class WorkerSession:
    """One chat session's model instance inside the worker."""

    def __init__(self, model: SharedSession) -> None:
        self.model = model
        self.starting: asyncio.Task[None] | None = None
        self.turn: asyncio.Task[None] | None = None
        self.turn_id = 0  # the latest turn's, which a Cancel must name
        # A turn cancelled before it arrived (a carrier that may reorder calls: Ray's).
        self.cancelled_ahead = 0
        self.history: list[Any] = []  # the messages the server has sent, kept in step
        self.turns: set[asyncio.Task[None]] = set()  # every unfinished turn task
        self.cancel_requested = False  # the server asked: not the model's own CancelledError
        self.flowing = asyncio.Event()  # cleared while the server's queue is full
        self.flowing.set()


class Worker:
    """Routes the server's messages to sessions and runs their hooks as tasks; what they
    produce goes to ``outlet``."""

    def __init__(self, outlet: Outlet | None = None) -> None:
        self.runner: SharedRunner | None = None  # set once the model has loaded
        self.outlet: Outlet = outlet if outlet is not None else Channel(self)
        self.sessions: dict[str, WorkerSession] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        # The model's config, secrets included: the server's first message, never argv.
        self.config: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()

    def spawn(self, coroutine: Any) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def load(self, model_dir: Path, name: str, revision: str) -> WorkerMessage:
        """Load the model with the config received; ``Ready`` or ``LoadFailed``."""
        from ws_server.registry.loader import load_model

        config = self.config.result()
        try:
            loaded = await load_model(model_dir, name, revision, config, isolated=True)
        except ModelLoadError as exc:
            return LoadFailed(exc.message, exc.detail)
        self.runner = SharedRunner(loaded.model_class, config, model_dir, loaded.resources)
        return Ready(loaded.model_class.description())

    def dispatch(self, message: ServerMessage) -> None:
        if isinstance(message, Config):
            if not self.config.done():
                self.config.set_result(message.config)
            return
        sid = message.sid
        session = self.sessions.get(sid)
        if isinstance(message, Start):
            assert self.runner is not None  # the server starts sessions only after Ready
            try:
                session = WorkerSession(self.runner.open_session())
            except Exception as exc:
                self.outlet.send(Started(sid, _describe(exc)))
                return
            self.sessions[sid] = session
            session.starting = self.spawn(self.start(sid, session, message.context))
        elif isinstance(message, Turn):
            if session is not None:
                session.turn_id = message.turn_id
                session.history = history_sync.apply(
                    session.history, message.head, message.drop, message.appended
                )
                if session.cancelled_ahead == message.turn_id:  # its model never runs
                    context = session.model.snapshot() if message.snapshot else None
                    self.outlet.send(TurnEnd(sid, message.turn_id, "cancelled", None, context))
                    return
                earlier = set(session.turns)
                session.turn = self.spawn(self.run_turn(sid, session, message, earlier))
                session.turns.add(session.turn)
                session.turn.add_done_callback(session.turns.discard)
        elif isinstance(message, Ping):
            self.outlet.send(Pong(sid))
        elif isinstance(message, Cancel):
            if session is None:
                return
            if message.turn_id > session.turn_id:  # it overtook its turn: cancel on arrival
                session.cancelled_ahead = message.turn_id
            elif message.turn_id == session.turn_id and session.turn is not None:
                session.cancel_requested = True
                session.turn.cancel()
        elif isinstance(message, Pause):
            if session is not None:
                session.flowing.clear()
        elif isinstance(message, Resume):
            if session is not None:
                session.flowing.set()
        elif isinstance(message, End):
            self.spawn(self.end(sid))

    async def start(
        self, sid: str, session: WorkerSession, context: dict[str, Any] | None = None
    ) -> None:
        try:
            await session.model.start(context)
        except MemoryError:
            await self.out_of_memory(Started(sid, "MemoryError in on_chat_start"))
        except asyncio.CancelledError:
            return  # the session ended while starting; "end" reports
        except Exception as exc:  # reported to the server, which logs it
            self.outlet.send(Started(sid, _describe(exc)))
            return
        self.outlet.send(Started(sid, None))

    async def run_turn(
        self,
        sid: str,
        session: WorkerSession,
        turn: Turn,
        earlier: set[asyncio.Task[None]],
    ) -> None:
        outlet = self.outlet
        turn_id = turn.turn_id
        outcome, detail = "stop", None
        try:
            pending = {t for t in earlier if not t.done()}
            if pending:  # turns never overlap: earlier ones (being cancelled) finish first
                for task in pending:
                    task.cancel()
                await asyncio.wait(pending)
            session.flowing.set()
            session.cancel_requested = False

            def emitted(name: str, data: dict[str, Any]) -> None:
                outlet.send(Emitted(sid, turn_id, name, data))

            # The model gets a list of its own: what it does to it stays in this turn.
            messages = list(session.history)
            stream = session.model.stream(messages, params=turn.params, events=emitted)
            try:
                sent = 0
                writable, flowing = outlet.writable, session.flowing
                async for chunk in stream:
                    if not writable.is_set():
                        await writable.wait()
                    if not flowing.is_set():
                        await flowing.wait()
                    outlet.chunk(sid, turn_id, chunk)
                    sent += 1
                    if sent % 64 == 0:  # let "pause" and "cancel" in, even if the model
                        await asyncio.sleep(0)  # never awaits between chunks
            finally:
                await stream.aclose()  # type: ignore[attr-defined]
        except asyncio.CancelledError as exc:
            if session.cancel_requested:
                outcome = "cancelled"
            else:  # raised by the model's own code
                outcome, detail = "error", _describe(exc)
        except MemoryError:
            await self.out_of_memory(TurnEnd(sid, turn_id, RESOURCE_EXHAUSTED, "MemoryError", None))
        except Exception as exc:
            outcome, detail = "error", _describe(exc)
        context = session.model.snapshot() if turn.snapshot else None
        outlet.send(TurnEnd(sid, turn_id, outcome, detail, context))

    async def end(self, sid: str) -> None:
        session = self.sessions.pop(sid, None)
        error = None
        if session is not None:
            running = {t for t in (session.starting, *session.turns) if t and not t.done()}
            for task in running:
                task.cancel()
            if running:
                await asyncio.wait(running)
            try:
                await session.model.end()
            except Exception as exc:
                error = _describe(exc)
        self.outlet.send(Ended(sid, error))

    async def out_of_memory(self, report: WorkerMessage) -> None:
        """Tell the server, let the message reach it, then exit so a fresh worker replaces us."""
        self.outlet.send(report)
        await self.outlet.drain()
        os._exit(EXIT_MEMORY)


def _describe(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


async def serve(spec: dict[str, Any]) -> None:
    """Apply the limits, load the model, say ready (or why not), then serve until the
    server closes the channel."""
    die_with_parent(sandboxed=bool(spec.get("sandboxed")))
    apply_limits(spec.get("memory_bytes"), spec.get("cpus"), spec.get("cpu_offset", 0))
    loop = asyncio.get_running_loop()
    worker = Worker()
    channel = cast(Channel, worker.outlet)
    sock = socket.socket(fileno=int(spec["fd"]))
    await loop.create_unix_connection(lambda: channel, sock=sock)
    closed: asyncio.Future[Any] = asyncio.ensure_future(channel.closed.wait())
    waiting: set[asyncio.Future[Any]] = {worker.config, closed}
    await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    closed.cancel()
    if not worker.config.done():  # the server went away before sending it: nothing to do
        return
    loaded = await worker.load(Path(spec["model_dir"]), spec["name"], spec["revision"])
    channel.send(loaded)
    if isinstance(loaded, LoadFailed):
        await channel.drain()
        return
    await channel.closed.wait()


def apply_limits(memory_bytes: int | None, cpus: int | None, offset: int = 0) -> None:
    """Bound this process before any model code runs: address space and CPU cores.

    ``memory`` is RLIMIT_AS, as the specification shows: allocations past it raise
    MemoryError inside the model, which lets the worker report ``resource_exhausted``
    cleanly instead of being killed mid-frame. ``cpu: N`` pins the worker to N cores,
    chosen round-robin so that workers spread over the machine.
    """
    if memory_bytes:
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    if cpus and hasattr(os, "sched_setaffinity"):
        available = sorted(os.sched_getaffinity(0))
        count = max(1, min(cpus, len(available)))
        start = (offset * count) % len(available)
        chosen = {available[(start + i) % len(available)] for i in range(count)}
        os.sched_setaffinity(0, chosen)


def die_with_parent(sandboxed: bool = False) -> None:
    """Linux: be killed if the server dies without stopping us (kill -9), so no worker is
    ever orphaned, even one stuck in a blocking step that never reads the channel.

    In the sandbox our parent is bwrap's init, PID 1 of the sandbox's PID namespace,
    which bwrap's --die-with-parent ties to the server in turn; elsewhere, a parent with
    PID 1 means the server is already gone."""
    parent = os.getppid()
    if parent == 1 and not sandboxed:
        os._exit(1)
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # our parent died before prctl took effect
        os._exit(1)


def main() -> None:
    """Entry point: ``python -c 'from ws_server.isolation.worker import main' ... SPEC``."""
    spec = json.loads(sys.argv[1])
    close_inherited_fds(keep=int(spec["fd"]))
    asyncio.run(serve(spec))


def close_inherited_fds(keep: int) -> None:
    """Close every descriptor but stdio and the channel before any model code runs: the
    server's (and bwrap's) others must not reach the model (uvloop can't close them at
    spawn)."""
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    limit = limit if 0 < limit < 1 << 20 else 1 << 20
    os.closerange(3, keep)
    os.closerange(keep + 1, limit)


if __name__ == "__main__":
    main()
