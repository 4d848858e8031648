"""How faithful chip speed is (emulator/throttle.py): the slowdown a CPU-bound workload
gets against the target factor, and how long the VM runs between stops.

    python -m bench.throttle --out bench/results      # or: make bench-throttle

The workload runs on the unix port twice: free (host speed), then under a Throttle
at the board's factor (citynode/speed.py), timing itself inside the VM. Achieved
slowdown = throttled time / free time; its error against the factor is what chip
speed gets wrong on compute. A second workload alternates work and sleep, as the
firmware's event loop does, to check that idle time is not slowed. Bursts are the
wall time the VM ran between a SIGCONT and the SIGSTOP; in chip terms x factor.
A third is an event loop of fixed 10 ms turns (chip time) beside a probe, as
bench-firmware's: how long a turn reads and how late the probe wakes when nothing
varies but the host, the floor under the firmware's stall figures. A fourth is the
node's own audio turn, its sound meter on a 512-sample chunk (node/acoustic.py, the
viper A-weighting and the quarter's Python): back to back and after each wait, at
host speed x the factor, and on the chip's clock after each wait, as the node's audio
task runs it; what the host's slowness after a wait adds to the firmware's turns.
Writes bench/results/throttle.json.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from bench.output import save
from citynode import speed
from citynode.boards import get_board
from citynode.emulator.throttle import BURST_S, ChipClock, Throttle
from citynode.emulator.vm import gc_ns_per_byte, micropython_binary, startup_cpu_ns
from citynode.testing.micropython import FIRMWARE

STARTUP_FREE_NS = 15_000_000   # of the wrapper's ~25-40 ms start-up (startup_cpu_ns)

WORK = """
import time
def work(n):
    s = 0
    for i in range(n):
        s += i * i
    return s
"""

# N iterations of a small loop, timed inside the VM; prints microseconds.
CPU_BOUND = WORK + """
work(1000)
t = time.ticks_us()
work({n})
print(time.ticks_diff(time.ticks_us(), t))
"""

# The event loop's shape: ~1 ms of host work, then 20 ms asleep, `rounds` times.
MIXED = WORK + """
t = time.ticks_us()
for _ in range({rounds}):
    work({n})
    time.sleep_ms(20)
print(time.ticks_diff(time.ticks_us(), t))
"""


# Fixed turns of ~10 ms of chip time each, then 20 ms asleep, in an asyncio loop with a
# probe that sleeps 50 ms and notes how late it woke (bench/firmware.py's probe). No
# collection runs (gc disabled): only the host varies. Prints the turns' lengths (us),
# then "late", then the probe's lateness (ms).
TURNS = WORK + """
import asyncio, gc
turns, late = [], []
async def worker():
    for _ in range({turns}):
        t = time.ticks_us()
        work({n})
        turns.append(time.ticks_diff(time.ticks_us(), t))
        await asyncio.sleep_ms(20)
async def probe():
    while True:
        t = time.ticks_ms()
        await asyncio.sleep_ms(50)
        late.append(time.ticks_diff(time.ticks_ms(), t) - 50)
async def main():
    asyncio.create_task(probe())
    await worker()
gc.collect()
gc.disable()
work(1000)
asyncio.run(main())
print(*turns)
print("late", *late)
"""

# The node's sound meter on one 512-sample chunk of 16 kHz noise (its audio task's work
# for a chunk, without the read): `chunks` back to back, then `chunks` each after a
# 16 ms asyncio wait (the task's rest between turns: a poll, as on the chip). No
# collection runs. Prints the back-to-back times (us), then "waited" and the others.
DSP_CHUNKS = """
import asyncio, gc, sys, time
from array import array
sys.path.append({firmware!r})
from node.acoustic import SoundMeter
meter = SoundMeter(rate=16000)
seed = 12345
buf = array('i', bytes(4 * 512))
for i in range(512):
    seed = (seed * 1103515245 + 12345) & 0x7FFFFFFF
    buf[i] = ((seed >> 7) & 0xFFFFFF) - 0x800000
def chunk():
    t = time.ticks_us()
    meter.process(buf, 512)
    return time.ticks_diff(time.ticks_us(), t)
async def waited(n):
    out = []
    for _ in range(n):
        await asyncio.sleep_ms(16)
        out.append(chunk())
    return out
for _ in range(8):
    chunk()
gc.collect()
gc.disable()
together = [chunk() for _ in range({chunks})]
after = asyncio.run(waited({chunks}))
print(*together)
print("waited", *after)
"""


def _run(code: str, factor: float | None, burst_s: float,
         gc_kb_ms: float | None = None) -> tuple[str, Throttle | None, float]:
    """(what the VM printed, its throttle, controller CPU seconds). With `gc_kb_ms` (the
    chip's rate of collecting) the VM's clock is the chip's and its collections and
    wake-ups are modelled, as on an emulated board (ChipClock)."""
    binary = micropython_binary()
    # the wrapper's start-up runs free, STARTUP_FREE_NS at most: on a loaded host (a CI
    # run on three workers) the measured start-up read over the VM's own, and the
    # allowance ran a whole quick workload free; the rest is charged, a wait before the
    # workload, not in its timing
    free_ns = min(startup_cpu_ns(binary), STARTUP_FREE_NS)
    before = resource.getrusage(resource.RUSAGE_SELF)
    with tempfile.TemporaryDirectory() as folder:
        clock = ChipClock(Path(folder)) if factor and gc_kb_ms else None
        env = dict(os.environ, **clock.env()) if clock else None
        proc = subprocess.Popen([binary, "-c", code], stdout=subprocess.PIPE, text=True,
                                env=env)
        throttle = (Throttle(proc.pid, factor, burst_s, free_ns=free_ns, clock=clock,
                             gc_ns_per_byte=gc_ns_per_byte(gc_kb_ms) if clock else 0.0)
                    if factor else None)
        out, _ = proc.communicate(timeout=600)
        if throttle is not None:
            throttle.stop()
        if clock is not None:
            clock.close()
    after = resource.getrusage(resource.RUSAGE_SELF)
    overhead = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return out, throttle, overhead


def _measured_us(out: str) -> int:
    return int(out.split()[-1])


def _quantiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "max": ordered[-1]}


def measure(factor: float, burst_s: float, host_ms: float, runs: int) -> dict:
    """Achieved slowdown on CPU_BOUND (median of `runs`) and the burst distribution."""
    n = int(host_ms * 12_000)          # ~12k iterations per host ms on this VM
    code = CPU_BOUND.format(n=n)
    free = statistics.median(_measured_us(_run(code, None, burst_s)[0]) for _ in range(runs))
    slowed, bursts, overhead, cpu_s = [], [], 0.0, 0.0
    for _ in range(runs):
        out, throttle, ctl = _run(code, factor, burst_s)
        assert throttle is not None
        slowed.append(_measured_us(out))
        bursts += throttle.stats.burst_s
        overhead += ctl
        cpu_s += throttle.stats.cpu_ns / 1e9
    achieved = statistics.median(slowed) / free
    burst_us = {k: round(v * 1e6) for k, v in _quantiles(bursts).items()}
    return {
        "target": round(factor, 1),
        "achieved": round(achieved, 1),
        "error_pct": round((achieved / factor - 1) * 100, 1),
        "free_ms": round(free / 1000, 2),
        "throttled_ms": round(statistics.median(slowed) / 1000, 1),
        "burst_us": burst_us,
        "burst_ms_chip": {k: round(v * factor / 1000, 1) for k, v in burst_us.items()},
        "controller_cpu_per_vm_cpu": round(overhead / cpu_s, 2) if cpu_s else None,
    }


def measure_mixed(factor: float, burst_s: float, rounds: int) -> dict:
    """Work-then-sleep: wall = rounds x (20 ms + work x factor), if idle runs free."""
    work_n = 12_000
    code = MIXED.format(rounds=rounds, n=work_n)
    free = _measured_us(_run(code, None, burst_s)[0])
    slowed = _measured_us(_run(code, factor, burst_s)[0])
    free_work_us = max(1.0, free - rounds * 20_000)
    expected = rounds * 20_000 + free_work_us * factor
    return {"rounds": rounds, "free_ms": round(free / 1000, 1),
            "throttled_ms": round(slowed / 1000, 1),
            "expected_ms": round(expected / 1000, 1),
            "error_pct": round((slowed / expected - 1) * 100, 1)}


def _spread(values: list[float]) -> dict[str, float]:
    """p50, p99, max and the share over 20 ms of chip time (ms)."""
    over = sum(v > 20 for v in values) * 100 / len(values)
    return {k: round(v, 1) for k, v in _quantiles(values).items() if k != "p90"} | {
        "over_20_pct": round(over, 2)}


def _iterations_per_ms(burst_s: float) -> float:
    """work()'s iterations per host ms on this host now (the best of a few timings):
    a host's speed moves, and a fixed count made the 10 ms turns 15 ms on a slower one."""
    code = WORK + "\nfor _ in range(5):\n    t = time.ticks_us()\n    work(20000)\n" \
        "    print(time.ticks_diff(time.ticks_us(), t))\n"
    return 20_000 / (min(int(w) for w in _run(code, None, burst_s)[0].split()) / 1000)


def measure_turns(factor: float, gc_kb_ms: float, burst_s: float, turns: int) -> dict:
    """Fixed 10 ms turns beside a probe (TURNS) under the throttle, on the chip's clock:
    each turn's length and the probe's lateness in chip ms; and the same turns at host
    speed, their lengths x factor (the host's own spread, no throttle in it)."""
    n = int(10 / factor * _iterations_per_ms(burst_s))
    code = TURNS.format(turns=turns, n=n)

    def lengths_and_late(out: str) -> tuple[list[int], list[int]]:
        lengths, late = out.split("late")
        return [int(w) for w in lengths.split()], [int(w) for w in late.split()]

    free, _ = lengths_and_late(_run(code, None, burst_s)[0])
    slowed, late = lengths_and_late(_run(code, factor, burst_s, gc_kb_ms)[0])
    return {"turns": turns,
            "turn_ms_chip": _spread([us / 1000 for us in slowed]),
            "probe_late_ms_chip": _spread(late),
            "turn_ms_host_x_factor": _spread([us * factor / 1000 for us in free])}


def measure_dsp(factor: float, gc_kb_ms: float, burst_s: float, chunks: int) -> dict:
    """The sound meter's chunk (DSP_CHUNKS), chip ms (p50, p90): at host speed x factor
    back to back and after a wait, and on the chip's clock after a wait; and how much
    the chip's clock reads over the host's warm speed x factor."""
    code = DSP_CHUNKS.format(firmware=str(FIRMWARE), chunks=chunks)

    def times(out: str) -> tuple[list[float], list[float]]:
        together, after = out.split("waited")
        return ([int(w) / 1000 for w in together.split()],
                [int(w) / 1000 for w in after.split()])

    free_together, free_after = times(_run(code, None, burst_s)[0])
    _, chip_after = times(_run(code, factor, burst_s, gc_kb_ms)[0])

    def p50_p90(ms: list[float], scale: float = 1.0) -> dict[str, float]:
        q = _quantiles([m * scale for m in ms])
        return {"p50": round(q["p50"], 2), "p90": round(q["p90"], 2)}

    warm = p50_p90(free_together, factor)
    chip = p50_p90(chip_after)
    return {"chunks": chunks,
            "host_x_factor_back_to_back": warm,
            "host_x_factor_after_wait": p50_p90(free_after, factor),
            "chip_after_wait": chip,
            "chip_over_warm": round(chip["p50"] / warm["p50"], 2)}


def run(quick: bool = False, burst_s: float = BURST_S) -> dict:
    board = get_board("esp32-devkitc")
    factors = speed.factors(board, speed.host_rates(refresh=True))   # the fastest seen
    host_ms, runs, rounds, turns = (20, 1, 5, 100) if quick else (40, 3, 40, 2000)
    chunks = 20 if quick else 300
    result = {"board": board.name, "speed_factor": round(factors.interp, 1),
              "bigint_speed_factor": round(factors.bigint, 1),
              "host_pystones": round(factors.host.pystones),
              "host_pi1000_ms": round(factors.host.pi1000_s * 1000, 2),
              "burst_us_setting": round(burst_s * 1e6),
              "cpu_bound": measure(factors.interp, burst_s, host_ms, runs),
              "mixed": measure_mixed(factors.interp, burst_s, rounds),
              "turn_10ms": measure_turns(factors.interp, board.speed.gc_kb_ms, burst_s, turns),
              "dsp_chunk_512": measure_dsp(factors.interp, board.speed.gc_kb_ms, burst_s, chunks),
              "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if not quick:  # the same at a round factor, and at other burst lengths (the trade-off)
        result["cpu_bound_factor_150"] = measure(150.0, burst_s, host_ms // 2, runs)
        result["burst_100us"] = measure(factors.interp, 100e-6, host_ms, runs)
        result["burst_1ms"] = measure(factors.interp, 1e-3, host_ms, runs)
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="directory for throttle.json")
    parser.add_argument("--quick", action="store_true", help="a few seconds (make test)")
    parser.add_argument("--burst-us", type=float, default=BURST_S * 1e6)
    args = parser.parse_args(argv)
    result = run(args.quick, args.burst_us / 1e6)
    save(result, args.out, "throttle")
    return result


if __name__ == "__main__":
    main()
