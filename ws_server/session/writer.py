"""Writes a session's frames to its connection with as few socket writes as the model
allows (the outbox's ``Sink``).

Every piece the model yields is still its own ``chunk`` frame, as the protocol promises,
and the first one of a turn goes out at once. After that, frames that pile up while the
model runs ahead without waiting are encoded straight into the connection's sans-I/O
protocol and written together: on the next turn of the event loop (so a model that pauses
between chunks still has each one sent as it is yielded), or as soon as ``MAX_BATCH``
bytes are waiting. One ``write`` for many frames is where most of a fast stream's time went
(one system call per frame). Backpressure holds: after each batch the writer waits while
the socket's buffer is over websockets' write limit, so the model is paused there.

Frames are the outbox's bytes, sent as text frames as they are (encoded once). This uses
the websockets connection's documented sans-I/O side, as ``broadcast()`` does:
``protocol.send_text`` and ``data_to_send``, then ``transport.write`` and ``drain``.
"""

from __future__ import annotations

import asyncio
from typing import Final

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

MAX_BATCH: Final = 64 * 1024
# Frames in one batch at most: each batch ends with a turn of the event loop, so other
# sessions (their first chunks above all) never wait long behind a fast stream.
MAX_FRAMES: Final = 64


class FrameWriter:
    """The frames of one session on one connection."""

    # Slots: one per open connection, and idle connections are the many.
    __slots__ = ("_frames", "_loop", "_pending", "_protocol", "_scheduled", "connection")

    def __init__(self, connection: ServerConnection) -> None:
        self.connection = connection
        self._protocol = connection.protocol
        self._pending = 0  # bytes encoded into the protocol, not yet written
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
        self._protocol.send_text(data)
        self._pending += len(data)
        self._frames += 1
        if self._pending == len(data) and not self._scheduled:
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
        """Queue a frame without waiting (a resume's replay: nothing may come between)."""
        if self._protocol.state is State.OPEN:
            self._protocol.send_text(data)
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
        """Write whatever frames are waiting, in one go."""
        if not self._pending:
            return
        self._pending = self._frames = 0
        data = self._protocol.data_to_send()
        transport = self.connection.transport
        if all(data):
            if data:
                transport.write(b"".join(data))
            return
        for item in data:  # an end-of-stream marker among them: the connection is closing
            if item:
                transport.write(item)
            elif transport.can_write_eof():
                transport.write_eof()
