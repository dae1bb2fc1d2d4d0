"""A live session: a conversation that may outlive its connection.

It holds what resuming needs beside the conversation (the resume token's digest, the
digest of the API key it was opened with, the resume window) and which connection, if
any, is attached. When a resumable session's connection goes any way but a normal close
(1000), the session waits ``resume_window`` seconds for a resume, its turn running on into
the outbox's bounded buffer; then it ends. It ends exactly once, whatever ends it, and
only then is its model version released and ``on_chat_end`` run.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
from collections.abc import Callable
from typing import Protocol

from ws_server import metrics
from ws_server.session.conversation import DISCONNECTED, Conversation

TOKEN_BYTES = 24  # 32 URL-safe characters


def digest(secret: str) -> str:
    """What is kept of a token or a key: its SHA-256, never the value."""
    return hashlib.sha256(secret.encode()).hexdigest()


def new_token() -> str:
    """A resume token: opaque, ``[A-Za-z0-9_-]``, not the session id."""
    return secrets.token_urlsafe(TOKEN_BYTES)


class Attachment(Protocol):
    """The connection side a live session knows of: it can be told to go away."""

    async def replaced(self) -> None:
        """Another connection resumed the session: close with 4001."""


class LiveSession:
    """One session in this process, attached to a connection or waiting for one."""

    __slots__ = (
        "_ending",
        "_expiry",
        "_on_end",
        "_waiting",
        "attachment",
        "close_code",
        "conversation",
        "key_digest",
        "token_digest",
        "window",
    )

    def __init__(
        self,
        conversation: Conversation,
        *,
        token_digest: str | None,
        key_digest: str,
        window: float,
        on_end: Callable[[LiveSession], None],
    ) -> None:
        self.conversation = conversation
        self.token_digest = token_digest
        self.key_digest = key_digest
        self.window = window
        self.attachment: Attachment | None = None
        self.close_code: int | None = None  # how its last connection closed
        self._expiry: asyncio.TimerHandle | None = None
        self._ending: asyncio.Task[None] | None = None
        self._on_end = on_end
        self._waiting = False  # detached, within its window (counted in the gauge)

    @property
    def resumable(self) -> bool:
        return self.token_digest is not None and self.window > 0

    @property
    def ended(self) -> bool:
        return self._ending is not None

    @property
    def detached(self) -> bool:
        return self.attachment is None and not self.ended

    def attach(self, attachment: Attachment) -> Attachment | None:
        """``attachment`` takes the session over; the one it replaces (still open, if
        any) is returned for the caller to close."""
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        self._stop_waiting()
        previous, self.attachment = self.attachment, attachment
        return previous

    def detach(self, attachment: Attachment, normal_close: bool) -> asyncio.Task[None] | None:
        """``attachment``'s connection is gone. A resumable session whose client did not
        close normally waits for a resume; any other ends now (the task ending it)."""
        if attachment is not self.attachment:
            return None  # replaced meanwhile: the session is someone else's now
        self.attachment = None
        self.conversation.outbox.detach()
        if self.resumable and not normal_close and not self.conversation.closing:
            if not self.ended:
                self._waiting = True
                metrics.SESSIONS_DETACHED.inc()
                loop = asyncio.get_running_loop()
                self._expiry = loop.call_later(self.window, self._expired)
                return None
        return self.end(DISCONNECTED)

    def _stop_waiting(self) -> None:
        if self._waiting:
            self._waiting = False
            metrics.SESSIONS_DETACHED.dec()

    def _expired(self) -> None:
        self._expiry = None
        if self.attachment is None:
            self.conversation.log(logging.INFO, "not resumed within %g s; ending", self.window)
            self.end(DISCONNECTED)

    def end(self, reason: str = DISCONNECTED) -> asyncio.Task[None]:
        """End the session (once): stop its turn, run ``on_chat_end``, release it."""
        if self._ending is None:
            if self._expiry is not None:
                self._expiry.cancel()
                self._expiry = None
            self._stop_waiting()
            self._ending = asyncio.get_running_loop().create_task(self._end(reason))
        return self._ending

    async def _end(self, reason: str) -> None:
        try:
            await self.conversation.end(reason)
        finally:
            self._on_end(self)

    def __repr__(self) -> str:
        state = "ended" if self.ended else ("detached" if self.detached else "attached")
        return f"<LiveSession {self.conversation.id} {state}>"
