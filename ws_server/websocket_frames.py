"""Server-to-client WebSocket text frames (RFC 6455 §5.2), built without an I/O object.

The hot path of a stream is one small text frame per chunk. websockets builds each through
a ``Frame`` object, its checks and ``serialize`` (about a third of a chunk's cost in the
profile); a server's frame is never masked, so a text frame is just a 2-, 4- or 10-byte
header in front of the UTF-8 payload. That holds while no extension is negotiated
(permessage-deflate would rewrite the payload); the server offers none.
"""

from __future__ import annotations

from typing import Final

FIN_TEXT: Final = 0x81  # FIN set, opcode 1 (text)
# Headers of payloads shorter than 126 bytes: one byte of length, the common case.
_SHORT: Final = tuple(bytes((FIN_TEXT, length)) for length in range(126))
_MEDIUM: Final = bytes((FIN_TEXT, 126))
_LONG: Final = bytes((FIN_TEXT, 127))


def text_frame_header(length: int) -> bytes:
    """The header of an unmasked, final text frame whose payload is ``length`` bytes."""
    if length < 126:
        return _SHORT[length]
    if length < 0x10000:
        return _MEDIUM + length.to_bytes(2, "big")
    return _LONG + length.to_bytes(8, "big")
