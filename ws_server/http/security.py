"""Who may talk to the server: API keys, the admin key and the browser origins allowed.

Clients present a key as ``Authorization: Bearer KEY``. Browsers cannot set headers on a
WebSocket, so the web client offers it as a WebSocket subprotocol instead:
``Sec-WebSocket-Protocol: anything-agent.v1, bearer.<base64url(KEY)>``. The server selects
only ``anything-agent.v1``, so the key is never echoed back; being a header, it stays out
of URLs and so out of access logs and browser history. Keys are compared as SHA-256 digests
in constant time, and never logged.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import logging
from collections.abc import Iterable, Sequence
from typing import Final
from urllib.parse import urlsplit

from websockets.datastructures import Headers
from websockets.typing import Subprotocol

from ws_server import redaction
from ws_server.exceptions import AdminOnly, ForbiddenOrigin, SettingsError, Unauthorized
from ws_server.settings import ServerSettings

log = logging.getLogger("anything_agent.security")

SUBPROTOCOL: Final = Subprotocol("anything-agent.v1")
KEY_PROTOCOL_PREFIX: Final = "bearer."
_LOOPBACK_NAMES: Final = ("localhost", "127.0.0.1", "::1", "[::1]")
SAFE_METHODS: Final = ("GET", "HEAD")  # change nothing, so need no origin check


def select_subprotocol(connection: object, offered: Sequence[Subprotocol]) -> Subprotocol | None:
    """websockets' hook: agree on ``anything-agent.v1`` when offered (the web client does),
    and never pick the ``bearer.`` entry, which carries the key."""
    return SUBPROTOCOL if SUBPROTOCOL in offered else None


def offered_subprotocols(headers: Headers) -> list[str]:
    """Every entry of the request's ``Sec-WebSocket-Protocol`` headers, in order."""
    return [
        entry.strip()
        for header in headers.get_all("Sec-WebSocket-Protocol")
        for entry in header.split(",")
        if entry.strip()
    ]


def key_digest(headers: Headers) -> str:
    """The SHA-256 of the API key a request presents ("" for none): what a resumable
    session keeps, so that only the same key may resume it."""
    key = presented_key(headers)
    return hashlib.sha256(key.encode()).hexdigest() if key else ""


def key_protocol(key: str) -> str:
    """The subprotocol entry that carries ``key`` (what the web client sends)."""
    return KEY_PROTOCOL_PREFIX + base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")


def presented_key(headers: Headers) -> str | None:
    """The key a request carries: ``Authorization: Bearer``, else a ``bearer.`` subprotocol.
    Two ``Authorization`` headers are refused rather than guessed between."""
    found = headers.get_all("Authorization")
    if len(found) > 1:
        raise Unauthorized("more than one Authorization header")
    authorization = found[0] if found else ""
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    for header in headers.get_all("Sec-WebSocket-Protocol"):
        for entry in header.split(","):
            entry = entry.strip()
            if entry.startswith(KEY_PROTOCOL_PREFIX):
                encoded = entry.removeprefix(KEY_PROTOCOL_PREFIX)
                padded = encoded + "=" * (-len(encoded) % 4)
                try:
                    key = base64.b64decode(padded, altchars=b"-_", validate=True).decode()
                except (binascii.Error, UnicodeDecodeError, ValueError):
                    return None
                return key or None
    return None


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _matches(key: str | None, digests: Iterable[bytes]) -> bool:
    if key is None:
        return False
    presented = _digest(key)
    found = False
    for digest in digests:  # every one compared, so timing says nothing about which
        found |= hmac.compare_digest(presented, digest)
    return found


def is_loopback(address: str) -> bool:
    """Whether a peer address is this machine."""
    try:
        return ipaddress.ip_address(address.split("%")[0]).is_loopback
    except ValueError:
        return address == "localhost"


class AccessPolicy:
    """Decides, per request, whether the key and the origin are acceptable."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self._keys_file = settings.api_keys_file
        self._file_stamp: tuple[float, int] | None = None
        self._file_digests: list[bytes] = []
        self._env_digests = [_digest(k) for k in settings.api_keys]
        self._admin_digest = [_digest(settings.admin_key)] if settings.admin_key else []
        redaction.register(
            *settings.api_keys, *([settings.admin_key] if settings.admin_key else [])
        )
        self._origins = {o.lower() for o in settings.allowed_origins}
        self._loopback_only_host = settings.host in _LOOPBACK_NAMES or is_loopback(settings.host)
        if self._keys_file is not None:
            self._read_keys_file()  # a bad file stops the start, with its name

    @property
    def auth_enabled(self) -> bool:
        return self.settings.auth_enabled

    def _read_keys_file(self) -> None:
        """(Re)read the keys file when it changed, so keys rotate without a restart."""
        assert self._keys_file is not None
        try:
            stat = self._keys_file.stat()
            stamp = (stat.st_mtime, stat.st_size)
            if stamp == self._file_stamp:
                return
            lines = self._keys_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            if self._file_stamp is None:
                raise SettingsError(f"--api-keys-file {self._keys_file}: {exc}") from None
            if self._file_digests:  # fail closed: a deleted file revokes its keys
                log.error(
                    "cannot read %s (%s): its keys are no longer accepted", self._keys_file, exc
                )
            self._file_digests, self._file_stamp = [], (0.0, -1)
            return
        keys = [k for k in (line.strip() for line in lines) if k and not k.startswith("#")]
        if not keys and self._file_stamp is None:
            raise SettingsError(f"--api-keys-file {self._keys_file}: holds no keys")
        if not keys:
            log.warning("%s holds no keys now: no key of it is accepted", self._keys_file)
        redaction.register(*keys)
        self._file_digests = [_digest(k) for k in keys]
        self._file_stamp = stamp
        log.info("API keys: %d read from %s", len(keys), self._keys_file)

    def _client_digests(self) -> list[bytes]:
        if self._keys_file is not None:
            self._read_keys_file()
        return [*self._env_digests, *self._file_digests, *self._admin_digest]

    # ------------------------------------------------------------------ checks
    def check_client(self, headers: Headers) -> None:
        """Raise ``Unauthorized`` when keys are required and none of them was presented."""
        if not self.auth_enabled:
            return
        key = presented_key(headers)
        if key is None:
            raise Unauthorized(
                "this server requires an API key: send Authorization: Bearer KEY "
                "(browsers: the web client asks for it)"
            )
        if not _matches(key, self._client_digests()):
            raise Unauthorized("the API key is not valid")

    def check_admin(self, headers: Headers, peer: str) -> None:
        """Admin routes: the admin key when one is set; otherwise callers on this machine
        only (with an API key as well when keys are required)."""
        if self._admin_digest:
            if not _matches(presented_key(headers), self._admin_digest):
                raise Unauthorized("this route requires the admin key (Authorization: Bearer)")
            return
        if not is_loopback(peer):
            raise AdminOnly(
                "admin routes are accepted only from this machine unless an admin key is "
                "set (--admin-key)"
            )
        self.check_client(headers)

    def check_origin(self, headers: Headers) -> None:
        """Refuse browser requests from other sites (cross-site WebSocket hijacking, CSRF).

        No ``Origin`` (wscat, bots, curl) is fine; so is the server's own origin and any in
        ``--allowed-origins``. When the server listens on loopback, its own origin must name
        a loopback host too, which defeats DNS rebinding.
        """
        origins = headers.get_all("Origin")
        if not origins:
            return
        if len(origins) > 1:
            raise ForbiddenOrigin("more than one Origin header")
        origin = origins[0]
        normalised = origin.strip().rstrip("/").lower()
        if "*" in self._origins or normalised in self._origins:
            return
        hosts = headers.get_all("Host")
        if len(hosts) == 1 and self._is_own_origin(normalised, hosts[0]):
            return
        raise ForbiddenOrigin(
            f"origin {origin[:200]!r} is not allowed; the server's operator can add it with "
            "--allowed-origins"
        )

    def cors_origin(self, headers: Headers) -> str | None:
        """The ``Origin`` to grant in CORS headers: one of ``--allowed-origins`` (any,
        with ``*``); None for none (the server's own pages need no CORS)."""
        origins = headers.get_all("Origin")
        if len(origins) != 1 or not self._origins:
            return None
        origin = origins[0].strip()
        if not origin.isascii() or not origin.isprintable():
            return None  # no origin is spelt so; and it would go back in a header
        allowed = "*" in self._origins or origin.rstrip("/").lower() in self._origins
        return origin if allowed else None

    def _is_own_origin(self, origin: str, host: str) -> bool:
        try:
            parts = urlsplit(origin)
        except ValueError:  # "http://[" and the like: not an origin at all
            return False
        if parts.scheme not in ("http", "https") or not host:
            return False
        if parts.netloc != host.strip().lower():
            return False
        return not self._loopback_only_host or (parts.hostname or "") in _LOOPBACK_NAMES


def keys_source(settings: ServerSettings) -> str:
    """Where the keys came from, for the start-up log (never the keys themselves)."""
    sources = []
    if settings.api_keys:
        sources.append(f"{len(settings.api_keys)} from ANYTHING_AGENT_API_KEYS")
    if settings.api_keys_file:
        sources.append(f"the file {settings.api_keys_file}")
    return " and ".join(sources) or "none"
