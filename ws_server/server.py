"""The server: owns the listening socket, the HTTP seam, sessions, start-up and shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Coroutine
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode
from websockets.http11 import Request, Response

from ws_server import protocol
from ws_server.environments import EnvironmentBuilder, default_cache_dir
from ws_server.exceptions import HandshakeRefused
from ws_server.http_api import HttpApi, chat_model_name
from ws_server.registry import Registry
from ws_server.session import ChatSession
from ws_server.settings import ServerSettings

log = logging.getLogger("anything_agent.server")


class AnythingAgentServer:
    """One listening socket answering WebSocket chat and HTTP, over one registry."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.registry = Registry(
            settings.models_dir,
            EnvironmentBuilder(settings.env_cache_dir or default_cache_dir()),
            sandbox=settings.sandbox,
        )
        self.http = HttpApi(self.registry)
        self.sessions: set[ChatSession] = set()
        self._ws_server: Server | None = None
        self._stopping = asyncio.Event()

    @property
    def port(self) -> int:
        assert self._ws_server is not None
        return int(self._ws_server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        """Load the models, then listen; one broken model never stops the start."""
        await self.registry.reload()
        self._ws_server = await serve(
            self._handle_connection,
            self.settings.host,
            self.settings.port,
            process_request=self._process_request,
            max_size=self.settings.max_frame_size,
            server_header="anything-agent",
        )
        log.info(
            "listening on ws://%s:%d (models dir %s)",
            self.settings.host,
            self.port,
            self.settings.models_dir.resolve(),
        )

    async def run(self) -> None:
        """Start, serve until SIGINT or SIGTERM, then shut down gracefully."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self._on_signal, signum)
        await self.start()
        await self._stopping.wait()
        await self.shutdown()
        # Shut down already: a late signal while the interpreter exits changes nothing.
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
            signal.signal(signum, signal.SIG_IGN)

    def _on_signal(self, signum: int) -> None:
        if self._stopping.is_set():
            log.warning("second %s: cancelling running turns now", signal.Signals(signum).name)
            for session in list(self.sessions):
                session.cancel_now()
            return
        log.info("%s received: shutting down", signal.Signals(signum).name)
        self._stopping.set()

    def stop(self) -> None:
        """Ask ``run`` to shut down (as SIGTERM does)."""
        self._stopping.set()

    async def shutdown(self) -> None:
        """Stop accepting, give running turns the grace period, then cancel them, close
        every connection with 1001, run every ``on_chat_end`` and stop the runners."""
        assert self._ws_server is not None
        grace = self.settings.grace_period
        self._ws_server.close(close_connections=False)
        log.info("stopping: %d open sessions, grace period %g s", len(self.sessions), grace)
        await asyncio.gather(*(s.shutdown(grace) for s in list(self.sessions)))
        await self._ws_server.wait_closed()
        await self.registry.close()
        log.info("stopped")

    # ------------------------------------------------------------------ websockets hooks
    async def _process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        return await self.http.respond(request)

    async def _handle_connection(self, connection: ServerConnection) -> None:
        assert connection.request is not None
        name = chat_model_name(connection.request.path)
        assert name is not None  # process_request only lets chat paths through
        try:
            version = self.registry.acquire(name)
        except HandshakeRefused as exc:  # changed between handshake and now
            await _refuse_open(connection, exc)
            return
        session = ChatSession(connection, version, debug=self.settings.debug)
        self.sessions.add(session)
        try:
            await session.run()
        finally:
            self.sessions.discard(session)
            self.registry.release(version)


async def _refuse_open(connection: ServerConnection, exc: HandshakeRefused) -> None:
    try:
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
