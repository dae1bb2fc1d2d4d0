"""The benchmark still works end to end: every server, every mode, the table, the JSON and
the PNG, with tiny figures (speed is not judged here; bench/run.py is the benchmark)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

SERVERS = {
    "websockets",
    "aiohttp",
    "starlette",
    "shared",
    "isolated",
    "spawn",
    "nomodel-1",
    "nomodel",
}
MODES = {"throughput", "latency_1", "latency_crowd", "capacity"}


def test_bench_runs_every_server_and_mode_and_writes_json_and_chart(tmp_path: Path) -> None:
    output = tmp_path / "bench.json"
    chart = tmp_path / "bench.png"
    tiny = ["--connections", "2", "--chunks", "50", "--duration", "0.2", "--warmup", "0.05"]
    tiny += ["--crowd", "3", "--sessions", "20", "--rounds", "1"]
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), *tiny, "--json", str(output)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    payload = json.loads(output.read_text())
    servers = payload["servers"]
    assert set(servers) == SERVERS
    for key, figures in servers.items():
        assert "error" not in figures, (key, figures.get("error"), figures.get("log_tail"))
        assert MODES <= set(figures), key
        assert figures["throughput"]["chunks_per_s"] > 0, key
        assert figures["throughput"]["mb_per_s"] > 0, key
        assert figures["throughput"]["writes_per_chunk"] > 0, key
        for mode in ("latency_1", "latency_crowd"):
            latency = figures[mode]
            assert 0 < latency["p50_us"] <= latency["p99_us"] <= latency["max_us"], (key, mode)
        assert figures["capacity"]["handshakes_per_s"] > 0, key
        assert figures["capacity"]["rss_after_kib"] > 0, key
        assert not any(figures[mode]["errors"] for mode in MODES - {"capacity"}), key
    assert {t["met"] for t in payload["targets"]} <= {True, False}  # all measured
    assert chart.read_bytes().startswith(b"\x89PNG"), "the chart sits beside the JSON"
    table = result.stdout
    assert "chunks/s" in table and "×1.00" in table and "Targets" in table
    assert "AnythingAgent isolated" in table and "failed" not in table


def test_bench_profile_writes_a_summary_per_mode(tmp_path: Path) -> None:
    """--profile samples a server with py-spy and summarizes where its CPU went."""
    profiles = tmp_path / "profiles"
    tiny = ["--servers", "websockets", "--rounds", "1", "--duration", "0.3", "--warmup", "0.05"]
    tiny += ["--connections", "2", "--chunks", "50", "--crowd", "2", "--sessions", "10"]
    tiny += ["--json", str(tmp_path / "b.json"), "--profile", str(profiles)]
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), *tiny],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for mode in ("throughput", "latency", "capacity"):
        summary = (profiles / f"websockets-{mode}-summary.txt").read_text()
        assert "samples of CPU" in summary and "self (own time):" in summary, summary
