"""Python client for protocol v1: what bot frontends and ``anything-agent chat`` talk through.

    async with connect("ws://127.0.0.1:8000", "echo") as chat:
        turn = await chat.send("hello")
        async for chunk in turn:
            print(chunk, end="", flush=True)
        print(chat.history)

One ``ChatClient`` is one session on the server. Turns run one at a time, as on the
server; ``cancel()`` may be called from another task while a turn is being iterated. The
client mirrors the server's history rule (the user message when its turn starts, the
assistant's reply, partial ones included, when it ends), so ``history`` is what the model
sees next.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, Final
from urllib.parse import quote, urlsplit, urlunsplit

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.datastructures import Headers, HeadersLike
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

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


def chat_url(base_url: str, model: str) -> str:
    """The chat endpoint of ``model`` on the server at ``base_url`` (``ws://``, ``wss://``,
    or ``http(s)://``, which is mapped to its WebSocket scheme)."""
    parts = urlsplit(base_url if "://" in base_url else f"ws://{base_url}")
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss"):
        raise ValueError(f"not a server URL: {base_url!r} (expected ws://HOST:PORT)")
    path = f"{parts.path.rstrip('/')}/v1/chat/{quote(model, safe='')}"
    return urlunsplit((scheme, parts.netloc, path, "", ""))


class Turn:
    """One turn: iterate it for the chunks as they arrive.

    Iteration ends with the ``done`` frame; ``reason`` then says why. A turn that ended
    with ``error`` or ``timeout`` raises ``TurnFailed`` once its frames are all read, so the
    session stays usable for the next turn.
    """

    def __init__(self, client: ChatClient, number: int) -> None:
        self._client = client
        self.number = number
        self.reason: protocol.DoneReason | None = None
        self.chunks: list[str] = []
        self._error: protocol.ErrorReport | None = None

    @property
    def text(self) -> str:
        """Everything received so far."""
        return "".join(self.chunks)

    @property
    def finished(self) -> bool:
        return self.reason is not None

    def __aiter__(self) -> AsyncIterator[str]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[str]:
        while self.reason is None:
            frame = await self._client._receive()
            if isinstance(frame, protocol.Chunk) and frame.turn == self.number:
                self.chunks.append(frame.content)
                yield frame.content
            elif isinstance(frame, protocol.Done) and frame.turn == self.number:
                self._finish(frame.reason)
            elif isinstance(frame, protocol.ErrorReport) and frame.turn == self.number:
                self._error = frame
            elif isinstance(frame, protocol.ErrorReport) and frame.turn is None:
                if not self.chunks and self._error is None:  # the message was refused
                    self._client._end_turn(self, started=False)
                    raise ServerError(frame.message, code=frame.code)
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
        if self.reason is None:
            await self._client._send(protocol.encode_cancel())


class ChatClient:
    """One chat session with one model; made by ``connect`` (or ``ChatClient.open``)."""

    def __init__(
        self,
        connection: ClientConnection,
        ready: protocol.Ready,
        on_frame: Callable[[str], None] | None = None,
    ) -> None:
        self.connection = connection
        self.on_frame = on_frame
        self.session_id = ready.session_id
        self.model = ready.model
        self.version = ready.version
        self._history: list[Message] = []
        self._pending: list[Message] = []
        self._turns = 0
        self._current: Turn | None = None

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
    ) -> ChatClient:
        """Connect to ``model`` on the server at ``url`` and wait for the session to be
        ready (``on_chat_start`` done). Raises ``ChatRefused`` if the server says no.

        ``api_key`` is sent as ``Authorization: Bearer`` (servers started with API keys
        require one). ``on_frame`` is called with every frame as received (raw JSON
        text), for clients that log or relay them."""
        endpoint = chat_url(url, model)
        if api_key:
            headers = Headers(headers or [])
            headers["Authorization"] = f"Bearer {api_key}"
        try:
            connection = await ws_connect(
                endpoint,
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
        return cls(connection, frame, on_frame)

    # ------------------------------------------------------------------ turns
    @property
    def history(self) -> list[Message]:
        """The conversation as the model will see it next (a copy)."""
        return [dict(m) for m in self._history]

    @property
    def running(self) -> Turn | None:
        """The turn in progress, if any."""
        return self._current

    async def send(self, content: str) -> Turn:
        """Send a user message; returns the turn to iterate for the reply."""
        return await self._start(
            protocol.encode_message(content), [{"role": "user", "content": content}], replace=False
        )

    async def replace_history(self, messages: list[Message]) -> Turn:
        """Replace the session's history (for clients that keep their own) and run a turn."""
        copied: list[Message] = [{"role": m["role"], "content": m["content"]} for m in messages]
        return await self._start(protocol.encode_messages(copied), copied, replace=True)

    async def ask(self, content: str) -> str:
        """Send a message and return the whole reply (``TurnFailed`` if the turn failed)."""
        return await (await self.send(content)).reply()

    async def cancel(self) -> None:
        """Cancel the running turn, if any (safe to call from another task)."""
        if self._current is not None:
            await self._current.cancel()

    async def close(self) -> None:
        """End the session (the model's ``on_chat_end`` runs on the server)."""
        await self.connection.close()

    async def _start(self, frame: str, messages: list[Message], *, replace: bool) -> Turn:
        if self._current is not None:
            raise ClientError(
                f"turn {self._current.number} is still running: read it to the end "
                "or cancel it before sending another message"
            )
        self._pending = messages if replace else [*self._history, *messages]
        turn = Turn(self, self._turns + 1)
        self._current = turn
        try:
            await self._send(frame)
        except BaseException:
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
    async def _send(self, frame: str) -> None:
        try:
            await self.connection.send(frame)
        except ConnectionClosed as exc:
            raise _lost(exc) from None

    async def _receive(self) -> protocol.ServerFrame:
        try:
            data = await self.connection.recv()
        except ConnectionClosed as exc:
            self._current = None
            raise _lost(exc) from None
        if self.on_frame is not None:
            self.on_frame(str(data))
        return protocol.parse_server_frame(data)


@asynccontextmanager
async def connect(
    url: str = DEFAULT_URL,
    model: str = "echo",
    *,
    api_key: str | None = None,
    headers: HeadersLike | None = None,
    open_timeout: float = 10.0,
    on_frame: Callable[[str], None] | None = None,
) -> AsyncIterator[ChatClient]:
    """A chat session for the ``async with`` block (see ``ChatClient.open``); closed when
    the block ends."""
    client = await ChatClient.open(
        url, model, api_key=api_key, headers=headers, open_timeout=open_timeout, on_frame=on_frame
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


def _lost(exc: ConnectionClosed) -> ConnectionLost:
    close = exc.rcvd
    if close is None:
        return ConnectionLost("the connection to the server was lost")
    why = f": {close.reason}" if close.reason else ""
    return ConnectionLost(
        f"the server closed the session (code {close.code}{why})", close_code=close.code
    )
