"""End to end: node -> local Mosquitto -> gateway (subprocess) -> upstream Mosquitto."""

from __future__ import annotations

import pytest

from citynode import wire
from citynode.testing.gateway import GATEWAY_ID, PREFIX, Collector, GatewayProcess, Node
from citynode.testing.keys import TestDevice, seq_of


@pytest.fixture
def devices():
    return [TestDevice.random(), TestDevice.random(), TestDevice.random("HMAC256")]


@pytest.fixture
def rig(tmp_path, local_broker, upstream_broker, devices):
    collector = Collector(upstream_broker)
    node = Node(local_broker)
    gw = GatewayProcess(tmp_path / "gw", local_broker, upstream_broker, devices)
    yield gw, node, collector
    gw.kill()
    node.close()
    collector.close()


def assert_per_device_order(keys):
    last: dict[str, int] = {}
    for device, seq in keys:
        assert seq > last.get(device, -1), f"{device} seq {seq} after {last[device]}"
        last[device] = seq


def test_end_to_end_forwards_untouched_with_metadata(rig, devices):
    gw, node, collector = rig
    gw.start()
    sent = {}
    for _ in range(5):
        for dev in devices:
            env = dev.envelope()
            sent[seq_of(env)] = env
            node.publish(dev.device_id, env, wait=False)
    gw.wait_for(lambda: len(collector.envelopes()) >= len(sent), what="forwarding")
    got = collector.envelopes()
    assert len(got) == len(sent)
    for topic, payload, props in got:
        device, seq = seq_of(payload)
        assert payload == sent[device, seq]  # bytes untouched: still verifiable end to end
        assert topic == f"{PREFIX}/{GATEWAY_ID}/up/{device}"
        assert props["gateway"] == GATEWAY_ID and props["historical"] == "0"
        assert props["received_at"].endswith("Z")
    assert_per_device_order(collector.keys())
    status = collector.of("status")
    assert status and status[-1][3] and b'"online"' in status[-1][1]
    gw.wait_for(lambda: gw.metric("buffered_messages") == 0, what="buffer emptied")
    assert gw.metric("forwarded_total") == len(sent)
    assert gw.metric("rejected_total") == 0
    assert gw.terminate() == 0
    assert b'"offline"' in collector.of("status")[-1][1]


def test_upstream_outage_loses_nothing_and_drains_in_order(rig, devices, upstream_broker):
    gw, node, collector = rig
    gw.start()
    upstream_broker.stop()
    gw.wait_for(lambda: gw.health()["uplink"] == "down", what="uplink down")
    batch = [(d.device_id, d.envelope()) for _ in range(40) for d in devices]
    node.publish_all(batch)
    gw.wait_for(lambda: gw.metric("buffered_messages") == len(batch), what="all buffered")
    upstream_broker.start()
    gw.wait_for(lambda: gw.metric("buffered_messages") == 0, what="drained")
    gw.wait_for(lambda: set(collector.keys()) >= {seq_of(e) for _, e in batch},
                what="collector got everything")
    keys = collector.keys()
    assert set(keys) == {seq_of(e) for _, e in batch}
    historical = [seq_of(p) for _, p, u in collector.envelopes() if u["historical"] == "1"]
    assert set(historical) == set(keys)  # buffered during the outage: the backlog lane
    assert_per_device_order(historical)


@pytest.fixture
def outage(tmp_path, local_broker, upstream_broker, devices):
    """A gateway whose uplink is down, its backlog lane limited to 50/s: (gateway, a node
    publisher, the city's collector)."""
    collector, node = Collector(upstream_broker), Node(local_broker)
    gw = GatewayProcess(tmp_path / "gw", local_broker, upstream_broker, devices,
                        upstream_extra={"backlog_max_per_s": 50})
    try:
        gw.start()
        upstream_broker.stop()
        gw.wait_for(lambda: gw.health()["uplink"] == "down", what="uplink down")
        yield gw, node, collector
    finally:
        gw.kill()
        node.close()
        collector.close()


def test_live_readings_overtake_a_rate_limited_backlog(outage, upstream_broker, devices):
    gw, node, collector = outage
    backlog = [(d.device_id, d.envelope()) for _ in range(50) for d in devices]
    node.publish_all(backlog)
    gw.wait_for(lambda: gw.metric("buffered_messages") == len(backlog), what="buffered")
    upstream_broker.start()
    gw.wait_for(lambda: gw.health()["uplink"] == "up", what="uplink up")
    live = [(d.device_id, d.envelope()) for d in devices]
    node.publish_all(live)
    gw.wait_for(lambda: set(collector.keys()) >= {seq_of(e) for _, e in backlog + live},
                what="everything delivered")
    arrival = collector.envelopes()
    live_keys = {seq_of(e) for _, e in live}
    positions = [i for i, (_, p, _) in enumerate(arrival) if seq_of(p) in live_keys]
    assert max(positions) < len(backlog) / 2  # well before the backlog finished
    assert all(arrival[i][2]["historical"] == "0" for i in positions)
    assert_per_device_order([seq_of(p) for _, p, u in arrival if u["historical"] == "1"])


def test_an_event_buffered_in_an_outage_goes_before_the_backlog(outage, upstream_broker,
                                                               devices):
    # a gunshot at the end of an uplink outage: when the uplink returns, its event must
    # not wait for the outage's readings
    gw, node, collector = outage
    backlog = [(d.device_id, d.envelope()) for _ in range(40) for d in devices]
    shooter = devices[0]
    shot = (shooter.device_id, shooter.envelope(kind=wire.KIND_EVENT))
    node.publish_all([*backlog, shot])
    gw.wait_for(lambda: gw.metric("buffered_messages") == len(backlog) + 1, what="buffered")
    upstream_broker.start()
    gw.wait_for(lambda: set(collector.keys()) >= {seq_of(e) for _, e in [*backlog, shot]},
                timeout=30, what="everything delivered")
    arrival = [seq_of(p) for _, p, _ in collector.envelopes()]
    assert arrival.index(seq_of(shot[1])) < 5, arrival[:10]   # not after 120 readings
    assert len(arrival) == len(set(arrival))                  # and sent once
    assert_per_device_order([k for k in arrival if k != seq_of(shot[1])])


def test_sighup_reloads_the_registry(rig, devices):
    gw, node, collector = rig
    gw.start()
    late = TestDevice.random()
    node.publish(late.device_id, late.envelope())    # before the registry knows it: it waits
    # counted when it arrives, kept at the store's next commit: wait for the keeping
    gw.wait_for(lambda: gw.health()["unverified"] == 1, what="the envelope kept waiting")
    assert gw.metric("unverified_total", reason="unknown_device") == 1
    assert gw.metric("rejected_total") == 0
    late.register(gw.registry)
    gw.signal(__import__("signal").SIGHUP)
    gw.wait_for(lambda: gw.metric("registry_reloads_total") == 1)
    node.publish(late.device_id, late.envelope())
    gw.wait_for(lambda: {(late.device_id, 1), (late.device_id, 2)} <= set(collector.keys()),
                what="the waiting envelope and the next one, after the reload")
    assert gw.health()["unverified"] == 0
    from citynode.registry import revoke
    revoke(gw.registry, devices[0].device_id)
    gw.signal(__import__("signal").SIGHUP)
    gw.wait_for(lambda: gw.metric("registry_reloads_total") == 2)
    node.publish(devices[0].device_id, devices[0].envelope())
    gw.wait_for(lambda: gw.metric("rejected_total", reason="revoked") == 1)


def test_rejections_by_reason(rig, devices):
    gw, node, collector = rig
    gw.start()
    dev, other = devices[0], devices[1]
    revoked = TestDevice.random()
    revoked.register(gw.registry, status="revoked")
    unknown = TestDevice.random()
    good = dev.envelope()
    top = dev.envelope(seq=10_000)
    forged = bytearray(dev.envelope())
    forged[-5] ^= 0xFF  # flip a signature byte
    stolen_kid = wire.sign_es256(other.payload(1, device=dev.device_id), dev.device_id,
                                 other.key)  # signed with another device's key
    cases = [
        ("oversized", dev.device_id, b"\xd2" + bytes(5000)),
        ("malformed", dev.device_id, b"\xff\x00garbage"),
        ("malformed", other.device_id, dev.envelope()),  # published on another device's topic
        ("bad_signature", dev.device_id, bytes(forged)),
        ("bad_signature", dev.device_id, stolen_kid),
        ("duplicate", dev.device_id, top),
        ("replayed", dev.device_id, dev.envelope(seq=0)),
    ]
    node.publish(dev.device_id, good)
    node.publish(dev.device_id, top)  # moves the replay window past seq 0
    gw.wait_for(lambda: len(collector.envelopes()) == 2)
    gw.signal(__import__("signal").SIGHUP)  # pick up the revoked device
    gw.wait_for(lambda: gw.metric("registry_reloads_total") == 1)
    cases.append(("revoked", revoked.device_id, revoked.envelope()))
    for _, device, data in cases:
        node.publish(device, data)
    expected: dict[str, int] = {}
    for reason, _, _ in cases:
        expected[reason] = expected.get(reason, 0) + 1
    node.publish(unknown.device_id, unknown.envelope())  # not rejected: it waits (registry lag)
    gw.wait_for(lambda: gw.metric("rejected_total") == len(cases), what="all rejections")
    gw.wait_for(lambda: gw.metric("unverified_total", reason="unknown_device") == 1)
    for reason, n in expected.items():
        assert gw.metric("rejected_total", reason=reason) == n, reason
    assert len(collector.envelopes()) == 2  # nothing rejected got through
    assert "rejected (bad_signature)" in gw.log()
    # acked: nothing waits in the local broker to be redelivered after a restart
    gw.terminate()
    gw.start()
    import time
    time.sleep(0.5)
    assert gw.metric("received_total") == 0


def test_status_command(rig, devices):
    import subprocess
    import sys

    gw, node, collector = rig
    gw.start()
    node.publish(devices[0].device_id, devices[0].envelope())
    gw.wait_for(lambda: gw.metric("forwarded_total") == 1)
    out = subprocess.run([sys.executable, "-m", "citynode.gateway.cli", "status", "--config",
                          str(gw.config)], capture_output=True, text=True, timeout=20)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"gateway {GATEWAY_ID}: OK" in out.stdout and "uplink up" in out.stdout
    gw.terminate()
    out = subprocess.run([sys.executable, "-m", "citynode.gateway.cli", "status", "--config",
                          str(gw.config)], capture_output=True, text=True, timeout=20)
    assert out.returncode == 1 and "daemon not answering" in out.stdout
