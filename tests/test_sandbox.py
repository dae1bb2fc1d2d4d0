"""The bubblewrap sandbox of isolated workers: no network unless asked for, a read-only
view of only what the interpreter needs, a private /tmp, none of the server's
environment; and what ``--sandbox on`` and ``auto`` do where bubblewrap is missing.

One server (``--sandbox on``) serves the module's tests: ``probe`` and ``neighbour``
without network, ``net`` with ``isolation: {network: true}``; all three run the
``sandbox_probe`` test model, which tries what it is told and reports what happened.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    BWRAP_PROBLEM,
    ROOT,
    ServerProcess,
    chat,
    copy_models,
    http,
    launch_server,
    run_turn,
    wait_until_built,
)
from test_isolated import ISOLATED_MODELS, worker_pid

from ws_server import sandbox
from ws_server.exceptions import ModelLoadError
from ws_server.runners.isolated import describe_exit

pytestmark = pytest.mark.sandbox

SECRET = "TEST_SECRET_TOKEN"
# Everything a sandboxed worker's environment may hold (MODEL_TEST_EVENTS: the test
# harness shares its events directory with workers through ANYTHING_AGENT_SANDBOX_SHARE).
# PWD: bwrap sets it with --chdir.
ALLOWED_ENVIRONMENT = {"PATH", "HOME", "TMPDIR", "PWD", "PYTHONUNBUFFERED", "MODEL_TEST_EVENTS"}
ALLOWED_ENVIRONMENT |= set(sandbox.LOCALE_VARIABLES)


@pytest.fixture(scope="module")
def sandboxed(
    pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory, env_cache: Path
) -> Iterator[ServerProcess]:
    """One ``--sandbox on`` server over three copies of the probe, one with network."""
    problem = pytestconfig.stash.get(BWRAP_PROBLEM, None)
    if problem is not None:
        pytest.fail(f"the sandbox tests need bubblewrap: {problem}", pytrace=False)
    models = tmp_path_factory.mktemp("sandbox-models")
    for name in ("probe", "neighbour", "net"):
        copy_models(models, "sandbox_probe", source=ISOLATED_MODELS)
        (models / "sandbox_probe").rename(models / name)
    config = models / "net" / "config.yaml"
    config.write_text(config.read_text().replace("isolation: true", "isolation: {network: true}"))
    live = launch_server(
        models,
        tmp_path_factory.mktemp("sandbox-events"),
        *("--env-cache-dir", str(env_cache), "--sandbox", "on"),
        env={"ANYTHING_AGENT_ADMIN_KEY": "s3cret-admin", SECRET: "hunter2"},
    )
    try:
        wait_until_built(live)
        for name in ("probe", "neighbour", "net"):
            row = http(live, f"/v1/models/{name}")[2]
            assert row["status"] == "ready", row
        yield live
    finally:
        live.stop()


async def ask(server: ServerProcess, model: str, command: str) -> dict[str, Any]:
    """Run one command in ``model``'s worker; its JSON answer."""
    async with chat(server, model) as ws:
        return json.loads((await run_turn(ws, command)).text)  # type: ignore[no-any-return]


@pytest.fixture
async def listener() -> AsyncIterator[tuple[int, list[bool]]]:
    """A TCP listener on 127.0.0.1 (port, and a list that grows with each connection)."""
    accepted: list[bool] = []

    def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(True)
        writer.close()

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1], accepted
    server.close()
    await server.wait_closed()


async def test_no_network_unless_the_model_asks_for_it(
    sandboxed: ServerProcess, listener: tuple[int, list[bool]]
) -> None:
    port, accepted = listener
    # Without isolation.network: the machine's loopback is not the sandbox's...
    refused = await ask(sandboxed, "probe", f"connect 127.0.0.1 {port}")
    assert not refused["ok"] and "ConnectionRefusedError" in refused["error"]
    assert accepted == []
    # ...and there is no route out, nor a name server to ask.
    outside = await ask(sandboxed, "probe", "connect 1.1.1.1 53")
    assert not outside["ok"] and "unreachable" in outside["error"]
    assert not (await ask(sandboxed, "probe", "resolve example.com"))["ok"]
    # With isolation: {network: true}, the same code reaches the test's listener.
    assert await ask(sandboxed, "net", f"connect 127.0.0.1 {port}") == {
        "ok": True,
        "value": "connected",
    }
    assert accepted == [True]


async def test_other_models_and_the_servers_files_are_out_of_sight(
    sandboxed: ServerProcess,
) -> None:
    own = sandboxed.models_dir / "probe" / "main.py"
    assert (await ask(sandboxed, "probe", f"read {own}"))["value"] == own.read_text()
    for hidden in (
        sandboxed.models_dir / "neighbour" / "main.py",  # another model's code
        ROOT / "pyproject.toml",  # the server's files, beyond the ws_server package
        ROOT / "tests" / "conftest.py",
        Path("/etc/shadow"),  # /etc, bar the few files the C library and Python need
    ):
        answer = await ask(sandboxed, "probe", f"read {hidden}")
        assert not answer["ok"] and "FileNotFoundError" in answer["error"], hidden
    models = await ask(sandboxed, "probe", f"listdir {sandboxed.models_dir}")
    assert models == {"ok": True, "value": ["probe"]}  # its own directory, nothing else
    package = await ask(sandboxed, "probe", f"listdir {ROOT}")
    assert package == {"ok": True, "value": ["ws_server"]}  # the package it imports, alone


async def test_own_directory_is_read_only(sandboxed: ServerProcess) -> None:
    main = sandboxed.models_dir / "probe" / "main.py"
    before = main.read_text()
    for target in (main, main.with_name("new_file.py")):
        answer = await ask(sandboxed, "probe", f"write {target}")
        assert not answer["ok"] and "Read-only file system" in answer["error"], target
    assert main.read_text() == before
    assert not main.with_name("new_file.py").exists()


async def test_tmp_is_private_and_writable(sandboxed: ServerProcess) -> None:
    name = f"sandbox-test-{uuid.uuid4().hex}"
    marker = f"/tmp/{name}"
    assert (await ask(sandboxed, "probe", f"write {marker}"))["ok"]
    assert (await ask(sandboxed, "probe", f"read {marker}"))["value"].startswith("written")
    environment = (await ask(sandboxed, "probe", "environ"))["value"]
    assert environment["HOME"] == environment["TMPDIR"] == "/tmp"
    # Neither another model's worker nor the machine sees it.
    assert not (await ask(sandboxed, "neighbour", f"read {marker}"))["ok"]
    assert name not in os.listdir("/tmp")


async def test_the_servers_environment_is_out_of_reach(sandboxed: ServerProcess) -> None:
    environment = (await ask(sandboxed, "probe", "environ"))["value"]
    assert set(environment) <= ALLOWED_ENVIRONMENT, environment
    assert SECRET not in environment
    assert not [name for name in environment if name.startswith("ANYTHING_AGENT_")]
    # The server's process is not there to read: a PID namespace of its own.
    server_pid = sandboxed.process.pid
    answer = await ask(sandboxed, "probe", f"read /proc/{server_pid}/environ")
    assert not answer["ok"] and "FileNotFoundError" in answer["error"]
    assert server_pid not in (await ask(sandboxed, "probe", "whoami"))["value"]["pids"]


async def test_a_well_behaved_model_runs_as_nobody_in_its_sandbox(
    sandboxed: ServerProcess,
) -> None:
    me = (await ask(sandboxed, "probe", "whoami"))["value"]
    assert (me["uid"], me["gid"]) == (65534, 65534)
    assert me["cwd"] == str(sandboxed.models_dir / "probe")
    assert me["pids"] == [1, me["pid"]]  # bwrap's init and the worker, nothing else
    sandboxed.wait_for_log(r"model probe: worker pid \d+ ready \(generation \d+, sandboxed\)")


async def test_a_worker_killed_in_its_sandbox_is_reported_as_killed(
    sandboxed: ServerProcess,
) -> None:
    async with chat(sandboxed, "neighbour") as ws:
        await run_turn(ws, "whoami")
        os.kill(worker_pid(sandboxed, "neighbour"), signal.SIGSEGV)
        sandboxed.wait_for_log(
            r"model neighbour: worker exited \(killed by signal 11 \(SIGSEGV\)\)"
        )
        assert json.loads((await run_turn(ws, "whoami")).text)["ok"]  # a new worker


def bwrap_free_path(tmp_path: Path) -> dict[str, str]:
    """A server environment whose PATH has no bwrap (only the server's own interpreter)."""
    return {"PATH": str(Path(sys.executable).parent)}


async def test_sandbox_on_without_bubblewrap_fails_the_model(
    start_server: Any, tmp_path: Path, env_cache: Path
) -> None:
    models = copy_models(tmp_path / "models", "sandbox_probe", source=ISOLATED_MODELS)
    live = start_server(
        models,
        *("--env-cache-dir", str(env_cache), "--sandbox", "on"),
        env=bwrap_free_path(tmp_path),
    )
    wait_until_built(live)
    row = http(live, "/v1/models/sandbox_probe")[2]
    assert row["status"] == "failed"
    assert row["error"] == (
        "isolation: the sandbox is required (--sandbox on) but bwrap is not installed "
        "(not found on PATH)"
    )


async def test_sandbox_auto_without_bubblewrap_runs_unsandboxed_with_a_warning(
    start_server: Any, tmp_path: Path, env_cache: Path
) -> None:
    models = copy_models(tmp_path / "models", "sandbox_probe", source=ISOLATED_MODELS)
    live = start_server(models, "--env-cache-dir", str(env_cache), env=bwrap_free_path(tmp_path))
    wait_until_built(live)
    live.wait_for_log(r"WARNING.*isolated models run WITHOUT a sandbox: bwrap is not installed")
    live.wait_for_log(r"model sandbox_probe: worker pid \d+ ready \(generation 1, not sandboxed\)")
    me = (await ask(live, "sandbox_probe", "whoami"))["value"]
    assert me["uid"] == os.getuid()  # it runs, as the server's user


def test_exit_statuses_seen_through_bwrap_are_described_as_the_workers() -> None:
    assert describe_exit(3, sandboxed=True) == "exit code 3"
    assert describe_exit(137, sandboxed=True) == "killed by signal 9 (SIGKILL)"
    assert describe_exit(-9, sandboxed=True) == "killed by signal 9 (SIGKILL)"  # bwrap itself
    assert describe_exit(137) == "exit code 137"  # unsandboxed, 137 is just a code


def test_the_sandbox_binds_only_what_the_worker_needs(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    spec = sandbox.SandboxSpec(
        python=Path(sys.executable),
        package_dir=ROOT / "ws_server",
        model_dir=tmp_path / "model",
    )
    argv = sandbox.command(sandbox.Bubblewrap("/usr/bin/bwrap", (0, 8, 0)), spec)
    binds = [argv[i + 1] for i, arg in enumerate(argv) if arg in ("--bind", "--ro-bind")]
    assert "/" not in binds and str(ROOT) not in binds
    assert {str(ROOT / "ws_server"), str(tmp_path / "model")} <= set(binds)
    assert "--unshare-net" in argv and argv[-1] == "--"
    for flag in ("--disable-userns", "--die-with-parent", "--new-session", "--unshare-pid"):
        assert flag in argv, flag
    assert argv[argv.index("--cap-drop") + 1] == "ALL"
    networked = sandbox.command(
        sandbox.Bubblewrap("/usr/bin/bwrap", (0, 8, 0)),
        sandbox.SandboxSpec(spec.python, spec.package_dir, spec.model_dir, network=True),
    )
    assert "--unshare-net" not in networked


def test_a_hand_made_venv_cannot_make_the_sandbox_bind_the_filesystem(tmp_path: Path) -> None:
    """A model ships venv/ itself, so its pyvenv.cfg and symlinks are the model's to forge."""
    model = tmp_path / "model"
    (model / "venv" / "bin").mkdir(parents=True)
    (model / "venv" / "pyvenv.cfg").write_text("home = /bin\n")  # "home's parent" is /
    (model / "venv" / "bin" / "python").symlink_to(sys.executable)
    bwrap = sandbox.Bubblewrap("/usr/bin/bwrap", (0, 8, 0))
    argv = sandbox.command(
        bwrap, sandbox.SandboxSpec(model / "venv" / "bin" / "python", ROOT / "ws_server", model)
    )
    binds = [argv[i + 1] for i, arg in enumerate(argv) if arg in ("--bind", "--ro-bind")]
    assert "/" not in binds and "/bin" not in binds
    escape = tmp_path / "escape"
    escape.mkdir()
    (escape / "venv").symlink_to("/")  # venv/ itself a link to the root
    with pytest.raises(ModelLoadError, match="will not bind /"):
        sandbox.command(
            bwrap,
            sandbox.SandboxSpec(escape / "venv" / "bin" / "python3", ROOT / "ws_server", escape),
        )
