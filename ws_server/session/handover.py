"""Resuming, on this node, a session another node holds (several nodes, Redis).

While the holder lives, the connection is relayed to it (``relay.py``). Once it is gone
(its heartbeat lapsed) or released the session (drained), this node takes the session
over: a compare-and-set on its epoch, ``interrupted`` and ``done`` ``error`` for a turn
that was running there, then a new model instance with the history and context, on the
pinned revision where this node has it (else the serving one; ``resumed.version`` says).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, Final

from websockets.exceptions import ConnectionClosed

from ws_server import metrics
from ws_server.exceptions import AnythingAgentError, ResumeFailed
from ws_server.registry.catalog import ModelVersion, Registry
from ws_server.session.connection import ChatConnection
from ws_server.session.conversation import DISCONNECTED
from ws_server.session.live import LiveSession
from ws_server.session.relay import Relay
from ws_server.store.base import SessionRecord
from ws_server.store.redis import RedisStore

log = logging.getLogger("anything_agent.session")

ATTEMPTS: Final = 3  # reads of a session that keeps changing under a takeover
CATCH_UP: Final = 1.0  # seconds (past --node-ttl) a resume waits for the client's last frame

# Makes a session held here: (version, token digest, key digest, window, id, seq).
SessionFactory = Callable[[ModelVersion, str, str, float, str, int], LiveSession]


class Handover:
    """Relays to, or takes over, sessions held by other nodes."""

    def __init__(self, store: RedisStore, registry: Registry, new_session: SessionFactory) -> None:
        self.store = store
        self.registry = registry
        self.new_session = new_session

    async def resume(self, adapter: ChatConnection, record: SessionRecord, after: int) -> None:
        """Carry the client of ``record`` on from seq ``after``, on this connection, until
        it closes; ``ResumeFailed`` before anything was sent when that cannot be."""
        announced = False
        relay: Relay | None = None
        for _ in range(ATTEMPTS):
            state = await self.store.owner_state(record)
            if state == "held":
                record, state = await self._caught_up(record, after)
            if state == "held":
                frames = await self.store.frames_after(record, after)
                if frames is None:
                    raise ResumeFailed(f"frames after {after} are no longer buffered")
                relay = Relay(self.store, adapter, record)
                outcome = await relay.run(after, frames)
                if outcome != "take_over":
                    return
                announced, after = True, relay.last
            elif state != "free":
                raise ResumeFailed("the session ended on its node")
            found = await self.store.find(record.token_digest)
            if not isinstance(found, SessionRecord):
                break
            record = found
            session = await self._take_over(record, after)
            if session is not None:
                # Frames the client sent through the relay that its lost holder never
                # took: this node takes them, in order, once the session is carried on.
                unseen = relay.unseen(record.relayed_from(relay.id)) if relay else []
                await self._carry_on(adapter, session, after, announced, unseen)
                return
        if announced:  # the client has its resumed frame: it resumes again
            await _close(adapter, 1012, "the session could not be carried on; resume again")
            return
        raise ResumeFailed("the session could not be taken over from its node")

    async def _caught_up(self, record: SessionRecord, after: int) -> tuple[SessionRecord, str]:
        """The record once the store has every frame up to ``after``, and its holder's
        state. Frames reach the client before Redis (written behind), so a client that
        resumes at once may be a little ahead: its holder writes them within moments,
        or, if it died with them unwritten, its heartbeat lapses and it is ``free``."""
        deadline = time.monotonic() + self.store.node_ttl + CATCH_UP
        state = "held"
        while record.seq < after:
            if time.monotonic() > deadline:
                raise ResumeFailed(f"seq {after} was never sent in this session")
            await asyncio.sleep(0.02)
            found = await self.store.find(record.token_digest)
            if not isinstance(found, SessionRecord):
                raise ResumeFailed("the session ended on its node")
            record = found
            state = await self.store.owner_state(record)
            if state != "held":
                break
        return record, state

    async def _take_over(
        self, record: SessionRecord, after: int
    ) -> tuple[LiveSession, dict[str, Any]] | None:
        try:
            version = self.registry.acquire_revision(record.model, record.revision)
        except AnythingAgentError as exc:
            raise ResumeFailed(f"model {record.model!r} cannot run here: {exc.message}") from None
        if after > record.seq + self.store.stream_length:
            self.registry.release(version)
            raise ResumeFailed(f"seq {after} was never sent in this session")
        # Frames its lost node sent but never wrote: the client has them, the store
        # doesn't. The session goes on after the client's last.
        taken = await self.store.take_over(record, max(after, record.seq))
        if taken is None:
            self.registry.release(version)
            return None
        session = self.new_session(
            version,
            record.token_digest,
            record.key_digest,
            record.window,
            record.session_id,
            taken.seq,
        )
        session.conversation.restore(taken.turn, taken.history)
        self.store.adopt(session, taken.epoch)
        metrics.SESSIONS.labels(model=version.name).inc()
        metrics.RESUMES.labels(outcome="taken_over").inc()
        session.conversation.log(
            logging.INFO,
            "taken over from node %s (epoch %d)",
            record.owner or "(released)",
            taken.epoch,
        )
        return session, taken.context

    async def _carry_on(
        self,
        adapter: ChatConnection,
        taken: tuple[LiveSession, dict[str, Any]],
        after: int,
        announced: bool,
        unseen: list[str | bytes],
    ) -> None:
        session, context = taken
        if not await adapter.restart(session, context):
            if not session.ended:  # the client left while the model started: the session
                await self.store.release(session)  # waits in Redis for its next resume
                await session.end(DISCONNECTED)
            return
        frames = await self.store.frames_after(session, after)
        if frames is None:  # trimmed while the takeover ran: the client starts over
            await _close(adapter, 1011, "frames were lost on the way")
            await session.end(DISCONNECTED)
            return
        await adapter.resume(session, after, frames, announce=not announced)
        for data in unseen:
            await adapter.handle(session, data)
        await adapter.serve(session)


async def _close(adapter: ChatConnection, code: int, reason: str) -> None:
    try:
        await adapter.connection.close(code, reason)
    except ConnectionClosed:
        pass
