# `time` for the emulated board. Ticks count from the chip's reset (a hard boot: a soft
# reset does not restart them, as esp_timer runs on) and wrap at the ESP32's period,
# 2**30 (MICROPY_PY_TIME_TICKS_PERIOD on a 32-bit port; the unix port's is 2**62), so
# ticks_add / ticks_diff are the chip's too. The wall clock is the board's RTC, which
# starts at 2000-01-01 after a power-on and keeps only what the firmware sets (e.g.
# from NTP), as on the chip.
from time import *  # noqa: sleep_ms, sleep_us, ...
import time as _real
import os as _os

_EPOCH_2000 = 946684800
_offset = None
_PERIOD = 1 << 30
_MASK = _PERIOD - 1
_HALF = _PERIOD >> 1
# the host's CLOCK_MONOTONIC (the unix port's ticks) at the chip's last reset
_T0_US = int(_os.getenv("CITYNODE_EMU_TICKS0_US") or "0")
# the crystal's error: the chip's ticks run this many parts per million fast (integers
# only: a float would allocate on every tick read)
_PPM = int(_os.getenv("CITYNODE_EMU_XTAL_PPM") or "0")


def _us():
    """Microseconds since the reset, by the board's crystal."""
    t = _real.ticks_us() - _T0_US
    return t + t * _PPM // 1000000


def ticks_ms():
    return (_us() // 1000) & _MASK


def ticks_us():
    return _us() & _MASK


def ticks_cpu():
    # the CPU's cycle counter (CCOUNT) since the reset, at the current machine.freq()
    import emu_machine
    return (_us() * (emu_machine.freq() // 1000000)) & _MASK


def ticks_diff(end, start):
    return ((end - start + _HALF) & _MASK) - _HALF


def ticks_add(ticks, delta):
    if not -_HALF < delta < _HALF:  # extmod/modtime.c: what ticks_diff could not undo
        raise OverflowError("ticks interval overflow")
    return (ticks + delta) & _MASK


try:    # the same as viper: a call costs the chip what the C costs, not 10-20 us
    from emu_ticks import ticks_us, ticks_ms, ticks_diff, ticks_add     # noqa: F811
except Exception:
    pass


def _rtc_offset():
    global _offset
    if _offset is None:
        import emu_link, struct
        _offset = struct.unpack("<q", emu_link.call(emu_link.NVS, 6))[0]
    return _offset


def set_time(seconds):
    global _offset
    import emu_link, struct
    _offset = int(seconds) - int(_real.time())
    emu_link.call(emu_link.NVS, 7, struct.pack("<q", _offset))


def time():
    return int(_real.time()) + _rtc_offset()


def time_ns():
    return _real.time_ns() + _rtc_offset() * 1000000000


def gmtime(secs=None):
    return _real.gmtime(time() if secs is None else secs)


localtime = gmtime
