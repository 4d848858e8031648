"""I2S MEMS microphone (INMP441 / ICS-43434): 24-bit samples, left-justified in 32-bit slots.

read() fills one preallocated DMA-sized chunk and converts it into a preallocated
array('i') of signed 24-bit values, so the hot path allocates nothing. Lost
samples (the app fell behind and the I2S ring overflowed) are counted by
comparing samples received with ticks_us elapsed.
"""

import time
from array import array

import micropython

FULL_SCALE = 1 << 23        # 24-bit full scale
SENSITIVITY_DBFS = -26.0    # a 94 dB SPL 1 kHz sine reads -26 dBFS (INMP441, ICS-43434)
FS_DB_SPL = 94.0 - SENSITIVITY_DBFS   # SPL of a full-scale sine: 120 dB
DMA_FRAMES = 256            # the ESP32 port's DMA buffer (machine_i2s.c): the driver hands
                            # over whole buffers, so the newest sample read is 0-16 ms old
                            # at 16 kHz; read_us says when it was taken, not when it was read
DRIFT_PPM = 50              # the sample clock against ticks_us: how fast what is known of
                            # a sample's time goes stale


@micropython.viper
def convert(raw: ptr32, nwords: int, out: ptr32):
    """out[i] = signed 24-bit sample of 32-bit little-endian slot raw[i]."""
    i = 0
    while i < nwords:
        s = (raw[i] >> 8) & 0xFFFFFF    # 24 significant bits (loads are unsigned on 64-bit ports)
        out[i] = (s ^ 0x800000) - 0x800000
        i += 1


class Mic:
    """Mono I2S microphone reader.

    Pass pins to open machine.I2S (RX, 32-bit slots, mono) at the first read, or `i2s`
    to read any object with readinto() (a test stream, an emulated board). `chunk`
    samples per read (256 = 5.3 ms at 48 kHz); `ibuf` bytes of driver ring buffer.
    After read() or aread(): self.samples[0:n] holds the samples.
    """

    def __init__(self, i2s=None, *, i2s_id=0, sck=None, ws=None, sd=None, rate=48000,
                 chunk=256, ibuf=16384, clock_us=None):
        if rate % 100:
            raise ValueError('rate must be a multiple of 100 Hz')
        self.i2s = i2s
        self._pins = (i2s_id, sck, ws, sd, ibuf)
        self.rate = rate
        self.chunk = chunk
        self._raw = bytearray(4 * chunk)
        self.samples = array('i', bytes(4 * chunk))   # zeroed, with no list of chunk words first
        self._clock = clock_us or time.ticks_us
        self._r100 = rate // 100
        self._chunk_us = chunk * 1000000 // rate
        self.chunk_ms = self._chunk_us // 1000
        self.ring_chunks = ibuf // 8 // chunk   # full chunks the driver ring can hold
        # frames the driver ring holds before it drops: the ESP32 port always fills DMA
        # with 32-bit stereo frames (8 bytes) whatever the format (machine_i2s.c), so
        # ibuf=16384 is 2048 frames, 42.7 ms at 48 kHz
        self._cap = ibuf // 8
        if chunk > self._cap:
            raise ValueError('chunk larger than the driver ring (ibuf / 8 frames)')
        self.received = 0           # samples delivered, modulo 2**30 (a long int would allocate)
        self.overruns = 0           # samples lost, total
        self.lost_before = 0        # samples lost just before the chunk in self.samples
        self._taken = 0
        # the DMA runs from here (i2s given: from before; else from the first read, _open):
        # what it overwrites before the first read is lost like any other audio, and
        # counted the same way
        self._last = self._clock()
        self._frac = 0              # 1e-4 sample units
        self._backlog = 0           # estimated samples waiting in the driver after our last read
        self._stream = None
        # when the newest sample read was taken: after _lo and by _hi (ticks_us)
        self._dma_us = DMA_FRAMES * 1000000 // rate
        self._hi = None
        self._lo = None
        self._us_frac = 0

    def _open(self):
        """The I2S opened at the first read, not with the node: its DMA runs from here,
        and a node's start (other tasks' first steps: ~0.4 s at the chip's speed) would
        overflow the ring before anyone listened."""
        from machine import I2S, Pin
        i2s_id, sck, ws, sd, ibuf = self._pins
        self.i2s = I2S(i2s_id, sck=Pin(sck), ws=Pin(ws), sd=Pin(sd), mode=I2S.RX, bits=32,
                       format=I2S.MONO, rate=self.rate, ibuf=ibuf)
        self._last = self._clock()

    def read(self):
        """Blocking read of one chunk: number of samples in self.samples."""
        if self.i2s is None:
            self._open()
        t_call = self._clock()
        nb = self.i2s.readinto(self._raw)
        return self._took(nb, t_call)

    async def aread(self):
        """asyncio read (I2S via StreamReader): number of samples, may be a partial chunk."""
        if self._stream is None:
            import asyncio
            if self.i2s is None:
                self._open()
            self._stream = asyncio.StreamReader(self.i2s)
        nb = await self._stream.readinto(self._raw)
        return self._took(nb, None)     # time in await includes other tasks: not evidence

    def read_held(self):
        """After aread(), without waiting: what the driver ring still holds, up to a chunk
        (0 when it is empty), as the ESP32 port's readinto() does once asyncio has polled
        the I2S. Draining the ring in one loop turn keeps up when a turn outlasts a chunk."""
        nb = self.i2s.readinto(self._raw)
        if not nb and self._lo is not None:
            self._drained(self._clock())
        return self._took(nb, None)

    @property
    def half_full(self):
        """Whether the driver ring is estimated over half full after the last read: a
        reader this far behind must drain it, not pace itself."""
        return self._backlog * 2 > self._cap

    @property
    def read_us(self):
        """ticks_us() when the last sample read was taken (the middle of what is known)."""
        if self._hi is None:
            return None
        return time.ticks_add(self._lo, time.ticks_diff(self._hi, self._lo) // 2)

    def _took(self, nb, t_call):
        if not nb:
            return 0
        now = self._clock()         # before the conversion: the chunk's arrival
        self.lost_before = 0
        n = nb >> 2
        convert(self._raw, n, self.samples)
        self.received = (self.received + n) & 0x3FFFFFFF
        waited = 0 if t_call is None else time.ticks_diff(now, t_call)
        gap = time.ticks_diff(now, self._last)
        self._account(gap, waited, n, nb)
        self._when(now, n, nb, gap)
        self._last = now
        return n

    def _when(self, now, n, nb, gap):
        """When the newest sample read was taken. Known for certain: by `now` (it has
        arrived); after now - one DMA buffer when the ring was emptied (the next buffer
        was not complete yet); and the last read's bounds moved on by n samples. Reads
        fall at every phase of the DMA's buffers, so the bounds close in on the truth
        (the sample clock and ticks_us share the crystal: they stay close for minutes).
        After lost samples, or first: the backlog's estimate, one DMA buffer wide."""
        if self._hi is None or self.lost_before:
            self._hi = time.ticks_add(now, -(self._backlog * 10000 // self._r100))
            self._lo = time.ticks_add(self._hi, -self._dma_us)
        else:
            a = n * 10000 + self._us_frac
            step = a // self._r100
            self._us_frac = a - step * self._r100
            stale = gap * DRIFT_PPM // 1000000
            self._hi = time.ticks_add(self._hi, step + stale)
            self._lo = time.ticks_add(self._lo, step - stale)
            if time.ticks_diff(self._hi, now) > 0:
                self._hi = now
        if nb < len(self._raw):
            self._drained(now)

    def _drained(self, now):
        """The ring was empty at `now`: the next DMA buffer, one later, was not done."""
        lo = time.ticks_add(now, -self._dma_us)
        if time.ticks_diff(lo, self._lo) > 0:
            self._lo = lo
        if time.ticks_diff(self._lo, self._hi) > 0:   # late delivery (an emulated link)
            self._lo = self._hi

    def _account(self, gap, waited, n, nb):
        """Overrun check: samples due by the clock since the last read versus samples got."""
        if gap < 2000000:
            a = gap * self._r100 + self._frac     # < 2**30: no long int
            due = a // 10000
            self._frac = a - due * 10000
        else:
            due = (gap // 10000) * self._r100
            self._frac = 0
        if nb < len(self._raw) or waited > self._chunk_us // 4:
            # partial read, or a blocking read had to wait: the driver was empty,
            # so nothing was lost since the last read
            self._backlog = 0
            return
        b = self._backlog + due - n
        room = self._cap - n
        if b > room:                # the ring overflowed: its oldest samples, the ones
            self.overruns += b - room   # just before this chunk, are gone (ESP32 DMA)
            self.lost_before = b - room
            b = room
        self._backlog = b if b > 0 else 0

    def take_overruns(self):
        """Samples lost since the last call (for SoundMeter.add_overruns)."""
        k = self.overruns - self._taken
        self._taken = self.overruns
        return k

    def deinit(self):
        if hasattr(self.i2s, 'deinit'):
            self.i2s.deinit()
