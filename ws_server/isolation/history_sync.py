"""Keeping a worker's copy of each session's history in step with the server's, by sending
only what changed: pure, no I/O, standard library only (the worker applies the deltas).

A turn sends the whole history the model sees; re-encoding all of it every turn made a long
session's turns cost more and more (over a third of an isolated turn's time). The history
changes in three ways only (``session/history.py``): messages appended, the oldest ones
trimmed (after a kept leading system message), or all of it replaced; so the server names,
by identity of its message objects, what the worker keeps: the first ``head`` messages of
its copy, then it drops ``drop``, keeps the rest, and appends ``appended``.
"""

from __future__ import annotations

import operator
from typing import Any, NamedTuple

Message = Any  # a chat message: a dict with "role" and "content"


class HistoryDelta(NamedTuple):
    """``held[:head] + held[head + drop:] + appended`` is the new history."""

    head: int
    drop: int
    appended: list[Message]


def delta(held: list[Message] | None, now: list[Message]) -> HistoryDelta:
    """What turns ``held`` (the worker's copy, as last sent; None: it has none) into ``now``,
    comparing messages by identity; everything when no cheaper way holds."""
    if not held:
        return HistoryDelta(0, 0, now)
    size = len(held)
    if size <= len(now) and all(map(operator.is_, held, now)):  # appended only
        return HistoryDelta(size, 0, now[size:])
    head = 0
    while head < size and head < len(now) and held[head] is now[head]:
        head += 1
    if head < len(now):
        # Trimmed: where does the copy go on? By identity (equal messages are common: the
        # same question twice), from just past ``head``, where trimming leaves it.
        target = now[head]
        for start in range(head + 1, size):
            if held[start] is target:
                rest = size - start
                if len(now) - head >= rest and all(
                    map(operator.is_, held[start:], now[head : head + rest])
                ):
                    return HistoryDelta(head, start - head, now[head + rest :])
                break
    return HistoryDelta(0, size, now)


def apply(held: list[Message], head: int, drop: int, appended: list[Message]) -> list[Message]:
    """The worker's side: its copy after the delta."""
    return held[:head] + held[head + drop :] + appended
