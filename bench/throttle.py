"""How faithful chip speed is (emulator/throttle.py): the slowdown a CPU-bound workload
gets against the target factor, and how long the VM runs between stops.

    python -m bench.throttle --out bench/results      # or: make bench-throttle

The workload runs on the unix port twice: free (host speed), then under a Throttle
at the board's factor (citynode/speed.py), timing itself inside the VM. Achieved
slowdown = throttled time / free time; its error against the factor is what chip
speed gets wrong on compute. A second workload alternates work and sleep, as the
firmware's event loop does, to check that idle time is not slowed. Bursts are the
wall time the VM ran between a SIGCONT and the SIGSTOP; in chip terms x factor.
Writes bench/results/throttle.json.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import time

from bench.output import save
from citynode import speed
from citynode.boards import get_board
from citynode.emulator.throttle import BURST_S, Throttle
from citynode.emulator.vm import micropython_binary, startup_cpu_ns

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


def _run(code: str, factor: float | None, burst_s: float) -> tuple[int, Throttle | None, float]:
    """(microseconds the VM measured, its throttle, controller CPU seconds)."""
    binary = micropython_binary()
    free_ns = startup_cpu_ns(binary)     # measured once, before the process starts
    before = resource.getrusage(resource.RUSAGE_SELF)
    proc = subprocess.Popen([binary, "-c", code], stdout=subprocess.PIPE, text=True)
    throttle = Throttle(proc.pid, factor, burst_s, free_ns=free_ns) if factor else None
    out, _ = proc.communicate(timeout=600)
    if throttle is not None:
        throttle.stop()
    after = resource.getrusage(resource.RUSAGE_SELF)
    overhead = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return int(out.split()[-1]), throttle, overhead


def _quantiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "max": ordered[-1]}


def measure(factor: float, burst_s: float, host_ms: float, runs: int) -> dict:
    """Achieved slowdown on CPU_BOUND (median of `runs`) and the burst distribution."""
    n = int(host_ms * 12_000)          # ~12k iterations per host ms on this VM
    code = CPU_BOUND.format(n=n)
    free = statistics.median(_run(code, None, burst_s)[0] for _ in range(runs))
    slowed, bursts, overhead, cpu_s = [], [], 0.0, 0.0
    for _ in range(runs):
        us, throttle, ctl = _run(code, factor, burst_s)
        assert throttle is not None
        slowed.append(us)
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
    free = _run(code, None, burst_s)[0]
    slowed = _run(code, factor, burst_s)[0]
    free_work_us = max(1.0, free - rounds * 20_000)
    expected = rounds * 20_000 + free_work_us * factor
    return {"rounds": rounds, "free_ms": round(free / 1000, 1),
            "throttled_ms": round(slowed / 1000, 1),
            "expected_ms": round(expected / 1000, 1),
            "error_pct": round((slowed / expected - 1) * 100, 1)}


def run(quick: bool = False, burst_s: float = BURST_S) -> dict:
    board = get_board("esp32-devkitc")
    factors = speed.factors(board)
    host_ms, runs, rounds = (20, 1, 5) if quick else (40, 3, 40)
    result = {"board": board.name, "speed_factor": round(factors.interp, 1),
              "bigint_speed_factor": round(factors.bigint, 1),
              "host_pystones": round(factors.host.pystones),
              "host_pi1000_ms": round(factors.host.pi1000_s * 1000, 2),
              "burst_us_setting": round(burst_s * 1e6),
              "cpu_bound": measure(factors.interp, burst_s, host_ms, runs),
              "mixed": measure_mixed(factors.interp, burst_s, rounds),
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
