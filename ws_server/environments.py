"""Builds and caches the virtualenvs isolated models run in.

An environment is keyed by a hash of what determines it (requirements.txt, the Python
version, the SDK version), lives in a cache outside the model directory (model
directories stay clean, file watchers stay quiet), and is shared by every model with the
same key. Built with ``uv`` (fast), or venv + pip where uv is unusable. A ``venv/`` the
author prepared inside the model directory, as the specification describes, is used as is.
"""

from __future__ import annotations

import asyncio
import glob
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Final

from ws_server.exceptions import ModelLoadError
from ws_server.model_config import Isolation
from ws_server.sdk import __version__ as SDK_VERSION

log = logging.getLogger("anything_agent.environments")

REQUIREMENTS: Final = "requirements.txt"
COMPLETE_MARKER: Final = ".complete"
ERROR_TAIL_LINES: Final = 12


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/anything-agent/envs``, usually ``~/.cache/anything-agent/envs``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "anything-agent" / "envs"


class EnvironmentBuilder:
    """Finds interpreters and builds (once) the environment each isolated model needs."""

    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = cache_dir
        self._locks: dict[str, asyncio.Lock] = {}

    def build_log(self, model: str) -> Path:
        """Where the installer's output for ``model`` is kept."""
        return self.cache_dir / "logs" / f"{model}.log"

    async def python_for(self, model: str, model_dir: Path, isolation: Isolation) -> Path:
        """The interpreter to run ``model`` with, building its environment if needed."""
        hand_made = model_dir / "venv" / "bin" / "python"
        if hand_made.exists():
            return hand_made
        base = find_python(isolation.python_version)
        requirements_file = model_dir / REQUIREMENTS
        requirements = (
            requirements_file.read_text(encoding="utf-8") if requirements_file.is_file() else ""
        )
        base_version = await asyncio.to_thread(_version_of, base)
        key = hashlib.sha256(
            "\0".join([requirements, base_version, SDK_VERSION]).encode()
        ).hexdigest()[:16]
        env_dir = self.cache_dir / key
        python = env_dir / "bin" / "python"
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            if (env_dir / COMPLETE_MARKER).exists():
                log.info("model %s: reusing environment %s", model, env_dir)
                return python
            started = time.monotonic()
            await asyncio.to_thread(self._build, model, base, requirements, env_dir)
            log.info(
                "model %s: environment %s built in %.1f s",
                model,
                env_dir,
                time.monotonic() - started,
            )
        return python

    def _build(self, model: str, base: Path, requirements: str, env_dir: Path) -> None:
        """Create the venv in a scratch directory, install, then move it into place."""
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.build_log(model)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        scratch = env_dir.with_name(f"{env_dir.name}.building-{os.getpid()}")
        shutil.rmtree(scratch, ignore_errors=True)
        requirements_path = scratch.with_suffix(".requirements.txt")
        requirements_path.write_text(requirements, encoding="utf-8")
        uv = _uv_binary()
        if uv is not None:
            steps = [[uv, "venv", "--quiet", "--python", str(base), str(scratch)]]
            install = [uv, "pip", "install", "--python", str(scratch / "bin" / "python")]
        else:
            steps = [[str(base), "-m", "venv", str(scratch)]]
            install = [
                str(scratch / "bin" / "python"),
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
            ]
        if requirements.strip():
            steps.append([*install, "-r", str(requirements_path)])
        try:
            with log_path.open("a", encoding="utf-8") as build_log:
                build_log.write(
                    f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} building "
                    f"{env_dir.name} with {base}\n"
                )
                for command in steps:
                    build_log.write("$ " + " ".join(command) + "\n")
                    build_log.flush()
                    result = subprocess.run(
                        command,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT,
                        text=True,
                        stdin=subprocess.DEVNULL,
                        check=False,
                    )
                    build_log.write(result.stdout)
                    if result.returncode != 0:
                        tail = "\n".join(result.stdout.strip().splitlines()[-ERROR_TAIL_LINES:])
                        raise ModelLoadError(
                            f"{REQUIREMENTS}: installing the environment failed "
                            f"(build log {log_path}):\n{tail}"
                        )
            (scratch / COMPLETE_MARKER).write_text(time.strftime("%Y-%m-%d %H:%M:%S\n"))
            shutil.rmtree(env_dir, ignore_errors=True)
            scratch.rename(env_dir)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
            requirements_path.unlink(missing_ok=True)


# uv never downloads interpreters: a model gets a Python that is on this machine, or a
# clear "not found" naming those that are.
_INSTALLER_ENV: Final = {**os.environ, "UV_PYTHON_DOWNLOADS": "never"}


def find_python(version: str | None) -> Path:
    """The interpreter for ``python_version`` (``python3.X`` on PATH or under pyenv);
    without one, the interpreter the server itself runs on."""
    if version is None:
        return Path(getattr(sys, "_base_executable", sys.executable))
    for candidate in _interpreters():
        if candidate.name == f"python{version}":
            return candidate
    found = sorted(
        {c.name.removeprefix("python") for c in _interpreters()},
        key=lambda v: tuple(int(p) for p in v.split(".")),
    )
    raise ModelLoadError(
        f"isolation.python_version: Python {version} not found; found: {', '.join(found)}"
    )


def _interpreters() -> list[Path]:
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


def _version_of(python: Path) -> str:
    """The full version (``3.11.7``) an interpreter reports."""
    result = subprocess.run(
        [str(python), "-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return result.stdout.strip()


def _uv_binary() -> str | None:
    """uv from its PyPI package (a declared dependency), else from PATH, else none."""
    try:
        from uv import find_uv_bin

        return str(find_uv_bin())
    except (ImportError, FileNotFoundError):
        return shutil.which("uv")
