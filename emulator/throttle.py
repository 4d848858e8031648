"""Chip speed: the VM process runs in short bursts and waits out the chip's extra time.

The unix port runs the firmware ~40-200x faster than the chip (citynode/speed.py),
so a signature that stalls a real node's event loop for half a second passes
unnoticed here. At chip speed a controller thread per VM lets the process run a
burst (SIGCONT), stops it (SIGSTOP), reads the CPU time it really used from
/proc/PID/schedstat (first field, ns, exact) and keeps it stopped for
used x factor - burst. The peripherals stay in real time meanwhile: the I2S ring
fills at 48 kHz, the PMS5003 streams, the broker keeps its keepalive clock.

Why this and not the alternatives (docs/decisions.md, "Chip speed"): a cgroup's
cpu.max quota is granted per period with ~1 ms granularity, so a 1/150 share means
1 ms of running per 150 ms: stalls 150x coarser than a chip's; dilating the VM's
clock instead would make the firmware miss the real brokers' keepalives.

Inside a burst the host's clock moves 0.3 ms while the VM does ~70 ms of the chip's
work; a ChipClock (chipclock.c, preloaded into the VM) makes the VM's
CLOCK_MONOTONIC, which its ticks read, count that work as the chip's clock would.

The controller thread asks for SCHED_FIFO (tighter wake-ups; we are root in the
emulator's environments) and runs without it if refused.
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import os
import shutil
import signal
import statistics
import struct
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import NamedTuple

log = logging.getLogger(__name__)

# How long the VM runs between checks. Shorter is finer but dearer: resuming a stopped
# process costs it ~50 us of extra CPU (cold caches, the switch), measured as 2x CPU at
# 100 us bursts, ~1.15x at 300 us, ~1.0x at 1 ms (docs/decisions.md, "Chip speed").
BURST_S = 300e-6
MAX_CARRY_NS = 2_000_000  # oversleep credited to the next stop, at most
GC_WAIT_S = 0.005         # for a heap collection under way to finish before a stop, at most
STOP_WAIT_S = 0.001       # for a stopped process to leave its CPU, at most
USER_SHARE_TICKS = 20     # clock ticks of CPU before its user/system split is trusted
LATE_STOP_NS = 20_000_000  # a stop overslept this much: the chip's clock jumped (a stall)
AHEAD_NS = 100_000_000    # a stop owed this much: the VM ran ahead of the world
WORST = 16                # such stops kept with their time
FIFO_PRIORITY = 10
VM_NICE = -10             # the chip's CPU is the node's own: its VM first when it may run
_SAMPLES = 20_000         # burst lengths kept for the statistics (a ring)
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")   # /proc/PID/stat's unit, a second


@dataclass
class ThrottleStats:
    """What the throttle did: enough to say how faithful chip speed was."""

    cpu_ns: int = 0               # the VM's CPU time under the throttle
    stopped_s: float = 0.0        # time held stopped
    bursts: int = 0
    burst_s: list[float] = field(default_factory=list)   # wall length of recent bursts
    fifo: bool = False
    # the host's own hitches, in chip time (= real time here): stops that overslept by
    # LATE_STOP_NS or more (the chip's clock jumps by it, as if the chip froze), and
    # stops that owed AHEAD_NS or more (the controller came late: the VM's clock ran that
    # far ahead of the I2S ring and the sockets, which then waited for it)
    late_stops: int = 0
    latest_ns: int = 0
    ahead_stops: int = 0
    furthest_ahead_ns: int = 0
    worst: list[tuple[float, str, int]] = field(default_factory=list)  # (unix s, kind, ns)

    def achieved(self, wall_s: float) -> float:
        """Wall time per CPU time over `wall_s` of a CPU-bound run (the slowdown)."""
        return wall_s / (self.cpu_ns / 1e9) if self.cpu_ns else 0.0

    def hitch(self, owed_ns: int, slept_ns: int, at_s: float) -> None:
        """Count a stop that overslept or owed much, begun at unix time `at_s`: the host's
        stalls, not the chip's. The WORST largest are kept, to be set beside the VM's
        long turns."""
        late = slept_ns - owed_ns
        if late >= LATE_STOP_NS:
            self.late_stops += 1
            self._keep(at_s, "late", late)
        self.latest_ns = max(self.latest_ns, late)
        if owed_ns >= AHEAD_NS:
            self.ahead_stops += 1
            self._keep(at_s, "ahead", owed_ns)
        self.furthest_ahead_ns = max(self.furthest_ahead_ns, owed_ns)

    def _keep(self, at_s: float, kind: str, ns: int) -> None:
        self.worst.append((at_s, kind, ns))
        if len(self.worst) > WORST:
            self.worst.remove(min(self.worst, key=lambda hitch: hitch[2]))

    def hitches(self) -> dict:
        """hitch()'s counts, ms, and its worst as [unix s, kind, ms] in time order."""
        return {"stops": self.bursts, "late_stops": self.late_stops,
                "latest_ms": round(self.latest_ns / 1e6, 1), "ahead_stops": self.ahead_stops,
                "furthest_ahead_ms": round(self.furthest_ahead_ns / 1e6, 1),
                "worst": [[round(at, 3), kind, round(ns / 1e6, 1)]
                          for at, kind, ns in sorted(self.worst)]}


def _read_cpu_ns(fd: int) -> int:
    return int(os.pread(fd, 128, 0).split()[0])


def _read_schedstat(fd: int) -> tuple[int, int]:
    """(CPU ns, times scheduled in) of a process, from /proc/PID/schedstat."""
    fields = os.pread(fd, 128, 0).split()
    return int(fields[0]), int(fields[2])


@cache
def switch_cost_ns(wakes: int = 300) -> int:
    """CPU time a unix-port VM spends per time it is scheduled in, on this host: waking
    from a sleep or a poll, or being continued after a stop (the kernel's and the VM's
    switch, cold caches). ~50 us in this project's VMs, where the chip's task switch
    costs some us; charged at the chip's factor it made every event-loop wake-up cost
    ~10 ms of chip time, more the faster the host. 80% of the median of a few rounds,
    so that no real work goes uncharged."""
    from .vm import micropython_binary

    code = ("import time\nprint('go')\nwhile True:\n    time.sleep_ms(1)\n")
    proc = subprocess.Popen([micropython_binary(), "-c", code], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        proc.stdout.readline()
        fd = os.open(f"/proc/{proc.pid}/schedstat", os.O_RDONLY)
        rounds = []
        try:
            for _ in range(5):
                cpu0, n0 = _read_schedstat(fd)
                time.sleep(wakes / 5 / 1000)
                cpu1, n1 = _read_schedstat(fd)
                if n1 > n0:
                    rounds.append((cpu1 - cpu0) / (n1 - n0))
        finally:
            os.close(fd)
    finally:
        proc.kill()
        proc.wait()
    return int(0.8 * statistics.median(rounds)) if rounds else 0


def favour(pid: int) -> None:
    """The VM ahead of other host work when its burst comes (it runs ~1/factor of the
    time): a chip does not wait for the CPU. Behind a loaded host's other processes a
    burst comes late and the node falls behind its audio (suspected in a CI run on
    three workers that heard none of six shots; alone the test passed). Without the
    privilege it runs as it is."""
    try:
        os.setpriority(os.PRIO_PROCESS, pid, VM_NICE)
    except OSError:
        pass


def _try_fifo() -> bool:
    """SCHED_FIFO for this thread only: its wake-ups decide the burst length."""
    try:
        os.sched_setscheduler(threading.get_native_id(), os.SCHED_FIFO,
                              os.sched_param(FIFO_PRIORITY))
        return True
    except (OSError, AttributeError):
        return False


class Collections(NamedTuple):
    """The VM's heap collections so far, as chipclock.c counts them."""

    count: int
    cpu_ns: int                 # their host CPU, in all
    longest_ns: int
    chip_ns: int                # their chip time as modelled, in all
    chip_longest_ns: int
    busy: bool                  # one runs now
    # the chip's drivers: the board side's stand-ins for the port's C, charged as modelled
    driver_calls: int = 0
    driver_cpu_ns: int = 0
    driver_chip_ns: int = 0
    in_driver: bool = False
    wait_cpu_ns: int = 0        # the kernel's for the VM's waits (chipclock.c's poll)


class ChipClock:
    """The VM's clock at chip speed: a page the throttle writes and chipclock.c, preloaded
    into the VM, reads. Make it before the process starts and start it with `env()`."""

    _LAYOUT = struct.Struct("<qqqqqddqq")   # chipclock.c, struct page
    _SEQ = struct.Struct("<q")
    _COLLECTIONS = struct.Struct("<qqqqqqqqqiiq")  # chipclock.c, struct collections
    _COLLECTIONS_AT = 512

    def __init__(self, folder: Path) -> None:
        fd, name = tempfile.mkstemp(prefix="chipclock-", dir=folder)
        self.path = Path(name)
        os.ftruncate(fd, mmap.PAGESIZE)
        self._map = mmap.mmap(fd, mmap.PAGESIZE)
        os.close(fd)
        self._seq = 0

    def env(self) -> dict[str, str]:
        preload = " ".join(filter(None, [str(chip_clock_library()),
                                          os.environ.get("LD_PRELOAD")]))
        return {"LD_PRELOAD": preload, "CITYNODE_CHIP_CLOCK": str(self.path)}

    def rebase(self, offset_ns: int, cpu_ns: int, switches: int, switch_ns: int,
               gain: float, gc_ns_per_byte: float = 0.0,
               gc: tuple[int, int] = (0, 0)) -> None:
        """From now the VM's clock is the host's + `offset_ns` + `gain` x the CPU it uses
        beyond `cpu_ns`, less `switch_ns` per time it is scheduled in beyond `switches`;
        with `gc_ns_per_byte` a heap collection beyond `gc` (Collections' cpu_ns and
        chip_ns) counts as modelled instead (chipclock.c).
        Under a sequence count (odd while written): the VM may read it meanwhile."""
        if self._map.closed:
            return          # the VM is gone
        self._seq += 1
        self._SEQ.pack_into(self._map, 0, self._seq)
        self._LAYOUT.pack_into(self._map, 0, self._seq, offset_ns, cpu_ns, switches,
                               switch_ns, gain, gc_ns_per_byte, *gc)
        self._seq += 1
        self._SEQ.pack_into(self._map, 0, self._seq)

    def collections(self) -> Collections:
        """The VM's heap collections so far; zeros once closed."""
        if self._map.closed:
            return Collections(0, 0, 0, 0, 0, False)
        *gc, busy, calls, cpu, chip, in_driver, _, waits = self._COLLECTIONS.unpack_from(
            self._map, self._COLLECTIONS_AT)
        return Collections(*gc, bool(busy), calls, cpu, chip, bool(in_driver), waits)

    def close(self) -> None:
        self._map.close()
        self.path.unlink(missing_ok=True)


class CompilerMissing(RuntimeError):
    pass


@cache
def chip_clock_library() -> Path:
    """chipclock.c built once per source (a C compiler's job: some ms), in the user's
    cache: the emulator ships as source inside the wheel."""
    source = (resources.files(__package__) / "chipclock.c").read_bytes()
    cache_dir = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "citynode"
    library = cache_dir / f"chipclock-{hashlib.sha256(source).hexdigest()[:12]}.so"
    if library.exists():
        return library
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise CompilerMissing("chip speed needs a C compiler for the chip's clock "
                              "(emulator/chipclock.c): apt install gcc libc6-dev")
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as work:
        src, out = Path(work) / "chipclock.c", Path(work) / library.name
        src.write_bytes(source)
        subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-o", str(out), str(src), "-ldl"],
                       check=True, capture_output=True)
        out.replace(library)         # whole, even with another worker building it too
    return library


class Throttle:
    """Runs process `pid` at 1/`factor` of its speed; `stop()` leaves it running."""

    def __init__(self, pid: int, factor: float, burst_s: float = BURST_S,
                 free_ns: int | None = 0, switch_ns: int | None = None,
                 clock: ChipClock | None = None, gc_ns_per_byte: float = 0.0) -> None:
        """`free_ns`: CPU the process may use before pacing starts (the wrapper's own
        start-up: CPython and the unix port's set-up are no part of the chip's boot);
        None: until the board side's first mark on `clock` (emu_main's set-up, begun
        first thing): the wrapper's start-up varies too much to be allowed for.
        `switch_ns`: the CPU each time the process is scheduled in costs on this host
        (default: measured once, switch_cost_ns()): not the chip's, so not charged.
        `clock`: the ChipClock the process was started with, if any.
        `gc_ns_per_byte`: with a clock, a heap collection costs the chip this per byte of
        the VM's heap plus per byte live (vm.gc_ns_per_byte), not its CPU x factor."""
        if factor < 1:
            raise ValueError(f"speed factor {factor} < 1: the chip is not faster than the host")
        if free_ns is None and clock is None:
            raise ValueError("free until the board side's first mark needs its ChipClock")
        self.pid, self.factor, self.burst_s = pid, factor, burst_s
        self.free_ns = free_ns
        self.clock = clock
        self.gc_ns_per_byte = gc_ns_per_byte if clock is not None else 0.0
        self.stats = ThrottleStats()
        self._halt = threading.Event()
        self._fd = os.open(f"/proc/{pid}/schedstat", os.O_RDONLY)
        self._stat_fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY)
        self._signal(signal.SIGSTOP)        # from now on it runs only in bursts
        favour(pid)
        self.switch_ns = switch_cost_ns() if switch_ns is None else switch_ns
        self._thread = threading.Thread(target=self._run, name=f"chip-speed-{pid}",
                                        daemon=True)
        self._thread.start()

    def _signal(self, sig: int) -> bool:
        try:
            os.kill(self.pid, sig)
            return True
        except ProcessLookupError:
            return False

    def _run(self) -> None:
        self.stats.fifo = _try_fifo()
        try:
            self._loop()
        except OSError:
            pass  # the process is gone (exit, kill): nothing left to pace
        finally:
            self._rebase(0, 0, 0, 1.0, False, (0, 0))  # the host's clock: nothing to catch up
            self._signal(signal.SIGCONT)
            os.close(self._fd)
            os.close(self._stat_fd)

    def _loop(self) -> None:
        """Let it run a burst, read the CPU it used less the host's cost of each time it
        was scheduled in and of its system calls, and stop it until the host's time has
        caught up with the chip's: (factor - 1) x that CPU, less what the last stop
        overslept. Then rebase the chip's clock, continuous, on the host's.
        Stopping and continuing a sleeping process, and each wake-up, cost it tens of us
        of CPU here (switch_cost_ns), which charged at the chip's factor made an idle
        node look busy, more so the faster the host (docs/decisions.md, "Chip speed")."""
        stats, burst = self.stats, self.burst_s
        last, switches = _read_schedstat(self._fd)
        unmarked = self.free_ns is None
        free = 0 if unmarked else self.free_ns - last
        ahead = 0          # ns the chip's clock is ahead of the host's (< 0: overslept)
        share = 1.0        # of the CPU time, charged: the user share at the last rebase
        gc = self._collected()
        self._rebase(ahead, last, switches, share, False, gc)
        clock = time.perf_counter
        if not self._signal(signal.SIGCONT):
            return
        while not self._halt.is_set():
            start = clock()
            time.sleep(burst)
            if not self._let_modelled_work_finish():
                continue    # its CPU is counted apart and its chip time modelled at its end
            ran = clock() - start
            # a running process's CPU time is only brought up to date when it leaves the
            # CPU: stop it, and wait until it has, before reading; a sleeping one is read
            # as it is
            stopped = self._running()
            if stopped and not self._stop():
                return
            now, count = _read_schedstat(self._fd)
            # the host's own cost of scheduling it in (wake-ups, our continues), and of
            # its system calls: the emulator's links, the sockets (on the chip a register
            # access, or lwIP on the other core), by the user share
            raw = max(0, now - last - (count - switches) * self.switch_ns)
            last, switches = now, count
            before, gc = gc, self._collected()
            gc_cpu, gc_chip = gc[0] - before[0], gc[1] - before[1]
            # collections, drivers: the chip's time as modelled, not their CPU x factor
            modelled = bool(gc_cpu and self.gc_ns_per_byte)
            used = int((max(0, raw - gc_cpu) if modelled else raw) * share)
            if unmarked:            # the wrapper's start-up: free
                used = 0
                unmarked = not self._board_side_marked()
            elif free > 0:
                free -= used
                used = max(0, -free)
            paced = not unmarked and free <= 0
            stats.cpu_ns += used
            stats.bursts += 1
            if len(stats.burst_s) < _SAMPLES:
                stats.burst_s.append(ran)
            else:
                stats.burst_s[stats.bursts % _SAMPLES] = ran
            owed = ahead + int(used * (self.factor - 1))
            if modelled:
                owed += gc_chip - gc_cpu    # that CPU ran in real time already
            share = self._user_share()
            if owed <= 0:
                # idle (waiting for I/O): real time is chip time, and the oversleep is
                # forgiven
                self._rebase(0, now, count, share, paced, gc)
                ahead = 0
                if stopped and not self._signal(signal.SIGCONT):
                    return
                continue
            if not stopped and not self._signal(signal.SIGSTOP):
                return
            before = time.monotonic_ns()
            self._halt.wait(owed / 1e9)
            slept = time.monotonic_ns() - before
            stats.stopped_s += slept / 1e9
            stats.hitch(owed, slept, time.time() - slept / 1e9)
            ahead = max(-MAX_CARRY_NS, owed - slept)
            self._rebase(ahead, now, count, share, paced, gc)
            if not self._signal(signal.SIGCONT):
                return

    def _rebase(self, ahead_ns: int, cpu_ns: int, switches: int, share: float,
                paced: bool, gc: tuple[int, int]) -> None:
        """The VM's clock from now: the host's + `ahead_ns`, and at chip speed for the CPU
        beyond `cpu_ns` and the collections beyond `gc` once pacing has started (`paced`)."""
        if self.clock is not None:
            gain = (self.factor - 1) * share if paced else 0.0
            self.clock.rebase(ahead_ns, cpu_ns, switches, self.switch_ns, gain,
                              self.gc_ns_per_byte if paced else 0.0, gc)

    def _collected(self) -> tuple[int, int]:
        """The VM's modelled work so far (its collections, its drivers' stand-ins): host
        CPU ns and modelled chip ns, in all."""
        if self.clock is None:
            return 0, 0
        c = self.clock.collections()
        return c.cpu_ns + c.driver_cpu_ns, c.chip_ns + c.driver_chip_ns

    def _board_side_marked(self) -> bool:
        """Whether the board side has marked a driver's work yet (ChipClock)."""
        c = self.clock.collections() if self.clock is not None else None
        return c is not None and (c.in_driver or c.driver_calls > 0)

    def _let_modelled_work_finish(self) -> bool:
        """A collection or a driver's work under way runs to its end before the VM is
        stopped: its chip time is modelled whole when it ends, so no part of it may be
        charged at the interpreter's factor first. Waits GC_WAIT_S at most; False if it
        is still under way then (a long one, such as a soft reset's set-up: the next
        burst's check finds it done)."""
        if not self.gc_ns_per_byte:
            return True
        deadline = time.perf_counter() + GC_WAIT_S
        while time.perf_counter() < deadline:
            c = self.clock.collections()
            if not (c.busy or c.in_driver):
                return True
            time.sleep(20e-6)
        return False

    def _stop(self) -> bool:
        """SIGSTOP, and wait until the process is off its CPU: the signal reaches a task
        running on another core some us later, and its CPU time until then was read a
        burst late, so the stop it owed came after a short job had ended (a 1 ms job
        at x25 took 1-18 ms, not 25). False if the process is gone."""
        if not self._signal(signal.SIGSTOP):
            return False
        deadline = time.perf_counter() + STOP_WAIT_S
        while self._state() not in b"Tt" and time.perf_counter() < deadline:
            pass
        return True

    def _user_share(self) -> float:
        """The process's user time / CPU time since it started (/proc/PID/stat, in
        clock ticks: a sample, so cumulative, and 1 until there are USER_SHARE_TICKS),
        less the system time of its waits that chipclock.c counts apart (charged
        nothing already: not to be discounted from the rest as well)."""
        try:
            fields = os.pread(self._stat_fd, 256, 0).rsplit(b")", 1)[1].split()
            user, system = int(fields[11]), int(fields[12])
        except (OSError, IndexError, ValueError):
            return 1.0
        if user + system < USER_SHARE_TICKS:
            return 1.0
        waits = self.clock.collections().wait_cpu_ns if self.clock is not None else 0
        system = max(0.0, system - waits * _CLOCK_TICKS / 1e9)
        return user / (user + system) if user + system else 1.0

    def _state(self) -> bytes:
        """The process's state letter (/proc/PID/stat); b"" if unreadable."""
        try:
            return os.pread(self._stat_fd, 256, 0).rsplit(b")", 1)[1][1:2]
        except (OSError, IndexError):
            return b""

    def _running(self) -> bool:
        """Whether the process is on a CPU or waiting for one (state R in /proc/PID/stat)."""
        return self._state() in (b"R", b"")

    def stop(self) -> None:
        """Let the process run free (it is being killed, or chip speed is switched off)."""
        self._halt.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=2)
