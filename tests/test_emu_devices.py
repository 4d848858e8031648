"""The emulated board's simulated parts, at bus level, against their datasheets.

Host-only: Peripherals is driven the way the board core's bus handler drives it,
on a manual clock (so measurement times, baud pacing and fan warm-up are exact
and fast), except the I2S stream, which is paced in real time.
"""

from __future__ import annotations

import errno
import json
import math
import socket
import struct
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import signal

from citynode.boards import get_board
from citynode.emulator.devices import bme280 as bme280_mod
from citynode.emulator.devices.mic import FULL_SCALE, Microphone
from citynode.emulator.i2s import I2SStream, dma_ring_frames
from citynode.emulator.peripherals import Peripherals
from citynode.emulator.scenario import Event, ManualClock, Scenario

BH, BME = 0x23, 0x76
PMS_UART = 2


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def scenario(clock: ManualClock) -> Scenario:
    return Scenario(seed=7, clock=clock, start="2026-04-15T12:00:00+02:00")


@pytest.fixture
def periph(scenario: Scenario):
    p = Peripherals(get_board("esp32-devkitc"), scenario)
    yield p
    p.close()


# -- scenario --------------------------------------------------------------------------------
def test_scenario_is_deterministic_and_scaled(clock: ManualClock) -> None:
    a = Scenario(seed=3, time_scale=720, clock=clock)
    b = Scenario(seed=3, time_scale=720, clock=clock)
    c = Scenario(seed=4, time_scale=720, clock=clock)
    assert a.values(12345.0) == b.values(12345.0)
    assert a.values(12345.0) != c.values(12345.0)
    clock.advance(120.0)  # two minutes of device time is a whole day at 720x
    assert a.now() == pytest.approx(86400.0)


def test_scenario_day_and_night(clock: ManualClock) -> None:
    s = Scenario(seed=1, clock=clock, start="2026-06-21T00:00:00+02:00")
    assert s.lux(1 * 3600) == pytest.approx(0.1)              # 01:00, no lamp
    assert 10_000 <= s.lux(13.5 * 3600) <= 60_000             # around solar noon
    assert 40 <= s.noise_dba(3 * 3600) <= 50                  # night traffic
    assert 55 <= s.noise_dba(8 * 3600) <= 75                  # morning rush
    assert s.temperature(15 * 3600) > s.temperature(4 * 3600)
    assert s.humidity(15 * 3600) < s.humidity(4 * 3600)
    assert 100_000 < s.pressure(0) < 102_700
    assert s.pm25(19.5 * 3600) > s.pm25(13 * 3600) + 20      # the default evening episode


def test_scenario_from_json(tmp_path, clock: ManualClock) -> None:
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"seed": 5, "time_scale": 60, "start": "2026-01-10T08:00:00",
                                "events": [{"time": 30, "kind": "gunshot", "level_db": 125}],
                                "episodes": [], "pm25_base": 20}))
    s = Scenario.load(path, clock=clock)
    assert s.time_scale == 60 and s.events[0].kind == "gunshot"
    assert s.events_between(0, 60) == [Event(30, "gunshot", 125)]
    assert Scenario.from_dict(s.to_dict(), clock=clock).values(100.0) == s.values(100.0)
    pinned = Scenario.from_dict({"pinned": {"pm25": 40, "lux": 5}}, clock=clock)
    assert pinned.pm(50_000.0)[1] == 40 and pinned.lux(43_200.0) == 5
    assert Scenario.from_dict(pinned.to_dict(), clock=clock).pm25(0) == 40
    with pytest.raises(ValueError, match="unknown quantity"):
        Scenario.from_dict({"pinned": {"pm2.5": 40}}, clock=clock)
    with pytest.raises(ValueError, match="unknown scenario parameter"):
        Scenario.from_dict({"luxx": 3}, clock=clock)


# -- I2C wiring ----------------------------------------------------------------------------------
def test_i2c_scan_and_nack(periph: Peripherals) -> None:
    assert periph.i2c_scan(0) == [BH, BME]
    with pytest.raises(OSError) as exc:
        periph.i2c_write(0, 0x40, b"\x00")
    assert exc.value.errno == errno.ENODEV
    with pytest.raises(OSError) as exc:
        periph.i2c_read(0, 0x77, 2)
    assert exc.value.errno == errno.ENODEV


# -- BH1750 ----------------------------------------------------------------------------------------
def bh_lux(raw: bytes, mtreg: int = 69, h2: bool = False) -> float:
    """The datasheet's conversion, as a driver does it."""
    count = raw[0] << 8 | raw[1]
    lux = count / 1.2 * (69 / mtreg)
    return lux / 2 if h2 else lux


def test_bh1750_continuous_h_res_timing_and_formula(periph, scenario, clock) -> None:
    scenario.override(lux=1000.0)
    assert periph.i2c_write(0, BH, b"\x01") == 1       # power on
    periph.i2c_write(0, BH, b"\x10")                   # continuous H-res
    clock.advance(0.100)
    assert periph.i2c_read(0, BH, 2) == b"\x00\x00"    # 120 ms not over: previous result
    clock.advance(0.030)
    assert bh_lux(periph.i2c_read(0, BH, 2)) == pytest.approx(1000.0, abs=1)
    scenario.override(lux=250.0)
    clock.advance(0.120)                               # the next conversion
    assert bh_lux(periph.i2c_read(0, BH, 2)) == pytest.approx(250.0, abs=1)


def test_bh1750_one_time_powers_down(periph, scenario, clock) -> None:
    scenario.override(lux=500.0)
    periph.i2c_write(0, BH, b"\x01\x20")               # power on, one-time H-res
    clock.advance(0.125)
    assert bh_lux(periph.i2c_read(0, BH, 2)) == pytest.approx(500.0, abs=1)
    scenario.override(lux=20.0)
    clock.advance(0.5)
    assert bh_lux(periph.i2c_read(0, BH, 2)) == pytest.approx(500.0, abs=1)  # no new measurement
    assert not periph.parts["bh1750"].powered
    periph.i2c_write(0, BH, b"\x07")                   # reset is refused in power-down
    assert bh_lux(periph.i2c_read(0, BH, 2)) == pytest.approx(500.0, abs=1)
    periph.i2c_write(0, BH, b"\x01\x07")               # power on, reset: data register cleared
    assert periph.i2c_read(0, BH, 2) == b"\x00\x00"


def test_bh1750_mtreg_and_resolutions(periph, scenario, clock) -> None:
    scenario.override(lux=300.0)
    mt = 254
    periph.i2c_write(0, BH, bytes((0x01, 0x40 | mt >> 5, 0x60 | (mt & 0x1F), 0x10)))
    clock.advance(0.120 * mt / 69 - 0.02)              # integration time scales with MTreg
    assert periph.i2c_read(0, BH, 2) == b"\x00\x00"
    clock.advance(0.03)
    raw = periph.i2c_read(0, BH, 2)
    assert raw[0] << 8 | raw[1] == round(300 * 1.2 * mt / 69)
    assert bh_lux(raw, mtreg=mt) == pytest.approx(300.0, abs=0.3)

    mt = 69
    periph.i2c_write(0, BH, bytes((0x40 | mt >> 5, 0x60 | (mt & 0x1F), 0x11)))  # H-res2
    clock.advance(0.121)
    assert bh_lux(periph.i2c_read(0, BH, 2), h2=True) == pytest.approx(300.0, abs=0.5)

    scenario.override(lux=40000.0)
    periph.i2c_write(0, BH, b"\x13")                   # L-res: 16 ms, 4 lx steps
    clock.advance(0.017)
    assert bh_lux(periph.i2c_read(0, BH, 2)) == pytest.approx(40000.0, abs=4)
    scenario.override(lux=90000.0)
    clock.advance(0.017)
    assert periph.i2c_read(0, BH, 2) == b"\xff\xfc"    # saturated (L-res: low bits 0)


def test_bh1750_sees_the_lamp(periph, scenario, clock) -> None:
    scenario.override(lux=0.1)
    periph.i2c_write(0, BH, b"\x01\x10")
    clock.advance(0.13)
    dark = bh_lux(periph.i2c_read(0, BH, 2))
    periph.pwm(4, 1000, 65535)                         # lamp_pwm pin of the devkitc, full on
    clock.advance(0.12)
    lit = bh_lux(periph.i2c_read(0, BH, 2))
    assert dark < 1 and lit == pytest.approx(scenario.params.lamp_spill_lux, abs=1)
    assert periph.state()["lamp"] == 1.0


def test_bh1750_unplug_and_garbage(periph, scenario, clock) -> None:
    periph.fault("unplug", sensor="bh1750")
    assert periph.i2c_scan(0) == [BME]
    with pytest.raises(OSError) as exc:
        periph.i2c_write(0, BH, b"\x01")
    assert exc.value.errno == errno.ENODEV
    assert periph.state()["unplugged"] == ["bh1750"]
    periph.fault("plug", sensor="bh1750")
    scenario.override(lux=100.0)
    periph.i2c_write(0, BH, b"\x01\x10")
    clock.advance(0.13)
    good = periph.i2c_read(0, BH, 2)
    periph.fault("corrupt", sensor="bh1750", count=3)
    bad = [periph.i2c_read(0, BH, 2) for _ in range(3)]
    assert any(b != good for b in bad)
    assert periph.i2c_read(0, BH, 2) == good


# -- BME280: the datasheet's compensation, written here independently ------------------------------
def s32(x: int) -> int:
    x &= 0xFFFFFFFF
    return x - (1 << 32) if x & 0x80000000 else x


def s64(x: int) -> int:
    x &= 0xFFFFFFFFFFFFFFFF
    return x - (1 << 64) if x & (1 << 63) else x


def c_div(a: int, b: int) -> int:
    """C division: truncates toward zero."""
    q = abs(a) // abs(b)
    return q if (a < 0) == (b < 0) else -q


def read_trim(periph) -> dict[str, int]:
    periph.i2c_write(0, BME, b"\x88")
    a = periph.i2c_read(0, BME, 26)
    periph.i2c_write(0, BME, b"\xe1")
    b = periph.i2c_read(0, BME, 7)
    names = ["T1", "T2", "T3", "P1", "P2", "P3", "P4", "P5", "P6", "P7", "P8", "P9"]
    trim = dict(zip(names, struct.unpack("<HhhHhhhhhhhh", a[:24]), strict=True))
    trim["H1"] = a[25]
    trim["H2"], trim["H3"] = struct.unpack("<hB", b[:3])
    trim["H4"] = s32((b[3] << 24) | ((b[4] & 0x0F) << 20)) >> 20   # signed 12-bit
    trim["H5"] = s32((b[5] << 24) | ((b[4] >> 4) << 20)) >> 20
    trim["H6"] = struct.unpack("<b", b[6:7])[0]
    return trim


def datasheet_compensate(adc_t: int, adc_p: int, adc_h: int, d: dict[str, int]):
    """BME280_compensate_T_int32, BME280_compensate_P_int64, bme280_compensate_H_int32."""
    var1 = s32((s32((adc_t >> 3) - (d["T1"] << 1)) * d["T2"]) >> 11)
    var2 = s32((s32((s32((adc_t >> 4) - d["T1"]) * s32((adc_t >> 4) - d["T1"])) >> 12)
                    * d["T3"]) >> 14)
    t_fine = s32(var1 + var2)
    temp = s32((t_fine * 5 + 128) >> 8)

    v1 = s64(t_fine - 128000)
    v2 = s64(v1 * v1 * d["P6"])
    v2 = s64(v2 + s64((v1 * d["P5"]) << 17))
    v2 = s64(v2 + s64(d["P4"] << 35))
    v1 = s64((s64(v1 * v1 * d["P3"]) >> 8) + s64((v1 * d["P2"]) << 12))
    v1 = s64((s64((1 << 47) + v1) * d["P1"]) >> 33)
    p = 1048576 - adc_p
    p = s64(c_div(s64(s64(s64(p << 31) - v2) * 3125), v1))
    v1 = s64((d["P9"] * (p >> 13) * (p >> 13)) >> 25)
    v2 = s64((d["P8"] * p) >> 19)
    press = s64(((p + v1 + v2) >> 8) + (d["P7"] << 4))

    x = s32(t_fine - 76800)
    x = s32(s32(s32(s32((adc_h << 14) - (d["H4"] << 20) - s32(d["H5"] * x)) + 16384) >> 15)
            * s32(s32(s32(s32(s32(s32(s32(x * d["H6"]) >> 10)
                                    * s32(s32(s32(x * d["H3"]) >> 11) + 32768)) >> 10)
                          + 2097152) * d["H2"] + 8192) >> 14))
    x = s32(x - s32(s32(s32(s32((x >> 15) * (x >> 15)) >> 7) * d["H1"]) >> 4))
    x = min(max(x, 0), 419430400)
    return temp / 100, press / 256, (x >> 12) / 1024


def read_raw(periph) -> tuple[int, int, int]:
    periph.i2c_write(0, BME, b"\xf7")
    d = periph.i2c_read(0, BME, 8)
    return ((d[3] << 12) | (d[4] << 4) | (d[5] >> 4), (d[0] << 12) | (d[1] << 4) | (d[2] >> 4),
            (d[6] << 8) | d[7])


def test_bme280_identity_and_calibration(periph) -> None:
    periph.i2c_write(0, BME, b"\xd0")
    assert periph.i2c_read(0, BME, 1) == b"\x60"
    assert read_trim(periph) == bme280_mod.TRIM
    periph.i2c_write(0, BME, b"\xf7")                  # reset values of the data registers
    assert periph.i2c_read(0, BME, 8) == bytes((0x80, 0, 0, 0x80, 0, 0, 0x80, 0))


@pytest.mark.parametrize("weather,osrs,tol_p", [
    ((21.37, 101_325.0, 45.2), 0x25, 2.0),     # x1/x1: 16-bit words
    ((-12.5, 97_850.5, 88.8), 0xB5, 0.2),      # x16/x16: 20-bit words
    ((38.9, 103_010.0, 12.3), 0x49, 1.0),      # x2/x2
])
def test_bme280_forced_measurement_compensates_to_scenario(periph, scenario, clock, weather,
                                                          osrs, tol_p) -> None:
    temp, press, rh = weather
    scenario.override(temperature=temp, pressure=press, humidity=rh)
    trim = read_trim(periph)
    periph.i2c_write(0, BME, b"\xf2\x01")              # osrs_h x1 (applies on the ctrl_meas write)
    periph.i2c_write(0, BME, bytes((0xF4, osrs | 0x01)))  # forced mode
    periph.i2c_write(0, BME, b"\xf3")
    assert periph.i2c_read(0, BME, 1)[0] & 0x08        # measuring
    clock.advance(0.070)                               # x16/x16/x1: 68 ms typical
    periph.i2c_write(0, BME, b"\xf3")
    status, ctrl_meas = periph.i2c_read(0, BME, 2)     # auto-increment: 0xF3, 0xF4
    assert status & 0x08 == 0 and ctrl_meas & 0x03 == 0  # done, back to sleep
    adc_t, adc_p, adc_h = read_raw(periph)
    if osrs >> 5 == 1:
        assert adc_t & 0x0F == 0                       # 16-bit resolution without the filter
    t, p, h = datasheet_compensate(adc_t, adc_p, adc_h, trim)
    assert t == pytest.approx(temp, abs=0.011)
    assert p == pytest.approx(press, abs=tol_p)
    assert h == pytest.approx(rh, abs=0.02)


def test_bme280_normal_mode_skip_and_reset(periph, scenario, clock) -> None:
    scenario.override(temperature=10.0, pressure=100_000.0, humidity=50.0)
    trim = read_trim(periph)
    periph.i2c_write(0, BME, b"\xf5\x00\xf2\x01\xf4\x27")  # standby 0.5 ms, normal mode
    clock.advance(0.02)
    assert datasheet_compensate(*read_raw(periph), trim)[0] == pytest.approx(10.0, abs=0.011)
    scenario.override(temperature=25.0)
    clock.advance(0.02)                                # normal mode keeps measuring
    assert datasheet_compensate(*read_raw(periph), trim)[0] == pytest.approx(25.0, abs=0.011)
    periph.i2c_write(0, BME, b"\xf2\x00\xf4\x27")      # humidity skipped
    clock.advance(0.02)
    assert read_raw(periph)[2] == 0x8000
    periph.i2c_write(0, BME, b"\xe0\xb6")              # soft reset
    periph.i2c_write(0, BME, b"\xf4")
    assert periph.i2c_read(0, BME, 1) == b"\x00"
    assert read_raw(periph) == (0x80000, 0x80000, 0x8000)
    assert read_trim(periph) == trim                   # NVM survives


def test_bme280_keeps_registers_across_chip_reset(periph) -> None:
    periph.i2c_write(0, BME, b"\xf5\xa0")
    periph.reset()                                     # the ESP32 resets, the BME280 does not
    periph.i2c_write(0, BME, b"\xf5")
    assert periph.i2c_read(0, BME, 1) == b"\xa0"


# -- PMS5003 --------------------------------------------------------------------------------------
def pms_cmd(cmd: int, data: int) -> bytes:
    body = bytes((0x42, 0x4D, cmd, data >> 8, data & 0xFF))
    return body + struct.pack(">H", sum(body))


def frames_in(data: bytes) -> list[tuple[bool, tuple[int, ...]]]:
    """Resync on 0x42 0x4D; (checksum ok, 13 words) per 32-byte frame."""
    out, i = [], 0
    while True:
        i = data.find(b"\x42\x4d\x00\x1c", i)
        if i < 0 or i + 32 > len(data):
            return out
        frame = data[i:i + 32]
        ok = struct.unpack(">H", frame[30:])[0] == sum(frame[:30]) & 0xFFFF
        out.append((ok, struct.unpack(">13H", frame[4:30])))
        i += 32 if ok else 2


def read_all(periph, seconds: float, clock: ManualClock) -> bytes:
    clock.advance(seconds)
    return periph.uart_read(PMS_UART, 4096, 0)[1]


def test_pms5003_active_frames(periph, scenario, clock) -> None:
    scenario.override(pm25=20.0, pm1=14.0, pm10=32.0)
    periph.uart_init(PMS_UART, 9600, 256)
    clock.advance(1.0 + 10 * 10 / 9600)                # the first frame has just begun
    avail, part = periph.uart_read(PMS_UART, 100, 0)
    assert avail == len(part) == 10 and part[:2] == b"\x42\x4d"
    rest = periph.uart_read(PMS_UART, 22, 100)[1]      # waits for the line: 22 ms at 9600 baud
    frame = part + rest
    assert len(frame) == 32 and frame[2:4] == b"\x00\x1c"
    assert struct.unpack(">H", frame[30:])[0] == sum(frame[:30])
    words = struct.unpack(">13H", frame[4:30])
    assert words[3:6] == (14, 20, 32)                  # atmospheric PM1.0, PM2.5, PM10
    assert words[0:3] == (14, 20, 33)                  # CF=1 reads higher above 30 ug/m3
    assert words[6] >= words[7] >= words[8] >= words[9] >= words[10] >= words[11]
    frames = frames_in(read_all(periph, 3.0, clock))
    assert len(frames) == 3 and all(ok for ok, _ in frames)


def test_pms5003_passive_mode(periph, scenario, clock) -> None:
    scenario.override(pm25=42.0)
    periph.uart_init(PMS_UART, 9600, 256)
    periph.uart_write(PMS_UART, pms_cmd(0xE1, 0))      # passive
    ack = periph.uart_read(PMS_UART, 8, 50)[1]
    assert ack == bytes.fromhex("424d0004e1000174")
    assert read_all(periph, 5.0, clock) == b""         # no frames unasked
    periph.uart_write(PMS_UART, pms_cmd(0xE2, 0))
    frame = periph.uart_read(PMS_UART, 32, 100)[1]
    (ok, words), = frames_in(frame)
    assert ok and words[4] == 42
    periph.uart_write(PMS_UART, pms_cmd(0xE2, 0)[:-1] + b"\x00")  # bad LRC: ignored
    assert read_all(periph, 0.5, clock) == b""
    periph.uart_write(PMS_UART, pms_cmd(0xE1, 1))      # back to active
    assert periph.uart_read(PMS_UART, 8, 50)[1] == bytes.fromhex("424d0004e1010175")
    assert len(frames_in(read_all(periph, 2.1, clock))) == 2


def test_pms5003_sleep_wake_and_warmup(periph, scenario, clock) -> None:
    scenario.override(pm25=50.0)
    periph.uart_init(PMS_UART, 9600, 1024)
    periph.uart_write(PMS_UART, pms_cmd(0xE4, 0))      # sleep
    assert periph.uart_read(PMS_UART, 8, 50)[1] == bytes.fromhex("424d0004e4000177")
    assert read_all(periph, 10.0, clock) == b""        # fan off, silence
    periph.uart_write(PMS_UART, pms_cmd(0xE4, 1))      # wake: no answer, the fan starts
    early = [w[4] for ok, w in frames_in(read_all(periph, 10.0, clock)) if ok]
    assert len(early) >= 9 and max(early) < 45         # warm-up: low readings
    read_all(periph, 20.5, clock)                      # 30 s after waking
    late = [w[4] for ok, w in frames_in(read_all(periph, 5.0, clock)) if ok]
    assert late and all(v == 50 for v in late)
    assert sum(abs(v - 50) for v in early) / len(early) > 10  # not discarding costs accuracy


def test_pms5003_set_pin_sleeps(periph, clock) -> None:
    periph.uart_init(PMS_UART, 9600, 1024)
    periph.pin_write(27, 0)                            # pms_set low
    assert read_all(periph, 3.0, clock) == b""
    periph.pin_write(27, 1)
    assert len(frames_in(read_all(periph, 3.0, clock))) >= 2
    assert periph.state()["pms5003"]["warming_up"]


def test_pms5003_corrupt_and_garbage(periph, clock) -> None:
    periph.uart_init(PMS_UART, 9600, 1024)
    periph.fault("corrupt", sensor="pms5003", count=2)
    oks = [ok for ok, _ in frames_in(read_all(periph, 4.5, clock))]
    assert oks == [False, False, True, True]
    periph.fault("corrupt", sensor="pms5003", count=2, kind="garbage")
    data = read_all(periph, 3.0, clock)
    assert len(data) > 3 * 32                          # extra bytes between frames
    assert [ok for ok, _ in frames_in(data)] == [True, True, True]


def test_pms5003_rx_overflow_unplug_and_baud(periph, clock) -> None:
    periph.uart_init(PMS_UART, 9600, 64)
    clock.advance(5.0)
    avail, data = periph.uart_read(PMS_UART, 4096, 0)
    assert avail == len(data) == 64                    # the ring kept the oldest bytes
    assert data[:2] == b"\x42\x4d" and data[32:34] == b"\x42\x4d"
    assert periph.state()["uart_dropped"][PMS_UART] == 2 * 32  # frames 3 and 4 were lost
    periph.fault("unplug", sensor="pms5003")
    assert read_all(periph, 3.0, clock) == b""
    t0 = clock.monotonic()
    assert periph.uart_read(PMS_UART, 32, 200) == (0, b"")
    assert clock.monotonic() - t0 == pytest.approx(0.2, abs=0.01)  # the read timed out
    periph.fault("plug", sensor="pms5003")
    assert periph.state()["pms5003"]["warming_up"]
    periph.uart_init(PMS_UART, 115200, 256)            # wrong baud rate: no valid frame
    assert frames_in(read_all(periph, 3.0, clock)) == []


# -- microphone ---------------------------------------------------------------------------------
def dbfs(x: np.ndarray) -> float:
    """RMS relative to a full-scale sine (the INMP441 datasheet's 0 dBFS)."""
    return 20 * math.log10(np.sqrt(np.mean(x.astype(float) ** 2)) / (FULL_SCALE / math.sqrt(2)))


def a_weight(x: np.ndarray, rate: int) -> np.ndarray:
    """IEC 61672 A-weighting: analogue poles, bilinear transform."""
    f1, f2, f3, f4 = 20.598997, 107.65265, 737.86223, 12194.217
    num = [(2 * np.pi * f4) ** 2 * 10 ** (1.9997 / 20), 0, 0, 0, 0]
    den = np.polymul([1, 4 * np.pi * f4, (2 * np.pi * f4) ** 2],
                     [1, 4 * np.pi * f1, (2 * np.pi * f1) ** 2])
    den = np.polymul(np.polymul(den, [1, 2 * np.pi * f3]), [1, 2 * np.pi * f2])
    b, a = signal.bilinear(num, den, rate)
    return signal.lfilter(b, a, x.astype(float))


def test_mic_calibration_tone(clock) -> None:
    s = Scenario(seed=2, clock=clock, events=[Event(1.0, "tone", 94.0, duration=2.0)])
    s.override(noise_dba=35.0)
    mic = Microphone(s, 48000, seed=1)
    x = np.concatenate([mic.block(4800) for _ in range(30)])
    assert dbfs(x[int(1.5 * 48000):int(2.5 * 48000)]) == pytest.approx(-26.0, abs=0.1)
    spectrum = np.abs(np.fft.rfft(x[48000:96000]))
    assert np.argmax(spectrum) == 1000                 # 1 Hz bins: the tone is at 1 kHz


@pytest.mark.parametrize("rate,level", [(48000, 68.0), (16000, 45.0)])
def test_mic_traffic_noise_is_the_scenario_dba(clock, rate, level) -> None:
    s = Scenario(seed=2, clock=clock, events=[])
    s.override(noise_dba=level)
    mic = Microphone(s, rate, seed=9)
    x = np.concatenate([mic.block(rate // 10) for _ in range(40)])
    la = dbfs(a_weight(x, rate)[rate:]) + 120          # -26 dBFS = 94 dB SPL
    assert la == pytest.approx(level, abs=0.5)


def lzpeak(sample: float) -> float:
    """dB re 20 uPa of a sample's pressure (-26 dBFS = 94 dB SPL)."""
    return 20 * math.log10(abs(sample) / (FULL_SCALE * 10 ** (-26 / 20) / math.sqrt(2)) / 20e-6)


def test_mic_impulse_at_scenario_time(clock) -> None:
    s = Scenario(seed=2, time_scale=60, clock=clock,
                 events=[Event(150.0, "gunshot", 118.0)])  # 2.5 s of device time at 60x
    s.override(noise_dba=55.0)
    clock.advance(1.0)
    mic = Microphone(s, 48000, seed=1)                 # the stream starts at scenario t=60
    x = np.concatenate([mic.block(4800) for _ in range(20)])
    onset = round((150.0 / 60 - 1.0) * 48000)
    assert mic.sample_of(150.0) == onset
    peak = int(np.argmax(np.abs(x)))
    assert onset <= peak < onset + 48                  # within 1 ms of the scheduled time
    assert lzpeak(x[peak]) == pytest.approx(118.0, abs=0.1)
    assert dbfs(x[onset - 4800:onset - 100]) < -50     # quiet street before it


def test_a_sound_with_a_place_is_heard_later_and_quieter_by_distance(clock) -> None:
    """One shot, 130 dB 1 m from it, beside one board and 343 m from another: the near
    one hears it 29 ms on at 110 dB, the far one a second on at 79 dB."""
    shot = Event(2.0, "gunshot", 130.0, x=0.0, y=10.0)
    heard = {}
    for name, place, seed in (("near", (0.0, 0.0), 1), ("far", (343.0, 10.0), 2)):
        s = Scenario(seed=2, clock=clock, events=[shot], position=place)
        s.override(noise_dba=45.0)
        mic = Microphone(s, 48000, seed=seed)
        x = np.concatenate([mic.block(4800) for _ in range(35)])
        peak = int(np.argmax(np.abs(x)))
        heard[name] = (peak / 48000, lzpeak(x[peak]), s.heard(shot))
    near, far = heard["near"], heard["far"]
    assert near[2] == pytest.approx((2.0 + 10 / 343, 110.0))
    assert far[2] == pytest.approx((3.0, 130.0 - 20 * math.log10(343)))
    assert near[0] == pytest.approx(2.0 + 10 / 343, abs=0.001)       # the peak, within 1 ms
    assert far[0] == pytest.approx(3.0, abs=0.001)
    assert near[1] == pytest.approx(110.0, abs=0.2)
    assert far[1] == pytest.approx(79.3, abs=0.5)
    with pytest.raises(ValueError, match="both x and y"):
        Event(1.0, "gunshot", 120.0, x=3.0)


def test_i2s_dma_ring_holds_ibuf_over_8_frames_whatever_the_format() -> None:
    """ESP32 machine_i2s.c: RX DMA is always 32-bit stereo, 256-frame buffers, >= 2."""
    assert dma_ring_frames(16384) == 2048            # 42.7 ms at 48 kHz, not 85 ms
    assert dma_ring_frames(20000) == 9 * 256
    assert dma_ring_frames(1000) == 512
    stream_bytes = {(32, False): 4, (16, False): 2, (32, True): 8, (16, True): 4}
    for (bits, stereo), frame in stream_bytes.items():
        stream = I2SStream(None, time.monotonic, 48000, bits, stereo, 16384, lambda: False)
        try:
            assert (stream.ring_frames, stream.ibuf) == (2048, 2048 * frame)
        finally:
            stream.close()


def test_i2s_stream_paced_format_unplug_stall_reset() -> None:
    s = Scenario(seed=2, events=[])
    s.override(noise_dba=70.0)
    periph = Peripherals(get_board("esp32-devkitc"), s)
    try:
        rate = 16000
        port = periph.i2s_open(0, 0, 32, 0, rate, 20000).port
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)  # small: the host holds the rest
        sock.connect(("127.0.0.1", port))
        sock.settimeout(2)

        def read(n: int) -> bytes:
            """As the board's I2S does: acknowledge every read."""
            buf = bytearray()
            while len(buf) < n:
                chunk = sock.recv(n - len(buf))
                assert chunk
                sock.sendall(struct.pack("<I", len(chunk)))
                buf += chunk
            return bytes(buf)

        read(4 * rate // 10)                           # drain the first 0.1 s
        t0 = time.monotonic()
        data = read(4 * rate * 3 // 10)                # 0.3 s of audio
        assert time.monotonic() - t0 > 0.2             # paced at the sample rate
        words = np.frombuffer(data, "<i4")
        assert np.all(words & 0xFF == 0)               # 24 bits, left-justified
        assert -60 < dbfs(words >> 8) < -40
        periph.fault("unplug", sensor="mic")
        time.sleep(0.1)
        read(4 * rate // 10)
        assert not np.any(np.frombuffer(read(4 * rate // 10), "<i4"))  # SD reads 0
        assert periph.state()["i2s_overruns"] == 0
        time.sleep(1.0)                                # the firmware stalls for 1 s
        t0 = time.monotonic()
        read(4 * rate * 9 // 10)                       # all of it is there at once: the
        assert time.monotonic() - t0 < 0.2             # board's end keeps the ring's bound
        assert periph.state()["i2s_overruns"] == 0     # (test_emu_sensors_board.py)
        t0 = time.monotonic()
        read(4 * rate // 2)                            # then paced again: 0.5 s of audio
        assert time.monotonic() - t0 > 0.25
        periph.reset()
        sock.settimeout(2)
        with pytest.raises((ConnectionError, AssertionError, OSError)):
            while True:
                read(65536)
        sock.close()
    finally:
        periph.close()


def test_i2s_ring_is_paced_by_the_clock_the_board_counts_by() -> None:
    # The board side drops what the ring overwrote by the host's real-time clock
    # (emu_machine.I2S, at chip speed its ticks are the chip's). Paced here by the
    # monotonic clock, a step of the real-time one (a VM paused and resumed) left the
    # two ends apart for good (the likely cause of a 10-minute run that lost 98 % of its
    # audio from its first minute, on a host running 40 % slow). Here the
    # real-time clock is faked: it cannot be stepped in a test. Frozen, nothing comes;
    # stepped, what it makes due comes at once, in whole DMA buffers.
    now = [1000.0]
    rate = 16000
    stream = I2SStream(None, time.monotonic, rate, 32, False, 32768, lambda: False,
                       real=lambda: now[0])
    sock = socket.create_connection(("127.0.0.1", stream.port))
    try:
        assert stream.start_us == pytest.approx(1000e6, abs=1e3)
        sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            sock.recv(4096)                        # 0.3 s of real time: none due
        now[0] += 0.5                              # 8000 frames: 31 DMA buffers of 256
        got = b""
        sock.settimeout(2)
        while len(got) < 31 * 256 * 4:
            got += sock.recv(65536)
        sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            sock.recv(4096)
        assert len(got) == 31 * 256 * 4
        assert stream.overruns == 0
    finally:
        sock.close()
        stream.close()


def test_i2s_rejects_bad_config(periph) -> None:
    with pytest.raises(OSError) as exc:
        periph.i2s_open(0, 0, 24, 0, 16000, 8000)
    assert exc.value.errno == errno.EINVAL


# -- pins, ADC, PWM ------------------------------------------------------------------------------
def test_adc_supply_and_pins(periph) -> None:
    assert periph.adc_read(35) == round(5.0 * 0.5 / 3.3 * 65535)
    assert periph.adc_read(34) == 0
    periph.set_adc(34, 1234)
    assert periph.adc_read(34) == 1234
    periph.pin_write(2, 1)
    assert periph.pin_read(2) == 1
    assert periph.pin_read(0) == 1                     # BOOT button pull-up
    periph.pwm(4, 1000, 32768)
    state = periph.state()
    assert state["lamp_pwm"] == {"pin": 4, "freq": 1000, "duty_u16": 32768}
    assert state["lamp"] == pytest.approx(0.5, abs=0.001)
    assert set(state["scenario"]) >= {"lux", "noise_dba", "pm25", "temperature"}
    with pytest.raises(ValueError):
        periph.fault("unplug", sensor="scd40")


# -- properties ---------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(temp=st.floats(-40, 85), press=st.floats(30_000, 110_000), rh=st.floats(0, 100),
       t_code=st.integers(1, 5), p_code=st.integers(1, 5))
def test_bme280_raw_words_invert_the_datasheet(temp, press, rh, t_code, p_code) -> None:
    """Over the part's whole operating range and every oversampling setting."""
    steps = {1: 16, 2: 8, 3: 4, 4: 2, 5: 1}
    trim = bme280_mod.TRIM
    adc_t, adc_p, adc_h = bme280_mod.raw_words(temp, press, rh, trim, steps[t_code],
                                               steps[p_code])
    assert adc_t % steps[t_code] == 0 and adc_p % steps[p_code] == 0
    t, p, h = datasheet_compensate(adc_t, adc_p, adc_h, trim)
    assert t == pytest.approx(temp, abs=0.006 * steps[t_code] + 0.006)
    assert p == pytest.approx(press, abs=0.2 * steps[p_code] + 0.2)
    assert h == pytest.approx(rh, abs=0.02)


@settings(max_examples=60, deadline=None)
@given(lux=st.floats(0, 60_000), mt=st.integers(31, 254), op=st.sampled_from([0x20, 0x21]))
def test_bh1750_count_inverts_the_datasheet_formula(lux, mt, op) -> None:
    clock = ManualClock()
    s = Scenario(clock=clock)
    s.override(lux=lux)
    p = Peripherals(get_board("esp32-devkitc"), s)
    p.i2c_write(0, BH, bytes((0x01, 0x40 | mt >> 5, 0x60 | (mt & 0x1F), op)))
    clock.advance(0.120 * mt / 69 + 0.001)
    raw = p.i2c_read(0, BH, 2)
    count = raw[0] << 8 | raw[1]
    got = bh_lux(raw, mtreg=mt, h2=op == 0x21)
    if count < 0xFFFF:
        assert got == pytest.approx(lux, abs=1 / 1.2 * 69 / mt)  # one count
    else:
        assert lux * 1.2 * mt / 69 * (2 if op == 0x21 else 1) >= 0xFFFF - 1


def test_bme280_iir_filter_step_response(periph, scenario, clock) -> None:
    """config.filter = 16: x[n] = (x[n-1] * 15 + adc) / 16 per conversion (datasheet 3.4.4)."""
    scenario.override(temperature=10.0, pressure=100_000.0, humidity=50.0)
    trim = read_trim(periph)
    periph.i2c_write(0, BME, b"\xf5\x10\xf2\x01\xf4\x27")  # filter 16, standby 0.5 ms, normal
    t_meas = (1 + 2 + 2.5 + 2.5 + 0.5) / 1000                # x1/x1/x1, typical
    period = t_meas + 0.0005
    clock.advance(t_meas + 0.0001)
    assert datasheet_compensate(*read_raw(periph), trim)[0] == pytest.approx(10.0, abs=0.011)
    scenario.override(temperature=20.0)
    clock.advance(period)                                   # one more conversion
    first = datasheet_compensate(*read_raw(periph), trim)[0]
    assert first == pytest.approx(10.0 + 10.0 / 16, abs=0.02)
    clock.advance(9 * period)                               # nine more, read once
    tenth = datasheet_compensate(*read_raw(periph), trim)[0]
    assert tenth == pytest.approx(20.0 - 10.0 * (15 / 16) ** 10, abs=0.02)
    clock.advance(2.0)                                      # settled
    assert datasheet_compensate(*read_raw(periph), trim)[0] == pytest.approx(20.0, abs=0.011)


def test_scenario_sunrise_and_sunset_vienna(clock) -> None:
    """Vienna, 2026-04-15 (CEST): sunrise ~06:11, sunset ~19:44 (almanac values)."""
    s = Scenario(clock=clock, start="2026-04-15T00:00:00+02:00")

    def crossing(lo: float, hi: float) -> float:  # upper limb on the refracted horizon
        for _ in range(40):
            mid = (lo + hi) / 2
            if (s.sun_elevation(lo) + 0.833) * (s.sun_elevation(mid) + 0.833) <= 0:
                hi = mid
            else:
                lo = mid
        return lo / 3600

    assert crossing(4 * 3600, 9 * 3600) == pytest.approx(6 + 11 / 60, abs=6 / 60)
    assert crossing(17 * 3600, 22 * 3600) == pytest.approx(19 + 44 / 60, abs=6 / 60)


def test_a_day_in_two_minutes_through_the_light_sensor() -> None:
    clock = ManualClock()
    s = Scenario(seed=1, time_scale=720, clock=clock, start="2026-06-21T00:00:00+02:00",
                 cloudiness=0.0)
    p = Peripherals(get_board("esp32-devkitc"), s)
    p.i2c_write(0, BH, b"\x01\x10")
    readings = []
    for _ in range(24):                                # one reading per scenario hour
        clock.advance(5.0)
        readings.append(bh_lux(p.i2c_read(0, BH, 2)))
    assert max(readings[:3]) < 1 and max(readings[22:]) < 1   # night, no lamp
    assert max(readings[11:15]) > 20_000                       # summer noon
    assert readings.index(max(readings)) in range(11, 15)


def test_boards_sharing_a_world_have_their_own_noise(clock) -> None:
    s = Scenario(seed=1, clock=clock, events=[])
    s.override(noise_dba=60.0)
    a = Peripherals(get_board("esp32-devkitc"), s, seed=0)
    b = Peripherals(get_board("esp32-devkitc"), s, seed=1)
    x, y = a.microphone(16000).block(16000), b.microphone(16000).block(16000)
    assert not np.array_equal(x, y)
    assert dbfs(x) == pytest.approx(dbfs(y), abs=0.3)  # same world, same level
