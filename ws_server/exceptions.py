"""Every error the server and the Python client raise.

Server side: code that refuses something raises an ``AnythingAgentError``; the server turns
``code`` into an ``error`` frame and ``http_status`` into a handshake refusal. Client side
(``ws_server.client``): a ``ClientError`` says what the server answered. Nothing matches
on messages.
"""

from __future__ import annotations


class AnythingAgentError(Exception):
    """Base of all AnythingAgent errors; ``code`` is the wire error code it maps to."""

    code: str = "internal"
    http_status: int = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class SettingsError(AnythingAgentError):
    """A server option (flag or environment variable) has an invalid value."""


class CgroupUnavailable(AnythingAgentError):
    """No cgroup can be created for a worker here; it runs with per-process limits."""


class StoreUnavailable(SettingsError):
    """The session store a setting asks for cannot be used (``--redis-url`` without
    redis-py installed, or a URL that is not one); the server does not start."""


class ResumeFailed(AnythingAgentError):
    """A session held by another node cannot be carried on here (it ended there, its
    frames are gone, its model cannot run here); the client gets ``resume_expired``."""

    code = "resume_expired"


class ModelLoadError(AnythingAgentError):
    """A model directory could not be turned into a servable model.

    ``message`` names the file and the problem (``config.yaml: parameters: Input should be
    a valid dictionary``); it is public, shown in the model list. When the cause is the
    model's own exception, whose text may hold secrets, ``detail`` carries that text for
    the log and for ``anything-agent check`` only.
    """

    def __init__(self, message: str, detail: str | None = None) -> None:
        super().__init__(message)
        self.detail = detail


class ClusterUnreachable(ModelLoadError):
    """The Ray cluster a model is placed on cannot be reached: the model is ``failed``,
    and the next reload tries again even if the model did not change."""


# --------------------------------------------------------------------- handshake
class HandshakeRefused(AnythingAgentError):
    """A WebSocket handshake or HTTP request is answered with an error status; ``param``
    names the request field at fault, where there is one (OpenAI's error envelope)."""

    param: str | None = None
    retry_after: int | None = None  # seconds, sent as Retry-After


class ModelNotFound(HandshakeRefused):
    """No model of that name exists (never did, or was removed and has drained)."""

    code = "not_found"
    http_status = 404


class ModelUnavailable(HandshakeRefused):
    """The model exists but cannot take sessions now: building, failed or draining."""

    code = "unavailable"
    http_status = 503

    def __init__(self, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ModelNotListed(ModelNotFound):
    """An OpenAI-compatible request names a model that does not exist (OpenAI's own code)."""

    code = "model_not_found"
    param = "model"


class InvalidRequest(HandshakeRefused):
    """An HTTP request's body is not what the route takes; ``param`` names the field."""

    code = "bad_request"
    http_status = 400

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class PayloadTooLarge(HandshakeRefused):
    """An HTTP request's body is over ``--max-frame-size``."""

    code = "bad_request"
    http_status = 413


class TooManyRequests(HandshakeRefused):
    """One client address sent more requests than ``--max-messages-per-minute`` allows."""

    code = "rate_limited"
    http_status = 429

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RouteNotFound(HandshakeRefused):
    """No HTTP route matches the request path."""

    code = "not_found"
    http_status = 404


class MalformedHandshake(HandshakeRefused):
    """A handshake's subprotocol entries are malformed (a bad ``resume.`` entry)."""

    code = "bad_request"
    http_status = 400


class UpgradeRequired(HandshakeRefused):
    """A plain HTTP request reached the WebSocket chat endpoint."""

    code = "upgrade_required"
    http_status = 426


class MethodNotAllowed(HandshakeRefused):
    """The route exists but not for this HTTP method; ``allowed`` are the ones it takes."""

    code = "method_not_allowed"
    http_status = 405

    def __init__(self, message: str, allowed: list[str]) -> None:
        super().__init__(message)
        self.allowed = [*dict.fromkeys(allowed), "HEAD"] if "GET" in allowed else allowed


class InternalError(HandshakeRefused):
    """A route failed for a reason of ours (logged with its traceback)."""

    code = "internal"
    http_status = 500


class Unauthorized(HandshakeRefused):
    """No API key, or a wrong one, where the server requires one."""

    code = "unauthorized"
    http_status = 401


class ForbiddenOrigin(HandshakeRefused):
    """A browser on another site tried to use this server (cross-site hijacking, CSRF)."""

    code = "forbidden_origin"
    http_status = 403


class AdminOnly(HandshakeRefused):
    """An admin route was called from another machine while no admin key is set."""

    code = "forbidden"
    http_status = 403


class TooManyConnections(HandshakeRefused):
    """The server holds as many connections as ``--max-connections`` allows."""

    code = "unavailable"
    http_status = 503


class TooManyFromAddress(HandshakeRefused):
    """One client address holds as many connections as ``--max-connections-per-address``."""

    code = "rate_limited"
    http_status = 429


class ModelAtCapacity(HandshakeRefused):
    """The model has as many open sessions as its ``settings.max_sessions``."""

    code = "unavailable"
    http_status = 503


# --------------------------------------------------------------------- in session
class BadRequest(AnythingAgentError):
    """A client frame is not valid protocol v1; the session goes on."""

    code = "bad_request"


class Busy(AnythingAgentError):
    """A turn was requested while another one is running in the same session."""

    code = "busy"


class RateLimited(AnythingAgentError):
    """The connection sent more frames a minute than ``--max-messages-per-minute``."""

    code = "rate_limited"
    retry_after: float = 0.0  # seconds until the next frame would be taken


class Overloaded(AnythingAgentError):
    """A model version is running its ``concurrency.max_turns`` and its queue is full;
    ``retry_after`` estimates the seconds until there is room."""

    code = "overloaded"
    http_status = 503

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ServerUnavailable(AnythingAgentError):
    """The server is shutting down and starts no new turns."""

    code = "unavailable"


class ModelFailed(AnythingAgentError):
    """The model's own code raised (in a worker); the client sees a generic message and the
    log gets ``message``, which carries the worker's traceback."""

    code = "model_error"


class WorkerCrashed(AnythingAgentError):
    """An isolated model's worker process died; a new one is starting (or it is failed)."""

    code = "model_crashed"


class ResourceExhausted(AnythingAgentError):
    """A turn went past the model's memory limit; its worker is replaced."""

    code = "resource_exhausted"


# --------------------------------------------------------------------- Python client
class ClientError(Exception):
    """Base of the errors ``ws_server.client`` raises; ``message`` says what happened."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ChatRefused(ClientError):
    """The server refused the WebSocket handshake (unknown model, not ready, auth, limits).

    ``status`` is the HTTP status; ``code`` and the message come from its JSON body;
    ``retry_after`` (seconds) is set while the model is building. ``status`` is 0 when
    nothing answered at all (no server at that address).
    """

    def __init__(
        self, message: str, *, status: int, code: str, retry_after: int | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.retry_after = retry_after


class ServerError(ClientError):
    """The server sent an ``error`` frame: ``code`` is a protocol error code;
    ``retry_after`` the seconds an ``overloaded`` model asks to wait before trying again."""

    def __init__(
        self, message: str, *, code: str, turn: int | None = None, retry_after: int | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.turn = turn
        self.retry_after = retry_after


class TurnFailed(ServerError):
    """A turn ended with ``done`` reason ``error`` or ``timeout``; ``reason`` says which
    and ``partial`` holds what the model yielded before."""

    def __init__(self, message: str, *, code: str, turn: int, reason: str, partial: str) -> None:
        super().__init__(message, code=code, turn=turn)
        self.reason = reason
        self.partial = partial


class ConnectionLost(ClientError):
    """The connection closed while the client expected more (``close_code`` says how)."""

    def __init__(self, message: str, *, close_code: int | None = None) -> None:
        super().__init__(message)
        self.close_code = close_code


class ProtocolViolation(ClientError):
    """The server sent something that is not protocol v1."""
