"""Plain HTTP on the WebSocket port: the route table and its handlers.

Every request comes here: WebSocket handshakes through websockets' ``process_request``
hook, plain requests through ``http1.py``. A route returns a ``Response``, or a
``Streamed`` one (``POST /v1/chat/completions``); the chat route returns ``None`` to let
the WebSocket handshake proceed, or a refusal with the JSON error body when the model
can't serve. Browsers on the origins of ``--allowed-origins`` get CORS headers, and their
preflights (``OPTIONS``) are answered without a key.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Final, Literal
from urllib.parse import unquote

from websockets.datastructures import Headers
from websockets.http11 import Response

from ws_server import metrics, protocol
from ws_server.exceptions import (
    BadRequest,
    ForbiddenOrigin,
    HandshakeRefused,
    InternalError,
    MalformedHandshake,
    MethodNotAllowed,
    RouteNotFound,
    Unauthorized,
    UpgradeRequired,
)
from ws_server.http.exchange import HttpRequest, Streamed
from ws_server.http.limits import ConnectionCounter
from ws_server.http.security import SAFE_METHODS, AccessPolicy, offered_subprotocols
from ws_server.http.static_files import content_type, resolve_static
from ws_server.registry.catalog import Registry

log = logging.getLogger("anything_agent.http")

CHAT_PATH: Final = re.compile(r"^/v1/chat/([^/]*)$")
COMPLETIONS_PATH: Final = re.compile(r"^/v1/chat/completions$")

Handler = Callable[[HttpRequest, dict[str, str]], Awaitable[Response | Streamed | None]]
# Who may call a route: anyone (the page, health checks), API-key holders, or admins.
Access = Literal["public", "client", "admin"]


@dataclass(frozen=True)
class Route:
    method: str
    pattern: re.Pattern[str]
    handler: Handler
    access: Access
    api: bool = False  # an OpenAI-compatible route: errors in OpenAI's envelope


def path_of(target: str) -> str:
    """The path of a request target (origin form, as a handshake has it), without its
    query; never raises, whatever the client sent."""
    return target.partition("?")[0].partition("#")[0]


def chat_model_name(request_path: str) -> str | None:
    """The model named by a ``/v1/chat/{model}`` path, or ``None`` for other paths."""
    match = CHAT_PATH.match(path_of(request_path))
    return unquote(match.group(1)) if match else None


class HttpApi:
    """Answers the HTTP routes of design.md for one registry, under one access policy."""

    def __init__(
        self,
        registry: Registry,
        access: AccessPolicy,
        connections: ConnectionCounter | None = None,
        on_reload: Callable[[], None] | None = None,
        store_status: Callable[[], str] | None = None,
        cluster: Callable[[str], dict[str, int]] | None = None,
        completions: Handler | None = None,
    ) -> None:
        self.registry = registry
        self.on_reload = on_reload  # after a reload through this API (passed on to other nodes)
        self.store_status = store_status or (lambda: "memory")
        # Nodes serving each revision of a model (None: this node is the only one).
        self.cluster = cluster
        self.access = access
        self.connections = connections or ConnectionCounter(None, None)
        self.routes: tuple[Route, ...] = (
            Route("POST", COMPLETIONS_PATH, completions or self.no_completions, "client", True),
            Route("GET", CHAT_PATH, self.open_chat, "client"),
            Route("GET", re.compile(r"^/v1/models$"), self.list_models, "client"),
            Route("POST", re.compile(r"^/v1/models/reload$"), self.reload, "admin"),
            Route("GET", re.compile(r"^/v1/models/([^/]+)$"), self.get_model, "client"),
            Route("GET", re.compile(r"^/healthz$"), self.healthz, "public"),
            Route("GET", re.compile(r"^/metrics$"), self.metrics, "client"),
            Route("GET", re.compile(r"^/(.*)$"), self.static, "public"),
        )

    async def respond(self, request: HttpRequest) -> Response | Streamed | None:
        """Route one request; ``None`` means: go on with the WebSocket handshake."""
        answer = await self._route(request)
        origin = self.access.cors_origin(request.headers)
        if origin is not None and isinstance(answer, Response):
            _allow_origin(answer, origin)
        return answer

    async def _route(self, request: HttpRequest) -> Response | Streamed | None:
        path = path_of(request.path)
        method = "GET" if request.method == "HEAD" else request.method
        matching = [(r, m) for r in self.routes if (m := r.pattern.match(path)) is not None]
        # A path of its own (no parameter) wins over a pattern that would also take it:
        # GET /v1/models/reload is 405, not a model named "reload".
        exact = [(r, m) for r, m in matching if r.pattern.groups == 0]
        matching = exact or matching
        api = any(route.api for route, _ in matching)
        try:
            allowed = [route.method for route, _ in matching]
            for route, match in matching:
                if route.method != method:
                    continue
                self._admit(request, route)
                params = {str(i): unquote(g) for i, g in enumerate(match.groups(), 1)}
                if route.handler == self.open_chat:
                    self.connections.check(request.peer)
                return await route.handler(request, params)
            if allowed and request.method == "OPTIONS":
                return self._preflight(request, allowed)
            if allowed:
                raise MethodNotAllowed(f"{request.method} is not allowed on {path}", allowed)
            raise RouteNotFound(f"nothing at {path}")
        except HandshakeRefused as exc:
            if "websocket" in request.headers.get("Upgrade", "").lower():
                metrics.HANDSHAKE_REFUSALS.labels(status=str(exc.http_status)).inc()
            return error_response(exc, api)
        except Exception:
            log.exception("%s %s failed", request.method, path[:200])
            return error_response(InternalError("internal server error"), api)

    def _admit(self, request: HttpRequest, route: Route) -> None:
        """Origin first (a browser on another site gets nowhere), then the key."""
        upgrade = "websocket" in request.headers.get("Upgrade", "").lower()
        if upgrade or request.method not in SAFE_METHODS:
            self.access.check_origin(request.headers)
        if route.access == "client":
            self.access.check_client(request.headers)
        elif route.access == "admin":
            self.access.check_admin(request.headers, request.peer)

    def _preflight(self, request: HttpRequest, allowed: list[str]) -> Response:
        """``OPTIONS``: a browser asks whether it may send its request. Answered for the
        origins allowed, without a key (browsers never send one with a preflight)."""
        methods = ", ".join(dict.fromkeys([*allowed, "OPTIONS"]))
        answer = response(HTTPStatus.NO_CONTENT, b"", "text/plain")
        del answer.headers["Content-Length"]  # a 204 has none
        del answer.headers["Content-Type"]
        answer.headers["Allow"] = methods
        if "Origin" not in request.headers:
            return answer
        origin = self.access.cors_origin(request.headers)
        if origin is None:
            raise ForbiddenOrigin(
                f"origin {request.headers['Origin'][:200]!r} is not allowed; the server's "
                "operator can add it with --allowed-origins"
            )
        answer.headers["Access-Control-Allow-Methods"] = methods
        asked = request.headers.get("Access-Control-Request-Headers", "")
        granted = [h for h in (n.strip().lower() for n in asked.split(",")) if cors_header(h)]
        if granted:
            answer.headers["Access-Control-Allow-Headers"] = ", ".join(granted)
        answer.headers["Access-Control-Max-Age"] = "600"
        return answer

    # ------------------------------------------------------------------ routes
    async def no_completions(self, request: HttpRequest, params: dict[str, str]) -> Response:
        raise RouteNotFound("this server has no chat completions endpoint")

    async def open_chat(self, request: HttpRequest, params: dict[str, str]) -> Response | None:
        try:
            protocol.parse_offer(offered_subprotocols(request.headers))
        except BadRequest as exc:
            raise MalformedHandshake(exc.message) from None
        self.registry.serving_version(params["1"])  # raises 404 / 503 with the reason
        if "websocket" not in request.headers.get("Upgrade", "").lower():
            raise UpgradeRequired(
                f"/v1/chat/{params['1']} is a WebSocket endpoint: connect with a WebSocket "
                "client, e.g. wscat -c ws://HOST:PORT/v1/chat/MODEL"
            )
        return None

    async def list_models(self, request: HttpRequest, params: dict[str, str]) -> Response:
        rows = [self._with_cluster(row) for row in self.registry.list_models()]
        return json_response({"object": "list", "data": rows})

    async def get_model(self, request: HttpRequest, params: dict[str, str]) -> Response:
        info = self.registry.model_info(params["1"])
        if info is None:
            raise RouteNotFound(f"no model named {params['1']!r}; GET /v1/models lists them")
        return json_response(self._with_cluster(info))

    def _with_cluster(self, row: dict[str, Any]) -> dict[str, Any]:
        """A listing row with ``cluster``: how many nodes serve each revision of it."""
        if self.cluster is not None:
            row["cluster"] = self.cluster(row["id"])
        else:
            serving = row["revision"] if row["status"] == "ready" else None
            row["cluster"] = {serving: 1} if serving else {}
        return row

    async def reload(self, request: HttpRequest, params: dict[str, str]) -> Response:
        report = await self.registry.reload()
        if self.on_reload is not None:
            self.on_reload()
        return json_response(report.as_dict())

    async def healthz(self, request: HttpRequest, params: dict[str, str]) -> Response:
        return json_response(
            {
                "status": "ok",
                "models": self.registry.status_counts(),
                "store": self.store_status(),
            }
        )

    async def metrics(self, request: HttpRequest, params: dict[str, str]) -> Response:
        body, media_type = metrics.exposition()
        return response(HTTPStatus.OK, body, media_type)

    async def static(self, request: HttpRequest, params: dict[str, str]) -> Response:
        path = resolve_static(params["1"])
        if path is None:
            raise RouteNotFound(f"nothing at /{params['1']}")
        return response(HTTPStatus.OK, path.read_bytes(), content_type(path))


def response(status: HTTPStatus, body: bytes, media_type: str) -> Response:
    """A complete HTTP response; the connection closes after it."""
    headers = Headers(
        [
            ("Content-Type", media_type),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"),
            # The listing, health, admin and page routes answer one request per
            # connection, as they always have (clients reading to the end rely on it);
            # chat completions keep theirs open for the next request (openai_compat).
            ("Connection", "close"),
        ]
    )
    return Response(status.value, status.phrase, headers, body)


def json_response(payload: Any, status: HTTPStatus = HTTPStatus.OK) -> Response:
    body = json.dumps(payload, ensure_ascii=False, indent=None).encode()
    return response(status, body, "application/json")


def error_response(exc: HandshakeRefused, api: bool = False) -> Response:
    """The JSON error body (OpenAI's envelope for ``api`` routes), with ``Retry-After``
    when it is worth trying again later (a model building, a rate limit)."""
    status = HTTPStatus(exc.http_status)
    if api:
        body = protocol.encode_api_error(exc.code, exc.message, status.value, exc.param)
    else:
        body = protocol.encode_http_error(exc.code, exc.message)
    result = response(status, body, "application/json")
    if isinstance(exc, UpgradeRequired):
        result.headers["Upgrade"] = "websocket"
    if isinstance(exc, MethodNotAllowed):
        result.headers["Allow"] = ", ".join(exc.allowed)
    if exc.retry_after is not None:
        result.headers["Retry-After"] = str(exc.retry_after)
    if isinstance(exc, Unauthorized):
        result.headers["WWW-Authenticate"] = 'Bearer realm="anything-agent"'
    return result


def cors_header(name: str) -> bool:
    """Whether a browser on an allowed origin may send request header ``name`` (lower
    case): what the OpenAI SDK and chat UIs send, its ``x-stainless-*`` ones included."""
    return name in CORS_HEADERS or name.startswith("x-stainless-")


CORS_HEADERS: Final = frozenset(
    (
        "authorization",
        "content-type",
        "accept",
        "openai-organization",
        "openai-project",
        "openai-beta",
        "x-requested-with",
        "sec-websocket-protocol",
    )
)


def cors_headers(origin: str) -> list[tuple[str, str]]:
    """The CORS headers of an answer to a browser on an allowed origin."""
    return [
        ("Access-Control-Allow-Origin", origin),
        ("Vary", "Origin"),
        ("Access-Control-Expose-Headers", "Retry-After"),
    ]


def _allow_origin(answer: Response, origin: str) -> None:
    for name, value in cors_headers(origin):
        answer.headers[name] = value
