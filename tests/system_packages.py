"""Makes sure the Debian packages some tests drive are there, installing them when it can.

The browser tests need Chromium, the sandbox tests bubblewrap, the cluster tests Redis and
nginx. Those tests never skip: on a machine without the program, the test run installs its
package (``apt-get``, as root or through password-less sudo) and fails with the reason if
it can't.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

CHROMIUM = Path(os.environ.get("ANYTHING_AGENT_TEST_CHROMIUM", "/usr/bin/chromium"))
BWRAP = Path("/usr/bin/bwrap")
REDIS_SERVER = Path("/usr/bin/redis-server")
NGINX = Path("/usr/sbin/nginx")
INSTALL_TIMEOUT = 900


class PackageUnavailable(RuntimeError):
    """A program is missing and its package could not be installed here."""


def _as_root(binary: Path, package: str) -> list[str]:
    if os.geteuid() == 0:
        return []
    if shutil.which("sudo") and subprocess.run(["sudo", "-n", "true"], check=False).returncode == 0:
        return ["sudo", "-n"]
    raise PackageUnavailable(
        f"{binary} is missing and this user cannot install packages; "
        f"install it with: sudo apt-get install {package}"
    )


def ensure_package(binary: Path, package: str) -> Path:
    """``binary``, installed first with ``apt-get install package`` if it is missing."""
    if binary.exists():
        return binary
    if shutil.which("apt-get") is None:
        raise PackageUnavailable(f"{binary} is missing and there is no apt-get to install it")
    prefix = _as_root(binary, package)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [*prefix, "apt-get", "install", "-y", "-q", "--no-install-recommends", package]
    started = time.monotonic()
    print(f"\n{binary} is missing; installing Debian's {package}", flush=True)
    result = subprocess.run(
        install, env=env, capture_output=True, text=True, check=False, timeout=INSTALL_TIMEOUT
    )
    if result.returncode != 0:  # stale package lists on a fresh machine
        subprocess.run(
            [*prefix, "apt-get", "update", "-q"],
            env=env,
            capture_output=True,
            check=False,
            timeout=INSTALL_TIMEOUT,
        )
        result = subprocess.run(
            install, env=env, capture_output=True, text=True, check=False, timeout=INSTALL_TIMEOUT
        )
    if result.returncode != 0 or not binary.exists():
        raise PackageUnavailable(
            f"installing {package} failed (apt-get exit {result.returncode}):\n"
            f"{result.stderr[-2000:]}"
        )
    print(f"{package} installed in {time.monotonic() - started:.0f} s", flush=True)
    return binary
