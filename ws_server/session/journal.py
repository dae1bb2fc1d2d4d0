"""What a session reports as it changes, for a store that lets another node carry it on.

The conversation and its outbox call these as things happen (never awaiting: a chunk
must not wait for a network store); the store writes them behind, in batches. A session
without a journal (one node, or a client that cannot resume) pays nothing.
"""

from __future__ import annotations

from typing import Any, Protocol

from ws_server.sdk import Message


class Journal(Protocol):
    """The write-behind record of one session."""

    def frame(self, seq: int, data: bytes) -> None:
        """A frame was stamped ``seq``: these exact bytes replay on any node."""

    def history_appended(self, message: Message) -> None:
        """A message joined the history."""

    def history_replaced(self, messages: list[Message]) -> None:
        """The client replaced the history (a ``messages`` frame)."""

    def turn_started(self, turn: int, seq: int) -> None:
        """Turn ``turn`` runs; its frames follow seq ``seq``."""

    def turn_ended(self, turn: int, context: dict[str, Any]) -> None:
        """Turn ``turn`` is over; ``context`` is the model's context, as far as it moves."""
