"""Where a model version runs, by its placement kind: ``shared`` (in the server process),
``local`` (an isolated worker process on this node) or ``ray`` (an isolated worker as an
actor on a Ray cluster, with ``--ray-address``). The registry asks for a kind and gets a
started runner; nothing else in the server branches on where a model runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ws_server.exceptions import ModelLoadError
from ws_server.isolation import containment
from ws_server.isolation.environments import EnvironmentBuilder
from ws_server.isolation.link import LinkFactory, WorkerSpec
from ws_server.isolation.local_link import LocalProcesses
from ws_server.isolation.runner import IsolatedRunner
from ws_server.registry.config import ModelConfig
from ws_server.registry.loader import load_model
from ws_server.runners import Runner, SharedRunner

if TYPE_CHECKING:
    from ws_server.isolation.ray_cluster import RayCluster

Kind = Literal["shared", "local", "ray"]
OnFailure = Callable[[Runner, str], None]


@dataclass(frozen=True)
class ModelFiles:
    """One revision of a model directory, as a scan found and validated it."""

    name: str
    revision: str
    directory: Path
    raw_config: dict[str, Any]  # what the model sees as self.config, secrets resolved
    config: ModelConfig


@dataclass(frozen=True)
class StartedModel:
    """A runner that has loaded the model, with what the listing and unloading need."""

    runner: Runner
    description: str
    package: str = ""  # shared mode: the module package to unload when retired


class Placements:
    """Starts model versions where their config (and the server's settings) place them."""

    def __init__(
        self,
        environments: EnvironmentBuilder,
        *,
        sandbox: str = "auto",
        sandbox_share: tuple[tuple[str, str], ...] = (),
        ray: RayCluster | None = None,
    ) -> None:
        self.environments = environments
        self.sandbox = sandbox
        self.sandbox_share = sandbox_share
        self.ray = ray

    def kind(self, config: ModelConfig) -> Kind:
        """``config``'s placement; a model asking for Ray on a server without a cluster
        gets an error naming the key and the flag."""
        if not config.isolated:
            return "shared"
        asked = config.isolation.placement
        if asked == "ray" and self.ray is None:
            raise ModelLoadError(
                "config.yaml: isolation.placement: ray needs a Ray cluster, and this server "
                "has none (start it with --ray-address)"
            )
        if asked is not None:
            return asked
        return "ray" if self.ray is not None else "local"

    async def start(self, model: ModelFiles, on_failure: OnFailure) -> StartedModel:
        """Load ``model`` where its placement says; ``on_failure`` hears of an isolated
        worker failing for good later."""
        kind = self.kind(model.config)
        if kind == "shared":
            return await start_shared(model)
        links: LinkFactory
        if kind == "ray":
            assert self.ray is not None
            links = await self.ray.actors()
        else:
            python = await self.environments.python_for(
                model.name, model.directory, model.config.isolation
            )
            links = LocalProcesses(python, self.sandbox, self.sandbox_share)
        runner = await start_isolated(worker_spec(model), links, on_failure)
        return StartedModel(runner, runner.description)

    async def close(self) -> None:
        """Disconnect from Ray, if connected (after every runner has closed)."""
        await self.environments.close()
        if self.ray is not None:
            await asyncio.to_thread(self.ray.disconnect)


async def start_shared(model: ModelFiles) -> StartedModel:
    """Import ``main.py`` into this process."""
    loaded = await load_model(
        model.directory, model.name, model.revision, model.raw_config, isolated=False
    )
    runner = SharedRunner(loaded.model_class, model.raw_config, model.directory, loaded.resources)
    return StartedModel(runner, loaded.model_class.description(), loaded.package)


def worker_spec(model: ModelFiles) -> WorkerSpec:
    """What an isolated worker of ``model`` runs, and its limits."""
    isolation = model.config.isolation
    resources = isolation.resources
    return WorkerSpec(
        name=model.name,
        revision=model.revision,
        model_dir=model.directory,
        config=model.raw_config,
        memory_bytes=resources.memory_bytes(),
        cpus=resources.cpu,
        memory_text=resources.memory,
        pids=resources.pids or containment.DEFAULT_PIDS,
        network=isolation.network,
        python_version=isolation.python_version,
    )


async def start_isolated(
    spec: WorkerSpec, links: LinkFactory, on_failure: OnFailure
) -> IsolatedRunner:
    """Start a worker that has loaded the model (stopped again if the start fails)."""
    runner: IsolatedRunner
    runner = IsolatedRunner(spec, links, lambda reason: on_failure(runner, reason))
    try:
        await runner.start()
    except BaseException:
        await runner.close()
        raise
    return runner
