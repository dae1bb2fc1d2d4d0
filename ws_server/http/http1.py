"""Plain HTTP/1.1 on the chat port: requests with bodies, streamed responses, keep-alive.

The front door (``front_door.py``) hands every connection that is not a WebSocket upgrade
here. h11 (sans-I/O, as websockets is) parses requests and frames responses; this module
only moves bytes and awaits. A request is read whole (within ``--max-frame-size``, else
413) and answered by the route table; a ``Streamed`` answer goes out chunked while it is
produced, and the client leaving is noticed at once (its ``gone`` future), so that a
model's turn stops with it. Connections are kept alive between requests, as the OpenAI
SDK's pool expects, for ``KEEP_ALIVE`` seconds.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import time
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Final, cast

import h11
from websockets.datastructures import Headers
from websockets.http11 import Response

from ws_server import protocol
from ws_server.exceptions import HandshakeRefused, UpgradeRequired
from ws_server.http.exchange import HttpRequest, Streamed
from ws_server.http.routes import error_response

log = logging.getLogger("anything_agent.http")

# Seconds an idle connection is kept for its client's next request (longer than the
# OpenAI SDK's pool keeps one, so that the server is rarely the side that closes first).
KEEP_ALIVE: Final = 15.0
# Bytes a client may send beyond the request being answered (pipelined requests); past
# them, what follows is dropped and the connection closes after the answer (reading goes
# on, so that a client leaving is still seen at once).
PIPELINE_LIMIT: Final = 64 * 1024
SERVER: Final = ("Server", "anything-agent")
COMPLETIONS: Final = "/v1/chat/completions"  # its errors take OpenAI's envelope

Responder = Callable[[HttpRequest], Awaitable[Response | Streamed | None]]


class HttpConnection(asyncio.Protocol):
    """One client's plain-HTTP connection: its requests answered one at a time."""

    def __init__(
        self,
        respond: Responder,
        *,
        body_limit: int,
        head_timeout: float,
        on_close: Callable[[HttpConnection], None],
        refusal: HandshakeRefused | None = None,
    ) -> None:
        self._respond = respond
        self._refusal = refusal  # over a connection limit: its first request gets this
        self._body_limit = body_limit
        self._head_timeout = head_timeout
        self._on_close = on_close
        self._h11 = h11.Connection(h11.SERVER)
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self._readable: asyncio.Future[None] | None = None
        self._writable: asyncio.Future[None] | None = None  # set while the transport is paused
        self._gone: asyncio.Future[None] = self._loop.create_future()
        self._task: asyncio.Task[None] | None = None
        self._answering = False  # a request is read and its answer not yet sent
        self._unread = 0  # bytes received while answering
        self._overflow = False  # more than PIPELINE_LIMIT of them: close after the answer
        self._method = ""  # of the request being read or answered
        self._target = ""
        self._started = False
        self._head = b""  # a response's head, written with the first of its body
        self.closing = False  # the server is stopping: no request after the current one
        self.peer = ""

    # ------------------------------------------------------------------ asyncio protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self._transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]) if isinstance(peer, tuple) and peer else str(peer or "")
        self._task = self._loop.create_task(self._serve())

    def data_received(self, data: bytes) -> None:
        if self._answering:
            self._unread += len(data)
            if self._unread > PIPELINE_LIMIT:
                self._overflow = True
            if self._overflow:
                return
        try:
            self._h11.receive_data(data)
        except RuntimeError:  # after the connection's end: nothing more is read
            return
        self._wake()

    def eof_received(self) -> bool | None:
        """The client closed its side: like uvicorn, taken as leaving (a turn stops)."""
        try:
            self._h11.receive_data(b"")
        except RuntimeError:
            pass
        self._wake()
        return None  # the transport closes, connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._gone.done():
            self._gone.set_result(None)
        self._wake()
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        self._on_close(self)

    def pause_writing(self) -> None:
        if self._writable is None or self._writable.done():
            self._writable = self._loop.create_future()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    def _wake(self) -> None:
        if self._readable is not None and not self._readable.done():
            self._readable.set_result(None)

    # ------------------------------------------------------------------ the ResponseStream
    @property
    def gone(self) -> asyncio.Future[None]:
        return self._gone

    @property
    def started(self) -> bool:
        return self._started

    def start(self, status: int, headers: list[tuple[str, str]]) -> None:
        self._started = True
        reason = HTTPStatus(status).phrase.encode()
        headers = [*headers, SERVER, ("Date", _http_date())]
        response = h11.Response(status_code=status, headers=headers, reason=reason)
        if not self._gone.done():
            self._head = self._h11.send(response) or b""

    def send(self, data: bytes) -> None:
        if data:
            self._send(h11.Data(data=data))

    async def drain(self) -> None:
        writable = self._writable
        if writable is not None and not writable.done() and not self._gone.done():
            await writable

    def _send(self, event: h11.Event) -> None:
        """Frame ``event`` and write it, with the head still waiting (one write, so the
        first chunk of a stream never waits behind its head)."""
        if self._gone.done():
            return
        data = self._h11.send(event) or b""
        if self._head:
            data, self._head = self._head + data, b""
        if data and self._transport is not None:
            self._transport.write(data)

    # ------------------------------------------------------------------ requests
    def close_idle(self) -> None:
        """The server stops: an idle connection closes now, a busy one after its answer."""
        self.closing = True
        if not self._answering and self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    async def _serve(self) -> None:
        """Read a request, answer it, and again while the client keeps the connection."""
        assert self._transport is not None
        try:
            first = True
            while not self.closing:
                request = await self._read_request(self._head_timeout if first else KEEP_ALIVE)
                first = False
                if request is None:
                    break
                await self._answer(request)
                if self._h11.our_state is not h11.DONE or self._h11.their_state is not h11.DONE:
                    break
                if self._overflow:
                    break
                self._h11.start_next_cycle()
                self._answering, self._unread, self._started = False, 0, False
        except Exception:
            log.exception("HTTP connection from %s failed", self.peer)
        finally:
            self._transport.close()

    async def _read_request(self, idle_timeout: float) -> HttpRequest | None:
        """The next request, read whole; None when the client closed or went quiet (or a
        malformed or oversized one was answered with its error)."""
        request: h11.Request | None = None
        body = bytearray()
        try:
            async with asyncio.timeout(idle_timeout) as deadline:
                while True:
                    event = self._h11.next_event()
                    if event is h11.NEED_DATA:
                        if self._gone.done():
                            return None
                        self._readable = self._loop.create_future()
                        await self._readable
                        continue
                    if isinstance(event, h11.Request):
                        request = event
                        self._method = event.method.decode("ascii", "replace")
                        self._target = event.target.decode("latin-1")
                        # From the first byte of a request, it must be whole in time.
                        deadline.reschedule(self._loop.time() + self._head_timeout)
                        if self._refusal is not None:
                            refusal = self._refusal
                            self._error(refusal.http_status, refusal.code, refusal.message)
                            return None
                        if not self._admit_body(event):
                            return None
                    elif isinstance(event, h11.Data):
                        body += event.data
                        if len(body) > self._body_limit:
                            self._refuse_size()
                            return None
                    elif isinstance(event, h11.EndOfMessage):
                        assert request is not None
                        self._answering = True
                        return _request(request, bytes(body), self.peer)
                    else:  # ConnectionClosed, PAUSED
                        return None
        except TimeoutError:
            if request is not None:
                self._error(408, "bad_request", "the request did not arrive in time")
            return None
        except h11.RemoteProtocolError as exc:
            status = exc.error_status_hint
            self._error(status, "bad_request", f"malformed HTTP request: {exc}")
            return None

    def _admit_body(self, request: h11.Request) -> bool:
        """Refuse a declared body over the limit before it is sent; tell a client that
        waits for it (``Expect: 100-continue``, as curl does for large bodies) to go on."""
        for name, value in request.headers:
            if name == b"content-length" and int(value) > self._body_limit:
                self._refuse_size()
                return False
        if self._h11.they_are_waiting_for_100_continue:
            self._send(h11.InformationalResponse(status_code=100, headers=[]))
        return True

    def _refuse_size(self) -> None:
        self._error(
            413,
            "bad_request",
            f"the request body is over this server's limit of {self._body_limit} bytes "
            "(--max-frame-size)",
        )

    def _error(self, status: int, code: str, message: str) -> None:
        """Answer with an error and close: what follows on the connection can't be trusted."""
        if self._h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        if self._target.partition("?")[0] == COMPLETIONS:
            body = protocol.encode_api_error(code, message, status)
        else:
            body = protocol.encode_http_error(code, message)
        headers = [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
            ("Connection", "close"),
        ]
        self.start(status, headers)
        if self._method != "HEAD":
            self.send(body)
        self._send(h11.EndOfMessage())

    async def _answer(self, request: HttpRequest) -> None:
        answer = await self._respond(request)
        if isinstance(answer, Streamed):
            answer = await answer.run(self)
            if answer is None:  # streamed: end the body (or the client is gone)
                if self._started:
                    self._send(h11.EndOfMessage())
                elif not self._gone.done():  # nothing said: a fault of ours
                    self._error(500, "internal", "the server could not answer")
                return
        if answer is None:  # only WebSocket handshakes go on; this is no handshake
            answer = error_response(
                UpgradeRequired("open a WebSocket on a connection of its own, not after a request")
            )
        headers = [(k, v) for k, v in answer.headers.raw_items() if k.lower() != "server"]
        if self.closing:
            headers.append(("Connection", "close"))
        self.start(answer.status_code, headers)
        if request.method != "HEAD":
            self.send(bytes(answer.body))
        self._send(h11.EndOfMessage())


_date: tuple[int, str] = (0, "")


def _http_date() -> str:
    """The ``Date`` header's value, made once a second."""
    global _date
    now = int(time.time())
    if _date[0] != now:
        _date = (now, email.utils.formatdate(now, usegmt=True))
    return _date[1]


def _request(request: h11.Request, body: bytes, peer: str) -> HttpRequest:
    headers = Headers()
    for name, value in request.headers.raw_items():
        headers[name.decode("latin-1")] = value.decode("latin-1")
    return HttpRequest(
        request.method.decode("ascii"), request.target.decode("latin-1"), headers, body, peer
    )
