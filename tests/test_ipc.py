"""The server-worker channel's framing: what a worker sends is either whole messages or
a ``ChannelError`` (the worker is then replaced), never an escaping exception."""

from __future__ import annotations

import pytest

from ws_server.isolation import ipc


def test_messages_split_anywhere_come_out_whole_and_in_order() -> None:
    data = ipc.encode(["chunk", "s", 1, "héllo"]) + ipc.encode(["turn_end", "s", 1, "stop", None])
    decoder = ipc.FrameDecoder()
    got = []
    for index in range(len(data)):
        got += decoder.feed(data[index : index + 1])
    assert got == [["chunk", "s", 1, "héllo"], ["turn_end", "s", 1, "stop", None]]


@pytest.mark.parametrize(
    "payload",
    [
        b"[" * 200_000 + b"]" * 200_000,  # nested past the JSON decoder's recursion limit
        b"\xff\xfe",  # not UTF-8
        b"{}",  # not an array
        b"[]",  # empty
    ],
)
def test_a_hostile_frame_is_a_channel_error(payload: bytes) -> None:
    frame = len(payload).to_bytes(4, "big") + payload
    with pytest.raises(ipc.ChannelError):
        ipc.FrameDecoder().feed(frame)
