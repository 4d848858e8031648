"""Bosch BME280 humidity/pressure/temperature sensor, at I2C level (datasheet rev. 1.6).

A register map with auto-incrementing reads and (address, value) pair writes, the
calibration ("trim") registers of a real part, forced/normal/sleep modes with the
datasheet's measurement and standby times, and the IIR filter. The raw ADC words are
found by inverting the datasheet's own integer compensation, so a node that runs
BME280_compensate_T_int32 / P_int64 / H_int32 gets back the scenario's weather to
within the compensation's resolution (0.01 degC, 1/256 Pa, 1/1024 %RH) and the ADC
resolution chosen by the oversampling setting.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable
from typing import Any

from .base import SimulatedPart, World

CHIP_ID = 0x60
REG_CALIB00, REG_ID, REG_RESET, REG_CALIB26 = 0x88, 0xD0, 0xE0, 0xE1
REG_CTRL_HUM, REG_STATUS, REG_CTRL_MEAS, REG_CONFIG, REG_DATA = 0xF2, 0xF3, 0xF4, 0xF5, 0xF7
RESET_WORD = 0xB6
SKIPPED_20, SKIPPED_16 = 0x80000, 0x8000   # what a skipped measurement reads
OVERSAMPLING = (0, 1, 2, 4, 8, 16, 16, 16)  # osrs_x code -> samples
FILTER = (0, 2, 4, 8, 16, 16, 16, 16)       # config.filter code -> IIR coefficient
STANDBY_MS = (0.5, 62.5, 125.0, 250.0, 500.0, 1000.0, 10.0, 20.0)
NVM_COPY_S = 0.002                          # status.im_update after reset

# The trim values of a typical part (T/P: the Bosch datasheet example; H: a production unit).
TRIM: dict[str, int] = {
    "T1": 27504, "T2": 26435, "T3": -1000,
    "P1": 36477, "P2": -10685, "P3": 3024, "P4": 2855, "P5": 140, "P6": -7,
    "P7": 15500, "P8": -14600, "P9": 6000,
    "H1": 75, "H2": 362, "H3": 0, "H4": 313, "H5": 50, "H6": 30,
}


def calibration_bytes(trim: dict[str, int]) -> tuple[bytes, bytes]:
    """The NVM images at 0x88..0xA1 (26 bytes) and 0xE1..0xE7 (7 bytes)."""
    t = trim
    low = struct.pack("<HhhHhhhhhhhh", t["T1"], t["T2"], t["T3"], t["P1"], t["P2"], t["P3"],
                      t["P4"], t["P5"], t["P6"], t["P7"], t["P8"], t["P9"])
    low += bytes((0x00, t["H1"] & 0xFF))  # 0xA0 is reserved
    h4, h5 = t["H4"] & 0xFFF, t["H5"] & 0xFFF
    high = struct.pack("<hB", t["H2"], t["H3"]) + bytes(
        (h4 >> 4, (h4 & 0x0F) | ((h5 & 0x0F) << 4), h5 >> 4, t["H6"] & 0xFF))
    return low, high


# -- the datasheet's integer compensation (section 4.2.3), used here to invert it ---------
def _tdiv(a: int, b: int) -> int:
    """C's integer division, truncating toward zero."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b >= 0) else -q


def compensate_t(adc_t: int, c: dict[str, int]) -> tuple[int, int]:
    """-> (temperature in 0.01 degC, t_fine)."""
    var1 = (((adc_t >> 3) - (c["T1"] << 1)) * c["T2"]) >> 11
    var2 = (((((adc_t >> 4) - c["T1"]) * ((adc_t >> 4) - c["T1"])) >> 12) * c["T3"]) >> 14
    t_fine = var1 + var2
    return (t_fine * 5 + 128) >> 8, t_fine


def compensate_p(adc_p: int, t_fine: int, c: dict[str, int]) -> int:
    """-> pressure in Pa as Q24.8."""
    var1 = t_fine - 128000
    var2 = var1 * var1 * c["P6"]
    var2 = var2 + ((var1 * c["P5"]) << 17)
    var2 = var2 + (c["P4"] << 35)
    var1 = ((var1 * var1 * c["P3"]) >> 8) + ((var1 * c["P2"]) << 12)
    var1 = (((1 << 47) + var1) * c["P1"]) >> 33
    if var1 == 0:
        return 0
    p = 1048576 - adc_p
    p = _tdiv(((p << 31) - var2) * 3125, var1)
    var1 = (c["P9"] * (p >> 13) * (p >> 13)) >> 25
    var2 = (c["P8"] * p) >> 19
    return ((p + var1 + var2) >> 8) + (c["P7"] << 4)


def compensate_h(adc_h: int, t_fine: int, c: dict[str, int]) -> int:
    """-> relative humidity in %RH as Q22.10."""
    v = t_fine - 76800
    v = (((((adc_h << 14) - (c["H4"] << 20) - (c["H5"] * v)) + 16384) >> 15)
         * (((((((v * c["H6"]) >> 10) * (((v * c["H3"]) >> 11) + 32768)) >> 10) + 2097152)
             * c["H2"] + 8192) >> 14))
    v = v - (((((v >> 15) * (v >> 15)) >> 7) * c["H1"]) >> 4)
    v = min(max(v, 0), 419430400)
    return v >> 12


def _search(lo: int, hi: int, value: Callable[[int], int], target: float,
            increasing: bool) -> int:
    """The k in [lo, hi] whose monotonic value(k) is nearest to target (bisection)."""
    sign = 1 if increasing else -1
    a, b = lo, hi
    while a < b:
        mid = (a + b) // 2
        if sign * value(mid) < sign * target:
            a = mid + 1
        else:
            b = mid
    candidates = [k for k in (a - 1, a) if lo <= k <= hi]
    return min(candidates, key=lambda k: abs(value(k) - target))


def raw_words(temp_c: float, press_pa: float, rh: float, c: dict[str, int],
              t_step: int = 1, p_step: int = 1) -> tuple[int, int, int]:
    """(adc_T, adc_P, adc_H) that the compensation turns into the given weather.

    t_step / p_step: the ADC's resolution (16 for 16-bit words, ... 1 for 20-bit).
    """
    kt = _search(0, (1 << 20) // t_step - 1, lambda k: compensate_t(k * t_step, c)[0],
                 temp_c * 100.0, increasing=True)
    adc_t = kt * t_step
    t_fine = compensate_t(adc_t, c)[1]
    kp = _search(0, (1 << 20) // p_step - 1, lambda k: compensate_p(k * p_step, t_fine, c),
                 press_pa * 256.0, increasing=False)
    adc_h = _search(0, 0xFFFF, lambda k: compensate_h(k, t_fine, c), rh * 1024.0,
                    increasing=True)
    return adc_t, kp * p_step, adc_h


class BME280(SimulatedPart):
    name = "bme280"
    corruptible = True

    def __init__(self, weather: Callable[[float], tuple[float, float, float]],
                 clock: Callable[[], float], trim: dict[str, int] | None = None,
                 seed: int = 0) -> None:
        """weather(t) -> (degC, Pa, %RH) at device-clock time t; clock(): device-clock now."""
        self._weather = weather
        self._clock = clock
        self._rng = random.Random(seed)
        self.trim = dict(TRIM if trim is None else trim)
        self._calib_low, self._calib_high = calibration_bytes(self.trim)
        self._garbage = 0
        self.soft_reset()

    @classmethod
    def attach(cls, world: World, spec: dict[str, Any], seed: int) -> BME280:
        return cls(world.weather, world.scenario.wall, seed=seed)

    def power_on(self) -> None:
        """Power-on: the same reset as the 0xB6 soft reset (registers, NVM trim reload)."""
        self.soft_reset()

    def soft_reset(self) -> None:
        """Power-on / 0xB6 reset: registers to their reset values, NVM trim reloaded."""
        self.ctrl_hum = 0
        self.ctrl_meas = 0
        self.config = 0
        self._osrs_h = 0          # ctrl_hum takes effect only on a ctrl_meas write
        self.data = bytes((0x80, 0, 0, 0x80, 0, 0, 0x80, 0))
        self.pointer = 0
        self._reset_at = self._clock()
        self._started = 0.0       # start of the running forced measurement / normal cycle
        self._filtered: tuple[float, float] | None = None
        self._updated = -1        # index of the last normal-mode cycle stored

    # -- timing -----------------------------------------------------------------------
    @property
    def mode(self) -> int:
        return self.ctrl_meas & 0x03

    def measurement_time(self) -> float:
        """Typical conversion time (datasheet 9.1), seconds."""
        t = OVERSAMPLING[self.ctrl_meas >> 5]
        p = OVERSAMPLING[(self.ctrl_meas >> 2) & 0x07]
        h = OVERSAMPLING[self._osrs_h]
        ms = 1.0 + 2.0 * t + (2.0 * p + 0.5 if p else 0.0) + (2.0 * h + 0.5 if h else 0.0)
        return ms / 1000.0

    def _settle(self) -> None:
        """Store the results of conversions that have finished by now."""
        now = self._clock()
        t_meas = self.measurement_time()
        if self.mode in (1, 2):
            end = self._started + t_meas
            if now >= end:
                self._store(end)
                self.ctrl_meas &= ~0x03  # forced mode returns to sleep
        elif self.mode == 3:
            period = t_meas + STANDBY_MS[self.config >> 5] / 1000.0
            k = int((now - self._started - t_meas) // period)
            if k > self._updated:
                self._store(self._started + t_meas + k * period, samples=k - self._updated)
                self._updated = k

    def _measuring(self) -> bool:
        now = self._clock()
        t_meas = self.measurement_time()
        if self.mode in (1, 2):
            return now < self._started + t_meas
        if self.mode == 3:
            period = t_meas + STANDBY_MS[self.config >> 5] / 1000.0
            return (now - self._started) % period < t_meas
        return False

    def _store(self, at: float, samples: int = 1) -> None:
        """Latch a conversion finished at `at`; `samples` conversions went through the IIR
        since the last one stored (the input is taken as steady over them)."""
        temp_c, press_pa, rh = self._weather(at)
        osrs_t = OVERSAMPLING[self.ctrl_meas >> 5]
        osrs_p = OVERSAMPLING[(self.ctrl_meas >> 2) & 0x07]
        coeff = FILTER[(self.config >> 2) & 0x07]

        def step(osrs: int) -> int:  # 16 + (osrs - 1) bits without the filter, 20 with it
            if coeff:
                return 1
            return 1 << max(0, 4 - (osrs.bit_length() - 1))

        adc_t, adc_p, adc_h = raw_words(temp_c, press_pa, rh, self.trim,
                                        step(osrs_t or 1), step(osrs_p or 1))
        if coeff:
            # x[n] = (x[n-1] * (c - 1) + adc) / c, applied `samples` times
            prev = self._filtered or (adc_t, adc_p)
            keep = (1 - 1 / coeff) ** samples
            ft = adc_t + (prev[0] - adc_t) * keep
            fp = adc_p + (prev[1] - adc_p) * keep
            self._filtered = (ft, fp)
            adc_t, adc_p = int(round(ft)), int(round(fp))
        if not osrs_t:
            adc_t = adc_p = SKIPPED_20  # no temperature: no t_fine, pressure is skipped too
        if not osrs_p:
            adc_p = SKIPPED_20
        if not self._osrs_h or not osrs_t:
            adc_h = SKIPPED_16
        self.data = bytes((adc_p >> 12, (adc_p >> 4) & 0xFF, (adc_p & 0x0F) << 4,
                           adc_t >> 12, (adc_t >> 4) & 0xFF, (adc_t & 0x0F) << 4,
                           adc_h >> 8, adc_h & 0xFF))

    # -- registers ---------------------------------------------------------------------
    def _register(self, reg: int) -> int:
        if REG_CALIB00 <= reg < REG_CALIB00 + len(self._calib_low):
            return self._calib_low[reg - REG_CALIB00]
        if REG_CALIB26 <= reg < REG_CALIB26 + len(self._calib_high):
            return self._calib_high[reg - REG_CALIB26]
        if reg == REG_ID:
            return CHIP_ID
        if reg == REG_CTRL_HUM:
            return self.ctrl_hum
        if reg == REG_STATUS:
            im_update = self._clock() - self._reset_at < NVM_COPY_S
            return (0x08 if self._measuring() else 0) | (0x01 if im_update else 0)
        if reg == REG_CTRL_MEAS:
            return self.ctrl_meas
        if reg == REG_CONFIG:
            return self.config
        if REG_DATA <= reg < REG_DATA + 8:
            return self.data[reg - REG_DATA]
        return 0x00

    def _write_register(self, reg: int, value: int) -> None:
        if reg == REG_RESET:
            if value == RESET_WORD:
                self.soft_reset()
        elif reg == REG_CTRL_HUM:
            self.ctrl_hum = value & 0x07
        elif reg == REG_CTRL_MEAS:
            self.ctrl_meas = value
            self._osrs_h = self.ctrl_hum
            if self.mode:
                self._started = self._clock()
                self._updated = -1
        elif reg == REG_CONFIG:
            self.config = value & 0xFD  # bit 1 is reserved
            self._filtered = None
        # calibration, id, status and data are read-only

    # -- bus ---------------------------------------------------------------------------
    def write(self, data: bytes) -> int:
        """(register, value) pairs; a lone register byte sets the read pointer."""
        self._settle()
        for i in range(0, len(data), 2):
            self.pointer = data[i]
            if i + 1 < len(data):
                self._write_register(data[i], data[i + 1])
                self._settle()
        return len(data)

    def read(self, n: int) -> bytes:
        if self._garbage:
            self._garbage -= 1
            return bytes(self._rng.getrandbits(8) for _ in range(n))
        self._settle()  # one burst read sees one consistent set of data registers
        out = bytes(self._register((self.pointer + i) & 0xFF) for i in range(n))
        self.pointer = (self.pointer + n) & 0xFF
        return out

    def corrupt(self, count: int = 1, **kw: Any) -> None:
        """The next `count` reads return noise, as a marginal bus would."""
        self._garbage += count
