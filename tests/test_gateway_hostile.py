"""A node that signs nonsense holds its own key: the gateway must outlive what it signs.

Issue 12: a validly signed sequence number of 2**64 - 1 made the store's commit fail
(OverflowError), the daemon exit, systemd restart it and the broker redeliver the same
message: no other node's reading reached the city.
"""

from __future__ import annotations

import time

import cbor2

from citynode import wire
from citynode.gateway.pole import _Pending
from citynode.gateway.store import REPLAYED, STORED, Incoming
from citynode.testing.gateway import Collector, GatewayProcess, Node, pole_link
from citynode.testing.keys import TestDevice
from tests.vectors.make_wire_vectors import high_s_twin, padded

BAD = TestDevice("cn-0123456789b0")     # the hostile (or buggy) node
GOOD = TestDevice("cn-0123456789b1")    # its neighbour on the pole


def signed(device: TestDevice, **fields) -> bytes:
    """A genuine signature over a payload holding whatever `fields` say."""
    body = cbor2.loads(device.payload(1))
    body.update({getattr(wire, "K_" + k.upper()): v for k, v in fields.items()})
    return wire.sign_es256(cbor2.dumps(body), device.device_id, device.key)


def test_validly_signed_nonsense_neither_ends_the_daemon_nor_holds_the_others(
        tmp_path, local_broker, upstream_broker):
    hostile = [signed(BAD, seq=2**64 - 1),      # the case: a plain CBOR uint
               signed(BAD, seq=2**64),          # a bignum (CBOR tag 2)
               signed(BAD, seq=2**200),
               signed(BAD, seq=2**53),          # one above the bound
               signed(BAD, seq=5, time=2**70),
               signed(BAD, seq=6, uptime=2**64)]
    jumps = [signed(BAD, seq=10), signed(BAD, seq=10 + 2**40),   # a jump far past the window
             signed(BAD, seq=2**53 - 1)]                          # the last it can ever use
    collector, node = Collector(upstream_broker), Node(local_broker)
    gw = GatewayProcess(tmp_path / "gw", local_broker, upstream_broker, [BAD, GOOD]).start()
    try:
        for k, env in enumerate(hostile + jumps):
            node.publish(BAD.device_id, env)
            node.publish(GOOD.device_id, GOOD.envelope(seq=k + 1))
        node.publish(BAD.device_id, signed(BAD, seq=11))        # below its top now: replayed
        gw.wait_for(lambda: sum(d == GOOD.device_id for d, _ in collector.keys()) == 9,
                    what="every reading of the good node forwarded")
        gw.wait_for(lambda: gw.metric("rejected_total") == len(hostile) + 1,
                    what="the hostile envelopes counted")
        assert gw.metric("rejected_total", reason="malformed") == len(hostile)
        assert gw.metric("rejected_total", reason="replayed") == 1
        assert sorted(s for d, s in collector.keys() if d == BAD.device_id) == [
            10, 10 + 2**40, 2**53 - 1]
        assert gw.metric("rejected_total", reason="internal_error") == 0
        assert gw.health()["status"] == "ok" and gw.proc.poll() is None
    finally:
        gw.kill()
        node.close()
        collector.close()


def test_an_item_the_store_refuses_is_rejected_alone(tmp_path):
    """Past wire's bounds nothing verified can overflow the store; this builds such an
    item by hand (a fault no genuine envelope can produce now) to show that, should one
    get through, it is rejected by itself and its batch is stored and acknowledged."""
    ingest, metrics, store = pole_link(tmp_path, [BAD])
    now = time.time()
    fine = [Incoming(BAD.device_id, seq, b"x", now) for seq in (1, 2)]
    poison = Incoming(BAD.device_id, 2**70, b"x", now)
    batch = [_Pending(item, mid, qos=0, generation=0)
             for mid, item in enumerate([fine[0], poison, fine[1]])]
    ingest.commit(batch)
    assert [p.item for p in batch] == [fine[0], None, fine[1]]
    assert [i.outcome for i in fine] == [STORED, STORED]
    assert metrics.value("rejected_total", reason="internal_error") == 1
    assert [r.seq for r in store.scan()] == [1, 2]
    store.close()


def test_a_forward_jump_of_any_size_is_one_step_for_the_replay_window(tmp_path):
    _, _, store = pole_link(tmp_path, [BAD])
    now = time.time()
    items = [Incoming(BAD.device_id, s, b"x", now) for s in (3, 2**52, 2**52 - 1, 4)]
    store.insert(items)   # 2**52 bits of window shift would exhaust the memory
    assert [i.outcome for i in items] == [STORED, STORED, STORED, REPLAYED]
    assert store.window(BAD.device_id)[0] == 2**52
    store.close()


def test_a_twin_made_without_the_key_is_refused(tmp_path):
    """From a genuine envelope anyone can make others that verify (the high-S twin of its
    signature, padding beside the kid). Accepted, a twin sent first would be stored in the
    genuine one's place, with other bytes than the node signed (another hash downstream)."""
    ingest, metrics, store = pole_link(tmp_path, [GOOD])
    topic = wire.up_topic(GOOD.device_id)
    genuine = GOOD.envelope(seq=1)
    assert ingest.handle(topic, high_s_twin(genuine), 1.0) is None
    assert ingest.handle(topic, padded(genuine), 1.0) is None
    assert metrics.value("rejected_total", reason="malformed") == 2
    item = ingest.handle(topic, genuine, 1.0)
    store.insert([item])
    assert item.outcome == STORED and item.data == genuine
    store.close()


def test_a_node_flooding_its_topic_spends_its_own_budget(tmp_path, local_broker,
                                                         upstream_broker):
    """Mosquitto has no per-client rate limit: a node (or whoever holds its broker
    password) can publish as fast as the link goes. The gateway lets one node's topic
    send local.device_burst at once, then local.device_rate_per_s, and rejects the rest
    before verifying it: the neighbour's readings still reach the city, the flood does
    not, and the daemon's work for it is a count."""
    flooder, neighbour = TestDevice.random(), TestDevice.random()
    flood = [flooder.envelope() for _ in range(3000)]
    collector, node = Collector(upstream_broker), Node(local_broker)
    gw = GatewayProcess(tmp_path / "gw", local_broker, upstream_broker, [flooder, neighbour],
                        local_extra={"device_burst": 200, "device_rate_per_s": 1}).start()
    try:
        started = time.monotonic()
        items = [(flooder.device_id, env) for env in flood]
        for k in range(20):  # the neighbour's readings, spread through the flood
            items.insert(150 * k + 100, (neighbour.device_id, neighbour.envelope()))
        node.publish_all(items)
        gw.wait_for(lambda: gw.metric("received_total") == len(items), what="all received")
        gw.wait_for(lambda: sum(d == neighbour.device_id for d, _ in collector.keys()) == 20,
                    what="every reading of the neighbour forwarded")
        elapsed = time.monotonic() - started
        passed = gw.metric("verified_total") - 20
        assert 200 <= passed <= 200 + elapsed + 1
        assert gw.metric("rejected_total", reason="rate_limited") == len(flood) - passed
        gw.wait_for(lambda: sum(d == flooder.device_id for d, _ in collector.keys()) == passed,
                    what="what the budget let through forwarded")
        assert gw.health()["status"] == "ok" and gw.proc.poll() is None
    finally:
        gw.kill()
        node.close()
        collector.close()
