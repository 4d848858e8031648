import json
import sqlite3

from citynode.gateway.config import StoreLimits
from citynode.gateway.store import (
    DROPPED,
    DUPLICATE,
    PRIO_BACKFILL,
    PRIO_EVENT,
    PRIO_GAP,
    PRIO_LIVE,
    REPLAYED,
    ROW_OVERHEAD,
    STORED,
    Incoming,
    Store,
)

NOW = 1_800_000_000.0


def item(device, seq, event=False, data=b"x" * 36, received_at=NOW, node_time=None):
    return Incoming(device, seq, data, received_at, event=event,
                    node_time=int(received_at) if node_time is None else node_time)


def open_store(tmp_path, drops=None, **limits):
    base = dict(min_free_bytes=0, replay_window=64)
    def on_drop(device, reason, n, stored):
        if drops is not None:
            drops.append((device, reason, n))

    return Store(tmp_path / "gateway.db", StoreLimits(**{**base, **limits}), on_drop=on_drop,
                 clock=lambda: NOW)


def outcomes(items):
    return [i.outcome for i in items]


def test_replay_window_dedupes_and_accepts_late_spool_data_once(tmp_path):
    store = open_store(tmp_path)
    assert outcomes(store.insert([item("a", 10), item("a", 12)])) == [STORED, STORED]
    # 11 arrives late (from the node's spool): accepted once, as backfill
    res = store.insert([item("a", 11), item("a", 11), item("a", 12), item("b", 12)])
    assert outcomes(res) == [STORED, DUPLICATE, DUPLICATE, STORED]
    assert res[0].prio == PRIO_BACKFILL
    store.insert([item("a", 200)])
    assert outcomes(store.insert([item("a", 200 - 64)])) == [REPLAYED]
    assert outcomes(store.insert([item("a", 200 - 63)])) == [STORED]
    store.close()
    # the window is committed with the rows: it survives a restart
    store = open_store(tmp_path)
    assert outcomes(store.insert([item("a", 11), item("a", 137), item("a", 150)])) == \
        [REPLAYED, DUPLICATE, STORED]
    assert store.stats()["rows"] == 7


def test_classes_and_lanes(tmp_path):
    store = open_store(tmp_path)
    res = store.insert([item("a", 1, event=True), item("a", 2),
                        item("b", 1, node_time=int(NOW) - 3600),
                        item("c", 1, received_at=NOW - 500)])
    assert [i.prio for i in res] == [PRIO_EVENT, PRIO_LIVE, PRIO_BACKFILL, PRIO_LIVE]
    ids = [r.id for r in store.scan()]
    # uplink came up after the first row: row 1 is backlog, backfill always is
    live = store.live_rows(0, ids[0], 10)
    assert [(r.device, r.seq) for r in live] == [("a", 2), ("c", 1)]
    backlog = store.backlog_rows(0, ids[0], 10)
    assert [(r.device, r.seq) for r in backlog] == [("a", 1), ("b", 1)]
    assert store.backlog_rows(backlog[0].id, ids[0], 10) == backlog[1:]
    assert store.live_rows(live[0].id, ids[0], 10) == live[1:]
    assert store.rows([ids[3], ids[1]]) == [live[0], live[1]]
    assert store.delete([r.id for r in live]) == 2
    assert store.stats()["rows"] == 2


def test_quota_evicts_backfill_then_live_then_events_and_writes_gaps(tmp_path):
    drops = []
    row = 36 + ROW_OVERHEAD
    store = open_store(tmp_path, drops, max_rows=1000, max_bytes=row * 6 + 10_000)
    store.insert([item("e", 1, event=True), item("e", 2, event=True)])
    store.insert([item("l", s) for s in range(1, 4)])
    store.insert([item("b", 1, node_time=0)])
    assert store.stats()["rows"] == 6
    # shrink the quota to 4 rows (gap records need a little room too)
    store.limits = StoreLimits(max_rows=4 + 2, max_bytes=10**9, min_free_bytes=0,
                               replay_window=64)
    res = store.insert([item("l", 4), item("l", 5)])
    assert outcomes(res) == [STORED, STORED]
    rows = store.scan()
    kept = {(r.device, r.seq) for r in rows if r.prio != PRIO_GAP}
    assert ("b", 1) not in kept and ("l", 1) not in kept  # backfill first, then oldest live
    assert {("e", 1), ("e", 2)} <= kept
    # the store is full of events and live readings: a new live reading evicts an old one,
    # never an event
    store.limits = StoreLimits(max_rows=4, max_bytes=10**9, min_free_bytes=0, replay_window=64)
    store.insert([item("l", 6)])
    gaps = [json.loads(r.data) for r in store.scan() if r.prio == PRIO_GAP]
    assert {("e", 1), ("e", 2)} <= {(r.device, r.seq) for r in store.scan()}
    by_device = {g["device"]: g for g in gaps}
    assert by_device["b"]["count"] == 1 and by_device["b"]["reason"] == "quota"
    assert by_device["l"]["count"] >= 2 and by_device["l"]["first_seq"] == 1
    assert sum(n for d, r, n in drops if d == "l") == by_device["l"]["count"]
    assert all(r == "quota" for _, r, _ in drops)


def test_incoming_is_dropped_when_only_events_remain(tmp_path):
    drops = []
    store = open_store(tmp_path, drops, max_rows=2)
    store.insert([item("e", 1, event=True), item("e", 2, event=True)])
    res = store.insert([item("l", 1)])
    assert outcomes(res) == [DROPPED]
    assert drops == [("l", "quota", 1)]
    rows = store.scan()
    assert sorted(r.prio for r in rows) == [PRIO_EVENT, PRIO_EVENT, PRIO_GAP]


def test_ttl_sweep_counts_and_reports(tmp_path):
    drops = []
    store = open_store(tmp_path, drops, ttl_live_s=100, ttl_event_s=1000)
    store.insert([item("a", 1, received_at=NOW - 200), item("a", 2, event=True,
                                                           received_at=NOW - 200),
                  item("a", 3)])
    assert store.sweep_ttl() == 1
    assert drops == [("a", "ttl", 1)]
    prios = sorted(r.prio for r in store.scan())
    assert prios == [PRIO_LIVE, PRIO_EVENT, PRIO_GAP]


def test_corrupt_database_is_quarantined_and_a_fresh_one_started(tmp_path):
    db = tmp_path / "gateway.db"
    db.write_bytes(b"this is not sqlite" * 500)
    store = open_store(tmp_path)
    assert len(store.quarantined) == 1 and store.quarantined[0].read_bytes().startswith(b"this")
    assert store.quarantined_files() == 1
    assert outcomes(store.insert([item("a", 1)])) == [STORED]
    store.close()
    assert sqlite3.connect(db).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_truncated_database_is_quarantined(tmp_path):
    store = open_store(tmp_path)
    store.insert([item("a", s, data=bytes(3000)) for s in range(1, 200)])
    store.close()
    db = tmp_path / "gateway.db"
    for suffix in ("-wal", "-shm"):
        (tmp_path / f"gateway.db{suffix}").unlink(missing_ok=True)
    data = bytearray(db.read_bytes())
    data[4096:8192] = b"\xff" * 4096  # smash a b-tree page
    db.write_bytes(bytes(data))
    store = open_store(tmp_path)
    assert store.quarantined and store.stats()["rows"] == 0


class NearlyFullDisk(Store):
    """A disk below its free minimum: a fault a test machine's disk cannot make on cue."""

    def free_disk(self) -> int:
        return 1


def test_below_min_free_disk_each_batch_frees_what_it_adds(tmp_path):
    drops = []
    store = open_store(tmp_path, drops)
    store.insert([item("a", s) for s in range(1, 11)])
    full = NearlyFullDisk(tmp_path / "gateway.db", StoreLimits(min_free_bytes=10**6,
                                                               replay_window=64),
                          on_drop=lambda d, r, n, stored: drops.append((d, r, n)))
    store.close()
    full.insert([item("a", 11), item("a", 12)])
    rows = [r for r in full.scan() if r.prio != PRIO_GAP]
    assert [r.seq for r in rows] == list(range(3, 13))  # the two oldest made room
    assert drops == [("a", "quota", 2)]
