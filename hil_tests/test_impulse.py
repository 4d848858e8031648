"""A gunshot is reported at once, with the millisecond it happened."""

from __future__ import annotations

import time

import pytest

from citynode import wire
from citynode.testing.emulator import wait_for
from hil_tests.bench import Bench, records


def test_an_impulse_arrives_within_two_seconds_with_its_time(node: Bench):
    node.require_emulator("fires a gunshot at the microphone")
    with node.listen() as sub:
        sub.wait(2, timeout=4 * node.window_s + 20, kind=wire.KIND_READINGS)   # publishing
        fired = time.time() + 0.5
        node.fault("impulse", kind="gunshot", level_db=118.0, after_s=0.5)
        event = sub.wait(1, timeout=10, kind=wire.KIND_EVENT)[0]
        arrived = next(at for at, body in sub.timed() if body is event)
        # the node's uptime clock against ours, from window envelopes of the event's boot
        # (a window spooled before the last restart carries the old boot's uptime)
        offsets = wait_for(lambda: [at - b.uptime_ms / 1000
                                    for at, b in sub.timed(wire.KIND_READINGS)
                                    if b.boot == event.boot],
                           timeout=3 * node.window_s + 10, what="a window of the event's boot")
    assert arrived - fired < 2.0, f"the event took {arrived - fired:.2f} s"
    happened = min(offsets) + event.uptime_ms / 1000   # on our clock, by the node's stamp
    assert happened == pytest.approx(fired, abs=0.5)
    values = records(event)
    assert values["noise/impulse"] > 80      # a 125 ms energy average of a 118 dB peak
    assert values["noise/rise"] >= 15
