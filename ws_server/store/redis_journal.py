"""A session's write-behind record in Redis: frames, history and turn state, in batches.

The conversation and outbox report changes here without waiting; the store's writer
sends every dirty journal's changes in one pipeline per batch (one ``APPEND`` script
call per session, each fenced by the session's epoch). A chunk never waits for Redis;
only a session relayed through another node, whose frames reach its client through
Redis, waits while too many of its frames are unwritten (backpressure).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Final

from ws_server.sdk import Message
from ws_server.store import keys

MIN_KEPT: Final = 64  # frames a session's stream keeps at least

if TYPE_CHECKING:
    from redis.asyncio.client import Pipeline

    from ws_server.session.live import LiveSession
    from ws_server.store.writer import JournalWriter


def session_fields(session: LiveSession, epoch: int, owner: str, seq: int) -> dict[str, str]:
    """A session's hash as its holder first writes it."""
    conversation = session.conversation
    version = conversation.version
    return {
        "id": conversation.id,
        "model": version.name,
        "revision": version.revision,
        "version": version.version,
        "key": session.key_digest,
        "owner": owner,
        "epoch": str(epoch),
        "seq": str(seq),
        "turn": "0",
        "running": "0",
        "turn_seq": "0",
        "window": str(session.window),
    }


class RedisJournal:
    """What one session has changed since its last write."""

    __slots__ = (
        "_context",
        "_fields",
        "_frames",
        "_history",
        "_last",
        "_replace",
        "_resync",
        "_sent_bytes",
        "_sent_frames",
        "broken",
        "deleting",
        "digest",
        "dirty",
        "epoch",
        "keys",
        "pending_bytes",
        "released",
        "session",
        "writer",
        "writing",
    )

    def __init__(self, writer: JournalWriter, session: LiveSession, epoch: int) -> None:
        assert session.token_digest is not None
        self.writer = writer
        self.session = session
        self.digest = session.token_digest
        self.keys = keys.session_keys(self.digest)
        self.epoch = epoch
        self.dirty = False  # waiting in the store's batch
        self.broken = False  # a write was lost (Redis went away): no more resumes elsewhere
        self.released = False  # drained: another node carries it on, keep its keys
        self.deleting = False  # ended: its keys go with the next batch
        self.writing = False  # in the batch on its way to Redis
        self._resync = False  # the next write rewrites the whole session first
        self._frames: list[bytes] = []
        self._last = 0  # the seq of the last of ``_frames``
        self._sent_frames = 0  # frames written so far, and their bytes: the stream keeps
        self._sent_bytes = 0  # about --replay-buffer-bytes of them, however big they are
        self._history: list[bytes] = []
        self._replace = False
        self._fields: dict[str, str] = {}
        self._context: dict[str, Any] | None = None
        self.pending_bytes = 0

    # ------------------------------------------------------------------ Journal
    def frame(self, seq: int, data: bytes) -> None:
        self._frames.append(data)
        self._last = seq
        self.pending_bytes += len(data)
        if not self.dirty:
            self._mark()

    def history_appended(self, message: Message) -> None:
        self._history.append(json.dumps(message).encode())
        self._mark()

    def history_replaced(self, messages: list[Message]) -> None:
        self._history = [json.dumps(m).encode() for m in messages]
        self._replace = True
        self._mark()

    def turn_started(self, turn: int, seq: int) -> None:
        self._fields.update(turn=str(turn), running="1", turn_seq=str(seq))
        self._mark()

    def relayed(self, relay_id: str, count: int) -> None:
        """The holder took ``count`` client frames from that relay (see ``SessionRecord``)."""
        self._fields["relayed"] = f"{relay_id}:{count}"
        self._mark()

    def turn_ended(self, turn: int, context: dict[str, Any]) -> None:
        self._fields.update(turn=str(turn), running="0")
        self._context = context
        self._mark()

    def delete(self) -> None:
        """The session ended here: its keys go, after whatever is pending (one batch)."""
        self.deleting = True
        self._mark()

    def resync(self) -> None:
        """Redis is back after losing writes (or came back empty): mirror again, the next
        write putting the whole session there first."""
        self.broken = False
        self._resync = True
        self._frames, self._history, self._fields, self._replace = [], [], {}, False
        self.pending_bytes = 0
        conversation = self.session.conversation
        conversation.journal = self
        conversation.outbox.mirror = self.frame
        self._mark()

    def _mark(self) -> None:
        if not self.dirty and not self.broken:
            self.dirty = True
            self.writer.schedule(self)

    # ------------------------------------------------------------------ the writer's side
    def write(self, pipe: Pipeline) -> int:
        """Queue this journal's changes on ``pipe`` (the writer's batch) and forget them;
        how many script calls that took (the first one's answer says whether this node
        still holds the session)."""
        self.dirty = False
        conversation = self.session.conversation
        calls = 0
        if self._resync:
            self._resync = False
            self._write_whole(pipe, conversation.outbox.seq - len(self._frames))
            calls += 1
        fields = self._fields
        frames = self._frames
        if frames:
            fields["seq"] = str(self._last)
        if self._context is not None:
            fields["context"] = json.dumps(self._context)
        if frames:
            self._sent_frames += len(frames)
            self._sent_bytes += self.pending_bytes
        keep = max(
            MIN_KEPT, self.writer.replay_bytes * self._sent_frames // (self._sent_bytes or 1)
        )
        args: list[Any] = [
            self.epoch,
            keep,
            self.writer.ttl_ms,
            conversation.limits.messages,
            self._last if frames else "",
            keys.pack_frames(frames) if frames else "",
            "R" if self._replace else "A",
            len(self._history),
            *self._history,
            len(fields),
        ]
        for name, value in fields.items():
            args += (name, value)
        pipe.evalsha(self.writer.append_script.sha, len(self.keys), *self.keys, *args)
        self._frames = []
        self._history = []
        self._replace = False
        self._fields = {}
        self._context = None
        self.pending_bytes = 0
        calls += 1
        if self.deleting:
            pipe.evalsha(self.writer.delete_script.sha, len(self.keys), *self.keys, self.epoch)
            self.broken = True  # written for the last time
            calls += 1
        return calls

    def _write_whole(self, pipe: Pipeline, seq: int) -> None:
        """The RESYNC script: the session as it stands before the frames pending now."""
        conversation = self.session.conversation
        fields = session_fields(self.session, self.epoch, self.writer.link.node, seq)
        fields["turn"] = str(conversation.turn)
        fields["running"] = "1" if conversation.turn_running else "0"
        fields["turn_seq"] = str(seq)  # the stream starts over here
        fields["context"] = json.dumps(conversation.context_snapshot())
        args: list[Any] = [self.epoch, self.writer.link.node, self.writer.ttl_ms, len(fields)]
        for name, value in fields.items():
            args += (name, value)
        messages = conversation.history.messages()
        args += [len(messages), *(json.dumps(m) for m in messages)]
        pipe.evalsha(self.writer.resync_script.sha, len(self.keys), *self.keys, *args)

    def lose(self) -> None:
        """Redis went away with this journal's changes: it no longer mirrors anything (the
        session goes on, resumable on this node only)."""
        self.broken = True
        self.dirty = False
        self._frames, self._history, self._fields = [], [], {}
        self.pending_bytes = 0
        conversation = self.session.conversation
        conversation.journal = None
        conversation.outbox.mirror = None
