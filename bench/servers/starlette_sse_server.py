"""A minimal OpenAI-style SSE server: Starlette on uvicorn (uvloop, httptools), one route.

``POST /v1/chat/completions`` parses the JSON body, reads the last message's content as the
bench model does (``{"chunks": N, "size": S}``), and streams N ``chat.completion.chunk``
events of S characters (``role`` in the first delta only), a last chunk with
``finish_reason`` ``stop``, then ``data: [DONE]``: the events AnythingAgent sends, from a
``StreamingResponse`` over an async generator (``text/event-stream``, chunked). Each
chunk's content is JSON-encoded as it is sent, the per-chunk work every server must do.
Always streamed (``stream`` is not read); no access log, no lifespan.
"""

from __future__ import annotations

import json
import secrets
import socket
import time
from collections.abc import AsyncIterator

import uvicorn
import v1
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

DONE = b"data: [DONE]\n\n"
TAIL = ',"logprobs":null,"finish_reason":null}]}\n\n'


def _dumps(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


async def completions(request: Request) -> StreamingResponse:
    body = json.loads(await request.body())
    asked = json.loads(body["messages"][-1]["content"])
    chunks, content = int(asked["chunks"]), "x" * int(asked["size"])
    head = {
        "id": "chatcmpl-" + secrets.token_hex(12),
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": str(body.get("model", "bench")),
        "system_fingerprint": "starlette",
    }
    delta = f'data: {_dumps(head)[:-1]},"choices":[{{"index":0,"delta":{{'

    async def events() -> AsyncIterator[bytes]:
        role = '"role":"assistant",'
        for _ in range(chunks):
            yield f'{delta}{role}"content":{_dumps(content)}}}{TAIL}'.encode()
            role = ""
        finish = '"role":"assistant"' if not chunks else ""
        yield f'{delta}{finish}}},"logprobs":null,"finish_reason":"stop"}}]}}\n\n'.encode()
        yield DONE

    return StreamingResponse(
        events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )


app = Starlette(routes=[Route("/v1/chat/completions", completions, methods=["POST"])])


def main() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(2048)
    config = uvicorn.Config(
        app,
        loop="uvloop",
        http="httptools",
        ws="none",
        lifespan="off",
        access_log=False,
        log_level="warning",
    )
    v1.announce(sock.getsockname()[1])  # the line bench/run.py waits for
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
