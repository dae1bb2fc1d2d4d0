"""The Redis session store: sessions that several nodes share (``--redis-url``).

A resumable session held by this node is in Redis from the moment its client gets its
token, and mirrored as it goes (``RedisJournal``, written behind in one pipeline per
batch), so that a client reconnecting through any node finds it: the node it reaches
relays to the holder while that one is alive (``session/relay.py``; the holder's side is
``session/remote.py``), or takes the session over once its heartbeat has lapsed or a
drain released it (``session/handover.py``). Heartbeats, inboxes and reload notices are
``cluster.py``'s.

Redis down: new sessions get no resume token, ``/healthz`` says ``"store":"unavailable"``,
chats go on, sessions held here stay resumable here, and the node finds Redis again by
itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final

from ws_server import protocol
from ws_server.sdk import Message
from ws_server.session.live import LiveSession
from ws_server.store import keys
from ws_server.store.base import SessionRecord, TakenOver
from ws_server.store.cluster import CLOSE_STEP, ClusterLink, connect
from ws_server.store.redis_journal import RedisJournal, session_fields
from ws_server.store.tail import FrameTail
from ws_server.store.writer import JournalWriter

if TYPE_CHECKING:
    from ws_server.session.relay import Relay
    from ws_server.session.remote import RemoteAttachment

log = logging.getLogger("anything_agent.store")

TTL_REFRESH: Final = 30.0  # seconds between renewals of the held sessions' TTLs
SMALLEST_FRAME: Final = 40  # bytes of the shortest chunk frame


def default_node_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class RedisStore:
    """The sessions of one node, in a Redis shared with the others (its ``ClusterLink``
    does the heartbeats, the inbox and the reload notices; its ``JournalWriter`` the
    write-behind)."""

    def __init__(
        self,
        url: str,
        node: str,
        *,
        node_ttl: float,
        replay_bytes: int,
        revisions: Callable[[], dict[str, str]],
        on_reload: Callable[[], Awaitable[None]],
        window: float = 30.0,
        frames_per_minute: int | None = None,
    ) -> None:
        self.redis, self._errors = connect(url)
        # The holder named in sessions: the node id and this run of it. A node restarted
        # under the same id (a deploy, a crash) is a new holder: its predecessor's
        # sessions are taken over, not relayed to a process that never held them.
        self.node = f"{node}@{secrets.token_hex(3)}"
        self.node_ttl = node_ttl
        self.link = ClusterLink(
            self.redis,
            self._errors,
            self.node,
            node_ttl,
            revisions=revisions,
            on_reload=on_reload,
            on_message=self._deliver,
            on_beat=self._after_beat,
        )
        self.window = window  # --resume-window: how long keys must outlive their holder
        self.frames_per_minute = frames_per_minute  # for clients relayed from elsewhere
        # The most frames a stream can keep (of the smallest frames): how far ahead of
        # the store a resuming client may claim to be.
        self.stream_length = max(64, replay_bytes // SMALLEST_FRAME)
        self.writer = JournalWriter(
            self.redis,
            self.link,
            replay_bytes=replay_bytes,
            ttl_ms=self.session_ttl_ms,
            on_fenced=self._fenced,
            on_lost=self._lost_writes,
        )
        self._take_over = self.redis.register_script(keys.TAKE_OVER)
        self._release = self.redis.register_script(keys.RELEASE)
        self._sessions: set[LiveSession] = set()
        self._held: dict[str, LiveSession] = {}  # resumable ones, by token digest
        self._journals: dict[str, RedisJournal] = {}  # theirs (kept while a write is lost)
        # Sessions that ended here while their writes could not reach Redis: their keys
        # go once it is back (if this node is still their holder).
        self._ended_unwritten: set[str] = set()
        self._drop_own = self.redis.register_script(keys.DROP_OWN)
        self.relays: dict[str, Relay] = {}  # relays running here, by id
        self.remotes: dict[str, RemoteAttachment] = {}  # sessions here read elsewhere
        self.tail = FrameTail(self.redis, self.link)  # the relays' live frames
        self._tasks: list[asyncio.Task[None]] = []
        self._last_refresh = time.monotonic()

    # ------------------------------------------------------------------ lifecycle
    @property
    def available(self) -> bool:
        return self.link.available

    @property
    def status(self) -> str:
        return "redis" if self.link.available else "unavailable"

    @property
    def session_ttl_ms(self) -> int:
        """A session's keys outlive its last renewal by its window and two renewals."""
        return int((self.window + 2 * TTL_REFRESH + self.node_ttl) * 1000)

    async def start(self) -> None:
        """Join the cluster and write journals, from now on."""
        await self.link.start()
        with contextlib.suppress(*self._errors):  # loaded now, not by the first session
            for script in (
                self.writer.append_script,
                self._take_over,
                self._release,
                self.writer.delete_script,
            ):
                await self.redis.script_load(script.script)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self.writer.run()), loop.create_task(self.tail.run())]

    async def close(self) -> None:
        """Stop (after the sessions have ended): flush, leave the cluster, disconnect.
        Each step is bounded: a Redis that does not answer never holds a shutdown."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.flush(), CLOSE_STEP)
        for task in self._tasks:
            task.cancel()
        await self.link.close()
        with contextlib.suppress(TimeoutError, *self._errors):
            await asyncio.wait_for(self.redis.aclose(close_connection_pool=True), CLOSE_STEP)

    def _lost(self, error: BaseException) -> None:
        self.link.lost(error)

    def cluster(self, model: str) -> dict[str, int]:
        return self.link.cluster(model)

    async def publish_reload(self) -> None:
        await self.link.publish_reload()

    async def send(self, node: str, message: dict[str, Any]) -> bool:
        return await self.link.send(node, message)

    # ------------------------------------------------------------------ SessionStore
    async def add(self, session: LiveSession) -> bool:
        """Keep ``session``; a resumable one is in Redis before this returns (its client
        may resume on another node as soon as it has its token). False: Redis failed it,
        so it cannot be resumable."""
        self._sessions.add(session)
        digest = session.token_digest
        if digest is None or not session.resumable:
            return True
        record = session_fields(session, 1, self.node, session.conversation.outbox.seq)
        try:
            async with self.redis.pipeline(transaction=True) as pipe:  # never without a TTL
                pipe.hset(keys.session_key(digest), mapping=record)
                pipe.pexpire(keys.session_key(digest), self.session_ttl_ms)
                await pipe.execute()
        except self._errors as exc:
            self._lost(exc)
            return False
        self._hold(session, epoch=1)
        return True

    def adopt(self, session: LiveSession, epoch: int) -> None:
        """Hold a session taken over from another node (its hash exists already)."""
        self._sessions.add(session)
        self._hold(session, epoch)

    def _hold(self, session: LiveSession, epoch: int) -> None:
        assert session.token_digest is not None
        self._held[session.token_digest] = session
        journal = RedisJournal(self.writer, session, epoch)
        self._journals[session.token_digest] = journal
        session.conversation.journal = journal
        session.conversation.outbox.mirror = journal.frame
        session.conversation.outbox.barrier = self._barrier(journal)

    def _barrier(self, journal: RedisJournal) -> Callable[[], Awaitable[None]]:
        async def written() -> None:
            await self.writer.written(journal)

        return written

    def journal_of(self, session: LiveSession) -> RedisJournal | None:
        """The journal of a session held here (mirroring, or not since a lost write)."""
        digest = session.token_digest
        return self._journals.get(digest) if digest is not None else None

    def moving(self, session: LiveSession) -> bool:
        """Whether ``session`` can move to another node now (its writes reach Redis)."""
        journal = self.journal_of(session)
        return journal is not None and not journal.broken and self.available

    async def find(self, token_digest: str) -> LiveSession | SessionRecord | None:
        session = self._held.get(token_digest)
        if session is not None and session.ended:
            return None
        try:  # even while Redis seemed down: it may be back before the next heartbeat
            fields = await self.redis.hgetall(keys.session_key(token_digest))
        except self._errors as exc:
            self._lost(exc)
            return session  # held here: resumable here, whatever Redis says
        record = _record(token_digest, fields) if fields else None
        if session is not None:
            journal = self.journal_of(session)
            if (
                record is None  # Redis lost it: still this node's (rewritten when back)
                or journal is None
                or (record.epoch == journal.epoch and record.owner == self.node)
            ):
                return session
            # Taken over by another node while this one stalled: it is theirs now.
            self._fenced_now(session)
            return record
        if record is not None and record.owner == self.node:
            return None  # held here, yet not among the held: it has just ended
        return record

    async def frames_after(
        self, session: LiveSession | SessionRecord, after: int
    ) -> list[bytes] | None:
        newer: list[bytes] = []
        if isinstance(session, LiveSession):
            # Held here: the outbox is the replay buffer, as on one node. Only a session
            # taken over has older frames (stamped on its previous node) in the stream.
            outbox = session.conversation.outbox
            frames = outbox.frames_after(after)
            if frames is not None or self.journal_of(session) is None or after >= outbox.base:
                return frames
            local = outbox.frames_after(outbox.base)
            if local is None:
                return None
            digest, last, newer = session.token_digest, outbox.base, local
        else:
            digest, last = session.token_digest, session.seq
        if after > last or after < 0:
            return None
        if after == last:
            return newer
        assert digest is not None
        try:  # the batches holding seqs after+1 .. last: those whose last seq is above after
            entries = await self.redis.xrange(keys.frames_key(digest), keys.stream_id(after + 1))
        except self._errors as exc:
            self._lost(exc)
            return None
        older = _contiguous(keys.unpack_entries(entries), after + 1, last)
        return None if older is None else older + newer

    async def remove(self, session: LiveSession) -> None:
        self._sessions.discard(session)
        digest = session.token_digest
        if digest is None or self._held.get(digest) is not session:
            return
        del self._held[digest]
        journal = self._journals.pop(digest, None)
        if journal is None or journal.released:
            return
        if journal.broken:  # its writes are not reaching Redis: its keys go when they do
            self._ended_unwritten.add(digest)
        else:  # with the writer's next batch: a thousand ending at once cost one pipeline
            journal.delete()

    def local(self) -> list[LiveSession]:
        return list(self._sessions)

    def _fenced_now(self, session: LiveSession) -> None:
        journal = self.journal_of(session)
        if journal is not None:
            self._fenced(journal)

    def _lost_writes(self, journal: RedisJournal) -> None:
        """A write of ``journal`` was lost (Redis away); it is rewritten once Redis is back."""

    def _fenced(self, journal: RedisJournal) -> None:
        """Another node holds the session now: stop mirroring it, keep its keys (theirs),
        and let go of it here."""
        journal.lose()
        journal.released = True
        session = journal.session
        self._held.pop(journal.digest, None)
        self._journals.pop(journal.digest, None)
        if session.ended:
            return
        session.conversation.log(logging.WARNING, "held by another node now; ending it here")
        attached = session.attachment
        session.end()
        if attached is not None:
            _spawn(attached.replaced())

    async def flush(self) -> None:
        await self.writer.flush()

    # ------------------------------------------------------------------ moving sessions
    async def owner_state(self, record: SessionRecord) -> str:
        """``held`` (its owner lives and still holds it), ``free`` (released, or its owner's
        heartbeat lapsed: take it over), ``moved`` (another node took it) or ``gone``."""
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hmget(keys.session_key(record.token_digest), "owner", "epoch")
                pipe.exists(keys.node_key(record.owner or "-"))
                (owner, epoch), alive = await pipe.execute()
        except self._errors as exc:
            self._lost(exc)
            return "held"  # nothing to decide on: carry on relaying
        if owner is None:
            return "gone"
        if int(epoch) != record.epoch:
            return "moved"  # taken over by another node meanwhile
        if not owner:
            return "free"  # released by a drain
        return "held" if owner.decode() == record.owner and alive else "free"

    async def take_over(self, record: SessionRecord, seq: int) -> TakenOver | None:
        """Make this node the session's holder if nothing changed since ``record`` was
        read (atomic); it goes on after ``seq`` (the store's last, or the client's if the
        lost node sent it more than it wrote). A turn that was running there ends with
        ``interrupted`` and ``done`` ``error``; its partial reply joins the history.
        None: it changed meanwhile."""
        digest = record.token_digest
        try:
            running = record.running and not await self._ended_in_stream(record)
            appended = b""
            if running:
                message = "the node running this turn was lost; its reply is incomplete"
                error = protocol.encode_error("interrupted", message, record.turn, seq + 1)
                done = protocol.encode_done(seq + 2, record.turn, "error")
                appended = keys.pack_frames([error.encode(), done.encode()])
                seq += 2
            epoch = await self._take_over(
                keys=keys.session_keys(digest)[:2],
                args=[
                    record.owner,
                    record.epoch,
                    record.seq,
                    self.node,
                    self.session_ttl_ms,
                    seq,
                    appended,
                ],
            )
            if int(epoch) <= 0:
                return None
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.lrange(keys.history_key(digest), 0, -1)
                pipe.hget(keys.session_key(digest), "context")
                stored, context = await pipe.execute()
            history: list[Message] = [json.loads(item) for item in stored]
            if running:
                partial = await self._partial_reply(record)
                if partial:
                    history.append({"role": "assistant", "content": partial})
        except self._errors as exc:
            self._lost(exc)
            return None
        return TakenOver(
            epoch=int(epoch),
            seq=seq,
            turn=record.turn,
            history=history,
            context=json.loads(context) if context else {},
        )

    async def _ended_in_stream(self, record: SessionRecord) -> bool:
        """Whether the running turn's ``done`` reached the stream before its node went
        (its turn-ended mark may have been in the next, lost, batch)."""
        last = await self.redis.xrevrange(keys.frames_key(record.token_digest), count=1)
        for seq, data in reversed(keys.unpack_entries(last)):
            if seq <= record.turn_seq:
                break
            frame = json.loads(data)
            if frame.get("type") == "done" and frame.get("turn") == record.turn:
                return True
        return False

    async def _partial_reply(self, record: SessionRecord) -> str:
        entries = await self.redis.xrange(
            keys.frames_key(record.token_digest), keys.stream_id(record.turn_seq + 1), "+"
        )
        pieces = []
        for _, data in keys.unpack_entries(entries):
            frame = json.loads(data)
            if frame.get("type") == "chunk" and frame.get("turn") == record.turn:
                pieces.append(frame.get("content", ""))
        return "".join(pieces)

    async def release(self, session: LiveSession) -> None:
        """Draining: write what is pending and let go of the session, so that the next
        node its client reaches takes it over at once."""
        journal = self.journal_of(session)
        if journal is None:
            return
        await self.flush()
        journal.released = True
        try:
            await self._release(keys=[journal.keys[0]], args=[journal.epoch])
        except self._errors as exc:
            self._lost(exc)

    def _deliver(self, message: dict[str, bytes]) -> None:
        """One inbox message: for a session held here (from the node relaying its client),
        or for a relay running here (from the node holding its session)."""
        from ws_server.session.remote import RemoteAttachment

        op = message["op"]
        relay_id = message.get("r", b"").decode()
        relay_node = message.get("n", b"").decode()
        if op == b"attach":
            digest = message["s"].decode()
            session, journal = self._held.get(digest), self._journals.get(digest)
            if session is None or session.ended or journal is None or journal.broken:
                _spawn(self._answer_gone(relay_node, relay_id, digest))
                return
            self.remotes[relay_id] = RemoteAttachment(self, session, journal, relay_node, relay_id)
        elif op == b"frame":
            remote = self.remotes.get(relay_id)
            if remote is None or not remote.reattach():
                # Not (or no longer) the session's connection here: its relay closes, and
                # its client resumes and resends what was not taken.
                answer = "gone" if remote is None or remote.session.ended else "replaced"
                self.remotes.pop(relay_id, None)
                _spawn(self.send(relay_node, {"op": answer, "r": relay_id}))
                return
            remote.feed(message["d"], binary=message.get("b") == b"1")
        elif op == b"detach":
            remote = self.remotes.pop(relay_id, None)
            if remote is not None:
                remote.gone(normal_close=message.get("c") == b"1000")
                remote.close()
        elif op in (b"replaced", b"gone"):
            relay = self.relays.get(relay_id)
            if relay is not None:
                relay.notice(op.decode())

    async def _answer_gone(self, relay_node: str, relay_id: str, digest: str) -> None:
        """A relay asked for a session this node does not hold: if Redis still names this
        node its holder (it ended here while its writes were lost), its keys go, so that
        the client's next resume is told so instead of being relayed here again."""
        if digest not in self._held:
            with contextlib.suppress(*self._errors):
                await self._drop_own(keys=keys.session_keys(digest), args=[self.node])
        await self.send(relay_node, {"op": "gone", "r": relay_id})

    async def _after_beat(self, live: set[str], recovered: bool) -> None:
        """After each heartbeat: drop relays whose node died with its client, clear what a
        lost write left behind once Redis is back, renew the held sessions' TTLs."""
        for remote in list(self.remotes.values()):
            if remote.relay_node not in live:  # its client waits (or resumes) from here
                remote.gone(normal_close=False)
        if recovered or any(j.broken for j in self._journals.values()):
            self._rewrite_lost()
            await self._drop_ended_unwritten()
        if time.monotonic() - self._last_refresh > TTL_REFRESH:
            self._last_refresh = time.monotonic()
            await self._renew()

    async def _renew(self) -> None:
        ttl = self.session_ttl_ms
        with contextlib.suppress(*self._errors):
            async with self.redis.pipeline(transaction=False) as pipe:
                for digest in list(self._held):
                    for key in keys.session_keys(digest):
                        pipe.pexpire(key, ttl)
                await pipe.execute()

    def _rewrite_lost(self) -> None:
        """Redis is back: every session whose writes were lost is written whole again."""
        for journal in self._journals.values():
            if journal.broken and not journal.released and not journal.session.ended:
                journal.resync()

    async def _drop_ended_unwritten(self) -> None:
        ended, self._ended_unwritten = self._ended_unwritten, set()
        for digest in ended:
            try:
                await self._drop_own(keys=keys.session_keys(digest), args=[self.node])
            except self._errors as exc:
                self._lost(exc)
                self._ended_unwritten |= ended
                return


def _record(digest: str, fields: dict[bytes, bytes]) -> SessionRecord | None:
    try:
        return SessionRecord(
            token_digest=digest,
            session_id=fields[b"id"].decode(),
            model=fields[b"model"].decode(),
            revision=fields[b"revision"].decode(),
            version=fields[b"version"].decode(),
            key_digest=fields[b"key"].decode(),
            owner=fields[b"owner"].decode(),
            epoch=int(fields[b"epoch"]),
            seq=int(fields[b"seq"]),
            turn=int(fields[b"turn"]),
            running=fields[b"running"] == b"1",
            turn_seq=int(fields[b"turn_seq"]),
            window=float(fields[b"window"]),
            relayed=fields.get(b"relayed", b"").decode(),
        )
    except (KeyError, ValueError):  # half-written or foreign: as good as gone
        return None


def _contiguous(frames: list[tuple[int, bytes]], first: int, last: int) -> list[bytes] | None:
    """The frames with seqs ``first``..``last``, if every one of them is there."""
    wanted = [data for seq, data in frames if first <= seq <= last]
    if len(wanted) != last - first + 1 or not frames or frames[0][0] > first:
        return None
    return wanted


_background: set[asyncio.Task[Any]] = set()


def _spawn(coroutine: Awaitable[Any]) -> None:
    task = asyncio.ensure_future(coroutine)
    _background.add(task)
    task.add_done_callback(_background.discard)
