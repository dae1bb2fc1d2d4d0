"""The Ray placement's worker: the isolated worker of ``worker.py`` as an async Ray actor.

It runs inside the cluster, in the environment Ray's ``runtime_env`` built from the model's
requirements.txt, with the model directory as its working directory and this package
shipped beside it (``ray_link.py`` asks for both). The server's messages arrive as method
calls: ``call`` for those with one answer (start, end, ping), ``cancel``, and ``turn``, a
streaming generator whose items are batches of the turn's framed messages (chunks, events,
its end), so a turn streams with Ray's backpressure; ``follow`` streams what the model
prints. Standard library only, besides Ray itself (present wherever this runs).
"""

from __future__ import annotations

import asyncio
import collections
import io
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Final

from ws_server.isolation import ipc
from ws_server.isolation.messages import (
    Cancel,
    Chunks,
    Config,
    Emitted,
    End,
    Ended,
    Pause,
    Ping,
    Pong,
    Resume,
    Start,
    Started,
    Turn,
    TurnEnd,
    WorkerMessage,
    from_list,
    to_list,
)
from ws_server.isolation.worker import Worker

# Bytes of one turn's messages waiting to be yielded: above HIGH the model is held back
# (as a paused local worker is), below LOW it goes on. Ray's backpressure stops the
# generator itself when the server stops pulling.
TURN_HIGH: Final = 1024 * 1024
TURN_LOW: Final = 256 * 1024
BATCH_LIMIT: Final = 256 * 1024  # bytes yielded as one streamed item at most
LOG_BATCH: Final = 200  # printed lines per streamed item at most
_ANSWERS: Final = {Start: Started, End: Ended, Ping: Pong}


class _TurnQueue:
    """One running turn's messages, waiting for its streaming call to yield them."""

    def __init__(self) -> None:
        self.items: collections.deque[bytes] = collections.deque()
        self.size = 0
        self.arrived = asyncio.Event()
        self.ended = False


class _ActorOutlet:
    """Routes the worker's messages: answers to the call waiting for them, a turn's
    messages to its queue (holding the model back when too much waits)."""

    def __init__(self) -> None:
        self.worker: Worker | None = None
        self.writable = asyncio.Event()
        self.writable.set()
        self.answers: dict[tuple[type, str], asyncio.Future[WorkerMessage]] = {}
        self.turns: dict[tuple[str, int], _TurnQueue] = {}

    def send(self, message: WorkerMessage) -> None:
        if isinstance(message, (Chunks, Emitted, TurnEnd)):
            queue = self.turns.get((message.sid, message.turn_id))
            if queue is None:
                return  # a turn the server gave up on
            data = ipc.encode(message)
            queue.items.append(data)
            queue.size += len(data)
            queue.ended = isinstance(message, TurnEnd)
            queue.arrived.set()
            if queue.size > TURN_HIGH and self.worker is not None:
                self.worker.dispatch(Pause(message.sid))  # until the turn's call catches up
            return
        answer = self.answers.pop((type(message), getattr(message, "sid", "")), None)
        if answer is not None and not answer.done():
            answer.set_result(message)

    def chunk(self, sid: str, turn_id: int, text: str) -> None:
        self.send(Chunks(sid, turn_id, [text]))

    async def drain(self) -> None:
        """Give queued messages up to a second to be yielded (before an exit)."""
        for _ in range(100):
            if not any(queue.items for queue in self.turns.values()):
                return
            await asyncio.sleep(0.01)


class _Printed(io.TextIOBase):
    """Stands in for the actor's stdout or stderr: complete lines go to ``follow``."""

    def __init__(self, stream: str, actor: ModelActor) -> None:
        self.stream = stream
        self.actor = actor
        self.pending = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        parts = (self.pending + text).split("\n")
        self.pending = parts.pop()
        if parts:
            self.actor.printed([(self.stream, line) for line in parts])
        return len(text)


class ModelActor:
    """One isolated model version on Ray: loads it, then serves any number of sessions."""

    def __init__(self, name: str, revision: str) -> None:
        self.name = name
        self.revision = revision
        self.outlet = _ActorOutlet()
        self.worker: Worker | None = None
        self.lines: collections.deque[tuple[str, str]] = collections.deque(maxlen=10_000)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.wake = asyncio.Event()

    def printed(self, lines: list[tuple[str, str]]) -> None:
        """Lines the model printed (from any of its threads), for ``follow``."""
        self.lines.extend(lines)
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.wake.set)

    async def load(self, config: dict[str, Any], python_version: str | None) -> list[Any]:
        """Load the model; the ``Ready`` or ``LoadFailed`` message, as its wire array."""
        self.loop = asyncio.get_running_loop()
        sys.stdout = _Printed("stdout", self)
        sys.stderr = _Printed("stderr", self)
        running = f"{sys.version_info[0]}.{sys.version_info[1]}"
        if python_version is not None and python_version != running:
            return [
                "load_failed",
                f"config.yaml: isolation.python_version: {python_version} cannot be had on "
                f"Ray: the cluster's workers run Python {running}, and Ray builds a model's "
                "environment with that Python",
                None,
            ]
        self.worker = Worker(self.outlet)
        self.outlet.worker = self.worker
        self.worker.dispatch(Config(config))
        return to_list(await self.worker.load(Path.cwd(), self.name, self.revision))

    def pid(self) -> int:
        return os.getpid()

    async def call(self, message: list[Any]) -> list[Any]:
        """A message with one answer (start, end, ping): the answer, as its wire array."""
        request = from_list(message)
        assert self.worker is not None and isinstance(request, (Start, End, Ping))
        answer = asyncio.get_running_loop().create_future()
        self.outlet.answers[(_ANSWERS[type(request)], request.sid)] = answer
        self.worker.dispatch(request)
        return to_list(await answer)

    def cancel(self, message: list[Any]) -> None:
        """Cancel a turn, even one whose call has not started here yet (Ray does not
        promise an async actor's calls start in the order they were sent: the worker
        cancels such a turn on its arrival)."""
        request = from_list(message)
        assert self.worker is not None and isinstance(request, Cancel)
        self.worker.dispatch(request)

    async def turn(self, message: list[Any]) -> AsyncIterator[bytes]:
        """Run one turn; yield its framed messages in batches until (and with) its end."""
        turn = from_list(message)
        assert self.worker is not None and isinstance(turn, Turn)
        key = (turn.sid, turn.turn_id)
        queue = self.outlet.turns[key] = _TurnQueue()
        self.worker.dispatch(turn)
        try:
            while True:
                while not queue.items:
                    queue.arrived.clear()
                    await queue.arrived.wait()
                batch, size = [], 0
                while queue.items and size < BATCH_LIMIT:
                    data = queue.items.popleft()
                    batch.append(data)
                    size += len(data)
                queue.size -= size
                finished = queue.ended and not queue.items
                if queue.size < TURN_LOW:
                    self.worker.dispatch(Resume(turn.sid))
                yield b"".join(batch)
                if finished:
                    return
        finally:
            if self.outlet.turns.get(key) is queue:
                del self.outlet.turns[key]

    async def follow(self) -> AsyncIterator[list[tuple[str, str]]]:
        """What the model prints, in batches of (stream, line), for as long as the actor
        lives: its caller also learns of the actor's death from this call."""
        self.loop = asyncio.get_running_loop()
        while True:
            while not self.lines:
                self.wake.clear()
                await self.wake.wait()
            batch: list[tuple[str, str]] = []
            while self.lines and len(batch) < LOG_BATCH:
                batch.append(self.lines.popleft())
            yield batch
