"""Closes chat connections whose client has said nothing for ``--idle-timeout`` seconds.

One timer for the whole server, looking over the connections every ``period`` (a tenth of
the limit, between 50 ms and 10 s), rather than a timer per connection: idle connections
are the many, and a uvloop timer handle took about 480 bytes of each. A connection is idle
when no turn runs and neither its last frame nor the end of its last turn is more recent
than the limit (a long reply being read is not idleness).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from ws_server.session.connection import ChatConnection
    from ws_server.session.live import LiveSession

SHORTEST_PERIOD: Final = 0.05
LONGEST_PERIOD: Final = 10.0


class IdleWatch:
    """The chat connections of one server, checked for idleness on one timer."""

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self.period = min(max(limit / 10, SHORTEST_PERIOD), LONGEST_PERIOD)
        self._watched: dict[ChatConnection, LiveSession] = {}
        self._timer: asyncio.TimerHandle | None = None

    def watch(self, connection: ChatConnection, session: LiveSession) -> None:
        """Check ``connection`` (serving ``session``) from now on, until ``forget``."""
        self._watched[connection] = session
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.period, self._check)

    def forget(self, connection: ChatConnection) -> None:
        self._watched.pop(connection, None)
        if not self._watched and self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        self._timer = None
        oldest = time.monotonic() - self.limit
        idle = [
            (connection, session)
            for connection, session in self._watched.items()
            if connection.idle_since(session) <= oldest
            and not session.conversation.turn_running
            and not session.conversation.closing
        ]
        for connection, session in idle:
            del self._watched[connection]
            connection.close_idle(session, self.limit)
        if self._watched:
            self._timer = asyncio.get_running_loop().call_later(self.period, self._check)
