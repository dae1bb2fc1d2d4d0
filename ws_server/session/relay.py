"""A client resumed on this node while another node holds its session: a relay.

The session's frames come from its stream in Redis (missed ones first, then live ones
as they are appended); the client's frames go to the holder's inbox. The holder keeps
the model instance and its single ``on_chat_end``. While relaying, the holder is watched:
if it lets go (a drain) or its heartbeat lapses (it died), the relay ends with
``take_over`` and this node carries the session on in the same connection.
"""

from __future__ import annotations

import asyncio
import collections
import time
import uuid
from typing import TYPE_CHECKING, Final

from websockets.exceptions import ConnectionClosed

from ws_server import metrics, protocol
from ws_server.session.connection import REPLACED, ChatConnection

if TYPE_CHECKING:
    from ws_server.store.base import SessionRecord
    from ws_server.store.redis import RedisStore

HOLDER_CHECK: Final = 0.5  # seconds between looks at the holder while frames flow
KEEP_SENT: Final = 256  # client frames kept in case the holder dies before taking them
# Why a relay closed its client's connection (the client resumes again and lands right).
CLOSE_REASONS: Final = {
    "replaced": (REPLACED, "resumed on another connection"),
    "gap": (1011, "frames were lost on the way; resume again"),
    "moved": (1012, "the session moved; resume again"),
    "gone": (1012, "the session ended on its node"),
}


class Relay:
    """One client connection here, relayed to the node holding its session."""

    def __init__(self, store: RedisStore, adapter: ChatConnection, record: SessionRecord) -> None:
        self.id = uuid.uuid4().hex[:12]
        self.store = store
        self.adapter = adapter
        self.record = record
        self.last = 0  # the last seq sent to the client
        # The client's latest frames sent to the holder, and how many were sent in all:
        # a node taking over hands on those the holder never took (see ``unseen``).
        self._forwarded: collections.deque[str | bytes] = collections.deque(maxlen=KEEP_SENT)
        self._sent = 0
        self._notice: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def notice(self, what: str) -> None:
        """The holder says: ``replaced`` (another connection resumed) or ``gone``."""
        if not self._notice.done():
            self._notice.set_result(what)

    async def run(self, after: int, frames: list[bytes]) -> str:
        """Send ``resumed`` and ``frames``, then relay until the client goes (``closed``)
        or this node must take the session over (``take_over``); any other outcome
        closes the connection, for the client to resume again."""
        record = self.record
        writer = self.adapter.writer
        resumed = protocol.encode_resumed(
            record.session_id,
            record.model,
            record.version,
            after,
            len(frames),
            record.turn,
            record.running,
        )
        writer.enqueue(resumed.encode())
        for data in frames:
            writer.enqueue(data)
        writer.flush()
        self.last = after + len(frames)
        metrics.RESUMES.labels(outcome="relayed").inc()
        metrics.REPLAYED_FRAMES.inc(len(frames))
        self.store.relays[self.id] = self
        attach = {"op": "attach", "s": record.token_digest, "r": self.id, "n": self.store.node}
        await self.store.send(record.owner, attach)
        reader = asyncio.ensure_future(self._forward_client_frames())
        tail = asyncio.ensure_future(self._tail())
        try:
            await asyncio.wait({reader, tail}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.store.relays.pop(self.id, None)
        if reader.done():
            tail.cancel()
            await asyncio.wait({tail})
            code = self.adapter.connection.close_code
            await self._detach(code)
            return "closed"
        reader.cancel()  # safe: websockets' recv loses nothing when cancelled
        await asyncio.wait({reader})
        outcome = tail.result()
        if outcome != "take_over":
            await self._detach(1001)
            code, reason = CLOSE_REASONS[outcome]
            try:
                await self.adapter.connection.close(code, reason)
            except ConnectionClosed:
                pass
        return outcome

    async def _detach(self, code: int | None) -> None:
        detach = {"op": "detach", "r": self.id, "c": str(code or 1006)}
        await self.store.send(self.record.owner, detach)

    async def _forward_client_frames(self) -> None:
        owner, digest = self.record.owner, self.record.token_digest
        try:
            async for data in self.adapter.connection:
                self._forwarded.append(data)
                self._sent += 1
                binary = isinstance(data, bytes)
                frame = {
                    "op": "frame",
                    "s": digest,
                    "r": self.id,
                    "n": self.store.node,
                    "d": data if binary else data.encode(),  # type: ignore[union-attr]
                    "b": "1" if binary else "0",
                }
                if not await self.store.send(owner, frame):
                    # Redis did not take it: the client resumes, and sends it again.
                    await self.adapter.connection.close(1011, "the session's node is unreachable")
                    return
        except ConnectionClosed:
            pass

    def unseen(self, taken: int) -> list[str | bytes]:
        """The frames after the first ``taken`` that this relay sent to the holder."""
        missing = self._sent - taken
        return list(self._forwarded)[-missing:] if missing > 0 else []

    async def _tail(self) -> str:
        """Frames from the stream to the client, watching the holder between reads."""
        store, writer, record = self.store, self.adapter.writer, self.record
        follow = store.tail.follow(record.token_digest, self.last)
        checked = time.monotonic()
        try:
            while not self._notice.done():
                entries = await store.tail.next(follow, HOLDER_CHECK)
                for seq, data in entries:
                    if seq != self.last + 1:
                        return "gap"
                    await writer.write(data)
                    self.last = seq
                writer.flush()
                if not entries or time.monotonic() - checked > HOLDER_CHECK:
                    checked = time.monotonic()
                    state = await store.owner_state(record)
                    if state == "free":
                        return "take_over"
                    if state != "held":
                        return state
            return self._notice.result()
        finally:
            store.tail.unfollow(follow)
