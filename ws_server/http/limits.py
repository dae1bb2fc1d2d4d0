"""Abuse limits: connections per server and per client address, frames per minute per
connection, and plain-HTTP requests per minute per address (the history's limits live in
``history.py``). Pure bookkeeping, no I/O; the server and the session apply them."""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable

from ws_server.exceptions import (
    RateLimited,
    TooManyConnections,
    TooManyFromAddress,
    TooManyRequests,
)

# Addresses whose request buckets are kept at most; past it, the full ones are forgotten
# (a full bucket is what a new address gets anyway).
TRACKED_ADDRESSES = 4096


class ConnectionCounter:
    """Open WebSocket connections, in total and per client address."""

    def __init__(self, max_total: int | None, max_per_address: int | None) -> None:
        self.max_total = max_total
        self.max_per_address = max_per_address
        self.total = 0
        self._per_address: Counter[str] = Counter()

    def check(self, address: str) -> None:
        """Raise if one more connection from ``address`` would go over a limit."""
        if self.max_total is not None and self.total >= self.max_total:
            raise TooManyConnections(
                f"the server is at its limit of {self.max_total} connections; try again later"
            )
        if self.max_per_address is not None and self._per_address[address] >= self.max_per_address:
            raise TooManyFromAddress(
                f"{address} already has {self.max_per_address} open connections, the most "
                "one address may hold"
            )

    def opened(self, address: str) -> None:
        self.total += 1
        self._per_address[address] += 1

    def closed(self, address: str) -> None:
        self.total -= 1
        self._per_address[address] -= 1
        if self._per_address[address] <= 0:
            del self._per_address[address]


class FrameRate:
    """A token bucket: ``per_minute`` frames a minute, with bursts up to that many."""

    __slots__ = ("_clock", "_tokens", "_updated", "per_minute")

    def __init__(self, per_minute: int | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self._clock = clock
        self._tokens = float(per_minute or 0)
        self._updated = clock()

    def take(self) -> None:
        """Count one frame; raise ``RateLimited`` (saying when to retry) if over."""
        if self.per_minute is None:
            return
        now = self._clock()
        rate = self.per_minute / 60.0
        self._tokens = min(float(self.per_minute), self._tokens + (now - self._updated) * rate)
        self._updated = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return
        wait = (1.0 - self._tokens) / rate
        refused = RateLimited(
            f"more than {self.per_minute} frames a minute; this one was dropped, "
            f"send again in {wait:.1f} s"
        )
        refused.retry_after = wait
        raise refused

    def full(self) -> bool:
        """Whether the bucket has refilled: it holds what a new one would."""
        if self.per_minute is None:
            return True
        refill = (self._clock() - self._updated) * self.per_minute / 60.0
        return self._tokens + refill >= self.per_minute


class RequestRate:
    """Plain-HTTP requests a minute per client address (a request has no connection of its
    own to count on: clients pool them), one token bucket per address."""

    def __init__(self, per_minute: int | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self._clock = clock
        self._buckets: dict[str, FrameRate] = {}

    def take(self, address: str) -> None:
        """Count one request from ``address``; raise ``TooManyRequests`` if over."""
        if self.per_minute is None:
            return
        bucket = self._buckets.get(address)
        if bucket is None:
            if len(self._buckets) >= TRACKED_ADDRESSES:
                self._buckets = {a: b for a, b in self._buckets.items() if not b.full()}
            bucket = self._buckets[address] = FrameRate(self.per_minute, self._clock)
        try:
            bucket.take()
        except RateLimited as exc:
            wait = math.ceil(exc.retry_after)
            raise TooManyRequests(
                f"more than {self.per_minute} requests a minute from {address}; "
                f"send again in {wait} s",
                retry_after=wait,
            ) from None
