"""The sensor drivers (firmware/drivers/) running ON an emulated board, against the simulated parts.

The drivers run in the real MicroPython VM of an emulated esp32-devkitc, sent with the
unmodified mpremote CLI; the BH1750, BME280 and PMS5003 at the other end of the
emulated I2C and UART are the emulator's bus-level parts (emulator/devices/). The
board is started in-process (EmulatedBoard + Peripherals + its control socket), so a
test can pin the scenario's values and inject faults; unplug/plug/corrupt/status go
through the board's control channel, as `citynode-emu ctl` does.

One test (`test_drivers_on_a_citynode_emu_board`) starts the board through the
`citynode-emu run --scenario` command instead (citynode.testing.emulator), and compares the
drivers' readings with the scenario values that `status` reports.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from citynode.boards import get_board
from citynode.emulator.board import EmulatedBoard
from citynode.emulator.control import ControlServer
from citynode.emulator.peripherals import Peripherals
from citynode.emulator.scenario import Scenario
from citynode.provisioning.device import last_json
from citynode.testing.emulator import (
    BoardHandle,
    install_firmware,
    mpremote,
    start_emulator,
    wait_for,
)

BOARD = get_board("esp32-devkitc")
PINS = BOARD.pins
BH_ADDR = BOARD.sensors["bh1750"]["address"]
BME_ADDR = BOARD.sensors["bme280"]["address"]
PMS_UART = BOARD.sensors["pms5003"]["uart"]

WEATHER = {"temperature": 21.37, "humidity": 47.25, "pressure": 99_876.5}
AIR = {"pm1": 12.0, "pm25": 23.0, "pm10": 41.0}

PRELUDE = f"""
import json, time
from machine import I2C, Pin, UART
i2c = I2C(0, scl=Pin({PINS['i2c_scl']}), sda=Pin({PINS['i2c_sda']}), freq=400000)
def uart():
    return UART({PMS_UART}, baudrate=9600, tx={PINS['uart_tx']}, rx={PINS['uart_rx']},
                timeout=0, rxbuf=256)
SET = Pin({PINS['pms_set']}, Pin.OUT)
def error(f):
    try:
        f()
    except OSError as e:
        return [type(e).__name__, str(e)]
    return None
"""


class Pole:
    """A board with the pole's parts; `run` executes code there, `control` is its
    control channel (the same socket `citynode-emu ctl` uses)."""

    def __init__(self, handle: BoardHandle, parts: Peripherals, scenario: Scenario) -> None:
        self.handle, self.parts, self.scenario = handle, parts, scenario

    def run(self, code: str, resume: bool = False, timeout: float = 90):
        """Run code on the board (fresh VM unless resume: then the previous run's
        variables are still there); its last printed line is JSON."""
        args = ("resume", "exec", code) if resume else ("exec", PRELUDE + code)
        out = mpremote(self.handle.link, *args, timeout=timeout)
        return last_json(out)

    def control(self, cmd: str, **args):
        return self.handle.control(cmd, **args)

    def scenario_values(self) -> dict:
        return self.control("status")["peripherals"]["scenario"]


@pytest.fixture(scope="module")
def pole(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pole")
    scenario = Scenario(seed=5)
    scenario.override(**WEATHER, **AIR)
    parts = Peripherals(BOARD, scenario)
    emu = EmulatedBoard(BOARD, tmp / "state", link=tmp / "node0", peripherals=parts)
    server = ControlServer(emu)
    emu.power_on()
    handle = BoardHandle(str(tmp / "node0"), "", emu.state, emu.mac.hex())
    install_firmware(handle)
    p = Pole(handle, parts, scenario)
    wait_for(lambda: _alive(p), timeout=30, interval=0.5, what="the board's REPL")
    yield p
    server.close()
    emu.close()


def _alive(pole: Pole) -> bool:
    try:
        return pole.run("print(json.dumps(1))") == 1
    except Exception:
        return False


@pytest.fixture
def plugged(pole: Pole):
    """Whatever a test unplugs is plugged back in, and pinned values restored."""
    yield pole
    for sensor in ("bh1750", "bme280", "pms5003"):
        pole.control("plug", sensor=sensor)
    pole.scenario.override(**WEATHER, **AIR)


# -- BH1750 -------------------------------------------------------------------------------------
MODES = ["CONT_HRES", "CONT_HRES2", "CONT_LRES", "ONCE_HRES", "ONCE_HRES2", "ONCE_LRES"]


def _lux_step(mode: str, mtreg: int) -> float:
    """lx per count step: the datasheet's count / 1.2 * 69 / MTreg (/2 in H-res2)."""
    step = 69 / 1.2 / mtreg
    return step / 2 if mode.endswith("HRES2") else step


@pytest.mark.parametrize("lux", [3.7, 1234.5, 20000.0])
def test_bh1750_lux_in_every_mode_and_mtreg(pole: Pole, lux: float) -> None:
    pole.scenario.override(lux=lux)
    r = pole.run(f"""
from drivers import bh1750
light = bh1750.BH1750(i2c, address={BH_ADDR})
out = []
for name in {MODES}:
    for mt in (31, 69, 254):
        if {lux} * 1.2 * mt / 69 * (2 if name.endswith('HRES2') else 1) > 65000:
            continue                              # the 16-bit count would saturate
        light.mode = getattr(bh1750, name)
        light.mtreg = mt
        t = time.ticks_ms()
        value = light.lux
        out.append([name, mt, value, light.resolution, time.ticks_diff(time.ticks_ms(), t)])
print(json.dumps(out))
""")
    assert len(r) >= 12
    for name, mt, value, resolution, ms in r:
        step = _lux_step(name, mt)
        assert resolution == pytest.approx(step * (4 if "LRES" in name else 1))
        # the part rounds to a count (L-res: to a multiple of 4 counts)
        tolerance = step * (4 if "LRES" in name else 0.5) + 1e-9
        assert abs(value - lux) <= tolerance, (name, mt, value)
        typical = (16 if "LRES" in name else 120) * mt / 69
        assert ms >= typical, f"{name} MTreg {mt}: read after {ms} ms, before the conversion"


def test_bh1750_power_reset_and_asyncio(pole: Pole) -> None:
    pole.scenario.override(lux=456.0)
    r = pole.run(f"""
import asyncio
from drivers import bh1750
light = bh1750.BH1750(i2c, address={BH_ADDR}, mode=bh1750.CONT_HRES2)
first = light.lux
light.power_off()
off = light.lux                                   # powers up again by itself
light.reset()
after_reset = light.lux
light.mode = bh1750.ONCE_HRES
async def main():
    ticks = 0
    async def ticker():
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep_ms(10)
    t = asyncio.create_task(ticker())
    value = await light.alux()
    t.cancel()
    return value, ticks
value, ticks = asyncio.run(main())
print(json.dumps([first, off, after_reset, value, ticks, light.measurement_ms]))
""")
    first, off, after_reset, value, ticks, wait_ms = r
    for v, step in ((first, _lux_step("HRES2", 69)), (off, _lux_step("HRES2", 69)),
                    (after_reset, _lux_step("HRES2", 69)), (value, _lux_step("HRES", 69))):
        assert abs(v - 456.0) <= step / 2 + 1e-9
    assert wait_ms == 180                             # the datasheet's maximum in H-res
    assert ticks >= 5                                 # the loop ran while the part measured


def test_bh1750_unplugged_says_what_to_check_and_recovers(plugged: Pole) -> None:
    pole = plugged
    pole.scenario.override(lux=800.0)
    r = pole.run(f"""
from drivers.bh1750 import BH1750
light = BH1750(i2c, address={BH_ADDR})
print(json.dumps(light.lux))
""")
    assert abs(r - 800.0) <= 0.5
    pole.control("unplug", sensor="bh1750")
    assert pole.control("status")["peripherals"]["unplugged"] == ["bh1750"]
    err = pole.run("print(json.dumps(error(lambda: light.lux)))", resume=True)
    assert err[0] == "SensorMissing"
    assert "BH1750" in err[1] and "0x23" in err[1] and "ADDR" in err[1]
    assert "wiring" in err[1]
    # a node that boots without the part gets the same message from the constructor
    err = pole.run(f"print(json.dumps(error(lambda: BH1750(i2c, address={BH_ADDR}))))",
                   resume=True)
    assert err[0] == "SensorMissing" and "0x23" in err[1]
    pole.control("plug", sensor="bh1750")            # a power-on: powered down, MTreg 69
    r = pole.run("print(json.dumps(light.lux))", resume=True)
    assert abs(r - 800.0) <= 0.5


def test_bh1750_bus_noise_detected(plugged: Pole) -> None:
    pole = plugged
    pole.scenario.override(lux=1500.0)
    pole.run(f"""
from drivers.bh1750 import BH1750
light = BH1750(i2c, address={BH_ADDR})
print(json.dumps(light.lux))
""")
    pole.control("corrupt", sensor="bh1750", count=1)   # one read returns noise
    value, errors = pole.run("print(json.dumps([light.lux, light.bus_errors]))", resume=True)
    assert abs(value - 1500.0) <= 0.5 and errors == 1
    pole.control("corrupt", sensor="bh1750", count=3)   # every read returns noise
    err = pole.run("print(json.dumps(error(lambda: light.lux)))", resume=True)
    assert err[0] == "SensorFault" and "inconsistent" in err[1] and "pull-ups" in err[1]
    value = pole.run("print(json.dumps(light.lux))", resume=True)
    assert abs(value - 1500.0) <= 0.5


def test_bh1750_saturation_flagged(pole: Pole) -> None:
    pole.scenario.override(lux=70_000.0)              # bright sun on the sensor
    r = pole.run(f"""
from drivers import bh1750
light = bh1750.BH1750(i2c, address={BH_ADDR})
full = [light.lux, light.saturated]
light.mtreg = 31                                  # the widest range: up to 121 klx
print(json.dumps(full + [light.lux, light.saturated]))
""")
    top, saturated, wide, wide_saturated = r
    assert saturated and top == pytest.approx(65535 / 1.2)
    assert not wide_saturated and abs(wide - 70_000.0) <= _lux_step("HRES", 31) / 2 + 1e-9


def test_wrong_address_or_wrong_part(pole: Pole) -> None:
    pole.scenario.override(lux=100.0)
    r = pole.run("""
from drivers.bh1750 import BH1750
from drivers.bme280 import BME280
print(json.dumps([error(lambda: BH1750(i2c, address=0x5C)),
                  error(lambda: BME280(i2c, address=0x77)),
                  error(lambda: BME280(i2c, address=0x23))]))
""")
    bh, bme, wrong = r
    assert bh[0] == "SensorMissing" and "0x5c" in bh[1] and "ADDR" in bh[1]
    assert bme[0] == "SensorMissing" and "0x77" in bme[1] and "SDO" in bme[1]
    # a part answers at 0x23, but it is no BME280 (it is the BH1750)
    assert wrong[0] == "SensorFault" and "not 0x60" in wrong[1] and "0x23" in wrong[1]


# -- BME280 -------------------------------------------------------------------------------------
@pytest.mark.parametrize("osrs, t_tol, p_tol, h_tol", [
    # datasheet resolution at x1 (16-bit words): 0.005 degC, 2.62 Pa, 0.008 %RH; at x16
    # (20-bit): 0.0003 degC, 0.18 Pa; plus the compensation's output step
    # (0.01 degC, 1/256 Pa, 1/1024 %RH)
    (1, 0.015, 2.7, 0.01),
    (16, 0.01, 0.2, 0.01),
])
@pytest.mark.parametrize("weather", [WEATHER,
                                     {"temperature": -12.34, "humidity": 91.5,
                                      "pressure": 103_210.0},
                                     {"temperature": 38.9, "humidity": 8.2,
                                      "pressure": 92_000.0}])
def test_bme280_compensation_matches_scenario(pole: Pole, weather, osrs, t_tol, p_tol,
                                              h_tol) -> None:
    pole.scenario.override(**weather)
    try:
        r = pole.run(f"""
from drivers.bme280 import BME280
air = BME280(i2c, address={BME_ADDR}, osrs_t={osrs}, osrs_p={osrs}, osrs_h={osrs})
t, h, p = air.read()
raw = air.read_raw()
print(json.dumps([t, h, p, list(raw), air.temperature, air.humidity, air.pressure,
                  air.measurement_ms, list(air.calibration)]))
""")
    finally:
        pole.scenario.override(**WEATHER)
    t, h, p, raw, t2, h2, p2, ms, cal = r
    assert t == pytest.approx(weather["temperature"], abs=t_tol)
    assert h == pytest.approx(weather["humidity"], abs=h_tol)
    assert p == pytest.approx(weather["pressure"], abs=p_tol)
    # the datasheet's integer outputs: 0.01 degC, Q24.8 Pa, Q22.10 %RH
    assert raw[0] / 100 == pytest.approx(weather["temperature"], abs=t_tol)
    assert raw[1] / 256 == pytest.approx(weather["pressure"], abs=p_tol)
    assert raw[2] / 1024 == pytest.approx(weather["humidity"], abs=h_tol)
    for prop, value, tol in ((t2, "temperature", t_tol), (h2, "humidity", h_tol),
                             (p2, "pressure", p_tol)):
        assert prop == pytest.approx(weather[value], abs=tol)
    # 9.1's maximum: 1.25 + 2.3 T + (2.3 P + 0.575) + (2.3 H + 0.575) ms, rounded up
    assert ms == math.ceil(1.25 + 3 * 2.3 * osrs + 2 * 0.575)
    assert len(cal) == 18


def test_bme280_asyncio_read_and_skipped_humidity(pole: Pole) -> None:
    r = pole.run(f"""
import asyncio
from drivers.bme280 import BME280
air = BME280(i2c, address={BME_ADDR}, osrs_t=2, osrs_p=16, osrs_h=0, iir=0)
print(json.dumps(asyncio.run(air.aread())))
""")
    t, h, p = r
    assert t == pytest.approx(WEATHER["temperature"], abs=0.015)
    assert h is None                                  # humidity skipped (osrs_h=0)
    assert p == pytest.approx(WEATHER["pressure"], abs=0.2)


def test_bme280_unplugged_noise_and_recovery(plugged: Pole) -> None:
    pole = plugged
    pole.run(f"""
from drivers.bme280 import BME280
air = BME280(i2c, address={BME_ADDR})
print(json.dumps(air.read()))
""")
    pole.control("unplug", sensor="bme280")
    err = pole.run("print(json.dumps(error(air.read)))", resume=True)
    assert err[0] == "SensorMissing"
    assert "BME280" in err[1] and "0x76" in err[1] and "SDO" in err[1]
    pole.control("plug", sensor="bme280")            # a power-on reset: registers cleared
    t, h, p = pole.run("print(json.dumps(air.read()))", resume=True)
    assert t == pytest.approx(WEATHER["temperature"], abs=0.015)
    assert h == pytest.approx(WEATHER["humidity"], abs=0.01)
    assert p == pytest.approx(WEATHER["pressure"], abs=2.7)

    pole.control("corrupt", sensor="bme280", count=2)  # two reads return noise
    t, h, p = pole.run("print(json.dumps(air.read()))", resume=True)
    assert t == pytest.approx(WEATHER["temperature"], abs=0.015)
    assert p == pytest.approx(WEATHER["pressure"], abs=2.7)
    pole.control("corrupt", sensor="bme280", count=14)  # more noise than a read can outvote
    r = pole.run("""
first = error(air.read)
good = None
for _ in range(6):                                # the noise passes
    try:
        good = air.read()
        break
    except OSError as e:
        pass
print(json.dumps([first, good, air.bus_errors]))
""", resume=True)
    first, good, bus_errors = r
    assert first[0] == "SensorFault" and "bus noise" in first[1]
    assert good is not None and good[0] == pytest.approx(WEATHER["temperature"], abs=0.015)
    assert bus_errors >= 1


# -- PMS5003 ------------------------------------------------------------------------------------
def _pm(r) -> list:
    return list(r) if r is not None else None


def test_pms5003_passive_read_matches_scenario(pole: Pole) -> None:
    r = pole.run("""
from drivers.pms5003 import PMS5003
pm = PMS5003(uart(), set_pin=SET, warm=True)
reads = []
for _ in range(3):
    t = time.ticks_ms()
    reads.append([pm.read(), time.ticks_diff(time.ticks_ms(), t)])
print(json.dumps({"reads": reads, "counts": pm.counts, "cf1": pm.pm_cf1,
                  "props": [pm.pm1_0, pm.pm2_5, pm.pm10], "frames": pm.frames,
                  "acks": pm.acks, "errors": pm.checksum_errors, "age": pm.age_ms}))
""")
    for reading, ms in r["reads"]:
        assert reading == [AIR["pm1"], AIR["pm25"], AIR["pm10"]]
        assert ms < 1000                              # passive: asked and answered
    assert r["props"] == [AIR["pm1"], AIR["pm25"], AIR["pm10"]]
    # CF=1 ('standard particle') reads as atmospheric in clean air, higher above ~30 ug/m3
    assert r["cf1"][:2] == [AIR["pm1"], AIR["pm25"]] and r["cf1"][2] > AIR["pm10"]
    counts = r["counts"]
    assert counts[0] > 0 and all(a >= b for a, b in zip(counts, counts[1:], strict=False))
    assert r["errors"] == 0 and r["acks"] >= 1        # the mode command was answered
    state = pole.control("status")["peripherals"]["pms5003"]
    assert state["active"] is False                   # the part is in passive mode


def test_pms5003_asyncio_read_does_not_block(pole: Pole) -> None:
    r = pole.run("""
import asyncio
from drivers.pms5003 import PMS5003
pm = PMS5003(uart(), set_pin=SET, warm=True)
async def main():
    gaps = []
    done = False
    async def ticker():
        last = time.ticks_ms()
        while not done:
            await asyncio.sleep_ms(5)
            now = time.ticks_ms()
            gaps.append(time.ticks_diff(now, last))
            last = now
    t = asyncio.create_task(ticker())
    value = await pm.aread()
    done = True
    await t
    return value, max(gaps), len(gaps)
print(json.dumps(asyncio.run(main())))
""")
    value, worst_gap, ticks = r
    assert value == [AIR["pm1"], AIR["pm25"], AIR["pm10"]]
    assert ticks >= 2
    # each step is a few bus transactions (~45 ms each on the emulated bus), never a wait
    assert worst_gap < 500


def test_pms5003_rejects_and_counts_corrupt_frames(pole: Pole) -> None:
    pole.run("""
from drivers.pms5003 import PMS5003
pm = PMS5003(uart(), set_pin=SET, warm=True)
print(json.dumps(pm.read()))
""")
    pole.control("corrupt", sensor="pms5003", count=3)
    r = pole.run("print(json.dumps([pm.read(), pm.checksum_errors, pm.frames]))", resume=True)
    reading, errors, frames = r
    assert reading == [AIR["pm1"], AIR["pm25"], AIR["pm10"]]   # asked again until good
    assert errors == 3
    assert frames == 2


def test_pms5003_resyncs_after_garbage(pole: Pole) -> None:
    pole.run("""
from drivers.pms5003 import PMS5003
pm = PMS5003(uart(), set_pin=SET, warm=True)
print(json.dumps(pm.read()))
""")
    # noise and a stray 0x42 before each of the next frames (control has no `kind`: direct)
    pole.parts.fault("corrupt", sensor="pms5003", count=3, kind="garbage")
    r = pole.run("""
out = [pm.read() for _ in range(3)]
print(json.dumps([out, pm.garbage, pm.checksum_errors, pm.frames]))
""", resume=True)
    out, garbage, errors, frames = r
    assert out == [[AIR["pm1"], AIR["pm25"], AIR["pm10"]]] * 3
    assert garbage >= 3 * 4                           # >= 3 noise bytes + the stray 0x42
    assert errors == 0 and frames == 4


def test_pms5003_active_mode_stream_joined_mid_frame(pole: Pole) -> None:
    """Active mode: frames every second, the driver starts wherever the line is."""
    pole.parts.fault("corrupt", sensor="pms5003", count=1, kind="garbage")
    r = pole.run("""
from drivers.pms5003 import PMS5003
pm = PMS5003(uart(), set_pin=SET, passive=False, warm=True)
got = []
t = time.ticks_ms()
while len(got) < 3 and time.ticks_diff(time.ticks_ms(), t) < 6000:
    if pm.poll():
        got.append([pm.pm1_0, pm.pm2_5, pm.pm10])
    time.sleep_ms(20)
print(json.dumps([got, pm.checksum_errors, pm.garbage]))
""")
    got, errors, garbage = r
    assert got == [[AIR["pm1"], AIR["pm25"], AIR["pm10"]]] * 3
    assert errors == 0 and garbage >= 4
    assert pole.control("status")["peripherals"]["pms5003"]["active"] is True


def test_pms5003_warm_up_readings_discarded(pole: Pole) -> None:
    """Sleep with SET, wake: readings in the fan's first 30 s never come out as values."""
    r = pole.run("""
from drivers.pms5003 import PMS5003
pm = PMS5003(uart(), set_pin=SET, warm=True)
assert pm.read() is not None
pm.sleep()
time.sleep_ms(300)
print(json.dumps(error(pm.read)))
""")
    assert r[0] == "SensorFault" and "asleep" in r[1]
    assert pole.control("status")["peripherals"]["pms5003"]["asleep"] is True
    r = pole.run("""
pm.wake()
t0 = time.ticks_ms()
log = []
while pm.warming_up:
    start = time.ticks_diff(time.ticks_ms(), t0)
    value = pm.read()
    log.append([start, time.ticks_diff(time.ticks_ms(), t0), value])
    time.sleep_ms(1500)
ready = time.ticks_diff(time.ticks_ms(), t0)
after = [pm.read() for _ in range(3)]            # warming_up said no: these count
print(json.dumps([log, ready, after, pm.discarded]))
""", resume=True, timeout=120)
    log, ready, after, discarded = r
    early = [v for _, end, v in log if end < 29_900]        # asked and answered in warm-up
    assert len(early) >= 10 and all(v is None for v in early)   # discarded, not reported
    assert 30_000 <= ready <= 32_000
    assert after == [[AIR["pm1"], AIR["pm25"], AIR["pm10"]]] * 3
    assert discarded == sum(1 for _, _, v in log if v is None)


def test_pms5003_sleep_and_wake_by_command(pole: Pole) -> None:
    r = pole.run("""
from drivers.pms5003 import PMS5003
pm = PMS5003(uart(), warm=True)                   # no SET pin: 0xE4 commands
first = pm.read()
pm.sleep()
time.sleep_ms(200)
print(json.dumps(first))
""")
    assert r == [AIR["pm1"], AIR["pm25"], AIR["pm10"]]
    assert pole.control("status")["peripherals"]["pms5003"]["asleep"] is True
    r = pole.run("""
pm.wake()
print(json.dumps([pm.read(), pm.warming_up, pm.discarded]))
""", resume=True)
    assert r == [None, True, 1]                       # the frame came, flagged and dropped
    state = pole.control("status")["peripherals"]["pms5003"]
    assert state["asleep"] is False and state["warming_up"] is True
    assert state["active"] is False                   # passive mode set again after wake-up


def test_pms5003_unplugged_says_what_to_check_and_recovers(plugged: Pole) -> None:
    pole = plugged
    pole.run("""
from drivers.pms5003 import PMS5003
pm = PMS5003(uart(), set_pin=SET, warm=True)
print(json.dumps(pm.read()))
""")
    pole.control("unplug", sensor="pms5003")
    err = pole.run("print(json.dumps(error(pm.read)))", resume=True)
    assert err[0] == "SensorMissing"
    assert "PMS5003" in err[1] and "5 V" in err[1] and "RX" in err[1] and "SET" in err[1]
    pole.control("plug", sensor="pms5003")           # power-on: active mode, fan from rest
    r = pole.run("print(json.dumps([pm.read(), pm.warming_up, pm.frames]))", resume=True)
    reading, warming, frames = r
    assert reading is None and warming                # it answers, but the fan is cold
    assert frames == 2
    state = pole.control("status")["peripherals"]["pms5003"]
    assert state["active"] is False                   # the driver set passive mode again


def test_pms5003_wrong_baud_rate(pole: Pole) -> None:
    """At the wrong baud rate the bytes are framing garbage: a fault that names 9600."""
    r = pole.run(f"""
from drivers.pms5003 import PMS5003
pm = PMS5003(uart(), set_pin=SET, passive=False, warm=True)   # the part sends every second
assert pm.read() is not None
slow = UART({PMS_UART}, baudrate=4800, tx={PINS['uart_tx']}, rx={PINS['uart_rx']}, timeout=0)
wrong = PMS5003(slow, set_pin=SET, passive=False, warm=True)
print(json.dumps([error(lambda: wrong.read(timeout_ms=2500)), wrong.bytes_received]))
""")
    err, heard = r
    assert heard > 0
    assert err[0] == "SensorFault" and "no valid frame" in err[1] and "9600" in err[1]
    pole.run("""
from drivers.pms5003 import PMS5003
PMS5003(uart(), set_pin=SET, warm=True).read()    # back to passive for the other tests
print(json.dumps(1))
""")


# -- the board as `citynode-emu run` starts it -----------------------------------------------
def test_drivers_on_a_citynode_emu_board(tmp_path: Path) -> None:
    """Through `citynode-emu run --scenario` and the control socket only, at noon:
    readings agree with the scenario values that `status` reports."""
    scenario = tmp_path / "noon.json"
    scenario.write_text(json.dumps({"seed": 3, "start": "2026-06-21T12:30:00+02:00"}))
    emu = start_emulator(tmp_path, extra=["--scenario", str(scenario)])
    try:
        _drivers_on_cli_board(emu.boards[0])
    finally:
        emu.stop()


def _drivers_on_cli_board(emu_board: BoardHandle) -> None:
    status = emu_board.control("status")
    assert "peripherals" in status, "citynode-emu run attaches no simulated parts"
    install_firmware(emu_board)
    before = emu_board.control("status")["peripherals"]["scenario"]
    assert before["lux"] > 10_000                     # daylight: the scenario file was used
    out = mpremote(emu_board.link, "exec", PRELUDE + f"""
from drivers.bh1750 import BH1750
from drivers.bme280 import BME280
from drivers.pms5003 import PMS5003
light = BH1750(i2c, address={BH_ADDR}, mtreg=31)  # up to 121 klx
air = BME280(i2c, address={BME_ADDR}, osrs_t=16, osrs_p=16, osrs_h=16)
pm = PMS5003(uart(), set_pin=SET, warm=True)
print(json.dumps([light.lux, air.read(), pm.read()]))
""", timeout=60)
    after = emu_board.control("status")["peripherals"]["scenario"]
    lux, (t, h, p), pm = last_json(out)

    def near(value, key, tol):
        lo, hi = sorted((before[key], after[key]))
        assert lo - tol <= value <= hi + tol, (key, value, before[key], after[key])

    near(lux, "lux", _lux_step("HRES", 31) / 2 + 1e-9)
    near(t, "temperature", 0.01)
    near(h, "humidity", 0.01)
    near(p, "pressure", 0.2)
    assert pm is not None
    for value, key in zip(pm, ("pm1", "pm25", "pm10"), strict=True):
        near(value, key, 0.5)

    emu_board.control("unplug", sensor="bh1750")
    out = mpremote(emu_board.link, "resume", "exec",
                   "print(json.dumps(error(lambda: light.lux)))", timeout=60)
    err = last_json(out)
    assert err[0] == "SensorMissing" and "0x23" in err[1]
    emu_board.control("plug", sensor="bh1750")


# -- pure functions on the MicroPython unix port ------------------------------------------------
def test_bme280_integer_compensation_against_the_datasheet_floating_point(tmp_path: Path) -> None:
    """The driver's integer compensation (unix port, 110 KB heap) agrees with the
    datasheet's double-precision formulas (section 8.1, written here independently)
    over the part's ADC range, for two sets of trim values, and is bit-exact with the
    emulator's integer code."""
    import struct

    from citynode.emulator.devices import bme280 as emu_bme
    from citynode.testing.micropython import run_micropython

    trims = [
        # the datasheet's example T/P trim; H from a production part
        (27504, 26435, -1000, 36477, -10685, 3024, 2855, 140, -7, 15500, -14600, 6000,
         75, 362, 0, 313, 50, 30),
        (28126, 26545, 50, 37865, -10516, 3024, 5765, -81, -7, 12300, -12000, 5000,
         75, 350, 0, 344, 0, 30),
    ]
    for trim in trims:
        t = dict(zip(["T1", "T2", "T3", "P1", "P2", "P3", "P4", "P5", "P6", "P7", "P8", "P9",
                      "H1", "H2", "H3", "H4", "H5", "H6"], trim, strict=True))
        low = struct.pack("<HhhHhhhhhhhh", *trim[:12]) + bytes((0, t["H1"]))
        h4, h5 = t["H4"] & 0xFFF, t["H5"] & 0xFFF
        high = struct.pack("<hB", t["H2"], t["H3"]) + bytes(
            (h4 >> 4, (h4 & 0xF) | ((h5 & 0xF) << 4), h5 >> 4, t["H6"] & 0xFF))
        samples = _lcg_samples(seed=len(trim) + trim[0], n=500)
        code = f"""
import json
from drivers import bme280
cal = bme280.parse_calibration({low!r}, {high!r})
print(json.dumps(list(cal)))
x = {len(trim) + trim[0]}
for _ in range(500):
    adc = []
    for lo, span in ((380000, 240000), (200000, 300000), (20000, 30000)):
        x = (x * 1103515245 + 12345) & 0x7FFFFFFF
        adc.append(lo + x % span)
    t, t_fine = bme280.compensate_t(cal, adc[0])
    print(json.dumps([t, bme280.compensate_p(cal, adc[1], t_fine),
                      bme280.compensate_h(cal, adc[2], t_fine)]))
"""
        lines = run_micropython(code).strip().splitlines()
        cal, out = json.loads(lines[0]), [json.loads(line) for line in lines[1:]]
        assert tuple(cal) == trim
        for (adc_t, adc_p, adc_h), (ti, pi, hi) in zip(samples, out, strict=True):
            tf, pf, hf = _float_compensation(t, adc_t, adc_p, adc_h)
            assert ti / 100 == pytest.approx(tf, abs=0.01)
            if 30_000 <= pf <= 110_000:               # the part's operating range
                # the two datasheet variants differ by up to ~0.45 Pa (truncations)
                assert pi / 256 == pytest.approx(pf, abs=0.5)
            if 0 < hf < 100:
                assert hi / 1024 == pytest.approx(hf, abs=0.01)
            # and bit-exact with the emulator's own integer code (written separately)
            ref_t, ref_fine = emu_bme.compensate_t(adc_t, t)
            assert (ti, pi, hi) == (ref_t, emu_bme.compensate_p(adc_p, ref_fine, t),
                                    emu_bme.compensate_h(adc_h, ref_fine, t))


def _lcg_samples(seed: int, n: int) -> list[tuple[int, int, int]]:
    """(adc_T, adc_P, adc_H) over the ADC ranges the part produces, as the board computes them."""
    x, out = seed, []
    for _ in range(n):
        adc = []
        for lo, span in ((380_000, 240_000), (200_000, 300_000), (20_000, 30_000)):
            x = (x * 1103515245 + 12345) & 0x7FFFFFFF
            adc.append(lo + x % span)
        out.append(tuple(adc))
    return out


def _float_compensation(c: dict, adc_t: int, adc_p: int, adc_h: int) -> tuple:
    """The datasheet's floating-point compensation (section 8.1)."""
    var1 = (adc_t / 16384.0 - c["T1"] / 1024.0) * c["T2"]
    var2 = ((adc_t / 131072.0 - c["T1"] / 8192.0) ** 2) * c["T3"]
    t_fine = var1 + var2
    temp = t_fine / 5120.0
    var1 = t_fine / 2.0 - 64000.0
    var2 = var1 * var1 * c["P6"] / 32768.0
    var2 = var2 + var1 * c["P5"] * 2.0
    var2 = var2 / 4.0 + c["P4"] * 65536.0
    var1 = (c["P3"] * var1 * var1 / 524288.0 + c["P2"] * var1) / 524288.0
    var1 = (1.0 + var1 / 32768.0) * c["P1"]
    p = 1048576.0 - adc_p
    p = (p - var2 / 4096.0) * 6250.0 / var1
    var1 = c["P9"] * p * p / 2147483648.0
    var2 = p * c["P8"] / 32768.0
    press = p + (var1 + var2 + c["P7"]) / 16.0
    h = t_fine - 76800.0
    h = (adc_h - (c["H4"] * 64.0 + c["H5"] / 16384.0 * h)) * (
        c["H2"] / 65536.0 * (1.0 + c["H6"] / 67108864.0 * h * (1.0 + c["H3"] / 67108864.0 * h)))
    h = h * (1.0 - c["H1"] * h / 524288.0)
    return temp, press, min(100.0, max(0.0, h))


def test_pms5003_parser_resync_on_the_unix_port() -> None:
    """Frame parsing from a byte stream cut at every possible place: garbage, stray
    headers, command answers, a bad checksum, a frame split over reads (unix port)."""
    from citynode.testing.micropython import run_micropython

    def frame(words, bad=False):
        body = bytes((0x42, 0x4D, 0, 28)) + b"".join(w.to_bytes(2, "big") for w in words)
        total = (sum(body) + (0x0101 if bad else 0)) & 0xFFFF
        return body + total.to_bytes(2, "big")

    good = [10, 20, 30, 11, 21, 31, 900, 300, 50, 5, 1, 0, 0x9700]
    other = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 0x9700]
    ack = bytes.fromhex("424d0004e1000174")
    stream = (b"\x00\x42\x42\x4d\xff" + frame(good) + ack + b"\x42" + frame(good, bad=True)
              + b"\x4d\x42\x4d\x00" + frame(other) + b"\x42\x4d\x00\x1c\x00")
    code = f"""
import json, time
from drivers.pms5003 import PMS5003
STREAM = {stream!r}
class Line:
    # the bytes of one stream, `step` more arriving before each poll
    def __init__(self, step):
        self.pos, self.step, self.budget = 0, step, 0
    def any(self):
        return min(self.budget, len(STREAM) - self.pos)
    def readinto(self, buf, n):
        n = min(n, self.any())
        buf[:n] = STREAM[self.pos:self.pos + n]
        self.pos += n
        self.budget -= n
        return n
    def write(self, data):  # the wake command: a tick passes while it goes out, as on
        time.sleep_ms(2)    # the chip (with warm=True the first frame was then dropped)
        return len(data)
out = []
for step in (1, 2, 3, 5, 7, 31, 32, 33, 64):
    line = Line(step)
    pm = PMS5003(line, passive=False, warm=True)
    seen = []
    for _ in range(len(STREAM)):
        line.budget = step
        if pm.poll():
            seen.append(list(pm.data))
    out.append([seen, pm.checksum_errors, pm.acks, pm.frames])
print(json.dumps(out))
"""
    for seen, errors, acks, frames in last_json(run_micropython(code)):
        assert seen == [good, other] and errors == 1 and acks == 1 and frames == 2


def test_drivers_import_and_footprint_on_the_unix_port() -> None:
    """Each driver imports with a small heap cost, and the shared errors are OSErrors."""
    from citynode.testing.micropython import run_micropython

    out = run_micropython("""
import gc, json
gc.collect()
before = gc.mem_free()
from drivers import bh1750, bme280, pms5003, sensor
gc.collect()
used = before - gc.mem_free()
print(json.dumps([used, issubclass(sensor.SensorMissing, OSError),
                  issubclass(sensor.SensorFault, OSError)]))
""")
    used, missing_is_oserror, fault_is_oserror = last_json(out)
    assert missing_is_oserror and fault_is_oserror
    # ~23 KB here on the 64-bit unix port (8-byte words); about half that on the ESP32
    assert used < 32 * 1024, f"the drivers take {used} bytes of heap to import"


HEAP_LOCKED = r'''
import json, micropython, time
from drivers.pms5003 import PMS5003
from drivers.bh1750 import BH1750
def frame(words):
    b = bytearray(32)
    b[0], b[1], b[3] = 0x42, 0x4D, 28
    for i, w in enumerate(words):
        b[4 + 2 * i] = w >> 8
        b[5 + 2 * i] = w & 0xFF
    s = sum(b[:30])
    b[30], b[31] = s >> 8, s & 0xFF
    return b
STREAM = (bytearray(b'\x00\x42\x13') + frame([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 0x9700])
          + bytearray(b'\x42\x4d\x00\x04\xe1\x00\x01\x74'))   # garbage, frame, ack
class Line:
    def __init__(self):
        self.pos = 0
    def any(self):
        return len(STREAM) - self.pos if self.pos < len(STREAM) else 0
    def readinto(self, buf, n):
        for i in range(n):
            buf[i] = STREAM[self.pos + i]
        self.pos += n
        return n
    def write(self, data):
        return 7
class Bus:
    def writeto(self, addr, buf, stop=True):
        return 1
    def readfrom_into(self, addr, buf, stop=True):
        buf[0] = 0x12
        buf[1] = 0x34
line = Line()
pm = PMS5003(line, passive=False, warm=True)
light = BH1750(Bus())
light.read_count()
pm.poll()
got = 0
micropython.heap_lock()
try:
    for k in range(50):
        line.pos = 0
        got += pm.poll()
        c = light.read_count()
finally:
    micropython.heap_unlock()
print(json.dumps([got, pm.frames, pm.acks, pm.garbage, c]))
'''


def test_read_paths_allocate_nothing_on_the_unix_port() -> None:
    """PMS5003 frame parsing and the BH1750 count read run with the heap locked
    (micropython.heap_lock: any allocation raises MemoryError). The emulated board's
    `machine` allocates per bus call, so the bus here is a minimal non-allocating
    stand-in; BME280 compensation needs ints above 31 bits and is not in this check."""
    from citynode.testing.micropython import run_micropython

    got, frames, acks, garbage, count = last_json(
        run_micropython(HEAP_LOCKED))
    assert got == 50 and frames == 51 and acks == 51 and garbage == 153
    assert count == 0x1234


def test_drivers_survive_a_part_holding_the_bus(plugged: Pole) -> None:
    """A part that holds SCL/SDA low: every transaction on the bus waits the chip's
    timeout and raises ETIMEDOUT; the drivers report the part missing, and both parts
    work again once the bus is let go."""
    pole = plugged
    pole.scenario.override(lux=640.0)
    pole.run(f"""
from drivers.bh1750 import BH1750
from drivers.bme280 import BME280
light = BH1750(i2c, address={BH_ADDR})
air = BME280(i2c, address={BME_ADDR})
print(json.dumps([light.lux, air.read()]))
""")
    pole.control("stuck", sensor="bh1750")
    try:
        r = pole.run("""
def timed(f):
    t = time.ticks_ms()
    e = error(f)
    return e + [time.ticks_diff(time.ticks_ms(), t)]
print(json.dumps([timed(lambda: light.lux), timed(air.read)]))
""", resume=True)
    finally:
        pole.control("unstuck", sensor="bh1750")
    (light_kind, light_text, light_ms), (air_kind, air_text, air_ms) = r
    assert light_kind == air_kind == "SensorMissing"        # the BME280 cannot talk either
    assert "116" in light_text and "0x23" in light_text and "116" in air_text
    assert light_ms >= 200 and air_ms >= 200                # each waited the chip's timeout
    lux, (t, h, p) = pole.run("print(json.dumps([light.lux, air.read()]))", resume=True)
    assert abs(lux - 640.0) <= 0.5
    assert t == pytest.approx(WEATHER["temperature"], abs=0.015)


def test_driver_messages_name_the_bus_from_its_repr(pole: Pole) -> None:
    """drivers/sensor.py reads the pins from the ESP32 port's repr of the bus."""
    names = pole.run("""
from drivers.sensor import bus_name
print(json.dumps([bus_name(i2c, 'the I2C bus'), bus_name(uart(), 'the UART')]))
""")
    assert names == [f"I2C(0, scl={PINS['i2c_scl']}, sda={PINS['i2c_sda']})",
                     f"UART({PMS_UART}, tx={PINS['uart_tx']}, rx={PINS['uart_rx']})"]
