"""The seed specification's isolation sketch, as a server: a fresh interpreter per request.

For each user message it runs ``python spawn_runner.py`` (the model loaded from scratch,
request on stdin, reply on stdout, as ``subprocess.Popen(...).communicate(input)`` in the
seed) and only then sends the chunks: no streaming, a process start per turn. This is
what isolated mode's long-lived workers are measured against.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import uvloop
import v1
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

HERE = Path(__file__).resolve().parent
RUNNER = HERE / "spawn_runner.py"
MODEL_DIR = HERE.parent / "models" / "bench"


async def handler(ws: ServerConnection) -> None:
    await ws.send(v1.ready_frame("spawn"))
    turn = 0
    try:
        async for data in ws:
            turn += 1
            content = json.loads(data)["content"]
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-s",
                "-E",
                str(RUNNER),
                str(MODEL_DIR),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
            )
            output, _ = await process.communicate(content.encode())
            for chunk in output.decode().splitlines():
                await ws.send(v1.chunk_frame(turn, chunk))
            await ws.send(v1.done_frame(turn))

    except ConnectionClosed:  # the client left mid-turn
        pass


async def main() -> None:
    async with serve(handler, "127.0.0.1", 0) as server:
        v1.announce(server.sockets[0].getsockname()[1])
        await asyncio.Future()


if __name__ == "__main__":
    uvloop.run(main())
