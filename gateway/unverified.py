"""Envelopes the registry cannot check yet, kept until it can.

A node provisioned minutes ago sends before this pole's copy of the registry knows it;
an HMAC node's key file may be unreadable until a technician fixes its mode. Rejecting
and acknowledging those envelopes would lose the readings for good, and leaving them
unacknowledged at the broker would fill its in-flight window and stall every other
node. So they are acknowledged once written here (a table of their own in the gateway's
SQLite file) and checked again at every registry reload: then stored like any other
envelope, or rejected for what they turn out to be. Bounded: per device and in total
(the oldest go first), and in age.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REASONS = ("unknown_device", "key_unavailable")   # what the registry may know later
MAX_ROWS = 10_000
MAX_PER_DEVICE = 1_000     # one made-up kid cannot push out the others
MAX_AGE_S = 7 * 86400

SCHEMA = """
CREATE TABLE IF NOT EXISTS unverified (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device TEXT NOT NULL,
    topic TEXT NOT NULL,
    data BLOB NOT NULL,
    received_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS unverified_device ON unverified (device, id);
"""


@dataclass(frozen=True)
class Waiting:
    id: int
    device: str
    topic: str
    data: bytes
    received_at: float


class Unverified:
    """The table, through a connection of its own (the file is in WAL mode)."""

    def __init__(self, path: str | Path, max_rows: int = MAX_ROWS,
                 max_per_device: int = MAX_PER_DEVICE, max_age_s: float = MAX_AGE_S,
                 clock: Callable[[], float] = time.time):
        self.max_rows, self.max_per_device, self.max_age_s = max_rows, max_per_device, max_age_s
        self.clock = clock
        self._lock = threading.Lock()
        self.db = sqlite3.connect(Path(path), isolation_level=None, check_same_thread=False,
                                  timeout=30)
        self.db.executescript(SCHEMA)

    def keep(self, entries: list[tuple[str, str, bytes, float]]) -> int:
        """Write (device, topic, data, received_at) entries durably; returns how many older
        ones were dropped to stay within the bounds."""
        if not entries:
            return 0
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                self.db.executemany("INSERT INTO unverified (device, topic, data, received_at) "
                                    "VALUES (?, ?, ?, ?)", entries)
                dropped = self._trim({device for device, *_ in entries})
                self.db.execute("COMMIT")
            except BaseException:
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
                raise
            return dropped

    def _trim(self, devices: set[str]) -> int:
        dropped = 0
        for device in devices:
            dropped += self.db.execute(
                "DELETE FROM unverified WHERE device = ? AND id NOT IN (SELECT id FROM "
                "unverified WHERE device = ? ORDER BY id DESC LIMIT ?)",
                (device, device, self.max_per_device)).rowcount
        dropped += self.db.execute(
            "DELETE FROM unverified WHERE id NOT IN (SELECT id FROM unverified ORDER BY id "
            "DESC LIMIT ?)", (self.max_rows,)).rowcount
        return dropped

    def expire(self) -> int:
        """Delete the entries older than max_age_s; returns how many."""
        with self._lock:
            return self.db.execute("DELETE FROM unverified WHERE received_at < ?",
                                   (self.clock() - self.max_age_s,)).rowcount

    def waiting(self) -> list[Waiting]:
        """Every entry, oldest first."""
        with self._lock:
            return [Waiting(*row) for row in self.db.execute(
                "SELECT id, device, topic, data, received_at FROM unverified ORDER BY id")]

    def forget(self, ids: list[int]) -> None:
        """Delete entries that were stored or rejected (after the store's commit)."""
        if not ids:
            return
        with self._lock:
            self.db.executemany("DELETE FROM unverified WHERE id = ?", [(i,) for i in ids])

    def count(self) -> int:
        with self._lock:
            return self.db.execute("SELECT count(*) FROM unverified").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self.db.close()
