"""Several nodes behind nginx round-robin, sharing a Redis (design.md, *Several nodes*):
a chat carries on through any node, a lost node's turn ends ``interrupted``, a drain
loses no turn, a reload reaches every node, and Redis may come and go.

Real processes only: redis-server and nginx from Debian, three ``anything-agent serve``
nodes, all on loopback, started by ``LocalCluster`` (what ``anything-agent cluster`` runs).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import RESUME_MODELS, SHIPPED_MODELS, copy_models, recv_frame
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from ws_server.deploy.local_cluster import ClusterNode, LocalCluster

pytestmark = [pytest.mark.cluster, pytest.mark.usefixtures("every_node_up")]

V1 = "anything-agent.v1"
NODE_TTL = 1.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """Three nodes over ``numbers`` and ``echo``, nginx in front, one Redis."""
    models = copy_models(tmp_path_factory.mktemp("cluster-models"), "numbers", source=RESUME_MODELS)
    copy_models(models, "echo", source=SHIPPED_MODELS)
    with LocalCluster(
        3,
        models_dir=models,
        node_ttl=NODE_TTL,
        resume_window=10,
        extra_args=["--no-limits", "--grace-period", "5"],
    ) as running:
        yield running


def cluster_log(cluster: LocalCluster | None) -> str:
    """What the nodes logged (above debug), for a failure's message."""
    if cluster is None:
        return ""
    return "\n".join(
        line for node in cluster.nodes for line in node.log_lines if " DEBUG " not in line
    )


def ws_url(target: LocalCluster | ClusterNode, model: str = "numbers") -> str:
    return f"{target.ws_url}/v1/chat/{model}"


async def open_resumable(target: LocalCluster | ClusterNode) -> ClientConnection:
    ws = await connect(ws_url(target), subprotocols=[V1, "resumable"])  # type: ignore[list-item]
    ready = await recv_frame(ws)
    assert ready["type"] == "ready" and ready.get("resume_token"), ready
    ws.token = ready["resume_token"]  # type: ignore[attr-defined]
    return ws


async def resume(
    target: LocalCluster | ClusterNode, ws: ClientConnection, cluster: LocalCluster | None = None
) -> ClientConnection:
    """Resume ``ws``'s session at ``target`` after the last frame ``ws`` processed (a
    failure shows the nodes' logs)."""
    after = getattr(ws, "last_seq", 0)
    entry = f"resume.{ws.token}.{after}"  # type: ignore[attr-defined]
    again = await connect(ws_url(target), subprotocols=[V1, entry])  # type: ignore[list-item]
    again.token = ws.token  # type: ignore[attr-defined]
    again.last_seq = after  # type: ignore[attr-defined]
    resumed = await recv_frame(again)
    cluster = cluster or (target if isinstance(target, LocalCluster) else None)
    assert resumed["type"] == "resumed", f"{resumed}\n{cluster_log(cluster)}"
    return again


async def drop(ws: ClientConnection) -> None:
    ws.transport.abort()
    await asyncio.sleep(0)


async def until_done(ws: ClientConnection, timeout: float = 15) -> list[dict[str, Any]]:
    frames = []
    while True:
        frame = await recv_frame(ws, timeout)
        frames.append(frame)
        if frame["type"] == "done":
            return frames


async def ask(ws: ClientConnection, text: str) -> list[dict[str, Any]]:
    await ws.send(json.dumps({"type": "message", "content": text}))
    return await until_done(ws)


def text_of(frames: list[dict[str, Any]]) -> str:
    return "".join(f["content"] for f in frames if f["type"] == "chunk")


def post_json(url: str) -> Any:
    request = urllib.request.Request(url, method="POST")
    with urllib.request.urlopen(request, timeout=10) as answer:
        return json.loads(answer.read())


async def written_to_redis(
    cluster: LocalCluster, ws: ClientConnection, running: int | None = None
) -> None:
    """Until the session of ``ws`` is in Redis with every frame ``ws`` got (and, with
    ``running``, with that turn started)."""
    import redis.asyncio as aioredis

    client = aioredis.Redis(unix_socket_path=str(cluster.redis_socket))
    key = f"anything-agent:session:{hashlib.sha256(ws.token.encode()).hexdigest()}"  # type: ignore[attr-defined]
    try:
        for _ in range(100):
            seq, turn, busy = await client.hmget(key, "seq", "turn", "running")
            written = int(seq or -1) >= ws.last_seq  # type: ignore[attr-defined]
            if written and (running is None or (int(turn) == running and busy == b"1")):
                return
            await asyncio.sleep(0.02)
        raise AssertionError("the session never reached Redis")
    finally:
        await client.aclose()


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as answer:
        return json.loads(answer.read())


async def test_a_reply_dropped_mid_stream_completes_exactly_once_on_another_node(
    cluster: LocalCluster,
) -> None:
    first, second = cluster.nodes[0], cluster.nodes[1]
    ws = await open_resumable(first)
    await ws.send(json.dumps({"type": "message", "content": "count 40 0.01"}))
    seen = [await recv_frame(ws) for _ in range(5)]
    await drop(ws)
    again = await resume(second, ws)
    seen += await until_done(again)
    assert text_of(seen) == "".join(f"{n} " for n in range(1, 41))
    assert seen[-1] == {"type": "done", "turn": 1, "reason": "stop"}
    # Relayed: the next turn runs on the first node's instance, with the whole history.
    assert text_of(await ask(again, "recall")) == "You said 2 things: count 40 0.01 | recall"
    await again.close()


async def test_a_chat_through_nginx_resumes_on_whichever_node_it_reaches(
    cluster: LocalCluster,
) -> None:
    ws = await open_resumable(cluster)
    await ask(ws, "hello")
    for _ in range(4):  # round-robin: each resume lands on another node
        await drop(ws)
        ws = await resume(cluster, ws)
    assert text_of(await ask(ws, "recall")) == "You said 2 things: hello | recall"
    await ws.close()


def test_chat_completions_stream_through_nginx_as_the_model_yields(cluster: LocalCluster) -> None:
    """nginx passes each SSE event on at once (``X-Accel-Buffering: no``), whichever node
    answers, and a completion leaves nothing in Redis (``test_every_key_in_redis_has_a_ttl``)."""
    body = json.dumps(
        {
            "model": "numbers",
            "stream": True,
            "messages": [{"role": "user", "content": "count 3 0.4"}],
        }
    ).encode()
    for _ in range(3):  # round-robin: each node once
        request = urllib.request.Request(f"{cluster.url}/v1/chat/completions", data=body)
        arrivals: list[tuple[float, str]] = []
        with urllib.request.urlopen(request, timeout=20) as response:
            assert response.headers["Content-Type"].startswith("text/event-stream")
            for line in response:
                if line.startswith(b"data: {"):
                    delta = json.loads(line[6:])["choices"][0]["delta"]
                    arrivals.append((time.monotonic(), delta.get("content", "")))
        assert "".join(text for _, text in arrivals) == "1 2 3 "
        assert arrivals[-1][0] - arrivals[0][0] > 0.7  # streamed, not buffered until the end


async def test_killing_the_node_streaming_a_reply_ends_it_interrupted_and_the_chat_goes_on(
    cluster: LocalCluster,
) -> None:
    node = cluster.nodes[0]
    ws = await open_resumable(node)
    await ask(ws, "before")
    await ws.send(json.dumps({"type": "message", "content": "count 1000 0.01"}))
    shown = [await recv_frame(ws) for _ in range(10)]
    node.kill()
    killed = time.monotonic()
    with pytest.raises(ConnectionClosed):
        while True:
            shown.append(await recv_frame(ws))
    again = await resume(cluster, ws)
    rest = await until_done(again, timeout=NODE_TTL + 5)
    took = time.monotonic() - killed
    error, done = rest[-2], rest[-1]
    assert error["type"] == "error" and error["code"] == "interrupted", rest[-3:]
    assert done == {"type": "done", "turn": 2, "reason": "error"}
    assert took < NODE_TTL + 1 + 0.5, f"interrupted {took:.2f} s after the kill"
    taken = 'anything_agent_resumes_total{outcome="taken_over"}'
    assert sum(metric(n, taken) for n in cluster.nodes if n.running) >= 1
    numbers = text_of(shown + rest).split()
    assert numbers == [str(n) for n in range(1, len(numbers) + 1)]  # none lost, none twice
    # The next message runs on a new instance, with the whole history, partial reply too.
    reply = text_of(await ask(again, "recall"))
    assert reply == "You said 3 things: before | count 1000 0.01 | recall"
    await again.close()


async def test_a_turn_lost_before_its_first_chunk_still_ends_interrupted(
    cluster: LocalCluster,
) -> None:
    node = cluster.nodes[0]
    ws = await open_resumable(node)
    await ask(ws, "first")
    await ws.send(json.dumps({"type": "message", "content": "wait 30"}))
    await written_to_redis(cluster, ws, running=2)  # started there, nothing streamed yet
    node.kill()
    with pytest.raises(ConnectionClosed):
        await recv_frame(ws)
    again = await resume(cluster.nodes[1], ws)
    rest = await until_done(again, timeout=NODE_TTL + 5)
    assert [f["type"] for f in rest] == ["error", "done"]
    assert rest[0]["code"] == "interrupted" and rest[0]["turn"] == 2
    assert rest[1] == {"type": "done", "turn": 2, "reason": "error"}
    await again.close()


async def test_a_drained_holder_hands_a_relayed_client_over_in_place(
    cluster: LocalCluster,
) -> None:
    holder, relaying = cluster.nodes[0], cluster.nodes[1]
    ws = await open_resumable(holder)
    await ask(ws, "hello")
    await drop(ws)
    relayed = await resume(relaying, ws, cluster)  # relayed to the holder
    await relayed.send(json.dumps({"type": "message", "content": "count 2000 0.01"}))
    shown = [await recv_frame(relayed) for _ in range(3)]
    holder.process.send_signal(15)  # its turn outlasts the grace period (5 s)
    shown += await until_done(relayed, timeout=20)
    assert shown[-2]["code"] == "interrupted" and shown[-1]["reason"] == "error"
    numbers = text_of(shown).split()
    assert numbers == [str(n) for n in range(1, len(numbers) + 1)]
    # The same connection goes on, now with the relaying node holding the session.
    reply = text_of(await ask(relayed, "recall"))
    assert reply == "You said 3 things: hello | count 2000 0.01 | recall"
    await relayed.close()
    holder.process.wait(15)


async def test_a_node_restarted_under_the_same_id_does_not_keep_its_predecessors_sessions(
    cluster: LocalCluster,
) -> None:
    node = cluster.nodes[0]
    ws = await open_resumable(node)
    await ask(ws, "kept")
    await drop(ws)
    await written_to_redis(cluster, ws)  # (a node killed sooner loses what it never wrote)
    node.kill()
    node.restart()  # the same --node-id, a new process: it never held this session
    again = await resume(cluster.nodes[1], ws, cluster)
    assert text_of(await ask(again, "recall")) == "You said 2 things: kept | recall"
    await again.close()


async def test_sigterm_drains_a_node_without_losing_the_running_turn(cluster: LocalCluster) -> None:
    node = cluster.nodes[1]
    ws = await open_resumable(node)
    await ws.send(json.dumps({"type": "message", "content": "count 30 0.03"}))
    frames = [await recv_frame(ws) for _ in range(3)]
    node.process.send_signal(15)
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            frames.append(await recv_frame(ws))
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
    assert text_of(frames) == "".join(f"{n} " for n in range(1, 31))  # within the grace
    assert frames[-1] == {"type": "done", "turn": 1, "reason": "stop"}
    node.process.wait(15)
    started = time.monotonic()
    again = await resume(cluster, ws)  # released: taken over at once, no heartbeat wait
    assert time.monotonic() - started < NODE_TTL
    assert text_of(await ask(again, "recall")) == "You said 2 things: count 30 0.03 | recall"
    await again.close()


async def test_a_reload_through_nginx_reaches_every_node_within_two_seconds(
    cluster: LocalCluster,
) -> None:
    main = cluster.models_dir / "echo" / "main.py"
    before = {n.node_id: _revision(n, "echo") for n in cluster.nodes}
    main.write_text(main.read_text() + "\n# changed\n")
    assert post_json(f"{cluster.url}/v1/models/reload")["updated"] == ["echo"]
    started = time.monotonic()
    while any(_revision(n, "echo") == before[n.node_id] for n in cluster.nodes):
        assert time.monotonic() - started < 2.0, "a node did not reload within 2 s"
        await asyncio.sleep(0.05)
    revision = _revision(cluster.nodes[0], "echo")
    deadline = time.monotonic() + 3 * NODE_TTL
    while get_json(f"{cluster.url}/v1/models/echo")["cluster"] != {revision: 3}:
        assert time.monotonic() < deadline, get_json(f"{cluster.url}/v1/models/echo")
        await asyncio.sleep(0.1)


def metric(node: ClusterNode, line_start: str) -> float:
    """A sample of ``node``'s ``/metrics`` (0 when it has none yet)."""
    with urllib.request.urlopen(f"{node.url}/metrics", timeout=5) as answer:
        for line in answer.read().decode().splitlines():
            if line.startswith(line_start + " "):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def _revision(node: ClusterNode, model: str) -> str:
    return str(get_json(f"{node.url}/v1/models/{model}")["revision"])


async def test_chats_go_on_while_redis_is_down_and_resume_comes_back(
    cluster: LocalCluster,
) -> None:
    node = cluster.nodes[2]
    earlier = await open_resumable(node)  # open before Redis goes: it must survive it
    await ask(earlier, "before")
    cluster.redis_stop()
    deadline = time.monotonic() + 5
    while get_json(f"{node.url}/healthz")["store"] != "unavailable":
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    assert metric(node, "anything_agent_store_up") == 0
    async with connect(ws_url(node), subprotocols=[V1, "resumable"]) as ws:  # type: ignore[list-item]
        ready = await recv_frame(ws)
        assert ready["type"] == "ready" and "resume_token" not in ready
        assert text_of(await ask(ws, "still here")) == "still here"
    cluster.redis_start()
    deadline = time.monotonic() + 5
    while any(get_json(f"{n.url}/healthz")["store"] != "redis" for n in cluster.nodes):
        assert time.monotonic() < deadline, [get_json(f"{n.url}/healthz") for n in cluster.nodes]
        await asyncio.sleep(0.1)
    ws = await open_resumable(node)
    await ask(ws, "back")
    await drop(ws)
    again = await resume(cluster.nodes[0], ws)
    assert text_of(await ask(again, "recall")) == "You said 2 things: back | recall"
    await again.close()
    # The session opened before the outage (Redis came back empty) chats on, and its
    # node wrote it whole again: it resumes on another node with its whole history.
    assert text_of(await ask(earlier, "after")) == "after"
    await drop(earlier)
    moved = await resume(cluster.nodes[1], earlier, cluster)
    assert text_of(await ask(moved, "recall")) == "You said 3 things: before | after | recall"
    await moved.close()


async def test_a_thousand_forced_reconnects_lose_and_repeat_nothing(
    cluster: LocalCluster,
) -> None:
    rng = random.Random(13)
    total = 4000
    ws = await open_resumable(cluster.nodes[0])
    await ws.send(json.dumps({"type": "message", "content": f"count {total}"}))
    received: list[dict[str, Any]] = []
    reconnects = 0
    while not received or received[-1]["type"] != "done":
        if reconnects < 1000 and rng.random() < 0.3:
            await drop(ws)
            ws = await resume(rng.choice(cluster.nodes), ws, cluster)
            reconnects += 1
            continue
        received.append(await recv_frame(ws))  # checks seq contiguity as it reads
    assert reconnects == 1000
    assert text_of(received).split() == [str(n) for n in range(1, total + 1)]
    await ws.close()


async def test_relays_share_one_redis_connection_however_many_come_and_go(
    cluster: LocalCluster,
) -> None:
    import redis

    client = redis.Redis(unix_socket_path=str(cluster.redis_socket))
    try:
        before = client.info("clients")["connected_clients"]
        ws = await open_resumable(cluster.nodes[0])
        await ask(ws, "hello")
        for _ in range(100):  # each resume on node 1 is relayed to node 0
            await drop(ws)
            ws = await resume(cluster.nodes[1], ws, cluster)
        assert text_of(await ask(ws, "recall")) == "You said 2 things: hello | recall"
        await ws.close()
        assert client.info("clients")["connected_clients"] <= before + 6
    finally:
        client.close()


def test_every_key_in_redis_has_a_ttl(cluster: LocalCluster) -> None:
    import redis

    client = redis.Redis(unix_socket_path=str(cluster.redis_socket))
    try:
        names = list(client.scan_iter(count=1000))
        assert names, "the cluster keeps nothing in Redis?"
        without = [name for name in names if client.pttl(name) == -1]
        assert without == []
    finally:
        client.close()
