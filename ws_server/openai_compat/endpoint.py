"""``POST /v1/chat/completions``: one short-lived session per request.

The request's messages become the session's history and one turn runs on the version
serving at that moment (``on_chat_start``, the turn, ``on_chat_end``), through the same
conversation core as a WebSocket chat: so shared and isolated models, timeouts, errors and
metrics behave the same. A client that disconnects stops the turn (the model's ``finally``
runs). Keys and origins were checked by the route table; this adds the per-address request
rate (its connection was counted against the connection limits when it opened).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from functools import partial

from websockets.http11 import Response

from ws_server import protocol
from ws_server.exceptions import ModelNotFound, ModelNotListed
from ws_server.http.exchange import HttpRequest, ResponseStream, Streamed
from ws_server.http.limits import RequestRate
from ws_server.http.routes import cors_headers
from ws_server.http.security import AccessPolicy
from ws_server.openai_compat import wire
from ws_server.openai_compat.request import CompletionRequest, parse_request
from ws_server.openai_compat.stream import SHUTTING_DOWN, CompletionStream
from ws_server.registry.catalog import ModelVersion, Registry
from ws_server.session.conversation import DISCONNECTED
from ws_server.session.live import LiveSession
from ws_server.session.outbox import Encoding

log = logging.getLogger("anything_agent.openai")

# Opens a session of ``version`` whose frames are encoded by ``encoding``, with that id.
SessionOpener = Callable[[ModelVersion, Encoding, str], Awaitable[LiveSession]]


class ChatCompletions:
    """The route handler of ``POST /v1/chat/completions``."""

    def __init__(
        self,
        registry: Registry,
        access: AccessPolicy,
        open_session: SessionOpener,
        *,
        rate: RequestRate,
        keepalive: float,
        max_reply_bytes: int,
    ) -> None:
        self.registry = registry
        self.access = access
        self.open_session = open_session
        self.rate = rate
        self.keepalive = keepalive
        self.max_reply_bytes = max_reply_bytes
        self._ending: set[asyncio.Task[None]] = set()

    async def __call__(self, request: HttpRequest, params: dict[str, str]) -> Streamed:
        """Check the request (each refusal raises, answered in OpenAI's envelope), pin the
        version that will answer it, and return the reply to run."""
        self.rate.take(request.peer)
        parsed = parse_request(request.body)
        try:
            version = self.registry.acquire(parsed.model)
        except ModelNotFound:
            raise ModelNotListed(
                f"the model {parsed.model!r} does not exist; GET /v1/models lists them"
            ) from None
        # Run by the connection at once, with no wait in between: the pinned version is
        # released when the session it opens ends.
        return Streamed(partial(self._reply, version, parsed, request))

    async def _reply(
        self,
        version: ModelVersion,
        parsed: CompletionRequest,
        request: HttpRequest,
        out: ResponseStream,
    ) -> Response | None:
        origin = self.access.cors_origin(request.headers)
        completion = CompletionStream(
            wire.Reply(version.name, version.revision),
            prompt="\n".join(m["content"] for m in parsed.messages),
            stream=out,
            streaming=parsed.stream,
            include_usage=parsed.include_usage,
            headers=cors_headers(origin) if origin is not None else [],
            max_bytes=self.max_reply_bytes,
        )
        session: LiveSession | None = None
        try:
            session = await self.open_session(version, completion, completion.reply.id)
            return await self._run(session, parsed, request, completion, out)
        finally:
            completion.close()
            if session is None:
                self.registry.release(version)
            else:  # on_chat_end after the answer: the client need not wait for it
                ending = asyncio.ensure_future(session.end(DISCONNECTED))
                self._ending.add(ending)
                ending.add_done_callback(self._ending.discard)

    async def _run(
        self,
        session: LiveSession,
        parsed: CompletionRequest,
        request: HttpRequest,
        completion: CompletionStream,
        out: ResponseStream,
    ) -> Response | None:
        """Start the session, run its one turn, and say what the connection sends then."""
        conversation = session.conversation
        conversation.log(
            logging.INFO,
            "POST /v1/chat/completions from %s (%s)",
            request.peer,
            "streamed" if parsed.stream else "whole",
        )
        completion.keep_alive(self.keepalive)
        failure = await conversation.start(out.gone)
        if failure is not None:
            if out.gone.done():
                return None
            code, message = failure
            if code == DISCONNECTED:  # not the client: the server is stopping
                code, message = "unavailable", SHUTTING_DOWN
            return completion.fail(code, message)
        conversation.outbox.attach(completion)
        await conversation.receive(protocol.ReplaceHistory(parsed.messages, parsed.params))
        turn = conversation.running_turn
        if turn is None:  # refused before it began (the server stopping, a huge message)
            return completion.refused()
        await asyncio.wait({completion.finished, out.gone, turn}, return_when="FIRST_COMPLETED")
        if out.gone.done():
            return None  # the client left: ending the session stops the turn
        if not completion.finished.done():  # the turn ended without its done: a fault
            return completion.fail("internal", "the reply ended unexpectedly")
        return completion.answer()
