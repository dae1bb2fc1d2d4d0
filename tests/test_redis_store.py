"""The Redis store's scripts (store/keys.py) against a real redis-server: a session's
writes are fenced by its epoch, a takeover is a compare-and-set, the frames' stream ids
are their seqs, and every key written has a TTL."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis

from ws_server.store import keys

DIGEST = "d" * 64
TTL_MS = 60_000


@pytest.fixture
def client(redis_url: str) -> Iterator[Any]:
    connection = redis.Redis.from_url(redis_url)
    connection.delete(*keys.session_keys(DIGEST))
    connection.hset(
        keys.session_key(DIGEST),
        mapping={"owner": "node-a", "epoch": "1", "seq": "0", "running": "0"},
    )
    yield connection
    connection.delete(*keys.session_keys(DIGEST))
    connection.close()


def append(client: Any, epoch: int, frames: list[tuple[int, bytes]], fields: dict[str, str]) -> Any:
    """The APPEND script as a journal calls it: a batch of frames, a message, fields."""
    last, packed = (frames[-1][0], keys.pack_frames([f for _, f in frames])) if frames else ("", "")
    args: list[Any] = [epoch, 100, TTL_MS, 50, last, packed]
    args += ["A", 1, b'{"role":"user","content":"hi"}', len(fields)]
    for name, value in fields.items():
        args += [name, value]
    return client.eval(keys.APPEND, 3, *keys.session_keys(DIGEST), *args)


def take_over(client: Any, owner: str, epoch: int, seq: int, frames: list[bytes]) -> Any:
    args: list[Any] = [owner, epoch, seq, "node-b", TTL_MS, seq + len(frames)]
    args.append(keys.pack_frames(frames) if frames else "")
    return client.eval(keys.TAKE_OVER, 2, *keys.session_keys(DIGEST)[:2], *args)


def frames(client: Any) -> list[tuple[int, bytes]]:
    return keys.unpack_entries(client.xrange(keys.frames_key(DIGEST)))


def test_the_holder_appends_frames_under_their_seq_and_every_key_gets_a_ttl(client: Any) -> None:
    assert append(client, 1, [(1, b"one"), (2, b"two")], {"seq": "2"}) == 1
    assert append(client, 1, [(3, b"three")], {"seq": "3"}) == 1
    assert frames(client) == [(1, b"one"), (2, b"two"), (3, b"three")]
    assert client.xlen(keys.frames_key(DIGEST)) == 2  # one entry per batch
    assert client.hget(keys.session_key(DIGEST), "seq") == b"3"
    assert client.lrange(keys.history_key(DIGEST), 0, -1) == [b'{"role":"user","content":"hi"}'] * 2
    for key in keys.session_keys(DIGEST):
        assert 0 < client.pttl(key) <= TTL_MS


def test_a_takeover_fences_the_old_holder_out(client: Any) -> None:
    assert append(client, 1, [(1, b"one")], {"seq": "1", "running": "1"}) == 1
    assert take_over(client, "node-a", 1, 1, [b"interrupted", b"done"]) == 2
    session = client.hgetall(keys.session_key(DIGEST))
    assert session[b"owner"] == b"node-b" and session[b"epoch"] == b"2"
    assert session[b"seq"] == b"3" and session[b"running"] == b"0"
    # The old holder wakes up and writes what it had: refused whole, nothing interleaved.
    assert append(client, 1, [(2, b"late")], {"seq": "2"}) == 0
    assert frames(client) == [(1, b"one"), (2, b"interrupted"), (3, b"done")]


def test_a_takeover_of_a_session_that_changed_meanwhile_fails(client: Any) -> None:
    assert append(client, 1, [(1, b"one")], {"seq": "1"}) == 1
    assert take_over(client, "node-a", 1, 0, []) == 0  # the seq read is stale
    assert take_over(client, "node-c", 1, 1, []) == 0  # another owner
    assert take_over(client, "node-a", 1, 1, []) == 2
    assert take_over(client, "node-a", 1, 1, []) == 0  # two racing takeovers: one wins
    client.delete(keys.session_key(DIGEST))
    assert take_over(client, "node-b", 2, 1, []) == -1  # gone


def test_the_stream_keeps_about_the_last_frames_and_refuses_them_out_of_order(
    client: Any,
) -> None:
    for seq in range(1, 501):
        assert append(client, 1, [(seq, b"%d" % seq)], {"seq": str(seq)}) == 1
    kept = frames(client)
    assert kept[-1] == (500, b"500") and 100 <= len(kept) < 500  # at least the last 100
    with pytest.raises(redis.ResponseError):
        append(client, 1, [(499, b"again")], {"seq": "499"})


def test_release_and_delete_only_act_for_the_current_epoch(client: Any) -> None:
    assert client.eval(keys.RELEASE, 1, keys.session_key(DIGEST), 2) == 0
    assert client.hget(keys.session_key(DIGEST), "owner") == b"node-a"
    assert client.eval(keys.RELEASE, 1, keys.session_key(DIGEST), 1) == 1
    assert client.hget(keys.session_key(DIGEST), "owner") == b""
    assert client.eval(keys.DELETE, 3, *keys.session_keys(DIGEST), 2) == 0
    assert client.eval(keys.DELETE, 3, *keys.session_keys(DIGEST), 1) == 1
    assert client.exists(*keys.session_keys(DIGEST)) == 0
