"""The anything-agent command: serve's options and their environment variables, check
and new, and `python -m ws_server` being the same command."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    ROOT,
    SHIPPED_MODELS,
    ServerProcess,
    chat,
    copy_models,
    http,
    recv_frame,
    run_turn,
)
from websockets.exceptions import ConnectionClosed

CLI = Path(sys.executable).parent / "anything-agent"
ISOLATED_MODELS = Path(__file__).resolve().parent / "isolated_models"


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path = ROOT) -> Any:
    return subprocess.run(
        [str(CLI), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )


def test_check_lists_shipped_models_and_exits_0() -> None:
    result = run_cli("check", "--models-dir", str(SHIPPED_MODELS))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["NAME", "VERSION", "MODE", "STATUS", "ERROR"]
    rows = {line.split()[0]: line.split()[1:4] for line in lines[1:]}
    assert rows["echo"] == ["1.0.0", "shared", "ready"]
    assert rows["eliza"] == ["1.0", "shared", "ready"]
    assert rows["test_model"] == ["1.0.0", "shared", "ready"]
    assert rows["banner"] == ["1.0.0", "isolated", "ready"]  # its env built for the check


def test_check_exits_1_and_shows_why_when_a_model_fails(tmp_path: Path) -> None:
    models = copy_models(tmp_path / "models", "slow", "broken_type", "broken_resources")
    result = run_cli("check", env={"MODELS_DIR": str(models)})
    assert result.returncode == 1
    assert "broken_type" in result.stdout and "failed" in result.stdout
    assert "config.yaml: parameters: Input should be a valid dictionary" in result.stdout
    assert "slow" in result.stdout and "ready" in result.stdout
    # check is local: it shows the model's own exception in full, below the table.
    assert "FileNotFoundError: weights.bin missing at SECRET-PATH" in result.stdout


def test_new_scaffolds_a_model_that_runs_as_generated(tmp_path: Path, start_server: Any) -> None:
    models = tmp_path / "models"
    result = run_cli("new", "my_bot", "--models-dir", str(models))
    assert result.returncode == 0, result.stderr
    assert (models / "my_bot" / "main.py").is_file()
    assert (models / "my_bot" / "config.yaml").is_file()
    assert (models / "my_bot" / "data").is_dir()
    assert run_cli("check", "--models-dir", str(models)).returncode == 0
    live: ServerProcess = start_server(models)
    status, _, info = http(live, "/v1/models/my_bot")
    assert status == 200 and info["status"] == "ready" and info["version"] == "0.1.0"


async def test_scaffolded_model_chats(tmp_path: Path, start_server: Any) -> None:
    models = tmp_path / "models"
    assert run_cli("new", "parrot", "--models-dir", str(models)).returncode == 0
    live: ServerProcess = start_server(models)
    async with chat(live, "parrot") as ws:
        turn = await run_turn(ws, "pretty bird")
    assert turn.chunks == ["You said:", " pretty", " bird"]


def test_new_refuses_bad_names_and_existing_directories(tmp_path: Path) -> None:
    result = run_cli("new", "Bad-Name", "--models-dir", str(tmp_path))
    assert result.returncode == 2 and "breaks the naming rule" in result.stderr
    assert run_cli("new", "twice", "--models-dir", str(tmp_path)).returncode == 0
    again = run_cli("new", "twice", "--models-dir", str(tmp_path))
    assert again.returncode == 2 and "already exists" in again.stderr


def test_python_dash_m_is_the_same_command() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ws_server", "check", "--models-dir", str(SHIPPED_MODELS)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and "eliza" in result.stdout


async def test_serve_options_come_from_environment_variables(
    tmp_path: Path, start_server: Any
) -> None:
    models = copy_models(tmp_path / "models", "faulty")
    live: ServerProcess = start_server(
        models, env={"ANYTHING_AGENT_MAX_FRAME_SIZE": "2048", "ANYTHING_AGENT_DEBUG": "true"}
    )
    async with chat(live, "faulty") as ws:
        turn = await run_turn(ws, "boom")
        # --debug adds the exception's type and message, for local development.
        assert "RuntimeError: SECRET-TOKEN-123" in turn.errors[0]["message"]
        await ws.send("x" * 3000)
        with pytest.raises(ConnectionClosed) as closed:
            await recv_frame(ws)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009


async def test_flags_win_over_environment_variables(tmp_path: Path, start_server: Any) -> None:
    models = copy_models(tmp_path / "models", "slow")
    live: ServerProcess = start_server(
        models, "--max-frame-size", "8192", env={"ANYTHING_AGENT_MAX_FRAME_SIZE": "2048"}
    )
    async with chat(live, "slow") as ws:
        await ws.send("y" * 3000)
        assert (await recv_frame(ws))["content"] == "first"


def test_models_dir_comes_from_the_seeds_MODELS_DIR(tmp_path: Path, start_server: Any) -> None:
    models = copy_models(tmp_path / "elsewhere", "slow")
    live: ServerProcess = start_server(models)  # passes --models-dir; check the env path too
    assert http(live, "/v1/models/slow")[0] == 200
    result = run_cli("check", env={"MODELS_DIR": str(models)})
    assert result.returncode == 0 and "slow" in result.stdout


def test_invalid_option_values_are_named() -> None:
    result = run_cli("serve", env={"ANYTHING_AGENT_PORT": "eighty"})
    assert result.returncode == 2
    assert "ANYTHING_AGENT_PORT='eighty'" in result.stderr
    result = run_cli("serve", "--grace-period", "-3")
    assert result.returncode == 2 and "--grace-period" in result.stderr


def test_a_redis_url_that_is_not_one_stops_serve_without_echoing_it() -> None:
    secret = "hunter2-not-a-url"
    result = run_cli("serve", "--port", "0", env={"ANYTHING_AGENT_REDIS_URL": secret})
    assert result.returncode == 2, result.stderr
    assert "--redis-url is not a Redis URL" in result.stderr
    assert secret not in result.stderr + result.stdout


def test_an_unreachable_redis_never_shows_its_url_in_the_log(
    tmp_path: Path, start_server: Any
) -> None:
    url = f"unix://{tmp_path}/hunter2-nothing-here.sock"
    server = start_server(SHIPPED_MODELS, env={"ANYTHING_AGENT_REDIS_URL": url})
    status, _, health = http(server, "/healthz")
    assert status == 200 and health["store"] == "unavailable"
    server.wait_for_log("Redis unreachable")
    assert "hunter2" not in server.log


def test_serve_says_so_when_the_port_is_taken(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("serve", "--port", str(port), "--models-dir", str(tmp_path))
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr


def test_shipped_models_dir_is_the_default(tmp_path: Path) -> None:
    shutil.copytree(SHIPPED_MODELS, tmp_path / "models")
    result = run_cli("check", cwd=tmp_path)
    assert result.returncode == 0 and "echo" in result.stdout


def test_serve_on_a_taken_port_fails_before_building_any_environment(tmp_path: Path) -> None:
    models = copy_models(tmp_path / "models", "crasher", source=ISOLATED_MODELS)
    (models / "crasher" / "requirements.txt").write_text("six\n")  # a build to be avoided
    cache = tmp_path / "envs"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        result = run_cli(
            "serve", "--port", str(port), "--models-dir", str(models), "--env-cache-dir", str(cache)
        )
        elapsed = time.monotonic() - started
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "address already in use" in result.stderr
    assert "building" not in result.stderr  # bound first: no build was started...
    assert not cache.exists() or not any(cache.iterdir())  # ...nor any environment made
    assert elapsed < 10, result.stderr


def test_check_shows_a_model_whose_isolation_block_is_invalid_as_isolated(tmp_path: Path) -> None:
    models = tmp_path / "models"
    configs = {
        "bad_memory": "isolation: {resources: {memory: lots}}\n",
        "old_python": 'isolation: {enabled: true, python_version: "3.8"}\n',
        "not_isolated": "isolation: {enabled: false, network: maybe}\n",
    }
    for name, config in configs.items():
        shutil.copytree(SHIPPED_MODELS / "echo", models / name)
        (models / name / "config.yaml").write_text(config)
    result = run_cli("check", "--models-dir", str(models))
    assert result.returncode == 1
    rows = {line.split()[0]: line.split()[2:4] for line in result.stdout.splitlines()[1:4]}
    assert rows == {
        "bad_memory": ["isolated", "failed"],
        "old_python": ["isolated", "failed"],
        "not_isolated": ["shared", "failed"],
    }
    assert "isolation.resources.memory" in result.stdout
    assert "Python 3.8 is not supported" in result.stdout
