"""Every simulated part, read through MicroPython code on an emulated board.

The code below runs on the board (the real MicroPython VM), sent with the unmodified
mpremote CLI over the board's pty, and does what a driver does: opcodes and
registers over I2C, the datasheet's integer compensation, frame sync and checksum
over the UART, samples over I2S. The host side checks the results against the
scenario, whose values the test pins.

The board is started in-process (EmulatedBoard + Peripherals) so the test can pin
the scenario and inject faults directly.
"""

from __future__ import annotations

import errno
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from citynode.boards import get_board
from citynode.emulator.board import EmulatedBoard
from citynode.emulator.peripherals import Peripherals
from citynode.emulator.scenario import Event, Scenario
from citynode.provisioning.device import last_json
from citynode.testing.emulator import FIRMWARE, mpremote, start_emulator, wait_for

PINNED = {"lux": 1234.0, "temperature": 22.5, "pressure": 100_512.0, "humidity": 41.5,
          "pm25": 17.0, "pm1": 11.0, "pm10": 26.0, "noise_dba": 35.0}

I2C_SETUP = """
import machine, time, struct, json
i2c = machine.I2C(0, scl=machine.Pin(22), sda=machine.Pin(21), freq=400000)
"""

PMS_SETUP = """
import machine, time, struct, json
uart = machine.UART(2, baudrate=9600, tx=17, rx=16, timeout=2500, rxbuf=512)

def pms_frame():
    # resync on 0x42 0x4d, then 30 more bytes; (checksum ok, 13 words)
    while True:
        b = uart.read(1)
        if not b:
            return None
        if b == b"\\x42" and uart.read(1) == b"\\x4d":
            rest = uart.read(30)
            f = b"\\x42\\x4d" + rest
            ok = sum(f[:30]) & 0xFFFF == (f[30] << 8 | f[31])
            return ok, struct.unpack(">13H", f[4:30])

def drain():
    n = uart.any()
    return uart.read(n) if n else b""

def pms_cmd(cmd, data):
    body = bytes((0x42, 0x4D, cmd, data >> 8, data & 0xFF))
    return body + struct.pack(">H", sum(body))
"""

I2S_SETUP = """
import machine, time, struct, json, math
mic = machine.I2S(0, sck=machine.Pin(26), ws=machine.Pin(25), sd=machine.Pin(33),
                  mode=machine.I2S.RX, bits=32, format=machine.I2S.MONO, rate=16000, ibuf=20000)
buf = bytearray(16000)

def level():
    # dBFS of one buffer (0 dBFS = a full-scale sine), and the OR of the slots' low bytes
    mic.readinto(buf)
    acc = 0
    low = 0
    for i in range(0, len(buf), 4):
        v = struct.unpack_from("<i", buf, i)[0]
        low |= v & 0xFF
        v >>= 8
        acc += v * v
    n = len(buf) // 4
    if acc == 0:
        return None, low
    return 10 * math.log10(acc / n * 2 / (1 << 23) ** 2), low
"""


class Pole:
    def __init__(self, link: str, parts: Peripherals | None, scenario: Scenario | None,
                 fs: Path | None = None) -> None:
        self.link, self.parts, self.scenario, self.fs = link, parts, scenario, fs

    def run(self, code: str) -> dict:
        """Run code on the board; its last printed line is JSON."""
        out = mpremote(self.link, "exec", code, timeout=60)
        return last_json(out)


@pytest.fixture(scope="module")
def pole(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pole")
    board = get_board("esp32-devkitc")
    # A calibrator held over the microphone all day: 94 dB SPL at 1 kHz.
    scenario = Scenario(seed=11, events=[Event(0.0, "tone", 94.0, duration=86400.0)])
    scenario.override(**PINNED)
    parts = Peripherals(board, scenario)
    emu = EmulatedBoard(board, tmp / "state", link=tmp / "node0", peripherals=parts)
    emu.power_on()
    p = Pole(str(tmp / "node0"), parts, scenario, fs=tmp / "state" / "fs")
    wait_for(lambda: _alive(p), timeout=30, interval=0.5, what="the board's REPL")
    yield p
    emu.close()


def _alive(pole: Pole) -> bool:
    try:
        return pole.run("print('{\"up\": 1}')") == {"up": 1}
    except Exception:
        return False


def test_i2c_scan_nack_and_unplug(pole: Pole) -> None:
    code = I2C_SETUP + """
def probe(addr):
    try:
        i2c.readfrom(addr, 1)
        return 0
    except OSError as e:
        return e.args[0]
print(json.dumps({"scan": i2c.scan(), "unused": probe(0x40)}))
"""
    assert pole.run(code) == {"scan": [0x23, 0x76], "unused": errno.ENODEV}
    pole.parts.fault("unplug", sensor="bh1750")
    try:
        assert pole.run(code.replace("0x40", "0x23")) == {"scan": [0x76],
                                                          "unused": errno.ENODEV}
    finally:
        pole.parts.fault("plug", sensor="bh1750")


def test_bh1750_through_micropython(pole: Pole) -> None:
    code = I2C_SETUP + """
BH = 0x23
i2c.writeto(BH, b"\\x01\\x07")                     # power on, reset the data register
mt = 254                                          # long integration: 442 ms
i2c.writeto(BH, bytes((0x40 | mt >> 5, 0x60 | (mt & 0x1F), 0x20)))  # one-time H-res
early = i2c.readfrom(BH, 2)
time.sleep_ms(600)
d = i2c.readfrom(BH, 2)
lux_mt = (d[0] << 8 | d[1]) / 1.2 * (69 / mt)
i2c.writeto(BH, bytes((0x01, 0x40 | 69 >> 5, 0x60 | (69 & 0x1F), 0x10)))  # continuous H-res
time.sleep_ms(200)
d = i2c.readfrom(BH, 2)
print(json.dumps({"early": list(early), "lux_mt": lux_mt, "lux": (d[0] << 8 | d[1]) / 1.2}))
"""
    r = pole.run(code)
    assert r["early"] == [0, 0]                       # conversion not finished yet
    assert r["lux_mt"] == pytest.approx(PINNED["lux"], abs=0.3)
    assert r["lux"] == pytest.approx(PINNED["lux"], abs=1)


def test_bme280_datasheet_compensation_on_the_board(pole: Pole) -> None:
    code = I2C_SETUP + """
A = 0x76
chip = i2c.readfrom_mem(A, 0xD0, 1)[0]
c = i2c.readfrom_mem(A, 0x88, 26)
h = i2c.readfrom_mem(A, 0xE1, 7)
T1, T2, T3, P1, P2, P3, P4, P5, P6, P7, P8, P9 = struct.unpack("<HhhHhhhhhhhh", c[:24])
H1 = c[25]
H2, H3 = struct.unpack("<hB", h[:3])
H4 = (h[3] << 4) | (h[4] & 0x0F)
H4 = H4 - 4096 if H4 & 0x800 else H4
H5 = (h[5] << 4) | (h[4] >> 4)
H5 = H5 - 4096 if H5 & 0x800 else H5
H6 = h[6] - 256 if h[6] & 0x80 else h[6]
i2c.writeto_mem(A, 0xF2, b"\\x01")                 # humidity x1
i2c.writeto_mem(A, 0xF4, b"\\x25")                 # T x1, P x1, forced
time.sleep_ms(5)
while i2c.readfrom_mem(A, 0xF3, 1)[0] & 0x08:
    time.sleep_ms(2)
d = i2c.readfrom_mem(A, 0xF7, 8)
adc_p = (d[0] << 12) | (d[1] << 4) | (d[2] >> 4)
adc_t = (d[3] << 12) | (d[4] << 4) | (d[5] >> 4)
adc_h = (d[6] << 8) | d[7]
var1 = (((adc_t >> 3) - (T1 << 1)) * T2) >> 11
var2 = (((((adc_t >> 4) - T1) * ((adc_t >> 4) - T1)) >> 12) * T3) >> 14
t_fine = var1 + var2
T = (t_fine * 5 + 128) >> 8
var1 = t_fine - 128000
var2 = var1 * var1 * P6
var2 = var2 + ((var1 * P5) << 17)
var2 = var2 + (P4 << 35)
var1 = ((var1 * var1 * P3) >> 8) + ((var1 * P2) << 12)
var1 = (((1 << 47) + var1) * P1) >> 33
p = 1048576 - adc_p
p = (((p << 31) - var2) * 3125) // var1
var1 = (P9 * (p >> 13) * (p >> 13)) >> 25
var2 = (P8 * p) >> 19
P = ((p + var1 + var2) >> 8) + (P7 << 4)
v = t_fine - 76800
v = (((((adc_h << 14) - (H4 << 20) - (H5 * v)) + 16384) >> 15) *
     (((((((v * H6) >> 10) * (((v * H3) >> 11) + 32768)) >> 10) + 2097152) * H2 + 8192) >> 14))
v = v - (((((v >> 15) * (v >> 15)) >> 7) * H1) >> 4)
v = min(max(v, 0), 419430400)
print(json.dumps({"chip": chip, "t": T / 100, "p": P / 256, "h": (v >> 12) / 1024,
                  "mode": i2c.readfrom_mem(A, 0xF4, 1)[0] & 3}))
"""
    r = pole.run(code)
    assert r["chip"] == 0x60 and r["mode"] == 0       # forced mode went back to sleep
    assert r["t"] == pytest.approx(PINNED["temperature"], abs=0.011)
    assert r["p"] == pytest.approx(PINNED["pressure"], abs=2.0)   # 16-bit words at x1
    assert r["h"] == pytest.approx(PINNED["humidity"], abs=0.02)


def test_pms5003_active_frames_and_corruption(pole: Pole) -> None:
    pole.parts.fault("corrupt", sensor="pms5003", count=1)
    code = PMS_SETUP + """
frames = [pms_frame() for _ in range(3)]
print(json.dumps({"frames": [[ok, list(w)] for ok, w in frames]}))
"""
    frames = pole.run(code)["frames"]
    assert [ok for ok, _ in frames] == [False, True, True]  # the driver sees the bad checksum
    words = frames[1][1]
    assert words[3:6] == [11, 17, 26]                 # PM1.0 / PM2.5 / PM10, atmospheric
    assert words[12] >> 8 == 0x97                     # version byte


def test_pms5003_through_asyncio(pole: Pole) -> None:
    """asyncio.StreamReader / StreamWriter on the UART, as an async driver uses it."""
    code = PMS_SETUP + """
import asyncio

uart.init(timeout=0)                              # asyncio: read what is there

async def main():
    reader = asyncio.StreamReader(uart)
    writer = asyncio.StreamWriter(uart, {})
    buf = b""
    while True:
        buf += await reader.read(64)
        i = buf.find(b"\\x42\\x4d\\x00\\x1c")
        if i >= 0 and len(buf) >= i + 32:
            f = buf[i:i + 32]
            break
    writer.write(pms_cmd(0xE1, 0))                # passive mode: acknowledged
    await writer.drain()
    ack = b""
    t0 = time.ticks_ms()
    while not ack.endswith(bytes.fromhex("424d0004e1000174")):
        ack += await asyncio.wait_for(reader.read(64), 2)
    ack_ms = time.ticks_diff(time.ticks_ms(), t0)
    writer.write(pms_cmd(0xE1, 1))                # active again
    await writer.drain()
    ok = sum(f[:30]) & 0xFFFF == (f[30] << 8 | f[31])
    return ok, struct.unpack(">13H", f[4:30])[4], ack_ms

ok, pm25, ack_ms = asyncio.run(main())
print(json.dumps({"ok": ok, "pm25": pm25, "ack_ms": ack_ms}))
"""
    warming = pole.parts.state()["pms5003"]["warming_up"]  # (after a SET-pin wake-up)
    r = pole.run(code)
    assert r["ok"]
    assert r["pm25"] < PINNED["pm25"] if warming else r["pm25"] == PINNED["pm25"]
    assert 10 <= r["ack_ms"] < 1000                    # 7 + 8 bytes at 9600 baud and then some


def test_pms5003_passive_mode_and_set_pin(pole: Pole) -> None:
    code = PMS_SETUP + """
uart.write(pms_cmd(0xE1, 0))                      # passive mode
time.sleep_ms(1200)
drained = drain()
time.sleep_ms(2200)
quiet = uart.any()
uart.write(pms_cmd(0xE2, 0))                      # read
ok, words = pms_frame()
uart.write(pms_cmd(0xE1, 1))                      # back to active
time.sleep_ms(100)
drain()
set_pin = machine.Pin(27, machine.Pin.OUT)
set_pin.value(0)                                  # SET low: sleep
time.sleep_ms(50)
drain()
time.sleep_ms(2200)
asleep = uart.any()
set_pin.value(1)
print(json.dumps({"ack": bytes.fromhex("424d0004e1000174") in drained, "quiet": quiet,
                  "ok": ok, "pm25": words[4], "asleep": asleep}))
"""
    r = pole.run(code)
    assert r == {"ack": True, "quiet": 0, "ok": True, "pm25": 17, "asleep": 0}
    assert pole.parts.state()["pms5003"]["warming_up"]   # woken by SET: the fan spins up


def test_microphone_calibration_unplug_and_overrun(pole: Pole) -> None:
    code = I2S_SETUP + """
level()
levels = [level() for _ in range(3)]
print(json.dumps({"levels": [l[0] for l in levels], "low": max(l[1] for l in levels)}))
"""
    r = pole.run(code)
    assert r["low"] == 0                              # 24-bit samples, left-justified
    for db in r["levels"]:
        assert db == pytest.approx(-26.0, abs=0.15)   # 94 dB SPL reads -26 dBFS

    before = pole.parts.state()["i2s_overruns"]
    pole.parts.fault("unplug", sensor="mic")
    try:
        code = I2S_SETUP + """
time.sleep_ms(1000)                               # the firmware stalls: DMA overruns
for _ in range(3):
    level()                                       # what was buffered before
print(json.dumps({"level": level()[0]}))
"""
        assert pole.run(code) == {"level": None}      # SD reads 0 with no microphone
        assert pole.parts.state()["i2s_overruns"] > before
    finally:
        pole.parts.fault("plug", sensor="mic")


class _CountingMic:
    """A microphone whose every sample is its own index (24 bits), from start_wall: what
    a read returns then says which samples the ring kept."""

    def __init__(self, start_wall: float) -> None:
        self.start_wall, self._next = start_wall, 0

    def block(self, n: int) -> np.ndarray:
        out = np.arange(self._next, self._next + n, dtype=np.int64) & 0x7FFFFF
        self._next += n
        return out

    def skip(self, n: int) -> None:
        self._next += n


def test_a_stall_longer_than_the_ring_loses_the_oldest_audio(pole: Pole, monkeypatch) -> None:
    """As on the ESP32, whose DMA overwrites its oldest buffer: after a stall the ring
    holds the newest 42.7 ms (the node's ibuf 16384 at 48 kHz), so the gap is before
    what the firmware reads next, not after it; a stall shorter than the ring loses
    nothing. (Were the newest lost, the audio read after a stall would be older than
    the firmware's sample clock says, and an event in it stamped late by the stall.)"""
    part = pole.parts.i2s_parts[0]
    monkeypatch.setattr(part, "stream", lambda rate: _CountingMic(pole.scenario.wall()))
    code = """
import machine, time, struct, json
mic = machine.I2S(0, sck=machine.Pin(26), ws=machine.Pin(25), sd=machine.Pin(33),
                  mode=machine.I2S.RX, bits=32, format=machine.I2S.MONO, rate=48000, ibuf=16384)
buf = bytearray(4 * 256)

def read():
    mic.readinto(buf)
    return struct.unpack_from("<i", buf, 0)[0] >> 8, struct.unpack_from("<i", buf, 1020)[0] >> 8

def gap_after(stall_ms):
    for _ in range(20):             # 107 ms of reads: the ring is empty, reads are paced
        last = read()[1]
    time.sleep_ms(stall_ms)
    first, end = read()
    out = [first - last - 1]
    for _ in range(7):              # the rest of the ring, then paced: no further gap
        nxt = read()
        out.append(nxt[0] - end - 1)
        end = nxt[1]
    return out

print(json.dumps({"short": gap_after(25), "long": gap_after(300)}))
mic.deinit()
"""
    dropped = pole.parts.state()["i2s_dropped_bytes"]
    r = pole.run(code)
    assert r["short"] == [0] * 8
    stalled = 300 * 48                       # samples due during the stall
    ring = 2048                              # the ESP32 port's DMA ring for ibuf 16384
    assert stalled - ring - 512 <= r["long"][0] <= stalled - ring + 40 * 48, r
    assert r["long"][1:] == [0] * 7
    assert pole.parts.state()["i2s_dropped_bytes"] - dropped == 4 * r["long"][0]


def test_adc_pins_and_lamp_pwm(pole: Pole) -> None:
    code = """
import machine, json
adc = machine.ADC(machine.Pin(35), atten=machine.ADC.ATTN_11DB)
lamp = machine.PWM(machine.Pin(4), freq=1000, duty_u16=16384)
machine.Pin(2, machine.Pin.OUT).value(1)
print(json.dumps({"vbus": adc.read_u16() * 3.3 / 65535 * 2, "boot": machine.Pin(0).value()}))
"""
    r = pole.run(code)
    assert r["vbus"] == pytest.approx(5.0, abs=0.01)
    assert r["boot"] == 1
    state = pole.parts.state()
    assert state["lamp_pwm"] == {"pin": 4, "freq": 1000, "duty_u16": 16384}
    assert state["pins"][2] == 1
    assert math.isclose(state["lamp"], 0.25, abs_tol=1e-3)


def test_microphone_through_asyncio(pole: Pole) -> None:
    """asyncio.StreamReader on the I2S, as the node's acoustic task reads it."""
    code = I2S_SETUP + """
import asyncio

async def main():
    reader = asyncio.StreamReader(mic)
    chunk = bytearray(1024)
    sizes, acc, n = [], 0, 0
    t0 = time.ticks_ms()
    while n < 8000:                                # half a second at 16 kHz
        k = await reader.readinto(chunk)
        sizes.append(k)
        for i in range(0, k, 4):
            v = struct.unpack_from("<i", chunk, i)[0] >> 8
            acc += v * v
        n += k // 4
    ms = time.ticks_diff(time.ticks_ms(), t0)
    return sizes, 10 * math.log10(acc / n * 2 / (1 << 23) ** 2), ms

sizes, db, ms = asyncio.run(main())
print(json.dumps({"aligned": all(k % 4 == 0 and k > 0 for k in sizes), "db": db, "ms": ms}))
"""
    r = pole.run(code)
    assert r["aligned"]
    assert r["db"] == pytest.approx(-26.0, abs=0.15)
    assert 150 < r["ms"] < 2000                       # paced by the sample clock


# The node's audio task beside a task of busy steps, on the board, for 3 s (MicroPython).
AUDIO_BESIDE_BUSY = """
import sys, time, json, asyncio
sys.path.append('/fw')
from node.sensors import Sound, AUDIO_DUTY_PCT
steps = [0]

async def busy(step_ms):
    while True:
        t = time.ticks_ms()
        while time.ticks_diff(time.ticks_ms(), t) < step_ms:
            pass
        steps[0] += 1
        await asyncio.sleep_ms(0)

async def beside(sound, step_ms, send=None):
    asyncio.create_task(sound.run(lambda: None, send))
    await asyncio.sleep_ms(100)  # its first read (through asyncio) before the busy task
    asyncio.create_task(busy(step_ms))
    await asyncio.sleep_ms(3000)
    sound.mic.deinit()          # the ring stops here: what it dropped so far is all
"""


def test_microphone_task_keeps_up_when_loop_turns_outlast_a_chunk(pole: Pole) -> None:
    """The node's audio task beside a task whose steps take 25 ms: longer than a chunk
    (512 samples, 10.7 ms at 48 kHz), shorter than the DMA ring (2048 frames, 42.7 ms).
    Reading one chunk per loop turn falls behind for good (a sixth of the audio lost);
    taking all the ring holds in each turn loses nothing."""
    shutil.copytree(FIRMWARE, pole.fs / "fw", dirs_exist_ok=True)
    before = pole.parts.state()["i2s_dropped_bytes"]
    code = AUDIO_BESIDE_BUSY + """
sound = Sound({"sck": 26, "ws": 25, "sd": 33, "ibuf": 16384}, 15.0, None)
asyncio.run(beside(sound, 25))
laeq = [v for k, u, v in sound.records() if k == "noise/laeq"]
print(json.dumps({"turns": steps[0], "overruns": sound.mic.overruns, "laeq": laeq}))
"""
    r = pole.run(code)
    dropped = pole.parts.state()["i2s_dropped_bytes"] - before
    assert r["turns"] >= 50                             # the busy task really held the loop
    # one chunk per turn loses ~15%; a drained ring nothing but what a loaded test
    # machine's scheduling may take (a hiccup of tens of ms: 96 ms, 3.2 %, once in CI on
    # 2 cores beside chip-speed boards, whose VMs run at nice -10)
    assert dropped < 0.05 * 3 * 48000 * 4, (dropped, r)
    assert r["laeq"][0] == pytest.approx(94.0, abs=0.5)  # the calibrator, all of it heard


@pytest.mark.parametrize(("held_ms", "read_ms", "busy_ms"), [(100, 0, 30), (220, 0, 30),
                                                           (100, 3, 10)])
def test_a_turn_of_the_audio_ends_at_its_time_and_the_next_turns_catch_up(
        pole: Pole, held_ms: int, read_ms: int, busy_ms: int) -> None:
    """At chip speed a 512-sample chunk costs the DSP ~6.5 ms and its read ~2.5, and a
    turn that drained a ring of 4-8 chunks held the loop 20-45 ms. A turn takes chunks
    for up to AUDIO_TURN_US now, each judged by the last one with its read, and leaves
    the rest to its next turns, resting none while it is behind; while the ring is over
    half full it drains on (the boot's long steps: two chunks a turn lost 763 ms at boot
    in a bench run). Here a chunk costs 6.4 ms, the loop is held once (100 ms: ~3 of the
    ring's 8 chunks wait; 220 ms: ~7), and a busy task takes its steps between the
    audio's turns: two chunks a turn, or more while over half full (the whole ring, 8,
    before). With a 3 ms read, one but while over half full (two when the reads were not
    counted: a bench run's audio turns were 20-30 ms at chip speed); none lost."""
    shutil.copytree(FIRMWARE, pole.fs / "fw", dirs_exist_ok=True)
    before = pole.parts.state()["i2s_dropped_bytes"]
    code = AUDIO_BESIDE_BUSY + """
sound = Sound({"sck": 26, "ws": 25, "sd": 33, "rate": 16000}, 15.0, None)
process = sound.meter.process
read_held = sound.mic.read_held
chunks = [0, 0]                 # this turn's, the most in a turn
within = [0]                    # second chunks read for the turn's time, not a full ring

def wait_us(us):
    t = time.ticks_us()
    while time.ticks_diff(time.ticks_us(), t) < us:
        pass

def slow(buf, n, *rest):
    wait_us(6400)
    process(buf, n, *rest)
    chunks[0] += 1

def slow_read():
    if chunks[0] and not sound.mic.half_full:
        within[0] += 1
    wait_us(READ_MS * 1000)
    return read_held()

def beat():                     # once a turn, after its chunks
    chunks[1] = max(chunks[1], chunks[0])
    chunks[0] = 0

async def main():
    asyncio.create_task(sound.run(beat))
    await asyncio.sleep_ms(100)  # its first read: the ring runs from here
    time.sleep_ms(HELD_MS)      # the loop held once
    asyncio.create_task(busy(BUSY_MS))
    await asyncio.sleep_ms(3000)
    sound.mic.deinit()

sound.meter.process = slow
sound.mic.read_held = slow_read
asyncio.run(main())
print(json.dumps({"most": chunks[1], "within": within[0], "chunk": sound.mic.chunk,
                  "turns": steps[0]}))
""".replace("HELD_MS", str(held_ms)).replace("READ_MS", str(read_ms)).replace(
        "BUSY_MS", str(busy_ms))
    r = pole.run(code)
    dropped = (pole.parts.state()["i2s_dropped_bytes"] - before) // 4
    assert r["chunk"] == 512 and r["turns"] >= 3000 // (busy_ms + 20), r
    if read_ms:                     # 3 + 6.4 ms a chunk: a second would end past 14 ms
        # (a loaded machine may still fill half the ring: those turns drain on)
        assert r["within"] == 0, r
    elif held_ms < 128:             # under half the ring: 6.4 + 6.4 <= 14 ms < 3 x 6.4
        assert r["most"] == 2, r
    else:                           # over half: drained past the turn's time, not all
        assert 3 <= r["most"] < 8, r
    # none lost but what a loaded test machine's scheduling may take (as above)
    assert dropped < 0.05 * 3.3 * 16000, (dropped, r)


def test_a_chip_too_slow_for_the_audio_drops_audio_not_the_node(pole: Pole) -> None:
    """The meter made to cost twice the audio's real time (a chip ~2x slower than the
    emulated one; the node's other tasks need CPU too): the audio task keeps to its
    share (node/sensors.py AUDIO_DUTY_PCT) and the ring's overflow is counted, so the
    other tasks still get their turns. Before the cap, a node ~1.7x slower than the
    emulated chip published no window at all."""
    shutil.copytree(FIRMWARE, pole.fs / "fw", dirs_exist_ok=True)
    code = AUDIO_BESIDE_BUSY + """
sound = Sound({"sck": 26, "ws": 25, "sd": 33}, 15.0, None)
process = sound.meter.process

def slow(buf, n, *rest):
    t = time.ticks_us()
    while time.ticks_diff(time.ticks_us(), t) < n * 2000000 // 48000:
        pass
    process(buf, n, *rest)

sound.meter.process = slow
asyncio.run(beside(sound, 2))
print(json.dumps({"work_ms": 2 * steps[0], "overruns": sound.mic.overruns,
                  "duty": AUDIO_DUTY_PCT}))
"""
    before = pole.parts.state()["i2s_dropped_bytes"]
    r = pole.run(code)
    dropped = (pole.parts.state()["i2s_dropped_bytes"] - before) // 4
    # the other tasks get what the audio leaves them (40%), less the loop's own cost
    assert r["work_ms"] > 0.75 * (100 - r["duty"]) / 100 * 3000, r
    # what the audio lost is counted, as much as the ring really dropped
    assert r["overruns"] == pytest.approx(dropped, rel=0.05), (r, dropped)


def test_the_microphone_listens_from_its_first_read(pole: Pole) -> None:
    """The I2S's DMA runs from the moment the driver opens it; on a booting node the audio
    task reads for the first time only after every other task's first step (at chip
    speed, ~0.4 s: the ring holds 0.26 s). Opened with the node, it dropped what it
    took meanwhile (a bench run's only overrun, at boot); opened at the first read, a
    node's start loses nothing, and what is lost later is still counted."""
    shutil.copytree(FIRMWARE, pole.fs / "fw", dirs_exist_ok=True)
    before = pole.parts.state()["i2s_dropped_bytes"]
    code = AUDIO_BESIDE_BUSY + """
sound = Sound({"sck": 26, "ws": 25, "sd": 33, "rate": 16000}, 15.0, None)
time.sleep_ms(1000)             # the other tasks' first steps: 4x the ring (256 ms)
asyncio.run(beside(sound, 5))
lost = [v for k, u, v in sound.records() if k == "noise/overruns"]
print(json.dumps({"overruns": sound.mic.overruns, "window": lost}))
"""
    r = pole.run(code)
    dropped = (pole.parts.state()["i2s_dropped_bytes"] - before) // 4
    assert dropped < 0.05 * 16000, dropped              # ~0.75 s when opened with the node
    assert r["overruns"] == pytest.approx(dropped, rel=0.05, abs=16), (r, dropped)
    assert r["window"] == [r["overruns"]], r           # and the window reports it


def test_an_impulse_is_sent_in_the_audio_turn_that_heard_it(pole: Pole) -> None:
    """A gunshot over the calibrator, beside a task of busy 10 ms steps: the audio task
    awaits the app's `send` in the very turn whose meter heard the event end, with no
    step of the busy task between (the event task, woken by a doorbell, would run only
    after it: a median 65 ms at chip speed, issue 11's 250 ms to the pole)."""
    shutil.copytree(FIRMWARE, pole.fs / "fw", dirs_exist_ok=True)
    calibrator = pole.scenario.events
    pole.scenario.events = []           # the street's 35 dB: over 94 dB a shot is no event
    pole.scenario.add_event("gunshot", 120.0, after_s=2.5)   # the background forms first
    code = AUDIO_BESIDE_BUSY + """
heard, sent = [], []
sound = Sound({"sck": 26, "ws": 25, "sd": 33}, 15.0, lambda *event: heard.append(steps[0]))

async def send():
    sent.append(steps[0])

asyncio.run(beside(sound, 10, send))
print(json.dumps({"heard": heard, "sent": sent, "turns": steps[0]}))
"""
    try:
        r = pole.run(code)
    finally:
        pole.scenario.events = calibrator
    assert r["turns"] >= 50, r                          # the busy task held the loop
    assert len(r["heard"]) == 1, r                      # the shot, once
    assert r["sent"] == r["heard"], r                   # sent in the turn that heard it


def test_parts_on_a_citynode_emu_board(tmp_path) -> None:
    """The same parts behind `citynode-emu run --scenario FILE`, faults over its control
    channel (what `citynode-emu ctl` sends)."""
    scenario = tmp_path / "scenario.json"
    scenario.write_text(json.dumps({"seed": 3, "time_scale": 60, "events": [],
                                    "pinned": {"lux": 321.0, "temperature": -5.25}}))
    emu = start_emulator(tmp_path, extra=["--scenario", str(scenario)])
    try:
        board = emu.boards[0]
        pole = Pole(board.link, None, None)
        wait_for(lambda: _alive(pole), timeout=30, interval=0.5, what="the board's REPL")
        code = I2C_SETUP + """
i2c.writeto(0x23, b"\\x01\\x10")
time.sleep_ms(200)
d = i2c.readfrom(0x23, 2)
print(json.dumps({"scan": i2c.scan(), "lux": (d[0] << 8 | d[1]) / 1.2}))
"""
        r = pole.run(code)
        assert r == {"scan": [0x23, 0x76], "lux": pytest.approx(321.0, abs=1)}
        status = board.control("status")["peripherals"]
        assert status["scenario"]["lux"] == 321.0
        assert status["scenario"]["temperature"] == -5.25
        board.control("unplug", sensor="bme280")
        assert pole.run(code)["scan"] == [0x23]
        assert board.control("status")["peripherals"]["unplugged"] == ["bme280"]
    finally:
        emu.stop()
