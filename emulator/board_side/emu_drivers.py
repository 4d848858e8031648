# The chip's drivers, timed as the chip's. What the ESP32 port does in C (the I2S
# driver's copy out of its DMA buffers, a bus transaction's driver call) the board side
# does in Python, in the VM: at chip speed that was charged as interpreted code, ~100x
# what the chip spends (an I2S read cost the chip ~5 ms, as much as the DSP on the data).
# Between begin() and end(ns) emulator/chipclock.c counts the VM's CPU apart and charges
# the chip `ns` instead, as it does for a heap collection. Outside chip speed both do
# nothing. Marks nest: a bus call inside a soft reset's set-up is part of its model.
# Viper, compiled for x86-64 only (emulator/vm.py): emu_link stands in where not.
import os
import micropython
from emu_time import _real

_AT = int(os.getenv("CITYNODE_CHIP_DRIVERS") or "0")    # chipclock.c's in_driver


@micropython.viper
def _mark(at: int, step: int, ns: int):
    p = ptr32(at)
    depth = p[0] + step
    if depth == 0:
        p[1] = ns       # driver_model_ns: read when the mark is cleared
    p[0] = depth


def begin():
    if _AT:
        _mark(_AT, 1, 0)
        _real.ticks_us()    # chipclock.c sees the mark at a read of the clock


def end(ns):
    """The driver's work is done; it costs the chip `ns` (the outermost's only)."""
    if _AT:
        _mark(_AT, -1, ns)
        _real.ticks_us()


@micropython.viper
def _word(at: int) -> int:
    return ptr32(at)[0]


_COUNT = _AT - 9 * 8    # chipclock.c's struct collections: count, 9 int64 before in_driver


def collections():
    """The heap's collections so far (the count's low word), 0 outside chip speed: the
    benchmark tells by it whether a task's turn had a collection in it."""
    return _word(_COUNT) if _AT else 0
