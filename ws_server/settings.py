"""Every server setting in one object, filled from flags and environment variables.

Each ``serve`` option ``--some-name`` can also be set by ``ANYTHING_AGENT_SOME_NAME``
(the flag wins); ``--models-dir`` also reads the seed's ``MODELS_DIR``. This is the only
module that reads the environment.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Final

from ws_server.exceptions import SettingsError

ENV_PREFIX: Final = "ANYTHING_AGENT_"
LOG_LEVELS: Final = ("debug", "info", "warning", "error")
SANDBOX_MODES: Final = ("auto", "on", "off")
API_KEYS_ENV: Final = ENV_PREFIX + "API_KEYS"


@dataclass(frozen=True)
class ServerSettings:
    """What ``anything-agent serve`` runs with; defaults are the documented ones."""

    host: str = "127.0.0.1"
    port: int = 8000
    models_dir: Path = Path("models")
    reload_on_change: bool = False  # watch models_dir, reload on change (registry/watcher.py)
    log_level: str = "info"
    debug: bool = False
    grace_period: float = 10.0
    max_frame_size: int = 1024 * 1024
    env_cache_dir: Path | None = None  # None: ~/.cache/anything-agent/envs
    # --- access (see security.py)
    api_keys_file: Path | None = None
    api_keys: tuple[str, ...] = ()  # from ANYTHING_AGENT_API_KEYS only (never a flag: ps)
    admin_key: str | None = None
    allowed_origins: tuple[str, ...] = ()  # besides the server's own; "*" allows any
    # --- abuse limits (see limits.py); --no-limits lifts the rate and connection ones
    no_limits: bool = False
    max_connections: int = 1024
    max_connections_per_address: int = 64
    max_messages_per_minute: int = 120
    max_history_messages: int = 1000
    max_history_bytes: int = 4 * 1024 * 1024
    handshake_timeout: float = 10.0
    idle_timeout: float = 900.0  # 0: never
    ping_interval: float = 20.0  # 0: no keepalive pings
    ping_timeout: float = 20.0
    sse_keepalive: float = 15.0  # POST /v1/chat/completions: ": ping" after this quiet (0: none)
    # --- resuming (see session/live.py): how long a dropped session waits, what it keeps
    resume_window: float = 30.0  # 0: resume off
    replay_buffer_bytes: int = 1024 * 1024
    # --- several nodes (see store/redis.py): sessions, heartbeats and reloads in Redis
    redis_url: str | None = None  # a secret (it may hold a password): never logged
    node_id: str | None = None  # None: <hostname>-<pid>
    node_ttl: float = 3.0  # seconds a node's heartbeat lives; missed: its sessions move
    # --- isolated models on a Ray cluster (see isolation/ray_link.py): its GCS address
    ray_address: str | None = None
    # --- isolated models' sandbox (bubblewrap): auto uses it where it works
    sandbox: str = "auto"
    # Server variables naming directories every sandboxed worker shares read-write (a
    # model cache, test instrumentation), with their values: set from --sandbox-share.
    sandbox_share: tuple[tuple[str, str], ...] = ()
    # --- processes (see supervisor.py)
    workers: int = 1
    # Set by the supervisor for each server process it runs, never by hand.
    worker_index: int | None = None
    supervisor_fd: int | None = None  # where a process tells the supervisor it reloaded
    supervisor_pid: int | None = None  # whose death takes this process down

    @property
    def auth_enabled(self) -> bool:
        """Whether clients must present an API key."""
        return bool(self.api_keys or self.api_keys_file)


@dataclass(frozen=True)
class _Option:
    flag: str
    parse: Callable[[str], Any]
    help: str
    extra_env: tuple[str, ...] = ()

    @property
    def field(self) -> str:
        return self.flag.removeprefix("--").replace("-", "_")

    @property
    def env(self) -> tuple[str, ...]:
        return (ENV_PREFIX + self.field.upper(), *self.extra_env)


def _positive_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise ValueError("must be zero or more")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError("must be between 0 and 65535")
    return value


def _frame_size(text: str) -> int:
    value = int(text)
    if value < 1024:
        raise ValueError("must be at least 1024 bytes")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError("must be at least 1")
    return value


def _origins(text: str) -> tuple[str, ...]:
    origins = tuple(part.strip().rstrip("/") for part in text.split(",") if part.strip())
    for origin in origins:
        if origin != "*" and "://" not in origin:
            raise ValueError(f"{origin!r} is not an origin like https://chat.example.com")
    return origins


def _sandbox(text: str) -> str:
    if text.lower() not in SANDBOX_MODES:
        raise ValueError(f"must be one of {', '.join(SANDBOX_MODES)}")
    return text.lower()


def _names(text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    for name in names:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ValueError(f"{name!r} is not an environment variable name")
    return names


def _secret(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be empty")
    return text.strip()


def _ray_address(text: str) -> str:
    address = text.strip()
    if not address or any(character.isspace() for character in address):
        raise ValueError("a Ray cluster's address, like 10.0.0.5:6379 (ray start --head's)")
    return address


def _node_id(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", text):
        raise ValueError("a node id is 1-64 characters of A-Z a-z 0-9 _ . : -")
    return text


def _log_level(text: str) -> str:
    if text.lower() not in LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")
    return text.lower()


def _boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("must be true or false")


_SERVE_OPTIONS: Final = (
    _Option("--host", str, "address to listen on"),
    _Option("--port", _port, "port to listen on (0 picks a free one)"),
    _Option("--models-dir", Path, "directory of model directories", ("MODELS_DIR",)),
    _Option("--reload-on-change", _boolean, "watch the models directory, reload on change"),
    _Option("--log-level", _log_level, "debug, info, warning or error"),
    _Option("--debug", _boolean, "add model exception types and messages to error frames"),
    _Option("--grace-period", _positive_float, "seconds running turns get at shutdown"),
    _Option(
        "--max-frame-size",
        _frame_size,
        "largest client frame (close 1009) or HTTP request body (413), in bytes",
    ),
    _Option("--env-cache-dir", Path, "where isolated models' virtualenvs are built and kept"),
    _Option("--api-keys-file", Path, "file of API keys, one a line; clients must send one"),
    _Option("--admin-key", _secret, "key for admin routes such as POST /v1/models/reload"),
    _Option(
        "--allowed-origins",
        _origins,
        "browser origins allowed besides the server's own, comma-separated",
    ),
    _Option("--no-limits", _boolean, "lift rate and connection limits (benchmarks, trusted nets)"),
    _Option("--max-connections", _count, "open connections in total (503 beyond)"),
    _Option("--max-connections-per-address", _count, "open connections per client address (429)"),
    _Option("--max-messages-per-minute", _count, "frames per minute per connection (rate_limited)"),
    _Option("--max-history-messages", _count, "messages kept per session (oldest trimmed)"),
    _Option("--max-history-bytes", _count, "bytes of history kept per session (oldest trimmed)"),
    _Option("--handshake-timeout", _positive_float, "seconds a client has to finish its handshake"),
    _Option("--idle-timeout", _positive_float, "seconds without a frame before closing (0: never)"),
    _Option("--ping-interval", _positive_float, "seconds between keepalive pings (0: none)"),
    _Option("--ping-timeout", _positive_float, "seconds to wait for a pong before dropping"),
    _Option(
        "--sse-keepalive",
        _positive_float,
        "seconds of silence before a streamed chat completion gets ': ping' (0: none)",
    ),
    _Option("--resume-window", _positive_float, "seconds a dropped session waits (0: no resume)"),
    _Option("--replay-buffer-bytes", _count, "bytes of frames kept per session for resumes"),
    _Option("--redis-url", _secret, "Redis for sessions, heartbeats, reloads (several nodes)"),
    _Option("--node-id", _node_id, "this node's name in Redis (default: <hostname>-<pid>)"),
    _Option("--node-ttl", _positive_float, "seconds a node's heartbeat lives in Redis"),
    _Option(
        "--ray-address",
        _ray_address,
        "a Ray cluster (HOST:PORT of its head) that runs isolated models as actors",
    ),
    _Option("--sandbox", _sandbox, "bubblewrap for isolated models: auto, on or off"),
    _Option("--workers", _count, "server processes sharing the port (SO_REUSEPORT)"),
    _Option(
        "--sandbox-share",
        _names,
        "variables naming directories sandboxed models share read-write, comma-separated",
    ),
)


def add_serve_options(parser: argparse.ArgumentParser) -> None:
    """Declare every serve option on ``parser``, documenting its variable and default."""
    # The supervisor's hand-off to each server process it starts (not for people).
    parser.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--supervisor-fd", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--supervisor-pid", type=int, default=None, help=argparse.SUPPRESS)
    defaults = ServerSettings()
    for option in _SERVE_OPTIONS:
        default = getattr(defaults, option.field)
        help_text = f"{option.help} (env {' or '.join(option.env)}; default {default})"
        if option.parse is _boolean:
            parser.add_argument(option.flag, action="store_true", default=None, help=help_text)
        else:
            parser.add_argument(
                option.flag, type=option.parse, default=None, metavar="VALUE", help=help_text
            )


def settings_from(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> ServerSettings:
    """Flags first, then environment variables, then defaults; bad env values are named."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for option in _SERVE_OPTIONS:
        flag_value = getattr(args, option.field, None)
        if flag_value is not None:
            values[option.field] = flag_value
            continue
        for variable in option.env:
            if variable in environ:
                try:
                    values[option.field] = option.parse(environ[variable])
                except ValueError as exc:
                    raise SettingsError(f"{variable}={environ[variable]!r}: {exc}") from None
                break
    for internal in ("worker_index", "supervisor_fd", "supervisor_pid"):
        if getattr(args, internal, None) is not None:
            values[internal] = getattr(args, internal)
    if "sandbox_share" in values:  # the variables' values, read here like every setting
        values["sandbox_share"] = tuple(
            (name, environ.get(name, "")) for name in values["sandbox_share"]
        )
    if API_KEYS_ENV in environ:
        keys = tuple(k.strip() for k in environ[API_KEYS_ENV].split(",") if k.strip())
        if not keys:  # set but empty: a mistake that must not turn authentication off
            raise SettingsError(f"{API_KEYS_ENV} is set but holds no key")
        values["api_keys"] = keys
    known = {f.name for f in fields(ServerSettings)}
    return ServerSettings(**{k: v for k, v in values.items() if k in known})


def models_dir_from(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Path:
    """The models directory for commands other than serve (``check``, ``new``)."""
    environ = os.environ if environ is None else environ
    if getattr(args, "models_dir", None) is not None:
        return Path(args.models_dir)
    for variable in (ENV_PREFIX + "MODELS_DIR", "MODELS_DIR"):
        if variable in environ:
            return Path(environ[variable])
    return ServerSettings().models_dir
