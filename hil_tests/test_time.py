"""Time from the pole: the node syncs with the pole's time server (on an emulated bench,
a real chronyd with deploy/chrony.conf, through the board's Wi-Fi-like radio) and
stamps its envelopes in Unix milliseconds (wire version 2)."""

from __future__ import annotations

from citynode import wire
from hil_tests.bench import Bench, records


def test_readings_carry_the_poles_time_once_synced(node: Bench):
    with node.listen() as sub:
        sub.wait(3, timeout=5 * node.window_s + 30, kind=wire.KIND_READINGS)
        timed = sub.timed(wire.KIND_READINGS)
    synced = [(at, body) for at, body in timed if body.time_ms is not None]
    assert synced, "no window carried a time: the node never synced"
    for arrived, body in synced:
        assert body.version == 2
        # sealed, then sent: it arrives after its stamp, and soon after (host speed); the
        # node's clock is the pole's within its sync error (a few ms either way), so a
        # stamp may read a moment after the arrival (0.8 ms once)
        assert -20 <= arrived * 1000 - body.time_ms < 3000, (arrived, body.time_ms)
    last = records(synced[-1][1])
    assert 0 < last["clock/rtt_ms"] < 200      # the pole's Wi-Fi, not the internet
    # the node's two clocks agree: its time minus its uptime is one boot instant
    booted = {body.time_ms - body.uptime_ms for _, body in synced}
    assert max(booted) - min(booted) < 50, booted
