"""The load generator: protocol v1 sessions driven straight from picows' frame callbacks.

picows parses frames in C and hands each to ``Session.on_ws_frame``; the next turn is sent
from that same callback, so the client spends no task, queue or ``await`` per frame and
stays well ahead of every real server (the "no model, batched writes" server in the table
shows how far: that row is the client's ceiling). A frame's kind is read from one byte:
every server here sends ``{"type":"…`` first, as AnythingAgent does.

Three modes, each against a server already listening:

- ``throughput``: C connections run turns of N chunks of S bytes back to back; chunks/s
  and MB/s of chunk frames' payloads over a window after a warm-up.
- ``latency``: C connections each send a one-chunk turn as soon as the last one is done;
  the time from sending the message to receiving its first chunk (p50/p99/max).
- ``capacity``: open K idle sessions (up to ``concurrency`` handshakes in flight) as fast
  as possible; handshakes/s until the last ``ready``, and the server's RSS growth per
  session.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

_TYPE_PREFIX: Final = b'{"type":"'
_CHUNK, _DONE, _READY = ord("c"), ord("d"), ord("r")
CONNECT_TIMEOUT: Final = 60.0
MAX_EXTENSION: Final = 60.0  # how long a window may run past its duration to get a sample
ERRORS_KEPT: Final = 5


def request_frame(chunks: int, size: int) -> bytes:
    """A ``message`` frame asking the bench model for ``chunks`` chunks of ``size`` chars."""
    content = json.dumps({"chunks": chunks, "size": size})
    return json.dumps({"type": "message", "content": content}).encode()


class Session(WSListener):
    """One chat session. Once started it sends a turn, and the next one from the callback
    that receives ``done``, until stopped; it counts chunks and may time first chunks."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.transport: WSTransport | None = None
        self.request = b""
        self.running = False
        self.in_turn = False
        self.chunks = 0
        self.payload_bytes = 0
        self.turns = 0
        self.sent_at = 0  # perf_counter_ns() of the last message; 0 once its chunk came
        self.latencies: list[int] | None = None  # first-chunk times in ns, when timing
        self.errors: list[str] = []

    # ------------------------------------------------------------------ picows callbacks
    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type is not WSMsgType.TEXT:
            if frame.msg_type is WSMsgType.CLOSE:  # the server's, or its answer to ours
                if not transport.is_close_frame_sent:
                    transport.send_close(frame.get_close_code())
                transport.disconnect()
            return
        payload = frame.get_payload_as_bytes()
        kind = payload[9] if payload.startswith(_TYPE_PREFIX) else 0
        if kind == _CHUNK:
            self.chunks += 1
            self.payload_bytes += len(payload)
            if self.sent_at:
                if self.latencies is not None:
                    self.latencies.append(time.perf_counter_ns() - self.sent_at)
                self.sent_at = 0
        elif kind == _DONE:
            self.turns += 1
            self.in_turn = False
            if self.running:
                self.send_turn()
        elif kind == _READY:
            if not self.ready.done():
                self.ready.set_result(None)
        else:  # an error frame (or something unexpected): keep it for the report
            if len(self.errors) < ERRORS_KEPT:
                self.errors.append(payload[:200].decode(errors="replace"))
            if b'"turn"' not in payload:  # a refused message: no done will follow
                self.running = self.in_turn = False

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.running = self.in_turn = False
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("the server closed before ready"))
        if not self.closed.done():
            self.closed.set_result(None)

    # ------------------------------------------------------------------ driving
    def send_turn(self) -> None:
        assert self.transport is not None
        self.in_turn = True
        self.sent_at = time.perf_counter_ns()
        self.transport.send(WSMsgType.TEXT, self.request)

    def start(self, request: bytes) -> None:
        """Run turns of ``request`` back to back until ``close``."""
        self.request = request
        self.running = True
        self.send_turn()

    def close(self) -> None:
        """Start the closing handshake; the server's close frame ends the connection."""
        self.running = False
        if self.transport is not None and not self.transport.is_disconnected:
            if not self.transport.is_close_frame_sent:
                self.transport.send_close(WSCloseCode.OK)

    def abort(self) -> None:
        if self.transport is not None and not self.transport.is_disconnected:
            self.transport.disconnect(graceful=False)


async def open_sessions(url: str, count: int, concurrency: int = 64) -> list[Session]:
    """Open ``count`` sessions, ``concurrency`` handshakes at a time, each waited for until
    its ``ready``; raises (after closing those that opened) if any fails."""
    gate = asyncio.Semaphore(concurrency)

    async def one() -> Session:
        async with gate:
            _, session = await ws_connect(Session, url, websocket_handshake_timeout=CONNECT_TIMEOUT)
            assert isinstance(session, Session)
            try:
                await asyncio.wait_for(session.ready, CONNECT_TIMEOUT)
            except BaseException:
                session.close()
                raise
            return session

    outcomes = await asyncio.gather(*(one() for _ in range(count)), return_exceptions=True)
    sessions = [o for o in outcomes if isinstance(o, Session)]
    failures = [o for o in outcomes if not isinstance(o, Session)]
    if failures:
        await close_sessions(sessions)
        raise RuntimeError(
            f"{len(failures)} of {count} sessions failed to open; first: {failures[0]!r}"
        )
    return sessions


async def close_sessions(sessions: list[Session], within: float = 60.0) -> None:
    """Stop sending turns, let the running ones finish, then close each session with a
    closing handshake. Leaving mid-turn would measure a server's teardown path instead
    of its streaming (and would exercise AnythingAgent's cancel-on-disconnect path, whose
    cost and side effects are not what these modes are about)."""
    for session in sessions:
        session.running = False
    deadline = time.monotonic() + within
    await _until(lambda: not any(s.in_turn for s in sessions), deadline)
    for session in sessions:
        session.close()
    if sessions:
        await asyncio.wait(
            [s.closed for s in sessions], timeout=max(1.0, deadline - time.monotonic())
        )
    for session in sessions:
        session.abort()


def _errors(sessions: list[Session]) -> list[str]:
    return [error for s in sessions for error in s.errors][:ERRORS_KEPT]


async def _window(duration: float, enough: Callable[[], bool]) -> float:
    """Sleep ``duration`` s, then on until ``enough()`` (at most ``MAX_EXTENSION`` more);
    returns the seconds elapsed."""
    started = time.perf_counter()
    await asyncio.sleep(duration)
    await _until(enough, time.monotonic() + MAX_EXTENSION)
    return time.perf_counter() - started


async def _until(condition: Callable[[], bool], deadline: float) -> None:
    """Poll ``condition`` (set by frame callbacks) every 10 ms until true or ``deadline``
    (``time.monotonic()``)."""
    while time.monotonic() < deadline:
        if condition():
            return
        await asyncio.sleep(0.01)


async def throughput(
    url: str,
    connections: int,
    chunks: int,
    size: int,
    duration: float,
    warmup: float,
    write_calls: Callable[[], int] | None = None,
) -> dict[str, Any]:
    """Chunks/s and MB/s with ``connections`` sessions each streaming turns back to back;
    given the server's ``write_calls`` counter, also its socket writes per chunk."""
    sessions = await open_sessions(url, connections)
    try:
        for session in sessions:
            session.start(request_frame(chunks, size))
        await asyncio.sleep(warmup)
        chunks0 = sum(s.chunks for s in sessions)
        bytes0 = sum(s.payload_bytes for s in sessions)
        turns0 = sum(s.turns for s in sessions)
        writes0 = write_calls() if write_calls else 0
        elapsed = await _window(duration, lambda: sum(s.turns for s in sessions) > turns0)
        received = sum(s.chunks for s in sessions) - chunks0
        payload = sum(s.payload_bytes for s in sessions) - bytes0
        turns = sum(s.turns for s in sessions) - turns0
        writes = write_calls() - writes0 if write_calls else None
    finally:
        await close_sessions(sessions)
    return {
        "connections": connections,
        "chunks_per_turn": chunks,
        "chunk_size": size,
        "seconds": elapsed,
        "chunks_per_s": received / elapsed,
        "mb_per_s": payload / elapsed / 1e6,
        "turns_per_s": turns / elapsed,
        "writes_per_chunk": writes / received if writes is not None and received else None,
        "errors": _errors(sessions),
    }


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of sorted ``values``."""
    return values[max(0, math.ceil(fraction * len(values)) - 1)]


async def latency(
    url: str, connections: int, size: int, duration: float, warmup: float
) -> dict[str, Any]:
    """First-chunk latency of one-chunk turns, ``connections`` sessions at once; the window
    lasts until every session has given at least one sample."""
    sessions = await open_sessions(url, connections)
    try:
        for session in sessions:
            session.latencies = []
            session.start(request_frame(1, size))
        await asyncio.sleep(warmup)
        for session in sessions:
            assert session.latencies is not None
            session.latencies.clear()
        elapsed = await _window(duration, lambda: all(s.latencies for s in sessions))
        samples = sorted(ns / 1000 for s in sessions for ns in s.latencies or ())
    finally:
        await close_sessions(sessions)
    figures: dict[str, Any] = {"connections": connections, "chunk_size": size, "seconds": elapsed}
    figures["samples"] = len(samples)
    figures["turns_per_s"] = len(samples) / elapsed
    if samples:
        figures["p50_us"] = percentile(samples, 0.50)
        figures["p99_us"] = percentile(samples, 0.99)
        figures["max_us"] = samples[-1]
    figures["errors"] = _errors(sessions)
    return figures


async def capacity(
    url: str,
    count: int,
    rss_kib: Callable[[], int],
    settle: Callable[[], Awaitable[None]],
    concurrency: int = 64,
) -> dict[str, Any]:
    """Open ``count`` idle sessions as fast as possible: handshakes/s, and the server's RSS
    growth divided by ``count`` (measured once it has settled, after one warm-up session
    so that first-use allocations are not charged to the sessions)."""
    await close_sessions(await open_sessions(url, 1))
    await settle()
    before = rss_kib()
    started = time.perf_counter()
    sessions = await open_sessions(url, count, concurrency)
    elapsed = time.perf_counter() - started
    try:
        await settle()
        after = rss_kib()
    finally:
        await close_sessions(sessions)
    return {
        "sessions": count,
        "concurrency": concurrency,
        "seconds": elapsed,
        "handshakes_per_s": count / elapsed,
        "rss_before_kib": before,
        "rss_after_kib": after,
        "rss_per_session_kib": (after - before) / count,
    }
