"""The conversation core: one session's turn machine, with no socket in sight.

It owns the model instance's life (``on_chat_start`` once, ``on_chat_end`` exactly once),
the history, the turn numbers and the running turn: a message while one runs is ``busy``,
a cancel ends it (``done`` ``cancelled`` after the model's ``finally``), a timeout ends it
with ``timeout``, ``done`` goes out once per turn, and the assistant's reply joins the
history when the turn ends. Every frame it produces goes into its ``Outbox``; which
connection (if any) reads that outbox is not its business, so a turn carries on while its
client is away and resumes. Tested with plain calls in ``tests/test_conversation.py``.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, Final

from ws_server import loop_watch, metrics, protocol
from ws_server.exceptions import (
    AnythingAgentError,
    BadRequest,
    Busy,
    ModelFailed,
    Overloaded,
    ServerUnavailable,
)
from ws_server.redaction import redact
from ws_server.registry.catalog import ModelVersion
from ws_server.registry.slots import Ticket
from ws_server.runners import ModelSession
from ws_server.sdk import Message
from ws_server.session.history import History, message_bytes
from ws_server.session.journal import Journal
from ws_server.session.outbox import Outbox

log = logging.getLogger("anything_agent.session")

# A turn stopped because its client went and will not come back: like a done reason,
# but nobody to send it to.
DISCONNECTED: Final = "disconnected"
# How long a stopped turn's cleanup (the model's ``finally``) and ``on_chat_end`` may run
# before they are interrupted, so one model's hung cleanup cannot hold a session or a
# shutdown forever.
CLEANUP_LIMIT: Final = 10.0
# A turn stopped because its session moves to another node (a drain): the client gets
# error ``interrupted`` and ``done`` ``error``.
INTERRUPTED: Final = "interrupted"


@dataclass(frozen=True)
class HistoryLimits:
    """How much history a conversation keeps (messages, and bytes of their text)."""

    messages: int = 1000
    bytes: int = 4 * 1024 * 1024


class Conversation:
    """A conversation: runs turns one at a time and writes their frames to ``outbox``."""

    # Slots: an idle session is mostly this object, and there may be tens of thousands.
    __slots__ = (
        "_ended",
        "_ended_turn",
        "_metrics",
        "_model",
        "_starting",
        "_stop_reason",
        "_turn_closing",
        "_turn_task",
        "closing",
        "debug",
        "history",
        "id",
        "journal",
        "last_activity",
        "limits",
        "outbox",
        "turn",
        "version",
    )

    def __init__(
        self,
        version: ModelVersion,
        outbox: Outbox,
        *,
        limits: HistoryLimits | None = None,
        debug: bool = False,
        session_id: str | None = None,
        api: str = "ws",
    ) -> None:
        self.id = session_id or uuid.uuid4().hex[:16]
        self.version = version
        self.outbox = outbox
        self.limits = limits or HistoryLimits()
        self.debug = debug
        self.history = History(self.limits.messages, self.limits.bytes)
        self.turn = 0
        self._ended_turn = 0  # the last turn whose done frame was sent
        self.closing = False  # the server is stopping: no new turns
        self.last_activity = time.monotonic()  # when it started, or its last turn ended
        self._metrics = metrics.for_model(version.name, api)  # api: "ws" or "openai"
        self._model: ModelSession | None = None
        self._starting: asyncio.Task[None] | None = None
        self._turn_task: asyncio.Task[None] | None = None
        self._stop_reason: str | None = None
        self._turn_closing = False  # the turn's stream is being closed: let it finish
        self._ended = False
        self.journal: Journal | None = None  # set by a store that lets sessions move

    def restore(self, turn: int, messages: list[Message]) -> None:
        """Carry on a session taken over from another node: its turns so far (each one
        ended) and its history."""
        self.turn = self._ended_turn = turn
        self.history.replace(messages)

    def context_snapshot(self) -> dict[str, Any]:
        """The model's context as far as it moves between nodes ({} before it started)."""
        return self._model.snapshot() if self._model is not None else {}

    @property
    def turn_running(self) -> bool:
        return self._turn_task is not None and not self._turn_task.done()

    @property
    def running_turn(self) -> asyncio.Task[None] | None:
        """The running turn's task, to wait for its end (None when none runs)."""
        return self._turn_task if self.turn_running else None

    def log(self, level: int, message: str, *args: object, exc_info: Any = False) -> None:
        log.log(
            level,
            "model=%s@%s session=%s " + message,
            self.version.name,
            self.version.version,
            self.id,
            *args,
            exc_info=exc_info,
        )

    # ------------------------------------------------------------------ start and end
    async def start(
        self, gone: asyncio.Future[Any] | None = None, context: dict[str, Any] | None = None
    ) -> tuple[str, str] | None:
        """Run ``on_chat_start`` (then restore ``context``, for a session taken over);
        None when it returned, else the error code and message the client gets (a start
        that fails or takes longer than the model's timeout). ``gone`` done (the client
        left, or the server stops) ends the wait quietly, with the code ``DISCONNECTED``."""
        try:
            self._model = self.version.runner.open_session()
        except Exception as error:
            self.log(logging.ERROR, "creating the model instance raised", exc_info=True)
            return "model_error", self.model_error_text(error)
        starting = asyncio.get_running_loop().create_task(self._model.start(context))
        self._starting = starting
        self._watched(starting)
        waiting: set[asyncio.Future[Any]] = {starting}
        if gone is not None:
            waiting.add(gone)
        await asyncio.wait(waiting, timeout=self.version.timeout, return_when="FIRST_COMPLETED")
        self._starting = None  # an idle session need not keep the task (it is ended below)
        if not starting.done():
            starting.cancel()
            await asyncio.wait({starting})
            if (gone is not None and gone.done()) or self.closing:
                return DISCONNECTED, "the client left or the server is stopping"
            self.log(logging.ERROR, "on_chat_start timed out after %gs", self.version.timeout)
            return "timeout", "on_chat_start took too long"
        failure: BaseException | None
        if starting.cancelled():
            if self.closing:
                return DISCONNECTED, "the server is stopping"
            failure = asyncio.CancelledError("on_chat_start was cancelled")
        else:
            failure = starting.exception()
        if failure is not None:
            self.log_failure("on_chat_start", failure)
            return self.client_error(failure)
        return None

    async def end(self, reason: str = DISCONNECTED) -> None:
        """Stop a running turn (``reason``: its done reason, or ``DISCONNECTED`` when
        nobody will read it), then run ``on_chat_end``: once, however often it is called."""
        if self._starting is not None and not self._starting.done():
            self._starting.cancel()
        await self.stop_turn(reason)
        if self._ended or self._model is None:
            self._ended = True
            return
        self._ended = True
        ending = asyncio.get_running_loop().create_task(self._model.end())
        self._watched(ending)
        try:
            await asyncio.wait_for(ending, CLEANUP_LIMIT)
        except TimeoutError:
            self.log(logging.ERROR, "on_chat_end did not finish in time; abandoned")
        except Exception:
            self.log(logging.ERROR, "on_chat_end raised", exc_info=True)

    def cancel_now(self) -> asyncio.Task[None] | None:
        """Cancel a running start or turn without waiting (a second Ctrl-C); the task that
        winds the turn up, if one runs."""
        if self._starting is not None and not self._starting.done():
            self._starting.cancel()
        if self.turn_running:
            return asyncio.get_running_loop().create_task(self.stop_turn("cancelled"))
        return None

    async def wind_down(self, grace_period: float, moving: bool = False) -> None:
        """Server stopping: no new turns; a running start or turn gets ``grace_period``
        to end, then is cancelled (the turn's ``done`` says ``cancelled``; or, for a
        session that moves on to another node, error ``interrupted`` and ``done``
        ``error``, as when its node is lost)."""
        self.closing = True
        running = {t for t in (self._starting, self._turn_task) if t and not t.done()}
        if running:
            await asyncio.wait(running, timeout=grace_period)
        self.outbox.unblock()  # a turn paused on a full buffer (its client away) ends too
        if self._starting is not None and not self._starting.done():
            self._starting.cancel()
        await self.stop_turn(INTERRUPTED if moving else "cancelled")

    # ------------------------------------------------------------------ frames in
    async def receive(self, frame: protocol.ClientFrame) -> None:
        """A client frame, parsed: run a turn, or cancel one; refusals become ``error``
        frames in the outbox."""
        if isinstance(frame, protocol.CancelTurn):
            await self.stop_turn("cancelled")
            return
        slots = self.version.slots
        try:
            self._check(frame)
            slots.admit()  # a full queue refuses it now: no turn number is spent
        except AnythingAgentError as exc:
            await self.refuse(exc)
            return
        journal = self.journal
        if isinstance(frame, protocol.UserMessage):
            message = frame.message()
            self.history.append(message)
            if journal is not None:
                journal.history_appended(message)
        else:
            self.history.replace(frame.messages)
            if journal is not None:
                journal.history_replaced(self.history.messages())
        self.turn += 1
        if journal is not None:
            journal.turn_started(self.turn, self.outbox.seq)
        self._stop_reason = None
        self._turn_closing = False
        ticket = slots.enter(self._queued, self.turn)
        self._turn_task = asyncio.get_running_loop().create_task(
            self._run_turn(self.turn, self.history.messages(), frame.params, ticket)
        )
        self._turn_task.add_done_callback(ticket.close)  # whatever becomes of the turn
        self._watched(self._turn_task)

    def _check(self, frame: protocol.UserMessage | protocol.ReplaceHistory) -> None:
        if self.closing:
            raise ServerUnavailable("the server is shutting down; no new turns start")
        if self.turn_running:
            raise Busy(f"turn {self.turn} is still running; send cancel to stop it")
        newest = frame.message() if isinstance(frame, protocol.UserMessage) else frame.messages[-1]
        size = message_bytes(newest)
        if size > self.limits.bytes:
            raise BadRequest(
                f"the message is {size} bytes, over this server's history limit of "
                f"{self.limits.bytes} bytes"
            )

    async def refuse(self, exc: AnythingAgentError) -> None:
        """Tell the client a frame was refused (busy, bad_request, rate_limited, ...)."""
        level = logging.DEBUG if exc.code == "rate_limited" else logging.INFO  # floods
        self.log(level, "refused a frame: %s: %s", exc.code, exc.message)
        retry_after = exc.retry_after if isinstance(exc, Overloaded) else None
        await self.send_error(exc.code, exc.message, retry_after=retry_after)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ turns
    async def stop_turn(self, reason: str) -> None:
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
            if not self._turn_closing:  # a turn already winding down is let finish:
                task.cancel()  # cancelling its stream's close would kill a worker
        done, _ = await asyncio.wait({task}, timeout=CLEANUP_LIMIT)
        if not done:
            self.log(
                logging.ERROR,
                "turn=%d cleanup still running after %gs; interrupted",
                self.turn,
                CLEANUP_LIMIT,
            )
            task.cancel()
            await asyncio.wait({task})
        if task.cancelled() and self._stop_reason != DISCONNECTED:
            # Cancelled before its first step (a cancel right behind the message): the
            # turn's own code never ran, so it falls to us to end the turn for the client.
            await self._finish(self.turn, self._stop_reason)
            if self.journal is not None and self._model is not None:
                self.journal.turn_ended(self.turn, self._model.snapshot())

    def _expire(self, task: asyncio.Task[None]) -> None:
        if self._turn_task is task and not task.done() and self._stop_reason is None:
            self._stop_reason = "timeout"
            task.cancel()

    async def _run_turn(
        self,
        turn: int,
        messages: list[Message],
        params: dict[str, Any] | None,
        ticket: Ticket,
    ) -> None:
        assert self._model is not None
        task = asyncio.current_task()
        assert task is not None
        if not ticket.granted and not await self._wait_for_slot(turn, ticket, task):
            return
        timer = asyncio.get_running_loop().call_later(self.version.timeout, self._expire, task)
        started = time.perf_counter()
        parts: list[str] = []
        kept = 0  # characters of the reply kept for the history: never more than it holds
        chunks = 0
        sent = 0  # bytes of chunk frames
        first_chunk: float | None = None
        reason = "stop"
        outbox = self.outbox
        journal = self.journal
        limit = self.limits.bytes
        stream = self._model.stream(messages, journal is not None, params, self._emitted)
        try:
            try:
                async for piece in stream:
                    chunk = protocol.clean_text(piece)
                    chunks += 1
                    if kept < limit:
                        parts.append(chunk)
                        kept += len(chunk)
                    sent += await outbox.chunk(turn, chunk)
                    if first_chunk is None:
                        first_chunk = time.perf_counter() - started
            finally:
                self._turn_closing = True
                await stream.aclose()  # type: ignore[attr-defined]
                ticket.close()  # the model is done: the next queued turn may start
        except asyncio.CancelledError as exc:
            if self._stop_reason is not None:  # ours: cancel, timeout, disconnect, shutdown
                reason = self._stop_reason
                while task.cancelling():
                    task.uncancel()
            elif task.cancelling() == 0:  # raised by the model's own code
                reason = "error"
                await self._report_model_error(turn, exc)
            else:  # the whole session is being torn down
                raise
        except Exception as exc:
            reason = "error"
            await self._report_model_error(turn, exc)
        finally:
            timer.cancel()
        if parts:
            reply = "".join(parts)
            while len(reply.encode()) > self.limits.bytes:  # rare: a huge reply
                reply = reply[: len(reply) * 3 // 4]
            answer: Message = {"role": "assistant", "content": reply}
            self.history.append(answer)
            if journal is not None:
                journal.history_appended(answer)
        self.last_activity = time.monotonic()
        duration = time.perf_counter() - started
        self.version.slots.finished(duration)
        done_reason = "error" if reason == INTERRUPTED else reason
        self._metrics.turn_ended(done_reason, chunks, sent, first_chunk, duration)
        if log.isEnabledFor(logging.DEBUG):  # per turn: /metrics has the figures
            self.log(
                logging.DEBUG,
                "turn=%d done reason=%s chunks=%d in %.1f ms",
                turn,
                reason,
                chunks,
                duration * 1000,
            )
        if reason == DISCONNECTED:
            return
        await self._finish(turn, reason)
        if journal is not None:
            journal.turn_ended(turn, self._model.snapshot())

    async def _wait_for_slot(self, turn: int, ticket: Ticket, task: asyncio.Task[None]) -> bool:
        """Wait in the model's queue (``concurrency``); False when the turn was stopped
        while it waited (ended for the client here: ``done`` with the stop's reason)."""
        assert ticket.ready is not None
        try:
            await ticket.ready
            return True
        except asyncio.CancelledError:
            reason = self._stop_reason
            if reason is None:
                raise
            while task.cancelling():
                task.uncancel()
            ticket.close()
            if reason != DISCONNECTED:
                await self._finish(turn, reason)
                if self.journal is not None and self._model is not None:
                    self.journal.turn_ended(turn, self._model.snapshot())
            return False

    def _queued(self, turn: int, place: int) -> None:
        """Tell the client turn ``turn``'s place in the model's queue."""
        if self.turn == turn and self._ended_turn < turn:
            self.outbox.event(turn, "queued", {"position": place})

    def _emitted(self, name: str, data: dict[str, Any]) -> None:
        """A model event: to the outbox, as part of the turn running (none after its done)."""
        turn = self.turn
        if self._ended_turn < turn:
            self.outbox.event(turn, name, data)

    async def _finish(self, turn: int, reason: str) -> None:
        """The frames that end a turn stopped for ``reason``: an error first for a timeout
        or an interruption, then ``done``."""
        if reason == "timeout":
            message = f"the turn took longer than {self.version.timeout:g} s"
            await self.send_error("timeout", message, turn)
        elif reason == INTERRUPTED:
            message = "this node is shutting down; the reply is incomplete (send it again)"
            await self.send_error("interrupted", message, turn)
            reason = "error"
        await self._send_done(turn, reason)  # type: ignore[arg-type]

    async def _send_done(self, turn: int, reason: protocol.DoneReason) -> None:
        """End ``turn`` for the client, once, whoever stopped it."""
        if self._ended_turn < turn:
            self._ended_turn = turn
            await self.outbox.done(turn, reason)

    async def _report_model_error(self, turn: int, exc: BaseException) -> None:
        self.log_failure(f"turn={turn} on_chat_messages", exc)
        code, message = self.client_error(exc)
        await self.send_error(code, message, turn)  # type: ignore[arg-type]

    async def send_error(
        self,
        code: protocol.ErrorCode,
        message: str,
        turn: int | None = None,
        retry_after: int | None = None,
    ) -> None:
        metrics.ERRORS.labels(code=code).inc()
        await self.outbox.error(code, message, turn, retry_after)

    # ------------------------------------------------------------------ errors
    def log_failure(self, what: str, exc: BaseException) -> None:
        """Our own errors are a line; the model's exceptions come with their traceback."""
        if isinstance(exc, ModelFailed):
            self.log(logging.ERROR, "%s raised: %s", what, exc.message)
        elif isinstance(exc, AnythingAgentError):
            self.log(logging.ERROR, "%s failed: %s: %s", what, exc.code, exc.message)
        else:
            self.log(logging.ERROR, "%s raised", what, exc_info=(type(exc), exc, exc.__traceback__))

    def client_error(self, exc: BaseException) -> tuple[str, str]:
        """What the client may see: our errors as they are, the model's only generically."""
        if isinstance(exc, AnythingAgentError) and not isinstance(exc, ModelFailed):
            return exc.code, exc.message
        return "model_error", self.model_error_text(exc)

    def model_error_text(self, exc: BaseException) -> str:
        text = f"the model raised an error; the server log has the details (session {self.id})"
        if self.debug:
            text += redact(f": {type(exc).__name__}: {exc}")
        return text

    def _watched(self, task: asyncio.Task[Any] | None) -> None:
        """A shared model's code runs in ``task`` on the event loop: should it block the
        loop, the loop watch names this model and session."""
        if task is not None and self.version.mode == "shared":
            version = self.version
            owner = f"{loop_watch.OWNER_PREFIX}{version.name}@{version.version} session={self.id}"
            loop_watch.attribute(task, owner)
