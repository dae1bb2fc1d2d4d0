"""Where the Redis store keeps things: key names and the scripts that change them.

Every key has a TTL. A session's three keys (its hash, its frames, its history) are
written only by the node that holds the session, and only while its ``epoch`` is the
one in the hash: each script checks it first, so a node that lost a session (taken over
while it stalled) has its late writes refused instead of interleaved. The frames'
stream ids are their seqs (``<seq>-0``), so an out-of-order append fails as well.
"""

from __future__ import annotations

from typing import Any, Final

PREFIX: Final = "anything-agent:"
RELOAD_CHANNEL: Final = PREFIX + "reloads"
RELOAD_GENERATION: Final = PREFIX + "reload"
NODES: Final = PREFIX + "nodes"


def session_key(digest: str) -> str:
    """The session's hash: who holds it, its epoch, seq, turn, context."""
    return f"{PREFIX}session:{digest}"


def frames_key(digest: str) -> str:
    """The session's frames as a stream, each entry's id its seq."""
    return f"{PREFIX}frames:{digest}"


def history_key(digest: str) -> str:
    """The session's history: one JSON message per list item."""
    return f"{PREFIX}history:{digest}"


def session_keys(digest: str) -> list[str]:
    return [session_key(digest), frames_key(digest), history_key(digest)]


def node_key(node: str) -> str:
    """A node's heartbeat (what it serves), living ``--node-ttl`` seconds."""
    return f"{PREFIX}node:{node}"


def inbox_key(node: str) -> str:
    """A node's inbox stream: client frames relayed to it, notices for its relays."""
    return f"{PREFIX}inbox:{node}"


def wake_key(node: str) -> str:
    """A node's wake stream: ends its blocking read of relayed streams (``tail.py``)."""
    return f"{PREFIX}wake:{node}"


def stream_id(seq: int) -> bytes:
    return b"%d-0" % seq


def seq_of(stream_id: bytes | str) -> int:
    text = stream_id.decode() if isinstance(stream_id, bytes) else stream_id
    return int(text.partition("-")[0])


def pack_frames(frames: list[bytes]) -> bytes:
    """A batch of frames as one stream entry's field. A frame is JSON, whose encoding
    escapes every line break inside strings, so a raw newline never occurs in one."""
    return b"\n".join(frames)


def unpack_entries(entries: list[Any]) -> list[tuple[int, bytes]]:
    """``(seq, frame)`` of every frame in stream ``entries``; an entry's id is the seq of
    the last frame of its batch."""
    frames: list[tuple[int, bytes]] = []
    for entry_id, fields in entries:
        batch = fields[b"f"].split(b"\n")
        first = seq_of(entry_id) - len(batch) + 1
        frames += zip(range(first, first + len(batch)), batch, strict=True)
    return frames


# A session's frames are written in batches: one stream entry per batch, its id the last
# frame's seq, its field ``f`` the frames joined by newlines (``pack_frames``). One entry
# per batch, not per frame: the per-frame cost in Redis and in the client is what bounded
# the throughput of a session mirrored to Redis. Entries older than the last ``keep``
# frames are trimmed (``MINID``), which bounds the stream like the replay buffer.

# KEYS: hash, frames, history. ARGV: epoch, keep, ttl_ms, max_history, then the last
# frame's seq and the packed frames ("" and "" when none), then the history mode ("A"
# append, "R" replace), n_messages and the messages, then n_fields and (field, value)
# pairs. Returns 1; 0 when this writer no longer holds the session (fenced); -1 when the
# session is not in Redis at all (Redis restarted empty, or its keys expired): its holder
# writes it whole again (RESYNC).
APPEND: Final = """
local h, s, l = KEYS[1], KEYS[2], KEYS[3]
local epoch = redis.call('HGET', h, 'epoch')
if epoch == false then return -1 end
if epoch ~= ARGV[1] then return 0 end
if ARGV[5] ~= '' then
  local oldest = math.max(0, tonumber(ARGV[5]) - tonumber(ARGV[2]))
  redis.call('XADD', s, 'MINID', '~', string.format('%d', oldest), ARGV[5] .. '-0', 'f', ARGV[6])
end
local mode = ARGV[7]
local n = tonumber(ARGV[8])
local i = 9
if mode == 'R' then redis.call('DEL', l) end
for _ = 1, n do
  redis.call('RPUSH', l, ARGV[i])
  i = i + 1
end
if n > 0 then redis.call('LTRIM', l, -tonumber(ARGV[4]), -1) end
n = tonumber(ARGV[i])
i = i + 1
for _ = 1, n do
  redis.call('HSET', h, ARGV[i], ARGV[i + 1])
  i = i + 2
end
redis.call('PEXPIRE', h, ARGV[3])
redis.call('PEXPIRE', s, ARGV[3])
redis.call('PEXPIRE', l, ARGV[3])
return 1
"""

# KEYS: hash, frames. ARGV: expected owner, expected epoch, expected seq, new owner,
# ttl_ms, the seq the session goes on after, then the packed frames appended for an
# interrupted turn ("" when none; their last is that seq). Returns the new epoch; 0 when
# the session changed meanwhile (read it again), -1 when it is gone.
TAKE_OVER: Final = """
local h, s = KEYS[1], KEYS[2]
local owner = redis.call('HGET', h, 'owner')
if owner == false then return -1 end
if owner ~= ARGV[1] or redis.call('HGET', h, 'epoch') ~= ARGV[2]
   or redis.call('HGET', h, 'seq') ~= ARGV[3] then return 0 end
local epoch = redis.call('HINCRBY', h, 'epoch', 1)
redis.call('HSET', h, 'owner', ARGV[4], 'seq', ARGV[6], 'running', '0')
if ARGV[7] ~= '' then redis.call('XADD', s, ARGV[6] .. '-0', 'f', ARGV[7]) end
redis.call('PEXPIRE', h, ARGV[5])
redis.call('PEXPIRE', s, ARGV[5])
return epoch
"""

# KEYS: hash, frames, history. ARGV: epoch, owner, ttl_ms, n_fields and (field, value)
# pairs, n_messages and the messages. The holder writes its session whole again after
# Redis lost its writes (an outage, a restart): unless another node holds it now (0), the
# hash is rewritten, the history replaced, and the stream starts over (frames before now
# are not resumable elsewhere). Returns 1.
RESYNC: Final = """
local h, s, l = KEYS[1], KEYS[2], KEYS[3]
local epoch = redis.call('HGET', h, 'epoch')
if epoch ~= false and (epoch ~= ARGV[1] or redis.call('HGET', h, 'owner') ~= ARGV[2]) then
  return 0
end
redis.call('DEL', s, l)
local i = 5
for _ = 1, tonumber(ARGV[4]) do
  redis.call('HSET', h, ARGV[i], ARGV[i + 1])
  i = i + 2
end
local n = tonumber(ARGV[i])
i = i + 1
for _ = 1, n do
  redis.call('RPUSH', l, ARGV[i])
  i = i + 1
end
redis.call('PEXPIRE', h, ARGV[3])
redis.call('PEXPIRE', l, ARGV[3])
return 1
"""

# KEYS: hash, frames, history. ARGV: node. A session this node held has ended while its
# writes could not reach Redis: its keys go if this node is still their holder.
DROP_OWN: Final = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
return 1
"""

# KEYS: hash. ARGV: epoch. A draining node lets go of a session: the next node a client
# reaches takes it over at once, without waiting for this node's heartbeat to lapse.
RELEASE: Final = """
if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'owner', '')
return 1
"""

# KEYS: hash, frames, history. ARGV: epoch. An ended session's keys go, if still ours.
DELETE: Final = """
if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
return 1
"""
