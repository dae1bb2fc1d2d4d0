"""One session's conversation: the messages the model sees, kept within the history limits.

Each message's UTF-8 size is measured once, when it is added, and the running total is
kept, so a turn costs the same whatever the history's length (measuring the whole history
every turn was most of a long session's per-turn time). The oldest messages go first; a
leading ``system`` message (the model's instructions) stays while the newest one fits.
"""

from __future__ import annotations

from collections import deque

from ws_server.sdk import Message


def message_bytes(message: Message) -> int:
    """What the byte limit counts of a message: its content's UTF-8 size."""
    return len(message["content"].encode())


class History:
    """The messages of one session, oldest first, within ``max_messages`` and ``max_bytes``."""

    def __init__(self, max_messages: int, max_bytes: int) -> None:
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self._system: tuple[Message, int] | None = None  # a leading system message, kept
        self._rest: deque[tuple[Message, int]] = deque()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._rest) + (self._system is not None)

    @property
    def bytes(self) -> int:
        return self._bytes

    def messages(self) -> list[Message]:
        """The history as the model gets it: a new list (the model may change it)."""
        head = [self._system[0]] if self._system is not None else []
        return head + [message for message, _ in self._rest]

    def append(self, message: Message) -> None:
        """Add a message, then drop the oldest until both limits hold again."""
        self._rest.append((message, size := message_bytes(message)))
        self._bytes += size
        self._trim()

    def replace(self, messages: list[Message]) -> None:
        """Start over from ``messages`` (a client that keeps its own history)."""
        self._system, self._rest, self._bytes = None, deque(), 0
        if messages and messages[0]["role"] == "system":
            self._system = (messages[0], message_bytes(messages[0]))
            self._bytes = self._system[1]
            messages = messages[1:]
        for message in messages:
            self._rest.append((message, size := message_bytes(message)))
            self._bytes += size
        self._trim()

    def _trim(self) -> None:
        while len(self._rest) > 1 and (
            len(self) > self.max_messages or self._bytes > self.max_bytes
        ):
            _, size = self._rest.popleft()
            self._bytes -= size
        if self._system is not None and (
            len(self) > self.max_messages or self._bytes > self.max_bytes
        ):
            self._bytes -= self._system[1]  # the newest message wins over the instructions
            self._system = None
