"""Log lines that repeat (rejects, refusals, reconnects) at most once per interval.

Every stage logs through its own `RateLimitedLog`; the keys are per stage, so one
noisy device or a dead uplink cannot drown the rest of the log.
"""

from __future__ import annotations

import logging
import threading
import time


class RateLimitedLog:
    """One log line per key per interval; the next line says how many were suppressed."""

    def __init__(self, logger: logging.Logger, interval_s: float = 10.0):
        self.logger, self.interval = logger, interval_s
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._lock = threading.Lock()

    def warning(self, key: str, message: str, *args: object) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(key, -1e9) < self.interval:
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                return
            self._last[key] = now
            suppressed = self._suppressed.pop(key, 0)
        suffix = f" ({suppressed} more like this since the last line)" if suppressed else ""
        self.logger.warning(message + suffix, *args)
