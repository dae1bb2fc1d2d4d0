"""config.yaml: its schema, validated with pydantic, and how it is read from disk.

Keys we don't know are kept (the model reads them through ``self.config``); keys we do
know are checked, and any problem becomes a ``ModelLoadError`` naming the file and key.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ws_server import redaction
from ws_server.exceptions import ModelLoadError

CONFIG_FILE: Final = "config.yaml"
NAME_PATTERN: Final = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
NAME_RULE: Final = (
    "use lowercase letters, digits and underscores, starting with a letter (at most 64)"
)
DEFAULT_TIMEOUT: Final = 300.0
_MEMORY_PATTERN: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_PYTHON_VERSION_PATTERN: Final = re.compile(r"^3\.(\d{1,2})$")
# The oldest Python an isolated worker runs on: the SDK (sdk.py) subscripts built-in
# types at run time (``dict[str, str]``, PEP 585), which Python 3.8 refuses; the worker
# and the model loader need nothing newer than 3.9.
MIN_PYTHON: Final = (3, 9)
SUPPORTED_PYTHONS: Final = f"{MIN_PYTHON[0]}.{MIN_PYTHON[1]} or newer"


class Resources(BaseModel):
    """``isolation.resources``: limits for an isolated model's worker."""

    model_config = ConfigDict(extra="allow")

    memory: str | None = None
    cpu: float | None = Field(default=None, gt=0)
    """CPU time, in cores (0.5: half of one core); also pins the worker to that many."""
    pids: int | None = Field(default=None, ge=1)
    """Processes and threads in the worker's whole tree (None: the server's default, 64)."""

    @field_validator("memory", mode="before")
    @classmethod
    def _memory_has_unit(cls, value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str) or not _MEMORY_PATTERN.match(value):
            raise ValueError('must be a size such as "512M" or "1G"')
        return value

    def memory_bytes(self) -> int | None:
        """``memory`` in bytes (K, M, G, T are powers of 1024)."""
        if self.memory is None:
            return None
        match = _MEMORY_PATTERN.match(self.memory)
        assert match is not None  # validated above
        number, unit = float(match.group(1)), (match.group(2) or "B").upper()[:1]
        return int(number * 1024 ** "BKMGT".index(unit))


class Isolation(BaseModel):
    """``isolation``: run the model in its own virtualenv worker (the seed's object form)."""

    model_config = ConfigDict(extra="allow")

    enabled: bool = True
    python_version: str | None = None
    resources: Resources = Field(default_factory=Resources)
    network: bool = False
    placement: Literal["local", "ray"] | None = None
    """Where the worker runs: a local process, or a Ray actor (None: on Ray when the
    server has ``--ray-address``, else local)."""

    @field_validator("python_version", mode="before")
    @classmethod
    def _python_version_shape(cls, value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, float):  # YAML reads 3.10 as the float 3.1
            raise ValueError(
                "must be quoted (YAML reads an unquoted 3.10 as the number 3.1), "
                'e.g. python_version: "3.10"'
            )
        shape = _PYTHON_VERSION_PATTERN.match(value) if isinstance(value, str) else None
        if shape is None:
            written = json.dumps(value, default=str)
            raise ValueError(f'{written} is not a Python version; write it like "3.11"')
        if (3, int(shape.group(1))) < MIN_PYTHON:
            raise ValueError(
                f"Python {value} is not supported: isolated models run on Python "
                f"{SUPPORTED_PYTHONS} (the SDK needs it)"
            )
        return value


class ModelSettings(BaseModel):
    """``settings``: how the server runs the model; unknown keys are the model's own."""

    model_config = ConfigDict(extra="allow")

    timeout: float = Field(default=DEFAULT_TIMEOUT, gt=0)
    """Seconds one turn (and ``on_chat_start``) may take before it ends with ``timeout``."""
    max_sessions: int | None = Field(default=None, ge=1)
    """Sessions open at once; more are refused at the handshake with 503. None: no limit."""


class Concurrency(BaseModel):
    """``concurrency``: the turns of one model version running at once in one server
    process; more wait in a FIFO queue, and past that are refused (``overloaded``)."""

    model_config = ConfigDict(extra="forbid")

    max_turns: int | None = Field(default=None, ge=1)
    """Turns running at once. None: no limit."""
    max_queue: int | None = Field(default=None, ge=0)
    """Turns waiting at most once max_turns run. None: no limit."""


class ModelConfig(BaseModel):
    """The whole config.yaml. Every key is optional; unknown keys are kept."""

    model_config = ConfigDict(extra="allow")

    name: str | None = None
    version: str | None = None
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    settings: ModelSettings = Field(default_factory=ModelSettings)
    isolation: Isolation = Field(default_factory=lambda: Isolation(enabled=False))
    concurrency: Concurrency = Field(default_factory=Concurrency)

    @field_validator("name")
    @classmethod
    def _name_follows_rule(cls, value: str | None) -> str | None:
        if value is not None and not NAME_PATTERN.match(value):
            raise ValueError(f"{value!r} breaks the naming rule: {NAME_RULE}")
        return value

    @field_validator("version", mode="before")
    @classmethod
    def _version_as_text(cls, value: Any) -> Any:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        return value

    @field_validator("isolation", mode="before")
    @classmethod
    def _isolation_shorthand(cls, value: Any) -> Any:
        if value is None or isinstance(value, bool):
            return {"enabled": bool(value)}
        return value

    @property
    def isolated(self) -> bool:
        """Whether the model asks for its own virtualenv worker."""
        return self.isolation.enabled


def resolve_secrets(raw: dict[str, Any], environ: Mapping[str, str] | None = None) -> None:
    """Replace config.yaml's ``secrets:`` entries by their values, in place, and register
    them for redaction.

    An entry is a value (``db_password: "..."``) or ``{env: VARIABLE}``, read from the
    server's environment when the model loads, so the key never sits in the model's
    directory. The model reads ``self.config["secrets"]["NAME"]``; no listing, log line or
    error message shows the values.
    """
    if "secrets" not in raw:
        return
    entries = raw["secrets"]
    if not isinstance(entries, dict):
        raise ModelLoadError(f"{CONFIG_FILE}: secrets: must be a mapping of names to values")
    environ = os.environ if environ is None else environ
    values: dict[str, str] = {}
    for name, entry in entries.items():
        where = f"{CONFIG_FILE}: secrets.{name}"
        if isinstance(entry, dict) and set(entry) == {"env"} and isinstance(entry["env"], str):
            if entry["env"] not in environ:
                raise ModelLoadError(f"{where}: the environment variable {entry['env']} is not set")
            values[str(name)] = environ[entry["env"]]
        elif isinstance(entry, (str, int, float)) and not isinstance(entry, bool):
            values[str(name)] = str(entry)
        else:
            raise ModelLoadError(f"{where}: must be a value or {{env: VARIABLE}}")
    redaction.register(*values.values())
    raw["secrets"] = values


def read_config(model_dir: Path) -> tuple[ModelConfig, dict[str, Any]]:
    """Read and validate ``model_dir/config.yaml``; a missing file means all defaults.

    Returns the validated config and the raw mapping handed to the model as
    ``self.config`` (what the author wrote, unknown keys included, secrets resolved).
    """
    path = model_dir / CONFIG_FILE
    if not path.is_file():
        return ModelConfig(), {}
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{CONFIG_FILE}: cannot be read: {exc}") from None
    raw = load_yaml(text)
    resolve_secrets(raw)
    try:
        config = ModelConfig.model_validate(raw)
    except ValidationError as exc:
        raise ModelLoadError(f"{CONFIG_FILE}: {describe_errors(exc)}") from None
    return config, raw


def asks_for_isolation(model_dir: Path) -> bool:
    """Whether config.yaml asks for isolation, read leniently: for a model whose config.yaml
    fails validation, so that listings still show the mode it asked for (a broken
    ``isolation:`` block is no reason to call it shared)."""
    try:
        raw = yaml.safe_load((model_dir / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    isolation = raw.get("isolation") if isinstance(raw, dict) else None
    if isinstance(isolation, dict):
        return isolation.get("enabled", True) is not False
    return isolation is True


def load_yaml(text: str) -> dict[str, Any]:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ModelLoadError(f"{CONFIG_FILE}: malformed YAML{where}: {problem}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ModelLoadError(
            f"{CONFIG_FILE}: must be a mapping of keys to values, not {type(raw).__name__}"
        )
    # design.md: `version` is shown exactly as written, so 1.10 stays "1.10", not 1.1.
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if (
                key.value == "version"
                and isinstance(value, yaml.ScalarNode)
                and raw.get("version") is not None
            ):
                raw["version"] = value.value
    return raw


def describe_errors(exc: ValidationError) -> str:
    """The first validation problem as ``key.path: message``."""
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"]) or "(top level)"
        message = error["msg"].removeprefix("Value error, ")
        problems.append(f"{where}: {message}")
    return "; ".join(problems)
