"""What a bench run reports: tables of every figure with its ratio to a reference measured
in the same run (bare websockets; for a resume, the same server's new connection, or the
same node's; for a detached session, the replay buffer's bound), the resumable server
against the one before resumable sessions, the server with ``--workers 2`` against one
process, the isolated model placed on Ray against the same model in a local worker, 3 nodes
behind nginx against 1, the targets met or missed, the raw JSON, a PNG chart.

Input is the run's JSON payload (see ``bench/run.py``): ``servers`` maps a server's key to
its ``label`` and one dict of figures per mode (``throughput``, ``latency_1``,
``latency_crowd``, ``capacity``, ``resume``, ``detached``), or an ``error`` when it could
not be measured; ``cluster``, when measured, holds the throughput figures of each cluster
(``nodes_1``, ``nodes_3``) or why it failed; ``sse``, when measured, the figures of each
path (``ws``, ``sse``: AnythingAgent's WebSocket chat and its OpenAI-compatible SSE;
``starlette_sse``) under ``latency`` (first chunk, one connection), ``throughput_1`` and
``throughput_n`` (streamed turns on 1 and on ``sse_connections`` connections), with the
comparisons between them under ``compare``, or why it failed; ``ray_placement``, when both
the "isolated" and the "ray" rows were measured, the Ray row's figures over the local
isolated row's (``ray_compare``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

REFERENCE: Final = "websockets"
BEFORE: Final = "before"  # the server before resumable sessions (bench/lineup.py)
MEMORY: Final = "resumable"  # resumable sessions in process memory: the Redis row's reference
REDIS: Final = "redis"  # the same with its sessions in Redis
SHARED: Final = "shared"  # the bench model in the server process, one process
WORKERS: Final = "workers2"  # the same server with --workers 2 (a supervisor, two processes)
ISOLATED: Final = "isolated"  # the bench model isolated in a local worker process
RAY: Final = "ray"  # the same model isolated as an actor on a Ray cluster
MISSING: Final = "-"


@dataclass(frozen=True)
class Column:
    """One figure of the table: where it lives in the payload and how to show it."""

    mode: str
    field: str
    header: str
    lower_is_better: bool = False
    base: tuple[str, str] | None = None  # (mode, field) of the same server: the ratio's base


COLUMNS: Final = (
    Column("throughput", "chunks_per_s", "chunks/s"),
    Column("throughput", "mb_per_s", "MB/s"),
    Column("throughput", "writes_per_chunk", "writes/chunk", lower_is_better=True),
    Column("latency_1", "p50_us", "p50 µs", lower_is_better=True),
    Column("latency_1", "p99_us", "p99 µs", lower_is_better=True),
    Column("latency_1", "max_us", "max µs", lower_is_better=True),
    Column("latency_crowd", "p50_us", "p50 µs", lower_is_better=True),
    Column("latency_crowd", "p99_us", "p99 µs", lower_is_better=True),
    Column("latency_crowd", "max_us", "max µs", lower_is_better=True),
    Column("latency_crowd", "cpu_us_per_turn", "CPU µs/turn", lower_is_better=True),
    Column("capacity", "handshakes_per_s", "opens/s"),
    Column("capacity", "rss_per_session_kib", "KiB/sess", lower_is_better=True),
)
RESUME_COLUMNS: Final = (
    Column("resume", "ready_p50_us", "ready p50", lower_is_better=True),
    Column("resume", "ready_p99_us", "ready p99", lower_is_better=True),
    Column("resume", "resumed_p50_us", "resumed p50", True, ("resume", "ready_p50_us")),
    Column("resume", "resumed_p99_us", "resumed p99", True, ("resume", "ready_p99_us")),
    Column("resume", "resumed_max_us", "resumed max", True, ("resume", "ready_max_us")),
    Column("detached", "rss_per_session_kib", "KiB/sess", True, ("detached", "buffer_kib")),
    Column(
        "detached", "buffered_per_session_kib", "buffered KiB", True, ("detached", "buffer_kib")
    ),
)
# The Redis row: what an idle session holds in Redis, and one session resumed again and
# again on the node holding it (same), through another node (across: relayed) and back.
NODES_COLUMNS: Final = (
    Column("capacity", "store_per_session_kib", "KiB/sess", lower_is_better=True),
    Column("resume", "same_p50_us", "same p50", lower_is_better=True),
    Column("resume", "same_p99_us", "same p99", lower_is_better=True),
    Column("resume", "across_p50_us", "across p50", True, ("resume", "same_p50_us")),
    Column("resume", "across_p99_us", "across p99", True, ("resume", "same_p99_us")),
    Column("resume", "back_p50_us", "back p50", True, ("resume", "same_p50_us")),
    Column("resume", "back_p99_us", "back p99", True, ("resume", "same_p99_us")),
)
CELL: Final = 13
LABEL: Final = 34  # "AnythingAgent shared, --workers 2" and a space


def figure(payload: dict[str, Any], server: str, mode: str, field: str) -> float | None:
    """One number from the payload, or None when that server or mode has none."""
    value = payload["servers"].get(server, {}).get(mode, {}).get(field)
    return float(value) if isinstance(value, (int, float)) else None


def ratio(
    payload: dict[str, Any],
    server: str,
    mode: str,
    field: str,
    reference: str = REFERENCE,
    base: tuple[str, str] | None = None,
) -> float | None:
    """``server``'s figure over ``reference``'s same figure, or over its own ``base``."""
    value = figure(payload, server, mode, field)
    if base is not None:
        divisor = figure(payload, server, *base)
    else:
        divisor = figure(payload, reference, mode, field)
    if value is None or not divisor:
        return None
    return value / divisor


def _number(value: float) -> str:
    for limit, divisor, suffix in ((1e6, 1e6, "M"), (1e4, 1e3, "k")):
        if abs(value) >= limit:
            return (
                f"{value / divisor:.1f}{suffix}"
                if value < 10 * limit
                else f"{value / divisor:.0f}{suffix}"
            )
    return f"{value:.1f}" if abs(value) < 100 else f"{value:.0f}"


def _ratio(value: float) -> str:
    return f"{value:.2f}" if value < 10 else f"{value:.1f}" if value < 100 else f"{value:.0f}"


def _cell(payload: dict[str, Any], server: str, column: Column, reference: str = REFERENCE) -> str:
    value = figure(payload, server, column.mode, column.field)
    if value is None:
        return f"{MISSING:>{CELL}}"
    share = ratio(payload, server, column.mode, column.field, reference, column.base)
    text = _number(value) + (f" ×{_ratio(share)}" if share is not None else "")
    return f"{text:>{CELL}}"


def _grid(
    payload: dict[str, Any],
    columns: tuple[Column, ...],
    groups: dict[str, str],
    servers: list[str],
    reference: str = REFERENCE,
) -> list[str]:
    """The header and one row per server of ``columns``, those of a mode no server has
    left out; no lines at all when none has any."""
    present = {
        c.mode for c in columns for k in servers if figure(payload, k, c.mode, c.field) is not None
    }
    columns = tuple(c for c in columns if c.mode in present)
    if not columns:
        return []
    head1, head2 = " " * LABEL, f"{'server':<{LABEL}}"
    for mode, title in groups.items():
        width = CELL * sum(1 for c in columns if c.mode == mode)
        if width:
            head1 += f"{title:^{width}}"
    for column in columns:
        head2 += f"{column.header:>{CELL}}"
    lines = [head1.rstrip(), head2, "-" * len(head2)]
    for key in servers:
        server = payload["servers"][key]
        label = server.get("label", key)[: LABEL - 1]
        if "error" in server:
            lines.append(f"{label:<{LABEL}}failed: {server['error'].splitlines()[0][:100]}")
            continue
        cells = [_cell(payload, key, c, reference) for c in columns]
        if all(cell.strip() == MISSING for cell in cells):
            continue
        lines.append(f"{label:<{LABEL}}" + "".join(cells))
    return lines


def _groups(settings: dict[str, Any]) -> dict[str, str]:
    """The headings of the per-server tables' column groups, by mode."""
    return {
        "throughput": f"throughput ({settings['connections']} conn)",
        "latency_1": "first chunk, 1 connection",
        "latency_crowd": f"first chunk, {settings['crowd']} connections",
        "capacity": f"{settings['sessions']} idle sessions",
    }


def table(payload: dict[str, Any]) -> str:
    """The whole run as tables: each cell a figure and its ratio to bare websockets (the
    resume and detached figures: to the server's own, see ``RESUME_COLUMNS``)."""
    if not payload["servers"]:  # only modes with servers of their own were run
        return ""
    settings = payload["settings"]
    groups = _groups(settings)
    lines = [
        f"Throughput: {settings['connections']} connections, turns of {settings['chunks']} "
        f"chunks of {settings['size']} B, {settings['duration']:g} s. First chunk: one-chunk "
        f"turns back to back, {settings['duration']:g} s. Capacity: {settings['sessions']} idle "
        f"sessions, {settings['concurrency']} handshakes in flight.",
        "Each cell: the figure, then ×its ratio to bare websockets in this run "
        "(latency and KiB/session: lower is better). Client on CPU 0, servers on CPU 1 (a "
        "server's processes too; RSS and write calls are its whole process tree's).",
        f"Measured {payload.get('created', '?')} at revision {payload.get('revision') or '?'}.",
        "",
    ]
    servers = list(payload["servers"])
    lines += _grid(payload, COLUMNS, groups, servers)
    resuming = _grid(
        payload,
        RESUME_COLUMNS,
        {
            "resume": "new connection → ready / resumed (µs)",
            "detached": "detached, per session",
        },
        servers,
    )
    if resuming:
        lines += ["", *_resuming_legend(payload), "", *resuming]
    nodes = _grid(
        payload,
        NODES_COLUMNS,
        {"capacity": "in Redis", "resume": "one session resumed again and again (µs)"},
        servers,
    )
    if nodes:
        lines += ["", *_nodes_legend(payload), "", *nodes]
    errors = [
        f"  {payload['servers'][key].get('label', key)} ({mode}): {error}"
        for key, server in payload["servers"].items()
        for mode, figures in server.items()
        if isinstance(figures, dict)
        for error in figures.get("errors", [])
    ]
    if errors:
        lines += ["", "Error frames received (figures above may be off):", *errors]
    failures = [
        f"  {server.get('label', key)} ({mode}): {figures['failed']}"
        for key, server in payload["servers"].items()
        for mode, figures in server.items()
        if isinstance(figures, dict) and "failed" in figures
    ]
    if failures:
        lines += ["", "Modes that could not be measured:", *failures]
    return "\n".join(lines)


def _resuming_legend(payload: dict[str, Any]) -> list[str]:
    """What the resume and detached columns measure, for those the run has."""
    settings = payload["settings"]
    measured = {mode for server in payload["servers"].values() for mode in server}
    lines = []
    if "resume" in measured:
        lines += [
            f"Resume: {settings.get('resume_samples', '?')} new connections, one at a time, "
            "each timed from TCP connect to ready (×ratio to bare websockets); a resumable "
            "session then runs a one-chunk turn, is dropped without a close frame and resumed: "
            "timed from TCP connect to resumed (×ratio to the same server's ready)."
        ]
    if "detached" in measured:
        flood = "awaiting" if settings.get("flood", "awaits") == "awaits" else "never awaiting"
        lines += [
            f"Detached: {settings.get('detached_sessions', '?')} resumable sessions dropped at "
            f"the first chunk of an endless turn ({flood} between chunks), every model then "
            f"paused on its {settings.get('replay_buffer_bytes', 0) / 1024:g} KiB replay buffer: "
            "the server's RSS growth per session and its own count of buffered bytes per "
            "session (×ratio to the buffer's bound)."
        ]
    return lines


def _nodes_legend(payload: dict[str, Any]) -> list[str]:
    """What the Redis row's own columns measure, for those the run has."""
    settings = payload["settings"]
    measured = set(payload["servers"].get(REDIS, {}))
    lines = []
    if "capacity" in measured:
        lines += [
            f"In Redis: Redis' used_memory growth (its clients' buffers left out) per idle "
            f"session ({settings['sessions']} sessions open)."
        ]
    if "resume" in measured:
        lines += [
            "A resumable session opened on node A (one a round) runs a one-chunk turn, then is "
            "dropped without a close frame and resumed, "
            f"{settings.get('resume_samples', '?')} times in all, in turn on A (same), on "
            "node B sharing its Redis (across: relayed to A) and on A again (back), each timed "
            "from TCP connect to resumed (×ratio to same)."
        ]
    return lines


def comparisons(payload: dict[str, Any]) -> str:
    """The server before resumable sessions against today's, driven by clients that offer
    ``resumable`` and by clients that don't: each cell ×its ratio to the before server."""
    servers = [k for k in (BEFORE, SHARED, MEMORY, REDIS) if k in payload["servers"]]
    if BEFORE not in servers or len(servers) < 2:
        return ""
    settings = payload["settings"]
    groups = _groups(settings)
    label = payload["servers"][BEFORE].get("label", BEFORE)
    lines = [f"Against {label}, the server before resumable sessions (×ratio to it, same run):"]
    return "\n".join([*lines, *_grid(payload, COLUMNS, groups, servers, reference=BEFORE)])


def workers(payload: dict[str, Any]) -> str:
    """The ``--workers 2`` row against the shared row, the same server in one process: each
    cell ×its ratio to the shared row's. Both run on CPU 1 alone, so this is what the second
    process costs on one core (the supervisor, the kernel spreading connections, two event
    loops taking turns), not what a second core would give."""
    servers = [k for k in (SHARED, WORKERS) if k in payload["servers"]]
    if servers != [SHARED, WORKERS] or any("error" in payload["servers"][k] for k in servers):
        return ""
    settings = payload["settings"]
    groups = _groups(settings)
    label = payload["servers"][WORKERS].get("label", WORKERS)
    lines = [
        f"{label} against one process (×ratio to it, same run; both on CPU 1 alone: the "
        "cost of a second process on one core, not the gain of a second core; its RSS is "
        "the supervisor's and both processes'):"
    ]
    grid = _grid(payload, COLUMNS, groups, servers, reference=SHARED)
    return "\n".join([*lines, *grid]) if grid else ""


# The Ray row against the local isolated row: (name in ray_compare, mode, field).
RAY_FIGURES: Final = (
    ("latency_1_p50", "latency_1", "p50_us"),
    ("latency_1_p99", "latency_1", "p99_us"),
    ("latency_crowd_p50", "latency_crowd", "p50_us"),
    ("latency_crowd_p99", "latency_crowd", "p99_us"),
    ("chunks_per_s", "throughput", "chunks_per_s"),
)


def ray_compare(payload: dict[str, Any]) -> dict[str, Any]:
    """The isolated model on Ray against the same model in a local worker, same run: each
    of ``RAY_FIGURES`` as ``<name>_ray``, ``<name>_local`` and ``<name>_ratio`` (Ray over
    local: above 1 is slower for latency, faster for chunks/s); empty unless both rows
    were measured."""
    servers = payload["servers"]
    if any(key not in servers or "error" in servers[key] for key in (ISOLATED, RAY)):
        return {}
    compare: dict[str, Any] = {"reference": ISOLATED, "placed": RAY}
    for name, mode, field in RAY_FIGURES:
        placed, local = figure(payload, RAY, mode, field), figure(payload, ISOLATED, mode, field)
        compare[f"{name}_ray"] = placed
        compare[f"{name}_local"] = local
        compare[f"{name}_ratio"] = placed / local if placed is not None and local else None
    return compare


def ray(payload: dict[str, Any]) -> str:
    """The Ray placement against the local isolated worker (``ray_compare``): the ratios
    of first-chunk latency and chunks/s, with the figures they come from."""
    compare = payload.get("ray_placement") or ray_compare(payload)
    if not compare:
        return ""

    def times(name: str) -> str:
        value = compare.get(f"{name}_ratio")
        return MISSING if value is None else f"×{_ratio(value)}"

    def both(name: str, unit: str) -> str:
        placed, local = compare.get(f"{name}_ray"), compare.get(f"{name}_local")
        if placed is None or local is None:
            return ""
        return f" ({_number(placed)}{unit} vs {_number(local)}{unit})"

    settings = payload["settings"]

    def latency(mode: str) -> str:
        return (
            f"first chunk p50 {times(f'{mode}_p50')}{both(f'{mode}_p50', ' µs')}, "
            f"p99 {times(f'{mode}_p99')}{both(f'{mode}_p99', ' µs')}"
        )

    figures = []
    if compare.get("latency_1_p50_ratio") is not None:
        figures.append(latency("latency_1"))
    if compare.get("chunks_per_s_ratio") is not None:
        figures.append(f"chunks/s {times('chunks_per_s')}{both('chunks_per_s', '')}")
    lines = []
    if figures:
        lines.append("Ray placement vs local isolated: " + ", ".join(figures))
    if compare.get("latency_crowd_p50_ratio") is not None:
        lines.append(f"  with {settings['crowd']} connections: {latency('latency_crowd')}")
    if not lines:
        return ""
    lines.append(
        "  (×Ray / local: the same isolated bench model as an actor on a single-node Ray "
        "cluster on CPU 1 and in a local worker process, same run; first chunk: one-chunk "
        f"turns back to back on 1 connection; chunks/s: {settings['connections']} "
        "connections.)"
    )
    return "\n".join(lines)


def cluster(payload: dict[str, Any]) -> str:
    """Each cluster's throughput (×ratio to the smallest's, 1 node), with each process's
    share of a core over the window: what is left of the machine's cores says what bounds
    the figure."""
    found = payload.get("cluster")
    if not found:
        return ""
    if "failed" in found:
        return f"Cluster: could not be measured: {found['failed']}"
    settings = payload["settings"]
    lines = [
        f"Cluster: {settings['connections']} resumable connections through nginx (1 worker, "
        f"round robin) to nodes sharing a Redis, turns of {settings['chunks']} chunks of "
        f"{settings['size']} B, {settings['duration']:g} s; nginx, Redis and the nodes on any "
        f"of the {found.get('cpus', '?')} CPUs, the client on CPU 0. chunks/s ×ratio to 1 "
        "node; CPU: % of one core over the window (all: these together; machine: every "
        "process on it, these or others).",
        "",
    ]
    parts = ("nginx", "redis", "nodes", "client")
    head = f"{'cluster':<{LABEL}}{'chunks/s':>{CELL}}{'turns/s':>{CELL}}"
    head += "".join(f"{part + ' %':>{CELL}}" for part in (*parts, "all", "machine"))
    lines += [head, "-" * len(head)]
    sizes = sorted(int(key.removeprefix("nodes_")) for key in found if key.startswith("nodes_"))
    base = found[f"nodes_{sizes[0]}"].get("chunks_per_s")
    for size in sizes:
        figures = found[f"nodes_{size}"]
        rate = figures.get("chunks_per_s", 0.0)
        cells = _number(rate) + (f" ×{_ratio(rate / base)}" if base else "")
        cells = f"{cells:>{CELL}}{_number(figures.get('turns_per_s', 0.0)):>{CELL}}"
        cpu = [figures.get(f"cpu_{part}_pct", 0.0) for part in parts]
        machine = figures.get("cpu_machine_pct", 0.0)
        cells += "".join(f"{used:>{CELL}.0f}" for used in (*cpu, sum(cpu), machine))
        lines.append(f"{f'{size} node' + 's' * (size > 1):<{LABEL}}{cells}")
    return "\n".join(lines)


SSE_LABELS: Final = {
    "ws": "AnythingAgent WebSocket",
    "sse": "AnythingAgent SSE",
    "starlette_sse": "Starlette+uvicorn SSE",
}
SSE_LOADS: Final = ("throughput_1", "throughput_n")


def _path_figure(found: dict[str, Any], load: str, path: str, field: str) -> float | None:
    value = found.get(load, {}).get(path, {}).get(field)
    return float(value) if isinstance(value, (int, float)) else None


def sse_compare(found: dict[str, Any]) -> dict[str, float | None]:
    """The sse mode's comparisons: AnythingAgent's SSE first chunk minus its WebSocket one
    (µs), over Starlette's; its SSE chunks/s over its WebSocket's and over Starlette's."""

    def get(load: str, path: str, field: str) -> float | None:
        return _path_figure(found, load, path, field)

    compare: dict[str, float | None] = {}
    for field in ("p50_us", "p99_us"):
        sse, ws = get("latency", "sse", field), get("latency", "ws", field)
        theirs = get("latency", "starlette_sse", field)
        at = field.removesuffix("_us")
        compare[f"sse_minus_ws_{at}_us"] = sse - ws if sse is not None and ws is not None else None
        compare[f"sse_over_starlette_{at}"] = sse / theirs if sse is not None and theirs else None
    for load in SSE_LOADS:
        sse, ws = get(load, "sse", "chunks_per_s"), get(load, "ws", "chunks_per_s")
        theirs = get(load, "starlette_sse", "chunks_per_s")
        compare[f"{load}_sse_over_ws"] = sse / ws if sse is not None and ws else None
        compare[f"{load}_sse_over_starlette"] = sse / theirs if sse is not None and theirs else None
    return compare


def sse(payload: dict[str, Any]) -> str:
    """The sse mode: first chunk and chunks/s through each path, each cell ×its ratio to
    AnythingAgent's WebSocket path, and the comparisons asked for."""
    found = payload.get("sse")
    if not found:
        return ""
    if "failed" in found:
        return f"SSE: could not be measured: {found['failed']}"
    settings = payload["settings"]
    connections = settings.get("sse_connections", "?")
    lines = [
        "SSE: AnythingAgent (--no-limits, the bench model) through its WebSocket chat (an open "
        "session, message → first chunk frame) and through POST /v1/chat/completions with "
        '"stream": true (a kept-alive HTTP/1.1 connection, request → first data: event), '
        "and a minimal Starlette+uvicorn SSE server (StreamingResponse, httptools, uvloop). "
        f"First chunk: one connection, one-chunk turns of {settings['size']} B back to back, "
        f"{settings.get('sse_turns', '?')} timed per path after {settings['warmup']:g} s of "
        f"warm-up a round. Streaming: turns of {settings.get('sse_chunks', '?')} chunks of "
        f"{settings['size']} B back to back, {settings['duration']:g} s, on 1 and on "
        f"{connections} connections. ×ratio to AnythingAgent WebSocket; CPU: % of a core "
        "over the 1-connection window. Client on CPU 0, servers on CPU 1.",
        "",
    ]
    columns = [
        ("latency", "p50_us", "p50 µs"),
        ("latency", "p99_us", "p99 µs"),
        ("latency", "max_us", "max µs"),
        ("throughput_1", "chunks_per_s", "1 conn ch/s"),
        ("throughput_n", "chunks_per_s", f"{connections} conn ch/s"),
        ("throughput_1", "writes_per_chunk", "writes/chunk"),
        ("throughput_1", "cpu_server_pct", "server %"),
        ("throughput_1", "cpu_client_pct", "client %"),
    ]
    head = f"{'path':<{LABEL}}" + "".join(f"{title:>{CELL}}" for _, _, title in columns)
    lines += [head, "-" * len(head)]
    for path, label in SSE_LABELS.items():
        cells = ""
        for load, field, _ in columns:
            value = _path_figure(found, load, path, field)
            if value is None:
                cells += f"{MISSING:>{CELL}}"
                continue
            base = _path_figure(found, load, "ws", field)
            if field.startswith("cpu_"):
                text = f"{value:.0f}"
            elif field.startswith("writes_"):
                text = f"{value:.3f}"
            else:
                text = _number(value)
            if base and not field.startswith(("cpu_", "writes_")):
                text += f" ×{_ratio(value / base)}"
            cells += f"{text:>{CELL}}"
        lines.append(f"{label:<{LABEL}}{cells}")
    compare = found.get("compare", {})

    def shown(name: str, unit: str = "×") -> str:
        value = compare.get(name)
        if value is None:
            return MISSING
        return f"{value:+.0f} µs" if unit == "µs" else f"×{_ratio(value)}"

    lines += [
        "",
        f"AnythingAgent SSE − WebSocket, first chunk: p50 {shown('sse_minus_ws_p50_us', 'µs')}, "
        f"p99 {shown('sse_minus_ws_p99_us', 'µs')}. AnythingAgent SSE / Starlette SSE, first "
        f"chunk: p50 {shown('sse_over_starlette_p50')}, p99 {shown('sse_over_starlette_p99')}.",
        f"Chunks/s, AnythingAgent SSE / its WebSocket: {shown('throughput_1_sse_over_ws')} "
        f"(1 connection), {shown('throughput_n_sse_over_ws')} ({connections}); AnythingAgent "
        f"SSE / Starlette SSE: {shown('throughput_1_sse_over_starlette')} (1), "
        f"{shown('throughput_n_sse_over_starlette')} ({connections}).",
    ]
    errors = [
        f"  {SSE_LABELS.get(path, path)} ({load}): {error}"
        for load in ("latency", *SSE_LOADS)
        for path, figures in found.get(load, {}).items()
        for error in figures.get("errors", [])
    ]
    if errors:
        lines += ["", "SSE errors (figures above may be off):", *errors]
    return "\n".join(lines)


def targets(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets (issue 7's, and resuming's), each with the measured value and whether it
    is met (None: not measured in this run)."""

    def get(server: str, mode: str, field: str) -> float | None:
        return figure(payload, server, mode, field)

    found: list[dict[str, Any]] = []

    def check(text: str, value: float | None, limit: float, at_least: bool, unit: str) -> None:
        met = None if value is None else (value >= limit if at_least else value <= limit)
        shown = MISSING if value is None else f"{value:.2f}{unit}"
        found.append({"target": text, "value": value, "shown": shown, "met": met})

    def over(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    def minus(a: float | None, b: float | None) -> float | None:
        return a - b if a is not None and b is not None else None

    tp = "throughput", "chunks_per_s"
    check(
        "shared chunks/s ≥ 0.9× bare websockets",
        over(get("shared", *tp), get(REFERENCE, *tp)),
        0.9,
        True,
        "×",
    )
    for peer in ("aiohttp", "starlette"):
        check(
            f"shared chunks/s ahead of {peer} (> 1×)",
            over(get("shared", *tp), get(peer, *tp)),
            1.0,
            True,
            "×",
        )
    for mode, where in (
        ("latency_1", "1 connection"),
        ("latency_crowd", f"{payload['settings']['crowd']} connections"),
    ):
        p50 = mode, "p50_us"
        p99 = mode, "p99_us"
        check(
            f"shared first-chunk p50 ≤ bare + 200 µs ({where})",
            minus(get("shared", *p50), get(REFERENCE, *p50)),
            200.0,
            False,
            " µs",
        )
        check(
            f"shared first-chunk p99 ≤ 2× bare ({where})",
            over(get("shared", *p99), get(REFERENCE, *p99)),
            2.0,
            False,
            "×",
        )
    p50 = "latency_1", "p50_us"
    check(
        "isolated first-chunk p50 ≤ shared + 1 ms",
        minus(get("isolated", *p50), get("shared", *p50)),
        1000.0,
        False,
        " µs",
    )
    check(
        "isolated first-chunk p50 ≥ 50× faster than spawn",
        over(get("spawn", *p50), get("isolated", *p50)),
        50.0,
        True,
        "×",
    )
    check(
        "isolated chunks/s ≥ 0.5× shared",
        over(get("isolated", *tp), get("shared", *tp)),
        0.5,
        True,
        "×",
    )
    rss = "capacity", "rss_per_session_kib"
    check(
        f"shared RSS per idle session ≤ 1.3× bare ({payload['settings']['sessions']} sessions)",
        over(get("shared", *rss), get(REFERENCE, *rss)),
        1.3,
        False,
        "×",
    )
    # Resuming: the resumable row (clients offering `resumable`) against the server before.
    settings = payload["settings"]
    before = f"@{settings.get('before', BEFORE)}"
    for field, limit in (("resumed_p50_us", 2.0), ("resumed_p99_us", 10.0)):
        value = get("resumable", "resume", field)
        check(
            f"reconnect to resumed {field.split('_')[1]} ≤ {limit:g} ms",
            None if value is None else value / 1000,
            limit,
            False,
            " ms",
        )
    check(
        f"resumable chunks/s ≥ 0.95× {before}",
        over(get("resumable", *tp), get(BEFORE, *tp)),
        0.95,
        True,
        "×",
    )
    for mode, where in (
        ("latency_1", "1 connection"),
        ("latency_crowd", f"{settings['crowd']} connections"),
    ):
        check(
            f"resumable first-chunk p50 ≤ {before} + 20 µs ({where})",
            minus(get("resumable", mode, "p50_us"), get(BEFORE, mode, "p50_us")),
            20.0,
            False,
            " µs",
        )
    check(
        f"resumable RSS per idle session ≤ 1.3× bare ({settings['sessions']} sessions)",
        over(get("resumable", *rss), get(REFERENCE, *rss)),
        1.3,
        False,
        "×",
    )
    check(
        "Redis store's resumable chunks/s ≥ 0.7× the memory store's (same run)",
        over(get(REDIS, *tp), get(MEMORY, *tp)),
        0.7,
        True,
        "×",
    )
    for field, limit in (("across_p50_us", 5.0), ("across_p99_us", 25.0)):
        value = get(REDIS, "resume", field)
        check(
            f"resume through another node, to resumed {field.split('_')[1]} ≤ {limit:g} ms",
            None if value is None else value / 1000,
            limit,
            False,
            " ms",
        )
    found_sse = payload.get("sse") or {}
    check(
        "AnythingAgent SSE first-chunk p50 ≤ its WebSocket path's + 300 µs (1 connection)",
        found_sse.get("compare", {}).get("sse_minus_ws_p50_us"),
        300.0,
        False,
        " µs",
    )
    # Issue 17, performance second round.
    check(
        "isolated chunks/s ≥ 0.7× shared",
        over(get("isolated", *tp), get("shared", *tp)),
        0.7,
        True,
        "×",
    )
    check(
        "isolated first-chunk p50 ≤ shared + 500 µs",
        minus(get("isolated", *p50), get("shared", *p50)),
        500.0,
        False,
        " µs",
    )
    crowd = f"{settings['crowd']} connections"
    for field, limit in (("p50_us", 1.3), ("p99_us", 1.5), ("cpu_us_per_turn", 1.3)):
        what = "server CPU per turn" if field.startswith("cpu") else f"first-chunk {field[:3]}"
        check(
            f"shared {what} ≤ {limit:g}× bare ({crowd})",
            over(get("shared", "latency_crowd", field), get(REFERENCE, "latency_crowd", field)),
            limit,
            False,
            "×",
        )
    check(
        "shared chunks/s ≥ 5× bare websockets",
        over(get("shared", *tp), get(REFERENCE, *tp)),
        5.0,
        True,
        "×",
    )
    check(
        f"shared RSS per idle session ≤ 1.1× bare ({settings['sessions']} sessions)",
        over(get("shared", *rss), get(REFERENCE, *rss)),
        1.1,
        False,
        "×",
    )
    held = get("resumable", "detached", "rss_per_session_kib")
    check(
        f"detached session's RSS ≤ 1.3× --replay-buffer-bytes "
        f"({settings.get('detached_sessions')} sessions, "
        f"{settings.get('replay_buffer_bytes', 0) / 1024:g} KiB)",
        over(held, get("resumable", "detached", "buffer_kib")),
        1.3,
        False,
        "×",
    )
    return found


def targets_text(found: list[dict[str, Any]]) -> str:
    marks = {True: "met   ", False: "MISSED", None: "n/a   "}
    lines = ["Targets:"]
    lines += [f"  {marks[t['met']]}  {t['target']}: {t['shown']}" for t in found]
    return "\n".join(lines)


RESUME_BASES: Final = {(c.mode, c.field): c.base for c in RESUME_COLUMNS if c.base}


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")


def chart(path: Path, payload: dict[str, Any]) -> None:
    """One horizontal bar panel per figure, every server in each, labelled with its ratio
    to bare websockets; latency panels on a log scale (spawn-per-request is 1000× slower)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = payload["settings"]
    panels = [
        ("throughput", "chunks_per_s", f"chunks/s, {settings['connections']} connections", False),
        ("latency_1", "p50_us", "first chunk p50 µs, 1 connection", True),
        ("latency_1", "p99_us", "first chunk p99 µs, 1 connection", True),
        ("capacity", "handshakes_per_s", f"sessions opened/s ({settings['sessions']})", False),
        ("throughput", "mb_per_s", "MB/s of chunk frames", False),
        ("latency_crowd", "p50_us", f"first chunk p50 µs, {settings['crowd']} connections", True),
        ("latency_crowd", "p99_us", f"first chunk p99 µs, {settings['crowd']} connections", True),
        ("capacity", "rss_per_session_kib", "server RSS KiB per idle session", False),
        ("resume", "ready_p50_us", "new connection to ready p50 µs", True),
        ("resume", "resumed_p50_us", "reconnect to resumed p50 µs", True),
        ("resume", "resumed_p99_us", "reconnect to resumed p99 µs", True),
        ("detached", "rss_per_session_kib", "RSS KiB per detached session", False),
    ]
    keys = [k for k, s in payload["servers"].items() if "error" not in s]
    labels = [payload["servers"][k].get("label", k) for k in keys]
    colours = [
        "#444444"
        if k == REFERENCE
        else "#d95f02"
        if k in (SHARED, WORKERS, MEMORY, REDIS, ISOLATED, RAY)
        else "#e6ab02"
        if k == BEFORE
        else "#7fa7c9"
        for k in keys
    ]
    fig, axes = plt.subplots(3, 4, figsize=(22, 13), constrained_layout=True)
    for axis, (mode, field, title, log) in zip(axes.flat, panels, strict=True):
        base = RESUME_BASES.get((mode, field))
        values = [figure(payload, k, mode, field) or 0.0 for k in keys]
        positions = list(range(len(keys)))[::-1]
        axis.barh(positions, values, color=colours)
        axis.set_yticks(positions, labels if axis in axes[:, 0] else [""] * len(keys))
        axis.set_title(title, fontsize=10)
        if log and any(values):
            axis.set_xscale("log")
        for position, key, value in zip(positions, keys, values, strict=True):
            share = ratio(payload, key, mode, field, base=base)
            if value and share is not None:
                axis.text(value, position, f" ×{_ratio(share)}", va="center", fontsize=8)
        axis.margins(x=0.25)
    fig.suptitle(
        f"AnythingAgent bench, {payload['created']}: ratios to bare websockets in the same "
        f"run (turns of {settings['chunks']} chunks of {settings['size']} B; client on CPU 0, "
        "servers on CPU 1)",
        fontsize=11,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
