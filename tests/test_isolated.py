"""Isolated mode: real virtualenvs with real installs, the isolation proof, interpreter
choice, resource limits, crash containment, and reload without downtime."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import uvloop
from conftest import (
    ServerProcess,
    chat,
    copy_models,
    http,
    read_turn,
    recv_frame,
    refused_handshake,
    run_turn,
    wait_until_built,
)
from websockets.exceptions import ConnectionClosed

from ws_server.isolation import environments
from ws_server.isolation.environments import find_python, interpreters
from ws_server.session.history import History

ISOLATED_MODELS = Path(__file__).resolve().parent / "isolated_models"


def _other_python() -> str:
    """A Python version other than the server's, when the machine has one (pyenv often
    does), so that choosing ``python_version`` is really exercised; else the server's."""
    server = f"{sys.version_info[0]}.{sys.version_info[1]}"
    versions = sorted({p.name.removeprefix("python") for p in interpreters()})
    usable = [v for v in versions if v != server and tuple(map(int, v.split("."))) >= (3, 9)]
    return "3.12" if "3.12" in usable else (usable[-1] if usable else server)


PROBE_PYTHON = _other_python()


def reload(server: ServerProcess) -> dict[str, Any]:
    status, _, body = http(server, "/v1/models/reload", method="POST")
    assert status == 200, body
    return body  # type: ignore[no-any-return]


def info(server: ServerProcess, name: str) -> dict[str, Any]:
    return http(server, f"/v1/models/{name}")[2]  # type: ignore[no-any-return]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(")")[-1].split()[0] != "Z"


def _processes() -> dict[int, tuple[int, int]]:
    """Every process on the machine: pid -> (parent pid, start time in clock ticks)."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
            except OSError:
                continue  # gone meanwhile
            found[int(entry)] = (int(fields[1]), int(fields[19]))
    return found


def descendants(pid: int, processes: dict[int, tuple[int, int]] | None = None) -> list[int]:
    """Every process below ``pid``: a server's sandboxes (bwrap and its init) and workers."""
    processes = _processes() if processes is None else processes
    below: list[int] = []
    parents = {pid}
    while True:
        found = [p for p, (parent, _) in processes.items() if parent in parents and p not in below]
        if not found:
            return below
        below += found
        parents = set(found)


def worker_pids(server: ServerProcess, model: str) -> list[int]:
    """Host pids of ``model``'s worker interpreters under ``server``, oldest first.

    A sandboxed worker has a PID namespace of its own, so the pid it reports means
    nothing here: find it by its command line (the worker's spec names the model)."""
    processes = _processes()
    workers = []
    for pid in descendants(server.process.pid, processes):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                argv = cmdline.read().decode().split("\0")[:-1]
        except OSError:
            continue  # gone meanwhile
        if not argv or os.path.basename(argv[0]) == "bwrap":
            continue  # bwrap's own command line holds the worker's too
        if any("ws_server.isolation.worker" in arg for arg in argv):
            if json.loads(argv[-1])["name"] == model:
                workers.append(pid)
    return sorted(workers, key=lambda pid: processes[pid][1])


def worker_pid(server: ServerProcess, model: str) -> int:
    """The host pid of ``model``'s one worker interpreter."""
    pids = worker_pids(server, model)
    assert len(pids) == 1, f"{model} has workers {pids}"
    return pids[0]


async def facts(ws: Any) -> dict[str, Any]:
    return json.loads((await run_turn(ws, "facts")).text)  # type: ignore[no-any-return]


@pytest.fixture
def start_isolated(tmp_path: Path, start_server: Any, env_cache: Path) -> Any:
    """Start a private server over copies of the given isolated test models."""

    def start(
        *names: str, extra: tuple[str, ...] = (), env: dict[str, str] | None = None
    ) -> ServerProcess:
        models = copy_models(tmp_path / "models", *names, source=ISOLATED_MODELS)
        if "probe" in names:
            config = models / "probe" / "config.yaml"
            config.write_text(config.read_text().replace('"3.12"', f'"{PROBE_PYTHON}"'))
        live: ServerProcess = start_server(
            models, "--env-cache-dir", str(env_cache), *extra, env=env
        )
        wait_until_built(live)
        return live

    return start


async def test_worker_cannot_see_the_servers_dependencies(start_isolated: Any) -> None:
    live = start_isolated("probe", "needs_pydantic")
    async with chat(live, "probe") as ws:
        assert (await facts(ws))["server_deps"] == "hidden"
    # Importing pydantic without listing it fails the model, naming the module...
    row = info(live, "needs_pydantic")
    assert row["status"] == "failed" and "cannot import 'pydantic'" in row["error"]
    # ...and listing it in requirements.txt makes it load: a real install in its own env.
    (live.models_dir / "needs_pydantic" / "requirements.txt").write_text("pydantic>=2,<3\n")
    assert reload(live)["building"] == ["needs_pydantic"]
    wait_until_built(live)
    assert info(live, "needs_pydantic")["status"] == "ready"
    async with chat(live, "needs_pydantic") as ws:
        assert (await run_turn(ws, "version?")).text == "pydantic 2"
    live.wait_for_log(r"model needs_pydantic: environment .* built in")


async def test_build_log_is_kept_per_model(start_isolated: Any, env_cache: Path) -> None:
    live = start_isolated("probe")
    (live.models_dir / "probe" / "requirements.txt").write_text(
        "six\n# distinct requirements for this test: 1\n"
    )
    reload(live)
    wait_until_built(live)
    build_log = (env_cache / "logs" / "probe.log").read_text()
    assert "pip install" in build_log and "requirements.txt" in build_log


async def test_requested_python_version_and_limits_apply(
    start_isolated: Any, env_cache: Path
) -> None:
    live = start_isolated("probe")  # python_version PROBE_PYTHON, cpu 1, memory 400M
    async with chat(live, "probe") as ws:
        found = await facts(ws)
    assert found["version"] == PROBE_PYTHON
    assert found["cpus"] == 1
    assert worker_pid(live, "probe") != live.process.pid
    assert found["prefix"].startswith(str(env_cache))  # the env lives in the cache...
    assert not found["prefix"].startswith(str(live.models_dir))  # ...not in the model dir


async def test_missing_python_version_names_what_was_found(
    start_isolated: Any, env_cache: Path
) -> None:
    live = start_isolated("probe")
    config = live.models_dir / "probe" / "config.yaml"
    config.write_text(config.read_text().replace(f'"{PROBE_PYTHON}"', '"3.99"'))
    reload(live)
    wait_until_built(live)
    row = info(live, "probe")
    assert row["status"] == "ready"  # the good version keeps serving
    assert row["error"].startswith(
        "config.yaml: isolation.python_version: Python 3.99 not found; found: 3."
    )


async def test_memory_limit_ends_turn_with_resource_exhausted(start_isolated: Any) -> None:
    live = start_isolated("probe")
    async with chat(live, "probe") as ws:
        before = await facts(ws)
        before_pid = worker_pid(live, "probe")
        turn = await run_turn(ws, "alloc 800")  # limit is 400M
        assert turn.errors[0]["code"] == "resource_exhausted"
        assert "400M" in turn.errors[0]["message"]
        assert turn.done["reason"] == "error"
        # The worker is replaced; the session carries on with its history.
        after = await facts(ws)
        assert worker_pid(live, "probe") != before_pid
    # user "facts", assistant reply, user "alloc 800" (no reply: nothing streamed), "facts"
    assert after["history"] == 4
    assert after["instance"] != before["instance"]  # on_chat_start ran again


async def test_kill_9_mid_stream_is_model_crashed_and_the_session_goes_on(
    start_isolated: Any,
) -> None:
    live = start_isolated("probe", "crasher")
    async with chat(live, "probe") as ws, chat(live, "crasher") as other:
        await facts(ws)
        pid = worker_pid(live, "probe")
        await ws.send("stream 200")
        await recv_frame(ws)
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        rest = await read_turn(ws, timeout=5)
        assert time.monotonic() - killed_at < 1.0
        assert rest.errors[0]["code"] == "model_crashed"
        assert rest.done["reason"] == "error"
        # Another model is untouched, and the next turn runs in a new worker.
        assert (await run_turn(other, "hi")).text == "alive"
        again = await facts(ws)
        assert worker_pid(live, "probe") != pid
    assert again["history"] >= 3
    live.wait_for_log(r"model probe: worker exited \(killed by signal 9 \(SIGKILL\)\)")
    assert "probe prints to stdout" in live.wait_for_log("worker.*stdout: probe prints")


async def test_crash_loop_fails_the_model_with_the_reason(start_isolated: Any) -> None:
    live = start_isolated("crasher")
    async with chat(live, "crasher") as ws:
        for _ in range(5):
            turn = await run_turn(ws, "crash")
            assert turn.errors[0]["code"] == "model_crashed"
    row = info(live, "crasher")
    assert row["status"] == "failed"
    assert row["error"] == "crashed 5 times in 60 s; last exit: exit code 3"
    response = await refused_handshake(live, "crasher")
    assert response.status_code == 503


async def test_building_model_answers_503_with_retry_after(start_isolated: Any) -> None:
    live = start_isolated("probe")
    copy_models(live.models_dir, "slow_loader", source=ISOLATED_MODELS)  # loads for 3 s
    assert reload(live)["building"] == ["slow_loader"]
    assert info(live, "slow_loader")["status"] == "building"
    response = await refused_handshake(live, "slow_loader")
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "5"
    wait_until_built(live)
    async with chat(live, "slow_loader") as ws:
        assert (await run_turn(ws, "hi")).text == "loaded"


async def test_reload_keeps_streaming_session_on_old_worker(start_isolated: Any) -> None:
    live = start_isolated("probe")
    main = live.models_dir / "probe" / "main.py"
    async with chat(live, "probe") as ws:
        instance = (await facts(ws))["instance"]
        old_pid = worker_pid(live, "probe")
        await ws.send("stream 40")  # 2 s of chunks
        await recv_frame(ws)
        main.write_text(main.read_text() + "\n# changed code, same requirements\n")
        assert reload(live)["building"] == ["probe"]
        wait_until_built(live)
        live.wait_for_log("model probe: reusing environment")  # no new env for code changes
        async with chat(live, "probe") as fresh:
            await facts(fresh)
            assert worker_pids(live, "probe") == [old_pid, mock.ANY]  # a new worker...
        assert alive(old_pid)  # ...and the old one still serves
        rest = await read_turn(ws)
        assert rest.done["reason"] == "stop" and not rest.errors
        # Still pinned to its version: the same model instance, so the same worker.
        assert (await facts(ws))["instance"] == instance
    # The old worker stops when its last session has ended.
    for _ in range(100):
        if not alive(old_pid):
            break
        await asyncio.sleep(0.05)
    assert not alive(old_pid)


async def test_changed_requirements_build_a_new_env_and_failed_build_keeps_old(
    start_isolated: Any,
) -> None:
    live = start_isolated("probe")
    requirements = live.models_dir / "probe" / "requirements.txt"
    requirements.write_text("six\n# distinct requirements for this test: 2\n")
    reload(live)
    wait_until_built(live)
    assert info(live, "probe")["status"] == "ready" and info(live, "probe")["error"] is None
    live.wait_for_log(r"model probe: environment .* built in")
    requirements.write_text("this-package-does-not-exist-anywhere-42\n")
    reload(live)
    wait_until_built(live)
    row = info(live, "probe")
    assert row["status"] == "ready"
    assert "requirements.txt: installing the environment failed" in row["error"]
    assert "this-package-does-not-exist-anywhere-42" in row["error"]
    async with chat(live, "probe") as ws:
        assert (await run_turn(ws, "hi")).text == "ok"


async def test_hand_made_venv_in_the_model_directory_is_used(start_isolated: Any) -> None:
    live = start_isolated("probe")
    model_dir = live.models_dir / "probe"
    uv = Path(sys.executable).parent / "uv"
    python = find_python(PROBE_PYTHON)
    subprocess.run(
        [str(uv), "venv", "--quiet", "--python", str(python), str(model_dir / "venv")],
        check=True,
        timeout=120,
    )
    (model_dir / "config.yaml").write_text(
        (model_dir / "config.yaml").read_text() + "\n# use my venv\n"
    )
    reload(live)
    wait_until_built(live)
    async with chat(live, "probe") as ws:
        assert (await facts(ws))["prefix"] == str(model_dir / "venv")


async def test_no_worker_outlives_the_server(start_isolated: Any) -> None:
    live = start_isolated("probe", "crasher")
    async with chat(live, "probe") as ws:
        await facts(ws)
        pid = worker_pid(live, "probe")
        await ws.send("stream 1000")
        await recv_frame(ws)
        workers = descendants(live.process.pid)  # sandboxes (bwrap, its init) and workers
        assert pid in workers
        live.send_signal(signal.SIGTERM)
        with pytest.raises(ConnectionClosed):
            while True:  # the turn is cancelled after the grace period, then 1001
                await recv_frame(ws, timeout=15)
    assert live.stop() == 0
    for worker in workers:
        assert not alive(worker), f"worker {worker} outlived the server"


async def test_memory_limit_exits_are_not_counted_as_crashes(start_isolated: Any) -> None:
    live = start_isolated("probe")
    async with chat(live, "probe") as ws:
        for _ in range(6):
            turn = await run_turn(ws, "alloc 800")
            assert turn.errors[0]["code"] == "resource_exhausted"
        assert (await run_turn(ws, "hi")).text == "ok"
    assert info(live, "probe")["status"] == "ready"


async def test_crash_looped_model_is_retried_by_the_next_reload(start_isolated: Any) -> None:
    live = start_isolated("crasher")
    async with chat(live, "crasher") as ws:
        for _ in range(5):
            await run_turn(ws, "crash")
    assert info(live, "crasher")["status"] == "failed"
    assert reload(live)["building"] == ["crasher"]
    wait_until_built(live)
    assert info(live, "crasher")["status"] == "ready"
    async with chat(live, "crasher") as ws:
        assert (await run_turn(ws, "hi")).text == "alive"


async def test_long_printed_lines_never_wedge_the_worker(start_isolated: Any) -> None:
    live = start_isolated("probe")
    async with chat(live, "probe") as ws:
        for _ in range(10):  # 1 MB through stdout, in 100 kB lines
            assert (await run_turn(ws, "bigprint")).text == "printed"


async def test_server_settings_do_not_reach_the_model(start_isolated: Any) -> None:
    live = start_isolated("probe", env={"ANYTHING_AGENT_ADMIN_KEY": "s3cret"})
    async with chat(live, "probe") as ws:
        assert (await run_turn(ws, "secrets")).text == ""  # no ANYTHING_AGENT_* at all


async def test_changed_requirements_while_a_session_streams(start_isolated: Any) -> None:
    live = start_isolated("probe")
    async with chat(live, "probe") as ws:
        old = await facts(ws)
        await ws.send("stream 60")  # 3 s of chunks
        await recv_frame(ws)
        (live.models_dir / "probe" / "requirements.txt").write_text(
            "six\n# distinct requirements for this test: 3\n"
        )
        reload(live)
        wait_until_built(live)
        live.wait_for_log(r"model probe: environment .* built in")
        async with chat(live, "probe") as fresh:
            assert (await facts(fresh))["prefix"] != old["prefix"]  # the new environment
        rest = await read_turn(ws)
        assert rest.done["reason"] == "stop" and not rest.errors
        assert (await facts(ws))["instance"] == old["instance"]  # the same worker


async def test_wedged_worker_is_replaced_after_a_cancel(start_isolated: Any) -> None:
    live = start_isolated("probe")
    async with chat(live, "probe") as ws:
        await facts(ws)
        pid = worker_pid(live, "probe")
        await ws.send("block")  # time.sleep inside an async generator: the loop is stuck
        assert (await recv_frame(ws))["content"] == "blocking"
        await ws.send('{"type":"cancel"}')
        assert (await read_turn(ws, timeout=15)).done["reason"] == "cancelled"
        await facts(ws)
        assert worker_pid(live, "probe") != pid  # a fresh worker serves the next turn
    live.wait_for_log("worker unresponsive after cancelling a turn; replacing it")


async def test_isolated_model_missing_a_package_is_told_to_add_it_to_requirements(
    start_isolated: Any,
) -> None:
    live = start_isolated("needs_pydantic")  # imports pydantic; has no requirements.txt
    error = info(live, "needs_pydantic")["error"]
    assert error.startswith("main.py: cannot import 'pydantic' (line 1): ")
    assert "add it to requirements.txt" in error
    assert "server's environment" not in error and "use isolation" not in error


async def test_python_older_than_the_sdk_supports_fails_in_config_not_in_the_worker(
    tmp_path: Path, start_server: Any, env_cache: Path
) -> None:
    models = copy_models(tmp_path / "models", "crasher", source=ISOLATED_MODELS)
    (models / "crasher" / "config.yaml").write_text('isolation: {python_version: "3.8"}\n')
    live: ServerProcess = start_server(models, "--env-cache-dir", str(env_cache))
    row = info(live, "crasher")
    assert (row["status"], row["mode"]) == ("failed", "isolated")
    assert row["error"] == (
        "config.yaml: isolation.python_version: Python 3.8 is not supported: "
        "isolated models run on Python 3.9 or newer (the SDK needs it)"
    )
    assert "building" not in live.log and "worker exited" not in live.log


def test_cancelling_a_build_step_whose_installer_already_exited_just_cancels(
    tmp_path: Path,
) -> None:
    """An installer may exit just as its build is cancelled (a reload superseding it, the
    server stopping); on uvloop, the server's loop, killing it then raises
    ProcessLookupError, which must not replace the cancellation."""
    helper = tmp_path / "helper.pid"
    # The installer exits at once; a helper it started keeps its output open a while.
    command = ["sh", "-c", f"sleep 30 & echo $! > {helper}; exit 0"]

    async def cancel_after_the_installer_exited() -> None:
        with (tmp_path / "build.log").open("w") as build_log:
            step = asyncio.get_running_loop().create_task(
                environments._run(command, tmp_path, build_log, "m", time.monotonic())
            )
            await asyncio.sleep(0.5)
            assert not step.done()  # still reading the output the helper holds open
            step.cancel()
            with pytest.raises(asyncio.CancelledError):
                await step

    try:
        uvloop.run(cancel_after_the_installer_exited())
    finally:
        if helper.exists():
            os.kill(int(helper.read_text()), signal.SIGKILL)


async def test_a_build_shows_its_progress_in_the_log_and_its_time_in_the_listing(
    start_isolated: Any,
) -> None:
    live = start_isolated("slow_loader")  # loads for 3 s once its environment is built
    requirements = live.models_dir / "slow_loader" / "requirements.txt"
    requirements.write_text("six\n# distinct requirements for this test: 4\n")
    assert reload(live)["building"] == ["slow_loader"]
    first = info(live, "slow_loader")
    assert isinstance(first["building_for"], float) and first["pending_revision"]
    await asyncio.sleep(1.0)
    assert info(live, "slow_loader")["building_for"] >= first["building_for"] + 0.9
    wait_until_built(live)
    assert info(live, "slow_loader")["building_for"] is None
    # Between "building" and "built", the installer's own lines, as they came.
    live.wait_for_log(r"model slow_loader: environment .* built in")
    lines = live.log_lines
    began = max(i for i, x in enumerate(lines) if "slow_loader: building environment" in x)
    built = max(i for i, x in enumerate(lines) if "slow_loader: environment" in x)
    progress = [x for x in lines[began:built] if "model slow_loader: installer: " in x]
    assert any("six" in x for x in progress), lines[began:built]


async def test_a_failed_builds_error_shows_cache_paths_relative_to_the_cache(
    tmp_path: Path, start_server: Any, env_cache: Path
) -> None:
    models = copy_models(tmp_path / "models", "crasher", source=ISOLATED_MODELS)
    (models / "crasher" / "requirements.txt").write_text("no-such-package-anywhere-43\n")
    live: ServerProcess = start_server(models, "--env-cache-dir", str(env_cache))
    wait_until_built(live)
    row = info(live, "crasher")
    assert row["status"] == "failed" and "no-such-package-anywhere-43" in row["error"]
    assert "(build log <env-cache>/logs/crasher.log)" in row["error"]
    assert str(env_cache) not in row["error"]
    response = await refused_handshake(live, "crasher")
    assert b"<env-cache>/logs/crasher.log" in response.body
    assert str(env_cache).encode() not in response.body
    # The operator's log keeps the whole error, paths and all.
    live.wait_for_log(f"build log {env_cache}/logs/crasher.log")


async def test_closing_right_after_a_memory_breach_logs_no_error(start_isolated: Any) -> None:
    """The breached worker is on its way out: there is no instance left to end, and a
    planned replacement is not an error (no ``on_chat_end raised`` with a traceback)."""
    live = start_isolated("probe")
    async with chat(live, "probe") as ws:
        turn = await run_turn(ws, "alloc 800")
        assert turn.errors[0]["code"] == "resource_exhausted"
    live.wait_for_log(r"session=\w+ closed after 1 turns")
    async with chat(live, "probe") as ws:
        assert (await run_turn(ws, "hi")).text == "ok"
    assert "on_chat_end raised" not in live.log and "Traceback" not in live.log


async def test_the_model_sees_the_servers_history_as_it_is_trimmed(
    tmp_path: Path, start_server: Any, env_cache: Path
) -> None:
    """The worker keeps each session's history and gets only what changed: through a kept
    system message, equal messages and trimming past the limit, the model sees exactly the
    history the server holds."""
    models = copy_models(tmp_path / "models", "recorder")
    config = models / "recorder" / "config.yaml"
    config.write_text(config.read_text() + "\nisolation: true\n")
    server = start_server(models, "--max-history-messages", "5", "--env-cache-dir", str(env_cache))
    wait_until_built(server)
    expected = History(max_messages=5, max_bytes=1 << 22)
    first = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "same"}]
    expected.replace(first)
    async with chat(server, "recorder") as ws:
        await ws.send(json.dumps({"type": "messages", "messages": first}))
        expected.append({"role": "assistant", "content": (await read_turn(ws)).text})
        for _ in range(4):  # the same question again and again, trimmed after the system one
            expected.append({"role": "user", "content": "same"})
            expected.append({"role": "assistant", "content": (await run_turn(ws, "same")).text})
        expected.append({"role": "user", "content": "state"})
        seen = json.loads((await run_turn(ws, "state")).text)["messages"]
    assert seen == expected.messages() and seen[0]["content"] == "be brief" and len(seen) == 5
