"""The isolated worker: runs one model version inside its own virtualenv.

Started by ``isolation/runner.py`` with the environment's interpreter. It loads the model
exactly as shared mode does (``registry/loader.py``, then the same forgiving adapter of
``runners/shared.py``), then serves any number of sessions multiplexed over the framed
channel of ``ipc.py``. Standard library only: the server's dependencies are not here.
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
from typing import Any, cast

from ws_server.exceptions import ModelLoadError
from ws_server.isolation import ipc
from ws_server.runners.shared import SharedRunner, SharedSession

# Outcome sent when a turn allocates past the worker's memory limit; the worker exits
# afterwards (its heap may be in any state) and the server starts a new one.
RESOURCE_EXHAUSTED = "resource_exhausted"
EXIT_MEMORY = 70
BATCH = 64 * 1024  # bytes of channel messages written in one go


class Channel(asyncio.Protocol):
    """The worker's end of the socket pair: decodes frames, applies write backpressure."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.decoder = ipc.FrameDecoder()
        self.transport: asyncio.Transport | None = None
        self.writable = asyncio.Event()
        self.writable.set()
        self.closed = asyncio.Event()
        self._batch: list[bytes] = []
        self._batched = 0
        self._scheduled = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        for message in self.decoder.feed(data):
            self.worker.dispatch(message)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed.set()

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def send(self, message: list[Any]) -> None:
        """Queue a message for the server. One that finds nothing waiting is written at
        once; those that follow within the same turn of the loop are written together
        (one system call for many chunks), on the loop's next turn or at BATCH bytes."""
        if self.transport is None or self.transport.is_closing():
            return
        data = ipc.encode(message)
        if not self._batch and not self._scheduled:
            self.transport.write(data)
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_soon)
            return
        self._batch.append(data)
        self._batched += len(data)
        if self._batched >= BATCH:
            self.flush()

    def _flush_soon(self) -> None:
        self._scheduled = False
        self.flush()

    def flush(self) -> None:
        if self._batch and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(self._batch))
        self._batch.clear()
        self._batched = 0


class WorkerSession:
    """One chat session's model instance inside the worker."""

    def __init__(self, model: SharedSession) -> None:
        self.model = model
        self.starting: asyncio.Task[None] | None = None
        self.turn: asyncio.Task[None] | None = None
        self.turns: set[asyncio.Task[None]] = set()  # every unfinished turn task
        self.cancel_requested = False  # the server asked: not the model's own CancelledError
        self.flowing = asyncio.Event()  # cleared while the server's queue is full
        self.flowing.set()


class Worker:
    """Routes channel messages to sessions and runs their hooks as tasks."""

    def __init__(self) -> None:
        self.runner: SharedRunner | None = None  # set once the model has loaded
        self.channel = Channel(self)
        self.sessions: dict[str, WorkerSession] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        # The model's config, secrets included: the server's first message, never argv.
        self.config: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()

    def spawn(self, coroutine: Any) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def dispatch(self, message: list[Any]) -> None:
        kind, sid = message[0], str(message[1])
        session = self.sessions.get(sid)
        if kind == "start":
            assert self.runner is not None  # the server starts sessions only after "ready"
            try:
                session = WorkerSession(self.runner.open_session())
            except Exception as exc:
                self.channel.send(["started", sid, _describe(exc)])
                return
            self.sessions[sid] = session
            context = message[2] if len(message) > 2 else None
            session.starting = self.spawn(self.start(sid, session, context))
        elif kind == "turn" and session is not None:
            earlier = set(session.turns)
            snapshot = len(message) > 4 and bool(message[4])
            params = message[5] if len(message) > 5 and isinstance(message[5], dict) else None
            session.turn = self.spawn(
                self.run_turn(sid, session, message[2], message[3], earlier, snapshot, params)
            )
            session.turns.add(session.turn)
            session.turn.add_done_callback(session.turns.discard)
        elif kind == "ping":
            self.channel.send(["pong", sid, None])
        elif kind == "cancel" and session is not None and session.turn is not None:
            session.cancel_requested = True
            session.turn.cancel()
        elif kind == "pause" and session is not None:
            session.flowing.clear()
        elif kind == "resume" and session is not None:
            session.flowing.set()
        elif kind == "end":
            self.spawn(self.end(sid))
        elif kind == "config" and not self.config.done():
            self.config.set_result(message[2])

    async def start(
        self, sid: str, session: WorkerSession, context: dict[str, Any] | None = None
    ) -> None:
        try:
            await session.model.start(context)
        except MemoryError:
            await self.out_of_memory(["started", sid, "MemoryError in on_chat_start"])
        except asyncio.CancelledError:
            return  # the session ended while starting; "end" reports
        except Exception as exc:  # reported to the server, which logs it
            self.channel.send(["started", sid, _describe(exc)])
            return
        self.channel.send(["started", sid, None])

    async def run_turn(
        self,
        sid: str,
        session: WorkerSession,
        messages: list[Any],
        turn_id: int,
        earlier: set[asyncio.Task[None]],
        snapshot: bool = False,
        params: dict[str, Any] | None = None,
    ) -> None:
        channel = self.channel
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
                channel.send(["event", sid, turn_id, name, data])

            stream = session.model.stream(messages, params=params, events=emitted)
            try:
                sent = 0
                async for chunk in stream:
                    if not channel.writable.is_set():
                        await channel.writable.wait()
                    if not session.flowing.is_set():
                        await session.flowing.wait()
                    channel.send(["chunk", sid, turn_id, chunk])
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
            await self.out_of_memory(["turn_end", sid, turn_id, RESOURCE_EXHAUSTED, "MemoryError"])
        except Exception as exc:
            outcome, detail = "error", _describe(exc)
        context = session.model.snapshot() if snapshot else None
        channel.send(["turn_end", sid, turn_id, outcome, detail, context])

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
        self.channel.send(["ended", sid, error])

    async def out_of_memory(self, report: list[Any]) -> None:
        """Tell the server, let the frame reach it, then exit so a fresh worker replaces us."""
        self.channel.send(report)
        await _drain(self.channel)
        os._exit(EXIT_MEMORY)


def _describe(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


async def serve(spec: dict[str, Any]) -> None:
    """Apply the limits, load the model, say ready (or why not), then serve until the
    server closes the channel."""
    from ws_server.registry.loader import load_model

    die_with_parent(sandboxed=bool(spec.get("sandboxed")))
    apply_limits(spec.get("memory_bytes"), spec.get("cpus"), spec.get("cpu_offset", 0))
    loop = asyncio.get_running_loop()
    worker = Worker()
    sock = socket.socket(fileno=int(spec["fd"]))
    _, channel = await loop.create_unix_connection(lambda: worker.channel, sock=sock)
    model_dir = Path(spec["model_dir"])
    closed: asyncio.Future[Any] = asyncio.ensure_future(channel.closed.wait())
    waiting: set[asyncio.Future[Any]] = {worker.config, closed}
    await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    closed.cancel()
    if not worker.config.done():  # the server went away before sending it: nothing to do
        return
    config = worker.config.result()
    try:
        loaded = await load_model(model_dir, spec["name"], spec["revision"], config, isolated=True)
    except ModelLoadError as exc:
        channel.send(["load_failed", exc.message, exc.detail])
        await _drain(channel)
        return
    worker.runner = SharedRunner(loaded.model_class, config, model_dir, loaded.resources)
    channel.send(["ready", loaded.model_class.description()])
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


async def _drain(channel: Channel) -> None:
    """Give what was written up to a second to reach the server before the worker exits."""
    channel.flush()
    transport = channel.transport
    for _ in range(100):
        if transport is None or transport.get_write_buffer_size() == 0:
            return
        await asyncio.sleep(0.01)


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
