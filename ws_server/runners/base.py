"""The contract between a chat session and wherever its model runs."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

from ws_server.sdk import EventSink, Message


class ModelSession(Protocol):
    """One conversation's model instance, wherever it lives.

    ``start`` and ``end`` wrap ``on_chat_start`` / ``on_chat_end``; ``stream`` runs one
    turn. Closing the iterator ``stream`` returned (``aclose``) must close the model's
    generator so its ``finally`` blocks run: that is how cancel and timeout reach it.
    A session that moves between nodes carries its context along: ``start`` restores a
    snapshot after ``on_chat_start``, and a turn streamed with ``snapshot=True`` leaves
    one for ``snapshot()`` to return once it has ended. ``params`` is the client's for
    that turn: the model sees it as ``self.params`` (``{}`` for None). What the model
    emits during the turn (``self.emit``, ``status``, ``step``) is handed to ``events`` on
    the event loop, in order with the chunks yielded.
    """

    async def start(self, context: dict[str, Any] | None = None) -> None: ...

    def stream(
        self,
        messages: list[Message],
        snapshot: bool = False,
        params: dict[str, Any] | None = None,
        events: EventSink | None = None,
    ) -> AsyncIterator[str]: ...

    def snapshot(self) -> dict[str, Any]: ...

    async def end(self) -> None: ...


class Runner(Protocol):
    """Runs one model version; makes a ``ModelSession`` per chat session."""

    mode: str
    # Where an isolated model's worker runs: "local" or "ray" (None: shared mode).
    placement: str | None
    # The listing's ``sandbox``: which protections hold for the model (None: shared mode,
    # where the model runs in the server's process, with none).
    sandbox: dict[str, Any] | None

    def open_session(self) -> ModelSession: ...

    async def close(self) -> None: ...
