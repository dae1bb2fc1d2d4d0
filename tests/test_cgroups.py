"""Finding where the server's cgroup is (v2 when it delegates, else v1, else per-process
limits), and that a server leaves no cgroup of its own behind."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from conftest import chat, copy_models, run_turn, wait_until_built
from test_isolated import ISOLATED_MODELS

from ws_server.isolation import cgroups

V1_CGROUP = """\
9:name=systemd:/
8:pids:/
4:memory:/jobs/job-7
1:cpu,cpuacct:/jobs/job-7
0::/
"""


def v1_mountinfo(root: Path, memory_root: str = "/") -> str:
    lines = [
        f"31 23 0:28 / {root} rw,relatime - tmpfs tmpfs rw,mode=755",
        f"32 31 0:29 / {root}/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct",
        f"35 31 0:32 {memory_root} {root}/memory rw,relatime - cgroup cgroup rw,memory",
        f"39 31 0:36 / {root}/pids rw,relatime - cgroup cgroup rw,pids",
        f"41 31 0:38 / {root}/unified rw,relatime - cgroup2 cgroup2 rw",
    ]
    return "\n".join(lines) + "\n"


def fake_proc(tmp_path: Path, cgroup: str, mountinfo: str) -> dict[str, str]:
    (tmp_path / "cgroup").write_text(cgroup)
    (tmp_path / "mountinfo").write_text(mountinfo)
    return {"proc_cgroup": str(tmp_path / "cgroup"), "mountinfo": str(tmp_path / "mountinfo")}


def test_v1_finds_the_servers_own_cgroup_in_each_hierarchy(tmp_path: Path) -> None:
    root = tmp_path / "sys"
    for directory in ("cpu,cpuacct/jobs/job-7", "memory/jobs/job-7", "pids", "unified"):
        (root / directory).mkdir(parents=True)
    found = cgroups.discover(**fake_proc(tmp_path, V1_CGROUP, v1_mountinfo(root)))
    assert isinstance(found, cgroups.Hierarchy) and found.label == "cgroup v1"
    assert found.server_dirs == {
        "memory": root / "memory/jobs/job-7",
        "pids": root / "pids",
        "cpu": root / "cpu,cpuacct/jobs/job-7",
    }


def test_a_mount_showing_only_part_of_the_tree_is_read_relative_to_its_root(
    tmp_path: Path,
) -> None:
    """In a container, a hierarchy's mount may show the tree from the server's cgroup."""
    root = tmp_path / "sys"
    for directory in ("cpu,cpuacct/jobs/job-7", "memory", "pids"):
        (root / directory).mkdir(parents=True)
    mountinfo = v1_mountinfo(root, memory_root="/jobs/job-7")
    found = cgroups.discover(**fake_proc(tmp_path, V1_CGROUP, mountinfo))
    assert isinstance(found, cgroups.Hierarchy)
    assert found.server_dirs["memory"] == root / "memory"


def test_v2_is_used_only_where_the_servers_cgroup_delegates_the_controllers(
    tmp_path: Path,
) -> None:
    unified = tmp_path / "unified"
    (unified / "svc").mkdir(parents=True)
    mountinfo = f"41 23 0:38 / {unified} rw,relatime - cgroup2 cgroup2 rw\n"
    proc = fake_proc(tmp_path, "0::/svc\n", mountinfo)
    (unified / "svc" / "cgroup.subtree_control").write_text("memory pids\n")
    found = cgroups.discover(**proc)
    assert found == (
        f"cgroup v2: {unified / 'svc'} does not delegate cpu to its children; "
        "cgroup v1: no memory hierarchy"
    )
    (unified / "svc" / "cgroup.subtree_control").write_text("cpu memory pids\n")
    found = cgroups.discover(**proc)
    assert isinstance(found, cgroups.Hierarchy) and found.label == "cgroup v2"
    assert set(found.server_dirs.values()) == {unified / "svc"}


def test_without_a_usable_hierarchy_workers_get_per_process_limits(tmp_path: Path) -> None:
    found = cgroups.discover(**fake_proc(tmp_path, "0::/\n", ""))
    assert isinstance(found, str) and "no memory hierarchy" in found
    missing = cgroups.discover(str(tmp_path / "nowhere"), str(tmp_path / "nowhere"))
    assert isinstance(missing, str) and missing.startswith("cannot read the server's cgroups")


def our_cgroups(server_pid: int) -> list[Path]:
    """The ``anything-agent-<pid>`` directories of one server, in every hierarchy here."""
    found = cgroups.discover()
    if not isinstance(found, cgroups.Hierarchy):
        return []
    return [d / f"anything-agent-{server_pid}" for d in found.server_dirs.values()]


async def test_a_server_removes_its_cgroups_when_it_stops(
    tmp_path: Path, start_server: Any, env_cache: Path
) -> None:
    assert isinstance(cgroups.discover(), cgroups.Hierarchy), "this host has no usable cgroup"
    models = copy_models(tmp_path / "models", "hostile", source=ISOLATED_MODELS)
    live = start_server(models, "--env-cache-dir", str(env_cache))
    wait_until_built(live)
    async with chat(live, "hostile") as ws:
        await run_turn(ws, "fill /tmp/x 1")
        made = our_cgroups(live.process.pid)
        assert made and all(d.is_dir() for d in made)
        assert all(any(p.is_dir() for p in d.iterdir()) for d in made)  # the worker's group
    assert live.stop() == 0
    assert [d for d in made if d.exists()] == []
    assert made[0].parent.is_dir()  # the server's own cgroup is untouched
