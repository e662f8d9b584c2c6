"""Server-side limits on what parties may make the server do: request rates and upload memory.

Two small thread-safe accountants, shared by every handler thread:

- `RateLimiter`: one token bucket per party (``transport.max_requests_per_second``, refilled
  continuously, holding at most ``transport.request_burst`` tokens). A call takes one token; a
  party with none left is refused at once with RESOURCE_EXHAUSTED, which an honest client treats
  as "retry later". Parties are keyed by their authenticated id (or declared id without mutual
  TLS), never by IP address: a simulation runs every party on 127.0.0.1. The table of buckets is
  bounded (least recently used buckets are forgotten first), so made-up ids cannot grow it.
- `ByteBudget`: the bytes of uploads the server may hold at once
  (``transport.max_inflight_bytes``). An upload reserves its manifest's ``total_bytes`` before
  its first chunk is read and gives them back when it ends, however it ends, so many slow uploads
  cannot make the server hold ``max_streams x max_update_bytes``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import grpc

from protocols.errors import ProtocolError

log = logging.getLogger(__name__)

#: Most parties whose bucket the rate limiter remembers at once (about 100 bytes each).
MAX_TRACKED_PARTIES: int = 65536


class OverLimit(ProtocolError):
    """A party asked for more than a server limit allows right now; it should retry later."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class _Bucket:
    __slots__ = ("refused", "stamp", "tokens")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp
        self.refused = False


class RateLimiter:
    """Token buckets per party: ``rate`` calls a second on average, bursts of up to ``burst``.

    ``rate == 0`` turns the limiter off. Each `check` is O(1): a dictionary look-up, one
    refill computed from the time since the party's last call, and a move to the end of the
    least-recently-used order. ``clock`` is injectable for tests.
    """

    def __init__(
        self, *, rate: float, burst: int, max_parties: int = MAX_TRACKED_PARTIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate < 0 or burst < 1 or max_parties < 1:
            raise ValueError(f"rate={rate} must be >= 0, burst={burst} and max_parties={max_parties} >= 1")
        self.rate = float(rate)
        self.burst = int(burst)
        self.max_parties = int(max_parties)
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    @property
    def enabled(self) -> bool:
        """Whether calls are limited at all (``transport.max_requests_per_second > 0``)."""
        return self.rate > 0

    def check(self, party: str, method: str) -> None:
        """Take one token from ``party``'s bucket; raise `OverLimit` (RESOURCE_EXHAUSTED) if it has none."""
        if not self.enabled:
            return
        now = self._clock()
        with self._lock:
            bucket = self._buckets.get(party)
            if bucket is None:
                bucket = self._buckets[party] = _Bucket(float(self.burst), now)
                if len(self._buckets) > self.max_parties:
                    self._buckets.popitem(last=False)  # the least recently heard party: its bucket is likely full
            else:
                self._buckets.move_to_end(party)
                bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.stamp) * self.rate)
                bucket.stamp = now
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                bucket.refused = False
                return
            first_refusal, bucket.refused = not bucket.refused, True
            wait = (1.0 - bucket.tokens) / self.rate
        message = (
            f"{method}: party {party!r} is over transport.max_requests_per_second={self.rate:g} "
            f"(transport.request_burst={self.burst}); retry in {wait:.2f} s"
        )
        if first_refusal:  # once per burst of refusals, so a flood does not flood the log
            log.info("refused: %s", message)
        raise OverLimit(message)

    def forget(self, party: str) -> None:
        """Drop ``party``'s bucket (it left); a later call starts with a full bucket."""
        with self._lock:
            self._buckets.pop(party, None)

    def tracked(self) -> int:
        """How many party buckets are held now."""
        with self._lock:
            return len(self._buckets)


class ByteBudget:
    """Bytes of uploads in flight, capped at ``capacity`` (``transport.max_inflight_bytes``)."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = int(capacity)
        self._lock = threading.Lock()
        self._reserved = 0
        self._peak = 0

    @contextmanager
    def reserve(self, size: int, who: str) -> Iterator[None]:
        """Hold ``size`` bytes for the block, or raise `OverLimit` (RESOURCE_EXHAUSTED) if they do not fit."""
        size = max(0, int(size))
        with self._lock:
            if self._reserved + size > self.capacity:
                held = self._reserved
                refused = True
            else:
                self._reserved += size
                self._peak = max(self._peak, self._reserved)
                refused = False
        if refused:
            raise OverLimit(
                f"{who}: the server holds {held} bytes of uploads in flight and {size} more would exceed "
                f"transport.max_inflight_bytes={self.capacity}; retry shortly"
            )
        try:
            yield
        finally:
            with self._lock:
                self._reserved -= size

    @property
    def reserved(self) -> int:
        """Bytes reserved by uploads in progress now."""
        with self._lock:
            return self._reserved

    @property
    def peak(self) -> int:
        """The most bytes ever reserved at once (never above ``capacity``)."""
        with self._lock:
            return self._peak
