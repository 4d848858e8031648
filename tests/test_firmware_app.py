"""The whole node on an emulated board: sample -> aggregate -> encode -> sign -> send.

The board runs firmware/ unmodified (main.py) against the simulated parts and a
real Mosquitto; a host subscriber checks what arrives: every envelope verifies with
the node's public key, readings match the scenario, and nothing is lost or reordered
across a Wi-Fi outage or a power cut.
"""

from __future__ import annotations

import json
import queue
import time

import paho.mqtt.client as mqtt
import pytest
from citynode.provisioning.deploy import build_config
from cryptography.hazmat.primitives.asymmetric import ec

from citynode import wire
from citynode.boards import get_board
from tests.emu import install_firmware, mpremote, start_emulator, wait_for

WINDOW_S = 5


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


def _start_node(tmp_path, broker, scenario: dict | None = None, extra: dict | None = None):
    scenario_file = tmp_path / "scenario.json"
    scenario_file.write_text(json.dumps(scenario or {}))
    emu = start_emulator(tmp_path, extra=["--scenario", str(scenario_file)])
    board = emu.boards[0]
    device = "cn-" + board.mac
    cfg = build_config(get_board("esp32-devkitc"), device, "test", "P-1", 52.0, 4.3,
                       f"{broker.host}:{broker.port}", "city", window_s=WINDOW_S)
    for spec in cfg["sensors"].values():
        if "interval_s" in spec:
            spec["interval_s"] = 1
    cfg.update(extra or {})
    install_firmware(board, {"config.json": json.dumps(cfg),
                             "secret/wifi.json": json.dumps({"password": "pw"})})
    public = mpremote(board.link, "exec",
                      "from node.keys import NodeKeys; print(NodeKeys().public_key_hex())").strip()
    key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), bytes.fromhex(public))
    return emu, board, device, key


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
    emu, board, device, key = _start_node(tmp_path, local_broker)
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
