"""A WebSocket server with no model and no library: the fastest thing the client can face.

It exists to show the load generator's own ceiling. Raw asyncio protocol on uvloop, a
minimal RFC 6455 handshake and frame parser, and each chunk frame encoded once per turn
(header and JSON together) and then written as bytes: ``--batch 1`` does one transport
write per frame (one syscall each, like a library that writes as it sends); the default
writes 64 KiB of frames at a time, which is what "fewer, larger socket writes" buys.
Backpressure is honoured: writing pauses when the transport's buffer is full.

Not a real server: no validation, no fragmentation, no extensions.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import socket
import struct

import uvloop
import v1

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
BATCH_BYTES = 64 * 1024


def server_frame(text: str, opcode: int = 0x1) -> bytes:
    """An unmasked, final frame as a server sends it."""
    payload = text.encode()
    size = len(payload)
    if size < 126:
        header = struct.pack("!BB", 0x80 | opcode, size)
    elif size < 65536:
        header = struct.pack("!BBH", 0x80 | opcode, 126, size)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 127, size)
    return header + payload


class NoModel(asyncio.Protocol):
    """One connection: handshake, then turns of pre-encoded chunk frames."""

    batch: int | None = None  # frames per write; None: as many as fit in BATCH_BYTES

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.open = False
        self.turn = 0
        self.frame = b""  # the running turn's chunk frame
        self.remaining = 0  # chunk frames of the running turn still to write
        self.streaming = False  # a turn runs: its done frame is still to send
        self.paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.open and not self._handshake():
            return
        self._read_frames()

    def _handshake(self) -> bool:
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return False
        head = bytes(self.buffer[:end]).decode("latin-1")
        del self.buffer[: end + 4]
        key = ""
        for line in head.split("\r\n")[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "sec-websocket-key":
                key = value.strip()
        accept = base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()
        assert self.transport is not None
        self.transport.write(
            (
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
            ).encode()
            + server_frame(v1.ready_frame("nomodel"))
        )
        self.open = True
        return True

    def _read_frames(self) -> None:
        buffer = self.buffer
        while len(buffer) >= 6:  # client frames are masked: 2 + 4 bytes at least
            opcode, length = buffer[0] & 0x0F, buffer[1] & 0x7F
            offset = 2
            if length == 126:
                (length,) = struct.unpack_from("!H", buffer, 2)
                offset = 4
            elif length == 127:
                (length,) = struct.unpack_from("!Q", buffer, 2)
                offset = 10
            if len(buffer) < offset + 4 + length:
                return
            mask = buffer[offset : offset + 4]
            start = offset + 4
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(buffer[start : start + length]))
            del buffer[: start + length]
            self._frame(opcode, payload)

    def _frame(self, opcode: int, payload: bytes) -> None:
        assert self.transport is not None
        if opcode == 0x8:  # close: answer it and go
            self.transport.write(server_frame("", 0x8))
            self.transport.close()
        elif opcode == 0x9:  # ping
            self.transport.write(server_frame(payload.decode(), 0xA))
        elif opcode == 0x1:
            self.turn += 1
            chunks, content = v1.parse_request(payload)
            self.frame = server_frame(v1.chunk_frame(self.turn, content))
            self.remaining = chunks
            self.streaming = True
            self._write()

    def _write(self) -> None:
        transport = self.transport
        assert transport is not None
        per_write = self.batch or max(1, BATCH_BYTES // len(self.frame))
        while self.remaining and not self.paused:
            if transport.is_closing():
                self.remaining = 0
                return
            count = min(per_write, self.remaining)
            self.remaining -= count
            transport.write(self.frame * count)  # may call pause_writing() right here
        if not self.remaining and self.streaming:
            self.streaming = False
            transport.write(server_frame(v1.done_frame(self.turn)))

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.remaining:
            self._write()


async def main(batch: int | None) -> None:
    NoModel.batch = batch
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = await asyncio.get_running_loop().create_server(NoModel, sock=sock, backlog=2048)
    v1.announce(sock.getsockname()[1])
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, help="frames per write (default: 64 KiB of them)")
    uvloop.run(main(parser.parse_args().batch))
