"""Prometheus metrics (``GET /metrics``), named ``anything_agent_*`` as design.md fixes.

Each server process keeps its own; with ``serve --workers N`` a scrape reaches one of them,
and ``anything_agent_process_info`` says which (its ``pid`` and ``worker`` labels). The hot
path stays cheap: a turn counts its chunks and bytes locally and records them once, at
its end.
"""

from __future__ import annotations

import math
import os
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from typing import Final

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

LATENCY_BUCKETS: Final = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
DURATION_BUCKETS: Final = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
BUILD_BUCKETS: Final = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

PROCESS_INFO = Gauge(
    "anything_agent_process_info",
    "The server process this scrape reached (1): its pid and, under --workers, its index",
    ["pid", "worker"],
)
CONNECTIONS = Gauge("anything_agent_connections", "Open WebSocket connections")
SESSIONS = Gauge("anything_agent_sessions", "Open chat sessions", ["model"])
ERRORS = Counter("anything_agent_errors", "Error frames sent", ["code"])
SESSIONS_DETACHED = Gauge(
    "anything_agent_sessions_detached", "Sessions waiting for their client to resume"
)
RESUMES = Counter("anything_agent_resumes", "Resume attempts, by outcome", ["outcome"])
REPLAYED_FRAMES = Counter("anything_agent_replayed_frames", "Frames replayed to resumed clients")
STORE_UP = Gauge(
    "anything_agent_store_up",
    "1 while the session store takes writes (always, in memory; Redis reachable, with it)",
)
REPLAY_BUFFER_BYTES = Gauge(
    "anything_agent_replay_buffer_bytes", "Bytes held in sessions' replay buffers"
)
HANDSHAKE_REFUSALS = Counter(
    "anything_agent_handshake_refusals", "WebSocket handshakes refused", ["status"]
)
QUEUE_WAIT = Histogram(
    "anything_agent_queue_wait_seconds",
    "How long turns waited for a slot (concurrency.max_turns) before running",
    ["model"],
    buckets=DURATION_BUCKETS,
)
WORKER_RESTARTS = Counter(
    "anything_agent_worker_restarts", "Isolated workers restarted after a crash", ["model"]
)
RELOADS = Counter("anything_agent_reloads", "Model directory reloads done")
ENV_BUILDS = Histogram(
    "anything_agent_env_build_seconds",
    "Isolated models' virtualenv builds",
    ["outcome"],
    buckets=BUILD_BUCKETS,
)


class Buckets:
    """A histogram's counts, kept as plain numbers: ``counts[i]`` is how many values fell
    at or below ``bounds[i]`` and above the bound before (the last: above them all)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, float]]:
        """Prometheus' buckets: (``le``, values at or below it), ``+Inf`` last."""
        found: list[tuple[str, float]] = []
        total = 0
        for bound, count in zip((*self.bounds, math.inf), self.counts, strict=True):
            total += count
            found.append((floatToGoString(bound), total))  # type: ignore[no-untyped-call]
        return found


class ModelMetrics:
    """One model's turn figures through one api (``ws``: the chat endpoint; ``openai``:
    POST /v1/chat/completions). Added up once per turn as plain numbers, without the
    client library's locks (the event loop's thread is the only one that writes them: a
    lock and a label lookup per figure were a tenth of a short turn's time), and read by
    ``_TurnFigures`` when scraped."""

    __slots__ = ("api", "chunk_bytes", "chunks", "first_chunk", "model", "turn_duration", "turns")

    def __init__(self, model: str, api: str) -> None:
        self.model = model
        self.api = api
        self.turns: dict[str, int] = {}  # by done reason
        self.chunks = 0
        self.chunk_bytes = 0
        self.first_chunk = Buckets(LATENCY_BUCKETS)
        self.turn_duration = Buckets(DURATION_BUCKETS)

    def turn_ended(
        self, reason: str, chunks: int, sent: int, first_chunk: float | None, duration: float
    ) -> None:
        turns = self.turns
        turns[reason] = turns.get(reason, 0) + 1
        self.turn_duration.observe(duration)
        self.chunks += chunks
        self.chunk_bytes += sent
        if first_chunk is not None:
            self.first_chunk.observe(first_chunk)


_models: dict[tuple[str, str], ModelMetrics] = {}


def for_model(model: str, api: str = "ws") -> ModelMetrics:
    """The turn figures of ``model`` through ``api`` (made once per pair)."""
    found = _models.get((model, api))
    if found is None:
        found = _models[model, api] = ModelMetrics(model, api)
    return found


MODEL_API: Final = ["model", "api"]


class _TurnFigures:
    """``anything_agent_turns_total``, ``_chunks_total``, ``_chunk_bytes_total``,
    ``_first_chunk_seconds`` and ``_turn_seconds``, from every ``ModelMetrics``."""

    def collect(self) -> Iterator[Metric]:
        turns = CounterMetricFamily(
            "anything_agent_turns", "Turns ended", labels=["model", "reason", "api"]
        )
        chunks = CounterMetricFamily("anything_agent_chunks", "Chunks sent", labels=MODEL_API)
        chunk_bytes = CounterMetricFamily(
            "anything_agent_chunk_bytes",
            "Size of the chunks sent (bytes as written)",
            labels=MODEL_API,
        )
        first_chunk = HistogramMetricFamily(
            "anything_agent_first_chunk_seconds",
            "From a turn's start to its first chunk being written",
            labels=MODEL_API,
        )
        duration = HistogramMetricFamily(
            "anything_agent_turn_seconds", "Turn duration", labels=MODEL_API
        )
        for found in list(_models.values()):
            labels = [found.model, found.api]
            for reason, count in list(found.turns.items()):
                turns.add_metric([found.model, reason, found.api], count)
            chunks.add_metric(labels, found.chunks)
            chunk_bytes.add_metric(labels, found.chunk_bytes)
            for family, buckets in (
                (first_chunk, found.first_chunk),
                (duration, found.turn_duration),
            ):
                family.add_metric(labels, buckets.cumulative(), buckets.sum)
        yield from (turns, chunks, chunk_bytes, first_chunk, duration)


REGISTRY.register(_TurnFigures())


TurnCounts = Callable[[], Iterable[tuple[str, int, int]]]  # model, running, queued


class _TurnsNow:
    """``anything_agent_running_turns`` and ``anything_agent_queued_turns`` per model, read
    from the registry when scraped (nothing to update per turn)."""

    def __init__(self) -> None:
        self.source: TurnCounts = lambda: ()

    def collect(self) -> Iterator[Metric]:
        running = GaugeMetricFamily(
            "anything_agent_running_turns", "Turns running now, per model", labels=["model"]
        )
        queued = GaugeMetricFamily(
            "anything_agent_queued_turns",
            "Turns waiting for a slot (concurrency.max_turns), per model",
            labels=["model"],
        )
        for model, busy, waiting in self.source():
            running.add_metric([model], busy)
            queued.add_metric([model], waiting)
        yield running
        yield queued


_TURNS_NOW = _TurnsNow()
REGISTRY.register(_TURNS_NOW)


def count_turns(source: TurnCounts) -> None:
    """Where the running and queued turns per model are read from (the server's registry)."""
    _TURNS_NOW.source = source


def mark_process(worker: int | None = None) -> None:
    """Label this process's metrics (called once at start-up)."""
    PROCESS_INFO.labels(pid=str(os.getpid()), worker="" if worker is None else str(worker)).set(1)


def exposition() -> tuple[bytes, str]:
    """The current metrics in Prometheus' text format, and its content type."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
