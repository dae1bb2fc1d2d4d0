"""One chat session: one WebSocket connection talking to one pinned model version.

The session owns the conversation's state (history, turn number, the running turn) and
the turn logic: frames in, hooks called in order, chunk frames out as they are yielded.
``on_chat_end`` runs exactly once when the connection goes, whatever the cause.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode

from ws_server import loop_watch, metrics, protocol
from ws_server.exceptions import (
    AnythingAgentError,
    BadRequest,
    Busy,
    ModelFailed,
    RateLimited,
    ServerUnavailable,
)
from ws_server.http.limits import FrameRate
from ws_server.redaction import redact
from ws_server.registry.catalog import ModelVersion
from ws_server.runners import ModelSession
from ws_server.sdk import Message
from ws_server.session.chunk_writer import ChunkWriter
from ws_server.session.history import History
from ws_server.settings import ServerSettings

log = logging.getLogger("anything_agent.session")

# A turn stopped because the client went: like a done reason, but nobody to send it to.
_DISCONNECTED: Final = "disconnected"
# How long a stopped turn's cleanup (the model's ``finally``) and ``on_chat_end`` may run
# before they are interrupted, so one model's hung cleanup cannot hold a session or a
# shutdown forever.
CLEANUP_LIMIT: Final = 10.0
IDLE_CLOSE_REASON: Final = "idle timeout"
SHUTDOWN_CLOSE: Final = 2.0  # seconds a peer gets to answer the server's 1001


@dataclass(frozen=True)
class SessionLimits:
    """The per-session limits of the server's settings (None: no limit)."""

    frames_per_minute: int | None = None
    history_messages: int = 1000
    history_bytes: int = 4 * 1024 * 1024
    idle_timeout: float | None = None

    @classmethod
    def from_settings(cls, settings: ServerSettings) -> SessionLimits:
        return cls(
            frames_per_minute=None if settings.no_limits else settings.max_messages_per_minute,
            history_messages=settings.max_history_messages,
            history_bytes=settings.max_history_bytes,
            idle_timeout=settings.idle_timeout or None,
        )


class ChatSession:
    """A conversation: reads frames, runs turns one at a time, streams chunks back."""

    # Slots: an idle session is mostly this object, and there may be tens of thousands.
    __slots__ = (
        "_background",
        "_ended_turn",
        "_idle_timer",
        "_last_activity",
        "_metrics",
        "_model",
        "_on_disconnect",
        "_rate",
        "_starting",
        "_stop_reason",
        "_turn_closing",
        "_turn_task",
        "closing",
        "connection",
        "debug",
        "finished",
        "history",
        "id",
        "limits",
        "turn",
        "version",
    )

    def __init__(
        self,
        connection: ServerConnection,
        version: ModelVersion,
        *,
        debug: bool = False,
        limits: SessionLimits | None = None,
        on_disconnect: Callable[[], None] | None = None,
    ) -> None:
        self.id = uuid.uuid4().hex[:16]
        self.connection = connection
        self.version = version
        self.debug = debug
        self.limits = limits or SessionLimits()
        # Called once, as soon as the connection is gone (before on_chat_end has run).
        self._on_disconnect = on_disconnect
        self._rate = FrameRate(self.limits.frames_per_minute)
        self._metrics = metrics.for_model(version.name)
        self._last_activity = time.monotonic()
        self._idle_timer: asyncio.TimerHandle | None = None
        self.history = History(self.limits.history_messages, self.limits.history_bytes)
        self.turn = 0
        self._ended_turn = 0  # the last turn whose done frame was sent
        self.closing = False
        self.finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._model: ModelSession | None = None
        self._starting: asyncio.Task[None] | None = None
        self._turn_task: asyncio.Task[None] | None = None
        self._stop_reason: str | None = None
        self._turn_closing = False  # the turn's stream is being closed: let it finish
        self._background: set[asyncio.Task[None]] | None = None  # made when first needed

    @property
    def turn_running(self) -> bool:
        return self._turn_task is not None and not self._turn_task.done()

    def _log(self, level: int, message: str, *args: object, exc_info: Any = False) -> None:
        log.log(
            level,
            "model=%s@%s session=%s " + message,
            self.version.name,
            self.version.version,
            self.id,
            *args,
            exc_info=exc_info,
        )

    # ------------------------------------------------------------------ lifecycle
    async def run(self) -> None:
        """The whole conversation, from ``on_chat_start`` to ``on_chat_end``."""
        self._log(logging.INFO, "opened from %s", _peer(self.connection))
        self._watched(asyncio.current_task())
        try:
            if await self._start():
                self._arm_idle_timer()
                await self._read_frames()
        finally:
            if self._idle_timer is not None:
                self._idle_timer.cancel()
            if self._on_disconnect is not None:
                self._on_disconnect()
            await self._stop_turn(_DISCONNECTED)
            await self._end()
            self.finished.set_result(None)

    async def _start(self) -> bool:
        """Run ``on_chat_start`` and send ``ready``; False if the session cannot go on.

        The hook runs as a task so that a client leaving, or a shutdown, stops waiting
        for it (a start can take as long as ``settings.timeout``).
        """
        try:
            self._model = self.version.runner.open_session()
        except Exception as error:
            self._log(logging.ERROR, "creating the model instance raised", exc_info=True)
            await self._fail_start("model_error", self._model_error_text(error))
            return False
        self._starting = asyncio.get_running_loop().create_task(self._model.start())
        self._watched(self._starting)
        gone = asyncio.get_running_loop().create_task(self.connection.wait_closed())
        try:
            await asyncio.wait(
                {self._starting, gone},
                timeout=self.version.timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            gone.cancel()
        starting = self._starting
        if not starting.done():
            starting.cancel()
            await asyncio.wait({starting})
            if self.connection.close_code is not None or self.closing:
                return False  # the client left, or the server is stopping
            self._log(logging.ERROR, "on_chat_start timed out after %gs", self.version.timeout)
            await self._fail_start("timeout", "on_chat_start took too long")
            return False
        failure: BaseException | None
        if starting.cancelled():
            if self.closing:
                return False
            failure = asyncio.CancelledError("on_chat_start was cancelled")
        else:
            failure = starting.exception()
        if failure is not None:
            self._log_failure("on_chat_start", failure)
            await self._fail_start(*self._client_error(failure))
            return False
        await self._send(protocol.encode_ready(self.id, self.version.name, self.version.version))
        return True

    async def _fail_start(self, code: protocol.ErrorCode, message: str) -> None:
        try:
            metrics.ERRORS.labels(code=code).inc()
            await self.connection.send(protocol.encode_error(code, message))
            await self.connection.close(CloseCode.INTERNAL_ERROR, "the model could not start")
        except ConnectionClosed:
            pass

    async def _end(self) -> None:
        if self._model is None:
            return
        ending = asyncio.get_running_loop().create_task(self._model.end())
        self._watched(ending)
        try:
            await asyncio.wait_for(ending, CLEANUP_LIMIT)
        except TimeoutError:
            self._log(logging.ERROR, "on_chat_end did not finish in time; abandoned")
        except Exception:
            self._log(logging.ERROR, "on_chat_end raised", exc_info=True)
        self._log(
            logging.INFO, "closed after %d turns (code %s)", self.turn, self.connection.close_code
        )

    async def shutdown(self, grace_period: float) -> None:
        """Server stopping: let a running turn (or start) finish within the grace period,
        then cancel it, close with 1001 and wait until ``on_chat_end`` has run."""
        self.closing = True
        running = {t for t in (self._starting, self._turn_task) if t and not t.done()}
        if running:
            await asyncio.wait(running, timeout=grace_period)
        if self._starting is not None and not self._starting.done():
            self._starting.cancel()
        await self._stop_turn("cancelled")
        try:  # a peer that doesn't answer the close frame doesn't hold the shutdown
            await asyncio.wait_for(
                self.connection.close(CloseCode.GOING_AWAY, "server shutting down"), SHUTDOWN_CLOSE
            )
        except TimeoutError:
            self.connection.transport.abort()
        await asyncio.shield(self.finished)

    def cancel_now(self) -> None:
        """Cancel a running start or turn without waiting (shutdown, second Ctrl-C)."""
        if self._starting is not None and not self._starting.done():
            self._starting.cancel()
        if self.turn_running:
            task = asyncio.get_running_loop().create_task(self._stop_turn("cancelled"))
            self._keep(task)

    # ------------------------------------------------------------------ frames
    async def _read_frames(self) -> None:
        try:
            async for data in self.connection:
                await self._handle(data)
        except ConnectionClosed:
            pass

    def _keep(self, task: asyncio.Task[None]) -> None:
        """Hold a reference to a task of ours until it is done."""
        if self._background is None:
            self._background = set()
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _arm_idle_timer(self) -> None:
        """Check for idleness when ``idle_timeout`` may next have passed. A timer rather than
        a task per session: idle sessions are the many, and a timer costs a fraction."""
        limit = self.limits.idle_timeout
        if limit is None or self.closing:
            return
        remaining = self._last_activity + limit - time.monotonic()
        loop = asyncio.get_running_loop()
        self._idle_timer = loop.call_later(max(remaining, 0.0), self._idle_check)

    def _idle_check(self) -> None:
        limit = self.limits.idle_timeout
        assert limit is not None
        if self.turn_running or time.monotonic() - self._last_activity < limit:
            if self.turn_running:  # a running turn is not idleness: look again later
                self._last_activity = max(self._last_activity, time.monotonic() - limit + 1.0)
            self._arm_idle_timer()
            return
        self._idle_timer = None
        task = asyncio.get_running_loop().create_task(self._close_idle(limit))
        self._keep(task)

    async def _close_idle(self, limit: float) -> None:
        self._log(logging.INFO, "idle for %g s; closing", limit)
        message = f"no message for {limit:g} s; the session is closed (reconnect to go on)"
        await self._send_error("timeout", message)
        await self.connection.close(CloseCode.NORMAL_CLOSURE, IDLE_CLOSE_REASON)

    async def _handle(self, data: str | bytes) -> None:
        self._last_activity = time.monotonic()
        try:
            over_rate: RateLimited | None = None
            try:
                self._rate.take()
            except RateLimited as exc:
                over_rate = exc
            frame = protocol.parse_client_frame(data)
            if isinstance(frame, protocol.CancelTurn):  # honoured even over the rate
                await self._stop_turn("cancelled")
                return
            if over_rate is not None:
                raise over_rate
            if self.closing:
                raise ServerUnavailable("the server is shutting down; no new turns start")
            if self.turn_running:
                raise Busy(f"turn {self.turn} is still running; send cancel to stop it")
            newest = frame.content if isinstance(frame, protocol.UserMessage) else None
            if newest is None:
                assert isinstance(frame, protocol.ReplaceHistory)
                newest = frame.messages[-1]["content"]
            size = len(newest.encode())
            if size > self.limits.history_bytes:
                raise BadRequest(
                    f"the message is {size} bytes, over this server's history limit of "
                    f"{self.limits.history_bytes} bytes"
                )
        except AnythingAgentError as exc:
            level = logging.DEBUG if isinstance(exc, RateLimited) else logging.INFO  # floods
            self._log(level, "refused a frame: %s: %s", exc.code, exc.message)
            await self._send_error(exc.code, exc.message)  # type: ignore[arg-type]
            return
        if isinstance(frame, protocol.UserMessage):
            self.history.append({"role": "user", "content": frame.content})
        else:
            self.history.replace(frame.messages)
        self.turn += 1
        self._stop_reason = None
        self._turn_closing = False
        self._turn_task = asyncio.get_running_loop().create_task(
            self._run_turn(self.turn, self.history.messages())
        )
        self._watched(self._turn_task)

    # ------------------------------------------------------------------ turns
    async def _stop_turn(self, reason: str) -> None:
        """Stop the running turn (if any) and wait until it has wound up.

        The first stop's reason wins: a cancel arriving while a timed-out turn cleans up
        neither changes the reason nor interrupts the model's ``finally``. Cleanup that
        outlasts ``CLEANUP_LIMIT`` is interrupted.
        """
        task = self._turn_task
        if task is None or task.done():
            return
        if self._stop_reason is None:
            self._stop_reason = reason
            if not self._turn_closing:  # a turn already winding down (its client left mid-
                task.cancel()  # stream, say) is let finish: cancelling it would kill a worker
        done, _ = await asyncio.wait({task}, timeout=CLEANUP_LIMIT)
        if not done:
            self._log(
                logging.ERROR,
                "turn=%d cleanup still running after %gs; interrupted",
                self.turn,
                CLEANUP_LIMIT,
            )
            task.cancel()
            await asyncio.wait({task})
        if task.cancelled() and self._stop_reason != _DISCONNECTED:
            # Cancelled before its first step (a cancel right behind the message): the
            # turn's own code never ran, so it falls to us to end the turn for the client.
            await self._send_done(self.turn, self._stop_reason)  # type: ignore[arg-type]

    def _expire(self, task: asyncio.Task[None]) -> None:
        if self._turn_task is task and not task.done() and self._stop_reason is None:
            self._stop_reason = "timeout"
            task.cancel()

    async def _run_turn(self, turn: int, messages: list[Message]) -> None:
        assert self._model is not None
        task = asyncio.current_task()
        assert task is not None
        timer = asyncio.get_running_loop().call_later(self.version.timeout, self._expire, task)
        started = time.perf_counter()
        parts: list[str] = []
        kept = 0  # characters of the reply kept for the history: never more than it holds
        chunks = 0
        sent = 0  # characters of chunk frames written
        first_chunk: float | None = None
        reason = "stop"
        stream = self._model.stream(messages)
        writer = ChunkWriter(self.connection)
        try:
            try:
                async for piece in stream:
                    chunk = protocol.clean_text(piece)
                    chunks += 1
                    if kept < self.limits.history_bytes:
                        parts.append(chunk)
                        kept += len(chunk)
                    frame = protocol.encode_chunk(turn, chunk)
                    await writer.write(frame)
                    sent += len(frame)
                    if first_chunk is None:
                        first_chunk = time.perf_counter() - started
            finally:
                self._turn_closing = True
                await stream.aclose()  # type: ignore[attr-defined]
        except asyncio.CancelledError as exc:
            if self._stop_reason is not None:  # ours: cancel, timeout, disconnect, shutdown
                reason = self._stop_reason
                while task.cancelling():
                    task.uncancel()
            elif task.cancelling() == 0:  # raised by the model's own code
                reason = "error"
                await self._report_model_error(turn, exc)
            else:  # the whole connection handler is being torn down
                raise
        except ConnectionClosed:
            reason = _DISCONNECTED
        except Exception as exc:
            reason = "error"
            await self._report_model_error(turn, exc)
        finally:
            timer.cancel()
        if parts:
            reply = "".join(parts)
            while len(reply.encode()) > self.limits.history_bytes:  # rare: a huge reply
                reply = reply[: len(reply) * 3 // 4]
            self.history.append({"role": "assistant", "content": reply})
        self._last_activity = time.monotonic()
        self._record(reason, chunks, sent, first_chunk, time.perf_counter() - started)
        self._log(
            logging.DEBUG,  # per turn: /metrics has the figures; --log-level debug shows each
            "turn=%d done reason=%s chunks=%d in %.1f ms",
            turn,
            reason,
            chunks,
            (time.perf_counter() - started) * 1000,
        )
        if reason == _DISCONNECTED:
            return
        if reason == "timeout":
            message = f"the turn took longer than {self.version.timeout:g} s"
            await self._send_error("timeout", message, turn)
        await self._send_done(turn, reason)  # type: ignore[arg-type]

    async def _send_done(self, turn: int, reason: protocol.DoneReason) -> None:
        """End ``turn`` for the client, once, whoever stopped it."""
        if self._ended_turn < turn:
            self._ended_turn = turn
            await self._send(protocol.encode_done(turn, reason))

    def _record(
        self, reason: str, chunks: int, sent: int, first_chunk: float | None, duration: float
    ) -> None:
        """The turn's figures for /metrics, recorded once rather than per chunk."""
        self._metrics.turn_ended(reason, chunks, sent, first_chunk, duration)

    async def _report_model_error(self, turn: int, exc: BaseException) -> None:
        self._log_failure(f"turn={turn} on_chat_messages", exc)
        code, message = self._client_error(exc)
        await self._send_error(code, message, turn)

    def _log_failure(self, what: str, exc: BaseException) -> None:
        """Our own errors are a line; the model's exceptions come with their traceback."""
        if isinstance(exc, ModelFailed):
            self._log(logging.ERROR, "%s raised: %s", what, exc.message)
        elif isinstance(exc, AnythingAgentError):
            self._log(logging.ERROR, "%s failed: %s: %s", what, exc.code, exc.message)
        else:
            self._log(logging.ERROR, "%s raised", what, exc_info=_exc_info(exc))

    def _client_error(self, exc: BaseException) -> tuple[protocol.ErrorCode, str]:
        """What the client may see: our errors as they are, the model's only generically."""
        if isinstance(exc, AnythingAgentError) and not isinstance(exc, ModelFailed):
            return exc.code, exc.message  # type: ignore[return-value]
        return "model_error", self._model_error_text(exc)

    # ------------------------------------------------------------------ helpers
    def _watched(self, task: asyncio.Task[Any] | None) -> None:
        """A shared model's code runs in ``task`` on the event loop: should it block the
        loop, the loop watch names this model and session."""
        if task is not None and self.version.mode == "shared":
            owner = f"model={self.version.name}@{self.version.version} session={self.id}"
            loop_watch.attribute(task, owner)

    async def _send_error(
        self, code: protocol.ErrorCode, message: str, turn: int | None = None
    ) -> None:
        metrics.ERRORS.labels(code=code).inc()
        await self._send(protocol.encode_error(code, message, turn))

    async def _send(self, frame: str) -> None:
        try:
            await self.connection.send(frame)
        except ConnectionClosed:
            pass

    def _model_error_text(self, exc: BaseException) -> str:
        text = f"the model raised an error; the server log has the details (session {self.id})"
        if self.debug:
            text += redact(f": {type(exc).__name__}: {exc}")
        return text


def _exc_info(exc: BaseException) -> Any:
    return (type(exc), exc, exc.__traceback__)


def _peer(connection: ServerConnection) -> str:
    address = connection.remote_address
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return str(address)
