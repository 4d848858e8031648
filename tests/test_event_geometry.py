"""Several poles hear one shot: what a locator needs, end to end through the node's meter.

The emulator places each board and the sound (scenario "positions", an event's x and y)
and delays and attenuates the sound by distance; the firmware's Mic and SoundMeter on
the MicroPython unix port stamp each onset. The stamps' differences must be the
distances' (time difference of arrival), good enough to find the shooter.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.optimize import least_squares

from bench.events import heard
from citynode.emulator.devices.mic import Microphone
from citynode.emulator.scenario import SPEED_OF_SOUND, Event, ManualClock, Scenario

POLES = [(0.0, 0.0), (120.0, 0.0), (0.0, 90.0)]     # metres on the street plan
SHOOTER = (40.0, 25.0)
SHOT_S = 2.0
RATE = 16000        # the devkitc's microphone: the coarser grain of the two


def _onset(place: tuple[float, float], seed: int) -> float:
    """The node's stamp (s since its stream began) of the one shot it heard."""
    shot = Event(SHOT_S, "gunshot", 140.0, x=SHOOTER[0], y=SHOOTER[1])
    scenario = Scenario(seed=seed, clock=ManualClock(), events=[shot], position=place)
    scenario.override(noise_dba=58.0)
    mic = Microphone(scenario, RATE, seed=seed)
    samples = np.concatenate([mic.block(RATE) for _ in range(4)])
    events = heard(samples, RATE)
    assert len(events) == 1 and events[0][8] == "gunshot", events
    return events[0][0] / 1e6


def test_three_poles_stamp_one_shot_at_their_distances_and_locate_it():
    stamps = [_onset(place, seed) for seed, place in enumerate(POLES)]
    for place, stamp in zip(POLES, stamps, strict=True):
        due = SHOT_S + math.dist(place, SHOOTER) / SPEED_OF_SOUND
        assert stamp == pytest.approx(due, abs=0.0005), (place, stamp - due)

    def residuals(guess: np.ndarray) -> list[float]:
        x, y, t0 = guess
        return [t0 + math.dist(p, (x, y)) / SPEED_OF_SOUND - t
                for p, t in zip(POLES, stamps, strict=True)]

    found = least_squares(residuals, x0=[60.0, 45.0, min(stamps)]).x
    assert math.dist(found[:2], SHOOTER) < 1.0, found       # the shooter, within a metre
