"""The durable buffer: SQLite in WAL mode, synchronous=FULL, one file in the state dir.

A row is an accepted envelope (original bytes) or a gap record. Rows leave the store
only when the upstream broker has acknowledged them (`delete`), or when a quota or a
TTL evicts them; every eviction is counted by device and reason and becomes a gap
record that is forwarded like a message, so loss is never silent.

Quota policy, when a batch does not fit (bytes, rows, or the disk's minimum free
space): victims are taken by class - backfill first, then live readings, events
last - and oldest first within a class; incoming rows are the newest of their class.
Gap records are never evicted and do not count against the row quota (they merge into
one open record per device and reason, so there are few of them). When the disk is
below its free minimum, each batch frees at least as many bytes as it adds, so the
file stops growing.

The replay window (per device: highest sequence number seen and a bitmap of the
`replay_window` numbers below it) is committed in the same transaction as the rows,
so after a crash the store and the window always agree.

The store also keeps the uplink's bookkeeping, so no stage reaches into another's state:
rows being sent upstream are held (`sending` / `release`): they are not evicted and
their gap records are not merged into. Rows the city's broker acknowledged
(`delete_later`) stay held and are deleted inside the next insert's transaction (one
fsync for both), or by `flush_deletes` when no insert comes. Deleting late is safe:
after a crash an acknowledged row is at worst sent again (the same device and seq).
Every insert sets `new_rows`, so the uplink reads what was committed at once.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from citynode import wire

from .config import StoreLimits

log = logging.getLogger("citynode.gateway.store")

# Priority classes, in eviction order (lowest first). Gap records are never evicted.
PRIO_BACKFILL, PRIO_LIVE, PRIO_EVENT, PRIO_GAP = 0, 1, 2, 3
PRIO_NAMES = {PRIO_BACKFILL: "backfill", PRIO_LIVE: "live", PRIO_EVENT: "event", PRIO_GAP: "gap"}
ROW_OVERHEAD = 48  # bytes a row costs beyond its payload (row header, index entry)

STORED, DUPLICATE, REPLAYED, DROPPED = "stored", "duplicate", "replayed", "dropped"

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device TEXT NOT NULL,
    seq INTEGER,
    prio INTEGER NOT NULL,
    received_at REAL NOT NULL,
    size INTEGER NOT NULL,
    data BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_prio ON messages (prio, id);
CREATE TABLE IF NOT EXISTS replay (
    device TEXT PRIMARY KEY,
    max_seq INTEGER NOT NULL,
    bitmap BLOB NOT NULL
);
"""


# What opening the file yields: the connection, rows and bytes per class, replay windows.
_Opened = tuple[sqlite3.Connection, Counter[int], int, dict[str, tuple[int, int]]]


class StoreError(RuntimeError):
    """The store cannot go on (disk, permissions); the message says what to check."""


@dataclass
class Incoming:
    """An envelope that passed verification, waiting for the group commit."""

    device: str
    seq: int
    data: bytes
    received_at: float
    event: bool = False
    node_time: float | None = None   # Unix seconds, from the payload
    key: str = ""           # the verifying key's id (registry.Registry.key_id)
    outcome: str = ""
    prio: int = PRIO_LIVE

    @property
    def window(self) -> str:
        """Its replay window: one per device and key, so a rekeyed node (its counter
        back at 0) starts clean while the old key's envelopes stay replay-protected."""
        return f"{self.device} {self.key}" if self.key else self.device


@dataclass(frozen=True)
class Row:
    id: int
    device: str
    seq: int | None
    prio: int
    received_at: float
    data: bytes

    @property
    def is_gap(self) -> bool:
        return self.prio == PRIO_GAP


class Store:
    def __init__(self, path: str | Path, limits: StoreLimits,
                 on_drop: Callable[[str, str, int, bool], None] | None = None,
                 clock: Callable[[], float] = time.time):
        self.path = Path(path)
        self.limits = limits
        # on_drop(device, reason, count, was_buffered): every loss, as it is committed
        self.on_drop = on_drop or (lambda device, reason, n, stored: None)
        self.clock = clock
        self.quarantined: list[Path] = []
        # Set by every insert: committed rows for the uplink to read now.
        self.new_rows = threading.Event()
        self._lock = threading.RLock()
        # Row ids in flight upstream or acknowledged and not yet deleted: never evicted,
        # gap records not merged. The uplink's thread changes it one set operation at a
        # time (atomic under the GIL); the writer reads it under the write lock.
        self._held: set[int] = set()
        self._acked: list[int] = []  # acknowledged upstream, deleted with the next commit
        self._acked_since = 0.0
        self._acked_lock = threading.Lock()
        self.db, self._counts, self._bytes, self._windows = self._open()
        # The uplink reads through its own connection: WAL lets it read the last
        # committed rows while the writer's commit waits for its fsync.
        self._reader = sqlite3.connect(self.path, isolation_level=None,
                                       check_same_thread=False, timeout=30)
        self._read_lock = threading.Lock()

    # --- opening, quarantine ---------------------------------------------------------------

    def _open(self) -> _Opened:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the state directory {self.path.parent} "
                             f"({exc.strerror}); check state_dir and its permissions") from None
        try:
            return self._connect()
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.OperationalError) and not _is_corruption(exc):
                raise StoreError(f"cannot open {self.path}: {exc}; check the state directory's "
                                 "permissions and free space") from None
            target = self._quarantine(exc)
            log.error("store: %s is corrupt (%s); moved it to %s and started a fresh database",
                      self.path, exc, target)
            return self._connect()

    def _connect(self) -> _Opened:
        """Open the file and read its totals and replay windows (a corrupt page shows up
        here, so the caller can quarantine the file)."""
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                             timeout=30)
        try:
            if db.execute("PRAGMA journal_mode=WAL").fetchone()[0].lower() != "wal":
                raise sqlite3.DatabaseError("file is not a database: WAL mode refused")
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(SCHEMA)
            counts: Counter[int] = Counter()
            total = 0
            for prio, count, size in db.execute(
                    "SELECT prio, count(*), coalesce(sum(size), 0) FROM messages GROUP BY prio"):
                counts[prio] = count
                total += size
            windows = {device: (max_seq, int.from_bytes(bitmap, "little"))
                       for device, max_seq, bitmap in
                       db.execute("SELECT device, max_seq, bitmap FROM replay")}
            os.chmod(self.path, 0o600)
        except BaseException:
            db.close()
            raise
        return db, counts, total, windows

    def _quarantine(self, exc: Exception) -> Path:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(self.clock()))
        target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        n = 1
        while target.exists():
            target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}")
            n += 1
        for suffix in ("", "-wal", "-shm"):
            src = Path(f"{self.path}{suffix}")
            if src.exists():
                shutil.move(src, f"{target}{suffix}")
        self.quarantined.append(target)
        return target

    def quarantined_files(self) -> int:
        return len(list(self.path.parent.glob(f"{self.path.name}.corrupt-*[0-9Z]")))

    def close(self) -> None:
        with self._lock:
            try:
                self.flush_deletes()
            except sqlite3.Error as exc:  # they are sent again after the restart
                log.warning("store: acknowledged rows not deleted at close: %s", exc)
            with self._read_lock:
                self._reader.close()
            self.db.close()

    # --- ingest ----------------------------------------------------------------------------

    def insert(self, items: list[Incoming]) -> list[Incoming]:
        """Commit a batch in one transaction; sets each item's `outcome`.

        DUPLICATE: already seen in the replay window; REPLAYED: older than the window;
        DROPPED: did not fit the quota (counted, and a gap record written). All four
        outcomes mean the item may be acknowledged to the node once this returns.
        """
        with self._lock:
            windows = dict(self._windows)
            dirty: set[str] = set()
            fresh: list[Incoming] = []
            for item in items:
                verdict, prio = self._window_admit(windows, item)
                item.outcome, item.prio = verdict, prio
                if verdict == STORED:
                    dirty.add(item.window)
                    fresh.append(item)
            self._write(fresh, windows, dirty, self._take_acked())
            self.new_rows.set()
            return items

    def _window_admit(self, windows: dict[str, tuple[int, int]], item: Incoming
                      ) -> tuple[str, int]:
        size = self.limits.replay_window
        state = windows.get(item.window)
        if state is None and item.key:  # a window from before keys were told apart
            state = windows.get(item.device)
        prio = PRIO_EVENT if item.event else PRIO_LIVE
        if (not item.event and item.node_time is not None
                and item.received_at - item.node_time > self.limits.backfill_age_s):
            prio = PRIO_BACKFILL
        if state is None:
            windows[item.window] = (item.seq, 1)
            return STORED, prio
        top, bits = state
        if item.seq > top:  # any jump: past the window, only the new top is remembered
            jump = item.seq - top
            bits = ((bits << jump) | 1) & ((1 << size) - 1) if jump < size else 1
            windows[item.window] = (item.seq, bits)
            return STORED, prio
        offset = top - item.seq
        if offset >= size:
            return REPLAYED, prio
        if bits >> offset & 1:
            return DUPLICATE, prio
        windows[item.window] = (top, bits | (1 << offset))
        return STORED, (PRIO_EVENT if item.event else PRIO_BACKFILL)  # late: from a spool

    def _write(self, fresh: list[Incoming], windows: dict[str, tuple[int, int]],
               dirty: set[str], acked: list[int]) -> None:
        db = self.db
        counts = Counter(self._counts)
        window_bytes = (self.limits.replay_window + 7) // 8
        gaps: list[Gap] = []
        db.execute("BEGIN IMMEDIATE")
        try:
            freed = 0
            for prio, size in self._delete_rows(acked):
                counts[prio] -= 1
                freed += size
            kept, evicted = self._make_room(fresh, gaps, counts, freed)
            db.executemany("INSERT INTO messages (device, seq, prio, received_at, size, data) "
                           "VALUES (?, ?, ?, ?, ?, ?)",
                           [(i.device, i.seq, i.prio, i.received_at, len(i.data) + ROW_OVERHEAD,
                             i.data) for i in kept])
            for item in kept:
                counts[item.prio] += 1
            for window in dirty:  # the column `device` holds the window's name
                top, bits = windows[window]
                db.execute("INSERT OR REPLACE INTO replay (device, max_seq, bitmap) VALUES "
                           "(?, ?, ?)", (window, top, bits.to_bytes(window_bytes, "little")))
            grown = self._write_gaps(gaps, counts)
            added = sum(len(i.data) + ROW_OVERHEAD for i in kept)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            self.delete_later(acked)  # still acknowledged: the next commit deletes them
            raise
        self._counts, self._windows = counts, windows
        self._bytes += added + grown - freed - evicted
        self._held.difference_update(acked)
        self._report(gaps)

    def _report(self, gaps: list[Gap]) -> None:
        tally: Counter[tuple[str, str, bool]] = Counter()
        for gap in gaps:
            tally[gap.device, gap.reason, gap.stored] += 1
        for (device, reason, stored), n in tally.items():
            self.on_drop(device, reason, n, stored)

    def _make_room(self, fresh: list[Incoming], gaps: list[Gap], counts: Counter[int],
                   freed: int) -> tuple[list[Incoming], int]:
        """Evict (inside the open transaction) until `fresh` fits, `freed` bytes having
        just been deleted; returns the rows kept and the bytes evicted."""
        limits = self.limits
        new_bytes = sum(len(i.data) + ROW_OVERHEAD for i in fresh)
        need_rows = sum(counts.values()) - counts[PRIO_GAP] + len(fresh) - limits.max_rows
        need_bytes = self._bytes - freed + new_bytes - limits.max_bytes
        if fresh and limits.min_free_bytes and self.free_disk() < limits.min_free_bytes:
            need_bytes = max(need_bytes, new_bytes)
        if need_rows <= 0 and need_bytes <= 0:
            return fresh, 0
        dropped: set[int] = set()
        evicted = 0
        for prio in (PRIO_BACKFILL, PRIO_LIVE, PRIO_EVENT):
            victims: list[int] = []
            cursor = self.db.execute("SELECT id, device, seq, received_at, size FROM messages "
                                     "WHERE prio = ? ORDER BY id", (prio,))
            for row_id, device, seq, received_at, size in cursor:
                if need_rows <= 0 and need_bytes <= 0:
                    break
                if row_id in self._held:
                    continue
                victims.append(row_id)
                gaps.append(Gap(device, "quota", seq, received_at, stored=True))
                need_rows -= 1
                need_bytes -= size
                evicted += size
            cursor.close()
            if victims:
                self.db.executemany("DELETE FROM messages WHERE id = ?", ((v,) for v in victims))
                counts[prio] -= len(victims)
            for index, item in enumerate(fresh):
                if need_rows <= 0 and need_bytes <= 0:
                    break
                if item.prio == prio:
                    dropped.add(index)
                    item.outcome = DROPPED
                    gaps.append(Gap(item.device, "quota", item.seq, item.received_at))
                    need_rows -= 1
                    need_bytes -= len(item.data) + ROW_OVERHEAD
            if need_rows <= 0 and need_bytes <= 0:
                break
        return [item for n, item in enumerate(fresh) if n not in dropped], evicted

    def _write_gaps(self, gaps: list[Gap], counts: Counter[int]) -> int:
        """Fold drops into gap records: one open record per (device, reason). Returns
        how many bytes the gap records grew by."""
        grown = 0
        groups: dict[tuple[str, str], list[Gap]] = {}
        for gap in gaps:
            groups.setdefault((gap.device, gap.reason), []).append(gap)
        for (device, reason), members in groups.items():
            record = wire.gap_record(device, reason,
                                     [g.seq for g in members if g.seq is not None],
                                     [g.received_at for g in members])
            row = self.db.execute("SELECT id, size, data FROM messages WHERE prio = ? AND "
                                  "device = ? ORDER BY id DESC LIMIT 1",
                                  (PRIO_GAP, device)).fetchone()
            if row and row[0] not in self._held:
                old = json.loads(row[2])
                if old.get("reason") == reason:
                    record = wire.merge_gap_records(old, record)
                    data = json.dumps(record, sort_keys=True).encode()
                    size = len(data) + ROW_OVERHEAD
                    self.db.execute("UPDATE messages SET data = ?, size = ? WHERE id = ?",
                                    (data, size, row[0]))
                    grown += size - row[1]
                    continue
            data = json.dumps(record, sort_keys=True).encode()
            size = len(data) + ROW_OVERHEAD
            self.db.execute("INSERT INTO messages (device, seq, prio, received_at, size, data) "
                            "VALUES (?, NULL, ?, ?, ?, ?)",
                            (device, PRIO_GAP, self.clock(), size, data))
            counts[PRIO_GAP] += 1
            grown += size
        return grown

    # --- forwarding ------------------------------------------------------------------------

    # These read committed rows through the reader connection, without the write lock.

    def max_id(self) -> int:
        with self._read_lock:
            return self._reader.execute(
                "SELECT coalesce(max(id), 0) FROM messages").fetchone()[0]

    def live_rows(self, after: int, boundary: int, limit: int) -> list[Row]:
        """The live lane: rows stored after `boundary` (the last id when the uplink came
        up), except backfill, in id order from `after`."""
        with self._read_lock:
            return self._select("WHERE id > ? AND prio != 0 ORDER BY id LIMIT ?",
                                (max(after, boundary), limit), self._reader)

    def backlog_rows(self, after: int, boundary: int, limit: int) -> list[Row]:
        """The backlog lane: everything up to `boundary`, then backfill, in id order."""
        with self._read_lock:
            rows = self._select("WHERE id > ? AND id <= ? ORDER BY id LIMIT ?",
                                (after, boundary, limit), self._reader)
            if len(rows) < limit:
                rows += self._select("WHERE prio = 0 AND id > ? ORDER BY id LIMIT ?",
                                     (max(after, boundary), limit - len(rows)), self._reader)
            return rows

    def backlog_events(self, after: int, boundary: int, limit: int) -> list[Row]:
        """The backlog's events, in id order from `after`: they go before the rest of it."""
        with self._read_lock:
            return self._select("WHERE prio = ? AND id > ? AND id <= ? ORDER BY id LIMIT ?",
                                (PRIO_EVENT, after, boundary, limit), self._reader)

    def rows(self, ids: Iterable[int]) -> list[Row]:
        ids = list(ids)
        with self._read_lock:
            return self._select(f"WHERE id IN ({','.join('?' * len(ids))}) ORDER BY id",
                                tuple(ids), self._reader) if ids else []

    def scan(self, limit: int = 1000) -> list[Row]:
        """The oldest rows, every class (for tests and the status command)."""
        with self._lock:
            return self._select("ORDER BY id LIMIT ?", (limit,))

    def _select(self, where: str, args: tuple, db: sqlite3.Connection | None = None
                ) -> list[Row]:
        query = f"SELECT id, device, seq, prio, received_at, data FROM messages {where}"
        return [Row(*r) for r in (db or self.db).execute(query, args)]

    def delete(self, ids: Iterable[int]) -> int:
        """Delete rows the upstream broker acknowledged, now; returns how many existed."""
        ids = list(ids)
        if not ids:
            return 0
        with self._lock:
            db = self.db
            db.execute("BEGIN IMMEDIATE")
            try:
                gone = self._delete_rows(ids)
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            for prio, size in gone:
                self._counts[prio] -= 1
                self._bytes -= size
            self._held.difference_update(ids)
            return len(gone)

    def sending(self, ids: Iterable[int]) -> None:
        """Rows published upstream (in flight): held until deleted or released."""
        self._held.update(ids)

    def release(self, ids: Iterable[int]) -> None:
        """Rows whose publish came to nothing (the connection went): no longer held;
        they go out again from the store."""
        self._held.difference_update(ids)

    def delete_later(self, ids: Iterable[int]) -> None:
        """Rows the upstream broker acknowledged: they stay held, and the next insert
        deletes them in its own transaction (one fsync for both), or `flush_deletes`
        does when no insert came."""
        with self._acked_lock:
            if not self._acked:
                self._acked_since = time.monotonic()
            self._acked.extend(ids)

    def flush_deletes(self, older_than_s: float = 0.0) -> int:
        """Delete what `delete_later` holds if it has waited `older_than_s`."""
        with self._acked_lock:
            if not self._acked or time.monotonic() - self._acked_since < older_than_s:
                return 0
        return self.delete(self._take_acked())

    def pending_deletes(self) -> int:
        return len(self._acked)

    def _take_acked(self) -> list[int]:
        with self._acked_lock:
            acked, self._acked = self._acked, []
            return acked

    def _delete_rows(self, ids: list[int]) -> list[tuple[int, int]]:
        """DELETE inside the caller's transaction; (prio, size) of the rows that existed."""
        gone: list[tuple[int, int]] = []
        for chunk in range(0, len(ids), 500):
            part = ids[chunk:chunk + 500]
            marks = ",".join("?" * len(part))
            gone += self.db.execute(f"SELECT prio, size FROM messages WHERE id IN ({marks})",
                                    part).fetchall()
            self.db.execute(f"DELETE FROM messages WHERE id IN ({marks})", part)
        return gone

    def sweep_ttl(self) -> int:
        """Evict rows older than their class's TTL; counted and turned into gap records."""
        limits, now = self.limits, self.clock()
        ttl = {PRIO_BACKFILL: limits.ttl_backfill_s, PRIO_LIVE: limits.ttl_live_s,
               PRIO_EVENT: limits.ttl_event_s}
        with self._lock:
            db = self.db
            gaps: list[Gap] = []
            counts = Counter(self._counts)
            evicted = 0
            db.execute("BEGIN IMMEDIATE")
            try:
                for prio, seconds in ttl.items():
                    rows = db.execute("SELECT id, device, seq, received_at, size FROM messages "
                                      "WHERE prio = ? AND received_at < ?",
                                      (prio, now - seconds)).fetchall()
                    rows = [r for r in rows if r[0] not in self._held]
                    db.executemany("DELETE FROM messages WHERE id = ?", ((r[0],) for r in rows))
                    counts[prio] -= len(rows)
                    for _, device, seq, received_at, size in rows:
                        gaps.append(Gap(device, "ttl", seq, received_at, stored=True))
                        evicted += size
                grown = self._write_gaps(gaps, counts)
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            self._counts = counts
            self._bytes += grown - evicted
            self._report(gaps)
            return len(gaps)

    # --- figures ---------------------------------------------------------------------------

    def free_disk(self) -> int:
        st = os.statvfs(self.path.parent)
        return st.f_bavail * st.f_frsize

    def stats(self) -> dict[str, float | int]:
        with self._lock:
            oldest = self.db.execute(
                "SELECT received_at FROM messages ORDER BY id LIMIT 1").fetchone()
            return {"rows": sum(self._counts.values()), "bytes": self._bytes,
                    **{f"rows_{PRIO_NAMES[p]}": self._counts[p] for p in PRIO_NAMES},
                    "oldest_received_at": oldest[0] if oldest else 0.0}

    def window(self, device: str, key: str = "") -> tuple[int, int] | None:
        return self._windows.get(f"{device} {key}" if key else device)


@dataclass(frozen=True)
class Gap:
    device: str
    reason: str
    seq: int | None
    received_at: float
    stored: bool = False


def _is_corruption(exc: Exception) -> bool:
    text = str(exc).lower()
    return any(s in text for s in ("malformed", "not a database", "corrupt", "encrypted"))
