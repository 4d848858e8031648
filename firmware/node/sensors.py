"""The parts the node drives: one registry, PARTS, from config.json's part name to the
class that samples it. Each class declares its bus and its quantities (SenML name,
unit) as citynode/parts.py does for the host (tests/test_parts.py checks they agree);
config validation and build() read PARTS, and the app's sound records come from
Sound.QUANTITIES.

    sensor.name, sensor.interval_s          (name: the records' group, e.g. "env")
    await sensor.sample() -> [(quantity, unit, value), ...]  (raises SensorError)
    await sensor.wait_next()
The microphone (Sound) is read continuously by the app's audio task, not sampled.
machine is imported only when a part is set up, so the registry also loads on a
MicroPython without one (the host's test).
"""

import asyncio
import gc
import time

from drivers.bh1750 import BH1750
from drivers.bme280 import BME280
from drivers.pms5003 import PMS5003

INTERVAL_S = 10     # a part's sampling interval when config.json gives none
RATE = 48000        # the microphone's sample rate when config.json gives none
RATES = (16000, 48000)
IBUF = 32768        # the I2S DMA ring: 4096 frames, 85 ms at 48 kHz, over a collection
                    # or a window's close (docs/decisions.md, "How the node reads...")
CHUNK = 512         # samples a read: ~5.5 ms of the devkitc's DSP at chip speed (1024: ~11)
AUDIO_TURN_US = 14000  # a turn of the audio: chunks for up to this long, the rest next turn
AUDIO_DUTY_PCT = 60  # the audio's share of the CPU at most: a slower chip drops audio
                     # (counted as overruns), never the node's windows and events


class Sensor:
    """A part sampled on a cadence; a subclass gives BUS, QUANTITIES and read()."""

    def __init__(self, spec):
        first = self.QUANTITIES[0][0]
        self.name = first[:first.find("/")]
        self.interval_s = spec.get("interval_s", INTERVAL_S)

    async def sample(self):
        values = await self.read()
        if values is None:          # nothing to report yet (the PMS5003's fan warming up)
            return []
        out = []
        i = 0
        for name, unit in self.QUANTITIES:
            out.append((name, unit, values[i]))
            i += 1
        return out

    async def wait_next(self):
        await asyncio.sleep_ms(int(self.interval_s * 1000))

    def close(self):
        pass


class Light(Sensor):
    BUS = "i2c"
    QUANTITIES = (("light/lux", "lx"),)

    def __init__(self, spec, bus):
        Sensor.__init__(self, spec)
        self.bus = bus
        self.address = spec.get("address", 0x23)
        self.part = None    # set up at the first reading: a part missing at boot is retried

    async def read(self):
        if self.part is None:
            self.part = BH1750(self.bus, self.address)
        return (await self.part.alux(),)


class Weather(Sensor):
    BUS = "i2c"
    QUANTITIES = (("env/temperature", "Cel"), ("env/humidity", "%RH"), ("env/pressure", "Pa"))

    def __init__(self, spec, bus):
        Sensor.__init__(self, spec)
        self.bus = bus
        self.address = spec.get("address", 0x76)
        self.part = None    # set up at the first reading: a part missing at boot is retried

    async def read(self):
        if self.part is None:
            self.part = BME280(self.bus, self.address)
        return await self.part.aread()


class Particulates(Sensor):
    """PMS5003 in passive mode; its fan sleeps between readings when they are far apart
    (the interval is at least three warm-ups)."""
    BUS = "uart"
    QUANTITIES = (("air/pm1_0", "ug/m3"), ("air/pm2_5", "ug/m3"), ("air/pm10", "ug/m3"))

    def __init__(self, spec, bus):
        from machine import UART, Pin
        Sensor.__init__(self, spec)
        uart = UART(spec.get("uart", 2), 9600, tx=spec.get("tx"), rx=spec.get("rx"), rxbuf=256)
        set_pin = Pin(spec["set"], Pin.OUT) if spec.get("set") is not None else None
        self.part = PMS5003(uart, set_pin=set_pin)

    async def read(self):
        return await self.part.aread()     # None while the fan warms up

    async def wait_next(self):
        warmup_ms = self.part.warmup_ms
        interval_ms = int(self.interval_s * 1000)
        if interval_ms < 3 * warmup_ms:
            await Sensor.wait_next(self)
            return
        self.part.sleep()
        await asyncio.sleep_ms(interval_ms - warmup_ms - 2000)
        self.part.wake()
        while self.part.warming_up:
            await asyncio.sleep_ms(500)

    def close(self):
        self.part.sleep()


class Sound:
    """The I2S microphone read continuously into the A-weighted sound meter; the app's
    window clock closes the meter's window (records())."""
    BUS = "i2s"
    QUANTITIES = (("noise/laeq", "dBA"), ("noise/lamax", "dBA"), ("noise/lamin", "dBA"),
                  ("noise/l10", "dBA"), ("noise/l90", "dBA"))

    def __init__(self, spec, impulse_db, on_event):
        from drivers.mic import Mic
        from node.acoustic import SoundMeter
        gc.collect()    # the imports' garbage: the buffers below need blocks of 2-2.4 KB
        rate = spec.get("rate", RATE)
        self.mic = Mic(i2s_id=spec.get("i2s", 0), sck=spec["sck"], ws=spec["ws"], sd=spec["sd"],
                       rate=rate, chunk=spec.get("chunk", CHUNK), ibuf=spec.get("ibuf", IBUF))
        self.meter = SoundMeter(rate=rate, cal_db=spec.get("calibration_db", 0.0),
                                event_rise_db=impulse_db, on_event=on_event)

    async def run(self, beat, send=None):
        """Read the microphone into the meter forever; beat() after every read, and
        `await send()` after a turn that heard an event end: the app seals and sends it
        in this turn, not a few turns of the loop later (impulse to the pole in 250 ms).

        The first read waits on the I2S through asyncio, which puts the ESP32's driver
        in its non-blocking mode; from then on the task wakes on a timer and takes what
        the ring holds, chunk by chunk, for up to AUDIO_TURN_US a turn (judged by its last
        chunk with its read: ~2.5 ms of the driver's bookkeeping beside ~6.5 of DSP at
        chip speed, so one chunk a turn there); what is left waits for its next turns,
        which do not rest while it is behind. While the ring is over half full it drains
        on. Draining the whole ring held the loop 20-45 ms a turn at chip speed
        (docs/decisions.md, "The audio task drains the ring in one turn").
        A timer, not the I2S's readiness: asyncio queues a task woken by I/O behind every
        task that merely yielded, so beside a busy task (the signer's steps) a reader
        woken by I/O would run only every other turn.

        After a turn it sleeps at least long enough to keep its share of the CPU within
        AUDIO_DUTY_PCT: a chip too slow for the audio then loses audio, not everything
        (without it, a chip ~1.7x slower than the emulated one published no window).
        """
        mic = self.mic
        meter = self.meter
        rest = 100 - AUDIO_DUTY_PCT
        n = await mic.aread()
        started = time.ticks_us()
        while True:
            more = mic.ring_chunks
            heard = meter.events_heard
            behind = False
            began = started             # this chunk's read began
            while n:
                meter.process(mic.samples, n, mic.read_us, mic.lost_before)
                if n < mic.chunk or not more:
                    break
                # another chunk only if it would end within the turn, judged by this one
                # with its read, unless the ring is over half full (the boot's long steps)
                now = time.ticks_us()
                if (time.ticks_diff(now, started) + time.ticks_diff(now, began) > AUDIO_TURN_US
                        and not mic.half_full):
                    behind = True
                    break
                more -= 1
                began = now
                n = mic.read_held()
            lost = mic.take_overruns()
            if lost:
                meter.add_overruns(lost)
            beat()
            if send is not None and meter.events_heard != heard:
                await send()
            spent = time.ticks_diff(time.ticks_us(), started) // 1000
            least = 0 if behind else mic.chunk_ms // 2
            await asyncio.sleep_ms(max(least, spent * rest // AUDIO_DUTY_PCT))
            started = time.ticks_us()   # the turn's time counts its first read
            n = mic.read_held()

    def records(self):
        """The sound records of the window that ends now; the meter starts the next one."""
        w = self.meter.close_window()
        if not w["blocks"]:
            return [("noise/status", None, "no audio")]
        if w["laeq"] is None:   # blocks of digital silence: SD stuck at 0, a mic unplugged
            return [("noise/status", None, "silent: check the microphone")]
        out = [(name, unit, round(w[name[name.find("/") + 1:]], 1))
               for name, unit in self.QUANTITIES]
        out.append(("noise/overruns", "count", w["overruns"]))
        return out


PARTS = {"bh1750": Light, "bme280": Weather, "pms5003": Particulates, "mic": Sound}


def build(cfg):
    """The configured parts sampled on a cadence (not the microphone), in part-name order.
    The I2C parts share one bus, opened with the pins of the first of them; a part that
    cannot be set up yet is retried by its task."""
    specs = cfg["sensors"]
    out = []
    i2c = None
    for name in sorted(specs):
        cls = PARTS[name]
        spec = specs[name]
        if cls.BUS == "i2s":
            continue
        if cls.BUS == "i2c" and i2c is None:
            from machine import I2C, Pin
            i2c = I2C(spec.get("i2c", 0), scl=Pin(spec["scl"]), sda=Pin(spec["sda"]), freq=400000)
        out.append(cls(spec, i2c))
    return out
