"""The load generator: protocol v1 sessions driven straight from picows' frame callbacks.

picows parses frames in C and hands each to ``Session.on_ws_frame``; the next turn is sent
from that same callback, so the client spends no task, queue or ``await`` per frame and
stays well ahead of every real server (the "no model, batched writes" server in the table
shows how far: that row is the client's ceiling). A frame's kind is read from one byte:
every server here sends ``{"type":"…`` first, as AnythingAgent does.

Six modes, each against a server already listening:

- ``throughput``: C connections run turns of N chunks of S bytes back to back; chunks/s
  and MB/s of chunk frames' payloads over a window after a warm-up.
- ``latency``: C connections each send a one-chunk turn as soon as the last one is done;
  the time from sending the message to receiving its first chunk (p50/p99/max).
  ``first_chunk`` is its one-connection form with a set number of samples (the SSE mode's
  WebSocket side; bench/sse_client.py drives the SSE side the same way).
- ``capacity``: open K idle sessions (up to ``concurrency`` handshakes in flight) as fast
  as possible; handshakes/s until the last ``ready``, and the server's RSS growth per
  session.
- ``resume``: one connection at a time, the time from starting a new connection (TCP
  connect, handshake) to its ``ready``; for a client offering ``resumable``, each session
  then runs a turn, is dropped without a close frame, and is resumed: the time from starting
  the new connection (offering ``resume.<token>.<after>``) to its ``resumed``.
- ``hops``: one resumable session, dropped and resumed again and again, each time on the
  next of a list of URLs (another node sharing its Redis, or the same one): the time from
  starting the new connection to its ``resumed``.
- ``detached``: K resumable sessions flood (a turn of endless chunks), all are dropped
  mid-turn, and once every model is paused on its full replay buffer, the server's RSS
  growth per session against the buffer's bound.

Every mode takes ``offers``: the subprotocol entries the client offers in
``Sec-WebSocket-Protocol`` (none by default, as wscat; ``anything-agent.v1, resumable`` for
a client that can resume).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

_TYPE_PREFIX: Final = b'{"type":"'
_CHUNK, _DONE, _READY = ord("c"), ord("d"), ord("r")  # "r": ready, or resumed
_RESUMED_PREFIX: Final = b'{"type":"resumed"'
CONNECT_TIMEOUT: Final = 60.0
MAX_EXTENSION: Final = 60.0  # how long a window may run past its duration to get a sample
ERRORS_KEPT: Final = 5


def request_frame(chunks: int, size: int, awaits: bool = False) -> bytes:
    """A ``message`` frame asking the bench model for ``chunks`` chunks of ``size`` chars
    (``awaits``: giving the server's event loop a turn after each)."""
    request: dict[str, Any] = {"chunks": chunks, "size": size}
    if awaits:
        request["awaits"] = True
    content = json.dumps(request)
    return json.dumps({"type": "message", "content": content}).encode()


def _headers(offers: Sequence[str]) -> dict[str, str] | None:
    """The handshake's extra headers: the subprotocol entries offered, if any."""
    return {"Sec-WebSocket-Protocol": ", ".join(offers)} if offers else None


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
        self.drop_after = 0  # when set: drop the connection (no close frame) at that chunk
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
            if self.drop_after and self.chunks >= self.drop_after:
                self.drop_after = 0
                transport.disconnect(graceful=False)
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


async def open_sessions(
    url: str, count: int, concurrency: int = 64, offers: Sequence[str] = ()
) -> list[Session]:
    """Open ``count`` sessions, ``concurrency`` handshakes at a time, each waited for until
    its ``ready``; raises (after closing those that opened) if any fails."""
    gate = asyncio.Semaphore(concurrency)
    headers = _headers(offers)

    async def one() -> Session:
        async with gate:
            _, session = await ws_connect(
                Session, url, websocket_handshake_timeout=CONNECT_TIMEOUT, extra_headers=headers
            )
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
    offers: Sequence[str] = (),
    cpu: Callable[[], dict[str, float]] | None = None,
) -> dict[str, Any]:
    """Chunks/s and MB/s with ``connections`` sessions each streaming turns back to back;
    given the server's ``write_calls`` counter, also its socket writes per chunk; given
    ``cpu`` (CPU seconds used so far, by name), each one's % of a core over the window."""
    sessions = await open_sessions(url, connections, offers=offers)
    try:
        for session in sessions:
            session.start(request_frame(chunks, size))
        await asyncio.sleep(warmup)
        chunks0 = sum(s.chunks for s in sessions)
        bytes0 = sum(s.payload_bytes for s in sessions)
        turns0 = sum(s.turns for s in sessions)
        writes0 = write_calls() if write_calls else 0
        cpu0 = cpu() if cpu else {}
        elapsed = await _window(duration, lambda: sum(s.turns for s in sessions) > turns0)
        received = sum(s.chunks for s in sessions) - chunks0
        payload = sum(s.payload_bytes for s in sessions) - bytes0
        turns = sum(s.turns for s in sessions) - turns0
        writes = write_calls() - writes0 if write_calls else None
        cpu1 = cpu() if cpu else {}
        used = {f"cpu_{name}_pct": (cpu1[name] - cpu0[name]) / elapsed * 100 for name in cpu1}
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
        **used,
        "errors": _errors(sessions),
    }


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of sorted ``values``."""
    return values[max(0, math.ceil(fraction * len(values)) - 1)]


async def latency(
    url: str,
    connections: int,
    size: int,
    duration: float,
    warmup: float,
    offers: Sequence[str] = (),
    cpu_ticks: Callable[[], int] | None = None,
) -> dict[str, Any]:
    """First-chunk latency of one-chunk turns, ``connections`` sessions at once; the window
    lasts until every session has given at least one sample. Given the server's
    ``cpu_ticks`` counter, also its CPU time per turn (``cpu_us_per_turn``)."""
    sessions = await open_sessions(url, connections, offers=offers)
    try:
        for session in sessions:
            session.latencies = []
            session.start(request_frame(1, size))
        await asyncio.sleep(warmup)
        for session in sessions:
            assert session.latencies is not None
            session.latencies.clear()
        turns0 = sum(s.turns for s in sessions)
        ticks0 = cpu_ticks() if cpu_ticks else 0
        elapsed = await _window(duration, lambda: all(s.latencies for s in sessions))
        ticks = cpu_ticks() - ticks0 if cpu_ticks else None
        turns = sum(s.turns for s in sessions) - turns0
        samples = sorted(ns / 1000 for s in sessions for ns in s.latencies or ())
    finally:
        await close_sessions(sessions)
    figures: dict[str, Any] = {"connections": connections, "chunk_size": size, "seconds": elapsed}
    figures["samples"] = len(samples)
    figures["turns_per_s"] = len(samples) / elapsed
    if ticks is not None and turns:
        figures["cpu_us_per_turn"] = ticks / os.sysconf("SC_CLK_TCK") / turns * 1e6
    if samples:
        figures["p50_us"] = percentile(samples, 0.50)
        figures["p99_us"] = percentile(samples, 0.99)
        figures["max_us"] = samples[-1]
    figures["errors"] = _errors(sessions)
    return figures


@dataclass
class Timed:
    """First-chunk times gathered by one connection: in ns, over ``seconds``."""

    samples_ns: list[int] = field(default_factory=list)
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    def add(self, other: Timed) -> None:
        self.samples_ns += other.samples_ns
        self.seconds += other.seconds
        self.errors = (self.errors + other.errors)[:ERRORS_KEPT]

    def figures(self) -> dict[str, Any]:
        """p50/p99/max in µs, the number of samples and the turns/s they came at."""
        ordered = sorted(ns / 1000 for ns in self.samples_ns)
        found: dict[str, Any] = {"samples": len(ordered), "seconds": self.seconds}
        found["turns_per_s"] = len(ordered) / self.seconds if self.seconds else 0.0
        if ordered:
            found["p50_us"] = percentile(ordered, 0.50)
            found["p99_us"] = percentile(ordered, 0.99)
            found["max_us"] = ordered[-1]
        found["errors"] = self.errors
        return found


async def first_chunk(
    url: str, size: int, samples: int, warmup: float, offers: Sequence[str] = ()
) -> Timed:
    """One session, one-chunk turns back to back: ``warmup`` seconds of them, then the time
    from sending each of ``samples`` more to receiving its first chunk."""
    (session,) = await open_sessions(url, 1, offers=offers)
    try:
        session.latencies = []
        session.start(request_frame(1, size))
        await asyncio.sleep(warmup)
        session.latencies.clear()
        started = time.perf_counter()
        await _until(
            lambda: len(session.latencies or ()) >= samples or not session.running,
            time.monotonic() + MAX_EXTENSION,
        )
        elapsed = time.perf_counter() - started
        taken = session.latencies[:samples]
    finally:
        await close_sessions([session])
    return Timed(taken, elapsed, _errors([session]))


async def capacity(
    url: str,
    count: int,
    rss_kib: Callable[[], int],
    settle: Callable[[], Awaitable[None]],
    concurrency: int = 64,
    offers: Sequence[str] = (),
    store_kib: Callable[[], float] | None = None,
) -> dict[str, Any]:
    """Open ``count`` idle sessions as fast as possible: handshakes/s, and the server's RSS
    growth divided by ``count`` (measured once it has settled, after one warm-up session
    so that first-use allocations are not charged to the sessions); given ``store_kib``
    (what the server's Redis holds), its growth per session too."""
    await close_sessions(await open_sessions(url, 1, offers=offers))
    await settle()
    before = rss_kib()
    stored = store_kib() if store_kib else 0.0
    started = time.perf_counter()
    sessions = await open_sessions(url, count, concurrency, offers)
    elapsed = time.perf_counter() - started
    try:
        await settle()
        after = rss_kib()
        if store_kib:
            stored = (store_kib() - stored) / count
    finally:
        await close_sessions(sessions)
    return {
        **({"store_per_session_kib": stored} if store_kib else {}),
        "sessions": count,
        "concurrency": concurrency,
        "seconds": elapsed,
        "handshakes_per_s": count / elapsed,
        "rss_before_kib": before,
        "rss_after_kib": after,
        "rss_per_session_kib": (after - before) / count,
    }


class Probe(WSListener):
    """One connection of the resume mode: when its first frame came (``ready``,
    ``resumed`` or an error) and what it was, and the ``seq`` of its turn's ``done``."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.first: asyncio.Future[bytes | None] = loop.create_future()  # None: closed
        self.first_at = 0  # perf_counter_ns() when it came
        self.done: asyncio.Future[int | None] = loop.create_future()  # None: no done
        self.closed: asyncio.Future[None] = loop.create_future()
        self.transport: WSTransport | None = None
        self.error = ""

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type is not WSMsgType.TEXT:
            if frame.msg_type is WSMsgType.CLOSE:
                if not transport.is_close_frame_sent:
                    transport.send_close(frame.get_close_code())
                transport.disconnect()
            return
        if not self.first.done():
            self.first_at = time.perf_counter_ns()
            self.first.set_result(frame.get_payload_as_bytes())
            return
        payload = frame.get_payload_as_bytes()
        if payload.startswith(b'{"type":"done"') and not self.done.done():
            self.done.set_result(int(json.loads(payload).get("seq", 0)))
        elif payload.startswith(b'{"type":"error"') and not self.error:
            self.error = payload[:200].decode(errors="replace")

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        for future in (self.first, self.done):
            if not future.done():
                future.set_result(None)
        if not self.closed.done():
            self.closed.set_result(None)

    async def close(self) -> None:
        """A normal close (1000): the session ends; wait for the server's answer."""
        assert self.transport is not None
        if not self.transport.is_disconnected and not self.transport.is_close_frame_sent:
            self.transport.send_close(WSCloseCode.OK)
        await asyncio.wait([self.closed], timeout=CONNECT_TIMEOUT)
        self.transport.disconnect(graceful=False)

    async def drop(self) -> None:
        """Gone without a close frame, as a lost network would leave it."""
        assert self.transport is not None
        self.transport.disconnect(graceful=False)
        await asyncio.wait([self.closed], timeout=CONNECT_TIMEOUT)


async def _timed_connect(url: str, offers: Sequence[str]) -> tuple[Probe, int, bytes | None]:
    """A new connection: the probe, the ns from starting it (TCP connect and handshake) to
    its first frame, and that frame (None if it closed first)."""
    started = time.perf_counter_ns()
    _, probe = await ws_connect(
        Probe, url, websocket_handshake_timeout=CONNECT_TIMEOUT, extra_headers=_headers(offers)
    )
    assert isinstance(probe, Probe)
    first = await asyncio.wait_for(probe.first, CONNECT_TIMEOUT)
    return probe, probe.first_at - started, first


def _spread(prefix: str, samples_ns: list[int]) -> dict[str, float]:
    """p50, p99 and max of ``samples_ns``, in µs, named ``<prefix>_p50_us`` etc."""
    if not samples_ns:
        return {}
    ordered = sorted(ns / 1000 for ns in samples_ns)
    return {
        f"{prefix}_p50_us": percentile(ordered, 0.50),
        f"{prefix}_p99_us": percentile(ordered, 0.99),
        f"{prefix}_max_us": ordered[-1],
    }


async def resume(url: str, samples: int, size: int, offers: Sequence[str] = ()) -> dict[str, Any]:
    """``samples`` times, one connection at a time: start a new connection and time it to
    ``ready``. With ``resumable`` among ``offers``, that session then runs a one-chunk turn,
    its connection is dropped without a close frame, and a new connection offering
    ``resume.<token>.<after>`` (``after``: the turn's ``done``) is timed to ``resumed``;
    a normal close of the last connection ends each session."""
    resumable = "resumable" in offers
    plain = [entry for entry in offers if entry != "resumable"]
    request = request_frame(1, size)
    ready_ns: list[int] = []
    resumed_ns: list[int] = []
    replayed = 0
    errors: list[str] = []

    def failed(what: str) -> None:
        if len(errors) < ERRORS_KEPT:
            errors.append(what[:200])

    started = time.perf_counter()
    for _ in range(samples):
        probe, took, first = await _timed_connect(url, offers)
        if first is None or not first.startswith(b'{"type":"ready"'):
            failed(f"no ready: {first!r}")
            await probe.close()
            continue
        ready_ns.append(took)
        if not resumable:
            await probe.close()
            continue
        token = json.loads(first)["resume_token"]
        assert probe.transport is not None
        probe.transport.send(WSMsgType.TEXT, request)
        after = await asyncio.wait_for(probe.done, CONNECT_TIMEOUT)
        if after is None:
            failed(probe.error or "closed before done")
            await probe.close()
            continue
        await probe.drop()
        again, took, first = await _timed_connect(url, [*plain, f"resume.{token}.{after}"])
        if first is not None and first.startswith(_RESUMED_PREFIX):
            resumed_ns.append(took)
            replayed += int(json.loads(first)["replayed"])
        else:
            failed(f"no resumed: {first!r}")
        await again.close()
    elapsed = time.perf_counter() - started
    figures: dict[str, Any] = {"samples": len(ready_ns), "seconds": elapsed}
    figures.update(_spread("ready", ready_ns))
    if resumable:
        figures["resumes"] = len(resumed_ns)
        figures["replayed"] = replayed
        figures.update(_spread("resumed", resumed_ns))
    figures["errors"] = errors
    return figures


async def hops(
    home: str, route: Sequence[tuple[str, str]], samples: int, size: int, offers: Sequence[str]
) -> dict[str, Any]:
    """One resumable session, opened on ``home``, runs a one-chunk turn; then ``samples``
    times its connection is dropped without a close frame and a new one offering
    ``resume.<token>.<after>`` is made to the next of ``route``'s (name, URL) pairs in turn,
    timed from its start to its ``resumed``: p50, p99 and max per name
    (``<name>_p50_us``...). A failed resume ends the run (its token is gone)."""
    plain = [entry for entry in offers if entry != "resumable"]
    probe, _, first = await _timed_connect(home, offers)
    if first is None or not first.startswith(b'{"type":"ready"'):
        await probe.close()
        raise RuntimeError(f"no ready: {first!r}")
    token = json.loads(first)["resume_token"]
    assert probe.transport is not None
    probe.transport.send(WSMsgType.TEXT, request_frame(1, size))
    after = await asyncio.wait_for(probe.done, CONNECT_TIMEOUT)
    taken: dict[str, list[int]] = {name: [] for name, _ in route}
    errors = [] if after is not None else [probe.error or "closed before done"]
    started = time.perf_counter()
    for number in range(samples if after is not None else 0):
        name, url = route[number % len(route)]
        await probe.drop()
        probe, took, first = await _timed_connect(url, [*plain, f"resume.{token}.{after}"])
        if first is None or not first.startswith(_RESUMED_PREFIX):
            errors.append(f"no resumed on {name}: {first!r}"[:200])
            break
        taken[name].append(took)
    figures: dict[str, Any] = {"hops": sum(map(len, taken.values()))}
    figures["hops_seconds"] = time.perf_counter() - started
    for name, samples_ns in taken.items():
        figures.update(_spread(name, samples_ns))
    await probe.close()
    figures["errors"] = errors
    return figures


FLOOD: Final = 10**9  # chunks: a turn that outlasts any measurement


async def detached(
    url: str,
    count: int,
    size: int,
    buffer_bytes: int,
    rss_kib: Callable[[], int],
    settle: Callable[[], Awaitable[None]],
    gauges: Callable[[], Awaitable[dict[str, float]]],
    offers: Sequence[str],
    awaits: bool = True,
    within: float = 120.0,
) -> dict[str, Any]:
    """The memory a detached session holds: ``count`` resumable sessions each start an
    endless turn of ``size``-character chunks and are dropped (no close frame) at their
    first chunk; once every one is detached and its model paused on a full replay buffer
    (the server's ``gauges``: detached sessions and buffered bytes, unchanged and the
    server idle), the server's RSS growth per session, against ``buffer_bytes``.

    The same load runs once first, its sessions closed normally mid-turn (they end and
    free what they held), so that what streaming to ``count`` connections leaves allocated
    in the server is not charged to the detached sessions. ``awaits``: the model gives the
    loop a turn after each chunk (else it yields as fast as the server takes chunks)."""

    async def flood(drop: bool) -> list[Session]:
        sessions = await open_sessions(url, count, offers=offers)
        for session in sessions:
            session.drop_after = 1 if drop else 0
            session.start(request_frame(FLOOD, size, awaits))
            session.running = False  # one turn only
        await _until(lambda: all(s.chunks for s in sessions), time.monotonic() + within)
        return sessions

    warm = await flood(drop=False)
    for session in warm:
        session.close()
    await asyncio.wait([s.closed for s in warm], timeout=CONNECT_TIMEOUT)
    for session in warm:
        session.abort()
    await settle()
    await gauges()  # still answering after clients left mid-turn (raises if not)
    before = rss_kib()
    started = time.perf_counter()
    sessions = await flood(drop=True)
    await asyncio.wait([s.closed for s in sessions], timeout=CONNECT_TIMEOUT)
    deadline = time.monotonic() + within
    last: dict[str, float] = {}
    while time.monotonic() < deadline:
        await settle()
        now = await gauges()
        if now == last and now.get("detached", 0) >= count:
            break
        last = now
        await asyncio.sleep(0.2)
    else:
        raise RuntimeError(f"the detached sessions did not pause within {within:g} s: {last}")
    paused = time.perf_counter() - started
    after = rss_kib()
    per_session = (after - before) / count
    return {
        "sessions": count,
        "chunk_size": size,
        "buffer_bytes": buffer_bytes,
        "buffer_kib": buffer_bytes / 1024,
        "seconds": paused,
        "rss_before_kib": before,
        "rss_after_kib": after,
        "rss_per_session_kib": per_session,
        "rss_per_buffer": per_session * 1024 / buffer_bytes,
        "detached": last.get("detached"),
        "buffered_per_session_kib": last.get("buffered", 0.0) / count / 1024,
        "chunks_before_drop": sum(s.chunks for s in sessions) / count,
        "errors": _errors(sessions),
    }
