"""The sensor parts citynode drives: one table that every host program reads.

The board catalogue validates `sensors:` against it, provisioning writes each part's
wiring and cadence into the node's config from it, and the emulator attaches one
simulated part per entry (emulator/devices/, registered by the same name). The
firmware has its own registry, part name -> the class that samples it
(firmware/node/sensors.py PARTS); tests/test_parts.py runs it on MicroPython and
checks that it names the same parts, buses and quantities as this table.

Adding a part: an entry here, a driver in firmware/drivers/ and its class in
firmware/node/sensors.py PARTS, a simulated part in emulator/devices/, and the part
on a board in boards.yaml (docs/decisions.md, "Where things live").
"""

from __future__ import annotations

from dataclasses import dataclass

BUSES = ("i2c", "uart", "i2s")


@dataclass(frozen=True)
class Quantity:
    name: str  # SenML record name, <group>/<quantity>
    unit: str  # SenML unit (docs/wire-format.md)


@dataclass(frozen=True)
class Part:
    name: str                       # the key in boards.yaml and the node's config.json
    bus: str                        # one of BUSES
    description: str
    quantities: tuple[Quantity, ...]
    interval_s: float | None        # default sampling interval; None: read continuously
    address: int | None = None      # default 7-bit I2C address (i2c parts)


PARTS: dict[str, Part] = {part.name: part for part in (
    Part("bh1750", "i2c", "ROHM BH1750FVI ambient light sensor",
         (Quantity("light/lux", "lx"),), interval_s=10, address=0x23),
    Part("bme280", "i2c", "Bosch BME280 temperature, humidity and pressure sensor",
         (Quantity("env/temperature", "Cel"), Quantity("env/humidity", "%RH"),
          Quantity("env/pressure", "Pa")), interval_s=10, address=0x76),
    Part("pms5003", "uart", "Plantower PMS5003 particulate matter sensor",
         (Quantity("air/pm1_0", "ug/m3"), Quantity("air/pm2_5", "ug/m3"),
          Quantity("air/pm10", "ug/m3")), interval_s=30),
    Part("mic", "i2s", "I2S MEMS microphone (INMP441, ICS-43434): A-weighted sound levels",
         (Quantity("noise/laeq", "dBA"), Quantity("noise/lamax", "dBA"),
          Quantity("noise/lamin", "dBA"), Quantity("noise/l10", "dBA"),
          Quantity("noise/l90", "dBA")), interval_s=None),
)}
