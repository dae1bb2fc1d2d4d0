"""The server's own text-frame headers, read back by websockets' parser (the oracle)."""

from __future__ import annotations

import pytest
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from ws_server.websocket_frames import text_frame_header


def parsed(data: bytes) -> Frame:
    """``data`` parsed as a client reads a server's frame (unmasked)."""
    reader = StreamReader()
    reader.feed_data(data)
    parser = Frame.parse(reader.read_exact, mask=False)
    try:
        next(parser)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    raise AssertionError("the frame was not read whole")


@pytest.mark.parametrize("length", [0, 1, 125, 126, 127, 65535, 65536, 1 << 20])
def test_every_length_class_reads_back_as_one_final_text_frame(length: int) -> None:
    payload = ("é" * (length // 2) + "x" * (length % 2)).encode()
    assert len(payload) == length
    frame = parsed(text_frame_header(length) + payload)
    assert (frame.opcode, frame.fin, frame.data) == (Opcode.TEXT, True, payload)


@pytest.mark.parametrize("length,size", [(125, 2), (126, 4), (65535, 4), (65536, 10)])
def test_the_header_takes_the_shortest_form(length: int, size: int) -> None:
    assert len(text_frame_header(length)) == size
