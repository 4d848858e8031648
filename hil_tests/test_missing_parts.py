"""A part missing at power-on, or going silent, is reported and retried: never fatal."""

from __future__ import annotations

from citynode import wire
from citynode.testing.emulator import wait_for
from hil_tests.bench import Bench, records


def _next_window(node: Bench, sub, seen: int) -> dict:
    bodies = sub.wait(seen + 1, timeout=3 * node.window_s + 20, kind=wire.KIND_READINGS)
    return records(bodies[seen])


def test_a_sensor_missing_at_boot_is_reported_then_read_once_it_is_back(bench: Bench):
    bench.require_emulator("unplugs a sensor")
    bench.fault("unplug", sensor="bme280")
    try:
        bench.boot_app()                       # the app starts without the part
        with bench.listen() as sub:
            window = _next_window(bench, sub, 0)
            assert "not answering" in window.get("env/status", ""), window
            assert "light/lux" in window            # the others go on
            bench.fault("plug", sensor="bme280")
            back = wait_for(lambda: next((w for w in map(records, sub.bodies(
                wire.KIND_READINGS)) if "env/temperature" in w), None),
                timeout=6 * bench.window_s + 30, what="a window with the part back")
        assert "env/status" not in back
    finally:
        bench.fault("plug", sensor="bme280")


def test_a_silent_microphone_is_reported_not_fatal(bench: Bench):
    bench.require_emulator("unplugs the microphone")
    bench.fault("unplug", sensor="mic")        # its SD line reads 0: digital silence
    try:
        bench.boot_app()
        with bench.listen() as sub:
            window = _next_window(bench, sub, 0)
            second = _next_window(bench, sub, 1)   # still running a window later
        assert window.get("noise/status", "").startswith("silent"), window
        assert second.get("noise/status", "").startswith("silent"), second
    finally:
        bench.fault("plug", sensor="mic")
