"""The embedded session store: this process's memory, for one node (no service to run).

A session's replay buffer is its outbox's, read in place; a token maps to the live
session itself. Nothing outlives the process, which is what one node promises: a resume
through another process or after a restart gets ``resume_expired``.
"""

from __future__ import annotations

from ws_server.session.live import LiveSession


class MemoryStore:
    """Sessions by token digest, in a dict."""

    def __init__(self, node: str = "local") -> None:
        self.node = node
        self._by_token: dict[str, LiveSession] = {}
        self._sessions: set[LiveSession] = set()

    async def add(self, session: LiveSession) -> None:
        self._sessions.add(session)
        if session.token_digest is not None:
            self._by_token[session.token_digest] = session

    async def find(self, token_digest: str) -> LiveSession | None:
        session = self._by_token.get(token_digest)
        return session if session is not None and not session.ended else None

    async def take_over(self, session: LiveSession, expected_owner: str) -> bool:
        # One node: every session here is this node's, and stays so.
        return expected_owner == self.node and session in self._sessions

    async def frames_after(self, session: LiveSession, after: int) -> list[bytes] | None:
        return session.conversation.outbox.frames_after(after)

    async def remove(self, session: LiveSession) -> None:
        self._sessions.discard(session)
        if session.token_digest is not None:
            self._by_token.pop(session.token_digest, None)

    def local(self) -> list[LiveSession]:
        return list(self._sessions)
