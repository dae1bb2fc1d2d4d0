"""``serve --reload-on-change``: watch the models directory, and reload when it changes.

A burst of changes (an editor's save, a ``git checkout``) is one reload: watchfiles hands
them over together once they settle (``STEP_MS`` of quiet, or ``DEBOUNCE_MS`` at most).
Only what a reload could see counts: the registry's own rules (hidden files and
directories, ``__pycache__``, ``*.pyc``, a model's ``venv/``) and editors' swap, backup
and probe files are left out, so saving in vim is one reload and an interpreter writing
bytecode is none. The reload is the registry's, as the API runs it: a half-written
``main.py`` fails alone with the previous version serving, and the next save fixes it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from contextlib import aclosing
from pathlib import Path
from typing import Final

from watchfiles import Change, awatch

from ws_server.registry.catalog import ReloadReport
from ws_server.registry.revision import VENV_MARKER, skipped_dir, skipped_file

log = logging.getLogger("anything_agent.watcher")

DEBOUNCE_MS: Final = 300  # the longest a burst of changes is gathered before a reload
STEP_MS: Final = 100  # this long without a new change ends a burst
APPEAR_POLL: Final = 1.0  # seconds between looks for a models directory that isn't there
STOP_LIMIT: Final = 5.0  # seconds shutdown waits for a reload in progress before cancelling
SHOWN_PATHS: Final = 10  # changed paths named in the log line; the rest are counted
# Top-level entries the registry's scan passes over (Registry._scan): not models.
_NOT_MODELS: Final = (".", "_")


def relevant(models_dir: Path, path: Path) -> bool:
    """Whether a change at ``path`` can change what a reload of ``models_dir`` finds."""
    try:
        parts = path.relative_to(models_dir).parts
    except ValueError:
        return False
    if not parts:  # the models directory itself: created, removed
        return True
    if parts[0].startswith(_NOT_MODELS):
        return False
    if len(parts) == 1:  # a model directory (a stray file beside them is no model)
        return not path.is_file()
    inside = parts[1:]  # relative to the model's directory
    if inside in (VENV_MARKER[:1], VENV_MARKER):  # a hand-made venv/ counts by its presence
        return True
    *directories, name = inside
    if any(skipped_dir(d) for d in directories) or skipped_dir(name):
        return False
    return not skipped_file(name)


def summarize(models_dir: Path, paths: Iterable[str]) -> str:
    """The changed paths relative to ``models_dir``, the first ``SHOWN_PATHS`` by name."""
    names = sorted({Path(p).relative_to(models_dir).as_posix() for p in paths})
    shown = ", ".join(name if name != "." else "(itself)" for name in names[:SHOWN_PATHS])
    more = len(names) - SHOWN_PATHS
    return f"{shown} and {more} more" if more > 0 else shown


def describe(report: ReloadReport) -> str:
    """What a reload did, the unchanged models aside."""
    parts = [
        f"{what} {', '.join(names)}"
        for what, names in (
            ("added", report.added),
            ("updated", report.updated),
            ("removed", report.removed),
            ("failed", [failure["id"] for failure in report.failed]),
            ("building", report.building),
        )
        if names
    ]
    return "; ".join(parts) or "no model changed"


class ModelsWatcher:
    """Reloads one models directory whenever something in it that counts changes."""

    def __init__(self, models_dir: Path, reload: Callable[[], Awaitable[ReloadReport]]) -> None:
        self.models_dir = models_dir
        self._reload = reload
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._catch_up: asyncio.Task[None] | None = None  # a reload once a new watch is set

    async def start(self) -> None:
        """Start watching; on return the watch is set up, so no change after it is missed."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name="models-watcher")
        # One turn of the loop: the task runs until awatch waits in its thread, which is
        # after its watch on the directory is in place.
        await asyncio.sleep(0)

    async def stop(self) -> None:
        """Stop watching: awatch's thread notices the stop event within ``STEP_MS``; a
        reload in progress gets ``STOP_LIMIT`` seconds to finish, then is cancelled."""
        self._stop.set()
        tasks = {task for task in (self._task, self._catch_up) if task is not None}
        if not tasks:
            return
        _, running = await asyncio.wait(tasks, timeout=STOP_LIMIT)
        if running:
            log.warning("a reload on change was still running after %g s: cancelled", STOP_LIMIT)
            for task in running:
                task.cancel()
            await asyncio.wait(running)

    async def _run(self) -> None:
        """Watch until stopped. A models directory that is missing (or goes) is waited for,
        then watched again and reloaded."""
        catch_up: str | None = None
        while not self._stop.is_set():
            if not self.models_dir.is_dir():
                log.warning(
                    "models directory %s does not exist: reloading when it appears",
                    self.models_dir,
                )
                if not await self._appeared():
                    return
                catch_up = "appeared"
            try:
                await self._watch(catch_up)
            except FileNotFoundError:  # gone between the look and the watch: wait for it
                continue
            except Exception:  # watch limits, permissions: the server serves on without
                log.exception("cannot watch %s: reloading on change is off", self.models_dir)
                return
            catch_up = "is back"  # unless stopped, the watch ended as the directory went

    async def _watch(self, catch_up: str | None) -> None:
        """Reload after each burst of relevant changes, until stopped or the directory goes
        (its watch goes with it: ``_run`` waits for it to come back). ``catch_up``: reload
        once the watch is set up too, for what changed while nothing watched."""
        log.info("watching %s: reloading on change", self.models_dir)
        batches = awatch(
            self.models_dir,
            watch_filter=lambda _change, path: relevant(self.models_dir, Path(path)),
            debounce=DEBOUNCE_MS,
            step=STEP_MS,
            stop_event=self._stop,
            ignore_permission_denied=True,  # an unreadable subdirectory: watch the rest
        )
        async with aclosing(batches):
            if catch_up is not None:
                # Its turn on the loop comes after this task's, which sets the watch up as
                # it first iterates awatch, below: what changes during its scan is seen.
                self._catch_up = asyncio.get_running_loop().create_task(self._reload_now(catch_up))
            async for changes in batches:
                if self._stop.is_set():
                    return
                paths = {path for _change, path in changes}
                await self._reload_now(f"changed: {summarize(self.models_dir, paths)}")
                gone = (Change.deleted, str(self.models_dir)) in changes
                if gone or not self.models_dir.is_dir():
                    return

    async def _reload_now(self, why: str) -> None:
        """Run the registry's reload (the API's) and log what it did. It reloads this
        process only: each process and node watches its own directory."""
        log.info("models directory %s", why)
        try:
            report = await self._reload()
        except Exception:  # a bug in reload must not end the watching
            log.exception("reload on change failed")
            return
        log.info("reloaded on change: %s", describe(report))

    async def _appeared(self) -> bool:
        """Wait for the models directory to exist; False when stopped first."""
        while not self.models_dir.is_dir():
            try:
                await asyncio.wait_for(self._stop.wait(), APPEAR_POLL)
                return False
            except TimeoutError:
                pass
        return True
