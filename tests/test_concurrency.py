"""Concurrency per model (design.md, *Concurrency per model*): ``max_turns`` turns of a
model run at once, the rest wait in a FIFO queue told their position, a full queue refuses
with ``overloaded`` and ``retry_after`` (no turn number spent), a cancel leaves the queue
at once; the same for isolated models and OpenAI-compatible requests."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from conftest import (
    SHIPPED_MODELS,
    TEST_MODELS,
    ServerProcess,
    chat,
    copy_models,
    http,
    launch_server,
    recv_frame,
    wait_until_built,
)

from ws_server.client import connect as client_connect
from ws_server.exceptions import Overloaded, ServerError
from ws_server.registry.slots import TurnSlots


def gated_copy(target: Path, name: str, max_turns: int, max_queue: int, isolated: bool) -> None:
    shutil.copytree(TEST_MODELS / "gated", target / name)
    config = f"name: {name}\nconcurrency:\n  max_turns: {max_turns}\n  max_queue: {max_queue}\n"
    (target / name / "config.yaml").write_text(config + ("isolation: true\n" if isolated else ""))


@pytest.fixture(scope="module")
def gated(tmp_path_factory: pytest.TempPathFactory, env_cache: Path) -> Iterator[ServerProcess]:
    models = copy_models(tmp_path_factory.mktemp("gated-models"), "gated")
    gated_copy(models, "gated_isolated", 1, 1, isolated=True)
    gated_copy(models, "gated_api", 1, 1, isolated=False)
    shutil.copytree(SHIPPED_MODELS / "echo", models / "echo")
    bad = models / "zero_turns"
    shutil.copytree(TEST_MODELS / "gated", bad)
    (bad / "config.yaml").write_text("concurrency:\n  max_turns: 0\n")
    running = launch_server(
        models,
        tmp_path_factory.mktemp("gated-events"),
        "--no-limits",
        "--env-cache-dir",
        str(env_cache),
    )
    wait_until_built(running)
    yield running
    assert running.stop() == 0, running.log


def turns_of(server: ServerProcess, model: str) -> dict[str, int]:
    _, _, row = http(server, f"/v1/models/{model}")
    return dict(row["turns"])


async def read_until_done_or_error(ws: Any, timeout: float = 30) -> list[dict[str, Any]]:
    frames = []
    while True:
        frame = await recv_frame(ws, timeout)
        frame["at"] = time.monotonic()
        frames.append(frame)
        if frame["type"] == "done" or (frame["type"] == "error" and "turn" not in frame):
            return frames


async def test_fifty_sessions_on_two_slots_queue_in_order_and_the_rest_are_overloaded(
    gated: ServerProcess,
) -> None:
    async with chats(gated, "gated", 50) as sessions:
        for index, ws in enumerate(sessions):
            await ws.send(f"job {index} 0.1")
        peak = {"running": 0, "queued": 0}

        async def watch() -> None:
            while True:
                now = await asyncio.to_thread(turns_of, gated, "gated")
                peak["running"] = max(peak["running"], now["running"])
                peak["queued"] = max(peak["queued"], now["queued"])
                await asyncio.sleep(0.05)

        watcher = asyncio.create_task(watch())
        replies = await asyncio.gather(*(read_until_done_or_error(ws) for ws in sessions))
        watcher.cancel()
        refused = [r for r in replies if r[-1]["type"] == "error"]
        ran = [r for r in replies if r[-1]["type"] == "done"]
        assert len(refused) == 8 and len(ran) == 42  # 2 running + 40 waiting
        for frames in refused:
            (error,) = frames
            assert error["code"] == "overloaded" and error["retry_after"] >= 1
            assert "turn" not in error  # no turn number spent
        queued = [r for r in ran if r[0]["type"] == "event"]
        assert len(queued) == 40
        for frames in queued:
            places = [f["data"]["position"] for f in frames if f.get("name") == "queued"]
            assert places == sorted(places, reverse=True) and places[-1] == 1
            assert places == list(range(places[0], 0, -1))  # told each step forward
            assert all(f["turn"] == 1 for f in frames)
            assert next(f["content"] for f in frames if f["type"] == "chunk") == "running "
        # FIFO: a turn that queued earlier (a smaller first position) started earlier.
        starts = sorted(
            (r[0]["data"]["position"], next(f["at"] for f in r if f["type"] == "chunk"))
            for r in queued
        )
        assert [at for _, at in starts] == sorted(at for _, at in starts)
        assert peak["running"] <= 2 and peak["queued"] <= 40
        # Nothing is stuck: a refused session's next turn is its turn 1, and runs.
        refused_ws = sessions[replies.index(refused[0])]
        await refused_ws.send("again 0")
        frames = await read_until_done_or_error(refused_ws)
        assert frames[-1]["reason"] == "stop" and frames[-1]["turn"] == 1
    assert turns_of(gated, "gated") == {"running": 0, "queued": 0}
    async with chat(gated, "gated") as ws:
        await ws.send("fresh 0")
        frames = await read_until_done_or_error(ws)
        assert frames[-1]["reason"] == "stop" and frames[0]["type"] == "chunk"


async def test_a_cancel_while_queued_leaves_the_queue_at_once(gated: ServerProcess) -> None:
    async with chats(gated, "gated", 4) as (first, second, third, fourth):
        for ws in (first, second):
            await ws.send("hold 1.5")
        await third.send("third 0")
        await fourth.send("fourth 0")
        assert (await recv_frame(third))["data"] == {"position": 1}
        assert (await recv_frame(fourth))["data"] == {"position": 2}
        began = time.monotonic()
        await third.send('{"type": "cancel"}')
        done = await recv_frame(third)
        assert done["type"] == "done" and done["reason"] == "cancelled" and done["turn"] == 1
        assert time.monotonic() - began < 0.5
        assert (await recv_frame(fourth))["data"] == {"position": 1}  # moved up
        frames = await read_until_done_or_error(fourth)
        assert frames[-1]["reason"] == "stop"
        for ws in (first, second):
            assert (await read_until_done_or_error(ws))[-1]["reason"] == "stop"
        await third.send("third again 0")  # its next turn runs, as turn 2
        frames = await read_until_done_or_error(third)
        assert frames[-1]["reason"] == "stop" and frames[-1]["turn"] == 2
    assert turns_of(gated, "gated") == {"running": 0, "queued": 0}


async def test_an_isolated_model_queues_the_same_way(gated: ServerProcess) -> None:
    async with chats(gated, "gated_isolated", 3) as (first, second, third):
        await first.send("hold 1")
        await asyncio.sleep(0.2)
        await second.send("second 0")
        assert (await recv_frame(second))["data"] == {"position": 1}
        await third.send("third 0")
        error = await recv_frame(third)
        assert error["code"] == "overloaded" and error["retry_after"] >= 1
        assert (await read_until_done_or_error(second))[-1]["reason"] == "stop"
        assert (await read_until_done_or_error(first))[-1]["reason"] == "stop"


async def test_openai_requests_queue_and_are_refused_with_retry_after(
    gated: ServerProcess,
) -> None:
    client = openai.AsyncOpenAI(base_url=f"{gated.http_url}/v1", api_key="x", max_retries=0)
    async with chats(gated, "gated_api", 1) as (holder,):
        await holder.send("hold 1.5")
        await asyncio.sleep(0.2)
        waiting = asyncio.create_task(
            client.chat.completions.create(
                model="gated_api", messages=[{"role": "user", "content": "w 0"}], stream=True
            )
        )
        await asyncio.sleep(0.3)
        response = await asyncio.to_thread(
            httpx.post,
            f"{gated.http_url}/v1/chat/completions",
            json={"model": "gated_api", "messages": [{"role": "user", "content": "x"}]},
            timeout=10,
        )
        assert response.status_code == 503 and int(response.headers["retry-after"]) >= 1
        assert response.json()["error"]["code"] == "overloaded"
        stream = await waiting
        deltas = [c.choices[0].delta async for c in stream if c.choices]
        reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
        assert reasoning == "queued (position 1)\n"
        assert "".join(d.content or "" for d in deltas) == "running w 0"
        await read_until_done_or_error(holder)


def test_max_turns_zero_is_a_config_error_naming_the_key(gated: ServerProcess) -> None:
    _, _, row = http(gated, "/v1/models/zero_turns")
    assert row["status"] == "failed" and "concurrency.max_turns" in row["error"]


def test_metrics_show_running_and_queued_turns(gated: ServerProcess) -> None:
    text = httpx.get(gated.http_url + "/metrics", timeout=10).text
    assert 'anything_agent_queued_turns{model="gated"} 0.0' in text
    assert 'anything_agent_running_turns{model="gated"} 0.0' in text
    assert 'anything_agent_queue_wait_seconds_count{model="gated"}' in text


# ---------------------------------------------------------------------- the slots alone
async def test_slots_grant_in_order_and_refuse_past_the_queue() -> None:
    slots = TurnSlots("m", max_turns=1, max_queue=2)
    told: dict[str, list[int]] = {"b": [], "c": []}
    first = slots.enter()
    second = slots.enter(lambda turn, place: told["b"].append(place), 1)
    third = slots.enter(lambda turn, place: told["c"].append(place), 1)
    assert first.granted and not second.granted and not third.granted
    with pytest.raises(Overloaded) as refused:
        slots.admit()
    assert refused.value.retry_after >= 1
    second.close()  # given up while queued
    assert told == {"b": [1], "c": [2, 1]}
    first.close()
    assert third.granted and third.ready is not None and third.ready.done()
    assert (slots.running, slots.queued) == (1, 0)
    third.close()
    third.close()  # once only
    assert slots.running == 0


class chats:
    """``count`` chat sessions with ``model``, opened together (each past ``ready``)."""

    def __init__(self, server: ServerProcess, model: str, count: int) -> None:
        self.contexts = [chat(server, model) for _ in range(count)]

    async def __aenter__(self) -> list[Any]:
        return list(await asyncio.gather(*(c.__aenter__() for c in self.contexts)))

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.gather(*(c.__aexit__(None, None, None) for c in self.contexts))


async def test_the_python_client_raises_overloaded_with_its_retry_after(
    gated: ServerProcess,
) -> None:
    async with chats(gated, "gated_isolated", 2) as (holder, waiter):
        await holder.send("hold 1")
        await asyncio.sleep(0.2)
        await waiter.send("waits 0")
        assert (await recv_frame(waiter))["data"] == {"position": 1}
        async with client_connect(gated.ws_url, "gated_isolated") as refused:
            with pytest.raises(ServerError) as overloaded:
                await refused.ask("one too many")
            assert overloaded.value.code == "overloaded"
            assert overloaded.value.retry_after is not None and overloaded.value.retry_after >= 1
        assert (await read_until_done_or_error(waiter))[-1]["reason"] == "stop"
        assert (await read_until_done_or_error(holder))[-1]["reason"] == "stop"
