"""Writes a session's frames to its connection with as few socket writes as the model
allows (the outbox's ``Sink``).

Every piece the model yields is still its own ``chunk`` frame, as the protocol promises,
and the first one of a run goes out at once. After that, frames that pile up while the
model runs ahead without waiting join a batch of this writer's, written in one
``transport.write``: on the next turn of the event loop (so a model that pauses between
chunks still has each one sent as it is yielded), as soon as ``MAX_BATCH`` bytes or
``MAX_FRAMES`` frames are waiting, or with a frame that ends a run (``done``, an error).
One write for many frames is where most of a fast stream's time went (a system call per
frame). Backpressure holds: after each batch the writer waits while the socket's buffer
is over websockets' write limit, so the model is paused there.

Frames are the outbox's bytes, sent as text frames as they are (encoded once): a frame is
``websocket_frames.text_frame_header`` and the bytes, framed here rather than through
websockets' ``Frame`` objects (a third of a chunk's cost). That holds because the server
negotiates no extension (``compression=None`` in server.py: permessage-deflate would
rewrite payloads). Frames that websockets writes itself (pongs, close) are whole frames
between batches. A batch still waiting when the connection leaves the OPEN state is
dropped: after a close frame nothing may follow (the outbox keeps the frames of a session
that can resume).
"""

from __future__ import annotations

import asyncio
from typing import Final

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from ws_server.websocket_frames import text_frame_header

MAX_BATCH: Final = 64 * 1024
# Frames in one batch at most: each batch ends with a turn of the event loop, so other
# sessions (their first chunks above all) never wait long behind a fast stream.
MAX_FRAMES: Final = 64


class FrameWriter:
    """The frames of one session on one connection."""

    # Slots: one per open connection, and idle connections are the many.
    __slots__ = (
        "_batch",
        "_frames",
        "_loop",
        "_pending",
        "_protocol",
        "_scheduled",
        "connection",
    )

    def __init__(self, connection: ServerConnection) -> None:
        self.connection = connection
        self._protocol = connection.protocol
        if self._protocol.extensions:  # server.py negotiates none; framing here needs that
            raise RuntimeError("FrameWriter writes plain text frames: no extension may be on")
        self._batch: list[bytes] = []  # framed, not yet written
        self._pending = 0  # bytes in the batch
        self._frames = 0
        self._scheduled = False
        self._loop = asyncio.get_running_loop()

    async def write(self, data: bytes) -> None:
        """Send one frame: at once if nothing is waiting, else with the batch. Never
        raises: a connection that is closing takes no more (the outbox keeps the frame
        for a resume), and its adapter notices the close on its own."""
        if self._protocol.state is not State.OPEN:
            await self._until_closed()
            return
        self.enqueue(data)
        if self._frames == 1 and not self._scheduled:
            # Nothing was waiting: this frame goes now (the first chunk is never delayed),
            # and whatever the model yields before the loop comes round joins the next write.
            self.flush()
            self._scheduled = True
            self._loop.call_soon(self._flush_soon)
        elif self._pending >= MAX_BATCH or self._frames >= MAX_FRAMES:
            self.flush()
            if not self.connection.paused:  # let other sessions run between batches
                await asyncio.sleep(0)
        else:
            return
        await self._drain()

    async def write_now(self, data: bytes) -> None:
        """Send one frame that ends a run (done, error) with whatever is batched, now."""
        if self._protocol.state is not State.OPEN:
            await self._until_closed()
            return
        self.enqueue(data)
        self.flush()
        await self._drain()

    def post(self, data: bytes) -> None:
        """Send one frame without waiting (a model's event): with the next batch, on the
        loop's next turn at the latest."""
        if self._protocol.state is not State.OPEN:
            return
        self.enqueue(data)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._flush_soon)

    def enqueue(self, data: bytes) -> None:
        """Add a frame to the batch without writing it (a resume's replay: nothing may
        come between; ``flush`` follows)."""
        if self._protocol.state is not State.OPEN:
            return
        batch = self._batch
        batch.append(text_frame_header(len(data)))
        batch.append(data)
        self._pending += len(data)
        self._frames += 1

    async def _until_closed(self) -> None:
        """The connection is closing: wait until it is gone (and its session has let go
        of this writer), rather than let a model that never awaits spin the loop."""
        try:
            await self.connection.wait_closed()
        except Exception:
            pass
        await asyncio.sleep(0)  # the adapter's read loop notices, and detaches

    async def _drain(self) -> None:
        """Wait here while the peer is slow: backpressure reaches the model."""
        try:
            await self.connection.drain()
        except (ConnectionClosed, OSError):
            pass

    def _flush_soon(self) -> None:
        self._scheduled = False
        self.flush()

    def flush(self) -> None:
        """Write whatever frames are waiting, in one go (none, once the connection has
        left the OPEN state: a close frame went out, nothing may follow it)."""
        if not self._frames:
            return
        batch = self._batch
        data = b"".join(batch)
        batch.clear()
        self._pending = self._frames = 0
        if self._protocol.state is State.OPEN:
            self.connection.transport.write(data)
