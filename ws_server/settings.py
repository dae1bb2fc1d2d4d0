"""Every server setting in one object, filled from flags and environment variables.

Each ``serve`` option ``--some-name`` can also be set by ``ANYTHING_AGENT_SOME_NAME``
(the flag wins); ``--models-dir`` also reads the seed's ``MODELS_DIR``. This is the only
module that reads the environment.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Final

from ws_server.exceptions import SettingsError

ENV_PREFIX: Final = "ANYTHING_AGENT_"
LOG_LEVELS: Final = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class ServerSettings:
    """What ``anything-agent serve`` runs with; defaults are the documented ones."""

    host: str = "127.0.0.1"
    port: int = 8000
    models_dir: Path = Path("models")
    log_level: str = "info"
    debug: bool = False
    grace_period: float = 10.0
    max_frame_size: int = 1024 * 1024
    env_cache_dir: Path | None = None  # None: ~/.cache/anything-agent/envs


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
    _Option("--log-level", _log_level, "debug, info, warning or error"),
    _Option("--debug", _boolean, "add model exception types and messages to error frames"),
    _Option("--grace-period", _positive_float, "seconds running turns get at shutdown"),
    _Option("--max-frame-size", _frame_size, "largest client frame in bytes (close 1009)"),
    _Option("--env-cache-dir", Path, "where isolated models' virtualenvs are built and kept"),
)


def add_serve_options(parser: argparse.ArgumentParser) -> None:
    """Declare every serve option on ``parser``, documenting its variable and default."""
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
