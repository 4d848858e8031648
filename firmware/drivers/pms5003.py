"""Plantower PMS5003 particulate sensor on a UART at 9600 8N1 (data manual V2.3).

Frames from the part: 0x42 0x4D, frame length 28 (big-endian), thirteen
big-endian words (PM1.0 / PM2.5 / PM10 at CF=1, the same under atmospheric
environment, particle counts > 0.3 / 0.5 / 1.0 / 2.5 / 5.0 / 10 um per 0.1 L,
reserved), and a check word = sum of the first 30 bytes. Commands to the part:
0x42 0x4D CMD 0x00 DATA LRC(2) with LRC = sum of the first five bytes;
0xE1 passive (0) / active (1), 0xE2 read in passive mode, 0xE4 sleep (0) / wake (1).
The part answers mode and sleep commands with a short frame (length 4), which
the parser recognises and skips.

    from machine import UART, Pin
    from drivers.pms5003 import PMS5003
    pm = PMS5003(UART(2, 9600, tx=17, rx=16, rxbuf=256), set_pin=Pin(27, Pin.OUT))
    pm.read()          # (PM1.0, PM2.5, PM10) ug/m3, or None while the fan warms up
    await pm.aread()   # the same without blocking the event loop

Nothing blocks for long: bytes are taken only as uart.any() reports them, into
preallocated buffers; read() sleeps in 10 ms steps, aread() awaits them, and
poll() never waits at all. The parser resynchronises after line garbage and
counts what it rejects. After wake-up (and on power-on, unless warm=True) the fan
needs 30 s to reach speed: frames in that time are counted in `discarded` and
reported as None, never as readings.
"""

import time
from array import array

from drivers.sensor import SensorFault, SensorMissing, bus_name

CMD_MODE = 0xE1
CMD_READ = 0xE2
CMD_SLEEP = 0xE4
WARMUP_MS = 30000
FRAME = 32
ACK = 8
CMD_GAP_MS = 50       # between two commands to the part
POLL_MS = 10
RETRY_MS = 250        # passive: ask again when no good frame came
FRAME_MS = 34         # 32 bytes at 9600 baud, 10 bits each


class PMS5003:
    def __init__(self, uart, set_pin=None, passive=True, warm=False, warmup_ms=WARMUP_MS):
        """uart: a machine.UART at 9600 baud (timeout 0 is best; only what any() reports is
        read). set_pin: a Pin wired to SET (high: run, low: sleep), or None to use the
        sleep command. passive: ask for each frame (True) or take the part's 1 s frames.
        warm: the fan has already been running for 30 s (skip the power-on warm-up)."""
        self.uart = uart
        self.set_pin = set_pin
        self.passive = passive
        self.warmup_ms = warmup_ms
        self._buf = bytearray(2 * FRAME)    # parser window
        self._n = 0
        self._chunk = bytearray(FRAME)
        self._cmd = bytearray(7)
        self.data = array('H', [0] * 13)     # the words of the last frame (see `warm`)
        self.frames = 0             # good data frames
        self.checksum_errors = 0    # data frames rejected for their check word
        self.garbage = 0            # bytes skipped to find a frame start (resync)
        self.discarded = 0          # good frames dropped during the fan warm-up
        self.acks = 0               # command answers seen
        self.bytes_received = 0
        self.warm = False           # the last frame came after the warm-up
        self.asleep = False
        self._new = 0
        self._last_frame = None
        self._lost = False
        self._cmd_at = time.ticks_add(time.ticks_ms(), -CMD_GAP_MS)
        self._woke = time.ticks_ms()
        self._since = self._woke
        self._need_mode = True
        self._request_at = None
        self._requested = None
        self._pumped = time.ticks_ms()
        self._deadline = 0
        self._rx_before = 0
        self._pump()                        # whatever was on the line before us
        # A known state: awake (SET high, or the wake command: harmless when awake) and,
        # once the gap between commands has passed, the chosen mode (see _commands).
        self.wake(warm)

    # -- commands -------------------------------------------------------------------
    def _send(self, cmd, data):
        c = self._cmd
        c[0] = 0x42
        c[1] = 0x4D
        c[2] = cmd
        c[3] = 0
        c[4] = data
        lrc = 0x42 + 0x4D + cmd + data
        c[5] = lrc >> 8
        c[6] = lrc & 0xFF
        self.uart.write(c)
        self._cmd_at = time.ticks_ms()

    def _commands(self):
        """Send what is due, one command per CMD_GAP_MS: the mode after a wake-up (or a
        silence), then the passive read request. Never waits."""
        if time.ticks_diff(time.ticks_ms(), self._cmd_at) < CMD_GAP_MS:
            return
        if self._need_mode:
            self._send(CMD_MODE, 0 if self.passive else 1)
            self._need_mode = False
        elif self._request_at is not None and \
                time.ticks_diff(time.ticks_ms(), self._request_at) >= 0:
            self.request()
            self._request_at = time.ticks_add(self._cmd_at, RETRY_MS)  # if no good frame

    def request(self):
        """Passive mode: ask for one frame now (it arrives ~40 ms later; see poll())."""
        self._send(CMD_READ, 0)
        self._requested = self._cmd_at

    def sleep(self):
        """Fan and laser off (SET low, or the sleep command)."""
        if self.set_pin is not None:
            self.set_pin.value(0)
        else:
            self._send(CMD_SLEEP, 0)
        self.asleep = True

    def wake(self, warm=False):
        """Fan on: readings count again after the 30 s warm-up (warm=True: it was on)."""
        if self.set_pin is not None:
            self.set_pin.value(1)
        else:
            self._send(CMD_SLEEP, 1)
        self.asleep = False
        # warm: any frame found from the last pump on counts (from `now`, a tick between
        # that pump and this line, at chip speed nearly always, cost the first frame)
        self._woke = (time.ticks_add(self._pumped, -self.warmup_ms - FRAME_MS) if warm
                      else time.ticks_ms())
        self._need_mode = True      # set the mode again once the part listens

    @property
    def warmup_left_ms(self):
        """ms until a frame asked for now counts (the warm-up, plus one frame's time on
        the wire, as frames are judged by the earliest time they can have been sent)."""
        left = self.warmup_ms + FRAME_MS - time.ticks_diff(time.ticks_ms(), self._woke)
        return left if left > 0 else 0

    @property
    def warming_up(self):
        return self.warmup_left_ms > 0

    # -- receiving --------------------------------------------------------------------
    def _pump(self):
        """Take the bytes the UART holds (never waits) and parse them: -> new frames."""
        uart, chunk, buf = self.uart, self._chunk, self._buf
        # The frames found now were sent after this (lower bound): the last pump took
        # whatever had arrived, and an answer comes after its request.
        now = time.ticks_ms()
        since = self._pumped
        if self._requested is not None and time.ticks_diff(self._requested, since) > 0:
            since = self._requested
        since = time.ticks_add(since, -FRAME_MS)    # a frame may have been on the wire
        self._since = since
        self._pumped = now
        new = 0
        for _ in range(16):         # bounded: at most 512 bytes per call
            k = uart.any()
            if not k:
                break
            room = len(buf) - self._n
            if k > room:
                k = room
            if k > len(chunk):
                k = len(chunk)
            got = uart.readinto(chunk, k)
            if not got:
                break
            self.bytes_received += got
            n = self._n
            for i in range(got):
                buf[n + i] = chunk[i]
            self._n = n + got
            new += self._parse()
        return new

    def _parse(self):
        b = self._buf
        n = self._n
        s = 0
        new = 0
        while True:
            start = s
            while s < n and not (b[s] == 0x42 and (s + 1 == n or b[s + 1] == 0x4D)):
                s += 1
            self.garbage += s - start
            if n - s < 4:
                break
            length = (b[s + 2] << 8) | b[s + 3]
            if length == 28:
                size = FRAME
            elif length == 4:
                size = ACK
            else:                           # a stray 0x42 0x4D: look further
                self.garbage += 1
                s += 1
                continue
            if n - s < size:
                break
            total = 0
            for i in range(s, s + size - 2):
                total += b[i]
            if total & 0xFFFF != (b[s + size - 2] << 8) | b[s + size - 1]:
                if size == FRAME:
                    self.checksum_errors += 1
                self.garbage += 1
                s += 1                      # resync inside the rejected bytes
                continue
            if size == FRAME:
                self._frame(s)
                new += 1
            else:
                self.acks += 1
            s += size
        if s:                               # keep the unparsed tail at the front
            for i in range(n - s):
                b[i] = b[s + i]
            self._n = n - s
        return new

    def _frame(self, s):
        b, d = self._buf, self.data
        for i in range(13):
            d[i] = (b[s + 4 + 2 * i] << 8) | b[s + 5 + 2 * i]
        now = time.ticks_ms()
        self.frames += 1
        self._last_frame = now
        if self._lost:          # back after silence: it was likely power-cycled
            self._lost = False
            self._woke = now
            self._need_mode = True
        # warm only if certainly measured after the warm-up (sent no earlier than _since)
        self.warm = time.ticks_diff(self._since, self._woke) >= self.warmup_ms
        if not self.warm:
            self.discarded += 1
        self._new += 1

    def poll(self):
        """Non-blocking: True when a frame after the warm-up has arrived since the last call
        (its values are in the properties). In passive mode, call request() first."""
        self._commands()
        self._pump()
        got = self._new and self.warm
        self._new = 0
        return bool(got)

    # -- reading ----------------------------------------------------------------------
    def _begin(self, timeout_ms):
        if self.asleep:
            raise SensorFault('PMS5003', 'PMS5003 is asleep: call wake() and allow 30 s '
                                         'for the fan')
        self._pump()            # older frames are not the answer to this read
        self._new = 0
        now = time.ticks_ms()
        self._deadline = time.ticks_add(now, timeout_ms)
        self._rx_before = self.bytes_received
        self._request_at = now if self.passive else None

    def _step(self):
        """-> True once a frame arrived; raises when the time is up. Never waits."""
        self._commands()
        self._pump()
        if self._new:
            self._new = 0
            self._request_at = None
            return True
        if time.ticks_diff(time.ticks_ms(), self._deadline) >= 0:
            self._request_at = None
            self._timeout()
        return False

    def _timeout(self):
        where = bus_name(self.uart, 'its UART')
        heard = self.bytes_received - self._rx_before
        if not heard:
            self._lost = True
            self._need_mode = True
            raise SensorMissing(
                'PMS5003', 'PMS5003 particulate sensor sent nothing on %s: check its 5 V '
                           'supply (the fan should be audible), sensor TX to ESP32 RX, '
                           'sensor RX to ESP32 TX, SET (pin 3) high or open, and the UART '
                           'at 9600 baud' % where)
        raise SensorFault(
            'PMS5003', 'PMS5003 on %s: %d bytes but no valid frame (%d checksum errors, %d '
                       'bytes skipped): check the baud rate (9600), loose contacts and '
                       'cable length' % (where, heard, self.checksum_errors, self.garbage))

    def _result(self):
        if not self.warm:
            return None
        d = self.data
        return d[3], d[4], d[5]

    def read(self, timeout_ms=1500):
        """One reading: (PM1.0, PM2.5, PM10) atmospheric ug/m3, or None during the fan
        warm-up (the frame is counted in `discarded`). Sleeps in 10 ms steps."""
        self._begin(timeout_ms)
        while not self._step():
            time.sleep_ms(POLL_MS)
        return self._result()

    async def aread(self, timeout_ms=1500):
        """read() for asyncio: awaits between 10 ms polls, never blocks the loop."""
        import asyncio
        self._begin(timeout_ms)
        while not self._step():
            await asyncio.sleep_ms(POLL_MS)
        return self._result()

    # -- the last frame (a warm-up frame too: `warm` says whether it counts) -------------
    @property
    def pm1_0(self):
        """PM1.0, atmospheric environment, ug/m3."""
        return self.data[3]

    @property
    def pm2_5(self):
        """PM2.5, atmospheric environment, ug/m3."""
        return self.data[4]

    @property
    def pm10(self):
        """PM10, atmospheric environment, ug/m3."""
        return self.data[5]

    @property
    def pm_cf1(self):
        """(PM1.0, PM2.5, PM10) at CF=1 ('standard particle', factory calibration), ug/m3."""
        d = self.data
        return d[0], d[1], d[2]

    @property
    def counts(self):
        """Particles per 0.1 L of air larger than 0.3, 0.5, 1.0, 2.5, 5.0 and 10 um."""
        d = self.data
        return d[6], d[7], d[8], d[9], d[10], d[11]

    @property
    def age_ms(self):
        """ms since the last good frame (None before the first)."""
        if self._last_frame is None:
            return None
        return time.ticks_diff(time.ticks_ms(), self._last_frame)
