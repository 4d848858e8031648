"""A gunshot is reported at once, stamped with the millisecond it happened: its onset's
sample, on the node's clock (synced from the pole), against the emulator's truth."""

from __future__ import annotations

from typing import NamedTuple

from citynode import wire
from hil_tests.bench import Bench, records

STAMP_S = 0.01      # the onset's sample (<= 2 ms) and the clock (a few ms), with room
SHOT_DB = 118.0     # the gunshot's peak


def test_an_impulse_arrives_within_two_seconds_with_its_time(node: Bench):
    # a second shot only if the first is not called a gunshot: the classifier's own
    # figures are bench-events' (239 of 240 at this level); here it is the event's time
    delay, stamp_error, _ = fire_impulse(node, shots=2)
    print(f"impulse delay {delay:.3f} s, stamp error {1000 * stamp_error:+.1f} ms")
    assert delay < 2.0, f"the event took {delay:.2f} s"
    assert abs(stamp_error) <= STAMP_S, f"the event's stamp is {stamp_error:+.3f} s off"


class Shot(NamedTuple):
    delay: float            # of the event's arrival after the shot, s
    stamp_error: float      # of its time against the emulator's truth, s
    clock_rtt: float        # round trip of the SNTP answer the node's clock keeps, s: its
                            # offset is certain to within half of it (and no better)


def fire_impulse(node: Bench, shots: int = 1, stamp_s: float = STAMP_S) -> Shot:
    """Fire a gunshot; its event must carry the level, the rise, its peak and be called a
    gunshot.
    A shot heard but not called a gunshot is fired again too, while `shots` last.
    Shared with the chip-speed suite (test_chip_speed.py), which may fire up to `shots`,
    10 s apart: a node that still drops audio at chip speed misses a shot in a dropped
    gap (how much it drops is the benchmark's audio_lost_pct), or hears it after one
    (its event says how much audio was lost just before it: if its onset was in the
    gap, its stamp is late and its peak missed), and the next one comes at another
    phase of its window."""
    board = node.require_emulator("fires a gunshot at the microphone")
    with node.listen() as sub:
        sub.wait(2, timeout=4 * node.window_s + 20, kind=wire.KIND_READINGS)   # publishing
        heard = 0
        for shot in range(1, shots + 1):
            fired = board.control("impulse", kind="gunshot", level_db=SHOT_DB,
                                  after_s=0.5)["unix"]     # when its first sample plays
            try:
                event = sub.wait(heard + 1, timeout=10, kind=wire.KIND_EVENT)[-1]
            except AssertionError:
                if shot == shots:
                    raise
                print(f"shot {shot} of {shots} not heard; firing again")
                continue
            heard = len(sub.bodies(wire.KIND_EVENT))
            called = records(event)["noise/class"]
            if (_onset_heard(event, fired, stamp_s) and called == "gunshot") or shot == shots:
                break
            lost = records(event)["noise/lost_ms"]
            print(f"shot {shot} of {shots} called {called}, heard after {lost} ms of lost "
                  f"audio: {records(event)}; firing again")
        arrived = next(at for at, body in sub.timed() if body is event)
    assert event.time_ms is not None, "the node's clock never synced"
    values = records(event)
    assert _onset_heard(event, fired, stamp_s), values
    assert values["noise/impulse"] > 80      # a 31 ms energy average of a 118 dB peak
    assert values["noise/rise"] >= 15
    assert abs(values["noise/lzpeak"] - SHOT_DB) <= 1.0, values      # the shot's peak
    assert values["noise/class"] == "gunshot", values
    assert 0 < values["noise/duration"] <= 125 and values["noise/risetime"] <= 1, values
    window = records(sub.bodies(wire.KIND_READINGS)[-1])
    return Shot(arrived - fired, event.time_ms / 1000 - fired, window["clock/rtt_ms"] / 1000)


def _onset_heard(event, fired: float, stamp_s: float) -> bool:
    """Whether the event heard the shot's onset: no audio lost just before it, or lost
    before the onset, which the stamp and the peak then show (an onset in the gap
    would be stamped late, and the gunshot's peak, in its first millisecond, missed)."""
    values = records(event)
    onset = (event.time_ms is not None and abs(event.time_ms / 1000 - fired) <= stamp_s
             and abs(values["noise/lzpeak"] - SHOT_DB) <= 1.0)
    return onset if values["noise/lost_ms"] else True
