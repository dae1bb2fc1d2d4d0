"""Starlette's WebSocket route on uvicorn (uvloop, httptools, websockets' sans-I/O
protocol: what ``uvicorn[standard]`` picks) speaking protocol v1: a peer users might pick.

One ``await send_text`` per chunk; no access log, no lifespan (nothing to start).
"""

from __future__ import annotations

import socket

import uvicorn
import v1
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect


async def chat(websocket: WebSocket) -> None:
    await websocket.accept()
    await websocket.send_text(v1.ready_frame("starlette"))
    turn = 0
    try:
        while True:
            data = await websocket.receive_text()
            turn += 1
            chunks, content = v1.parse_request(data)
            for _ in range(chunks):
                await websocket.send_text(v1.chunk_frame(turn, content))
            await websocket.send_text(v1.done_frame(turn))
    except WebSocketDisconnect:
        pass


app = Starlette(routes=[WebSocketRoute("/v1/chat/{model}", chat)])


def main() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(2048)  # uvicorn's default backlog; listening now, so no connect is refused
    config = uvicorn.Config(
        app,
        loop="uvloop",
        http="httptools",
        ws="auto",
        lifespan="off",
        access_log=False,
        log_level="warning",
    )
    v1.announce(sock.getsockname()[1])
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
