"""The messages between the server and an isolated worker, as typed values: pure, no I/O.

Whatever carries them (the local worker's socket, a Ray actor's calls), both ends speak in
these. On a byte channel each travels as a JSON array ``[kind, field, ...]`` (``ipc.py``
frames it); ``decode`` checks every field's type, so a model writing to the channel itself
can make the server drop its worker, never misroute or crash it. Standard library only, and
Python 3.9 syntax: the worker imports this inside the model's environment.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Union


class MessageError(ValueError):
    """A value that is not one of the messages below, or has a field of the wrong type."""


# ---------------------------------------------------------------- server → worker
class Config(NamedTuple):
    """First, once: the model's config (secrets included, so never a command-line argument)."""

    config: dict[str, Any]


class Start(NamedTuple):
    """Run ``on_chat_start`` for a new session; ``context`` is a snapshot to restore after
    it (a session moving between nodes), or None."""

    sid: str
    context: dict[str, Any] | None


class Turn(NamedTuple):
    """Run one ``on_chat_messages`` over the session's history, which the worker keeps:
    its copy becomes ``copy[:head] + copy[head + drop:] + appended`` (``history_sync.py``).
    ``snapshot`` asks ``TurnEnd`` to carry the session's context; ``params`` is the
    client's for this turn, or None."""

    sid: str
    turn_id: int
    head: int
    drop: int
    appended: list[Any]
    snapshot: bool
    params: dict[str, Any] | None


class Cancel(NamedTuple):
    """Close turn ``turn_id``'s generator (its ``finally`` runs); ``TurnEnd`` follows. It
    names the turn: over a carrier that may deliver it before the turn itself (a Ray
    actor's calls), it must neither miss that turn nor hit a later one."""

    sid: str
    turn_id: int


class Pause(NamedTuple):
    """The server holds too much of this session's output: stop pulling from the model."""

    sid: str


class Resume(NamedTuple):
    """The server has room again for this session's output."""

    sid: str


class Ping(NamedTuple):
    """Is the worker's event loop alive? ``Pong`` answers."""

    sid: str


class End(NamedTuple):
    """Run ``on_chat_end`` (after cancelling what still runs); ``Ended`` answers."""

    sid: str


# ---------------------------------------------------------------- worker → server
class Ready(NamedTuple):
    """The model loaded; its class's description."""

    description: str


class LoadFailed(NamedTuple):
    """The model did not load: a message for the listing, and the traceback for the log."""

    message: str
    detail: str | None


class Started(NamedTuple):
    """``on_chat_start`` returned (``error`` None) or raised (its traceback)."""

    sid: str
    error: str | None


class Chunks(NamedTuple):
    """Pieces the model yielded during turn ``turn_id``, in order: each stays a chunk of
    its own for the client; a run of them travels as one message (the worker merges the
    chunks it sends together, which saves a message's decoding and routing per chunk)."""

    sid: str
    turn_id: int
    texts: list[str]


class Emitted(NamedTuple):
    """An event the model emitted (``self.emit``, ``status``, ``step``), in order with its
    chunks."""

    sid: str
    turn_id: int
    name: str
    data: dict[str, Any]


class TurnEnd(NamedTuple):
    """A turn ended: ``outcome`` is ``stop``, ``cancelled``, ``error`` or
    ``resource_exhausted``; ``detail`` the traceback of an error; ``context`` the session's
    snapshot when the turn asked for one."""

    sid: str
    turn_id: int
    outcome: str
    detail: str | None
    context: dict[str, Any] | None


class Pong(NamedTuple):
    """The answer to ``Ping``."""

    sid: str


class Ended(NamedTuple):
    """``on_chat_end`` ran (``error`` None) or raised (its traceback)."""

    sid: str
    error: str | None


# Union, not |: these are evaluated at run time, and workers may run Python 3.9.
ServerMessage = Union[Config, Start, Turn, Cancel, Pause, Resume, Ping, End]  # noqa: UP007
WorkerMessage = Union[  # noqa: UP007
    Ready, LoadFailed, Started, Chunks, Emitted, TurnEnd, Pong, Ended
]
Message = Union[ServerMessage, WorkerMessage]  # noqa: UP007

_NONE = type(None)
_TEXT = (str,)
_TEXT_OR_NONE = (str, _NONE)
_OBJECT = (dict,)
_OBJECT_OR_NONE = (dict, _NONE)
_INT = (int,)
# Each kind's name on the wire and the types its fields may have, in order.
_KINDS: dict[type[Any], tuple[str, tuple[tuple[type, ...], ...]]] = {
    Config: ("config", (_OBJECT,)),
    Start: ("start", (_TEXT, _OBJECT_OR_NONE)),
    Turn: ("turn", (_TEXT, _INT, _INT, _INT, (list,), (bool,), _OBJECT_OR_NONE)),
    Cancel: ("cancel", (_TEXT, _INT)),
    Pause: ("pause", (_TEXT,)),
    Resume: ("resume", (_TEXT,)),
    Ping: ("ping", (_TEXT,)),
    End: ("end", (_TEXT,)),
    Ready: ("ready", (_TEXT,)),
    LoadFailed: ("load_failed", (_TEXT, _TEXT_OR_NONE)),
    Started: ("started", (_TEXT, _TEXT_OR_NONE)),
    Chunks: ("chunks", (_TEXT, _INT, (list,))),
    Emitted: ("event", (_TEXT, _INT, _TEXT, _OBJECT)),
    TurnEnd: ("turn_end", (_TEXT, _INT, _TEXT, _TEXT_OR_NONE, _OBJECT_OR_NONE)),
    Pong: ("pong", (_TEXT,)),
    Ended: ("ended", (_TEXT, _TEXT_OR_NONE)),
}
_BY_NAME = {name: (kind, fields) for kind, (name, fields) in _KINDS.items()}
_NAMES = {kind: name for kind, (name, _) in _KINDS.items()}


def to_list(message: Message) -> list[Any]:
    """``message`` as its wire array: ``[kind, field, ...]``."""
    return [_NAMES[type(message)], *message]


def from_list(value: Any) -> Message:
    """The message a wire array stands for; ``MessageError`` naming what is wrong."""
    if not isinstance(value, list) or not value or not isinstance(value[0], str):
        raise MessageError("a message is a JSON array starting with its kind")
    found = _BY_NAME.get(value[0])
    if found is None:
        raise MessageError(f"unknown message kind {value[0][:40]!r}")
    kind, fields = found
    if len(value) != len(fields) + 1:
        raise MessageError(f"{value[0]}: {len(value) - 1} fields, not {len(fields)}")
    for position, field in enumerate(value[1:]):
        types = fields[position]
        if not isinstance(field, types) or (isinstance(field, bool) and bool not in types):
            raise MessageError(f"{value[0]}: field {kind._fields[position]} has the wrong type")
    if kind is Chunks:
        try:  # every item a str: join checks that in C (a check per item was 4 % of a stream)
            "".join(value[3])
        except TypeError:
            raise MessageError("chunks: field texts holds something other than text") from None
    message: Message = kind(*value[1:])
    return message
