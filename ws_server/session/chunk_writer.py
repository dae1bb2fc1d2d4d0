"""Writes a turn's chunk frames with as few socket writes as the model allows.

Every piece the model yields is still its own ``chunk`` frame, as the protocol promises,
and the first one of a turn goes out at once. After that, frames that pile up while the
model runs ahead without waiting are encoded straight into the connection's sans-I/O
protocol and written together: on the next turn of the event loop (so a model that pauses
between chunks still has each one sent as it is yielded), or as soon as ``MAX_BATCH``
bytes are waiting. One ``write`` for many frames is where most of a fast stream's time went
(one system call per frame). Backpressure holds: after each batch the writer waits while
the socket's buffer is over websockets' write limit, so the model is paused there.

This uses the websockets connection's ``protocol`` (its sans-I/O state machine) and
``drain``; everything else (state checks, close handling) goes through ``send`` as usual.
"""

from __future__ import annotations

import asyncio
from typing import Final

from websockets.asyncio.server import ServerConnection
from websockets.protocol import State

MAX_BATCH: Final = 64 * 1024
# Frames in one batch at most: each batch ends with a turn of the event loop, so other
# sessions (their first chunks above all) never wait long behind a fast stream.
MAX_FRAMES: Final = 64


class ChunkWriter:
    """The chunk frames of one turn on one connection."""

    def __init__(self, connection: ServerConnection) -> None:
        self.connection = connection
        self._protocol = connection.protocol
        self._pending = 0  # bytes encoded into the protocol, not yet written
        self._frames = 0
        self._scheduled = False
        self._loop = asyncio.get_running_loop()

    async def write(self, frame: str) -> None:
        """Send one chunk frame: at once if nothing is waiting, else with the batch."""
        if self._protocol.state is not State.OPEN:
            self.flush()
            await self.connection.send(frame)  # raises ConnectionClosed as it should
            return
        data = frame.encode()
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
        await self.connection.drain()  # wait here while the peer is slow: backpressure

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
