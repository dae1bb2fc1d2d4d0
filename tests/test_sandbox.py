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
import socket
import sys
import time
import urllib.request
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

from ws_server.exceptions import ModelLoadError
from ws_server.isolation import cgroups, sandbox
from ws_server.isolation.local_link import describe_exit

pytestmark = pytest.mark.sandbox

SECRET = "TEST_SECRET_TOKEN"
ADMIN_KEY = "s3cret-admin"
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
    copy_models(models, "hostile", source=ISOLATED_MODELS)
    config = models / "net" / "config.yaml"
    config.write_text(config.read_text().replace("isolation: true", "isolation: {network: true}"))
    live = launch_server(
        models,
        tmp_path_factory.mktemp("sandbox-events"),
        *("--env-cache-dir", str(env_cache), "--sandbox", "on"),
        env={"ANYTHING_AGENT_ADMIN_KEY": ADMIN_KEY, SECRET: "hunter2"},
    )
    try:
        wait_until_built(live)
        for name in ("probe", "neighbour", "net", "hostile"):
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
    """Proved from inside, never by sending anything off this machine."""
    port, accepted = listener
    # Without isolation.network: the machine's loopback is not the sandbox's...
    refused = await ask(sandboxed, "probe", f"connect 127.0.0.1 {port}")
    assert not refused["ok"] and "ConnectionRefusedError" in refused["error"]
    assert accepted == []
    # ...and there is nothing else: no interface but its own loopback, no route anywhere.
    assert (await ask(sandboxed, "probe", "interfaces"))["value"] == ["lo"]
    assert (await ask(sandboxed, "probe", "routes"))["value"] == []
    # With isolation: {network: true}, the same code reaches the test's listener, and
    # sees the host's interfaces.
    assert await ask(sandboxed, "net", f"connect 127.0.0.1 {port}") == {
        "ok": True,
        "value": "connected",
    }
    assert accepted == [True]
    host = sorted(name for _, name in socket.if_nameindex())
    assert (await ask(sandboxed, "net", "interfaces"))["value"] == host
    # ...but never the server's own port (its listing, its admin routes).
    server = await ask(sandboxed, "net", f"get 127.0.0.1 {sandboxed.port} /v1/models")
    assert not server["ok"], server  # (told apart by its host user: the server is root)
    sandboxed.wait_for_log("refused a connection from a networked sandbox")


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
    # Writable by anyone on the host: only the sandbox's read-only bind stands in the way.
    main.chmod(0o666)
    main.parent.chmod(0o777)
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
    line = sandboxed.wait_for_log(r"model probe: worker pid \d+ ready \(generation \d+, sandboxed;")
    # The pid logged is the model's interpreter on the host, not bwrap's.
    assert int(line.split("worker pid ")[1].split()[0]) == worker_pid(sandboxed, "probe")


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
    live.wait_for_log(r"model sandbox_probe: worker pid \d+ ready \(generation 1, not sandboxed;")
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


# ------------------------------------------------------------------ hostile models
def processes_marked(mark: str) -> list[int]:
    """Host pids whose command line holds ``mark``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                    if mark.encode() in cmdline.read():
                        found.append(int(entry))
            except OSError:
                continue
    return found


def wait_gone(mark: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while processes_marked(mark) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_marked(mark) == [], f"processes marked {mark} outlived their worker"


def admin_reload(server: ServerProcess) -> dict[str, Any]:
    request = urllib.request.Request(
        server.http_url + "/v1/models/reload",
        method="POST",
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


def status_fields(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as status:
        return dict(line.split(":\t", 1) for line in status.read().splitlines() if ":\t" in line)


async def test_the_root_is_read_only_so_writes_cannot_grow_host_memory(
    sandboxed: ServerProcess,
) -> None:
    """bwrap's root is a tmpfs: writable, it would hold whatever a model wrote there in
    the host's memory, past every limit. Only /tmp and /dev/shm (sized) are writable."""
    for target in ("/bigfile", "/root/big", "/usr/big", "/dev/big"):
        answer = await ask(sandboxed, "probe", f"write {target}")
        assert not answer["ok"] and "Read-only file system" in answer["error"], target
    for writable in ("/tmp/small", "/dev/shm/small"):
        assert (await ask(sandboxed, "probe", f"write {writable}"))["ok"], writable


async def test_tmp_counts_against_the_memory_limit(sandboxed: ServerProcess) -> None:
    async with chat(sandboxed, "hostile") as ws:
        turn = await run_turn(ws, "fill /tmp/big 400")  # the limit is 256M
        if turn.errors:  # the kernel killed the worker: its /tmp pages were its memory
            assert turn.errors[0]["code"] == "resource_exhausted", turn.frames
        else:  # or /tmp, sized by the limit, was full first
            answer = json.loads(turn.text)
            assert answer["written_mib"] < 256 and "No space left" in answer["error"], answer
        # The model stays ready, in a new worker if it was replaced, with an empty /tmp.
        again = json.loads((await run_turn(ws, "fill /tmp/small 1")).text)
        assert again == {"written_mib": 1, "error": None}
    assert http(sandboxed, "/v1/models/hostile")[2]["status"] == "ready"


async def test_memory_bounds_the_whole_process_tree(sandboxed: ServerProcess) -> None:
    """Four children of 100 MiB each stay under a per-process limit of 256M, but not
    under a limit on the tree: the turn is a breach, not a crash, and no child survives."""
    async with chat(sandboxed, "hostile") as ws:
        before = worker_pid(sandboxed, "hostile")
        turn = await run_turn(ws, "children 4 100")
        assert [e["code"] for e in turn.errors] == ["resource_exhausted"], turn.frames
        assert turn.done["reason"] == "error"
        again = json.loads((await run_turn(ws, "children 1 10")).text)
        assert again == {"held": 1}  # the session goes on, in a new worker
        assert worker_pid(sandboxed, "hostile") != before
    assert http(sandboxed, "/v1/models/hostile")[2]["status"] == "ready"
    wait_gone("block = b")
    assert "on_chat_end raised" not in sandboxed.log  # a planned replacement: no error


async def test_a_memory_kill_between_turns_is_not_blamed_on_the_next_turn(
    sandboxed: ServerProcess,
) -> None:
    """Children the model left running go past the limit after their turn ended: the
    kernel kills one, and the next turn (another session's) is not a breach for it."""
    async with chat(sandboxed, "hostile") as ws:
        assert json.loads((await run_turn(ws, "later 0.5 2 150")).text) == {"started": 2}
    await asyncio.sleep(2.5)  # both wake, one is killed for memory meanwhile
    async with chat(sandboxed, "hostile") as other:
        turn = await run_turn(other, "fill /tmp/small 1")
        assert turn.errors == [] and json.loads(turn.text)["error"] is None, turn.frames


async def test_process_count_is_bounded_and_children_end_with_the_worker(
    sandboxed: ServerProcess,
) -> None:
    mark = f"hostile-sleeper-{uuid.uuid4().hex}"
    async with chat(sandboxed, "hostile") as ws:
        answer = json.loads((await run_turn(ws, f"spawn 100 {mark}")).text)
        assert answer["started"] < 32 and "Resource temporarily unavailable" in answer["error"]
        # They may outlive the turn...
        assert len(processes_marked(mark)) == answer["started"]
    # ...and the session, but never the worker: a reload that replaces it ends them.
    main = sandboxed.models_dir / "hostile" / "main.py"
    main.write_text(main.read_text() + "\n# changed\n")
    assert admin_reload(sandboxed)["building"] == ["hostile"]
    wait_until_built(sandboxed)
    wait_gone(mark)


async def test_cpu_is_a_time_quota(sandboxed: ServerProcess) -> None:
    """Two busy processes under ``cpu: 0.25`` get a quarter of one core between them."""
    async with chat(sandboxed, "hostile") as ws:
        used = json.loads((await run_turn(ws, "burn 2 2")).text)
    assert used["cpu_seconds"] / used["wall_seconds"] < 0.6, used  # unbounded: 1.0 or more


async def test_sandboxed_processes_are_nobody_on_the_host_and_filtered(
    sandboxed: ServerProcess,
) -> None:
    """Not only inside the namespace: on the host too, when the server runs as root."""
    async with chat(sandboxed, "probe") as ws:
        await run_turn(ws, "whoami")
        worker = worker_pid(sandboxed, "probe")
        expected = "65534" if os.geteuid() == 0 else str(os.geteuid())
        for pid in [worker, *ancestors_below(worker, sandboxed.process.pid)]:
            fields = status_fields(pid)
            assert {fields["Uid"].split()[i] for i in range(4)} == {expected}, (pid, fields)
            assert fields["CapEff"].strip("0") == "", (pid, fields["CapEff"])
        assert status_fields(worker)["Seccomp"] == "2"  # a filter is installed


def ancestors_below(pid: int, top: int) -> list[int]:
    """The processes between ``pid`` and ``top`` (bwrap and its init)."""
    found = []
    while True:
        with open(f"/proc/{pid}/stat") as stat:
            pid = int(stat.read().rsplit(")", 1)[1].split()[1])
        if pid in (top, 0, 1):
            return found
        found.append(pid)


async def test_seccomp_refuses_what_no_model_needs(sandboxed: ServerProcess) -> None:
    async with chat(sandboxed, "hostile") as ws:
        refused = json.loads((await run_turn(ws, "syscalls")).text)
    io_uring = refused.pop("io_uring_setup")
    assert refused == dict.fromkeys(refused, "EPERM") and len(refused) == 13, refused
    assert io_uring == "ENOSYS"  # as if the kernel had none: libraries fall back


async def test_the_listing_says_which_protections_hold(sandboxed: ServerProcess) -> None:
    row = http(sandboxed, "/v1/models/hostile")[2]
    assert row["sandbox"] == {
        "bubblewrap": True,
        "network": False,
        "read_only_root": True,
        "private_tmp": True,
        "seccomp": True,
        "host_user": "nobody" if os.geteuid() == 0 else row["sandbox"]["host_user"],
        "limits": row["sandbox"]["limits"],
        "memory": "256M",
        "pids": 32 if row["sandbox"]["limits"] != "per-process" else None,
        "cpu": 0.25,
    }
    assert row["sandbox"]["limits"] == cgroups_here()
    assert http(sandboxed, "/v1/models/net")[2]["sandbox"]["network"] is True
    assert http(sandboxed, "/v1/models/probe")[2]["sandbox"]["pids"] in (64, None)


def cgroups_here() -> str:
    found = cgroups.discover()
    return found.label if isinstance(found, cgroups.Hierarchy) else "per-process"


async def test_a_model_directory_closed_to_the_sandbox_user_fails_naming_it(
    start_server: Any, tmp_path: Path, env_cache: Path
) -> None:
    """As root, the sandbox runs as nobody: a model directory it may not read fails the
    model with what to do, instead of a worker dying on a PermissionError."""
    if os.geteuid() != 0:
        pytest.skip("only a root server drops the sandbox to nobody")
    models = copy_models(tmp_path / "models", "sandbox_probe", source=ISOLATED_MODELS)
    (models / "sandbox_probe").chmod(0o700)
    live = start_server(models, *("--env-cache-dir", str(env_cache), "--sandbox", "on"))
    wait_until_built(live)
    row = http(live, "/v1/models/sandbox_probe")[2]
    assert row["status"] == "failed"
    assert row["error"] == (
        "isolation: the sandbox runs as nobody (the server is root), which cannot read "
        f"{models / 'sandbox_probe'}: chmod o+rX it"
    )


async def test_a_model_cannot_link_its_venv_or_requirements_out_of_its_directory(
    start_server: Any, tmp_path: Path, env_cache: Path
) -> None:
    """Links a model ships are its to forge: followed by a root server, they would bind or
    read (into the listing) what the model may not see."""
    elsewhere = tmp_path / "private"
    (elsewhere / "bin").mkdir(parents=True)
    (elsewhere / "bin" / "python").symlink_to(sys.executable)
    (elsewhere / "secret.txt").write_text("TOPSECRET")
    models = copy_models(tmp_path / "models", "sandbox_probe", source=ISOLATED_MODELS)
    copy_models(models, "hostile", source=ISOLATED_MODELS)
    (models / "sandbox_probe" / "venv").symlink_to(elsewhere)
    (models / "hostile" / "requirements.txt").symlink_to(elsewhere / "secret.txt")
    live = start_server(models, *("--env-cache-dir", str(env_cache), "--sandbox", "on"))
    wait_until_built(live)
    for name, what in (("sandbox_probe", "venv/"), ("hostile", "requirements.txt")):
        row = http(live, f"/v1/models/{name}")[2]
        assert row["status"] == "failed"
        assert row["error"] == f"{what} must be inside the model directory, not a link out of it"
    assert "TOPSECRET" not in json.dumps(http(live, "/v1/models")[2])
