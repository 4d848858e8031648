"""ROHM BH1750FVI ambient light sensor on I2C (datasheet rev. 2011.11).

The part has no registers: every byte written is an opcode, and a 2-byte read
returns the last finished measurement (big-endian count). Illuminance is
    lx = count / 1.2 * (69 / MTreg)        (H-resolution mode 2: divided by 2 more)
A conversion takes 120 ms typ. / 180 ms max. in the H-resolution modes and
16 / 24 ms in L-resolution at the default MTreg of 69, scaled by MTreg / 69.

    from machine import I2C, Pin
    from drivers.bh1750 import BH1750
    light = BH1750(I2C(0, scl=Pin(22), sda=Pin(21)))
    light.lux          # float, lx (waits for a conversion if none has finished)

Every 2-byte read is done twice and compared, so a marginal bus (long cable,
weak pull-ups) gives SensorFault rather than a wrong number. After the part has
been missing, the next successful access sets it up again (power, MTreg, mode):
a re-plugged part starts powered down with MTreg 69.
"""

import time

from drivers.sensor import SensorFault, SensorMissing, bus_name

POWER_DOWN = 0x00
POWER_ON = 0x01
RESET = 0x07
CONT_HRES = 0x10      # continuous, 1 lx resolution
CONT_HRES2 = 0x11     # continuous, 0.5 lx resolution
CONT_LRES = 0x13      # continuous, 4 lx resolution, fast
ONCE_HRES = 0x20      # one measurement, then power down
ONCE_HRES2 = 0x21
ONCE_LRES = 0x23
MODES = (CONT_HRES, CONT_HRES2, CONT_LRES, ONCE_HRES, ONCE_HRES2, ONCE_LRES)
MTREG_DEFAULT = 69
MTREG_MIN = 31
MTREG_MAX = 254


class BH1750:
    def __init__(self, i2c, address=0x23, mode=CONT_HRES, mtreg=MTREG_DEFAULT):
        if mode not in MODES:
            raise ValueError('BH1750 mode: one of the CONT_* / ONCE_* opcodes')
        if not MTREG_MIN <= mtreg <= MTREG_MAX:
            raise ValueError('BH1750 MTreg: 31..254')
        self.i2c = i2c
        self.address = address
        self._mode = mode
        self._mtreg = mtreg
        self._cmd = bytearray(1)
        self._buf = bytearray(2)
        self._ready = time.ticks_ms()   # when the running conversion will have finished
        self._lost = False
        self.bus_errors = 0             # reads that disagreed (bus noise), recovered or not
        self.saturated = False          # the last count was 0xFFFF: the light is at least lux
        self._setup()

    # -- bus ------------------------------------------------------------------------
    def _missing(self, exc):
        self._lost = True
        return SensorMissing(
            'BH1750', 'BH1750 light sensor not answering at 0x%02x on %s (%s): check its '
                      'wiring (VCC, GND, SDA, SCL) and the ADDR pin (low: 0x23, high: 0x5c)'
                      % (self.address, bus_name(self.i2c, 'the I2C bus'), exc))

    def _write(self, op):
        self._cmd[0] = op
        try:
            self.i2c.writeto(self.address, self._cmd)
        except OSError as exc:
            raise self._missing(exc)

    def _read(self):
        try:
            self.i2c.readfrom_into(self.address, self._buf)
        except OSError as exc:
            raise self._missing(exc)
        b = self._buf
        return (b[0] << 8) | b[1]

    def _setup(self):
        """Power on, MTreg, and start the mode (continuous modes measure from now on)."""
        self._write(POWER_ON)
        self._send_mtreg()
        self._lost = False
        if self._mode < ONCE_HRES:
            self._start()

    def _check(self):
        if self._lost:
            self._setup()

    def _send_mtreg(self):
        self._write(0x40 | (self._mtreg >> 5))      # 01000_MT[7:5]
        self._write(0x60 | (self._mtreg & 0x1F))    # 011_MT[4:0]

    def _start(self):
        self._write(self._mode)
        self._ready = time.ticks_add(time.ticks_ms(), self.measurement_ms)

    # -- control --------------------------------------------------------------------
    def power_on(self):
        self._write(POWER_ON)

    def power_off(self):
        """Power down (0.01 uA typ.); the next reading powers the part up again."""
        self._write(POWER_DOWN)
        self._lost = True

    def reset(self):
        """Clear the data register (accepted only when powered on)."""
        self._write(POWER_ON)
        self._write(RESET)
        if self._mode < ONCE_HRES:
            self._start()

    @property
    def mode(self):
        return self._mode

    @mode.setter
    def mode(self, mode):
        if mode not in MODES:
            raise ValueError('BH1750 mode: one of the CONT_* / ONCE_* opcodes')
        self._mode = mode
        self._check()
        if mode < ONCE_HRES:
            self._start()

    @property
    def mtreg(self):
        """Measurement time register, 31..254 (69 default): sensitivity x MTreg / 69."""
        return self._mtreg

    @mtreg.setter
    def mtreg(self, value):
        if not MTREG_MIN <= value <= MTREG_MAX:
            raise ValueError('BH1750 MTreg: 31..254')
        self._mtreg = value
        self._check()
        self._send_mtreg()
        if self._mode < ONCE_HRES:
            self._start()   # the running conversion used the old time

    @property
    def measurement_ms(self):
        """Maximum conversion time for the mode and MTreg (the datasheet's max., not typ.)."""
        base = 24 if (self._mode & 0x03) == 0x03 else 180
        return (base * self._mtreg + MTREG_DEFAULT - 1) // MTREG_DEFAULT

    # -- reading --------------------------------------------------------------------
    def _begin(self):
        """-> ms to wait before the count is valid."""
        self._check()
        if self._mode >= ONCE_HRES:
            self._write(POWER_ON)
            self._start()
        wait = time.ticks_diff(self._ready, time.ticks_ms())
        return wait if wait > 0 else 0

    def _result(self):
        a = self._read()
        b = self._read()
        if a != b:          # a conversion may finish between reads: a third read decides
            self.bus_errors += 1
            c = self._read()
            if c != b and c != a:
                raise SensorFault(
                    'BH1750', 'BH1750 at 0x%02x returns inconsistent data (%d, %d, %d): check '
                              'for bus noise, cable length and the SDA/SCL pull-ups'
                              % (self.address, a, b, c))
            a = c
        self.saturated = a == 0xFFFF    # more light than the range: lower MTreg (31: 121 klx)
        return a

    def read_count(self):
        """The raw 16-bit count of one finished conversion (blocks up to measurement_ms)."""
        wait = self._begin()
        if wait:
            time.sleep_ms(wait)
        return self._result()

    async def aread_count(self):
        import asyncio
        wait = self._begin()
        if wait:
            await asyncio.sleep_ms(wait)
        return self._result()

    def count_to_lux(self, count):
        """lx = count / 1.2 * 69 / MTreg (/2 in H-resolution mode 2)."""
        div = 6 * self._mtreg
        if (self._mode & 0x03) == 0x01:
            div *= 2
        return count * 345 / div     # 345 / 6 = 69 / 1.2

    @property
    def lux(self):
        """Illuminance in lx (float); waits for a finished conversion if needed."""
        return self.count_to_lux(self.read_count())

    async def alux(self):
        """asyncio: illuminance in lx, sleeping (not blocking) through the conversion."""
        return self.count_to_lux(await self.aread_count())

    @property
    def resolution(self):
        """lx per count step in the current mode and MTreg."""
        step = 4 if (self._mode & 0x03) == 0x03 else 1
        return self.count_to_lux(step)
