"""The whole node on an emulated board: sample -> aggregate -> encode -> sign -> send.

The board runs firmware/ unmodified (main.py) against the simulated parts and a
real Mosquitto; a host subscriber checks what arrives: every envelope verifies with
the node's public key, readings match the scenario, and nothing is lost or reordered
across a Wi-Fi outage or a power cut.
"""

from __future__ import annotations

import queue
import time

import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from citynode import wire
from tests.emu import WINDOW_S, mpremote, start_node, wait_for


class Subscriber:
    """A host client on the pole's broker that collects the node's envelopes."""

    def __init__(self, broker):
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="test-sub")
        self.client.on_message = lambda c, u, m: self.messages.put((m.topic, m.payload))
        self.client.connect(broker.host, broker.port)
        self.client.subscribe("citynode/up/#", qos=1)
        self.client.loop_start()

    def take(self, count: int, timeout: float) -> list[tuple[str, bytes]]:
        got, deadline = [], time.monotonic() + timeout
        while len(got) < count and time.monotonic() < deadline:
            try:
                got.append(self.messages.get(timeout=0.5))
            except queue.Empty:
                pass
        return got

    def close(self):
        self.client.loop_stop()
        self.client.disconnect()


def _boot_app(board):
    """A soft reset in the friendly REPL runs main.py, as at power-on."""
    import serial

    with serial.Serial(board.link, timeout=0.2) as port:
        port.write(b"\x02\x04")
    wait_for(lambda: board.control("status")["mode"] == "running", what="the app")


def _open(envelope: bytes, key) -> wire.Payload:
    env = wire.decode_envelope(envelope)
    wire.verify_es256(env, key)
    return wire.decode_payload(env)


@pytest.fixture
def node(tmp_path, local_broker):
    emu, board, device, key = start_node(tmp_path, local_broker)
    sub = Subscriber(local_broker)
    yield board, device, key, sub
    sub.close()
    emu.stop()


def test_readings_arrive_signed_with_the_scenario_values(node):
    board, device, key, sub = node
    _boot_app(board)
    msgs = sub.take(2, timeout=4 * WINDOW_S + 20)
    assert len(msgs) == 2, "no window readings arrived"
    topic, envelope = msgs[-1]
    assert topic == f"citynode/up/{device}"
    body = _open(envelope, key)
    assert body.device == device and body.kind == wire.KIND_READINGS
    values = {r[0]: r.get(2) for r in body.records if 2 in r}
    world = board.control("status")["peripherals"]["scenario"]
    assert values["light/lux"] == pytest.approx(world["lux"], rel=0.05, abs=1)
    assert values["env/temperature"] == pytest.approx(world["temperature"], abs=0.3)
    assert values["env/humidity"] == pytest.approx(world["humidity"], abs=2)
    assert values["env/pressure"] == pytest.approx(world["pressure"], abs=50)
    assert 20 < values["noise/laeq"] < 100
    assert values["node/heap_free"] > 10_000
    assert {"noise/lamax", "noise/l90", "node/boot", "node/spool"} <= set(values)


def test_nothing_lost_across_a_wifi_outage(node):
    board, device, key, sub = node
    _boot_app(board)
    first = sub.take(1, timeout=3 * WINDOW_S + 20)
    assert first, "no first window"
    board.control("wifi", up=False)
    time.sleep(3 * WINDOW_S)
    board.control("wifi", up=True)
    time.sleep(2 * WINDOW_S)
    msgs = first + sub.take(100, timeout=WINDOW_S + 15)
    bodies = [_open(m[1], key) for m in msgs]
    seqs = [b.seq for b in bodies]
    assert sum(b.kind == wire.KIND_READINGS for b in bodies) >= 5
    unique = sorted(set(seqs))
    assert seqs == sorted(seqs), "per-device order kept"
    assert unique == list(range(unique[0], unique[0] + len(unique))), f"gap in {unique}"


def _records(body: wire.Payload) -> dict:
    return {r[0]: r.get(2, r.get(3)) for r in body.records}


def _command(device: str, seq: int, name: str, args: dict, key) -> bytes:
    return wire.sign_es256(wire.encode_command(device, seq, name, args, int(time.time())),
                           wire.OPERATOR_KID, key)


def test_downlink_commands_need_the_operator_key_and_are_not_replayed(node, local_broker):
    board, device, key, sub = node
    operator = ec.generate_private_key(ec.SECP256R1())
    point = operator.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    mpremote(board.link, "exec", "from node.keys import NodeKeys\n"
             f"NodeKeys().install_operator_key(bytes.fromhex({point.hex()!r}))")
    _boot_app(board)
    assert sub.take(1, timeout=3 * WINDOW_S + 20), "the node is not publishing"

    sender = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="operator")
    sender.connect(local_broker.host, local_broker.port)
    sender.loop_start()
    topic = f"citynode/down/{device}"

    def answers(timeout=15) -> list[object]:
        found, deadline = [], time.monotonic() + timeout
        while not found and time.monotonic() < deadline:
            for _, envelope in sub.take(1, timeout=1):
                recs = _records(_open(envelope, key))
                found += [v for n, v in recs.items() if n.startswith("cmd/")]
        return found

    lamp = _command(device, 1, "lamp", {"level": 40}, operator)
    sender.publish(topic, lamp, qos=1).wait_for_publish()
    assert answers() == ["ok"]
    lamp_level = board.control("status")["peripherals"]["lamp"]
    assert lamp_level == pytest.approx(0.40, abs=0.01)

    sender.publish(topic, lamp, qos=1).wait_for_publish()           # the same bytes again
    assert answers() == ["replayed"]
    forged = _command(device, 2, "lamp", {"level": 100},
                      ec.generate_private_key(ec.SECP256R1()))
    sender.publish(topic, forged, qos=1).wait_for_publish()
    assert answers() == ["bad_signature"]
    assert board.control("status")["peripherals"]["lamp"] == pytest.approx(0.40, abs=0.01)
    sender.loop_stop()
    sender.disconnect()


def test_an_impulse_arrives_at_once_with_its_time(tmp_path, local_broker):
    # a gunshot 12 scenario seconds after the emulator starts
    scenario = {"events": [{"time": 12.0, "kind": "gunshot", "level_db": 118.0}]}
    emu, board, device, key = start_node(tmp_path, local_broker, scenario=scenario,
                                          extra={"window_s": 600})
    sub = Subscriber(local_broker)
    try:
        _boot_app(board)
        got = sub.take(1, timeout=30)
        assert got, "no event envelope arrived"
        lag = board.control("status")["peripherals"]["scenario"]["t"] - 12.0
        assert lag < 2.5, f"the event took {lag:.1f} s to arrive"
        body = _open(got[0][1], key)
        assert body.kind == wire.KIND_EVENT
        recs = _records(body)
        assert recs["noise/impulse"] > 80   # a 125 ms energy average of a 118 dB peak
        assert recs["noise/rise"] >= 15
    finally:
        sub.close()
        emu.stop()
