"""ROHM BH1750FVI ambient light sensor, at I2C level (datasheet rev. 2011.11).

The part has no registers: every written byte is an opcode, and a read returns the
last finished measurement as a 16-bit big-endian count. A measurement takes real
time (120 ms in H-resolution at the default MTreg of 69), and until it finishes a
read still returns the previous result, which is what catches drivers that read
too early. Measurements are evaluated lazily: on each bus transaction the part
works out which conversions have finished since the last one.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from .base import SimulatedPart, World

POWER_DOWN, POWER_ON, RESET = 0x00, 0x01, 0x07
MTREG_DEFAULT = 69
# opcode -> (resolution, one-time)
MODES = {0x10: ("H", False), 0x11: ("H2", False), 0x13: ("L", False),
         0x20: ("H", True), 0x21: ("H2", True), 0x23: ("L", True)}
TYPICAL_MS = {"H": 120.0, "H2": 120.0, "L": 16.0}


def lux_to_count(lux: float, resolution: str, mtreg: int) -> int:
    """The datasheet's lux = count / 1.2 * (69 / MTreg) (H-res2: / 2), inverted."""
    count = lux * 1.2 * mtreg / MTREG_DEFAULT
    if resolution == "H2":
        count *= 2
    count = max(0, min(0xFFFF, int(count + 0.5)))
    if resolution == "L":
        count &= ~0x3  # 4 lx steps: the L-res conversion has two fewer bits
    return count


class BH1750(SimulatedPart):
    name = "bh1750"
    corruptible = True

    def __init__(self, light: Callable[[float], float], clock: Callable[[], float],
                 seed: int = 0) -> None:
        """light(t): illuminance in lx at device-clock time t; clock(): device-clock now."""
        self._light = light
        self._clock = clock
        self._rng = random.Random(seed)
        self._garbage = 0
        self.power_on_reset()

    @classmethod
    def attach(cls, world: World, spec: dict[str, Any], seed: int) -> BH1750:
        return cls(world.light, world.scenario.wall, seed=seed)

    def power_on(self) -> None:
        self.power_on_reset()

    def power_on_reset(self) -> None:
        """Supply applied: power-down state, data register 0, MTreg back to 69."""
        self.powered = False
        self.mode: int | None = None
        self.mtreg = MTREG_DEFAULT
        self.result = 0
        self._started = 0.0

    # -- timing ---------------------------------------------------------------------
    def conversion_time(self) -> float:
        """Seconds per conversion: the integration time scales with MTreg."""
        res, _ = MODES[self.mode] if self.mode is not None else ("H", False)
        return TYPICAL_MS[res] / 1000.0 * self.mtreg / MTREG_DEFAULT

    def _settle(self) -> None:
        """Bring `result` up to date with the conversions finished by now."""
        if self.mode is None:
            return
        res, one_time = MODES[self.mode]
        period = self.conversion_time()
        done = int((self._clock() - self._started) / period)
        if done < 1:
            return
        if one_time:
            end = self._started + period
            self.result = lux_to_count(self._light(end), res, self.mtreg)
            self.mode = None
            self.powered = False  # one-time modes power down after measuring
        else:
            end = self._started + done * period
            self.result = lux_to_count(self._light(end), res, self.mtreg)

    def _start(self, mode: int) -> None:
        self.mode = mode
        self.powered = True
        self._started = self._clock()

    # -- bus --------------------------------------------------------------------------
    def write(self, data: bytes) -> int:
        for op in data:
            self._settle()
            if op == POWER_DOWN:
                self.powered = False
                self.mode = None
            elif op == POWER_ON:
                self.powered = True
            elif op == RESET:
                if self.powered:  # not accepted in power-down mode
                    self.result = 0
            elif op in MODES:
                self._start(op)
            elif op & 0xF8 == 0x40:
                self._set_mtreg((self.mtreg & 0x1F) | ((op & 0x07) << 5))
            elif op & 0xE0 == 0x60:
                self._set_mtreg((self.mtreg & 0xE0) | (op & 0x1F))
            # anything else is acknowledged and ignored, as the part does
        return len(data)

    def _set_mtreg(self, value: int) -> None:
        self.mtreg = max(1, value)
        if self.mode is not None and not MODES[self.mode][1]:
            self._started = self._clock()  # the next conversion uses the new time

    def read(self, n: int) -> bytes:
        if self._garbage:
            self._garbage -= 1
            return bytes(self._rng.getrandbits(8) for _ in range(n))
        self._settle()
        out = bytes((self.result >> 8, self.result & 0xFF))
        return (out + b"\xff" * n)[:n]

    def corrupt(self, count: int = 1, **kw: Any) -> None:
        """The next `count` reads return noise, as a marginal bus would."""
        self._garbage += count
