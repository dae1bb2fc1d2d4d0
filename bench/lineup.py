"""The servers a bench run measures, in the order the table lists them.

Every one speaks protocol v1 at ``/v1/chat/{model}`` and streams the bench model's reply
(``{"chunks": N, "size": S}`` → N chunk frames of S characters, then done). AnythingAgent
runs as an operator would start it: its defaults plus ``--no-limits`` (the rate and
connection limits would throttle a load generator on 127.0.0.1); only where it listens and
which models directory it serves are given.

The "workers2" row is the shared row's server with ``--workers 2``: a supervisor (no event
loop, no model) and two server processes listening on one port (``SO_REUSEPORT``; the
supervisor reserves the port, so ``--port 0`` works and every process logs the same one).
Like every server it is started on one CPU, and its children inherit that: the row shows
what a second process costs on one core, not what a second core would give.

Four AnythingAgent rows differ from the others in what is measured rather than how: the
"resumable" row is the same server driven by clients that offer the ``resumable``
subprotocol entry (so every frame is numbered and kept in a replay buffer), the "redis"
row is that again with its sessions in a Redis the runner starts (``--redis-url``, given
by the environment: a redis-server on a unix socket in the scratch directory), the "ray"
row is the "isolated" one with its model placed as an actor on a private single-node Ray
cluster the runner starts (``--ray-address``, given by the environment once the head is
up: ``ws_server.deploy.ray_head.RayHead`` on loopback, in the scratch directory), and the
"before" row is the server as it was at ``BEFORE`` (before sessions could outlive their
connection), run from a copy of that commit's tree with the same virtualenv.

The SSE mode has servers of its own (``sse_lineup``): AnythingAgent as above, driven both
through its WebSocket chat and through ``POST /v1/chat/completions`` with ``stream: true``,
and a minimal Starlette+uvicorn server streaming the same ``chat.completion.chunk`` events.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from ws_server.deploy.redis_server import RedisServer

HERE: Final = Path(__file__).resolve().parent
SERVERS_DIR: Final = HERE / "servers"
BENCH_MODEL: Final = HERE / "models" / "bench"
REFERENCE: Final = "websockets"  # every figure is a ratio to this server's, same run
BEFORE: Final = "cd360c5"  # "Group ws_server by role": the server before resumable sessions
SUBPROTOCOL: Final = "anything-agent.v1"
RESUMABLE: Final = (SUBPROTOCOL, "resumable")  # what a client that can resume offers
RAY_ADDRESS: Final = "ANYTHING_AGENT_RAY_ADDRESS"  # serve --ray-address, from the environment


@dataclass(frozen=True)
class ServerSpec:
    """How to start one server, and what to expect of it."""

    key: str  # what --servers and the JSON call it
    label: str  # what the table and chart call it
    command: tuple[str, ...]
    builds_model: bool = False  # isolated: wait until GET /v1/models/bench says ready
    spawns: bool = False  # a process per turn: slow, so latency runs need fewer samples
    offers: tuple[str, ...] = ()  # subprotocol entries its clients offer
    env: dict[str, str] = field(default_factory=dict)  # added to the runner's environment
    cwd: Path | None = None  # where it starts (a checkout's tree: `-m` imports from there)
    checkout: str | None = None  # a commit whose tree ``check_out`` lays out in ``cwd``
    redis: bool = False  # its sessions live in the runner's redis-server (see ``env``)
    ray: bool = False  # its isolated model runs on the runner's Ray head (RAY_ADDRESS)
    processes: int = 1  # processes that log "listening" (serve --workers N): start waits for all

    @property
    def resumable(self) -> bool:
        """Its clients offer ``resumable``: the resume and detached modes apply."""
        return "resumable" in self.offers


def _script(name: str, *args: str) -> tuple[str, ...]:
    return (sys.executable, str(SERVERS_DIR / name), *args)


def _anything_agent(models_dir: Path) -> tuple[str, ...]:
    return (
        sys.executable,
        *("-m", "ws_server", "serve", "--port", "0", "--models-dir", str(models_dir)),
        "--no-limits",
    )


def redis_url(scratch: Path) -> str:
    """Where the runner's redis-server for ``scratch`` listens (a unix socket in it)."""
    return RedisServer(Path("redis-server"), scratch.absolute()).url


def check_out(revision: str, tree: Path) -> str:
    """Lay out ``revision``'s files in ``tree`` (``git archive``: the repository's work tree,
    index and worktree list are left alone); returns its short commit."""
    git = ("git", "-C", str(HERE.parent))
    commit = subprocess.run(
        [*git, "rev-parse", "--short", f"{revision}^{{commit}}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if not (tree / "ws_server").is_dir():
        archive = subprocess.run([*git, "archive", commit], capture_output=True, check=True)
        tree.mkdir(parents=True, exist_ok=True)
        with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as files:
            files.extractall(tree, filter="data")
    return commit


def prepare(scratch: Path) -> None:
    """Lay out what the lineup's commands expect in ``scratch``: a copy of the bench model
    whose config.yaml asks for isolation."""
    model = scratch / "isolated-models" / "bench"
    if not model.exists():
        shutil.copytree(BENCH_MODEL, model, ignore=shutil.ignore_patterns("__pycache__"))
        (model / "config.yaml").write_text("isolation: true\n")


def lineup(scratch: Path, before: str = BEFORE) -> list[ServerSpec]:
    """Every server, the reference first and the client's ceiling last (``prepare``
    lays out ``scratch`` for them; ``check_out`` the before row's tree)."""
    before_tree = scratch / "before"
    return [
        ServerSpec(REFERENCE, "bare websockets", _script("websockets_server.py")),
        ServerSpec("aiohttp", "aiohttp", _script("aiohttp_server.py")),
        ServerSpec("starlette", "Starlette+uvicorn", _script("starlette_server.py")),
        ServerSpec(
            "before",
            f"AnythingAgent @{before}",
            _anything_agent(BENCH_MODEL.parent),
            env={"PYTHONPATH": str(before_tree)},
            cwd=before_tree,
            checkout=before,
        ),
        ServerSpec("shared", "AnythingAgent shared", _anything_agent(BENCH_MODEL.parent)),
        ServerSpec(
            "workers2",
            "AnythingAgent shared, --workers 2",
            (*_anything_agent(BENCH_MODEL.parent), "--workers", "2"),
            processes=2,
        ),
        ServerSpec(
            "resumable",
            "AnythingAgent resumable",
            _anything_agent(BENCH_MODEL.parent),
            offers=RESUMABLE,
        ),
        ServerSpec(
            "redis",
            "AnythingAgent Redis store",
            _anything_agent(BENCH_MODEL.parent),
            offers=RESUMABLE,
            env={"ANYTHING_AGENT_REDIS_URL": redis_url(scratch)},
            redis=True,
        ),
        ServerSpec(
            "isolated",
            "AnythingAgent isolated",
            _anything_agent(scratch / "isolated-models"),
            builds_model=True,
        ),
        ServerSpec(
            "ray",
            "AnythingAgent isolated on Ray",
            _anything_agent(scratch / "isolated-models"),
            builds_model=True,
            ray=True,
        ),
        ServerSpec("spawn", "spawn per request", _script("spawn_server.py"), spawns=True),
        ServerSpec(
            "nomodel-1", "no model, 1 write/frame", _script("nomodel_server.py", "--batch", "1")
        ),
        ServerSpec("nomodel", "no model, batched writes", _script("nomodel_server.py")),
    ]


SSE_AGENT: Final = "anything_agent"
SSE_STARLETTE: Final = "starlette_sse"


def sse_lineup() -> list[ServerSpec]:
    """The SSE mode's servers: AnythingAgent serving the bench model (shared, its defaults
    plus ``--no-limits``), and the Starlette SSE server."""
    return [
        ServerSpec(SSE_AGENT, "AnythingAgent", _anything_agent(BENCH_MODEL.parent)),
        ServerSpec(SSE_STARLETTE, "Starlette+uvicorn SSE", _script("starlette_sse_server.py")),
    ]


KEYS: Final = tuple(spec.key for spec in lineup(Path()))
