"""One plain-HTTP request and what answers it: a complete response, or a stream.

The route table (``routes.py``) takes an ``HttpRequest`` whichever way it came (a WebSocket
handshake, or a plain request read by ``http1.py``) and answers with websockets'
``Response`` (complete) or a ``Streamed`` response, whose body is written while it is
produced (Server-Sent Events). No sockets here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from websockets.datastructures import Headers
from websockets.http11 import Response


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """A request as the routes see it; ``path`` is the target, query included."""

    method: str
    path: str
    headers: Headers
    body: bytes = b""
    peer: str = ""  # the client's IP address


class ResponseStream(Protocol):
    """Where a streamed response writes (the HTTP connection it answers)."""

    @property
    def gone(self) -> asyncio.Future[None]:
        """Done once the client has disconnected."""

    @property
    def started(self) -> bool:
        """Whether the status line and headers went out."""

    def start(self, status: int, headers: list[tuple[str, str]]) -> None:
        """Send the status line and headers (the body follows, chunked)."""

    def send(self, data: bytes) -> None:
        """Send part of the body now (nothing once the client is gone)."""

    async def drain(self) -> None:
        """Wait while the client reads slower than the body is produced."""


@dataclass(frozen=True, slots=True)
class Streamed:
    """A response produced while it is sent. ``run`` streams to the ``ResponseStream``, or
    returns a complete ``Response`` instead (an error found before any output)."""

    run: Callable[[ResponseStream], Awaitable[Response | None]]
