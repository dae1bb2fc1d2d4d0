"""The turns of one model version running at once in this process (``concurrency`` in
config.yaml): at most ``max_turns``; the turns beyond wait in a FIFO queue of at most
``max_queue``, told their position as it changes; with the queue full, a new one is
refused (``overloaded``, with a ``retry_after`` estimated from recent turns). Pure
bookkeeping on futures: the conversation core takes a ``Ticket`` per turn.
"""

from __future__ import annotations

import asyncio
import collections
import math
import time
from collections.abc import Callable

from ws_server import metrics
from ws_server.exceptions import Overloaded

Position = Callable[[int, int], None]  # told a queued turn (its number) its place (1: next)


class Ticket:
    """One turn's place: running (``granted``), or waiting for ``ready``. ``close`` gives
    it back, whatever became of the turn (idempotent)."""

    __slots__ = ("_closed", "_position", "_slots", "_turn", "granted", "queued_at", "ready")

    def __init__(
        self, slots: TurnSlots, position: Position | None, turn: int, granted: bool
    ) -> None:
        self._slots = slots
        self._position = position
        self._turn = turn
        self._closed = False
        self.granted = granted
        self.ready: asyncio.Future[None] | None = None
        self.queued_at = 0.0

    def tell(self, position: int) -> None:
        if self._position is not None:
            self._position(self._turn, position)

    def close(self, _task: object = None) -> None:
        if not self._closed:
            self._closed = True
            self._slots._leave(self)


class TurnSlots:
    """Turn slots of one model version."""

    __slots__ = ("_recent", "_waiting", "max_queue", "max_turns", "model", "running")

    def __init__(self, model: str, max_turns: int | None, max_queue: int | None) -> None:
        self.model = model
        self.max_turns = max_turns
        self.max_queue = max_queue
        self.running = 0
        self._waiting: collections.deque[Ticket] = collections.deque()
        self._recent = 1.0  # seconds a turn of this model took lately (for retry_after)

    @property
    def queued(self) -> int:
        return len(self._waiting)

    def admit(self) -> None:
        """``Overloaded`` when a new turn would find the queue full (checked before the
        turn takes a number; ``enter`` follows with no wait in between)."""
        limit = self.max_turns
        if limit is None or self.max_queue is None or self.running < limit:
            return
        if len(self._waiting) >= self.max_queue:
            retry_after = max(1, math.ceil(self._recent * (len(self._waiting) + 1) / limit))
            raise Overloaded(
                f"model {self.model!r} is running {self.running} turns and {len(self._waiting)} "
                f"are waiting, its concurrency limit; try again in {retry_after} s",
                retry_after,
            )

    def enter(self, position: Position | None = None, turn: int = 0) -> Ticket:
        """A ticket for turn ``turn``: granted at once while a slot is free and nobody
        waits, else queued (``position`` is told its place)."""
        limit = self.max_turns
        if limit is None or (self.running < limit and not self._waiting):
            self.running += 1
            return Ticket(self, position, turn, granted=True)
        ticket = Ticket(self, position, turn, granted=False)
        ticket.ready = asyncio.get_running_loop().create_future()
        ticket.queued_at = time.monotonic()
        self._waiting.append(ticket)
        ticket.tell(len(self._waiting))
        return ticket

    def _leave(self, ticket: Ticket) -> None:
        if ticket.granted:
            self.running -= 1
            self._grant()
        elif ticket in self._waiting:  # given up while queued (cancel, client gone)
            self._waiting.remove(ticket)
            self._tell_positions()

    def finished(self, seconds: float) -> None:
        """A turn took ``seconds``: what ``retry_after`` is estimated from."""
        self._recent += (seconds - self._recent) / 8

    def _grant(self) -> None:
        """Free slots go to the longest waiting turns, in order."""
        granted = False
        while self._waiting and (self.max_turns is None or self.running < self.max_turns):
            ticket = self._waiting.popleft()
            ticket.granted, granted = True, True
            self.running += 1
            metrics.QUEUE_WAIT.labels(model=self.model).observe(time.monotonic() - ticket.queued_at)
            assert ticket.ready is not None
            if not ticket.ready.done():
                ticket.ready.set_result(None)
        if granted:
            self._tell_positions()

    def _tell_positions(self) -> None:
        for index, ticket in enumerate(self._waiting, 1):
            ticket.tell(index)
