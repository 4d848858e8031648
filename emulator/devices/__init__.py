"""The simulated parts, registered by the names of citynode.parts.PARTS.

Peripherals attaches one per entry of a board's `sensors:` (boards.yaml) from here;
tests/test_emu_parts.py checks that DEVICES names the parts of PARTS, in its
order. A part's noise seed is its board's seed plus its place here (plus one), so
a new part goes at the end of both.
"""

from __future__ import annotations

from .base import SimulatedPart, World
from .bh1750 import BH1750
from .bme280 import BME280
from .mic import I2SMicrophone
from .pms5003 import PMS5003

DEVICES: dict[str, type[SimulatedPart]] = {
    cls.name: cls for cls in (BH1750, BME280, PMS5003, I2SMicrophone)}

__all__ = ["DEVICES", "SimulatedPart", "World"]
