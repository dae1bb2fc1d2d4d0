"""Builds and caches the virtualenvs isolated models run in.

An environment is keyed by a hash of what determines it (requirements.txt, the Python
version, the SDK version), lives in a cache outside the model directory (model
directories stay clean, file watchers stay quiet), and is shared by every model with the
same key. Built with ``uv`` (fast), or venv + pip where uv is unusable. A ``venv/`` the
author prepared inside the model directory, as the specification describes, is used as is.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import glob
import hashlib
import logging
import os
import re
import shutil
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Final, TextIO

from ws_server import metrics
from ws_server.exceptions import ModelLoadError
from ws_server.registry.config import CONFIG_FILE, Isolation
from ws_server.sdk import __version__ as SDK_VERSION

log = logging.getLogger("anything_agent.environments")

REQUIREMENTS: Final = "requirements.txt"
COMPLETE_MARKER: Final = ".complete"
ERROR_TAIL_LINES: Final = 12
# Paths under the environment cache, as listings and client errors show them: the server's
# own directories are the operator's business (the server log has them whole).
PUBLIC_CACHE: Final = "<env-cache>"
# A build step silent this long gets a "still building" line in the log.
PROGRESS_EVERY: Final = 10.0
_OUTPUT_LINE_LIMIT: Final = 500  # characters of one installer line in the server log


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/anything-agent/envs``, usually ``~/.cache/anything-agent/envs``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "anything-agent" / "envs"


class EnvironmentBuilder:
    """Finds interpreters and builds (once) the environment each isolated model needs."""

    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = cache_dir
        self._builds: dict[str, asyncio.Task[None]] = {}

    def build_log(self, model: str) -> Path:
        """Where the installer's output for ``model`` is kept."""
        return self.cache_dir / "logs" / f"{model}.log"

    def public(self, text: str) -> str:
        """``text`` with paths under the cache shown relative to it (``<env-cache>/...``):
        for listings and clients; the server log keeps them whole."""
        for prefix in {str(self.cache_dir.resolve()), str(self.cache_dir)}:
            text = re.sub(re.escape(prefix) + r"(?![\w.-])", PUBLIC_CACHE, text)
        return text

    async def python_for(self, model: str, model_dir: Path, isolation: Isolation) -> Path:
        """The interpreter to run ``model`` with, building its environment if needed."""
        hand_made = model_dir / "venv" / "bin" / "python"
        if hand_made.exists():
            _own(model_dir, model_dir / "venv", "venv/")
            return hand_made
        base = find_python(isolation.python_version)
        requirements_file = model_dir / REQUIREMENTS
        if requirements_file.exists():
            _own(model_dir, requirements_file, REQUIREMENTS)
        requirements = (
            requirements_file.read_text(encoding="utf-8") if requirements_file.is_file() else ""
        )
        check_requirements(requirements, model_dir)
        base_version = await _version_of(base)
        parts = [requirements, base_version, SDK_VERSION]
        if _refers_to_paths(requirements):  # "-r base.txt", "./vendor/pkg": model-specific
            parts += [str(model_dir), *_referenced_files(requirements, model_dir)]
        key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
        env_dir = self.cache_dir / key
        if (env_dir / COMPLETE_MARKER).exists():
            log.info("model %s: reusing environment %s", model, env_dir)
            return env_dir / "bin" / "python"
        # One build per key, shared by every model that needs it; a caller that goes away
        # (a reload superseding it) does not stop the build others may be waiting for.
        build = self._builds.get(key)
        if build is None or build.done():
            build = asyncio.get_running_loop().create_task(
                self._build(model, base, requirements_file, requirements, env_dir, model_dir)
            )
            self._builds[key] = build
        await asyncio.shield(build)
        return env_dir / "bin" / "python"

    async def close(self) -> None:
        """Stop builds in progress (their installer processes are killed)."""
        for build in self._builds.values():
            build.cancel()
        if self._builds:
            await asyncio.gather(*self._builds.values(), return_exceptions=True)

    async def _build(
        self,
        model: str,
        base: Path,
        requirements_file: Path,
        requirements: str,
        env_dir: Path,
        model_dir: Path,
    ) -> None:
        """Create the venv in a scratch directory, install, then move it into place."""
        started = time.monotonic()
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.build_log(model)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_scratch(self.cache_dir)
        scratch = env_dir.with_name(f"{env_dir.name}.building-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        uv = _uv_binary()
        python = scratch / "bin" / "python"
        if uv is not None:
            steps = [[uv, "venv", "--quiet", "--python", str(base), str(scratch)]]
            install = [uv, "pip", "install", "--python", str(python), *WHEELS_ONLY]
        else:
            steps = [[str(base), "-m", "venv", str(scratch)]]
            install = [
                *(str(python), "-m", "pip", "install", "--disable-pip-version-check"),
                *WHEELS_ONLY,
            ]
        if requirements.strip():
            steps.append([*install, "-r", str(requirements_file)])
        outcome = "failed"
        log.info("model %s: building environment %s with %s", model, env_dir, base)
        try:
            with log_path.open("a", encoding="utf-8") as build_log:
                build_log.write(
                    f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} building "
                    f"{env_dir.name} with {base}\n"
                )
                for command in steps:
                    tail = await _run(command, model_dir, build_log, model, started)
                    if tail is not None:
                        raise ModelLoadError(
                            f"{REQUIREMENTS}: installing the environment failed "
                            f"(build log {log_path}):\n{tail}"
                        )
            (scratch / COMPLETE_MARKER).write_text(time.strftime("%Y-%m-%d %H:%M:%S\n"))
            try:
                scratch.rename(env_dir)  # atomic; fails if another process got there first
            except OSError:
                if not (env_dir / COMPLETE_MARKER).exists():
                    shutil.rmtree(env_dir, ignore_errors=True)
                    scratch.rename(env_dir)
            outcome = "built"
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
            metrics.ENV_BUILDS.labels(outcome=outcome).observe(time.monotonic() - started)
        log.info(
            "model %s: environment %s built in %.1f s", model, env_dir, time.monotonic() - started
        )


async def _run(
    command: list[str], cwd: Path, build_log: TextIO, model: str, started: float
) -> str | None:
    """Run one build step; ``None`` on success, else the tail of its output.

    The installer's output (uv writes its progress to stderr) goes to the build log and,
    line by line as it comes, to the server log prefixed with the model's name; a step
    silent for ``PROGRESS_EVERY`` seconds logs how long the build has taken so far.
    Cancelled (reload superseded it, server stopping): the installer is killed."""
    build_log.write("$ " + " ".join(command) + "\n")
    build_log.flush()
    process = await asyncio.create_subprocess_exec(
        *command,
        cwd=cwd,
        env=_INSTALLER_ENV,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert process.stdout is not None
    tail: collections.deque[str] = collections.deque(maxlen=ERROR_TAIL_LINES)
    try:
        async for line in _lines(process.stdout, model, started):
            build_log.write(line + "\n")
            build_log.flush()
            if line.strip():
                tail.append(line)
                log.info("model %s: installer: %s", model, line.strip()[:_OUTPUT_LINE_LIMIT])
        await process.wait()
    except asyncio.CancelledError:
        kill(process)
        await process.wait()
        raise
    return None if process.returncode == 0 else "\n".join(tail)


async def _lines(stream: asyncio.StreamReader, model: str, started: float) -> AsyncIterator[str]:
    """The lines of ``stream`` as they come (however long: no line limit to overrun),
    with a "still building" log line whenever it has been silent for a while."""
    pending = b""
    while True:
        try:
            data = await asyncio.wait_for(stream.read(65536), PROGRESS_EVERY)
        except TimeoutError:
            elapsed = time.monotonic() - started
            log.info("model %s: still building the environment (%.0f s so far)", model, elapsed)
            continue
        if not data:
            break
        *complete, pending = (pending + data).split(b"\n")
        for line in complete:
            yield line.decode(errors="replace").rstrip("\r")
    if pending:
        yield pending.decode(errors="replace")


def kill(process: asyncio.subprocess.Process) -> None:
    """Kill a child process that may have exited meanwhile (then there is nothing to kill:
    uvloop, the server's loop, raises ProcessLookupError for it)."""
    with contextlib.suppress(ProcessLookupError):
        process.kill()


# Wheels install without running any of their code; a source distribution runs its build
# backend (setup.py and the like), which would be a model's code running on the server,
# outside its sandbox. So isolated models install wheels only.
WHEELS_ONLY: Final = ("--only-binary", ":all:")
# Options a requirements file may hold (anything else could change how packages build).
_ALLOWED_OPTIONS: Final = (
    "-r",
    "--requirement",
    "-c",
    "--constraint",
    "-i",
    "--index-url",
    "--extra-index-url",
    "-f",
    "--find-links",
    "--pre",
    "--prefer-binary",
    "--only-binary",
)
_VCS: Final = re.compile(r"^(git|hg|svn|bzr)\+", re.IGNORECASE)


def check_requirements(requirements: str, model_dir: Path, depth: int = 0) -> None:
    """Refuse what would run the model's own code at install time or read files outside
    its directory: editable installs, VCS URLs, options outside a short list, and
    ``-r``/``-c`` or local paths that leave the model directory."""
    root = model_dir.resolve()
    for number, raw in enumerate(requirements.splitlines(), 1):
        line = raw.split(" #")[0].strip()
        if not line or line.startswith("#"):
            continue
        where = f"{REQUIREMENTS}: line {number}"
        option = line.split()[0].split("=")[0]
        if option.startswith("-"):
            if option in ("-e", "--editable"):
                raise ModelLoadError(f"{where}: editable installs build from source; not allowed")
            if option not in _ALLOWED_OPTIONS:
                raise ModelLoadError(f"{where}: the option {option} is not allowed here")
            if option in ("-r", "--requirement", "-c", "--constraint"):
                target = _inside(line.split(maxsplit=1)[-1].split("=", 1)[-1], root, where)
                if depth < 3 and target.is_file():
                    check_requirements(target.read_text(encoding="utf-8"), model_dir, depth + 1)
            continue
        if _VCS.match(line):
            raise ModelLoadError(f"{where}: VCS requirements build from source; not allowed")
        if line.startswith(("./", "../", "/", "file:")):
            _inside(line.removeprefix("file:").removeprefix("//"), root, where)


def _inside(path: str, root: Path, where: str) -> Path:
    target = (root / path.strip()).resolve()
    if not target.is_relative_to(root):
        raise ModelLoadError(f"{where}: {path.strip()} is outside the model directory")
    return target


def _refers_to_paths(requirements: str) -> bool:
    for line in requirements.splitlines():
        line = line.strip()
        if (
            line.startswith(("-r", "-c", "-e", ".", "/", "--requirement", "--constraint"))
            or "file:" in line
        ):
            return True
    return False


def _referenced_files(requirements: str, model_dir: Path) -> list[str]:
    """The contents of files named by ``-r``/``-c`` lines, so editing them rebuilds."""
    contents = []
    for line in requirements.splitlines():
        parts = line.strip().split(maxsplit=1)
        if len(parts) == 2 and parts[0] in ("-r", "-c", "--requirement", "--constraint"):
            try:
                contents.append((model_dir / parts[1]).read_text(encoding="utf-8"))
            except OSError:
                contents.append(f"missing:{parts[1]}")
    return contents


def _remove_stale_scratch(cache_dir: Path) -> None:
    """Scratch directories of builds that died with their server (a day old or more)."""
    for scratch in cache_dir.glob("*.building-*"):
        try:
            if time.time() - scratch.stat().st_mtime > 86400:
                shutil.rmtree(scratch, ignore_errors=True)
        except OSError:
            pass


# uv never downloads interpreters: a model gets a Python that is on this machine, or a
# clear "not found" naming those that are.
# Server settings (API and admin keys) stay out of installers and the packages' build
# scripts they run.
_INSTALLER_ENV: Final = {
    **{k: v for k, v in os.environ.items() if not k.startswith("ANYTHING_AGENT_")},
    "UV_PYTHON_DOWNLOADS": "never",
}


def _own(model_dir: Path, path: Path, name: str) -> None:
    """A model's own file or directory must be in its directory, symlinks followed: one
    pointing elsewhere would have the server (as root, maybe) read or bind what the model
    may not see."""
    if not path.resolve().is_relative_to(model_dir.resolve()):
        raise ModelLoadError(f"{name} must be inside the model directory, not a link out of it")


def find_python(version: str | None) -> Path:
    """The interpreter for ``python_version`` (``python3.X`` on PATH or under pyenv);
    without one, the interpreter the server itself runs on."""
    if version is None:
        return Path(getattr(sys, "_base_executable", sys.executable))
    for candidate in interpreters():
        if candidate.name == f"python{version}":
            return candidate
    found = sorted(
        {c.name.removeprefix("python") for c in interpreters()},
        key=lambda v: tuple(int(p) for p in v.split(".")),
    )
    raise ModelLoadError(
        f"{CONFIG_FILE}: isolation.python_version: Python {version} not found; "
        f"found: {', '.join(found) or 'none'}"
    )


def interpreters() -> list[Path]:
    """Every ``python3.X`` on PATH and in pyenv's versions directory."""
    found: list[Path] = []
    pattern = re.compile(r"^python3\.\d+$")
    directories = os.environ.get("PATH", "").split(os.pathsep)
    pyenv_root = os.environ.get("PYENV_ROOT") or str(Path.home() / ".pyenv")
    directories += sorted(glob.glob(os.path.join(pyenv_root, "versions", "*", "bin")))
    for directory in directories:
        if "shims" in directory:  # pyenv shims defer to a global choice: not a real version
            continue
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        for name in sorted(names):
            path = Path(directory) / name
            if pattern.match(name) and os.access(path, os.X_OK):
                found.append(path)
    return found


async def _version_of(python: Path) -> str:
    """The full version (``3.11.7``) an interpreter reports."""
    try:
        process = await asyncio.create_subprocess_exec(
            str(python),
            "-c",
            "import sys; print('%d.%d.%d' % sys.version_info[:3])",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as exc:
        raise ModelLoadError(f"isolation: cannot run {python}: {exc}") from None
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    except (TimeoutError, asyncio.CancelledError) as exc:
        kill(process)
        await process.wait()
        if isinstance(exc, TimeoutError):
            raise ModelLoadError(f"isolation: {python} did not answer within 60 s") from None
        raise
    if process.returncode != 0:
        raise ModelLoadError(f"isolation: {python} failed: {stderr.decode(errors='replace')}")
    return stdout.decode().strip()


def _uv_binary() -> str | None:
    """uv from its PyPI package (a declared dependency), else from PATH, else none."""
    try:
        from uv import find_uv_bin

        return str(find_uv_bin())
    except (ImportError, FileNotFoundError):
        return shutil.which("uv")
