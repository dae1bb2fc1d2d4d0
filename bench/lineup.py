"""The servers a bench run measures, in the order the table lists them.

Every one speaks protocol v1 at ``/v1/chat/{model}`` and streams the bench model's reply
(``{"chunks": N, "size": S}`` → N chunk frames of S characters, then done). AnythingAgent
runs as an operator would start it: its defaults plus ``--no-limits`` (the rate and
connection limits would throttle a load generator on 127.0.0.1); only where it listens and
which models directory it serves are given.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Final

HERE: Final = Path(__file__).resolve().parent
SERVERS_DIR: Final = HERE / "servers"
BENCH_MODEL: Final = HERE / "models" / "bench"
REFERENCE: Final = "websockets"  # every figure is a ratio to this server's, same run


@dataclass(frozen=True)
class ServerSpec:
    """How to start one server, and what to expect of it."""

    key: str  # what --servers and the JSON call it
    label: str  # what the table and chart call it
    command: tuple[str, ...]
    builds_model: bool = False  # isolated: wait until GET /v1/models/bench says ready
    spawns: bool = False  # a process per turn: slow, so latency runs need fewer samples


def _script(name: str, *args: str) -> tuple[str, ...]:
    return (sys.executable, str(SERVERS_DIR / name), *args)


def _anything_agent(models_dir: Path) -> tuple[str, ...]:
    return (
        sys.executable,
        *("-m", "ws_server", "serve", "--port", "0", "--models-dir", str(models_dir)),
        "--no-limits",
    )


def prepare(scratch: Path) -> None:
    """Lay out what the lineup's commands expect in ``scratch``: a copy of the bench model
    whose config.yaml asks for isolation."""
    model = scratch / "isolated-models" / "bench"
    if not model.exists():
        shutil.copytree(BENCH_MODEL, model, ignore=shutil.ignore_patterns("__pycache__"))
        (model / "config.yaml").write_text("isolation: true\n")


def lineup(scratch: Path) -> list[ServerSpec]:
    """Every server, the reference first and the client's ceiling last (``prepare``
    lays out ``scratch`` for them)."""
    return [
        ServerSpec(REFERENCE, "bare websockets", _script("websockets_server.py")),
        ServerSpec("aiohttp", "aiohttp", _script("aiohttp_server.py")),
        ServerSpec("starlette", "Starlette+uvicorn", _script("starlette_server.py")),
        ServerSpec("shared", "AnythingAgent shared", _anything_agent(BENCH_MODEL.parent)),
        ServerSpec(
            "isolated",
            "AnythingAgent isolated",
            _anything_agent(scratch / "isolated-models"),
            builds_model=True,
        ),
        ServerSpec("spawn", "spawn per request", _script("spawn_server.py"), spawns=True),
        ServerSpec(
            "nomodel-1", "no model, 1 write/frame", _script("nomodel_server.py", "--batch", "1")
        ),
        ServerSpec("nomodel", "no model, batched writes", _script("nomodel_server.py")),
    ]


KEYS: Final = tuple(spec.key for spec in lineup(Path()))
