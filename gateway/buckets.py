"""A token bucket per key: `burst` at once, then `per_s` a second.

What keeps one node (or one operator script) from taking the pole: each key spends its
own tokens, so a key that runs out stalls nobody else.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

MAX_KEYS = 10_000   # full buckets are forgotten beyond this: made-up keys cannot grow it


class Buckets:
    def __init__(self, burst: float, per_s: float,
                 clock: Callable[[], float] = time.monotonic):
        self.burst, self.per_s, self.clock = float(burst), float(per_s), clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)
        self._lock = threading.Lock()

    def take(self, key: str) -> bool:
        """Spend one of `key`'s tokens; False (nothing spent) when it has none left."""
        now = self.clock()
        with self._lock:
            tokens, at = self._buckets.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - at) * self.per_s)
            allowed = tokens >= 1
            self._buckets[key] = (tokens - 1 if allowed else tokens, now)
            if len(self._buckets) > MAX_KEYS:
                self._forget_full(now)
            return allowed

    def _forget_full(self, now: float) -> None:
        """A bucket that has refilled is the same as no bucket at all."""
        full = [key for key, (tokens, at) in self._buckets.items()
                if tokens + (now - at) * self.per_s >= self.burst]
        for key in full:
            del self._buckets[key]
