"""The benchmark runner still works end to end (tiny figures; speed is not judged here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import ROOT


def test_bench_runs_every_server_and_reports_ratios(tmp_path: Path) -> None:
    output = tmp_path / "bench.json"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "run.py"),
            "--connections",
            "2",
            "--chunks",
            "50",
            "--turns",
            "1",
            "--samples",
            "5",
            "--json",
            str(output),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    figures = json.loads(output.read_text())
    assert set(figures) == {
        "bare websockets",
        "anything-agent shared",
        "anything-agent isolated",
        "spawn per request (seed)",
    }
    assert all(f["chunks_per_s"] > 0 and f["first_chunk_p50_us"] > 0 for f in figures.values())
    assert "ratio" in result.stdout
