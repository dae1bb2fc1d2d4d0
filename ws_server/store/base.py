"""The session store's interface: what resuming asks of wherever sessions live.

Every call that may reach a network is async, so that a networked store (Redis) fits
without changing its callers. Sessions are found by the digest of their resume token:
either here (a ``LiveSession`` this process holds) or, with several nodes, as a
``SessionRecord`` held by another node (which the server relays to, or takes over when
that node is gone). Entries expire: a store keeps a session no longer than its resume
window past its last connection.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from ws_server.sdk import Message
from ws_server.session.live import LiveSession


@dataclass(frozen=True)
class SessionRecord:
    """A session as the store has it, held by ``owner`` (another node, or none)."""

    token_digest: str
    session_id: str
    model: str
    revision: str
    version: str  # config.yaml's version (what ``resumed`` shows)
    key_digest: str
    owner: str  # the node holding its model instance; "" once released by a drain
    epoch: int  # raised by each takeover: a stale owner's writes are refused
    seq: int  # the last frame's seq in the store
    turn: int
    running: bool
    turn_seq: int  # the seq the running (or last) turn's frames follow
    window: float
    # How many client frames its holder took from the relay named here ("<id>:<count>"):
    # a node taking the session over from that relay hands it the ones after them.
    relayed: str = ""

    def relayed_from(self, relay_id: str) -> int:
        """How many of relay ``relay_id``'s frames the holder took (0 if none, or another
        relay's)."""
        name, _, count = self.relayed.partition(":")
        return int(count) if name == relay_id and count.isdigit() else 0


@dataclass(frozen=True)
class TakenOver:
    """What a node needs to carry a session on after taking it over."""

    epoch: int
    seq: int  # after the ``interrupted`` and ``done`` appended for a running turn
    turn: int
    history: list[Message]  # the partial reply of an interrupted turn included
    context: dict[str, Any]


class SessionStore(Protocol):
    """Sessions by resume token, and their replay buffers."""

    node: str  # this process's name as an owner of sessions

    @property
    def available(self) -> bool:
        """Whether a new session can be made resumable now (False: its store is down)."""

    @property
    def status(self) -> str:
        """What ``/healthz`` says of the store: ``memory``, ``redis`` or ``unavailable``."""

    async def add(self, session: LiveSession) -> bool:
        """Keep ``session`` (held by this node) findable by its token; False when it
        cannot be resumable after all (its store failed it): no token for its client."""

    async def find(self, token_digest: str) -> LiveSession | SessionRecord | None:
        """The session of that token: held here, held elsewhere, or gone."""

    async def frames_after(
        self, session: LiveSession | SessionRecord, after: int
    ) -> list[bytes] | None:
        """The session's frames after seq ``after``, exactly as sent; None if some are gone."""

    async def remove(self, session: LiveSession) -> None:
        """Forget an ended session (its token no longer resumes anything)."""

    def local(self) -> list[LiveSession]:
        """The sessions this node holds (to end at shutdown)."""
