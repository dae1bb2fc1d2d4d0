"""Isolated models on a Ray cluster (``serve --ray-address``): each model version runs as a
Ray actor in an environment Ray builds from its requirements.txt, with the same protocol,
streaming, cancel and crash handling as a local worker. Against a real single-node cluster
(``ray start --head`` on loopback, one for the whole run); the chat and lifecycle tests run
against Ray too, through the ``server`` fixture's ``ray`` placement.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    SHIPPED_MODELS,
    ServerProcess,
    chat,
    http,
    launch_server,
    read_turn,
    recv_frame,
    run_turn,
    wait_until_built,
)

from ws_server.deploy.ray_head import RayHead

RAY_MODELS = Path(__file__).resolve().parent / "ray_models"


def ray_models(target: Path) -> Path:
    """The Ray test models, echo placed on Ray by default (isolated, no placement: the
    server's cluster), and echo pinned to a local worker."""
    target.mkdir(parents=True, exist_ok=True)
    for name in ("streamer", "own_six", "missing_package", "resources_probe"):
        shutil.copytree(RAY_MODELS / name, target / name)
    shutil.copytree(SHIPPED_MODELS / "echo", target / "echo")
    with open(target / "echo" / "config.yaml", "a") as config:
        config.write("\nisolation: true\n")
    local = target / "local_echo"
    shutil.copytree(SHIPPED_MODELS / "echo", local)
    config_text = (local / "config.yaml").read_text().replace("name: echo", "name: local_echo")
    (local / "config.yaml").write_text(config_text + "\nisolation:\n  placement: local\n")
    return target


@pytest.fixture(scope="module")
def ray_server(
    ray_head: RayHead, tmp_path_factory: pytest.TempPathFactory, env_cache: Path
) -> Iterator[ServerProcess]:
    models = ray_models(tmp_path_factory.mktemp("ray-models"))
    running = launch_server(
        models,
        tmp_path_factory.mktemp("ray-events"),
        *("--ray-address", ray_head.address, "--env-cache-dir", str(env_cache)),
        env=ray_head.client_env,
    )
    wait_until_built(running)
    yield running
    assert running.stop() == 0, running.log


def row(server: ServerProcess, name: str) -> dict:
    status, _, body = http(server, f"/v1/models/{name}")
    assert status == 200, body
    return body


def test_models_go_to_the_cluster_and_the_listing_says_what_ray_gives_up(
    ray_server: ServerProcess,
) -> None:
    for name in ("streamer", "echo", "own_six"):
        listed = row(ray_server, name)
        assert (listed["status"], listed["mode"], listed["placement"]) == (
            "ready",
            "isolated",
            "ray",
        ), listed
        sandbox = listed["sandbox"]
        assert sandbox["bubblewrap"] is False and sandbox["seccomp"] is False
        assert sandbox["network"] is True and sandbox["limits"] == "ray"
    local = row(ray_server, "local_echo")
    assert (local["status"], local["placement"]) == ("ready", "local")
    assert local["sandbox"]["limits"] != "ray"


async def test_a_model_streams_from_the_environment_built_from_its_requirements(
    ray_server: ServerProcess,
) -> None:
    import six  # the server's environment has another version

    async with chat(ray_server, "own_six") as ws:
        turn = await run_turn(ws, "which six?")
    assert turn.chunks == ["six ", "1.16.0"] and six.__version__ != "1.16.0"


def test_requirements_ray_cannot_install_fail_the_model_with_pips_words(
    ray_server: ServerProcess,
) -> None:
    failed = row(ray_server, "missing_package")
    assert (failed["status"], failed["placement"]) == ("failed", "ray")
    assert failed["error"].startswith("requirements.txt: Ray could not build the model's")
    assert "anything-agent-no-such-package-zzz" in failed["error"]


async def test_echo_streams_chunk_by_chunk_from_its_actor(ray_server: ServerProcess) -> None:
    async with chat(ray_server, "echo") as ws:
        turn = await run_turn(ws, "one two three")
        assert turn.chunks == ["one", " two", " three"] and turn.done["reason"] == "stop"
    async with chat(ray_server, "local_echo") as ws:
        assert (await run_turn(ws, "still local")).text == "still local"


async def test_isolation_resources_become_the_actors_ray_resources(
    ray_server: ServerProcess,
) -> None:
    async with chat(ray_server, "resources_probe") as ws:
        assigned = json.loads((await run_turn(ws, "what do I have?")).text)
    assert assigned == {"CPU": 0.5, "memory": 300 * 1024 * 1024}


async def test_cancel_closes_the_generator_in_the_actor_so_its_finally_runs(
    ray_server: ServerProcess,
) -> None:
    async with chat(ray_server, "streamer") as ws:
        pid = int((await run_turn(ws, "pid")).text)
        marker = ray_server.events_dir / f"closed-{pid}"
        await ws.send("stream 200")
        assert (await recv_frame(ws))["type"] == "chunk"
        await ws.send(json.dumps({"type": "cancel"}))
        turn = await read_turn(ws)
        assert turn.done["reason"] == "cancelled" and len(turn.chunks) < 150
        # The done frame follows the generator's close in the actor.
        assert marker.read_text() == "finally ran"


async def test_killing_the_actor_mid_stream_is_model_crashed_and_the_session_goes_on(
    ray_server: ServerProcess,
) -> None:
    async with chat(ray_server, "streamer") as ws:
        pid = int((await run_turn(ws, "pid")).text)
        await ws.send("stream 400")
        assert (await recv_frame(ws))["type"] == "chunk"
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        while (frame := await recv_frame(ws))["type"] == "chunk":
            pass
        assert frame["type"] == "error" and frame["code"] == "model_crashed", frame
        assert (await recv_frame(ws)) == {"type": "done", "turn": 2, "reason": "error"}
        assert time.monotonic() - killed < 1.0
        # The next turn runs in a new actor, with the whole history.
        history = json.loads((await run_turn(ws, "history")).text)
        assert history[0] == "pid" and history[2] == "stream 400" and history[-1] == "history"
        assert int((await run_turn(ws, "pid")).text) != pid
    ray_server.wait_for_log(r"model streamer: worker exited \(the Ray actor died")


def test_what_the_model_prints_reaches_the_server_log(ray_server: ServerProcess) -> None:
    ray_server.wait_for_log(
        r"model streamer Ray actor [0-9a-f]+( \(pid \d+\))? stdout: streamer loaded in pid \d+"
    )


async def test_a_reload_with_new_requirements_builds_while_the_old_actor_serves(
    ray_head: RayHead, tmp_path: Path, start_server: Any, env_cache: Path
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    shutil.copytree(RAY_MODELS / "own_six", models / "own_six")
    server = start_server(models, "--ray-address", ray_head.address, env=ray_head.client_env)
    wait_until_built(server)
    async with chat(server, "own_six") as old_session:
        assert (await run_turn(old_session, "v")).text == "six 1.16.0"
        (models / "own_six" / "requirements.txt").write_text("six==1.15.0\n")
        status, _, report = http(server, "/v1/models/reload", "POST")
        assert status == 200 and report["building"] == ["own_six"]
        # Building: the old actor keeps serving, old sessions and new ones alike.
        assert row(server, "own_six")["pending_revision"] is not None
        assert (await run_turn(old_session, "v")).text == "six 1.16.0"
        async with chat(server, "own_six") as during:
            assert (await run_turn(during, "v")).text == "six 1.16.0"
        wait_until_built(server)
        async with chat(server, "own_six") as new_session:
            assert (await run_turn(new_session, "v")).text == "six 1.15.0"
        assert (await run_turn(old_session, "v")).text == "six 1.16.0"  # pinned


def refused_address() -> str:
    """A loopback port where nothing listens (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


async def test_an_unreachable_cluster_fails_its_models_not_the_server(
    tmp_path: Path, start_server: Any
) -> None:
    models = tmp_path / "models"
    shutil.copytree(SHIPPED_MODELS / "echo", models / "echo")
    shutil.copytree(SHIPPED_MODELS / "echo", models / "isolated_echo")
    config = models / "isolated_echo" / "config.yaml"
    text = config.read_text().replace("name: echo", "name: isolated_echo")
    config.write_text(text + "\nisolation: true\n")
    address = refused_address()
    started = time.monotonic()
    server = start_server(models, "--ray-address", address)
    wait_until_built(server, timeout=40)
    assert time.monotonic() - started < 30
    failed = row(server, "isolated_echo")
    assert failed["status"] == "failed" and failed["placement"] == "ray"
    assert failed["error"].startswith(f"Ray: cannot connect to the cluster at {address}")
    assert http(server, "/healthz")[0] == 200
    async with chat(server, "echo") as ws:
        assert (await run_turn(ws, "still here")).text == "still here"
    # Not the model's fault: the next reload tries again, though nothing changed.
    status, _, report = http(server, "/v1/models/reload", "POST")
    assert status == 200 and report["building"] == ["isolated_echo"]


def test_placement_ray_on_a_server_without_a_cluster_is_a_clear_error(
    tmp_path: Path, start_server: Any
) -> None:
    models = tmp_path / "models"
    shutil.copytree(RAY_MODELS / "own_six", models / "own_six")
    server = start_server(models)
    wait_until_built(server)
    failed = row(server, "own_six")
    assert failed["status"] == "failed"
    assert "isolation.placement: ray needs a Ray cluster" in failed["error"]
    assert "--ray-address" in failed["error"]


def test_a_python_version_the_cluster_cannot_give_is_a_clear_error(
    ray_head: RayHead, tmp_path: Path, start_server: Any
) -> None:
    models = tmp_path / "models"
    shutil.copytree(RAY_MODELS / "streamer", models / "streamer")
    other = "3.9" if sys.version_info[:2] != (3, 9) else "3.10"
    with open(models / "streamer" / "config.yaml", "a") as config:
        config.write(f'  python_version: "{other}"\n')
    server = start_server(models, "--ray-address", ray_head.address, env=ray_head.client_env)
    wait_until_built(server)
    failed = row(server, "streamer")
    assert failed["status"] == "failed"
    assert f"isolation.python_version: {other} cannot be had on Ray" in failed["error"]


async def test_a_cluster_that_never_answers_fails_its_models_within_30_s(
    tmp_path: Path, start_server: Any
) -> None:
    """A listener that accepts connections and never speaks: ray.init would wait for minutes."""
    models = tmp_path / "models"
    shutil.copytree(RAY_MODELS / "streamer", models / "streamer")
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        server = start_server(models, "--ray-address", address)
        wait_until_built(server, timeout=60)
        assert time.monotonic() - started < 35
        failed = row(server, "streamer")
    assert failed["status"] == "failed"
    assert failed["error"].startswith(f"Ray: no answer from the cluster at {address} within 30 s")
    assert server.stop() == 0  # the attempt still hanging in its thread holds nothing up


async def test_the_actors_end_with_the_server_even_on_kill_9(
    ray_head: RayHead, tmp_path: Path, start_server: Any
) -> None:
    models = tmp_path / "models"
    shutil.copytree(RAY_MODELS / "streamer", models / "streamer")
    server = start_server(models, "--ray-address", ray_head.address, env=ray_head.client_env)
    wait_until_built(server)
    async with chat(server, "streamer") as ws:
        pid = int((await run_turn(ws, "pid")).text)
        server.process.kill()
    assert await asyncio.to_thread(gone_within, pid, 15), "the actor outlived its server"


def gone_within(pid: int, seconds: float) -> bool:
    """Whether process ``pid`` has ended within ``seconds``."""
    deadline = time.monotonic() + seconds
    while Path(f"/proc/{pid}").exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True
