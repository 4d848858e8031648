"""Sound level meter: A-weighting, 125 ms energy blocks, window statistics, impulse events
(looked for in every quarter block, so one is found within ~31 ms of its onset, and
stamped at its onset's sample).

Input is 24-bit integer samples (drivers.mic). Raw audio never leaves this module:
only levels, statistics and events come out.

The per-sample path is one viper function on integers only. Floats on an ESP32 are
boxed heap objects (and float32), so a float filter would allocate on every sample
and lose the 20 Hz poles; 32-bit fixed point with error feedback does neither.
"""

import math
import time
from array import array

import micropython

# IEC 61672-1 analog A-weighting pole frequencies (Hz).
F1 = 20.598997
F2 = 107.65265
F3 = 737.86223
F4 = 12194.217

BLOCK_MS = 125              # "fast" block length
SUBS = 4                    # an impulse is looked for in each quarter block (31.25 ms):
                            # found up to 31 ms after its onset, not 125 (issue 11)
HIST_LO_DB = 20.0           # histogram range [HIST_LO_DB, HIST_LO_DB + HIST_BINS / 10) dB
HIST_BINS = 1200            # 0.1 dB bins: 2.4 KB, any window length up to 65535 blocks
MS_FULL_SCALE_SINE = 35184372088832.0   # 2**45: mean square of a sine peaking at 2**23
ONSET_DB = 6.0              # an onset: the first sample this far above the event's rise
GATE_STEP_DB = 0.05         # the detector's gate follows the background in steps this big
EVENT_QUARTERS = 8          # an event is sent once it has died down, or after 250 ms
# the classifier (classify(), docs/events.md), from the emulator's shapes: what a
# gunshot's muzzle blast is and a door slam, a firework's report or a crash is not
GUNSHOT_RISE_US = 1000      # from ~10 % to ~50 % of the peak (A-weighted): a blast's front
GUNSHOT_DECAY_DB = 7.0      # its tail falls this much per quarter (31 ms) or more: gone
CRASH_DECAY_DB = 3.0        # a crash's within this: it goes on
GUNSHOT_TILT_DB = 8.0       # LZpeak - LApeak: little of its peak below ~500 Hz
_OFF = 1 << 29              # states are stored offset-positive (see _filter_energy)

RUNGS = 12                  # the onset ladder: the first samples 1, 2, 4 .. 2**11 x the
                            # onset threshold (the rise time; the kernel spells it 12)
# co[] layout: per high-pass section k (0..3): D, F at 2k, 2k+1; LP: P, Q, F at 8, 9, 10.
# st[] layout: 0 start, 1 count, 2..9 section states, 10..13 HP error feedback,
#              14..15 LP error feedback, 16..18 energy words (base 2**24),
#              19 onset threshold (|sample|; 0 until the background forms), in the
#              quarter (1-based places, 0 = none): 20 ladder rungs crossed, 21 peak
#              |sample| (A-weighted), 22 the peak's place; 23 the place of xb[0] in
#              the quarter, plus one; 24 peak |sample| unweighted (Z); 25.. the places
#              of the rungs crossed (rung 0, the threshold itself: the onset).
ST_WORDS = 37                # 25, then the places of RUNGS rungs


@micropython.viper
def _filter_energy(xb: ptr32, st: ptr32, co: ptr32):
    """A-weight xb[start:start+count] and add the squares to the block energy.

    Six first-order steps (four bilinear high-passes, two matched low-passes);
    every product is a 16x15-bit split so no intermediate exceeds 31 bits on a
    32-bit ESP32. High-pass decay terms keep their rounding remainder (error
    feedback), so there is no dead band at the 20 Hz poles.
    """
    off = 1 << 29
    i = st[0]
    end = i + st[1]
    s0 = st[2] - off
    s1 = st[3] - off
    s2 = st[4] - off
    s3 = st[5] - off
    s4 = st[6] - off
    s5 = st[7] - off
    s6 = st[8] - off
    s7 = st[9] - off
    e1 = st[10]
    e2 = st[11]
    e3 = st[12]
    e4 = st[13]
    e5 = st[14]
    e6 = st[15]
    w0 = st[16]
    w1 = st[17]
    w2 = st[18]
    thr = st[19]
    r = st[20]
    pk = st[21]
    at = st[22]
    base = st[23]                       # xb index -> place in the quarter, plus one
    zp = st[24]
    nxt = thr                           # the next rung's |sample|; 2**24: none left
    k = 0
    while k < r and nxt < 0x800000:
        nxt = nxt << 1
        k += 1
    if thr == 0 or r >= 12 or k < r:
        nxt = 0x1000000
    d1 = co[0]
    f1 = co[1]
    k1 = f1 - 12
    m1 = (1 << k1) - 1
    n1 = (1 << f1) - 1
    d2 = co[2]
    f2 = co[3]
    k2 = f2 - 12
    m2 = (1 << k2) - 1
    n2 = (1 << f2) - 1
    d3 = co[4]
    f3 = co[5]
    k3 = f3 - 12
    m3 = (1 << k3) - 1
    n3 = (1 << f3) - 1
    d4 = co[6]
    f4 = co[7]
    k4 = f4 - 12
    m4 = (1 << k4) - 1
    n4 = (1 << f4) - 1
    lp = co[8]
    lq = co[9]
    lf = co[10]
    lk = lf - 12
    lm = (1 << lk) - 1
    ln = (1 << lf) - 1
    lim = 1 << 26
    while i < end:
        j = i + 64                      # 64 squares of < 2**24 each fit in 31 bits
        if j > end:
            j = end
        sa = 0
        sb = 0
        sc = 0
        while i < j:
            x = ((xb[i] + 0x800000) & 0xFFFFFF) - 0x800000   # sign-extend on 64-bit ports too
            i += 1
            if x > zp:
                zp = x
            elif x + zp < 0:
                zp = -x
            # high-pass: y = y1 + x - x1 - d*y1   (pole 1 - d, zero at z = 1)
            t = (s1 >> 12) * d1
            a = ((t & m1) << 12) + (s1 & 0xFFF) * d1 + e1
            y = s1 + x - s0 - (t >> k1) - (a >> f1)
            e1 = a & n1
            s0 = x
            x = y
            t = (s2 >> 12) * d2
            a = ((t & m2) << 12) + (s2 & 0xFFF) * d2 + e2
            y = s2 + x - s1 - (t >> k2) - (a >> f2)
            e2 = a & n2
            s1 = x
            x = y
            t = (s3 >> 12) * d3
            a = ((t & m3) << 12) + (s3 & 0xFFF) * d3 + e3
            y = s3 + x - s2 - (t >> k3) - (a >> f3)
            e3 = a & n3
            s2 = x
            x = y
            t = (s4 >> 12) * d4
            a = ((t & m4) << 12) + (s4 & 0xFFF) * d4 + e4
            y = s4 + x - s3 - (t >> k4) - (a >> f4)
            e4 = a & n4
            s3 = x
            s4 = y
            if y > lim:                 # only adversarial input gets here
                y = lim
            elif y < -lim:
                y = -lim
            x = y
            # low-pass: y = x + q*x1 + p*y1
            t = (s5 >> 12) * lq
            u = (s6 >> 12) * lp
            a = ((t & lm) << 12) + (s5 & 0xFFF) * lq + ((u & lm) << 12) + (s6 & 0xFFF) * lp + e5
            y = x + (t >> lk) + (u >> lk) + (a >> lf)
            e5 = a & ln
            s5 = x
            x = y
            t = (s6 >> 12) * lq
            u = (s7 >> 12) * lp
            a = ((t & lm) << 12) + (s6 & 0xFFF) * lq + ((u & lm) << 12) + (s7 & 0xFFF) * lp + e6
            y = x + (t >> lk) + (u >> lk) + (a >> lf)
            e6 = a & ln
            s6 = x
            s7 = y
            # energy: y*y = h*h*2**24 + 2*h*l*2**12 + l*l with 12-bit halves
            if y < 0:
                y = -y
            if y > 0xFFFFFF:
                y = 0xFFFFFF
            if y > pk:                  # the quarter's peak so far; a rung's first
                pk = y                  # crossing is always one
                at = i + base
                while y > nxt:
                    st[25 + r] = at
                    r += 1
                    if r >= 12 or nxt >= 0x800000:
                        nxt = 0x1000000
                    else:
                        nxt = nxt << 1
            h = y >> 12
            y = y & 0xFFF
            sa += h * h
            sb += h * y
            sc += y * y
        w0 += (sc & 0xFFFFFF) + ((sb & 0x7FF) << 13)
        w1 += (sc >> 24) + (sb >> 11) + (sa & 0xFFFFFF)
        w2 += sa >> 24
        w1 += w0 >> 24
        w0 = w0 & 0xFFFFFF
        w2 += w1 >> 24
        w1 = w1 & 0xFFFFFF
    st[2] = s0 + off
    st[3] = s1 + off
    st[4] = s2 + off
    st[5] = s3 + off
    st[6] = s4 + off
    st[7] = s5 + off
    st[8] = s6 + off
    st[9] = s7 + off
    st[10] = e1
    st[11] = e2
    st[12] = e3
    st[13] = e4
    st[14] = e5
    st[15] = e6
    st[16] = w0
    st[17] = w1
    st[18] = w2
    st[20] = r
    st[21] = pk
    st[22] = at
    st[24] = zp


@micropython.viper
def _zero16(h: ptr16, n: int):
    """h[0:n] = 0: a window's histogram, ~1200 bins (a Python loop: ~4 ms of the chip's
    time in the loop at every window close)."""
    k = 0
    while k < n:
        h[k] = 0
        k += 1


@micropython.viper
def _count16(h: ptr16, k: int):
    """h[k] += 1, up to 65535: a block's level counted in the window's histogram (a
    bytearray: an array('H') made from zeroed bytes needs twice its size at once)."""
    if h[k] < 65535:
        h[k] = h[k] + 1


@micropython.viper
def _exceeded(h: ptr16, n: int, need: int) -> int:
    """The highest bin k such that bins k.. hold at least `need` counts; -1 if none."""
    cum = 0
    k = n - 1
    while k >= 0:
        cum += h[k]
        if cum >= need:
            return k
        k -= 1
    return -1


def _energy(w2, w1, w0):
    """A sum of squares kept in three 24-bit words, as a float."""
    return (w2 * 16777216.0 + w1) * 16777216.0 + w0


def _words(e):
    """Float energy e as its top two 24-bit words (hi, mid): small ints on a 32-bit
    port (an int() above 2**30 would allocate a long int)."""
    hi = int(e / 281474976710656.0)     # 2**48
    mid = int(e / 16777216.0 - hi * 16777216.0)
    return hi, min(max(mid, 0), 0xFFFFFF)


def _qformat(c):
    """(integer, fraction bits) for |c| < 1 with 14-15 significant bits, F in 15..28."""
    f = 15
    while f < 28 and abs(c) * (1 << (f + 1)) < 32767:
        f += 1
    return int(c * (1 << f) + (0.5 if c >= 0 else -0.5)), f


def design(rate):
    """Fixed-point A-weighting coefficients for `rate`: (co array, gain at 1 kHz).

    The four low poles are bilinear transforms, each pre-warped to its own corner
    (K = 2 fs, w' = K tan(w / K)), as high-passes y = y1 + x - x1 - d*y1 with
    d = 1 - pole computed directly, so d keeps its precision (0.0027 at 48 kHz).
    The 12.2 kHz double pole is not bilinear: bilinear puts a double zero at
    Nyquist (0.7 dB off at 8 kHz at 48 kHz, and the pole is above Nyquist at
    16 kHz). It is matched instead: pole exp(-w4/fs), zero q chosen so the section
    magnitude equals the analog one at 0.28 fs (within 0.1 dB up to 12.5 kHz at
    48 kHz and up to 5 kHz at 16 kHz). Gains are left out of the integer path and
    taken back in the level offset.
    """
    co = array('i', [0] * 11)
    sw = math.sin(math.pi * 1000.0 / rate)
    sw2 = 4.0 * sw * sw                 # |1 - e^-jw|^2 at 1 kHz
    g2 = 1.0                            # |H(1 kHz)|^2 of the integer filter
    for k, fc in enumerate((F1, F1, F2, F3)):
        tw = math.tan(math.pi * fc / rate)
        dq, f = _qformat(2.0 * tw / (1.0 + tw))
        co[2 * k] = dq
        co[2 * k + 1] = f
        d = dq / (1 << f)               # as quantized
        p = 1.0 - d
        g2 *= sw2 / (d * d + p * sw2)   # |1 - z^-1|^2 / |1 - p z^-1|^2, cancellation-free
    p = math.exp(-2.0 * math.pi * F4 / rate)
    wm = 2.0 * math.pi * 0.28
    c = math.cos(wm)
    tt = (1.0 + p * p - 2.0 * p * c) / (1.0 + (0.28 * rate / F4) ** 2)
    a = (1.0 - p) ** 2 - tt
    b = c * (1.0 - p) ** 2 - tt
    r = math.sqrt(b * b - a * a)
    q = -a / (b + (r if b >= 0.0 else -r))     # roots q and 1/q: the one inside, no cancellation
    fl = min(_qformat(p)[1], _qformat(q)[1])   # one shift for both products
    pq = int(p * (1 << fl) + 0.5)
    qq = int(q * (1 << fl) + (0.5 if q >= 0 else -0.5))
    co[8] = pq
    co[9] = qq
    co[10] = fl
    p = pq / (1 << fl)
    q = qq / (1 << fl)
    g = ((1.0 + q) ** 2 - q * sw2) / ((1.0 - p) ** 2 + p * sw2)
    g2 *= g * g                         # two identical low-pass steps
    return co, math.sqrt(g2)


def classify(rise_us, tilt_db, decay_db):
    """gunshot, crash or other, from what the node measures of an impulse: its rise
    time, LZpeak - LApeak (how much of its peak is below ~500 Hz) and how fast its
    tail decays (dB per quarter block, from 16-47 ms after its onset).

    A muzzle blast's front rises within a millisecond, it is broadband, and it is
    gone within a few reflections; a crash's impacts and debris go on; a door slam
    rises slower and is low; a firework's report is a blast too but of a larger,
    slower charge, with a rumble after it. docs/events.md has the confusion table
    on the emulator's shapes (python -m bench.events).
    """
    if decay_db < CRASH_DECAY_DB:
        return 'crash'
    if decay_db >= GUNSHOT_DECAY_DB and rise_us <= GUNSHOT_RISE_US and tilt_db <= GUNSHOT_TILT_DB:
        return 'gunshot'
    return 'other'


class _Sounding:
    """An impulse still sounding: what is known of it so far (made only for an event)."""

    def __init__(self, t_us, level, rise, rise_us, tail, lost_ms):
        self.t_us = t_us            # ticks_us at its onset
        self.lost_ms = lost_ms      # audio lost just before it (its onset may be
                                    # later) and while it sounded
        self.level = level          # dB(A) of the quarter it was found in
        self.rise = rise            # dB above the background
        self.rise_us = rise_us
        self.zpk = 0                # peak |sample|, unweighted and A-weighted
        self.apk = 0
        self.quarters = 1           # quarter blocks heard, its first included
        # its decay is measured between two whole quarters of its tail, the first one
        # starting 16-47 ms after its onset (whatever its place in its first quarter):
        # the quarters numbered tail and tail + 1 after its first
        self.tail = tail
        self._tail_db = None
        self.decay = None           # dB per quarter

    def heard(self, zpk, apk):
        if zpk > self.zpk:
            self.zpk = zpk
        if apk > self.apk:
            self.apk = apk

    def tail_level(self, db, lost):
        """`lost`: quarters of audio lost just before this one. The decay is per quarter
        of the sound's time: a slow tail with a gap in it must not read as a fast one (a
        firework's ~4.5 dB a quarter across 187 ms lost read 22-28: a gunshot)."""
        if self._tail_db is None:
            self._tail_db = db
        else:
            self.decay = (self._tail_db - db) / (1 + lost)


class SoundMeter:
    """Continuous A-weighted level meter for one microphone.

    Feed every sample, in order, with process(); call add_overruns() with the
    samples the driver lost. Levels are dB(A) re 20 uPa: fs_db_spl is the SPL of
    a full-scale (2**23 peak) sine, 120 dB for a -26 dBFS @ 94 dB microphone,
    cal_db the per-microphone correction from config.
    The window ends when the owner calls close_window() (the node's window clock).
    Only a meter that runs on its own (a bench, a test) gives window_s: then it
    also closes a window every window_s of audio, through on_window.
    """

    def __init__(self, rate=48000, window_s=0, cal_db=0.0, fs_db_spl=120.0,
                 event_rise_db=15.0, background_s=10.0, on_event=None, on_window=None,
                 clock_us=None, max_events=8):
        if rate % (8 * SUBS):
            raise ValueError('rate must be a multiple of %d Hz (125 ms blocks in %d parts)'
                             % (8 * SUBS, SUBS))
        self.rate = rate
        self.block_len = rate // 8
        self.sub_len = self.block_len // SUBS
        self.window_blocks = int(window_s * 8) if window_s else 0
        self._co, gain = design(rate)
        self.cal_db = cal_db
        self._base = fs_db_spl - 10.0 * math.log10(MS_FULL_SCALE_SINE * gain * gain)
        # peak levels: 20 log10 |sample| plus these (the A path's samples carry its gain)
        self._zbase = self._base + 20.0 * math.log10(gain)
        self.event_rise_db = event_rise_db
        self._alpha = 1.0 / (8.0 * background_s)
        self.on_event = on_event
        self.on_window = on_window
        self._clock = clock_us or time.ticks_us
        # zeroed from raw bytes: a [0] * n list first would cost n words of heap
        self._st = array('i', bytes(4 * ST_WORDS))
        self._hist = bytearray(2 * HIST_BINS)     # HIST_BINS counts of 16 bits: _count16
        self._events = []
        self._read_us = None            # when this chunk was read (ticks_us)
        self._max_events = max_events
        self.events_heard = 0           # events ended so far (a reader sees one came)
        self.events_dropped = 0
        self.last_window = None
        self.reset()

    def reset(self):
        """Start from silence: filter state, block, window and background."""
        st = self._st
        for k in range(ST_WORDS):
            st[k] = 0
        for k in range(2, 10):
            st[k] = _OFF
        self._left = self.sub_len
        self._subs = 0
        self._b2 = self._b1 = self._b0 = 0     # the block's energy so far, 24-bit words
        self._p2 = self._p1 = self._p0 = 0     # the previous quarter's
        self._gate = None           # (hi, mid) words a quarter must pass to be looked at
        self._rearm = None
        self._gate_bg = None        # the background the gate was set at
        self.background = None
        self._armed = True
        self._open = None               # the event still sounding (see _detect)
        self._gap = 0                   # samples lost in this quarter and the one before
        self._gap_prev = 0
        self._warm = 0
        self.level = None               # last fast (125 ms) level, dB(A)
        self._new_window()

    def _new_window(self):
        _zero16(self._hist, HIST_BINS)
        self._nb = 0
        self._sum = 0.0
        self._max = -1e9
        self._min = 1e9
        self._over = 0

    def add_overruns(self, samples):
        """Count samples the driver lost (they are in no block)."""
        self._over += samples

    def process(self, buf, n, read_us=None, lost_before=0):
        """Consume buf[0:n] (array('i') of 24-bit samples), whose last sample was taken at
        ticks_us() `read_us` (for event stamps: now, by default; at chip speed a chunk is
        processed well after it was read; Mic.read_us); `lost_before` samples the driver
        lost just before it (an event right after such a gap may have begun in it: it
        says so). Allocation-free between blocks."""
        self._read_us = read_us
        self._gap += lost_before
        st = self._st
        i = 0
        while i < n:
            m = n - i
            if m > self._left:
                m = self._left
            st[0] = i
            st[1] = m
            st[23] = self.sub_len - self._left - i
            _filter_energy(buf, st, self._co)
            i += m
            self._left -= m
            if self._left == 0:
                self._left = self.sub_len
                self._close_sub(n - i)

    def _level(self, e, samples):
        ms = e / samples
        return 10.0 * math.log10(ms) + self._base + self.cal_db if ms > 0.0 else 0.0

    def _close_sub(self, after):
        """A quarter block ends (`after` samples of the chunk follow it): its energy
        joins the block's and is looked at for an impulse. Integers only (no heap)
        unless the quarter is loud."""
        st = self._st
        q2 = st[18]
        q1 = st[17]
        q0 = st[16]
        if self._gate is not None:
            self._detect(q2, q1, q0, after)
        self._gap_prev = self._gap
        self._gap = 0
        st[16] = 0
        st[17] = 0
        st[18] = 0
        st[20] = 0
        st[21] = 0
        st[22] = 0
        st[24] = 0
        b0 = self._b0 + q0
        b1 = self._b1 + q1 + (b0 >> 24)
        self._b0 = b0 & 0xFFFFFF
        self._b2 += q2 + (b1 >> 24)
        self._b1 = b1 & 0xFFFFFF
        self._p2 = q2
        self._p1 = q1
        self._p0 = q0
        self._subs += 1
        if self._subs == SUBS:
            self._subs = 0
            self._close_block(_energy(self._b2, self._b1, self._b0))
            self._b2 = self._b1 = self._b0 = 0

    def _close_block(self, e):
        ms = e / self.block_len
        lvl = self._level(e, self.block_len)
        self.level = lvl
        self._sum += ms
        self._nb += 1
        if lvl > self._max:
            self._max = lvl
        if lvl < self._min:
            self._min = lvl
        k = int((lvl - HIST_LO_DB) * 10.0)
        if k < 0:
            k = 0
        elif k >= HIST_BINS:
            k = HIST_BINS - 1
        _count16(self._hist, k)
        self._background(lvl)
        if self.window_blocks and self._nb >= self.window_blocks:
            self.close_window()

    def _background(self, lvl):
        """The slow background of the 125 ms levels, and the quarter energies that are
        event_rise_db and half of it above it; the first second only forms it."""
        bg = self.background
        if bg is None:
            self.background = lvl
            return
        if self._warm < 8:              # first second: filter settling, background forming
            self._warm += 1
        bg = self.background = bg + (lvl - bg) * self._alpha
        # the gate again only once the background has moved: set every block, its ~20
        # boxed floats were most of the audio's garbage (~11 KB/s), and the heap's
        # collections at chip speed are the loop's longest stalls
        if self._warm == 8 and (self._gate_bg is None
                                or abs(bg - self._gate_bg) >= GATE_STEP_DB):
            self._gate_bg = bg
            e = self.sub_len * 10.0 ** ((bg - self._base - self.cal_db) / 10.0)
            self._gate = _words(e * 10.0 ** (self.event_rise_db / 10.0))
            self._rearm = _words(e * 10.0 ** (self.event_rise_db / 20.0))
            # a sample this far above the background's RMS: an onset, never the noise
            # (ONSET_DB above the gate's rise: 11x the RMS for a 15 dB rise)
            thr = math.sqrt(e / self.sub_len) * 10.0 ** ((self.event_rise_db + ONSET_DB) / 20)
            self._st[19] = int(min(thr, 0xFFFFFF))

    def _detect(self, q2, q1, q0, after):
        """An impulse: a quarter block event_rise_db above the background, most of the
        rise sudden (half of it since the previous quarter). Stamped at its onset, the
        quarter's first sample ONSET_DB above the rise (else its peak). It lasts until
        a quarter is back within half the rise, which re-arms the detector; it is sent
        then, or after EVENT_QUARTERS if it goes on."""
        st = self._st
        ev = self._open
        if not self._armed:                 # an event is sounding, or just was
            h2, h1 = self._rearm
            quiet = q2 < h2 or (q2 == h2 and q1 < h1)
            if ev is not None:
                ev.heard(st[24], st[21])
                if self._gap:                   # audio lost while it sounded
                    ev.lost_ms += self._gap * 1000 // self.rate
                if ev.tail <= ev.quarters <= ev.tail + 1:
                    ev.tail_level(self._level(_energy(q2, q1, q0), self.sub_len),
                                  self._gap / self.sub_len)
                ev.quarters += 1
                if quiet or ev.quarters >= EVENT_QUARTERS:
                    self._finish()
            if quiet:
                self._armed = True
            return
        t2, t1 = self._gate
        if q2 < t2 or (q2 == t2 and q1 <= t1):
            return
        lvl = self._level(_energy(q2, q1, q0), self.sub_len)
        prev = self._level(_energy(self._p2, self._p1, self._p0), self.sub_len)
        if lvl - prev <= 0.5 * self.event_rise_db:
            return
        self._armed = False
        onset = (st[25] if st[20] else st[22] or 1) - 1
        # the onset's sample: when the chunk's last sample was taken, minus the samples
        # after the onset
        read = self._clock() if self._read_us is None else self._read_us
        back = (after + self.sub_len - onset) * 1000000 // self.rate
        self._open = _Sounding(time.ticks_add(read, -back), lvl, lvl - self.background,
                               self._rise_us(), 1 if onset < self.sub_len // 2 else 2,
                               (self._gap + self._gap_prev) * 1000 // self.rate)
        self._open.heard(st[24], st[21])

    def _rise_us(self):
        """The quarter's rise time: from its first sample at or above ~10 % of its peak
        to its first above ~50 % (rungs of the onset ladder, so each within 2x): a
        clipped or ringing peak does not move it."""
        st = self._st
        r = st[20]
        if not r:
            return 0
        v = st[19]
        k = 0
        while k < r - 1 and v * 10 < st[21]:
            v <<= 1
            k += 1
        return (st[25 + r - 1] - st[25 + k]) * 1000000 // self.rate

    def _finish(self):
        ev = self._open
        self._open = None
        lz = 20.0 * math.log10(ev.zpk or 1) + self._zbase + self.cal_db
        la = 20.0 * math.log10(ev.apk or 1) + self._base + self.cal_db
        # not measured: it was back near the background before its second tail quarter
        decay = ev.rise if ev.decay is None else ev.decay
        out = (ev.t_us, round(ev.level, 1), round(ev.rise, 1), round(lz, 1), round(la, 1),
               round(ev.rise_us / 1000, 2), ev.quarters * BLOCK_MS // SUBS, round(decay, 1),
               classify(ev.rise_us, lz - la, decay), ev.lost_ms)
        self.events_heard += 1
        if self.on_event:
            self.on_event(*out)
        else:
            if len(self._events) >= self._max_events:
                self._events.pop(0)
                self.events_dropped += 1
            self._events.append(out)

    def pop_event(self):
        """Oldest queued event or None (when no on_event): (t_us at its onset, level dB(A)
        of its first quarter, its rise above the background dB, LZpeak dB, LApeak dB,
        rise time ms, duration ms (to EVENT_QUARTERS), decay dB per quarter, class, audio
        lost in its quarter, the one before or while it sounded, ms: if not 0, it may
        have begun earlier and louder)."""
        return self._events.pop(0) if self._events else None

    def _percentile(self, pct):
        """Level exceeded in pct % of the blocks (L10: pct=10), bin centre."""
        k = _exceeded(self._hist, HIST_BINS, (self._nb * pct + 99) // 100)
        return round(HIST_LO_DB + (k + 0.5) / 10.0, 2) if k >= 0 else None

    def close_window(self):
        """Finish the current window and start the next one: dict of its statistics.

        laeq / lamax / lamin / l10 / l90 in dB(A) (None when no block), blocks
        (125 ms each), overruns (samples lost).
        """
        nb = self._nb
        r = {
            'laeq': round(10.0 * math.log10(self._sum / nb) + self._base + self.cal_db, 2)
            if nb and self._sum > 0.0 else None,
            'lamax': round(self._max, 2) if nb else None,
            'lamin': round(self._min, 2) if nb else None,
            'l10': self._percentile(10) if nb else None,
            'l90': self._percentile(90) if nb else None,
            'blocks': nb,
            'overruns': self._over,
        }
        self._new_window()
        self.last_window = r
        if self.on_window:
            self.on_window(r)
        return r
