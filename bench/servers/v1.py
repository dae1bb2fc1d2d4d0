"""Protocol v1 as every reference server speaks it, so they all do the same work per chunk.

The frames are the templates AnythingAgent's ``ws_server.protocol`` produces (``type``
first, compact JSON), and each chunk's content is JSON-encoded as it is sent, as a server
that knows nothing of its model's output must. A request is a ``message`` frame whose
content is ``{"chunks": N, "size": S}``: the bench model's contract (bench/models/bench).

Imported by the reference servers, which run as scripts from this directory.
"""

from __future__ import annotations

import json
import sys
import uuid

DONE_STOP = '{{"type":"done","turn":{turn},"reason":"stop"}}'


def ready_frame(version: str) -> str:
    """The frame a session opens with."""
    return json.dumps(
        {
            "type": "ready",
            "session_id": uuid.uuid4().hex[:16],
            "model": "bench",
            "version": version,
        },
        separators=(",", ":"),
    )


def chunk_frame(turn: int, content: str) -> str:
    """One chunk, its content encoded now (the per-chunk work every server must do)."""
    return f'{{"type":"chunk","turn":{turn},"content":{json.dumps(content)}}}'


def done_frame(turn: int) -> str:
    """The end of a turn that ran to completion."""
    return DONE_STOP.format(turn=turn)


def parse_request(data: str | bytes) -> tuple[int, str]:
    """A message frame's content ``{"chunks": N, "size": S}``: N, and the chunk of S chars."""
    request = json.loads(json.loads(data)["content"])
    return int(request["chunks"]), "x" * int(request["size"])


def announce(port: int) -> None:
    """The line bench/run.py waits for (the same one AnythingAgent logs)."""
    print(f"listening on ws://127.0.0.1:{port}", file=sys.stderr, flush=True)
