"""One session's conversation: the messages the model sees, kept within the history limits.

Each message's UTF-8 size is measured once, when it is added, and a running total is kept,
so a turn costs the same however long the history is (measuring the whole history every
turn was most of a long session's per-turn time). The messages live in one list, so the
model's copy is a single C-level copy of references rather than a rebuilt list. The oldest
messages go first; a leading ``system`` message (the model's instructions) stays while the
newest one fits.
"""

from __future__ import annotations

import json

from ws_server.sdk import Message


def message_bytes(message: Message) -> int:
    """What the byte limit counts of a message: its content's UTF-8 size, and its parts'
    (an image or a file) as JSON when it has them."""
    size = len(message["content"].encode())
    parts = message.get("parts")
    if parts is not None:
        size += len(json.dumps(parts, ensure_ascii=False).encode())
    return size


class History:
    """The messages of one session, oldest first, within ``max_messages`` and ``max_bytes``."""

    __slots__ = ("_bytes", "_messages", "_sizes", "_system", "max_bytes", "max_messages")

    def __init__(self, max_messages: int, max_bytes: int) -> None:
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self._messages: list[Message] = []
        self._sizes: list[int] = []  # one per message, in the same order (a list: an idle
        # session's empty list is a tenth of an empty deque)
        self._system = False  # whether _messages[0] is a kept leading system message
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._messages)

    @property
    def bytes(self) -> int:
        return self._bytes

    def messages(self) -> list[Message]:
        """The history as the model gets it: its own list (the model may change it)."""
        return self._messages.copy()

    def append(self, message: Message) -> None:
        """Add a message, then drop the oldest until both limits hold again."""
        size = message_bytes(message)
        self._messages.append(message)
        self._sizes.append(size)
        self._bytes += size
        self._trim()

    def replace(self, messages: list[Message]) -> None:
        """Start over from ``messages`` (a client that keeps its own history)."""
        self._messages = list(messages)
        self._sizes = [message_bytes(m) for m in self._messages]
        self._bytes = sum(self._sizes)
        self._system = bool(self._messages) and self._messages[0]["role"] == "system"
        self._trim()

    def _trim(self) -> None:
        first = 1 if self._system else 0  # the oldest message that may go
        while len(self._messages) - first > 1 and (
            len(self._messages) > self.max_messages or self._bytes > self.max_bytes
        ):
            del self._messages[first]
            size = self._sizes[first]
            del self._sizes[first]
            self._bytes -= size
        if self._system and (
            len(self._messages) > self.max_messages or self._bytes > self.max_bytes
        ):
            del self._messages[0]  # the newest message wins over the instructions
            self._bytes -= self._sizes.pop(0)
            self._system = False
