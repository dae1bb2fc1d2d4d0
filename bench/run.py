"""AnythingAgent against bare websockets and its peers: throughput, first-chunk latency,
idle-session capacity, reconnect-to-resumed latency (on the same node and through another
one), the memory of detached sessions, and several nodes behind nginx against one, every
figure a ratio to a reference measured in the same run.

    .venv/bin/python bench/run.py [--servers KEYS] [--modes MODES] [--json PATH] ...

Every server (bench/lineup.py) is started on CPU 1 while the load generator
(bench/loadgen.py, picows) runs here on CPU 0; a server's processes (an isolated worker, the
``--workers 2`` row's supervisor and its two server processes) inherit that CPU, and their
RSS, CPU time and write calls count together. Capacity is measured first, on each fresh
server (so RSS growth is the sessions' own), and the detached sessions' memory on a fresh
server of its own per resumable row (started with ``--replay-buffer-bytes``); then
``--rounds`` rounds in which each server in turn takes the throughput load, then latency
with 1 and with ``--crowd`` connections, then the resume probe: each figure is the median of
its rounds, and drift of the machine falls on all servers alike. A row whose sessions live
in Redis gets a redis-server of the runner's (on CPU 1 too), and for the resume probe a
second node sharing it; the row whose isolated model is placed on Ray gets a private
single-node Ray head of the runner's (its processes and the model's actor on CPU 1 too:
the same model as the local isolated row's). The cluster mode, last, starts nginx in front
of 3 nodes and of 1 (``LocalCluster``, every process of it on every CPU) and takes the
throughput load through each, round by round. The sse mode, on servers of its own
(AnythingAgent with ``--no-limits`` and a minimal Starlette SSE server, both on CPU 1),
times the first chunk of one-chunk turns on one connection through AnythingAgent's
WebSocket chat, its ``POST /v1/chat/completions`` with ``stream: true`` (a kept-alive
HTTP/1.1 connection, bench/sse_client.py) and the Starlette server (``--sse-turns`` samples
each, pooled over the rounds), then streams turns of ``--sse-chunks`` chunks through each
with 1 and with ``--sse-connections`` connections. Prints one table, the comparisons with
the server before resumable sessions and of ``--workers 2`` with one process, the Ray
placement against the local isolated worker, the SSE comparison, and the targets; writes the
raw figures as JSON and a PNG chart (default bench/results/bench-<time>.json and .png beside
it; the chart leaves the sse mode out). bench/README.md says how to read them, how to
profile, and where the server's hot path is.

    .venv/bin/python bench/run.py --modes sse     # the SSE mode alone: its servers only
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import loadgen
import procs
import profiling
import report
import sse_client
import uvloop
from lineup import (
    BEFORE,
    BENCH_MODEL,
    KEYS,
    RAY_ADDRESS,
    REFERENCE,
    RESUMABLE,
    SSE_AGENT,
    SSE_STARLETTE,
    ServerSpec,
    check_out,
    lineup,
    prepare,
    sse_lineup,
)

from ws_server.deploy.local_cluster import LocalCluster, find_program
from ws_server.deploy.ray_head import RayHead
from ws_server.deploy.redis_server import RedisServer

HERE = Path(__file__).resolve().parent
SERVER_MODES = ("capacity", "throughput", "latency", "resume", "detached")  # on every server
MODES = (*SERVER_MODES, "cluster", "sse")
SSE_PATHS = ("ws", "sse", "starlette_sse")  # AnythingAgent's two paths, the Starlette server
CLUSTER_SIZES = (1, 3)  # nodes behind nginx: the first is the cluster mode's reference
READY_TIMEOUT = 600.0  # an isolated model's environment is built on first start


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--connections", type=int, default=32, help="throughput: concurrent connections (C)")
    add("--chunks", type=int, default=2000, help="throughput: chunks per turn (N)")
    add("--size", type=int, default=16, help="chunk size in characters (S), every mode")
    add(
        "--duration",
        type=float,
        default=5.0,
        help="seconds each throughput/latency window lasts (D)",
    )
    add("--warmup", type=float, default=1.0, help="seconds of load before each window, not counted")
    add("--rounds", type=int, default=3, help="throughput/latency windows per server (median)")
    add("--crowd", type=int, default=100, help="latency: the concurrent run's connections")
    add("--sessions", type=int, default=10_000, help="capacity: idle sessions opened (K)")
    add("--concurrency", type=int, default=64, help="capacity: handshakes in flight at once")
    add(
        "--resume-samples",
        type=int,
        default=2000,
        help=(
            "resume: connections timed to ready (and resumes; and, on a Redis row, resumes "
            "of one session hopping between two nodes), in all, split over the rounds"
        ),
    )
    add("--detached-sessions", type=int, default=200, help="detached: sessions dropped (K)")
    add(
        "--replay-buffer-bytes",
        type=int,
        default=64 * 1024,
        help="detached: the server's --replay-buffer-bytes (B)",
    )
    add(
        "--flood",
        choices=("awaits", "tight"),
        default="awaits",
        help="detached: the model awaits between chunks, or yields without ever waiting",
    )
    add(
        "--sse-turns",
        type=int,
        default=2000,
        help="sse: first chunks timed per path, in all, split over the rounds (after warm-up)",
    )
    add("--sse-chunks", type=int, default=20_000, help="sse: chunks per streamed turn")
    add("--sse-connections", type=int, default=8, help="sse: the concurrent streaming run's C")
    add("--before", default=BEFORE, help="the commit whose server the 'before' row runs")
    add("--servers", default=",".join(KEYS), help=f"comma-separated, from {','.join(KEYS)}")
    add("--modes", default=",".join(MODES), help=f"comma-separated, from {','.join(MODES)}")
    add("--json", type=Path, help="raw figures (default bench/results/bench-<time>.json)")
    add("--chart", type=Path, help="PNG chart (default: the JSON path with .png)")
    add("--profile", type=Path, metavar="DIR", help="also sample each server with py-spy into DIR")
    args = parser.parse_args(argv)
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [s for s in args.servers if s not in KEYS] + [m for m in args.modes if m not in MODES]
    if unknown:
        parser.error(f"unknown server or mode: {', '.join(unknown)}")
    if REFERENCE not in args.servers:
        args.servers.insert(0, REFERENCE)  # every figure is a ratio to it
    if args.json is None:
        args.json = HERE / "results" / time.strftime("bench-%Y%m%d-%H%M%S.json")
    if args.chart is None:
        args.chart = args.json.with_suffix(".png")
    return args


def wait_ready(port: int, model: str) -> None:
    """Isolated models build in the background: wait until ``model`` says ready."""
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models/{model}") as answer:
            status = json.load(answer)["status"]
        if status == "ready":
            return
        if status == "failed":
            raise RuntimeError(f"model {model} failed to build")
        time.sleep(0.2)
    raise RuntimeError(f"model {model} not ready after {READY_TIMEOUT:g} s")


@dataclass
class Entry:
    """One server of the run: its spec, its process while it runs, what it measured."""

    spec: ServerSpec
    server: procs.Server | None = None
    result: dict[str, Any] = field(default_factory=dict)
    rounds: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    redis: RedisServer | None = None  # its sessions' store, when the spec says so
    ray: RayHead | None = None  # the cluster its isolated model runs on, when it says so
    peer: procs.Server | None = None  # a second node on the same Redis (resume mode)

    @property
    def env(self) -> dict[str, str]:
        """What its servers get added to the runner's environment: the spec's, and the
        address of its Ray head once that runs."""
        if self.ray is None:
            return self.spec.env
        return {**self.spec.env, **self.ray.client_env, RAY_ADDRESS: self.ray.address}

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"ws://127.0.0.1:{self.server.port}/v1/chat/bench"

    @property
    def ok(self) -> bool:
        return self.server is not None and "error" not in self.result

    def fail(self, exc: BaseException) -> None:
        """Report, don't raise: one broken server leaves the rest of the table."""
        self.result["error"] = f"{type(exc).__name__}: {exc}"
        if self.server is not None:
            self.result["log_tail"] = self.server.log_tail()
        print(f"  {self.spec.label} failed: {self.result['error']}", file=sys.stderr)


def start_all(entries: list[Entry], scratch: Path) -> None:
    for entry in entries:
        spec = entry.spec
        entry.result = {"label": spec.label, "command": list(spec.command)}
        if spec.offers:
            entry.result["offers"] = list(spec.offers)
        try:
            if spec.checkout is not None:
                assert spec.cwd is not None
                entry.result["commit"] = check_out(spec.checkout, spec.cwd)
            if spec.redis:  # on the server's CPU: the row's figures include its cost
                binary = find_program("redis-server", "redis-server")
                entry.redis = RedisServer(binary, scratch.absolute())
                with procs.running_on({procs.SERVER_CPU}):
                    entry.redis.start()
            if spec.ray:  # on the server's CPU too: its processes and the model's actor
                entry.ray = RayHead(scratch / "ray")
                with procs.running_on({procs.SERVER_CPU}):
                    entry.ray.start()
                entry.result["ray_address"] = entry.ray.address
            entry.server = procs.start(
                spec.command,
                scratch / "logs" / f"{spec.key}.log",
                env=entry.env,
                cwd=spec.cwd,
                listeners=spec.processes,
            )
            if spec.processes > 1:
                entry.result["processes"] = spec.processes
            if entry.spec.builds_model:
                wait_ready(entry.server.port, "bench")
        except Exception as exc:
            entry.fail(exc)


def combine(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One mode's rounds as one set of figures: the median of each (the worst ``max``,
    the sum of ``samples`` and ``seconds``), every round kept under ``rounds``."""
    figures: dict[str, Any] = {}
    for name, first in rounds[0].items():
        values = [r[name] for r in rounds if name in r]
        if name == "errors":
            figures[name] = [e for v in values for e in v][: loadgen.ERRORS_KEPT]
        elif not isinstance(first, (int, float)) or isinstance(first, bool):
            figures[name] = first
        elif name.endswith("max_us"):
            figures[name] = max(values)
        elif name in ("samples", "seconds", "resumes", "replayed", "hops", "hops_seconds"):
            figures[name] = sum(values)
        else:
            figures[name] = statistics.median(values)
    if len(rounds) > 1:
        figures["rounds"] = rounds
    return figures


async def measure_all(
    entries: list[Entry], args: argparse.Namespace, scratch: Path
) -> dict[str, Any]:
    """Capacity on each fresh server, then ``--rounds`` rounds in which every server takes
    each load in turn: slow drift of the machine falls on all servers alike, and each
    figure is the median of its rounds; then the sse and cluster modes, on servers of
    their own, whose figures it returns (``{"sse": ..., "cluster": ...}``, those run)."""
    if "capacity" in args.modes:
        for entry in [e for e in entries if e.ok]:
            assert entry.server is not None
            print(f"capacity: {entry.spec.label}", file=sys.stderr, flush=True)
            try:
                entry.result["capacity"] = await loadgen.capacity(
                    entry.url,
                    args.sessions,
                    entry.server.rss_kib,
                    entry.server.settle,
                    args.concurrency,
                    entry.spec.offers,
                    partial(procs.redis_used_kib, entry.redis.socket_path) if entry.redis else None,
                )
                # The RSS is the whole tree's: the server, an isolated worker, a --workers
                # supervisor and its server processes.
                entry.result["capacity"]["processes"] = len(entry.server.pids)
            except Exception as exc:
                entry.fail(exc)
    if "detached" in args.modes:
        for entry in [e for e in entries if e.ok and e.spec.resumable]:
            print(f"detached: {entry.spec.label}", file=sys.stderr, flush=True)
            try:
                entry.result["detached"] = await detached(entry, args, scratch)
            except Exception as exc:  # a server of its own: the entry's other figures stand
                entry.result["detached"] = {"failed": f"{type(exc).__name__}: {exc}"}
                print(f"  detached failed: {exc}", file=sys.stderr)
    loads: dict[str, Callable[[Entry], Awaitable[dict[str, Any]]]] = {}
    if "throughput" in args.modes:
        loads["throughput"] = lambda entry: loadgen.throughput(
            entry.url,
            *(args.connections, args.chunks, args.size, args.duration, args.warmup),
            write_calls=entry.server.write_calls if entry.server else None,
            offers=entry.spec.offers,
        )
    if "latency" in args.modes:
        loads["latency_1"] = lambda entry: loadgen.latency(
            *(entry.url, 1, args.size, args.duration, args.warmup, entry.spec.offers),
            cpu_ticks=entry.server.cpu_ticks if entry.server else None,
        )
        loads["latency_crowd"] = lambda entry: loadgen.latency(
            *(entry.url, args.crowd, args.size, args.duration, args.warmup, entry.spec.offers),
            cpu_ticks=entry.server.cpu_ticks if entry.server else None,
        )
    if "resume" in args.modes:
        per_round = math.ceil(args.resume_samples / args.rounds)
        for entry in [e for e in entries if e.ok and e.spec.redis]:
            try:  # a second node on the same Redis, for resumes through another node
                log = scratch / "logs" / f"{entry.spec.key}-peer.log"
                entry.peer = procs.start(
                    entry.spec.command, log, env=entry.env, listeners=entry.spec.processes
                )
            except Exception as exc:
                entry.fail(exc)

        async def resume(entry: Entry) -> dict[str, Any]:
            figures = await loadgen.resume(entry.url, per_round, args.size, entry.spec.offers)
            if entry.peer is not None:
                across = f"ws://127.0.0.1:{entry.peer.port}/v1/chat/bench"
                route = [("same", entry.url), ("across", across), ("back", entry.url)]
                hops = await loadgen.hops(entry.url, route, per_round, args.size, RESUMABLE)
                figures["errors"] += hops.pop("errors")
                figures.update(hops)
            return figures

        loads["resume"] = resume
    for number in range(1, args.rounds + 1):
        for mode, load in loads.items():
            print(f"round {number}/{args.rounds}: {mode}", file=sys.stderr, flush=True)
            for entry in [e for e in entries if e.ok]:
                assert entry.server is not None
                try:
                    await entry.server.settle()
                    entry.rounds.setdefault(mode, []).append(await load(entry))
                except Exception as exc:
                    entry.fail(exc)
    for entry in entries:
        for mode, rounds in entry.rounds.items():
            entry.result[mode] = combine(rounds)
    if args.profile is not None:
        for entry in [e for e in entries if e.ok]:
            try:
                await profile(entry, args)
            except Exception as exc:  # the figures stand without it
                print(f"  profiling {entry.spec.label} failed: {exc}", file=sys.stderr)
    for entry in [e for e in entries if e.ok]:
        assert entry.server is not None
        await entry.server.settle()  # let it finish closing before it is stopped
    extra: dict[str, Any] = {}
    if "sse" in args.modes:
        print("sse", file=sys.stderr, flush=True)
        try:
            extra["sse"] = await sse(args, scratch)
        except Exception as exc:  # the other figures stand without it
            print(f"  sse failed: {exc}", file=sys.stderr)
            extra["sse"] = {"failed": f"{type(exc).__name__}: {exc}"}
    if "cluster" in args.modes:
        print("cluster", file=sys.stderr, flush=True)
        try:
            extra["cluster"] = await cluster(args)
        except Exception as exc:  # the other figures stand without it
            print(f"  cluster failed: {exc}", file=sys.stderr)
            extra["cluster"] = {"failed": f"{type(exc).__name__}: {exc}"}
    return extra


def _start_cluster(nodes: int) -> LocalCluster:
    """Redis, ``nodes`` nodes serving the bench model and nginx in front, all free to run on
    every CPU (the runner itself stays pinned to its own)."""
    with procs.running_on():
        return LocalCluster(
            nodes, models_dir=BENCH_MODEL.parent, extra_args=["--no-limits"]
        ).start()


async def cluster(args: argparse.Namespace) -> dict[str, Any]:
    """The throughput load (clients offering ``resumable``) through nginx round-robin over
    each of ``CLUSTER_SIZES`` nodes sharing a Redis, clusters taking turns over the rounds;
    with each process's share of a core (nginx, Redis, the nodes and this client) and the
    whole machine's over the window, which say what bounds it."""
    clock = os.sysconf("SC_CLK_TCK")
    with contextlib.ExitStack() as stack:
        started = await asyncio.gather(
            *(asyncio.to_thread(_start_cluster, n) for n in CLUSTER_SIZES), return_exceptions=True
        )
        for running in started:
            if isinstance(running, LocalCluster):
                stack.callback(running.stop)
        clusters = [c for c in started if isinstance(c, LocalCluster)]
        for failure in started:
            if isinstance(failure, BaseException):
                raise failure
        parts = []  # each cluster's processes by role, to read their CPU time
        for running in clusters:
            assert running.nginx_process is not None and running.redis_process is not None
            parts.append(
                {
                    "nginx": [procs.Server(running.nginx_process, running.port, Path())],
                    "redis": [procs.Server(running.redis_process, 0, Path())],
                    "nodes": [procs.Server(n.process, n.port, Path()) for n in running.nodes],
                }
            )

        def cpu(servers: dict[str, list[procs.Server]]) -> dict[str, float]:
            used = {k: sum(s.cpu_ticks() for s in v) / clock for k, v in servers.items()}
            times = os.times()
            return {**used, "client": times.user + times.system, "machine": procs.busy()}

        rounds: list[list[dict[str, Any]]] = [[] for _ in clusters]
        for number in range(1, args.rounds + 1):
            for running, servers, found in zip(clusters, parts, rounds, strict=True):
                print(
                    f"round {number}/{args.rounds}: cluster of {len(running.nodes)}",
                    file=sys.stderr,
                    flush=True,
                )
                for server in (s for group in servers.values() for s in group):
                    await server.settle()
                found.append(
                    await loadgen.throughput(
                        running.chat_url("bench"),
                        *(args.connections, args.chunks, args.size, args.duration, args.warmup),
                        offers=RESUMABLE,
                        cpu=partial(cpu, servers),
                    )
                )
    figures = {f"nodes_{n}": combine(r) for n, r in zip(CLUSTER_SIZES, rounds, strict=True)}
    return {**figures, "offers": list(RESUMABLE), "cpus": os.cpu_count()}


async def sse(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    """AnythingAgent's OpenAI-compatible SSE against its WebSocket chat, on one fresh server
    and the same model, and against a minimal Starlette SSE server: the first chunk of
    one-chunk turns on one connection, then chunks/s of long streamed turns on 1 and on
    ``--sse-connections`` connections. Each round every path takes each load in turn;
    first-chunk samples are pooled over the rounds, throughput is the median of its rounds.
    """
    specs = {spec.key: spec for spec in sse_lineup()}
    servers: dict[str, procs.Server] = {}
    clock = os.sysconf("SC_CLK_TCK")
    try:
        for key, spec in specs.items():
            servers[key] = procs.start(spec.command, scratch / "logs" / f"sse-{key}.log")
        ours, theirs = servers[SSE_AGENT], servers[SSE_STARLETTE]
        ws_url = f"ws://127.0.0.1:{ours.port}/v1/chat/bench"
        behind = {"ws": ours, "sse": ours, "starlette_sse": theirs}

        def cpu(server: procs.Server) -> Callable[[], dict[str, float]]:
            def used() -> dict[str, float]:
                times = os.times()
                return {"server": server.cpu_ticks() / clock, "client": times.user + times.system}

            return used

        def first(path: str, samples: int) -> Awaitable[loadgen.Timed]:
            if path == "ws":
                return loadgen.first_chunk(ws_url, args.size, samples, args.warmup)
            return sse_client.first_chunk(behind[path].port, args.size, samples, args.warmup)

        def stream(path: str, connections: int) -> Awaitable[dict[str, Any]]:
            server = behind[path]
            load = (args.sse_chunks, args.size, args.duration, args.warmup)
            if path == "ws":
                return loadgen.throughput(
                    ws_url, connections, *load, write_calls=server.write_calls, cpu=cpu(server)
                )
            return sse_client.throughput(
                server.port, connections, *load, write_calls=server.write_calls, cpu=cpu(server)
            )

        per_round = math.ceil(args.sse_turns / args.rounds)
        timed = {path: loadgen.Timed() for path in SSE_PATHS}
        loads = {"throughput_1": 1, "throughput_n": args.sse_connections}
        rounds: dict[str, dict[str, list[dict[str, Any]]]] = {
            load: {path: [] for path in SSE_PATHS} for load in loads
        }
        for number in range(1, args.rounds + 1):
            print(f"round {number}/{args.rounds}: sse first chunk", file=sys.stderr, flush=True)
            for path in SSE_PATHS:
                await behind[path].settle()
                timed[path].add(await first(path, per_round))
            for load, connections in loads.items():
                print(f"round {number}/{args.rounds}: sse {load}", file=sys.stderr, flush=True)
                for path in SSE_PATHS:
                    await behind[path].settle()
                    rounds[load][path].append(await stream(path, connections))
        figures: dict[str, Any] = {
            "servers": {
                key: {"label": spec.label, "command": list(spec.command)}
                for key, spec in specs.items()
            },
            "latency": {path: found.figures() for path, found in timed.items()},
        }
        for load, by_path in rounds.items():
            figures[load] = {path: combine(found) for path, found in by_path.items()}
        figures["compare"] = report.sse_compare(figures)
        if args.profile is not None:
            await profile_sse(ours, args, first, stream)
        await ours.settle()
        return figures
    except Exception:
        for server in servers.values():
            print(server.log_tail(), file=sys.stderr)
        raise
    finally:
        for server in servers.values():
            await asyncio.to_thread(server.stop)


async def profile_sse(
    server: procs.Server,
    args: argparse.Namespace,
    first: Callable[[str, int], Awaitable[loadgen.Timed]],
    stream: Callable[[str, int], Awaitable[dict[str, Any]]],
) -> None:
    """The sse mode's AnythingAgent loads once more under py-spy, each path on its own:
    first chunks (``--sse-turns`` of them) and one connection's streaming."""
    runs: dict[str, Callable[[], Awaitable[Any]]] = {
        "sse-first-ws": lambda: first("ws", args.sse_turns),
        "sse-first-sse": lambda: first("sse", args.sse_turns),
        "sse-stream-ws": lambda: stream("ws", 1),
        "sse-stream-sse": lambda: stream("sse", 1),
    }
    await profiled(server, runs, args.profile, SSE_AGENT, "AnythingAgent")


async def metric_gauges(port: int) -> dict[str, float]:
    """An AnythingAgent server's detached sessions and replay-buffer bytes (GET /metrics)."""

    def read() -> str:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
                return str(answer.read().decode())
        except OSError as exc:
            raise RuntimeError(
                f"GET /metrics unanswered ({exc}): is the server's event loop blocked? "
                "(its log says, if so)"
            ) from exc

    names = {
        "anything_agent_sessions_detached": "detached",
        "anything_agent_replay_buffer_bytes": "buffered",
    }
    found: dict[str, float] = {}
    for line in (await asyncio.to_thread(read)).splitlines():
        name, _, value = line.partition(" ")
        if name in names:
            found[names[name]] = float(value)
    return found


async def detached(entry: Entry, args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    """The detached sessions' memory, on a fresh server of ``entry``'s started with
    ``--replay-buffer-bytes`` (and a resume window that outlasts the measurement); it is
    stopped afterwards, its sessions unresumed."""
    spec = entry.spec
    command = (
        *spec.command,
        *("--replay-buffer-bytes", str(args.replay_buffer_bytes), "--resume-window", "3600"),
    )
    log = scratch / "logs" / f"{spec.key}-detached.log"
    server = procs.start(command, log, env=entry.env, cwd=spec.cwd, listeners=spec.processes)
    try:
        await server.settle()
        figures = await loadgen.detached(
            f"ws://127.0.0.1:{server.port}/v1/chat/bench",
            *(args.detached_sessions, args.size, args.replay_buffer_bytes),
            server.rss_kib,
            server.settle,
            lambda: metric_gauges(server.port),
            spec.offers,
            awaits=args.flood == "awaits",
        )
    except Exception:
        print(server.log_tail(), file=sys.stderr)
        raise
    finally:
        await asyncio.to_thread(server.stop, 5.0)  # paused turns need no grace
    figures["command"] = list(command)
    return figures


async def profile(entry: Entry, args: argparse.Namespace) -> None:
    """Run each selected mode once more under py-spy (latency with one connection, and
    with ``--crowd``: ``latency_crowd``); write
    the raw stacks and a summary per mode into ``--profile``. py-spy follows the server's
    subprocesses: an isolated worker, and a ``--workers`` supervisor's server processes
    (their samples pooled in one file)."""
    server = entry.server
    assert server is not None
    url = entry.url
    offers = entry.spec.offers
    runs: dict[str, Callable[[], Awaitable[dict[str, Any]]]] = {}
    if "throughput" in args.modes:
        runs["throughput"] = lambda: loadgen.throughput(
            url,
            args.connections,
            args.chunks,
            args.size,
            args.duration,
            args.warmup,
            offers=offers,
        )
    if "latency" in args.modes:
        runs["latency"] = lambda: loadgen.latency(
            url, 1, args.size, args.duration, args.warmup, offers
        )
        runs["latency_crowd"] = lambda: loadgen.latency(
            url, args.crowd, args.size, args.duration, args.warmup, offers
        )
    if "capacity" in args.modes:
        runs["capacity"] = lambda: loadgen.capacity(
            url, args.sessions, server.rss_kib, server.settle, args.concurrency, offers
        )
    if "resume" in args.modes:
        runs["resume"] = lambda: loadgen.resume(url, args.resume_samples, args.size, offers)
    await profiled(server, runs, args.profile, entry.spec.key, entry.spec.label)


async def profiled(
    server: procs.Server,
    runs: Mapping[str, Callable[[], Awaitable[Any]]],
    directory: Path,
    key: str,
    label: str,
) -> None:
    """Each of ``runs`` once under py-spy: its raw stacks and their summary in
    ``directory``, named ``<key>-<run>``."""
    for name, run in runs.items():
        print(f"profiling {name}: {label}", file=sys.stderr, flush=True)
        await server.settle()
        raw = directory / f"{key}-{name}.txt"
        recording = profiling.Recording(server.process.pid, raw)
        await asyncio.sleep(0.5)  # attached
        try:
            await run()
        finally:
            await asyncio.to_thread(recording.stop)
        summary = profiling.summarize(raw)
        raw.with_name(f"{key}-{name}-summary.txt").write_text(summary + "\n")


def revision() -> str | None:
    """The commit whose server code is measured, ``-dirty`` when ws_server/ or the bench
    model had uncommitted changes; None outside a git checkout."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=HERE.parent, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", "ws_server", "bench/models")
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")


def _interrupted(signum: int, frame: Any) -> None:
    """SIGTERM ends a run as Ctrl-C does: the servers it started are stopped on the way
    out (they run in sessions of their own, so nothing else would stop them)."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupted)
    procs.pin(procs.CLIENT_CPU)
    # Both ends hold one descriptor per session; servers inherit this limit.
    limit = procs.raise_open_files(args.sessions + 1024)
    if "capacity" in args.modes and limit < args.sessions + 256:
        print(
            f"RLIMIT_NOFILE allows {limit} open files, too few for --sessions "
            f"{args.sessions}: lower it or raise the hard limit (ulimit -Hn)",
            file=sys.stderr,
        )
        return 2
    code_revision = revision()  # before the servers start: the code they run
    scratch = Path(tempfile.mkdtemp(prefix="aa-bench-"))
    entries: list[Entry] = []
    if set(args.modes) & set(SERVER_MODES):  # else only modes with servers of their own
        prepare(scratch)
        entries = [Entry(s) for s in lineup(scratch, args.before) if s.key in args.servers]
    extra: dict[str, Any] = {}
    try:
        if entries:
            print(f"starting {len(entries)} servers", file=sys.stderr, flush=True)
        start_all(entries, scratch)
        extra = uvloop.run(measure_all(entries, args, scratch))
    finally:
        for entry in entries:
            for server in (entry.peer, entry.server, entry.redis, entry.ray):  # Redis, Ray last
                if server is not None:
                    server.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    servers = {entry.spec.key: entry.result for entry in entries}
    settings = {
        k: getattr(args, k)
        for k in (
            *("connections", "chunks", "size", "duration", "warmup", "rounds", "crowd"),
            *("sessions", "concurrency", "resume_samples", "detached_sessions"),
            *("replay_buffer_bytes", "flood", "before"),
            *("sse_turns", "sse_chunks", "sse_connections"),
        )
    }
    payload: dict[str, Any] = {
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "revision": code_revision,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "load_average_at_end": os.getloadavg(),
        },
        "settings": settings,
        "reference": REFERENCE,
        "servers": servers,
    }
    payload.update(extra)  # "sse", "cluster": those run
    placement = report.ray_compare(payload)
    if placement:
        payload["ray_placement"] = placement
    payload["targets"] = report.targets(payload)
    sections = (
        report.table(payload),
        report.comparisons(payload),
        report.workers(payload),
        report.ray(payload),
        report.sse(payload),
        report.cluster(payload),
    )
    print("\n\n".join(section for section in sections if section))
    print()
    print(report.targets_text(payload["targets"]))
    report.write_json(args.json, payload)
    print(f"\nraw figures: {args.json}")
    if servers:  # the chart shows the per-server modes only
        report.chart(args.chart, payload)
        print(f"chart: {args.chart}")
    if args.profile is not None:
        print(f"profiles: {args.profile}/*-summary.txt")
    failed = any("error" in s for s in servers.values())
    return 1 if failed or "failed" in payload.get("sse", {}) else 0


if __name__ == "__main__":
    sys.exit(main())
