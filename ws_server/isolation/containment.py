"""What confines one isolated worker, put together: the bubblewrap sandbox, its seccomp
filter, the host user it runs as, the cgroup bounding its process tree, and the
launcher that applies what must happen before exec. Also the listing's ``sandbox``
field: which of these protections hold for the model on this host.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import pwd
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from ws_server.exceptions import CgroupUnavailable, ModelLoadError
from ws_server.isolation import cgroups, launcher, sandbox, syscall_filter

log = logging.getLogger("anything_agent.isolated")

DEFAULT_PIDS: Final = 64  # isolation.resources.pids when config.yaml sets none
_PRIVATE_ENV_PREFIXES: Final = ("ANYTHING_AGENT_",)  # server settings: not the model's
_warned_seccomp = False


@dataclass(frozen=True)
class Request:
    """What the runner asks for one worker."""

    model: str
    model_dir: Path
    python: Path
    package_dir: Path
    memory_bytes: int | None
    memory_text: str | None
    cpus: float | None
    pids: int
    network: bool
    sandbox_mode: str
    sandbox_share: tuple[tuple[str, str], ...]


@dataclass
class Confinement:
    """How to start one worker, and what to undo when it ends."""

    command: list[str]
    environment: dict[str, str]
    pass_fds: tuple[int, ...]
    group: cgroups.WorkerGroup | None
    sandboxed: bool
    report: dict[str, Any]
    _own_fds: list[int] = field(default_factory=list)
    memory_limited: bool = False  # the cgroup has a memory limit whose kills to watch

    def started(self) -> None:
        """The worker has its copies of our descriptors: close ours."""
        for descriptor in self._own_fds:
            with contextlib.suppress(OSError):
                os.close(descriptor)
        self._own_fds.clear()

    def ended(self, pid: int | None) -> None:
        """The worker (``pid``; None if it never started) exited: end whatever it left
        behind, and remove its cgroup."""
        self.started()
        if self.group is not None:
            self.group.remove()
        elif not self.sandboxed and pid:  # no cgroup, no PID namespace: its process group
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)

    def memory_breached(self, since: int | None = None) -> bool:
        """Whether the kernel killed one of the worker's processes for memory (since the
        worker started, or since ``oom_kills()`` said ``since``)."""
        if not self.memory_limited or self.group is None:
            return False
        return self.group.oom_kills() > (self.group.oom_baseline if since is None else since)

    def oom_kills(self) -> int:
        """The kernel's count of memory kills in the worker's group (0 without a limit)."""
        return self.group.oom_kills() if self.memory_limited and self.group else 0


async def confine(request: Request, worker_command: list[str]) -> Confinement:
    """The command, environment and descriptors that start ``worker_command`` confined as
    far as this host allows; raises ``ModelLoadError`` when ``--sandbox on`` can't be met."""
    bwrap = await sandbox.choose(request.sandbox_mode)
    group = _cgroup(request)
    try:
        return _confined(request, worker_command, bwrap, group)
    except BaseException:
        if group is not None:  # refused (or cancelled) before a worker existed
            group.remove()
        raise


def _confined(
    request: Request,
    worker_command: list[str],
    bwrap: sandbox.Bubblewrap | None,
    group: cgroups.WorkerGroup | None,
) -> Confinement:
    limited = group is not None and request.memory_bytes is not None
    if bwrap is None:
        environment = {
            k: v for k, v in os.environ.items() if not k.startswith(_PRIVATE_ENV_PREFIXES)
        }
        instructions = launcher.plan(group.procs_files if group else [], [], None)
        command = _launched(instructions, worker_command)
        report = _report(request, None, group, seccomp=False, user=None)
        return Confinement(command, environment, (), group, False, report, memory_limited=limited)
    shared = sandbox.shared_variables(request.sandbox_share)
    user = sandbox.host_user()
    box = sandbox.SandboxSpec(
        python=request.python,
        package_dir=request.package_dir,
        model_dir=request.model_dir,
        network=request.network,
        shared=tuple(Path(path) for path in shared.values()),
        tmp_bytes=request.memory_bytes,
        staged=user is not None,
    )
    stage = _readable_by(user, box) if user else []
    seccomp_fd = _seccomp_fd()  # last: nothing after it can fail and leave it open
    box = dataclasses.replace(box, seccomp_fd=seccomp_fd)
    instructions = launcher.plan(group.procs_files if group else [], stage, user)
    command = _launched(instructions, [*sandbox.command(bwrap, box), *worker_command])
    environment = sandbox.worker_environment(os.environ, request.python, shared)
    own = [seccomp_fd] if seccomp_fd is not None else []
    report = _report(request, bwrap, group, seccomp=seccomp_fd is not None, user=user)
    return Confinement(
        command, environment, tuple(own), group, True, report, own, memory_limited=limited
    )


def _readable_by(user: tuple[int, int], box: sandbox.SandboxSpec) -> list[str]:
    """The directories to stage for bwrap running as ``user``; each must be open to it
    (those above need not be: staging reaches them without walking the path)."""
    sources = sandbox.staged_sources(box)
    for index, path in enumerate(sources):
        writable = index >= len(sources) - len(box.shared)
        need = 0o007 if writable else 0o005
        info = path.stat()
        if info.st_uid != user[0] and info.st_mode & need != need:
            mode = "o+rwx" if writable else "o+rX"
            raise ModelLoadError(
                f"isolation: the sandbox runs as {_user_name(user[0])} (the server is root), "
                f"which cannot {'write' if writable else 'read'} {path}: chmod {mode} it"
            )
    return [str(path) for path in sources]


def _launched(instructions: dict[str, Any], command: list[str]) -> list[str]:
    return [*launcher.prefix(instructions), *command] if launcher.needed(instructions) else command


def _cgroup(request: Request) -> cgroups.WorkerGroup | None:
    found = cgroups.available()
    if isinstance(found, str):
        return None
    limits = cgroups.Limits(request.memory_bytes, request.pids, request.cpus)
    try:
        return found.create(request.model, limits)
    except CgroupUnavailable as exc:
        log.warning("model %s: %s; its worker gets per-process limits", request.model, exc)
        return None


def _seccomp_fd() -> int | None:
    global _warned_seccomp
    problem = syscall_filter.available()
    if problem is None:
        return syscall_filter.memfd()
    if not _warned_seccomp:
        _warned_seccomp = True
        log.warning("sandboxed workers run with %s (install libseccomp2)", problem)
    return None


def _report(
    request: Request,
    bwrap: sandbox.Bubblewrap | None,
    group: cgroups.WorkerGroup | None,
    seccomp: bool,
    user: tuple[int, int] | None,
) -> dict[str, Any]:
    """The listing's ``sandbox``: which protections hold for this model here."""
    limits = f"cgroup v{group.version}" if group is not None else "per-process"
    return {
        "bubblewrap": bwrap is not None,
        "network": request.network or bwrap is None,
        "read_only_root": bwrap is not None,
        "private_tmp": bwrap is not None,
        "seccomp": seccomp,
        "host_user": _user_name(user[0] if user else os.geteuid()),
        "limits": limits,
        "memory": request.memory_text,
        "pids": request.pids if group is not None else None,
        "cpu": request.cpus,
    }


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def model_pid(outer_pid: int) -> int:
    """The host pid of the worker's interpreter: ``outer_pid`` itself, or, when that is
    bwrap, the process below bwrap and its init."""
    pid = outer_pid
    for _ in range(3):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() != "bwrap":
                return pid
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            return pid
        if not children:
            return pid
        pid = int(children[0])
    return pid
