"""The frames of every session this node relays, read live by one blocking read.

A relay (``session/relay.py``) follows its session's stream from the last seq its client
has; one task here reads all the followed streams with a single ``XREAD BLOCK`` (one
Redis connection, however many relays) and hands each relay its new frames. A relay is
left out of the next read until it has written what it got to its client, so a slow
client holds back only its own stream (whose length the holder bounds); a relay that
has caught up, or one just added, wakes the read in flight through this node's wake
stream.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from ws_server.store import keys
from ws_server.store.cluster import BLOCK_MS

if TYPE_CHECKING:
    from ws_server.store.cluster import ClusterLink

BATCH: Final = 512  # stream entries per session and read
WAKE_TTL_MS: Final = 60_000


@dataclass(eq=False)
class Follow:
    """One relay's place in its session's stream, and the frames that came for it."""

    digest: str
    last: int  # the last seq handed over
    frames: list[tuple[int, bytes]] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)


class FrameTail:
    """One reader of many sessions' streams."""

    def __init__(self, redis: Any, link: ClusterLink) -> None:
        self.redis = redis
        self.link = link
        self._wake_key = keys.wake_key(link.node)
        self._wake_last = b"0-0"
        self._follows: dict[str, Follow] = {}
        self._reading: set[str] = set()  # the digests of the read in flight
        self._idle = asyncio.Event()  # set when someone waits to be read
        self._background: set[asyncio.Task[Any]] = set()

    def follow(self, digest: str, after: int) -> Follow:
        """Frames of ``digest`` after seq ``after``, from now on (``next``)."""
        follow = Follow(digest, after)
        self._follows[digest] = follow
        self._wake()
        return follow

    def unfollow(self, follow: Follow) -> None:
        if self._follows.get(follow.digest) is follow:
            del self._follows[follow.digest]

    async def next(self, follow: Follow, wait: float) -> list[tuple[int, bytes]]:
        """The frames that came for ``follow`` (waiting up to ``wait`` s; [] if none)."""
        if not follow.frames:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(follow.arrived.wait(), wait)
        frames, follow.frames = follow.frames, []
        follow.arrived.clear()
        if frames and follow.digest not in self._reading:
            self._wake()  # left out of the read in flight while it had frames: back in
        return frames

    def _wake(self) -> None:
        if not self._idle.is_set():
            self._idle.set()
            if self._reading:  # a read is blocked: end it, to read again with this one
                task = asyncio.ensure_future(self._poke())
                self._background.add(task)
                task.add_done_callback(self._background.discard)

    async def _poke(self) -> None:
        with contextlib.suppress(*self.link.errors):
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.xadd(self._wake_key, {"w": "1"}, maxlen=16, approximate=True)
                pipe.pexpire(self._wake_key, WAKE_TTL_MS)
                await pipe.execute()

    async def run(self) -> None:
        while True:
            wanted = [f for f in self._follows.values() if not f.frames]
            if not wanted:
                await self._idle.wait()
                self._idle.clear()
                continue
            self._idle.clear()
            streams = {keys.frames_key(f.digest): keys.stream_id(f.last) for f in wanted}
            streams[self._wake_key] = self._wake_last
            self._reading = {f.digest for f in wanted}
            try:
                answer = await self.redis.xread(streams, block=BLOCK_MS, count=BATCH)
            except asyncio.CancelledError:
                raise
            except self.link.errors as exc:
                self.link.lost(exc)
                await asyncio.sleep(BLOCK_MS / 1000)
                continue
            finally:
                self._reading = set()
            for key, entries in answer or ():
                self._deliver(key.decode(), entries)

    def _deliver(self, key: str, entries: list[Any]) -> None:
        if key == self._wake_key:
            self._wake_last = entries[-1][0]
            return
        follow = self._follows.get(key.rpartition(":")[2])
        if follow is None:
            return
        frames = [(seq, data) for seq, data in keys.unpack_entries(entries) if seq > follow.last]
        follow.last = max(follow.last, keys.seq_of(entries[-1][0]))
        if frames:
            follow.frames = frames
            follow.arrived.set()
