"""This node among the others sharing a Redis: heartbeats, inboxes, reload notices.

- **Heartbeat.** Every ``--node-ttl``/3 s a node writes its key (living ``--node-ttl``
  seconds, holding the revisions it serves) and reads everyone's: who is alive, and the
  listing's ``cluster`` counts. A node whose key lapsed is gone; its sessions move.
- **Inbox.** One Redis Stream per node, read by one blocking loop: client frames relayed
  to the sessions it holds, notices for the relays it runs. A stream rather than pub/sub
  because a client's frames must not be lost or reordered while the node's connection to
  Redis blips: a stream keeps entries until read (trimmed by length, expiring with the
  node), where pub/sub drops what is published while a subscriber is away.
- **Reloads.** A reload through one node's API is published (pub/sub) with a generation
  counter; a node that missed the notice sees the counter change on its next beat.
- **Availability.** Any failed call marks Redis unavailable (said once per outage); the
  next good beat marks it back. Nothing here ever logs the URL, a secret.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final

from ws_server.exceptions import StoreUnavailable
from ws_server.store import keys

log = logging.getLogger("anything_agent.store")

# redis-py 8 gives every socket read 5 s; blocking reads stay well under it.
SOCKET_TIMEOUT: Final = 5.0
BLOCK_MS: Final = 500
INBOX_LENGTH: Final = 10_000  # entries kept in a node's inbox (it reads them at once)
INBOX_TTL_MS: Final = 60_000
GENERATION_TTL_MS: Final = 7 * 24 * 3600 * 1000
CLOSE_STEP: Final = 2.0  # seconds each step of a shutdown may wait for Redis
POOL_SIZE: Final = 64  # connections to Redis per node (blocking reads hold one each)


def connect(url: str) -> tuple[Any, tuple[type[BaseException], ...]]:
    """A redis-py asyncio client for ``url`` and the errors that mean Redis failed us.

    ``Any``: redis-py types each reply as the union of every client's (sync, async, bytes,
    str), which says nothing here; the replies used are checked where they are read."""
    try:
        import redis.asyncio as aioredis
    except ImportError:  # pragma: no cover - the extra is part of the test install
        raise StoreUnavailable(
            "--redis-url needs redis-py: pip install 'anything-agent[redis]'"
        ) from None
    try:
        # A bounded pool that makes a burst wait for a connection rather than fail (a
        # thousand sessions closing at once, many relays starting).
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=POOL_SIZE,
            timeout=SOCKET_TIMEOUT,
            socket_timeout=SOCKET_TIMEOUT,
            socket_connect_timeout=2.0,
        )
        client = aioredis.Redis(connection_pool=pool)
    except ValueError:  # its message may quote the URL, a secret: not passed on
        raise StoreUnavailable(
            "--redis-url is not a Redis URL (redis://[:PASSWORD@]HOST:PORT/DB, "
            "rediss://… or unix:///PATH)"
        ) from None
    return client, (aioredis.RedisError, OSError)


class ClusterLink:
    """One node's presence in the cluster, and its mailbox."""

    def __init__(
        self,
        redis: Any,
        errors: tuple[type[BaseException], ...],
        node: str,
        node_ttl: float,
        *,
        revisions: Callable[[], dict[str, str]],
        on_reload: Callable[[], Awaitable[None]],
        on_message: Callable[[dict[str, bytes]], None],
        on_beat: Callable[[set[str], bool], Awaitable[None]],
    ) -> None:
        self.redis = redis
        self.errors = errors
        self.node = node
        self.node_ttl = node_ttl
        self._revisions = revisions
        self._on_reload = on_reload
        self._on_message = on_message
        self._on_beat = on_beat  # (live nodes, whether Redis just came back)
        self._available: bool | None = None  # None: not known yet (before the first beat)
        self._generation: bytes | None = None
        self._cluster: dict[str, dict[str, int]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[Any]] = set()

    # ------------------------------------------------------------------ availability
    @property
    def available(self) -> bool:
        return bool(self._available)

    def lost(self, error: BaseException) -> None:
        """A call to Redis failed: unavailable until the next good beat."""
        if self._available is not False:  # said once per outage (and at a start without it)
            log.warning(
                "Redis unreachable (%s): chats go on; new sessions are not resumable "
                "until it is back",
                type(error).__name__,
            )
        self._available = False

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Beat once now (the node is visible before it listens), then keep beating,
        reading the inbox and listening for reloads."""
        await self.beat()
        loop = asyncio.get_running_loop()
        for coroutine in (self._heartbeats(), self._inbox(), self._reloads()):
            self._tasks.append(loop.create_task(coroutine))

    async def close(self) -> None:
        """Stop the loops and leave the cluster at once (no heartbeat to wait out)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.wait(self._tasks, timeout=CLOSE_STEP)
        with contextlib.suppress(TimeoutError, *self.errors):
            await asyncio.wait_for(self._leave(), CLOSE_STEP)

    async def _leave(self) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.delete(keys.node_key(self.node), keys.inbox_key(self.node))
            pipe.srem(keys.NODES, self.node)
            await pipe.execute()

    # ------------------------------------------------------------------ heartbeats
    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.node_ttl / 3)
            await self.beat()

    async def beat(self) -> None:
        """Say this node lives and what it serves; learn who else does; catch up on a
        reload notice missed."""
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
        except self.errors as exc:
            self.lost(exc)
            return
        recovered = self._available is False
        if recovered:
            log.info("Redis reachable again")
        self._available = True
        live = self._see(nodes, beats)
        generation = generation or b"0"
        if self._generation is None:
            self._generation = generation
        elif generation != self._generation:
            self._generation = generation
            log.info("a reload on another node was missed; reloading now")
            self._spawn(self._on_reload())  # not awaited: a beat must never be late
        await self._on_beat(live, recovered)

    def _see(self, nodes: list[str], beats: list[bytes | None]) -> set[str]:
        """The live nodes, and what each serves (the listing's ``cluster``)."""
        live: set[str] = set()
        view: dict[str, dict[str, int]] = {}
        for node, beat in zip(nodes, beats, strict=True):
            if beat is None:
                continue
            live.add(node)
            for model, revision in json.loads(beat).get("revisions", {}).items():
                counts = view.setdefault(model, {})
                counts[revision] = counts.get(revision, 0) + 1
        self._cluster = view
        gone = [node for node in nodes if node not in live]
        if gone:  # their keys lapsed: out of the members' set too
            self._spawn(self._forget(gone))
        return live

    async def _forget(self, nodes: list[str]) -> None:
        with contextlib.suppress(*self.errors):
            await self.redis.srem(keys.NODES, *nodes)

    def cluster(self, model: str) -> dict[str, int]:
        """How many live nodes serve each revision of ``model`` (as of the last beat)."""
        return dict(self._cluster.get(model, {}))

    async def alive(self, node: str) -> bool:
        return bool(await self.redis.exists(keys.node_key(node)))

    # ------------------------------------------------------------------ the inbox
    async def send(self, node: str, message: dict[str, Any]) -> bool:
        """Put ``message`` in ``node``'s inbox; False if Redis could not take it."""
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.xadd(keys.inbox_key(node), message, maxlen=INBOX_LENGTH, approximate=True)
                pipe.pexpire(keys.inbox_key(node), INBOX_TTL_MS)
                await pipe.execute()
        except self.errors as exc:
            self.lost(exc)
            return False
        return True

    async def _inbox(self) -> None:
        inbox = keys.inbox_key(self.node)
        last: bytes | None = None
        while True:
            try:
                if last is None:  # start after a marker of our own: nothing older is ours
                    async with self.redis.pipeline(transaction=True) as pipe:
                        pipe.xadd(inbox, {"op": "hello"}, maxlen=INBOX_LENGTH)
                        pipe.pexpire(inbox, INBOX_TTL_MS)
                        last, _ = await pipe.execute()
                answer = await self.redis.xread({inbox: last}, block=BLOCK_MS, count=256)
            except asyncio.CancelledError:
                raise
            except self.errors as exc:
                self.lost(exc)
                await asyncio.sleep(BLOCK_MS / 1000)
                continue
            for entry_id, fields in answer[0][1] if answer else ():
                last = entry_id
                try:
                    self._on_message({k.decode(): v for k, v in fields.items()})
                except Exception:
                    log.exception("an inbox message could not be handled")

    # ------------------------------------------------------------------ reloads
    async def publish_reload(self) -> None:
        """This node reloaded through its API: every other node reloads too."""
        try:
            async with self.redis.pipeline(transaction=True) as pipe:  # never without a TTL
                pipe.incr(keys.RELOAD_GENERATION)
                pipe.pexpire(keys.RELOAD_GENERATION, GENERATION_TTL_MS)
                generation, _ = await pipe.execute()
            self._generation = str(generation).encode()
            notice = json.dumps({"generation": generation, "node": self.node})
            await self.redis.publish(keys.RELOAD_CHANNEL, notice)
        except self.errors as exc:
            self.lost(exc)
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
            except self.errors as exc:
                self.lost(exc)
                await asyncio.sleep(BLOCK_MS / 1000)
            finally:
                with contextlib.suppress(*self.errors):
                    await pubsub.aclose()

    def _spawn(self, coroutine: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
