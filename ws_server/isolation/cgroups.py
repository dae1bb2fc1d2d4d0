"""Control groups that bound an isolated worker's whole process tree.

Each worker gets a cgroup of its own (memory, process count, CPU-time quota), created
below the cgroup the server itself runs in (read from ``/proc/self/cgroup``), never above
it: the server's cgroup and its ancestors are only read. cgroup v2 is used where the
server's cgroup already delegates the three controllers to its children; else v1, with
one hierarchy per controller (``/sys/fs/cgroup/{memory,pids,cpu}``). Where neither can be
created, ``available`` says why and workers keep per-process limits.

Layout: ``<server's cgroup>/anything-agent-<server pid>/<model>-<n>`` in each hierarchy;
the per-server directory is removed when the server closes, and stale ones left by a
server that was killed are removed at the next start.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import re
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from ws_server.exceptions import CgroupUnavailable

log = logging.getLogger("anything_agent.cgroups")

CONTROLLERS: Final = ("memory", "pids", "cpu")
CPU_PERIOD_US: Final = 100_000
MIN_CPU_QUOTA_US: Final = 1_000
PREFIX: Final = "anything-agent-"
KILL_ROUNDS: Final = 50  # SIGKILL sweeps over a group's processes before giving up
_names = itertools.count(1)


@dataclass(frozen=True)
class Limits:
    """What bounds one worker's tree: bytes of memory, a process count, CPU cores."""

    memory_bytes: int | None = None
    pids: int | None = None
    cpus: float | None = None


@dataclass
class Hierarchy:
    """Where the server's own cgroup is: v2's one directory, or v1's per controller."""

    version: int
    server_dirs: dict[str, Path]  # controller -> the server's cgroup directory in it

    @property
    def label(self) -> str:
        return f"cgroup v{self.version}"


@dataclass
class WorkerGroup:
    """One worker's cgroup (a directory per hierarchy for v1, a single one for v2)."""

    version: int
    dirs: dict[str, Path]  # controller -> this worker's directory
    oom_baseline: int = 0
    _removed: bool = field(default=False, repr=False)

    @property
    def procs_files(self) -> list[str]:
        """The ``cgroup.procs`` files a process writes its pid to, to join the group."""
        return sorted({str(d / "cgroup.procs") for d in self.dirs.values()})

    def oom_kills(self) -> int:
        """Processes of this group the kernel has killed for going past its memory limit."""
        memory = self.dirs.get("memory")
        if memory is None:
            return 0
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        try:
            text = (memory / name).read_text()
        except OSError:
            return 0
        match = re.search(r"^oom_kill (\d+)$", text, re.MULTILINE)
        return int(match.group(1)) if match else 0

    def pids(self) -> set[int]:
        found: set[int] = set()
        for procs in self.procs_files:
            with contextlib.suppress(OSError):
                found.update(int(line) for line in Path(procs).read_text().split())
        return found

    def kill_all(self) -> None:
        """SIGKILL every process left in the group (a worker's children end with it)."""
        kill = self.dirs.get("memory", next(iter(self.dirs.values()))) / "cgroup.kill"
        if self.version == 2 and kill.exists():
            with contextlib.suppress(OSError):
                kill.write_text("1")
        for _ in range(KILL_ROUNDS):
            left = self.pids()
            if not left:
                return
            for pid in left:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.01)

    def remove(self) -> None:
        """Kill what is left and remove the group's directories (once)."""
        if self._removed:
            return
        self._removed = True
        self.kill_all()
        for directory in self.dirs.values():
            _rmdir(directory)


class Cgroups:
    """Creates worker groups below the server's cgroup; one per server process."""

    def __init__(self, hierarchy: Hierarchy) -> None:
        self.hierarchy = hierarchy
        self._base: dict[str, Path] | None = None

    @property
    def label(self) -> str:
        return self.hierarchy.label

    def create(self, model: str, limits: Limits) -> WorkerGroup:
        """A new, empty group with ``limits`` set; raises ``CgroupUnavailable``."""
        base = self._ensure_base()
        name = f"{model}-{next(_names)}"
        dirs: dict[str, Path] = {}
        try:
            for controller, parent in base.items():
                directory = parent / name
                if directory not in dirs.values():
                    directory.mkdir()
                dirs[controller] = directory
            group = WorkerGroup(self.hierarchy.version, dirs)
            _apply(group, limits)
        except OSError as exc:
            for directory in dirs.values():
                _rmdir(directory)
            raise CgroupUnavailable(f"cannot create a worker cgroup: {exc}") from None
        group.oom_baseline = group.oom_kills()
        return group

    def close(self) -> None:
        """Remove this server's directory (its worker groups are gone by now)."""
        if self._base is not None:
            for directory in set(self._base.values()):
                _rmdir(directory)
            self._base = None

    def _ensure_base(self) -> dict[str, Path]:
        if self._base is None:
            base: dict[str, Path] = {}
            for controller, server_dir in self.hierarchy.server_dirs.items():
                _remove_stale(server_dir)
                directory = server_dir / f"{PREFIX}{os.getpid()}"
                try:
                    directory.mkdir(exist_ok=True)
                    if self.hierarchy.version == 2:
                        _enable_controllers(directory)
                except OSError as exc:
                    raise CgroupUnavailable(f"cannot create {directory}: {exc}") from None
                base[controller] = directory
            self._base = base
        return self._base


def _apply(group: WorkerGroup, limits: Limits) -> None:
    memory, pids, cpu = (group.dirs[c] for c in CONTROLLERS)
    if group.version == 2:
        if limits.memory_bytes:
            (memory / "memory.max").write_text(str(limits.memory_bytes))
            _write_if_present(memory / "memory.swap.max", "0")
            _write_if_present(memory / "memory.oom.group", "1")  # a breach ends the tree
        if limits.pids:
            (pids / "pids.max").write_text(str(limits.pids))
        if limits.cpus:
            (cpu / "cpu.max").write_text(f"{_quota(limits.cpus)} {CPU_PERIOD_US}")
        return
    if limits.memory_bytes:
        (memory / "memory.limit_in_bytes").write_text(str(limits.memory_bytes))
        _write_if_present(memory / "memory.memsw.limit_in_bytes", str(limits.memory_bytes))
    if limits.pids:
        (pids / "pids.max").write_text(str(limits.pids))
    if limits.cpus:
        (cpu / "cpu.cfs_period_us").write_text(str(CPU_PERIOD_US))
        (cpu / "cpu.cfs_quota_us").write_text(str(_quota(limits.cpus)))


def _quota(cpus: float) -> int:
    return max(MIN_CPU_QUOTA_US, int(cpus * CPU_PERIOD_US))


def _write_if_present(path: Path, value: str) -> None:
    if path.exists():
        with contextlib.suppress(OSError):
            path.write_text(value)


def _enable_controllers(directory: Path) -> None:
    """v2: hand our three controllers on to the worker groups below ``directory`` (ours,
    empty of processes, so the kernel allows it)."""
    (directory / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in CONTROLLERS))


def _rmdir(directory: Path) -> None:
    """Remove a cgroup directory, waiting briefly for its last processes to be reaped."""
    for _ in range(100):
        try:
            directory.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                log.warning("cannot remove cgroup %s: %s", directory, exc)
                return
            time.sleep(0.01)
    log.warning("cannot remove cgroup %s: still busy", directory)


def _remove_stale(server_dir: Path) -> None:
    """Remove what a killed server of ours left: ``anything-agent-<pid>`` of dead pids."""
    with contextlib.suppress(OSError):
        for stale in server_dir.glob(f"{PREFIX}*"):
            pid = stale.name.removeprefix(PREFIX)
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                for child in stale.iterdir():
                    if child.is_dir():
                        WorkerGroup(1, {"stale": child}).remove()
                _rmdir(stale)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --------------------------------------------------------------------- discovery
def discover(
    proc_cgroup: str = "/proc/self/cgroup", mountinfo: str = "/proc/self/mountinfo"
) -> Hierarchy | str:
    """Where the server's cgroup is in a hierarchy that has memory, pids and cpu and in
    which we may create children; or why there is none."""
    try:
        memberships = _memberships(Path(proc_cgroup).read_text())
        mounts = _cgroup_mounts(Path(mountinfo).read_text())
    except OSError as exc:
        return f"cannot read the server's cgroups: {exc}"
    reasons: list[str] = []
    v2 = _v2(memberships, mounts, reasons)
    if v2 is not None:
        return v2
    v1 = _v1(memberships, mounts, reasons)
    if v1 is not None:
        return v1
    return "; ".join(reasons) or "no cgroup hierarchy found"


def _memberships(text: str) -> dict[str, str]:
    """``/proc/self/cgroup`` as controller -> path ("" for v2's unified hierarchy)."""
    found: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        for controller in controllers.split(",") if controllers else [""]:
            found[controller] = path
    return found


@dataclass(frozen=True)
class _Mount:
    root: str
    point: Path
    version: int
    controllers: frozenset[str]


def _cgroup_mounts(text: str) -> list[_Mount]:
    mounts: list[_Mount] = []
    for line in text.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        separator = fields.index("-")
        fstype, options = fields[separator + 1], fields[separator + 3].split(",")
        root, point = _unescape(fields[3]), Path(_unescape(fields[4]))
        if fstype == "cgroup2":
            mounts.append(_Mount(root, point, 2, frozenset()))
        elif fstype == "cgroup":
            mounts.append(_Mount(root, point, 1, frozenset(options)))
    return mounts


def _unescape(text: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def _located(mount: _Mount, path: str) -> Path | None:
    """The directory of cgroup ``path`` under ``mount``, if the mount shows it."""
    root = mount.root.rstrip("/")
    if path != root and not path.startswith(root + "/"):
        return None
    directory = mount.point / path[len(root) :].lstrip("/")
    return directory if directory.is_dir() else None


def _v2(memberships: dict[str, str], mounts: list[_Mount], reasons: list[str]) -> Hierarchy | None:
    if "" not in memberships:
        return None
    for mount in (m for m in mounts if m.version == 2):
        directory = _located(mount, memberships[""])
        if directory is None:
            continue
        delegated = _words(directory / "cgroup.subtree_control")
        missing = [c for c in CONTROLLERS if c not in delegated]
        if missing:
            reasons.append(
                f"cgroup v2: {directory} does not delegate {', '.join(missing)} to its children"
            )
            return None
        if not os.access(directory, os.W_OK):
            reasons.append(f"cgroup v2: {directory} is not writable")
            return None
        return Hierarchy(2, {c: directory for c in CONTROLLERS})
    return None


def _v1(memberships: dict[str, str], mounts: list[_Mount], reasons: list[str]) -> Hierarchy | None:
    dirs: dict[str, Path] = {}
    for controller in CONTROLLERS:
        mount = next((m for m in mounts if m.version == 1 and controller in m.controllers), None)
        path = memberships.get(controller)
        if mount is None or path is None:
            reasons.append(f"cgroup v1: no {controller} hierarchy")
            return None
        directory = _located(mount, path)
        if directory is None or not os.access(directory, os.W_OK):
            reasons.append(f"cgroup v1: the server's {controller} cgroup is not writable")
            return None
        dirs[controller] = directory
    return Hierarchy(1, dirs)


def _words(path: Path) -> set[str]:
    try:
        return set(path.read_text().split())
    except OSError:
        return set()


# --------------------------------------------------------------------- one per process
_cgroups: Cgroups | str | None = None


def available() -> Cgroups | str:
    """This process's ``Cgroups``, or why workers get per-process limits instead; found
    once, and said once in the log."""
    global _cgroups
    if _cgroups is None:
        found = discover()
        if isinstance(found, Hierarchy):
            _cgroups = Cgroups(found)
            log.info("isolated workers' limits bind their whole process tree (%s)", found.label)
        else:
            _cgroups = found
            log.warning(
                "no cgroup can be created here (%s): isolated workers get per-process "
                "limits only (memory per process, no process count, CPU pinning only)",
                found,
            )
    return _cgroups


def remove_stale() -> None:
    """Remove the cgroups servers of ours left in this process's cgroups when they were
    killed outright (a server does this itself when it starts its first worker)."""
    found = discover()
    if isinstance(found, Hierarchy):
        for server_dir in set(found.server_dirs.values()):
            _remove_stale(server_dir)


def close() -> None:
    """Remove this server's cgroup directory, if it made one."""
    if isinstance(_cgroups, Cgroups):
        _cgroups.close()
