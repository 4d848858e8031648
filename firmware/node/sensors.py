"""The node's slow sensors behind one small interface, built from config.json.

    sensor.name, sensor.interval_s
    await sensor.sample() -> [(quantity, unit, value), ...]  (raises SensorError)
    await sensor.wait_next()
The microphone is not here: it is read continuously by the app's audio task.
"""

import asyncio

from machine import I2C, UART, Pin

from drivers.bh1750 import BH1750
from drivers.bme280 import BME280
from drivers.pms5003 import PMS5003

PMS_WARMUP_S = 30
PMS_SLEEP_AFTER_S = 3 * PMS_WARMUP_S   # sleep the fan only when it would idle this long


class Sensor:
    def __init__(self, name, spec):
        self.name = name
        self.interval_s = spec.get("interval_s", 10)

    async def wait_next(self):
        await asyncio.sleep_ms(int(self.interval_s * 1000))

    def close(self):
        pass


class Light(Sensor):
    def __init__(self, spec, i2c):
        Sensor.__init__(self, "light", spec)
        self.part = BH1750(i2c, spec.get("address", 0x23))

    async def sample(self):
        return [("light/lux", "lx", self.part.lux)]


class Weather(Sensor):
    def __init__(self, spec, i2c):
        Sensor.__init__(self, "env", spec)
        self.part = BME280(i2c, spec.get("address", 0x76))

    async def sample(self):
        t, h, p = self.part.read()
        return [("env/temperature", "Cel", t), ("env/humidity", "%RH", h),
                ("env/pressure", "Pa", p)]


class Particulates(Sensor):
    """PMS5003 in passive mode; its fan sleeps between readings when they are far apart."""

    def __init__(self, spec):
        Sensor.__init__(self, "air", spec)
        uart = UART(spec.get("uart", 2), 9600, tx=spec.get("tx"), rx=spec.get("rx"), rxbuf=256)
        set_pin = Pin(spec["set"], Pin.OUT) if spec.get("set") is not None else None
        self.part = PMS5003(uart, set_pin=set_pin)

    async def sample(self):
        reading = await self.part.aread()
        if reading is None:        # the fan is still warming up: nothing to report yet
            return []
        pm1, pm25, pm10 = reading
        return [("air/pm1_0", "ug/m3", pm1), ("air/pm2_5", "ug/m3", pm25),
                ("air/pm10", "ug/m3", pm10)]

    async def wait_next(self):
        if self.interval_s < PMS_SLEEP_AFTER_S:
            await Sensor.wait_next(self)
            return
        self.part.sleep()
        await asyncio.sleep_ms(int((self.interval_s - PMS_WARMUP_S - 2) * 1000))
        self.part.wake()
        while self.part.warming_up:
            await asyncio.sleep_ms(500)

    def close(self):
        self.part.sleep()


def build(cfg):
    """The configured sensors; a part that cannot be set up yet is retried by its task."""
    specs = cfg["sensors"]
    out = []
    i2c = None
    for name in ("bh1750", "bme280"):
        spec = specs.get(name)
        if spec is None:
            continue
        if i2c is None:
            i2c = I2C(spec.get("i2c", 0), scl=Pin(spec["scl"]), sda=Pin(spec["sda"]), freq=400000)
        out.append(Light(spec, i2c) if name == "bh1750" else Weather(spec, i2c))
    if "pms5003" in specs:
        out.append(Particulates(specs["pms5003"]))
    return out
