"""Exponential backoff with jitter, shared by the Wi-Fi and MQTT reconnect loops.

Delays double from min_ms to max_ms; each one is drawn uniformly from [d/2, d]
with os.urandom, so a street of poles that lost the same access point does not
come back in lock-step and hammer it (or the broker) all at once.
"""

import os


class Backoff:
    def __init__(self, min_ms=1000, max_ms=60000):
        if not 0 < min_ms <= max_ms:
            raise ValueError("backoff needs 0 < min_ms <= max_ms")
        self.min_ms = min_ms
        self.max_ms = max_ms
        self._next = min_ms

    def reset(self):
        """Call after a success: the next failure waits min_ms again."""
        self._next = self.min_ms

    def next_ms(self):
        """The delay to wait now; doubles the next one."""
        d = self._next
        self._next = min(d * 2, self.max_ms)
        half = d // 2
        return d - half + (half + 1) * int.from_bytes(os.urandom(2), "little") // 65536
