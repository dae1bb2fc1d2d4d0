"""The registry: which models exist, which version of each serves, and reload.

Reload rescans the models directory and compares each model's revision (a hash of its
directory). A changed model gets a new version; sessions already open keep the version
they started with until they close. A new version that fails leaves the previous one
serving, with the error visible. One broken model never stops the others.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ws_server import metrics
from ws_server.exceptions import (
    ClusterUnreachable,
    ModelAtCapacity,
    ModelLoadError,
    ModelNotFound,
    ModelUnavailable,
)
from ws_server.isolation.environments import EnvironmentBuilder, default_cache_dir
from ws_server.redaction import redact
from ws_server.registry.config import (
    NAME_PATTERN,
    NAME_RULE,
    ModelConfig,
    asks_for_isolation,
    read_config,
)
from ws_server.registry.loader import MAIN_FILE, unload_package
from ws_server.registry.placement import ModelFiles, Placements
from ws_server.registry.revision import compute_revision
from ws_server.registry.slots import TurnSlots
from ws_server.runners import Runner

if TYPE_CHECKING:
    from ws_server.isolation.ray_cluster import RayCluster

log = logging.getLogger("anything_agent.registry")

Status = Literal["ready", "building", "failed", "draining"]
BUILDING_RETRY_AFTER = 5  # seconds, in the 503 answering a connection to a building model


@dataclass(eq=False)
class ModelVersion:
    """One loaded revision of a model: what a session is pinned to for its whole life."""

    name: str
    directory: Path
    revision: str
    config: ModelConfig
    description: str
    runner: Runner
    package: str  # the module package main.py was imported as; unloaded when retired
    loaded_at: float
    sessions: int = 0
    retired: bool = False
    slots: TurnSlots = field(init=False)  # its turns running and queued (concurrency)

    def __post_init__(self) -> None:
        limits = self.config.concurrency
        self.slots = TurnSlots(self.name, limits.max_turns, limits.max_queue)

    @property
    def version(self) -> str:
        """config.yaml's ``version`` as written, or the revision when it has none."""
        return self.config.version or self.revision

    @property
    def mode(self) -> str:
        return self.runner.mode

    @property
    def placement(self) -> str | None:
        """``local`` or ``ray`` for an isolated model; None in shared mode."""
        return self.runner.placement

    @property
    def timeout(self) -> float:
        return self.config.settings.timeout


@dataclass(eq=False)
class ModelEntry:
    """A model directory as last scanned: its serving version and its latest error."""

    name: str
    directory: Path
    revision: str
    config: ModelConfig | None
    serving: ModelVersion | None = None
    error: str | None = None
    error_detail: str | None = None  # the model's own exception text: log and `check` only
    build: asyncio.Task[None] | None = None  # an isolated revision being built
    retry: bool = False  # failed at run time (crash loop): the next reload tries again
    isolated: bool = False  # what config.yaml asks for, even when it failed validation
    build_started: float = 0.0  # time.monotonic() when ``build`` began

    def building_for(self) -> float | None:
        """Seconds the build in progress has taken so far; None when none runs."""
        if self.build is None:
            return None
        return round(time.monotonic() - self.build_started, 1)

    @property
    def status(self) -> Status:
        if self.serving is not None:
            return "ready"
        return "building" if self.build is not None else "failed"

    def cancel_build(self) -> None:
        if self.build is not None:
            self.build.cancel()
            self.build = None


@dataclass
class ReloadReport:
    """What one reload did, by model name; the body of ``POST /v1/models/reload``."""

    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    building: list[str] = field(default_factory=list)  # isolated: finishing in the background

    def as_dict(self) -> dict[str, Any]:
        return {
            "added": self.added,
            "updated": self.updated,
            "removed": self.removed,
            "failed": self.failed,
            "unchanged": self.unchanged,
            "building": self.building,
        }


@dataclass
class _Candidate:
    """A model directory found by a scan, before loading."""

    name: str
    directory: Path
    revision: str
    config: ModelConfig | None
    raw_config: dict[str, Any]
    error: str | None
    isolated: bool = False  # config.yaml asks for isolation (even if it failed validation)


class Registry:
    """Owns discovery, config, versions and reload for one models directory."""

    def __init__(
        self,
        models_dir: Path,
        environments: EnvironmentBuilder | None = None,
        *,
        sandbox: str = "auto",
        sandbox_share: tuple[tuple[str, str], ...] = (),
        ray: RayCluster | None = None,
    ) -> None:
        self.models_dir = models_dir.resolve()
        self.environments = environments or EnvironmentBuilder(default_cache_dir())
        self.placements = Placements(
            self.environments, sandbox=sandbox, sandbox_share=sandbox_share, ray=ray
        )
        self._entries: dict[str, ModelEntry] = {}
        self._draining: dict[str, list[ModelVersion]] = {}
        self._lock = asyncio.Lock()
        self._disposals: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ sessions
    def acquire(self, name: str) -> ModelVersion:
        """Pin the serving version of ``name`` for a new session; ``release`` unpins it."""
        version = self.serving_version(name)
        version.sessions += 1
        return version

    def acquire_revision(self, name: str, revision: str) -> ModelVersion:
        """Pin, for a session moving here from another node, the version of ``revision``
        if this node still has it loaded, else the serving version of ``name``."""
        for version in self._draining.get(name, []):
            if version.revision == revision:
                version.sessions += 1
                return version
        return self.acquire(name)

    def serving_revisions(self) -> dict[str, str]:
        """Each ready model's serving revision (what a node's heartbeat reports)."""
        return {
            name: entry.serving.revision
            for name, entry in self._entries.items()
            if entry.serving is not None
        }

    def serving_version(self, name: str) -> ModelVersion:
        """The version new sessions of ``name`` get, or the refusal saying why there is none."""
        entry = self._entries.get(name)
        if entry is None:
            if self._draining.get(name):
                raise ModelUnavailable(
                    f"model {name!r} was removed; it is only finishing its open sessions"
                )
            raise ModelNotFound(f"no model named {name!r}; GET /v1/models lists them")
        if entry.serving is None:
            if entry.build is not None:
                raise ModelUnavailable(
                    f"model {name!r} is building its environment; try again shortly",
                    retry_after=BUILDING_RETRY_AFTER,
                )
            error = self.environments.public(entry.error or "")
            raise ModelUnavailable(f"model {name!r} failed to load: {redact(error)}")
        serving = entry.serving
        limit = serving.config.settings.max_sessions
        if limit is not None and serving.sessions >= limit:
            raise ModelAtCapacity(
                f"model {name!r} has {limit} open sessions, its settings.max_sessions; "
                "try again later"
            )
        return serving

    def release(self, version: ModelVersion) -> None:
        """A session on ``version`` ended; a retired version with none left is dropped."""
        version.sessions -= 1
        if version.retired and version.sessions == 0:
            versions = self._draining.get(version.name, [])
            if version in versions:
                versions.remove(version)
            if not versions:
                self._draining.pop(version.name, None)
            self._dispose_later(version)

    # ------------------------------------------------------------------ listing
    def networked_sandboxes(self) -> bool:
        """Whether a sandboxed model with network is serving."""
        for entry in self._entries.values():
            report = entry.serving.runner.sandbox if entry.serving is not None else None
            if report is not None and report["bubblewrap"] and report["network"]:
                return True
        return False

    def list_models(self) -> list[dict[str, Any]]:
        """Every model, OpenAI list style plus our fields, sorted by name."""
        names = sorted(set(self._entries) | set(self._draining))
        return [info for name in names if (info := self.model_info(name)) is not None]

    def model_info(self, name: str) -> dict[str, Any] | None:
        """One model's listing row, or ``None`` if there is no such model; ``turns``
        counts its turns running and queued in this process, every version's."""
        row = self._model_row(name)
        if row is not None:
            entry = self._entries.get(name)
            versions = list(self._draining.get(name, []))
            if entry is not None and entry.serving is not None:
                versions.append(entry.serving)
            row["turns"] = {
                "running": sum(v.slots.running for v in versions),
                "queued": sum(v.slots.queued for v in versions),
            }
        return row

    def turn_counts(self) -> list[tuple[str, int, int]]:
        """Each model's turns running and queued in this process (for /metrics)."""
        counts = []
        for name in sorted(set(self._entries) | set(self._draining)):
            row = self.model_info(name)
            if row is not None:
                counts.append((name, row["turns"]["running"], row["turns"]["queued"]))
        return counts

    def _model_row(self, name: str) -> dict[str, Any] | None:
        entry = self._entries.get(name)
        draining = self._draining.get(name, [])
        sessions = sum(v.sessions for v in draining)
        if entry is None:
            return _row(name, draining[-1], "draining", None, sessions) if draining else None
        pending = entry.revision if entry.build is not None else None
        building_for = entry.building_for()
        # The installer's error names paths in the server's cache: relative to it here
        # (the server log has them whole).
        error = self.environments.public(entry.error) if entry.error else None
        if entry.serving is not None:
            sessions += entry.serving.sessions
            return _row(name, entry.serving, "ready", error, sessions, pending, building_for)
        config = entry.config or ModelConfig()
        return {
            **_row(name, None, entry.status, error, sessions, pending, building_for),
            "version": config.version or entry.revision,
            "revision": entry.revision,
            "description": config.description or "",
            "mode": "isolated" if entry.isolated else "shared",
            "placement": self._intended_placement(config) if entry.isolated else None,
        }

    def _intended_placement(self, config: ModelConfig) -> str | None:
        try:
            kind = self.placements.kind(config)
        except ModelLoadError:
            return config.isolation.placement
        return None if kind == "shared" else kind

    async def wait_for_builds(self) -> None:
        """Until every background build has finished (``check`` waits for them)."""
        builds = [e.build for e in self._entries.values() if e.build is not None]
        if builds:
            await asyncio.gather(*builds, return_exceptions=True)

    def failure_details(self) -> dict[str, str]:
        """The full text of each model's own load-time exception (not for clients)."""
        return {n: redact(e.error_detail) for n, e in self._entries.items() if e.error_detail}

    def status_counts(self) -> dict[str, int]:
        """How many models are in each status, for /healthz."""
        counts: dict[str, int] = {"ready": 0, "building": 0, "failed": 0, "draining": 0}
        for row in self.list_models():
            counts[row["status"]] += 1
        return counts

    # ------------------------------------------------------------------ reload
    async def reload(self) -> ReloadReport:
        """Rescan the models directory and apply what changed; one reload at a time."""
        async with self._lock:
            started = time.perf_counter()
            candidates = await asyncio.to_thread(self._scan)
            report = ReloadReport()
            metrics.RELOADS.inc()
            for candidate in candidates.values():
                await self._apply(candidate, report)
            for name in sorted(set(self._entries) - set(candidates)):
                entry = self._entries.pop(name)
                if entry.serving is not None:
                    self._retire(entry.serving)
                report.removed.append(name)
                log.info("model %s: removed (%s gone)", name, entry.directory)
            log.info(
                "reload in %.0f ms: %d added, %d updated, %d removed, %d failed, %d unchanged",
                (time.perf_counter() - started) * 1000,
                len(report.added),
                len(report.updated),
                len(report.removed),
                len(report.failed),
                len(report.unchanged),
            )
            return report

    async def _apply(self, candidate: _Candidate, report: ReloadReport) -> None:
        name = candidate.name
        entry = self._entries.get(name)
        if entry is not None and entry.directory == candidate.directory:
            if entry.revision == candidate.revision and not entry.retry:
                report.unchanged.append(name)
                return
            if entry.serving is not None and entry.serving.revision == candidate.revision:
                entry.cancel_build()
                entry.revision, entry.error, entry.error_detail = candidate.revision, None, None
                report.updated.append(name)
                return
        is_new = entry is None or entry.directory != candidate.directory
        if entry is not None:
            entry.cancel_build()
        if entry is None or is_new:
            entry = ModelEntry(name, candidate.directory, candidate.revision, candidate.config)
            self._entries[name] = entry
        else:
            entry.revision, entry.config, entry.retry = candidate.revision, candidate.config, False
        entry.isolated = candidate.isolated
        config = candidate.config
        if candidate.error is None and config is not None and config.isolated:
            # Building an environment takes a while: do it in the background, with the
            # previous version (if any) serving meanwhile.
            entry.build = asyncio.get_running_loop().create_task(self._build(entry, candidate))
            entry.build_started = time.monotonic()
            report.building.append(name)
            log.info("model %s: building revision %s in the background", name, candidate.revision)
            return
        try:
            if candidate.error is not None:
                raise ModelLoadError(candidate.error)
            version = await self._load(candidate)
        except ModelLoadError as exc:
            report.failed.append({"id": name, "error": exc.message})
            self._record_failure(entry, candidate, exc)
            return
        (report.added if is_new else report.updated).append(name)
        self._install(entry, version)

    async def _build(self, entry: ModelEntry, candidate: _Candidate) -> None:
        """Background load of an isolated model; swaps it in once its worker is ready."""
        try:
            try:
                version = await self._load(candidate)
            except asyncio.CancelledError:
                raise
            except ModelLoadError:
                raise
            except Exception as exc:
                log.exception("model %s: building failed", entry.name)
                raise ModelLoadError(
                    f"isolation: building the environment failed: {type(exc).__name__}: {exc}"
                ) from None
        except ModelLoadError as exc:
            if self._entries.get(entry.name) is entry and entry.revision == candidate.revision:
                self._record_failure(entry, candidate, exc)
                entry.retry = isinstance(exc, ClusterUnreachable)  # not the model's fault
            return
        finally:
            if entry.build is asyncio.current_task():
                entry.build = None
        if self._entries.get(entry.name) is not entry or entry.revision != candidate.revision:
            self._retire(version)  # superseded while it was building
            return
        self._install(entry, version)

    def _install(self, entry: ModelEntry, version: ModelVersion) -> None:
        """Make ``version`` the one new sessions get; the previous one drains."""
        if entry.serving is not None:
            self._retire(entry.serving)
        entry.serving, entry.error, entry.error_detail = version, None, None
        log.info(
            "model %s: serving version %s (revision %s, %s mode)",
            entry.name,
            version.version,
            version.revision,
            version.mode,
        )

    def _record_failure(
        self, entry: ModelEntry, candidate: _Candidate, exc: ModelLoadError
    ) -> None:
        entry.error, entry.error_detail = exc.message, exc.detail
        if entry.serving is not None:
            log.error(
                "model %s: new revision %s failed, version %s keeps serving: %s",
                entry.name,
                candidate.revision,
                entry.serving.version,
                exc.message,
            )
        else:
            log.error("model %s: failed: %s", entry.name, exc.message)
        if exc.detail:
            log.error("model %s: %s", entry.name, exc.detail.rstrip())

    def _runner_failed(self, name: str, runner: Runner, reason: str) -> None:
        """An isolated model's worker crashed too often: the model becomes ``failed``."""
        entry = self._entries.get(name)
        if entry is not None and entry.serving is not None and entry.serving.runner is runner:
            failed = entry.serving
            entry.serving, entry.error, entry.retry = None, reason, True
            self._retire(failed)

    async def _load(self, candidate: _Candidate) -> ModelVersion:
        config = candidate.config
        assert config is not None
        name = candidate.name
        files = ModelFiles(
            name, candidate.revision, candidate.directory, candidate.raw_config, config
        )
        started = await self.placements.start(
            files, lambda failed, reason: self._runner_failed(name, failed, reason)
        )
        return ModelVersion(
            name=name,
            directory=candidate.directory,
            revision=candidate.revision,
            config=config,
            description=config.description or started.description,
            runner=started.runner,
            package=started.package,
            loaded_at=time.time(),
        )

    def _scan(self) -> dict[str, _Candidate]:
        """Find model directories (blocking; run in a thread): each with a main.py."""
        found: dict[str, _Candidate] = {}
        if not self.models_dir.is_dir():
            log.warning("models directory %s does not exist", self.models_dir)
            return found
        for directory in sorted(self.models_dir.iterdir()):
            if directory.name.startswith((".", "_")) or not directory.is_dir():
                continue
            if not (directory / MAIN_FILE).is_file():
                continue
            candidate = _inspect_directory(directory)
            if candidate.name in found:
                other = found[candidate.name].directory.name
                candidate.error = (
                    f"config.yaml: name {candidate.name!r} is already used by {other}/"
                )
                candidate.name = directory.name
                if candidate.name in found:
                    log.error("model directory %s skipped: duplicate name", directory)
                    continue
            found[candidate.name] = candidate
        return found

    # ------------------------------------------------------------------ retiring
    def _retire(self, version: ModelVersion) -> None:
        version.retired = True
        if version.sessions == 0:
            self._dispose_later(version)
        else:
            self._draining.setdefault(version.name, []).append(version)
            log.info(
                "model %s: version %s draining (%d open sessions)",
                version.name,
                version.version,
                version.sessions,
            )

    def _dispose_later(self, version: ModelVersion) -> None:
        task = asyncio.get_running_loop().create_task(self._dispose(version))
        self._disposals.add(task)
        task.add_done_callback(self._disposals.discard)

    @staticmethod
    async def _dispose(version: ModelVersion) -> None:
        await version.runner.close()
        if version.package:
            unload_package(version.package)
        log.info(
            "model %s: version %s (revision %s) unloaded",
            version.name,
            version.version,
            version.revision,
        )

    async def close(self) -> None:
        """Stop every runner (at server shutdown, after the sessions have ended)."""
        for entry in self._entries.values():
            entry.cancel_build()
        versions = [e.serving for e in self._entries.values() if e.serving is not None]
        versions += [v for vs in self._draining.values() for v in vs]
        self._entries.clear()
        self._draining.clear()
        await asyncio.gather(*(v.runner.close() for v in versions), return_exceptions=True)
        if self._disposals:
            await asyncio.gather(*self._disposals, return_exceptions=True)
        await self.placements.close()


def _inspect_directory(directory: Path) -> _Candidate:
    revision = compute_revision(directory)
    try:
        config, raw = read_config(directory)
    except ModelLoadError as exc:
        isolated = asks_for_isolation(directory)
        return _Candidate(directory.name, directory, revision, None, {}, exc.message, isolated)
    name = config.name or directory.name
    error = None
    if config.name is None and not NAME_PATTERN.match(name):
        error = (
            f"directory name {name!r} breaks the naming rule ({NAME_RULE}); "
            "rename the directory or set `name` in config.yaml"
        )
    return _Candidate(name, directory, revision, config, raw, error, config.isolated)


def _row(
    name: str,
    version: ModelVersion | None,
    status: Status,
    error: str | None,
    sessions: int,
    pending_revision: str | None = None,
    building_for: float | None = None,
) -> dict[str, Any]:
    """A listing row: OpenAI's model object plus ours, filled from the serving version."""
    return {
        "id": name,
        "object": "model",
        "created": int(version.loaded_at) if version else None,
        "owned_by": "anything-agent",
        "version": version.version if version else None,
        "revision": version.revision if version else None,
        "description": redact(version.description) if version else "",
        "mode": version.mode if version else None,
        "placement": version.placement if version else None,
        "sandbox": version.runner.sandbox if version else None,
        "status": status,
        "error": redact(error) if error else None,
        "sessions": sessions,
        "pending_revision": pending_revision,
        "building_for": building_for,
    }
