"""Downlink relay: only operator-signed commands reach the node's topic."""

from __future__ import annotations

import threading
import time

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from paho.mqtt.enums import CallbackAPIVersion

from citynode import wire
from citynode.testing.gateway import GATEWAY_ID, PREFIX, GatewayProcess
from citynode.testing.keys import TestDevice


def subscriber(broker, topic):
    got: list[tuple[str, bytes]] = []
    ready = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"sub-{time.time_ns()}")
    client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
    client.on_subscribe = lambda *a: ready.set()
    client.on_message = lambda c, u, m: got.append((m.topic, m.payload))
    client.connect(broker.host, broker.port)
    client.loop_start()
    assert ready.wait(5)
    return client, got


def test_only_operator_signed_commands_are_relayed(tmp_path, local_broker, upstream_broker):
    operator = ec.generate_private_key(ec.SECP256R1())
    pem = tmp_path / "operator.pub.pem"
    pem.write_bytes(operator.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    dev = TestDevice.random()
    gw = GatewayProcess(tmp_path / "gw", local_broker, upstream_broker, [dev],
                        gateway_extra={"operator_key": str(pem)}).start()
    node_sub, relayed = subscriber(local_broker, "citynode/down/#")
    city, _ = subscriber(upstream_broker, "nothing")
    try:
        gw.wait_for(lambda: gw.health()["uplink"] == "up")
        time.sleep(0.3)  # the gateway subscribes right after CONNACK

        def command(seq, device=dev.device_id, key=operator, kid=wire.OPERATOR_KID):
            payload = wire.encode_command(device, seq, "lamp", {"level": 40}, int(time.time()))
            return wire.sign_es256(payload, kid, key)

        good = command(1)
        cases = {
            "good": good,
            "forged": command(2, key=ec.generate_private_key(ec.SECP256R1())),
            "not operator": command(3, kid=dev.device_id),
            "other device": command(4, device="cn-000000000001"),
            "garbage": b"\x01\x02",
        }
        topic = f"{PREFIX}/{GATEWAY_ID}/down/{dev.device_id}"
        for data in cases.values():
            city.publish(topic, data, qos=1).wait_for_publish(5)
        gw.wait_for(lambda: gw.metric("downlink_total") == len(cases), what="all commands seen")
        time.sleep(0.3)
        assert relayed == [(f"citynode/down/{dev.device_id}", good)]  # bytes untouched
        assert gw.metric("downlink_total", result="relayed") == 1
        assert gw.metric("downlink_total", result="bad_signature") == 2
        assert gw.metric("downlink_total", result="malformed") == 1
        assert gw.metric("downlink_total", result="wrong_device") == 1
    finally:
        gw.kill()
        for client in (node_sub, city):
            client.loop_stop()
            client.disconnect()


def test_a_node_gets_commands_only_at_a_pace_it_can_take(tmp_path):
    # at chip speed each command's signature check holds the node's loop for ~1-3 s
    from citynode.gateway.downlink import BURST, REFILL_S, DownlinkRelay
    from citynode.gateway.metrics import Metrics

    operator = ec.generate_private_key(ec.SECP256R1())
    now = [100.0]
    sent: list[str] = []
    metrics = Metrics()
    relay = DownlinkRelay(operator.public_key(), lambda t, d: sent.append(t) or True, metrics,
                          clock=lambda: now[0])

    def command(device, seq):
        payload = wire.encode_command(device, seq, "lamp", {"level": 40}, int(time.time()))
        return wire.sign_es256(payload, wire.OPERATOR_KID, operator)

    a, b = "cn-0000000000a1", "cn-0000000000b1"
    for seq in range(1, 11):
        relay.handle(a, command(a, seq))               # a script gone wrong
    relay.handle(b, command(b, 1))                     # its neighbour is not held back
    assert sent.count(wire.down_topic(a)) == BURST and sent.count(wire.down_topic(b)) == 1
    assert metrics.value("downlink_total", result="rate_limited") == 10 - BURST
    now[0] += REFILL_S
    relay.handle(a, command(a, 11))
    relay.handle(a, command(a, 12))
    assert sent.count(wire.down_topic(a)) == BURST + 1


def test_an_update_s_chunks_spend_the_pole_s_quota_not_the_node_s_command_pace(tmp_path):
    from citynode.gateway.downlink import BURST, OTA_BURST, OTA_PER_S, DownlinkRelay
    from citynode.gateway.metrics import Metrics

    operator = ec.generate_private_key(ec.SECP256R1())
    now = [100.0]
    sent: list[str] = []
    relay = DownlinkRelay(operator.public_key(), lambda t, d: sent.append(t) or True,
                          Metrics(), clock=lambda: now[0])

    def command(device, seq, name, args):
        payload = wire.encode_command(device, seq, name, args, int(time.time()))
        return wire.sign_es256(payload, wire.OPERATOR_KID, operator)

    a, b = "cn-0000000000a1", "cn-0000000000b1"
    for seq in range(1, OTA_BURST + 3):     # two nodes' chunks share the pole's burst
        device = a if seq % 2 else b
        relay.handle(device, command(device, seq, "ota_chunk", {"at": 0, "data": b"x"}))
    assert len(sent) == OTA_BURST > BURST
    relay.handle(a, command(a, 50, "lamp", {"level": 40}))     # commands keep their pace
    assert len(sent) == OTA_BURST + 1
    now[0] += 1 / OTA_PER_S
    relay.handle(b, command(b, 51, "ota_chunk", {"at": 0, "data": b"x"}))
    relay.handle(b, command(b, 52, "ota_chunk", {"at": 0, "data": b"x"}))
    assert len(sent) == OTA_BURST + 2


def test_a_stale_or_future_command_is_refused_as_expired(tmp_path):
    """A command the city's broker kept while the pole was offline (or one from an
    operator's clock far ahead) is not carried out; a fresh one is."""
    from citynode.gateway.downlink import MAX_AGE_S, MAX_AHEAD_S, DownlinkRelay
    from citynode.gateway.metrics import Metrics

    operator = ec.generate_private_key(ec.SECP256R1())
    sent: list[bytes] = []
    metrics = Metrics()
    now = 1_800_000_000.0
    relay = DownlinkRelay(operator.public_key(), lambda t, d: sent.append(d) or True, metrics,
                          wall_clock=lambda: now)
    device = "cn-0000000000a2"

    def command(seq: int, issued: float, expires: float | None = None) -> bytes:
        payload = wire.encode_command(device, seq, "lamp", {"level": 100}, int(issued),
                                      None if expires is None else int(expires))
        return wire.sign_es256(payload, wire.OPERATOR_KID, operator)

    stale, ahead = command(1, now - MAX_AGE_S - 1), command(2, now + MAX_AHEAD_S + 1)
    edge, fresh = command(3, now - MAX_AGE_S), command(4, now + MAX_AHEAD_S)
    # the operator's own deadline (citynode-ops --expires): passed, and not yet
    overdue, due = command(5, now - 30, now - 1), command(6, now - 30, now)
    for data in (stale, ahead, edge, fresh, overdue, due):
        relay.handle(device, data)
    assert sent == [edge, fresh, due]
    assert metrics.value("downlink_total", result="expired") == 3
