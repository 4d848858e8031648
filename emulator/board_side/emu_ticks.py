# The chip's ticks as viper. On the ESP32 ticks_us, ticks_ms, ticks_diff and ticks_add
# are C (~1 us); emu_time's Python stand-ins cost the chip 10-20 us of interpreted time a
# call at chip speed, and asyncio calls them at every task switch. The same arithmetic
# as emu_time's (which stands in where the VM has no viper: emulator/vm.py), on the
# same environment: the host's ticks at the chip's reset, the crystal's error.
import os
import micropython
import time as _real

_T0_US = int(os.getenv("CITYNODE_EMU_TICKS0_US") or "0")
_PPM = int(os.getenv("CITYNODE_EMU_XTAL_PPM") or "0")


@micropython.viper
def ticks_us() -> int:
    t = int(_real.ticks_us()) - int(_T0_US)
    return (t + t * int(_PPM) // 1000000) & 0x3FFFFFFF


@micropython.viper
def ticks_ms() -> int:
    t = int(_real.ticks_us()) - int(_T0_US)
    return ((t + t * int(_PPM) // 1000000) // 1000) & 0x3FFFFFFF


@micropython.viper
def ticks_diff(end: int, start: int) -> int:
    return ((end - start + 0x20000000) & 0x3FFFFFFF) - 0x20000000


@micropython.viper
def ticks_add(ticks: int, delta: int) -> int:
    if delta <= -0x20000000 or delta >= 0x20000000:     # extmod/modtime.c's check
        raise OverflowError("ticks interval overflow")
    return (ticks + delta) & 0x3FFFFFFF
