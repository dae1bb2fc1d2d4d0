"""The isolated worker's side of the typed messages, driven in-process (no socket, no
Ray): what any carrier delivers, in whatever order Ray may deliver it, the worker turns
into the same answers."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from ws_server.isolation.messages import (
    Cancel,
    Chunks,
    Config,
    Ready,
    Start,
    Started,
    Turn,
    TurnEnd,
    WorkerMessage,
)
from ws_server.isolation.worker import Worker

STREAMER = Path(__file__).resolve().parent / "ray_models" / "streamer"


class Collected:
    """An outlet that keeps what the worker sends."""

    def __init__(self) -> None:
        self.writable = asyncio.Event()
        self.writable.set()
        self.sent: list[WorkerMessage] = []
        self.arrived = asyncio.Event()

    def send(self, message: WorkerMessage) -> None:
        self.sent.append(message)
        self.arrived.set()

    def chunk(self, sid: str, turn_id: int, text: str) -> None:
        self.send(Chunks(sid, turn_id, [text]))

    async def drain(self) -> None:
        return None

    async def next_of(self, kind: type) -> WorkerMessage:
        while True:
            for message in self.sent:
                if isinstance(message, kind):
                    self.sent.remove(message)
                    return message
            self.arrived.clear()
            await asyncio.wait_for(self.arrived.wait(), 5)


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


async def test_a_cancel_that_overtakes_its_turn_cancels_it_and_the_history_stays_in_step() -> None:
    outlet = Collected()
    worker = Worker(outlet)
    worker.dispatch(Config({}))
    assert isinstance(await worker.load(STREAMER, "streamer", "r1"), Ready)
    worker.dispatch(Start("s", None))
    assert await outlet.next_of(Started) == Started("s", None)
    # Turn 1's cancel arrives first (Ray may start an actor's calls out of order).
    worker.dispatch(Cancel("s", 1))
    worker.dispatch(Turn("s", 1, 0, 0, [user("stream 100")], False, None))
    assert await outlet.next_of(TurnEnd) == TurnEnd("s", 1, "cancelled", None, None)
    assert not [m for m in outlet.sent if isinstance(m, Chunks)]  # the model never ran
    # Turn 2 sends only what was added; the worker's copy still has turn 1's message.
    appended = [{"role": "assistant", "content": ""}, user("history")]
    worker.dispatch(Turn("s", 2, 1, 0, appended, False, None))
    end = await outlet.next_of(TurnEnd)
    texts = [t for m in outlet.sent if isinstance(m, Chunks) for t in m.texts]
    assert end.outcome == "stop"  # type: ignore[union-attr]
    assert json.loads("".join(texts)) == ["stream 100", "", "history"]
    # A cancel for a turn already over touches nothing.
    worker.dispatch(Cancel("s", 1))
    worker.dispatch(Turn("s", 3, 3, 0, [user("pid")], False, None))
    assert (await outlet.next_of(TurnEnd)).outcome == "stop"  # type: ignore[union-attr]
