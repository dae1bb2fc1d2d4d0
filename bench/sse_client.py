"""The SSE load generator: OpenAI chat completion streams on kept-alive HTTP/1.1 connections.

A plain ``asyncio.Protocol`` (the runner's loop is uvloop) holds each connection: it writes
the ``POST`` and parses the answer in ``data_received`` as the bytes come (status line and
headers, then the chunked body), and, like loadgen.py's picows sessions, sends the next
request from that same callback once ``data: [DONE]`` and the body's last chunk are in, so
the client spends no task, queue or ``await`` per event. Events are counted, not parsed
(each ends with a blank line: a count of ``\\n\\n``); once per request the first event is
JSON-parsed (a ``chat.completion.chunk`` whose delta has the role and the content asked
for), and the last ones checked (the ``finish_reason`` chunk, then ``data: [DONE]``), as is
the number of events. The server must keep the connection for every request.

Two modes, against any server answering ``POST /v1/chat/completions`` with the bench
model's contract (the last message's content ``{"chunks": N, "size": S}``):

- ``first_chunk``: one connection sends one-chunk requests back to back: the time from
  writing a request to receiving its first event (p50/p99/max) after a warm-up.
- ``throughput``: C connections send requests of N chunks back to back: chunk events/s over
  a window after a warm-up (counted as they come, so a request may straddle the window).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any, Final, cast

import loadgen

PATH: Final = "/v1/chat/completions"
MODEL: Final = "bench"
_HEAD_END: Final = b"\r\n\r\n"
_CRLF: Final = b"\r\n"
_EVENT_END: Final = b"\n\n"
_LAST: Final = b'"finish_reason":"stop"'
_DONE: Final = b"data: [DONE]\n\n"
_TAIL_KEPT: Final = 1024  # bytes of a body kept to check how it ended
# Parser states.
_HEAD, _SIZE, _DATA, _DATA_END, _TRAILER, _FIXED = range(6)


def request_bytes(port: int, chunks: int, size: int, model: str = MODEL) -> bytes:
    """A whole ``POST`` asking the bench model for ``chunks`` chunks of ``size`` characters,
    streamed (the same text a WebSocket ``message`` frame carries, as the last message)."""
    content = json.dumps({"chunks": chunks, "size": size})
    body = json.dumps(
        {"model": model, "stream": True, "messages": [{"role": "user", "content": content}]}
    ).encode()
    head = (
        f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Accept: text/event-stream\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


class SseConnection(asyncio.Protocol):
    """One kept-alive HTTP/1.1 connection running streamed requests back to back until
    stopped; counts events and requests, and may time first events."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.transport: asyncio.Transport | None = None
        self.request = b""
        self.expected = 0  # content events each request should bring
        self.content = ""  # what each should carry
        self.running = False
        self.in_request = False
        self.events = 0  # events received, every request
        self.requests = 0  # requests answered in full
        self.sent_at = 0  # perf_counter_ns() when the last request went; 0 once its event came
        self._received_at = 0  # perf_counter_ns() when the bytes being parsed came
        self.latencies: list[int] | None = None  # first-event times in ns, when timing
        self.errors: list[str] = []
        self._buffer = bytearray()
        self._state = _HEAD
        self._remaining = 0  # of the current chunk's data, or of a fixed-length body
        self._request_events = 0  # events of the current request
        self._first: bytearray | None = None  # the first event (or an error's body) so far
        self._tail = b""  # the body's last bytes
        self._last_byte = 0
        self._status = 0

    # ------------------------------------------------------------------ asyncio protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def connection_lost(self, exc: Exception | None) -> None:
        if self.running or self.in_request:
            self._error(f"connection closed by the server mid-run ({exc})")
        self.running = self.in_request = False
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self.sent_at:  # the first event may be in this: when it came, before parsing
            self._received_at = time.perf_counter_ns()
        buffer = self._buffer
        buffer += data
        position, end = 0, len(buffer)
        while position < end:
            state = self._state
            if state == _DATA:
                take = min(self._remaining, end - position)
                self._body(buffer, position, position + take)
                position += take
                self._remaining -= take
                if not self._remaining:
                    self._state = _DATA_END
            elif state == _SIZE:
                line_end = buffer.find(_CRLF, position)
                if line_end < 0:
                    break
                size = int(bytes(buffer[position:line_end]).split(b";", 1)[0], 16)
                position = line_end + 2
                if size:
                    self._state, self._remaining = _DATA, size
                else:
                    self._state = _TRAILER
            elif state == _DATA_END:
                if end - position < 2:
                    break
                if buffer[position : position + 2] != _CRLF:
                    self._fail("a chunk's data is not followed by CRLF")
                    return
                position += 2
                self._state = _SIZE
            elif state == _TRAILER:
                line_end = buffer.find(_CRLF, position)
                if line_end < 0:
                    break
                empty = line_end == position
                position = line_end + 2
                if empty:
                    self._state = _HEAD
                    self._answered()
            elif state == _HEAD:
                head_end = buffer.find(_HEAD_END, position)
                if head_end < 0:
                    break
                head = bytes(buffer[position:head_end])
                position = head_end + 4
                if not self._head(head):
                    return
            else:  # _FIXED: an error's body, with a Content-Length
                take = min(self._remaining, end - position)
                assert self._first is not None
                self._first += buffer[position : position + take]
                position += take
                self._remaining -= take
                if not self._remaining:
                    self._refused()
        del buffer[:position]

    # ------------------------------------------------------------------ parsing
    def _head(self, head: bytes) -> bool:
        """A response's status line and headers; False (the connection dropped) if they
        are not a streamed answer's."""
        status_line, _, fields = head.partition(_CRLF)
        parts = status_line.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            self._fail(f"not an HTTP response: {status_line[:80]!r}")
            return False
        self._status = int(parts[1])
        headers = {}
        for line in fields.split(_CRLF):
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip().lower()
        if headers.get(b"connection") == b"close":
            self._error("the server closes the connection after this answer (no keep-alive)")
        self._request_events = 0
        self._first = bytearray()
        self._tail = b""
        self._last_byte = 0
        if headers.get(b"transfer-encoding") == b"chunked":
            if self._status != 200:
                self._error(f"HTTP {self._status} (chunked)")
                self.running = False
            self._state = _SIZE
            return True
        self._state, self._remaining = _FIXED, int(headers.get(b"content-length", b"0"))
        if not self._remaining:
            self._refused()
        return True

    def _refused(self) -> None:
        """A whole answer that is no stream (an error): kept, and this connection stops."""
        body = bytes(self._first or b"")
        self._error(f"HTTP {self._status}, not a stream: {body[:160].decode(errors='replace')}")
        self._state = _HEAD
        self.running = False
        self._answered()

    def _body(self, buffer: bytearray, start: int, end: int) -> None:
        """A piece of the event stream: count the events that end in it; keep the first
        event (until whole) and the stream's last bytes, to check once per request."""
        count = buffer.count(_EVENT_END, start, end)
        if self._last_byte == 10 and buffer[start] == 10:  # a blank line across pieces
            count += 1
        self._last_byte = buffer[end - 1]
        if count:
            self.events += count
            self._request_events += count
        first = self._first
        if first is not None:
            first += buffer[start:end]
            if count:
                self._check_first(bytes(first[: first.find(_EVENT_END)]))
                self._first = None
                if self.sent_at:
                    if self.latencies is not None:
                        self.latencies.append(self._received_at - self.sent_at)
                    self.sent_at = 0
        if end - start >= _TAIL_KEPT:
            self._tail = bytes(buffer[end - _TAIL_KEPT : end])
        else:
            self._tail = (self._tail + bytes(buffer[start:end]))[-_TAIL_KEPT:]

    def _check_first(self, event: bytes) -> None:
        """The first event: a chat.completion.chunk with the role and the content."""
        try:
            if not event.startswith(b"data: "):
                raise ValueError("no data field")
            chunk = json.loads(event[6:])
            delta = chunk["choices"][0]["delta"]
            if chunk["object"] != "chat.completion.chunk" or delta.get("role") != "assistant":
                raise ValueError("not a first chat.completion.chunk")
            if self.expected and delta.get("content") != self.content:
                raise ValueError("not the content asked for")
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            self._error(f"first event: {exc}: {event[:160]!r}")

    def _answered(self) -> None:
        """A whole answer is in: check how it ended, then send the next request."""
        self.sent_at = 0
        if self._status == 200:
            tail = self._tail
            last = tail.rfind(_EVENT_END, 0, len(tail) - len(_DONE))  # the stop chunk's end
            previous = tail.rfind(_EVENT_END, 0, max(last, 0))
            start = previous + 2 if previous >= 0 else 0
            if not tail.endswith(b"\n\n" + _DONE) or _LAST not in tail[start:last]:
                self._error(f"the stream did not end with a stop chunk and [DONE]: {tail[-160:]!r}")
            elif self._request_events != self.expected + 2:
                self._error(f"{self._request_events - 2} content events, {self.expected} asked for")
        self.requests += 1
        self.in_request = False
        if self.running:
            self.send()

    def _error(self, text: str) -> None:
        if len(self.errors) < loadgen.ERRORS_KEPT:
            self.errors.append(text[:200])

    def _fail(self, text: str) -> None:
        self._error(text)
        self.running = self.in_request = False
        if self.transport is not None:
            self.transport.abort()

    # ------------------------------------------------------------------ driving
    def send(self) -> None:
        assert self.transport is not None
        self.in_request = True
        self.sent_at = time.perf_counter_ns()
        self.transport.write(self.request)

    def start(self, request: bytes, expected: int, content: str) -> None:
        """Send ``request`` (asking for ``expected`` chunks of ``content``) again and again,
        each as soon as the last is answered, until ``stop``."""
        self.request, self.expected, self.content = request, expected, content
        self.running = True
        self.send()

    def close(self) -> None:
        self.running = False
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


async def connect(port: int, count: int, host: str = "127.0.0.1") -> list[SseConnection]:
    """``count`` connections (a request's first bytes decide nothing until it is sent)."""
    loop = asyncio.get_running_loop()
    connections = []
    try:
        for _ in range(count):
            _, connection = await asyncio.wait_for(
                loop.create_connection(SseConnection, host, port), loadgen.CONNECT_TIMEOUT
            )
            connections.append(connection)
    except BaseException:
        await close(connections)
        raise
    return connections


async def close(connections: list[SseConnection], within: float = 60.0) -> None:
    """Send no more requests, let the running ones finish (leaving mid-stream would cancel
    the server's turn: its teardown is not what is measured), then close."""
    for connection in connections:
        connection.running = False
    deadline = time.monotonic() + within
    await loadgen._until(lambda: not any(c.in_request for c in connections), deadline)
    for connection in connections:
        connection.close()
    if connections:
        await asyncio.wait([c.closed for c in connections], timeout=5.0)


def _errors(connections: list[SseConnection]) -> list[str]:
    return [error for c in connections for error in c.errors][: loadgen.ERRORS_KEPT]


async def first_chunk(port: int, size: int, samples: int, warmup: float) -> loadgen.Timed:
    """One connection, one-chunk requests back to back: ``warmup`` seconds of them, then
    the time from writing each of ``samples`` more to receiving its first event (taken when
    the bytes that complete it arrive, before they are parsed)."""
    (connection,) = await connect(port, 1)
    try:
        connection.latencies = []
        connection.start(request_bytes(port, 1, size), 1, "x" * size)
        await asyncio.sleep(warmup)
        connection.latencies.clear()
        started = time.perf_counter()
        await loadgen._until(
            lambda: len(connection.latencies or ()) >= samples or not connection.running,
            time.monotonic() + loadgen.MAX_EXTENSION,
        )
        elapsed = time.perf_counter() - started
        taken = connection.latencies[:samples]
    finally:
        await close([connection])
    return loadgen.Timed(taken, elapsed, _errors([connection]))


async def throughput(
    port: int,
    connections: int,
    chunks: int,
    size: int,
    duration: float,
    warmup: float,
    write_calls: Callable[[], int] | None = None,
    cpu: Callable[[], dict[str, float]] | None = None,
) -> dict[str, Any]:
    """Chunk events/s with ``connections`` connections each sending requests of ``chunks``
    chunks back to back (the events besides the chunks, the last one's and ``[DONE]``, are
    not counted); as loadgen.throughput, the server's socket writes per chunk and each
    ``cpu`` part's % of a core over the window, when given."""
    opened = await connect(port, connections)
    request = request_bytes(port, chunks, size)

    def counted() -> tuple[int, int]:
        requests = sum(c.requests for c in opened)
        return sum(c.events for c in opened) - 2 * requests, requests

    try:
        for connection in opened:
            connection.start(request, chunks, "x" * size)
        await asyncio.sleep(warmup)
        chunks0, requests0 = counted()
        writes0 = write_calls() if write_calls else 0
        cpu0 = cpu() if cpu else {}
        elapsed = await loadgen._window(duration, lambda: counted()[1] > requests0)
        chunks1, requests1 = counted()
        writes = write_calls() - writes0 if write_calls else None
        cpu1 = cpu() if cpu else {}
    finally:
        await close(opened)
    received = chunks1 - chunks0
    return {
        "connections": connections,
        "chunks_per_turn": chunks,
        "chunk_size": size,
        "seconds": elapsed,
        "chunks_per_s": received / elapsed,
        "turns_per_s": (requests1 - requests0) / elapsed,
        "writes_per_chunk": writes / received if writes is not None and received else None,
        **{f"cpu_{k}_pct": (cpu1[k] - cpu0[k]) / elapsed * 100 for k in cpu1},
        "errors": _errors(opened),
    }
