"""Bare ``websockets`` + uvloop speaking protocol v1 with the bench model's loop inlined:
the ceiling of our own stack, to which every other figure is a ratio.

Library defaults throughout (the load generator does not offer permessage-deflate, so
none is negotiated), one ``await send`` per chunk as a handler written the obvious way does.
"""

from __future__ import annotations

import asyncio

import uvloop
import v1
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed


async def handler(ws: ServerConnection) -> None:
    await ws.send(v1.ready_frame("websockets"))
    turn = 0
    try:
        async for data in ws:
            turn += 1
            chunks, content = v1.parse_request(data)
            for _ in range(chunks):
                await ws.send(v1.chunk_frame(turn, content))
            await ws.send(v1.done_frame(turn))
    except ConnectionClosed:  # the client left mid-turn (the bench does, at a window's end)
        pass


async def main() -> None:
    async with serve(handler, "127.0.0.1", 0) as server:
        v1.announce(server.sockets[0].getsockname()[1])
        await asyncio.Future()


if __name__ == "__main__":
    uvloop.run(main())
