"""The holder's side of a relayed session: its client is connected to another node.

That node forwards the client's frames through this node's inbox; the session's frames
reach the client through Redis (its journal), so the outbox's sink here only holds the
model back while the journal is far behind. The session stays here, with its model
instance and its one ``on_chat_end``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Final

from ws_server import protocol
from ws_server.exceptions import AnythingAgentError
from ws_server.http.limits import FrameRate
from ws_server.session.connection import handle_frame
from ws_server.session.live import LiveSession

# Unwritten bytes of frames past which a relayed session's model waits for the writer:
# its client reads through Redis, so that is where backpressure comes from.
RELAY_BACKLOG: Final = 256 * 1024

if TYPE_CHECKING:
    from ws_server.store.redis import RedisStore
    from ws_server.store.redis_journal import RedisJournal


class RemoteSink:
    """The outbox's sink while the client reads through another node."""

    __slots__ = ("journal", "store")

    def __init__(self, store: RedisStore, journal: RedisJournal) -> None:
        self.store = store
        self.journal = journal

    async def write(self, data: bytes) -> None:
        await self.store.writer.room(self.journal, RELAY_BACKLOG)

    async def write_now(self, data: bytes) -> None:
        await self.store.writer.room(self.journal, RELAY_BACKLOG)

    def post(self, data: bytes) -> None:
        """The journal has it already (the outbox's mirror): the relay reads it there."""


class RemoteAttachment:
    """A session's connection on another node, as seen from the node holding it."""

    def __init__(
        self,
        store: RedisStore,
        session: LiveSession,
        journal: RedisJournal,
        relay_node: str,
        relay_id: str,
    ) -> None:
        self.store = store
        self.session = session
        self.journal = journal
        self.relay_node = relay_node
        self.relay_id = relay_id
        self._rate = FrameRate(store.frames_per_minute)
        self._frames: asyncio.Queue[str | bytes] = asyncio.Queue()
        self._reader = asyncio.get_running_loop().create_task(self._read())
        self._taken = 0  # client frames taken from this relay
        # The newest connection of a session wins, here as on one node.
        previous = session.attach(self)
        session.conversation.outbox.attach(RemoteSink(store, journal))
        self.attached = True
        session.conversation.log(logging.INFO, "resumed through node %s (relayed)", relay_node)
        if previous is not None:
            _keep(asyncio.ensure_future(previous.replaced()))

    def reattach(self) -> bool:
        """Its relaying node was thought gone (a heartbeat missed) and sends again: be the
        session's connection again, unless the session ended or another connection has
        it now (False)."""
        session = self.session
        if self.attached:
            return True
        if session.ended or session.attachment is not None:
            return False
        session.attach(self)
        session.conversation.outbox.attach(RemoteSink(self.store, self.journal))
        self.attached = True
        return True

    def feed(self, data: bytes, binary: bool = False) -> None:
        """A frame the client sent (in order)."""
        self._frames.put_nowait(data if binary else data.decode())

    async def _read(self) -> None:
        while True:
            data = await self._frames.get()
            conversation = self.session.conversation
            if conversation.closing and not _is_cancel(data):
                # This node is draining: what the client sends now is left untaken, for
                # the node that takes the session over (``Relay.unseen``) to run.
                return
            await handle_frame(conversation, self._rate, data)
            self._taken += 1
            # Written with the frame's effects (the same batch): a node taking the session
            # over knows which of the relay's frames this node took, and which it did not.
            self.journal.relayed(self.relay_id, self._taken)

    async def replaced(self) -> None:
        """Another connection resumed the session: the relaying node closes with 4001."""
        self._reader.cancel()
        self.attached = False
        self.store.remotes.pop(self.relay_id, None)
        await self.store.send(self.relay_node, {"op": "replaced", "r": self.relay_id})

    def gone(self, normal_close: bool) -> None:
        """The client's connection on the relaying node closed (or that node's heartbeat
        lapsed: if it was a blip, ``attach`` takes the session back on its next frame)."""
        if not self.attached:
            return
        self.attached = False
        self.session.close_code = 1000 if normal_close else 1006
        self.session.detach(self, normal_close=normal_close)

    def close(self) -> None:
        self._reader.cancel()


def _is_cancel(data: str | bytes) -> bool:
    try:
        return isinstance(protocol.parse_client_frame(data), protocol.CancelTurn)
    except AnythingAgentError:
        return False


_background: set[asyncio.Task[None]] = set()


def _keep(task: asyncio.Task[None]) -> None:
    _background.add(task)
    task.add_done_callback(_background.discard)
