"""Situational street lighting on the emulated board, the lamp's PWM duty measured at the
pin: dusk by the node's own light sensor, an impulse, the operator's override through
citynode-ops and the real gateway, a reboot that keeps it, and its end by `lamp_auto`.
(That an override ends by itself when its minutes are up, a reset keeping the minutes
left, is tested on the MicroPython VM in tests/test_firmware_lighting.py: waiting out a
minute here would cost the suite a minute.)"""

from __future__ import annotations

import pytest

from citynode import wire
from citynode.testing.emulator import wait_for
from hil_tests.bench import Bench, records
from hil_tests.test_ops import ANSWER_S, ops

# fast rules for a test, set over the air: dusk counts after 2 s, an impulse lights the
# street for 8 s; never quiet hours (00:00 to 00:00 is empty), whatever the time of the run
LIGHTING = ("hold_s=2", "event_s=8", "night_level=60", "quiet_from=00:00", "quiet_until=00:00")


def lamp(node: Bench) -> float:
    return node.emulated.control("status")["peripherals"]["lamp"]


def wait_lamp(node: Bench, duty: float, timeout: float, what: str) -> None:
    wait_for(lambda: abs(lamp(node) - duty) < 0.01, timeout=timeout, interval=0.2,
             what=f"the lamp at {duty:.0%} ({what}); it is at {lamp(node):.0%}")


def last_source(node: Bench, sub) -> str:
    """What set the lamp, by the node's next readings window."""
    seen = len(sub.bodies(wire.KIND_READINGS))
    window = sub.wait(seen + 1, timeout=3 * node.window_s + 10, kind=wire.KIND_READINGS)[-1]
    return records(window)["lamp/source"]


@pytest.fixture
def lit_node(node: Bench):
    board = node.require_emulator("pins the light level and fires an impulse")
    # an override an earlier test left (a lamp command holds 60 minutes) would rule
    forget_lighting(node)
    code, result = ops(node, "send", "set_lighting", *LIGHTING, "--device", node.device,
                       "--wait", str(ANSWER_S))
    assert code == 0, result
    try:
        yield node
    finally:
        board.control("pin", lux=None)
        forget_lighting(node)


def forget_lighting(node: Bench) -> None:
    """The node's lamp state and over-the-air lighting settings gone; the app restarted."""
    node.exec("import os\nfor f in ('/data/lamp.json', '/data/lighting.json'):\n"
              "    try:\n        os.remove(f)\n    except OSError:\n        pass")
    node.boot_app()


def test_dusk_an_override_a_reboot_the_rules_again_and_an_impulse(lit_node: Bench):
    node, board = lit_node, lit_node.emulated
    with node.listen() as sub:
        board.control("pin", lux=800.0)
        wait_lamp(node, 0.0, 30, "daylight")
        board.control("pin", lux=2.0)             # dusk: the BH1750 reads 2 lx
        wait_lamp(node, 0.60, 40, "dark, night_level")
        assert last_source(node, sub) == "dark"

        code, result = ops(node, "send", "lamp", "level=20", "minutes=30",
                           "--device", node.device, "--wait", str(ANSWER_S))
        [answer] = result["nodes"]
        assert code == 0 and answer["settings"]["lamp_source"] == "operator", answer
        wait_lamp(node, 0.20, 5, "the operator's override")
        board.control("impulse", kind="gunshot", level_db=118.0, after_s=0.2)
        assert last_source(node, sub) == "operator"     # the operator's word beats an event
        assert abs(lamp(node) - 0.20) < 0.01

        code, result = ops(node, "send", "reboot", "--device", node.device,
                           "--wait", str(ANSWER_S))
        assert code == 0, result
        boots = board.control("status")["boots"]
        wait_for(lambda: board.control("status")["boots"] > boots, timeout=30,
                 what="the node's reboot")
        wait_lamp(node, 0.20, 15, "the override, kept across the reboot")
        code, result = ops(node, "send", "lamp_auto", "--device", node.device,
                           "--wait", str(ANSWER_S))
        assert code == 0, result
        wait_lamp(node, 0.60, 10, "the rules again once the operator hands back")
        assert last_source(node, sub) == "dark"

        board.control("impulse", kind="gunshot", level_db=118.0, after_s=0.2)
        wait_lamp(node, 1.0, 10, "raised by the impulse")
        wait_lamp(node, 0.60, 20, "back to night_level after event_s")
