"""Chunk throughput and first-chunk latency, every figure a ratio to bare websockets
measured in the same run.

    .venv/bin/python bench/run.py [--connections 8] [--chunks 2000] [--size 16]

Servers, each a subprocess pinned to CPU 1 (the client to CPU 0) where there are 2 cores:
bare websockets + uvloop (our stack's ceiling), AnythingAgent with the bench model shared,
the same model isolated (a worker in its own virtualenv), and the seed's
spawn-a-process-per-request approach.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import uvloop
from websockets.asyncio.client import connect

HERE = Path(__file__).resolve().parent
LISTENING = re.compile(r"listening on ws://[\d.]+:(\d+)")


def start(command: list[str]) -> tuple[subprocess.Popen[str], int]:
    """Start a server and return it with its port, once it listens."""
    process = subprocess.Popen(
        command,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        preexec_fn=lambda: _pin(1),
    )
    assert process.stderr is not None
    for line in process.stderr:
        match = LISTENING.search(line)
        if match:
            # Keep draining the log so a full pipe never stalls the server.
            threading.Thread(target=process.stderr.read, daemon=True).start()
            return process, int(match.group(1))
    raise RuntimeError(f"{command} did not start")


def _pin(cpu: int) -> None:
    if hasattr(os, "sched_setaffinity") and os.cpu_count() and os.cpu_count() > 1:  # type: ignore[operator]
        os.sched_setaffinity(0, {cpu})


def message(chunks: int, size: int) -> str:
    """A protocol v1 message frame whose content asks the bench model for N chunks of S."""
    content = json.dumps({"chunks": chunks, "size": size})
    return json.dumps({"type": "message", "content": content})


async def throughput(url: str, connections: int, chunks: int, size: int, turns: int) -> float:
    request = message(chunks, size)

    async def one() -> int:
        received = 0
        async with connect(url, max_queue=None) as ws:
            await ws.recv()
            for _ in range(turns):
                await ws.send(request)
                while True:
                    frame = await ws.recv()
                    if frame.startswith('{"type":"done"'):
                        break
                    received += 1
        return received

    started = time.perf_counter()
    total = sum(await asyncio.gather(*(one() for _ in range(connections))))
    return total / (time.perf_counter() - started)


async def first_chunk(url: str, samples: int) -> list[float]:
    request = message(1, 16)
    latencies = []
    async with connect(url) as ws:
        await ws.recv()
        for _ in range(samples):
            started = time.perf_counter()
            await ws.send(request)
            await ws.recv()
            latencies.append((time.perf_counter() - started) * 1e6)
            await ws.recv()  # done
    return latencies


async def measure(url: str, args: argparse.Namespace, spawn: bool = False) -> dict[str, float]:
    await throughput(url, 2, 200, args.size, 1)  # warm up
    if spawn:  # a process per turn: keep it short, it is slow
        rate = await throughput(url, 2, args.chunks, args.size, 2)
        latencies = sorted(await first_chunk(url, 20))
    else:
        rate = await throughput(url, args.connections, args.chunks, args.size, args.turns)
        latencies = sorted(await first_chunk(url, args.samples))
    return {
        "chunks_per_s": rate,
        "first_chunk_p50_us": statistics.median(latencies),
        "first_chunk_p99_us": latencies[max(0, int(len(latencies) * 0.99) - 1)],
    }


def wait_ready(port: int, model: str, timeout: float = 300) -> None:
    """Isolated models build in the background: wait until the model is ready."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models/{model}") as answer:
            if json.load(answer)["status"] == "ready":
                return
        time.sleep(0.2)
    raise RuntimeError(f"{model} not ready after {timeout}s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--chunks", type=int, default=2000)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    args = parser.parse_args()
    _pin(0)
    scratch = Path(tempfile.mkdtemp(prefix="aa-bench-"))
    isolated = scratch / "models"
    shutil.copytree(HERE / "models" / "bench", isolated / "bench")
    (isolated / "bench" / "config.yaml").write_text("isolation: true\n")
    serve = [sys.executable, "-m", "ws_server", "serve", "--port", "0", "--log-level", "info"]
    servers = {
        "bare websockets": [sys.executable, str(HERE / "reference_server.py")],
        "anything-agent shared": [*serve, "--models-dir", str(HERE / "models")],
        "anything-agent isolated": [
            *serve,
            "--models-dir",
            str(isolated),
            "--env-cache-dir",
            str(scratch / "envs"),
        ],
        "spawn per request (seed)": [sys.executable, str(HERE / "spawn_per_request_server.py")],
    }
    results = {}
    try:
        for name, command in servers.items():
            process, port = start(command)
            try:
                if "isolated" in name:
                    wait_ready(port, "bench")
                url = f"ws://127.0.0.1:{port}/v1/chat/bench"
                print(f"measuring {name}...", file=sys.stderr, flush=True)
                results[name] = uvloop.run(measure(url, args, spawn="spawn" in name))
            finally:
                process.terminate()
                process.wait(30)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    reference = results["bare websockets"]
    print(
        f"{args.connections} connections, turns of {args.chunks} chunks of {args.size} B; "
        f"first chunk over {args.samples} turns on 1 connection"
    )
    print(
        f"{'server':<27}{'chunks/s':>11}{'ratio':>7}{'p50 µs':>10}{'p99 µs':>10}{'p50 vs ref':>12}"
    )
    for name, figures in results.items():
        print(
            f"{name:<27}{figures['chunks_per_s']:>11,.0f}"
            f"{figures['chunks_per_s'] / reference['chunks_per_s']:>7.2f}"
            f"{figures['first_chunk_p50_us']:>10.0f}{figures['first_chunk_p99_us']:>10.0f}"
            f"{figures['first_chunk_p50_us'] / reference['first_chunk_p50_us']:>11.1f}x"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
