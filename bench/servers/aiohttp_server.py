"""aiohttp's WebSocket on uvloop speaking protocol v1: a peer users might pick instead.

Library defaults (no heartbeat, no access log so a handshake costs what a chat costs, not
a log line), one ``await send_str`` per chunk.
"""

from __future__ import annotations

import asyncio
import socket

import uvloop
import v1
from aiohttp import WSMsgType, web


async def chat(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    await ws.send_str(v1.ready_frame("aiohttp"))
    turn = 0
    async for message in ws:
        if message.type != WSMsgType.TEXT:
            continue
        turn += 1
        chunks, content = v1.parse_request(message.data)
        for _ in range(chunks):
            await ws.send_str(v1.chunk_frame(turn, content))
        await ws.send_str(v1.done_frame(turn))
    return ws


async def main() -> None:
    app = web.Application()
    app.router.add_get("/v1/chat/{model}", chat)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    await web.SockSite(runner, sock).start()
    v1.announce(sock.getsockname()[1])
    try:
        await asyncio.Future()
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    uvloop.run(main())
