"""The embedded session store: this process's memory, for one node (no service to run).

A session's replay buffer is its outbox's, read in place; a token maps to the live
session itself. Nothing outlives the process, which is what one node promises: a resume
through another process or after a restart gets ``resume_expired``.
"""

from __future__ import annotations

from ws_server.session.live import LiveSession
from ws_server.store.base import SessionRecord


class MemoryStore:
    """Sessions by token digest, in a dict."""

    available = True
    status = "memory"

    def __init__(self, node: str = "local") -> None:
        self.node = node
        self._by_token: dict[str, LiveSession] = {}
        self._sessions: set[LiveSession] = set()

    async def add(self, session: LiveSession) -> bool:
        self._sessions.add(session)
        if session.token_digest is not None:
            self._by_token[session.token_digest] = session
        return True

    async def find(self, token_digest: str) -> LiveSession | SessionRecord | None:
        session = self._by_token.get(token_digest)
        return session if session is not None and not session.ended else None

    async def frames_after(
        self, session: LiveSession | SessionRecord, after: int
    ) -> list[bytes] | None:
        if isinstance(session, SessionRecord):
            return None  # one node: nothing is held elsewhere
        return session.conversation.outbox.frames_after(after)

    async def remove(self, session: LiveSession) -> None:
        self._sessions.discard(session)
        if session.token_digest is not None:
            self._by_token.pop(session.token_digest, None)

    def local(self) -> list[LiveSession]:
        return list(self._sessions)
