"""Firmware benchmark on the emulated board (esp32-devkitc, the node's real code).

    python -m bench.firmware --out bench/results      # or: make bench-firmware
    python -m bench.firmware --minutes 3              # a shorter chip-speed run
    python -m bench.firmware --quick                  # the smoke run of `make test`

One blank board, provisioned through the real `citynode-provision` (window 60 s,
an operator key for downlinks). At host speed: the crypto and DSP micro-benchmarks
(bench/firmware_crypto.py, bench/firmware_dsp.py) through mpremote, one full
sample -> aggregate -> encode -> sign -> send cycle (until the broker's PUBACK),
and the heap high-water while every sensor and the microphone run. Each host time
is also given in the chip's terms (`_chip`: host CPU time x the board's speed
factor, citynode/speed.py; big integers for the crypto), at the 240 MHz the node
sets (the stock image boots at 160).

Then the same board at chip speed (`citynode-emu run --chip-speed`) runs the node
app for `--minutes` with a probe task in its event loop (how late a 50 ms sleep
wakes: the loop's stalls), and the host fires a gunshot every 20 s, sends one signed
downlink command and cuts Wi-Fi for 60 s; the pole's gateway forwards to a city broker.
Measured there, in real (chip) time: max_loop_stall_ms_chip,
impulse_to_publish_ms_chip (gunshot -> its event at the pole's broker, median),
event_to_city_ms_p99_chip (-> the city's broker, through the gateway; shots in the
outage left out), downlink_to_answer_ms_chip, audio_overruns (how often the emulator's I2S DMA
ring, which holds ibuf/8 frames as on the ESP32, overflowed), audio_lost_pct (the
share of the run's audio it dropped) and clock_error_ms_p95_chip (the node's clock,
synced over SNTP from a chronyd with deploy/chrony.conf through the emulated Wi-Fi,
against the real time at the chip's moment of each reading, every 10 s). Heap is in
the chip's terms (objects at half their 64-bit size, byte buffers and loaded code in
full). Writes bench/results/firmware.json with the targets.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from array import array
from pathlib import Path

from bench import firmware_crypto, firmware_dsp
from bench.output import save
from citynode import speed, wire
from citynode.boards import get_board
from citynode.chrony import PoleTimeServer
from citynode.emulator.vm import WORD_SCALE
from citynode.mosquitto import Mosquitto
from citynode.provisioning.deploy import board_mpy, build_plan, compile_mpy
from citynode.provisioning.device import last_json
from citynode.subscriber import Message, Subscriber
from citynode.testing.emulator import (
    FIRMWARE,
    BoardHandle,
    Emulator,
    mpremote,
    start_emulator,
    vm_mpy,
    wait_for,
)
from citynode.testing.gateway import PREFIX as CITY_PREFIX
from citynode.testing.gateway import GatewayProcess
from citynode.testing.provisioning import operator_key, provision_one

BOARD = "esp32-devkitc"
NODE_MHZ = 240          # the CPU clock node.app sets: chip terms are at this clock
MIC_RATE = get_board(BOARD).sensors["mic"]["rate"]     # the node's microphone
SHOT_EVERY_S = 20              # gunshots in the chip-speed run
SHOT_MATCH_S = 0.1             # an event stamped this close to a shot is that shot's
STOCK_MEASURE_HEAP_KB = 400     # room to measure a firmware larger than the board's heap
TARGETS = {"max_loop_stall_ms_chip": 20, "impulse_to_publish_ms_chip": 250,
           "event_to_city_ms_p99_chip": 1000, "audio_overruns": 0,
           "heap_high_water_kb": 80, "heap_high_water_kb_stock": 80,
           "clock_error_ms_p95_chip": 5}

# The app's modules loaded as main.py loads them (IMPORT_GC_BYTES): a collection every
# 4 KB allocated keeps the heap in one piece for the node's buffers (`import gc` first).
LOAD_APP = """gc.threshold(4096)
from node import app, config
gc.threshold(-1)
"""

CYCLE = """
import asyncio, gc, json, time
""" + LOAD_APP + """
n = app.Node(config.load())
async def cycle():
    for s in n.sensors:
        for name, unit, value in await s.sample():
            n.window.add(name, unit, value)
    await n.uplink.send(await n.close_window())
    while len(n.uplink.spool):
        await asyncio.sleep_ms(1)
async def main():
    asyncio.create_task(n.signer.run())     # signs in steps and keeps the nonce pool
    asyncio.create_task(n.wifi.run())
    asyncio.create_task(n.uplink.run())
    while not n.uplink.connected:
        await asyncio.sleep_ms(50)
    times = []
    for i in range(RUNS):
        t = time.ticks_us()
        await cycle()
        times.append(time.ticks_diff(time.ticks_us(), t) / 1000)
    times.sort()
    print(json.dumps({"cycle_ms": times[len(times) // 2], "published": n.uplink.published}))
asyncio.run(main())
"""

HIGH_WATER = """
import asyncio, gc, json, time
gc.collect()
base = gc.mem_alloc()
""" + LOAD_APP + """
n = app.Node(config.load())
peak = [0]
async def sampler():
    # live data only: collect first (mem_alloc alone counts garbage not yet collected)
    while True:
        gc.collect()
        used = gc.mem_alloc() - base
        if used > peak[0]:
            peak[0] = used
        await asyncio.sleep_ms(50)
async def main():
    asyncio.create_task(sampler())
    task = asyncio.create_task(n.run())
    await asyncio.sleep_ms(SECONDS * 1000)
    task.cancel()
    gc.collect()
    after = gc.mem_alloc() - base
    print(json.dumps({"peak_bytes": peak[0], "after_gc_bytes": after,
                      "buffer_bytes": buffer_bytes(), "published": n.uplink.published}))
def buffer_bytes():
    # bytes, bytearrays and arrays the app holds: the same size on the chip and here,
    # where every other object is twice its chip size (64-bit words). A recursive walk a
    # few levels deep, each buffer counted once. Nothing big is made for it: the heap
    # has no block of even 4 KB left after the app's imports (a walk list of 1,000 made
    # before the app left the microphone none for its buffers), ~2.6 KB after a run.
    import sys
    from array import array
    found = [None] * 160
    count = [0]
    def walk(o, depth):
        if isinstance(o, (bytes, bytearray, array)):
            for i in range(count[0]):
                if found[i] is o:
                    return
            if count[0] == len(found):
                raise RuntimeError("more buffers than the walk counts: raise its 160")
            found[count[0]] = o
            count[0] += 1
        elif depth < 5 and isinstance(o, (list, tuple)):
            for x in o:
                walk(x, depth + 1)
        elif depth < 5 and isinstance(o, dict):
            for x in o.values():
                walk(x, depth + 1)
        elif depth < 5 and hasattr(o, '__dict__') and not callable(o):
            for x in o.__dict__.values():
                walk(x, depth + 1)
    walk(n, 0)
    for k, m in sys.modules.items():
        if k.startswith('node') or k.startswith('drivers'):
            walk(m, 1)
    # an array's size from one item's bytes: a copy of the whole would not fit the heap
    return sum(len(f) if isinstance(f, (bytes, bytearray)) or not len(f)
               else len(f) * len(bytes(memoryview(f)[:1])) for f in found[:count[0]])
asyncio.run(main())
"""

# Which task holds the loop: each task's coroutine wrapped in one that times its steps
# (send/throw: all asyncio's core calls); per task, the steps, how many took over OVER_US
# and the longest (us). Tasks are named by their coroutine's function; Node.run's tasks
# named `run` are, in its order, the signer's, Wi-Fi's, the uplink's, the supervisor's
# and the clock's.
TASK_TIMER = """
import asyncio, os, time
from array import array
held = {}                   # task: [steps, steps over OVER_US, longest us, steps over
                            # OVER_US with a collection], in place: a tuple a step was
                            # ~3 KB/s of garbage, near the audio's
try:
    from emu_drivers import collections     # chip speed: the heap's collections so far
except ImportError:
    collections = lambda: 0
longest = []                # the LONGEST longest steps: (us, task, ms since T0_MS)
LONGEST = 16
T0_MS = time.ticks_ms()
RUNS = ['signer', 'wifi', 'uplink', 'supervisor', 'clock']
class Timed:
    def __init__(self, coro):
        self.coro = coro
        r = repr(coro)
        self.name = r.split("'")[1] if "'" in r else r[:24]
        if self.name == 'run' and RUNS:
            self.name = RUNS.pop(0)
        if self.name not in held:
            held[self.name] = array('i', (0, 0, 0, 0))
        self.counts = held[self.name]
    def _timed(self, step, arg):
        gc_count = collections()
        t = time.ticks_us()
        try:
            return step(arg)
        finally:
            us = time.ticks_diff(time.ticks_us(), t)
            c = self.counts
            c[0] += 1
            if us > OVER_US:
                c[1] += 1
                if collections() != gc_count:
                    c[3] += 1
            if us > c[2]:
                c[2] = us
            if us > 5 * OVER_US:
                longest.append((us, self.name, time.ticks_diff(time.ticks_ms(), T0_MS)))
                if len(longest) > LONGEST:
                    longest.remove(min(longest))
    def send(self, v):
        return self._timed(self.coro.send, v)
    def throw(self, e):
        return self._timed(self.coro.throw, e)
    def close(self):
        return self.coro.close()
_create = asyncio.core.create_task
asyncio.core.create_task = lambda coro: _create(Timed(coro))
asyncio.create_task = asyncio.core.create_task
def save_held():
    lines = ['%s %d %d %d %d\\n' % (name, h[0], h[1], h[2], h[3]) for name, h in held.items()]
    lines += ['@ %s %d %d\\n' % (name, us, t) for us, name, t in longest]
    f = open('/bench_held.tmp', 'w')
    f.write(''.join(lines))             # one write: a write is a system call
    f.close()
    os.rename('/bench_held.tmp', '/bench_held.txt')
"""

# The app at host speed for SECONDS with its tasks timed: each step's host time x the
# board's factor is what it holds the chip's loop for, without the grain of chip speed's
# pacing (a burst, ~20 ms of chip time, docs/decisions.md); host scheduling noise can
# only make a step look longer.
STEPS = """
import gc
gc.collect()
""" + LOAD_APP + """
node = app.Node(config.load())
""" + TASK_TIMER + """
async def the_app():                    # Node.run's own `run` not taken for the signer's
    await node.run()
async def main():
    task = asyncio.create_task(the_app())
    await asyncio.sleep_ms(SECONDS * 1000)
    task.cancel()
    save_held()
asyncio.run(main())
"""

# The node's clock against the emulator's truth (the host's clock), for the probe: a
# module of its own for the reason TRACE gives.
CLOCK_SAMPLE = """
import time
from node.clock import CLOCK
# the host's real time less its monotonic time, in us (written in by the bench): the
# chip's clock is the host's monotonic one plus its lead inside a throttle burst
# (emulator/chipclock.c), so a moment the chip's clock reads is put on the host's
# real time by adding this
REAL_LESS_MONO_US = HOST_OFFSET
_PERIOD = time._real.ticks_add(0, -1) + 1
def error():
    # node - truth in 0.1 ms, None before a sync. The truth is the real time at the
    # chip's moment of the reading (the middle of m0..m1 on the chip's clock). It was
    # the host's real time just after a send, which waits for the host to catch up
    # with the chip: it missed the chip's lead gained after the send (the node looked
    # ~10 ms ahead), and a chip behind the host after a throttle stop.
    m0 = time._real.ticks_us()
    now = CLOCK.unix_us()
    m1 = time._real.ticks_us()
    real = time._real.time_ns() // 1000
    if now is None:
        return None
    mono = (real - REAL_LESS_MONO_US) % _PERIOD        # the host's monotonic clock now
    truth = real + time._real.ticks_diff(m0, mono) + time._real.ticks_diff(m1, m0) // 2
    return (now - truth) // 100
"""

TRACE = """
import time
from array import array
# each event's way through the node, ms after its onset: heard whole (the meter calls
# on_event), sealed (signed), handed to MQTT (written to its socket); the pole's broker has it
# next (the host's clock). PATH_N events at most, three numbers each. A module of its
# own, imported once the node is up: compiled in main.py, the node's boot had no room
# left for its buffers (a MemoryError). trace() returns the saver the probe calls with
# its others: saved in the publish, the file (~40 ms of the chip's time) held up every
# event on its way to the broker.
def trace(node, save):
    from node import mqtt, payload
    path = array('i', bytes(4 * 3 * PATH_N))
    tracked = []                        # [slot, onset ticks_us, envelope or None]
    def mark(slot, onset, field):
        path[3 * slot + field] = time.ticks_diff(time.ticks_us(), onset) // 1000
    heard, seal, publish = node.sound.meter.on_event, node.envelope, mqtt.Client.send_publish
    def on_event(t_us, *rest):
        slot = len(tracked)
        if slot < PATH_N:
            tracked.append([slot, t_us, None])
            mark(slot, t_us, 0)
        heard(t_us, *rest)
    async def envelope(kind, *rest):
        sealed = await seal(kind, *rest)
        if kind == payload.KIND_EVENT:
            for t in tracked:
                if t[2] is None:
                    t[2] = sealed
                    mark(t[0], t[1], 1)
                    break
        return sealed
    async def publishing(self, topic, data, *rest):
        for t in tracked:
            if t[2] is not None and t[2] == data:
                mark(t[0], t[1], 2)
                t[2] = b''
        return await publish(self, topic, data, *rest)
    node.sound.meter.on_event = on_event
    node.envelope = envelope
    mqtt.Client.send_publish = publishing
    return lambda: save('bench_path', memoryview(path)[:3 * len(tracked)])
"""

# The probe, for the chip-speed run: a task in the node's loop. How late a 50 ms sleep
# wakes is how long the loop was held by something else; at chip speed these are chip
# times. It keeps a histogram (10 ms bins, bin 0: on time, 201: >= 2 s; a few hundred
# bytes: the node's heap is tight) and writes it to /bench_stalls.bin when the host asks
# (/bench_save: it looks every WRITE_MS), which the host reads from the board's
# filesystem folder (no serial session disturbs the run). It wrote every 10 s: five
# files, each ~50 ms of the chip's time (a sector erased), ~270 in a run, each in the
# audio's way: the bench's own stalls. A module imported once the node is up, for the
# reason TRACE gives.
PROBE = """
import asyncio, os, time
from array import array
h = array('H', bytes(2 * 202))
errors = array('h', bytes(2 * 600))  # the node's clock - the host's (truth), 0.1 ms
n_errors = [0]
def save(name, values):
    # an array's bytes in one write, no copy (number by number in text, a save took
    # ~0.1 s of the chip's time: the bench's own stall, in the audio's way)
    f = open('/%s.tmp' % name, 'wb')
    f.write(values)
    f.close()
    os.rename('/%s.tmp' % name, '/%s.bin' % name)   # then renamed: the host reads it any time
def asked():
    try:
        os.stat('/bench_save')
        return True
    except OSError:
        return False
async def probe(save_held, counted, more, since_t0):
    f = open('/bench_up', 'w')          # the app's loop runs: the host starts its clock
    f.write(str(since_t0()))            # ms after main.py began (the holds' stamps' zero)
    f.close()
    import bench_clock
    def save_errors():
        if counted:
            save('bench_errors', '\\n'.join(counted).encode())
    saves = (lambda: save('bench_stalls', h),
             lambda: save('bench_clock', memoryview(errors)[:n_errors[0]]),
             save_held, save_errors) + tuple(more)
    await asyncio.sleep_ms(WARMUP_MS)
    last = time.ticks_ms()
    while True:
        t = time.ticks_ms()
        await asyncio.sleep_ms(50)
        h[min(201, time.ticks_diff(time.ticks_ms(), t) // 10 - 5 + 1)] += 1
        if time.ticks_diff(t, last) > WRITE_MS:
            last = t
            error = bench_clock.error()
            if error is not None and n_errors[0] < len(errors):
                errors[n_errors[0]] = max(-32000, min(32000, error))
                n_errors[0] += 1
            if not asked():
                continue
            # one file a turn: a save (write, rename) costs ~50 ms of the chip's time
            # (over 128 bytes: a flash sector erased); all in one turn held the loop
            # 200-300 ms
            for saving in saves:
                saving()
                await asyncio.sleep_ms(0)
            open('/bench_saved', 'w').close()
"""

# main.py for the chip-speed run: the node app as shipped (node.app.main, boot path and
# all), its tasks timed, and the probe in its loop. What runs before the node is up is
# kept small: the node's boot had no 2.4 KB block left for its meter when more did.
STALLS_MAIN = TASK_TIMER + """
import gc
""" + LOAD_APP + """
counted = []                            # what the app counted in node/errors (20 at most)
count_error = app.Node._count_error
def counting(self, where, exc):
    if len(counted) < 20:
        counted.append('%s: %s' % (where, exc))
    count_error(self, where, exc)
app.Node._count_error = counting
run = app.Node.run
async def probed(self):
    import bench_probe                  # after the node's buffers: its heap is tight
    more = ()
    if self.sound is not None:
        import bench_trace
        more = (bench_trace.trace(self, bench_probe.save),)
    heap = self.signer.heap if self.signer is not None else None
    if heap is not None:                # the collections node.heap planned, since boot
        more += (lambda: bench_probe.save('bench_planned', str(heap.collections).encode()),)
    asyncio.create_task(bench_probe.probe(save_held, counted, more,
                                          lambda: time.ticks_diff(time.ticks_ms(), T0_MS)))
    await run(self)
app.Node.run = probed
app.main()
"""


def host_speed(board: BoardHandle, quick: bool, factor: float) -> dict:
    """The micro-benchmarks, the cycle and the heap high-water, at host speed."""
    link = board.link
    crypto = last_json(mpremote(link, "exec", firmware_crypto.SCRIPT.replace("HEAP", "110"),
                                timeout=600))
    out = {"crypto": crypto}
    # the quick run's half second of audio is noise, not a figure: it keeps the DSP
    # benchmark from rotting (it broke once unnoticed when the kernel's state grew)
    dsp_code = firmware_dsp.bench_code(0.5 if quick else 60.0)
    out["dsp"] = last_json(mpremote(link, "exec", dsp_code, timeout=900))
    out["cycle"] = last_json(mpremote(link, "exec", CYCLE.replace("RUNS", "3" if quick else "20"),
                                      timeout=300))
    out["steps"] = _task_steps(board, 5 if quick else 60, factor)
    out["water"] = _high_water(board, 5 if quick else 20)
    return out


def _task_steps(board: BoardHandle, seconds: int, factor: float) -> dict:
    """The app's tasks' steps at host speed, in chip terms (STEPS)."""
    mpremote(board.link, "soft-reset")
    code = STEPS.replace("SECONDS", str(seconds)).replace("OVER_US", str(int(20000 / factor)))
    mpremote(board.link, "exec", code, timeout=seconds + 120)
    held = board.state / "fs" / "bench_held.txt"
    out = _held_stats(held.read_text(), factor)
    held.unlink()
    return out


def _high_water(board: BoardHandle, seconds: int) -> dict:
    # the stock layout's app imports 80 KB of .mpy first: on a loaded host (make test's
    # other worker) its interrupt and reset took over 60 s once
    mpremote(board.link, "soft-reset", timeout=180)
    return last_json(mpremote(board.link, "exec", HIGH_WATER.replace("SECONDS", str(seconds)),
                              timeout=300))


def _stock_high_water(tmp: Path, extra: list[str], seconds: int) -> dict:
    """The high-water with the stock image's layout on this ROMFS board: the firmware as
    .mpy files on the filesystem (found before /rom), loaded into the heap, which the
    emulated board counts in full. In a heap large enough to measure it
    (citynode-emu --heap-kb): it need not fit the board's."""
    plan = build_plan(FIRMWARE, {"mpy": vm_mpy(), "romfs": False}, use_mpy=True)
    fs = tmp / "state" / "node0" / "fs"
    added = {fs / path.lstrip("/"): data for path, data in plan.files.items()
             if path.endswith(".mpy") and not (fs / path.lstrip("/")).exists()}
    folders = {dest.parent for dest in added if not dest.parent.exists()}
    for dest, data in added.items():
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
    emu = start_emulator(tmp, extra=[*extra, "--heap-kb", str(STOCK_MEASURE_HEAP_KB)])
    try:
        board = emu.boards[0]
        # a Ctrl-C sent before main.py runs is a byte in the UART's buffer, not an
        # interrupt (as on the chip): on a loaded host mpremote got there first once
        wait_for(lambda: board.control("status")["running_code"], timeout=120,
                 what="the node's main.py")
        return _high_water(board, seconds)
    finally:
        emu.stop()
        for dest in added:
            dest.unlink()
        for folder in folders:      # an empty /node would hide /rom/node from imports
            folder.rmdir()


class Watch(Subscriber):
    """A node's envelopes on a broker (the pole's, or the city's as the gateway forwards
    them): (arrival time, body)."""

    def __init__(self, broker: Mosquitto, topic: str):
        self.seen: list[tuple[float, wire.Payload]] = []
        super().__init__(broker.host, broker.port, topic=topic, on_message=self._got)

    def _got(self, message: Message) -> None:
        try:
            body = wire.decode_envelope(message.payload)
            payload = wire.decode_payload(body)
        except Exception:  # noqa: BLE001 - a bad envelope is counted by the tests, not here
            return
        with self.lock:
            self.seen.append((time.time(), payload))

    def first(self, kind: int, after: float) -> float | None:
        """Arrival time of the first envelope of `kind` that arrived after `after`."""
        with self.lock:
            return next((at for at, body in self.seen if at > after and body.kind == kind),
                        None)

    def event_of(self, onset: float) -> tuple[float, wire.Payload] | None:
        """The event stamped within SHOT_MATCH_S of `onset` (Unix s), with its arrival."""
        with self.lock:
            return next(((at, body) for at, body in self.seen if body.kind == wire.KIND_EVENT
                         and body.time_ms is not None
                         and abs(body.time_ms / 1000 - onset) <= SHOT_MATCH_S), None)


def _downlink(broker: Mosquitto, device: str, operator, seq: int) -> None:
    import paho.mqtt.client as mqtt

    body = wire.encode_command(device, seq, "lamp", {"level": 40}, int(time.time()))
    command = wire.sign_es256(body, wire.OPERATOR_KID, operator)
    sender = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-op-{seq}")
    sender.connect(broker.host, broker.port)
    sender.loop_start()
    try:
        sender.publish(wire.down_topic(device), command, qos=1).wait_for_publish(10)
    finally:
        sender.loop_stop()
        sender.disconnect()


def _overruns(board: BoardHandle) -> tuple[int, int]:
    """The emulated DMA ring's overruns so far: (times it overflowed, bytes it dropped)."""
    peripherals = board.control("status")["peripherals"]
    return int(peripherals["i2s_overruns"]), int(peripherals["i2s_dropped_bytes"])


def _shot_times(start: float, end: float, outage: tuple[float, float]) -> list[float]:
    """When to fire (run seconds): every SHOT_EVERY_S, none from just before the Wi-Fi
    outage until its backlog is through (an event in it waits for the link, by design)."""
    times, t = [], start
    while t < end - 5:
        if not outage[0] - 3 <= t <= outage[1] + 15:
            times.append(t)
        t += SHOT_EVERY_S
    return times or [start]


# The host's own lateness beside the chip-speed run, binned as PROBE bins the node's:
# a 50 ms sleep in a plain process, from the end of the warm-up (argv[1] s) to the end
# (argv[2] s). What a loaded host does to any sleeper it does to the VM's too, so a run
# whose host stalls is told from one whose node does.
HOST_PROBE = """
import json, sys, time
time.sleep(float(sys.argv[1]))
end = time.monotonic() + float(sys.argv[2])
h = [0] * 202
while time.monotonic() < end:
    t = time.monotonic()
    time.sleep(0.05)
    h[min(201, int((time.monotonic() - t) * 1000) // 10 - 5 + 1)] += 1
print(json.dumps(h))
"""


def chip_speed_run(emu: Emulator, broker: Mosquitto, city: Mosquitto, device: str, operator,
                   seconds: float) -> dict:
    """The app at chip speed for `seconds`: gunshots every SHOT_EVERY_S, one downlink, one
    Wi-Fi outage; events timed at the pole's broker and, through the gateway, the city's."""
    board = emu.boards[0]
    warmup = min(60.0, seconds / 5)          # precompute, first connect
    stalls = board.state / "fs" / "bench_stalls.bin"
    boot_s, main_began = _wait_for_app(board, started=time.time())
    result: dict = {"boot_s": boot_s}
    with Watch(broker, wire.up_topic(device)) as pole, \
            Watch(city, f"{CITY_PREFIX}/+/up/{device}") as upstream:
        overruns_before = _overruns(board)
        status_before = board.control("status")
        collections_before = status_before.get("collections") or {}
        hitches_before = status_before.get("hitches") or {}
        t0 = time.time()
        host_probe = subprocess.Popen([sys.executable, "-c", HOST_PROBE, str(warmup),
                                       str(seconds - warmup)], stdout=subprocess.PIPE, text=True)
        outage_s = min(60.0, 0.2 * (seconds - warmup))
        outage = (warmup + 0.55 * (seconds - warmup),) * 2
        outage = (outage[0], outage[0] + outage_s)
        plan = [(t, "shot") for t in _shot_times(warmup, seconds, outage)]
        plan += [(warmup + 0.35 * (seconds - warmup), "downlink"), (outage[0], "wifi down"),
                 (outage[1], "wifi up")]
        shots: list[float] = []
        sent = None
        for when, action in sorted(plan):
            _sleep_until(t0 + when)
            if action == "shot":
                shots.append(board.control("impulse", kind="gunshot", level_db=118.0,
                                           after_s=0.5)["unix"])
            elif action == "downlink":
                sent = time.time()
                _downlink(broker, device, operator, seq=1)
            else:
                board.control("wifi", up=action == "wifi up")
        _sleep_until(t0 + seconds)
        time.sleep(3)                        # the last shot's event on its way
        _ask_for_the_probes_files(board.state / "fs")
        result["shots"] = _shot_stats(shots, pole, upstream)
        answer = pole.first(wire.KIND_STATUS, sent) if sent else None
        result["downlink_ms"] = round((answer - sent) * 1000) if answer else None
        result["stalls"] = _stall_stats(_saved(stalls, "H"))
        out, _ = host_probe.communicate(timeout=60)
        result["host_stalls"] = _stall_stats(json.loads(out))
        held = board.state / "fs" / "bench_held.txt"
        result["held"] = _held_stats(held.read_text()) if held.exists() else {}
        result["longest"] = _longest_holds(held.read_text()) if held.exists() else []
        result["event_path"] = _path_stats(_saved(board.state / "fs" / "bench_path.bin", "i"))
        result["clock"] = _clock_stats(_saved(board.state / "fs" / "bench_clock.bin", "h"))
        overruns, dropped = _overruns(board)
        result["audio_overruns"] = overruns - overruns_before[0]
        status = board.control("status")
        hitches = status.get("hitches") or {}
        result["hitches"] = {   # counts in the run; the worst since boot
            key: value - hitches_before.get(key, 0) if key.endswith("stops") else value
            for key, value in hitches.items() if key != "worst"}
        # the worst as the holds are stamped: s after main.py began
        result["hitches"]["worst"] = [[round(at - main_began, 1), kind, ms]
                                      for at, kind, ms in hitches.get("worst", [])]
        collections = status.get("collections") or {}
        if collections.get("count"):
            result["collections"] = {   # in the run; the longest since boot
                key: value - collections_before.get(key, 0) if "longest" not in key else value
                for key, value in collections.items()}
            planned = board.state / "fs" / "bench_planned.bin"
            if planned.exists():        # both since boot (the boot's own are the allocator's)
                result["collections"]["planned_pct"] = round(
                    100 * int(planned.read_text()) / collections["count"], 1)
        # the microphone's 32-bit mono samples, as a share of the audio of the whole run
        lost = (dropped - overruns_before[1]) / 4 / MIC_RATE
        # at most all of it: what the ring held at t0 may be dropped in the run too
        result["audio_lost_pct"] = round(min(100.0, 100 * lost / (time.time() - t0)), 2)
        timed = [(at, b) for at, b in pole.seen if b.kind == wire.KIND_READINGS]
        windows = [b for _, b in timed]
        result["windows"] = len(windows)
        health = [{r.get(0): r.get(2) for r in w.records} for w in windows]
        # each window's seq, its uptime at its seal (s), how long after it reached the
        # pole, and the node's count of windows lost to a short heap and of envelopes
        # its spool dropped: a window missing shows why, a seq twice a QoS 1 resend
        result["windows_seq_sealed_late_lost_dropped"] = [
            [b.seq, round(b.uptime_ms / 1000),
             round(at - b.time_ms / 1000, 1) if b.time_ms else None,
             h.get("node/errors/window", 0), h.get("node/dropped")]
            for (at, b), h in zip(timed, health, strict=True)]
        # the audio each window lost to the ring (ms): when in the run it overflowed
        result["windows_audio_lost_ms"] = [
            round(h.get("noise/overruns", 0) * 1000 / MIC_RATE) for h in health]
        result["crashes"] = [r.get(3) for _, b in pole.seen if b.kind == wire.KIND_STATUS
                             for r in b.records if r.get(0) == "node/last_crash"]
        counted = board.state / "fs" / "bench_errors.bin"
        result["errors"] = counted.read_text().splitlines() if counted.exists() else []
        last = health[-1] if health else {}
        result["signed"] = {"pooled": last.get("node/signed_pooled"),
                            "whole": last.get("node/signed_whole")}
        # per window: [boot, reset cause, pooled, whole], so a reset in the run shows
        result["windows_signed"] = [[h.get(k) for k in ("node/boot", "node/reset_cause",
                                                        "node/signed_pooled",
                                                        "node/signed_whole")]
                                    for h in health]
        result["outage_s"] = outage_s
        result["schedule_s"] = [[round(when, 1), action] for when, action in sorted(plan)]
    return result


def _ask_for_the_probes_files(fs: Path) -> None:
    """The probe writes what it kept once the run is over, when asked (PROBE)."""
    (fs / "bench_saved").unlink(missing_ok=True)
    (fs / "bench_save").touch()
    deadline = time.monotonic() + 60
    while not (fs / "bench_saved").exists() and time.monotonic() < deadline:
        time.sleep(0.2)


def _shot_stats(shots: list[float], pole: Watch, city: Watch) -> dict:
    """Per shot fired (its Unix time): its event's delay to each broker and its stamp's
    error; the shots no event came for (audio the node dropped, or a stamp off by more
    than SHOT_MATCH_S) are `missed`."""
    to_pole, to_city, stamp = [], [], []
    for fired in shots:
        at_pole, at_city = pole.event_of(fired), city.event_of(fired)
        if at_pole:
            to_pole.append((at_pole[0] - fired) * 1000)
            stamp.append(abs(at_pole[1].time_ms / 1000 - fired) * 1000)
        if at_city:
            to_city.append((at_city[0] - fired) * 1000)
    return {"fired": len(shots), "missed": len(shots) - len(to_city),
            "to_pole_ms": _quantiles(to_pole), "to_city_ms": _quantiles(to_city),
            "stamp_error_ms": _quantiles(stamp), "to_city_ms_each": [round(d) for d in to_city]}


def _quantiles(values: list[float]) -> dict:
    """p50, p99 (nearest rank) and max, rounded; {} for no values."""
    if not values:
        return {}
    ranked = sorted(values)

    def rank(q: float) -> float:
        return round(ranked[min(len(ranked) - 1, math.ceil(q * len(ranked)) - 1)], 1)

    return {"p50": rank(0.5), "p99": rank(0.99), "max": round(ranked[-1], 1), "n": len(ranked)}


def _wait_for_app(board: BoardHandle, started: float, timeout: float = 300) -> tuple[float, float]:
    """Seconds until the app's loop ran (the probe's /bench_up): the run's clock starts
    there, so a slow boot at chip speed (a fast host's factor is large) cannot eat it;
    and the unix time main.py began, to 0.05 s and the chip's lead (the file says how
    long before it was written)."""
    up = board.state / "fs" / "bench_up"
    while not up.exists() or not up.read_text():
        if time.time() - started > timeout:
            raise RuntimeError(f"the app did not start at chip speed within {timeout:.0f} s; "
                               f"its board: {board.control('status')}")
        time.sleep(0.05)
    seen = time.time()
    return round(seen - started, 1), seen - int(up.read_text()) / 1000


def _saved(path: Path, typecode: str) -> list[int]:
    """The numbers of an array the probe saved (the VM's byte order); none if it did not."""
    numbers = array(typecode)
    if path.exists():
        numbers.frombytes(path.read_bytes())
    return numbers.tolist()


def _path_stats(numbers: list[int]) -> dict:
    """Per step of an event's way through the node (bench_path: ms after its onset for
    each), its quantiles: how much of the delay is hearing it whole, signing, queueing."""
    steps = [numbers[i:i + 3] for i in range(0, len(numbers) - 2, 3)]
    return {name: _quantiles([float(s[k]) for s in steps if s[k] > 0])
            for k, name in enumerate(("heard_ms", "sealed_ms", "to_mqtt_ms"))}


def _stall_stats(counts: list[int]) -> dict:
    """max, p99, p50 (ms, bin upper edges) and count > 20 ms from the probe's histogram."""
    total = sum(counts)
    if not total:
        return {"probes": 0}

    def edge(i: int) -> int:
        return max(0, i * 10)          # bin i holds lateness in [10(i-1), 10 i) ms

    seen, quantile = 0, {}
    for i, n in enumerate(counts):
        seen += n
        for q in (0.5, 0.99):
            if q not in quantile and seen >= q * total:
                quantile[q] = edge(i)
    top = max(i for i, n in enumerate(counts) if n)
    return {"probes": total, "max": edge(top), "p99": quantile[0.99], "p50": quantile[0.5],
            "over_20": sum(counts[3:])}


def _held_stats(text: str, scale: float = 1.0) -> dict:
    """{task: [steps, steps over the limit, longest step in ms x scale, steps over the
    limit with a heap collection in them]} from TASK_TIMER's file, the worst first."""
    rows = [line.split() for line in text.splitlines() if line.strip() and line[0] != "@"]
    rows.sort(key=lambda row: -int(row[3]))
    return {name: [int(n), int(over), round(int(top) / 1000 * scale, 1), int(collected)]
            for name, n, over, top, collected in rows}


def _collection_stats(counted: dict | None, minutes: float, factor: float) -> dict:
    """The run's heap collections: in chip terms as the emulated board charged them (the
    chip's published rate over the heap swept and the words live), and their host CPU
    x the interpreter's factor, as they were charged before (None where none counted)."""
    if not counted or not counted["count"]:
        return {"collections_per_min": None}
    count = counted["count"]
    return {"collections_per_min": round(count / minutes, 1),
            "collections_planned_pct": counted.get("planned_pct"),
            "collection_ms_chip_mean": round(counted["chip_ms"] / count, 1),
            "collection_ms_chip_longest": round(counted["chip_longest_ms"], 1),
            "collection_ms_host_x_factor_mean": round(counted["cpu_ms"] / count * factor, 1)}


def _longest_holds(text: str) -> list[list]:
    """[ms, task, s after the app started] of TASK_TIMER's longest steps, the worst first:
    which turn held the loop, and when (beside the shots, windows and outage)."""
    rows = [line.split()[1:] for line in text.splitlines() if line.startswith("@")]
    rows.sort(key=lambda row: -int(row[1]))
    return [[round(int(us) / 1000, 1), name, round(int(t) / 1000, 1)] for name, us, t in rows]


def _clock_stats(tenths: list[int]) -> dict:
    """p50, p95 and max of |node clock - host clock| (ms) over the probe's samples (in
    0.1 ms), and their mean (the sign says which way: + the node is ahead)."""
    signed = [x / 10 for x in tenths]
    errors = sorted(abs(e) for e in signed)
    if not errors:
        return {"samples": 0}
    return {"samples": len(errors), "p50": errors[len(errors) // 2],
            "p95": errors[min(len(errors) - 1, int(0.95 * len(errors)))], "max": errors[-1],
            "mean": round(sum(signed) / len(signed), 1)}


def _sleep_until(when: float) -> None:
    time.sleep(max(0.0, when - time.time()))


def _chip_heap_kb(water: dict) -> float:
    """The high-water mark in the chip's terms: byte buffers at their size, every other
    object at half its size here (GC blocks are counted in machine words; docs/decisions.md)."""
    buffers = water["buffer_bytes"]
    return round(((water["peak_bytes"] - buffers) / WORD_SCALE + buffers) / 1024, 1)


def _chip(host_ms: float, factor: float) -> float:
    return round(host_ms * factor, 1)


def _write_module(fs: Path, name: str, source: str) -> None:
    """A module of the bench's on the node's filesystem, compiled by mpy-cross for the
    VM, as provisioning ships the firmware. Compiled in the VM at boot (main.py), the
    compiler's garbage and the code it left strewn through the heap took the node's
    boot to its edge: a few lines more and the meter found no 2.4 KB block (a
    MemoryError, then safe mode)."""
    with tempfile.TemporaryDirectory(prefix="cn-bench-mpy-") as work:
        src = Path(work) / f"{name}.py"
        src.write_text(source)
        compiled = compile_mpy(src, f"{name}.py", board_mpy(vm_mpy())[2])
    if compiled is None:
        raise RuntimeError(f"mpy-cross could not compile the bench's {name}.py")
    (fs / f"{name}.py").unlink(missing_ok=True)
    (fs / f"{name}.mpy").write_bytes(compiled)


def run(minutes: float = 10.0, quick: bool = False) -> dict:
    # this host measured again now: the fastest seen is kept (citynode/speed.py)
    factors = speed.factors(get_board(BOARD), speed.host_rates(refresh=True), mhz=NODE_MHZ)
    window_s = 5 if quick else 60
    with tempfile.TemporaryDirectory(prefix="cn-bench-fw-") as name, \
            Mosquitto(Path(name) / "broker") as broker, \
            PoleTimeServer(Path(name) / "chrony") as clock:
        tmp = Path(name)
        scenario = tmp / "scenario.json"
        scenario.write_text(json.dumps({"start": "2026-04-15T12:00:00", "events": []}))
        extra = ["--scenario", str(scenario)]
        operator, pem = operator_key(tmp)
        # blank and flashed as a technician does it; the smoke run starts from MicroPython
        emu = start_emulator(tmp, blank=not quick, extra=extra)
        try:
            device = provision_one(tmp, emu.boards[0].url, f"{broker.host}:{broker.port}",
                                   window_s, pem, flash=not quick,
                                   ntp=f"{clock.host}:{clock.port}")
            host = host_speed(emu.boards[0], quick, factors.interp)
        finally:
            emu.stop()
        if get_board(BOARD).romfs_kb:
            host["water_stock"] = _stock_high_water(tmp, extra, 5 if quick else 20)
        # the same board (state dir) again, at the chip's speed, booting into the app
        warmup_ms = int(min(60.0, minutes * 12) * 1000)
        fs = tmp / "state" / "node0" / "fs"
        for stale in ("bench_up", "bench_save", "bench_saved"):
            (fs / stale).unlink(missing_ok=True)
        _write_module(fs, "bench_trace", TRACE.replace("PATH_N", "40"))
        _write_module(fs, "bench_clock", CLOCK_SAMPLE.replace(
            "HOST_OFFSET", str((time.time_ns() - time.monotonic_ns()) // 1000)))
        write_ms = "2000" if quick else "10000"
        _write_module(fs, "bench_probe", PROBE.replace("WARMUP_MS", str(warmup_ms))
                      .replace("WRITE_MS", write_ms))
        _write_module(fs, "bench_main", STALLS_MAIN.replace("OVER_US", "20000"))
        (fs / "main.py").write_text("import bench_main\n")
        with Mosquitto(tmp / "city") as city:
            # the pole's gateway, reading the registry provisioning wrote, to the city
            gateway = GatewayProcess(tmp / "gateway", broker, city,
                                     gateway_extra={"registry_dir": str(tmp / "fleet")})
            gateway.start()
            emu = start_emulator(tmp, extra=extra, chip_speed=True, timeout=120)
            try:
                chip = chip_speed_run(emu, broker, city, device, operator, minutes * 60)
            finally:
                emu.stop()
                gateway.kill()
    return _report(host, chip, factors, minutes, quick, romfs=bool(get_board(BOARD).romfs_kb))


def _report(host: dict, chip: dict, factors: speed.SpeedFactors, minutes: float,
            quick: bool, romfs: bool) -> dict:
    crypto, stalls, shots = host["crypto"], chip.get("stalls", {}), chip.get("shots", {})
    dsp = host.get("dsp", {})
    result = {
        "es256_sign_ms": round(crypto["es256_sign_ms"], 2),
        "hmac_sign_ms": round(crypto["hmac_sign_ms"], 3),
        "dsp_realtime_factor_48k": dsp.get("dsp_realtime_factor_48k"),
        "dsp_plain_python_realtime_factor_48k": dsp.get("dsp_plain_python_realtime_factor_48k"),
        "dsp_realtime_factor_16k": dsp.get("dsp_realtime_factor_16k"),
        "mic_rate_hz": MIC_RATE,
        "cycle_ms": round(host["cycle"]["cycle_ms"], 1),
        "heap_high_water_kb": _chip_heap_kb(host["water"]),
        "heap_high_water_kb_x64": round(host["water"]["peak_bytes"] / 1024, 1),
        "heap_buffer_kb": round(host["water"]["buffer_bytes"] / 1024, 1),
        "p256_table_bytes": crypto["table_bytes"],
        "board": "esp32-devkitc (emulated, MicroPython unix port on x86-64)",
        # chip terms: host CPU time x the board's factor (big integers for the crypto)
        "es256_sign_ms_chip": _chip(crypto["es256_sign_ms"], factors.bigint),
        "verify_ms_chip": _chip(crypto["es256_verify_ms"], factors.bigint),
        "precompute_ms_chip": _chip(crypto["table_build_ms"], factors.bigint),
        "cycle_ms_chip": _chip(host["cycle"]["cycle_ms"], factors.interp),
        # measured at chip speed (citynode-emu --chip-speed), real time = chip time
        "max_loop_stall_ms_chip": stalls.get("max"),
        "loop_stall_p99_ms_chip": stalls.get("p99"),
        "loop_stalls_over_20ms": stalls.get("over_20"),
        # the same probe in a plain process on the host beside the run: the host's share
        "host_sleep_stalls": chip.get("host_stalls"),
        # the host's stalls of the VM under the throttle (emulator/throttle.py hitch()):
        # its stops, those that overslept 20 ms or more (the chip's clock jumped: a stall
        # no chip has) and the worst, those that owed 100 ms or more (the VM ran ahead of
        # its I2S ring) and the furthest; not the firmware's
        "host_hitches_chip": chip.get("hitches"),
        # per task: [steps, steps over 20 ms, longest ms, those over 20 ms with a heap
        # collection in them]; at chip speed (grain: one burst of the pacing, ~20 ms),
        # and from host time x factor (no grain, no collections counted: 0)
        "loop_held_by_task_chip": chip.get("held"),
        # the heap's collections in the run (counted by emulator/chipclock.c): per minute,
        # and each one's host CPU x the factor (mean, longest): a stall none can shorten
        **_collection_stats(chip.get("collections"), minutes, factors.interp),
        # the longest steps at chip speed: [ms, task, s after the app started]
        "loop_longest_holds_chip": chip.get("longest"),
        "task_steps_ms_chip": host.get("steps"),
        "max_task_step_ms_chip": max((v[2] for k, v in host.get("steps", {}).items()
                                      if k not in ("main", "the_app")), default=None),
        "impulse_to_publish_ms_chip": shots.get("to_pole_ms", {}).get("p50"),
        "event_to_city_ms_p99_chip": shots.get("to_city_ms", {}).get("p99"),
        "event_to_city_ms_p50_chip": shots.get("to_city_ms", {}).get("p50"),
        "event_stamp_error_ms_p99_chip": shots.get("stamp_error_ms", {}).get("p99"),
        "shots_missed": shots.get("missed"),
        # shots whose event reached the pole's broker (a shot missed there too was not
        # heard or not sent; one missed at the city only was lost or late beyond it)
        "shots_at_pole": shots.get("to_pole_ms", {}).get("n", 0),
        "event_to_city_ms_each_chip": shots.get("to_city_ms_each"),   # in firing order
        # the node's signatures by the run's last window: from its pool of nonce pairs, or
        # whole in steps (an event signed whole is ~1 s late)
        "signatures_pooled_whole": [chip.get("signed", {}).get(k) for k in ("pooled", "whole")],
        "windows_boot_cause_pooled_whole": chip.get("windows_signed"),
        "windows_seq_sealed_late_lost_dropped": chip.get("windows_seq_sealed_late_lost_dropped"),
        "event_path_ms_chip": chip.get("event_path"),
        "crashes": chip.get("crashes"),   # the app's tracebacks, sent after its reset
        "node_errors_chip": chip.get("errors"),   # what node/errors counted, and why
        "downlink_to_answer_ms_chip": chip.get("downlink_ms"),
        "audio_overruns": chip.get("audio_overruns"),
        "audio_lost_pct": chip.get("audio_lost_pct"),
        "windows_audio_lost_ms": chip.get("windows_audio_lost_ms"),
        # the node's clock against the host's, sampled by the probe (SNTP from chronyd
        # through the emulated Wi-Fi's delays, a crystal 10 ppm fast)
        "clock_error_ms_p95_chip": chip.get("clock", {}).get("p95"),
        "clock_error_ms_max_chip": chip.get("clock", {}).get("max"),
        "clock_error_ms_mean_chip": chip.get("clock", {}).get("mean"),
        "chip_speed_run": {"minutes": minutes, "windows": chip.get("windows"),
                           "wifi_outage_s": chip.get("outage_s"), "shots": shots.get("fired"),
                           "downlinks": 1, "probes": stalls.get("probes"),
                           "clock_samples": chip.get("clock", {}).get("samples"),
                           "boot_s": chip.get("boot_s"),
                           # [s, what]: s from the app's loop running, which
                           # loop_longest_holds_chip counts from main.py (a few s sooner)
                           "schedule_s": chip.get("schedule_s")},
        # the stock image has no ROMFS: the firmware's .mpy files load into the heap
        "heap_high_water_kb_stock": _chip_heap_kb(host.get("water_stock", host["water"])),
        "image": "ROMFS partition (firmware in flash)" if romfs else
                 "stock MicroPython (no ROMFS: .mpy files on the filesystem, in the heap)",
        "cpu_mhz": NODE_MHZ,
        "speed_factor": round(factors.interp, 1),
        "bigint_speed_factor": round(factors.bigint, 1),
        "host_pystones": round(factors.host.pystones),
        "quick": quick,
        "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    for rate in ("48k", "16k"):     # above 1: the chip keeps up (charged as interpreted)
        if dsp.get(f"dsp_realtime_factor_{rate}"):
            result[f"dsp_realtime_factor_{rate}_chip"] = round(
                dsp[f"dsp_realtime_factor_{rate}"] / factors.interp, 2)
    result["targets"] = _targets(result)
    return result


def _targets(result: dict) -> dict:
    """Each target next to its value: {key: {"value", "target", "met"}}."""
    out = {}
    for key, limit in TARGETS.items():
        value = result.get(key)
        out[key] = {"value": value, "target": f"<= {limit}",
                    "met": None if value is None else value <= limit}
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="directory for firmware.json")
    parser.add_argument("--minutes", type=float, default=10.0,
                        help="length of the chip-speed run (default 10)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run for make test: window 5 s, 24 s at chip speed")
    args = parser.parse_args(argv)
    minutes = min(args.minutes, 0.25) if args.quick else args.minutes
    result = run(minutes, args.quick)
    save(result, args.out, "firmware")
    return result


if __name__ == "__main__":
    main()
