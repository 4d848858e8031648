"""Bosch BME280 temperature / humidity / pressure sensor on I2C (datasheet BST-BME280-DS002).

Forced mode: each reading starts one measurement, waits the datasheet's maximum
measurement time for the oversampling settings, and reads the eight data
registers in one burst. The raw values go through the datasheet's integer
compensation (section 4.2.3: BME280_compensate_T_int32, BME280_compensate_P_int64,
bme280_compensate_H_int32), whose results are exact integers:
    temperature in 0.01 degC, pressure in Pa / 256 (Q24.8), humidity in %RH / 1024 (Q22.10).

    from drivers.bme280 import BME280
    air = BME280(i2c)             # checks the chip id, resets, reads the calibration
    t, h, p = air.read()          # degC, %RH, Pa from one measurement
    air.temperature               # each property measures afresh

The trim (calibration) registers are read once, twice over and compared; every
burst of data registers is read twice and compared, so a noisy bus gives
SensorFault, never a wrong reading. After the part has been missing, the next
access checks the id and reloads the calibration (it may be another part).
"""

import time

from drivers.sensor import SensorFault, SensorMissing, bus_name

CHIP_ID = 0x60
REG_CALIB00 = 0x88
REG_ID = 0xD0
REG_RESET = 0xE0
REG_CALIB26 = 0xE1
REG_CTRL_HUM = 0xF2
REG_STATUS = 0xF3
REG_CTRL_MEAS = 0xF4
REG_CONFIG = 0xF5
REG_DATA = 0xF7
RESET_WORD = 0xB6
FORCED = 0x01
OSR = (0, 1, 2, 4, 8, 16)   # oversampling -> register code is the index
FILTERS = (0, 2, 4, 8, 16)  # IIR coefficient -> register code is the index
SKIPPED_20 = 0x80000        # what a skipped (or never run) 20-bit measurement reads
SKIPPED_16 = 0x8000
KNOWN_IDS = {0x56: 'BMP280 (sample)', 0x57: 'BMP280 (sample)', 0x58: 'BMP280', 0x55: 'BMP180',
             0x61: 'BME680'}


def _s16(lo, hi):
    v = lo | (hi << 8)
    return v - 0x10000 if v & 0x8000 else v


def _s8(v):
    return v - 0x100 if v & 0x80 else v


def _div(a, b):
    """C integer division (truncates toward zero), as the datasheet code does."""
    q = abs(a) // abs(b)
    return q if (a < 0) == (b < 0) else -q


def parse_calibration(low, high):
    """Trim registers 0x88..0xA1 (26 bytes) and 0xE1..0xE7 (7 bytes) ->
    (T1, T2, T3, P1..P9, H1..H6)."""
    c, h = low, high
    return (
        c[0] | (c[1] << 8), _s16(c[2], c[3]), _s16(c[4], c[5]),                 # T1..T3
        c[6] | (c[7] << 8), _s16(c[8], c[9]), _s16(c[10], c[11]),               # P1..P3
        _s16(c[12], c[13]), _s16(c[14], c[15]), _s16(c[16], c[17]),             # P4..P6
        _s16(c[18], c[19]), _s16(c[20], c[21]), _s16(c[22], c[23]),             # P7..P9
        c[25], _s16(h[0], h[1]), h[2],                                          # H1..H3
        (_s8(h[3]) << 4) | (h[4] & 0x0F),                   # H4: 0xE4 [11:4], 0xE5 [3:0]
        (_s8(h[5]) << 4) | (h[4] >> 4),                     # H5: 0xE6 [11:4], 0xE5 [7:4]
        _s8(h[6]))                                                              # H6


# -- compensation: the datasheet's integer code (section 4.2.3) in Python ints ---------------
def compensate_t(cal, adc_t):
    """BME280_compensate_T_int32 -> (temperature in 0.01 degC, t_fine)."""
    t1, t2, t3 = cal[0], cal[1], cal[2]
    var1 = (((adc_t >> 3) - (t1 << 1)) * t2) >> 11
    var2 = (((((adc_t >> 4) - t1) * ((adc_t >> 4) - t1)) >> 12) * t3) >> 14
    t_fine = var1 + var2
    return (t_fine * 5 + 128) >> 8, t_fine


def compensate_p(cal, adc_p, t_fine):
    """BME280_compensate_P_int64 -> pressure in Pa as Q24.8 (Pa * 256)."""
    p1, p2, p3, p4, p5, p6, p7, p8, p9 = cal[3:12]
    var1 = t_fine - 128000
    var2 = var1 * var1 * p6
    var2 = var2 + ((var1 * p5) << 17)
    var2 = var2 + (p4 << 35)
    var1 = ((var1 * var1 * p3) >> 8) + ((var1 * p2) << 12)
    var1 = (((1 << 47) + var1) * p1) >> 33
    if var1 == 0:
        return 0                # avoid a division by zero
    p = 1048576 - adc_p
    p = _div(((p << 31) - var2) * 3125, var1)
    var1 = (p9 * (p >> 13) * (p >> 13)) >> 25
    var2 = (p8 * p) >> 19
    return ((p + var1 + var2) >> 8) + (p7 << 4)


def compensate_h(cal, adc_h, t_fine):
    """bme280_compensate_H_int32 -> relative humidity in %RH as Q22.10 (%RH * 1024)."""
    h1, h2, h3, h4, h5, h6 = cal[12:18]
    v = t_fine - 76800
    v = ((((adc_h << 14) - (h4 << 20) - (h5 * v)) + 16384) >> 15) * \
        (((((((v * h6) >> 10) * (((v * h3) >> 11) + 32768)) >> 10) + 2097152) * h2
          + 8192) >> 14)
    v = v - (((((v >> 15) * (v >> 15)) >> 7) * h1) >> 4)
    if v < 0:
        v = 0
    if v > 419430400:
        v = 419430400
    return v >> 12


class BME280:
    def __init__(self, i2c, address=0x76, osrs_t=1, osrs_p=1, osrs_h=1, iir=0):
        """Oversampling 1, 2, 4, 8 or 16 (0 skips pressure or humidity; temperature is
        needed by both); iir: 0 (off), 2, 4, 8, 16."""
        if osrs_t not in OSR[1:] or osrs_p not in OSR or osrs_h not in OSR:
            raise ValueError('BME280 oversampling: 1, 2, 4, 8, 16 (0 skips P or H)')
        if iir not in FILTERS:
            raise ValueError('BME280 IIR filter: 0, 2, 4, 8 or 16')
        self.i2c = i2c
        self.address = address
        self._ctrl_meas = (OSR.index(osrs_t) << 5) | (OSR.index(osrs_p) << 2) | FORCED
        self._ctrl_hum = OSR.index(osrs_h)
        self._config = FILTERS.index(iir) << 2
        # datasheet 9.1, maximum: 1.25 + 2.3 T + (2.3 P + 0.575) + (2.3 H + 0.575) ms
        us = 1250 + 2300 * osrs_t
        if osrs_p:
            us += 2300 * osrs_p + 575
        if osrs_h:
            us += 2300 * osrs_h + 575
        self.measurement_ms = (us + 999) // 1000
        self._reg = bytearray(1)
        self._status = bytearray(1)
        self._pair = bytearray(2)
        self._data = bytearray(8)
        self._check = bytearray(8)
        self._calib = None
        self.bus_errors = 0
        self.t_fine = 0
        self._setup()

    # -- bus ------------------------------------------------------------------------
    def _missing(self, exc):
        self._calib = None
        return SensorMissing(
            'BME280', 'BME280 air sensor not answering at 0x%02x on %s (%s): check its wiring '
                      '(VCC 3.3 V, GND, SDA, SCL), CSB tied high for I2C, and the SDO pin '
                      '(GND: 0x76, VDDIO: 0x77)'
                      % (self.address, bus_name(self.i2c, 'the I2C bus'), exc))

    def _fault(self, what):
        return SensorFault('BME280', 'BME280 at 0x%02x: %s: check for bus noise, cable length '
                                     'and the SDA/SCL pull-ups' % (self.address, what))

    def _write(self, reg, value):
        self._pair[0] = reg
        self._pair[1] = value
        try:
            self.i2c.writeto(self.address, self._pair)
        except OSError as exc:
            raise self._missing(exc)

    def _read_into(self, reg, buf):
        self._reg[0] = reg
        try:
            self.i2c.writeto(self.address, self._reg, False)
            self.i2c.readfrom_into(self.address, buf)
        except OSError as exc:
            raise self._missing(exc)

    def _read_twice(self, reg, buf, scratch):
        """Burst-read twice; a third read settles a disagreement (bus noise)."""
        self._read_into(reg, buf)
        self._read_into(reg, scratch)
        if buf == scratch:
            return
        self.bus_errors += 1
        self._read_into(reg, buf)
        if buf != scratch:
            self._read_into(reg, scratch)
            if buf != scratch:
                raise self._fault('registers 0x%02x.. read differently each time' % reg)

    # -- set-up ---------------------------------------------------------------------
    def _setup(self):
        ident = bytearray(1)
        check = bytearray(1)
        self._read_twice(REG_ID, ident, check)
        chip = ident[0]
        if chip != CHIP_ID:
            name = KNOWN_IDS.get(chip)
            raise SensorFault('BME280', 'BME280 expected at 0x%02x on %s, but the chip there '
                                        'has id 0x%02x%s, not 0x60: check the address, or fit '
                                        'a BME280 (a BMP280 has no humidity sensor)'
                              % (self.address, bus_name(self.i2c, 'the I2C bus'), chip,
                                 ' (%s)' % name if name else ''))
        self.reset()
        self._load_calibration()
        self._write(REG_CONFIG, self._config)

    def reset(self):
        """Soft reset: registers to defaults, trim copied from NVM (waits for it)."""
        self._write(REG_RESET, RESET_WORD)
        status = bytearray(1)
        for _ in range(20):
            time.sleep_ms(2)
            self._read_into(REG_STATUS, status)
            if not status[0] & 0x01:        # im_update: NVM copy finished
                return
        raise self._fault('the NVM copy after reset never finished (status 0x%02x)' % status[0])

    def _load_calibration(self):
        low, low2 = bytearray(26), bytearray(26)
        high, high2 = bytearray(7), bytearray(7)
        self._read_twice(REG_CALIB00, low, low2)
        self._read_twice(REG_CALIB26, high, high2)
        cal = parse_calibration(low, high)
        if cal[0] in (0, 0xFFFF) or cal[3] in (0, 0xFFFF):
            raise self._fault('its calibration (trim) registers are blank')
        self._calib = cal

    @property
    def calibration(self):
        """(T1, T2, T3, P1..P9, H1..H6) as read from the part."""
        if self._calib is None:
            self._setup()
        return self._calib

    # -- measuring ------------------------------------------------------------------
    def _start(self):
        """Start one forced measurement; -> ms to wait for it."""
        if self._calib is None:
            self._setup()
        self._write(REG_CTRL_HUM, self._ctrl_hum)   # takes effect with the ctrl_meas write
        self._write(REG_CTRL_MEAS, self._ctrl_meas)
        return self.measurement_ms

    def _finish(self):
        status = self._status
        for _ in range(10):
            self._read_into(REG_STATUS, status)
            if not status[0] & 0x08:                # measuring
                break
            time.sleep_ms(1)
        else:
            raise self._fault('a measurement never finished (status 0x%02x)' % status[0])
        d = self._data
        self._read_twice(REG_DATA, d, self._check)
        adc_p = (d[0] << 12) | (d[1] << 4) | (d[2] >> 4)
        adc_t = (d[3] << 12) | (d[4] << 4) | (d[5] >> 4)
        adc_h = (d[6] << 8) | d[7]
        if adc_t == SKIPPED_20:
            raise self._fault('no temperature result (was the part reset mid-measurement?)')
        cal = self._calib
        t, t_fine = compensate_t(cal, adc_t)
        self.t_fine = t_fine
        p = None if adc_p == SKIPPED_20 else compensate_p(cal, adc_p, t_fine)
        h = None if adc_h == SKIPPED_16 else compensate_h(cal, adc_h, t_fine)
        return t, p, h

    def read_raw(self):
        """One forced measurement: (0.01 degC, Pa * 256, %RH * 1024) integers; a skipped
        pressure or humidity is None. Blocks for measurement_ms (< 120 ms)."""
        time.sleep_ms(self._start())
        return self._finish()

    async def aread_raw(self):
        import asyncio
        await asyncio.sleep_ms(self._start())
        return self._finish()

    @staticmethod
    def _scale(raw):
        t, p, h = raw
        return t / 100, None if h is None else h / 1024, None if p is None else p / 256

    def read(self):
        """(temperature degC, humidity %RH, pressure Pa) as floats, from one measurement."""
        return self._scale(self.read_raw())

    async def aread(self):
        """asyncio read(): sleeps (does not block) through the measurement."""
        return self._scale(await self.aread_raw())

    @property
    def temperature(self):
        """degC (0.01 degC resolution), a fresh measurement."""
        return self.read_raw()[0] / 100

    @property
    def humidity(self):
        """%RH (1/1024 %RH resolution), a fresh measurement; None if humidity is skipped."""
        h = self.read_raw()[2]
        return None if h is None else h / 1024

    @property
    def pressure(self):
        """Pa (1/256 Pa resolution), a fresh measurement; None if pressure is skipped."""
        p = self.read_raw()[1]
        return None if p is None else p / 256
