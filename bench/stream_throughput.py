"""Chunk throughput and first-chunk latency of AnythingAgent vs bare websockets, same run.

    .venv/bin/python bench/stream_throughput.py [--connections 8] [--chunks 2000] [--size 16]

Starts both servers as subprocesses (each pinned to CPU 1 where possible, the client to
CPU 0), runs the same turns against each, and prints figures as ratios to bare websockets.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import uvloop
from websockets.asyncio.client import connect

HERE = Path(__file__).resolve().parent
LISTENING = re.compile(r"listening on ws://[\d.]+:(\d+)")


def start(command: list[str]) -> tuple[subprocess.Popen[str], int]:
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


async def measure(url: str, args: argparse.Namespace) -> dict[str, float]:
    await throughput(url, 2, 200, args.size, 1)  # warm up
    rate = await throughput(url, args.connections, args.chunks, args.size, args.turns)
    latencies = sorted(await first_chunk(url, args.samples))
    return {
        "chunks_per_s": rate,
        "first_chunk_p50_us": statistics.median(latencies),
        "first_chunk_p99_us": latencies[int(len(latencies) * 0.99) - 1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--chunks", type=int, default=2000)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--samples", type=int, default=500)
    args = parser.parse_args()
    _pin(0)
    servers = {
        "bare websockets": [sys.executable, str(HERE / "reference_server.py")],
        "anything-agent": [
            sys.executable,
            "-m",
            "ws_server",
            "serve",
            "--port",
            "0",
            "--log-level",
            "info",
            "--models-dir",
            str(HERE / "models"),
        ],
    }
    results = {}
    for name, command in servers.items():
        process, port = start(command)
        try:
            results[name] = uvloop.run(measure(f"ws://127.0.0.1:{port}/v1/chat/bench", args))
        finally:
            process.terminate()
            process.wait(10)
    reference = results["bare websockets"]
    print(f"{'server':<18}{'chunks/s':>12}{'ratio':>8}{'p50 µs':>10}{'p99 µs':>10}")
    for name, figures in results.items():
        print(
            f"{name:<18}{figures['chunks_per_s']:>12,.0f}"
            f"{figures['chunks_per_s'] / reference['chunks_per_s']:>8.2f}"
            f"{figures['first_chunk_p50_us']:>10.0f}{figures['first_chunk_p99_us']:>10.0f}"
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
