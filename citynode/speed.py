"""How much faster this host runs MicroPython than a board's chip (issue 11).

The emulated boards run the real MicroPython unix port at host speed. To speak of
firmware timings in the chip's terms, or to run a board at chip speed, we need the
factor host rate / chip rate for the same code. The chip side is published figures
(boards.yaml `speed:`, sources in docs/decisions.md); the host side is measured
here, on this machine, by a calibration run on the unix port, never typed in: the
factor of a 2-core VM shared with other work is not a laptop's.

Two workloads, because the two ratios differ (measured ~1.3x apart):
- interpreted code (`pystones`): a mix of calls, attributes, lists, strings and
  small-int arithmetic that allocates as it goes. It is ours, not pystone (which
  we may not ship); its result is converted to pystones/s with PYSTONES_PER_PASS,
  the ratio of pystone_lowmem's rate to this workload's rate measured on the same
  unix-port build (docs/decisions.md). Published chip figures are pystone_lowmem.
- big integers (`pi1000_s`): 1000 decimal digits of pi from the arcsin(1/2) series
  in integer arithmetic, the algorithm of the published figures, written here.

Each workload reads its own thread's CPU time from /proc/self/schedstat inside the
VM, so start-up and waiting for the CPU (a loaded host) do not count; the best of
a few runs is kept. Results are cached per binary and CPU for CACHE_TTL_S, and a
measurement again keeps the fastest of it and the cache's: a shared host's speed moves
(126k to 190k pystones within an hour on one), and a factor from a slow moment makes
the emulated chip faster than the real one whenever the host is faster.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

# pystone_lowmem pystones/s per pass/s of INTERP below, both on the same unix-port build
# (x86-64, five interleaved runs: 69.3k pystones/s vs 327 passes/s median; 212 median,
# 204 best-of ratio; docs/decisions.md).
PYSTONES_PER_PASS = 210.0
CACHE_TTL_S = 24 * 3600
RUNS = 3

_CPU = """
def _cpu_ns():
    f = open('/proc/self/schedstat')
    v = int(f.read().split()[0])
    f.close()
    return v
"""

# Interpreted code: records on a short linked list, list and grid indexing, string
# compares, calls with several arguments; ~3 ms of host CPU per pass.
INTERP = _CPU + """
class Rec:
    def __init__(self, a, tag):
        self.a = a
        self.tag = tag
        self.next = None

def pick(a, b, c):
    if a > b:
        return a - c
    return b + c

def scan(arr, i):
    s = 0
    for j in range(i, i + 4):
        s += arr[j & 63]
    return s

def one_pass():
    arr = [0] * 64
    grid = [[0] * 8 for _ in range(8)]
    head = Rec(0, 'start')
    total = 0
    for i in range(1000):
        r = Rec(i & 63, 'abc' if i & 1 else 'abd')
        r.next = head.next
        head.next = r if i & 3 else None
        arr[i & 63] = arr[(i + 1) & 63] + r.a
        grid[i & 7][(i >> 3) & 7] += 1
        if r.tag < 'abd':
            total += pick(r.a, i & 31, 3)
        else:
            total -= scan(arr, i & 63)
    return total

def run(passes):
    t = _cpu_ns()
    for _ in range(passes):
        one_pass()
    return passes, _cpu_ns() - t
"""

# Big integers: 1000 digits of pi, 3 * sum C(2k,k) / (16^k (2k+1)) scaled by 10^(n+8).
BIGINT = _CPU + """
def pi_digits(digits):
    guard = 8
    term = 3 * 10 ** (digits + guard)
    total = term
    k = 0
    while term:
        k += 1
        term = term * ((2 * k - 1) * (2 * k - 1)) // (8 * k * (2 * k + 1))
        total += term
    return total // 10 ** guard

def run(times):
    t = _cpu_ns()
    for _ in range(times):
        digits = pi_digits(1000)
    assert str(digits).startswith('31415926535897932384')
    return times, _cpu_ns() - t
"""


class CalibrationError(RuntimeError):
    """The unix port could not run the calibration (no /proc, no binary, a crash)."""


@dataclass(frozen=True)
class HostRates:
    """What this host does on the unix port: the units of boards.yaml `speed:`."""

    pystones: float        # pystones/s (from INTERP passes/s x PYSTONES_PER_PASS)
    pi1000_s: float        # CPU seconds for 1000 digits of pi
    binary: str
    cpu: str
    measured_at: float


@dataclass(frozen=True)
class SpeedFactors:
    """Host time x factor = chip time, for interpreted code and for big integers."""

    interp: float
    bigint: float
    host: HostRates

    def chip_ms(self, host_ms: float, bigint: bool = False) -> float:
        """A host CPU time in the chip's terms."""
        return host_ms * (self.bigint if bigint else self.interp)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def _run_workload(binary: str, source: str, count: int) -> float:
    """Seconds of the VM's own CPU per unit of `count` (best of RUNS)."""
    best = float("inf")
    code = source + f"\nn, ns = run({count})\nprint(n, ns)\n"
    for _ in range(RUNS):
        proc = subprocess.run([binary, "-X", "heapsize=2048k", "-c", code],
                              capture_output=True, text=True, timeout=120)
        try:
            n, ns = (int(x) for x in proc.stdout.split()[-2:])
        except ValueError:
            raise CalibrationError(f"calibration run failed ({proc.returncode}): "
                                   f"{proc.stdout[-400:]}{proc.stderr[-400:]}") from None
        best = min(best, ns / 1e9 / n)
    return best


def measure_host(binary: str | None = None, quick: bool = False) -> HostRates:
    """Run both workloads on the unix port (~3 s; `quick`: ~0.5 s, noisier)."""
    from citynode.emulator.vm import micropython_binary

    binary = binary or micropython_binary()
    passes, digits = (30, 10) if quick else (300, 100)
    per_pass = _run_workload(binary, INTERP, passes)
    pi_s = _run_workload(binary, BIGINT, digits)
    return HostRates(pystones=PYSTONES_PER_PASS / per_pass, pi1000_s=pi_s,
                     binary=str(Path(binary).resolve()), cpu=_cpu_model(),
                     measured_at=time.time())


def _cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "citynode" / "host-speed.json"


def _binary_key(binary: str) -> str:
    path = Path(binary).resolve()
    stat = path.stat()
    return f"{path}:{stat.st_size}:{int(stat.st_mtime)}:{_cpu_model()}"


def host_rates(binary: str | None = None, refresh: bool = False) -> HostRates:
    """This host's rates, from the cache when it is fresh and for this binary and CPU.

    The cache keeps a test session or a benchmark from paying ~3 s per board; a new
    MicroPython build or another CPU measures again. It keeps each binary's rates: with
    one entry, a CI clone's run and the checkout's took turns to measure it, and one
    host read 254k and 267k pystones within the hour, so two benchmarks' factors moved
    5 % for no change of theirs (docs/decisions.md, "Chip speed").
    """
    from citynode.emulator.vm import micropython_binary

    binary = binary or micropython_binary()
    key = _binary_key(binary)
    path = _cache_path()
    entries = _read_cache(path)
    cached = entries.get(key)
    if not refresh and cached is not None:
        return HostRates(**cached)
    rates = _fastest(measure_host(binary), cached)
    entries[key] = asdict(rates)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entries, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: measure again next time
    return rates


def _fastest(rates: HostRates, cached: dict | None) -> HostRates:
    """Each of `rates` or of the cache's, whichever is faster: a measurement can only be
    slower than the host can go, so the fastest is the truest, and never kind."""
    if cached is None:
        return rates
    return replace(rates, pystones=max(rates.pystones, cached["pystones"]),
                   pi1000_s=min(rates.pi1000_s, cached["pi1000_s"]))


def _read_cache(path: Path) -> dict:
    """{binary key: rates} still fresh; {} for none, or a cache in another form."""
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(entries, dict) or "key" in entries:   # the one-entry form before
        return {}
    now = time.time()
    fresh = {}
    for key, rates in entries.items():
        try:
            if now - rates["measured_at"] < CACHE_TTL_S:
                HostRates(**rates)          # the fields this version reads
                fresh[key] = rates
        except (KeyError, TypeError):
            continue                        # another version's
    return fresh


def factors(board, rates: HostRates | None = None, mhz: int | None = None) -> SpeedFactors:
    """A board's speed factors on this host: host rate / the chip's published rate, at
    its stock clock or at `mhz` (machine.freq())."""
    speed = board.speed
    if speed is None:
        raise CalibrationError(f"board '{board.name}' has no `speed:` in boards.yaml; add the "
                               "chip's published figures (docs/decisions.md, issue 11)")
    rates = rates or host_rates()
    faster = speed.at(mhz or speed.mhz)
    return SpeedFactors(interp=rates.pystones / speed.pystones / faster,
                        bigint=speed.pi1000_s / rates.pi1000_s / faster, host=rates)


def main() -> None:
    """`python -m citynode.speed [BOARD...]`: measure this host, print every factor."""
    import sys

    from citynode.boards import load_catalogue

    rates = host_rates(refresh=True)
    boards = load_catalogue()
    names = sys.argv[1:] or list(boards)
    out = {"host": asdict(rates)}
    for name in names:
        f = factors(boards[name], rates)
        out[name] = {"interp": round(f.interp, 1), "bigint": round(f.bigint, 1)}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
