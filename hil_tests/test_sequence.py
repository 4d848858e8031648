"""Sequence numbers never go back: the gateway's replay window counts on it."""

from __future__ import annotations

import pytest

from citynode import wire
from hil_tests.bench import Bench


def _restart(node: Bench, how: str) -> None:
    if how == "soft reset":
        node.boot_app()
    elif how == "hard reset":                        # machine.reset(), as a crash ends
        node.mpremote("reset")
    else:
        node.fault("power", on=False)          # the supply gone mid-write, then back
        node.fault("power", on=True)


@pytest.mark.parametrize("how", ["soft reset", "hard reset", "power cut"])
def test_sequence_numbers_keep_rising_across_a_restart(node: Bench, how: str):
    if how == "power cut":
        node.require_emulator("cuts the power")
    with node.listen() as sub:
        before = sub.wait(1, timeout=3 * node.window_s + 20, kind=wire.KIND_READINGS)[-1]
        _restart(node, how)
        count = len(sub.bodies())
        after = sub.wait(count + 1, timeout=3 * node.window_s + 40)[count]
    assert after.seq > before.seq, f"seq went from {before.seq} to {after.seq} after a {how}"
    if how != "soft reset":                          # a new boot, counted by the node
        assert after.boot > before.boot
