"""The benchmark still works end to end: every server, every mode, the table, the JSON and
the PNG, with tiny figures (speed is not judged here; bench/run.py is the benchmark). The
Redis row and the cluster mode run redis-server and nginx (installed by the run if missing),
the Ray row a private single-node Ray head (the ``ray`` extra); the sse mode alone needs
none of them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import CLUSTER_PROBLEM, ROOT

SERVERS = {
    "websockets",
    "aiohttp",
    "starlette",
    "before",
    "shared",
    "workers2",
    "resumable",
    "redis",
    "isolated",
    "ray",
    "spawn",
    "nomodel-1",
    "nomodel",
}
MODES = {"throughput", "latency_1", "latency_crowd", "capacity", "resume"}
RESUME_SAMPLES = 6
DETACHED = 4
BUFFER = 16 * 1024
SSE_TURNS = 20
SSE_PATHS = {"ws", "sse", "starlette_sse"}
TINY_SSE = ["--sse-turns", str(SSE_TURNS), "--sse-chunks", "50", "--sse-connections", "2"]


def check_sse(payload: dict[str, Any]) -> None:
    """The sse mode's figures: every path timed and streamed, without an error."""
    found = payload["sse"]
    assert "failed" not in found, found
    assert set(found["servers"]) == {"anything_agent", "starlette_sse"}, found["servers"]
    assert "--no-limits" in found["servers"]["anything_agent"]["command"]
    assert set(found["latency"]) == SSE_PATHS, found["latency"]
    for path, latency in found["latency"].items():
        assert latency["samples"] == SSE_TURNS and not latency["errors"], (path, latency)
        assert 0 < latency["p50_us"] <= latency["p99_us"] <= latency["max_us"], (path, latency)
    for load, connections in (("throughput_1", 1), ("throughput_n", 2)):
        for path in SSE_PATHS:
            figures = found[load][path]
            assert figures["connections"] == connections, (load, path, figures)
            assert figures["chunks_per_s"] > 0 and not figures["errors"], (load, path, figures)
            assert figures["cpu_server_pct"] > 0, (load, path, figures)
    assert all(value is not None for value in found["compare"].values()), found["compare"]
    (target,) = [t for t in payload["targets"] if "SSE first-chunk" in t["target"]]
    assert target["met"] in (True, False), target


@pytest.mark.cluster
def test_bench_runs_every_server_and_mode_and_writes_json_and_chart(
    tmp_path: Path, pytestconfig: pytest.Config
) -> None:
    problem = pytestconfig.stash.get(CLUSTER_PROBLEM, None)
    if problem is not None:
        pytest.fail(f"the bench needs redis-server and nginx: {problem}", pytrace=False)
    output = tmp_path / "bench.json"
    chart = tmp_path / "bench.png"
    tiny = ["--connections", "2", "--chunks", "50", "--duration", "0.2", "--warmup", "0.05"]
    tiny += ["--crowd", "3", "--sessions", "20", "--rounds", "1"]
    tiny += ["--resume-samples", str(RESUME_SAMPLES), "--detached-sessions", str(DETACHED)]
    tiny += ["--replay-buffer-bytes", str(BUFFER), *TINY_SSE]
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), *tiny, "--json", str(output)],
        capture_output=True,
        text=True,
        timeout=240,
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
        resume = figures["resume"]
        assert resume["samples"] == RESUME_SAMPLES, (key, resume)
        assert 0 < resume["ready_p50_us"] <= resume["ready_p99_us"] <= resume["ready_max_us"]
        assert not any(figures[mode]["errors"] for mode in MODES - {"capacity"}), key
    assert "detached" not in servers["shared"], "only clients offering resumable detach"
    # --workers 2: a supervisor and two server processes, all of them in the RSS.
    workers = servers["workers2"]
    assert workers["command"][-2:] == ["--workers", "2"] and workers["processes"] == 2, workers
    assert workers["capacity"]["processes"] == 3, workers["capacity"]
    assert servers["shared"]["capacity"]["processes"] == 1, servers["shared"]["capacity"]
    assert "detached" not in workers, "only clients offering resumable detach"
    for key in ("resumable", "redis"):
        resume = servers[key]["resume"]
        assert resume["resumes"] == RESUME_SAMPLES and resume["replayed"] == 0, resume
        assert 0 < resume["resumed_p50_us"] <= resume["resumed_p99_us"] <= resume["resumed_max_us"]
        detached = servers[key]["detached"]
        assert "failed" not in detached, detached
        assert detached["detached"] == DETACHED and detached["buffer_bytes"] == BUFFER, detached
        # Every model paused once its buffer went past the bound, not before and not long after.
        assert BUFFER / 1024 <= detached["buffered_per_session_kib"] < BUFFER / 1024 + 1, detached
        assert detached["rss_after_kib"] > 0 and not detached["errors"], detached
    # The Redis row: one session resumed on its node, through a second one and back.
    resume = servers["redis"]["resume"]
    assert resume["hops"] == RESUME_SAMPLES, resume
    for route in ("same", "across", "back"):
        assert 0 < resume[f"{route}_p50_us"] <= resume[f"{route}_p99_us"], (route, resume)
    assert "hops" not in servers["resumable"]["resume"], "a second node only on Redis"
    # A few idle sessions' keys are lost in Redis' own bookkeeping: a number, not its sign.
    assert isinstance(servers["redis"]["capacity"]["store_per_session_kib"], float)
    cluster = payload["cluster"]
    assert "failed" not in cluster, cluster
    for nodes in ("nodes_1", "nodes_3"):
        figures = cluster[nodes]
        assert figures["chunks_per_s"] > 0 and not figures["errors"], (nodes, figures)
        for part in ("nginx", "redis", "nodes", "client"):
            assert figures[f"cpu_{part}_pct"] >= 0, (nodes, part, figures)
        assert figures["cpu_nodes_pct"] > 0, (nodes, figures)
    assert servers["before"]["commit"] == "cd360c5", servers["before"]
    # The Ray row against the local isolated one: every ratio measured.
    placement = payload["ray_placement"]
    assert all(placement[k] is not None for k in placement if k.endswith("_ratio")), placement
    check_sse(payload)
    assert {t["met"] for t in payload["targets"]} <= {True, False}  # all measured
    assert chart.read_bytes().startswith(b"\x89PNG"), "the chart sits beside the JSON"
    table = result.stdout
    assert "chunks/s" in table and "×1.00" in table and "Targets" in table
    assert "AnythingAgent isolated" in table and "failed" not in table
    assert "resumed p50" in table and "Against AnythingAgent @cd360c5" in table
    assert "across p50" in table and "3 nodes" in table
    assert "AnythingAgent isolated on Ray" in table and "Ray placement vs local isolated" in table
    assert "AnythingAgent SSE − WebSocket" in table
    assert "AnythingAgent shared, --workers 2 against one process" in table
    assert "could not be measured" not in table


def test_bench_sse_mode_runs_alone_on_its_own_servers(tmp_path: Path) -> None:
    """--modes sse starts only its two servers (no lineup, no chart) and reports every path."""
    output = tmp_path / "sse.json"
    tiny = ["--modes", "sse", "--rounds", "1", "--duration", "0.2", "--warmup", "0.05"]
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), *tiny, *TINY_SSE, "--json", str(output)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    payload = json.loads(output.read_text())
    assert payload["servers"] == {}, "no lineup server for the sse mode"
    check_sse(payload)
    assert not output.with_suffix(".png").exists(), "the chart shows the per-server modes only"
    table = result.stdout
    for label in ("AnythingAgent WebSocket", "AnythingAgent SSE", "Starlette+uvicorn SSE"):
        assert label in table, table
    assert "AnythingAgent SSE − WebSocket" in table and "SSE errors" not in table


def test_bench_profile_writes_a_summary_per_mode(tmp_path: Path) -> None:
    """--profile samples a server with py-spy and summarizes where its CPU went."""
    profiles = tmp_path / "profiles"
    tiny = ["--servers", "websockets", "--rounds", "1", "--duration", "0.3", "--warmup", "0.05"]
    # Enough sessions that opening them lasts past a few of py-spy's samples (10 opened in
    # a few milliseconds and sometimes left the capacity profile empty).
    tiny += ["--connections", "2", "--chunks", "50", "--crowd", "2", "--sessions", "500"]
    tiny += ["--resume-samples", "200", "--modes", "throughput,latency,capacity,resume"]
    tiny += ["--json", str(tmp_path / "b.json"), "--profile", str(profiles)]
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), *tiny],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for mode in ("throughput", "latency", "capacity", "resume"):
        summary = (profiles / f"websockets-{mode}-summary.txt").read_text()
        assert "samples of CPU" in summary and "self (own time):" in summary, summary
