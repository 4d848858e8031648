"""Registry lag loses nothing (issue 12): envelopes of a node the pole's registry does not
know yet, or whose key file it cannot read, wait durably and are checked again at the next
registry reload, instead of being acknowledged and dropped."""

from __future__ import annotations

import os
import time

from citynode import wire
from citynode.gateway.pole import Later, _Pending
from citynode.gateway.store import Store
from citynode.gateway.unverified import Unverified
from citynode.testing.gateway import pole_link
from citynode.testing.keys import TestDevice, seq_of

KNOWN = TestDevice("cn-0123456789c0")
NEW = TestDevice("cn-0123456789c1")          # provisioned after the pole's last reload


def receive(link, device: TestDevice, data: bytes) -> object:
    """What the paho thread and the writer do with one message (qos 0: no ack to send)."""
    item = link.handle(wire.up_topic(device.device_id), data, time.time())
    link.commit([_Pending(item, 1, qos=0, generation=0)])
    return item


def stored_keys(store: Store) -> set[tuple[str, int]]:
    return {(row.device, row.seq) for row in store.scan()}


def test_a_new_nodes_envelopes_wait_for_the_registry_then_flow(tmp_path):
    link, metrics, store = pole_link(tmp_path, [KNOWN])
    early = [NEW.envelope() for _ in range(3)]
    assert all(isinstance(receive(link, NEW, e), Later) for e in early)
    receive(link, KNOWN, KNOWN.envelope())
    assert stored_keys(store) == {(KNOWN.device_id, 1)}
    assert metrics.total("rejected_total") == 0 and link.unverified.count() == 3
    # a restart in between: what waits is on disk, not in the process
    link.unverified.close()
    link.unverified = Unverified(store.path)
    assert link.unverified.count() == 3
    link.retry_unverified()                          # a reload that still lacks the node
    assert link.unverified.count() == 3
    NEW.register(tmp_path / "registry")
    link.verifier.registry.load()                    # SIGHUP
    assert link.retry_unverified() == 3
    assert stored_keys(store) == {(KNOWN.device_id, 1)} | {seq_of(e) for e in early}
    assert link.unverified.count() == 0
    assert not isinstance(receive(link, NEW, NEW.envelope()), Later)   # known now: at once
    assert (NEW.device_id, 4) in stored_keys(store)


def test_an_unreadable_key_file_holds_the_envelopes_until_it_is_fixed(tmp_path):
    hmac = TestDevice("cn-0123456789c2", "HMAC256")
    link, metrics, store = pole_link(tmp_path, [hmac])
    key = tmp_path / "registry" / "keys" / f"{hmac.device_id}.hex"
    key.rename(key.with_suffix(".moved"))            # a sync that has not brought it yet
    link.verifier.registry.load()
    assert isinstance(receive(link, hmac, hmac.envelope()), Later)
    key.with_suffix(".moved").rename(key)
    link.verifier.registry.load()
    assert link.retry_unverified() == 1 and link.unverified.count() == 0


def test_what_turns_out_forged_is_rejected_at_the_retry(tmp_path):
    link, metrics, store = pole_link(tmp_path, [])
    impostor = TestDevice(NEW.device_id)             # another key for the same id
    receive(link, NEW, impostor.envelope())
    NEW.register(tmp_path / "registry")
    link.verifier.registry.load()
    assert link.retry_unverified() == 0
    assert metrics.total("rejected_total") == 1 and link.unverified.count() == 0
    assert store.scan() == []


def test_waiting_is_bounded_per_device_in_total_and_in_age(tmp_path):
    now = [1000.0]
    kept = Unverified(tmp_path / "db", max_rows=5, max_per_device=3, max_age_s=60,
                      clock=lambda: now[0])
    flood = [("cn-0000000000aa", "t", bytes([i]), 1000.0 + i) for i in range(4)]
    assert kept.keep(flood) == 1                     # one made-up kid: 3 at most
    assert [w.data for w in kept.waiting()] == [b"\x01", b"\x02", b"\x03"]
    others = [(f"cn-00000000000{i}", "t", b"o", 1010.0 + i) for i in range(3)]
    assert kept.keep(others) == 1                    # 6 > 5: the oldest goes
    assert [w.data for w in kept.waiting()][:2] == [b"\x02", b"\x03"]
    now[0] = 1000.0 + 63.5                           # 1002 and 1003 are past 60 s
    assert kept.expire() == 2 and kept.count() == 3
    assert os.path.exists(tmp_path / "db")


def test_a_rekeyed_node_starts_a_window_of_its_own(tmp_path):
    # Replay state per (device, key): a node wiped and given a new key counts from 0
    # again and must not be dropped as replayed; the old key's window stays, so if that
    # key came back (a rollback), its old envelopes would still be refused.
    node = TestDevice("cn-0123456789c3")
    link, metrics, store = pole_link(tmp_path, [node])
    old_envelopes = [node.envelope() for _ in range(3)]
    for e in old_envelopes:
        receive(link, node, e)
    old_id = link.verifier.registry().key_id(node.device_id)
    old_key = node.key
    node.key = TestDevice("cn-0123456789c3").key       # the new key, registered by force
    node.seq = 0
    node.register(tmp_path / "registry")
    link.verifier.registry.load()
    new_id = link.verifier.registry().key_id(node.device_id)
    fresh = node.envelope()                             # seq 1 again, new key
    receive(link, node, fresh)
    assert seq_of(fresh) == (node.device_id, 1)
    assert len(store.scan()) == 4 and metrics.total("rejected_total") == 0
    node.key = old_key                                  # the old key back
    node.register(tmp_path / "registry")
    link.verifier.registry.load()
    receive(link, node, old_envelopes[0])
    assert metrics.value("rejected_total", reason="duplicate") == 1
    assert len(store.scan()) == 4
    # and the windows survive a restart
    reopened = Store(store.path, link.config.store)
    assert old_id != new_id
    assert reopened.window(node.device_id, old_id) == (3, 0b111)
    assert reopened.window(node.device_id, new_id) == (1, 1)


def test_a_window_from_before_keys_were_told_apart_is_kept(tmp_path):
    node = TestDevice("cn-0123456789c4")
    link, metrics, store = pole_link(tmp_path, [node])
    first = node.envelope()
    item = link.verifier.check(wire.up_topic(node.device_id), first, time.time())
    item.key = ""                                       # as an older gateway stored it
    store.insert([item])
    receive(link, node, first)                          # the same envelope, now with its key
    assert metrics.value("rejected_total", reason="duplicate") == 1
