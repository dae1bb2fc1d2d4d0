"""Makes sure Debian's Chromium is there for the browser tests, installing it when it can.

The browser tests never skip: on a machine without Chromium the test run installs it
(``apt-get``, as root or through password-less sudo) and fails with the reason if it can't.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

CHROMIUM = Path(os.environ.get("ANYTHING_AGENT_TEST_CHROMIUM", "/usr/bin/chromium"))
INSTALL_TIMEOUT = 900


class ChromiumUnavailable(RuntimeError):
    """Chromium is missing and could not be installed here."""


def _as_root() -> list[str]:
    if os.geteuid() == 0:
        return []
    if shutil.which("sudo") and subprocess.run(["sudo", "-n", "true"], check=False).returncode == 0:
        return ["sudo", "-n"]
    raise ChromiumUnavailable(
        f"{CHROMIUM} is missing and this user cannot install packages; "
        "install it with: sudo apt-get install chromium"
    )


def ensure_chromium() -> Path:
    """The Chromium binary, installed with apt-get first if it is missing."""
    if CHROMIUM.exists():
        return CHROMIUM
    if shutil.which("apt-get") is None:
        raise ChromiumUnavailable(f"{CHROMIUM} is missing and there is no apt-get to install it")
    prefix = _as_root()
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [*prefix, "apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"]
    started = time.monotonic()
    print(f"\nbrowser tests: {CHROMIUM} is missing; installing Debian's chromium", flush=True)
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
    if result.returncode != 0 or not CHROMIUM.exists():
        raise ChromiumUnavailable(
            f"installing chromium failed (apt-get exit {result.returncode}):\n"
            f"{result.stderr[-2000:]}"
        )
    print(f"browser tests: chromium installed in {time.monotonic() - started:.0f} s", flush=True)
    return CHROMIUM
