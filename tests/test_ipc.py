"""The server-worker channel: typed messages framed on a byte stream. What a worker sends
is either whole, well-typed messages or a ``ChannelError`` (the worker is then replaced),
never an escaping exception."""

from __future__ import annotations

import pytest

from ws_server.isolation import ipc
from ws_server.isolation.messages import (
    Chunks,
    Config,
    Emitted,
    End,
    MessageError,
    Ready,
    Turn,
    TurnEnd,
    from_list,
    to_list,
)


def test_messages_split_anywhere_come_out_whole_typed_and_in_order() -> None:
    sent = [Chunks("s", 1, ["héllo", " world"]), TurnEnd("s", 1, "stop", None, {"k": 1})]
    data = b"".join(ipc.encode(message) for message in sent)
    decoder = ipc.FrameDecoder()
    got = []
    for index in range(len(data)):
        got += decoder.feed(data[index : index + 1])
    assert got == sent and [type(m) for m in got] == [Chunks, TurnEnd]


@pytest.mark.parametrize(
    "message",
    [
        Config({"secrets": {"k": "v"}}),
        Turn("s", 3, 1, 0, [{"role": "user", "content": "hi"}], True, {"temperature": 0.1}),
        Emitted("s", 2, "status", {"text": "thinking"}),
        Ready(""),
        End("s"),
    ],
)
def test_every_kind_travels_as_a_kind_named_array_and_back(message: object) -> None:
    wire = to_list(message)  # type: ignore[arg-type]
    assert isinstance(wire[0], str) and from_list(wire) == message
    assert type(from_list(wire)) is type(message)


@pytest.mark.parametrize(
    ("wire", "problem"),
    [
        (["chunks", "s", 1], "2 fields, not 3"),  # a field short
        (["chunks", "s", "1", ["text"]], "turn_id"),  # a turn id that is text
        (["chunks", "s", True, ["text"]], "turn_id"),  # a bool is not a turn id
        (["chunks", "s", 1, "text"], "texts"),  # texts that are not a list
        (["chunks", "s", 1, ["text", 7]], "something other than text"),
        (["turn_end", "s", 1, "stop", None, []], "context"),  # a context that is a list
        (["takeover", "s"], "unknown message kind"),
        ([7, "s"], "starting with its kind"),
    ],
)
def test_a_malformed_message_is_refused_naming_what_is_wrong(wire: list, problem: str) -> None:
    with pytest.raises(MessageError, match=problem):
        from_list(wire)


@pytest.mark.parametrize(
    "payload",
    [
        b"[" * 200_000 + b"]" * 200_000,  # nested past the JSON decoder's recursion limit
        b"\xff\xfe",  # not UTF-8
        b"{}",  # not an array
        b"[]",  # empty
        b'["chunks", "s"]',  # a message missing fields
    ],
)
def test_a_hostile_frame_is_a_channel_error(payload: bytes) -> None:
    frame = len(payload).to_bytes(4, "big") + payload
    with pytest.raises(ipc.ChannelError):
        ipc.FrameDecoder().feed(frame)
