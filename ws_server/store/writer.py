"""Write-behind: every held session's journal, written to Redis in batches.

Journals with changes queue here; one task takes all of them at once and sends one
pipeline (one fenced ``APPEND`` script call per session). A chunk never waits for
Redis: while a batch is on its way, the next one gathers. A journal whose script says it
no longer holds its session (fenced) is handed back to the store; one whose write was
lost (Redis went away) stops mirroring, and its keys are cleared once Redis is back.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ws_server.store import keys

if TYPE_CHECKING:
    from ws_server.store.cluster import ClusterLink
    from ws_server.store.redis_journal import RedisJournal

log = logging.getLogger("anything_agent.store")


class JournalWriter:
    """The one writer of a node's session journals."""

    def __init__(
        self,
        redis: Any,
        link: ClusterLink,
        *,
        replay_bytes: int,
        ttl_ms: int,
        on_fenced: Callable[[RedisJournal], None],
        on_lost: Callable[[RedisJournal], None],
    ) -> None:
        self.redis = redis
        self.link = link
        self.replay_bytes = replay_bytes  # about how much of its latest frames a stream keeps
        self.ttl_ms = ttl_ms  # a session's keys' TTL, renewed by every write
        self.append_script = redis.register_script(keys.APPEND)
        self.delete_script = redis.register_script(keys.DELETE)
        self.resync_script = redis.register_script(keys.RESYNC)
        self._on_fenced = on_fenced
        self._on_lost = on_lost
        self._dirty: list[RedisJournal] = []
        self._wake = asyncio.Event()
        self._flushed: asyncio.Future[None] | None = None  # the end of the next batch
        self._writing = False  # a batch is on its way to Redis

    def schedule(self, journal: RedisJournal) -> None:
        """``journal`` has changes: the next batch takes them."""
        self._dirty.append(journal)
        self._wake.set()

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._write_batch()
            except Exception:  # a bug, not Redis: say so, and keep writing the others
                log.exception("writing sessions to Redis failed")

    async def _write_batch(self) -> None:
        batch, self._dirty = self._dirty, []
        self._writing = True
        written = [j for j in batch if not j.broken]
        try:
            if not self.link.available:
                for journal in written:
                    self._lose(journal)
                return
            if not written:
                return
            pipe = self.redis.pipeline(transaction=False)
            for script in (self.append_script, self.delete_script, self.resync_script):
                pipe.scripts.add(script)
            calls = []
            for journal in written:
                journal.writing = True
                calls.append(journal.write(pipe))
            try:
                results = await pipe.execute(raise_on_error=False)
            except self.link.errors as exc:
                self.link.lost(exc)
                for journal in written:
                    self._lose(journal)
                return
            answers = iter(results)
            for journal, count in zip(written, calls, strict=True):
                outcome, *_ = (next(answers) for _ in range(count))  # the first one decides
                if isinstance(outcome, BaseException):
                    log.error("writing session %s failed: %s", journal.digest[:8], outcome)
                    self._lose(journal)
                elif outcome == 0 and not journal.deleting:  # fenced: held elsewhere now
                    self._on_fenced(journal)
                elif outcome == -1 and not journal.deleting:  # gone from Redis: write it whole
                    journal.resync()
        finally:
            self._writing = False
            for journal in written:
                journal.writing = False
            flushed, self._flushed = self._flushed, None
            if flushed is not None and not flushed.done():
                flushed.set_result(None)

    def _lose(self, journal: RedisJournal) -> None:
        journal.lose()
        self._on_lost(journal)

    async def flush(self) -> None:
        """Until every change made so far is written (or lost), the batch on its way
        included."""
        while self._dirty or self._writing:
            await self._batch_written()

    async def written(self, journal: RedisJournal) -> None:
        """Until ``journal``'s changes so far are in Redis (or lost): a turn's last frame
        reaches its client only once it is there, so that a node taking the session over
        never ends that turn a second time."""
        while journal.dirty or journal.writing:
            await self._batch_written()

    async def room(self, journal: RedisJournal, backlog: int) -> None:
        """Backpressure for a session relayed elsewhere: wait while more than ``backlog``
        bytes of its frames are unwritten."""
        while journal.pending_bytes > backlog and journal.dirty:
            await self._batch_written()

    async def _batch_written(self) -> None:
        if self._flushed is None:
            self._flushed = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._flushed)
