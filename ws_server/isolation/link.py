"""The worker link: the narrow interface between the isolated runner (sessions multiplexed
over one worker, flow control, cancel, crash handling: ``runner.py``) and wherever one
worker runs. A link starts one worker, carries typed messages (``messages.py``) both ways
and reports its end once; the runner makes a new link for each worker it (re)starts.

Two placements implement it: a local process (``local_link.py``: bubblewrap, cgroups, the
worker's output in the server log) and a Ray actor (``ray_link.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ws_server.isolation import containment
from ws_server.isolation.messages import ServerMessage, WorkerMessage

Deliver = Callable[[WorkerMessage], None]


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker runs and within which limits, wherever it is placed."""

    name: str
    revision: str
    model_dir: Path
    config: dict[str, Any]  # config.yaml as the model sees it, secrets resolved
    memory_bytes: int | None = None
    cpus: float | None = None  # isolation.resources.cpu: a CPU-time quota, in cores
    memory_text: str | None = None
    pids: int = containment.DEFAULT_PIDS  # processes in the worker's tree
    network: bool = False  # isolation.network: may the sandboxed worker use the network
    python_version: str | None = None  # isolation.python_version, as config.yaml asks


@dataclass(frozen=True)
class LinkEnd:
    """How a worker ended: ``reason`` for logs and errors; ``memory`` when it was killed for
    going past its memory limit."""

    reason: str
    memory: bool = False


Ended = Callable[[LinkEnd], None]


class WorkerLink(Protocol):
    """One worker, wherever it runs.

    ``open`` starts it and hands it the config; from then on every message it sends is
    given to the ``deliver`` the link was made with, in order, and its end (a crash, a
    kill, or ``close``) to ``ended``, once. ``send`` never blocks: a message to a worker
    that has gone is dropped (its end is reported anyway)."""

    placement: str  # "local" or "ray": the listing's ``placement``
    sandbox: dict[str, Any]  # the listing's ``sandbox``: which protections hold

    @property
    def label(self) -> str:
        """Names the worker in log lines (its pid, or the actor's id)."""

    async def open(self) -> None: ...

    def send(self, message: ServerMessage) -> None: ...

    def kill(self) -> None: ...

    async def close(self) -> None: ...

    def oom_kills(self) -> int: ...

    def memory_breached(self, since: int | None = None) -> bool: ...


class LinkFactory(Protocol):
    """Makes the links of isolated model versions placed one way (``kind``)."""

    @property
    def kind(self) -> str: ...

    def link(self, spec: WorkerSpec, deliver: Deliver, ended: Ended) -> WorkerLink: ...
