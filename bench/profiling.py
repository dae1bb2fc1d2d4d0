"""``run.py --profile DIR``: sample a server with py-spy while the bench loads it.

py-spy reads the server's stacks from outside (ptrace), so the servers run unchanged.
Only samples of a thread holding the GIL count (``--gil``): a thread waiting in epoll or
on a queue is left out, a socket write (which uvloop makes holding the GIL) stays in, so
what remains is where the server's core goes. Each recording is written as py-spy's
collapsed stacks ("raw") next to a summary: the functions with the most samples of their
own ("self"), and those on the most stacks ("total"). Profiled runs are extra runs: their
figures are not reported.
"""

from __future__ import annotations

import collections
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Final

RATE: Final = 500  # samples per second
_LINE: Final = re.compile(r":\d+\)$")


def py_spy() -> str:
    """The py-spy executable (installed with the ``bench`` extra)."""
    beside = Path(sys.executable).with_name("py-spy")
    found = str(beside) if beside.exists() else shutil.which("py-spy")
    if found is None:
        raise RuntimeError("--profile needs py-spy: pip install -e '.[bench]'")
    return found


class Recording:
    """py-spy sampling a process tree from now until ``stop``."""

    def __init__(self, pid: int, output: Path) -> None:
        output.parent.mkdir(parents=True, exist_ok=True)
        self.output = output
        self.process = subprocess.Popen(
            [
                py_spy(),
                *("record", "--pid", str(pid), "--subprocesses", "--gil", "--rate", str(RATE)),
                *("--format", "raw", "--output", str(output)),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def stop(self) -> None:
        """Stop sampling (SIGINT, as a Ctrl-C: py-spy then writes its file); raise if it
        wrote nothing."""
        self.process.send_signal(signal.SIGINT)
        try:
            _, errors = self.process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            _, errors = self.process.communicate()
        if not self.output.exists():
            raise RuntimeError(f"py-spy wrote no profile: {errors.decode()[-500:]}")


def summarize(raw: Path, top: int = 25) -> str:
    """The functions that hold the CPU, by own samples and by samples on their stack."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_LINE.sub(")", frame) for frame in stack.split(";")[1:]]  # [0]: the thread
        if not frames:
            continue
        samples += count
        own[frames[-1]] += count
        for frame in set(frames):
            total[frame] += count
    if not samples:
        return f"{raw.name}: no samples"

    def block(title: str, counter: collections.Counter[str]) -> list[str]:
        lines = [title]
        for frame, count in counter.most_common(top):
            lines.append(f"  {100 * count / samples:5.1f}%  {frame}")
        return lines

    return "\n".join(
        [
            f"{raw.name}: {samples} samples of CPU at {RATE}/s",
            *block("self (own time):", own),
            *block("total (on the stack):", total),
        ]
    )
