"""The first step of a worker's command: confine this process, then exec the worker.

Run by the server's interpreter (standard library only) as
``python -I -S -c BOOT PACKAGE_PARENT PLAN_JSON -- COMMAND...``. In order, before any
model code exists in the process:

1. join the worker's cgroups (so bwrap, the worker and every child are counted);
2. when the server runs as root and drops privileges: in a mount namespace of its own,
   bind each directory the sandbox needs onto a private staging tmpfs at ``STAGE_DIR``, so
   an unprivileged bwrap can reach them even when they sit below a directory it may not
   enter (``/root/.pyenv``, a 0700 cache); the host's mounts are untouched;
3. drop to the sandbox user (no supplementary groups) and exec ``COMMAND`` (bwrap).

A step that fails prints why on stderr (the server logs it) and exits with ``EXIT_FAILED``.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
from pathlib import Path
from typing import Any, Final

import ws_server

PACKAGE_PARENT: Final = str(Path(ws_server.__file__).resolve().parent.parent)


def boot(module: str) -> str:
    """``python -c`` code that puts the directory holding ``ws_server`` (its first
    argument) on the path and runs ``module``'s ``main``: how the launcher and the worker
    start, importing nothing but the standard library and us."""
    return f"import sys; sys.path.insert(0, sys.argv.pop(1)); from {module} import main; main()"


# -I -S: nothing from the environment or site-packages; only the standard library and us.
_BOOT: Final = boot("ws_server.isolation.launcher")
STAGE_DIR: Final = "/dev/shm"  # exists on every Linux; covered by our own tmpfs, privately
EXIT_FAILED: Final = 126
CLONE_NEWNS: Final = 0x00020000
MS_NOSUID: Final = 2
MS_NODEV: Final = 4
MS_BIND: Final = 4096
MS_REC: Final = 16384
MS_PRIVATE: Final = 1 << 18


def staged_path(index: int) -> str:
    """Where the ``index``-th staged directory appears to bwrap."""
    return f"{STAGE_DIR}/{index}"


def plan(cgroup_procs: list[str], stage: list[str], user: tuple[int, int] | None) -> dict[str, Any]:
    """The launcher's instructions: cgroup.procs files to join, directories to stage (in
    ``staged_path`` order), and the uid/gid to become (None: stay who we are)."""
    return {"cgroup_procs": cgroup_procs, "stage": stage, "user": user}


def prefix(instructions: dict[str, Any]) -> list[str]:
    """The argv that runs the launcher with ``instructions``; the command follows it."""
    return [sys.executable, "-I", "-S", "-c", _BOOT, PACKAGE_PARENT, json.dumps(instructions), "--"]


def needed(instructions: dict[str, Any]) -> bool:
    """Whether the launcher has anything to do (else the command runs as it is)."""
    return bool(instructions["cgroup_procs"] or instructions["stage"] or instructions["user"])


def _libc() -> Any:
    return ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"{what}: {os.strerror(error)}")


def join_cgroups(procs_files: list[str]) -> None:
    for procs in procs_files:
        with open(procs, "w") as target:
            target.write(str(os.getpid()))


def stage_directories(sources: list[str]) -> None:
    """Bind each source at ``staged_path(i)`` in a private mount namespace."""
    if not sources:
        return
    libc = _libc()
    _check(libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "making mounts private")
    # Open every source (in the new namespace) before the staging tmpfs may cover one.
    handles = [os.open(source, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC) for source in sources]
    _check(
        libc.mount(b"tmpfs", STAGE_DIR.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"mode=0755"),
        f"mounting a staging tmpfs on {STAGE_DIR}",
    )
    for index, handle in enumerate(handles):
        target = staged_path(index)
        os.mkdir(target, 0o755)
        source = f"/proc/self/fd/{handle}".encode()
        _check(libc.mount(source, target.encode(), None, MS_BIND | MS_REC, None), target)
        os.close(handle)


def become(uid: int, gid: int) -> None:
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)


def main() -> None:
    """Entry point: ``PLAN_JSON -- COMMAND...`` in ``sys.argv[1:]``."""
    instructions = json.loads(sys.argv[1])
    command = sys.argv[3:]
    try:
        join_cgroups(instructions["cgroup_procs"])
        stage_directories(instructions["stage"])
        if instructions["user"] is not None:
            become(*instructions["user"])
        os.execvp(command[0], command)
    except OSError as exc:
        print(f"worker launcher: {exc}", file=sys.stderr, flush=True)
        os._exit(EXIT_FAILED)


if __name__ == "__main__":
    main()
