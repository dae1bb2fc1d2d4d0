"""The bubblewrap sandbox isolated workers run in.

A sandboxed worker runs as ``nobody`` in its own user, PID, IPC, UTS (and, unless its
model asks for ``isolation: {network: true}``, network) namespaces, over a read-only
filesystem built from binds of only what its interpreter needs: the system directories,
a short list of ``/etc`` files, its virtualenv and base Python, the ``ws_server`` package
it imports and its own model directory. ``/tmp`` (also its ``HOME``) and ``/dev/shm`` are
private tmpfs sized by the model's memory limit, the only writable places. A seccomp
filter (``syscall_filter``) refuses system calls no model needs. When the server runs as
root, bwrap itself runs as ``nobody`` on the host (``host_user``), so the worker is no one
outside its namespace either; the directories it binds are then staged by ``launcher``.
Its environment is rebuilt from scratch (``worker_environment``), so none of the server's
variables (API keys among them) reach it; it is handed to bwrap as bwrap's own
environment, never as ``--setenv`` arguments any local user could read in ``ps``.

``command`` builds the ``bwrap`` argv from a ``SandboxSpec`` (pure, apart from looking at
which system directories exist); ``choose`` applies the server's ``--sandbox`` setting,
probing once per process whether bubblewrap works here.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import pwd
import re
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from ws_server.exceptions import ModelLoadError
from ws_server.isolation import launcher
from ws_server.settings import SANDBOX_MODES

log = logging.getLogger("anything_agent.sandbox")

BWRAP: Final = "bwrap"  # looked up on the server's PATH
# ``nobody``: inside its user namespace the worker is no one in particular. Outside, it is
# the uid bwrap runs as: the server's own, or ``nobody`` too when the server is root
# (``host_user``); either way it holds no capabilities anywhere.
SANDBOX_UID: Final = 65534
SANDBOX_USER: Final = "nobody"
# Used from bubblewrap 0.8.0 on (--disable-userns is new there); older ones still
# sandbox, just without these two.
DISABLE_USERNS_SINCE: Final = (0, 8, 0)  # no nested user namespaces inside the sandbox
TMPFS_SIZE_SINCE: Final = (0, 8, 0)  # /tmp bounded by the model's memory limit
SYSTEM_DIRECTORIES: Final = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
# What the C library, Python's ssl/socket/time modules and pwd need from /etc.
ETC_ENTRIES: Final = (
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "alternatives",
    "localtime",
    "timezone",
    "ssl",
    "ca-certificates",
    "pki",
    "resolv.conf",
    "hosts",
    "host.conf",
    "gai.conf",
    "nsswitch.conf",
    "protocols",
    "services",
    "passwd",
    "group",
)
SANDBOX_TMP: Final = "/tmp"
SANDBOX_SHM: Final = "/dev/shm"
SHM_DEFAULT_BYTES: Final = 64 * 1024 * 1024  # /dev/shm when the model sets no memory limit
SANDBOX_PATH: Final = "/usr/local/bin:/usr/bin:/bin"
# Server variables worth keeping: they change how text and time are shown, nothing else.
LOCALE_VARIABLES: Final = ("LANG", "LANGUAGE", "LC_ALL", "LC_CTYPE", "TZ")
PROBE_TIMEOUT: Final = 30.0
# A bind's source must be at least this deep ("/a/b"): never "/" or a top-level directory.
MIN_BIND_DEPTH: Final = 3


@dataclass(frozen=True)
class Bubblewrap:
    """A bwrap binary that was seen to work here, and its version."""

    path: str
    version: tuple[int, ...]


@dataclass(frozen=True)
class SandboxSpec:
    """What one worker's sandbox is made of."""

    python: Path  # the worker's interpreter, normally a virtualenv's bin/python
    package_dir: Path  # the ws_server package the worker imports
    model_dir: Path
    network: bool = False
    shared: tuple[Path, ...] = ()  # directories bound read-write
    tmp_bytes: int | None = None  # size of the private /tmp (None: the kernel's default)
    seccomp_fd: int | None = None  # a descriptor holding the BPF filter bwrap installs
    staged: bool = False  # bind sources from launcher's staging (bwrap runs as nobody)


def command(bwrap: Bubblewrap, spec: SandboxSpec) -> list[str]:
    """The ``bwrap ... --`` prefix that runs a worker command inside the sandbox."""
    read_only, shared = read_only_paths(spec), list(spec.shared)
    sources = [*read_only, *shared]
    if spec.staged:  # bwrap reads each from where launcher.py staged it
        sources = [Path(launcher.staged_path(i)) for i in range(len(sources))]
    seccomp = ["--seccomp", str(spec.seccomp_fd)] if spec.seccomp_fd is not None else []
    return [
        bwrap.path,
        *_namespaces(bwrap, spec.network),
        *system_mounts(),
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        *_private_tmpfs(bwrap, SANDBOX_SHM, spec.tmp_bytes or SHM_DEFAULT_BYTES),
        *_private_tmpfs(bwrap, SANDBOX_TMP, spec.tmp_bytes),
        *_pairs("--ro-bind", zip(sources, read_only, strict=False)),
        *_pairs("--bind", zip(sources[len(read_only) :], shared, strict=True)),
        # Everything else is read-only: a write outside /tmp and /dev/shm can't grow the
        # host's memory through the sandbox's root tmpfs (not recursive: those two stay).
        *("--remount-ro", "/dev", "--remount-ro", "/"),
        *seccomp,
        "--chdir",
        str(spec.model_dir),
        "--",
    ]


def staged_sources(spec: SandboxSpec) -> list[Path]:
    """The directories ``command`` binds, in the order ``launcher`` must stage them."""
    return [*read_only_paths(spec), *spec.shared]


@functools.cache
def host_user() -> tuple[int, int] | None:
    """The (uid, gid) bwrap runs as on the host: ``nobody`` when the server is root (a
    sandboxed process must not be root outside its namespace either), else None: the
    server's own unprivileged user."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(SANDBOX_USER)
    except KeyError:
        return (SANDBOX_UID, SANDBOX_UID)
    return (entry.pw_uid, entry.pw_gid)


def _namespaces(bwrap: Bubblewrap, network: bool) -> list[str]:
    """Every namespace bwrap can give, but the network one when the model may use it.

    A new PID namespace hides the server's /proc/<pid>/environ; --die-with-parent and
    bwrap's own init (PID 1 inside) make sure no process outlives the sandbox."""
    arguments = ["--unshare-user", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID)]
    if bwrap.version >= DISABLE_USERNS_SINCE:
        arguments.append("--disable-userns")
    arguments += ["--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
    if not network:
        arguments.append("--unshare-net")  # a loopback interface of its own, nothing else
    arguments += ["--hostname", "sandbox", "--die-with-parent", "--new-session"]
    return [*arguments, "--cap-drop", "ALL"]  # said outright: bwrap run by root may keep some


def system_mounts() -> list[str]:
    """Read-only system directories (merged-/usr symlinks kept as symlinks) and the few
    /etc entries that exist here."""
    arguments: list[str] = []
    for directory in SYSTEM_DIRECTORIES:
        path = Path(directory)
        if path.is_symlink():
            arguments += ["--symlink", os.readlink(path), directory]
        elif path.is_dir():
            arguments += ["--ro-bind", directory, directory]
    for entry in ETC_ENTRIES:
        arguments += ["--ro-bind-try", f"/etc/{entry}", f"/etc/{entry}"]
    return arguments


def _private_tmpfs(bwrap: Bubblewrap, path: str, size: int | None) -> list[str]:
    sized = ["--size", str(size)] if size and bwrap.version >= TMPFS_SIZE_SINCE else []
    return [*sized, "--tmpfs", path]


def read_only_paths(spec: SandboxSpec) -> list[Path]:
    """The worker's virtualenv and base interpreter, the ``ws_server`` package and the
    model directory, minus any already visible through another bind.

    Each is resolved (symlinks followed, as bwrap would) and must be a real, specific
    directory: a model's hand-made venv whose ``pyvenv.cfg`` or symlinks point at ``/``
    (or any top-level directory) would otherwise bind the whole filesystem."""
    wanted = [*interpreter_paths(spec.python), spec.package_dir, spec.model_dir]
    covered = [Path(d) for d in SYSTEM_DIRECTORIES]
    chosen: list[Path] = []
    for path in wanted:
        real = path.resolve()
        if any(real.is_relative_to(root) for root in (*covered, *chosen)):
            continue
        if len(real.parts) < MIN_BIND_DEPTH or not real.is_dir():
            raise ModelLoadError(
                f"isolation: the sandbox will not bind {real} (from {path}): too broad or "
                "not a directory"
            )
        chosen.append(real)
    return chosen


def interpreter_paths(python: Path) -> list[Path]:
    """What running ``python`` reads: its virtualenv (the directory holding
    ``pyvenv.cfg``) and the base installation it points to (``home``'s parent, and the
    prefix its symlinks end in; pyenv's live under ~/.pyenv/versions/X)."""
    python = Path(os.path.abspath(python))
    virtualenv = python.parent.parent
    paths = [virtualenv]
    home = _home(virtualenv / "pyvenv.cfg")
    if home is not None:
        paths += [p for p in (home.parent, home.resolve().parent) if _is_python_prefix(p)]
    base = python.resolve().parent.parent
    if _is_python_prefix(base):
        paths.append(base)
    return list(dict.fromkeys(paths))


def _is_python_prefix(prefix: Path) -> bool:
    """Whether ``prefix`` is a Python installation (it has ``lib/python3.*/os.py``), so a
    made-up ``home`` can't name some other directory to bind."""
    try:
        if len(prefix.resolve().parts) < MIN_BIND_DEPTH:  # "/": /usr's Python is bound anyway
            return False
        return any(prefix.glob("lib/python3*/os.py"))
    except OSError:
        return False


def _home(config: Path) -> Path | None:
    """``home`` of a virtualenv's ``pyvenv.cfg``: the base interpreter's bin directory."""
    try:
        text = config.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "home" and value.strip():
            return Path(value.strip())
    return None


def worker_environment(
    host: Mapping[str, str], python: Path, shared: Mapping[str, str]
) -> dict[str, str]:
    """The worker's whole environment: a PATH starting with its virtualenv, a private
    HOME and TMPDIR, the server's locale settings, and the shared variables."""
    values = {
        "PATH": f"{Path(python).parent}:{SANDBOX_PATH}",
        "HOME": SANDBOX_TMP,
        "TMPDIR": SANDBOX_TMP,
        "PYTHONUNBUFFERED": "1",  # for the model's own subprocesses (the worker runs -u)
    }
    values.update({name: host[name] for name in LOCALE_VARIABLES if name in host})
    values.update(shared)
    return values


def shared_variables(share: Iterable[tuple[str, str]]) -> dict[str, str]:
    """``--sandbox-share``'s variables and values; each must be an existing directory,
    which the sandbox binds read-write and whose variable the worker gets."""
    shared: dict[str, str] = {}
    for name, value in share:
        if not value or not os.path.isabs(value) or not os.path.isdir(value):
            raise ModelLoadError(
                f"isolation: --sandbox-share names {name}, which is not set to a directory"
            )
        shared[name] = value
    return shared


def _pairs(option: str, pairs: Iterable[tuple[object, object]]) -> list[str]:
    arguments: list[str] = []
    for first, second in pairs:
        arguments += [option, str(first), str(second)]
    return arguments


# --------------------------------------------------------------------- availability
_probed: dict[str, Bubblewrap | str] = {}  # bwrap path -> what the probe found
_probe_lock: asyncio.Lock | None = None
_warned = False


async def choose(mode: str) -> Bubblewrap | None:
    """The bubblewrap to sandbox a worker with under ``--sandbox MODE``; None to run it
    unsandboxed (``off``, or ``auto`` where bubblewrap does not work, said once in the
    log). Under ``on``, a sandbox that cannot be set up fails the model, naming why."""
    global _warned
    if mode not in SANDBOX_MODES:
        raise ModelLoadError(f"isolation: unknown sandbox mode {mode!r}")
    if mode == "off":
        return None
    found = await probe()
    if isinstance(found, Bubblewrap):
        return found
    if mode == "on":
        raise ModelLoadError(f"isolation: the sandbox is required (--sandbox on) but {found}")
    if not _warned:
        _warned = True
        log.warning(
            "isolated models run WITHOUT a sandbox: %s (install bubblewrap, or pass "
            "--sandbox off to silence this)",
            found,
        )
    return None


async def probe() -> Bubblewrap | str:
    """Whether bubblewrap works here: a ``Bubblewrap``, or why not. Tried once per
    process (per bwrap found on PATH) with the namespaces every worker gets."""
    global _probe_lock
    path = shutil.which(BWRAP)
    if path is None:
        return f"{BWRAP} is not installed (not found on PATH)"
    if _probe_lock is None:
        _probe_lock = asyncio.Lock()
    async with _probe_lock:
        if path not in _probed:
            _probed[path] = await _try(path)
        return _probed[path]


async def _try(path: str) -> Bubblewrap | str:
    """Ask bwrap its version, then run ``true`` in a minimal sandbox."""
    code, output = await _run([path, "--version"])
    match = re.search(r"(\d+)\.(\d+)\.(\d+)", output)
    if code != 0 or match is None:
        return f"{path} --version failed: {output.strip()[-300:] or f'exit code {code}'}"
    bwrap = Bubblewrap(path, tuple(int(part) for part in match.groups()))
    # As workers will run it: as nobody when the server is root.
    as_user = launcher.plan([], [], host_user())
    runner = launcher.prefix(as_user) if launcher.needed(as_user) else []
    code, output = await _run([*runner, *_probe_command(bwrap)])
    if code != 0:
        return f"{path} cannot create a sandbox here: {output.strip()[-300:] or code}"
    return bwrap


def _probe_command(bwrap: Bubblewrap) -> list[str]:
    """``true`` in a sandbox with every worker's namespaces and system mounts."""
    true = next((t for t in ("/usr/bin/true", "/bin/true") if os.path.exists(t)), "true")
    return [
        bwrap.path,
        *_namespaces(bwrap, network=False),
        *system_mounts(),
        *("--proc", "/proc", "--dev", "/dev"),
        *_private_tmpfs(bwrap, SANDBOX_TMP, 1024 * 1024),
        *("--remount-ro", "/"),
        "--",
        true,
    ]


async def _run(arguments: list[str]) -> tuple[int, str]:
    """Exit code and combined output of a short command; never raises."""
    try:
        process = await asyncio.create_subprocess_exec(
            *arguments,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={"PATH": SANDBOX_PATH},
        )
    except OSError as exc:
        return 127, str(exc)
    try:
        stdout, _ = await asyncio.wait_for(process.communicate(), PROBE_TIMEOUT)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):  # exited, not yet reaped
            process.kill()
        await process.wait()
        return 124, f"timed out after {PROBE_TIMEOUT:g} s"
    return process.returncode or 0, stdout.decode(errors="replace")
