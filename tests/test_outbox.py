"""The outbox: seq numbering, the replay buffer's bound and exact bytes, and a detached
producer paused rather than frames dropped. Plain calls, no sockets."""

from __future__ import annotations

import asyncio
import json

import pytest

from ws_server.session.outbox import Outbox


class Recording:
    """A sink that keeps what it was given."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []

    async def write(self, data: bytes) -> None:
        self.frames.append(data)

    async def write_now(self, data: bytes) -> None:
        self.frames.append(data)

    def post(self, data: bytes) -> None:
        self.frames.append(data)


def seqs(frames: list[bytes]) -> list[int]:
    return [json.loads(frame)["seq"] for frame in frames]


async def test_every_frame_gets_the_next_seq_across_turns_and_kinds() -> None:
    outbox, sink = Outbox(), Recording()
    outbox.attach(sink)
    await outbox.chunk(1, "a")
    await outbox.done(1, "stop")
    await outbox.error("busy", "wait")
    await outbox.chunk(2, "b")
    assert seqs(sink.frames) == [1, 2, 3, 4]
    assert json.loads(sink.frames[1]) == {"type": "done", "seq": 2, "turn": 1, "reason": "stop"}


async def test_frames_after_a_seq_are_replayed_byte_for_byte() -> None:
    outbox, sink = Outbox(), Recording()
    outbox.attach(sink)
    for index in range(5):
        await outbox.chunk(1, f"{index} \u4e2d")
    assert outbox.frames_after(2) == sink.frames[2:]
    assert outbox.frames_after(5) == []  # nothing missed
    assert outbox.frames_after(6) is None  # beyond the last frame: nothing to resume from


async def test_an_attached_outbox_keeps_only_its_bound_and_says_when_frames_are_gone() -> None:
    outbox, sink = Outbox(replay_bytes=2000), Recording()
    outbox.attach(sink)
    for _ in range(100):
        await outbox.chunk(1, "x" * 50)
    assert outbox.buffered_bytes <= 2000
    assert len(sink.frames) == 100  # all sent meanwhile
    assert outbox.frames_after(10) is None  # evicted: a resume from there must fail whole
    kept = outbox.frames_after(95)
    assert kept == sink.frames[95:]


async def test_a_client_that_cannot_resume_costs_no_buffer() -> None:
    outbox, sink = Outbox(replay_bytes=0), Recording()
    outbox.attach(sink)
    await outbox.chunk(1, "a")
    assert outbox.buffered_bytes == 0 and not outbox.resumable
    assert outbox.frames_after(0) is None


async def test_a_detached_producer_pauses_when_the_buffer_is_full_and_never_drops() -> None:
    outbox = Outbox(replay_bytes=1000)
    produced = 0

    async def produce() -> None:
        nonlocal produced
        for _ in range(200):
            await outbox.chunk(1, "y" * 40)
            produced += 1

    producer = asyncio.get_running_loop().create_task(produce())
    await asyncio.sleep(0.05)
    assert not producer.done()
    paused_at = produced
    assert paused_at < 200 and outbox.buffered_bytes <= 1000 + 200  # one frame over, at most
    await asyncio.sleep(0.05)
    assert produced == paused_at  # paused, not dropping
    buffered = outbox.seq  # the frame it waits on is buffered already, none is lost
    missed = outbox.frames_after(0)
    assert missed is not None and seqs(missed) == list(range(1, buffered + 1))
    sink = Recording()
    outbox.attach(sink)  # a resume: the producer carries on into the connection
    await asyncio.wait_for(producer, 5)
    assert seqs(sink.frames) == list(range(buffered + 1, 201))


async def test_events_are_numbered_kept_and_replayed_like_chunks() -> None:
    outbox, sink = Outbox(), Recording()
    outbox.attach(sink)
    await outbox.chunk(1, "a")
    outbox.event(1, "status", {"text": "thinking"})
    await outbox.chunk(1, "b")
    await outbox.done(1, "stop")
    assert seqs(sink.frames) == [1, 2, 3, 4]
    replayed = outbox.frames_after(1)
    assert replayed is not None and [json.loads(f)["type"] for f in replayed] == [
        "event",
        "chunk",
        "done",
    ]
    assert json.loads(replayed[0]) == {
        "type": "event",
        "seq": 2,
        "turn": 1,
        "name": "status",
        "data": {"text": "thinking"},
    }


async def test_an_event_that_cannot_be_encoded_spends_no_seq() -> None:
    outbox, sink = Outbox(), Recording()
    outbox.attach(sink)
    await outbox.chunk(1, "a")
    with pytest.raises(TypeError):
        outbox.event(1, "bad", {"value": object()})
    await outbox.chunk(1, "b")
    assert seqs(sink.frames) == [1, 2]
    assert outbox.frames_after(1) == sink.frames[1:]
