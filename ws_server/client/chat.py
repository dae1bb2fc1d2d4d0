"""Python client for protocol v1: what bot frontends and ``anything-agent chat`` talk through.

    async with connect("ws://127.0.0.1:8000", "echo") as chat:
        turn = await chat.send("hello")
        async for chunk in turn:
            print(chunk, end="", flush=True)
        print(chat.history)

A turn's events (what the model reports besides text: ``status``, ``step``, ``queued``, …)
are kept in ``turn.events``; ``turn.items()`` yields them between the chunks, in order.

One ``ChatClient`` is one session on the server. Turns run one at a time, as on the
server; ``cancel()`` may be called from another task while a turn is being iterated. The
client mirrors the server's history rule (the user message when its turn starts, the
assistant's reply, partial ones included, when it ends), so ``history`` is what the model
sees next.

Resuming (design.md, *Resuming*): by default the client offers ``resumable``, keeps the
session's resume token and the ``seq`` of the last frame it processed, and when the
connection drops (mid-turn or idle; anything but a close the client made, or a close the
server meant as final) it reconnects offering ``resume.<token>.<seq>``, with backoff, for
up to the session's resume window. The server replays what was missed, and the turn being
iterated goes on yielding every chunk exactly once. A resume that fails (``resume_expired``:
the server no longer has the session) surfaces as ``ConnectionLost`` on the pending turn or
the next call; the client then holds the new session the server started (empty history:
``previous_history`` keeps the old conversation for ``replace_history``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any, Final, Literal
from urllib.parse import quote, urlsplit, urlunsplit

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.datastructures import Headers, HeadersLike
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.frames import Close, CloseCode
from websockets.typing import Subprotocol

from ws_server import protocol
from ws_server.exceptions import (
    ChatRefused,
    ClientError,
    ConnectionLost,
    ProtocolViolation,
    ServerError,
    TurnFailed,
)
from ws_server.sdk import Message

DEFAULT_URL: Final = "ws://127.0.0.1:8000"
# Chunks are whatever a model yields; a generous bound still keeps a rogue server from
# making the client buffer without limit.
MAX_FRAME_SIZE: Final = 64 * 1024 * 1024
SUBPROTOCOL: Final = Subprotocol("anything-agent.v1")
# Resume attempts: the first at once, then after 0.05 s, doubling up to 2 s between tries.
FIRST_RETRY_DELAY: Final = 0.05
MAX_RETRY_DELAY: Final = 2.0
# Handshake refusals worth another try within the window (limits, draining, overloaded);
# any other status (400, 401, 403, 404) will not change by trying again.
RETRY_STATUSES: Final = frozenset({429, 500, 502, 503, 504})
# Closes the server sends that leave a resumable session waiting (going away, internal
# trouble, restarts); others (1000 idle timeout, 1008, 1009, 4001 replaced by another
# connection, …) are the server's final word, as before resuming existed.
RESUMABLE_CLOSES: Final = frozenset(
    {
        CloseCode.GOING_AWAY,
        CloseCode.ABNORMAL_CLOSURE,
        CloseCode.INTERNAL_ERROR,
        CloseCode.SERVICE_RESTART,
        CloseCode.TRY_AGAIN_LATER,
        CloseCode.BAD_GATEWAY,
    }
)
RESUME_EXPIRED: Final = "resume_expired"
_SEQUENCED: Final = (protocol.Chunk, protocol.Event, protocol.Done, protocol.ErrorReport)


def chat_url(base_url: str, model: str) -> str:
    """The chat endpoint of ``model`` on the server at ``base_url`` (``ws://``, ``wss://``,
    or ``http(s)://``, which is mapped to its WebSocket scheme)."""
    parts = urlsplit(base_url if "://" in base_url else f"ws://{base_url}")
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss"):
        raise ValueError(f"not a server URL: {base_url!r} (expected ws://HOST:PORT)")
    path = f"{parts.path.rstrip('/')}/v1/chat/{quote(model, safe='')}"
    return urlunsplit((scheme, parts.netloc, path, "", ""))


@dataclass(frozen=True, slots=True)
class ResumeNotice:
    """What became of a dropped connection, for ``on_resume`` (the terminal prints it).

    ``outcome``: ``resumed`` (the same session goes on; ``replayed`` frames were sent
    again), ``new_session`` (the server no longer had the session and started a new one;
    ``message`` says why) or ``failed`` (no resume within the window, or a final refusal;
    the client is unusable)."""

    outcome: Literal["resumed", "new_session", "failed"]
    replayed: int = 0
    attempts: int = 0
    message: str = ""


class Turn:
    """One turn: iterate it for the chunks as they arrive, or ``items()`` for the chunks
    and the events; either way ``events`` keeps the events.

    Iteration ends with the ``done`` frame; ``reason`` then says why. A turn that ended
    with ``error`` or ``timeout`` raises ``TurnFailed`` once its frames are all read, so the
    session stays usable for the next turn. A connection lost for good (or a session that
    could not be resumed) raises ``ConnectionLost``.
    """

    def __init__(self, client: ChatClient, number: int, frame: str = "") -> None:
        self._client = client
        self.number = number
        self.reason: protocol.DoneReason | None = None
        self.chunks: list[str] = []
        self.events: list[protocol.Event] = []
        self._error: protocol.ErrorReport | None = None
        # For a resume: the frame that started the turn (sent again if it never reached
        # the server), whether it was sent, and whether a cancel was asked for.
        self._frame = frame
        self._sent_on: ClientConnection | None = None
        self._cancel_requested = False
        self._lost: ConnectionLost | None = None  # the session it belonged to is gone

    @property
    def text(self) -> str:
        """Everything received so far."""
        return "".join(self.chunks)

    @property
    def finished(self) -> bool:
        return self.reason is not None

    def __aiter__(self) -> AsyncIterator[str]:
        return self._read(with_events=False)

    def items(self) -> AsyncIterator[str | protocol.Event]:
        """The chunks (``str``) and events (``protocol.Event``) in the order they arrive."""
        return self._read(with_events=True)

    async def _read(self, *, with_events: bool) -> AsyncIterator[Any]:
        while self.reason is None:
            frame = await self._client._receive(self)
            if isinstance(frame, protocol.Chunk) and frame.turn == self.number:
                self.chunks.append(frame.content)
                yield frame.content
            elif isinstance(frame, protocol.Event) and frame.turn == self.number:
                self.events.append(frame)
                if with_events:
                    yield frame
            elif isinstance(frame, protocol.Done) and frame.turn == self.number:
                self._finish(frame.reason)
            elif isinstance(frame, protocol.ErrorReport) and frame.turn == self.number:
                self._error = frame
            elif isinstance(frame, protocol.ErrorReport) and frame.turn is None:
                # The message was refused (nothing of its turn came: it never began).
                if not self.chunks and not self.events and self._error is None:
                    self._client._end_turn(self, started=False)
                    raise ServerError(frame.message, code=frame.code, retry_after=frame.retry_after)
            else:
                raise ProtocolViolation(f"unexpected frame during turn {self.number}: {frame}")
        if self.reason in ("error", "timeout"):
            error = self._error
            raise TurnFailed(
                error.message if error else f"turn {self.number} ended with {self.reason}",
                code=error.code if error else self.reason,
                turn=self.number,
                reason=self.reason,
                partial=self.text,
            )

    def _finish(self, reason: protocol.DoneReason) -> None:
        self.reason = reason
        self._client._end_turn(self, started=True)

    async def reply(self) -> str:
        """Read the turn to its end and return the whole reply (``TurnFailed`` on error)."""
        async for _ in self:
            pass
        return self.text

    async def cancel(self) -> None:
        """Ask the server to end this turn now; iteration then ends with ``cancelled``."""
        if self.reason is None and self._lost is None:
            self._cancel_requested = True  # sent again after a resume if the turn still runs
            await self._client._send(protocol.encode_cancel())


class _AttemptFailed(Exception):
    """One resume attempt did not get the session back: ``final`` when trying again
    cannot help, ``refused`` when nothing listens at the address."""

    def __init__(self, reason: str, *, final: bool = False, refused: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.final = final
        self.refused = refused


class ChatClient:
    """One chat session with one model; made by ``connect`` (or ``ChatClient.open``)."""

    def __init__(
        self,
        connection: ClientConnection,
        ready: protocol.Ready,
        on_frame: Callable[[str], None] | None = None,
        *,
        endpoint: str | None = None,
        headers: HeadersLike | None = None,
        open_timeout: float = 10.0,
        on_resume: Callable[[ResumeNotice], None] | None = None,
    ) -> None:
        self.connection = connection
        self.on_frame = on_frame
        self.on_resume = on_resume
        self.session_id = ready.session_id
        self.model = ready.model
        self.version = ready.version
        self._history: list[Message] = []
        self._previous_history: list[Message] = []
        self._pending: list[Message] = []
        self._turns = 0
        self._current: Turn | None = None
        # Resuming: where to reconnect, the session's token and window, the last seq
        # processed; a resume in progress; what a finished one left to settle.
        self._endpoint = endpoint
        self._headers = headers
        self._open_timeout = open_timeout
        self._token = ready.resume_token if endpoint is not None else None
        self._window = ready.resume_window or 0.0
        self._last_seq = 0
        self._recovery: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._resumed: protocol.Resumed | None = None  # replay not yet processed to its end
        self._failure: ConnectionLost | None = None  # for the next call (no turn was pending)
        self._dead: ConnectionLost | None = None  # the connection is gone for good
        self._closing = False

    @classmethod
    async def open(
        cls,
        url: str,
        model: str,
        *,
        api_key: str | None = None,
        headers: HeadersLike | None = None,
        open_timeout: float = 10.0,
        on_frame: Callable[[str], None] | None = None,
        resumable: bool = True,
        on_resume: Callable[[ResumeNotice], None] | None = None,
    ) -> ChatClient:
        """Connect to ``model`` on the server at ``url`` and wait for the session to be
        ready (``on_chat_start`` done). Raises ``ChatRefused`` if the server says no.

        ``api_key`` is sent as ``Authorization: Bearer`` (servers started with API keys
        require one). ``on_frame`` is called with every frame as received (raw JSON
        text), for clients that log or relay them; after a resume, frames replayed that
        were already processed are not passed again. ``resumable=False`` turns resuming
        off: a dropped connection then raises ``ConnectionLost`` at once. ``on_resume`` is
        called with a ``ResumeNotice`` each time a dropped connection was resumed, or
        could not be."""
        endpoint = chat_url(url, model)
        if api_key:
            headers = Headers(headers or [])
            headers["Authorization"] = f"Bearer {api_key}"
        offer = [SUBPROTOCOL, Subprotocol(protocol.RESUMABLE)] if resumable else [SUBPROTOCOL]
        try:
            connection = await ws_connect(
                endpoint,
                subprotocols=offer,
                additional_headers=headers,
                open_timeout=open_timeout,
                max_size=MAX_FRAME_SIZE,
                compression=None,
            )
        except InvalidStatus as exc:
            raise _refusal(exc) from None
        except (OSError, InvalidHandshake, TimeoutError) as exc:
            raise ChatRefused(
                f"cannot connect to {endpoint}: {exc}", status=0, code="unreachable"
            ) from None
        try:
            data = await connection.recv()
        except ConnectionClosed as exc:
            raise ConnectionLost(
                f"the server closed the session before it was ready ({exc})",
                close_code=exc.rcvd.code if exc.rcvd else None,
            ) from None
        if on_frame is not None:
            on_frame(str(data))
        frame = protocol.parse_server_frame(data)
        if isinstance(frame, protocol.ErrorReport):  # on_chat_start failed
            await connection.close()
            raise ServerError(frame.message, code=frame.code)
        if not isinstance(frame, protocol.Ready):
            await connection.close()
            raise ProtocolViolation(f"expected a ready frame, got {frame}")
        client = cls(
            connection,
            frame,
            on_frame,
            endpoint=endpoint if resumable else None,
            headers=headers,
            open_timeout=open_timeout,
            on_resume=on_resume,
        )
        client._watch_connection()
        return client

    # ------------------------------------------------------------------ turns
    @property
    def history(self) -> list[Message]:
        """The conversation as the model will see it next (a copy)."""
        return [dict(m) for m in self._history]

    @property
    def previous_history(self) -> list[Message]:
        """The conversation of the session that could not be resumed, the last time one
        could not (a copy; empty until then): its finished turns, for ``replace_history``
        to carry it into the new session. The interrupted turn is not in it."""
        return [dict(m) for m in self._previous_history]

    @property
    def running(self) -> Turn | None:
        """The turn in progress, if any."""
        return self._current

    @property
    def resumable(self) -> bool:
        """Whether a dropped connection would be resumed (the server gave a token)."""
        return self._token is not None and self._dead is None and not self._closing

    @property
    def resume_window(self) -> float:
        """Seconds the server keeps the session waiting after a drop (0: no resume)."""
        return self._window if self._token is not None else 0.0

    @property
    def last_seq(self) -> int:
        """The ``seq`` of the last frame processed: where a resume carries on from."""
        return self._last_seq

    @property
    def is_open(self) -> bool:
        """False once the client was closed or its connection is lost for good."""
        return not self._closing and self._dead is None

    async def send(self, content: str, *, params: dict[str, Any] | None = None) -> Turn:
        """Send a user message; returns the turn to iterate for the reply. ``params`` (a
        JSON object) is what the model sees as ``self.params`` for this turn only."""
        frame = protocol.encode_message(content, _checked(params))
        return await self._start(frame, [{"role": "user", "content": content}], replace=False)

    async def replace_history(
        self, messages: list[Message], *, params: dict[str, Any] | None = None
    ) -> Turn:
        """Replace the session's history (for clients that keep their own) and run a turn,
        with ``params`` as in ``send``."""
        copied: list[Message] = [{"role": m["role"], "content": m["content"]} for m in messages]
        frame = protocol.encode_messages(copied, _checked(params))
        return await self._start(frame, copied, replace=True)

    async def ask(self, content: str, *, params: dict[str, Any] | None = None) -> str:
        """Send a message and return the whole reply (``TurnFailed`` if the turn failed)."""
        return await (await self.send(content, params=params)).reply()

    async def cancel(self) -> None:
        """Cancel the running turn, if any (safe to call from another task)."""
        if self._current is not None:
            await self._current.cancel()

    async def close(self) -> None:
        """End the session: close with 1000, which ends it on the server at once (the
        model's ``on_chat_end`` runs); a resume in progress is abandoned."""
        self._closing = True
        for task in (self._watcher, self._recovery):
            if task is not None and not task.done():
                task.cancel()
                with suppress(asyncio.CancelledError):
                    await task
        await self.connection.close()

    async def _start(self, frame: str, messages: list[Message], *, replace: bool) -> Turn:
        if self._current is not None:
            raise ClientError(
                f"turn {self._current.number} is still running: read it to the end "
                "or cancel it before sending another message"
            )
        failure = self._take_failure()
        if failure is not None:
            raise failure
        self._pending = messages if replace else [*self._history, *messages]
        turn = Turn(self, self._turns + 1, frame)
        self._current = turn
        try:
            await self._send(frame, turn)
        except BaseException:
            if self._current is turn:
                self._current = None
            raise
        return turn

    def _end_turn(self, turn: Turn, *, started: bool) -> None:
        if started:
            self._turns = turn.number
            self._history = self._pending
            if turn.chunks:
                self._history.append({"role": "assistant", "content": turn.text})
        self._pending = []
        self._current = None

    # ------------------------------------------------------------------ I/O
    async def _send(self, frame: str | None, turn: Turn | None = None) -> None:
        """Send ``frame`` (None: nothing of its own; ``turn``: the turn it starts), first
        whatever a resume found the server missing. A frame whose send failed may or may
        not have reached the server: the connection is resumed, and the resume's answer
        says whether to send it again (``_missing_after_resume``: the turn's message, or a
        cancel of a turn still running), never a guess."""
        while True:
            connection = self.connection
            try:
                for missing in self._missing_after_resume(connection):
                    await connection.send(missing)
                if frame is not None:
                    if turn is not None:
                        turn._sent_on = connection
                    pending, frame = frame, None
                    await connection.send(pending)
                return
            except ConnectionClosed:
                await self._recover(connection)

    async def _receive(self, turn: Turn) -> protocol.ServerFrame:
        """The next frame for ``turn``: frames already processed (replayed twice) are
        skipped; a dropped connection is resumed on the way."""
        while True:
            lost = turn._lost or self._dead
            if lost is not None:
                if self._current is turn:
                    self._current = None
                raise lost
            if self._resumed is not None:
                await self._send(None)  # what the server missed, once the replay is read
            connection = self.connection
            try:
                data = await connection.recv()
            except ConnectionClosed:
                try:
                    await self._recover(connection)
                except ConnectionLost:
                    if self._current is turn:
                        self._current = None
                    raise
                continue
            if connection is not self.connection:
                continue  # read from a connection already replaced: its resume replays it
            frame = protocol.parse_server_frame(data)
            if isinstance(frame, _SEQUENCED):
                seq = frame.seq
                if seq:
                    if seq <= self._last_seq:
                        continue  # processed before the connection dropped
                    self._last_seq = seq
            if self.on_frame is not None:
                self.on_frame(str(data))
            return frame

    # ------------------------------------------------------------------ resuming
    def _watch_connection(self) -> None:
        """While the session is resumable, a task notices a connection that drops while
        no turn is being read, so an idle session is resumed within its window too."""
        if self._token is not None:
            self._watcher = asyncio.get_running_loop().create_task(self._watch())

    def _watching(self) -> bool:
        return self._token is not None and self._dead is None and not self._closing

    async def _watch(self) -> None:
        while self._watching():
            connection = self.connection
            await connection.wait_closed()
            if self._watching() and connection is self.connection:
                await self._recovered(connection)

    async def _recover(self, dropped: ClientConnection) -> None:
        """``dropped`` was found closed: return once a connection to the same session is
        up, or raise ``ConnectionLost`` (lost for good, or a new session replaced it)."""
        await self._recovered(dropped)
        failure = self._take_failure()
        if failure is not None:
            raise failure

    async def _recovered(self, dropped: ClientConnection) -> None:
        """Make sure ``dropped`` is resumed, or given up on, once (whoever notices first
        starts the resume; everyone else waits for that one)."""
        if self.connection is not dropped or self._dead is not None:
            return
        close = dropped.protocol.close_rcvd
        if (
            self._closing
            or self._token is None
            or self._endpoint is None
            or (close is not None and close.code not in RESUMABLE_CLOSES)
        ):
            self._dead = _lost(close)
            return
        if self._recovery is None or self._recovery.done():
            self._recovery = asyncio.get_running_loop().create_task(self._resume(dropped))
        recovery = self._recovery
        try:
            await asyncio.shield(recovery)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if not recovery.cancelled() or (current is not None and current.cancelling()):
                raise
            # close() abandoned the resume: callers see the connection lost, not a cancel.
            self._dead = _lost(close)

    def _take_failure(self) -> ConnectionLost | None:
        if self._dead is not None:
            return self._dead
        failure, self._failure = self._failure, None
        return failure

    async def _resume(self, dropped: ClientConnection) -> None:
        """Reconnect with backoff until the session is back, the server says it is gone,
        or the resume window has passed."""
        loop = asyncio.get_running_loop()
        close = dropped.protocol.close_rcvd
        deadline = loop.time() + self._window
        delay = FIRST_RETRY_DELAY
        attempts = 0
        while True:
            attempts += 1
            try:
                outcome = await self._attempt()
            except _AttemptFailed as failure:
                # After the server said it was going away, nothing listening means no
                # node is left to resume on: waiting out the window would not help.
                final = failure.final or (failure.refused and close is not None)
                if not final and loop.time() + delay < deadline:
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, MAX_RETRY_DELAY)
                    continue
                self._give_up(close, failure, attempts)
                return
            if outcome is not None:  # a new session was notified of already
                self._notify(ResumeNotice("resumed", outcome.replayed, attempts))
            return

    async def _attempt(self) -> protocol.Resumed | None:
        """One resume handshake: the ``resumed`` frame, or None for a new session. It gets
        the whole ``open_timeout``, even late in the window: the server, which noticed the
        drop later than we did, may still hold the session, and if not it says so."""
        assert self._token is not None and self._endpoint is not None
        entry = Subprotocol(protocol.resume_entry(self._token, self._last_seq))
        try:
            connection = await ws_connect(
                self._endpoint,
                subprotocols=[SUBPROTOCOL, entry],
                additional_headers=self._headers,
                open_timeout=self._open_timeout,
                max_size=MAX_FRAME_SIZE,
                compression=None,
            )
        except InvalidStatus as exc:
            refusal = _refusal(exc)
            raise _AttemptFailed(
                refusal.message, final=refusal.status not in RETRY_STATUSES
            ) from None
        except ConnectionRefusedError as exc:
            raise _AttemptFailed(f"cannot connect: {exc.strerror}", refused=True) from None
        except (OSError, InvalidHandshake, TimeoutError) as exc:
            raise _AttemptFailed(f"cannot connect: {exc or 'timed out'}") from None
        adopted = False
        try:
            outcome = await self._take_over(connection)
            adopted = True
            return outcome
        finally:
            if not adopted:  # never close it with 1000: that would end the session
                connection.transport.abort()

    async def _take_over(self, connection: ClientConnection) -> protocol.Resumed | None:
        """Read the server's answer to a resume and adopt the connection it opened."""
        try:
            async with asyncio.timeout(self._open_timeout):
                frame = self._parse_unsequenced(await connection.recv())
        except TimeoutError:
            raise _AttemptFailed("the server did not answer the resume") from None
        except ConnectionClosed as exc:
            raise _AttemptFailed(f"closed while resuming ({_lost(exc.rcvd).message})") from None
        if isinstance(frame, protocol.Resumed):
            self._adopt(connection, frame.session_id, frame.model, frame.version)
            self._resumed = frame  # settled once its replay is read: _missing_after_resume
            return frame
        if isinstance(frame, protocol.ErrorReport) and frame.code == RESUME_EXPIRED:
            why = f"{frame.code}: {frame.message}"
            try:  # a new session: its on_chat_start may take a while, as at open
                frame = self._parse_unsequenced(await connection.recv())
            except ConnectionClosed as exc:
                raise _AttemptFailed(
                    f"{why}; then the server closed ({_lost(exc.rcvd).message})", final=True
                ) from None
            if isinstance(frame, protocol.ErrorReport):
                raise _AttemptFailed(
                    f"{why}; a new session could not start ({frame.code}: {frame.message})",
                    final=True,
                )
        else:
            why = "the server started a new session instead"
        if not isinstance(frame, protocol.Ready):
            if isinstance(frame, protocol.ErrorReport):  # e.g. unavailable: try again
                raise _AttemptFailed(f"{frame.code}: {frame.message}")
            raise _AttemptFailed(f"unexpected answer to a resume: {frame}", final=True)
        self._start_over(connection, frame, why)
        return None

    def _parse_unsequenced(self, data: str | bytes) -> protocol.ServerFrame:
        """A frame of the resume exchange (no seq): passed to ``on_frame`` and parsed."""
        if self.on_frame is not None:
            self.on_frame(str(data))
        try:
            return protocol.parse_server_frame(data)
        except ProtocolViolation as exc:
            raise _AttemptFailed(exc.message, final=True) from None

    def _adopt(
        self, connection: ClientConnection, session_id: str, model: str, version: str
    ) -> None:
        self.connection = connection
        self.session_id, self.model, self.version = session_id, model, version

    def _start_over(self, connection: ClientConnection, ready: protocol.Ready, why: str) -> None:
        """The old session is gone: hold the new one, and fail the pending turn (or the
        next call) with ``ConnectionLost`` saying so."""
        old_session = self.session_id
        self._adopt(connection, ready.session_id, ready.model, ready.version)
        self._token, self._window = ready.resume_token, ready.resume_window or 0.0
        self._last_seq, self._turns, self._resumed = 0, 0, None
        self._previous_history, self._history, self._pending = self._history, [], []
        failure = ConnectionLost(
            f"the connection to the server was lost and session {old_session} could not be "
            f"resumed ({why}); the server started a new session ({ready.session_id}) "
            "without the conversation (previous_history holds it)"
        )
        turn, self._current = self._current, None
        if turn is not None:
            turn._lost = failure
        else:
            self._failure = failure
        self._notify(ResumeNotice("new_session", message=why))

    def _give_up(self, close: Close | None, failure: _AttemptFailed, attempts: int) -> None:
        if close is not None:
            message = f"{_lost(close).message}, and it could not be resumed: {failure.reason}"
        elif failure.final:
            message = (
                f"the connection to the server was lost and could not be resumed: {failure.reason}"
            )
        else:
            message = (
                "the connection to the server was lost and could not be resumed within "
                f"{self._window:g} s (last attempt: {failure.reason})"
            )
        self._dead = ConnectionLost(message, close_code=close.code if close else None)
        self._notify(ResumeNotice("failed", attempts=attempts, message=message))

    def _missing_after_resume(self, connection: ClientConnection) -> list[str]:
        """Once a resume's replay has been processed: the frames the server never got, to
        send on ``connection`` (the pending turn's message, which was lost with the dropped
        connection if the server's turn count is behind it; a cancel of a turn still
        running). A refusal of that message would have been in the replay, ending the turn."""
        resumed = self._resumed
        if resumed is None or self._last_seq < resumed.after + resumed.replayed:
            return []
        self._resumed = None
        turn = self._current
        # Sent on this connection (after the resume) or not yet: the server has it or will.
        if turn is None or turn.finished or turn._sent_on in (None, connection):
            return []
        missing = []
        if resumed.turn < turn.number:
            missing.append(turn._frame)
            turn._sent_on = connection
        if turn._cancel_requested and (resumed.running or missing):
            missing.append(protocol.encode_cancel())
        return missing

    def _notify(self, notice: ResumeNotice) -> None:
        if self.on_resume is not None:
            self.on_resume(notice)


@asynccontextmanager
async def connect(
    url: str = DEFAULT_URL,
    model: str = "echo",
    *,
    api_key: str | None = None,
    headers: HeadersLike | None = None,
    open_timeout: float = 10.0,
    on_frame: Callable[[str], None] | None = None,
    resumable: bool = True,
    on_resume: Callable[[ResumeNotice], None] | None = None,
) -> AsyncIterator[ChatClient]:
    """A chat session for the ``async with`` block (see ``ChatClient.open``); closed when
    the block ends."""
    client = await ChatClient.open(
        url,
        model,
        api_key=api_key,
        headers=headers,
        open_timeout=open_timeout,
        on_frame=on_frame,
        resumable=resumable,
        on_resume=on_resume,
    )
    try:
        yield client
    finally:
        await client.close()


def _refusal(exc: InvalidStatus) -> ChatRefused:
    response = exc.response
    code, message = "http_error", f"the server answered HTTP {response.status_code}"
    try:
        body: Any = json.loads(response.body or b"")
        code, message = str(body["error"]["code"]), str(body["error"]["message"])
    except (ValueError, KeyError, TypeError):
        pass
    retry = response.headers.get("Retry-After")
    return ChatRefused(
        f"{message} (HTTP {response.status_code})",
        status=response.status_code,
        code=code,
        retry_after=int(retry) if retry and retry.isdigit() else None,
    )


def _checked(params: object) -> dict[str, Any] | None:
    """``params`` if it can be a turn's parameters: a dict (a JSON object) or None. Checked
    here, so that a mistake is a ``TypeError`` at the call, not a ``bad_request`` later."""
    if params is not None and not isinstance(params, dict):
        raise TypeError(f"params must be a dict (a JSON object), not {type(params).__name__}")
    return params


def _lost(close: Close | None) -> ConnectionLost:
    """``ConnectionLost`` for a connection that ended with ``close`` from the server (None:
    it dropped without one)."""
    if close is None:
        return ConnectionLost("the connection to the server was lost")
    why = f": {close.reason}" if close.reason else ""
    return ConnectionLost(
        f"the server closed the session (code {close.code}{why})", close_code=close.code
    )
