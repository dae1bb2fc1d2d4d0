"""Prometheus metrics (``GET /metrics``), named ``anything_agent_*`` as design.md fixes.

Each server process keeps its own; with ``serve --workers N`` a scrape reaches one of them,
and ``anything_agent_process_info`` says which (its ``pid`` and ``worker`` labels). The hot
path stays cheap: a turn counts its chunks and bytes locally and records them once, at
its end.
"""

from __future__ import annotations

import os
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
from prometheus_client.core import GaugeMetricFamily, Metric

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
# Turns by the surface they came through: api="ws" (the chat endpoint) or "openai"
# (POST /v1/chat/completions).
TURNS = Counter("anything_agent_turns", "Turns ended", ["model", "reason", "api"])
CHUNKS = Counter("anything_agent_chunks", "Chunks sent", ["model", "api"])
CHUNK_BYTES = Counter(
    "anything_agent_chunk_bytes", "Size of the chunks sent (bytes as written)", ["model", "api"]
)
FIRST_CHUNK = Histogram(
    "anything_agent_first_chunk_seconds",
    "From a turn's start to its first chunk being written",
    ["model", "api"],
    buckets=LATENCY_BUCKETS,
)
TURN_DURATION = Histogram(
    "anything_agent_turn_seconds", "Turn duration", ["model", "api"], buckets=DURATION_BUCKETS
)
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


class ModelMetrics:
    """One model's labelled series, looked up once (a label lookup per turn showed up in
    profiles of short turns)."""

    def __init__(self, model: str, api: str) -> None:
        self.model = model
        self.api = api
        self.chunks = CHUNKS.labels(model=model, api=api)
        self.chunk_bytes = CHUNK_BYTES.labels(model=model, api=api)
        self.first_chunk = FIRST_CHUNK.labels(model=model, api=api)
        self.turn_duration = TURN_DURATION.labels(model=model, api=api)
        self._turns: dict[str, Counter] = {}

    def turn_ended(
        self, reason: str, chunks: int, sent: int, first_chunk: float | None, duration: float
    ) -> None:
        turns = self._turns.get(reason)
        if turns is None:
            turns = self._turns[reason] = TURNS.labels(
                model=self.model, reason=reason, api=self.api
            )
        turns.inc()
        self.turn_duration.observe(duration)
        if chunks:
            self.chunks.inc(chunks)
            self.chunk_bytes.inc(sent)
        if first_chunk is not None:
            self.first_chunk.observe(first_chunk)


_models: dict[tuple[str, str], ModelMetrics] = {}


def for_model(model: str, api: str = "ws") -> ModelMetrics:
    """The labelled series of ``model``'s turns through ``api`` (made once per pair)."""
    found = _models.get((model, api))
    if found is None:
        found = _models[model, api] = ModelMetrics(model, api)
    return found


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
