"""The framed channel between the server and an isolated worker: pure encode/decode.

Each message is a JSON array whose first item names it, sent as a 4-byte big-endian
length and the UTF-8 JSON. The channel is a socket pair handed to the worker as a file
descriptor, never its stdout, so a model's ``print()`` cannot corrupt it. Standard
library only: the worker imports this from inside the model's virtualenv.

Server → worker: ``["config", "", config]`` (first, once: the model's config, secrets
included, which must never be a command-line argument), ``["start", sid, context]``
(context: a snapshot to restore after ``on_chat_start``, or null),
``["turn", sid, messages, turn_id, snapshot, params]`` (snapshot: whether ``turn_end``
carries the session's context; params: the client's for that turn, or null),
``["cancel", sid]``, ``["pause", sid]``, ``["resume", sid]``, ``["ping", sid]``, ``["end", sid]``.
Worker → server: ``["ready", description]``, ``["load_failed", message, detail]``,
``["started", sid, error]``, ``["chunk", sid, turn_id, text]``,
``["event", sid, turn_id, name, data]`` (what the model emitted, in order with chunks),
``["turn_end", sid, turn_id, outcome, detail, context]`` (outcome ``stop``, ``cancelled``,
``error`` or ``resource_exhausted``), ``["pong", sid, None]``, ``["ended", sid, error]``.
"""

from __future__ import annotations

import json
import struct
from typing import Any, Final

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


def encode(message: list[Any]) -> bytes:
    """One message as a length-prefixed frame."""
    payload = _ENCODER.encode(message).encode()
    return HEADER.pack(len(payload)) + payload


class FrameDecoder:
    """Accumulates bytes as they arrive and yields every complete message."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[list[Any]]:
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
                message = _DECODER.decode(buffer[offset + 4 : end].decode())
            except (ValueError, RecursionError) as exc:  # UnicodeDecodeError included
                raise ChannelError(f"invalid frame: {type(exc).__name__}") from None
            if not isinstance(message, list) or not message:
                raise ChannelError("a frame must be a non-empty JSON array")
            messages.append(message)
            offset = end
        if offset:
            del buffer[:offset]
        return messages
