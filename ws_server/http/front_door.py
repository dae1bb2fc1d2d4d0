"""Where every connection to the port goes first: WebSocket chat, or plain HTTP.

websockets serves WebSocket handshakes (and answers them through ``process_request``), but
it reads no request bodies and writes only whole responses. So the first request's head
decides, once per connection: a ``GET`` asking to upgrade goes to websockets' own
connection, anything else to ``HttpConnection`` (bodies, streamed responses, keep-alive).
``Entrance`` is what ``serve(create_connection=...)`` is given (websockets documents that
seam for wrapping its connection); it keeps the plain-HTTP connections so that a shutdown
can close them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Final, cast

from websockets.asyncio.server import ServerConnection

from ws_server.exceptions import HandshakeRefused
from ws_server.http.http1 import HttpConnection, Responder
from ws_server.http.limits import ConnectionCounter

# A request head longer than this is left to websockets to refuse (431).
HEAD_LIMIT: Final = 16 * 1024


class FrontDoor(asyncio.Protocol):
    """Reads the first request's head of one connection, then hands the connection on."""

    __slots__ = ("_buffer", "_entrance", "_timer", "_transport", "_websocket", "protocol")

    def __init__(self, websocket: ServerConnection, entrance: Entrance) -> None:
        self._websocket = websocket
        # What websockets' serve() expects of the connection it made (its subprotocol
        # hook checks it): the sans-I/O protocol.
        self.protocol = websocket.protocol
        self._entrance = entrance
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        if self._entrance.refuse(transport):
            transport.abort()
            return
        self._transport = transport
        self._entrance.waiting.add(self)
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._entrance.head_timeout, transport.abort)

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        searched = max(len(buffer) - 3, 0)  # a head trickled in is not searched over and over
        buffer += data
        end = buffer.find(b"\r\n\r\n", searched)
        if end < 0 and len(buffer) < HEAD_LIMIT:
            return
        head = bytes(buffer[: end if end >= 0 else HEAD_LIMIT]).lower()
        upgrade = head.startswith(b"get ") and b"\nupgrade:" in head and b"websocket" in head
        if upgrade:
            self._hand_over(self._websocket)
        else:
            peer = self._transport.get_extra_info("peername") if self._transport else None
            address = str(peer[0]) if isinstance(peer, tuple) and peer else str(peer or "")
            self._hand_over(self._entrance.http_connection(address))

    def _hand_over(self, protocol: asyncio.Protocol) -> None:
        transport = self._transport
        assert transport is not None
        self._stop_waiting()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        data, self._buffer = bytes(self._buffer), bytearray()
        protocol.data_received(data)

    def eof_received(self) -> bool | None:
        return None  # gone before saying anything: close

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_waiting()

    def _stop_waiting(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._entrance.waiting.discard(self)

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()


class Entrance:
    """Makes a ``FrontDoor`` per accepted connection and keeps track of the plain-HTTP
    ones (and those still undecided) until they close."""

    def __init__(
        self,
        respond: Responder,
        *,
        body_limit: int,
        head_timeout: float,
        refuse: Callable[[asyncio.Transport], bool],
        connections: ConnectionCounter,
    ) -> None:
        self.respond = respond
        self.connections = connections  # plain-HTTP connections count as WebSockets do
        self.body_limit = body_limit
        self.head_timeout = head_timeout
        self.refuse = refuse  # a peer to cut off at once (a networked sandbox)
        self.waiting: set[FrontDoor] = set()
        self.http: set[HttpConnection] = set()
        self._none_open = asyncio.Event()

    def __call__(self, *args: Any, **kwargs: Any) -> FrontDoor:
        """websockets' ``create_connection``: its connection, behind a front door."""
        connection = ServerConnection(*args, **kwargs)
        # The two attributes websockets' connection_made sets, given now. The front door
        # calls it only once the request head is in, so many connections are made before
        # the first has them; CPython 3.11 then stops sharing the class's attribute keys
        # between instances, and every connection's __dict__ took 1584 bytes, not 288.
        connection.recv_messages = None  # type: ignore[assignment]
        connection.transport = None  # type: ignore[assignment]
        return FrontDoor(connection, self)

    def http_connection(self, peer: str) -> HttpConnection:
        """A plain-HTTP connection from ``peer``, counted against the connection limits
        (over them, its first request is answered with the refusal)."""
        refusal: HandshakeRefused | None = None
        try:
            self.connections.check(peer)
        except HandshakeRefused as exc:
            refusal = exc
        connection = HttpConnection(
            self.respond,
            body_limit=self.body_limit,
            head_timeout=self.head_timeout,
            on_close=self._closed,
            refusal=refusal,
        )
        if refusal is None:
            self.connections.opened(peer)
            self.http.add(connection)
        return connection

    def _closed(self, connection: HttpConnection) -> None:
        if connection in self.http:
            self.http.discard(connection)
            self.connections.closed(connection.peer)
        if not self.http:
            self._none_open.set()

    async def wait_closed(self) -> None:
        """Until no plain-HTTP connection is open."""
        while self.http:
            self._none_open.clear()
            await self._none_open.wait()

    def close_idle(self) -> None:
        """The server stops: undecided connections go, idle HTTP ones close, busy ones
        close after their answer."""
        for door in list(self.waiting):
            door.abort()
        for connection in list(self.http):
            connection.close_idle()

    def abort(self) -> None:
        for connection in list(self.http):
            connection.abort()
