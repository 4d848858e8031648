"""Property-based fuzzing of the ingest's decode and verify path: it never crashes."""

from __future__ import annotations

import random

import cbor2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from citynode.gateway.pole import Later
from citynode.gateway.store import DUPLICATE, REPLAYED, STORED
from citynode.testing.gateway import Collector, GatewayProcess, Node, pole_link
from citynode.testing.keys import TestDevice

DEV = TestDevice("cn-0123456789ab")
HDEV = TestDevice("cn-0123456789ac", "HMAC256")
GOOD = DEV.envelope(seq=7)
cbor_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.binary(max_size=40)
    | st.text(max_size=20) | st.floats(allow_nan=False),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(
        st.integers(-10, 10) | st.text(max_size=5), inner, max_size=5), max_leaves=20)


@st.composite
def envelopes(draw):
    """COSE-shaped inputs: right tags, mostly right shapes, wrong in every possible place."""
    tag = draw(st.sampled_from([17, 18, 16, 98]))
    protected = draw(st.sampled_from([cbor2.dumps({1: -7}), cbor2.dumps({1: 5}), b"",
                                      b"\xff", cbor2.dumps([1])]) | st.binary(max_size=8))
    kid = draw(st.sampled_from([DEV.device_id.encode(), HDEV.device_id.encode(), b"\xff\xfe"])
               | st.binary(max_size=16))
    unprotected = draw(st.sampled_from([{4: kid}, {}, {4: "text"}]) | st.just({4: kid, 1: 2}))
    payload = draw(st.sampled_from([
        DEV.payload(draw(st.integers(0, 2**64))), cbor2.dumps({1: DEV.device_id, 2: -1}),
        cbor2.dumps({1: DEV.device_id, 2: 3, 7: "x"}), cbor2.dumps([]), b"\x00"])
        | st.binary(max_size=64) | cbor_values.map(cbor2.dumps))
    signature = draw(st.binary(min_size=0, max_size=70) | st.sampled_from([bytes(64), bytes(32)]))
    body = draw(st.sampled_from([[protected, unprotected, payload, signature],
                                 [protected, unprotected, payload], "x"]))
    return cbor2.dumps(cbor2.CBORTag(tag, body))


def mutations(data: bytes):
    return st.one_of(
        st.integers(0, len(data) - 1).map(lambda i: data[:i]),
        st.tuples(st.integers(0, len(data) - 1), st.integers(1, 255)).map(
            lambda t: data[:t[0]] + bytes([data[t[0]] ^ t[1]]) + data[t[0] + 1:]),
        st.binary(max_size=20).map(lambda extra: data + extra))


def make_ingest(tmp_path):
    return pole_link(tmp_path, [DEV, HDEV])


_SHARED: dict = {}


def shared_ingest(tmp_path_factory):
    if not _SHARED:
        _SHARED["rig"] = make_ingest(tmp_path_factory.mktemp("fuzz"))
    return _SHARED["rig"]


@settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_ingest_never_crashes_on_any_input(tmp_path_factory, data):
    ingest, metrics, store = shared_ingest(tmp_path_factory)
    counted = ("rejected_total", "verified_total", "unverified_total")
    before = sum(metrics.total(name) for name in counted)
    payload = data.draw(st.one_of(st.binary(max_size=300), envelopes(), mutations(GOOD)))
    topic = data.draw(st.sampled_from([f"citynode/up/{DEV.device_id}",
                                       f"citynode/up/{HDEV.device_id}", "citynode/up/x"]))
    item = ingest.handle(topic, payload, 1.0)
    if isinstance(item, Later):  # a kid the registry does not know: it waits, unstored
        assert metrics.total("unverified_total") > 0
    elif item is not None:  # accepted: it must be a genuine envelope of a registered device
        assert item.device in (DEV.device_id, HDEV.device_id)
        store.insert([item])
        assert item.outcome in (STORED, DUPLICATE, REPLAYED)
    assert metrics.value("rejected_total", reason="internal_error") == 0
    assert sum(metrics.total(name) for name in counted) == before + 1


def test_the_genuine_envelope_passes(tmp_path):
    ingest, metrics, store = make_ingest(tmp_path)
    assert ingest.handle(f"citynode/up/{DEV.device_id}", GOOD, 1.0).seq == 7
    hmac_env = HDEV.envelope(seq=3)
    assert ingest.handle(f"citynode/up/{HDEV.device_id}", hmac_env, 1.0).seq == 3
    store.close()


def test_daemon_survives_a_burst_of_garbage(tmp_path, local_broker, upstream_broker):
    rnd = random.Random(4)
    garbage = [rnd.randbytes(rnd.randint(1, 200)) for _ in range(15)]
    garbage += [GOOD[:i] for i in range(0, len(GOOD), len(GOOD) // 10)]
    garbage += [cbor2.dumps(cbor2.CBORTag(18, [b"", {}, b"", b""])), b"\x00" * 4097]
    collector, node = Collector(upstream_broker), Node(local_broker)
    gw = GatewayProcess(tmp_path / "gw", local_broker, upstream_broker, [DEV]).start()
    try:
        node.publish_all((DEV.device_id, g) for g in garbage)
        node.publish(DEV.device_id, GOOD)
        gw.wait_for(lambda: len(collector.envelopes()) == 1, what="the good one forwarded")
        gw.wait_for(lambda: gw.metric("rejected_total") == len(garbage))
        assert gw.metric("rejected_total", reason="internal_error") == 0
        assert gw.health()["status"] == "ok" and gw.proc.poll() is None
    finally:
        gw.kill()
        node.close()
        collector.close()
