"""The session store's interface: what resuming asks of wherever sessions live.

Every call is async, so that a networked store (Redis) fits without changing its callers:
sessions are found by the digest of their resume token, a session's missed frames are
read by seq, and taking a session over is a compare-and-set on its owner, so two nodes
(or two racing resumes) never both hold one. Entries expire: a store keeps a session no
longer than its resume window past its last connection.
"""

from __future__ import annotations

from typing import Protocol

from ws_server.session.live import LiveSession


class SessionStore(Protocol):
    """Sessions by resume token, and their replay buffers."""

    node: str  # this process's name as an owner of sessions

    async def add(self, session: LiveSession) -> None:
        """Keep ``session`` (owned by this node) findable by its token."""

    async def find(self, token_digest: str) -> LiveSession | None:
        """The live session of that token, if it still exists."""

    async def take_over(self, session: LiveSession, expected_owner: str) -> bool:
        """Make this node the session's owner if ``expected_owner`` still is (atomic)."""

    async def frames_after(self, session: LiveSession, after: int) -> list[bytes] | None:
        """The session's frames after seq ``after``, exactly as sent; None if some are gone."""

    async def remove(self, session: LiveSession) -> None:
        """Forget an ended session (its token no longer resumes anything)."""

    def local(self) -> list[LiveSession]:
        """The sessions this node holds (to end at shutdown)."""
