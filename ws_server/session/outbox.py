"""A session's outbox: the only path from a conversation to a socket.

Every chunk, done and error frame of a session goes through here: the outbox stamps its
``seq``, encodes it once, keeps the exact bytes in a bounded replay buffer (for a client
that resumes) and hands them to the attached connection's writer, if one is attached.
While no connection is attached, frames only go to the buffer; once it is full, the
producer (the model's turn) waits for a connection: frames are never dropped unsent.
While one is attached, the oldest frames (already sent) make room for new ones.

No sockets here: a ``Sink`` is whatever writes bytes (the connection adapter's writer),
so the conversation core is tested with an in-memory one. An ``Encoding`` says what the
bytes are: the wire protocol's JSON frames, or the Server-Sent Events of an
OpenAI-compatible request (``openai_compat/stream.py``).
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable
from typing import Any, Final, Protocol

from ws_server import protocol

DEFAULT_REPLAY_BYTES: Final = 1024 * 1024
# What a buffered frame costs beyond its bytes: the bytes object's header and its slot in
# the deque (measured: a 67-byte frame takes about 120 bytes), so the bound is on memory.
FRAME_OVERHEAD: Final = 56


class Sink(Protocol):
    """Where an attached connection takes the outbox's frames."""

    async def write(self, data: bytes) -> None:
        """A frame that may be batched with those that follow (chunks)."""

    async def write_now(self, data: bytes) -> None:
        """A frame that ends a run (done, error): written at once, with any batch."""

    def post(self, data: bytes) -> None:
        """A frame sent from code that cannot wait (a model's event): queued, written on
        the loop's next turn with whatever follows."""


class Encoding(Protocol):
    """How a session's frames are written as bytes."""

    def chunk(self, seq: int, turn: int, content: str) -> bytes: ...

    def event(self, seq: int, turn: int, name: str, data: dict[str, Any]) -> bytes: ...

    def done(self, seq: int, turn: int, reason: protocol.DoneReason) -> bytes: ...

    def error(
        self,
        seq: int,
        code: protocol.ErrorCode,
        message: str,
        turn: int | None,
        retry_after: int | None = None,
    ) -> bytes: ...


class WireEncoding:
    """design.md's JSON frames, as WebSocket clients get them."""

    @staticmethod
    def chunk(seq: int, turn: int, content: str) -> bytes:
        return protocol.encode_chunk(seq, turn, content).encode()

    @staticmethod
    def event(seq: int, turn: int, name: str, data: dict[str, Any]) -> bytes:
        return protocol.encode_event(seq, turn, name, data).encode()

    @staticmethod
    def done(seq: int, turn: int, reason: protocol.DoneReason) -> bytes:
        return protocol.encode_done(seq, turn, reason).encode()

    @staticmethod
    def error(
        seq: int,
        code: protocol.ErrorCode,
        message: str,
        turn: int | None,
        retry_after: int | None = None,
    ) -> bytes:
        return protocol.encode_error(code, message, turn, seq, retry_after).encode()


WIRE: Final = WireEncoding()


class Outbox:
    """Numbers, buffers and delivers one session's frames."""

    __slots__ = (
        "_buffer",
        "_buffered",
        "_closing",
        "_encoding",
        "_first",
        "_held",
        "_limit",
        "_room",
        "_sink",
        "barrier",
        "base",
        "mirror",
        "seq",
    )

    def __init__(
        self, replay_bytes: int = DEFAULT_REPLAY_BYTES, seq: int = 0, encoding: Encoding = WIRE
    ) -> None:
        self._encoding = encoding
        self.seq = seq  # the last seq stamped (a session taken over goes on from its store's)
        self.base = seq  # frames up to this seq were stamped elsewhere (another node)
        # Every frame stamped, as it is stamped (a journal's write-behind; see journal.py).
        self.mirror: Callable[[int, bytes], None] | None = None
        # Awaited before a turn's last frame goes to the client: until the mirror has it
        # (a store that lets sessions move must never have the client ahead of it there).
        self.barrier: Callable[[], Awaitable[None]] | None = None
        self._limit = replay_bytes  # 0: keep nothing (a client that can't resume)
        # The kept frames, oldest first; the first one's seq is ``_first`` (seqs are
        # contiguous, so none is stored). Made with the first frame: idle sessions are many.
        self._buffer: collections.deque[bytes] | None = None
        self._first = seq + 1
        self._buffered = 0
        self._sink: Sink | None = None
        self._room: asyncio.Future[None] | None = None  # set when a detached producer waits
        self._closing = False  # the session is being wound down: nothing waits for room
        # While a frame waits for the barrier, the frames stamped after it wait behind it
        # (the client gets every frame in seq order); None when nothing waits.
        self._held: list[bytes] | None = None

    # ------------------------------------------------------------------ producer side
    async def chunk(self, turn: int, content: str) -> int:
        """A piece the model yielded; the bytes of its frame (for /metrics)."""
        self.seq += 1
        data = self._encoding.chunk(self.seq, turn, content)
        sink = self._sink
        if self._limit:
            self._keep(data)
            if self.mirror is not None:
                self.mirror(self.seq, data)
                if self._held is not None:
                    self._held.append(data)
                    return len(data)
        if sink is not None:
            await sink.write(data)
        else:
            await self._wait_for_room()
        return len(data)

    def event(self, turn: int, name: str, data: dict[str, Any]) -> None:
        """Something the model (or the server) reports besides text, in order with the
        chunks: numbered, kept and sent like them, without waiting (a model's ``emit``
        is a plain call). A detached session's buffer takes it past its bound if need
        be; the next chunk waits for room."""
        frame = self._encoding.event(self.seq + 1, turn, name, data)  # may raise: no seq spent
        self.seq += 1
        if self._limit:
            self._keep(frame)
            if self.mirror is not None:
                self.mirror(self.seq, frame)
                if self._held is not None:
                    self._held.append(frame)
                    return
        if self._sink is not None:
            self._sink.post(frame)

    async def done(self, turn: int, reason: protocol.DoneReason) -> None:
        await self._room_first()
        self.seq += 1
        await self._final(self._encoding.done(self.seq, turn, reason))

    async def error(
        self,
        code: protocol.ErrorCode,
        message: str,
        turn: int | None = None,
        retry_after: int | None = None,
    ) -> None:
        await self._room_first()
        self.seq += 1
        await self._final(self._encoding.error(self.seq, code, message, turn, retry_after))

    async def _room_first(self) -> None:
        """A frame that ends a turn is stamped only once it fits: a ``done`` in the buffer
        means the turn is over (a resume reports it so, and the next message is no
        ``busy``), never still waiting behind a full buffer."""
        if self._sink is None and self._limit:
            await self._wait_for_room()

    async def _final(self, data: bytes) -> None:
        """A frame that ends a run: kept, mirrored, then written at once with the batch."""
        if self._limit:
            self._keep(data)
            if self.mirror is not None:
                self.mirror(self.seq, data)
                if self.barrier is not None:
                    await self._after_barrier(data)
                    return
        sink = self._sink
        if sink is not None:
            await sink.write_now(data)

    async def _after_barrier(self, data: bytes) -> None:
        """Send ``data`` once the mirror has it, and whatever was stamped meanwhile after
        it, in order."""
        if self._held is not None:  # another frame waits already: this one goes after it
            self._held.append(data)
            return
        self._held = [data]
        try:
            assert self.barrier is not None
            await self.barrier()
        finally:
            held = self._held
            while held:
                item = held.pop(0)
                if self._sink is not None:
                    await self._sink.write_now(item)
            self._held = None

    def _keep(self, data: bytes) -> None:
        buffer = self._buffer
        if buffer is None:
            buffer = self._buffer = collections.deque()
            self._first = self.seq
        buffer.append(data)
        self._buffered += len(data) + FRAME_OVERHEAD
        if self._sink is not None and self._buffered > self._limit:
            self._evict()

    def _evict(self) -> None:
        """Attached: the oldest frames (sent already) make room, the newest always stays.
        An eighth of the bound goes at once, so a full buffer isn't trimmed per frame."""
        buffer = self._buffer
        assert buffer is not None
        target = self._limit - (self._limit >> 3)
        buffered, first, popleft = self._buffered, self._first, buffer.popleft
        while buffered > target and len(buffer) > 1:
            buffered -= len(popleft()) + FRAME_OVERHEAD
            first += 1
        self._buffered, self._first = buffered, first

    async def _wait_for_room(self) -> None:
        """Detached, the producer waits for a connection once the buffer is past its
        bound; a session that keeps nothing (its client can't resume) waits at once, so a
        model that never awaits can't spin while its session winds up."""
        while (
            self._sink is None
            and not self._closing
            and (self._buffered > self._limit or not self._limit)
        ):
            if self._room is None or self._room.done():
                self._room = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._room)

    # ------------------------------------------------------------------ connection side
    @property
    def buffered_bytes(self) -> int:
        return self._buffered

    @property
    def resumable(self) -> bool:
        return self._limit > 0

    def attach(self, sink: Sink) -> None:
        """Deliver frames to ``sink`` from now on (a paused producer carries on)."""
        self._sink = sink
        if self._room is not None and not self._room.done():
            self._room.set_result(None)
        if self._buffer is not None and self._buffered > self._limit:
            self._evict()

    def detach(self) -> None:
        """The connection is gone: frames go to the buffer only."""
        self._sink = None

    def unblock(self) -> None:
        """The session is being wound down (server stopping): a producer paused for room
        goes on, so that its turn can end (the buffer may pass its bound by the frames
        that end it)."""
        self._closing = True
        if self._room is not None and not self._room.done():
            self._room.set_result(None)

    def frames_after(self, after: int) -> list[bytes] | None:
        """Every frame with a seq above ``after``, exactly as first sent; None when some of
        them are no longer buffered (or ``after`` is beyond the last frame)."""
        if after > self.seq or after < 0:
            return None
        if after == self.seq:
            return []
        buffer = self._buffer
        if not buffer or self._first > after + 1:
            return None
        start = after + 1 - self._first
        return [buffer[index] for index in range(start, len(buffer))]
