"""Plantower PMS5003 particulate sensor, at UART level (data manual V2.3).

Output: 32-byte frames, 0x42 0x4D, frame length 28, thirteen big-endian words (PM1.0,
PM2.5, PM10 at CF=1 and under atmospheric environment, six particle counts per
0.1 L, version and error code) and a checksum that is the sum of the first 30
bytes. Input: 7-byte commands 0x42 0x4D CMD DATAH DATAL LRCH LRCL (LRC = sum of the
first five bytes): 0xE1 passive(0)/active(1), 0xE2 read in passive mode, 0xE4
sleep(0)/wake(1). Mode and sleep commands are answered with the 8-byte
acknowledgement the part sends (42 4D 00 04 CMD DATAL sum).

Bytes leave at 9600 baud (10 bits a byte) on the device clock; each carries its
arrival time, so the host-side UART can fill the driver's RX buffer at the
line's real pace. The fan needs ~30 s after waking before readings are valid:
during warm-up the numbers come out low and noisy, so a node that discards them
reports the scenario's air and one that does not reports worse.
"""

from __future__ import annotations

import random
import struct
from collections import deque
from collections.abc import Callable
from typing import Any

from .base import SimulatedPart, World

BAUD = 9600
BYTE_TIME = 10 / BAUD
HEADER = b"\x42\x4d"
FRAME_LEN = 32
CMD_MODE, CMD_READ, CMD_SLEEP = 0xE1, 0xE2, 0xE4
VERSION = 0x97
RESPONSE_DELAY = 0.004   # command received -> answer starts
INTERVAL = 1.0           # active mode: a frame a second
WARMUP = 30.0            # fan spin-up after wake / power-on


def checksum(data: bytes) -> int:
    return sum(data) & 0xFFFF


def build_frame(words: list[int], bad_checksum: bool = False) -> bytes:
    """A data frame from its 13 data words."""
    body = HEADER + struct.pack(">H13H", 2 * 13 + 2, *(max(0, min(0xFFFF, w)) for w in words))
    total = checksum(body)
    if bad_checksum:
        total = (total + 0x0101) & 0xFFFF
    return body + struct.pack(">H", total)


def command(cmd: int, data: int = 0) -> bytes:
    """A host-to-sensor command frame (for tests and drivers)."""
    body = HEADER + bytes((cmd, data >> 8, data & 0xFF))
    return body + struct.pack(">H", checksum(body))


def cf1_from_atmospheric(atm: float) -> float:
    """CF=1 ('standard particle') reads equal to atmospheric in clean air, higher above ~30."""
    return atm if atm < 30 else atm + 0.5 * (atm - 30)


def data_words(pm1: float, pm25: float, pm10: float) -> list[int]:
    """Frame words for atmospheric concentrations, counts from a typical urban size mix."""
    pm1, pm25, pm10 = (int(round(v)) for v in (pm1, pm25, pm10))
    coarse = max(0, pm10 - pm25)
    n03 = 190 * pm1 + 15 * pm25
    n05 = min(n03, 55 * pm1 + 5 * pm25)
    n10 = min(n05, 6 * pm25 + 2 * coarse)
    n25 = min(n10, int(0.4 * pm25 + 0.8 * coarse))
    n50 = min(n25, int(0.25 * coarse))
    n100 = min(n50, int(0.08 * coarse))
    cf = [int(round(cf1_from_atmospheric(v))) for v in (pm1, pm25, pm10)]
    return cf + [pm1, pm25, pm10, n03, n05, n10, n25, n50, n100, VERSION << 8]


class PMS5003(SimulatedPart):
    name = "pms5003"
    corruptible = True
    control_pin = "pms_set"     # the SET line, on the GPIO boards.yaml names pms_set
    baud = BAUD                 # what it speaks; boards.yaml's `baud` may say otherwise

    def __init__(self, air: Callable[[float], tuple[float, float, float]],
                 clock: Callable[[], float], seed: int = 0, warm: bool = True) -> None:
        """air(t) -> (PM1, PM2.5, PM10) ug/m3 at device-clock time t; clock(): now.

        warm: the fan has been running for a while (a board on the bench); False for a
        cold power-on.
        """
        self._air = air
        self._clock = clock
        self._rng = random.Random(seed)
        self._tx: deque[tuple[float, bytes]] = deque()  # (start time, bytes) queued on the line
        self._line_free = 0.0
        self._rx = bytearray()
        self._bad_frames = 0
        self._garbage_frames = 0
        self.powered = False
        self.listening = True       # a UART driver is there to receive (faults wait for one)
        self.power_on(warm=warm)

    @classmethod
    def attach(cls, world: World, spec: dict[str, Any], seed: int) -> PMS5003:
        """On a bench board the fan has run for a while; nothing listens until the
        firmware opens its UART."""
        part = cls(world.air, world.scenario.wall, seed=seed, warm=True)
        part.listening = False
        return part

    # -- power, mode, fan ---------------------------------------------------------------
    def power_on(self, warm: bool = False) -> None:
        now = self._clock()
        self.powered = True
        self.active = True          # the power-on default
        self.asleep = False
        self.set_pin = True
        self._fan_start = now - WARMUP if warm else now
        self._next_frame = now + INTERVAL
        self._tx.clear()
        self._rx.clear()

    def power_off(self) -> None:
        self.powered = False
        self._tx.clear()

    def _sleep(self, at: float) -> None:
        self.asleep = True

    def _wake(self, at: float) -> None:
        if self.asleep:
            self.asleep = False
            self._fan_start = at
            self._next_frame = at + INTERVAL

    def set_pin_level(self, level: int, at: float | None = None) -> None:
        """The SET line: low puts the part to sleep, high wakes it."""
        at = self._clock() if at is None else at
        self._generate(at)
        self._drop_after(at)
        self.set_pin = bool(level)
        if level:
            self._wake(at)
        else:
            self._sleep(at)

    def warming_up(self, at: float | None = None) -> bool:
        at = self._clock() if at is None else at
        return at - self._fan_start < WARMUP

    @property
    def sending(self) -> bool:
        return self.powered and not self.asleep and self.set_pin

    def state(self) -> dict[str, Any]:
        return {"active": self.active, "asleep": self.asleep, "warming_up": self.warming_up()}

    # -- faults ---------------------------------------------------------------------------
    def corrupt(self, count: int = 1, kind: str = "checksum", **kw: Any) -> None:
        """The next `count` frames carry a bad checksum, or are preceded by line garbage
        (the next ones sent while `listening`, so a fault is not lost on an idle line)."""
        if kind == "checksum":
            self._bad_frames += count
        elif kind == "garbage":
            self._garbage_frames += count
        else:
            raise ValueError("pms5003 corruption kind: 'checksum' or 'garbage'")

    # -- output ---------------------------------------------------------------------------
    def _reading(self, at: float) -> list[int]:
        pm1, pm25, pm10 = self._air(at)
        warm = (at - self._fan_start) / WARMUP
        if warm < 1.0:  # the fan has not reached speed: too little air, unsteady flow
            gain = 0.2 + 0.6 * max(0.0, warm) ** 2
            pm1, pm25, pm10 = (v * gain * (1.0 + self._rng.uniform(-0.5, 0.5))
                               for v in (pm1, pm25, pm10))
        return data_words(pm1, pm25, pm10)

    def _queue_frame(self, at: float) -> None:
        bad = self._bad_frames > 0 and self.listening
        frame = build_frame(self._reading(at), bad_checksum=bad)
        if bad:
            self._bad_frames -= 1
        if self._garbage_frames and self.listening:
            self._garbage_frames -= 1
            noise = bytes(self._rng.getrandbits(8) for _ in range(self._rng.randint(3, 12)))
            frame = noise + b"\x42" + frame  # a stray header byte makes resync non-trivial
        self._send(frame, at)

    def _send(self, data: bytes, at: float) -> None:
        start = max(at, self._line_free)
        self._tx.append((start, data))
        self._line_free = start + len(data) * BYTE_TIME

    def _generate(self, until: float) -> None:
        """Queue the active-mode frames due by `until`."""
        while self.sending and self.active and self._next_frame <= until:
            self._queue_frame(self._next_frame)
            self._next_frame += INTERVAL
        if not (self.sending and self.active):
            self._next_frame = max(self._next_frame, until)

    def _drop_after(self, at: float) -> None:
        """Forget frames queued ahead of time that had not started by `at`."""
        while self._tx and self._tx[-1][0] > at:
            start, _ = self._tx.pop()
            self._next_frame = min(self._next_frame, start)
        self._line_free = max(at, (self._tx[-1][0] + len(self._tx[-1][1]) * BYTE_TIME)
                              if self._tx else at)

    def arrivals(self, until: float) -> list[float]:
        """Arrival times of the bytes on the line by `until` (not consumed)."""
        self._generate(until)
        times = []
        for start, data in self._tx:
            for i in range(len(data)):
                t = start + (i + 1) * BYTE_TIME  # a byte is there once its stop bit is
                if t > until:
                    return times
                times.append(t)
        return times

    def take(self, until: float) -> bytes:
        """The bytes fully received by `until`, oldest first."""
        self._generate(until)
        out = bytearray()
        while self._tx:
            start, data = self._tx[0]
            done = min(len(data), int((until - start) / BYTE_TIME + 1e-9))
            if done <= 0:
                break
            out += data[:done]
            if done == len(data):
                self._tx.popleft()
            else:
                self._tx[0] = (start + done * BYTE_TIME, data[done:])
                break
        return bytes(out)

    # -- input ----------------------------------------------------------------------------
    def receive(self, data: bytes, at: float) -> None:
        """Bytes from the MCU; `at` is when the last one arrived."""
        if not self.powered:
            return
        self._rx += data
        while True:
            start = self._rx.find(HEADER)
            if start < 0:
                del self._rx[:-1]
                return
            del self._rx[:start]
            if len(self._rx) < 7:
                return
            frame, self._rx[:7] = bytes(self._rx[:7]), b""
            if struct.unpack(">H", frame[5:7])[0] == checksum(frame[:5]):
                self._command(frame[2], frame[4], at)

    def _command(self, cmd: int, data: int, at: float) -> None:
        self._generate(at)
        self._drop_after(at)
        if cmd == CMD_SLEEP:
            if data == 0:
                if not self.asleep:
                    self._ack(cmd, data, at)
                self._sleep(at)
            else:
                self._wake(at)  # wake-up is not acknowledged: the fan just starts
        elif self.asleep or not self.set_pin:
            return  # a sleeping part ignores everything but wake-up
        elif cmd == CMD_MODE:
            self.active = bool(data)
            self._ack(cmd, data, at)
            if self.active:
                self._next_frame = at + INTERVAL
        elif cmd == CMD_READ and not self.active:
            self._queue_frame(at + RESPONSE_DELAY)

    def _ack(self, cmd: int, data: int, at: float) -> None:
        body = HEADER + bytes((0x00, 0x04, cmd, data & 0xFF))
        self._send(body + struct.pack(">H", checksum(body)), at + RESPONSE_DELAY)
