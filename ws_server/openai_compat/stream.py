"""One OpenAI-compatible reply: a session's frames turned into OpenAI's, and written.

A ``CompletionStream`` is both the ``Encoding`` and the ``Sink`` of the short-lived
session's outbox (``session/outbox.py``): the conversation core runs the turn exactly as
for a WebSocket client (timeouts, cancel, errors, ``done`` once), and what it emits comes
out here as ``chat.completion.chunk`` events, or is gathered into one ``chat.completion``.
Nothing goes out before the first chunk, so a turn that fails at once is answered with a
plain error status; a quiet stream gets ``: ping`` comments (which also send the head).
Events are batched like WebSocket frames (``session/writer.py``): the first at once, those
yielded while the loop is busy together, with backpressure on the model.
"""

from __future__ import annotations

import asyncio
from http import HTTPStatus
from typing import Any, Final

from websockets.datastructures import Headers
from websockets.http11 import Response

from ws_server import protocol
from ws_server.http.exchange import ResponseStream
from ws_server.openai_compat import wire

MAX_BATCH: Final = 64 * 1024
MAX_EVENTS: Final = 64
SSE_HEADERS: Final = (
    ("Content-Type", "text/event-stream; charset=utf-8"),
    ("Cache-Control", "no-cache"),
    ("X-Accel-Buffering", "no"),  # nginx: pass each event on as it comes
)
# Errors after which a retry would run the model again (its side effects too): the
# OpenAI SDK, which retries 5xx twice by default, honours this header.
NO_RETRY: Final = frozenset(
    ("model_error", "model_crashed", "resource_exhausted", "timeout", "interrupted", "internal")
)
SHUTTING_DOWN: Final = "the server is shutting down; the reply is incomplete"


class CompletionStream:
    """The reply to one ``POST /v1/chat/completions``, streamed or whole."""

    def __init__(
        self,
        reply: wire.Reply,
        *,
        prompt: str,
        stream: ResponseStream,
        streaming: bool,
        include_usage: bool,
        headers: list[tuple[str, str]],
        max_bytes: int = 4 * 1024 * 1024,
    ) -> None:
        self.reply = reply
        self.finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.failure: tuple[str, str] | None = None  # the error code and message, if any
        self.retry_after: int | None = None  # with an overloaded model's failure
        self._prompt = prompt
        self._out = stream
        self._streaming = streaming
        self._usage = include_usage or not streaming
        self._events = wire.ChunkEvents(reply, include_usage)
        self._headers = headers  # beside the SSE ones (CORS)
        self._text: list[str] = []  # the reply, kept when it is answered whole or counted
        self._reasoning: list[str] = []  # the model's events, for a reply answered whole
        self._kept = 0  # characters of it
        self._max = max_bytes  # kept at most (a whole reply past it ends with "length")
        self._quiet = 0  # chunks gathered without a write (a reply answered whole)
        self._output = False  # whether a chunk went out
        self._finish_reason = "stop"
        self._batch: list[bytes] = []
        self._batched = 0
        self._scheduled = False
        self._loop = asyncio.get_running_loop()
        self._last_write = self._loop.time()
        self._keepalive: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------------ the outbox's Encoding
    def chunk(self, seq: int, turn: int, content: str) -> bytes:
        first = not self._output
        self._output = True
        if self._usage and self._kept < self._max:
            self._text.append(content)
            self._kept += len(content)
            if self._kept >= self._max and not self._streaming:
                self._finish_reason = "length"
        return self._events.content(content, first) if self._streaming else b""

    def event(self, seq: int, turn: int, name: str, data: dict[str, Any]) -> bytes:
        text = wire.event_text(name, data)
        if not self._streaming:
            if name != "queued":  # the server's, of no use once the reply is whole
                self._reasoning.append(text)
            return b""
        first = not self._output
        self._output = True
        return self._events.reasoning(text, first)

    def error(
        self,
        seq: int,
        code: protocol.ErrorCode,
        message: str,
        turn: int | None,
        retry_after: int | None = None,
    ) -> bytes:
        if code == "timeout":  # ends as finish_reason "length", with what came so far
            return b""
        self.failure = (code, message)
        self.retry_after = retry_after
        if self._streaming and self._streamed:
            return wire.error_event(code, message, wire.status_of(code))
        return b""

    def done(self, seq: int, turn: int, reason: protocol.DoneReason) -> bytes:
        if not self.finished.done():
            self.finished.set_result(None)
        self._stop_keepalive()
        if reason == "cancelled" and self.failure is None:  # only a shutdown cancels
            self.failure = ("unavailable", SHUTTING_DOWN)
            if self._streaming and self._streamed:
                return wire.error_event("unavailable", SHUTTING_DOWN, 503) + wire.DONE_EVENT
            return b""
        if self.failure is not None:
            return wire.DONE_EVENT if self._streaming and self._streamed else b""
        if reason == "timeout":
            self._finish_reason = "length"
        if not self._streaming:
            return b""
        data = self._events.finish(self._finish_reason, not self._output)
        if self._usage:
            data += self._events.usage(self._figures())
        return data + wire.DONE_EVENT

    @property
    def _streamed(self) -> bool:
        """Whether the client has the head already (an error must then be an event)."""
        return self._output or self._out.started

    def _figures(self) -> dict[str, int]:
        return wire.usage(self._prompt, "".join(self._text))

    # ------------------------------------------------------------------ the outbox's Sink
    async def write(self, data: bytes) -> None:
        """An event that may go with those that follow."""
        if not data:  # gathered, not sent: still let the loop run now and then
            self._quiet += 1
            if not self._quiet % MAX_EVENTS:
                await asyncio.sleep(0)
            return
        if self._out.gone.done():
            await asyncio.sleep(0)  # the endpoint notices and stops the turn
            return
        self._batch.append(data)
        self._batched += len(data)
        if len(self._batch) == 1 and not self._scheduled:
            self.flush()  # the first event of a run goes at once
            self._scheduled = True
            self._loop.call_soon(self._flush_soon)
        elif self._batched >= MAX_BATCH or len(self._batch) >= MAX_EVENTS:
            self.flush()
            await asyncio.sleep(0)  # let other sessions run between batches
        else:
            return
        await self._out.drain()

    def post(self, data: bytes) -> None:
        """A model event's chunk: with the next batch, on the loop's next turn at latest."""
        if not data or self._out.gone.done():
            return
        self._batch.append(data)
        self._batched += len(data)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._flush_soon)

    async def write_now(self, data: bytes) -> None:
        """An event that ends a run (the last ones): out now, with any batch."""
        if data:
            self._batch.append(data)
        self.flush()
        await self._out.drain()

    def _flush_soon(self) -> None:
        self._scheduled = False
        self.flush()

    def flush(self) -> None:
        if not self._batch:
            return
        if not self._out.started:
            self._out.start(200, [*SSE_HEADERS, *self._headers])
        data = self._batch[0] if len(self._batch) == 1 else b"".join(self._batch)
        self._batch.clear()
        self._batched = 0
        self._out.send(data)
        self._last_write = self._loop.time()

    # ------------------------------------------------------------------ keepalive
    def keep_alive(self, interval: float) -> None:
        """Send ``: ping`` after ``interval`` seconds without output, until the reply ends."""
        if self._streaming and interval > 0:
            self._keepalive = self._loop.call_at(self._last_write + interval, self._ping, interval)

    def _ping(self, interval: float) -> None:
        self._keepalive = None
        if self.finished.done() or self._out.gone.done():
            return
        if self._loop.time() - self._last_write >= interval * 0.99 and not self._batch:
            self._batch.append(wire.PING)
            self.flush()
        self.keep_alive(interval)

    def _stop_keepalive(self) -> None:
        if self._keepalive is not None:
            self._keepalive.cancel()
            self._keepalive = None

    def close(self) -> None:
        self._stop_keepalive()

    def refused(self) -> Response | None:
        """The turn was refused before it began (its error is in): end a stream whose head
        went out already with ``[DONE]``."""
        if self._streaming and self._streamed:
            self._batch.append(wire.DONE_EVENT)
            self.flush()
        return self.answer()

    def fail(self, code: str, message: str) -> Response | None:
        """The session could not start: the error as an event if the head is out (a
        ping went), else as the answer."""
        self.failure = (code, message)
        self._stop_keepalive()
        if self._streaming and self._streamed:
            self._batch.append(wire.error_event(code, message, wire.status_of(code)))
            self._batch.append(wire.DONE_EVENT)
            self.flush()
        return self.answer()

    # ------------------------------------------------------------------ the answer
    def answer(self) -> Response | None:
        """What the connection sends once the turn is over: None when it was streamed;
        else the whole reply, or the error that ended it before any output."""
        if self._streaming and self._streamed:
            return None
        if self.failure is not None:
            code, message = self.failure
            answer = error_answer(code, message, self._headers)
            if self.retry_after is not None:
                answer.headers["Retry-After"] = str(self.retry_after)
            return answer
        body = wire.completion(
            self.reply,
            "".join(self._text),
            self._finish_reason,
            self._figures(),
            "".join(self._reasoning),
        )
        return _response(200, body, self._headers)


def error_answer(code: str, message: str, headers: list[tuple[str, str]]) -> Response:
    """A turn that failed before any output, as an HTTP error in OpenAI's envelope."""
    status = wire.status_of(code)
    answer = _response(status, protocol.encode_api_error(code, message, status), headers)
    if code in NO_RETRY:
        answer.headers["x-should-retry"] = "false"
    return answer


def _response(status: int, body: bytes, extra: list[tuple[str, str]]) -> Response:
    headers = Headers(
        [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"),
            *extra,
        ]
    )
    return Response(status, HTTPStatus(status).phrase, headers, body)
