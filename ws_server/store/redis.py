"""The Redis session store: several nodes share sessions, heartbeats and reload notices.

A resumable session held by this node is mirrored to Redis as it goes (``RedisJournal``,
written behind in one pipeline per batch), so that a client reconnecting through any
node finds it: the node it reaches relays to the holder while that one is alive, or
takes the session over once its heartbeat has lapsed or a drain released it.

How a relaying node reaches the holder: through the holder's **inbox**, a Redis Stream
per node (``keys.inbox_key``), read by one blocking loop per node. A stream rather than
pub/sub because a client's frames must not be lost or reordered while the holder's
connection to Redis blips: a stream keeps them until read (trimmed by length, expiring
with the node), where pub/sub drops whatever is published while a subscriber is away.
Reload notices, where a missed one is caught up by the generation counter, use pub/sub.

Redis down: new sessions get no resume token, ``/healthz`` says ``"store":"unavailable"``,
chats go on, and the node finds Redis again by itself (its heartbeat keeps trying).
The URL is a secret (it may hold a password) and is never logged.
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
from ws_server.exceptions import StoreUnavailable
from ws_server.sdk import Message
from ws_server.session.live import LiveSession
from ws_server.store import keys
from ws_server.store.base import SessionRecord, TakenOver
from ws_server.store.redis_journal import RELAY_BACKLOG, RedisJournal

if TYPE_CHECKING:
    from ws_server.session.relay import Relay
    from ws_server.session.remote import RemoteAttachment

log = logging.getLogger("anything_agent.store")

# redis-py 8 gives every socket read 5 s; blocking reads stay well under it.
SOCKET_TIMEOUT: Final = 5.0
BLOCK_MS: Final = 500
INBOX_LENGTH: Final = 10_000  # entries kept in a node's inbox (it reads them at once)
INBOX_TTL_MS: Final = 60_000
GENERATION_TTL_MS: Final = 7 * 24 * 3600 * 1000
TTL_REFRESH: Final = 30.0  # seconds between renewals of the held sessions' TTLs
CLOSE_STEP: Final = 2.0  # seconds each step of a shutdown may wait for Redis
FRAME_GUESS: Final = 256  # bytes per frame, to turn the replay buffer's bytes into a length


def default_node_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class RedisStore:
    """Sessions, heartbeats, inboxes and reloads for one node, in a shared Redis."""

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
        try:
            import redis.asyncio as aioredis
        except ImportError:  # pragma: no cover - the extra is part of the test install
            raise StoreUnavailable(
                "--redis-url needs redis-py: pip install 'anything-agent[redis]'"
            ) from None
        self._errors: tuple[type[BaseException], ...] = (aioredis.RedisError, OSError)
        # Any: redis-py types each reply as the union of every client's (sync, async,
        # bytes, str), which says nothing here; the replies used are checked where read.
        self.redis: Any = aioredis.from_url(
            url, socket_timeout=SOCKET_TIMEOUT, socket_connect_timeout=2.0
        )
        # The holder named in sessions: the node id and this run of it. A node restarted
        # under the same id (a deploy, a crash) is a new holder: its predecessor's
        # sessions are taken over, not relayed to a process that never held them.
        self.node = f"{node}@{secrets.token_hex(3)}"
        self.node_ttl = node_ttl
        self.window = window  # --resume-window: how long keys must outlive their holder
        self.frames_per_minute = frames_per_minute  # for clients relayed from elsewhere
        self.stream_length = max(64, replay_bytes // FRAME_GUESS)
        self._revisions = revisions
        self._on_reload = on_reload
        self.append_script = self.redis.register_script(keys.APPEND)
        self._take_over = self.redis.register_script(keys.TAKE_OVER)
        self._release = self.redis.register_script(keys.RELEASE)
        self._delete = self.redis.register_script(keys.DELETE)
        self._available = False
        self._sessions: set[LiveSession] = set()
        self._held: dict[str, LiveSession] = {}  # resumable ones, by token digest
        self._dirty: list[RedisJournal] = []
        self._wake = asyncio.Event()
        self._flushed: asyncio.Future[None] | None = None  # the end of the next batch
        self._writing = False  # a batch is on its way to Redis
        self._stale: set[str] = set()  # digests whose keys a lost write left behind
        self.relays: dict[str, Relay] = {}  # relays running here, by id
        self.remotes: dict[str, RemoteAttachment] = {}  # sessions here read elsewhere
        self._generation: bytes | None = None
        self._cluster: dict[str, dict[str, int]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._last_refresh = time.monotonic()

    # ------------------------------------------------------------------ lifecycle
    @property
    def available(self) -> bool:
        return self._available

    @property
    def status(self) -> str:
        return "redis" if self._available else "unavailable"

    @property
    def session_ttl_ms(self) -> int:
        """A session's keys outlive its last renewal by its window and two renewals."""
        return int((self.window + 2 * TTL_REFRESH + self.node_ttl) * 1000)

    async def start(self) -> None:
        """Beat, read the inbox, listen for reloads and write journals, from now on."""
        await self._beat()  # first beat now: the node is visible before it listens
        with contextlib.suppress(*self._errors):  # loaded now, not by the first session
            for script in (self.append_script, self._take_over, self._release, self._delete):
                await self.redis.script_load(script.script)
        loop = asyncio.get_running_loop()
        for coroutine in (self._heartbeats(), self._inbox(), self._reloads(), self._writer()):
            self._tasks.append(loop.create_task(coroutine))

    async def close(self) -> None:
        """Stop (after the sessions have ended): flush, leave the cluster, disconnect.
        Each step is bounded: a Redis that does not answer never holds a shutdown."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.flush(), CLOSE_STEP)
        for task in self._tasks:
            task.cancel()
        await asyncio.wait(self._tasks, timeout=CLOSE_STEP)
        with contextlib.suppress(TimeoutError, *self._errors):
            await asyncio.wait_for(self._leave(), CLOSE_STEP)
        with contextlib.suppress(TimeoutError, *self._errors):
            await asyncio.wait_for(self.redis.aclose(), CLOSE_STEP)

    async def _leave(self) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.delete(keys.node_key(self.node), keys.inbox_key(self.node))
            pipe.srem(keys.NODES, self.node)
            await pipe.execute()

    def _lost(self, error: BaseException) -> None:
        if self._available:
            log.warning(
                "Redis unreachable (%s): chats go on; new sessions are not resumable "
                "until it is back",
                type(error).__name__,
            )
        self._available = False

    # ------------------------------------------------------------------ SessionStore
    async def add(self, session: LiveSession) -> bool:
        """Keep ``session``; a resumable one is in Redis before this returns (its client
        may resume on another node as soon as it has its token). False: Redis failed it,
        so it cannot be resumable."""
        self._sessions.add(session)
        digest = session.token_digest
        if digest is None or not session.resumable:
            return True
        conversation = session.conversation
        version = conversation.version
        record = {
            "id": conversation.id,
            "model": version.name,
            "revision": version.revision,
            "version": version.version,
            "key": session.key_digest,
            "owner": self.node,
            "epoch": "1",
            "seq": str(conversation.outbox.seq),
            "turn": "0",
            "running": "0",
            "turn_seq": "0",
            "window": str(session.window),
        }
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
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
        journal = RedisJournal(self, session, epoch)
        session.conversation.journal = journal
        session.conversation.outbox.mirror = journal.frame

    def journal_of(self, session: LiveSession) -> RedisJournal | None:
        journal = session.conversation.journal
        return journal if isinstance(journal, RedisJournal) else None

    async def find(self, token_digest: str) -> LiveSession | SessionRecord | None:
        session = self._held.get(token_digest)
        if session is not None:
            return None if session.ended else session
        try:  # even while Redis seemed down: it may be back before the next heartbeat
            fields = await self.redis.hgetall(keys.session_key(token_digest))
        except self._errors as exc:
            self._lost(exc)
            return None
        record = _record(token_digest, fields) if fields else None
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
        journal = self.journal_of(session)
        if journal is None or journal.released or not self._available:
            return
        await self.flush()
        try:
            await self._delete(keys=keys.session_keys(digest), args=[journal.epoch])
        except self._errors as exc:
            self._lost(exc)

    def local(self) -> list[LiveSession]:
        return list(self._sessions)

    # ------------------------------------------------------------------ write-behind
    def schedule(self, journal: RedisJournal) -> None:
        """``journal`` has changes: the writer takes them in its next batch."""
        self._dirty.append(journal)
        self._wake.set()

    async def _writer(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._write_batch()
            except Exception:  # a bug, not Redis: say so, and keep writing the others
                log.exception("writing sessions to Redis failed")

    async def _write_batch(self) -> None:
        batch, self._dirty = self._dirty, []
        self._writing = True
        try:
            if not batch:
                return
            if not self._available:
                for journal in batch:
                    self._lose(journal)
                return
            pipe = self.redis.pipeline(transaction=False)
            pipe.scripts.add(self.append_script)
            written = [j for j in batch if not j.broken]
            for journal in written:
                journal.write(pipe)
            try:
                results = await pipe.execute(raise_on_error=False)
            except self._errors as exc:
                self._lost(exc)
                for journal in written:
                    self._lose(journal)
                return
            for journal, outcome in zip(written, results, strict=True):
                self._check(journal, outcome)
        finally:
            self._writing = False
            flushed, self._flushed = self._flushed, None
            if flushed is not None and not flushed.done():
                flushed.set_result(None)

    def _check(self, journal: RedisJournal, outcome: Any) -> None:
        """The script answered 1, or 0 when another node holds the session now (or its
        keys expired): then this node lets go of it."""
        if isinstance(outcome, BaseException):
            log.error("writing session %s to Redis failed: %s", journal.digest[:8], outcome)
            self._lose(journal)
        elif outcome == 0:
            self._fenced(journal)

    def _lose(self, journal: RedisJournal) -> None:
        journal.lose()
        self._stale.add(journal.digest)

    def _fenced(self, journal: RedisJournal) -> None:
        session = journal.session
        journal.lose()
        journal.released = True  # not ours to delete
        self._held.pop(journal.digest, None)
        if session.ended:
            return
        session.conversation.log(logging.WARNING, "held by another node now; ending it here")
        attached = session.attachment
        session.end()
        if attached is not None:
            _spawn(attached.replaced())

    async def flush(self) -> None:
        """Until every change made so far is written (or lost), the batch being written
        included."""
        while self._dirty or self._writing:
            await self._batch_written()

    async def room(self, journal: RedisJournal) -> None:
        """Backpressure for a session relayed elsewhere: wait while it is far ahead of
        what has been written."""
        while journal.pending_bytes > RELAY_BACKLOG and journal.dirty:
            await self._batch_written()

    async def _batch_written(self) -> None:
        if self._flushed is None:
            self._flushed = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._flushed)

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
        if owner.decode() != record.owner or int(epoch) != record.epoch:
            return "moved"
        return "held" if record.owner and alive else "free"

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
        frames = keys.unpack_entries(last)
        return bool(frames) and b'"type":"done"' in frames[-1][1]

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

    async def read_frames(self, digest: str, after: int) -> list[tuple[int, bytes]]:
        """Frames after seq ``after`` as they arrive (waits up to half a second)."""
        try:
            answer = await self.redis.xread(
                {keys.frames_key(digest): keys.stream_id(after)}, block=BLOCK_MS, count=512
            )
        except self._errors as exc:
            self._lost(exc)
            await asyncio.sleep(BLOCK_MS / 1000)
            return []
        if not answer:
            return []
        return [(seq, data) for seq, data in keys.unpack_entries(answer[0][1]) if seq > after]

    async def send(self, node: str, message: dict[str, Any]) -> None:
        """Put ``message`` in ``node``'s inbox."""
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.xadd(
                    keys.inbox_key(node),
                    message,
                    maxlen=INBOX_LENGTH,
                    approximate=True,
                )
                pipe.pexpire(keys.inbox_key(node), INBOX_TTL_MS)
                await pipe.execute()
        except self._errors as exc:
            self._lost(exc)

    # ------------------------------------------------------------------ the inbox
    async def _inbox(self) -> None:
        inbox = keys.inbox_key(self.node)
        last: bytes | None = None
        while True:
            try:
                if last is None:  # start after a marker of our own: nothing older is ours
                    last = await self.redis.xadd(inbox, {"op": "hello"}, maxlen=INBOX_LENGTH)
                answer = await self.redis.xread({inbox: last}, block=BLOCK_MS, count=256)
            except asyncio.CancelledError:
                raise
            except self._errors as exc:
                self._lost(exc)
                await asyncio.sleep(BLOCK_MS / 1000)
                continue
            for entry_id, fields in answer[0][1] if answer else ():
                last = entry_id
                try:
                    self._deliver({k.decode(): v for k, v in fields.items()})
                except Exception:
                    log.exception("inbox message could not be handled")

    def _deliver(self, message: dict[str, bytes]) -> None:
        from ws_server.session.remote import RemoteAttachment

        op = message["op"]
        relay_id = message.get("r", b"").decode()
        if op == b"attach":
            session = self._held.get(message["s"].decode())
            relay_node = message["n"].decode()
            if session is None or session.ended:
                _spawn(self.send(relay_node, {"op": "gone", "r": relay_id}))
                return
            journal = self.journal_of(session)
            assert journal is not None
            self.remotes[relay_id] = RemoteAttachment(self, session, journal, relay_node, relay_id)
        elif op == b"frame":
            remote = self.remotes.get(relay_id)
            if remote is not None:
                remote.feed(message["d"], binary=message.get("b") == b"1")
        elif op == b"detach":
            remote = self.remotes.pop(relay_id, None)
            if remote is not None:
                remote.gone(normal_close=message.get("c") == b"1000")
        elif op in (b"replaced", b"gone"):
            relay = self.relays.get(relay_id)
            if relay is not None:
                relay.notice(op.decode())

    # ------------------------------------------------------------------ heartbeats
    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.node_ttl / 3)
            await self._beat()

    async def _beat(self) -> None:
        """Say this node lives and what it serves; learn who else does; catch up on a
        reload notice missed; renew the held sessions' TTLs now and then."""
        beat = json.dumps({"revisions": self._revisions()})
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.set(keys.node_key(self.node), beat, px=int(self.node_ttl * 1000))
                pipe.sadd(keys.NODES, self.node)
                pipe.pexpire(keys.NODES, GENERATION_TTL_MS)
                pipe.pexpire(keys.inbox_key(self.node), INBOX_TTL_MS)
                pipe.get(keys.RELOAD_GENERATION)
                pipe.smembers(keys.NODES)
                *_, generation, members = await pipe.execute()
            nodes = sorted(m.decode() for m in members)
            beats = await self.redis.mget([keys.node_key(n) for n in nodes]) if nodes else []
        except asyncio.CancelledError:
            raise
        except self._errors as exc:
            self._lost(exc)
            return
        if not self._available:
            if self._generation is not None:
                log.info("Redis reachable again")
            self._available = True
            await self._clear_stale()
        self._see_cluster(nodes, beats)
        if self._generation is None:
            self._generation = generation or b"0"
        elif (generation or b"0") != self._generation:
            self._generation = generation or b"0"
            log.info("a reload on another node was missed; reloading now")
            _spawn(self._on_reload())
        if time.monotonic() - self._last_refresh > TTL_REFRESH:
            self._last_refresh = time.monotonic()
            await self._renew()

    def _see_cluster(self, nodes: list[str], beats: list[bytes | None]) -> None:
        live: set[str] = set()
        view: dict[str, dict[str, int]] = {}
        gone: list[str] = []
        for node, beat in zip(nodes, beats, strict=True):
            if beat is None:
                gone.append(node)
                continue
            live.add(node)
            for model, revision in json.loads(beat).get("revisions", {}).items():
                counts = view.setdefault(model, {})
                counts[revision] = counts.get(revision, 0) + 1
        self._cluster = view
        if gone:
            _spawn(self._forget_nodes(gone))
        for remote in list(self.remotes.values()):
            if remote.relay_node not in live:  # the relaying node died with its client
                self.remotes.pop(remote.relay_id, None)
                remote.gone(normal_close=False)

    async def _forget_nodes(self, nodes: list[str]) -> None:
        with contextlib.suppress(*self._errors):
            await self.redis.srem(keys.NODES, *nodes)

    async def _renew(self) -> None:
        ttl = self.session_ttl_ms
        with contextlib.suppress(*self._errors):
            async with self.redis.pipeline(transaction=False) as pipe:
                for digest in list(self._held):
                    for key in keys.session_keys(digest):
                        pipe.pexpire(key, ttl)
                await pipe.execute()

    async def _clear_stale(self) -> None:
        """Keys a lost write left incomplete would resume wrongly elsewhere: gone."""
        stale, self._stale = self._stale, set()
        if stale:
            with contextlib.suppress(*self._errors):
                await self.redis.delete(*(k for d in stale for k in keys.session_keys(d)))

    def cluster(self, model: str) -> dict[str, int]:
        """How many live nodes serve each revision of ``model`` (as of the last beat)."""
        return dict(self._cluster.get(model, {}))

    # ------------------------------------------------------------------ reloads
    async def publish_reload(self) -> None:
        """This node reloaded through its API: every other node reloads too."""
        try:
            generation = await self.redis.incr(keys.RELOAD_GENERATION)
            self._generation = str(generation).encode()
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.pexpire(keys.RELOAD_GENERATION, GENERATION_TTL_MS)
                notice = json.dumps({"generation": generation, "node": self.node})
                pipe.publish(keys.RELOAD_CHANNEL, notice)
                await pipe.execute()
        except self._errors as exc:
            self._lost(exc)
            log.warning("the reload could not be passed on to other nodes (Redis down)")

    async def _reloads(self) -> None:
        while True:
            pubsub = self.redis.pubsub()
            try:
                await pubsub.subscribe(keys.RELOAD_CHANNEL)
                while True:
                    message = await pubsub.get_message(
                        ignore_subscribe_messages=True, timeout=BLOCK_MS / 1000
                    )
                    if message is None:
                        continue
                    notice = json.loads(message["data"])
                    generation = str(notice["generation"]).encode()
                    if notice["node"] != self.node and generation != self._generation:
                        self._generation = generation
                        log.info("reload notice from node %s", notice["node"])
                        await self._on_reload()
            except asyncio.CancelledError:
                raise
            except (ValueError, KeyError):
                log.warning("a malformed reload notice was ignored")
            except self._errors as exc:
                self._lost(exc)
                await asyncio.sleep(BLOCK_MS / 1000)
            finally:
                with contextlib.suppress(*self._errors):
                    await pubsub.aclose()


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
