"""The framed byte channel between the server and a local isolated worker: pure
encode/decode of the typed messages in ``messages.py``.

Each message is a JSON array (``messages.to_list``) sent as a 4-byte big-endian length and
the UTF-8 JSON. The channel is a socket pair handed to the worker as a file descriptor,
never its stdout, so a model's ``print()`` cannot corrupt it. Standard library only: the
worker imports this from inside the model's virtualenv.
"""

from __future__ import annotations

import json
import struct
from typing import Final

from ws_server.isolation.messages import Message, MessageError, from_list, to_list

HEADER: Final = struct.Struct(">I")
# One chunk (or config) at most; a worker sending more is stopped, so a model can't make
# the server buffer without bound.
MAX_MESSAGE: Final = 32 * 1024 * 1024


class ChannelError(Exception):
    """The peer sent something that is not a valid frame; the channel is unusable."""


# Made once: json.dumps/loads with options build a new encoder per call, and loads() of
# bytes sniffs their encoding each time; per chunk, both showed in profiles.
# default=str: a config.yaml date (YAML has them) travels as its text. ASCII with escapes:
# a lone surrogate a model yields travels (and is repaired later).
_ENCODER: Final = json.JSONEncoder(separators=(",", ":"), default=str)
_DECODER: Final = json.JSONDecoder()


def encode(message: Message) -> bytes:
    """One message as a length-prefixed frame."""
    payload = _ENCODER.encode(to_list(message)).encode()
    return HEADER.pack(len(payload)) + payload


class FrameDecoder:
    """Accumulates bytes as they arrive and yields every complete message."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Message]:
        """Add received bytes; return the messages they completed, in order."""
        buffer = self._buffer
        buffer += data
        messages = []
        offset = 0
        size = len(buffer)
        while size - offset >= 4:
            (length,) = HEADER.unpack_from(buffer, offset)
            if length > MAX_MESSAGE:
                raise ChannelError(f"frame of {length} bytes exceeds the limit")
            end = offset + 4 + length
            if end > size:
                break
            try:
                value = _DECODER.decode(buffer[offset + 4 : end].decode())
            except (ValueError, RecursionError) as exc:  # UnicodeDecodeError included
                raise ChannelError(f"invalid frame: {type(exc).__name__}") from None
            try:
                messages.append(from_list(value))
            except MessageError as exc:
                raise ChannelError(f"invalid message: {exc}") from None
            offset = end
        if offset:
            del buffer[:offset]
        return messages
