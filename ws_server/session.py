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
from typing import Final

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode

from ws_server import protocol
from ws_server.exceptions import AnythingAgentError, Busy, ServerUnavailable
from ws_server.registry import ModelVersion
from ws_server.runners import ModelSession
from ws_server.sdk import Message

log = logging.getLogger("anything_agent.session")

# Why a turn was stopped from outside: a done reason, or the client having gone.
_DISCONNECTED: Final = "disconnected"
_END_HOOK_TIMEOUT: Final = 30.0
_background: set[asyncio.Task[None]] = set()


class ChatSession:
    """A conversation: reads frames, runs turns one at a time, streams chunks back."""

    def __init__(
        self, connection: ServerConnection, version: ModelVersion, *, debug: bool = False
    ) -> None:
        self.id = uuid.uuid4().hex[:16]
        self.connection = connection
        self.version = version
        self.debug = debug
        self.history: list[Message] = []
        self.turn = 0
        self.closing = False
        self._model: ModelSession | None = None
        self._turn_task: asyncio.Task[None] | None = None
        self._stop_reason: str | None = None
        self.finished = asyncio.Event()

    @property
    def turn_running(self) -> bool:
        return self._turn_task is not None and not self._turn_task.done()

    def _log(self, level: int, message: str, *args: object, **kwargs: object) -> None:
        log.log(
            level,
            "model=%s@%s session=%s " + message,
            self.version.name,
            self.version.version,
            self.id,
            *args,
            **kwargs,  # type: ignore[arg-type]
        )

    # ------------------------------------------------------------------ lifecycle
    async def run(self) -> None:
        """The whole conversation, from ``on_chat_start`` to ``on_chat_end``."""
        self._log(logging.INFO, "opened from %s", _peer(self.connection))
        try:
            if await self._start():
                await self._read_frames()
        finally:
            await self._stop_turn(_DISCONNECTED)
            await self._end()
            self.finished.set()

    async def _start(self) -> bool:
        try:
            self._model = self.version.runner.open_session()
            await asyncio.wait_for(self._model.start(), self.version.timeout)
        except TimeoutError:
            self._log(logging.ERROR, "on_chat_start timed out after %ss", self.version.timeout)
            await self._fail_start("timeout", "on_chat_start took too long")
            return False
        except Exception as exc:
            self._log(logging.ERROR, "on_chat_start raised", exc_info=True)
            await self._fail_start("model_error", self._model_error_text(exc))
            return False
        await self._send(protocol.encode_ready(self.id, self.version.name, self.version.version))
        return True

    async def _fail_start(self, code: protocol.ErrorCode, message: str) -> None:
        try:
            await self.connection.send(protocol.encode_error(code, message))
            await self.connection.close(CloseCode.INTERNAL_ERROR, "the model could not start")
        except ConnectionClosed:
            pass

    async def _end(self) -> None:
        if self._model is None:
            return
        try:
            await asyncio.wait_for(self._model.end(), _END_HOOK_TIMEOUT)
        except Exception:
            self._log(logging.ERROR, "on_chat_end raised", exc_info=True)
        self._log(
            logging.INFO, "closed after %d turns (code %s)", self.turn, self.connection.close_code
        )

    async def shutdown(self, grace_period: float) -> None:
        """Server stopping: let the running turn finish within the grace period, then
        cancel it, close with 1001 and wait until ``on_chat_end`` has run."""
        self.closing = True
        task = self._turn_task
        if task is not None and not task.done():
            await asyncio.wait({task}, timeout=grace_period)
        await self._stop_turn("cancelled")
        await self.connection.close(CloseCode.GOING_AWAY, "server shutting down")
        await self.finished.wait()

    def cancel_turn_soon(self) -> None:
        """Cancel the running turn without waiting (a second Ctrl-C at shutdown)."""
        if self.turn_running:
            task = asyncio.get_running_loop().create_task(self._stop_turn("cancelled"))
            _background.add(task)
            task.add_done_callback(_background.discard)

    # ------------------------------------------------------------------ frames
    async def _read_frames(self) -> None:
        try:
            async for data in self.connection:
                await self._handle(data)
        except ConnectionClosed:
            pass

    async def _handle(self, data: str | bytes) -> None:
        try:
            frame = protocol.parse_client_frame(data)
            if isinstance(frame, protocol.CancelTurn):
                await self._stop_turn("cancelled")
                return
            if self.turn_running:
                raise Busy(f"turn {self.turn} is still running; send cancel to stop it")
            if self.closing:
                raise ServerUnavailable("the server is shutting down; no new turns start")
        except AnythingAgentError as exc:
            self._log(logging.INFO, "refused a frame: %s: %s", exc.code, exc.message)
            await self._send(protocol.encode_error(exc.code, exc.message))  # type: ignore[arg-type]
            return
        if isinstance(frame, protocol.UserMessage):
            self.history.append({"role": "user", "content": frame.content})
        else:
            self.history = frame.messages
        self.turn += 1
        self._stop_reason = None
        self._turn_task = asyncio.get_running_loop().create_task(
            self._run_turn(self.turn, list(self.history))
        )

    # ------------------------------------------------------------------ turns
    async def _stop_turn(self, reason: str) -> None:
        """Stop the running turn (if any) with ``reason`` and wait until it has wound up."""
        task = self._turn_task
        if task is None or task.done():
            return
        self._stop_reason = reason
        task.cancel()
        await asyncio.wait({task})

    def _expire(self, task: asyncio.Task[None]) -> None:
        if self._turn_task is task and not task.done():
            self._stop_reason = "timeout"
            task.cancel()

    async def _run_turn(self, turn: int, messages: list[Message]) -> None:
        assert self._model is not None
        task = asyncio.current_task()
        assert task is not None
        timer = asyncio.get_running_loop().call_later(self.version.timeout, self._expire, task)
        started = time.perf_counter()
        parts: list[str] = []
        reason: str = "stop"
        stream = self._model.stream(messages)
        try:
            async for chunk in stream:
                parts.append(chunk)
                await self.connection.send(protocol.encode_chunk(turn, chunk))
        except asyncio.CancelledError:
            if self._stop_reason is None:  # not ours: the whole handler is being torn down
                raise
            reason = self._stop_reason
            if hasattr(task, "uncancel"):
                task.uncancel()
        except ConnectionClosed:
            reason = _DISCONNECTED
        except Exception as exc:
            reason = "error"
            self._log(logging.ERROR, "turn=%d on_chat_messages raised", turn, exc_info=True)
            await self._send(
                protocol.encode_error("model_error", self._model_error_text(exc), turn)
            )
        finally:
            timer.cancel()
            await stream.aclose()  # type: ignore[attr-defined]
        if parts:
            self.history.append({"role": "assistant", "content": "".join(parts)})
        self._log(
            logging.INFO,
            "turn=%d done reason=%s chunks=%d in %.1f ms",
            turn,
            reason,
            len(parts),
            (time.perf_counter() - started) * 1000,
        )
        if reason == _DISCONNECTED:
            return
        if reason == "timeout":
            await self._send(
                protocol.encode_error(
                    "timeout", f"the turn took longer than {self.version.timeout:g} s", turn
                )
            )
        await self._send(protocol.encode_done(turn, reason))  # type: ignore[arg-type]

    # ------------------------------------------------------------------ helpers
    async def _send(self, frame: str) -> None:
        try:
            await self.connection.send(frame)
        except ConnectionClosed:
            pass

    def _model_error_text(self, exc: BaseException) -> str:
        text = f"the model raised an error; the server log has the details (session {self.id})"
        if self.debug:
            text += f": {type(exc).__name__}: {exc}"
        return text


def _peer(connection: ServerConnection) -> str:
    address = connection.remote_address
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return str(address)
