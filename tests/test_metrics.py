"""GET /metrics: Prometheus' text format, the anything_agent_* families design.md names,
counting what really happened on a live server."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import urllib.request
from pathlib import Path
from typing import Any

from conftest import (
    SHIPPED_MODELS,
    ServerProcess,
    chat,
    copy_models,
    http,
    refused_handshake,
    run_turn,
    wait_until_built,
)
from prometheus_client.parser import text_string_to_metric_families
from test_isolated import worker_pid


def scrape(server: ServerProcess, headers: dict[str, str] | None = None) -> dict[str, float]:
    """Every sample as ``name{label="value",...}`` → value."""
    request = urllib.request.Request(server.http_url + "/metrics", headers=headers or {})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


def metrics_models(target: Path) -> Path:
    copy_models(target, "faulty", "slow")
    copy_models(target, "echo", source=SHIPPED_MODELS)
    shutil.copytree(SHIPPED_MODELS / "echo", target / "isolated_echo")
    (target / "isolated_echo" / "config.yaml").write_text("isolation: true\n")
    return target


async def test_metrics_count_connections_sessions_turns_chunks_errors_and_refusals(
    start_server: Any, tmp_path: Path
) -> None:
    server = start_server(
        metrics_models(tmp_path / "models"), "--env-cache-dir", str(tmp_path / "envs")
    )
    wait_until_built(server)
    before = scrape(server)
    assert before[f'anything_agent_process_info{{pid="{server.process.pid}",worker=""}}'] == 1
    assert before["anything_agent_reloads_total{}"] >= 1
    assert before['anything_agent_env_build_seconds_count{outcome="built"}'] == 1

    async with chat(server, "echo") as ws:
        assert (await run_turn(ws, "one two three")).text == "one two three"
        during = scrape(server)
        assert during["anything_agent_connections{}"] == 1
        assert during['anything_agent_sessions{model="echo"}'] == 1
    async with chat(server, "faulty") as ws:
        assert (await run_turn(ws, "boom")).done["reason"] == "error"
    assert (await refused_handshake(server, "nobody")).status_code == 404

    after = scrape(server)
    assert after['anything_agent_turns_total{api="ws",model="echo",reason="stop"}'] == 1
    assert after['anything_agent_turns_total{api="ws",model="faulty",reason="error"}'] == 1
    assert after['anything_agent_chunks_total{api="ws",model="echo"}'] == 3
    assert after['anything_agent_chunk_bytes_total{api="ws",model="echo"}'] > len("one two three")
    assert after['anything_agent_first_chunk_seconds_count{api="ws",model="echo"}'] == 1
    assert after['anything_agent_turn_seconds_count{api="ws",model="echo"}'] == 1
    assert after['anything_agent_errors_total{code="model_error"}'] == 1
    assert after['anything_agent_handshake_refusals_total{status="404"}'] == 1
    assert after["anything_agent_connections{}"] == 0

    async with chat(server, "isolated_echo") as ws:
        await run_turn(ws, "hi")
        os.kill(worker_pid(server, "isolated_echo"), signal.SIGKILL)
    wait_until_built(server)
    for _ in range(100):
        samples = scrape(server)
        if samples.get('anything_agent_worker_restarts_total{model="isolated_echo"}'):
            break
        await asyncio.sleep(0.1)
    assert samples['anything_agent_worker_restarts_total{model="isolated_echo"}'] == 1


def test_metrics_need_the_api_key_when_keys_are_on(start_server: Any, tmp_path: Path) -> None:
    server = start_server(
        copy_models(tmp_path / "models", "slow"), env={"ANYTHING_AGENT_API_KEYS": "metrics-k1"}
    )
    assert http(server, "/metrics")[0] == 401
    assert "anything_agent_reloads_total{}" in scrape(
        server, {"Authorization": "Bearer metrics-k1"}
    )


def test_turn_histograms_put_a_value_in_the_first_bucket_at_or_above_it() -> None:
    # Prometheus' ``le``: a value equal to a bound counts in that bound's bucket; the
    # buckets the exposition shows are cumulative, +Inf holding every value.
    from ws_server.metrics import Buckets

    buckets = Buckets((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 1.0, 7.0):
        buckets.observe(value)
    assert buckets.cumulative() == [("0.1", 2), ("1.0", 4), ("+Inf", 5)]
    assert buckets.sum == 8.65
