"""Bare websockets + uvloop speaking protocol v1 with the bench model's loop inlined: the
ceiling of our own stack, to which AnythingAgent's figures are compared."""

from __future__ import annotations

import asyncio
import json
import sys
import uuid

import uvloop
from websockets.asyncio.server import ServerConnection, serve


async def handler(ws: ServerConnection) -> None:
    await ws.send(
        json.dumps(
            {
                "type": "ready",
                "session_id": uuid.uuid4().hex[:16],
                "model": "bench",
                "version": "ref",
            }
        )
    )
    turn = 0
    async for data in ws:
        turn += 1
        request = json.loads(json.loads(data)["content"])
        chunk = "x" * int(request["size"])
        for _ in range(int(request["chunks"])):
            await ws.send(f'{{"type":"chunk","turn":{turn},"content":{json.dumps(chunk)}}}')
        await ws.send(f'{{"type":"done","turn":{turn},"reason":"stop"}}')


async def main(port: int) -> None:
    async with serve(handler, "127.0.0.1", port) as server:
        print(
            f"listening on ws://127.0.0.1:{server.sockets[0].getsockname()[1]}",
            file=sys.stderr,
            flush=True,
        )
        await asyncio.Future()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 0))
