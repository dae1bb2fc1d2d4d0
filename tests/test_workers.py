"""``serve --workers N``: N processes on one port, a reload through one reaching all, a
crashed process replaced, SIGTERM draining every one, /metrics saying which it is."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    SHIPPED_MODELS,
    ServerProcess,
    chat,
    copy_models,
    http,
    read_turn,
    recv_frame,
    run_turn,
)
from websockets.asyncio.client import connect


def start_workers(
    start_server: Any, tmp_path: Path, count: int = 2, env: dict[str, str] | None = None
) -> ServerProcess:
    models = copy_models(tmp_path / "models", "recorder", "slow")
    copy_models(models, "echo", source=SHIPPED_MODELS)
    server: ServerProcess = start_server(
        models, "--workers", str(count), "--grace-period", "5", env=env
    )
    for index in range(1, count + 1):
        server.wait_for_log(f"process {index} listening on ws://")
    return server


def children(server: ServerProcess) -> set[int]:
    """The supervisor's server processes."""
    with open(f"/proc/{server.process.pid}/task/{server.process.pid}/children") as listing:
        return {int(pid) for pid in listing.read().split()}


async def states(server: ServerProcess, sessions: int = 24) -> list[dict[str, Any]]:
    """What the recorder reports in ``sessions`` new sessions (each a new connection, which
    the kernel spreads over the processes)."""

    async def one() -> dict[str, Any]:
        async with chat(server, "recorder") as ws:
            return json.loads((await run_turn(ws, "state")).text)  # type: ignore[no-any-return]

    return list(await asyncio.gather(*(one() for _ in range(sessions))))


@pytest.mark.parametrize("relay", ["supervisor", "redis"])
async def test_connections_reach_every_process_and_a_reload_through_one_reaches_all(
    relay: str, start_server: Any, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Without Redis the supervisor relays a reload (SIGHUP); with it, each process is a
    node and the reload goes through Redis, as between hosts."""
    env = None
    if relay == "redis":
        env = {"ANYTHING_AGENT_REDIS_URL": request.getfixturevalue("redis_url")}
    server = start_workers(start_server, tmp_path, env=env)
    before = await states(server)
    assert len({s["load_id"] for s in before}) == 2  # each process loaded the model
    assert {s["parameters"]["flavour"] for s in before} == {"vanilla"}

    config = server.models_dir / "recorder" / "config.yaml"
    config.write_text(config.read_text().replace("vanilla", "chocolate"))
    status, _, report = http(server, "/v1/models/reload", method="POST")  # reaches one
    assert status == 200 and report["updated"] == ["recorder"]
    if relay == "redis":
        server.wait_for_log("reload notice from node")
        assert "reloaded: the others reload too" not in server.log
    else:
        server.wait_for_log("reloaded: the others reload too")
    for _ in range(100):  # the other process reloads on the relayed SIGHUP
        after = await states(server)
        if {s["parameters"]["flavour"] for s in after} == {"chocolate"}:
            break
        await asyncio.sleep(0.1)
    assert {s["parameters"]["flavour"] for s in after} == {"chocolate"}
    assert len({s["load_id"] for s in after}) == 2
    assert not {s["load_id"] for s in after} & {s["load_id"] for s in before}


async def test_a_crashed_process_is_replaced_and_the_port_keeps_serving(
    start_server: Any, tmp_path: Path
) -> None:
    server = start_workers(start_server, tmp_path)
    first = children(server)
    assert len(first) == 2
    victim = min(first)
    os.kill(victim, signal.SIGKILL)
    server.wait_for_log(f"pid {victim}\\) exited with -9; replacing it")
    deadline = time.monotonic() + 15
    while len(children(server)) != 2 or victim in children(server):
        assert time.monotonic() < deadline, server.log
        await asyncio.sleep(0.1)
    replaced = len(re.findall(r"process \d listening", server.log))
    deadline = time.monotonic() + 15
    while len(re.findall(r"process \d listening", server.log)) < 3:  # the new one listens
        assert time.monotonic() < deadline, server.log
        await asyncio.sleep(0.1)
    assert replaced >= 2
    texts = await asyncio.gather(*(echo(server, f"n{i}") for i in range(12)))
    assert texts == [f"n{i}" for i in range(12)]
    processes = children(server)
    assert await asyncio.get_running_loop().run_in_executor(None, server.stop) == 0
    survivors = [pid for pid in processes if Path(f"/proc/{pid}").exists()]  # noqa: ASYNC240
    assert not survivors, f"server processes {survivors} outlived the supervisor"


async def echo(server: ServerProcess, text: str) -> str:
    for _ in range(50):  # the replacement may still be loading its models
        try:
            async with chat(server, "echo") as ws:
                return (await run_turn(ws, text)).text
        except OSError:
            await asyncio.sleep(0.1)
    raise AssertionError("no process answered")


async def test_sigterm_drains_every_process_and_exits_0(start_server: Any, tmp_path: Path) -> None:
    server = start_workers(start_server, tmp_path)
    processes = children(server)
    sockets = []
    for _ in range(6):  # enough sessions to have turns running in both processes
        ws = await connect(server.chat_url("slow"))
        assert (await recv_frame(ws))["type"] == "ready"
        await ws.send("go")
        assert (await recv_frame(ws))["content"] == "first"
        sockets.append(ws)
    server.send_signal(signal.SIGTERM)
    for ws in sockets:  # each running turn finishes within the grace period
        turn = await read_turn(ws, timeout=10)
        assert turn.text == "second" and turn.done["reason"] == "stop"
        await ws.close()
    assert await asyncio.get_running_loop().run_in_executor(None, server.stop) == 0
    survivors = [pid for pid in processes if Path(f"/proc/{pid}").exists()]  # noqa: ASYNC240
    assert not survivors, f"server processes {survivors} outlived the supervisor"


def test_metrics_say_which_process_answered(start_server: Any, tmp_path: Path) -> None:
    server = start_workers(start_server, tmp_path)
    pids = {str(pid) for pid in children(server)}
    seen = set()
    for _ in range(40):
        with urllib.request.urlopen(server.http_url + "/metrics", timeout=10) as response:
            for line in response.read().decode().splitlines():
                if line.startswith("anything_agent_process_info{"):
                    labels = dict(
                        part.split("=")
                        for part in line[line.index("{") + 1 : line.index("}")].split(",")
                    )
                    seen.add((labels["pid"].strip('"'), labels["worker"].strip('"')))
    assert {pid for pid, _ in seen} == pids
    assert {worker for _, worker in seen} == {"1", "2"}


def test_server_processes_die_with_a_killed_supervisor(start_server: Any, tmp_path: Path) -> None:
    server = start_workers(start_server, tmp_path)
    processes = children(server)
    server.process.kill()  # kill -9: no chance to stop them itself
    server.process.wait()
    deadline = time.monotonic() + 15
    while any(Path(f"/proc/{pid}").exists() for pid in processes):
        assert time.monotonic() < deadline, "server processes outlived their supervisor"
        time.sleep(0.1)
