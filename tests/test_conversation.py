"""The conversation core, with no socket: turns one at a time, busy, cancel order, done
once, timeout, model errors, history commit, on_chat_end exactly once. Real model classes
run in a real shared runner; frames are read from the outbox."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from ws_server import protocol
from ws_server.registry.catalog import ModelVersion
from ws_server.registry.config import ModelConfig
from ws_server.runners import SharedRunner
from ws_server.sdk import AnythingBaseModel, Message
from ws_server.session.conversation import Conversation
from ws_server.session.outbox import Outbox

EVENTS: list[str] = []


class Words(AnythingBaseModel):
    """Streams the last message back word by word; "slow" waits between words."""

    async def on_chat_start(self) -> None:
        EVENTS.append("start")

    async def on_chat_messages(self, messages: list[Message]) -> AsyncIterator[str]:
        text = messages[-1]["content"]
        try:
            if text == "fail":
                raise RuntimeError("secret detail")
            for word in text.split():
                yield word + " "
                if text.startswith("slow"):
                    await asyncio.sleep(0.2)
        finally:
            EVENTS.append("finally")

    async def on_chat_end(self) -> None:
        EVENTS.append("end")


class Frames:
    """A sink that parses what it is given."""

    def __init__(self) -> None:
        self.frames: list[dict[str, Any]] = []
        self.arrived = asyncio.Event()

    async def write(self, data: bytes) -> None:
        self.frames.append(json.loads(data))
        self.arrived.set()

    async def write_now(self, data: bytes) -> None:
        await self.write(data)

    def post(self, data: bytes) -> None:
        self.frames.append(json.loads(data))
        self.arrived.set()

    async def until(self, kind: str, timeout: float = 5) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for frame in self.frames:
                if frame["type"] == kind:
                    self.frames.remove(frame)
                    return frame
            self.arrived.clear()
            await asyncio.wait_for(self.arrived.wait(), deadline - time.monotonic())


def conversation(timeout: float = 30) -> tuple[Conversation, Frames]:
    EVENTS.clear()
    config = ModelConfig.model_validate({"settings": {"timeout": timeout}})
    runner = SharedRunner(Words, {}, Path("."), None)
    version = ModelVersion("words", Path("."), "r1", config, "", runner, "", time.time())
    outbox, sink = Outbox(), Frames()
    outbox.attach(sink)
    return Conversation(version, outbox), sink


async def test_a_turn_streams_chunks_then_done_and_joins_the_history() -> None:
    chat, sink = conversation()
    assert await chat.start() is None
    await chat.receive(protocol.UserMessage("hello there"))
    done = await sink.until("done")
    assert [f["content"] for f in sink.frames] == ["hello ", "there "]
    assert done == {"type": "done", "seq": 3, "turn": 1, "reason": "stop"}
    assert chat.history.messages()[-1] == {"role": "assistant", "content": "hello there "}


async def test_a_message_while_a_turn_runs_is_busy_and_takes_no_turn_number() -> None:
    chat, sink = conversation()
    await chat.start()
    await chat.receive(protocol.UserMessage("slow one two"))
    await chat.receive(protocol.UserMessage("again"))
    busy = await sink.until("error")
    assert busy["code"] == "busy" and "turn 1" in busy["message"]
    assert (await sink.until("done"))["turn"] == 1
    await chat.receive(protocol.UserMessage("next"))
    assert (await sink.until("done"))["turn"] == 2


async def test_cancel_runs_the_models_finally_before_a_single_done() -> None:
    chat, sink = conversation()
    await chat.start()
    await chat.receive(protocol.UserMessage("slow a b c d"))
    await sink.until("chunk")
    await chat.receive(protocol.CancelTurn())
    await chat.receive(protocol.CancelTurn())  # a second cancel changes nothing
    done = await sink.until("done")
    assert done["reason"] == "cancelled" and EVENTS[-1] == "finally"
    await asyncio.sleep(0.3)
    assert not [f for f in sink.frames if f["type"] == "done"]  # once


async def test_a_turn_over_its_time_ends_with_timeout() -> None:
    chat, sink = conversation(timeout=0.3)
    await chat.start()
    await chat.receive(protocol.UserMessage("slow a b c d e f"))
    error = await sink.until("error")
    assert error["code"] == "timeout" and error["turn"] == 1
    assert (await sink.until("done"))["reason"] == "timeout"


async def test_a_model_error_is_generic_for_the_client_and_the_session_goes_on() -> None:
    chat, sink = conversation()
    await chat.start()
    await chat.receive(protocol.UserMessage("fail"))
    error = await sink.until("error")
    assert error["code"] == "model_error" and "secret detail" not in error["message"]
    assert (await sink.until("done"))["reason"] == "error"
    await chat.receive(protocol.UserMessage("fine"))
    assert (await sink.until("done"))["reason"] == "stop"


async def test_on_chat_end_runs_once_and_stops_a_running_turn_first() -> None:
    chat, sink = conversation()
    await chat.start()
    await chat.receive(protocol.UserMessage("slow a b c"))
    await sink.until("chunk")
    await chat.end()
    await chat.end()
    assert EVENTS == ["start", "finally", "end"]
    assert not [f for f in sink.frames if f["type"] == "done"]  # nobody to tell


async def test_a_detached_conversation_runs_on_into_its_buffer() -> None:
    chat, sink = conversation()
    await chat.start()
    chat.outbox.detach()
    await chat.receive(protocol.UserMessage("one two three"))
    await asyncio.sleep(0.1)
    assert sink.frames == [] and not chat.turn_running
    replay = chat.outbox.frames_after(0)
    assert replay is not None
    assert [json.loads(f)["type"] for f in replay] == ["chunk", "chunk", "chunk", "done"]
