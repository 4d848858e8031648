"""The node's link to the pole: nothing lost while Wi-Fi is away, and only the
operator's signed commands obeyed."""

from __future__ import annotations

import time

import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from citynode import wire
from hil_tests.bench import Bench, records


def test_nothing_lost_or_reordered_across_a_wifi_outage(node: Bench):
    with node.listen() as sub:
        sub.wait(1, timeout=3 * node.window_s + 20, kind=wire.KIND_READINGS)
        node.fault("wifi", up=False)
        time.sleep(3 * node.window_s)                # three windows spooled on the node
        node.fault("wifi", up=True)
        time.sleep(2 * node.window_s)
        sub.wait(6, timeout=3 * node.window_s + 20, kind=wire.KIND_READINGS)
        bodies = sub.bodies()
    seqs = [b.seq for b in bodies]
    assert seqs == sorted(seqs), f"order not kept: {seqs}"
    unique = sorted(set(seqs))
    assert unique == list(range(unique[0], unique[-1] + 1)), f"gap in {unique}"
    spooled = [records(b)["node/spool"] for b in bodies if b.kind == wire.KIND_READINGS]
    assert max(spooled) >= 2, f"the outage never filled the spool: {spooled}"


def _command(node: Bench, seq: int, args: dict, key: ec.EllipticCurvePrivateKey) -> bytes:
    body = wire.encode_command(node.device, seq, "lamp", args, int(time.time()))
    return wire.sign_es256(body, wire.OPERATOR_KID, key)


def test_downlink_obeys_the_operator_key_only_once(node: Bench):
    check_downlink(node)


def check_downlink(node: Bench, answer_s: float = 15) -> None:
    """A signed lamp command is obeyed once, its replay and a stranger's refused.
    Shared with the chip-speed suite (test_chip_speed.py)."""
    sender = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="hil-operator")
    sender.connect(*node.broker)
    sender.loop_start()

    said: list[dict] = []

    def answer(command: bytes) -> str:
        """What the node says to a command (its cmd/ status record, sent at once)."""
        seen = len(sub.bodies(wire.KIND_STATUS))
        sender.publish(f"citynode/down/{node.device}", command, qos=1).wait_for_publish(10)
        answers = sub.wait(seen + 1, timeout=answer_s, kind=wire.KIND_STATUS)
        said.append(records(answers[seen]))
        return next(v for n, v in said[-1].items() if n.startswith("cmd/") and n != "cmd/seq")

    try:
        with node.listen() as sub:
            sub.wait(1, timeout=3 * node.window_s + 20, kind=wire.KIND_READINGS)
            # above any number the node has seen (citynode-ops numbers from 1 upwards)
            seq = int(time.time())
            lamp = _command(node, seq, {"level": 40}, node.operator)
            assert answer(lamp) == "ok"
            assert answer(lamp) == "replayed"             # the same bytes again
            stranger = ec.generate_private_key(ec.SECP256R1())
            assert answer(_command(node, seq + 1, {"level": 100}, stranger)) == "bad_signature"
        # each answer, a refusal too, confirms the settings the node runs with, signed
        assert [a.get("set/lamp") for a in said] == [40, 40, 40]
        assert [a.get("cmd/seq") for a in said] == [seq, seq, seq]
        assert all(a["set/window_s"] == node.window_s for a in said)
    finally:
        sender.loop_stop()
        sender.disconnect()
    if node.emulated is not None:                         # the lamp's PWM duty, measured
        lamp_level = node.emulated.control("status")["peripherals"]["lamp"]
        assert lamp_level == pytest.approx(0.40, abs=0.01)
