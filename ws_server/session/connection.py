"""One WebSocket connection's side of a session: the thin adapter between a socket and a
live session.

It reads frames (rate limit, parsing) into the conversation, and attaches the session's
outbox to a ``FrameWriter`` on its socket, so frames flow batched, with backpressure.
It opens a new session (``on_chat_start``, then ``ready``) or resumes one (``resumed``,
the missed frames byte for byte, then the live stream), and tells the session when its
connection goes: a resumable one then waits for its client, any other ends.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode

from ws_server import metrics, protocol
from ws_server.exceptions import AnythingAgentError, RateLimited
from ws_server.http.limits import FrameRate
from ws_server.session.conversation import DISCONNECTED, Conversation
from ws_server.session.idleness import IdleWatch
from ws_server.session.live import LiveSession
from ws_server.session.writer import FrameWriter
from ws_server.settings import ServerSettings

log = logging.getLogger("anything_agent.session")

IDLE_CLOSE_REASON: Final = "idle timeout"
SHUTDOWN_CLOSE: Final = 2.0  # seconds a peer gets to answer the server's 1001
REPLACED: Final = 4001  # close code for a connection whose session another one resumed


@dataclass(frozen=True)
class ConnectionLimits:
    """The per-connection limits of the server's settings (None: no limit)."""

    frames_per_minute: int | None = None
    idle_timeout: float | None = None

    @classmethod
    def from_settings(cls, settings: ServerSettings) -> ConnectionLimits:
        return cls(
            frames_per_minute=None if settings.no_limits else settings.max_messages_per_minute,
            idle_timeout=settings.idle_timeout or None,
        )


class ChatConnection:
    """Feeds one socket's frames to a session and the session's frames to the socket."""

    __slots__ = (
        "_idle",
        "_last_activity",
        "_on_gone",
        "_rate",
        "connection",
        "limits",
        "writer",
    )

    def __init__(
        self,
        connection: ServerConnection,
        limits: ConnectionLimits,
        on_gone: Callable[[], None] | None = None,
        idle: IdleWatch | None = None,
    ) -> None:
        self.connection = connection
        # Called once the socket is gone, before the session has wound up (on_chat_end
        # may take a while): a client reconnecting at once is not refused for it.
        self._on_gone = on_gone
        self.limits = limits
        self.writer = FrameWriter(connection)
        self._rate = FrameRate(limits.frames_per_minute)
        self._idle = idle  # closes the connection once idle for its limit (None: never)
        self._last_activity = time.monotonic()

    # ------------------------------------------------------------------ opening
    async def open(self, session: LiveSession, token: str | None) -> bool:
        """A new session: run ``on_chat_start`` and send ``ready`` (with ``token`` for a
        client that can resume); False when it could not start (it has ended then)."""
        conversation = session.conversation
        conversation.log(logging.INFO, "opened from %s", peer(self.connection))
        session.attach(self)  # before ready: a shutdown meanwhile closes us with 1001
        if await self._start(session) is not None:
            await session.end(DISCONNECTED)  # a failed start has ended it already
            return False
        version = conversation.version
        ready = protocol.encode_ready(
            conversation.id,
            version.name,
            version.version,
            token,
            session.window if token is not None else None,
        )
        self.writer.enqueue(ready.encode())
        conversation.outbox.attach(self.writer)
        self.writer.flush()
        return True

    async def restart(self, session: LiveSession, context: dict[str, Any]) -> bool:
        """A session taken over from another node: a new model instance here
        (``on_chat_start``, then its ``context`` restored); False when it could not start
        (the session has ended then, and the client was told) or the client left while
        it started (the session is left to the caller)."""
        session.attach(self)
        return await self._start(session, context) is None

    async def _start(
        self, session: LiveSession, context: dict[str, Any] | None = None
    ) -> str | None:
        """Run ``on_chat_start`` (restoring ``context``); None when it returned. A start
        that failed is told to the client and ends the session; ``DISCONNECTED`` (the
        client left meanwhile) is only returned."""
        gone = asyncio.ensure_future(self.connection.wait_closed())
        try:
            failure = await session.conversation.start(gone, context)
        finally:
            gone.cancel()
        if failure is None:
            return None
        code, message = failure
        if code != DISCONNECTED:
            await self._fail_start(code, message)
            await session.end(DISCONNECTED)
        return code

    async def resume(
        self, session: LiveSession, after: int, frames: list[bytes], announce: bool = True
    ) -> None:
        """Carry on ``session`` here: ``resumed`` (unless this connection had it already,
        relayed), the ``frames`` after ``after`` exactly as first sent, then the live
        stream. Nothing can come between: all are queued before the outbox is attached,
        without waiting."""
        conversation = session.conversation
        version = conversation.version
        if announce:
            resumed = protocol.encode_resumed(
                conversation.id,
                version.name,
                version.version,
                after,
                len(frames),
                conversation.turn,
                conversation.turn_running,
            )
            self.writer.enqueue(resumed.encode())
        for data in frames:
            self.writer.enqueue(data)
        previous = session.attach(self)
        conversation.outbox.attach(self.writer)
        self.writer.flush()
        metrics.RESUMES.labels(outcome="resumed").inc()
        metrics.REPLAYED_FRAMES.inc(len(frames))
        conversation.log(
            logging.INFO,
            "resumed from %s after seq %d (%d replayed)",
            peer(self.connection),
            after,
            len(frames),
        )
        if previous is not None and previous is not self:
            await previous.replaced()

    def gone(self) -> None:
        """The socket is closed (once): give back what it held."""
        on_gone, self._on_gone = self._on_gone, None
        if on_gone is not None:
            on_gone()

    async def replaced(self) -> None:
        """Another connection resumed this one's session."""
        try:
            await self.connection.close(REPLACED, "resumed on another connection")
        except ConnectionClosed:
            pass

    async def _fail_start(self, code: str, message: str) -> None:
        try:
            metrics.ERRORS.labels(code=code).inc()
            await self.connection.send(protocol.encode_error(code, message))  # type: ignore[arg-type]
            await self.connection.close(CloseCode.INTERNAL_ERROR, "the model could not start")
        except ConnectionClosed:
            pass

    # ------------------------------------------------------------------ serving
    async def serve(self, session: LiveSession) -> None:
        """Feed the socket's frames to ``session`` until the socket goes, then tell it."""
        idle = self._idle
        if idle is not None and not session.conversation.closing:
            idle.watch(self, session)
        try:
            async for data in self.connection:
                await self.handle(session, data)
        except ConnectionClosed:
            pass
        finally:
            if idle is not None:
                idle.forget(self)
            self.gone()
        normal = self.connection.close_code == CloseCode.NORMAL_CLOSURE
        session.close_code = self.connection.close_code
        ending = session.detach(self, normal_close=normal)
        if session.detached:
            session.conversation.log(
                logging.INFO,
                "connection lost (code %s); resumable for %g s",
                self.connection.close_code,
                session.window,
            )
        if ending is not None:
            await ending

    async def handle(self, session: LiveSession, data: str | bytes) -> None:
        """One frame the client sent (read here, or through a relay before this node took
        the session over)."""
        self._last_activity = time.monotonic()
        await handle_frame(session.conversation, self._rate, data)

    # ------------------------------------------------------------------ idleness
    def idle_since(self, session: LiveSession) -> float:
        """The last frame from the client, or the end of the last turn: a long reply
        being read is not idleness."""
        return max(self._last_activity, session.conversation.last_activity)

    def close_idle(self, session: LiveSession, limit: float) -> None:
        """The ``IdleWatch`` found this connection idle for ``limit`` seconds."""
        _keep(asyncio.get_running_loop().create_task(self._close_idle(session, limit)))

    async def _close_idle(self, session: LiveSession, limit: float) -> None:
        session.conversation.log(logging.INFO, "idle for %g s; closing", limit)
        message = f"no message for {limit:g} s; the session is closed (reconnect to go on)"
        await session.conversation.send_error("timeout", message)
        await self.connection.close(CloseCode.NORMAL_CLOSURE, IDLE_CLOSE_REASON)

    async def close_going_away(self) -> None:
        """Server stopping: close with 1001; a peer that doesn't answer is cut off."""
        try:
            await asyncio.wait_for(
                self.connection.close(CloseCode.GOING_AWAY, "server shutting down"),
                SHUTDOWN_CLOSE,
            )
        except TimeoutError:
            self.connection.transport.abort()


async def handle_frame(conversation: Conversation, rate: FrameRate, data: str | bytes) -> None:
    """One frame from a session's client (here, or relayed from another node): over the
    rate or malformed, it is refused; else the conversation takes it."""
    try:
        over_rate: RateLimited | None = None
        try:
            rate.take()
        except RateLimited as exc:
            over_rate = exc
        frame = protocol.parse_client_frame(data)
        if over_rate is not None and not isinstance(frame, protocol.CancelTurn):
            raise over_rate  # a cancel is honoured even over the rate
    except AnythingAgentError as exc:
        await conversation.refuse(exc)
        return
    await conversation.receive(frame)


_background: set[asyncio.Task[Any]] = set()


def _keep(task: asyncio.Task[Any]) -> None:
    """Hold a reference to a fire-and-forget task until it is done."""
    _background.add(task)
    task.add_done_callback(_background.discard)


def peer(connection: ServerConnection) -> str:
    address = connection.remote_address
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return str(address)
