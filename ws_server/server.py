"""The server: owns the listening socket, the HTTP seam, sessions, start-up and shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Coroutine
from functools import partial
from typing import Any, Final, cast

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode
from websockets.http11 import Request, Response

from ws_server import metrics, protocol
from ws_server.exceptions import AdminOnly, HandshakeRefused, ResumeFailed
from ws_server.http import peers
from ws_server.http.exchange import HttpRequest
from ws_server.http.front_door import Entrance
from ws_server.http.limits import ConnectionCounter, RequestRate
from ws_server.http.routes import HttpApi, chat_model_name, error_response
from ws_server.http.security import (
    AccessPolicy,
    key_digest,
    keys_source,
    offered_subprotocols,
    select_subprotocol,
)
from ws_server.isolation import cgroups, sandbox
from ws_server.isolation.environments import EnvironmentBuilder, default_cache_dir
from ws_server.isolation.ray_cluster import RayCluster
from ws_server.loop_watch import LoopWatch
from ws_server.openai_compat.endpoint import ChatCompletions
from ws_server.registry.catalog import ModelVersion, Registry
from ws_server.registry.watcher import ModelsWatcher
from ws_server.session.connection import ChatConnection, ConnectionLimits
from ws_server.session.conversation import Conversation, HistoryLimits
from ws_server.session.handover import Handover
from ws_server.session.idleness import IdleWatch
from ws_server.session.live import LiveSession, digest, new_token
from ws_server.session.outbox import WIRE, Encoding, Outbox
from ws_server.settings import ServerSettings
from ws_server.store.base import SessionRecord, SessionStore
from ws_server.store.memory import MemoryStore
from ws_server.store.redis import RedisStore, default_node_id
from ws_server.supervisor import notify_reloaded

log = logging.getLogger("anything_agent.server")
# At shutdown, how long a peer gets to answer the close before its connection is dropped.
CLOSE_LIMIT: Final = 2.0


class AnythingAgentServer:
    """One listening socket answering WebSocket chat and HTTP, over one registry."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.registry = Registry(
            settings.models_dir,
            EnvironmentBuilder(settings.env_cache_dir or default_cache_dir()),
            sandbox=settings.sandbox,
            sandbox_share=settings.sandbox_share,
            ray=self._ray_cluster(settings),
        )
        self.access = AccessPolicy(settings)  # reads the keys file: a bad one stops the start
        limited = not settings.no_limits
        self.connections = ConnectionCounter(
            settings.max_connections if limited else None,
            settings.max_connections_per_address if limited else None,
        )
        self.connection_limits = ConnectionLimits.from_settings(settings)
        idle_timeout = self.connection_limits.idle_timeout
        self.idle_watch = IdleWatch(idle_timeout) if idle_timeout is not None else None
        self.history_limits = HistoryLimits(
            settings.max_history_messages, settings.max_history_bytes
        )
        self.redis: RedisStore | None = None  # several nodes: sessions shared in Redis
        self.handover: Handover | None = None
        self.store: SessionStore = self._make_store()  # where sessions live between connections
        completions = ChatCompletions(
            self.registry,
            self.access,
            self._open_completion,
            rate=RequestRate(settings.max_messages_per_minute if limited else None),
            keepalive=settings.sse_keepalive,
            max_reply_bytes=settings.max_history_bytes,
        )
        self.http = HttpApi(
            self.registry,
            self.access,
            self.connections,
            on_reload=self._reloaded_here,
            store_status=lambda: self.store.status,
            cluster=self.redis.cluster if self.redis is not None else None,
            completions=completions,
        )
        # Every connection's first stop: WebSocket upgrades go on to websockets, plain
        # HTTP (request bodies, streamed answers) to http/http1.py.
        self.entrance = Entrance(
            self.http.respond,
            body_limit=settings.max_frame_size,
            head_timeout=settings.handshake_timeout,
            refuse=self._from_a_sandbox,
            connections=self.connections,
        )
        metrics.STORE_UP.set_function(lambda: 1.0 if self.store.available else 0.0)
        metrics.count_turns(self.registry.turn_counts)
        metrics.REPLAY_BUFFER_BYTES.set_function(
            lambda: sum(s.conversation.outbox.buffered_bytes for s in self.store.local())
        )
        self._ws_server: Server | None = None
        self._stopping = asyncio.Event()
        self._background: set[asyncio.Task[None]] = set()
        self._loop_watch: LoopWatch | None = None
        self._watcher: ModelsWatcher | None = None  # --reload-on-change

    @staticmethod
    def _ray_cluster(settings: ServerSettings) -> RayCluster | None:
        """With --ray-address, the cluster isolated models go to (connected on first use,
        so a cluster that is down fails those models, not the server)."""
        if settings.ray_address is None:
            return None
        return RayCluster(settings.ray_address, dict(settings.sandbox_share))

    def _make_store(self) -> SessionStore:
        settings = self.settings
        if settings.redis_url is None:
            return MemoryStore()
        node = settings.node_id or default_node_id()
        if settings.node_id and settings.worker_index is not None:
            node = f"{node}-{settings.worker_index}"  # --workers: one node per process
        self.redis = RedisStore(
            settings.redis_url,
            node,
            node_ttl=settings.node_ttl,
            replay_bytes=settings.replay_buffer_bytes,
            revisions=self.registry.serving_revisions,
            on_reload=self._reload_from_cluster,
            window=settings.resume_window,
            frames_per_minute=self.connection_limits.frames_per_minute,
        )
        self.handover = Handover(self.redis, self.registry, self._held_session)
        return self.redis

    @property
    def port(self) -> int:
        assert self._ws_server is not None
        return int(self._ws_server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        """Bind the port, load the models, then listen; one broken model never stops the
        start. Binding comes first: a port already taken fails the start at once, before
        any isolated model's environment is built or worker started."""
        metrics.mark_process(self.settings.worker_index)
        _raise_open_files_limit()
        self._ws_server = await serve(
            self._handle_connection,
            self.settings.host,
            self.settings.port,
            process_request=self._process_request,
            select_subprotocol=select_subprotocol,
            max_size=self.settings.max_frame_size,
            open_timeout=self.settings.handshake_timeout,
            ping_interval=self.settings.ping_interval or None,
            ping_timeout=self.settings.ping_timeout or None,
            # A peer that missed its pong won't answer a close frame either: give up on it
            # as fast as on the pong, so dead peers' sessions end promptly.
            close_timeout=min(10.0, self.settings.ping_timeout or 10.0),
            server_header="anything-agent",
            reuse_port=self.settings.worker_index is not None,  # --workers: share the port
            # No permessage-deflate: chat chunks are small, so it buys little and costs a
            # zlib context per connection; and a stream that compresses well would get past
            # backpressure (a paused reader's TCP window would hold gigabytes of it).
            compression=None,
            start_serving=False,  # bound (so the port is ours), accepting once loaded
            # A documented seam ("a wrapper or a subclass"): a front door per connection.
            create_connection=cast("type[ServerConnection]", self.entrance),
        )
        self._loop_watch = LoopWatch(asyncio.get_running_loop())
        self._loop_watch.start()
        await self.registry.reload()
        if self.redis is not None:
            await self.redis.start()
            log.info("node %s: sessions, heartbeats and reloads shared in Redis", self.redis.node)
        await self._ws_server.start_serving()
        if self.settings.reload_on_change:
            # The registry's reload, not the API's path: no _reloaded_here, which tells the
            # other processes (--workers) and nodes (--redis-url) to reload too. Each of them
            # watches its own models directory, so each reloads itself, once per change.
            self._watcher = ModelsWatcher(self.registry.models_dir, self.registry.reload)
            await self._watcher.start()  # watching before 'listening' is logged
        self._log_protections()
        log.info(
            "%slistening on ws://%s:%d (models dir %s)",
            "" if self.settings.worker_index is None else f"process {self.settings.worker_index} ",
            self.settings.host,
            self.port,
            self.settings.models_dir.resolve(),
        )

    def _release(self, peer: str) -> None:
        metrics.CONNECTIONS.dec()
        self.connections.closed(peer)

    def _log_protections(self) -> None:
        settings = self.settings
        if settings.auth_enabled:
            log.info("API keys required (%s)", keys_source(settings))
        else:
            log.info("no API keys configured: any client that reaches this port may chat")
        if settings.admin_key:
            log.info("admin routes require the admin key")
        else:
            log.info("admin routes accepted from this machine only (no --admin-key)")
        if settings.no_limits:
            log.warning(
                "--no-limits: message rate and connection limits are off; for benchmarks and "
                "trusted networks only"
            )

    async def run(self) -> None:
        """Start, serve until SIGINT or SIGTERM, then shut down gracefully."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self._on_signal, signum)
        loop.add_signal_handler(signal.SIGHUP, self._reload_on_signal)
        await self.start()
        await self._stopping.wait()
        await self.shutdown()
        # Shut down already: a late signal while the interpreter exits changes nothing.
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
            signal.signal(signum, signal.SIG_IGN)

    def _reload_on_signal(self) -> None:
        """SIGHUP: reload the models directory (how the supervisor relays a reload)."""
        if self._stopping.is_set():
            return
        task = asyncio.get_running_loop().create_task(self._reload_from_signal())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _reload_from_signal(self) -> None:
        report = await self.registry.reload()
        log.info("SIGHUP: reloaded %s", report.as_dict())

    async def _reload_from_cluster(self) -> None:
        """Another node reloaded through its API: rescan this node's directory too."""
        if self._stopping.is_set():
            return
        report = await self.registry.reload()
        log.info("cluster reload: %s", report.as_dict())

    def _reloaded_here(self) -> None:
        """A reload through this node's API reaches every node: through Redis where there
        is one (``--workers`` included), else through the supervisor's pipe."""
        if self.redis is None:
            notify_reloaded(self.settings)
            return
        task = asyncio.get_running_loop().create_task(self.redis.publish_reload())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _on_signal(self, signum: int) -> None:
        if self._stopping.is_set():
            log.warning("second %s: cancelling running turns now", signal.Signals(signum).name)
            for session in self.store.local():
                task = session.conversation.cancel_now()
                if task is not None:
                    self._background.add(task)
                    task.add_done_callback(self._background.discard)
            return
        log.info("%s received: shutting down", signal.Signals(signum).name)
        self._stopping.set()

    def stop(self) -> None:
        """Ask ``run`` to shut down (as SIGTERM does)."""
        self._stopping.set()

    async def shutdown(self) -> None:
        """Stop accepting, give running turns the grace period, then cancel them, close
        every connection with 1001, run every ``on_chat_end`` and stop the runners.

        With Redis this is a drain: a turn past the grace period ends with
        ``interrupted``, and each resumable session is released (written out, its
        holder cleared) before its connection closes, so that its client resumes on
        another node at once."""
        if self._watcher is not None:  # first: no reload starts while the models close
            await self._watcher.stop()
        assert self._ws_server is not None
        grace = self.settings.grace_period
        self._ws_server.close(close_connections=False)
        self.entrance.close_idle()
        sessions = self.store.local()
        log.info("stopping: %d open sessions, grace period %g s", len(sessions), grace)
        relays = list(self.redis.relays.values()) if self.redis is not None else []
        await asyncio.gather(
            *(self._shutdown_session(s, grace) for s in sessions),
            *(relay.adapter.close_going_away() for relay in relays),
        )
        try:  # handshakes still in progress, peers that never answer the close
            await asyncio.wait_for(self._closed(), CLOSE_LIMIT)
        except TimeoutError:
            for connection in list(self._ws_server.connections):
                connection.transport.abort()
            self.entrance.abort()
            await self._ws_server.wait_closed()
        await self.registry.close()
        if self.redis is not None:
            await self.redis.close()
        # The workers' cgroups are gone: remove this server's directory (a few blocking
        # system calls, retried while the kernel reaps; not on the loop).
        await asyncio.to_thread(cgroups.close)
        if self._loop_watch is not None:
            self._loop_watch.stop()
        log.info("stopped")

    async def _closed(self) -> None:
        """Every connection gone: WebSocket ones and plain-HTTP ones."""
        assert self._ws_server is not None
        await self._ws_server.wait_closed()
        await self.entrance.wait_closed()

    # ------------------------------------------------------------------ websockets hooks
    async def _process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        """A WebSocket handshake: the route table admits it or answers it (and then the
        connection closes)."""
        asked = HttpRequest("GET", request.path, request.headers, peer=_peer_address(connection))
        answer = await self.http.respond(asked)
        if answer is None:
            return None
        if not isinstance(answer, Response):  # streamed answers take a POST: not here
            answer = error_response(AdminOnly("this route takes no WebSocket handshake"))
        return answer

    def _from_a_sandbox(self, transport: asyncio.Transport) -> bool:
        """Whether a loopback peer is a sandboxed model with network: its host user is
        the sandbox's own (told apart when the server is root; see http/peers.py)."""
        if not self.registry.networked_sandboxes():
            return False
        user = sandbox.host_user()
        if user is None:
            return False
        peer, ours = transport.get_extra_info("peername"), transport.get_extra_info("sockname")
        if not isinstance(peer, tuple) or not peers.is_loopback(str(peer[0])):
            return False
        owner = peers.socket_owner((str(peer[0]), int(peer[1])), (str(ours[0]), int(ours[1])))
        if owner == user[0]:
            log.warning("refused a connection from a networked sandbox to the server's port")
            return True
        return False

    async def _handle_connection(self, connection: ServerConnection) -> None:
        assert connection.request is not None
        headers = connection.request.headers
        name = chat_model_name(connection.request.path)
        assert name is not None  # process_request only lets chat paths through
        offer = protocol.parse_offer(offered_subprotocols(headers))  # checked at handshake
        key = key_digest(headers)
        peer = _peer_address(connection)
        self.connections.opened(peer)
        metrics.CONNECTIONS.inc()
        adapter = ChatConnection(
            connection, self.connection_limits, partial(self._release, peer), self.idle_watch
        )
        try:
            if offer.resume is not None:
                session, problem = await self._resumable(name, key, offer.resume)
                after = offer.resume.after
                if isinstance(session, SessionRecord) and problem is None:
                    assert self.handover is not None  # records come from the Redis store
                    try:
                        await self.handover.resume(adapter, session, after)
                        return
                    except ResumeFailed as exc:
                        problem = exc.message
                        session = None
                elif isinstance(session, LiveSession) and problem is None:
                    frames = await self.store.frames_after(session, after)
                    if frames is not None:
                        await adapter.resume(session, after, frames)
                        await adapter.serve(session)
                        return
                    problem = f"frames after {after} are no longer buffered"
                await self._resume_failed(
                    connection, session if isinstance(session, LiveSession) else None, problem
                )
            opened = await self._open_session(connection, name, key, offer.resumable)
            if opened is not None and await adapter.open(*opened):
                # Served from here, not from a deeper call: an idle session's stack of
                # suspended coroutines is part of what each one costs.
                await adapter.serve(opened[0])
        finally:
            adapter.gone()

    async def _resumable(
        self, name: str, key: str, request: protocol.ResumeRequest
    ) -> tuple[LiveSession | SessionRecord | None, str | None]:
        """The session a resume names (held here or elsewhere), and why it cannot be
        resumed here (None: it can)."""
        session = await self.store.find(digest(request.token))
        if session is None:
            return None, "unknown or expired resume token"
        if isinstance(session, SessionRecord):
            model, owner_key = session.model, session.key_digest
        else:
            model, owner_key = session.conversation.version.name, session.key_digest
        if model != name:
            return session, "the resume token belongs to another model's session"
        if owner_key != key:
            return session, "the resume token was issued to another API key"
        return session, None

    async def _resume_failed(
        self, connection: ServerConnection, session: LiveSession | None, problem: str | None
    ) -> None:
        """``resume_expired`` (no seq); the old session ends; a new one follows."""
        metrics.RESUMES.labels(outcome="expired").inc()
        metrics.ERRORS.labels(code="resume_expired").inc()
        message = f"{problem}; a new session follows (resend your history if you keep one)"
        log.info("resume refused: %s", problem)
        if session is not None:
            attached = session.attachment
            session.end()
            if isinstance(attached, ChatConnection):  # its session is over: so is it
                await attached.replaced()
        try:
            await connection.send(protocol.encode_error("resume_expired", message))
        except ConnectionClosed:
            pass

    async def _open_session(
        self, connection: ServerConnection, name: str, key: str, resumable: bool
    ) -> tuple[LiveSession, str | None] | None:
        """A new session on the version serving ``name``, and its resume token."""
        try:
            version = self.registry.acquire(name)
        except HandshakeRefused as exc:  # changed between handshake and now
            await _refuse_open(connection, exc)
            return None
        window = self.settings.resume_window if resumable and self.store.available else 0.0
        token = new_token() if window > 0 else None
        session = self._held_session(
            version, digest(token) if token is not None else None, key, window
        )
        if not await self.store.add(session):  # Redis went away meanwhile: not resumable
            session.token_digest, session.window, token = None, 0.0, None
            session.conversation.outbox = Outbox(0)
        metrics.SESSIONS.labels(model=version.name).inc()
        return session, token

    async def _open_completion(
        self, version: ModelVersion, encoding: Encoding, session_id: str
    ) -> LiveSession:
        """A short-lived session for one ``POST /v1/chat/completions`` on ``version``."""
        session = self._held_session(
            version, None, "", 0.0, session_id, encoding=encoding, api="openai"
        )
        await self.store.add(session)
        metrics.SESSIONS.labels(model=version.name).inc()
        return session

    def _held_session(
        self,
        version: ModelVersion,
        token_digest: str | None,
        key: str,
        window: float,
        session_id: str | None = None,
        seq: int = 0,
        *,
        encoding: Encoding = WIRE,
        api: str = "ws",
    ) -> LiveSession:
        """A session held by this node: new (seq 0), or taken over from another; a chat's
        (``api`` ``ws``), or an OpenAI-compatible request's, its frames in ``encoding``."""
        replay = self.settings.replay_buffer_bytes if token_digest is not None else 0
        conversation = Conversation(
            version,
            Outbox(replay, seq, encoding),
            limits=self.history_limits,
            debug=self.settings.debug,
            session_id=session_id,
            api=api,
        )
        return LiveSession(
            conversation,
            token_digest=token_digest,
            key_digest=key,
            window=window,
            on_end=self._ended,
        )

    def _ended(self, session: LiveSession) -> None:
        """A session ended (on_chat_end has run): forget it, release its version."""
        conversation = session.conversation
        task = asyncio.get_running_loop().create_task(self.store.remove(session))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        metrics.SESSIONS.labels(model=conversation.version.name).dec()
        self.registry.release(conversation.version)
        conversation.log(
            logging.INFO, "closed after %d turns (code %s)", conversation.turn, session.close_code
        )

    async def _shutdown_session(self, session: LiveSession, grace: float) -> None:
        """Server stopping: a running turn gets the grace period, then is cancelled (or
        interrupted, for a session that moves on); the connection (if any) closes with
        1001; ``on_chat_end`` runs."""
        moving = self.redis is not None and self.redis.moving(session)
        await session.conversation.wind_down(grace, moving=moving)
        if moving and self.redis is not None:
            await self.redis.release(session)
        if isinstance(session.attachment, ChatConnection):
            await session.attachment.close_going_away()
        await session.end("cancelled")


def _raise_open_files_limit() -> None:
    """Every connection is a descriptor: raise the soft limit to the hard one, so that the
    common soft limit of 1024 isn't reached before --max-connections is."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            log.info("open files limit raised from %d to %d", soft, hard)
    except (ImportError, ValueError, OSError):  # not POSIX, or not allowed: keep it
        pass


def _peer_address(connection: ServerConnection) -> str:
    """The client's IP address (what per-address limits and loopback checks use)."""
    address = connection.remote_address
    if isinstance(address, tuple) and address:
        return str(address[0])
    return str(address or "")


async def _refuse_open(connection: ServerConnection, exc: HandshakeRefused) -> None:
    try:
        metrics.ERRORS.labels(code="unavailable").inc()
        await connection.send(protocol.encode_error("unavailable", exc.message))
        await connection.close(CloseCode.TRY_AGAIN_LATER, "model unavailable")
    except ConnectionClosed:
        pass


def run_with_best_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run ``main`` on uvloop where it is installed, else on asyncio's own loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - non-Linux platforms
        asyncio.run(main)
    else:
        uvloop.run(main)
